"""Multi-hash embedding tables: raw int64 ids -> hash values -> embedding rows.

The release describes hash embeddings but ships none (spec section 9): callers had to look
embeddings up themselves. This module supplies the hash family, a NumPy batch builder for data
pipelines, and `HashEmbeddings`, an hk.Module that turns a `RecsysBatch` into `RecsysEmbeddings`.

Shape glossary
  B  batch (users)          S  history length         C  candidates per user
  D  embedding size         A  actions                V  vocabulary (number of distinct raw ids)
  M  rows of one table      Hu / Hi / Ha  number of user / item (post) / author hashes
  H  number of hashes of whichever id type is at hand; "..." any leading shape

Padding convention
  Raw ids are int64. Every raw id < 0 is padding (we write `PAD_ID = -1`); it hashes to 0 under
  every hash function, and hash value 0 is padding everywhere downstream (spec section 2). Every id
  >= 0 (0 included, up to 2**63 - 1) hashes into [1, M) under each of the H functions.

Hash family
  hash_i(id) = 1 + murmur3_x86_32(id as 8 little-endian bytes, seed_i) % (M - 1)
  i.e. MurmurHash3 of the two 32-bit words (low word first), which is what Spark's
  `Murmur3_x86_32.hashLong(id, seed_i)` computes, so a JVM/SQL pipeline can reproduce our hashes.
  seed_i is a 32-bit word derived with splitmix64 from (HashConfig.hash_seed, id type, i); user,
  post and author ids therefore use unrelated functions even when raw ids coincide.
  The modulo bias is below (M - 1) / 2**32 relative (2.3e-4 for M = 1M): negligible.

Why two uint32 words
  JAX runs with jax_enable_x64 off, and this library must not flip it, so int64 ids cannot enter
  JAX. `split_ids` turns int64 ids into (lo, hi) uint32 words on the host; `multi_hash` does all
  arithmetic in uint32 with wrap-around, and the *same* code runs under NumPy and under jnp, so
  `hash_ids` (NumPy) and `hash_ids_jax` (jittable) agree bit for bit. Padding is the sign bit of
  the high word. `split_ids_jax` gives the words as jax arrays: host ids go through `split_ids`
  (an int64 array handed to jnp with x64 off would be truncated to int32 and collide), jax ids
  (int32, or int64 with x64 on) are split in JAX, so it can run inside a jitted function.

Collisions (`uv run python phoenix_hashing.py`; ids 0..V-1, hash_seed 0): share of ids whose H-tuple of
hash values is shared with another id, measured vs the random-hash expectation
1 - (1 - 1/(M-1)**H)**(V-1).

          V          M  H   measured   expected
    100,000    100,000  1   0.634080   0.632122
    100,000    100,000  2   0.000020   0.000010
    100,000    100,000  3   0.000000   0.000000
    100,000  1,000,000  1   0.095750   0.095162
    100,000  1,000,000  2   0.000000   0.000000
    100,000  1,000,000  3   0.000000   0.000000
  1,000,000    100,000  1   0.999946   0.999955
  1,000,000    100,000  2   0.000102   0.000100
  1,000,000    100,000  3   0.000000   0.000000
  1,000,000  1,000,000  1   0.632535   0.632121
  1,000,000  1,000,000  2   0.000004   0.000001
  1,000,000  1,000,000  3   0.000000   0.000000

  A single hash needs M >> V to keep collisions rare (at M = V about 63% of ids share their row);
  with two hashes an id shares *both* rows with another id only ~V / M**2 of the time (1e-4 at
  V = 1M, M = 100k), at the cost of H lookups per id. The H = 2, 3 shares are a handful of ids (2 ids
  in 100k is 0.00002), so they agree with the expectation within Poisson noise.
"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from phoenix_validation import check_array, values_enabled
from recsys_model import HashConfig, RecsysBatch, RecsysEmbeddings

# Raw id written at padded positions; every negative id is treated as padding.
PAD_ID = -1
# Hash value (= table row) of padding. Row 0 of every table is never read for a valid id.
PAD_HASH = 0

_WORD_BITS = 32
_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
# A non-negative int64 has this bit clear in its high word; padding (negative ids) has it set.
_SIGN_BIT32 = 1 << 31
# Hash values are stored as int32 (JAX's default index type), so tables may have at most 2**31 rows.
MAX_TABLE_SIZE = 1 << 31

# MurmurHash3_x86_32 constants (Appleby, SMHasher reference implementation).
_MURMUR_C1 = 0xCC9E2D51
_MURMUR_C2 = 0x1B873593
_MURMUR_K_ROT = 15
_MURMUR_H_ROT = 13
_MURMUR_H_MUL = 5
_MURMUR_H_ADD = 0xE6546B64
_MURMUR_FMIX_C1 = 0x85EBCA6B
_MURMUR_FMIX_C2 = 0xC2B2AE35
_KEY_BYTES = 8  # an int64 id is hashed as 8 bytes; murmur3 mixes the length into the result

# splitmix64 (Steele, Lea & Flood 2014) turns (hash_seed, id type, index) into murmur seeds.
_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_SPLITMIX_C1 = 0xBF58476D1CE4E5B9
_SPLITMIX_C2 = 0x94D049BB133111EB

# One salt per id type (the ASCII of "user", "post", "auth") so the three families differ.
ID_TYPE_SALTS = {"user": 0x75736572, "post": 0x706F7374, "author": 0x61757468}

# Init std of the embedding tables. The release's example inputs (spec section 7,
# create_example_batch) are standard-normal embeddings, and the input projections
# (spec section 3, VarianceScaling fan_out over the concatenated hash axis) are scaled so that
# unit-variance embeddings give unit-variance reduced inputs: std 1 keeps the model in the regime
# it was designed and tested for. A smaller std (e.g. 0.05) makes rows move faster relative to
# their size under Adam; it is a constructor argument.
DEFAULT_INIT_STDDEV = 1.0


# ---------------------------------------------------------------------------------------------
# Hash family
# ---------------------------------------------------------------------------------------------


def split_ids(ids, name: str = "ids") -> tuple[np.ndarray, np.ndarray]:
    """Splits integer ids [...] into their two's-complement uint32 words (lo [...], hi [...]).

    Negative ids (padding) get a high word with the sign bit set, which `multi_hash` maps to 0.
    Floats, bools, strings and objects raise TypeError (a float id may already have lost digits:
    float64 holds integers exactly only up to 2**53); uint64 ids >= 2**63 raise ValueError.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must be integers (int64 raw ids, negative = padding), got dtype {ids.dtype}")
    if ids.dtype == np.uint64 and ids.size and ids.max() >= 1 << 63:
        raise ValueError(f"{name} must fit in int64 (< 2**63), got maximum {ids.max()}")
    words = ids.astype(np.int64, copy=True).view(np.uint64)  # [...]; a copy is contiguous
    lo = (words & np.uint64(_MASK32)).astype(np.uint32)  # [...]
    hi = (words >> np.uint64(_WORD_BITS)).astype(np.uint32)  # [...]
    return lo, hi


