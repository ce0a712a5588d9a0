"""The results table, a Markdown/HTML report and its figures, read back from a run's files.

    rere report --results results --models models --benchmarks benchmarks --out results

Reads, for every (dataset, method) the config lists (`sft`, each `rl.variants` entry, each
`baselines.methods` entry):
- `results/<dataset>/<method>/metrics.json` (written by `rere evaluate` / `rere baseline`)
  and its `predictions.jsonl` (one ranked list per evaluated row) for the per-row metrics
  behind every confidence interval and paired comparison (rere.stats);
- `models/<dataset>/<variant>/trainer_log.jsonl` (one JSON log dict per line, with `step`,
  `reward` or `rewards/<fn>/mean`, `kl`, `loss`, TRL's `frac_reward_zero_std`) for the RL
  curves and the share of groups with signal; the number of groups per step comes from the
  same folder's `rollouts.jsonl` (one line per group), else its `config.yaml`;
- `data/<dataset>/stats.json` (`train_from: valid` for a D3 import with
  `missing_train: use_valid`) for the header's warnings;
- Snakemake's benchmark TSVs under `benchmarks/` (columns `s` = wall time in seconds and
  `max_rss` = peak resident memory in MB) for the per-stage time and memory.

With `seeds: [S, ...]` every `<dataset>/` above is `<dataset>/seed-<S>/` for each seed (the
workflow trains and evaluates each seed there), and the report reads every seed's folders.

Writes `table.csv` (one row per dataset and method, each HR@K/NDCG@K with its 95% CI; with
`seeds`, one per dataset, seed and method), `comparisons.csv` (every paired comparison, every
metric; with `seeds`, within each seed and, as seed `pooled`, on the per-row metrics averaged
over the seeds), with `seeds` `seeds.csv` (each metric's mean and
spread across seeds), `report.md`, `report.html` and `figures/*.png`. A missing piece (no RL
run, no benchmarks under DVC, no predictions.jsonl) is left out with a note in the report,
never an error; only a run with no metrics at all is refused, and so are predictions that
disagree with their metrics.json or with another method's rows (a paired comparison of
different rows would be meaningless).
"""

from __future__ import annotations

import csv
import html
import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rere import RereError, stats
from rere.data.splits import later_id_larger
from rere.io import atomic_path, read_json, read_jsonl, read_resolved_config, read_split
from rere.machine import summary

log = logging.getLogger(__name__)

REFERENCE_METHOD = "rere"  # the RL variant whose gain the report states
SELECTION_K = 10  # the best baseline is the one with the highest NDCG@10 (else NDCG at the largest K)


def add_arguments(parser) -> None:
    parser.add_argument("--results", default="results", help="folder with <dataset>/<method>/metrics.json")
    parser.add_argument(
        "--models", default="models", help="folder with <dataset>/<variant>/trainer_log.jsonl (RL curves)"
    )
    parser.add_argument(
        "--benchmarks", default="benchmarks", help="Snakemake benchmark TSVs (time and memory per stage)"
    )
    parser.add_argument(
        "--data", default="data", help="folder with <dataset>/stats.json (whether train was copied from valid)"
    )
    parser.add_argument("--out", default="results", help="where table.csv, report.md, report.html and figures/ go")


# ---------------------------------------------------------------------------------------------
# Reading the run's files
# ---------------------------------------------------------------------------------------------


def methods_of(config: dict) -> list[tuple[str, str]]:
    """(method, kind) in report order: SFT, the RL variants, then the classic baselines."""
    return (
        [("sft", "sft")]
        + [(v, "rl") for v in config["rl"]["variants"]]
        + [(b, "baseline") for b in config["baselines"]["methods"]]
    )


def seeds_of(config: dict) -> list[int | None]:
    """The training seeds whose runs the report reads: each of `seeds`, or [None] for the one
    run of `seed` (whose folders have no seed level)."""
    return list(config["seeds"]) if config["seeds"] else [None]


def run_dir(root: Path, dataset: str, seed: int | None) -> Path:
    """Where one seed's methods of `dataset` lie under results/ or models/.

    >>> run_dir(Path("results"), "ml100k", None).as_posix(), run_dir(Path("results"), "ml100k", 43).as_posix()
    ('results/ml100k', 'results/ml100k/seed-43')
    """
    return root / dataset if seed is None else root / dataset / f"seed-{seed}"


POOLED = "pooled"  # the `seed` of the comparisons of per-row metrics averaged over the seeds


def run_name(dataset: str, seed: int | str | None) -> str:
    """How the report names one seed's run of a dataset: `ml100k`, `ml100k/seed-43`, or
    `ml100k/pooled` for the seeds pooled."""
    if seed == POOLED:
        return f"{dataset}/{POOLED}"
    return dataset if seed is None else f"{dataset}/seed-{seed}"


def invalid_rate(metrics: dict) -> float | None:
    """Share of generated items that were not distinct catalogue items, as `rere evaluate`
    counts it (`invalid_rate`, checked against the index's code table, not the trie); None
    (shown "n/a") for a baseline, which ranks catalogue ids and generates nothing. Older
    files without the key: `invalid` / (rows * num_beams).

    >>> invalid_rate({"invalid_rate": 0.25, "rows": 10, "num_beams": 5})
    0.25
    >>> invalid_rate({"invalid_rate": None, "rows": 4}) is None
    True
    >>> invalid_rate({"invalid": 3, "rows": 10, "num_beams": 5})
    0.06
    """
    if "invalid_rate" in metrics:
        value = metrics["invalid_rate"]
        return None if value is None else float(value)
    rows = metrics.get("rows") or 0
    if not rows:
        return 0.0
    per_row = metrics.get("num_beams") or 1
    return float(metrics.get("invalid", 0)) / (rows * per_row)


def read_row_metrics(folder: Path, ks: list[int], metrics: dict) -> tuple[list[tuple], dict[str, np.ndarray]] | None:
    """(row keys, per-row hr@K / ndcg@K arrays) from `folder/predictions.jsonl`; None without one.

    The per-row means must give metrics.json's values back (to 1e-9): otherwise the two files
    come from different runs and the intervals would describe another evaluation.
    """
    path = folder / "predictions.jsonl"
    if not path.is_file():
        return None
    records = read_jsonl(path)
    if not records:
        raise RereError(f"{path} is empty; re-run the evaluation of {folder.name}.")
    per_row = stats.per_row_metrics(stats.ranks_from_records(records), ks)
    for name, values in per_row.items():
        if name in metrics and abs(float(values.mean()) - float(metrics[name])) > 1e-9:
            raise RereError(
                f"{path}: the rows give {name} = {values.mean():.6f} but metrics.json says {float(metrics[name]):.6f}; "
                "the two files come from different runs. Re-run the evaluation of this method."
            )
    return stats.row_keys(records), per_row


