"""Classic baselines: Pop, SASRec and GRU4Rec on the same splits, ranked over the whole catalogue.

    rere baseline --method {pop,sasrec,gru4rec} --data data/D --out results/D/METHOD

Every method is trained on train.csv, tuned and early-stopped on valid.csv only, and evaluated
on `evaluate.split` (the same `evaluate.max_rows` subsample as the LLM, `rere.metrics.select_rows`).
The top-max(evaluate.ks) list of every row goes through `rere.metrics.write_results`, the code
the LLM evaluation uses, so the two are measured identically. Full ranking: every catalogue
item is a candidate and nothing is excluded, not even the user's history (the LLM may
recommend a history item too).

- pop: an item's popularity is the number of distinct train interactions with it, i.e. the
  (user_id, item_id, timestamp) triples found in train.csv as a target or inside a history
  (each counted once, however many rows repeat it). Every user gets the same list: most
  interactions first, ties broken by smaller item_id. Its score is the count.
- sasrec: causal self-attention over the (left-padded) history with learned positional
  embeddings (Kang & McAuley, 2018), pre-LayerNorm blocks; the last position's state is
  scored against every item embedding (tied input/output), cross-entropy over all items,
  one target per D3 row. Max length = the dataset's max_history.
- gru4rec: the same model and training with a GRU encoder (Hidasi et al., 2016) in place of
  the attention blocks.

Both neural models: Adam, early stopping on valid NDCG@10 with `patience`, best epoch's
weights kept; list-valued hyper-parameters in `baselines.sasrec` form a grid whose winner
is the best valid NDCG@10 (the first in grid order on ties). Seeded; deterministic on CPU.
Saved as `model.pt` (a state_dict) + `<method>.json` (hyper-parameters, item count, max
length, grid results) so the RL `collaborative` reward can use it:
`score_items(load_sequential("results/D/sasrec"), histories, item_ids)`.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from rere import RereError
from rere.io import (
    atomic_path,
    data_seed,
    read_catalogue,
    read_json,
    read_split,
    save_resolved_config,
    write_json,
)
from rere.machine import describe
from rere.metrics import hr_ndcg, rank_of, select_rows, write_results
from rere.tracking import stage_run

log = logging.getLogger(__name__)

METHODS = ("pop", "sasrec", "gru4rec")
GRID_KEYS = ("hidden_size", "num_layers", "dropout", "learning_rate")  # may be lists in the config
SELECT_K = 10  # model selection and early stopping use valid NDCG@10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=METHODS, help="which baseline to train and evaluate")
    parser.add_argument("--data", required=True, type=Path, help="dataset folder from `rere data` (data/D)")
    parser.add_argument("--out", required=True, type=Path, help="results folder (results/D/METHOD)")


# ----------------------------------------------------------------------------- data


@dataclass
class Dataset:
    """Splits read from data/D, with item ids checked against the catalogue."""

    splits: dict[str, list[dict]]
    num_items: int
    max_len: int


def load_dataset(folder: Path, splits: tuple[str, ...]) -> Dataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise RereError(f"{folder} is not a folder; run `rere data --out {folder}` first.")
    catalogue = read_catalogue(folder / "info.txt")
    num_items = len(catalogue)
    if sorted(catalogue) != list(range(num_items)):
        raise RereError(f"{folder / 'info.txt'}: item ids must be 0..{num_items - 1} without gaps.")
    rows = {name: read_split(folder / f"{name}.csv") for name in splits}
    for name, split_rows in rows.items():
        if not split_rows:
            raise RereError(
                f"{folder / (name + '.csv')} has no rows; a baseline needs train, valid and the evaluated split."
            )
        for r in split_rows:
            bad = [i for i in [*r["history_item_id"], r["item_id"]] if not 0 <= i < num_items]
            if bad:
                raise RereError(
                    f"{folder / (name + '.csv')}: line {r['_line']}: item id(s) {bad} are not in info.txt (0..{num_items - 1})."
                )
    stats_path = folder / "stats.json"
    if stats_path.is_file() and read_json(stats_path).get("max_history"):
        max_len = int(read_json(stats_path)["max_history"])
    else:  # a d3 folder imported as is may have no stats.json
        max_len = max(len(r["history_item_id"]) for split_rows in rows.values() for r in split_rows)
    return Dataset(rows, num_items, max_len)


def history_tensor(histories: list[list[int]], max_len: int) -> torch.Tensor:
    """Item-id histories -> (B, max_len) long, left-padded with 0 and ids shifted by +1.

    The most recent item is always in the last column; longer histories keep their last max_len.
    """
    out = torch.zeros(len(histories), max_len, dtype=torch.long)  # (B, T)
    for i, h in enumerate(histories):
        h = h[-max_len:]
        if h:
            out[i, max_len - len(h) :] = torch.tensor(h, dtype=torch.long) + 1
    return out


# ----------------------------------------------------------------------------- pop


def popularity(train_rows: list[dict], num_items: int) -> list[int]:
    """Distinct train interactions per item: (user_id, item_id, timestamp) from targets and histories."""
    seen: set[tuple[Any, int, int]] = set()
    for r in train_rows:
        seen.add((r["user_id"], r["item_id"], r["timestamp"]))
        seen.update((r["user_id"], i, t) for i, t in zip(r["history_item_id"], r["history_timestamp"], strict=True))
    counts = Counter(item for _, item, _ in seen)
    return [counts.get(i, 0) for i in range(num_items)]


def pop_ranking(counts: list[int], k: int) -> tuple[list[int], list[float]]:
    """The k most popular item ids (most first, ties by smaller id) and their counts."""
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))[:k]
    return order, [float(counts[i]) for i in order]


# ----------------------------------------------------------------------------- models


class SequentialModel(nn.Module):
    """Shared item embedding (row 0 = padding, item i -> row i+1), tied output scoring."""

    def __init__(self, num_items: int, max_len: int, hidden_size: int, dropout: float):
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
        self.dropout = nn.Dropout(dropout)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, T) left-padded histories -> (B, num_items) scores of every catalogue item."""
        user = self.encode(seqs)  # (B, H)
        return user @ self.item_emb.weight[1:].T  # (B, N)


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LN block: x + MHA(LN(x)) with a causal mask, then x + FFN(LN(x))."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size)
        )
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(H, dim=2)  # 3 x (B, T, H)
        q, k, v = (
            t.view(B, T, self.num_heads, H // self.num_heads).transpose(1, 2) for t in (q, k, v)
        )  # (B, h, T, H/h)
        drop = self.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop)  # (B, h, T, H/h)
        a = a.transpose(1, 2).reshape(B, T, H)  # (B, T, H)
        x = x + self.dropout(self.proj(a))
        return x + self.dropout(self.ffn(self.norm2(x)))


