"""A server connection: logs into PostgreSQL, then forwards the server's bytes to the
client it is linked to, watching only ReadyForQuery to know when the transaction is over.

Life: connecting (slow path: ``login()`` coroutine reads whole messages) → idle in its pool →
linked to a client (hot path: ``data_received`` scans 5-byte headers and forwards the chunk
whole) → back to idle, or closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING

from router import sockopts
from router.config import ChannelBinding
from router.prepared import (
    AS_PARSE_COMPLETE,
    DUPLICATE,
    PARSE_COMPLETE,
    SWALLOW,
    ServerStatements,
    client_names_in_error,
    statements_used,
)
from router.protocol import messages as m
from router.protocol.auth import (
    SCRAM_SHA_256_PLUS,
    ScramClientExchange,
    ScramKeysClientExchange,
    md5_hash,
    md5_response,
    saslprep_fails,
    tls_server_end_point,
)
from router.protocol.errors import ProtocolError, RouterError, SQLState
from router.protocol.framing import MessageReader
from router.protocol.startup import build_ssl_request, build_startup_message
from router.stats.traffic import NO_TRAFFIC

if TYPE_CHECKING:
    from router.frontend.client import ClientConnection
    from router.pools.pool import Pool

log = logging.getLogger("pgrouter.server")

_unpack_len = struct.Struct("!I").unpack_from
_Z = ord("Z")
_IDLE = ord("I")
_E = ord("E")
_COMMAND_COMPLETE = ord("C")
_N = ord("N")
_PARSE_COMPLETE = ord("1")
_CLOSE_COMPLETE = ord("3")
_DATA_ROW = ord("D")
_PARAMETER_STATUS = ord("S")
# What ends the reply to a Describe of a statement: RowDescription or NoData.
_DESCRIBED = frozenset((ord("T"), ord("n")))
# The replies data_received looks at; every branch of its scan is one of these.
_WATCHED = frozenset((_Z, _E, _N, _COMMAND_COMPLETE, _PARSE_COMPLETE, _CLOSE_COMPLETE))
# Command tags after which a session has no prepared statements left.
_FORGETS_STATEMENTS = (b"DISCARD ALL", b"DEALLOCATE ALL")
# An ErrorResponse split across reads is held back until whole, up to this size (PostgreSQL's
# are well under it; a larger one passes through in pieces, judged by what arrived).
MAX_HELD_ERROR = 64 * 1024


def _cut(cuts: list | None, pos: int, replacement: bytes, end: int = -1) -> list:
    """Note that ``data[pos:end]`` (default: the 5-byte reply at ``pos``) is to be replaced."""
    if cuts is None:
        cuts = []
    cuts.append((pos, pos + 5 if end < 0 else end, replacement))
    return cuts


def _shutting_down(data: bytes, pos: int, length: int) -> bool:
    """An ErrorResponse/NoticeResponse with SQLSTATE 57P01-57P03: the server is going away
    (on an immediate shutdown PostgreSQL says so with a WARNING, then closes)."""
    return data.find(b"C57P0", pos + 5, pos + 1 + length) >= 0


def _stale_plan(data: bytes, pos: int, length: int) -> bool:
    """An ErrorResponse "cached plan must not change result type" (SQLSTATE 0A000 from
    RevalidateCachedQuery): DDL changed the columns of a prepared statement's result."""
    end = pos + 1 + length
    return (
        data.find(b"C0A000\0", pos + 5, end) >= 0
        and data.find(b"RRevalidateCachedQuery\0", pos + 5, end) >= 0
    )


def _apply_cuts(data: bytes, cuts: list) -> bytes:
    out = []
    prev = 0
    for pos, end, replacement in cuts:
        out.append(data[prev:pos])
        out.append(replacement)
        prev = end
    out.append(data[prev:])
    return b"".join(out)

