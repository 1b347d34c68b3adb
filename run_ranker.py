"""Phoenix ranking demo: a ranker trained on the synthetic world, checked against the world's truth.

    uv run run_ranker.py                     # train (or reuse the cached checkpoint), rank, compare
    uv run run_ranker.py --no-train          # the release's demo: random init, random example batch
    uv run run_ranker.py [--steps 250] [--checkpoint DIR] [--seed 0] [--batch-size 2]
    phoenix-rank [flags]                     # the same, once the package is installed (pip install .)

The model is the release's demo ranker (D=128, 2 layers, key size 64, 2 query + 2 kv heads,
widening 2, attention multiplier 0.125, S=32, C=8), with hash tables sized to the synthetic world
(phoenix_synthetic.py: 1k users, 5k posts, 200 authors) and float32 activations (faster than
bfloat16 on CPU). By default it is trained for --steps steps of 64 users (~60 s on 2 CPU cores,
progress on stderr) and saved to --checkpoint (default $PHOENIX_CACHE_DIR/checkpoints/demo_ranker,
$PHOENIX_CACHE_DIR defaulting to ~/.cache/phoenix) together with a key of its config, world, seed
and steps; a later run with the same key loads that checkpoint (`RecsysInferenceRunner.from_checkpoint`)
instead of training, a run with another key retrains and overwrites it.

It then ranks the candidates of --batch-size users held out of training (cold-start users: the
model sees their history, not their id) and prints, per user, the candidates best-first with the
predicted P(favorite) beside the world's TRUE P(favorite), and for the top --show-top candidates
a probability bar for every engagement action beside the true probability. Then the Spearman rank
correlation between predicted and true P(favorite) over --eval-examples held-out examples (pooled,
and the mean within one user's candidates), the same for the mean over all 19 actions, and the
compile time and steady-state time per `rank` call.

Output (seed 0, the defaults; 2 of the 19 bar rows shown):

    trained in 57 s (compile included), saved to ~/.cache/phoenix/checkpoints/demo_ranker (key 754221ffc4679724)
    Held-out user 37 (25 history engagements, id unknown to the model): candidates ranked by [...]
      rank  cand   post  author   predicted   true P(fav)   true rank
         1     3   2544      41      0.9451        0.9689           1
         2     4   2300      41      0.8641        0.9410           3
      ...
      #1: candidate 3 (post 2544)   predicted, bar, true
        favorite_score              0.9451 ████████████████████████████    0.9689
        not_interested_score        0.0045                                 0.0003
    Spearman rank correlation, predicted vs true probability, 1000 held-out examples x 8 candidates:
      P(favorite):            pooled 0.729   within a user's candidates (mean) 0.680
      mean over 19 actions:   pooled 0.683   within a user's candidates (mean) 0.634
    compile + first call: 1.51 s   steady-state rank(): 1.88 ms/call (B=2, median of 20)

Duration (2 CPU cores shared with another training job): 64 s from a fresh copy of the repository
(venv created from uv's cache in under a second; downloading the packages adds ~20-30 s),
training 57 s of it; 7 s with the cache. With --no-train about 10 s; the ranking is then
arbitrary (untrained), though the scores differ between candidates and actions, unlike the
release's zero-initialised demo.
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
from phoenix_metrics import spearman
from phoenix_synthetic import SyntheticWorld, to_recsys_batch
from runners import ACTIONS, ModelRunner, RecsysInferenceRunner, create_example_batch

BAR_WIDTH = 30
DISPLAY_SEED = 20_000  # example stream of the displayed users (evaluation examples use 10_000 + seed)


def bar(p: float) -> str:
    filled = p * BAR_WIDTH
    return "█" * int(filled) + ("▌" if filled - int(filled) >= 0.5 else "")


def train_demo_ranker(options: demos.RankerDemo, world, cfg, path: str, key: str) -> float:
    """Trains the demo ranker on the world's training users and saves it; returns seconds taken."""
    t0 = time.perf_counter()
    train_ids, _ = world.split_users()
    trainer = training.make_ranking_trainer(cfg, cfg.hash_config,
                                            synthetic.optimizer_config(demos.DEMO_LEARNING_RATE, options.steps),
                                            table_init_stddev=synthetic.TABLE_INIT_STDDEV)
    state = trainer.init(jax.random.PRNGKey(options.seed), synthetic.example_ranking_batch(world, cfg.hash_config))
    stream = synthetic.ranking_stream(world, train_ids, options.train_batch_size, options.seed, cfg.hash_config,
                               user_id_dropout=1.0)
    print(f"training the demo ranker: {options.steps} steps of {options.train_batch_size} users x "
          f"{world.cfg.num_candidates} candidates (progress on stderr)", flush=True)
    demos.fit_and_cache(trainer, state, stream, options.steps, options.seed, path, key,
                        synthetic.unknown_user_id(world.cfg))
    return time.perf_counter() - t0


