"""Preemption: the signals a cluster sends before it takes the machines back become a checkpoint and a clean exit.

SLURM and Kubernetes send SIGTERM (SLURM also SIGUSR1 with `--signal`) and kill the job a grace period later.
The first configured signal only raises a flag: the loop finishes the step it is in, the ranks agree on stopping
through the loss all-reduce they make anyway (a rank's flag rides along with its loss), every rank saves the
checkpoint, and the run exits with EXIT_PREEMPTED; the same command then resumes it bit for bit. A save that
cannot finish within the grace period, or a second signal, ends the process at once with EXIT_UNSAVED: a
checkpoint is committed by one rename after all its files are written, so the last committed one stays intact.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

EXIT_PREEMPTED = 75  # a checkpoint of the last step is committed: rerun the same command to resume
EXIT_UNSAVED = 76  # stopped on a signal without a new checkpoint (grace period over, or a second signal)


class PreemptedError(RuntimeError):
    """The run stopped on a signal after committing a checkpoint (exit code EXIT_PREEMPTED)."""


class StopSignals:
    """Within the loop: the configured signals set `requested` instead of killing the process."""

    def __init__(self, names: str, grace_s: float) -> None:
        self.signals = [getattr(signal, name) for name in filter(None, names.replace(" ", "").split(","))]
        self.grace_s = grace_s
        self.requested: str | None = None  # the name of the first signal received
        self._previous: dict[int, object] = {}
        self._deadline: threading.Timer | None = None

    def __enter__(self) -> StopSignals:
        if (
            threading.current_thread() is threading.main_thread()
        ):  # Python delivers signals to the main thread
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._received)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._deadline is not None:
            self._deadline.cancel()

    def _received(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            self._exit(f"{name} again while stopping: exiting without a new checkpoint")
        self.requested = name
        self._deadline = threading.Timer(
            self.grace_s, self._exit, [f"grace period of {self.grace_s:g} s over"]
        )
        self._deadline.daemon = True
        self._deadline.start()

    def _exit(self, why: str) -> None:
        """End the process now (a save in flight is abandoned; committed checkpoints are untouched)."""
        print(f"error: {why}; the last committed checkpoint is intact (exit {EXIT_UNSAVED})", file=sys.stderr)
        sys.stderr.flush()
        time.sleep(0.1)
        os._exit(EXIT_UNSAVED)
