"""The `rere` command: one subcommand per pipeline stage.

Every Snakemake rule, every dvc.yaml stage and every test calls these same subcommands.
Each stage lives in its own module exposing `add_arguments(parser)` and `run(args, config)`;
modules are imported only when their subcommand runs, so `rere data` does not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rere import RereError, __version__
from rere.config import load_config

# subcommand -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "data": ("rere.data", "download and preprocess a dataset into D3-format splits"),
    "index": ("rere.index", "build the item index (titles or semantic IDs)"),
    "model": ("rere.model", "build (scratch) or fetch (pretrained) the base model"),
    "sft": ("rere.sft", "supervised fine-tuning on next-item generation"),
    "evaluate": ("rere.evaluate", "full-catalogue constrained beam search evaluation"),
    "baseline": ("rere.baselines", "train and evaluate a classic baseline (pop, sasrec, gru4rec)"),
    "rl": ("rere.rl", "ReRe reinforcement learning from the SFT model"),
    "recommend": ("rere.recommend", "top-K items for a user history from a trained model"),
    "report": ("rere.report", "results table, report and figures"),
    "bench": ("rere.bench", "benchmarks (decode, rl)"),
}

log = logging.getLogger("rere")


def add_stage_paths(parser: argparse.ArgumentParser, model: str | None, out: str) -> None:
    """--data, --index, (--model), --out: the folders every LLM stage reads and writes."""
    parser.add_argument("--data", required=True, help="dataset folder from `rere data` (data/D)")
    parser.add_argument("--index", required=True, help="item index folder from `rere index` (index/D)")
    if model is not None:
        parser.add_argument("--model", required=True, help=model)
    parser.add_argument("--out", required=True, help=out)


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen stage's module is imported (for its arguments): `rere data` stays light."""
    parser = argparse.ArgumentParser(prog="rere", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rere {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (module, help_) in STAGES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "--config",
            action="append",
            metavar="PATH",
            help="YAML config (repeatable; later files override earlier). Default: config/config.yaml",
        )
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. sft.max_steps=10"
        )
        p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
        p.set_defaults(_module=module)
        if name != chosen:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=True)
            continue
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen).parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if getattr(args, "_missing", False):
        print(f"rere {args.stage}: this stage is not available in this version.", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.set)
        return importlib.import_module(args._module).run(args, config) or 0
    except RereError as exc:
        print(f"rere {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rere {args.stage}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
