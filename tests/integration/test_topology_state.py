"""ClusterTopology rules with plain values: no servers, no clock (times are given)."""

from __future__ import annotations

import math
from collections import Counter
from random import Random

import pytest

from router.config import ClusterConfig, NodeAddress
from router.topology import (
    SECOND_PRIMARY,
    ClusterTopology,
    Role,
    TopologyMonitor,
    format_lsn,
    parse_lsn,
)
from router.topology.lsn import replay_target

P, R1, R2 = ("10.0.0.1", 5432), ("10.0.0.2", 5432), ("10.0.0.3", 5432)
T0 = 1_700_000_000.0  # an epoch time; samples below are offsets from it


def make(**kwargs) -> ClusterTopology:
    kwargs.setdefault("max_lag_seconds", 1.0)
    kwargs.setdefault("max_lag_bytes", 1000)
    return ClusterTopology([P, R1, R2], **kwargs)


def replica(topo, addr, replay_lsn, at, *, replay_ts=None, paused=False):
    topo.apply_replica_sample(addr, True, replay_lsn, replay_ts, paused, T0 + at)


def settle(topo, lsn=100, at=0.0, rounds=None):
    """Discover P as primary and bring both replicas to eligibility, caught up at `lsn`."""
    if topo.designated_primary is None:
        topo.apply_replica_sample(P, False, lsn, None, False, T0 + at)
    for i in range(rounds or topo.recover_after):
        t = at + i * 0.25
        topo.apply_primary_sample(lsn, False, T0 + t)
        replica(topo, R1, lsn, t, replay_ts=T0 + at)
        replica(topo, R2, lsn, t, replay_ts=T0 + at)
    return at + (rounds or topo.recover_after) * 0.25


# -- LSNs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("0/0", 0),
        ("0/16B3748", 0x16B3748),
        ("16/B374D848", (0x16 << 32) + 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1),
        ("a/b", (10 << 32) + 11),
    ],
)
def test_lsn_round_trip(text, value):
    assert parse_lsn(text) == value
    assert format_lsn(value) == text.upper()


@pytest.mark.parametrize(
    "text", ["", "0", "0/", "/0", "x/0", "+1/0", "1/-1", "1_0/0", "123456789/0"]
)
def test_lsn_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_lsn(text)


@pytest.mark.parametrize(
    "insert, offset, target",
    [
        ("0/3000028", 0x28, "0/3000000"),  # a new segment after a WAL switch: long header
        ("1/A0000028", 0x28, "1/A0000000"),
        ("0/3002018", 0x2018, "0/3002000"),  # the last record filled its page: short header
        ("0/3002030", 0x2030, "0/3002030"),  # a record ends there: as it is
        ("0/3000050", 0x50, "0/3000050"),
        ("0/3002028", 0x2028, "0/3002028"),  # +40 on a page that is not a segment's first
    ],
)
def test_replay_target_takes_a_page_header_off(insert, offset, target):
    """A replica that has replayed everything stops at the page boundary, not past the next
    page's header where the primary's insert position points."""
    assert format_lsn(replay_target(parse_lsn(insert), offset, 8192)) == target



# -- discovery and eligibility ---------------------------------------------------------


def test_nodes_from_addresses_and_tuples():
    topo = ClusterTopology([NodeAddress(host="h", port=1), ("h", 2)])
    assert [n.address for n in topo.nodes] == [("h", 1), ("h", 2)]
    assert topo.node("h", 2).role is Role.UNKNOWN and not topo.node("h", 2).healthy
    with pytest.raises(ValueError):
        ClusterTopology([("h", 1), ("h", 1)])


def test_monitor_for_cluster_config_lists_the_primary_first():
    config = ClusterConfig(
        primary=NodeAddress(host="p", port=1),
        replicas=[NodeAddress(host="r", port=2), NodeAddress(host="r", port=3)],
    )
    monitor = TopologyMonitor.for_cluster(config, max_lag_seconds=0.5, down_after=2)
    topo = monitor.topology
    assert [n.address for n in topo.nodes] == [("p", 1), ("r", 2), ("r", 3)]
    assert (topo.max_lag_seconds, topo.down_after, topo.primary) == (0.5, 2, None)


