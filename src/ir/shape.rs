//! Shape and type inference: the element type and shape of every tensor of a
//! model's main graph, and the values of the small integer tensors exporters
//! compute shapes with.
//!
//! [`infer_types`] walks the nodes once, in topological order, seeded with the
//! graph inputs, the initializers and `Constant` nodes. The model's `value_info`
//! and declared outputs are only a fallback: they type the outputs of ops this
//! module does not know, and outputs it learnt nothing about (no element type, no
//! rank). They never override what was inferred, since exporters leave stale
//! entries behind.
//!
//! Choices later passes can rely on:
//! - Dims keep their symbols: `batch` stays `batch` through elementwise ops,
//!   MatMul, Transpose, Reshape targets computed with `Shape`, and so on.
//! - Products and sums of symbols are not named: `batch*seq` is [`Dim::Unknown`].
//!   Reshape's `-1` still resolves wherever the symbols cancel:
//!   `[batch, seq, 384] -> [batch, seq, -1, 32]` gives 12.
//! - Broadcasting a dim pair: a fixed 1 yields the other side; a fixed n wins over
//!   a symbol or an unknown dim (a valid model has n or 1 there); equal symbols
//!   stay; different symbols give Unknown; a symbol against an unknown dim gives
//!   the symbol. The last one is a bet, wrong only if the symbol is 1 at run time
//!   while the other side is not; ORT's `symbolic_shape_infer.py` makes the same
//!   bet when it merges symbols (`auto_merge`), and without it the position
//!   embeddings of a dynamo export (`[1, Min(512, seq), 384]`) would turn every
//!   BERT activation's `seq` unknown.
//! - Integer and bool tensors of at most [`MAX_VALUE_ELEMENTS`] elements carry
//!   their values, each element a [`Dim`]: a number, a symbol (the `Shape` of a
//!   tensor with a `batch` dim holds `batch`) or unknown. So
//!   `Concat(Shape(x)[0], Shape(x)[1], 12, 32)` is `[batch, seq, 12, 32]`, which
//!   is what makes Reshape outputs known in real exports. A symbolic element is a
//!   dim size, never negative: `Equal(batch, -1)` is false.
//! - Nothing panics: arithmetic is checked, and a malformed node only leaves its
//!   outputs unknown.

use super::{AttrValue, DataType, Dim, Graph, Model, Node, Tensor, TensorType};
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

/// Integer tensors up to this many elements carry their values.
pub const MAX_VALUE_ELEMENTS: usize = 64;

/// What inference learnt about the tensors of a graph, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeMap {
    types: HashMap<String, TensorType>,
    /// Row-major elements of small integer tensors; their shapes are fully fixed.
    values: HashMap<String, Vec<Dim>>,
}

/// Types every tensor of the main graph: graph inputs, initializers, node outputs.
pub fn infer_types(model: &Model) -> TypeMap {
    infer_graph(&model.graph)
}

impl TypeMap {
    pub fn get(&self, name: &str) -> Option<&TensorType> {
        self.types.get(name)
    }

    pub fn elem_type(&self, name: &str) -> Option<DataType> {
        self.types.get(name)?.elem_type
    }

    /// The dims, when the rank is known.
    pub fn shape(&self, name: &str) -> Option<&[Dim]> {
        self.types.get(name)?.shape.as_deref()
    }

    pub fn rank(&self, name: &str) -> Option<usize> {
        self.types.get(name)?.rank()
    }

    /// The row-major elements of a small integer or bool tensor, each a number, a
    /// symbol or unknown (bools are 0 and 1).
    pub fn value(&self, name: &str) -> Option<&[Dim]> {
        self.values.get(name).map(Vec::as_slice)
    }

    /// The value, when every element is a known number.
    pub fn int_value(&self, name: &str) -> Option<Vec<i64>> {
        self.value(name)?.iter().map(Dim::fixed).collect()
    }

    pub fn len(&self) -> usize {
        self.types.len()
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// Every typed tensor, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &TensorType)> + '_ {
        self.types.iter().map(|(name, ty)| (name.as_str(), ty))
    }

    fn insert(&mut self, name: &str, inferred: Inferred) {
        if let Some(value) = inferred.value {
            self.values.insert(name.to_string(), value);
        }
        self.types.insert(name.to_string(), inferred.ty);
    }
}

fn infer_graph(graph: &Graph) -> TypeMap {
    let mut map = TypeMap::default();
    let input_names: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    for input in &graph.inputs {
        if let Some(ty) = input.tensor_type() {
            map.types.insert(input.name.clone(), ty.clone());
        }
    }
    for tensor in &graph.initializers {
        let inferred = tensor_inferred(tensor);
        if input_names.contains(tensor.name.as_str()) {
            // An initializer that is also a graph input is only a default the caller
            // may override: its value is no constant, and the declared type comes first.
            map.types.entry(tensor.name.clone()).or_insert(inferred.ty);
        } else {
            map.insert(&tensor.name, inferred);
        }
    }
    let declared: HashMap<&str, &TensorType> =
        graph.value_info.iter().chain(&graph.outputs).filter_map(|v| Some((v.name.as_str(), v.tensor_type()?))).collect();

    for node in graph.nodes() {
        let mut outputs = infer_node(node, &map).unwrap_or_default().into_iter();
        for name in &node.outputs {
            let inferred = outputs.next().filter(|o| !o.knows_nothing());
            if name.is_empty() {
                continue;
            }
            let inferred = inferred.or_else(|| declared.get(name.as_str()).map(|ty| Inferred::like(Some(ty)))).unwrap_or_default();
            map.insert(name, inferred);
        }
    }
    map
}

/// One output's type and, for a small integer tensor, its value.
#[derive(Clone, Debug, Default)]
struct Inferred {
    ty: TensorType,
    value: Option<Vec<Dim>>,
}

impl Inferred {
    fn new(elem_type: Option<DataType>, shape: Option<Vec<Dim>>) -> Inferred {
        Inferred { ty: TensorType { elem_type, shape }, value: None }
    }

    /// A tensor of this type (or an unknown one), without a value.
    fn like(ty: Option<&TensorType>) -> Inferred {
        Inferred { ty: ty.cloned().unwrap_or_default(), value: None }
    }

    /// Attaches `value` if it suits this type: integer or bool elements filling a
    /// fixed shape of at most [`MAX_VALUE_ELEMENTS`]. Otherwise it is dropped.
    fn with_value(mut self, value: Option<Vec<Dim>>) -> Inferred {
        self.value = value.filter(|v| holds_value(&self.ty, v.len()));
        self
    }

    fn knows_nothing(&self) -> bool {
        self.ty.elem_type.is_none() && self.ty.shape.is_none()
    }
}

fn holds_value(ty: &TensorType, len: usize) -> bool {
    let integral = ty.elem_type.is_some_and(|t| t.is_integer() || t == DataType::Bool);
    let shape = ty.shape.as_deref().and_then(fixed_shape);
    integral && shape.is_some_and(|s| is_small(&s) && element_count(&s) == Some(len))
}

/// At most [`MAX_VALUE_ELEMENTS`] elements, and no dim bigger either: an empty
/// `[10^12, 0]` tensor would otherwise cost a loop over its first dim.
fn is_small(shape: &[usize]) -> bool {
    shape.iter().all(|&d| d <= MAX_VALUE_ELEMENTS) && element_count(shape).is_some_and(|n| n <= MAX_VALUE_ELEMENTS)
}

fn tensor_inferred(tensor: &Tensor) -> Inferred {
    let shape = tensor.dims.iter().map(|&d| Dim::Fixed(d)).collect();
    let integral = tensor.dtype.is_integer() || tensor.dtype == DataType::Bool;
    let value = if integral && tensor.element_count() <= MAX_VALUE_ELEMENTS as u64 {
        tensor.to_i64().ok().map(|a| a.iter().map(|&v| Dim::Fixed(v)).collect())
    } else {
        None
    };
    Inferred::new(Some(tensor.dtype), Some(shape)).with_value(value)
}

/// The dims as sizes, if all are fixed and non-negative.
fn fixed_shape(dims: &[Dim]) -> Option<Vec<usize>> {
    dims.iter().map(|d| d.fixed().and_then(|v| usize::try_from(v).ok())).collect()
}

fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// A node's inputs as inference sees them; an omitted optional input (`""`) is absent.
struct Inputs<'a> {
    node: &'a Node,
    map: &'a TypeMap,
}

impl<'a> Inputs<'a> {
    fn name(&self, i: usize) -> Option<&'a str> {
        self.node.inputs.get(i).map(String::as_str).filter(|n| !n.is_empty())
    }

    fn is_given(&self, i: usize) -> bool {
        self.name(i).is_some()
    }

    fn ty(&self, i: usize) -> Option<&'a TensorType> {
        self.map.types.get(self.name(i)?)
    }

    fn dtype(&self, i: usize) -> Option<DataType> {
        self.ty(i)?.elem_type
    }

    fn shape(&self, i: usize) -> Option<&'a [Dim]> {
        self.ty(i)?.shape.as_deref()
    }

    fn value(&self, i: usize) -> Option<&'a [Dim]> {
        self.map.values.get(self.name(i)?).map(Vec::as_slice)
    }

    fn ints(&self, i: usize) -> Option<Vec<i64>> {
        self.value(i)?.iter().map(Dim::fixed).collect()
    }

    /// The single element of a scalar or one-element value.
    fn scalar(&self, i: usize) -> Option<&'a Dim> {
        match self.value(i)? {
            [one] => Some(one),
            _ => None,
        }
    }

    /// A known value with its shape, for element-wise work.
    fn tensor(&self, i: usize) -> Option<(Vec<usize>, &'a [Dim])> {
        Some((fixed_shape(self.shape(i)?)?, self.value(i)?))
    }

    /// The elements of a 1-D input (a shape, axes), or as many unknown elements as
    /// its fixed length; `None` beyond [`MAX_VALUE_ELEMENTS`], which no real rank reaches.
    fn elements(&self, i: usize) -> Option<Vec<Dim>> {
        if let Some(v) = self.value(i) {
            return Some(v.to_vec());
        }
        match self.shape(i)? {
            [Dim::Fixed(n)] => {
                let n = usize::try_from(*n).ok().filter(|&n| n <= MAX_VALUE_ELEMENTS)?;
                Some(vec![Dim::Unknown; n])
            }
            _ => None,
        }
    }

    /// The first known element type among these inputs.
    fn first_dtype(&self, inputs: impl IntoIterator<Item = usize>) -> Option<DataType> {
        inputs.into_iter().find_map(|i| self.dtype(i))
    }
}

fn one(inferred: Inferred) -> Option<Vec<Inferred>> {
    Some(vec![inferred])
}

/// Ops whose only (or first) output has input 0's type and shape.
#[rustfmt::skip]
const SHAPE_PRESERVING: &[&str] = &[
    "Sqrt", "Exp", "Log", "Erf", "Tanh", "Relu", "Sigmoid", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin",
    "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Softplus", "Softsign", "Elu",
    "Selu", "Celu", "LeakyRelu", "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Gelu", "Softmax",
    "LogSoftmax", "Hardmax", "Trilu", "CumSum", "Clip", "Shrink", "LpNormalization", "LRN", "InstanceNormalization",
    "MeanVarianceNormalization", "GroupNormalization", "BatchNormalization", "RMSNormalization", "BitwiseNot",
    "ScatterND", "ScatterElements", "Scatter",
    // com.microsoft
    "FastGelu", "BiasGelu", "QuickGelu", "RotaryEmbedding",
];

