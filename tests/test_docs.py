"""The README and docs/ say what the code does: CI runs the README's Quick start, every page is linked, and every
key, path, link, command and generated table they show exists or matches the code. Comments and docstrings are held
to the same paths, so a renamed file cannot leave stale references behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from optim.reference import with_tables
from tests.processes import ROOT
from trainer.config import Config, ConfigError, load_config

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, *PAGES]
# a config key as the docs show it: `section.key` or --section.key (not a file, module or call: checkpoint.py,
# optim.reference.options_table, optim.step_params(...))
KEY = re.compile(
    r"(?:`|--)(model|data|optim|train|parallel|checkpoint|metrics)\.(?!py\b|md\b)(\w+)(?![.(\w])"
)
# a file under one of the repository's folders, named by its path (metric names such as optim/step_s have no suffix)
REPO_PATH = re.compile(
    r"(?<![\w/.])((?:trainer|optim|models|launch|benchmarks|tests|configs|docs)/[\w./-]*\.(?:py|md|yaml|png|json))\b"
)
LINK = re.compile(r"\]\(([^)#\s]+)?(?:#([\w-]+))?\)")
NOT_KEYS = {("metrics", "jsonl"), ("model", "safetensors")}  # metrics.jsonl and model.safetensors are files


def quick_start_commands() -> list[str]:
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_quick_start_has_two_commands_and_ci_runs_the_second() -> None:
    main_job, tests = quick_start_commands()
    assert "torchrun --standalone --nproc_per_node=2 launch/pretrain.py --config tiny_swan.yaml" in main_job
    assert tests.endswith("python -m pytest -q")
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == tests


def test_default_quick_start_config_is_tiny_swan() -> None:
    cfg = load_config("tiny_swan.yaml")
    assert (cfg.model.name, cfg.optim.name, cfg.data.source) == ("llama_tiny", "swan", "generated")


def test_the_readme_is_a_landing_page_that_links_every_docs_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for page in PAGES:
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_config_keys_named_exist(doc: Path) -> None:
    cfg = Config()
    shown = [
        line for line in doc.read_text().splitlines() if not line.startswith(("$ ", "error:"))
    ]  # bad examples
    for section, key in set(KEY.findall("\n".join(shown))) - NOT_KEYS:
        assert hasattr(getattr(cfg, section), key), (
            f"{doc.name} names {section}.{key}, which the config lacks"
        )


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc: Path) -> None:
    for target, anchor in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name} links {target}, which does not exist"
        if anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
            assert anchor in {slug(h) for h in headings}, (
                f"{doc.name} links {target}#{anchor}: no such heading"
            )


def _source_files() -> list[Path]:
    skip = {".venv", "runs", ".git", "build", "dist"}
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".toml", ".yaml") and p.is_file()]
    return [p for p in files if not skip & set(p.relative_to(ROOT).parts)]


def test_every_repository_path_named_in_docs_comments_and_docstrings_exists() -> None:
    missing = []
    for path in _source_files():
        for name in REPO_PATH.findall(path.read_text(errors="replace")):
            if (ROOT / name).exists():
                continue
            missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert missing == []


def _commands(doc: Path) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", doc.read_text(), flags=re.S)
    return [
        c for block in blocks for c in block.replace("\\\n", " ").splitlines() if c.strip() and c[0] != "#"
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_commands_name_real_scripts_configs_and_keys(doc: Path) -> None:
    """Every script a shown command runs exists, and every `--config` with its overrides loads."""
    for command in _commands(doc):
        for script in re.findall(r"(?:^|\s)((?:launch|benchmarks)/\w+\.py)", command):
            assert (ROOT / script).is_file(), f"{doc.name}: {script} does not exist"
        for module in re.findall(r"-m (benchmarks\.\w+)", command):
            assert (ROOT / f"{module.replace('.', '/')}.py").is_file(), f"{doc.name}: no module {module}"
        config = re.search(r"--config[ =](\S+)", command)
        if config is None or "launch/pretrain.py" not in command or "runs/" in config.group(1):
            continue
        overrides = re.findall(r"(--\w+\.\w+(?:[ =][^\s-]\S*)?)", command)
        pairs = [o.replace(" ", "=", 1) if "=" not in o else o for o in overrides]
        pairs = [p for p in pairs if "/" not in p]  # paths (a checkpoint, a data file) exist only at run time
        try:
            load_config(config.group(1), pairs)
        except ConfigError as err:
            pytest.fail(f"{doc.name}: `{command.strip()}` does not load: {err}")


def test_the_options_tables_are_generated_from_the_code() -> None:
    text = (ROOT / "docs" / "optimizers.md").read_text()
    assert text.count("<!-- options: ") == 6
    assert with_tables(text) == text, "run: python -m optim.reference docs/optimizers.md"


def test_the_shipped_lrs_table_matches_the_configs() -> None:
    text = (ROOT / "docs" / "optimizers.md").read_text().split("## Shipped lrs", 1)[1]
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \(([\d.]+)\) \| ([\d.]+) \(([\d.]+)\) \|$", text, flags=re.M)
    assert len(rows) == 7
    for name, *lrs in rows:
        shown = []
        for size in ("tiny", "llama350m"):
            optim = yaml.safe_load((ROOT / "configs" / f"{size}_{name}.yaml").read_text())["optim"]
            shown += [optim["lr"], optim.get("adamw_lr", optim["lr"])]
        assert [float(x) for x in lrs] == shown, name