def results_table(results: Path, config: dict) -> tuple[list[dict], list[str], dict]:
    """One row per (dataset, seed, method) with a metrics.json (seed None without `seeds`),
    each metric with its 95% bootstrap CI (`<metric>_lo`, `<metric>_hi`; None without
    predictions.jsonl); notes for the missing ones; and the per-row metrics
    {(dataset, seed, method): (row keys, {metric: array})}."""
    ks = sorted(set(config["evaluate"]["ks"]))
    columns = metric_columns(config)
    rows, notes, per_row = [], [], {}
    for dataset, seed in itertools.product(config["datasets"], seeds_of(config)):
        for method, kind in methods_of(config):
            where = f"{run_name(dataset, seed)}/{method}"
            path = run_dir(results, dataset, seed) / method / "metrics.json"
            if not path.is_file():
                notes.append(f"{where}: no {path} (not run yet?), left out.")
                continue
            metrics = read_json(path)
            row: dict[str, Any] = {"dataset": dataset, "seed": seed, "method": method, "kind": kind}
            for k in ks:
                for name in (f"hr@{k}", f"ndcg@{k}"):
                    if name not in metrics:
                        raise RereError(f"{path}: no '{name}'; re-run the stage with evaluate.ks containing {k}.")
                    row[name] = float(metrics[name])
            row["invalid_rate"] = invalid_rate(metrics)
            # share of the selection-K list already in the row's history (rere.metrics.repeat_share)
            repeat = metrics.get(f"repeat@{selection_metric(columns).split('@')[1]}")
            row["repeat"] = float(repeat) if isinstance(repeat, int | float) else None
            row["throughput"] = float(metrics["throughput"]) if "throughput" in metrics else None
            row["rows"] = int(metrics.get("rows", 0))
            # where it was trained and evaluated (rere.machine), for the header; not table columns
            row["trained_on"], row["evaluated_on"] = summary(metrics.get("trained_on")), summary(metrics.get("machine"))
            for name, value in metrics.items():  # validation metrics, if the stage recorded any
                if name.startswith(("valid_", "best_valid_")) and isinstance(value, int | float):
                    row.setdefault(name.removeprefix("best_"), float(value))
            found = read_row_metrics(path.parent, ks, metrics)
            if found is None:
                notes.append(f"{where}: no predictions.jsonl next to metrics.json, so no CI.")
                row.update({f"{c}_{end}": None for c in columns for end in ("lo", "hi")})
            else:
                per_row[(dataset, seed, method)] = found
                _, lo, hi = stats.bootstrap_ci(np.column_stack([found[1][c] for c in columns]), seed=config["seed"])
                for j, c in enumerate(columns):
                    row[f"{c}_lo"], row[f"{c}_hi"] = float(lo[j]), float(hi[j])
            rows.append(row)
    return rows, notes, per_row


def metric_columns(config: dict) -> list[str]:
    ks = sorted(set(config["evaluate"]["ks"]))
    return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]


def selection_metric(columns: list[str]) -> str:
    """NDCG@10 when it is computed, else NDCG at the largest cut-off.

    >>> selection_metric(["hr@5", "hr@10", "ndcg@5", "ndcg@10"]), selection_metric(["hr@1", "ndcg@1", "ndcg@5"])
    ('ndcg@10', 'ndcg@5')
    """
    wanted = f"ndcg@{SELECTION_K}"
    if wanted in columns:
        return wanted
    return max((c for c in columns if c.startswith("ndcg@")), key=lambda c: int(c.split("@")[1]))


def headline_metrics(columns: list[str]) -> list[str]:
    """HR and NDCG at the selection cut-off: what the report's gain table shows."""
    k = selection_metric(columns).split("@")[1]
    return [f"hr@{k}", f"ndcg@{k}"]


def relative_gain(value: float, reference: float) -> float | None:
    """(value - reference) / reference; None when the reference is 0.

    >>> relative_gain(0.12, 0.10)
    0.2
    >>> relative_gain(0.1, 0.0) is None
    True
    """
    if reference == 0:
        return None
    return round((value - reference) / reference, 12)


def best_baseline(rows: list[dict], metric: str) -> tuple[dict | None, str]:
    """The classic baseline with the highest `metric` on the validation split when every
    baseline's metrics.json records it (`valid_<metric>`), else on the evaluated split; and
    how it was chosen. The config's order breaks ties. A reference line, not a tuned choice.
    """
    baselines = [r for r in rows if r["kind"] == "baseline"]
    if not baselines:
        return None, ""
    key = f"valid_{metric}"
    if all(key in r for r in baselines):
        return max(baselines, key=lambda r: r[key]), f"best by validation {metric.upper()}"
    return max(baselines, key=lambda r: r[metric]), f"best by {metric.upper()} on the evaluated split"


def comparisons(rows: list[dict], per_row: dict, columns: list[str], seed: int) -> tuple[list[dict], dict]:
    """Paired comparisons per dataset (and, with `seeds`, within each seed: a seed's methods
    against that seed's SFT and best baseline): every RL variant and baseline against SFT, and
    every method (SFT included) against the best baseline, on every metric column. `seed`
    seeds the bootstrap and permutation draws.

    The RL variants are also compared with each other (role "variant": each against every
    variant before it in rl.variants), the design-space comparison.

    Each line: dataset, seed (None without `seeds`), method, reference, role ("sft" | "best
    baseline" | "variant"), metric, value, reference_value, diff = value - reference_value, relative, and
    from rere.stats.compare_columns lo / hi (paired bootstrap 95% CI of diff), p (paired
    sign-flip permutation), mde (the difference the comparison finds 80% of the time) and
    verdict; those five are None when either method has no predictions.jsonl. Rows are
    checked to be the same (same users, targets and histories in the same order) before any
    comparison.
    Also returns {run_name: (best baseline method, how it was chosen)}, run_name being the
    dataset, or `<dataset>/seed-<S>` with `seeds`.
    """
    out, best_of = [], {}
    sel = selection_metric(columns)
    for dataset, trained in dict.fromkeys((r["dataset"], r["seed"]) for r in rows):
        name = run_name(dataset, trained)
        ds_rows = [r for r in rows if (r["dataset"], r["seed"]) == (dataset, trained)]
        by_method = {r["method"]: r for r in ds_rows}
        best, how = best_baseline(ds_rows, sel)
        if best is not None:
            best_of[name] = (best["method"], how)
        pairs = []
        if "sft" in by_method:
            pairs += [(r, by_method["sft"], "sft") for r in ds_rows if r["kind"] != "sft"]
        if best is not None:
            pairs += [(r, best, "best baseline") for r in ds_rows if r["method"] != best["method"]]
        # the design space: each RL variant against each one before it in the config
        rl_rows = [r for r in ds_rows if r["kind"] == "rl"]
        pairs += [(r, ref, "variant") for i, r in enumerate(rl_rows) for ref in rl_rows[:i]]
        for row, ref, role in pairs:
            a, b = per_row.get((dataset, trained, ref["method"])), per_row.get((dataset, trained, row["method"]))
            if a is not None and b is not None:
                stats.check_aligned(a[0], b[0], f"{name}/{ref['method']}", f"{name}/{row['method']}")
                tested = stats.compare_columns(a[1], b[1], seed=seed)
            else:
                tested = {}
            for col in columns:
                t = tested.get(col, {})
                out.append(
                    {
                        "dataset": dataset,
                        "seed": trained,
                        "method": row["method"],
                        "reference": ref["method"],
                        "role": role,
                        "metric": col,
                        "value": row[col],
                        "reference_value": ref[col],
                        "diff": row[col] - ref[col],
                        "relative": relative_gain(row[col], ref[col]),
                        "lo": t.get("lo"),
                        "hi": t.get("hi"),
                        "p": t.get("p"),
                        "mde": t.get("mde"),
                        "verdict": t.get("verdict"),
                    }
                )
    return out, best_of


