//! IR -> protobuf -> file. The protobuf message holds `Bytes` handles on the
//! weights (no copy), and is encoded straight into the output file through a
//! small buffer, so saving never holds a second copy of the model in memory.
//! Files are written as unnamed files in the target folder (Linux `O_TMPFILE`)
//! and given their name only once complete (`linkat` to a temporary name,
//! then `rename` over the target): on any error, and when the process is killed
//! (`SIGTERM`, `SIGKILL`) while it writes, nothing is left behind, and a reader
//! never sees a half-written model. Where the filesystem has no `O_TMPFILE`, a
//! named `.onnxopt-*.partial` file is used instead, removed on error (a
//! killed process leaves it). Like `cp` and `onnx.save`, saving does not fsync:
//! this is atomic against the process failing, not against power loss.

use super::pb;
use super::presence::{self as p, rest_of};
use super::SaveError;
use crate::ir::*;
use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Protobuf messages cannot pass 2 GiB (signed 32-bit sizes in most readers).
const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;
/// Tensors smaller than this stay inline when data goes external (onnx's `size_threshold`).
const EXTERNAL_THRESHOLD: u64 = 1024;
/// External tensors start on page boundaries so that runtimes can map them.
const EXTERNAL_ALIGNMENT: u64 = 4096;

/// Where tensor data goes when saving.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalData {
    /// Keep each tensor where the input had it; go external anyway when the model
    /// would pass protobuf's 2 GiB limit.
    #[default]
    AsInput,
    /// Every tensor of 1 KiB or more in the external file.
    Always,
    /// Everything inline (fails past 2 GiB).
    Never,
}

#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    pub external_data: ExternalData,
}

/// What was written.
#[derive(Clone, Debug, PartialEq)]
pub struct SaveSummary {
    pub model_bytes: u64,
    /// The external data file and its size, when one was written.
    pub external_file: Option<(PathBuf, u64)>,
}

/// Encodes a model into memory with every tensor inline (for verification and tests).
pub fn to_bytes(model: &Model) -> Vec<u8> {
    to_proto(model).encode_to_vec()
}