def test_first_node_out_of_recovery_becomes_primary():
    topo = make()
    assert topo.primary is None and topo.version == 0
    replica(topo, R1, 50, 0.0)
    topo.apply_replica_sample(P, False, 100, None, False, T0)
    assert topo.primary is topo.node(*P) and topo.primary.role is Role.PRIMARY
    assert topo.version == 1 and topo.primary_lsn == 100
    assert topo.node(*R1).role is Role.REPLICA and not topo.node(*R1).eligible


def test_replicas_earn_eligibility_after_recover_after_samples():
    topo = make(recover_after=3)
    topo.apply_replica_sample(P, False, 100, None, False, T0)
    for i in range(3):
        assert topo.eligible_replicas() == []
        replica(topo, R1, 100, i * 0.25)
    r1 = topo.node(*R1)
    assert topo.eligible_replicas() == [r1]
    assert (r1.lag_bytes, r1.lag_seconds, r1.healthy) == (0, 0.0, True)
    assert not topo.node(*P).eligible  # the primary is never in the replica list


def test_lag_is_zero_when_replayed_past_the_primary_sample():
    topo = make()
    settle(topo, lsn=100)
    topo.apply_primary_sample(200, False, T0 + 10)
    replica(topo, R1, 250, 10.1, replay_ts=T0 + 2)  # sampled a moment later: ahead is caught up
    r1 = topo.node(*R1)
    assert (r1.lag_bytes, r1.lag_seconds) == (0, 0.0)
    assert r1.caught_up_at == T0 + 10  # the primary sample's time, not the replica's


def test_lag_counts_from_the_later_of_replay_time_and_last_caught_up():
    topo = make(max_lag_seconds=100, max_lag_bytes=None)
    settle(topo, lsn=100)  # caught up at T0 + 0.5, last commit replayed at T0
    # The primary was idle for a long time; the replica kept up (caught_up_at moves on).
    topo.apply_primary_sample(100, False, T0 + 60)
    replica(topo, R1, 100, 60, replay_ts=T0)
    # The first write in a minute: the replay timestamp alone would say 60 s behind.
    topo.apply_primary_sample(180, False, T0 + 60.25)
    replica(topo, R1, 120, 60.3, replay_ts=T0)
    r1 = topo.node(*R1)
    assert r1.lag_bytes == 60
    assert r1.lag_seconds == pytest.approx(0.3)
    # A later replayed commit is the better bound once there is one.
    topo.apply_primary_sample(300, False, T0 + 61)
    replica(topo, R1, 250, 61, replay_ts=T0 + 60.9)
    assert r1.lag_bytes == 50 and r1.lag_seconds == pytest.approx(0.1)


def test_behind_with_no_replay_timestamp_and_never_caught_up_is_infinitely_lagging():
    topo = make()
    topo.apply_replica_sample(P, False, 500, None, False, T0)
    replica(topo, R1, 400, 0.0, replay_ts=None)
    r1 = topo.node(*R1)
    assert r1.lag_seconds == math.inf and r1.lag_bytes == 100
    assert not r1.eligible


def test_no_primary_sample_yet_means_no_lag_and_no_eligibility():
    topo = make(recover_after=1)
    replica(topo, R1, 400, 0.0, replay_ts=T0)
    r1 = topo.node(*R1)
    assert r1.healthy and r1.lag_seconds is None and not r1.eligible


def test_over_the_seconds_limit_is_ineligible_at_once():
    topo = make()
    t = settle(topo, lsn=100)
    topo.apply_primary_sample(200, False, T0 + t)
    replica(topo, R1, 150, t + 1.01, replay_ts=T0 + t)
    assert not topo.node(*R1).eligible
    assert topo.eligible_replicas() == [topo.node(*R2)]


def test_over_the_bytes_limit_is_ineligible_at_once():
    topo = make(max_lag_bytes=1000)
    t = settle(topo, lsn=100)
    topo.apply_primary_sample(2000, False, T0 + t)
    replica(topo, R1, 999, t + 0.01, replay_ts=T0 + t)
    r1 = topo.node(*R1)
    assert r1.lag_bytes == 1001 and r1.lag_seconds < 0.1 and not r1.eligible


