"""Packing: a split's documents -> one token stream -> fixed rows of seq_len + 1 tokens -> this rank's share.

Every document is framed by its source ([BOS] ids EOS, or the generated corpus's EOS). Documents are
concatenated and cut into rows of seq_len + 1 tokens, with no padding and no overlap, so inputs = row[:-1],
targets = row[1:].

Global order and sharding: every rank sees the same global stream of rows. Step s uses global rows
[s*B, (s+1)*B) and rank r keeps the contiguous block [r*B/W, (r+1)*B/W), so a step's global batch does not
depend on the world size. A rank copies only its own block out of the stream (for pre-tokenized shards, the only
part of the memory map it reads); who tokenizes what is the source's business (tokenizer.py, exchange.py).

Two objects with two jobs: the `TrainStream` (the training split, endless, stateful: its position resumes
exactly at any world size; its batches are made ahead by a thread, prefetch.py) and the `HeldOutSet` (the first
eval_sequences rows of the eval split, read once, the same rows at every evaluation).

Order: with `shuffle_rows` n > 0, the stream of rows is cut into windows of n rows, and each window's rows are
taken in a random order drawn from (seed, window index): the data order follows a seed (the trainer's
`data.seed`, by default `train.seed`) while a step's global batch still does not depend on the world size. Every
rank then reads whole windows (it cannot know its rows before the permutation); memory: one window of tokens.

Resume: the position is (epoch, document index, tokens of that document already used) plus a row counter:
a few ints, the same for every world size and seq_len (for pre-tokenized shards a "document" is a shard). Loading
it re-reads that one document (for Hugging Face streaming after `dataset.skip(n)`) and continues exactly, at any
world size. Shuffled, the position is that of the current window's first row: a resume re-reads the window and
draws the same permutation. Each batch the thread makes carries the position after it, and `state_dict` is the position after
the last batch the loop took, so batches made ahead and never used are made again after a resume.
"""

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from trainer.data.prefetch import Prefetcher
from trainer.data.sources import DataError, DocSource, Position

PREFETCH_BATCHES = 3  # batches made ahead of the loop


class TokenStream:
    """A split's documents as one token stream, read in any amounts.

    The position is (document, tokens of it already read): independent of world size and seq_len, and enough
    to continue exactly by re-reading that one document.
    """

    def __init__(self, source: DocSource, *, repeat: bool, start: Position | None = None, offset: int = 0):
        self.source, self.repeat = source, repeat
        self.position, self.offset = start or Position(), offset
        self._docs: Iterator[tuple[Position, np.ndarray]] | None = None
        self._doc: np.ndarray | None = None

    def take(self, n: int, keep: slice = slice(None)) -> np.ndarray:
        """Consume the next n tokens and return the part `keep` of them (positions in [0, n)); the rest is passed
        over without a copy. Fewer only when a non-repeating source ends."""
        lo, hi, _ = keep.indices(n)
        parts, done = [], 0
        while done < n:
            if self._doc is None or self.offset == len(self._doc):
                if self._docs is None:
                    self._docs = self.source.documents(self.position, self.repeat)
                nxt = next(self._docs, None)
                if nxt is None:
                    break
                if self._doc is not None:  # done with it; a fresh stream keeps its resume offset
                    self.offset = 0
                self.position, self._doc = nxt
            size = min(n - done, len(self._doc) - self.offset)
            first, last = max(lo - done, 0), min(hi - done, size)
            if first < last:
                parts.append(self._doc[self.offset + first : self.offset + last])
            self.offset += size
            done += size
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


