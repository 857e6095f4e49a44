"""A real PostgreSQL primary with streaming replicas, plus Redis, for tests, `make dev` and bench.

No mocks: every node is a postmaster built from the local binaries (initdb, pg_basebackup) and
driven with pg_ctl and psql, so what the router sees is exactly what production would.

Layout of ``base_dir`` (it is also the unix socket directory):
    primary/ replica1/ ...   data directories; each includes ``node.conf`` (port, upstream)
    primary.log ...          server logs (pg_ctl -l)
    redis.log redis.pid      Redis log and pid file
    ca.pem ca.key            test CA (ssl=True); the servers' certificate is issued by it
    cluster.json             ports and options, so ``reuse=True`` and ``down`` find everything

    python -m tests.cluster up DIR     start (reusing DIR), print nodes as JSON, stop on SIGINT/SIGTERM
    python -m tests.cluster down DIR   stop whatever runs from DIR
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

HOST = "127.0.0.1"

# Roles created on the primary; the hba method each one is reached through over TCP.
SERVER_USERS: dict[str, str | None] = {
    "pgr_scram": "scram-pw",
    "pgr_scram_tls": "scram-tls-pw",  # hostssl only: a plain TCP login is rejected
    "pgr_md5": "md5-pw",
    "pgr_password": "plain-pw",
    "pgr_trust": None,
}
SERVER_USER_AUTH = {
    "pgr_scram": "scram-sha-256",
    "pgr_scram_tls": "scram-sha-256",
    "pgr_md5": "md5",
    "pgr_password": "password",
    "pgr_trust": "trust",
}

# Speed over durability: these clusters are disposable. wal_keep_size instead of replication
# slots, so a test that pauses replay cannot fill the disk. With synchronous_commit=off a commit
# reaches replicas only once the WAL writer flushes it (up to 3 x wal_writer_delay), so a short
# delay keeps wait_replay() fast. The two retry/status intervals make a replica reconnect and
# report its position quickly after a primary restart or promotion.
SERVER_CONF = """
listen_addresses = '127.0.0.1'
unix_socket_directories = '{socket_dir}'
max_connections = 200
password_encryption = 'scram-sha-256'
wal_level = replica
max_wal_senders = 10
wal_keep_size = '256MB'
hot_standby = on
wal_retrieve_retry_interval = '200ms'
wal_receiver_status_interval = '1s'
fsync = off
synchronous_commit = off
wal_writer_delay = '10ms'
full_page_writes = off
shared_buffers = '128MB'
logging_collector = off
"""
SSL_CONF = "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"

# First match wins (pg_hba.conf is read top to bottom), so user-specific lines precede the
# catch-all trust line.
HBA_LINES = [
    "local all all trust",
    "local replication all trust",
    "host replication all 127.0.0.1/32 trust",
    "hostssl all pgr_scram_tls 127.0.0.1/32 scram-sha-256",
    "hostnossl all pgr_scram_tls 127.0.0.1/32 reject",
    "host all pgr_md5 127.0.0.1/32 md5",
    "host all pgr_password 127.0.0.1/32 password",
    "host all pgr_scram 127.0.0.1/32 scram-sha-256",
    "host all all 127.0.0.1/32 trust",
]

START_TIMEOUT = 60.0
PORT_ATTEMPTS = 5  # a port picked free can be taken before the server binds it
SOCKET_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def find_bindir() -> Path:
    """Newest /usr/lib/postgresql/N/bin (Debian layout), else what pg_config says."""
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    versions.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)
    if versions:
        return versions[-1]
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout
        if (Path(out.strip()) / "initdb").exists():
            return Path(out.strip())
    raise ClusterError("no PostgreSQL binaries found (initdb)")


def _owner() -> pwd.struct_passwd | None:
    """The account servers run as: PostgreSQL refuses root, so `postgres` when we are root."""
    return pwd.getpwnam("postgres") if os.geteuid() == 0 else None


def _run(args: list, *, as_owner: bool = False, input: str | None = None, timeout=120.0) -> str:
    # PG* variables from the caller's shell (PGHOST, PGOPTIONS, PGSSLMODE...) must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
    extra = {}
    if as_owner and (owner := _owner()):
        extra = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": [], "cwd": "/"}
    proc = subprocess.run([str(a) for a in args], input=input, capture_output=True, text=True,
                          env=env, timeout=timeout, **extra)
    if proc.returncode != 0:
        raise ClusterError(f"{Path(str(args[0])).name} exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a file the servers read; as root, hand it to the server account."""
    path.write_text(text)
    path.chmod(mode)
    if owner := _owner():
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An exited child nobody reaped yet (PID 1 in a container may never reap) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _tail(path: Path, lines: int = 30, since: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(since)
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


def _wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Node:
    name: str
    host: str
    port: int
    datadir: Path
    bindir: Path = field(default_factory=find_bindir, repr=False)
    socket_dir: Path | None = field(default=None, repr=False)  # default: datadir's parent
    upstream: Node | None = field(default=None, repr=False)  # the primary a replica follows

    def __post_init__(self):
        self.socket_dir = self.socket_dir or self.datadir.parent

    @property
    def logfile(self) -> Path:
        return self.datadir.parent / f"{self.name}.log"

    def dsn(self, dbname="postgres", user="postgres", password=None) -> str:
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def pid(self) -> int | None:
        """The postmaster's PID if it is running."""
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def is_standby(self) -> bool:
        return (self.datadir / "standby.signal").exists()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start and wait until it accepts connections; move to a new port if ours was taken."""
        for attempt in range(PORT_ATTEMPTS):
            self._write_node_conf()
            log_start = self.logfile.stat().st_size if self.logfile.exists() else 0
            try:
                self._pg_ctl("start", "-w", "-t", int(timeout), "-l", self.logfile,
                             timeout=timeout + 10)
                return
            except (ClusterError, subprocess.TimeoutExpired) as exc:
                log = _tail(self.logfile, since=log_start)
                if "Address already in use" in log and attempt + 1 < PORT_ATTEMPTS:
                    self.port = free_port()
                    continue
                raise ClusterError(f"{self.name} did not start: {exc}\n"
                                   f"--- tail of {self.logfile} ---\n{log}") from None

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Stop if running; escalate to immediate shutdown rather than leave a server behind."""
        for m in dict.fromkeys([mode, "immediate"]):
            if not self.is_running():
                return
            try:
                self._pg_ctl("stop", "-w", "-m", m, "-t", int(timeout), timeout=timeout + 10)
            except (ClusterError, subprocess.TimeoutExpired):
                pass
        if self.is_running():
            raise ClusterError(f"{self.name} (pid {self.pid()}) did not stop")

    def promote(self, timeout: float = START_TIMEOUT) -> None:
        self._pg_ctl("promote", "-w", "-t", int(timeout), timeout=timeout + 10)

    def _pg_ctl(self, *args, timeout: float) -> str:
        return _run([self.bindir / "pg_ctl", "-D", self.datadir, *args], as_owner=True,
                    timeout=timeout)

    def _write_node_conf(self) -> None:
        # Rewritten before every start, so a port change (collision) also reaches replicas'
        # primary_conninfo. application_name tells replicas apart in pg_stat_replication.
        conf = f"port = {self.port}\ncluster_name = '{self.name}'\n"
        if self.upstream:
            conf += (f"primary_conninfo = 'host={self.upstream.socket_dir} "
                     f"port={self.upstream.port} user=postgres application_name={self.name}'\n")
        _write(self.datadir / "node.conf", conf)


_LIVE: set[Cluster] = set()  # clusters with processes to stop if the interpreter exits


def _stop_live() -> None:
    for cluster in list(_LIVE):
        try:
            cluster.stop()
        except Exception as exc:  # keep stopping the others; nobody is left to handle it
            print(f"tests.cluster: stopping {cluster.base_dir} failed: {exc}", file=sys.stderr)


def _stop_live_and_die(signum, _frame) -> None:
    # A plain SIGTERM skips atexit; stop our servers first, then die of the signal as before.
    _stop_live()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


atexit.register(_stop_live)


class Cluster:
    def __init__(self, base_dir: Path, replicas: int = 2, redis: bool = True, ssl: bool = True,
                 reuse: bool = False, pgbench_scale: int | None = 1, bindir: Path | None = None):
        self.base_dir = Path(base_dir).absolute()
        self.reuse = reuse
        self.state_file = self.base_dir / "cluster.json"
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else None
        if state and not reuse:
            raise ClusterError(f"{self.base_dir} holds a cluster; pass reuse=True or a new dir")
        if state:  # the stored layout wins: the data directories were made for it
            replicas, redis, ssl = state["replicas"], state["redis_port"] is not None, state["ssl"]
            pgbench_scale = state["pgbench_scale"]
        ports = state["ports"] if state else {}
        if len(str(self.base_dir / ".s.PGSQL.65535.lock")) > SOCKET_PATH_MAX:
            raise ClusterError(f"{self.base_dir} is too long for a unix socket directory")
        self.bindir = Path(bindir) if bindir else find_bindir()
        self.ssl, self.pgbench_scale = ssl, pgbench_scale

        def node(name: str, upstream: Node | None) -> Node:
            return Node(name, HOST, ports.get(name) or free_port(), self.base_dir / name,
                        self.bindir, self.base_dir, upstream)

        self.primary = node("primary", None)
        self.replicas = [node(f"replica{i}", self.primary) for i in range(1, replicas + 1)]
        self.redis_port: int | None = None
        if redis:
            self.redis_port = (state or {}).get("redis_port") or free_port()
        self._redis_proc: subprocess.Popen | None = None
        self._owned: set[str] = set()  # what this object started, hence stops
        self.ca = None
        self.ca_cert_path = self.base_dir / "ca.pem" if ssl else None
        if ssl:
            import trustme  # test-only dependency; not needed when ssl=False

            key_path = self.base_dir / "ca.key"
            self.ca = (trustme.CA.from_pem(self.ca_cert_path.read_bytes(), key_path.read_bytes())
                       if state else trustme.CA())

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    @property
    def redis_url(self) -> str | None:
        return f"redis://{HOST}:{self.redis_port}/0" if self.redis_port else None

    @property
    def redis_pidfile(self) -> Path:
        return self.base_dir / "redis.pid"

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = START_TIMEOUT) -> Cluster:
        """Create if needed, start whatever is stopped, wait for streaming replicas and Redis."""
        _LIVE.add(self)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is signal.SIG_DFL:
                    signal.signal(sig, _stop_live_and_die)
        if not self.state_file.exists():
            self._create(timeout)
        for node in self.nodes:
            if not node.is_running():
                self._owned.add(node.name)
                node.start(timeout)
        self._wait_streaming(timeout)
        if self.redis_port:
            self.start_redis()
        self._save_state()
        return self

    def stop(self, everything: bool = False) -> None:
        """Stop what this object started (reuse=False: everything; `everything=True`: also
        what another process started in base_dir). Safe to call repeatedly."""
        everything = everything or not self.reuse
        errors = []
        # Replicas first: a primary's fast shutdown waits for its walsenders to drain.
        for node in [*self.replicas, self.primary]:
            if everything or node.name in self._owned:
                try:
                    node.stop()
                except ClusterError as exc:
                    errors.append(str(exc))
        if everything or "redis" in self._owned:
            self.stop_redis()
        self._owned.clear()
        _LIVE.discard(self)
        if errors:
            raise ClusterError("; ".join(errors))

    def psql(self, sql: str, node: Node | None = None, dbname: str = "postgres") -> str:
        """Run SQL as superuser over the unix socket; return psql's unaligned tuples-only output."""
        node = node or self.primary
        return _run([self.bindir / "psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                     "-h", node.socket_dir, "-p", node.port, "-U", "postgres", "-d", dbname,
                     "-f", "-"], input=sql).strip()

    def wait_replay(self, timeout: float = 10.0) -> None:
        """Wait until every running standby has replayed the primary's WAL as of this call."""
        # The insert position, not pg_current_wal_lsn() (the write position): with
        # synchronous_commit=off a just-committed transaction's commit record may not be
        # written yet, and waiting for the write position would return before it is replayed.
        lsn = self.psql("SELECT pg_current_wal_insert_lsn()")
        # When the last record ended at a page boundary the insert position lies past the next
        # page's header (…0018), where no replayed record ends until another is written: write
        # one, so that the wait cannot outlast an idle primary.
        self.psql("SELECT pg_logical_emit_message(false, 'pgrouter-tests', 'wait_replay')")
        sql = f"SELECT NOT pg_is_in_recovery() OR pg_last_wal_replay_lsn() >= '{lsn}'"
        for replica in self.replicas:
            if replica.is_running():
                _wait_until(lambda r=replica: self.psql(sql, r) == "t", timeout,
                            f"{replica.name} to replay up to {lsn}")

    def env(self) -> dict[str, str]:
        """libpq variables pointing psql/pgbench at the primary."""
        env = {"PGHOST": HOST, "PGPORT": str(self.primary.port), "PGUSER": "postgres"}
        if self.ca_cert_path:
            env["PGSSLROOTCERT"] = str(self.ca_cert_path)
        return env

    def describe(self) -> dict:
        def node(n: Node) -> dict:
            return {"name": n.name, "port": n.port, "datadir": str(n.datadir), "dsn": n.dsn()}

        return {"base_dir": str(self.base_dir), "primary": node(self.primary),
                "replicas": [node(r) for r in self.replicas], "redis_url": self.redis_url,
                "ca_cert_path": self.ca_cert_path and str(self.ca_cert_path),
                "users": SERVER_USERS}

    # -- Redis --------------------------------------------------------------------------

    def redis_pid(self) -> int | None:
        if self._redis_proc and self._redis_proc.poll() is None:
            return self._redis_proc.pid
        try:  # started by another process (reuse): trust the pid file only if it is redis
            pid = int(self.redis_pidfile.read_text())
            comm = Path(f"/proc/{pid}/comm").read_text()
        except (OSError, ValueError):
            return None
        return pid if comm.startswith("redis-server") and _alive(pid) else None

    def start_redis(self, timeout: float = 10.0) -> None:
        if self.redis_port is None:
            raise ClusterError("this cluster was created with redis=False")
        if self.redis_pid():
            return
        log = self.base_dir / "redis.log"
        for attempt in range(PORT_ATTEMPTS):
            log_start = log.stat().st_size if log.exists() else 0
            # Its own session: a Ctrl-C in the terminal must reach us, not kill Redis under us.
            proc = subprocess.Popen(
                ["redis-server", "--port", str(self.redis_port), "--bind", HOST, "--save", "",
                 "--appendonly", "yes", "--daemonize", "no", "--dir", str(self.base_dir),
                 "--pidfile", str(self.redis_pidfile), "--logfile", str(log)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            self._redis_proc = proc
            self._owned.add("redis")
            # Compare process_id: a PONG alone could come from another Redis on a reused port.
            ours = f"process_id:{proc.pid}\r\n".encode()
            deadline = time.monotonic() + timeout
            while proc.poll() is None and ours not in _redis_info(self.redis_port):
                if time.monotonic() > deadline:
                    raise ClusterError(f"redis did not answer within {timeout:.0f}s\n"
                                       f"--- {log} ---\n{_tail(log, since=log_start)}")
                time.sleep(0.05)
            if proc.poll() is None:
                if self.state_file.exists():  # the port may have moved; keep `down`/reuse right
                    self._save_state()
                return
            text = _tail(log, since=log_start)
            if "Address already in use" not in text or attempt + 1 == PORT_ATTEMPTS:
                raise ClusterError(f"redis exited {proc.returncode}\n--- {log} ---\n{text}")
            self.redis_port = free_port()

    def stop_redis(self, timeout: float = 10.0) -> None:
        pid = self.redis_pid()
        if pid is None:
            return
        # SIGTERM: Redis flushes its append-only file and exits, so the registry survives a
        # restart as it would in production.
        os.kill(pid, signal.SIGTERM)
        try:
            _wait_until(lambda: not self.redis_pid(), timeout, "redis to exit")
        except ClusterError:
            os.kill(pid, signal.SIGKILL)
            _wait_until(lambda: not self.redis_pid(), timeout, "redis to exit")
        self._redis_proc = None
        self.redis_pidfile.unlink(missing_ok=True)

    # -- creation -----------------------------------------------------------------------

    def _create(self, timeout: float) -> None:
        self._prepare_base_dir()
        p = self.primary
        _run([self.bindir / "initdb", "-D", p.datadir, "-U", "postgres", "-E", "UTF8",
              "--locale=C", "-A", "trust", "--no-sync", "--no-instructions"], as_owner=True)
        conf = SERVER_CONF.format(socket_dir=self.base_dir) + (SSL_CONF if self.ssl else "")
        with open(p.datadir / "postgresql.conf", "a") as f:
            f.write(conf + "include 'node.conf'\n")  # last, so per-node values win
        hba = [line for line in HBA_LINES if self.ssl or "pgr_scram_tls" not in line]
        _write(p.datadir / "pg_hba.conf", "\n".join(hba) + "\n")
        if self.ca:
            self.ca.cert_pem.write_to_path(str(self.ca_cert_path))
            self.ca.private_key_pem.write_to_path(str(self.base_dir / "ca.key"))
            leaf = self.ca.issue_cert(HOST, "localhost")
            _write(p.datadir / "server.crt", b"".join(b.bytes() for b in leaf.cert_chain_pems)
                   .decode(), 0o644)
            _write(p.datadir / "server.key", leaf.private_key_pem.bytes().decode())
        self._owned.add(p.name)
        p.start(timeout)
        self.psql(self._setup_sql())
        if self.pgbench_scale:
            _run([self.bindir / "pgbench", "-i", "-q", "-s", self.pgbench_scale,
                  "-h", self.base_dir, "-p", p.port, "-U", "postgres", "app"])
            self.psql("GRANT CREATE ON SCHEMA public TO PUBLIC", dbname="app")
        for r in self.replicas:  # after setup, so replicas start with roles and data in place
            _run([self.bindir / "pg_basebackup", "-D", r.datadir, "-X", "stream", "-c", "fast",
                  "--no-sync", "--no-manifest", "-h", self.base_dir, "-p", p.port,
                  "-U", "postgres"], as_owner=True)
            _write(r.datadir / "standby.signal", "")
        self._save_state()

    def _setup_sql(self) -> str:
        sql = []
        for user, password in SERVER_USERS.items():
            # The stored verifier type decides what the server can check: md5 needs an md5 hash.
            encryption = "md5" if SERVER_USER_AUTH[user] == "md5" else "scram-sha-256"
            sql.append(f"SET password_encryption = '{encryption}';")
            pw = f" PASSWORD '{password}'" if password else ""
            # Read/write everywhere, so tests can run pgbench or queries as any of them.
            sql.append(f"CREATE ROLE {user} LOGIN CREATEDB{pw} "
                       f"IN ROLE pg_read_all_data, pg_write_all_data;")
        sql.append("CREATE DATABASE app OWNER postgres;")
        return "\n".join(sql)

    def _prepare_base_dir(self) -> None:
        base = self.base_dir
        base.mkdir(parents=True, exist_ok=True)
        if self.reuse:  # an interrupted creation (no cluster.json yet): discard and redo it
            for node in self.nodes:
                node.stop("immediate")
                shutil.rmtree(node.datadir, ignore_errors=True)
            self.stop_redis()
        elif any(base.iterdir()):
            raise ClusterError(f"{base} is not empty")
        if owner := _owner():
            # The server account writes sockets and logs here, and resolves paths through every
            # parent: pytest's tmp roots are root-only (0700), so grant search (o+x, not list).
            os.chown(base, owner.pw_uid, owner.pw_gid)
            base.chmod(0o755)
            for parent in base.parents:
                mode = parent.stat().st_mode
                if not mode & stat.S_IXOTH:
                    parent.chmod(mode | stat.S_IXOTH)

    def _wait_streaming(self, timeout: float) -> None:
        want = {r.name for r in self.replicas if r.is_standby()}
        sql = "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
        try:
            _wait_until(lambda: want <= set(self.psql(sql).split()), timeout, "streaming replicas")
        except ClusterError as exc:
            tails = "\n".join(f"--- {r.logfile} ---\n{_tail(r.logfile, 10)}" for r in self.replicas)
            raise ClusterError(f"{exc}\n{tails}") from None

    def _save_state(self) -> None:
        state = {"ports": {n.name: n.port for n in self.nodes}, "redis_port": self.redis_port,
                 "replicas": len(self.replicas), "ssl": self.ssl,
                 "pgbench_scale": self.pgbench_scale}
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")


def _redis_info(port: int) -> bytes:
    """`INFO server` as raw bytes, b"" if nothing answers. Stdlib only: no redis-py needed."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data
    except OSError:
        return b""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster")
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--replicas", type=int, default=2, help="used only when creating")
    args = parser.parse_args(argv)
    cluster = Cluster(args.dir, replicas=args.replicas, reuse=True)
    if args.command == "down":
        cluster.stop(everything=True)
        return 0
    stopping = threading.Event()
    try:
        cluster.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        print(json.dumps(cluster.describe(), indent=2), flush=True)
        while not stopping.wait(1):
            pass
    finally:
        cluster.stop(everything=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
