"""`rere data` on hand-made fixtures whose expected outputs are worked out by hand below.

Everything is fetched over real HTTP from a loopback server (tests/fixtures/loopback_http.py);
nothing touches the network.
"""

import calendar
import gzip
import hashlib
import io
import json
import logging
import random
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml
from fixtures.loopback_http import LoopbackServer

from rere import RereError
from rere.cli import main
from rere.config import load_config
from rere.data import (
    RECBOLE_INTER,
    RECBOLE_ITEM,
    Corpus,
    assign_ids,
    build,
    build_from_corpus,
    clean_amazon_title,
    k_core,
    read_amazon,
    read_recbole,
    same_time_order,
    same_time_share,
    split_temporal,
    unique_titles,
    user_sequences,
)
from rere.data.splits import tie_key
from rere.io import read_catalogue, read_jsonl, read_split

# ----------------------------------------------------------------- MovieLens-like fixture
# Raw ids are strings; "10" is listed before "2" in the file (and sorts before it as text)
# so the same-time rules (datasets.*.ties) are visible: user 1 rated 10 and 2 at t=100,
# user 3 rated 3 and 2 at t=300. The default, shuffle, orders them by sha256(seed, user,
# item): with seed 42, 2 before 10 for user 1 and 2 before 3 for user 3 (as item_id would).
INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
1\t10\t3\t100
1\t2\t4\t100
1\t1\t5\t50
1\t5\t2\t200
2\t3\t4\t150
2\t1\t3\t120
3\t3\t1\t300
3\t2\t5\t300
"""
ITEMS = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
1\tToy Story\t1995\tAnimation Comedy
2\tHeat\t1995\tAction
3\tHeat\t1995\tDrama
5\tLand\tV\tAnimation
6\tNever Rated\t1990\tDrama
10\tunkonwn\tunkonwn\tunknown
"""
# Ids with seed 42: random.Random(42).shuffle(["1", "2", "3", "5", "10"]) == ["5", "2", "3", "10", "1"].
ML_IDS = {"5": 0, "2": 1, "3": 2, "10": 3, "1": 4}
ML_TITLES = {"1": "Toy Story (1995)", "2": "Heat (1995) [2]", "3": "Heat (1995) [3]", "5": "Land (V)", "10": "unknown"}


