"""Data pipeline: world-size-invariant global batches, exact resume, local/hub text sources, eval set, corpus floor."""

import json
import math
import random
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer.config import DataConfig
from trainer.data import (
    DataError,
    HeldOutSet,
    TrainStream,
    build_data,
    build_tokenizer,
    open_source,
    save_tokenizer,
)
from trainer.data.markov import EOS_ID, MarkovCorpus

SEQ, BATCH = 32, 8
VOCABULARY = (
    "the a one old young small big river city house garden king queen child dog bird ship road light "
    "night morning winter summer walked found saw gave took made kept heard slowly quietly near "
    "under over into across beside and but while because green silver quiet bright tall lonely happy "
    "early"
)
WORDS = VOCABULARY.split()


def make_cfg(**overrides) -> DataConfig:
    """The trainer's DataConfig; the rows in stream order (data.shuffle_rows 0) unless a test asks otherwise."""
    base = dict(
        source="generated",
        subset="",
        split="train",
        eval_split="validation",
        streaming=True,
        text_field="text",
        tokenizer="",
        vocab_size=512,
        generated_seed=1234,
        generated_order=1,
        eval_sequences=64,
        shuffle_rows=0,
    )
    return DataConfig(**{**base, **overrides})


def english_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "." for _ in range(n)
    ]


def tokenizer_of(cfg, run_dir=None):
    """The tokenizer the trainer uses, saved into run_dir when trained (as the trainer does once it starts)."""
    tokenizer, trained = build_tokenizer(cfg, run_dir)
    if trained and run_dir is not None:
        save_tokenizer(tokenizer, run_dir)
    return tokenizer


def loaders(cfg, world: int, split: str = "train", run_dir=None, batch: int = BATCH) -> list:
    """Every rank's TrainStream (split "train") or HeldOutSet (split "eval")."""
    source, _, _ = open_source(cfg, split, tokenizer_of(cfg, run_dir))
    shard = {"seq_len": SEQ, "world_size": world}
    if split == "train":
        order = {"shuffle_rows": cfg.shuffle_rows, "seed": cfg.seed or 0}
        return [TrainStream(source, global_batch_size=batch, rank=r, **shard, **order) for r in range(world)]
    return [HeldOutSet(source, sequences=cfg.eval_sequences, rank=r, **shard) for r in range(world)]


def data(cfg, run_dir=None, batch: int = BATCH):
    return build_data(cfg, seq_len=SEQ, global_batch_size=batch, rank=0, world_size=1, run_dir=run_dir)


def global_batches(ranks: list, steps: int) -> list[torch.Tensor]:
    return [torch.cat([loader.next_batch() for loader in ranks]) for _ in range(steps)]


