"""rere.stats against values computed by hand on small examples."""

import doctest
import math

import numpy as np
import pytest

import rere.stats
from rere import RereError
from rere.metrics import hr_ndcg
from rere.stats import (
    bootstrap_ci,
    check_aligned,
    compare,
    compare_columns,
    detectable_difference,
    groups_with_signal,
    paired_bootstrap_ci,
    paired_permutation_pvalue,
    per_row_metrics,
    ranks_from_records,
    row_keys,
    signal_share,
    verdict,
)


def test_per_row_metrics_by_hand_and_their_means_are_the_metrics():
    m = per_row_metrics([1, 3, 0, 11, None], ks=[1, 10])
    assert m["hr@1"].tolist() == [1, 0, 0, 0, 0]
    assert m["hr@10"].tolist() == [1, 1, 0, 0, 0]  # rank 11 is past the cut-off
    assert m["ndcg@10"].tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]  # 1/log2(2), 1/log2(4)
    ranks = [1, 3, None, 11, 7, 2]
    rows = per_row_metrics([r or 0 for r in ranks], [1, 5, 10])
    for name, value in hr_ndcg(ranks, [1, 5, 10]).items():
        assert rows[name].mean() == pytest.approx(value, abs=1e-15), name
    with pytest.raises(ValueError, match="positive integers"):
        per_row_metrics([1], [0])


def test_ranks_from_records_first_occurrence_and_misses():
    records = [
        {"target": 5, "ranked": [2, 5, 5]},  # first occurrence: 2
        {"target": 4, "ranked": [1, 2]},  # absent: 0
        {"target": 9, "ranked": [9]},
    ]
    assert ranks_from_records(records).tolist() == [2, 0, 1]


def test_bootstrap_of_a_constant_is_the_constant():
    assert bootstrap_ci([0.125] * 50) == (0.125, 0.125, 0.125)


def test_bootstrap_of_two_rows_spans_the_extremes():
    # n = 2 rows {0, 1}: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so
    # the 2.5% and 97.5% quantiles of 2000 resample means are 0 and 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)


def test_bootstrap_matches_the_normal_approximation():
    # 1000 rows, half 1: sd of the mean = sqrt(0.25 / 1000) = 0.0158, so the 95% interval is
    # about 0.5 +- 1.96 * 0.0158 = [0.469, 0.531].
    mean, lo, hi = bootstrap_ci([0.0, 1.0] * 500, n_resamples=4000, seed=1)
    half = 1.96 * math.sqrt(0.25 / 1000)
    assert mean == 0.5
    assert lo == pytest.approx(0.5 - half, abs=0.004) and hi == pytest.approx(0.5 + half, abs=0.004)


def test_bootstrap_is_seeded():
    x = np.random.default_rng(0).random(100)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(x, level=95)


def test_paired_ci_excludes_zero_when_b_is_better_on_every_row_by_a_fixed_amount():
    # a varies a lot between rows; b = a + 1/8 exactly (dyadic values: no rounding).
    a = np.array([0, 1, 0, 0.5, 0.25, 1, 0, 0.75, 0, 0.125] * 3)
    b = a + 0.125
    assert paired_bootstrap_ci(a, b) == (0.125, 0.125, 0.125)
    # Unpaired, the two intervals overlap: only pairing sees that b wins on every row.
    _, _, hi_a = bootstrap_ci(a)
    _, lo_b, _ = bootstrap_ci(b)
    assert lo_b < hi_a
    c = compare(a, b)
    # 30 rows, Monte Carlo: only the all-equal sign vectors reach |sum| = 30/8 (probability
    # 2^-29), so no random sign vector does and p = (1 + 0) / (1 + 2000).
    assert c["p"] == pytest.approx(1 / 2001)
    assert c["verdict"] == "higher"
    assert compare(b, a)["verdict"] == "lower" and compare(b, a)["diff"] == -0.125


