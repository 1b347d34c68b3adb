"""A run's directory and outputs: what a run may write, checked against what it reads, before it reads.

    inputs = [run_dir.Input("--data", "log.csv")]
    run_dir.check_outputs(inputs, ["runs/mine"], pipeline.RUN_ENTRIES, {"--dump-topk": "top10.csv"})
    run_dir.write_manifest("runs/mine", "pipeline", pipeline.RUN_ENTRIES, source="log.csv")  # run.json

Outputs never go over inputs. check_outputs refuses (OutputError, nothing read or written yet):
  - an output file (--dump-topk) that is an input (the same path, or a symlink or hard link to
    it), lies inside an input directory, is a directory or anything but a regular file, or lies
    where a run directory writes; one that exists is replaced only with --overwrite;
  - a run directory (--checkpoint-dir) that is an input or a file, lies inside an input data
    directory, or holds an input where the run writes (metrics.jsonl, ranker/, ...).
A cache directory (Input kind "cache": MovieLens downloads) is an input as itself and its files
only: run directories and dumps may go inside it (the default run directories do).

Ownership. At the paths a run writes (its entries: {name pattern: kind}), anything that Phoenix
did not write is refused whether or not --overwrite is given, every such entry listed
(ForeignFilesError); Phoenix's own entries of an earlier run are refused unless --overwrite
(FileExistsError). Other files in the run directory (notes.txt) are never touched. Phoenix's own:
  checkpoint   a directory a save wrote (phoenix_checkpoint's test, the one a save applies itself), or
               a sharded checkpoint (phoenix_sharded_checkpoint's: step checkpoints of sharded tables)
  checkpoints  a directory of such checkpoint directories (train+val/ranker, train+val/retrieval)
  steps        a directory of such directories of step checkpoints (steps/ranker/step-00000050)
  metrics      a metrics.jsonl whose first line is METRICS_HEADER; or, written before the header
               existed, one whose every line is a JSON object with a "stage"; or an empty file
  plot         a PNG carrying PLOT_SOURCE in its "Source" text chunk (or, written before that,
               matplotlib's "Software" chunk)
  manifest     a run.json with MANIFEST_FORMAT
  lock         the run lock phoenix_resume.RunLock writes (a pid)

The manifest (run.json, the first file a run writes, atomically): MANIFEST_FORMAT and version,
the kind of run, its entries, and what the caller records (the data source, seed, recipe); what a
later reader of the run directory starts from.
"""

import dataclasses
import datetime
import json
import os
import re
import stat
import tempfile
from typing import Mapping, Optional

import phoenix_checkpoint as checkpoint
import phoenix_sharded_checkpoint as sharded_checkpoint
from phoenix_resume import LOCK_FILE

__all__ = ["Input", "OutputError", "ForeignFilesError", "check_outputs", "check_checkpoint_target", "write_manifest",
           "update_manifest", "read_manifest", "entry_problem", "path_kind", "MANIFEST_FILE", "METRICS_HEADER"]

MANIFEST_FILE = "run.json"
MANIFEST_FORMAT = "phoenix-run"
MANIFEST_VERSION = 1
METRICS_HEADER = {"format": "phoenix-metrics", "format_version": 1}
PLOT_SOURCE = "phoenix_pipeline.plot_curves"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENTRY_KINDS = ("checkpoint", "checkpoints", "steps", "metrics", "plot", "manifest", "lock")
INPUT_KINDS = ("data", "cache")
STDIN = "-"
# Files read to tell Phoenix's own from a user's are small (a metrics log, a PNG, a lock); one
# larger than this is not one of ours.
MAX_OWNED_FILE_BYTES = 256 << 20


class OutputError(ValueError):
    """An output of a run that would go over an input, or where an output cannot be written; raised
    before anything is read or written."""


class ForeignFilesError(FileExistsError):
    """The paths a run writes hold something Phoenix did not write; the message lists every one."""


