"""Tokenize a source once into token shards: `python launch/prepare_data.py --config X.yaml --out DIR [--section.key=value]`.

The config (and its overrides) is read as launch/pretrain.py reads it; its data section names the source
(`data.source`, `data.subset`, `data.split`, `data.eval_split`, `data.text_field`) and the tokenizer
(`data.tokenizer`, or empty: a BPE of `data.vocab_size` trained on the source, as a run would). The train and eval
splits go to DIR as flat token shards with an index and a copy of the tokenizer (trainer/data/shards.py); a run with
`--data.source=DIR` then reads them by memory map. Bad input prints one line starting with `error:` and exits
with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainer.config import ConfigError, load_config  # noqa: E402
from trainer.data import DataError, prepare_data  # noqa: E402
from trainer.data.shards import SHARD_TOKENS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="a name in configs/ (e.g. tiny_swan.yaml) or a path")
    parser.add_argument("--out", required=True, type=Path, help="the directory to write (new or empty)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="end each split at the first document boundary at or past this many tokens (default 0: all of it)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=SHARD_TOKENS,
        help=f"tokens per shard file (default {SHARD_TOKENS})",
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        index = prepare_data(cfg.data, args.out, max_tokens=args.max_tokens, shard_tokens=args.shard_tokens)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, written in index["splits"].items():
        print(f"{split}: {written['tokens']:,} tokens in {len(written['shards'])} shards ({index['dtype']})")
    print(f"tokenizer: {args.out / 'tokenizer.json'} (vocabulary {index['vocab_size']:,})")
    print(f"train from it: python launch/pretrain.py --config {args.config} --data.source={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
