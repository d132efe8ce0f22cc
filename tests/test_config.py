"""Config loading: every YAML file parses, overrides work, and every kind of bad input is a one-line ConfigError."""

from pathlib import Path

import pytest
import yaml

from trainer.config import CONFIG_DIR, Config, ConfigError, load_config, parse_overrides, save_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path.name)
    assert cfg.train.run_name  # every config names its run directory
    # The YAML mirrors the dataclasses 1:1: every section present in the file is a Config section.
    assert set(yaml.safe_load(path.read_text())) <= set(Config.__dataclass_fields__)


def test_bare_name_path_and_suffixless_name_resolve_the_same() -> None:
    by_name = load_config("tiny_adamw.yaml")
    assert load_config("tiny_adamw").to_dict() == by_name.to_dict()
    assert load_config(str(CONFIG_DIR / "tiny_adamw.yaml")).to_dict() == by_name.to_dict()


def test_overrides_both_spellings_and_types() -> None:
    cfg = load_config(
        "tiny_muon.yaml",
        ["--optim.lr=0.01", "--train.steps", "7", "--parallel.compile=true", "--optim.ns_steps", "3"],
    )
    assert cfg.optim.lr == 0.01 and cfg.train.steps == 7 and cfg.parallel.compile is True
    assert cfg.optim.ns_steps == 3
    assert isinstance(load_config("tiny_adamw.yaml", ["--optim.lr=1"]).optim.lr, float)
    assert load_config("tiny_adamw.yaml", ["--optim.lr=1e-9"]).optim.lr == 1e-9  # YAML 1.1 reads a string
    assert load_config("tiny_adamw.yaml", ["--optim.lr=2E+1"]).optim.lr == 20.0


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["--optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
        (["--trian.steps=3"], "unknown config section"),
        (["--train.steps=abc"], "train.steps: expected int, got str"),
        (["--train.steps=2.5"], "train.steps: expected int, got float"),
        (["--parallel.compile=3"], "parallel.compile: expected bool"),
        (["--train.steps=0"], "train.steps: must be > 0"),
        (["--optim.lr=-1"], "optim.lr: must be > 0"),
        (["--optim.lr=-1e-3"], "optim.lr: must be > 0"),
        (["--optim.lr=1e"], "optim.lr: expected float, got str"),
        (["--train.warmup_ratio=1.5"], "train.warmup_ratio: must be in [0, 1]"),
        (["--optim.name=sgd"], "optim.name: 'sgd' is not one of"),
        (
            ["--data.source=/no/such/corpus.jsonl"],
            "data.source: no such file or directory /no/such/corpus.jsonl",
        ),
        (["--checkpoint.resume_from=/no/such/ckpt"], "checkpoint.resume_from: no such checkpoint directory"),
        (["--train.run_name=a/b"], "train.run_name: must be a plain directory name"),
        (["steps=3"], "unexpected argument 'steps=3'"),
        (["--train.steps"], "has no value"),
        # every matrix-rule option is checked against the rule's own declaration (optim/options.py)
        (
            ["--optim.name=auon", "--optim.variant=bogus"],
            "optim.variant: 'bogus' is not one of paper, reference_code",
        ),
        (["--optim.name=swan", "--optim.whitening=nope"], "optim.whitening: 'nope' is not one of coupled,"),
        (["--optim.name=sinkgd", "--optim.sinkgd_iters=-3"], "optim.sinkgd_iters: must be >= 1, got -3"),
        (["--optim.name=sinkgd", "--optim.sinkgd_iters=0"], "optim.sinkgd_iters: must be >= 1, got 0"),
        (["--optim.name=normuon", "--optim.ns_steps=0"], "optim.ns_steps: must be >= 1, got 0"),
        (["--optim.name=swan", "--optim.ns_steps=0"], "optim.ns_steps: must be >= 1, got 0"),
        (["--optim.name=muon", "--optim.momentum=1"], "optim.momentum: must be >= 0.0 and < 1.0, got 1.0"),
        (
            ["--optim.name=muon", "--optim.ns_dtype=float16"],
            "optim.ns_dtype: 'float16' is not one of bfloat16",
        ),
        (["--optim.name=normuon", "--optim.comm_dtype=int8"], "optim.comm_dtype: 'int8' is not one of"),
        (
            ["--optim.name=muon", "--optim.ns_coefficients=x"],
            "optim.ns_coefficients: 'x' is not one of keller",
        ),
        (["--optim.name=normuon", "--optim.ns_form=dense"], "optim.ns_form: 'dense' is not one of standard"),
        (["--optim.name=sinkgd", "--optim.ns_form=gram"], "optim.ns_form: sinkgd has no such option"),
        (["--optim.name=auon", "--optim.comm_dtype=float32"], "optim.comm_dtype: auon has no such option"),
        (["--optim.name=adamw", "--optim.momentum=0.9"], "optim.momentum: adamw has no such option"),
    ],
)
def test_bad_input_is_a_one_line_error_naming_the_key(overrides, fragment) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny_adamw.yaml", overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz' \(.*bad.yaml\)"):
        load_config(str(bad))


def test_missing_config_file_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("tiny_normuon.yaml", ["--optim.lr=0.02", "--optim.variant=paper"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")).to_dict() == cfg.to_dict()


def test_parse_overrides() -> None:
    assert parse_overrides(["--a.b=1", "--c.d", "x y"]) == [("a.b", "1"), ("c.d", "x y")]
