//! What a rewritten model is for: the runtime that will load it. A target
//! chooses which emission of a fusion rule is written and how quantization
//! lays out its ops; it never changes what matches.

use std::fmt;
use std::str::FromStr;

/// What the output is for: chooses rule emissions, never the matching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// ONNX Runtime: com.microsoft fused ops.
    Ort,
    /// Standard ONNX only, at the model's opset (or the one `--opset` raises it to).
    Portable,
    /// Standard ops TensorRT parses, in the shapes its own fusions recognise.
    TensorRt,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Ort => "ort",
            Target::Portable => "portable",
            Target::TensorRt => "tensorrt",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        match s {
            "ort" => Ok(Target::Ort),
            "portable" => Ok(Target::Portable),
            "tensorrt" => Ok(Target::TensorRt),
            other => Err(format!("unknown target '{other}' (ort, portable, tensorrt)")),
        }
    }
}

impl serde::Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}
