"""`rere bench decode`: catalogue-constrained beam search, ours against stock `generate`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time

import torch
from transformers import LogitsProcessor
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

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
    """Wrap a processor and record (start, wall seconds) of each call."""

    def __init__(self, inner: LogitsProcessor, record: list[tuple[float, float]]):
        self.inner, self.record = inner, record

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        out = self.inner(input_ids, scores)
        self.record.append((start, time.perf_counter() - start))
        return out


def _timed(make, record: list[tuple[float, float]]):
    return lambda trie, prompt_length: _Timed(make(trie, prompt_length), record)


def _spread(values: list[int]) -> str:
    return f"{min(values)}/{int(statistics.median(values))}/{max(values)}"


def _compare(ours: list, theirs: list, tol: float = 1e-4) -> tuple[int, float]:
    """(prompts whose item lists are equal, largest score difference where both have scores)."""
    same = sum([i for i, _ in a] == [i for i, _ in b] for a, b in zip(ours, theirs, strict=True))
    diffs = [abs(sa - sb) for a, b in zip(ours, theirs, strict=True) for (_, sa), (_, sb) in zip(a, b, strict=True)]
    diffs = [d for d in diffs if d == d]  # NaN: unscored
    return same, max(diffs, default=float("nan"))


def _clock(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process). On a shared machine the wall clock
    also counts waiting for a core; the CPU time does not."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_decode(args: argparse.Namespace, config: dict) -> int:
    seed = int(config["seed"])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    setup = build_setup(args, seed)
    model, trie, prompts, pad_id = setup["model"], setup["trie"], setup["prompts"], setup["pad_id"]
    n, beams, bs = len(prompts), args.beams, args.batch_size
    log.info("setup (titles, tokenizer, trie, model) took %.1f s", time.perf_counter() - t0)

    # Warm-up: first calls pay for lazy initialisation.
    beam_search(model, prompts[:1], trie, beams, pad_id, bs)
    stock_beam_search(model, prompts[:1], trie, beams, pad_id, bs)

    stats: dict = {}
    ours, ours_s, ours_cpu = _clock(beam_search, model, prompts, trie, beams, pad_id, bs, stats=stats)
    trie_calls: list[tuple[float, float]] = []
    trie_proc = _timed(TrieLogitsProcessor, trie_calls)
    stock, stock_s, stock_cpu = _clock(stock_beam_search, model, prompts, trie, beams, pad_id, bs, processor=trie_proc)
    peer_calls: list[tuple[float, float]] = []
    peer_proc = _timed(peer_processor(setup["seqs"], setup["eos_id"], beams), peer_calls)
    base, base_s, base_cpu = _clock(stock_beam_search, model, prompts, trie, beams, pad_id, bs, processor=peer_proc)

    trie_ms = 1e3 * statistics.fmean(d for _, d in trie_calls)
    peer_ms = 1e3 * statistics.fmean(d for _, d in peer_calls)
    # A decode step of stock generate = the time between two processor calls (median: the
    # gaps that span a new batch's prefill are the exceptions).
    starts = [s for s, _ in trie_calls]
    gaps = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    stock_step_ms = 1e3 * statistics.median(gaps) if gaps else math.nan
    ours_mask_ms = 1e3 * stats["mask_s"] / stats["steps"]
    ours_step_ms = 1e3 * (ours_s - stats["prefill_s"]) / stats["steps"]
    same_base, diff_base = _compare(ours, base)
    same_stock, diff_stock = _compare(ours, stock)
    wide = int(trie.wide.sum())
    figures = {
        "items": trie.num_items,
        "trie_nodes": trie.num_nodes,
        "trie_wide_nodes": wide,
        "completion_tokens_min_median_max": _spread([len(s) for s in setup["seqs"]]),
        "prompt_tokens_min_median_max": _spread([len(p) for p in prompts]),
        "prompts": n,
        "beams": beams,
        "vocab": trie.vocab_size,
        "model": f"qwen2 hidden {args.hidden_size} x {args.layers} layers",
        "torch_threads": torch.get_num_threads(),
        "processor_ms_per_step_trie": trie_ms,
        "processor_ms_per_step_peer": peer_ms,
        "processor_speedup": peer_ms / trie_ms,
        "stock_decode_step_ms": stock_step_ms,
        "trie_share_of_stock_step": trie_ms / stock_step_ms,
        "rere_mask_ms_per_step": ours_mask_ms,
        "rere_mask_share_of_step": ours_mask_ms / ours_step_ms,
        "s_per_prompt_rere": ours_s / n,
        "s_per_prompt_stock_trie": stock_s / n,
        "s_per_prompt_baseline": base_s / n,
        "end_to_end_speedup": base_s / ours_s,
        "cpu_s_per_prompt_rere": ours_cpu / n,
        "cpu_s_per_prompt_stock_trie": stock_cpu / n,
        "cpu_s_per_prompt_baseline": base_cpu / n,
        "end_to_end_cpu_speedup": base_cpu / ours_cpu,
        "rere_prefill_s": stats["prefill_s"],
        "identical_prompts_vs_baseline": same_base,
        "identical_prompts_vs_stock_trie": same_stock,
        "max_score_diff_vs_stock_trie": diff_stock,
        "max_score_diff_vs_baseline": diff_base,
    }
    _print(figures)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


def _print(f: dict) -> None:
    print(
        f"catalogue: {f['items']} synthetic titles, completion tokens min/median/max {f['completion_tokens_min_median_max']}"
        f" (EOS included); trie {f['trie_nodes']} nodes, {f['trie_wide_nodes']} wide"
    )
    print(
        f"workload: {f['prompts']} prompts (tokens {f['prompt_tokens_min_median_max']}) x {f['beams']} beams, "
        f"{f['model']}, vocab {f['vocab']}, {f['torch_threads']} torch threads"
    )
    print("(a) constraint processor, ms per decode step (inside stock generate):")
    print(f"    peer (string keys, Python loop over beams): {f['processor_ms_per_step_peer']:9.3f}")
    print(f"    rere TrieLogitsProcessor (tensor trie):     {f['processor_ms_per_step_trie']:9.3f}")
    print(
        f"    speed-up {f['processor_speedup']:.1f}x; trie share of a stock decode step "
        f"({f['stock_decode_step_ms']:.0f} ms) {100 * f['trie_share_of_stock_step']:.2f}%"
    )
    print(
        f"    in rere beam_search: mask {f['rere_mask_ms_per_step']:.3f} ms per step, "
        f"{100 * f['rere_mask_share_of_step']:.2f}% of a decode step"
    )
    print("(b) end to end per prompt, wall seconds (CPU seconds of this process):")
    for label, key in [
        ("baseline (stock generate + peer processor)", "baseline"),
        ("stock generate + TrieLogitsProcessor      ", "stock_trie"),
        ("rere beam_search (shared prompt prefill)  ", "rere"),
    ]:
        print(f"    {label}: {f['s_per_prompt_' + key]:8.3f} ({f['cpu_s_per_prompt_' + key]:.3f})")
    print(f"    speed-up vs baseline {f['end_to_end_speedup']:.1f}x wall ({f['end_to_end_cpu_speedup']:.1f}x CPU)")
    n = f["prompts"]
    verdict = "yes" if f["identical_prompts_vs_baseline"] == n else "no"
    print(
        f"(c) identical beams: {verdict} (rere vs baseline {f['identical_prompts_vs_baseline']}/{n} prompts, "
        f"vs stock+trie {f['identical_prompts_vs_stock_trie']}/{n}; max score difference vs stock+trie "
        f"{f['max_score_diff_vs_stock_trie']:.2e}, vs baseline {f['max_score_diff_vs_baseline']:.2e})"
    )