def split_ids_jax(ids, name: str = "ids") -> tuple[jax.Array, jax.Array]:
    """`split_ids` returning jax arrays; agrees with it for every integer dtype, jitted or not.

    Host values (NumPy arrays, lists, Python ints) are split by `split_ids` on the host: with
    jax_enable_x64 off an int64 array must never reach jnp, which would truncate it to int32 and
    send 2**40 + 5 and 5 to the same hashes. jax arrays (tracers included) are split by dtype:
    signed ids are sign-extended, unsigned ones zero-extended, 64-bit ones (x64 on) cut in words.
    Under tracing a uint64 id >= 2**63 cannot raise; its high word has the sign bit: padding.
    To hash int64 ids in a jitted function, split them on the host and pass the words: `jax.jit`
    itself casts an int64 argument to int32 (x64 off) before this function could see it.
    """
    if not isinstance(ids, jax.Array):  # host value, possibly int64: never truncate it
        lo, hi = split_ids(ids, name)
        return jnp.asarray(lo), jnp.asarray(hi)
    dtype = np.dtype(ids.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} must be integers (raw ids, negative = padding), got dtype {dtype}")
    if dtype.itemsize == 8:  # only exists with jax_enable_x64 on
        lo = (ids & _MASK32).astype(jnp.uint32)  # [...]
        hi = (ids >> _WORD_BITS).astype(jnp.uint32)  # [...]; arithmetic shift keeps the sign
        return lo, hi
    if np.issubdtype(dtype, np.unsignedinteger):
        return ids.astype(jnp.uint32), jnp.zeros(ids.shape, jnp.uint32)
    ids = ids.astype(jnp.int32)
    lo = jax.lax.bitcast_convert_type(ids, jnp.uint32)  # [...]
    hi = jnp.where(ids < 0, jnp.uint32(_MASK32), jnp.uint32(0))  # [...]
    return lo, hi


