"""Packaging: the wheel holds exactly the library modules; `pip install <wheel>`, `pip install .` and
`pip install -e .` into a fresh venv work from a directory outside the clone; the console scripts run;
the default lock installs no CUDA wheels while the `cuda12` extra does.

Everything runs on a copy of the working tree in tmp_path (plus the clutter a clone collects:
checkpoints/, .cache/, a scratch module), so nothing is written into the repository. Each venv gets
the locked dependencies from uv's cache (~1 s once the project has been synced); pip then installs
the project with --no-deps --no-build-isolation (hatchling comes from uv's cache too), so no test
downloads anything big. One venv with the wheel installed serves the two tests that only read it
(imports, console scripts).
"""

import configparser
import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
PROJECT = "phoenix_recsys"
# The wheel's modules: the library, then the console scripts' modules and the experiment they run.
LIBRARY = ["grok", "recsys_model", "recsys_retrieval_model", "runners", "phoenix_checkpoint", "phoenix_configs",
           "phoenix_sizes", "phoenix_hashing", "phoenix_index", "phoenix_metrics", "phoenix_training",
           "phoenix_validation", "phoenix_inputs", "phoenix_forward", "phoenix_losses", "phoenix_optim",
           "phoenix_sharding", "phoenix_sharded_checkpoint",
           "phoenix_resume", "phoenix_stop", "phoenix_paths", "phoenix_batching", "phoenix_log", "phoenix_split",
           "phoenix_evaluation", "movielens", "phoenix_synthetic", "phoenix_two_stage", "phoenix_sasrec",
           "phoenix_protocols", "phoenix_pipeline", "phoenix_serving", "phoenix_run_dir", "phoenix_demos",
           "phoenix_export", "phoenix_exported", "phoenix_server"]
ENTRY_POINTS = ["run_ranker", "run_retrieval", "run_recommend", "run_serve", "run_train", "train_synthetic"]
SHIPPED = LIBRARY + ENTRY_POINTS
# Top-level modules deliberately left out: dev-only (bench.py, numpy_reference.py: the tests' oracle,
# imported by no shipped module) and pytest's.
LEFT_OUT = {"bench", "numpy_reference", "conftest", "resume_harness"}
CONSOLE_SCRIPTS = {"phoenix-rank": "run_ranker:cli", "phoenix-recommend": "run_recommend:cli",
                   "phoenix-retrieve": "run_retrieval:cli", "phoenix-serve": "run_serve:cli",
                   "phoenix-train": "run_train:cli"}
TINY_DEMO = ["--no-train", "--emb-size", "16", "--num-layers", "1", "--history-len", "8", "--num-candidates", "4"]


def uv() -> str:
    """uv's executable: `uv run` exports it as $UV; else the one on PATH."""
    found = os.environ.get("UV") or shutil.which("uv")
    if not found:
        pytest.fail("uv not found ($UV unset and no uv on PATH): run the tests with `uv run pytest`")
    return found


def run(cmd, cwd, env=None, timeout=120) -> subprocess.CompletedProcess:
    """Runs `cmd`; fails the test with its output if it exits non-zero."""
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {done.returncode}\nstdout:\n{done.stdout}\n"
                    f"stderr:\n{done.stderr}")
    return done


def outside_env(tmp: Path) -> dict:
    """The environment of a user outside the clone: no venv or PYTHONPATH of ours, caches in tmp, pip offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PHOENIX_CACHE_DIR=str(tmp / "phoenix_cache"), PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def git_files(*flags) -> list[str]:
    return run(["git", "ls-files", *flags], cwd=REPO).stdout.split()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the working tree after demos have run: checkpoints/, .cache/ and a scratch module
    beside the project's files (what made the old wheel hold only `checkpoints`)."""
    src = tmp_path_factory.mktemp("clone")
    for name in git_files("--cached", "--others", "--exclude-standard"):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    for clutter in ("checkpoints/demo_ranker/params.npz", ".cache/phoenix/recbole.whl"):
        (src / clutter).parent.mkdir(parents=True, exist_ok=True)
        (src / clutter).write_bytes(b"\0" * 16)
    (src / "scratch_notes.py").write_text("x = 1\n")
    return src


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([uv(), "build", "--wheel", "--out-dir", out, source], cwd=out)
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    assert not any((source / d).exists() for d in ("build", "dist", f"{PROJECT}.egg-info"))  # built out of tree
    return wheels[0]


