"""Unit tests of the offset tracker that decides how far a partition may be committed."""

from __future__ import annotations

import random

import pytest
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from gpu_inference.offsets import OffsetTracker

P0 = TopicPartition("attempts", 0)
P1 = TopicPartition("attempts", 1)


def test_nothing_committable_before_finish() -> None:
    tracker = OffsetTracker()
    tracker.track(P0, 0)

    assert tracker.committable() == {}
    assert tracker.in_flight(P0) == 1


def test_in_order_finish_commits_next_offset() -> None:
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.track(P0, offset)

    tracker.finish(P0, 0)
    assert tracker.committable() == {P0: 1}

    tracker.finish(P0, 1)
    tracker.finish(P0, 2)
    assert tracker.committable() == {P0: 3}
    assert tracker.in_flight() == 0


def test_out_of_order_finish_waits_for_oldest() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.track(P0, offset)

    tracker.finish(P0, 12)
    tracker.finish(P0, 11)
    assert tracker.committable() == {}
    assert tracker.in_flight(P0) == 1

    tracker.finish(P0, 10)
    assert tracker.committable() == {P0: 13}


def test_offset_gaps_do_not_block_commit() -> None:
    # Transaction markers and compaction leave offsets that are never fetched.
    tracker = OffsetTracker()
    tracker.track(P0, 5)
    tracker.track(P0, 9)

    tracker.finish(P0, 9)
    assert tracker.committable() == {}

    tracker.finish(P0, 5)
    assert tracker.committable() == {P0: 10}


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.track(P0, 0)
    tracker.track(P1, 0)
    tracker.track(P1, 1)

    tracker.finish(P1, 0)
    tracker.finish(P1, 1)

    assert tracker.committable() == {P1: 2}
    assert tracker.committable({P0}) == {}
    assert tracker.in_flight(P0) == 1
    assert tracker.in_flight(P1) == 0


def test_mark_committed_hides_unchanged_offsets() -> None:
    tracker = OffsetTracker()
    tracker.track(P0, 0)
    tracker.track(P0, 1)
    tracker.finish(P0, 0)

    tracker.mark_committed(tracker.committable())
    assert tracker.committable() == {}

    tracker.finish(P0, 1)
    assert tracker.committable() == {P0: 2}


def test_forget_drops_partition_state() -> None:
    tracker = OffsetTracker()
    tracker.track(P0, 7)
    tracker.forget({P0})

    # A record of a revoked partition that finishes late changes nothing.
    tracker.finish(P0, 7)
    assert tracker.committable() == {}
    assert tracker.in_flight(P0) == 0

    # After a new assignment the consumer starts again from the committed offset.
    tracker.track(P0, 3)
    tracker.finish(P0, 3)
    assert tracker.committable() == {P0: 4}


def test_track_rejects_non_increasing_offset() -> None:
    tracker = OffsetTracker()
    tracker.track(P0, 4)

    with pytest.raises(ValueError, match="not above the last tracked offset 4"):
        tracker.track(P0, 4)
    with pytest.raises(ValueError, match="forget"):
        tracker.track(P0, 2)


def test_finish_of_unknown_offset_is_ignored() -> None:
    tracker = OffsetTracker()
    tracker.track(P0, 1)

    tracker.finish(P0, 0)
    tracker.finish(P1, 1)

    assert tracker.committable() == {}
    assert tracker.in_flight(P0) == 1


@given(
    st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=30),
    st.randoms(use_true_random=False),
    st.integers(min_value=0, max_value=30),
)
def test_commit_point_is_oldest_unfinished(
    gaps: list[int], rng: random.Random, finished_count: int
) -> None:
    offsets = []
    offset = -1
    for gap in gaps:
        offset += gap
        offsets.append(offset)
    finished = list(offsets)
    rng.shuffle(finished)
    finished = finished[: min(finished_count, len(finished))]

    tracker = OffsetTracker()
    for offset in offsets:
        tracker.track(P0, offset)
    for offset in finished:
        tracker.finish(P0, offset)

    unfinished = [offset for offset in offsets if offset not in set(finished)]
    committable = tracker.committable().get(P0)
    if not unfinished:
        assert committable == offsets[-1] + 1
    elif unfinished[0] == offsets[0]:
        assert committable is None
    else:
        # Everything tracked before the oldest unfinished record is done.
        assert committable is not None
        assert committable <= unfinished[0]
        assert committable > max(o for o in offsets if o < unfinished[0])
    assert tracker.in_flight(P0) == len(unfinished)
