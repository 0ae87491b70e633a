"""Build a three-domain corpus from material every Python installation has, for the routing
analysis by domain (MiniMoE's "expert shares by prompt type"):

- code:  the standard library's own top-level modules (`Lib/*.py`), one document per file;
- prose: the English text of Python's documentation topics (`pydoc_data.topics`), one
         document per topic;
- drama: the Shakespeare texts given with --shakespeare (a folder of .txt files), one
         document per text.

    python examples/mixed_domains.py --shakespeare ../shared/data/shakespeare --out mix
    himoe prepare --data_file mix/train.jsonl --tokenizer bpe --vocab_size 4096 --out mix/prepared
    himoe train --data_file mix/prepared --model_dir mix/model
    himoe analyze --model_dir mix/model --domain code=mix/heldout/code.txt \
        --domain prose=mix/heldout/prose.txt --domain drama=mix/heldout/drama.txt

`mix/train.jsonl` holds every training document as {"domain": ..., "text": ...}; the held-out
documents of each domain (every `--heldout_every`-th, so none of them is trained on) go to
`mix/heldout/DOMAIN.txt`, the texts `himoe analyze` routes; the first training documents of
each domain (up to --trained_sample_chars) go to `mix/trained/DOMAIN.txt`, so that `himoe eval`
on both shows how much a model over-fits each domain. Each domain is capped at
--domain_mb so that no domain dominates the mix (the prose has about 0.45 MB in all).
The result depends only on the Python version and the Shakespeare folder: files are taken in
sorted order, with no randomness.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path


def code_documents() -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("*.py"))]


def prose_documents() -> list[str]:
    from pydoc_data.topics import topics  # the text `help("TOPIC")` prints
    return [topics[name] for name in sorted(topics)]


def drama_documents(folder: Path) -> list[str]:
    files = sorted(folder.glob("*.txt"))
    if not files:
        sys.exit(f"error: no .txt files in {folder}; pass --shakespeare a folder of plays")
    return [p.read_text(encoding="utf-8") for p in files]


def split(docs: list[str], cap_chars: int, every: int) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: every `every`-th document is held out, and each side
    stops growing once it has its share of cap_chars."""
    train, heldout = [], []
    for i, doc in enumerate(docs):
        side, share = (heldout, cap_chars // every) if i % every == every - 1 else \
            (train, cap_chars)
        if sum(map(len, side)) < share:
            side.append(doc)
    return train, heldout


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; these are plain data files
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shakespeare", type=Path, required=True,
                    help="a folder of plays as .txt (e.g. ../shared/data/shakespeare)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--domain_mb", type=float, default=1.5,
                    help="characters per domain, in millions, at most")
    ap.add_argument("--heldout_every", type=int, default=8)
    ap.add_argument("--trained_sample_chars", type=int, default=200_000,
                    help="characters of each domain's training text for mix/trained/")
    args = ap.parse_args()
    domains = {"code": code_documents(), "prose": prose_documents(),
               "drama": drama_documents(args.shakespeare)}
    lines, sizes = [], {}
    for name, docs in domains.items():
        train, heldout = split(docs, int(args.domain_mb * 1e6), args.heldout_every)
        lines += [json.dumps({"domain": name, "text": doc}) + "\n" for doc in train]
        write_atomically(args.out / "heldout" / f"{name}.txt", "\n\n".join(heldout) + "\n")
        # an `every` past the last document holds none out: the first ones up to the cap
        sample, _ = split(train, args.trained_sample_chars, every=len(train) + 1)
        write_atomically(args.out / "trained" / f"{name}.txt", "\n\n".join(sample) + "\n")
        sizes[name] = (len(train), sum(map(len, train)), len(heldout), sum(map(len, heldout)))
    write_atomically(args.out / "train.jsonl", "".join(lines))
    print("domain  train docs  train chars  held-out docs  held-out chars")
    for name, (nt, ct, nh, ch) in sizes.items():
        print(f"{name:<7} {nt:>10} {ct:>12,} {nh:>14} {ch:>15,}")


if __name__ == "__main__":
    main()