/// Elementwise ops over broadcast inputs whose output has the inputs' element type.
#[rustfmt::skip]
const BROADCAST_SAME_TYPE: &[&str] = &[
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "BitShift", "BitwiseAnd", "BitwiseOr",
    "BitwiseXor", "PRelu",
];

/// Elementwise ops over broadcast inputs with a bool output.
#[rustfmt::skip]
const BROADCAST_BOOL: &[&str] = &["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor"];

#[rustfmt::skip]
const REDUCTIONS: &[&str] = &[
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
];

/// The outputs of `node`, in order; `None` for an op this module does not know.
fn infer_node(node: &Node, map: &TypeMap) -> Option<Vec<Inferred>> {
    let contrib = match node.domain.as_str() {
        "" | "ai.onnx" => false,
        "com.microsoft" => true,
        _ => return None,
    };
    let x = Inputs { node, map };
    let op = node.op_type.as_str();
    match op {
        "Constant" => one(constant(node)),
        "Identity" => one(Inferred::like(x.ty(0)).with_value(x.value(0).map(<[Dim]>::to_vec))),
        "Neg" | "Abs" | "Not" => one(unary_with_value(op, &x)),
        _ if SHAPE_PRESERVING.contains(&op) => one(Inferred::like(x.ty(0))),
        "IsNaN" | "IsInf" => one(Inferred::new(Some(DataType::Bool), x.shape(0).map(<[Dim]>::to_vec))),
        "Dropout" => Some(vec![Inferred::like(x.ty(0)), Inferred::new(Some(DataType::Bool), x.shape(0).map(<[Dim]>::to_vec))]),
        _ if BROADCAST_SAME_TYPE.contains(&op) => {
            let inputs: Vec<usize> = (0..node.inputs.len()).collect();
            let dtype = if op == "Pow" { x.dtype(0) } else { x.first_dtype(inputs.iter().copied()) };
            one(elementwise(op, &x, &inputs, dtype))
        }
        _ if BROADCAST_BOOL.contains(&op) => one(elementwise(op, &x, &[0, 1], Some(DataType::Bool))),
        "Where" => one(elementwise(op, &x, &[0, 1, 2], x.first_dtype([1, 2]))),
        "Cast" => one(cast(&x, attr_dtype(node, "to"))),
        "CastLike" => one(cast(&x, x.dtype(1))),
        "Shape" => one(shape_of(node, &x)),
        "Size" => one(size(&x)),
        "Reshape" => one(reshape(node, &x)),
        "Flatten" => one(flatten(node, &x)),
        "Squeeze" => one(squeeze(node, &x)),
        "Unsqueeze" => one(unsqueeze(node, &x)),
        "Transpose" => one(transpose(node, &x)),
        "Gather" => one(gather(node, &x)),
        "GatherElements" => one(Inferred::new(x.dtype(0), x.shape(1).map(<[Dim]>::to_vec))),
        "GatherND" => one(gather_nd(node, &x)),
        "Concat" => one(concat(node, &x)),
        "Slice" => one(slice(node, &x)),
        "Split" => Some(split(node, &x)),
        "Expand" => one(expand(&x)),
        "Tile" => one(tile(&x)),
        "Pad" => one(pad(node, &x)),
        "Range" => one(range(&x)),
        "ConstantOfShape" => one(constant_of_shape(node, &x)),
        "NonZero" => one(Inferred::new(Some(DataType::Int64), Some(vec![x.shape(0).map_or(Dim::Unknown, |s| Dim::Fixed(s.len() as i64)), Dim::Unknown]))),
        _ if REDUCTIONS.contains(&op) => one(reduce(node, &x)),
        "ArgMax" | "ArgMin" => one(arg_reduce(node, &x)),
        "MatMul" => one(Inferred::new(x.dtype(0), matmul_shape(x.shape(0), x.shape(1)))),
        "MatMulInteger" => one(Inferred::new(Some(DataType::Int32), matmul_shape(x.shape(0), x.shape(1)))),
        "QLinearMatMul" => one(Inferred::new(x.dtype(7), matmul_shape(x.shape(0), x.shape(3)))),
        "Gemm" => one(gemm(node, &x)),
        "Conv" => one(conv(node, &x)),
        "GlobalAveragePool" | "GlobalMaxPool" => one(global_pool(&x)),
        "LayerNormalization" | "SimplifiedLayerNormalization" => Some(layer_norm(node, &x)),
        "QuantizeLinear" => one(quantize_linear(node, &x)),
        "DequantizeLinear" => {
            let dtype = attr_dtype(node, "output_dtype").or(x.dtype(1));
            one(Inferred::new(dtype, x.shape(0).map(<[Dim]>::to_vec)))
        }
        "DynamicQuantizeLinear" => Some(vec![
            Inferred::new(Some(DataType::Uint8), x.shape(0).map(<[Dim]>::to_vec)),
            Inferred::new(Some(DataType::Float), Some(vec![])),
            Inferred::new(Some(DataType::Uint8), Some(vec![])),
        ]),
        "Attention" if !contrib => one(standard_attention(node, &x)),
        // com.microsoft (ORT ContribOperators.md)
        "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization" if contrib => Some(skip_layer_norm(&x)),
        "EmbedLayerNormalization" if contrib => Some(embed_layer_norm(&x)),
        "Attention" if contrib => Some(attention(node, &x)),
        "MultiHeadAttention" if contrib => Some(multi_head_attention(node, &x)),
        "GroupQueryAttention" if contrib => Some(group_query_attention(node, &x)),
        "DynamicQuantizeMatMul" if contrib => one(Inferred::new(x.dtype(0), matmul_shape(x.shape(0), x.shape(1)))),
        "MatMulIntegerToFloat" if contrib => one(Inferred::new(x.dtype(2), matmul_shape(x.shape(0), x.shape(1)))),
        "MatMulNBits" if contrib => one(matmul_n_bits(node, &x)),
        "GatherBlockQuantized" if contrib => one(gather_block_quantized(node, &x)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Dims: broadcasting, products, arithmetic on value elements
// ---------------------------------------------------------------------------

/// Equal numbers or equal symbols (two unknown dims are not known to be equal).
fn same(a: &Dim, b: &Dim) -> bool {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x == y,
        (Dim::Symbol(x), Dim::Symbol(y)) => x == y,
        _ => false,
    }
}

/// The broadcast of one dim pair (see the module docs for the symbol rules).
fn broadcast_dim(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(1), other) | (other, Dim::Fixed(1)) => other.clone(),
        (Dim::Fixed(x), Dim::Fixed(y)) if x != y => Dim::Unknown,
        (Dim::Fixed(_), _) => a.clone(),
        (_, Dim::Fixed(_)) => b.clone(),
        (Dim::Symbol(x), Dim::Symbol(y)) if x != y => Dim::Unknown,
        (Dim::Symbol(_), _) => a.clone(),
        (Dim::Unknown, _) => b.clone(),
    }
}

/// Multidirectional (numpy) broadcasting; `None` if any rank is unknown.
fn broadcast(shapes: &[Option<&[Dim]>]) -> Option<Vec<Dim>> {
    let shapes: Vec<&[Dim]> = shapes.iter().copied().collect::<Option<_>>()?;
    let rank = shapes.iter().map(|s| s.len()).max()?;
    let dims = (0..rank)
        .map(|i| {
            let from_end = rank - i;
            shapes.iter().filter_map(|s| s.len().checked_sub(from_end).map(|k| &s[k])).fold(Dim::Fixed(1), |acc, d| broadcast_dim(&acc, d))
        })
        .collect();
    Some(dims)
}

/// Two dims a valid model makes equal (Concat's other axes): the better known one.
fn same_dim(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(_), _) | (Dim::Symbol(_), Dim::Unknown | Dim::Symbol(_)) => a.clone(),
        _ => b.clone(),
    }
}

/// A product of dims as a number times symbols, so that symbols can cancel.
#[derive(Debug, PartialEq)]
struct DimProduct {
    number: i64,
    symbols: Vec<String>,
    /// An unknown (or negative, hence invalid) dim is a factor.
    unknown: bool,
}

impl DimProduct {
    const ONE: DimProduct = DimProduct { number: 1, symbols: Vec::new(), unknown: false };

    /// `None` on overflow.
    fn of(dims: &[Dim]) -> Option<DimProduct> {
        if dims.contains(&Dim::Fixed(0)) {
            return Some(DimProduct { number: 0, ..DimProduct::ONE });
        }
        let mut product = DimProduct::ONE;
        for dim in dims {
            match dim {
                Dim::Fixed(v) if *v > 0 => product.number = product.number.checked_mul(*v)?,
                Dim::Symbol(s) => product.symbols.push(s.clone()),
                _ => product.unknown = true,
            }
        }
        product.symbols.sort();
        Some(product)
    }

    /// `self / by` as a dim, when the symbols of `by` cancel and the numbers divide.
    fn divide(&self, by: &DimProduct) -> Dim {
        if self.unknown || by.unknown || by.number == 0 || self.number % by.number != 0 {
            return Dim::Unknown;
        }
        let mut left = self.symbols.clone();
        for s in &by.symbols {
            match left.iter().position(|l| l == s) {
                Some(i) => {
                    left.remove(i);
                }
                None => return Dim::Unknown,
            }
        }
        let number = self.number / by.number;
        match left.as_slice() {
            [] => Dim::Fixed(number),
            [symbol] if number == 1 => Dim::Symbol(symbol.clone()),
            _ => Dim::Unknown,
        }
    }
}

/// The product of dims as one dim: a number, a lone symbol, or unknown.
fn product_dim(dims: &[Dim]) -> Dim {
    DimProduct::of(dims).map_or(Dim::Unknown, |p| p.divide(&DimProduct::ONE))
}

// Arithmetic on value elements: exact on numbers, and on symbols only where the
// answer does not depend on them (x+0, x*1, x-x, ...); anything else is unknown.

/// The terms of a symbolic sum (`past + sequence` -> [past, sequence]); `None`
/// for a symbol that stands for nothing known (`unk__N`).
fn sum_terms(symbol: &str) -> Option<Vec<&str>> {
    let terms: Vec<&str> = symbol.split(" + ").map(str::trim).collect();
    (!terms.iter().any(|t| t.is_empty() || t.starts_with("unk__"))).then_some(terms)
}

/// A sum of symbolic terms, written in one order (sorted) so that equal sums are
/// equal symbols: `past + sequence`, as exporters name a KV cache's total length.
fn sum_symbol(mut terms: Vec<&str>) -> Dim {
    terms.sort_unstable();
    match terms.as_slice() {
        [] => Dim::Fixed(0),
        _ => Dim::Symbol(terms.join(" + ")),
    }
}

fn add(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x.checked_add(*y).map_or(Dim::Unknown, Dim::Fixed),
        (Dim::Fixed(0), other) | (other, Dim::Fixed(0)) => other.clone(),
        (Dim::Symbol(x), Dim::Symbol(y)) => match (sum_terms(x), sum_terms(y)) {
            (Some(mut x), Some(y)) => {
                x.extend(y);
                sum_symbol(x)
            }
            _ => Dim::Unknown,
        },
        _ => Dim::Unknown,
    }
}

