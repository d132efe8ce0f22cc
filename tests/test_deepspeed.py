"""The DeepSpeed engine on CPU (gloo, 2 processes): its ZeRO stages give FSDP2's numbers, resume is exact, both
launchers work, and the combinations it cannot run are refused in one line before anything starts.

Tolerance of the engine comparisons: DeepSpeed does not train in float64, and its engine sums in other orders than
FSDP2 (gradient buckets, flat partitions), so they are fp32 runs a rounding apart that training amplifies. Each
FSDP2 reference is run again in the same job with its weights one ulp off at the start and after every step
(test_parallel.one_ulp_off), and a ZeRO run must stay within test_parallel's bound: SENSITIVITY times (what that
moved + one ulp), per logged series and per weight tensor.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from models import Llama, causal_lm_loss, model_config
from optim import SWAN, route_parameters
from tests.distributed import free_port, run_distributed
from tests.processes import pretrain
from tests.run_helpers import FAST, logged, train_in_process
from tests.test_parallel import EPS32, SENSITIVITY, assert_within_sensitivity, nudge_one_ulp, one_ulp_off
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, load_config
from trainer.engines.deepspeed import check_whole_matrices
from trainer.memory.planner import plan_memory
from trainer.memory.tracker import MiB
from trainer.resolve import resolve

KEYS = ("loss", "grad_norm", "optim/update_rms", "optim/orth_error")
MEMORY = {  # a component and the memory/* keys that add up to it
    "params": ("memory/params_mib",),
    "grads": ("memory/grads_mib",),
    "adamw": ("memory/optimizer_state/group0_adamw_mib",),
    "master": ("memory/optimizer_state/master_weights_mib",),
}
MEMORY_KEYS = [key for keys in MEMORY.values() for key in keys]
# Clipping at 0.5 is active on every step of these runs (their raw norms are ~0.9): the mapping is under test too.
COMMON = [*FAST, "--train.grad_clip=0.5"]
DEEPSPEED = ["--parallel.engine=deepspeed"]
# The lrs these engine-parity tests are calibrated at (the tiny configs' shipped lrs before the 2-D tuning, or
# smaller), not the tuned lrs the configs ship now: larger steps amplify the engines' different fp32 reduction
# orders past the tests' bounds in 5 steps, and at AdamW's tuned rest lr (0.096) 5 steps raise the loss.
PARITY_LRS = {
    "tiny_adamw.yaml": ["--optim.lr=0.003", "--optim.adamw_lr=null"],  # one group for everything
    "tiny_swan.yaml": ["--optim.lr=0.001", "--optim.adamw_lr=0.003"],
    "tiny_normuon.yaml": ["--optim.lr=0.001", "--optim.adamw_lr=0.003"],
    "tiny_muon.yaml": ["--optim.lr=0.02", "--optim.adamw_lr=0.003"],
    "tiny_sinkgd.yaml": ["--optim.lr=0.003", "--optim.adamw_lr=0.006"],
    "tiny_auon.yaml": ["--optim.lr=0.03", "--optim.adamw_lr=0.003"],
    "tiny_hybrid_auon.yaml": ["--optim.lr=0.04", "--optim.adamw_lr=0.006"],
}


def _common(config: str) -> list[str]:
    return [*COMMON, *PARITY_LRS.get(config, [])]


# a run whose name ends so is trained with its weights one ulp off (test_parallel.one_ulp_off)
OFF = "_one_ulp_off"


def _train_all(root: Path, runs: list[tuple[str, str, list[str]]]) -> dict[str, dict[str, list[float]]]:
    """Train each (run name, config, overrides) in turn in this process group; return what each one logged."""
    out = {}
    for name, config, overrides in runs:
        with one_ulp_off() if name.endswith(OFF) else nullcontext():
            train_in_process(
                config, [*_common(config), f"--train.runs_dir={root}", f"--train.run_name={name}", *overrides]
            )
        if torch.distributed.get_rank() == 0:  # only rank 0 writes metrics
            out[name] = {key: logged(root / name, key) for key in (*KEYS, *MEMORY_KEYS)}
    return out


def _assert_same_run(
    got: dict[str, list[float]], reference: dict[str, list[float]], one_ulp: dict[str, list[float]], run: str
) -> None:
    """Losses, grad norms and update sizes within the reference's sensitivity (`one_ulp`: its run one ulp off)."""
    for key in KEYS[:3]:  # orth_error is of one matrix, whichever the layout computes first: not compared
        assert_within_sensitivity(got[key], reference[key], one_ulp[key], f"{run}: {key}")


