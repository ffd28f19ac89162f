//! `Fuse`: applies the rules of `passes/*.rules` for one target.
//!
//! Every node is tried as the root of every rule whose template serves the
//! target (at the model's opset), in rule-file order; the first rule that
//! matches at a node wins, and a node already claimed by a match of this round
//! is not matched again (the next round sees the new graph).
//!
//! A round that finds dead nodes proposes their removal first: a value read only
//! by dead code (the Shape of K that a canonical rule made pointless) must not
//! count as "used outside the match".

use super::dead_code::EliminateDeadCode;
use super::{Pass, PassError};
use crate::ir::{infer_types, Model, NodeId, Patch};
use crate::ir::{Graph, TypeMap};
use crate::rewrite::matcher::Miss;
use crate::rewrite::rule::Template;
use crate::rewrite::{instantiate, match_rule, standard_rules, Registry, Rule};
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

pub struct Fuse {
    target: String,
    registry: Registry,
    /// Rule name to explain near misses of (`--trace-rule`).
    trace_rule: Option<String>,
    trace: Mutex<Vec<String>>,
    /// Rules not to apply (by name), though the target has them.
    skipped_rules: HashSet<String>,
}

impl Fuse {
    pub fn new(target: &str, trace_rule: Option<String>) -> Fuse {
        Fuse { target: target.to_string(), registry: Registry::standard(), trace_rule, trace: Mutex::new(Vec::new()), skipped_rules: HashSet::new() }
    }

    /// The same pass without the rules named in `rules`.
    pub fn without_rules(mut self, rules: &[String]) -> Fuse {
        self.skipped_rules.extend(rules.iter().cloned());
        self
    }

    fn rules(&self) -> Result<&'static [Rule], PassError> {
        standard_rules().map_err(|e| PassError::Failed { pass: self.name().into(), message: e.to_string() })
    }
}

impl Pass for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn take_notes(&self) -> Vec<String> {
        self.trace.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default()
    }

    fn propose(&self, model: &Model) -> Result<Vec<Patch>, PassError> {
        let dead = EliminateDeadCode.propose(model)?;
        if !dead.is_empty() {
            return Ok(dead);
        }
        let opset = model.opset("").unwrap_or(0);
        let rules: Vec<(&Rule, &crate::rewrite::rule::Template)> = self
            .rules()?
            .iter()
            .filter(|r| !self.skipped_rules.contains(&r.name))
            .filter_map(|r| r.emission(&self.target, opset).map(|e| (r, &e.template)))
            .collect();
        let graph = &model.graph;
        let types = infer_types(model);
        let mut claimed: HashSet<NodeId> = HashSet::new();
        let mut patches = Vec::new();
        for (id, node) in graph.nodes_with_ids() {
            if claimed.contains(&id) {
                continue;
            }
            for (rule, template) in &rules {
                if rule.pattern.op_type != node.op_type {
                    continue;
                }
                match try_rule(graph, &types, &self.registry, rule, template, id, &claimed) {
                    Ok(Some((patch, removed))) => {
                        claimed.extend(removed);
                        patches.push(patch);
                        break;
                    }
                    Ok(None) => {}
                    Err(miss) => {
                        if self.trace_rule.as_deref() == Some(rule.name.as_str()) && miss.depth >= 2 {
                            if let Ok(mut trace) = self.trace.lock() {
                                trace.push(format!("{} did not fire at '{}' ({} nodes matched): {}", rule.name, node.name, miss.depth, miss.reason));
                            }
                        }
                    }
                }
            }
        }
        Ok(patches)
    }
}

/// Matches `rule` at `root` and builds its patch: `Ok(None)` when the match
/// overlaps a node an earlier match of this round claimed. No rule aborts a
/// run: an applier that meets something its conditions did not rule out (a
/// weight that is not a constant in an int8 export) or a panic in a condition
/// is a miss, with the reason `--trace-rule` prints, and the next rule is tried.
fn try_rule(
    graph: &Graph,
    types: &TypeMap,
    registry: &Registry,
    rule: &Rule,
    template: &Template,
    root: NodeId,
    claimed: &HashSet<NodeId>,
) -> Result<Option<(Patch, Vec<NodeId>)>, Miss> {
    let attempt = catch_unwind(AssertUnwindSafe(|| {
        let bindings = match_rule(graph, types, registry, rule, root)?;
        let removed: Vec<NodeId> = bindings.removed_nodes().collect();
        if removed.iter().any(|n| claimed.contains(n)) {
            return Ok(None);
        }
        let depth = removed.len();
        let patch = instantiate(graph, types, registry, rule, template, &bindings)
            .map_err(|reason| Miss { depth, reason: format!("matched, but its replacement could not be built: {reason}") })?;
        Ok(Some((patch, removed)))
    }));
    attempt.unwrap_or_else(|payload| Err(Miss { depth: usize::MAX, reason: format!("a condition panicked: {}", crate::verify::panic_message(payload)) }))
}
