"""TopologyMonitor against a real primary with two streaming replicas.

These tests pause replay, stop nodes and promote one, so they run on a cluster of their own
(module-scoped), never the shared session `cluster`. Tests run in file order and the failover
test, which leaves the old primary stopped, is last. Waiting is done on completed monitor rounds
with deadlines (wait_for_sample), never with sleeps.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress

import asyncpg
import pytest

from router.topology import SECOND_PRIMARY, ClusterTopology, NodeState, Role, TopologyMonitor
from router.topology.monitor import APPLICATION_NAME
from tests.cluster import Cluster, Node

INTERVAL = 0.25  # lag_check_interval
MAX_LAG = 0.5  # max_replica_lag, seconds
MAX_LAG_BYTES = 64 * 1024 * 1024  # large: these tests exercise the time limit
RECOVER_AFTER = 3
# Scheduling slack for a loaded test machine, on top of what the rules allow.
SLACK = 0.75


@pytest.fixture(scope="module")
def topo_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("topology")
    with Cluster(base, replicas=2, redis=False, ssl=False, pgbench_scale=None) as cluster:
        cluster.psql("CREATE TABLE ticks (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
        cluster.wait_replay()
        yield cluster


def make_monitor(cluster: Cluster, **kwargs) -> TopologyMonitor:
    kwargs = {
        "max_lag_seconds": MAX_LAG,
        "max_lag_bytes": MAX_LAG_BYTES,
        "lag_check_interval": INTERVAL,
        "recover_after": RECOVER_AFTER,
        "connect_timeout": 1.0,
        **kwargs,
    }
    return TopologyMonitor([(n.host, n.port) for n in cluster.nodes], **kwargs)


@pytest.fixture
async def monitor(topo_cluster: Cluster) -> AsyncIterator[TopologyMonitor]:
    mon = make_monitor(topo_cluster)
    mon.start()
    try:
        yield mon
    finally:
        await mon.stop()


def state(topology: ClusterTopology, node: Node) -> NodeState:
    return topology.node(node.host, node.port)


async def until(
    monitor: TopologyMonitor, predicate: Callable[[ClusterTopology], bool], timeout: float
) -> float:
    """Seconds until a completed round satisfies `predicate`; fails after `timeout`."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            topology = await monitor.wait_for_sample(timeout=max(remaining, 0.001))
        except TimeoutError:
            pytest.fail(f"not within {timeout:.2f}s; topology: {monitor.topology.describe()}")
        if predicate(topology):
            return time.monotonic() - start
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.2f}s; topology: {topology.describe()}")


async def psql(cluster: Cluster, sql: str, node: Node | None = None) -> str:
    return await asyncio.to_thread(cluster.psql, sql, node)


@asynccontextmanager
async def writing(node: Node) -> AsyncIterator[asyncio.Future[float]]:
    """Insert into `ticks` on `node` continuously; yields a future of the first commit's time."""
    conn = await asyncpg.connect(host=node.host, port=node.port, user="postgres")
    first_commit: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def write_forever() -> None:
        while True:
            await conn.execute("INSERT INTO ticks DEFAULT VALUES")
            if not first_commit.done():
                first_commit.set_result(time.monotonic())
            await asyncio.sleep(0.002)  # throttle, not synchronisation: spare the CPU

    task = asyncio.create_task(write_forever())
    try:
        yield first_commit
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task  # a writer that died of an error re-raises it here
        await conn.close()


def all_eligible(cluster: Cluster) -> Callable[[ClusterTopology], bool]:
    return lambda t: (
        {n.address for n in t.eligible_replicas()} == {(r.host, r.port) for r in cluster.replicas}
    )


async def test_primary_identified_and_replicas_eligible_with_no_lag(topo_cluster, monitor):
    await asyncio.to_thread(topo_cluster.wait_replay)
    primary = topo_cluster.primary

    def settled(t: ClusterTopology) -> bool:
        return all_eligible(topo_cluster)(t) and all(
            n.lag_seconds == 0 and n.lag_bytes == 0 for n in t.replicas
        )

    await until(monitor, settled, timeout=3.0)
    topology = monitor.topology
    assert topology.primary is state(topology, primary)
    assert topology.version == 1 and topology.primary_lsn
    assert topology.primary.role is Role.PRIMARY and not topology.primary.eligible
    for replica in topo_cluster.replicas:
        node = state(topology, replica)
        assert node.role is Role.REPLICA and node.healthy and node.in_recovery
        assert node.replay_lsn >= topology.primary_lsn and not node.replay_paused
        assert node.consecutive_failures == 0 and node.last_error is None


async def test_paused_replica_goes_ineligible_then_returns_after_hysteresis(topo_cluster, monitor):
    paused, other = topo_cluster.replicas
    await until(monitor, all_eligible(topo_cluster), timeout=3.0)
    await psql(topo_cluster, "SELECT pg_wal_replay_pause()", paused)
    other_dropped: list[dict] = []

    def paused_out(t: ClusterTopology) -> bool:
        if not state(t, other).eligible:
            other_dropped.append(t.describe())
        return not state(t, paused).eligible

    try:
        async with writing(topo_cluster.primary) as first_commit:
            first = await first_commit
            await until(monitor, paused_out, timeout=MAX_LAG + 2 * INTERVAL + SLACK + 2.0)
            # Its lag passes MAX_LAG about MAX_LAG after the first write it did not replay; the
            # sample that sees it comes within an interval or two.
            elapsed = time.monotonic() - first
            assert elapsed <= MAX_LAG + 2 * INTERVAL + SLACK, elapsed
            node = state(monitor.topology, paused)
            assert node.healthy and node.replay_paused
            assert node.lag_seconds > MAX_LAG and node.lag_bytes > 0
            assert not other_dropped, other_dropped
            assert state(monitor.topology, other).eligible

            # Writes go on: once resumed it catches up, and is back after RECOVER_AFTER samples.
            await psql(topo_cluster, "SELECT pg_wal_replay_resume()", paused)
            rounds = 0

            def back(t: ClusterTopology) -> bool:
                nonlocal rounds
                rounds += 1
                return state(t, paused).eligible

            await until(monitor, back, timeout=RECOVER_AFTER * INTERVAL + SLACK + 2.0)
            assert rounds >= RECOVER_AFTER
            assert not state(monitor.topology, paused).replay_paused
            assert not other_dropped, other_dropped
    finally:
        await psql(topo_cluster, "SELECT pg_wal_replay_resume()", paused)


