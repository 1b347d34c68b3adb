"""Inputs of the models: hash configuration, hashed batches, looked-up embeddings, raw-id batches.

The bottom of the library (it imports only phoenix_hashing and phoenix_validation): every other
module takes its batch types, the release's ACTIONS, the padding id and the example-batch
factories from here. recsys_model and runners re-export the release's names.

Shape glossary
  B  batch (users)          S  history length         C  candidates per user
  D  embedding size         A  actions                M  rows of one hash table
  Hu / Hi / Ha  number of user / item (post) / author hashes
"""

import dataclasses
from typing import Mapping, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from phoenix_hashing import (MAX_HASH_SEED, MAX_TABLE_SIZE, PAD_HASH, check_table_size, hash_author_ids,
                             hash_post_ids, hash_user_ids)
from phoenix_validation import check_actions, check_array, check_int, check_number, values_enabled

__all__ = [
    # the release's batch types and names
    "HashConfig", "RecsysBatch", "RecsysEmbeddings", "ACTIONS",
    "create_dummy_batch_from_config", "create_dummy_embeddings_from_config", "create_example_batch",
    "create_example_corpus", "ACTION_PROBABILITY",
    # raw ids -> hashed batches
    "PAD_ID", "RawBatch", "batch_from_ids",
    # hash embedding tables
    "HashEmbeddings", "embed", "lookup", "TABLE_MODULE", "DEFAULT_INIT_STDDEV",
]

PAD_ID = -1  # raw id of a padded position: every negative id is padding and hashes to 0
TABLE_MODULE = "hash_embeddings"  # HashEmbeddings' module name: the parameters under it are the tables

# The release's 19 engagement actions, in the order of the ranker's output columns.
ACTIONS = [
    "favorite_score",
    "reply_score",
    "repost_score",
    "photo_expand_score",
    "click_score",
    "profile_click_score",
    "vqv_score",
    "share_score",
    "share_via_dm_score",
    "share_via_copy_link_score",
    "dwell_score",
    "quote_score",
    "quoted_click_score",
    "follow_author_score",
    "not_interested_score",
    "block_author_score",
    "mute_author_score",
    "report_score",
    "dwell_time",
]


@dataclasses.dataclass
class HashConfig:
    """How many hash functions each id type uses, and the hash tables behind them."""

    num_user_hashes: int = 2
    num_item_hashes: int = 2
    num_author_hashes: int = 2
    # Rows of each embedding table (phoenix_hashing.py). Hash values lie in [1, size); row 0 is padding.
    user_table_size: int = 100_000
    post_table_size: int = 100_000
    author_table_size: int = 100_000
    # Seed of the hash family; hash function i of an id type is derived from (hash_seed, type, i).
    hash_seed: int = 0

    def __post_init__(self):
        """Every field checked (an error names it): a float seed or size, or a bool, would otherwise
        hash or size tables silently differently. NumPy integers are stored as ints."""
        for name in ("num_user_hashes", "num_item_hashes", "num_author_hashes"):
            self._check_int(name, "an int >= 1", lambda v: v >= 1)
        for name in ("user_table_size", "post_table_size", "author_table_size"):
            # Row 0 is padding, so a table needs a second row; hashes are int32 (phoenix_hashing).
            self._check_int(name, "an int in [2, 2**31]", lambda v: 2 <= v <= MAX_TABLE_SIZE)
        # The seed is a 64-bit word (phoenix_hashing.hash_seeds): -1 and 2**64 - 1 would be one family.
        self._check_int("hash_seed", "an int in [0, 2**64)", lambda v: 0 <= v < MAX_HASH_SEED)

    def _check_int(self, name: str, expected: str, ok) -> None:
        value = getattr(self, name)
        check_number(value, f"HashConfig.{name}", expected, ok, integer=True)
        setattr(self, name, int(value))


