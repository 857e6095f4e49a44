"""Read/write splitting for one cluster: which node serves a transaction once routing
(router/routing/route.py) has said primary or replica.

A ``SplitCluster`` exists for each configured cluster that has replicas. It owns the cluster's
``TopologyMonitor`` (router/topology/), picks replicas through its ``ClusterTopology``, applies
the fallback rules and keeps each session's read-your-writes token.

Read-your-writes (README): when a session's transaction that went to the primary for a write
ends, the session remembers the monitor's round counter. The token becomes an LSN when the
first round that *started after* the commit has completed: that round's primary sample of
pg_current_wal_insert_lsn() includes the commit record. Until then the session reads from the
primary; afterwards only from replicas whose replay LSN has reached the token. No statement is
added to any transaction. With read_your_writes = tenant the same rule runs on a token shared
by the tenant's sessions (and worker processes): when it last wrote (router/causal.py).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from random import Random
from typing import TYPE_CHECKING

from router.causal import WriteTimes, client_slot
from router.config import ClusterConfig, ReadYourWrites, ReplicaAffinity, ReplicaFallback, Settings
from router.protocol.errors import RouterError, SQLState
from router.routing.route import RouteReason
from router.topology.cluster import NodeState, Role
from router.topology.monitor import TopologyMonitor

if TYPE_CHECKING:
    from router.frontend.client import ClientConnection

log = logging.getLogger("pgrouter.routing")


# Enum members as module constants: replica() runs for every routed read, and a member
# looked up on its class costs more than a global.
_RYW_SESSION = ReadYourWrites.SESSION
_RYW_TENANT = ReadYourWrites.TENANT
_AFFINITY_SESSION = ReplicaAffinity.SESSION

# How long start-up waits for replicas to become eligible (they need a few good samples).
STARTUP_WAIT = 3.0


class SplitCluster:
    def __init__(
        self, name: str, config: ClusterConfig, settings: Settings, ssl=False, write_times: WriteTimes | None = None
    ) -> None:
        self.name = name
        self.ssl = ssl  # asyncpg's ssl argument for the monitor and catalog connections
        self.config = config
        self.settings = settings
        user, password = config.monitor_user, config.monitor_password
        if user is None:
            for db in settings.databases.values():
                if db.cluster == name and db.server_user:
                    user, password = db.server_user, db.server_password
                    break
        self.monitor = TopologyMonitor.for_cluster(
            config,
            dbname=config.monitor_dbname,
            user=user or "postgres",
            password=password,
            ssl=ssl,
            max_lag_seconds=config.max_replica_lag,
            max_lag_bytes=config.max_replica_lag_bytes,
            lag_check_interval=settings.lag_check_interval,
            connect_timeout=min(2.0, settings.server_connect_timeout),
        )
        self.topology = self.monitor.topology
        for address in config.replicas:
            self.topology.node(address.host, address.port).weight = address.weight
        self.configured_primary = self.topology.node(config.primary.host, config.primary.port)
        self.rng = Random()
        # read_your_writes, unless a registry tenant sets its own (limits.read_your_writes).
        self.read_your_writes = settings.read_your_writes
        # Scope tenant: when each tenant last wrote (router/causal.py), and per slot the write
        # time and primary WAL position its reads last waited for. Scope session: each session
        # holds its own token (ClientConnection.ryw_*). A write notes both, so that a tenant's
        # PATCHed scope applies at once.
        self.write_times = write_times
        self.tenant_targets: dict[int, tuple[float, int | None]] = {}
        # (role, reason) of every routed transaction; fallbacks by reason.
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.fallbacks: Counter[str] = Counter()

    async def start(self) -> None:
        self.monitor.start()
        deadline = STARTUP_WAIT
        try:
            await self.monitor.wait_for_sample(timeout=deadline)
            for _ in range(self.topology.recover_after):
                if any(n.eligible for n in self.topology.nodes) or not any(
                    n.healthy for n in self.topology.replicas
                ):
                    break
                await self.monitor.wait_for_sample(timeout=deadline)
        except TimeoutError:
            log.warning("cluster %s: topology not known after %.0f s; starting anyway", self.name, deadline)

    async def stop(self) -> None:
        try:
            await self.monitor.stop()
        except Exception:  # already logged by the monitor
            pass

    # --- choosing nodes -------------------------------------------------------------------

    def primary(self) -> NodeState:
        node = self.topology.primary
        if node is not None:
            return node
        if self.monitor.rounds_completed == 0 and self.topology.version == 0:
            return self.configured_primary  # not checked yet: trust the configuration
        raise RouterError(
            SQLState.CANNOT_CONNECT_NOW,
            f'no primary available in cluster "{self.name}" (it is down or a failover is in progress)',
            severity="ERROR",
            hint="Retry the transaction: writes resume once a primary answers.",
        )

    def catalog_node(self) -> tuple[str, int]:
        """Where function catalogs of this cluster's databases are read (topology/catalog.py):
        the node the topology considers primary now, so that a failover moves the reads with it.

        Why the primary and not any reachable node, although a replica's pg_proc is a physical
        copy of it: a replica may lag, and a catalog reload is often asked for because a
        function was just created or altered (42883, or the refresh timer after a deploy); the
        primary is the one node certain to have it. While no primary answers (it is down, a
        failover is under way) the last one is named: the load fails, the catalog in use is
        kept and the load is retried soon (FunctionCatalogs' retry_interval). Nothing is lost
        meanwhile: without a primary nobody can change pg_proc. Before the first check the
        configured primary is trusted, as for writes (``primary()``).
        """
        node = self.topology.primary or self.topology.designated_primary or self.configured_primary
        return node.address

    def replica(self, client: ClientConnection) -> tuple[NodeState | None, RouteReason | None]:
        """An eligible replica for ``client``'s read, or (None, why not)."""
        tenant = client.tenant
        if tenant is None:
            max_lag = None
            affinity = self.config.replica_affinity
            scope = self.read_your_writes
        else:  # (tenants with the same nodes share the cluster, not these settings)
            limits = tenant.limits
            max_lag = limits.max_replica_lag
            affinity = limits.replica_affinity
            scope = limits.read_your_writes or self.read_your_writes
        min_lsn = None
        if scope is _RYW_SESSION:
            if client.ryw_round is not None:
                if self.monitor.rounds_completed <= client.ryw_round:
                    return None, RouteReason.READ_YOUR_WRITES
                if client.ryw_lsn is None:
                    client.ryw_lsn = self.topology.primary_insert_lsn
                min_lsn = client.ryw_lsn
        elif scope is _RYW_TENANT and self.write_times is not None:
            slot = client_slot(client)
            wrote_at = self.write_times.last(slot)
            if wrote_at:
                known = self.tenant_targets.get(slot)
                if known is not None and known[0] == wrote_at:
                    min_lsn = known[1]
                elif self.monitor.completed_round_started_at <= wrote_at:
                    return None, RouteReason.READ_YOUR_WRITES
                else:
                    min_lsn = self.topology.primary_insert_lsn
                    self.tenant_targets[slot] = (wrote_at, min_lsn)
        if affinity is _AFFINITY_SESSION:
            node = self._pick(min_lsn, max_lag, client.last_replica)
            client.last_replica = node
        else:
            node = self._pick(min_lsn, max_lag)
        if node is not None:
            return node, None
        if min_lsn is not None and self.topology.pick_replica(self.rng) is not None:
            return None, RouteReason.READ_YOUR_WRITES
        if any(n.healthy and n.role is Role.REPLICA for n in self.topology.nodes):
            return None, RouteReason.LAG_FALLBACK
        return None, RouteReason.NODE_DOWN_FALLBACK

    def _pick(
        self, min_lsn: int | None, max_lag: float | None = None, prefer: NodeState | None = None
    ) -> NodeState | None:
        """ClusterTopology.pick_replica's rule (weighted least in-flight, ties weighted-random)
        in one pass without lists: this runs for every routed read. ``prefer`` (replica_affinity
        = session: the client's last replica) wins the tie when it is among the least busy."""
        best = None
        best_load = 0.0
        tied_weight = 0.0
        kept = False
        for node in self.topology.nodes:
            weight = node.weight
            if not node.eligible or weight <= 0 or node.role is not Role.REPLICA:
                continue
            if min_lsn is not None and (node.replay_lsn is None or node.replay_lsn < min_lsn):
                continue
            if max_lag is not None and (node.lag_seconds is None or node.lag_seconds > max_lag):
                continue  # a tenant's own limit can only narrow the cluster's
            load = node.in_flight / weight
            if best is None or load < best_load:
                best, best_load, tied_weight = node, load, weight
                kept = node is prefer
            elif load == best_load:
                if kept:
                    continue
                if node is prefer:
                    best = node
                    kept = True
                    continue
                tied_weight += weight
                if self.rng.random() * tied_weight < weight:
                    best = node
        return best

    def fallback(self, reason: RouteReason, client: ClientConnection) -> None:
        """No replica for ``client``'s read: count it, and fail it if so configured (by the
        cluster, or the client's tenant)."""
        self.fallbacks[reason] += 1
        tenant = client.tenant
        setting = self.config.replica_fallback if tenant is None else tenant.limits.replica_fallback
        if reason is not RouteReason.READ_YOUR_WRITES and setting is ReplicaFallback.ERROR:
            what = "too far behind" if reason is RouteReason.LAG_FALLBACK else "down"
            if tenant is None:
                whose, setting_name = f'cluster "{self.name}"', "replica_fallback"
            else:
                whose, setting_name = f'tenant "{tenant.tenant_id}"', "the tenant's limits.replica_fallback"
            raise RouterError(
                SQLState.CANNOT_CONNECT_NOW,
                f"no replica of {whose} can serve reads: every replica is {what}",
                severity="ERROR",
                hint=f"{setting_name} = error is set; use primary to read from the primary instead.",
            )

    def node_failed(self, node: NodeState, error: str) -> None:
        """A server connection to ``node`` failed under a transaction: stop sending reads there
        until the monitor sees it healthy again (and hysteresis lets it back)."""
        if node.role is Role.REPLICA:
            self.topology.mark_failure(node, error, refused=True)

    def note_write(self, client: ClientConnection) -> None:
        """``client``'s transaction that wrote has ended (committed or not)."""
        tenant = client.tenant
        scope = self.read_your_writes if tenant is None else tenant.limits.read_your_writes or self.read_your_writes
        if scope is ReadYourWrites.OFF:
            return
        if self.write_times is not None:
            self.write_times.note(client_slot(client), time.monotonic())
        client.ryw_round = self.monitor.rounds_started
        client.ryw_lsn = None
