//! Matching a rule's pattern at a node, and turning a match into a patch.

use super::functions::Registry;
use super::rule::{is_commutative, AttrTemplate, Call, Literal, NodePattern, Pattern, Rule, Template};
use crate::ir::{AttrValue, Graph, Node, NodeId, Patch, Tensor, TypeMap};
use std::collections::BTreeMap;

/// What a successful match bound.
#[derive(Clone, Debug, Default)]
pub struct Bindings {
    pub tensors: BTreeMap<String, String>,
    pub labels: BTreeMap<String, NodeId>,
    /// Matched nodes, the root first.
    pub nodes: Vec<NodeId>,
}

/// What named functions see.
pub struct MatchContext<'a> {
    pub graph: &'a Graph,
    pub types: &'a TypeMap,
    pub bindings: &'a Bindings,
}

impl MatchContext<'_> {
    pub fn tensor(&self, var: &str) -> Option<&str> {
        self.bindings.tensors.get(var).map(String::as_str)
    }

    pub fn labelled(&self, label: &str) -> Option<&Node> {
        self.graph.node(*self.bindings.labels.get(label)?)
    }

    /// The value of a constant tensor: an initializer or a Constant node's `value`.
    pub fn constant(&self, name: &str) -> Option<&Tensor> {
        constant_tensor(self.graph, name)
    }
}

pub fn constant_tensor<'g>(graph: &'g Graph, name: &str) -> Option<&'g Tensor> {
    if let Some(t) = graph.initializer(name) {
        // an initializer that is also a graph input can be overridden: not a constant
        return (!graph.inputs.iter().any(|i| i.name == name)).then_some(t);
    }
    let (id, _) = graph.producer(name)?;
    let node = graph.node(id)?;
    match (node.is_onnx("Constant"), node.attr("value")) {
        (true, Some(AttrValue::Tensor(t))) => Some(t),
        _ => None,
    }
}

/// Why a rule did not match, and how far it got (matched nodes), for `--trace-rule`.
#[derive(Clone, Debug, Default)]
pub struct Miss {
    pub depth: usize,
    pub reason: String,
}

struct Matcher<'a> {
    graph: &'a Graph,
    best_miss: Miss,
}

/// Attribute values ONNX gives when an attribute is absent, for the ops rules match.
fn default_attr(op_type: &str, name: &str) -> Option<Literal> {
    match (op_type, name) {
        ("Softmax", "axis") | ("LayerNormalization", "axis") => Some(Literal::Int(-1)),
        ("LayerNormalization", "epsilon") => Some(Literal::Float(1e-5)),
        ("Gather", "axis") => Some(Literal::Int(0)),
        _ => None,
    }
}

fn literal_matches(want: &Literal, got: &AttrValue) -> bool {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0);
    match (want, got) {
        (Literal::Int(w), AttrValue::Int(g)) => w == g,
        (Literal::Float(w), AttrValue::Float(g)) => close(*w, *g as f64),
        (Literal::Int(w), AttrValue::Float(g)) => close(*w as f64, *g as f64),
        (Literal::Ints(w), AttrValue::Ints(g)) => w == g,
        (Literal::Floats(w), AttrValue::Floats(g)) => w.len() == g.len() && w.iter().zip(g).all(|(a, b)| close(*a, *b as f64)),
        (Literal::Str(w), AttrValue::String(g)) => w.as_bytes() == g.as_ref(),
        _ => false,
    }
}

