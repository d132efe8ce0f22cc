"""Where documents come from: the generated Markov corpus, local files, or a Hugging Face dataset.

Sources (`data.source`):
- "generated": the sparse Markov corpus of trainer/data/markov.py (token ids directly, no tokenizer, known floor).
- a local .txt / .jsonl / .parquet file, or a directory of them (read recursively in sorted path order, hidden
  files skipped). A .txt file has one document per non-blank line; .jsonl and .parquet have one per record,
  text in `data.text_field`.
- any other string: a Hugging Face dataset name, loaded with `datasets.load_dataset(source, subset, split,
  streaming)`.

A text source gives each document as a record, cheap to read (every rank reads every record, so every rank knows
each document's index), and its text, parsed only by the rank that tokenizes it (exchange.py).

Splits: "train" and "eval". Hugging Face sources use `data.split` / `data.eval_split`. A local source holds out
every HELD_OUT_EVERY-th document (document index % 100 == 0, so doc 0 included) for eval and trains on the rest.
The generated corpus draws eval documents from a separate seed stream. Documents are read in source order (no
shuffling); the train stream starts again from the first document (the next epoch) when the source runs out.
"""

import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trainer.data.markov import MarkovCorpus


class DataError(ValueError):
    """A data source, split or tokenizer that cannot be used; the message names the path, dataset or field."""


GENERATED = "generated"
SPLITS = ("train", "eval")
LOCAL_EXTENSIONS = (".txt", ".jsonl", ".parquet")
# A source with one of these suffixes is a path (and an error if missing), never a hub name.
_FILE_SUFFIXES = (*LOCAL_EXTENSIONS, ".json", ".csv", ".tsv", ".gz", ".zst", ".arrow")
HELD_OUT_EVERY = 100
# A streamed dataset keeps its iteration state on the dataset object, and an iteration reads it as it starts: two
# iterations of one dataset in two threads (two ranks' prefetch threads in one process, in tests) take their
# steps one at a time, or one starts from where the other has got to.
_HF_STEP = threading.Lock()


def is_local_source(source: str) -> bool:
    """Hub names look like `allenai/c4`; local data is an existing path, an explicit path (`/`, `./`, `../`,
    `~`), or a name with a data-file suffix. The one rule for the config check and for opening the source."""
    if source == GENERATED:
        return False
    return (
        source.startswith(("/", "./", "../", "~", "."))
        or source.lower().endswith(_FILE_SUFFIXES)
        or Path(source).expanduser().exists()
    )


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

    def records(self, skip: int) -> Iterator[Any]:
        """One pass over the split's documents from document `skip`, unparsed: cheap enough for every rank to
        read all of them, so that every rank knows every document's index."""
        ...

    def text(self, record: Any) -> str:
        """A record's text: the parse, done only by the rank that tokenizes the document."""
        ...

    def texts(self, skip: int) -> Iterator[str]:
        """One pass over the split's documents as text, starting at document `skip`."""
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


class _Texts:
    """`texts` for a source that has `records` and `text`."""

    def texts(self, skip: int) -> Iterator[str]:
        return map(self.text, self.records(skip))


class LocalText(_Texts):
    def __init__(self, path: Path, field: str, split: str):
        self.files = _local_files(path)
        self.name = f"{path}:{split}"
        self._field, self._held_out = field, split == "eval"

    def records(self, skip: int) -> Iterator[Any]:
        every = chain.from_iterable(_read_records(f, self._field) for f in self.files)
        mine = (r for i, r in enumerate(every) if (i % HELD_OUT_EVERY == 0) == self._held_out)
        return islice(mine, skip, None)

    def text(self, record: Any) -> str:
        return _parse(record, self._field)


class HFText(_Texts):
    def __init__(self, name: str, subset: str, split: str, streaming: bool, field: str):
        import datasets  # heavy import, only for runs that use the hub

        try:
            self._dataset = datasets.load_dataset(name, subset or None, split=split, streaming=streaming)
        except Exception as err:  # hub, network and builder failures come in many types; all mean the same
            raise DataError(
                f"cannot load Hugging Face dataset {name!r} (subset {subset!r}, split {split!r}): {first_line(err)}"
            ) from err
        self.name = f"{name}:{subset}:{split}"
        self._field = field

    def records(self, skip: int) -> Iterator[Any]:
        records, end = iter(self._dataset.skip(skip) if skip else self._dataset), object()
        while True:
            with _HF_STEP:
                record = next(records, end)
            if record is end:
                return
            yield record

    def text(self, record: Any) -> str:
        return _text_of(record, self._field, self.name)


def open_text(cfg: Any, split: str) -> LocalText | HFText:
    """The text source of `cfg.source` for split "train" or "eval" (see the module docstring)."""
    if is_local_source(cfg.source):
        return LocalText(Path(cfg.source).expanduser(), cfg.text_field, split)
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


def _read_records(path: Path, field: str) -> Iterator[Any]:
    """A file's documents unparsed: a .txt line, a .jsonl (path, line number, line), a .parquet (path, row, arrow
    value); `_parse` makes each a string."""
    if path.suffix == ".txt":
        with path.open(encoding="utf-8") as f:
            yield from (line.rstrip("\r\n") for line in f if line.strip())
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            records = ((path, lineno, line) for lineno, line in enumerate(f, 1) if line.strip())
            first = next(records, None)
            if first is None:
                return
            _parse(first, field)  # a wrong data.text_field shows at a file's first record, on every rank
            yield first
            yield from records
    else:
        import pyarrow.parquet as pq  # comes with `datasets`; only parquet sources need it

        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names})")
        column = chain.from_iterable(b.column(0) for b in pf.iter_batches(batch_size=1024, columns=[field]))
        yield from ((path, row, value) for row, value in enumerate(column))


def _parse(record: Any, field: str) -> str:
    if isinstance(record, str):  # a .txt line
        return record
    path, where, raw = record
    if path.suffix == ".jsonl":
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{where}: invalid JSON ({err})") from None
        return _text_of(parsed, field, f"{path}:{where}")
    return _checked(raw.as_py(), field, f"{path} row {where}")


def _text_of(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no text field {field!r} (found {keys}); set data.text_field")
    return _checked(record[field], field, where)


def _checked(text: Any, field: str, where: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


def first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch
