"""Pre-tokenized data: a source's train and eval splits tokenized once into flat token shards, read by memory map.

`python launch/prepare_data.py --config X.yaml --out DIR` writes DIR (in full or not at all); `data.source: DIR`
then trains from it. DIR holds:
- index.json: {"format": FORMAT, "source": the source's name, "tokenizer_sha256": sha256 of the tokenizer's JSON
  (Tokenizer.to_str()), "vocab_size", "dtype": "uint16" (vocabularies up to 65,536 tokens) or "uint32",
  "splits": {"train" and "eval": {"tokens", "shards": [{"file", "tokens"}, ...]}}};
- tokenizer.json, the tokenizer itself (that JSON);
- <split>_NNNNNN.bin, the split's framed documents ([BOS] ids EOS) concatenated in source order, raw
  little-endian, SHARD_TOKENS tokens per file (the last one fewer).

Why flat: packing cuts the concatenated documents into rows without looking at document boundaries, so a split read
shard after shard *is* the online path's token stream, and the epochs wrap around it as the online path starts over
at document 0. Each shard is one "document" of the DocSource protocol: a position is (epoch, shard, offset in the
shard), world-size independent like the online one, and a rank copies only its own rows out of the map (packing.py),
so it reads only those pages. A run reads the tokenizer that made the shards, or refuses a data.tokenizer with
another hash: the token ids would mean other words.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from trainer.data.sources import SPLITS, DataError, DocSource, Position

FORMAT = 1
INDEX_FILE = "index.json"
TOKENIZER_COPY = "tokenizer.json"
SHARD_TOKENS = 1 << 27  # 256 MiB per uint16 shard
_WRITE_TOKENS = 1 << 22  # tokens gathered before a write


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """A tokenizer's identity: the sha256 of its JSON (to_str() reads the same after a save and a load)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def is_prepared(source: str) -> bool:
    """Whether `data.source` is a directory that launch/prepare_data.py wrote."""
    return (Path(source).expanduser() / INDEX_FILE).is_file()


# ---------------------------------------------------------------------------------------------- writing


def check_out(out: Path) -> None:
    """`out` must be new or an empty directory (checked before any work)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out}: exists and is not an empty directory")


def write_shards(
    out: Path,
    splits: dict[str, DocSource],
    *,
    source: str,
    tokenizer: Tokenizer,
    max_tokens: int = 0,
    shard_tokens: int = SHARD_TOKENS,
) -> dict[str, Any]:
    """Tokenize every split of `splits` into `out` (new or empty; written elsewhere and renamed once complete, so a
    failure leaves nothing); the index. `max_tokens` > 0: end each split at the first document boundary at or past
    that many tokens."""
    check_out(out)
    partial = out.parent / f".{out.name}.{os.getpid()}.partial"  # `out` appears only when complete
    partial.mkdir(parents=True)
    try:
        index = _write(partial, splits, source, tokenizer, max_tokens, shard_tokens)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, out)
    return index


def _write(
    out: Path,
    splits: dict[str, DocSource],
    source: str,
    tokenizer: Tokenizer,
    max_tokens: int,
    shard_tokens: int,
) -> dict[str, Any]:
    dtype = np.dtype("<u2" if tokenizer.get_vocab_size() <= 1 << 16 else "<u4")
    index: dict[str, Any] = {
        "format": FORMAT,
        "source": source,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": tokenizer.get_vocab_size(),
        "dtype": dtype.name,
        "splits": {},
    }
    for split, docs in splits.items():
        writer = _ShardWriter(out, split, dtype, shard_tokens)
        for _, doc in docs.documents(Position(), repeat=False):
            writer.add(doc)
            if max_tokens and writer.tokens >= max_tokens:
                break
        index["splits"][split] = writer.close()
    if index["splits"]["train"]["tokens"] == 0:
        raise DataError(f"data source {source} has no training documents")
    (out / TOKENIZER_COPY).write_text(tokenizer.to_str(), encoding="utf-8")
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


class _ShardWriter:
    """One split's tokens into files of `shard_tokens` tokens."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.tokens, self.shards = 0, []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, doc: np.ndarray) -> None:
        self._pending.append(doc)
        self._pending_tokens += len(doc)
        self.tokens += len(doc)
        if self._pending_tokens >= _WRITE_TOKENS:
            self._flush()

    def close(self) -> dict[str, Any]:
        self._flush()
        return {"tokens": self.tokens, "shards": self.shards}

    def _flush(self) -> None:
        if not self._pending:
            return
        data = np.concatenate(self._pending).astype(self.dtype)
        self._pending, self._pending_tokens = [], 0
        while len(data):
            if not self.shards or self.shards[-1]["tokens"] == self.shard_tokens:
                self.shards.append({"file": f"{self.split}_{len(self.shards):06d}.bin", "tokens": 0})
            shard = self.shards[-1]
            room = self.shard_tokens - shard["tokens"]
            with (self.out / shard["file"]).open("ab") as f:
                f.write(data[:room].tobytes())
            shard["tokens"] += len(data[:room])
            data = data[room:]


# ---------------------------------------------------------------------------------------------- reading


class PreparedData:
    """A prepared directory, checked: its index and shard files."""

    def __init__(self, directory: str):
        self.directory = Path(directory).expanduser()
        path = self.directory / INDEX_FILE
        try:
            self.index = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        if self.index.get("format") != FORMAT:
            raise DataError(
                f"{path}: format {self.index.get('format')!r}, this trainer reads format {FORMAT}: prepare it again"
            )
        self.vocab_size: int = self.index["vocab_size"]
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")  # the files are little-endian
        for split in SPLITS:
            for shard in self.index["splits"][split]["shards"]:
                file, size = self.directory / shard["file"], shard["tokens"] * self.dtype.itemsize
                found = file.stat().st_size if file.is_file() else None
                if found != size:
                    raise DataError(
                        f"{file}: expected {size} bytes, found {found}: damaged, prepare it again"
                    )

    def tokenizer(self, given: Tokenizer | None, spec: str = "") -> Tokenizer:
        """The tokenizer that made the shards (the copy beside them). `given` (data.tokenizer, named `spec`) must
        be that one: token ids mean nothing under another tokenizer."""
        expected = self.index["tokenizer_sha256"]
        if given is not None and tokenizer_sha256(given) != expected:
            raise DataError(
                f"data.source {self.directory} was tokenized by another tokenizer than data.tokenizer {spec} "
                f"(sha256 {expected[:12]}, not {tokenizer_sha256(given)[:12]}): prepare it with this tokenizer "
                f"or leave data.tokenizer empty"
            )
        copy = self.directory / TOKENIZER_COPY
        own = Tokenizer.from_file(str(copy)) if copy.is_file() else None
        if own is None or tokenizer_sha256(own) != expected:
            raise DataError(f"{copy}: missing, or not the tokenizer {INDEX_FILE} names: prepare it again")
        return own

    def split(self, split: str) -> ShardSplit:
        return ShardSplit(self, split)


class ShardSplit:
    """A prepared split as a DocSource whose documents are its shards (see the module docstring)."""

    def __init__(self, prepared: PreparedData, split: str):
        index = prepared.index
        self.name = f"pre-tokenized {index['source']} (tokenizer {index['tokenizer_sha256'][:12]}):{split}"
        self.files = [prepared.directory / s["file"] for s in index["splits"][split]["shards"]]
        self.dtype = prepared.dtype

    def documents(self, start: Position, repeat: bool) -> Iterator[tuple[Position, np.ndarray]]:
        epoch, first = start.epoch, start.docs
        while True:
            for i in range(first, len(self.files)):
                yield Position(epoch, i), np.memmap(self.files[i], dtype=self.dtype, mode="r")
            if not repeat or not self.files:
                return
            epoch, first = epoch + 1, 0