/// Writes `model` to `path` atomically (and `path` + `.data` for external data).
pub fn save(model: &Model, path: &Path, options: &SaveOptions) -> Result<SaveSummary, SaveError> {
    let io_err = |source| SaveError::Io { path: path.to_path_buf(), source };
    let mut proto = to_proto(model);
    let inline_size = proto.encoded_len() as u64;
    let externalize_large = match options.external_data {
        ExternalData::Always => true,
        ExternalData::AsInput => inline_size > PROTOBUF_LIMIT,
        ExternalData::Never if inline_size > PROTOBUF_LIMIT => return Err(SaveError::TooLargeToInline { path: path.to_path_buf(), size: inline_size }),
        ExternalData::Never => false,
    };
    let keep_external = options.external_data != ExternalData::Never;
    let data_path = external_data_path(path);
    let location = data_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut layout = ExternalLayout { location, chunks: Vec::new(), end: 0 };
    for_each_tensor(&mut proto, &mut |t| layout.place(t, externalize_large, keep_external));

    let folder = match path.parent() {
        Some(f) if !f.as_os_str().is_empty() => f.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp = |folder: &Path| PendingFile::create_in(folder).map_err(io_err);
    let mut data_file = None;
    if !layout.chunks.is_empty() {
        let mut file = temp(&folder)?;
        layout.write(file.file_mut()).map_err(|source| SaveError::Io { path: data_path.clone(), source })?;
        data_file = Some(file);
    }
    let mut model_file = temp(&folder)?;
    let model_bytes = write_message(&proto, model_file.file_mut()).map_err(io_err)?;

    let external_file = match data_file {
        Some(file) => {
            file.persist(&data_path).map_err(|source| SaveError::Io { path: data_path.clone(), source })?;
            Some((data_path.clone(), layout.end))
        }
        None => None,
    };
    if let Err(e) = model_file.persist(path) {
        if external_file.is_some() {
            let _ = std::fs::remove_file(&data_path);
        }
        return Err(io_err(e));
    }
    Ok(SaveSummary { model_bytes, external_file })
}

/// A file being written in its target folder, which gets a name only when
/// [`PendingFile::persist`] is called: unnamed (`O_TMPFILE`) where the
/// filesystem allows, else a named `.onnxopt-*.partial` temporary. Created
/// 0644, the mode a new output usually has.
enum PendingFile {
    Unnamed { file: File, folder: PathBuf },
    Named(tempfile::NamedTempFile),
}

impl PendingFile {
    fn create_in(folder: &Path) -> io::Result<PendingFile> {
        use std::os::unix::fs::OpenOptionsExt;
        // naming the file later goes through /proc/self/fd (linkat with
        // AT_EMPTY_PATH would need a capability): without /proc, a named temporary
        if !Path::new("/proc/self/fd").is_dir() {
            return PendingFile::named_in(folder);
        }
        let unnamed = std::fs::OpenOptions::new().write(true).read(true).custom_flags(libc::O_TMPFILE).mode(0o644).open(folder);
        match unnamed {
            Ok(file) => Ok(PendingFile::Unnamed { file, folder: folder.to_path_buf() }),
            // no O_TMPFILE here (filesystem or kernel): a named temporary
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOENT)) => PendingFile::named_in(folder),
            Err(e) => Err(e),
        }
    }

    fn named_in(folder: &Path) -> io::Result<PendingFile> {
        tempfile::Builder::new()
            .prefix(".onnxopt-")
            .suffix(".partial")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .tempfile_in(folder)
            .map(PendingFile::Named)
    }

    fn file_mut(&mut self) -> &mut File {
        match self {
            PendingFile::Unnamed { file, .. } => file,
            PendingFile::Named(named) => named.as_file_mut(),
        }
    }

    /// Gives the file its name `path`, replacing what was there.
    fn persist(self, path: &Path) -> io::Result<()> {
        match self {
            PendingFile::Named(named) => named.persist(path).map(|_| ()).map_err(|e| e.error),
            PendingFile::Unnamed { file, folder } => {
                use std::os::unix::ffi::OsStrExt;
                use std::os::unix::io::AsRawFd;
                let source = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(io::Error::other)?;
                let link = |name: &Path| -> io::Result<()> {
                    let target = std::ffi::CString::new(name.as_os_str().as_bytes()).map_err(io::Error::other)?;
                    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD and the flag are plain integers
                    let linked = unsafe { libc::linkat(libc::AT_FDCWD, source.as_ptr(), libc::AT_FDCWD, target.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
                    if linked != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                };
                // a new file gets its name in one call; linkat cannot replace
                // one, so an existing file is replaced by linking under a fresh
                // name and renaming over it (the only moment a temporary name
                // exists is between those two calls)
                match link(path) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        let staging = folder.join(format!(".onnxopt-{}-{}.partial", std::process::id(), file.as_raw_fd()));
                        link(&staging)?;
                        std::fs::rename(&staging, path).inspect_err(|_| {
                            let _ = std::fs::remove_file(&staging);
                        })
                    }
                    other => other,
                }
            }
        }
    }
}

/// `model.onnx` -> `model.onnx.data`.
pub fn external_data_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".data");
    path.with_file_name(name)
}

/// Decides which tensors go to the external file and at which offsets.
struct ExternalLayout {
    location: String,
    chunks: Vec<(u64, Bytes)>,
    end: u64,
}

