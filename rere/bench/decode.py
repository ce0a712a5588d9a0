"""`rere bench decode`: catalogue-constrained beam search, one row per change (see rere.bench).

What each row pays for, and nothing more: the stock rows run `generate` without
`output_scores` (which copies every step's (b*B, V) scores and which our loop never needs),
so they return items without scores; beams are compared by their items against row 1, and
scores are compared between the rows that have them (ours). Figures are min / median / max
over `--repeats` runs, the variants alternating within each repeat.

Peak memory, per variant: on CPU, a child process per variant (`--memory-of`) builds the same
setup, warms the variant up, resets the kernel's high-water mark of its resident set
(`/proc/self/clear_refs`) and runs one batch; the figure is that high-water mark minus the
resident set before the batch, i.e. what the variant adds on top of the model and catalogue
(torch's CPU allocator is glibc malloc, so Python-level tracers do not see it; a fresh
process keeps one variant's freed memory from hiding the next one's). Without a writable
clear_refs it falls back to the growth of `getrusage` maxrss, a lower bound. On CUDA, the
growth of `torch.cuda.max_memory_allocated` over each timed run.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

from rere import RereError
from rere.decoding import TrieLogitsProcessor, beam_search, stock_beam_search
from rere.io import atomic_path
from rere.synthetic import build_setup

log = logging.getLogger(__name__)


def peer_processor(trie_seqs: list[list[int]], eos_id: int, num_beams: int):
    """Factory for `stock_beam_search(processor=...)`: HF's PrefixConstrainedLogitsProcessor with
    a prefix_allowed_tokens_fn over '-'-joined token-id keys, as the ReRe reference, MiniOneRec
    and D3 do. Unknown prefixes (stock's filler beams) allow EOS, like TrieLogitsProcessor."""
    allowed: dict[str, set[int]] = {}
    for seq in trie_seqs:
        for i in range(len(seq)):
            allowed.setdefault("-".join(str(t) for t in seq[:i]), set()).add(seq[i])
    table = {key: sorted(tokens) for key, tokens in allowed.items()}

    def make(_trie, prompt_length: int) -> LogitsProcessor:
        def prefix_allowed_tokens(batch_id: int, sent: torch.Tensor) -> list[int]:
            key = "-".join(str(t) for t in sent.tolist()[prompt_length:])
            return table.get(key, [eos_id])

        return PrefixConstrainedLogitsProcessor(prefix_allowed_tokens, num_beams)

    return make


class _Timed(LogitsProcessor):
    """Wrap a processor; add each call's seconds to stats["constraint_s"] and count the steps.
    The first call after the processor was built marks the end of that `generate` call's
    prefill (stock builds the processor right before calling generate)."""

    def __init__(self, inner: LogitsProcessor, stats: dict, built: float, device: torch.device):
        self.inner, self.stats, self.built, self.device = inner, stats, built, device

    def __call__(self, input_ids, scores):
        start = _now(self.device)
        if self.built is not None:
            self.stats["prefill_s"] = self.stats.get("prefill_s", 0.0) + start - self.built
            self.built = None
        out = self.inner(input_ids, scores)
        end = _now(self.device)
        self.stats["constraint_s"] = self.stats.get("constraint_s", 0.0) + end - start
        self.stats["steps"] = self.stats.get("steps", 0) + 1
        return out


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Variant:
    key: str
    label: str
    run: object  # (model, prompts, setup, beams, batch_size, stats) -> Results


def _stock(make_processor):
    def run(model, prompts, setup, beams, bs, stats):
        device = next(model.parameters()).device
        make = make_processor(setup, beams)

        def timed(trie, prompt_length):
            return _Timed(make(trie, prompt_length), stats, _now(device), device)

        return stock_beam_search(
            model, prompts, setup["trie"], beams, setup["pad_id"], bs, processor=timed, with_scores=False
        )

    return run


def _ours(shared: bool, scoring: str):
    def run(model, prompts, setup, beams, bs, stats):
        return beam_search(
            model,
            prompts,
            setup["trie"],
            beams,
            setup["pad_id"],
            bs,
            stats=stats,
            shared_prefill=shared,
            scoring=scoring,
        )

    return run


VARIANTS = [
    Variant(
        "stock_peer",
        "stock generate + peer processor",
        _stock(lambda setup, beams: peer_processor(setup["seqs"], setup["eos_id"], beams)),
    ),
    Variant("stock_trie", "stock generate + trie processor", _stock(lambda setup, beams: TrieLogitsProcessor)),
    Variant("loop_repeated_dense", "our loop, prompt per beam, dense mask", _ours(False, "dense")),
    Variant("loop_shared_dense", "+ shared prompt prefill", _ours(True, "dense")),
    Variant("loop_shared_allowed", "+ allowed candidates only", _ours(True, "allowed")),
    Variant("rere", "+ output layer for live beams only (rere)", _ours(True, "live")),
]
BY_KEY = {v.key: v for v in VARIANTS}


@dataclass
class Row:
    variant: Variant
    wall_s: list[float] = field(default_factory=list)  # per repeat, all prompts
    prefill_s: list[float] = field(default_factory=list)
    constraint_s: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)  # CUDA: per repeat; CPU: one child process
    scored_share: list[float] = field(default_factory=list)  # beam-steps whose next-token scores were computed
    results: list | None = None


