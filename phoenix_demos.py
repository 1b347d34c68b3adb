"""What the demos (run_ranker.py, run_retrieval.py) and the benchmarks (bench.py) share: the
release's demo models, what a demo trains and shows, its checkpoint cache, and timing.

    options = phoenix_demos.RankerDemo(steps=50)
    world = SyntheticWorld(phoenix_demos.demo_world_config(options))
    cfg = phoenix_demos.demo_ranker_config(hash_config=phoenix_demos.demo_hash_config(world.cfg))

The demo model is the release's (D=128, 2 layers, 2 heads of 64, widening 2, attention multiplier
0.125); a demo trains it on the synthetic world (phoenix_synthetic.py) and caches the checkpoint
under a key of everything that shaped it (cache_key), so a second run loads instead of training.

Shape glossary
  E  examples (rows of an examples dict)
"""

import dataclasses
import hashlib
import json
import numbers
import statistics
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

import phoenix_checkpoint as checkpoint
import phoenix_configs as configs
import phoenix_training as training
from phoenix_inputs import HashConfig
from phoenix_paths import checkpoint_path
from phoenix_sizes import ModelSizes, ranker_config, retrieval_config
from phoenix_synthetic import WORLD_OVERRIDES, WorldConfig, world_config
from recsys_model import PhoenixModelConfig
from recsys_retrieval_model import PhoenixRetrievalModelConfig

__all__ = ["RankerDemo", "RetrievalDemo", "demo_world_config", "demo_hash_config", "demo_sizes", "demo_ranker_config",
           "demo_retrieval_config", "cache_key", "cached_checkpoint", "load_or_train", "fit_and_cache", "time_calls",
           "Timing", "DEMO_LEARNING_RATE"]

DEMO_LEARNING_RATE = 6e-3  # the demos' 250 steps learn more with it than with 3e-3 (docs/synthetic.md)


# ---------------------------------------------------------------------------------------------
# What a demo trains and shows (its command line's flags are these fields)


def _option(default, help: Optional[str] = None, low: Optional[int] = 1):
    """A field with its flag's help and its lowest allowed value (None: any; Optional fields may be None)."""
    metadata = {"low": low} if low is not None else {}
    return dataclasses.field(default=default, metadata={**metadata, "help": help} if help else metadata)


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """A demo's run: training, cache, model and world sizes, then what it shows."""

    no_train: bool = _option(False, "untrained release-style demo on random data", low=None)
    steps: int = _option(250, "training steps (part of the cache key)", low=0)
    checkpoint: Optional[str] = _option(None, "cached trained model (default: under $PHOENIX_CACHE_DIR, else "
                                              "~/.cache/phoenix)", low=None)
    seed: int = _option(0, "seed of the parameters and the training stream", low=0)
    batch_size: int = _option(2, "users per rank / retrieve call (shown and timed)")
    train_batch_size: int = _option(64, "users (ranker) or in-batch softmax rows (retrieval) per training step")
    emb_size: int = _option(128)  # the release's demo model
    num_layers: int = _option(2)
    history_len: int = _option(32)
    num_users: int = _option(WorldConfig.num_users)  # the synthetic world's defaults
    num_posts: int = _option(WorldConfig.num_posts)
    num_authors: int = _option(WorldConfig.num_authors)
    world_seed: int = _option(WorldConfig.seed, low=0)
    num_candidates: int = _option(8, "the world's ranking candidates (the retrieval demo does not rank)")
    eval_examples: int = _option(1000, "held-out examples for the figures")

    CHECKPOINT_NAME = "demo"  # the default checkpoint: <cache>/checkpoints/<name>

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, low = getattr(self, field.name), field.metadata.get("low")
            if low is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low):
                raise ValueError(f"{type(self).__name__}.{field.name}: expected an int >= {low}, got {value!r}")
        if not self.no_train:
            demo_world_config(self)  # the world's own checks (e.g. num_authors <= num_posts), before any work
        if self.checkpoint is None:  # the cache directory as of now, not as of import
            object.__setattr__(self, "checkpoint", checkpoint_path(self.CHECKPOINT_NAME))


@dataclasses.dataclass(frozen=True)
class RankerDemo(DemoOptions):
    """run_ranker.py's run."""

    show_top: int = _option(2, "candidates per user shown with all action bars")

    CHECKPOINT_NAME = "demo_ranker"


