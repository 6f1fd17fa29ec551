"""Read the next step's batch in a background thread while the current step computes.

Reading windows is numpy slicing of memory-mapped Arrow shards or zstd decoding of Zarr
chunks, both of which release the GIL, so one thread hides the read behind the step.
The order of items is the iterator's, so prefetching never changes what a step sees.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class prefetch:  # noqa: N801 - used like a function: ``for x in prefetch(it)``
    """Iterate ``iterator`` ``depth`` items ahead in a daemon thread; exceptions surface in the caller."""

    def __init__(self, iterator: Iterator[T], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True, name="cocomix-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, iterator: Iterator[T]) -> None:
        try:
            for item in iterator:
                if not self._put((item, None)):
                    return
            self._put((_DONE, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put((None, err))

    def __iter__(self) -> "prefetch":
        return self

    def __next__(self) -> T:
        item, err = self._queue.get()
        if err is not None:
            raise err
        if item is _DONE:
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue)."""
        self._stop.set()
        self._thread.join(timeout=5)
