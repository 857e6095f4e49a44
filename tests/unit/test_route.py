"""router/routing/route.py: the session rules over verdicts, the scan of held messages, and the
no-parse fast path for plain SELECTs (which must agree with the parser)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.routing.classify import classify
from router.routing.functions import FunctionCatalog
from router.routing.route import (
    AFTER_SYNC,
    BINDS,
    EXECUTES,
    FLUSHES,
    PLAIN_READ,
    RESTORE_SHIFT,
    RouteReason,
    VerdictCache,
    decide,
    held_verdict,
    is_plain_select,
    lone_statement_sql,
    named_prepare,
    open_segment,
)
from router.routing.verdict import Reason, StatementKind, Target, Verdict
from router.sqlkey import cache_key
from tests.unit import test_prepared as wire

CATALOG = FunctionCatalog.builtin()


def verdict(sql: str) -> Verdict:
    return classify(sql, CATALOG).verdict


P, R = Target.PRIMARY, Target.REPLICA
S = RouteReason


@pytest.mark.parametrize(
    ("sql", "options", "expected"),
    [
        ("SELECT 1", {}, (R, S.READ)),
        ("INSERT INTO t VALUES (1)", {}, (P, S.WRITE)),
        ("BEGIN", {}, (P, S.WRITE)),
        ("BEGIN READ ONLY", {}, (R, S.READ_ONLY)),
        ("START TRANSACTION READ ONLY", {}, (R, S.READ_ONLY)),
        ("SET TRANSACTION READ ONLY", {}, (R, S.READ_ONLY)),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", {}, (P, S.WRITE)),
        ("/* pgrouter: primary */ SELECT 1", {}, (P, S.HINT)),
        ("/* pgrouter: replica */ SELECT f()", {}, (R, S.HINT)),
        ("/* pgrouter: replica */ INSERT INTO t VALUES (1)", {}, (P, S.WRITE)),
        ("SELECT 1", {"session_target": P}, (P, S.SESSION_TARGET)),
        ("SELECT f()", {"session_target": R}, (R, S.SESSION_TARGET)),
        ("INSERT INTO t VALUES (1)", {"session_target": R}, (P, S.WRITE)),
        ("SELECT nextval('s')", {"session_target": R}, (P, S.WRITE)),
        ("BEGIN", {"read_only_session": True}, (R, S.READ_ONLY)),
        ("SELECT f()", {"read_only_session": True}, (R, S.READ_ONLY)),
        ("DELETE FROM t", {"read_only_session": True}, (P, S.WRITE)),
        ("SELECT 1", {"pinned": True}, (P, S.PINNED)),
        ("SELECT 1 FOR UPDATE", {}, (P, S.WRITE)),
        ("SELECT 1; INSERT INTO t VALUES (1)", {}, (P, S.WRITE)),
        ("COMMIT", {}, (R, S.READ)),
    ],
)
def test_decide(sql: str, options: dict, expected: tuple) -> None:
    v = verdict(sql)
    assert decide(v, v, **options) == expected


def test_decide_with_nothing_to_judge() -> None:
    assert decide(None, None) == (R, S.READ)
    assert decide(None, None, session_target=P) == (P, S.SESSION_TARGET)


def query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def parse(name: bytes, sql: str) -> bytes:
    body = name + b"\0" + sql.encode() + b"\0" + b"\0\0"
    return b"P" + struct.pack("!I", len(body) + 4) + body


def bind(statement: bytes) -> bytes:
    body = b"\0" + statement + b"\0" + b"\0\0" + b"\0\0" + b"\0\0"
    return b"B" + struct.pack("!I", len(body) + 4) + body


SYNC = b"S\0\0\0\4"


def scan(chunks: list[bytes], named: dict[bytes, str] | None = None, last: Verdict | None = None):
    named = named or {}
    return held_verdict(
        [(c, 0, 1, 0) for c in chunks],
        lambda sql: verdict(sql.decode()),
        lambda name: named[name].encode() if name in named else None,
        last,
    )


def test_held_verdict_takes_the_strongest_and_remembers_the_first() -> None:
    first, combined, _ = scan([query("BEGIN READ ONLY") + query("SELECT 1")])
    assert first.kind is StatementKind.BEGIN_READ_ONLY and combined.target is R
    first, combined, _ = scan([query("SELECT 1"), parse(b"", "UPDATE t SET a = 1") + bind(b"") + SYNC])
    assert first.reason is Reason.READ and combined.target is P and combined.reason is Reason.WRITE


def test_held_verdict_follows_named_and_unnamed_statements() -> None:
    _, combined, last = scan([parse(b"", "DELETE FROM t") + SYNC])
    assert combined.target is P and last.target is P
    # A later Bind of the unnamed statement, in a chunk of its own, runs that DELETE.
    _, combined, _ = scan([bind(b"") + SYNC], last=last)
    assert combined.target is P
    _, combined, _ = scan([bind(b"s1") + SYNC], named={b"s1": "SELECT 1"})
    assert combined.target is R
    _, combined, _ = scan([bind(b"s2") + SYNC], named={b"s2": "INSERT INTO t VALUES (1)"})
    assert combined.target is P
    assert scan([SYNC])[1] is None


def test_a_function_call_message_is_a_suspected_write() -> None:
    """FunctionCall names a function by OID (libpq's large-object API: lo_creat writes)."""
    first, combined, _ = scan([wire.FUNCTION_CALL])
    assert first is combined and combined.target is P and combined.reason is Reason.UNKNOWN_FUNCTION
    assert decide(first, combined) == (P, S.WRITE)
    assert decide(first, combined, read_only_session=True)[0] is R  # it fails there as it would on PostgreSQL
    first, combined, _ = scan([query("SELECT 1") + wire.FUNCTION_CALL])
    assert first.reason is Reason.READ and combined.reason is Reason.UNKNOWN_FUNCTION


@pytest.mark.parametrize(
    "chunk, restore_after, expected",
    [
        # The router's restore Query after the chunk's 1st ReadyForQuery point decides nothing...
        (query("RESET ALL") + query("SELECT set_config('a', 'b', false)"), 1, None),
        (parse(b"", "RESET ALL") + bind(b"") + SYNC + query("UPDATE t SET a = 1"), 1, None),
        # ... while the client's own Queries around it still do.
        (query("RESET ALL") + query("SELECT set_config('a', 'b', false)") + query("DELETE FROM t"), 1, Reason.WRITE),
        (query("SELECT 1") + query("RESET ALL") + query("UPDATE t SET a = 1"), 2, None),
        (query("SELECT 1") + query("RESET ALL") + query("UPDATE t SET a = 1"), 1, Reason.WRITE),
    ],
)
def test_held_verdict_skips_the_router_s_own_restore(chunk, restore_after, expected) -> None:
    _, combined, _ = held_verdict(
        [(chunk, 0, 3, 1 << (RESTORE_SHIFT + restore_after))], lambda sql: verdict(sql.decode()), lambda _: None, None
    )
    assert combined is not None
    if expected is None:
        assert combined.target is not P
    else:
        assert combined.target is P and combined.reason is expected


def test_held_verdict_ignores_a_truncated_message() -> None:
    assert scan([query("INSERT INTO t VALUES (1)")[:-3]])[1] is None


PLAIN = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;",
    "select * from t where a = 1 and b > 2 order by c limit 10",
    "SELECT a, b FROM t1 JOIN t2 ON t1.id = t2.id WHERE t1.x = 3",
    "  SELECT 1  ",
    "SELECT x FROM t UNION SELECT y FROM u",
    "SELECT a::int FROM t WHERE b IS NOT NULL",
]
NOT_PLAIN = [
    "SELECT nextval('s')",
    "SELECT * FROM t FOR UPDATE",
    "SELECT * INTO new_t FROM t",
    "SELECT 1; DELETE FROM t",
    "/* pgrouter: primary */ SELECT 1",
    "SELECT 1 -- comment",
    "SELECT 'for'",
    "SELECT f()",
    "select * from t for share",
    "SELECT $1",
    "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
    "INSERT INTO t SELECT 1",
]


