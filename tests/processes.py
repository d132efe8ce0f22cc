"""Commands in child processes, as a user runs them: the one place tests start a subprocess.

ROOT is the repository, ENV the environment of every child (threads_per_process() threads each: OMP_NUM_THREADS,
1 unless the suite was started with another; unbuffered output, so a killed child's last lines are still in its
log). A test that calls anything here starts a process, so it is marked `@pytest.mark.slow` (tests/conftest.py
fails it otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO


def threads_per_process() -> int:
    """Torch threads of every test process (pytest's, run_distributed's workers, the commands started here): the
    OMP_NUM_THREADS the suite was started with, 1 when unset (tests/conftest.py sets that default). Tests are small
    and several processes share two cores, hence 1; `OMP_NUM_THREADS=2 python -m pytest ...` runs every process
    with 2, which changes the reduction order of multi-threaded kernels (what a tolerance must absorb)."""
    value = os.environ.get("OMP_NUM_THREADS") or "1"
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"OMP_NUM_THREADS must be a positive integer for the tests; got {value!r}")
    return int(value)


ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process()), "PYTHONUNBUFFERED": "1"}
PRETRAIN = ROOT / "launch" / "pretrain.py"


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    return ENV if extra is None else {**ENV, **extra}


def torchrun(nproc: int, *options: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node=<nproc> <options>`, through this interpreter."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *options,
    ]


def pretrain_command(*args: str, nproc: int = 0, launcher: Sequence[str] | None = None) -> list[str]:
    """launch/pretrain.py with `args`: under `launcher` if given, else torchrun at `nproc` processes, else plain
    python (nproc 0)."""
    if launcher is not None and nproc:
        raise ValueError("give nproc or launcher, not both")
    if launcher is None:
        launcher = torchrun(nproc) if nproc else [sys.executable]
    return [*launcher, str(PRETRAIN), *args]


def run_command(
    cmd: Sequence[str],
    *,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run `cmd` to the end in `cwd` with ENV (plus `env`); its output captured as text."""
    return subprocess.run(list(cmd), cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)


def start_command(
    cmd: Sequence[str], *, output: IO, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `cmd` in `cwd` with ENV (plus `env`), its stdout and stderr both into `output`; the running job."""
    return subprocess.Popen(list(cmd), cwd=cwd, env=_env(env), stdout=output, stderr=subprocess.STDOUT)


def pretrain(
    *args: str,
    nproc: int = 0,
    launcher: Sequence[str] | None = None,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """launch/pretrain.py run to the end (see pretrain_command for nproc and launcher, run_command for the rest)."""
    return run_command(
        pretrain_command(*args, nproc=nproc, launcher=launcher), cwd=cwd, env=env, timeout=timeout
    )
