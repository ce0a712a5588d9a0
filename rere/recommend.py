"""Top-K items for one user history, from a trained model folder.

    rere recommend --model models/ml100k/sft --index index/ml100k \\
        --history "Toy Story (1995)" "Fargo (1996)" --k 5
    rere recommend --model models/ml100k/rere --index index/ml100k --item-ids 0 49 99 --json

History items are given as unique titles (with or without the surrounding double quotes
the title index writes), as item codes (e.g. `<a_1><b_7><c_3>` for a semantic-ID index), or
as item ids. Unknown items are an error listing them, or are skipped with a warning under
`--skip-unknown`. Items are ranked by the same constrained beam search as `rere evaluate`;
scores are the model's log-probabilities of writing each item.

A history longer than the model was trained on is cut to its last `--max-history` items
(default: `datasets.<the model's dataset>.max_history` from the model folder's config.yaml,
else from the current config), and the log says so; a prompt that still does not fit in the
model's context (`max_position_embeddings`) is refused.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from rere import RereError

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="trained model folder (sft, rl or base)")
    parser.add_argument("--index", required=True, help="item index folder the model was trained with")
    parser.add_argument(
        "--history", nargs="+", default=[], metavar="TITLE", help="history items, oldest first, by title or code"
    )
    parser.add_argument(
        "--item-ids", nargs="+", type=int, default=[], metavar="ID", help="history items by item id (after --history)"
    )
    parser.add_argument("--k", type=int, default=10, help="how many items to recommend (default 10)")
    parser.add_argument(
        "--skip-unknown", action="store_true", help="warn about unknown history items instead of failing"
    )
    parser.add_argument("--exclude-history", action="store_true", help="do not recommend items already in the history")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--max-history",
        type=int,
        default=None,
        metavar="N",
        help="keep the last N history items (default: the model's datasets.<name>.max_history)",
    )


def resolve_history(index, titles: list[str], item_ids: list[int], skip_unknown: bool = False) -> list[int]:
    """Map titles / codes / ids to item ids, in the given order (titles first, then ids)."""
    by_title = {item["title"]: item["item_id"] for item in index.items}
    known_ids = set(index.item_ids)
    resolved, unknown = [], []
    for text in titles:
        stripped = text.strip()
        unquoted = stripped[1:-1] if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"' else stripped
        for candidate in (stripped, unquoted):
            if candidate in by_title:
                resolved.append(by_title[candidate])
                break
            if candidate in index.code_to_item:
                resolved.append(index.code_to_item[candidate])
                break
        else:
            unknown.append(repr(text))
    for item_id in item_ids:
        if item_id in known_ids:
            resolved.append(item_id)
        else:
            unknown.append(f"id {item_id}")
    if unknown:
        listing = ", ".join(unknown)
        if not skip_unknown:
            raise RereError(
                f"unknown history item(s): {listing}. Titles must match the catalogue exactly (see the index's "
                "index.json or the dataset's info.txt); pass --skip-unknown to leave them out."
            )
        log.warning("skipping unknown history item(s): %s", listing)
    if not resolved:
        raise RereError("the history is empty: give at least one known item with --history or --item-ids.")
    return resolved


def trained_history(model_dir, meta: dict, config: dict) -> int | None:
    """`datasets.<dataset>.max_history` of the model's dataset (rere.json's `dataset`): from the
    resolved config saved in the model folder, else from the current config; None if neither has it."""
    import yaml

    saved = Path(model_dir) / "config.yaml"
    configs = [config]
    if saved.is_file():
        try:
            configs.insert(0, yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
        except (yaml.YAMLError, UnicodeDecodeError):
            log.warning("%s is not readable YAML; the history limit comes from the current config", saved)
    for cfg in configs:
        ds = (cfg.get("datasets") or {}).get(meta.get("dataset")) if isinstance(cfg, dict) else None
        if isinstance(ds, dict) and isinstance(ds.get("max_history"), int):
            return ds["max_history"]
    return None


def cut_history(history: list[int], max_history: int | None) -> list[int]:
    """The last `max_history` items (all of them for None), logging what was left out."""
    if max_history is not None and max_history < 1:
        raise RereError(f"--max-history {max_history}: keep at least 1 item.")
    if max_history is None or len(history) <= max_history:
        return history
    log.info(
        "the history has %d items; keeping the last %d (the model was trained on histories of at most %d)",
        len(history),
        max_history,
        max_history,
    )
    return history[-max_history:]


def recommend(
    model, tokenizer, index, history: list[int], k: int, style: str, seed: int, exclude_history: bool = False
):
    """[(item_id, log-prob)] of the top-k items, best first. Refuses a prompt that (with the
    longest item) does not fit in the model's context."""
    import torch

    from rere import prompts
    from rere.decoding import beam_search, catalogue_trie

    n_items = len(index.item_ids)
    exclude = set(history) if exclude_history else set()
    beams = k + len(exclude)
    if k < 1 or k > n_items - len(exclude):
        raise RereError(f"--k {k}: choose between 1 and {n_items - len(exclude)} (the catalogue has {n_items} items).")
    codes = index.code_of
    rng = prompts.row_rng(seed, "recommend")
    text = prompts.build_prompt([codes[h] for h in history], style, rng, prompts.eos_text(tokenizer, style))
    ids = tokenizer([text])["input_ids"]
    trie, _ = catalogue_trie(model, tokenizer, index, style, seed)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and len(ids[0]) + trie.max_depth > limit:
        raise RereError(
            f"the prompt for {len(history)} history items has {len(ids[0])} tokens and an item up to "
            f"{trie.max_depth} more, but the model takes {limit} positions; give fewer items (--max-history N)."
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    with torch.no_grad():
        (row,) = beam_search(model, ids, trie, beams, pad, 1)
    out = [(index.item_ids[pos], float(logp)) for pos, logp in row if index.item_ids[pos] not in exclude]
    return out[:k]


def format_table(recs: list[tuple[int, float]], titles: dict[int, str]) -> str:
    lines = [f"{'rank':>4}  {'item_id':>7}  {'log_prob':>9}  title"]
    for rank, (item_id, score) in enumerate(recs, 1):
        lines.append(f"{rank:>4}  {item_id:>7}  {score:>9.4f}  {titles[item_id]}")
    return "\n".join(lines)


def run(args, config) -> int:
    from rere.index import ItemIndex
    from rere.model import load_model

    index = ItemIndex.load(args.index)
    history = resolve_history(index, args.history, args.item_ids, args.skip_unknown)
    model, tokenizer, meta = load_model(args.model, index=index, trust_remote_code=config["model"]["trust_remote_code"])
    limit = args.max_history if args.max_history is not None else trained_history(args.model, meta, config)
    history = cut_history(history, limit)
    recs = recommend(
        model, tokenizer, index, history, args.k, meta["prompt_style"], config["seed"], args.exclude_history
    )
    titles = {item["item_id"]: item["title"] for item in index.items}
    if args.json:
        payload = {
            "history": [{"item_id": h, "title": titles[h]} for h in history],
            "recommendations": [
                {"rank": r, "item_id": i, "title": titles[i], "log_prob": s} for r, (i, s) in enumerate(recs, 1)
            ],
        }
        json.dump(payload, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(recs, titles))
    return 0
