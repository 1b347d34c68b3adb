"""phoenix_log.py: every format a log comes in reads to the same Log as its plain CSV; dates and times
to exact nanoseconds; pandas / Arrow / NumPy columns in from_arrays; bad input names its line.

BASE: a small log with string users, integer items, integer timestamps, a rating, an action column
and an author per item (every converter runs). Equivalence is exact (np.testing.assert_array_equal):
the same log in another container must give bit-identical arrays and the same id names.
"""

import bz2
import copy
import gzip
import io
import lzma
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as parquet
import pytest

import phoenix_log as logs
import run_train
from phoenix_inputs import ACTIONS

FIELDS = ("user", "item", "timestamp", "actions", "author", "rating")
ROWS = [("alice", 12, 1714564800, 4, 0, "a1"), ("bob", 7, 1714564801, 2, 1, "a2"), ("alice", 7, 1714564805, 5, 0, "a2"),
        ("carol", 3, 1714564810, 1, 0, "a1"), ("bob", 12, 1714564812, 3, 1, "a1"), ("carol", 9, 1714564820, 5, 0, "a3")]
COLUMNS = ("user_id", "item_id", "timestamp", "rating", "share_score", "author_id")


def csv_text(delimiter=",", rows=ROWS) -> str:
    return "".join(delimiter.join(map(str, row)) + "\n" for row in [COLUMNS, *rows])


def write(path: Path, data) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def assert_same_log(got: logs.Log, expected: logs.Log):
    for field in FIELDS:
        a, b = getattr(got, field), getattr(expected, field)
        assert a.dtype == b.dtype, field
        np.testing.assert_array_equal(a, b, err_msg=field)
    assert got.names == expected.names and got.datetimes == expected.datetimes


def frame() -> pd.DataFrame:
    return pd.DataFrame(ROWS, columns=COLUMNS)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> logs.Log:
    return logs.read_log(write(tmp_path_factory.mktemp("base") / "log.csv", csv_text()))


def test_the_base_log_is_what_it_says(base):
    assert base.tokens("user", base.user) == [row[0] for row in ROWS] and base.item.tolist() == [r[1] for r in ROWS]
    assert base.timestamp.dtype == np.int64 and not base.datetimes and base.line is None  # lines are row + 2
    assert [base.at(r) for r in range(6)] == [f"{base.source}:{line}" for line in range(2, 8)]
    assert base.actions[:, ACTIONS.index("share_score")].tolist() == [r[4] == 1 for r in ROWS]


# --------------------------------------------------------------------------- formats and compressions


def table() -> pa.Table:
    return pa.Table.from_pandas(frame(), preserve_index=False)


def parquet_bytes(t: pa.Table) -> bytes:
    sink = io.BytesIO()
    parquet.write_table(t, sink)
    return sink.getvalue()


def feather_bytes(t: pa.Table) -> bytes:
    sink = io.BytesIO()
    feather.write_feather(t, sink)
    return sink.getvalue()


