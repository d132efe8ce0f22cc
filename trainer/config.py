"""Typed run configuration: one dataclass per concern, mirrored 1:1 by the YAML files in configs/.

Why so strict: a typo in a key of a multi-day run's config must fail in the first second, naming the key and the
file, not silently fall back to a default. Each field carries its own check next to its declaration (range,
choices, an existing file); checks that relate several fields, or the config to the launch, live in
trainer/resolve.py. Every error is a `ConfigError` whose message is one line; the launcher prints it and exits
with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from optim import OPTIMIZER_NAMES, check_options
from trainer.data.sources import is_local_source

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
STEP_LIST = re.compile(r"^(\d+(-\d+)?(,\d+(-\d+)?)*)?$")  # "", "3", "1-3", "2,5-7"
# YAML 1.1 reads 1e-9 (no dot) as a string; a float field takes it as the number everyone means
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A user-facing, one-line configuration problem (bad key, type, value or missing file)."""


Check = Callable[[Any], "str | None"]  # the problem with a value, or None


def positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def non_negative(v: Any) -> str | None:
    return None if v is None or v >= 0 else f"must be >= 0, got {v}"


def unit_interval(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else f"must be in [0, 1], got {v}"


def one_of(*choices: Any) -> Check:
    def check(v: Any) -> str | None:
        if v is None or v in choices:
            return None
        return f"{v!r} is not one of {', '.join(map(str, choices))}"

    check.choices = choices  # type: ignore[attr-defined]
    return check


def step_list(v: str) -> str | None:
    return (
        None
        if STEP_LIST.match(v.replace(" ", ""))
        else f"expected steps like '3', '1-3' or '2,5-7', got {v!r}"
    )


def parse_steps(spec: str) -> set[int]:
    """'2,5-7' -> {2, 5, 6, 7}; '' -> set(). ValueError on anything else."""
    spec = spec.replace(" ", "")
    if not STEP_LIST.match(spec):
        raise ValueError(f"expected steps like '3', '1-3' or '2,5-7', got {spec!r}")
    steps: set[int] = set()
    for part in filter(None, spec.split(",")):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


def plain_name(v: str) -> str | None:
    ok = v and "/" not in v and v not in (".", "..")
    return None if ok else f"must be a plain directory name, got {v!r}"


def existing_source(v: str) -> str | None:
    missing = is_local_source(v) and not Path(v).expanduser().exists()
    return f"no such file or directory {v}" if missing else None


def existing_tokenizer(v: str) -> str | None:
    missing = v.endswith(".json") and not Path(v).expanduser().is_file()
    return f"no such file {v}" if missing else None


def signal_names(v: str) -> str | None:
    """A comma-separated list of signal names (SIGTERM, SIGUSR1, ...), or empty."""
    import signal

    unknown = [name for name in filter(None, v.replace(" ", "").split(",")) if not hasattr(signal, name)]
    return f"unknown signal {unknown[0]!r} (expected names like SIGTERM,SIGUSR1)" if unknown else None


def fraction(v: Any) -> str | None:
    return None if 0.0 < v <= 1.0 else f"must be in (0, 1], got {v}"


def existing_checkpoint(v: str) -> str | None:
    return f"no such checkpoint directory {v}" if v and not Path(v).is_dir() else None


def checked(default: Any, check: Check) -> Any:
    """A dataclass field whose value `check` validates when a config is loaded."""
    return field(default=default, metadata={"check": check})


@dataclass
class ModelConfig:
    name: str = "llama_tiny"
    vocab_size: int = checked(0, non_negative)  # 0: the registry's size, or the data's (llama_tiny, llama_3m)


@dataclass
class DataConfig:
    # "generated" | local .txt/.jsonl/.parquet file or directory | HF dataset name
    source: str = checked("generated", existing_source)
    subset: str = ""  # HF config name, e.g. "en" for allenai/c4
    split: str = "train"
    eval_split: str = "validation"
    streaming: bool = True
    text_field: str = "text"
    # "" = none for generated data, else a BPE trained on the source; path; or hub name
    tokenizer: str = checked("", existing_tokenizer)
    vocab_size: int = checked(512, positive)  # generated corpus vocabulary and BPE target size
    generated_seed: int = 1234
    generated_order: int = checked(1, one_of(1, 2))  # the next token depends on the last 1 or 2 tokens
    eval_sequences: int = checked(64, positive)
    # Batches never trained on, numbered as an uninterrupted run takes them ("7", "120-160"): the by-hand form of
    # a rollback (resilience.rollback), which skips the batches between its checkpoint and a bad step itself
    skip_batches: str = checked("", step_list)
    # The data order: the training rows in windows of this many, each window taken in an order drawn from the data
    # seed (0 = the source's own order). Every rank holds one window of tokens
    shuffle_rows: int = checked(4096, non_negative)
    seed: int | None = checked(
        None, non_negative
    )  # the data order's seed; None = train.seed (init and order)


@dataclass
class OptimConfig:
    name: str = checked("adamw", one_of(*OPTIMIZER_NAMES))
    lr: float = checked(1e-3, positive)  # peak lr of the matrix rule (or of plain AdamW)
    weight_decay: float = checked(0.0, non_negative)
    adamw_lr: float | None = None  # lr of the AdamW-routed params (embedding, head, norms); None = lr
    adamw_weight_decay: float | None = None  # None = weight_decay
    beta1: float = checked(0.9, unit_interval)
    beta2: float = checked(0.999, unit_interval)
    eps: float = 1e-8
    # The matrix rule's options. None = the rule's default; a key the rule does not take, or a value it does not
    # allow, is refused when the config is loaded (the rules declare them: optim/options.py, docs/optimizers.md).
    momentum: float | None = None
    nesterov: bool | None = None
    ns_steps: int | None = None
    ns_dtype: str | None = None  # bfloat16 | float32 | float64
    # NS5's polynomials (muon, normuon): keller (Keller Jordan's fixed one) | polar_express (per iteration)
    ns_coefficients: str | None = None
    # NS5 on the p x p Gram matrix where that costs fewer FLOPs (muon, normuon): standard | gram
    ns_form: str | None = None
    variant: str | None = None  # normuon, auon, hybrid_auon: paper | reference_code
    whitening: str | None = None  # swan: coupled | coupled_adaptive | ns5
    sinkgd_iters: int | None = None
    # dtype of row shards sent to Newton-Schulz owners; None = ns_dtype
    comm_dtype: str | None = None
    # rounds the owner exchange is cut into, each round's transfers overlapping the next one's compute; 1 = one
    # all-to-all each way (the numbers are the same bits either way)
    overlap_buckets: int = checked(4, positive)
    # TF32 for the fp32 matmuls of Newton-Schulz and SWAN's whitening on CUDA: 2.6x faster for SWAN's whitening on
    # an H200 at the same orthogonality error (no effect on CPU; `benchmarks/optimizer_step.py --device cuda --tf32`)
    ns_tf32: bool = True
    # Apply each parameter's update during backward as soon as its gradient is complete and free the gradient
    # (trainer/engines/backward_update.py); needs no accumulation, grad_clip 0 and on_nonfinite stop.
    update_in_backward: bool = False


@dataclass
class TrainConfig:
    steps: int = checked(200, positive)
    global_batch_size: int = checked(16, positive)  # sequences per optimizer step, all ranks together
    micro_batch_size: int = checked(8, positive)  # sequences per forward/backward on one rank
    seq_len: int = checked(128, positive)
    seed: int = checked(0, non_negative)  # the initialisation's, and the data order's unless data.seed is set
    run_name: str = checked("tiny", plain_name)  # the run directory is <runs_dir>/<run_name>/
    runs_dir: str = "runs"
    schedule: str = checked("cosine", one_of("cosine", "wsd", "constant"))
    warmup_ratio: float = checked(0.1, unit_interval)  # fraction of steps of linear warmup
    min_lr_ratio: float = checked(0.1, unit_interval)  # final lr as a fraction of the peak (cosine and WSD)
    decay_ratio: float = checked(0.2, unit_interval)  # WSD: fraction of steps spent in the final decay
    grad_clip: float = checked(0.0, non_negative)  # max global grad norm of the raw gradients; 0 = off
    eval_every: int = checked(50, non_negative)  # 0 = only at the end
    # stop | skip: what a non-finite loss or gradient does
    on_nonfinite: str = checked("stop", one_of("stop", "skip"))
    max_skips: int = checked(3, non_negative)  # with on_nonfinite=skip: stop after this many in a row
    # Start even when the memory planner predicts more memory per rank than the device has (trainer/memory).
    allow_oversubscribe: bool = False


@dataclass
class ParallelConfig:
    engine: str = checked("fsdp2", one_of("fsdp2", "deepspeed"))
    backend: str = checked("auto", one_of("auto", "nccl", "gloo"))  # auto: nccl on GPU, gloo on CPU
    device: str = checked("auto", one_of("auto", "cpu", "cuda"))
    dp_replicate: int = checked(1, positive)  # HSDP: replicas (e.g. nodes) x shards within one replica
    dp_shard: int = -1  # -1 = world_size / dp_replicate
    # auto (bf16 params + fp32 reduce on GPU, fp32 on CPU) | bf16 | fp32
    mixed_precision: str = checked("auto", one_of("auto", "bf16", "fp32"))
    activation_checkpointing: bool = False
    compile: bool | None = None  # torch.compile each transformer block; None = on CUDA, off on CPU
    zero_stage: int = checked(0, one_of(0, 1, 2, 3))  # DeepSpeed ZeRO stage (engine deepspeed)


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false: never write a checkpoint (benchmarks, smoke runs): such a run cannot resume
    every: int = checked(0, non_negative)  # save every N steps; 0 = only at the end
    # complete checkpoints kept; older ones are removed once a newer one is complete
    keep_last: int = checked(2, non_negative)
    async_save: bool = False
    resume: bool = True  # re-running the same command continues from the latest complete checkpoint
    resume_from: str = checked("", existing_checkpoint)  # explicit checkpoint directory to resume from
    # When the newest checkpoint is damaged (a file missing or shorter than its commit recorded): false = stop with
    # one line naming it and the newest intact one; true = resume from that one, with a line saying so.
    fall_back: bool = False


@dataclass
class ResilienceConfig:
    """How a long run survives the cluster (docs/long-runs.md): preemption, divergence, a hung rank."""

    # These signals make every rank finish its step, save a checkpoint and exit with code 75 (rerun to resume).
    stop_signals: str = checked("SIGTERM,SIGUSR1", signal_names)
    grace_s: float = checked(
        120.0, positive
    )  # from the first signal to the exit; then exit 76 without saving
    # A loss above its running mean + spike_sigma x its running std (after spike_warmup steps), or above
    # spike_ceiling x ln(vocabulary) at any step, is a spike; 0 turns each rule off.
    spike_sigma: float = checked(6.0, non_negative)
    spike_window: int = checked(100, positive)  # steps the running mean and std remember (EMA span)
    spike_warmup: int = checked(20, non_negative)
    spike_ceiling: float = checked(2.0, non_negative)
    dead_steps: int = checked(10, non_negative)  # a zero gradient norm this many steps in a row: a dead model
    # On a non-finite step, a spike or a dead model: roll back to the newest good checkpoint, skip the batches
    # since it, and go on (false: a non-finite step follows train.on_nonfinite, a spike is named, a dead model stops)
    rollback: bool = False
    max_rollbacks: int = checked(3, non_negative)  # one more and the run stops
    rollback_lr_factor: float = checked(
        1.0, fraction
    )  # the lr is multiplied by it for rollback_lr_steps steps
    rollback_lr_steps: int = checked(0, non_negative)
    # A rank that does not reach its next step within this many seconds ends the job with one line naming it
    # (exit 124); well under the communication backend's own timeout (30 minutes). 0 = off.
    watchdog_s: float = checked(600.0, non_negative)


@dataclass
class MetricsConfig:
    log_every: int = checked(10, positive)
    tensorboard: bool = True
    peak_tflops: float = checked(0.0, non_negative)  # per-device peak for MFU; 0 = detect known GPUs
    memory: bool = True  # per-rank memory by component: a table after the first step, memory/* on log steps
    # CUDA allocator snapshots of these steps ("1-3", "2,10") in <run>/memory
    memory_snapshot_steps: str = checked("", step_list)
    profile_steps: str = checked("", step_list)  # torch.profiler traces of these steps in <run>/tb/profile


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.runs_dir) / self.train.run_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fields() -> dict[str, dataclasses.Field]:
    """Every config field by its dotted key, e.g. 'train.steps'."""
    return {
        f"{section.name}.{f.name}": f
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(section.default_factory)  # type: ignore[arg-type]
    }


