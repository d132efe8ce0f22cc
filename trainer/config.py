"""Typed run configuration: one dataclass per concern, mirrored 1:1 by the YAML files in configs/.

Why so strict: a typo in a key of a multi-day run's config must fail in the first second, naming the key and the
file, not silently fall back to a default. Every error here is a `ConfigError` whose message is one line; the
launcher prints it and exits with code 2 before anything is written.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A user-facing, one-line configuration problem (bad key, type, value or missing file)."""


@dataclass
class ModelConfig:
    name: str = "llama_tiny"
    vocab_size: int = 0  # 0: the registry's size; for sizes without one (llama_tiny), the data's vocabulary


@dataclass
class DataConfig:
    source: str = "generated"  # "generated" | local .txt/.jsonl/.parquet file or directory | HF dataset name
    subset: str = ""  # HF config name, e.g. "en" for allenai/c4
    split: str = "train"
    eval_split: str = "validation"
    streaming: bool = True
    text_field: str = "text"
    tokenizer: str = ""  # "" = none for generated data, else a BPE trained on the source; path; or hub name
    vocab_size: int = 512  # generated corpus vocabulary and BPE target size
    generated_seed: int = 1234
    generated_order: int = 1  # the next token depends on the last 1 or 2 (2: needs attention + MLP)
    eval_sequences: int = 64


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | swan | sinkgd | normuon | auon | hybrid_auon | muon
    lr: float = 1e-3  # peak lr of the matrix rule (or of plain AdamW)
    weight_decay: float = 0.0
    adamw_lr: float | None = None  # lr of the AdamW-routed params (embedding, head, norms); None = lr
    adamw_weight_decay: float | None = None  # None = weight_decay
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float | None = None  # None everywhere below = the optimizer's spec default
    nesterov: bool | None = None
    ns_steps: int | None = None
    ns_dtype: str | None = None
    variant: str | None = None
    whitening: str | None = None
    sinkgd_iters: int | None = None
    comm_dtype: str | None = None  # dtype of row shards sent to Newton-Schulz owners; None = ns_dtype
    # Apply each parameter's update during backward as soon as its gradient is complete and free the gradient
    # (trainer/backward_update.py); needs no accumulation, grad_clip 0 and on_nonfinite stop.
    update_in_backward: bool = False


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch_size: int = 16  # sequences per optimizer step, all ranks together
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    seq_len: int = 128
    seed: int = 0
    run_name: str = "tiny"  # the run directory is <runs_dir>/<run_name>/
    runs_dir: str = "runs"
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_ratio: float = 0.1  # fraction of steps of linear warmup
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak (cosine and WSD)
    decay_ratio: float = 0.2  # WSD: fraction of steps spent in the final decay
    grad_clip: float = 0.0  # max global grad norm of the raw gradients; 0 = off
    eval_every: int = 50  # 0 = only at the end
    on_nonfinite: str = "stop"  # stop | skip: what a non-finite loss or gradient does
    max_skips: int = 3  # with on_nonfinite=skip: stop after this many consecutive skipped steps


@dataclass
class ParallelConfig:
    engine: str = "fsdp2"  # fsdp2 | deepspeed
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    device: str = "auto"  # auto | cpu | cuda
    dp_replicate: int = 1  # HSDP: replicas (e.g. nodes) x shards within one replica
    dp_shard: int = -1  # -1 = world_size / dp_replicate
    mixed_precision: str = "auto"  # auto (bf16 params + fp32 reduce on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    compile: bool = False
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 (engine deepspeed); matrix optimizers need 0


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps; 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept; older ones are removed once a newer one is complete
    async_save: bool = False
    resume: bool = True  # re-running the same command continues from the latest complete checkpoint
    resume_from: str = ""  # explicit checkpoint directory to resume from


@dataclass
class MetricsConfig:
    log_every: int = 10
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = detect known GPUs (none on CPU)
    memory: bool = True  # per-rank memory by component: a table after the first step, memory/* on log steps
    memory_snapshot_steps: str = ""  # CUDA allocator snapshots of these steps ("1-3", "2,10") in <run>/memory
    profile_steps: str = ""  # torch.profiler traces of these steps in <run>/tb/profile (CPU and CUDA)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.runs_dir) / self.train.run_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("adamw", "swan", "sinkgd", "normuon", "auon", "hybrid_auon", "muon"),
    "optim.ns_dtype": ("bfloat16", "float32"),
    "optim.comm_dtype": ("bfloat16", "float32"),
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.on_nonfinite": ("stop", "skip"),
    "parallel.engine": ("fsdp2", "deepspeed"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "parallel.device": ("auto", "cpu", "cuda"),
    "parallel.mixed_precision": ("auto", "bf16", "fp32"),
}

