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
built from config (`rere.synthetic`). `decode` is in `rere.bench.decode`, `rl` in `rere.bench.rl`.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from rere import RereError

# which -> (module, function(args, config) -> exit code); modules import lazily.
BENCHMARKS = {"decode": ("rere.bench.decode", "bench_decode"), "rl": ("rere.bench.rl", "bench_rl")}


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
    check_sizes(args)
    module, name = BENCHMARKS[args.which]
    return getattr(importlib.import_module(module), name)(args, config) or 0


def check_sizes(args: argparse.Namespace) -> None:
    for name in ("items", "prompts", "beams", "history", "batch_size", "hidden_size", "layers"):
        if getattr(args, name) < 1:
            raise RereError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.beams > args.items:
        raise RereError(f"--beams {args.beams} is larger than --items {args.items}; beams are distinct items.")
    if args.threads < 0:
        raise RereError(f"--threads must be >= 0 (0: torch's default), got {args.threads}.")
    if args.vocab_size < 300:
        raise RereError(f"--vocab-size must be >= 300 (256 bytes + merges), got {args.vocab_size}.")
