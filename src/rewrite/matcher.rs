//! Matching a rule's pattern at a node, and turning a match into a patch.

use super::functions::Registry;
use super::rule::{is_commutative, AttrTemplate, Call, Literal, NodePattern, Pattern, Rule, Template};
use crate::ir::{AttrValue, Graph, Node, NodeId, Patch, Slot, Tensor, TypeMap, Use};
use std::collections::BTreeMap;

/// What a successful match bound.
#[derive(Clone, Debug, Default)]
pub struct Bindings {
    pub tensors: BTreeMap<String, String>,
    pub labels: BTreeMap<String, NodeId>,
    /// Matched nodes, the root first.
    pub nodes: Vec<NodeId>,
    /// Nodes outside the pattern removed with it (`:absorb`).
    pub absorbed: Vec<NodeId>,
}

impl Bindings {
    /// Every node the match replaces: matched and absorbed.
    pub fn removed_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.iter().chain(&self.absorbed).copied()
    }
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
        ("Gemm", "alpha" | "beta") => Some(Literal::Float(1.0)),
        ("Gemm", "transA" | "transB") => Some(Literal::Int(0)),
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
            Pattern::Var(v) | Pattern::OptionalVar(v) => match b.tensors.get(v) {
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
                let ok = values.is_some_and(|v| !v.is_empty() && v.iter().all(|&x| ((x as f64) - want).abs() <= 1e-5 * want.abs().max(1e-30)));
                if ok {
                    vec![b.clone()]
                } else {
                    self.miss(b.nodes.len(), format!("'{tensor}' is not the constant {want}"))
                }
            }
            Pattern::Node(n) if n.optional => {
                let mut results = self.node(n, tensor, b);
                results.extend(self.skipped(n, tensor, b));
                results
            }
            Pattern::Node(n) => self.node(n, tensor, b),
        }
    }

    /// An optional node that is not there: `tensor` stands for its first input,
    /// and the vars of its other inputs are absent.
    fn skipped(&mut self, p: &NodePattern, tensor: &str, b: &Bindings) -> Vec<Bindings> {
        let mut absent = b.clone();
        for input in &p.inputs[1..] {
            if let Pattern::Var(v) | Pattern::OptionalVar(v) = input {
                match absent.tensors.get(v) {
                    Some(bound) if !bound.is_empty() => {
                        let reason = format!("?{v} is '{bound}' but {}? is absent", p.op_type);
                        return self.miss(b.nodes.len(), reason);
                    }
                    _ => {
                        absent.tensors.insert(v.clone(), String::new());
                    }
                }
            }
        }
        match p.inputs.first() {
            Some(first) => self.pattern(first, tensor, &absent),
            None => Vec::new(),
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
        if inputs.len() < p.inputs.len() && p.inputs[inputs.len()..].iter().all(|i| matches!(i, Pattern::OptionalVar(_))) {
            inputs.resize(p.inputs.len(), "");
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
/// match (or by what the rule absorbs), the root's other outputs unused, and the
/// rule's conditions.
fn check_match(graph: &Graph, types: &TypeMap, registry: &Registry, rule: &Rule, root: &Node, mut bindings: Bindings) -> Result<Bindings, Miss> {
    let depth = bindings.nodes.len();
    let mut absorbing = Vec::new();
    // tensors the template writes again (`:outputN @label`) may have readers anywhere
    let kept: Vec<&str> = rule.kept_labels().into_iter().filter_map(|l| kept_tensor(graph, rule, &bindings, l)).collect();
    for &id in &bindings.nodes[1..] {
        let n = &graph.dag()[id];
        for out in n.outputs.iter().filter(|o| !o.is_empty() && !kept.contains(&o.as_str())) {
            let outside: Vec<&Use> = graph.uses(out).iter().filter(|u| !bindings.nodes.contains(&u.node)).collect();
            let absorbed = |u: &&Use| u.slot != Slot::Captured && rule.absorb.iter().any(|op| graph.dag()[u.node].is_onnx(op));
            if graph.is_graph_output(out) || !outside.iter().all(absorbed) {
                return Err(Miss { depth, reason: format!("'{out}' (from {} '{}') is used outside the match", n.op_type, n.name) });
            }
            absorbing.extend(outside.iter().map(|u| u.node));
        }
    }
    if !absorbing.is_empty() {
        bindings.absorbed = side_computation(graph, rule, &bindings, absorbing).map_err(|reason| Miss { depth, reason })?;
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

/// The tensor the pattern node labelled `label` matched.
fn kept_tensor<'g>(graph: &'g Graph, rule: &Rule, b: &Bindings, label: &str) -> Option<&'g str> {
    let node = graph.node(*b.labels.get(label)?)?;
    node.outputs.get(rule.pattern.labelled_output(label)?).map(String::as_str)
}

/// What the `:absorb`ed readers of intermediates compute, up to the match: the
/// readers and every node downstream of them outside the match. All of it dies
/// with the match, so none of it may reach a graph output or a tensor the
/// template reads.
fn side_computation(graph: &Graph, rule: &Rule, b: &Bindings, readers: Vec<NodeId>) -> Result<Vec<NodeId>, String> {
    let mut side: Vec<NodeId> = Vec::new();
    let mut stack = readers;
    while let Some(id) = stack.pop() {
        if b.nodes.contains(&id) || side.contains(&id) {
            continue;
        }
        side.push(id);
        let node = &graph.dag()[id];
        for out in node.outputs.iter().filter(|o| !o.is_empty()) {
            if graph.is_graph_output(out) {
                return Err(format!("'{out}' (from {} '{}', which reads a matched tensor) is a graph output", node.op_type, node.name));
            }
            stack.extend(graph.uses(out).iter().map(|u| u.node));
        }
    }
    let mut read = Vec::new();
    for emission in &rule.emissions {
        super::rule::template_vars(&emission.template, &mut read);
    }
    for var in read {
        let from_side = b.tensors.get(&var).and_then(|t| graph.producer(t)).is_some_and(|(id, _)| side.contains(&id));
        if from_side {
            return Err(format!("?{var} is computed from a matched tensor"));
        }
    }
    Ok(side)
}

/// Builds the patch that replaces a match by the rule's template for `target`.
pub fn instantiate(graph: &Graph, types: &TypeMap, registry: &Registry, rule: &Rule, template: &Template, b: &Bindings) -> Result<Patch, String> {
    let root = graph.node(b.nodes[0]).ok_or("root vanished")?;
    let root_output = root.outputs[rule.pattern.output].clone();
    let ctx = MatchContext { graph, types, bindings: b };
    let mut kept = BTreeMap::new();
    for label in rule.kept_labels() {
        let tensor = kept_tensor(graph, rule, b, label).ok_or_else(|| format!("@{label} is not bound"))?;
        kept.insert(label.to_string(), tensor.to_string());
    }
    let mut builder = PatchBuilder { ctx: &ctx, registry, rule: &rule.name, root_output: &root_output, kept, patch: Patch::new(&rule.name), counter: 0 };
    let Template::Node(root_template) = template else { return Err("a template's root must be a node".into()) };
    let name = if root.name.is_empty() { root_output.clone() } else { root.name.clone() };
    builder.node(root_template, Some(root_output.clone()), format!("{}/{}", rule.name, name))?;
    let mut patch = builder.patch;
    for id in b.removed_nodes() {
        patch.remove_node(id);
    }
    Ok(patch)
}

struct PatchBuilder<'a> {
    ctx: &'a MatchContext<'a>,
    registry: &'a Registry,
    rule: &'a str,
    root_output: &'a str,
    /// label -> the matched tensor a `:outputN @label` writes again.
    kept: BTreeMap<String, String>,
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
        // absent optional inputs at the end are left out, not written as ""
        while inputs.last().is_some_and(String::is_empty) {
            inputs.pop();
        }
        let mut node = Node::new(t.op_type.clone(), &[], &[&output]).with_domain(t.domain.clone()).with_name(name);
        node.inputs = inputs;
        let count = t.kept.iter().map(|(n, _)| n + 1).chain([t.outputs]).max().unwrap_or(1);
        for i in 1..count {
            let output = match t.kept.iter().find(|(n, _)| *n == i) {
                Some((_, label)) => self.kept.get(label).cloned().ok_or_else(|| format!("@{label} is not bound"))?,
                None if i < t.outputs => self.fresh(&format!("{}_out{i}", t.op_type)),
                None => String::new(),
            };
            node.outputs.push(output);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{infer_types, DataType, GraphBuilder, Model};
    use crate::rewrite::rule::parse_rules;

    fn rule(text: &str) -> Rule {
        parse_rules("t.rules", &format!("# test\n{text}"), &Registry::standard()).unwrap_or_else(|e| panic!("{e}")).remove(0)
    }

    /// Matches `rule` at the node producing `tensor`.
    fn match_at(model: &Model, rule: &Rule, tensor: &str) -> Result<Bindings, Miss> {
        let (root, _) = model.graph.producer(tensor).expect("a node produces it");
        match_rule(&model.graph, &infer_types(model), &Registry::standard(), rule, root)
    }

    /// Relu(Gemm(x, w[, c])).
    fn gemm(bias: bool) -> (Model, String) {
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", DataType::Float, &[2, 3]);
        let w = b.initializer_f32("w", &[3, 4], &[0.5; 12]);
        let c = b.initializer_f32("c", &[4], &[0.1; 4]);
        let inputs: Vec<&str> = if bias { vec![&x, &w, &c] } else { vec![&x, &w] };
        let g = b.node("Gemm", &inputs);
        let y = b.node("Relu", &[&g]);
        b.output(&y, DataType::Float, &[2, 4]);
        (b.into_model(17), y)
    }

    #[test]
    fn an_optional_input_binds_the_empty_name_when_absent() {
        let r = rule("(rule r (Relu (Gemm :transB 0 :alpha 1.0 ?x ?w ?c?)) :ort (Relu ?x))");
        let (with_bias, y) = gemm(true);
        assert_eq!(match_at(&with_bias, &r, &y).unwrap().tensors["c"], "c");
        let (without, y) = gemm(false);
        assert_eq!(match_at(&without, &r, &y).unwrap().tensors["c"], "");
        // a required input stays required
        let r = rule("(rule r (Relu (Gemm ?x ?w ?c)) :ort (Relu ?x))");
        assert!(match_at(&without, &r, &y).is_err());
    }

    /// Softmax(Relu(s) [+ mask]).
    fn softmax(masked: bool) -> (Model, String) {
        let mut b = GraphBuilder::new("g");
        let s = b.input("s", DataType::Float, &[2, 4]);
        let s = b.node("Relu", &[&s]);
        let s = if masked {
            let mask = b.input("mask", DataType::Float, &[2, 4]);
            b.node("Add", &[&mask, &s])
        } else {
            s
        };
        let y = b.node("Softmax", &[&s]);
        b.output(&y, DataType::Float, &[2, 4]);
        (b.into_model(17), y)
    }

    #[test]
    fn an_optional_node_may_be_missing() {
        let r = rule("(rule r (Softmax (Add? (Relu ?s) ?mask)) :ort (Softmax ?s))");
        let (masked, y) = softmax(true);
        let b = match_at(&masked, &r, &y).unwrap();
        assert_eq!((b.tensors["s"].as_str(), b.tensors["mask"].as_str()), ("s", "mask"));
        assert_eq!(b.nodes.len(), 3);
        let (plain, y) = softmax(false);
        let b = match_at(&plain, &r, &y).unwrap();
        assert_eq!((b.tensors["s"].as_str(), b.tensors["mask"].as_str()), ("s", ""));
        assert_eq!(b.nodes.len(), 2);
    }

    #[test]
    fn optional_forms_are_checked_when_parsed() {
        let registry = Registry::standard();
        let parse = |text: &str| parse_rules("t.rules", &format!("# c\n{text}"), &registry).unwrap_err().to_string();
        assert!(parse("(rule r (Relu? ?x) :ort (Relu ?x))").contains("root cannot be optional"));
        assert!(parse("(rule r (Relu (Add? ?x (Neg ?y))) :ort (Relu ?x))").contains("must be ?vars or _"));
        assert!(parse("(rule r (Relu ?x) :ort (Relu? ?x))").contains("Op? is for patterns"));
        assert!(parse("(rule r (Relu ?x) :absorb shape :ort (Relu ?x))").contains("not an op name"));
    }

    /// Reshape(Relu(x), Concat(Shape(Relu(x)), [1])): the Reshape target read off
    /// the intermediate, as exporters write it; `leak` also makes the Shape a
    /// graph output.
    fn reshape_by_own_shape(leak: bool) -> (Model, String) {
        let mut b = GraphBuilder::new("g");
        let x = b.input("x", DataType::Float, &[2, 3]);
        let one = b.initializer_i64("one", &[1], &[1]);
        let r = b.node("Relu", &[&x]);
        let s = b.node("Shape", &[&r]);
        let target = b.node_with("Concat", &[&s, &one], vec![("axis", AttrValue::Int(0))]);
        let y = b.node("Reshape", &[&r, &target]);
        b.output(&y, DataType::Float, &[2, 3, 1]);
        if leak {
            b.output(&s, DataType::Int64, &[2]);
        }
        (b.into_model(17), y)
    }

    #[test]
    fn absorbed_shape_reads_go_with_the_match() {
        let (model, y) = reshape_by_own_shape(false);
        let plain = rule("(rule r (Reshape (Relu ?x) _) :ort (Relu ?x))");
        let miss = match_at(&model, &plain, &y).unwrap_err();
        assert!(miss.reason.contains("is used outside the match"), "{}", miss.reason);
        let absorbing = rule("(rule r (Reshape (Relu ?x) _) :absorb Shape :ort (Relu ?x))");
        let b = match_at(&model, &absorbing, &y).unwrap();
        let absorbed: Vec<&str> = b.absorbed.iter().map(|&id| model.graph.node(id).unwrap().op_type.as_str()).collect();
        assert_eq!(absorbed.len(), 2, "{absorbed:?}");
        assert!(absorbed.contains(&"Shape") && absorbed.contains(&"Concat"));
        let patch = instantiate(&model.graph, &infer_types(&model), &Registry::standard(), &absorbing, &absorbing.emissions[0].template, &b).unwrap();
        let mut rewritten = model.clone();
        rewritten.graph.apply(patch, true).unwrap();
        assert_eq!(rewritten.graph.nodes().map(|n| n.op_type.as_str()).collect::<Vec<_>>(), ["Relu"]);
        // what the Shape computes must not be needed elsewhere, nor by the template
        let (leaky, y) = reshape_by_own_shape(true);
        assert!(match_at(&leaky, &absorbing, &y).unwrap_err().reason.contains("graph output"));
        let reads_target = rule("(rule r (Reshape (Relu ?x) ?target) :absorb Shape :ort (Reshape ?x ?target))");
        assert!(match_at(&model, &reads_target, &y).unwrap_err().reason.contains("?target is computed from a matched tensor"));
    }
}
