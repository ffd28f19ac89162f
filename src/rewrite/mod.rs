//! The rule language: patterns over the graph written as data in
//! `passes/*.rules`, parsed at first use (and by a test, so a bad rule fails the
//! build's tests with file:line), matched by [`matcher`], with what patterns
//! cannot say in named [`functions`].

pub mod functions;
pub mod matcher;
pub mod rule;
pub mod sexpr;

pub use functions::Registry;
pub use matcher::{instantiate, match_rule, Bindings, Miss};
pub use rule::{Rule, RuleError};

use std::sync::OnceLock;

/// The rule files, compiled in, in the order their rules are tried: a more
/// specific rule comes before one that would match a part of its pattern.
pub const RULE_FILES: &[(&str, &str)] = &[
    ("passes/canonical.rules", include_str!("../../passes/canonical.rules")),
    // before attention.rules: its encoder patterns would match parts of a decoder block
    ("passes/llama.rules", include_str!("../../passes/llama.rules")),
    ("passes/attention.rules", include_str!("../../passes/attention.rules")),
    ("passes/layer_norm.rules", include_str!("../../passes/layer_norm.rules")),
    ("passes/gelu.rules", include_str!("../../passes/gelu.rules")),
];

/// Every rule of every file, parsed once.
pub fn standard_rules() -> Result<&'static [Rule], RuleError> {
    static RULES: OnceLock<Result<Vec<Rule>, RuleError>> = OnceLock::new();
    RULES
        .get_or_init(|| {
            let registry = Registry::standard();
            let mut all = Vec::new();
            for (file, text) in RULE_FILES {
                all.extend(rule::parse_rules(file, text, &registry)?);
            }
            Ok(all)
        })
        .as_ref()
        .map(Vec::as_slice)
        .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_file_parses() {
        let rules = standard_rules().unwrap_or_else(|e| panic!("{e}"));
        assert!(rules.len() >= 5);
    }

    #[test]
    fn a_bad_rule_names_its_line() {
        let registry = Registry::standard();
        let text = "# fine\n(rule a (Relu ?x) :ort (Relu ?x))\n\n# broken\n(rule b (Relu ?x) :ort (Relu ?y))";
        let err = rule::parse_rules("t.rules", text, &registry).unwrap_err();
        assert_eq!(err.to_string(), "t.rules:5: ?y is used in the template but the pattern never binds it");
        let err = rule::parse_rules("t.rules", "# c\n(rule a (Relu ?x) :if (no-such ?x) :ort (Relu ?x))", &registry).unwrap_err();
        assert!(err.to_string().starts_with("t.rules:2: unknown condition function 'no-such'"), "{err}");
        let err = rule::parse_rules("t.rules", "(rule a (Relu ?x) :ort (Relu ?x))", &registry).unwrap_err();
        assert!(err.to_string().contains("needs a comment"), "{err}");
    }
}
