"""Keep a FunctionCatalog per database current: read pg_proc with asyncpg, swap in new catalogs.

The classifier (routing/classify.py) decides whether a SELECT that calls a function may run on
a replica from the function's volatility (routing/functions.py). This module is the I/O side:
``load_function_catalog`` reads every schema's functions from a database once, and
``FunctionCatalogs`` keeps one catalog per database current in the background.

Merging with the built-in catalog. A loaded catalog is ``FunctionCatalog.from_rows`` over the
built-in rows followed by the server's pg_proc rows. Both name a function's volatility, and
``from_rows`` keeps the most volatile of duplicates, so merging can only move a verdict towards
the primary, never away from it. The server's pg_proc already holds every pg_catalog function
the built-in list names (with the same volatility), so in practice the merge only adds names
the server lacks (``uuidv7`` on PostgreSQL 15), whose calls fail wherever they run. The rules
that do not depend on volatility (known writers such as the advisory-lock functions, the
replica-safe allowlist) are applied by name in ``FunctionCatalog.check`` and hold for every
catalog, loaded or built-in.

When a catalog is replaced. The classifier cache keys its entries by catalog object, so a new
object empties the cache for that database in effect. A reload that finds the same functions
(compared by a digest of the rows) therefore keeps the current object, and databases whose
functions are identical (database per tenant, one schema) share one object, and so share
their cache entries. A reload that finds different functions always installs a new object.

When a catalog is reloaded: at registration (or at ``start()``), every ``refresh_interval``,
sooner after a failed load (``retry_interval``), and on ``invalidate(key)``, which the router
calls when a server answers 42883 (undefined_function): the function may have been created
since the last load. Invalidations are coalesced: any number of them before a load starts lead
to that one load; those that arrive while it runs lead to one more (the function may have been
created after the load read pg_proc); and a load is never started less than
``min_reload_interval`` after the previous one, so a client that keeps calling a function that
does not exist costs one catalog query per interval, not one per call.

Where a catalog is read from. ``register`` takes the connection parameters, and optionally a
``locate`` callable asked before every load for the node to read from: a cluster's primary
changes at a failover, and a catalog read only from the configured primary would then fail
for good (the router passes the topology's current primary; see SplitCluster.catalog_node).

A load that fails (database unreachable, authentication refused, timeout) is logged and the
database keeps the catalog it had, the built-in one until a load succeeds: an unknown function
goes to the primary, which is the safe direction.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg

from router.routing.functions import FunctionCatalog, builtin_rows
from router.routing.statements import functions_that_may_change_session
from router.tasks import cancel_and_wait

log = logging.getLogger(__name__)

APPLICATION_NAME = "pgrouter-catalog"

# Every function of every schema: the classifier does not know the search_path, so a bare name
# stands for all functions of that name (see functions.py). Ordered, so that the digest of an
# unchanged catalog is the same from one load to the next. About 3 000 rows on a fresh database.
# The source of functions not written in C (internal, c) is read too: one whose body may
# change session settings, or calls one that may (routing/statements.py,
# functions_that_may_change_session), pins the clients that call it, as a DO block would.
CATALOG_SQL = """
SELECT n.nspname::text, p.proname::text, p.provolatile::text,
       CASE WHEN l.lanname IN ('internal', 'c') THEN NULL ELSE p.prosrc END
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
ORDER BY 1, 2, 3, 4
"""

# What a database can throw at a load; anything else is a bug here (logged with its traceback).
# TimeoutError is an OSError.
LOAD_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)

DEFAULT_LOAD_TIMEOUT = 10.0  # seconds for the connection, and again for the query
DEFAULT_REFRESH_INTERVAL = 60.0
# After a failed load: a database that was restarting should not leave user functions
# "unknown" (hence on the primary) for a whole refresh interval.
DEFAULT_RETRY_INTERVAL = 5.0
# Floor between two loads of one database, whatever invalidate() says (see the module docstring).
DEFAULT_MIN_RELOAD_INTERVAL = 1.0
# Loads running at once over all databases: with one database per tenant, a router starting up
# registers thousands; this many connections at a time load them without a connection storm.
DEFAULT_MAX_CONCURRENT_LOADS = 4

# (nspname, proname, provolatile, sets_session); the built-in rows have no fourth.
Row = tuple[str, str, str, bool] | tuple[str, str, str]
# The node to read a database's pg_proc from, as (host, port), asked before each load.
Locate = Callable[[], tuple[str, int]]

_BUILTIN_ROWS: tuple[Row, ...] = tuple(builtin_rows())


@dataclass(frozen=True, slots=True)
class ConnectParams:
    """Where to read a database's pg_proc: as asyncpg.connect's arguments of the same names."""

    host: str
    port: int
    database: str
    user: str
    password: str | None = field(default=None, repr=False)
    ssl: Any = None  # None (asyncpg's default), False, a mode, an SSLContext


@dataclass(frozen=True, slots=True)
class CatalogStats:
    """Loading state of one database, for metrics, the admin API and tests."""

    attempts: int  # loads started
    loads: int  # loads that succeeded (with or without a change)
    failures: int
    replacements: int  # loads that installed a new catalog object
    last_error: str | None  # of the last load, None when it succeeded
    loading: bool  # a load is running
    pending: bool  # invalidate() was called since the running or last load started
    source: tuple[str, int] | None  # the node the running or last load reads from


async def fetch_function_rows(
    params: ConnectParams, timeout: float = DEFAULT_LOAD_TIMEOUT
) -> list[Row]:
    """Every function of the database as ``(nspname, proname, provolatile, sets_session)``
    rows, read over one connection that is closed before returning. ``sets_session``: the
    function's body may change session settings, or call a function that may. Raises what
    asyncpg raises (LOAD_ERRORS)."""
    conn = await asyncpg.connect(
        host=params.host,
        port=params.port,
        database=params.database,
        user=params.user,
        password=params.password,
        ssl=params.ssl,
        timeout=timeout,
        server_settings={"application_name": APPLICATION_NAME},
    )
    try:
        records = await conn.fetch(CATALOG_SQL, timeout=timeout)
    except BaseException:
        conn.terminate()  # its state is unknown (timeout, cancelled, broken); no goodbye needed
        raise
    try:
        await conn.close(timeout=timeout)
    except LOAD_ERRORS:
        conn.terminate()
    session = functions_that_may_change_session((name, source) for _, name, _, source in records)
    return [(schema, name, volatility, name.lower() in session) for schema, name, volatility, _ in records]


def catalog_from_rows(rows: Iterable[Row]) -> FunctionCatalog:
    """A new catalog of the server's rows merged with the built-in ones (most volatile wins)."""
    return FunctionCatalog.from_rows((*_BUILTIN_ROWS, *rows))


