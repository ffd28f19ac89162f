//! Protobuf -> IR. Decoding is zero-copy: `bytes` fields are slices of the
//! memory-mapped file. Everything the file controls is checked here (dims, data
//! lengths, external data locations, dangling tensor names) so that nothing past
//! the loader has to distrust the IR.

use super::external::{map_file, ExternalFiles, ExternalRef};
use super::pb;
use super::presence::{self as p, extras_of};
use super::wire;
use super::LoadError;
use crate::ir::*;
use bytes::Bytes;
use prost::Message;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// How to read a model file.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Map every page of the file(s) up front, for callers that will read all the
    /// weights (convert, optimize, quantize). Off, pages are read on first touch.
    pub populate: bool,
}

/// Reads a model file; external data resolves against its folder. Weights stay
/// in the memory-mapped file until a pass changes them.
pub fn load(path: &Path) -> Result<Model, LoadError> {
    load_with(path, LoadOptions::default())
}

pub fn load_with(path: &Path, options: LoadOptions) -> Result<Model, LoadError> {
    let io = |source| LoadError::Io { path: path.to_path_buf(), source };
    let bytes = map_file(path, options.populate).map_err(io)?;
    decode(bytes, path, path.parent(), options)
}

/// Decodes a model held in memory; `label` names it in errors. External data is refused.
pub fn load_bytes(bytes: Bytes, label: &Path) -> Result<Model, LoadError> {
    decode(bytes, label, None, LoadOptions::default())
}

fn decode(bytes: Bytes, path: &Path, folder: Option<&Path>, options: LoadOptions) -> Result<Model, LoadError> {
    if bytes.is_empty() {
        return Err(LoadError::Empty { path: path.to_path_buf() });
    }
    let proto = pb::ModelProto::decode(bytes.clone())
        .map_err(|e| LoadError::Decode { path: path.to_path_buf(), detail: wire::describe_fault(&bytes, &e.to_string()) })?;
    let folder = folder.map(|f| if f.as_os_str().is_empty() { Path::new(".") } else { f });
    let mut reader = Reader { path: path.to_path_buf(), external: ExternalFiles::new(folder, options.populate) };
    let model = reader.model(proto)?;
    model.graph.validate(&HashSet::new()).map_err(|source| LoadError::InvalidGraph { path: path.to_path_buf(), source: Box::new(source) })?;
    Ok(model)
}

struct Reader {
    path: PathBuf,
    external: ExternalFiles,
}

impl Reader {
    fn not_a_model(&self, reason: &str) -> LoadError {
        LoadError::NotAModel { path: self.path.clone(), reason: reason.to_string() }
    }

    fn bad_tensor(&self, tensor: &str, problem: String) -> LoadError {
        LoadError::BadTensor { path: self.path.clone(), tensor: tensor.to_string(), problem }
    }

    fn model(&mut self, mut m: pb::ModelProto) -> Result<Model, LoadError> {
        let graph = m.graph.take().ok_or_else(|| self.not_a_model("it has no graph"))?;
        if m.ir_version.is_none() {
            return Err(self.not_a_model("it has no ir_version"));
        }
        let mut present = 0;
        let ir_version = p::take(&mut m.ir_version, p::MODEL_IR_VERSION, &mut present);
        let producer_name = p::take(&mut m.producer_name, p::MODEL_PRODUCER_NAME, &mut present);
        let producer_version = p::take(&mut m.producer_version, p::MODEL_PRODUCER_VERSION, &mut present);
        let domain = p::take(&mut m.domain, p::MODEL_DOMAIN, &mut present);
        let model_version = p::take(&mut m.model_version, p::MODEL_VERSION, &mut present);
        let opset_imports = std::mem::take(&mut m.opset_import)
            .into_iter()
            .map(|mut o| {
                let mut present = 0;
                let domain = p::take(&mut o.domain, p::OPSET_DOMAIN, &mut present);
                let version = p::take(&mut o.version, p::OPSET_VERSION, &mut present);
                OpsetImport { domain, version, extras: extras_of(&o, present) }
            })
            .collect();
        let functions = std::mem::take(&mut m.functions)
            .into_iter()
            .map(|f| Function {
                domain: f.domain.clone().unwrap_or_default(),
                name: f.name.clone().unwrap_or_default(),
                encoded: Bytes::from(f.encode_to_vec()),
            })
            .collect();
        let graph = self.graph(*Box::new(graph))?;
        Ok(Model { ir_version, opset_imports, producer_name, producer_version, domain, model_version, graph, functions, extras: extras_of(&m, present) })
    }