class RecsysBatch(NamedTuple):
    """Hashed inputs of one batch. Hash value 0 means padding."""

    user_hashes: jax.Array  # [B, Hu] int
    history_post_hashes: jax.Array  # [B, S, Hi] int
    history_author_hashes: jax.Array  # [B, S, Ha] int
    history_actions: jax.Array  # [B, S, A] float multi-hot
    history_product_surface: jax.Array  # [B, S] int
    candidate_post_hashes: jax.Array  # [B, C, Hi] int
    candidate_author_hashes: jax.Array  # [B, C, Ha] int
    candidate_product_surface: jax.Array  # [B, C] int


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RecsysEmbeddings:
    """Looked-up hash embeddings; a registered pytree so jit/vmap/device_put work."""

    user_embeddings: jax.Array  # [B, Hu, D]
    history_post_embeddings: jax.Array  # [B, S, Hi, D]
    candidate_post_embeddings: jax.Array  # [B, C, Hi, D]
    history_author_embeddings: jax.Array  # [B, S, Ha, D]
    candidate_author_embeddings: jax.Array  # [B, C, Ha, D]



# Init std of the embedding tables. The release's example inputs
# (create_example_batch) are standard-normal embeddings, and the input projections
# (VarianceScaling fan_out over the concatenated hash axis) are scaled so that
# unit-variance embeddings give unit-variance reduced inputs: std 1 keeps the model in the regime
# it was designed and tested for. A smaller std (e.g. 0.05) makes rows move faster relative to
# their size under Adam; it is a constructor argument.
DEFAULT_INIT_STDDEV = 1.0



class RawBatch(NamedTuple):
    """Raw ids of one batch (int64; negative = padding), before hashing. `hashed(cfg)` -> RecsysBatch.

    Ids and surfaces must have integer dtypes (floats would be truncated), surfaces >= 0; actions
    0/1 multi-hot (bool, or 0 and 1 of a number dtype).
    """

    user_ids: np.ndarray  # [B]
    history_post_ids: np.ndarray  # [B, S]
    history_author_ids: np.ndarray  # [B, S]
    history_actions: np.ndarray  # [B, S, A]
    history_surfaces: np.ndarray  # [B, S]
    candidate_post_ids: np.ndarray  # [B, C]
    candidate_author_ids: np.ndarray  # [B, C]
    candidate_surfaces: np.ndarray  # [B, C]

    @classmethod
    def with_candidates(cls, examples, candidate_post_ids, candidate_author_ids, candidate_surfaces
                        ) -> "RawBatch":
        """The user and history fields of an examples mapping (keys as the field names) with these
        candidates [B, C]."""
        return cls(examples["user_ids"], examples["history_post_ids"], examples["history_author_ids"],
                   examples["history_actions"], examples["history_surfaces"], candidate_post_ids,
                   candidate_author_ids, candidate_surfaces)

    def hashed(self, hash_config: HashConfig) -> RecsysBatch:
        """The `RecsysBatch` of NumPy arrays of these ids (hash family: phoenix_hashing.py)."""
        return batch_from_ids(*self, hash_config)


def _surface_field(x, name: str, shape: tuple) -> np.ndarray:
    """Surface ids of `shape`, integers in [0, 2**31) (int32, no silent truncation or wrap; the
    model's vocabulary bound is checked where the model config is known)."""
    x = np.asarray(x)
    check_array(x, name, shape, "int")
    if x.size and (x.min() < 0 or x.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name}: expected ids in [0, 2**31) (0 = padding), got range [{x.min()}, {x.max()}]")
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
    """Builds a `RecsysBatch` of NumPy arrays from raw ids; negative ids are padding.

    Shapes: user_ids [B], history_post_ids / history_author_ids / history_surfaces [B, S],
    history_actions [B, S, A], candidate_post_ids / candidate_author_ids / candidate_surfaces [B, C].
    Ids and surfaces must have integer dtypes (floats would be truncated), surfaces >= 0; actions
    0/1 multi-hot (bool, or 0 and 1 of a number dtype; phoenix_validation.check_values says why).
    Actions and surfaces pass through unchanged (as float32 / int32): the model ignores them at
    padded positions because it masks by the post hash.
    """
    _check_hash_config(hash_config)
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
    if values_enabled():
        check_actions(history_actions, "history_actions")
    history_actions = history_actions.astype(np.float32)
    history_surfaces = _surface_field(history_surfaces, "history_surfaces", hist_shape)
    candidate_surfaces = _surface_field(candidate_surfaces, "candidate_surfaces", cand_shape)
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



def _check_hash_config(hash_config) -> None:
    if not isinstance(hash_config, HashConfig):
        raise TypeError(f"hash_config: expected a HashConfig, got {type(hash_config).__name__}")