@pytest.mark.parametrize("sql", PLAIN)
def test_plain_select_fast_path(sql: str) -> None:
    assert is_plain_select(sql.encode())
    assert verdict(sql).target is R  # the parser agrees


@pytest.mark.parametrize("sql", NOT_PLAIN)
def test_not_plain_select(sql: str) -> None:
    assert not is_plain_select(sql.encode())


_WORDS = st.sampled_from(
    ["SELECT", "a", "b", "t", "FROM", "WHERE", "=", "1", "2", "AND", "OR", "ORDER", "BY", "LIMIT",
     "FOR", "UPDATE", "INTO", "x", "JOIN", "ON", "GROUP", "HAVING", ">", "<", ",", "*", "UNION",
     "SHARE", "NOWAIT", "DISTINCT", "AS", "NULL", "IS", "NOT", "LOCK", "OFFSET", "TABLESAMPLE"]
)


@given(st.lists(_WORDS, min_size=1, max_size=14))
def test_fast_path_never_sends_a_primary_statement_to_a_replica(words: list[str]) -> None:
    sql = "SELECT " + " ".join(words)
    if is_plain_select(sql.encode()):
        v = verdict(sql)
        # Text the parser rejects fails on any node; anything it accepts must be a read.
        assert v.target is R or v.reason is Reason.UNPARSABLE, (sql, v)


