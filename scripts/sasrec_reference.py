"""The SASRec-style reference rows alone (phoenix_sasrec.reference_rows, as `run_train.py --sasrec` adds
them to the pipeline's table), for several seeds: per-seed val / test HR@10, NDCG@10, HR@50, MRR, then
mean +- sample sd of test HR@10 / NDCG@10.

    uv run python scripts/sasrec_reference.py --seeds 0,1,2 [--dump-topk top10.sasrec.csv]
"""

import argparse
import time

import numpy as np

import movielens as ml
import phoenix_evaluation as evaluation
import phoenix_pipeline as pipeline
import phoenix_sasrec as sasrec
import phoenix_two_stage as two_stage
import run_train


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=run_train.parse_seeds, default=(0, 1, 2))
    parser.add_argument("--dump-topk", default=None)
    args = parser.parse_args(argv)
    split = ml.movielens_split(ml.load_ratings(ml.SOURCE_ML100K))
    recipe = sasrec.SasrecRecipe()
    print(recipe)
    tests = []
    for seed in args.seeds:
        start = time.perf_counter()
        rows, info = sasrec.reference_rows(split, recipe, seed, two_stage.training_windows, two_stage.eval_mask)
        print(f"\nseed {seed}: best val step {info['best']['step']} of {info['best']['total_steps']}, "
              f"{time.perf_counter() - start:.0f} s\n" + pipeline.format_table(rows), flush=True)
        if args.dump_topk:
            path = pipeline.seed_path(args.dump_topk, seed)
            evaluation.dump_topk(path, split.user_ids[split.eval_users()], split.item_ids[info["test_topk"]])
            check = ml.recompute_from_dump(path, ml.SOURCE_ML100K, None)
            print(f"dump {path}: recomputed HR@10 {check['HR@10']:.4f} NDCG@10 {check['NDCG@10']:.4f}")
        tests.append((rows[("test", "sasrec")]["HR@10"], rows[("test", "sasrec")]["NDCG@10"]))
    t = np.array(tests)
    sd = t.std(axis=0, ddof=1) if len(t) > 1 else np.zeros(2)
    print(f"\nsasrec test over seeds {args.seeds}: HR@10 {t[:, 0].mean():.4f} +- {sd[0]:.4f}, "
          f"NDCG@10 {t[:, 1].mean():.4f} +- {sd[1]:.4f}")


if __name__ == "__main__":
    main()