@dataclasses.dataclass(frozen=True)
class Input:
    """Something a run reads: `path` ("-" for standard input), named by `flag` in messages."""

    flag: str  # e.g. "--data"
    path: str
    kind: str = "data"  # INPUT_KINDS: "data" (nothing of a run goes at, in or over it) or "cache"

    def __post_init__(self):
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"Input.kind: expected one of {INPUT_KINDS}, got {self.kind!r}")

    def describe(self) -> str:
        return f"the input {self.flag} {'(standard input)' if self.path == STDIN else self.path}"


# --------------------------------------------------------------------------- paths


def _stat(path: str) -> Optional[os.stat_result]:
    """os.stat following links; None where nothing is there (or a link is dangling)."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _kind_of(st: os.stat_result) -> str:
    """What a stat names, in words."""
    mode = st.st_mode
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def path_kind(path) -> str:
    """What `path` is, in words ("a directory", "a FIFO", "a dangling symlink", "missing", ...)."""
    path = os.fspath(path)
    st = _stat(path)
    if st is None:
        return "a dangling symlink" if os.path.islink(path) else "missing"
    return _kind_of(st)


def _inside(path: str, directory: str) -> bool:
    """Whether real path `path` is `directory` or lies under it."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _nearest_existing(path: str) -> str:
    """`path` or its nearest ancestor that exists."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_creatable(flag: str, path: str, what: str) -> None:
    """The nearest existing ancestor of a path to be created is a writable directory."""
    ancestor = _nearest_existing(os.path.abspath(path))
    if ancestor == os.path.abspath(path):
        return
    st = _stat(ancestor)
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{flag} {path}: cannot create the {what}: {ancestor} is "
                          f"{'a dangling symlink' if st is None else _kind_of(st)}, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: cannot create the {what}: no write permission in {ancestor}")


class _Read:
    """One input, resolved: its real path and the (device, inode) of it and, for a directory,
    of the files directly in it (the data files a reader opens)."""

    def __init__(self, given: Input):
        self.input = given
        if given.path == STDIN:
            self.real, self.is_dir = None, False
            try:
                st = os.fstat(0)
                self.ids = {(st.st_dev, st.st_ino)}  # a file redirected to standard input
            except OSError:  # closed
                self.ids = set()
            return
        self.real = os.path.realpath(given.path)
        st = _stat(given.path)
        self.ids = set() if st is None else {(st.st_dev, st.st_ino)}
        self.is_dir = st is not None and stat.S_ISDIR(st.st_mode)
        if self.is_dir:
            try:
                for entry in os.scandir(given.path):
                    if entry.is_file():
                        child = entry.stat()
                        self.ids.add((child.st_dev, child.st_ino))
            except OSError:
                pass  # unreadable: the reader says so

    def is_at(self, path: str) -> bool:
        """Whether an output at `path` would be this input: the same real path, or the same file
        (a hard link; for a directory input, a link to one of its files)."""
        st = _stat(path)
        if st is not None and (st.st_dev, st.st_ino) in self.ids:
            return True
        return self.real is not None and os.path.realpath(path) == self.real

    def holds(self, path: str) -> bool:
        """Whether `path` lies inside this input (a data directory: nothing of a run goes there)."""
        return (self.is_dir and self.input.kind == "data" and self.real is not None
                and _inside(os.path.realpath(path), self.real))


def _walk_ids(path: str, limit: int = 10_000):
    """(device, inode) of `path` and of everything under it (at most `limit` entries)."""
    st = _stat(path)
    if st is None:
        return
    yield (st.st_dev, st.st_ino), path
    if not stat.S_ISDIR(st.st_mode):
        return
    seen = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            child = _stat(full)
            if child is not None:
                yield (child.st_dev, child.st_ino), full
            seen += 1
            if seen >= limit:
                return


# --------------------------------------------------------------------------- ownership


def _metrics_problem(path: str) -> Optional[str]:
    with open(path, "rb") as f:
        data = f.read(MAX_OWNED_FILE_BYTES + 1)
    if len(data) > MAX_OWNED_FILE_BYTES:
        return "is larger than any metrics log Phoenix writes"
    lines = [line for line in data.split(b"\n") if line.strip()]
    try:
        entries = [json.loads(line) for line in lines]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "is not a JSON-lines metrics log"
    if not entries or entries[0] == METRICS_HEADER:
        return None
    if all(isinstance(e, dict) and "stage" in e for e in entries):  # written before the header existed
        return None
    return f"its first line is not {json.dumps(METRICS_HEADER)}"


def _plot_problem(path: str) -> Optional[str]:
    with open(path, "rb") as f:
        data = f.read(1 << 16)  # matplotlib writes its text chunks before the image data
    if not data.startswith(PNG_SIGNATURE):
        return "is not a PNG"
    if b"tEXtSource\x00" + PLOT_SOURCE.encode() in data or b"tEXtSoftware\x00Matplotlib" in data:
        return None
    return "is a PNG that phoenix_pipeline.plot_curves did not write"


def _manifest_problem(path: str) -> Optional[str]:
    try:
        read_manifest(os.path.dirname(path), os.path.basename(path))
    except OutputError as error:
        return str(error).split(": ", 1)[-1]
    return None


def _lock_problem(path: str) -> Optional[str]:
    with open(path, "rb") as f:
        data = f.read(64)
    return None if re.fullmatch(rb"\d*", data.strip()) else "is not a Phoenix run lock (a pid)"


def _checkpoints_problem(path: str, depth: int) -> Optional[str]:
    """None if `path` is a directory of (`depth` - 1 levels of directories of) checkpoint
    directories, the leftovers of killed saves included; else why not."""
    if depth == 0:  # either format: a step checkpoint of sharded tables is a sharded one
        return _either_format_problem(path, complete=True)
    if os.path.islink(path) or not os.path.isdir(path):
        return "is not a directory"
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        leftover = re.fullmatch(r"\.(.+)\.(tmp|old|del)-.*", entry)  # of a killed save or prune
        if depth == 1 and entry == LOCK_FILE:  # phoenix_training.fit's run lock
            problem = entry_problem(full, "lock")
        elif depth == 1 and leftover:
            problem = _either_format_problem(full, complete=False)
        else:
            problem = _checkpoints_problem(full, depth - 1)
        if problem:
            return f"holds {entry}, which {problem}" if depth == 1 else f"{entry}/{problem}"
    return None


def _either_format_problem(path: str, complete: bool) -> Optional[str]:
    """None if `path` looks written by a save of a checkpoint, regular or sharded; else why not (as a
    regular checkpoint, unless it holds a sharded checkpoint's index.json)."""
    problem = checkpoint.why_not_ours(path, complete=complete)
    if problem is None:
        return None
    sharded = sharded_checkpoint.why_not_ours(path, complete=complete)
    if sharded is None:
        return None
    return sharded if os.path.lexists(os.path.join(path, sharded_checkpoint.INDEX_FILE)) else problem


def entry_problem(path, kind: str) -> Optional[str]:
    """None if the entry at `path` was written by Phoenix as an entry of `kind` (ENTRY_KINDS) or is
    absent; else why it is not ours."""
    if kind not in ENTRY_KINDS:
        raise ValueError(f"kind: expected one of {ENTRY_KINDS}, got {kind!r}")
    path = os.fspath(path)
    if not os.path.lexists(path):
        return None
    if kind in ("checkpoint", "checkpoints", "steps"):
        return _checkpoints_problem(path, {"checkpoint": 0, "checkpoints": 1, "steps": 2}[kind])
    if os.path.islink(path) or not os.path.isfile(path):
        return f"is {'a symlink' if os.path.islink(path) else path_kind(path)}, not a file Phoenix writes"
    try:
        return {"metrics": _metrics_problem, "plot": _plot_problem, "manifest": _manifest_problem,
                "lock": _lock_problem}[kind](path)
    except OSError as error:
        return f"cannot be read ({error.strerror})"


def run_entries(run_dir, entries: Mapping[str, str]) -> dict:
    """{name: kind} of the entries of `run_dir` that match a pattern of `entries` ({regex: kind}),
    in the order of the patterns, then by name."""
    try:
        names = sorted(os.listdir(run_dir))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found = {}
    for pattern, kind in entries.items():
        for name in names:
            if name not in found and re.fullmatch(pattern, name):
                found[name] = kind
    return found


# --------------------------------------------------------------------------- the check


def check_outputs(inputs, run_dirs, entries: Mapping[str, str], files: Optional[Mapping] = None,
                  overwrite: bool = False, earlier_run: bool = False) -> None:
    """Refuses, before anything is read or written, outputs that would go over an input or over
    what Phoenix did not write (module docstring).

    inputs: Input each. run_dirs: run directories (each named --checkpoint-dir in messages);
    entries: {name regex: ENTRY_KINDS kind} of what a run writes in its directory; files: {flag or
    label: path} of single output files (a None path is skipped); overwrite: an earlier run's
    entries and existing output files may be replaced; earlier_run: the run continues an earlier
    one in its directory (--resume): its entries are expected, never refused as an earlier run's.
    Raises OutputError, ForeignFilesError, FileExistsError or PermissionError.
    """
    reads = [_Read(i) for i in inputs]
    files = {flag: os.fspath(path) for flag, path in (files or {}).items() if path is not None}
    run_dirs = [os.fspath(d) for d in run_dirs]
    for run_dir in run_dirs:
        _check_run_dir_location(run_dir, reads, entries)
    for flag, path in files.items():
        _check_file_location(flag, path, reads, run_dirs, entries)
    reals = {}
    for flag, path in files.items():
        real = os.path.realpath(path)
        if real in reals:
            raise OutputError(f"{flag} {path}: is also {reals[real][0]} {reals[real][1]}; give each output its own "
                              "path")
        reals[real] = (flag, path)
    foreign, earlier = [], []
    for run_dir in run_dirs:
        for name, kind in run_entries(run_dir, entries).items():
            problem = entry_problem(os.path.join(run_dir, name), kind)
            if problem or kind != "lock":  # a lock alone is no earlier run's work
                (foreign if problem else earlier).append((run_dir, name, problem))
    if foreign:
        listed = "; ".join(f"{os.path.join(d, n)} ({p})" for d, n, p in foreign)
        raise ForeignFilesError(f"--checkpoint-dir {foreign[0][0]}: holds what Phoenix did not write, where this run "
                                f"writes: {listed}. Nothing was written: move them away, or choose another "
                                "--checkpoint-dir")
    if earlier and not overwrite and not earlier_run:
        by_dir = {}
        for d, n, _ in earlier:
            by_dir.setdefault(d, []).append(n)
        d, names = next(iter(by_dir.items()))
        raise FileExistsError(f"{d}: holds an earlier run ({', '.join(names)}); pass --resume (resume=True) to "
                              "continue it where it stopped, --overwrite (overwrite=True) to replace it, or choose "
                              "another --checkpoint-dir")
    for flag, path in files.items():
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{flag} {path}: exists; pass --overwrite to replace it, or choose another path")


def _refuse_inputs(flag: str, path: str, reads, hint: str = "") -> None:
    """OutputError if `path` is an input of the run or lies inside one."""
    for read in reads:
        if read.is_at(path):
            raise OutputError(f"{flag} {path}: is {read.input.describe()}; a run writes nothing over its inputs")
        if read.holds(path):
            raise OutputError(f"{flag} {path}: lies inside {read.input.describe()}; a run writes nothing among "
                              f"its inputs{hint}")


def _check_run_dir_location(run_dir: str, reads, entries) -> None:
    flag = "--checkpoint-dir"
    if not run_dir:
        raise OutputError(f"{flag}: expected a directory, got an empty path")
    _refuse_inputs(flag, run_dir, reads, ", choose a run directory outside it")
    st = _stat(run_dir)
    if st is None:
        if os.path.islink(run_dir):
            raise OutputError(f"{flag} {run_dir}: is a dangling symlink")
        _check_creatable(flag, run_dir, "run directory")
        return
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{flag} {run_dir}: is {_kind_of(st)}, not a directory")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {run_dir}: no write permission")
    real = os.path.realpath(run_dir)
    for name in run_entries(run_dir, entries):
        target = os.path.join(real, name)
        for read in reads:
            if read.real is not None and _inside(read.real, target):
                raise OutputError(f"{flag} {run_dir}: the run writes {name} there, which holds "
                                  f"{read.input.describe()}")
            for ids, found in _walk_ids(target):
                if ids in read.ids:
                    raise OutputError(f"{flag} {run_dir}: the run writes {name} there, and {found} is "
                                      f"{read.input.describe()} (a link to it)")


