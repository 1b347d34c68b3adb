"""MovieLens ratings as Phoenix examples: loading, the leave-one-out split, baselines, top-k dumps.

    uv run python movielens.py --download        # fetch the data once (~2 MB), then the table
    uv run python movielens.py [--data movielens-100k|DIR] [--dump-topk PATH]

prints dataset statistics and the baselines' HR@10, NDCG@10, HR@50 and MRR on validation and
test (about 1.5 s for ML-100K on one core, plus a few seconds for the one-off download).

Data
  MovieLens: F. M. Harper and J. A. Konstan, "The MovieLens Datasets: History and Context",
  ACM Transactions on Interactive Intelligent Systems 5(4), 2015. GroupLens allows research use
  only and forbids redistribution, so the data is never committed here: ML-100K is read from the
  PyPI wheel recbole==1.2.1 (`recbole/dataset_example/ml-100k/ml-100k.inter` and `.item`),
  fetched with pip (that wheel only, `--no-deps`), checked against WHEEL_SHA256 and cached in
  $PHOENIX_CACHE_DIR (default ~/.cache/phoenix). A directory of your own works too: RecBole's
  `*.inter` / `*.item`, GroupLens's ML-100K `u.data` / `u.item`, or ML-1M `ratings.dat` /
  `movies.dat`; the item file is optional. Every line is checked (RatingsFileError naming file,
  line and column): ids and timestamps are non-negative integers parsed exactly as int64 (never
  through float64, which merges ids above 2**53), ratings finite and within RATING_RANGE (a
  `load_ratings` argument), every line has its format's number of fields.

Shape glossary
  R  ratings      U  users        N  catalog items (movies with at least one rating)
  G  genres (19)  Nm  movies with metadata
  E  examples     S  history length      A  actions (19, phoenix_inputs.ACTIONS order)    K  top-k

Leave-one-out (SASRec, BERT4Rec, HSTU)
  Each user's ratings are sorted by timestamp with a stable sort, so equal timestamps keep file
  order (ML-100K users often rate many movies within one second). The last rating is the test
  target, the one before it the validation target, all earlier ones train. Users with fewer than
  MIN_EVAL_RATINGS ratings (none in ML-100K / ML-1M) only train, as in SASRec; a log where no user
  has that many is an error. A movie rated twice by one user (none in ML-100K / ML-1M) would put a
  target in its own history: leave_one_out rejects it, or with duplicates="first" keeps only the
  earliest rating of each (user, movie). The history of a
  target is the up-to-S items before it. Training examples: every position t >= 1 of a user's
  training part. Evaluation ranks all N catalog items except every earlier item of the user (not
  only the last S), never the target (phoenix_metrics.py has the tie rule: smaller item id first).

Mapping to Phoenix inputs (phoenix_hashing.py hashes the raw ids later)
  user, post   raw MovieLens user and movie ids.
  author       the movie's genre signature: bit g of the id is set iff the movie has genre g
               (GENRES order; "unknown" is bit 0; 0 = no metadata). ML-100K has no director or
               studio; the 216 signatures behave like creators with a recognisable style (84% of
               movies share theirs with >= 4 others, e.g. "Comedy Romance" has 68), so the author
               embedding pools evidence across similar movies and author-level actions mean
               something. The alternative, the first genre ("first_genre", 19 authors with up to
               531 movies each), is too coarse to add much; decades add little (79% are 1990s).
  actions      from the rating (RATING_ACTIONS): every rating -> click_score (the user chose
               and watched the movie); >= 4 -> favorite_score; 5 -> share_score (the strongest
               endorsement, what one recommends to friends); <= 2 -> not_interested_score. The
               other 15 actions are never set.
  surface      SURFACE = 0 everywhere: all ratings come from one web UI and nothing in the data
               tells pages apart. A time-gap bucket would smuggle the target's timing into the
               candidate. Padding also has surface 0; the model masks by the post hash.
  padding      right-padded: valid items first (oldest .. most recent), then PAD_ID (-1, phoenix_inputs.py's
               convention) posts and authors, zero actions, surface 0.

Baselines (same evaluation code; "visible" = what training may use for the split evaluated)
  popularity   items by number of visible ratings.
  transition   items by the count of visible consecutive pairs (user's last visible item -> item),
               ties and unseen pairs backed off to popularity, then item id.
  Validation sees the training parts; test also sees the validation items, i.e. everything before
  the test targets, which is also the history the test targets get. ML-100K measured:
                   HR@10    NDCG@10  HR@50    MRR
    val  pop       0.0742   0.0345   0.2301   0.0333
    val  trans     0.1432   0.0748   0.3319   0.0659
    test pop       0.0859   0.0449   0.1983   0.0416
    test trans     0.1453   0.0793   0.3393   0.0719
  matching the issue's 0.086 and 0.145. Training the transition counts on the training parts only
  gives test HR@10 0.1442; popularity's HR@10 is the same either way.
"""

import argparse
import csv
import dataclasses
import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

import phoenix_metrics as metrics
from phoenix_inputs import ACTIONS, PAD_ID, RawBatch

SOURCE_ML100K = "movielens-100k"
WHEEL_REQUIREMENT = "recbole==1.2.1"
WHEEL_FILE = "recbole-1.2.1-py3-none-any.whl"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
WHEEL_INTER = "recbole/dataset_example/ml-100k/ml-100k.inter"
WHEEL_ITEM = "recbole/dataset_example/ml-100k/ml-100k.item"
CACHE_ENV = "PHOENIX_CACHE_DIR"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "phoenix"

# GroupLens's genre list (u.genre order; ML-1M uses the same names without "unknown").
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")
YEAR_UNKNOWN = 0

