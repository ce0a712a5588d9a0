"""`rere bench decode|rl`: benchmarks on synthetic data, no dataset or download needed.

`decode` measures catalogue-constrained beam search three ways on the same model, catalogue
and prompts:

- rere: `rere.decoding.beam_search` (one prefill per prompt, vectorised trie mask);
- stock + trie: transformers `generate` beam search with `TrieLogitsProcessor`;
- baseline: what the peer frameworks do, stock `generate` beam search with a
  prefix_allowed_tokens function that builds a string key from each beam's generated ids and
  looks its allowed tokens up in a dict, in a Python loop over every beam at every step.

It prints (a) processor milliseconds per step for the trie and the peer processor and their
ratio, with the trie mask's share of a decode step, (b) wall time per prompt end to end and
the ratio to the baseline, (c) whether the returned beams are identical.

The catalogue is synthetic product titles (a byte-level BPE tokenizer is trained on them
here), prompts are histories of `--history` titles, the model a randomly initialised Qwen2
built from config. `rl` is implemented by `rere.rl.bench_rl`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

from rere import RereError
from rere.decoding import ItemTrie, TrieLogitsProcessor, beam_search, stock_beam_search
from rere.io import atomic_path

log = logging.getLogger(__name__)

# which -> (module, function(args, config) -> exit code); modules import lazily.
BENCHMARKS = {"decode": ("rere.bench", "bench_decode"), "rl": ("rere.rl", "bench_rl")}

PAD, EOS = "<pad>", "<eos>"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=sorted(BENCHMARKS), help="decode: constrained beam search; rl: RL step")
    parser.add_argument("--items", type=int, default=10_000, help="synthetic catalogue size (default 10000)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts (users) to decode (default 32)")
    parser.add_argument("--beams", type=int, default=20, help="beams per prompt, G for rl (default 20)")
    parser.add_argument("--history", type=int, default=10, help="items in each prompt's history (default 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (default 32)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the titles")
    parser.add_argument("--hidden-size", type=int, default=256, help="Qwen2 hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="Qwen2 decoder layers (default 4)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: small ops stay comparable on a shared machine; 0: torch's default)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")


def run(args: argparse.Namespace, config: dict) -> int:
    module, name = BENCHMARKS[args.which]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise RereError(f"`rere bench {args.which}` needs {module}, which is not available in this version.") from None
    return getattr(mod, name)(args, config) or 0


# --------------------------------------------------------------------------------------------
# Synthetic catalogue

_SYLLABLES = ["ka", "lo", "zen", "tri", "vo", "mar", "ex", "qui", "ra", "sol", "nu", "ve", "tor", "lix", "ban", "do"]
_ADJECTIVES = (
    "Ergonomic Portable Heavy-Duty Compact Premium Adjustable Rechargeable Waterproof Slim Ultra-Light Foldable "
    "Wireless Insulated Reusable Magnetic Non-Slip Quiet Professional Vintage Modern Classic Deluxe Eco-Friendly "
    "Durable Soft Ventilated Anti-Glare Stackable Retractable Cordless"
).split()
_MATERIALS = ["Stainless Steel", "Bamboo", "Leather", "Aluminum", "Silicone", "Cotton", "Glass", "Walnut", "Canvas"]
_NOUNS = [
    "Mouse", "Desk Lamp", "Notebook", "Stapler", "Water Bottle", "Backpack", "Phone Case", "Headphones", "Keyboard",
    "Coffee Mug", "Yoga Mat", "Pen Set", "Monitor Stand", "Paper Shredder", "Label Maker", "File Organizer",
    "Desk Chair", "Whiteboard", "Calculator", "USB Hub", "Laptop Sleeve", "Bookends", "Sticky Notes", "Highlighters",
    "Planner", "Scissors", "Tape Dispenser", "Webcam", "Speaker", "Charging Cable", "Travel Mug", "Lunch Box",
]  # fmt: skip
_COLORS = ["Black", "White", "Navy Blue", "Rose Gold", "Gray", "Red", "Forest Green", "Sky Blue", "Beige", "Purple"]
_SIZES = ["12 oz", "15.6 inch", "A5", "Large", "XL", "500 ml", "Letter Size", "10 x 12 in", "Medium", "2 ft"]


def synthetic_titles(n: int, rng: random.Random) -> list[str]:
    """`n` distinct product titles like 'Voqui Portable Bamboo Desk Lamp KL-482, Gray (Pack of 3)'."""
    brands = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).title() for _ in range(400)})
    titles: dict[str, None] = {}
    while len(titles) < n:
        words = [rng.choice(brands)]
        words += rng.sample(_ADJECTIVES, rng.randint(0, 2))
        if rng.random() < 0.4:
            words.append(rng.choice(_MATERIALS))
        words.append(rng.choice(_NOUNS))
        if rng.random() < 0.5:
            letters = "".join(rng.choice("ABCDEFGHKLMNPRSTXZ") for _ in range(2))
            words.append(f"{letters}-{rng.randint(10, 9999)}")
        title = " ".join(words)
        if rng.random() < 0.5:
            title += f", {rng.choice(_COLORS)}"
        if rng.random() < 0.3:
            title += f", {rng.choice(_SIZES)}"
        if rng.random() < 0.2:
            title += f" (Pack of {rng.randint(2, 12)})"
        titles[title] = None
    return list(titles)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (the `tokenizers` library) with <pad> = 0 and <eos> = 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def prompt_text(history: list[str]) -> str:
    return "Purchase history: " + ", ".join(f'"{t}"' for t in history) + "\nNext item: "


def completion_text(title: str) -> str:
    return f'"{title}"\n'


# --------------------------------------------------------------------------------------------
# The peers' constraint: a string key per beam, a dict lookup, a Python loop over beams


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


# --------------------------------------------------------------------------------------------
# The decode benchmark


def _check_sizes(args: argparse.Namespace) -> None:
    for name in ("items", "prompts", "beams", "history", "batch_size", "hidden_size", "layers"):
        if getattr(args, name) < 1:
            raise RereError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.beams > args.items:
        raise RereError(f"--beams {args.beams} is larger than --items {args.items}; beams are distinct items.")
    if args.threads < 0:
        raise RereError(f"--threads must be >= 0 (0: torch's default), got {args.threads}.")
    if args.vocab_size < 300:
        raise RereError(f"--vocab-size must be >= 300 (256 bytes + merges), got {args.vocab_size}.")


def build_setup(args: argparse.Namespace, seed: int) -> dict:
    """Catalogue, tokenizer, trie, prompts and model, all from `seed`."""
    rng = random.Random(seed)
    titles = synthetic_titles(args.items, rng)
    histories = [rng.sample(range(len(titles)), args.history) for _ in range(args.prompts)]
    corpus = [completion_text(t) for t in titles] + [prompt_text([titles[i] for i in h]) for h in histories]
    tokenizer = train_tokenizer(corpus, args.vocab_size)
    pad_id, eos_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOS)
    vocab = tokenizer.get_vocab_size()
    seqs = [enc.ids + [eos_id] for enc in tokenizer.encode_batch([completion_text(t) for t in titles])]
    prompts = [enc.ids for enc in tokenizer.encode_batch([prompt_text([titles[i] for i in h]) for h in histories])]
    trie = ItemTrie.from_sequences(seqs, vocab)
    torch.manual_seed(seed)
    heads = max(1, args.hidden_size // 64)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=max(512, 2 * max(len(p) for p in prompts)),
        tie_word_embeddings=True,
        # Wider than the default 0.02 so that a random model's next-token distributions are
        # peaked like a trained one's, rather than near-uniform (where beams are all near-ties).
        initializer_range=0.2,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    return {"seqs": seqs, "prompts": prompts, "trie": trie, "model": model, "pad_id": pad_id, "eos_id": eos_id}


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
    _check_sizes(args)
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
