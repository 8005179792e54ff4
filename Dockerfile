# http2sms-gateway: the gateway on its embedded SQLite store, built from the lock files.
#   docker build -t http2sms-gateway .
#   docker run -d --name http2sms -p 8080:8080 -v http2sms-data:/data \
#       --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
#       http2sms-gateway
# README.md's "Deployment" section explains each flag. Checked by hadolint in scripts/test;
# tests/unit/test_deployment.py checks that what it copies exists.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: wheels only, hashes checked; nothing of this stage but /opt/venv goes on.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements/build.txt requirements/runtime.txt requirements/
# The locked setuptools builds the gateway's wheel; the runtime venv gets the lock's exact
# files (--only-binary: no compiler is needed, nor ever present).
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --no-deps --only-binary :all: \
        -r requirements/build.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps --only-binary :all: \
        -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-deps /wheels/*.whl \
    && /opt/venv/bin/pip uninstall --yes pip

# --- the image: the venv, the example settings, a user without a shell.
FROM ${PYTHON_IMAGE}
# Keep VERSION in step with pyproject.toml (tests/unit/test_deployment.py checks it);
# SOURCE and REVISION: `--build-arg SOURCE=<repository URL> --build-arg REVISION=<commit>`.
ARG VERSION=0.1.0
ARG SOURCE=""
ARG REVISION=""
LABEL org.opencontainers.image.title="http2sms-gateway" \
      org.opencontainers.image.description="Self-hosted SMS gateway, a drop-in replacement for OVHcloud's http2sms.cgi" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed uid, so that a bind-mounted /data can be given to it (`chown 10001:10001`,
# `chmod 700`). /data is the user's alone (0700): the store warns at every start
# (store_open_to_others) when its folder is open to others, and a new named volume takes
# the folder's mode and owner.
RUN groupadd --system --gid 10001 http2sms \
    && useradd --system --uid 10001 --gid http2sms --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin http2sms \
    && install -d -m 0700 -o 10001 -g 10001 /data

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY config ./config

# The root filesystem can be read-only (`--read-only`): the store and its WAL live in
# /data, bytecode was compiled at build time, logs go to stdout.
# The admin API has its own listener, on the container's loopback: the public port 8080
# serves no admin route. To manage from the host, publish it on the host's loopback only:
#   docker run ... -p 127.0.0.1:8081:8081 -e HTTP2SMS_ADMIN_HOST=0.0.0.0 -e HTTP2SMS_ADMIN_TOKEN
# (HTTP2SMS_ADMIN_TOKEN: at least 24 characters, for every account; tokens for some accounts:
#  `docker exec <container> http2sms token create NAME --account ACCOUNT`.)
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HTTP2SMS_SERVER_HOST=0.0.0.0 \
    HTTP2SMS_SERVER_PORT=8080 \
    HTTP2SMS_ADMIN_HOST=127.0.0.1 \
    HTTP2SMS_ADMIN_PORT=8081 \
    HTTP2SMS_STORE_PATH=/data/gateway.sqlite3 \
    HTTP2SMS_LOG_FORMAT=json \
    HTTP2SMS_SERVER_SHUTDOWN_GRACE_SECONDS=8

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8080 8081
# /healthz answers 200 while the process serves; no curl in the slim image, so Python asks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['HTTP2SMS_SERVER_PORT'] + '/healthz', timeout=4)"]
# SIGTERM lets the gateway finish in-flight requests and flush before exiting; the grace
# above stays under `docker stop`'s default 10 s before SIGKILL.
STOPSIGNAL SIGTERM
# Each client connection holds a file descriptor: give the gateway room with
# `docker run --ulimit nofile=65536:65536 ...` (compose: `ulimits: nofile: 65536`). It raises
# its soft limit to the hard one at start, and warns (`low_file_limit`) when that stays
# under twice server.max_connections_per_address.
ENTRYPOINT ["http2sms"]
CMD ["serve"]
