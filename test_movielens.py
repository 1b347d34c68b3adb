"""The MovieLens adapter (loader, leave-one-out split, actions and authors) and, on its data, the generic
core's Phoenix examples (phoenix_split.py), baselines and top-k dumps (phoenix_evaluation.py).

Hand-made data: TIES (stable-sort ties, three file formats) and CHAIN (baselines, see below).
One test reads the real ML-100K and is skipped only when the wheel cannot be fetched.
"""

import os
import sys

import numpy as np
import pytest

import movielens as ml
import phoenix_evaluation as evaluation
import phoenix_hashing as hashing
import phoenix_metrics as metrics
import phoenix_split
from phoenix_inputs import ACTIONS, PAD_ID
from phoenix_log import LogError
from phoenix_split import MIN_EVAL_INTERACTIONS, SURFACE
from recsys_model import HashConfig

# (user, item, rating, timestamp) in file order. User 1 rated 10 and 11 in the same second, 10
# first in the file; sorted: 12, 10, 11, 13 -> train [12, 10], val 11, test 13. User 2: 20, 21, 22,
# 10 -> train [20, 21], val 22, test 10. User 3 has two ratings: training only.
TIES = [(1, 10, 5, 100), (2, 20, 3, 50), (1, 11, 4, 100), (1, 12, 2, 90), (2, 21, 1, 60),
        (1, 13, 3, 200), (2, 22, 4, 70), (2, 10, 5, 80), (3, 10, 4, 10), (3, 11, 5, 20)]
TIES_SEQUENCES = {1: [12, 10, 11, 13], 2: [20, 21, 22, 10], 3: [10, 11]}

# Time-ordered sequences for the baselines (hand-computed rankings in test_baselines_golden).
CHAIN = {1: [1, 2, 3], 3: [2, 3, 4, 5], 4: [2, 6, 4, 1], 5: [6, 4]}

# Movies 10 and 11 in each metadata format; 11 has no date, no year and the "unknown" genre.
# Latin-1 "é" checks the GroupLens encoding.
TOY_FLAGS = "|".join("1" if g in ("Animation", "Children's", "Comedy") else "0" for g in ml.GENRES)
UNKNOWN_FLAGS = "|".join("1" if g == "unknown" else "0" for g in ml.GENRES)
U_ITEM = (f"10|Misérables, Les (1995)|01-Jan-1995||http://x|{TOY_FLAGS}\n"
          f"11|unknown||||{UNKNOWN_FLAGS}\n")
MOVIES_DAT = "10::Misérables, Les (1995)::Animation|Children's|Comedy\n11::unknown::unknown\n"
RECBOLE_ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                "10\tMisérables, Les\t1995\tAnimation Children's Comedy\n11\tunknown\tunknown\tunknown\n")
TOY_AUTHOR = 2**3 + 2**4 + 2**5  # bits of Animation, Children's, Comedy in GENRES


def make_ratings(rows) -> ml.Ratings:
    u, i, r, t = (np.array(c) for c in zip(*rows))
    meta = ml._no_metadata()
    return ml.Ratings(u.astype(np.int64), i.astype(np.int64), r.astype(np.float32), t.astype(np.int64),
                      *meta, source="test")


def chain_ratings() -> ml.Ratings:
    return make_ratings([(u, item, 3, t) for u, items in CHAIN.items() for t, item in enumerate(items)])


