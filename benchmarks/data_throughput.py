"""Data pipeline throughput: what one rank's data work costs per step, for every way a run reads data, at world
sizes 1 and 8, against what one H200 consumes at the shipped llama350m config (512 x 256 tokens per global batch).

    python -m benchmarks.data_throughput                         # the table in docs/data.md
    python -m benchmarks.data_throughput --tokenizer /path/to/t5-base/tokenizer.json --megabytes 20

Rows:
- online text (the corpus below as jsonl): tokenized by a byte-level BPE of 32,000 that the trainer trains on it
  (trainer.data.train_bpe), and by a Hugging Face tokenizer file. There is no internet here, so the second is a
  t5-like stand-in built with the `tokenizers` library (Unigram of 32,000 trained on the corpus, NMT + NFKC
  normalizer, Metaspace pre-tokenizer, </s> as EOS); `--tokenizer PATH` uses the real t5-base tokenizer.json.
- pre-tokenized: the corpus written by prepare_data (BPE tokens, uint16) and read by memory map.
- generated: the Markov corpus at 32,000 tokens (data.source generated).

World size 8 is rank 0 of 8 in one process. "today" is every rank tokenizing the whole global batch and keeping its
block (the path without an exchange). "split" is rank 0's own share: it reads every record, parses and tokenizes
every 8th document and cuts its rows; the other ranks' documents are tokenized by a stand-in exchange whose time is
left out. The exchange itself (the gloo all-gather of the token arrays, timed once both ranks are there) is
measured apart, with two real gloo processes. Each rank receives 7/8 of every step's tokens at world size 8, 1/2 at
2, while a round's fixed costs are spread over about 8 times as many documents: 1.75 times the world-size-2 figure
is an upper bound for world size 8 ("+ exchange" rows).

A step's work is timed synchronously (TokenStream.take of this rank's block, then the int64 tensor), the median of
--repeats runs of --steps steps after one warm-up step: the thread that makes batches ahead in a run hides this work
behind the step as long as it is shorter. What the loop still waits is measured in a real run: `data/wait_s` of
`launch/pretrain.py --config tiny_swan.yaml` on the corpus (--loop-steps), against the step time.

The corpus is generated here (English-like: 150 common English words and 50,000 made-up words, Zipf
frequencies, sentences and paragraphs), --megabytes of it, so nothing is downloaded. Only trainer/ and the
project's own dependencies (torch, numpy, tokenizers) are imported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from trainer.config import load_config
from trainer.data import open_source, prepare_data, save_tokenizer, train_bpe
from trainer.data.exchange import DocExchange, interleave
from trainer.data.packing import TokenStream
from trainer.data.sources import Position

ROOT = Path(__file__).resolve().parent.parent
SEQ, BATCH, VOCAB = 256, 512, 32_000  # llama350m: 512 x 256 tokens per global batch, T5's 32K vocabulary
H200_TOKENS_S = 102_000  # what one H200 trains at llama350m today; about 2x that compiled

COMMON = (
    "the of and to a in is that it was for on as with he be at by his this had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said what up "
    "its about into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three"
)
ONSETS = "b c d f g h l m n p r s t v w br ch cl cr dr fl fr gr pl pr sh sl sp st th tr"
VOWELS = "a e i o u a e i o ea ee ou ai"
CODAS = "- - - - - - n r s t l d m nd st ng ck nt"  # "-": no coda


def english_corpus(megabytes: float, seed: int = 0) -> list[str]:
    """Paragraph-sized documents of English-like text, about `megabytes` MB of it."""
    rng = random.Random(seed)
    words, seen = COMMON.split(), set(COMMON.split())
    onsets, vowels, codas = ONSETS.split(), VOWELS.split(), CODAS.replace("-", "").split(" ")
    while len(words) < 50_000:
        syllables = rng.choice((1, 1, 2, 2, 2, 3))
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    weights = [1.0 / (rank + 2.7) for rank in range(len(words))]
    docs, size = [], 0
    while size < megabytes * 1e6:
        sentences = []
        for _ in range(rng.randint(4, 24)):
            text = " ".join(rng.choices(words, weights, k=rng.randint(6, 26)))
            sentences.append(text[0].upper() + text[1:] + rng.choice(".....?!"))
        docs.append(" ".join(sentences))
        size += len(docs[-1]) + 1
    return docs


def t5_like_unigram(texts: list[str], vocab_size: int) -> Tokenizer:
    """A stand-in for t5-base's tokenizer.json: a Unigram model with T5's normalizer, pre-tokenizer and specials."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def data_cfg(source: str, tokenizer: str = "") -> SimpleNamespace:
    """The trainer's data section for `source` (the fields open_source and prepare_data read)."""
    return SimpleNamespace(
        source=source,
        subset="",
        split="train",
        eval_split="validation",
        streaming=True,
        text_field="text",
        tokenizer=tokenizer,
        vocab_size=VOCAB,
        generated_seed=1234,
        generated_order=1,
        eval_sequences=64,
    )


