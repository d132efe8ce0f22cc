"""Why some rules leave the order-2 plateau late: how much of each applied update points down the mean gradient.

The order-2 diagnostic of benchmarks/convergence.py (`--data generated`) found SWAN, AdamW and SinkGD leaving the
plateau within 768 steps and Muon, NorMuon, Hybrid-AuON and AuON still on it at their best lrs. This measures,
on the plateau, what each rule does with the gradient it is given.

1. The real trainer (launch/pretrain.py, one process per optimizer) runs that protocol's setting: llama_tiny,
   16 x 128 tokens per step, 768 steps, the matrix lr at each optimizer's interior best of
   benchmarks/results/convergence_generated.md and every embedding, head and norm at AdamW's best (0.003),
   writing a checkpoint every --every steps.
2. Each checkpoint of --at is restored in this process through the trainer's own `prepare` (world size 1). The
   mean gradient mu of the hidden matrices is estimated from --batches fresh batches of the train stream, as two
   independent half-means G1 and G2; then --probes steps are taken, each on its own batch, from the restored
   optimizer state, and for each: the batch gradient g and the applied update D (the change of the weights).
3. Cosines to mu without the estimate's own noise: <u, mu> ~ <u, (G1 + G2)/2> and |mu|^2 ~ <G1, G2>, unbiased
   because u, G1 and G2 come from disjoint batches. cos(G1, G2) says how good the estimate is (1 = exact).

Columns: cos(g, mu), how much a single batch's gradient points along the mean one (the noise the rule gets);
cos(-D, mu), how much of the applied step goes downhill on the mean loss, over every hidden matrix and over the
attention matrices (q, k, v, o: what must learn to look one token back); the step's RMS; and its first-order
decrease of the mean loss, <mu, -D> (nats per step, the hidden matrices' share of the progress), each the mean
over the probe steps; and cos(-sum D, mu), the alignment of the probe steps' sum: how the steps add up (a rule
whose steps zig-zag has a sum less aligned than its steps; one whose steps agree, more).

    python -m benchmarks.update_alignment                      # 7 trainer runs + the probes, ~30 min on 2 cores
    python -m benchmarks.update_alignment --optimizers swan,muon --at 192,384
    python -m benchmarks.update_alignment --optimizers muon --lrs muon=0.08 --optim.momentum=0 \
        --runs-dir runs/update_alignment_momentum0 --out benchmarks/results/update_alignment_momentum0.md

Any `--section.key=value` argument is passed to every run as a trainer config override. Resumable: a finished
run is not trained again.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from benchmarks.harness import EXIT_OK, ORDER2_TASK, TrainerRun, launch, run_parallel
from optim import route_parameters
from trainer.checkpoint import latest_checkpoint, step_dir_name
from trainer.config import parse_args_and_overrides
from trainer.distributed import DistInfo, init_distributed
from trainer.loop import Prepared, schedule_lrs
from trainer.train import prepare

# Matrix lr: the interior best of `python -m benchmarks.convergence --data generated --tokens 1572864`.
BEST_LRS = {
    "adamw": 0.003,
    "swan": 0.01,
    "sinkgd": 0.012,
    "muon": 0.04,
    "normuon": 0.006,
    "hybrid_auon": 0.02,
    "auon": 0.12,
}
REST_LR = 0.003  # that sweep's phase-1 best: every optimizer's embedding, head and norms
ATTENTION = ("wq", "wk", "wv", "wo")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--optimizers", default=",".join(BEST_LRS), help="comma-separated")
    parser.add_argument("--lrs", default="", help="matrix lrs other than BEST_LRS: name=lr,...")
    parser.add_argument("--steps", type=int, default=768, help="steps per run (the protocol's 768)")
    parser.add_argument("--every", type=int, default=96, help="a checkpoint every N steps")
    parser.add_argument("--at", default="96,192,288,384", help="checkpoint steps to probe")
    parser.add_argument("--batches", type=int, default=128, help="batches for the mean gradient")
    parser.add_argument("--probes", type=int, default=16, help="steps measured per checkpoint")
    parser.add_argument("--jobs", type=int, default=2, help="trainer runs at a time")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/update_alignment"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/update_alignment.md"))
    args, overrides = parse_args_and_overrides(parser, argv)
    args.optimizers = args.optimizers.split(",")
    args.lrs = {
        **BEST_LRS,
        **{k: float(v) for k, v in (kv.split("=") for kv in filter(None, args.lrs.split(",")))},
    }
    args.at = [int(s) for s in args.at.split(",")]
    unknown = [o for o in [*args.optimizers, *args.lrs] if o not in BEST_LRS]
    if unknown or args.batches < 2 or any(s % args.every or s >= args.steps for s in args.at):
        parser.error(
            f"--optimizers from {', '.join(BEST_LRS)}; --batches >= 2; --at: multiples of --every below --steps"
        )
    return args, overrides


def trainer_run(optimizer: str, args: argparse.Namespace, overrides: list[str]) -> TrainerRun:
    lr = args.lrs[optimizer]
    return TrainerRun(
        f"tiny_{optimizer}",
        (
            *ORDER2_TASK,
            "--model.name=llama_tiny",
            f"--train.steps={args.steps}",
            "--train.global_batch_size=16",
            "--train.seq_len=128",
            f"--train.eval_every={args.every}",
            f"--metrics.log_every={args.every}",
            f"--checkpoint.every={args.every}",
            "--checkpoint.keep_last=0",
            "--metrics.tensorboard=false",
            f"--optim.lr={lr}",
            f"--optim.adamw_lr={REST_LR}",
            f"--train.runs_dir={args.runs_dir.resolve()}",
            f"--train.run_name={optimizer}_lr{lr:g}_rest{REST_LR:g}",
            *overrides,
        ),
    )


def train_once(run: TrainerRun) -> None:
    """Train the run to its end unless it has finished before (its final checkpoint exists). A run directory
    of other settings (another override under the same name) is an error, never probed as this one."""
    cfg = run.resolved()
    if run.made_elsewhere():
        raise SystemExit(f"{cfg.run_dir} was made with other settings: delete it or use another --runs-dir")
    final = latest_checkpoint(cfg.run_dir / "checkpoints")
    if final is not None and final.name == step_dir_name(cfg.train.steps):
        print(f"skip {cfg.train.run_name}: trained earlier", flush=True)
        return
    started = time.perf_counter()
    code = launch(run, cfg.run_dir / "train.log")
    if code != EXIT_OK:
        raise SystemExit(f"{cfg.train.run_name}: the trainer exited {code}; see {cfg.run_dir / 'train.log'}")
    print(f"{cfg.train.run_name}: trained in {time.perf_counter() - started:.0f} s", flush=True)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class Probe:
    """A restored run's hidden matrices: their current gradient and weights, flattened, by group."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        model = prepared.engine.model
        matrices = {id(p) for p in route_parameters(model)[0]}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in matrices]
        self.params = [p for _, p in named]
        self.attention = torch.tensor([n.split(".")[-2] in ATTENTION for n, _ in named])
        self.sizes = [p.numel() for p in self.params]

    def flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([full(t).detach().double().flatten() for t in tensors])

    def mask(self) -> torch.Tensor:
        """Which flat elements belong to attention matrices."""
        return torch.repeat_interleave(self.attention, torch.tensor(self.sizes))

    def gradient(self) -> tuple[torch.Tensor, float]:
        """One fresh batch's gradient of the hidden matrices (left in place for a step) and its loss."""
        p = self.prepared
        batch = p.state.stream.next_batch()
        loss = p.engine.forward_backward(list(batch.split(p.run.batches.micro))).item()
        return self.flat([q.grad for q in self.params]), loss

    def mean_gradient(self, batches: int, losses: list[float]) -> torch.Tensor:
        """The mean of `batches` fresh batch gradients (dropped, never stepped); their losses go to `losses`."""
        total = torch.zeros(sum(self.sizes), dtype=torch.float64)
        for _ in range(batches):
            g, loss = self.gradient()
            self.prepared.engine.skip()
            total += g
            losses.append(loss)
        return total / batches

    def weights(self) -> torch.Tensor:
        return self.flat(self.params)


