# Multi-stage build: one image with both binaries (fleetgate, firmware-sim).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p fleetgate -p firmware-sim

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/fleetgate fleetgate && mkdir -p /var/lib/fleetgate && chown fleetgate /var/lib/fleetgate
COPY --from=build /src/target/release/fleetgate /src/target/release/firmware-sim /usr/local/bin/
COPY --from=build /src/firmware-sim/scenarios /usr/share/fleetgate/scenarios
USER fleetgate
WORKDIR /var/lib/fleetgate
ENV FLEETGATE_DATA_DIR=/var/lib/fleetgate
EXPOSE 1883 8883 8080
ENTRYPOINT ["fleetgate"]
CMD ["serve"]