def _splitmix64(x: int) -> int:
    z = (x + _SPLITMIX_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _SPLITMIX_C1) & _MASK64
    z = ((z ^ (z >> 27)) * _SPLITMIX_C2) & _MASK64
    return z ^ (z >> 31)


def hash_seeds(hash_seed: int, id_type: str, num_hashes: int) -> np.ndarray:
    """Murmur seeds [H] uint32 of the hash functions of one id type (deterministic in its inputs)."""
    state = _splitmix64((hash_seed & _MASK64) ^ ID_TYPE_SALTS[id_type])
    return np.array(
        [_splitmix64(state + i * _SPLITMIX_GAMMA) & _MASK32 for i in range(num_hashes)],
        dtype=np.uint32,
    )


def _rotl32(x, r: int, xp):
    return (x << xp.uint32(r)) | (x >> xp.uint32(_WORD_BITS - r))


def _murmur3_words(lo, hi, seeds, xp):
    """MurmurHash3_x86_32 of the 8-byte key (lo, hi) under each seed: [...] x [H] -> [..., H] uint32."""
    u32 = xp.uint32
    h = seeds  # [H]
    for word in (lo[..., None], hi[..., None]):  # [..., 1] each
        k = _rotl32(word * u32(_MURMUR_C1), _MURMUR_K_ROT, xp) * u32(_MURMUR_C2)
        h = _rotl32(h ^ k, _MURMUR_H_ROT, xp) * u32(_MURMUR_H_MUL) + u32(_MURMUR_H_ADD)  # [..., H]
    h = h ^ u32(_KEY_BYTES)
    # fmix32: the finaliser that makes every input bit affect every output bit.
    h = h ^ (h >> u32(16))
    h = h * u32(_MURMUR_FMIX_C1)
    h = h ^ (h >> u32(13))
    h = h * u32(_MURMUR_FMIX_C2)
    return h ^ (h >> u32(16))


def _check_table_size(table_size: int) -> None:
    if not 2 <= table_size <= MAX_TABLE_SIZE:
        raise ValueError(f"table_size must be in [2, 2**31], got {table_size}")


def _check_words(lo, hi) -> None:
    """The words must be uint32 of one shape: casting raw int64 ids to uint32 would drop digits."""
    for name, word in (("lo", lo), ("hi", hi)):
        dtype = getattr(word, "dtype", None)
        if dtype is None or np.dtype(dtype) != np.uint32:
            raise TypeError(f"{name} must be the uint32 words of split_ids / split_ids_jax, got "
                            f"{'dtype ' + str(dtype) if dtype is not None else type(word).__name__}")
    if np.shape(lo) != np.shape(hi):
        raise ValueError(f"lo and hi must have one shape, got {np.shape(lo)} and {np.shape(hi)}")


def multi_hash(lo, hi, seeds, table_size: int, xp=np):
    """Hash values [..., H] int32 in [1, table_size) of ids given as words (lo, hi) [...]; 0 for padding.

    `xp` is `np` or `jnp`: the same uint32 arithmetic runs in both, so the results are identical.
    """
    _check_table_size(table_size)
    _check_words(lo, hi)
    lo = xp.asarray(lo)
    hi = xp.asarray(hi)
    seeds = xp.asarray(seeds, dtype=xp.uint32)
    h = _murmur3_words(lo, hi, seeds, xp)  # [..., H] uint32
    h = h % xp.uint32(table_size - 1) + xp.uint32(1)  # [..., H] in [1, M)
    is_pad = (hi & xp.uint32(_SIGN_BIT32)) != xp.uint32(0)  # [...]
    return xp.where(is_pad[..., None], xp.uint32(PAD_HASH), h).astype(xp.int32)  # [..., H]


