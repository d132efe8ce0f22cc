"""trainer/resolve.py: the values derived from a config for one launch, and every cross-field check."""

import re

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.resolve import Batches, resolve


def test_batches_engine_dtype_and_model_are_derived_once() -> None:
    run = resolve(
        load_config("tiny_swan.yaml", ["--train.global_batch_size=16", "--train.micro_batch_size=2"]),
        2,
        "cpu",
    )
    assert run.batches == Batches(local=8, micro=2, accumulation=4)
    assert run.engine == "fsdp2" and run.compute_dtype == torch.float32 and run.device == "cpu"
    assert (
        run.model.vocab_size == 512 and run.model.max_seq_len == run.cfg.train.seq_len
    )  # the data's vocabulary
    assert run.tokens_per_step == 16 * run.cfg.train.seq_len
    gpu = resolve(load_config("llama350m_swan.yaml"), 8, "cuda")
    assert gpu.bf16 and gpu.compute_bytes == 2 and gpu.model.vocab_size == 32000  # the registry's vocabulary
    assert resolve(load_config("tiny_swan.yaml", ["--parallel.mixed_precision=bf16"]), 1, "cpu").bf16
    # torch.compile per block: on by default on CUDA, off on CPU, either when asked
    assert gpu.compile and not run.compile
    assert not resolve(load_config("llama350m_swan.yaml", ["--parallel.compile=false"]), 8, "cuda").compile
    assert resolve(load_config("tiny_swan.yaml", ["--parallel.compile=true"]), 1, "cpu").compile
    assert (
        resolve(load_config("tiny_swan.yaml", ["--model.vocab_size=1000"]), 1, "cpu").model.vocab_size == 1000
    )
    backward = ["--optim.update_in_backward=true", "--train.micro_batch_size=16"]
    in_backward = resolve(load_config("tiny_swan.yaml", backward), 1, "cpu")
    assert (in_backward.engine, in_backward.update_in_backward) == ("fsdp2", True)
    deepspeed = resolve(
        load_config("tiny_adamw.yaml", ["--parallel.engine=deepspeed", "--parallel.zero_stage=2"]), 2, "cpu"
    )
    assert deepspeed.engine == "deepspeed" and deepspeed.zero_stage == 2
    for stage in (1, 2, 3):  # every optimizer at every stage (whole-matrix owners over ZeRO's partitions)
        matrix = resolve(
            load_config("tiny_swan.yaml", ["--parallel.engine=deepspeed", f"--parallel.zero_stage={stage}"]),
            2,
            "cpu",
        )
        assert (matrix.engine, matrix.zero_stage) == ("deepspeed", stage)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["--train.micro_batch_size=5"], 1, r"multiple of train.micro_batch_size \(5\) x world size \(1\)"),
        (["--train.global_batch_size=16", "--train.micro_batch_size=8"], 4, r"x world size \(4\)"),
        (["--model.name=llama_9z"], 1, "model.name: unknown model 'llama_9z'; known models: llama_tiny"),
        (
            ["--data.eval_sequences=3"],
            2,
            r"data.eval_sequences \(3\) must be a multiple of the world size \(2\)",
        ),
        (["--parallel.dp_replicate=3"], 2, "world size 2 is not divisible by parallel.dp_replicate=3"),
        (
            ["--parallel.dp_shard=3"],
            2,
            r"parallel.dp_replicate \(1\) x parallel.dp_shard \(3\) != world size 2",
        ),
        (["--parallel.engine=deepspeed", "--parallel.dp_replicate=2"], 2, "HSDP"),
        (["--optim.update_in_backward=true", "--parallel.engine=deepspeed"], 1, "parallel.engine=fsdp2 only"),
        (["--optim.update_in_backward=true"], 1, "needs one micro-batch per step"),
    ],
)
def test_conflicting_settings_are_one_line_errors(overrides, world, message) -> None:
    cfg = load_config("tiny_swan.yaml", overrides)  # each field is valid on its own
    with pytest.raises(ConfigError, match=message) as err:
        resolve(cfg, world, "cpu")
    assert "\n" not in str(err.value)


def test_fsdp2_on_the_cpu_before_torch_2_9_is_a_one_line_error(monkeypatch) -> None:
    cfg = load_config("tiny_swan.yaml", [])
    # 2.6's fully_shard cannot run on CPU tensors; 2.7's and 2.8's gloo sums where FSDP2 averages
    for old in ("2.6.0+cu124", "2.8.0"):
        monkeypatch.setattr(torch, "__version__", old)
        with pytest.raises(
            ConfigError,
            match=r"^parallel.engine=fsdp2 on the CPU needs torch >= 2.9 \(this is torch " + re.escape(old),
        ):
            resolve(cfg, 2, "cpu")
        resolve(cfg, 2, "cuda")  # on CUDA (NCCL) they are supported
    monkeypatch.setattr(torch, "__version__", "2.9.0")
    resolve(cfg, 2, "cpu")
