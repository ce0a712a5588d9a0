"""`rere index`: how the model writes each catalogue item (its code).

Three kinds (config `index.kind`):

- `title`: the item's unique title in double quotes, e.g. `"Toy Story (1995)"`.
- `atomic`: one new token per item, `<item_{id}>` (the "ID-based" generative recommenders:
  an item is one output class, as in SASRec, with no information shared between items'
  codes).
- `sid`: a semantic ID of new tokens, one per level, e.g. `<a_12><b_201><c_7>`, from
  residual k-means over item text embeddings: level 0 clusters the embeddings, level 1
  clusters what is left after subtracting each item's level-0 centroid, and so on. Similar
  items share code prefixes. Items that still share all L levels get one more token,
  `<d_0>`, `<d_1>`, ... in item-id order, so code -> item is one-to-one.

Output: index/D/index.json (format in docs/DESIGN.md) and the resolved config. Later stages
read it with `ItemIndex.load(folder)`; its fingerprint ties every model to the index (and so
the catalogue) it was trained with.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import string
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rere import RereError
from rere.io import (
    atomic_path,
    check_row_items,
    read_catalogue,
    read_json,
    read_jsonl,
    read_split,
    save_resolved_config,
    write_json,
)

log = logging.getLogger(__name__)

LEVEL_LETTERS = string.ascii_lowercase  # level l writes <{letter}_{code}>


@dataclass
class SidConfig:
    """The `index.sid` config section; its descriptions and defaults are in the schema."""

    levels: int
    codebook_size: int | str
    embedder: str
    embedder_model: str | None
    embedding_dim: int
    kmeans_iters: int
    last_level: str

    def __post_init__(self):
        if isinstance(self.codebook_size, str) and self.codebook_size != "auto":
            raise RereError(f"key 'index.sid.codebook_size': {self.codebook_size!r} is not 'auto' or an integer.")
        if isinstance(self.codebook_size, int) and not 2 <= self.codebook_size <= 4096:
            raise RereError(f"key 'index.sid.codebook_size': {self.codebook_size} is outside [2, 4096].")
        if self.embedder == "sentence-transformers" and not self.embedder_model:
            raise RereError(
                "key 'index.sid.embedder_model' is required when index.sid.embedder is sentence-transformers."
            )


def auto_codebook_size(n_items: int, levels: int) -> int:
    """ceil(n ** (1/levels)) rounded up to a multiple of 8, clipped to [8, 256].

    >>> auto_codebook_size(1682, 3), auto_codebook_size(10, 3), auto_codebook_size(10**9, 2)
    (16, 8, 256)
    """
    # Round before ceil: 4096 ** (1/3) is 16.000000000000004 in floating point.
    k = math.ceil(round(n_items ** (1.0 / levels), 9))
    k = 8 * math.ceil(k / 8)
    return min(max(k, 8), 256)


def fingerprint(kind: str, item_ids: list[int], codes: list[str]) -> str:
    """sha256 hex over the kind and every (item_id, code), in item order."""
    h = hashlib.sha256(kind.encode())
    for item_id, code in zip(item_ids, codes, strict=True):
        h.update(f"\n{item_id}\t{code}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- embeddings


def svd_unit_rows(matrix, dim: int, seed: int) -> np.ndarray:
    """Truncated SVD of an (N, V) sparse matrix to at most `dim` components, rows
    L2-normalised (zero rows stay zero). TruncatedSVD needs fewer components than either
    side, so tiny inputs get fewer dimensions (none: the rows as they are). (N, d)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize

    dim = min(dim, matrix.shape[1] - 1, matrix.shape[0] - 1)
    if dim < 1:
        emb = matrix.toarray()
    else:
        svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=7, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # explained-variance ratio of a degenerate input
            emb = svd.fit_transform(matrix)  # (N, dim)
    return normalize(emb).astype(np.float64)


