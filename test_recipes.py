"""Named recipes, the time budget and early stopping: phoenix_two_stage.RECIPES, Recipe.time_budget
(phoenix_pipeline.budget_steps, seconds_per_step, the plan in run.json) and Recipe.patience
(training.fit's should_stop through phoenix_pipeline._fit_keeping_best)."""

import dataclasses
import io

import jax
import numpy as np
import pytest

import phoenix_pipeline as pipeline
import phoenix_run_dir as run_dir
import phoenix_synthetic as synthetic
import phoenix_training as training
import phoenix_two_stage as two_stage
import run_train

TINY = two_stage.Recipe(emb_size=16, num_layers=1, history_len=4, ranker_history_len=4, retrieval_batch_size=16,
                        retrieval_epochs=1.0, ranker_epochs=1.0, warmup_steps=2)
# The steps a stage is planned for (its learning-rate schedule) are part of its compiled train step: tests
# whose checks do not depend on them share one plan, and so one program.
PLANNED = 12


@pytest.fixture(scope="module")
def split():
    log = pipeline.from_arrays(synthetic.make_log(3_000, seed=4), source="tiny")
    return pipeline.split_log(log, stream=io.StringIO())


def test_each_data_path_has_its_named_recipe_and_flags_beside_it_replace_fields():
    assert run_train.parse_args(["--data", "log.csv"]).recipe == pipeline.LOG_RECIPE
    assert run_train.parse_args(["--data", "movielens-100k"]).recipe == pipeline.MOVIELENS_RECIPE
    mean = run_train.parse_args(["--data", "log.csv", "--recipe", "mean", "--history-len", "9"]).recipe
    assert mean == dataclasses.replace(two_stage.Recipe(), history_len=9)
    off = run_train.parse_args(["--data", "log.csv", "--time-budget", "none", "--patience", "0"]).recipe
    assert off == dataclasses.replace(pipeline.LOG_RECIPE, time_budget=None, patience=0)
    log = run_train.parse_args(["--data", "movielens-100k", "--recipe", "log"]).recipe
    assert log == pipeline.LOG_RECIPE