fn sub(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x.checked_sub(*y).map_or(Dim::Unknown, Dim::Fixed),
        (other, Dim::Fixed(0)) => other.clone(),
        _ if same(a, b) => Dim::Fixed(0),
        // (past + sequence) - sequence = past
        (Dim::Symbol(x), Dim::Symbol(y)) => match (sum_terms(x), sum_terms(y)) {
            (Some(mut x), Some(y)) => {
                for term in y {
                    match x.iter().position(|t| *t == term) {
                        Some(i) => {
                            x.remove(i);
                        }
                        None => return Dim::Unknown,
                    }
                }
                sum_symbol(x)
            }
            _ => Dim::Unknown,
        },
        _ => Dim::Unknown,
    }
}

fn mul(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x.checked_mul(*y).map_or(Dim::Unknown, Dim::Fixed),
        (Dim::Fixed(0), _) | (_, Dim::Fixed(0)) => Dim::Fixed(0),
        (Dim::Fixed(1), other) | (other, Dim::Fixed(1)) => other.clone(),
        _ => Dim::Unknown,
    }
}

/// Integer division truncating toward zero, as ORT's integer Div does.
fn div(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x.checked_div(*y).map_or(Dim::Unknown, Dim::Fixed),
        (other, Dim::Fixed(1)) => other.clone(),
        _ => Dim::Unknown,
    }
}

/// The order of two elements, when known. Symbols are dim sizes, so never negative.
fn compare(a: &Dim, b: &Dim) -> Option<Ordering> {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => Some(x.cmp(y)),
        (Dim::Symbol(x), Dim::Symbol(y)) if x == y => Some(Ordering::Equal),
        (Dim::Symbol(_), Dim::Fixed(y)) if *y < 0 => Some(Ordering::Greater),
        (Dim::Fixed(x), Dim::Symbol(_)) if *x < 0 => Some(Ordering::Less),
        _ => None,
    }
}

fn truth(b: bool) -> Dim {
    Dim::Fixed(i64::from(b))
}

/// One element of an elementwise op's value, from the inputs' elements.
fn apply(op: &str, args: &[&Dim]) -> Dim {
    let ordered = |keep: fn(Ordering) -> bool| match args {
        [a, b] => compare(a, b).map_or(Dim::Unknown, |o| truth(keep(o))),
        _ => Dim::Unknown,
    };
    let logical = |f: fn(bool, bool) -> bool| match args {
        [Dim::Fixed(a), Dim::Fixed(b)] => truth(f(*a != 0, *b != 0)),
        _ => Dim::Unknown,
    };
    match (op, args) {
        ("Add" | "Sum", [a, b]) => add(a, b),
        ("Sub", [a, b]) => sub(a, b),
        ("Mul", [a, b]) => mul(a, b),
        ("Div", [a, b]) => div(a, b),
        ("Max", [a, b]) => match compare(a, b) {
            Some(Ordering::Less) => (*b).clone(),
            Some(_) => (*a).clone(),
            None => Dim::Unknown,
        },
        ("Min", [a, b]) => match compare(a, b) {
            Some(Ordering::Greater) => (*b).clone(),
            Some(_) => (*a).clone(),
            None => Dim::Unknown,
        },
        ("Equal", _) => ordered(|o| o == Ordering::Equal),
        ("Less", _) => ordered(|o| o == Ordering::Less),
        ("Greater", _) => ordered(|o| o == Ordering::Greater),
        ("LessOrEqual", _) => ordered(|o| o != Ordering::Greater),
        ("GreaterOrEqual", _) => ordered(|o| o != Ordering::Less),
        ("And", _) => logical(|a, b| a && b),
        ("Or", _) => logical(|a, b| a || b),
        ("Xor", _) => logical(|a, b| a != b),
        ("Where", [cond, x, y]) => match cond {
            Dim::Fixed(0) => (*y).clone(),
            Dim::Fixed(_) => (*x).clone(),
            _ if same(x, y) => (*x).clone(),
            _ => Dim::Unknown,
        },
        ("Neg", [Dim::Fixed(v)]) => v.checked_neg().map_or(Dim::Unknown, Dim::Fixed),
        ("Abs", [Dim::Fixed(v)]) => v.checked_abs().map_or(Dim::Unknown, Dim::Fixed),
        ("Abs", [symbol @ Dim::Symbol(_)]) => (*symbol).clone(),
        ("Not", [Dim::Fixed(v)]) => truth(*v == 0),
        _ => Dim::Unknown,
    }
}

/// Wraps a number into an integer type the way a cast does (bool: nonzero).
fn cast_element(element: &Dim, to: DataType) -> Dim {
    let Dim::Fixed(v) = element else {
        return if to == DataType::Bool { Dim::Unknown } else { element.clone() };
    };
    Dim::Fixed(match to {
        DataType::Bool => i64::from(*v != 0),
        DataType::Int8 => *v as i8 as i64,
        DataType::Uint8 => *v as u8 as i64,
        DataType::Int16 => *v as i16 as i64,
        DataType::Uint16 => *v as u16 as i64,
        DataType::Int32 => *v as i32 as i64,
        DataType::Uint32 => *v as u32 as i64,
        _ => *v,
    })
}

// ---------------------------------------------------------------------------
// Values: picking elements of small row-major tensors
// ---------------------------------------------------------------------------

/// The elements at indices `picks[a]` along each axis `a` of a row-major tensor of
/// `shape`, row-major; `None` if an index is out of range or the result too big.
fn pick(shape: &[usize], elems: &[Dim], picks: &[Vec<usize>]) -> Option<Vec<Dim>> {
    if picks.len() != shape.len() {
        return None;
    }
    let count = picks.iter().try_fold(1usize, |n, p| n.checked_mul(p.len()))?;
    if count > MAX_VALUE_ELEMENTS {
        return None;
    }
    let mut strides = vec![1usize; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        strides[a] = strides[a + 1].checked_mul(shape[a + 1])?;
    }
    let mut out = Vec::with_capacity(count);
    let mut at = vec![0usize; picks.len()];
    for _ in 0..count {
        let mut offset = 0usize;
        for a in 0..picks.len() {
            let index = picks[a][at[a]];
            if index >= shape[a] {
                return None;
            }
            offset = offset.checked_add(index.checked_mul(strides[a])?)?;
        }
        out.push(elems.get(offset)?.clone());
        for a in (0..at.len()).rev() {
            at[a] += 1;
            if at[a] < picks[a].len() {
                break;
            }
            at[a] = 0;
        }
    }
    Some(out)
}

/// A value broadcast to `out` (numpy rules).
fn broadcast_value(shape: &[usize], elems: &[Dim], out: &[usize]) -> Option<Vec<Dim>> {
    if !is_small(out) {
        return None;
    }
    let padding = out.len().checked_sub(shape.len())?;
    let padded: Vec<usize> = std::iter::repeat_n(1, padding).chain(shape.iter().copied()).collect();
    let picks = padded
        .iter()
        .zip(out)
        .map(|(&d, &o)| match d {
            _ if d == o => Some((0..o).collect()),
            1 => Some(vec![0; o]),
            _ => None,
        })
        .collect::<Option<Vec<Vec<usize>>>>()?;
    pick(&padded, elems, &picks)
}

/// Concatenation of values along `axis`.
fn concat_values(parts: &[(Vec<usize>, &[Dim])], axis: usize) -> Option<Vec<Dim>> {
    let outer: usize = parts.first()?.0.get(..axis)?.iter().product();
    let mut out = Vec::new();
    for o in 0..outer {
        for (shape, elems) in parts {
            let chunk: usize = shape.get(axis..)?.iter().product();
            out.extend_from_slice(elems.get(o.checked_mul(chunk)?..(o + 1).checked_mul(chunk)?)?);
            if out.len() > MAX_VALUE_ELEMENTS {
                return None;
            }
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Attributes
// ---------------------------------------------------------------------------

fn attr_str<'a>(node: &'a Node, name: &str) -> Option<&'a str> {
    match node.attr(name)? {
        AttrValue::String(s) => std::str::from_utf8(s).ok(),
        _ => None,
    }
}

/// An element-type attribute (`to`, `output_dtype`, `stash_type`); 0 means unset.
fn attr_dtype(node: &Node, name: &str) -> Option<DataType> {
    let code = i32::try_from(node.attr_int(name)?).ok()?;
    DataType::from_code(code).filter(|&t| t != DataType::Undefined)
}

/// `axis` in `-rank..rank`, as an index.
fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let rank = i64::try_from(rank).ok()?;
    let axis = if axis < 0 { axis.checked_add(rank)? } else { axis };
    (0..rank).contains(&axis).then_some(axis as usize)
}

fn normalize_axes(axes: &[i64], rank: usize) -> Option<Vec<usize>> {
    axes.iter().map(|&a| normalize_axis(a, rank)).collect()
}

/// Axes given as an attribute (older opsets) or as input `input` (newer ones).
enum Axes {
    Absent,
    Known(Vec<i64>),
    /// Given as an input whose value is not known.
    Unknown,
}

fn axes_arg(node: &Node, x: &Inputs, input: usize) -> Axes {
    if let Some(axes) = node.attr_ints("axes") {
        return Axes::Known(axes.to_vec());
    }
    if !x.is_given(input) {
        return Axes::Absent;
    }
    x.ints(input).map_or(Axes::Unknown, Axes::Known)
}

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------

fn constant(node: &Node) -> Inferred {
    let Some(attr) = node.attributes.first() else {
        return Inferred::default();
    };
    let len = |n: usize| Some(vec![Dim::Fixed(n as i64)]);
    match (attr.name.as_str(), &attr.value) {
        ("value", AttrValue::Tensor(t)) => tensor_inferred(t),
        ("value_int", AttrValue::Int(v)) => Inferred::new(Some(DataType::Int64), Some(vec![])).with_value(Some(vec![Dim::Fixed(*v)])),
        ("value_ints", AttrValue::Ints(v)) => Inferred::new(Some(DataType::Int64), len(v.len())).with_value(Some(v.iter().map(|&i| Dim::Fixed(i)).collect())),
        ("value_float", AttrValue::Float(_)) => Inferred::new(Some(DataType::Float), Some(vec![])),
        ("value_floats", AttrValue::Floats(v)) => Inferred::new(Some(DataType::Float), len(v.len())),
        ("value_string", AttrValue::String(_)) => Inferred::new(Some(DataType::String), Some(vec![])),
        ("value_strings", AttrValue::Strings(v)) => Inferred::new(Some(DataType::String), len(v.len())),
        _ => Inferred::default(),
    }
}

fn unary_with_value(op: &str, x: &Inputs) -> Inferred {
    let value = x.value(0).map(|v| v.iter().map(|e| apply(op, &[e])).collect());
    Inferred::like(x.ty(0)).with_value(value)
}

/// A broadcasting elementwise op over `inputs`, with its value when all are known.
fn elementwise(op: &str, x: &Inputs, inputs: &[usize], dtype: Option<DataType>) -> Inferred {
    let shapes: Vec<Option<&[Dim]>> = inputs.iter().map(|&i| x.shape(i)).collect();
    let shape = broadcast(&shapes);
    let value = shape.as_deref().and_then(fixed_shape).and_then(|out| {
        let expanded =
            inputs.iter().map(|&i| x.tensor(i).and_then(|(shape, elems)| broadcast_value(&shape, elems, &out))).collect::<Option<Vec<Vec<Dim>>>>()?;
        let count = expanded.first()?.len();
        let elems = (0..count).map(|k| apply(op, &expanded.iter().map(|e| &e[k]).collect::<Vec<_>>()));
        Some(elems.collect())
    });
    Inferred::new(dtype, shape).with_value(value)
}

