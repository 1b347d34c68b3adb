"""One forward per model, shared by the trainers and the runners: a table lookup plus the model.

`ModelForward(model_config)` wraps the model in a single `hk.transform`. Its parameters are the
model's (the release's parameter tree) and, when the forward owns hash tables, the tables under
`hash_embeddings/` (phoenix_inputs.HashEmbeddings; names are part of the checkpoint format).

  forward.init(rng, batch)                  tables + model, as a trainer starts
  forward.init(rng, batch, embeddings)      the model alone, as a runner starts from given embeddings
  forward.init(rng, batch, table_init=fn)   tables made by fn(name, key, shape, dtype) (sharded init)
  forward.apply(params, batch, embeddings=None, call="__call__", rng=None, **kwargs)

`apply` looks the batch's hashes up in `params["hash_embeddings"]` (`embed`, a pure gather) when no
embeddings are given, then runs `call` on the model: the name of a public model method
(`__call__`, `encode_prefix`, `score_candidates`, `build_user_representation`, ...) or a function
`(model, batch, embeddings, **kwargs) -> outputs` when one pass needs several of them. The tables
may be any rows of the full ones with the batch's hashes renumbered to match (the sparse training
step passes the compacted rows it differentiates): the lookup reads each table's own shape.

Shape glossary
  B  batch (users)   S  history length   C  candidates per user   D  embedding size
  M  rows of one hash table   Hu / Hi / Ha  number of user / item (post) / author hashes
"""

from typing import Callable, Optional, Union

import haiku as hk
import jax.numpy as jnp

from phoenix_inputs import (DEFAULT_INIT_STDDEV, TABLE_MODULE, HashConfig, HashEmbeddings, RecsysBatch,
                            RecsysEmbeddings, embed)

__all__ = ["ModelForward", "both_towers", "Call"]


def both_towers(model, batch: RecsysBatch, embeddings):
    """A retrieval model's (user [B, D], candidates [B, C, D], candidate_mask [B, C]), float32."""
    user, _ = model.build_user_representation(batch, embeddings)  # [B, D]
    candidates, candidate_mask = model.build_candidate_representation(batch, embeddings)  # [B, C, D]
    return user.astype(jnp.float32), candidates.astype(jnp.float32), candidate_mask


Call = Union[str, Callable]


def _table_creator(table_init: Callable):
    """A haiku creator that makes each table by `table_init` from the one key its own init would draw."""
    def creator(next_creator, shape, dtype, init, context):
        name = context.name
        return next_creator(shape, dtype, lambda shape, dtype: table_init(name, hk.next_rng_key(), shape, dtype))
    return creator


def _run(model, call: Call, batch, embeddings, kwargs):
    if callable(call):
        return call(model, batch, embeddings, **kwargs)
    return getattr(model, call)(batch, embeddings, **kwargs)


class ModelForward:
    """The model of `model_config` (tables sized by `hash_config`, default the config's) as pure
    functions; see the module docstring."""

    def __init__(self, model_config, hash_config: Optional[HashConfig] = None,
                 table_init_stddev: Optional[float] = None):
        self.model_config = model_config.initialize()
        self.hash_config = hash_config or self.model_config.hash_config
        # The tables' initial rows are table_init_stddev * N(0, 1) (HashEmbeddings' RandomNormal).
        self.table_init_stddev = stddev = DEFAULT_INIT_STDDEV if table_init_stddev is None else table_init_stddev

        def forward(batch, embeddings=None, call: Call = "__call__", table_init=None, **kwargs):
            if embeddings is None:  # only at init: create the tables (in the order checkpoints hold them)
                tables = HashEmbeddings(self.hash_config, self.model_config.emb_size, stddev)
                if table_init is None:
                    embeddings = tables(batch)
                else:
                    with hk.custom_creator(_table_creator(table_init)):
                        embeddings = tables(batch)
            return _run(self.model_config.make(), call, batch, embeddings, kwargs)

        self.transformed = hk.transform(forward)

    def init(self, rng, batch: RecsysBatch, embeddings: Optional[RecsysEmbeddings] = None,
             call: Call = "__call__", table_init: Optional[Callable] = None, **kwargs):
        """Parameters: tables + model without `embeddings`, the model alone with them. `call` must
        reach every parameter the model should have (e.g. both towers of the retrieval model).
        `table_init(name, key, shape, dtype) -> [M, D]`, if given, makes each table in place of its
        random-normal init, from the key haiku gives that table (the model's keys stay the same)."""
        return self.transformed.init(rng, batch, embeddings, call, table_init, **kwargs)

    def apply(self, params, batch: RecsysBatch, embeddings: Optional[RecsysEmbeddings] = None,
              call: Call = "__call__", rng=None, **kwargs):
        """`call` on the model; the embeddings are looked up in params' tables unless given."""
        if embeddings is None:
            embeddings = embed(params[TABLE_MODULE], batch)
        return self.transformed.apply(params, rng, batch, embeddings, call, **kwargs)
