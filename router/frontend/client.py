"""A client connection: startup, TLS and authentication (slow path, router/frontend/login.py),
then the forwarding loop (hot path, ``data_received`` scanning 5-byte headers and handing
whole chunks to the linked server connection).

In transaction mode a server connection is linked from the first message of a transaction
until the server's ReadyForQuery says 'I' with nothing else outstanding; in session mode
until the client leaves.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets
import struct
from dataclasses import dataclass, field
from time import monotonic, perf_counter
from typing import TYPE_CHECKING

from router import sockopts
from router.config import PoolMode
from router.frontend.login import CLOSED, READY, STARTUP, LoginMixin
from router.prepared import (
    ClientStatement,
    local_parse_reply,
    rewrite_for_server,
    statements_used,
)
from router.protocol import messages as m
from router.protocol.errors import ProtocolError, RouterError, SQLState
from router.protocol.framing import frame
from router.routing.route import (
    AFTER_SYNC,
    BINDS,
    EXECUTES,
    FLUSHES,
    RESTORE_SHIFT,
    RouteReason,
    decide,
    held_verdict,
    named_prepare,
    open_segment,
)
from router.routing.session_statements import RouterTargetsOnServer, router_targets_for_server
from router.routing.statements import created_session_functions
from router.routing.verdict import (
    ROUTER_TARGET_GUC,
    ROUTER_TARGET_VALUES,
    Reason,
    StatementKind,
    Target,
    Verdict,
)
from router.session import IDENTITY_SETTINGS, STARTUP_IDENTITY_PIN, SessionSettings, set_config_sql
from router.stats.traffic import NO_TRAFFIC
from router.tenants import TenantPaused

if TYPE_CHECKING:
    from router.app import Router
    from router.backend.server import ServerConnection
    from router.pools.pool import Pool

log = logging.getLogger("pgrouter.client")

_unpack_len = struct.Struct("!I").unpack_from

# Frontend message types (PostgreSQL docs, 55.7).
_Q, _S, _F, _X, _H = ord("Q"), ord("S"), ord("F"), ord("X"), ord("H")
_FLUSH = b"H\0\0\0\4"
_SYNC = m.sync()  # the router's own, ending a replica's segment (_replica_chunk)
# Extended-protocol messages: until a Sync follows them the server may still owe replies.
_EXTENDED = frozenset(b"PBEDCH")
# Messages that name a prepared statement, rewritten in transaction mode (router/prepared.py).
_NAMED = frozenset(b"PBDC")
_P_, _B_, _C_, _D_, _E_ = ord("P"), ord("B"), ord("C"), ord("D"), ord("E")
# What a chunk needs on its way to a server (bits): reply counting for an unnamed Parse or
# Close, rewriting for a named statement, forgetting the server's prepared statements,
# settings reset to the server's defaults, and (with reply counting only) ends with a Sync.
_COUNT_REPLIES, _NEEDS_REWRITE, _FORGET_PREPARED, _SETTINGS_RESET, _ENDS_SYNCED = 1, 2, 4, 8, 16
# Above these bits, one per ReadyForQuery of the chunk (bit RESTORE_SHIFT + k for its k-th,
# from 1): the router's startup-settings restore follows that Query or Sync (``_restore``).
_UNKNOWN_SETTINGS = frozenset({("<reset>", "")})
# A Query that may start a COPY: the router's restore does not follow it (see _restore).
_COPY_WORD = re.compile(rb"(?i)\bcopy\b")
# A session-mode reset query that puts a server connection back to its login settings.
_RESETS_ALL = re.compile(r"(?i)\s*(?:discard|reset)\s+all\s*;?\s*$")
_DISCARDS_ALL = re.compile(r"(?i)\s*discard\s+all\s*;?\s*$")
# SQL-level PREPARE/EXECUTE/DEALLOCATE name statements on whichever server connection runs
# them, which transaction pooling does not keep: refused in transaction mode (README).
_SQL_PREPARED = re.compile(
    rb"(?i)\s*(?:prepare(?!\s+transaction\b)|execute|deallocate(?!\s+(?:prepare\s+)?all\b))\b"
)
def _refusal(errcode: str, message: str, hint: str | None = None) -> bytes:
    """A Query that makes the server raise this error. Substituted for a statement the router
    refuses, the error lands in order and fails an open transaction like any other."""
    return m.query(_refusal_sql(errcode, message, hint))


def _refusal_sql(errcode: str, message: str, hint: str | None = None) -> str:
    quoted = ", ".join(
        f"{key} = '{value.replace(chr(39), chr(39) * 2)}'"
        for key, value in (("MESSAGE", message), ("HINT", hint))
        if value is not None
    )
    return f"DO $pgrouter$BEGIN RAISE EXCEPTION USING ERRCODE = '{errcode}', {quoted}; END$pgrouter$"


_REFUSE_SQL_PREPARED_TEXT = _refusal_sql(
    "feature_not_supported",
    "SQL-level PREPARE/EXECUTE/DEALLOCATE is not supported in transaction pool mode",
    "Use your driver's prepared statements (protocol level), or pool_mode = session.",
)
_REFUSE_SQL_PREPARED = m.query(_REFUSE_SQL_PREPARED_TEXT)
_REFUSE_SQL_PREPARED_SQL = _REFUSE_SQL_PREPARED_TEXT.encode()
# Session state that outlives a transaction (PostgreSQL keeps it per backend): the client is
# pinned to its server connection until it is gone (see _track_pins). Transaction-scoped
# advisory locks (pg_advisory_xact_lock) do not pin.
_PIN_SQL = re.compile(
    rb"(?i)\b(?:unlisten\s+\*|(?:listen|pg_advisory_unlock_all|pg_(?:try_)?advisory_lock(?:_shared)?"
    # Temporary tables, views and sequences, however made: CREATE TEMP ..., SELECT ... INTO
    # TEMP, or anything named in the pg_temp schema (CREATE TABLE pg_temp.t).
    rb"|create\s+(?:or\s+replace\s+)?(?:(?:global|local)\s+)?temp(?:orary)?\s+"
    rb"(?:table|(?:recursive\s+)?view|sequence)|into\s+temp(?:orary)?|pg_temp\s*\."
    rb"|with\s+hold"
    rb"|set\s+(?:session\s+)?role|set\s+session\s+authorization"
    rb"|reset\s+role|reset\s+session\s+authorization|discard\s+all)\b)"
)
# Cheap first look on the hot path: a Query whose text starts with one of these words, holds
# more than one statement, starts with a comment, or mentions advisory locks, temp or set_config
# (in any case), is examined with the patterns above and below.
_SPECIAL_START = re.compile(
    rb"(?i)\s*(?:set|reset|discard|deallocate|prepare|execute|listen|unlisten|create|declare|begin|do"
    rb"|savepoint|release|rollback)\b"
)
# Statements that change session state (or name SQL-level prepared statements, or may hide a
# SET in a DO block) start with one of these; only those are parsed (and, below, those with a
# SET/RESET/DISCARD/DEALLOCATE/DO later on).
_SESSION_SQL = re.compile(rb"(?i)\s*(?:set|reset|discard|deallocate|prepare|execute|do)\b")
# A SET/RESET/DISCARD/DEALLOCATE that does not start the Query: after another statement (;)
# or a comment. (Also matches `UPDATE t /* x */ SET ...` or a ';set' in a string: the text is
# then parsed, once per text, and found to change nothing.)
_LATER_SESSION_SQL = re.compile(
    rb"(?i)(?:;|\*/|--[^\n]*\n)\s*(?:set|reset|discard|deallocate|do|savepoint|release"
    rb"|rollback\s+(?:(?:work|transaction)\s+)?to)\b"
)
# Savepoints matter while the transaction has tracked setting changes (settings_undo): a
# ROLLBACK TO undoes those made since, as PostgreSQL does.
_SAVEPOINT_SQL = re.compile(rb"(?i)\s*(?:savepoint|release|rollback\s+(?:(?:work|transaction)\s+)?to)\b")
# So do transaction ends that start another at once: a ROLLBACK AND CHAIN undoes them there.
_ENDS_AND_CHAINS = re.compile(rb"(?i)\s*(?:rollback|abort|commit|end)\b[^;]*\bchain\b")
_COMMENT_START = frozenset(b"/-")
# Valid after login besides the above: CopyData, CopyDone, CopyFail.
_COPY = frozenset(b"dcf")

_STARTUP, _READY, _CLOSED = STARTUP, READY, CLOSED
_IDLE = m.IDLE
_FAILED = m.FAILED_TRANSACTION

# Shared-schema tenants: a statement that would change the tenant setting is replaced by this
# (the server raises the error, in order, like any other).
# A transaction whose BEGIN the router answered (split routes) and that failed before reaching
# a server (its wait for one timed out or was cancelled, an invalid pgrouter.target): the
# client is told it is aborted ('E'). When it next runs something other than COMMIT/ROLLBACK
# (answered by the router), the BEGIN goes out followed by this, replies dropped, so the
# server's transaction is aborted for real and answers 25P02 as PostgreSQL would.
_ABORT_DEFERRED = _refusal("in_failed_sql_transaction", "the transaction failed before reaching a server")
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_]{1,63}")


def _refuse_router_target(value: str) -> str:
    # The value is the client's: named only when it is a plain word, so that nothing it holds
    # ($pgrouter$, quotes) can end the DO block's body and add SQL of its own.
    named = f': "{value}"' if _PLAIN_WORD.fullmatch(value) else ""
    return _refusal_sql(
        "invalid_parameter_value",
        f'invalid value for parameter "pgrouter.target"{named}',
        "Available values: primary, replica, auto.",
    )


_ABORTED_MESSAGE = "current transaction is aborted, commands ignored until end of transaction block"
_REFUSE_TENANT_SETTING = _refusal(
    "insufficient_privilege",
    "permission denied: the router sets the tenant setting; clients may not change it",
)
_SETTING_KINDS = frozenset({StatementKind.SET_SESSION, StatementKind.SET_LOCAL, StatementKind.RESET})
# Shared mode: code the router cannot read could set the tenant setting under a name built at
# run time (EXECUTE 'SELECT set_' || 'config(...)'), or carry it as a function's SET clause, so
# DO, CALL and the creation of functions and procedures are refused whatever they say. These
# words send a text to the classifier; the statements are told apart there.
_GUARD_OPAQUE = re.compile(rb"\b(?:do|call|function|procedure)\b")
_CREATES_ROUTINE = re.compile(r"(?i)\s*create\s+(?:or\s+replace\s+)?(?:function|procedure)\b")
_CREATES_ROUTINE_SQL = re.compile(_CREATES_ROUTINE.pattern.encode())
# Who the session runs as: RESET ALL leaves these alone (PostgreSQL marks them
# GUC_NO_RESET_ALL), so the settings prelude cannot take them off a server connection. A
# client that changes one, in any spelling (SET "role", SET session_authorization,
# set_config('role', ...)), is pinned instead, like SET ROLE. Each is a pin of its own:
# RESET ROLE leaves a SET SESSION AUTHORIZATION in force.
_IDENTITY_PINS = {"role": "role", "session_authorization": "session authorization"}


def _tenant_setting_error(name: str) -> RouterError:
    return RouterError(
        SQLState.INSUFFICIENT_PRIVILEGE,
        f'permission denied to change "{name}": the router sets it for the tenant',
    )


# With read/write splitting, a lone Query starting with one of these may be answered by the
# router itself (a deferred BEGIN, its COMMIT/ROLLBACK, SET pgrouter.target).
_INTERCEPT_START = re.compile(rb"(?i)\s*(?:begin|start|commit|end|rollback|abort|set|reset)\b")
_ROUTER_TARGETS = {"primary": Target.PRIMARY, "replica": Target.REPLICA, "auto": None}
_ROUTER_TARGET_NAMES = {target: name for name, target in _ROUTER_TARGETS.items()}
# SHOW pgrouter.target, answered by the router (_show_router_target): a cheap first look at a
# Query's text (its second byte is an h, or it starts with white space), then the pattern.
_SHOW_START = re.compile(rb"(?i)\s*show\b")
_LOWER_H = ord("h")
_SPACES = frozenset(b" \t\n\r\f\v")
_SHOW_ROUTER_TARGET_COLUMNS = m.row_description([ROUTER_TARGET_GUC])
_SHOW_TAG = m.command_complete("SHOW")
_COMMAND_TAGS = {
    StatementKind.COMMIT: "COMMIT",
    StatementKind.ROLLBACK: "ROLLBACK",
}
# Chunks kept for a retry of a read whose replica failed, up to this many bytes.
MAX_REPLAY_BYTES = 256 * 1024

# While a client waits for a server connection its messages are held; past this many bytes we
# stop reading from it so a waiting client cannot grow the router's memory without bound.
MAX_HELD_BYTES = 1 << 20
# A read whose Sync has not come waits for it (ClientConnection._waits_for_sync) up to this
# many bytes held; then it runs on the primary, where whatever follows may run too.
MAX_UNSYNCED_HELD = 64 * 1024
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


@dataclass(slots=True)
class SettingsUndo:
    """A client's session state before the tracked changes of its current transaction (its
    settings, and the pins it may have dropped), and whether that transaction is known to roll
    back (an error, a ROLLBACK tag)."""

    snapshot: tuple[dict[str, str], frozenset | None]  # SessionSettings.snapshot()
    read_only_session: bool
    session_target: Target | None
    pins: frozenset[str]
    failed: bool = False
    # COMMIT / ROLLBACK tags still to come from the AND CHAIN statements that began this
    # transaction: the state already follows them, so they neither settle it nor fail it.
    chain_tags: int = 0
    # The record of the transaction before the AND CHAIN that began this one.
    before_chain: SettingsUndo | None = None
    # The savepoints set since (name, and the four above as they were then), oldest first.
    savepoints: list[
        tuple[str, tuple[dict[str, str], frozenset | None], bool, Target | None, frozenset[str]]
    ] = field(default_factory=list)


class ClientConnection(LoginMixin, asyncio.Protocol):
    def __init__(self, router: Router) -> None:
        self.router = router
        self.settings = router.settings
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.local = False
        self.state = _STARTUP
        self.user = ""
        self.database = ""
        self.startup_params: dict[str, str] = {}
        self.tls = False
        self.tls_server_name: str | None = None  # the host it asked for in its TLS handshake (SNI)
        self.logged_in_at = 0.0  # time.monotonic() when it logged in; 0.0: not (yet)
        self.console = False  # logging into the admin console (router/admin/console.py)
        # ROLLBACK TO SAVEPOINT statements sent whose tag (ROLLBACK, as a real ROLLBACK's) has
        # not come: the server connection reads those tags as savepoint rollbacks.
        self.rollback_to_tags = 0
        self.admitted = False
        self.pool: Pool | None = None
        self.traffic = NO_TRAFFIC  # its database's (login sets it)
        self.pool_mode = PoolMode.TRANSACTION
        self.server: ServerConnection | None = None
        # Router-issued BackendKeyData; a CancelRequest carrying it reaches this client.
        self.cancel_pid = 0
        self.cancel_key = 0
        # Slow path input.
        self._buf = bytearray()
        self._wakeup: asyncio.Future | None = None
        self._login_task: asyncio.Task | None = None
        # Hot path framing state.
        self._skip = 0
        self._max_message = self.settings.max_message_size
        self.unsynced = False
        # Messages received while no server connection is linked.
        self._held: list[tuple[bytes, int, int, int]] = []  # (data, start, syncs, rewrite)
        self._held_bytes = 0
        self._partial: list[bytes] | None = None
        self._partial_have = 0
        self._partial_need = 0
        # Named prepared statements: the client's names mapped to router-owned ones.
        self.statements: dict[bytes, ClientStatement] = {}
        self.rewrite_statements = False
        # Session pooling: of all statements, only SET pgrouter.target is looked at.
        self.session_mode = False
        # A CREATE FUNCTION/PROCEDURE was sent: read the function catalog again once its
        # transaction has ended (see _note_created_routines).
        self._routine_created = False
        # Chunks waiting until the server has answered everything sent before them: they name
        # a statement whose Parse or Close in an earlier segment is unanswered (see
        # router/prepared.py). None: nothing waits.
        self._after_replies: list[tuple[bytes, int, int, int]] | None = None
        self._after_replies_bytes = 0
        # Why this client keeps its server connection between transactions (empty: it does not).
        self.pins: set[str] = set()
        # A role (or session user) from the startup packet: pinned for the whole session.
        self.startup_identity = False
        self.session = SessionSettings({})
        # What the tracked SET/RESET/DISCARDs of the current transaction replaced, until it
        # ends. A transaction that rolls back undoes them on the server, so the router puts
        # them back too (settings_settled). None: no tracked change is pending.
        self.settings_undo: SettingsUndo | None = None
        self._dropping_copy = False
        self._release_after_message = False
        self._waiting_on: Pool | None = None
        self._write_paused = False
        self._read_paused_by_server = False
        self._read_paused_while_waiting = False
        # Read/write splitting (Router.pool_for_transaction; None: a single-node database).
        self.db_route = None
        # Transaction mode: the database's function catalog (Router.function_catalog), for the
        # functions whose body may change settings; calling one pins. None: not looked at.
        self.function_catalog = None
        self.session_target: Target | None = None  # SET pgrouter.target
        self.startup_read_only = False
        self.read_only_session = False  # default_transaction_read_only
        self.last_unnamed = None  # verdict of the last unnamed Parse
        self.replica_node = None  # the replica serving the current transaction
        self.last_replica = None  # the replica that served the last read (SplitCluster._pick)
        self.wrote = False  # the current transaction went to the primary to write
        self.watch_writes = False  # ...or went there for BEGIN, and may still write
        self.ryw_round: int | None = None  # read-your-writes token (router/splitting.py)
        self.ryw_lsn: int | None = None
        self.ryw_slot: int | None = None  # read_your_writes = tenant: its scope's (router/causal.py)
        self.deferred_begin: bytes | None = None  # a BEGIN answered by the router, not yet sent
        self.deferred_aborted = False  # its transaction failed before reaching a server ('E')
        self.deferred_read_only = False  # ...and it is read-only (default_transaction_read_only)
        self._replay: list | None = None  # what the replica got, for one retry elsewhere
        self._replay_bytes = 0
        self._replay_begin: bytes | None = None
        self._retried = self._refusal_retried = False
        self._reroute = False  # chunks held until the replica is done: they need the primary
        self._chunk_unsynced = False
        # client_idle_timeout (Router.end_idle_clients): whether anything came since the
        # janitor's last look, and since when nothing has while the client was idle.
        self.heard = True
        self.quiet_since = 0.0
        # Tenants from the registry (router/tenants.py).
        self.tenant = None
        self.tenant_login = None
        self.tenant_guard: bytes | None = None  # shared mode: the setting the client may not touch
        self.scram_keys: tuple[bytes, bytes] | None = None  # auth_query tenants
        # Query statistics (router/stats/queries.py): the call being sent to the server, its
        # statement text and when its first message went out (0.0: none started).
        self._call_sql: bytes | None = None
        self._call_t0 = 0.0
        self.last_parse_sql: bytes | None = None  # the last unnamed Parse's text
        # Named statements whose text pins or changes settings: (text, pins?, settings?) by
        # name. A driver runs a prepared statement again with a Bind alone (psycopg after
        # prepare_threshold runs, asyncpg's statement cache), so each Bind is noted again.
        self._effects_by_statement: dict[bytes, tuple[bytes, bool, bool]] = {}
        # A RESET of startup settings was seen: the restore follows the next Query or Sync.
        self._restore_owed = False
        self._restore_query: bytes | None = None
        self._resetting_statements: set[bytes] = set()  # session mode: named ones that reset

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)  # type: ignore[attr-defined]
        sockopts.apply(transport, self.router.socket_options)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self.local = not isinstance(peer, tuple)  # a Unix-socket client (unix_socket_dir)
        self._login_task = asyncio.get_running_loop().create_task(self._login())
        self._login_task.add_done_callback(self._login_done)

    def data_received(self, data: bytes) -> None:
        if self.state != _READY:
            if self.state == _STARTUP:
                self._buf += data
                waiter = self._wakeup
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            return
        self.heard = True  # client_idle_timeout (Router.end_idle_clients)
        self._chunk_unsynced = self.unsynced
        if self._partial is not None:
            # Completing a message that must be whole before it can be forwarded.
            self._partial.append(data)
            self._partial_have += len(data)
            if self._partial_have < self._partial_need:
                return
            data = b"".join(self._partial)
            self._partial = None
        n = len(data)
        start = pos = self._skip
        syncs = 0
        rewrite = False
        parse_or_close = False
        forget = 0
        while pos < n:
            if pos + 5 > n:
                self._hold_back(data, pos, 5)
                data = data[:pos]
                n = pos
                break
            t = data[pos]
            length = _unpack_len(data, pos + 1)[0]
            if length < 4 or length > self._max_message:
                self._message_too_large(t, length)
                return
            if t == _S:
                syncs += 1
                self.unsynced = False
                if self._restore_owed:
                    # The restore goes right behind this Sync, skipped over by this loop.
                    data, inserted = self._restore(data, pos + 5)
                    n = len(data)
                    length += inserted
                    forget |= 1 << (RESTORE_SHIFT + syncs)
                    syncs += 1
            elif t == _Q:
                # A simple Query also ends with ReadyForQuery after everything before it.
                syncs += 1
                self.unsynced = False
                end = pos + 1 + length
                if self.tenant_guard is not None:
                    if end > n:
                        self._hold_back(data, pos, 1 + length)
                        data = data[:pos]
                        n = pos
                        break
                    if self._tenant_guard_refuses(data[pos + 5 : end - 1], lone=pos == start and end == n):
                        data = data[:pos] + _REFUSE_TENANT_SETTING + data[end:]
                        n = len(data)
                        length = len(_REFUSE_TENANT_SETTING) - 1
                        end = pos + 1 + length
                if self.session_mode and (
                    _SESSION_SQL.match(data, pos + 5, pos + 69)
                    or data.find(b";", pos + 5, end - 2) >= 0
                    or (pos + 5 < n and data[pos + 5] in _COMMENT_START)
                ):
                    # Session pooling: a SET pgrouter.target still never reaches a server as
                    # written (the router's setting; `= primary` is a syntax error there).
                    if end > n:
                        self._hold_back(data, pos, 1 + length)
                        data = data[:pos]
                        n = pos
                        break
                    if self.session.startup_values and self._resets_startup(data[pos + 5 : end - 1]):
                        self._restore_owed = True
                    targets = self._router_targets(data, pos + 5, end - 1)
                    if targets is not None:
                        sub = frame(b"Q", targets.sql.encode(self.router.client_text_encoding) + b"\0")
                        data = data[:pos] + sub + data[end:]
                        n = len(data)
                        length = len(sub) - 1
                # _SESSION_SQL's words are among _SPECIAL_START's: one regex pass for most.
                special = self.rewrite_statements and _SPECIAL_START.match(data, pos + 5, pos + 69)
                session_first = special and _SESSION_SQL.match(data, pos + 5, pos + 69)
                # A SET/RESET/DISCARD after another statement or a comment changes the session
                # too: unseen, it would stay on the server connection for the next client.
                # Only after a ';' (not the last character) or a leading comment can one be:
                # one find() for most queries, the pattern for few. Such a query is also looked
                # at for what pins (SELECT 1; LISTEN ch).
                later = (
                    self.rewrite_statements
                    and not session_first
                    and (
                        data.find(b";", pos + 5, end - 2) >= 0
                        or (pos + 5 < n and data[pos + 5] in _COMMENT_START)
                    )
                )
                session_later = later and _LATER_SESSION_SQL.search(data, pos + 5, end) is not None
                configs = False
                if self.rewrite_statements:
                    # What else may change the session or pin, in any spelling: one lowered
                    # copy costs about what a find() per spelling would. set_config(name,
                    # value, false) changes the session as a SET does; spelt with Unicode
                    # escapes (U&"set\005fconfig") only the parser sees the name.
                    low = data[pos + 5 : end].lower()
                    configs = (
                        not session_first
                        and not session_later
                        and (low.find(b"set_config") >= 0 or low.find(b"u&") >= 0)
                    )
                    functions = self.function_catalog
                    session_calls = functions.catalog.session_calls if functions is not None else None
                    pin_words = special or later or configs or low.find(b"advisory") >= 0 or low.find(b"temp") >= 0
                    look = pin_words or session_calls is not None
                else:
                    look = pin_words = False
                if look:
                    # Might change session state or pin: look closer, at the whole message.
                    if end > n:
                        self._hold_back(data, pos, 1 + length)
                        data = data[:pos]
                        n = pos
                        break
                    # The lowered copy, not data from pos + 5: there the leading \b of the
                    # pattern would see the length's last byte, a letter or digit for one
                    # length in four, and miss a LISTEN or CREATE TEMP that starts the text.
                    if (pin_words and _PIN_SQL.search(low)) or (session_calls is not None and session_calls.search(low)):
                        self._track_pins(low, 0, len(low))
                    if special and functions is not None and _CREATES_ROUTINE_SQL.match(data, pos + 5, pos + 69):
                        self._note_created_routines(data[pos + 5 : end - 1])
                if session_first:
                    # Starts with SET/RESET/DISCARD/PREPARE/EXECUTE/DEALLOCATE.
                    if _SQL_PREPARED.match(data, pos + 5, min(end, pos + 69)):
                        # Refused by substitution: the server raises the error, so it lands
                        # in order and fails an open transaction exactly like any error.
                        data = data[:pos] + _REFUSE_SQL_PREPARED + data[end:]
                        n = len(data)
                        length = len(_REFUSE_SQL_PREPARED) - 1
                    else:
                        flags, sub = self._track_query(data, pos, end, pos == start and end == n)
                        forget |= flags
                        if sub is not None:
                            data = data[:pos] + sub + data[end:]
                            n = len(data)
                            length = len(sub) - 1
                elif session_later or configs:
                    flags, sub = self._track_query(data, pos, end, False)
                    forget |= flags
                    if sub is not None:
                        data = data[:pos] + sub + data[end:]
                        n = len(data)
                        length = len(sub) - 1
                elif self.settings_undo is not None and (
                    (special and _SAVEPOINT_SQL.match(data, pos + 5, pos + 69))
                    or _ENDS_AND_CHAINS.match(data, pos + 5, end)
                ):
                    forget |= self._track_session_statements(data[pos + 5 : end - 1])
                if (
                    self._restore_owed
                    and pos + 1 + length <= n
                    and _COPY_WORD.search(data, pos + 5, pos + 1 + length) is None
                ):
                    # The restore goes right behind this Query, skipped over by this loop.
                    # (Not behind a COPY: its data comes next. The next Query or Sync then.)
                    data, inserted = self._restore(data, pos + 1 + length)
                    n = len(data)
                    length += inserted
                    forget |= 1 << (RESTORE_SHIFT + syncs)
                    syncs += 1
            elif t in _EXTENDED:
                if t != _H:  # Flush asks for output; it leaves nothing owed
                    self.unsynced = True
                if t in _NAMED and self.rewrite_statements:
                    if pos + 1 + length > n:
                        # Parse/Bind/Describe/Close may need rewriting: wait for all of it.
                        self._hold_back(data, pos, 1 + length)
                        data = data[:pos]
                        n = pos
                        break
                    # Unnamed statements and portals (most traffic) need no rewriting, only
                    # the reply bookkeeping of their Parse/Close when rewrites are pending.
                    if t == _P_:
                        if data[pos + 5]:
                            rewrite = True
                        else:
                            parse_or_close = True
                        end = pos + 1 + length
                        if self.tenant_guard is not None:
                            name_end = data.index(b"\0", pos + 5, end)
                            query_end = data.index(b"\0", name_end + 1, end)
                            if self._tenant_guard_refuses(data[name_end + 1 : query_end], lone=False):
                                # No in-order way to fail one Parse of a pipeline: close.
                                self.fail(_tenant_setting_error(self.settings.tenant_setting))
                                return
                        query_start = data.find(b"\0", pos + 5, end) + 1
                        special_parse = _SPECIAL_START.match(data, query_start, end)
                        if special_parse and _SQL_PREPARED.match(data, query_start, end):
                            # Refused as in a Query (above): the Parse of the refusal takes its
                            # place, with its name and parameter types, and its Execute fails.
                            query_end = data.index(b"\0", query_start, end)
                            sub = frame(b"P", data[pos + 5 : query_start] + _REFUSE_SQL_PREPARED_SQL + data[query_end:end])
                            data = data[:pos] + sub + data[end:]
                            n = len(data)
                            length = len(sub) - 1
                            end = pos + 1 + length
                            special_parse = None
                        low = data[query_start:end].lower()
                        functions = self.function_catalog
                        session_calls = functions.catalog.session_calls if functions is not None else None
                        pins = (
                            (
                                low.find(b"advisory") >= 0
                                or low.find(b"temp") >= 0
                                or special_parse
                                or data[query_start] in _COMMENT_START
                            )
                            and _PIN_SQL.search(low) is not None
                        ) or (session_calls is not None and session_calls.search(low) is not None)
                        if pins:
                            self._track_pins(low, 0, len(low))
                        if special_parse and functions is not None and _CREATES_ROUTINE_SQL.match(data, query_start, end):
                            self._note_created_routines(data[query_start : data.index(b"\0", query_start, end)])
                        settings = (
                            (special_parse and _SESSION_SQL.match(data, query_start, end))
                            or (
                                data[query_start] in _COMMENT_START
                                and _LATER_SESSION_SQL.search(data, query_start, end) is not None
                            )
                            or low.find(b"set_config") >= 0
                            or low.find(b"u&") >= 0
                            or (special_parse and _SAVEPOINT_SQL.match(data, query_start, end))
                            or (low.find(b"chain") >= 0 and _ENDS_AND_CHAINS.match(data, query_start, end))
                        )
                        if settings and not data[pos + 5]:
                            # A SET sent with the extended protocol in an unnamed statement
                            # (JDBC): noted when parsed, as the Query's are when they arrive.
                            # A named one changes nothing until a Bind runs it, maybe on
                            # another server connection: noted then (_statement_effects_again).
                            query_end = data.index(b"\0", query_start, end)
                            forget |= self._track_session_statements(data[query_start:query_end])
                        if data[pos + 5]:
                            name = data[pos + 5 : query_start - 1]
                            if pins or settings:
                                sql = data[query_start : data.index(b"\0", query_start, end)]
                                self._effects_by_statement[name] = (sql, pins, bool(settings))
                            elif self._effects_by_statement:
                                self._effects_by_statement.pop(name, None)
                        if settings:
                            # Tracked from the text as written (above, or at each Bind of a
                            # named statement); sent without its SET pgrouter.target.
                            sub = self._parse_without_router_target(data, pos, end)
                            if sub is not None:
                                data = data[:pos] + sub + data[end:]
                                n = len(data)
                                length = len(sub) - 1
                    elif t == _B_:
                        if data[pos + 5] or data[pos + 6]:
                            rewrite = True
                        if self._effects_by_statement:
                            forget |= self._statement_effects_again(data, pos + 5, pos + 1 + length)
                    elif data[pos + 5] == _S and data[pos + 6]:
                        rewrite = True  # Describe/Close of a named statement
                        if t == _C_ and self._effects_by_statement:
                            name_end = data.index(b"\0", pos + 6, pos + 1 + length)
                            self._effects_by_statement.pop(data[pos + 6 : name_end], None)
                    elif t == _C_:
                        parse_or_close = True
                elif t == _P_ and self.session_mode:
                    end = pos + 1 + length
                    if end > n:
                        self._hold_back(data, pos, 1 + length)
                        data = data[:pos]
                        n = pos
                        break
                    query_start = data.index(b"\0", pos + 5, end) + 1
                    if self.session.startup_values and (
                        # (One statement per Parse: one that resets starts with the word.)
                        _SESSION_SQL.match(data, query_start, query_start + 64)
                        or data[query_start] in _COMMENT_START
                        or self._resetting_statements
                    ):
                        # An unnamed statement runs before the Sync that follows; a named one
                        # at each Bind of it (below).
                        resets = self._resets_startup(data[query_start : data.index(b"\0", query_start, end)])
                        if not data[pos + 5]:
                            self._restore_owed |= resets
                        elif resets:
                            self._resetting_statements.add(data[pos + 5 : query_start - 1])
                        elif self._resetting_statements:
                            self._resetting_statements.discard(data[pos + 5 : query_start - 1])
                    sub = self._parse_without_router_target(data, pos, end)
                    if sub is not None:
                        data = data[:pos] + sub + data[end:]
                        n = len(data)
                        length = len(sub) - 1
                elif t == _B_ and self._resetting_statements:
                    # Session mode: a Bind of a named statement that resets startup settings.
                    if pos + 1 + length > n:
                        self._hold_back(data, pos, 1 + length)
                        data = data[:pos]
                        n = pos
                        break
                    portal_end = data.index(b"\0", pos + 5, pos + 1 + length)
                    name = data[portal_end + 1 : data.index(b"\0", portal_end + 1, pos + 1 + length)]
                    if name in self._resetting_statements:
                        self._restore_owed = True
            elif t == _X:
                self._forward(data[:pos], start, syncs, (_NEEDS_REWRITE if rewrite else parse_or_close) | forget)
                self._terminate()
                return
            elif t == _F:
                syncs += 1
            elif t not in _COPY:
                self._protocol_violation(f"invalid frontend message type {t!r} ({chr(t)!r})")
                return
            pos += 1 + length
        self._skip = pos - n
        if data:
            if rewrite:
                flags = _NEEDS_REWRITE | forget
            elif parse_or_close:
                flags = _COUNT_REPLIES | forget | (_ENDS_SYNCED if not self.unsynced and not self._skip else 0)
            else:
                flags = forget
            self._forward(data, start, syncs, flags)
        if self._release_after_message and not self._skip:
            self._release_after_message = False
            server = self.server
            if server is not None and server.pending == 0:
                self.server_ready(server)

    def _tenant_guard_refuses(self, sql_bytes: bytes, lone: bool) -> bool:
        """Shared mode: does this statement text try to change the tenant setting? SET, SET
        LOCAL and RESET of it and set_config() of it (or of a name computed at run time) are
        refused; so are every DO, CALL and CREATE FUNCTION/PROCEDURE (``_GUARD_OPAQUE``). A
        lone RESET ALL or DISCARD ALL between transactions passes: the key is put back before
        the next transaction."""
        low = sql_bytes.lower()
        guard = self.tenant_guard
        if (
            guard not in low
            and b"set_config" not in low
            and b"reset" not in low
            and b"discard" not in low
            and b"u&" not in low  # Unicode escapes: U&"set\005fconfig", U&'app\005f...'
            and _GUARD_OPAQUE.search(low) is None
        ):
            return False
        try:
            sql = sql_bytes.decode(self.router.client_text_encoding)
        except UnicodeDecodeError:
            return True
        classification = self.router.classifier.classify(sql, self.router.functions)
        name = guard.decode()
        if name in classification.set_config_names or classification.set_config_dynamic:
            return True
        statements = classification.statements
        for info in statements:
            kind = info.verdict.kind
            if kind in _SETTING_KINDS and info.name == name:
                return True
            if kind in (StatementKind.RESET_ALL, StatementKind.DISCARD_ALL):
                if not lone or len(statements) > 1 or self.server is not None:
                    return True
            if info.verdict.reason in (Reason.CALL_DO, Reason.UNPARSABLE) or _CREATES_ROUTINE.match(info.text):
                return True
        return False

    def gate_opened(self, gate) -> None:
        """The client's paused tenant was resumed: its transaction may go on."""
        if self._waiting_on is gate:
            self._waiting_on = None
            if self.state != _CLOSED and self._held:
                self._route_and_acquire()

    def _track_pins(self, data: bytes, start: int, end: int) -> None:
        """Session state that outlives a transaction pins the client to its server connection
        (PostgreSQL keeps it per backend). Found by pattern, deliberately generous: pinning
        too often costs pooling, too rarely hands one client's lock to another."""
        pins = self.pins
        server = self.server
        # In a transaction on a replica, LISTEN and temporary tables fail (a standby refuses
        # them): nothing to pin there.
        standby = self.replica_node is not None and server is not None and server.tx_status != _IDLE
        for match in _PIN_SQL.finditer(data, start, end):
            word = match.group(0).lower()
            if pins and word.startswith((b"unlisten", b"pg_advisory_unlock_all", b"discard", b"reset")):
                # Undone if its transaction rolls back (or it fails): see settings_settled.
                self._undo_record()
            if word.startswith(b"unlisten"):
                pins.discard("listen")
            elif word.startswith(b"listen"):
                if not standby:
                    pins.add("listen")
            elif word.startswith(b"pg_advisory_unlock_all"):
                pins.discard("advisory lock")
            elif b"advisory" in word:
                pins.add("advisory lock")
            elif word.startswith((b"create", b"into", b"pg_temp")):
                if not standby:
                    pins.add("temporary table")
            elif word.startswith(b"with"):
                pins.add("WITH HOLD cursor")
            elif word.startswith(b"discard"):
                pins.clear()
                if self.startup_identity:
                    pins.add(STARTUP_IDENTITY_PIN)
            elif word.startswith(b"reset"):
                pins.discard("role")
                if word.endswith(b"authorization"):
                    # The session user back to the login one resets the role too.
                    pins.discard("session authorization")
            else:
                pins.add("session authorization" if word.endswith(b"authorization") else "role")
        functions = self.function_catalog
        if functions is not None:
            session_calls = functions.catalog.session_calls
            if session_calls is not None and session_calls.search(data, start, end):
                # Its body may SET or set_config: what it set only its server connection knows.
                pins.add("session function")
        self.router.note_pinned(self)

    def _statement_effects_again(self, data: bytes, start: int, end: int) -> int:
        """A Bind (body ``data[start:end]``) of a named statement whose text pins or changes
        settings: note them again, as for a Query of that text. Returns the chunk flags."""
        portal_end = data.index(b"\0", start, end)
        effects = self._effects_by_statement.get(data[portal_end + 1 : data.index(b"\0", portal_end + 1, end)])
        if effects is None:
            return 0
        sql, pins, settings = effects
        if pins:
            self._track_pins(sql, 0, len(sql))
        return self._track_session_statements(sql) if settings else 0

    def _track_query(self, data: bytes, pos: int, end: int, alone: bool) -> tuple[int, bytes | None]:
        """Note what the Query ``data[pos:end]`` changes in the session (``alone``: nothing
        else in the chunk). Returns the chunk flags and, when it sets pgrouter.target and will
        reach a server, the Query to send instead."""
        body = data[pos + 5 : end - 1]
        targets = self._router_targets(data, pos + 5, end - 1)
        if targets is None or (
            # What _forward will hand to _intercept, which answers it.
            targets.lone
            and alone
            and self.server is None
            and self.db_route is not None
            and not self._held
            and self._waiting_on is None
            and _INTERCEPT_START.match(data, pos + 5, pos + 69)
        ):
            return self._track_session_statements(body), None
        # It reaches a server (inside a transaction, behind other messages, among other
        # statements, without replicas): as SETs PostgreSQL takes, failing where the router
        # would fail it.
        encoding = self.router.client_text_encoding
        flags = self._track_session_statements(targets.runs.encode(encoding), list(targets.values))
        return flags, frame(b"Q", targets.sql.encode(encoding) + b"\0")

    def _note_created_routines(self, sql_bytes: bytes) -> None:
        """A CREATE FUNCTION/PROCEDURE on its way to the server. If the body may change
        session settings, calls of the function pin from now on rather than from the next
        read of pg_proc; and pg_proc is read again once the transaction has ended, when what
        it created (or not, if it rolled back) is there to read."""
        self._routine_created = True
        try:
            sql = sql_bytes.decode(self.router.client_text_encoding)
        except UnicodeDecodeError:
            return
        watch = self.function_catalog
        names = created_session_functions(sql, watch.catalog)
        if names:
            self.router.catalogs.note_session_functions(watch.key, names)

    def _router_targets(self, data: bytes, start: int, end: int) -> RouterTargetsOnServer | None:
        """What to send instead of the statement text ``data[start:end]`` if it sets
        pgrouter.target (found by PostgreSQL's tokens, so only a text that mentions it is
        decoded and scanned)."""
        if data[start:end].lower().find(b"pgrouter") < 0:
            return None
        try:
            return router_targets_for_server(
                data[start:end].decode(self.router.client_text_encoding),
                _refuse_router_target,
                keep_values=self.session_mode,
            )
        except UnicodeDecodeError:
            return None

    def _parse_without_router_target(self, data: bytes, pos: int, end: int) -> bytes | None:
        """The Parse ``data[pos:end]`` with its text's SET pgrouter.target replaced, as a
        Query's is (its Execute then answers as PostgreSQL would answer the SET), or None."""
        query_start = data.index(b"\0", pos + 5, end) + 1
        query_end = data.index(b"\0", query_start, end)
        targets = self._router_targets(data, query_start, query_end)
        if targets is None:
            return None
        sql = targets.sql.encode(self.router.client_text_encoding)
        return frame(b"P", data[pos + 5 : query_start] + sql + data[query_end:end])

    def _restore(self, data: bytes, at: int) -> tuple[bytes, int]:
        """``data`` with the Query that puts the client's startup settings back on the server
        after its RESET / RESET ALL / DISCARD ALL (``SessionSettings.restore_sql``) inserted
        at ``at``, right after the Query or Sync that ran it, and its length. Its replies are
        dropped but for the ParameterStatus messages, and its ReadyForQuery passed on for the
        client's own (ServerConnection)."""
        self._restore_owed = False
        restore = self._restore_query
        if restore is None:
            restore = self._restore_query = m.query(self.session.restore_sql() or "")
        return data[:at] + restore + data[at:], len(restore)

    def _resets_startup(self, sql_bytes: bytes) -> bool:
        """Session mode: whether the text resets a startup setting, so that a restore must
        follow it (in transaction mode ``_track_session_statements`` notes this)."""
        low = sql_bytes.lower()
        if b"reset" not in low and b"discard" not in low and b"default" not in low and b"local" not in low:
            return False  # (SET x TO DEFAULT and SET TIME ZONE LOCAL reset too)
        try:
            sql = sql_bytes.decode(self.router.client_text_encoding)
        except UnicodeDecodeError:
            return False
        startup = self.session.startup_values
        return any(
            info.verdict.kind in (StatementKind.RESET_ALL, StatementKind.DISCARD_ALL)
            or (info.verdict.kind is StatementKind.RESET and info.name in startup)
            for info in self.router.classifier.classify(sql, self.router.functions).statements
        )

    def _track_session_statements(self, sql_bytes: bytes, router_targets: list[str] | None = None) -> int:
        """Note the session-level SET/RESET/DISCARD of a Query (replayed by ``SessionSettings``
        on the next server). Returns the chunk flags it calls for: _FORGET_PREPARED when it
        drops the server's prepared statements, _SETTINGS_RESET when the server falls back to
        its own defaults rather than this client's startup values. ``router_targets``: what the
        text's placeholder ``SET pgrouter.target`` statements stand for, in order."""
        try:
            sql = sql_bytes.decode(self.router.client_text_encoding)
        except UnicodeDecodeError:
            return 0
        classification = self.router.classifier.classify(sql, self.router.functions)
        session = self.session
        self._undo_record()
        flags = 0
        for info in classification.statements:
            kind = info.verdict.kind
            if info.name in _IDENTITY_PINS and kind in (StatementKind.SET_SESSION, StatementKind.RESET):
                self._track_identity(info.name, None if kind is StatementKind.RESET else info.value)
                if kind is StatementKind.RESET and info.name in session.startup_values:
                    self._restore_owed = True  # RESET ROLE goes back to the startup role
            elif kind is StatementKind.SET_SESSION and info.name:
                session.set(info.name, info.text)
            elif kind is StatementKind.SET_DEFAULT_READ_ONLY:
                session.set("default_transaction_read_only", info.text)
                self.read_only_session = bool(info.read_only)
            elif kind is StatementKind.RESET and info.name:
                session.reset(info.name)
                if info.name == "default_transaction_read_only":
                    self.read_only_session = self.startup_read_only
                if info.name in session.startup_values:
                    self._restore_owed = True
                flags |= _SETTINGS_RESET
            elif kind is StatementKind.RESET_ALL:
                session.reset_all()
                self.read_only_session = self.startup_read_only
                self._restore_owed = bool(session.startup_values)
                flags |= _SETTINGS_RESET
            elif kind is StatementKind.DISCARD_ALL:
                session.reset_all()
                self.read_only_session = self.startup_read_only
                self._restore_owed = bool(session.startup_values)
                flags |= _SETTINGS_RESET | _FORGET_PREPARED
            elif kind is StatementKind.ROUTER_TARGET:
                # Answered by the router when it is a lone Query between transactions
                # (_intercept); otherwise it reaches a server as a placeholder (_track_query).
                if router_targets is None:
                    value = info.value
                else:  # a placeholder: it stands for the value the client wrote
                    value = router_targets.pop(0) if router_targets else None
                if value in ROUTER_TARGET_VALUES:
                    self.session_target = _ROUTER_TARGETS[value]
            elif kind is StatementKind.DEALLOCATE_ALL:
                flags |= _FORGET_PREPARED
            elif kind is StatementKind.SAVEPOINT:
                self._track_savepoint(info.value, info.name)
            elif kind is StatementKind.ROLLBACK_AND_CHAIN or (
                kind is StatementKind.COMMIT_AND_CHAIN and self.settings_undo.failed
            ):
                # The transaction's changes are undone and the next one starts at once
                # (ReadyForQuery 'T': nothing settles): go back now, and track afresh.
                undo = self.settings_undo
                self._go_back(undo.snapshot, undo.read_only_session, undo.session_target, undo.pins)
                self._chain_undo(undo)
            elif kind is StatementKind.COMMIT_AND_CHAIN:
                self._chain_undo(self.settings_undo)  # kept; the next transaction's undo alone
            elif kind is StatementKind.DO_SESSION:
                # What it sets is known only to the server connection that ran it.
                self.pins.add("DO block")
                self.router.note_pinned(self)
        for name, value, local in classification.set_config_calls:
            if local is True:
                continue  # transaction-scoped, like SET LOCAL
            if name is None or value is None or local is None:
                # Known only when it runs (a parameter, an expression): only the server
                # connection that ran it has it, so the client keeps that one.
                self.pins.add("set_config")
                self.router.note_pinned(self)
            elif name in _IDENTITY_PINS:
                self._track_identity(name, value)
            else:
                session.set(name, set_config_sql(name, value))
        if classification.pin_calls:
            # Session advisory locks by name from the parse tree: also spelt with Unicode
            # escapes, which _track_pins's pattern cannot see.
            for name in classification.pin_calls:
                if name == "pg_advisory_unlock_all":
                    self.pins.discard("advisory lock")
                else:
                    self.pins.add("advisory lock")
            self.router.note_pinned(self)
        return flags

    def _chain_undo(self, undo: SettingsUndo) -> None:
        """An AND CHAIN, tracked on arrival: the chained transaction's changes get a record of
        their own, which remembers ``undo`` until the server has answered the chain."""
        self.settings_undo = None
        chained = self._undo_record()
        chained.chain_tags, chained.before_chain = undo.chain_tags + 1, undo

    def settings_failed(self) -> None:
        """An error from the server: the transaction it ran in will roll back. An AND CHAIN
        whose tag has not come yet never ran (nothing after an error does), so the failed
        transaction is the one before it, and the undo goes back to that one's record."""
        undo = self._undo_before_chains()
        self.settings_undo = undo
        undo.failed = True
        # A ROLLBACK TO that failed (no such savepoint) sends no tag: none is owed any more
        # but those sent after the error, which PostgreSQL runs in the failed transaction.
        self.rollback_to_tags = 0

    def _undo_before_chains(self) -> SettingsUndo:
        """The undo record of the transaction the server is in: before the AND CHAIN
        statements it has not answered yet (each began a record of its own)."""
        undo = self.settings_undo
        for _ in range(undo.chain_tags):
            undo = undo.before_chain
        return undo

    def forget_statements(self, names: list[bytes]) -> None:
        """The client's DISCARD ALL / DEALLOCATE ALL ran (its server connection saw the tag)
        and freed these statement names (``ServerStatements.forget_client_names``), as on
        PostgreSQL, where a Bind of one now fails with 26000 and a Parse of one succeeds."""
        effects = self._effects_by_statement
        if effects:
            for name in names:
                effects.pop(name, None)

    def _forgets_statements(self, sql_bytes: bytes) -> bool:
        """Whether the text of a Query holds a DISCARD ALL or DEALLOCATE ALL (rare: only
        asked of chunks the router has seen one in)."""
        try:
            sql = sql_bytes.decode(self.router.client_text_encoding)
        except UnicodeDecodeError:
            return True
        kinds = (StatementKind.DISCARD_ALL, StatementKind.DEALLOCATE_ALL)
        return any(
            info.verdict.kind in kinds
            for info in self.router.classifier.classify(sql, self.router.functions).statements
        )

    def _undo_record(self) -> SettingsUndo:
        """The state to go back to if the current transaction rolls back: taken before its
        first tracked change."""
        undo = self.settings_undo
        if undo is None:
            undo = self.settings_undo = SettingsUndo(
                self.session.snapshot(), self.read_only_session, self.session_target, frozenset(self.pins)
            )
        return undo

    def _track_savepoint(self, action: str, name: str) -> None:
        """SAVEPOINT, RELEASE or ROLLBACK TO (``action``) in a transaction with tracked setting
        changes: a ROLLBACK TO puts the settings back as they were at the savepoint, which
        stays; a RELEASE keeps them (PostgreSQL merges the savepoint into its parent)."""
        undo = self.settings_undo
        savepoints = undo.savepoints
        if action == "savepoint":
            savepoints.append(
                (name, self.session.snapshot(), self.read_only_session, self.session_target, frozenset(self.pins))
            )
            return
        # The most recent of that name. One set before the first tracked change of the
        # transaction is not in the list: the settings then were those the undo holds. (Or
        # there is none: the statement fails, and the transaction can commit only after a
        # ROLLBACK TO a savepoint that exists, which sets the state right again.)
        at = next((i for i in range(len(savepoints) - 1, -1, -1) if savepoints[i][0] == name), -1)
        if action == "release":
            if at >= 0:
                del savepoints[at:]
            return
        if at >= 0:
            _, snapshot, read_only, target, pins = savepoints[at]
            del savepoints[at + 1 :]
        else:
            snapshot, read_only, target, pins = undo.snapshot, undo.read_only_session, undo.session_target, undo.pins
        self._go_back(snapshot, read_only, target, pins)
        self.rollback_to_tags += 1

    def savepoint_rolled_back(self) -> None:
        """The tag of a ROLLBACK TO SAVEPOINT: the transaction it ran in goes on, and is no
        longer failed (an error before it, if any, is undone with what followed the
        savepoint). Its COMMIT AND CHAIN then chains a committed transaction."""
        self.rollback_to_tags -= 1
        self._undo_before_chains().failed = False

    def _track_identity(self, name: str, value: str | None) -> None:
        """SET (``value``) or RESET (None) of role or session_authorization, by whatever
        spelling: pin or unpin, as for SET ROLE / RESET ROLE."""
        pins = self.pins
        if name == "role":
            if value is None or value.lower() == "none":  # SET ROLE NONE is RESET ROLE
                pins.discard("role")
            else:
                pins.add("role")
        elif value is None:
            pins.discard("session authorization")
            pins.discard("role")
        else:
            pins.add("session authorization")
        self.router.note_pinned(self)

    def settings_settled(self, server: ServerConnection, status: int) -> None:
        """The server's ReadyForQuery while tracked setting changes are pending: once it is
        idle the transaction that ran them is over, and if it rolled back (an error, or a
        ROLLBACK, noted in ``settings_undo`` by the server connection) they are undone, on
        the server connection that ran them and here alike.

        A ROLLBACK TO SAVEPOINT's own undoing is done when it is sent (_track_savepoint); its
        tag (ROLLBACK) is told from a ROLLBACK's by ``rollback_to_tags``. Approximate where
        PostgreSQL is finer: of pipelined transactions the first to end settles the changes of
        all (README, "Session state")."""
        if status != _IDLE:
            return
        self.rollback_to_tags = 0
        undo, self.settings_undo = self.settings_undo, None
        if undo is not None and undo.failed:
            self._go_back(undo.snapshot, undo.read_only_session, undo.session_target, undo.pins)
            server.session_key = self.session.key

    def _go_back(
        self,
        snapshot: tuple[dict[str, str], frozenset | None],
        read_only_session: bool,
        session_target: Target | None,
        pins: frozenset[str],
    ) -> None:
        """A rollback (or statements that never ran): the session as it was. The pins the
        client had then may be in force again (UNLISTEN, RESET ROLE, DISCARD ALL are undone or
        never ran); the pins it took since stay: a session advisory lock outlives the rollback
        of the transaction that took it."""
        self.session.restore(snapshot)
        self.read_only_session, self.session_target = read_only_session, session_target
        if not pins <= self.pins:
            self.pins |= pins
            self.router.note_pinned(self)

    def _hold_back(self, data: bytes, pos: int, need: int) -> None:
        self._partial = [data[pos:]]
        self._partial_have = len(data) - pos
        self._partial_need = need

    def connection_lost(self, exc: Exception | None) -> None:
        if self.logged_in_at and self.router.settings.log_disconnections:
            log.info(
                "client %s@%s/%s disconnected after %.3fs%s",
                self.user, self.peer, self.database, monotonic() - self.logged_in_at,
                f": {exc}" if exc is not None else "",
            )  # fmt: skip
        self.state = _CLOSED
        waiter = self._wakeup
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client went away"))
        if self._login_task is not None and not self._login_task.done():
            self._login_task.cancel()
        if self._waiting_on is not None:
            self._waiting_on.cancel_wait(self)
            self._waiting_on = None
        self.router.forget_client(self)
        self._unroute()
        server = self.server
        if server is not None:
            self.server = None
            server.unlink()
            self._return_server_after_client_left(server)

    def pause_writing(self) -> None:
        # The client reads slower than the server sends: stop reading from the server.
        self._write_paused = True
        if self.server is not None:
            self.server.pause_reading_for_client()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.server is not None:
            self.server.resume_reading_for_client()

    # --- hot path helpers ------------------------------------------------------------

    def _forward(self, data: bytes, start: int, syncs: int, rewrite: int) -> None:
        server = self.server
        if (
            syncs == 1
            and data[0] == _Q
            and len(data) > 12
            and ((data[6] | 0x20) == _LOWER_H or data[5] in _SPACES)
            and _SHOW_START.match(data, 5, 69)
            and not start
            and self.rewrite_statements
            and self._show_router_target(data, server)
        ):
            return
        if server is not None:
            if self.replica_node is not None and self._replica_chunk(server, data, start, syncs, rewrite):
                return
            if self.watch_writes:
                self._watch_for_writes(data, start, rewrite)
            self._send(server, data, start, syncs, rewrite)
            return
        if self._dropping_copy or (not start and data and data[0] in _COPY and not self._held):
            # (With messages held, a COPY among them waits for a server connection and this
            # is its data: asyncpg sends it without waiting for CopyInResponse.)
            data, start = self._drop_orphan_copy_data(data, start)
        if not data:
            return
        if data[0] == _H and not start and not self._held and data == _FLUSH * (len(data) // 5):
            # Flush alone with nothing owed (psycopg sends one once its pipeline's replies
            # are in): a server would send nothing, and one taken for it would never be
            # given back (no ReadyForQuery comes).
            return
        if rewrite & _NEEDS_REWRITE and syncs == 1 and start == 0 and not self._held:
            reply = local_parse_reply(
                data, start, self.statements, self.router.statements, b"I" if self.deferred_begin is None else b"T"
            )
            if reply is not None:
                self.unsynced = False
                self.transport.write(reply)
                return
        if (
            self.db_route is not None
            and syncs == 1
            and data[0] == _Q
            and not self._held
            and _INTERCEPT_START.match(data, 5, 69)
            and self._waiting_on is None
            and self.rewrite_statements
            and self._intercept(data)
        ):
            return
        self._held.append((data, start, syncs, rewrite))
        self._held_bytes += len(data)
        if self._held_bytes > MAX_HELD_BYTES and not self._read_paused_while_waiting:
            self._read_paused_while_waiting = True
            self.transport.pause_reading()
        if self._waiting_on is None:
            self._route_and_acquire()

    def _route_and_acquire(self) -> None:
        if self.unsynced and self._waits_for_sync():
            return
        try:
            pool = self.router.pool_for_transaction(self)
        except TenantPaused as paused:
            self._waiting_on = paused.gate
            paused.gate.add(self)
            return
        except RouterError as exc:
            self._acquire_failed(exc)
            return
        server = pool.acquire_nowait()
        if server is not None:
            self._attach(server)
        else:
            self._waiting_on = pool
            pool.wait_for_server(self)

    # --- read/write splitting ----------------------------------------------------------

    def _waits_for_sync(self) -> bool:
        """Whether the held messages, which end before a Sync, wait for more before they are
        routed: a pipeline's segment is one implicit transaction, and a read that opens it
        may be followed by a write (psycopg sends each statement as it comes, the Sync last).
        No server would answer before the Sync or a Flush anyway. Not when a write already
        sends it to the primary (a COPY FROM waits for its CopyInResponse, not a Sync), a
        sync point or Flush among the held messages means the client may wait for replies,
        or MAX_UNSYNCED_HELD bytes are held (route.open_segment; app.pool_for_transaction
        then picks the primary)."""
        route = self.db_route
        if route is None or self.pool_mode is PoolMode.SESSION or self._held_bytes > MAX_UNSYNCED_HELD:
            return False
        held = self._held
        if open_segment(held) & (AFTER_SYNC | FLUSHES):
            return False
        _, combined, _ = held_verdict(held, route.verdicts.verdict, self.statement_sql, self.last_unnamed)
        return combined is None or combined.target is not Target.PRIMARY

    def statement_sql(self, name: bytes) -> bytes | None:
        """The query text of the client's named statement ``name``, if it has one."""
        statement = self.statements.get(name)
        if statement is None:
            return None
        parse = statement.parse_message
        name_end = parse.index(b"\0", 5)
        return parse[name_end + 1 : parse.index(b"\0", name_end + 1)]

    def _show_router_target(self, data: bytes, server: ServerConnection | None) -> bool:
        """A lone Query SHOW pgrouter.target in transaction mode, answered by the router: the
        setting is its own, no server has it. Only where the answer lands in order: between
        transactions, or with the client's server connection waiting for its next command.
        Returns False to let the Query go on like any other."""
        if 1 + _unpack_len(data, 1)[0] != len(data):
            return False
        if server is None:
            if self._held or self._waiting_on is not None:
                return False
            if self.deferred_aborted:
                status = m.FAILED_TRANSACTION
            else:
                status = m.IDLE if self.deferred_begin is None else m.IN_TRANSACTION
        else:
            if server.pending or self._chunk_unsynced:
                return False
            status = server.tx_status
        try:
            sql = data[5:-1].decode(self.router.client_text_encoding)
        except UnicodeDecodeError:
            return False
        statements = self.router.classifier.classify(sql, self.router.functions).statements
        if len(statements) != 1 or statements[0].verdict.kind is not StatementKind.SHOW_ROUTER_TARGET:
            return False
        if status == m.FAILED_TRANSACTION:
            out = m.error_response(SQLState.IN_FAILED_SQL_TRANSACTION, _ABORTED_MESSAGE, severity="ERROR")
            self.router.count_error(SQLState.IN_FAILED_SQL_TRANSACTION)
        else:
            value = _ROUTER_TARGET_NAMES[self.session_target]
            out = _SHOW_ROUTER_TARGET_COLUMNS + m.data_row([value]) + _SHOW_TAG
        self.transport.write(out + m.ready_for_query(status))
        return True

    def _intercept(self, data: bytes) -> bool:
        """A lone Query between transactions that the router answers itself. Returns False to
        let it go on like any other.

        - BEGIN / START TRANSACTION (read-write, bound for the primary): answered at once and
          sent later, just before the transaction's first real statement, which decides its
          node: SET TRANSACTION READ ONLY takes it to a replica; with transaction_routing =
          first_statement, so does any read.
        - COMMIT / ROLLBACK of such a transaction that never ran a statement: answered.
        - SET / RESET pgrouter.target: the session's routing target, never sent to a server.
        """
        n = len(data)
        if 1 + _unpack_len(data, 1)[0] != n:
            return False
        classification = self.db_route.verdicts.classification(data[5:-1])
        if classification is None or len(classification.statements) != 1:
            return False
        info = classification.statements[0]
        kind = info.verdict.kind
        in_tx = self.deferred_begin is not None
        if kind is StatementKind.ROUTER_TARGET:
            # The router's own setting, answered here: no server's rollback can undo it (the
            # undo snapshot was taken for this Query: nothing else is held or running).
            self.settings_undo = None
            if self.deferred_aborted:
                out = m.error_response(SQLState.IN_FAILED_SQL_TRANSACTION, _ABORTED_MESSAGE, severity="ERROR")
                self.router.count_error(SQLState.IN_FAILED_SQL_TRANSACTION)
                self.transport.write(out + m.ready_for_query(m.FAILED_TRANSACTION))
                return True
            if info.value not in ROUTER_TARGET_VALUES:
                out = m.error_response(
                    SQLState.INVALID_PARAMETER_VALUE,
                    f'invalid value for parameter "pgrouter.target": "{info.value}"',
                    severity="ERROR",
                    hint="Available values: primary, replica, auto.",
                )
                self.router.count_error(SQLState.INVALID_PARAMETER_VALUE)
                # An error aborts the transaction, as on a server.
                self.deferred_aborted = in_tx
                self.transport.write(out + m.ready_for_query(m.FAILED_TRANSACTION if in_tx else m.IDLE))
                return True
            self.session_target = _ROUTER_TARGETS[info.value]
            tag = "RESET" if data[5:].lstrip()[:5].lower() == b"reset" else "SET"
            status = m.IN_TRANSACTION if in_tx else m.IDLE
            self.transport.write(m.command_complete(tag) + m.ready_for_query(status))
            return True
        if in_tx:
            tag = _COMMAND_TAGS.get(kind)
            if tag is None:
                return False
            if self.deferred_aborted:
                tag = "ROLLBACK"  # COMMIT of a failed transaction rolls it back
                self.deferred_aborted = False
            self.deferred_begin = None
            self.transport.write(m.command_complete(tag) + m.ready_for_query(m.IDLE))
            return True
        if kind is not StatementKind.BEGIN:
            return False
        reason = info.verdict.reason
        if reason is not Reason.TRANSACTION_BEGIN_READ_WRITE and reason is not Reason.TRANSACTION_READ_WRITE:
            return False  # READ ONLY, a hint, or SERIALIZABLE: nothing left to decide
        target, why = decide(
            info.verdict,
            info.verdict,
            session_target=self.session_target,
            read_only_session=self.read_only_session,
            pinned=bool(self.pins),
        )
        # In a read-only session a plain BEGIN's transaction is read-only: its first statement
        # picks the node, a replica unless it needs the primary (LISTEN, SET TRANSACTION READ
        # WRITE...), where PostgreSQL runs it in a read-only transaction all the same.
        read_only = why is RouteReason.READ_ONLY
        if target is not Target.PRIMARY and not read_only:
            return False  # pgrouter.target = replica: nothing left to decide
        self.deferred_begin = data
        self.deferred_read_only = read_only
        tag = "START TRANSACTION" if data[5:].lstrip()[:5].lower() == b"start" else "BEGIN"
        self.transport.write(m.command_complete(tag) + m.ready_for_query(m.IN_TRANSACTION))
        return True

    def _replica_chunk(self, server: ServerConnection, data: bytes, start: int, syncs: int, rewrite: int) -> bool:
        """A chunk arriving while a replica serves this client. True when it was held back:
        it needs the primary, and the replica's work is autocommit reads, so it waits for them
        to finish and is then routed afresh (a write must never meet a replica)."""
        entry = (data, start, syncs, rewrite)
        if self._reroute:
            self._held.append(entry)
            self._held_bytes += len(data)
            return True
        if self.pins:
            # Pinned while on this replica (an advisory lock taken in a read-only transaction):
            # the client keeps this server connection, which holds that state; what needs
            # the primary fails here as a write to a standby does (25006). (Pins taken once
            # a chunk waits to be rerouted belong to the chunks that wait: server_ready.)
            return False
        opens = not self._chunk_unsynced
        if server.tx_status == m.IDLE and start == 0 and (opens or self._segment_ran_nothing(server)):
            if opens and self.unsynced:
                # It opens a segment that its Sync does not close yet, which a write may join:
                # routed afresh (_waits_for_sync) once the replica's work is done.
                self._reroute = True
                self._held.append(entry)
                self._held_bytes += len(data)
                return True
            route = self.db_route
            _, combined, _ = held_verdict([entry], route.verdicts.verdict, self.statement_sql, self.last_unnamed)
            if combined is not None and combined.target is Target.PRIMARY:
                target, _ = decide(
                    combined,
                    combined,
                    session_target=self.session_target,
                    read_only_session=self.read_only_session,
                    pinned=bool(self.pins),
                )
                if target is Target.PRIMARY:
                    if not opens:
                        # The segment it joins has only parsed and described on the replica
                        # (asyncpg's prepare: Parse, Describe, Flush), which the client has
                        # had the replies of: the router's own Sync ends it there, its
                        # ReadyForQuery is dropped, and the client's segment goes on on the
                        # primary (named statements are prepared there when bound).
                        server.write(_SYNC)
                        server.stmts.sent_z += 1
                        server.drop_z += 1
                    self._reroute = True
                    self._held.append(entry)
                    self._held_bytes += len(data)
                    return True
            if not opens and server.described() and named_prepare(self._replay):
                # A read after asyncpg's prepare, whose replies the client has had: this
                # chunk's replies are all it will see of the rest, and the statement is
                # prepared again wherever a Bind of it runs. So the read may still run again
                # elsewhere (a failed replica, or a refusal as a write) with this chunk alone.
                self._replay = []
                self._replay_bytes = 0
                server.forwarded = False
        replay = self._replay
        if replay is not None:
            self._replay_bytes += len(data)
            if self._replay_bytes > MAX_REPLAY_BYTES:
                self._replay = None
            else:
                replay.append(entry)
        return False

    def _segment_ran_nothing(self, server: ServerConnection) -> bool:
        """The segment open on the replica has only parsed, described or closed statements,
        every earlier ReadyForQuery has come and no error is known: it can end there without
        the client seeing a difference (``_replica_chunk``). (An error still on its way from
        the replica is not known: it can come before the router's Sync's ReadyForQuery, for
        a client that sends on without reading the replies its Flush asked for, and the
        client is then disconnected (server_ready) rather than have its write run where
        PostgreSQL would skip it; asyncpg reads them first, and sends a Sync after an error.)"""
        replay = self._replay
        st = server.stmts
        return (
            replay is not None
            and self._replay_begin is None
            and st.sent_z == st.recv_z
            and not server.swallow_z
            and self._after_replies is None
            and st.error_segment != st.recv_z
            and not open_segment(replay) & (EXECUTES | BINDS)
        )

    def _watch_for_writes(self, data: bytes, start: int, flags: int) -> None:
        """In a BEGIN ... transaction on the primary: does it write? (read-your-writes)"""
        if start:
            return
        _, combined, self.last_unnamed = held_verdict(
            [(data, start, 0, flags)], self.db_route.verdicts.verdict, self.statement_sql, self.last_unnamed
        )
        if combined is not None and combined.target is Target.PRIMARY:
            self.wrote = True
            self.watch_writes = False

    def _unroute(self) -> None:
        node = self.replica_node
        if node is not None:
            self.replica_node = None
            if node.in_flight > 0:
                node.in_flight -= 1
        self._replay = None
        self._replay_begin = None

    def refused_on_replica(self, retry: bool) -> bool:
        """The replica refused this read as a write (25006): a view over a volatile function,
        say, which the statement's text does not show. When the read is one text run on its
        own (no BEGIN: in a transaction the refusal may be another statement's, LISTEN in a
        read-only one, say), that text goes to the primary from now on
        (VerdictCache.refused_by_replica). True when that changed its verdict and the read
        can run again (``_retry_read``): ``retry``, no reply byte has reached the client
        (asyncpg's Describe before its Execute has: that error stays the client's, the next
        run goes to the primary); also when another client's refusal taught it meanwhile.
        False otherwise, also for a hint, or a verdict learned before that a read-only
        session keeps on a replica anyway: the error is the client's, as PostgreSQL would
        give it."""
        replay = self._replay
        if self.replica_node is None or replay is None or self._replay_begin is not None or self.state == _CLOSED:
            return False
        verdicts = self.db_route.verdicts
        texts: set[bytes] = set()

        def note(sql: bytes) -> Verdict:
            texts.add(sql)
            return verdicts.verdict(sql)

        held_verdict(replay, note, self.statement_sql, None)
        if len(texts) != 1:
            return False
        (sql,) = texts
        again = retry and not self._refusal_retried
        if verdicts.refused_by_replica(sql):
            log.info("client %s@%s/%s: a replica refused a read as a write; %s, as it will from now on: %s",
                     self.user, self.peer, self.database,
                     "it runs on the primary" if again else "the error is the client's (replies had gone on), the next run goes to the primary",
                     sql.decode("utf-8", "replace")[:200])  # fmt: skip
            return again
        # Learned by another client meanwhile (this read was routed before): the primary, too,
        # unless this session keeps such statements on a replica.
        return (
            again
            and verdicts.verdict(sql).reason is Reason.REFUSED_BY_REPLICA
            and self.session_target is None
            and not self.read_only_session
        )

    def _retry_read(self, error: str, attached: bool, refused: bool = False) -> bool:
        """The replica under a read failed before any reply byte reached the client: run it
        once more elsewhere. False when that is not possible (it is then an error as usual).
        ``refused``: the replica refused it as a write (25006, ``refused_on_replica``); the
        replica is sound and the read's statements now go to the primary."""
        node = self.replica_node
        if node is None or (self._refusal_retried if refused else self._retried) or self.state == _CLOSED:
            return False
        if not attached:
            replay, begin = [], self.deferred_begin  # never sent: what it holds is all
        elif self._replay is None:
            return False
        else:
            replay, begin = self._replay, self._replay_begin
        self._unroute()
        if not refused:  # (a refusal was logged by refused_on_replica; the replica is sound)
            self.db_route.split.node_failed(node, error)
            log.info("client %s@%s/%s: replica %s:%d failed (%s); retrying the read elsewhere",
                     self.user, self.peer, self.database, node.host, node.port, error)
        if refused:
            self._refusal_retried = True  # apart from a failure's retry: it goes to the primary
        else:
            self._retried = True
        self._held = replay + self._held
        self._held_bytes = sum(len(entry[0]) for entry in self._held)
        self.deferred_begin = begin
        self._route_and_acquire()
        return True

    # Pool waiter interface.
    def server_assigned(self, server: ServerConnection) -> None:
        pool, self._waiting_on = self._waiting_on, None
        if self.state == _CLOSED or pool is None:
            server.pool.release(server)
            return
        self._attach(server)

    def server_failed(self, error: RouterError) -> None:
        self._waiting_on = None
        if self._retry_read(error.message, attached=False):
            return
        self._acquire_failed(error)

    def _attach(self, server: ServerConnection) -> None:
        self.server = server
        server.link(self)
        if self._write_paused:
            server.pause_reading_for_client()
        # The settings the server must carry before this transaction's own statements run:
        # without the SETs it holds (tracked on arrival, they are in self.session already).
        undo = self.settings_undo
        if undo is not None and undo.chain_tags:
            undo = self._undo_before_chains()
        before = self.session.key if undo is None else undo.snapshot[1]
        if (self.rewrite_statements or self.tenant_guard is not None or self.session_mode) and server.session_key != before:
            prelude = self.session.prelude(server.session_key, None if undo is None else undo.snapshot)
            if prelude:
                # Another client's settings off, this client's on; replies are dropped.
                server.write(b"".join(m.query(sql) for sql in prelude))
                server.stmts.sent_z += len(prelude)
                server.swallow_z += len(prelude)
                server.session_key = before
        begin = self.deferred_begin
        if begin is not None:
            # The BEGIN the router answered: its reply was given, so it is swallowed.
            self.deferred_begin = None
            server.write(begin)
            server.stmts.sent_z += 1
            server.swallow_z += 1
            if self.deferred_aborted:
                # What failed before reaching a server fails the transaction there too.
                self.deferred_aborted = False
                server.write(_ABORT_DEFERRED)
                server.stmts.sent_z += 1
                server.swallow_z += 1
        if self.replica_node is not None:
            self._replay = list(self._held)
            self._replay_bytes = self._held_bytes
            self._replay_begin = begin
        held = self._held
        self._held_bytes = 0
        self._held = []
        for data, start, syncs, rewrite in held:
            self._send(server, data, start, syncs, rewrite)
        if self._read_paused_while_waiting:
            self._read_paused_while_waiting = False
            self.transport.resume_reading()

    def _drop_orphan_copy_data(self, data: bytes, start: int) -> tuple[bytes, int]:
        """After a COPY FROM STDIN fails, the server has answered ReadyForQuery while the client
        may still be sending CopyData/CopyDone; the server would ignore them (55.2.6), so they
        are dropped here instead of taking a server connection for them."""
        if start:
            if not self._dropping_copy:
                return data, start
            data = data[start:]
        self._dropping_copy = False
        pos = 0
        n = len(data)
        while pos + 5 <= n and data[pos] in _COPY:
            end = pos + 1 + _unpack_len(data, pos + 1)[0]
            if end > n:
                self._dropping_copy = True
                return b"", 0
            pos = end
        return (data[pos:] if pos else data), 0

    def _send(self, server: ServerConnection, data: bytes, start: int, syncs: int, rewrite: int) -> None:
        if self._after_replies is not None:
            self._wait_for_replies(data, start, syncs, rewrite)
            return
        now = 0.0
        if not server.query_t0:
            server.query_t0 = now = perf_counter()
            if not server.tx_t0:
                server.tx_t0 = now
        if self.router.query_stats is not None:
            # A call: a Query, or extended messages up to a Sync; the server times it out.
            if not self._call_t0:
                self._call_t0 = now or perf_counter()
                self._call_sql = self._statement_text(data, start)
            if syncs:
                server.calls.append(
                    (self._call_sql, self._call_t0, syncs, "replica" if self.replica_node is not None else "primary")
                )
                self._call_t0 = 0.0
        # Unnamed Parse/Close replies need counting only while a rewritten one's reply is owed.
        st = server.stmts
        # Parses/Closes are counted (queued until their replies come), except in chunks of
        # unnamed ones that end with a Sync; while those replies are on their way nothing
        # counted is sent, or a ParseComplete would be matched to the wrong request.
        sent = data
        if rewrite & (_NEEDS_REWRITE | _COUNT_REPLIES | _ENDS_SYNCED | _FORGET_PREPARED) == _COUNT_REPLIES | _ENDS_SYNCED:
            # Only unnamed Parses/Closes, every segment closed by a Sync of this chunk (what
            # pgbench -M extended sends): their replies need no queue, provided nothing
            # queued is sent before they have all come back (rewrite_for_server waits).
            st.uncounted_z = st.sent_z + syncs
        elif rewrite & (_NEEDS_REWRITE | _COUNT_REPLIES | _FORGET_PREPARED):
            try:
                sent = rewrite_for_server(
                    data, start, self.statements, self.router.statements, st,
                    self._forgets_statements if rewrite & _FORGET_PREPARED else None, server.tx_status == _FAILED,
                )
            except ProtocolError as exc:
                self._protocol_violation(exc.message)
                return
            if st.wait_from >= 0:
                data, syncs, rewrite = self._split_for_replies(server, data, syncs, rewrite)
                if not data:
                    return  # all of it waits
        # A lone exchange naming a statement, outside a transaction: it may run again once
        # (reprepare). Anything else sent meanwhile disarms it.
        server.retry_data = (
            data
            if syncs == 1 and server.tx_status == _IDLE and rewrite & _NEEDS_REWRITE and not start
            and st.sent_z == st.recv_z and not server.swallow_z
            else None
        )
        server.last_sent = sent
        restores = rewrite >> RESTORE_SHIFT
        if restores:
            # The ReadyForQuery replies the router's restores follow: dropped, the restore's
            # own stands in for each (ServerConnection.restore_after).
            k = st.sent_z
            while restores:
                if restores & 1:
                    server.restore_after.append(k)
                restores >>= 1
                k += 1
        st.sent_z += syncs
        server.traffic.received += len(sent)
        server.transport.write(sent)
        # Whatever SETs this chunk carries, the server will carry too; after a RESET it carries
        # its own defaults, which match no client's key, so the next transaction re-primes it.
        server.session_key = _UNKNOWN_SETTINGS if rewrite & _SETTINGS_RESET else self.session.key

    def _split_for_replies(
        self, server: ServerConnection, data: bytes, syncs: int, rewrite: int
    ) -> tuple[bytes, int, int]:
        """``rewrite_for_server`` stopped at a message that must wait for the replies owed
        (``server.stmts.wait_from``). The rest of the chunk waits; returns the part that goes
        now, its Sync count and flags. A DISCARD ALL in the rest is found when the rest is
        rewritten (the one in the part sent now has been)."""
        cut = server.stmts.wait_from
        rest = data[cut:]
        rest_syncs = _sync_points(rest)
        self._after_replies = [(rest, 0, rest_syncs, rewrite)]
        self._after_replies_bytes = len(rest)
        if rest_syncs and self.router.query_stats is not None:
            # The call just counted for this chunk ends at a ReadyForQuery of the rest only
            # when the rest is sent; until then the part sent now is a call of its own.
            sql, t0, _, role = server.calls[-1]
            if rest_syncs < syncs:
                server.calls[-1] = (sql, t0, syncs - rest_syncs, role)
            else:
                server.calls.pop()
                self._call_sql, self._call_t0 = sql, t0
        now_syncs = syncs - rest_syncs
        if rewrite >> RESTORE_SHIFT:
            # Restores after the Syncs of the rest go with the rest, counted from its start.
            low_bits = (1 << (RESTORE_SHIFT + now_syncs + 1)) - 1
            flags = (rewrite & ((1 << RESTORE_SHIFT) - 1)) | ((rewrite >> (RESTORE_SHIFT + now_syncs)) << RESTORE_SHIFT)
            self._after_replies[0] = (rest, 0, rest_syncs, flags)
            rewrite &= low_bits
        return data[:cut], now_syncs, rewrite & ~_FORGET_PREPARED

    def _wait_for_replies(self, data: bytes, start: int, syncs: int, rewrite: int) -> None:
        """A chunk behind one that waits for the server's replies: it waits too, in order."""
        self._after_replies.append((data, start, syncs, rewrite))
        self._after_replies_bytes += len(data)
        if self._after_replies_bytes > MAX_HELD_BYTES and not self._read_paused_while_waiting:
            self._read_paused_while_waiting = True
            self.transport.pause_reading()

    def _send_after_replies(self, server: ServerConnection) -> None:
        """Everything sent has been answered, so what waited can be rewritten knowing how the
        earlier Parses and Closes ended (it may stop at another such message and wait again)."""
        waiting, self._after_replies = self._after_replies, None
        self._after_replies_bytes = 0
        for data, start, syncs, rewrite in waiting:
            if self.state == _CLOSED:
                return
            self._send(server, data, start, syncs, rewrite)
        if self._after_replies is None and self._read_paused_while_waiting:
            self._read_paused_while_waiting = False
            self.transport.resume_reading()

    def reprepare(self, server: ServerConnection, data: bytes) -> bool:
        """The server answered "cached plan must not change result type" (DDL changed the
        result columns of a prepared statement) as the first reply to ``data``,
        a lone exchange ending at Sync outside a transaction, so the client has seen nothing
        of it and the failed implicit transaction changed nothing. Its statements are closed
        and the exchange sent again: their Parses go first, planned afresh. Once: the retry
        is not armed for another go.

        Not when an Execute comes before any Describe in the exchange: the client then
        relies on a row description it got earlier (asyncpg), which the new plan would
        contradict; the client sees the error (and asyncpg prepares again by itself)."""
        if not _describes_before_execute(data):
            return False
        st = server.stmts
        segment = st.sent_z
        out: list[bytes] = []
        for name in dict.fromkeys(statements_used(server.last_sent)):
            st.unprepare(name, segment, out)
        try:
            sent = rewrite_for_server(data, 0, self.statements, self.router.statements, st)
        except ProtocolError:
            return False  # it was rewritten once already; cannot happen
        out.append(sent)
        server.last_sent = sent
        st.sent_z += 1
        server.write(b"".join(out))
        self.router.count_reprepare()
        return True

    def _statement_text(self, data: bytes, start: int) -> bytes | None:
        """The statement a call runs, from its first message: a Query's text, a Parse's, or
        the one a Bind's statement was parsed from. None when the chunk starts otherwise."""
        if start >= len(data):
            return None
        t = data[start]
        if t == _Q:
            return data[start + 5 : start + _unpack_len(data, start + 1)[0]]
        if t == _P_:
            name_end = data.find(b"\0", start + 5)
            query_end = data.find(b"\0", name_end + 1)
            if name_end < 0 or query_end < 0:
                return None
            sql = data[name_end + 1 : query_end]
            if name_end == start + 5:
                self.last_parse_sql = sql
            return sql
        if t == _B_:
            portal_end = data.find(b"\0", start + 5)
            name_end = data.find(b"\0", portal_end + 1)
            if portal_end < 0 or name_end < 0:
                return None
            if name_end == portal_end + 1:
                return self.last_parse_sql
            return self.statement_sql(data[portal_end + 1 : name_end])
        return None

    def cancel_waiting(self) -> None:
        """A CancelRequest while the client's next statements wait for a server connection
        (pool full, tenant paused): they never run. They fail with 57014 as a statement
        cancelled before it started would, instead of running once a server frees up, after
        the client (a driver's query timeout, psql's ^C) has given up on them."""
        waiting_on = self._waiting_on
        if waiting_on is None or not self._held or self.state == _CLOSED:
            return
        self._waiting_on = None
        waiting_on.cancel_wait(self)
        self._acquire_failed(
            RouterError(SQLState.QUERY_CANCELED, "canceling statement due to user request", severity="ERROR")
        )

    def _acquire_failed(self, exc: RouterError) -> None:
        if self.state == _CLOSED:
            return
        syncs = sum(entry[2] for entry in self._held)
        self._held = []
        self._held_bytes = 0
        self._unroute()
        self._reroute = False
        log.warning("client %s@%s/%s: %s", self.user, self.peer, self.database, exc.message)
        self._call_t0 = 0.0
        undo = self.settings_undo
        if undo is not None:
            # The SETs (and unpinning statements) among the held messages never ran, nor did
            # their AND CHAINs.
            undo = self._undo_before_chains()
            self.settings_undo = None
            self._go_back(undo.snapshot, undo.read_only_session, undo.session_target, undo.pins)
        if syncs == 0 or exc.severity == "FATAL":
            self.deferred_begin = None
            self.fail(exc)
            return
        # The held messages were never sent: answer each Sync point as the server would after
        # an error (one ErrorResponse, then ReadyForQuery for every Sync/Query). Inside a
        # transaction whose BEGIN the router answered, the transaction is now aborted.
        status = m.IDLE
        if self.deferred_begin is not None:
            self.deferred_aborted = True
            status = m.FAILED_TRANSACTION
        out = m.error_response(exc.sqlstate, exc.message, severity="ERROR", detail=exc.detail, hint=exc.hint)
        out += m.ready_for_query(status) * syncs
        self.router.count_error(exc.sqlstate)
        self.transport.write(out)
        if self._read_paused_while_waiting:
            self._read_paused_while_waiting = False
            self.transport.resume_reading()

    def server_ready(self, server: ServerConnection) -> None:
        """Called by the linked server after a ReadyForQuery with nothing else outstanding."""
        if server.dropped_after_error:
            # PostgreSQL would skip what the client sent after the error up to its Sync;
            # moved to the primary, it would run (_replica_chunk). Nothing of it has run.
            server.dropped_after_error = False
            self.fail(
                RouterError(
                    SQLState.FEATURE_NOT_SUPPORTED,
                    "a write joined a pipeline whose statement had failed on a replica; "
                    "the router cannot skip it as PostgreSQL would",
                    hint="Read the replies to a Flush before sending more, or end the pipeline with a Sync.",
                )
            )
            return
        if self._after_replies is not None:
            self._send_after_replies(server)
            return
        if self._routine_created and server.tx_status == m.IDLE:
            self._routine_created = False
            self.router.catalogs.invalidate(self.function_catalog.key)
        if (
            server.tx_status == m.IDLE
            and self.pool_mode is PoolMode.TRANSACTION
            and (not self.unsynced or self._reroute)
            and (not self.pins or self._reroute)
        ):
            if self._skip and not self._reroute:
                # Part of a message (CopyData after a failed COPY FROM) is on its way to this
                # server; the rest must follow it there before anyone else may use it.
                self._release_after_message = True
                return
            if self.wrote:
                self.wrote = False
                self.db_route.split.note_write(self)
            self._detach(server)
            server.pool.release(server)
            if self._held and self._waiting_on is None and self.state != _CLOSED:
                self._route_and_acquire()  # what waited for the replica to finish

    def _detach(self, server: ServerConnection) -> None:
        self.server = None
        self.watch_writes = False
        self._unroute()
        self._retried = self._refusal_retried = False
        self._reroute = False
        server.unlink()
        if self._read_paused_by_server:
            self._read_paused_by_server = False
            self.transport.resume_reading()

    def pause_reading_for_server(self) -> None:
        if not self._read_paused_by_server and self.state != _CLOSED:
            self._read_paused_by_server = True
            self.transport.pause_reading()

    def resume_reading_for_server(self) -> None:
        if self._read_paused_by_server:
            self._read_paused_by_server = False
            if self.state != _CLOSED:
                self.transport.resume_reading()

    def server_lost(self, server: ServerConnection) -> None:
        """The linked server connection broke: the transaction's fate is unknown."""
        self.server = None
        self._after_replies = None  # a replica's read retried elsewhere resends its chunks
        self._call_t0 = 0.0
        reason = server.closing_reason or "server closed the connection unexpectedly"
        if not server.forwarded:
            server.stmts.abandon()
            if self._retry_read(reason, attached=True, refused=server.refused_write):
                return
        self._unroute()
        log.warning("client %s@%s/%s: server connection lost: %s", self.user, self.peer, self.database, reason)
        if server.fatal_forwarded:
            # The server's own FATAL has reached the client: as from PostgreSQL, nothing
            # follows it but the end of the connection.
            self.state = _CLOSED
            self.transport.close()
            return
        self.fail(
            RouterError(
                SQLState.CONNECTION_FAILURE,
                f"server connection lost mid-transaction ({reason})",
            )
        )

    def _return_server_after_client_left(self, server: ServerConnection) -> None:
        if server.closed:
            return
        if server.pending or self.unsynced:
            # A query is still running or replies are owed: the connection's state is unknown.
            server.close("client disconnected mid-query")
            return
        if server.tx_status == m.IDLE and self.pool_mode is PoolMode.TRANSACTION and not self.pins:
            server.pool.release(server)
            return
        self.router.spawn(self._reset_and_release(server))

    async def _reset_and_release(self, server: ServerConnection) -> None:
        try:
            async with asyncio.timeout(self.settings.server_connect_timeout):
                if server.tx_status != m.IDLE:
                    await server.run_until_ready("ROLLBACK")
                if self.pins:
                    # Session state that outlives transactions (a lock, LISTEN, a temp table,
                    # a role): never handed on. DISCARD ALL drops all of it.
                    await server.run_until_ready("DISCARD ALL")
                    server.stmts.forget_all()
                    server.session_key = None
                elif self.pool_mode is PoolMode.SESSION:
                    reset_query = server.pool.settings.reset_query
                    if reset_query:
                        await server.run_until_ready(reset_query)
                        server.stmts.forget_all()
                    if not _DISCARDS_ALL.match(reset_query) and not self.session.startup_values.keys().isdisjoint(
                        IDENTITY_SETTINGS
                    ):
                        # A startup role the router applied (RESET ALL would leave it).
                        await server.run_until_ready("RESET SESSION AUTHORIZATION")
                        await server.run_until_ready("RESET ROLE")
                    # Back to its login settings only if the reset query says so; otherwise
                    # the next session's prelude starts with RESET ALL (_attach).
                    server.session_key = None if _RESETS_ALL.match(reset_query) else _UNKNOWN_SETTINGS
        except (RouterError, TimeoutError) as exc:
            server.close(f"reset after client left failed: {exc}")
            return
        server.pool.release(server)

    def _terminate(self) -> None:
        self.state = _CLOSED
        self.transport.close()

    def _message_too_large(self, msg_type: int, length: int) -> None:
        if length < 4:
            self._protocol_violation(f"invalid message length {length}")
            return
        log.warning(
            "client %s@%s/%s: message %r of %d bytes exceeds max_message_size (%d); closing",
            self.user, self.peer, self.database, chr(msg_type), length, self._max_message,
        )
        self.fail(
            RouterError(
                SQLState.PROGRAM_LIMIT_EXCEEDED,
                f"message of {length} bytes exceeds max_message_size ({self._max_message})",
            ),
            logged=True,
        )

    def _protocol_violation(self, message: str) -> None:
        log.warning("client %s@%s/%s: %s; closing", self.user, self.peer, self.database, message)
        self.fail(ProtocolError(message), logged=True)

    def fail(self, exc: RouterError, logged: bool = False) -> None:
        """Send a FATAL ErrorResponse and close. The one place client errors become bytes."""
        if self.state == _CLOSED:
            return
        if not logged and exc.severity == "FATAL":
            log.info("client %s@%s/%s: %s", self.user or "-", self.peer, self.database or "-", exc.message)
        self.state = _CLOSED
        self.router.count_error(exc.sqlstate)
        try:
            self.transport.write(
                m.error_response(
                    exc.sqlstate, exc.message, severity="FATAL", detail=exc.detail, hint=exc.hint
                )
            )
        finally:
            self.transport.close()

    def idle_transaction_timed_out(self, timeout: float) -> None:
        """idle_transaction_timeout: this client has held its server connection inside a
        transaction, sending nothing, for ``timeout`` seconds. Disconnected, as PostgreSQL's
        idle_in_transaction_session_timeout would (FATAL 25P03); the server connection is
        rolled back on its way back to the pool, as for any client that leaves."""
        log.warning(
            "client %s@%s/%s: idle in transaction for %gs (idle_transaction_timeout); closing",
            self.user, self.peer, self.database, timeout,
        )
        self.fail(
            RouterError(
                SQLState.IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout",
                detail=f"No message came within idle_transaction_timeout ({timeout:g}s) in a transaction.",
            ),
            logged=True,
        )

    @property
    def idle_session(self) -> bool:
        """Waiting for the client's next statement outside any transaction, as PostgreSQL's
        idle_session_timeout counts idle: logged in, no transaction open (not even a BEGIN the
        router has not sent yet), no statement waiting for a server connection, and any server
        connection held (session mode, pinned) idle with no reply owed."""
        if self.state != _READY or self.deferred_begin is not None or self._held or self._waiting_on is not None:
            return False
        server = self.server
        return server is None or (server.tx_status == m.IDLE and not server.pending and not self.unsynced)

    def idle_session_timed_out(self, timeout: float) -> None:
        """client_idle_timeout: disconnected with FATAL 57P05, as PostgreSQL's
        idle_session_timeout does; a server connection it held goes back to the pool (reset
        first in session mode, as for any client that leaves)."""
        log.warning(
            "client %s@%s/%s: idle for %gs (client_idle_timeout); closing", self.user, self.peer, self.database, timeout
        )
        self.fail(
            RouterError(
                SQLState.IDLE_SESSION_TIMEOUT,
                "terminating connection due to idle-session timeout",
                detail=f"No message came within client_idle_timeout ({timeout:g}s) outside a transaction.",
            ),
            logged=True,
        )

    def query_timed_out(self, server: ServerConnection, timeout: float) -> None:
        """query_timeout: ``server`` has owed this client a ReadyForQuery for ``timeout``
        seconds. The query is cancelled (a CancelRequest to its server, as a client's own
        would be), and the client disconnected with FATAL 57014: its server connection, in an
        unknown state, is closed on the way (_return_server_after_client_left)."""
        log.warning(
            "client %s@%s/%s: query running for %gs on %s (query_timeout); cancelling it and closing",
            self.user, self.peer, self.database, timeout, server.node,
        )  # fmt: skip
        self.router.cancel_query(server)
        self.fail(
            RouterError(
                SQLState.QUERY_CANCELED,
                "terminating connection due to query_timeout",
                detail=f"A query ran longer than query_timeout ({timeout:g}s); it was cancelled.",
            ),
            logged=True,
        )

    def matches_cancel_key(self, key: int) -> bool:
        return hmac.compare_digest(self.cancel_key.to_bytes(4, "big"), key.to_bytes(4, "big"))


def _sync_points(data: bytes) -> int:
    """The ReadyForQuery replies ``data`` earns: its Sync, Query and FunctionCall messages
    (counted by header, as ``data_received`` counts them, a trailing partial one too)."""
    pos = count = 0
    n = len(data)
    while pos + 5 <= n:
        t = data[pos]
        if t == _S or t == _Q or t == _F:
            count += 1
        pos += 1 + _unpack_len(data, pos + 1)[0]
    return count


def _describes_before_execute(data: bytes) -> bool:
    """Whether ``data`` is whole messages ending with a Sync, with a Describe before any
    Execute (libpq sends Bind, Describe portal, Execute, Sync for each run)."""
    pos = 0
    n = len(data)
    described = False
    t = 0
    while pos + 5 <= n:
        t = data[pos]
        if t == _D_:
            described = True
        elif t == _E_ and not described:
            return False
        pos += 1 + _unpack_len(data, pos + 1)[0]
    return pos == n and t == _S


def new_cancel_key() -> int:
    return secrets.randbits(32)
