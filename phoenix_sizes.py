"""Model configs from a few sizes: the one family of config factories behind every recipe.

    sizes = phoenix_sizes.ModelSizes(emb_size=64, num_layers=2, num_heads=2)
    ranker = phoenix_sizes.ranker_config(sizes, history_len=5, num_candidates=8, hash_config=HashConfig())
    two_tower = phoenix_sizes.retrieval_config(sizes, history_len=5, hash_config=HashConfig(), pooling="last")

Each recipe says how big its models are with ModelSizes and builds its configs here: the two-stage
Recipe (phoenix_two_stage.py), the synthetic experiment (train_synthetic.py), the release-style
demos (phoenix_demos.py) and the SASRec reference (phoenix_sasrec.py, transformer only).
"""

import dataclasses
import math
from typing import Optional

import numpy as np

from grok import TransformerConfig
from phoenix_inputs import ACTIONS, HashConfig
from recsys_model import PhoenixModelConfig
from recsys_retrieval_model import PhoenixRetrievalModelConfig

__all__ = ["ModelSizes", "ranker_config", "retrieval_config"]


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """The transformer's sizes; what the defaults leave open follows from the rest."""

    emb_size: int  # D
    num_layers: int
    num_heads: int  # query heads, and as many key/value heads
    key_size: Optional[int] = None  # None: emb_size // num_heads (heads split D)
    widening_factor: float = 4.0  # feed-forward width / D (grok.ffn_size rounds it)
    attn_output_multiplier: Optional[float] = None  # None: 1 / sqrt(key_size), the usual attention scale

    def transformer(self) -> TransformerConfig:
        key_size = self.key_size or self.emb_size // self.num_heads
        multiplier = self.attn_output_multiplier
        return TransformerConfig(emb_size=self.emb_size, key_size=key_size, num_q_heads=self.num_heads,
                                 num_kv_heads=self.num_heads, num_layers=self.num_layers,
                                 widening_factor=self.widening_factor,
                                 attn_output_multiplier=1.0 / math.sqrt(key_size) if multiplier is None else multiplier)


def ranker_config(sizes: ModelSizes, history_len: int, num_candidates: int, hash_config: Optional[HashConfig] = None,
                  fprop_dtype=np.float32) -> PhoenixModelConfig:
    """The ranker (all ACTIONS) of `sizes` over histories of S = history_len and C = num_candidates
    candidates; hash_config None: the release's HashConfig()."""
    return PhoenixModelConfig(model=sizes.transformer(), emb_size=sizes.emb_size, num_actions=len(ACTIONS),
                              history_seq_len=history_len, candidate_seq_len=num_candidates,
                              hash_config=hash_config or HashConfig(), fprop_dtype=fprop_dtype).initialize()


def retrieval_config(sizes: ModelSizes, history_len: int, hash_config: Optional[HashConfig] = None,
                     candidate_seq_len: int = 1, pooling: str = "mean",
                     fprop_dtype=np.float32) -> PhoenixRetrievalModelConfig:
    """The two-tower model of `sizes` whose user tower reads S = history_len items, pooled by `pooling`
    (recsys_retrieval_model.POOLINGS); hash_config None: the release's HashConfig()."""
    return PhoenixRetrievalModelConfig(model=sizes.transformer(), emb_size=sizes.emb_size,
                                       history_seq_len=history_len, candidate_seq_len=candidate_seq_len,
                                       hash_config=hash_config or HashConfig(), fprop_dtype=fprop_dtype,
                                       pooling=pooling).initialize()
