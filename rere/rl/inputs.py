"""What `rere rl` reads, checked before training: model, index, train rows, trie, reward resources."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rere import RereError
from rere.io import read_split
from rere.rl.settings import PINNED_TRL, RLSettings


@dataclasses.dataclass
class RLInputs:
    """Everything `rere rl` reads, checked before any training starts."""

    settings: RLSettings
    index: object  # rere.index.ItemIndex
    model: object
    tokenizer: object
    meta: dict
    train: list[dict]  # TRL dataset rows (training_rows)
    item_seqs: list[list[int]]  # item position -> completion token ids, EOS included
    trie: object  # rere.decoding.ItemTrie
    funcs: list
    valid_rows: list[dict] | None
    save_dtype: object  # torch dtype the policy is saved in: the start model's


def load_inputs(args, config) -> RLInputs:
    import trl

    from rere import prompts
    from rere.decoding import catalogue_trie
    from rere.index import ItemIndex
    from rere.metrics import select_rows
    from rere.model import load_model
    from rere.rewards import reward_funcs

    if trl.__version__ != PINNED_TRL:
        raise RereError(
            f"rere rl overrides private parts of trl {PINNED_TRL} but trl {trl.__version__} is installed; "
            f"install trl=={PINNED_TRL} (pyproject pins it)."
        )
    s = RLSettings.from_config(config, args.variant)
    seed = config["seed"]
    data, start = Path(args.data), Path(args.model)
    index = ItemIndex.load(args.index)
    index.check_catalogue(data)
    model, tokenizer, meta = load_model(
        start, index=index, for_training=True, trust_remote_code=config["model"]["trust_remote_code"]
    )
    save_dtype = model.dtype
    if s.train_dtype == "float32":
        # float32 weights, gradients and AdamW states (bf16 compute with rl.bf16): in bf16, a step
        # smaller than ~0.3 % of a weight rounds away, and lr 1e-5 steps mostly are.
        model.float()
    if s.sampling in ("beam", "dynamic") and s.num_generations > len(index.items):
        raise RereError(
            f"rl.num_generations={s.num_generations} distinct items per prompt, but the catalogue has only "
            f"{len(index.items)}; lower rl.num_generations."
        )
    rows = select_rows(prompt_pool(read_split(data / "train.csv"), s.prompt_pool), s.max_train_rows, seed)
    if len(rows) < s.batch_prompts:
        raise RereError(f"{data}/train.csv: {len(rows)} rows, fewer than rl.batch_prompts={s.batch_prompts}.")
    style = meta["prompt_style"]
    trie, item_seqs = catalogue_trie(model, tokenizer, index, style, seed)
    resources = {}
    if s.reward == "semantic":
        resources["item_vectors"] = item_vectors(data, config)
    if s.reward == "collaborative":
        resources["scorer"] = collaborative_scorer(args.sasrec)
    valid_rows = select_rows(read_split(data / "valid.csv"), s.eval_rows, seed) if s.eval_every else None
    # With beta > 0 and a full model TRL loads the reference from the policy's config path:
    # that must be the start folder itself.
    model.config._name_or_path = str(start.resolve())
    return RLInputs(
        settings=s,
        index=index,
        model=model,
        tokenizer=tokenizer,
        meta=meta,
        train=training_rows(rows, index, style, seed, prompts.eos_text(tokenizer, style)),
        item_seqs=item_seqs,
        trie=trie,
        funcs=reward_funcs(s.reward, **resources),
        valid_rows=valid_rows,
        save_dtype=save_dtype,
    )


def prompt_pool(rows: list[dict], pool: str) -> list[dict]:
    """The train rows RL may draw prompts from, in file order. all: every row; latest: per
    user, the row with the largest timestamp (ties: the later line), i.e. the longest
    history of a user's train rows in a leave-one-out split.

    >>> rows = [{"user_id": "u", "timestamp": 1, "_line": 2}, {"user_id": "v", "timestamp": 5, "_line": 3},
    ...         {"user_id": "u", "timestamp": 3, "_line": 4}, {"user_id": "u", "timestamp": 3, "_line": 5}]
    >>> [r["_line"] for r in prompt_pool(rows, "latest")]
    [3, 5]
    """
    if pool == "all":
        return list(rows)
    latest = {}
    for i, row in enumerate(rows):
        user = row["user_id"]
        if user not in latest or row["timestamp"] >= rows[latest[user]]["timestamp"]:  # a tie: the later line
            latest[user] = i
    return [rows[i] for i in sorted(latest.values())]


def training_rows(rows: list[dict], index, style: str, seed: int, eos: str = "") -> list[dict]:
    """One TRL dataset row per train row: prompt text, target item id, history, row number."""
    from rere import prompts

    code_of = index.code_of
    out = []
    for i, row in enumerate(rows):
        if row["item_id"] not in code_of:
            raise RereError(
                f"train.csv line {row.get('_line', '?')}: target item {row['item_id']} is not in the index; "
                "rebuild the index from this data folder with `rere index`."
            )
        out.append(
            {
                "prompt": prompts.row_prompt(row, code_of, style, seed, eos),
                "target": int(row["item_id"]),
                "history": [int(x) for x in row["history_item_id"]],
                "row": i,
            }
        )
    return out


def item_vectors(data: Path, config: dict):
    """Item embeddings for the semantic reward, rows indexed by item id: the index stage's
    embedder (`index.sid`, rere.index.item_embeddings)."""
    import numpy as np

    from rere.index import item_embeddings
    from rere.io import read_jsonl

    records = sorted(read_jsonl(data / "items.jsonl"), key=lambda r: int(r["item_id"]))
    texts = [str(r.get("text") or r.get("title") or "") for r in records]
    emb = item_embeddings(data, [int(r["item_id"]) for r in records], texts, config["index"]["sid"], config["seed"])
    out = np.zeros((max(int(r["item_id"]) for r in records) + 1, emb.shape[1]))
    out[[int(r["item_id"]) for r in records]] = emb
    return out


def collaborative_scorer(folder: str | Path | None):
    """scorer(histories, items) -> scores from a trained SASRec (rere.baselines)."""
    if folder is None:
        raise RereError(
            "reward 'collaborative' needs --sasrec results/D/sasrec (from `rere baseline --method sasrec`)."
        )
    from rere.baselines import load_sequential, score_items

    model = load_sequential(folder)

    def scorer(histories: list[list[int]], items: list[int]) -> list[float]:
        return [float(x) for x in score_items(model, histories, items)]

    return scorer
