"""Where the CPU goes per transaction: the proxy, PostgreSQL, pgbench, and what stays idle.

    .venv/bin/python -m bench.cpu [--rounds 3] [--duration 6] [--clients 32] [--workers 2] [--split] [--floor]

TPS alone does not say why a proxy is slower. This runs `pgbench -S -M simple` against
PostgreSQL directly, PgBouncer and the router (and, with --workers N, the router with
`workers = N`; with --split, the router splitting reads over two replicas; with --floor,
bench/floor.py, the bare Python/uvloop byte pipe), interleaved as `bench.run` does, and reads
the kernel's accounting around each run: the proxy's user and system CPU (its worker processes included) from /proc/PID/stat,
every PostgreSQL process's, pgbench's own from wait4(), all divided by the transactions
pgbench made; and the machine's idle share from /proc/stat. It prints the medians over the
rounds. On a machine whose cores are all busy, throughput is about the cores divided by the
CPU per transaction, so the columns add up to an explanation; idle time that remains means
something waits (a single-threaded proxy's event loop, for one). It is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.pgbouncer import PgBouncer
from bench.run import FloorProcess, router_process
from tests.cluster import HOST, Cluster

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proxy:
    name: str
    port: int
    user: str
    pid: int | None  # None: PostgreSQL directly, nothing in between


def _process_ticks(pid: int) -> tuple[int, int]:
    """User and system clock ticks of ``pid`` and its direct children (a router's workers)."""
    user = system = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            user, system = user + int(fields[11]), system + int(fields[12])
    return user, system


def _postgres_ticks() -> int:
    """User + system ticks of every PostgreSQL process, those that ended included (cutime)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if "(postgres)" in stat:
            fields = stat.rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])
    return total


def _machine() -> tuple[int, int]:
    """(all ticks, idle + iowait ticks) from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values), values[3] + values[4]


def measure(cluster: Cluster, proxy: Proxy, clients: int, duration: int) -> dict[str, float]:
    """One pgbench -S run; CPU in microseconds per transaction, idle as a share."""
    argv = [str(cluster.bindir / "pgbench"), "-h", HOST, "-p", str(proxy.port), "-U", proxy.user,
            "-n", "-c", str(clients), "-j", str(min(2, clients)), "-T", str(duration), "-S", "app"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
    before = (_machine(), _process_ticks(proxy.pid) if proxy.pid else (0, 0), _postgres_ticks())
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read()
    after = (_machine(), _process_ticks(proxy.pid) if proxy.pid else (0, 0), _postgres_ticks())
    done = re.search(r"processed: (\d+)", out)
    if status != 0 or done is None:
        raise RuntimeError(f"pgbench against {proxy.name} failed: {proc.stderr.read()[-500:]}")
    transactions = int(done.group(1))

    def per_transaction(ticks: int) -> float:
        return ticks / _TICKS / transactions * 1e6

    (all0, idle0), (all1, idle1) = before[0], after[0]
    return {
        "tps": float(re.search(r"^tps = ([\d.]+)", out, re.MULTILINE).group(1)),
        "proxy user": per_transaction(after[1][0] - before[1][0]),
        "proxy sys": per_transaction(after[1][1] - before[1][1]),
        "postgres": per_transaction(after[2] - before[2]),
        "pgbench": (usage.ru_utime + usage.ru_stime) / transactions * 1e6,
        "busy": per_transaction((all1 - idle1) - (all0 - idle0)),
        "idle": (idle1 - idle0) / max(1, all1 - all0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=6, help="pgbench -T seconds (default 6)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--pool-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="also measure the router with this "
                   "many worker processes (default 1: only the single-process router)")
    p.add_argument("--split", action="store_true", help="also measure the router with read/write "
                   "splitting over two streaming replicas (all nodes on this machine)")
    p.add_argument("--floor", action="store_true", help="also measure bench/floor.py, a bare "
                   "Python/uvloop byte pipe: what forwarding alone costs in this language")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pgrouter-cpu-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        cluster = Cluster(workdir / "cluster", replicas=2 if args.split else 0, redis=False, ssl=False, pgbench_scale=10)
        stack.callback(cluster.stop)
        cluster.start()
        bouncer = PgBouncer(workdir / "pgbouncer", args.pool_size)
        stack.callback(bouncer.stop)
        bouncer.start(cluster.primary.port)
        router = router_process(workdir, cluster, args.pool_size, split=False)
        stack.callback(router.stop)
        router.start()
        proxies = [Proxy("direct", cluster.primary.port, "postgres", None),
                   Proxy("pgbouncer", bouncer.port, "bench", bouncer.pid()),
                   Proxy("router", router.port, "bench", router.proc.pid)]
        if args.workers > 1:
            multi = router_process(workdir, cluster, args.pool_size, split=False, workers=args.workers)
            stack.callback(multi.stop)
            multi.start()
            proxies.append(Proxy(f"router x{args.workers}", multi.port, "bench", multi.proc.pid))
        if args.split:
            split = router_process(workdir, cluster, args.pool_size, split=True)
            stack.callback(split.stop)
            split.start()
            proxies.append(Proxy("split", split.port, "bench", split.proc.pid))
        if args.floor:
            floor = FloorProcess(workdir / "floor.log")
            stack.callback(floor.stop)
            floor.start(cluster.primary.port)
            proxies.append(Proxy("floor", floor.port, "postgres", floor.proc.pid))
        rows: dict[str, list[dict[str, float]]] = {proxy.name: [] for proxy in proxies}
        for rnd in range(1, args.rounds + 1):
            for proxy in proxies:
                row = measure(cluster, proxy, args.clients, args.duration)
                rows[proxy.name].append(row)
                print(f"[{rnd}/{args.rounds}] {proxy.name:<10} {row['tps']:9,.0f} tps", file=sys.stderr)
    columns = ["tps", "proxy user", "proxy sys", "postgres", "pgbench", "busy", "idle"]
    print(f"pgbench -S -M simple, {args.clients} clients; CPU in µs per transaction (medians "
          f"of {args.rounds} rounds); busy = all CPU used on the machine per transaction")
    print(f"{'target':<11}" + "".join(f"{c:>12}" for c in columns))
    for name, runs in rows.items():
        cells = [statistics.median(run[c] for run in runs) for c in columns]
        print(f"{name:<11}{cells[0]:>12,.0f}" + "".join(f"{v:>12.1f}" for v in cells[1:-1])
              + f"{cells[-1]:>11.0%} ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