def _counting_cache(**options) -> tuple[VerdictCache, list[str]]:
    """A VerdictCache over the real classifier, and the texts it had to classify."""
    calls: list[str] = []

    def classify_text(sql: str):
        calls.append(sql)
        return classify(sql, CATALOG)

    return VerdictCache(classify_text, **options), calls


def test_verdict_cache_is_bounded_and_resettable() -> None:
    cache, calls = _counting_cache(maxsize=3)
    for i in range(10):
        assert cache.verdict(f"SELECT c{i}, f()".encode()).target is P
    assert len(cache) == 3
    cache.verdict(b"SELECT c9, f()")
    assert len(calls) == 10  # a hit
    cache.reset()
    cache.verdict(b"SELECT c9, f()")
    assert len(calls) == 11
    # Undecodable bytes go to the primary without reaching the classifier.
    assert cache.verdict(b"SELECT '\xff', f()").target is P
    assert len(calls) == 11


REFUSED = Verdict(Target.PRIMARY, Reason.REFUSED_BY_REPLICA)


@pytest.mark.parametrize(
    ("refused", "learned", "then", "expected"),
    [
        # a plain read (no parse), then the same text and the same shape with other constants
        (b"SELECT x FROM v WHERE id = 1", True, b"SELECT x FROM v WHERE id = 1", REFUSED),
        (b"SELECT x FROM v WHERE id = 1", True, b"SELECT x FROM v WHERE id = 27", REFUSED),  # judged before too
        (b"SELECT x FROM v WHERE name = 'a'", True, b"SELECT x FROM v WHERE name = 'bb'", REFUSED),
        (b"SELECT x FROM v WHERE id = $1", True, b"SELECT x FROM v WHERE id = $1", REFUSED),
        # a read the parser judged (a CTE) and a read of another view: unaffected
        (b"WITH a AS (SELECT 1) SELECT x FROM v, a", True, b"WITH a AS (SELECT 1) SELECT x FROM v, a", REFUSED),
        (b"SELECT x FROM v WHERE id = 1", True, b"SELECT x FROM w WHERE id = 1", PLAIN_READ),
        # what the client chose, or what goes to the primary anyway: nothing to learn
        (b"/* pgrouter: replica */ SELECT x FROM v", False, b"/* pgrouter: replica */ SELECT x FROM v",
         Verdict(Target.REPLICA, Reason.HINT)),
        (b"INSERT INTO t VALUES (1)", False, b"INSERT INTO t VALUES (1)", Verdict(Target.PRIMARY, Reason.WRITE)),
        (b"BEGIN READ ONLY", False, b"BEGIN READ ONLY", None),
    ],
)
def test_a_read_a_replica_refused_goes_to_the_primary(refused: bytes, learned: bool, then: bytes, expected) -> None:
    cache, _ = _counting_cache()
    before = cache.verdict(then)
    assert cache.refused_by_replica(refused) is learned
    assert cache.verdict(then) == (before if expected is None else expected)
    # A catalog change forgets the classifier's verdicts, not what a replica refused.
    cache.reset()
    assert cache.verdict(then) == (before if expected is None else expected)


