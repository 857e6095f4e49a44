"""Query statistics and the slow-query log (router/stats/queries.py), and the hot path's
histogram (router/stats/histogram.py): no I/O, tables of cases and hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pglast import parser

from router.sqlkey import cache_key, shape_key
from router.stats.histogram import FastHistogram
from router.stats.queries import (
    FOLD_AT,
    FingerprintCache,
    QueryStats,
    fingerprint,
    redact,
)

# Texts that differ only in constants share a fingerprint; the others do not.
SAME_SHAPE = [
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 1", "SELECT abalance FROM pgbench_accounts WHERE aid = 98765"),
    ("select * from t where name = 'alice'", "SELECT * FROM t WHERE name = 'bob''s'"),
    ("SELECT * FROM t WHERE x = $1", "SELECT * FROM t WHERE x = 42"),
    ("UPDATE t SET v = v + 1.5 WHERE id = 3", "UPDATE t SET v = v + 2e3 WHERE id = 7"),
    ("INSERT INTO t VALUES (1, 'a')", "insert into t values (2, 'b')"),
    ("SELECT 1 /* a comment */", "SELECT 2 -- another"),
    ("SELECT $q$dollar$q$", "SELECT $q$quoted$q$"),
]
DIFFERENT_SHAPE = [
    ("SELECT a FROM t", "SELECT b FROM t"),
    ("SELECT a FROM t", "SELECT a FROM u"),
    ("SELECT a FROM t WHERE x = 1", "SELECT a FROM t WHERE y = 1"),
    ("DELETE FROM t", "TRUNCATE t"),
    # Quoted identifiers are not literals, whatever they hold.
    ('SELECT "col 1" FROM t', 'SELECT "col 2" FROM t'),
    ('SELECT "a\'b", \'c\' FROM t', 'SELECT "a\'x", \'c\' FROM t'),
]


@pytest.mark.parametrize(("a", "b"), SAME_SHAPE)
def test_constants_do_not_change_the_fingerprint(a: str, b: str) -> None:
    assert fingerprint(a) == fingerprint(b)
    cache = FingerprintCache()
    assert cache(a) == cache(b) == fingerprint(a)


@pytest.mark.parametrize(("a", "b"), DIFFERENT_SHAPE)
def test_different_statements_have_different_fingerprints(a: str, b: str) -> None:
    assert fingerprint(a) != fingerprint(b)
    cache = FingerprintCache()
    assert cache(a) != cache(b)


@given(st.lists(st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                        min_size=1, max_size=12), min_size=2, max_size=2, unique=True))
def test_quoted_identifiers_are_never_taken_for_literals(names: list[str]) -> None:
    a, b = (f'SELECT "{name.replace(chr(34), chr(34) * 2)}", 1 FROM t' for name in names)
    cache = FingerprintCache()
    assert (cache(a) == cache(b)) == (fingerprint(a) == fingerprint(b))


# The cache key of texts (router/sqlkey.py): texts with equal keys must have equal fingerprints.
SAME_KEY = [
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 1;", "SELECT abalance FROM pgbench_accounts WHERE aid = 7;"),
    ("UPDATE t SET v = v + 1.5 WHERE id = 30", "UPDATE t SET v = v + 9.2 WHERE id = 41"),
    ("SELECT * FROM t LIMIT 10 OFFSET 20", "SELECT * FROM t LIMIT 99 OFFSET 50"),
    ("SELECT 'a 1', -3", "SELECT 'a 2', -4"),
    # Quoted names without digits (as ORMs write every name), strings and comments holding quotes.
    ('SELECT "auth_user"."id" FROM "auth_user" WHERE "auth_user"."id" = 5 LIMIT 21',
     'SELECT "auth_user"."id" FROM "auth_user" WHERE "auth_user"."id" = 7 LIMIT 29'),
    ("""SELECT "a""b", 'x"y', 'it''s' /* "q" */ FROM t WHERE v = 1 -- it's\n""",
     """SELECT "a""b", 'x"y', 'it''s' /* "q" */ FROM t WHERE v = 2 -- it's\n"""),
]
OWN_KEY = [  # a digit after an identifier character or in quotes: the text is its own key
    ("SELECT * FROM t1", "SELECT * FROM t2"),
    ("SELECT * FROM t WHERE x = $1 AND y = $2", "SELECT * FROM t WHERE x = $2 AND y = $1"),
    ('SELECT "col 1" FROM t', 'SELECT "col 2" FROM t'),
    ("SELECT 1e5", "SELECT 1e6"),
    ("1SELECT", "2SELECT"),
    ("SELECT x'1f'", "SELECT x'2f'"),
    # Where a simple lexer could take a quoted name for a string or a comment: own keys.
    ('SELECT 1 -- c\r, "col 1"', 'SELECT 1 -- c\r, "col 2"'),  # \r ends a -- comment
    ("""SELECT E'\\'', "col 1", E'\\''""", """SELECT E'\\'', "col 2", E'\\''"""),
    ("""SELECT 1 /* /* */ ' */ "col 1" -- '""", """SELECT 1 /* /* */ ' */ "col 2" -- '"""),
    ('SELECT $$x$$, "c" FROM t WHERE v = 1', 'SELECT $$x$$, "c" FROM t WHERE v = 2'),
    ('SELECT "c" FROM t WHERE v = 1 AND w = "x 2"', 'SELECT "c" FROM t WHERE v = 1 AND w = "x 3"'),
]