RATING_ACTIONS = {
    "click_score": (1.0, 5.0),
    "favorite_score": (4.0, 5.0),
    "share_score": (5.0, 5.0),
    "not_interested_score": (1.0, 2.0),
}
SURFACE = 0  # the one product surface of MovieLens (module docstring)
MIN_EVAL_RATINGS = 3  # a user needs a training item, a validation and a test target
RATING_RANGE = (1.0, 5.0)  # MovieLens stars, inclusive (ML-10M and later have half stars from 0.5)
DUPLICATE_RULES = ("error", "first")  # leave_one_out: reject repeated (user, movie) or keep the first
AUTHOR_SCHEMES = ("genres", "first_genre")
SPLITS = ("train", "val", "test")
BASELINES = ("popularity", "transition")
EVAL_CHUNK = 1024  # users scored at once: bounds the [users, N] float64 score matrix


# ---------------------------------------------------------------------------------------------
# Download and parsing
# ---------------------------------------------------------------------------------------------


def cache_dir(path=None) -> Path:
    """The data cache: `path`, else $PHOENIX_CACHE_DIR, else ~/.cache/phoenix."""
    return Path(path or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_commands(dest: str) -> list[list[str]]:
    """pip invocations to try: this interpreter's pip, pip through uv (uv venvs lack pip), pip on PATH."""
    args = ["download", "--no-deps", "--only-binary=:all:", WHEEL_REQUIREMENT, "-d", dest]
    commands = []
    if importlib.util.find_spec("pip") is not None:
        commands.append([sys.executable, "-m", "pip", *args])
    if shutil.which("uv"):  # --no-project: leave the project's environment alone
        commands.append(["uv", "run", "--no-project", "--with", "pip", "python", "-m", "pip", *args])
    for pip in ("pip", "pip3"):
        if shutil.which(pip):
            commands.append([pip, *args])
    return commands


def ensure_wheel(cache=None) -> Path:
    """Path of the verified recbole wheel in the cache; downloads it (that wheel only) if missing."""
    wheel = cache_dir(cache) / WHEEL_FILE
    if wheel.exists() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    print(f"movielens: fetching MovieLens-100K inside the PyPI wheel {WHEEL_REQUIREMENT} (~2 MB, "
          f"no dependencies) into {wheel.parent}", file=sys.stderr)
    errors = []
    with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
        for command in _pip_commands(tmp):
            done = subprocess.run(command, capture_output=True, text=True)
            fetched = Path(tmp) / WHEEL_FILE
            if done.returncode == 0 and fetched.exists():
                digest = _sha256(fetched)
                if digest != WHEEL_SHA256:
                    raise RuntimeError(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}")
                os.replace(fetched, wheel)
                print(f"movielens: saved {wheel}", file=sys.stderr)
                return wheel
            errors.append(f"{' '.join(command[:4])} ...: {done.stderr.strip()[-500:]}")
    raise WheelUnavailableError("could not download " + WHEEL_REQUIREMENT + " (no network, or no pip?):\n"
                       + "\n".join(errors or ["no pip found"]))


class WheelUnavailableError(RuntimeError):
    """No pip could fetch the recbole wheel (no registry access, or no pip): the data cannot be had here.
    A fetched wheel whose sha256 differs raises a plain RuntimeError instead: that is never skipped."""


class RatingsFileError(ValueError):
    """A ratings or movies file that is not in its documented format; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class Ratings:
    """Ratings in file order, and movie metadata sorted by item id (checked on construction)."""

    user: np.ndarray  # [R] int64 raw user ids, >= 0
    item: np.ndarray  # [R] int64 raw movie ids, >= 0
    rating: np.ndarray  # [R] float32 stars, finite
    timestamp: np.ndarray  # [R] int64 Unix seconds, >= 0
    item_ids: np.ndarray  # [Nm] int64 movies with metadata, ascending, unique
    titles: np.ndarray  # [Nm] object str, without the "(year)" suffix
    years: np.ndarray  # [Nm] int32 release year, YEAR_UNKNOWN if absent
    genres: np.ndarray  # [Nm, G] bool multi-hot over GENRES
    source: str

    def __post_init__(self):
        # The parsers already check every line; this catches hand-built Ratings (negative ids
        # would silently become padding downstream, float ids would be truncated).
        num = len(np.asarray(self.user))
        for name in ("user", "item", "rating", "timestamp"):
            x = np.asarray(getattr(self, name))
            if x.shape != (num,):
                raise ValueError(f"Ratings.{name}: expected shape [R={num}], got {x.shape}")
            integer = np.issubdtype(x.dtype, np.integer)
            if name != "rating" and not integer:
                raise TypeError(f"Ratings.{name}: expected an integer dtype, got {x.dtype}")
            if name == "rating" and not (integer or np.issubdtype(x.dtype, np.floating)):
                raise TypeError(f"Ratings.rating: expected a float dtype, got {x.dtype}")
            if name == "rating" and not np.all(np.isfinite(x)):
                raise ValueError(f"Ratings.rating: expected finite stars, got {x[~np.isfinite(x)][0]} "
                                 f"at rating {np.flatnonzero(~np.isfinite(x))[0]}")
            if name != "rating" and num and x.min() < 0:
                why = "" if name == "timestamp" else " (negative ids are padding)"
                raise ValueError(f"Ratings.{name}: expected values >= 0{why}, got {x.min()} at rating "
                                 f"{np.argmin(x)}")
        item_ids = np.asarray(self.item_ids)
        if len(item_ids) > 1 and not np.all(np.diff(item_ids) > 0):
            raise ValueError("Ratings.item_ids: expected ascending unique movie ids")
        for name in ("titles", "years", "genres"):
            if len(getattr(self, name)) != len(item_ids):
                raise ValueError(f"Ratings.{name}: expected {len(item_ids)} rows (one per item_ids), "
                                 f"got {len(getattr(self, name))}")


def _decode(data: bytes, encoding: str, where: str) -> str:
    """bytes -> text; a decode error names the file, the 1-based line and the byte."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise RatingsFileError(
            f"{where}:{line}: not valid {encoding} (byte {data[error.start]:#04x}); GroupLens files "
            "are Latin-1, RecBole's UTF-8") from None


