"""run_train.py, the one training command line: its data-aware help, and how its flags become the
library's dataclasses (the checks that refuse flags are in test_cli_safety.py)."""

import dataclasses

import pytest

import phoenix_pipeline as pipeline
import run_train
import train_synthetic
from phoenix_sasrec import SasrecRecipe

# Flags that only one data path has: the help of a path shows its own and none of the others'.
OWN_FLAGS = {"log": ["--user-col", "--item-col", "--time-col", "--rating-col", "--author-col", "--delimiter",
                     "--rating-actions", "--split", "--cut-time"],
             "movielens": ["--cache-dir", "--seeds"],
             "synthetic": ["--steps-ranker", "--num-posts", "--key-size"]}
TWO_STAGE_FLAGS = ["--dump-topk", "--protocol", "--sasrec", "--pooling", "--retrieval-members", "--score-action"]
EVERY_PATH_FLAGS = ["--checkpoint-every", "--resume", "--keep-checkpoints", "--overwrite"]  # docs/resume.md


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        run_train.parse_args([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_help_shows_every_way_to_train_and_every_flag(capsys):
    text = help_of([], capsys)
    assert text.startswith("usage: run_train.py --data LOG.csv")
    for command in ("--data LOG.csv", "--data movielens-100k", "--data synthetic"):
        assert command in text
    for flag in [f for flags in OWN_FLAGS.values() for f in flags] + TWO_STAGE_FLAGS:
        assert flag in text, flag
    assert "your log" in text and "MovieLens" in text and "synthetic world" in text


@pytest.mark.parametrize("data, kind", [("log.csv", "log"), ("movielens-100k", "movielens"),
                                        ("synthetic", "synthetic")])
def test_the_help_of_one_data_path_shows_its_flags_only(data, kind, capsys):
    text = help_of(["--data", data], capsys)
    assert all(flag in text for flag in OWN_FLAGS[kind])
    others = [flag for other, flags in OWN_FLAGS.items() if other != kind for flag in flags]
    assert not [flag for flag in others if flag in text]
    assert all(flag in text for flag in TWO_STAGE_FLAGS) == (kind != "synthetic")
    assert all(flag in text for flag in EVERY_PATH_FLAGS)


@pytest.mark.parametrize("data, kind", [("synthetic", "synthetic"), ("movielens-100k", "movielens"),
                                        ("x.whl", "movielens"), ("log.csv", "log"), ("-", "log"),
                                        ("/dev/fd/63", "log")])
def test_data_kinds(data, kind, tmp_path):
    assert run_train.data_kind(data) == kind
    assert run_train.data_kind(str(tmp_path)) == "movielens"  # a directory: a MovieLens copy


def test_the_flags_become_the_librarys_dataclasses():
    command = run_train.parse_args(["--data", "log.csv", "--user-col", "uid", "--delimiter", "tab",
                                    "--emb-size", "32", "--protocol", "train+val", "--sasrec", "--sasrec-epochs", "2",
                                    "--sasrec-train-val", "--dump-topk", "top.csv", "--seed", "3"])
    assert command.kind == "log" and command.source.columns == pipeline.Columns(user="uid")
    assert command.source.delimiter == "\t" and not command.source.rating_actions_given
    assert command.recipe == dataclasses.replace(pipeline.Recipe(), emb_size=32)
    assert command.protocols == pipeline.Protocols("train+val", dataclasses.replace(SasrecRecipe(), epochs=2.0), True)
    assert (command.run.seed, command.run.dump_topk, command.run.seeds) == (3, "top.csv", None)
    assert run_train.parse_args(["--data", "log.csv"]).protocols == pipeline.Protocols()  # val-select alone
    assert (command.run.checkpoint_every, command.run.keep_checkpoints, command.run.resume) == (0, 3, False)
    assert command.run.flags == {"columns": dataclasses.asdict(pipeline.Columns(user="uid")),
                                 "rating_actions": {name: [repr(float(v)) for v in bounds] for name, bounds
                                                    in run_train.DEFAULT_RATING_ACTIONS.items()},
                                 "duplicates": "first", "split": "leave-one-out", "cut_time": None,
                                 "cut_quantile": None}  # what a --resume must match (no path, no delimiter)
    movielens = run_train.parse_args(["--data", "movielens-100k", "--seeds", "0,1", "--checkpoint-every", "50",
                                      "--keep-checkpoints", "2", "--resume"])
    assert movielens.recipe == pipeline.MOVIELENS_RECIPE and movielens.run.seeds == (0, 1)
    assert (movielens.run.checkpoint_every, movielens.run.keep_checkpoints, movielens.run.resume) == (50, 2, True)
    synthetic = run_train.parse_args(["--steps-ranker", "5", "--only", "ranker"])  # the default data path
    assert synthetic.kind == "synthetic" and synthetic.source is None
    assert synthetic.run == train_synthetic.SyntheticRun(steps_ranker=5, only="ranker")


def test_every_recipe_field_is_a_flag_of_the_two_stage_paths(capsys):
    text = help_of(["--data", "log.csv"], capsys)
    for field in dataclasses.fields(pipeline.Recipe):
        assert "--" + field.name.replace("_", "-") in text, field.name


# The demos' flags (run_ranker.py, run_retrieval.py): fields of phoenix_demos' options, each with its range.
DEMO_FLAG_CASES = [
    ("run_ranker", ["--steps", "-5"], "argument --steps: expected an int >= 0, got '-5'"),
    ("run_ranker", ["--emb-size", "0"], "argument --emb-size: expected an int >= 1, got '0'"),
    ("run_ranker", ["--seed", "-1"], "argument --seed: expected an int >= 0, got '-1'"),
    ("run_ranker", ["--num-posts", "5"], "WorldConfig.num_authors: expected <= num_posts (5"),
    ("run_retrieval", ["--top-k", "0"], "argument --top-k: expected an int >= 1, got '0'"),
    ("run_retrieval", ["--top-k", "5000", "--no-train"], "RetrievalDemo.top_k: expected <= corpus_size (1000)"),
    ("run_retrieval", ["--corpus-size", "1.5"], "argument --corpus-size: invalid int value: '1.5'"),
]


@pytest.mark.parametrize("script, argv, message", DEMO_FLAG_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_demo_flags_out_of_range_or_clashing_are_one_error_line(script, argv, message, capsys):
    """A demo flag out of range, or flags that clash, end in argparse's error (status 2) naming them,
    before anything is built; before, they ended in a traceback from inside the model or the world."""
    module = __import__(script)
    with pytest.raises(SystemExit) as info:
        module.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_options_check_their_values_in_the_library_too():
    import phoenix_demos as demos
    with pytest.raises(ValueError, match=r"RankerDemo.steps: expected an int >= 0, got -1"):
        demos.RankerDemo(steps=-1)
    with pytest.raises(ValueError, match=r"RetrievalDemo.num_layers: expected an int >= 1, got 2.5"):
        demos.RetrievalDemo(num_layers=2.5)
    assert demos.RankerDemo(steps=0).steps == 0 and demos.RetrievalDemo(checkpoint="x").checkpoint == "x"


def test_help_into_a_closed_pipe_is_no_error(tmp_path):
    """`run_train.py --help | head -1`: the reader closes the pipe early; the command stops quietly (status
    141, as for SIGPIPE) instead of printing an `error: Broken pipe` line. Here the pipe is closed before
    the command writes at all, so every write of the help meets it."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader: the command's first write to stdout fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, os.path.join(here, "run_train.py"), "--help"], stdout=write_end,
                              stderr=subprocess.PIPE, cwd=tmp_path, timeout=120)
    finally:
        os.close(write_end)
    stderr = proc.stderr.decode()
    assert proc.returncode == 141 and stderr == "", (proc.returncode, stderr)
