"""Many callers' small writes to one collection as one unordered bulk write.

The per-push writes (the ledger's claims and marks, the queue's deletes) are
each tiny; sent one by one they cost a round trip and a command apiece, and at
hundreds of pushes in flight MongoDB's command rate, not the provider, limits
delivery. Grouped, they cost one round trip per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import pymongo
from pymongo import DeleteOne, InsertOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, OperationFailure

Doc = dict[str, Any]
WriteOp = InsertOne[Doc] | UpdateOne | DeleteOne
DUPLICATE_KEY = 11000
#: Seconds a group write may take before every caller in it gets the error.
WRITE_DEADLINE = 10.0


@dataclass
class _Pending:
    ops: list[WriteOp]
    #: Per op: None, or the duplicate-key code when an insert found its document.
    codes: list[int | None] = field(default_factory=list)
    failure: BaseException | None = None
    done: bool = False


class GroupCommit:
    """Many callers' small writes as one unordered bulk write (a group commit).

    Each caller queues its ops and takes the lock; whoever holds it writes
    everything queued so far, so callers that arrive during a write share the
    next one. No background task, no timer: an idle collection is written at once.
    """

    def __init__(self, collection: AsyncCollection[Doc]) -> None:
        self._collection = collection
        self._queued: list[_Pending] = []
        self._lock = anyio.Lock()

    async def run(self, ops: list[WriteOp]) -> list[int | None]:
        if not ops:
            return []
        mine = _Pending(ops)
        self._queued.append(mine)
        async with self._lock:
            if not mine.done:
                batch, self._queued = self._queued, []
                await self._write(batch)
        if mine.failure is not None:
            raise mine.failure
        return mine.codes

    async def _write(self, batch: list[_Pending]) -> None:
        ops = [op for pending in batch for op in pending.ops]
        codes: dict[int, int] = {}
        failure: BaseException | None = None
        try:
            # Shielded: the caller writing is one of many; its cancellation (shutdown,
            # a sibling's failure) must neither fail the others' writes, which mongod
            # may have applied, nor land inside pymongo (PYTHON-5167). pymongo's own
            # deadline bounds it instead.
            with anyio.CancelScope(shield=True), pymongo.timeout(WRITE_DEADLINE):
                await self._collection.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            codes = {int(e["index"]): int(e["code"]) for e in exc.details.get("writeErrors", [])}
            if exc.details.get("writeConcernErrors"):
                failure = exc
        except Exception as exc:
            failure = exc
            raise
        except BaseException:  # cancelled: the others must not wait for this write forever
            failure = OperationFailure(f"write to {self._collection.name} was cancelled")
            raise
        finally:
            _settle(batch, codes, failure)


def _settle(batch: list[_Pending], codes: dict[int, int], failure: BaseException | None) -> None:
    """Hand each caller its ops' results; any error but a duplicate claim is a failure."""
    index = 0
    for pending in batch:
        pending.codes = [codes.get(i) for i in range(index, index + len(pending.ops))]
        index += len(pending.ops)
        errors = [c for c in pending.codes if c is not None and c != DUPLICATE_KEY]
        if failure is not None:
            pending.failure = failure
        elif errors:
            error = f"grouped write failed (code {errors[0]})"
            pending.failure = OperationFailure(error, errors[0])
        pending.done = True
