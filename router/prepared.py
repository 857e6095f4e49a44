"""Named prepared statements under transaction pooling (sans-I/O).

In transaction mode a client's next transaction may run on another server connection, where
its named statements do not exist, or where another client's statement of the same name does.
So a client's names never reach a server. Each distinct (query text, parameter types) gets one
router-owned server name (``StatementRegistry``); each server connection remembers which of
those it has prepared (``ServerStatements``, a bounded LRU). Extended-protocol messages are
rewritten on their way to a server (``rewrite_for_server``):

- Parse with a name: sent with the server name, unless that server already has it; then a
  Close of a name nobody uses goes instead, and its CloseComplete ('3') is turned into the
  ParseComplete ('1') the client expects, in the same place in the reply stream. Not where
  the transaction has failed or may have by then (behind unanswered segments): a Parse
  fails there with 25P02 and a Close does not, so the statement is closed and parsed again.
- Bind / Describe of a named statement: the server name is substituted; a server lacking the
  statement first gets its Parse, whose ParseComplete is swallowed.
- Close of a named statement: only the client's mapping goes (other clients may share the
  server statement); a no-op Close keeps the CloseComplete where the client expects it.
- Parse of a name the client already has: PostgreSQL answers 42P05, and so does the server,
  to a Parse of the server name the client's statement has; the router puts the client's name
  into the error message.
- Unnamed statements and portals pass through untouched.

Replies are matched to requests by counting: every Parse and Close sent is queued (``ops``)
with the "sync segment" it belongs to (how many Sync/Query messages preceded it) and what it
changed; each '1' or '3' from the server pops the oldest entry. The router's views (what a
server has prepared, which names a client has) are updated when a message is sent, so that
the next messages can be rewritten before any reply comes; after an ErrorResponse the server
skips to the next Sync (PostgreSQL docs, 55.2.3 "Extended Query"), so the entries of that
segment get no reply: they are dropped and what they changed is put back. A failed or
skipped Parse or Close never counts. The same counting is what the server connection's hot
path consults.

What the server will hold can be made certain before the replies come (a Close then a Parse
of a statement whose fate is open); what a client's name means cannot. In a pipeline, a Parse
or Close of a name in one segment may fail or be skipped after an error, and that decides
what a later segment's Parse, Bind or Describe of the name does: succeed or 42P05, run or
26000, and with which text. So such a message waits, with everything after it, until the
server has answered what was sent before (``ServerStatements.wait_from``; the client
connection sends the rest on the ReadyForQuery that settles it). Pipelines that use a name
prepared in an earlier segment of the same pipeline pay a round trip; everything else is
rewritten at once. So does a message naming a statement behind a client's DISCARD ALL or
DEALLOCATE ALL: whether that frees the client's names (it fails in a transaction block) is
known from its reply.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from router.protocol.errors import ProtocolError
from router.protocol.framing import frame

_unpack_len = struct.Struct("!I").unpack_from
_pack_len = struct.Struct("!I").pack

_P, _B, _D, _C, _E = ord("P"), ord("B"), ord("D"), ord("C"), ord("E")
_S, _Q, _F = ord("S"), ord("Q"), ord("F")
_STATEMENT = ord("S")

# Reply types of the requests the router keeps count of (ParseComplete, CloseComplete).
PARSE_REPLY, CLOSE_REPLY = ord("1"), ord("3")

# What to do with the server's reply to a Parse or Close the router sent. DUPLICATE: the Parse
# that stands in for a client's Parse of a name it already has (see ``rewrite_for_server``).
FORWARD, SWALLOW, AS_PARSE_COMPLETE, DUPLICATE = 0, 1, 2, 3

# A pending request (one per Parse or Close sent), a plain tuple: it is made for every Parse
# on the hot path. Fields by index:
SEGMENT, REPLY, ACTION = 0, 1, 2
# The server statement whose presence the request changes (a Parse adds it, a Close removes
# it; None: no change) and what ``ServerStatements.prepared`` held for it before.
NAME, PREV = 3, 4
# The client-side change: the client's statement dict, its name there, the value the request
# gives it (None: removed) and the value before (None: absent).
CLIENT, CLIENT_NAME, CLIENT_NEW, CLIENT_PREV = 5, 6, 7, 8
# PREV of a Close of a statement that was unsure (``ServerStatements.unsure``): if the Close
# is dropped, the statement is unsure again, not absent.
UNSURE = -1

# A statement name no client or router ever prepares: closing it is a no-op that still
# produces a CloseComplete ("It is not an error to issue Close against a nonexistent
# statement", 55.7 Close).
NOOP_NAME = b"pgrouter_noop"
NOOP_CLOSE = frame(b"C", b"S" + NOOP_NAME + b"\0")
PARSE_COMPLETE = b"1\x00\x00\x00\x04"

DEFAULT_MAX_PREPARED = 250
# Distinct Parse bodies the registry remembers, the least recently prepared forgotten first:
# without a bound, clients that prepare ever new texts (constants written into the SQL)
# would grow the router for as long as it runs. A forgotten text prepared again gets a new
# name; a server may then hold both, until its own LRU (max_prepared_statements) lets the
# old one go. A client's statements keep the name they were given. Bounded in entries and
# in bytes of text (ORM statements run to kilobytes).
MAX_REGISTERED = 20_000
MAX_REGISTERED_BYTES = 16 << 20


class StatementRegistry:
    """Router-wide: one server name per distinct Parse body (query text + parameter types),
    for the last ``maxsize`` bodies prepared (``max_bytes`` of them at most). Names are never reused, so a name means the same
    statement on every server.

    ``validated`` holds the server names some server has parsed successfully: a client's
    Parse+Sync of one of those is answered by the router itself, without taking a server
    connection. That matters beyond speed: libpq's PQprepare (pgbench -M prepared) blocks
    its thread, so a client that waits for a pooled connection just to prepare can stall the
    clients that hold every connection, until query_wait_timeout.
    """

    __slots__ = ("_names", "_next", "_bytes", "validated", "maxsize", "max_bytes")

    def __init__(self, maxsize: int = MAX_REGISTERED, max_bytes: int = MAX_REGISTERED_BYTES) -> None:
        self._names: OrderedDict[bytes, bytes] = OrderedDict()
        self._next = 0
        self._bytes = 0  # of the bodies remembered
        self.validated: set[bytes] = set()
        self.maxsize = maxsize
        self.max_bytes = max_bytes

    def name_for(self, key: bytes) -> bytes:
        names = self._names
        name = names.get(key)
        if name is None:
            name = names[key] = b"pgr_%x" % self._next
            self._next += 1
            self._bytes += len(key)
            while len(names) > 1 and (len(names) > self.maxsize or self._bytes > self.max_bytes):
                old, forgotten = names.popitem(last=False)
                self._bytes -= len(old)
                self.validated.discard(forgotten)
        else:
            names.move_to_end(key)
        return name

    def retire(self, name: bytes) -> None:
        """Give the statement named ``name`` a new name for Parses from now on: server
        connections may hold ``name`` with a plan PostgreSQL can no longer use ("cached plan
        must not change result type" after DDL), and a client that prepares the text again
        must get a fresh statement, not a no-op Close of the stale one. Rare: a linear scan."""
        for key, known in self._names.items():
            if known == name:
                self._names[key] = b"pgr_%x" % self._next
                self._next += 1
                break
        self.validated.discard(name)

    def __len__(self) -> int:
        return len(self._names)


@dataclass(slots=True)
class ClientStatement:
    server_name: bytes
    parse_message: bytes  # the client's Parse, carrying the server name


class ServerStatements:
    """What one server connection has prepared, and the replies it still owes.

    Both views here and the client's statement dict are what the server will hold once
    every request sent has done what it asks, so later messages can be rewritten before any
    reply arrives. Each request is queued in ``ops`` with what it changed; its ParseComplete
    or CloseComplete only pops it. When the server skips requests (an ErrorResponse, up to
    the Sync's ReadyForQuery), ``on_error`` drops them and puts back what they changed, so a
    failed or skipped Parse or Close never counts.
    """

    __slots__ = (
        "prepared", "ops", "sent_z", "recv_z", "max_prepared", "validated", "error_segment",
        "wait_from", "uncounted_z", "unsure", "discards_owed", "discard_segment",
    )

    def __init__(
        self, max_prepared: int = DEFAULT_MAX_PREPARED, validated: set[bytes] | None = None
    ) -> None:
        self.validated = validated if validated is not None else set()
        # Server name -> the segment of the Parse that prepared it (a bounded LRU). A Parse
        # of a segment whose ReadyForQuery has arrived (segment < recv_z) is certain.
        self.prepared: OrderedDict[bytes, int] = OrderedDict()
        # Server names that may or may not be prepared there (a DISCARD ALL / DEALLOCATE ALL
        # was sent, and it fails in a transaction block): closed before they are used.
        self.unsure: set[bytes] = set()
        self.ops: deque[tuple] = deque()
        self.sent_z = 0  # Query/Sync/FunctionCall messages sent: each earns one ReadyForQuery
        self.recv_z = 0
        # The segment whose ErrorResponse has arrived: the server skips the rest of it, so
        # messages still sent into it get no replies and are not queued.
        self.error_segment = -1
        self.max_prepared = max_prepared
        # Set by ``rewrite_for_server``: where in its chunk the messages begin that must wait
        # for every reply owed before they can be rewritten (-1: none).
        self.wait_from = -1
        # Chunks of unnamed Parses/Closes ending at a Sync go out unqueued; their replies all
        # come before this ReadyForQuery, and nothing is queued until it has arrived.
        self.uncounted_z = 0
        # A client's DISCARD ALL / DEALLOCATE ALL sent and not yet answered (1, else 0): its
        # tag, when it comes, frees the client's statement names (``forget_client_names``);
        # if it fails (in a transaction block) every reply owed arrives without it, and this
        # goes back to 0. Meanwhile no message naming a statement in a later segment than
        # the discard's (``discard_segment``) is rewritten.
        self.discards_owed = 0
        self.discard_segment = 0

    def on_error(self) -> None:
        """An ErrorResponse: the requests of the failing segment that have not been answered
        get no reply; what they changed is put back."""
        segment = self.recv_z
        self.error_segment = segment
        ops = self.ops
        if not ops or ops[0][SEGMENT] != segment:
            return
        dropped = []
        while ops and ops[0][SEGMENT] == segment:
            dropped.append(ops.popleft())
        self._undo(dropped)

    def unanswer(self, answered: list[tuple]) -> None:
        """The replies to ``answered`` (the oldest requests, in order) were read but are
        dropped, never reaching the client: the requests go back to unanswered. A stand-in
        Parse's success had given the client its statement; as a plain request its undo
        takes it back."""
        ops = self.ops
        for op in reversed(answered):
            if op[ACTION] == DUPLICATE:
                op = (*op[:ACTION], FORWARD, *op[ACTION + 1 :])
            ops.appendleft(op)

    def abandon(self) -> None:
        """The connection is gone with requests unanswered: none of them took effect, for the
        client either (a read retried elsewhere sends its Parses again, and must not find
        their names taken)."""
        dropped = list(self.ops)
        self.ops.clear()
        self._undo(dropped)

    def _undo(self, dropped: list[tuple]) -> None:
        """Put back what ``dropped`` (the oldest requests) changed, then replay the requests
        still queued over it: the views become the answered ones plus the pending ones."""
        names: dict[bytes, int | None] = {}
        clients: dict[tuple[int, bytes], list] = {}
        for op in dropped:
            if op[NAME] is not None and op[NAME] not in names:
                names[op[NAME]] = op[PREV]
            client = op[CLIENT]
            if client is not None and op[ACTION] != DUPLICATE:
                clients.setdefault((id(client), op[CLIENT_NAME]), [client, op[CLIENT_NAME], op[CLIENT_PREV]])
        if not names and not clients:
            return
        ops = self.ops
        for i in range(len(ops)):
            op = ops[i]
            name = op[NAME]
            if name in names:
                op = (*op[:PREV], names[name], *op[PREV + 1 :])
                names[name] = op[SEGMENT] if op[REPLY] == PARSE_REPLY else None
            if op[CLIENT] is not None and op[ACTION] != DUPLICATE:
                entry = clients.get((id(op[CLIENT]), op[CLIENT_NAME]))
                if entry is not None:
                    op = (*op[:CLIENT_PREV], entry[2])
                    entry[2] = op[CLIENT_NEW]
            ops[i] = op
        prepared = self.prepared
        for name, segment in names.items():
            if segment is None:
                prepared.pop(name, None)
            elif segment == UNSURE:
                prepared.pop(name, None)
                self.unsure.add(name)
            else:
                prepared[name] = segment
        for client, client_name, value in clients.values():
            if value is None:
                client.pop(client_name, None)
            else:
                client[client_name] = value

    def commit_duplicate(self, op: tuple) -> None:
        """The stand-in Parse for a client's Parse of a name it has succeeded: the server did
        not have the statement after all (it was skipped after an error), nor does the client."""
        op[CLIENT][op[CLIENT_NAME]] = op[CLIENT_NEW]

    def duplicate_error(self, message: bytes) -> bytes:
        """The ErrorResponse to the stand-in Parse at the head of ``ops``: PostgreSQL's own
        42P05, naming the router's statement; the client reads its own name instead."""
        op = self.ops[0]
        if message.find(b"C42P05\0") < 0:
            return message
        body = message[5:].replace(op[CLIENT_PREV].server_name, op[CLIENT_NAME])
        return frame(b"E", body)

    def forget_all(self) -> None:
        """A DISCARD ALL / DEALLOCATE ALL may have been sent on the connection. Whether it
        drops the statements is known only from its reply (DISCARD ALL fails in a transaction
        block), so every statement the server has or is being asked to prepare becomes
        unsure: the next use closes it first (also after the reply: which of the requests
        sent around it ran before it is not always known, and a Close more is cheap). A
        request still unanswered that is dropped leaves its statement unsure too."""
        unsure = self.unsure
        unsure.update(self.prepared)
        self.prepared.clear()
        ops = self.ops
        for i in range(len(ops)):
            if ops[i][NAME] is not None:
                unsure.add(ops[i][NAME])
                ops[i] = (*ops[i][:PREV], UNSURE, *ops[i][PREV + 1 :])

    def forget_client_names(self, client_statements: dict[bytes, ClientStatement]) -> list[bytes]:
        """The tag of the client's DISCARD ALL / DEALLOCATE ALL has come: every request sent
        before it has been answered, every one still queued was sent after it. The client's
        names are freed, except those a queued request gives (a Parse after the discard),
        which go back to none rather than to what they were if that request fails. Returns
        the names freed."""
        after: set[bytes] = set()
        ops = self.ops
        for i in range(len(ops)):
            op = ops[i]
            if op[CLIENT] is client_statements and op[ACTION] != DUPLICATE and op[CLIENT_NAME] not in after:
                after.add(op[CLIENT_NAME])
                ops[i] = (*op[:CLIENT_PREV], None)
        freed = [name for name in client_statements if name not in after]
        for name in freed:
            del client_statements[name]
        return freed

    def _closing_before(self, name: bytes, segment: int) -> bool:
        """Whether a Close of ``name`` sent in an earlier segment is still unanswered: it may
        yet be skipped, leaving the statement on the server. Only pipelines get here."""
        ops = self.ops
        return bool(ops) and ops[0][SEGMENT] < segment and any(
            op[NAME] == name and op[REPLY] == CLOSE_REPLY for op in ops
        )

    def unprepare(self, name: bytes, segment: int, out: list) -> None:
        """Close the server statement ``name`` (its reply swallowed), whether or not the
        server has it: the next use prepares it afresh."""
        self._close(name, segment, out)

    def _close(self, name: bytes, segment: int, out: list) -> None:
        prev = self.prepared.pop(name, None)
        if name in self.unsure:
            self.unsure.discard(name)
            prev = UNSURE
        out.append(frame(b"C", b"S" + name + b"\0"))
        self.ops.append((segment, CLOSE_REPLY, SWALLOW, name, prev, None, None, None, None))

    def _parse(self, name: bytes, parse_message: bytes, segment: int, action: int, out: list,
               client: dict | None = None, client_name: bytes | None = None,
               stmt: ClientStatement | None = None) -> None:
        prepared = self.prepared
        while len(prepared) >= self.max_prepared:
            old, old_segment = prepared.popitem(last=False)
            out.append(frame(b"C", b"S" + old + b"\0"))
            self.ops.append((segment, CLOSE_REPLY, SWALLOW, old, old_segment, None, None, None, None))
        out.append(parse_message)
        prepared[name] = segment
        self.ops.append((segment, PARSE_REPLY, action, name, None, client, client_name, stmt, None))

    def _sure(self, name: bytes, segment: int) -> int:
        """1: ``name`` will be on the server when a message of ``segment`` runs (prepared in
        an answered segment or earlier in this one). 0: it will not. -1: it depends on a
        request of an earlier segment not answered yet."""
        seen = self.prepared.get(name)
        if seen is None:
            return -1 if name in self.unsure or self._closing_before(name, segment) else 0
        if seen == segment or seen < self.recv_z:
            self.prepared.move_to_end(name)
            return 1
        return -1

    def ensure(self, stmt: ClientStatement, segment: int, out: list) -> None:
        """Have ``stmt`` prepared for a Bind/Describe of ``segment``: its Parse goes first
        (reply swallowed) unless the server surely has it. When that depends on an earlier
        segment still unanswered, a Close goes first: it could have been skipped, and a Parse
        of a name the server has fails."""
        name = stmt.server_name
        seen = self.prepared.get(name)
        if seen is not None and (seen == segment or seen < self.recv_z):
            self.prepared.move_to_end(name)  # the common case, inline: every Bind comes here
            return
        sure = self._sure(name, segment)
        if sure < 0:
            self._close(stmt.server_name, segment, out)
        self._parse(stmt.server_name, stmt.parse_message, segment, SWALLOW, out)


def client_names_in_error(
    message: bytes, client_statements: dict[bytes, ClientStatement], ops: deque
) -> bytes:
    """An ErrorResponse naming a router-owned statement (``bind message supplies 1
    parameters, but prepared statement "pgr_6" requires 0``): the client reads its own name
    there, as PostgreSQL would give it. The names are the client's where the error struck:
    ``ops`` (after ``on_error``) holds the requests of later segments, which have changed the
    client's names already; their changes are taken back here. When the client has several
    names for one statement text, the message names the first it prepared."""
    names = client_statements
    if ops:
        names = dict(client_statements)
        for op in reversed(ops):
            if op[CLIENT] is client_statements and op[ACTION] != DUPLICATE:
                if op[CLIENT_PREV] is None:
                    names.pop(op[CLIENT_NAME], None)
                else:
                    names[op[CLIENT_NAME]] = op[CLIENT_PREV]
    body = message[5:]
    changed = False
    for client_name, stmt in names.items():
        quoted = b'"' + stmt.server_name + b'"'
        if body.find(quoted) >= 0:
            body = body.replace(quoted, b'"' + client_name + b'"')
            changed = True
    return frame(b"E", body) if changed else message


def local_parse_reply(
    data: bytes,
    start: int,
    client_statements: dict[bytes, ClientStatement],
    registry: StatementRegistry,
    status: bytes = b"I",
) -> bytes | None:
    """If ``data[start:]`` is only named Parses of validated statements and one final Sync,
    record them and return the replies (ParseComplete each, ReadyForQuery with ``status``:
    T in a transaction whose BEGIN the router has answered); else None, with nothing
    recorded. A name the client has already (42P05) goes to the server."""
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
    if any(name in client_statements for name, _ in parsed) or len({name for name, _ in parsed}) < len(parsed):
        return None
    for client_name, body in parsed:
        server_name = names[body]
        client_statements[client_name] = ClientStatement(
            server_name, frame(b"P", server_name + b"\0" + body)
        )
    return PARSE_COMPLETE * len(parsed) + b"Z\x00\x00\x00\x05" + status


def _cstring_end(data: bytes, start: int, end: int) -> int:
    nul = data.find(b"\0", start, end)
    if nul < 0:
        raise ProtocolError("unterminated string in extended-protocol message")
    return nul


def _pending_in_earlier_segment(
    ops: deque, client_statements: dict, name: bytes, segment: int
) -> bool:
    """Whether a Parse or Close of the client's ``name`` sent in a segment before ``segment``
    is still unanswered: whether it takes effect, fails or is skipped decides what a message
    of ``segment`` naming it means (the caller has checked that ``ops`` starts earlier)."""
    for op in ops:
        if op[SEGMENT] >= segment:
            return False
        if op[CLIENT] is client_statements and op[CLIENT_NAME] == name:
            return True
    return False


def _names_a_statement(data: bytes, t: int, pos: int, end: int) -> bool:
    """Whether the message at ``pos`` (type ``t``, ending at ``end``) is a Parse, Bind,
    Describe or Close naming a statement."""
    if t == _P:
        return data[pos + 5] != 0
    if t == _B:
        portal_end = _cstring_end(data, pos + 5, end)
        return portal_end + 1 < end and data[portal_end + 1] != 0
    return (t == _D or t == _C) and end - pos > 7 and data[pos + 5] == _STATEMENT


def _name_end(data: bytes, pos: int, end: int) -> int:
    """Where the name of the Describe/Close at ``pos`` ends: its NUL must be the last byte."""
    if _cstring_end(data, pos + 6, end) != end - 1:
        raise ProtocolError("invalid Describe/Close message: trailing bytes after the name")
    return end - 1


def rewrite_for_server(
    data: bytes,
    start: int,
    client_statements: dict[bytes, ClientStatement],
    registry: StatementRegistry,
    server: ServerStatements,
    forgets: Callable[[bytes], bool] | None = None,
    failed: bool = False,
) -> bytes:
    """Rewrite the whole messages in ``data[start:]`` for ``server`` (see the module doc).

    ``data[:start]`` is the tail of a message already partly sent and goes out as is; so does
    a trailing incomplete message (the caller only lets through incomplete messages of types
    that need no rewriting). Updates the server's bookkeeping; does not count sent Syncs (the
    caller adds them to ``server.sent_z`` afterwards).

    A message whose meaning depends on a reply still owed (see the module doc) stops the
    rewriting: ``server.wait_from`` is set to its offset, and only what precedes it is
    returned. The caller sends the rest once nothing is owed.

    ``forgets``: given when the chunk holds a DISCARD ALL or DEALLOCATE ALL, as a Query or
    run by an Execute: whether a Query's text (without its NUL) is one. At such a Query, and
    at every Execute of the chunk (which statement it runs is not looked up), the server's
    statements become unsure (``forget_all``) and a message naming a statement in a later
    segment waits until the replies show whether the client's names were freed. (One in the
    same segment behind an Execute goes at once, before any reply can come: if that Execute
    ran DEALLOCATE ALL, a Parse of a name it freed is taken for a second Parse of the
    client's name, 42P05. PostgreSQL refuses DISCARD ALL there.)

    ``failed``: the server's transaction has failed (its last ReadyForQuery said 'E').
    """
    out: list[bytes] = []
    run = 0  # start of the current stretch copied verbatim
    pos = start
    n = len(data)
    stop = n  # where the returned bytes end: before a message that waits, else the end
    segment = server.sent_z
    ops = server.ops
    if server.uncounted_z > server.recv_z:
        # Replies to unqueued Parses/Closes are still on their way: a request queued now
        # would be matched with one of them. Wait for them (one round trip, only for such
        # pipelines).
        server.wait_from = start
        return data[:start]
    server.wait_from = -1
    discards = forgets is not None or server.discards_owed
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
        if discards:  # rare: a chunk with a DISCARD ALL, or one behind it
            if forgets is not None and (t == _E or (t == _Q and forgets(data[pos + 5 : end - 1]))):
                # The DISCARD ALL / DEALLOCATE ALL, or maybe it (an Execute): it runs before
                # what follows. What waits for the replies is what follows the first.
                server.forget_all()
                if not server.discards_owed:
                    server.discards_owed = 1
                    server.discard_segment = segment
            elif (
                server.discards_owed
                and segment > server.discard_segment
                and _names_a_statement(data, t, pos, end)
            ):
                # Behind a DISCARD ALL / DEALLOCATE ALL: once a Sync has gone after it (only
                # then do the replies that settle it come), a message naming a statement
                # waits.
                stop = pos
                break
        if t == _P:
            name_end = _cstring_end(data, pos + 5, end)
            if name_end == pos + 5:
                ops.append((segment, PARSE_REPLY, FORWARD, None, None, None, None, None, None))
            else:
                client_name = data[pos + 5 : name_end]
                if ops and ops[0][SEGMENT] < segment and _pending_in_earlier_segment(
                    ops, client_statements, client_name, segment
                ):
                    stop = pos
                    break
                body = data[name_end + 1 : end]  # query text, NUL, parameter types
                server_name = registry.name_for(body)
                message = frame(b"P", server_name + b"\0" + body)
                out.append(data[run:pos])
                run = end
                old = client_statements.get(client_name)
                if old is not None:
                    # PostgreSQL answers 42P05 (or the text's own error, which it finds
                    # first): so does the server, to a Parse of the name it has for the
                    # client's statement; a Close follows in case the Parse succeeds after
                    # all (the server no longer had the statement), or the name would mean
                    # another text there.
                    server.ensure(old, segment, out)
                    out.append(frame(b"P", old.server_name + b"\0" + body))
                    ops.append((
                        segment, PARSE_REPLY, DUPLICATE, None, None, client_statements, client_name,
                        ClientStatement(server_name, message), old,
                    ))
                    server._close(old.server_name, segment, out)
                else:
                    stmt = ClientStatement(server_name, message)
                    client_statements[client_name] = stmt
                    sure = server._sure(server_name, segment)
                    if sure == 1 and segment == server.recv_z and not failed:
                        # Nothing before it can fail the transaction (a Parse there fails
                        # with 25P02, a Close does not): a no-op stands in for it.
                        out.append(NOOP_CLOSE)
                        ops.append((
                            segment, CLOSE_REPLY, AS_PARSE_COMPLETE, None, None, client_statements,
                            client_name, stmt, None,
                        ))
                    else:
                        if sure:
                            server._close(server_name, segment, out)
                        server._parse(server_name, message, segment, FORWARD, out, client_statements, client_name, stmt)
        elif t == _B:
            portal_end = _cstring_end(data, pos + 5, end)
            stmt_end = _cstring_end(data, portal_end + 1, end)
            if stmt_end > portal_end + 1:
                client_name = data[portal_end + 1 : stmt_end]
                if ops and ops[0][SEGMENT] < segment and _pending_in_earlier_segment(
                    ops, client_statements, client_name, segment
                ):
                    stop = pos
                    break
                stmt = client_statements.get(client_name)
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
                client_name = data[pos + 6 : _name_end(data, pos, end)]
                if ops and ops[0][SEGMENT] < segment and _pending_in_earlier_segment(
                    ops, client_statements, client_name, segment
                ):
                    stop = pos
                    break
                stmt = client_statements.get(client_name)
                if stmt is not None:
                    out.append(data[run:pos])
                    run = end
                    server.ensure(stmt, segment, out)
                    out.append(frame(b"D", b"S" + stmt.server_name + b"\0"))
        elif t == _C:
            if end - pos > 7 and data[pos + 5] == _STATEMENT:
                client_name = data[pos + 6 : _name_end(data, pos, end)]
                prev = client_statements.pop(client_name, None)
                out.append(data[run:pos])
                run = end
                out.append(NOOP_CLOSE)
                # Recorded even when the client has no such name (as far as the router
                # knows yet): an earlier request still unanswered may give it one.
                ops.append((
                    segment, CLOSE_REPLY, FORWARD, None, None, client_statements, client_name, None, prev,
                ))
            else:
                ops.append((segment, CLOSE_REPLY, FORWARD, None, None, None, None, None, None))
        elif t == _S or t == _Q or t == _F:
            segment += 1
        pos = end
    if stop < n:
        server.wait_from = stop
    if not out:
        return data if stop == n else data[:stop]
    out.append(data[run:stop])
    return b"".join(out)


def statements_used(data: bytes) -> list[bytes]:
    """The server statement names the Bind and Describe messages of a rewritten chunk use."""
    names: list[bytes] = []
    pos = 0
    n = len(data)
    while pos + 5 <= n:
        t = data[pos]
        end = pos + 1 + _unpack_len(data, pos + 1)[0]
        if end > n:
            break
        if t == _B:
            portal_end = data.find(b"\0", pos + 5, end)
            stmt_end = data.find(b"\0", portal_end + 1, end)
            if portal_end >= 0 and stmt_end > portal_end + 1:
                names.append(data[portal_end + 1 : stmt_end])
        elif t == _D and end - pos > 7 and data[pos + 5] == _STATEMENT:
            names.append(data[pos + 6 : end - 1])
        pos = end
    return names