def _memory(run: dict[str, list[float]]) -> dict[str, float]:
    """Rank 0's memory/* components (MiB) at the last step; the same at every step of these runs."""
    assert all(len(set(run[key])) == 1 for key in MEMORY_KEYS if run[key])
    return {name: sum(run[key][-1] for key in keys) for name, keys in MEMORY.items() if run[keys[0]]}


@pytest.mark.slow
def test_zero_stages_with_adamw_give_the_fsdp2_losses_and_count_their_partitions(tmp_path) -> None:
    runs = [("fsdp2", "tiny_adamw.yaml", []), ("fsdp2" + OFF, "tiny_adamw.yaml", [])]
    runs += [(f"zero{s}", "tiny_adamw.yaml", [*DEEPSPEED, f"--parallel.zero_stage={s}"]) for s in range(4)]
    # Blocks recomputed in backward (activation checkpointing) under ZeRO-1 give the same numbers too.
    runs[3][2].append("--parallel.activation_checkpointing=true")
    # AdamW's two groups (optim.adamw_lr): ZeRO-3 empties its param groups, so its health must find each
    # partition's group (lr, weight decay) through DeepSpeed's sub-groups
    groups = ["--optim.adamw_lr=0.006"]
    runs += [("fsdp2_groups", "tiny_adamw.yaml", groups), ("fsdp2_groups" + OFF, "tiny_adamw.yaml", groups)]
    runs += [("zero3_groups", "tiny_adamw.yaml", [*groups, *DEEPSPEED, "--parallel.zero_stage=3"])]
    results = run_distributed(_train_all, 2, tmp_path, runs)
    two_groups = results.pop("zero3_groups")
    assert two_groups["optim/update_rms"]
    _assert_same_run(two_groups, results.pop("fsdp2_groups"), results.pop("fsdp2_groups" + OFF), "two groups")
    reference, one_ulp = results.pop("fsdp2"), results.pop("fsdp2" + OFF)
    assert len(reference["loss"]) == 5 and reference["loss"][-1] < reference["loss"][0]
    assert min(reference["grad_norm"]) > 0.5  # every step was clipped
    for name, got in results.items():
        assert got["optim/update_rms"], name  # the health numbers are there, and (below) FSDP2's
        _assert_same_run(got, reference, one_ulp, name)

    # Memory, per rank of 2 (tiny model, fp32 everywhere): `full` is the whole model's weights.
    approx = partial(pytest.approx, rel=1e-3)  # AdamW's 4-byte step counters beside its moments
    full = _memory(results["zero0"])["params"]
    assert _memory(results["zero0"]) == {"params": full, "grads": full, "adamw": approx(2 * full)}
    assert _memory(reference) == {
        "params": approx(full / 2),
        "grads": approx(full / 2),
        "adamw": approx(full),
    }
    partitioned = {"grads": full / 2, "adamw": approx(full), "master": full / 2}  # fp32 masters: ZeRO's copy
    # ZeRO-1/2 keep whole weights; ZeRO-3 keeps its partitions, and whole copies of parameters under DeepSpeed's
    # persistence threshold (all of the tiny model's) beside them.
    for stage, params in (("zero1", full), ("zero2", full), ("zero3", full + full / 2)):
        assert _memory(results[stage]) == {"params": params, **partitioned}, stage
    # The planner (launch/estimate_memory.py) predicts the same state at every stage, weights and gradients
    # where ZeRO keeps them whole or sharded (at ZeRO-1 it plans the whole gradients of backward).
    for stage in range(4):
        cfg = load_config("tiny_adamw.yaml", [*COMMON, *DEEPSPEED, f"--parallel.zero_stage={stage}"])
        plan = {name: n / MiB for name, n in plan_memory(cfg, world_size=2, device="cpu").rows}
        measured = _memory(results[f"zero{stage}"])
        assert plan["optimizer state"] == approx(measured["adamw"] + measured.get("master", 0)), stage
        if stage in (0, 2):
            assert (plan["parameters"], plan["gradients"]) == (measured["params"], measured["grads"]), stage


