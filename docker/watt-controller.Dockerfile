# The controller. Build from the repository root:
#   docker build -f docker/watt-controller.Dockerfile -t watt-controller .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p watt-controller --bin watt-controller

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/watt-controller /usr/local/bin/watt-controller
USER nonroot:nonroot
EXPOSE 7070 9401
ENTRYPOINT ["/usr/local/bin/watt-controller"]
