"""Statement classification: one table of statements with the verdict each must get, then the
payloads kinds carry, set_config() detection, fingerprints, and hypothesis properties.

The catalog is the fallback one plus a few user functions: my_volatile ('v'), my_stable ('s'),
my_immutable ('i'), reporting.stable_fn ('s'), app.tenant_fn ('v'), and `overloaded`, stable
in public but volatile in another schema.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.routing.classify import classify
from router.routing.functions import FunctionCatalog, builtin_rows
from router.routing.statements import (
    body_may_change_session,
    created_routines,
    created_session_functions,
    functions_that_may_change_session,
)
from router.routing.verdict import Classification, Reason, StatementKind, Target

P = Target.PRIMARY
R = Target.REPLICA
K = StatementKind
W = Reason

USER_FUNCTIONS = [
    ("public", "my_volatile", "v"),
    ("public", "my_stable", "s"),
    ("public", "my_immutable", "i"),
    ("reporting", "stable_fn", "s"),
    ("app", "tenant_fn", "v"),
    ("public", "overloaded", "s"),
    ("other", "overloaded", "v"),
    ("public", "MixedCase", "s"),
]
CATALOG = FunctionCatalog.from_rows([*builtin_rows(), *USER_FUNCTIONS])


def case(sql: str, target: Target, reason: Reason, kind: StatementKind = K.PLAIN, id: str = ""):
    return pytest.param(sql, target, reason, kind, id=id or sql[:60])


READS = [
    case("SELECT 1", R, W.READ),
    case("select 1", R, W.READ, id="lowercase"),
    case("  \n\tSELECT 1  \n", R, W.READ, id="surrounding whitespace"),
    case("SELECT 1;", R, W.READ, id="trailing semicolon"),
    case("SELECT 1;;;", R, W.READ, id="trailing semicolons"),
    case("SELECT a, b FROM t WHERE id = $1", R, W.READ),
    case("SELECT * FROM t WHERE a = ANY($1) AND b IS NOT NULL", R, W.READ),
    case("VALUES (1, 'a'), (2, 'b')", R, W.READ),
    case("TABLE t", R, W.READ),
    case("SELECT * FROM t1 JOIN t2 USING (id) LEFT JOIN t3 ON t3.x = t1.x", R, W.READ),
    case("SELECT a FROM t UNION ALL SELECT b FROM u EXCEPT SELECT c FROM v", R, W.READ),
    case("SELECT * FROM (SELECT * FROM t) s WHERE EXISTS (SELECT 1 FROM u)", R, W.READ),
    case("SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b DESC NULLS LAST", R, W.READ),
    case("SELECT a, count(*) FROM t GROUP BY a HAVING count(*) > 1", R, W.READ),
    case("SELECT * FROM t ORDER BY a LIMIT 10 OFFSET 20", R, W.READ),
    case("SELECT * FROM t FETCH FIRST 5 ROWS ONLY", R, W.READ),
    case("SELECT row_number() OVER (PARTITION BY a ORDER BY b) FROM t", R, W.READ),
    case(
        "SELECT CASE WHEN a > 0 THEN 'pos' ELSE 'neg' END, a::text, CAST(b AS int) FROM t",
        R,
        W.READ,
    ),
    case("SELECT coalesce(a, 0), nullif(b, 1), greatest(a, b) FROM t", R, W.READ),
    case(
        "SELECT current_user, session_user, current_date, current_timestamp, localtime", R, W.READ
    ),
    case("SELECT now(), statement_timestamp(), transaction_timestamp()", R, W.READ),
    case(
        "SELECT count(*), sum(x), avg(x), min(x), max(x), array_agg(x), string_agg(s, ',') FROM t",
        R,
        W.READ,
    ),
    case(
        "SELECT lower(a), upper(b), length(c), abs(d), substring(e FROM 2 FOR 3) FROM t", R, W.READ
    ),
    case(
        "SELECT extract(year FROM d), trim(both ' ' FROM s), d AT TIME ZONE 'UTC' FROM t", R, W.READ
    ),
    case(
        "SELECT 'a' SIMILAR TO 'b', position('a' IN 'abc'), overlay('abc' PLACING 'x' FROM 2)",
        R,
        W.READ,
    ),
    case("SELECT pg_is_in_recovery()", R, W.READ),
    case("SELECT pg_last_wal_replay_lsn(), pg_last_xact_replay_timestamp()", R, W.READ),
    case("SELECT inet_server_port(), current_setting('server_version'), version()", R, W.READ),
    case("SELECT pg_backend_pid()", R, W.READ),
    case("SELECT * FROM generate_series(1, 10) AS g(i)", R, W.READ),
    case(
        "SELECT random(), clock_timestamp(), timeofday(), gen_random_uuid()",
        R,
        W.READ,
        id="allowlisted volatile",
    ),
    case("SELECT pg_sleep(0.1)", R, W.READ),
    case("SELECT pg_catalog.lower('A'), pg_catalog.random()", R, W.READ, id="pg_catalog qualified"),
    case("SELECT pg_size_pretty(pg_total_relation_size('t'))", R, W.READ),
    case("SELECT my_stable(a), my_immutable(b) FROM t", R, W.READ),
    case("SELECT reporting.stable_fn()", R, W.READ, id="schema-qualified stable"),
    case('SELECT public."MixedCase"(1)', R, W.READ, id="quoted function name"),
    case("SELECT * FROM t, LATERAL (SELECT my_stable(t.a)) s", R, W.READ),
    case("SELECT jsonb_build_object('a', 1) -> 'a', to_jsonb(t) FROM t", R, W.READ),
    case("SELECT x FROM t WHERE x ->> 'k' = 'v' AND y @> '{\"a\": 1}'", R, W.READ),
    case("SELECT * FROM t TABLESAMPLE SYSTEM (10)", R, W.READ),
    case("SELECT ARRAY[1, 2], ROW(1, 2), interval '1 day', timestamp '2020-01-01'", R, W.READ),
    case("SHOW search_path", R, W.READ),
    case("SHOW ALL", R, W.READ),
    case("SHOW TRANSACTION ISOLATION LEVEL", R, W.READ),
    case("SELECT json_object('a': 1), json_array(1, 2)", R, W.READ, id="SQL/JSON constructors"),
    case("SELECT xmlelement(name a, 'x')", R, W.READ),
]

CTES = [
    case("WITH a AS (SELECT 1 AS x) SELECT x FROM a", R, W.READ, id="read-only CTE"),
    case(
        "WITH a AS (SELECT 1), b AS (WITH c AS (SELECT 2) SELECT * FROM c) SELECT * FROM a, b",
        R,
        W.READ,
        id="nested read-only CTE",
    ),
    case(
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r",
        R,
        W.READ,
    ),
    case("WITH a AS MATERIALIZED (SELECT * FROM t) SELECT * FROM a", R, W.READ),
    case(
        "WITH x AS (INSERT INTO t (a) VALUES (1) RETURNING id) SELECT id FROM x",
        P,
        W.WRITABLE_CTE,
        id="writable CTE insert",
    ),
    case("WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x", P, W.WRITABLE_CTE),
    case(
        "WITH x AS (DELETE FROM t WHERE a = 1 RETURNING *) SELECT count(*) FROM x",
        P,
        W.WRITABLE_CTE,
    ),
    case(
        "WITH a AS (SELECT 1), b AS (WITH c AS (DELETE FROM t RETURNING 1) SELECT * FROM c) SELECT * FROM b",
        P,
        W.WRITABLE_CTE,
        id="writable CTE nested in a CTE",
    ),
    case(
        "WITH x AS (MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE RETURNING t.id) SELECT * FROM x",
        P,
        W.WRITABLE_CTE,
    ),
    case("WITH a AS (SELECT * FROM t FOR UPDATE) SELECT * FROM a", P, W.LOCKING_CLAUSE),
    case("WITH a AS (SELECT my_volatile()) SELECT * FROM a", P, W.VOLATILE_FUNCTION),
    case(
        "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", P, W.WRITE, id="CTE feeding an insert"
    ),
]

WRITES = [
    case("INSERT INTO t (a) VALUES (1)", P, W.WRITE),
    case("insert into t values (1)", P, W.WRITE, id="lowercase insert"),
    case("INSERT INTO t SELECT * FROM u", P, W.WRITE),
    case(
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = excluded.a RETURNING *",
        P,
        W.WRITE,
    ),
    case("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING", P, W.WRITE),
    case("UPDATE t SET a = a + 1 WHERE id = $1", P, W.WRITE),
    case("UPDATE t SET a = u.a FROM u WHERE t.id = u.id", P, W.WRITE),
    case("DELETE FROM t WHERE id = 1", P, W.WRITE),
    case("DELETE FROM t USING u WHERE t.id = u.id RETURNING t.*", P, W.WRITE),
    case(
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a "
        "WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.a)",
        P,
        W.WRITE,
        id="merge",
    ),
    case("SELECT 1 INTO t", P, W.SELECT_INTO),
    case("SELECT * INTO TEMP TABLE t2 FROM t", P, W.SELECT_INTO),
]

DDL = [
    case("CREATE TABLE t (id int PRIMARY KEY, a text)", P, W.DDL),
    case("CREATE TEMP TABLE tmp (id int)", P, W.DDL),
    case("CREATE UNLOGGED TABLE IF NOT EXISTS t (id int)", P, W.DDL),
    case("ALTER TABLE t ADD COLUMN b int DEFAULT 0", P, W.DDL),
    case("ALTER TABLE t RENAME TO u", P, W.DDL),
    case("ALTER TABLE t REPLICA IDENTITY FULL", P, W.DDL),
    case("DROP TABLE IF EXISTS t CASCADE", P, W.DDL),
    case("CREATE INDEX CONCURRENTLY i ON t (lower(a))", P, W.DDL),
    case("DROP INDEX i", P, W.DDL),
    case("CREATE VIEW v AS SELECT * FROM t", P, W.DDL),
    case("CREATE OR REPLACE VIEW v AS SELECT 1", P, W.DDL),
    case("CREATE MATERIALIZED VIEW mv AS SELECT * FROM t", P, W.DDL),
    case("CREATE TABLE t2 AS SELECT * FROM t", P, W.DDL),
    case(
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ INSERT INTO t VALUES (1) $$",
        P,
        W.DDL,
        id="create function",
    ),
    case("CREATE EXTENSION IF NOT EXISTS pgcrypto", P, W.DDL),
    case("CREATE SCHEMA s", P, W.DDL),
    case("CREATE SEQUENCE s", P, W.DDL),
    case("ALTER SEQUENCE s RESTART WITH 1", P, W.DDL),
    case("CREATE TYPE mood AS ENUM ('sad', 'ok')", P, W.DDL),
    case("CREATE TYPE pair AS (a int, b int)", P, W.DDL),
    case("ALTER TYPE mood ADD VALUE 'happy'", P, W.DDL),
    case("CREATE DOMAIN posint AS int CHECK (VALUE > 0)", P, W.DDL),
    case("CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()", P, W.DDL),
    case("CREATE POLICY p ON t USING (tenant = current_setting('app.current_tenant'))", P, W.DDL),
    case("CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING", P, W.DDL),
    case("GRANT SELECT ON t TO bob", P, W.DDL),
    case("REVOKE ALL ON t FROM bob", P, W.DDL),
    case("GRANT admin TO bob", P, W.DDL),
    case("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO bob", P, W.DDL),
    case("COMMENT ON TABLE t IS 'INSERT here'", P, W.DDL),
    case("SECURITY LABEL ON TABLE t IS 'x'", P, W.DDL),
    case("TRUNCATE t", P, W.DDL),
    case("TRUNCATE TABLE t, u RESTART IDENTITY", P, W.DDL),
    case("CREATE ROLE bob LOGIN", P, W.DDL),
    case("ALTER ROLE bob SET search_path = x", P, W.DDL),
    case("DROP ROLE bob", P, W.DDL),
    case("REASSIGN OWNED BY bob TO alice", P, W.DDL),
    case("DROP OWNED BY bob", P, W.DDL),
    case("ALTER SYSTEM SET work_mem = '64MB'", P, W.DDL),
    case("CREATE DATABASE d", P, W.DDL),
    case("DROP DATABASE d", P, W.DDL),
    case("ALTER DATABASE d SET timezone = 'UTC'", P, W.DDL),
    case("CREATE PUBLICATION p FOR ALL TABLES", P, W.DDL),
    case("IMPORT FOREIGN SCHEMA s FROM SERVER srv INTO public", P, W.DDL),
]

LOCKING = [
    case("SELECT * FROM t FOR UPDATE", P, W.LOCKING_CLAUSE),
    case("SELECT * FROM t FOR NO KEY UPDATE", P, W.LOCKING_CLAUSE),
    case("SELECT * FROM t FOR SHARE", P, W.LOCKING_CLAUSE),
    case("SELECT * FROM t FOR KEY SHARE", P, W.LOCKING_CLAUSE),
    case("SELECT * FROM t WHERE id = 1 FOR UPDATE SKIP LOCKED", P, W.LOCKING_CLAUSE),
    case("SELECT * FROM t FOR UPDATE OF t NOWAIT", P, W.LOCKING_CLAUSE),
    case(
        "SELECT * FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)",
        P,
        W.LOCKING_CLAUSE,
        id="locking subquery",
    ),
    case(
        "SELECT * FROM (SELECT * FROM t FOR SHARE) s",
        P,
        W.LOCKING_CLAUSE,
        id="locking FROM subquery",
    ),
    case("SELECT EXISTS (SELECT 1 FROM t FOR KEY SHARE)", P, W.LOCKING_CLAUSE),
    case("SELECT 1 UNION SELECT * FROM (SELECT 2 FROM t FOR UPDATE) s", P, W.LOCKING_CLAUSE),
    case("SELECT 'FOR UPDATE' FROM t", R, W.READ, id="locking words in a string"),
]

FUNCTIONS = [
    case("SELECT nextval('s')", P, W.NEXTVAL),
    case("SELECT pg_catalog.nextval('s')", P, W.NEXTVAL),
    case("SELECT setval('s', 10)", P, W.NEXTVAL),
    case("SELECT currval('s')", P, W.NEXTVAL),
    case("SELECT lastval()", P, W.NEXTVAL),
    case("SELECT a FROM t WHERE id = nextval('s')", P, W.NEXTVAL, id="nextval in WHERE"),
    case("SELECT pg_advisory_lock(1)", P, W.ADVISORY_LOCK),
    case("SELECT pg_try_advisory_xact_lock(1, 2)", P, W.ADVISORY_LOCK),
    case("SELECT pg_advisory_unlock_all()", P, W.ADVISORY_LOCK),
    case("SELECT * FROM t WHERE pg_try_advisory_lock(t.id) LIMIT 1", P, W.ADVISORY_LOCK),
    case("SELECT set_config('app.current_tenant', '42', false)", P, W.SET_CONFIG),
    case("SELECT pg_notify('ch', 'payload')", P, W.LISTEN_NOTIFY),
    case("SELECT lo_create(0)", P, W.WRITER_FUNCTION),
    case("SELECT lo_import('/tmp/f')", P, W.WRITER_FUNCTION),
    case("SELECT txid_current()", P, W.WRITER_FUNCTION),
    case("SELECT pg_current_xact_id()", P, W.WRITER_FUNCTION),
    case("SELECT pg_switch_wal()", P, W.WRITER_FUNCTION),
    case("SELECT pg_terminate_backend(123)", P, W.WRITER_FUNCTION),
    case("SELECT pg_cancel_backend(pid) FROM pg_stat_activity", P, W.WRITER_FUNCTION),
    case("SELECT pg_wal_replay_pause()", P, W.WRITER_FUNCTION),
    case("SELECT my_volatile()", P, W.VOLATILE_FUNCTION),
    case(
        "SELECT * FROM t ORDER BY my_volatile()", P, W.VOLATILE_FUNCTION, id="volatile in ORDER BY"
    ),
    case("SELECT * FROM t WHERE a = my_volatile()", P, W.VOLATILE_FUNCTION, id="volatile in WHERE"),
    case(
        "SELECT a FROM t GROUP BY a HAVING max(b) > my_volatile()",
        P,
        W.VOLATILE_FUNCTION,
        id="in HAVING",
    ),
    case(
        "SELECT * FROM my_volatile() AS f(x)", P, W.VOLATILE_FUNCTION, id="volatile function scan"
    ),
    case(
        "SELECT * FROM t WHERE a IN (SELECT my_volatile())",
        P,
        W.VOLATILE_FUNCTION,
        id="in subquery",
    ),
    case("SELECT * FROM t JOIN u ON u.a = my_volatile()", P, W.VOLATILE_FUNCTION, id="in JOIN ON"),
    case("SELECT CASE WHEN a THEN my_volatile() END FROM t", P, W.VOLATILE_FUNCTION, id="in CASE"),
    case(
        "SELECT sum(a) OVER (PARTITION BY my_volatile()) FROM t",
        P,
        W.VOLATILE_FUNCTION,
        id="in window",
    ),
    case("SELECT * FROM t, LATERAL my_volatile(t.a) f", P, W.VOLATILE_FUNCTION, id="in LATERAL"),
    case("SELECT app.tenant_fn()", P, W.VOLATILE_FUNCTION, id="schema-qualified volatile"),
    case(
        "SELECT count(*) FILTER (WHERE my_volatile()) FROM t",
        P,
        W.VOLATILE_FUNCTION,
        id="in FILTER",
    ),
    case("SELECT unknown_fn()", P, W.UNKNOWN_FUNCTION),
    case("SELECT other.my_stable()", P, W.UNKNOWN_FUNCTION, id="known name, unknown schema"),
    case("SELECT x.y.z.my_stable()", P, W.UNKNOWN_FUNCTION, id="over-qualified name"),
    case("SELECT overloaded(1)", P, W.VOLATILE_FUNCTION, id="one overload volatile"),
    case("SELECT public.overloaded(1)", R, W.READ, id="qualified stable overload"),
    case("SELECT my_volatile(), nextval('s')", P, W.NEXTVAL, id="definite reason beats suspicion"),
    case("SELECT unknown_fn() FROM t FOR UPDATE", P, W.LOCKING_CLAUSE, id="locking beats unknown"),
    case("SELECT 'my_volatile()', \"my_volatile\" FROM t", R, W.READ, id="function name as data"),
    case("SELECT uuidv7()", R, W.READ),
]

EXPLAIN = [
    case("EXPLAIN SELECT * FROM t", R, W.READ),
    case("EXPLAIN UPDATE t SET a = 1", R, W.READ, id="EXPLAIN UPDATE plans only"),
    case("EXPLAIN INSERT INTO t VALUES (nextval('s'))", R, W.READ),
    case("EXPLAIN SELECT * FROM t FOR UPDATE", R, W.READ),
    case("EXPLAIN ANALYZE UPDATE t SET a = 1", P, W.WRITE, id="EXPLAIN ANALYZE UPDATE"),
    case("EXPLAIN ANALYZE SELECT * FROM t", R, W.READ, id="EXPLAIN ANALYZE SELECT"),
    case("EXPLAIN ANALYZE VERBOSE DELETE FROM t", P, W.WRITE),
    case("EXPLAIN (ANALYZE) DELETE FROM t", P, W.WRITE),
    case("EXPLAIN (ANALYZE true, BUFFERS) INSERT INTO t VALUES (1)", P, W.WRITE),
    case("EXPLAIN (ANALYZE on) INSERT INTO t VALUES (1)", P, W.WRITE),
    case("EXPLAIN (ANALYZE 1) INSERT INTO t VALUES (1)", P, W.WRITE),
    case("EXPLAIN (ANALYZE false) INSERT INTO t VALUES (1)", R, W.READ),
    case("EXPLAIN (ANALYZE off, COSTS off) INSERT INTO t VALUES (1)", R, W.READ),
    case("EXPLAIN (ANALYZE 0) INSERT INTO t VALUES (1)", R, W.READ),
    case("EXPLAIN (FORMAT JSON) SELECT 1", R, W.READ),
    case("EXPLAIN ANALYZE SELECT nextval('s')", P, W.NEXTVAL),
    case("EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE", P, W.LOCKING_CLAUSE),
    case("EXPLAIN ANALYZE SELECT my_volatile()", P, W.VOLATILE_FUNCTION),
    case("EXPLAIN ANALYZE CREATE TABLE t2 AS SELECT 1", P, W.DDL),
    case("EXPLAIN ANALYZE EXECUTE p", P, W.PREPARED_STATEMENT),
    case(
        "EXPLAIN ANALYZE WITH x AS (DELETE FROM t RETURNING 1) SELECT * FROM x", P, W.WRITABLE_CTE
    ),
]

COPY = [
    case("COPY t TO STDOUT", R, W.READ),
    case("COPY t (a, b) TO STDOUT WITH (FORMAT csv, HEADER)", R, W.READ),
    case("COPY (SELECT * FROM t WHERE a > 1) TO STDOUT", R, W.READ),
    case("COPY (SELECT nextval('s')) TO STDOUT", P, W.NEXTVAL),
    case("COPY (SELECT * FROM t FOR UPDATE) TO STDOUT", P, W.LOCKING_CLAUSE),
    case("COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT", P, W.WRITE),
    case("COPY t FROM STDIN", P, W.COPY_FROM),
    case("COPY t (a, b) FROM STDIN WITH (FORMAT csv)", P, W.COPY_FROM),
    case("COPY t FROM '/tmp/data.csv'", P, W.COPY_FROM),
    case("COPY t FROM PROGRAM 'cat /tmp/x'", P, W.COPY_FROM),
    case("COPY t TO '/tmp/out.csv'", P, W.COPY_TO_FILE),
    case("COPY (SELECT 1) TO PROGRAM 'cat'", P, W.COPY_TO_FILE),
]

OTHER_PRIMARY = [
    case("CALL proc(1)", P, W.CALL_DO),
    case("DO $$ BEGIN INSERT INTO t VALUES (1); END $$", P, W.CALL_DO),
    case("DO LANGUAGE plpgsql $body$ BEGIN PERFORM 1; END $body$", P, W.CALL_DO),
    # A DO body that may change settings: the session cannot know what it set.
    case("DO $$BEGIN SET search_path = x; END$$", P, W.CALL_DO, K.DO_SESSION),
    case("do $$ begin perform Set_Config('app.t', '1', false); end $$", P, W.CALL_DO, K.DO_SESSION),
    case("DO $$ BEGIN EXECUTE 'SET search_path = ' || quote_ident('x'); END $$", P, W.CALL_DO, K.DO_SESSION),
    case("DO $$ BEGIN EXECUTE format('RESET %I', 'work_mem'); END $$", P, W.CALL_DO, K.DO_SESSION),
    case("DO $$ BEGIN IF true THEN DISCARD ALL; END IF; END $$", P, W.CALL_DO, K.DO_SESSION),
    case("DO $$ BEGIN PERFORM 1;\n  SET LOCAL work_mem = '8MB'; END $$", P, W.CALL_DO, K.DO_SESSION),
    case("DO LANGUAGE plpgsql $b$ BEGIN UPDATE t SET a = 1; END $b$", P, W.CALL_DO, id="DO with an UPDATE ... SET"),
    case("VACUUM", P, W.MAINTENANCE),
    case("VACUUM (ANALYZE, VERBOSE) t", P, W.MAINTENANCE),
    case("ANALYZE", P, W.MAINTENANCE),
    case("ANALYZE t (a)", P, W.MAINTENANCE),
    case("CLUSTER t USING i", P, W.MAINTENANCE),
    case("REINDEX TABLE t", P, W.MAINTENANCE),
    case("REFRESH MATERIALIZED VIEW mv", P, W.MAINTENANCE),
    case("REFRESH MATERIALIZED VIEW CONCURRENTLY mv", P, W.MAINTENANCE),
    case("CHECKPOINT", P, W.MAINTENANCE),
    case("LOAD 'auto_explain'", P, W.MAINTENANCE),
    case("LOCK TABLE t", P, W.LOCK),
    case("LOCK t IN ACCESS SHARE MODE", P, W.LOCK),
    case("LISTEN ch", P, W.LISTEN_NOTIFY, K.LISTEN),
    case("UNLISTEN ch", P, W.LISTEN_NOTIFY, K.UNLISTEN),
    case("UNLISTEN *", P, W.LISTEN_NOTIFY, K.UNLISTEN),
    case("NOTIFY ch, 'hello'", P, W.LISTEN_NOTIFY),
    case("PREPARE TRANSACTION 'gx'", P, W.TWO_PHASE, K.PREPARE_TRANSACTION),
    case("COMMIT PREPARED 'gx'", P, W.TWO_PHASE),
    case("ROLLBACK PREPARED 'gx'", P, W.TWO_PHASE),
]

TRANSACTIONS = [
    case("BEGIN", P, W.TRANSACTION_BEGIN_READ_WRITE, K.BEGIN),
    case("begin", P, W.TRANSACTION_BEGIN_READ_WRITE, K.BEGIN, id="lowercase begin"),
    case("BEGIN WORK", P, W.TRANSACTION_BEGIN_READ_WRITE, K.BEGIN),
    case("BEGIN TRANSACTION", P, W.TRANSACTION_BEGIN_READ_WRITE, K.BEGIN),
    case("START TRANSACTION", P, W.TRANSACTION_BEGIN_READ_WRITE, K.BEGIN),
    case("BEGIN READ WRITE", P, W.TRANSACTION_READ_WRITE, K.BEGIN),
    case("START TRANSACTION ISOLATION LEVEL READ COMMITTED, READ WRITE", P, W.TRANSACTION_READ_WRITE, K.BEGIN),
    case("BEGIN ISOLATION LEVEL REPEATABLE READ", P, W.TRANSACTION_BEGIN_READ_WRITE, K.BEGIN),
    case("BEGIN READ ONLY", R, W.TRANSACTION_BEGIN_READ_ONLY, K.BEGIN_READ_ONLY),
    case(
        "begin read only",
        R,
        W.TRANSACTION_BEGIN_READ_ONLY,
        K.BEGIN_READ_ONLY,
        id="lowercase read only",
    ),
    case("START TRANSACTION READ ONLY", R, W.TRANSACTION_BEGIN_READ_ONLY, K.BEGIN_READ_ONLY),
    case("BEGIN TRANSACTION READ ONLY", R, W.TRANSACTION_BEGIN_READ_ONLY, K.BEGIN_READ_ONLY),
    case(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE",
        R,
        W.TRANSACTION_BEGIN_READ_ONLY,
        K.BEGIN_READ_ONLY,
    ),
    case(
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY",
        P,
        W.SERIALIZABLE,
        K.BEGIN_READ_ONLY,
        id="serializable read only: a standby refuses it",
    ),
    case("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", P, W.SERIALIZABLE, K.BEGIN),
    case("COMMIT", R, W.TRANSACTION_CONTROL, K.COMMIT),
    case("COMMIT WORK", R, W.TRANSACTION_CONTROL, K.COMMIT),
    case("END", R, W.TRANSACTION_CONTROL, K.COMMIT),
    case("END TRANSACTION", R, W.TRANSACTION_CONTROL, K.COMMIT),
    case("ROLLBACK", R, W.TRANSACTION_CONTROL, K.ROLLBACK),
    case("ABORT", R, W.TRANSACTION_CONTROL, K.ROLLBACK),
    case("COMMIT AND CHAIN", R, W.TRANSACTION_CONTROL, K.COMMIT_AND_CHAIN),
    case("ROLLBACK AND CHAIN", R, W.TRANSACTION_CONTROL, K.ROLLBACK_AND_CHAIN),
    case("COMMIT AND NO CHAIN", R, W.TRANSACTION_CONTROL, K.COMMIT),
    case("SAVEPOINT s1", R, W.TRANSACTION_CONTROL, K.SAVEPOINT),
    case("RELEASE SAVEPOINT s1", R, W.TRANSACTION_CONTROL, K.SAVEPOINT),
    case("RELEASE s1", R, W.TRANSACTION_CONTROL, K.SAVEPOINT),
    case("ROLLBACK TO SAVEPOINT s1", R, W.TRANSACTION_CONTROL, K.SAVEPOINT),
    case("ROLLBACK TO s1", R, W.TRANSACTION_CONTROL, K.SAVEPOINT),
    case(
        "SET TRANSACTION READ ONLY", R, W.TRANSACTION_BEGIN_READ_ONLY, K.SET_TRANSACTION_READ_ONLY
    ),
    case(
        "SET TRANSACTION READ WRITE",
        P,
        W.TRANSACTION_READ_WRITE,
        K.SET_TRANSACTION_READ_WRITE,
    ),
    case(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        R,
        W.TRANSACTION_CONTROL,
        K.SET_TRANSACTION,
    ),
    case("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", P, W.SERIALIZABLE, K.SET_TRANSACTION),
    case(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        R,
        W.TRANSACTION_BEGIN_READ_ONLY,
        K.SET_TRANSACTION_READ_ONLY,
    ),
    case(
        "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
        R,
        W.TRANSACTION_CONTROL,
        K.SET_TRANSACTION,
    ),
    case(
        "SET transaction_read_only = on",
        R,
        W.TRANSACTION_BEGIN_READ_ONLY,
        K.SET_TRANSACTION_READ_ONLY,
    ),
    case(
        "SET transaction_read_only TO off",
        P,
        W.TRANSACTION_READ_WRITE,
        K.SET_TRANSACTION_READ_WRITE,
    ),
    case("SET transaction_isolation = 'serializable'", P, W.SERIALIZABLE, K.SET_TRANSACTION),
    case("SET CONSTRAINTS ALL DEFERRED", R, W.TRANSACTION_CONTROL),
]

SESSION = [
    case("SET search_path = app, public", R, W.SESSION_SET, K.SET_SESSION),
    case("SET SESSION statement_timeout = 5000", R, W.SESSION_SET, K.SET_SESSION),
    case("SET app.current_tenant = '42'", R, W.SESSION_SET, K.SET_SESSION),
    case("SET LOCAL statement_timeout TO '1s'", R, W.SESSION_SET, K.SET_LOCAL),
    case("SET work_mem TO DEFAULT", R, W.SESSION_SET, K.RESET),
    case("SET LOCAL work_mem TO DEFAULT", R, W.SESSION_SET, K.SET_LOCAL),
    case("SET search_path FROM CURRENT", R, W.SESSION_SET, K.SET_SESSION),
    case("RESET work_mem", R, W.SESSION_SET, K.RESET),
    case("RESET ALL", R, W.SESSION_SET, K.RESET_ALL),
    case("SET TIME ZONE 'UTC'", R, W.SESSION_SET, K.SET_SESSION),
    case("SET TIME ZONE LOCAL", R, W.SESSION_SET, K.RESET),
    case("SET NAMES 'UTF8'", R, W.SESSION_SET, K.SET_SESSION),
    case("SET ROLE admin", R, W.SESSION_SET, K.SET_SESSION),
    case("RESET ROLE", R, W.SESSION_SET, K.RESET),
    case("SET SESSION AUTHORIZATION bob", R, W.SESSION_SET, K.SET_SESSION),
    case("SET default_transaction_read_only = on", R, W.SESSION_SET, K.SET_DEFAULT_READ_ONLY),
    case("SET default_transaction_read_only TO false", R, W.SESSION_SET, K.SET_DEFAULT_READ_ONLY),
    case("SET default_transaction_read_only = 1", R, W.SESSION_SET, K.SET_DEFAULT_READ_ONLY),
    case(
        "SET default_transaction_read_only = 'maybe'",
        R,
        W.SESSION_SET,
        K.SET_SESSION,
        id="invalid bool",
    ),
    case("SET LOCAL default_transaction_read_only = on", R, W.SESSION_SET, K.SET_LOCAL),
    case(
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        R,
        W.SESSION_SET,
        K.SET_DEFAULT_READ_ONLY,
    ),
    case(
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        R,
        W.SESSION_SET,
        K.SET_SESSION,
    ),
    case(
        "SET pgrouter.target = primary",
        R,
        W.SESSION_SET,
        K.ROUTER_TARGET,
        id="reserved word primary",
    ),
    case("set session PGROUTER.target TO primary ;", R, W.SESSION_SET, K.ROUTER_TARGET),
    case(
        "SET pgrouter.target = primary; SELECT 1", P, W.UNPARSABLE, id="primary unquoted, not alone"
    ),
    case("SET pgrouter.target = 'replica'", R, W.SESSION_SET, K.ROUTER_TARGET),
    case(
        "set PGROUTER.TARGET to Auto",
        R,
        W.SESSION_SET,
        K.ROUTER_TARGET,
        id="router target any case",
    ),
    case("RESET pgrouter.target", R, W.SESSION_SET, K.ROUTER_TARGET),
    case("SET pgrouter.target TO DEFAULT", R, W.SESSION_SET, K.ROUTER_TARGET),
    case("SET LOCAL pgrouter.target = 'primary'", R, W.SESSION_SET, K.SET_LOCAL),
    case("SHOW pgrouter.target", R, W.READ, K.SHOW_ROUTER_TARGET),
    case('/* which? */ show "PGROUTER.TARGET" ;', R, W.READ, K.SHOW_ROUTER_TARGET, id="show router target quoted"),
    case("SHOW pgrouter.targets", R, W.READ, id="another placeholder"),
    case("DISCARD ALL", R, W.SESSION_SET, K.DISCARD_ALL),
    case("DISCARD PLANS", R, W.SESSION_SET, K.DISCARD),
    case("DISCARD TEMP", R, W.SESSION_SET, K.DISCARD),
    case("DISCARD SEQUENCES", R, W.SESSION_SET, K.DISCARD),
]

PREPARED_AND_CURSORS = [
    case("PREPARE p AS SELECT * FROM t WHERE id = $1", R, W.READ, K.PREPARE),
    case("PREPARE p (int) AS INSERT INTO t VALUES ($1)", P, W.WRITE, K.PREPARE),
    case("PREPARE p AS SELECT my_volatile()", P, W.VOLATILE_FUNCTION, K.PREPARE),
    case("EXECUTE p", P, W.PREPARED_STATEMENT, K.EXECUTE),
    case("EXECUTE p (1, 'a')", P, W.PREPARED_STATEMENT, K.EXECUTE),
    case("EXECUTE p (nextval('s'))", P, W.NEXTVAL, K.EXECUTE),
    case("DEALLOCATE p", R, W.SESSION_SET, K.DEALLOCATE),
    case("DEALLOCATE PREPARE p", R, W.SESSION_SET, K.DEALLOCATE),
    case("DEALLOCATE ALL", R, W.SESSION_SET, K.DEALLOCATE_ALL),
    case("DECLARE c CURSOR FOR SELECT * FROM t", R, W.READ, K.DECLARE_CURSOR),
    case("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t", R, W.READ, K.DECLARE_CURSOR),
    case("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", P, W.LOCKING_CLAUSE, K.DECLARE_CURSOR),
    case(
        "DECLARE c NO SCROLL CURSOR FOR SELECT my_volatile()",
        P,
        W.VOLATILE_FUNCTION,
        K.DECLARE_CURSOR,
    ),
    case("FETCH 10 FROM c", R, W.CURSOR, K.FETCH),
    case("FETCH ALL IN c", R, W.CURSOR, K.FETCH),
    case("MOVE NEXT IN c", R, W.CURSOR, K.FETCH),
    case("CLOSE c", R, W.CURSOR, K.CLOSE_CURSOR),
    case("CLOSE ALL", R, W.CURSOR, K.CLOSE_CURSOR),
]

MULTI = [
    case("SELECT 1; INSERT INTO t VALUES (1)", P, W.WRITE, K.MULTIPLE),
    case("INSERT INTO t VALUES (1); SELECT 1", P, W.WRITE, K.MULTIPLE),
    case("SELECT 1; SELECT 2", R, W.READ, K.MULTIPLE),
    case(
        "SELECT 1; SELECT nextval('s'); DELETE FROM t",
        P,
        W.NEXTVAL,
        K.MULTIPLE,
        id="first primary decides",
    ),
    case("BEGIN; SELECT 1; COMMIT", P, W.TRANSACTION_BEGIN_READ_WRITE, K.MULTIPLE),
    case("BEGIN READ ONLY; SELECT 1; COMMIT;", R, W.TRANSACTION_BEGIN_READ_ONLY, K.MULTIPLE),
    case("SET search_path = app; SELECT * FROM t", R, W.SESSION_SET, K.MULTIPLE),
    case("SELECT 1;\n-- a comment\n;UPDATE t SET a = 1;", P, W.WRITE, K.MULTIPLE),
    case("SELECT ';'; SELECT 'INSERT'", R, W.READ, K.MULTIPLE, id="semicolon in a string"),
]

LEXICAL = [
    case("/* leading */ SELECT 1", R, W.READ),
    case("-- leading\nSELECT 1", R, W.READ),
    case("SELECT 1 -- trailing; DELETE FROM t", R, W.READ, id="write in a trailing line comment"),
    case("SELECT 1 /* trailing */", R, W.READ),
    case(
        "/* outer /* INSERT INTO t */ still a comment; DELETE FROM t */ SELECT 1",
        R,
        W.READ,
        id="nested comment",
    ),
    case("SELECT /* ; UPDATE t SET a = 1; */ 1", R, W.READ, id="write in an inner comment"),
    case("/* a */ /* b */ -- c\n INSERT /* d */ INTO t VALUES (1)", P, W.WRITE),
    case("SELECT $$INSERT INTO t VALUES (1); DROP TABLE t$$", R, W.READ, id="dollar quoted write"),
    case("SELECT $tag$ DELETE FROM t; $$ nested $$ $tag$", R, W.READ, id="tagged dollar quote"),
    case("SELECT $a$ $b$ UPDATE $b$ $a$ AS x", R, W.READ, id="dollar quote in dollar quote"),
    case("SELECT 'it''s; INSERT INTO t'", R, W.READ, id="doubled quote"),
    case("SELECT E'\\'; INSERT INTO t VALUES (1); --'", R, W.READ, id="escaped quote in E string"),
    case("SELECT e'tab\\there'", R, W.READ, id="lowercase e string"),
    case("SELECT U&'d\\0061t\\+000061'", R, W.READ, id="unicode escape string"),
    case(
        'SELECT "select", "Insert", "delete" FROM "Update"', R, W.READ, id="keywords as identifiers"
    ),
    case('SELECT * FROM "INSERT" WHERE "FOR" = 1', R, W.READ),
    case('INSERT INTO "select" VALUES (1)', P, W.WRITE, id="table named select"),
    case("SELECT \"nextval\"('s')", P, W.NEXTVAL, id="quoted nextval is still nextval"),
    case("SELECT 'héllo €', 'naïve' /* ünïcode */", R, W.READ, id="non-ascii"),
    case("SELECT B'1010', X'FF', 1e10, .5, 0x1F", R, W.READ, id="numeric and bit literals"),
]

UNPARSABLE = [
    case("garbage", P, W.UNPARSABLE),
    case("SELEC 1", P, W.UNPARSABLE),
    case("SELECT 'abc", P, W.UNPARSABLE, id="unterminated string"),
    case("SELECT $$abc", P, W.UNPARSABLE, id="unterminated dollar quote"),
    case('SELECT "abc', P, W.UNPARSABLE, id="unterminated quoted identifier"),
    case("/* unterminated comment SELECT 1", P, W.UNPARSABLE),
    case("SELECT 1 FROM", P, W.UNPARSABLE),
    case("INSERT INTO", P, W.UNPARSABLE),
    case("SELECT 1; SELEC 2", P, W.UNPARSABLE, id="one bad statement spoils the message"),
    case("\\copy t from stdin", P, W.UNPARSABLE, id="psql meta-command"),
    case("REPACK t", P, W.UNPARSABLE, id="newer than the parser: REPACK"),
    case("SELECT a FROM t GROUP BY ALL", P, W.UNPARSABLE, id="newer than the parser: GROUP BY ALL"),
    case("WAIT FOR LSN '0/1'", P, W.UNPARSABLE, id="newer than the parser: WAIT FOR LSN"),
    case("SELECT 1\x00; DELETE FROM t", P, W.UNPARSABLE, id="NUL in text"),
    case("please select my rows", P, W.UNPARSABLE),
]

EMPTY = [
    case("", R, W.EMPTY),
    case("   \n\t ", R, W.EMPTY),
    case(";", R, W.EMPTY),
    case(";;;", R, W.EMPTY),
    case("/* only a comment */", R, W.EMPTY),
    case("-- only a comment", R, W.EMPTY),
    case("/* a /* nested */ */ ; -- b\n ;", R, W.EMPTY),
]

HINTS = [
    case("/* pgrouter: primary */ SELECT 1", P, W.HINT),
    case("/* pgrouter: replica */ SELECT 1", R, W.HINT),
    case(
        "/* pgrouter: replica */ SELECT my_volatile()", R, W.HINT, id="replica hint over volatile"
    ),
    case("-- pgrouter: replica\nSELECT unknown_fn()", R, W.HINT, id="line comment hint"),
    case("/*PGROUTER:REPLICA*/select unknown_fn()", R, W.HINT, id="hint without spaces"),
    case("/*   pgrouter  :   Replica   */ SELECT 1", R, W.HINT, id="hint with spaces"),
    case("\n  /* pgrouter: primary */\n SELECT 1", P, W.HINT, id="hint after whitespace"),
    case(
        "/* app: x */ /* pgrouter: primary */ SELECT 1", P, W.HINT, id="hint after another comment"
    ),
    case(
        "/* pgrouter: replica */ INSERT INTO t VALUES (1)", P, W.WRITE, id="replica hint on a write"
    ),
    case("/* pgrouter: replica */ SELECT * FROM t FOR UPDATE", P, W.LOCKING_CLAUSE),
    case("/* pgrouter: replica */ SELECT nextval('s')", P, W.NEXTVAL),
    case("/* pgrouter: replica */ SELECT my_volatile(), pg_advisory_lock(1)", P, W.ADVISORY_LOCK),
    case("/* pgrouter: replica */ CREATE TABLE t (a int)", P, W.DDL),
    case("/* pgrouter: replica */ CALL p()", R, W.HINT),
    case("/* pgrouter: replica */ EXECUTE p", R, W.HINT, K.EXECUTE),
    case("/* pgrouter: replica */ BEGIN", R, W.HINT, K.BEGIN, id="replica hint on BEGIN"),
    case("/* pgrouter: replica */ BEGIN ISOLATION LEVEL SERIALIZABLE", P, W.SERIALIZABLE, K.BEGIN),
    case("/* pgrouter: replica */ garbage", R, W.HINT, id="replica hint on unparsable"),
    case("/* pgrouter: primary */ garbage", P, W.HINT),
    case("/* pgrouter: primary */ COMMIT", P, W.HINT, K.COMMIT),
    case("/* pgrouter: replica */ SET x = 1", R, W.HINT, K.SET_SESSION),
    case(
        "/* pgrouter: replica */ SELECT 1; SELECT my_volatile()",
        R,
        W.HINT,
        K.MULTIPLE,
        id="hint covers message",
    ),
    case("/* pgrouter: replica */ SELECT 1; DELETE FROM t", P, W.WRITE, K.MULTIPLE),
    case("/* pgrouter: primary */ SELECT 1; SELECT 2", P, W.HINT, K.MULTIPLE),
    case("SELECT 1 /* pgrouter: primary */", R, W.READ, id="trailing comment is not a hint"),
    case(
        "SELECT 1; /* pgrouter: primary */ SELECT 2",
        R,
        W.READ,
        K.MULTIPLE,
        id="mid-message comment",
    ),
    case("/* pgrouter: standby */ SELECT 1", R, W.READ, id="unknown hint target"),
    case(
        "/* pgrouter: replica, please */ SELECT my_volatile()",
        P,
        W.VOLATILE_FUNCTION,
        id="not exactly a hint",
    ),
    case("/* router: replica */ SELECT my_volatile()", P, W.VOLATILE_FUNCTION, id="other prefix"),
    case("/* pgrouter: replica */", R, W.EMPTY, id="hint alone"),
]

ALL_CASES = (
    READS
    + CTES
    + WRITES
    + DDL
    + LOCKING
    + FUNCTIONS
    + EXPLAIN
    + COPY
    + OTHER_PRIMARY
    + TRANSACTIONS
    + SESSION
    + PREPARED_AND_CURSORS
    + MULTI
    + LEXICAL
    + UNPARSABLE
    + EMPTY
    + HINTS
)


def test_the_table_is_large_and_has_no_duplicates():
    statements = [param.values[0] for param in ALL_CASES]
    assert len(statements) >= 150
    assert len(set(statements)) == len(statements)


@pytest.mark.parametrize(("sql", "target", "reason", "kind"), ALL_CASES)
def test_verdict(sql: str, target: Target, reason: Reason, kind: StatementKind):
    verdict = classify(sql, CATALOG).verdict
    assert (verdict.target, verdict.reason, verdict.kind) == (target, reason, kind)


# --- what kinds carry ----------------------------------------------------------------------


def only(sql: str):
    (statement,) = classify(sql, CATALOG).statements
    return statement


@pytest.mark.parametrize(
    ("sql", "name", "value", "read_only"),
    [
        ('SET search_path = app, "My Schema"', "search_path", "app, My Schema", None),
        ("SET Statement_Timeout TO 5000", "statement_timeout", "5000", None),
        ("SET extra_float_digits = -1.5", "extra_float_digits", "-1.5", None),
        ("SET LOCAL lock_timeout = '1s'", "lock_timeout", "1s", None),
        ("SET app.current_tenant = '42'", "app.current_tenant", "42", None),
        ('SET "App.Current_Tenant" = 7', "app.current_tenant", "7", None),
        ("SET TIME ZONE 'Europe/Paris'", "timezone", "Europe/Paris", None),
        ("SET NAMES 'UTF8'", "client_encoding", "UTF8", None),
        ("RESET work_mem", "work_mem", None, None),
        ("SET work_mem TO DEFAULT", "work_mem", None, None),
        ("SET default_transaction_read_only = on", "default_transaction_read_only", "on", True),
        ("SET default_transaction_read_only = off", "default_transaction_read_only", "off", False),
        (
            "SET default_transaction_read_only TO true",
            "default_transaction_read_only",
            "true",
            True,
        ),
        (
            "SET default_transaction_read_only TO FALSE",
            "default_transaction_read_only",
            "false",
            False,
        ),
        ("SET default_transaction_read_only = 1", "default_transaction_read_only", "1", True),
        ("SET default_transaction_read_only = 0", "default_transaction_read_only", "0", False),
        ("SET default_transaction_read_only = 'yes'", "default_transaction_read_only", "yes", True),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "default_transaction_read_only",
            None,
            False,
        ),
        ("SET pgrouter.target = primary", "pgrouter.target", "primary", None),
        ("SET pgrouter.target TO 'REPLICA'", "pgrouter.target", "replica", None),
        ("SET pgrouter.target = auto", "pgrouter.target", "auto", None),
        ("RESET pgrouter.target", "pgrouter.target", "auto", None),
        ("SET pgrouter.target = bogus", "pgrouter.target", "bogus", None),
        ("LISTEN orders", "orders", None, None),
        ("UNLISTEN orders", "orders", None, None),
        ("UNLISTEN *", None, None, None),
        ("NOTIFY orders", "orders", None, None),
        ("PREPARE get_user (int) AS SELECT * FROM users WHERE id = $1", "get_user", None, None),
        ("EXECUTE get_user (1)", "get_user", None, None),
        ("DEALLOCATE get_user", "get_user", None, None),
        ("DECLARE cur CURSOR FOR SELECT 1", "cur", None, None),
        ("FETCH 5 FROM cur", "cur", None, None),
        ("CLOSE cur", "cur", None, None),
        ("CLOSE ALL", None, None, None),
        ("SAVEPOINT sp_1", "sp_1", "savepoint", None),
        ("ROLLBACK TO SAVEPOINT sp_1", "sp_1", "rollback_to", None),
        ("ROLLBACK WORK TO \"Sp 2\"", "Sp 2", "rollback_to", None),
        ("RELEASE sp_1", "sp_1", "release", None),
        ("PREPARE TRANSACTION 'tx-1'", "tx-1", None, None),
        ("DISCARD TEMP", "temp", None, None),
    ],
)
def test_statement_payload(sql, name, value, read_only):
    statement = only(sql)
    assert (statement.name, statement.value, statement.read_only) == (name, value, read_only)


def test_statement_texts_and_kinds_of_a_message():
    sql = "/* pgrouter: primary */ BEGIN;\n SET LOCAL x = 1 ;SELECT 'é;' -- c\n; COMMIT  "
    result = classify(sql, CATALOG)
    assert [s.text for s in result.statements] == [
        "BEGIN",
        "SET LOCAL x = 1",
        "SELECT 'é;' -- c",
        "COMMIT",
    ]
    assert result.kinds == (K.BEGIN, K.SET_LOCAL, K.PLAIN, K.COMMIT)
    assert result.hint is P
    assert {s.verdict.reason for s in result.statements} == {W.HINT}


def test_unparsable_text_is_one_statement():
    result = classify("  SELEC 1; SELECT 2 ", CATALOG)
    assert [s.text for s in result.statements] == ["SELEC 1; SELECT 2"]
    assert result.fingerprint is None


def test_empty_message_has_no_statements():
    result = classify(" ;; /* x */ ", CATALOG)
    assert result.statements == () and result.kinds == () and result.fingerprint is None


# --- set_config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "names", "dynamic"),
    [
        ("SELECT set_config('app.current_tenant', '1', false)", ("app.current_tenant",), False),
        (
            "SELECT pg_catalog.set_config('App.Current_Tenant', '1', true)",
            ("app.current_tenant",),
            False,
        ),
        (
            "SELECT set_config('app.current_tenant'::text, $1, false)",
            ("app.current_tenant",),
            False,
        ),
        (
            "SELECT set_config(setting_name => 'a.b', new_value => '1', is_local => false)",
            ("a.b",),
            False,
        ),
        ("SELECT * FROM t WHERE set_config('a.b', '1', true) IS NOT NULL", ("a.b",), False),
        ("SELECT 1; UPDATE t SET x = set_config('z.y', '1', false)", ("z.y",), False),
        (
            "WITH s AS (SELECT set_config('b.x', '1', false)) SELECT set_config('a.x', '2', false) FROM s",
            ("a.x", "b.x"),
            False,
        ),
        ("SELECT set_config($1, '1', false)", (), True),
        ("SELECT set_config(name, value, false) FROM settings", (), True),
        ("SELECT set_config('a' || 'b', '1', false)", (), True),
        ("EXPLAIN ANALYZE SELECT set_config('a.b', '1', false)", ("a.b",), False),
        ("EXPLAIN SELECT set_config('a.b', '1', false)", (), False),
        ("SELECT current_setting('app.current_tenant')", (), False),
        ("SELECT other.set_config('a.b', '1', false)", (), False),
        ("SELECT 'set_config(''a.b'', 1, false)'", (), False),
    ],
)
def test_set_config_names(sql, names, dynamic):
    result = classify(sql, CATALOG)
    assert (result.set_config_names, result.set_config_dynamic) == (names, dynamic)


@pytest.mark.parametrize(
    "sql, calls",
    [
        ("SELECT set_config('App.Tenant', '42', false)", (("app.tenant", "42", False),)),
        ("SELECT set_config('a.b', 'x', true)", (("a.b", "x", True),)),
        ("SELECT set_config('a.b', 'x'::text, 'off')", (("a.b", "x", False),)),
        ("SELECT set_config('a.b', 'x', 'yes'::boolean)", (("a.b", "x", True),)),
        ("SELECT set_config('a.b', $1, false)", (("a.b", None, False),)),
        ("SELECT set_config('a.b', 'x', $1)", (("a.b", "x", None),)),
        ("SELECT set_config('a.b', 'x', 'maybe')", (("a.b", "x", None),)),
        ("SELECT set_config($1, 'x', false)", ((None, "x", False),)),
        ("SELECT set_config(setting_name => 'a.b', new_value => 'x', is_local => false)", (("a.b", "x", False),)),
        (
            "SELECT set_config('a.b', '1', false); SELECT set_config('c.d', '2', true)",
            (("a.b", "1", False), ("c.d", "2", True)),
        ),
        ("SELECT set_config('a.b', '1')", (("a.b", "1", None),)),  # wrong arity: unknown
        (  # in the order they run: the last one wins
            "SELECT set_config('a.b', '1', false), set_config('a.b', '2', false), (SELECT set_config('a.b', '3', false))",
            (("a.b", "1", False), ("a.b", "2", False), ("a.b", "3", False)),
        ),
        ("EXPLAIN SELECT set_config('a.b', '1', false)", ()),  # not run
        ("EXPLAIN ANALYZE SELECT set_config('a.b', '1', false)", (("a.b", "1", False),)),
        # Runs any number of times, maybe none: the value it leaves is unknown (pins).
        ("SELECT set_config('a.b', '1', false) WHERE false", (("a.b", None, False),)),
        ("SELECT set_config('a.b', '1', false) FROM t", (("a.b", None, False),)),
        ("SELECT set_config('a.b', '1', false) LIMIT 0", (("a.b", None, False),)),
        ("SELECT CASE WHEN x THEN set_config('a.b', '1', false) END", (("a.b", None, False),)),
        ("SELECT coalesce(null, set_config('a.b', '1', false))", (("a.b", None, False),)),
        ("SELECT set_config('a.b', '1', false) UNION SELECT '2'", (("a.b", None, False),)),
        ("WITH s AS (SELECT set_config('a.b', '1', false)) SELECT 1", (("a.b", None, False),)),
        ("UPDATE t SET x = set_config('a.b', '1', false)", (("a.b", None, False),)),
        ("SELECT (SELECT set_config('a.b', '1', false) WHERE false)", (("a.b", None, False),)),
        ("SELECT 'set_config(''a.b'', ''1'', false)'", ()),
        ("SELECT 1", ()),
    ],
)
def test_set_config_calls(sql, calls):
    """What the router replays for a client (a constant call with is_local false), ignores
    (is_local true) or cannot know (None somewhere: the client is pinned)."""
    assert classify(sql, CATALOG).set_config_calls == calls


# --- fingerprints --------------------------------------------------------------------------


def test_fingerprint_ignores_constants_and_comments():
    a = classify("SELECT * FROM t WHERE id = 1", CATALOG).fingerprint
    b = classify("/* pgrouter: replica */ select *  from t where id = 42 -- x", CATALOG).fingerprint
    c = classify("SELECT * FROM t WHERE name = 'x'", CATALOG).fingerprint
    assert a is not None and a == b
    assert a != c


# --- the catalog ---------------------------------------------------------------------------


def test_catalog_lookups():
    catalog = FunctionCatalog.from_rows(
        [
            ("pg_catalog", "random", "v"),
            ("pg_catalog", "lower", "i"),
            ("public", "f", "s"),
            ("public", "f", "v"),  # an overload
            ("public", "g", "i"),
            ("Public", "G", "s"),  # names are lowercased: merged, most volatile wins
        ]
    )
    assert catalog.volatility("lower") == "i"
    assert catalog.volatility("lower", "pg_catalog") == "i"
    assert catalog.volatility("f") == "v" and catalog.check("f") is W.VOLATILE_FUNCTION
    assert catalog.volatility("g") == "s" and catalog.check("g", "public") is None
    assert catalog.check("random") is None  # allowlisted
    assert catalog.check("nope") is W.UNKNOWN_FUNCTION
    assert catalog.check("lower", "elsewhere") is W.UNKNOWN_FUNCTION
    assert catalog.check("nextval") is W.NEXTVAL  # writers need no catalog entry
    assert catalog.check("NextVal", "PG_CATALOG") is W.NEXTVAL


def test_allowlist_does_not_cover_a_user_function_of_the_same_name():
    catalog = FunctionCatalog.from_rows([("pg_catalog", "random", "v"), ("app", "random", "v")])
    assert catalog.check("random") is W.VOLATILE_FUNCTION
    assert catalog.check("random", "pg_catalog") is None
    assert catalog.check("random", "app") is W.VOLATILE_FUNCTION


def test_writer_list_wins_over_catalog_volatility():
    # txid_current is stable in pg_proc, yet assigns a transaction id.
    catalog = FunctionCatalog.from_rows([("pg_catalog", "txid_current", "s")])
    assert catalog.check("txid_current") is W.WRITER_FUNCTION
    # a user function that happens to be called nextval, schema-qualified, is judged normally
    catalog = FunctionCatalog.from_rows([("app", "nextval", "s")])
    assert catalog.check("nextval", "app") is None


@pytest.mark.parametrize(
    "sql, calls",
    [
        ("SELECT pg_advisory_lock(1)", ("pg_advisory_lock",)),
        ('SELECT U&"pg_advisory\\005flock"(1)', ("pg_advisory_lock",)),
        ("SELECT U&\"pg_try_advisory!005flock_shared\" UESCAPE '!' (1)", ("pg_try_advisory_lock_shared",)),
        ("SELECT pg_catalog.PG_ADVISORY_UNLOCK_ALL(), pg_advisory_lock(2)", ("pg_advisory_unlock_all", "pg_advisory_lock")),
        ("SELECT 1; SELECT x FROM t WHERE pg_try_advisory_lock(id)", ("pg_try_advisory_lock",)),
        ("SELECT pg_advisory_xact_lock(1)", ()),  # transaction-scoped: no pin
        ("SELECT pg_advisory_unlock(1)", ()),  # one of several: does not unpin
        ("SELECT app.pg_advisory_lock(1)", ()),  # another schema's function
        ("SELECT 'pg_advisory_lock(1)'", ()),
    ],
)
def test_pin_calls_come_from_the_parse_tree(sql, calls):
    assert classify(sql, CATALOG).pin_calls == calls


@pytest.mark.parametrize(
    "source, changes",
    [
        ("BEGIN PERFORM set_config('app.tenant', p, false); END", True),
        ("SELECT set_config('search_path', $1, false)", True),
        ("BEGIN SET search_path = app; END", True),
        ("BEGIN\n  PERFORM 1;\n  reset ALL;\nEND", True),
        ("BEGIN EXECUTE 'SET role ' || r; END", True),
        ("BEGIN EXECUTE format('set %I = %L', k, v); END", True),
        ("SET search_path = app", True),  # a SQL function's body
        ("BEGIN IF x THEN DISCARD ALL; END IF; END", True),
        ("BEGIN UPDATE t SET x = 1; RETURN 1; END", False),  # an UPDATE's SET clause
        ("BEGIN RETURN upper(p); END", False),
        ("SELECT settings FROM app.config", False),
        ("", False),
    ],
)
def test_body_may_change_session(source, changes):
    assert body_may_change_session(source) is changes


def test_catalog_knows_the_functions_that_change_settings():
    catalog = FunctionCatalog.from_rows(
        [
            ("pg_catalog", "lower", "i"),
            ("app", "set_tenant", "v", True),
            ("app", "Set_Path", "v", True),  # a quoted name, lowercased like the rest
            ("app", "set_tenant_name", "v", False),
            ("app", "plain", "s", False),
        ]
    )
    assert catalog.session_functions == {"set_tenant", "set_path"}
    calls = catalog.session_calls
    for sql in (
        b"select set_tenant(42)",
        b"SELECT app.SET_TENANT (42)",
        b'select "app"."Set_Path"(\'x\')',
        b"select 1; select set_path('x')",
        b"select x from t where set_tenant(\n1) is null",
    ):
        assert calls.search(sql), sql
    for sql in (
        b"select set_tenant_name(1)",  # another function whose name starts the same
        b"select reset_tenant(1)",
        b"select set_tenant from t",  # a column of that name, not a call
        b"select plain(1), lower('x')",
    ):
        assert not calls.search(sql), sql
    # Rows without the fourth value (the built-in ones), or none marked: nothing to look for.
    assert FunctionCatalog.builtin().session_calls is None
    assert FunctionCatalog.from_rows([("app", "plain", "s", False)]).session_calls is None


def test_functions_that_call_a_function_that_sets_are_found_too():
    """A wrapper of a function that changes settings leaves them on the connection just the
    same, however deep; only a call (a name and a parenthesis) counts."""
    functions = [
        ("set_tenant", "BEGIN PERFORM set_config('app.tenant', p, false); END"),
        ("login", "BEGIN PERFORM set_tenant(p); RETURN true; END"),
        ("Start_Request", 'SELECT "public"."login" (p)'),  # two steps away, quoted call
        ("audit", "SELECT login FROM app.events"),  # a column of that name: no call
        ("relogin", "SELECT relogin_count(p)"),  # a longer name starting the same
        ("c_function", None),  # C or internal: no source
        ("plain", "BEGIN RETURN upper(p); END"),
        ("login", "SELECT 1"),  # an overload that does not: the name is enough
    ]
    assert functions_that_may_change_session(functions) == {"set_tenant", "login", "start_request"}
    assert functions_that_may_change_session([("plain", "SELECT 1")]) == set()


@pytest.mark.parametrize(
    "sql, routines",
    [
        (
            "CREATE OR REPLACE FUNCTION app.Set_T(p text) RETURNS void LANGUAGE plpgsql AS "
            "$$BEGIN PERFORM set_config('x.y', p, false); END$$",
            [("set_t", "BEGIN PERFORM set_config('x.y', p, false); END")],
        ),
        ('CREATE PROCEDURE "P"() LANGUAGE sql AS \'SELECT 1\'', [("p", "SELECT 1")]),
        (
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT set_config('a.b', 'c', false); END",
            [("f", "CREATE FUNCTION f() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT set_config('a.b', 'c', false); END")],
        ),
        ("CREATE FUNCTION f() RETURNS int AS 'x.so', 'f' LANGUAGE c", [("f", None)]),
        ("SELECT 1; CREATE FUNCTION g() RETURNS int LANGUAGE sql AS 'SELECT 1'", [("g", "SELECT 1")]),
        ("CREATE TABLE f (a int)", []),
        ("CREATE FUNCTION oops(", []),
    ],
)
def test_created_routines(sql, routines):
    assert created_routines(sql) == routines


def test_created_session_functions_know_the_catalog():
    catalog = FunctionCatalog.from_rows([("app", "set_tenant", "v", True)])
    wrapper = "CREATE FUNCTION app.login(p int) RETURNS void LANGUAGE sql AS 'SELECT app.set_tenant(p)'"
    assert created_session_functions(wrapper, catalog) == {"login"}
    assert created_session_functions(wrapper, FunctionCatalog.builtin()) == set()
    direct = "CREATE FUNCTION s() RETURNS void LANGUAGE plpgsql AS $$BEGIN SET search_path = a; END$$"
    assert created_session_functions(direct, FunctionCatalog.builtin()) == {"s"}
    more = catalog.with_session_functions({"Login"})
    assert more.session_functions == {"set_tenant", "login"}
    assert more.session_calls.search(b"select app.login(1)")
    assert more.check("login") == catalog.check("login")  # volatility unchanged


def test_builtin_catalog_knows_common_functions():
    catalog = FunctionCatalog.builtin()
    for name in ("count", "sum", "now", "lower", "upper", "length", "abs", "version", "array_agg"):
        assert catalog.check(name) is None, name
    for name in ("pg_is_in_recovery", "inet_server_port", "current_setting", "pg_backend_pid"):
        assert catalog.check(name) is None, name
    assert catalog.check("generate_series") is None
    assert catalog.check("set_config") is W.SET_CONFIG
    assert catalog.check("pg_advisory_xact_lock") is W.ADVISORY_LOCK
    assert catalog.check("my_function") is W.UNKNOWN_FUNCTION
    assert len(catalog) > 300


def test_bad_volatility_is_rejected():
    with pytest.raises(ValueError):
        FunctionCatalog({"f": "x"})


def test_classification_depends_on_the_catalog():
    empty = FunctionCatalog({})
    assert classify("SELECT lower('A')", empty).verdict.reason is W.UNKNOWN_FUNCTION
    assert classify("SELECT lower('A')", CATALOG).verdict.reason is W.READ


# --- properties ----------------------------------------------------------------------------

SQL_WORDS = st.sampled_from(
    [
        "SELECT",
        "INSERT",
        "INTO",
        "UPDATE",
        "DELETE",
        "FROM",
        "WHERE",
        "WITH",
        "AS",
        "FOR",
        "UPDATE",
        "SHARE",
        "BEGIN",
        "COMMIT",
        "READ",
        "ONLY",
        "SET",
        "RESET",
        "EXPLAIN",
        "ANALYZE",
        "COPY",
        "TO",
        "STDOUT",
        "VALUES",
        "t",
        "x",
        "1",
        "'a'",
        "$$b$$",
        "$1",
        "(",
        ")",
        ",",
        ";",
        "*",
        "=",
        "nextval('s')",
        "my_volatile()",
        "/*",
        "*/",
        "--",
        "\n",
        "/* pgrouter: replica */",
        "/* pgrouter: primary */",
        '"q"',
        "E'\\''",
        "$t$",
        "::",
    ]
)
sql_like = st.lists(SQL_WORDS, max_size=25).map(" ".join)
any_text = st.text(max_size=200)


@settings(max_examples=400, deadline=None)
@given(st.one_of(any_text, sql_like))
def test_never_raises_and_is_deterministic(sql: str):
    first = classify(sql, CATALOG)
    assert isinstance(first, Classification)
    assert first.verdict.target in (P, R)
    assert classify(sql, CATALOG) == first
    if len(first.statements) > 1:
        assert first.verdict.kind is K.MULTIPLE
    if any(s.verdict.target is P for s in first.statements):
        assert first.verdict.target is P


@settings(max_examples=200, deadline=None)
@given(sql_like)
def test_a_primary_hint_always_wins(sql: str):
    result = classify("/* pgrouter: primary */ " + sql, CATALOG)
    assert result.verdict.target is P or result.verdict.reason is W.EMPTY


@settings(max_examples=200, deadline=None)
@given(sql_like)
def test_a_replica_hint_never_sends_a_definite_write_to_a_replica(sql: str):
    plain = classify(sql, CATALOG)
    hinted = classify("/* pgrouter: replica */ " + sql, CATALOG)
    if plain.verdict.target is P and plain.verdict.reason is W.WRITE:
        assert hinted.verdict.target is P
    if plain.verdict.target is R:
        assert hinted.verdict.target is R