@pytest.fixture(scope="module")
def locked_requirements(tmp_path_factory) -> Path:
    """The default lock's runtime dependencies (no dev group, no extras), pinned."""
    path = tmp_path_factory.mktemp("req") / "requirements.txt"
    run([uv(), "export", "--locked", "--no-dev", "--no-emit-project", "--no-hashes", "--quiet", "-o", path],
        cwd=REPO)
    return path


def make_venv(tmp: Path, requirements: Path) -> Path:
    """A fresh venv in tmp with the locked dependencies, pip and hatchling; returns its bin directory."""
    run([uv(), "venv", "--quiet", "--python", sys.executable, tmp / "venv"], cwd=tmp)
    python = tmp / "venv" / "bin" / "python"
    run([uv(), "pip", "install", "--quiet", "--python", python, "-r", requirements, "pip", "hatchling>=1.21"],
        cwd=tmp)
    return python.parent


@pytest.fixture
def venv(tmp_path, locked_requirements) -> Path:
    return make_venv(tmp_path, locked_requirements)


@pytest.fixture(scope="module")
def wheel_venv(wheel, locked_requirements, tmp_path_factory) -> Path:
    """A fresh venv with the wheel pip-installed from outside the clone: a wheel user's environment,
    shared by the tests that only read it (the imports and the console scripts)."""
    tmp = tmp_path_factory.mktemp("wheel_venv")
    venv = make_venv(tmp, locked_requirements)
    pip_install(venv, wheel, tmp=tmp)
    return venv