async def test_both_paused_leaves_no_eligible_replica(topo_cluster, monitor):
    await until(monitor, all_eligible(topo_cluster), timeout=3.0)
    try:
        for replica in topo_cluster.replicas:
            await psql(topo_cluster, "SELECT pg_wal_replay_pause()", replica)
        async with writing(topo_cluster.primary):
            await until(monitor, lambda t: t.eligible_replicas() == [], timeout=MAX_LAG + 3.0)
            assert monitor.topology.primary is not None  # writes still have a home
            assert all(n.healthy and n.replay_paused for n in monitor.topology.replicas)
            assert monitor.topology.pick_replica(random.Random(0)) is None
    finally:
        for replica in topo_cluster.replicas:
            await psql(topo_cluster, "SELECT pg_wal_replay_resume()", replica)
    await until(monitor, all_eligible(topo_cluster), timeout=RECOVER_AFTER * INTERVAL + 3.0)


async def test_stopped_replica_is_down_quickly_and_returns_when_started(topo_cluster, monitor):
    replica = topo_cluster.replicas[0]
    await until(monitor, all_eligible(topo_cluster), timeout=3.0)
    try:
        await asyncio.to_thread(replica.stop, "immediate")
        # Refused: down on the first round that tries it.
        took = await until(monitor, lambda t: not state(t, replica).healthy, timeout=3.0)
        assert took <= 2 * INTERVAL + SLACK, took
        node = state(monitor.topology, replica)
        assert not node.eligible and node.last_error
        assert node not in monitor.topology.eligible_replicas()
        assert len(monitor.topology.eligible_replicas()) == 1
    finally:
        await asyncio.to_thread(replica.start)
    await until(monitor, lambda t: state(t, replica).eligible, timeout=5.0)
    node = state(monitor.topology, replica)
    assert node.healthy and node.role is Role.REPLICA and node.last_error is None


async def test_on_change_and_stop_closes_monitoring_connections(topo_cluster):
    seen: list[dict] = []
    mon = make_monitor(topo_cluster, on_change=lambda t: seen.append(t.describe()))
    mon.start()
    try:
        await until(mon, all_eligible(topo_cluster), timeout=3.0)
        rounds = mon.rounds_completed
        await mon.wait_for_sample()
        await mon.wait_for_sample()
        assert mon.rounds_completed >= rounds + 2
    finally:
        await mon.stop()
    primary = f"{topo_cluster.primary.host}:{topo_cluster.primary.port}"
    assert seen and seen[0]["version"] == 1 and seen[0]["primary"] == primary
    # Called on changes (primary found, replicas eligible), not on every round.
    assert len(seen) < mon.rounds_completed
    assert seen[-1]["primary"] == primary and all(
        n["eligible"] for n in seen[-1]["nodes"] if n["role"] == "replica"
    )
    with pytest.raises(RuntimeError):
        await mon.wait_for_sample(timeout=1.0)
    # The server side goes away with the connections (a backend exits after the client's
    # Terminate; poll, since that is asynchronous to close()).
    sql = f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{APPLICATION_NAME}'"
    deadline = time.monotonic() + 5.0
    while (count := await psql(topo_cluster, sql)) != "0":
        assert time.monotonic() < deadline, f"{count} monitoring connections left"


async def test_failover_to_promoted_replica(topo_cluster, monitor):
    old_primary, (follower, promoted) = topo_cluster.primary, topo_cluster.replicas
    await until(monitor, all_eligible(topo_cluster), timeout=3.0)
    version = monitor.topology.version

    # Promoted while the old primary still runs: a split brain; the incumbent stays.
    await asyncio.to_thread(promoted.promote)
    topology = await monitor.wait_for_sample(timeout=3.0)
    node = state(topology, promoted)
    assert topology.primary is state(topology, old_primary) and topology.version == version
    assert not node.healthy and node.last_error == SECOND_PRIMARY and not node.eligible

    # The old primary dies: the promoted node takes over within a round or two.
    await asyncio.to_thread(old_primary.stop, "immediate")
    took = await until(monitor, lambda t: t.primary is state(t, promoted), timeout=5.0)
    assert took <= 2 * INTERVAL + SLACK, took
    topology = monitor.topology
    assert topology.version == version + 1
    assert node.healthy and node.role is Role.PRIMARY and node.last_error is None
    old = state(topology, old_primary)
    assert not old.healthy and old.role is Role.UNKNOWN
    assert state(topology, follower).role is Role.REPLICA

    # The new primary takes writes, and its WAL position is what replicas are measured against.
    conn = await asyncpg.connect(host=promoted.host, port=promoted.port, user="postgres")
    try:
        lsn_before = topology.primary_lsn
        await conn.execute("INSERT INTO ticks DEFAULT VALUES")
    finally:
        await conn.close()
    await until(monitor, lambda t: t.primary_lsn > lsn_before, timeout=3.0)