def ipc_stream_bytes(t: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as writer:
        writer.write_table(t)
    return sink.getvalue().to_pybytes()


def zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


FORMATS = [  # (id, file name, bytes): each named misleadingly where the content is not what the name says
    ("csv", "log.csv", lambda: csv_text().encode()),
    ("tsv_by_name", "log.tsv", lambda: csv_text("\t").encode()),
    ("tsv_gz_by_name", "log.tsv.gz", lambda: gzip.compress(csv_text("\t").encode())),
    ("tsv_sniffed", "log.txt", lambda: csv_text("\t").encode()),
    ("semicolons_sniffed", "export", lambda: csv_text(";").encode()),
    ("gzip", "log.csv.gz", lambda: gzip.compress(csv_text().encode())),
    ("gzip_named_csv", "log.csv", lambda: gzip.compress(csv_text().encode())),
    ("gzip_two_members", "log.gz", lambda: gzip.compress(csv_text()[:60].encode()) + gzip.compress(
        csv_text()[60:].encode())),
    ("zstd", "log.csv.zst", lambda: zstd(csv_text().encode())),
    ("bz2", "log.csv.bz2", lambda: bz2.compress(csv_text().encode())),
    ("xz", "log.csv.xz", lambda: lzma.compress(csv_text().encode())),
    ("bom_crlf", "log.csv", lambda: b"\xef\xbb\xbf" + csv_text().replace("\n", "\r\n").encode()),
    ("parquet", "log.parquet", lambda: parquet_bytes(table())),
    ("parquet_named_csv", "log.csv", lambda: parquet_bytes(table())),
    ("parquet_gzip", "log.parquet.gz", lambda: gzip.compress(parquet_bytes(table()))),
    ("feather", "log.feather", lambda: feather_bytes(table())),
    ("arrow_stream", "log.arrows", lambda: ipc_stream_bytes(table())),
]


@pytest.mark.parametrize("name, data", [c[1:] for c in FORMATS], ids=[c[0] for c in FORMATS])
def test_every_format_reads_to_the_csv_log(tmp_path, base, name, data):
    assert_same_log(logs.read_log(write(tmp_path / name, data())), base)


def test_a_pipe_and_standard_input_read_every_format(tmp_path, base, monkeypatch):
    for data in (gzip.compress(csv_text().encode()), parquet_bytes(table())):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda: fifo.write_bytes(data), daemon=True)
        writer.start()
        assert_same_log(logs.read_log(fifo), base)
        writer.join()
        fifo.unlink()
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        from_stdin = logs.read_log("-")
        assert_same_log(from_stdin, base)
        assert from_stdin.source == "<stdin>"


def test_an_explicit_delimiter_wins(tmp_path, base):
    path = write(tmp_path / "log.tsv", csv_text("|"))  # a .tsv name, but "|" separates the fields
    assert_same_log(logs.read_log(path, delimiter="|"), base)
    with pytest.raises(logs.LogError, match=r"log.tsv:1: missing column 'user_id'"):
        logs.read_log(path, delimiter="\t")
    with pytest.raises(ValueError, match=r"delimiter: expected one ASCII character"):
        logs.read_log(path, delimiter="||")


def test_rows_that_are_not_lines_keep_their_lines(tmp_path, base):
    """Blank lines, whitespace-only lines and a quoted field with newlines: the same log, each row
    with the line it starts on (the csv module's rescan, against Arrow's rows)."""
    lines = csv_text().splitlines()
    text = "\n".join([lines[0], "", lines[1], "   ", lines[2], "", "", lines[3], lines[4], lines[5], lines[6]]) + "\n\n"
    text = text.replace("bob,7,1714564801,2,1,a2", 'bob,7,1714564801,2,1,"a2"')  # a quoted (plain) field
    log = logs.read_log(write(tmp_path / "log.csv", text))
    assert_same_log(log, base)
    assert log.line.tolist() == [3, 5, 8, 9, 10, 11]
    note = csv_text().replace(",a1\n", ',a1\n', 1).splitlines()
    note[0] += ",note"
    note[1:] = [row + ',"x"' for row in note[1:]]
    note[2] = note[2][:-3] + '"two\nlines, and ""quotes"""'
    log = logs.read_log(write(tmp_path / "note.csv", "\n".join(note) + "\n"))
    assert_same_log(log, base)
    assert log.line.tolist() == [2, 3, 5, 6, 7, 8]


# --------------------------------------------------------------------------- times


INSTANTS = [  # (text, the same instant as int64 ns since the epoch, UTC), one of each form
    ("2024-05-01T12:00:00Z", 1714564800 * 10**9),
    ("2024-05-01T14:00:00+02:00", 1714564800 * 10**9),
    ("2024-05-01T07:30:00-0430", 1714564800 * 10**9),
    ("2024-05-01T12:00:00.123456789Z", 1714564800 * 10**9 + 123456789),
    ("2024-05-01T12:00:00.5+00:00", 1714564800 * 10**9 + 500_000_000),
    ("2024-05-01t12:00:00z", 1714564800 * 10**9),  # RFC 3339 allows lower case
    ("2024-05-01 12:00:00 UTC", 1714564800 * 10**9),  # BigQuery's CSV exports
]
NAIVE = [("2024-05-01 12:00:00", 1714564800 * 10**9), ("2024-05-01t12:00:00", 1714564800 * 10**9),
         ("2024-05-01", 1714521600 * 10**9), ("2024-05-01T12:00", 1714564800 * 10**9),
         ("1969-12-31T23:59:59.999", -10**6), ("2024-05-01 12:00:00.25", 1714564800 * 10**9 + 250 * 10**6)]


