"""config/pgrouter.example.toml documents every setting: it must stay a valid configuration."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from router.config import Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "pgrouter.example.toml"


def test_example_config_is_valid(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("PGROUTER_"):
            monkeypatch.delenv(name)
    settings = load_settings(EXAMPLE)
    assert settings.clusters["main"].replicas and settings.admin_port == 8080


def test_example_config_names_every_top_level_setting() -> None:
    text = EXAMPLE.read_text()
    documented = {line.lstrip("# ").split("=")[0].strip() for line in text.splitlines() if "=" in line}
    missing = set(Settings.model_fields) - documented - {"clusters", "databases", "users"}
    assert not missing, f"settings missing from {EXAMPLE.name}: {sorted(missing)}"
    assert tomllib.loads(text)