def write_jsonl(path, lines: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(lines)))


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from memory with real `datasets` objects (streaming or not)."""
    datasets = pytest.importorskip("datasets", reason="the hub path needs the datasets package")

    splits = {"train": english_lines(300, seed=1), "validation": english_lines(60, seed=2)}
    calls = []

    def load_dataset(name, subset=None, *, split, streaming):
        calls.append((name, subset, split, streaming))
        ds = datasets.Dataset.from_dict({"text": splits[split]})
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return SimpleNamespace(splits=splits, calls=calls)


# ------------------------------------------------------------------------------- order, sharding, resume


def test_global_batch_is_the_same_for_every_world_size():
    cfg = make_cfg()
    reference = global_batches(loaders(cfg, 1), steps=3)
    assert reference[0].shape == (BATCH, SEQ + 1) and reference[0].dtype == torch.long
    assert not torch.equal(reference[0], reference[1])
    for world in (2, 4):
        ranks = loaders(cfg, world)
        for step, expected in enumerate(reference):
            parts = [loader.next_batch() for loader in ranks]
            assert all(p.shape == (BATCH // world, SEQ + 1) for p in parts)
            assert torch.equal(torch.cat(parts), expected), (world, step)


def test_rows_are_the_document_stream_cut_without_padding_or_overlap():
    (loader,) = loaders(make_cfg(), 1)
    rows = torch.cat(global_batches([loader], steps=5)).flatten().numpy()
    docs = MarkovCorpus(512, 1234).documents(split_id=0)
    stream = np.concatenate(list(islice(docs, 50)))
    np.testing.assert_array_equal(rows, stream[: rows.size])
    assert data(make_cfg()).vocab_size == 512 and int(rows.max()) < 512 and (rows == EOS_ID).any()


@pytest.mark.parametrize("kind, steps_before", [("generated", 3), ("jsonl", 25), ("hub", 25)])
def test_resume_continues_exactly_at_another_world_size(tmp_path, fake_hub, kind, steps_before):
    if kind == "generated":
        cfg = make_cfg()
    elif kind == "jsonl":
        write_jsonl(tmp_path / "docs.jsonl", english_lines(300))
        cfg = make_cfg(source=str(tmp_path / "docs.jsonl"), vocab_size=400)
    else:
        cfg = make_cfg(source="someone/stories", vocab_size=400)
    run_dir = tmp_path / "run"
    ranks = loaders(cfg, 2, run_dir=run_dir)
    global_batches(ranks, steps_before)
    states = [loader.state_dict() for loader in ranks]
    assert states[0] == states[1]
    state = json.loads(json.dumps(states[0]))
    assert state["rows"] == steps_before * BATCH and state["offset"] > 0
    if kind != "generated":  # a small text source wraps around: the saved position is in its second pass
        assert state["epoch"] == 1
    expected = global_batches(ranks, steps=4)
    for world in (1, 4):
        resumed = loaders(cfg, world, run_dir=run_dir)
        for loader in resumed:
            loader.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(global_batches(resumed, 4), expected, strict=True)), (
            world
        )


def test_state_of_another_source_is_refused():
    (loader,) = loaders(make_cfg(generated_seed=1), 1)
    (other,) = loaders(make_cfg(generated_seed=2), 1)
    with pytest.raises(DataError, match="seed=1"):
        other.load_state_dict(loader.state_dict())


# ------------------------------------------------------------------------------------------- data order


def _rows(batches: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(row) for row in torch.cat(batches).tolist()]


def test_the_data_order_follows_its_seed_and_each_window_keeps_its_rows():
    in_order = _rows(global_batches(loaders(make_cfg(), 1), steps=8))  # 64 rows: four windows of 16
    first = _rows(global_batches(loaders(make_cfg(shuffle_rows=16, seed=1), 1), steps=8))
    assert first == _rows(global_batches(loaders(make_cfg(shuffle_rows=16, seed=1), 1), steps=8))
    assert first != _rows(global_batches(loaders(make_cfg(shuffle_rows=16, seed=2), 1), steps=8))
    assert first != in_order
    for window in range(4):  # the same rows, another order: nothing lost, nothing repeated
        rows = slice(16 * window, 16 * (window + 1))
        assert sorted(first[rows]) == sorted(in_order[rows]) and first[rows] != in_order[rows]


def test_a_shuffled_global_batch_is_the_same_for_every_world_size_and_resumes_exactly():
    cfg = make_cfg(
        shuffle_rows=12, seed=3
    )  # windows of 12 rows, batches of 8: a batch may straddle two windows
    reference = global_batches(loaders(cfg, 1), steps=9)
    for world in (2, 4):
        assert all(
            torch.equal(a, b) for a, b in zip(global_batches(loaders(cfg, world), 9), reference, strict=True)
        ), world
    for steps_before in (3, 4):  # 24 rows: at a window's end; 32: inside the third window
        ranks = loaders(cfg, 2)
        global_batches(ranks, steps_before)
        state = json.loads(json.dumps(ranks[0].state_dict()))
        assert state["rows"] == 8 * steps_before and state["shuffle_rows"] == 12 and state["seed"] == 3
        for world in (1, 4):
            resumed = loaders(cfg, world)
            for loader in resumed:
                loader.load_state_dict(state)
            after = global_batches(resumed, 9 - steps_before)
            assert all(torch.equal(a, b) for a, b in zip(after, reference[steps_before:], strict=True))


def test_a_state_of_another_data_order_is_refused_in_one_line():
    (seeded,) = loaders(make_cfg(shuffle_rows=16, seed=1), 1)
    seeded.next_batch()
    (other,) = loaders(make_cfg(shuffle_rows=16, seed=2), 1)
    with pytest.raises(DataError, match=r"data.shuffle_rows=16, data seed 1; this run has 16 and 2"):
        other.load_state_dict(seeded.state_dict())
    (plain,) = loaders(make_cfg(), 1)
    plain.next_batch()
    older = {k: v for k, v in plain.state_dict().items() if k not in ("shuffle_rows", "seed")}
    with pytest.raises(DataError, match="written with data.shuffle_rows=0"):  # a state from before shuffling
        other.load_state_dict(older)
    (unshuffled,) = loaders(make_cfg(), 1)
    unshuffled.load_state_dict(older)  # read as the unshuffled order it was
    assert unshuffled.state_dict()["rows"] == BATCH


def test_the_data_seed_is_train_seed_unless_set():
    def first(cfg, train_seed: int) -> torch.Tensor:
        built = build_data(cfg, seq_len=SEQ, global_batch_size=BATCH, rank=0, world_size=1, run_dir=None,
                           train_seed=train_seed)  # fmt: skip
        return built.train.next_batch()

    shuffled = make_cfg(shuffle_rows=64)
    assert not torch.equal(first(shuffled, 0), first(shuffled, 1))
    assert torch.equal(first(make_cfg(shuffle_rows=64, seed=1), 0), first(shuffled, 1))
    assert torch.equal(first(make_cfg(), 0), first(make_cfg(), 1))  # unshuffled: the source's order


# -------------------------------------------------------------------------------------- text sources


def test_txt_jsonl_parquet_and_directory_give_the_same_stream(tmp_path):
    lines = english_lines(300)
    (tmp_path / "docs.txt").write_text("\n\n".join(lines) + "\n")  # blank lines are not documents
    write_jsonl(tmp_path / "docs.jsonl", lines)
    pq.write_table(pa.table({"text": lines}), tmp_path / "docs.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(lines[:120]) + "\n")
    write_jsonl(folder / "b.jsonl", lines[120:])
    (folder / ".hidden.txt").write_text("never read\n")
    (folder / "README.md").write_text("not a data file\n")

    streams = {}
    for name in ("docs.txt", "docs.jsonl", "docs.parquet", "folder"):
        cfg = make_cfg(source=str(tmp_path / name), vocab_size=400, eval_sequences=1)
        (loader,) = loaders(cfg, 1, run_dir=tmp_path / f"run_{name}")
        streams[name] = torch.cat(global_batches([loader], steps=3))
        facts = data(cfg, run_dir=tmp_path / f"run_{name}")
        assert facts.entropy_floor is None and 257 < facts.vocab_size <= 400
    for name, stream in streams.items():
        assert torch.equal(stream, streams["docs.txt"]), name

    tokenizer = tokenizer_of(make_cfg(source=str(tmp_path / "docs.txt")), tmp_path / "run_docs.txt")
    first = streams["docs.txt"].flatten().tolist()
    eos = first.index(tokenizer.token_to_id("<|endoftext|>"))
    assert tokenizer.decode(first[:eos]) == lines[1]  # line 0 is held out for eval


def test_train_stream_starts_over_after_the_last_document(tmp_path):
    lines = english_lines(300)
    write_jsonl(tmp_path / "docs.jsonl", lines)
    cfg = make_cfg(source=str(tmp_path / "docs.jsonl"), vocab_size=400)
    (loader,) = loaders(cfg, 1, run_dir=tmp_path / "run")
    tokenizer = tokenizer_of(cfg, tmp_path / "run")
    train_docs = [t for i, t in enumerate(lines) if i % 100]
    one_pass = [i for enc in tokenizer.encode_batch(train_docs) for i in [*enc.ids, 0]]
    stream = torch.cat(global_batches([loader], steps=(3 * len(one_pass)) // (BATCH * (SEQ + 1))))
    assert stream.numel() > 2 * len(one_pass)
    assert stream.flatten().tolist() == (one_pass * 3)[: stream.numel()]
    assert loader.state_dict()["epoch"] == 2


def test_tokenizer_is_saved_to_the_run_dir_and_reused(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", english_lines(300))
    cfg = make_cfg(source=str(tmp_path / "docs.jsonl"), vocab_size=400)
    run_dir = tmp_path / "run"
    trained, is_new = build_tokenizer(cfg, run_dir)
    assert is_new and not run_dir.exists()  # building writes nothing
    saved = save_tokenizer(trained, run_dir)
    assert saved == run_dir / "tokenizer.json" and saved.is_file() and trained.get_vocab_size() > 300
    reused, is_new = build_tokenizer(
        make_cfg(source=cfg.source, vocab_size=300), run_dir
    )  # would retrain smaller
    assert reused.to_str() == trained.to_str() and not is_new
    from_file, _ = build_tokenizer(make_cfg(source=cfg.source, tokenizer=str(saved)), None)
    assert from_file.to_str() == trained.to_str()
    # Every rank trains its own copy: training must be deterministic.
    assert build_tokenizer(cfg, None)[0].to_str() == trained.to_str()


def test_hub_source_reads_the_configured_splits(fake_hub):
    cfg = make_cfg(source="someone/stories", subset="en", streaming=False, vocab_size=400, eval_sequences=4)
    (train,) = loaders(cfg, 1)
    (held_out,) = loaders(cfg, 1, split="eval")
    # Each loader reads "train" once to train its tokenizer (no run dir to share it), then its own split.
    assert fake_hub.calls == [("someone/stories", "en", s, False) for s in ("train",) * 3 + ("validation",)]
    tokenizer = tokenizer_of(cfg)
    first = train.next_batch()[0].tolist()
    assert tokenizer.decode(first[: first.index(0)]) == fake_hub.splits["train"][0]
    eval_first = next(held_out.batches(4))[0].tolist()
    assert tokenizer.decode(eval_first[: eval_first.index(0)]) == fake_hub.splits["validation"][0]


# -------------------------------------------------------------------------------------------- errors


def test_bad_sources_raise_data_error_naming_them(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "corpus.jsonl"
    with pytest.raises(DataError, match="nope/corpus.jsonl"):
        loaders(make_cfg(source=str(missing)), 1)
    with pytest.raises(DataError, match="no such file or directory"):
        loaders(make_cfg(source=str(tmp_path / "absent_dir")), 1)
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"table\.csv.*unsupported file type '\.csv'"):
        loaders(make_cfg(source=str(tmp_path / "table.csv")), 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no .txt/.jsonl/.parquet files"):
        loaders(make_cfg(source=str(tmp_path / "empty")), 1)
    write_jsonl(tmp_path / "docs.jsonl", english_lines(10))
    with pytest.raises(DataError, match=r"docs\.jsonl:1: no text field 'body'"):
        loaders(make_cfg(source=str(tmp_path / "docs.jsonl"), text_field="body"), 1)
    with pytest.raises(DataError, match="missing_tok.json"):
        loaders(
            make_cfg(source=str(tmp_path / "docs.jsonl"), tokenizer=str(tmp_path / "missing_tok.json")), 1
        )
    with pytest.raises(DataError, match="tokenizer must be empty"):
        loaders(make_cfg(tokenizer="t5-base"), 1)
    with pytest.raises(DataError, match="vocab_size 4 too small"):
        loaders(make_cfg(vocab_size=4), 1)
    (tmp_path / "blank.jsonl").write_text("")
    with pytest.raises(DataError, match="blank.jsonl:train has no training documents"):
        loaders(make_cfg(source=str(tmp_path / "blank.jsonl")), 1)


def test_an_unknown_hub_dataset_is_a_data_error_naming_it(monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the hub path needs the datasets package")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no-such-org/no-such-dataset"):
        loaders(make_cfg(source="no-such-org/no-such-dataset"), 1)


# ---------------------------------------------------------------------------------------------- eval


def test_eval_set_is_fixed_sharded_and_disjoint_from_train():
    cfg = make_cfg(eval_sequences=8)
    (single,) = loaders(cfg, 1, split="eval", batch=8)
    first = list(single.batches(3))
    assert [len(b) for b in first] == [3, 3, 2]
    assert all(torch.equal(a, b) for a, b in zip(first, single.batches(3), strict=True))
    full = torch.cat(first)
    halves = [torch.cat(list(r.batches(4))) for r in loaders(cfg, 2, split="eval", batch=8)]
    assert torch.equal(torch.cat(halves), full)

    train_rows = {tuple(r) for b in global_batches(loaders(cfg, 1), 200) for r in b.tolist()}
    assert len(train_rows) == 200 * BATCH
    assert not {tuple(r) for r in full.tolist()} & train_rows
    with pytest.raises(
        DataError, match=r"data.eval_sequences \(3\) must be a positive multiple of the world size"
    ):
        loaders(make_cfg(eval_sequences=3), 2, split="eval")


def test_local_eval_holds_out_every_hundredth_document(tmp_path):
    lines = english_lines(800)
    write_jsonl(tmp_path / "docs.jsonl", lines)
    cfg = make_cfg(source=str(tmp_path / "docs.jsonl"), vocab_size=400, eval_sequences=2)
    (held_out,) = loaders(cfg, 1, split="eval", run_dir=tmp_path / "run")
    tokens = torch.cat(list(held_out.batches(2))).flatten().tolist()
    tokenizer = tokenizer_of(cfg, tmp_path / "run")
    docs = tokenizer.decode(tokens, skip_special_tokens=False).split("<|endoftext|>")
    assert docs[:2] == [lines[0], lines[100]] and lines[200].startswith(docs[2])
    too_many = make_cfg(source=cfg.source, vocab_size=400, eval_sequences=40)
    with pytest.raises(DataError, match=r"only \d sequences of 33 tokens, data.eval_sequences is 40"):
        loaders(too_many, 1, split="eval", run_dir=tmp_path / "run")  # read when built: before any write


# ---------------------------------------------------------------------------------- generated corpus


def binary_entropy(q: float) -> float:
    return -q * math.log(q) - (1 - q) * math.log(1 - q)


def test_entropy_floor_of_hand_checkable_chains():
    one_successor = MarkovCorpus(16, 0, branching=1, eos_prob=0.25)
    assert one_successor.entropy_floor == pytest.approx(binary_entropy(0.25), abs=1e-12)
    tokens = np.concatenate(list(islice(one_successor.documents(0), 2000)))
    prev, nxt = tokens[:-1], tokens[1:]
    inside = nxt != EOS_ID
    np.testing.assert_array_equal(nxt[inside], one_successor.successors[prev[inside], 0])  # deterministic
    two_even = MarkovCorpus(16, 0, branching=2, zipf_exponent=0.0, eos_prob=0.5)
    assert two_even.entropy_floor == pytest.approx(1.5 * math.log(2), abs=1e-12)  # h(1/2) + 1/2 ln 2


def test_order_2_successors_depend_on_the_last_two_tokens():
    corpus = MarkovCorpus(16, 3, branching=2, eos_prob=0.05, order=2)
    tokens, _ = corpus.chunk(split_id=0, index=0)
    prev2, prev1, nxt = tokens[:-2], tokens[1:-1], tokens[2:]
    inside = (prev2 != EOS_ID) & (prev1 != EOS_ID) & (nxt != EOS_ID)
    legal = (corpus.successors[prev2 * 16 + prev1] == nxt[:, None]).any(axis=1)
    assert legal[inside].all()  # every token is a successor of its two-token context
    # ... and not of its one-token context alone: the order-1 view of the same stream is much less predictable.
    one_token_successors = {(a, b) for a, b in zip(prev1[inside], nxt[inside], strict=True)}
    assert len(one_token_successors) > 2 * 15  # far more than branching=2 successors per single token
    assert corpus.entropy_floor == MarkovCorpus(16, 3, branching=2, eos_prob=0.05).entropy_floor


def test_entropy_floor_is_the_true_models_loss_on_the_stream():
    q = 0.05
    corpus = MarkovCorpus(64, 7, branching=4, eos_prob=q)
    tokens = np.concatenate(list(islice(corpus.documents(0), 3000)))  # 3 chunks, ~60k tokens
    prev, nxt = tokens[:-1], tokens[1:]
    rank = np.argmax(corpus.successors[prev] == nxt[:, None], axis=1)
    legal = corpus.successors[prev, rank] == nxt
    assert (legal | (nxt == EOS_ID)).all()
    p_true = np.where(nxt == EOS_ID, q, (1 - q) * corpus.rank_probs[rank])
    nll = -np.log(p_true)
    assert abs(nll.mean() - corpus.entropy_floor) < 4 * nll.std() / math.sqrt(nll.size)
    doc_lengths = np.diff(np.flatnonzero(tokens == EOS_ID)) - 1
    assert doc_lengths.mean() == pytest.approx((1 - q) / q, rel=0.05)


def test_default_corpus_floor_is_learnable_and_below_unigram_entropy():
    cfg = make_cfg()
    (loader,) = loaders(cfg, 1, batch=64)
    tokens = torch.cat(global_batches([loader], 50)).flatten().numpy()
    counts = np.bincount(tokens, minlength=cfg.vocab_size)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    floor = data(cfg).entropy_floor
    assert 1.5 < floor < 3.0
    assert floor < unigram - 2.0 and unigram > 5.0