def times_log(tmp_path, texts, name="t.csv"):
    rows = "".join(f"u{r % 2},{r},{t}\n" for r, t in enumerate(texts))
    return logs.read_log(write(tmp_path / name, "user_id,item_id,timestamp\n" + rows))


@pytest.mark.parametrize("cases", [INSTANTS, NAIVE], ids=["zoned", "naive"])
def test_iso_8601_times_are_exact_nanoseconds(tmp_path, cases):
    log = times_log(tmp_path, [text for text, _ in cases])
    assert log.datetimes and log.timestamp.dtype == np.int64
    assert log.timestamp.tolist() == [ns for _, ns in cases]  # exact integers, no tolerance
    assert [logs.parse_time(text) for text, _ in cases] == [ns for _, ns in cases]
    integers = times_log(tmp_path, [ns for _, ns in cases], "i.csv")
    np.testing.assert_array_equal(integers.timestamp, log.timestamp)


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("tz", [None, "UTC", "Europe/Paris"])
def test_parquet_timestamp_columns_are_utc_nanoseconds(tmp_path, base, unit, tz):
    t = table().set_column(2, "timestamp", pa.array(base.timestamp, pa.timestamp("s")).cast(pa.timestamp(unit))
                           .cast(pa.timestamp(unit, tz)) if tz else
                           pa.array(base.timestamp, pa.timestamp("s")).cast(pa.timestamp(unit)))
    log = logs.read_log(write(tmp_path / "log.parquet", parquet_bytes(t)))
    assert log.datetimes and log.timestamp.tolist() == (base.timestamp * 10**9).tolist()  # stored as UTC instants
    assert_same_log(log, logs.from_arrays(t))


def test_date_columns_are_midnight_utc(tmp_path):
    days = pa.array([19844, 19845, 19846], pa.date32())
    log = logs.from_arrays({"user_id": [1, 2, 1], "item_id": [1, 2, 3], "timestamp": days})
    assert log.timestamp.tolist() == [logs.parse_time(d) for d in ("2024-05-01", "2024-05-02", "2024-05-03")]


def test_integer_times_stay_exact_and_decimals_keep_their_guarantee(tmp_path):
    big = 2**60 + 1
    log = times_log(tmp_path, [f"{big}.0", f"+{big + 1}", str(big + 2)])  # never through float64
    assert not log.datetimes and log.timestamp.tolist() == [big, big + 1, big + 2]
    assert times_log(tmp_path, ["1.5", "1.50", "2.25"]).timestamp.tolist() == [1.5, 1.5, 2.25]  # one number, 2 texts
    with pytest.raises(logs.LogError, match=r"t.csv:4: column 'timestamp': '0.30000000000000001' and "
                                            r"'0.3' \(at .*t.csv:2\) are different numbers"):
        times_log(tmp_path, ["0.3", "1", "0.30000000000000001"])


def test_cut_time_takes_an_iso_time_for_a_time_column(tmp_path):
    cut = run_train.cut_time_value("2024-05-01T12:00:00+02:00")
    assert cut == logs.parse_time("2024-05-01T10:00:00Z") and str(cut) == "2024-05-01T12:00:00+02:00"
    assert run_train.cut_time_value("17") == 17 and type(run_train.cut_time_value("17")) is int
    log = times_log(tmp_path, ["1", "2"])
    with pytest.raises(logs.LogError, match=r"--cut-time 2024-05-01T12:00:00\+02:00: .*t.csv's time column holds "
                                            r"numbers"):
        run_train.log_cut_time(cut, log)
    assert run_train.log_cut_time(cut, times_log(tmp_path, ["2024-05-01", "2024-05-02"])) == cut
    with pytest.raises(run_train.argparse.ArgumentTypeError, match="expected a number .* or an ISO-8601"):
        run_train.cut_time_value("yesterday")
    command = run_train.parse_args(["--data", "log.csv", "--split", "time", "--cut-time", "2024-05-01"])
    assert command.source.cut_time == logs.parse_time("2024-05-01") and copy.deepcopy(command).source.cut_time.text == (
        "2024-05-01")


