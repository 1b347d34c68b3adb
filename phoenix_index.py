"""Corpus indexes for the retrieval stage: exact chunked top-k, sharded exact top-k, FAISS ANN.

Retrieval semantics: scores = user [B, D] @ corpus [N, D].T, corpus entries
masked out by `corpus_mask` (bool [N], True = valid) score -INF, results best first. Ties
between exactly equal scores go to the lower corpus index, as `jax.lax.top_k` and
`np.argsort(-scores, kind="stable")` order them, so `CorpusIndex` and `ShardedCorpusIndex`
return the same indices as brute force whenever the scores themselves are identical.

Shape glossary
  B  batch (users)                 D  embedding size
  N  corpus size                   K  top-k
  R  corpus rows per chunk         W  rows per block (the unit of the block-max pre-selection)
  Nb  blocks kept per user (min(K, number of blocks))
  P  devices (corpus shards)       n  corpus rows per shard

How the exact search works (`CorpusIndex`):
  1. Scan the corpus in chunks of R rows inside one jitted `fori_loop`: score the chunk
     (`[R, B]` = chunk @ user.T for several users, small enough to stay in cache) and keep only
     the max of every block of W rows (`[B, N/W]` in total). No top-k runs inside the loop. In
     the float32 scan (no coarse copy), up to MAX_UNCHUNKED_BATCH users the whole corpus is one
     chunk: reading the corpus bounds that case, and a sliced chunk would be copied first.
  2. `top_k` over the block maxima picks the Nb best blocks per user; gather their rows and
     rescore them, one user at a time. Blocks below a verified lower bound on the Nb-th best
     maximum are set aside first (`_drop_hopeless`), and so are rescored rows below the Nb-th
     best maximum minus the rounding bound (`_refine`'s `cut`): XLA CPU's top_k runs faster
     when fewer entries can enter its running best K.
  3. `top_k` over the Nb * W candidates gives the answer.
  Coarse pass (default from COARSE_MIN_ROWS rows): step 1 reads a bfloat16 copy of the corpus
  (half the bytes: reading the corpus bounds the scan of a few users, and at 16 users each chunk
  is copied before its matmul) and a proven error bound decides which blocks step 2 must rescore
  in float32, falling back to the float32 scan if they do not fit (`_coarse_top_k`). Same results
  as the float32 path; costs N * D * 2 bytes more. The copy is held as the uint16 bit patterns of
  the bfloat16 values and widened to float32 chunk by chunk (a shift, `_widen`): XLA CPU handed a
  bfloat16 array converts the whole corpus to float32 before the loop (measured 3-4x slower).
  This is exact: if row i is in the top K, fewer than K rows beat it, so fewer than K blocks
  have a better maximum and i's block is among the Nb kept. Ties are safe because blocks are
  contiguous: ordering blocks by (max desc, block index asc) orders them by their best row
  under (score desc, index asc), and the kept blocks are re-sorted by index before step 3.
  (Rescoring can round differently from step 1 in the last bit; the result is then exact for
  the rescored values, which are the scores returned.)
  Memory beyond the corpus: [B, R] scores ([R, D] widened rows too for the coarse pass),
  [B, N/W] maxima, [Nb, W, D] gathered rows (Nb plus extra slots for the coarse pass).
  When K is large next to N (N <= DIRECT_ROWS_PER_K * K) and the [B, N] scores are small, one
  plain top_k over them is faster, and `plan` picks that instead.
  Why not a running top-k merged chunk by chunk: with K = 1000 the per-chunk `top_k` cost more
  than the matmul itself (measured 2.5x a bare matmul + top_k at B=1, N=1M on CPU).

Multi-host use (`ShardedCorpusIndex`): call `jax.distributed.initialize()` on every host first;
`jax.devices()` then lists the devices of all hosts and a `Mesh` over them shards the corpus
across hosts. Each host only has to hold its own rows: build the global array with
`jax.make_array_from_process_local_data(sharding, local_rows)` (or
`jax.make_array_from_callback`, reading only the addressable shards) instead of passing the
whole corpus to the constructor; the search is unchanged: every device computes a per-shard
top-k, an `all_gather` moves only [P, B, K] scores and indices, and every host ends with the
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

# Full float32 products: GPUs may otherwise round f32 matmul inputs to TF32 (~1e-3 relative),
# and the index promises brute-force results. Same code and speed as the default on CPU (measured).
SCORE_PRECISION = lax.Precision.HIGHEST
# Padding rows (ragged blocks, shard padding) score below a masked real entry's -INF, so a
# masked entry may fill the tail of a result but padding never appears in one.
PAD_SCORE = -np.inf
# Host buffers at this alignment can back a CPU jax.Array without a copy (XLA's alignment).
CPU_ALIGNMENT_BYTES = 64
# `aligned_empty` buffers from this size on are advised for transparent huge pages (`_huge_page_buffer`).
HUGE_PAGE_MIN_BYTES = 32 * 2**20
# Bytes of one chunk's corpus rows plus its [B, R] scores: small enough to stay in cache (L3),
# large enough that the loop's per-step overhead stays small. With the transposed scan below, 8 MiB
# (R = 8192 at B=16) measured best: N=1M, K=1000, medians of 15, R=4096 / 8192 / 16384 / 32768:
# B=16 63.3 / 60.4 / 61.0 / 69.1 ms, B=32 100.0 / 101.3 / 100.9 / 130.4, B=64 193 / 194 / 203 / 237.
CHUNK_BYTES = 8 * 2**20
# XLA copies each dynamically sliced chunk before its dot. For a few users the matmul is bound by
# reading the corpus, and that copy costs as much as the matmul, while a [B, N] score row is
# small next to the [N, D] corpus; so up to this batch size and score budget the corpus is
# scored in one piece (no slicing). Measured crossover on CPU: B=8 still faster unchunked, B=16 not.
MAX_UNCHUNKED_BATCH = 8
UNCHUNKED_SCORE_BYTES = 256 * 2**20
# From this many users a chunked scan scores [R, D] x [D, B] and reduces blocks of W rows over
# [R / W, W, B] instead of [B, R] x ... over [B, R / W, W]: XLA CPU runs it faster (measured N=1M,
# R=4096, W=8, medians of 10: B=4 35.0 vs 37.2 ms, B=8 40.4 vs 48.4, B=16 50.0 vs 58.0, B=32
# 78.5 vs 89.8, B=64 151 vs 163). One user keeps the fused multiply-reduce form below.
TRANSPOSED_SCAN_MIN_BATCH = 2
# When K is a sizeable fraction of N the block pre-selection saves little, and one top_k over
# the [B, N] scores (within UNCHUNKED_SCORE_BYTES) is faster: measured at N/K = 100-500 (B=1, 16).
DIRECT_ROWS_PER_K = 512
# The top_k over the block maxima first drops those below a verified guess at each user's Nb-th
# best (`_drop_hopeless`): XLA CPU's top_k (a running best-K heap) costs little per entry that
# cannot enter it and much per entry that does, and in corpus order many do (all of them when
# scores rise with the index). The guess comes from every SAMPLE_STRIDE-th entry and is used
# where at least Nb entries reach it (~1.5 Nb survive at K = 1000). Measured B=16, N=1M, [16,
# 125000] maxima: top_k 10.3-12.5 ms plain, 7.4-9.2 ms with the guess (sample and pass included);
# with scores ascending in the corpus order, 82 ms plain.
SAMPLE_STRIDE = 16
SAMPLE_MARGIN_SD = 4.0
SAMPLE_MIN_ROWS_PER_K = 8
# Block size W balances top_k over N/W block maxima against gathering Nb * W rows of D floats:
# cost ~ a * N / W + b * K * W * D, minimised at W = sqrt(N / (K * D) * a / b), a / b measured ~ 8.
BLOCK_COST_RATIO = 8.0
MAX_BLOCK_SIZE = 64
# Coarse pass (CorpusIndex): block maxima from a bfloat16 copy of the corpus, half the bytes the
# scan reads, with a proven bound on its error (see `_coarse_top_k`). On by default from this many
# rows (costs N * D * 2 bytes).
COARSE_MIN_ROWS = 2**16
# Rows per step of building the coarse copy (`_build_coarse`).
COPY_CHUNK_ROWS = 2**14
# The coarse scan is always chunked (a chunk widened to float32 as it is copied costs no more than
# the copy): rows per chunk from this many bytes of widened rows plus scores. Measured N=1M, K=1000,
# medians of 20, scan only, 8 / 16 MiB: B=2 34.2 / 31.2 ms, B=8 29.9 / 27.4, B=16 40.7 / 41.7,
# B=32 72.7 / 65.9 (float32 scan: B=16 52.0, B=32 78.4; bfloat16 in one piece: B=8 36.8).
COARSE_CHUNK_BYTES = 16 * 2**20
# Blocks kept beyond Nb by the coarse pass: blocks whose coarse maximum lies within the error band
# of the Nb-th must all be kept for the result to be exact; if they do not fit, the search falls
# back to the float32 scan (same result, slower). Each slot costs its rescoring whether used or
# not. Needed at N=1M, D=128, B=16 (unit vectors, random / clustered), most of any user: K=10
# 18 / 20 blocks, K=100 140 / 149, K=1000 1243 / 1268 (slots 138, 228, 1500).
COARSE_EXTRA_BLOCKS_FRACTION = 0.5
COARSE_MIN_EXTRA_BLOCKS = 128
# Relative error of a float32 dot product of D terms is below D * 2^-24 / (1 - D * 2^-24) of
# sum |u_i x_i| (any summation order); the bound is taken this much larger (rounding of the bound itself).
COARSE_BOUND_SAFETY = 1.001
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


def aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous NumPy array whose data is 64-byte aligned.

    `jax.device_put` of such a float32 array aliases it on CPU instead of copying, so a corpus
    filled in place here costs its size once, not twice (a plain `np.empty` is only 16-byte
    aligned and `jnp.asarray` always copies). From HUGE_PAGE_MIN_BYTES on (Linux) the memory is
    a page-aligned anonymous mapping advised for transparent huge pages (`_huge_page_buffer`).
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
    the rescoring's scattered 4 KiB block reads, miss the TLB far less often (measured N=1M, B=16,
    one process, 60 rounds: the exact search 76.0 vs 79.8 ms with the coarse copy on huge pages,
    B=1 10.5 vs 11.6). Freed when the last array viewing it goes."""
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
    """Rejects NaN/inf rows with a pointer to the first one; a fused reduction, no [N, D] temporary.
    Only scalars come back to the host, so this also works on a corpus sharded across hosts.
    Returns the largest row norm (a device scalar, from the same pass)."""
    row_ok, max_norm = _rows_finite(corpus)  # [N], []
    num_bad = int(jnp.sum(~row_ok))
    if num_bad:
        raise ValueError(f"corpus_embeddings: expected finite values, got NaN or inf in {num_bad} rows "
                         f"(first: row {int(jnp.argmin(row_ok))})")
    return max_norm


