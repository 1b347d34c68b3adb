"""Tests of phoenix_hashing.py: the hash family (NumPy == JAX == reference murmur3), batches, tables."""

import haiku as hk
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phoenix_hashing as hashing
import phoenix_inputs as inputs
from recsys_model import HashConfig, RecsysEmbeddings

ID_TYPES = ("user", "post", "author")
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min
# Ids that stress both 32-bit words: 0, word boundaries, values near 2**62 and the int64 maximum.
EDGE_IDS = np.array(
    [0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**62 - 1, 2**62, 2**62 + 12345,
     INT64_MAX - 1, INT64_MAX],
    dtype=np.int64,
)
PAD_IDS = np.array([inputs.PAD_ID, -2, -(2**31), -(2**32), INT64_MIN], dtype=np.int64)


def small_config(**overrides) -> HashConfig:
    kwargs = dict(num_user_hashes=2, num_item_hashes=3, num_author_hashes=1, user_table_size=1000,
                  post_table_size=5003, author_table_size=97, hash_seed=7)
    kwargs.update(overrides)
    return HashConfig(**kwargs)


def random_ids(n: int, seed: int = 0) -> np.ndarray:
    """Ids spread over the whole non-negative int64 range plus small ids."""
    rng = np.random.default_rng(seed)
    big = rng.integers(0, INT64_MAX, size=n // 2, dtype=np.int64, endpoint=True)
    small = rng.integers(0, 10_000, size=n - n // 2, dtype=np.int64)
    return np.concatenate([big, small])


# ---------------------------------------------------------------------------------------------
# Reference murmur3: the textbook byte-wise algorithm, independent of phoenix_hashing.py's word version.
# ---------------------------------------------------------------------------------------------


def murmur3_32_reference(data: bytes, seed: int) -> int:
    mask = 0xFFFFFFFF

    def rotl(x, r):
        return ((x << r) | (x >> (32 - r))) & mask

    h = seed & mask
    n_blocks = len(data) // 4
    for i in range(n_blocks):
        k = int.from_bytes(data[4 * i: 4 * i + 4], "little")
        k = rotl((k * 0xCC9E2D51) & mask, 15) * 0x1B873593 & mask
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & mask
    tail = data[4 * n_blocks:]
    if tail:
        k = int.from_bytes(tail, "little")
        k = rotl((k * 0xCC9E2D51) & mask, 15) * 0x1B873593 & mask
        h ^= k
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


@pytest.mark.parametrize(
    "data,seed,expected",
    [
        (b"", 0, 0),
        (b"", 1, 0x514E28B7),
        (b"", 0xFFFFFFFF, 0x81F16F39),
        (b"\0\0\0\0", 0, 0x2362F9DE),
        (b"aaaa", 0x9747B28C, 0x5A97808A),
        (b"Hello, world!", 0x9747B28C, 0x24884CBA),
    ],
    ids=["empty", "empty-seed1", "empty-seedmax", "zeros4", "aaaa", "hello"],
)
def test_reference_murmur3_matches_published_vectors(data, seed, expected):
    assert murmur3_32_reference(data, seed) == expected


def test_hash_is_murmur3_of_little_endian_int64_reduced_to_table():
    cfg = small_config()
    ids = np.concatenate([EDGE_IDS, random_ids(50, seed=3)])
    for id_type in ID_TYPES:
        got = hashing.hash_ids(ids, cfg, id_type)  # [V, H]
        num_hashes, table_size = hashing._type_params(cfg, id_type)
        seeds = hashing.hash_seeds(cfg.hash_seed, id_type, num_hashes)
        expected = np.array(
            [[1 + murmur3_32_reference(int(i).to_bytes(8, "little", signed=True), int(s))
              % (table_size - 1) for s in seeds] for i in ids]
        )
        np.testing.assert_array_equal(got, expected, err_msg=id_type)


# ---------------------------------------------------------------------------------------------
# NumPy vs JAX, range, padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("id_type", ID_TYPES)
def test_numpy_and_jax_hashes_identical(id_type):
    cfg = small_config()
    ids = np.concatenate([EDGE_IDS, PAD_IDS, random_ids(4000, seed=1)])
    ids = ids[: len(ids) // 6 * 6].reshape(-1, 6)  # [B, S] to check broadcasting over leading axes
    lo, hi = hashing.split_ids(ids)
    # HashConfig is an unhashable dataclass: close over it rather than marking it static.
    jax_hashes = jax.jit(lambda a, b: hashing.hash_ids_jax(a, b, cfg, id_type))(lo, hi)
    assert jax_hashes.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(jax_hashes), hashing.hash_ids(ids, cfg, id_type))


# Built once so that hypothesis examples (all of shape [8]) reuse one compiled function.
_jitted_post_hash = jax.jit(lambda lo, hi: hashing.hash_ids_jax(lo, hi, small_config(), "post"))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=8, max_size=8))
def test_numpy_and_jax_hashes_identical_property(id_list):
    ids = np.array(id_list, dtype=np.int64)
    np.testing.assert_array_equal(
        np.asarray(_jitted_post_hash(*hashing.split_ids(ids))),
        hashing.hash_ids(ids, small_config(), "post"),
    )