def across_seeds(rows: list[dict], config: dict) -> list[dict]:
    """Per (dataset, method) and metric column, over the seeds that have its metrics.json:
    n_seeds, mean, std (sample standard deviation, ddof 1; None for one seed), min and max.
    Config order of datasets, methods and columns.

    >>> config = {"datasets": {"d": {}}, "rl": {"variants": {}}, "baselines": {"methods": []},
    ...           "evaluate": {"ks": [10]}}
    >>> rows = [{"dataset": "d", "method": "sft", "kind": "sft", "hr@10": h, "ndcg@10": n}
    ...         for h, n in [(0.1, 0.02), (0.2, 0.04)]]
    >>> [(a["metric"], a["n_seeds"], round(a["mean"], 6), round(a["std"], 6)) for a in across_seeds(rows, config)]
    [('hr@10', 2, 0.15, 0.070711), ('ndcg@10', 2, 0.03, 0.014142)]
    """
    out = []
    for dataset, (method, kind) in itertools.product(config["datasets"], methods_of(config)):
        found = [r for r in rows if (r["dataset"], r["method"]) == (dataset, method)]
        if not found:
            continue
        for col in metric_columns(config):
            x = np.array([r[col] for r in found], dtype=np.float64)  # (n_seeds,)
            out.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "kind": kind,
                    "metric": col,
                    "n_seeds": len(x),
                    "mean": float(x.mean()),
                    "std": float(x.std(ddof=1)) if len(x) > 1 else None,
                    "min": float(x.min()),
                    "max": float(x.max()),
                }
            )
    return out


SEEDS_COLUMNS = ["dataset", "method", "kind", "metric", "n_seeds", "mean", "std", "min", "max"]


def mean_rows(spread: list[dict], columns: list[str]) -> list[dict]:
    """across_seeds' lines as one row per method, its mean per column and min / max as the
    `<metric>_lo` / `<metric>_hi` that plot_metric_bars draws."""
    out: dict[str, dict] = {}
    for a in spread:
        if a["metric"] in columns:
            row = out.setdefault(a["method"], {"method": a["method"]})
            row[a["metric"]], row[f"{a['metric']}_lo"], row[f"{a['metric']}_hi"] = a["mean"], a["min"], a["max"]
    return list(out.values())


def pool_seeds(rows: list[dict], per_row: dict, config: dict) -> tuple[list[dict], dict, list[str]]:
    """The seeds pooled, as one more run per dataset (seed `POOLED`) for `comparisons`: each
    method that has per-row metrics from every seed, on the same rows, gets the per-row metrics
    averaged over the seeds (so its row value is the mean over seeds, and a paired comparison
    of two pooled methods tests their difference averaged over the training randomness of
    those seeds); validation metrics are averaged too, for the choice of the best baseline.
    Returns (rows, per-row metrics, notes for the methods or datasets left out).

    >>> rows = [{"dataset": "d", "seed": s, "method": "sft", "kind": "sft", "ndcg@10": v, "rows": 2}
    ...         for s, v in [(1, 0.5), (2, 0.25)]]
    >>> per_row = {("d", 1, "sft"): ([1, 2], {"ndcg@10": np.array([1.0, 0.0])}),
    ...            ("d", 2, "sft"): ([1, 2], {"ndcg@10": np.array([0.5, 0.0])})}
    >>> config = {"datasets": {"d": {}}, "seeds": [1, 2], "rl": {"variants": {}}, "baselines": {"methods": []}}
    >>> pooled, pooled_rows, notes = pool_seeds(rows, per_row, config)
    >>> pooled[0]["seed"], pooled[0]["ndcg@10"], pooled_rows[("d", "pooled", "sft")][1]["ndcg@10"].tolist(), notes
    ('pooled', 0.375, [0.75, 0.0], [])
    """
    seeds = seeds_of(config)
    out_rows, out_per_row, notes = [], {}, []
    for dataset in config["datasets"]:
        found = {}  # method -> [(row, (keys, per-row metrics)) per seed]
        for method, _ in methods_of(config):
            by_seed = [
                (r, per_row.get((dataset, r["seed"], method)))
                for r in rows
                if (r["dataset"], r["method"]) == (dataset, method)
            ]
            have = [x for x in by_seed if x[1] is not None]
            if len(have) == len(seeds):
                found[method] = have
            elif by_seed:
                notes.append(
                    f"{run_name(dataset, POOLED)}/{method}: per-row results for {len(have)} of {len(seeds)} seeds, "
                    "not pooled."
                )
        keys = [k for have in found.values() for _, (k, _) in have]
        if any(k != keys[0] for k in keys):
            notes.append(
                f"{run_name(dataset, POOLED)}: the seeds were evaluated on different rows, so no seed-pooled comparison."
            )
            continue
        for method, have in found.items():
            first = have[0][0]
            names = have[0][1][1].keys()
            metrics = {n: np.mean([m[n] for _, (_, m) in have], axis=0) for n in names}  # (rows,)
            row = {"dataset": dataset, "seed": POOLED, "method": method, "kind": first["kind"], "rows": first["rows"]}
            row.update({n: float(v.mean()) for n, v in metrics.items()})
            valid = [k for k in first if k.startswith("valid_") and all(k in r for r, _ in have)]
            row.update({k: float(np.mean([r[k] for r, _ in have])) for k in valid})
            out_rows.append(row)
            out_per_row[(dataset, POOLED, method)] = (keys[0], metrics)
    return out_rows, out_per_row, notes


def rows_differ_across_seeds(per_row: dict) -> list[str]:
    """Notes for each seed whose evaluated rows are not the first seed's rows of the same dataset
    (then the spread across seeds also holds the choice of rows, not only training)."""
    first: dict[str, tuple] = {}
    notes: dict[tuple, str] = {}  # one per (dataset, seed)
    for (dataset, trained, method), (keys, _) in per_row.items():
        ref_seed, ref_keys = first.setdefault(dataset, (trained, keys))
        if trained != ref_seed and keys != ref_keys:
            notes.setdefault(
                (dataset, trained),
                f"{run_name(dataset, trained)}/{method} was evaluated on other rows than "
                f"{run_name(dataset, ref_seed)}: the spread across seeds also holds the choice of rows.",
            )
    return list(notes.values())


def read_trainer_log(path: Path) -> list[dict]:
    """trainer_log.jsonl -> the log dicts that carry a `step` (bad lines are errors naming the line)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RereError(f"{path}: line {line_no}: not valid JSON ({exc.msg}).") from None
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def curve(records: list[dict], quantity: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `reward` or `kl` from RL log dicts, in step order.

    reward: the `reward` key, else the sum of the per-function means `rewards/<fn>/mean`
    (GRPO's total reward is their sum with unit weights); kl: the `kl` key.

    >>> curve([{"step": 2, "kl": 0.5}, {"step": 1, "kl": 0.1}, {"step": 3, "loss": 1}], "kl")
    ([1.0, 2.0], [0.1, 0.5])
    >>> curve([{"step": 1, "rewards/rule/mean": 0.25, "rewards/ranking/mean": -0.5}], "reward")
    ([1.0], [-0.25])
    """
    points = []
    for r in records:
        if quantity == "reward":
            if "reward" in r:
                value = r["reward"]
            else:
                parts = [v for k, v in sorted(r.items()) if k.startswith("rewards/") and k.endswith("/mean")]
                value = sum(parts) if parts else None
        else:
            value = r.get(quantity)
        if isinstance(value, int | float) and math.isfinite(value):
            points.append((float(r["step"]), float(value)))
    points.sort(key=lambda p: p[0])
    return [p[0] for p in points], [p[1] for p in points]