def _sizes(**sizes) -> list:
    """The named array sizes as ints >= 0 (an error names the argument)."""
    return [check_int(value, name, 0) for name, value in sizes.items()]


def create_dummy_batch_from_config(hash_config: HashConfig, history_len: int, num_candidates: int,
                                   num_actions: int, batch_size: int = 1) -> RecsysBatch:
    """All-zero (all-padding) batch of the right shapes, for parameter init."""
    _check_hash_config(hash_config)
    B, S, C, num_actions = _sizes(batch_size=batch_size, history_len=history_len, num_candidates=num_candidates,
                                  num_actions=num_actions)
    hc = hash_config
    return RecsysBatch(
        user_hashes=np.zeros((B, hc.num_user_hashes), np.int32),
        history_post_hashes=np.zeros((B, S, hc.num_item_hashes), np.int32),
        history_author_hashes=np.zeros((B, S, hc.num_author_hashes), np.int32),
        history_actions=np.zeros((B, S, num_actions), np.float32),
        history_product_surface=np.zeros((B, S), np.int32),
        candidate_post_hashes=np.zeros((B, C, hc.num_item_hashes), np.int32),
        candidate_author_hashes=np.zeros((B, C, hc.num_author_hashes), np.int32),
        candidate_product_surface=np.zeros((B, C), np.int32),
    )


def create_dummy_embeddings_from_config(hash_config: HashConfig, emb_size: int, history_len: int,
                                        num_candidates: int, batch_size: int = 1) -> RecsysEmbeddings:
    """All-zero float32 embeddings of the right shapes."""
    _check_hash_config(hash_config)
    B, S, C, D = _sizes(batch_size=batch_size, history_len=history_len, num_candidates=num_candidates,
                        emb_size=emb_size)
    hc = hash_config
    return RecsysEmbeddings(
        user_embeddings=np.zeros((B, hc.num_user_hashes, D), np.float32),
        history_post_embeddings=np.zeros((B, S, hc.num_item_hashes, D), np.float32),
        candidate_post_embeddings=np.zeros((B, C, hc.num_item_hashes, D), np.float32),
        history_author_embeddings=np.zeros((B, S, hc.num_author_hashes, D), np.float32),
        candidate_author_embeddings=np.zeros((B, C, hc.num_author_hashes, D), np.float32),
    )


ACTION_PROBABILITY = 0.3  # chance that each action is set at a history position in example batches


