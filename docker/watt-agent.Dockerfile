# The node agent, with the reference worker (shards run as the agent's child processes).
# Build from the repository root:  docker build -f docker/watt-agent.Dockerfile -t watt-agent .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p watt-agent -p watt-worker --bin watt-agent --bin watt-worker

# NVML (libnvidia-ml.so.1) is not in the image: the NVIDIA container runtime mounts the host
# driver's copy (the chart sets runtimeClassName: nvidia).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates python3 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/watt-agent /src/target/release/watt-worker /usr/local/bin/
COPY examples/watt_progress.py /opt/watt/examples/watt_progress.py
# Non-root by default; setting GPU power limits needs root with CAP_SYS_ADMIN, which the chart
# grants only with agent.enforce=on.
USER 65532:65532
EXPOSE 9400
ENTRYPOINT ["/usr/local/bin/watt-agent"]