# --------------------------------------------------------------------------- from_arrays


def numpy_columns() -> dict:
    return {"user_id": np.array([r[0] for r in ROWS]), "item_id": np.array([r[1] for r in ROWS]),
            "timestamp": np.array([r[2] for r in ROWS]), "rating": np.array([r[3] for r in ROWS], np.float64),
            "share_score": np.array([r[4] for r in ROWS]), "author_id": np.array([r[5] for r in ROWS])}


ARRAY_INPUTS = [
    ("numpy", numpy_columns),
    ("lists", lambda: {name: column.tolist() for name, column in numpy_columns().items()}),
    ("dataframe", frame),
    ("series", lambda: {name: frame()[name] for name in COLUMNS}),
    ("arrow_table", table),
    ("arrow_arrays", lambda: {name: table().column(name).combine_chunks() for name in COLUMNS}),
    ("chunked", lambda: {name: pa.chunked_array([table().column(name)[:2], table().column(name)[2:]])
                         for name in COLUMNS}),
    ("categorical_strings", lambda: frame().astype({"user_id": "category", "author_id": "string",
                                                    "item_id": "Int64"})),
    ("dictionary", lambda: table().set_column(0, "user_id", table().column("user_id").dictionary_encode())),
]


@pytest.mark.parametrize("make", [c[1] for c in ARRAY_INPUTS], ids=[c[0] for c in ARRAY_INPUTS])
def test_from_arrays_takes_numpy_pandas_and_arrow(base, make):
    assert_same_log(logs.from_arrays(make()), base)


def test_pandas_and_numpy_datetimes_are_utc_nanoseconds():
    stamps = pd.Series(pd.to_datetime(["2024-05-01 12:00:00", "2024-05-01 12:00:01.5", "2024-05-02"], format="ISO8601"))
    columns = {"user_id": [1, 2, 1], "item_id": [1, 2, 3]}
    naive = logs.from_arrays({**columns, "timestamp": stamps})
    expected = [logs.parse_time(t) for t in ("2024-05-01T12:00:00Z", "2024-05-01T12:00:01.5Z", "2024-05-02")]
    assert naive.datetimes and naive.timestamp.tolist() == expected
    paris = logs.from_arrays({**columns, "timestamp": stamps.dt.tz_localize("Europe/Paris")})
    assert paris.timestamp.tolist() == [t - 2 * 3600 * 10**9 for t in expected]  # CEST is UTC+2
    as_numpy = logs.from_arrays({**columns, "timestamp": stamps.to_numpy()})
    assert as_numpy.timestamp.tolist() == expected


NULLS = [
    ("nan_series", lambda: {"timestamp": pd.Series([1.0, np.nan, 3.0])}, r"<arrays> row 1: column 'timestamp': .*got a "
     r"missing value"),
    ("none_ids", lambda: {"user_id": np.array(["a", None, "c"], object)}, r"row 1: column 'user_id': expected an id, "
     r"got a missing value"),
    ("pandas_na", lambda: {"item_id": pd.Series([1, pd.NA, 3], dtype="Int64")}, r"row 1: column 'item_id'"),
    ("nat", lambda: {"timestamp": pd.Series(pd.to_datetime(["2024-05-01", None, "2024-05-02"]))},
     r"row 1: column 'timestamp'"),
    ("arrow_null", lambda: {"rating": pa.array([1.0, 2.0, None])}, r"row 2: column 'rating': expected a finite number, "
     r"got a missing value"),
]


@pytest.mark.parametrize("change, message", [c[1:] for c in NULLS], ids=[c[0] for c in NULLS])
def test_nulls_are_refused_naming_row_and_column(change, message):
    data = {"user_id": ["a", "b", "c"], "item_id": [1, 2, 3], "timestamp": [1, 2, 3], **change()}
    with pytest.raises(logs.LogError, match=message):
        logs.from_arrays(data)


