"""The experiment toolkit: config factories, the checkpoint cache, timing and the demos' shared flags.

The demos (run_ranker.py, run_retrieval.py), the synthetic experiment (train_synthetic.py) and the
benchmarks (bench.py) take these from here rather than from each other.

Shape glossary
  n  examples (rows of an examples dict)
"""

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

import movielens as ml
import phoenix_checkpoint as checkpoint
import phoenix_training as training
from grok import TransformerConfig
from phoenix_datasets import WorldConfig
from phoenix_inputs import ACTIONS, HashConfig
from phoenix_optim import OptimizerConfig
from recsys_model import PhoenixModelConfig
from recsys_retrieval_model import PhoenixRetrievalModelConfig

# The synthetic world of the experiments: WorldConfig defaults except two knobs.
WORLD_OVERRIDES = {
    "min_history_len": 16,  # default 4: a 4-post history says little about a new user's taste
    "impression_temperature": 0.3,  # default 0.5: feeds concentrate on the user's closest authors
}
TABLE_INIT_STDDEV = 0.1  # hash-table rows start small, so Adam's fixed-size steps move them fast
DEMO_LEARNING_RATE = 6e-3  # the demos' 250 steps; 3e-3 learned less in them


# ---------------------------------------------------------------------------------------------
# Config factories


def world_config(**overrides) -> WorldConfig:
    """The experiments' world: WorldConfig defaults, then WORLD_OVERRIDES, then `overrides`."""
    return WorldConfig(**{**WORLD_OVERRIDES, **overrides})


def demo_world_config(args) -> WorldConfig:
    """The world with the demos' sizes (args: num_users, num_posts, num_authors, history_len,
    num_candidates, world_seed)."""
    return world_config(num_users=args.num_users, num_posts=args.num_posts, num_authors=args.num_authors,
                        history_len=args.history_len, num_candidates=args.num_candidates, seed=args.world_seed,
                        min_history_len=min(WORLD_OVERRIDES["min_history_len"], args.history_len))


def demo_hash_config(world_cfg: WorldConfig) -> HashConfig:
    """Tables of about twice each vocabulary (+1 for the unknown user): few collisions with 2 hashes."""
    return HashConfig(user_table_size=2 * world_cfg.num_users + 3, post_table_size=2 * world_cfg.num_posts + 7,
                      author_table_size=2 * world_cfg.num_authors + 1)


def demo_transformer_config(emb_size: int = 128, num_layers: int = 2) -> TransformerConfig:
    """The release's demo transformer: 2 heads of 64, widening 2."""
    return TransformerConfig(emb_size=emb_size, key_size=64, num_q_heads=2, num_kv_heads=2, num_layers=num_layers,
                             widening_factor=2, attn_output_multiplier=0.125)


def demo_ranker_config(emb_size=128, num_layers=2, history_len=32, num_candidates=8, hash_config=None,
                       fprop_dtype=jnp.bfloat16) -> PhoenixModelConfig:
    """The release's demo ranker (default: its HashConfig and bfloat16 activations)."""
    return PhoenixModelConfig(model=demo_transformer_config(emb_size, num_layers), emb_size=emb_size,
                              num_actions=len(ACTIONS), history_seq_len=history_len,
                              candidate_seq_len=num_candidates, hash_config=hash_config or HashConfig(),
                              fprop_dtype=fprop_dtype)


def demo_retrieval_config(emb_size=128, num_layers=2, history_len=32, num_candidates=8, hash_config=None,
                          fprop_dtype=jnp.bfloat16) -> PhoenixRetrievalModelConfig:
    """The release's demo retrieval model (default: its HashConfig and bfloat16 activations)."""
    return PhoenixRetrievalModelConfig(model=demo_transformer_config(emb_size, num_layers), emb_size=emb_size,
                                       history_seq_len=history_len, candidate_seq_len=num_candidates,
                                       hash_config=hash_config or HashConfig(), fprop_dtype=fprop_dtype)


def optimizer_config(learning_rate: float, steps: int, warmup_steps: int = 50) -> OptimizerConfig:
    """AdamW, linear warmup, cosine decay to 10% at the last step; dense table updates."""
    warmup = min(warmup_steps, max(steps - 1, 0))
    return OptimizerConfig(learning_rate=learning_rate, warmup_steps=warmup,
                           decay_steps=steps if steps > warmup else None, sparse_table_updates=False)


