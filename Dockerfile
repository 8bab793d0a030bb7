# syntax=docker/dockerfile:1
# Multi-stage build: a locked release build, then a slim non-root runtime.
#   docker build -t cutover .
#   docker run -p 8080:8080 -p 127.0.0.1:9901:9901 \
#     -v $PWD/config:/etc/cutover:ro -v cutover-state:/var/lib/cutover cutover

FROM rust:1-slim-bookworm AS build
# make: jemalloc (the binary's allocator) is built from C with configure + make.
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY crates crates
COPY benches benches
COPY tests tests
RUN cargo build --release --locked --bin cutover

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/cutover --shell /usr/sbin/nologin cutover \
    && mkdir -p /etc/cutover /var/lib/cutover \
    && chown cutover:cutover /var/lib/cutover
COPY --from=build /src/target/release/cutover /usr/local/bin/cutover
USER cutover
WORKDIR /var/lib/cutover
# Configuration (read-only) and state (read-write, must survive the container).
VOLUME ["/etc/cutover", "/var/lib/cutover"]
ENV CUTOVER_CONFIG=/etc/cutover/cutover.yaml
EXPOSE 8080 8443 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["cutover"]
CMD ["serve"]