def _lines(text: str):
    """(1-based line number, line) of the non-blank lines. Splits on "\\n" only: str.splitlines
    would also split at U+0085, which Latin-1 byte 0x85 decodes to, and shift every line number."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


_INTEGER = re.compile(r"\s*(-?[0-9]+)\s*")
# RecBole declares timestamps "float"; an integral value written as "881250949.0" is fine.
_INTEGRAL_DECIMAL = re.compile(r"\s*(-?[0-9]+)(?:\.0*)?\s*")
_DECIMAL = re.compile(r"\s*-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*")
_INT64_MAX = np.iinfo(np.int64).max


def _parse_int(field: str, what: str, where: str, column: int, pattern=_INTEGER) -> int:
    """A non-negative int64 from decimal text, exactly (no float round trip), else RatingsFileError."""
    match = pattern.fullmatch(field)
    if match is None:
        raise RatingsFileError(f"{where}: column {column} ({what}): expected a non-negative integer, "
                               f"got {field.strip()!r}")
    digits = match.group(1).lstrip("-").lstrip("0")
    # More than 19 digits cannot fit int64 (and int() refuses > 4300 digits).
    value = _INT64_MAX + 1 if len(digits) > 19 else int(match.group(1))
    if value < 0:
        why = "" if what == "timestamp" else " (negative ids are padding)"
        raise RatingsFileError(f"{where}: column {column} ({what}): expected a non-negative integer{why}, "
                               f"got {value}")
    if value > _INT64_MAX:
        raise RatingsFileError(f"{where}: column {column} ({what}): expected a value that fits int64 "
                               f"(<= 2**63 - 1), got {field.strip()[:40]!r}")
    return value


def _parse_rating(field: str, where: str, column: int, rating_range) -> float:
    low, high = rating_range
    value = float(field) if _DECIMAL.fullmatch(field) else None  # float() alone takes "nan", "1_0"
    if value is None or not low <= value <= high:
        raise RatingsFileError(f"{where}: column {column} (rating): expected a number in "
                               f"[{low:g}, {high:g}], got {field.strip()!r}")
    return value


def _check_rating_range(rating_range) -> tuple[float, float]:
    low, high = (float(x) for x in rating_range)
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise ValueError(f"rating_range: expected finite (low, high) with low <= high, got {rating_range}")
    return low, high


def _parse_ratings_fast(body: str, sep: str, width: int, columns, rating_range):
    """`_parse_ratings` for clean files, vectorised (np.loadtxt parses int64 exactly and rejects
    "1.5", "1e20" and overflow): None wherever the per-line parser must run for its error message."""
    if width != 4 or not body.strip() or (sep != "\t" and "\t" in body):
        return None
    kinds = ["i8"] * 4
    kinds[columns[2]] = "f8"
    try:
        data = np.loadtxt(io.StringIO(body if sep == "\t" else body.replace(sep, "\t")), delimiter="\t",
                          dtype=[(f"c{j}", kind) for j, kind in enumerate(kinds)], comments=None, ndmin=1)
    except (ValueError, OverflowError):
        return None
    user, item, stars, stamp = (np.ascontiguousarray(data[f"c{c}"]) for c in columns)  # [R] each
    low, high = rating_range
    if min(user.min(), item.min(), stamp.min()) < 0 or not np.all((stars >= low) & (stars <= high)):
        return None
    return user, item, stars.astype(np.float32), stamp


def _parse_ratings(body: str, first_line: int, where: str, sep: str, width: int, columns, rating_range):
    """Ratings arrays (user, item [R] int64, rating [R] float32, timestamp [R] int64) of the lines
    of `body`, which starts at 1-based line `first_line` of the file."""
    rating_range = _check_rating_range(rating_range)
    fast = _parse_ratings_fast(body, sep, width, columns, rating_range)
    if fast is not None:
        return fast
    user_col, item_col, rating_col, stamp_col = columns
    users, items, stars, stamps = [], [], [], []
    for number, line in _lines(body):
        at = f"{where}:{number + first_line - 1}"
        fields = line.split(sep)
        if len(fields) != width:
            raise RatingsFileError(f"{at}: expected {width} fields separated by {sep!r}, got {len(fields)}: "
                                   f"{line[:80]!r}")
        users.append(_parse_int(fields[user_col], "user id", at, user_col + 1))
        items.append(_parse_int(fields[item_col], "item id", at, item_col + 1))
        stars.append(_parse_rating(fields[rating_col], at, rating_col + 1, rating_range))
        stamps.append(_parse_int(fields[stamp_col], "timestamp", at, stamp_col + 1, _INTEGRAL_DECIMAL))
    if not users:
        raise RatingsFileError(f"{where}: no ratings in the file")
    return (np.array(users, np.int64), np.array(items, np.int64), np.array(stars, np.float32),
            np.array(stamps, np.int64))


def parse_inter(text: str, source: str = "<.inter>", rating_range=RATING_RANGE):
    """RecBole atomic `.inter` (header `user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float`)."""
    first, _, body = text.partition("\n")
    header = [field.split(":")[0].strip() for field in first.strip().split("\t")]
    try:
        columns = [header.index(name) for name in ("user_id", "item_id", "rating", "timestamp")]
    except ValueError:
        raise RatingsFileError(f"{source}:1: expected a header with user_id, item_id, rating and "
                               f"timestamp, got {header}") from None
    return _parse_ratings(body, 2, source, "\t", len(header), columns, rating_range)


def parse_grouplens_ratings(text: str, sep: str, source: str = "<ratings>", rating_range=RATING_RANGE):
    """GroupLens `u.data` (sep TAB) or ML-1M `ratings.dat` (sep `::`): user, item, rating, timestamp."""
    return _parse_ratings(text, 1, source, sep, 4, (0, 1, 2, 3), rating_range)


_TITLE_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
_YEAR_AT_END = re.compile(r"(\d{4})\s*$")


def _title_and_year(title: str, year_field: str) -> tuple[str, int]:
    """Title without a trailing "(YYYY)"; the year from year_field (a year or a date), else the title."""
    in_title = _TITLE_YEAR.search(title)
    in_field = _YEAR_AT_END.search(year_field)
    year = int(in_field.group(1)) if in_field else int(in_title.group(1)) if in_title else YEAR_UNKNOWN
    return (title[: in_title.start()] if in_title else title).strip(), year


def _metadata(rows, where: str):
    """Sorted metadata arrays from (id, title, year, genre names, line number) tuples."""
    rows = sorted(rows, key=lambda row: (row[0], row[4]))  # by id, then file order
    genres = np.zeros((len(rows), len(GENRES)), dtype=bool)  # [Nm, G]
    for m, (movie_id, _, _, names, number) in enumerate(rows):
        if m and rows[m - 1][0] == movie_id:
            raise RatingsFileError(f"{where}:{number}: movie id {movie_id} already listed on line "
                                   f"{rows[m - 1][4]}")
        for name in names:
            if name not in GENRES:
                raise RatingsFileError(f"{where}:{number}: unknown genre {name!r}; expected one of {GENRES}")
            genres[m, GENRES.index(name)] = True
    return (np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=object),
            np.array([r[2] for r in rows], dtype=np.int32), genres)


def _fields(line: str, sep: str, width: int, at: str) -> list[str]:
    fields = line.split(sep)
    if len(fields) != width:  # a short or long line would shift every later field
        raise RatingsFileError(f"{at}: expected {width} fields separated by {sep!r}, got {len(fields)}: "
                               f"{line[:80]!r}")
    return fields


def parse_recbole_items(text: str, source: str = "<.item>"):
    """RecBole `.item`: item_id, movie_title, release_year, class (space-separated genres)."""
    lines = _lines(text)
    number, first = next(lines, (1, ""))
    header = [field.split(":")[0].strip() for field in first.split("\t")]
    names = ("item_id", "movie_title", "release_year", "class")
    if not set(names) <= set(header):
        raise RatingsFileError(f"{source}:{number}: expected a header with {', '.join(names)}, got {header}")
    col = {name: header.index(name) for name in names}
    rows = []
    for number, line in lines:
        at = f"{source}:{number}"
        fields = _fields(line, "\t", len(header), at)
        title, year = _title_and_year(fields[col["movie_title"]], fields[col["release_year"]])
        movie_id = _parse_int(fields[col["item_id"]], "item id", at, col["item_id"] + 1)
        rows.append((movie_id, title, year, fields[col["class"]].split(), number))
    return _metadata(rows, source)


def parse_grouplens_items(text: str, source: str = "<u.item>"):
    """GroupLens `u.item`: id|title|release date|video date|IMDb URL|19 genre flags (GENRES order)."""
    rows = []
    for number, line in _lines(text):
        at = f"{source}:{number}"
        fields = _fields(line, "|", 5 + len(GENRES), at)
        flags = [f.strip() for f in fields[5:]]
        bad = [f for f in flags if f not in ("0", "1")]
        if bad:
            raise RatingsFileError(f"{at}: genre flags (columns 6-{5 + len(GENRES)}): expected 0 or 1, "
                                   f"got {bad[0]!r}")
        title, year = _title_and_year(fields[1], fields[2])
        movie_id = _parse_int(fields[0], "item id", at, 1)
        rows.append((movie_id, title, year, [g for g, f in zip(GENRES, flags) if f == "1"], number))
    return _metadata(rows, source)


def parse_ml1m_movies(text: str, source: str = "<movies.dat>"):
    """ML-1M `movies.dat`: id::Title (Year)::Genre|Genre."""
    rows = []
    for number, line in _lines(text):
        at = f"{source}:{number}"
        movie_id, title, genres = _fields(line, "::", 3, at)
        title, year = _title_and_year(title, "")
        rows.append((_parse_int(movie_id, "item id", at, 1), title, year, genres.strip().split("|"), number))
    return _metadata(rows, source)


def _no_metadata():
    return (np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0, np.int32),
            np.zeros((0, len(GENRES)), bool))


def _read(path: Path, encoding: str) -> str:
    return _decode(path.read_bytes(), encoding, str(path))


def _read_wheel(wheel: Path) -> tuple[str, str]:
    """(.inter text, .item text) of the recbole wheel; a bad archive or member names the wheel."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return tuple(_decode(archive.read(member), "utf-8", f"{wheel}!{member}")
                         for member in (WHEEL_INTER, WHEEL_ITEM))
    except (zipfile.BadZipFile, KeyError) as error:
        raise RatingsFileError(f"{wheel}: not a recbole wheel with {WHEEL_INTER} and {WHEEL_ITEM} "
                               f"({error})") from None


