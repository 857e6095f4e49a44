"""A slow client must not make the router buffer a large result: it stops reading from the
server instead. Measured on a real `pgrouter run` process by its peak RSS (VmHWM)."""

from __future__ import annotations

import time

from router.protocol import messages as m
from tests.rawclient import RawClient

ROW_BYTES = 1024
ROWS = 1024 * 1024  # 1 GiB of row data
# The router's own memory is ~50 MB; without back-pressure a pause of the client's reading
# lets it buffer hundreds of MB. Its socket buffers and 256 KiB write limits fit easily here.
MAX_GROWTH_KIB = 64 * 1024


def test_one_gib_result_to_a_slow_client_keeps_router_memory_bounded(router_process):
    router = router_process(pool_size=2)
    client = RawClient(router.port, timeout=60)
    client.login_trust()
    baseline = router.rss_peak_kib()

    client.send(m.query(f"SELECT repeat('x', {ROW_BYTES}) FROM generate_series(1, {ROWS})"))
    # The slow part: read nothing for two seconds while the server produces rows as fast as
    # it can, then trickle, then drain at full speed.
    time.sleep(2.0)
    received = 0
    for _ in range(20):
        received += len(client.sock.recv(16 * 1024))
        time.sleep(0.05)
    client.sock.settimeout(60)
    tail = b""
    while True:
        data = client.sock.recv(1 << 20)
        assert data, "router closed the connection mid-result"
        received += len(data)
        tail = (tail + data)[-64:]
        if tail.endswith(m.ready_for_query(m.IDLE)):
            break
    growth = router.rss_peak_kib() - baseline
    assert received > ROWS * ROW_BYTES
    assert growth < MAX_GROWTH_KIB, f"router RSS grew by {growth} KiB"
    client.close()
