"""The data pipeline for eight GPUs: batches made ahead by a thread (resume, errors, stopping), pre-tokenized shards
(the online path's tokens, exact resume, another tokenizer's shards refused) and the split tokenization's exchange
between two real gloo processes (world size 1's global batches, each rank parsing only its share)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from launch.prepare_data import main as prepare_main
from tests.distributed import run_distributed
from tests.test_data import (
    BATCH,
    SEQ,
    english_lines,
    global_batches,
    loaders,
    make_cfg,
    tokenizer_of,
    write_jsonl,
)
from trainer.data import DataError, build_data, prepare_data, save_tokenizer, train_bpe
from trainer.data.exchange import DocExchange
from trainer.data.sources import LocalText

WIDTH = SEQ + 1


def jsonl_with_tokenizer(tmp_path, lines: list[str]) -> tuple[str, str]:
    """(a jsonl of `lines`, a BPE of 400 trained on them saved beside it)."""
    write_jsonl(tmp_path / "docs.jsonl", lines)
    saved = save_tokenizer(train_bpe(lines, 400), tmp_path / "tok")
    return str(tmp_path / "docs.jsonl"), str(saved)


# ------------------------------------------------------------------------------------------- prefetch


def test_closing_and_resuming_the_thread_gives_the_uninterrupted_batches():
    cfg = make_cfg()
    expected = global_batches(loaders(cfg, 1), steps=6)
    (stream,) = loaders(cfg, 1)
    got = []
    for _ in range(3):
        got.append(stream.next_batch())
        stream.close()  # the thread had made batches ahead: they are dropped and made again
    state = stream.state_dict()
    assert state["rows"] == 3 * BATCH
    (resumed,) = loaders(cfg, 1)
    resumed.load_state_dict(state)
    got += global_batches([resumed], steps=3)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert resumed.wait_s() >= 0.0 and resumed.wait_s() == 0.0  # the window restarts at every call


def test_an_error_in_the_thread_reaches_the_loop_as_itself(tmp_path):
    lines = english_lines(600)
    source, tokenizer = jsonl_with_tokenizer(tmp_path, lines)
    raw = (tmp_path / "docs.jsonl").read_text().splitlines(keepends=True)
    raw[449] = '{"text": "cut off\n'  # line 450: train document 444, in the second round of 256
    (tmp_path / "docs.jsonl").write_text("".join(raw))
    (stream,) = loaders(make_cfg(source=source, tokenizer=tokenizer), 1)
    ok = global_batches([stream], steps=5)  # the first round's rows come before the error
    assert len(ok) == 5
    with pytest.raises(DataError, match=r"docs\.jsonl:450: invalid JSON") as raised:
        global_batches([stream], steps=400)
    assert type(raised.value) is DataError and "\n" not in str(raised.value)
    with pytest.raises(DataError, match="docs.jsonl:450") as again:
        stream.next_batch()
    assert again.value is raised.value
    stream.close()


# ------------------------------------------------------------------------------------------ pre-tokenized


@pytest.fixture
def prepared(tmp_path):
    """A jsonl source, its tokenizer, and the shards launch/prepare_data.py makes of them (shards of 1000 tokens)."""
    lines = english_lines(300)
    source, tokenizer = jsonl_with_tokenizer(tmp_path, lines)
    out = tmp_path / "shards"
    args = ["--config", "tiny_swan.yaml", "--out", str(out), "--shard-tokens=1000"]
    assert prepare_main([*args, f"--data.source={source}", f"--data.tokenizer={tokenizer}"]) == 0
    return lines, source, tokenizer, out


def test_shards_hold_the_online_token_stream(capsys, prepared):
    lines, source, tokenizer, out = prepared
    index = json.loads((out / "index.json").read_text())
    train_docs = [t for i, t in enumerate(lines) if i % 100]
    encoded = tokenizer_of(make_cfg(source=source, tokenizer=tokenizer)).encode_batch(train_docs)
    one_pass = sum(len(e.ids) + 1 for e in encoded)  # + EOS
    assert index["splits"]["train"]["tokens"] == one_pass and index["dtype"] == "uint16"
    assert [s["tokens"] for s in index["splits"]["train"]["shards"]] == [1000] * (one_pass // 1000) + [
        one_pass % 1000
    ]
    assert (out / "train_000000.bin").stat().st_size == 2000
    assert f"train: {one_pass:,} tokens in {one_pass // 1000 + 1} shards (uint16)" in capsys.readouterr().out

    online = make_cfg(source=source, tokenizer=tokenizer, eval_sequences=1)
    offline = make_cfg(source=str(out), eval_sequences=1)
    steps = 3 * one_pass // (BATCH * WIDTH)  # three epochs: the stream wraps around like the online path
    expected = global_batches(loaders(online, 1), steps)
    for world in (1, 4):
        ranks = loaders(offline, world)
        assert all(torch.equal(a, b) for a, b in zip(global_batches(ranks, steps), expected, strict=True))
    assert ranks[0].state_dict()["epoch"] == 2
    held_out = [
        torch.cat(list(h.batches(2))) for h in (*loaders(online, 1, "eval"), *loaders(offline, 1, "eval"))
    ]
    assert held_out[0].dtype == torch.long and torch.equal(held_out[0], held_out[1])

    assert prepare_main(["--config", "tiny_swan.yaml", "--out", str(out), f"--data.source={source}"]) == 2
    assert capsys.readouterr().err == f"error: --out {out}: exists and is not an empty directory\n"


def test_shards_resume_exactly_at_another_world_size(prepared):
    *_, out = prepared
    cfg = make_cfg(source=str(out))
    ranks = loaders(cfg, 2)
    one_pass = json.loads((out / "index.json").read_text())["splits"]["train"]["tokens"]
    steps = one_pass // (BATCH * WIDTH) + 2  # into the second pass, in its first shard of 1000 tokens
    global_batches(ranks, steps)
    state = json.loads(json.dumps(ranks[0].state_dict()))
    assert state == ranks[1].state_dict()
    offset = steps * BATCH * WIDTH - one_pass
    assert (state["epoch"], state["docs"], state["offset"], state["rows"]) == (1, 0, offset, steps * BATCH)
    expected = global_batches(ranks, 4)
    for world in (1, 4):
        resumed = loaders(cfg, world)
        for loader in resumed:
            loader.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(global_batches(resumed, 4), expected, strict=True))


def test_shards_of_another_tokenizer_are_refused(prepared, tmp_path):
    lines, _, tokenizer, out = prepared
    other = save_tokenizer(train_bpe(lines, 300), tmp_path / "other")
    with pytest.raises(
        DataError, match=r"was tokenized by another tokenizer than data.tokenizer .*other"
    ) as err:
        build_data(
            make_cfg(source=str(out), tokenizer=str(other)),
            seq_len=SEQ, global_batch_size=BATCH, rank=0, world_size=1, run_dir=None,
        )  # fmt: skip
    assert "\n" not in str(err.value)
    same = build_data(
        make_cfg(source=str(out), tokenizer=tokenizer, eval_sequences=1),
        seq_len=SEQ, global_batch_size=BATCH, rank=0, world_size=1, run_dir=None,
    )  # fmt: skip
    assert same.vocab_size == 400 and same.new_tokenizer is None
    with pytest.raises(DataError, match="already pre-tokenized"):
        prepare_data(make_cfg(source=str(out)), tmp_path / "again")
    assert not (tmp_path / "again").exists()


# --------------------------------------------------------------------------------------- the exchange


def _two_ranks(source: str, bad_source: str, tokenizer: str, steps: int) -> dict:
    """Rank 0 of two: the global batches and held-out set (gathered from both ranks), the state after `steps`
    batches, each rank's parsed documents' indices within their split, and the DataError of `bad_source`."""
    rank = dist.get_rank()
    parsed: list[int] = []
    text = LocalText.text
    LocalText.text = lambda self, record: parsed.append(record[1] - 1) or text(self, record)  # line -> index
    cfg = make_cfg(source=source, tokenizer=tokenizer, eval_sequences=4)
    data = build_data(cfg, seq_len=SEQ, global_batch_size=BATCH, rank=rank, world_size=2, run_dir=None)
    mine = [data.train.next_batch() for _ in range(steps)]
    state = data.train.state_dict()
    mine += [data.train.next_batch() for _ in range(3)]
    data.train.close()
    mine.append(torch.from_numpy(data.held_out.rows))
    gathered = [[torch.empty_like(t) for _ in range(2)] for t in mine]
    for parts, t in zip(gathered, mine, strict=True):
        dist.all_gather(parts, t)
    indices = [None, None]
    dist.all_gather_object(indices, parsed)
    bad = build_data(
        make_cfg(source=bad_source, tokenizer=tokenizer, eval_sequences=4),
        seq_len=SEQ, global_batch_size=BATCH, rank=rank, world_size=2, run_dir=None,
    )  # fmt: skip
    try:
        for _ in range(400):
            bad.train.next_batch()
    except DataError as err:
        message = str(err)
    bad.train.close()
    wide = [list(range(70_000, 70_000 + n)) for n in range(1, 6)]  # ids past uint16: sent as int32
    exchanged = DocExchange(rank, 2, None).round(
        wide, lambda docs: [np.array(d, dtype=np.int32) for d in docs]
    )
    return {
        "batches": [torch.cat(p) for p in gathered],
        "state": state,
        "parsed": indices,
        "error": message,
        "wide": [d.tolist() for d in exchanged],
    }


@pytest.mark.slow
def test_two_ranks_tokenize_halves_and_get_world_size_1s_batches(tmp_path):
    lines = english_lines(1200)
    source, tokenizer = jsonl_with_tokenizer(tmp_path, lines)
    raw = (tmp_path / "docs.jsonl").read_text().splitlines(keepends=True)
    raw[907] = "[1, 2\n"  # line 908: train document 897 (odd: rank 1's), in the second round of 512
    (tmp_path / "bad.jsonl").write_text("".join(raw))
    cfg = make_cfg(source=source, tokenizer=tokenizer, eval_sequences=4)
    train_docs = [t for i, t in enumerate(lines) if i % 100]
    one_pass = sum(len(e.ids) + 1 for e in tokenizer_of(cfg).encode_batch(train_docs))
    steps = one_pass // (BATCH * WIDTH) + 2  # into the second epoch; rounds of 512 documents (256 a rank)
    got = run_distributed(_two_ranks, 2, source, str(tmp_path / "bad.jsonl"), tokenizer, steps)

    (one,) = loaders(cfg, 1)
    expected = global_batches([one], steps + 3)
    assert all(torch.equal(a, b) for a, b in zip(got["batches"][:-1], expected, strict=True))
    (held_out,) = loaders(cfg, 1, "eval")
    assert torch.equal(got["batches"][-1], torch.from_numpy(held_out.rows))
    assert got["state"]["rows"] == steps * BATCH and got["state"]["epoch"] == 1
    (resumed,) = loaders(cfg, 1)
    resumed.load_state_dict(got["state"])
    assert all(torch.equal(a, b) for a, b in zip(global_batches([resumed], 3), expected[steps:], strict=True))

    for rank, indices in enumerate(got["parsed"]):  # train documents (held-out lines are every 100th)
        train = [i - i // 100 - 1 for i in indices if i % 100]
        assert train and all(doc % 2 == rank for doc in train), rank
    (bad,) = loaders(make_cfg(source=str(tmp_path / "bad.jsonl"), tokenizer=tokenizer), 1)
    with pytest.raises(DataError) as alone:
        global_batches([bad], 400)
    assert got["error"] == str(alone.value) and "bad.jsonl:908: invalid JSON" in got["error"]
    assert got["wide"] == [list(range(70_000, 70_000 + n)) for n in range(1, 6)]