def spread(values) -> dict:
    """{"min", "median", "max"} of a list of numbers (NaN if empty)."""
    values = [v for v in values if v == v]
    if not values:
        return {"min": math.nan, "median": math.nan, "max": math.nan}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fmt_spread(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    """A `spread` as "min/median/max" (times `scale`)."""
    return "/".join(f"{scale * s[k]:.{digits}f}" for k in ("min", "median", "max"))


def _setup(args: argparse.Namespace, seed: int) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    setup = build_setup(args, seed)
    setup["model"] = setup["model"].to(args.device)
    return setup


def _warm_up(setup: dict, variant: Variant) -> None:
    """First calls pay for lazy initialisation: one prompt, a few beams."""
    variant.run(setup["model"], setup["prompts"][:1], setup, min(4, setup["trie"].num_items), 1, {})


def _run_once(setup: dict, variant: Variant, beams: int, bs: int, device: torch.device) -> tuple[list, dict, float]:
    """(results, stats, peak MiB on CUDA else NaN) of one timed run over all prompts."""
    gc.collect()
    stats: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = _now(device)
    results = variant.run(setup["model"], setup["prompts"], setup, beams, bs, stats)
    stats["wall_s"] = _now(device) - start
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else math.nan
    return results, stats, peak


def bench_decode(args: argparse.Namespace, config: dict) -> int:
    seed = int(config["seed"])
    if args.memory_of:
        return _memory_child(args, seed)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    setup = _setup(args, seed)
    log.info("setup (titles, tokenizer, trie, model) took %.1f s", time.perf_counter() - t0)
    rows = [Row(v) for v in VARIANTS]
    for row in rows:
        _warm_up(setup, row.variant)
    for r in range(args.repeats):
        order = rows[r % len(rows) :] + rows[: r % len(rows)]  # rotate: no variant always runs first
        for row in order:
            results, stats, peak = _run_once(setup, row.variant, args.beams, args.batch_size, device)
            log.info("repeat %d %s: %.2f s", r + 1, row.variant.key, stats["wall_s"])
            row.wall_s.append(stats["wall_s"])
            row.prefill_s.append(stats.get("prefill_s", math.nan))
            row.constraint_s.append(stats.get("constraint_s", math.nan))
            row.steps.append(stats.get("steps", 0))
            row.peak_mib.append(peak)
            if stats.get("beam_rows"):
                row.scored_share.append(stats["scored_rows"] / stats["beam_rows"])
            if row.results is None:
                row.results = results
            elif [[i for i, _ in x] for x in results] != [[i for i, _ in x] for x in row.results]:
                raise RereError(
                    f"{row.variant.key} returned different beams in repeat {r + 1}; decoding is not deterministic."
                )
    if device.type == "cpu":
        for row in rows:
            row.peak_mib = [_memory_of(args, seed, row.variant.key)]
    figures = _figures(args, setup, rows)
    _print(figures)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


def _figures(args: argparse.Namespace, setup: dict, rows: list[Row]) -> dict:
    trie, prompts, n = setup["trie"], setup["prompts"], len(setup["prompts"])
    reference, ours = rows[0], rows[-1]
    ref_items = [[i for i, _ in x] for x in reference.results]
    table = []
    for row in rows:
        decode_s = [w - p for w, p in zip(row.wall_s, row.prefill_s, strict=True)]
        step_ms = [1e3 * d / s for d, s in zip(decode_s, row.steps, strict=True) if s]
        constraint_ms = [1e3 * c / s for c, s in zip(row.constraint_s, row.steps, strict=True) if s]
        share = [c / d for c, d in zip(row.constraint_s, decode_s, strict=True)]
        speedup = [a / b for a, b in zip(reference.wall_s, row.wall_s, strict=True)]  # paired by repeat
        same = sum([i for i, _ in x] == y for x, y in zip(row.results, ref_items, strict=True))
        diffs = [
            abs(sa - sb)
            for x, y in zip(row.results, ours.results, strict=True)
            for (_, sa), (_, sb) in zip(x, y, strict=True)
            if sa == sa
        ]
        table.append(
            {
                "variant": row.variant.key,
                "label": row.variant.label,
                "s_per_prompt": spread([w / n for w in row.wall_s]),
                "speedup_vs_row1": spread(speedup),
                "step_ms": spread(step_ms),
                "prefill_s_per_prompt": spread([p / n for p in row.prefill_s]),
                "constraint_ms_per_step": spread(constraint_ms),
                "constraint_share_of_step": spread(share),
                "steps_per_batch": spread([s / math.ceil(n / args.batch_size) for s in row.steps]),
                "peak_mib": spread(row.peak_mib),
                "scored_beam_share": spread(row.scored_share),
                "identical_prompts_vs_row1": same,
                "max_score_diff_vs_rere": max(diffs) if diffs else math.nan,
            }
        )
    return {
        "preset": args.preset,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "items": trie.num_items,
        "trie_nodes": trie.num_nodes,
        "trie_wide_nodes": int(trie.wide.sum()),
        "completion_tokens": spread([len(s) for s in setup["seqs"]]),
        "prompt_tokens": spread([len(p) for p in prompts]),
        "prompts": n,
        "batch_size": args.batch_size,
        "beams": args.beams,
        "vocab": trie.vocab_size,
        "bpe_vocab": args.vocab_size,
        "model": f"qwen2 hidden {args.hidden_size} x {args.layers} layers",
        "rows": table,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        name = "cpu"
    import os

    return f"{name}, {os.cpu_count()} logical cores"


def _print(f: dict) -> None:
    c, p = f["completion_tokens"], f["prompt_tokens"]
    print(
        f"rere bench decode: preset {f['preset']}, {f['device']} ({f['device_name']}), {f['torch_threads']} torch "
        f"threads, {f['repeats']} repeats (min/median/max)"
    )
    print(
        f"catalogue: {f['items']} synthetic titles, completion tokens {c['min']:.0f}/{c['median']:.0f}/{c['max']:.0f} "
        f"(EOS included); trie {f['trie_nodes']} nodes, {f['trie_wide_nodes']} wide"
    )
    print(
        f"workload: {f['prompts']} prompts (tokens {p['min']:.0f}/{p['median']:.0f}/{p['max']:.0f}) x {f['beams']} "
        f"beams, {f['batch_size']} per call, {f['model']}, vocab {f['vocab']} (BPE {f['bpe_vocab']})"
    )
    header = (
        f"{'':3}{'variant':44} {'s per prompt':>20} {'speed-up vs 1':>16} {'step ms (median)':>16} "
        f"{'constraint ms/step':>20} {'share %':>7} {'peak MiB':>9} {'beams = 1':>9}"
    )
    print(header)
    for k, row in enumerate(f["rows"], 1):
        print(
            f"{k:<3}{row['label']:44} {fmt_spread(row['s_per_prompt'], digits=3):>20} {fmt_spread(row['speedup_vs_row1'], digits=1):>16} "
            f"{row['step_ms']['median']:16.1f} {fmt_spread(row['constraint_ms_per_step']):>20} "
            f"{100 * row['constraint_share_of_step']['median']:7.2f} {row['peak_mib']['median']:9.0f} "
            f"{row['identical_prompts_vs_row1']:>4}/{f['prompts']:<4}"
        )
    scored = [
        r["max_score_diff_vs_rere"] for r in f["rows"] if r["max_score_diff_vs_rere"] == r["max_score_diff_vs_rere"]
    ]
    live = f["rows"][-1]["scored_beam_share"]["median"]
    verdict = "yes" if all(r["identical_prompts_vs_row1"] == f["prompts"] for r in f["rows"]) else "NO"
    print(
        f"identical beams (items, every row vs row 1): {verdict}; largest score difference between the scored rows "
        f"(ours): {max(scored):.2e}. Stock rows run without output_scores (no scores); a step is one decoding "
        "step of a whole batch; share = constraint time / (run time - prefill)."
    )
    if live == live:
        print(
            f"row {len(f['rows'])} computed next-token scores for {100 * live:.0f}% of the beam-steps (the live beams)."
        )


# Peak memory of one variant, in a child process (see the module docstring).


def _memory_of(args: argparse.Namespace, seed: int, key: str) -> float:
    argv = [sys.executable, "-m", "rere.cli", "bench", "decode", "-q", "--set", f"seed={seed}", "--memory-of", key]
    for name in ("items", "prompts", "beams", "history", "batch_size", "vocab_size", "model_vocab", "hidden_size"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    argv += ["--layers", str(args.layers), "--threads", str(args.threads), "--device", args.device]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RereError(f"the memory run of {key} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return float(json.loads(lines[-1])["peak_mib"])


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _memory_child(args: argparse.Namespace, seed: int) -> int:
    """`--memory-of KEY`: this process runs one batch of one variant and prints its peak memory."""
    if args.memory_of not in BY_KEY:
        raise RereError(f"--memory-of must be one of {sorted(BY_KEY)}, got {args.memory_of!r}.")
    variant = BY_KEY[args.memory_of]
    setup = _setup(args, seed)
    _warm_up(setup, variant)
    batch = setup["prompts"][: args.batch_size]
    gc.collect()
    method = "clear_refs"
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # reset VmHWM to the current resident set (Linux >= 4.0)
        before = _rss_kib("VmRSS")
    except OSError:
        method, before = "maxrss", None
    if before is None:
        method, before = "maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    variant.run(setup["model"], batch, setup, args.beams, args.batch_size, {})
    after = _rss_kib("VmHWM") if method == "clear_refs" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant.key, "peak_mib": max(after - before, 0) / 1024, "method": method}))
    return 0
