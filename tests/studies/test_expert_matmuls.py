"""benchmarks/expert_matmuls.py: the row counts it times, one row per case, the ratio."""

from tests.conftest import load_benchmark


def test_row_counts_sum_to_the_rows_and_spread_around_an_even_share():
    em = load_benchmark("expert_matmuls")
    even = em.row_counts(48, 8192, spread=0.0)
    assert sum(even) == 8192 and max(even) - min(even) <= 1
    spread = em.row_counts(48, 8192, spread=0.12)
    assert sum(spread) == 8192 and max(spread) > 1.1 * 8192 / 48


def test_every_thread_count_shape_and_product_is_timed_and_reported():
    em = load_benchmark("expert_matmuls")
    rows = em.measure(em.row_counts(4, 64, 0.1), threads=(1,), repeats=2, warmup=0)
    assert [(r["shape"], r["product"]) for r in rows] == [
        (f"{a} -> {b}", p) for a, b in em.SHAPES for p in em.PRODUCTS]
    assert all(len(r["loop"]) == len(r["single"]) == 2 for r in rows)
    fixed = [{"threads": 2, "shape": "256 -> 384", "product": "forward",
              "loop": [4.0, 6.0, 9.0], "single": [2.0, 2.0, 3.0]}]
    assert em.report(fixed)[-1] == ("| 2 | 256 -> 384 | forward | 6.0 [4.0, 9.0] | "
                                    "2.0 [2.0, 3.0] | 3.00 [2.00, 3.00]x |")
