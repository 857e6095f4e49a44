"""PgBouncer for the benchmark: configured like the router, started and stopped by pid file."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.cluster import HOST, free_port

PGBOUNCER = "/usr/sbin/pgbouncer"


class PgBouncer:
    """PgBouncer in the foreground as `postgres` (it refuses root), signalled by pid file.

    Not -d: a daemon is re-parented to PID 1, which in a container may never reap it; as
    runuser's child it is reaped when it exits.
    """

    def __init__(self, workdir: Path, pool_size: int) -> None:
        self.dir, self.pool_size = workdir, pool_size
        self.pidfile, self.log = workdir / "pgbouncer.pid", workdir / "pgbouncer.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None  # runuser, or pgbouncer when not root

    def start(self, server_port: int, timeout: float = 15.0) -> None:
        self.dir.mkdir()
        # trust, like the router's `bench` user: both proxies skip the same auth work. The user
        # must still be listed in auth_file. user= in [databases] logs every client in as
        # postgres: one pool, like the router's server_user.
        (self.dir / "userlist.txt").write_text('"bench" ""\n')
        # unix_socket_dir empty: TCP only, like the router. Connection logging off because the
        # router does not log logins at INFO; otherwise -C would measure PgBouncer's log writes.
        (self.dir / "pgbouncer.ini").write_text(f"""\
[databases]
app = host={HOST} port={server_port} dbname=app user=postgres

[pgbouncer]
listen_addr = {HOST}
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/userlist.txt
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = 500
pidfile = {self.pidfile}
logfile = {self.log}
log_connections = 0
log_disconnections = 0
""")
        cmd = [PGBOUNCER, "-q", str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, owner.pw_uid, owner.pw_gid)
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # Its own session: Ctrl-C reaches us, and we stop PgBouncer after the router.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.pid() is None or not _accepts(self.port):  # pid first: the port is ours
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text()[-2000:] if self.log.exists() else "(no log)"
                raise RuntimeError(f"pgbouncer did not start:\n{tail}")
            time.sleep(0.05)

    def pid(self) -> int | None:
        """The PID in the pid file, if that process is still a live pgbouncer."""
        try:
            pid = int(self.pidfile.read_text())
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError):
            return None
        # comm is "(pgbouncer)" (not a recycled PID); state Z: exited, not yet reaped.
        comm, state = stat.split(" ", 2)[1], stat.rsplit(")", 1)[1].split()[0]
        return pid if comm == "(pgbouncer)" and state != "Z" else None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGTERM: immediate shutdown in 1.18
            if self.proc.poll() is not None:
                break
            # PgBouncer by its pid file; runuser if PgBouncer never got to write one.
            if pid := self.pid():
                os.kill(pid, sig)
            else:
                self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.proc = None


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True
