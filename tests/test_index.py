"""`rere index`: title codes, semantic IDs (one-to-one, collision level), fingerprints, errors."""

import hashlib
import json
import math

import numpy as np
import pytest
from fixtures.rows import d3_row

from rere import RereError
from rere.cli import main
from rere.config import load_config
from rere.index import (
    ItemIndex,
    auto_codebook_size,
    build_index,
    capacity_assign,
    fingerprint,
    interaction_embeddings,
    ppmi,
    sid_codes,
)
from rere.io import write_catalogue, write_jsonl, write_split

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Western", "Musical"]


def make_catalogue(folder, n=40, duplicate_text=(), title_of=None):
    """info.txt + items.jsonl for n items; items in `duplicate_text` all get the same text."""
    titles = {i: (title_of or {}).get(i, f"Film {i} ({1950 + i})") for i in range(n)}
    write_catalogue(folder / "info.txt", titles)
    records = []
    for i in range(n):
        text = f"{titles[i]} {GENRES[i % 8]} {GENRES[(i * 3) % 8]} word{i % 5}"
        if i in duplicate_text:
            text = "The same film Drama Drama"
        records.append({"item_id": i, "title": titles[i], "asin": str(i + 100), "text": text})
    write_jsonl(folder / "items.jsonl", records)
    return titles


def test_title_index_round_trip_and_fingerprint(tmp_path):
    make_catalogue(tmp_path / "data", n=3, title_of={0: 'Toy "Story" (1995)'})
    argv = ["index", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "idx"), "--set", "index.kind=title"]
    assert main([*argv, "-q"]) == 0
    index = ItemIndex.load(tmp_path / "idx")
    assert index.kind == "title" and index.new_tokens == []
    assert index.codes == ['"Toy "Story" (1995)"', '"Film 1 (1951)"', '"Film 2 (1952)"']
    assert index.item_ids == [0, 1, 2]
    assert index.code_to_item['"Film 2 (1952)"'] == 2
    expected = hashlib.sha256(b'title\n0\t"Toy "Story" (1995)"\n1\t"Film 1 (1951)"\n2\t"Film 2 (1952)"').hexdigest()
    assert index.fingerprint == expected
    assert (tmp_path / "idx" / "config.yaml").is_file()
    assert not list(tmp_path.glob(".idx*"))  # no temporary left behind
    index.check_catalogue(tmp_path / "data")

    # One changed title changes the fingerprint, and the old index no longer fits the data.
    make_catalogue(tmp_path / "data", n=3, title_of={0: 'Toy "Story" (1996)'})
    assert build_index(tmp_path / "data", load_config()).fingerprint != index.fingerprint
    with pytest.raises(RereError, match="not the catalogue this index was built from"):
        index.check_catalogue(tmp_path / "data")


def test_atomic_index_gives_each_item_its_own_token(tmp_path):
    write_catalogue(tmp_path / "data" / "info.txt", {3: "Film C", 0: "Film A", 11: "Film B"})
    index = build_index(tmp_path / "data", load_config(overrides=["index.kind=atomic"]))
    assert index.kind == "atomic" and index.item_ids == [0, 3, 11]
    assert index.codes == ["<item_0>", "<item_3>", "<item_11>"]
    assert index.new_tokens == index.codes and index.titles == ["Film A", "Film C", "Film B"]
    assert index.fingerprint == fingerprint("atomic", [0, 3, 11], index.codes)
    assert index.stats == {"items": 3, "new_tokens": 3}


def test_load_refuses_missing_and_edited_index(tmp_path):
    with pytest.raises(RereError, match="does not exist; run `rere index"):
        ItemIndex.load(tmp_path / "nowhere")
    make_catalogue(tmp_path / "data", n=3)
    main(["index", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "idx"), "-q"])
    path = tmp_path / "idx" / "index.json"
    data = json.loads(path.read_text())
    data["items"][1]["code"] = '"Something else"'
    path.write_text(json.dumps(data))
    with pytest.raises(RereError, match="fingerprint does not match the items"):
        ItemIndex.load(tmp_path / "idx")


