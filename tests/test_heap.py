"""The in-memory schedule, checked against a plain sorted list as the model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.queue.heap import Schedule, Slot, make_slot

USERS = ["u1", "u2", "u3"]
ROOMS = ["r1", "r2"]


def slot(
    key: str, due_at: float, created_at: float = 0.0, uid: str = "u1", rid: str = "r1"
) -> Slot:
    return make_slot(due_at, created_at, key, uid, rid)


def drain(schedule: Schedule, now: float = 1e12) -> list[str]:
    keys = []
    while (taken := schedule.pop_due(now)) is not None:
        keys.append(taken.key)
    return keys


def test_entries_come_out_by_due_time_then_creation() -> None:
    schedule = Schedule()
    schedule.put(slot("late", due_at=20, created_at=1))
    schedule.put(slot("second", due_at=10, created_at=5))
    schedule.put(slot("first", due_at=10, created_at=2))
    assert drain(schedule) == ["first", "second", "late"]


def test_nothing_comes_out_before_it_is_due() -> None:
    schedule = Schedule([slot("a", due_at=10)])
    assert schedule.pop_due(9.9) is None
    assert len(schedule) == 1
    assert drain(schedule, now=10) == ["a"]


def test_an_entry_is_due_within_its_second() -> None:
    schedule = Schedule()
    schedule.put(slot("a", due_at=-0.5))
    schedule.put(slot("b", due_at=10.25))
    assert [s.key for s in (schedule.pop_due(-0.25), schedule.pop_due(10.5)) if s] == ["a", "b"]


def test_putting_a_key_again_moves_it() -> None:
    schedule = Schedule([slot("a", due_at=10), slot("b", due_at=20)])
    schedule.put(slot("a", due_at=30))
    assert len(schedule) == 2
    assert drain(schedule) == ["b", "a"]


def test_a_read_of_every_room_leaves_the_other_users() -> None:
    schedule = Schedule(
        [slot("a", 1, uid="u1"), slot("b", 2, uid="u2"), slot("c", 3, uid="u1", rid="r2")]
    )
    assert sorted(schedule.remove_read("u1", None, read_at=0)) == ["a", "c"]
    assert drain(schedule) == ["b"]


def test_a_read_of_a_room_leaves_the_users_other_rooms() -> None:
    schedule = Schedule([slot("a", 1, rid="r1"), slot("b", 2, rid="r2"), slot("c", 3, rid="r1")])
    assert sorted(schedule.remove_read("u1", "r1", read_at=0)) == ["a", "c"]
    assert drain(schedule) == ["b"]


def test_a_read_leaves_what_was_created_after_it() -> None:
    schedule = Schedule([slot("before", 1, created_at=5), slot("after", 2, created_at=7)])
    assert schedule.remove_read("u1", None, read_at=6) == ["before"]
    assert drain(schedule) == ["after"]


def test_bring_forward_skips_entries_being_retried() -> None:
    retrying = make_slot(50, 0, "retrying", "u1", "r1", attempts=2)
    schedule = Schedule([slot("a", 10), slot("b", 40, created_at=-1), retrying])
    assert schedule.bring_forward("u1", 10) == 1
    assert drain(schedule, now=10) == ["b", "a"]
    assert drain(schedule) == ["retrying"]


def test_dead_slots_are_compacted_away() -> None:
    schedule = Schedule()
    for i in range(5000):
        schedule.put(slot(f"k{i}", i, uid=f"u{i}"))
    for i in range(4990):
        schedule.remove(f"u{i}", f"k{i}")
    assert len(schedule) == 10
    assert sum(len(bucket) for bucket in schedule._buckets.values()) < 5000
    assert drain(schedule) == [f"k{i}" for i in range(4990, 5000)]


#: Quarter seconds either side of zero: several slots per whole second, and floors below 0.
times = st.integers(-40, 40).map(lambda quarters: quarters / 4)

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.integers(0, 30),  # key number
            times,  # due_at
            times,  # created_at
            st.sampled_from(USERS),
            st.sampled_from(ROOMS),
        ),
        st.tuples(
            st.just("remove_read"),
            st.sampled_from(USERS),
            st.none() | st.sampled_from(ROOMS),
            times,  # read at
        ),
        st.tuples(st.just("remove"), st.integers(0, 30)),
        st.tuples(st.just("bring_forward"), st.sampled_from(USERS), times),
        st.tuples(st.just("pop"), times),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_schedule_matches_a_sorted_list(ops: list[tuple[object, ...]]) -> None:
    schedule = Schedule()
    model: dict[str, Slot] = {}
    for op, *args in ops:
        if op == "put":
            number, due, created, uid, rid = args
            key = f"{uid}:{number}"
            new = slot(key, float(due), float(created), str(uid), str(rid))  # type: ignore[arg-type]
            schedule.put(new)
            model[key] = new
        elif op == "remove_read":
            uid, rid, at = str(args[0]), args[1], float(args[2])  # type: ignore[arg-type]
            gone = [
                k
                for k, s in model.items()
                if s.uid == uid and s.created_at <= at and rid in (None, s.rid)
            ]
            assert sorted(schedule.remove_read(uid, rid, at)) == sorted(gone)  # type: ignore[arg-type]
            for k in gone:
                del model[k]
        elif op == "remove":
            for key in [k for k in model if k.endswith(f":{args[0]}")]:
                assert schedule.remove(model[key].uid, key)
                del model[key]
        elif op == "bring_forward":
            uid, due = str(args[0]), float(args[1])  # type: ignore[arg-type]
            for key, s in list(model.items()):
                if s.uid == uid and s.due_at > due:
                    model[key] = s._replace(due_at=due)
            schedule.bring_forward(uid, due)
        else:
            now = float(args[0])  # type: ignore[arg-type]
            due = sorted(s for s in model.values() if s.due_at <= now)
            taken = schedule.pop_due(now)
            assert taken == (due[0] if due else None)
            if taken is not None:
                del model[taken.key]
        assert len(schedule) == len(model)
        assert schedule.first() == (min(model.values()) if model else None)
    assert drain(schedule) == [s.key for s in sorted(model.values())]