@dataclass
class Row:
    optimizer: str
    step: int
    loss: float
    estimate: float  # cos(G1, G2)
    batch_cos: float
    update_cos: float
    attention_cos: float
    update_rms: float
    descent: float
    path_cos: float  # cos(-(sum of the probe steps' D), mu): how the steps add up


def cosine_to_mean(u: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> float:
    """cos(u, mu) with mu estimated by two independent half-means: <u, (g1+g2)/2> / (|u| sqrt(<g1, g2>))."""
    mu_sq = torch.dot(g1, g2).item()
    if mu_sq <= 0 or not u.any():
        return math.nan
    return torch.dot(u, (g1 + g2) / 2).item() / (u.norm().item() * math.sqrt(mu_sq))


def probe(optimizer: str, step: int, run: TrainerRun, args: argparse.Namespace, dist_info: DistInfo) -> Row:
    """Restore `run` at `step`, estimate the mean gradient, take --probes steps; one table row."""
    checkpoint = run.resolved().run_dir / "checkpoints" / step_dir_name(step)
    restored = TrainerRun(run.config, (*run.overrides, f"--checkpoint.resume_from={checkpoint}"))
    prepared = prepare(restored.resolved(), dist_info)
    probe = Probe(prepared)
    losses: list[float] = []
    g1, g2 = (probe.mean_gradient(args.batches // 2, losses) for _ in range(2))
    mask = probe.mask()
    cols: dict[str, list[float]] = {k: [] for k in ("batch", "update", "attention", "rms", "descent")}
    start = probe.weights()
    for _ in range(args.probes):
        schedule_lrs(prepared)
        g, _ = probe.gradient()
        before = probe.weights()
        prepared.engine.step()
        prepared.state.step += 1
        step_down = before - probe.weights()  # -D
        cols["batch"].append(cosine_to_mean(g, g1, g2))
        cols["update"].append(cosine_to_mean(step_down, g1, g2))
        cols["attention"].append(cosine_to_mean(step_down * mask, g1 * mask, g2 * mask))
        cols["rms"].append(step_down.norm().item() / math.sqrt(step_down.numel()))
        cols["descent"].append(torch.dot(step_down, (g1 + g2) / 2).item())
    mean = {k: sum(v) / len(v) for k, v in cols.items()}
    path = cosine_to_mean(start - probe.weights(), g1, g2)
    return Row(
        optimizer,
        step,
        sum(losses) / len(losses),
        torch.nn.functional.cosine_similarity(g1, g2, dim=0).item(),
        mean["batch"],
        mean["update"],
        mean["attention"],
        mean["rms"],
        mean["descent"],
        path,
    )


def table(rows: list[Row]) -> str:
    header = [
        "optimizer", "step", "train loss", "cos(G1, G2)", "cos(g, mu)", "cos(-D, mu)",
        "cos(-D, mu) attention", "update RMS", "<mu, -D> per step", "cos(-sum D, mu)",
    ]  # fmt: skip
    cells = [
        [
            r.optimizer,
            str(r.step),
            f"{r.loss:.3f}",
            f"{r.estimate:.2f}",
            f"{r.batch_cos:.3f}",
            f"{r.update_cos:.3f}",
            f"{r.attention_cos:.3f}",
            f"{r.update_rms:.2e}",
            f"{r.descent:.2e}",
            f"{r.path_cos:.3f}",
        ]  # fmt: skip
        for r in rows
    ]
    return "\n".join("| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header), *cells])


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    runs = {o: trainer_run(o, args, overrides) for o in args.optimizers}
    started = time.perf_counter()
    run_parallel(train_once, list(runs.values()), args.jobs)
    torch.manual_seed(0)
    dist_info = init_distributed("cpu", "gloo")
    rows = []
    for optimizer in args.optimizers:
        for step in args.at:
            rows.append(probe(optimizer, step, runs[optimizer], args, dist_info))
            print(f"{optimizer} at step {step}: cos(-D, mu) {rows[-1].update_cos:.3f}", flush=True)
    command = "python -m benchmarks.update_alignment " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"Command: `{command.strip()}`\n"
        f"Setting: llama_tiny, order-2 generated corpus over 64 tokens, 16 x 128 tokens per step, {args.steps} "
        f"steps, matrix lrs {', '.join(f'{o} {args.lrs[o]:g}' for o in args.optimizers)}, embedding/head/norms at "
        f"{REST_LR}; "
        f"mean gradient from {args.batches} batches, {args.probes} probe steps per checkpoint; "
        f"{time.perf_counter() - started:.0f} s.\n\n{table(rows)}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