def tfidf_embeddings(texts: list[str], dim: int, seed: int) -> np.ndarray:
    """TF-IDF (words, sublinear tf) + truncated SVD, rows L2-normalised. (N, d), d <= dim."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        tfidf = TfidfVectorizer(sublinear_tf=True, token_pattern=r"(?u)\b\w+\b").fit_transform(texts)  # (N, V)
    except ValueError:
        raise RereError(
            "items.jsonl: the item texts contain no words to embed; check the data stage's `text` field."
        ) from None
    return svd_unit_rows(tfidf, dim, seed)


def ppmi(counts):
    """Positive pointwise mutual information of a symmetric sparse count matrix (N, N):
    max(0, log(C[a, b] * total / (C[a] * C[b]))) on the non-zero counts, C[a] the row sums.
    Pairs seen less often than chance (PMI < 0) become 0, so a popular item is not close to
    everything. Returns a CSR matrix of the same shape."""
    from scipy import sparse

    totals = np.asarray(counts.sum(axis=1)).ravel()  # (N,)
    coo = counts.tocoo()
    pmi = np.log(coo.data * totals.sum() / (totals[coo.row] * totals[coo.col]))
    keep = pmi > 0
    return sparse.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=counts.shape)


def interaction_embeddings(rows: list[dict], item_ids: list[int], dim: int, seed: int) -> np.ndarray:
    """Collaborative item vectors from the train split: PPMI of co-occurrence + truncated SVD.

    Each train row counts its target once with each item of its history, in both directions
    (C[a, b] += 1 and C[b, a] += 1). In a leave-one-out or temporal split every item of a
    user's sequence is the target of one row, so two items at most max_history apart count
    once per user who took both. PPMI[a, b] = max(0, log(C[a, b] * total / (C[a] * C[b]))),
    with C[a] the row sums; then truncated SVD to `dim` and L2-normalised rows. Items that
    never occur in train (cold items) get the zero vector. Only train.csv is read: valid
    and test targets never shape the codes. (N, d), d <= dim, rows in `item_ids` order.
    """
    from scipy import sparse

    position = {item_id: p for p, item_id in enumerate(item_ids)}
    fix = "the split and the catalogue come from different runs (rerun `rere data`)."
    check_row_items(rows, position, "train.csv", "info.txt", fix)
    a, b = [], []
    for row in rows:
        target = position[row["item_id"]]
        for item in row["history_item_id"]:
            if item != row["item_id"]:
                a.append(position[item])
                b.append(target)
    if not a:
        raise RereError("train.csv: no row has a history item other than its target; nothing to embed.")
    n = len(item_ids)
    ones = np.ones(2 * len(a))
    counts = sparse.coo_matrix((ones, (a + b, b + a)), shape=(n, n)).tocsr()  # duplicates are summed
    return svd_unit_rows(ppmi(counts), dim, seed)  # (N, d); a cold item's zero row stays zero


def item_embeddings(data: Path, item_ids: list[int], texts: list[str], sid: dict, seed: int) -> np.ndarray:
    """The `index.sid.embedder` vectors of the items, in `item_ids` order: tfidf and
    sentence-transformers over their `texts`, interactions from `data`/train.csv. The index
    stage clusters them; the semantic reward compares them. (N, d)."""
    if sid["embedder"] == "interactions":
        return interaction_embeddings(read_split(Path(data) / "train.csv"), item_ids, sid["embedding_dim"], seed)
    if sid["embedder"] == "tfidf":
        return tfidf_embeddings(texts, sid["embedding_dim"], seed)
    return sentence_embeddings(texts, sid["embedder_model"])


def sentence_embeddings(texts: list[str], model_name: str) -> np.ndarray:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise RereError(
            "index.sid.embedder is sentence-transformers but the package is not installed; "
            "run `pip install 'rere[embed]'` or set index.sid.embedder=tfidf."
        ) from None
    try:
        model = SentenceTransformer(model_name, device="cpu")
    except Exception as exc:  # OSError offline, ValueError for a bad folder, ...
        raise RereError(
            f"sentence-transformers model {model_name!r} could not be loaded ({type(exc).__name__}: {exc}); "
            "set index.sid.embedder_model to a local folder or a reachable model name, or use embedder=tfidf."
        ) from None
    emb = model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=True)
    return np.asarray(emb, dtype=np.float64)  # (N, d)


# ---------------------------------------------------------------------------- semantic IDs


def capacity_assign(dist: np.ndarray, capacity: int) -> np.ndarray:
    """Labels (m,) from distances (m, k), each label used at most `capacity` times.

    Greedy, closest (item, code) pairs first; ties by item then code order (stable sort).

    >>> capacity_assign(np.array([[0.0, 1.0], [0.1, 0.2], [0.5, 0.3]]), 1).tolist()
    [0, 1, -1]
    >>> capacity_assign(np.array([[0.0, 1.0], [0.1, 0.2], [0.5, 0.3]]), 2).tolist()
    [0, 0, 1]
    """
    m, k = dist.shape
    labels = np.full(m, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    left = min(m, capacity * k)
    for flat in np.argsort(dist, axis=None, kind="stable"):
        i, c = divmod(int(flat), k)
        if labels[i] < 0 and load[c] < capacity:
            labels[i] = c
            load[c] += 1
            left -= 1
            if left == 0:
                break
    return labels


def residual_kmeans(
    emb: np.ndarray, levels: int, k: int, iters: int, seed: int, distinct_last: bool = True
) -> np.ndarray:
    """Codes (N, levels) in [0, k): level l clusters the residual left by levels < l.

    distinct_last: at the last level, items that share the first levels-1 codes take
    different codes where the codebook allows (nearest free centroid, each code at most
    ceil(group / k) times) instead of all taking their nearest centroid; as LC-Rec's uniform
    last-level mapping, this keeps codes semantic while leaving far fewer collisions.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    residual = emb.copy()  # (N, d)
    codes = np.zeros((emb.shape[0], levels), dtype=np.int64)
    for level in range(levels):
        # Never ask for more clusters than distinct points (small or duplicated catalogues).
        n_distinct = len(np.unique(residual.round(12), axis=0))
        km = KMeans(n_clusters=min(k, n_distinct), n_init=3, max_iter=iters, random_state=seed + level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = km.fit_predict(residual)  # (N,)
        centers = km.cluster_centers_  # (k', d)
        if distinct_last and level == levels - 1:
            # Fewer distinct points than codes: repeat centroids, so that identical items can
            # still take different codes.
            centers = centers[np.arange(k) % len(centers)]  # (k, d)
            dist = ((residual[:, None, :] - centers[None, :, :]) ** 2).sum(-1)  # (N, k)
            groups: dict[tuple, list[int]] = defaultdict(list)
            for pos, prefix in enumerate(map(tuple, codes[:, :level].tolist())):
                groups[prefix].append(pos)
            for members in groups.values():
                rows = np.array(members)
                labels[rows] = capacity_assign(dist[rows], math.ceil(len(rows) / len(centers)))
        codes[:, level] = labels
        residual = residual - centers[labels]  # (N, d)
    return codes


def atomic_code(item_id: int) -> str:
    """The one-token code of an item in an `atomic` index."""
    return f"<item_{item_id}>"


def sid_codes(item_ids: list[int], code_matrix: np.ndarray, k: int) -> tuple[list[str], list[str], dict]:
    """Code strings (collisions resolved by an extra level), the new tokens, and statistics."""
    n, levels = code_matrix.shape
    base = ["".join(f"<{LEVEL_LETTERS[lv]}_{c}>" for lv, c in enumerate(row)) for row in code_matrix.tolist()]
    groups: dict[str, list[int]] = defaultdict(list)
    for pos in sorted(range(n), key=lambda p: item_ids[p]):
        groups[base[pos]].append(pos)
    extra = LEVEL_LETTERS[levels]
    codes = list(base)
    for members in groups.values():
        if len(members) > 1:
            for rank, pos in enumerate(members):  # item-id order
                codes[pos] = base[pos] + f"<{extra}_{rank}>"
    max_group = max(len(m) for m in groups.values())
    new_tokens = [f"<{LEVEL_LETTERS[lv]}_{c}>" for lv in range(levels) for c in range(k)]
    if max_group > 1:
        new_tokens += [f"<{extra}_{r}>" for r in range(max_group)]
    colliding = sum(len(m) for m in groups.values() if len(m) > 1)
    stats = {
        "items": n,
        "levels": levels,
        "codebook_size": k,
        "collision_rate": colliding / n,
        "colliding_items": colliding,
        "distinct_codes": len(groups),
        "max_items_per_code": max_group,
        "code_usage": [len(np.unique(code_matrix[:, lv])) / k for lv in range(levels)],
        "new_tokens": len(new_tokens),
    }
    return codes, new_tokens, stats


# ---------------------------------------------------------------------------- the index


@dataclass
class ItemIndex:
    """index.json in memory. `items` are dicts {item_id, title, code}, sorted by item_id."""

    kind: str
    items: list[dict]
    new_tokens: list[str]
    stats: dict
    fingerprint: str

    @property
    def codes(self) -> list[str]:
        return [it["code"] for it in self.items]

    @property
    def item_ids(self) -> list[int]:
        return [it["item_id"] for it in self.items]

    @property
    def titles(self) -> list[str]:
        return [it["title"] for it in self.items]

    @property
    def code_of(self) -> dict[int, str]:
        """item_id -> code."""
        return {it["item_id"]: it["code"] for it in self.items}

    @property
    def code_to_item(self) -> dict[str, int]:
        """code -> item_id."""
        return {it["code"]: it["item_id"] for it in self.items}

    @classmethod
    def load(cls, folder: str | Path) -> ItemIndex:
        path = Path(folder) / "index.json"
        if not path.is_file():
            raise RereError(f"{path} does not exist; run `rere index --data data/D --out {folder}` first.")
        data = read_json(path)
        try:
            index = cls(
                kind=data["kind"],
                items=[
                    {"item_id": int(it["item_id"]), "title": it["title"], "code": it["code"]} for it in data["items"]
                ],
                new_tokens=list(data.get("new_tokens", [])),
                stats=dict(data.get("stats", {})),
                fingerprint=data["fingerprint"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RereError(
                f"{path}: malformed index ({type(exc).__name__}: {exc}); rebuild it with `rere index`."
            ) from None
        if fingerprint(index.kind, index.item_ids, index.codes) != index.fingerprint:
            raise RereError(
                f"{path}: the fingerprint does not match the items (edited by hand?); rebuild it with `rere index`."
            )
        if len(set(index.codes)) != len(index.codes):
            raise RereError(f"{path}: two items share a code; rebuild it with `rere index`.")
        return index

    def check_catalogue(self, data_folder: str | Path) -> None:
        """Raise RereError unless data_folder/info.txt is the catalogue this index was built from."""
        catalogue = read_catalogue(Path(data_folder) / "info.txt")
        if catalogue != {it["item_id"]: it["title"] for it in self.items}:
            raise RereError(
                f"{data_folder}/info.txt is not the catalogue this index was built from; "
                f"rebuild the index with `rere index --data {data_folder}`."
            )

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "items": self.items,
            "new_tokens": self.new_tokens,
            "stats": self.stats,
        }


def _read_items(data: Path) -> list[dict]:
    """items.jsonl, checked against info.txt (the titles' source of truth)."""
    catalogue = read_catalogue(data / "info.txt")
    path = data / "items.jsonl"
    records = read_jsonl(path)
    by_id = {}
    for line_no, rec in enumerate(records, 1):
        if not isinstance(rec, dict) or "item_id" not in rec or "text" not in rec:
            raise RereError(f"{path}: record {line_no}: expected keys item_id, title, text; rerun `rere data`.")
        by_id[rec["item_id"]] = rec
    if sorted(by_id) != sorted(catalogue):
        missing = sorted(set(catalogue) - set(by_id))[:5]
        raise RereError(f"{path}: items differ from info.txt (e.g. missing ids {missing}); rerun `rere data`.")
    items = []
    for item_id in sorted(catalogue):
        rec = by_id[item_id]
        if rec.get("title", catalogue[item_id]) != catalogue[item_id]:
            raise RereError(
                f"{path}: item {item_id}: title {rec.get('title')!r} differs from info.txt; rerun `rere data`."
            )
        items.append({"item_id": item_id, "title": catalogue[item_id], "text": str(rec["text"]) or catalogue[item_id]})
    return items


def build_index(data: str | Path, config: dict) -> ItemIndex:
    """The index for the catalogue in `data` (a `rere data` output folder)."""
    data = Path(data)
    kind = config["index"]["kind"]
    if kind == "title":
        catalogue = read_catalogue(data / "info.txt")
        items = [{"item_id": i, "title": catalogue[i], "code": f'"{catalogue[i]}"'} for i in sorted(catalogue)]
        new_tokens: list[str] = []
        stats: dict = {"items": len(items)}
    elif kind == "sid":
        cfg = SidConfig(**config["index"]["sid"])
        records = _read_items(data)
        texts = [r["text"] for r in records]
        item_ids = [r["item_id"] for r in records]
        n = len(records)
        k = auto_codebook_size(n, cfg.levels) if cfg.codebook_size == "auto" else int(cfg.codebook_size)
        log.info("embedding %d items with %s", n, cfg.embedder)
        emb = item_embeddings(data, item_ids, texts, config["index"]["sid"], config["seed"])
        cold = None
        if cfg.embedder == "interactions":
            cold = int((~emb.any(axis=1)).sum())
            log.info("%d of %d items never occur in train.csv (zero interaction vector)", cold, n)
        log.info("residual k-means: %d levels x %d codes over %s embeddings", cfg.levels, k, emb.shape)
        distinct = cfg.last_level == "distinct"
        code_matrix = residual_kmeans(emb, cfg.levels, k, cfg.kmeans_iters, config["seed"], distinct_last=distinct)
        codes, new_tokens, stats = sid_codes(item_ids, code_matrix, k)
        stats["embedder"] = cfg.embedder
        if cold is not None:
            stats["cold_items"] = cold  # items without any train interaction
        stats["last_level"] = cfg.last_level
        items = [{"item_id": r["item_id"], "title": r["title"], "code": c} for r, c in zip(records, codes, strict=True)]
    elif kind == "atomic":
        catalogue = read_catalogue(data / "info.txt")
        items = [{"item_id": i, "title": catalogue[i], "code": atomic_code(i)} for i in sorted(catalogue)]
        new_tokens = [it["code"] for it in items]
        stats = {"items": len(items), "new_tokens": len(new_tokens)}
    else:
        raise RereError(f"key 'index.kind': {kind!r} is not title, sid or atomic.")
    fp = fingerprint(kind, [it["item_id"] for it in items], [it["code"] for it in items])
    return ItemIndex(kind=kind, items=items, new_tokens=new_tokens, stats=stats, fingerprint=fp)


def save_index(index: ItemIndex, out: str | Path, config: dict) -> None:
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_json(tmp / "index.json", index.to_json())
        save_resolved_config(tmp, config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data folder written by `rere data` (info.txt, items.jsonl)")
    parser.add_argument("--out", required=True, help="output folder, e.g. index/ml100k")


def run(args: argparse.Namespace, config: dict) -> int:
    index = build_index(args.data, config)
    save_index(index, args.out, config)
    if index.kind == "sid":
        s = index.stats
        log.info(
            "sid index: %d items, codebook %d x %d levels, collision rate %.4f (%d items), max %d items per code, "
            "code usage per level %s, %d new tokens",
            s["items"],
            s["codebook_size"],
            s["levels"],
            s["collision_rate"],
            s["colliding_items"],
            s["max_items_per_code"],
            [round(u, 3) for u in s["code_usage"]],
            s["new_tokens"],
        )
    log.info(
        "wrote %s/index.json (%s, %d items, fingerprint %s)",
        args.out,
        index.kind,
        len(index.items),
        index.fingerprint[:12],
    )
    return 0
