//! Rules: a pattern over the graph, conditions, and what to emit per target.
//!
//! ```text
//! # x * 0.5 * (1 + erf(x / sqrt 2)) -> Gelu(x)
//! (rule gelu-erf
//!   (Mul ?x (Mul 0.5 (Add 1.0 (Erf (Div ?x 1.4142135)))))
//!   :ort (com.microsoft.Gelu ?x)
//!   :portable@20 (Gelu ?x))
//! ```
//! Pattern forms: `?x` binds a tensor (a second `?x` must be the same tensor);
//! `_` matches any tensor; a number matches a constant whose every element
//! equals it (relative tolerance 1e-5); `(Op :attr value ... inputs ...)`
//! matches the node producing the tensor (`domain.Op` for other domains,
//! `Op#1` for its second output, `Op@label` to name the node for functions).
//! Add, Mul, Max, Min, And, Or, Equal and Sum match in either input order.
//! `:if (condition args...)` calls a named Rust condition. Each `:target
//! template` says what to emit for that target (`@N`: only at opset >= N);
//! a rule without a template for a target does not run for it; `:all` serves
//! every target. In templates,
//! `(function args...)` in input position is a computed constant, and
//! `:attr (function args...)` a computed attribute.
//!
//! What may be absent (one rule for the forms exporters choose between):
//! - `?b?` as an input: the node may lack that optional input (Gemm without C,
//!   opset-18 Split without sizes); ?b then binds the empty name, which a
//!   template emits as an omitted optional input and conditions see as absent.
//! - `(Op? first ?a ...)`: the node may be missing altogether; the tensor is
//!   then matched against `first`, and the vars of the other inputs bind the
//!   empty name (`(Add? scores ?mask)`: attention with or without a mask).
//!   The other inputs of an optional node are ?vars or `_`.
//!
//! `:outputN @label` in a template node (N >= 1): the emitted node's output N
//! writes the tensor the pattern node `@label` matched, so readers outside the
//! match keep reading it; that tensor may then be used outside the match
//! (SkipSimplifiedLayerNormalization's output 3 is the residual sum the next
//! block reads). Outputs between 0 and N that neither `:outputs` nor
//! `:outputN` name are left out (""). Every template of the rule must write
//! the same labels, or a target would lose the tensor.
//!
//! `:absorb Shape` lets a node of that type outside the pattern read a matched
//! intermediate, provided everything it computes feeds only matched nodes: it
//! is removed with the match instead of blocking it (exporters compute a
//! Reshape's target from the Shape of the tensor they reshape, GPT-2's
//! `Shape(q) -> Gather -> Concat -> Reshape(q)`). Template vars must not come
//! from such nodes.

use super::functions::{Registry, Role};
use super::sexpr::SExpr;
use std::fmt;

/// A literal attribute value or constant.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Int(i64),
    Float(f64),
    Ints(Vec<i64>),
    Floats(Vec<f64>),
    Str(String),
}

/// An argument of a named function: a bound tensor, a labelled node, or a literal.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Var(String),
    Label(String),
    Literal(Literal),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub function: String,
    pub args: Vec<Arg>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Pattern {
    Var(String),
    /// `?x?`: a tensor, or an absent optional input (binds the empty name).
    OptionalVar(String),
    Any,
    Constant(f64),
    Node(NodePattern),
}