def test_texts_that_differ_only_in_numbers_share_a_verdict() -> None:
    cache, calls = _counting_cache()
    for i in (1, 5, 9, 3):
        assert cache.verdict(f"SELECT a, f() FROM t WHERE id = {i}".encode()).target is P
    assert calls == ["SELECT a, f() FROM t WHERE id = 1"]  # one parse for all four
    for i in range(10):  # plain reads skip the parser, and are cached by key too
        assert cache.verdict(b"SELECT abalance FROM pgbench_accounts WHERE aid = %d" % i) is PLAIN_READ
    assert len(calls) == 1 and len(cache) == 2
    # An ORM's text, every name quoted: parsed once too, though no regex could call it plain.
    orm = 'SELECT "auth_user"."id" FROM "auth_user" WHERE "auth_user"."id" = %d AND "auth_user"."name" = \'x\' LIMIT 21'
    for i in (5, 7, 9):
        assert cache.verdict((orm % i).encode()).target is R
    assert calls[1:] == [orm % 5] and len(cache) == 3


_PIECES = ["SELECT ", "a", "t1", " FROM t", " WHERE x = ", "1", "23", "$1", "'s 1'", '"c 1"', "1e5",
           ".5", " + ", ", ", "(", ")", ";", " /* 7 */ ", "f()", "nextval('s1')", " FOR UPDATE",
           "/* pgrouter: primary */ ", "INSERT INTO t VALUES (", "LIMIT 3", "9",
           '"q"', "'\"'", " -- c'\n", "\r", "E'\\''", "$$ 1 $$", "/*", "*/"]


@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=10), st.randoms(use_true_random=False))
def test_equal_cache_keys_mean_equal_verdicts(pieces: list[str], rnd) -> None:
    a = "".join(pieces)
    b = "".join(rnd.choice("0123456789") if c.isdigit() else c for c in a)
    if cache_key(a.encode()) == cache_key(b.encode()):
        assert verdict(a) == verdict(b), (a, b)


# Texts for the cache's own property: constants (digits anywhere, string literals) vary.
_PLAIN_KINDS = (StatementKind.PLAIN, StatementKind.MULTIPLE)
_STRINGS = ["'s 1'", "'on'", "'off'", "'x\"y'", "'it''s'", "'1'", "'0'"]
_CACHE_PIECES = _PIECES + _STRINGS + [
    "EXPLAIN (ANALYZE 1) ", "EXPLAIN (ANALYZE ", ") ", " DELETE FROM t", "SET transaction_read_only = ",
    "SET LOCAL transaction_read_only TO ", "BEGIN", "; ", "SELECT set_config(", "'transaction_read_only'",
    '"c"', " t2", "f(", "E'\\''", "$$ 1 $$", " -- c'\n", "\r", "/* ", " */", "date", "0x1f", " LIMIT ",
]


@given(st.lists(st.sampled_from(_CACHE_PIECES), min_size=1, max_size=10), st.randoms(use_true_random=False))
def test_the_verdict_cache_answers_what_the_classifier_would(pieces: list[str], rnd) -> None:
    """Store one text, ask for another that differs in constants (or in digits of names):
    whatever the cache answers, through whichever key, is the classifier's target and kind.
    Texts the parser rejects are left out: the no-parse paths call `SELECT SELECT` a read and
    `INSERT INTO t VALUES (` a write, and either fails with a syntax error wherever it runs."""
    a = "".join(pieces)
    other = "".join(rnd.choice(_STRINGS) if piece in _STRINGS else piece for piece in pieces)
    b = "".join(rnd.choice("0123456789") if c.isdigit() else c for c in other)
    cache = VerdictCache(lambda sql: classify(sql, CATALOG))
    for sql in (a, b):
        found, expected = cache.verdict(sql.encode()), verdict(sql)
        if expected.reason is not Reason.UNPARSABLE:
            assert found.target is expected.target, (a, b)
            # The no-parse write path says PLAIN for `DELETE FROM t; SELECT 1` (MULTIPLE).
            assert found.kind in _PLAIN_KINDS if expected.kind in _PLAIN_KINDS else found.kind is expected.kind


