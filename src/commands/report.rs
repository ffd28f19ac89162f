//! What each command reports (`--report FILE` writes it as JSON, with the
//! input and output paths added), and the one-line summaries the CLI prints.

use crate::passes::PassRecord;
use crate::prune::layers::LayerDropReport;
use crate::prune::structured::StructuredReport;
use crate::sensitivity::Int8Choice;
use crate::target::Target;
use crate::verify::Comparison;
use serde::Serialize;

/// `optimize`: what each pass did, node counts and the check.
#[derive(Debug, Serialize)]
pub struct OptimizeReport {
    pub target: Target,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub opset_before: Option<i64>,
    pub opset_after: Option<i64>,
    pub passes: Vec<PassRecord>,
    pub verification: Option<Comparison>,
}

/// `quantize`, every mode.
#[derive(Debug, Serialize)]
pub struct QuantizeReport {
    pub target: Target,
    pub mode: &'static str,
    /// int8 modes: per tensor or per token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activations: Option<String>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub tolerance: Tolerance,
    pub passes: Vec<PassRecord>,
    /// `--max-error`'s search: each layer's cost and what was kept in float.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<Int8Choice>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub int4: Option<Int4Report>,
    pub seconds: f64,
    pub verification: Option<Comparison>,
}

/// The bound a quantized model was checked against.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Tolerance {
    pub min_cosine: f64,
    /// None: no element bound.
    pub atol: Option<f32>,
    pub rtol: f32,
}

/// `quantize --mode int4-weight`: the choices and what they saved.
#[derive(Debug, Serialize)]
pub struct Int4Report {
    pub block_size: usize,
    pub rounding: &'static str,
    pub zero_point: bool,
    pub accuracy_level: Option<i64>,
    pub embeddings: &'static str,
    pub replaced_float_weight_bytes: u64,
    pub int4_weight_bytes: u64,
    pub initializer_bytes_before: u64,
    pub initializer_bytes_after: u64,
    /// What `onnxopt verify INPUT OUTPUT` reproduces: the same seeded inputs and lowering.
    pub verify_tolerance: Option<Tolerance>,
}

/// `prune`: per method.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum PruneReport {
    /// Unstructured and N:M: every layer's sparsity and error, and the check.
    Weights(crate::prune::PruneReport),
    /// Heads and neurons, or whole layers.
    Blocks { seconds: f64, pruning: BlocksReport },
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum BlocksReport {
    Structured(StructuredReport),
    Layers(LayerDropReport),
}

impl PruneReport {
    pub fn verification(&self) -> Option<&Comparison> {
        match self {
            PruneReport::Weights(r) => r.verification.as_ref(),
            PruneReport::Blocks { .. } => None,
        }
    }
}

/// `auto`: the preset run, or every trial of the search and the one chosen.
#[derive(Debug, Serialize)]
pub struct AutoReport {
    pub target: Target,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<super::Preset>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<super::Budget>,
    /// The engine fidelity and latency were measured in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::verify::Engine>,
    pub held_back_batches: usize,
    /// What the latency runs: a batch, or a decode step.
    pub timed: String,
    /// Decoders: the input's perplexity on the held-back text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_perplexity: Option<f64>,
    pub trials: Vec<Trial>,
    /// The recipe written: the fastest trial within the budget.
    pub chosen: Option<String>,
    /// A preset: what its optimize step did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimize: Option<OptimizeReport>,
    pub seconds: f64,
}

impl AutoReport {
    pub(crate) fn preset(target: Target, preset: super::Preset, optimize: OptimizeReport, seconds: f64) -> AutoReport {
        AutoReport {
            target,
            preset: Some(preset),
            budget: None,
            engine: None,
            held_back_batches: 0,
            timed: String::new(),
            reference_perplexity: None,
            trials: Vec::new(),
            chosen: Some(format!("{preset:?}")),
            optimize: Some(optimize),
            seconds,
        }
    }
}

