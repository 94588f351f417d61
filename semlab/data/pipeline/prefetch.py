"""Run an iterator ahead of its consumer in a background thread, keeping its order.

``prefetch_in_thread(items, depth)`` yields exactly the items of ``items``, in order, but they are
produced by one daemon thread that may run up to ``depth`` items ahead. The Ray Data path uses it so
that the batch collation (uint8 -> tensors, iBOT mask drawing, ``collate_data_and_cast``) of batch
``t + 1`` overlaps the training step of batch ``t`` instead of running between steps on the training
thread. One producer thread means the same items in the same order, so seeded streams (the masks'
generator) stay deterministic. An exception in the producer is raised in the consumer at the item
where it happened; closing the consumer's generator stops the producer at its next item and closes the
source iterator.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def prefetch_in_thread(
    items: Iterator[T], depth: int, name: str = "semlab-prefetch", join_timeout_s: float = 5.0
) -> Iterator[T]:
    """The items of ``items`` in order, produced by a daemon thread up to ``depth`` ahead (0: inline).

    Closing the returned generator stops the thread, which closes ``items`` (when it has ``close``); the
    close waits up to ``join_timeout_s`` for that."""
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=int(depth))
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((None, exc))
        finally:  # a source that holds resources (a Ray Data iterator) releases them in this thread
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = ready.get()
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        # wait (briefly: the producer may be inside a slow next()) for it to close its source, so a caller
        # that shuts down what the source reads from (ray.shutdown) does so after the source is closed
        thread.join(timeout=join_timeout_s)
