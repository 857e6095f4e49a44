"""Each worker's control socket: a Unix socket in the supervisor's runtime directory, through
which the workers reach one another.

One request per connection: a command byte, its payload, end of stream; the reply (if any) is
everything the worker writes back before it closes.

    C + CancelRequest (16 bytes, as the client sent it)   a cancel for a key this worker issued
    M                                                      reply: this worker's /metrics text
    R                                                      re-read the settings file; reply: JSON
    P + tenant id                                          pause the tenant here (a move drains
                                                           it); reply: its transactions running
    Q [+ tenant id]                                        reply: this worker's query statistics
                                                           (JSON, every entry, exact seconds)
    S + tenant id                                          reply: the tenant's clients, pools and
                                                           nodes here (JSON, TenantManager.status)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import generate_latest

from router.protocol.errors import ProtocolError
from router.protocol.startup import CancelRequest, build_cancel_request, parse_startup_packet
from router.workers.shares import WorkerSlot

if TYPE_CHECKING:
    from router.app import Router

log = logging.getLogger("pgrouter.workers")

CANCEL = b"C"
METRICS = b"M"
RELOAD = b"R"
PAUSE = b"P"
QUERIES = b"Q"
STATUS = b"S"
CONSOLE = b"K"  # an admin console table of what each worker holds (SHOW POOLS, ...; TRAFFIC, LISTS)
# The console's PAUSE, RESUME, KILL, DISABLE, ENABLE, RECONNECT, WAIT_CLOSE: "VERB name",
# answered with Router.database_command's count.
DB_COMMAND = b"B"
# A sibling is a local process: anything slower than this is stuck, and a scrape or a cancel
# should not wait on it.
REQUEST_TIMEOUT = 2.0
DATABASE_VERBS = frozenset({"PAUSE", "RESUME", "KILL", "KILL_CLIENT", "DISABLE", "ENABLE", "RECONNECT", "WAIT_CLOSE"})
MAX_REQUEST = 128  # bytes; the largest request is a command byte and a tenant id (63 bytes)


class ControlServer:
    """The worker's end: answers its siblings. ``start()``/``stop()`` by the Router."""

    def __init__(self, router: Router, slot: WorkerSlot) -> None:
        from router.admin.metrics import metrics_registry

        self.router = router
        self.slot = slot
        self.path = slot.control_socket(slot.index)
        self.registry = metrics_registry(
            router, max_tenant_labels=router.settings.metrics_max_tenant_labels
        )
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a worker of this index that died
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await reader.read(MAX_REQUEST + 1)
                while len(request) <= MAX_REQUEST and (more := await reader.read(MAX_REQUEST)):
                    request += more
                if request[:1] == CANCEL:
                    reply = await self._cancel(request[1:])
                else:
                    reply = self._answer(request)
                if reply:
                    writer.write(reply)
                    await writer.drain()
        except (OSError, TimeoutError, ProtocolError, UnicodeDecodeError) as exc:
            log.warning("control socket: request failed: %s", exc)
        finally:
            writer.close()

    async def _cancel(self, payload: bytes) -> bytes:
        """A sibling's CancelRequest; answered (empty) once the server has it, so that the
        client's cancel connection closes only then, as PostgreSQL's does."""
        packet = parse_startup_packet(payload)
        if not isinstance(packet, CancelRequest):
            raise ProtocolError("control socket: C needs a CancelRequest")
        delivered = self.router.cancel(packet.process_id, packet.secret_key, from_sibling=True)
        if delivered is not None:
            await asyncio.shield(delivered)
        return b""

    def _answer(self, request: bytes) -> bytes:
        command, payload = request[:1], request[1:]
        if command == METRICS and not payload:
            return generate_latest(self.registry)
        if command == RELOAD and not payload:
            return json.dumps(self.router.reload_file()).encode()
        if command == PAUSE and payload:
            tenant_id = payload.decode()
            tenants = self.router.tenants
            tenants.pause(tenant_id)  # at once: the registry's own message may still be on its way
            return str(tenants.in_flight(tenant_id)).encode()
        if command == QUERIES:
            stats = self.router.query_stats
            if stats is None:
                return json.dumps({"evicted": 0, "slow_queries": 0, "queries": []}).encode()
            entries = stats.top(tenant=payload.decode() or None)
            return json.dumps(
                {
                    "evicted": stats.evicted,
                    "slow_queries": stats.slow_queries,
                    "queries": [dataclasses.asdict(entry) for entry in entries],
                }
            ).encode()
        if command == STATUS:  # a tenant's, or (no payload) the whole router's
            status = self.router.tenants.status(payload.decode()) if payload else self.router.status()
            return json.dumps(status).encode()
        if command == DB_COMMAND:
            verb, _, name = payload.decode().partition(" ")
            if verb not in DATABASE_VERBS:
                raise ProtocolError(f"control socket: no database command {verb[:20]!r}")
            return str(self.router.database_command(verb, name)).encode()
        if command == CONSOLE:
            from router.admin.console import PER_WORKER, SUMMED, worker_rows

            name = payload.decode()
            if name not in PER_WORKER and name not in SUMMED:
                raise ProtocolError(f"control socket: no console table {name[:20]!r}")
            columns, rows = worker_rows(self.router, name)
            return json.dumps({"columns": columns, "rows": rows}, default=str).encode()
        raise ProtocolError(f"control socket: unknown request {request[:8]!r}")


