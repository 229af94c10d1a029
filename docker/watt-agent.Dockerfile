# The node agent, with the reference worker. Shards run as the agent's child processes — in this
# image, unless the chart's agent.shardExec is host — so for real jobs build it on the image that
# holds your training stack, and name the runtime it offers jobs (their `runtime:`):
#
#   docker build -f docker/watt-agent.Dockerfile -t watt-agent .      # Debian slim, python3
#   docker build -f docker/watt-agent.Dockerfile \
#     --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3 --build-arg RUNTIME=pytorch-25.01 \
#     -t registry.example.com/ml/watt-agent:pytorch-25.01 .
#
# The agent's binaries link against glibc: BUILD_IMAGE's must be no newer than BASE_IMAGE's
# (Debian 12's 2.36 by default; for a base on an older distribution, a Rust image of it).
ARG BUILD_IMAGE=rust:1.95-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p watt-agent -p watt-worker --bin watt-agent --bin watt-worker

# NVML (libnvidia-ml.so.1) is not in the image: the NVIDIA container runtime mounts the host
# driver's copy (the chart sets runtimeClassName: nvidia).
FROM ${BASE_IMAGE}
ARG RUNTIME=""
# What this image offers jobs, unless the chart's agent.runtimes (--runtimes) says otherwise.
ENV WATT_RUNTIMES=${RUNTIME}
# python3 for the progress helper, where the base image has none (a training image has its own).
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends ca-certificates python3 && \
      rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /src/target/release/watt-agent /src/target/release/watt-worker /usr/local/bin/
COPY examples/watt_progress.py examples/pytorch_ddp.py /opt/watt/examples/
# Non-root by default; setting GPU power limits, running shards as another user and entering the
# host's namespaces need root, which the chart grants only with agent.enforce=on or
# agent.shardExec=host.
USER 65532:65532
EXPOSE 9400
ENTRYPOINT ["/usr/local/bin/watt-agent"]
