"""One pgbench run against one target, and what it printed: the workloads, the parsing."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.cluster import HOST, Cluster

TARGETS = ("direct", "pgbouncer", "router", "router-split", "floor")
# At -T pgbench still waits for the transactions in flight, so a proxy that stops answering
# would hang it; past this margin the run is killed and reported as FAILED instead.
RUN_TIMEOUT_MARGIN = 60.0


@dataclass(frozen=True)
class Workload:
    name: str
    args: tuple[str, ...]
    clients: int | None = None  # None: --clients
    threads: int = 2


WORKLOADS = [
    Workload("select simple", ("-S", "-M", "simple")),
    Workload("select extended", ("-S", "-M", "extended")),
    # Named prepared statements outlive the transaction; a transaction pooler that does not
    # track them hands the client a server that never saw its Parse.
    Workload("select prepared", ("-S", "-M", "prepared")),
    Workload("tpcb simple", ("-M", "simple")),
    Workload("tpcb extended", ("-M", "extended")),
    Workload("tpcb prepared", ("-M", "prepared")),
    # One client, one query in flight: the proxy's added latency is not hidden by parallelism.
    Workload("select 1 client", ("-S", "-M", "simple"), clients=1, threads=1),
    # -C: a new connection per transaction, i.e. the cost of login (and of a backend fork
    # when direct) rather than of forwarding.
    Workload("connect per txn", ("-S", "-C"), clients=8),
]
LATENCY_WORKLOAD = "select 1 client"


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    user: str
    log: Path | None = None  # the proxy's log: its warnings during a failed run are kept


@dataclass
class Run:
    round: int
    workload: str
    target: str
    argv: list[str]
    returncode: int | None
    seconds: float
    tps: float | None = None
    latency_ms: float | None = None
    failed_transactions: int | None = None
    errors: list[str] | None = None  # pgbench's error lines, then the proxy's log lines

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.tps is not None and not self.failed_transactions


def _env() -> dict[str, str]:
    # The caller's PG* variables (PGHOST, PGOPTIONS...) must not change what we measure.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}


def run_pgbench(cluster: Cluster, target: Target, workload: Workload, *, rnd: int,
                clients: int, duration: int) -> Run:
    """Run pgbench once; a non-zero exit or failed transactions make a Run that is not ok."""
    # pgbench's own pre-run vacuum would go through the proxy and only for some targets;
    # doing it here, directly, gives every run the same starting tables. -n below skips it.
    cluster.psql("VACUUM pgbench_branches; VACUUM pgbench_tellers; TRUNCATE pgbench_history",
                 dbname="app")
    clients = workload.clients or clients
    argv = [str(cluster.bindir / "pgbench"), "-h", HOST, "-p", str(target.port),
            "-U", target.user, "-n", "-c", str(clients), "-j", str(min(workload.threads, clients)),
            "-T", str(duration), *workload.args, "app"]
    log_start = target.log.stat().st_size if target.log and target.log.exists() else 0
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=_env(),
                              timeout=duration + RUN_TIMEOUT_MARGIN)
        returncode, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:  # killed by run(); its partial output is of no use
        returncode, out, err = None, "", f"killed: no result {RUN_TIMEOUT_MARGIN:.0f}s after -T"
    run = Run(rnd, workload.name, target.name, argv, returncode, time.monotonic() - started)

    def number(pattern: str, kind=float):
        match = re.search(pattern, out, re.MULTILINE)
        return kind(match.group(1)) if match else None

    run.tps = number(r"^tps = ([\d.]+)")
    run.latency_ms = number(r"^latency average = ([\d.]+) ms")
    run.failed_transactions = number(r"^number of failed transactions: (\d+)", int)
    if not run.ok:
        # The first distinct errors say why; 32 "client N aborted" lines do not. Its threads
        # write stderr concurrently, so "pgbench: error:" prefixes arrive interleaved: drop them.
        lines = (re.sub(r"client \d+ ", "client N ", re.sub(r"\s*(pgbench:|error:)\s*", " ", ln))
                 .strip() for ln in err.splitlines())
        run.errors = list(dict.fromkeys(ln for ln in lines if ln.strip()))[:4]
        if target.log and target.log.exists():
            with open(target.log, "rb") as f:
                f.seek(log_start)
                text = f.read().decode(errors="replace")
            proxy = [ln for ln in text.splitlines() if "WARNING" in ln or "ERROR" in ln]
            run.errors += [f"{target.name} log: {ln}" for ln in dict.fromkeys(proxy)][:5]
    return run


def describe(run: Run) -> str:
    if run.ok:
        return f"{run.tps:,.0f} tps, {run.latency_ms:.3f} ms"
    failed = f", {run.failed_transactions} failed" if run.failed_transactions else ""
    return f"FAILED (exit {run.returncode}{failed}): {(run.errors or ['no output'])[0]}"