@pytest.mark.parametrize("argv, says", [
    (["--time-budget", "0"], "--time-budget"), (["--time-budget", "-5"], "--time-budget"),
    (["--patience", "-1"], "--patience"), (["--recipe", "fast"], "--recipe"),
])
def test_bad_recipe_flags_are_refused_by_name(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_train.parse_args(["--data", "log.csv", *argv])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("change, says", [({"patience": -1}, "patience"), ({"time_budget": 0.0}, "time_budget"),
                                          ({"time_budget": float("inf")}, "time_budget")])
def test_check_recipe_refuses_a_bad_patience_or_budget(split, change, says):
    with pytest.raises(two_stage.RecipeError, match=says):
        two_stage.check_recipe(split, two_stage.resolve_recipe(dataclasses.replace(TINY, **change), split))


@pytest.mark.parametrize("planned, step_seconds, seconds, expected", [
    (1000, 0.1, 5.0, 50),  # the budget binds
    (40, 0.1, 5.0, 40),  # the epochs fit: never more than they ask
    (1000, 10.0, 1.0, 1),  # always at least one step
])
def test_budget_steps(planned, step_seconds, seconds, expected):
    assert pipeline.budget_steps(planned, step_seconds, seconds) == expected


def test_timing_a_stage_leaves_its_state_and_stream_as_they_were(split):
    recipe = two_stage.resolve_recipe(TINY, split)
    trainer, state, batches, _ = two_stage.start_retrieval(split, recipe, 0, steps=PLANNED)
    before = two_stage.host_copy(state.params)
    seconds = pipeline.seconds_per_step(trainer, state, batches, steps=2)
    assert 0 < seconds < 60
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(two_stage.host_copy(state.params))):
        np.testing.assert_array_equal(a, b)  # the donated copy was the probe's, not the state
    _, fresh_state, fresh, _ = two_stage.start_retrieval(split, recipe, 0, steps=PLANNED)
    for ours, theirs in zip(batches(0), fresh(0)):  # the same stream from its first batch
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        break
    # training after the timing equals training without it (bit for bit on CPU)
    timed, _ = training.fit(trainer, state, batches, 3, stream=io.StringIO())
    plain, _ = training.fit(trainer, fresh_state, fresh, 3, stream=io.StringIO())
    for a, b in zip(jax.tree.leaves(timed.params), jax.tree.leaves(plain.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_budgeted_stage_records_its_plan_and_a_resume_reads_it_back(split, tmp_path, monkeypatch):
    recipe = two_stage.resolve_recipe(TINY, split)
    start = lambda member, steps: two_stage.start_retrieval(split, recipe, 0, steps=steps, member=member)  # noqa: E731
    run_dir.write_manifest(tmp_path, "pipeline", pipeline.RUN_ENTRIES, source="tiny")
    epoch_steps = two_stage.stage_steps(split, recipe)[0]
    assert epoch_steps > 3
    monkeypatch.setattr(training, "seconds_per_step", lambda *args, **kwargs: 1.0)  # 1 s a step
    _, _, _, steps = pipeline._planned_steps("retrieval", start, 0, 3.5, str(tmp_path), io.StringIO(), False)
    assert steps == 3
    plan = run_dir.read_manifest(tmp_path)[pipeline.PLAN_KEY]["retrieval"]
    assert plan["steps"] == 3 and plan["epoch_steps"] == epoch_steps

    def no_timing(*args, **kwargs):
        raise AssertionError("a resumed stage must read its plan back, not time itself again")

    monkeypatch.setattr(training, "seconds_per_step", no_timing)
    trainer, _, _, steps = pipeline._planned_steps("retrieval", start, 0, 1000.0, str(tmp_path), io.StringIO(), True)
    assert steps == 3  # the recorded plan, although 1000 s would fit every step
    assert trainer.optimizer_config == two_stage.optimizer_config(recipe, 3)  # the schedule spans the plan


def test_patience_stops_a_stage_that_no_longer_improves_and_keeps_its_best(split, tmp_path):
    recipe = two_stage.resolve_recipe(TINY, split)
    trainer, state, batches, _ = two_stage.start_retrieval(split, recipe, 0, steps=PLANNED)
    seen = []

    def evaluate(params):  # NDCG@10 0.5 at the first evaluation, worse after it
        seen.append(len(seen))
        value = 0.5 - 0.1 * (len(seen) - 1)
        return {"HR@10": value, "NDCG@10": value}

    stream = io.StringIO()
    _, best = pipeline._fit_keeping_best(trainer, state, batches, 12, evaluate, str(tmp_path / "retrieval"), {}, 6,
                                         stream, "retrieval", None, patience=2)
    assert best["step"] == 2 and best["NDCG@10"] == 0.5  # evaluations every 2 steps
    assert len(seen) == 3  # the best, then two without improvement: stopped at step 6 of 12
    assert "early stop at step 6 of 12" in stream.getvalue()
    seen.clear()
    trainer, state, batches, _ = two_stage.start_retrieval(split, recipe, 0, steps=PLANNED)
    pipeline._fit_keeping_best(trainer, state, batches, 12, evaluate, str(tmp_path / "again"), {}, 6, io.StringIO(),
                               "retrieval", None, patience=0)
    assert len(seen) == 6  # patience 0: every evaluation, to the end


def test_fit_runs_no_step_when_it_is_to_stop_from_the_start(split):
    recipe = two_stage.resolve_recipe(TINY, split)
    trainer, state, batches, _ = two_stage.start_retrieval(split, recipe, 0, steps=PLANNED)
    calls = []
    state, history = training.fit(trainer, state, batches, 5, eval_fn=lambda s: calls.append(1) or {"x": 0.0},
                                  eval_every=1, stream=io.StringIO(), should_stop=lambda: True)
    assert int(state.step) == 0 and not calls and not [h for h in history if "loss" in h]


def test_validation_on_a_sample_of_users_equals_the_full_evaluation_restricted_to_it(split):
    assert two_stage.validation_rows(split) is None  # a small log: every user
    users = len(split.eval_users())
    rows = two_stage.validation_rows(split, limit=users // 3, seed=5)
    assert len(rows) == users // 3 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, two_stage.validation_rows(split, limit=users // 3, seed=5))  # fixed
    recipe = two_stage.resolve_recipe(dataclasses.replace(TINY, transition_weight=None), split)
    trainer, state, batches, _ = two_stage.start_retrieval(split, recipe, 0, steps=PLANNED)
    state, _ = training.fit(trainer, state, batches, 4, stream=io.StringIO())  # 4 steps of the schedule's 12
    every = two_stage.StageOne(trainer, state.params, split, "val", recipe.history_len, recipe.retrieve_k)
    some = two_stage.StageOne(trainer, state.params, split, "val", recipe.history_len, recipe.retrieve_k, rows=rows)
    np.testing.assert_array_equal(some.ranks, every.ranks[rows])
    np.testing.assert_array_equal(some.topk, every.topk[rows])
    ranker = training.make_ranking_trainer(two_stage.ranker_config(recipe), two_stage.hash_config(recipe))
    ranker_params = ranker.init(jax.random.PRNGKey(1), next(iter(two_stage.start_ranker(
        split, None, dataclasses.replace(recipe, hard_negatives=0, random_negatives=7), 0)[2](0)))[0]).params
    full = two_stage.TwoStage(every, ranker, ranker_params, split, "val", recipe)
    part = two_stage.TwoStage(some, ranker, ranker_params, split, "val", recipe)
    np.testing.assert_allclose(part.logits, full.logits[rows], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(part.transition, full.transition[rows])
    assert full.transition.any()
    for weights in ((0.0, 0.0, 0.0), (1.0, 0.25, 1.0)):
        expected = two_stage.two_stage_ranks(every, two_stage.rerank_scores(
            full.logits, full.retrieval, weights[0], recipe.temperature, recipe.score_action, full.popularity,
            weights[1], full.transition, weights[2]))[0][rows]
        got = two_stage.two_stage_ranks(some, two_stage.rerank_scores(
            full.logits[rows], part.retrieval, weights[0], recipe.temperature, recipe.score_action,
            part.popularity, weights[1], part.transition, weights[2]))[0]
        np.testing.assert_array_equal(got, expected)