def load_ratings(source: str | os.PathLike = SOURCE_ML100K, cache=None, rating_range=RATING_RANGE) -> Ratings:
    """Reads ratings (file order) and movie metadata from SOURCE_ML100K, a recbole wheel or a directory.

    A directory may hold RecBole's `*.inter` (+ `*.item`), GroupLens's `u.data` (+ `u.item`) or
    ML-1M's `ratings.dat` (+ `movies.dat`). GroupLens files are Latin-1, RecBole's UTF-8. Ids and
    timestamps must be non-negative integers (parsed exactly, as int64), ratings numbers within
    `rating_range` (inclusive); any other line raises RatingsFileError naming file and line.
    """
    if str(source) == SOURCE_ML100K:
        source = ensure_wheel(cache)
    path = Path(source)
    inter_files = sorted(path.glob("*.inter")) if path.is_dir() else []
    if path.is_file() and path.suffix in (".whl", ".zip"):
        inter_text, item_text = _read_wheel(path)
        ratings = parse_inter(inter_text, f"{path}!{WHEEL_INTER}", rating_range)
        items = parse_recbole_items(item_text, f"{path}!{WHEEL_ITEM}")
    elif len(inter_files) > 1:  # which one is meant? silently taking the first could be wrong
        raise RatingsFileError(f"{source}: expected one *.inter file, got {[p.name for p in inter_files]}")
    elif inter_files:
        inter = inter_files[0]
        ratings = parse_inter(_read(inter, "utf-8-sig"), str(inter), rating_range)
        item_file = inter.with_suffix(".item")
        items = (parse_recbole_items(_read(item_file, "utf-8-sig"), str(item_file)) if item_file.exists()
                 else _no_metadata())
    elif path.is_dir() and (path / "u.data").exists():
        ratings = parse_grouplens_ratings(_read(path / "u.data", "latin-1"), "\t", str(path / "u.data"),
                                          rating_range)
        item_file = path / "u.item"
        items = (parse_grouplens_items(_read(item_file, "latin-1"), str(item_file)) if item_file.exists()
                 else _no_metadata())
    elif path.is_dir() and (path / "ratings.dat").exists():
        ratings = parse_grouplens_ratings(_read(path / "ratings.dat", "latin-1"), "::",
                                          str(path / "ratings.dat"), rating_range)
        item_file = path / "movies.dat"
        items = (parse_ml1m_movies(_read(item_file, "latin-1"), str(item_file)) if item_file.exists()
                 else _no_metadata())
    elif path.is_dir():
        raise RatingsFileError(f"{source}: is a directory holding none of *.inter, u.data, ratings.dat (the MovieLens "
                               "files it reads); a log CSV is given as a file (--data LOG.csv)")
    else:
        raise FileNotFoundError(f"{source}: expected {SOURCE_ML100K!r}, a recbole wheel, or a directory "
                                "with *.inter, u.data or ratings.dat")
    return Ratings(*ratings, *items, source=str(source))