async def load_function_catalog(
    *,
    host: str,
    port: int,
    database: str,
    user: str,
    password: str | None = None,
    ssl: Any = None,
    timeout: float = DEFAULT_LOAD_TIMEOUT,
) -> FunctionCatalog:
    """Read the database's pg_proc (all schemas) and return a new catalog merged with the
    built-in one. One connection, one query, closed after. Raises what asyncpg raises."""
    params = ConnectParams(host, port, database, user, password, ssl)
    return catalog_from_rows(await fetch_function_rows(params, timeout))


def rows_digest(rows: Sequence[Row]) -> bytes:
    """Identifies a set of rows in their query order: equal digests, equal catalogs."""
    h = hashlib.blake2b(digest_size=16)
    for schema, name, volatility, *more in rows:
        h.update(f"{schema}\x00{name}\x00{volatility}\x00{bool(more and more[0])}\n".encode())
    return h.digest()


@dataclass(slots=True, eq=False)
class _Database:
    """A registered database: what loads it, and its current catalog (see ``watch``)."""

    key: Hashable
    params: ConnectParams
    catalog: FunctionCatalog
    locate: Locate | None = None  # replaces params' host and port at each load
    source: tuple[str, int] | None = None
    digest: bytes | None = None  # of the rows `catalog` was built from; None: the built-in one
    invalidated: asyncio.Event = field(default_factory=asyncio.Event)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)  # set by the first success
    task: asyncio.Task[None] | None = None
    attempts: int = 0
    loads: int = 0
    failures: int = 0
    replacements: int = 0
    last_error: str | None = None
    loading: bool = False


CatalogWatch = _Database  # what FunctionCatalogs.watch() returns; read only its `catalog`