# The allowed values of every field with a fixed set of choices, by dotted key.
CHOICES: dict[str, tuple[Any, ...]] = {
    key: f.metadata["check"].choices
    for key, f in _fields().items()
    if hasattr(f.metadata.get("check"), "choices")
}


def resolve_config_path(name: str) -> Path:
    """A bare name (`tiny_swan.yaml` or `tiny_swan`) is looked up in configs/; anything else is a path."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name} (looked in . and {CONFIG_DIR})")


def _coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check `value` against a field's type, allowing ints for floats; return the value in the field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        return _coerce(value, inner[0], key, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and SCIENTIFIC.fullmatch(value):
        return float(value)
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    got = type(value).__name__
    raise ConfigError(f"{key}: expected {annotation.__name__}, got {got} {value!r} ({where})")


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    section_name, _, name = key.partition(".")
    section = getattr(cfg, section_name, None) if section_name in Config.__dataclass_fields__ else None
    if section is None or not name:
        sections = ", ".join(Config.__dataclass_fields__)
        raise ConfigError(f"unknown config section in {key!r} ({where}); sections: {sections}")
    types_ = typing.get_type_hints(type(section))
    if name not in types_:
        raise ConfigError(f"unknown config key {key!r} ({where}); {section_name} keys: {', '.join(types_)}")
    setattr(section, name, _coerce(value, types_[name], key, where))


def _validate(cfg: Config, where: str) -> None:
    """Run every field's own check, then the optimizer's option declarations (cross-field checks of the launch:
    trainer/resolve.py)."""
    for key, f in _fields().items():
        check = f.metadata.get("check")
        section, name = key.split(".")
        problem = check(getattr(getattr(cfg, section), name)) if check else None
        if problem:
            raise ConfigError(f"{key}: {problem} ({where})")
    try:
        check_options(cfg.optim)
    except ValueError as err:
        raise ConfigError(f"{err} ({where})") from None


def parse_args_and_overrides(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[Any, list[str]]:
    """A command's own arguments and the rest as trainer overrides (`--section.key=value`), checked here: a
    malformed one ends the command with parser.error's one line (exit 2)."""
    args, overrides = parser.parse_known_args(argv)
    try:
        parse_overrides(overrides)
    except ConfigError as err:
        parser.error(str(err))
    return args, overrides


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """`--section.key=value` and `--section.key value` -> [(key, raw value)]."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} has no value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config by name or path, apply CLI overrides, validate. Raises ConfigError."""
    path = resolve_config_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    cfg = config_from_mapping(raw, str(path))
    for key, value in parse_overrides(list(overrides)):
        _set(cfg, key, yaml.safe_load(value) if value != "" else "", "command line")
    _validate(cfg, str(path))
    return cfg


def config_from_mapping(raw: dict[str, Any], where: str, *, known_only: bool = False) -> Config:
    """A Config from {section: {key: value}} (a YAML file's, or the one a run saved), every value type-checked.
    known_only: skip keys this version does not know (a run saved by another version); else they are errors. The
    fields' own checks are load_config's: a saved run's config was checked when it ran."""
    cfg = Config()
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping ({where})")
        known = vars(getattr(cfg, section)) if section in Config.__dataclass_fields__ else {}
        for key, value in values.items():
            if not known_only or key in known:
                _set(cfg, f"{section}.{key}", value, where)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