# ---------------------------------------------------------------------------------------------
# Leave-one-out split and Phoenix examples
# ---------------------------------------------------------------------------------------------


def rating_actions(rating) -> np.ndarray:
    """Ratings [...] -> action multi-hot [..., A] bool in ACTIONS order (RATING_ACTIONS)."""
    rating = np.asarray(rating, dtype=np.float32)
    if not np.all(np.isfinite(rating)):  # NaN would silently set no action at all
        raise ValueError("rating: expected finite stars, got NaN or inf")
    actions = np.zeros(rating.shape + (len(ACTIONS),), dtype=bool)  # [..., A]
    for name, (low, high) in RATING_ACTIONS.items():
        actions[..., ACTIONS.index(name)] = (rating >= low) & (rating <= high)
    return actions


def genre_authors(genres, scheme: str = "genres") -> np.ndarray:
    """Author ids [Nm] int64 from genre multi-hots [Nm, G]: the genre bitmask, or its lowest bit."""
    if scheme not in AUTHOR_SCHEMES:
        raise ValueError(f"scheme must be one of {AUTHOR_SCHEMES}, got {scheme!r}")
    mask = np.asarray(genres, dtype=np.int64) @ (np.int64(1) << np.arange(len(GENRES), dtype=np.int64))  # [Nm]
    return mask if scheme == "genres" else mask & -mask


@dataclasses.dataclass(frozen=True)
class Split:
    """Per-user time-ordered ratings (CSR layout) with leave-one-out targets; catalog = rated items."""

    user_ids: np.ndarray  # [U] int64 raw ids, ascending
    offsets: np.ndarray  # [U + 1] user u's ratings are positions offsets[u]:offsets[u + 1]
    items: np.ndarray  # [R] int64 raw movie ids, per user oldest first
    ratings: np.ndarray  # [R] float32
    timestamps: np.ndarray  # [R] int64
    item_columns: np.ndarray  # [R] int64 column of `items` in the catalog
    train_len: np.ndarray  # [U] training positions per user (length - 2, or length if no eval)
    has_eval: np.ndarray  # [U] bool, the user has validation and test targets
    item_ids: np.ndarray  # [N] int64 catalog: every rated movie, ascending (= score columns)
    item_authors: np.ndarray  # [N] int64 author id of each catalog movie

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # [U]

    def eval_users(self) -> np.ndarray:
        """Rows [U_eval] of the users with validation and test targets."""
        return np.flatnonzero(self.has_eval)

    def visible_len(self, which: str) -> np.ndarray:
        """[U] number of each user's first ratings that training may use when evaluating `which`."""
        if which == "test":  # the validation item too: everything before the test target
            return self.train_len + self.has_eval
        if which in ("train", "val"):
            return self.train_len
        raise ValueError(f"which must be one of {SPLITS}, got {which!r}")

    def target_positions(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(user rows [E], positions [E] into `items`) of the targets of `which`."""
        if which == "train":  # every position t >= 1 of each training part
            counts = np.maximum(self.train_len - 1, 0)  # [U]
            rows = np.repeat(np.arange(len(self.user_ids)), counts)  # [E]
            first = np.cumsum(counts) - counts  # [U] index of each user's first example
            t = np.arange(counts.sum()) - first[rows] + 1  # [E] position within the user
            return rows, self.offsets[rows] + t
        rows = self.eval_users()  # [E]
        return rows, self.offsets[rows] + self.visible_len(which)[rows]

    def exclude_mask(self, which: str) -> np.ndarray:
        """[U_eval, N] bool: every item before the `which` ("val"/"test") target of each eval user."""
        rows = self.eval_users()
        visible = self.visible_len(which)[rows]  # [U_eval]
        owner = np.repeat(np.arange(len(rows)), visible)  # [sum visible]
        first = np.cumsum(visible) - visible
        positions = self.offsets[rows][owner] + np.arange(visible.sum()) - first[owner]
        mask = np.zeros((len(rows), len(self.item_ids)), dtype=bool)
        mask[owner, self.item_columns[positions]] = True
        return mask

    def targets(self, which: str) -> np.ndarray:
        """Catalog columns [E] of the targets of `which`."""
        return self.item_columns[self.target_positions(which)[1]]

    def authors_of(self, item_ids) -> np.ndarray:
        """Author ids [...] of raw movie ids [...]; PAD_ID stays PAD_ID; unknown movies raise."""
        item_ids = _integer_ids(item_ids, "item_ids")
        columns = np.clip(np.searchsorted(self.item_ids, item_ids), 0, len(self.item_ids) - 1)
        known = self.item_ids[columns] == item_ids
        if not np.all(known | (item_ids < 0)):
            raise ValueError(f"movies not in the catalog: {np.unique(item_ids[~known & (item_ids >= 0)])[:10]}")
        return np.where(item_ids < 0, PAD_ID, self.item_authors[columns])


def _integer_ids(ids, name: str) -> np.ndarray:
    """ids as int64; floats, bools and strings raise TypeError (a cast would truncate 10.7 to 10)."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name}: expected integer movie ids, got dtype {ids.dtype}")
    return ids.astype(np.int64)


