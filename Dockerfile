# Sluice broker image.
#
#   docker build -t sluice .
#   docker run -d --name sluice -p 9092:9092 -p 8080:8080 \
#       -e SLUICE_ADVERTISED_KAFKA_ADDR=localhost:9092 -v sluice-data:/data sluice
#
# On a machine whose Docker engine cannot pull images, use
# docker/build-base-image.sh and docker/build-local-image.sh instead (README,
# "Docker"). The runtime stage below must stay identical to the one in
# docker/Dockerfile.local (tests/docker/run.sh checks it).

ARG RUST_VERSION=1

# ---- build stage ---------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The image already carries gcc, make, perl and zlib headers, which the
# bundled librdkafka (used by the CLI) needs to build.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN cargo build --release --locked -p sluice \
    && install -m 0755 target/release/sluice /usr/local/bin/sluice

# ---- runtime stage -------------------------------------------------------
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin sluice \
    && mkdir -p /data \
    && chown sluice:sluice /data
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
USER sluice
WORKDIR /data
# A named volume mounted here inherits the sluice owner from the image.
VOLUME ["/data"]
# 9092: Kafka protocol. 5672: AMQP 0-9-1. 8080: HTTP (/healthz, admin).
EXPOSE 9092 5672 8080
ENV SLUICE_LOG=info
# As in RabbitMQ's own image: clients reach the container through a published port,
# never over its loopback, so the default user `guest` may connect from anywhere.
ENV SLUICE_AMQP_GUEST_LOOPBACK_ONLY=false
# The slim base has no curl: speak HTTP/1.0 over bash's /dev/tcp and accept
# only a 200 status line.
HEALTHCHECK --interval=5s --timeout=3s --start-period=15s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200'"]
ENTRYPOINT ["sluice"]
CMD ["serve", "--data-dir", "/data", "--kafka-addr", "0.0.0.0:9092", "--http-addr", "0.0.0.0:8080", "--amqp-addr", "0.0.0.0:5672"]