impl ExternalLayout {
    /// `t` arrives with its bytes in `raw_data`; `data_location == EXTERNAL` marks
    /// a tensor the input stored externally.
    fn place(&mut self, t: &mut pb::TensorProto, externalize_large: bool, keep_external: bool) {
        let was_external = t.data_location == Some(pb::tensor_proto::DataLocation::External as i32);
        let size = t.raw_data.as_ref().map_or(0, |b| b.len() as u64);
        let external = t.raw_data.is_some() && ((was_external && keep_external) || (externalize_large && size >= EXTERNAL_THRESHOLD));
        if !external {
            if was_external {
                // onnx.load() leaves DEFAULT here after reading external data in.
                t.data_location = Some(pb::tensor_proto::DataLocation::Default as i32);
            }
            return;
        }
        let bytes = t.raw_data.take().unwrap_or_default();
        let offset = self.end.next_multiple_of(EXTERNAL_ALIGNMENT);
        self.end = offset + size;
        let entry = |k: &str, v: String| pb::StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        t.external_data.splice(0..0, [entry("location", self.location.clone()), entry("offset", offset.to_string()), entry("length", size.to_string())]);
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        self.chunks.push((offset, bytes));
    }

    fn write(&self, file: &mut File) -> io::Result<()> {
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut at = 0u64;
        for (offset, bytes) in &self.chunks {
            let padding = (offset - at) as usize;
            out.write_all(&vec![0u8; padding])?;
            out.write_all(bytes)?;
            at = offset + bytes.len() as u64;
        }
        out.flush()
    }
}

/// Encodes `message` into `file` through a 1 MiB buffer; large byte fields go
/// straight from their source to the file.
fn write_message(message: &impl Message, file: &mut File) -> io::Result<u64> {
    let mut sink = FileSink { out: file, buffer: Vec::with_capacity(1 << 20), error: None, written: 0 };
    message.encode(&mut sink).map_err(io::Error::other)?;
    sink.flush_buffer();
    match sink.error.take() {
        Some(e) => Err(e),
        None => Ok(sink.written),
    }
}

/// A `BufMut` that writes to a file. `BufMut` cannot fail, so the first I/O error
/// is kept and reported after encoding.
struct FileSink<'f> {
    out: &'f mut File,
    buffer: Vec<u8>,
    error: Option<io::Error>,
    written: u64,
}

impl FileSink<'_> {
    fn write_through(&mut self, bytes: &[u8]) {
        if self.error.is_none() {
            if let Err(e) = self.out.write_all(bytes) {
                self.error = Some(e);
            }
        }
        self.written += bytes.len() as u64;
    }

    fn flush_buffer(&mut self) {
        let buffer = std::mem::take(&mut self.buffer);
        self.write_through(&buffer);
        self.buffer = buffer;
        self.buffer.clear();
    }
}

// SAFETY: `chunk_mut` hands out the spare capacity of `buffer`, and `advance_mut`
// only extends the length over bytes the caller has initialised, as BufMut requires.
unsafe impl BufMut for FileSink<'_> {
    fn remaining_mut(&self) -> usize {
        isize::MAX as usize
    }

    unsafe fn advance_mut(&mut self, count: usize) {
        let len = self.buffer.len() + count;
        assert!(len <= self.buffer.capacity(), "advance past the chunk handed out");
        // SAFETY: the caller initialised `count` bytes of the spare capacity.
        unsafe { self.buffer.set_len(len) };
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        if self.buffer.len() == self.buffer.capacity() {
            self.flush_buffer();
        }
        UninitSlice::uninit(self.buffer.spare_capacity_mut())
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        if src.remaining() < 64 * 1024 {
            while src.has_remaining() {
                let chunk = src.chunk();
                let n = chunk.len();
                self.put_slice(chunk);
                src.advance(n);
            }
            return;
        }
        self.flush_buffer();
        while src.has_remaining() {
            let n = src.chunk().len();
            let chunk = src.copy_to_bytes(n);
            self.write_through(&chunk);
        }
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= 64 * 1024 {
            self.flush_buffer();
            self.write_through(src);
            return;
        }
        if self.buffer.capacity() - self.buffer.len() < src.len() {
            self.flush_buffer();
        }
        self.buffer.extend_from_slice(src);
    }
}