@pytest.mark.parametrize(
    ("n", "levels", "k"),
    [(1682, 3, 16), (10, 3, 8), (4096, 3, 16), (4097, 3, 24), (12101, 3, 24), (10**5, 2, 256), (1, 1, 8)],
)
def test_auto_codebook_size(n, levels, k):
    # ceil(n ** (1/L)) -> next multiple of 8 -> [8, 256]: 1682 ** (1/3) = 11.9 -> 12 -> 16;
    # 4097 ** (1/3) = 16.001 -> 17 -> 24; 12101 ** (1/3) = 22.96 -> 23 -> 24; 316.2 -> 256.
    assert auto_codebook_size(n, levels) == k


def test_sid_codes_resolve_collisions_by_item_id():
    # Items 0, 1 and 3 share the code (0, 1): they get <c_0>, <c_1>, <c_2> in id order.
    codes, new_tokens, stats = sid_codes([0, 1, 2, 3], np.array([[0, 1], [0, 1], [2, 3], [0, 1]]), k=4)
    assert codes == ["<a_0><b_1><c_0>", "<a_0><b_1><c_1>", "<a_2><b_3>", "<a_0><b_1><c_2>"]
    assert new_tokens[:4] == ["<a_0>", "<a_1>", "<a_2>", "<a_3>"] and new_tokens[-3:] == ["<c_0>", "<c_1>", "<c_2>"]
    assert stats["new_tokens"] == len(new_tokens) == 2 * 4 + 3
    assert stats["collision_rate"] == 0.75 and stats["max_items_per_code"] == 3
    assert stats["code_usage"] == [0.5, 0.5] and stats["distinct_codes"] == 2


def test_sid_index_is_one_to_one_and_deterministic(tmp_path):
    make_catalogue(tmp_path / "data", n=40, duplicate_text={3, 17, 29})
    sets = ["index.kind=sid", "index.sid.levels=2", "index.sid.embedding_dim=8", "index.sid.last_level=nearest"]
    argv = ["index", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "idx"), "-q"]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
    index = ItemIndex.load(tmp_path / "idx")
    assert index.kind == "sid" and len(set(index.codes)) == 40
    assert index.stats["codebook_size"] == 8  # auto: ceil(40 ** 0.5) = 7 -> 8
    # The three identical texts have identical embeddings, so the same two-level code; the
    # extra level orders them by item id.
    base = index.codes[3][: index.codes[3].index("<c_")]
    assert [index.codes[i] for i in (3, 17, 29)] == [base + "<c_0>", base + "<c_1>", base + "<c_2>"]
    assert index.stats["max_items_per_code"] >= 3 and index.stats["collision_rate"] >= 3 / 40
    for code in index.codes:  # every token of every code is a new token
        assert all(f"<{tok}" in index.new_tokens for tok in code.split("<")[1:])
    assert build_index(tmp_path / "data", load_config(overrides=sets)).codes == index.codes

    # last_level=distinct (the default) spreads same-prefix items over the last codebook:
    # the identical texts now differ at level 2 instead of needing the extra level.
    distinct = build_index(tmp_path / "data", load_config(overrides=sets[:-1]))
    assert len({distinct.codes[i] for i in (3, 17, 29)}) == 3
    assert not any("<c_" in distinct.codes[i] for i in (3, 17, 29))
    assert distinct.stats["collision_rate"] < index.stats["collision_rate"]


def test_distinct_last_level_respects_capacity(tmp_path):
    # 20 identical items, one level of 4 codes: each code takes exactly ceil(20 / 4) = 5
    # items, and the extra level <b_0>..<b_4> makes the codes one-to-one.
    make_catalogue(tmp_path / "data", n=20, duplicate_text=set(range(20)))
    index = build_index(
        tmp_path / "data", load_config(overrides=["index.kind=sid", "index.sid.levels=1", "index.sid.codebook_size=4"])
    )
    assert len(set(index.codes)) == 20
    assert index.stats["max_items_per_code"] == 5 and index.stats["collision_rate"] == 1.0
    assert index.new_tokens == ["<a_0>", "<a_1>", "<a_2>", "<a_3>", "<b_0>", "<b_1>", "<b_2>", "<b_3>", "<b_4>"]


