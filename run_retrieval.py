"""Phoenix retrieval demo.

    uv run run_retrieval.py [--batch-size 2] [--corpus-size 1000] [--top-k 10] [--seed 0]

Builds the release's demo two-tower model (user tower: D=128, 2 layers, key size 64, 2+2 heads,
widening 2, multiplier 0.125, S=32; MLP candidate tower), encodes a random example batch, and
retrieves the top-10 of a 1,000-item example corpus for every user, printing one table per user
(rank, corpus index, post id, score), then compile time and steady-state time per `retrieve` call.
Takes about 10 s on 2 CPU cores. The weights are randomly initialised, not trained.
"""

import argparse

import numpy as np

from grok import TransformerConfig
from recsys_model import HashConfig
from recsys_retrieval_model import PhoenixRetrievalModelConfig
from run_ranker import time_calls
from runners import (ACTIONS, RecsysRetrievalInferenceRunner, RetrievalModelRunner, create_example_batch,
                     create_example_corpus)


def demo_config(emb_size=128, num_layers=2, history_len=32, num_candidates=8) -> PhoenixRetrievalModelConfig:
    """The release's demo configuration."""
    return PhoenixRetrievalModelConfig(
        model=TransformerConfig(emb_size=emb_size, key_size=64, num_q_heads=2, num_kv_heads=2,
                                num_layers=num_layers, widening_factor=2, attn_output_multiplier=0.125),
        emb_size=emb_size, history_seq_len=history_len, candidate_seq_len=num_candidates,
        hash_config=HashConfig())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--emb-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--history-len", type=int, default=32)
    parser.add_argument("--corpus-size", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the example batch and the parameters")
    args = parser.parse_args(argv)

    cfg = demo_config(args.emb_size, args.num_layers, args.history_len)
    retriever = RecsysRetrievalInferenceRunner(RetrievalModelRunner(cfg, rng_seed=args.seed), name="demo_retrieval")
    retriever.initialize()
    batch, embeddings = create_example_batch(args.batch_size, args.emb_size, args.history_len,
                                             cfg.candidate_seq_len, len(ACTIONS), seed=args.seed)
    corpus, post_ids = create_example_corpus(args.corpus_size, args.emb_size)
    retriever.set_corpus(corpus, post_ids)
    compile_s, call_s = time_calls(lambda: retriever.retrieve(batch, embeddings, top_k=args.top_k).top_k_scores,
                                   repeats=20)
    out = retriever.retrieve(batch, embeddings, top_k=args.top_k)
    indices, scores = np.asarray(out.top_k_indices), np.asarray(out.top_k_scores)

    print(f"Phoenix retrieval: D={args.emb_size}, {args.num_layers} layers, S={args.history_len}, "
          f"corpus {args.corpus_size}, top-{args.top_k}, B={args.batch_size}, seed {args.seed} (random init)")
    for b in range(args.batch_size):
        print(f"\nUser {b}: top-{args.top_k} of {args.corpus_size}")
        print("  rank  index   post_id    score")
        for r, (i, s) in enumerate(zip(indices[b], scores[b])):
            print(f"  {r + 1:>4}  {i:>5}  {retriever.corpus_post_ids[i]:>8}  {s:+.4f}")
    print(f"\ncompile + first call: {compile_s:.2f} s   steady-state retrieve(): {call_s * 1e3:.2f} ms/call "
          f"(median of 20)")


if __name__ == "__main__":
    main()
