#![no_main]
//! Feeds arbitrary bytes to the loader, and re-encodes what loads: neither may panic,
//! and a loaded model must survive its own round trip.

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let label = Path::new("fuzz.onnx");
    if let Ok(model) = onnxopt::onnx::load_bytes(bytes::Bytes::copy_from_slice(data), label) {
        let encoded = onnxopt::onnx::to_bytes(&model);
        let again = onnxopt::onnx::load_bytes(encoded.into(), label).expect("a saved model loads");
        assert_eq!(again, model);
    }
});
