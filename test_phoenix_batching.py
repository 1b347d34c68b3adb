"""Tests of phoenix_batching.py: rows of an examples dict, chunks that cover them, and prefetching."""

import threading

import numpy as np
import pytest

from phoenix_batching import chunks, padded_chunks, prefetch, take


@pytest.mark.parametrize("num, size", [(0, 3), (1, 3), (6, 3), (7, 3), (2, 5)],
                         ids=["empty", "one", "exact", "ragged", "size>num"])
def test_chunks_cover_every_row_once_in_order(num, size):
    pieces = list(chunks(num, size))
    assert [i for piece in pieces for i in range(num)[piece]] == list(range(num))
    assert all(piece.stop - piece.start <= size for piece in pieces)


@pytest.mark.parametrize("num, size", [(1, 3), (6, 3), (7, 3)], ids=["one", "exact", "ragged"])
def test_padded_chunks_have_one_shape_and_repeat_the_last_row(num, size):
    pieces = list(padded_chunks(num, size))
    assert all(len(rows) == size for rows, _ in pieces)  # every call compiles to one shape
    assert np.concatenate([rows[:real] for rows, real in pieces]).tolist() == list(range(num))
    rows, real = pieces[-1]
    assert (rows[real:] == num - 1).all()


def test_take_picks_the_same_rows_of_every_array():
    examples = {"a": np.arange(5), "b": np.arange(10).reshape(5, 2)}
    picked = take(examples, np.array([4, 0]))
    np.testing.assert_array_equal(picked["a"], [4, 0])
    np.testing.assert_array_equal(picked["b"], [[8, 9], [0, 1]])


def test_prefetch_keeps_order_and_stops_its_thread():
    assert list(prefetch(iter(range(10)))) == list(range(10))
    before = threading.active_count()
    endless = prefetch(iter(lambda: 1, None))
    assert [next(endless) for _ in range(5)] == [1] * 5
    endless.close()
    for _ in range(50):
        if threading.active_count() <= before:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() <= before



def test_a_stages_stream_starts_with_its_first_batch_and_resumes_from_any_step():
    """phoenix_two_stage.resumable_stream: step 0 is `first` then `rest`, a later step `make(step)`;
    `batches.first` is the first batch without starting the stream."""
    import phoenix_two_stage as two_stage

    def stream(skip=0):
        yield from range(skip, 10)

    rest = stream()
    first = next(rest)
    batches = two_stage.resumable_stream(first, rest, stream)
    assert batches.first == first
    assert list(batches(0)) == list(range(10))
    assert list(batches(4)) == list(range(4, 10))
