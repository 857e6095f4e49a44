# pgrouter: a slim image that runs `pgrouter run` as a non-root user, configured through
# PGROUTER_* environment variables and/or a TOML file at /etc/pgrouter/pgrouter.toml
# (the environment wins). See deploy/README.md.

# Build stage: install pgrouter and its dependencies into a virtualenv. Every dependency
# ships manylinux wheels for CPython 3.11, so no compiler is needed; the stage only keeps
# pip, its cache and the source tree out of the final image.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/pgrouter
WORKDIR /src
COPY pyproject.toml README.md ./
COPY router ./router
RUN /opt/pgrouter/bin/pip install . \
 && /opt/pgrouter/bin/pip uninstall --yes pip

# Runtime stage.
FROM python:3.11-slim
# A fixed numeric UID/GID: Kubernetes can only verify runAsNonRoot against a numeric USER.
RUN groupadd --system --gid 10001 pgrouter \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pgrouter
COPY --from=build /opt/pgrouter /opt/pgrouter
# A file with no settings, so that `--config` always has a file and the environment alone
# can configure the router. Mount your own file over it (the Kubernetes ConfigMap does).
COPY deploy/docker/pgrouter.toml /etc/pgrouter/pgrouter.toml

# Bytecode was compiled at install time; the root filesystem may be read-only at run time.
ENV PATH="/opt/pgrouter/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PGROUTER_LISTEN_HOST=0.0.0.0 \
    PGROUTER_LISTEN_PORT=6432 \
    PGROUTER_ADMIN_HOST=0.0.0.0 \
    PGROUTER_ADMIN_PORT=8080

USER 10001:10001
EXPOSE 6432 8080

# Liveness of the process only (/healthz); readiness (/readyz) is for load balancers and
# Kubernetes, which probe it themselves. No curl in slim images: Python's urllib, which
# exits non-zero on a refused connection, a timeout or a non-2xx status.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

# pgrouter drains its clients on SIGTERM for up to PGROUTER_SHUTDOWN_TIMEOUT seconds (30 by
# default): give it longer than that before the kill (`docker stop -t 40`, compose's
# stop_grace_period, Kubernetes' terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgrouter"]
CMD ["run", "--config", "/etc/pgrouter/pgrouter.toml"]