class FunctionCatalogs:
    """One current FunctionCatalog per database key, kept current by one background task per
    database (``start()`` once in the running loop, then ``stop()``).

    ``get(key)`` is a dict lookup for the hot path; a key that is not registered, or whose
    first load has not succeeded, gets the built-in catalog. Keys are whatever the caller uses
    to name a database, e.g. ``(host, port, dbname)``. Use from the event loop's thread only.
    """

    def __init__(
        self,
        *,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        min_reload_interval: float = DEFAULT_MIN_RELOAD_INTERVAL,
        load_timeout: float = DEFAULT_LOAD_TIMEOUT,
        max_concurrent_loads: int = DEFAULT_MAX_CONCURRENT_LOADS,
        builtin: FunctionCatalog | None = None,
    ) -> None:
        if refresh_interval <= 0 or retry_interval <= 0 or load_timeout <= 0:
            raise ValueError("refresh_interval, retry_interval and load_timeout must be > 0")
        if min_reload_interval < 0 or max_concurrent_loads < 1:
            raise ValueError("min_reload_interval must be >= 0 and max_concurrent_loads >= 1")
        self.refresh_interval = refresh_interval
        self.retry_interval = min(retry_interval, refresh_interval)
        self.min_reload_interval = min_reload_interval
        self.load_timeout = load_timeout
        self.builtin = builtin if builtin is not None else FunctionCatalog.builtin()
        self._databases: dict[Hashable, _Database] = {}
        self._current: dict[Hashable, FunctionCatalog] = {}  # what get() reads
        # Catalogs by digest, and how many databases use each: identical databases share one.
        self._shared: dict[bytes, FunctionCatalog] = {}
        self._users: Counter[bytes] = Counter()
        self._load_slots = asyncio.Semaphore(max_concurrent_loads)
        self._started = False

    # -- the hot path -------------------------------------------------------------------

    def get(self, key: Hashable) -> FunctionCatalog:
        """The current catalog of the database; the built-in one until a load succeeds."""
        return self._current.get(key, self.builtin)

    def watch(self, key: Hashable) -> CatalogWatch | None:
        """A registered database's handle whose ``catalog`` is always its current catalog (the
        built-in one until a load succeeds): one attribute read on the hot path instead of a
        lookup. None for a key never registered."""
        return self._databases.get(key)

    def reads_from(self, key: Hashable) -> tuple[str, int] | None:
        """The node (host, port) a registered database's catalog is read from, as registered
        (a ``locate`` may send reads elsewhere); None for a key never registered."""
        db = self._databases.get(key)
        return None if db is None else (db.params.host, db.params.port)

    def invalidate(self, key: Hashable) -> None:
        """Reload the database's catalog soon (coalesced and rate-limited; see the module
        docstring). Cheap: call it on every 42883 answer. Unknown keys are ignored."""
        db = self._databases.get(key)
        if db is not None:
            db.invalidated.set()

    def note_session_functions(self, key: Hashable, names: set[str]) -> None:
        """Functions whose body may change session settings, just created through the router:
        calls of them pin from now on, before pg_proc is read again. The next load installs
        what it reads, whether or not the catalog changed (the CREATE may have rolled back).
        Call ``invalidate`` once the transaction that created them has ended."""
        db = self._databases.get(key)
        if db is None or names <= db.catalog.session_functions:
            return
        self._release(db.digest)
        db.digest = None
        db.catalog = db.catalog.with_session_functions(names)
        self._current[key] = db.catalog

    # -- databases ----------------------------------------------------------------------

    def register(self, key: Hashable, params: ConnectParams, locate: Locate | None = None) -> None:
        """Track a database: load its catalog at once in the background (at ``start()`` if not
        started yet). Registering a known key with other parameters reloads it from there.
        ``locate``, when given, is asked before each load for the node (host, port) to read
        from instead of ``params``' own (the current primary of a cluster that fails over)."""
        db = self._databases.get(key)
        if db is not None:
            db.locate = locate
            if db.params != params:
                db.params = params
                db.invalidated.set()
            return
        db = self._databases[key] = _Database(key, params, self.builtin, locate)
        if self._started:
            self._spawn(db)

    def set_password(self, key: Hashable, user: str, password: str | None) -> None:
        """A reload changed the server password of ``user``: a tracked database read as that
        user logs in with the new one from its next read."""
        db = self._databases.get(key)
        if db is not None and db.params.user == user:
            self.register(key, replace(db.params, password=password), db.locate)

    def keys(self) -> list[Hashable]:
        """The databases tracked."""
        return list(self._databases)

    async def forget(self, key: Hashable) -> None:
        """Stop tracking a database; get(key) returns the built-in catalog again."""
        db = self._databases.pop(key, None)
        if db is None:
            return
        self._current.pop(key, None)
        self._release(db.digest)
        await cancel_and_wait(db.task)

    def stats(self, key: Hashable) -> CatalogStats:
        db = self._databases[key]
        return CatalogStats(
            attempts=db.attempts,
            loads=db.loads,
            failures=db.failures,
            replacements=db.replacements,
            last_error=db.last_error,
            loading=db.loading,
            pending=db.invalidated.is_set(),
            source=db.source,
        )

    async def wait_loaded(self, key: Hashable, timeout: float | None = None) -> FunctionCatalog:
        """Wait until a load of the registered database has succeeded once; return its current
        catalog. Raises TimeoutError after `timeout`, KeyError for a key never registered."""
        db = self._databases[key]
        async with asyncio.timeout(timeout):
            await db.loaded.wait()
        return db.catalog

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            raise RuntimeError("FunctionCatalogs already started")
        asyncio.get_running_loop()  # fail here, not in the first register(), outside a loop
        self._started = True
        for db in self._databases.values():
            self._spawn(db)

    async def stop(self) -> None:
        """Stop loading (a running load is cancelled and its connection dropped). The current
        catalogs stay readable. Safe to call repeatedly."""
        self._started = False
        tasks = [db.task for db in self._databases.values()]
        for db in self._databases.values():
            db.task = None
        for task in tasks:
            await cancel_and_wait(task)

    # -- loading ------------------------------------------------------------------------

    def _spawn(self, db: _Database) -> None:
        db.task = asyncio.get_running_loop().create_task(
            self._keep_current(db), name=f"function-catalog {db.key}"
        )
        db.task.add_done_callback(_log_if_failed)

    async def _keep_current(self, db: _Database) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started, succeeded = await self._load(db)
            interval = self.refresh_interval if succeeded else self.retry_interval
            try:
                async with asyncio.timeout_at(started + interval):
                    await db.invalidated.wait()
            except TimeoutError:
                continue  # the timer: load now
            delay = started + self.min_reload_interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _load(self, db: _Database) -> tuple[float, bool]:
        """One load attempt; never raises (but for cancellation). Returns (start time, success)."""
        async with self._load_slots:
            started = asyncio.get_running_loop().time()
            # Invalidations from here on may be about functions this load does not see yet.
            db.invalidated.clear()
            db.attempts += 1
            db.loading = True
            try:
                params = db.params
                if db.locate is not None:
                    host, port = db.locate()
                    params = replace(params, host=host, port=port)
                db.source = (params.host, params.port)
                rows = await fetch_function_rows(params, self.load_timeout)
                digest = rows_digest(rows)
                if digest != db.digest:
                    self._install(db, digest, rows)
            except LOAD_ERRORS as exc:
                self._failed(db, f"{type(exc).__name__}: {str(exc) or 'no answer'}")
                return started, False
            except Exception as exc:
                # A bug here must not leave the database without reloads: log it loudly and
                # keep trying on the timer, serving the previous (or built-in) catalog.
                log.exception("function catalog of %s: load failed unexpectedly", db.key)
                self._failed(db, f"{type(exc).__name__}: {exc}", logged=True)
                return started, False
            finally:
                db.loading = False
        db.loads += 1
        db.last_error = None
        db.loaded.set()
        return started, True

    def _install(self, db: _Database, digest: bytes, rows: Sequence[Row]) -> None:
        catalog = self._shared.get(digest)
        if catalog is None:
            catalog = self._shared[digest] = catalog_from_rows(rows)
        self._users[digest] += 1
        self._release(db.digest)
        db.digest, db.catalog = digest, catalog
        self._current[db.key] = catalog
        db.replacements += 1
        # The first load of each database is routine (thousands at start-up); a change is news.
        (log.info if db.replacements > 1 else log.debug)(
            "function catalog of %s: %d functions, now %r", db.key, len(rows), catalog
        )

    def _release(self, digest: bytes | None) -> None:
        if digest is None:
            return
        self._users[digest] -= 1
        if self._users[digest] <= 0:
            del self._users[digest]
            self._shared.pop(digest, None)

    def _failed(self, db: _Database, error: str, *, logged: bool = False) -> None:
        db.failures += 1
        db.last_error = error
        if not logged:
            log.error(
                "function catalog of %s (%s:%d/%s) not loaded, keeping the %s one: %s",
                db.key,
                *(db.source or (db.params.host, db.params.port)),
                db.params.database,
                "built-in" if db.catalog is self.builtin else "previous",
                error,
            )


def _log_if_failed(task: asyncio.Task[None]) -> None:
    # _keep_current catches everything a load raises; this only sees bugs in the loop itself.
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("function catalog task stopped by an error", exc_info=exc)
