"""Named prepared statements under transaction pooling (sans-I/O).

In transaction mode a client's next transaction may run on another server connection, where
its named statements do not exist, or where another client's statement of the same name does.
So a client's names never reach a server. Each distinct (query text, parameter types) gets one
router-owned server name (``StatementRegistry``); each server connection remembers which of
those it has prepared (``ServerStatements``, a bounded LRU). Extended-protocol messages are
rewritten on their way to a server (``rewrite_for_server``):

- Parse with a name: sent with the server name, unless that server already has it; then a
  Close of a name nobody uses goes instead, and its CloseComplete ('3') is turned into the
  ParseComplete ('1') the client expects, in the same place in the reply stream.
- Bind / Describe of a named statement: the server name is substituted; a server lacking the
  statement first gets its Parse, whose ParseComplete is swallowed.
- Close of a named statement: only the client's mapping goes (other clients may share the
  server statement); a no-op Close keeps the CloseComplete where the client expects it.
- Unnamed statements and portals pass through untouched.

Replies are matched to requests by counting: every Parse and Close sent is queued with the
"sync segment" it belongs to (how many Sync/Query messages preceded it); each '1' or '3' from
the server pops the oldest entry. After an ErrorResponse the server skips to the next Sync
(PostgreSQL docs, 55.2.3 "Extended Query"), so entries of that segment get no reply and are
dropped. The same counting is what the server connection's hot path consults.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

from router.protocol.errors import ProtocolError
from router.protocol.framing import frame
from router.routing.session_statements import parse_bool

_unpack_len = struct.Struct("!I").unpack_from
_pack_len = struct.Struct("!I").pack

_P, _B, _D, _C = ord("P"), ord("B"), ord("D"), ord("C")
_S, _Q, _F = ord("S"), ord("Q"), ord("F")
_STATEMENT = ord("S")

# What to do with the server's reply to a Parse or Close the router sent.
FORWARD, SWALLOW, AS_PARSE_COMPLETE = 0, 1, 2

# A statement name no client or router ever prepares: closing it is a no-op that still
# produces a CloseComplete ("It is not an error to issue Close against a nonexistent
# statement", 55.7 Close).
NOOP_NAME = b"pgrouter_noop"
NOOP_CLOSE = frame(b"C", b"S" + NOOP_NAME + b"\0")
PARSE_COMPLETE = b"1\x00\x00\x00\x04"

DEFAULT_MAX_PREPARED = 250


class StatementRegistry:
    """Router-wide: one server name per distinct Parse body (query text + parameter types).
    Names are never reused, so a name means the same statement on every server.

    ``validated`` holds the server names some server has parsed successfully: a client's
    Parse+Sync of one of those is answered by the router itself, without taking a server
    connection. That matters beyond speed: libpq's PQprepare (pgbench -M prepared) blocks
    its thread, so a client that waits for a pooled connection just to prepare can stall the
    clients that hold every connection, until query_wait_timeout.
    """

    __slots__ = ("_names", "validated")

    def __init__(self) -> None:
        self._names: dict[bytes, bytes] = {}
        self.validated: set[bytes] = set()

    def name_for(self, key: bytes) -> bytes:
        name = self._names.get(key)
        if name is None:
            name = b"pgr_%x" % len(self._names)
            self._names[key] = name
        return name

    def __len__(self) -> int:
        return len(self._names)


@dataclass(slots=True)
class ClientStatement:
    server_name: bytes
    parse_message: bytes  # the client's Parse, carrying the server name


class ServerStatements:
    """What one server connection has prepared, and the replies it still owes."""

    __slots__ = (
        "prepared", "parse_q", "close_q", "sent_z", "recv_z", "max_prepared", "validated",
        "error_segment",
    )

    def __init__(
        self, max_prepared: int = DEFAULT_MAX_PREPARED, validated: set[bytes] | None = None
    ) -> None:
        self.validated = validated if validated is not None else set()
        self.prepared: OrderedDict[bytes, None] = OrderedDict()
        # (segment, action, server name or None) per Parse sent; (segment, action) per Close.
        self.parse_q: deque[tuple[int, int, bytes | None]] = deque()
        self.close_q: deque[tuple[int, int]] = deque()
        self.sent_z = 0  # Query/Sync/FunctionCall messages sent: each earns one ReadyForQuery
        self.recv_z = 0
        # The segment whose ErrorResponse has arrived: the server skips the rest of it, so
        # messages still sent into it get no replies and are not queued.
        self.error_segment = -1
        self.max_prepared = max_prepared

    def on_error(self) -> None:
        """An ErrorResponse: what was queued in the failing segment gets no reply."""
        segment = self.recv_z
        self.error_segment = segment
        parse_q = self.parse_q
        while parse_q and parse_q[0][0] == segment:
            _, _, name = parse_q.popleft()
            if name is not None:
                self.prepared.pop(name, None)  # it never got prepared
        close_q = self.close_q
        while close_q and close_q[0][0] == segment:
            close_q.popleft()

    def forget_all(self) -> None:
        """After DISCARD ALL / DEALLOCATE ALL on the connection."""
        self.prepared.clear()

    def _prepare(self, name: bytes, parse_message: bytes, segment: int, action: int, out: list) -> None:
        prepared = self.prepared
        while len(prepared) >= self.max_prepared:
            old, _ = prepared.popitem(last=False)
            out.append(frame(b"C", b"S" + old + b"\0"))
            self.close_q.append((segment, SWALLOW))
        out.append(parse_message)
        prepared[name] = None
        self.parse_q.append((segment, action, name))

    def ensure(self, stmt: ClientStatement, segment: int, out: list) -> None:
        if stmt.server_name in self.prepared:
            self.prepared.move_to_end(stmt.server_name)
        else:
            self._prepare(stmt.server_name, stmt.parse_message, segment, SWALLOW, out)


def local_parse_reply(
    data: bytes,
    start: int,
    client_statements: dict[bytes, ClientStatement],
    registry: StatementRegistry,
) -> bytes | None:
    """If ``data[start:]`` is only named Parses of validated statements and one final Sync,
    record them and return the replies (ParseComplete each, ReadyForQuery idle); else None,
    with nothing recorded."""
    pos = start
    n = len(data)
    parsed: list[tuple[bytes, bytes]] = []
    while pos + 5 <= n:
        t = data[pos]
        end = pos + 1 + _unpack_len(data, pos + 1)[0]
        if end > n:
            return None
        if t == _S:
            if end != n or not parsed:
                return None
            break
        if t != _P:
            return None
        name_end = data.find(b"\0", pos + 5, end)
        if name_end <= pos + 5:
            return None  # unnamed or malformed: the server must see it
        parsed.append((data[pos + 5 : name_end], data[name_end + 1 : end]))
        pos = end
    else:
        return None
    names = registry._names
    if not all(names.get(body) in registry.validated for _, body in parsed):
        return None
    for client_name, body in parsed:
        server_name = names[body]
        client_statements[client_name] = ClientStatement(
            server_name, frame(b"P", server_name + b"\0" + body)
        )
    return PARSE_COMPLETE * len(parsed) + b"Z\x00\x00\x00\x05I"


def _cstring_end(data: bytes, start: int, end: int) -> int:
    nul = data.find(b"\0", start, end)
    if nul < 0:
        raise ProtocolError("unterminated string in extended-protocol message")
    return nul


def rewrite_for_server(
    data: bytes,
    start: int,
    client_statements: dict[bytes, ClientStatement],
    registry: StatementRegistry,
    server: ServerStatements,
) -> bytes:
    """Rewrite the whole messages in ``data[start:]`` for ``server`` (see the module doc).

    ``data[:start]`` is the tail of a message already partly sent and goes out as is; so does
    a trailing incomplete message (the caller only lets through incomplete messages of types
    that need no rewriting). Updates the server's bookkeeping; does not count sent Syncs (the
    caller adds them to ``server.sent_z`` afterwards).
    """
    out: list[bytes] = []
    run = 0  # start of the current stretch copied verbatim
    pos = start
    n = len(data)
    segment = server.sent_z
    while pos + 5 <= n:
        t = data[pos]
        end = pos + 1 + _unpack_len(data, pos + 1)[0]
        if end > n:
            break
        if segment == server.error_segment and t != _S and t != _Q and t != _F:
            # The server already failed this segment and skips to its Sync: these messages
            # get no replies, change nothing, and must not be queued.
            pos = end
            continue
        if t == _P:
            name_end = _cstring_end(data, pos + 5, end)
            if name_end == pos + 5:
                server.parse_q.append((segment, FORWARD, None))
            else:
                body = data[name_end + 1 : end]  # query text, NUL, parameter types
                server_name = registry.name_for(body)
                message = frame(b"P", server_name + b"\0" + body)
                client_statements[data[pos + 5 : name_end]] = ClientStatement(server_name, message)
                out.append(data[run:pos])
                run = end
                if server_name in server.prepared:
                    server.prepared.move_to_end(server_name)
                    out.append(NOOP_CLOSE)
                    server.close_q.append((segment, AS_PARSE_COMPLETE))
                else:
                    server._prepare(server_name, message, segment, FORWARD, out)
        elif t == _B:
            portal_end = _cstring_end(data, pos + 5, end)
            stmt_end = _cstring_end(data, portal_end + 1, end)
            if stmt_end > portal_end + 1:
                stmt = client_statements.get(data[portal_end + 1 : stmt_end])
                if stmt is not None:
                    out.append(data[run:pos])
                    run = end
                    server.ensure(stmt, segment, out)
                    rest = data[stmt_end:end]
                    portal = data[pos + 5 : portal_end + 1]
                    out.append(
                        b"B" + _pack_len(4 + len(portal) + len(stmt.server_name) + len(rest))
                        + portal + stmt.server_name + rest
                    )
        elif t == _D:
            if end - pos > 7 and data[pos + 5] == _STATEMENT:
                stmt = client_statements.get(data[pos + 6 : end - 1])
                if stmt is not None:
                    out.append(data[run:pos])
                    run = end
                    server.ensure(stmt, segment, out)
                    out.append(frame(b"D", b"S" + stmt.server_name + b"\0"))
        elif t == _C:
            if end - pos > 7 and data[pos + 5] == _STATEMENT:
                name = data[pos + 6 : end - 1]
                client_statements.pop(name, None)
                out.append(data[run:pos])
                run = end
                out.append(NOOP_CLOSE)
            server.close_q.append((segment, FORWARD))
        elif t == _S or t == _Q or t == _F:
            segment += 1
        pos = end
    if not out:
        return data
    out.append(data[run:])
    return b"".join(out)


# --- session settings under transaction pooling -------------------------------------------

# Startup parameters that are not settings (PostgreSQL docs, 55.7 StartupMessage).
_NOT_SETTINGS = frozenset({"user", "database", "replication", "options"})


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def set_config_sql(name: str, value: str) -> str:
    return f"SELECT pg_catalog.set_config({_literal(name)}, {_literal(value)}, false)"


def _split_options(options: str) -> list[str]:
    """Words of the ``options`` parameter: whitespace separates, a backslash escapes the next
    character (as the server's own pg_split_opts)."""
    words: list[str] = []
    word: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
    if word:
        words.append("".join(word))
    return words


def _options_settings(options: str) -> dict[str, str]:
    """``-c name=value`` and ``--name=value`` pairs of the startup ``options`` parameter."""
    out: dict[str, str] = {}
    words = _split_options(options)
    i = 0
    while i < len(words):
        word = words[i]
        pair = None
        if word == "-c" and i + 1 < len(words):
            pair, i = words[i + 1], i + 1
        elif word.startswith("-c"):
            pair = word[2:]
        elif word.startswith("--"):
            pair = word[2:]
        if pair and "=" in pair:
            name, value = pair.split("=", 1)
            out[name.replace("-", "_").lower()] = value
        i += 1
    return out


class SessionSettings:
    """A client's session settings in transaction mode: its startup parameters plus the plain
    SETs it ran, as statements to replay on whichever server connection runs its next
    transaction. ``key`` is what a server connection must carry to serve this client; a server
    whose key differs first gets ``RESET ALL`` and the replay (see ``prelude``), so another
    client's settings never leak in and this client's follow it."""

    __slots__ = ("_startup", "_sets", "key")

    def __init__(self, startup_params: dict[str, str]) -> None:
        startup: dict[str, str] = {}
        for name, value in startup_params.items():
            if name not in _NOT_SETTINGS and not name.startswith("_pq_."):
                startup[name.lower()] = set_config_sql(name, value)
        for name, value in _options_settings(startup_params.get("options", "")).items():
            startup[name] = set_config_sql(name, value)
        self._startup = startup
        self._sets = dict(startup)
        self.key: frozenset | None = frozenset(startup.items()) if startup else None

    def pin(self, name: str, statement: str) -> None:
        """A setting the session always carries, whatever RESET/RESET ALL it runs."""
        self._startup[name] = statement
        self._sets[name] = statement
        self._changed()

    def _changed(self) -> None:
        self.key = frozenset(self._sets.items()) if self._sets else None

    def set(self, name: str, statement: str) -> None:
        self._sets[name] = statement
        self._changed()

    def reset(self, name: str) -> None:
        # RESET goes back to the session default, which includes the startup packet's value.
        if name in self._startup:
            self._sets[name] = self._startup[name]
        else:
            self._sets.pop(name, None)
        self._changed()

    def reset_all(self) -> None:
        self._sets = dict(self._startup)
        self._changed()

    def prelude(self, server_key: frozenset | None) -> list[str]:
        """The statements that make a server carrying ``server_key`` carry ours (each sent as
        its own Query, so one that fails cannot stop the others)."""
        if server_key == self.key:
            return []
        return ["RESET ALL", *self._sets.values()]


def startup_read_only(startup_params: dict[str, str]) -> bool:
    """Whether the startup packet makes the session's transactions read-only
    (``default_transaction_read_only``, as a parameter or in ``options``)."""
    value = _options_settings(startup_params.get("options", "")).get("default_transaction_read_only")
    for name, param in startup_params.items():
        if name.lower() == "default_transaction_read_only":
            value = param
    return bool(value is not None and parse_bool(value))