@jax.jit
def _rows_finite(corpus):
    # x * 0 is NaN exactly for NaN and +-inf, and a sum keeps any NaN (IEEE), so this row sum is
    # finite iff the row is. A float sum fuses with its input; isfinite(corpus).all(1)
    # materialised an [N, D] bool (1.3 GB at N = 10M), and XNNPACK's max drops NaNs.
    # The largest row norm rides along (an overflow to inf only turns the row cut off).
    return jnp.isfinite(jnp.sum(corpus * 0.0, axis=1)), jnp.sqrt(jnp.max(jnp.sum(corpus * corpus, axis=1)))


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


def _check_finite_query(user_representation) -> None:
    """A NaN/inf user would score every entry NaN (exact indexes) or find nothing (FAISS: -1).

    Not validation.check_finite: this checks after the float32 cast the search applies (a float64
    1e39 is inf there), and a device array costs one [B] reduction and a sync, not a copy to the
    host. Skipped under PHOENIX_VALIDATE_VALUES=0 and when traced (inside the caller's jit).
    """
    if not values_enabled() or isinstance(user_representation, jax.core.Tracer):
        return
    if isinstance(user_representation, jax.Array):
        row_ok = np.asarray(_rows_finite(user_representation.astype(jnp.float32))[0])  # [B]
    else:
        with np.errstate(over="ignore"):  # overflowing the cast is what we are looking for
            row_ok = np.isfinite(np.asarray(user_representation, np.float32)).all(axis=1)  # [B]
    if not row_ok.all():
        raise ValueError(f"user_representation: expected finite values, got NaN or inf in "
                         f"{int((~row_ok).sum())} rows (first: row {int(np.argmin(row_ok))})")


