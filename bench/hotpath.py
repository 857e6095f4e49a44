"""The router's own CPU time per transaction on the forwarding path, without the kernel.

    .venv/bin/python -m bench.hotpath [--iterations 200000] [--profile] [--primary-port P]

pgbench through the router measures everything at once: the router, two more socket hops,
and the scheduler of a machine shared with PostgreSQL and pgbench, so a change of a few
microseconds in the router drowns in the noise. This drives the real objects instead: a
Router in-process against a real primary (its own cluster, or --primary-port), two clients
logged in over real sockets and one server connection (pool_size 1). Then, on the router's
loop, their transports are swapped for in-memory ones and the messages pgbench would send
and PostgreSQL would answer are fed to data_received directly, the way uvloop would.

With two clients and one server connection every transaction waits in the pool and is handed
over when the other's ReadyForQuery arrives: the path a 32-client run takes. It prints the
mean time per transaction for pgbench -S as simple and as extended queries; with --profile,
cProfile's top functions too. Use it to compare two versions of the code (run it in each
tree); it is not a test and asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from router.config import Settings
from tests.cluster import HOST, Cluster
from tests.harness import RouterThread
from tests.rawclient import RawClient


def _msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def _query(aid: int) -> bytes:
    return _msg(b"Q", b"SELECT abalance FROM pgbench_accounts WHERE aid = %d;\0" % aid)


def _extended(aid: int) -> bytes:
    # What pgbench -M extended sends: an unnamed Parse, Bind with one text parameter,
    # Describe portal, Execute, Sync, in one write.
    sql = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    value = b"%d" % aid
    return (_msg(b"P", b"\0" + sql + b"\0" + struct.pack("!H", 0))
            + _msg(b"B", b"\0\0" + struct.pack("!HHI", 0, 1, len(value)) + value + struct.pack("!H", 0))
            + _msg(b"D", b"P\0") + _msg(b"E", b"\0" + struct.pack("!I", 0)) + _msg(b"S", b""))


_ROW_DESCRIPTION = _msg(b"T", struct.pack("!H", 1) + b"abalance\0" + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0))
_REPLY = (_ROW_DESCRIPTION + _msg(b"D", struct.pack("!HI", 1, 1) + b"0")
          + _msg(b"C", b"SELECT 1\0") + _msg(b"Z", b"I"))
REPEATS = 5
_EXTENDED_REPLY = _msg(b"1", b"") + _msg(b"2", b"") + _REPLY


class MemoryTransport:
    """What the protocols call on a transport, keeping only the last write."""

    def __init__(self, real) -> None:
        self.real = real
        self.last = b""
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.last = data
        self.writes += 1

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name, default=None):
        return self.real.get_extra_info(name, default)


def drive(router, read_port: int, requests: list[bytes], reply: bytes, iterations: int,
          profile: bool) -> tuple[float, float]:
    """Seconds per transaction (the fastest batch, the median batch), steady state: one
    client's request waits for the pool, the other's reply hands the server connection over."""
    a, b = sorted(router.clients.values(), key=id)[:2]
    (pool,) = [p for p in router.pools.pools.values() if p.key.port == read_port]
    (server,) = pool.servers
    swapped = [(obj, obj.transport) for obj in (a, b, server)]
    for obj, real in swapped:
        obj.transport = MemoryTransport(real)
    try:
        n = len(requests)
        a.data_received(requests[0])  # a holds the server
        clients = (a, b)
        # A warm-up, then several measured batches: the fastest is the least disturbed by
        # whatever else the machine runs.
        batches = []
        for batch in range(REPEATS + 1):
            rounds = iterations // REPEATS
            profiler = cProfile.Profile() if profile and batch == REPEATS else None
            if profiler is not None:
                profiler.enable()
            start = time.perf_counter()
            for i in range(rounds - rounds % 2):
                waiting = clients[(i + 1) & 1]
                waiting.data_received(requests[i % n])  # queues: the server is taken
                server.data_received(reply)  # ends the holder's transaction, hands over
            if profiler is not None:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            elif batch:
                batches.append((time.perf_counter() - start) / (rounds - rounds % 2))
        holder = server.client
        server.data_received(reply)
        assert server.client is None and holder is not None and list(pool.idle) == [server], "bookkeeping drifted"
        for obj in (a, b):
            assert obj.transport.last.endswith(b"Z\0\0\0\5I"), "a client did not get its reply"
        return min(batches), statistics.median(batches)
    finally:
        for obj, real in swapped:
            obj.transport = real


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--split", action="store_true", help="start a replica too and route reads to it")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    parser.add_argument("--primary-port", type=int, help="use this running primary (user postgres, "
                        "trust, database app) instead of starting a cluster")
    parser.add_argument("--replica-port", type=int, help="with --primary-port: route reads to this "
                        "replica of it (read/write splitting)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        port, replicas = args.primary_port, []
        if args.replica_port:
            replicas = [{"host": HOST, "port": args.replica_port}]
        if port is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgrouter-hotpath-")))
            cluster = Cluster(workdir / "cluster", replicas=1 if args.split else 0, redis=False,
                              ssl=False, pgbench_scale=None)
            stack.callback(cluster.stop)
            cluster.start()
            port = cluster.primary.port
            replicas = [{"host": HOST, "port": r.port} for r in cluster.replicas]
        settings = Settings(
            listen_host=HOST, listen_port=0, admin_port=-1, pool_mode="transaction", pool_size=1,
            clusters={"bench": {"primary": {"host": HOST, "port": port}, "replicas": replicas}},
            databases={"app": {"cluster": "bench", "server_user": "postgres"}},
            users={"bench": {"auth": "trust"}},
        )
        rt = RouterThread(settings).start()
        stack.callback(rt.stop)
        if replicas:  # reads go to the replica once the monitor has seen it keep up
            rt.wait_for(lambda r: all(any(n.eligible and n.role.value == "replica" for n in split.topology.nodes)
                                      for split in r.splits.values()), timeout=30, what="an eligible replica")
        raw = [RawClient(rt.port) for _ in range(2)]
        for client in raw:
            stack.callback(client.sock.close)
            client.login_trust("bench")
            client.send(_query(1))  # opens the pool's server connection
            client.recv_until(b"Z")
        read_port = replicas[0]["port"] if replicas else port
        rt.wait_for(lambda r: len(r.clients) == 2 and any(p.idle for p in r.pools.pools.values() if p.key.port == read_port),
                    what="two idle clients and an idle server for reads")
        # Like pgbench -S at scale 10: a random aid of a million each time, so caches keyed
        # by statement text meet new texts as they would in a real run.
        rnd = random.Random(1)
        aids = [rnd.randint(1, 1_000_000) for _ in range(20_000)]
        for name, requests, reply in (
            ("select simple", [_query(aid) for aid in aids], _REPLY),
            ("select extended", [_extended(aid) for aid in aids], _EXTENDED_REPLY),
        ):
            best, median = rt.call(
                lambda r, requests=requests, reply=reply: drive(
                    r, read_port, requests, reply, args.iterations, args.profile
                ),
                timeout=600,
            )
            print(f"{name:16s} {best * 1e6:6.2f} us per transaction (median of batches {median * 1e6:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