def groups_per_step(folder: Path, n_steps: int, config: dict) -> tuple[list[int] | int, str]:
    """How many groups (prompts, each with G completions) each of an RL run's `n_steps`
    logged steps trained on, and where that number comes from.

    1. `rollouts.jsonl` (one line per trained group, with its step): exact, step by step,
       used when it has as many steps as the log has `frac_reward_zero_std` values.
    2. The run's own resolved `config.yaml`: rl.batch_prompts per step, exact for one
       process (TRL's batch is per process: N processes train N x batch_prompts groups).
    3. The report's config, with the same caveat.
    """
    rollouts = folder / "rollouts.jsonl"
    if rollouts.is_file():
        counts: dict[int, int] = {}
        for record in read_jsonl(rollouts):
            if "step" in record:
                counts[int(record["step"])] = counts.get(int(record["step"]), 0) + 1
        if len(counts) == n_steps:
            return [counts[k] for k in sorted(counts)], "counted per step in rollouts.jsonl"
    run_config = read_resolved_config(folder)
    if run_config is not None:
        prompts = (run_config.get("rl") or {}).get("batch_prompts")
        if isinstance(prompts, int):
            return prompts, "rl.batch_prompts of the run's config.yaml (one process)"
    return int(config["rl"]["batch_prompts"]), "rl.batch_prompts of the report's config (one process)"


def rl_signal(folder: Path, records: list[dict], config: dict) -> dict | None:
    """Per-step share of groups with signal (rewards not all equal) and the run's totals.

    groups with signal = sum over logged steps s of groups_s * (1 - frac_reward_zero_std_s)
    (rere.stats.groups_with_signal). None when the log has no `frac_reward_zero_std`.
    """
    steps, shares = stats.signal_share(records)
    if not steps:
        return None
    sizes, source = groups_per_step(folder, len(steps), config)
    total = stats.groups_with_signal(shares, sizes)
    decoded = [
        r["rollout/decoded_prompts"] for r in records if isinstance(r.get("rollout/decoded_prompts"), int | float)
    ]
    return {
        "steps": steps,
        "shares": shares,
        "source": source,
        "groups_per_step": sizes if isinstance(sizes, int) else None,
        "decoded": round(sum(decoded)) if decoded else None,
        **{k: total[k] for k in ("groups", "with_signal", "share")},
    }


# What each RL run was trained with, from its own resolved config.yaml. The budget keys set
# how many prompts a run sees and which groups it trains on: every variant of one comparison
# must share them, or the comparison is not like for like.
RL_BUDGET_KEYS = (
    "num_generations", "max_steps", "batch_prompts", "filter_groups", "filter_max_prompts",
    "prompt_pool", "max_train_rows", "processes",
)  # fmt: skip
RL_SETTING_KEYS = ("sampling", "reward", "loss", *RL_BUDGET_KEYS, "learning_rate", "beta")


def rl_settings(folder: Path, variant: str) -> dict | None:
    """The run's RL settings (RL_SETTING_KEYS) from `folder/config.yaml`; None without one.
    A key the run's config does not have (an older run) is None."""
    run_config = read_resolved_config(folder)
    if run_config is None:
        return None
    rl = run_config.get("rl") or {}
    chosen = {**rl, **((rl.get("variants") or {}).get(variant) or {})}
    chosen["processes"] = ((run_config.get("launch") or {}).get("processes") or {}).get("rl")
    return {k: chosen.get(k) for k in RL_SETTING_KEYS}


def budget_differences(settings: Sequence[dict]) -> list[str]:
    """The RL_BUDGET_KEYS whose values are not the same in all of `settings`.

    >>> budget_differences([{"max_steps": 30, "beta": 0.1}, {"max_steps": 30, "beta": 0.0}])
    []
    >>> budget_differences([{"max_steps": 30, "prompt_pool": "all"}, {"max_steps": 60, "prompt_pool": "all"}])
    ['max_steps']
    """
    return [k for k in RL_BUDGET_KEYS if len({json.dumps(s.get(k)) for s in settings}) > 1]