def create_example_batch(batch_size: int, emb_size: int, history_len: int, num_candidates: int,
                         num_actions: int, num_user_hashes: int = 2, num_item_hashes: int = 2,
                         num_author_hashes: int = 2, product_surface_vocab_size: int = 16,
                         num_user_embeddings: int = 100000, num_post_embeddings: int = 100000,
                         num_author_embeddings: int = 100000, seed: int = 0):
    """Deterministic random (RecsysBatch, RecsysEmbeddings).

    Hashes in [1, table size); each user's history is valid for a random length in [S/2, S] and
    padded (hash 0, no actions, surface 0) after it; actions multi-hot with probability 0.3;
    embeddings standard normal float32.
    """
    B, D, S, C, A, num_user_hashes, num_item_hashes, num_author_hashes = _sizes(
        batch_size=batch_size, emb_size=emb_size, history_len=history_len, num_candidates=num_candidates,
        num_actions=num_actions, num_user_hashes=num_user_hashes, num_item_hashes=num_item_hashes,
        num_author_hashes=num_author_hashes)
    for name, size in (("num_user_embeddings", num_user_embeddings), ("num_post_embeddings", num_post_embeddings),
                       ("num_author_embeddings", num_author_embeddings)):
        check_table_size(size, name)  # hashes are drawn from [1, size)
    check_int(product_surface_vocab_size, "product_surface_vocab_size", 1)
    rng = np.random.default_rng(check_int(seed, "seed", 0))
    user_hashes = rng.integers(1, num_user_embeddings, (B, num_user_hashes)).astype(np.int32)
    hist_post = rng.integers(1, num_post_embeddings, (B, S, num_item_hashes)).astype(np.int32)
    hist_author = rng.integers(1, num_author_embeddings, (B, S, num_author_hashes)).astype(np.int32)
    hist_actions = (rng.random((B, S, A)) < ACTION_PROBABILITY).astype(np.float32)
    hist_surface = rng.integers(0, product_surface_vocab_size, (B, S)).astype(np.int32)
    valid_len = rng.integers(min(max(1, S // 2), S), S + 1, (B,))  # [B]; 0 when S = 0
    valid = np.arange(S)[None, :] < valid_len[:, None]  # [B, S]
    hist_post *= valid[:, :, None]
    hist_author *= valid[:, :, None]
    hist_actions *= valid[:, :, None]
    hist_surface *= valid
    batch = RecsysBatch(
        user_hashes=user_hashes,
        history_post_hashes=hist_post,
        history_author_hashes=hist_author,
        history_actions=hist_actions,
        history_product_surface=hist_surface,
        candidate_post_hashes=rng.integers(1, num_post_embeddings, (B, C, num_item_hashes)).astype(np.int32),
        candidate_author_hashes=rng.integers(1, num_author_embeddings, (B, C, num_author_hashes)).astype(np.int32),
        candidate_product_surface=rng.integers(0, product_surface_vocab_size, (B, C)).astype(np.int32),
    )
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    embeddings = RecsysEmbeddings(
        user_embeddings=normal(B, num_user_hashes, D),
        history_post_embeddings=normal(B, S, num_item_hashes, D),
        candidate_post_embeddings=normal(B, C, num_item_hashes, D),
        history_author_embeddings=normal(B, S, num_author_hashes, D),
        candidate_author_embeddings=normal(B, C, num_author_hashes, D),
    )
    return batch, embeddings


def create_example_corpus(corpus_size: int, emb_size: int, seed: int = 123):
    """-> (corpus [N, D] float32 L2-normalised, corpus_post_ids [N] int64)."""
    corpus_size = check_int(corpus_size, "corpus_size", 0)
    emb_size = check_int(emb_size, "emb_size", 1)  # a unit-norm row needs a component
    rng = np.random.default_rng(check_int(seed, "seed", 0))
    corpus = rng.standard_normal((corpus_size, emb_size), dtype=np.float32)  # [N, D]
    corpus /= np.linalg.norm(corpus, axis=-1, keepdims=True)
    return corpus, np.arange(corpus_size, dtype=np.int64)




# ---------------------------------------------------------------------------------------------
# Embedding tables


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
    phoenix_forward.ModelForward creates them at init in the same `hk.transform` as the model
    and looks them up with the pure `lookup` afterwards.
    """

    def __init__(
        self,
        hash_config: HashConfig,
        emb_size: int,
        init_stddev: float = DEFAULT_INIT_STDDEV,
        name: str | None = TABLE_MODULE,
    ):
        super().__init__(name=name)
        self.hash_config = hash_config
        self.emb_size = emb_size
        self.init_stddev = init_stddev

    def _table(self, name: str, num_rows: int) -> jax.Array:
        check_table_size(num_rows)
        init = hk.initializers.RandomNormal(stddev=self.init_stddev)
        return hk.get_parameter(name, [num_rows, self.emb_size], jnp.float32, init=init)  # [M, D]

    def __call__(self, batch: RecsysBatch) -> RecsysEmbeddings:
        cfg = self.hash_config
        return embed({"user_table": self._table("user_table", cfg.user_table_size),  # [Mu, D]
                      "post_table": self._table("post_table", cfg.post_table_size),  # [Mp, D]
                      "author_table": self._table("author_table", cfg.author_table_size)}, batch)  # [Ma, D]


def embed(tables: Mapping[str, jax.Array], batch: RecsysBatch) -> RecsysEmbeddings:
    """The batch's embeddings from tables {"user_table" [Mu, D], "post_table" [Mp, D],
    "author_table" [Ma, D]}: pure gathers (`lookup`), the same inside HashEmbeddings and outside
    any transform (phoenix_forward)."""
    user, post, author = tables["user_table"], tables["post_table"], tables["author_table"]
    return RecsysEmbeddings(
        user_embeddings=lookup(user, batch.user_hashes),  # [B, Hu, D]
        history_post_embeddings=lookup(post, batch.history_post_hashes),  # [B, S, Hi, D]
        candidate_post_embeddings=lookup(post, batch.candidate_post_hashes),  # [B, C, Hi, D]
        history_author_embeddings=lookup(author, batch.history_author_hashes),  # [B, S, Ha, D]
        candidate_author_embeddings=lookup(author, batch.candidate_author_hashes),  # [B, C, Ha, D]
    )
