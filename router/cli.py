"""The `pgrouter` command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import signal
import sys

from router.config import load_settings


def _run(args: argparse.Namespace) -> int:
    from router.app import Router
    from router.logs import setup_logging

    settings = load_settings(args.config)
    setup_logging(settings.log_level, settings.log_format, args.worker)
    worker = None
    if args.worker is None and settings.workers > 1:
        from router.workers.supervisor import supervise

        return supervise(args.config, settings)
    if args.worker is not None:  # started by the supervisor
        from pathlib import Path

        from router.workers.shares import WorkerSlot
        from router.workers.supervisor import die_with_supervisor

        die_with_supervisor()
        worker = WorkerSlot(
            args.worker, args.worker_count, Path(args.worker_dir), args.worker_port, settings.listen_port
        )
    configured = settings
    if worker is not None:
        settings = worker.settings_for(settings)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        uvloop = None

    async def main() -> None:
        router = Router(settings, worker)
        router.config_path = args.config
        router.configured_settings = configured
        await router.start()
        print(f"pgrouter listening on {settings.listen_host}:{router.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def reload() -> None:
            try:
                result = router.reload(load_settings(args.config))
            except Exception as exc:  # a bad file must not stop a running router
                logging.getLogger("pgrouter").error("reload failed, settings unchanged: %s", exc)
                return
            print(f"reloaded: {json.dumps(result)}", flush=True)

        loop.add_signal_handler(signal.SIGHUP, reload)
        await stop.wait()
        # Readiness off, no new connections, running transactions get shutdown_timeout.
        await router.drain(router.settings.shutdown_timeout)
        await router.stop()

    if uvloop is not None:
        uvloop.run(main())
    else:
        asyncio.run(main())
    return 0


def _hash_password(args: argparse.Namespace) -> int:
    from router.protocol.auth import md5_hash, scram_verifier

    password = args.password if args.password is not None else getpass.getpass("password: ")
    if args.method == "md5":
        if not args.user:
            print("md5 needs --user", file=sys.stderr)
            return 2
        print(md5_hash(args.user, password))
    else:
        print(scram_verifier(password))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = load_settings(args.config)
    except (ValidationError, OSError, ValueError) as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 1
    data = settings.model_dump(mode="json")
    for db in data["databases"].values():
        if db.get("server_password"):
            db["server_password"] = "********"
    print(json.dumps(data, indent=2))
    return 0


# Until Settings has registry fields, the registry commands take them from their own options,
# falling back to these variables. Keys only through the environment: argv is world-readable.
REGISTRY_ENV = {
    "redis_url": "PGROUTER_REDIS_URL",
    "secret_key": "PGROUTER_SECRET_KEY",  # the current key, "kid:base64key"
    "old_secret_keys": "PGROUTER_OLD_SECRET_KEYS",  # older keys, comma-separated "kid:base64key"
    "registry_prefix": "PGROUTER_REGISTRY_PREFIX",
}


def _registry_value(args: argparse.Namespace, settings: object, name: str) -> str | None:
    """An option, else the settings field of that name (once Settings has it), else the
    environment variable. Secrets and lists come back as plain "a,b" strings."""
    import os

    value = getattr(args, name, None)
    if value is None:
        value = getattr(settings, name, None)
    if value is None:
        value = os.environ.get(REGISTRY_ENV[name])
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return ",".join(_plain(item) for item in value) or None
    return _plain(value) or None


def _plain(value: object) -> str:
    reveal = getattr(value, "get_secret_value", None)  # pydantic SecretStr
    return reveal() if reveal is not None else str(value)


def _rotate_key(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from router.registry.crypto import Keyring, KeyringError
    from router.registry.errors import RegistryError
    from router.registry.store import RedisStore

    try:
        settings = load_settings(args.config) if args.config else None
        url = _registry_value(args, settings, "redis_url")
        current = _registry_value(args, settings, "secret_key")
        old = _registry_value(args, settings, "old_secret_keys")
        prefix = _registry_value(args, settings, "registry_prefix")
    except (ValidationError, OSError, ValueError) as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    if not url or not current:
        print(
            f"rotate-key needs the Redis URL (--redis-url or {REGISTRY_ENV['redis_url']}) and "
            f"the new current key ({REGISTRY_ENV['secret_key']}=kid:base64key)",
            file=sys.stderr,
        )
        return 2
    try:
        keyring = Keyring.from_specs(current, [k for k in (old or "").split(",") if k.strip()])
    except KeyringError as exc:
        print(f"invalid key: {exc}", file=sys.stderr)
        return 2

    async def rotate() -> int:
        store = RedisStore.from_url(url, keyring, prefix=prefix)
        try:
            return await store.rotate_keys(keyring)
        finally:
            await store.close()

    try:
        count = asyncio.run(rotate())
    except (RegistryError, ValueError) as exc:
        print(f"rotate-key failed: {exc}", file=sys.stderr)
        return 1
    print(f"re-encrypted {count} tenant records under key id {keyring.current_kid!r}")
    return 0


def _generate_key(args: argparse.Namespace) -> int:
    from router.registry.crypto import KeyringError, check_kid, generate_key

    try:
        check_kid(args.kid)
    except KeyringError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"{args.kid}:{generate_key()}")
    return 0


# --- pgrouter tenants: the admin API's /tenants over HTTP --------------------------------

ADMIN_URL = "http://127.0.0.1:8080"
ADMIN_TOKEN_ENV = (
    "PGROUTER_ADMIN_TOKEN"  # the token through the environment: argv is world-readable
)
ADMIN_TIMEOUT = 60.0  # seconds; a DELETE waits up to tenant_drop_timeout on the router


class _AdminError(Exception):
    """The admin API answered an error, or could not be reached."""


def _admin_call(args: argparse.Namespace, method: str, path: str, body: object = None) -> object:
    """One request to the admin API; the decoded JSON reply (None for an empty one)."""
    import os
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    token = args.token or os.environ.get(ADMIN_TOKEN_ENV)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise _AdminError(f"{exc.code} {exc.reason}: {_error_detail(exc.read())}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _AdminError(f"cannot reach the admin API at {args.url}: {reason}") from None
    return json.loads(raw) if raw else None


def _error_detail(raw: bytes) -> str:
    try:
        detail = json.loads(raw)["detail"]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace").strip() or "(no detail)"
    if isinstance(detail, list):  # 422: which fields, and what is wrong with them
        return "; ".join(
            ".".join(str(part) for part in item.get("loc", [])) + f": {item.get('msg', '')}"
            for item in detail
        )
    return str(detail)


def _tenant_path(tenant_id: str, suffix: str = "") -> str:
    from urllib.parse import quote

    return f"/tenants/{quote(tenant_id, safe='')}{suffix}"


def _address(text: str) -> dict[str, object]:
    """host:port (an IPv6 host in brackets) as the API's {"host", "port"}."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    return {"host": host.removeprefix("[").removesuffix("]"), "port": int(port)}


