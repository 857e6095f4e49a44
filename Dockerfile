# pgrouter: a slim image, running as a non-root user, configured through the environment
# (PGROUTER_*) and/or a TOML file mounted at /etc/pgrouter/pgrouter.toml.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgrouter
WORKDIR /app
COPY pyproject.toml README.md ./
COPY router ./router
RUN pip install --no-cache-dir . && rm -rf /root/.cache

USER pgrouter
ENV PGROUTER_LISTEN_HOST=0.0.0.0
EXPOSE 6432
ENTRYPOINT ["pgrouter", "run", "--config", "/etc/pgrouter/pgrouter.toml"]