def _later_duplicates(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """[R] bool over time-ordered ratings: True where the user already rated the item earlier."""
    by_pair = np.lexsort((np.arange(len(users)), items, users))  # (user, item), then time order
    repeat = np.zeros(len(users), dtype=bool)
    repeat[1:] = (users[by_pair][1:] == users[by_pair][:-1]) & (items[by_pair][1:] == items[by_pair][:-1])
    later = np.zeros(len(users), dtype=bool)
    later[by_pair] = repeat
    return later


def leave_one_out(ratings: Ratings, author_scheme: str = "genres", duplicates: str = "error") -> Split:
    """Stable per-user time sort; last rating = test, the one before = validation, earlier = train.

    A movie a user rated twice would leak a target into its own history, so repeated (user, movie)
    pairs raise ValueError (duplicates="error"), or only each pair's earliest rating (time, then
    file order) is kept (duplicates="first"). Raises ValueError if no user has MIN_EVAL_RATINGS.
    """
    if author_scheme not in AUTHOR_SCHEMES:
        raise ValueError(f"author_scheme must be one of {AUTHOR_SCHEMES}, got {author_scheme!r}")
    if duplicates not in DUPLICATE_RULES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_RULES}, got {duplicates!r}")
    order = np.argsort(ratings.timestamp, kind="stable")  # ties keep file order ...
    order = order[np.argsort(ratings.user[order], kind="stable")]  # ... and stay sorted within a user
    later = _later_duplicates(ratings.user[order], ratings.item[order])  # [R]
    if later.any() and duplicates == "error":
        pairs = sorted({(int(ratings.user[r]), int(ratings.item[r])) for r in order[later]})
        raise ValueError(f"{ratings.source}: {int(later.sum())} ratings repeat an earlier (user, movie) pair, "
                         f"e.g. {pairs[:5]}; a repeat would put a target in its own history. Pass "
                         "duplicates='first' to keep each pair's earliest rating")
    order = order[~later]
    user_ids, counts = np.unique(ratings.user[order], return_counts=True)  # [U]
    has_eval = counts >= MIN_EVAL_RATINGS
    if not has_eval.any():  # nothing to validate or test on: the baselines would fail much later
        raise ValueError(f"{ratings.source}: no user has >= {MIN_EVAL_RATINGS} ratings (MIN_EVAL_RATINGS: a "
                         f"training item, a validation and a test target); found max "
                         f"{counts.max() if len(counts) else 0} over {len(user_ids)} users")
    items = ratings.item[order]  # [R]
    item_ids = np.unique(items)  # [N]
    genres = np.zeros((len(item_ids), len(GENRES)), dtype=bool)  # [N, G]; no metadata -> author 0
    meta_rows = np.searchsorted(ratings.item_ids, item_ids)  # [N]
    with_meta = meta_rows < len(ratings.item_ids)
    with_meta[with_meta] = ratings.item_ids[meta_rows[with_meta]] == item_ids[with_meta]
    genres[with_meta] = ratings.genres[meta_rows[with_meta]]
    return Split(
        user_ids=user_ids,
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        items=items,
        ratings=ratings.rating[order],
        timestamps=ratings.timestamp[order],
        item_columns=np.searchsorted(item_ids, items).astype(np.int64),
        train_len=np.where(has_eval, counts - 2, counts).astype(np.int64),
        has_eval=has_eval,
        item_ids=item_ids,
        item_authors=genre_authors(genres, author_scheme),
    )


def phoenix_examples(split: Split, which: str = "train", history_len: int = 200,
                     example_indices=None) -> dict:
    """Phoenix inputs of the `which` examples (all, or those at `example_indices`) as NumPy arrays.

    Keys: user_ids [E], history_post_ids / history_author_ids [E, S] int64 (PAD_ID padding),
    history_actions [E, S, A] bool (cast to float32 per batch; batch_from_ids does), history_surfaces
    [E, S] int32, history_len [E], target_post_ids / target_author_ids / target_columns [E],
    target_actions [E, A] bool, target_surfaces [E], user_rows [E]. Histories hold the up-to-S items
    right before the target, oldest first, then padding.
    """
    if history_len < 1:
        raise ValueError(f"history_len: expected >= 1, got {history_len}")
    rows, positions = split.target_positions(which)  # [E], [E]
    if example_indices is not None:
        rows, positions = rows[example_indices], positions[example_indices]
    valid_len = np.minimum(positions - split.offsets[rows], history_len)  # [E]
    slots = np.arange(history_len)[None, :]  # [1, S]
    valid = slots < valid_len[:, None]  # [E, S]
    history = np.where(valid, positions[:, None] - valid_len[:, None] + slots, 0)  # [E, S] positions
    history_items = np.where(valid, split.items[history], PAD_ID)  # [E, S]
    return {
        "user_ids": split.user_ids[rows],
        "user_rows": rows,
        "history_post_ids": history_items,
        "history_author_ids": split.authors_of(history_items),
        "history_actions": rating_actions(split.ratings[history]) & valid[..., None],
        "history_surfaces": np.full(history_items.shape, SURFACE, dtype=np.int32),
        "history_len": valid_len,
        "target_post_ids": split.items[positions],
        "target_author_ids": split.authors_of(split.items[positions]),
        "target_columns": split.item_columns[positions],
        "target_actions": rating_actions(split.ratings[positions]),
        "target_surfaces": np.full(positions.shape, SURFACE, dtype=np.int32),
    }


