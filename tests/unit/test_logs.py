"""router/logs.py: one JSON object per line by default, text when asked."""

from __future__ import annotations

import json
import logging

from router.logs import JsonFormatter


def test_json_lines() -> None:
    record = logging.LogRecord("pgrouter.x", logging.WARNING, __file__, 1, "client %s: %s", ("a", "b\nc"), None)
    record.fields = {"tenant": "acme", "duration_ms": 12.5}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    event = json.loads(line)
    assert event["level"] == "WARNING" and event["logger"] == "pgrouter.x"
    assert event["msg"] == "client a: b\nc"
    assert event["tenant"] == "acme" and event["duration_ms"] == 12.5
    assert event["ts"].endswith("Z")
