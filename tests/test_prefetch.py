"""prefetch_in_thread: the same items in the same order, produced ahead by one thread; errors and
early stops reach the right side."""

from __future__ import annotations

import threading
import time

import pytest

from semlab.data.pipeline.prefetch import prefetch_in_thread


def test_same_items_in_order_produced_by_another_thread_ahead_of_the_consumer():
    produced: list[tuple[int, str]] = []

    def source():
        for i in range(20):
            produced.append((i, threading.current_thread().name))
            yield i

    out = prefetch_in_thread(source(), depth=3, name="collate-test")
    assert next(out) == 0
    time.sleep(0.3)  # the producer fills the queue while the consumer "trains"
    assert len(produced) >= 4  # item 0 consumed, items 1..3 queued, maybe one more in hand
    assert {name for _, name in produced} == {"collate-test"}
    assert [0, *out] == list(range(20))


def test_depth_zero_runs_inline():
    names = []

    def source():
        for i in range(3):
            names.append(threading.current_thread().name)
            yield i

    assert list(prefetch_in_thread(source(), depth=0)) == [0, 1, 2]
    assert set(names) == {threading.current_thread().name}


def test_an_error_in_the_producer_is_raised_in_the_consumer_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise ValueError("bad batch 3")

    out = prefetch_in_thread(source(), depth=2)
    assert next(out) == 1 and next(out) == 2
    with pytest.raises(ValueError, match="bad batch 3"):
        next(out)


def test_closing_the_consumer_stops_the_producer():
    made = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield i
            i += 1

    source = endless()
    out = prefetch_in_thread(source, depth=2, name="collate-stop")
    assert next(out) == 0
    out.close()
    assert source.gi_frame is None  # the source was closed (its resources released) before close returned
    time.sleep(0.5)
    count = len(made)
    time.sleep(0.3)
    assert len(made) == count <= 5  # stopped, at most depth + a couple in hand
    assert not any(t.name == "collate-stop" and t.is_alive() for t in threading.enumerate())
