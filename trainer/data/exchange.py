"""Split tokenization: each rank parses and tokenizes only its share of the documents, then the ranks trade the
token arrays, so every rank holds the same global token stream and cuts the same rows from it.

Why not split by token offset: which tokens a rank needs depends on every earlier document's token count, which
is known only after tokenizing them. Documents are instead taken in rounds (tokenizer.py reads the same records
on every rank, so every rank knows each document's index); document i of a round is parsed and tokenized only by
rank i % W, and an all-gather of the variable-length token arrays hands every rank the whole round. The stream,
its rows and the position a checkpoint saves (epoch, document, offset, rows) are exactly those of one process,
so a step's global batch, and a resume at another world size, do not change.

The all-gather runs over a gloo process group of its own, made when the data is built (`dist.new_group` is a
collective of every rank): on GPUs the training's NCCL group never waits on it, and the prefetch thread's
collectives never interleave with the loop's. Every rank makes the same collectives in the same order because it
reads the same records. Two collectives per round: every rank's document count, largest token id and document
lengths, then the tokens (uint16 when every id fits, else int32) padded to the largest share. A failure in one
rank's share (an invalid JSON line, say) is gathered too: the rank that failed raises its own exception, every other
rank a DataError with its first line.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from trainer.data.sources import DataError, first_line

Tokenize = Callable[[list], list[np.ndarray]]


class DocExchange:
    """This rank's place among `world_size` ranks that tokenize rounds of documents together over `group`."""

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup | None):
        self.rank, self.world_size, self.group = rank, world_size, group

    @classmethod
    def create(cls, rank: int, world_size: int) -> DocExchange:
        """A new gloo group of every rank (a collective: every rank calls it, at the same point)."""
        return cls(rank, world_size, dist.new_group(backend="gloo"))

    def round(self, records: list, tokenize: Tokenize) -> list[np.ndarray]:
        """tokenize(records), with this rank doing records[rank::world_size] and the others the rest."""
        failure, mine = None, []
        try:
            mine = tokenize(records[self.rank :: self.world_size])
        except Exception as err:  # the peers must hear of it before anyone raises
            failure = err
        slots = -(-len(records) // self.world_size)  # documents a rank has at most: the same on every rank
        return interleave(self.gather(mine, failure, slots), len(records))

    def gather(self, mine: list[np.ndarray], failure: Exception | None, slots: int) -> list[list[np.ndarray]]:
        """Every rank's arrays (up to `slots` each), by rank; raises when any rank's share failed. The tokens
        travel as uint16 when every id fits, else int32, as bytes (what gloo sends of any dtype)."""
        tokens = np.concatenate([np.empty(0, np.int32), *mine])
        header = np.zeros(2 + slots, dtype=np.int64)  # [count or -1 for a failure, largest id, lengths...]
        header[0] = -1 if failure is not None else len(mine)
        header[1] = tokens.max(initial=0)
        header[2 : 2 + len(mine)] = [len(doc) for doc in mine]
        headers = [torch.empty(2 + slots, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(headers, torch.from_numpy(header), group=self.group)
        table = torch.stack(headers).numpy()
        if table[:, 0].min() < 0:
            self._raise(failure)
        dtype = np.dtype("<u2" if table[:, 1].max() < 1 << 16 else "<i4")
        own = tokens.astype(dtype).view(np.uint8)
        payload = torch.zeros(int(table[:, 2:].sum(axis=1).max()) * dtype.itemsize, dtype=torch.uint8)
        payload[: len(own)] = torch.from_numpy(own)
        shares = [torch.empty_like(payload) for _ in range(self.world_size)]
        dist.all_gather(shares, payload, group=self.group)
        return [
            np.split(share.numpy().view(dtype), np.cumsum(row[2 : 2 + row[0]]))[: row[0]]
            for share, row in zip(shares, table, strict=True)
        ]

    def _raise(self, failure: Exception | None) -> None:
        """Every rank learns the failing ranks' first lines; the failing rank raises its own exception, the others
        the first failure's line as a DataError."""
        said = None
        if failure is not None:
            said = first_line(failure)
            if not isinstance(failure, DataError):
                said = f"{type(failure).__name__}: {said}"
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, said, group=self.group)
        if failure is not None:
            raise failure
        raise DataError(next(m for m in messages if m is not None))


def interleave(shares: list[list[np.ndarray]], n: int) -> list[np.ndarray]:
    """Back into round order: document i came from rank i % W as that rank's (i // W)-th."""
    world = len(shares)
    return [shares[i % world][i // world] for i in range(n)]
