"""phoenix_split.py's vectorised data core against a plain reference, and duplicates="keep".

The reference (REFERENCE_*) is the split as it was before the core was vectorised: NumPy argsorts,
lexsorts and np.unique, written for clarity. The fast split must equal it field by field, bit for bit,
on random logs with ties, repeats, float and huge timestamps and huge ids. The rule "keep" is pinned
on a hand-computed log and by its invariant (a target never appears in its own history).
"""

import dataclasses
import io
import types

import numpy as np
import pytest

import phoenix_evaluation as evaluation
import phoenix_log
import phoenix_sasrec
import phoenix_split
import phoenix_two_stage as two_stage
from phoenix_log import LogError, from_arrays
from phoenix_split import split_log


# ---------------------------------------------------------------------------------------------
# The reference split (the pre-vectorisation code)
# ---------------------------------------------------------------------------------------------


def reference_time_order(user, timestamp):
    order = np.argsort(timestamp, kind="stable")
    return order[np.argsort(user[order], kind="stable")]


def reference_later_repeats(user, item):
    by_pair = np.lexsort((np.arange(len(user)), item, user))
    same = np.zeros(len(user), dtype=bool)
    same[1:] = (user[by_pair][1:] == user[by_pair][:-1]) & (item[by_pair][1:] == item[by_pair][:-1])
    repeat = np.zeros(len(user), dtype=bool)
    repeat[by_pair] = same
    return repeat


def reference_split(log, protocol="leave-one-out", cut_time=None, cut_quantile=None) -> dict:
    """The fields of split_log(log, protocol, duplicates="first") as the old code computed them."""
    order = reference_time_order(log.user, log.timestamp)
    order = order[~reference_later_repeats(log.user[order], log.item[order])]
    evaluated = None
    if protocol == "time":
        if cut_time is None:
            cut_time = np.quantile(log.timestamp, 0.9 if cut_quantile is None else cut_quantile, method="higher")
        t = log.timestamp[order]
        users, starts, counts = np.unique(log.user[order], return_index=True, return_counts=True)
        owner = np.repeat(np.arange(len(users)), counts)
        before = t < cut_time
        num_before = np.bincount(owner, weights=before, minlength=len(users)).astype(np.int64)
        ok = (num_before >= 2) & (num_before < counts)
        first_after = np.zeros(len(order), bool)
        first_after[(starts + num_before)[ok]] = True
        order, evaluated = order[before | first_after], users[ok]
        if len(evaluated) == 0:
            raise LogError("nothing to evaluate")
    user, item = log.user[order], log.item[order]
    user_ids, counts = np.unique(user, return_counts=True)
    has_eval = counts >= 3
    if not has_eval.any():
        raise ValueError("no user is evaluated")
    item_ids, first = np.unique(item, return_index=True)
    if evaluated is not None:
        has_eval = np.isin(user_ids, evaluated)
    return dict(user_ids=user_ids, offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), items=item,
                ratings=np.zeros(len(order), np.float32) if log.rating is None else log.rating[order],
                timestamps=log.timestamp[order], item_columns=np.searchsorted(item_ids, item).astype(np.int64),
                train_len=np.where(has_eval, counts - 2, counts).astype(np.int64), has_eval=has_eval,
                item_ids=item_ids, item_authors=log.author[order][first], actions=log.actions[order], rows=order)


