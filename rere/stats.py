"""Confidence intervals and paired tests over evaluation rows, and the RL signal share.

Every evaluated row has one target, so a metric is a mean over rows of a per-row value
(rere.metrics): with r_i the 1-based rank of row i's target (0: not ranked),

    hr@K_i   = [1 <= r_i <= K]
    ndcg@K_i = [1 <= r_i <= K] / log2(r_i + 1)

and HR@K / NDCG@K are the means of these arrays. This module works on those arrays:

- `bootstrap_ci`: percentile bootstrap over rows. Draw B resamples of n row indices with
  replacement, take each resample's mean, and report the (1-level)/2 and (1+level)/2
  quantiles of the B means (numpy's default linear interpolation).
- `paired_bootstrap_ci`: the same on d_i = b_i - a_i. Resampling the row indices jointly for
  both methods is resampling d, so one row's two values always travel together.
- `paired_permutation_pvalue`: paired sign-flip permutation test of H0 "the two methods are
  exchangeable on every row". Under H0 each d_i is as likely to be -d_i, so the statistic
  T(s) = |sum_i s_i d_i| for random signs s_i in {-1, +1} gives the null distribution and
      p = (1 + #{b : T(s_b) >= T(1)}) / (1 + B)        (Monte Carlo, two-sided, +1 correction)
      p = #{s in {-1,1}^n : T(s) >= T(1)} / 2^n        (exact: every sign vector, n <= 16)
  The +1 counts the observed data as one of the permutations, so p is never 0.
- `detectable_difference`: the sensitivity of a paired comparison, the smallest true
  difference it finds with probability 0.8 (see there): the size a "no difference" speaks
  against.
- `signal_share` / `groups_with_signal`: TRL's `frac_reward_zero_std` is the share of a
  step's groups whose G rewards are all equal (zero std: zero advantage, no gradient from
  the reward). 1 - frac is the share with signal; groups with signal in a run
      = sum over steps s of groups_s * (1 - frac_s).

All random draws come from np.random.default_rng(seed): the same call gives the same
numbers. Draws are made in blocks of rows x resamples, so 5,000 rows x 2,000 resamples
take a few tens of milliseconds and a few MB.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from statistics import NormalDist

import numpy as np

from rere import RereError

N_RESAMPLES = 2000  # bootstrap resamples and Monte Carlo sign flips
LEVEL = 0.95
POWER = 0.8  # of the minimum detectable difference
EXACT_MAX_ROWS = 16  # 2^16 = 65,536 sign vectors: still instant
_BLOCK_CELLS = 2_000_000  # resamples x rows drawn at once (16 MB of int64)


# ---------------------------------------------------------------------------------------------
# Per-row metrics from predictions.jsonl records


def row_keys(records: Sequence[dict]) -> list[tuple]:
    """The identity of each evaluated row: (user_id, target, history). Two methods can be
    compared row by row only when these are equal in the same order.

    >>> row_keys([{"user_id": 7, "target": 3, "history": [1, 2], "ranked": [3]}])
    [(7, 3, (1, 2))]
    """
    return [(r["user_id"], int(r["target"]), tuple(int(x) for x in r.get("history", ()))) for r in records]


def ranks_from_records(records: Sequence[dict]) -> np.ndarray:
    """1-based rank of each row's target in its `ranked` list (first occurrence), 0 when absent.

    >>> ranks_from_records([{"target": 5, "ranked": [2, 5, 9]}, {"target": 4, "ranked": [1]}])
    array([2, 0])
    """
    out = np.zeros(len(records), dtype=np.int64)
    for i, r in enumerate(records):
        target = int(r["target"])
        for position, item in enumerate(r["ranked"], 1):
            if int(item) == target:
                out[i] = position
                break
    return out


def per_row_metrics(ranks: Sequence[int] | np.ndarray, ks: Iterable[int]) -> dict[str, np.ndarray]:
    """hr@K and ndcg@K per row (float arrays of len(ranks)); rank 0 (or None) is a miss.

    hr@K_i = [1 <= r_i <= K],  ndcg@K_i = [1 <= r_i <= K] / log2(r_i + 1).

    >>> m = per_row_metrics([1, 3, 0, 11], ks=[10])
    >>> m["hr@10"].tolist(), m["ndcg@10"].tolist()
    ([1.0, 1.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0])
    """
    r = np.array([0 if x is None else x for x in ranks], dtype=np.int64)
    if (r < 0).any():
        raise ValueError("ranks are 1-based (0 or None: not ranked); got a negative rank")
    out: dict[str, np.ndarray] = {}
    for k in sorted(set(ks)):
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"cut-offs must be positive integers, got {k!r}")
        hit = (r >= 1) & (r <= k)
        out[f"hr@{k}"] = hit.astype(np.float64)
        gain = np.zeros(len(r), dtype=np.float64)
        gain[hit] = 1.0 / np.log2(r[hit] + 1.0)
        out[f"ndcg@{k}"] = gain
    return out


def check_aligned(keys_a: Sequence, keys_b: Sequence, name_a: str = "a", name_b: str = "b") -> None:
    """Raise RereError unless both methods evaluated the same rows in the same order.

    >>> check_aligned([(1, 2)], [(1, 2)])  # same rows: nothing happens
    """
    if len(keys_a) != len(keys_b):
        raise RereError(
            f"{name_a} has {len(keys_a)} evaluated rows but {name_b} has {len(keys_b)}; a paired comparison needs "
            "the same rows (same split, evaluate.max_rows and seed for both)."
        )
    for i, (ka, kb) in enumerate(zip(keys_a, keys_b, strict=True)):
        if ka != kb:
            raise RereError(
                f"{name_a} and {name_b} were not evaluated on the same rows: row {i} is {ka} in {name_a} but {kb} "
                f"in {name_b}; re-run both evaluations with the same split, evaluate.max_rows and seed."
            )


# ---------------------------------------------------------------------------------------------
# Bootstrap and permutation


def _as_rows(values, name: str = "values") -> np.ndarray:
    """Per-row values as float64, shape (n,) or (n, m) (m metrics of the same rows)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"{name}: need per-row values of shape (n,) or (n, m) with n >= 1, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: per-row values must be finite")
    return x


