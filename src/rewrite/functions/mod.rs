//! Named conditions, computed attributes and computed constants that rules call:
//! what a pattern cannot say (ranks, head counts, packed weights) is a small
//! function registered here by name. Each topic file lists its functions in
//! `FUNCTIONS`; `Registry::standard` gathers them.

mod attention;
mod general;
mod llama;
mod normalization;

use super::matcher::MatchContext;
use super::rule::{Arg, Literal};
use crate::ir::{AttrValue, Dim, Tensor};
use std::collections::BTreeMap;

/// What a function computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// `:if (f ...)`: holds, or says why not.
    Condition,
    /// `:attr (f ...)` in a template.
    Attribute,
    /// `(f ...)` in a template's input position: a new constant tensor.
    Input,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Condition => "condition",
            Role::Attribute => "attribute",
            Role::Input => "input",
        }
    }
}

pub type ConditionFn = fn(&MatchContext, &[Arg]) -> Result<(), String>;
pub type AttributeFn = fn(&MatchContext, &[Arg]) -> Result<AttrValue, String>;
pub type InputFn = fn(&MatchContext, &[Arg]) -> Result<Tensor, String>;

/// A function as a topic file registers it.
#[derive(Clone, Copy)]
pub enum Function {
    Condition(ConditionFn),
    Attribute(AttributeFn),
    Input(InputFn),
}

pub struct Registry {
    conditions: BTreeMap<&'static str, ConditionFn>,
    attributes: BTreeMap<&'static str, AttributeFn>,
    inputs: BTreeMap<&'static str, InputFn>,
}

impl Registry {
    pub fn has(&self, name: &str, role: Role) -> bool {
        match role {
            Role::Condition => self.conditions.contains_key(name),
            Role::Attribute => self.attributes.contains_key(name),
            Role::Input => self.inputs.contains_key(name),
        }
    }

    pub fn names(&self, role: Role) -> Vec<&'static str> {
        match role {
            Role::Condition => self.conditions.keys().copied().collect(),
            Role::Attribute => self.attributes.keys().copied().collect(),
            Role::Input => self.inputs.keys().copied().collect(),
        }
    }

    pub fn condition(&self, name: &str) -> Option<ConditionFn> {
        self.conditions.get(name).copied()
    }

    pub fn attribute(&self, name: &str) -> Option<AttributeFn> {
        self.attributes.get(name).copied()
    }

    pub fn input(&self, name: &str) -> Option<InputFn> {
        self.inputs.get(name).copied()
    }

    /// Every function the rules may call.
    pub fn standard() -> Registry {
        let mut registry = Registry { conditions: BTreeMap::new(), attributes: BTreeMap::new(), inputs: BTreeMap::new() };
        for functions in [general::FUNCTIONS, attention::FUNCTIONS, normalization::FUNCTIONS, llama::FUNCTIONS] {
            for &(name, function) in functions {
                match function {
                    Function::Condition(f) => {
                        registry.conditions.insert(name, f);
                    }
                    Function::Attribute(f) => {
                        registry.attributes.insert(name, f);
                    }
                    Function::Input(f) => {
                        registry.inputs.insert(name, f);
                    }
                }
            }
        }
        registry
    }
}

// Argument helpers shared by the topic files.

/// A tensor argument: a bound `?var`, or the first output of a `@label`led node.
pub(super) fn var<'a>(ctx: &'a MatchContext, args: &[Arg], i: usize) -> Result<&'a str, String> {
    match args.get(i) {
        Some(Arg::Var(v)) => ctx.tensor(v).ok_or_else(|| format!("?{v} is not bound")),
        Some(Arg::Label(l)) => ctx.labelled(l).and_then(|n| n.outputs.first()).map(String::as_str).ok_or_else(|| format!("@{l} is not bound")),
        _ => Err(format!("argument {} must be a ?var or @label", i + 1)),
    }
}

pub(super) fn int_arg(args: &[Arg], i: usize) -> Result<i64, String> {
    match args.get(i) {
        Some(Arg::Literal(Literal::Int(v))) => Ok(*v),
        _ => Err(format!("argument {} must be an integer", i + 1)),
    }
}

/// The constant fill of an additive mask `Where(keep, 0, fill)`.
pub(super) fn mask_fill(ctx: &MatchContext, mask: &crate::ir::Node) -> Result<Vec<f32>, String> {
    let fill = mask.inputs.get(2).and_then(|f| ctx.constant(f)).and_then(|t| t.to_f32().ok());
    fill.map(|f| f.iter().copied().collect()).ok_or_else(|| "the mask's fill is not a constant".to_string())
}

pub(super) fn dims<'a>(ctx: &'a MatchContext, tensor: &str) -> Result<&'a [Dim], String> {
    ctx.types.shape(tensor).ok_or_else(|| format!("the shape of '{tensor}' is unknown"))
}