@pytest.mark.parametrize(("a", "b"), SAME_KEY)
def test_texts_that_differ_in_numbers_share_a_cache_key(a: str, b: str) -> None:
    assert cache_key(a.encode()) == cache_key(b.encode())
    assert fingerprint(a) == fingerprint(b)


@pytest.mark.parametrize(("a", "b"), OWN_KEY)
def test_digits_that_may_not_be_constants_keep_the_exact_text(a: str, b: str) -> None:
    assert cache_key(a.encode()) == a.encode()
    assert cache_key(a.encode()) != cache_key(b.encode())


_PIECES = ["SELECT ", "a", "t1", " FROM t", " WHERE x = ", "1", "23", "$1", "'s 1'", '"c 1"', "1e5",
           ".5", " + ", ", ", "-", "(", ")", ";", " /* 7 */ ", "\u00e91", "x'1f'", "U&\"d0\"", "9",
           '"q"', "'\"'", " -- c'\n", "\r", "E'\\''", "$$ 1 $$", "/*", "*/"]


@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_equal_cache_keys_mean_equal_fingerprints(pieces: list[str], rnd) -> None:
    a = "".join(pieces)
    b = "".join(rnd.choice("0123456789") if c.isdigit() else c for c in a)
    if cache_key(a.encode()) == cache_key(b.encode()):
        assert fingerprint(a) == fingerprint(b)


_STRINGS = ["'s 1'", "'x\"y'", "'it''s'", "E'e'", "''"]