fn cast(x: &Inputs, to: Option<DataType>) -> Inferred {
    let value = to.zip(x.value(0)).map(|(to, v)| v.iter().map(|e| cast_element(e, to)).collect());
    Inferred::new(to, x.shape(0).map(<[Dim]>::to_vec)).with_value(value)
}

fn shape_of(node: &Node, x: &Inputs) -> Inferred {
    let int64 = Some(DataType::Int64);
    let Some(dims) = x.shape(0) else {
        return Inferred::new(int64, Some(vec![Dim::Unknown]));
    };
    let rank = dims.len() as i64;
    // Shape-15 clamps start and end into [0, rank].
    let clamp = |v: i64| (if v < 0 { v.saturating_add(rank) } else { v }).clamp(0, rank) as usize;
    let start = clamp(node.attr_int("start").unwrap_or(0));
    let end = clamp(node.attr_int("end").unwrap_or(rank)).max(start);
    let elems = dims[start..end].to_vec();
    Inferred::new(int64, Some(vec![Dim::Fixed(elems.len() as i64)])).with_value(Some(elems))
}

fn size(x: &Inputs) -> Inferred {
    let count = x.shape(0).map_or(Dim::Unknown, product_dim);
    Inferred::new(Some(DataType::Int64), Some(vec![])).with_value(Some(vec![count]))
}

/// Reshape's output dims for a target value: `0` copies the input dim (unless
/// `allowzero`), one `-1` takes what is left of the element count.
fn reshape_dims(input: Option<&[Dim]>, target: &[Dim], allowzero: bool) -> Vec<Dim> {
    let inferred_at: Vec<usize> = target.iter().enumerate().filter(|(_, t)| **t == Dim::Fixed(-1)).map(|(i, _)| i).collect();
    let mut dims: Vec<Dim> = target
        .iter()
        .enumerate()
        .map(|(i, t)| match t {
            Dim::Fixed(0) if !allowzero => input.and_then(|s| s.get(i)).cloned().unwrap_or(Dim::Unknown),
            Dim::Fixed(v) if *v >= 0 => t.clone(),
            Dim::Symbol(_) => t.clone(),
            _ => Dim::Unknown,
        })
        .collect();
    if let ([at], Some(input)) = (inferred_at.as_slice(), input) {
        let total = DimProduct::of(input);
        let rest = DimProduct::of(&dims.iter().enumerate().filter(|(i, _)| i != at).map(|(_, d)| d.clone()).collect::<Vec<_>>());
        dims[*at] = match (total, rest) {
            (Some(total), Some(rest)) => total.divide(&rest),
            _ => Dim::Unknown,
        };
    }
    dims
}

fn reshape(node: &Node, x: &Inputs) -> Inferred {
    let allowzero = node.attr_int("allowzero").unwrap_or(0) != 0;
    let target = match node.attr_ints("shape") {
        // Reshape-1 took the target as an attribute.
        Some(shape) => Some(shape.iter().map(|&v| Dim::Fixed(v)).collect()),
        None => x.elements(1),
    };
    let shape = target.map(|t| reshape_dims(x.shape(0), &t, allowzero));
    Inferred::new(x.dtype(0), shape).with_value(x.value(0).map(<[Dim]>::to_vec))
}

fn flatten(node: &Node, x: &Inputs) -> Inferred {
    let shape = x.shape(0).and_then(|dims| {
        let axis = node.attr_int("axis").unwrap_or(1);
        // Flatten's axis may equal the rank (everything goes to the first dim).
        let axis = if axis == dims.len() as i64 { dims.len() } else { normalize_axis(axis, dims.len())? };
        Some(vec![product_dim(&dims[..axis]), product_dim(&dims[axis..])])
    });
    Inferred::new(x.dtype(0), shape).with_value(x.value(0).map(<[Dim]>::to_vec))
}

fn squeeze(node: &Node, x: &Inputs) -> Inferred {
    let shape = x.shape(0).and_then(|dims| match axes_arg(node, x, 1) {
        Axes::Known(axes) => {
            let axes = normalize_axes(&axes, dims.len())?;
            Some(dims.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| d.clone()).collect())
        }
        // Without axes every size-1 dim goes, and a symbol might be 1.
        Axes::Absent => fixed_shape(dims).map(|s| s.iter().filter(|&&d| d != 1).map(|&d| Dim::Fixed(d as i64)).collect()),
        Axes::Unknown => None,
    });
    Inferred::new(x.dtype(0), shape).with_value(x.value(0).map(<[Dim]>::to_vec))
}

fn unsqueeze(node: &Node, x: &Inputs) -> Inferred {
    let shape = x.shape(0).and_then(|dims| {
        let Axes::Known(axes) = axes_arg(node, x, 1) else {
            return None;
        };
        let rank = dims.len().checked_add(axes.len())?;
        let axes = normalize_axes(&axes, rank)?;
        let mut rest = dims.iter();
        (0..rank).map(|i| if axes.contains(&i) { Some(Dim::Fixed(1)) } else { rest.next().cloned() }).collect()
    });
    Inferred::new(x.dtype(0), shape).with_value(x.value(0).map(<[Dim]>::to_vec))
}

fn transpose(node: &Node, x: &Inputs) -> Inferred {
    let shape = x.shape(0).and_then(|dims| {
        let perm: Vec<usize> = match node.attr_ints("perm") {
            Some(perm) => normalize_axes(perm, dims.len())?,
            None => (0..dims.len()).rev().collect(),
        };
        let mut seen = vec![false; dims.len()];
        for &p in &perm {
            if std::mem::replace(seen.get_mut(p)?, true) {
                return None;
            }
        }
        (perm.len() == dims.len()).then(|| perm.iter().map(|&p| dims[p].clone()).collect())
    });
    // A value of rank 0 or 1 reads the same transposed.
    let value = x.value(0).filter(|_| x.shape(0).is_some_and(|s| s.len() <= 1)).map(<[Dim]>::to_vec);
    Inferred::new(x.dtype(0), shape).with_value(value)
}

fn gather(node: &Node, x: &Inputs) -> Inferred {
    let dtype = x.dtype(0);
    let (Some(data), Some(indices)) = (x.shape(0), x.shape(1)) else {
        return Inferred::new(dtype, None);
    };
    let Some(axis) = normalize_axis(node.attr_int("axis").unwrap_or(0), data.len()) else {
        return Inferred::new(dtype, None);
    };
    let shape: Vec<Dim> = data[..axis].iter().chain(indices).chain(&data[axis + 1..]).cloned().collect();
    let value = x.tensor(0).zip(x.ints(1)).and_then(|((data_shape, elems), indices)| {
        let n = i64::try_from(data_shape[axis]).ok()?;
        let indices =
            indices.iter().map(|&i| usize::try_from(if i < 0 { i + n } else { i }).ok().filter(|&i| i < data_shape[axis])).collect::<Option<Vec<usize>>>()?;
        let picks: Vec<Vec<usize>> = data_shape.iter().enumerate().map(|(a, &d)| if a == axis { indices.clone() } else { (0..d).collect() }).collect();
        pick(&data_shape, elems, &picks)
    });
    Inferred::new(dtype, Some(shape)).with_value(value)
}

fn gather_nd(node: &Node, x: &Inputs) -> Inferred {
    let shape = x.shape(0).zip(x.shape(1)).and_then(|(data, indices)| {
        let batch = usize::try_from(node.attr_int("batch_dims").unwrap_or(0)).ok()?;
        let (last, outer) = indices.split_last()?;
        let depth = usize::try_from(last.fixed()?).ok()?;
        let tail = data.get(batch.checked_add(depth)?..)?;
        Some(outer.iter().chain(tail).cloned().collect())
    });
    Inferred::new(x.dtype(0), shape)
}

fn concat(node: &Node, x: &Inputs) -> Inferred {
    let inputs = 0..node.inputs.len();
    let dtype = x.first_dtype(inputs.clone());
    let shapes: Vec<Option<&[Dim]>> = inputs.clone().map(|i| x.shape(i)).collect();
    let Some(rank) = shapes.iter().flatten().map(|s| s.len()).next() else {
        return Inferred::new(dtype, None);
    };
    let Some(axis) = node.attr_int("axis").and_then(|a| normalize_axis(a, rank)) else {
        return Inferred::new(dtype, None);
    };
    if shapes.iter().flatten().any(|s| s.len() != rank) {
        return Inferred::new(dtype, None);
    }
    let known: Vec<&[Dim]> = shapes.iter().flatten().copied().collect();
    let mut shape: Vec<Dim> = (0..rank).map(|a| known.iter().skip(1).fold(known[0][a].clone(), |acc, s| same_dim(&acc, &s[a]))).collect();
    shape[axis] = if known.len() == shapes.len() { known.iter().skip(1).fold(known[0][axis].clone(), |acc, s| add(&acc, &s[axis])) } else { Dim::Unknown };
    let value = inputs.map(|i| x.tensor(i)).collect::<Option<Vec<_>>>().and_then(|parts| concat_values(&parts, axis));
    Inferred::new(dtype, Some(shape)).with_value(value)
}

/// First index and element count of `[start:end:step]` over a dim of size `d`,
/// clamped as Slice-10 does; `None` for a zero step.
fn slice_range(d: i64, start: i64, end: i64, step: i64) -> Option<(i64, i64)> {
    if step == 0 || d < 0 {
        return None;
    }
    if d == 0 {
        return Some((0, 0));
    }
    let (d, start, end, step) = (d as i128, start as i128, end as i128, step as i128);
    let normalize = |v: i128| if v < 0 { v + d } else { v };
    let (first, count) = if step > 0 {
        let (s, e) = (normalize(start).clamp(0, d), normalize(end).clamp(0, d));
        (s, (e - s + step - 1) / step)
    } else {
        let (s, e) = (normalize(start).clamp(0, d - 1), normalize(end).clamp(-1, d - 1));
        (s, (s - e - step - 1) / -step)
    };
    Some((i64::try_from(first).ok()?, i64::try_from(count.max(0)).ok()?))
}

/// The length of a slice of `dim`. Exact on numbers; a symbolic dim keeps its
/// symbol when sliced whole (`[0:end]` with end the dim itself or "to the end").
fn slice_len(dim: &Dim, start: &Dim, end: &Dim, step: i64) -> Dim {
    // Exporters write "to the end" as a huge end (i64::MAX, i32::MAX); no real dim is that big.
    let to_the_end = |e: &Dim| matches!(e, Dim::Fixed(v) if *v >= i64::from(i32::MAX));
    match (dim, start, end) {
        (Dim::Fixed(d), Dim::Fixed(s), Dim::Fixed(e)) => slice_range(*d, *s, *e, step).map_or(Dim::Unknown, |(_, n)| Dim::Fixed(n)),
        (_, Dim::Fixed(0), _) if step == 1 && (same(end, dim) || to_the_end(end)) => dim.clone(),
        _ => Dim::Unknown,
    }
}

struct SliceParams {
    starts: Vec<Dim>,
    ends: Vec<Dim>,
    axes: Vec<usize>,
    steps: Vec<i64>,
}