def test_capacity_assign_by_hand():
    dist = np.array([[0.0, 1.0], [0.1, 0.2], [0.5, 0.3]])  # (items, codes)
    # Closest pairs first: (0, 0) = 0.0, (1, 0) = 0.1 but code 0 is full, (1, 1) = 0.2; item 2 is left over.
    assert capacity_assign(dist, 1).tolist() == [0, 1, -1]
    assert capacity_assign(dist, 2).tolist() == [0, 0, 1]


def test_sid_integer_codebook_and_config_errors(tmp_path):
    make_catalogue(tmp_path / "data", n=30)
    index = build_index(tmp_path / "data", load_config(overrides=["index.kind=sid", "index.sid.codebook_size=5"]))
    assert index.stats["codebook_size"] == 5
    assert all(0 < u <= 1 for u in index.stats["code_usage"])
    assert index.new_tokens[:5] == [f"<a_{i}>" for i in range(5)]
    with pytest.raises(RereError, match="'index.sid.codebook_size': 'big' is not 'auto'"):
        build_index(tmp_path / "data", load_config(overrides=["index.kind=sid", "index.sid.codebook_size=big"]))


def test_sentence_transformers_missing_is_a_clear_error(tmp_path, monkeypatch):
    make_catalogue(tmp_path / "data", n=10)
    monkeypatch.setitem(__import__("sys").modules, "sentence_transformers", None)  # import fails
    overrides = ["index.kind=sid", "index.sid.embedder=sentence-transformers", "index.sid.embedder_model=some/model"]
    with pytest.raises(RereError, match="sentence-transformers but the package is not installed"):
        build_index(tmp_path / "data", load_config(overrides=overrides))


def test_items_jsonl_must_match_the_catalogue(tmp_path):
    make_catalogue(tmp_path / "data", n=5)
    write_jsonl(tmp_path / "data" / "items.jsonl", [{"item_id": i, "title": f"x{i}", "text": "t"} for i in range(5)])
    with pytest.raises(RereError, match="item 0: title 'x0' differs from info.txt"):
        build_index(tmp_path / "data", load_config(overrides=["index.kind=sid"]))
    write_jsonl(tmp_path / "data" / "items.jsonl", [{"item_id": 0, "title": "Film 0 (1950)", "text": "t"}])
    with pytest.raises(RereError, match=r"items differ from info.txt \(e.g. missing ids \[1, 2, 3, 4\]\)"):
        build_index(tmp_path / "data", load_config(overrides=["index.kind=sid"]))


def test_fingerprint_depends_on_kind_and_order():
    assert fingerprint("title", [0, 1], ['"A"', '"B"']) != fingerprint("sid", [0, 1], ['"A"', '"B"'])
    assert fingerprint("title", [0, 1], ['"A"', '"B"']) != fingerprint("title", [0, 1], ['"B"', '"A"'])


# ---------------------------------------------------------------------------------------------
# Collaborative semantic IDs (index.sid.embedder: interactions)


def cluster_rows(clusters: list[list[int]], titles: dict[int, str]) -> list[dict]:
    """Train rows in which every item of a cluster is the target once after each other item
    of its cluster (and never meets an item of another cluster)."""
    rows = []
    for c, members in enumerate(clusters):
        for t, target in enumerate(members):
            hist = [m for m in members if m != target]
            rows.append(d3_row(f"u{c}_{t}", hist, target, titles, str, list(range(len(hist))), len(hist)))
    return rows


def test_ppmi_by_hand():
    from scipy import sparse

    # C01 = 4, C23 = 4, C02 = 1: row sums 5, 4, 5, 4, total 18
    counts = np.zeros((4, 4))
    for i, j, c in [(0, 1, 4), (2, 3, 4), (0, 2, 1)]:
        counts[i, j] = counts[j, i] = c
    got = ppmi(sparse.csr_matrix(counts)).toarray()
    want = np.zeros((4, 4))
    want[0, 1] = want[1, 0] = want[2, 3] = want[3, 2] = math.log(4 * 18 / (5 * 4))  # log 3.6
    # 0 and 2 met once, less than chance (1 * 18 / 25 < 1): PMI < 0 -> 0
    assert np.allclose(got, want)