@pytest.mark.parametrize(
    ("first", "then"),
    [
        ("EXPLAIN (ANALYZE 0) DELETE FROM t", "EXPLAIN (ANALYZE 1) DELETE FROM t"),
        ("EXPLAIN (ANALYZE 'off') DELETE FROM t", "EXPLAIN (ANALYZE 'on') DELETE FROM t"),
        ("SET transaction_read_only = 1", "SET transaction_read_only = 0"),
        ("SET transaction_read_only = 'on'", "SET transaction_read_only = 'of'"),
    ],
)
def test_a_constant_that_changes_the_verdict_is_not_shared(first: str, then: str) -> None:
    assert verdict(first).target is R and verdict(then).target is P
    cache = VerdictCache(lambda sql: classify(sql, CATALOG))
    assert cache.verdict(first.encode()).target is R
    assert cache.verdict(then.encode()).target is P  # once went to a replica


def test_texts_that_differ_in_string_constants_share_a_verdict() -> None:
    cache, calls = _counting_cache()
    orm = 'SELECT "u"."id" FROM "u" WHERE "u"."email" = %s AND "u"."org" = %d'
    for email, org in (("'a@b.c'", 5), ("'someone@else.org'", 1234), ("''", 7)):
        assert cache.verdict((orm % (email, org)).encode()).target is R
    assert calls == [orm % ("'a@b.c'", 5)]
    for i in (1, 22, 333):  # a digit in a name rules out the zeroed key, not the shape
        assert cache.verdict(b"SELECT a, f() FROM t1 WHERE id = %d" % i).target is P
    assert len(calls) == 2
    for i in (4, 55):  # only the keyword EXPLAIN keeps a text to its exact entry
        assert cache.verdict(b"SELECT explained_at FROM t WHERE note = 'n%d'" % i).target is R
    assert len(calls) == 3


@pytest.mark.parametrize(
    "sql",
    ["INSERT INTO t VALUES (1)", "update t set a = 1", " DELETE FROM t", "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE",
     "UPDATE pgbench_accounts SET abalance = abalance + -1 WHERE aid = 1;"],
)
def test_plain_write_fast_path(sql: str) -> None:
    from router.routing.route import is_plain_write

    assert is_plain_write(sql.encode())
    assert verdict(sql).target is P  # the parser agrees


def test_select_mentioning_for_is_not_fast() -> None:
    assert not is_plain_select(b"SELECT a FROM t FOR UPDATE")
    assert not is_plain_select(b"SELECT a INTO b FROM t")


# --- The lone-statement shortcut (Router.pool_for_transaction) ----------------------------------