def test_paired_ci_contains_zero_for_symmetric_differences():
    a = np.zeros(100)
    b = np.array([0.5, -0.5] * 50)  # d = +-0.5, mean 0
    diff, lo, hi = paired_bootstrap_ci(a, b)
    assert diff == 0 and lo < 0 < hi
    c = compare(a, b)
    assert c["p"] == 1.0  # the observed |sum| is 0: every sign vector reaches it
    assert c["verdict"] == "no difference"
    # n = 2, d = (1, -1): resample means -1, 0, 1 with probability 1/4, 1/2, 1/4.
    assert paired_bootstrap_ci([0, 0], [1, -1]) == (0.0, -1.0, 1.0)


def test_verdict_an_interval_touching_zero_contains_it():
    assert verdict(0.0, 0.2, 0.001) == "no difference" and verdict(-0.2, 0.0, 0.001) == "no difference"
    assert verdict(1e-9, 0.2, 0.001) == "higher"


def test_exact_permutation_enumerated_by_hand():
    # d = (1, 1, 1, -1), observed sum 2. Flip k of the three +1's and f in {0, 1} of the -1:
    # sum = 2 - 2 (k - f), |sum| >= 2 unless k - f = 1, i.e. (k=1, f=0): 3 vectors and
    # (k=2, f=1): 3 vectors. So 16 - 6 = 10 of the 16 sign vectors: p = 10/16.
    assert paired_permutation_pvalue([0, 0, 0, 0], [1, 1, 1, -1], exact=True) == 0.625
    # d = (1, 2, 3, 4): |sum| = 10 only for all + or all -: p = 2/16.
    assert paired_permutation_pvalue([0, 0, 0, 0], [1, 2, 3, 4]) == 0.125
    # Zero differences everywhere: p = 1.
    assert paired_permutation_pvalue([1, 2], [1, 2]) == 1.0


def test_monte_carlo_permutation_approaches_the_exact_value():
    rng = np.random.default_rng(5)
    a, b = rng.random(12), rng.random(12) + 0.2
    exact = paired_permutation_pvalue(a, b, exact=True)
    approx = paired_permutation_pvalue(a, b, n_resamples=20000, exact=False, seed=2)
    assert 0.0 < exact < 1.0
    assert approx == pytest.approx(exact, abs=0.01)
    assert approx == paired_permutation_pvalue(a, b, n_resamples=20000, exact=False, seed=2)  # seeded


def test_compare_columns_is_compare_on_each_metric_with_shared_draws():
    rng = np.random.default_rng(0)
    a = {"hr@10": (rng.random(300) < 0.1) * 1.0, "ndcg@10": rng.random(300) * 0.3}
    b = {"hr@10": (rng.random(300) < 0.2) * 1.0, "ndcg@10": rng.random(300) * 0.3, "extra": np.ones(300)}
    both = compare_columns(a, b, seed=7)
    assert list(both) == ["hr@10", "ndcg@10"]  # metrics present in both only
    for name, c in both.items():
        single = compare(a[name], b[name], seed=7)
        assert {k: c[k] for k in ("diff", "lo", "hi", "p", "mde")} == pytest.approx(
            {k: single[k] for k in ("diff", "lo", "hi", "p", "mde")}
        )
        assert c["verdict"] == single["verdict"]


Z_80 = 1.959964 + 0.841621  # z_0.975 + z_0.8


def test_detectable_difference_by_hand():
    # d = (0.1, 0.3): sd (ddof 1) = 0.1 * sqrt(2), n = 2 -> Z * 0.1 * sqrt(2) / sqrt(2) = 0.1 Z
    assert detectable_difference([0.0, 0.0], [0.1, 0.3]) == pytest.approx(0.1 * Z_80, abs=1e-6)
    # d = +-0.5 on 100 rows: sd = 0.5 * sqrt(100 / 99); four times the rows halves it (about)
    small = detectable_difference(np.zeros(100), np.array([0.5, -0.5] * 50))
    assert small == pytest.approx(Z_80 * 0.5 * math.sqrt(100 / 99) / 10, abs=1e-6)
    large = detectable_difference(np.zeros(400), np.array([0.5, -0.5] * 200))
    assert large == pytest.approx(Z_80 * 0.5 * math.sqrt(400 / 399) / 20, abs=1e-6)
    # a higher power or a stricter level needs a larger difference
    assert detectable_difference(np.zeros(100), np.array([0.5, -0.5] * 50), power=0.9) > small
    assert detectable_difference(np.zeros(100), np.array([0.5, -0.5] * 50), level=0.99) > small
    # nothing to estimate the spread from: one row, or the same difference on every row
    assert detectable_difference([0.0], [1.0]) is None
    assert detectable_difference([0.0, 1.0], [0.25, 1.25]) is None
    assert detectable_difference(np.zeros((3, 2)), np.array([[0, 1], [0.5, 1], [1, 1]])) == [
        pytest.approx(0.5 * Z_80 / math.sqrt(3), abs=1e-6),
        None,
    ]
    assert compare(np.zeros(100), np.array([0.5, -0.5] * 50))["mde"] == small


