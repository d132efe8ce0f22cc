"""The watchdog: a rank that stops making progress ends the job with one line naming it, instead of a hang.

Why: when one rank stalls (a stuck kernel, a dead data thread, a lost node), the others block in their next
collective until the backend's own timeout (30 minutes here, and it names nothing). The loop only notes its step
and phase (`beat`: two attribute writes, nothing else); a thread on every rank publishes them every few seconds to
the job's rendezvous store, with whether the main thread is inside torch.distributed (waiting for the others) and
the innermost frame of our code. When its own rank has not moved for `timeout_s`, it reads every rank's note and
names the rank that is not waiting in a collective (or has stopped publishing: its process is gone or frozen), at
which step and in what phase, then ends its process with EXIT_HUNG; the launcher (torchrun) ends the rest.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

EXIT_HUNG = 124


def _where(thread_id: int) -> tuple[bool, str]:
    """(whether the thread is inside torch.distributed, its innermost frame outside torch) as 'file:line fn'."""
    frame = sys._current_frames().get(thread_id)  # CPython's own view of another thread's stack
    waiting, ours = False, ""
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        waiting = waiting or "torch/distributed/" in path
        if not ours and "/torch/" not in path and "threading.py" not in path:
            ours = f"{os.path.basename(path)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return waiting, ours


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, world_size: int) -> None:
        self.timeout_s, self.rank, self.world = timeout_s, rank, world_size
        self.interval = min(5.0, timeout_s / 5) if timeout_s > 0 else 0.0
        self.step, self.phase, self.changed = 0, "start-up", time.monotonic()
        self._main = threading.get_ident()
        self._store: dist.Store | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    @staticmethod
    def _connect() -> dist.Store:
        """A client of the job's rendezvous store (torchrun's, or rank 0's from init_process_group)."""
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=30),
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.PrefixStore(f"/watchdog/attempt_{attempt}", store)

    def __enter__(self) -> Watchdog:
        if self.timeout_s > 0:
            self._store = self._connect() if self.world > 1 else None
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def beat(self, step: int, phase: str) -> None:
        """The loop is now at `step` (the one being made), doing `phase`."""
        self.step, self.phase, self.changed = step, phase, time.monotonic()

    def _note(self) -> dict:
        waiting, where = _where(self._main)
        return {"rank": self.rank, "step": self.step, "phase": self.phase, "waiting": waiting, "where": where,
                "stalled_s": time.monotonic() - self.changed, "time": time.time()}  # fmt: skip

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            note = self._note()
            if self._store is not None:
                self._store.set(str(self.rank), json.dumps(note))
            if note["stalled_s"] > self.timeout_s:
                self._fire(note)

    def _notes(self, mine: dict) -> list[dict]:
        if self._store is None:
            return [mine]
        notes = []
        for rank in range(self.world):
            try:
                notes.append(json.loads(self._store.get(str(rank))))
            except Exception:  # a rank that never published: its process is gone, or never got this far
                notes.append(
                    {"rank": rank, "step": -1, "phase": "?", "waiting": False, "where": "", "time": 0}
                )
        return notes

    def _fire(self, mine: dict) -> None:
        notes = self._notes(mine)
        silent = [n for n in notes if time.time() - n["time"] > 3 * self.interval]
        culprits = silent or [n for n in notes if not n["waiting"]] or notes
        reporter = min(
            (n["rank"] for n in notes if n not in culprits), default=min(n["rank"] for n in culprits)
        )
        if self.rank == reporter:
            print(
                f"error: watchdog: {describe(culprits, silent, self.timeout_s)} (exit {EXIT_HUNG})",
                file=sys.stderr,
            )
            sys.stderr.flush()
        time.sleep(0.2)
        os._exit(EXIT_HUNG)


def describe(culprits: list[dict], silent: list[dict], timeout_s: float) -> str:
    """'rank 1 made no progress for 60 s at step 8 (forward/backward, in train.py:120 train_step), not in a
    collective' for each rank named."""
    parts = []
    for n in culprits:
        why = (
            "and stopped answering"
            if n in silent
            else "waiting in a collective"
            if n["waiting"]
            else "not in a collective"
        )
        where = f", in {n['where']}" if n.get("where") else ""
        parts.append(
            f"rank {n['rank']} made no progress for {timeout_s:g} s at step {n['step']} ({n['phase']}{where}), {why}"
        )
    return "; ".join(parts)
