"""benchmarks/balance_gap.py: the per-step trace counts every training assignment, and the
measured MaxVio rows are the max / mean of counts taken the way each row says."""

from pathlib import Path

import numpy as np

from tests.conftest import load_benchmark

TINY = dict(n_embd=16, n_head=2, block_size=16, num_moes=2, num_experts=3, batch_size=4,
            max_iters=5, eval_interval=5, eval_iters=1, seed=3)


def balance_gap():
    return load_benchmark("balance_gap")


def test_max_violation_is_max_over_mean_minus_one():
    assert balance_gap().max_violation(np.array([[1, 1, 4], [2, 2, 2]])).tolist() == [1.0, 0.0]


def test_trace_counts_every_step_and_measure_counts_as_each_row_says(tmp_path, capsys):
    bg = balance_gap()
    model_dir = str(tmp_path / "m")
    trace = bg.train(model_dir, TINY, threads=1)
    counts_SLE = np.load(trace)["counts_SLE"]
    assert counts_SLE.shape == (5, 2, 6)  # steps, MoE layers, 2 x 3 experts
    assert (counts_SLE.sum(-1) == 2 * 4 * 16).all()  # every token of every step, twice: top-2

    from himoe.checkpoint.card import load_model
    from himoe.data.corpora import open_corpus, token_splits
    from himoe.data.tokenizers import tokenizer_for
    rows = bg.measure(model_dir, batches=2, window=3)
    model, cfg, vocab, _ = load_model(Path(model_dir))
    _, val = token_splits(open_corpus(cfg.data_file), tokenizer_for(cfg, vocab, Path(model_dir)),
                          cfg.block_size)
    counts = bg.split_counts(model, val, 2, cfg.batch_size, cfg.block_size, False)
    assert counts.sum() == 2 * 2 * 4 * 16 * 2  # layers x batches x tokens x 2 experts each
    assert rows[2][1:] == [f"{v:.2f}" for v in bg.max_violation(counts)]  # val, eval mode
    assert rows[4][1:] == [f"{v:.2f}" for v in bg.max_violation(counts_SLE[-3:].sum(0))]
    assert len(rows) == 6 and "| counted on | layer 1 | layer 2 |" in capsys.readouterr().out


def test_a_dense_run_trains_and_has_no_trace(tmp_path):
    model_dir = tmp_path / "dense"
    assert balance_gap().train(str(model_dir), TINY | {"router": "dense"}, threads=1) is None
    assert (model_dir / "config.json").exists() and not Path(f"{model_dir}.trace.npz").exists()
