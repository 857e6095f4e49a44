"""psql, unmodified (`psql -X -v ON_ERROR_STOP=1 DSN`), through the router: scripts of simple
queries, transactions, errors, \\copy both ways (one of ~50 MB) and notices on stderr.

psql speaks the simple query protocol only (\\bind arrives in psql 16), so each statement is one
Query message; \\copy is COPY ... FROM STDIN / TO STDOUT with the file on the client side.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.clients.conftest import assert_pool_idle, client_env, committed_ids

PSQL_TIMEOUT = 60.0


def psql(router, script: str, *, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` through psql as alice (SCRAM); -A -t -q only shape the output for parsing."""
    proc = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-A", "-t", "-q", "-f", "-", router.dsn("alice")],
        input=script,
        capture_output=True,
        text=True,
        env=client_env(PGPASSWORD="alice-pw"),
        timeout=PSQL_TIMEOUT,
    )
    if check:
        assert proc.returncode == 0, f"psql exited {proc.returncode}: {proc.stderr}"
    return proc


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_queries_commit_and_rollback(start_router, primary, table, pool_mode):
    router = start_router(pool_mode=pool_mode)
    out = psql(
        router,
        f"""
        SELECT 6 * 7;
        SELECT 'one' \\; SELECT 'two';
        BEGIN;
        INSERT INTO {table} VALUES (1, 'rolled back');
        SELECT count(*) FROM {table};
        ROLLBACK;
        BEGIN;
        INSERT INTO {table} VALUES (2, 'committed');
        COMMIT;
        INSERT INTO {table} VALUES (3, 'autocommitted');
        SELECT string_agg(id::text, ',' ORDER BY id) FROM {table};
        """,
    ).stdout.split()
    # "SELECT 'one' \\; SELECT 'two'" goes as a single Query message: both results come back.
    assert out == ["42", "one", "two", "1", "2,3"]
    assert committed_ids(primary, table) == [2, 3]
    assert_pool_idle(router)


def test_error_in_transaction_then_rollback_recovers(router, primary, table):
    # ON_ERROR_STOP off for this script only: it checks what happens *after* each error.
    proc = psql(
        router,
        f"""
        \\set ON_ERROR_STOP off
        BEGIN;
        INSERT INTO {table} VALUES (1, 'doomed');
        SELECT 1 / 0;
        \\echo state :SQLSTATE
        SELECT 'unreachable';
        \\echo state :SQLSTATE
        ROLLBACK;
        SELECT 'after rollback';
        SELECT no_such_column FROM {table};
        \\echo state :SQLSTATE
        SELECT 'after error outside a transaction';
        """,
    )
    assert proc.stdout.splitlines() == [
        "state 22012",  # division_by_zero
        "state 25P02",  # in_failed_sql_transaction
        "after rollback",
        "state 42703",  # undefined_column
        "after error outside a transaction",
    ]
    assert "ERROR:  division by zero" in proc.stderr
    assert "current transaction is aborted, commands ignored until end of transaction block" in proc.stderr
    assert committed_ids(primary, table) == []
    assert_pool_idle(router)


def _write_rows(path: Path, rows: int, width: int) -> bytes:
    """A text-format COPY file: `id<TAB>note`, note ``width`` characters. Returns its bytes."""
    lines = [f"{i}\t{hashlib.sha256(str(i).encode()).hexdigest()[:8] * (width // 8)}\n" for i in range(rows)]
    data = "".join(lines).encode()
    path.write_bytes(data)
    return data


def test_copy_50mb_from_stdin_and_to_stdout(router, primary, table, tmp_path):
    source = tmp_path / "in.tsv"
    data = _write_rows(source, rows=500_000, width=96)
    assert len(data) > 50_000_000
    target = tmp_path / "out.tsv"
    out = psql(
        router,
        f"""
        \\copy {table} FROM '{source}'
        \\copy (SELECT * FROM {table} ORDER BY id) TO '{target}'
        SELECT 'done';
        """,
    )
    assert out.stdout.split() == ["done"]
    # What went in through the router is on the primary...
    count, digest = primary.execute(
        f"SELECT count(*), md5(string_agg(id || E'\\t' || note || E'\\n', '' ORDER BY id)) FROM {table}"
    ).fetchone()
    assert (count, digest) == (500_000, hashlib.md5(data).hexdigest())
    # ...and what came back out through the router is byte for byte the same.
    assert hashlib.md5(target.read_bytes()).hexdigest() == hashlib.md5(data).hexdigest()
    assert_pool_idle(router)


def test_copy_from_bad_data_reports_the_servers_error(router, primary, table, tmp_path):
    # The bad line comes early, so psql is still sending most of the ~5 MB when the server
    # has already answered with its error.
    source = tmp_path / "bad.tsv"
    good = _write_rows(tmp_path / "good.tsv", rows=50_000, width=96).decode().splitlines(True)
    source.write_text(good[0] + "oops\tnot a number\n" + "".join(good[1:]))
    proc = psql(
        router,
        f"""
        \\set ON_ERROR_STOP off
        \\copy {table} FROM '{source}'
        SELECT 'still usable', count(*) FROM {table};
        """,
    )
    assert 'ERROR:  invalid input syntax for type integer: "oops"' in proc.stderr
    assert "CONTEXT:  COPY" in proc.stderr and "line 2" in proc.stderr
    # (\copy sets no SQLSTATE variable; the error text above is the server's own.)
    assert proc.stdout.splitlines() == ["still usable|0"]
    assert committed_ids(primary, table) == []


def test_notice_is_printed_on_stderr(router):
    proc = psql(
        router,
        """
        DO $$ BEGIN RAISE NOTICE 'hello from %', 6 * 7; END $$;
        SELECT 'after notice';
        """,
    )
    assert "NOTICE:  hello from 42" in proc.stderr
    assert proc.stdout.splitlines() == ["after notice"]
