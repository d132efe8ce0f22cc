"""The README's Quick start is what CI runs, and the keys it promises exist."""

import re

from tests.processes import ROOT
from trainer.config import Config, load_config

README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_quick_start_has_two_commands_and_ci_runs_the_second() -> None:
    main_job, tests = quick_start_commands()
    assert "torchrun --standalone --nproc_per_node=2 launch/pretrain.py --config tiny_swan.yaml" in main_job
    assert tests.endswith("python -m pytest -q")
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == tests


def test_keys_named_in_the_readme_exist() -> None:
    cfg = Config()
    named = set(re.findall(r"`(model|data|optim|train|parallel|checkpoint|metrics)\.(\w+)", README))
    files = {("metrics", "jsonl"), ("model", "safetensors")}  # metrics.jsonl and model.safetensors, not keys
    for section, key in named - files:
        assert hasattr(getattr(cfg, section), key), f"README names {section}.{key}, which the config lacks"


def test_default_quick_start_config_is_tiny_swan() -> None:
    cfg = load_config("tiny_swan.yaml")
    assert (cfg.model.name, cfg.optim.name, cfg.data.source) == ("llama_tiny", "swan", "generated")