/// Visits every tensor of the model's graphs (initializers, tensor attributes,
/// subgraphs); model-local functions are kept as written.
fn for_each_tensor(model: &mut pb::ModelProto, visit: &mut impl FnMut(&mut pb::TensorProto)) {
    fn graph(g: &mut pb::GraphProto, visit: &mut impl FnMut(&mut pb::TensorProto)) {
        g.initializer.iter_mut().for_each(&mut *visit);
        for node in &mut g.node {
            for a in &mut node.attribute {
                if let Some(t) = a.t.as_mut() {
                    visit(t);
                }
                a.tensors.iter_mut().for_each(&mut *visit);
                if let Some(sub) = a.g.as_mut() {
                    graph(sub, visit);
                }
                for sub in &mut a.graphs {
                    graph(sub, visit);
                }
            }
        }
    }
    if let Some(g) = model.graph.as_mut() {
        graph(g, visit);
    }
}

fn to_proto(m: &Model) -> pb::ModelProto {
    let mut proto: pb::ModelProto = rest_of(&m.extras);
    proto.ir_version = p::put(m.ir_version, p::MODEL_IR_VERSION, &m.extras);
    proto.producer_name = p::put(m.producer_name.clone(), p::MODEL_PRODUCER_NAME, &m.extras);
    proto.producer_version = p::put(m.producer_version.clone(), p::MODEL_PRODUCER_VERSION, &m.extras);
    proto.domain = p::put(m.domain.clone(), p::MODEL_DOMAIN, &m.extras);
    proto.model_version = p::put(m.model_version, p::MODEL_VERSION, &m.extras);
    proto.opset_import = m
        .opset_imports
        .iter()
        .map(|o| {
            let mut op: pb::OperatorSetIdProto = rest_of(&o.extras);
            op.domain = p::put(o.domain.clone(), p::OPSET_DOMAIN, &o.extras);
            op.version = p::put(o.version, p::OPSET_VERSION, &o.extras);
            op
        })
        .collect();
    proto.functions = m.functions.iter().map(|f| pb::FunctionProto::decode(f.encoded.clone()).unwrap_or_default()).collect();
    proto.graph = Some(graph_proto(&m.graph));
    proto
}

fn graph_proto(g: &Graph) -> pb::GraphProto {
    let mut proto: pb::GraphProto = rest_of(&g.extras);
    proto.name = p::put(g.name.clone(), p::NAME, &g.extras);
    proto.node = g.nodes().map(node_proto).collect();
    proto.initializer = g.initializers.iter().map(tensor_proto).collect();
    proto.input = g.inputs.iter().map(value_info_proto).collect();
    proto.output = g.outputs.iter().map(value_info_proto).collect();
    proto.value_info = g.value_info.iter().map(value_info_proto).collect();
    proto
}

fn node_proto(n: &Node) -> pb::NodeProto {
    let mut proto: pb::NodeProto = rest_of(&n.extras);
    proto.name = p::put(n.name.clone(), p::NAME, &n.extras);
    proto.op_type = p::put(n.op_type.clone(), p::NODE_OP_TYPE, &n.extras);
    proto.domain = p::put(n.domain.clone(), p::NODE_DOMAIN, &n.extras);
    proto.input = n.inputs.clone();
    proto.output = n.outputs.clone();
    proto.attribute = n.attributes.iter().map(attribute_proto).collect();
    proto
}