def _to_device_corpus(corpus_embeddings, device=None) -> jax.Array:
    """float32 device array; a 64-byte-aligned float32 NumPy corpus is aliased on CPU, not copied."""
    if isinstance(corpus_embeddings, jax.Array):
        corpus = corpus_embeddings.astype(jnp.float32)  # no-op (no copy) when already float32
        return corpus if device is None else jax.device_put(corpus, device)
    host = np.ascontiguousarray(corpus_embeddings, dtype=np.float32)
    return jax.device_put(host, device, may_alias=True)


class _Index:
    """What all indexes share: sizes, argument checks, and the index -> post id map."""

    num_rows: int
    dim: int
    corpus_post_ids: Optional[np.ndarray]

    def _check_query(self, user_representation, top_k, corpus_mask):
        check_array(user_representation, "user_representation", (None, self.dim), "float")
        if user_representation.shape[0] == 0:
            raise ValueError(f"user_representation: expected at least one user, got shape "
                             f"{tuple(user_representation.shape)}")
        top_k = check_top_k(top_k, self.num_rows, "corpus entries")
        if corpus_mask is not None:
            check_array(corpus_mask, "corpus_mask", (self.num_rows,), "bool")
        _check_finite_query(user_representation)
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
    """Exact top-k over a fixed corpus on one device, in bounded memory.

    Args:
      corpus_embeddings: [N, D] float (cast to float32), finite, N >= 1. A 64-byte-aligned float32
        NumPy array (see `aligned_empty`) or a jax.Array is used in place, not copied: do not
        modify it while the index is alive. Other inputs are copied once.
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
        self.corpus_embeddings = _to_device_corpus(corpus_embeddings, device)  # [N, D]
        self.max_row_norm = _check_finite_device(self.corpus_embeddings)  # [] device scalar
        if coarse is not None and not isinstance(coarse, bool):
            raise TypeError(f"coarse: expected None, True or False, got {coarse!r}")
        self.coarse = self.num_rows >= COARSE_MIN_ROWS if coarse is None else coarse
        self.coarse_embeddings = self.coarse_error = None
        if self.coarse:  # [N, D] bfloat16 bits (uint16) and its error bound (scalars), see _coarse_top_k
            self.coarse_embeddings, self.coarse_error = _build_coarse(self.corpus_embeddings, self.max_row_norm)

    def plan(self, batch: int, top_k: int) -> tuple[int, int]:
        """(chunk rows R, block rows W) a search of B users for the top K uses; static under jit."""
        return _plan(self.num_rows, self.dim, batch, top_k, self.chunk_size, self.block_size, coarse=self.coarse)

    def search(self, user_representation, top_k: int, corpus_mask=None, *, approx_recall: Optional[float] = None):
        """Exact top-k of user [B, D] @ corpus.T -> (top_k_indices [B, K] int32, top_k_scores [B, K] f32).

        Best first; equal scores in corpus-index order. Masked entries score -INF, so when
        `top_k` exceeds the number of valid entries the tail is filled with masked entries (in
        index order) scored -INF, exactly as brute force does. One compile per (B, K, mask or
        not); no host sync (results are not blocked on).

        approx_recall: instead of the exact search, `lax.approx_max_k` over the [B, N] scores with
        this recall target in (0, 1]: approximate on TPU (its aggregate-to-top-k kernel),
        while XLA on CPU and GPU has no approximate kernel and returns the exact top-k (ties
        then in any order). Scores of returned entries are exact either way.
        """
        top_k = self._check_query(user_representation, top_k, corpus_mask)
        user = jnp.asarray(user_representation, jnp.float32)  # [B, D]
        mask = None if corpus_mask is None else jnp.asarray(corpus_mask)  # [N]
        if approx_recall is not None:
            check_number(approx_recall, "approx_recall", "a float in (0, 1]", lambda v: 0 < v <= 1)
            return _approx_top_k(user, self.corpus_embeddings, mask, top_k=top_k, recall=float(approx_recall))
        batch = user_representation.shape[0]
        chunk, block = self.plan(batch, top_k)
        if self.coarse and block > 1:
            # The float32 plan answers if the coarse pass's blocks do not fit (see _coarse_top_k).
            fallback, _ = _plan(self.num_rows, self.dim, batch, top_k, self.chunk_size, block)
            return _coarse_exact_top_k(user, self.corpus_embeddings, self.coarse_embeddings, self.coarse_error,
                                       mask, self.max_row_norm, top_k=top_k, chunk_size=chunk, block_size=block,
                                       fallback_chunk_size=fallback)
        return _exact_top_k(user, self.corpus_embeddings, mask, self.max_row_norm, top_k=top_k, chunk_size=chunk,
                            block_size=block)


def _round_rows(rows):
    """[r, D] float32 -> ([r, D] uint16 bfloat16 bit patterns, [] largest squared row norm of the
    rounding error). The float32 bits are rounded to their top 16 to nearest, ties to even, as
    the bfloat16 cast rounds (bit for bit, tested; the corpus is finite): a bfloat16 array
    bitcast to uint16 costs XLA CPU a copy."""
    bits = lax.bitcast_convert_type(rows, jnp.uint32)
    coarse = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(jnp.uint16)
    return coarse, jnp.max(jnp.sum(jnp.square(rows - _widen(coarse)), axis=1))


_round_rows_jit = jax.jit(_round_rows)


def _build_coarse(corpus, max_row_norm):
    """The coarse copy [N, D] (module doc) and (max row norm of its rounding error, a bound on
    its max row norm: the corpus's `max_row_norm` plus that error).

    Built COPY_CHUNK_ROWS rows at a time: on the whole array XLA CPU materialised a bfloat16
    array's bitcast and the widened copy the error reduction reads (peak +N * D * 6 bytes, 9.7 s
    at N = 10M; in chunks +N * D * 2). On a CPU device the chunks are written into a host buffer
    on huge pages (`aligned_empty`) that the device array then aliases; elsewhere a jitted loop
    builds it on the device."""
    device = next(iter(corpus.devices()))
    if device.platform != "cpu":
        return _coarse_copy(corpus, max_row_norm)
    host = np.asarray(corpus)  # [N, D], a view of the CPU buffer
    out = aligned_empty(corpus.shape, np.uint16)  # [N, D]
    errors = []
    for start in range(0, corpus.shape[0], COPY_CHUNK_ROWS):
        coarse, error2 = _round_rows_jit(host[start:start + COPY_CHUNK_ROWS])
        out[start:start + COPY_CHUNK_ROWS] = np.asarray(coarse)
        errors.append(error2)
    error = jnp.sqrt(jnp.max(jnp.stack(errors)))
    return jax.device_put(out, device, may_alias=True), jnp.stack([error, max_row_norm + error])


@jax.jit
def _coarse_copy(corpus, max_row_norm):
    """`_build_coarse` on the device: a loop over chunks of COPY_CHUNK_ROWS rows."""
    n = corpus.shape[0]
    R = min(COPY_CHUNK_ROWS, n)
    num_chunks, tail = divmod(n, R)

    def body(g, carry):
        out, error2 = carry
        coarse, chunk_error2 = _round_rows(lax.dynamic_slice_in_dim(corpus, g * R, R))
        return lax.dynamic_update_slice_in_dim(out, coarse, g * R, axis=0), jnp.maximum(error2, chunk_error2)

    out = jnp.zeros(corpus.shape, jnp.uint16)  # [N, D]
    out, error2 = lax.fori_loop(0, num_chunks, body, (out, jnp.float32(0)))
    if tail:
        coarse, tail_error2 = _round_rows(corpus[num_chunks * R:])
        out, error2 = out.at[num_chunks * R:].set(coarse), jnp.maximum(error2, tail_error2)
    error = jnp.sqrt(error2)
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
    top_scores, top_indices = lax.approx_max_k(scores, top_k, recall_target=recall)
    return top_indices.astype(jnp.int32), top_scores


@functools.partial(jax.jit, static_argnames=("top_k", "chunk_size", "block_size", "fallback_chunk_size"))
def _coarse_exact_top_k(user, corpus, coarse, coarse_error, mask, max_row_norm, *, top_k, chunk_size, block_size,
                        fallback_chunk_size):
    TRACE_COUNTS["exact"] += 1
    result, _ = _coarse_top_k(user, corpus, coarse, coarse_error, mask, max_row_norm, top_k=top_k,
                              chunk_size=chunk_size, block_size=block_size, fallback_chunk_size=fallback_chunk_size)
    return result


@functools.partial(jax.jit, static_argnames=("top_k", "chunk_size", "block_size"))
def _exact_top_k(user, corpus, mask, max_row_norm, *, top_k, chunk_size, block_size):
    TRACE_COUNTS["exact"] += 1
    return _local_top_k(user, corpus, mask, None, top_k=top_k, chunk_size=chunk_size,
                        block_size=block_size, max_row_norm=max_row_norm)


def _mask_scores(scores, row_ids, mask_rows, num_valid):
    """Masked entries -> -INF, rows at or past `num_valid` (padding) -> PAD_SCORE."""
    if mask_rows is not None:
        scores = jnp.where(mask_rows, scores, -INF)
    if num_valid is not None:
        scores = jnp.where(row_ids < num_valid, scores, PAD_SCORE)
    return scores


def _local_top_k(user, corpus, mask, num_valid, *, top_k, chunk_size, block_size, max_row_norm=None):
    """Exact top-k over `corpus` [n, D] (module doc, steps 1-3) -> (indices [B, K'], scores [B, K']).

    K' = min(top_k, n). Rows >= `num_valid` (a traced scalar, or None = all rows) are padding.
    max_row_norm: None, or a scalar >= the largest row norm of `corpus` (enables the row cut).
    """
    n = corpus.shape[0]
    R, W = chunk_size, block_size
    if R >= n and W == 1:  # direct: one top_k over all scores (see DIRECT_ROWS_PER_K)
        scores = jnp.matmul(user, corpus.T, precision=SCORE_PRECISION)  # [B, n]
        scores = _mask_scores(scores, jnp.arange(n), mask, num_valid)
        top_scores, top_indices = lax.top_k(scores, min(top_k, n))  # [B, K']
        return top_indices.astype(jnp.int32), top_scores
    block_max = _block_maxima(user, corpus, mask, num_valid, chunk_size=R, block_size=W)  # [B, N / W]
    num_blocks = block_max.shape[1]
    Nb = min(top_k, num_blocks)
    kept_max, blocks = lax.top_k(_drop_hopeless(block_max, Nb), Nb)  # [B, Nb] each
    cut = None
    if Nb == top_k and max_row_norm is not None:
        # Nb = K blocks have a row scoring >= their maximum, so K rows rescore >= the lowest kept
        # maximum L minus twice the float32 rounding bound of a dot product (scan and rescoring
        # each within it of the exact value); a row rescoring below that is not in the top K.
        # (The lowest as a min over top_k's whole output: XLA CPU keeps its fast top-k kernel
        # only when the outputs are used whole.)
        lowest = jnp.min(kept_max, axis=1)  # [B] = L
        cut = lowest - 2 * COARSE_BOUND_SAFETY * _dot_rounding(corpus.shape[1]) * (
            jnp.linalg.norm(user, axis=1) * max_row_norm)  # [B]
    return _refine(user, corpus, blocks, mask, num_valid, top_k=top_k, block_size=W, cut=cut)


def _dot_rounding(dim):
    """g: a float32 dot product of `dim` terms is within g * sum |u_i x_i| of the exact value."""
    eps = dim * 2.0**-24
    return eps / (1 - eps)


def _drop_hopeless(x, k, margin=None):
    """x [B, n] with entries that cannot be among their row's k largest set to PAD_SCORE.

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