#[derive(Clone, Debug, PartialEq)]
pub struct NodePattern {
    pub domain: String,
    pub op_type: String,
    pub output: usize,
    pub label: Option<String>,
    /// `Op?`: the node may be missing (see the module documentation).
    pub optional: bool,
    pub attrs: Vec<(String, Literal)>,
    pub inputs: Vec<Pattern>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AttrTemplate {
    Literal(Literal),
    Computed(Call),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Template {
    Var(String),
    /// An omitted optional input (`_`).
    Empty,
    Computed(Call),
    Node(NodeTemplate),
}

#[derive(Clone, Debug, PartialEq)]
pub struct NodeTemplate {
    pub domain: String,
    pub op_type: String,
    /// Outputs the emitted node declares (`:outputs N`, default 1); only the
    /// first carries the matched value, the others are unused but required by
    /// the op's schema (ORT's EmbedLayerNormalization infers output 1 always).
    pub outputs: usize,
    /// `:outputN @label`: (N, label) (see the module documentation).
    pub kept: Vec<(usize, String)>,
    pub attrs: Vec<(String, AttrTemplate)>,
    pub inputs: Vec<Template>,
}

/// Where a rule may emit, and what.
#[derive(Clone, Debug, PartialEq)]
pub struct Emission {
    pub target: String,
    pub min_opset: Option<i64>,
    pub template: Template,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: String,
    /// `file:line` of the rule.
    pub location: String,
    /// The comment lines above the rule (the math it relies on).
    pub doc: Vec<String>,
    pub pattern: NodePattern,
    pub conditions: Vec<Call>,
    /// Op types whose reads of matched intermediates are removed with the match (`:absorb`).
    pub absorb: Vec<String>,
    pub emissions: Vec<Emission>,
}

impl Rule {
    pub fn emission(&self, target: &str, opset: i64) -> Option<&Emission> {
        self.emissions.iter().find(|e| e.target == target && e.min_opset.is_none_or(|m| opset >= m))
    }

    /// The labels whose matched tensor the templates write again (`:outputN
    /// @label`): the same for every template (the parser checks).
    pub fn kept_labels(&self) -> Vec<&str> {
        self.emissions.first().map(|e| kept_labels(&e.template)).unwrap_or_default()
    }
}

impl NodePattern {
    /// Which output of its node the pattern labelled `label` matches.
    pub fn labelled_output(&self, label: &str) -> Option<usize> {
        if self.label.as_deref() == Some(label) {
            return Some(self.output);
        }
        self.inputs.iter().find_map(|i| match i {
            Pattern::Node(n) => n.labelled_output(label),
            _ => None,
        })
    }
}

/// `output3` -> 3: the template key of `:outputN @label`.
fn kept_output_index(key: &str) -> Option<usize> {
    key.strip_prefix("output").filter(|n| !n.is_empty()).and_then(|n| n.parse().ok())
}

/// The labels a template's `:outputN @label`s write, sorted.
fn kept_labels(t: &Template) -> Vec<&str> {
    let mut labels = Vec::new();
    let mut stack = vec![t];
    while let Some(t) = stack.pop() {
        if let Template::Node(n) = t {
            labels.extend(n.kept.iter().map(|(_, l)| l.as_str()));
            stack.extend(&n.inputs);
        }
    }
    labels.sort_unstable();
    labels
}

/// A rule file that does not parse, at `file:line`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct RuleError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

pub const TARGETS: [&str; 3] = ["ort", "portable", "tensorrt"];

/// Ops whose two inputs may be swapped.
pub fn is_commutative(op_type: &str) -> bool {
    matches!(op_type, "Add" | "Mul" | "Max" | "Min" | "And" | "Or" | "Equal" | "Sum")
}

/// The head of a node pattern or template: `domain.Op#output@label?`.
struct OpHead {
    domain: String,
    op_type: String,
    output: usize,
    label: Option<String>,
    optional: bool,
}

/// A node form's `:key value` pairs and its positional items.
type AttrsAndInputs<'e> = (Vec<(String, &'e SExpr)>, Vec<&'e SExpr>);

struct RuleParser<'a> {
    file: &'a str,
    registry: &'a Registry,
}