    fn graph(&mut self, mut g: pb::GraphProto) -> Result<Graph, LoadError> {
        let mut present = 0;
        let mut graph = Graph::new(p::take(&mut g.name, p::NAME, &mut present));
        graph.inputs = std::mem::take(&mut g.input).into_iter().map(value_info).collect();
        graph.outputs = std::mem::take(&mut g.output).into_iter().map(value_info).collect();
        graph.value_info = std::mem::take(&mut g.value_info).into_iter().map(value_info).collect();
        graph.initializers = std::mem::take(&mut g.initializer).into_iter().map(|t| self.tensor(t)).collect::<Result<_, _>>()?;
        for n in std::mem::take(&mut g.node) {
            let node = self.node(n)?;
            graph.add_node(node);
        }
        graph.extras = extras_of(&g, present);
        Ok(graph)
    }

    fn node(&mut self, mut n: pb::NodeProto) -> Result<Node, LoadError> {
        let mut present = 0;
        let name = p::take(&mut n.name, p::NAME, &mut present);
        let op_type = p::take(&mut n.op_type, p::NODE_OP_TYPE, &mut present);
        let domain = p::take(&mut n.domain, p::NODE_DOMAIN, &mut present);
        let inputs = std::mem::take(&mut n.input);
        let outputs = std::mem::take(&mut n.output);
        let attributes = std::mem::take(&mut n.attribute).into_iter().map(|a| self.attribute(a)).collect::<Result<_, _>>()?;
        Ok(Node { name, op_type, domain, inputs, outputs, attributes, extras: extras_of(&n, present) })
    }

    fn attribute(&mut self, mut a: pb::AttributeProto) -> Result<Attribute, LoadError> {
        use pb::attribute_proto::AttributeType as T;
        let mut present = 0;
        let name = p::take(&mut a.name, p::NAME, &mut present);
        let kind = match a.r#type {
            Some(code) => T::try_from(code).ok(),
            None => inferred_kind(&a),
        };
        // Only a well-formed attribute is interpreted: its type names the one value
        // field that is set. Anything else is kept verbatim in the extras.
        let well_formed = a.ref_attr_name.is_none() && kind.is_some_and(|k| holds_only(&a, k));
        let value = if !well_formed {
            AttrValue::Uninterpreted
        } else {
            if a.r#type.take().is_none() {
                present |= 1 << p::ATTR_TYPE_ABSENT;
            }
            match kind.unwrap_or(T::Undefined) {
                T::Float => AttrValue::Float(a.f.take().unwrap_or_default()),
                T::Int => AttrValue::Int(a.i.take().unwrap_or_default()),
                T::String => AttrValue::String(a.s.take().unwrap_or_default()),
                T::Tensor => match a.t.take() {
                    Some(t) => AttrValue::Tensor(self.tensor(t)?),
                    None => AttrValue::Uninterpreted,
                },
                T::Graph => match a.g.take() {
                    Some(g) => AttrValue::Graph(Box::new(self.graph(g)?)),
                    None => AttrValue::Uninterpreted,
                },
                T::SparseTensor => AttrValue::SparseTensor(Opaque(a.sparse_tensor.take().map(|s| s.encode_to_vec().into()).unwrap_or_default())),
                T::TypeProto => AttrValue::Type(value_type(a.tp.take().unwrap_or_default())),
                T::Floats => AttrValue::Floats(std::mem::take(&mut a.floats)),
                T::Ints => AttrValue::Ints(std::mem::take(&mut a.ints)),
                T::Strings => AttrValue::Strings(std::mem::take(&mut a.strings)),
                T::Tensors => AttrValue::Tensors(std::mem::take(&mut a.tensors).into_iter().map(|t| self.tensor(t)).collect::<Result<_, _>>()?),
                T::Graphs => AttrValue::Graphs(std::mem::take(&mut a.graphs).into_iter().map(|g| self.graph(g)).collect::<Result<_, _>>()?),
                T::SparseTensors => {
                    AttrValue::SparseTensors(std::mem::take(&mut a.sparse_tensors).into_iter().map(|s| Opaque(s.encode_to_vec().into())).collect())
                }
                T::TypeProtos => AttrValue::Types(std::mem::take(&mut a.type_protos).into_iter().map(value_type).collect()),
                T::Undefined => AttrValue::Uninterpreted,
            }
        };
        Ok(Attribute { name, value, extras: extras_of(&a, present) })
    }

    fn tensor(&mut self, mut t: pb::TensorProto) -> Result<Tensor, LoadError> {
        let mut present = 0;
        let name = p::take(&mut t.name, p::NAME, &mut present);
        let code = p::take(&mut t.data_type, p::TENSOR_DATA_TYPE, &mut present);
        let dtype = DataType::from_code(code).ok_or_else(|| self.bad_tensor(&name, format!("unknown data type code {code}")))?;
        let dims = std::mem::take(&mut t.dims);
        let element_count = element_count(&dims).map_err(|problem| self.bad_tensor(&name, problem))?;

        let external = t.data_location == Some(pb::tensor_proto::DataLocation::External as i32);
        let data = if external {
            t.data_location = None;
            let mut reference = ExternalRef::default();
            t.external_data.retain(|entry| {
                let slot = match entry.key.as_deref() {
                    Some("location") => &mut reference.location,
                    Some("offset") => &mut reference.offset,
                    Some("length") => &mut reference.length,
                    // the checksum describes bytes that saving may lay out anew
                    Some("checksum") => return false,
                    _ => return true,
                };
                *slot = entry.value.clone();
                false
            });
            let bytes =
                self.external.resolve(&reference).map_err(|problem| LoadError::ExternalData { path: self.path.clone(), tensor: name.clone(), problem })?;
            TensorData::Raw(bytes)
        } else {
            p::take(&mut t.data_location, p::TENSOR_DATA_LOCATION, &mut present);
            match t.raw_data.take() {
                Some(raw) => {
                    if raw.is_empty() {
                        present |= 1 << p::TENSOR_RAW_DATA;
                    }
                    TensorData::Raw(raw)
                }
                None => take_typed(&mut t, dtype),
            }
        };
        check_length(dtype, &dims, element_count, &data).map_err(|problem| self.bad_tensor(&name, problem))?;
        Ok(Tensor { name, dtype, dims, data, stored_externally: external, extras: extras_of(&t, present) })
    }
}

