//! Compiles the vendored `proto/onnx.proto` (proto2, so field presence survives a
//! round trip) with prost-build through protox: no `protoc` is needed.
//! Every `bytes` field decodes to `bytes::Bytes`, so tensor data read from a
//! memory-mapped file is a slice of the map, never a copy.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let file_descriptors = protox::compile(["onnx.proto"], ["proto"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(file_descriptors)?;
    Ok(())
}
