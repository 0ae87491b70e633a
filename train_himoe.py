"""The HiMoE card's training script, kept for its users: `python train_himoe.py [--resume]
[--num_moes 8 --num_experts 16 ... --data_file my_corpus.txt --model_dir checkpoints/run_01]`.
It is `himoe train` with one card convenience: a hamlet.txt placed beside this script is
the corpus when --data_file is not given (otherwise the copy shipped in the package)."""

import sys
from pathlib import Path

from himoe.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    local = Path(__file__).resolve().parent / "hamlet.txt"
    given = any(a.split("=")[0] in ("--data_file", "--data-file") for a in args)
    if local.is_file() and not given:
        args += ["--data_file", str(local)]
    sys.exit(main(["train", *args]))