@dataclasses.dataclass(frozen=True)
class RetrievalDemo(DemoOptions):
    """run_retrieval.py's run."""

    top_k: int = _option(10, "posts shown per user")
    corpus_size: int = _option(1000, "random corpus of --no-train")

    def __post_init__(self):
        super().__post_init__()
        if self.no_train and self.top_k > self.corpus_size:
            raise ValueError(f"RetrievalDemo.top_k: expected <= corpus_size ({self.corpus_size}) with no_train, got "
                             f"{self.top_k}")

    CHECKPOINT_NAME = "demo_retrieval"


# ---------------------------------------------------------------------------------------------
# The demo models


def demo_world_config(options: DemoOptions) -> WorldConfig:
    """The experiments' world (phoenix_synthetic.world_config) with the demo's sizes."""
    return world_config(num_users=options.num_users, num_posts=options.num_posts, num_authors=options.num_authors,
                        history_len=options.history_len, num_candidates=options.num_candidates,
                        seed=options.world_seed,
                        min_history_len=min(WORLD_OVERRIDES["min_history_len"], options.history_len))


def demo_hash_config(world_cfg: WorldConfig) -> HashConfig:
    """Tables of about twice each vocabulary (+1 for the unknown user): few collisions with 2 hashes."""
    return HashConfig(user_table_size=2 * world_cfg.num_users + 3, post_table_size=2 * world_cfg.num_posts + 7,
                      author_table_size=2 * world_cfg.num_authors + 1)


def demo_sizes(emb_size: int = 128, num_layers: int = 2) -> ModelSizes:
    """The release's demo transformer: 2 heads of 64, widening 2, attention multiplier 0.125."""
    return ModelSizes(emb_size=emb_size, num_layers=num_layers, num_heads=2, key_size=64, widening_factor=2,
                      attn_output_multiplier=0.125)


def demo_ranker_config(emb_size=128, num_layers=2, history_len=32, num_candidates=8, hash_config=None,
                       fprop_dtype=jnp.bfloat16) -> PhoenixModelConfig:
    """The release's demo ranker (default: its HashConfig and bfloat16 activations)."""
    return ranker_config(demo_sizes(emb_size, num_layers), history_len, num_candidates, hash_config, fprop_dtype)


def demo_retrieval_config(emb_size=128, num_layers=2, history_len=32, num_candidates=8, hash_config=None,
                          fprop_dtype=jnp.bfloat16) -> PhoenixRetrievalModelConfig:
    """The release's demo retrieval model (default: its HashConfig and bfloat16 activations)."""
    return retrieval_config(demo_sizes(emb_size, num_layers), history_len, hash_config, num_candidates,
                            fprop_dtype=fprop_dtype)


# ---------------------------------------------------------------------------------------------
# The checkpoint cache


def cache_key(*parts) -> str:
    """A short digest of configs (dataclasses) and plain values: equal iff they are all equal."""
    data = [configs.config_to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_checkpoint(path: str, key: str) -> str:
    """"hit" if `path` holds a checkpoint saved with cache key `key`, else "missing" or "stale"."""
    try:
        extra = checkpoint.read_meta(path).get("extra") or {}
    except (FileNotFoundError, ValueError):
        return "missing"
    return "hit" if extra.get("cache_key") == key else "stale"


def load_or_train(path: str, key: str, what: str, train) -> tuple[bool, float]:
    """(loaded, seconds): True, 0.0 when `path` already holds a `what` saved under cache key `key`;
    else False and the seconds `train()` took to train and save one there (a stale one, of another
    key, is retrained)."""
    status = cached_checkpoint(path, key)
    if status == "hit":
        print(f"loading the cached {what} from {path} (key {key})")
        return True, 0.0
    if status == "stale":
        print(f"{path} holds a {what} of another config/seed/steps; retraining")
    train_s = train()
    print(f"trained in {train_s:.0f} s (compile included), saved to {path} (key {key})")
    return False, train_s


def fit_and_cache(trainer, state, stream, steps: int, seed: int, path: str, key: str, unknown_user_id: int) -> None:
    """A demo's training: `steps` steps of fit over `stream` (closed after), then the state saved to
    `path` under cache key `key` (with the seed, steps and the unknown-user id)."""
    state, _ = training.fit(trainer, state, stream, steps, log_every=max(1, min(50, steps)))
    stream.close()
    trainer.save(path, state, extra={"cache_key": key, "seed": seed, "steps": steps,
                                     "unknown_user_id": unknown_user_id})


# ---------------------------------------------------------------------------------------------
# Timing


class Timing(NamedTuple):
    first_s: float  # the first call: tracing + compilation + one run
    median_ms: float  # steady state
    min_ms: float


def time_calls(fn, runs: int) -> Timing:
    """Times `fn()` once cold, then `runs` times; every call is waited on (block_until_ready)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return Timing(first, 1e3 * statistics.median(times), 1e3 * min(times))