MATRIX_OPTIMIZERS = ("swan", "sinkgd", "normuon", "muon", "auon", "hybrid_auon")
NEWTON_SCHULZ = ("normuon", "muon", "hybrid_auon")  # run in fp32 here: bf16 NS would round the engines apart


def _fp32(name: str) -> list[str]:
    return ["--optim.ns_dtype=float32"] if name in NEWTON_SCHULZ else []


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final checkpoint's whole fp32 weights (DCP or DeepSpeed's partitions, merged by export's reader)."""
    from launch.export_hf import load_model

    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    return load_model(checkpoint).state_dict()


def _assert_same_weights(
    got: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    one_ulp: dict[str, torch.Tensor],
    name: str,
) -> None:
    """Every weight tensor's largest elementwise difference from the reference within SENSITIVITY times (that of
    the reference's run one ulp off + one ulp of the tensor's largest entry). The hidden matrices, which the rule
    under test steps, agree to about 1e-7; the embedding and head (AdamW's) to about 1e-4 at most: AdamW steps a
    gradient that is rounding noise (an entry whose contributions cancel) by about +-lr whatever its size, so any
    other reduction order (another engine, ZeRO-0 included, or the reference one ulp off) moves a few such
    entries, and the run one ulp off shows how far."""
    assert got.keys() == reference.keys() == one_ulp.keys(), name
    for key, tensor in reference.items():
        difference = (got[key] - tensor).abs().max().item()
        spread = (one_ulp[key] - tensor).abs().max().item()
        assert difference <= SENSITIVITY * (spread + EPS32 * tensor.abs().max().item()), (
            f"{name}: {key} is {difference:.1e} from the reference, which one ulp moves by {spread:.1e}"
        )


def _assert_state_partitioned(root: Path, name: str, stage: int, world: int) -> None:
    """Rank 0's optimizer state at ZeRO-`stage` is what the planner predicts, and the matrix rule's own state
    (momentum; NorMuon's row moments) is partitioned: each matrix's on its owner, a 1/world share per rank."""
    state = logged(root / f"{name}_zero{stage}", "memory/optimizer_state_mib")[-1]
    cfg = load_config(
        f"tiny_{name}.yaml", [*_common(f"tiny_{name}.yaml"), *DEEPSPEED, f"--parallel.zero_stage={stage}"]
    )
    plan = dict(plan_memory(cfg, world_size=world, device="cpu").rows)
    assert state == pytest.approx(plan["optimizer state"] / MiB, rel=1e-3), f"{name} ZeRO-{stage}"
    key = f"memory/optimizer_state/group0_{name}_mib"
    if stage and name in ("normuon", "muon") and world == 2:  # tiny's matrices split evenly over 2 owners
        whole = logged(root / f"{name}_zero0", key)[-1]
        assert logged(root / f"{name}_zero{stage}", key)[-1] == pytest.approx(whole / 2, rel=1e-3)


def _assert_zero_parity(
    root: Path, results: dict[str, Any], names: tuple[str, ...], stages: tuple[int, ...], world: int
) -> None:
    for run in results:
        results[run]["weights"] = _weights(root / run)
    for name in names:
        reference, one_ulp = results[name], results[name + OFF]
        assert len(reference["loss"]) == 5 and reference["loss"][-1] < reference["loss"][0]
        for stage in stages:
            got, run = results[f"{name}_zero{stage}"], f"{name} ZeRO-{stage}"
            _assert_same_run(got, reference, one_ulp, run)
            _assert_same_weights(got["weights"], reference["weights"], one_ulp["weights"], run)
            _assert_state_partitioned(root, name, stage, world)
            if name in NEWTON_SCHULZ or name == "swan":
                # the orthogonality of the first matrix's whole result, every step: the rule ran on whole
                # matrices (a partition's piece would be another matrix, with an error apart by 1e-2 or more)
                key = "optim/orth_error"
                assert len(got[key]) == 5, run
                assert_within_sensitivity(got[key], reference[key], one_ulp[key], f"{run}: {key}", bug=1e-2)