impl RuleParser<'_> {
    fn error(&self, at: &SExpr, message: impl Into<String>) -> RuleError {
        RuleError { file: self.file.to_string(), line: at.line(), message: message.into() }
    }

    fn rule(&self, expr: &SExpr, doc: Vec<String>) -> Result<Rule, RuleError> {
        let SExpr::List { items, .. } = expr else { return Err(self.error(expr, "expected (rule NAME PATTERN ...)")) };
        if items.first().and_then(SExpr::atom) != Some("rule") {
            return Err(self.error(expr, "expected (rule NAME PATTERN ...)"));
        }
        let name = items.get(1).and_then(SExpr::atom).ok_or_else(|| self.error(expr, "a rule needs a name"))?;
        let pattern_expr = items.get(2).ok_or_else(|| self.error(expr, format!("rule {name} has no pattern")))?;
        let Pattern::Node(pattern) = self.pattern(pattern_expr)? else {
            return Err(self.error(pattern_expr, "a rule's pattern must be a node pattern (Op ...)"));
        };
        if pattern.optional {
            return Err(self.error(pattern_expr, "a rule's root cannot be optional"));
        }
        let mut conditions = Vec::new();
        let mut absorb = Vec::new();
        let mut emissions = Vec::new();
        let mut rest = items[3..].iter();
        while let Some(key) = rest.next() {
            let key_text = key.atom().filter(|k| k.starts_with(':')).ok_or_else(|| self.error(key, "expected :if, :absorb or :TARGET"))?;
            let value = rest.next().ok_or_else(|| self.error(key, format!("{key_text} needs a value")))?;
            if key_text == ":if" {
                conditions.push(self.call(value, Role::Condition)?);
                continue;
            }
            if key_text == ":absorb" {
                match self.op_head(value)? {
                    OpHead { domain, op_type, output: 0, label: None, optional: false } if domain.is_empty() => absorb.push(op_type),
                    _ => return Err(self.error(value, ":absorb takes a standard op name (Shape)")),
                }
                continue;
            }
            let (target, min_opset) = match key_text[1..].split_once('@') {
                Some((t, v)) => (t, Some(v.parse::<i64>().map_err(|_| self.error(key, format!("bad opset in {key_text}")))?)),
                None => (&key_text[1..], None),
            };
            let targets: Vec<&str> = if target == "all" { TARGETS.to_vec() } else { vec![target] };
            if target != "all" && !TARGETS.contains(&target) {
                return Err(self.error(key, format!("unknown target '{target}' (known: {})", TARGETS.join(", "))));
            }
            let template = self.template(value)?;
            self.check_template_vars(&template, &pattern, value)?;
            if let Some(label) = kept_labels(&template).into_iter().find(|l| pattern.labelled_output(l).is_none()) {
                return Err(self.error(value, format!("@{label} is written by the template but the pattern never labels it")));
            }
            if emissions.first().is_some_and(|e: &Emission| kept_labels(&e.template) != kept_labels(&template)) {
                return Err(self.error(value, "every template of a rule must write the same @labels with :outputN"));
            }
            for target in targets {
                emissions.push(Emission { target: target.to_string(), min_opset, template: template.clone() });
            }
        }
        if emissions.is_empty() {
            return Err(self.error(expr, format!("rule {name} emits nothing: give it :ort, :portable, :tensorrt or :all")));
        }
        Ok(Rule { name: name.to_string(), location: format!("{}:{}", self.file, expr.line()), doc, pattern, conditions, absorb, emissions })
    }

    fn literal(&self, e: &SExpr) -> Option<Literal> {
        match e {
            SExpr::Atom { text, .. } => {
                if let Ok(i) = text.parse::<i64>() {
                    Some(Literal::Int(i))
                } else {
                    text.parse::<f64>().ok().map(Literal::Float)
                }
            }
            SExpr::Str { text, .. } => Some(Literal::Str(text.clone())),
            SExpr::Vector { items, .. } => {
                let ints: Option<Vec<i64>> = items.iter().map(|i| i.atom()?.parse().ok()).collect();
                if let Some(ints) = ints {
                    return Some(Literal::Ints(ints));
                }
                let floats: Option<Vec<f64>> = items.iter().map(|i| i.atom()?.parse().ok()).collect();
                floats.map(Literal::Floats)
            }
            SExpr::List { .. } => None,
        }
    }

    /// `domain.Op`, `Op#1`, `Op@label` and `Op?` heads.
    fn op_head(&self, e: &SExpr) -> Result<OpHead, RuleError> {
        let text = e.atom().ok_or_else(|| self.error(e, "expected an op name"))?;
        let (text, label) = match text.split_once('@') {
            Some((t, l)) => (t, Some(l.to_string())),
            None => (text, None),
        };
        let (text, output) = match text.split_once('#') {
            Some((t, i)) => (t, i.parse::<usize>().map_err(|_| self.error(e, format!("bad output index in {text}")))?),
            None => (text, 0),
        };
        let (text, optional) = match text.strip_suffix('?') {
            Some(t) => (t, true),
            None => (text, false),
        };
        let (domain, op) = match text.rsplit_once('.') {
            Some((d, o)) => (d.to_string(), o.to_string()),
            None => (String::new(), text.to_string()),
        };
        if op.is_empty() || !op.starts_with(|c: char| c.is_ascii_uppercase()) {
            return Err(self.error(e, format!("'{text}' is not an op name (ops start with a capital)")));
        }
        Ok(OpHead { domain, op_type: op, output, label, optional })
    }

    fn attrs_and_inputs<'e>(&self, items: &'e [SExpr]) -> Result<AttrsAndInputs<'e>, RuleError> {
        let mut attrs = Vec::new();
        let mut inputs = Vec::new();
        let mut it = items.iter();
        while let Some(item) = it.next() {
            match item.atom() {
                Some(k) if k.starts_with(':') => {
                    let v = it.next().ok_or_else(|| self.error(item, format!("{k} needs a value")))?;
                    attrs.push((k[1..].to_string(), v));
                }
                _ => inputs.push(item),
            }
        }
        Ok((attrs, inputs))
    }

    fn pattern(&self, e: &SExpr) -> Result<Pattern, RuleError> {
        match e {
            SExpr::Atom { text, .. } if text == "_" => Ok(Pattern::Any),
            SExpr::Atom { text, .. } if text.starts_with('?') && text.len() > 2 && text.ends_with('?') => {
                Ok(Pattern::OptionalVar(text[1..text.len() - 1].to_string()))
            }
            SExpr::Atom { text, .. } if text.starts_with('?') && text.len() > 1 => Ok(Pattern::Var(text[1..].to_string())),
            SExpr::Atom { text, .. } => text
                .parse::<f64>()
                .map(Pattern::Constant)
                .map_err(|_| self.error(e, format!("'{text}' is not a pattern (write ?var, _, a number or (Op ...))"))),
            SExpr::List { items, .. } if !items.is_empty() => {
                let OpHead { domain, op_type, output, label, optional } = self.op_head(&items[0])?;
                let (attrs, inputs) = self.attrs_and_inputs(&items[1..])?;
                let attrs = attrs
                    .into_iter()
                    .map(|(k, v)| self.literal(v).map(|l| (k, l)).ok_or_else(|| self.error(v, "attribute patterns are literals")))
                    .collect::<Result<_, _>>()?;
                let inputs: Vec<Pattern> = inputs.into_iter().map(|i| self.pattern(i)).collect::<Result<_, _>>()?;
                if optional {
                    if inputs.is_empty() {
                        return Err(self.error(e, format!("optional {op_type}? needs a first input to stand for it")));
                    }
                    if !inputs[1..].iter().all(|i| matches!(i, Pattern::Var(_) | Pattern::OptionalVar(_) | Pattern::Any)) {
                        return Err(self.error(e, format!("the inputs of optional {op_type}? after its first must be ?vars or _")));
                    }
                }
                Ok(Pattern::Node(NodePattern { domain, op_type, output, label, optional, attrs, inputs }))
            }
            _ => Err(self.error(e, "not a pattern")),
        }
    }

    fn arg(&self, e: &SExpr) -> Result<Arg, RuleError> {
        match e.atom() {
            Some(t) if t.starts_with('?') => Ok(Arg::Var(t[1..].to_string())),
            Some(t) if t.starts_with('@') => Ok(Arg::Label(t[1..].to_string())),
            _ => self.literal(e).map(Arg::Literal).ok_or_else(|| self.error(e, "arguments are ?vars, @labels or literals")),
        }
    }

    fn call(&self, e: &SExpr, role: Role) -> Result<Call, RuleError> {
        let SExpr::List { items, .. } = e else { return Err(self.error(e, "expected (function args...)")) };
        let function = items.first().and_then(SExpr::atom).ok_or_else(|| self.error(e, "expected (function args...)"))?;
        if !self.registry.has(function, role) {
            return Err(self.error(e, format!("unknown {} function '{function}' (known: {})", role.name(), self.registry.names(role).join(", "))));
        }
        let args = items[1..].iter().map(|a| self.arg(a)).collect::<Result<_, _>>()?;
        Ok(Call { function: function.to_string(), args })
    }

    fn template(&self, e: &SExpr) -> Result<Template, RuleError> {
        match e {
            SExpr::Atom { text, .. } if text == "_" => Ok(Template::Empty),
            SExpr::Atom { text, .. } if text.starts_with('?') => Ok(Template::Var(text[1..].to_string())),
            SExpr::List { items, .. } if !items.is_empty() => {
                let head = items[0].atom().unwrap_or_default();
                if head.starts_with(|c: char| c.is_ascii_lowercase()) && !head.contains('.') {
                    return Ok(Template::Computed(self.call(e, Role::Input)?));
                }
                let OpHead { domain, op_type, optional, .. } = self.op_head(&items[0])?;
                if optional {
                    return Err(self.error(&items[0], "a template emits its nodes: Op? is for patterns"));
                }
                let (mut attrs, inputs) = self.attrs_and_inputs(&items[1..])?;
                let mut outputs = 1;
                if let Some(at) = attrs.iter().position(|(k, _)| k == "outputs") {
                    let (_, v) = attrs.remove(at);
                    outputs = match self.literal(v) {
                        Some(Literal::Int(n)) if n >= 1 => n as usize,
                        _ => return Err(self.error(v, ":outputs takes a count")),
                    };
                }
                let mut kept = Vec::new();
                while let Some(at) = attrs.iter().position(|(k, _)| kept_output_index(k).is_some()) {
                    let (k, v) = attrs.remove(at);
                    match (kept_output_index(&k), v.atom().and_then(|a| a.strip_prefix('@'))) {
                        (Some(n), Some(label)) if n >= 1 && !label.is_empty() => kept.push((n, label.to_string())),
                        _ => return Err(self.error(v, format!(":{k} takes a @label and an output index of 1 or more"))),
                    }
                }
                let attrs = attrs
                    .into_iter()
                    .map(|(k, v)| match self.literal(v) {
                        Some(l) => Ok((k, AttrTemplate::Literal(l))),
                        None => Ok((k, AttrTemplate::Computed(self.call(v, Role::Attribute)?))),
                    })
                    .collect::<Result<_, RuleError>>()?;
                let inputs = inputs.into_iter().map(|i| self.template(i)).collect::<Result<_, _>>()?;
                Ok(Template::Node(NodeTemplate { domain, op_type, outputs, kept, attrs, inputs }))
            }
            _ => Err(self.error(e, "not a template (write ?var, _, (Op ...) or (function ...))")),
        }
    }

    fn check_template_vars(&self, t: &Template, pattern: &NodePattern, at: &SExpr) -> Result<(), RuleError> {
        let mut bound = Vec::new();
        collect_vars(&Pattern::Node(pattern.clone()), &mut bound);
        let mut used = Vec::new();
        template_vars(t, &mut used);
        match used.iter().find(|v| !bound.contains(v)) {
            Some(v) => Err(self.error(at, format!("?{v} is used in the template but the pattern never binds it"))),
            None => Ok(()),
        }
    }
}