def write_format(directory, fmt: str, rows=TIES) -> None:
    if fmt == "grouplens_100k":
        (directory / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
        (directory / "u.item").write_bytes(U_ITEM.encode("latin-1"))
    elif fmt == "ml_1m":
        (directory / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
        (directory / "movies.dat").write_bytes(MOVIES_DAT.encode("latin-1"))
    else:  # RecBole's atomic files, as inside the wheel
        header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        (directory / "toy.inter").write_text(header + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
        (directory / "toy.item").write_text(RECBOLE_ITEM, encoding="utf-8")


@pytest.mark.parametrize("fmt", ["grouplens_100k", "ml_1m", "recbole"])
def test_parse_formats(tmp_path, fmt):
    write_format(tmp_path, fmt)
    r = ml.load_ratings(tmp_path)
    user, item, rating, stamp = (np.array(c) for c in zip(*TIES))
    np.testing.assert_array_equal(r.user, user)  # file order kept
    np.testing.assert_array_equal(r.item, item)
    np.testing.assert_array_equal(r.rating, rating)
    np.testing.assert_array_equal(r.timestamp, stamp)
    assert r.item_ids.tolist() == [10, 11]
    assert r.titles.tolist() == ["Misérables, Les", "unknown"]
    assert r.years.tolist() == [1995, ml.YEAR_UNKNOWN]
    assert [list(np.array(ml.GENRES)[g]) for g in r.genres] == [["Animation", "Children's", "Comedy"], ["unknown"]]


def test_missing_item_file_and_bad_directory(tmp_path):
    write_format(tmp_path, "grouplens_100k")
    (tmp_path / "u.item").unlink()
    split = ml.leave_one_out(ml.load_ratings(tmp_path))
    assert (split.item_authors == 0).all()  # no metadata: author 0 for every movie
    with pytest.raises(FileNotFoundError):
        ml.load_ratings(tmp_path / "nowhere")


@pytest.mark.parametrize("swap, user1", [
    (False, [12, 10, 11, 13]),
    (True, [12, 11, 10, 13]),  # the same two ratings in the other file order
], ids=["file_order", "swapped_file_order"])
def test_stable_sort_keeps_file_order_of_ties(swap, user1):
    rows = list(TIES)
    if swap:
        rows[0], rows[2] = rows[2], rows[0]
    split = ml.leave_one_out(make_ratings(rows))
    assert split.items[split.offsets[0]:split.offsets[1]].tolist() == user1


def test_stable_sort_many_ties():
    # Long runs of equal timestamps: small-array sorts are stable by accident, large ones are not.
    rng = np.random.default_rng(0)
    items = rng.permutation(500)
    stamps = np.repeat([5, 3, 9, 3, 7], 100)  # five tied blocks, out of time order in the file
    split = ml.leave_one_out(make_ratings([(7, int(i), 3, int(t)) for i, t in zip(items, stamps)]))
    expected = np.concatenate([items[stamps == t] for t in (3, 5, 7, 9)])
    np.testing.assert_array_equal(split.items, expected)


def test_leave_one_out_golden():
    split = ml.leave_one_out(make_ratings(TIES))
    assert split.user_ids.tolist() == [1, 2, 3]
    for row, user in enumerate(split.user_ids):
        assert split.items[split.offsets[row]:split.offsets[row + 1]].tolist() == TIES_SEQUENCES[user]
    assert split.train_len.tolist() == [2, 2, 2]
    assert split.has_eval.tolist() == [True, True, False]
    assert split.item_ids.tolist() == [10, 11, 12, 13, 20, 21, 22]
    assert split.item_ids[split.targets("val")].tolist() == [11, 22]
    assert split.item_ids[split.targets("test")].tolist() == [13, 10]
    assert split.item_ids[split.targets("train")].tolist() == [10, 21, 11]  # position 1 of each user
    catalog = split.item_ids.tolist()
    expected = {"val": [{12, 10}, {20, 21}], "test": [{12, 10, 11}, {20, 21, 22}]}
    for which, history in expected.items():
        mask = split.exclude_mask(which)  # all earlier items, however many
        assert [set(np.array(catalog)[m].tolist()) for m in mask] == history


@pytest.mark.parametrize("which, history_len, posts, lengths", [
    ("train", 3, [[12, -1, -1], [20, -1, -1], [10, -1, -1]], [1, 1, 1]),
    ("val", 3, [[12, 10, -1], [20, 21, -1]], [2, 2]),
    ("test", 3, [[12, 10, 11], [20, 21, 22]], [3, 3]),
    ("test", 2, [[10, 11], [21, 22]], [2, 2]),  # the most recent S items
    ("test", 1, [[11], [22]], [1, 1]),
], ids=["train", "val", "test", "test_S2_truncated", "test_S1"])
def test_history_construction_and_padding(which, history_len, posts, lengths):
    split = ml.leave_one_out(make_ratings(TIES))
    ex = phoenix_split.phoenix_examples(split, which, history_len)
    assert ex["history_post_ids"].tolist() == posts
    assert ex["history_len"].tolist() == lengths
    pad = ex["history_post_ids"] == PAD_ID
    assert (ex["history_author_ids"][pad] == PAD_ID).all()
    assert not ex["history_actions"][pad].any()
    assert (ex["history_surfaces"] == SURFACE).all()
    assert (ex["target_post_ids"] == split.item_ids[ex["target_columns"]]).all()


def test_example_subset_matches_full_build():
    split = ml.leave_one_out(chain_ratings())
    full = phoenix_split.phoenix_examples(split, "train", 2)
    part = phoenix_split.phoenix_examples(split, "train", 2, example_indices=np.array([2, 0]))
    for key, value in part.items():
        np.testing.assert_array_equal(value, full[key][[2, 0]], err_msg=key)


def test_action_mapping():
    actions = ml.rating_actions([1, 2, 3, 4, 5])
    names = [sorted(np.array(ACTIONS)[a].tolist()) for a in actions]
    assert names == [["click_score", "not_interested_score"], ["click_score", "not_interested_score"],
                     ["click_score"], ["click_score", "favorite_score"],
                     ["click_score", "favorite_score", "share_score"]]


def test_history_and_target_actions_follow_ratings():
    split = ml.leave_one_out(make_ratings(TIES))
    ex = phoenix_split.phoenix_examples(split, "test", 3)
    # User 1's history 12 (2 stars), 10 (5), 11 (4); target 13 (3 stars).
    np.testing.assert_array_equal(ex["history_actions"][0], ml.rating_actions([2, 5, 4]))
    np.testing.assert_array_equal(ex["target_actions"][0], ml.rating_actions(3))


def test_authors_from_genres(tmp_path):
    write_format(tmp_path, "grouplens_100k")
    ratings = ml.load_ratings(tmp_path)
    split = ml.leave_one_out(ratings)
    assert split.authors_of([10, 11, 12, PAD_ID]).tolist() == [TOY_AUTHOR, 1, 0, PAD_ID]
    first = ml.leave_one_out(ratings, author_scheme="first_genre")
    assert first.authors_of([10, 11]).tolist() == [2**3, 1]  # Animation, unknown
    with pytest.raises(ValueError, match="not in the catalog"):
        split.authors_of([99])


def test_phoenix_batch_hashes_examples():
    split = ml.leave_one_out(make_ratings(TIES))
    ex = phoenix_split.phoenix_examples(split, "val", 3)
    cfg = HashConfig()
    batch = phoenix_split.phoenix_batch(split, ex, cfg)
    np.testing.assert_array_equal(batch.history_post_hashes, hashing.hash_post_ids(ex["history_post_ids"], cfg))
    assert (batch.history_post_hashes[:, 2] == hashing.PAD_HASH).all()  # right padding
    np.testing.assert_array_equal(batch.candidate_post_hashes[:, 0],
                                  hashing.hash_post_ids(ex["target_post_ids"], cfg))
    assert batch.history_actions.dtype == np.float32


def test_item_sampling_frequencies():
    split = ml.leave_one_out(chain_ratings())
    # Training targets: user 3's item 3 (position 1 of [2, 3]), user 4's 6, user 5's 4.
    q = phoenix_split.item_sampling_frequencies(split)
    assert dict(zip(split.item_ids.tolist(), q.tolist())) == {1: 0, 2: 0, 3: 1 / 3, 4: 1 / 3, 5: 0, 6: 1 / 3}


def test_counts_golden():
    split = ml.leave_one_out(chain_ratings())
    assert evaluation.popularity_counts(split, "val").tolist() == [1, 2, 1, 1, 0, 2]  # items 1..6
    assert evaluation.popularity_counts(split, "test").tolist() == [1, 3, 1, 3, 0, 2]
    pairs = evaluation.transition_counts(split, "test")
    # Visible pairs before the test targets: 1->2, 2->3, 3->4, 2->6, 6->4 (users 4 and 5).
    expected = np.zeros((6, 6), dtype=int)
    for a, b, count in [(1, 2, 1), (2, 3, 1), (3, 4, 1), (2, 6, 1), (6, 4, 2)]:
        expected[a - 1, b - 1] = count
    np.testing.assert_array_equal(pairs, expected)


# Rankings of the eval users 1, 3, 4 worked out by hand (excluded: every earlier item).
#   test, popularity 1:1 2:3 3:1 4:3 5:0 6:2
#     user 1 (excl 1, 2): 4, 6, 3, 5         user 3 (excl 2, 3, 4): 6, 1, 5   user 4: 1, 3, 5
#   test, transition: user 1's last item 2 -> {3: 1, 6: 1}; 6 beats 3 on popularity: 6, 3, 4, 5.
#     Users 3 and 4 end on 4, which has no successor: popularity.
#   val: popularity 1:1 2:2 3:1 4:1 5:0 6:2; user 4's last item 6 -> {4: 1}.
@pytest.mark.parametrize("which, name, topk, ranks", [
    ("test", "popularity", [[4, 6, 3, 5], [6, 1, 5, -1], [1, 3, 5, -1]], [2, 2, 0]),
    ("test", "transition", [[6, 3, 4, 5], [6, 1, 5, -1], [1, 3, 5, -1]], [1, 2, 0]),
    ("val", "popularity", [[2, 6, 3, 4], [6, 1, 4, 5], [1, 3, 4, 5]], [0, 2, 2]),
    ("val", "transition", [[2, 6, 3, 4], [6, 1, 4, 5], [4, 1, 3, 5]], [0, 2, 0]),
], ids=["test_pop", "test_trans", "val_pop", "val_trans"])
def test_baselines_golden(which, name, topk, ranks):
    split = ml.leave_one_out(chain_ratings())
    assert evaluation.baseline_topk(split, which, name, k=4).tolist() == topk
    expected = metrics.metrics_from_ranks(ranks)
    got = evaluation.evaluate_baseline(split, which, name)
    for key in ("HR@10", "NDCG@10", "HR@50", "MRR"):
        assert got[key] == pytest.approx(expected[key]), key


def test_baselines_match_brute_force():
    rng = np.random.default_rng(0)
    rows = [(int(u), int(i), 3, int(t)) for u, i, t in zip(rng.integers(0, 8, 120), rng.integers(0, 15, 120),
                                                            rng.integers(0, 30, 120))]  # many ties
    # 8 users x 15 movies: many repeated (user, movie) pairs; the first rating of each counts.
    split = ml.leave_one_out(make_ratings(rows), duplicates="first")
    catalog = split.item_ids.tolist()
    for which in ("val", "test"):
        cut = 2 if which == "val" else 1  # items held out after the visible part
        sequences = {}
        for index, (u, i, _, t) in enumerate(rows):
            sequences.setdefault(u, []).append((t, index, i))
        sequences = {u: list(dict.fromkeys(i for _, _, i in sorted(s))) for u, s in sequences.items()}
        visible = {u: (s[:-cut] if len(s) >= MIN_EVAL_INTERACTIONS else s) for u, s in sequences.items()}
        pop = {i: sum(s.count(i) for s in visible.values()) for i in catalog}
        pairs = {}
        for s in visible.values():
            for a, b in zip(s, s[1:]):
                pairs[a, b] = pairs.get((a, b), 0) + 1
        for name in evaluation.BASELINES:
            top = evaluation.baseline_topk(split, which, name, k=len(catalog))
            for row, u in enumerate(sorted(u for u, s in sequences.items() if len(s) >= MIN_EVAL_INTERACTIONS)):
                last = visible[u][-1]
                trans = (lambda i: pairs.get((last, i), 0)) if name == "transition" else (lambda i: 0)
                ranked = sorted(set(catalog) - set(visible[u]), key=lambda i: (-trans(i), -pop[i], i))
                assert top[row, :len(ranked)].tolist() == ranked, (which, name, u)


def test_dump_round_trip(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_format(data, "grouplens_100k",
                 [(u, item, 3, t) for u, items in CHAIN.items() for t, item in enumerate(items)])
    split = ml.leave_one_out(ml.load_ratings(data))
    users = split.user_ids[split.eval_users()]
    path = tmp_path / "topk.csv"
    evaluation.dump_topk(path, users, evaluation.baseline_topk(split, "test", "transition", k=10))
    assert sorted(os.listdir(tmp_path)) == ["data", "topk.csv"]  # no temp file left
    assert path.read_text().splitlines()[:2] == ["user_id," + ",".join(f"item_{j}" for j in range(1, 11)),
                                                 "1,6,3,4,5,-1,-1,-1,-1,-1,-1"]
    table = evaluation.evaluate_baseline(split, "test", "transition")
    check = ml.recompute_from_dump(path, data)
    assert check["HR@10"] == pytest.approx(table["HR@10"])
    assert check["NDCG@10"] == pytest.approx(table["NDCG@10"])
    assert (check["num_users"], check["missing_users"], check["history_items_in_topk"]) == (3, 0, 0)
    # An unfiltered dump missing user 4: history items are counted and user 4 is a miss.
    evaluation.dump_topk(path, users[:2], np.array([[1, 2, 3] + [-1] * 7, [5, 2, 6] + [-1] * 7]))
    check = ml.recompute_from_dump(path, data)
    assert (check["HR@10"], check["missing_users"], check["history_items_in_topk"]) == (pytest.approx(2 / 3), 1, 3)


def test_download_rejects_wrong_hash(tmp_path, monkeypatch):
    # A "pip" that writes a wheel with the wrong content: ensure_wheel must refuse it.
    fake = [sys.executable, "-c", f"import sys; open(sys.argv[1] + '/{ml.WHEEL_FILE}', 'wb').write(b'x')"]
    monkeypatch.setattr(ml, "_pip_commands", lambda dest: [[*fake, dest]])
    with pytest.raises(RuntimeError, match="sha256") as raised:
        ml.ensure_wheel(tmp_path)
    assert not isinstance(raised.value, ml.WheelUnavailableError)  # the fixture must not skip on it
    assert not (tmp_path / ml.WHEEL_FILE).exists()
    monkeypatch.setattr(ml, "_pip_commands", lambda dest: [[sys.executable, "-c", "raise SystemExit(1)"]])
    with pytest.raises(ml.WheelUnavailableError, match="could not download"):
        ml.ensure_wheel(tmp_path)


# Measured once (`uv run python -m scripts.movielens_baselines`). The pipeline is deterministic; the tolerance covers
# the 6-decimal rounding of these constants. HR@10 values are exact hit counts over 943 users.
ML100K_BASELINES = {
    ("val", "popularity"): (70 / 943, 0.034517, 0.230117, 0.033322),
    ("val", "transition"): (135 / 943, 0.074781, 0.331919, 0.065864),
    ("test", "popularity"): (81 / 943, 0.044913, 0.198303, 0.041612),
    ("test", "transition"): (137 / 943, 0.079254, 0.339343, 0.071905),
}
ML100K_TOL = 1e-6


@pytest.fixture(scope="module")
def ml100k():
    try:
        wheel = ml.ensure_wheel()
    except ml.WheelUnavailableError as error:  # no registry access / no pip; a sha256 mismatch fails
        pytest.skip(f"ML-100K wheel unavailable (no network?): {error}")
    return ml.load_ratings(wheel)


def test_ml100k_end_to_end(ml100k, tmp_path):
    split = ml.leave_one_out(ml100k)
    assert (len(split.user_ids), len(split.item_ids), len(ml100k.user)) == (943, 1682, 100_000)
    assert split.has_eval.all() and len(split.targets("train")) == 100_000 - 3 * 943
    for (which, name), (hr10, ndcg10, hr50, mrr) in ML100K_BASELINES.items():
        m = evaluation.evaluate_baseline(split, which, name)
        np.testing.assert_allclose([m["HR@10"], m["NDCG@10"], m["HR@50"], m["MRR"]], [hr10, ndcg10, hr50, mrr],
                                   atol=ML100K_TOL, err_msg=f"{which} {name}")
    path = tmp_path / "pop.csv"
    evaluation.dump_topk(path, split.user_ids, evaluation.baseline_topk(split, "test", "popularity"))
    check = ml.recompute_from_dump(path, ml100k.source)
    assert check["HR@10"] == pytest.approx(81 / 943)
    assert check["NDCG@10"] == pytest.approx(ML100K_BASELINES["test", "popularity"][1], abs=ML100K_TOL)
    assert check["history_items_in_topk"] == 0


# ---------------------------------------------------------------------------------------------
# Hostile input: every bad line is an error naming file, line and column; nothing turns into padding
# ---------------------------------------------------------------------------------------------

GOOD_LINES = ["1\t10\t5\t100", "1\t11\t4\t101", "1\t12\t3\t102"]


def write_u_data(directory, lines) -> str:
    path = directory / "u.data"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_ids_above_2_to_53_are_parsed_exactly(tmp_path):
    # float64 parsing merged 2**53 and 2**53 + 1 into one user, and made 1e20-like ids padding.
    big = [2**53, 2**53 + 1, 2**63 - 1]
    write_u_data(tmp_path, [f"{u}\t{10 + j}\t3\t{100 + j}" for u in big for j in range(3)])
    ratings = ml.load_ratings(tmp_path)
    assert ratings.user.dtype == np.int64
    assert sorted(set(ratings.user.tolist())) == big
    assert ml.leave_one_out(ratings).user_ids.tolist() == big


@pytest.mark.parametrize("field, column, match", [
    ("1.5", 1, r"column 1 \(user id\): expected a non-negative integer, got '1.5'"),
    ("1e20", 1, r"column 1 \(user id\): expected a non-negative integer, got '1e20'"),
    ("-3", 1, r"column 1 \(user id\): .*negative ids are padding.*got -3"),
    ("-1", 2, r"column 2 \(item id\): .*negative ids are padding.*got -1"),
    ("9223372036854775808", 2, r"column 2 \(item id\): expected a value that fits int64"),
    ("1" * 5000, 1, r"column 1 \(user id\): expected a value that fits int64"),
    ("x", 2, r"column 2 \(item id\): expected a non-negative integer, got 'x'"),
    ("nan", 3, r"column 3 \(rating\): expected a number in \[1, 5\], got 'nan'"),
    ("inf", 3, r"column 3 \(rating\): expected a number in \[1, 5\], got 'inf'"),
    ("0", 3, r"column 3 \(rating\): expected a number in \[1, 5\], got '0'"),
    ("6", 3, r"column 3 \(rating\): expected a number in \[1, 5\], got '6'"),
    ("1_0", 3, r"column 3 \(rating\): expected a number in \[1, 5\], got '1_0'"),
    ("", 3, r"column 3 \(rating\): expected a number in \[1, 5\], got ''"),
    ("100.5", 4, r"column 4 \(timestamp\): expected a non-negative integer, got '100.5'"),
    ("-100", 4, r"column 4 \(timestamp\): expected a non-negative integer.*got -100"),
], ids=["float-id", "exp-id", "negative-user", "pad-item", "int64-overflow", "5000-digits", "text-id",
        "nan-rating", "inf-rating", "rating-0", "rating-6", "underscore-rating", "empty-rating",
        "float-timestamp", "negative-timestamp"])
def test_bad_rating_fields_name_file_line_and_column(tmp_path, field, column, match):
    fields = GOOD_LINES[1].split("\t")
    fields[column - 1] = field
    path = write_u_data(tmp_path, [GOOD_LINES[0], "\t".join(fields), GOOD_LINES[2]])
    with pytest.raises(ml.RatingsFileError, match=rf"{path}:2: {match}"):
        ml.load_ratings(tmp_path)


@pytest.mark.parametrize("fmt, sep, where", [("grouplens_100k", "\t", "u.data"), ("ml_1m", "::", "ratings.dat"),
                                             ("recbole", "\t", "toy.inter")])
def test_bad_fields_are_caught_in_every_ratings_format(tmp_path, fmt, sep, where):
    write_format(tmp_path, fmt, TIES)
    path = tmp_path / where
    lines = path.read_text().splitlines()
    header = int(fmt == "recbole")
    fields = lines[header + 4].split(sep)
    fields[0] = "-2"  # user of file line header + 5
    lines[header + 4] = sep.join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ml.RatingsFileError, match=rf"{where}:{header + 5}: column 1 \(user id\).*got -2"):
        ml.load_ratings(tmp_path)


@pytest.mark.parametrize("line, match", [
    ("1\t11\t4", r"expected 4 fields separated by '\\t', got 3"),
    ("1\t11\t4\t101\t7", r"expected 4 fields separated by '\\t', got 5"),
])
def test_rating_lines_with_wrong_field_count(tmp_path, line, match):
    path = write_u_data(tmp_path, [GOOD_LINES[0], GOOD_LINES[2], line])
    with pytest.raises(ml.RatingsFileError, match=rf"{path}:3: {match}"):
        ml.load_ratings(tmp_path)


def test_rating_range_is_a_parameter(tmp_path):
    write_u_data(tmp_path, GOOD_LINES[:2] + ["1\t12\t0.5\t102"])  # ML-10M style half star
    with pytest.raises(ml.RatingsFileError, match=r"u.data:3: column 3 \(rating\)"):
        ml.load_ratings(tmp_path)
    assert ml.load_ratings(tmp_path, rating_range=(0.5, 5.0)).rating.tolist() == [5.0, 4.0, 0.5]
    with pytest.raises(ValueError, match=r"rating_range: expected finite \(low, high\)"):
        ml.load_ratings(tmp_path, rating_range=(5.0, 1.0))


def test_per_line_parser_equals_fast_path(tmp_path):
    # The vectorised parse covers clean files; blank lines, CRLF, spaces or "100.0" timestamps take
    # the per-line parser. Both must give identical arrays.
    lines = [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in TIES]
    write_u_data(tmp_path, lines)
    fast = ml.load_ratings(tmp_path)
    messy = [lines[0] + "\r", "   ", f" {lines[1]} ", lines[2].rsplit("\t", 1)[0] + f"\t{TIES[2][3]}.0"] + lines[3:]
    write_u_data(tmp_path, messy)
    slow = ml.load_ratings(tmp_path)
    for name in ("user", "item", "rating", "timestamp"):
        np.testing.assert_array_equal(getattr(slow, name), getattr(fast, name), err_msg=name)
        assert getattr(slow, name).dtype == getattr(fast, name).dtype, name


def test_empty_ratings_file(tmp_path):
    path = write_u_data(tmp_path, ["  "])
    with pytest.raises(ml.RatingsFileError, match=rf"{path}: no ratings in the file"):
        ml.load_ratings(tmp_path)


def test_inter_header_and_decode_errors_name_file_and_line(tmp_path):
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    inter = tmp_path / "toy.inter"
    inter.write_bytes((header + "1\t10\t5\t100\n").encode() + b"1\t1\xff1\t4\t101\n")
    with pytest.raises(ml.RatingsFileError, match=rf"{inter}:3: not valid utf-8-sig \(byte 0xff\)"):
        ml.load_ratings(tmp_path)
    inter.write_text("user:token\titem:token\n1\t2\n")
    with pytest.raises(ml.RatingsFileError, match=rf"{inter}:1: expected a header with user_id"):
        ml.load_ratings(tmp_path)
    (tmp_path / "other.inter").write_text(header)
    with pytest.raises(ValueError, match=r"expected one \*.inter file, got \['other.inter', 'toy.inter'\]"):
        ml.load_ratings(tmp_path)


def test_broken_wheel_names_the_wheel(tmp_path):
    wheel = tmp_path / "recbole.whl"
    wheel.write_bytes(b"not a zip")
    with pytest.raises(ml.RatingsFileError, match=rf"{wheel}: not a recbole wheel"):
        ml.load_ratings(wheel)


@pytest.mark.parametrize("fmt, name, text, line, match", [
    ("grouplens_100k", "u.item", f"10|Short|01-Jan-1995|{TOY_FLAGS}\n", 2,
     r"expected 24 fields separated by '\|', got 22"),
    ("grouplens_100k", "u.item", f"10|T|01-Jan-1995||u|{TOY_FLAGS.replace('1', 'x', 1)}\n", 2,
     r"genre flags \(columns 6-24\): expected 0 or 1, got 'x'"),
    ("grouplens_100k", "u.item", f"-4|T|||u|{TOY_FLAGS}\n", 2, r"column 1 \(item id\).*got -4"),
    ("grouplens_100k", "u.item", f"11|Again|||u|{TOY_FLAGS}\n", 2, r"movie id 11 already listed on line 1"),
    ("ml_1m", "movies.dat", "12::Title (1990)\n", 2, r"expected 3 fields separated by '::', got 2"),
    ("ml_1m", "movies.dat", "12::Title (1990)::Comedy|Space opera\n", 2, r"unknown genre 'Space opera'"),
    ("recbole", "toy.item", "12\tTitle\t1990\n", 4, r"expected 4 fields separated by '\\t', got 3"),
], ids=["short-u.item", "bad-flag", "negative-movie", "duplicate-movie", "short-movies.dat", "unknown-genre",
        "short-recbole-item"])
def test_bad_movie_lines_name_file_and_line(tmp_path, fmt, name, text, line, match):
    # A short u.item line used to shift the title into the date and the flags into the genres.
    write_format(tmp_path, fmt)
    path = tmp_path / name
    first = {"u.item": f"11|unknown||||{UNKNOWN_FLAGS}\n", "movies.dat": "11::unknown::unknown\n",
             "toy.item": RECBOLE_ITEM}[name]
    path.write_bytes((first + text).encode("utf-8" if fmt == "recbole" else "latin-1"))
    with pytest.raises(ml.RatingsFileError, match=rf"{path}:{line}: {match}"):
        ml.load_ratings(tmp_path)


def test_latin1_byte_0x85_stays_inside_its_line(tmp_path):
    # Latin-1 0x85 decodes to U+0085, a line break for str.splitlines: it split u.item lines.
    write_format(tmp_path, "grouplens_100k")
    (tmp_path / "u.item").write_bytes(f"10|Dots\x85Dashes (1995)|01-Jan-1995||u|{TOY_FLAGS}\n".encode("latin-1"))
    ratings = ml.load_ratings(tmp_path)
    assert ratings.titles.tolist() == ["Dots\x85Dashes"] and ratings.years.tolist() == [1995]


@pytest.mark.parametrize("field, value, err, match", [
    ("user", np.array([1, -1, 1], np.int64), ValueError,
     r"Ratings.user: expected values >= 0 \(negative ids are padding\), got -1"),
    ("item", np.array([1.0, 2.5, 3.0]), TypeError, r"Ratings.item: expected an integer dtype, got float64"),
    ("rating", np.array([1.0, np.nan, 3.0], np.float32), ValueError,
     r"Ratings.rating: expected finite stars, got nan at rating 1"),
    ("timestamp", np.array([1, 2, -3], np.int64), ValueError, r"Ratings.timestamp: expected values >= 0, got -3"),
    ("item", np.array([1, 2], np.int64), ValueError, r"Ratings.item: expected shape \[R=3\]"),
], ids=["negative-user", "float-item", "nan-rating", "negative-time", "short"])
def test_hand_built_ratings_are_checked(field, value, err, match):
    columns = {"user": np.array([1, 1, 1]), "item": np.array([4, 5, 6]), "rating": np.array([3.0, 4.0, 5.0]),
               "timestamp": np.array([1, 2, 3])}
    columns[field] = value
    with pytest.raises(err, match=match):
        ml.Ratings(**columns, **dict(zip(("item_ids", "titles", "years", "genres"), ml._no_metadata())),
                   source="test")


# (user, item, rating, timestamp): user 1 re-rates 10 after 11 and 12; the re-rating is the last in
# time, so without a rule 10 would be the test target *and* in the test history.
DUPLICATES = [(1, 10, 3, 100), (1, 11, 4, 101), (1, 12, 5, 102), (1, 13, 2, 103), (1, 10, 5, 104),
              (2, 20, 3, 10), (2, 21, 3, 11), (2, 22, 3, 12), (2, 21, 1, 13), (2, 21, 1, 14)]


def test_duplicate_ratings_are_rejected_by_default():
    with pytest.raises(ValueError, match=r"3 ratings repeat an earlier \(user, movie\) pair, e.g. \[\(1, 10\), "
                                         r"\(2, 21\)\].*duplicates='first'"):
        ml.leave_one_out(make_ratings(DUPLICATES))
    with pytest.raises(ValueError, match=r"duplicates must be one of \('error', 'first'\)"):
        ml.leave_one_out(make_ratings(TIES), duplicates="last")


def test_duplicates_first_keeps_earliest_and_never_leaks_the_target():
    split = ml.leave_one_out(make_ratings(DUPLICATES), duplicates="first")
    assert split.items[split.offsets[0]:split.offsets[1]].tolist() == [10, 11, 12, 13]
    assert split.ratings[split.offsets[0]:split.offsets[1]].tolist() == [3, 4, 5, 2]  # first rating of 10
    assert split.items[split.offsets[1]:split.offsets[2]].tolist() == [20, 21, 22]
    for which in ("val", "test"):
        targets = split.targets(which)
        mask = split.exclude_mask(which)
        assert not mask[np.arange(len(targets)), targets].any(), which  # target not in visible history
        ex = phoenix_split.phoenix_examples(split, which, history_len=10)
        assert not (ex["history_post_ids"] == ex["target_post_ids"][:, None]).any(), which


def test_recompute_from_dump_follows_the_duplicate_rule(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_format(data, "grouplens_100k", DUPLICATES)
    split = ml.leave_one_out(ml.load_ratings(data), duplicates="first")
    path = tmp_path / "topk.csv"
    evaluation.dump_topk(path, split.user_ids[split.eval_users()],
                         evaluation.baseline_topk(split, "test", "popularity", k=10))
    check = ml.recompute_from_dump(path, data)
    table = evaluation.evaluate_baseline(split, "test", "popularity")
    assert (check["HR@10"], check["NDCG@10"]) == (pytest.approx(table["HR@10"]), pytest.approx(table["NDCG@10"]))
    assert check["history_items_in_topk"] == 0


def test_no_user_with_enough_ratings_is_a_clear_error(tmp_path):
    rows = [(1, 10, 3, 1), (1, 11, 3, 2), (2, 10, 3, 1)]
    with pytest.raises(ValueError, match=r"no user has >= 3 ratings \(a training item.*found max 2 over 2 users"):
        ml.leave_one_out(make_ratings(rows))
    # The dump checker used to divide by zero on the same data.
    write_format(tmp_path, "grouplens_100k", rows)
    (tmp_path / "dump.csv").write_text("user_id,item_1\n1,10\n")
    with pytest.raises(ValueError, match=r"no user has >= 3 interactions"):
        ml.recompute_from_dump(tmp_path / "dump.csv", tmp_path)


@pytest.mark.parametrize("text, line, match", [
    ("user,item_1\n1,10\n", 1, r"expected the header 'user_id,item_1,...'"),
    ("user_id,item_1\n1,10\n1,11\n", 3, r"user 1 already has a row on line 2"),
    ("user_id,item_1\n1,ten\n", 2, r"expected integer ids, got \['1', 'ten'\]"),
], ids=["header", "duplicate-user", "text"])
def test_bad_dump_rows_name_file_and_line(tmp_path, text, line, match):
    data = tmp_path / "data"
    data.mkdir()
    write_format(data, "grouplens_100k")
    path = tmp_path / "dump.csv"
    path.write_text(text)
    with pytest.raises(LogError, match=rf"{path}:{line}: {match}"):  # a dump is no MovieLens file
        ml.recompute_from_dump(path, data)


def test_float_movie_ids_and_bad_history_len_are_rejected():
    split = ml.leave_one_out(make_ratings(TIES))
    with pytest.raises(TypeError, match=r"item_ids: expected integer item ids, got dtype float64"):
        split.authors_of(np.array([10.7]))  # used to be truncated to movie 10
    ex = phoenix_split.phoenix_examples(split, "val", 3)
    with pytest.raises(TypeError, match=r"candidate_post_ids: expected integer item ids"):
        phoenix_split.phoenix_batch(split, ex, HashConfig(), candidate_post_ids=np.array([[10.0], [20.5]]))
    with pytest.raises(ValueError, match=r"history_len: expected >= 1, got 0"):
        phoenix_split.phoenix_examples(split, "val", 0)
    with pytest.raises(ValueError, match=r"rating: expected finite stars"):
        ml.rating_actions([3.0, np.nan])
    with pytest.raises(TypeError, match=r"topk_items: expected integer item ids"):
        evaluation.dump_topk("unused.csv", np.array([1]), np.array([[10.5]]))