def random_log(seed: int) -> phoenix_log.Log:
    """A small log with ties, repeats and, by seed, float / huge timestamps, huge ids, ratings, authors."""
    rng = np.random.default_rng(seed)
    num = int(rng.integers(6, 80))
    user = rng.integers(0, int(rng.integers(2, 7)), num)
    item = rng.integers(0, int(rng.integers(2, 15)), num)
    kind = seed % 4
    time = (rng.integers(0, int(rng.integers(1, 25)), num) if kind == 0 else
            rng.integers(0, 6, num) * 0.25 if kind == 1 else  # float timestamps with ties
            rng.integers(-2 ** 62, 2 ** 62, num) if kind == 2 else  # too wide to pack: the argsort fallback
            1_700_000_000_000_000_000 + rng.integers(0, 30, num))  # nanoseconds beyond 2**53
    columns = {"user_id": user * (2 ** 61 // 7 if seed % 3 == 0 else 1), "item_id": item * 1000 + 7,
               "timestamp": time}
    if seed % 5 == 0:
        columns["rating"] = rng.integers(1, 6, num)
    if seed % 7 == 0:
        columns["author_id"] = item % 3
    return from_arrays(columns, source=f"<log {seed}>")


def split_quietly(log, **options):
    return split_log(log, stream=io.StringIO(), **options)


SPLIT_OPTIONS = [{}, {"protocol": "time"}, {"protocol": "time", "cut_quantile": 0.5}]


@pytest.mark.parametrize("options", SPLIT_OPTIONS, ids=["leave-one-out", "time", "time-median"])
def test_fast_split_equals_the_reference_bit_for_bit(options):
    checked = 0
    for seed in range(120):
        try:
            log = random_log(seed)
        except LogError:  # one user or one item
            continue
        try:
            expected = reference_split(log, **options)
        except ValueError:  # LogError too: nothing to evaluate; the fast split refuses it as well
            with pytest.raises(ValueError):
                split_quietly(log, **options)
            continue
        split = split_quietly(log, **options)
        for name, value in expected.items():
            got = getattr(split, name)
            assert got.dtype == value.dtype and np.array_equal(got, value), (seed, name, got, value)
        assert split.first_time is None and np.array_equal(split.test_len, split.train_len + split.has_eval)
        for which in phoenix_split.SPLITS:
            assert split.num_examples(which) == len(split.target_positions(which)[0])
        checked += 1
    assert checked > 60  # most random logs are split, not refused


@pytest.mark.parametrize("key", [
    np.array([3, 1, 3, 1, 2, 0, 0]), np.array([], np.int64), np.array([5]),
    np.array([-2 ** 63, 2 ** 63 - 1, 0, -1, 0]),  # a range wider than 63 bits: the argsort itself
    np.array([2.5, 1.0, 2.5, -0.0, 0.0]), np.random.default_rng(0).integers(-50, 50, 1000),
    np.random.default_rng(1).integers(0, 2 ** 40, 5000),
    np.random.default_rng(2).integers(0, 2 ** 33, 5000) * 10 ** 9,  # ns of whole seconds: packed // 10**9
    np.random.default_rng(3).integers(0, 2 ** 33, 5000) * 10 ** 9 + np.arange(5000) % 2],  # no common step
    ids=lambda k: f"{k.dtype}{len(k)}")
def test_stable_argsort_is_numpys_stable_argsort(key):
    assert np.array_equal(phoenix_split._stable_argsort(key), np.argsort(key, kind="stable"))


def test_time_order_and_later_repeats_equal_the_reference():
    for seed in range(40):
        rng = np.random.default_rng(seed)
        user, item = rng.integers(0, 5, 60) * (2 ** 60 // 5), rng.integers(0, 8, 60)
        time = rng.integers(0, 10, 60)
        order = phoenix_split.time_order(user, time)
        assert np.array_equal(order, reference_time_order(user, time))
        assert np.array_equal(phoenix_split.later_repeats(user[order], item[order]),
                              reference_later_repeats(user[order], item[order]))
        # rows not grouped by user (the public function's contract is time order, but it stays exact)
        assert np.array_equal(phoenix_split.later_repeats(user, item), reference_later_repeats(user, item))


# ---------------------------------------------------------------------------------------------
# duplicates="keep"
# ---------------------------------------------------------------------------------------------


# user 1: a b a c b d a   (first-time: a b c d; test d, validation c; a, b, a before c train;
#                          "b" between c and d is history of d only; the last "a" is after the test target)
# user 2: x x y z         (first-time x y z: test z, validation y, train x x)
# user 3: p q p           (two distinct items: trains only)
KEEP_LOG = {"user_id": [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3],
            "item_id": [10, 11, 10, 12, 11, 13, 10, 20, 20, 21, 22, 30, 31, 30],
            "timestamp": [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 1, 2, 3]}


@pytest.fixture(scope="module")
def keep_split():
    order = np.random.default_rng(0).permutation(len(KEEP_LOG["user_id"]))  # shuffled rows: same split
    return split_quietly(from_arrays({k: np.array(v)[order] for k, v in KEEP_LOG.items()}), duplicates="keep")


def test_keep_split_by_hand(keep_split):
    s = keep_split
    assert s.user_ids.tolist() == [1, 2, 3] and s.offsets.tolist() == [0, 7, 11, 14]
    assert s.items.tolist() == [10, 11, 10, 12, 11, 13, 10, 20, 20, 21, 22, 30, 31, 30]
    assert s.first_time.tolist() == [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1, 1, 0]
    assert s.has_eval.tolist() == [True, True, False]
    assert s.train_len.tolist() == [3, 2, 3] and s.test_len.tolist() == [5, 3, 3]
    assert s.repeats == 5 and s.duplicates == "keep"
    item = lambda which: s.item_ids[s.targets(which)].tolist()  # noqa: E731
    assert item("val") == [12, 21] and item("test") == [13, 22]
    rows, positions = s.target_positions("train")  # first-time positions t >= 1 before validation
    assert rows.tolist() == [0, 2] and positions.tolist() == [1, 12]
    assert s.num_examples("train") == 2
    examples = phoenix_split.phoenix_examples(s, "test", history_len=10)
    assert examples["history_post_ids"][0, :5].tolist() == [10, 11, 10, 12, 11]  # repeats are history
    assert examples["history_post_ids"][1, :3].tolist() == [20, 20, 21]
    exclude = s.exclude_mask("test")
    assert s.item_ids[exclude[0]].tolist() == [10, 11, 12] and s.item_ids[exclude[1]].tolist() == [20, 21]


def test_keep_time_split_by_hand():
    # cut at 3.5: user 1 has a b a before (2 distinct) and c, b, d, a after: the test target is c (the first
    # new item after the cut), the validation target b (the last first-time one before it); user 2: x x y | z
    log = from_arrays({k: np.array(v) for k, v in KEEP_LOG.items()})
    s = split_quietly(log, protocol="time", cut_time=3.5, duplicates="keep")
    assert s.user_ids.tolist() == [1, 2, 3] and s.has_eval.tolist() == [True, True, False]
    assert s.items.tolist() == [10, 11, 10, 12, 20, 20, 21, 22, 30, 31, 30]
    assert s.train_len.tolist() == [1, 2, 3] and s.test_len.tolist() == [3, 3, 3]
    assert s.item_ids[s.targets("val")].tolist() == [11, 21] and s.item_ids[s.targets("test")].tolist() == [12, 22]


@pytest.mark.parametrize("options", SPLIT_OPTIONS, ids=["leave-one-out", "time", "time-median"])
def test_keep_no_target_in_its_own_history(options):
    """At evaluation (val, test: every position before the target) and in training (every position before
    a training target), the target's item never occurred before in the user's sequence."""
    checked = 0
    for seed in range(80):
        try:
            split = split_quietly(random_log(seed), duplicates="keep", **options)
        except ValueError:
            continue
        for which in phoenix_split.SPLITS:
            rows, positions = split.target_positions(which)
            for row, position in zip(rows.tolist(), positions.tolist()):
                start = split.offsets[row]
                assert split.items[position] not in split.items[start:position].tolist(), (seed, which)
                assert split.first_time is None or split.first_time[position]
        if split.first_time is not None:
            checked += 1
    assert checked > 20  # logs that have repeats


def test_keep_without_repeats_is_first(keep_split):
    log = random_log(4)
    first = split_quietly(log)
    if first.repeats:  # drop the repeats from the log: then every rule gives the same split
        log = from_arrays({"user_id": log.user[first.rows], "item_id": log.item[first.rows],
                           "timestamp": log.timestamp[first.rows]})
        first = split_quietly(log)
    for rule in ("keep", "error"):
        other = split_quietly(log, duplicates=rule)
        for field in dataclasses.fields(phoenix_split.Split):
            assert np.array_equal(getattr(other, field.name), getattr(first, field.name)), (rule, field.name)


def test_first_and_error_unchanged_by_keep(keep_split):
    log = from_arrays({k: np.array(v) for k, v in KEEP_LOG.items()})
    first = split_quietly(log)
    assert first.items.tolist() == [10, 11, 12, 13, 20, 21, 22, 30, 31] and first.first_time is None
    with pytest.raises(LogError, match=r"<arrays> row 2: user 1 and item 10 already at <arrays> row 0 \(5 such"):
        split_quietly(log, duplicates="error")


def test_keep_check_dump_agrees_with_the_split(keep_split, tmp_path):
    """check_dump rebuilds test targets in plain Python (each pair's first interaction, the last = target):
    under keep they are the split's, so the dump's recomputed HR@k is the split's own."""
    for seed in range(30):
        try:
            split = split_quietly(random_log(seed), duplicates="keep")
        except ValueError:
            continue
        rng = np.random.default_rng(seed)
        users, targets = split.eval_users(), split.item_ids[split.targets("test")]
        top = rng.choice(split.item_ids, size=(len(users), 2))
        hit = rng.random(len(users)) < 0.5
        top[hit, 1] = targets[hit]
        top[~hit] = np.where(top[~hit] == targets[~hit, None], -5, top[~hit])
        path = tmp_path / f"dump{seed}.csv"
        evaluation.dump_topk(path, split.user_ids[users], top)
        check = evaluation.check_dump(path, split.log, k=2)
        assert check["num_users"] == len(users) and check["HR@2"] == pytest.approx(hit.mean(), abs=1e-12)


def test_keep_repeats_are_never_training_targets_of_the_windows(keep_split):
    s = keep_split
    rows, starts, lengths = two_stage.training_windows(s, history_len=4)
    examples, positions, valid = two_stage.window_examples(s, rows, starts, lengths, 4)
    _, targets, target_valid = phoenix_sasrec.window_arrays(s, rows, starts, lengths, 4)
    expected = valid[:, 1:] & s.first_time[positions[:, 1:]]
    assert np.array_equal(target_valid, expected)
    assert sorted(positions[:, 1:][expected].tolist()) == s.target_positions("train")[1].tolist()
    hashes = two_stage.hash_config(two_stage.Recipe())
    batch = two_stage.window_batch(s, examples, hashes, expected)
    assert np.array_equal(np.asarray(batch.candidate_post_hashes)[..., 0] != 0, expected)


def test_train_val_split_reaches_the_test_target_under_keep(keep_split):
    import phoenix_protocols
    ext = phoenix_protocols.train_val_split(keep_split)
    assert ext.train_len.tolist() == [5, 3, 3]
    assert keep_split.item_ids[keep_split.item_columns[ext.target_positions("train")[1]]].tolist() == [11, 12, 21, 31]


# ---------------------------------------------------------------------------------------------
# Training windows (vectorised) against the per-user loop they replace
# ---------------------------------------------------------------------------------------------


def reference_windows(split, history_len, rng=None):
    rows, starts, lengths = [], [], []
    for user in range(len(split.user_ids)):
        length = int(split.train_len[user])
        if length < 2:
            continue
        shift = int(rng.integers(0, history_len)) if rng is not None else 0
        cuts = ([0] if shift > 0 else []) + list(range(shift, length - 1, history_len))
        for begin, end in zip(cuts, cuts[1:] + [length - 1]):
            rows.append(user)
            starts.append(split.offsets[user] + begin)
            lengths.append(end - begin + 1)
    return np.array(rows, np.int64), np.array(starts, np.int64), np.array(lengths, np.int64)


@pytest.mark.parametrize("history_len", [1, 2, 5, 16])
def test_training_windows_equal_the_per_user_loop(history_len):
    gen = np.random.default_rng(history_len)
    for trial in range(60):
        users = int(gen.integers(1, 9))
        train_len = gen.integers(0, 40, users)
        lengths = train_len + gen.integers(0, 3, users)
        split = types.SimpleNamespace(train_len=train_len, offsets=np.concatenate([[0], np.cumsum(lengths)]),
                                      user_ids=np.arange(users))
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in
                   zip(two_stage.training_windows(split, history_len), reference_windows(split, history_len)))
        fast, slow = np.random.default_rng(trial), np.random.default_rng(trial)
        assert all(np.array_equal(a, b) for a, b in zip(two_stage.training_windows(split, history_len, fast),
                                                        reference_windows(split, history_len, slow)))
        assert fast.integers(0, 2 ** 62) == slow.integers(0, 2 ** 62)  # the stream goes on alike


# ---------------------------------------------------------------------------------------------
# Summary and the Log's own checks
# ---------------------------------------------------------------------------------------------


def test_summary_says_what_happened(keep_split):
    text = phoenix_split.summary(keep_split)
    assert text["rows"] == "14" and text["users"].startswith("3 ") and text["items"].startswith("9 in the catalog")
    assert text["repeated (user, item)"] == "5 (35.7% of the rows): kept as history, never targets (--duplicates keep)"
    assert text["time range"] == "1 .. 7" and text["training examples"] == "2"
    assert text["users per split"].startswith("2 evaluated") and "1 train only" in text["users per split"]
    first = phoenix_split.summary(split_quietly(keep_split.log))
    assert first["repeated (user, item)"].startswith("5 (35.7% of the rows): dropped") and first["interactions kept"] == "9"
    timed = phoenix_split.summary(split_quietly(keep_split.log, protocol="time", cut_time=3.5))
    assert timed["split"].startswith("time, cut at 3.5 (")


def test_summary_time_range_as_dates_when_the_log_knows_the_unit(keep_split):
    log = dataclasses.replace(keep_split.log)
    object.__setattr__(log, "timestamp", log.timestamp * 10 ** 9)
    object.__setattr__(log, "datetimes", True)  # the reader's mark of dates/times (int64 ns since the epoch)
    assert phoenix_split.summary(dataclasses.replace(keep_split, log=log))["time range"] == (
        "1970-01-01T00:00:01Z .. 1970-01-01T00:00:07Z")


def test_log_without_line_numbers_names_rows_and_lines():
    log = from_arrays({k: np.array(v) for k, v in KEEP_LOG.items()})
    in_file = dataclasses.replace(log, line=None, from_file=True, source="log.csv")
    assert in_file.at(0) == "log.csv:2" and dataclasses.replace(log, line=None).at(3) == "<arrays> row 3"
    with pytest.raises(LogError, match=r"only one user \(7\) in 3 interactions"):
        dataclasses.replace(log, user=np.full(3, 7), item=log.item[:3], timestamp=log.timestamp[:3],
                            author=log.author[:3], actions=log.actions[:3], line=None)


def test_keep_counts_distinct_items_for_the_recipe(keep_split):
    """What the recipe checks count as seen (recommendable, the negative pool) are distinct items: a user
    with many repeats of few items leaves most of the catalog to recommend."""
    s = keep_split
    assert s.num_distinct().tolist() == [4, 3, 2] and s.num_distinct("test").tolist() == [3, 2, 2]
    assert s.num_distinct("val").tolist() == [2, 1, 2]
    assert two_stage.recommendable(s) == 9 - 3
    first = split_quietly(s.log)
    assert np.array_equal(first.num_distinct(), first.lengths)
    assert np.array_equal(first.num_distinct("test"), first.visible_len("test"))