def test_between_the_return_band_and_the_limit_stays_where_it_is():
    topo = make(max_lag_seconds=1.0, max_lag_bytes=None, recover_after=2)
    t = settle(topo, lsn=100)
    r1 = topo.node(*R1)
    # 0.8 s behind: under the limit, so an eligible replica stays eligible...
    topo.apply_primary_sample(200, False, T0 + t)
    replica(topo, R1, 150, t + 0.8, replay_ts=T0 + t)
    assert r1.eligible and r1.lag_seconds == pytest.approx(0.8)
    # ...over it: out.
    replica(topo, R1, 150, t + 1.2, replay_ts=T0 + t)
    assert not r1.eligible
    # 0.8 s again: not under 50%, so it does not come back, however many times.
    for i in range(5):
        topo.apply_primary_sample(300 + i, False, T0 + t + 2 + i)
        replica(topo, R1, 299 + i, t + 2.8 + i, replay_ts=T0 + t + 2 + i)
        assert r1.lag_seconds == pytest.approx(0.8) and not r1.eligible
    # Under 50% resets nothing by itself: it takes recover_after samples in a row...
    replica(topo, R1, 1000, t + 8)
    assert not r1.eligible and r1.good_samples == 1
    # ...and one bad sample in between starts the count again.
    topo.apply_primary_sample(2000, False, T0 + t + 8)
    replica(topo, R1, 1999, t + 9, replay_ts=T0 + t + 8)  # 1 s: over the band
    assert r1.good_samples == 0
    replica(topo, R1, 2000, t + 9.1)
    replica(topo, R1, 2000, t + 9.2)
    assert r1.eligible


def test_paused_replica_ages_out_like_any_other():
    topo = make(max_lag_seconds=0.5, max_lag_bytes=None)
    t = settle(topo, lsn=100)
    r1 = topo.node(*R1)
    for i in range(1, 5):  # the primary writes on; R1 is paused at 100, R2 keeps up
        now = t + i * 0.25
        topo.apply_primary_sample(100 + i * 10, False, T0 + now)
        replica(topo, R1, 100, now, replay_ts=T0, paused=True)
        replica(topo, R2, 100 + i * 10, now, replay_ts=T0 + now)
    assert (
        r1.replay_paused and r1.lag_seconds == pytest.approx(1.25) and not r1.eligible
    )  # since T0+0.5
    assert topo.eligible_replicas() == [topo.node(*R2)]


def test_tenant_limits_only_narrow():
    topo = make(max_lag_seconds=1.0, max_lag_bytes=None)
    t = settle(topo, lsn=100)
    topo.apply_primary_sample(200, False, T0 + t)
    replica(topo, R1, 150, t + 0.3, replay_ts=T0 + t)
    replica(topo, R2, 200, t + 0.3)
    r1, r2 = topo.node(*R1), topo.node(*R2)
    assert topo.eligible_replicas() == [r1, r2]
    assert topo.eligible_replicas(max_lag_seconds=0.1) == [r2]
    assert topo.eligible_replicas(max_lag_bytes=10) == [r2]
    assert topo.eligible_replicas(max_lag_seconds=5.0) == [r1, r2]


# -- health -----------------------------------------------------------------------------


def test_refused_connection_is_down_at_once_and_returns_after_the_streak():
    topo = make(recover_after=3)
    t = settle(topo, lsn=100)
    r1 = topo.node(*R1)
    topo.mark_failure(R1, "ConnectionRefusedError: refused", refused=True)
    assert not r1.healthy and not r1.eligible and r1.consecutive_failures == 1
    assert r1.last_error == "ConnectionRefusedError: refused"
    topo.apply_primary_sample(100, False, T0 + t)
    replica(topo, R1, 100, t)
    assert r1.healthy and r1.last_error is None and r1.consecutive_failures == 0
    assert not r1.eligible  # healthy again, but reads wait for the streak
    replica(topo, R1, 100, t + 0.25)
    replica(topo, R1, 100, t + 0.5)
    assert r1.eligible


