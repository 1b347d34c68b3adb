"""Phoenix retrieval demo: a two-tower model trained on the synthetic world, checked against its truth.

    uv run run_retrieval.py                  # train (or reuse the cached checkpoint), retrieve, compare
    uv run run_retrieval.py --no-train       # the release's demo: random init, random batch and corpus
    uv run run_retrieval.py [--steps 250] [--checkpoint DIR] [--seed 0] [--top-k 10]
    phoenix-retrieve [flags]                 # the same, once the package is installed (pip install .)

The model is the release's demo two-tower model (user tower: D=128, 2 layers, key size 64, 2+2
heads, widening 2, multiplier 0.125, S=32; MLP candidate tower), with hash tables sized to the
synthetic world (phoenix_synthetic.py: 1k users, 5k posts, 200 authors) and float32 activations. By
default it is trained for --steps steps of in-batch softmax (64 rows) with logQ correction (~45
s on 2 CPU cores, progress on stderr) and saved to --checkpoint (default
$PHOENIX_CACHE_DIR/checkpoints/demo_retrieval, $PHOENIX_CACHE_DIR defaulting to ~/.cache/phoenix)
with a key of its config, world, seed and steps; a later run with the same key loads it
(`RecsysRetrievalInferenceRunner.from_checkpoint`) instead of training, a run with another key
retrains and overwrites it.

It then encodes every post of the world with the candidate tower (the full corpus), retrieves the
top --top-k posts for --batch-size users held out of training (cold-start: the model sees their
history, not their id) and prints them beside the user's TRUE top posts, ranked by the world's
P(next engaged post | user) (impression probability, from affinity, x engagement probability),
with each post's true affinity, that probability (column P(next)), its true rank and how often
the user's history engaged with its author.
Then, over --eval-examples held-out examples: the overlap of the retrieved top-K with the true
top-K, and recall@100 of the user's actual next engagement over the full corpus for the model, a
popularity ranking and the oracle; and compile time and steady-state time per `retrieve` call.

Output (seed 0, the defaults; excerpt; the true top-10 is sorted by P(next), not by affinity):

    trained in 41 s (compile included), saved to ~/.cache/phoenix/checkpoints/demo_retrieval (key cd493a6b4853c537)
    Held-out user 40 (29 history engagements, id unknown to the model): retrieved top-10 | the
    user's true top-10, sorted by P(next); overlap 7/10
      rank   post author hist  score  affinity  P(next) true-rank |   post author hist  affinity  P(next)
         1    532     11   14 +0.279     +2.76   2.820%         2 |    319     11   14     +2.63   2.827%
         2    352     11   14 +0.277     +2.68   2.802%         6 |    532     11   14     +2.76   2.820%
      ...
    Over 1000 held-out examples (100 users):
      overlap of the retrieved top-10 with the true top-10: 28.0% (random posts: 0.20%)
      mean true affinity of the retrieved top-10: +1.52 (random posts: +0.00)
      recall@100 of the next engaged post over all 5,000 posts: model 0.347, popularity 0.125, oracle 0.577
    compile + first call: 0.63 s   steady-state retrieve(top_k=100): 2.07 ms/call (B=2, median of 20)

Duration (2 CPU cores shared with another training job): 47 s from a fresh copy of the repository
(venv from uv's cache; downloading the packages adds ~20-30 s), training 41 s of it; 7 s with
the cache. With --no-train about 10 s (1,000-item random corpus; weights random, so the ranking
is arbitrary).
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import phoenix_demos as demos
import phoenix_run_dir as run_dir
import phoenix_synthetic as synthetic
import phoenix_training as training
import run_train
from phoenix_batching import chunks, take
from phoenix_metrics import recall_at_k
from phoenix_synthetic import SyntheticWorld, to_retrieval_batch
from runners import (ACTIONS, RecsysRetrievalInferenceRunner, RetrievalModelRunner, create_example_batch,
                     create_example_corpus)

DISPLAY_SEED = 20_000  # example stream of the displayed users (evaluation examples use 10_000 + seed)
RECALL_K = synthetic.RECALL_K
FREQUENCY_USERS = 5_000  # users sampled for the popularity / logQ estimate (the default 20k is slower to estimate)


def train_demo_retrieval(options: demos.RetrievalDemo, world, cfg, log_freq, path: str, key: str) -> float:
    """Trains the demo two-tower model on the world's training users and saves it; returns seconds."""
    t0 = time.perf_counter()
    train_ids, _ = world.split_users()
    trainer = training.make_retrieval_trainer(cfg, cfg.hash_config,
                                              synthetic.optimizer_config(demos.DEMO_LEARNING_RATE, options.steps),
                                              table_init_stddev=synthetic.TABLE_INIT_STDDEV)
    state = trainer.init(jax.random.PRNGKey(options.seed), to_retrieval_batch(
        world.retrieval_examples(np.zeros(2, np.int64), 0), cfg.hash_config))
    stream = synthetic.retrieval_stream(world, train_ids, options.train_batch_size, options.seed, cfg.hash_config,
                                 user_id_dropout=1.0, log_freq=log_freq)
    print(f"training the demo retrieval model: {options.steps} steps of {options.train_batch_size} (user, next "
          f"engaged post) rows (progress on stderr)", flush=True)
    demos.fit_and_cache(trainer, state, stream, options.steps, options.seed, path, key,
                        synthetic.unknown_user_id(world.cfg))
    return time.perf_counter() - t0