def _tenant_body(args: argparse.Namespace) -> dict[str, object]:
    body: dict[str, object] = {
        "tenant_id": args.id,
        "mode": args.mode,
        "database": args.database,
        "server_user": args.server_user,
        "cluster": {
            "primary": _address(args.primary),
            "replicas": [_address(r) for r in args.replica],
        },
        "users": [],
    }
    if args.server_password is not None:
        body["server_password"] = args.server_password
    if args.tenant_key is not None:
        body["tenant_key"] = args.tenant_key
    for spec in args.user:
        name, colon, password = spec.partition(":")
        if not colon or not name or not password:
            raise ValueError(f"--user {spec!r} is not name:password")
        body["users"].append({"name": name, "password": password})
    if args.provision or args.provision_role:
        body["provision"] = True
        body["provision_role"] = args.provision_role
    return body


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _node(address: dict) -> str:
    return f"{address['host']}:{address['port']}"


def _tenant_row(tenant: dict) -> list[str]:
    cluster = tenant["cluster"]
    return [
        tenant["tenant_id"],
        tenant["mode"],
        tenant["database"],
        _node(cluster["primary"]),
        ",".join(_node(r) for r in cluster["replicas"]) or "-",
        ",".join(u["name"] for u in tenant["users"]) or "-",
        "yes" if tenant["paused"] else "no",
        str(tenant["version"]),
    ]


TENANT_COLUMNS = ["ID", "MODE", "DATABASE", "PRIMARY", "REPLICAS", "USERS", "PAUSED", "VERSION"]


def _show_text(status: dict) -> str:
    tenant = status["tenant"]
    cluster = tenant["cluster"]
    pairs = [
        ("tenant", tenant["tenant_id"]),
        ("mode", tenant["mode"]),
        ("database", tenant["database"]),
        ("server user", tenant["server_user"]),
        ("server password", "set" if tenant["server_password"] else "not set"),
        ("primary", _node(cluster["primary"])),
        ("replicas", ", ".join(_node(r) for r in cluster["replicas"]) or "-"),
        ("users", ", ".join(f"{u['name']} ({u['auth']})" for u in tenant["users"]) or "-"),
        ("pool", f"{tenant['pool']['mode']}, size {tenant['pool']['size']}"),
        ("paused", "yes" if tenant["paused"] else "no"),
        ("version", str(tenant["version"])),
        ("updated", tenant["updated_at"]),
        (
            "clients here",
            ", ".join(f"{k} {v}" for k, v in status.get("clients", {}).items()) or "-",
        ),
    ]
    if tenant.get("tenant_key"):
        pairs.insert(2, ("tenant key", tenant["tenant_key"]))
    width = max(len(key) for key, _ in pairs)
    lines = [f"{key.ljust(width)}  {value}" for key, value in pairs]
    pools = status.get("pools") or {}
    if pools:
        lines += [
            "",
            _table(
                [
                    [name, *(str(s.get(k, "")) for k in ("servers", "active", "idle", "waiting"))]
                    for name, s in sorted(pools.items())
                ],
                ["POOL", "SERVERS", "ACTIVE", "IDLE", "WAITING"],
            ),
        ]
    return "\n".join(lines)


