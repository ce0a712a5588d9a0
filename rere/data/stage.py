"""`rere data`: download and preprocess one dataset into D3-format splits.

Writes `train/valid/test.csv` (D3 layout), `info.txt` (catalogue), `items.jsonl`,
`stats.json` and the resolved `config.yaml` into `--out`, all at once: the folder is built
under a temporary name and renamed into place, so a failure leaves nothing behind.

Sources (`datasets.NAME.source`), one reader each: `recbole` and `grouplens`
(rere.data.movielens), `amazon` (rere.data.amazon), `d3` (rere.data.d3). Every reader but
d3 returns a `Corpus` that rere.data.splits turns into rows with the configured split
protocol (`leave_one_out` or `temporal`).

Bad input raises RereError naming the file and line: a truncated gzip, a non-UTF-8 byte,
a malformed JSON line or a missing field, a malformed MovieLens row, a d3 CSV with a
missing column, a history item that is not in the catalogue, or an empty train or test split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rere import RereError
from rere.config import dataset_config
from rere.data.amazon import read_amazon
from rere.data.d3 import import_d3
from rere.data.movielens import GROUPLENS_URL, RECBOLE_SHA256, RECBOLE_URL, read_grouplens, read_recbole
from rere.data.splits import build_from_corpus
from rere.download import download
from rere.io import SPLITS, atomic_path, save_resolved_config, write_catalogue, write_jsonl, write_split

log = logging.getLogger(__name__)


def _fetch(url: str, download_dir: Path, sha256: str | None) -> Path:
    return download(url, download_dir / url.rstrip("/").rsplit("/", 1)[-1], sha256=sha256)


def _amazon_sha(ds: dict, name: str) -> str | None:
    sha = ds.get("sha256")
    if isinstance(sha, dict):
        return sha.get(name)
    if sha:
        raise RereError(
            "key 'sha256' for an amazon dataset must be a mapping {file name: sha256} (two files are downloaded)."
        )
    return None


def build(name: str, config: dict, download_dir: Path) -> tuple[dict, list[dict], dict]:
    """Fetch and preprocess dataset `name` -> (split rows, item records, stats)."""
    ds = dataset_config(config, name)
    source = ds["source"]
    if source == "d3":
        return import_d3(ds, config["seed"])
    if source == "amazon":
        base = ds["base_url"].rstrip("/")
        cat = ds["category"]
        urls = [f"{base}/categoryFiles/{cat}_5.json.gz", f"{base}/metaFiles2/meta_{cat}.json.gz"]
        paths = [
            download(u, download_dir / "amazon" / u.rsplit("/", 1)[-1], sha256=_amazon_sha(ds, u.rsplit("/", 1)[-1]))
            for u in urls
        ]
        corpus = read_amazon(paths[0], paths[1], ds)
        corpus.notes["category"] = cat
    elif source == "recbole":
        url = ds["url"] or RECBOLE_URL
        sha = ds["sha256"] or (RECBOLE_SHA256 if url == RECBOLE_URL else None)
        corpus = read_recbole(_fetch(url, download_dir, sha))
    else:  # grouplens
        corpus = read_grouplens(_fetch(ds["url"] or GROUPLENS_URL, download_dir, ds["sha256"]))
    if not corpus.events:
        raise RereError(f"dataset {name}: the source has no interactions.")
    return build_from_corpus(corpus, ds, config["seed"], source)


def write_dataset(out: Path, splits: dict, items: list[dict], stats: dict, config: dict) -> None:
    """Write the whole output folder at once (nothing is left behind on failure)."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            write_split(tmp / f"{split}.csv", splits[split])
        write_catalogue(tmp / "info.txt", {r["item_id"]: r["title"] for r in items})
        write_jsonl(tmp / "items.jsonl", items)
        (tmp / "stats.json").write_text(
            json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        save_resolved_config(tmp, config)


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset name, a key of the config's 'datasets'")
    parser.add_argument("--out", required=True, type=Path, help="output folder, e.g. data/ml100k")
    parser.add_argument(
        "--download-dir", type=Path, default=Path("downloads"), help="where raw downloads are kept (default: downloads)"
    )


def check_splits(name: str, ds: dict, splits: dict) -> None:
    """Train and test must have rows: an empty one would pass `index` and `model` and fail
    only at `sft` or `evaluate`. An empty valid split is only warned about: `rere sft`
    refuses it before training, but baselines and RL without periodic evaluation do not
    need it (and a toy source may leave it empty)."""
    for split in SPLITS:
        if splits[split]:
            continue
        if split == "valid":
            log.warning("dataset %s: the valid split has no rows; `rere sft` will refuse this dataset", name)
            continue
        if ds["source"] == "d3":
            where = Path(ds["path"]) / f"{split}.csv"
            raise RereError(
                f"{where}: the {split} split has no rows (a header only); fill the file or drop the dataset."
            )
        raise RereError(
            f"dataset {name}: the {split} split has no rows after the {ds['split']} split; the source has too few "
            "interactions per user: use a larger dataset (amazon: a lower k_core or a wider time window)."
        )


def run(args, config: dict) -> int:
    splits, items, stats = build(args.dataset, config, args.download_dir)
    check_splits(args.dataset, dataset_config(config, args.dataset), splits)
    stats["dataset"] = args.dataset
    write_dataset(args.out, splits, items, stats, config)
    log.info("wrote %s: %s", args.out, json.dumps({k: stats[k] for k in ("users", "items", "interactions", "rows")}))
    return 0