class SASRec(SequentialModel):
    def __init__(self, num_items: int, max_len: int, hidden_size: int, num_layers: int, num_heads: int, dropout: float):
        super().__init__(num_items, max_len, hidden_size, dropout)
        if hidden_size % num_heads:
            raise RereError(f"baselines.sasrec: hidden_size {hidden_size} is not divisible by num_heads {num_heads}.")
        self.pos_emb = nn.Embedding(max_len, hidden_size)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(hidden_size, num_heads, dropout) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_size)
        self._init_weights()

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        B, T = seqs.shape
        real = seqs > 0  # (B, T)
        x = self.item_emb(seqs) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb.weight[-T:]  # (B, T, H)
        x = self.dropout(x) * real.unsqueeze(-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=seqs.device).tril()  # (T, T)
        # A position sees earlier real items and itself; pads (which see only themselves, so no
        # softmax row is empty) never leak into real positions.
        eye = torch.eye(T, dtype=torch.bool, device=seqs.device)
        allowed = (causal & real.unsqueeze(1)) | eye  # (B, T, T)
        allowed = allowed.unsqueeze(1)  # (B, 1, T, T), broadcast over heads
        for block in self.blocks:
            x = block(x, allowed) * real.unsqueeze(-1)
        return self.final_norm(x[:, -1])  # (B, H): the most recent item's position