def _tenants(args: argparse.Namespace) -> int:
    try:
        if args.action == "add":
            reply = _admin_call(args, "POST", "/tenants", _tenant_body(args))
            text = f"created tenant {reply['tenant_id']} (version {reply['version']})"
        elif args.action == "list":
            reply = _admin_call(args, "GET", "/tenants")
            text = _table([_tenant_row(t) for t in reply], TENANT_COLUMNS)
        elif args.action == "show":
            reply = _admin_call(args, "GET", _tenant_path(args.id, "/status"))
            text = _show_text(reply)
        elif args.action == "rm":
            _admin_call(args, "DELETE", _tenant_path(args.id))
            reply = {"tenant_id": args.id, "deleted": True}
            text = f"deleted tenant {args.id}"
        else:  # pause, resume
            reply = _admin_call(args, "POST", _tenant_path(args.id, f"/{args.action}"))
            text = f"{args.action}d tenant {reply['tenant_id']} (version {reply['version']})"
    except ValueError as exc:  # a malformed option value
        print(f"pgrouter tenants {args.action}: {exc}", file=sys.stderr)
        return 2
    except _AdminError as exc:
        print(f"pgrouter tenants {args.action}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2) if args.json else text)
    return 0


def _add_tenants_parser(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=ADMIN_URL, help=f"admin API (default: {ADMIN_URL})")
    common.add_argument("--token", help=f"admin token (default: ${ADMIN_TOKEN_ENV})")
    common.add_argument("--json", action="store_true", help="print the API's JSON reply")
    tn = sub.add_parser("tenants", help="manage tenants through the admin API")
    actions = tn.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", parents=[common], help="register a tenant")
    add.add_argument("--id", required=True, help="tenant id (the database name clients use)")
    add.add_argument("--database", required=True, help="the real database on the cluster")
    add.add_argument("--server-user", required=True, help="the router's login there")
    add.add_argument("--server-password")
    add.add_argument("--primary", required=True, metavar="HOST:PORT")
    add.add_argument("--replica", action="append", default=[], metavar="HOST:PORT")
    add.add_argument("--mode", choices=["database", "shared"], default="database")
    add.add_argument("--tenant-key", metavar="UUID", help="app.current_tenant (shared mode)")
    add.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="NAME:PASSWORD",
        help="a client login (SCRAM-SHA-256); repeatable",
    )
    add.add_argument("--provision", action="store_true", help="create the database first")
    add.add_argument(
        "--provision-role", action="store_true", help="also create the server user's role"
    )
    actions.add_parser("list", parents=[common], help="list tenants")
    for action, text in [
        ("show", "a tenant's record and its clients and pools on that router"),
        ("rm", "delete a tenant (its clients are disconnected once idle)"),
        ("pause", "pause a tenant: new transactions wait"),
        ("resume", "resume a paused tenant"),
    ]:
        parser = actions.add_parser(action, parents=[common], help=text)
        parser.add_argument("id", help="tenant id")
    tn.set_defaults(func=_tenants)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgrouter", description="PostgreSQL connection router")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the router")
    run.add_argument("--config", "-c", help="TOML configuration file")
    # Given by the supervisor to the worker processes it starts (router/workers/).
    run.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-count", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-dir", help=argparse.SUPPRESS)
    run.add_argument("--worker-port", type=int, help=argparse.SUPPRESS)
    run.set_defaults(func=_run)
    hp = sub.add_parser("hash-password", help="print the stored form of a client password")
    hp.add_argument("--method", choices=["scram-sha-256", "md5"], default="scram-sha-256")
    hp.add_argument("--user", help="user name (md5 only)")
    hp.add_argument("password", nargs="?")
    hp.set_defaults(func=_hash_password)
    cc = sub.add_parser("check-config", help="validate a configuration file and print it")
    cc.add_argument("config")
    cc.set_defaults(func=_check_config)
    rk = sub.add_parser(
        "rotate-key",
        help="re-encrypt every tenant's server_password under the current key",
        description="Re-encrypts the registry's server passwords under the current key "
        f"({REGISTRY_ENV['secret_key']}); the old keys ({REGISTRY_ENV['old_secret_keys']}) "
        "must still be given so the records can be read. Prints how many were re-encrypted.",
    )
    rk.add_argument("--config", "-c", help="TOML configuration file")
    rk.add_argument("--redis-url", help=f"registry URL (default: {REGISTRY_ENV['redis_url']})")
    rk.add_argument(
        "--prefix", dest="registry_prefix", help="registry key prefix (default: pgrouter:)"
    )
    rk.set_defaults(func=_rotate_key)
    gk = sub.add_parser("generate-key", help="print a new registry key as kid:base64key")
    gk.add_argument("kid", help="key id, 1-64 characters of [A-Za-z0-9_.-]")
    gk.set_defaults(func=_generate_key)
    _add_tenants_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
