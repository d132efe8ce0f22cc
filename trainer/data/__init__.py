"""The data pipeline: sources (sources.py, markov.py) -> tokenizer (tokenizer.py; split between the ranks by
exchange.py) -> packing (packing.py; batches made ahead by prefetch.py), or pre-tokenized shards (shards.py) ->
packing.

`build_data` opens everything a run reads and checks it (source readable and non-empty, tokenizer, enough
held-out rows) without writing anything; a tokenizer trained here is saved by the trainer once every input has
been checked. Text read by several ranks is tokenized in shares and exchanged over a gloo group made here; one
rank, the generated corpus (it costs nothing) and pre-tokenized shards (each rank maps its own rows) need none.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from trainer.data.exchange import DocExchange
from trainer.data.markov import MarkovCorpus
from trainer.data.packing import HeldOutSet, TrainStream
from trainer.data.shards import SHARD_TOKENS, PreparedData, check_out, is_prepared, write_shards
from trainer.data.sources import GENERATED, SPLITS, DataError, DocSource, GeneratedSource, open_text
from trainer.data.tokenizer import TokenizedText, build_tokenizer, save_tokenizer, train_bpe


@dataclass
class Data:
    """What a run reads: its train stream, its held-out set, and facts about the source."""

    train: TrainStream
    held_out: HeldOutSet
    vocab_size: int  # the model needs at least this many embeddings
    entropy_floor: float | None  # best achievable loss in nats/token (generated corpus); None for real text
    new_tokenizer: Tokenizer | None  # trained by this run: save it in the run directory


def open_source(
    cfg: Any, split: str, tokenizer: Tokenizer | None, exchange: DocExchange | None = None
) -> tuple[DocSource, int, float | None]:
    """(documents of `split`, vocabulary size, entropy floor) for `cfg` (the trainer's DataConfig); text is
    tokenized in shares over `exchange` when given."""
    if is_prepared(cfg.source):
        prepared = PreparedData(cfg.source)
        return prepared.split(split), prepared.vocab_size, None
    if tokenizer is not None:
        return TokenizedText(open_text(cfg, split), tokenizer, exchange), tokenizer.get_vocab_size(), None
    try:
        corpus = MarkovCorpus(cfg.vocab_size, cfg.generated_seed, order=cfg.generated_order)
    except ValueError as err:
        raise DataError(f"data.vocab_size: {err}") from None
    return GeneratedSource(corpus, split), corpus.vocab_size, corpus.entropy_floor


def build_data(
    cfg: Any,
    *,
    seq_len: int,
    global_batch_size: int,
    rank: int,
    world_size: int,
    run_dir: Path | None,
    pin_device: torch.device | None = None,
    train_seed: int = 0,
) -> Data:
    """Open and check the train and eval splits of `cfg`; DataError (one line) for anything unusable. With more
    than one rank and text to tokenize, a collective (it makes the exchange's process group). `pin_device`: the
    CUDA device the train batches go to (made in pinned memory). The data order's seed is `cfg.seed`, or
    `train_seed` when that is None."""
    tokenizer, trained = build_tokenizer(cfg, run_dir)
    text = tokenizer is not None and not is_prepared(cfg.source)
    exchange = DocExchange.create(rank, world_size) if text and world_size > 1 else None
    train_source, vocab_size, floor = open_source(cfg, "train", tokenizer, exchange)
    eval_source, _, _ = open_source(cfg, "eval", tokenizer, exchange)
    shard = {"seq_len": seq_len, "rank": rank, "world_size": world_size}
    return Data(
        train=TrainStream(
            train_source,
            global_batch_size=global_batch_size,
            pin_device=pin_device,
            shuffle_rows=cfg.shuffle_rows,
            seed=train_seed if cfg.seed is None else cfg.seed,
            **shard,
        ),
        held_out=HeldOutSet(eval_source, sequences=cfg.eval_sequences, **shard),
        vocab_size=vocab_size,
        entropy_floor=floor,
        new_tokenizer=tokenizer if trained else None,
    )


def prepare_data(
    cfg: Any, out: Path, *, max_tokens: int = 0, shard_tokens: int = SHARD_TOKENS
) -> dict[str, Any]:
    """Tokenize the train and eval splits of `cfg` once into token shards in `out` (shards.py); the index. The
    tokenizer is the one a run of `cfg` would use (`data.tokenizer`, or a BPE trained on the source)."""
    if cfg.source == GENERATED:
        raise DataError("data.source generated needs no preparation: it is generated as it is read")
    if is_prepared(cfg.source):
        raise DataError(f"data.source {cfg.source} is already pre-tokenized")
    if max_tokens < 0 or shard_tokens < 1:
        raise DataError(f"need max_tokens >= 0 and shard_tokens >= 1; got {max_tokens} and {shard_tokens}")
    check_out(out)
    tokenizer, _ = build_tokenizer(cfg, None)
    splits = {split: open_source(cfg, split, tokenizer)[0] for split in SPLITS}
    source = f"{cfg.source}:{cfg.subset}" if cfg.subset else cfg.source
    return write_shards(
        out, splits, source=source, tokenizer=tokenizer, max_tokens=max_tokens, shard_tokens=shard_tokens
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
    "prepare_data",
    "save_tokenizer",
    "train_bpe",
]