def rank_examples(ranker, examples: dict, hash_config, batch_size: int) -> np.ndarray:
    """Predicted probabilities [n, C, A] of examples, in calls of `batch_size` users (n a multiple)."""
    out = []
    for rows in chunks(len(examples["user_ids"]), batch_size):
        batch, _, _ = to_recsys_batch(take(examples, rows), hash_config)
        out.append(np.asarray(ranker.rank(batch).scores))
    return np.concatenate(out)


def main_trained(options: demos.RankerDemo) -> dict:
    path = options.checkpoint
    world = SyntheticWorld(demos.demo_world_config(options))
    cfg = demos.demo_ranker_config(options.emb_size, options.num_layers, options.history_len, options.num_candidates,
                                hash_config=demos.demo_hash_config(world.cfg), fprop_dtype=jnp.float32).initialize()
    key = demos.cache_key(cfg, world.cfg, options.seed, options.steps, options.train_batch_size,
                          demos.DEMO_LEARNING_RATE)
    if demos.cached_checkpoint(path, key) != "hit":  # what a save would refuse: now, not after training
        run_dir.check_checkpoint_target("--checkpoint", path)
    loaded, train_s = demos.load_or_train(
        path, key, "demo ranker", lambda: train_demo_ranker(options, world, cfg, path, key))
    ranker = RecsysInferenceRunner.from_checkpoint(path, name="demo_ranker")
    hashes = ranker.runner.model.hash_config

    _, held_out = world.split_users()
    shown = synthetic.held_out_examples(world, held_out[:options.batch_size], 1, "ranking", DISPLAY_SEED)
    batch, _, _ = to_recsys_batch(shown, hashes)
    compile_s, call_ms, _ = demos.time_calls(lambda: ranker.rank(batch).scores, 20)
    call_s = call_ms / 1e3
    out = ranker.rank(batch)
    scores, ranked = np.asarray(out.scores), np.asarray(out.ranked_indices)  # [B, C, A], [B, C]
    truth = shown["oracle"]  # [B, C, A]

    print(f"\nPhoenix ranker: D={options.emb_size}, {options.num_layers} layers, S={options.history_len}, "
          f"C={options.num_candidates}, B={options.batch_size}, seed {options.seed}, trained {options.steps} steps "
          f"on the synthetic world ({world.cfg.num_users:,} users, {world.cfg.num_posts:,} posts)")
    for b in range(options.batch_size):
        length = int(shown["history_lengths"][b])
        true_rank = np.argsort(np.argsort(-truth[b, :, 0])) + 1  # [C]
        print(f"\nHeld-out user {shown['true_user_ids'][b]} ({length} history engagements, id unknown to "
              f"the model): candidates ranked by predicted P(favorite)")
        print("  rank  cand   post  author   predicted   true P(fav)   true rank")
        for r, c in enumerate(ranked[b]):
            print(f"  {r + 1:>4}  {c:>4}  {shown['candidate_post_ids'][b, c]:>5}  "
                  f"{shown['candidate_author_ids'][b, c]:>6}   {scores[b, c, 0]:>9.4f}   {truth[b, c, 0]:>11.4f}"
                  f"   {true_rank[c]:>9}")
        for r, c in enumerate(ranked[b][: options.show_top]):
            print(f"\n  #{r + 1}: candidate {c} (post {shown['candidate_post_ids'][b, c]})   predicted, bar, true")
            for a, (p, t) in enumerate(zip(scores[b, c], truth[b, c])):
                print(f"    {ACTIONS[a]:<27} {p:6.4f} {bar(p):<{BAR_WIDTH + 1}} {t:6.4f}")

    # Rank correlation over many held-out users' candidates, in calls of the displayed shape.
    repeats = max(1, -(-options.eval_examples // len(held_out)))
    examples = synthetic.held_out_examples(world, held_out, repeats, "ranking", options.seed)
    usable = len(examples["user_ids"]) // options.batch_size * options.batch_size
    examples = take(examples, slice(0, min(usable, max(options.eval_examples, options.batch_size))))
    predicted = rank_examples(ranker, examples, hashes, options.batch_size)  # [n, C, A]
    true = examples["oracle"]  # [n, C, A]
    n, C, A = predicted.shape
    pooled = spearman(predicted.reshape(n * C, A), true.reshape(n * C, A), axis=0)  # [A]
    within = np.nanmean(spearman(predicted, true, axis=1), axis=0)  # [A]
    print(f"\nSpearman rank correlation, predicted vs true probability, {n} held-out examples x {C} candidates:")
    print(f"  P(favorite):            pooled {pooled[0]:.3f}   within a user's candidates (mean) {within[0]:.3f}")
    print(f"  mean over {A} actions:   pooled {np.nanmean(pooled):.3f}   within a user's candidates (mean) "
          f"{np.nanmean(within):.3f}")
    print(f"\ncompile + first call: {compile_s:.2f} s   steady-state rank(): {call_s * 1e3:.2f} ms/call "
          f"(B={options.batch_size}, median of 20)")
    return {"loaded": loaded, "train_s": train_s, "scores": scores, "spearman_favorite": float(pooled[0]),
            "spearman_within_favorite": float(within[0]), "spearman_mean": float(np.nanmean(pooled)),
            "compile_s": compile_s, "call_s": call_s}


def main_untrained(options: demos.RankerDemo) -> dict:
    cfg = demos.demo_ranker_config(options.emb_size, options.num_layers, options.history_len, options.num_candidates)
    ranker = RecsysInferenceRunner(ModelRunner(cfg, rng_seed=options.seed), name="demo_ranker")
    ranker.initialize()
    batch, embeddings = create_example_batch(options.batch_size, options.emb_size, options.history_len,
                                             options.num_candidates, len(ACTIONS), seed=options.seed)
    compile_s, call_ms, _ = demos.time_calls(lambda: ranker.rank(batch, embeddings).scores, 20)
    call_s = call_ms / 1e3
    out = ranker.rank(batch, embeddings)
    scores = np.asarray(out.scores)  # [B, C, A]
    ranked = np.asarray(out.ranked_indices)  # [B, C]

    print(f"Phoenix ranker: D={options.emb_size}, {options.num_layers} layers, S={options.history_len}, "
          f"C={options.num_candidates}, B={options.batch_size}, seed {options.seed} (random init, untrained)")
    for b in range(options.batch_size):
        print(f"\nUser {b}: candidates ranked by P(favorite)")
        print("  rank  cand  " + "  ".join(f"{a[:10]:>10}" for a in ACTIONS[:5]) + "   ...")
        for r, c in enumerate(ranked[b]):
            print(f"  {r + 1:>4}  {c:>4}  " + "  ".join(f"{p:>10.4f}" for p in scores[b, c, :5]))
        for r, c in enumerate(ranked[b][: options.show_top]):
            print(f"\n  #{r + 1}: candidate {c}")
            for a, p in zip(ACTIONS, scores[b, c]):
                print(f"    {a:<27} {p:6.4f} {bar(p)}")
    spread = scores.max(axis=1) - scores.min(axis=1)  # [B, A]
    print(f"\nscore spread across candidates (max - min, mean over users and actions): {spread.mean():.4f}")
    print(f"compile + first call: {compile_s:.2f} s   steady-state rank(): {call_s * 1e3:.2f} ms/call "
          f"(median of 20)")
    return {"loaded": False, "scores": scores, "compile_s": compile_s, "call_s": call_s}


def parse_args(argv) -> demos.RankerDemo:
    """The command line as a demos.RankerDemo (every field a flag)."""
    return run_train.parse_dataclass(demos.RankerDemo, __doc__, argv)


def main(argv=None) -> dict:
    """The demo (module docstring) on the command line `argv` (default sys.argv[1:]); returns its figures."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    return main_untrained(options) if options.no_train else main_trained(options)


def cli() -> None:
    """The `phoenix-rank` console script (and `uv run run_ranker.py`): main() without its result dict (sys.exit
    would print it as an error); a user error prints one `error:` line and exits with status 2
    (run_train.cli)."""
    run_train.cli(lambda: main())  # main looked up when called


if __name__ == "__main__":
    cli()