fn slice_params(node: &Node, x: &Inputs, rank: usize) -> Option<SliceParams> {
    let fixed = |v: &[i64]| v.iter().map(|&i| Dim::Fixed(i)).collect::<Vec<_>>();
    let optional_ints = |i: usize| if x.is_given(i) { x.ints(i).map(Some) } else { Some(None) };
    let (starts, ends, axes, steps) = match node.attr_ints("starts") {
        // Slice-1 took its parameters as attributes.
        Some(starts) => (fixed(starts), fixed(node.attr_ints("ends")?), node.attr_ints("axes").map(<[i64]>::to_vec), None),
        None => (x.elements(1)?, x.elements(2)?, optional_ints(3)?, optional_ints(4)?),
    };
    let axes = match axes {
        Some(axes) => normalize_axes(&axes, rank)?,
        None => (0..starts.len()).collect(),
    };
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    let n = starts.len();
    (ends.len() == n && axes.len() == n && steps.len() == n).then_some(SliceParams { starts, ends, axes, steps })
}

fn slice(node: &Node, x: &Inputs) -> Inferred {
    let dtype = x.dtype(0);
    let Some(dims) = x.shape(0) else {
        return Inferred::new(dtype, None);
    };
    let Some(p) = slice_params(node, x, dims.len()) else {
        return Inferred::new(dtype, Some(vec![Dim::Unknown; dims.len()]));
    };
    let mut shape = dims.to_vec();
    for k in 0..p.axes.len() {
        let a = p.axes[k];
        shape[a] = slice_len(&dims[a], &p.starts[k], &p.ends[k], p.steps[k]);
    }
    let value = x.tensor(0).and_then(|(data_shape, elems)| {
        let mut picks: Vec<Vec<usize>> = data_shape.iter().map(|&d| (0..d).collect()).collect();
        for k in 0..p.axes.len() {
            let a = p.axes[k];
            let d = i64::try_from(data_shape[a]).ok()?;
            let (first, count) = slice_range(d, p.starts[k].fixed()?, p.ends[k].fixed()?, p.steps[k])?;
            let index = |i: i64| i.checked_mul(p.steps[k]).and_then(|o| o.checked_add(first));
            picks[a] = (0..count).map(|i| index(i).and_then(|j| usize::try_from(j).ok())).collect::<Option<_>>()?;
        }
        pick(&data_shape, elems, &picks)
    });
    Inferred::new(dtype, Some(shape)).with_value(value)
}

fn split(node: &Node, x: &Inputs) -> Vec<Inferred> {
    let n = node.outputs.len();
    let dtype = x.dtype(0);
    let unknown_rank = || vec![Inferred::new(dtype, None); n];
    let Some(dims) = x.shape(0) else { return unknown_rank() };
    let Some(axis) = normalize_axis(node.attr_int("axis").unwrap_or(0), dims.len()) else {
        return unknown_rank();
    };
    let sizes: Vec<Dim> = if let Some(split) = node.attr_ints("split") {
        dims_from_value(split.iter().map(|&s| Dim::Fixed(s)).collect())
    } else if x.is_given(1) {
        x.elements(1).map_or_else(|| vec![Dim::Unknown; n], dims_from_value)
    } else {
        match &dims[axis] {
            // Split-18: chunks of ceil(d / n), the last one smaller.
            Dim::Fixed(d) if n > 0 && *d >= 0 => {
                let (d, n) = (i128::from(*d), n as i128);
                let chunk = (d + n - 1) / n;
                (0..n).map(|k| Dim::Fixed((d - k * chunk).clamp(0, chunk) as i64)).collect()
            }
            whole if n == 1 => vec![whole.clone()],
            _ => vec![Dim::Unknown; n],
        }
    };
    (0..n)
        .map(|k| {
            let mut shape = dims.to_vec();
            shape[axis] = sizes.get(k).cloned().unwrap_or(Dim::Unknown);
            Inferred::new(dtype, Some(shape))
        })
        .collect()
}

/// Dims from a shape value; a negative number is no dim.
fn dims_from_value(value: Vec<Dim>) -> Vec<Dim> {
    value.into_iter().map(|d| if matches!(d, Dim::Fixed(v) if v < 0) { Dim::Unknown } else { d }).collect()
}

fn expand(x: &Inputs) -> Inferred {
    let target = x.elements(1).map(dims_from_value);
    let shape = target.as_deref().and_then(|t| broadcast(&[x.shape(0), Some(t)]));
    let value = shape.as_deref().and_then(fixed_shape).and_then(|out| {
        let (shape, elems) = x.tensor(0)?;
        broadcast_value(&shape, elems, &out)
    });
    Inferred::new(x.dtype(0), shape).with_value(value)
}

fn tile(x: &Inputs) -> Inferred {
    let shape = x
        .shape(0)
        .zip(x.elements(1))
        .and_then(|(dims, repeats)| (dims.len() == repeats.len()).then(|| dims.iter().zip(&repeats).map(|(d, r)| mul(d, r)).collect()));
    Inferred::new(x.dtype(0), shape)
}

fn pad(node: &Node, x: &Inputs) -> Inferred {
    let dtype = x.dtype(0);
    let Some(dims) = x.shape(0) else {
        return Inferred::new(dtype, None);
    };
    let rank = dims.len();
    let pads = match node.attr_ints("pads") {
        // Pad-2 took the pads as an attribute.
        Some(pads) => Some(pads.iter().map(|&p| Dim::Fixed(p)).collect::<Vec<_>>()),
        None => x.value(1).map(<[Dim]>::to_vec),
    };
    let axes = match axes_arg(node, x, 3) {
        Axes::Absent => Some((0..rank).collect()),
        Axes::Known(axes) => normalize_axes(&axes, rank),
        Axes::Unknown => None,
    };
    let shape = pads.zip(axes).filter(|(p, a)| p.len() == 2 * a.len()).map(|(pads, axes)| {
        let mut shape = dims.to_vec();
        for (k, &a) in axes.iter().enumerate() {
            shape[a] = add(&add(&dims[a], &pads[k]), &pads[k + axes.len()]);
        }
        shape
    });
    Inferred::new(dtype, Some(shape.unwrap_or_else(|| vec![Dim::Unknown; rank])))
}

fn range(x: &Inputs) -> Inferred {
    let dtype = x.first_dtype([0, 1, 2]);
    let (start, limit, delta) = (x.scalar(0), x.scalar(1), x.scalar(2));
    let len = match (start, limit, delta) {
        (Some(Dim::Fixed(s)), Some(Dim::Fixed(l)), Some(Dim::Fixed(d))) => range_len(*s, *l, *d),
        // range(0, n, 1) has n elements, whatever n is.
        (Some(Dim::Fixed(0)), Some(n), Some(Dim::Fixed(1))) => n.clone(),
        // range(past, past + new, 1) has new elements (a symbolic difference
        // is a sum of dims left over, never negative)
        (Some(start), Some(limit), Some(Dim::Fixed(1))) => match sub(limit, start) {
            d @ Dim::Symbol(_) => d,
            _ => Dim::Unknown,
        },
        _ => Dim::Unknown,
    };
    let value = match (start, delta, &len) {
        (Some(Dim::Fixed(s)), Some(Dim::Fixed(d)), Dim::Fixed(n)) if *n <= MAX_VALUE_ELEMENTS as i64 => {
            (0..*n).map(|k| k.checked_mul(*d).and_then(|o| o.checked_add(*s)).map(Dim::Fixed)).collect()
        }
        _ => None,
    };
    Inferred::new(dtype, Some(vec![len])).with_value(value)
}

/// Range's element count: `max(ceil((limit - start) / delta), 0)`.
fn range_len(start: i64, limit: i64, delta: i64) -> Dim {
    if delta == 0 {
        return Dim::Unknown;
    }
    let (span, delta) = (i128::from(limit) - i128::from(start), i128::from(delta));
    let count = if (span > 0) == (delta > 0) { (span + delta - delta.signum()) / delta } else { 0 };
    i64::try_from(count.max(0)).map_or(Dim::Unknown, Dim::Fixed)
}

fn constant_of_shape(node: &Node, x: &Inputs) -> Inferred {
    let fill = match node.attr("value") {
        Some(AttrValue::Tensor(t)) => Some(tensor_inferred(t)),
        _ => None,
    };
    let dtype = fill.as_ref().map_or(Some(DataType::Float), |f| f.ty.elem_type);
    let shape = x.elements(0).map(dims_from_value);
    let value = shape.as_deref().and_then(fixed_shape).and_then(|s| {
        let element = fill.as_ref()?.value.as_ref()?.first()?.clone();
        let count = element_count(&s).filter(|&c| c <= MAX_VALUE_ELEMENTS)?;
        Some(vec![element; count])
    });
    Inferred::new(dtype, shape).with_value(value)
}

fn reduce(node: &Node, x: &Inputs) -> Inferred {
    let dtype = x.dtype(0);
    let keepdims = node.attr_int("keepdims").unwrap_or(1) != 0;
    let Some(dims) = x.shape(0) else {
        return Inferred::new(dtype, None);
    };
    let all = || (0..dims.len()).collect::<Vec<_>>();
    let axes = match axes_arg(node, x, 1) {
        Axes::Known(axes) if !axes.is_empty() => normalize_axes(&axes, dims.len()),
        Axes::Absent | Axes::Known(_) if node.attr_int("noop_with_empty_axes").unwrap_or(0) != 0 => {
            return Inferred::like(x.ty(0));
        }
        Axes::Absent | Axes::Known(_) => Some(all()),
        Axes::Unknown => return Inferred::new(dtype, keepdims.then(|| vec![Dim::Unknown; dims.len()])),
    };
    Inferred::new(dtype, axes.map(|axes| reduced_shape(dims, &axes, keepdims)))
}

fn reduced_shape(dims: &[Dim], axes: &[usize], keepdims: bool) -> Vec<Dim> {
    dims.iter().enumerate().filter_map(|(i, d)| if !axes.contains(&i) { Some(d.clone()) } else { keepdims.then_some(Dim::Fixed(1)) }).collect()
}

fn arg_reduce(node: &Node, x: &Inputs) -> Inferred {
    let keepdims = node.attr_int("keepdims").unwrap_or(1) != 0;
    let shape = x.shape(0).and_then(|dims| {
        let axis = normalize_axis(node.attr_int("axis").unwrap_or(0), dims.len())?;
        Some(reduced_shape(dims, &[axis], keepdims))
    });
    Inferred::new(Some(DataType::Int64), shape)
}

/// numpy matmul: 1-D operands are promoted and the added dim removed again.
fn matmul_shape(a: Option<&[Dim]>, b: Option<&[Dim]>) -> Option<Vec<Dim>> {
    let (a, b) = (a?, b?);
    let (a_batch, rows) = match a.len() {
        0 => return None,
        1 => (&a[..0], None),
        n => (&a[..n - 2], Some(&a[n - 2])),
    };
    let (b_batch, cols) = match b.len() {
        0 => return None,
        1 => (&b[..0], None),
        n => (&b[..n - 2], Some(&b[n - 1])),
    };
    let mut shape = broadcast(&[Some(a_batch), Some(b_batch)])?;
    shape.extend(rows.cloned());
    shape.extend(cols.cloned());
    Some(shape)
}

