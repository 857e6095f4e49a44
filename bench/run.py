"""pgbench against PostgreSQL directly, through PgBouncer and through pgrouter, interleaved.

    .venv/bin/python -m bench.run [--rounds 3] [--duration 15] [--clients 32] [--pool-size 8]

Starts its own cluster (tests.cluster), PgBouncer and `pgrouter run`, prints a table of
medians and ranges, writes every run to bench/results/<timestamp>.json, and stops all of it
on the way out, Ctrl-C included. See bench/README.md for how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.pgbench import WORKLOADS, Run, Target, describe, run_pgbench
from bench.pgbouncer import PGBOUNCER, PgBouncer
from bench.report import print_table, summarize
from tests.cluster import HOST, Cluster, free_port
from tests.harness import RouterProcess, write_toml

RESULTS_DIR = Path(__file__).parent / "results"


class FloorProcess:
    """bench/floor.py as a subprocess on a free port."""

    def __init__(self, log: Path) -> None:
        self.log, self.port = log, free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, server_port: int, timeout: float = 15.0) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "bench.floor", str(self.port), str(server_port)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while b"listening" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bench.floor did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def router_process(workdir: Path, cluster: Cluster, pool_size: int, split: bool,
                   workers: int = 1, replica_affinity: str = "transaction") -> RouterProcess:
    """`pgrouter run` configured like PgBouncer: one transaction pool as postgres; with
    ``split``, read/write splitting over the cluster's replicas too (a pool per node, the
    cluster's ``replica_affinity``); with ``workers`` > 1, that many processes sharing the
    port and the pool size."""
    replicas = [{"host": HOST, "port": r.port} for r in cluster.replicas] if split else []
    config = {
        "listen_host": HOST,
        "listen_port": 0,
        "pool_mode": "transaction",
        "pool_size": pool_size,
        "max_client_conn": 500,
        "admin_port": -1,
        "clusters": {"bench": {"primary": {"host": HOST, "port": cluster.primary.port},
                               "replicas": replicas, "replica_affinity": replica_affinity}},
        "databases": {"app": {"cluster": "bench", "server_user": "postgres"}},
        "users": {"bench": {"auth": "trust"}},
    }
    name = "router-split" if split else "router"
    if workers > 1:
        config["workers"] = workers
        name += f"-x{workers}"
    return RouterProcess(write_toml(workdir / f"{name}.toml", config))


def environment(cluster: Cluster) -> dict:
    """What the numbers depend on, so two result files can be compared fairly."""

    def out(*cmd) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()

    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_before": os.getloadavg(),
            "pgbench": out(cluster.bindir / "pgbench", "--version"),
            "pgbouncer": out(PGBOUNCER, "--version").split("\n")[0],
            "git": out("git", "-C", Path(__file__).parent, "describe", "--always", "--dirty")}


def run_rounds(cluster: Cluster, targets: list[Target], args) -> tuple[list[Run], bool]:
    """Every workload on every target, round after round; stops early on Ctrl-C."""
    runs: list[Run] = []
    workloads = [w for w in WORKLOADS if w.name in args.workloads]
    try:
        # Interleaved: a drift of the machine over time (thermal, neighbours, autovacuum)
        # lands on all three targets alike instead of on whichever ran last.
        for rnd in range(1, args.rounds + 1):
            for workload in workloads:
                for target in targets:
                    run = run_pgbench(cluster, target, workload, rnd=rnd, clients=args.clients,
                                      duration=args.duration)
                    runs.append(run)
                    print(f"[{rnd}/{args.rounds}] {workload.name:<16} {target.name:<9} "
                          f"{describe(run)}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted: reporting the runs finished so far", file=sys.stderr)
        return runs, True
    return runs, False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="repetitions of every run (default 3)")
    p.add_argument("--duration", type=int, default=15, help="pgbench -T seconds (default 15)")
    p.add_argument("--clients", type=int, default=32,
                   help="pgbench -c of the throughput workloads (default 32)")
    p.add_argument("--pool-size", type=int, default=8,
                   help="server connections of each proxy's pool (default 8)")
    # Scale 10 (~160 MB, ~3 s to build): select-only spreads over 1M rows, not one hot page.
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument("--replicas", type=int, default=2,
                   help="standbys in the cluster, used by router-split (default 2; 0 drops "
                   "the router-split target)")
    p.add_argument("--workloads", help="comma-separated subset (default: all)")
    p.add_argument("--floor", action="store_true",
                   help="add the floor target: a bare Python/uvloop byte pipe (bench/floor.py)")
    p.add_argument("--workers", type=int, default=1,
                   help="router processes (`workers`) of both router targets (default 1)")
    p.add_argument("--replica-affinity", choices=["transaction", "session"], default="transaction",
                   help="replica_affinity of the router-split target's cluster (default transaction)")
    args = p.parse_args(argv)
    names = [w.name for w in WORKLOADS]
    args.workloads = args.workloads.split(",") if args.workloads else names
    if unknown := set(args.workloads) - set(names):
        p.error(f"unknown workloads {sorted(unknown)}; choose from {names}")
    return args


def _exit_on_sigterm(signum, _frame) -> None:
    # Installed before Cluster.start(), which then keeps it: a `kill` unwinds through our
    # cleanup (router, PgBouncer and cluster) instead of only the cluster's own handler.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="pgrouter-bench-"))
    try:
        # Each stop is registered before its start, so a half-started piece is stopped too;
        # ExitStack runs them all, in reverse, even when one of them raises.
        with contextlib.ExitStack() as stack:
            cluster = Cluster(workdir / "cluster", replicas=args.replicas, redis=False,
                              ssl=False, pgbench_scale=args.scale)
            stack.callback(cluster.stop)
            started = time.monotonic()
            cluster.start()
            print(f"cluster (pgbench scale {args.scale}) ready in "
                  f"{time.monotonic() - started:.1f}s in {workdir}", file=sys.stderr)
            bouncer = PgBouncer(workdir / "pgbouncer", args.pool_size)
            stack.callback(bouncer.stop)
            bouncer.start(cluster.primary.port)
            router = router_process(workdir, cluster, args.pool_size, split=False, workers=args.workers)
            stack.callback(router.stop)
            router.start()
            targets = [Target("direct", cluster.primary.port, "postgres"),
                       Target("pgbouncer", bouncer.port, "bench", bouncer.log),
                       Target("router", router.port, "bench", router.log_path)]
            if cluster.replicas:
                split = router_process(workdir, cluster, args.pool_size, split=True, workers=args.workers,
                                       replica_affinity=args.replica_affinity)
                stack.callback(split.stop)
                split.start()
                targets.append(Target("router-split", split.port, "bench", split.log_path))
            if args.floor:
                floor = FloorProcess(workdir / "floor.log")
                stack.callback(floor.stop)
                floor.start(cluster.primary.port)
                targets.append(Target("floor", floor.port, "postgres", floor.log))
            env = environment(cluster)
            runs, interrupted = run_rounds(cluster, targets, args)
    except BaseException:
        # Keep the logs and configurations to read, not ~160 MB of data directories.
        for version_file in workdir.glob("cluster/*/PG_VERSION"):
            shutil.rmtree(version_file.parent, ignore_errors=True)
        print(f"logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)

    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "environment": env,
                               "interrupted": interrupted,
                               "summary": {f"{w} / {t}": cell
                                           for (w, t), cell in summarize(runs).items()},
                               "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    print()
    print_table(runs)
    print(f"\nraw results: {out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
