"""Phoenix ranking demo.

    uv run run_ranker.py [--batch-size 2] [--history-len 32] [--num-candidates 8] [--seed 0]

Builds the release's demo ranker (D=128, 2 layers, key size 64, 2 query + 2 kv heads, widening 2,
attention multiplier 0.125, S=32, C=8), ranks a random example batch and prints, per user, the
candidates best-first with a probability bar for every engagement action, then compile time and
steady-state time per `rank` call. Takes about 10 s on 2 CPU cores, most of it JAX start-up and
compilation. The weights are randomly initialised (not trained), so the ranking is arbitrary but,
unlike the release's zero-initialised demo, the scores differ between candidates and actions.
"""

import argparse
import time

import jax
import numpy as np

from grok import TransformerConfig
from recsys_model import HashConfig, PhoenixModelConfig
from runners import ACTIONS, ModelRunner, RecsysInferenceRunner, create_example_batch

BAR_WIDTH = 30


def demo_config(emb_size=128, num_layers=2, history_len=32, num_candidates=8) -> PhoenixModelConfig:
    """The release's demo configuration."""
    return PhoenixModelConfig(
        model=TransformerConfig(emb_size=emb_size, key_size=64, num_q_heads=2, num_kv_heads=2,
                                num_layers=num_layers, widening_factor=2, attn_output_multiplier=0.125),
        emb_size=emb_size, num_actions=len(ACTIONS), history_seq_len=history_len,
        candidate_seq_len=num_candidates, hash_config=HashConfig())


def bar(p: float) -> str:
    filled = p * BAR_WIDTH
    return "█" * int(filled) + ("▌" if filled - int(filled) >= 0.5 else "")


def time_calls(fn, repeats: int):
    """-> (first call seconds, median of `repeats` later calls in seconds)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--emb-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--history-len", type=int, default=32)
    parser.add_argument("--num-candidates", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the example batch and the parameters")
    parser.add_argument("--show-top", type=int, default=3, help="candidates per user shown with all action bars")
    args = parser.parse_args(argv)

    cfg = demo_config(args.emb_size, args.num_layers, args.history_len, args.num_candidates)
    ranker = RecsysInferenceRunner(ModelRunner(cfg, rng_seed=args.seed), name="demo_ranker")
    ranker.initialize()
    batch, embeddings = create_example_batch(args.batch_size, args.emb_size, args.history_len,
                                             args.num_candidates, len(ACTIONS), seed=args.seed)
    compile_s, call_s = time_calls(lambda: ranker.rank(batch, embeddings).scores, repeats=20)
    out = ranker.rank(batch, embeddings)
    scores = np.asarray(out.scores)  # [B, C, A]
    ranked = np.asarray(out.ranked_indices)  # [B, C]

    print(f"Phoenix ranker: D={args.emb_size}, {args.num_layers} layers, S={args.history_len}, "
          f"C={args.num_candidates}, B={args.batch_size}, seed {args.seed} (random init, untrained)")
    for b in range(args.batch_size):
        print(f"\nUser {b}: candidates ranked by P(favorite)")
        print("  rank  cand  " + "  ".join(f"{a[:10]:>10}" for a in ACTIONS[:5]) + "   ...")
        for r, c in enumerate(ranked[b]):
            print(f"  {r + 1:>4}  {c:>4}  " + "  ".join(f"{p:>10.4f}" for p in scores[b, c, :5]))
        for r, c in enumerate(ranked[b][: args.show_top]):
            print(f"\n  #{r + 1}: candidate {c}")
            for a, p in zip(ACTIONS, scores[b, c]):
                print(f"    {a:<27} {p:6.4f} {bar(p)}")
    spread = scores.max(axis=1) - scores.min(axis=1)  # [B, A]
    print(f"\nscore spread across candidates (max - min, mean over users and actions): {spread.mean():.4f}")
    print(f"compile + first call: {compile_s:.2f} s   steady-state rank(): {call_s * 1e3:.2f} ms/call "
          f"(median of 20)")


if __name__ == "__main__":
    main()
