"""The hash family: raw int64 ids -> hash values (table rows), identical under NumPy and JAX.

The release describes hash embeddings but ships none: callers had to look embeddings up
themselves. This module is the arithmetic only (NumPy and jnp, no model types); the batch
builder (`RawBatch.hashed`) and the embedding tables (`HashEmbeddings`) are in phoenix_inputs.py.

Shape glossary
  V  vocabulary (number of distinct raw ids)   M  rows of one table
  H  number of hashes of whichever id type is at hand; "..." any leading shape

Padding convention
  Raw ids are int64. Every raw id < 0 is padding (phoenix_inputs.PAD_ID = -1); it hashes to 0 under
  every hash function, and hash value 0 is padding everywhere downstream. Every id
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

Collisions: `uv run python phoenix_hashing.py` prints the measured vs expected share of ids whose
H-tuple of hash values is shared with another id (table in docs/notes.md).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from phoenix_validation import check_number

__all__ = [
    # constants
    "PAD_HASH", "MAX_TABLE_SIZE", "MAX_HASH_SEED", "ID_TYPE_SALTS",
    # the hash family (NumPy and jittable JAX)
    "split_ids", "split_ids_jax", "hash_seeds", "check_table_size", "multi_hash", "hash_ids", "hash_ids_jax",
    "hash_user_ids", "hash_post_ids", "hash_author_ids",
    # collisions
    "expected_collision_share", "colliding_mask", "collision_report",
]


# Hash value (= table row) of padding. Row 0 of every table is never read for a valid id.
PAD_HASH = 0

_WORD_BITS = 32
_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
# A non-negative int64 has this bit clear in its high word; padding (negative ids) has it set.
_SIGN_BIT32 = 1 << 31
# Hash values are stored as int32 (JAX's default index type), so tables may have at most 2**31 rows.
MAX_TABLE_SIZE = 1 << 31
# HashConfig.hash_seed is a 64-bit word: seeds lie in [0, 2**64), so no two seeds give one family.
MAX_HASH_SEED = 1 << 64

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
    if (ids.dtype == object and ids.size and all(isinstance(v, int) and not isinstance(v, bool) for v in ids.flat)
            and not all(-2**63 <= v < 2**63 for v in ids.flat)):
        # Python ints NumPy could not fit in int64 or uint64 (e.g. 2**64): out of range, not of the wrong type.
        raise ValueError(f"{name} must fit in int64 (-2**63 <= id < 2**63), got range [{min(ids.flat)}, "
                         f"{max(ids.flat)}]")
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


def _check_id_type(id_type) -> None:
    if not isinstance(id_type, str) or id_type not in ID_TYPE_SALTS:
        raise ValueError(f"id_type must be one of {sorted(ID_TYPE_SALTS)}, got {id_type!r}")


def check_hash_seed(hash_seed, name: str = "hash_seed") -> int:
    """`hash_seed` as an int in [0, 2**64) (a Python or NumPy int; bools and floats are refused)."""
    check_number(hash_seed, name, "an int in [0, 2**64)", lambda v: 0 <= v < MAX_HASH_SEED, integer=True)
    return int(hash_seed)


def check_num_hashes(num_hashes, name: str = "num_hashes") -> int:
    check_number(num_hashes, name, "an int >= 1", lambda v: v >= 1, integer=True)
    return int(num_hashes)


def hash_seeds(hash_seed: int, id_type: str, num_hashes: int) -> np.ndarray:
    """Murmur seeds [H] uint32 of the hash functions of one id type (deterministic in its inputs)."""
    hash_seed = check_hash_seed(hash_seed)
    _check_id_type(id_type)
    num_hashes = check_num_hashes(num_hashes)
    state = _splitmix64(hash_seed ^ ID_TYPE_SALTS[id_type])
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


def check_table_size(table_size: int, name: str = "table_size") -> int:
    """`table_size` as an int in [2, 2**31]: row 0 is padding, and hash values are int32."""
    check_number(table_size, name, "an int in [2, 2**31]", lambda v: 2 <= v <= MAX_TABLE_SIZE, integer=True)
    return int(table_size)


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
    `seeds` [H]: integers in [0, 2**32) (`hash_seeds`).
    """
    table_size = check_table_size(table_size)
    _check_words(lo, hi)
    _check_seeds(seeds)
    lo = xp.asarray(lo)
    hi = xp.asarray(hi)
    seeds = xp.asarray(seeds, dtype=xp.uint32)
    h = _murmur3_words(lo, hi, seeds, xp)  # [..., H] uint32
    h = h % xp.uint32(table_size - 1) + xp.uint32(1)  # [..., H] in [1, M)
    is_pad = (hi & xp.uint32(_SIGN_BIT32)) != xp.uint32(0)  # [...]
    return xp.where(is_pad[..., None], xp.uint32(PAD_HASH), h).astype(xp.int32)  # [..., H]


