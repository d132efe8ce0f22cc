"""Generated corpus: a sparse Markov source with a known entropy rate, for runs and tests without downloads.

Why not uniform random tokens: they teach nothing (the loss sits at ln V). This chain has structure a tiny model
learns in a few hundred steps and a best achievable loss known in closed form, so a loss curve can be judged
against its floor instead of eyeballed.

The source. Token 0 is EOS. A context c is the last `order` tokens (1 or 2; a document's first tokens see EOS
before them). Every context has K distinct successors succ[c, 0..K-1] drawn from 1..V-1. The next token is EOS
with probability q, else succ[c, k] with probability (1 - q) p_k, p_k ~ (k+1)^-s. A document is the run of tokens
between two EOS: its length is geometric (mean (1 - q) / q non-EOS tokens) and it starts from context EOS, so
documents are i.i.d. and their concatenation is exactly one sample path of the chain.

Entropy floor, in closed form: every context has the same next-token distribution up to relabelling, so each
token's conditional entropy given its context is h(q) + (1 - q) H(p) at every position, whatever the stationary
distribution. With order 1 a packed row keeps every target's predecessor inside the row, so a model can reach
this loss on every target, and no model can beat it in expectation. With order 2 the same holds except for the
first target of each row (its second predecessor lies in the previous row): the floor is then a lower bound,
tight to within 1/seq_len of a nat. Order 1 is learnable by a bigram model (embedding and head alone); order 2
needs attention over two positions and an MLP that stores V^2 contexts, so it exercises the hidden matrices that
the matrix optimizers train (the convergence benchmark uses it).

Speed: documents come in chunks of DOCS_PER_CHUNK, each chunk seeded by (seed, split, chunk index), so any
document is reachable by generating one chunk (exact, cheap resume). Inside a chunk all documents advance one
position per vectorized numpy step; sorted by length, the live documents are always a prefix.
"""

from collections.abc import Iterator

import numpy as np

EOS_ID = 0
DOCS_PER_CHUNK = 1024
_TABLE_STREAM = 0  # seed-sequence key of the successor table; split s uses 1 + s, so train/eval never overlap


class MarkovCorpus:
    """Successor table + document generator for one (vocab_size, seed); see the module docstring."""

    def __init__(
        self,
        vocab_size: int,
        seed: int,
        *,
        branching: int = 8,
        zipf_exponent: float = 1.0,
        eos_prob: float = 1 / 256,
        order: int = 1,
    ):
        if not 1 <= branching <= vocab_size - 1:
            raise ValueError(
                f"vocab_size {vocab_size} too small for {branching} successors per token plus EOS"
            )
        if not 0 < eos_prob < 1:
            raise ValueError(f"eos_prob must be in (0, 1), got {eos_prob}")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        self.vocab_size, self.seed, self.eos_prob, self.order = vocab_size, seed, eos_prob, order
        weights = np.arange(1, branching + 1, dtype=np.float64) ** -zipf_exponent
        self.rank_probs = weights / weights.sum()
        self._cdf = np.cumsum(self.rank_probs)
        self._cdf[-1] = 1.0
        # Row c of the table: context c = prev2 * V + prev1 (order 2) or prev1 (order 1).
        table_key = [seed, _TABLE_STREAM] if order == 1 else [seed, _TABLE_STREAM, order]
        self.successors = _distinct_successors(
            np.random.default_rng(table_key), vocab_size**order, branching, vocab_size
        )
        q, p = eos_prob, self.rank_probs
        self.entropy_floor = float(-q * np.log(q) - (1 - q) * np.log1p(-q) - (1 - q) * np.sum(p * np.log(p)))

    def documents(self, split_id: int, start: int = 0) -> Iterator[np.ndarray]:
        """Documents start, start+1, ... of a split, each ending with its EOS; infinite."""
        chunk, skip = divmod(start, DOCS_PER_CHUNK)
        while True:
            tokens, ends = self.chunk(split_id, chunk)
            begins = np.concatenate(([0], ends[:-1]))
            for b, e in zip(begins[skip:], ends[skip:], strict=True):
                yield tokens[b:e]
            chunk, skip = chunk + 1, 0

    def chunk(self, split_id: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated tokens of one chunk of documents and the end offset of each document."""
        rng = np.random.default_rng([self.seed, 1 + split_id, index])
        lengths = rng.geometric(self.eos_prob, size=DOCS_PER_CHUNK) - 1  # non-EOS tokens per document
        ends = np.cumsum(lengths + 1)
        tokens = np.empty(int(ends[-1]), dtype=np.int64)
        tokens[ends - 1] = EOS_ID
        ranks = np.searchsorted(self._cdf, rng.random(tokens.size), side="right")  # one draw per slot
        order = np.argsort(-lengths, kind="stable")
        sorted_len = lengths[order]
        live = np.searchsorted(-sorted_len, -np.arange(sorted_len[0]), side="left")  # docs longer than t
        pos = (ends - lengths - 1)[order]  # each document's first slot, longest document first
        prev = np.full(DOCS_PER_CHUNK, EOS_ID, dtype=np.int64)
        context = prev.copy()  # EOS, or (EOS, EOS) = 0 for order 2
        flat = self.successors.ravel()
        width, vocab = self.successors.shape[1], self.vocab_size
        for m in live:
            pos, prev, context = pos[:m], prev[:m], context[:m]
            prev = flat[context * width + ranks[pos]]
            context = (context % vocab) * vocab + prev if self.order == 2 else prev
            tokens[pos] = prev
            pos = pos + 1
        return tokens, ends


def _distinct_successors(rng: np.random.Generator, rows: int, k: int, vocab_size: int) -> np.ndarray:
    """[rows, k] table, each row k distinct ids from 1..vocab_size-1 (rejection sampling, vectorized)."""
    table = rng.integers(1, vocab_size, size=(rows, k))
    while True:
        ordered = np.sort(table, axis=1)
        bad = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not bad.any():
            return table
        table[bad] = rng.integers(1, vocab_size, size=(int(bad.sum()), k))
