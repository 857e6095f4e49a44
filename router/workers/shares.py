"""Which worker this process is, and its share of the limits the settings give for the whole
router: ``pool_size`` (global, per database, per tenant), ``min_pool_size``,
``max_client_conn`` (global and per tenant), ``reserve_pool_size``, ``max_db_connections``
(global and per database) and ``max_user_connections`` are divided between the workers so
that all of them together stay within what was configured.

Worker ``i`` of ``n`` gets ``total // n``, plus one more while ``i < total % n``: 10 over 3
workers is 4, 3, 3. A pool size or client cap is at least 1 in every worker (a worker with none
could serve nobody), so a limit smaller than the number of workers is exceeded: pool_size = 2
with 4 workers opens up to 4 server connections per pool (so are the caps, likewise).
``min_pool_size`` and ``reserve_pool_size`` may be 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from router.config import DatabaseConfig, Settings


def share(total: int, index: int, count: int, *, minimum: int = 0) -> int:
    """Worker ``index``'s part of ``total`` split ``count`` ways (the parts add up to
    ``total`` unless ``minimum`` raises some)."""
    if not 0 <= index < count:
        raise ValueError(f"worker index {index} out of range for {count} workers")
    part = total // count + (1 if index < total % count else 0)
    return max(minimum, part)


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """One worker of ``count``, started by the supervisor."""

    index: int
    count: int
    runtime_dir: Path  # holds every worker's control socket
    listen_port: int  # the port all workers share (the supervisor resolved a configured 0)
    configured_port: int  # what the settings file said when the workers started

    def control_socket(self, index: int) -> Path:
        return self.runtime_dir / f"worker-{index}.sock"

    def owner_of(self, cancel_pid: int) -> int:
        """The worker that issued a BackendKeyData process id (see Router.register_client)."""
        return cancel_pid % self.count

    def part(self, total: int, *, minimum: int = 1) -> int:
        return share(total, self.index, self.count, minimum=minimum)

    def _cap_part(self, cap: int) -> int:
        return self.part(cap) if cap else 0  # 0 is no cap: it stays 0

    def _db_parts(self, db: DatabaseConfig) -> dict:
        """A [databases] entry's limits, this worker's part of each (unset ones stay unset)."""
        parts = {}
        if db.pool_size:
            parts["pool_size"] = self.part(db.pool_size)
        if db.reserve_pool_size:
            parts["reserve_pool_size"] = self.part(db.reserve_pool_size, minimum=0)
        if db.min_pool_size:
            parts["min_pool_size"] = self.part(db.min_pool_size, minimum=0)
        if db.max_db_connections:
            parts["max_db_connections"] = self.part(db.max_db_connections)
        return parts

    def settings_for(self, settings: Settings) -> Settings:
        """This worker's view of ``settings``: its share of the limits, the shared port, and
        the admin API on worker 0 only. Applied at start and again to every reload."""
        port = settings.listen_port
        if port == self.configured_port:
            port = self.listen_port  # a changed port is left alone: reload reports a restart
        databases = {name: db.model_copy(update=self._db_parts(db)) for name, db in settings.databases.items()}
        pool_size = self.part(settings.pool_size)
        return settings.model_copy(
            update={
                "listen_port": port,
                "pool_size": pool_size,
                "min_pool_size": min(pool_size, self.part(settings.min_pool_size, minimum=0)),
                "max_client_conn": self.part(settings.max_client_conn),
                "reserve_pool_size": self.part(settings.reserve_pool_size, minimum=0),
                # 0 is no cap: it stays 0.
                "max_db_connections": self._cap_part(settings.max_db_connections),
                "max_user_connections": self._cap_part(settings.max_user_connections),
                "databases": databases,
                "admin_port": settings.admin_port if self.index == 0 else -1,
            }
        )
