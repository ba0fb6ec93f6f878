"""The reader and writer threads around featurize's loop: order kept, every failure raised, nothing hangs."""

import threading
import time

import pytest

from trimodal.errors import ShardError, TrimodalError
from trimodal.features.overlap import Ahead, Behind

pytestmark = pytest.mark.timeout(30)  # a hang is a failure, not a stuck run


def test_ahead_yields_results_in_order_at_most_depth_ahead():
    produced, consumed = [], []

    def produce(item):
        produced.append(item)
        return item * 10

    with Ahead(range(6), produce, depth=1) as ahead:
        for value in ahead:
            time.sleep(0.02)  # let the thread run as far ahead as it may
            consumed.append(value)
            assert len(produced) - len(consumed) <= 2  # one queued, one in hand
    assert consumed == [0, 10, 20, 30, 40, 50]


def test_ahead_raises_the_producers_own_exception_after_the_results_before_it():
    def produce(item):
        if item == 2:
            raise ShardError("shard 2 is broken")
        return item

    seen = []
    with pytest.raises(ShardError, match="shard 2 is broken"), Ahead(range(5), produce) as ahead:
        for value in ahead:
            seen.append(value)
    assert seen == [0, 1]


def test_leaving_ahead_early_stops_its_thread():
    started = threading.Event()

    def produce(item):
        started.set()
        return item

    ahead = Ahead(range(1000), produce, depth=1)
    with ahead:
        for value in ahead:
            break
    assert started.is_set() and not ahead._thread.is_alive()


def test_behind_consumes_in_submission_order():
    consumed = []

    def consume(value):
        time.sleep(0.01 * (value % 3))  # uneven work must not reorder
        consumed.append(value)

    with Behind(consume) as behind:
        for value in range(8):
            behind.submit(value)
    assert consumed == list(range(8))


def test_behind_stops_at_its_first_failure_and_raises_it_on_the_next_submit():
    consumed = []

    def consume(value):
        if value == 1:
            raise TrimodalError("cannot write 1")
        consumed.append(value)

    with pytest.raises(TrimodalError, match="cannot write 1"), Behind(consume) as behind:
        for value in range(50):
            behind.submit(value)
            time.sleep(0.01)
    assert consumed == [0]


def test_a_failure_on_the_last_value_is_raised_when_behind_closes():
    def consume(value):
        if value == 2:
            raise TrimodalError("cannot write the last one")

    behind = Behind(consume)
    for value in range(3):
        behind.submit(value)
    with pytest.raises(TrimodalError, match="cannot write the last one"):
        behind.close()


def test_the_loops_own_exception_wins_and_what_was_submitted_is_still_consumed():
    consumed = []

    def consume(value):
        time.sleep(0.05)
        consumed.append(value)

    with pytest.raises(KeyboardInterrupt), Behind(consume, depth=2) as behind:
        behind.submit(0)
        behind.submit(1)
        raise KeyboardInterrupt
    assert consumed == [0, 1]