POSITIVE = (
    "train.steps",
    "train.global_batch_size",
    "train.micro_batch_size",
    "train.seq_len",
    "data.vocab_size",
    "data.eval_sequences",
    "metrics.log_every",
    "parallel.dp_replicate",
)
NON_NEGATIVE = (
    "optim.weight_decay",
    "train.grad_clip",
    "train.eval_every",
    "checkpoint.every",
    "checkpoint.keep_last",
    "model.vocab_size",
    "metrics.peak_tflops",
    "train.max_skips",
)
STEP_LISTS = ("metrics.memory_snapshot_steps", "metrics.profile_steps")
STEP_LIST = re.compile(r"^(\d+(-\d+)?(,\d+(-\d+)?)*)?$")  # "", "3", "1-3", "2,5-7"
UNIT_INTERVAL = (
    "train.warmup_ratio",
    "train.min_lr_ratio",
    "train.decay_ratio",
    "optim.beta1",
    "optim.beta2",
)


LOCAL_DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def looks_like_local_path(source: str) -> bool:
    """Hub names look like `allenai/c4`; local data is a path with a data suffix or an explicit path prefix."""
    if source == "generated":
        return False
    return (
        source.endswith(LOCAL_DATA_SUFFIXES)
        or source.startswith(("/", "./", "../", "~"))
        or Path(source).exists()
    )


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


def deepspeed_support_error(zero_stage: int, optim_name: str) -> str | None:
    """Why DeepSpeed cannot run this optimizer at this ZeRO stage, or None: ZeRO-1/2/3 hand the optimizer flat
    1-D partitions that cut across matrices, and a matrix rule must only ever see whole matrices."""
    if zero_stage == 0 or optim_name == "adamw":
        return None
    return (
        f"optim.name={optim_name} needs parallel.zero_stage=0 with parallel.engine=deepspeed, got {zero_stage}: "
        f"ZeRO-1/2/3 hand the optimizer flattened partitions (deepspeed: adamw at stages 0-3, matrix optimizers "
        f"at stage 0; fsdp2: every optimizer)"
    )


def _validate(cfg: Config, where: str) -> None:
    def get(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key, choices in CHOICES.items():
        if get(key) is not None and get(key) not in choices:
            raise ConfigError(f"{key}: {get(key)!r} is not one of {', '.join(choices)} ({where})")
    for key in POSITIVE:
        if get(key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {get(key)} ({where})")
    for key in NON_NEGATIVE:
        if get(key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get(key)} ({where})")
    for key in UNIT_INTERVAL:
        if not 0.0 <= get(key) <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1], got {get(key)} ({where})")
    if cfg.data.generated_order not in (1, 2):
        raise ConfigError(f"data.generated_order: must be 1 or 2, got {cfg.data.generated_order} ({where})")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr} ({where})")
    for key in STEP_LISTS:
        if not STEP_LIST.match(get(key).replace(" ", "")):
            raise ConfigError(f"{key}: expected steps like '3', '1-3' or '2,5-7', got {get(key)!r} ({where})")
    stage = cfg.parallel.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {stage} ({where})")
    unsupported = cfg.parallel.engine == "deepspeed" and deepspeed_support_error(stage, cfg.optim.name)
    if unsupported:
        raise ConfigError(f"{unsupported} ({where})")
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) ({where})"
        )
    if not cfg.train.run_name or "/" in cfg.train.run_name or cfg.train.run_name in (".", ".."):
        raise ConfigError(
            f"train.run_name: must be a plain directory name, got {cfg.train.run_name!r} ({where})"
        )
    if looks_like_local_path(cfg.data.source) and not Path(cfg.data.source).expanduser().exists():
        raise ConfigError(f"data.source: no such file or directory {cfg.data.source} ({where})")
    if cfg.data.tokenizer.endswith(".json") and not Path(cfg.data.tokenizer).expanduser().is_file():
        raise ConfigError(f"data.tokenizer: no such file {cfg.data.tokenizer} ({where})")
    if cfg.checkpoint.resume_from and not Path(cfg.checkpoint.resume_from).is_dir():
        raise ConfigError(
            f"checkpoint.resume_from: no such checkpoint directory {cfg.checkpoint.resume_from}"
        )


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
    cfg = Config()
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping ({path})")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value, str(path))
    for key, value in parse_overrides(list(overrides)):
        _set(cfg, key, yaml.safe_load(value) if value != "" else "", "command line")
    _validate(cfg, str(path))
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