fn gemm(node: &Node, x: &Inputs) -> Inferred {
    let shape = x.shape(0).zip(x.shape(1)).and_then(|(a, b)| {
        let trans_a = node.attr_int("transA").unwrap_or(0) != 0;
        let trans_b = node.attr_int("transB").unwrap_or(0) != 0;
        match (a, b) {
            ([a0, a1], [b0, b1]) => Some(vec![if trans_a { a1.clone() } else { a0.clone() }, if trans_b { b0.clone() } else { b1.clone() }]),
            _ => None,
        }
    });
    Inferred::new(x.dtype(0), shape)
}

/// One spatial output dim of a convolution (onnx Conv's formula), for fixed sizes only.
fn conv_dim(input: &Dim, kernel: i64, stride: i64, dilation: i64, pads: (i64, i64), auto_pad: &str) -> Dim {
    let Dim::Fixed(size) = input else { return Dim::Unknown };
    let (size, kernel, stride, dilation) = (i128::from(*size), i128::from(kernel), i128::from(stride), i128::from(dilation));
    if stride <= 0 || dilation <= 0 || kernel <= 0 {
        return Dim::Unknown;
    }
    let reach = dilation * (kernel - 1) + 1;
    let out = match auto_pad {
        "SAME_UPPER" | "SAME_LOWER" => (size + stride - 1) / stride,
        "VALID" => (size - reach) / stride + 1,
        _ => (size + i128::from(pads.0) + i128::from(pads.1) - reach).div_euclid(stride) + 1,
    };
    i64::try_from(out).ok().filter(|&o| o >= 0).map_or(Dim::Unknown, Dim::Fixed)
}

fn conv(node: &Node, x: &Inputs) -> Inferred {
    let dtype = x.dtype(0);
    let Some(input) = x.shape(0).filter(|s| s.len() >= 3) else {
        return Inferred::new(dtype, None);
    };
    let spatial = input.len() - 2;
    let unknown_spatial = || Inferred::new(dtype, Some(vec![Dim::Unknown; input.len()]));
    let weight = x.shape(1);
    let kernel: Option<Vec<i64>> = match node.attr_ints("kernel_shape") {
        Some(k) => Some(k.to_vec()),
        None => weight.and_then(|w| w.get(2..)).and_then(|k| k.iter().map(Dim::fixed).collect()),
    };
    let Some(kernel) = kernel.filter(|k| k.len() == spatial) else {
        return unknown_spatial();
    };
    let per_axis = |name: &str, default: i64, len: usize| -> Option<Vec<i64>> {
        let v = node.attr_ints(name).map_or_else(|| vec![default; len], <[i64]>::to_vec);
        (v.len() == len).then_some(v)
    };
    let (Some(strides), Some(dilations), Some(pads)) = (per_axis("strides", 1, spatial), per_axis("dilations", 1, spatial), per_axis("pads", 0, 2 * spatial))
    else {
        return unknown_spatial();
    };
    let auto_pad = attr_str(node, "auto_pad").unwrap_or("NOTSET");
    let channels = weight.and_then(|w| w.first()).cloned().unwrap_or(Dim::Unknown);
    let mut shape = vec![input[0].clone(), channels];
    shape.extend((0..spatial).map(|i| conv_dim(&input[i + 2], kernel[i], strides[i], dilations[i], (pads[i], pads[i + spatial]), auto_pad)));
    Inferred::new(dtype, Some(shape))
}

fn global_pool(x: &Inputs) -> Inferred {
    let shape = x.shape(0).filter(|s| s.len() >= 2).map(|s| s.iter().enumerate().map(|(i, d)| if i < 2 { d.clone() } else { Dim::Fixed(1) }).collect());
    Inferred::new(x.dtype(0), shape)
}

/// Normalisation statistics (mean, inverse std dev): the input's dims before
/// `axis`, 1 from there on.
fn norm_stats(input: Option<&[Dim]>, axis: i64, dtype: Option<DataType>) -> Inferred {
    let shape = input.and_then(|dims| {
        let axis = normalize_axis(axis, dims.len())?;
        Some(dims.iter().enumerate().map(|(i, d)| if i < axis { d.clone() } else { Dim::Fixed(1) }).collect())
    });
    Inferred::new(dtype, shape)
}

/// LayerNormalization (Y, Mean, InvStdDev) and ORT's SimplifiedLayerNormalization
/// (Y, InvStdVar), both in the default domain; statistics are in `stash_type` (float).
fn layer_norm(node: &Node, x: &Inputs) -> Vec<Inferred> {
    let axis = node.attr_int("axis").unwrap_or(-1);
    let stash = attr_dtype(node, "stash_type").or(Some(DataType::Float));
    let stats = norm_stats(x.shape(0), axis, stash);
    let count = if node.op_type == "LayerNormalization" { 3 } else { 2 };
    std::iter::once(Inferred::like(x.ty(0))).chain(std::iter::repeat_n(stats, count - 1)).collect()
}

/// SkipLayerNormalization / SkipSimplifiedLayerNormalization: output, mean,
/// inv_std_var (float, last dim 1), input_skip_bias_sum (like the input).
fn skip_layer_norm(x: &Inputs) -> Vec<Inferred> {
    let stats = norm_stats(x.shape(0), -1, Some(DataType::Float));
    vec![Inferred::like(x.ty(0)), stats.clone(), stats, Inferred::like(x.ty(0))]
}

/// EmbedLayerNormalization: output [B, S, hidden] in the word embedding's type,
/// mask_index [B] int32, embedding_sum like the output.
fn embed_layer_norm(x: &Inputs) -> Vec<Inferred> {
    let ids = x.shape(0).filter(|s| s.len() == 2);
    let hidden = x.shape(2).and_then(|w| w.get(1)).cloned().unwrap_or(Dim::Unknown);
    let output = Inferred::new(x.dtype(2), ids.map(|ids| vec![ids[0].clone(), ids[1].clone(), hidden]));
    let mask_index = Inferred::new(Some(DataType::Int32), ids.map(|ids| vec![ids[0].clone()]));
    vec![output.clone(), mask_index, output]
}

fn heads(node: &Node) -> Dim {
    node.attr_int("num_heads").filter(|&n| n > 0).map_or(Dim::Unknown, Dim::Fixed)
}

/// A KV cache output: the past input's dims with the sequence (at `seq_axis`) grown
/// by an unknown amount, or `fallback` without a past.
fn present(past: Option<&[Dim]>, seq_axis: usize, fallback: Option<Vec<Dim>>) -> Option<Vec<Dim>> {
    match past {
        Some(dims) if seq_axis < dims.len() => {
            let mut dims = dims.to_vec();
            dims[seq_axis] = Dim::Unknown;
            Some(dims)
        }
        _ => fallback,
    }
}

/// Attention: input [B, S, H_in] -> output [B, S, v_hidden], v_hidden the third
/// of qkv_hidden_sizes or a third of the bias; present [2, B, heads, ?, head_size].
fn attention(node: &Node, x: &Inputs) -> Vec<Inferred> {
    let dtype = x.first_dtype([2, 0]);
    let v_hidden = match node.attr_ints("qkv_hidden_sizes") {
        Some([_, _, v]) => Dim::Fixed(*v),
        _ => x.shape(2).and_then(|b| b.first()).map_or(Dim::Unknown, |b| div_exact(b, &Dim::Fixed(3))),
    };
    let input = x.shape(0).filter(|s| s.len() == 3);
    let output = input.map(|s| vec![s[0].clone(), s[1].clone(), v_hidden.clone()]);
    let fallback = input.map(|s| vec![Dim::Fixed(2), s[0].clone(), heads(node), Dim::Unknown, div_exact(&v_hidden, &heads(node))]);
    vec![Inferred::new(dtype, output), Inferred::new(dtype, present(x.shape(4), 3, fallback))]
}

/// `a / b` when it divides evenly.
fn div_exact(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) if x.checked_rem(*y) == Some(0) => x.checked_div(*y).map_or(Dim::Unknown, Dim::Fixed),
        (other, Dim::Fixed(1)) => other.clone(),
        _ => Dim::Unknown,
    }
}

/// MultiHeadAttention: output [B, S, v_hidden]; present_key/value [B, heads, ?, head_size].
fn multi_head_attention(node: &Node, x: &Inputs) -> Vec<Inferred> {
    let dtype = x.dtype(0);
    let query = x.shape(0);
    let output = query.and_then(|q| {
        let v_hidden = match (q.len(), x.shape(2), x.shape(1)) {
            // packed QKV [B, S, N, 3, H]
            (5, _, _) => mul(&q[2], &q[4]),
            (3, Some([_, _, v]), _) => v.clone(),
            (3, Some([_, n, _, h]), _) => mul(n, h),
            // packed KV [B, L, N, 2, H]
            (3, None, Some([_, _, n, _, h])) => mul(n, h),
            (3, _, _) => Dim::Unknown,
            _ => return None,
        };
        Some(vec![q[0].clone(), q[1].clone(), v_hidden])
    });
    let head_size = output.as_ref().map_or(Dim::Unknown, |o| div_exact(&o[2], &heads(node)));
    let fallback = query.map(|q| vec![q[0].clone(), heads(node), Dim::Unknown, head_size]);
    let cache = Inferred::new(dtype, present(x.shape(6), 2, fallback));
    vec![Inferred::new(dtype, output), cache.clone(), cache]
}

/// ONNX Attention-23, output Y only: 3-D Q [B, S, q_hidden] gives
/// [B, S, q_num_heads * v_head_size] with v_head_size = V's hidden / kv_num_heads;
/// 4-D Q [B, q_heads, S, head] gives [B, q_heads, S, v_head] (Operators.md).
fn standard_attention(node: &Node, x: &Inputs) -> Inferred {
    let dtype = x.dtype(0);
    let shape = match (x.shape(0), x.shape(2)) {
        (Some([b, s, _]), Some([_, _, v_hidden])) => {
            let q_heads = node.attr_int("q_num_heads").filter(|&n| n > 0).map_or(Dim::Unknown, Dim::Fixed);
            let kv_heads = node.attr_int("kv_num_heads").filter(|&n| n > 0).map_or(Dim::Unknown, Dim::Fixed);
            Some(vec![b.clone(), s.clone(), mul(&q_heads, &div_exact(v_hidden, &kv_heads))])
        }
        (Some([b, heads, s, _]), Some([_, _, _, v_head])) => Some(vec![b.clone(), heads.clone(), s.clone(), v_head.clone()]),
        _ => None,
    };
    Inferred::new(dtype, shape)
}

/// GroupQueryAttention: output [B, S, heads * head_size]; present_key/value
/// [B, kv_heads, ?, head_size]. Without key and value the query packs Q, K and V.
fn group_query_attention(node: &Node, x: &Inputs) -> Vec<Inferred> {
    let dtype = x.dtype(0);
    let query = x.shape(0).filter(|q| q.len() == 3);
    let kv_heads = node.attr_int("kv_num_heads").filter(|&n| n > 0).map_or(Dim::Unknown, Dim::Fixed);
    // The last query dim holds the heads of Q, plus those of K and V when packed.
    let query_heads = if x.is_given(1) { heads(node) } else { add(&heads(node), &mul(&Dim::Fixed(2), &kv_heads)) };
    let head_size = query.map_or(Dim::Unknown, |q| div_exact(&q[2], &query_heads));
    let output = query.map(|q| vec![q[0].clone(), q[1].clone(), mul(&heads(node), &head_size)]);
    let fallback = query.map(|q| vec![q[0].clone(), kv_heads, Dim::Unknown, head_size]);
    let cache = Inferred::new(x.first_dtype([3, 0]), present(x.shape(3), 2, fallback));
    vec![Inferred::new(dtype, output), cache.clone(), cache]
}