def pip_install(venv: Path, *args, tmp: Path):
    """`pip install --no-deps --no-build-isolation ARGS` run from a directory outside the clone."""
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    run([venv / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", *args],
        cwd=elsewhere, env=outside_env(tmp))
    return elsewhere


def module_files(venv: Path, cwd: Path, tmp: Path, modules) -> dict:
    """{module: file it is imported from} in the venv's python, run in `cwd`."""
    code = f"import importlib; print('\\n'.join(importlib.import_module(m).__file__ for m in {list(modules)!r}))"
    lines = run([venv / "python", "-c", code], cwd=cwd, env=outside_env(tmp)).stdout.split()
    return dict(zip(modules, map(Path, lines)))


def not_importable(venv: Path, cwd: Path, tmp: Path, module: str) -> bool:
    done = subprocess.run([venv / "python", "-c", f"import {module}"], cwd=cwd, env=outside_env(tmp),
                          capture_output=True, text=True, timeout=60)
    return done.returncode != 0 and "ModuleNotFoundError" in done.stderr


def test_wheel_holds_exactly_the_library_modules(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(f"{PROJECT}-0.1.0.dist-info/entry_points.txt").decode()
        metadata = z.read(f"{PROJECT}-0.1.0.dist-info/METADATA").decode()
    dist_info = {f"{PROJECT}-0.1.0.dist-info/{n}" for n in ("METADATA", "WHEEL", "RECORD", "entry_points.txt")}
    assert names == {f"{m}.py" for m in SHIPPED} | dist_info  # no tests, checkpoints, caches, scratch files
    parser = configparser.ConfigParser()
    parser.read_string(entry_points)
    assert dict(parser["console_scripts"]) == CONSOLE_SCRIPTS
    assert "Provides-Extra: cuda12" in metadata and "Requires-Dist: jax[cuda12]>=0.4.30; extra == 'cuda12'" in metadata
    assert "Provides-Extra: plot" in metadata and "Requires-Dist: matplotlib>=3.8; extra == 'plot'" in metadata


def test_every_top_level_module_is_shipped_or_left_out_on_purpose():
    modules = {Path(f).stem for f in git_files("*.py") if "/" not in f}
    tests = {m for m in modules if m.startswith("test_")}
    assert set(SHIPPED) <= modules
    assert modules - tests - set(SHIPPED) <= LEFT_OUT, "a new module: add it to pyproject.toml's only-include"


def test_default_lock_installs_no_cuda_and_the_cuda12_extra_does():
    def exported(*flags):
        out = run([uv(), "export", "--locked", "--no-hashes", "--no-emit-project", *flags], cwd=REPO).stdout
        return {line.split("==")[0] for line in out.splitlines() if "==" in line and not line.startswith("#")}

    default, cuda = exported(), exported("--extra", "cuda12")
    assert {"jax", "jaxlib", "dm-haiku"} <= default
    assert not {p for p in default if p.startswith(("nvidia-", "jax-cuda"))}
    assert {"jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cudnn-cu12", "nvidia-cublas-cu12"} <= cuda


def elsewhere_dir(tmp: Path) -> Path:
    """An empty working directory outside the clone."""
    (tmp / "elsewhere").mkdir()
    return tmp / "elsewhere"


def test_wheel_installs_into_a_fresh_venv_and_imports_from_outside_the_clone(wheel_venv, tmp_path):
    elsewhere = elsewhere_dir(tmp_path)
    site = next((wheel_venv.parent / "lib").glob("python*/site-packages"))
    files = module_files(wheel_venv, elsewhere, tmp_path, SHIPPED)
    assert all(path.parent == site for path in files.values()), files
    assert not_importable(wheel_venv, elsewhere, tmp_path, "conftest")
    assert not_importable(wheel_venv, elsewhere, tmp_path, "test_demos")


def test_console_scripts_run_from_outside_the_clone(wheel_venv, tmp_path):
    elsewhere = elsewhere_dir(tmp_path)
    for script in CONSOLE_SCRIPTS:
        out = run([wheel_venv / script, "--help"], cwd=elsewhere, env=outside_env(tmp_path)).stdout
        flag = "--run" if script in ("phoenix-recommend", "phoenix-serve") else "--seed"  # serving a run: no seed
        assert out.startswith("usage:") and flag in out, (script, out)
    # A real run exits 0: main()'s result dict must not reach sys.exit (it would print it, exit 1).
    out = run([wheel_venv / "phoenix-rank", *TINY_DEMO], cwd=elsewhere, env=outside_env(tmp_path)).stdout
    assert "random init, untrained" in out and "steady-state rank()" in out
    assert not list(elsewhere.iterdir())  # nothing written into the working directory


def test_pip_install_dot_from_outside_the_clone(venv, source, tmp_path):
    elsewhere = pip_install(venv, source, tmp=tmp_path)
    site = next((venv.parent / "lib").glob("python*/site-packages"))
    files = module_files(venv, elsewhere, tmp_path, ["recsys_model", "runners"])
    assert files == {"recsys_model": site / "recsys_model.py", "runners": site / "runners.py"}
    assert not (site / "checkpoints").exists() and not_importable(venv, elsewhere, tmp_path, "scratch_notes")


def test_pip_editable_install_from_outside_the_clone(venv, source, tmp_path):
    elsewhere = pip_install(venv, "-e", source, tmp=tmp_path)
    files = module_files(venv, elsewhere, tmp_path, ["recsys_model", "runners"])
    assert files == {"recsys_model": source / "recsys_model.py", "runners": source / "runners.py"}
    assert all((venv / script).exists() for script in CONSOLE_SCRIPTS)


# Entry-point scripts: a command line, not an API (every other top-level module is the library).
SCRIPTS = {"run_train", "run_ranker", "run_retrieval", "bench", "resume_harness"}


def api_modules() -> list[str]:
    """Every library module, read from the directory as test_layering.py does: a new one is included."""
    names = {Path(p).stem for p in REPO.glob("*.py")}
    return sorted(n for n in names if not n.startswith("test_") and n != "conftest" and n not in SCRIPTS)


@pytest.mark.parametrize("module", api_modules())
def test_every_library_module_declares_its_public_api(module):
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    assert isinstance(names, (list, tuple)) and names, f"{module}.py: declare __all__ (its public API)"
    assert all(isinstance(n, str) for n in names), names
    assert [n for n in names if not hasattr(mod, n)] == [], f"{module}.__all__ names what the module lacks"
    assert len(names) == len(set(names)), f"{module}.__all__ has duplicates"
    assert [n for n in names if n.startswith("_")] == [], f"{module}.__all__ names private names"