def test_a_null_in_parquet_names_the_file_row_and_column(tmp_path):
    t = table().set_column(1, "item_id", pa.array([12, 7, None, 3, 12, 9], pa.int64()))
    with pytest.raises(logs.LogError, match=r"log.parquet row 2: column 'item_id': expected an id, got a missing"):
        logs.read_log(write(tmp_path / "log.parquet", parquet_bytes(t)))


def test_mixed_types_in_one_column_are_refused():
    with pytest.raises(TypeError, match=r"column 'user_id': expected one type of values"):
        logs.from_arrays({"user_id": pd.Series(["a", 1, 2.5], dtype=object), "item_id": [1, 2, 3],
                          "timestamp": [1, 2, 3]})


# --------------------------------------------------------------------------- bad input: the right line


HEADER = "user_id,item_id,timestamp\n"
BAD = [
    ("after_blank_lines", HEADER + "u1,1,1\n\n\n  \nu2,2,2\nu2,x y,oops\n",
     r"log.csv:7: column 'timestamp': expected a number \(e\.g\. Unix seconds\), got 'oops'"),
    ("after_quoted_newlines", HEADER + 'u1,1,1\n"u\n2",2,2\nu3,3,3.5.1\n',
     r"log.csv:5: column 'timestamp': expected a number .*got '3.5.1'"),
    ("short_row", HEADER + "u1,1,1\n\nu2,2\n", r"log.csv:4: expected 3 fields separated by ',' \(as the header\), "
     r"got 2"),
    ("long_row_gzip", HEADER + "u1,1,1\nu2,2,2,9\n", r"log.csv.gz:3: expected 3 fields .*got 4"),
    ("bad_utf8", HEADER + "u1,1,1\nu2,2,2\nu\xff3,3,3\n", r"log.csv:4: not valid UTF-8 \(byte 0xff\)"),
    ("bad_quote", HEADER + 'u1,1,1\nu2,2,"2"x\n', r"log.csv:3: "),
    ("mixed_zones", HEADER + "u1,1,2024-05-01T12:00:00Z\nu2,2,2024-05-01T13:00:00Z\n\nu1,3,2024-05-01 14:00:00\n",
     r"log.csv:5: column 'timestamp': '2024-05-01 14:00:00' and '2024-05-01T12:00:00Z' \(at .*log.csv:2\) mix zoned "
     r"and naive times"),
    ("naive_then_zoned", HEADER + "u1,1,2024-05-01\nu2,2,2024-05-02T00:00:00+01:00\n", r"log.csv:3: .*mix zoned and "
     r"naive"),
    ("bad_date", HEADER + "u1,1,2024-05-01\nu2,2,2024-02-30\n", r"log.csv:3: column 'timestamp': expected an ISO-8601 "
     r"date/time like '2024-05-01' .*got '2024-02-30'"),
    ("neither", HEADER + "u1,1,yesterday\nu2,2,today\n", r"log.csv:2: column 'timestamp': expected a number \(e\.g\. "
     r"Unix seconds\) or an ISO-8601 date/time .*got 'yesterday'"),
    ("empty_field_row", HEADER + "u1,1,1\n,,\n", r"log.csv:3: column 'user_id': expected an id, got an empty field"),
    ("open_quote", HEADER + 'u1,1,1\nu2,2,"2\nu3,3,3\n', r"log.csv:3: column 'timestamp': expected a number .*got "
     r"'2\\nu3,3,3' \(a field over several lines: is a quote left open\?\)"),
    ("bad_flag", "user_id,item_id,timestamp,favorite_score\nu1,1,1,1\n\nu2,2,2,yes\n",
     r"log.csv:4: column 'favorite_score': expected 0 or 1, got 'yes'"),
]