def bootstrap_means(values, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Means of `n_resamples` resamples (n rows drawn with replacement) of `values`.

    values: (n,) or (n, m); returns (B,) or (B, m). The m columns share the same resamples.
    Each block of resamples is turned into row counts (B_block, n), and the means are
    counts @ values / n: one matrix product for every metric at once.
    """
    x = _as_rows(values)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // n)
    dtype = np.int32 if n * block < 2**31 else np.int64
    out = np.empty((n_resamples, *x.shape[1:]), dtype=np.float64)
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n), dtype=dtype)  # (b, n) row indices
        idx += (np.arange(b, dtype=dtype) * n)[:, None]  # resample j's rows -> cells j*n .. j*n+n-1
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)  # (b, n)
        out[start : start + b] = counts @ x / n  # (b,) or (b, m)
    return out


def bootstrap_ci(values, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL):
    """(mean, lo, hi): the mean of `values` and its percentile-bootstrap `level` interval.

    lo, hi = quantiles (1-level)/2 and (1+level)/2 of the means of `n_resamples` resamples
    of the rows with replacement. A constant array has lo = hi = its value. For values of
    shape (n, m), three arrays of shape (m,) (every column on the same resamples).

    >>> bootstrap_ci([0.25, 0.25, 0.25])
    (0.25, 0.25, 0.25)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = _as_rows(values)
    means = bootstrap_means(x, n_resamples, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    if x.ndim == 1:
        return float(x.mean()), float(lo), float(hi)
    return x.mean(axis=0), lo, hi


def paired_differences(a, b) -> np.ndarray:
    """d_i = b_i - a_i, after checking both are per-row arrays of the same shape."""
    xa, xb = _as_rows(a, "a"), _as_rows(b, "b")
    if xa.shape != xb.shape:
        raise RereError(f"paired arrays differ in shape ({xa.shape} vs {xb.shape}): not the same rows.")
    return xb - xa


def paired_bootstrap_ci(a, b, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL):
    """(mean(b - a), lo, hi): the paired difference and its percentile-bootstrap interval.

    Rows are resampled jointly (one index picks both a_i and b_i), i.e. the bootstrap of
    d_i = b_i - a_i. If b beats a by c on every row, every resample's mean is c: lo = hi = c.

    >>> paired_bootstrap_ci([0.0, 0.5, 1.0], [0.25, 0.75, 1.25])
    (0.25, 0.25, 0.25)
    """
    return bootstrap_ci(paired_differences(a, b), n_resamples, seed, level)


def paired_permutation_pvalue(a, b, n_resamples: int = N_RESAMPLES, seed: int = 0, exact: bool | None = None):
    """Two-sided paired sign-flip permutation p-value of mean(b - a) = 0.

    T(s) = |sum_i s_i d_i|, d = b - a. Exact (all 2^n sign vectors; the default when
    n <= EXACT_MAX_ROWS): p = #{s : T(s) >= T(1)} / 2^n. Otherwise `n_resamples` random sign
    vectors: p = (1 + #{T(s_b) >= T(1)}) / (1 + n_resamples). Ties within 1e-9 relative count
    as >= (float sums of the same numbers in another order). For (n, m) inputs, an (m,)
    array (every column on the same sign vectors).

    >>> paired_permutation_pvalue([0, 0, 0, 0], [1, 2, 3, 4])  # only s = +-1 reach |sum| = 10
    0.125
    """
    d = paired_differences(a, b)
    n = d.shape[0]
    if exact is None:
        exact = n <= EXACT_MAX_ROWS
    observed = np.abs(d.sum(axis=0))
    tol = 1e-9 * np.maximum(1.0, np.abs(d).sum(axis=0))
    if exact:
        if n > 24:
            raise ValueError(f"exact permutation over 2^{n} sign vectors is too many; use exact=False")
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # (2^n, n)
        p = (np.abs(signs @ d) >= observed - tol).sum(axis=0) / len(signs)
    else:
        rng = np.random.default_rng(seed)
        block = max(1, _BLOCK_CELLS // n)
        count = np.zeros(d.shape[1:], dtype=np.int64)
        for start in range(0, n_resamples, block):
            b = min(block, n_resamples - start)
            signs = rng.integers(0, 2, size=(b, n), dtype=np.int8).astype(np.float64) * 2.0 - 1.0  # (b, n)
            count += (np.abs(signs @ d) >= observed - tol).sum(axis=0)
        p = (1 + count) / (1 + n_resamples)
    return float(p) if d.ndim == 1 else np.asarray(p, dtype=np.float64)


def detectable_difference(a, b, level: float = LEVEL, power: float = POWER):
    """The minimum detectable difference of a paired comparison of these rows: the smallest
    true |mean(b - a)| that a two-sided test at significance 1 - level finds with probability
    `power`, in the normal approximation with the spread the per-row differences show,

        mde = (z_{(1+level)/2} + z_{power}) * sd(d) / sqrt(n),   d = b - a, sd with ddof 1.

    It is the comparison's sensitivity, not a test: a "no difference" with mde 0.006 says a
    true difference of 0.006 or more would have been found 4 times in 5, and nothing about
    smaller ones. None when there is nothing to estimate the spread from (n < 2, or d the
    same on every row). For (n, m) inputs, a list of m values.

    >>> round(detectable_difference([0, 0, 0], [0, 0.5, 1.0]), 6)  # sd(d) 0.5: 2.801585 * 0.5 / sqrt(3)
    0.808748
    """
    if not 0 < level < 1 or not 0 < power < 1:
        raise ValueError(f"level and power must be in (0, 1), got {level} and {power}")
    d = paired_differences(a, b)
    n = d.shape[0]
    z = NormalDist().inv_cdf((1 + level) / 2) + NormalDist().inv_cdf(power)
    sd = d.std(axis=0, ddof=1) if n > 1 else np.zeros(d.shape[1:])
    mde = [None if s == 0 else float(z * s / math.sqrt(n)) for s in np.atleast_1d(sd)]
    return mde[0] if d.ndim == 1 else mde


def compare(a, b, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """Paired comparison of method b with reference a on the same rows (1-d per-row arrays).

    Returns diff = mean(b - a), lo / hi (paired bootstrap interval), p (sign-flip
    permutation), mde (`detectable_difference`), and verdict: "higher" / "lower" when the
    interval excludes 0 and p < 1 - level, "no difference" when the interval contains 0,
    "borderline" when the two disagree.

    >>> c = compare([0.0] * 8, [0.25] * 8)  # better on all 8 rows: p = 2 / 2^8 (exact)
    >>> c["diff"], c["lo"], c["hi"], c["p"], c["verdict"]
    (0.25, 0.25, 0.25, 0.0078125, 'higher')
    >>> compare([0.0] * 4, [0.25] * 4)["verdict"]  # 4 rows cannot reach p < 0.05 (2 / 2^4)
    'borderline'
    """
    diff, lo, hi = paired_bootstrap_ci(a, b, n_resamples, seed, level)
    p = paired_permutation_pvalue(a, b, n_resamples, seed)
    mde = detectable_difference(a, b, level)
    return {"diff": diff, "lo": lo, "hi": hi, "p": p, "mde": mde, "verdict": verdict(lo, hi, p, 1 - level)}


def compare_columns(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, dict]:
    """`compare` for every metric of two methods on the same rows, with shared resamples:
    {metric: {"diff", "lo", "hi", "p", "mde", "verdict"}} for the metrics in both."""
    names = [k for k in a if k in b]
    xa = np.column_stack([a[k] for k in names])  # (n, m)
    xb = np.column_stack([b[k] for k in names])  # (n, m)
    diff, lo, hi = paired_bootstrap_ci(xa, xb, n_resamples, seed, level)
    p = paired_permutation_pvalue(xa, xb, n_resamples, seed)
    mde = detectable_difference(xa, xb, level)
    return {
        k: {"diff": float(diff[j]), "lo": float(lo[j]), "hi": float(hi[j]), "p": float(p[j]), "mde": mde[j],
            "verdict": verdict(float(lo[j]), float(hi[j]), float(p[j]), 1 - level)}
        for j, k in enumerate(names)
    }  # fmt: skip


def verdict(lo: float, hi: float, p: float, alpha: float = 1 - LEVEL) -> str:
    """The word the report writes for a difference with interval [lo, hi] and p-value p.

    >>> verdict(-0.1, 0.2, 0.4), verdict(0.01, 0.2, 0.01), verdict(-0.3, -0.1, 0.001), verdict(0.01, 0.2, 0.07)
    ('no difference', 'higher', 'lower', 'borderline')
    """
    if lo <= 0 <= hi:
        return "no difference"
    if p >= alpha:
        return "borderline"
    return "higher" if lo > 0 else "lower"


# ---------------------------------------------------------------------------------------------
# RL: the share of groups whose rewards are not all equal

ZERO_STD_KEY = "frac_reward_zero_std"  # TRL GRPOTrainer: share of the step's groups with reward std 0


def signal_share(records: Sequence[dict]) -> tuple[list[int], list[float]]:
    """(steps, 1 - frac_reward_zero_std) of the RL log dicts that carry TRL's value, in step order.

    >>> signal_share([{"step": 2, "frac_reward_zero_std": 0.75}, {"step": 1, "frac_reward_zero_std": 1.0},
    ...               {"step": 3, "loss": 0.1}])
    ([1, 2], [0.0, 0.25])
    """
    points = sorted(
        (int(r["step"]), 1.0 - float(r[ZERO_STD_KEY]))
        for r in records
        if "step" in r and isinstance(r.get(ZERO_STD_KEY), int | float) and math.isfinite(r[ZERO_STD_KEY])
    )
    return [s for s, _ in points], [v for _, v in points]


def groups_with_signal(shares: Sequence[float], groups_per_step: int | Sequence[int]) -> dict:
    """Total groups and groups with signal over a run.

    with_signal = sum_s round(groups_s * share_s): TRL's share is a count of groups over the
    step's groups, so groups_s * share_s is a whole number up to float rounding; a value that
    is not within 1e-6 of one means groups_per_step is wrong, and is an error.

    >>> groups_with_signal([0.0, 0.25, 0.5], 4)
    {'steps': 3, 'groups': 12, 'with_signal': 3, 'share': 0.25}
    """
    sizes = [groups_per_step] * len(shares) if isinstance(groups_per_step, int) else list(groups_per_step)
    if len(sizes) != len(shares):
        raise ValueError(f"{len(shares)} steps with a share but {len(sizes)} group counts")
    signal = 0
    for step, (g, share) in enumerate(zip(sizes, shares, strict=True)):
        count = g * share
        if abs(count - round(count)) > 1e-6:
            raise RereError(
                f"logged step {step + 1}: signal share {share} of {g} groups is {count}, not a whole number of "
                "groups; the number of groups per step is not what the run used."
            )
        signal += round(count)
    total = int(sum(sizes))
    return {"steps": len(shares), "groups": total, "with_signal": signal, "share": signal / total if total else 0.0}
