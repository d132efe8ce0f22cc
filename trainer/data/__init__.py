"""The data pipeline: sources (sources.py, markov.py) -> tokenizer (tokenizer.py) -> packing (packing.py).

`build_data` opens everything a run reads and checks it (source readable and non-empty, tokenizer, enough
held-out rows) without writing anything; a tokenizer trained here is saved by the trainer once every input has
been checked.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from trainer.data.markov import MarkovCorpus
from trainer.data.packing import HeldOutSet, TrainStream
from trainer.data.sources import GENERATED, DataError, DocSource, GeneratedSource, open_text
from trainer.data.tokenizer import TokenizedText, build_tokenizer, save_tokenizer, train_bpe


@dataclass
class Data:
    """What a run reads: its train stream, its held-out set, and facts about the source."""

    train: TrainStream
    held_out: HeldOutSet
    vocab_size: int  # the model needs at least this many embeddings
    entropy_floor: float | None  # best achievable loss in nats/token (generated corpus); None for real text
    new_tokenizer: Tokenizer | None  # trained by this run: save it in the run directory


def open_source(cfg: Any, split: str, tokenizer: Tokenizer | None) -> tuple[DocSource, int, float | None]:
    """(documents of `split`, vocabulary size, entropy floor) for `cfg` (the trainer's DataConfig)."""
    if tokenizer is not None:
        return TokenizedText(open_text(cfg, split), tokenizer), tokenizer.get_vocab_size(), None
    try:
        corpus = MarkovCorpus(cfg.vocab_size, cfg.generated_seed, order=cfg.generated_order)
    except ValueError as err:
        raise DataError(f"data.vocab_size: {err}") from None
    return GeneratedSource(corpus, split), corpus.vocab_size, corpus.entropy_floor


def build_data(
    cfg: Any, *, seq_len: int, global_batch_size: int, rank: int, world_size: int, run_dir: Path | None
) -> Data:
    """Open and check the train and eval splits of `cfg`; DataError (one line) for anything unusable."""
    tokenizer, trained = build_tokenizer(cfg, run_dir)
    train_source, vocab_size, floor = open_source(cfg, "train", tokenizer)
    eval_source, _, _ = open_source(cfg, "eval", tokenizer)
    shard = {"seq_len": seq_len, "rank": rank, "world_size": world_size}
    return Data(
        train=TrainStream(train_source, global_batch_size=global_batch_size, **shard),
        held_out=HeldOutSet(eval_source, sequences=cfg.eval_sequences, **shard),
        vocab_size=vocab_size,
        entropy_floor=floor,
        new_tokenizer=tokenizer if trained else None,
    )


__all__ = [
    "GENERATED",
    "Data",
    "DataError",
    "HeldOutSet",
    "MarkovCorpus",
    "TrainStream",
    "build_data",
    "build_tokenizer",
    "open_source",
    "open_text",
    "save_tokenizer",
    "train_bpe",
]