def _type_params(cfg: HashConfig, id_type: str) -> tuple[int, int]:
    """(number of hashes, table size) of one id type."""
    if id_type == "user":
        return cfg.num_user_hashes, cfg.user_table_size
    if id_type == "post":
        return cfg.num_item_hashes, cfg.post_table_size
    if id_type == "author":
        return cfg.num_author_hashes, cfg.author_table_size
    raise ValueError(f"id_type must be one of {sorted(ID_TYPE_SALTS)}, got {id_type!r}")


def hash_ids(ids, cfg: HashConfig, id_type: str, name: str = "ids") -> np.ndarray:
    """NumPy: raw int64 ids [...] -> hash values [..., H] int32 of one id type ("user"/"post"/"author")."""
    num_hashes, table_size = _type_params(cfg, id_type)
    lo, hi = split_ids(ids, name)
    seeds = hash_seeds(cfg.hash_seed, id_type, num_hashes)
    # uint32 wrap-around is the point; silence NumPy's overflow warnings on 0-d inputs.
    with np.errstate(over="ignore"):
        return multi_hash(lo, hi, seeds, table_size, np)


def hash_ids_jax(lo: jax.Array, hi: jax.Array, cfg: HashConfig, id_type: str) -> jax.Array:
    """JAX (jittable; close over `cfg` and `id_type`): words (lo, hi) [...] -> [..., H] int32.

    Bit-identical to `hash_ids`. Get the words with `split_ids_jax` (or `split_ids` on the host);
    anything but uint32 words raises TypeError, since casting raw ids to uint32 would drop digits.
    """
    num_hashes, table_size = _type_params(cfg, id_type)
    seeds = hash_seeds(cfg.hash_seed, id_type, num_hashes)
    return multi_hash(lo, hi, seeds, table_size, jnp)


def hash_user_ids(ids, cfg: HashConfig, name: str = "user_ids") -> np.ndarray:
    """Raw user ids [...] -> user hashes [..., Hu] int32."""
    return hash_ids(ids, cfg, "user", name)


def hash_post_ids(ids, cfg: HashConfig, name: str = "post_ids") -> np.ndarray:
    """Raw post ids [...] -> post hashes [..., Hi] int32."""
    return hash_ids(ids, cfg, "post", name)


def hash_author_ids(ids, cfg: HashConfig, name: str = "author_ids") -> np.ndarray:
    """Raw author ids [...] -> author hashes [..., Ha] int32."""
    return hash_ids(ids, cfg, "author", name)


def _int32_field(x, name: str, shape: tuple) -> np.ndarray:
    """An integer array of `shape` whose values fit int32 (surfaces): no silent truncation or wrap."""
    x = np.asarray(x)
    check_array(x, name, shape, "int")
    info = np.iinfo(np.int32)
    if x.size and (x.min() < info.min or x.max() > info.max):
        raise ValueError(f"{name}: expected values in int32 range, got range [{x.min()}, {x.max()}]")
    return x.astype(np.int32)


