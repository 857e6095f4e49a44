"""Fixtures of the deployment tests (no servers: these read files)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No PGROUTER_* variables from the calling shell; set the ones a test needs on the
    returned monkeypatch."""
    for name in list(os.environ):
        if name.startswith("PGROUTER_"):
            monkeypatch.delenv(name)
    return monkeypatch
