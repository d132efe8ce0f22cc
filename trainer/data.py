"""Data pipeline: documents -> token ids -> packed rows of seq_len + 1 tokens -> this rank's share of each batch.

Sources (`cfg.source`):
- "generated": the sparse Markov corpus of trainer/corpus.py (token ids directly, no tokenizer, known floor).
- a local .txt / .jsonl / .parquet file, or a directory of them (read recursively in sorted path order, hidden
  files skipped). A .txt file has one document per non-blank line; .jsonl and .parquet have one per record,
  text in `cfg.text_field`.
- any other string: a Hugging Face dataset name, loaded with `datasets.load_dataset(source, subset, split,
  streaming)`.

Splits: "train" and "eval". Hugging Face sources use `cfg.split` / `cfg.eval_split`. A local source holds out
every HELD_OUT_EVERY-th document (document index % 100 == 0, so doc 0 included) for eval and trains on the rest.
The generated corpus draws eval documents from a separate seed stream. Documents are read in source order (no
shuffling); the train stream starts again from the first document (the next epoch) when the source runs out.

Packing: every document becomes [BOS] ids EOS (BOS only if the tokenizer has one). Documents are concatenated
and cut into rows of seq_len + 1 tokens, with no padding and no overlap, so inputs = row[:-1], targets = row[1:].

Global order and sharding: all ranks read the same global stream of rows. Step s uses global rows
[s*B, (s+1)*B) and rank r keeps the contiguous block [r*B/W, (r+1)*B/W), so a step's global batch does not
depend on the world size. The price: each rank reads and tokenizes the whole stream, W times the tokenizer work
of a split reader. Tokenizing is a small share of a step for real models; for the generated corpus (~13M
tokens/s through the loader on one core) it is negligible.

Resume: the position is (epoch, document index, tokens of that document already used) plus a row counter:
a few ints, the same for every world size and seq_len. Loading it re-reads that one document (for Hugging Face
streaming after `dataset.skip(n)`) and continues exactly, at any world size.
"""

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.corpus import MarkovCorpus


class DataError(ValueError):
    """A data source, split or tokenizer that cannot be used; the message names the path, dataset or field."""


