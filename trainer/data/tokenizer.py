"""Tokenizers: a byte-level BPE trained on the source, a tokenizer.json file, or a hub tokenizer; and the
text sources seen through one (documents framed as [BOS] ids EOS), tokenized in rounds: alone, or split between
the ranks and exchanged (exchange.py)."""

import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.data.exchange import DocExchange
from trainer.data.shards import PreparedData, is_prepared
from trainer.data.sources import GENERATED, DataError, Position, TextSource, batched, first_line, open_text

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_TRAIN_DOCS = 10_000  # a byte-level BPE of a few thousand merges is stable well before this
END_OF_TEXT = "<|endoftext|>"
_EOS_TOKENS = (END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>")
_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")
_ENCODE_BATCH = 256  # documents a rank tokenizes per round


def build_tokenizer(cfg: Any, run_dir: Path | None) -> tuple[Tokenizer | None, bool]:
    """(tokenizer, trained_now). None for the generated corpus; for a pre-tokenized source the one that made it
    (shards.py); else `cfg.tokenizer` (a tokenizer.json path or a hub name), or, when that is empty, the run's own
    run_dir/tokenizer.json from an earlier attempt, or a byte-level BPE of `cfg.vocab_size` trained on the first
    TOKENIZER_TRAIN_DOCS train documents (training is deterministic, so every rank that trains its own copy gets the
    same one). Writes nothing: a trained one is saved by `save_tokenizer` once the run's inputs have all been
    checked."""
    if cfg.source == GENERATED:
        if cfg.tokenizer:
            raise DataError("data.tokenizer must be empty for source 'generated' (it produces token ids)")
        return None, False
    if is_prepared(cfg.source):
        given = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        return PreparedData(cfg.source).tokenizer(given, cfg.tokenizer), False
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer), False
    saved = run_dir / TOKENIZER_FILE if run_dir is not None else None
    if saved is not None and saved.is_file():
        return Tokenizer.from_file(str(saved)), False
    return train_bpe(islice(open_text(cfg, "train").texts(0), TOKENIZER_TRAIN_DOCS), cfg.vocab_size), True


def save_tokenizer(tokenizer: Tokenizer, run_dir: Path) -> Path:
    """Write run_dir/tokenizer.json atomically (a resumed run reuses it)."""
    saved = run_dir / TOKENIZER_FILE
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_name(f".{saved.name}.{os.getpid()}.tmp")
    tmp.write_text(tokenizer.to_str(), encoding="utf-8")
    os.replace(tmp, saved)
    return saved


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


def load_tokenizer(spec: str) -> Tokenizer:
    """`data.tokenizer` as given: a tokenizer.json path (or a directory holding one) or a hub name."""
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
            f"cannot load tokenizer {spec!r} from the Hugging Face hub: {first_line(err)}"
        ) from err


def special_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """([BOS] or [], [EOS]) among the tokenizer's special tokens; documents are framed with them."""
    specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    eos = [specials[t] for t in _EOS_TOKENS if t in specials][:1]
    if not eos:
        raise DataError(f"tokenizer has no end-of-text special token (looked for {', '.join(_EOS_TOKENS)})")
    return [specials[t] for t in _BOS_TOKENS if t in specials][:1], eos


class TokenizedText:
    """A text source seen through a tokenizer: documents framed as [BOS] ids EOS (int32), tokenized in rounds of
    _ENCODE_BATCH documents per rank; with an `exchange`, each rank parses and tokenizes only its share of a round
    and the exchange brings the others' (exchange.py), so every rank still holds the whole stream."""

    def __init__(self, text: TextSource, tokenizer: Tokenizer, exchange: DocExchange | None = None):
        self.text, self.tokenizer, self.name, self.exchange = text, tokenizer, text.name, exchange
        self._bos, self._eos = special_ids(tokenizer)

    def documents(self, start: Position, repeat: bool) -> Iterator[tuple[Position, np.ndarray]]:
        epoch, n = start.epoch, start.docs
        size = _ENCODE_BATCH * (self.exchange.world_size if self.exchange else 1)
        while True:
            for records in batched(self.text.records(n), size):
                round_ = (
                    self.frame(records) if self.exchange is None else self.exchange.round(records, self.frame)
                )
                for doc in round_:
                    yield Position(epoch, n), doc
                    n += 1
            if not repeat:
                return
            if n == 0:
                raise DataError(f"data source {self.name} has no documents")
            epoch, n = epoch + 1, 0

    def frame(self, records: list) -> list[np.ndarray]:
        """The records parsed, tokenized and framed."""
        texts = [self.text.text(r) for r in records]
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.array(self._bos + enc.ids + self._eos, dtype=np.int32) for enc in encoded]