# ---------------------------------------------------------------------------------------------
# The checkpoint cache


def checkpoint_path(name: str) -> str:
    """Default checkpoint location: <cache>/checkpoints/<name>, the cache being $PHOENIX_CACHE_DIR or
    ~/.cache/phoenix (movielens.cache_dir). Read when called, not at import, so that tests can redirect it."""
    return str(ml.cache_dir() / "checkpoints" / name)


def cache_key(*parts) -> str:
    """A short digest of configs (dataclasses) and plain values: equal iff they are all equal."""
    data = [checkpoint.config_to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
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


def fit_and_cache(trainer, state, stream, args, path: str, key: str, unknown_user_id: int) -> None:
    """A demo's training: `args.steps` steps of fit over `stream` (closed after), then the state
    saved to `path` under cache key `key` (with the seed, steps and the unknown-user id)."""
    state, _ = training.fit(trainer, state, stream, args.steps, log_every=max(1, min(50, args.steps)))
    stream.close()
    trainer.save(path, state, extra={"cache_key": key, "seed": args.seed, "steps": args.steps,
                                     "unknown_user_id": unknown_user_id})


# ---------------------------------------------------------------------------------------------
# Timing and data helpers


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


def take(examples: dict, rows) -> dict:
    """The rows [n'] of every array of an examples dict."""
    return {k: v[rows] for k, v in examples.items()}


def chunks(num: int, size: int):
    """Slices covering range(num) in pieces of `size` (the last may be shorter)."""
    for start in range(0, num, size):
        yield slice(start, min(start + size, num))


# ---------------------------------------------------------------------------------------------
# The demos' shared flags


# What differs between the two demos' command lines: {demo: (checkpoint name, per-call noun,
# training rows noun, extra flags {flag: add_argument kwargs})}.
DEMOS = {
    "ranker": ("demo_ranker", "rank", "users", {
        "--num-candidates": dict(type=int, default=8),
        "--eval-examples": dict(type=int, default=1000, help="held-out examples for the correlation"),
        "--show-top": dict(type=int, default=2, help="candidates per user shown with all action bars"),
    }),
    "retrieval": ("demo_retrieval", "retrieve", "in-batch softmax rows", {
        "--top-k": dict(type=int, default=10, help="posts shown per user"),
        "--num-candidates": dict(type=int, default=8, help="(world's ranking candidates; unused here)"),
        "--eval-examples": dict(type=int, default=1000, help="held-out examples for overlap and recall"),
        "--corpus-size": dict(type=int, default=1000, help="random corpus of --no-train"),
    }),
}


def add_demo_flags(parser: argparse.ArgumentParser, demo: str) -> None:
    """The flags of run_ranker ("ranker") or run_retrieval ("retrieval"): training, cache, model and
    world sizes, then the demo's own (DEMOS)."""
    checkpoint_name, call, train_rows, extra = DEMOS[demo]
    world = world_config()
    parser.add_argument("--no-train", action="store_true", help="untrained release-style demo on random data")
    parser.add_argument("--steps", type=int, default=250, help="training steps (part of the cache key)")
    parser.add_argument("--checkpoint", default=checkpoint_path(checkpoint_name),
                        help="cached trained model (default: under $PHOENIX_CACHE_DIR, else ~/.cache/phoenix)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and the training stream")
    parser.add_argument("--batch-size", type=int, default=2, help=f"users per {call} call (shown and timed)")
    parser.add_argument("--train-batch-size", type=int, default=64, help=f"{train_rows} per training step")
    parser.add_argument("--emb-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--history-len", type=int, default=32)
    parser.add_argument("--num-users", type=int, default=world.num_users)
    parser.add_argument("--num-posts", type=int, default=world.num_posts)
    parser.add_argument("--num-authors", type=int, default=world.num_authors)
    parser.add_argument("--world-seed", type=int, default=world.seed)
    for flag, kwargs in extra.items():
        parser.add_argument(flag, **kwargs)


def demo_entry_points(doc: str, demo: str, main_trained, main_untrained):
    """(parse_args, main) of a demo ("ranker" or "retrieval", add_demo_flags); main(argv) runs
    main_untrained(args) with --no-train, else main_trained(args), and returns its result dict."""
    def parse_args(argv):
        parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
        add_demo_flags(parser, demo)
        return parser.parse_args(argv)

    def main(argv=None) -> dict:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return main_untrained(args) if args.no_train else main_trained(args)

    return parse_args, main
