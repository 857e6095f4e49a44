"""`pgrouter rotate-key` and `pgrouter generate-key`, run in-process against a real Redis."""

from __future__ import annotations

import json

import pytest

from router import cli
from router.registry.crypto import Keyring, generate_key, parse_key_spec
from router.registry.errors import RegistryDecryptError
from router.registry.store import RedisStore
from tests.registry.conftest import RedisServer, free_port, tenant_input


async def test_rotate_key_reencrypts_every_record(
    redis_server: RedisServer,
    key_spec: str,
    store: RedisStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(3):
        await store.create(tenant_input(f"t{i}", server_password=f"pw-{i}"))
    new_spec = f"k2:{generate_key()}"
    monkeypatch.setenv("PGROUTER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PGROUTER_SECRET_KEY", new_spec)
    monkeypatch.setenv("PGROUTER_OLD_SECRET_KEYS", f"k0:{generate_key()},{key_spec}")

    # asyncio.run inside the command needs a thread without a running loop.
    code = await _in_thread(["rotate-key"])
    assert code == 0
    assert capsys.readouterr().out.strip() == "re-encrypted 3 tenant records under key id 'k2'"
    kids = {
        json.loads(redis_server.client().get(f"pgrouter:tenant:t{i}"))["server_password"]["kid"]
        for i in range(3)
    }
    assert kids == {"k2"}
    fresh = RedisStore.from_url(redis_server.url, Keyring.from_specs(new_spec))
    try:
        assert (await fresh.get("t2")).server_password.get_secret_value() == "pw-2"
    finally:
        await fresh.close()
    with pytest.raises(RegistryDecryptError):
        await store.get("t0")  # the old key alone no longer opens it

    assert await _in_thread(["rotate-key"]) == 0
    assert capsys.readouterr().out.startswith("re-encrypted 0 tenant records")


async def test_rotate_key_failures(
    redis_server: RedisServer,
    store: RedisStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await store.create(tenant_input("acme"))
    monkeypatch.delenv("PGROUTER_REDIS_URL", raising=False)
    monkeypatch.delenv("PGROUTER_OLD_SECRET_KEYS", raising=False)
    monkeypatch.setenv("PGROUTER_SECRET_KEY", f"k2:{generate_key()}")
    assert await _in_thread(["rotate-key"]) == 2
    assert "PGROUTER_REDIS_URL" in capsys.readouterr().err

    # The old key was not given: nothing can be opened, and the command says which record.
    assert await _in_thread(["rotate-key", "--redis-url", redis_server.url]) == 1
    err = capsys.readouterr().err
    assert 'tenant "acme"' in err and 'key id "k1"' in err

    assert await _in_thread(["rotate-key", "--redis-url", f"redis://127.0.0.1:{free_port()}"]) == 1
    assert "tenant registry unavailable" in capsys.readouterr().err

    monkeypatch.setenv("PGROUTER_SECRET_KEY", "k2:tooshort")
    assert await _in_thread(["rotate-key", "--redis-url", redis_server.url]) == 2
    assert "invalid key" in capsys.readouterr().err


def test_generate_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate-key", "k7"]) == 0
    kid, key = parse_key_spec(capsys.readouterr().out.strip())
    assert kid == "k7" and len(key) == 32
    assert cli.main(["generate-key", "bad kid"]) == 2


async def _in_thread(argv: list[str]) -> int:
    import asyncio

    return await asyncio.to_thread(cli.main, argv)
