# floe in a container. The default command is `floe serve` with the config at /config/floe.yml;
# any other command works too: `docker run IMAGE run -c /config/floe.yml`, `... check ...`.
# Build: docker build -t floe .   (see docs/deploy.md)
FROM python:3.11-slim

COPY pyproject.toml README.md /tmp/floe/
COPY src /tmp/floe/src
RUN pip install --no-cache-dir /tmp/floe && rm -rf /tmp/floe \
    && useradd --create-home --uid 10001 floe \
    && mkdir -p /data && chown floe /data

USER floe
# Relative paths in floe.yml resolve next to it; the stage and a DuckDB file belong on a volume.
WORKDIR /data
ENV PYTHONUNBUFFERED=1
# `floe serve` finishes the current load on SIGTERM and exits 0: give it time (docker stop -t, or
# Kubernetes' terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["floe"]
CMD ["serve", "-c", "/config/floe.yml"]