/// MatMulNBits: A [..., K] times a packed [N, K] weight -> [..., N].
fn matmul_n_bits(node: &Node, x: &Inputs) -> Inferred {
    let n = node.attr_int("N").map_or(Dim::Unknown, Dim::Fixed);
    let shape = x.shape(0).and_then(|a| a.split_last()).map(|(_, outer)| outer.iter().cloned().chain([n]).collect());
    Inferred::new(x.dtype(0), shape)
}

/// GatherBlockQuantized (rows of a block-quantized table, gather_axis 0 and
/// quantize_axis 1, as `quantize-gather-int4` writes): the scales' type,
/// indices' shape then the row length, scales [V, D / block_size].
fn gather_block_quantized(node: &Node, x: &Inputs) -> Inferred {
    let block = node.attr_int("block_size").unwrap_or(128);
    let row_major = node.attr_int("gather_axis").unwrap_or(0) == 0 && node.attr_int("quantize_axis").unwrap_or(1) == 1;
    let row = match x.shape(2) {
        Some([_, blocks]) if row_major => mul(blocks, &Dim::Fixed(block)),
        _ => Dim::Unknown,
    };
    let shape = x.shape(1).filter(|_| row_major).map(|ids| ids.iter().cloned().chain([row]).collect());
    Inferred::new(x.dtype(2), shape)
}

