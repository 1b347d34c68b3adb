"""The README and docs/: a front page of bounded length, every relative link and anchor resolving, every
module of the clone in the README's layout, and the README's Python snippet running as written from a
directory outside the clone."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300  # a front page (issue 32); the rest lives in docs/

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def prose(text: str) -> str:
    """Markdown without its fenced code blocks (a link inside code is not a link)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but - and _ dropped, spaces -> -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    return {slug(line.lstrip("#")) for line in prose(path.read_text()).splitlines() if line.startswith("#")}


def relative_links(path: Path) -> list:
    """(target path, anchor or None) of every link in `path` that is not a URL."""
    found = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        found.append((path if not file else (path.parent / file).resolve(), anchor or None))
    return found


def test_readme_is_a_front_page():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md: expected at most {README_MAX_LINES} lines, got {lines}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target, anchor in relative_links(page):
        if not target.exists():
            broken.append(f"{os.path.relpath(target, page.parent)} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{os.path.relpath(target, page.parent)}#{anchor} (no such heading)")
    assert broken == [], f"{page.relative_to(REPO)}: broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {target for target, _ in relative_links(README)}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert unlinked == [], f"README.md: expected a link to every docs/ page, missing {unlinked}"


def test_the_checks_catch_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[ok](#a-title) [gone](missing.md) [bad](#no-title)\n```\n[code](x.md)\n```\n")
    assert slug("Hash collisions (`phoenix_hashing.py`)") == "hash-collisions-phoenix_hashingpy"
    links = relative_links(page)
    assert [(t.name, a) for t, a in links] == [("page.md", "a-title"), ("missing.md", None), ("page.md", "no-title")]
    assert [a for t, a in links if a and a not in anchors(t)] == ["no-title"]


def code_spans(path: Path) -> list:
    """The `inline code` of a page's prose."""
    return re.findall(r"`([^`\n]+)`", prose(path.read_text()))


def library_modules() -> set:
    return {p.stem for p in REPO.glob("*.py") if not p.name.startswith("test_") and p.name != "conftest.py"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_a_page_names_exists(page):
    """`bench.py`, `scripts/ab_rank.py`, `examples/quickstart.ipynb` ... in a page's inline code are files of the
    clone (placeholders such as `scripts/NAME.py` and the reader's own `my_script.py` aside)."""
    named = {f for span in code_spans(page) for f in re.findall(r"(?<![\w/.-])((?:[\w-]+/)*\w+\.(?:py|ipynb))\b", span)}
    missing = sorted(f for f in named if not (REPO / f).exists() and not re.search(r"NAME|^my_", Path(f).name))
    assert missing == [], f"{page.relative_to(REPO)} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_attribute_a_page_names_exists(page):
    """`module.name` in a page's inline code, for a module of the clone, is an attribute of that module."""
    import importlib

    modules = library_modules()
    named = {(module, name) for span in code_spans(page)
             for module, name in re.findall(r"(?<![\w.])([a-z_][a-z0-9_]*)\.([A-Za-z_]\w*)", span)
             if module in modules and name != "py"}
    missing = sorted(f"{m}.{n}" for m, n in named if not hasattr(importlib.import_module(m), n))
    assert missing == [], f"{page.relative_to(REPO)} names attributes that do not exist: {missing}"


def layout_modules() -> set:
    """The `NAME.py` files the README's layout table names."""
    text = README.read_text()
    table = text[text.index("## Layout"):text.index("\n## ", text.index("## Layout") + 1)]
    return {name for name in re.findall(r"`([A-Za-z_0-9]+\.py)`", table) if not name.startswith("test_")}


def test_the_readme_layout_names_every_module_and_only_existing_ones():
    modules = {m + ".py" for m in library_modules()}
    named = layout_modules()
    assert sorted(modules - named) == [], f"README.md layout: modules missing from the table: {sorted(modules - named)}"
    assert sorted(named - modules) == [], f"README.md layout: names modules that do not exist: {sorted(named - modules)}"


def python_snippets(path: Path) -> list:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


def write_log(path: Path, users: int = 60, items: int = 64, seed: int = 0) -> None:
    """A small CSV log with string ids (u0..u59, i0..i63): each user's items come from one of four item
    groups, so both stages have something to learn. 60 users and the recipe below, as the quickstart
    notebook's fast run, so the two tests compile mostly the same training programs (the session's
    compilation cache)."""
    rng = np.random.default_rng(seed)
    rows = ["user_id,item_id,timestamp"]
    for user in range(users):
        group = rng.integers(4) * (items // 4)
        seen = rng.permutation(items // 4)[:rng.integers(8, items // 4)] + group  # [length]
        rows += [f"u{user},i{item},{1_700_000_000 + 60 * t}" for t, item in enumerate(seen)]
    path.write_text("\n".join(rows) + "\n")


# Sizes for the test: the snippet's `pipeline.LOG_RECIPE` trains with these instead of its own (the
# quickstart notebook's fast settings, a single evaluation per stage, uniform negatives only).
SMALL_RECIPE = dict(emb_size=32, num_layers=1, num_heads=2, retrieval_batch_size=64, ranker_batch_size=64,
                    retrieval_epochs=1.0, ranker_epochs=0.5, learning_rate=3e-3, warmup_steps=10, evals_per_stage=1,
                    retrieve_k=20, negative_pool=20, hard_negatives=0, random_negatives=7)


def test_readme_snippet_runs_as_written_outside_the_clone(tmp_path):
    """The README's one Python snippet, unchanged, in a fresh interpreter of this environment started in a
    directory outside the clone (what `uv run --project CLONE python` does) with no PYTHONPATH: the clone's
    modules import through its editable install. Only the recipe's sizes are made small."""
    (snippet,) = python_snippets(README)
    write_log(tmp_path / "my_log.csv")
    prelude = ("import dataclasses, phoenix_pipeline\n"
               "phoenix_pipeline.LOG_RECIPE = dataclasses.replace(phoenix_pipeline.LOG_RECIPE, "
               f"**{SMALL_RECIPE!r})\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PHOENIX_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", prelude + snippet], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    recommended = ast.literal_eval(done.stdout.strip().splitlines()[-1])  # the snippet's last line prints them
    assert len(recommended) == 10 and all(item.startswith("i") for item, _ in recommended)
    scores = [score for _, score in recommended]
    assert scores == sorted(scores, reverse=True)
    assert (tmp_path / "runs" / "mine" / "ranker").is_dir()  # the run directory is relative to the caller
