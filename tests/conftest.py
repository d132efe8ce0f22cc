"""Test-wide settings, and the rule of the fast lane: a test not marked `slow` starts no process.

`python -m pytest -m "not slow"` is the fast lane. Every test that starts a process (tests/distributed.py's
run_distributed, tests/processes.py's run_command / pretrain, torchrun, a multiprocessing pool, ...) or that takes
more than about two seconds is marked `@pytest.mark.slow`. The guard below enforces the first half: a test that is
not marked slow and starts a process fails, naming itself.
"""

import multiprocessing.process
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing

from tests.processes import threads_per_process

# Tests are small; one thread per process keeps multi-process tests from fighting over two cores. An OMP_NUM_THREADS
# given to the suite is honoured here, in run_distributed's workers and in every command (tests/processes.py):
# `OMP_NUM_THREADS=2 python -m pytest ...` runs every process with 2 threads, another reduction order.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(threads_per_process())
# torch.compile's inductor compiles in this process, not in a pool of workers (torch 2.6 starts one at first use).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# Every way a test (or a library under it) starts a process: subprocess (run, check_output, os.popen, ...),
# multiprocessing (Process, Pool, ProcessPoolExecutor, torch.multiprocessing.spawn), and the os primitives.
_SPAWNERS = [
    (subprocess.Popen, "__init__"),
    (multiprocessing.process.BaseProcess, "start"),
    (torch.multiprocessing, "start_processes"),
    *(
        (os, name)
        for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp")
        if hasattr(os, name)
    ),
]


def _message(item: pytest.Item, what: list[str]) -> str:
    return (
        f"{item.nodeid} is not marked slow but starts a process ({', '.join(dict.fromkeys(what))}): "
        f"mark it @pytest.mark.slow (the fast lane, -m 'not slow', starts none)"
    )


@contextmanager
def _watch_processes(item: pytest.Item, refuse: bool) -> Iterator[list[str]]:
    """Within: every start of a process is recorded in the yielded list and, with `refuse`, raises an
    AssertionError naming `item` instead of starting. Slow tests are not watched: nothing is patched."""
    started: list[str] = []
    if item.get_closest_marker("slow") is not None:
        yield started
        return
    with pytest.MonkeyPatch.context() as patch:
        for owner, name in _SPAWNERS:
            real, what = getattr(owner, name), f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"

            def spawner(*args, _real=real, _what=what, **kwargs):
                started.append(_what)
                if refuse:
                    raise AssertionError(_message(item, [_what]))
                return _real(*args, **kwargs)

            patch.setattr(owner, name, spawner)
        yield started


# Hooks rather than an autouse fixture, so that the whole setup phase is watched: a module-scoped fixture that
# starts processes (test_checkpoint_resume.py's `runs`, ...) and that a fast test is the first to request is
# caught too (a function-scoped autouse fixture would start after it). Such a fixture is still built, and the fast
# test fails after its setup: the slow tests that share the fixture are not broken by it. In the call phase the
# start itself raises; the test fails even if it swallowed that error. Teardown is not watched: a slow test's
# module fixture may be finalized after the module's last test, which may be a fast one.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _watch_processes(item, refuse=False) as started:
        result = yield
    if started:
        raise AssertionError(_message(item, started))
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _watch_processes(item, refuse=True) as started:
        result = yield
    if started:
        raise AssertionError(_message(item, started))
    return result