def _zero_runs(names: tuple[str, ...], stages: tuple[int, ...]) -> list[tuple[str, str, list[str]]]:
    """Each optimizer's FSDP2 reference run, the same one ulp off (its sensitivity), then the same config under
    DeepSpeed at each ZeRO stage."""
    runs = []
    for name in names:
        config = f"tiny_{name}.yaml"
        runs += [(name, config, _fp32(name)), (name + OFF, config, _fp32(name))]
        runs += [
            (f"{name}_zero{s}", config, [*_fp32(name), *DEEPSPEED, f"--parallel.zero_stage={s}"])
            for s in stages
        ]
    return runs


@pytest.mark.slow
def test_every_matrix_optimizer_at_every_zero_stage_equals_fsdp2(tmp_path) -> None:
    """World 2 with gradient accumulation 2 (FAST): losses, norms, update sizes and final weights to 1e-5."""
    results = run_distributed(_train_all, 2, tmp_path, _zero_runs(MATRIX_OPTIMIZERS, (0, 1, 2, 3)))
    _assert_zero_parity(tmp_path, results, MATRIX_OPTIMIZERS, (0, 1, 2, 3), world=2)


@pytest.mark.slow
def test_zero_stages_at_world_size_4_equal_fsdp2(tmp_path) -> None:
    """World 4 (accumulation 1): matrices cut into more pieces than two, ranks holding none of some matrices.
    One rule of each kind: whole-matrix whitening (SWAN), Newton-Schulz with row state (NorMuon), row and column
    normalizations (SinkGD)."""
    names = ("swan", "normuon", "sinkgd")
    results = run_distributed(_train_all, 4, tmp_path, _zero_runs(names, (2, 3)))
    _assert_zero_parity(tmp_path, results, names, (2, 3), world=4)


def _resume_runs(root: Path, runs: list[tuple[str, str, list[str]]]) -> dict[str, Any]:
    """Each run trains 6 steps (checkpoints at 3 and 6), loses step 6, and resumes from step 3."""
    out = {}
    for name, config, overrides in runs:
        args = [*overrides, "--train.steps=6", "--checkpoint.every=3", f"--train.run_name={name}"]
        train_in_process(config, [*_common(config), f"--train.runs_dir={root}", *args])
        main = torch.distributed.get_rank() == 0
        if main:
            full = logged(root / name)
            shutil.rmtree(root / name / "checkpoints" / "step_000006")
            (root / name / "metrics.jsonl").unlink()
        torch.distributed.barrier()
        train_in_process(config, [*_common(config), f"--train.runs_dir={root}", *args])
        if main:
            out[name] = (full, logged(root / name))
    try:  # the ZeRO-2 run's checkpoint at another stage
        overrides = [*DEEPSPEED, "--parallel.zero_stage=3", "--train.steps=7", "--train.run_name=adamw_zero2"]
        train_in_process(
            "tiny_adamw.yaml", [*_common("tiny_adamw.yaml"), f"--train.runs_dir={root}", *overrides]
        )
    except CheckpointError as err:
        out["other_stage"] = str(err)
    return out