@given(st.lists(st.sampled_from(_PIECES + _STRINGS), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_equal_shapes_mean_equal_fingerprints(pieces: list[str], rnd) -> None:
    """What the statistics' TextCache(shapes=True) relies on, for texts the parser takes."""
    a = "".join(pieces)
    other = "".join(rnd.choice(_STRINGS) if piece in _STRINGS else piece for piece in pieces)
    b = "".join(rnd.choice("0123456789") if c.isdigit() else c for c in other)
    shape = shape_key(a.encode())
    if shape is not None and shape == shape_key(b.encode()) and not fingerprint(a).startswith("x"):
        assert fingerprint(a) == fingerprint(b), (a, b)


def test_the_fingerprint_is_libpg_querys() -> None:
    sql = "SELECT abalance FROM pgbench_accounts WHERE aid = 5"
    assert fingerprint(sql) == parser.fingerprint(sql)


def test_unparsable_text_gets_a_stable_fingerprint_of_its_own_kind() -> None:
    a, b = fingerprint("SELEC x FROM t WHERE id = 1"), fingerprint("SELEC x FROM t WHERE id = 2")
    assert a == b and a.startswith("x")
    assert fingerprint("SELEC y FROM t") != a


@pytest.mark.parametrize(
    ("sql", "secret"),
    [
        ("SELECT * FROM users WHERE password = 'hunter2'", "hunter2"),
        ("UPDATE cards SET number = 4111111111111111", "4111111111111111"),
        ("SELECT E'esc\\'aped secret'", "secret"),
        ("SELEC * FROM t WHERE ssn = '123-45-6789'", "123-45-6789"),  # unparsable: by pattern
        ("SELECT $tag$in dollars$tag$", "in dollars"),
    ],
)
def test_redact_removes_constants(sql: str, secret: str) -> None:
    text = redact(sql)
    assert secret not in text
    assert text.split()[0].upper() in ("SELECT", "UPDATE", "SELEC")


def test_redact_bounds_the_text() -> None:
    long = "SELECT " + ", ".join(f"c{i}" for i in range(2000)) + " FROM t"
    assert len(redact(long)) <= 2000


@given(st.text(max_size=200))
def test_fingerprint_and_redact_take_any_text(sql: str) -> None:
    fp = fingerprint(sql)
    assert isinstance(fp, str) and fp
    assert isinstance(redact(sql), str)


def _stats(max_entries: int = 100, slow: float | None = None):
    logged: list[dict] = []
    return QueryStats(max_entries, slow, slow_log=logged.append), logged


def test_calls_fold_into_their_fingerprint() -> None:
    stats, _ = _stats()
    stats.record("acme", b"SELECT v FROM t WHERE id = 1", 0.002, 1, None, "replica", "h:1")
    stats.record("acme", b"SELECT v FROM t WHERE id = 2", 0.004, 1, None, "primary", "h:2")
    stats.record("acme", b"SELECT v FROM t WHERE id = 3", 0.003, 0, "42P01", "primary", "h:2")
    stats.record("beta", b"SELECT v FROM t WHERE id = 4", 0.010, 1, None, "primary", "h:2")
    (acme,) = stats.top(tenant="acme")
    assert acme.calls == 3
    assert acme.total_seconds == pytest.approx(0.009)
    assert acme.mean_seconds == pytest.approx(0.003)
    assert acme.max_seconds == pytest.approx(0.004)
    assert acme.rows == 2 and acme.errors == 1
    assert acme.roles == {"replica": 1, "primary": 2}
    assert acme.query == "SELECT v FROM t WHERE id = $1"
    assert acme.fingerprint == parser.fingerprint("SELECT v FROM t WHERE id = 1")
    both = stats.top()
    assert [e.tenant for e in both] == ["beta", "acme"]  # by total time
    assert stats.top(1)[0].tenant == "beta"
    view = acme.as_dict()
    assert view["mean_ms"] == pytest.approx(3.0) and view["roles"] == {"replica": 1, "primary": 2}


def test_pending_calls_fold_in_batches() -> None:
    stats, _ = _stats()
    for i in range(FOLD_AT - 1):
        stats.record("t", f"SELECT {i}".encode(), 0.001, 1, None, "primary", "h:1")
    assert stats.entries == {}  # nothing parsed on the hot path yet
    stats.record("t", b"SELECT 0", 0.001, 1, None, "primary", "h:1")
    (entry,) = stats.entries.values()
    assert entry.calls == FOLD_AT


def test_memory_is_bounded_to_the_top_by_total_time() -> None:
    stats, _ = _stats(max_entries=10)
    for i in range(50):
        stats.record("t", f"SELECT c{i} FROM t".encode(), float(i), 0, None, "primary", "h:1")
    top = stats.top()
    assert len(top) == 10
    assert [e.query for e in top] == [f"SELECT c{i} FROM t" for i in range(49, 39, -1)]
    assert stats.evicted == 40
    for i in range(5000):  # many more distinct statements: the table stays bounded
        stats.record("t", f"SELECT d{i} FROM t".encode(), 0.0, 0, None, "primary", "h:1")
    assert len(stats.entries) <= 10 + 10 // 4 + 1
    assert len(stats.top()) == 10


def test_slow_calls_are_logged_with_redacted_text() -> None:
    stats, logged = _stats(slow=0.5)
    stats.record("acme", b"SELECT pg_sleep(0.1), 'fast-secret'", 0.1, 1, None, "primary", "h:1")
    assert logged == []
    stats.record("acme", b"SELECT pg_sleep(1), 'slow-secret'", 0.75, 1, None, "replica", "h:2")
    (event,) = logged
    assert event["tenant"] == "acme"
    assert event["duration_ms"] == 750.0
    assert event["node"] == "h:2" and event["role"] == "replica"
    assert event["fingerprint"] == parser.fingerprint("SELECT pg_sleep(1), 'x'")
    assert "slow-secret" not in event["query"] and "pg_sleep" in event["query"]
    assert stats.slow_queries == 1


def test_no_slow_log_without_a_threshold() -> None:
    stats, logged = _stats(slow=None)
    stats.record("acme", b"SELECT 1", 1000.0, 1, None, "primary", "h:1")
    assert logged == [] and stats.slow_queries == 0


def test_reset_forgets_one_tenant_or_all() -> None:
    stats, _ = _stats()
    stats.record("a", b"SELECT 1", 0.1, 1, None, "primary", "h:1")
    stats.record("b", b"SELECT 1", 0.1, 1, None, "primary", "h:1")
    stats.reset("a")
    assert [e.tenant for e in stats.top()] == ["b"]
    stats.reset()
    assert stats.top() == []


def test_text_in_another_encoding_does_not_break_folding() -> None:
    stats, _ = _stats()
    stats.record("t", "SELECT 'é'".encode("latin-1"), 0.1, 1, None, "primary", "h:1")
    assert stats.top()[0].calls == 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], [("0.1", 0), ("1.0", 0), ("+Inf", 0)]),
        ([0.1], [("0.1", 1), ("1.0", 1), ("+Inf", 1)]),  # a bound is inclusive (le)
        ([0.05, 0.5, 5.0], [("0.1", 1), ("1.0", 2), ("+Inf", 3)]),
        ([1.0, 1.0000001], [("0.1", 0), ("1.0", 1), ("+Inf", 2)]),
    ],
)
def test_histogram_buckets_are_cumulative(values: list[float], expected: list[tuple[str, int]]) -> None:
    histogram = FastHistogram((0.1, 1.0))
    for value in values:
        histogram.observe(value)
    assert histogram.cumulative() == expected
    assert histogram.count == len(values)
    assert histogram.sum == pytest.approx(sum(values))


def test_histogram_buckets_must_increase() -> None:
    with pytest.raises(ValueError):
        FastHistogram((1.0, 0.5))