class TrainStream:
    """This rank's block of each global batch of the training split, made ahead by a thread (see the module
    docstring). `pin_device`: the CUDA device the batches go to; they come in pinned memory, so the loop can copy
    them with non_blocking=True."""

    def __init__(
        self,
        source: DocSource,
        *,
        seq_len: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        pin_device: torch.device | None = None,
        shuffle_rows: int = 0,
        seed: int = 0,
    ):
        if (
            seq_len < 1
            or not 0 <= rank < world_size
            or global_batch_size < 1
            or global_batch_size % world_size
            or shuffle_rows < 0
        ):
            raise DataError(
                f"need seq_len >= 1, 0 <= rank < world_size and global_batch_size a positive multiple of "
                f"world_size, and shuffle_rows >= 0; got seq_len={seq_len}, rank={rank}, world_size={world_size}, "
                f"global_batch_size={global_batch_size}, shuffle_rows={shuffle_rows}"
            )
        if len(TokenStream(source, repeat=False).take(1)) == 0:  # an input check: before anything is written
            raise DataError(f"data source {source.name} has no training documents")
        self.source, self.seq_len, self.global_batch_size = source, seq_len, global_batch_size
        self.rank, self.world_size, self.pin_device = rank, world_size, pin_device
        self.order = {"shuffle_rows": shuffle_rows, "seed": seed if shuffle_rows else 0}
        self._state: dict[str, Any] = {"source": source.name, "epoch": 0, "docs": 0, "offset": 0, "rows": 0}
        self._ahead: Prefetcher[tuple[torch.Tensor, dict[str, Any]]] | None = None
        self._waited_s, self._taken = 0.0, 0

    def next_batch(self) -> torch.Tensor:
        """This rank's [global_batch_size // world_size, seq_len + 1] block of the next global batch (int64)."""
        if self._ahead is None:
            self._ahead = Prefetcher(self._batches(self._state), PREFETCH_BATCHES)
        start = time.perf_counter()
        batch, self._state = self._ahead.get()
        self._waited_s += time.perf_counter() - start
        self._taken += 1
        return batch

    def wait_s(self) -> float:
        """Mean seconds next_batch waited for a batch, per batch, since the last call (or the start); then a new
        window begins."""
        mean = self._waited_s / max(self._taken, 1)
        self._waited_s, self._taken = 0.0, 0
        return mean

    def close(self) -> None:
        """Stop making batches ahead (the thread ends; every rank must call it after the same batch). A later
        next_batch continues from the last batch taken."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch next_batch returned, and the order it follows."""
        return {**self._state, **self.order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["source"] != self.source.name:
            raise DataError(
                f"data state is for source {state['source']!r}, this run reads {self.source.name!r}"
            )
        saved = {key: state.get(key, 0) for key in self.order}  # states written before shuffling had none
        if saved != self.order:
            raise DataError(
                f"data state was written with data.shuffle_rows={saved['shuffle_rows']}, data seed "
                f"{saved['seed']}; this run has {self.order['shuffle_rows']} and {self.order['seed']}: its rows "
                f"would not continue that order (set them as they were to resume)"
            )
        self.close()
        self._state = {key: state[key] for key in ("source", "epoch", "docs", "offset", "rows")}

    def _batches(self, state: dict[str, Any]) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """Every batch from position `state` on, each with the position after it (run by the prefetch thread)."""
        if self.pin_device is not None:
            torch.cuda.set_device(self.pin_device)  # this thread's own current device: no context on GPU 0
        start = Position(state["epoch"], state["docs"])
        stream = TokenStream(self.source, repeat=True, start=start, offset=state["offset"])
        width = self.seq_len + 1
        rows_of = self._shuffled if self.order["shuffle_rows"] else self._in_order
        for tokens, position in rows_of(stream, state["rows"]):
            batch = torch.from_numpy(tokens.astype(np.int64, copy=False).reshape(-1, width))
            yield (batch.pin_memory() if self.pin_device is not None else batch), {**state, **position}

    def _in_order(self, stream: TokenStream, rows: int) -> Iterator[tuple[np.ndarray, dict[str, int]]]:
        """This rank's tokens of each global batch in stream order, with the position after the batch."""
        b, width = self.global_batch_size, self.seq_len + 1
        block = _block(b, self.rank, self.world_size)
        keep = slice(block.start * width, block.stop * width)
        while True:
            tokens = stream.take(b * width, keep)
            rows += b
            yield tokens, {**_position(stream), "rows": rows}

    def _shuffled(self, stream: TokenStream, rows: int) -> Iterator[tuple[np.ndarray, dict[str, int]]]:
        """This rank's rows of each global batch, each window of shuffle_rows rows in its seeded order; the
        position after a batch is that of the window its next row belongs to."""
        n, b, width = self.order["shuffle_rows"], self.global_batch_size, self.seq_len + 1
        block = _block(b, self.rank, self.world_size)
        index = -1  # the window in hand: none yet
        while True:
            parts, first = [], rows
            while first < rows + b:
                if first // n != index:  # the next window: read whole, its permutation drawn
                    index, window_start = first // n, _position(stream)
                    window = stream.take(n * width).reshape(n, width)
                    order = window_order(self.order["seed"], index, n)
                end = min(rows + b, (index + 1) * n)
                lo, hi = max(first, rows + block.start), min(end, rows + block.stop)
                if lo < hi:
                    parts.append(window[order[lo - index * n : hi - index * n]])
                first = end
            rows += b
            position = window_start if rows % n else _position(stream)  # a window ends here: the next one's
            yield np.concatenate(parts), {**position, "rows": rows}


def window_order(seed: int, window: int, rows: int) -> np.ndarray:
    """The order in which window `window`'s rows are taken: a permutation drawn from (seed, window) alone."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, window]))).permutation(rows)


def _position(stream: TokenStream) -> dict[str, int]:
    return {"epoch": stream.position.epoch, "docs": stream.position.docs, "offset": stream.offset}


class HeldOutSet:
    """This rank's contiguous block of the fixed held-out set: the first `sequences` rows of the eval split,
    read when built (too little held-out data is an input error before anything is written)."""

    def __init__(self, source: DocSource, *, seq_len: int, sequences: int, rank: int, world_size: int):
        width = seq_len + 1
        if sequences < 1 or sequences % world_size:
            raise DataError(
                f"data.eval_sequences ({sequences}) must be a positive multiple of the world size"
            )
        tokens = TokenStream(source, repeat=False).take(sequences * width)
        if len(tokens) < sequences * width:
            raise DataError(
                f"held-out split of {source.name} has only {len(tokens) // width} sequences of {width} "
                f"tokens, data.eval_sequences is {sequences}: lower it or add data"
            )
        self.rows = tokens.reshape(sequences, width)[_block(sequences, rank, world_size)].astype(np.int64)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The rows in tensors of up to batch_size rows; the same rows on every call."""
        return (
            torch.from_numpy(self.rows[i : i + batch_size].copy())
            for i in range(0, len(self.rows), batch_size)
        )


def _block(n: int, rank: int, world_size: int) -> slice:
    return slice(rank * n // world_size, (rank + 1) * n // world_size)
