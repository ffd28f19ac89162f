//! The fusion-rule test harness shared by tests/rules*.rs: run the fuse pass
//! alone, count what fired, and check nothing fires on a near miss. Snapshots
//! stay in each test file (insta names them after the calling module).

use onnxopt::ir::Model;
use onnxopt::passes::check::{rewrite_and_compare, Rewritten};
use onnxopt::passes::fuse::Fuse;
use onnxopt::passes::Pass;
use onnxopt::verify::VerifyOptions;

/// The fuse pass for `target` alone, checked in tract (contrib ops lowered first).
pub fn fuse(model: &Model, target: &str) -> Rewritten {
    let passes: Vec<Box<dyn Pass>> = vec![Box::new(Fuse::new(target, None))];
    rewrite_and_compare(model, &passes, &VerifyOptions { atol: 1e-5, rtol: 1e-4, ..Default::default() })
}

/// Patches `rule` made, over all passes.
pub fn fired(r: &Rewritten, rule: &str) -> usize {
    r.records.iter().map(|rec| rec.by_origin.get(rule).copied().unwrap_or(0)).sum()
}

pub fn count(model: &Model, op_type: &str) -> usize {
    model.graph.nodes().filter(|n| n.op_type == op_type).count()
}

pub fn assert_silent(model: &Model, target: &str) {
    let r = fuse(model, target);
    assert_eq!(r.patches(), 0, "nothing should fire:\n{}", r.snapshot);
}
