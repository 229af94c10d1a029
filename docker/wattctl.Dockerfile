# The command line (also the chart's `helm test` image). Build from the repository root:
#   docker build -f docker/wattctl.Dockerfile -t wattctl .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p wattctl --bin wattctl

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/wattctl /usr/local/bin/wattctl
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/wattctl"]