def test_split_ids_jax_matches_split_ids_for_int32():
    ids = np.array([0, 1, -1, -7, 2**31 - 1, -(2**31), 123456789], dtype=np.int32)
    lo_np, hi_np = hashing.split_ids(ids)
    lo_j, hi_j = jax.jit(hashing.split_ids_jax)(jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(lo_j), lo_np)
    np.testing.assert_array_equal(np.asarray(hi_j), hi_np)
    cfg = small_config()
    in_jit = jax.jit(lambda x: hashing.hash_ids_jax(*hashing.split_ids_jax(x), cfg, "author"))
    np.testing.assert_array_equal(np.asarray(in_jit(ids)), hashing.hash_ids(ids, cfg, "author"))


# jax.Array ids of every integer dtype JAX has without x64, and the host ids that used to reach jnp.
_jitted_post_hash_of_ids = jax.jit(
    lambda ids: hashing.hash_ids_jax(*hashing.split_ids_jax(ids), small_config(), "post"))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=8, max_size=8))
@hypothesis.example([2**40 + 5, 5, 2**32, 0, -1, INT64_MIN, INT64_MAX, 2**31])
def test_split_ids_jax_of_host_int64_ids_matches_numpy_property(id_list):
    # Raw int64 ids handed to the JAX path: jnp with x64 off would truncate them to int32.
    ids = np.array(id_list, dtype=np.int64)
    np.testing.assert_array_equal(
        np.asarray(hashing.hash_ids_jax(*hashing.split_ids_jax(ids), small_config(), "post")),
        hashing.hash_ids(ids, small_config(), "post"))
    # Jitted: the host splits, the words are the jit arguments (jit itself would truncate int64).
    np.testing.assert_array_equal(np.asarray(_jitted_post_hash(*hashing.split_ids_jax(ids))),
                                  hashing.hash_ids(ids, small_config(), "post"))


def test_split_ids_jax_keeps_high_word_of_host_ids():
    cfg = small_config()
    hashes = np.asarray(hashing.hash_ids_jax(*hashing.split_ids_jax([2**40 + 5, 5]), cfg, "post"))
    assert not np.array_equal(hashes[0], hashes[1])  # they collided when truncated to int32
    np.testing.assert_array_equal(hashes, hashing.hash_ids(np.array([2**40 + 5, 5]), cfg, "post"))


