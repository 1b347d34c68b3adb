"""SASRec reference recipe screening on MovieLens-100K VALIDATION only (no test number is printed).

    uv run python scripts/screen_sasrec.py --seed 0 --configs "base:;ep100:epochs=100;S20:history_len=20"

Each config is NAME:field=value,... over phoenix_sasrec.SasrecRecipe(); one line per config: the best
of recipe.evals validation evaluations (HR@10 / NDCG@10, by NDCG@10), its step and the seconds.
"""

import argparse
import dataclasses
import sys
import time

import movielens as ml
import phoenix_sasrec as sasrec
import phoenix_two_stage as two_stage


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    split = ml.movielens_split(ml.load_ratings(ml.SOURCE_ML100K))
    kinds = {f.name: f.type for f in dataclasses.fields(sasrec.SasrecRecipe)}
    for text in filter(None, (c.strip() for c in args.configs.split(";"))):
        name, _, body = text.partition(":")
        overrides = {}
        for part in filter(None, (p.strip() for p in body.split(","))):
            key, _, value = part.partition("=")
            kind = kinds[key] if isinstance(kinds[key], str) else kinds[key].__name__
            overrides[key] = {"int": int, "float": float}[kind](value)
        recipe = dataclasses.replace(sasrec.SasrecRecipe(), **overrides)
        start = time.perf_counter()
        val_inputs, val_last = sasrec.histories(split, "val", recipe.history_len)
        _, _, best = sasrec.train(split, recipe, args.seed, two_stage.training_windows, stream=sys.stderr,
                                  validate=lambda model, params: sasrec.evaluate(
                                      split, "val", model.scores(params, val_inputs, val_last), two_stage.eval_mask)[0])
        print(f"| {name} | {overrides} | seed {args.seed} | {best['HR@10']:.4f} | {best['NDCG@10']:.4f} | "
              f"step {best['step']} of {best['total_steps']} | {time.perf_counter() - start:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
