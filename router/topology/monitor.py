"""The background task that keeps a ClusterTopology current: every `lag_check_interval` it checks
every node of the cluster at once over one persistent asyncpg connection per node, then applies
the round's results in one go (the primary's first, so replica lag is measured against a fresh
primary LSN).

Which primary position. Lag is measured against pg_current_wal_lsn(), the primary's WAL *write*
position, not pg_current_wal_insert_lsn():
  - walsenders send only WAL that has been written (and flushed), so the write position is the
    furthest any replica can be; the insert position also counts WAL still in the primary's
    buffers, which would show every replica "behind" after each write until the WAL writer runs;
  - the insert position of an idle primary can stay past the end of the last record (when that
    record ends on a page boundary it points past the next page header), so replicas would never
    look caught up;
  - the cost: with synchronous_commit = off (the test cluster, see tests/cluster.py) a commit is
    written only by the WAL writer, within 3 x wal_writer_delay, and until then it is not counted.
    A replica cannot be more stale than that window because of it, and no replica can have that
    WAL yet anyway. Read-your-writes needs the opposite bound (an LSN that includes a session's
    own commit), so each primary sample also carries pg_current_wal_insert_lsn(), which counts
    every record inserted, written or not (ClusterTopology.primary_insert_lsn), with its
    page-boundary quirk above taken off (lsn.replay_target): otherwise a session whose write
    left the WAL at a page or segment boundary (a WAL switch, as after pg_basebackup or each
    archive_timeout, with a write that logged nothing itself) would read from the primary until
    some other write moved the WAL on, which on a quiet primary takes up to 15 s or more.

A round's duration is bounded by connect_timeout + check_timeout per node, all nodes in parallel;
a node that does not answer within them counts as a failed check (see cluster.py for when failed
checks mark it down). A connection that breaks (server restart, failover) gets one fresh attempt
in the same round, so a node that was stopped is seen as refused, hence down, at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from router.config import ClusterConfig, NodeAddress
from router.tasks import cancel_and_wait
from router.topology.cluster import Address, ClusterTopology, NodeState
from router.topology.lsn import parse_lsn, replay_target

log = logging.getLogger(__name__)

APPLICATION_NAME = "pgrouter-topology"

# One statement for every node, whatever it is now: a node can be promoted between two rounds.
# pg_is_in_recovery() is evaluated once (FROM), so both CASEs agree; the functions that error in
# the wrong state (pg_current_wal_lsn() in recovery, pg_is_wal_replay_paused() outside it) are
# only reached in the right one, because CASE does not evaluate branches it does not take.
# The insert position is read once (LATERAL), with where it lies in its WAL segment
# (pg_walfile_name_offset, primaries only) and the page size: see replay_target in lsn.py.
SAMPLE_SQL = """
SELECT r,
       (CASE WHEN r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
       extract(epoch FROM pg_last_xact_replay_timestamp())::float8,
       CASE WHEN r THEN pg_is_wal_replay_paused() ELSE false END,
       i.lsn::text,
       CASE WHEN i.lsn IS NULL THEN NULL ELSE (pg_walfile_name_offset(i.lsn)).file_offset END,
       current_setting('wal_block_size')::int
FROM pg_is_in_recovery() AS r,
     LATERAL (SELECT CASE WHEN r THEN NULL ELSE pg_current_wal_insert_lsn() END AS lsn) AS i
"""

# What a node can throw at a check; anything else is a bug here and stops the monitor loudly.
# TimeoutError is an OSError.
CHECK_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


@dataclass(frozen=True, slots=True)
class Sample:
    in_recovery: bool
    lsn: int | None  # replay position in recovery, else current WAL (write) position
    replay_ts: float | None
    paused: bool
    at: float  # epoch seconds when the answer arrived
    insert_lsn: int | None = None  # primaries only: pg_current_wal_insert_lsn()


@dataclass(frozen=True, slots=True)
class CheckFailure:
    error: str
    refused: bool


class TopologyMonitor:
    """Owns one background task (start() once, then stop()) that polls the nodes and updates
    `topology`, which is then read from the same event loop. `on_change(topology)` is called
    after a round that changed the primary, the version, or any node's role, health or read
    eligibility (not for lag values alone); it must not block."""

    def __init__(
        self,
        nodes: Iterable[Address | tuple[str, int]],
        *,
        dbname: str = "postgres",
        user: str = "postgres",
        password: str | None = None,
        ssl: Any = None,  # as asyncpg.connect's `ssl`: None (its default), False, a mode, an SSLContext
        max_lag_seconds: float = 1.0,
        max_lag_bytes: int | None = None,
        lag_check_interval: float = 0.25,
        down_after: int = 3,
        recover_after: int = 3,
        connect_timeout: float = 2.0,
        check_timeout: float = 1.0,
        on_change: Callable[[ClusterTopology], None] | None = None,
    ) -> None:
        if lag_check_interval <= 0 or connect_timeout <= 0 or check_timeout <= 0:
            raise ValueError("intervals and timeouts must be > 0")
        self.topology = ClusterTopology(
            nodes,
            max_lag_seconds=max_lag_seconds,
            max_lag_bytes=max_lag_bytes,
            down_after=down_after,
            recover_after=recover_after,
        )
        self.lag_check_interval = lag_check_interval
        self._connect_args = {"database": dbname, "user": user, "password": password, "ssl": ssl}
        self._connect_timeout = connect_timeout
        self._check_timeout = check_timeout
        self._on_change = on_change
        self._connections: dict[NodeState, asyncpg.Connection] = {}
        self._task: asyncio.Task[None] | None = None
        self._rounds_started = 0
        self._rounds_completed = 0
        # time.monotonic() when the last completed round started: a write that ended before
        # it is in that round's primary sample (read_your_writes = tenant, router/causal.py).
        self.completed_round_started_at = 0.0
        self._round_done = asyncio.Event()
        self._last_status: tuple | None = None

    @classmethod
    def for_cluster(cls, cluster: ClusterConfig, **kwargs: Any) -> TopologyMonitor:
        """The configured primary first: should two nodes claim to be primary at start-up, the
        first one reported wins (see the split-brain rule in cluster.py)."""
        nodes: list[NodeAddress] = [cluster.primary, *cluster.replicas]
        return cls(nodes, **kwargs)

    @property
    def rounds_completed(self) -> int:
        return self._rounds_completed

    @property
    def rounds_started(self) -> int:
        return self._rounds_started

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("TopologyMonitor already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="topology-monitor")
        self._task.add_done_callback(_log_if_failed)

    @property
    def running(self) -> bool:
        """Started, and neither stopped nor dead."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop polling and close the monitoring connections. Re-raises what killed the task."""
        task = self._task
        if task is None:
            return
        try:
            await cancel_and_wait(task)
        finally:
            connections, self._connections = list(self._connections.values()), {}
            await asyncio.gather(*(self._close(conn) for conn in connections))

    async def wait_for_sample(self, timeout: float | None = None) -> ClusterTopology:
        """Wait for the end of the next round that starts after this call, so what it returns
        reflects the world as of the call or later. Raises TimeoutError after `timeout`, and
        RuntimeError if the monitor is not running."""
        if self._task is None:
            raise RuntimeError("TopologyMonitor not started")
        target = self._rounds_started + 1
        async with asyncio.timeout(timeout):
            while self._rounds_completed < target:
                if self._task.done():
                    error = None if self._task.cancelled() else self._task.exception()
                    raise RuntimeError("TopologyMonitor is not running") from error
                await self._round_done.wait()
        return self.topology

    # -- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            next_round = loop.time()
            while True:
                self._rounds_started += 1
                started_at = time.monotonic()
                await self._poll_round()
                self._rounds_completed += 1
                self.completed_round_started_at = started_at
                self._wake_waiters()
                self._report_changes()
                # Fixed cadence; after an overrun start at once rather than in a burst to catch up.
                next_round = max(next_round + self.lag_check_interval, loop.time())
                await asyncio.sleep(next_round - loop.time())
        finally:
            self._wake_waiters()  # so they notice the task has ended

    def _wake_waiters(self) -> None:
        done, self._round_done = self._round_done, asyncio.Event()
        done.set()

    async def _poll_round(self) -> None:
        topology = self.topology
        nodes = list(topology.nodes)
        results = await asyncio.gather(*(self._check(node) for node in nodes))
        designated = topology.designated_primary

        def order(pair: tuple[NodeState, Sample | CheckFailure]) -> int:
            node, result = pair
            if node is designated:
                return 0  # fresh primary LSN (or its failure) before anything is compared to it
            if isinstance(result, Sample) and not result.in_recovery:
                return 1  # a promoted node takes over before replicas are measured
            return 2

        for node, result in sorted(zip(nodes, results, strict=True), key=order):
            if isinstance(result, CheckFailure):
                topology.mark_failure(node, result.error, refused=result.refused)
            elif node is topology.designated_primary:
                topology.apply_primary_sample(
                    result.lsn, result.in_recovery, result.at, insert_lsn=result.insert_lsn
                )
            else:
                topology.apply_replica_sample(
                    node, result.in_recovery, result.lsn, result.replay_ts, result.paused, result.at
                )
                if not result.in_recovery and node is topology.designated_primary:
                    topology.primary_insert_lsn = result.insert_lsn  # promoted this round

    def _report_changes(self) -> None:
        topology = self.topology
        primary = topology.primary
        status = (
            topology.version,
            primary and primary.address,
            tuple((n.role, n.healthy, n.eligible) for n in topology.nodes),
        )
        if status == self._last_status:
            return
        self._last_status = status
        log.info(
            "topology v%d: primary %s; %s",
            topology.version,
            f"{primary.host}:{primary.port}" if primary else "none",
            ", ".join(
                f"{n.host}:{n.port} {n.role}{'' if n.healthy else ' down'}"
                f"{' eligible' if n.eligible else ''}"
                f"{f' ({n.last_error})' if n.last_error else ''}"
                for n in topology.nodes
            ),
        )
        if self._on_change is not None:
            try:
                self._on_change(topology)
            except Exception:  # the callback's bug must not stop health checks; it is logged
                log.exception("topology on_change callback failed")

    # -- one node -----------------------------------------------------------------------

    async def _check(self, node: NodeState) -> Sample | CheckFailure:
        reused = node in self._connections
        try:
            return await self._sample(node)
        except CHECK_ERRORS as exc:
            self._drop(node)
            # A reused connection that broke (not one that was merely slow) is retried once at
            # once: after a restart the fresh connect tells "back already" from "refused, down".
            if not reused or isinstance(exc, TimeoutError):
                return _failure(exc)
        try:
            return await self._sample(node)
        except CHECK_ERRORS as exc:
            self._drop(node)
            return _failure(exc)

    async def _sample(self, node: NodeState) -> Sample:
        conn = self._connections.get(node)
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(
                host=node.host,
                port=node.port,
                timeout=self._connect_timeout,
                server_settings={
                    "application_name": APPLICATION_NAME,
                    "statement_timeout": str(int(self._check_timeout * 1000)),
                },
                **self._connect_args,
            )
            self._connections[node] = conn
        async with asyncio.timeout(self._check_timeout):
            in_recovery, lsn, replay_ts, paused, insert_lsn, segment_offset, block_size = await conn.fetchrow(
                SAMPLE_SQL
            )
        return Sample(
            in_recovery=in_recovery,
            lsn=parse_lsn(lsn) if lsn is not None else None,
            replay_ts=replay_ts,
            paused=paused,
            at=time.time(),
            insert_lsn=(
                replay_target(parse_lsn(insert_lsn), segment_offset, block_size) if insert_lsn is not None else None
            ),
        )

    def _drop(self, node: NodeState) -> None:
        conn = self._connections.pop(node, None)
        if conn is not None:
            conn.terminate()  # its state is unknown (timeout, broken); no goodbye needed

    async def _close(self, conn: asyncpg.Connection) -> None:
        try:
            await conn.close(timeout=self._check_timeout)
        except CHECK_ERRORS:
            conn.terminate()


def _failure(exc: BaseException) -> CheckFailure:
    # 57P03 (cannot_connect_now): the server is starting up, shutting down or in crash recovery.
    refused = isinstance(exc, ConnectionRefusedError | asyncpg.CannotConnectNowError)
    message = str(exc) or "no answer"
    return CheckFailure(error=f"{type(exc).__name__}: {message}", refused=refused)


def _log_if_failed(task: asyncio.Task[None]) -> None:
    # Logged the moment it happens; stop() re-raises it to whoever stops the monitor.
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("topology monitor stopped by an error", exc_info=exc)
