"""Typed errors of the router, each carrying a PostgreSQL SQLSTATE.

A client-facing failure anywhere in the router is raised as ``RouterError`` and turned into
an ErrorResponse in exactly one place (the frontend). ``ProtocolError`` is what the sans-I/O
parsers raise on bytes that do not follow the protocol; it is a ``RouterError`` with SQLSTATE
08P01 (protocol_violation) so the frontend can report it the same way.

SQLSTATE values come from Appendix A of the PostgreSQL documentation.
"""

from __future__ import annotations


class SQLState:
    """The SQLSTATE codes the router itself emits (PostgreSQL docs, Appendix A)."""

    CONNECTION_FAILURE = "08006"
    CONNECTION_EXCEPTION = "08000"
    SQLCLIENT_UNABLE_TO_ESTABLISH = "08001"
    PROTOCOL_VIOLATION = "08P01"
    FEATURE_NOT_SUPPORTED = "0A000"
    INVALID_AUTHORIZATION = "28000"
    INVALID_PASSWORD = "28P01"
    INVALID_CATALOG_NAME = "3D000"
    INSUFFICIENT_PRIVILEGE = "42501"
    CONFIGURATION_LIMIT_EXCEEDED = "53400"
    TOO_MANY_CONNECTIONS = "53300"
    PROGRAM_LIMIT_EXCEEDED = "54000"
    QUERY_CANCELED = "57014"
    ADMIN_SHUTDOWN = "57P01"
    CANNOT_CONNECT_NOW = "57P03"
    IDLE_SESSION_TIMEOUT = "57P05"
    INVALID_PARAMETER_VALUE = "22023"
    UNDEFINED_OBJECT = "42704"
    INTERNAL_ERROR = "XX000"
    READ_ONLY_TRANSACTION = "25006"
    IN_FAILED_SQL_TRANSACTION = "25P02"
    IDLE_IN_TRANSACTION_SESSION_TIMEOUT = "25P03"
    SUCCESSFUL_COMPLETION = "00000"
    SYNTAX_ERROR = "42601"
    OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
    CONFIG_FILE_ERROR = "F0000"


class RouterError(Exception):
    """A failure to report to the client as an ErrorResponse."""

    def __init__(
        self,
        sqlstate: str,
        message: str,
        *,
        severity: str = "FATAL",
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity
        self.detail = detail
        self.hint = hint

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sqlstate!r}, {self.message!r})"


class ProtocolError(RouterError):
    """Bytes that do not follow protocol 3.0; the connection cannot continue."""

    def __init__(self, message: str, *, sqlstate: str = SQLState.PROTOCOL_VIOLATION) -> None:
        super().__init__(sqlstate, message, severity="FATAL")