def test_a_true_difference_of_the_mde_is_found_four_times_in_five():
    # 400 simulated comparisons of 100 rows with d ~ N(delta, 1), delta = the mde of sd 1:
    # the paired interval should exclude 0 in about 80% of them (binomial sd 2%).
    rng = np.random.default_rng(0)
    delta = Z_80 / math.sqrt(100)
    found = 0
    for i in range(400):
        d = rng.normal(delta, 1.0, size=100)
        _, lo, hi = paired_bootstrap_ci(np.zeros(100), d, n_resamples=500, seed=i)
        found += lo > 0
    assert 0.74 < found / 400 < 0.86
    # and at half the mde, far less often
    found_half = sum(
        paired_bootstrap_ci(np.zeros(100), rng.normal(delta / 2, 1.0, size=100), n_resamples=500, seed=i)[1] > 0
        for i in range(400)
    )
    assert found_half / 400 < 0.45


def test_misaligned_rows_are_an_error():
    sft = [{"user_id": 1, "target": 10, "history": [3]}, {"user_id": 2, "target": 11, "history": [4]}]
    pop = [{"user_id": 2, "target": 11, "history": [4]}, {"user_id": 1, "target": 10, "history": [3]}]
    check_aligned(row_keys(sft), row_keys(sft), "sft", "sft")
    with pytest.raises(RereError, match=r"not evaluated on the same rows: row 0 is \(1, 10, \(3,\)\) in sft"):
        check_aligned(row_keys(sft), row_keys(pop), "sft", "pop")
    with pytest.raises(RereError, match="sft has 2 evaluated rows but pop has 1"):
        check_aligned(row_keys(sft), row_keys(pop[:1]), "sft", "pop")
    with pytest.raises(RereError, match="differ in shape"):
        paired_bootstrap_ci([0.0, 1.0], [1.0])


def test_signal_share_and_groups_with_signal_from_a_hand_built_trainer_log():
    # 4 groups per step. Step 1: all 4 groups have equal rewards; step 2: 1 of 4 has signal;
    # step 3: 2 of 4; step 4: none. Groups with signal: 0 + 1 + 2 + 0 = 3 of 16.
    log = [
        {"step": 3, "frac_reward_zero_std": 0.5, "loss": 0.1},
        {"step": 1, "frac_reward_zero_std": 1.0},
        {"step": 2, "frac_reward_zero_std": 0.75},
        {"step": 2, "valid/ndcg@10": 0.02},  # periodic evaluation: no frac, ignored
        {"step": 4, "frac_reward_zero_std": 1.0},
        {"train_runtime": 3.0},
    ]
    steps, shares = signal_share(log)
    assert steps == [1, 2, 3, 4] and shares == [0.0, 0.25, 0.5, 0.0]
    assert groups_with_signal(shares, 4) == {"steps": 4, "groups": 16, "with_signal": 3, "share": 3 / 16}
    assert groups_with_signal(shares, [4, 4, 2, 4])["with_signal"] == 2  # per-step counts: 0 + 1 + 1 + 0
    # 1 - 0.7 = 0.30000000000000004 in floats: 10 groups * that is 3 groups, not 4 or 2.
    assert groups_with_signal([1 - 0.7], 10)["with_signal"] == 3
    with pytest.raises(RereError, match="not a whole number of groups"):
        groups_with_signal(shares, 3)  # 3 * 0.25 groups: the group count is wrong
    with pytest.raises(ValueError, match="4 steps"):
        groups_with_signal(shares, [4, 4])


def test_doctests():
    assert doctest.testmod(rere.stats).failed == 0
