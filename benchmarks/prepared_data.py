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
    from himoe.data.documents import default_corpus_path

    lines = default_corpus_path().read_text(encoding="utf-8").splitlines(keepends=True)
    rng = random.Random(seed)
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = "".join(rng.choice(lines) for _ in range(200))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))


def prepare_throughput(corpus: Path, out: Path, vocab_size: int) -> dict:
    """MB/s of the tokenising pass of `himoe prepare` and of a bare encode_batch."""
    from himoe.data.formats import read_documents
    from himoe.data.prepare import prepare
    from himoe.data.shards import PreparedCorpus

    manifest = prepare(corpus, "bpe", out, bpe_vocab_size=vocab_size, err=io.StringIO())

    tok = PreparedCorpus(out).tokenizer().tok
    texts = [doc.text for doc in read_documents(corpus)]
    start = time.perf_counter()
    tok.encode_batch(texts)
    ceiling = manifest["bytes"] / 1e6 / (time.perf_counter() - start)
    return {"prepare_mb_s": manifest["mb_per_s"], "encode_batch_mb_s": round(ceiling, 2),
            "ratio": round(manifest["mb_per_s"] / ceiling, 3)}


def train_run(data_file: Path, model_dir: Path, steps: int) -> dict:
    """Peak RSS and tokens/s (start-up included) of `himoe train` in a child process."""
    flags = [f"--{k}={v}" for k, v in TRAIN_FLAGS.items()]
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, "train", f"--data_file={data_file}",
                        f"--model_dir={model_dir}", f"--max_iters={steps}", *flags],
                       check=True, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    peak_kb = int(r.stderr.strip().splitlines()[-1])
    tokens = steps * TRAIN_FLAGS["batch_size"] * TRAIN_FLAGS["block_size"]
    return {"peak_rss_mb": round(peak_kb / 1024, 1),
            "tokens_per_s_incl_start": round(tokens / elapsed, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small_mb", type=float, default=10)
    parser.add_argument("--large_mb", type=float, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.small_mb, args.large_mb, args.steps, args.vocab_size = 0.05, 0.2, 2, 300
    from himoe.data.prepare import prepare

    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small, large = root / "small.jsonl", root / "large.jsonl"
        generate_corpus(small, args.small_mb)
        generate_corpus(large, args.large_mb, seed=1)
        report["prepare"] = prepare_throughput(small, root / "small_bpe", args.vocab_size)
        for name, corpus in (("small", small), ("large", large)):
            prepare(corpus, "char", root / f"{name}_char", err=io.StringIO())
        report["train_small_prepared"] = train_run(root / "small_char", root / "m1", args.steps)
        report["train_large_prepared"] = train_run(root / "large_char", root / "m2", args.steps)
        text_dir = root / "small_text"  # the in-memory path reads text files, one a document
        text_dir.mkdir()
        for i, line in enumerate(small.read_text(encoding="utf-8").splitlines()):
            (text_dir / f"{i:08d}.txt").write_text(json.loads(line)["text"], encoding="utf-8")
        report["train_small_in_memory"] = train_run(text_dir, root / "m3", args.steps)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
