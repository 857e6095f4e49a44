"""Per-cluster node states: which node is primary, which replicas may serve reads, how far behind.

Pure: the monitor (monitor.py) feeds samples in, the router reads answers out. Nothing here does
I/O or reads the clock; every rule below is tested with plain values in
tests/integration/test_topology_state.py.

Lag. Each replica sample is compared with the last primary sample:
  lag_bytes   = primary_lsn - replay_lsn, floored at 0.
  lag_seconds = 0 when replay_lsn >= primary_lsn (it has replayed everything the primary had when
                sampled); otherwise now - T, where T is the later of
                  - pg_last_xact_replay_timestamp() (commit time of the last replayed transaction:
                    everything it has not replayed was committed after that), and
                  - caught_up_at, the primary sample time of the last round in which the replica
                    was caught up (everything it lacks was written after that).
                Both are upper bounds of the true lag, so their minimum is too. The second one is
                why a replica of an idle primary does not look an hour behind the moment the
                first write in an hour lands: the replay timestamp alone would say so.
                With neither known (no transaction replayed since the replica started, never seen
                caught up) a replica that is behind counts as infinitely lagging.
  The replay timestamp comes from the primary's clock, `now` from the monitor's: clock skew
  between the hosts adds to (or hides) lag, and negative results are floored at 0.
  A paused replica (pg_wal_replay_pause) follows the same rules: once the primary moves on, its
  timestamps age and it goes over the limit like any other laggard.

Hysteresis (eligibility for reads). A replica over either limit (lag_seconds > max_lag_seconds or
lag_bytes > max_lag_bytes) loses eligibility on that sample. To get it back it needs
`recover_after` consecutive samples (default 3) at or under `return_ratio` (default 50%) of both
limits. Both parts are needed: the band alone lets a replica that is bursty (caught up one sample,
two seconds behind the next, as during replay of a large transaction or a lock conflict) flip on
every sample, and the count alone lets a replica hovering around the limit flip at its edge. The
same streak is asked of a new replica and of one coming back from down, so a node in a crash loop
that answers one check between crashes never receives reads.

Health. A check that fails increments consecutive_failures; `down_after` (default 3) failures in a
row mark the node down (healthy=False). A refused connection (nothing listens, or the server
answers 57P03 "starting up / shutting down") marks it down at once: that is a definite answer, not
a timeout that may be a blip, and waiting `down_after` rounds would route reads to a dead node for
most of a second. The first successful check makes a node healthy again; for a replica,
eligibility then follows the hysteresis above. The primary has no hysteresis: there is no
alternative to send writes to, so it serves as soon as it answers.

Failover. `primary` is the designated primary node while it is healthy, else None (the router then
fails writes with a retryable error). The designation changes, and `version` is bumped, when:
  - the designated primary reports pg_is_in_recovery() = true (restarted as a standby): it becomes
    a replica and no node is primary until one reports in_recovery = false;
  - another node reports in_recovery = false (promoted) while the designated primary is down or
    there is none: that node becomes primary. The old primary's role becomes UNKNOWN; if it later
    answers in recovery it is a replica.
A node reporting in_recovery = false while the designated primary is healthy is a split brain
(typically the old primary restarted without being rebuilt as a standby, or a promotion before the
old primary failed). We keep the current primary, which the router's connections already use, and
mark the other unhealthy with last_error = "second primary"; an operator has to resolve it. If the
current primary later goes down, the second one takes over through the rule above. Comparing
timelines or LSNs could pick the "right" one automatically but also flips writes between two
diverged histories on a flapping network; keeping the incumbent is the conservative choice.
A merely unreachable primary keeps its designation (primary is None while it is down, version
unchanged): it most likely comes back as itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from random import Random
from typing import Any, Protocol

SECOND_PRIMARY = "second primary"

# Relative tolerance when comparing weighted loads (in_flight / weight) in pick_replica: equal
# weights tie exactly anyway; this only absorbs float rounding with unequal ones.
_LOAD_TIE_TOLERANCE = 1e-9


class Role(StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"
    UNKNOWN = "unknown"


class Address(Protocol):
    host: str
    port: int


@dataclass(eq=False, slots=True)
class NodeState:
    """One node as last observed. Identity matters (eq=False): the router keeps references and
    pools by node, and the objects live as long as the topology."""

    host: str
    port: int
    role: Role = Role.UNKNOWN
    healthy: bool = False  # unknown until the first check answers
    in_recovery: bool | None = None
    replay_lsn: int | None = None  # replicas only; the primary's position is primary_lsn
    last_replay_ts: float | None = None  # pg_last_xact_replay_timestamp(), epoch seconds
    replay_paused: bool = False
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    eligible: bool = False  # may serve reads (replicas only)
    consecutive_failures: int = 0
    last_error: str | None = None
    in_flight: int = 0  # transactions running there, counted by the router
    weight: float = 1.0  # share of reads relative to other replicas; 0 drains the node
    good_samples: int = 0  # consecutive samples within the return band (hysteresis)
    caught_up_at: float | None = None  # primary sample time when last seen caught up

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def status(self) -> dict[str, Any]:
        """What the admin views show of it (GET /topology, a tenant's status, SHOW NODES)."""
        return {
            "host": self.host, "port": self.port, "role": str(self.role), "healthy": self.healthy,
            "eligible": self.eligible, "lag_bytes": self.lag_bytes, "lag_seconds": self.lag_seconds,
            "in_flight": self.in_flight, "last_error": self.last_error,
        }  # fmt: skip


class ClusterTopology:
    """The nodes of one cluster, the designated primary, and the read-eligibility rules."""

    def __init__(
        self,
        nodes: Iterable[Address | tuple[str, int]],
        *,
        max_lag_seconds: float = 1.0,
        max_lag_bytes: int | None = None,
        down_after: int = 3,
        recover_after: int = 3,
        return_ratio: float = 0.5,
    ) -> None:
        if max_lag_seconds < 0 or (max_lag_bytes is not None and max_lag_bytes < 0):
            raise ValueError("lag limits must be >= 0")
        if down_after < 1 or recover_after < 1:
            raise ValueError("down_after and recover_after must be >= 1")
        if not 0 <= return_ratio <= 1:
            raise ValueError("return_ratio must be within [0, 1]")
        self.nodes: list[NodeState] = []
        self._by_address: dict[tuple[str, int], NodeState] = {}
        for item in nodes:
            host, port = item if isinstance(item, tuple) else (item.host, item.port)
            if (host, port) in self._by_address:
                raise ValueError(f"node {host}:{port} listed twice")
            state = NodeState(host, port)
            self.nodes.append(state)
            self._by_address[state.address] = state
        if not self.nodes:
            raise ValueError("a cluster needs at least one node")
        self.max_lag_seconds = max_lag_seconds
        self.max_lag_bytes = max_lag_bytes
        self.down_after = down_after
        self.recover_after = recover_after
        self.return_ratio = return_ratio
        self.version = 0  # bumped whenever the designated primary changes (including to none)
        self.primary_lsn: int | None = None  # last sampled; kept while the primary is down
        self.primary_sampled_at: float | None = None
        # pg_current_wal_insert_lsn() at the last primary sample: read-your-writes tokens.
        self.primary_insert_lsn: int | None = None
        self._designated: NodeState | None = None

    # -- reading ------------------------------------------------------------------------

    @property
    def primary(self) -> NodeState | None:
        """The node to send writes to, or None while there is none or it is down."""
        node = self._designated
        return node if node is not None and node.healthy else None

    @property
    def designated_primary(self) -> NodeState | None:
        """The primary even while it is unreachable (samples from it go to apply_primary_sample)."""
        return self._designated

    @property
    def replicas(self) -> list[NodeState]:
        return [n for n in self.nodes if n.role is Role.REPLICA]

    def node(self, host: str, port: int) -> NodeState:
        return self._by_address[(host, port)]

    def eligible_replicas(
        self, max_lag_seconds: float | None = None, max_lag_bytes: int | None = None
    ) -> list[NodeState]:
        """Replicas that may serve reads. The arguments (a tenant's own limits) can only narrow
        the cluster's: they filter the latest sample, without hysteresis of their own, because
        hysteresis needs memory per limit and the cluster's limits already damp flapping."""
        return [
            n
            for n in self.nodes
            if n.eligible
            and n.role is Role.REPLICA
            and (max_lag_seconds is None or _le(n.lag_seconds, max_lag_seconds))
            and (max_lag_bytes is None or _le(n.lag_bytes, max_lag_bytes))
        ]

    def pick_replica(
        self,
        rng: Random,
        min_replay_lsn: int | None = None,
        *,
        max_lag_seconds: float | None = None,
        max_lag_bytes: int | None = None,
    ) -> NodeState | None:
        """The eligible replica with the least weighted load, in_flight / weight (weighted least
        connections): plain fewest-in_flight when weights are equal, and in-flight counts in
        proportion to the weights under load. Ties, which include every idle moment, go to a
        random choice weighted by `weight`, so weights also share out sequential traffic.
        `min_replay_lsn` (read-your-writes) keeps only replicas that have replayed that far.
        None when no replica qualifies: the router then falls back to the primary."""
        candidates = [
            n
            for n in self.eligible_replicas(max_lag_seconds, max_lag_bytes)
            if n.weight > 0
            and (
                min_replay_lsn is None
                or (n.replay_lsn is not None and n.replay_lsn >= min_replay_lsn)
            )
        ]
        if not candidates:
            return None
        loads = [n.in_flight / n.weight for n in candidates]
        best = min(loads)
        tied = [
            n
            for n, load in zip(candidates, loads, strict=True)
            if math.isclose(load, best, rel_tol=_LOAD_TIE_TOLERANCE)
        ]
        if len(tied) == 1:
            return tied[0]
        point = rng.random() * sum(n.weight for n in tied)
        for node in tied:
            point -= node.weight
            if point < 0:
                return node
        return tied[-1]  # float rounding left `point` at exactly 0

    def describe(self) -> dict[str, Any]:
        """A JSON-ready picture, for logs and the admin API."""
        primary = self.primary
        return {
            "version": self.version,
            "primary": f"{primary.host}:{primary.port}" if primary else None,
            "primary_lsn": self.primary_lsn,
            "nodes": [n.as_dict() for n in self.nodes],
        }

    # -- in-flight accounting (called by the router) ------------------------------------

    def transaction_started(self, node: NodeState) -> None:
        node.in_flight += 1

    def transaction_finished(self, node: NodeState) -> None:
        if node.in_flight <= 0:
            raise ValueError(f"{node.host}:{node.port}: transaction_finished without a start")
        node.in_flight -= 1

    # -- samples (called by the monitor) ------------------------------------------------

    def apply_primary_sample(
        self,
        lsn: int | None,
        in_recovery: bool,
        now: float | None = None,
        *,
        insert_lsn: int | None = None,
    ) -> None:
        """A successful check of the designated primary: its current WAL position, or (when
        in_recovery) the news that it has become a standby. `now` is the sample's epoch time."""
        node = self._designated
        if node is None:
            raise LookupError("no designated primary; report nodes with apply_replica_sample")
        self._answered(node)
        if in_recovery:
            # Demoted (restarted as a standby). Its replica fields arrive with its next sample.
            self._set_designated(None)
            self._become_replica(node)
            return
        node.role = Role.PRIMARY
        node.in_recovery = False
        if lsn is not None:
            self.primary_lsn = lsn
            self.primary_sampled_at = now
        if insert_lsn is not None:
            self.primary_insert_lsn = insert_lsn

    def apply_replica_sample(
        self,
        node: NodeState | tuple[str, int],
        in_recovery: bool,
        replay_lsn: int | None,
        replay_ts: float | None,
        paused: bool,
        now: float,
    ) -> None:
        """A successful check of any node but the designated primary. A node not in recovery is
        claiming to be primary, and `replay_lsn` is then its current WAL position."""
        node = self._resolve(node)
        if node is self._designated:
            raise ValueError("samples of the designated primary go to apply_primary_sample")
        node.consecutive_failures = 0
        if not in_recovery:
            self._claim_primary(node, replay_lsn, now)
            return
        self._answered(node)
        if node.role is not Role.REPLICA:
            self._become_replica(node)
        node.replay_lsn = replay_lsn
        node.last_replay_ts = replay_ts
        node.replay_paused = paused
        self._measure_lag(node, now)
        self._update_eligibility(node)

    def mark_failure(
        self, node: NodeState | tuple[str, int], error: str, *, refused: bool = False
    ) -> None:
        """A failed check. `refused`: the connection was refused outright (see module docstring)."""
        node = self._resolve(node)
        node.consecutive_failures += 1
        node.last_error = error
        node.good_samples = 0
        if refused or node.consecutive_failures >= self.down_after:
            node.healthy = False
            node.eligible = False

    # -- rules --------------------------------------------------------------------------

    def _resolve(self, node: NodeState | tuple[str, int]) -> NodeState:
        state = self._by_address[node] if isinstance(node, tuple) else node
        if self._by_address.get(state.address) is not state:
            raise ValueError(f"{state.host}:{state.port} is not a node of this cluster")
        return state

    @staticmethod
    def _answered(node: NodeState) -> None:
        node.healthy = True
        node.consecutive_failures = 0
        node.last_error = None

    def _set_designated(self, node: NodeState | None) -> None:
        if node is not self._designated:
            self._designated = node
            self.version += 1

    @staticmethod
    def _become_replica(node: NodeState) -> None:
        node.role = Role.REPLICA
        node.in_recovery = True
        node.eligible = False
        node.good_samples = 0
        node.lag_bytes = node.lag_seconds = None

    def _claim_primary(self, node: NodeState, lsn: int | None, now: float) -> None:
        current = self._designated
        node.in_recovery = False
        node.replay_lsn = node.last_replay_ts = None
        node.replay_paused = False
        node.eligible = False
        node.good_samples = 0
        if current is not None and current.healthy:
            node.role = Role.UNKNOWN
            node.healthy = False
            node.last_error = SECOND_PRIMARY
            node.lag_bytes = node.lag_seconds = None
            return
        if current is not None:
            current.role = Role.UNKNOWN  # down; what it is when it returns, its sample will say
            current.eligible = False
        self._answered(node)
        node.role = Role.PRIMARY
        node.lag_bytes, node.lag_seconds = 0, 0.0
        self._set_designated(node)
        if lsn is not None:
            self.primary_lsn = lsn
            self.primary_sampled_at = now

    def _measure_lag(self, node: NodeState, now: float) -> None:
        primary_lsn, replay_lsn = self.primary_lsn, node.replay_lsn
        if primary_lsn is None or replay_lsn is None:
            node.lag_bytes = node.lag_seconds = None  # cannot judge yet: not eligible
            return
        if replay_lsn >= primary_lsn:
            node.lag_bytes, node.lag_seconds = 0, 0.0
            sampled_at = self.primary_sampled_at if self.primary_sampled_at is not None else now
            node.caught_up_at = max(node.caught_up_at or sampled_at, sampled_at)
            return
        node.lag_bytes = primary_lsn - replay_lsn
        known = [t for t in (node.last_replay_ts, node.caught_up_at) if t is not None]
        node.lag_seconds = max(0.0, now - max(known)) if known else math.inf

    def _within(self, node: NodeState, ratio: float) -> bool:
        if not node.healthy or node.role is not Role.REPLICA:
            return False
        if not _le(node.lag_seconds, self.max_lag_seconds * ratio):
            return False
        return self.max_lag_bytes is None or _le(node.lag_bytes, self.max_lag_bytes * ratio)

    def _update_eligibility(self, node: NodeState) -> None:
        if node.eligible:
            if not self._within(node, 1.0):
                node.eligible = False
                node.good_samples = 0
        elif self._within(node, self.return_ratio):
            node.good_samples += 1
            node.eligible = node.good_samples >= self.recover_after
        else:
            node.good_samples = 0


def _le(value: float | None, limit: float) -> bool:
    """value <= limit, where an unknown value never qualifies."""
    return value is not None and value <= limit