/// One recipe tried by `auto`'s search.
#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    pub recipe: String,
    /// Mean cosine (encoders) or perplexity ratio (decoders) on the held-back data.
    pub fidelity: Option<f64>,
    pub within_budget: bool,
    pub latency_ms: Option<f64>,
    /// The input's median, measured in turn with this trial's.
    pub input_latency_ms: Option<f64>,
    pub latency_ratio: Option<f64>,
    /// Decoders: the prefill's ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_ratio: Option<f64>,
    pub file_bytes: u64,
    pub build_seconds: f64,
    pub measure_seconds: f64,
    /// Why the recipe made no model, or its model could not be measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Trial {
    pub(crate) fn failed(recipe: &str, e: &super::CommandError) -> Trial {
        Trial {
            recipe: recipe.into(),
            fidelity: None,
            within_budget: false,
            latency_ms: None,
            input_latency_ms: None,
            latency_ratio: None,
            prefill_ratio: None,
            file_bytes: 0,
            build_seconds: 0.0,
            measure_seconds: 0.0,
            error: Some(super::sentence(e)),
        }
    }

    /// `int8: fidelity 0.99712, 0.58x (41.2 ms), within the budget`.
    pub fn line(&self) -> String {
        match (&self.error, self.fidelity, self.latency_ratio, self.latency_ms) {
            (Some(e), ..) => format!("{}: failed: {e}", self.recipe),
            (None, Some(f), Some(r), Some(ms)) => {
                let prefill = self.prefill_ratio.map(|p| format!(", prefill {p:.2}x")).unwrap_or_default();
                let verdict = if self.within_budget { "within the budget" } else { "over the budget" };
                format!("{}: fidelity {f:.5}, {r:.2}x ({ms:.1} ms){prefill}, {verdict}", self.recipe)
            }
            _ => format!("{}: not measured", self.recipe),
        }
    }
}

/// What each pass did, one line per pass.
pub fn pass_lines(records: &[PassRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            let rules: Vec<String> = r.by_origin.iter().map(|(k, v)| format!("{k} x{v}")).collect();
            format!(
                "{:<28} {:>4} patches, nodes {:>4} -> {:<4} {:>6} ms  {}",
                r.pass,
                r.patches,
                r.nodes_before,
                r.nodes_after,
                r.milliseconds,
                rules.join(", ")
            )
        })
        .collect()
}

