//! `watt-proto`: the `watt.v1` wire contract between agents, the controller and `wattctl`.
//!
//! The `.proto` files under `proto/watt/v1/` are the source of truth; this crate only compiles
//! them (with a vendored `protoc`, so no system install is needed) and re-exports the generated
//! prost messages and tonic services.

/// Version 1 of the Watt API.
pub mod v1 {
    #![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    tonic::include_proto!("watt.v1");

    /// The encoded descriptors of `watt.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("watt_descriptor");
}