# One jitted function for every example: traced (and compiled) once per x64 setting and shape, not per example.
_traced_post_hash_of_ids = jax.jit(lambda x: hashing.hash_ids_jax(*hashing.split_ids_jax(x), small_config(), "post"))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=8, max_size=8))
@hypothesis.example([2**40 + 5, 5, 2**32, 0, -1, INT64_MIN, INT64_MAX, 2**31])
def test_split_ids_jax_of_traced_int64_ids_matches_numpy_with_x64_property(id_list):
    # With jax_enable_x64 on, int64 ids can be jax arrays inside jit; they are cut into words there.
    ids = np.array(id_list, dtype=np.int64)
    with jax.enable_x64(True):
        x = jnp.asarray(ids)
        assert x.dtype == jnp.int64  # a traced int64 argument, not words split on the host
        got = np.asarray(_traced_post_hash_of_ids(x))
    np.testing.assert_array_equal(got, hashing.hash_ids(ids, small_config(), "post"))


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int16, jnp.int32, jnp.uint8, jnp.uint16, jnp.uint32])
def test_split_ids_jax_matches_numpy_for_every_jax_integer_dtype(dtype):
    info = np.iinfo(dtype)
    ids = np.unique(np.array([info.min, info.min + 1, -1, 0, 1, info.max // 2, info.max - 1, info.max],
                             dtype=np.int64).clip(info.min, info.max)).astype(dtype)
    # uint32 ids >= 2**31 used to be read as negative int32, i.e. padding.
    np.testing.assert_array_equal(np.asarray(_jitted_post_hash_of_ids(jnp.asarray(ids))),
                                  hashing.hash_ids(ids, small_config(), "post"), err_msg=str(dtype))


@pytest.mark.parametrize("ids", [jnp.array([1.0, 2.0]), jnp.array([True, False]), np.array([1.5]),
                                 np.array(["7"]), np.array([1, None], dtype=object)],
                         ids=["jax-float", "jax-bool", "numpy-float", "string", "object"])
def test_split_ids_jax_rejects_non_integer_ids(ids):
    with pytest.raises(TypeError, match=r"user_ids must be integers.*got dtype"):
        hashing.split_ids_jax(ids, "user_ids")


@pytest.mark.parametrize("lo,hi,err,match", [
    (np.array([2**40 + 5]), np.zeros(1, np.uint32), TypeError, r"lo must be the uint32 words.*int64"),
    (np.zeros(1, np.uint32), jnp.zeros(1, jnp.int32), TypeError, r"hi must be the uint32 words.*int32"),
    ([5], np.zeros(1, np.uint32), TypeError, r"lo must be the uint32 words.*list"),
    (np.zeros(2, np.uint32), np.zeros(3, np.uint32), ValueError, r"lo and hi must have one shape"),
], ids=["raw-int64-ids-as-words", "int32-word", "list", "shape-mismatch"])
def test_hash_ids_jax_rejects_anything_but_uint32_words(lo, hi, err, match):
    # jnp.asarray(lo, uint32) used to cast raw ids silently, dropping their high digits.
    with pytest.raises(err, match=match):
        hashing.hash_ids_jax(lo, hi, small_config(), "post")


def test_split_ids_golden():
    lo, hi = hashing.split_ids(np.array([0, 1, 2**32 + 3, -1, 2**62], dtype=np.int64))
    np.testing.assert_array_equal(lo, [0, 1, 3, 0xFFFFFFFF, 0])
    np.testing.assert_array_equal(hi, [0, 0, 1, 0xFFFFFFFF, 2**30])


def test_split_ids_rejects_floats():
    with pytest.raises(TypeError):
        hashing.split_ids(np.array([1.0, 2.0]))


@pytest.mark.parametrize("id_type", ID_TYPES)
def test_valid_ids_hash_into_one_to_table_size_and_padding_to_zero(id_type):
    cfg = small_config()
    num_hashes, table_size = hashing._type_params(cfg, id_type)
    valid = hashing.hash_ids(np.concatenate([EDGE_IDS, random_ids(20_000)]), cfg, id_type)
    assert valid.shape[-1] == num_hashes and valid.dtype == np.int32
    assert valid.min() >= 1 and valid.max() <= table_size - 1
    # With 20k ids over <= 5002 values every row should be hit: the range is fully used.
    assert len(np.unique(valid)) == table_size - 1
    np.testing.assert_array_equal(hashing.hash_ids(PAD_IDS, cfg, id_type), 0)


def test_table_size_two_maps_every_valid_id_to_one():
    cfg = small_config(post_table_size=2)
    np.testing.assert_array_equal(hashing.hash_post_ids(EDGE_IDS, cfg), 1)


@pytest.mark.parametrize("table_size", [1, 2**31 + 1])
def test_bad_table_size_raises(table_size):
    with pytest.raises(ValueError):
        hashing.hash_post_ids(EDGE_IDS, small_config(post_table_size=table_size))


def test_scalar_ids_work():
    cfg = small_config()
    assert hashing.hash_user_ids(np.int64(5), cfg).shape == (2,)
    np.testing.assert_array_equal(hashing.hash_user_ids(inputs.PAD_ID, cfg), [0, 0])


@pytest.mark.parametrize(
    "ids",
    [np.arange(110_000), np.arange(110_000) << 32, np.arange(110_000) * 1_000_003 + 2**45,
     np.random.default_rng(2).integers(0, INT64_MAX, 110_000)],
    ids=["sequential", "high-word-only", "strided-large", "random"],
)
def test_hashes_are_uniform_chi_square(ids):
    # 110k distinct ids into 10 values (11k expected each). Chi-square with 9 degrees of freedom
    # exceeds 27.9 with probability 0.001 for a random hash; a biased hash lands far above it.
    cfg = small_config(post_table_size=11, num_item_hashes=3)
    hashes = hashing.hash_post_ids(ids, cfg)  # [V, 3]
    for i in range(3):
        counts = np.bincount(hashes[:, i], minlength=11)[1:]
        assert np.sum((counts - 11_000) ** 2 / 11_000) < 27.9, counts


def test_ids_differing_only_in_high_word_spread_out():
    # A hash that ignored the high word would send all of these to one value.
    cfg = small_config(post_table_size=100_001, num_item_hashes=1)
    ids = np.arange(10_000, dtype=np.int64) << 32
    hashes = hashing.hash_post_ids(ids, cfg)[:, 0]
    share_unique_expected = (1 - 1 / 100_000) ** (10_000 - 1)  # ~0.905
    share_unique = np.mean(~hashing.colliding_mask(hashes[:, None]))
    assert abs(share_unique - share_unique_expected) < 0.02


# ---------------------------------------------------------------------------------------------
# Determinism and independence of the functions
# ---------------------------------------------------------------------------------------------


def test_deterministic_across_calls_and_configs():
    ids = random_ids(1000)
    a = hashing.hash_post_ids(ids, small_config())
    b = hashing.hash_post_ids(ids.copy(), small_config())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(hashing.hash_seeds(7, "post", 3), hashing.hash_seeds(7, "post", 3))


def test_golden_hashes_do_not_drift():
    # Pinned values: hashes are part of every checkpoint's meaning; a change silently remaps rows.
    cfg = HashConfig()  # defaults: 2 hashes per type, tables of 100k rows, seed 0
    ids = np.array([0, 1, 2**40 + 7, inputs.PAD_ID], dtype=np.int64)
    expected = {
        "user": hashing.hash_user_ids(ids, cfg),
        "post": hashing.hash_post_ids(ids, cfg),
        "author": hashing.hash_author_ids(ids, cfg),
    }
    golden = GOLDEN_DEFAULT_HASHES
    for id_type in ID_TYPES:
        np.testing.assert_array_equal(expected[id_type], golden[id_type], err_msg=id_type)


# Computed once with murmur3_32_reference above, for ids [0, 1, 2**40 + 7, PAD_ID] under HashConfig().
GOLDEN_DEFAULT_HASHES = {
    "user": [[70551, 28046], [85680, 97923], [54630, 33529], [0, 0]],
    "post": [[11444, 92507], [86949, 84407], [57738, 97680], [0, 0]],
    "author": [[23391, 79280], [72504, 79822], [54774, 66679], [0, 0]],
}


def test_different_seeds_and_types_give_different_hashes():
    ids = random_ids(10_000)
    cfg = small_config(user_table_size=5003, author_table_size=5003, num_user_hashes=3,
                       num_author_hashes=3)
    base = hashing.hash_post_ids(ids, cfg)
    other_seed = hashing.hash_post_ids(ids, small_config(hash_seed=8))
    # Two independent functions into 5002 values agree on ~1/5002 of ids.
    assert np.mean(base == other_seed) < 0.002
    assert np.mean(base == hashing.hash_user_ids(ids, cfg)) < 0.002
    assert np.mean(base == hashing.hash_author_ids(ids, cfg)) < 0.002


def test_hash_functions_of_one_id_differ():
    cfg = small_config(post_table_size=100_000, num_item_hashes=3)
    hashes = hashing.hash_post_ids(random_ids(10_000, seed=4), cfg)  # [V, 3]
    # Expected number of ids with h_i == h_j is 10k / 99_999 = 0.1 per pair of functions.
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert np.sum(hashes[:, i] == hashes[:, j]) <= 3
    assert not np.any((hashes[:, 0] == hashes[:, 1]) & (hashes[:, 1] == hashes[:, 2]))


# ---------------------------------------------------------------------------------------------
# batch_from_ids
# ---------------------------------------------------------------------------------------------


def make_raw_batch(batch_size=3, hist=5, cands=4, num_actions=19, seed=0):
    rng = np.random.default_rng(seed)
    history_post_ids = rng.integers(0, 2**40, size=(batch_size, hist))
    history_post_ids[:, 3:] = inputs.PAD_ID
    history_author_ids = rng.integers(0, 1000, size=(batch_size, hist))
    history_author_ids[:, 3:] = inputs.PAD_ID
    return dict(
        user_ids=rng.integers(0, 10**9, size=batch_size),
        history_post_ids=history_post_ids,
        history_author_ids=history_author_ids,
        history_actions=(rng.random((batch_size, hist, num_actions)) < 0.3).astype(np.float32),
        history_surfaces=rng.integers(0, 16, size=(batch_size, hist)),
        candidate_post_ids=rng.integers(0, 2**40, size=(batch_size, cands)),
        candidate_author_ids=rng.integers(0, 1000, size=(batch_size, cands)),
        candidate_surfaces=rng.integers(0, 16, size=(batch_size, cands)),
    )


def test_batch_from_ids_shapes_dtypes_and_values():
    cfg = small_config()
    raw = make_raw_batch()
    batch = inputs.batch_from_ids(**raw, hash_config=cfg)
    assert batch.user_hashes.shape == (3, 2)
    assert batch.history_post_hashes.shape == (3, 5, 3)
    assert batch.history_author_hashes.shape == (3, 5, 1)
    assert batch.history_actions.shape == (3, 5, 19) and batch.history_actions.dtype == np.float32
    assert batch.candidate_post_hashes.shape == (3, 4, 3)
    assert batch.candidate_author_hashes.shape == (3, 4, 1)
    for field in ("user_hashes", "history_post_hashes", "history_author_hashes",
                  "history_product_surface", "candidate_post_hashes", "candidate_author_hashes",
                  "candidate_product_surface"):
        assert getattr(batch, field).dtype == np.int32, field
    np.testing.assert_array_equal(batch.history_post_hashes[:, 3:], 0)
    assert np.all(batch.history_post_hashes[:, :3] > 0)
    np.testing.assert_array_equal(
        batch.candidate_post_hashes, hashing.hash_post_ids(raw["candidate_post_ids"], cfg))
    np.testing.assert_array_equal(batch.user_hashes, hashing.hash_user_ids(raw["user_ids"], cfg))
    np.testing.assert_array_equal(batch.history_product_surface, raw["history_surfaces"])


@pytest.mark.parametrize(
    "field,bad_shape",
    [("history_author_ids", (3, 4)), ("candidate_surfaces", (3, 5)), ("user_ids", (3, 1)),
     ("history_actions", (3, 5))],
)
def test_batch_from_ids_rejects_bad_shapes(field, bad_shape):
    raw = make_raw_batch()
    raw[field] = np.zeros(bad_shape, dtype=np.int64)
    with pytest.raises(ValueError):
        inputs.batch_from_ids(**raw, hash_config=small_config())


ID_FIELDS = ("user_ids", "history_post_ids", "history_author_ids", "candidate_post_ids",
             "candidate_author_ids")


@pytest.mark.parametrize("field", ID_FIELDS + ("history_surfaces", "candidate_surfaces"))
@pytest.mark.parametrize("bad", ["float", "integral-float", "nan", "bool", "string", "object"])
def test_batch_from_ids_rejects_non_integer_ids_and_surfaces(field, bad):
    # Floats used to be truncated (1.9 -> 1) for surfaces; bool/str/object arrays are no ids either.
    raw = make_raw_batch()
    shape = np.shape(raw[field])
    raw[field] = {"float": np.full(shape, 1.9), "integral-float": np.full(shape, 2.0),
                  "nan": np.full(shape, np.nan), "bool": np.ones(shape, bool),
                  "string": np.full(shape, "3"), "object": np.full(shape, 3, dtype=object)}[bad]
    with pytest.raises(TypeError, match=rf"{field}.*(must be integers|expected int dtype).*dtype"):
        inputs.batch_from_ids(**raw, hash_config=small_config())


@pytest.mark.parametrize("field", ["history_surfaces", "candidate_surfaces"])
@pytest.mark.parametrize("value", [2**33, -1], ids=["beyond_int32", "negative"])
def test_batch_from_ids_rejects_surfaces_outside_int32_or_negative(field, value):
    # 2**33 used to wrap to 0 in the int32 cast; -1 used to pass (surfaces are ids, 0 = padding).
    raw = make_raw_batch()
    raw[field] = np.asarray(raw[field], np.int64)
    raw[field][0, 0] = value
    with pytest.raises(ValueError, match=rf"{field}: expected ids in \[0, 2\*\*31\) \(0 = padding\).*{value}"):
        inputs.batch_from_ids(**raw, hash_config=small_config())


ACTIONS_01 = r"history_actions: expected 0/1 multi-hot values \(bool, or 0 and 1 of a number dtype\), got "


@pytest.mark.parametrize("bad,err,match", [
    ("nan", ValueError, ACTIONS_01 + r"nan at index \[1, 2, 3\] \(1 bad of 285 entries\)"),
    ("inf", ValueError, ACTIONS_01 + r"inf at index \[1, 2, 3\]"),
    # Finite values other than 0/1 used to pass: the model embeds actions as 2a - 1.
    ("1e30", ValueError, ACTIONS_01 + r"1e\+30 at index \[1, 2, 3\]"),
    ("2", ValueError, ACTIONS_01 + r"2.0 at index \[1, 2, 3\]"),
    ("-1", ValueError, ACTIONS_01 + r"-1.0 at index \[1, 2, 3\]"),
    ("0.5", ValueError, ACTIONS_01 + r"0.5 at index \[1, 2, 3\]"),
    ("string", TypeError, r"history_actions: expected number dtype"),
])
def test_batch_from_ids_rejects_bad_actions(bad, err, match):
    raw = make_raw_batch()
    actions = raw["history_actions"]
    raw["history_actions"] = actions.astype(str) if bad == "string" else actions
    if bad != "string":
        raw["history_actions"][1, 2, 3] = float(bad)
    with pytest.raises(err, match=match):
        inputs.batch_from_ids(**raw, hash_config=small_config())


def test_batch_from_ids_accepts_every_integer_dtype_and_bool_actions():
    cfg = small_config()
    raw = make_raw_batch()
    expected = inputs.batch_from_ids(**raw, hash_config=cfg)
    raw["history_surfaces"] = raw["history_surfaces"].astype(np.uint8)
    raw["candidate_author_ids"] = raw["candidate_author_ids"].astype(np.int16)
    raw["history_actions"] = raw["history_actions"].astype(bool)
    got = inputs.batch_from_ids(**raw, hash_config=cfg)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_batch_from_ids_rejects_uint64_ids_beyond_int64():
    raw = make_raw_batch()
    raw["candidate_post_ids"] = raw["candidate_post_ids"].astype(np.uint64)
    raw["candidate_post_ids"][2, 1] = 2**63
    with pytest.raises(ValueError, match=r"candidate_post_ids must fit in int64.*9223372036854775808"):
        inputs.batch_from_ids(**raw, hash_config=small_config())


# ---------------------------------------------------------------------------------------------
# HashEmbeddings
# ---------------------------------------------------------------------------------------------

EMB = 8


def embed_fn(cfg, emb_size=EMB, init_stddev=inputs.DEFAULT_INIT_STDDEV):
    return hk.without_apply_rng(
        hk.transform(lambda batch: inputs.HashEmbeddings(cfg, emb_size, init_stddev)(batch)))


@pytest.fixture(scope="module")
def embedded():
    """(cfg, batch, transformed fn, params): one jitted init shared by the table tests."""
    cfg = small_config()
    raw = make_raw_batch()
    raw["candidate_post_ids"][0, 1] = inputs.PAD_ID  # a padded candidate too
    raw["candidate_author_ids"][0, 1] = inputs.PAD_ID
    batch = inputs.batch_from_ids(**raw, hash_config=cfg)
    fn = embed_fn(cfg)
    params = jax.jit(fn.init)(jax.random.PRNGKey(0), batch)
    return cfg, batch, fn, params


def test_hash_embeddings_parameters_named_and_shaped(embedded):
    _, _, _, params = embedded
    assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == {
        "hash_embeddings": {
            "user_table": ((1000, EMB), jnp.float32),
            "post_table": ((5003, EMB), jnp.float32),
            "author_table": ((97, EMB), jnp.float32),
        }
    }


def test_hash_embeddings_init_std(embedded):
    # 40k draws at the default std 1: sample std within 2%. A second init checks the argument.
    np.testing.assert_allclose(np.std(embedded[3]["hash_embeddings"]["post_table"]), 1.0,
                               rtol=0.02)
    cfg, batch = small_config(user_table_size=2, author_table_size=2), embedded[1]
    params = jax.jit(embed_fn(cfg, init_stddev=0.05).init)(jax.random.PRNGKey(1), batch)
    np.testing.assert_allclose(np.std(params["hash_embeddings"]["post_table"]), 0.05, rtol=0.02)


def test_hash_embeddings_equal_table_rows_and_zero_for_padding(embedded):
    _, batch, fn, params = embedded
    emb = jax.jit(fn.apply)(params, batch)
    assert isinstance(emb, RecsysEmbeddings)
    tables = {k: np.asarray(v) for k, v in params["hash_embeddings"].items()}

    def expected(table, hashes):
        return np.where((hashes != 0)[..., None], tables[table][hashes], 0.0)

    pairs = [
        (emb.user_embeddings, "user_table", batch.user_hashes),
        (emb.history_post_embeddings, "post_table", batch.history_post_hashes),
        (emb.candidate_post_embeddings, "post_table", batch.candidate_post_hashes),
        (emb.history_author_embeddings, "author_table", batch.history_author_hashes),
        (emb.candidate_author_embeddings, "author_table", batch.candidate_author_hashes),
    ]
    for got, table, hashes in pairs:
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), expected(table, hashes))
    # The padded positions are exactly zero, the valid ones are not.
    np.testing.assert_array_equal(np.asarray(emb.history_post_embeddings)[:, 3:], 0.0)
    np.testing.assert_array_equal(np.asarray(emb.candidate_post_embeddings)[0, 1], 0.0)
    assert np.all(np.abs(np.asarray(emb.history_post_embeddings)[:, :3]).sum(-1) > 0)