/// The element count of `dims`, refusing negative dims and products past i64.
fn element_count(dims: &[i64]) -> Result<u64, String> {
    let mut count: u64 = 1;
    for &d in dims {
        let d = u64::try_from(d).map_err(|_| format!("dims {dims:?} hold a negative size"))?;
        count = count
            .checked_mul(d)
            .filter(|&c| c <= i64::MAX as u64)
            .ok_or_else(|| format!("dims {dims:?} multiply past the largest tensor ONNX can describe"))?;
    }
    Ok(count)
}

/// Moves the typed field that carries `dtype`'s values out of the message.
fn take_typed(t: &mut pb::TensorProto, dtype: DataType) -> TensorData {
    let values = match dtype.typed_field() {
        Some(TypedField::FloatData) if !t.float_data.is_empty() => TypedValues::Floats(std::mem::take(&mut t.float_data)),
        Some(TypedField::Int32Data) if !t.int32_data.is_empty() => TypedValues::Int32s(std::mem::take(&mut t.int32_data)),
        Some(TypedField::StringData) if !t.string_data.is_empty() => TypedValues::Strings(std::mem::take(&mut t.string_data)),
        Some(TypedField::Int64Data) if !t.int64_data.is_empty() => TypedValues::Int64s(std::mem::take(&mut t.int64_data)),
        Some(TypedField::DoubleData) if !t.double_data.is_empty() => TypedValues::Doubles(std::mem::take(&mut t.double_data)),
        Some(TypedField::Uint64Data) if !t.uint64_data.is_empty() => TypedValues::Uint64s(std::mem::take(&mut t.uint64_data)),
        _ => return TensorData::Empty,
    };
    TensorData::Typed(values)
}

/// Checks that the stored values fill exactly the tensor's dims.
fn check_length(dtype: DataType, dims: &[i64], count: u64, data: &TensorData) -> Result<(), String> {
    let shape = format!("{dtype}{dims:?}");
    match data {
        TensorData::Raw(raw) => match dtype.raw_byte_len(count) {
            Some(need) if need != raw.len() as u64 => Err(format!("raw data holds {} bytes, but {shape} needs {need}", raw.len())),
            None if dtype == DataType::String => Err("a string tensor cannot use raw data".into()),
            _ => Ok(()),
        },
        TensorData::Typed(values) => {
            // Sub-byte types pack several elements into each int32_data entry, one byte's worth.
            let need = match dtype.bit_width() {
                Some(bits) if bits < 8 => dtype.raw_byte_len(count).unwrap_or(0),
                _ => count.saturating_mul(dtype.typed_values_per_element()),
            };
            if values.len() as u64 != need {
                return Err(format!("holds {} values, but {shape} needs {need}", values.len()));
            }
            Ok(())
        }
        TensorData::Empty if count == 0 || dtype == DataType::Undefined => Ok(()),
        TensorData::Empty => Err(format!("holds no values, but {shape} needs {count} elements")),
    }
}

