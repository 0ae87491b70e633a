"""Issue 18's three measurements of `himoe prepare` (code only; run them on an idle machine):

1. peak resident memory of training from a prepared directory, on a small and on a large
   generated corpus (the target: the two differ by under 200 MB);
2. `prepare` throughput on BPE in MB/s against the `tokenizers` library's own
   `encode_batch` on the same text, the ceiling (the target: at least 0.7x);
3. training tokens/s from the prepared directory against the in-memory path (the target:
   not below it).

    python benchmarks/prepared_data.py --small_mb 10 --large_mb 2000
    python benchmarks/prepared_data.py --smoke        # seconds: that it runs

Each training run is a separate process that reports its own peak RSS (ru_maxrss). The corpus
is Hamlet's lines shuffled into documents by a seeded generator.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN_FLAGS = dict(n_embd=32, n_layer=2, n_head=2, block_size=64, num_moes=2, num_experts=2,
                   batch_size=8, eval_interval=1000, eval_iters=1, sample_tokens=4,
                   device="cpu")


# `himoe ARGV`, then its own peak RSS in KiB as the last line of stderr
CHILD = ("import resource, sys\nfrom himoe.cli import main\nrc = main(sys.argv[1:])\n"
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
         "sys.exit(rc)")


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """JSON lines of Hamlet's lines in a seeded random order, ~megabytes in all."""
    from himoe.data.corpus_files import default_corpus_path

    lines = default_corpus_path().read_text(encoding="utf-8").splitlines(keepends=True)
    rng = random.Random(seed)
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = "".join(rng.choice(lines) for _ in range(200))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))


def encode_ratio(corpus: Path, out: Path, vocab_size: int, pairs: int) -> dict:
    """MB/s of `himoe prepare`'s tokenising pass (reading, encoding, writing the shards)
    against a bare encode_batch of the same texts, alternating A B A B."""
    from himoe.data.formats import read_documents
    from himoe.data.prepare import prepare
    from himoe.data.shards import PreparedCorpus

    texts = [doc.text for doc in read_documents(corpus)]
    n_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    ratios, a_mb_s, b_mb_s = [], [], []
    for i in range(pairs):
        manifest = prepare(corpus, "bpe", out / f"p{i}", bpe_vocab_size=vocab_size,
                           err=io.StringIO())
        tok = PreparedCorpus(out / f"p{i}").tokenizer().tok
        start = time.perf_counter()
        tok.encode_batch(texts)
        ceiling = n_mb / (time.perf_counter() - start)
        a_mb_s.append(manifest["mb_per_s"])
        b_mb_s.append(round(ceiling, 2))
        ratios.append(manifest["mb_per_s"] / ceiling)
    return {"prepare_mb_s": a_mb_s, "encode_batch_mb_s": b_mb_s, "ratio": spread(ratios)}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x [{min(values):.2f}, {max(values):.2f}]"


def train_run(data_file: Path, model_dir: Path, steps: int) -> dict:
    """Peak RSS and training tokens/s (the last evaluation's window: start-up excluded) of
    `himoe train` in a child process."""
    flags = [f"--{k}={v}" for k, v in TRAIN_FLAGS.items()]
    r = subprocess.run([sys.executable, "-c", CHILD, "train", f"--data_file={data_file}",
                        f"--model_dir={model_dir}", f"--max_iters={steps}", *flags],
                       check=True, capture_output=True, text=True)
    peak_kb = int(r.stderr.strip().splitlines()[-1])
    last = json.loads((model_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"peak_rss_mb": round(peak_kb / 1024, 1), "tokens_per_s": last["tokens_per_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small_mb", type=float, default=10)
    parser.add_argument("--large_mb", type=float, default=2000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=3, help="A B repetitions of each ratio")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.small_mb, args.large_mb, args.steps, args.vocab_size, args.pairs = \
            0.05, 0.2, 2, 300, 1
    from himoe.data.prepare import prepare

    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small, large = root / "small.jsonl", root / "large.jsonl"
        generate_corpus(small, args.small_mb)
        generate_corpus(large, args.large_mb, seed=1)
        report["prepare_vs_encode_batch"] = encode_ratio(small, root / "bpe", args.vocab_size,
                                                         args.pairs)
        for name, corpus in (("small", small), ("large", large)):
            prepare(corpus, "char", root / f"{name}_char", err=io.StringIO())
        large.unlink()  # only the prepared copy is read from here on
        small_run = train_run(root / "small_char", root / "m1", args.steps)
        large_run = train_run(root / "large_char", root / "m2", args.steps)
        report["peak_rss_mb"] = {"small_prepared": small_run["peak_rss_mb"],
                                 "large_prepared": large_run["peak_rss_mb"],
                                 "difference": round(large_run["peak_rss_mb"]
                                                     - small_run["peak_rss_mb"], 1)}
        text_dir = root / "small_text"  # the in-memory path reads text files, one a document
        text_dir.mkdir()
        for i, line in enumerate(small.read_text(encoding="utf-8").splitlines()):
            (text_dir / f"{i:08d}.txt").write_text(json.loads(line)["text"], encoding="utf-8")
        ratios = []  # prepared / in-memory tokens/s, alternating
        for i in range(args.pairs):
            prepared = train_run(root / "small_char", root / f"a{i}", args.steps)
            in_memory = train_run(text_dir, root / f"b{i}", args.steps)
            ratios.append(prepared["tokens_per_s"] / in_memory["tokens_per_s"])
        report["train_tokens_per_s_prepared_vs_in_memory"] = spread(ratios)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
