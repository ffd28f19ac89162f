//! Exposing intermediate tensors as extra graph outputs.

use super::CalibrateError;
use crate::ir::{infer_types, Model, ValueInfo, ValueType};

/// A copy of `model` whose graph outputs also hold every tensor of `taps` (after
/// the original outputs, in the order given; a tap that already is an output is
/// not added twice). Types come from [`infer_types`]; `verify::run` ignores
/// declared output shapes, so symbolic dims are harmless.
pub fn with_taps(model: &Model, taps: &[&str]) -> Result<Model, CalibrateError> {
    let types = infer_types(model);
    let mut tapped = model.clone();
    let graph = &mut tapped.graph;
    for &tap in taps {
        let fail = |why: &str| CalibrateError::Tap { tensor: tap.to_string(), why: why.into() };
        if graph.initializer(tap).is_some() {
            return Err(fail("it is an initializer (a weight), not an activation"));
        }
        let is_input = graph.inputs.iter().any(|i| i.name == tap);
        if graph.producer(tap).is_none() && !is_input {
            return Err(fail("no node produces it and it is not a graph input"));
        }
        if graph.is_graph_output(tap) {
            continue;
        }
        let ty = types.get(tap).ok_or_else(|| fail("its type could not be inferred"))?;
        graph.outputs.push(ValueInfo { name: tap.to_string(), ty: Some(ValueType::Tensor(ty.clone())), extras: Default::default() });
    }
    Ok(tapped)
}