/// The attribute type implied by the one value field set, for attributes written
/// without the `type` discriminator.
fn inferred_kind(a: &pb::AttributeProto) -> Option<pb::attribute_proto::AttributeType> {
    use pb::attribute_proto::AttributeType as T;
    let candidates = [
        (a.f.is_some(), T::Float),
        (a.i.is_some(), T::Int),
        (a.s.is_some(), T::String),
        (a.t.is_some(), T::Tensor),
        (a.g.is_some(), T::Graph),
        (a.sparse_tensor.is_some(), T::SparseTensor),
        (a.tp.is_some(), T::TypeProto),
        (!a.floats.is_empty(), T::Floats),
        (!a.ints.is_empty(), T::Ints),
        (!a.strings.is_empty(), T::Strings),
        (!a.tensors.is_empty(), T::Tensors),
        (!a.graphs.is_empty(), T::Graphs),
        (!a.sparse_tensors.is_empty(), T::SparseTensors),
        (!a.type_protos.is_empty(), T::TypeProtos),
    ];
    let mut set = candidates.iter().filter(|(is_set, _)| *is_set);
    match (set.next(), set.next()) {
        (Some((_, kind)), None) => Some(*kind),
        _ => None,
    }
}

/// `true` when no value field other than the one `kind` names is set, and a
/// singular kind's field is present.
fn holds_only(a: &pb::AttributeProto, kind: pb::attribute_proto::AttributeType) -> bool {
    use pb::attribute_proto::AttributeType as T;
    let fields = [
        (a.f.is_some(), T::Float),
        (a.i.is_some(), T::Int),
        (a.s.is_some(), T::String),
        (a.t.is_some(), T::Tensor),
        (a.g.is_some(), T::Graph),
        (a.sparse_tensor.is_some(), T::SparseTensor),
        (a.tp.is_some(), T::TypeProto),
        (!a.floats.is_empty(), T::Floats),
        (!a.ints.is_empty(), T::Ints),
        (!a.strings.is_empty(), T::Strings),
        (!a.tensors.is_empty(), T::Tensors),
        (!a.graphs.is_empty(), T::Graphs),
        (!a.sparse_tensors.is_empty(), T::SparseTensors),
        (!a.type_protos.is_empty(), T::TypeProtos),
    ];
    let singular = matches!(kind, T::Float | T::Int | T::String | T::Tensor | T::Graph | T::SparseTensor | T::TypeProto);
    let own_set = fields.iter().any(|&(set, k)| set && k == kind);
    let others_set = fields.iter().any(|&(set, k)| set && k != kind);
    !others_set && (own_set || !singular) && kind != T::Undefined
}

fn value_info(mut v: pb::ValueInfoProto) -> ValueInfo {
    let mut present = 0;
    let name = p::take(&mut v.name, p::NAME, &mut present);
    let ty = v.r#type.take().map(value_type);
    ValueInfo { name, ty, extras: extras_of(&v, present) }
}

/// A tensor type is interpreted when it is plain: no denotation anywhere and a
/// known element type. Every other type is kept as written.
fn value_type(t: pb::TypeProto) -> ValueType {
    use pb::tensor_shape_proto::dimension::Value as DimValue;
    use pb::type_proto::Value;
    let plain_tensor = match (&t.value, &t.denotation) {
        (Some(Value::TensorType(tensor)), None) => {
            let elem_ok = tensor.elem_type.is_none_or(|c| DataType::from_code(c).is_some());
            let dims_ok = tensor.shape.as_ref().is_none_or(|s| s.dim.iter().all(|d| d.denotation.is_none()));
            elem_ok && dims_ok
        }
        _ => false,
    };
    if !plain_tensor {
        return ValueType::Other(Opaque(t.encode_to_vec().into()));
    }
    let Some(Value::TensorType(tensor)) = t.value else { unreachable!("checked above") };
    ValueType::Tensor(TensorType {
        elem_type: tensor.elem_type.and_then(DataType::from_code),
        shape: tensor.shape.map(|s| {
            s.dim
                .into_iter()
                .map(|d| match d.value {
                    Some(DimValue::DimValue(v)) => Dim::Fixed(v),
                    Some(DimValue::DimParam(s)) => Dim::Symbol(s),
                    None => Dim::Unknown,
                })
                .collect()
        }),
    })
}