def _check_seeds(seeds) -> None:
    """Murmur seeds [H]: integers in [0, 2**32) (a float or negative seed would be cast silently or fail
    inside NumPy). Traced seeds are checked by dtype only."""
    dtype = getattr(seeds, "dtype", None)
    if isinstance(seeds, jax.core.Tracer):
        values = None
    else:
        values = np.asarray(seeds)
        dtype = values.dtype
    if np.ndim(seeds) != 1 or not np.issubdtype(dtype, np.integer):
        raise TypeError(f"seeds: expected a [H] integer array (hash_seeds), got shape {list(np.shape(seeds))} "
                        f"dtype {dtype}")
    if values is not None and values.size and (values.min() < 0 or values.max() > _MASK32):
        raise ValueError(f"seeds: expected values in [0, 2**32), got range [{values.min()}, {values.max()}]")


# HashConfig fields of each id type: (number of hashes, table size).
_TYPE_FIELDS = {"user": ("num_user_hashes", "user_table_size"), "post": ("num_item_hashes", "post_table_size"),
                "author": ("num_author_hashes", "author_table_size")}


def _type_params(cfg, id_type: str) -> tuple[int, int]:
    """(number of hashes, table size) of one id type, checked (a HashConfig changed after it was built
    is not checked by its constructor); an error names the HashConfig field."""
    _check_id_type(id_type)
    fields = _TYPE_FIELDS[id_type]
    if not all(hasattr(cfg, f) for f in fields + ("hash_seed",)):
        raise TypeError(f"cfg: expected a HashConfig, got {type(cfg).__name__}")
    num_hashes, table_size = (getattr(cfg, f) for f in fields)
    return (check_num_hashes(num_hashes, f"HashConfig.{fields[0]}"),
            check_table_size(table_size, f"HashConfig.{fields[1]}"))


def hash_ids(ids, cfg, id_type: str, name: str = "ids") -> np.ndarray:
    """NumPy: raw int64 ids [...] -> hash values [..., H] int32 of one id type ("user"/"post"/"author")."""
    num_hashes, table_size = _type_params(cfg, id_type)
    lo, hi = split_ids(ids, name)
    seeds = hash_seeds(check_hash_seed(cfg.hash_seed, "HashConfig.hash_seed"), id_type, num_hashes)
    # uint32 wrap-around is the point; silence NumPy's overflow warnings on 0-d inputs.
    with np.errstate(over="ignore"):
        return multi_hash(lo, hi, seeds, table_size, np)


def hash_ids_jax(lo: jax.Array, hi: jax.Array, cfg, id_type: str) -> jax.Array:
    """JAX (jittable; close over `cfg` and `id_type`): words (lo, hi) [...] -> [..., H] int32.

    Bit-identical to `hash_ids`. Get the words with `split_ids_jax` (or `split_ids` on the host);
    anything but uint32 words raises TypeError, since casting raw ids to uint32 would drop digits.
    """
    num_hashes, table_size = _type_params(cfg, id_type)
    seeds = hash_seeds(check_hash_seed(cfg.hash_seed, "HashConfig.hash_seed"), id_type, num_hashes)
    return multi_hash(lo, hi, seeds, table_size, jnp)


def hash_user_ids(ids, cfg, name: str = "user_ids") -> np.ndarray:
    """Raw user ids [...] -> user hashes [..., Hu] int32."""
    return hash_ids(ids, cfg, "user", name)


def hash_post_ids(ids, cfg, name: str = "post_ids") -> np.ndarray:
    """Raw post ids [...] -> post hashes [..., Hi] int32."""
    return hash_ids(ids, cfg, "post", name)


def hash_author_ids(ids, cfg, name: str = "author_ids") -> np.ndarray:
    """Raw author ids [...] -> author hashes [..., Ha] int32."""
    return hash_ids(ids, cfg, "author", name)


# ---------------------------------------------------------------------------------------------
# Collision analysis
# ---------------------------------------------------------------------------------------------


def expected_collision_share(vocab_size: int, table_size: int, num_hashes: int) -> float:
    """Random-hash probability that an id's H-tuple equals another id's: 1 - (1 - q)**(V-1)."""
    check_number(vocab_size, "vocab_size", "an int >= 0", lambda v: v >= 0, integer=True)
    table_size = check_table_size(table_size)
    num_hashes = check_num_hashes(num_hashes)
    if vocab_size <= 1:
        return 0.0  # no other id to collide with
    q = (1.0 / (table_size - 1)) ** num_hashes  # one other id matches on all H hashes
    if q >= 1.0:  # a one-value table: every id collides as soon as there are two
        return 1.0 if vocab_size > 1 else 0.0
    # expm1/log1p keep precision when q is ~1e-18.
    return float(-math.expm1((vocab_size - 1) * math.log1p(-q)))


def colliding_mask(hashes: np.ndarray) -> np.ndarray:
    """[V, H] hash tuples -> [V] bool, True where the row equals at least one other row."""
    hashes = np.asarray(hashes)
    if hashes.ndim != 2 or not np.issubdtype(hashes.dtype, np.integer):
        raise ValueError(f"hashes: expected a [V, H] integer array, got shape {list(hashes.shape)} "
                         f"dtype {hashes.dtype}")
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
    check_number(vocab_size, "vocab_size", "an int >= 1", lambda v: v >= 1, integer=True)
    lo, hi = split_ids(np.arange(vocab_size, dtype=np.int64))
    with np.errstate(over="ignore"):
        hashes = multi_hash(lo, hi, hash_seeds(seed, "post", num_hashes), table_size)  # [V, H]
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