def _check_file_location(flag: str, path: str, reads, run_dirs, entries) -> None:
    if not path:
        raise OutputError(f"{flag}: expected a file path, got an empty path")
    _refuse_inputs(flag, path, reads)
    st = _stat(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{flag} {path}: is {_kind_of(st)}; expected a file path (the file is written there)")
    if st is None and os.path.islink(path):
        raise OutputError(f"{flag} {path}: is a dangling symlink")
    real = os.path.realpath(path)
    for run_dir in run_dirs:
        run_real = os.path.realpath(run_dir)
        if not _inside(real, run_real):
            continue
        if real == run_real:
            raise OutputError(f"{flag} {path}: is the run directory --checkpoint-dir {run_dir}")
        name = os.path.relpath(real, run_real).split(os.sep)[0]
        if any(re.fullmatch(pattern, name) for pattern in entries):
            raise OutputError(f"{flag} {path}: is where the run writes its {name} (--checkpoint-dir {run_dir}); "
                              "choose another path")
    _check_creatable(flag, path, "file")


def check_checkpoint_target(flag: str, path) -> None:
    """Refuses (checkpoint.CheckpointError), before training, a checkpoint path that a save would
    refuse after it: a file, a directory holding anything but a Phoenix checkpoint."""
    path = os.fspath(path)
    problem = checkpoint.why_not_ours(os.path.realpath(path))
    if problem:
        raise checkpoint.CheckpointError(f"{flag} {path}: {problem}; a save would refuse to replace it, so nothing "
                                         "was trained: choose another path, or remove it yourself")
    _check_creatable(flag, path, "checkpoint directory")


# --------------------------------------------------------------------------- the manifest


def _json_default(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def write_manifest(run_dir, kind: str, entries: Mapping[str, str], **info) -> str:
    """Writes run.json into `run_dir` (created if missing) atomically: MANIFEST_FORMAT, version, the
    kind of run ("pipeline", "synthetic"), its entries {name regex: kind}, when it started, and
    `info` (JSON; other values as strings). Returns its path."""
    os.makedirs(run_dir, exist_ok=True)
    manifest = {**{"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "kind": kind},
                "entries": dict(entries),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **info}
    return _write_json_atomically(os.path.join(os.fspath(run_dir), MANIFEST_FILE), manifest)


def update_manifest(run_dir, **info) -> str:
    """Rewrites run.json of `run_dir` (which must hold one: read_manifest) with `info`'s keys set,
    atomically, everything else kept (a resumable run records there what it has finished)."""
    manifest = read_manifest(run_dir)
    manifest.update(info)
    return _write_json_atomically(os.path.join(os.fspath(run_dir), MANIFEST_FILE), manifest)


def _write_json_atomically(path: str, value: dict) -> str:
    text = json.dumps(value, indent=1, default=_json_default) + "\n"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_manifest(run_dir, name: str = MANIFEST_FILE) -> dict:
    """The manifest of `run_dir`; OutputError naming the file if it is missing or not ours."""
    path = os.path.join(os.fspath(run_dir), name)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read(MAX_OWNED_FILE_BYTES))
    except FileNotFoundError:
        raise OutputError(f"{path}: no run manifest (not a Phoenix run directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OutputError(f"{path}: not a Phoenix run manifest (not JSON: {error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise OutputError(f"{path}: not a Phoenix run manifest (no \"format\": {json.dumps(MANIFEST_FORMAT)})")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise OutputError(f"{path}: run manifest version {manifest.get('format_version')!r}, this Phoenix reads "
                          f"{MANIFEST_VERSION}")
    return manifest
