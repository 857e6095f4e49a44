"""SHOW STATS arithmetic (router/stats/traffic.py): periods, averages and the merge of several
workers' figures. No I/O: the counters are plain numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.stats.traffic import TOTALS, Traffic, TrafficRow, merge_rows


def _traffic(**values: float) -> Traffic:
    traffic = Traffic()
    for name, value in values.items():
        setattr(traffic, name, value)
    return traffic


def test_a_period_holds_what_grew_in_it_and_totals_keep_growing() -> None:
    traffic = _traffic(xact_count=10, query_count=30, received=1000, sent=5000, xact_time=0.5, query_time=0.3,
                       wait_time=0.1)  # fmt: skip
    traffic.close_period(60.0)
    assert traffic.period_delta == (10, 30, 1000, 5000, 0.5, 0.3, 0.1)
    traffic.xact_count += 2
    traffic.sent += 7
    traffic.close_period(61.0)
    assert traffic.period_delta == (2, 0, 0, 7, 0.0, 0.0, 0.0)
    assert traffic.period_seconds == 61.0
    assert traffic.totals() == (12, 30, 1000, 5007, 0.5, 0.3, 0.1)
    traffic.close_period(60.0)
    assert traffic.period_delta == (0,) * len(TOTALS)  # nothing happened: averages drop to 0


@pytest.mark.parametrize(
    ("delta", "seconds", "averages"),
    [
        # 120 transactions of 5 ms and 240 queries of 2 ms in 60 s; 3 s waited in all.
        ((120, 240, 6000, 60000, 0.6, 0.48, 3.0), 60.0, [2, 4, 100, 1000, 5000, 2000, 50000]),
        # Nothing in the period: zeros, not a division by zero.
        ((0, 0, 0, 0, 0.0, 0.0, 0.0), 60.0, [0, 0, 0, 0, 0, 0, 0]),
        # Queries but no transaction ended (one long transaction): its time is not averaged yet.
        ((0, 10, 100, 100, 0.0, 0.01, 0.0), 10.0, [0, 1, 10, 10, 0, 1000, 0]),
        # No period closed yet.
        ((5, 5, 5, 5, 1.0, 1.0, 1.0), 0.0, [0, 0, 0, 0, 0, 0, 0]),
    ],
)
def test_averages_are_per_second_and_per_transaction_or_query(delta, seconds, averages) -> None:
    assert TrafficRow("app", [0] * len(TOTALS), list(delta), seconds).average_columns() == averages


def test_totals_print_times_in_microseconds() -> None:
    row = TrafficRow("app", [3, 4, 100, 200, 0.0025, 0.001, 1.5], [0] * len(TOTALS), 0.0)
    assert row.total_columns() == [3, 4, 100, 200, 2500, 1000, 1500000]


def test_workers_figures_add_up_per_database() -> None:
    worker0 = [TrafficRow("app", [1, 2, 3, 4, 0.5, 0.25, 0.0], [1, 2, 3, 4, 0.5, 0.25, 0.0], 60.0),
               TrafficRow("other", [7, 7, 7, 7, 7.0, 7.0, 7.0], [0] * len(TOTALS), 60.0)]  # fmt: skip
    worker1 = [TrafficRow("app", [10, 20, 30, 40, 1.0, 1.0, 2.0], [1, 2, 3, 4, 1.5, 0.75, 2.0], 61.0)]
    merged = merge_rows([worker0, worker1])
    assert [row.database for row in merged] == ["app", "other"]
    app = merged[0]
    assert app.totals == [11, 22, 33, 44, 1.5, 1.25, 2.0]
    assert app.delta == [2, 4, 6, 8, 2.0, 1.0, 2.0]
    assert app.seconds == 61.0
    assert app.average_columns() == [0, 0, 0, 0, 1000000, 250000, 32787]
    assert worker0[0].totals == [1, 2, 3, 4, 0.5, 0.25, 0.0]  # the inputs are left alone


_ROW = st.builds(
    TrafficRow,
    st.sampled_from(["a", "b", "c"]),
    st.lists(st.integers(0, 10**9), min_size=len(TOTALS), max_size=len(TOTALS)),
    st.lists(st.integers(0, 10**6), min_size=len(TOTALS), max_size=len(TOTALS)),
    st.floats(0, 120),
)


@given(st.lists(st.lists(_ROW, max_size=4), max_size=4))
def test_merging_keeps_every_count(groups: list[list[TrafficRow]]) -> None:
    merged = merge_rows(groups)
    assert len({row.database for row in merged}) == len(merged)
    for i in range(len(TOTALS)):
        assert sum(row.totals[i] for row in merged) == sum(row.totals[i] for rows in groups for row in rows)
        assert sum(row.delta[i] for row in merged) == sum(row.delta[i] for rows in groups for row in rows)