@pytest.mark.slow
def test_resume_is_exact_and_another_zero_stage_is_refused(tmp_path) -> None:
    runs = [
        ("adamw_zero2", "tiny_adamw.yaml", [*DEEPSPEED, "--parallel.zero_stage=2"]),
        ("normuon_zero0", "tiny_normuon.yaml", DEEPSPEED),
        # NorMuon's momentum and row moments live on the owners of their matrices: saved and restored by rank
        *[
            (f"normuon_zero{s}", "tiny_normuon.yaml", [*DEEPSPEED, f"--parallel.zero_stage={s}"])
            for s in (1, 2, 3)
        ],
        ("swan_zero3", "tiny_swan.yaml", [*DEEPSPEED, "--parallel.zero_stage=3"]),
    ]
    results = run_distributed(_resume_runs, 2, tmp_path, runs)
    checkpoints = tmp_path / "adamw_zero2" / "checkpoints"
    refused = results.pop("other_stage")
    assert (
        refused
        == f"{checkpoints / 'step_000006'}: cannot load (ValueError: saved at ZeRO-2, this run is ZeRO-3)"
    )
    for name, (full, resumed) in results.items():
        assert len(full) == 6 and resumed == full[3:], name  # bitwise: the same steps 4-6
    assert json.loads((checkpoints / "step_000003" / "trainer_state.json").read_text())["step"] == 3
    # DeepSpeed's own layout, one optimizer-state file per rank
    files = sorted(p.name for p in (checkpoints / "step_000003" / "deepspeed").iterdir())
    assert files == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


def _skip_runs(root: Path, runs: list[tuple[str, str, list[str]]]) -> dict[str, dict[str, list[float]]]:
    """The loss of every micro-batch of step 3 turns NaN (so do its gradients): the step must be skipped."""
    import trainer.engines.deepspeed
    import trainer.engines.fsdp2

    real = trainer.engines.fsdp2.causal_lm_loss
    calls = []

    def poisoned(model, batch):
        calls.append(1)
        step = (
            len(calls) - 1
        ) // 2 + 1  # two micro-batches per step (FAST: global 8 = micro 2 x 2 x world 2)
        return real(model, batch) * (float("nan") if step == 3 else 1.0)

    trainer.engines.fsdp2.causal_lm_loss = trainer.engines.deepspeed.causal_lm_loss = poisoned
    results = {}
    for run in runs:
        calls.clear()
        results.update(_train_all(root, [run]))
    return results


@pytest.mark.slow
def test_a_skipped_step_under_zero_2_matches_fsdp2(tmp_path) -> None:
    skip = ["--train.on_nonfinite=skip"]
    runs = [
        ("fsdp2", "tiny_adamw.yaml", skip),
        ("fsdp2" + OFF, "tiny_adamw.yaml", skip),
        ("zero2", "tiny_adamw.yaml", [*skip, *DEEPSPEED, "--parallel.zero_stage=2"]),
    ]
    results = run_distributed(_skip_runs, 2, tmp_path, runs)
    assert len(results["fsdp2"]["loss"]) == 4  # steps 1, 2, 4, 5: step 3 was skipped
    _assert_same_run(results["zero2"], results["fsdp2"], results["fsdp2" + OFF], "ZeRO-2 skipping")


@pytest.mark.slow
def test_deepspeed_launcher_runs_normuon_at_zero_3_with_metrics_tensorboard_and_checkpoints(tmp_path) -> None:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=2"]  # passes --local_rank
    launcher.append(f"--master_port={free_port()}")
    result = pretrain(
        "--config", "tiny_normuon.yaml", f"--train.runs_dir={tmp_path}", "--train.steps=4", "--metrics.log_every=2",
        "--parallel.engine=deepspeed", "--parallel.zero_stage=3", launcher=launcher,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "tiny_normuon"
    losses = logged(run_dir)
    assert len(losses) == 2 and losses[1] < losses[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000004"]
    files = sorted(p.name for p in (run_dir / "checkpoints" / "step_000004" / "deepspeed").iterdir())
    assert files == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")
    ]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses)
    scalars = set(events.Tags()["scalars"])
    assert {"lr", "grad_norm", "optim/update_rms", "optim/orth_error", "eval/loss"} <= scalars
    assert {"optim/step_s", "optim/exposed_comm_s"} <= scalars  # the step's time and its exchange's wait


