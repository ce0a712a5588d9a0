"""The results table, a Markdown/HTML report and its figures, read back from a run's files.

    rere report --results results --models models --benchmarks benchmarks --out results

Reads, for every (dataset, method) the config lists (`sft`, each `rl.variants` entry, each
`baselines.methods` entry):
- `results/<dataset>/<method>/metrics.json` (written by `rere evaluate` / `rere baseline`);
- `models/<dataset>/<variant>/trainer_log.jsonl` (one JSON log dict per line, with `step`,
  `reward` or `rewards/<fn>/mean`, `kl`, `loss`) for the RL curves;
- Snakemake's benchmark TSVs under `benchmarks/` (columns `s` = wall time in seconds and
  `max_rss` = peak resident memory in MB) for the per-stage time and memory.

Writes `table.csv` (one row per dataset and method), `report.md`, `report.html` and
`figures/*.png`. A missing piece (no RL run, no benchmarks under DVC) is left out with a
note in the report, never an error; only a run with no metrics at all is refused.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rere import RereError
from rere.io import atomic_path, read_json

log = logging.getLogger(__name__)

REFERENCE_METHOD = "rere"  # the RL variant whose gain the report states


def add_arguments(parser) -> None:
    parser.add_argument("--results", default="results", help="folder with <dataset>/<method>/metrics.json")
    parser.add_argument(
        "--models", default="models", help="folder with <dataset>/<variant>/trainer_log.jsonl (RL curves)"
    )
    parser.add_argument(
        "--benchmarks", default="benchmarks", help="Snakemake benchmark TSVs (time and memory per stage)"
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


def invalid_rate(metrics: dict) -> float:
    """Share of generated items that were not distinct catalogue items.

    `invalid` counts bad beams over all rows, so the rate is invalid / (rows * num_beams);
    without `num_beams` (a baseline ranks catalogue items only) it is invalid / rows.

    >>> invalid_rate({"invalid": 3, "rows": 10, "num_beams": 5})
    0.06
    >>> invalid_rate({"rows": 4})
    0.0
    """
    rows = metrics.get("rows") or 0
    if not rows:
        return 0.0
    per_row = metrics.get("num_beams") or 1
    return float(metrics.get("invalid", 0)) / (rows * per_row)


def results_table(results: Path, config: dict) -> tuple[list[dict], list[str]]:
    """One row per (dataset, method) with a metrics.json; and notes for the missing ones."""
    ks = sorted(set(config["evaluate"]["ks"]))
    rows, notes = [], []
    for dataset in config["datasets"]:
        for method, kind in methods_of(config):
            path = results / dataset / method / "metrics.json"
            if not path.is_file():
                notes.append(f"{dataset}/{method}: no {path} (not run yet?), left out.")
                continue
            metrics = read_json(path)
            row: dict[str, Any] = {"dataset": dataset, "method": method, "kind": kind}
            for k in ks:
                for name in (f"hr@{k}", f"ndcg@{k}"):
                    if name not in metrics:
                        raise RereError(f"{path}: no '{name}'; re-run the stage with evaluate.ks containing {k}.")
                    row[name] = float(metrics[name])
            row["invalid_rate"] = invalid_rate(metrics)
            row["throughput"] = float(metrics["throughput"]) if "throughput" in metrics else None
            row["rows"] = int(metrics.get("rows", 0))
            rows.append(row)
    return rows, notes


def metric_columns(config: dict) -> list[str]:
    ks = sorted(set(config["evaluate"]["ks"]))
    return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]


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


def gains(rows: list[dict], columns: list[str]) -> list[dict]:
    """Per dataset and metric: ReRe, SFT and the best classic baseline, with ReRe's relative gains.

    The best baseline is chosen per metric (the paper's "best baseline" convention).
    Datasets without a `rere` row are skipped; a missing SFT or baseline gives None.
    """
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        by_method = {r["method"]: r for r in rows if r["dataset"] == dataset}
        rere = by_method.get(REFERENCE_METHOD)
        if rere is None:
            continue
        baselines = [r for r in rows if r["dataset"] == dataset and r["kind"] == "baseline"]
        sft = by_method.get("sft")
        for col in columns:
            # max() keeps the first of equal values: the config's order breaks ties.
            best = max(baselines, key=lambda r: r[col]) if baselines else None
            out.append(
                {
                    "dataset": dataset,
                    "metric": col,
                    "rere": rere[col],
                    "sft": sft[col] if sft else None,
                    "gain_vs_sft": relative_gain(rere[col], sft[col]) if sft else None,
                    "best_baseline": best["method"] if best else None,
                    "baseline": best[col] if best else None,
                    "gain_vs_baseline": relative_gain(rere[col], best[col]) if best else None,
                }
            )
    return out


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


def plot_metric_bars(rows: list[dict], columns: list[str], title: str, path: Path) -> None:
    """Grouped bars: one group per metric column, one bar per method."""
    plt = _pyplot()
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(columns) * max(len(rows), 1) * 0.5), 3.8))
    for i, row in enumerate(rows):
        xs = [c + i * width for c in range(len(columns))]
        ax.bar(xs, [row[c] for c in columns], width=width, label=row["method"])
    ax.set_xticks([c + width * (len(rows) - 1) / 2 for c in range(len(columns))], [c.upper() for c in columns])
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize="small", ncols=2)
    ax.grid(axis="y", alpha=0.3)
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


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


TABLE_TAIL = ["invalid_rate", "throughput", "rows"]


def write_table(path: Path, rows: list[dict], columns: list[str]) -> None:
    header = ["dataset", "method", "kind", *columns, *TABLE_TAIL]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            writer.writerow(
                ["" if r[h] is None else (f"{r[h]:.6f}" if isinstance(r[h], float) else r[h]) for h in header]
            )


def build(config: dict, results: Path, models: Path, benchmarks: Path, out: Path) -> dict:
    """Write table.csv, report.md, report.html and figures/ under `out`; return what was found."""
    rows, notes = results_table(results, config)
    if not rows:
        raise RereError(
            f"no metrics.json under {results} for the configured datasets and methods; run the pipeline first."
        )
    columns = metric_columns(config)
    report = Report()
    report.heading("rere results", 1)
    report.para(
        f"Split: {config['evaluate']['split']}; beams: {config['evaluate']['num_beams']}; "
        f"seed: {config['seed']}. HR@K and NDCG@K over all evaluated rows, full catalogue."
    )
    report.heading("Results")
    report.table(
        ["dataset", "method", *[c.upper() for c in columns], "invalid", "rows/s", "rows"],
        [
            [
                r["dataset"],
                r["method"],
                *[_fmt(r[c]) for c in columns],
                _fmt(r["invalid_rate"]),
                _fmt(r["throughput"], 1),
                str(r["rows"]),
            ]
            for r in rows
        ],
    )
    gain_rows = gains(rows, columns)
    report.heading(f"Relative gain of ReRe (`{REFERENCE_METHOD}`)")
    if gain_rows:
        report.table(
            ["dataset", "metric", "ReRe", "SFT", "vs SFT", "best baseline", "value", "vs baseline"],
            [
                [
                    g["dataset"],
                    g["metric"].upper(),
                    _fmt(g["rere"]),
                    _fmt(g["sft"]),
                    _pct(g["gain_vs_sft"]),
                    g["best_baseline"] or "n/a",
                    _fmt(g["baseline"]),
                    _pct(g["gain_vs_baseline"]),
                ]
                for g in gain_rows
            ],
        )
    else:
        report.para(f"No `{REFERENCE_METHOD}` results: no gain to report.")

    bench = read_benchmarks(benchmarks)
    with atomic_path(out / "figures") as fig_dir:
        fig_dir.mkdir()
        report.heading("Figures")
        for dataset in config["datasets"]:
            ds_rows = [r for r in rows if r["dataset"] == dataset]
            if ds_rows:
                ndcg = [c for c in columns if c.startswith("ndcg@")]
                plot_metric_bars(ds_rows, ndcg, f"{dataset}: NDCG@K per method", fig_dir / f"ndcg_{dataset}.png")
                report.image(f"figures/ndcg_{dataset}.png", f"NDCG@K per method on {dataset}")
            runs = {}
            for variant in config["rl"]["variants"]:
                log_path = models / dataset / variant / "trainer_log.jsonl"
                if log_path.is_file():
                    runs[variant] = read_trainer_log(log_path)
                else:
                    notes.append(f"{dataset}/{variant}: no {log_path}, no RL curve.")
            if runs and plot_rl_curves(runs, f"{dataset}: RL training", fig_dir / f"rl_{dataset}.png"):
                report.image(f"figures/rl_{dataset}.png", f"RL reward and KL on {dataset}")
            elif runs:
                notes.append(f"{dataset}: the RL logs have no reward or kl values, no RL curve.")
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

    write_table(out / "table.csv", rows, columns)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(report.markdown(), encoding="utf-8")
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(report.html("rere results"), encoding="utf-8")
    return {"rows": rows, "gains": gain_rows, "benchmarks": bench, "notes": notes}


def run(args, config: dict) -> int:
    found = build(config, Path(args.results), Path(args.models), Path(args.benchmarks), Path(args.out))
    log.info(
        "wrote %s/table.csv (%d rows), report.md, report.html, figures/ (%d notes)",
        args.out,
        len(found["rows"]),
        len(found["notes"]),
    )
    return 0