_SQL = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"
_BIND = wire.bind(b"", b"", [b"7"])
LONE = [
    (wire.query(b"SELECT 1"), b"SELECT 1"),
    (wire.parse(b"", _SQL) + _BIND + wire.describe(b"P", b"") + wire.execute() + wire.SYNC, _SQL),  # pgbench -M extended
    (wire.parse(b"", _SQL) + _BIND + wire.execute() + wire.SYNC, _SQL),
    (wire.parse(b"", _SQL, [23]) + _BIND + wire.describe(b"S", b"") + wire.execute() + wire.SYNC, _SQL),
]
NOT_LONE = [
    wire.query(b"SELECT 1") + wire.query(b"SELECT 2"),  # two Queries
    wire.query(b"SELECT 1")[:-1],  # truncated
    wire.parse(b"s1", _SQL) + wire.bind(b"", b"s1") + wire.execute() + wire.SYNC,  # a named statement
    wire.parse(b"", _SQL) + wire.bind(b"p", b"") + wire.execute(b"p") + wire.SYNC,  # a named portal
    wire.parse(b"", _SQL) + wire.bind(b"", b"s1") + wire.execute() + wire.SYNC,  # binds another statement
    wire.parse(b"", _SQL) + _BIND + wire.describe(b"S", b"s1") + wire.execute() + wire.SYNC,
    wire.parse(b"", _SQL) + _BIND + wire.execute() + wire.SYNC + wire.query(b"DELETE FROM t"),  # more after Sync
    wire.parse(b"", _SQL) + _BIND + wire.execute() + wire.query(b"DELETE FROM t"),
    wire.parse(b"", _SQL) + _BIND + wire.execute() + wire.FLUSH,  # no Sync
    wire.parse(b"", _SQL) + _BIND + wire.execute() + wire.SYNC + wire.SYNC,
    wire.parse(b"", _SQL) + _BIND + wire.execute(),
    wire.parse(b"", _SQL) + wire.SYNC,  # no Bind
    wire.parse(b"", _SQL) + wire.parse(b"", b"DELETE FROM t") + _BIND + wire.execute() + wire.SYNC,
    _BIND + wire.execute() + wire.SYNC,  # runs an earlier Parse
]


@pytest.mark.parametrize(("data", "sql"), LONE)
def test_lone_statement_sql(data: bytes, sql: bytes) -> None:
    assert lone_statement_sql(data) == sql


@pytest.mark.parametrize("data", NOT_LONE)
def test_not_a_lone_statement(data: bytes) -> None:
    assert lone_statement_sql(data) is None


_MESSAGES = st.sampled_from(
    [wire.query(b"SELECT 1"), wire.query(b"DELETE FROM t"), wire.parse(b"", _SQL), wire.parse(b"", b"DELETE FROM t"),
     wire.parse(b"s", _SQL), _BIND, wire.bind(b"", b"s"), wire.bind(b"p", b""), wire.describe(b"P", b""),
     wire.describe(b"S", b"s"), wire.execute(), wire.execute(b"p"), wire.SYNC, wire.FLUSH]
)


@given(st.lists(_MESSAGES, max_size=7), st.integers(min_value=0, max_value=200))
def test_lone_statement_sql_agrees_with_the_full_scan(messages: list[bytes], cut: int) -> None:
    """Whatever the chunk (whole messages or cut short), the shortcut only answers when the
    chunk runs exactly one statement, and then says what the full scan says."""
    data = b"".join(messages)
    data = data[: len(data) - cut] if cut < len(data) else data
    sql = lone_statement_sql(data)
    if sql is None:
        return
    seen: list[bytes] = []
    first, combined, _ = held_verdict(
        [(data, 0, 1, 0)], lambda text: seen.append(text) or verdict(text.decode()), lambda name: None, None
    )
    assert seen == [sql]
    assert first == combined == verdict(sql.decode())
    assert data.endswith(wire.SYNC) or data[0] == ord("Q")
    assert data.count(b"S\x00\x00\x00\x04") <= 1