class LeftOut(DocExchange):
    """Rank `rank` of `world_size` in one process: the other ranks' shares are tokenized here too, and that time is
    kept in `seconds`, to be left out (the stand-in exchange of the module docstring)."""

    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size, None)
        self.seconds = 0.0

    def round(self, records: list, tokenize) -> list[np.ndarray]:
        world = self.world_size
        mine = tokenize(records[self.rank :: world])
        start = time.perf_counter()
        shares = [mine if r == self.rank else tokenize(records[r::world]) for r in range(world)]
        self.seconds += time.perf_counter() - start
        return interleave(shares, len(records))


class TimedExchange(DocExchange):
    """A real exchange that keeps the seconds spent in its collectives in `seconds`, once every rank is there (a
    barrier first: waiting for a slower peer's tokenizing is not the exchange's cost)."""

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup | None):
        super().__init__(rank, world_size, group)
        self.seconds = 0.0

    def gather(self, mine, failure, slots):
        dist.barrier(group=self.group)
        start = time.perf_counter()
        shares = super().gather(mine, failure, slots)
        self.seconds += time.perf_counter() - start
        return shares


def step_seconds(
    source, world: int, steps: int, repeats: int, exchange: LeftOut | TimedExchange | None = None
) -> tuple[float, float]:
    """Rank 0 of `world`: the seconds of one step's work and, of them, those `exchange` counted (medians over
    `repeats` timings of `steps` steps, each after a warm-up step: the first round, the first map)."""
    width = SEQ + 1
    keep = slice(0, BATCH // world * width)
    results = []
    for _ in range(repeats):
        stream = TokenStream(source, repeat=True, start=Position())
        stream.take(BATCH * width, keep)
        counted, start = exchange.seconds if exchange else 0.0, time.perf_counter()
        for _ in range(steps):
            tokens = stream.take(BATCH * width, keep)
            torch.from_numpy(tokens.astype(np.int64, copy=False).reshape(-1, width))
        wall = time.perf_counter() - start
        results.append((wall / steps, ((exchange.seconds if exchange else 0.0) - counted) / steps))
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


# ------------------------------------------------------------------------------------ world size 2, gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(rank: int, port: int, corpus: str, tokenizer: str, steps: int, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    exchange = TimedExchange(rank, 2, dist.new_group(backend="gloo"))
    source, _, _ = open_source(data_cfg(corpus), "train", Tokenizer.from_file(tokenizer), exchange)
    _, exchanged = step_seconds(source, 2, steps, repeats, exchange)
    if rank == 0:
        Path(out).write_text(json.dumps(exchanged))
    dist.barrier()
    dist.destroy_process_group()


def exchange_at_world_size_2(corpus: Path, tokenizer: Path, steps: int, repeats: int) -> float:
    """Seconds per step rank 0 spends in the all-gather, with two real gloo processes (both tokenizing their half:
    on this machine they share its cores, so their steps are no shorter than one process's)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        args = (_free_port(), str(corpus), str(tokenizer), steps, repeats, out)
        mp.start_processes(_two_ranks, args=args, nprocs=2, join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


# ----------------------------------------------------------------------------------------- the loop


def loop_wait(corpus: Path, steps: int, runs_dir: Path) -> tuple[float, float]:
    """(mean data/wait_s, mean step seconds) over the log windows after the first (start-up), of a tiny_swan.yaml
    run on the corpus."""
    overrides = [
        f"--data.source={corpus}",
        f"--train.steps={steps}",
        f"--train.runs_dir={runs_dir}",
        "--train.run_name=loop",
        "--train.eval_every=0",
        "--data.eval_sequences=8",
        "--checkpoint.every=0",
        "--metrics.tensorboard=false",
    ]
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", "tiny_swan.yaml", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the tiny run failed: {done.stderr.strip().splitlines()[-1]}")
    t = load_config("tiny_swan.yaml", overrides).train
    records = [json.loads(line) for line in (runs_dir / "loop" / "metrics.jsonl").read_text().splitlines()]
    rate = {r["step"]: r["tokens_per_s"] for r in records if "tokens_per_s" in r}
    windows = [
        (r["data/wait_s"], t.global_batch_size * t.seq_len / rate[r["step"]])
        for r in records
        if "data/wait_s" in r
    ]
    return statistics.mean(w for w, _ in windows[1:]), statistics.mean(s for _, s in windows[1:])


# ---------------------------------------------------------------------------------------------- table


def row(path: str, world: int, seconds: float, note: str = "") -> str:
    per_rank = BATCH // world * (SEQ + 1) / seconds
    return (
        f"| {path} | {world} | {seconds * 1e3:.2f} | {per_rank / 1e6:.2f}M | {per_rank * world / 1e6:.2f}M | "
        f"{per_rank / H200_TOKENS_S:.1f}x / {per_rank / (2 * H200_TOKENS_S):.1f}x | {note} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--megabytes", type=float, default=5.2, help="size of the generated corpus (default 5.2)"
    )
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer.json (t5-base's) instead of the stand-in")
    parser.add_argument("--steps", type=int, default=16, help="steps per timing (default 16)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings per row; the median is shown (default 3)"
    )
    parser.add_argument("--loop-steps", type=int, default=60, help="steps of the tiny run (0: skip it)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = english_corpus(args.megabytes)
        corpus = work / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        bpe = save_tokenizer(train_bpe(texts[:10_000], VOCAB), work / "bpe")
        hf_name = "t5-base tokenizer.json" if args.tokenizer else "t5-like Unigram (stand-in)"
        hf = args.tokenizer or save_tokenizer(t5_like_unigram(texts, VOCAB), work / "unigram")
        shards = work / "shards"
        prepare_data(data_cfg(str(corpus), str(bpe)), shards)
        tokens = json.loads((shards / "index.json").read_text())["splits"]["train"]["tokens"]
        print(
            f"corpus: {len(texts):,} documents, {corpus.stat().st_size / 1e6:.1f} MB, {tokens:,} BPE tokens "
            f"({tokens / (BATCH * (SEQ + 1)):.1f} global batches an epoch); {torch.get_num_threads()} torch threads, "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
        timing = {"steps": args.steps, "repeats": args.repeats}
        lines = []
        for name, tokenizer in (("BPE 32K (trained)", bpe), (hf_name, hf)):
            tok = Tokenizer.from_file(str(tokenizer))
            source, _, _ = open_source(data_cfg(str(corpus)), "train", tok)
            whole, _ = step_seconds(source, 1, **timing)
            lines.append(row(f"online, {name}", 1, whole))
            today, _ = step_seconds(source, 8, **timing)
            lines.append(row(f"online, {name}, today", 8, today, "every rank tokenizes the whole batch"))
            left_out = LeftOut(0, 8)
            split_source, _, _ = open_source(data_cfg(str(corpus)), "train", tok, left_out)
            wall, left = step_seconds(split_source, 8, exchange=left_out, **timing)
            split = wall - left
            lines.append(
                row(f"online, {name}, split", 8, split, f"rank 0's share: {today / split:.1f}x below today")
            )
            exchanged = exchange_at_world_size_2(corpus, tokenizer, **timing)
            estimate = split + 1.75 * exchanged
            note = (
                f"+ 1.75 x the all-gather at 2 processes ({exchanged * 1e3:.1f} ms): "
                f"{today / estimate:.1f}x below today"
            )
            lines.append(row(f"online, {name}, split + exchange", 8, estimate, note))
            print(*lines[-4:], sep="\n", flush=True)
        prepared, _, _ = open_source(data_cfg(str(shards)), "train", None)
        generated, _, _ = open_source(data_cfg("generated"), "train", None)
        for name, source in (("pre-tokenized (memory map)", prepared), ("generated", generated)):
            for world in (1, 8):
                lines.append(row(name, world, step_seconds(source, world, **timing)[0]))
                print(lines[-1], flush=True)
        loop = loop_wait(corpus, args.loop_steps, work / "runs") if args.loop_steps else None

    print()
    print(
        "| path | world | ms/step (rank 0) | tokens/s per rank | tokens/s global | vs one H200 (now / compiled) | |"
    )
    print("|---|---|---|---|---|---|---|")
    print(*lines, sep="\n")
    if loop is not None:
        wait, step = loop
        print(
            f"\nloop (tiny_swan.yaml on the corpus, {args.loop_steps} steps): data/wait_s {wait * 1e3:.2f} ms per "
            f"step, {100 * wait / step:.2f}% of the {step * 1e3:.0f} ms step"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