def test_other_failures_mark_down_after_down_after_in_a_row():
    topo = make(down_after=3)
    t = settle(topo, lsn=100)
    r1 = topo.node(*R1)
    topo.mark_failure(R1, "TimeoutError: no answer")
    topo.mark_failure(R1, "TimeoutError: no answer")
    assert r1.healthy and r1.eligible  # a blip or two: keep it
    replica(topo, R1, 100, t)
    topo.mark_failure(R1, "TimeoutError: no answer")
    topo.mark_failure(R1, "TimeoutError: no answer")
    assert r1.healthy  # the success in between reset the count
    topo.mark_failure(R1, "TimeoutError: no answer")
    assert not r1.healthy and not r1.eligible and r1.consecutive_failures == 3


def test_a_failure_resets_a_replicas_streak():
    topo = make(recover_after=3)
    topo.apply_replica_sample(P, False, 100, None, False, T0)
    replica(topo, R1, 100, 0.0)
    replica(topo, R1, 100, 0.25)
    topo.mark_failure(R1, "TimeoutError: no answer")
    replica(topo, R1, 100, 0.5)
    assert topo.node(*R1).good_samples == 1 and not topo.node(*R1).eligible


def test_primary_down_keeps_its_designation_and_last_lsn():
    topo = make()
    t = settle(topo, lsn=100)
    p = topo.node(*P)
    topo.mark_failure(P, "refused", refused=True)
    assert topo.primary is None and topo.designated_primary is p and topo.version == 1
    # Replicas that have what the primary last had stay readable while it is away.
    replica(topo, R1, 100, t + 5)
    assert topo.primary_lsn == 100 and topo.node(*R1).eligible
    topo.apply_primary_sample(120, False, T0 + t + 6)
    assert topo.primary is p and topo.version == 1  # no hysteresis for the primary


# -- failover ---------------------------------------------------------------------------


def test_promoted_replica_takes_over_when_the_primary_is_down():
    topo = make()
    t = settle(topo, lsn=100)
    p, r1, r2 = topo.node(*P), topo.node(*R1), topo.node(*R2)
    topo.mark_failure(P, "refused", refused=True)
    topo.apply_replica_sample(R2, False, 140, None, False, T0 + t)
    assert topo.primary is r2 and topo.version == 2 and topo.primary_lsn == 140
    assert r2.role is Role.PRIMARY and not r2.eligible and r2 not in topo.eligible_replicas()
    assert p.role is Role.UNKNOWN
    # The old primary comes back rebuilt as a standby: a replica like any other.
    replica(topo, P, 140, t + 1)
    assert p.role is Role.REPLICA and p.healthy and p.last_error is None
    # R1 still follows the dead primary and never reaches the new timeline's position.
    replica(topo, R1, 100, t + 1.5, replay_ts=T0)
    assert r1.lag_bytes == 40 and not r1.eligible


def test_old_primary_back_out_of_recovery_is_a_second_primary():
    topo = make()
    t = settle(topo, lsn=100)
    topo.mark_failure(P, "refused", refused=True)
    topo.apply_replica_sample(R2, False, 140, None, False, T0 + t)
    topo.apply_primary_sample(160, False, T0 + t + 1)  # R2's sample: it is the designated one now
    topo.apply_replica_sample(P, False, 150, None, False, T0 + t + 1)
    p = topo.node(*P)
    assert topo.primary is topo.node(*R2) and topo.version == 2
    assert not p.healthy and p.last_error == SECOND_PRIMARY and p.role is Role.UNKNOWN
    assert topo.primary_lsn == 160  # the impostor's position is not the cluster's


def test_promotion_while_the_primary_is_healthy_waits_until_it_is_down():
    topo = make(down_after=2)
    t = settle(topo, lsn=100)
    r2 = topo.node(*R2)
    topo.apply_primary_sample(100, False, T0 + t)
    topo.apply_replica_sample(R2, False, 120, None, False, T0 + t)
    assert topo.primary is topo.node(*P) and topo.version == 1
    assert not r2.healthy and r2.last_error == SECOND_PRIMARY and r2 not in topo.eligible_replicas()
    topo.mark_failure(P, "TimeoutError: no answer")
    topo.apply_replica_sample(R2, False, 120, None, False, T0 + t + 0.25)
    assert topo.primary is topo.node(*P)  # one timeout is not down
    topo.mark_failure(P, "TimeoutError: no answer")
    topo.apply_replica_sample(R2, False, 125, None, False, T0 + t + 0.5)
    assert topo.primary is r2 and r2.healthy and r2.last_error is None and topo.version == 2