def read_benchmarks(folder: Path) -> list[dict]:
    """Snakemake benchmark TSVs -> [{"job", "stage", "seconds", "max_rss_mb"}], sorted by job.

    The job is the TSV's path under `folder` without `.tsv` (e.g. `sft/ml100k`), its first
    part the stage. With `repeat()` a file holds several lines: the mean time and the
    largest peak memory are kept. Unmeasured values ("-", "NA") become None.
    """
    out = []
    for path in sorted(folder.rglob("*.tsv")) if folder.is_dir() else []:
        with open(path, encoding="utf-8", newline="") as f:
            lines = list(csv.DictReader(f, delimiter="\t"))
        if not lines or "s" not in lines[0]:
            log.warning("%s: not a Snakemake benchmark file (no 's' column), skipped.", path)
            continue
        seconds = [_number(line.get("s")) for line in lines]
        rss = [_number(line.get("max_rss")) for line in lines]
        seconds = [s for s in seconds if s is not None]
        rss = [m for m in rss if m is not None]
        job = path.relative_to(folder).with_suffix("").as_posix()
        out.append(
            {
                "job": job,
                "stage": job.split("/")[0],
                "seconds": sum(seconds) / len(seconds) if seconds else None,
                "max_rss_mb": max(rss) if rss else None,
            }
        )
    return out


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg: no display needed)
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rl_curves(runs: dict[str, list[dict]], title: str, path: Path) -> bool:
    """Reward and KL against step, one line per RL variant. False when nothing to draw."""
    series = {q: {v: curve(recs, q) for v, recs in runs.items()} for q in ("reward", "kl")}
    if not any(steps for q in series.values() for steps, _ in q.values()):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (quantity, by_variant) in zip(axes, series.items(), strict=True):
        for variant, (steps, values) in by_variant.items():
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=variant)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean reward" if quantity == "reward" else "KL to reference")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_metric_bars(
    rows: list[dict], columns: list[str], title: str, path: Path, bars: str = "bars: 95% bootstrap CI"
) -> None:
    """Grouped bars: one group per metric column, one bar per method, with error bars from
    `<metric>_lo` to `<metric>_hi` where the row has them (the 95% CI, or what `bars` says)."""
    plt = _pyplot()
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(columns) * max(len(rows), 1) * 0.5), 3.8))
    for i, row in enumerate(rows):
        xs = [c + i * width for c in range(len(columns))]
        values = [row[c] for c in columns]
        yerr = None
        if all(row.get(f"{c}_lo") is not None for c in columns):
            # Clamped at 0: the mean of equal values can fall one ulp below their min (pop, the same
            # for every seed), and a percentile interval need not contain its point estimate.
            yerr = [[max(0.0, v - row[f"{c}_lo"]) for c, v in zip(columns, values, strict=True)],  # below
                    [max(0.0, row[f"{c}_hi"] - v) for c, v in zip(columns, values, strict=True)]]  # fmt: skip
        ax.bar(xs, values, width=width, label=row["method"], yerr=yerr, capsize=2)
    ax.set_xticks([c + width * (len(rows) - 1) / 2 for c in range(len(columns))], [c.upper() for c in columns])
    ax.set_ylabel(f"score ({bars})")
    ax.set_title(title)
    ax.legend(fontsize="small", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_signal(signal: dict[str, dict], title: str, path: Path) -> None:
    """Share of a step's groups whose rewards are not all equal, per step, one line per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for variant, sig in signal.items():
        ax.plot(sig["steps"], sig["shares"], marker="o" if len(sig["steps"]) < 40 else None, label=variant)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("groups with signal\n(1 - frac_reward_zero_std)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stages(bench: list[dict], path: Path) -> None:
    """Wall time (s) and peak memory (MB) per job, side by side."""
    plt = _pyplot()
    jobs = [b["job"] for b in bench]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(jobs) + 1.5), sharey=True)
    for ax, key, label in zip(
        axes, ("seconds", "max_rss_mb"), ("wall time (s)", "peak memory, max RSS (MB)"), strict=True
    ):
        ax.barh(jobs, [b[key] or 0.0 for b in bench])
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # first job on top
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The report: one list of blocks rendered twice (Markdown and HTML)
# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", header, rows))

    def image(self, src: str, alt: str) -> None:
        self.blocks.append(("image", src, alt))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            if block[0] == "heading":
                out.append("#" * block[1] + " " + block[2])
            elif block[0] == "para":
                out.append(block[1])
            elif block[0] == "table":
                header, rows = block[1], block[2]
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("\n".join(lines))
            else:
                out.append(f"![{block[2]}]({block[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        esc = html.escape
        body = []
        for block in self.blocks:
            if block[0] == "heading":
                body.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
            elif block[0] == "para":
                body.append(f"<p>{esc(block[1])}</p>")
            elif block[0] == "table":
                head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            else:
                body.append(f'<p><img src="{esc(block[1])}" alt="{esc(block[2])}"></p>')
        style = (
            "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
            "img{max-width:100%}"
        )
        return (
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
        )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _setting(value: Any) -> str:
    """A config value as YAML writes it: 1e-05 stays 1e-05, true stays true."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


def headline_comparisons(tested: list[dict], variants: list[str], metric: str) -> list[dict]:
    """The comparisons the report states in words: each RL variant against SFT, SFT and each
    RL variant against the best baseline, and the RL variants against each other, on the
    selection metric."""
    return [
        c
        for c in tested
        if c["metric"] == metric
        and (
            (c["role"] in ("sft", "variant") and c["method"] in variants)
            or (c["role"] == "best baseline" and c["method"] in ["sft", *variants])
        )
    ]


def _diff_ci(c: dict) -> str:
    """`+0.0016 [-0.0019, +0.0053]`, or the bare difference without an interval."""
    if c["lo"] is None:
        return f"{c['diff']:+.4f} [n/a]"
    return f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"


def _with_ci(row: dict, col: str) -> str:
    if row.get(f"{col}_lo") is None:
        return _fmt(row[col])
    return f"{row[col]:.4f} [{row[f'{col}_lo']:.4f}, {row[f'{col}_hi']:.4f}]"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


VERDICT_SHOWN = {"higher": "higher *", "lower": "lower *", "no difference": "no difference", "borderline": "borderline"}


def _verdict(c: dict) -> str:
    return "n/a (no predictions)" if c["verdict"] is None else VERDICT_SHOWN[c["verdict"]]


def _mde(c: dict) -> str:
    return "n/a" if c.get("mde") is None else f"±{c['mde']:.4f}"


def _mde_said(c: dict) -> str:
    """After a "no difference": the size of difference the comparison would have found."""
    if c["verdict"] != "no difference" or c.get("mde") is None:
        return ""
    return f" (a true difference of {c['mde']:.4f} either way would be found 4 times in 5)"


def report_across_seeds(report: Report, spread: list[dict], shown: list[str]) -> None:
    """The "Across seeds" section: mean ± std of the headline metrics per dataset and method."""
    report.heading("Across seeds")
    report.para(
        "Mean ± sample standard deviation (ddof 1) over the seeds with results, on the same data, index and "
        "evaluated rows: the spread is the training randomness (initialisation, SFT and RL order, sampling). "
        "seeds.csv has every metric with its min and max."
    )
    by = {(a["dataset"], a["method"], a["metric"]): a for a in spread}
    lines = list(dict.fromkeys((a["dataset"], a["method"]) for a in spread))

    def cell(a: dict) -> str:
        return f"{a['mean']:.4f} (one seed)" if a["std"] is None else f"{a['mean']:.4f} ± {a['std']:.4f}"

    report.table(
        ["dataset", "method", "seeds", *[m.upper() for m in shown]],
        [[d, m, str(by[(d, m, shown[0])]["n_seeds"]), *[cell(by[(d, m, c)]) for c in shown]] for d, m in lines],
    )


TIE_RULES = {"shuffle": "in a seeded order", "file": "in the source file's order"}
TIE_SOURCE = {"file": "ties: file, the source file's order"}


def id_ordered(order: dict) -> bool:
    """Whether stats.json's `same_time_order` shows same-time events in raw id order: among the
    same-time pairs, the later item has the larger id in at most 40% or at least 60%, and at
    least 4 standard errors (of a binomial share) from the 50% of an order that says nothing
    about the ids.

    >>> id_ordered({"pairs": 11799, "later_id_larger": 0.8}), id_ordered({"pairs": 49724, "later_id_larger": 0.501})
    (True, False)
    >>> id_ordered({"pairs": 90, "later_id_larger": 0.95}), id_ordered({"pairs": 120, "later_id_larger": 0.65})
    (True, False)
    >>> id_ordered({"pairs": 50000, "later_id_larger": 0.55})  # 22 standard errors, but a tilt, not an order
    False
    >>> id_ordered({"pairs": 2, "later_id_larger": 1.0}), id_ordered({}), id_ordered({"pairs": 0, "later_id_larger": None})
    (False, False, False)
    """
    n, x = order.get("pairs") or 0, order.get("later_id_larger")
    if not n or x is None:
        return False
    return abs(x - 0.5) >= 0.1 and abs(x - 0.5) * 2 * n**0.5 >= 4


def data_warnings(data: Path, config: dict) -> list[str]:
    """Header lines about what a dataset's splits are (from its stats.json): a D3 import whose
    train split is a copy of valid (`missing_train: use_valid`, recorded as `train_from:
    valid`), and how a user's same-time events were ordered (`ties`, `same_time_pairs`): a
    warning for raw item id order, which a model can learn, a note otherwise."""
    out = []
    for dataset, ds in config["datasets"].items():
        path = data / dataset / "stats.json"
        stats = read_json(path) if path.is_file() else {}
        train_from = stats.get("train_from")
        ties, share = stats.get("ties"), stats.get("same_time_pairs")
        order = stats.get("same_time_order") or {}
        # a D3 import (no `ties`): its rows' order, or the seeded one of d3_ties: shuffle
        imported = (
            "in a seeded order (d3_ties: shuffle)"
            if stats.get("d3_ties") == "shuffle"
            else "as the imported rows have them"
        )
        if id_ordered(order):
            out.append(
                f"Warning ({dataset}): {share:.0%} of a user's consecutive events share their timestamp, and in "
                f"{order['later_id_larger']:.0%} of those {order['pairs']:,} pairs the later item has the larger raw "
                f"item id ({imported if ties is None else TIE_SOURCE.get(ties, f'ties: {ties}')}, {path}). That order comes from the source's "
                "files or ids, not from the users, and a sequential model can learn it: "
                + (
                    "read this dataset's figures with that in mind."
                    if ties is None
                    else "rebuild the data with ties: shuffle."
                )
            )
        elif share and ties == "item_id":
            out.append(
                f"Warning ({dataset}): {share:.0%} of a user's consecutive events share their timestamp and are "
                f"ordered by raw item id (ties: item_id, {path}). Inside such a run the next item always has the "
                "larger raw id, which a sequential model can learn and no user behaviour explains; rebuild the "
                "data with ties: shuffle."
            )
        elif share and (ties in TIE_RULES or ties is None):
            rule = f"{TIE_RULES[ties]} (ties: {ties})" if ties else imported
            out.append(
                f"Note ({dataset}): {share:.0%} of a user's consecutive events share their timestamp; they are {rule}."
            )
        if train_from == "valid":
            out.append(
                f"Warning ({dataset}): train.csv is a copy of valid.csv (missing_train: use_valid, {path}). "
                "Every model trained on the validation rows, so early stopping, SFT's validation loss and the "
                "baselines' grid search ran on data the model trained on: validation numbers are optimistic and "
                "model selection is not clean. The test split is still unseen."
            )
        elif train_from is None and (ds or {}).get("source") == "d3" and (ds or {}).get("missing_train") == "use_valid":
            out.append(
                f"Warning ({dataset}): the config allows missing_train: use_valid and there is no {path} to "
                "say whether train.csv was copied from valid; if it was, early stopping and grid search ran on "
                "data the model trained on."
            )
    return out


def same_time_flags(path: Path) -> dict[tuple, tuple[bool, bool | None] | None] | None:
    """Per row key of the split file at `path` (user, target, history): `(same, larger)`, whether
    the target has the timestamp of the row's last history item, and whether the target's raw id
    is larger than that item's (`later_id_larger`, as stats.json's `same_time_order` counts it; None
    without both raw ids). None for a key whose rows disagree; None without the file.

    Same-time rows are where same-time events sit (same second on MovieLens, same day on Amazon
    reviews): often consumed together, in an order within the timestamp that the data's ties
    rule, not the user, decided; when that rule is the source's id order, `larger` is what a
    model can learn from it.
    """
    if not path.is_file():
        return None
    flag: dict[tuple, tuple[bool, bool | None] | None] = {}
    for r in read_split(path):
        key = (str(r["user_id"]), int(r["item_id"]), tuple(int(x) for x in r["history_item_id"]))
        same = bool(r["history_timestamp"]) and int(r["timestamp"]) == int(r["history_timestamp"][-1])
        last, target = (str(r["item_asins"][-1]) if r["item_asins"] else ""), str(r["item_asin"])
        larger = later_id_larger(last, target) if last and target else None
        if flag.setdefault(key, (same, larger)) != (same, larger):
            flag[key] = None
    return flag


def same_time_mask(
    flags: dict[tuple, tuple[bool, bool | None] | None] | None, keys: list[tuple]
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Per evaluated row (`stats.row_keys` of its predictions): its `same_time_flags` as two
    masks, same time and target raw id larger (None when a same-time row has no raw ids). None
    without the split file, or when a row is not in it or is ambiguous."""
    if flags is None:
        return None
    found = [flags.get((str(u), t, h)) for u, t, h in keys]
    if any(f is None for f in found):
        return None
    same = np.array([f[0] for f in found], dtype=bool)
    if any(f[1] is None for f in found if f[0]):
        return same, None
    return same, np.array([bool(f[1]) for f in found], dtype=bool)


def same_time_comparisons(
    per_row: dict, runs: list[tuple[str, Any]], data: Path, split: str, metric: str, seed: int
) -> tuple[list[dict], list[str]]:
    """Every method against SFT on `metric`, separately on the rows whose target shares the
    last history item's timestamp and on the others (paired, `stats.compare`), for each run
    (dataset, seed) with an SFT and both kinds of rows; where the split has raw ids, also on the
    same-time rows split by whether the target's raw id is larger than the last history item's
    (`id_larger`, `id_not_larger`). Returns the lines and notes."""
    out, notes, flags = [], [], {}
    for dataset, trained in runs:
        sft = per_row.get((dataset, trained, "sft"))
        if sft is None:
            continue
        path = data / dataset / f"{split}.csv"
        if dataset not in flags:  # one read of the split per dataset, for all its seeds
            flags[dataset] = same_time_flags(path)
        masks = same_time_mask(flags[dataset], sft[0])
        if masks is None:
            notes.append(f"{run_name(dataset, trained)}: no {path} matching the evaluated rows, no same-time split.")
            continue
        mask, larger = masks
        if mask.all() or not mask.any():
            continue
        parts = [("same_time", mask), ("other", ~mask)]
        if larger is not None and (mask & larger).any() and (mask & ~larger).any():
            parts += [("id_larger", mask & larger), ("id_not_larger", mask & ~larger)]
        for (d, t, method), (keys, values) in per_row.items():
            if (d, t) != (dataset, trained) or method == "sft":
                continue
            stats.check_aligned(sft[0], keys, f"{run_name(d, t)}/sft", f"{run_name(d, t)}/{method}")
            line = {"dataset": dataset, "seed": trained, "method": method, "reference": "sft", "metric": metric}
            for part, m in parts:
                c = stats.compare(sft[1][metric][m], values[metric][m], seed=seed)
                line[part] = {
                    **c,
                    "rows": int(m.sum()),
                    "value": float(values[metric][m].mean()),
                    "reference_value": float(sft[1][metric][m].mean()),
                }
            out.append(line)
    return out, notes


def report_row_split(
    report: Report,
    lines: list[dict],
    parts: tuple[str, str],
    labels: tuple[str, str],
    metric: str,
    seeded: bool,
    say: Callable[[str, int, int], str],
) -> None:
    """Two parts of the rows (`same_time_comparisons`' keys `parts`), each method against SFT on
    `metric` in both: one paragraph per set of runs with the same rows (`say(names, n_first,
    n_second)` writes it), then one table."""
    first, second = parts
    counted: dict[tuple, list[str]] = {}
    for c in lines:
        names = counted.setdefault((c["dataset"], c[first]["rows"], c[second]["rows"]), [])
        if run_name(c["dataset"], c["seed"]) not in names:
            names.append(run_name(c["dataset"], c["seed"]))
    for (_, n_first, n_second), names in counted.items():
        report.para(say(", ".join(names), n_first, n_second))
    report.table(
        ["dataset", *(["seed"] if seeded else []), "method", "vs",
         *(x for label in labels for x in (f"{label}: {metric.upper()}", "difference [95% CI]", "verdict"))],
        [
            [c["dataset"], *([str(c["seed"])] if seeded else []), c["method"], c["reference"],
             *(x for part in parts for x in (
                 f"{_fmt(c[part]['value'])} vs {_fmt(c[part]['reference_value'])}", _diff_ci(c[part]),
                 _verdict(c[part])))]
            for c in lines
        ],
    )  # fmt: skip


def machines_line(rows: list[dict]) -> str:
    """The header line naming the machines the methods were trained and evaluated on
    (`results_table`'s `trained_on` / `evaluated_on`, rere.machine): floats differ between CPU
    kinds. With more than one machine for a role, each is followed by the runs that used it."""
    seen: dict[str, dict[str, list[str]]] = {"trained on": {}, "evaluated on": {}}
    for row in rows:
        where = f"{run_name(row['dataset'], row['seed'])}/{row['method']}"
        for role, key in (("trained on", "trained_on"), ("evaluated on", "evaluated_on")):
            seen[role].setdefault(row[key], []).append(where)
    parts = []
    for role, machines in seen.items():
        if len(machines) == 1:
            parts.append(f"{role} {next(iter(machines))}")
        elif machines:
            parts.append(f"{role} " + "; ".join(f"{m} ({', '.join(w)})" for m, w in sorted(machines.items())))
    return (
        "Machines: " + "; ".join(parts) + ". Runs on one kind of machine reproduce to the last digit; another CPU "
        "(other torch CPU kernels) rounds differently, and trained models drift apart."
    )


TABLE_TAIL = ["invalid_rate", "repeat", "throughput", "rows"]


def table_columns(columns: list[str]) -> list[str]:
    """Each metric followed by its 95% CI bounds: hr@1, hr@1_lo, hr@1_hi, ...

    >>> table_columns(["hr@1", "ndcg@1"])
    ['hr@1', 'hr@1_lo', 'hr@1_hi', 'ndcg@1', 'ndcg@1_lo', 'ndcg@1_hi']
    """
    return [name for c in columns for name in (c, f"{c}_lo", f"{c}_hi")]


def write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            writer.writerow(
                ["" if r[h] is None else (f"{r[h]:.6f}" if isinstance(r[h], float) else r[h]) for h in header]
            )


def _with_seed(header: list[str], seeded: bool) -> list[str]:
    """A CSV header with a `seed` column after `dataset` when the run has `seeds`."""
    return [header[0], "seed", *header[1:]] if seeded else header


def write_table(path: Path, rows: list[dict], columns: list[str], seeded: bool = False) -> None:
    # a baseline generates nothing, so its invalid rate is not 0 but not applicable
    rows = [{**r, "invalid_rate": "n/a" if r["invalid_rate"] is None else r["invalid_rate"]} for r in rows]
    write_csv(path, _with_seed(["dataset", "method", "kind", *table_columns(columns), *TABLE_TAIL], seeded), rows)


COMPARISON_COLUMNS = [
    "dataset", "method", "reference", "role", "metric", "value", "reference_value", "diff", "lo", "hi", "p",
    "verdict", "relative", "mde",
]  # fmt: skip


def build(config: dict, results: Path, models: Path, benchmarks: Path, out: Path, data: Path | None = None) -> dict:
    """Write table.csv, comparisons.csv, report.md, report.html and figures/ under `out`;
    return what was found. `data` (default: `data` next to `results`) holds each dataset's
    stats.json."""
    rows, notes, per_row = results_table(results, config)
    if not rows and config["seeds"]:
        raise RereError(
            f"no metrics.json under {results}/<dataset>/seed-<S>/ for the configured datasets, methods and seeds; "
            "run the pipeline first (Snakemake: `dvc repro` runs `seed` only and writes no seed folders)."
        )
    if not rows:
        raise RereError(
            f"no metrics.json under {results} for the configured datasets and methods; run the pipeline first."
        )
    data = Path(data) if data is not None else results.parent / "data"
    columns = metric_columns(config)
    seed = config["seed"]
    seeded = bool(config["seeds"])
    sel = selection_metric(columns)
    tested, best_of = comparisons(rows, per_row, columns, seed)
    spread = across_seeds(rows, config) if seeded else []
    if seeded:
        notes += rows_differ_across_seeds(per_row)
    if len(seeds_of(config)) > 1:
        pooled_rows, pooled_per_row, pool_notes = pool_seeds(rows, per_row, config)
        pooled_tested, pooled_best = comparisons(pooled_rows, pooled_per_row, columns, seed)
        tested, best_of, notes = tested + pooled_tested, best_of | pooled_best, notes + pool_notes
        per_row = per_row | pooled_per_row

    report = Report()
    report.heading("rere results", 1)
    trained = f"seed: {seed}"
    if seeded:
        trained = f"seeds: {', '.join(map(str, config['seeds']))} (data and index built with seed {seed})"
    report.para(
        f"Split: {config['evaluate']['split']}; beams: {config['evaluate']['num_beams']}; "
        f"{trained}. HR@K and NDCG@K over all evaluated rows, full catalogue."
    )
    report.para(machines_line(rows))
    for warning in data_warnings(data, config):
        report.para(warning)
    report.para(
        f"[lo, hi]: 95% percentile-bootstrap interval over the evaluated rows ({stats.N_RESAMPLES} resamples, "
        f"seed {seed}). Differences are paired (the same rows for both methods, resampled jointly); p is a "
        f"two-sided paired sign-flip permutation test ({stats.N_RESAMPLES} sign vectors, exact for at most "
        f"{stats.EXACT_MAX_ROWS} rows). "
        + (
            "Intervals and tests are per seed (a seed's methods against that seed's SFT and best baseline): they "
            "cover the choice of test rows; the spread across seeds (Across seeds, seeds.csv) is the training "
            "randomness. Seed `pooled`: each method's per-row metrics averaged over the seeds (methods with "
            "results from every seed on the same rows), then the same paired tests: the difference of the two "
            "methods averaged over the seeds' training runs, its interval over the rows. No correction for the "
            "number of comparisons."
            if seeded
            else "One seed per method: the intervals cover the choice of test rows, not training randomness; no "
            "correction for the number of comparisons."
        )
    )
    report.heading("Results")
    report.table(
        ["dataset", *(["seed"] if seeded else []), "method", *[c.upper() for c in columns], "invalid",
         f"in history@{selection_metric(columns).split('@')[1]}", "rows/s",
         "rows"],
        [
            [
                r["dataset"],
                *([str(r["seed"])] if seeded else []),
                r["method"],
                *[_with_ci(r, c) for c in columns],
                _fmt(r["invalid_rate"]),
                _fmt(r["repeat"]),
                _fmt(r["throughput"], 1),
                str(r["rows"]),
            ]
            for r in rows
        ],
    )  # fmt: skip
    report.para(
        f"in history@{sel.split('@')[1]}: the share of the first {sel.split('@')[1]} recommendations that are items of "
        "the row's own history (nothing is excluded from the ranking; on data where users do not repeat an item, "
        "each such slot is a miss)."
    )
    if seeded:
        report_across_seeds(report, spread, headline_metrics(columns))

    report.heading("Relative gain of ReRe and the other methods, with paired 95% CIs")
    shown = headline_metrics(columns)
    for name, (method, how) in best_of.items():
        report.para(
            f"{name}: the best baseline is {method} ({how}). "
            + (
                "It is picked on the split the table reports, so it is a reference line, not a tuned choice."
                if "evaluated split" in how
                else "It is picked on the validation split."
            )
        )
    for c in headline_comparisons(tested, list(config["rl"]["variants"]), sel):
        ratio = "" if not c["reference_value"] else f" ({c['value'] / c['reference_value']:.2f}x)"
        report.para(
            f"{run_name(c['dataset'], c['seed'])}: {c['method']} - {c['reference']} on {sel.upper()} = "
            f"{_diff_ci(c)}{ratio}, p = {_p(c['p'])}: {_verdict(c)}{_mde_said(c)}."
        )
    table = [c for c in tested if c["metric"] in shown]
    if table:
        report.table(
            ["dataset", *(["seed"] if seeded else []), "method", "vs", "metric", "value", "reference",
             "difference [95% CI]", "relative", "p", "verdict", "detectable"],
            [
                [c["dataset"], *([str(c["seed"])] if seeded else []), c["method"],
                 c["reference"] + (" (best baseline)" if c["role"] == "best baseline" else ""), c["metric"].upper(),
                 _fmt(c["value"]), _fmt(c["reference_value"]), _diff_ci(c), _pct(c["relative"]), _p(c["p"]),
                 _verdict(c), _mde(c)]
                for c in table
            ],
        )  # fmt: skip
        report.para(
            'Marked *: significant at 5% (the paired 95% CI excludes 0 and p < 0.05). "no difference": the CI contains 0. '
            '"borderline": the CI excludes 0 but p >= 0.05. detectable (mde in comparisons.csv): the smallest '
            "true difference this comparison finds 4 times in 5 (two-sided 5% test, normal approximation with the "
            'spread of the per-row differences); a "no difference" speaks against differences of that size, '
            "not against smaller ones. Every metric is in comparisons.csv."
        )
    else:
        report.para("No SFT or baseline to compare with.")

    split = config["evaluate"]["split"]
    # every run, each seed's and the seeds pooled: a pooled gain may sit in some seeds only
    runs = list(dict.fromkeys((d, t) for d, t, _ in per_row))
    by_time, time_notes = same_time_comparisons(per_row, runs, data, split, sel, seed)
    notes += time_notes
    # the same-time rows against the others, then the same-time rows split by raw id order
    row_splits = [
        ("Rows whose target shares the last history item's timestamp", 2, by_time,
         ("same_time", "other"), ("same time", "other rows"),
         lambda names, n, m: (
             f"{names}: {n} of {n + m} {split} rows ({n / (n + m):.0%}) have a target with the timestamp of "
             "the row's last history item (the same second on MovieLens, the same day on Amazon reviews): "
             "such events are often consumed together, and their order within the timestamp is the data's "
             f"(header), not the user's. Each method against SFT on {sel.upper()}, on those rows and on the "
             "others, paired."
         )),
        ("Same-time rows by raw item id order", 3, [c for c in by_time if "id_larger" in c],
         ("id_larger", "id_not_larger"), ("larger id", "not larger"),
         lambda names, n, m: (
             f"{names}: of those same-time {split} rows, {n} ({n / (n + m):.0%}) have a target whose raw "
             "item id is larger than the last history item's. Where the data put same-time events in raw "
             "id order (header), a model can learn that order; a gain over SFT that sits only on the "
             f"larger-id rows is that order, not the users. {sel.upper()} against SFT on each part, paired."
         )),
    ]  # fmt: skip
    for heading, level, lines, parts, labels, say in row_splits:
        if lines:
            report.heading(heading, level)
            report_row_split(report, lines, parts, labels, sel, seeded, say)

    bench = read_benchmarks(benchmarks)
    with atomic_path(out / "figures") as fig_dir:
        fig_dir.mkdir()
        report.heading("RL: groups with signal")
        report.para(
            "A GRPO group (one prompt, G completions) moves the policy only when its rewards are not all equal: "
            "with equal rewards every advantage is 0. Per step, TRL logs frac_reward_zero_std, the share of the "
            "step's groups with reward std 0. Groups with signal = sum over steps of groups per step x "
            "(1 - frac_reward_zero_std)."
        )
        for dataset in config["datasets"]:
            runs, signal = {}, {}  # by line label: the variant, and with `seeds` its seed
            for trained, variant in itertools.product(seeds_of(config), config["rl"]["variants"]):
                label = variant if trained is None else f"{variant} seed {trained}"
                folder = run_dir(models, dataset, trained) / variant
                log_path = folder / "trainer_log.jsonl"
                where = f"{run_name(dataset, trained)}/{variant}"
                if log_path.is_file():
                    runs[label] = read_trainer_log(log_path)
                    sig = rl_signal(folder, runs[label], config)
                    if sig is not None:
                        signal[label] = {**sig, "seed": trained, "variant": variant}
                    else:
                        notes.append(f"{where}: {log_path} has no frac_reward_zero_std, no signal share.")
                else:
                    notes.append(f"{where}: no {log_path}, no RL curve.")
            if signal:
                report.table(
                    ["dataset", *(["seed"] if seeded else []), "variant", "steps", "groups", "with signal", "share",
                     "groups decoded", "groups per step from"],
                    [
                        [dataset, *([str(sig["seed"])] if seeded else []), sig["variant"], str(len(sig["steps"])),
                         str(sig["groups"]), str(sig["with_signal"]), f"{sig['share']:.3f}", _fmt(sig["decoded"]),
                         sig["source"]]
                        for sig in signal.values()
                    ],
                )  # fmt: skip
                plot_signal(signal, f"{dataset}: share of groups with signal", fig_dir / f"signal_{dataset}.png")
                report.image(f"figures/signal_{dataset}.png", f"share of RL groups with signal per step on {dataset}")
            settings = {}  # by (seed, variant)
            for trained, variant in itertools.product(seeds_of(config), config["rl"]["variants"]):
                found = rl_settings(run_dir(models, dataset, trained) / variant, variant)
                if found is not None:
                    settings[trained, variant] = found
            if settings:
                report.para(f"{dataset}: RL settings of each run, from its own config.yaml.")
                report.table(
                    ["dataset", *(["seed"] if seeded else []), "variant", *RL_SETTING_KEYS],
                    [
                        [dataset, *([str(trained)] if seeded else []), variant, *(_setting(v.get(k)) for k in RL_SETTING_KEYS)]
                        for (trained, variant), v in settings.items()
                    ],
                )  # fmt: skip
                for trained in seeds_of(config):
                    same_seed = [v for (t, _), v in settings.items() if t == trained]
                    differ = budget_differences(same_seed)
                    where = run_name(dataset, trained)
                    if differ:
                        report.para(
                            f"{where}: WARNING: the RL variants differ in {', '.join(differ)}, so they did not get "
                            "the same prompt budget and selection rule; their comparison is not like for like."
                        )
                        notes.append(f"{where}: RL variants differ in {', '.join(differ)}.")
                    elif len(same_seed) > 1:
                        report.para(
                            f"{where}: every RL variant had the same prompt budget and selection rule "
                            f"({', '.join(RL_BUDGET_KEYS)})."
                        )
            if runs and plot_rl_curves(runs, f"{dataset}: RL training", fig_dir / f"rl_{dataset}.png"):
                report.image(f"figures/rl_{dataset}.png", f"RL reward and KL on {dataset}")
            elif runs:
                notes.append(f"{dataset}: the RL logs have no reward or kl values, no RL curve.")

        report.heading("Figures")
        for dataset in config["datasets"]:
            ds_rows = [r for r in rows if r["dataset"] == dataset]
            ndcg = [c for c in columns if c.startswith("ndcg@")]
            if ds_rows and seeded:
                plot_metric_bars(
                    mean_rows([a for a in spread if a["dataset"] == dataset], ndcg),
                    ndcg,
                    f"{dataset}: NDCG@K per method, mean over seeds",
                    fig_dir / f"ndcg_{dataset}.png",
                    bars="bars: min to max over the seeds",
                )
                report.image(f"figures/ndcg_{dataset}.png", f"NDCG@K per method on {dataset} (mean, min-max bars)")
            elif ds_rows:
                plot_metric_bars(ds_rows, ndcg, f"{dataset}: NDCG@K per method", fig_dir / f"ndcg_{dataset}.png")
                report.image(f"figures/ndcg_{dataset}.png", f"NDCG@K per method on {dataset} (95% CI bars)")
        report.heading("Time and memory per stage")
        if bench:
            plot_stages(bench, fig_dir / "stages.png")
            report.table(
                ["job", "wall time (s)", "peak memory (MB)"],
                [[b["job"], _fmt(b["seconds"], 1), _fmt(b["max_rss_mb"], 0)] for b in bench],
            )
            total = sum(b["seconds"] or 0.0 for b in bench)
            peak = max((b["max_rss_mb"] or 0.0) for b in bench)
            report.para(f"Sum of wall times: {total:.0f} s; largest peak memory of one job: {peak:.0f} MB.")
            report.image("figures/stages.png", "wall time and peak memory per job")
        else:
            report.para(f"No benchmark files under {benchmarks} (Snakemake writes them; `dvc repro` does not).")

    if notes:
        report.heading("Notes")
        for note in notes:
            report.para(note)
            log.info(note)

    write_table(out / "table.csv", rows, columns, seeded)
    write_csv(out / "comparisons.csv", _with_seed(COMPARISON_COLUMNS, seeded), tested)
    if seeded:
        write_csv(out / "seeds.csv", SEEDS_COLUMNS, spread)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(report.markdown(), encoding="utf-8")
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(report.html("rere results"), encoding="utf-8")
    return {
        "rows": rows,
        "comparisons": tested,
        "best_baseline": best_of,
        "seeds": spread,
        "same_time": by_time,
        "benchmarks": bench,
        "notes": notes,
    }


def run(args, config: dict) -> int:
    found = build(
        config, Path(args.results), Path(args.models), Path(args.benchmarks), Path(args.out), data=Path(args.data)
    )
    log.info(
        "wrote %s/table.csv (%d rows), comparisons.csv, report.md, report.html, figures/ (%d notes)",
        args.out,
        len(found["rows"]),
        len(found["notes"]),
    )
    return 0