GENERATED = "generated"
SPLITS = ("train", "eval")
LOCAL_EXTENSIONS = (".txt", ".jsonl", ".parquet")
# A source with one of these suffixes is a path (and an error if missing), never a hub name.
_FILE_SUFFIXES = {*LOCAL_EXTENSIONS, ".json", ".csv", ".tsv", ".gz", ".zst", ".arrow"}
HELD_OUT_EVERY = 100
TOKENIZER_TRAIN_DOCS = 10_000  # a byte-level BPE of a few thousand merges is stable well before this
END_OF_TEXT = "<|endoftext|>"
_EOS_TOKENS = (END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>")
_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")
_ENCODE_BATCH = 256


@dataclass(frozen=True)
class Position:
    """A document's place in a split's stream: which pass over the source, and its index within that pass."""

    epoch: int = 0
    docs: int = 0


class DocSource(Protocol):
    name: str  # identifies source + split in checkpoints

    def documents(self, start: Position, repeat: bool) -> Iterator[tuple[Position, np.ndarray]]:
        """Token arrays (separators included) from document `start` on; `repeat` = start over when exhausted."""
        ...


class TextSource(Protocol):
    name: str

    def texts(self, skip: int) -> Iterator[str]:
        """One pass over the split's documents, starting at document `skip`."""
        ...


# ---------------------------------------------------------------------------------------------- sources


class GeneratedSource:
    def __init__(self, corpus: MarkovCorpus, split: str):
        self.corpus, self._split_id = corpus, SPLITS.index(split)
        self.name = (
            f"generated(vocab_size={corpus.vocab_size}, seed={corpus.seed}, order={corpus.order}):{split}"
        )

    def documents(self, start: Position, repeat: bool) -> Iterator[tuple[Position, np.ndarray]]:
        # The chain never runs out, so there is one pass and nothing to repeat.
        for i, doc in enumerate(self.corpus.documents(self._split_id, start.docs), start.docs):
            yield Position(0, i), doc


class LocalText:
    def __init__(self, path: Path, field: str, split: str):
        self.files = _local_files(path)
        self.name = f"{path}:{split}"
        self._field, self._held_out = field, split == "eval"

    def texts(self, skip: int) -> Iterator[str]:
        every = chain.from_iterable(_read_texts(f, self._field) for f in self.files)
        mine = (t for i, t in enumerate(every) if (i % HELD_OUT_EVERY == 0) == self._held_out)
        return islice(mine, skip, None)


class HFText:
    def __init__(self, name: str, subset: str, split: str, streaming: bool, field: str):
        import datasets  # heavy import, only for runs that use the hub

        try:
            self._dataset = datasets.load_dataset(name, subset or None, split=split, streaming=streaming)
        except Exception as err:  # hub, network and builder failures come in many types; all mean the same
            raise DataError(
                f"cannot load Hugging Face dataset {name!r} (subset {subset!r}, split {split!r}): {_first_line(err)}"
            ) from err
        self.name = f"{name}:{subset}:{split}"
        self._field = field

    def texts(self, skip: int) -> Iterator[str]:
        dataset = self._dataset.skip(skip) if skip else self._dataset
        for record in dataset:
            yield _text_of(record, self._field, self.name)


class TokenizedText:
    """A text source seen through a tokenizer: documents framed as [BOS] ids EOS."""

    def __init__(self, text: TextSource, tokenizer: Tokenizer):
        self.text, self.tokenizer, self.name = text, tokenizer, text.name
        self._bos, self._eos = special_ids(tokenizer)

    def documents(self, start: Position, repeat: bool) -> Iterator[tuple[Position, np.ndarray]]:
        epoch, n = start.epoch, start.docs
        while True:
            for texts in _batched(self.text.texts(n), _ENCODE_BATCH):
                for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False):
                    yield Position(epoch, n), np.array(self._bos + enc.ids + self._eos, dtype=np.int64)
                    n += 1
            if not repeat:
                return
            if n == 0:
                raise DataError(f"data source {self.name} has no documents")
            epoch, n = epoch + 1, 0


def open_text(cfg: Any, split: str) -> LocalText | HFText:
    """The text source of `cfg.source` for split "train" or "eval" (see the module docstring)."""
    path = Path(cfg.source).expanduser()
    if path.exists() or cfg.source.startswith((".", "/", "~")) or path.suffix.lower() in _FILE_SUFFIXES:
        return LocalText(path, cfg.text_field, split)
    hf_split = cfg.split if split == "train" else cfg.eval_split
    return HFText(cfg.source, cfg.subset, hf_split, cfg.streaming, cfg.text_field)


def _local_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"data.source {str(path)!r}: no such file or directory")
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in LOCAL_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"data.source {str(path)!r}: directory has no {'/'.join(LOCAL_EXTENSIONS)} files")
        return files
    if path.suffix not in LOCAL_EXTENSIONS:
        raise DataError(
            f"data.source {str(path)!r}: unsupported file type {path.suffix!r} (use {', '.join(LOCAL_EXTENSIONS)})"
        )
    return [path]


def _read_texts(path: Path, field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        with path.open(encoding="utf-8") as f:
            yield from (line.rstrip("\r\n") for line in f if line.strip())
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({err})") from None
                    yield _text_of(record, field, f"{path}:{lineno}")
    else:
        import pyarrow.parquet as pq  # comes with `datasets`; only parquet sources need it

        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names})")
        column = chain.from_iterable(
            b.column(0).to_pylist() for b in pf.iter_batches(batch_size=1024, columns=[field])
        )
        for row, text in enumerate(column):
            yield _checked(text, field, f"{path} row {row}")


