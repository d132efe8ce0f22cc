"""Export a checkpoint to Hugging Face format: `python launch/export_hf.py CHECKPOINT OUT_DIR`.

OUT_DIR gets config.json and model.safetensors, which transformers' LlamaForCausalLM.from_pretrained loads (and
the run's tokenizer.json, when the run trained one). One process, no process group: DCP reassembles the shards
written at any world size into whole tensors; a DeepSpeed checkpoint's fp32 master partitions are merged by
DeepSpeed's own reader. A checkpoint that cannot be read prints one `error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from models import Llama, LlamaConfig  # noqa: E402
from models.llama import hf_config_dict, to_hf_state_dict  # noqa: E402
from trainer.checkpoint import CheckpointError, is_complete, read_trainer_state, saved_config  # noqa: E402
from trainer.engines.dcp import load_state  # noqa: E402
from trainer.engines.deepspeed import read_weights  # noqa: E402


def load_model(checkpoint: Path) -> Llama:
    """The checkpoint's model as a plain (unsharded, fp32, CPU) Llama; CheckpointError if it cannot be read."""
    if not is_complete(checkpoint):
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint")
    saved = read_trainer_state(checkpoint)
    if "model_config" not in saved:
        raise CheckpointError(f"{checkpoint}: trainer_state.json has no model_config")
    model = Llama(LlamaConfig(**saved["model_config"]))
    if saved_config(checkpoint).parallel.engine == "deepspeed":
        model.load_state_dict(read_weights(checkpoint))
    else:  # into the model's own tensors, in place
        load_state(checkpoint, {"app": {"model": model.state_dict()}})
    return model


def export(checkpoint: Path, out_dir: Path) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json) for `checkpoint` into `out_dir`."""
    model = load_model(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous() for name, t in to_hf_state_dict(model.state_dict()).items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(model.cfg), indent=2))
    tokenizer = checkpoint.parent.parent / "tokenizer.json"  # runs/<name>/checkpoints/step_N -> runs/<name>
    if tokenizer.is_file():
        shutil.copy(tokenizer, out_dir / "tokenizer.json")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint directory, e.g. runs/NAME/checkpoints/step_N"
    )
    parser.add_argument("out_dir", type=Path, help="the Hugging Face model directory to write")
    args = parser.parse_args(argv)
    try:
        with torch.no_grad():
            out = export(args.checkpoint, args.out_dir)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out} (LlamaForCausalLM.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
