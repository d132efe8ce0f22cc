"""The shipped tiny configs train: the stateless optimizers leave the plateau of the order-2 task at their
configs' own settings (lr, batch, schedule), within 1500 steps.

The order-2 generated corpus over 64 tokens has a plateau near its bigram entropy (about 4.05 nats: what the
embedding and head, trained by AdamW in every optimizer, reach alone); only the hidden matrices, the matrix
rule's job, take the loss below it (floor 1.83). An lr far off the optimum stays on the plateau for thousands of
steps (SWAN at 1e-3 did), which is what this test catches. Measured here: SWAN 2.77, SinkGD 3.14.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.processes import pretrain_command, start_command

ORDER2 = ["--data.generated_order=2", "--data.vocab_size=64", "--train.steps=1500"]
QUIET = [
    "--train.eval_every=0",
    "--metrics.tensorboard=false",
    "--checkpoint.every=0",
    "--metrics.memory=false",
]


@pytest.mark.slow
def test_stateless_optimizers_leave_the_order2_plateau_at_their_shipped_settings(tmp_path: Path) -> None:
    names = ("swan", "sinkgd")
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in names}
    jobs = {  # both at once: one core each
        name: start_command(
            pretrain_command(
                "--config", f"tiny_{name}.yaml", *ORDER2, *QUIET, f"--train.runs_dir={tmp_path}"
            ),
            output=logs[name],
        )
        for name in names
    }
    for name, job in jobs.items():
        assert job.wait(timeout=900) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        logs[name].close()
    for name in names:
        records = [
            json.loads(line)
            for line in (tmp_path / f"tiny_{name}" / "metrics.jsonl").read_text().splitlines()
        ]
        final = [r["eval/loss"] for r in records if "eval/loss" in r][-1]
        assert final < 3.6, f"tiny_{name}.yaml stayed on the order-2 plateau: eval loss {final:.3f}"
