//! The check every rewrite gets in tests: run passes on a model, print it
//! before and after (for an insta snapshot), and compare both in tract.

use super::{run_pipeline, verify_rewrite, DriverOptions, Pass, PassRecord};
use crate::ir::Model;
use crate::verify::{Comparison, VerifyOptions};

/// What `rewrite_and_compare` saw.
pub struct Rewritten {
    pub model: Model,
    pub records: Vec<PassRecord>,
    /// `before:\n<model>\nafter:\n<model>`: the snapshot text.
    pub snapshot: String,
    pub comparison: Comparison,
}

impl Rewritten {
    /// Patches applied, over all passes.
    pub fn patches(&self) -> usize {
        self.records.iter().map(|r| r.patches).sum()
    }
}

/// Runs `passes` on a copy of `model` (validating after every patch), then
/// runs both in tract on the same seeded inputs (contrib ops lowered first).
pub fn rewrite_and_compare(model: &Model, passes: &[Box<dyn Pass>], options: &VerifyOptions) -> Rewritten {
    let mut rewritten = model.clone();
    let driver = DriverOptions { validate: true, ..DriverOptions::default() };
    let records = run_pipeline(&mut rewritten, passes, &driver).unwrap_or_else(|e| panic!("{e}"));
    let snapshot = format!("before:\n{model}\nafter:\n{rewritten}");
    let comparison = verify_rewrite(model, &rewritten, options).unwrap_or_else(|e| panic!("{e}"));
    Rewritten { model: rewritten, records, snapshot, comparison }
}