class GRU4Rec(SequentialModel):
    def __init__(self, num_items: int, max_len: int, hidden_size: int, num_layers: int, dropout: float, **_):
        super().__init__(num_items, max_len, hidden_size, dropout)
        self.gru = nn.GRU(
            hidden_size, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self._init_weights()

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        B, T = seqs.shape
        lengths = (seqs > 0).sum(1).clamp(min=1)  # (B,)
        # left padding -> right padding, so the packed GRU stops at the most recent item
        shift = (torch.arange(T, device=seqs.device).unsqueeze(0) + (T - lengths).unsqueeze(1)) % T  # (B, T)
        x = self.dropout(self.item_emb(seqs.gather(1, shift)))  # (B, T, H)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h_n = self.gru(packed)  # (layers, B, H)
        return h_n[-1]  # (B, H)


def build_model(method: str, num_items: int, max_len: int, hp: HyperParams) -> SequentialModel:
    kwargs = dict(
        num_items=num_items, max_len=max_len, hidden_size=hp.hidden_size, num_layers=hp.num_layers, dropout=hp.dropout
    )
    if method == "sasrec":
        return SASRec(num_heads=hp.num_heads, **kwargs)
    if method == "gru4rec":
        return GRU4Rec(**kwargs)
    raise RereError(f"unknown sequential baseline '{method}' (known: sasrec, gru4rec).")


# ----------------------------------------------------------------------------- config


@dataclass
class HyperParams:
    """One grid point (all scalars)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    dropout: float
    learning_rate: float
    batch_size: int
    epochs: int
    patience: int


@dataclass
class SequentialConfig:
    """`baselines.sasrec` (also used by gru4rec). List values of GRID_KEYS form a grid.

    hidden_size, num_layers, dropout, learning_rate: int/float or a list of them (grid);
    num_heads (sasrec), batch_size, epochs (upper bound), patience (epochs without a valid
    NDCG@10 gain before stopping).
    """

    hidden_size: int | list[int]
    num_layers: int | list[int]
    num_heads: int
    dropout: float | list[float]
    learning_rate: float | list[float]
    batch_size: int
    epochs: int
    patience: int
    grid: list[HyperParams] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        values = {k: getattr(self, k) if isinstance(getattr(self, k), list) else [getattr(self, k)] for k in GRID_KEYS}
        for key, vals in values.items():
            if not vals:
                raise RereError(f"baselines.sasrec.{key}: an empty list; give a value or a non-empty list.")
        fixed = {k: getattr(self, k) for k in ("num_heads", "batch_size", "epochs", "patience")}
        self.grid = [
            HyperParams(**dict(zip(GRID_KEYS, combo, strict=True)), **fixed)
            for combo in itertools.product(*values.values())
        ]
        bad = sorted({hp.hidden_size for hp in self.grid if hp.hidden_size % self.num_heads})
        if bad:
            raise RereError(
                f"baselines.sasrec.hidden_size {bad} not divisible by baselines.sasrec.num_heads={self.num_heads}; "
                "pick sizes that are multiples of num_heads."
            )


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def rank_top_k(
    model: SequentialModel, seqs: torch.Tensor, k: int, batch_size: int = 1024
) -> tuple[list[list[int]], list[list[float]]]:
    """Top-k item ids and scores per history over the whole catalogue (ties: smaller id first)."""
    was_training = model.training
    model.eval()
    ids, scores = [], []
    for start in range(0, len(seqs), batch_size):
        logits = model(seqs[start : start + batch_size])  # (b, N)
        values, order = torch.sort(logits, dim=1, descending=True, stable=True)  # (b, N)
        ids.extend(order[:, :k].tolist())
        scores.extend(values[:, :k].tolist())
    model.train(was_training)
    return ids, scores


def valid_ndcg(model: SequentialModel, seqs: torch.Tensor, targets: list[int]) -> dict[str, float]:
    ranked, _ = rank_top_k(model, seqs, SELECT_K)
    return hr_ndcg([rank_of(r, t) for r, t in zip(ranked, targets, strict=True)], [SELECT_K])


def train_one(
    method: str,
    data: Dataset,
    hp: HyperParams,
    seed: int,
    on_epoch=None,
    desc: str = "",
) -> tuple[SequentialModel, dict[str, Any]]:
    """Train one grid point on train, early-stop on valid NDCG@10; return the best-epoch model.

    `on_epoch(epoch, metrics)` receives {"train_loss", "valid_hr@10", "valid_ndcg@10"}.
    """
    torch.manual_seed(seed)
    model = build_model(method, data.num_items, data.max_len, hp)
    train_seqs = history_tensor([r["history_item_id"] for r in data.splits["train"]], data.max_len)  # (R, T)
    train_targets = torch.tensor([r["item_id"] for r in data.splits["train"]], dtype=torch.long)  # (R,)
    valid_seqs = history_tensor([r["history_item_id"] for r in data.splits["valid"]], data.max_len)
    valid_targets = [r["item_id"] for r in data.splits["valid"]]
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.learning_rate, betas=(0.9, 0.98))
    shuffle = torch.Generator().manual_seed(seed)
    best = {"valid_ndcg@10": -1.0, "epoch": 0}
    best_state = None
    stale = 0
    bar = tqdm(range(1, hp.epochs + 1), desc=desc or method, unit="epoch", leave=False)
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(train_seqs), generator=shuffle).split(hp.batch_size):
            logits = model(train_seqs[idx])  # (b, N)
            loss = F.cross_entropy(logits, train_targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        valid = valid_ndcg(model, valid_seqs, valid_targets)
        metrics = {"train_loss": total / count, "valid_hr@10": valid["hr@10"], "valid_ndcg@10": valid["ndcg@10"]}
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", ndcg10=f"{metrics['valid_ndcg@10']:.4f}")
        log.info(
            "%s epoch %d: train loss %.4f, valid NDCG@10 %.4f",
            desc or method,
            epoch,
            metrics["train_loss"],
            metrics["valid_ndcg@10"],
        )
        if on_epoch:
            on_epoch(epoch, metrics)
        if metrics["valid_ndcg@10"] > best["valid_ndcg@10"]:
            best = {"valid_ndcg@10": metrics["valid_ndcg@10"], "valid_hr@10": metrics["valid_hr@10"], "epoch": epoch}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            stale = 0
        else:
            stale += 1
            if stale >= hp.patience:
                log.info("%s: no valid NDCG@10 gain for %d epochs; stopping at epoch %d.", desc or method, stale, epoch)
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return model, {**best, "epochs_run": epoch}


def select_best(results: list[dict]) -> int:
    """Index of the best valid NDCG@10 (the first one on ties). Test metrics are never consulted.

    >>> select_best([{"valid_ndcg@10": 0.1}, {"valid_ndcg@10": 0.3}, {"valid_ndcg@10": 0.3}])
    1
    """
    return max(range(len(results)), key=lambda i: (results[i]["valid_ndcg@10"], -i))


def fit_grid(
    method: str, data: Dataset, cfg: SequentialConfig, seed: int, run=None
) -> tuple[SequentialModel, HyperParams, list[dict]]:
    """Train every grid point (same seed each), keep the best on valid NDCG@10.

    `data.splits` needs train and valid only; the evaluated split plays no part in the choice.
    """
    results: list[dict] = []
    best_model = None
    for g, hp in enumerate(cfg.grid):
        desc = f"{method} {g + 1}/{len(cfg.grid)}"
        log.info("%s: %s", desc, {k: getattr(hp, k) for k in GRID_KEYS})

        def on_epoch(epoch, metrics, g=g):
            if run is not None:
                run.log_metrics({f"grid{g}/{k}": v for k, v in metrics.items()}, step=epoch)

        model, best = train_one(method, data, hp, seed, on_epoch=on_epoch, desc=desc)
        results.append({"hyperparameters": asdict(hp), **best})
        if select_best(results) == g:  # only the current winner is kept in memory
            best_model = model
    chosen = select_best(results)
    log.info("%s: grid point %d wins with valid NDCG@10 %.4f", method, chosen + 1, results[chosen]["valid_ndcg@10"])
    return best_model, cfg.grid[chosen], results


# ----------------------------------------------------------------------------- save / load


def save_sequential(folder: Path, method: str, model: SequentialModel, hp: HyperParams, extra: dict) -> None:
    with atomic_path(folder / "model.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    meta = {
        "method": method,
        "num_items": model.num_items,
        "max_len": model.max_len,
        "hyperparameters": asdict(hp),
        **extra,
    }
    write_json(folder / f"{method}.json", meta)


def load_sequential(folder: str | Path) -> SequentialModel:
    """The SASRec/GRU4Rec saved by `rere baseline` in `folder` (model.pt + sasrec.json or gru4rec.json), in eval mode."""
    folder = Path(folder)
    metas = [folder / f"{m}.json" for m in ("sasrec", "gru4rec") if (folder / f"{m}.json").is_file()]
    if not metas or not (folder / "model.pt").is_file():
        raise RereError(
            f"{folder}: no model.pt with sasrec.json or gru4rec.json; run `rere baseline --method sasrec --out {folder}` first."
        )
    meta = read_json(metas[0])
    try:
        hp = HyperParams(**meta["hyperparameters"])
        model = build_model(meta["method"], int(meta["num_items"]), int(meta["max_len"]), hp)
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    except (KeyError, TypeError, RuntimeError) as exc:
        raise RereError(f"{folder}: model.pt does not match {metas[0].name} ({exc}); re-run `rere baseline`.") from None
    return model.eval()


@torch.no_grad()
def score_items(model: SequentialModel, histories: list[list[int]], item_ids: list[int]) -> torch.Tensor:
    """(B,) float tensor: the model's score (logit) of item_ids[b] after histories[b].

    Item ids are catalogue ids (0..N-1); histories longer than the model's max length keep
    their most recent items. The model is put in eval mode (no dropout).
    """
    if len(histories) != len(item_ids):
        raise ValueError(f"{len(histories)} histories but {len(item_ids)} items")
    for i in [*item_ids, *(x for h in histories for x in h)]:
        if not 0 <= int(i) < model.num_items:
            raise ValueError(f"item id {i} is outside the model's catalogue 0..{model.num_items - 1}")
    model.eval()
    seqs = history_tensor([[int(x) for x in h] for h in histories], model.max_len)  # (B, T)
    user = model.encode(seqs)  # (B, H)
    items = model.item_emb(torch.tensor([int(i) for i in item_ids], dtype=torch.long) + 1)  # (B, H)
    return (user * items).sum(-1)  # (B,)


# ----------------------------------------------------------------------------- stage


def run(args: argparse.Namespace, config: dict) -> int:
    method, out = args.method, Path(args.out)
    dataset_name = Path(args.data).resolve().name
    ev = config["evaluate"]
    split = ev["split"]
    needed = ("train", "valid") if split == "valid" else ("train", "valid", split)
    data = load_dataset(args.data, needed)
    top_k = max(ev["ks"])
    if top_k > data.num_items:
        raise RereError(
            f"evaluate.ks has {top_k} but the catalogue has only {data.num_items} items; lower the cut-offs."
        )
    seq_cfg = SequentialConfig(**config["baselines"]["sasrec"]) if method != "pop" else None  # checked before training
    eval_rows = select_rows(data.splits[split], ev["max_rows"], data_seed(args.data, config["seed"]))
    if config["baselines"]["num_threads"] > 0:
        # Measured on a shared 2-core machine: 2 intra-op threads ran 30x slower than 1 (spinning
        # OpenMP workers fighting other jobs); these small models gain little from threads anyway.
        torch.set_num_threads(config["baselines"]["num_threads"])
    log.info(
        "%s on %s: %d train rows, %d items, evaluating %d %s rows",
        method,
        dataset_name,
        len(data.splits["train"]),
        data.num_items,
        len(eval_rows),
        split,
    )

    with stage_run(config, stage="baseline", dataset=dataset_name, method=method) as tracker:
        started = time.perf_counter()
        if method == "pop":
            counts = popularity(data.splits["train"], data.num_items)
            eval_started = time.perf_counter()
            top, top_scores = pop_ranking(counts, top_k)
            ranked, scores = [top] * len(eval_rows), [top_scores] * len(eval_rows)
        else:
            model, hp, grid = fit_grid(
                method,
                Dataset({k: data.splits[k] for k in ("train", "valid")}, data.num_items, data.max_len),
                seq_cfg,
                config["seed"],
                tracker,
            )
            chosen = select_best(grid)
            save_sequential(
                out,
                method,
                model,
                hp,
                {
                    "dataset": dataset_name,
                    "seed": config["seed"],
                    "best_valid_ndcg@10": grid[chosen]["valid_ndcg@10"],
                    "chosen": chosen,
                    "grid": grid,
                },
            )
            eval_started = time.perf_counter()
            seqs = history_tensor([r["history_item_id"] for r in eval_rows], data.max_len)
            ranked, scores = rank_top_k(model, seqs, top_k)
        elapsed = time.perf_counter() - eval_started
        save_resolved_config(out, config)
        extra = {
            "method": method,
            "dataset": dataset_name,
            "split": split,
            "num_beams": None,  # full ranking, no beam search
            "invalid_rate": None,  # n/a: a baseline ranks catalogue ids, it cannot write an invalid item
            "throughput": len(eval_rows) / elapsed if elapsed > 0 else None,
            "trained_on": describe(),  # trained and evaluated in this process (rere.machine)
        }
        metrics = write_results(out, eval_rows, ranked, scores, ev["ks"], extra)
        tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith(("hr@", "ndcg@", "repeat@"))})
        tracker.log_metrics({"wall_seconds": time.perf_counter() - started})
        tracker.log_artifact(out / "metrics.json")
        if method != "pop":
            tracker.log_artifact(out / f"{method}.json")
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in metrics if k.startswith(("hr@", "ndcg@")))
    log.info("%s on %s %s (%d rows): %s", method, dataset_name, split, len(eval_rows), shown)
    return 0
