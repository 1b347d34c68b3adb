"""Corpus indexes for the retrieval stage: exact chunked top-k, sharded exact top-k, FAISS ANN.

The contract (docs/index.md): **a score is a function of (user, row) only.** `exact_scores(users,
corpus)` defines it: every product u_i * x_i is rounded to float32 on its own and the D products are
summed by one fixed pairwise tree (`_canonical`), so nothing a compiler may choose (matmul kernel,
summation order, vector body or remainder, fused multiply-add) can change a score. Identical rows
score identically wherever they sit, whatever the batch size, block size, chunk size, coarse pass,
sharding or device count, and `CorpusIndex` and `ShardedCorpusIndex` return exactly what brute force
over `exact_scores` returns: best first, equal scores in corpus-index order (lower index first),
entries masked out by `corpus_mask` (bool [N], True = valid) scoring -INF. Scores are never -0.0.
`FaissIndex` is approximate: which entries come back depends on its lists, but each comes with its
`exact_scores` value, in the same order. Searches refuse users whose scores could overflow float32
(|u| * the largest row norm above SCORE_LIMIT).

Shape glossary
  B  batch (users)                 D  embedding size
  N  corpus size                   K  top-k
  R  corpus rows per chunk         W  rows per block (the unit of the block-max pre-selection)
  Nb  blocks kept per user (min(K, number of blocks))
  Nd devices (corpus shards)       Nl corpus rows one device searches (N, or N / Nd per shard)

How the exact search keeps the contract (`CorpusIndex`; docs/index.md has the proofs):
  1. Scan: score the corpus in chunks of R rows inside one jitted `fori_loop` with a fast float32
     matmul (or a bfloat16 copy, the coarse pass) and keep only the max of every block of W rows
     ([B, N/W]). These maxima are approximate: any float32 evaluation of a dot product is within
     g * |u| |x| (plus a term for flushed subnormals) of the exact value, so each is within a band e
     of the block's canonical maximum (`_float32_band`, `_coarse_band`).
  2. Select (`_select_blocks`): with L the Nb-th best approximate maximum, the Nb = K best blocks
     each hold a row scoring at least L - e, so a block holding a top-K row has an approximate
     maximum >= L - 2e. Those blocks are kept in index order: usually the Nb best plus a few extra
     slots; near-ties (duplicated rows) can make them up to MAX_ROUNDS times as many.
  3. Rescore (`_refine`, one user and one round of slots at a time): the kept blocks' rows get a
     float32 matmul score, the same band argument over rows leaves K plus a few that can be in the
     top K, and only those get the canonical score, sorted by (score desc, index asc); rows below
     L - e are beaten by K others and cut first. Rounds merge by the same order.
  If more blocks lie in the band than MAX_ROUNDS rounds hold (all rows equal, say), or the band is
  not a number, a `lax.cond` hands the search to the next pass: coarse -> float32 scan -> a
  canonical scan whose block maxima are exact (slow, but exact for any input). Blocks below a
  verified guess at the Nb-th maximum are set aside before each `top_k` (`_drop_hopeless`): XLA
  CPU's top_k pays for every entry that enters its running best K.
  Coarse pass (default from COARSE_MIN_ROWS rows): step 1 reads a copy of the corpus rounded to
  bfloat16 (half the bytes), held as uint16 bit patterns widened to float32 chunk by chunk
  (`_widen`): handed a bfloat16 array, XLA CPU converts the whole corpus before the loop.
  Up to MAX_UNCHUNKED_BATCH users the float32 scan reads the corpus in one piece (a sliced chunk is
  copied before its matmul). When K is large next to N (N <= DIRECT_ROWS_PER_K * K) and the [B, N]
  scores are small, W = 1 (`_row_top_k`): one matmul, one top_k of K plus a few rows, the same band.
  Memory beyond the corpus: [B, R] scores ([R, D] widened rows for the coarse pass), [B, N/W]
  maxima, [slots, W, D] gathered rows per user; the coarse copy N * D * 2 bytes.
  The corpus is held, not copied, when it can be (a 64-byte-aligned float32 NumPy array, or a
  jax.Array): such a NumPy array, and the arrays it is a view of, are made read-only, so a write to
  it raises instead of changing what the index reads (docs/index.md, "Aliasing").

Multi-host use (`ShardedCorpusIndex`): call `jax.distributed.initialize()` on every host first;
`jax.devices()` then lists the devices of all hosts and a `Mesh` over them shards the corpus
across hosts. Each host only has to hold its own rows: build the global array with
`jax.make_array_from_process_local_data(sharding, local_rows)` (or
`jax.make_array_from_callback`, reading only the addressable shards) instead of passing the
whole corpus to the constructor; the search is unchanged: every device computes a per-shard
top-k, an `all_gather` moves only [Nd, B, K] scores and indices, and every host ends with the
same merged global top-k. `corpus_post_ids` must then be the full id table on every host (ids
are small) or be mapped by the caller.
"""

import collections
import functools
import math
import mmap
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from phoenix_validation import INF, check_array, check_number, check_top_k, values_enabled

__all__ = [
    # the indexes and their scores
    "CorpusIndex", "ShardedCorpusIndex", "FaissIndex", "exact_scores", "aligned_empty", "auto_block_size",
    "auto_chunk_size", "SCORE_LIMIT", "STAGES", "TRACE_COUNTS", "DEFAULT_NPROBE", "CPU_ALIGNMENT_BYTES",
    # tuning constants (docs/index.md's lab notes; tests patch some)
    "SCORE_PRECISION", "HUGE_PAGE_MIN_BYTES", "CHUNK_BYTES", "MAX_UNCHUNKED_BATCH", "TRANSPOSED_SCAN_MIN_BATCH",
    "DIRECT_ROWS_PER_K", "SAMPLE_STRIDE", "SAMPLE_MIN_ROWS_PER_K", "BLOCK_COST_RATIO", "COARSE_MIN_ROWS",
    "COPY_CHUNK_ROWS", "COARSE_CHUNK_BYTES", "COARSE_EXTRA_BLOCKS_FRACTION", "COARSE_MIN_EXTRA_BLOCKS", "MAX_ROUNDS",
    "CANONICAL_CHUNK_BYTES",
]

# Full float32 products in the scan: GPUs may otherwise round f32 matmul inputs to TF32, and the
# error band (module doc, step 1) assumes float32 arithmetic.
SCORE_PRECISION = lax.Precision.HIGHEST
# Padding rows (ragged blocks, shard padding) score below a masked real entry's -INF, so a
# masked entry may fill the tail of a result but padding never appears in one.
PAD_SCORE = -np.inf
# float32's smallest normal number: what a product or sum flushed to zero (FTZ/DAZ, XLA CPU's
# mode) or rounded in the subnormal range can lose (`_underflow_term`).
TINY = float(np.finfo(np.float32).tiny)
# Users are refused (and, with value checks off, the search takes the canonical scan) where |u| times
# the largest row norm exceeds this: below it no product or partial sum of any evaluation order can
# overflow float32 (each is within (1 + g) * |u| |x|), so the error band holds.
SCORE_LIMIT = float(np.finfo(np.float32).max) / 2
# The error bands are computed in float32 from rounded norms; this factor covers their own rounding.
BOUND_SAFETY = 1.001
# Host buffers at this alignment can back a CPU jax.Array without a copy (XLA's alignment).
CPU_ALIGNMENT_BYTES = 64
# `aligned_empty` buffers from this size on are advised for transparent huge pages (`_huge_page_buffer`).
HUGE_PAGE_MIN_BYTES = 32 * 2**20
# Bytes of one chunk's corpus rows plus its [B, R] scores: small enough to stay in cache (L3),
# large enough that the loop's per-step overhead stays small (docs/index.md, "Lab notes").
CHUNK_BYTES = 8 * 2**20
# XLA copies each dynamically sliced chunk before its dot. For a few users the matmul is bound by
# reading the corpus and that copy costs as much as the matmul, while a [B, N] score row is small
# next to the [N, D] corpus; so up to this batch size and score budget the corpus is scored in one
# piece (no slicing). Crossover measured between B=8 and B=16 (docs/index.md).
MAX_UNCHUNKED_BATCH = 8
UNCHUNKED_SCORE_BYTES = 256 * 2**20
# From this many users a chunked scan scores [R, D] x [D, B] and reduces blocks of W rows over
# [R / W, W, B] instead of [B, R] x ... over [B, R / W, W]: XLA CPU runs it faster (docs/index.md).
# One user keeps the fused multiply-reduce form.
TRANSPOSED_SCAN_MIN_BATCH = 2
# When K is a sizeable fraction of N the block pre-selection saves little, and one top_k over
# the [B, N] scores (within UNCHUNKED_SCORE_BYTES) is faster (docs/index.md).
DIRECT_ROWS_PER_K = 512
# `_drop_hopeless`: the guess at each user's Nb-th best comes from every SAMPLE_STRIDE-th entry and is
# used where at least Nb entries reach it; XLA CPU's top_k (a running best-K heap) costs little per
# entry that cannot enter it and much per entry that does (docs/index.md).
SAMPLE_STRIDE = 16
SAMPLE_MARGIN_SD = 4.0
SAMPLE_MIN_ROWS_PER_K = 8
# Block size W balances top_k over N/W block maxima against gathering Nb * W rows of D floats:
# cost ~ a * N / W + b * K * W * D, minimised at W = sqrt(N / (K * D) * a / b); a / b as measured (docs/index.md).
BLOCK_COST_RATIO = 8.0
MAX_BLOCK_SIZE = 64
# Coarse pass (CorpusIndex): block maxima from a bfloat16 copy of the corpus, half the bytes the
# scan reads. On by default from this many rows (costs N * D * 2 bytes).
COARSE_MIN_ROWS = 2**16
# Rows per step of building the coarse copy (`_build_coarse`).
COPY_CHUNK_ROWS = 2**14
# The coarse scan is always chunked (a chunk widened to float32 as it is copied costs no more than
# the copy): rows per chunk from this many bytes of widened rows plus scores (docs/index.md).
COARSE_CHUNK_BYTES = 16 * 2**20
# Blocks kept beyond Nb: every block within the band of the Nb-th best maximum must be rescored; if
# they do not fit the next pass answers. Each slot costs its rescoring whether used or not. The
# coarse band is ~2^-8 |u| |x| wide (about 1.25 Nb blocks needed at K = 1000 on unit vectors,
# docs/index.md); the float32 band ~2D 2^-24 |u| |x|, so a few slots hold its near-ties.
COARSE_EXTRA_BLOCKS_FRACTION = 0.5
COARSE_MIN_EXTRA_BLOCKS = 128
FLOAT32_EXTRA_BLOCKS_FRACTION = 1 / 16
FLOAT32_MIN_EXTRA_BLOCKS = 16
# A pass whose band holds more blocks than its slots hands them to `_refine` in up to this many
# rounds of `slots` blocks before the next pass takes over (near-ties: duplicated rows, say).
MAX_ROUNDS = 16
# Rows of a user's candidates given the canonical score beyond K (`_refine`): those whose float32
# matmul score lies within the float32 band of the K-th best; more near-ties than this and all the
# user's candidate rows are scored canonically.
ROW_EXTRA_FRACTION = 1 / 16
ROW_EXTRA_MIN = 64
# Bytes of [B, R, D] products per step of the canonical scan (the last-resort pass): the products
# stay in cache.
CANONICAL_CHUNK_BYTES = 2**19
# Which pass answered a search (`CorpusIndex._search`'s third output).
STAGES = ("coarse", "float32", "canonical")
# Shards are padded to a multiple of this many rows so every shard starts 64-byte aligned.
SHARD_ROW_MULTIPLE = 16
# FAISS IVF defaults: nlist = NLIST_PER_SQRT_N * sqrt(N) lists (faiss' guideline is 1-16x);
# k-means trains on at most TRAIN_POINTS_PER_LIST points per list (faiss warns below 39).
NLIST_PER_SQRT_N = 1.0
TRAIN_POINTS_PER_LIST = 64
DEFAULT_NPROBE = 32
FAISS_MISSING = "FaissIndex needs faiss: pip install 'phoenix-recsys[faiss]' (or: uv sync --extra faiss)"