def batch_from_ids(
    user_ids,
    history_post_ids,
    history_author_ids,
    history_actions,
    history_surfaces,
    candidate_post_ids,
    candidate_author_ids,
    candidate_surfaces,
    hash_config: HashConfig,
) -> RecsysBatch:
    """Builds a `RecsysBatch` of NumPy arrays (spec section 2) from raw ids; negative ids are padding.

    Shapes: user_ids [B], history_post_ids / history_author_ids / history_surfaces [B, S],
    history_actions [B, S, A], candidate_post_ids / candidate_author_ids / candidate_surfaces [B, C].
    Ids and surfaces must have integer dtypes (floats would be truncated); actions bool, integer
    or float, finite. Actions and surfaces pass through unchanged (as float32 / int32): the model
    ignores them at padded positions because it masks by the post hash.
    """
    user_ids = np.asarray(user_ids)
    history_post_ids = np.asarray(history_post_ids)
    candidate_post_ids = np.asarray(candidate_post_ids)
    if user_ids.ndim != 1:
        raise ValueError(f"user_ids must be [B], got shape {user_ids.shape}")
    batch_size = user_ids.shape[0]
    if history_post_ids.ndim != 2 or history_post_ids.shape[0] != batch_size:
        raise ValueError(f"history_post_ids must be [B={batch_size}, S], got {history_post_ids.shape}")
    if candidate_post_ids.ndim != 2 or candidate_post_ids.shape[0] != batch_size:
        raise ValueError(
            f"candidate_post_ids must be [B={batch_size}, C], got {candidate_post_ids.shape}"
        )
    hist_shape, cand_shape = history_post_ids.shape, candidate_post_ids.shape
    for name, arr, shape in [
        ("history_author_ids", history_author_ids, hist_shape),
        ("history_surfaces", history_surfaces, hist_shape),
        ("candidate_author_ids", candidate_author_ids, cand_shape),
        ("candidate_surfaces", candidate_surfaces, cand_shape),
    ]:
        if np.shape(arr) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {np.shape(arr)}")
    history_actions = np.asarray(history_actions)
    if history_actions.ndim != 3 or history_actions.shape[:2] != hist_shape:
        raise ValueError(f"history_actions must be [B, S, A] with [B, S]={hist_shape}, got "
                         f"{history_actions.shape}")
    check_array(history_actions, "history_actions", (*hist_shape, None), "number")
    history_actions = history_actions.astype(np.float32)
    if values_enabled() and not np.all(np.isfinite(history_actions)):
        raise ValueError("history_actions: expected finite values, got NaN or inf")
    history_surfaces = _int32_field(history_surfaces, "history_surfaces", hist_shape)
    candidate_surfaces = _int32_field(candidate_surfaces, "candidate_surfaces", cand_shape)
    return RecsysBatch(
        user_hashes=hash_user_ids(user_ids, hash_config, "user_ids"),  # [B, Hu]
        history_post_hashes=hash_post_ids(history_post_ids, hash_config, "history_post_ids"),  # [B, S, Hi]
        history_author_hashes=hash_author_ids(
            history_author_ids, hash_config, "history_author_ids"),  # [B, S, Ha]
        history_actions=history_actions,  # [B, S, A]
        history_product_surface=history_surfaces,  # [B, S]
        candidate_post_hashes=hash_post_ids(
            candidate_post_ids, hash_config, "candidate_post_ids"),  # [B, C, Hi]
        candidate_author_hashes=hash_author_ids(
            candidate_author_ids, hash_config, "candidate_author_ids"),  # [B, C, Ha]
        candidate_product_surface=candidate_surfaces,  # [B, C]
    )


# ---------------------------------------------------------------------------------------------
# Embedding tables
# ---------------------------------------------------------------------------------------------


def lookup(table: jax.Array, hashes: jax.Array) -> jax.Array:
    """Rows of `table` [M, D] at `hashes` [..., H] -> [..., H, D], zero where the hash is 0.

    A gather (`jnp.take`), never a one-hot matmul, so nothing of size M x batch is built. The mask
    multiplies the gathered rows, so padded positions also send no gradient into row 0.
    """
    hashes = jnp.asarray(hashes, jnp.int32)
    rows = jnp.take(table, hashes, axis=0)  # [..., H, D]
    valid = (hashes != PAD_HASH).astype(table.dtype)  # [..., H]
    return rows * valid[..., None]