def _block_maxima(user, corpus, mask, num_valid, *, chunk_size, block_size):
    """Step 1: max score of every block of W rows, [B, ceil(n / W)], scanning R rows at a time.

    `corpus` may be the coarse copy (bfloat16 bits): each chunk is widened to float32 as it is scored.
    """
    B = user.shape[0]
    n = corpus.shape[0]
    R, W = chunk_size, block_size
    num_chunks, tail = divmod(n, R) if R < n else (0, n)  # one piece: a static, copy-free slice
    num_blocks = -(-n // W)

    # Chunked scans of several users score `chunk @ user.T` and take block maxima over the rows
    # axis of [rows / W, W, B] (TRANSPOSED_SCAN_MIN_BATCH); one piece keeps `user @ chunk.T`.
    transposed = B >= TRANSPOSED_SCAN_MIN_BATCH and R < n

    def chunk_block_max(start, rows, chunk, mask_rows):
        row_ids = start + jnp.arange(rows)  # [rows]
        pad = -rows % W  # only the tail chunk can be ragged (R % W == 0)
        if transposed:
            scores = jnp.matmul(_widen(chunk), user.T, precision=SCORE_PRECISION)  # [rows, B]
            scores = _mask_scores(scores, row_ids[:, None], None if mask_rows is None else mask_rows[:, None],
                                  num_valid)
            scores = jnp.pad(scores, ((0, pad), (0, 0)), constant_values=PAD_SCORE)  # [rows + pad, B]
            return scores.reshape(-1, W, B).max(axis=1).T  # [B, ceil(rows / W)]
        # `user @ chunk.T`, not einsum("bd,rd->br"): for B=1 XLA CPU turns this form into a fused
        # multiply-reduce that reads the corpus in place, measured 1.6x faster than the GEMV call.
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


def _refine(user, corpus, blocks, mask, num_valid, *, top_k, block_size, kept=None, cut=None):
    """Steps 2-3: rescore the rows of the kept blocks [B, Nb] in float32, top_k over them.

    kept: None, or [B, Nb] bool for blocks already in index order whose False entries are unused
    slots (their rows score PAD_SCORE).
    cut: None, or [B] scores such that at least K rescored rows of user b reach cut[b]; rows below
    it score PAD_SCORE before the top_k (they cannot be in the top K; see `_local_top_k`).
    """
    n = corpus.shape[0]
    W, Nb = block_size, blocks.shape[1]
    if kept is None:
        blocks = jnp.sort(blocks, axis=1)  # index order, so the stable top_k below breaks ties by index
        kept = jnp.ones(blocks.shape, jnp.bool_)
    if cut is None:
        cut = jnp.full(blocks.shape[:1], PAD_SCORE, jnp.float32)  # [B]: cuts nothing

    def refine(args):
        # One user at a time keeps the Nb * W gathered rows in cache (a [B, Nb, W, D] gather
        # spills to DRAM and measured 3x slower at B=16).
        user_b, blocks_b, kept_b, cut_b = args  # [D], [Nb], [Nb], []
        # The last block may be short: its slice is shifted back to fit, and the rows it borrows
        # from the previous block are dropped (they are candidates there if that block is kept).
        starts = jnp.minimum(blocks_b * W, n - W)  # [Nb]
        rows = (starts[:, None] + jnp.arange(W)).reshape(Nb * W)  # [Nb * W]
        cand = jax.vmap(lambda s: lax.dynamic_slice_in_dim(corpus, s, W))(starts)  # [Nb, W, D]
        scores = jnp.matmul(cand.reshape(Nb * W, -1), user_b, precision=SCORE_PRECISION)  # [Nb * W]
        mask_rows = None if mask is None else mask[rows]  # [Nb * W]
        scores = _mask_scores(scores, rows, mask_rows, num_valid)
        unused = (rows < jnp.repeat(blocks_b * W, W)) | ~jnp.repeat(kept_b, W)  # [Nb * W] borrowed or empty
        scores = jnp.where(unused | (scores < cut_b), PAD_SCORE, scores)
        top_scores, pos = lax.top_k(scores, min(top_k, n))  # [K']
        return rows[pos].astype(jnp.int32), top_scores

    return lax.map(refine, (user, blocks, kept, cut))  # [B, K'] each


def _coarse_top_k(user, corpus, coarse, coarse_error, mask, max_row_norm, *, top_k, chunk_size, block_size,
                  fallback_chunk_size):
    """Exact top-k whose block maxima come from the coarse copy `coarse` (module doc, step 1)
    -> ((indices [B, K'], scores [B, K']), whether the coarse blocks fitted (no fallback)).

    Let c_b be block b's coarse maximum and t_b its float32 one. Every coarse score is within
    e = |u| * (err + g * (2 * norm + err)) of any float32 evaluation of the same dot product (err,
    norm: the largest row norm of the rounding error and a bound on the copy's; g: the float32 dot
    product's rounding bound; |u . delta| <= |u| |delta| by Cauchy-Schwarz), so |c_b - t_b| <= e.
    With L the Nb-th largest c_b, Nb blocks have t_b >= L - e, so the K-th best score is >= L - e,
    and a block holding a top-K row has t_b >= L - e, hence c_b >= L - 2e. The search rescores the
    rows of the blocks with c_b >= L - 2e (in index order, up to Nb + extra of them); with Nb = K,
    rows rescoring below L - e are beaten by K others and cut before the top_k. If some user has
    more such blocks, the float32 plan (`fallback_chunk_size`) runs instead (`lax.cond`). Either
    way the result is the float32 path's. Masked rows score -INF in both passes, so they cost no bound.
    """
    D = corpus.shape[1]
    W = block_size
    block_max = _block_maxima(user, coarse, mask, None, chunk_size=chunk_size, block_size=W)  # [B, N / W]
    num_blocks = block_max.shape[1]
    Nb = min(top_k, num_blocks)
    slots = min(num_blocks, Nb + max(COARSE_MIN_EXTRA_BLOCKS, int(COARSE_EXTRA_BLOCKS_FRACTION * Nb)))
    error, norm = coarse_error[0], coarse_error[1]
    bound = COARSE_BOUND_SAFETY * jnp.linalg.norm(user, axis=1, keepdims=True) * (
        error + _dot_rounding(D) * (2 * norm + error))  # [B, 1] = e
    # The best `slots` blocks, best first; blocks 2e below a verified guess at the Nb-th set aside first.
    top_max, top_blocks = lax.top_k(_drop_hopeless(block_max, Nb, margin=2 * bound), slots)  # [B, slots]
    # L as a min over top_k's whole output (XLA CPU keeps its fast top-k kernel only then).
    lowest = jnp.min(jnp.where(jnp.arange(slots) < Nb, top_max, jnp.inf), axis=1, keepdims=True)  # [B, 1] = L
    needed = top_max >= lowest - 2 * bound  # [B, slots], the top Nb included
    # All needed blocks are among the slots when the last slot is not needed (or all blocks fit),
    # and the band is a number (scores or |u| overflowing float32 leave it to the float32 plan).
    fits = jnp.all(jnp.isfinite(lowest - 2 * bound))
    if slots < num_blocks:
        fits &= jnp.all(jnp.sum(needed, axis=1) < slots)
    # The needed blocks in index order, unused slots last and pointed at block 0 (rows unused).
    order = jnp.sort(jnp.where(needed, top_blocks, num_blocks), axis=1)  # [B, slots]
    kept = order < num_blocks  # [B, slots]
    blocks = jnp.where(kept, order, 0)
    cut = (lowest - bound)[:, 0] if Nb == top_k else None  # [B] = L - e
    result = lax.cond(
        fits,
        lambda: _refine(user, corpus, blocks, mask, None, top_k=top_k, block_size=W, kept=kept, cut=cut),
        lambda: _local_top_k(user, corpus, mask, None, top_k=top_k, chunk_size=fallback_chunk_size, block_size=W,
                             max_row_norm=max_row_norm))
    return result, fits


class ShardedCorpusIndex(_Index):
    """Exact top-k with the corpus sharded row-wise over the devices of a mesh axis.

    Each device runs `CorpusIndex`'s algorithm on its shard, an `all_gather` collects the P
    per-shard [B, K] results, and one `top_k` over [B, P * K] (shards in corpus order, each
    sorted with ties in index order) merges them, so results are identical to one device.
    A jax.Array already sharded as `NamedSharding(mesh, P(axis_name, None))` with N divisible
    by P is used in place (the multi-host route, see the module doc). Anything else is placed
    shard by shard, rows padded to P * n with n a multiple of 16 so shards stay aligned;
    padding never appears in a result.

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
            self.corpus_embeddings = self._place(corpus_embeddings, sharding)  # [P * n, D]
        _check_finite_device(self.corpus_embeddings)

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

        return jax.make_array_from_callback(padded, sharding, shard)

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
        return _sharded_top_k(user, self.corpus_embeddings, mask, mesh=self.mesh, axis_name=self.axis_name,
                              num_rows=self.num_rows, top_k=top_k, chunk_size=chunk, block_size=block)


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "num_rows", "top_k", "chunk_size",
                                             "block_size"))
def _sharded_top_k(user, corpus, mask, *, mesh, axis_name, num_rows, top_k, chunk_size, block_size):
    TRACE_COUNTS["sharded"] += 1
    shard_rows = corpus.shape[0] // mesh.shape[axis_name]
    if mask is not None:
        mask = jnp.pad(mask, (0, corpus.shape[0] - num_rows))  # [P * n]; padding is PAD_SCORE anyway

    def per_shard(user, corpus, mask):
        offset = lax.axis_index(axis_name) * shard_rows
        padded = corpus.shape[0] * mesh.shape[axis_name] > num_rows
        num_valid = jnp.clip(num_rows - offset, 0, shard_rows) if padded else None
        idx, scores = _local_top_k(user, corpus, mask, num_valid, top_k=top_k, chunk_size=chunk_size,
                                   block_size=block_size)  # [B, K'] each, K' = min(K, n)
        idx = lax.all_gather(idx + offset, axis_name, axis=1, tiled=True)  # [B, P * K']
        scores = lax.all_gather(scores, axis_name, axis=1, tiled=True)  # [B, P * K']
        top_scores, pos = lax.top_k(scores, top_k)  # [B, K]
        return jnp.take_along_axis(idx, pos, axis=1), top_scores

    rows = PartitionSpec(axis_name)
    in_specs = (PartitionSpec(), PartitionSpec(axis_name, None), None if mask is None else rows)
    if mesh.axis_types[mesh.axis_names.index(axis_name)] == AxisType.Explicit:
        # Explicit axes (jax.make_mesh's default) want inputs laid out as in_specs says.
        user = jax.reshard(user, NamedSharding(mesh, PartitionSpec()))
        if mask is not None:
            mask = jax.reshard(mask, NamedSharding(mesh, rows))
    # Every device merges the same gathered [B, P * K'] arrays, so the outputs are replicated;
    # shard_map cannot infer that through all_gather, hence check_vma=False.
    return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=(PartitionSpec(), PartitionSpec()),
                         check_vma=False)(user, corpus, mask)


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(FAISS_MISSING) from err
    return faiss


class FaissIndex(_Index):
    """Approximate top-k with a FAISS IVF-Flat inner-product index (optional extra `faiss`).

    k-means splits the corpus into `nlist` lists; a search scans the `nprobe` lists whose
    centroids score best. Vectors are stored uncompressed, so the scores of returned entries
    are exact and only recall is approximate (`phoenix_metrics.topk_recall`). Runs on the host, returns NumPy.
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

        Entries FAISS found nothing for are index -1 with score -INF (see the class doc).
        """
        top_k = self._check_query(user_representation, top_k, corpus_mask)
        faiss = self._faiss
        user = np.ascontiguousarray(np.asarray(user_representation, np.float32))  # [B, D]
        selector = None
        if corpus_mask is not None:
            bits = np.packbits(np.asarray(corpus_mask), bitorder="little")  # faiss' bitmap layout
            selector = faiss.IDSelectorBitmap(self.num_rows, faiss.swig_ptr(bits))
        params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.nlist), sel=selector)
        scores, indices = self.index.search(user, top_k, params=params)  # [B, K] each
        missing = indices < 0
        return indices.astype(np.int32), np.where(missing, -INF, scores).astype(np.float32)


def _check_finite_host(corpus: np.ndarray, rows_per_step: int = 2**16) -> None:
    """Host twin of `_check_finite_device`, in slices so the bool temporary stays small."""
    for start in range(0, corpus.shape[0], rows_per_step):
        row_ok = np.isfinite(corpus[start:start + rows_per_step]).all(axis=1)  # [rows]
        if not row_ok.all():
            raise ValueError(f"corpus_embeddings: expected finite values, got NaN or inf "
                             f"(first: row {start + int(np.argmin(row_ok))})")
