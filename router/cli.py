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
    setup_logging(settings.log_level, settings.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        uvloop = None

    async def main() -> None:
        router = Router(settings)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgrouter", description="PostgreSQL connection router")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the router")
    run.add_argument("--config", "-c", help="TOML configuration file")
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