def test_hash_embeddings_jit_equals_eager(embedded):
    _, batch, fn, params = embedded
    eager = fn.apply(params, batch)
    jitted = jax.jit(fn.apply)(params, batch)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_padding_gets_no_gradient(embedded):
    _, batch, fn, params = embedded

    def loss(p):
        emb = fn.apply(p, batch)
        return sum(jnp.sum(x * (1.0 + jnp.arange(x.size).reshape(x.shape) % 3))
                   for x in jax.tree.leaves(emb))

    grads = jax.jit(jax.grad(loss))(params)["hash_embeddings"]
    post_grad = np.asarray(grads["post_table"])
    # Row 0 is where every padded position was gathered from; the mask blocks its gradient.
    np.testing.assert_array_equal(post_grad[0], 0.0)
    np.testing.assert_array_equal(np.asarray(grads["author_table"])[0], 0.0)
    used_rows = np.unique(batch.candidate_post_hashes[batch.candidate_post_hashes > 0])
    assert np.all(np.abs(post_grad[used_rows]).sum(-1) > 0)


def test_hash_embeddings_compose_with_a_model_in_one_transform():
    cfg = small_config()
    batch = inputs.batch_from_ids(**make_raw_batch(), hash_config=cfg)

    def toy_model(b, emb):  # stands in for PhoenixModel: owns its own parameter
        w = hk.get_parameter("w", [EMB], jnp.float32, init=hk.initializers.Constant(1.0))
        return jnp.einsum("bchd,d->bc", emb.candidate_post_embeddings, w) + jnp.einsum(
            "bhd,d->b", emb.user_embeddings, w)[:, None]

    fn = hk.without_apply_rng(
        hk.transform(lambda b: toy_model(b, inputs.HashEmbeddings(cfg, EMB)(b))))
    params = jax.jit(fn.init)(jax.random.PRNGKey(0), batch)
    assert set(params) == {"hash_embeddings", "~"}
    out = jax.jit(fn.apply)(params, batch)
    assert out.shape == (3, 4)
    np.testing.assert_allclose(np.asarray(out), np.asarray(fn.apply(params, batch)), rtol=1e-6)