# How many times each jitted search has been traced; tests use it to catch silent recompiles.
TRACE_COUNTS: collections.Counter = collections.Counter()


def exact_scores(user_representation, corpus_embeddings) -> jax.Array:
    """The contract's scores [B, N] of users [B, D] against corpus rows [N, D] (module doc).

    Each entry is `_canonical(u, x)`: float32 products summed by a fixed pairwise tree, a function of
    the user and the row alone. Every exact index returns these values, so brute force over them
    (best first, equal scores in index order) is what `CorpusIndex.search` must equal. Computed in
    chunks of rows (the [B, N] result is the only full-size array).
    """
    _check_corpus(corpus_embeddings)
    check_array(user_representation, "user_representation", (None, corpus_embeddings.shape[1]), "float")
    user = jnp.asarray(user_representation, jnp.float32)  # [B, D]
    corpus = jnp.asarray(corpus_embeddings, jnp.float32)  # [N, D]
    chunk = _canonical_chunk_size(user.shape[0], corpus.shape[0], corpus.shape[1], 1)
    return _exact_scores(user, corpus, chunk_size=chunk)


@functools.partial(jax.jit, static_argnames="chunk_size")
def _exact_scores(user, corpus, *, chunk_size):
    return _block_maxima(user, corpus, None, None, chunk_size=chunk_size, block_size=1, canonical=True)  # [B, N]


def _canonical(user, rows):
    """The canonical score: user [..., D] and rows [..., D] broadcast against each other -> [...].

    Products are rounded to float32 one by one, then added by a fixed tree (pad D to a power of two
    with zeros, then halve: x[:h] + x[h:]), all elementwise, so XLA has no reduction order to pick
    and every element gets the same operations whatever the shape. XLA CPU (and GPU) contract a
    multiply feeding an add into one fused multiply-add (one rounding instead of two), and whether
    they do can differ between a loop's vector body and its remainder; a product's bits therefore
    pass through an AND with a mask computed from those same bits that is all ones for every value
    (b * (b + 1) is even) but that no compiler proves, so no add ever sees a multiply. A mask from a
    jit argument or a per-user value is not enough: constants fold and LLVM hoists a loop-invariant
    mask and versions the loop on it (both tested). Zero scores are +0.0 (a -0.0 would sort apart
    from +0.0 in a total order).
    """
    products = user * rows  # [..., D]
    bits = lax.bitcast_convert_type(products, jnp.uint32)
    bits = bits & (((bits * (bits + 1)) & 1) - 1)  # unchanged: the mask is all ones
    products = lax.bitcast_convert_type(bits, jnp.float32)
    dim = products.shape[-1]
    width = 1 << (dim - 1).bit_length()
    if width > dim:
        products = jnp.pad(products, [(0, 0)] * (products.ndim - 1) + [(0, width - dim)])
    while width > 1:
        width //= 2
        products = products[..., :width] + products[..., width:]  # [..., width]
    scores = products[..., 0]
    return jnp.where(scores == 0, jnp.float32(0), scores)  # -0.0 -> +0.0