@pytest.mark.parametrize("text, message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_names_its_line(tmp_path, text, message):
    name = "log.csv.gz" if "gzip" in message or ".gz" in message else "log.csv"
    data = text.encode("latin-1")
    with pytest.raises(logs.LogError, match=message):
        logs.read_log(write(tmp_path / name, gzip.compress(data) if name.endswith(".gz") else data))


def test_integer_id_detection_is_unchanged(tmp_path):
    log = logs.read_log(write(tmp_path / "log.csv", HEADER + "012,-3, 5\n12,4,6\n"))
    assert log.tokens("user", log.user) == ["012", "12"] and log.tokens("item", log.item) == ["-3", "4"]
    assert log.timestamp.tolist() == [5, 6]
    spaced = logs.read_log(write(tmp_path / "spaced.csv", HEADER + " 12 ,4,5\n13,3 ,6\n"))
    assert spaced.names == {} and spaced.user.tolist() == [12, 13] and spaced.item.tolist() == [4, 3]


def test_each_distinct_string_is_hashed_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(logs, "string_id", lambda token: calls.append(token) or len(calls))
    logs.read_log(write(tmp_path / "log.csv", HEADER + "".join(f"u{r % 3},i{r % 4},{r}\n" for r in range(40))))
    assert sorted(calls) == sorted([f"u{k}" for k in range(3)] + [f"i{k}" for k in range(4)])



@pytest.mark.parametrize("kind", ["numpy", "arrow"])
def test_from_arrays_never_shares_the_callers_memory(kind):
    columns = {"user_id": np.array([1, 2, 1]), "item_id": np.array([5, 6, 7]), "timestamp": np.array([1, 2, 3])}
    data = columns if kind == "numpy" else {name: pa.array(x) for name, x in columns.items()}
    log = logs.from_arrays(data)
    for x in columns.values():
        x[:] = 99  # the caller reuses its buffers (Arrow arrays from NumPy share them)
    assert log.user.tolist() == [1, 2, 1] and log.item.tolist() == [5, 6, 7] and log.timestamp.tolist() == [1, 2, 3]


def test_reading_a_file_never_imports_pandas(tmp_path):
    """pandas is a test dependency only; pyarrow imports it lazily from some calls (pa.array, to_numpy),
    which the readers avoid."""
    csv_path = write(tmp_path / "log.csv.gz", gzip.compress(csv_text().encode()))
    parquet_path = write(tmp_path / "log.parquet", parquet_bytes(table()))
    code = (f"import sys, phoenix_log; phoenix_log.read_log({str(csv_path)!r}); "
            f"phoenix_log.read_log({str(parquet_path)!r}); "
            "print(sorted(m for m in sys.modules if m.startswith('pandas')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


LINE_TEXTS = {  # texts whose rows are not their lines, without quotes
    "blank_lines": "a,b,c\n\n1,2,3\n  \n4,5,6\n\n\n7,8,9\n",
    "crlf_no_final_newline": "a,b,c\r\n1,2,3\r\n\r\n \t \r\n4,5,6",
    "trailing_whitespace_line": "a,b,c\n1,2,3\n\n4,5,6\n   ",
    "tab_row": "a\tb\tc\n1\t2\t3\n\t\t\n4\t5\t6\n",  # a row of empty fields, not a blank line: NumPy declines
}


@pytest.mark.parametrize("block_bytes", [3, 7, 1 << 22])
@pytest.mark.parametrize("name", list(LINE_TEXTS))
def test_the_numpy_line_finder_equals_the_csv_modules(tmp_path, name, block_bytes):
    text = LINE_TEXTS[name]
    delimiter = "\t" if "\t" in text.splitlines()[0] else ","
    inp = logs._Input(write(tmp_path / "x.csv", text))
    reference = np.fromiter(logs._rows(inp, delimiter, 3), np.int64)
    fast = logs._unquoted_row_lines(inp, len(reference), block_bytes)
    if name == "tab_row":
        assert fast is None and reference.tolist() == [2, 3, 4]
    else:
        assert fast is not None and fast.tolist() == reference.tolist()
    assert logs._unquoted_row_lines(logs._Input(write(tmp_path / "q.csv", 'a,b,c\n"1",2,3\n\n4,5,6\n')), 2) is None


def test_text_that_starts_like_a_magic_number_is_text(tmp_path):
    path = write(tmp_path / "log.csv", "BZh9,item_id,timestamp\nu1,1,1\nu2,2,2\n")  # bzip2's first 4 bytes
    assert logs.read_log(path, logs.Columns(user="BZh9")).tokens("user", [logs.string_id("u2")]) == ["u2"]
