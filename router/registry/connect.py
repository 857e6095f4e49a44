"""From a registry URL to a redis-py asyncio client: standalone, TLS, Sentinel or Cluster.

The clients are built with no automatic retries: a retried write script whose first run did
execute would report a spurious conflict, and a pub/sub connection that reconnected silently
would hide exactly the gap the registry version is there to close (see invalidation.py).
Failures surface at once, as RegistryUnavailable; callers decide whether to retry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from router.registry.errors import RegistryUnavailable

DEFAULT_PREFIX = "pgrouter:"
# With Redis Cluster the write script touches three keys, which must share a slot.
CLUSTER_PREFIX = "{pgrouter}:"
PLAIN_SCHEMES = frozenset({"redis", "rediss", "unix"})
SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})

# What "Redis is not there" looks like through redis-py (refused, reset, timed out, failing over,
# a replica that was the master, a cluster without a covered slot). MasterNotFoundError and
# BusyLoadingError are ConnectionErrors; the builtin TimeoutError is an OSError.
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ReadOnlyError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.RedisClusterException,
    OSError,
)


@dataclass(slots=True)
class RedisConnection:
    client: Any  # redis.asyncio.Redis or RedisCluster, decoding replies to str
    prefix: str
    location: str  # the URL without password or query, for messages
    socket_timeout: float
    closers: list[Callable[[], Any]] = field(default_factory=list)  # beyond client.aclose()

    @contextmanager
    def reaching_redis(self) -> Iterator[None]:
        """Turn redis-py's ways of failing to reach the server into RegistryUnavailable."""
        try:
            yield
        except REDIS_DOWN_ERRORS as exc:
            raise RegistryUnavailable(
                f"tenant registry unavailable: cannot reach Redis at {self.location} "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    async def close(self) -> None:
        await self.client.aclose()
        for close in self.closers:
            await close()


def connect(
    url: str,
    *,
    prefix: str | None = None,
    socket_timeout: float = 2.0,
    connect_timeout: float = 2.0,
) -> RedisConnection:
    """``redis://``, ``rediss://`` (TLS; ``?ssl_ca_certs=`` and the like pass to redis-py),
    ``unix://``; ``redis+sentinel://[:password@]host:port,host:port/service[/db]``
    (``rediss+sentinel`` for TLS, ``?sentinel_password=`` if the sentinels want one);
    ``redis+cluster://[:password@]host:port,host:port`` (``rediss+cluster`` for TLS). With a
    cluster, a prefix without a ``{hash tag}`` gets one. No I/O until the first command."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    location = _redact(url)
    if scheme in PLAIN_SCHEMES:
        client = aioredis.Redis.from_url(url, **common)
        return RedisConnection(client, prefix or DEFAULT_PREFIX, location, socket_timeout)
    if scheme not in SENTINEL_SCHEMES | CLUSTER_SCHEMES:
        raise ValueError(f"unsupported registry URL scheme {parts.scheme!r}")
    tls = scheme.startswith("rediss+")
    username, password, hosts = _split_netloc(parts.netloc)
    if tls:
        common["ssl"] = True
    if scheme in CLUSTER_SCHEMES:
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in hosts],
            username=username,
            password=password,
            **common,
        )
        return RedisConnection(client, cluster_prefix(prefix), location, socket_timeout)

    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("a sentinel URL needs /service_name[/db] after the hosts")
    sentinel_kwargs = {
        key: common[key] for key in ("socket_timeout", "socket_connect_timeout", "retry")
    }
    if tls:
        sentinel_kwargs["ssl"] = True
    query = parse_qs(parts.query)
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"][0]
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
    client = sentinel.master_for(
        path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
        **common,
    )
    closers = [sentinel_client.aclose for sentinel_client in sentinel.sentinels]
    return RedisConnection(client, prefix or DEFAULT_PREFIX, location, socket_timeout, closers)


def cluster_prefix(prefix: str | None) -> str:
    """A prefix that keeps every registry key in one Redis Cluster slot."""
    if prefix is None:
        return CLUSTER_PREFIX
    opening = prefix.find("{")
    if opening >= 0 and prefix.find("}", opening + 1) > opening + 1:
        return prefix  # already has a non-empty hash tag
    return "{" + prefix.rstrip(":") + "}:"


def _split_netloc(netloc: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """``[user[:password]@]host:port,host:port`` -> (user, password, hosts)."""
    userinfo, _, hostlist = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"registry URL host {item!r} must be host:port")
        hosts.append((host.strip("[]"), int(port)))
    return username, password, hosts


def _redact(url: str) -> str:
    parts = urlsplit(url)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.partition(":")[0]
        parts = parts._replace(netloc=f"{user}:***@{hostlist}")
    return parts._replace(query="").geturl()
