"""Full-catalogue evaluation: constrained beam search over every item, HR@K and NDCG@K.

`rere evaluate --data data/D --index index/D --model models/D/M --out results/D/M`

For each row of `evaluate.split` (or a deterministic subsample of `evaluate.max_rows`), the
model writes `evaluate.num_beams` distinct catalogue items by trie-constrained beam search
(rere.decoding); the beams, best first, are the ranked list. `predictions.jsonl` and
`metrics.json` go through rere.metrics.write_results, the code the baselines use too.

`evaluate_model` is the whole evaluation on an in-memory model, so the RL stage runs exactly
this code for its periodic and final evaluations.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rere import RereError
from rere.config import check_cutoffs
from rere.io import atomic_path, check_row_items, data_seed, read_split, save_resolved_config

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    from rere.cli import add_stage_paths

    add_stage_paths(
        parser,
        model="model folder (from `rere sft`, `rere rl` or `rere model`)",
        out="results folder: metrics.json, predictions.jsonl, config.yaml",
    )
    parser.add_argument("--method", default=None, help="method name in metrics.json (default: the model folder's name)")


def check_request(index, rows: list, ev: dict, split: str, source: str = "") -> None:
    """The cheap checks that must pass before any decoding starts."""
    if not rows:
        raise RereError(f"{source or split}: the {split} split has no rows; nothing to evaluate.")
    check_cutoffs(ev, "config")
    if ev["num_beams"] > len(index.items):
        raise RereError(
            f"evaluate.num_beams={ev['num_beams']} but the catalogue has only {len(index.items)} items; "
            "beams are distinct items, so set evaluate.num_beams <= the number of items."
        )
    fix = "the data and the index come from different datasets (rebuild the index with `rere index`)."
    check_row_items(rows, set(index.item_ids), source or split, "the index", fix)


def prompt_ids(tokenizer, rows: list[dict], index, style: str, seed: int) -> list[list[int]]:
    """Token ids of each row's prompt (`rere.prompts.row_prompt`), tokenized as SFT tokenizes
    it (the tokenizer's special tokens included)."""
    from rere import prompts

    codes = index.code_of
    eos = prompts.eos_text(tokenizer, style)
    return tokenizer([prompts.row_prompt(r, codes, style, seed, eos) for r in rows])["input_ids"]


def written_items(trie, tokenizer, index, positions) -> dict[int, int | None]:
    """For each item position the decoder can report, the catalogue item its tokens really
    spell, found without the trie's item labels: the tokens on the path from the root to the
    leaf labelled with that position (the transitions beam search followed), decoded by the
    tokenizer and looked up in the index's code table. None: not the code of any item.

    This is what keeps `invalid` honest: a trie whose labels or sequences are wrong (a bug
    in building it, another tokenizer) shows up as beams that are not what they claim.
    """
    import unicodedata

    from rere.prompts import completion_text

    def key(text: str) -> str:
        return unicodedata.normalize("NFC", text).strip()

    code_table = {
        key(completion_text(code)): item_id for code, item_id in zip(index.codes, index.item_ids, strict=True)
    }
    labels = trie.item_of_leaf.tolist()  # (num_nodes,) position at a leaf, -1 elsewhere
    leaf_of = {pos: node for node, pos in enumerate(labels) if pos >= 0}
    parent = [0] * len(labels)
    token = [-1] * len(labels)
    for k, child, tok in zip(trie.edge_keys.tolist(), trie.edge_child.tolist(), trie.edge_token.tolist(), strict=True):
        parent[child], token[child] = k // trie.vocab_size, tok
    out: dict[int, int | None] = {}
    for pos in set(positions):
        node, path = leaf_of.get(pos), []
        while node:  # up to the root (node 0)
            path.append(token[node])
            node = parent[node]
        path.reverse()
        while path and path[-1] == trie.eos_token_id:
            path.pop()
        text = tokenizer.decode(path, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out[pos] = code_table.get(key(text)) if path else None
    return out


def evaluate_model(
    model,
    tokenizer,
    index,
    rows: list[dict],
    config: dict,
    *,
    style: str,
    split: str | None = None,
    trie=None,
    progress: bool = True,
) -> tuple[list[list[int]], list[list[float]], dict]:
    """Rank the catalogue for every row by constrained beam search.

    Returns (ranked item ids per row, best first; their sequence log-probs; metrics), where
    metrics has hr@K / ndcg@K for `evaluate.ks`, rows, invalid (beams whose tokens do not spell
    the code of the item they are reported as, per `written_items`, or that repeat an item of
    their row; left out of the ranking; must be 0), invalid_rate = invalid / (rows * num_beams),
    throughput (rows/s of decoding), split and num_beams.
    `trie` can be passed to reuse one across calls (it depends only on tokenizer and index).
    """
    import torch

    from rere.decoding import beam_search, catalogue_trie
    from rere.metrics import hr_ndcg, rank_of

    ev = config["evaluate"]
    split = split or ev["split"]
    check_request(index, rows, ev, split)
    seed = config["seed"]
    if trie is None:
        trie, _ = catalogue_trie(model, tokenizer, index, style, seed)
    ids = prompt_ids(tokenizer, rows, index, style, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    n_items = len(index.item_ids)
    started = time.perf_counter()
    with torch.no_grad():
        beams = beam_search(model, ids, trie, ev["num_beams"], pad, ev["batch_size"], progress=progress)
    elapsed = time.perf_counter() - started
    written = written_items(trie, tokenizer, index, [int(pos) for row in beams for pos, _ in row])
    ranked: list[list[int]] = []
    scores: list[list[float]] = []
    invalid = 0
    for row_beams in beams:
        items, item_scores, seen = [], [], set()
        for pos, logp in row_beams:
            pos = int(pos)
            item = index.item_ids[pos] if 0 <= pos < n_items else None
            if item is None or written[pos] != item or item in seen:
                invalid += 1  # its tokens are not this item's code, or the item is already in the list
                continue
            seen.add(item)
            items.append(item)
            item_scores.append(float(logp))
        invalid += ev["num_beams"] - len(row_beams)  # a beam that ended without an item
        ranked.append(items)
        scores.append(item_scores)
    if invalid:
        log.error(
            "%d of %d generated beams did not write the distinct catalogue item they were reported as; "
            "constrained decoding (the item trie) is broken.",
            invalid,
            len(rows) * ev["num_beams"],
        )

    metrics = dict(hr_ndcg([rank_of(r, row["item_id"]) for r, row in zip(ranked, rows, strict=True)], ev["ks"]))
    metrics.update(
        rows=len(rows),
        invalid=invalid,
        invalid_rate=invalid / (len(rows) * ev["num_beams"]),
        throughput=len(rows) / elapsed if elapsed > 0 else float("inf"),
        split=split,
        num_beams=ev["num_beams"],
    )
    return ranked, scores, metrics


def run(args, config) -> int:
    import torch

    from rere import tracking
    from rere.index import ItemIndex
    from rere.metrics import select_rows, write_results
    from rere.model import load_model

    ev = config["evaluate"]
    data, out, model_dir = Path(args.data), Path(args.out), Path(args.model)
    split = ev["split"]
    method = args.method or model_dir.name
    dataset = data.name

    index = ItemIndex.load(args.index)
    index.check_catalogue(data)  # ids alone can agree between two catalogues
    split_file = data / f"{split}.csv"
    rows = select_rows(read_split(split_file), ev["max_rows"], data_seed(data, config["seed"]))
    check_request(index, rows, ev, split, source=str(split_file))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, meta = load_model(
        model_dir, index=index, device=device, trust_remote_code=config["model"]["trust_remote_code"]
    )

    with tracking.stage_run(config, stage="evaluate", dataset=dataset, method=method, index_kind=index.kind) as mlrun:
        ranked, scores, metrics = evaluate_model(
            model, tokenizer, index, rows, config, style=meta["prompt_style"], split=split
        )
        extra = {k: metrics[k] for k in ("invalid", "invalid_rate", "throughput", "split", "num_beams")}
        extra.update(method=method, dataset=dataset, trained_on=meta.get("machine"))
        with atomic_path(out) as tmp:
            final = write_results(tmp, rows, ranked, scores, ev["ks"], extra=extra)
            save_resolved_config(tmp, config)
        mlrun.log_metrics(final)
        mlrun.log_artifact(out / "metrics.json")
    shown = ", ".join(f"{k}={final[k]:.4f}" for k in final if k.startswith(("hr@", "ndcg@")))
    log.info(
        "%s on %s/%s (%d rows, %.1f rows/s): %s", method, dataset, split, final["rows"], final["throughput"], shown
    )
    return 0
