"""Pretrain a LLaMA model: `torchrun --nproc_per_node=N launch/pretrain.py --config NAME.yaml [--section.key=value]`.

Also runs as a single process with plain `python launch/pretrain.py ...`. Bad input (unknown key, wrong type, missing
config or data file, a checkpoint that does not fit) prints one line starting with `error:` and exits with code 2
before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainer.checkpoint import CheckpointError  # noqa: E402
from trainer.config import ConfigError, load_config  # noqa: E402
from trainer.data import DataError  # noqa: E402

USAGE_ERRORS = (ConfigError, DataError, CheckpointError)
# Exit codes (docs/long-runs.md): 0 done; 2 bad input, nothing written; 3 diverged, stopped without saving that
# state; 75 stopped on a signal after committing a checkpoint (rerun to resume); 76 stopped on a signal without a
# new one (trainer/preemption.py); 124 a rank made no progress (trainer/watchdog.py).
EXIT_USAGE, EXIT_DIVERGED = 2, 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="a name in configs/ (e.g. tiny_swan.yaml) or a path")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what we use.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE

    from trainer.distributed import init_distributed, shutdown
    from trainer.loop import DivergedError
    from trainer.preemption import EXIT_PREEMPTED, PreemptedError
    from trainer.train import train

    try:
        info = init_distributed(cfg.parallel.device, cfg.parallel.backend)
    except ConfigError as err:  # before any process group exists: every rank says it, rank 0's line is enough
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    # These errors are raised on every rank alike (same config, files, all-reduced loss), so the ranks can still
    # shut down together. Anything else propagates without a shutdown: peers may be stuck in a collective, and
    # torchrun tears the job down.
    try:
        result = train(cfg, info)
    except PreemptedError as err:  # a checkpoint of the last step is committed: the same command resumes
        if info.is_main:
            print(str(err), flush=True)
        shutdown()
        return EXIT_PREEMPTED
    except (*USAGE_ERRORS, DivergedError) as err:
        if info.is_main:
            print(f"error: {err}", file=sys.stderr)
        shutdown()
        return EXIT_DIVERGED if isinstance(err, DivergedError) else EXIT_USAGE
    shutdown()
    if info.is_main:
        run_dir = Path(result["run_dir"])
        print(f"done: {result['step']} steps, final loss {result['loss']:.4f}")
        print(f"checkpoints: {run_dir / 'checkpoints'}")
        print(f"metrics: {run_dir / 'metrics.jsonl'}")
        print(f"tensorboard --logdir {run_dir / 'tb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
