//! Compiles `proto/watt/v1/*.proto` with the `protoc` vendored as a crate, so that building Watt
//! needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build reads PROTOC; a build script is single-threaded, so setting it here is sound.
    std::env::set_var("PROTOC", protoc);
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("watt_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptors)
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/watt/v1/watt.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