def test_million_row_tables_build_nothing_of_size_rows_times_batch():
    # Abstract evaluation: 1M x 128 tables without allocating them. A one-hot lookup would show
    # up as an intermediate with >= rows x batch elements.
    rows, emb_size = 1_000_000, 128
    cfg = HashConfig(user_table_size=rows, post_table_size=rows, author_table_size=rows)
    batch = inputs.batch_from_ids(**make_raw_batch(batch_size=4, hist=16, cands=8),
                                   hash_config=cfg)
    fn = embed_fn(cfg, emb_size=emb_size)
    params = jax.eval_shape(fn.init, jax.random.PRNGKey(0), batch)
    assert params["hash_embeddings"]["post_table"].shape == (rows, emb_size)
    jaxpr = jax.make_jaxpr(fn.apply)(params, batch)
    biggest_output = max(np.prod(v.aval.shape) for v in jaxpr.jaxpr.outvars)
    for eqn in jaxpr.jaxpr.eqns:
        for var in eqn.outvars:
            assert np.prod(var.aval.shape) <= biggest_output, (eqn.primitive, var.aval.shape)


# ---------------------------------------------------------------------------------------------
# Collisions
# ---------------------------------------------------------------------------------------------


def test_colliding_mask_golden():
    rows = np.array([[1, 2], [1, 3], [1, 2], [2, 2], [2, 1], [2, 1], [3, 3]])
    np.testing.assert_array_equal(hashing.colliding_mask(rows),
                                  [True, False, True, False, True, True, False])


