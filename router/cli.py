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

    settings = load_settings(args.config)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
        await stop.wait()
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
