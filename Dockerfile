# Multi-stage build: one image with both binaries (fleetgate, firmware-sim).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p fleetgate -p firmware-sim

FROM debian:bookworm-slim
# curl: the compose healthcheck asks /healthz.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/fleetgate fleetgate && mkdir -p /var/lib/fleetgate && chown fleetgate /var/lib/fleetgate
COPY --from=build /src/target/release/fleetgate /src/target/release/firmware-sim /usr/local/bin/
COPY --from=build /src/firmware-sim/scenarios /usr/share/fleetgate/scenarios
USER fleetgate
WORKDIR /var/lib/fleetgate
ENV FLEETGATE_DATA_DIR=/var/lib/fleetgate
EXPOSE 1883 8883 8080
# Open files: one per device connection, and the MQTT connection budget is derived from the
# limit. An image cannot carry a ulimit; the entrypoint raises the soft limit to
# FLEETGATE_NOFILE (default: as high as the container's hard limit allows) before the gateway
# starts, and the gateway logs the limit it got. Raise the hard limit at run time:
# `docker run --ulimit nofile=1048576:1048576` (docker-compose.yml does).
ENV FLEETGATE_NOFILE=1048576
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
    CMD curl -fsS "http://127.0.0.1:${FLEETGATE_HEALTH_PORT:-8080}/healthz" >/dev/null || exit 1
ENTRYPOINT ["/bin/sh", "-c", "ulimit -n \"$FLEETGATE_NOFILE\" 2>/dev/null || ulimit -n \"$(ulimit -H -n)\"; exec fleetgate \"$@\"", "fleetgate"]
CMD ["serve"]