@pytest.mark.parametrize(
    "vocab,table,num_hashes,expected",
    [(2, 3, 1, 0.5), (3, 3, 2, 7 / 16), (1, 10, 1, 0.0), (5, 2, 4, 1.0)],
    ids=["V2-M3-H1", "V3-M3-H2", "single-id", "one-value-table"],
)
def test_expected_collision_share_golden(vocab, table, num_hashes, expected):
    # By hand: q = (1/(M-1))**H; P = 1 - (1-q)**(V-1). V=3, M=3, H=2: q=1/4, 1-(3/4)**2 = 7/16.
    assert hashing.expected_collision_share(vocab, table, num_hashes) == pytest.approx(expected)


@pytest.mark.parametrize(
    "vocab,table,num_hashes",
    [(20_000, 10_001, 1), (20_000, 201, 2), (50_000, 51, 3)],
    ids=["H1-dense", "H2-moderate", "H3-moderate"],
)
def test_collision_report_close_to_random_hash(vocab, table, num_hashes):
    report = hashing.collision_report(vocab, table, num_hashes, seed=3)
    # Expectations 0.86, 0.39, 0.33: the measured share of 20k+ ids has std < 0.01; allow 0.02.
    assert abs(report["measured_share"] - report["expected_share"]) < 0.02, report
    assert report["num_colliding"] == round(report["measured_share"] * vocab)