def _text_of(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no text field {field!r} (found {keys}); set data.text_field")
    return _checked(record[field], field, where)


def _checked(text: Any, field: str, where: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


# ------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(cfg: Any, run_dir: Path | None) -> Tokenizer | None:
    """None for the generated corpus; else `cfg.tokenizer` (a tokenizer.json path or a hub name), or, when that
    is empty, a byte-level BPE of `cfg.vocab_size` trained on the first TOKENIZER_TRAIN_DOCS train documents and
    kept in run_dir/tokenizer.json, which a resumed run reuses (training is deterministic, so every rank that
    trains its own copy gets the same one)."""
    if cfg.source == GENERATED:
        if cfg.tokenizer:
            raise DataError("data.tokenizer must be empty for source 'generated' (it produces token ids)")
        return None
    if cfg.tokenizer:
        return _load_tokenizer(cfg.tokenizer)
    saved = run_dir / "tokenizer.json" if run_dir is not None else None
    if saved is not None and saved.is_file():
        return Tokenizer.from_file(str(saved))
    tokenizer = train_bpe(islice(open_text(cfg, "train").texts(0), TOKENIZER_TRAIN_DOCS), cfg.vocab_size)
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_name(f".{saved.name}.{os.getpid()}.tmp")  # ranks may race; each replace is atomic
        tmp.write_text(tokenizer.to_str(), encoding="utf-8")
        os.replace(tmp, saved)
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: any text encodes, no unknown token) with END_OF_TEXT as id 0."""
    if vocab_size <= 257:
        raise DataError(f"data.vocab_size {vocab_size} is too small for a byte-level BPE (256 bytes + EOS)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _load_tokenizer(spec: str) -> Tokenizer:
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if path.suffix == ".json" or spec.startswith((".", "/", "~")):
        raise DataError(f"data.tokenizer {str(path)!r}: no such file")
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as err:  # hub and network failures come in many types
        raise DataError(
            f"cannot load tokenizer {spec!r} from the Hugging Face hub: {_first_line(err)}"
        ) from err


def special_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """([BOS] or [], [EOS]) among the tokenizer's special tokens; documents are framed with them."""
    specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    eos = [specials[t] for t in _EOS_TOKENS if t in specials][:1]
    if not eos:
        raise DataError(f"tokenizer has no end-of-text special token (looked for {', '.join(_EOS_TOKENS)})")
    return [specials[t] for t in _BOS_TOKENS if t in specials][:1], eos


# --------------------------------------------------------------------------------------------- packing


class TokenStream:
    """A split's documents as one token stream, read in any amounts.

    The position is (document, tokens of it already read): independent of world size and seq_len, and enough
    to continue exactly by re-reading that one document.
    """

    def __init__(self, source: DocSource, *, repeat: bool, start: Position = Position(), offset: int = 0):
        self.source, self.repeat = source, repeat
        self.position, self.offset = start, offset
        self._docs: Iterator[tuple[Position, np.ndarray]] | None = None
        self._doc: np.ndarray | None = None

    def take(self, n: int) -> np.ndarray:
        """The next n tokens (fewer only when a non-repeating source ends)."""
        parts = []
        while n > 0:
            if self._doc is None or self.offset == len(self._doc):
                if self._docs is None:
                    self._docs = self.source.documents(self.position, self.repeat)
                nxt = next(self._docs, None)
                if nxt is None:
                    break
                if self._doc is not None:  # done with it; a fresh stream keeps its resume offset
                    self.offset = 0
                self.position, self._doc = nxt
            piece = self._doc[self.offset : self.offset + n]
            parts.append(piece)
            self.offset += len(piece)
            n -= len(piece)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


class PackedLoader:
    """Fixed-length rows of a split for one rank (see the module docstring for order, sharding and resume)."""

    def __init__(
        self,
        source: DocSource,
        *,
        seq_len: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        vocab_size: int,
        entropy_floor: float | None,
        eval_sequences: int,
        split: str,
    ):
        self.source, self.seq_len, self.global_batch_size = source, seq_len, global_batch_size
        self.rank, self.world_size, self.split = rank, world_size, split
        self.vocab_size = vocab_size  # the model needs at least this many embeddings
        self.entropy_floor = entropy_floor  # best achievable loss in nats/token; None for real text
        self.eval_sequences = eval_sequences
        self._stream = TokenStream(source, repeat=True)
        self._rows = 0
        self._eval_rows: np.ndarray | None = None

    def next_batch(self) -> torch.Tensor:
        """This rank's [global_batch_size // world_size, seq_len + 1] block of the next global batch."""
        b, width = self.global_batch_size, self.seq_len + 1
        rows = self._stream.take(b * width).reshape(b, width)
        self._rows += b
        return torch.from_numpy(rows[_block(b, self.rank, self.world_size)])

    def state_dict(self) -> dict:
        pos = self._stream.position
        return {
            "source": self.source.name,
            "epoch": pos.epoch,
            "docs": pos.docs,
            "offset": self._stream.offset,
            "rows": self._rows,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["source"] != self.source.name:
            raise DataError(
                f"data state is for source {state['source']!r}, this run reads {self.source.name!r}"
            )
        start = Position(state["epoch"], state["docs"])
        self._stream = TokenStream(self.source, repeat=True, start=start, offset=state["offset"])
        self._rows = state["rows"]

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """This rank's contiguous block of the fixed held-out set (the first eval_sequences rows of the eval
        split), in tensors of up to batch_size rows; the same rows on every call."""
        if self.split != "eval":
            raise ValueError("eval_batches needs the loader built with split='eval'")
        if self._eval_rows is None:
            self._eval_rows = self._held_out_rows()
        mine = self._eval_rows[_block(len(self._eval_rows), self.rank, self.world_size)]
        return (torch.from_numpy(mine[i : i + batch_size].copy()) for i in range(0, len(mine), batch_size))

    def _held_out_rows(self) -> np.ndarray:
        n, width = self.eval_sequences, self.seq_len + 1
        if n < 1 or n % self.world_size:
            raise DataError(f"data.eval_sequences ({n}) must be a positive multiple of the world size")
        tokens = TokenStream(self.source, repeat=False).take(n * width)
        if len(tokens) < n * width:
            raise DataError(
                f"held-out split of {self.source.name} has only {len(tokens) // width} sequences of {width} "
                f"tokens, data.eval_sequences is {n}: lower it or add data"
            )
        return tokens.reshape(n, width)


def _block(n: int, rank: int, world_size: int) -> slice:
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def build_loader(
    cfg: Any,
    *,
    seq_len: int,
    global_batch_size: int,
    rank: int,
    world_size: int,
    run_dir: Path | None,
    split: str = "train",
) -> PackedLoader:
    """The loader the trainer uses for `split` ("train" or "eval") of the source described by `cfg`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seq_len < 1 or not 0 <= rank < world_size or global_batch_size < 1 or global_batch_size % world_size:
        raise DataError(
            f"need seq_len >= 1, 0 <= rank < world_size and global_batch_size a positive multiple of "
            f"world_size; got seq_len={seq_len}, rank={rank}, world_size={world_size}, "
            f"global_batch_size={global_batch_size}"
        )
    tokenizer = build_tokenizer(cfg, run_dir)
    source: DocSource
    if tokenizer is None:
        try:
            corpus = MarkovCorpus(cfg.vocab_size, cfg.generated_seed, order=cfg.generated_order)
        except ValueError as err:
            raise DataError(f"data.vocab_size: {err}") from None
        source, vocab_size, floor = GeneratedSource(corpus, split), corpus.vocab_size, corpus.entropy_floor
    else:
        source = TokenizedText(open_text(cfg, split), tokenizer)
        vocab_size, floor = tokenizer.get_vocab_size(), None
    return PackedLoader(
        source,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        rank=rank,
        world_size=world_size,
        vocab_size=vocab_size,
        entropy_floor=floor,
        eval_sequences=cfg.eval_sequences,
        split=split,
    )