def test_interaction_embeddings_bring_co_occurring_items_together():
    titles = {i: f"Film {i}" for i in range(10)}
    clusters = [[0, 1, 2, 3], [4, 5, 6, 7]]
    emb = interaction_embeddings(cluster_rows(clusters, titles), list(range(10)), dim=16, seed=0)
    assert emb.shape == (10, 9)  # at most n - 1 dimensions
    cos = emb @ emb.T  # rows are L2-normalised
    # C = 2 between cluster mates (each is the other's target once), row sums 6, total 48:
    # PPMI = log(2 * 48 / 36) = log(8/3) on the 3 mates, 0 elsewhere. The SVD keeps every
    # non-zero direction (rank 8 < 9), so cosines are those of the PPMI rows: two mates share
    # 2 of their 3 neighbours, cos 2/3; other clusters share none.
    for a, b in [(0, 1), (2, 3), (4, 7)]:
        assert cos[a, b] == pytest.approx(2 / 3, abs=1e-6)
    for a, b in [(0, 4), (3, 5), (1, 7)]:
        assert cos[a, b] == pytest.approx(0.0, abs=1e-6)
    # items 8 and 9 never occur in train: the zero vector
    assert np.allclose(emb[8], 0) and np.allclose(emb[9], 0)


def test_interactions_index_reads_train_only(tmp_path):
    data = tmp_path / "data"
    titles = make_catalogue(data, n=16)
    clusters = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    rows = cluster_rows(clusters, titles)
    write_split(data / "train.csv", rows)
    write_split(data / "valid.csv", rows[:2])
    sets = ["index.kind=sid", "index.sid.embedder=interactions", "index.sid.levels=2", "index.sid.codebook_size=4"]
    config = load_config(overrides=[*sets, "index.sid.embedding_dim=8"])
    index = build_index(data, config)
    assert index.stats["embedder"] == "interactions" and len(set(index.codes)) == 16
    assert index.stats["cold_items"] == 0
    first = {i: index.codes[i].split(">")[0] for i in range(16)}
    # each co-occurrence cluster is one first-level code, and the four clusters four codes
    assert [len({first[i] for i in c}) for c in clusters] == [1, 1, 1, 1]
    assert len({first[c[0]] for c in clusters}) == 4

    # valid.csv does not shape the codes; train.csv does
    write_split(data / "valid.csv", cluster_rows([[0, 4, 8, 12]], titles))
    assert build_index(data, config).codes == index.codes
    write_split(
        data / "train.csv", cluster_rows([[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]], titles)
    )
    moved = build_index(data, config)
    assert len({moved.codes[i].split(">")[0] for i in (0, 4, 8, 12)}) == 1


def test_semantic_reward_vectors_follow_the_index_embedder(tmp_path):
    """rl's semantic reward embeds items with index.sid.embedder, interactions included (it
    used to fall through to sentence-transformers for anything but tfidf)."""
    from rere.rl.inputs import item_vectors

    data = tmp_path / "data"
    titles = make_catalogue(data, n=10)
    rows = cluster_rows([[0, 1, 2, 3], [4, 5, 6, 7]], titles)
    write_split(data / "train.csv", rows)
    config = load_config(overrides=["index.sid.embedder=interactions", "index.sid.embedding_dim=16"])
    got = item_vectors(data, config)
    assert np.allclose(got, interaction_embeddings(rows, list(range(10)), dim=16, seed=config["seed"]))
    assert got[0] @ got[1] == pytest.approx(2 / 3, abs=1e-6) and np.allclose(got[8], 0)


def test_interactions_index_errors_name_the_file_and_line(tmp_path, capsys):
    data = tmp_path / "data"
    titles = make_catalogue(data, n=8)
    rows = cluster_rows([[0, 1, 2], [3, 4, 5]], titles)
    rows[2] = d3_row("bad", [1, 99], 2, {**titles, 99: "Ghost"}, str, [0, 1], 2)
    write_split(data / "train.csv", rows)
    argv = ["index", "--data", str(data), "--out", str(tmp_path / "idx"), "--set", "index.kind=sid"]
    assert main([*argv, "--set", "index.sid.embedder=interactions", "-q"]) == 2
    err = capsys.readouterr().err
    assert "train.csv: line 4: item id(s) [99] are not in info.txt" in err and "Traceback" not in err
    assert not (tmp_path / "idx").exists()
