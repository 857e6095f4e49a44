"""The classifier's answer, as plain values: where a statement may run and why.

A ``Verdict`` is what routing decides for one statement (or for a whole Query message):
``target`` is the node kind it may run on, ``reason`` says why (it feeds metrics and logs
unchanged), ``kind`` tells the session layer what the statement does to transaction or session
state. ``StatementInfo`` adds what some kinds carry (the GUC of a ``SET``, the name of a
prepared statement or cursor...). ``Classification`` is the result for a whole message.

Targets are *requirements*, not placements:

* ``PRIMARY``: the statement must run on the primary (it writes, may write, or needs
  something only the primary has).
* ``REPLICA``: the statement is *replica-compatible*: a replica may run it, and so may the
  primary. Statements that do not choose a node themselves (COMMIT, SET, DEALLOCATE, FETCH...)
  are replica-compatible too, so they never force a transaction or message onto the primary;
  the session runs them wherever the transaction (or cursor, or session state) already is.

Combining statements of one Query message (PostgreSQL docs, Frontend/Backend Protocol,
"Multiple Statements in a Simple Query": they run as one implicit transaction unless explicit
transaction control splits them, so they must all run on one node): the strongest target
wins, PRIMARY over REPLICA. The combined verdict takes its
reason from the first statement that has the winning target, and its kind is that
statement's kind when the message holds exactly one statement, else ``MULTIPLE`` so that a
session that only looks at ``verdict.kind`` cannot miss a ``BEGIN`` in the middle of a
message: it must look at ``statements``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum


class Target(Enum):
    """Where a statement may run. Ordered: PRIMARY is the stronger requirement."""

    PRIMARY = "primary"
    REPLICA = "replica"


class Reason(StrEnum):
    """Why a statement got its target. Values are stable: they label metrics."""

    # --- replica-compatible ---
    READ = "read"  # SELECT, VALUES, TABLE, SHOW, EXPLAIN (not ANALYZE), COPY ... TO STDOUT
    TRANSACTION_BEGIN_READ_ONLY = "transaction_begin_read_only"
    TRANSACTION_CONTROL = "transaction_control"  # COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION ...
    SESSION_SET = "session_set"  # SET, RESET, DISCARD, DEALLOCATE, pgrouter.target
    CURSOR = "cursor"  # FETCH, MOVE, CLOSE: they run where the cursor is
    EMPTY = "empty"  # empty string, only comments or semicolons
    # --- primary: the statement writes or needs the primary ---
    WRITE = "write"  # INSERT, UPDATE, DELETE, MERGE
    DDL = "ddl"  # CREATE, ALTER, DROP, GRANT, COMMENT, TRUNCATE, CREATE TABLE AS ...
    LOCKING_CLAUSE = "locking_clause"  # FOR UPDATE / NO KEY UPDATE / SHARE / KEY SHARE
    WRITABLE_CTE = "writable_cte"  # WITH x AS (INSERT ... RETURNING ...) SELECT ...
    SELECT_INTO = "select_into"
    NEXTVAL = "nextval"  # nextval, setval, currval, lastval
    ADVISORY_LOCK = "advisory_lock"
    SET_CONFIG = "set_config"
    WRITER_FUNCTION = (
        "writer_function"  # other known writers: lo_*, txid_current, pg_terminate_backend...
    )
    LISTEN_NOTIFY = "listen_notify"  # LISTEN, UNLISTEN, NOTIFY, pg_notify()
    COPY_FROM = "copy_from"
    COPY_TO_FILE = "copy_to_file"  # COPY ... TO 'file' / PROGRAM: a side effect on the server host
    MAINTENANCE = "maintenance"  # VACUUM, ANALYZE, CLUSTER, REINDEX, REFRESH MV, CHECKPOINT, LOAD
    LOCK = "lock"
    TWO_PHASE = "two_phase"  # PREPARE TRANSACTION, COMMIT PREPARED, ROLLBACK PREPARED
    SERIALIZABLE = "serializable"  # a hot standby refuses SERIALIZABLE transactions
    # BEGIN: read-write unless the session's default_transaction_read_only is on
    TRANSACTION_BEGIN_READ_WRITE = "transaction_begin_read_write"
    TRANSACTION_READ_WRITE = "transaction_read_write"  # BEGIN / SET TRANSACTION READ WRITE
    # --- primary because we cannot tell ---
    VOLATILE_FUNCTION = "volatile_function"
    UNKNOWN_FUNCTION = "unknown_function"
    CALL_DO = "call_do"  # CALL, DO: procedure and block bodies are opaque
    PREPARED_STATEMENT = "prepared_statement"  # EXECUTE: the session may know the statement
    UNPARSABLE = "unparsable"
    UNKNOWN = "unknown"  # parsed, but a statement type the classifier does not know
    # A replica refused it with 25006 (read_only_sql_transaction): it writes where the text
    # does not show it (a view over a volatile function, say). Learned, never classified.
    REFUSED_BY_REPLICA = "refused_by_replica"
    # --- a leading /* pgrouter: ... */ comment decided ---
    HINT = "hint"


# PRIMARY reasons that only mean "we cannot tell whether it writes". A `/* pgrouter: replica */`
# hint overrides these (the client knows better, and a replica refuses a real write with
# SQLSTATE 25006 anyway); it never overrides the other PRIMARY reasons, which mean "this
# statement writes or needs the primary". See hints.py.
SUSPECTED_WRITE_REASONS = frozenset(
    {
        Reason.VOLATILE_FUNCTION,
        Reason.UNKNOWN_FUNCTION,
        Reason.CALL_DO,
        Reason.PREPARED_STATEMENT,
        Reason.COPY_TO_FILE,
        Reason.TRANSACTION_BEGIN_READ_WRITE,
        Reason.UNPARSABLE,
        Reason.UNKNOWN,
        Reason.REFUSED_BY_REPLICA,
    }
)


class StatementKind(Enum):
    """What a statement does to transaction or session state, for the session layer.

    The comment after each member says which ``StatementInfo`` fields it fills.
    """

    PLAIN = "plain"  # nothing the session must track
    MULTIPLE = "multiple"  # only on a combined verdict of several statements: see `statements`
    # transactions
    BEGIN = "begin"  # BEGIN / START TRANSACTION, not READ ONLY
    BEGIN_READ_ONLY = "begin_read_only"
    SET_TRANSACTION = "set_transaction"  # SET TRANSACTION ISOLATION/DEFERRABLE/SNAPSHOT
    SET_TRANSACTION_READ_ONLY = "set_transaction_read_only"  # also SET transaction_read_only = on
    SET_TRANSACTION_READ_WRITE = "set_transaction_read_write"
    COMMIT = "commit"  # COMMIT, END
    COMMIT_AND_CHAIN = "commit_and_chain"  # a new transaction starts on the same node
    ROLLBACK = "rollback"  # ROLLBACK, ABORT
    ROLLBACK_AND_CHAIN = "rollback_and_chain"
    SAVEPOINT = "savepoint"  # SAVEPOINT, RELEASE, ROLLBACK TO: name, value = which of the three
    PREPARE_TRANSACTION = "prepare_transaction"  # ends the transaction (two-phase): name = gid
    # session parameters
    SET_SESSION = "set_session"  # SET [SESSION] guc = value: name, value
    SET_LOCAL = "set_local"  # SET LOCAL guc = value (until transaction end): name, value
    RESET = "reset"  # RESET guc, SET guc TO DEFAULT: name
    RESET_ALL = "reset_all"
    SET_DEFAULT_READ_ONLY = "set_default_read_only"  # default_transaction_read_only: read_only
    ROUTER_TARGET = "router_target"  # SET/RESET pgrouter.target, never sent to a server: value
    SHOW_ROUTER_TARGET = "show_router_target"  # SHOW pgrouter.target: a lone one is answered
    DISCARD_ALL = "discard_all"
    DISCARD = "discard"  # DISCARD PLANS / SEQUENCES / TEMP: name = "plans"|"sequences"|"temp"
    DO_SESSION = "do_session"  # a DO block whose body may change settings: none can be replayed
    # notifications
    LISTEN = "listen"  # name = channel
    UNLISTEN = "unlisten"  # name = channel, None for UNLISTEN *
    # SQL-level prepared statements and cursors
    PREPARE = "prepare"  # name; the verdict is that of the prepared statement
    EXECUTE = "execute"  # name
    DEALLOCATE = "deallocate"  # name
    DEALLOCATE_ALL = "deallocate_all"
    DECLARE_CURSOR = "declare_cursor"  # name; the verdict is that of the cursor's query
    FETCH = "fetch"  # FETCH / MOVE: name
    CLOSE_CURSOR = "close_cursor"  # name, None for CLOSE ALL


# The values `SET pgrouter.target` accepts; the session rejects any other (the classifier
# reports what the client wrote, lowercased).
ROUTER_TARGET_GUC = "pgrouter.target"
ROUTER_TARGET_VALUES = frozenset({"primary", "replica", "auto"})


@dataclass(frozen=True, slots=True)
class Verdict:
    target: Target
    reason: Reason
    kind: StatementKind = StatementKind.PLAIN


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """One statement of a message: its verdict and what its kind carries.

    ``text`` is the statement's own source (without leading comments or the trailing
    semicolon), so the session can replay a ``SET`` exactly as the client wrote it; ``value``
    is only a readable rendering (string constants unquoted, list items joined with ", ").
    """

    verdict: Verdict
    text: str
    name: str | None = None
    value: str | None = None
    read_only: bool | None = None


@dataclass(frozen=True, slots=True)
class Classification:
    """Everything routing knows about one Query or Parse message.

    verdict            combined over all statements (see the module docstring)
    statements         one entry per statement, in order; () when the message is empty; one
                       PLAIN entry holding the whole text when it cannot be parsed
    hint               the target named by a leading ``/* pgrouter: ... */`` hint, if any
    set_config_calls   (lowercased name, value, is_local) of every set_config() call, in
                       the order of the text; None for an argument that is not a constant
                       (``set_config_names`` and ``set_config_dynamic`` sum them up)
    fingerprint        pglast fingerprint of the whole text (comments and constants do not
                       change it); None when the text cannot be parsed or is empty
    pin_calls          lowercased names of the calls of session advisory-lock functions
                       (expressions.PIN_FUNCTIONS), in the order of the text
    """

    verdict: Verdict
    statements: tuple[StatementInfo, ...]
    hint: Target | None = None
    set_config_calls: tuple[tuple[str | None, str | None, bool | None], ...] = ()
    fingerprint: str | None = None
    pin_calls: tuple[str, ...] = ()

    @property
    def set_config_names(self) -> tuple[str, ...]:
        """The constant names passed to set_config(), sorted, without duplicates."""
        return tuple(sorted({name for name, _, _ in self.set_config_calls if name is not None}))

    @property
    def set_config_dynamic(self) -> bool:
        """Whether some set_config() call has a name that is not a constant."""
        return any(name is None for name, _, _ in self.set_config_calls)

    @property
    def kinds(self) -> tuple[StatementKind, ...]:
        return tuple(statement.verdict.kind for statement in self.statements)


def combine(statements: tuple[StatementInfo, ...]) -> Verdict:
    """The verdict of a whole message from those of its statements (at least one)."""
    decider = statements[0].verdict
    for statement in statements:
        if statement.verdict.target is Target.PRIMARY:
            decider = statement.verdict
            break
    if len(statements) == 1:
        return decider
    return Verdict(decider.target, decider.reason, StatementKind.MULTIPLE)
