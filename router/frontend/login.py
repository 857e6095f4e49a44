"""The slow path of a client connection: startup packets, TLS upgrade and authentication,
read as whole packets by a coroutine (``ClientConnection`` feeds it from ``data_received``
until login is over and the forwarding hot path takes over)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import struct
import time

from router.admin.console import CONSOLE_DATABASE, ConsoleSession
from router.config import AuthMethod, ClientTLS, PoolMode, address_allowed
from router.protocol import messages as m
from router.protocol.auth import (
    SCRAM_SHA_256,
    AuthFailed,
    ScramServerExchange,
    ScramVerifier,
    md5_check,
)
from router.protocol.errors import ProtocolError, RouterError, SQLState
from router.protocol.startup import (
    MAX_STARTUP_PACKET,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_startup_packet,
    startup_packet_length,
)
from router.routing.expressions import parse_bool
from router.session import (
    IDENTITY_SETTINGS,
    STARTUP_IDENTITY_PIN,
    SessionSettings,
    startup_read_only,
)

log = logging.getLogger("pgrouter.client")

_unpack_len = struct.Struct("!I").unpack_from

# Connection states shared with router/frontend/client.py.
STARTUP, READY, CLOSED = 0, 1, 2


class LoginMixin:
    """Startup and authentication for ``ClientConnection`` (which provides the state)."""

    # --- slow path: startup and authentication ---------------------------------------

    async def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def _read_startup_packet(self):
        head = await self._read_exact(4)
        length = startup_packet_length(head)
        assert length is not None and length <= MAX_STARTUP_PACKET
        return parse_startup_packet(head + await self._read_exact(length - 4))

    async def _read_message(self, expected: bytes) -> bytes:
        head = await self._read_exact(5)
        length = _unpack_len(head, 1)[0]
        if head[:1] != expected:
            raise ProtocolError(f"expected message {expected!r}, received {head[:1]!r}")
        if length < 4 or length > MAX_STARTUP_PACKET:
            raise ProtocolError(f"invalid message length {length} during authentication")
        return await self._read_exact(length - 4)

    def _login_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, RouterError):
            self.fail(exc)
        elif isinstance(exc, TimeoutError):
            log.warning("client %s: client_login_timeout expired during login; closing", self.peer)
            self.fail(
                RouterError(
                    SQLState.PROTOCOL_VIOLATION,
                    f"client_login_timeout ({self.settings.client_login_timeout:g}s) expired during login",
                ),
                logged=True,
            )
        elif isinstance(exc, ConnectionError):
            pass
        else:
            log.error("client %s: login failed", self.peer, exc_info=exc)
            self.fail(RouterError(SQLState.INTERNAL_ERROR, "internal error during login"))

    async def _login(self) -> None:
        async with asyncio.timeout(self.settings.client_login_timeout):
            startup = await self._negotiate()
            if startup is None:
                return
            await self._authenticate(startup)
        await self._finish_login()

    async def _negotiate(self) -> StartupMessage | None:
        """Read startup-phase packets until a StartupMessage (SSL/GSS requests first)."""
        tls_mode = self.settings.client_tls
        asked_ssl = False
        while True:
            packet = await self._read_startup_packet()
            if isinstance(packet, CancelRequest):
                delivered = self.router.cancel(packet.process_id, packet.secret_key)
                if delivered is not None:
                    # As PostgreSQL, close only once the server has the cancel: libpq and
                    # asyncpg wait for the close before their next statement, which a late
                    # cancel would otherwise hit. (Shielded: the cancel outlives this task.)
                    await asyncio.shield(delivered)
                self.state = CLOSED
                self.transport.close()
                return None
            if isinstance(packet, GSSENCRequest):
                self.transport.write(b"N")
                continue
            if isinstance(packet, SSLRequest):
                if asked_ssl or self.tls:
                    raise ProtocolError("SSLRequest sent twice")
                asked_ssl = True
                ctx = self.router.client_tls_context
                if tls_mode is ClientTLS.DISABLE or ctx is None or self.local:
                    # As PostgreSQL: no TLS over a Unix socket.
                    self.transport.write(b"N")
                    continue
                if self._buf:
                    # CVE-2021-23214: bytes sent before the TLS handshake must not be trusted.
                    raise ProtocolError("received unencrypted data after SSL request")
                self.transport.write(b"S")
                loop = asyncio.get_running_loop()
                self.transport = await loop.start_tls(self.transport, self, ctx, server_side=True)
                self.tls = True
                ssl_object = self.transport.get_extra_info("ssl_object")
                if ssl_object is not None:
                    self.tls_server_name = self.router.sni_names.pop(ssl_object, None)
                continue
            assert isinstance(packet, StartupMessage)
            if tls_mode is ClientTLS.REQUIRE and not self.tls and not self.local:
                raise RouterError(
                    SQLState.INVALID_AUTHORIZATION,
                    "TLS is required: connect with sslmode=require (client_tls = require)",
                )
            if packet.minor > 0 or packet.protocol_options:
                # 55.2.1: answer with the newest minor version we speak and the options we
                # did not recognise, then carry on in 3.0.
                self.transport.write(m.negotiate_protocol_version(0, packet.protocol_options))
            return packet

    async def _authenticate(self, startup: StartupMessage) -> None:
        self.user = startup.user
        self.database = startup.database
        self.startup_params = {
            k: v for k, v in startup.params.items() if k not in ("user", "database") and not k.startswith("_pq_.")
        }
        if not self.user:
            raise RouterError(SQLState.INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet")
        replication = self.startup_params.get("replication")
        if replication is not None and parse_bool(replication) is not False:
            # A walsender speaks its own commands (IDENTIFY_SYSTEM, START_REPLICATION) over
            # one backend for the whole session: not something a pooled connection can be.
            raise RouterError(
                SQLState.FEATURE_NOT_SUPPORTED,
                "replication connections are not supported by pgrouter",
                hint="Connect to the PostgreSQL server directly for replication.",
            )
        if not self.router.admit_client(self):
            raise RouterError(
                SQLState.TOO_MANY_CONNECTIONS,
                f"sorry, too many clients already (max_client_conn {self.settings.max_client_conn})",
            )
        failed = RouterError(
            SQLState.INVALID_PASSWORD, f'password authentication failed for user "{self.user}"'
        )
        tenants = self.router.tenants
        allowed_cidrs = None  # a settings-file login's own (a tenant's are its limits')
        # The admin console: only for the file's logins named in admin_console_users; anyone
        # else asking for that database name is an ordinary client.
        self.console = self.database == CONSOLE_DATABASE and self.user in self.settings.admin_console_users
        if not self.console and tenants.wants_registry(self):
            # A registered tenant's own logins (router/tenants.py). An unknown tenant goes
            # through the same exchange as a wrong password, then gets 3D000.
            login = await tenants.login(self)
            self.tenant_login = login
            secret = login.secret if login.known else None
            method = login.auth if login.known else AuthMethod.SCRAM
            if login.tenant is None:
                failed = RouterError(
                    SQLState.INVALID_CATALOG_NAME,
                    f'tenant or database "{self.database}" does not exist',
                )
        else:
            user = self.settings.users.get(self.user)
            method = user.auth if user is not None else AuthMethod.SCRAM
            secret = user.password if user is not None else None
            if user is not None and user.allowed_cidrs:
                allowed_cidrs = user.allowed_cidrs
        if method is AuthMethod.TRUST:
            pass
        elif method is AuthMethod.MD5:
            salt = os.urandom(4)
            self.transport.write(m.auth_md5(salt))
            response = m.parse_password_message(await self._read_message(b"p"))
            if not md5_check(secret, salt, response):
                raise failed
        else:
            # Unknown users go through the same exchange against a dummy verifier, so the
            # answer takes as long and says the same as a wrong password.
            verifier = ScramVerifier.parse(secret) if secret is not None else None
            exchange = ScramServerExchange(verifier)
            self.transport.write(m.auth_sasl([SCRAM_SHA_256]))
            mechanism, client_first = m.parse_sasl_initial_response(await self._read_message(b"p"))
            if mechanism != SCRAM_SHA_256:
                raise ProtocolError(f"client selected an invalid SASL mechanism {mechanism!r}")
            self.transport.write(m.auth_sasl_continue(exchange.first(client_first)))
            client_final = await self._read_message(b"p")
            try:
                server_final = exchange.final(client_final)
            except AuthFailed as exc:
                raise failed from exc
            if self.tenant_login is not None and self.tenant_login.tenant.auth_query:
                # Log into the server as this user with the keys the client just proved.
                self.scram_keys = (exchange.client_key(client_final), verifier.server_key)
            self.transport.write(m.auth_sasl_final(server_final))
        if allowed_cidrs and not address_allowed(allowed_cidrs, self._peer_host()):
            # As pg_hba.conf would refuse it, but only once the login is proven.
            raise RouterError(
                SQLState.INVALID_AUTHORIZATION,
                f'host "{self._peer_host() or "local"}" is not in user "{self.user}"\'s allowed_cidrs',
            )
        if self.tenant_login is not None:
            if self.tenant_login.tenant is None:
                raise failed  # trust cannot reach here for an unknown tenant; kept for safety
            self.tenant = self.tenant_login.tenant
            self.user = self.tenant_login.user
            host = self._peer_host()
            if not self.tenant.limits.allows(host):
                # As pg_hba.conf would refuse it, but only once the login is proven: an
                # address outside the list learns nothing of tenants or users.
                raise RouterError(
                    SQLState.INVALID_AUTHORIZATION,
                    f'host "{host or "local"}" is not in tenant "{self.tenant.tenant_id}"\'s allowed_cidrs',
                )
        # AuthenticationOk goes out with the ParameterStatus block (_finish_login): one write
        # and one wakeup of the client instead of two, per connection.

    def _peer_host(self) -> str | None:
        """The client's IP address; None over a Unix socket."""
        peer = self.transport.get_extra_info("peername")
        return peer[0] if isinstance(peer, tuple) else None

    def _start_console(self) -> None:
        """Hand the connection to an admin console session (no pool, no tenant): it takes over
        the transport and answers every Query itself. Its cancel key is nobody's."""
        if self.state == CLOSED:
            return
        self.state = CLOSED  # this object no longer sees the connection
        self.cancel_pid, self.cancel_key = 0, secrets.randbits(32)
        log.info("admin console: %s@%s logged in", self.user, self.peer)
        rest = bytes(self._buf)
        self._buf.clear()
        ConsoleSession(self.router, self, self.transport).start(rest)

    async def _session_start(self) -> bytes:
        """Set the client up for its database; returns AuthenticationOk, the ParameterStatus
        block, BackendKeyData and ReadyForQuery, to go out in one write."""
        await self.router.prepare_tenant(self)
        target = self.router.resolve_database(self)  # raises 3D000 for an unknown database
        self.pool_mode = target.pool_mode
        self.rewrite_statements = self.pool_mode is PoolMode.TRANSACTION
        self.session_mode = self.pool_mode is PoolMode.SESSION
        self.session = SessionSettings(self.startup_params)
        if self.tenant is not None:
            tenant_sql = self.router.tenants.tenant_setting_sql(self.tenant)
            if tenant_sql is not None:
                # Shared schema: the tenant's key rides on every server connection it uses,
                # and the client may not change it (ClientConnection._tenant_guard_refuses).
                self.session.pin(self.settings.tenant_setting.lower(), tenant_sql)
                self.tenant_guard = self.settings.tenant_setting.lower().encode()
        if self.rewrite_statements and not self.session.startup_values.keys().isdisjoint(IDENTITY_SETTINGS):
            self.startup_identity = True
            self.pins.add(STARTUP_IDENTITY_PIN)
            self.router.note_pinned(self)
        self.pool = target.pool
        self.db_route = target.route
        self.startup_read_only = startup_read_only(self.startup_params)
        self.read_only_session = self.startup_read_only
        status = await self.pool.login_parameter_status(
            self.startup_params.get("application_name"),
            {name: value for name, value in self.session.startup_values.items() if name != "application_name"},
        )
        # SHOW STATS figures go to the database as the client names it (PgBouncer's rows):
        # a [databases] entry (for "*", the name asked for), or a registry tenant. Only once
        # the server took the login: a name it refuses makes no row.
        self.traffic = self.router.pools.traffic_for(self.tenant.tenant_id if self.tenant is not None else self.database)
        self.function_catalog = self.router.function_catalog(self, target)
        self.cancel_pid, self.cancel_key = self.router.register_client(self)
        out = bytearray(m.auth_ok())
        out += status
        out += m.backend_key_data(self.cancel_pid, self.cancel_key)
        out += m.ready_for_query(m.IDLE)
        return bytes(out)

    async def _finish_login(self) -> None:
        if self.console:
            self._start_console()
            return
        try:
            greeting = await self._session_start()
        except BaseException:
            # What PostgreSQL sends after authentication too: AuthenticationOk, then the
            # error (an unknown database, a tenant that cannot start).
            if self.state != CLOSED and not self.transport.is_closing():
                self.transport.write(m.auth_ok())
            raise
        if self.state == CLOSED:
            return
        self.transport.write(greeting)
        self.state = READY
        self.logged_in_at = time.monotonic()
        if self.router.settings.log_connections:
            log.info(
                "client %s@%s/%s logged in: tenant %s, %s, %s pooling",
                self.user, self.peer, self.database, self.tenant.tenant_id if self.tenant is not None else "-",
                "TLS" if self.tls else "no TLS", self.pool_mode,
            )  # fmt: skip
        else:
            log.debug("client %s@%s/%s logged in", self.user, self.peer, self.database)
        rest = bytes(self._buf)
        self._buf.clear()
        if rest:
            self.data_received(rest)