class HashEmbeddings(hk.Module):
    """Hash embedding tables that turn a `RecsysBatch` into `RecsysEmbeddings` (float32).

    Parameters (names are part of the checkpoint format):
      user_table [user_table_size, D], post_table [post_table_size, D],
      author_table [author_table_size, D]. History and candidates share the post and author
      tables, so a post has one representation wherever it appears.
    Use it in the same `hk.transform` as the model:
      `hk.transform(lambda batch: model(batch, HashEmbeddings(cfg, D)(batch)))`.
    """

    def __init__(
        self,
        hash_config: HashConfig,
        emb_size: int,
        init_stddev: float = DEFAULT_INIT_STDDEV,
        name: str | None = "hash_embeddings",
    ):
        super().__init__(name=name)
        self.hash_config = hash_config
        self.emb_size = emb_size
        self.init_stddev = init_stddev

    def _table(self, name: str, num_rows: int) -> jax.Array:
        _check_table_size(num_rows)
        init = hk.initializers.RandomNormal(stddev=self.init_stddev)
        return hk.get_parameter(name, [num_rows, self.emb_size], jnp.float32, init=init)  # [M, D]

    def __call__(self, batch: RecsysBatch) -> RecsysEmbeddings:
        cfg = self.hash_config
        user_table = self._table("user_table", cfg.user_table_size)  # [Mu, D]
        post_table = self._table("post_table", cfg.post_table_size)  # [Mp, D]
        author_table = self._table("author_table", cfg.author_table_size)  # [Ma, D]
        return RecsysEmbeddings(
            user_embeddings=lookup(user_table, batch.user_hashes),  # [B, Hu, D]
            history_post_embeddings=lookup(post_table, batch.history_post_hashes),  # [B, S, Hi, D]
            candidate_post_embeddings=lookup(post_table, batch.candidate_post_hashes),  # [B, C, Hi, D]
            history_author_embeddings=lookup(author_table, batch.history_author_hashes),  # [B, S, Ha, D]
            candidate_author_embeddings=lookup(
                author_table, batch.candidate_author_hashes
            ),  # [B, C, Ha, D]
        )


# ---------------------------------------------------------------------------------------------
# Collision analysis
# ---------------------------------------------------------------------------------------------


def expected_collision_share(vocab_size: int, table_size: int, num_hashes: int) -> float:
    """Random-hash probability that an id's H-tuple equals another id's: 1 - (1 - q)**(V-1)."""
    q = (1.0 / (table_size - 1)) ** num_hashes  # one other id matches on all H hashes
    if q >= 1.0:  # a one-value table: every id collides as soon as there are two
        return 1.0 if vocab_size > 1 else 0.0
    # expm1/log1p keep precision when q is ~1e-18.
    return float(-math.expm1((vocab_size - 1) * math.log1p(-q)))


def colliding_mask(hashes: np.ndarray) -> np.ndarray:
    """[V, H] hash tuples -> [V] bool, True where the row equals at least one other row."""
    hashes = np.asarray(hashes)
    # Sort rows lexicographically; a row is duplicated iff it equals a sorted neighbour.
    order = np.lexsort(hashes.T[::-1])  # [V]
    rows = hashes[order]  # [V, H]
    same_as_next = np.all(rows[1:] == rows[:-1], axis=1)  # [V-1]
    duplicated = np.zeros(len(rows), dtype=bool)  # [V], in sorted order
    duplicated[1:] |= same_as_next
    duplicated[:-1] |= same_as_next
    mask = np.empty_like(duplicated)
    mask[order] = duplicated
    return mask


def collision_report(vocab_size: int, table_size: int, num_hashes: int, seed: int = 0) -> dict:
    """Hashes ids 0..V-1 and measures the share whose H-tuple of hash values is not unique.

    Returns {"vocab_size", "table_size", "num_hashes", "num_colliding", "measured_share",
    "expected_share"}; the expectation is for an ideal random hash (`expected_collision_share`).
    """
    cfg = HashConfig(num_item_hashes=num_hashes, post_table_size=table_size, hash_seed=seed)
    hashes = hash_ids(np.arange(vocab_size, dtype=np.int64), cfg, "post")  # [V, H]
    num_colliding = int(colliding_mask(hashes).sum())
    return {
        "vocab_size": vocab_size,
        "table_size": table_size,
        "num_hashes": num_hashes,
        "num_colliding": num_colliding,
        "measured_share": num_colliding / vocab_size,
        "expected_share": expected_collision_share(vocab_size, table_size, num_hashes),
    }


def main() -> None:
    """Prints the collision table of the module docstring (about 10 s on one CPU core)."""
    print(f"{'V':>11} {'M':>10} {'H':>2} {'measured':>10} {'expected':>10}")
    for vocab_size in (100_000, 1_000_000):
        for table_size in (100_000, 1_000_000):
            for num_hashes in (1, 2, 3):
                r = collision_report(vocab_size, table_size, num_hashes)
                print(
                    f"{vocab_size:>11,} {table_size:>10,} {num_hashes:>2} "
                    f"{r['measured_share']:>10.6f} {r['expected_share']:>10.6f}"
                )


if __name__ == "__main__":
    main()