# Asyncio write-buffer limits on server sockets: past HIGH, the server's transport asks us to
# pause the client's reads; a slow server then holds back a fast client.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class ServerConnection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_key = 0
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        self.stmts = ServerStatements(pool.settings.max_prepared_statements, pool.validated_statements)
        self.tx_status = _IDLE
        # idle_transaction_timeout (Pool.end_idle_transactions): the client's Sync/Query count
        # and the time when the janitor first saw it idle in a transaction on this connection.
        self.idle_in_transaction: tuple[int, float] | None = None
        # query_timeout (Pool.end_long_queries): the ReadyForQuery count and the time when the
        # janitor first saw this connection owing the next one.
        self.query_started: tuple[int, float] | None = None
        self.closed = False
        self.closing_reason = ""
        self.channel_bound = False
        # Settings this connection carries beyond its login defaults (router/session.py
        # SessionSettings.key), and how many prelude ReadyForQuery replies are still to drop.
        self.session_key: frozenset | None = None
        self.swallow_z = 0
        # ReadyForQuery replies to drop, alone: the router's Sync that ended a replica's open
        # segment which a write leaves for the primary (ClientConnection._replica_chunk).
        self.drop_z = 0
        # An error had reached the client in the segment that Sync ended (it was on its way
        # when the write came): the write must not run (ClientConnection.server_ready).
        self.dropped_after_error = False
        # The router's restore of a client's startup settings after its RESET (client.py
        # ``_restore``): the ReadyForQuery counts (stmts.recv_z) after which one was sent,
        # and whether its replies are coming now (kept back, but for ParameterStatus).
        self.restore_after: deque[int] = deque()
        self.restoring = False
        self._restore_buf = b""
        # While a CancelRequest for this backend is on its way, the connection is not handed
        # to another client: the signal could otherwise land on that client's query.
        self.cancels_in_flight = 0
        self.release_after_cancel = False
        self.close_needed = False  # the console's RECONNECT: closed when next released
        self._reader = MessageReader()
        self._wakeup: asyncio.Future | None = None
        self._lost = asyncio.get_running_loop().create_future()
        # Hot-path framing state: bytes of the current message still to come, and a split header.
        self._skip = 0
        self._head = b""
        self._reading_paused_by_client = False
        self.forwarded = False
        self.fatal_forwarded = False
        # The type of the last reply message forwarded when it ended its read (0: it did not).
        self.last_type = 0
        # A replica refused the client's read as a write (25006): closed so that it runs on
        # the primary (ClientConnection.server_lost).
        self.refused_write = False
        # The last chunk sent (as rewritten), and the client's own bytes of it while it is a
        # lone exchange that could run again (see ``ClientConnection.reprepare``): nothing
        # else owed, outside a transaction, no reply byte forwarded yet.
        self.last_sent = b""
        self.retry_data: bytes | None = None
        # Measurements (router/stats/): calls sent and not yet answered (statement text, start,
        # ReadyForQuery replies it waits for, node role), the rows and error of the one in
        # progress, and when the current transaction's first message went out (0.0: idle).
        self.calls: deque = deque()
        self.call_rows = 0
        self.call_error: str | None = None
        self.tx_t0 = 0.0
        # When the request now owed its ReadyForQuery went out (0.0: none), and where its
        # SHOW STATS figures go (router/stats/traffic.py): the client's database's.
        self.query_t0 = 0.0
        self.traffic = NO_TRAFFIC
        self.node = f"{pool.key.host}:{pool.key.port}"

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)  # type: ignore[attr-defined]
        sockopts.apply(transport, self.pool.settings.socket_options)

    def described(self) -> bool:
        """Every reply owed to a Parse, Describe (of a statement), Flush has reached the
        client: its ParseComplete has come, and the last message forwarded, whole, ended a
        Describe's reply (ClientConnection._replica_chunk)."""
        return not self.stmts.ops and self.last_type in _DESCRIBED and not self._skip and not self._head

    @property
    def pending(self) -> int:
        """Query/Sync/FunctionCall messages sent whose ReadyForQuery has not come back."""
        st = self.stmts
        return st.sent_z - st.recv_z

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self._slow_data(data)
            return
        if self.restoring:
            data = self._restore_replies(data)
            if not data:
                return
        # Hot path: find message boundaries only to spot ReadyForQuery (and, while the
        # router owes rewrites, ParseComplete/CloseComplete/ErrorResponse); forward the chunk.
        if self._head:
            data = self._head + data
            self._head = b""
        st = self.stmts
        n = len(data)
        pos = self._skip
        ready = False
        now = 0.0
        cuts: list | None = None
        # Replies to the router's own settings prelude are dropped up to their ReadyForQuery.
        swallow_from = 0 if self.swallow_z else -1
        rest = tail = b""
        answered: list | None = None  # requests answered in this chunk before any byte went on
        t = 0
        while pos < n:
            if pos + 5 > n:
                # A header split across reads: keep it back, forward what precedes it.
                self._head = data[pos:]
                data = data[:pos]
                n = pos
                break
            t = data[pos]
            length = _unpack_len(data, pos + 1)[0]
            if t == _DATA_ROW or t not in _WATCHED:  # most messages: nothing to look at
                pos += 1 + length
                continue
            if t == _Z:
                if pos + 6 > n:
                    # ReadyForQuery whose status byte has not arrived: hold it back.
                    self._head = data[pos:]
                    data = data[:pos]
                    n = pos
                    break
                st.recv_z += 1
                self.tx_status = data[pos + 5]
                if st.discards_owed and st.recv_z == st.sent_z:
                    st.discards_owed = 0  # it failed (in a transaction block): nothing freed
                if self.swallow_z:
                    self.swallow_z -= 1
                    pos += 6
                    if not self.swallow_z:
                        cuts = _cut(cuts, swallow_from, b"", pos)
                        swallow_from = -1
                    continue
                if self.drop_z:
                    # (The replies before it are the client's: only the ReadyForQuery goes.)
                    self.drop_z -= 1
                    cuts = _cut(cuts, pos, b"", pos + 6)
                    pos += 6
                    if st.error_segment == st.recv_z - 1:
                        self.dropped_after_error = True
                    ready = True
                    continue
                ready = True
                if self.calls:
                    now = perf_counter()
                    self._finish_call(now)
                if client.settings_undo is not None:
                    client.settings_settled(self, self.tx_status)
                if self.restore_after and st.recv_z == self.restore_after[0]:
                    # The router's restore follows: this ReadyForQuery is dropped, the
                    # restore's stands in for it, and its replies go the slow way.
                    self.restore_after.popleft()
                    self.restoring = True
                    cuts = _cut(cuts, pos, b"", pos + 6)
                    rest = data[pos + 6 :]
                    data = data[: pos + 6]
                    n = pos + 6
                elif self.query_t0:
                    # (A restore's ReadyForQuery ends the query it stands in for.) What is
                    # still owed (a pipeline) starts now.
                    if not now:
                        now = perf_counter()
                    owed = st.recv_z < st.sent_z
                    traffic = self.traffic
                    traffic.query_count += 1
                    traffic.query_time += now - self.query_t0
                    self.query_t0 = now if owed else 0.0
                    if self.tx_status == _IDLE and self.tx_t0:
                        duration = now - self.tx_t0
                        client.router.transaction_durations.observe(duration)
                        traffic.xact_count += 1
                        traffic.xact_time += duration
                        self.tx_t0 = now if owed else 0.0
                if pos + 6 < n and st.recv_z == st.sent_z and not self.restoring:
                    # Nothing more is owed, yet more came in this read: the server sent it
                    # unasked (the FATAL of pg_terminate_backend or idle_session_timeout, a
                    # notification, a parameter change). It goes to whoever holds the
                    # connection once this reply has been dealt with, not necessarily the
                    # client whose transaction just ended (see below).
                    tail = data[pos + 6 :]
                    data = data[: pos + 6]
                    n = pos + 6
            elif t == _E:
                if pos + 1 + length > n and length <= MAX_HELD_ERROR:
                    # Only a whole ErrorResponse can be judged (stale plan, duplicate name,
                    # shutdown, SQLSTATE): hold it back like a split header.
                    self._head = data[pos:]
                    data = data[:pos]
                    n = pos
                    break
                if not self.forwarded and _shutting_down(data, pos, length) and client.replica_node is not None:
                    self._retry_elsewhere(data, pos, length, answered)
                    return
                if (
                    client.replica_node is not None
                    and not self.swallow_z
                    and data.find(b"C25006\0", pos + 5, pos + 1 + length) >= 0
                    and client.refused_on_replica(retry=not self.forwarded)
                ):
                    self.refused_write = True
                    self._retry_elsewhere(data, pos, length, answered)
                    return
                ops = st.ops
                end = pos + 1 + length
                message = original = data[pos:end] if end <= n else b""
                if message and ops and ops[0][2] == DUPLICATE and ops[0][0] == st.recv_z:
                    message = st.duplicate_error(message)
                st.on_error()
                if message and message.find(b'"pgr_') >= 0:
                    # An error naming a router-owned statement: the client reads its own
                    # name, as it was where the error struck (on_error has put back what
                    # the requests after it changed).
                    message = client_names_in_error(message, client.statements, st.ops)
                if message is not original:
                    cuts = _cut(cuts, pos, message, end)
                if pos + 1 + length <= n and _stale_plan(data, pos, length):
                    retry = self.retry_data if pos == 0 else None
                    self.retry_data = None
                    self._retire_stale_statements()
                    if retry is not None and client.reprepare(self, retry):
                        # The error and its ReadyForQuery are dropped: the statement runs again.
                        self.swallow_z += 1
                        swallow_from = pos
                        pos += 1 + length
                        continue
                code = data.find(b"\0C", pos + 5, pos + 1 + length)
                if code > 0 and code + 7 <= n:
                    sqlstate = data[code + 2 : code + 7].decode("ascii", "replace")
                    client.router.count_error(sqlstate)
                    if not self.swallow_z:  # a failed prelude statement is not the call's error
                        self.call_error = sqlstate
                elif not self.swallow_z:
                    self.call_error = "?????"  # the code lies past this read
                if not self.swallow_z and client.settings_undo is not None:
                    client.settings_failed()  # its transaction will roll back
                if not self.swallow_z and (
                    data.find(b"\0VFATAL\0", pos + 5, end) >= 0 or data.find(b"\0VPANIC\0", pos + 5, end) >= 0
                ):
                    self.fatal_forwarded = True  # the session's last word: see ClientConnection.server_lost
                if data.find(b"C42883\0", pos + 5, pos + 1 + length) >= 0:
                    hook = self.pool.on_undefined_function
                    if hook is not None:
                        hook()
            elif t == _N and not self.forwarded and client.replica_node is not None and _shutting_down(data, pos, length):
                self._retry_elsewhere(data, pos, length, answered)
                return
            elif t == _COMMAND_COMPLETE and not self.swallow_z:
                # (Not while swallowing: the router's own prelude, such as the set_config()
                # replaying a startup parameter, answers "SELECT 1" that is no client's row.)
                end = pos + length  # the tag's NUL
                if self.calls and end < n:
                    space = data.rfind(b" ", pos + 5, end)
                    if space > 0 and data[space + 1 : end].isdigit():
                        self.call_rows += int(data[space + 1 : end])
                if st.discards_owed and end < n and data[pos + 5 : end] in _FORGETS_STATEMENTS:
                    st.discards_owed = 0
                    client.forget_statements(st.forget_client_names(client.statements))
                undo = client.settings_undo
                if undo is not None and end < n:
                    # COMMIT keeps the transaction's setting changes; the tag of a ROLLBACK
                    # (or of a COMMIT that rolled back a failed transaction) undoes them;
                    # a ROLLBACK TO SAVEPOINT's (the same tag) leaves the transaction alive.
                    tag = data[pos + 5 : end]
                    if tag == b"ROLLBACK" and client.rollback_to_tags:
                        client.savepoint_rolled_back()  # a ROLLBACK TO SAVEPOINT's tag
                    elif undo.chain_tags and (tag == b"COMMIT" or tag == b"ROLLBACK"):
                        # The tag of the COMMIT/ROLLBACK AND CHAIN that began the transaction
                        # the undo is for (ClientConnection._track_session_statements).
                        undo.chain_tags -= 1
                    elif tag == b"COMMIT":
                        client.settings_undo = None
                    elif tag == b"ROLLBACK":
                        undo.failed = True
            elif st.ops and (t == _PARSE_COMPLETE or t == _CLOSE_COMPLETE):
                op = st.ops.popleft()
                if not self.forwarded and client.replica_node is not None:
                    # A replica's read: it may yet be retried elsewhere (_retry_elsewhere).
                    if answered is None:
                        answered = []
                    answered.append(op)
                action = op[2]
                if t == _PARSE_COMPLETE and op[3] is not None:
                    st.validated.add(op[3])
                if action == SWALLOW:
                    cuts = _cut(cuts, pos, b"")
                elif action == AS_PARSE_COMPLETE:
                    cuts = _cut(cuts, pos, PARSE_COMPLETE)
                elif action == DUPLICATE:
                    st.commit_duplicate(op)
            pos += 1 + length
        self._skip = pos - n
        if swallow_from >= 0:
            cuts = _cut(cuts, swallow_from, b"", n)
        if cuts is not None:
            data = _apply_cuts(data, cuts)
        if data:
            self.forwarded = True
            self.last_type = t if pos == n else 0
            self.retry_data = None
            self.traffic.sent += len(data)
            client.transport.write(data)
        if ready and st.recv_z == st.sent_z:
            client.server_ready(self)
            if tail:
                if self.client is None:
                    self._slow_data(tail)  # back in the pool (or closed): the idle path
                else:
                    self.data_received(tail)  # still this client's, or the next one's
        elif self.restoring and rest:
            self.data_received(rest)

    def _restore_replies(self, data: bytes) -> bytes:
        """Replies to the router's restore of startup settings: ParameterStatus messages go
        to the client (the server reports the client's values again), the rest is dropped up
        to its ReadyForQuery, which is returned with what follows for the hot path, where it
        counts as the ReadyForQuery it stands in for."""
        buf = self._restore_buf + data if self._restore_buf else data
        n = len(buf)
        pos = 0
        reports = []
        while pos + 5 <= n:
            t = buf[pos]
            if t == _Z:
                self.restoring = False
                break
            end = pos + 1 + _unpack_len(buf, pos + 1)[0]
            if end > n:
                break
            if t == _PARAMETER_STATUS:
                reports.append(buf[pos:end])
            pos = end
        if reports:
            self.client.transport.write(b"".join(reports))
        if self.restoring:
            self._restore_buf = buf[pos:]
            return b""
        self._restore_buf = b""
        return buf[pos:]

    def _retire_stale_statements(self) -> None:
        """After "cached plan must not change result type": the statements of the chunk get new
        names for the Parses to come, so that no client (asyncpg retries with a fresh prepare)
        meets the stale plan again through a no-op Close."""
        registry = self.client.router.statements
        for name in statements_used(self.last_sent):
            registry.retire(name)

    def _finish_call(self, now: float) -> None:
        """A ReadyForQuery (at ``now``, perf_counter) ends the oldest call (or one of its Sync
        segments)."""
        calls = self.calls
        sql, t0, syncs, role = calls[0]
        if syncs > 1:
            calls[0] = (sql, t0, syncs - 1, role)
            return
        calls.popleft()
        rows, error = self.call_rows, self.call_error
        self.call_rows = 0
        self.call_error = None
        client = self.client
        stats = client.router.query_stats
        if sql is None or stats is None:
            return
        tenant = client.tenant.tenant_id if client.tenant is not None else client.database
        stats.record(tenant, sql, now - t0, rows, error, role, self.node)

    def _retry_elsewhere(self, data: bytes, pos: int, length: int, answered: list | None) -> None:
        """The server is shutting down, or (``refused_write``) the replica refused the read as
        a write, and has told this client nothing yet: close without passing the news on, so
        the client's read runs again on another node (ClientConnection.server_lost); after a
        refusal, on the primary. That connection is sound, but refusals are rare (the text is
        learned) and this is the path a failed replica takes. The replies read before the
        news (``answered``'s) are dropped with it: their requests count as unanswered, so
        what they gave the client is taken back."""
        if answered:
            self.stmts.unanswer(answered)
        fields = m.parse_error_fields(data[pos + 5 : pos + 1 + length])
        if self.refused_write:
            self.close(f"replica refused a write ({fields.get('M', '')}); running it on the primary")
        else:
            self.close(f"server shutting down: {fields.get('M', '')}")

    def _slow_data(self, data: bytes) -> None:
        self._reader.feed(data)
        waiter = self._wakeup
        if waiter is not None:
            self._wakeup = None
            if not waiter.done():
                waiter.set_result(None)
            return
        if self.pool is not None and not self.closed:
            # Unsolicited traffic on an idle connection: a notice, a parameter change, or a
            # FATAL error before the server closes it (e.g. pg_terminate_backend).
            try:
                for msg_type, body in self._reader:
                    if msg_type == b"E":
                        fields = m.parse_error_fields(body)
                        self.close(f"server error while idle: {fields.get('M', '')}")
                    elif msg_type == b"S":
                        name, value = m.parse_parameter_status(body)
                        self.params[name] = value
            except ProtocolError as exc:
                self.close(f"protocol error from idle server: {exc.message}")

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if not self._lost.done():
            self._lost.set_result(None)
        waiter = self._wakeup
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                RouterError(SQLState.CONNECTION_FAILURE, "server closed the connection unexpectedly")
            )
        client = self.client
        if client is not None:
            self.client = None
            client.server_lost(self)
        if not was_closed:
            log.info("server connection to %s closed: %s", self.pool.name, exc or "by server")
        self.pool.forget(self)

    def pause_writing(self) -> None:
        client = self.client
        if client is not None:
            client.pause_reading_for_server()

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.resume_reading_for_server()

    # --- used by the client connection -----------------------------------------------

    def link(self, client: ClientConnection) -> None:
        self.client = client
        self.traffic = client.traffic
        self.retry_data = None
        self.forwarded = False  # whether any reply byte has reached this client yet
        self.last_type = 0
        if self.calls:
            self.calls.clear()
        self.call_rows = 0
        self.call_error = None
        self.tx_t0 = self.query_t0 = 0.0
        self._skip = 0
        self._head = b""
        self.restore_after.clear()
        self.restoring = False
        self._restore_buf = b""
        # Anything the server sent while idle has been consumed by the slow path.

    def unlink(self) -> None:
        self.client = None
        self.last_sent = b""
        self.retry_data = None
        if self._reading_paused_by_client:
            self._reading_paused_by_client = False
            if not self.closed:
                self.transport.resume_reading()

    def pause_reading_for_client(self) -> None:
        if not self._reading_paused_by_client and not self.closed:
            self._reading_paused_by_client = True
            self.transport.pause_reading()

    def resume_reading_for_client(self) -> None:
        if self._reading_paused_by_client:
            self._reading_paused_by_client = False
            if not self.closed:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.closing_reason = reason
        if reason:
            log.info("closing server connection to %s: %s", self.pool.name, reason)
        if self.transport is not None:
            try:
                self.transport.write(m.terminate())
            except Exception:  # the socket may already be half-dead; closing is what matters
                pass
            self.transport.close()

    # --- slow path: whole messages, used at login and while resetting ----------------

    async def read_message(self) -> tuple[bytes, bytes]:
        while True:
            msg = self._reader.next()
            if msg is not None:
                return msg
            if self.closed:
                raise RouterError(SQLState.CONNECTION_FAILURE, "server closed the connection")
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup

    async def read_raw(self, n: int) -> bytes:
        """Exactly ``n`` bytes outside message framing (the SSLRequest answer)."""
        while len(self._reader) < n:
            if self.closed:
                raise RouterError(SQLState.CONNECTION_FAILURE, "server closed the connection")
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        rest = self._reader.take_rest()
        self._reader.feed(rest[n:])
        return rest[:n]

    async def run_until_ready(self, sql: str) -> dict[str, str]:
        """Run a statement on an unlinked connection and read through its ReadyForQuery;
        returns the parameters the server reported meanwhile (ParameterStatus). Raises
        RouterError on an ErrorResponse (the connection is then still usable)."""
        if self.closed or self.transport.is_closing():
            # Closed in this loop turn, its connection_lost still to come (a client leaving
            # as its server drops): lost, as a read would find it.
            raise RouterError(SQLState.CONNECTION_FAILURE, "server closed the connection")
        self.write(m.query(sql))
        error: RouterError | None = None
        reported: dict[str, str] = {}
        while True:
            msg_type, body = await self.read_message()
            if msg_type == b"E":
                fields = m.parse_error_fields(body)
                error = RouterError(fields.get("C", SQLState.INTERNAL_ERROR), fields.get("M", ""))
            elif msg_type == b"S":
                name, value = m.parse_parameter_status(body)
                self.params[name] = value
                reported[name] = value
            elif msg_type == b"Z":
                self.tx_status = m.parse_ready_for_query(body)
                if error is not None:
                    raise error
                return reported

    async def login(
        self,
        host: str,
        dbname: str,
        user: str,
        password: str | None,
        tls: ssl.SSLContext | None,
        tls_required: bool,
        channel_binding: ChannelBinding = ChannelBinding.PREFER,
        startup_params: dict[str, str] | None = None,
        scram_keys: tuple[bytes, bytes] | None = None,
    ) -> None:
        """Negotiate TLS, authenticate, and read the server's parameters and key. Without a
        password, ``scram_keys`` (ClientKey, ServerKey) can answer SCRAM (auth_query)."""
        loop = asyncio.get_running_loop()
        if tls is not None:
            self.write(build_ssl_request())
            answer = await self.read_raw(1)
            if answer == b"S":
                try:
                    self.transport = await loop.start_tls(self.transport, self, tls, server_hostname=host)
                except OSError as exc:  # ssl.SSLError among them: a certificate refused, say
                    refused = isinstance(exc, ssl.SSLCertVerificationError)
                    reason = f"certificate verify failed: {exc.verify_message}" if refused else str(exc)
                    raise RouterError(
                        SQLState.SQLCLIENT_UNABLE_TO_ESTABLISH,
                        f"TLS with server {self.pool.name} failed: {reason}",
                        hint="Check server_tls and server_tls_ca against the server's certificate." if refused else None,
                    ) from exc
            elif tls_required:
                raise RouterError(
                    SQLState.SQLCLIENT_UNABLE_TO_ESTABLISH,
                    f"server {self.pool.name} does not support TLS but server_tls requires it",
                )
        params = {"user": user, "database": dbname}
        if startup_params:
            params.update(startup_params)
        self.write(build_startup_message(params))
        scram: ScramClientExchange | ScramKeysClientExchange | None = None
        while True:
            msg_type, body = await self.read_message()
            if msg_type == b"R":
                code, payload = m.parse_authentication(body)
                if code == m.AUTH_OK:
                    continue
                if password is None and scram_keys is not None and code == m.AUTH_SASL:
                    scram = ScramKeysClientExchange(m.parse_sasl_mechanisms(payload), *scram_keys)
                    self.write(m.sasl_initial_response(scram.mechanism, scram.first()))
                    continue
                if password is None and scram_keys is not None and scram is not None and code in (
                    m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL
                ):
                    if code == m.AUTH_SASL_CONTINUE:
                        self.write(m.sasl_response(scram.final(payload)))
                    else:
                        scram.verify(payload)
                    continue
                if password is None:
                    raise RouterError(
                        SQLState.INVALID_PASSWORD,
                        f"server {self.pool.name} asks for a password and none is configured",
                    )
                if code == m.AUTH_CLEARTEXT:
                    self.write(m.password_message(password.encode()))
                elif code == m.AUTH_MD5:
                    self.write(m.password_message(md5_response(md5_hash(user, password), payload)))
                elif code == m.AUTH_SASL and saslprep_fails(password):
                    # As libpq does with such a password: its bytes as they are. (Without
                    # channel binding: SCRAM-SHA-256 from keys, which scramp cannot derive.)
                    if channel_binding is ChannelBinding.REQUIRE:
                        raise RouterError(
                            SQLState.INVALID_AUTHORIZATION,
                            f"server {self.pool.name}: the server password has characters SASLprep "
                            "refuses, so the router cannot do SCRAM channel binding with it, "
                            "but server_channel_binding = require",
                        )
                    scram = ScramKeysClientExchange(
                        m.parse_sasl_mechanisms(payload), b"", b"", raw_password=password.encode()
                    )
                    self.channel_bound = False
                    self.write(m.sasl_initial_response(scram.mechanism, scram.first()))
                elif code == m.AUTH_SASL:
                    mechanisms = m.parse_sasl_mechanisms(payload)
                    binding = None
                    ssl_object = self.transport.get_extra_info("ssl_object")
                    if (
                        ssl_object is not None
                        and SCRAM_SHA_256_PLUS in mechanisms
                        and channel_binding is not ChannelBinding.DISABLE
                    ):
                        cert = ssl_object.getpeercert(binary_form=True)
                        if cert:
                            binding = ("tls-server-end-point", tls_server_end_point(cert))
                    if binding is None and channel_binding is ChannelBinding.REQUIRE:
                        raise RouterError(
                            SQLState.INVALID_AUTHORIZATION,
                            f"server {self.pool.name} cannot do SCRAM channel binding "
                            "but server_channel_binding = require",
                        )
                    self.channel_bound = binding is not None
                    scram = ScramClientExchange(mechanisms, user, password, binding)
                    self.write(m.sasl_initial_response(scram.mechanism, scram.first()))
                elif code == m.AUTH_SASL_CONTINUE and scram is not None:
                    self.write(m.sasl_response(scram.final(payload)))
                elif code == m.AUTH_SASL_FINAL and scram is not None:
                    scram.verify(payload)
                else:
                    raise RouterError(
                        SQLState.FEATURE_NOT_SUPPORTED,
                        f"server {self.pool.name} asks for unsupported authentication ({code})",
                    )
            elif msg_type == b"S":
                name, value = m.parse_parameter_status(body)
                self.params[name] = value
            elif msg_type == b"K":
                self.backend_pid, self.backend_key = m.parse_backend_key_data(body)
            elif msg_type == b"Z":
                self.tx_status = m.parse_ready_for_query(body)
                return
            elif msg_type == b"E":
                fields = m.parse_error_fields(body)
                raise RouterError(
                    fields.get("C", SQLState.CONNECTION_FAILURE),
                    f"server {self.pool.name} refused the connection: {fields.get('M', '')}",
                )
            elif msg_type == b"v":
                continue  # NegotiateProtocolVersion: we asked for 3.0 only, nothing to do
            elif msg_type != b"N":
                raise ProtocolError(f"unexpected message {msg_type!r} during server login")

    async def wait_closed(self) -> None:
        await self._lost