fn collect_vars(p: &Pattern, out: &mut Vec<String>) {
    match p {
        Pattern::Var(v) | Pattern::OptionalVar(v) => out.push(v.clone()),
        Pattern::Node(n) => n.inputs.iter().for_each(|i| collect_vars(i, out)),
        _ => {}
    }
}

/// The vars a template reads (in inputs and computed attributes).
pub(super) fn template_vars(t: &Template, out: &mut Vec<String>) {
    let args = |c: &Call, out: &mut Vec<String>| {
        for a in &c.args {
            if let Arg::Var(v) = a {
                out.push(v.clone());
            }
        }
    };
    match t {
        Template::Var(v) => out.push(v.clone()),
        Template::Computed(c) => args(c, out),
        Template::Node(n) => {
            n.inputs.iter().for_each(|i| template_vars(i, out));
            for (_, a) in &n.attrs {
                if let AttrTemplate::Computed(c) = a {
                    args(c, out);
                }
            }
        }
        Template::Empty => {}
    }
}

/// Parses one rule file.
pub fn parse_rules(file: &str, text: &str, registry: &Registry) -> Result<Vec<Rule>, RuleError> {
    let exprs = super::sexpr::parse(text).map_err(|e| RuleError { file: file.into(), line: e.line, message: e.message })?;
    let parser = RuleParser { file, registry };
    let rules: Vec<Rule> = exprs.into_iter().map(|(e, doc)| parser.rule(&e, doc)).collect::<Result<_, _>>()?;
    for (i, r) in rules.iter().enumerate() {
        if rules[..i].iter().any(|o| o.name == r.name) {
            return Err(RuleError { file: file.into(), line: 0, message: format!("rule name {} used twice", r.name) });
        }
        if r.doc.is_empty() {
            let line = r.location.rsplit(':').next().and_then(|l| l.parse().ok()).unwrap_or(0);
            return Err(RuleError { file: file.into(), line, message: format!("rule {} needs a comment with its math above it", r.name) });
        }
    }
    Ok(rules)
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Int(i) => write!(f, "{i}"),
            Literal::Float(x) => write!(f, "{x}"),
            Literal::Ints(v) => write!(f, "{v:?}"),
            Literal::Floats(v) => write!(f, "{v:?}"),
            Literal::Str(s) => write!(f, "{s:?}"),
        }
    }
}
