"""The shipped tiny configs train: the stateless optimizers' hidden matrices learn what the embedding and head
cannot, at the configs' own settings (lrs, batch, schedule).

The task: the generated corpus at order 2 over 16 tokens (the next token depends on the last two). The embedding
and head (AdamW in every optimizer) reach about 2.64 nats alone (measured with the matrix lr at 1e-9: 2.64 at
step 400); only the hidden matrices, the matrix rule's job, take the loss below that, toward the floor of 1.83.
Measured here at step 400: SWAN 1.89, SinkGD 1.98. The criterion, 2.3, is far from both ends. The shipped lrs are
chosen on real text; over 64 tokens (the order-2 diagnostic of benchmarks/plateau.py) the same task takes them
more than 1500 steps to leave the plateau, which is reported there, not required here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.processes import pretrain_command, start_command

ORDER2 = ["--data.generated_order=2", "--data.vocab_size=16", "--train.steps=400", "--train.eval_every=400"]
QUIET = [
    "--metrics.tensorboard=false",
    "--checkpoint.every=0",
    "--metrics.memory=false",
]


@pytest.mark.slow
def test_stateless_optimizers_train_the_hidden_matrices_at_their_shipped_settings(tmp_path: Path) -> None:
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
        assert final < 2.3, f"tiny_{name}.yaml: the hidden matrices did not train: eval loss {final:.3f}"