def test_a_matrix_rule_never_holds_a_flattened_partition_without_its_layout() -> None:
    model = Llama(model_config("llama_tiny", vocab_size=64, max_seq_len=16))
    matrices, others = route_parameters(model)
    optimizer = SWAN([{"params": matrices}, {"params": others, "algorithm": "adamw"}])
    check_whole_matrices(optimizer, model, {})  # the model's own 2-D weights: fine
    optimizer.param_groups[1]["params"] = [torch.cat([p.detach().flatten() for p in others])]
    check_whole_matrices(optimizer, model, {})  # AdamW may take flat partitions
    flat = torch.cat([p.detach().flatten() for p in matrices])
    optimizer.param_groups[0]["params"] = [flat]
    with pytest.raises(
        ConfigError, match=r"DeepSpeed handed SWAN a tensor of shape \(\d+,\) that is neither"
    ):
        check_whole_matrices(optimizer, model, {})
    flat.grad = torch.ones_like(flat)  # and the optimizer itself refuses to step it
    with pytest.raises(RuntimeError, match="a matrix rule never runs on a flattened partition"):
        optimizer.step()


@pytest.mark.parametrize(
    "overrides, problem",
    [
        ([], None),
        (["--parallel.zero_stage=3"], None),
        (
            ["--parallel.dp_replicate=2"],
            "parallel.dp_replicate / dp_shard (HSDP) need parallel.engine=fsdp2; DeepSpeed shards over all ranks",
        ),
        (["--parallel.activation_checkpointing=true"], None),
    ],
)
def test_settings_deepspeed_cannot_honour_are_named(overrides, problem) -> None:
    cfg = load_config("tiny_adamw.yaml", [*DEEPSPEED, *overrides])
    try:
        resolve(cfg, world_size=2, device="cpu")
        found = None
    except ConfigError as err:
        found = str(err)
    assert found == problem


PEER = dict(lr=0.02, momentum=0.95, weight_decay=0.01, adam_lr=0.003, betas=(0.9, 0.95), eps=1e-8)


def _peer_runs(steps: int) -> dict[str, list[float]]:
    """Our Muon and DeepSpeed's own MuonWithAuxAdam, each under ZeRO-2 on llama_tiny from the same weights and
    data; the largest weight difference and both losses after every step."""
    import deepspeed
    from deepspeed.runtime.zero.muon import original_muon
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    from optim import Muon
    from trainer.engines.deepspeed import DeepSpeedEngine
    from trainer.engines.zero import ZeroStage

    # DeepSpeed's defaults, matched to ours: its Newton-Schulz runs in bf16 where the accelerator has it (ours in
    # fp32 here, so neither rounds), and its default method is the Gram form ("standard" is Keller's NS5, ours).
    original_muon.ns_compute_dtype = lambda ns_method="gram": torch.float32
    torch.manual_seed(0)
    ours = Llama(model_config("llama_tiny", vocab_size=64, max_seq_len=32))
    theirs = Llama(model_config("llama_tiny", vocab_size=64, max_seq_len=32))
    theirs.load_state_dict(ours.state_dict())
    # ours again with its initial weights one ulp off: its sensitivity (DeepSpeed's fp32 partitions are copies, so
    # only the initial weights can be moved from outside)
    off = Llama(model_config("llama_tiny", vocab_size=64, max_seq_len=32))
    off.load_state_dict(ours.state_dict())
    nudge_one_ulp(off)
    p = PEER
    adam = dict(lr=p["adam_lr"], betas=p["betas"], eps=p["eps"], weight_decay=p["weight_decay"])
    world = torch.distributed.get_world_size()

    def our_engine(model: Llama) -> DeepSpeedEngine:
        matrices, others = route_parameters(model)
        muon = Muon(
            [{"params": matrices}, {"params": others, "algorithm": "adamw", **adam}],
            lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"], ns_dtype="float32",
        )  # fmt: skip
        return DeepSpeedEngine(
            model,
            muon,
            zero_stage=2,
            micro_batch=4,
            accumulation=1,
            world_size=world,
            max_norm=0.0,
            bf16=False,
        )

    ours_engine, off_engine = our_engine(ours), our_engine(off)
    matrices, others = route_parameters(theirs)
    for param in theirs.parameters():
        param.use_muon = any(param is m for m in matrices)  # our routing: the head is AdamW's, not Muon's
    groups = [
        dict(params=matrices, use_muon=True, lr=p["lr"], momentum=p["momentum"],
             weight_decay=p["weight_decay"], ns_method="standard"),
        dict(params=others, use_muon=False, **adam),
    ]  # fmt: skip
    their_engine, *_ = deepspeed.initialize(
        model=theirs,
        optimizer=MuonWithAuxAdam(groups),
        config=ZeroStage(2).config(
            4, 1, world, 0.0, False
        ),  # no clipping: DeepSpeed clips the orthogonalized
    )
    start = [param.detach().clone() for param in ours.parameters()]
    out: dict[str, list[float]] = {key: [] for key in ("ours", "theirs", "one_ulp_off", "moved")}
    out.update(max_weight_difference=[], one_ulp_weight_difference=[])
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    batch = torch.randint(0, 64, (4, 33), generator=generator)  # one batch per rank, learned step after step
    for _ in range(steps):
        out["ours"].append(ours_engine.forward_backward([batch]).item())
        ours_engine.step()
        out["one_ulp_off"].append(off_engine.forward_backward([batch]).item())
        off_engine.step()
        loss = causal_lm_loss(their_engine, batch)
        their_engine.backward(loss)
        their_engine.step()
        out["theirs"].append(loss.item())
        diffs = [
            (a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters(), strict=True)
        ]
        out["max_weight_difference"].append(max(diffs))
        out["one_ulp_weight_difference"].append(
            max((a - b).abs().max().item() for a, b in zip(ours.parameters(), off.parameters(), strict=True))
        )
        out["moved"].append(
            max((a - b).abs().max().item() for a, b in zip(ours.parameters(), start, strict=True))
        )
    out["largest_weight"] = [max(a.abs().max().item() for a in ours.parameters())]
    return out


