"""`rere bench decode|rl`: benchmarks on synthetic data, no dataset or download needed.

`decode` (`rere.bench.decode`) times catalogue-constrained beam search on the same model,
catalogue and prompts, one row per change so that each gain can be attributed:

1. stock `generate` beam search + the peer frameworks' processor (a prefix_allowed_tokens
   function over string keys, a Python loop over every beam at every step);
2. stock `generate` + `TrieLogitsProcessor` (the tensor trie): the processor's worth;
3. our loop, the prompt repeated to every beam with a plain cache, dense mask and top-k:
   the loop's worth;
4. ... with the shared prompt prefill: the prefill's worth;
5. ... scoring only the trie's allowed candidates (no (b*B, V) mask, add or top-k);
6. ... and the output layer only for the beams that can still finish
   (`rere.decoding.beam_search` as shipped).

Each figure is min / median / max over `--repeats` runs; variants alternate within a repeat
(the order rotates from one repeat to the next) so that speed-ups are paired per repeat.

`rl` (`rere.bench.rl`) times a rollout of G completions per prompt (constrained beams
against TRL's default sampling) and one real ReReTrainer step, split into its parts.

The catalogue is synthetic product titles (a byte-level BPE is trained on them), prompts are
histories of `--history` titles, the model a randomly initialised Qwen2 built from config
(`rere.synthetic`). `--preset paper` is the paper's decoding shape on a 2-core CPU: vocabulary
151,936 (the BPE's ids spread over it), 50 beams, ~11,000 items of ~20 title tokens, a narrow
model so that the figures isolate decoding.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from rere import RereError

# which -> (module, function(args, config) -> exit code); modules import lazily.
BENCHMARKS = {"decode": ("rere.bench.decode", "bench_decode"), "rl": ("rere.bench.rl", "bench_rl")}

# Shapes a preset fills in for every size option left out on the command line, per benchmark.
_DEFAULT = {
    "items": 10_000,
    "prompts": 8,
    "beams": 20,
    "history": 10,
    "batch_size": 8,
    "vocab_size": 4096,
    "model_vocab": 0,
    "hidden_size": 256,
    "layers": 4,
}
PRESETS = {
    "decode": {
        "default": _DEFAULT,
        # The paper's decoding shape (Qwen2.5's vocabulary, 50 beams, a Toys-sized catalogue): a
        # 600-token BPE writes the synthetic titles in ~20 tokens, its ids are spread over 151,936.
        "paper": {
            "items": 11_000,
            "prompts": 4,
            "beams": 50,
            "history": 10,
            "batch_size": 4,
            "vocab_size": 600,
            "model_vocab": 151_936,
            "hidden_size": 64,
            "layers": 2,
        },
    },
    # rl: G = 16 and 8 prompts per step (the rl defaults); prompts are text that the trainer
    # tokenizes, so the model's vocabulary is the BPE's own (no --model-vocab).
    "rl": {"default": {**_DEFAULT, "beams": 16}},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=sorted(BENCHMARKS), help="decode: constrained beam search; rl: RL step")
    parser.add_argument(
        "--preset",
        choices=["default", "paper"],
        default="default",
        help="shapes for the size options left out (default: default; paper, decode only: vocabulary 151,936, "
        "50 beams, 11,000 items, hidden 64 x 2 layers, 4 prompts)",
    )
    parser.add_argument("--items", type=int, default=None, help="synthetic catalogue size (default 10000)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (users) to decode (default 8)")
    parser.add_argument("--beams", type=int, default=None, help="beams per prompt, G for rl (default 20; rl 16)")
    parser.add_argument("--history", type=int, default=None, help="items in each prompt's history (default 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (default 8)")
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary trained on the titles (4096)")
    parser.add_argument(
        "--model-vocab",
        type=int,
        default=None,
        help="model vocabulary; the BPE's ids are spread over it at random (default 0: the BPE's own size)",
    )
    parser.add_argument("--hidden-size", type=int, default=None, help="Qwen2 hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=None, help="Qwen2 decoder layers (default 4)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each variant, timed RL steps for rl (default 3)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: small ops stay comparable on a shared machine; 0: torch's default)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--memory-of",
        default=None,
        help="(used by `decode` itself) run only this variant once, in this process, and print its peak memory as JSON",
    )


def run(args: argparse.Namespace, config: dict) -> int:
    apply_preset(args)
    check_sizes(args)
    module, name = BENCHMARKS[args.which]
    return getattr(importlib.import_module(module), name)(args, config) or 0


def apply_preset(args: argparse.Namespace) -> None:
    """Fill every size option left out (None) from `args.preset`."""
    presets = PRESETS[args.which]
    if args.preset not in presets:
        raise RereError(f"`rere bench {args.which}` has no preset {args.preset!r} (it has: {', '.join(presets)}).")
    for name, value in presets[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def check_sizes(args: argparse.Namespace) -> None:
    for name in ("items", "prompts", "beams", "history", "batch_size", "hidden_size", "layers", "repeats"):
        if getattr(args, name) < 1:
            raise RereError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.beams > args.items:
        raise RereError(f"--beams {args.beams} is larger than --items {args.items}; beams are distinct items.")
    if args.threads < 0:
        raise RereError(f"--threads must be >= 0 (0: torch's default), got {args.threads}.")
    if args.vocab_size < 300:
        raise RereError(f"--vocab-size must be >= 300 (256 bytes + merges), got {args.vocab_size}.")
    if args.which == "rl" and args.model_vocab:
        raise RereError("--model-vocab is for `rere bench decode`; rl tokenizes prompt text with the BPE itself.")
    if args.model_vocab and args.model_vocab < args.vocab_size:
        raise RereError(f"--model-vocab {args.model_vocab} is smaller than --vocab-size {args.vocab_size}.")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RereError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False).")
