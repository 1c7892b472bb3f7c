"""Reads remembered for entries queued after them: pure, no I/O."""

from __future__ import annotations

from streamer.queue import Entry
from streamer.queue.reads import RecentReads


def entry(uid: str = "u1", rid: str = "r1", created_at: float = 10.0) -> Entry:
    return Entry(uid, rid, "m1", "push", created_at, created_at)


def test_a_read_covers_what_was_created_up_to_it() -> None:
    reads = RecentReads(whole_user=True)
    reads.note("u1", "r1", at=10.0)
    assert reads.cleared(entry(rid="r2", created_at=10.0))
    assert not reads.cleared(entry(created_at=10.5))
    assert not reads.cleared(entry(uid="u2"))


def test_a_room_read_covers_that_room_alone_when_rooms_are_cleared_alone() -> None:
    reads = RecentReads(whole_user=False)
    reads.note("u1", "r1", at=10.0)
    assert reads.cleared(entry(rid="r1")) and not reads.cleared(entry(rid="r2"))


def test_an_older_read_does_not_move_the_latest_back() -> None:
    reads = RecentReads(whole_user=True)
    reads.note("u1", "r1", at=20.0)
    reads.note("u1", "r1", at=5.0)
    assert reads.cleared(entry(created_at=15.0))


def test_the_oldest_reads_are_forgotten_first() -> None:
    reads = RecentReads(whole_user=True, limit=2)
    for uid in ("u1", "u2", "u3"):
        reads.note(uid, "r1", at=10.0)
    reads.note("u2", "r1", at=11.0)  # read again: remembered anew
    reads.note("u4", "r1", at=10.0)
    assert [reads.cleared(entry(uid=uid)) for uid in ("u1", "u2", "u3", "u4")] == [
        False, True, False, True,
    ]  # fmt: skip
