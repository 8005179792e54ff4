# http2sms-gateway: the gateway on its embedded SQLite store.
#   docker build -t http2sms-gateway .
#   docker run -p 8080:8080 -v http2sms-data:/data http2sms-gateway
# The admin API has its own listener, on the container's loopback: the public port 8080
# serves no admin route. To manage from the host, publish it on the host's loopback only:
#   docker run -p 8080:8080 -p 127.0.0.1:8081:8081 -e HTTP2SMS_ADMIN_HOST=0.0.0.0 \
#     -e HTTP2SMS_ADMIN_TOKEN -v http2sms-data:/data http2sms-gateway
# (HTTP2SMS_ADMIN_TOKEN: at least 24 characters, for every account; tokens for some accounts:
#  `docker exec <container> http2sms token create NAME --account ACCOUNT`.)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HTTP2SMS_SERVER_HOST=0.0.0.0 \
    HTTP2SMS_SERVER_PORT=8080 \
    HTTP2SMS_STORE_PATH=/data/gateway.sqlite3 \
    HTTP2SMS_ADMIN_HOST=127.0.0.1 \
    HTTP2SMS_ADMIN_PORT=8081 \
    HTTP2SMS_LOG_FORMAT=json \
    HTTP2SMS_SERVER_SHUTDOWN_GRACE_SECONDS=8

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY config ./config
RUN pip install --no-cache-dir '.[fast]' \
    && useradd --system --home-dir /data --create-home http2sms

USER http2sms
VOLUME ["/data"]
EXPOSE 8080 8081
# SIGTERM lets the gateway finish in-flight requests and flush before exiting; the grace
# above stays under `docker stop`'s default 10 s before SIGKILL.
STOPSIGNAL SIGTERM
# Each client connection holds a file descriptor: give the gateway room with
# `docker run --ulimit nofile=65536:65536 ...` (compose: `ulimits: nofile: 65536`). It raises
# its soft limit to the hard one at start, and warns (`low_file_limit`) when that stays
# under twice server.max_connections_per_address.
ENTRYPOINT ["http2sms"]
CMD ["serve"]