async def request(path: Path, payload: bytes, timeout: float = REQUEST_TIMEOUT) -> bytes:
    """Send one request to a worker's control socket; its reply."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            return await reader.read()
        finally:
            writer.close()


async def forward_cancel(slot: WorkerSlot, owner: int, pid: int, key: int) -> None:
    """Hand a CancelRequest to the worker that issued its key."""
    try:
        await request(slot.control_socket(owner), CANCEL + build_cancel_request(pid, key))
    except (OSError, TimeoutError) as exc:
        log.warning("could not forward a CancelRequest to worker %d: %s", owner, exc)


async def sibling_metrics(slot: WorkerSlot) -> list[str | None]:
    """Every other worker's /metrics text, by worker index (None: it did not answer)."""

    async def one(index: int) -> str | None:
        try:
            return (await request(slot.control_socket(index), METRICS)).decode()
        except (OSError, TimeoutError) as exc:
            log.warning("worker %d did not answer a metrics request: %s", index, exc)
            return None

    others = [i for i in range(slot.count) if i != slot.index]
    return list(await asyncio.gather(*(one(i) for i in others)))


async def reload_siblings(slot: WorkerSlot) -> dict[int, dict]:
    """Ask every other worker to re-read the settings file; their answers by index."""

    async def one(index: int) -> dict:
        try:
            return json.loads(await request(slot.control_socket(index), RELOAD))
        except (OSError, TimeoutError, ValueError) as exc:
            return {"error": f"worker {index} did not reload: {exc}"}

    others = [i for i in range(slot.count) if i != slot.index]
    answers = await asyncio.gather(*(one(i) for i in others))
    return dict(zip(others, answers, strict=True))


async def pause_siblings(slot: WorkerSlot, tenant_id: str) -> int:
    """Pause ``tenant_id`` in every other worker; how many of its transactions still run there
    (a worker that does not answer counts as busy: a move must not go ahead on a guess)."""

    async def one(index: int) -> int:
        try:
            return int(await request(slot.control_socket(index), PAUSE + tenant_id.encode()))
        except (OSError, TimeoutError, ValueError) as exc:
            log.warning("worker %d did not answer a pause request: %s", index, exc)
            return 1

    others = [i for i in range(slot.count) if i != slot.index]
    return sum(await asyncio.gather(*(one(i) for i in others)))


async def sibling_queries(slot: WorkerSlot, tenant_id: str | None) -> list[dict | None]:
    """Every other worker's query statistics (``tenant_id``'s only, if given), as sent by
    ``QUERIES``; None for a worker that did not answer."""

    async def one(index: int) -> dict | None:
        try:
            return json.loads(await request(slot.control_socket(index), QUERIES + (tenant_id or "").encode()))
        except (OSError, TimeoutError, ValueError) as exc:
            log.warning("worker %d did not answer a query statistics request: %s", index, exc)
            return None

    others = [i for i in range(slot.count) if i != slot.index]
    return list(await asyncio.gather(*(one(i) for i in others)))


async def sibling_statuses(slot: WorkerSlot, tenant_id: str) -> list[dict | None]:
    """Every other worker's view of a tenant (TenantManager.status), or with an empty
    ``tenant_id`` of the whole router (Router.status); None: no answer."""

    async def one(index: int) -> dict | None:
        try:
            return json.loads(await request(slot.control_socket(index), STATUS + tenant_id.encode()))
        except (OSError, TimeoutError, ValueError) as exc:
            log.warning("worker %d did not answer a tenant status request: %s", index, exc)
            return None

    others = [i for i in range(slot.count) if i != slot.index]
    return list(await asyncio.gather(*(one(i) for i in others)))


async def sibling_console_rows(slot: WorkerSlot, command: str) -> dict[int, list | None]:
    """Every other worker's rows of an admin console table (console.PER_WORKER), by worker
    index; None: no answer."""

    async def one(index: int) -> list | None:
        try:
            return json.loads(await request(slot.control_socket(index), CONSOLE + command.encode()))["rows"]
        except (OSError, TimeoutError, ValueError, KeyError) as exc:
            log.warning("worker %d did not answer a console request: %s", index, exc)
            return None

    others = [i for i in range(slot.count) if i != slot.index]
    return dict(zip(others, await asyncio.gather(*(one(i) for i in others)), strict=True))


async def sibling_database_command(slot: WorkerSlot, verb: str, name: str) -> list[int]:
    """A console database command (Router.database_command) in every other worker; their
    counts (a worker that does not answer counts 1)."""

    async def one(index: int) -> int:
        try:
            return int(await request(slot.control_socket(index), DB_COMMAND + f"{verb} {name}".encode()))
        except (OSError, TimeoutError, ValueError) as exc:
            log.warning("worker %d did not answer a database %s request: %s", index, verb, exc)
            return 1

    others = [i for i in range(slot.count) if i != slot.index]
    return list(await asyncio.gather(*(one(i) for i in others)))
