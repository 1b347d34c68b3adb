"""Rows of an examples dict ({name: array with examples along axis 0}) and the batches they are fed in.

Evaluation and serving score many examples in calls of a fixed batch size: `chunks` covers the
examples in pieces, `padded_chunks` pads the last piece so that every call has one shape (one
compilation), and `take` picks the rows of one piece from every array of the dict. Training
streams generate their batches ahead in a background thread (`prefetch`).

Shape glossary
  E  examples (rows of an examples dict)
"""

import queue
import threading

import numpy as np

__all__ = ["take", "chunks", "padded_chunks", "prefetch"]


def take(examples: dict, rows) -> dict:
    """The rows [E'] of every array of an examples dict."""
    return {k: v[rows] for k, v in examples.items()}


def chunks(num: int, size: int):
    """Slices covering range(num) in pieces of `size` (the last may be shorter)."""
    for start in range(0, num, size):
        yield slice(start, min(start + size, num))


def padded_chunks(num_rows: int, size: int):
    """(rows [size] padded by repeating the last row, number of real rows) covering 0..num_rows-1."""
    for start in range(0, num_rows, size):
        rows = np.arange(start, min(start + size, num_rows))
        yield np.concatenate([rows, np.full(size - len(rows), rows[-1])]), len(rows)


def prefetch(iterator, size: int = 2):
    """Yields the items of `iterator`, produced `size` ahead in a background thread, so that NumPy
    batch generation overlaps the device step. The thread stops when this generator is closed."""
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    end = object()

    def work():
        for item in iterator:
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if stop.is_set():
                return
        items.put(end)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := items.get()) is not end:
            yield item
    finally:
        stop.set()
