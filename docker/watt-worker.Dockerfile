# The reference worker alone, for clusters that run shards in their own pods. Build from the
# repository root:  docker build -f docker/watt-worker.Dockerfile -t watt-worker .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p watt-worker --bin watt-worker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/watt-worker /usr/local/bin/watt-worker
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/watt-worker"]
