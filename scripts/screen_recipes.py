"""Recipe screening on MovieLens-100K VALIDATION only (issue 11): no test number is computed here.

    uv run python scripts/screen_recipes.py --stage retrieval --seed 0 \
        --configs "base:;ep12:retrieval_epochs=12;t07:temperature=0.07"

Each config is NAME:field=value,field=value over phoenix_two_stage.MOVIELENS_RECIPE. --stage retrieval trains
the two-tower model only (phoenix_pipeline.train_retrieval: best of evals_per_stage validation
evaluations by NDCG@10); --stage both runs retrieval, mining and the ranker and reports validation
two-stage (the retrieval weight chosen on validation, as phoenix_pipeline.evaluate_stages does).
One line per config on stdout: name, overrides, val HR@10 / NDCG@10, best step, seconds.
"""

import argparse
import dataclasses
import os
import tempfile
import time
import typing

import movielens as ml
import phoenix_pipeline as pipeline
import phoenix_two_stage as two_stage


def parse_config(text: str):
    name, _, body = text.partition(":")
    hints = typing.get_type_hints(pipeline.Recipe)
    overrides = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, _, value = part.partition("=")
        kind = next((t for t in typing.get_args(hints[key]) if t is not type(None)), hints[key])
        overrides[key] = value if kind is str else kind(value)
    return name.strip(), overrides


def val_two_stage(split, recipe, seed, run_dir, stream):
    """Validation two-stage metrics of one full run (retrieval, mining, ranker), weight chosen on val."""
    recipe = two_stage.resolve_recipe(recipe, split)
    two_stage.check_recipe(split, recipe)
    retrieval, r_params, r_best = pipeline.train_retrieval(split, recipe, seed, run_dir, stream)
    pool = (two_stage.hard_negative_pool(retrieval, r_params, split, recipe.history_len, recipe.negative_pool)
            if recipe.hard_negatives else None)
    val_one = two_stage.StageOne(retrieval, r_params, split, "val", recipe.history_len, recipe.retrieve_k)
    warm_start = pipeline.first_member(r_params) if recipe.ranker_init_from_retrieval else None
    ranker, k_params, k_best = pipeline.train_ranker(split, pool, recipe, seed, run_dir, val_one, warm_start, stream)
    two = two_stage.TwoStage(val_one, ranker, k_params, split, "val", recipe)
    weight = two_stage.choose_rerank_weights(two, recipe)
    m = two.evaluate(weight[0], recipe.temperature, weight[1], weight[2])[0]
    return m, {"retrieval": r_best, "weight": weight, "ranker_step": k_best["step"]}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", required=True, help='"name:field=v,field=v;name2:..."')
    parser.add_argument("--stage", choices=("retrieval", "both"), default="retrieval")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    split = ml.movielens_split(ml.load_ratings(ml.SOURCE_ML100K))
    stream = open(os.devnull, "w")
    for text in filter(None, (c.strip() for c in args.configs.split(";"))):
        name, overrides = parse_config(text)
        recipe = dataclasses.replace(two_stage.MOVIELENS_RECIPE, **overrides)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            if args.stage == "retrieval":
                recipe = two_stage.resolve_recipe(recipe, split)
                _, _, m = pipeline.train_retrieval(split, recipe, args.seed, run_dir, stream)
                extra = f"step {m['step']}"
            else:
                m, info = val_two_stage(split, recipe, args.seed, run_dir, stream)
                extra = (f"weights {info['weight']}, retrieval val {info['retrieval']['HR@10']:.4f} / "
                         f"{info['retrieval']['NDCG@10']:.4f} at step {info['retrieval']['step']}, ranker step "
                         f"{info['ranker_step']}")
        print(f"| {name} | {overrides} | {args.stage} | seed {args.seed} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} | "
              f"{extra} | {time.perf_counter() - start:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