def test_demoted_primary_leaves_no_primary_until_one_is_promoted():
    topo = make()
    t = settle(topo, lsn=100)
    p = topo.node(*P)
    topo.apply_primary_sample(100, True, T0 + t)
    assert topo.primary is None and topo.designated_primary is None and topo.version == 2
    assert p.role is Role.REPLICA and p.healthy
    with pytest.raises(LookupError):
        topo.apply_primary_sample(100, False, T0 + t)
    topo.apply_replica_sample(R1, False, 110, None, False, T0 + t + 1)
    assert topo.primary is topo.node(*R1) and topo.version == 3


def test_samples_go_to_the_right_method():
    topo = make()
    settle(topo)
    with pytest.raises(ValueError):
        topo.apply_replica_sample(P, False, 1, None, False, T0)
    with pytest.raises(KeyError):
        topo.mark_failure(("elsewhere", 1), "x")


# -- picking a replica ------------------------------------------------------------------


def test_pick_prefers_fewest_in_flight():
    topo = make()
    settle(topo)
    r1, r2 = topo.node(*R1), topo.node(*R2)
    rng = Random(1)
    topo.transaction_started(r1)
    assert all(topo.pick_replica(rng) is r2 for _ in range(20))
    topo.transaction_started(r2)
    topo.transaction_started(r2)
    assert topo.pick_replica(rng) is r1
    topo.transaction_finished(r2)
    topo.transaction_finished(r2)
    topo.transaction_finished(r1)
    assert (r1.in_flight, r2.in_flight) == (0, 0)
    with pytest.raises(ValueError):
        topo.transaction_finished(r1)


def test_pick_breaks_ties_at_random():
    topo = make()
    settle(topo)
    rng = Random(7)
    picks = Counter(topo.pick_replica(rng).address for _ in range(1000))
    assert set(picks) == {R1, R2} and 400 < picks[R1] < 600


def test_pick_follows_weights():
    topo = make()
    settle(topo)
    r1, r2 = topo.node(*R1), topo.node(*R2)
    r1.weight = 3.0
    rng = Random(3)
    picks = Counter(topo.pick_replica(rng).address for _ in range(2000))
    assert 1350 < picks[R1] < 1650  # idle: shared by weight, 3:1
    # Under load: in_flight / weight. R1 at 3 in flight (1.0) loses to R2 at 0...
    r1.in_flight = 3
    assert all(topo.pick_replica(rng) is r2 for _ in range(20))
    # ...R1 at 2 (0.67) wins over R2 at 1 (1.0).
    r1.in_flight, r2.in_flight = 2, 1
    assert all(topo.pick_replica(rng) is r1 for _ in range(20))
    r1.in_flight = r2.in_flight = 0
    r2.weight = 0  # drained
    assert all(topo.pick_replica(rng) is r1 for _ in range(20))


def test_pick_with_min_replay_lsn_and_none_left():
    topo = make(max_lag_bytes=None)
    t = settle(topo, lsn=100)
    topo.apply_primary_sample(300, False, T0 + t)
    replica(topo, R1, 250, t + 0.1, replay_ts=T0 + t)
    replica(topo, R2, 300, t + 0.1)
    rng = Random(0)
    r2 = topo.node(*R2)
    topo.transaction_started(r2)  # busier, but the only one far enough
    assert topo.pick_replica(rng, min_replay_lsn=260) is r2
    assert topo.pick_replica(rng, min_replay_lsn=300) is r2
    assert topo.pick_replica(rng, min_replay_lsn=301) is None
    assert topo.pick_replica(rng, max_lag_seconds=0.01) is r2
    topo.mark_failure(R2, "refused", refused=True)
    topo.mark_failure(R1, "refused", refused=True)
    assert topo.pick_replica(rng) is None