def retrieve_examples(retriever, examples: dict, hash_config, batch_size: int, top_k: int) -> np.ndarray:
    """Retrieved corpus indices [n, top_k] of retrieval examples, `batch_size` users per call."""
    out = []
    for rows in chunks(len(examples["user_ids"]), batch_size):
        batch = to_retrieval_batch(take(examples, rows), hash_config)
        out.append(np.asarray(retriever.retrieve(batch, top_k=top_k).top_k_indices))
    return np.concatenate(out)


def main_trained(options: demos.RetrievalDemo) -> dict:
    path = options.checkpoint
    world = SyntheticWorld(demos.demo_world_config(options))
    train_ids, held_out = world.split_users()
    cfg = demos.demo_retrieval_config(options.emb_size, options.num_layers, options.history_len,
                                   hash_config=demos.demo_hash_config(world.cfg), fprop_dtype=jnp.float32).initialize()
    key = demos.cache_key(cfg, world.cfg, options.seed, options.steps, options.train_batch_size,
                          demos.DEMO_LEARNING_RATE)
    freq = world.positive_frequencies(train_ids, num_users=FREQUENCY_USERS)  # [N] logQ and popularity
    if demos.cached_checkpoint(path, key) != "hit":  # what a save would refuse: now, not after training
        run_dir.check_checkpoint_target("--checkpoint", path)
    loaded, train_s = demos.load_or_train(
        path, key, "demo retrieval model",
        lambda: train_demo_retrieval(options, world, cfg, np.log(freq), path, key))
    retriever = RecsysRetrievalInferenceRunner.from_checkpoint(path, name="demo_retrieval")
    hashes = retriever.runner.model.hash_config

    t0 = time.perf_counter()
    corpus_ids = world.corpus()["post_ids"]  # [N]
    corpus = np.asarray(retriever.encode_candidates(synthetic.corpus_batch(world, hashes))[0])  # [N, D]
    retriever.set_corpus(corpus, corpus_ids)
    encode_s = time.perf_counter() - t0
    num_posts = len(corpus_ids)
    top_k = min(options.top_k, num_posts)
    search_k = min(max(top_k, RECALL_K), num_posts)  # one compiled search serves display and recall

    shown = synthetic.held_out_examples(world, held_out[:options.batch_size], 1, "retrieval", DISPLAY_SEED)
    batch = to_retrieval_batch(shown, hashes)
    compile_s, call_ms, _ = demos.time_calls(lambda: retriever.retrieve(batch, top_k=search_k).top_k_indices, 20)
    call_s = call_ms / 1e3
    out = retriever.retrieve(batch, top_k=search_k)
    retrieved = retriever.corpus_post_ids[np.asarray(out.top_k_indices)]  # [B, K] post ids
    scores = np.asarray(out.top_k_scores)  # [B, K]
    oracle = synthetic.retrieval_oracle_scores(world, shown["true_user_ids"])  # [B, N]
    p_next = oracle / oracle.sum(axis=1, keepdims=True)  # [B, N] P(next engaged post = n | user)

    print(f"\nPhoenix retrieval: D={options.emb_size}, {options.num_layers} layers, S={options.history_len}, corpus "
          f"{num_posts:,} posts (every post of the world, encoded in {encode_s:.1f} s), top-{top_k}, "
          f"B={options.batch_size}, seed {options.seed}, trained {options.steps} steps")
    for b in range(options.batch_size):
        user = shown["true_user_ids"][b]
        history_authors = shown["history_author_ids"][b][shown["history_author_ids"][b] >= 0]
        author_counts = np.bincount(history_authors, minlength=world.cfg.num_authors)
        true_rank = np.empty(num_posts, np.int64)
        true_rank[np.argsort(-oracle[b])] = np.arange(1, num_posts + 1)
        true_top = np.argsort(-oracle[b])[:top_k]
        overlap = len(set(retrieved[b, :top_k]) & set(true_top))
        print(f"\nHeld-out user {user} ({len(history_authors)} history engagements, id unknown to the model): "
              f"retrieved top-{top_k} | the user's true top-{top_k}, sorted by P(next); overlap {overlap}/{top_k}")
        print("  rank   post author hist  score  affinity  P(next) true-rank |   post author hist  affinity  P(next)")
        for r in range(top_k):
            p, q = retrieved[b, r], true_top[r]
            pa, qa = world.post_author[p], world.post_author[q]
            print(f"  {r + 1:>4}  {p:>5} {pa:>6} {author_counts[pa]:>4} {scores[b, r]:+.3f} "
                  f"{float(world.affinity(user, p)):>+9.2f} {p_next[b, p]:>8.3%} {true_rank[p]:>9} | "
                  f"{q:>6} {qa:>6} {author_counts[qa]:>4} {float(world.affinity(user, q)):>+9.2f} {p_next[b, q]:>8.3%}")
    print("  (P(next): the world's probability that the user's next engaged post is this one, P(impression) x\n"
          "   P(engagement) averaged over surfaces, normalised over the corpus; the true top and true-rank sort by it.\n"
          "   hist: the user's history engagements with the post's author; affinity ~ N(0, 1) over random pairs)")

    # Over many held-out users, in calls of the displayed shape.
    repeats = max(1, -(-options.eval_examples // len(held_out)))
    examples = synthetic.held_out_examples(world, held_out, repeats, "retrieval", options.seed)
    usable = len(examples["user_ids"]) // options.batch_size * options.batch_size
    examples = take(examples, slice(0, min(usable, max(options.eval_examples, options.batch_size))))
    got = retriever.corpus_post_ids[retrieve_examples(retriever, examples, hashes, options.batch_size, search_k)]
    positives = examples["positive_post_ids"]
    users, inverse = np.unique(examples["true_user_ids"], return_inverse=True)
    oracle_all = synthetic.retrieval_oracle_scores(world, users)  # [U', N]
    true_top_all = np.argsort(-oracle_all, axis=1)[:, :top_k][inverse]  # [n, K]
    overlap = np.mean([len(set(g[:top_k]) & set(t)) / top_k for g, t in zip(got, true_top_all)])
    recall = {"model": float(np.mean([p in g[:RECALL_K] for p, g in zip(positives, got)])),
              "popularity": recall_at_k(np.broadcast_to(freq, (len(positives), num_posts)), positives, RECALL_K),
              "oracle": recall_at_k(oracle_all[inverse], positives, RECALL_K)}
    affinity = np.mean(world.affinity(examples["true_user_ids"][:, None], got[:, :top_k]))
    print(f"\nOver {len(positives)} held-out examples ({len(users)} users):")
    print(f"  overlap of the retrieved top-{top_k} with the true top-{top_k}: {overlap:.1%} "
          f"(random posts: {top_k / num_posts:.2%})")
    print(f"  mean true affinity of the retrieved top-{top_k}: {affinity:+.2f} (random posts: +0.00)")
    print(f"  recall@{RECALL_K} of the next engaged post over all {num_posts:,} posts: model {recall['model']:.3f}, "
          f"popularity {recall['popularity']:.3f}, oracle {recall['oracle']:.3f}")
    print(f"\ncompile + first call: {compile_s:.2f} s   steady-state retrieve(top_k={search_k}): {call_s * 1e3:.2f} "
          f"ms/call (B={options.batch_size}, median of 20)")
    return {"loaded": loaded, "train_s": train_s, "retrieved": retrieved, "overlap": float(overlap),
            "recall": recall, "compile_s": compile_s, "call_s": call_s}


def main_untrained(options: demos.RetrievalDemo) -> dict:
    cfg = demos.demo_retrieval_config(options.emb_size, options.num_layers, options.history_len)
    retriever = RecsysRetrievalInferenceRunner(RetrievalModelRunner(cfg, rng_seed=options.seed), name="demo_retrieval")
    retriever.initialize()
    batch, embeddings = create_example_batch(options.batch_size, options.emb_size, options.history_len,
                                             cfg.candidate_seq_len, len(ACTIONS), seed=options.seed)
    corpus, post_ids = create_example_corpus(options.corpus_size, options.emb_size)
    retriever.set_corpus(corpus, post_ids)
    compile_s, call_ms, _ = demos.time_calls(
        lambda: retriever.retrieve(batch, embeddings, top_k=options.top_k).top_k_scores, 20)
    call_s = call_ms / 1e3
    out = retriever.retrieve(batch, embeddings, top_k=options.top_k)
    indices, scores = np.asarray(out.top_k_indices), np.asarray(out.top_k_scores)

    print(f"Phoenix retrieval: D={options.emb_size}, {options.num_layers} layers, S={options.history_len}, "
          f"corpus {options.corpus_size}, top-{options.top_k}, B={options.batch_size}, seed {options.seed} "
          "(random init)")
    for b in range(options.batch_size):
        print(f"\nUser {b}: top-{options.top_k} of {options.corpus_size}")
        print("  rank  index   post_id    score")
        for r, (i, s) in enumerate(zip(indices[b], scores[b])):
            print(f"  {r + 1:>4}  {i:>5}  {retriever.corpus_post_ids[i]:>8}  {s:+.4f}")
    print(f"\ncompile + first call: {compile_s:.2f} s   steady-state retrieve(): {call_s * 1e3:.2f} ms/call "
          f"(median of 20)")
    return {"loaded": False, "indices": indices, "scores": scores, "compile_s": compile_s, "call_s": call_s}


def parse_args(argv) -> demos.RetrievalDemo:
    """The command line as a demos.RetrievalDemo (every field a flag)."""
    return run_train.parse_dataclass(demos.RetrievalDemo, __doc__, argv)


def main(argv=None) -> dict:
    """The demo (module docstring) on the command line `argv` (default sys.argv[1:]); returns its figures."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    return main_untrained(options) if options.no_train else main_trained(options)


def cli() -> None:
    """The `phoenix-retrieve` console script (and `uv run run_retrieval.py`): main() without its result
    dict (sys.exit would print it as an error); a user error prints one `error:` line and exits with
    status 2 (run_train.cli)."""
    run_train.cli(lambda: main())  # main looked up when called


if __name__ == "__main__":
    cli()