/// QuantizeLinear's output type: the zero point's, else `output_dtype`, else uint8.
fn quantize_linear(node: &Node, x: &Inputs) -> Inferred {
    let dtype = x.dtype(2).or_else(|| attr_dtype(node, "output_dtype")).unwrap_or(DataType::Uint8);
    Inferred::new(Some(dtype), x.shape(0).map(<[Dim]>::to_vec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{GraphBuilder, Model};

    fn sym(s: &str) -> Dim {
        Dim::Symbol(s.into())
    }

    fn fixed(v: i64) -> Dim {
        Dim::Fixed(v)
    }

    fn ints(v: &[i64]) -> AttrValue {
        AttrValue::Ints(v.to_vec())
    }

    /// A builder with input `x: float32[batch, seq, 384]`.
    fn with_bsh_input() -> (GraphBuilder, String) {
        let mut b = GraphBuilder::new("g");
        let x = b.input_symbolic("x", DataType::Float, vec![sym("batch"), sym("seq"), fixed(384)]);
        (b, x)
    }

    fn infer(b: GraphBuilder, opset: i64) -> TypeMap {
        infer_types(&b.into_model(opset))
    }

    #[test]
    fn broadcasting_unifies_ones_and_equal_symbols() {
        let mut b = GraphBuilder::new("g");
        let x = b.input_symbolic("x", DataType::Float, vec![sym("batch"), fixed(1), sym("seq")]);
        let y = b.input_symbolic("y", DataType::Float, vec![sym("seq")]);
        let m = b.input_symbolic("m", DataType::Float, vec![fixed(1), fixed(1), fixed(12), sym("seq")]);
        let heads = b.input_symbolic("h", DataType::Float, vec![fixed(12), fixed(1), fixed(1)]);
        let other = b.input_symbolic("o", DataType::Float, vec![sym("other")]);
        let unknown = b.input_symbolic("u", DataType::Float, vec![Dim::Unknown]);
        let xy = b.node("Add", &[&x, &y]);
        let xym = b.node("Mul", &[&xy, &m]);
        // a valid model has batch = 12 or 1 here
        let fixed_wins = b.node("Add", &[&x, &heads]);
        let clash = b.node("Add", &[&y, &other]);
        let bet = b.node("Add", &[&y, &unknown]);
        let cmp = b.node("Less", &[&x, &y]);
        let types = infer(b, 17);
        assert_eq!(types.shape(&xy), Some(&[sym("batch"), fixed(1), sym("seq")][..]));
        assert_eq!(types.shape(&xym), Some(&[fixed(1), sym("batch"), fixed(12), sym("seq")][..]));
        assert_eq!(types.shape(&fixed_wins), Some(&[fixed(12), fixed(1), sym("seq")][..]));
        assert_eq!(types.shape(&clash), Some(&[Dim::Unknown][..]));
        assert_eq!(types.shape(&bet), Some(&[sym("seq")][..]));
        assert_eq!(types.elem_type(&cmp), Some(DataType::Bool));
    }

    #[test]
    fn matmul_broadcasts_batch_dims_and_drops_promoted_ones() {
        let mut b = GraphBuilder::new("g");
        let q = b.input_symbolic("q", DataType::Float, vec![sym("batch"), fixed(12), sym("seq"), fixed(32)]);
        let k = b.input_symbolic("k", DataType::Float, vec![sym("batch"), fixed(12), fixed(32), sym("seq")]);
        let w = b.initializer_f32("w", &[32, 8], &[0.0; 256]);
        let v = b.initializer_f32("v", &[32], &[0.0; 32]);
        let scores = b.node("MatMul", &[&q, &k]);
        let projected = b.node("MatMul", &[&q, &w]);
        let dotted = b.node("MatMul", &[&q, &v]);
        let types = infer(b, 17);
        assert_eq!(types.shape(&scores), Some(&[sym("batch"), fixed(12), sym("seq"), sym("seq")][..]));
        assert_eq!(types.shape(&projected), Some(&[sym("batch"), fixed(12), sym("seq"), fixed(8)][..]));
        assert_eq!(types.shape(&dotted), Some(&[sym("batch"), fixed(12), sym("seq")][..]));
        assert_eq!(types.elem_type(&scores), Some(DataType::Float));
    }

    #[test]
    fn reshape_resolves_zero_and_minus_one() {
        let (mut b, x) = with_bsh_input();
        let heads = b.initializer_i64("heads", &[4], &[0, 0, -1, 32]);
        let flat = b.initializer_i64("flat", &[2], &[-1, 384]);
        let zero = b.initializer_i64("zero", &[2], &[0, 4]);
        let split = b.node("Reshape", &[&x, &heads]);
        let merged = b.node("Reshape", &[&x, &flat]);
        let literal_zero = b.node_with("Reshape", &[&x, &zero], vec![("allowzero", AttrValue::Int(1))]);
        let types = infer(b, 17);
        assert_eq!(types.shape(&split), Some(&[sym("batch"), sym("seq"), fixed(12), fixed(32)][..]));
        // batch*seq has no name
        assert_eq!(types.shape(&merged), Some(&[Dim::Unknown, fixed(384)][..]));
        assert_eq!(types.shape(&literal_zero), Some(&[fixed(0), fixed(4)][..]));
    }

    #[test]
    fn shape_gather_concat_chain_gives_a_symbolic_reshape_target() {
        // What torch.onnx.export writes for x.view(x.size(0), x.size(1), 12, 32).
        let (mut b, x) = with_bsh_input();
        let shape = b.node("Shape", &[&x]);
        let zero = b.initializer_i64("zero", &[], &[0]);
        let one = b.initializer_i64("one", &[], &[1]);
        let axes = b.initializer_i64("axes", &[1], &[0]);
        let heads = b.initializer_i64("heads", &[1], &[12]);
        let head_size = b.initializer_i64("head_size", &[1], &[-1]);
        let batch = b.node("Gather", &[&shape, &zero]);
        let seq = b.node("Gather", &[&shape, &one]);
        let batch1 = b.node("Unsqueeze", &[&batch, &axes]);
        let seq1 = b.node("Unsqueeze", &[&seq, &axes]);
        let target = b.node_with("Concat", &[&batch1, &seq1, &heads, &head_size], vec![("axis", AttrValue::Int(0))]);
        let reshaped = b.node("Reshape", &[&x, &target]);
        let types = infer(b, 17);
        assert_eq!(types.value(&batch), Some(&[sym("batch")][..]));
        assert_eq!(types.shape(&batch), Some(&[][..]));
        assert_eq!(types.value(&target), Some(&[sym("batch"), sym("seq"), fixed(12), fixed(-1)][..]));
        assert_eq!(types.int_value(&target), None);
        assert_eq!(types.shape(&reshaped), Some(&[sym("batch"), sym("seq"), fixed(12), fixed(32)][..]));
    }

    #[test]
    fn shape_start_end_and_dynamo_style_slices() {
        let mut b = GraphBuilder::new("g");
        let x = b.input_symbolic("x", DataType::Float, vec![sym("b"), fixed(12), sym("s"), fixed(32)]);
        let tail = b.node_with("Shape", &[&x], vec![("start", AttrValue::Int(1)), ("end", AttrValue::Int(-1))]);
        let shape = b.node("Shape", &[&x]);
        let minus_one = b.initializer_i64("m1", &[1], &[-1]);
        let minus_two = b.initializer_i64("m2", &[1], &[-2]);
        let big = b.initializer_i64("big", &[1], &[i64::MAX]);
        let small = b.initializer_i64("small", &[1], &[i64::MIN]);
        let last = b.node("Slice", &[&shape, &minus_one, &big]);
        let head = b.node("Slice", &[&shape, &small, &minus_two]);
        let types = infer(b, 18);
        assert_eq!(types.value(&tail), Some(&[fixed(12), sym("s")][..]));
        assert_eq!(types.int_value(&last), Some(vec![32]));
        assert_eq!(types.value(&head), Some(&[sym("b"), fixed(12)][..]));
        assert_eq!(types.shape(&head), Some(&[fixed(2)][..]));
    }

    #[test]
    fn transpose_follows_perm_or_reverses() {
        let mut b = GraphBuilder::new("g");
        let x = b.input_symbolic("x", DataType::Float, vec![sym("b"), sym("s"), fixed(12), fixed(32)]);
        let heads_first = b.node_with("Transpose", &[&x], vec![("perm", ints(&[0, 2, 1, 3]))]);
        let reversed = b.node("Transpose", &[&x]);
        let invalid = b.node_with("Transpose", &[&x], vec![("perm", ints(&[0, 0, 1, 3]))]);
        let types = infer(b, 17);
        assert_eq!(types.shape(&heads_first), Some(&[sym("b"), fixed(12), sym("s"), fixed(32)][..]));
        assert_eq!(types.shape(&reversed), Some(&[fixed(32), fixed(12), sym("s"), sym("b")][..]));
        assert_eq!(types.rank(&invalid), None);
        assert_eq!(types.elem_type(&invalid), Some(DataType::Float));
    }

    #[test]
    fn slice_on_constants_and_symbolic_dims() {
        let mut b = GraphBuilder::new("g");
        let table = b.initializer_i64("table", &[2, 3], &[1, 2, 3, 4, 5, 6]);
        let x = b.input_symbolic("x", DataType::Float, vec![sym("b"), fixed(10)]);
        let starts = b.initializer_i64("starts", &[2], &[0, 2]);
        let ends = b.initializer_i64("ends", &[2], &[1, 0]);
        let axes = b.initializer_i64("axes", &[2], &[0, 1]);
        let steps = b.initializer_i64("steps", &[2], &[1, -1]);
        let picked = b.node("Slice", &[&table, &starts, &ends, &axes, &steps]);
        let s3 = b.initializer_i64("s3", &[1], &[3]);
        let e9 = b.initializer_i64("e9", &[1], &[-1]);
        let ax1 = b.initializer_i64("ax1", &[1], &[1]);
        let middle = b.node("Slice", &[&x, &s3, &e9, &ax1]);
        let zero = b.initializer_i64("z", &[1], &[0]);
        let ax0 = b.initializer_i64("ax0", &[1], &[0]);
        let end = b.initializer_i64("end", &[1], &[i64::from(i32::MAX)]);
        let whole = b.node("Slice", &[&x, &zero, &end, &ax0]);
        let prefix = b.node("Slice", &[&x, &zero, &s3, &ax0]);
        let types = infer(b, 17);
        assert_eq!(types.shape(&picked), Some(&[fixed(1), fixed(2)][..]));
        assert_eq!(types.int_value(&picked), Some(vec![3, 2]));
        assert_eq!(types.shape(&middle), Some(&[sym("b"), fixed(6)][..]));
        assert_eq!(types.shape(&whole), Some(&[sym("b"), fixed(10)][..]));
        // min(3, b) has no name
        assert_eq!(types.shape(&prefix), Some(&[Dim::Unknown, fixed(10)][..]));
    }

    #[test]
    fn squeeze_and_unsqueeze_take_axes_as_attribute_or_input() {
        for opset in [11, 13] {
            let mut b = GraphBuilder::new("g");
            let x = b.input_symbolic("x", DataType::Float, vec![sym("b"), fixed(1), sym("s")]);
            let axes_arg = |b: &mut GraphBuilder, name: &str, axes: &[i64]| -> (Vec<String>, Vec<(&'static str, AttrValue)>) {
                if opset >= 13 {
                    (vec![b.initializer_i64(name, &[axes.len() as i64], axes)], vec![])
                } else {
                    (vec![], vec![("axes", ints(axes))])
                }
            };
            let (extra, attrs) = axes_arg(&mut b, "sq_axes", &[1]);
            let inputs: Vec<&str> = std::iter::once(x.as_str()).chain(extra.iter().map(String::as_str)).collect();
            let squeezed = b.node_with("Squeeze", &inputs, attrs);
            let (extra, attrs) = axes_arg(&mut b, "unsq_axes", &[0, -1]);
            let inputs: Vec<&str> = std::iter::once(squeezed.as_str()).chain(extra.iter().map(String::as_str)).collect();
            let unsqueezed = b.node_with("Unsqueeze", &inputs, attrs);
            let all = b.node("Squeeze", &[&x]);
            let types = infer(b, opset);
            assert_eq!(types.shape(&squeezed), Some(&[sym("b"), sym("s")][..]), "opset {opset}");
            assert_eq!(types.shape(&unsqueezed), Some(&[fixed(1), sym("b"), sym("s"), fixed(1)][..]), "opset {opset}");
            // Without axes, a symbol might be 1: the rank is not known.
            assert_eq!(types.rank(&all), None);
        }
    }

    #[test]
    fn mask_values_flow_through_equal_where_and_constant_of_shape() {
        // The TorchScript exporter's expand-shape idiom: Where(Equal(t, -1), ones, t).
        let (mut b, x) = with_bsh_input();
        let shape = b.node("Shape", &[&x]);
        let len = b.node("Shape", &[&shape]);
        let one = Tensor::from_i64("one", vec![1], &[1]);
        let ones = b.node_with("ConstantOfShape", &[&len], vec![("value", AttrValue::Tensor(one))]);
        let minus_one = b.initializer_i64("m1", &[], &[-1]);
        let minus_ones = b.node("Mul", &[&ones, &minus_one]);
        let is_free = b.node("Equal", &[&shape, &minus_ones]);
        let target = b.node("Where", &[&is_free, &ones, &shape]);
        let expanded = b.node("Expand", &[&x, &target]);
        let types = infer(b, 17);
        assert_eq!(types.int_value(&ones), Some(vec![1, 1, 1]));
        assert_eq!(types.int_value(&is_free), Some(vec![0, 0, 0]));
        assert_eq!(types.value(&target), Some(&[sym("batch"), sym("seq"), fixed(384)][..]));
        assert_eq!(types.shape(&expanded), Some(&[sym("batch"), sym("seq"), fixed(384)][..]));
    }

    #[test]
    fn range_and_cast_keep_symbolic_lengths() {
        let (mut b, x) = with_bsh_input();
        let shape = b.node("Shape", &[&x]);
        let one = b.initializer_i64("one", &[], &[1]);
        let zero = b.initializer_i64("zero", &[], &[0]);
        let seq = b.node("Gather", &[&shape, &one]);
        let seq32 = b.node_with("Cast", &[&seq], vec![("to", AttrValue::Int(DataType::Int32.code() as i64))]);
        let positions = b.node("Range", &[&zero, &seq, &one]);
        let five = b.initializer_i64("five", &[], &[5]);
        let counted = b.node("Range", &[&zero, &five, &one]);
        let types = infer(b, 17);
        assert_eq!(types.value(&seq32), Some(&[sym("seq")][..]));
        assert_eq!(types.elem_type(&seq32), Some(DataType::Int32));
        assert_eq!(types.shape(&positions), Some(&[sym("seq")][..]));
        assert_eq!(types.int_value(&counted), Some(vec![0, 1, 2, 3, 4]));
    }

    #[test]
    fn reductions_split_and_layer_norm_statistics() {
        let (mut b, x) = with_bsh_input();
        let mean = b.node_with("ReduceMean", &[&x], vec![("axes", ints(&[-1]))]);
        let axes = b.initializer_i64("axes", &[1], &[1]);
        let summed = b.node_with("ReduceSum", &[&x, &axes], vec![("keepdims", AttrValue::Int(0))]);
        b.add(Node::new("Split", &[&x], &["a", "b", "c"]).with_attr("axis", AttrValue::Int(-1)));
        let gamma = b.initializer_f32("gamma", &[384], &[1.0; 384]);
        b.add(Node::new("LayerNormalization", &[&x, &gamma], &["y", "mu", "rstd"]));
        let types = infer(b, 18);
        assert_eq!(types.shape(&mean), Some(&[sym("batch"), sym("seq"), fixed(1)][..]));
        assert_eq!(types.shape(&summed), Some(&[sym("batch"), fixed(384)][..]));
        assert_eq!(types.shape("c"), Some(&[sym("batch"), sym("seq"), fixed(128)][..]));
        assert_eq!(types.shape("y"), Some(&[sym("batch"), sym("seq"), fixed(384)][..]));
        assert_eq!(types.shape("rstd"), Some(&[sym("batch"), sym("seq"), fixed(1)][..]));
        assert_eq!(types.elem_type("rstd"), Some(DataType::Float));
    }

    #[test]
    fn contrib_attention_and_skip_layer_norm() {
        let (mut b, x) = with_bsh_input();
        let w = b.initializer_f32("w", &[384, 1152], &vec![0.0; 384 * 1152]);
        let bias = b.initializer_f32("bias", &[1152], &[0.0; 1152]);
        b.add(Node::new("Attention", &[&x, &w, &bias], &["attn"]).with_domain("com.microsoft").with_attr("num_heads", AttrValue::Int(12)));
        let gamma = b.initializer_f32("gamma", &[384], &[1.0; 384]);
        b.add(Node::new("SkipLayerNormalization", &[&x, "attn", &gamma], &["sln", "", "", "sum"]).with_domain("com.microsoft"));
        b.add(
            Node::new("MatMulNBits", &["sln", "packed", "scales"], &["q4"])
                .with_domain("com.microsoft")
                .with_attr("K", AttrValue::Int(384))
                .with_attr("N", AttrValue::Int(1536)),
        );
        b.add(
            Node::new("GroupQueryAttention", &["q4"], &["gqa", "pk", "pv"])
                .with_domain("com.microsoft")
                .with_attr("num_heads", AttrValue::Int(8))
                .with_attr("kv_num_heads", AttrValue::Int(4)),
        );
        let types = infer(b, 17);
        let bsh = [sym("batch"), sym("seq"), fixed(384)];
        assert_eq!(types.shape("attn"), Some(&bsh[..]));
        assert_eq!(types.shape("sln"), Some(&bsh[..]));
        assert_eq!(types.shape("sum"), Some(&bsh[..]));
        assert_eq!(types.shape("q4"), Some(&[sym("batch"), sym("seq"), fixed(1536)][..]));
        // 1536 = (8 + 2*4) * 96
        assert_eq!(types.shape("gqa"), Some(&[sym("batch"), sym("seq"), fixed(768)][..]));
        assert_eq!(types.shape("pk"), Some(&[sym("batch"), fixed(4), Dim::Unknown, fixed(96)][..]));
    }

    #[test]
    fn unknown_ops_fall_back_to_value_info_and_otherwise_stay_unknown() {
        let (mut b, x) = with_bsh_input();
        b.add(Node::new("Mystery", &[&x], &["declared"]).with_domain("custom"));
        b.add(Node::new("Mystery", &[&x], &["undeclared"]).with_domain("custom"));
        let after = b.node("Relu", &["declared"]);
        let mut model: Model = b.into_model(17);
        model.graph.value_info.push(crate::ir::ValueInfo::tensor("declared", DataType::Float16, vec![fixed(7)]));
        let types = infer_types(&model);
        assert_eq!(types.get("declared"), Some(&TensorType::new(DataType::Float16, vec![fixed(7)])));
        assert_eq!(types.get("undeclared"), Some(&TensorType::default()));
        assert_eq!(types.shape(&after), Some(&[fixed(7)][..]));
    }

    #[test]
    fn malformed_nodes_leave_outputs_unknown_without_panicking() {
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", DataType::Float, &[2, 3]);
        let huge = b.initializer_i64("huge", &[2], &[i64::MAX, i64::MAX]);
        let bad_axes = b.initializer_i64("bad", &[1], &[i64::MIN]);
        let zero_step = b.initializer_i64("zs", &[1], &[0]);
        let nodes = [
            b.node("Reshape", &[&x, &huge]),
            b.node("Unsqueeze", &[&x, &bad_axes]),
            b.node("Slice", &[&x, &bad_axes, &huge, &bad_axes, &zero_step]),
            b.node("Slice", &[&huge, &bad_axes, &bad_axes, &zero_step, &zero_step]),
            b.node("Expand", &[&x, &huge]),
            b.node("ConstantOfShape", &[&huge]),
            b.node("Range", &[&bad_axes, &huge, &zero_step]),
            b.node("Mul", &[&huge, &huge]),
            b.node("Gather", &[&huge, &bad_axes]),
            b.node("Concat", &[&x, &huge]),
            b.node("MatMul", &[&bad_axes, &x]),
            b.node_with("Flatten", &[&x], vec![("axis", AttrValue::Int(i64::MIN))]),
            b.node_with("Shape", &[&x], vec![("start", AttrValue::Int(i64::MIN)), ("end", AttrValue::Int(i64::MAX))]),
            b.node_with("Conv", &[&x, &x], vec![("strides", ints(&[0]))]),
            b.node("Gather", &[]),
        ];
        let types = infer(b, 17);
        for name in &nodes {
            assert!(types.get(name).is_some(), "{name} has an entry");
        }
        assert_eq!(types.int_value(&nodes[7]), None, "overflowing product has no value");
    }
}