_READ_RUN = wire.parse(b"", _SQL) + _BIND + wire.describe(b"P", b"") + wire.execute()


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([_READ_RUN], BINDS | EXECUTES),  # psycopg's pipeline, before its Sync
        ([_READ_RUN, _READ_RUN], BINDS | EXECUTES),
        ([wire.parse(b"s", _SQL) + wire.describe(b"S", b"s") + wire.FLUSH], FLUSHES),  # asyncpg's prepare
        ([_READ_RUN + wire.FLUSH], BINDS | EXECUTES | FLUSHES),  # psycopg fetching mid-pipeline
        ([_READ_RUN, wire.FLUSH + _READ_RUN], BINDS | EXECUTES | FLUSHES),
        ([_READ_RUN + wire.SYNC + _READ_RUN], AFTER_SYNC | BINDS | EXECUTES),
        ([_READ_RUN + wire.FLUSH + wire.SYNC, wire.parse(b"", _SQL)], AFTER_SYNC),  # a Sync clears the rest
        ([wire.query(b"SELECT 1") + wire.parse(b"", _SQL)], AFTER_SYNC),
        ([wire.FUNCTION_CALL + _BIND], AFTER_SYNC | BINDS),
        ([wire.parse(b"", _SQL)], 0),
        ([wire.parse(b"", _SQL) + _BIND], BINDS),
        # A message longer than its chunk: the next chunk starts with the rest of it.
        ([_READ_RUN[:-3], _READ_RUN[-3:] + wire.FLUSH], BINDS | EXECUTES | FLUSHES),
    ],
)
def test_open_segment(chunks: list[bytes], expected: int) -> None:
    held, skip = [], 0
    for data in chunks:
        held.append((data, skip, 0, 0))
        pos = skip
        while pos + 5 <= len(data):
            pos += 1 + struct.unpack_from("!I", data, pos + 1)[0]
        skip = pos - len(data)
    assert open_segment(held) == expected


@given(st.lists(_MESSAGES, max_size=12))
def test_open_segment_describes_what_follows_the_last_sync_point(messages: list[bytes]) -> None:
    kinds = [message[0:1] for message in messages]
    ends = [i for i, kind in enumerate(kinds) if kind in (b"S", b"Q")]
    rest = kinds[ends[-1] + 1 :] if ends else kinds
    expected = (
        (AFTER_SYNC if ends else 0)
        | (EXECUTES if b"E" in rest else 0)
        | (BINDS if b"B" in rest else 0)
        | (FLUSHES if b"H" in rest else 0)
    )
    assert open_segment([(b"".join(messages), 0, 0, 0)]) == expected


_PREPARE = wire.parse(b"s", _SQL) + wire.describe(b"S", b"s") + wire.FLUSH


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([(_PREPARE, 0)], True),  # asyncpg's prepare
        ([(wire.parse(b"stmt_1", _SQL, [23]) + wire.describe(b"S", b"stmt_1") + wire.FLUSH, 0)], True),
        ([(_PREPARE, 0), (_PREPARE, 0)], False),  # two chunks: replies of the first only may be in
        ([(wire.parse(b"", _SQL) + wire.describe(b"S", b"") + wire.FLUSH, 0)], False),  # unnamed: dies with its connection
        ([(wire.parse(b"s", _SQL) + wire.describe(b"S", b"t") + wire.FLUSH, 0)], False),  # another statement
        ([(wire.parse(b"s", _SQL) + wire.describe(b"S", b"ss") + wire.FLUSH, 0)], False),
        ([(wire.parse(b"s", _SQL) + wire.describe(b"P", b"s") + wire.FLUSH, 0)], False),  # a portal
        ([(wire.parse(b"s", _SQL) + wire.FLUSH, 0)], False),  # no Describe: its reply is not the last
        ([(_PREPARE + wire.FLUSH, 0)], False),
        ([(wire.parse(b"s", _SQL) + wire.describe(b"S", b"s") + wire.SYNC, 0)], False),
        ([(_PREPARE[:-5], 0)], False),  # no Flush yet
        ([(_PREPARE[:-1], 0)], False),  # truncated
        ([(_READ_RUN + _PREPARE, len(_READ_RUN))], False),  # behind the rest of a message
        ([], False),
    ],
)
def test_named_prepare(chunks: list[tuple[bytes, int]], expected: bool) -> None:
    assert named_prepare([(data, start, 0, 0) for data, start in chunks]) is expected


@given(st.lists(_MESSAGES, max_size=5), st.integers(min_value=0, max_value=60))
def test_named_prepare_is_only_a_named_parse_its_describe_and_a_flush(messages: list[bytes], cut: int) -> None:
    data = b"".join(messages)
    data = data[: len(data) - cut] if cut < len(data) else data
    found = named_prepare([(data, 0, 0, 0)])
    assert found == (data == wire.parse(b"s", _SQL) + wire.describe(b"S", b"s") + wire.FLUSH)