@pytest.mark.slow
def test_our_muon_under_zero_2_equals_deepspeeds_own_muon(monkeypatch) -> None:
    """The peer: DeepSpeed 0.19's MuonWithAuxAdam (its ZeRO-2 path orthogonalizes whole gradients while it
    partitions them) on the same model, data and hyperparameters as ours: the same weights, step after step."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")  # its kernels are torch.compile'd: eager on CPU
    steps = 5
    result = run_distributed(_peer_runs, 2, steps)
    # within our run's own sensitivity (test_parallel's bound): its twin one ulp off
    assert_within_sensitivity(result["theirs"], result["ours"], result["one_ulp_off"], "losses")
    assert result["ours"][-1] < result["ours"][0]
    spread = max(result["one_ulp_weight_difference"]) + EPS32 * result["largest_weight"][0]
    assert max(result["max_weight_difference"]) <= SENSITIVITY * spread
    assert (
        min(result["moved"]) > 1e3 * SENSITIVITY * spread
    )  # real steps: the weights moved far more than that


def test_a_model_built_under_zero_init_is_refused_in_one_line() -> None:
    """zero.Init builds parameters already partitioned; the engine builds the model whole and lets
    deepspeed.initialize partition it, so a partitioned model is refused before DeepSpeed touches it."""
    pytest.importorskip(
        "deepspeed", reason="without the package the engine refuses to start before this check"
    )
    from trainer.engines.deepspeed import DeepSpeedEngine

    model = Llama(model_config("llama_tiny", vocab_size=64, max_seq_len=16))
    matrices, others = route_parameters(model)
    optimizer = SWAN([{"params": matrices}, {"params": others, "algorithm": "adamw"}])
    next(model.parameters()).ds_id = 0  # what zero.Init leaves on every parameter
    with pytest.raises(ConfigError, match="built under deepspeed.zero.Init"):
        DeepSpeedEngine(
            model,
            optimizer,
            zero_stage=3,
            micro_batch=1,
            accumulation=1,
            world_size=1,
            max_norm=0.0,
            bf16=False,
        )
