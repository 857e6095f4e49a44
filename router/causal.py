"""read_your_writes = tenant: when each tenant last wrote, shared by the router's processes.

A tenant's scope (``scope_of``: its id, or the [databases] entry clients name) maps to one of
``SLOTS`` slots by CRC-32 (the same in every process, unlike ``hash``); two scopes on one slot
only make each other's reads go to the primary a little more often. A slot holds the
``time.monotonic()`` (one clock for every process of the machine) at which a write
transaction of the scope last ended. A read of the scope may go to a replica only once the
lag monitor has sampled the primary in a round that started after that moment, and then only
to a replica that has replayed what the primary had written by then (router/splitting.py).

With ``workers``, every worker maps one file in the supervisor's runtime directory and writes
only its own row of it, so no two processes ever write one value; a reader takes the latest
time over the rows. One process keeps its single row in memory.
"""

from __future__ import annotations

import mmap
import os
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.frontend.client import ClientConnection
    from router.workers.shares import WorkerSlot

SLOTS = 4096
_ROW = SLOTS * 8  # float64 per slot


def scope_of(client: ClientConnection) -> str:
    """Whose writes a read waits for: the registry tenant's, whatever name its session logged
    in with, else those of the sessions that named the same database entry."""
    tenant = client.tenant
    return f"tenant:{tenant.tenant_id}" if tenant is not None else f"database:{client.database}"


def slot_of(scope: str) -> int:
    return zlib.crc32(scope.encode()) % SLOTS


def client_slot(client: ClientConnection) -> int:
    """``client``'s scope's slot, worked out once per session (its scope never changes)."""
    slot = client.ryw_slot
    if slot is None:
        slot = client.ryw_slot = slot_of(scope_of(client))
    return slot


class WriteTimes:
    def __init__(self, worker: WorkerSlot | None = None) -> None:
        if worker is None:
            self._buffer: bytearray | mmap.mmap = bytearray(_ROW)
            rows, index = 1, 0
        else:
            rows, index = worker.count, worker.index
            fd = os.open(worker.runtime_dir / "write-times", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < rows * _ROW:
                    os.ftruncate(fd, rows * _ROW)  # zeros; a sibling doing the same changes nothing
                self._buffer = mmap.mmap(fd, rows * _ROW)
            finally:
                os.close(fd)
        view = memoryview(self._buffer).cast("d")
        self._rows = [view[i * SLOTS : (i + 1) * SLOTS] for i in range(rows)]
        self._mine = self._rows[index]
        self._single = rows == 1

    def note(self, slot: int, at: float) -> None:
        """A write of ``slot``'s scope ended at ``at`` (this process's row)."""
        self._mine[slot] = at

    def last(self, slot: int) -> float:
        """When a write of ``slot``'s scope last ended, in any process; 0.0: never."""
        if self._single:
            return self._mine[slot]
        return max(row[slot] for row in self._rows)