impl Matcher<'_> {
    fn miss(&mut self, depth: usize, reason: String) -> Vec<Bindings> {
        if depth >= self.best_miss.depth {
            self.best_miss = Miss { depth, reason };
        }
        Vec::new()
    }

    /// Every way `p` matches `tensor` given `b` (commutative ops may match in
    /// either input order: conditions later pick among the alternatives).
    fn pattern(&mut self, p: &Pattern, tensor: &str, b: &Bindings) -> Vec<Bindings> {
        match p {
            Pattern::Any if tensor.is_empty() => self.miss(b.nodes.len(), "an input is missing".into()),
            Pattern::Any => vec![b.clone()],
            Pattern::Var(v) => match b.tensors.get(v) {
                Some(bound) if bound == tensor => vec![b.clone()],
                Some(bound) => {
                    let reason = format!("?{v} is '{bound}' but here '{tensor}'");
                    self.miss(b.nodes.len(), reason)
                }
                None => {
                    let mut b = b.clone();
                    b.tensors.insert(v.clone(), tensor.to_string());
                    vec![b]
                }
            },
            Pattern::Constant(want) => {
                let values = constant_tensor(self.graph, tensor).and_then(|t| t.to_f32().ok());
                let ok = values.is_some_and(|v| {
                    v.len() > 0 && v.iter().all(|&x| ((x as f64) - want).abs() <= 1e-5 * want.abs().max(1e-30))
                });
                if ok { vec![b.clone()] } else { self.miss(b.nodes.len(), format!("'{tensor}' is not the constant {want}")) }
            }
            Pattern::Node(n) => self.node(n, tensor, b),
        }
    }

    fn node(&mut self, p: &NodePattern, tensor: &str, b: &Bindings) -> Vec<Bindings> {
        let depth = b.nodes.len();
        let Some((id, output)) = self.graph.producer(tensor) else {
            return self.miss(depth, format!("'{tensor}' is not produced by a node (wanted {})", p.op_type));
        };
        let node = &self.graph.dag()[id];
        let domain_ok = if p.domain.is_empty() { node.domain.is_empty() || node.domain == "ai.onnx" } else { node.domain == p.domain };
        if node.op_type != p.op_type || !domain_ok {
            return self.miss(depth, format!("'{tensor}' comes from {}, not {}", node.qualified_op(), p.op_type));
        }
        if output != p.output {
            return self.miss(depth, format!("'{tensor}' is output {output} of {}, not {}", node.op_type, p.output));
        }
        for (name, want) in &p.attrs {
            let ok = match node.attr(name) {
                Some(got) => literal_matches(want, got),
                None => default_attr(&node.op_type, name).as_ref() == Some(want),
            };
            if !ok {
                return self.miss(depth, format!("{} '{}' has {name} = {:?}, not {want}", node.op_type, node.name, node.attr(name)));
            }
        }
        let mut inputs: Vec<&str> = node.inputs.iter().map(String::as_str).collect();
        while inputs.len() > p.inputs.len() && inputs.last() == Some(&"") {
            inputs.pop();
        }
        if inputs.len() != p.inputs.len() {
            return self.miss(depth, format!("{} '{}' has {} inputs, the pattern {}", node.op_type, node.name, inputs.len(), p.inputs.len()));
        }
        let mut start = b.clone();
        if let Some(label) = &p.label {
            if start.labels.get(label).is_some_and(|&l| l != id) {
                return self.miss(depth, format!("@{label} bound to another node"));
            }
            start.labels.insert(label.clone(), id);
        }
        if !start.nodes.contains(&id) {
            start.nodes.push(id);
        }
        let orders: &[[usize; 2]] = if is_commutative(&p.op_type) && inputs.len() == 2 { &[[0, 1], [1, 0]] } else { &[[0, 1]] };
        let mut results = Vec::new();
        for order in orders {
            let mut partial = vec![start.clone()];
            for (i, sub) in p.inputs.iter().enumerate() {
                let at = if inputs.len() == 2 { order[i] } else { i };
                partial = partial.iter().flat_map(|pb| self.pattern(sub, inputs[at], pb)).collect();
                if partial.is_empty() {
                    break;
                }
            }
            results.extend(partial);
        }
        results
    }
}

/// Matches `rule` with its root at `root` (the root's output `rule.pattern.output`).
pub fn match_rule(graph: &Graph, types: &TypeMap, registry: &Registry, rule: &Rule, root: NodeId) -> Result<Bindings, Miss> {
    let node = graph.node(root).ok_or_else(Miss::default)?;
    let Some(tensor) = node.outputs.get(rule.pattern.output).filter(|t| !t.is_empty()) else {
        return Err(Miss { depth: 0, reason: "no such output".into() });
    };
    let mut matcher = Matcher { graph, best_miss: Miss::default() };
    let alternatives = matcher.node(&rule.pattern, tensor, &Bindings::default());
    let mut last_miss = matcher.best_miss;
    for bindings in alternatives {
        match check_match(graph, types, registry, rule, node, bindings) {
            Ok(b) => return Ok(b),
            Err(miss) => last_miss = miss,
        }
    }
    Err(last_miss)
}