fn attribute_proto(a: &Attribute) -> pb::AttributeProto {
    use pb::attribute_proto::AttributeType as T;
    let mut proto: pb::AttributeProto = rest_of(&a.extras);
    proto.name = p::put(a.name.clone(), p::NAME, &a.extras);
    let kind = match &a.value {
        AttrValue::Float(f) => {
            proto.f = Some(*f);
            T::Float
        }
        AttrValue::Int(i) => {
            proto.i = Some(*i);
            T::Int
        }
        AttrValue::String(s) => {
            proto.s = Some(s.clone());
            T::String
        }
        AttrValue::Tensor(t) => {
            proto.t = Some(tensor_proto(t));
            T::Tensor
        }
        AttrValue::Graph(g) => {
            proto.g = Some(graph_proto(g));
            T::Graph
        }
        AttrValue::SparseTensor(o) => {
            proto.sparse_tensor = Some(pb::SparseTensorProto::decode(o.0.clone()).unwrap_or_default());
            T::SparseTensor
        }
        AttrValue::Type(t) => {
            proto.tp = Some(type_proto(t));
            T::TypeProto
        }
        AttrValue::Floats(v) => {
            proto.floats = v.clone();
            T::Floats
        }
        AttrValue::Ints(v) => {
            proto.ints = v.clone();
            T::Ints
        }
        AttrValue::Strings(v) => {
            proto.strings = v.clone();
            T::Strings
        }
        AttrValue::Tensors(v) => {
            proto.tensors = v.iter().map(tensor_proto).collect();
            T::Tensors
        }
        AttrValue::Graphs(v) => {
            proto.graphs = v.iter().map(graph_proto).collect();
            T::Graphs
        }
        AttrValue::SparseTensors(v) => {
            proto.sparse_tensors = v.iter().map(|o| pb::SparseTensorProto::decode(o.0.clone()).unwrap_or_default()).collect();
            T::SparseTensors
        }
        AttrValue::Types(v) => {
            proto.type_protos = v.iter().map(type_proto).collect();
            T::TypeProtos
        }
        // kept whole in the extras, type included
        AttrValue::Uninterpreted => return proto,
    };
    if a.extras.present_defaults & (1 << p::ATTR_TYPE_ABSENT) == 0 {
        proto.r#type = Some(kind as i32);
    }
    proto
}

fn tensor_proto(t: &Tensor) -> pb::TensorProto {
    let mut proto: pb::TensorProto = rest_of(&t.extras);
    proto.name = p::put(t.name.clone(), p::NAME, &t.extras);
    proto.data_type = p::put(t.dtype.code(), p::TENSOR_DATA_TYPE, &t.extras);
    proto.dims = t.dims.clone();
    match &t.data {
        TensorData::Raw(bytes) => proto.raw_data = p::put(bytes.clone(), p::TENSOR_RAW_DATA, &t.extras),
        TensorData::Typed(TypedValues::Floats(v)) => proto.float_data = v.clone(),
        TensorData::Typed(TypedValues::Int32s(v)) => proto.int32_data = v.clone(),
        TensorData::Typed(TypedValues::Strings(v)) => proto.string_data = v.clone(),
        TensorData::Typed(TypedValues::Int64s(v)) => proto.int64_data = v.clone(),
        TensorData::Typed(TypedValues::Doubles(v)) => proto.double_data = v.clone(),
        TensorData::Typed(TypedValues::Uint64s(v)) => proto.uint64_data = v.clone(),
        TensorData::Empty => {}
    }
    proto.data_location = if t.stored_externally {
        // A marker for ExternalLayout::place, which decides where the bytes go.
        Some(pb::tensor_proto::DataLocation::External as i32)
    } else {
        p::put(pb::tensor_proto::DataLocation::Default as i32, p::TENSOR_DATA_LOCATION, &t.extras)
    };
    proto
}

fn value_info_proto(v: &ValueInfo) -> pb::ValueInfoProto {
    let mut proto: pb::ValueInfoProto = rest_of(&v.extras);
    proto.name = p::put(v.name.clone(), p::NAME, &v.extras);
    proto.r#type = v.ty.as_ref().map(type_proto);
    proto
}

fn type_proto(t: &ValueType) -> pb::TypeProto {
    use pb::tensor_shape_proto::{dimension::Value as DimValue, Dimension};
    match t {
        ValueType::Other(o) => pb::TypeProto::decode(o.0.clone()).unwrap_or_default(),
        ValueType::Tensor(tensor) => pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: tensor.elem_type.map(DataType::code),
                shape: tensor.shape.as_ref().map(|dims| pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            denotation: None,
                            value: match d {
                                Dim::Fixed(v) => Some(DimValue::DimValue(*v)),
                                Dim::Symbol(s) => Some(DimValue::DimParam(s.clone())),
                                Dim::Unknown => None,
                            },
                        })
                        .collect(),
                }),
            })),
            denotation: None,
        },
    }
}