def _canonical_chunk_size(batch: int, num_rows: int, dim: int, block_size: int) -> int:
    """Rows per step of the canonical scan: [B, R, D] products within CANONICAL_CHUNK_BYTES, a multiple of W."""
    rows = 2 ** int(math.log2(max(CANONICAL_CHUNK_BYTES // (4 * batch * dim), 1)))
    rows = min(max(rows, block_size), -(-num_rows // block_size) * block_size)
    return -(-rows // block_size) * block_size


def _dot_rounding(dim):
    """g: a float32 dot product of `dim` terms, summed in any order (fused multiply-adds or not),
    is within g * sum |u_i x_i| of the exact value when nothing underflows (`_underflow_term`)."""
    eps = dim * 2.0**-24
    return eps / (1 - eps)


def _underflow_term(user_norm, row_norm, dim):
    """What flushed subnormals can add to a float32 dot product's error (XLA CPU runs with FTZ/DAZ):
    each of the D products and D - 1 sums that lands below TINY loses less than TINY, and a subnormal
    factor read as zero drops |u_i x_i| <= TINY * |other factor|, at most TINY * sqrt(D) (|u| + |x|)."""
    return TINY * (2 * dim + math.sqrt(dim) * (user_norm + row_norm))


def _float32_band(user_norm, max_row_norm, dim):
    """e [B, 1]: a float32 scan score and the canonical score are two evaluations of one dot product,
    each within g |u| |x| + the underflow term of the exact value. inf where scores could overflow."""
    band = BOUND_SAFETY * 2 * (_dot_rounding(dim) * user_norm * max_row_norm
                               + _underflow_term(user_norm, max_row_norm, dim))
    return jnp.where(user_norm * max_row_norm <= SCORE_LIMIT, band, jnp.inf)


def _coarse_band(user_norm, coarse_error, max_row_norm, dim):
    """e [B, 1] for a coarse score c = u . x~ (x~ the bfloat16 row, |x - x~| <= err, |x~| <= norm):
    |c - u . x~| <= g |u| norm, |u . x~ - u . x| <= |u| err (Cauchy-Schwarz), and the canonical score
    is within g |u| |x| <= g |u| norm of u . x; plus both evaluations' underflow terms."""
    error, norm = coarse_error[0], coarse_error[1]
    band = BOUND_SAFETY * (user_norm * (error + _dot_rounding(dim) * (2 * norm + error))
                           + 2 * _underflow_term(user_norm, norm, dim))
    return jnp.where(user_norm * max_row_norm <= SCORE_LIMIT, band, jnp.inf)


def _norm_bound(x):
    """[..., D] -> [...] upper bounds on the rows' 2-norms, computed without overflow or underflow on
    the way (inf only where a norm exceeds float32). Each row is scaled by a power of two above its
    largest magnitude (exact), so its squares sum to at most D; the factor 1 + g + 2^-20 covers the
    sum's and the square root's rounding and squares flushed to zero. Subnormal entries read as zero
    under DAZ are left to `_underflow_term`."""
    largest = jnp.max(jnp.abs(x), axis=-1, keepdims=True)  # [..., 1]
    _, exponent = jnp.frexp(largest)  # largest < 2 ** exponent
    scaled = jnp.ldexp(x, -exponent)  # [..., D], |scaled| < 1
    root = jnp.sqrt(jnp.sum(scaled * scaled, axis=-1))  # [...]
    slack = 1 + _dot_rounding(x.shape[-1]) + 2.0**-20
    return jnp.ldexp(root * jnp.float32(slack), exponent[..., 0])


def aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous NumPy array whose data is 64-byte aligned.

    `jax.device_put` of such a float32 array aliases it on CPU instead of copying, so a corpus
    filled in place here costs its size once, not twice (a plain `np.empty` is only 16-byte
    aligned and `jnp.asarray` always copies). An index built over it makes it read-only (module
    doc). From HUGE_PAGE_MIN_BYTES on (Linux) the memory is a page-aligned anonymous mapping
    advised for transparent huge pages (`_huge_page_buffer`).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes >= HUGE_PAGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        return np.frombuffer(_huge_page_buffer(nbytes), np.uint8).view(dtype).reshape(shape)
    raw = np.empty(nbytes + CPU_ALIGNMENT_BYTES, np.uint8)
    offset = (-raw.ctypes.data) % CPU_ALIGNMENT_BYTES
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _huge_page_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous private memory (page-aligned, zeroed on first touch), advised for transparent huge
    pages: 2 MiB pages where the kernel allows them (`/sys/kernel/mm/transparent_hugepage/enabled`
    says "always" or "madvise"), 4 KiB pages otherwise. A scan streaming through 2 MiB pages, and
    the rescoring's scattered 4 KiB block reads, miss the TLB far less often (docs/index.md).
    Freed when the last array viewing it goes."""
    buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: plain pages
        pass
    return buffer


def auto_block_size(num_rows: int, top_k: int, dim: int) -> int:
    """Power-of-two W minimising top_k over N/W maxima plus the Nb * W * D gather (see module doc)."""
    ideal = math.sqrt(BLOCK_COST_RATIO * num_rows / (top_k * dim))
    block = 2 ** max(0, round(math.log2(max(ideal, 1.0))))
    return int(min(block, MAX_BLOCK_SIZE, 2 ** int(math.log2(num_rows))))


def auto_chunk_size(batch: int, num_rows: int, dim: int, block_size: int, coarse: bool = False) -> int:
    """Rows per chunk: all N for a few users (see MAX_UNCHUNKED_BATCH), else chunk rows plus
    [B, R] scores fill CHUNK_BYTES (COARSE_CHUNK_BYTES, and never all N, for the coarse pass);
    a multiple of W."""
    if not coarse and batch <= MAX_UNCHUNKED_BATCH and 4 * batch * num_rows <= UNCHUNKED_SCORE_BYTES:
        return -(-num_rows // block_size) * block_size
    rows = (COARSE_CHUNK_BYTES if coarse else CHUNK_BYTES) // (4 * (dim + batch))
    rows = 2 ** int(math.log2(max(rows, 1)))
    return max(rows, block_size)


def _plan(num_rows, dim, batch, top_k, chunk_size, block_size, coarse=False) -> tuple[int, int]:
    """(R, W): given or automatic sizes, W <= N and R a multiple of W. (N, 1) means direct.
    coarse: R for the coarse scan (`auto_chunk_size`)."""
    direct = num_rows <= DIRECT_ROWS_PER_K * top_k and 4 * batch * num_rows <= UNCHUNKED_SCORE_BYTES
    if chunk_size is None and block_size is None and direct:
        return num_rows, 1
    block = min(block_size or auto_block_size(num_rows, top_k, dim), num_rows)
    chunk = chunk_size or auto_chunk_size(batch, num_rows, dim, block, coarse)
    return -(-chunk // block) * block, block


def _check_finite_device(corpus: jax.Array) -> jax.Array:
    """Rejects NaN/inf rows with a pointer to the first one; fused reductions, no [N, D] temporary.
    Only scalars come back to the host, so this also works on a corpus sharded across hosts.
    Returns an upper bound on the largest row norm (a device scalar, `_norm_bound`)."""
    num_bad, first_bad, max_norm = _rows_finite(corpus)  # [] each
    num_bad = int(num_bad)
    if num_bad:
        raise ValueError(f"corpus_embeddings: expected finite values, got NaN or inf in {num_bad} rows "
                         f"(first: row {int(first_bad)})")
    return max_norm


@jax.jit
def _rows_finite(corpus):
    """(rows with NaN/inf, the first of them, `_norm_bound`'s largest row): one program per corpus
    shape (counting and locating the bad rows eagerly compiled two more)."""
    # x * 0 is NaN exactly for NaN and +-inf, and a sum keeps any NaN (IEEE), so this row sum is
    # finite iff the row is. A float sum fuses with its input; isfinite(corpus).all(1)
    # materialised an [N, D] bool (1.3 GB at N = 10M), and XNNPACK's max drops NaNs.
    row_ok = jnp.isfinite(jnp.sum(corpus * 0.0, axis=1))  # [N]
    return jnp.sum(~row_ok), jnp.argmin(row_ok), jnp.max(_norm_bound(corpus))


def _check_corpus(corpus_embeddings) -> None:
    check_array(corpus_embeddings, "corpus_embeddings", (None, None), "float")
    num_rows, dim = corpus_embeddings.shape
    if num_rows == 0 or dim == 0:
        raise ValueError(f"corpus_embeddings: expected a non-empty [N, D] array, got shape "
                         f"{tuple(corpus_embeddings.shape)}")


def _check_post_ids(corpus_post_ids, num_rows: int) -> Optional[np.ndarray]:
    if corpus_post_ids is None:
        return None  # ids are the indices; no [N] table to hold
    ids = np.asarray(corpus_post_ids)
    if ids.shape != (num_rows,):
        raise ValueError(f"corpus_post_ids: expected shape ({num_rows},) to match corpus_embeddings, "
                         f"got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):  # post_ids maps missing results to -1
        raise TypeError(f"corpus_post_ids: expected integer dtype, got dtype {ids.dtype}")
    return ids


def _check_positive(value, name: str) -> Optional[int]:
    """None, or an int >= 1: Python or NumPy ints; bool (an int subclass) and floats are refused."""
    if value is None:
        return None
    check_number(value, name, "a positive int", lambda v: v >= 1, integer=True)
    return int(value)


def _check_query_values(user_representation, max_row_norm: float) -> None:
    """A NaN/inf user would score every entry NaN (exact indexes) or find nothing (FAISS: -1), and
    one with |u| * max_row_norm above SCORE_LIMIT could overflow float32 (inf or NaN scores, no
    valid error band): both are refused, naming the first offending row.

    Not validation.check_finite: this checks after the float32 cast the search applies (a float64
    1e39 is inf there). The [B, D] users come to the host (small; one sync). Skipped under
    PHOENIX_VALIDATE_VALUES=0 and when traced (inside the caller's jit).
    """
    if not values_enabled() or isinstance(user_representation, jax.core.Tracer):
        return
    with np.errstate(over="ignore"):  # overflowing the cast is what we are looking for
        user = np.asarray(np.asarray(user_representation).astype(np.float32), np.float64)  # [B, D]
    row_ok = np.isfinite(user).all(axis=1)  # [B]
    if not row_ok.all():
        raise ValueError(f"user_representation: expected finite values, got NaN or inf in "
                         f"{int((~row_ok).sum())} rows (first: row {int(np.argmin(row_ok))})")
    norms = np.linalg.norm(user, axis=1)  # [B], float64: no overflow
    with np.errstate(invalid="ignore"):  # 0 * inf: a zero user scores 0 against any row
        too_large = np.where(norms > 0, norms * max_row_norm, 0.0) > SCORE_LIMIT
    if too_large.any():
        row = int(np.argmax(too_large))
        raise ValueError(f"user_representation: expected |u| * (largest corpus row norm) <= {SCORE_LIMIT:.4g} "
                         f"so that no score can overflow float32, got {norms[row] * max_row_norm:.4g} in row {row} "
                         f"(|u| = {norms[row]:.4g}, largest corpus row norm {max_row_norm:.4g}); scale the "
                         f"embeddings down")


def _freeze(host: np.ndarray, given) -> None:
    """Makes the float32 array an index reads in place read-only, with every ndarray its data is a
    view of (`.base` chain) and the caller's array when it shares that memory: a write through any
    of them then raises instead of changing what the index reads."""
    arrays = [host, given] if isinstance(given, np.ndarray) and np.shares_memory(given, host) else [host]
    for array in arrays:
        while isinstance(array, np.ndarray):
            array.flags.writeable = False
            array = array.base


def _reads_host_memory(array: jax.Array, host: np.ndarray) -> bool:
    """Whether a device array is backed by (aliases) the memory of a host array (CPU only)."""
    start = host.ctypes.data
    for shard in array.addressable_shards:
        if shard.device.platform == "cpu" and start <= shard.data.unsafe_buffer_pointer() < start + host.nbytes:
            return True
    return False


def _to_device_corpus(corpus_embeddings, device=None) -> jax.Array:
    """float32 device array; a 64-byte-aligned float32 NumPy corpus is aliased on CPU, not copied,
    and then made read-only (`_freeze`)."""
    if isinstance(corpus_embeddings, jax.Array):
        corpus = corpus_embeddings.astype(jnp.float32)  # no-op (no copy) when already float32
        return corpus if device is None else jax.device_put(corpus, device)
    host = np.ascontiguousarray(corpus_embeddings, dtype=np.float32)
    corpus = jax.device_put(host, device, may_alias=True)
    if _reads_host_memory(corpus, host):
        _freeze(host, corpus_embeddings)
    return corpus


class _Index:
    """What all indexes share: sizes, argument checks, and the index -> post id map."""

    num_rows: int
    dim: int
    corpus_post_ids: Optional[np.ndarray]
    _max_row_norm: float  # host copy of the bound on the largest row norm, for the query check

    def _check_query(self, user_representation, top_k, corpus_mask):
        check_array(user_representation, "user_representation", (None, self.dim), "float")
        if user_representation.shape[0] == 0:
            raise ValueError(f"user_representation: expected at least one user, got shape "
                             f"{tuple(user_representation.shape)}")
        top_k = check_top_k(top_k, self.num_rows, "corpus entries")
        if corpus_mask is not None:
            check_array(corpus_mask, "corpus_mask", (self.num_rows,), "bool")
        _check_query_values(user_representation, self._max_row_norm)
        return top_k

    def post_ids(self, indices) -> np.ndarray:
        """Maps corpus indices [B, K] to `corpus_post_ids` [B, K] (host NumPy); index -1 maps to -1."""
        indices = np.asarray(indices)
        if not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"indices: expected integer corpus indices, got dtype {indices.dtype}")
        if indices.size and (indices.min() < -1 or indices.max() >= self.num_rows):
            # NumPy would wrap -2 to the last row; -1 is FaissIndex's "no result".
            raise ValueError(f"indices: expected corpus indices in [-1, {self.num_rows}), got range "
                             f"[{indices.min()}, {indices.max()}]")
        if self.corpus_post_ids is None:
            return indices
        ids = self.corpus_post_ids[np.maximum(indices, 0)]
        return np.where(indices < 0, -1, ids) if (indices < 0).any() else ids


class CorpusIndex(_Index):
    """Exact top-k over a fixed corpus on one device, in bounded memory (contract: module doc).

    Args:
      corpus_embeddings: [N, D] float (cast to float32), finite, N >= 1. A 64-byte-aligned float32
        NumPy array (see `aligned_empty`) is used in place on CPU, not copied, and made read-only
        together with the arrays it is a view of: writing to it afterwards raises (views made
        before the index was built keep their own write access: do not write through them). A
        jax.Array is used in place (JAX arrays are immutable). Other inputs are copied once.
      corpus_post_ids: [N] ids returned by `post_ids`; None means ids = indices.
      chunk_size: corpus rows scored per loop step (rounded up to a multiple of the block size);
        None picks one per batch size (`auto_chunk_size`).
      block_size: rows per block of the block-max pre-selection; None picks one per (N, K, D)
        (`auto_block_size`). Any value gives the same result; it only changes speed.
      device: where the corpus lives; None = JAX's default device.
      coarse: keep a bfloat16 copy [N, D] (N * D * 2 bytes) for a coarse first pass (module doc);
        results are unchanged. None = on from COARSE_MIN_ROWS rows.
    """

    def __init__(self, corpus_embeddings, corpus_post_ids=None, *, chunk_size: Optional[int] = None,
                 block_size: Optional[int] = None, device=None, coarse: Optional[bool] = None):
        _check_corpus(corpus_embeddings)
        self.num_rows, self.dim = (int(s) for s in corpus_embeddings.shape)
        self.corpus_post_ids = _check_post_ids(corpus_post_ids, self.num_rows)
        self.chunk_size = _check_positive(chunk_size, "chunk_size")
        self.block_size = _check_positive(block_size, "block_size")
        if coarse is not None and not isinstance(coarse, bool):
            raise TypeError(f"coarse: expected None, True or False, got {coarse!r}")
        self.corpus_embeddings = _to_device_corpus(corpus_embeddings, device)  # [N, D]
        self.max_row_norm = _check_finite_device(self.corpus_embeddings)  # [] device scalar
        self._max_row_norm = float(self.max_row_norm)
        self.coarse = self.num_rows >= COARSE_MIN_ROWS if coarse is None else coarse
        self.coarse_embeddings = self.coarse_error = None
        if self.coarse:  # [N, D] bfloat16 bits (uint16) and its error bound (scalars), see _coarse_band
            self.coarse_embeddings, self.coarse_error = _build_coarse(self.corpus_embeddings, self.max_row_norm)

    def plan(self, batch: int, top_k: int) -> tuple[int, int]:
        """(chunk rows R, block rows W) a search of B users for the top K uses; static under jit."""
        return _plan(self.num_rows, self.dim, batch, top_k, self.chunk_size, self.block_size, coarse=self.coarse)

    def search(self, user_representation, top_k: int, corpus_mask=None, *, approx_recall: Optional[float] = None):
        """Exact top-k -> (top_k_indices [B, K] int32, top_k_scores [B, K] f32): brute force over
        `exact_scores(user, corpus)` (module doc).

        Best first; equal scores in corpus-index order. Masked entries score -INF, so when
        `top_k` exceeds the number of valid entries the tail is filled with masked entries (in
        index order) scored -INF, exactly as brute force does. One compile per (B, K, mask or
        not); no host sync (results are not blocked on).

        approx_recall: instead of the exact search, `lax.approx_max_k` over float32 matmul scores
        with this recall target in (0, 1]: approximate on TPU (its aggregate-to-top-k kernel), while
        XLA on CPU and GPU has no approximate kernel and takes the exact top-k of those scores. Either
        way the entries it picks are returned with their `exact_scores` values, re-sorted best first
        with ties in index order; which entries is up to the approximate pass.
        """
        if approx_recall is not None:
            top_k = self._check_query(user_representation, top_k, corpus_mask)
            check_number(approx_recall, "approx_recall", "a float in (0, 1]", lambda v: 0 < v <= 1)
            user = jnp.asarray(user_representation, jnp.float32)  # [B, D]
            mask = None if corpus_mask is None else jnp.asarray(corpus_mask)  # [N]
            return _approx_top_k(user, self.corpus_embeddings, mask, top_k=top_k, recall=float(approx_recall))
        indices, scores, _ = self._search(user_representation, top_k, corpus_mask)
        return indices, scores

    def _search(self, user_representation, top_k, corpus_mask=None):
        """`search` plus which pass answered (index into STAGES, a device scalar)."""
        top_k = self._check_query(user_representation, top_k, corpus_mask)
        user = jnp.asarray(user_representation, jnp.float32)  # [B, D]
        mask = None if corpus_mask is None else jnp.asarray(corpus_mask)  # [N]
        batch = user_representation.shape[0]
        chunk, block = self.plan(batch, top_k)
        coarse = self.coarse and block > 1
        # The float32 scan's own plan, for when the coarse pass's blocks do not fit.
        float32_chunk = _plan(self.num_rows, self.dim, batch, top_k, self.chunk_size, block)[0] if coarse else chunk
        return _exact_top_k(user, self.corpus_embeddings, mask, self.max_row_norm,
                            self.coarse_embeddings if coarse else None, self.coarse_error if coarse else None,
                            top_k=top_k, chunk_size=chunk, block_size=block, float32_chunk_size=float32_chunk)


def _round_rows(rows):
    """[r, D] float32 -> ([r, D] uint16 bfloat16 bit patterns, [] bound on the largest row norm of the
    rounding error). The float32 bits are rounded to their top 16 to nearest, ties to even, as
    the bfloat16 cast rounds (bit for bit, tested; the corpus is finite): a bfloat16 array
    bitcast to uint16 costs XLA CPU a copy."""
    bits = lax.bitcast_convert_type(rows, jnp.uint32)
    coarse = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(jnp.uint16)
    return coarse, jnp.max(_norm_bound(rows - _widen(coarse)))


_round_rows_jit = jax.jit(_round_rows)


def _build_coarse(corpus, max_row_norm):
    """The coarse copy [N, D] (module doc) and (a bound on the row norms of its rounding error, a
    bound on its row norms: the corpus's `max_row_norm` plus that error).

    Built COPY_CHUNK_ROWS rows at a time: on the whole array XLA CPU materialised a bfloat16
    array's bitcast and the widened copy the error reduction reads (peak +N * D * 6 bytes; in
    chunks +N * D * 2). On a CPU device the chunks are written into a host buffer on huge pages
    (`aligned_empty`) that the device array then aliases; elsewhere a jitted loop builds it on
    the device."""
    device = next(iter(corpus.devices()))
    if device.platform != "cpu":
        return _coarse_copy(corpus, max_row_norm)
    host = np.asarray(corpus)  # [N, D], a view of the CPU buffer
    out = aligned_empty(corpus.shape, np.uint16)  # [N, D]
    errors = []
    for start in range(0, corpus.shape[0], COPY_CHUNK_ROWS):
        coarse, error = _round_rows_jit(host[start:start + COPY_CHUNK_ROWS])
        out[start:start + COPY_CHUNK_ROWS] = np.asarray(coarse)
        errors.append(error)
    error = jnp.max(jnp.stack(errors))
    return jax.device_put(out, device, may_alias=True), jnp.stack([error, max_row_norm + error])


@jax.jit
def _coarse_copy(corpus, max_row_norm):
    """`_build_coarse` on the device: a loop over chunks of COPY_CHUNK_ROWS rows."""
    n = corpus.shape[0]
    R = min(COPY_CHUNK_ROWS, n)
    num_chunks, tail = divmod(n, R)

    def body(g, carry):
        out, error = carry
        coarse, chunk_error = _round_rows(lax.dynamic_slice_in_dim(corpus, g * R, R))
        return lax.dynamic_update_slice_in_dim(out, coarse, g * R, axis=0), jnp.maximum(error, chunk_error)

    out = jnp.zeros(corpus.shape, jnp.uint16)  # [N, D]
    out, error = lax.fori_loop(0, num_chunks, body, (out, jnp.float32(0)))
    if tail:
        coarse, tail_error = _round_rows(corpus[num_chunks * R:])
        out, error = out.at[num_chunks * R:].set(coarse), jnp.maximum(error, tail_error)
    return out, jnp.stack([error, max_row_norm + error])


def _widen(rows):
    """float32 rows from float32 rows or from bfloat16 bit patterns (uint16): bfloat16 is the top
    half of a float32, so the bits shifted up are the exact value."""
    if rows.dtype == jnp.uint16:
        return lax.bitcast_convert_type(rows.astype(jnp.uint32) << 16, jnp.float32)
    return rows.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("top_k", "recall"))
def _approx_top_k(user, corpus, mask, *, top_k, recall):
    TRACE_COUNTS["approx"] += 1
    scores = jnp.matmul(user, corpus.T, precision=SCORE_PRECISION)  # [B, N]
    scores = _mask_scores(scores, None, mask, None)
    _, indices = lax.approx_max_k(scores, top_k, recall_target=recall)  # [B, K]
    exact = _canonical(user[:, None, :], corpus[indices])  # [B, K]
    exact = _mask_scores(exact, None, None if mask is None else mask[indices], None)
    # Best first, equal scores in index order: sort by (-score, index).
    _, indices, exact = lax.sort((-exact, indices.astype(jnp.int32), exact), dimension=1, num_keys=2)
    return indices, exact


@functools.partial(jax.jit, static_argnames=("top_k", "chunk_size", "block_size", "float32_chunk_size"))
def _exact_top_k(user, corpus, mask, max_row_norm, coarse, coarse_error, *, top_k, chunk_size, block_size,
                 float32_chunk_size):
    TRACE_COUNTS["exact"] += 1
    (indices, scores), stage = _local_top_k(user, corpus, mask, None, max_row_norm, coarse, coarse_error,
                                            top_k=top_k, chunk_size=chunk_size, block_size=block_size,
                                            float32_chunk_size=float32_chunk_size)
    return indices, scores, stage


def _mask_scores(scores, row_ids, mask_rows, num_valid):
    """Masked entries -> -INF, rows at or past `num_valid` (padding) -> PAD_SCORE."""
    if mask_rows is not None:
        scores = jnp.where(mask_rows, scores, -INF)
    if num_valid is not None:
        scores = jnp.where(row_ids < num_valid, scores, PAD_SCORE)
    return scores


def _local_top_k(user, corpus, mask, num_valid, max_row_norm, coarse=None, coarse_error=None, *, top_k,
                 chunk_size, block_size, float32_chunk_size=None):
    """Exact top-k over `corpus` [Nl, D] (module doc) -> ((indices [B, K'], scores [B, K']), stage).

    K' = min(top_k, n); scores are `exact_scores`'. Rows >= `num_valid` (a traced scalar, or None =
    all rows) are padding. max_row_norm: a scalar >= the largest row norm of `corpus`. coarse,
    coarse_error: the coarse copy and its error bound, or None (no coarse pass). chunk_size: R of
    the first pass; float32_chunk_size: R of the float32 scan when the coarse pass comes first.
    stage: index into STAGES of the pass that chose the rescored blocks.

    The passes only choose blocks ([B, capacity] in index order, which are used, and the row cut);
    one `_refine` then rescores them in rounds of `slots`, whichever pass chose them (one copy of it
    to compile).
    """
    if block_size == 1:
        return _row_top_k(user, corpus, mask, num_valid, max_row_norm, top_k=top_k, chunk_size=chunk_size)
    n, dim = corpus.shape
    batch = user.shape[0]
    W = block_size
    num_blocks = -(-n // W)
    Nb = min(top_k, num_blocks)
    extra = (COARSE_MIN_EXTRA_BLOCKS, COARSE_EXTRA_BLOCKS_FRACTION) if coarse is not None else (
        FLOAT32_MIN_EXTRA_BLOCKS, FLOAT32_EXTRA_BLOCKS_FRACTION)
    slots = min(num_blocks, Nb + max(extra[0], int(extra[1] * Nb)))  # blocks rescored per round
    capacity = min(num_blocks, MAX_ROUNDS * slots)  # blocks a pass may hand over, in rounds of `slots`
    user_norm = _norm_bound(user)[:, None]  # [B, 1]
    row_band = _float32_band(user_norm, max_row_norm, dim)[:, 0]  # [B]: rescoring, matmul vs canonical
    select = functools.partial(_select_blocks, top_k=top_k, slots=slots, capacity=capacity)

    def canonical_pass():
        # Exact block maxima: the Nb best blocks (ties to the lower block index, as top_k orders
        # them) hold the top K (module doc), no band needed. Each has a row scoring its maximum, so
        # rows below the lowest kept maximum are beaten by K others.
        R = _canonical_chunk_size(batch, n, dim, W)
        block_max = _block_maxima(user, corpus, mask, num_valid, chunk_size=R, block_size=W, canonical=True)
        kept_max, blocks = lax.top_k(block_max, Nb)  # [B, Nb]
        pad = ((0, 0), (0, capacity - Nb))
        blocks = jnp.pad(jnp.sort(blocks, axis=1), pad)  # [B, capacity], index order, unused slots last
        kept = jnp.pad(jnp.ones(blocks.shape[:1] + (Nb,), jnp.bool_), pad)
        cut = jnp.min(kept_max, axis=1) if Nb == top_k else jnp.full((batch,), PAD_SCORE, jnp.float32)  # [B]
        return blocks, kept, cut, STAGES.index("canonical")

    def float32_pass():
        block_max = _block_maxima(user, corpus, mask, num_valid, chunk_size=float32_chunk_size or chunk_size,
                                  block_size=W)  # [B, Nl / W]
        *chosen, fits = select(block_max, _float32_band(user_norm, max_row_norm, dim))
        return lax.cond(fits, lambda: (*chosen, STAGES.index("float32")), canonical_pass)

    if coarse is None:
        blocks, kept, cut, stage = float32_pass()
    else:
        block_max = _block_maxima(user, coarse, mask, num_valid, chunk_size=chunk_size, block_size=W)  # [B, Nl / W]
        *chosen, fits = select(block_max, _coarse_band(user_norm, coarse_error, max_row_norm, dim))
        blocks, kept, cut, stage = lax.cond(fits, lambda: (*chosen, STAGES.index("coarse")), float32_pass)
    return _refine_in_rounds(user, corpus, blocks, kept, cut, mask, num_valid, row_band, top_k=top_k,
                             block_size=W, slots=slots), stage


def _refine_in_rounds(user, corpus, blocks, kept, cut, mask, num_valid, row_band, *, top_k, block_size, slots):
    """`_refine` of the kept blocks [B, capacity] (index order, unused last), `slots` blocks per round:
    each round's top K is exact for its rows, and merging them by (score desc, index asc) gives the
    exact top K of all. One round unless a pass kept more than `slots` blocks (near-ties)."""
    K = min(top_k, corpus.shape[0])
    rounds = (jnp.max(jnp.sum(kept, axis=1)) + slots - 1) // slots  # [] >= 1: the top Nb are kept
    pad = ((0, 0), (0, -blocks.shape[1] % slots))  # whole rounds: a clamped slice would repeat blocks
    blocks, kept = jnp.pad(blocks, pad), jnp.pad(kept, pad)

    def one_round(r, best):
        part = functools.partial(lax.dynamic_slice_in_dim, start_index=r * slots, slice_size=slots, axis=1)
        found = _refine(user, corpus, part(blocks), mask, num_valid, row_band, top_k=top_k, block_size=block_size,
                        kept=part(kept), cut=cut)  # [B, K] each

        def merge():
            indices, scores = (jnp.concatenate(pair, axis=1) for pair in zip(best, found))  # [B, 2K]
            _, indices, scores = lax.sort((-scores, indices, scores), dimension=1, num_keys=2)
            return indices[:, :K], scores[:, :K]

        return lax.cond(r == 0, lambda: found, merge)

    empty = (jnp.zeros((user.shape[0], K), jnp.int32), jnp.full((user.shape[0], K), PAD_SCORE, jnp.float32))
    return lax.fori_loop(0, jnp.maximum(rounds, 1), one_round, empty)


def _row_top_k(user, corpus, mask, num_valid, max_row_norm, *, top_k, chunk_size):
    """`_local_top_k` with W = 1 (the direct plan): float32 matmul scores [B, Nl], and the band argument
    of `_select_blocks` over rows. The top K plus a few rows (ROW_EXTRA_*) by those scores are
    gathered and given the canonical score; if more rows lie within 2e of the K-th score, or the band
    is not a number, or K plus the extra rows reach N, the canonical scores of every row (in chunks)
    answer instead, and `top_k` over them orders ties by index."""
    n, dim = corpus.shape
    K = min(top_k, n)
    S = K + max(ROW_EXTRA_MIN, int(ROW_EXTRA_FRACTION * K))  # rows given the canonical score

    def canonical_pass():
        R = _canonical_chunk_size(user.shape[0], n, dim, 1)
        exact = _block_maxima(user, corpus, mask, num_valid, chunk_size=R, block_size=1, canonical=True)  # [B, Nl]
        top_scores, top_rows = lax.top_k(exact, K)  # [B, K]
        return (top_rows.astype(jnp.int32), top_scores), STAGES.index("canonical")

    if S >= n:
        return canonical_pass()
    band = _float32_band(_norm_bound(user)[:, None], max_row_norm, dim)  # [B, 1]
    approx = _block_maxima(user, corpus, mask, num_valid, chunk_size=chunk_size, block_size=1)  # [B, Nl]
    top_approx, rows = lax.top_k(approx, S)  # [B, S]
    lowest = jnp.min(jnp.where(jnp.arange(S) < K, top_approx, jnp.inf), axis=1, keepdims=True)  # [B, 1] = L
    needed = top_approx >= lowest - 2 * band  # [B, S]
    fits = jnp.all(jnp.isfinite(band)) & jnp.all(jnp.sum(needed, axis=1) < S)

    def near_rows():
        scores = _canonical(user[:, None, :], corpus[rows])  # [B, S]
        scores = _mask_scores(scores, rows, None if mask is None else mask[rows], num_valid)
        scores = jnp.where(needed, scores, PAD_SCORE)
        _, rows_sorted, scores = lax.sort((-scores, rows, scores), dimension=1, num_keys=2)  # ties by index
        return (rows_sorted[:, :K].astype(jnp.int32), scores[:, :K]), STAGES.index("float32")

    return lax.cond(fits, near_rows, canonical_pass)


def _select_blocks(block_max, band, *, top_k, slots, capacity):
    """The blocks that can hold a top-k row, from block maxima [B, Nl / W] each within `band` [B, 1] of
    its block's canonical maximum (module doc, step 2) -> (blocks [B, capacity] in index order, kept
    [B, capacity] (False: unused, pointed at block 0), cut [B], whether they fit).

    Let a_b be block b's approximate maximum and t_b its canonical one, |a_b - t_b| <= e. With L the
    Nb-th largest a_b, Nb blocks have t_b >= L - e, so (Nb = K) the K-th best score is >= L - e; a
    block holding a top-K row (ties at the K-th included) has t_b >= L - e, hence a_b >= L - 2e. The
    blocks with a_b >= L - 2e are kept; rows scoring below the cut L - e are beaten by K others.
    Usually they are among the best `slots` (one round of `_refine`); near-ties can make them more,
    and then all are taken from the maxima (a second top_k, by index) if there are at most
    `capacity`. They do not fit beyond that, or where the band is not a number. Masked rows and
    padding score the same in every pass, so they cost no band.
    """
    num_blocks = block_max.shape[1]
    Nb = min(top_k, num_blocks)
    dropped = _drop_hopeless(block_max, Nb, margin=2 * band)  # [B, Nl / W]
    # The best `slots` blocks, best first; blocks 2e below a verified guess at the Nb-th set aside first.
    top_max, top_blocks = lax.top_k(dropped, slots)  # [B, slots]
    # L as a min over top_k's whole output (XLA CPU keeps its fast top-k kernel only then).
    lowest = jnp.min(jnp.where(jnp.arange(slots) < Nb, top_max, jnp.inf), axis=1, keepdims=True)  # [B, 1] = L
    needed = top_max >= lowest - 2 * band  # [B, slots], the top Nb included
    # All needed blocks are among the slots when the last slot is not needed (or all blocks are
    # slots), and the band is a number (inf where scores could overflow float32: `_float32_band`).
    in_slots = jnp.all(jnp.isfinite(band)) & ((slots == num_blocks) | jnp.all(jnp.sum(needed, axis=1) < slots))
    cut = (lowest - band)[:, 0] if Nb == top_k else jnp.full(block_max.shape[:1], PAD_SCORE, jnp.float32)  # [B]

    def from_slots():  # the needed blocks in index order, unused slots last
        order = jnp.sort(jnp.where(needed, top_blocks, num_blocks), axis=1)  # [B, slots]
        order = jnp.pad(order, ((0, 0), (0, capacity - slots)), constant_values=num_blocks)  # [B, capacity]
        return order, in_slots

    def from_all():  # every needed block, the lowest indices first (num_blocks - index, largest first)
        needed_all = dropped >= lowest - 2 * band  # [B, Nl / W]
        rank = jnp.where(needed_all, num_blocks - jnp.arange(num_blocks), 0)  # [B, Nl / W]
        order = num_blocks - lax.top_k(rank, capacity)[0]  # [B, capacity]; num_blocks where unused
        fits = jnp.all(jnp.isfinite(band)) & jnp.all(jnp.sum(needed_all, axis=1) <= capacity)
        return order, fits

    order, fits = from_slots() if slots == capacity else lax.cond(in_slots, from_slots, from_all)
    kept = order < num_blocks  # [B, capacity]
    return jnp.where(kept, order, 0), kept, cut, fits


def _drop_hopeless(x, k, margin=None):
    """x [B, Nl / W] (block maxima) with entries that cannot be among their row's k largest set to PAD_SCORE.

    margin: None, or [B, 1] >= 0: keep also the entries within `margin` of the k-th largest.

    A guess at each row's k-th largest comes from a strided sample: its m-th largest, m = k / s +
    SAMPLE_MARGIN_SD * sqrt(k / s) + 1 for stride s (in random order about s * m entries reach it,
    and fewer than k only SAMPLE_MARGIN_SD standard deviations out). Where at least k entries
    reach the guess, the k-th largest is >= it, so every entry below it is beaten by k others
    and goes; elsewhere the row is left as is. Entries kept keep their values and order and the
    dropped ones sink below them, so top_k picks the same k entries (ties included). Costs a
    sample top_k and two passes over x (the count, the drop).
    """
    B, n = x.shape
    num_sampled = -(-n // SAMPLE_STRIDE)
    k_sampled = math.ceil(k / SAMPLE_STRIDE + SAMPLE_MARGIN_SD * math.sqrt(k / SAMPLE_STRIDE)) + 1
    if n < SAMPLE_MIN_ROWS_PER_K * k or k_sampled > num_sampled:  # too few entries for it to pay
        return x
    # The guess as a min over top_k's whole output (XLA CPU keeps its fast kernel only then).
    guess = jnp.min(lax.top_k(x[:, ::SAMPLE_STRIDE], k_sampled)[0], axis=1, keepdims=True)  # [B, 1]
    enough = jnp.sum(x >= guess, axis=1, keepdims=True) >= k  # [B, 1]: guess <= the k-th largest
    lower = jnp.where(enough, guess if margin is None else guess - margin, PAD_SCORE)  # [B, 1]
    return jnp.where(x >= lower, x, PAD_SCORE)


def _block_maxima(user, corpus, mask, num_valid, *, chunk_size, block_size, canonical=False):
    """Step 1: max score of every block of W rows, [B, ceil(Nl / W)], scanning R rows at a time.

    `corpus` may be the coarse copy (bfloat16 bits): each chunk is widened to float32 as it is scored.
    canonical: score with `_canonical` (exact maxima) instead of a float32 matmul.
    """
    B = user.shape[0]
    n = corpus.shape[0]
    R, W = chunk_size, block_size
    num_chunks, tail = divmod(n, R) if R < n else (0, n)  # one piece: a static, copy-free slice
    num_blocks = -(-n // W)

    # Chunked scans of several users score `chunk @ user.T` and take block maxima over the rows
    # axis of [rows / W, W, B] (TRANSPOSED_SCAN_MIN_BATCH); one piece keeps `user @ chunk.T`.
    transposed = B >= TRANSPOSED_SCAN_MIN_BATCH and R < n and not canonical

    def chunk_block_max(start, rows, chunk, mask_rows):
        row_ids = start + jnp.arange(rows)  # [rows]
        pad = -rows % W  # only the tail chunk can be ragged (R % W == 0)
        if transposed:
            scores = jnp.matmul(_widen(chunk), user.T, precision=SCORE_PRECISION)  # [rows, B]
            scores = _mask_scores(scores, row_ids[:, None], None if mask_rows is None else mask_rows[:, None],
                                  num_valid)
            scores = jnp.pad(scores, ((0, pad), (0, 0)), constant_values=PAD_SCORE)  # [rows + pad, B]
            return scores.reshape(-1, W, B).max(axis=1).T  # [B, ceil(rows / W)]
        if canonical:
            scores = _canonical(user[:, None, :], _widen(chunk)[None])  # [B, rows]
        else:
            # `user @ chunk.T`, not einsum("bd,rd->br"): for B=1 XLA CPU turns this form into a fused
            # multiply-reduce that reads the corpus in place, faster than the GEMV call (docs/index.md).
            scores = jnp.matmul(user, _widen(chunk).T, precision=SCORE_PRECISION)  # [B, rows]
        scores = _mask_scores(scores, row_ids, mask_rows, num_valid)
        scores = jnp.pad(scores, ((0, 0), (0, pad)), constant_values=PAD_SCORE)  # [B, rows + pad]
        return scores.reshape(B, -1, W).max(axis=-1)  # [B, ceil(rows / W)]

    def body(g, block_max):
        start = g * R
        chunk = lax.dynamic_slice_in_dim(corpus, start, R)  # [R, D]
        mask_rows = None if mask is None else lax.dynamic_slice_in_dim(mask, start, R)  # [R]
        new = chunk_block_max(start, R, chunk, mask_rows)  # [B, R / W]
        return lax.dynamic_update_slice_in_dim(block_max, new, g * (R // W), axis=1)

    block_max = jnp.full((B, num_blocks), PAD_SCORE, jnp.float32)  # [B, N / W]
    if num_chunks:
        block_max = lax.fori_loop(0, num_chunks, body, block_max)
    if tail:
        start = num_chunks * R
        mask_rows = None if mask is None else mask[start:]
        new = chunk_block_max(start, tail, corpus[start:], mask_rows)  # [B, ceil(tail / W)]
        block_max = lax.dynamic_update_slice_in_dim(block_max, new, start // W, axis=1)
    return block_max


def _refine(user, corpus, blocks, mask, num_valid, row_band, *, top_k, block_size, kept=None, cut=None):
    """Steps 2-3: the top K of the rows of the kept blocks [B, Nb] by their canonical scores.

    kept: None, or [B, Nb] bool for blocks already in index order whose False entries are unused
    slots (their rows score PAD_SCORE).
    cut: None, or [B] scores such that at least K rescored rows of user b reach cut[b]; rows below
    it cannot be in the top K (see `_select_blocks`).
    row_band: [B] bound on |float32 matmul score - canonical score| (`_float32_band`).

    Per user, the rows are scored with a float32 matmul first, and the band argument of
    `_select_blocks` runs again over rows (W = 1): with L the K-th best matmul score, only rows
    scoring >= L - 2 * band can be in the top K, and only those (K plus a few, ROW_EXTRA_*) get the
    canonical score, sorted by (score desc, index asc). The canonical score costs several times
    a matmul's arithmetic (`_canonical`), so this keeps it off the ~Nb * W rows. Where more rows
    lie in the band (near-ties) or the band is not a number, that user's rows are all scored
    canonically (`lax.cond` per user).
    """
    n = corpus.shape[0]
    W, Nb = block_size, blocks.shape[1]
    M, K = Nb * W, min(top_k, n)
    S = min(M, K + max(ROW_EXTRA_MIN, int(ROW_EXTRA_FRACTION * K)))  # rows given the canonical score
    if kept is None:
        blocks = jnp.sort(blocks, axis=1)  # index order, so the stable top_k below breaks ties by index
        kept = jnp.ones(blocks.shape, jnp.bool_)
    if cut is None:
        cut = jnp.full(blocks.shape[:1], PAD_SCORE, jnp.float32)  # [B]: cuts nothing

    def refine(args):
        # One user at a time keeps the Nb * W gathered rows in cache (a [B, Nb, W, D] gather
        # spills to DRAM, docs/index.md).
        user_b, blocks_b, kept_b, cut_b, band_b = args  # [D], [Nb], [Nb], [], []
        # The last block may be short: its slice is shifted back to fit, and the rows it borrows
        # from the previous block are dropped (they are candidates there if that block is kept).
        starts = jnp.minimum(blocks_b * W, n - W)  # [Nb]
        rows = (starts[:, None] + jnp.arange(W)).reshape(M)  # [M]
        cand = jax.vmap(lambda s: lax.dynamic_slice_in_dim(corpus, s, W))(starts).reshape(M, -1)  # [M, D]
        mask_rows = None if mask is None else mask[rows]  # [M]
        unused = (rows < jnp.repeat(blocks_b * W, W)) | ~jnp.repeat(kept_b, W)  # [M] borrowed or empty

        def every_row():  # [K] each
            scores = _mask_scores(_canonical(user_b, cand), rows, mask_rows, num_valid)  # [M]
            scores = jnp.where(unused | (scores < cut_b), PAD_SCORE, scores)
            top_scores, pos = lax.top_k(scores, K)  # rows are in index order: ties come out by index
            return rows[pos].astype(jnp.int32), top_scores

        if S == M:
            return every_row()
        approx = _mask_scores(jnp.matmul(cand, user_b, precision=SCORE_PRECISION), rows, mask_rows, num_valid)
        # A row whose matmul score is below cut - band scores canonically below the cut.
        approx = jnp.where(unused | (approx < cut_b - band_b), PAD_SCORE, approx)  # [M]
        top_approx, pos = lax.top_k(approx, S)  # [S]
        lowest = jnp.min(jnp.where(jnp.arange(S) < K, top_approx, jnp.inf))  # [] = L (whole-output min)
        needed = top_approx >= lowest - 2 * band_b  # [S]
        fits = jnp.isfinite(band_b) & (jnp.sum(needed) < S)

        def near_rows():  # [K] each
            picked = rows[pos]  # [S]
            scores = _mask_scores(_canonical(user_b, cand[pos]), picked, None if mask is None else mask_rows[pos],
                                  num_valid)
            scores = jnp.where(needed, scores, PAD_SCORE)  # [S]
            _, picked, scores = lax.sort((-scores, picked, scores), num_keys=2)  # best first, ties by index
            return picked[:K].astype(jnp.int32), scores[:K]

        return lax.cond(fits, near_rows, every_row)

    return lax.map(refine, (user, blocks, kept, cut, row_band))  # [B, K] each


class ShardedCorpusIndex(_Index):
    """Exact top-k with the corpus sharded row-wise over the devices of a mesh axis (contract:
    module doc; no coarse pass).

    Each device runs `CorpusIndex`'s algorithm on its shard, an `all_gather` collects the P
    per-shard [B, K] results, and one `top_k` over [B, Nd * K] (shards in corpus order, each
    sorted with ties in index order) merges them. Scores are `exact_scores`', which do not
    depend on the shard, so results are identical to one device and to brute force.
    A jax.Array already sharded as `NamedSharding(mesh, P(axis_name, None))` with N divisible
    by P is used in place (the multi-host route, see the module doc). Anything else is placed
    shard by shard, rows padded to P * n with n a multiple of 16 so shards stay aligned;
    padding never appears in a result. Host rows a CPU device holds in place are made
    read-only, as for `CorpusIndex`.

    Args: as `CorpusIndex`, plus
      mesh: a `jax.sharding.Mesh`; None = a 1-D mesh over all `jax.devices()`.
      axis_name: the mesh axis the corpus rows are split over.
    """

    def __init__(self, corpus_embeddings, corpus_post_ids=None, *, mesh: Optional[Mesh] = None,
                 axis_name: str = "corpus", chunk_size: Optional[int] = None,
                 block_size: Optional[int] = None):
        _check_corpus(corpus_embeddings)
        self.num_rows, self.dim = (int(s) for s in corpus_embeddings.shape)
        self.corpus_post_ids = _check_post_ids(corpus_post_ids, self.num_rows)
        self.chunk_size = _check_positive(chunk_size, "chunk_size")
        self.block_size = _check_positive(block_size, "block_size")
        self.mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()), (axis_name,))
        if axis_name not in self.mesh.axis_names:
            raise ValueError(f"axis_name: expected one of {self.mesh.axis_names}, got {axis_name!r}")
        self.axis_name = axis_name
        self.num_shards = self.mesh.shape[axis_name]
        sharding = NamedSharding(self.mesh, PartitionSpec(axis_name, None))
        if (isinstance(corpus_embeddings, jax.Array) and self.num_rows % self.num_shards == 0
                and corpus_embeddings.sharding.is_equivalent_to(sharding, 2)):
            # Already laid out as we would (e.g. built per host, see the module doc): use as is.
            self.shard_rows = self.num_rows // self.num_shards
            self.corpus_embeddings = corpus_embeddings.astype(jnp.float32)  # [N, D]
        else:
            per_shard = -(-self.num_rows // self.num_shards)
            self.shard_rows = -(-per_shard // SHARD_ROW_MULTIPLE) * SHARD_ROW_MULTIPLE
            self.corpus_embeddings = self._place(corpus_embeddings, sharding)  # [Nd * Nl, D]
        self.max_row_norm = _check_finite_device(self.corpus_embeddings)  # [] device scalar
        self._max_row_norm = float(self.max_row_norm)

    def _place(self, corpus_embeddings, sharding) -> jax.Array:
        # Host rows are handed out shard by shard (aliased where aligned), so no device ever
        # holds more than its shard and only the last, padded shard is a fresh copy.
        host = np.ascontiguousarray(corpus_embeddings, dtype=np.float32)  # view for CPU jax.Array
        padded = (self.num_shards * self.shard_rows, self.dim)

        def shard(index):
            start, stop = index[0].start or 0, index[0].stop or padded[0]
            rows = host[start:min(stop, self.num_rows)]
            if rows.shape[0] < stop - start:
                out = np.zeros((stop - start, self.dim), np.float32)  # zero rows: finite padding
                out[:rows.shape[0]] = rows
                return out
            return rows

        corpus = jax.make_array_from_callback(padded, sharding, shard)
        if _reads_host_memory(corpus, host):
            _freeze(host, corpus_embeddings)
        return corpus

    def plan(self, batch: int, top_k: int) -> tuple[int, int]:
        """(chunk rows R, block rows W) each shard uses for B users and the top K."""
        return _plan(self.shard_rows, self.dim, batch, min(top_k, self.shard_rows), self.chunk_size,
                     self.block_size)

    def search(self, user_representation, top_k: int, corpus_mask=None):
        """As `CorpusIndex.search` (same results, same -INF tail rule), corpus split over devices."""
        top_k = self._check_query(user_representation, top_k, corpus_mask)
        chunk, block = self.plan(user_representation.shape[0], top_k)
        user = jnp.asarray(user_representation, jnp.float32)  # [B, D]
        mask = None if corpus_mask is None else jnp.asarray(corpus_mask)  # [N]
        return _sharded_top_k(user, self.corpus_embeddings, mask, self.max_row_norm, mesh=self.mesh,
                              axis_name=self.axis_name, num_rows=self.num_rows, top_k=top_k, chunk_size=chunk,
                              block_size=block)


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "num_rows", "top_k", "chunk_size",
                                             "block_size"))
def _sharded_top_k(user, corpus, mask, max_row_norm, *, mesh, axis_name, num_rows, top_k, chunk_size, block_size):
    TRACE_COUNTS["sharded"] += 1
    shard_rows = corpus.shape[0] // mesh.shape[axis_name]
    if mask is not None:
        mask = jnp.pad(mask, (0, corpus.shape[0] - num_rows))  # [Nd * Nl]; padding is PAD_SCORE anyway

    def per_shard(user, corpus, mask, max_row_norm):
        offset = lax.axis_index(axis_name) * shard_rows
        padded = corpus.shape[0] * mesh.shape[axis_name] > num_rows
        num_valid = jnp.clip(num_rows - offset, 0, shard_rows) if padded else None
        (idx, scores), _ = _local_top_k(user, corpus, mask, num_valid, max_row_norm, top_k=top_k,
                                        chunk_size=chunk_size, block_size=block_size)  # [B, K'] each, K' = min(K, Nl)
        idx = lax.all_gather(idx + offset, axis_name, axis=1, tiled=True)  # [B, Nd * K']
        scores = lax.all_gather(scores, axis_name, axis=1, tiled=True)  # [B, Nd * K']
        top_scores, pos = lax.top_k(scores, top_k)  # [B, K]
        return jnp.take_along_axis(idx, pos, axis=1), top_scores

    rows = PartitionSpec(axis_name)
    in_specs = (PartitionSpec(), PartitionSpec(axis_name, None), None if mask is None else rows, PartitionSpec())
    if mesh.axis_types[mesh.axis_names.index(axis_name)] == AxisType.Explicit:
        # Explicit axes (jax.make_mesh's default) want inputs laid out as in_specs says.
        user = jax.reshard(user, NamedSharding(mesh, PartitionSpec()))
        max_row_norm = jax.reshard(max_row_norm, NamedSharding(mesh, PartitionSpec()))
        if mask is not None:
            mask = jax.reshard(mask, NamedSharding(mesh, rows))
    # Every device merges the same gathered [B, Nd * K'] arrays, so the outputs are replicated;
    # shard_map cannot infer that through all_gather, hence check_vma=False.
    return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=(PartitionSpec(), PartitionSpec()),
                         check_vma=False)(user, corpus, mask, max_row_norm)


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(FAISS_MISSING) from err
    return faiss


class FaissIndex(_Index):
    """Approximate top-k with a FAISS IVF-Flat inner-product index (optional extra `faiss`).

    k-means splits the corpus into `nlist` lists; a search scans the `nprobe` lists whose
    centroids score best. Which entries come back is approximate (recall:
    `phoenix_metrics.topk_recall`); what it promises (docs/index.md): every returned entry is a
    real, unmasked corpus row with its `exact_scores` value (FAISS's own scores are replaced: its
    vectors are stored uncompressed, and the found rows are rescored), results are best first with
    equal scores in index order, and with nprobe = nlist (every list scanned) the result is the
    exact indexes' result whenever the K-th and (K+1)-th exact scores differ by more than two float32
    evaluations of a dot product can (2 * `_float32_band`). Runs on the host, returns NumPy.
    Unlike the exact indexes, masked entries are never returned: if fewer than K valid entries
    lie in the probed lists (a mask, or small lists with a small nprobe), the tail has index -1
    and score -INF. Check for it (`indices < 0`) before indexing with the result; `post_ids`
    maps -1 to -1.

    Args:
      corpus_embeddings: [N, D] float, finite (copied into the FAISS index).
      corpus_post_ids: [N] ids returned by `post_ids`; None means ids = indices.
      nlist: number of inverted lists; None = NLIST_PER_SQRT_N * sqrt(N).
      nprobe: lists scanned per query (speed/recall knob, can be changed on the instance).
      seed: seed of the k-means training sample.
    """

    def __init__(self, corpus_embeddings, corpus_post_ids=None, *, nlist: Optional[int] = None,
                 nprobe: int = DEFAULT_NPROBE, seed: int = 0):
        faiss = _import_faiss()
        _check_corpus(corpus_embeddings)
        self.num_rows, self.dim = (int(s) for s in corpus_embeddings.shape)
        self.corpus_post_ids = _check_post_ids(corpus_post_ids, self.num_rows)
        corpus = np.ascontiguousarray(corpus_embeddings, dtype=np.float32)  # [N, D]
        _check_finite_host(corpus)
        nlist = _check_positive(nlist, "nlist") or max(1, round(NLIST_PER_SQRT_N * math.sqrt(self.num_rows)))
        self.nlist = min(nlist, self.num_rows)
        self.nprobe = nprobe
        check_number(seed, "seed", "an int >= 0", lambda v: v >= 0, integer=True)
        quantizer = faiss.IndexFlatIP(self.dim)
        self.index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = int(seed)
        num_train = min(self.num_rows, TRAIN_POINTS_PER_LIST * self.nlist)
        sample = np.random.default_rng(seed).choice(self.num_rows, num_train, replace=False)
        self.index.train(corpus[np.sort(sample)])
        self.index.add(corpus)
        self.index.make_direct_map()  # found rows are read back for the rescoring (N * 8 bytes)
        self._max_row_norm = _host_max_row_norm(corpus)
        self._faiss = faiss

    @property
    def nprobe(self) -> int:
        """Lists scanned per query; may be changed between searches (capped at nlist)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value) -> None:
        if value is None:
            raise TypeError("nprobe: expected a positive int, got None")
        self._nprobe = _check_positive(value, "nprobe")

    def search(self, user_representation, top_k: int, corpus_mask=None):
        """Approximate top-k -> (indices [B, K] int32, scores [B, K] float32), NumPy, best first.

        Entries FAISS found nothing for are index -1 with score -INF, after every found entry (see the
        class doc); found entries carry their `exact_scores` values.
        """
        top_k = self._check_query(user_representation, top_k, corpus_mask)
        faiss = self._faiss
        user = np.ascontiguousarray(np.asarray(user_representation, np.float32))  # [B, D]
        selector = None
        if corpus_mask is not None:
            bits = np.packbits(np.asarray(corpus_mask), bitorder="little")  # faiss' bitmap layout
            selector = faiss.IDSelectorBitmap(self.num_rows, faiss.swig_ptr(bits))
        params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.nlist), sel=selector)
        _, indices = self.index.search(user, top_k, params=params)  # [B, K] each
        missing = indices < 0
        rows = self.index.reconstruct_batch(np.where(missing, 0, indices).reshape(-1))  # [B * K, D]
        scores = np.asarray(_paired_scores(user, rows.reshape(*indices.shape, self.dim)))  # [B, K]
        scores = np.where(missing, np.float32(-INF), scores)
        # Found entries first, best first, equal scores in index order (missing ones keep -1).
        order = np.lexsort((indices, -scores, missing), axis=1)  # [B, K]
        indices, scores = np.take_along_axis(indices, order, 1), np.take_along_axis(scores, order, 1)
        return indices.astype(np.int32), scores.astype(np.float32)


@jax.jit
def _paired_scores(user, rows):
    """[B, D] users against their own rows [B, K, D] -> canonical scores [B, K]."""
    return _canonical(user[:, None, :], rows)


def _host_max_row_norm(corpus: np.ndarray, rows_per_step: int = 2**16) -> float:
    """An upper bound on the largest row norm of a host corpus, from float64 slices (no overflow)."""
    largest = 0.0
    for start in range(0, corpus.shape[0], rows_per_step):
        rows = corpus[start:start + rows_per_step].astype(np.float64)
        largest = max(largest, float(np.sqrt(np.max(np.einsum("rd,rd->r", rows, rows)))))
    return largest * (1 + 2.0**-20)


def _check_finite_host(corpus: np.ndarray, rows_per_step: int = 2**16) -> None:
    """Host twin of `_check_finite_device`, in slices so the bool temporary stays small."""
    for start in range(0, corpus.shape[0], rows_per_step):
        row_ok = np.isfinite(corpus[start:start + rows_per_step]).all(axis=1)  # [rows]
        if not row_ok.all():
            raise ValueError(f"corpus_embeddings: expected finite values, got NaN or inf "
                             f"(first: row {start + int(np.argmin(row_ok))})")