/// The checks a structural match must pass: intermediates used only inside the
/// match, the root's other outputs unused, and the rule's conditions.
fn check_match(graph: &Graph, types: &TypeMap, registry: &Registry, rule: &Rule, root: &Node, bindings: Bindings) -> Result<Bindings, Miss> {
    let depth = bindings.nodes.len();
    for &id in &bindings.nodes[1..] {
        let n = &graph.dag()[id];
        for out in n.outputs.iter().filter(|o| !o.is_empty()) {
            if graph.is_graph_output(out) || graph.uses(out).iter().any(|u| !bindings.nodes.contains(&u.node)) {
                return Err(Miss { depth, reason: format!("'{out}' (from {} '{}') is used outside the match", n.op_type, n.name) });
            }
        }
    }
    for (i, out) in root.outputs.iter().enumerate() {
        if i != rule.pattern.output && !out.is_empty() && (!graph.uses(out).is_empty() || graph.is_graph_output(out)) {
            return Err(Miss { depth, reason: format!("the root's output '{out}' is used") });
        }
    }
    let ctx = MatchContext { graph, types, bindings: &bindings };
    for condition in &rule.conditions {
        let check = registry.condition(&condition.function).ok_or_else(|| Miss { depth, reason: format!("no condition {}", condition.function) })?;
        check(&ctx, &condition.args).map_err(|reason| Miss { depth, reason: format!("({}): {reason}", condition.function) })?;
    }
    Ok(bindings)
}

/// Builds the patch that replaces a match by the rule's template for `target`.
pub fn instantiate(graph: &Graph, types: &TypeMap, registry: &Registry, rule: &Rule, template: &Template, b: &Bindings) -> Result<Patch, String> {
    let root = graph.node(b.nodes[0]).ok_or("root vanished")?;
    let root_output = root.outputs[rule.pattern.output].clone();
    let ctx = MatchContext { graph, types, bindings: b };
    let mut builder = PatchBuilder { ctx: &ctx, registry, rule: &rule.name, root_output: &root_output, patch: Patch::new(&rule.name), counter: 0 };
    let Template::Node(root_template) = template else { return Err("a template's root must be a node".into()) };
    let name = if root.name.is_empty() { root_output.clone() } else { root.name.clone() };
    builder.node(root_template, Some(root_output.clone()), format!("{}/{}", rule.name, name))?;
    let mut patch = builder.patch;
    for &id in &b.nodes {
        patch.remove_node(id);
    }
    Ok(patch)
}

struct PatchBuilder<'a> {
    ctx: &'a MatchContext<'a>,
    registry: &'a Registry,
    rule: &'a str,
    root_output: &'a str,
    patch: Patch,
    counter: usize,
}

impl PatchBuilder<'_> {
    /// A name no other patch of this round can take: derived from the root's output.
    fn fresh(&mut self, what: &str) -> String {
        self.counter += 1;
        format!("{}/{}/{what}{}", self.root_output, self.rule, self.counter)
    }

    fn call_input(&mut self, call: &Call) -> Result<String, String> {
        let f = self.registry.input(&call.function).ok_or_else(|| format!("no input function {}", call.function))?;
        let mut tensor = f(self.ctx, &call.args)?;
        tensor.name = self.fresh(&call.function);
        let name = tensor.name.clone();
        self.patch.add_initializer(tensor);
        Ok(name)
    }

    fn node(&mut self, t: &super::rule::NodeTemplate, output: Option<String>, name: String) -> Result<String, String> {
        let mut inputs = Vec::new();
        for input in &t.inputs {
            inputs.push(match input {
                Template::Var(v) => self.ctx.tensor(v).ok_or_else(|| format!("?{v} unbound"))?.to_string(),
                Template::Empty => String::new(),
                Template::Computed(call) => self.call_input(call)?,
                Template::Node(inner) => {
                    let inner_name = self.fresh(&inner.op_type);
                    self.node(inner, None, inner_name)?
                }
            });
        }
        let output = match output {
            Some(o) => o,
            None => self.fresh(&format!("{}_out", t.op_type)),
        };
        let mut node = Node::new(t.op_type.clone(), &[], &[&output]).with_domain(t.domain.clone()).with_name(name);
        node.inputs = inputs;
        for i in 1..t.outputs {
            node.outputs.push(self.fresh(&format!("{}_out{i}", t.op_type)));
        }
        for (attr, value) in &t.attrs {
            let value = match value {
                AttrTemplate::Literal(l) => literal_value(l),
                AttrTemplate::Computed(call) => {
                    let f = self.registry.attribute(&call.function).ok_or_else(|| format!("no attribute function {}", call.function))?;
                    f(self.ctx, &call.args)?
                }
            };
            node = node.with_attr(attr.clone(), value);
        }
        self.patch.add_node(node);
        Ok(output)
    }
}

fn literal_value(l: &Literal) -> AttrValue {
    match l {
        Literal::Int(i) => AttrValue::Int(*i),
        Literal::Float(f) => AttrValue::Float(*f as f32),
        Literal::Ints(v) => AttrValue::Ints(v.clone()),
        Literal::Floats(v) => AttrValue::Floats(v.iter().map(|&x| x as f32).collect()),
        Literal::Str(s) => AttrValue::String(s.clone().into_bytes().into()),
    }
}