def phoenix_batch(split: Split, examples: dict, hash_config, candidate_post_ids=None):
    """The hashed RecsysBatch of `examples`; candidates [E, C] raw movie ids, default the targets [E, 1]."""
    if candidate_post_ids is None:
        candidate_post_ids = examples["target_post_ids"][:, None]  # [E, 1]
    candidate_post_ids = _integer_ids(candidate_post_ids, "candidate_post_ids")
    return RawBatch.with_candidates(examples, candidate_post_ids, split.authors_of(candidate_post_ids),
                                    np.full(candidate_post_ids.shape, SURFACE, np.int32)).hashed(hash_config)


def item_sampling_frequencies(split: Split) -> np.ndarray:
    """Share [N] (sums to 1) of each catalog movie among training targets: q for logQ correction.

    In-batch negatives are other examples' targets, so an item is sampled in proportion to how
    often it is a training target; subtract log q from its logit (Yi et al., RecSys 2019).
    Movies that are never a training target get 0 (they never appear as in-batch negatives).
    """
    counts = np.bincount(split.targets("train"), minlength=len(split.item_ids))  # [N]
    return counts / counts.sum()


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def _visible_positions(split: Split, which: str) -> np.ndarray:
    """Boolean [R]: ratings that training may use when evaluating `which` (all users)."""
    within = np.arange(len(split.items)) - np.repeat(split.offsets[:-1], split.lengths)  # [R]
    return within < np.repeat(split.visible_len(which), split.lengths)


def popularity_counts(split: Split, which: str) -> np.ndarray:
    """Visible ratings per catalog movie [N] int64."""
    return np.bincount(split.item_columns[_visible_positions(split, which)], minlength=len(split.item_ids))


def transition_counts(split: Split, which: str) -> np.ndarray:
    """[N, N] int64: visible consecutive pairs (i -> j) within users' time-ordered sequences."""
    visible = _visible_positions(split, which)  # [R]
    same_user = np.ones(len(split.items), dtype=bool)
    same_user[split.offsets[1:-1]] = False  # position p pairs with p - 1 unless p starts a user
    pair = same_user[1:] & visible[1:]  # [R - 1]; visible[p] implies visible[p - 1] in one user
    counts = np.zeros((len(split.item_ids),) * 2, dtype=np.int64)
    np.add.at(counts, (split.item_columns[:-1][pair], split.item_columns[1:][pair]), 1)
    return counts


def baseline_scores(split: Split, which: str, name: str):
    """A function rows [u] (eval-user indices) -> scores [u, N] of baseline `name` for `which`."""
    popularity = popularity_counts(split, which).astype(np.float64)  # [N]
    if name == "popularity":
        return lambda rows: np.broadcast_to(popularity, (len(rows), len(popularity)))
    if name != "transition":
        raise ValueError(f"name must be one of {BASELINES}, got {name!r}")
    transitions = transition_counts(split, which)  # [N, N]
    users = split.eval_users()
    last = split.item_columns[split.offsets[users] + split.visible_len(which)[users] - 1]  # [U_eval]
    # One transition outweighs any popularity gap, so popularity only breaks transition ties.
    return lambda rows: transitions[last[rows]] * (popularity.max() + 1.0) + popularity  # [u, N]