impl AutoReport {
    /// The search as one HTML page: every trial on a latency-vs-fidelity plot
    /// (inline SVG, the Pareto front joined and the choice ringed, the budget
    /// as a dashed line) and a table of the trials.
    pub fn html(&self) -> String {
        let measured: Vec<&Trial> = self.trials.iter().filter(|t| t.fidelity.is_some() && t.latency_ratio.is_some()).collect();
        let lower_is_better = matches!(self.budget, Some(super::Budget::MaxPerplexityRatio(_)));
        let better = |a: f64, b: f64| if lower_is_better { a <= b } else { a >= b };
        // on the front: no other trial at least as fast and at least as faithful, and better in one
        let dominated = |t: &Trial| {
            let (f, r) = (t.fidelity.unwrap_or_default(), t.latency_ratio.unwrap_or_default());
            measured.iter().any(|o| {
                let (of, or) = (o.fidelity.unwrap_or_default(), o.latency_ratio.unwrap_or_default());
                or <= r && better(of, f) && (or < r || of != f)
            })
        };
        let mut front: Vec<&Trial> = measured.iter().copied().filter(|t| !dominated(t)).collect();
        front.sort_by(|a, b| a.latency_ratio.unwrap_or_default().total_cmp(&b.latency_ratio.unwrap_or_default()));
        let budget = self.budget.map(|b| match b {
            super::Budget::MinCosine(c) => c,
            super::Budget::MaxPerplexityRatio(r) => r,
        });
        let values = |f: fn(&Trial) -> Option<f64>| measured.iter().filter_map(|t| f(t)).chain(budget).collect::<Vec<f64>>();
        let span = |v: Vec<f64>| {
            let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            if lo.is_finite() && hi > lo {
                let pad = (hi - lo) * 0.08;
                (lo - pad, hi + pad)
            } else {
                (lo - 0.5, hi + 0.5)
            }
        };
        let (x0, x1) = span(measured.iter().filter_map(|t| t.latency_ratio).collect());
        let (y0, y1) = span(values(|t| t.fidelity));
        let (w, h, m) = (640.0, 400.0, 60.0);
        let px = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
        let py = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
        let escape = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" id="plot">"#);
        svg += &format!(r##"<rect x="{m}" y="{m}" width="{}" height="{}" fill="none" stroke="#999"/>"##, w - 2.0 * m, h - 2.0 * m);
        for i in 0..=4 {
            let (x, y) = (x0 + (x1 - x0) * i as f64 / 4.0, y0 + (y1 - y0) * i as f64 / 4.0);
            svg += &format!(r#"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{x:.2}x</text>"#, px(x), h - m + 16.0);
            svg += &format!(r#"<text x="{}" y="{:.1}" font-size="11" text-anchor="end">{y:.4}</text>"#, m - 6.0, py(y) + 4.0);
        }
        let y_label = if lower_is_better { "perplexity ratio (held-back text)" } else { "mean cosine (held-back data)" };
        svg += &format!(r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">latency, ratio to the input</text>"#, w / 2.0, h - 16.0);
        svg += &format!(r#"<text x="14" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {})">{y_label}</text>"#, h / 2.0, h / 2.0);
        if let Some(b) = budget {
            svg += &format!(r##"<line class="budget" x1="{m}" x2="{}" y1="{1:.1}" y2="{1:.1}" stroke="#c33" stroke-dasharray="6 4"/>"##, w - m, py(b));
        }
        let points: Vec<String> =
            front.iter().map(|t| format!("{:.1},{:.1}", px(t.latency_ratio.unwrap_or_default()), py(t.fidelity.unwrap_or_default()))).collect();
        svg += &format!(r##"<polyline class="pareto" points="{}" fill="none" stroke="#36c" stroke-width="1.5"/>"##, points.join(" "));
        for t in &measured {
            let (x, y) = (px(t.latency_ratio.unwrap_or_default()), py(t.fidelity.unwrap_or_default()));
            let chosen = self.chosen.as_deref() == Some(t.recipe.as_str());
            let fill = if t.within_budget { "#2a2" } else { "#aaa" };
            svg += &format!(r#"<circle class="trial" cx="{x:.1}" cy="{y:.1}" r="5" fill="{fill}"><title>{}</title></circle>"#, escape(&t.line()));
            if chosen {
                svg += &format!(r#"<circle class="chosen" cx="{x:.1}" cy="{y:.1}" r="9" fill="none" stroke="black" stroke-width="2"/>"#);
            }
            svg += &format!(r#"<text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#, x + 8.0, y - 6.0, escape(&t.recipe));
        }
        svg += "</svg>";
        let rows: String = self
            .trials
            .iter()
            .map(|t| {
                let cell = |v: Option<f64>, digits: usize| v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into());
                format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td></tr>\n",
                    escape(&t.recipe),
                    cell(t.fidelity, 5),
                    cell(t.latency_ratio, 3),
                    cell(t.latency_ms, 2),
                    cell(t.prefill_ratio, 3),
                    if t.within_budget { "yes" } else { "no" },
                    t.build_seconds,
                    escape(t.error.as_deref().unwrap_or(""))
                )
            })
            .collect();
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>onnxopt auto</title>\n<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:left}}</style></head><body>\n\
             <h1>onnxopt auto: {} trials for --target {}</h1>\n<p>Budget: {}. Chosen: <b>{}</b>. Latency: {} ({}). Pareto front in blue; green trials are within the budget.</p>\n{svg}\n\
             <table id=\"trials\"><tr><th>recipe</th><th>fidelity</th><th>latency ratio</th><th>ms</th><th>prefill ratio</th><th>within budget</th><th>build s</th><th>error</th></tr>\n{rows}</table>\n</body></html>\n",
            self.trials.len(),
            self.target,
            self.budget.map(|b| format!("{b:?}")).unwrap_or_else(|| "none".into()),
            escape(self.chosen.as_deref().unwrap_or("none")),
            escape(&self.timed),
            self.engine.map(|e| e.name()).unwrap_or("-"),
        )
    }
}