def _zip(members: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _grouplens_zip() -> bytes:
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama"]
    genres += [
        "Fantasy",
        "Film-Noir",
        "Horror",
        "Musical",
        "Mystery",
        "Romance",
        "Sci-Fi",
        "Thriller",
        "War",
        "Western",
    ]

    def line(item, title, flags):
        return "|".join([item, title, "01-Jan-1995", "", "http://x"] + ["1" if g in flags else "0" for g in genres])

    u_item = "\n".join(
        [
            line("1", "Toy Story (1995)", {"Animation", "Comedy"}),
            line("2", "Heat (1995)", {"Action"}),
            line("3", "Heat (1995)", {"Drama"}),
            line("5", "Land (V)", {"Animation"}),
            line("6", "Never Rated (1990)", {"Drama"}),
            line("10", "unknown", {"unknown"}),
        ]
    )
    # u.data: the same tab-separated rows, no header, in reverse order: the split must not
    # depend on the file's row order.
    u_data = "".join(line + "\n" for line in INTER.splitlines()[1:][::-1])
    return _zip({"ml-100k/u.data": u_data, "ml-100k/u.item": u_item.encode("latin-1")})


def _write_config(tmp_path: Path, datasets: dict, name="cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"seed": 42, "datasets": datasets}))
    return path


def _run(config: Path, dataset: str, out: Path, download_dir: Path, *extra: str) -> int:
    args = [
        "data",
        "--config",
        str(config),
        "--dataset",
        dataset,
        "--out",
        str(out),
        "--download-dir",
        str(download_dir),
    ]
    return main([*args, *extra])


def _brief(rows):
    """(user, history raw ids, target raw id) per row: enough to compare orders by hand."""
    return [(r["user_id"], r["item_asins"], r["item_asin"]) for r in rows]


@pytest.fixture
def server():
    with LoopbackServer() as s:
        yield s


@pytest.fixture
def ml_data(server, tmp_path):
    """Run the recbole source (a fake wheel with the two ML-100K members) once; return the folder."""
    wheel = _zip({RECBOLE_INTER: INTER, RECBOLE_ITEM: ITEMS})
    server.files["recbole-fake.whl"] = wheel
    ds = {"source": "recbole", "url": f"{server.url}/recbole-fake.whl", "sha256": _sha(wheel), "max_history": 2}
    config = _write_config(tmp_path, {"ml": ds})
    out = tmp_path / "data" / "ml"
    assert _run(config, "ml", out, tmp_path / "downloads") == 0
    return out


def test_recbole_leave_one_out_end_to_end(ml_data, tmp_path):
    assert sorted(p.name for p in ml_data.iterdir()) == [
        "config.yaml",
        "info.txt",
        "items.jsonl",
        "stats.json",
        "test.csv",
        "train.csv",
        "valid.csv",
    ]
    assert (tmp_path / "downloads" / "recbole-fake.whl").is_file()
    # Sequences: u1 = 1(50) 2(100) 10(100) 5(200); u2 = 1(120) 3(150); u3 = 2(300) 3(300).
    # Leave-one-out: u1 -> train [target 2], valid [target 10], test [target 5];
    # u2, u3 have two items -> test only. Test rows are sorted by target time 150, 200, 300.
    train, valid, test = (read_split(ml_data / f"{s}.csv") for s in ("train", "valid", "test"))
    assert _brief(train) == [("1", ["1"], "2")]
    assert _brief(valid) == [("1", ["1", "2"], "10")]
    assert _brief(test) == [("2", ["1"], "3"), ("1", ["2", "10"], "5"), ("3", ["2"], "3")]
    row = test[1]  # history truncated to max_history=2: item 1 dropped
    assert row["history_item_id"] == [ML_IDS["2"], ML_IDS["10"]] and row["item_id"] == ML_IDS["5"]
    assert row["history_item_title"] == ["Heat (1995) [2]", "unknown"] and row["item_title"] == "Land (V)"
    assert row["history_rating"] == [4.0, 3.0] and row["rating"] == 2.0
    assert row["history_timestamp"] == [100, 100] and row["timestamp"] == 200

    assert read_catalogue(ml_data / "info.txt") == {ML_IDS[r]: t for r, t in ML_TITLES.items()}  # item 6: never rated
    items = read_jsonl(ml_data / "items.jsonl")
    assert [r["item_id"] for r in items] == [0, 1, 2, 3, 4]
    assert items[4] == {
        "item_id": 4,
        "title": "Toy Story (1995)",
        "asin": "1",
        "text": "Toy Story (1995). Animation, Comedy",
    }
    stats = json.loads((ml_data / "stats.json").read_text())
    assert stats["users"] == 3 and stats["items"] == 5 and stats["interactions"] == 8
    assert stats["rows"] == {"train": 1, "valid": 1, "test": 3}
    assert stats["time_range"] == [50, 300] and stats["split"] == "leave_one_out" and stats["source"] == "recbole"
    assert stats["renamed_duplicate_titles"] == 2
    # Consecutive pairs: u1 (50,100) (100,100) (100,200), u2 (120,150), u3 (300,300): 2 of 5 tie.
    assert stats["ties"] == "shuffle" and stats["same_time_pairs"] == 0.4
    # The two same-time pairs as written (seed 42): u1's 2 then 10 (numerically larger, not as
    # text), u3's 2 then 3.
    assert stats["same_time_order"] == {"share": 0.4, "pairs": 2, "later_id_larger": 1.0}
    assert yaml.safe_load((ml_data / "config.yaml").read_text())["datasets"]["ml"]["max_history"] == 2


def test_temporal_split_and_grouplens_agree_with_recbole(ml_data, server, tmp_path, caplog):
    wheel = server.files["recbole-fake.whl"]
    gl = _grouplens_zip()
    server.files["ml-100k.zip"] = gl
    config = _write_config(
        tmp_path,
        {
            "rb": {
                "source": "recbole",
                "url": f"{server.url}/recbole-fake.whl",
                "sha256": _sha(wheel),
                "max_history": 2,
                "split": "temporal",
            },
            "gl": {"source": "grouplens", "url": f"{server.url}/ml-100k.zip", "max_history": 2, "split": "temporal"},
        },
        "temporal.yaml",
    )
    with caplog.at_level(logging.WARNING, logger="rere"):
        assert _run(config, "gl", tmp_path / "gl", tmp_path / "downloads") == 0
    assert any("no sha256 to check" in r.getMessage() for r in caplog.records)
    assert _run(config, "rb", tmp_path / "rb", tmp_path / "downloads") == 0
    # All 5 samples by target time (ties: u1's two t=100 targets in position order):
    # u1->2 (100), u1->10 (100), u2->3 (150), u1->5 (200), u3->3 (300);
    # int(5 * 0.8) = 4 train rows, int(5 * 0.9) = 4 -> no valid row, 1 test row.
    train = read_split(tmp_path / "rb" / "train.csv")
    assert _brief(train) == [("1", ["1"], "2"), ("1", ["1", "2"], "10"), ("2", ["1"], "3"), ("1", ["2", "10"], "5")]
    assert read_split(tmp_path / "rb" / "valid.csv") == []
    assert _brief(read_split(tmp_path / "rb" / "test.csv")) == [("3", ["2"], "3")]
    for name in ("train.csv", "valid.csv", "test.csv", "info.txt", "items.jsonl"):
        assert (tmp_path / "gl" / name).read_text() == (tmp_path / "rb" / name).read_text(), name


def _tie_corpus(events):
    items = sorted({e[1] for e in events}, key=int)
    users = sorted({e[0] for e in events}, key=int)
    return Corpus(events, {i: i for i in items}, {}, items, users)


def test_same_time_events_follow_datasets_ties():
    tied = ["10", "2", "7", "30", "4"]  # all rated at t=100, in this file order
    events = [("1", i, 3.0, 100) for i in tied] + [("1", "1", 5.0, 50), ("1", "5", 2.0, 200)]

    def order(ties, evs=events, seed=42):
        return [e[0] for e in user_sequences(_tie_corpus(evs), ties, seed)["1"]]

    assert order("item_id") == ["1", "2", "4", "7", "10", "30", "5"]  # numerically, not as text
    assert order("file") == ["1", *tied, "5"]
    assert order("file", events[::-1]) == ["1", *tied[::-1], "5"]

    def sha(seed, user, item):  # the documented key, derived here independently
        return hashlib.sha256(f"{seed}\0{user}\0{item}".encode()).digest()[:8]

    for seed in (42, 7):
        assert order("shuffle", seed=seed) == ["1", *sorted(tied, key=lambda i, s=seed: sha(s, "1", i)), "5"]
        assert order("shuffle", events[::-1], seed) == order("shuffle", seed=seed)  # not the file's order
    assert order("shuffle", seed=42) != order("shuffle", seed=7)
    with pytest.raises(RereError, match=r"datasets\.\*\.ties' is 'time'"):
        order("time")


def test_shuffled_ties_carry_no_item_order():
    """400 users with two same-time events each: by item_id the later one always has the larger
    raw id; shuffled, about half the time (binomial sd 0.025), and another seed reorders about
    half of the pairs."""
    rng = random.Random(0)
    events = []
    for u in range(400):
        a, b = rng.sample(range(1, 1000), 2)
        events += [(str(u), str(a), 1.0, 10), (str(u), str(b), 1.0, 10), (str(u), "1000", 1.0, 5)]
    corpus = _tie_corpus(events)

    def later_larger(seqs):
        return sum(int(s[2][0]) > int(s[1][0]) for s in seqs.values()) / len(seqs)

    assert later_larger(user_sequences(corpus, "item_id")) == 1.0
    by42, by43 = user_sequences(corpus, "shuffle", 42), user_sequences(corpus, "shuffle", 43)
    assert 0.42 < later_larger(by42) < 0.58 and 0.42 < later_larger(by43) < 0.58
    assert 140 < sum(by42[u] != by43[u] for u in by42) < 260
    assert all(s[0][0] == "1000" for s in by42.values())  # the earlier event stays first
    assert same_time_share(by42) == 0.5


def test_same_time_order_counts_distinct_pairs_by_raw_id():
    """Pairs of overlapping windows count once; ids compare as numbers when both are integers
    (9 < 10), else integers before text (10 < "B"); a pair with an empty raw id is skipped."""

    def row(user, asins, times, target, t):
        return {"user_id": user, "item_asins": asins, "history_timestamp": times, "item_asin": target, "timestamp": t}

    splits = {
        "train": [row("u", ["9", "10"], [5, 5], "B", 5)],  # 9 -> 10 larger, 10 -> B larger
        "valid": [row("u", ["10", "B"], [5, 5], "A", 5)],  # 10 -> B again (once), B -> A smaller
        "test": [row("v", ["", "7"], [3, 3], "3", 4)],  # "" -> 7 skipped, 7 -> 3 at another time
    }
    # 4 distinct pairs, 3 of them same-time, 2 of those 3 with the larger id later.
    assert same_time_order(splits) == {"share": 0.75, "pairs": 3, "later_id_larger": 0.6667}
    assert same_time_order({"test": [row("v", ["7"], [3], "3", 4)]}) == {
        "share": 0.0,
        "pairs": 0,
        "later_id_larger": None,
    }
    assert same_time_order({"test": []}) == {"share": 0.0, "pairs": 0, "later_id_larger": None}


@pytest.mark.parametrize(
    ("member", "text", "message"),
    [
        (RECBOLE_INTER, INTER.replace("2\t1\t3\t120", "2\t1\t3"), r"ml-100k\.inter: line 7: expected 4 fields"),
        (RECBOLE_INTER, INTER.replace("\t150", "\tsoon"), r"ml-100k\.inter: line 6: rating '4' or timestamp 'soon'"),
        (
            RECBOLE_ITEM,
            ITEMS.replace("Heat\t1995\tDrama", "H\xe9at\t1995\tDrama").encode("latin-1"),
            r"ml-100k\.item: line 4: byte 3 is not utf-8",
        ),
        (RECBOLE_ITEM, ITEMS.replace("3\tHeat\t1995\tDrama\n", ""), r"items \['3'\] are rated but have no title line"),
    ],
)
def test_recbole_bad_input_names_member_and_line(tmp_path, member, text, message):
    members = {RECBOLE_INTER: INTER, RECBOLE_ITEM: ITEMS, member: text}
    wheel = tmp_path / "fake.whl"
    wheel.write_bytes(_zip(members))
    with pytest.raises(RereError, match=message):
        read_recbole(wheel)
    wheel.write_bytes(_zip({RECBOLE_INTER: INTER})[:-40])
    with pytest.raises(RereError, match="not a readable zip archive"):
        read_recbole(wheel)


REAL_WHEEL = Path(__file__).resolve().parent.parent / "downloads" / "recbole-1.2.1-py3-none-any.whl"


@pytest.mark.slow
@pytest.mark.skipif(
    not REAL_WHEEL.is_file(), reason="the RecBole wheel is not cached in downloads/ (tests never download it)"
)
def test_real_ml100k_from_cached_wheel():
    corpus = read_recbole(REAL_WHEEL)
    ds = {"split": "leave_one_out", "max_history": 10}
    splits, items, stats = build_from_corpus(corpus, ds, 42, "recbole")
    # ML-100K: 943 users (each >= 20 ratings), 1,682 items, 100,000 ratings; 18 titles are
    # shared by 2 items each -> 36 renamed. Leave-one-out: 943 test, 943 valid, the rest train.
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    assert stats["rows"] == {"train": 100000 - 3 * 943, "valid": 943, "test": 943}
    assert stats["renamed_duplicate_titles"] == 36 and len({r["title"] for r in items}) == 1682
    titles = {r["asin"]: r["title"] for r in items}
    assert titles["1"] == "Toy Story (1995)" and titles["267"] == "unknown"
    assert titles["1412"] == "Land Before Time III: The Time of the Great Giving (1995) (V)"
    assert titles["246"] == "Chasing Amy (1997) [246]" and titles["268"] == "Chasing Amy (1997) [268]"


def test_split_temporal_rounding_matches_reference():
    rows = [(1, 2, {"timestamp": t}) for t in [5, 3, 9, 1, 7, 2, 8, 4, 6, 0, 10]]
    out = split_temporal(rows)  # n = 11: int(8.8) = 8, int(9.9) = 9
    assert [r["timestamp"] for r in out["train"]] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [r["timestamp"] for r in out["valid"]] == [8] and [r["timestamp"] for r in out["test"]] == [9, 10]


def test_unique_titles_and_seeded_ids():
    titles, renamed = unique_titles({"7": "Heat (1995)", "3": "Heat (1995)", "9": "Up"})
    assert titles == {"7": "Heat (1995) [7]", "3": "Heat (1995) [3]", "9": "Up"} and renamed == 2
    with pytest.raises(RereError, match="still shared"):
        unique_titles({"1": "A", "2": "A", "x": "A [1]"})
    order = ["1", "2", "3", "5", "10"]
    assert assign_ids(order, 42) == ML_IDS == assign_ids(order, 42)
    assert assign_ids(order, 7) == {"10": 0, "1": 1, "5": 2, "2": 3, "3": 4}
    assert order == ["1", "2", "3", "5", "10"]  # the input is not shuffled in place


# ----------------------------------------------------------------- Amazon fixture


def _day(y, m, d):
    return calendar.timegm((y, m, d, 0, 0, 0))


META = [
    {"asin": "A1", "title": '"Alpha Pen"', "category": ["Office Products"]},
    {"asin": "A2", "title": "Beta &amp; Co", "category": ["Office Products", "Pens &amp; Refills"]},
    {"asin": "A3", "title": "Old Gamma"},
    {"asin": "A3", "title": "  Gamma  "},  # a later line overrides the title
    {"asin": "A4", "title": ' Delta "D"'},  # strip(" ") then strip('"'): 'Delta "D'
    {"asin": "A5", "title": "X"},  # 1 character: dropped
    {"asin": "A6", "title": '<span id="p">Promo</span>'},  # dropped
    {"asin": "A7"},  # no title: dropped
    {"asin": "A8", "title": " ".join(["w"] * 21)},  # 21 words: dropped
    {"asin": "A9", "title": "Alpha Pen"},  # same title as A1 once cleaned
]
# (user, asin, rating, day), file order; numbers in comments are the review numbers used below.
REVIEWS = [
    ("U1", "A1", 5, (2018, 1, 5)),  # 1
    ("U1", "A2", 4, (2018, 1, 10)),  # 2
    ("U2", "A1", 3, (2018, 1, 6)),  # 3
    ("U2", "A2", 5, (2018, 1, 10)),  # 4
    ("U2", "A3", 2, (2018, 2, 1)),  # 5
    ("U3", "A3", 4, (2018, 3, 1)),  # 6: on the end bound (inclusive)
    ("U3", "A4", 5, (2018, 3, 2)),  # 7: after the end
    ("U3", "A5", 5, (2018, 1, 20)),  # 8: untitled item
    ("U1", "A4", 3, (2017, 6, 1)),  # 9
    ("U4", "A9", 5, (2017, 5, 1)),  # 10
    ("U4", "A4", 4, (2017, 5, 1)),  # 11: same time as 10 -> file order keeps A9 first
    ("U4", "A1", 2, (2017, 12, 31)),  # 12
    ("U3", "A9", 3, (2017, 12, 15)),  # 13
    ("U4", "A6", 5, (2018, 1, 15)),  # 14: span title
    ("U5", "A1", 5, (2016, 12, 31)),  # 15: before even the backed-off window
    ("U5", "A2", 5, (2018, 2, 2)),  # 16
    ("U4", "A8", 5, (2018, 1, 3)),  # 17: long title
]


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _reviews_bytes() -> bytes:
    recs = [
        {"reviewerID": u, "asin": a, "overall": float(r), "unixReviewTime": _day(*d), "reviewText": "ok"}
        for u, a, r, d in REVIEWS
    ]
    return _jsonl(recs)


AMAZON = {"source": "amazon", "category": "Office", "window_start": "2018-01", "window_end": "2018-03"}
AMAZON |= {"min_items": 4, "k_core": 2, "max_history": 1, "split": "temporal"}


def test_clean_amazon_title():
    assert clean_amazon_title(' "Alpha Pen" ') == "Alpha Pen"
    assert clean_amazon_title(' Delta "D"') == 'Delta "D'
    assert clean_amazon_title("Ab") == "Ab" and clean_amazon_title('"A"') is None
    assert clean_amazon_title(" ".join(["w"] * 20)) is not None and clean_amazon_title(" ".join(["w"] * 21)) is None
    assert clean_amazon_title(None) is None and clean_amazon_title("x <span id='y'>") is None


def test_k_core_cascades():
    # Window 2018-01..2018-03 with titled items: reviews 1-6 and 16.
    # Pass 1 drops U3 and U5 (1 review each); then A3 has 1 review (5) -> dropped;
    # then U2 still has 2 (3, 4) -> stable: reviews 1-4, items A1 and A2 only.
    window = [(u, a, float(r), _day(*d)) for u, a, r, d in [REVIEWS[i - 1] for i in (1, 2, 3, 4, 5, 6, 16)]]
    assert k_core(window, 2) == window[:4]


def test_amazon_backoff_kcore_titles_and_split(server, tmp_path):
    reviews, meta = gzip.compress(_reviews_bytes()), gzip.compress(_jsonl(META))
    server.files.update({"Office_5.json.gz": reviews, "meta_Office.json.gz": meta})
    ds = AMAZON | {
        "base_url": server.url,
        "sha256": {"Office_5.json.gz": _sha(reviews), "meta_Office.json.gz": _sha(meta)},
    }
    config = _write_config(tmp_path, {"office": ds})
    out = tmp_path / "office"
    assert _run(config, "office", out, tmp_path / "dl") == 0
    assert (tmp_path / "dl" / "amazon" / "meta_Office.json.gz").is_file()
    stats = json.loads((out / "stats.json").read_text())
    # 2018-01..2018-03 keeps only A1, A2 (test_k_core_cascades) < min_items 4 -> start 2017-01.
    # There, with titled items: reviews 1-6, 9-13, 16; U5 has 1 review -> dropped; all else >= 2.
    assert stats["window"] == ["2017-01", "2018-03"]
    assert stats["window_timestamps"] == [_day(2017, 1, 1), _day(2018, 3, 1)]
    assert stats["users"] == 4 and stats["items"] == 5 and stats["interactions"] == 11
    assert stats["time_range"] == [_day(2017, 5, 1), _day(2018, 3, 1)]
    # Ids: first appearance A1, A2, A3, A4, A9 shuffled by Random(42) -> A4, A2, A3, A9, A1.
    ids = {"A4": 0, "A2": 1, "A3": 2, "A9": 3, "A1": 4}
    titles = {"A1": "Alpha Pen [A1]", "A2": "Beta & Co", "A3": "Gamma", "A4": 'Delta "D', "A9": "Alpha Pen [A9]"}
    assert read_catalogue(out / "info.txt") == {ids[a]: t for a, t in titles.items()}
    items = read_jsonl(out / "items.jsonl")
    assert items[1] == {
        "item_id": 1,
        "title": "Beta & Co",
        "asin": "A2",
        "text": "Beta & Co. Office Products, Pens & Refills",
    }
    # Sequences (max_history 1): U1 A4 A1 A2; U2 A1 A2 A3; U3 A9 A3; U4 A9 A4 A1 (tie: file order).
    # 7 samples by target time; U1 and U2 both reach A2 on 2018-01-10 (U1 first: first seen first).
    # int(7 * 0.8) = 5 train, int(7 * 0.9) = 6 -> 1 valid, 1 test.
    rows = {s: read_split(out / f"{s}.csv") for s in ("train", "valid", "test")}
    assert _brief(rows["train"]) == [
        ("U4", ["A9"], "A4"),
        ("U4", ["A4"], "A1"),
        ("U1", ["A4"], "A1"),
        ("U1", ["A1"], "A2"),
        ("U2", ["A1"], "A2"),
    ]
    assert _brief(rows["valid"]) == [("U2", ["A2"], "A3")]
    assert _brief(rows["test"]) == [("U3", ["A9"], "A3")]
    test = rows["test"][0]
    assert test["history_item_id"] == [3] and test["item_id"] == 2 and test["history_item_title"] == ["Alpha Pen [A9]"]
    assert test["history_rating"] == [3.0] and test["rating"] == 4.0 and test["timestamp"] == _day(2018, 3, 1)


def _amazon_files(tmp_path, reviews: bytes, meta: bytes) -> tuple[Path, Path]:
    rp, mp = tmp_path / "Office_5.json.gz", tmp_path / "meta_Office.json.gz"
    rp.write_bytes(reviews)
    mp.write_bytes(meta)
    return rp, mp


def test_amazon_bad_input_names_file_and_line(tmp_path):
    good_meta = gzip.compress(_jsonl(META))
    good_reviews = _reviews_bytes()
    ds = AMAZON | {"base_url": "unused"}
    # Truncated gzip.
    rp, mp = _amazon_files(tmp_path, gzip.compress(good_reviews)[:-30], good_meta)
    with pytest.raises(RereError, match=r"Office_5\.json\.gz: line \d+: the gzip stream is truncated"):
        read_amazon(rp, mp, ds)
    # A non-UTF-8 byte on metadata line 2.
    bad = _jsonl(META[:1]) + b'{"asin": "A2", "title": "Beta \xff"}\n'  # 0xff is byte 30 of line 2
    rp, mp = _amazon_files(tmp_path, gzip.compress(good_reviews), gzip.compress(bad))
    with pytest.raises(RereError, match=r"meta_Office\.json\.gz: line 2: byte 30 is not UTF-8"):
        read_amazon(rp, mp, ds)
    # A malformed JSON line (3) and a missing field (line 2) in the reviews.
    lines = good_reviews.split(b"\n")
    rp, mp = _amazon_files(tmp_path, gzip.compress(b"\n".join(lines[:2] + [b"{'asin': 'A1'}"] + lines[3:])), good_meta)
    with pytest.raises(RereError, match=r"Office_5\.json\.gz: line 3: not valid JSON"):
        read_amazon(rp, mp, ds)
    rp, mp = _amazon_files(
        tmp_path, gzip.compress(lines[0] + b'\n{"reviewerID": "U", "asin": "A1", "overall": 1}\n'), good_meta
    )
    with pytest.raises(RereError, match=r"line 2: missing field\(s\) \['unixReviewTime'\]"):
        read_amazon(rp, mp, ds)


def test_failed_run_leaves_no_output(server, tmp_path, capsys):
    reviews, meta = gzip.compress(_reviews_bytes())[:-30], gzip.compress(_jsonl(META))
    server.files.update({"Office_5.json.gz": reviews, "meta_Office.json.gz": meta})
    config = _write_config(tmp_path, {"office": AMAZON | {"base_url": server.url}})
    (tmp_path / "data").mkdir()
    assert _run(config, "office", tmp_path / "data" / "office", tmp_path / "dl") == 2
    assert "the gzip stream is truncated" in capsys.readouterr().err
    assert list((tmp_path / "data").iterdir()) == []


# ----------------------------------------------------------------- d3 import


def _d3_config(tmp_path, folder, **extra):
    return _write_config(tmp_path, {"d3": {"source": "d3", "path": str(folder), **extra}}, "d3.yaml")


def test_d3_round_trip_and_missing_train(ml_data, tmp_path):
    folder = tmp_path / "d3"
    folder.mkdir()
    for name in ("train.csv", "valid.csv", "test.csv", "info.txt"):
        shutil.copy(ml_data / name, folder / name)
    out = tmp_path / "imported"
    assert _run(_d3_config(tmp_path, folder), "d3", out, tmp_path / "dl") == 0
    for name in ("train.csv", "valid.csv", "test.csv", "info.txt"):
        assert (out / name).read_text() == (ml_data / name).read_text(), name
    assert read_jsonl(out / "items.jsonl")[4] == {
        "item_id": 4,
        "title": "Toy Story (1995)",
        "asin": "1",
        "text": "Toy Story (1995)",
    }
    stats = json.loads((out / "stats.json").read_text())
    # Events seen in rows: u1's 4, u2's 2, u3's 2 (every rated item appears in some row).
    assert stats["users"] == 3 and stats["items"] == 5 and stats["interactions"] == 8 and stats["train_from"] == "train"
    # Same-time order read back from the rows: what the recbole build measured on its sequences.
    built = json.loads((ml_data / "stats.json").read_text())
    assert stats["same_time_order"] == built["same_time_order"] == {"share": 0.4, "pairs": 2, "later_id_larger": 1.0}
    assert stats["same_time_pairs"] == built["same_time_pairs"] == 0.4

    (folder / "train.csv").unlink()
    with pytest.raises(RereError, match="missing_train: use_valid"):
        build("d3", load_config([_d3_config(tmp_path, folder)]), tmp_path / "dl")
    out2 = tmp_path / "imported2"
    assert _run(_d3_config(tmp_path, folder, missing_train="use_valid"), "d3", out2, tmp_path / "dl") == 0
    assert (out2 / "train.csv").read_text() == (ml_data / "valid.csv").read_text()
    assert json.loads((out2 / "stats.json").read_text())["train_from"] == "valid"


def _same_day_d3(folder: Path) -> None:
    """User u: a0 on day 1, a1 a2 a3 on day 2, a4 on day 5; histories of at most 2 items, one
    row per target over the three files. User v's second row does not follow from its first."""
    folder.mkdir()
    (folder / "info.txt").write_text("".join(f"T{i}\t{i}\n" for i in range(5)))
    header = "user_id,item_asins,item_asin,history_item_id,item_id,history_item_title,item_title,history_rating,rating,history_timestamp,timestamp\n"
    day = {0: 1, 1: 2, 2: 2, 3: 2, 4: 5}

    def row(user, hist, target):
        return (
            f'{user},"{[f"a{i}" for i in hist]}",a{target},"{hist}",{target},"{[f"T{i}" for i in hist]}",T{target},'
            f'"{[5.0] * len(hist)}",5.0,"{[day[i] for i in hist]}",{day[target]}\n'
        )

    (folder / "train.csv").write_text(header + row("u", [0], 1) + row("v", [0], 1))
    (folder / "valid.csv").write_text(header + row("u", [0, 1], 2) + row("v", [4], 2))
    (folder / "test.csv").write_text(header + row("u", [1, 2], 3) + row("u", [2, 3], 4))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_d3_ties_shuffle_reorders_same_day_events_and_rewrites_each_row(tmp_path, seed):
    folder = tmp_path / "d3"
    _same_day_d3(folder)
    kept_splits, _, kept_stats = build("d3", load_config([_d3_config(tmp_path, folder)]), tmp_path / "dl")
    assert kept_stats["d3_ties"] == "keep" and "d3_ties_shuffle" not in kept_stats
    config = _d3_config(tmp_path, folder, d3_ties="shuffle")
    splits, _, stats = build("d3", load_config([config], [f"seed={seed}"]), tmp_path / "dl")
    # u's day-2 events in the order of their seeded keys, then every row at its position
    day2 = sorted(["a1", "a2", "a3"], key=lambda a: tie_key(seed, "u", a))
    seq = ["a0", *day2, "a4"]
    u_rows = [r for s in ("train", "valid", "test") for r in splits[s] if r["user_id"] == "u"]
    assert _brief(u_rows) == [("u", seq[max(0, p - 2) : p], seq[p]) for p in range(1, 5)]
    assert [r["history_item_id"] for r in u_rows] == [[int(a[1:]) for a in seq[max(0, p - 2) : p]] for p in range(1, 5)]
    assert [r["history_timestamp"] for r in u_rows] == [[1], [1, 2], [2, 2], [2, 2]]  # times stay in place
    assert [r["timestamp"] for r in u_rows] == [2, 2, 2, 5] and [r["item_title"] for r in u_rows][-1] == "T4"
    v_rows = [r for s in ("train", "valid", "test") for r in splits[s] if r["user_id"] == "v"]
    assert _brief(v_rows) == [("v", ["a0"], "a1"), ("v", ["a4"], "a2")]  # not one chain: as imported
    moved = sum(a != b for a, b in zip(seq[1:4], ["a1", "a2", "a3"], strict=True))
    assert stats["d3_ties"] == "shuffle"
    assert stats["d3_ties_shuffle"] == {"users_reordered": 1, "users_kept": 1, "rows_with_new_target": moved}
    assert _brief(kept_splits["test"]) == [("u", ["a1", "a2"], "a3"), ("u", ["a2", "a3"], "a4")]


def test_d3_ties_shuffle_changes_the_order_with_the_seed(tmp_path):
    folder = tmp_path / "d3"
    _same_day_d3(folder)
    config = _d3_config(tmp_path, folder, d3_ties="shuffle", missing_train="use_valid")
    (folder / "train.csv").unlink()
    orders = set()
    for seed in range(6):
        splits, _, stats = build("d3", load_config([config], [f"seed={seed}"]), tmp_path / "dl")
        assert splits["train"] == splits["valid"]  # the copy of valid, reordered with it
        assert stats["d3_ties_shuffle"]["users_reordered"] == 2  # v's two rows now chain: valid has one
        orders.add(tuple(r["item_asin"] for r in splits["test"]))
    assert len(orders) > 1  # some seeds put other day-2 events last


def _tiny_d3(folder: Path) -> None:
    """Two items share the title 'Pen'; item 2 never appears in a split."""
    folder.mkdir()
    (folder / "info.txt").write_text("Pen\t0\nPen\t1\nCup\t2\n")
    header = "user_id,item_asins,item_asin,history_item_id,item_id,history_item_title,item_title,history_rating,rating,history_timestamp,timestamp\n"
    row = "u,['a0'],a1,[0],1,['Pen'],Pen,[5.0],4.0,[1],2\n"
    for split in ("train", "valid", "test"):
        (folder / f"{split}.csv").write_text(header + row)


def test_d3_duplicate_titles_made_unique(tmp_path):
    folder = tmp_path / "pens"
    _tiny_d3(folder)
    out = tmp_path / "out"
    assert _run(_d3_config(tmp_path, folder), "d3", out, tmp_path / "dl") == 0
    assert read_catalogue(out / "info.txt") == {0: "Pen [a0]", 1: "Pen [a1]", 2: "Cup"}
    row = read_split(out / "test.csv")[0]
    assert row["history_item_title"] == ["Pen [a0]"] and row["item_title"] == "Pen [a1]"
    assert read_jsonl(out / "items.jsonl")[2]["asin"] == ""


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("history_rating,", ""), r"valid\.csv: line 1: missing column"),
        (lambda t: t.replace(",[0],1,", ",[99],1,"), r"valid\.csv: line 2: item id 99 \(a0\) is not in .*info\.txt"),
        (lambda t: t.replace(",Pen,", ",Pencil,"), r"valid\.csv: line 2: item 1 has title 'Pencil' here"),
    ],
)
def test_d3_bad_input_names_file_and_line(tmp_path, capsys, edit, message):
    folder = tmp_path / "pens"
    _tiny_d3(folder)
    (folder / "valid.csv").write_text(edit((folder / "valid.csv").read_text()))
    out_parent = tmp_path / "data"
    out_parent.mkdir()
    assert _run(_d3_config(tmp_path, folder), "d3", out_parent / "d3", tmp_path / "dl") == 2
    assert re.search(message, capsys.readouterr().err)
    assert list(out_parent.iterdir()) == []