def evaluate_baseline(split: Split, which: str, name: str) -> dict:
    """metrics.evaluate_scores of a baseline over all eval users (in chunks of EVAL_CHUNK)."""
    score = baseline_scores(split, which, name)
    exclude, target = split.exclude_mask(which), split.targets(which)  # [U_eval, N], [U_eval]
    ranks = [metrics.target_ranks(score(rows), target[rows], exclude[rows])
             for rows in np.array_split(np.arange(len(target)), max(1, -(-len(target) // EVAL_CHUNK)))]
    return metrics.metrics_from_ranks(np.concatenate(ranks))


def baseline_topk(split: Split, which: str, name: str, k: int = 10) -> np.ndarray:
    """Raw movie ids [U_eval, K] a baseline recommends to each eval user (history excluded)."""
    score = baseline_scores(split, which, name)
    exclude = split.exclude_mask(which)
    rows = np.arange(exclude.shape[0])
    top = np.concatenate([metrics.topk_columns(score(r), k, exclude[r])
                          for r in np.array_split(rows, max(1, -(-len(rows) // EVAL_CHUNK)))])
    return np.where(top == metrics.NOT_RANKED, PAD_ID, split.item_ids[top])


# ---------------------------------------------------------------------------------------------
# Top-k dumps and their independent check
# ---------------------------------------------------------------------------------------------


def dump_topk(path, user_ids, topk_items) -> None:
    """Writes CSV `user_id,item_1,...,item_K` (raw MovieLens ids) atomically: temp file, then os.replace."""
    user_ids, topk_items = np.asarray(user_ids), np.asarray(topk_items)
    if topk_items.ndim != 2 or user_ids.shape != topk_items.shape[:1]:
        raise ValueError(f"need user_ids [U] and topk_items [U, K], got {user_ids.shape}, {topk_items.shape}")
    _integer_ids(user_ids, "user_ids"), _integer_ids(topk_items, "topk_items")  # "1.0" is no movie id
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["user_id"] + [f"item_{j + 1}" for j in range(topk_items.shape[1])])
            for user, items in zip(user_ids.tolist(), topk_items.tolist()):
                writer.writerow([user] + items)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_dump(path, k: int) -> dict:
    """{user id: first k dumped movie ids} of a `dump_topk` CSV; bad rows name the file and line."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0] != "user_id":
        raise RatingsFileError(f"{path}:1: expected the header 'user_id,item_1,...', got {rows[:1]}")
    dumped, lines = {}, {}
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            user, *top = (int(x) for x in row[:k + 1])
        except ValueError:
            raise RatingsFileError(f"{path}:{number}: expected integer ids, got {row[:k + 1]}") from None
        if user in dumped:  # a second row would silently replace the first
            raise RatingsFileError(f"{path}:{number}: user {user} already has a row on line {lines[user]}")
        dumped[user], lines[user] = top, number
    return dumped


def recompute_from_dump(path, source=SOURCE_ML100K, cache=None, k: int = 10) -> dict:
    """HR@k and NDCG@k of a dump against test targets rebuilt from the raw ratings in plain Python.

    Independent of `leave_one_out` and phoenix_metrics.py (only the file reader is shared), as a judge's
    script would be. A movie rated twice by a user counts at its first rating (duplicates="first").
    Users missing from the dump count as misses. Also counts dumped items that are in the user's
    history (an unfiltered ranking) and rows with repeated items.
    """
    ratings = load_ratings(source, cache)
    by_user = {}
    for index, (user, item, stamp) in enumerate(zip(ratings.user.tolist(), ratings.item.tolist(),
                                                    ratings.timestamp.tolist())):
        by_user.setdefault(user, []).append((stamp, index, item))  # index: ties keep file order
    dumped = _read_dump(path, k)
    hits = gain = history_hits = repeated = missing = 0
    evaluated = 0
    for user, events in by_user.items():
        sequence, seen = [], set()
        for _, _, item in sorted(events):
            if item not in seen:
                sequence.append(item)
                seen.add(item)
        if len(sequence) < MIN_EVAL_RATINGS:
            continue
        evaluated += 1
        target, history = sequence[-1], set(sequence[:-1])
        if user not in dumped:
            missing += 1
            continue
        top = dumped[user]
        history_hits += sum(item in history and item != target for item in top)
        repeated += len(set(top)) != len(top)
        if target in top:
            hits += 1
            gain += 1.0 / np.log2(top.index(target) + 2)
    if not evaluated:
        raise ValueError(f"{ratings.source}: no user has >= {MIN_EVAL_RATINGS} ratings (MIN_EVAL_RATINGS); "
                         "nothing to evaluate")
    return {f"HR@{k}": hits / evaluated, f"NDCG@{k}": gain / evaluated, "num_users": evaluated,
            "missing_users": missing, "extra_users": len(set(dumped) - set(by_user)),
            "history_items_in_topk": history_hits, "rows_with_repeats": repeated}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _print_stats(ratings: Ratings, split: Split, history_len: int) -> None:
    lengths = split.lengths
    print(f"source   {ratings.source}")
    print(f"users {len(split.user_ids):,}  movies {len(split.item_ids):,}  ratings {len(ratings.user):,}  "
          f"density {len(ratings.user) / (len(split.user_ids) * len(split.item_ids)):.4f}  "
          f"authors (genre signatures) {len(np.unique(split.item_authors)):,}")
    stars, counts = np.unique(ratings.rating, return_counts=True)
    print("ratings  " + "  ".join(f"{s:g}: {c / counts.sum():.3f}" for s, c in zip(stars, counts)))
    print("ratings per user: min {} median {:g} p90 {:g} max {}".format(
        lengths.min(), np.median(lengths), np.percentile(lengths, 90), lengths.max()))
    owner = np.repeat(np.arange(len(lengths)), lengths)  # [R] user row of each position
    same_user = owner[1:] == owner[:-1]  # [R - 1]
    same_second = np.mean(np.diff(split.timestamps)[same_user] == 0)
    print(f"consecutive ratings of a user in the same second: {same_second:.3f} (stable sort keeps file order)")
    rows, positions = split.target_positions("train")
    truncated = np.mean(positions - split.offsets[rows] > history_len)
    print(f"examples: train {len(rows):,} (positions t >= 1 of training parts), val and test "
          f"{split.has_eval.sum():,} each; S={history_len} truncates {truncated:.2f} of training histories")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--download", action="store_true", help="fetch the ML-100K wheel into the cache")
    parser.add_argument("--data", default=SOURCE_ML100K, help=f"{SOURCE_ML100K!r} or a directory")
    parser.add_argument("--cache-dir", default=None,
                        help=f"download cache (default ${CACHE_ENV} or ~/.cache/phoenix)")
    parser.add_argument("--history-len", type=int, default=200, help="S for the example statistics")
    parser.add_argument("--duplicates", choices=DUPLICATE_RULES, default="error",
                        help="a repeated (user, movie) rating: reject it, or keep the first (leave_one_out)")
    parser.add_argument("--dump-topk", default=None, metavar="PATH",
                        help="write the transition baseline's test top-10 as CSV and re-check it")
    args = parser.parse_args(argv)
    if args.download:
        print(f"wheel: {ensure_wheel(args.cache_dir)}")
    start = time.perf_counter()
    ratings = load_ratings(args.data, args.cache_dir)
    split = leave_one_out(ratings, duplicates=args.duplicates)
    loaded = time.perf_counter()
    _print_stats(ratings, split, args.history_len)
    print(f"\n{'split':<5} {'baseline':<11} {'HR@10':>7} {'NDCG@10':>8} {'HR@50':>7} {'MRR':>7}")
    for which in ("val", "test"):
        for name in BASELINES:
            m = evaluate_baseline(split, which, name)
            print(f"{which:<5} {name:<11} {m['HR@10']:>7.4f} {m['NDCG@10']:>8.4f} {m['HR@50']:>7.4f} "
                  f"{m['MRR']:>7.4f}")
    if args.dump_topk:
        dump_topk(args.dump_topk, split.user_ids[split.eval_users()], baseline_topk(split, "test", "transition"))
        check = recompute_from_dump(args.dump_topk, args.data, args.cache_dir)
        print(f"\ndump {args.dump_topk}: recomputed HR@10 {check['HR@10']:.4f} NDCG@10 {check['NDCG@10']:.4f}, "
              f"history items in the dump {check['history_items_in_topk']}")
    print(f"\nload + split {loaded - start:.2f} s, total {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
