"""The config resolved for one launch: every derived value and every cross-field check, in one place.

`resolve(cfg, world_size, device)` runs before anything is built or written. The trainer, the engines and the
memory planner all read the derived values from the `Run` it returns (how the batch splits, the model's shape
and vocabulary, the compute dtype, which engine steps the model), so no decision is made twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.torch_version import TorchVersion

from models import Llama, LlamaConfig, model_config
from trainer.config import Config, ConfigError


@dataclass(frozen=True)
class Batches:
    """How one optimizer step's global batch splits over ranks and micro-batches."""

    local: int  # sequences per step on one rank
    micro: int  # sequences per forward/backward
    accumulation: int  # micro-batches per step


@dataclass(frozen=True)
class Run:
    """A config as launched on `world` ranks of `device` ("cpu" | "cuda")."""

    cfg: Config
    world: int
    device: str
    batches: Batches
    model: (
        LlamaConfig  # with its vocabulary: the registry's, model.vocab_size, or the data's (data.vocab_size)
    )
    compute_dtype: torch.dtype  # parameters and activations in forward/backward

    @property
    def engine(self) -> str:
        """parallel.engine: fsdp2 (with update_in_backward: its per-parameter form) or deepspeed."""
        return self.cfg.parallel.engine

    @property
    def micro_batch(self) -> int:
        return self.batches.micro

    @property
    def seq_len(self) -> int:
        return self.cfg.train.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.train.seq_len

    @property
    def bf16(self) -> bool:
        return self.compute_dtype == torch.bfloat16

    @property
    def compute_bytes(self) -> int:
        return torch.finfo(self.compute_dtype).bits // 8

    @property
    def checkpointing(self) -> bool:
        return self.cfg.parallel.activation_checkpointing

    @property
    def compile(self) -> bool:
        """parallel.compile, or by default: on CUDA (each block compiled once, then faster), off on CPU (the
        compile takes longer than the short runs a CPU makes)."""
        chosen = self.cfg.parallel.compile
        return self.device == "cuda" if chosen is None else chosen

    @property
    def update_in_backward(self) -> bool:
        return self.cfg.optim.update_in_backward

    @property
    def zero_stage(self) -> int:
        return self.cfg.parallel.zero_stage


def resolve(cfg: Config, world_size: int, device: torch.device | str) -> Run:
    """The Run of `cfg` on `world_size` ranks of `device`; ConfigError (one line) for settings that conflict."""
    device_type = torch.device(device).type
    if device_type == "cpu" and cfg.parallel.engine == "fsdp2" and TorchVersion(torch.__version__) < "2.9":
        # torch 2.6's fully_shard records its all-gathers on a device stream that CPU tensors lack; in 2.7 and 2.8
        # gloo's reduce-scatter sums where FSDP2 asks for the average, so every gradient came out world-size
        # times too large, silently
        raise ConfigError(
            f"parallel.engine=fsdp2 on the CPU needs torch >= 2.9 (this is torch {torch.__version__}: gloo "
            "sums where FSDP2 averages gradients before 2.9): upgrade torch, or run on CUDA"
        )
    batches = _batches(cfg, world_size)
    _check_engine(cfg, world_size, batches)
    mp = cfg.parallel.mixed_precision
    bf16 = mp == "bf16" or (mp == "auto" and device_type == "cuda")
    if cfg.data.eval_sequences % world_size:
        raise ConfigError(
            f"data.eval_sequences ({cfg.data.eval_sequences}) must be a multiple of the world size ({world_size})"
        )
    return Run(
        cfg=cfg,
        world=world_size,
        device=device_type,
        batches=batches,
        model=_model(cfg),
        compute_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def _batches(cfg: Config, world_size: int) -> Batches:
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * world_size):
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) x world size ({world_size})"
        )
    local = t.global_batch_size // world_size
    return Batches(local=local, micro=t.micro_batch_size, accumulation=local // t.micro_batch_size)


def _model(cfg: Config) -> LlamaConfig:
    """The named size with its vocabulary: model.vocab_size if set, else the registry's, else the data's
    (data.vocab_size: the generated corpus's size, or the target size of the BPE trained on the source)."""
    vocab = cfg.model.vocab_size or None
    try:
        model_config(cfg.model.name)  # unknown names fail here, with the list of known ones
    except ValueError as err:
        if "unknown model" in str(err):
            raise ConfigError(f"model.name: {err}") from None
        vocab = vocab or cfg.data.vocab_size
    return model_config(cfg.model.name, vocab_size=vocab, max_seq_len=cfg.train.seq_len)


def _check_engine(cfg: Config, world_size: int, batches: Batches) -> None:
    """The checks the engine's settings need (HSDP's mesh, DeepSpeed's limits, update_in_backward's)."""
    p = cfg.parallel
    if p.dp_shard != -1 and p.dp_replicate * p.dp_shard != world_size:
        raise ConfigError(
            f"parallel.dp_replicate ({p.dp_replicate}) x parallel.dp_shard ({p.dp_shard}) != world size {world_size}"
        )
    if world_size % p.dp_replicate:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.dp_replicate={p.dp_replicate}"
        )
    if p.engine == "deepspeed":
        if p.dp_replicate != 1 or p.dp_shard not in (-1, world_size):
            raise ConfigError(
                "parallel.dp_replicate / dp_shard (HSDP) need parallel.engine=fsdp2; DeepSpeed shards over all ranks"
            )
        if cfg.optim.update_in_backward:
            raise ConfigError("optim.update_in_backward is implemented for parallel.engine=fsdp2 only")
    elif cfg.optim.update_in_backward:
        _check_update_in_backward(cfg, batches)


def _check_update_in_backward(cfg: Config, batches: Batches) -> None:
    """The settings under which applying each update inside backward equals the normal step."""
    if batches.accumulation > 1:
        raise ConfigError(
            f"optim.update_in_backward needs one micro-batch per step (an update needs the step's whole "
            f"gradient, which accumulation builds over {batches.accumulation} backward passes): set "
            f"train.micro_batch_size to train.global_batch_size / world size"
        )
    if cfg.train.grad_clip > 0:
        raise ConfigError(
            "optim.update_in_backward cannot clip by the global gradient norm (it needs every gradient before "
            "the first update); set train.grad_clip=0"
        )
    if cfg.train.on_nonfinite == "skip":
        raise ConfigError(
            "optim.update_in_backward cannot skip a step with a non-finite gradient (its updates are applied "
            "during backward); set train.on_nonfinite=stop"
        )


def build_model(run: Run, data_vocab: int, device: torch.device) -> Llama:
    """Same seed, same full initialisation on every rank, made on `device` itself (a 350M model initialises in
    0.1 s on a GPU, 6 s on two CPU cores); the engine shards it afterwards."""
    if run.model.vocab_size < data_vocab:
        raise ConfigError(
            f"model.vocab_size ({run.model.vocab_size}) is smaller than the data's vocabulary ({data_vocab}): set "
            f"model.vocab_size (or data.vocab_size for sizes that take it from the data)"
        )
    torch.manual_seed(run.cfg.train.seed)
    with torch.device(device):
        return Llama(run.model)
