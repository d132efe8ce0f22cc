"""Packing: a split's documents -> one token stream -> fixed rows of seq_len + 1 tokens -> this rank's share.

Every document is framed by its source ([BOS] ids EOS, or the generated corpus's EOS). Documents are
concatenated and cut into rows of seq_len + 1 tokens, with no padding and no overlap, so inputs = row[:-1],
targets = row[1:].

Global order and sharding: all ranks read the same global stream of rows. Step s uses global rows
[s*B, (s+1)*B) and rank r keeps the contiguous block [r*B/W, (r+1)*B/W), so a step's global batch does not
depend on the world size. The price: each rank reads and tokenizes the whole stream, W times the tokenizer work
of a split reader. Tokenizing is a small share of a step for real models; for the generated corpus (~13M
tokens/s through the loader on one core) it is negligible.

Two objects with two jobs: the `TrainStream` (the training split, endless, stateful: its position resumes
exactly at any world size) and the `HeldOutSet` (the first eval_sequences rows of the eval split, read once,
the same rows at every evaluation).

Resume: the position is (epoch, document index, tokens of that document already used) plus a row counter:
a few ints, the same for every world size and seq_len. Loading it re-reads that one document (for Hugging Face
streaming after `dataset.skip(n)`) and continues exactly, at any world size.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from trainer.data.sources import DataError, DocSource, Position


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


class TrainStream:
    """This rank's block of each global batch of the training split (see the module docstring)."""

    def __init__(
        self, source: DocSource, *, seq_len: int, global_batch_size: int, rank: int, world_size: int
    ):
        if (
            seq_len < 1
            or not 0 <= rank < world_size
            or global_batch_size < 1
            or global_batch_size % world_size
        ):
            raise DataError(
                f"need seq_len >= 1, 0 <= rank < world_size and global_batch_size a positive multiple of "
                f"world_size; got seq_len={seq_len}, rank={rank}, world_size={world_size}, "
                f"global_batch_size={global_batch_size}"
            )
        if len(TokenStream(source, repeat=False).take(1)) == 0:  # an input check: before anything is written
            raise DataError(f"data source {source.name} has no training documents")
        self.source, self.seq_len, self.global_batch_size = source, seq_len, global_batch_size
        self.rank, self.world_size = rank, world_size
        self._stream = TokenStream(source, repeat=True)
        self._rows = 0

    def next_batch(self) -> torch.Tensor:
        """This rank's [global_batch_size // world_size, seq_len + 1] block of the next global batch."""
        b, width = self.global_batch_size, self.seq_len + 1
        rows = self._stream.take(b * width).reshape(b, width)
        self._rows += b
        return torch.from_numpy(rows[_block(b, self.rank, self.world_size)])

    def state_dict(self) -> dict[str, Any]:
        pos = self._stream.position
        return {
            "source": self.source.name,
            "epoch": pos.epoch,
            "docs": pos.docs,
            "offset": self._stream.offset,
            "rows": self._rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["source"] != self.source.name:
            raise DataError(
                f"data state is for source {state['source']!r}, this run reads {self.source.name!r}"
            )
        start = Position(state["epoch"], state["docs"])
        self._stream = TokenStream(self.source, repeat=True, start=start, offset=state["offset"])
        self._rows = state["rows"]


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
        self.rows = tokens.reshape(sequences, width)[_block(sequences, rank, world_size)]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The rows in tensors of up to batch_size rows; the same rows on every call."""
        return (
            torch.from_numpy(self.rows[i : i + batch_size].copy())
            for i in range(0, len(self.rows), batch_size)
        )


def _block(n: int, rank: int, world_size: int) -> slice:
    return slice(rank * n // world_size, (rank + 1) * n // world_size)
