//! `onnxopt prune`: masks checked exactly on small models (unstructured per
//! output, 2:4 along the reduction axis of MatMul and of a Gemm with transB),
//! layers that must be left alone, the re-fit against an exact least-squares
//! solution and against the mask alone, bad arguments, and MiniLM end to end.

mod common;

use common::*;
use ndarray::Array2;
use onnxopt::calibrate::CalibrationSource;
use onnxopt::ir::{AttrValue, DataType, GraphBuilder, Model, Node};
use onnxopt::onnx;
use onnxopt::prune::reconstruct::{obs_factors, refit, refit_cross_validated, relative_error, PairedGram};
use onnxopt::prune::sparse::{satisfies_nm, LinearWeight, NofM};
use onnxopt::prune::{prune, Importance, LayerSparsity, PruneMethod, PruneOptions};
use onnxopt::verify::{self, SeededRng};
use std::path::Path;
use tract_onnx::prelude::IntoTensor;

const TWO_OF_FOUR: NofM = NofM { kept: 2, group: 4 };

fn values(model: &Model, name: &str) -> Vec<f32> {
    model.graph.initializer(name).unwrap_or_else(|| panic!("no initializer {name}")).to_f32().unwrap().iter().copied().collect()
}

fn random(rng: &mut SeededRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.normal()).collect()
}

/// x[-1, 8] -> MatMul w1[8, 12] -> Relu -> Gemm(transB) w2 stored [4, 12] + c -> y
fn two_layers() -> Model {
    let mut rng = SeededRng::new(7);
    let mut b = GraphBuilder::new("two_layers");
    let x = b.input("x", DataType::Float, &[-1, 8]);
    let w1 = b.initializer_f32("w1", &[8, 12], &random(&mut rng, 96));
    let w2 = b.initializer_f32("w2", &[4, 12], &random(&mut rng, 48));
    let c = b.initializer_f32("c", &[4], &[0.1, -0.2, 0.3, 0.0]);
    b.add(Node::new("MatMul", &[&x, &w1], &["h"]).with_name("first"));
    b.add(Node::new("Relu", &["h"], &["r"]).with_name("relu"));
    b.add(Node::new("Gemm", &["r", &w2, &c], &["y"]).with_name("second").with_attr("transB", AttrValue::Int(1)));
    b.output("y", DataType::Float, &[-1, 4]);
    b.into_model(17)
}

fn write_npz(path: &Path, name: &str, x: Array2<f32>) {
    let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(path).unwrap());
    npz.add_array(name, &x).unwrap();
    npz.finish().unwrap();
}

/// 64 rows of x with feature scales from 0.1 to 3.2 (so that Wanda and
/// magnitude disagree), in batches of 16.
fn calibration(dir: &Path) -> CalibrationSource {
    let mut rng = SeededRng::new(11);
    let x = Array2::from_shape_fn((64, 8), |(_, k)| rng.normal() * (0.1 + 0.4 * k as f32));
    let path = dir.join("x.npz");
    write_npz(&path, "x", x);
    CalibrationSource::Npz { path, batch: 16 }
}

fn options(method: PruneMethod) -> PruneOptions {
    PruneOptions::new(method)
}

#[test]
fn unstructured_magnitude_zeroes_the_smallest_half_of_each_output() {
    let model = two_layers();
    let pruned = prune(&model, &options(PruneMethod::Unstructured)).unwrap();
    let (w1, after) = (values(&model, "w1"), values(&pruned.model, "w1/pruned"));
    for n in 0..12 {
        let column: Vec<f32> = (0..8).map(|k| w1[k * 12 + n]).collect();
        let kept: Vec<f32> = (0..8).map(|k| after[k * 12 + n]).collect();
        assert_eq!(kept.iter().filter(|v| **v == 0.0).count(), 4, "output {n}");
        let mut magnitudes: Vec<f32> = column.iter().map(|v| v.abs()).collect();
        magnitudes.sort_by(f32::total_cmp);
        for (k, (&before, &now)) in column.iter().zip(&kept).enumerate() {
            // the 4 largest survive unchanged (no calibration: no re-fit)
            assert_eq!(now, if before.abs() >= magnitudes[4] { before } else { 0.0 }, "output {n}, k {k}");
        }
    }
    // Gemm transB: stored [N, K]; each output is a row of 12 with 6 zeros
    let w2 = values(&pruned.model, "w2/pruned");
    for row in w2.chunks(12) {
        assert_eq!(row.iter().filter(|v| **v == 0.0).count(), 6);
    }
    assert_eq!(pruned.report.layers.len(), 2);
    assert_eq!(pruned.report.nonzero_parameters_before - pruned.report.nonzero_parameters_after, 48 + 24);
    assert_eq!((pruned.report.linear_flops_per_token_before, pruned.report.linear_flops_per_token_after), (2 * 144, 144));
    insta::assert_snapshot!("prune_weights__unstructured_two_layers", format!("before:\n{model}\nafter:\n{}", pruned.model));
}

/// 2:4 along K: axis 0 of the MatMul's [K, N], axis 1 of the Gemm's stored [N, K].
#[test]
fn two_of_four_holds_on_every_pruned_weight_along_the_reduction_axis() {
    let model = two_layers();
    let pruned = prune(&model, &options(PruneMethod::NofM(TWO_OF_FOUR))).unwrap();
    let w1 = values(&pruned.model, "w1/pruned");
    for n in 0..12 {
        for group in 0..2 {
            let nonzero = (0..4).filter(|i| w1[(group * 4 + i) * 12 + n] != 0.0).count();
            assert_eq!(nonzero, 2, "w1 output {n} group {group}");
        }
    }
    let w2 = values(&pruned.model, "w2/pruned");
    for (n, row) in w2.chunks(12).enumerate() {
        for group in row.chunks(4) {
            assert_eq!(group.iter().filter(|v| **v != 0.0).count(), 2, "w2 output {n}: {row:?}");
        }
    }
    assert!(satisfies_nm(&LinearWeight::from_stored(&w2, 4, 12, true), TWO_OF_FOUR));
    // the same weight read along the wrong axis does not satisfy it
    assert!(!satisfies_nm(&LinearWeight::from_stored(&w2, 4, 12, false), TWO_OF_FOUR));
    assert!(pruned.report.layers.iter().all(|l| l.nm_satisfied == Some(true)));
    let comparison = onnxopt::passes::verify_rewrite(&model, &pruned.model, &verify::VerifyOptions { atol: 1e9, ..Default::default() }).unwrap();
    assert!(comparison.min_cosine() > 0.5, "{}", comparison.min_cosine());
    insta::assert_snapshot!("prune_weights__two_of_four_two_layers", format!("before:\n{model}\nafter:\n{}", pruned.model));
}

/// OBS with reconstruction chooses its masks in rounds (the later ones on
/// re-fitted weights): the patterns still hold exactly, 2:4 along K in every
/// group and 50% in every output, and the re-fit still lowers each layer's error.
#[test]
fn obs_masks_in_rounds_keep_the_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let model = two_layers();
    let source = calibration(dir.path());
    for method in [PruneMethod::NofM(TWO_OF_FOUR), PruneMethod::Unstructured] {
        let mut options = options(method);
        options.importance = Importance::Obs;
        options.reconstruct = true;
        options.damping = Some(onnxopt::prune::DEFAULT_DAMPING);
        options.calibration = Some(source.clone());
        let pruned = prune(&model, &options).unwrap();
        assert_eq!(pruned.report.layers.len(), 2);
        for layer in &pruned.report.layers {
            assert!((layer.sparsity - 0.5).abs() < 1e-9, "{method:?} {}: sparsity {}", layer.node, layer.sparsity);
            assert!(layer.error_after.unwrap() < layer.error_before.unwrap(), "{method:?} {}", layer.node);
        }
        let w1 = LinearWeight::from_stored(&values(&pruned.model, "w1/pruned"), 8, 12, false);
        let w2 = LinearWeight::from_stored(&values(&pruned.model, "w2/pruned"), 4, 12, true);
        for w in [&w1, &w2] {
            for n in 0..w.n {
                assert_eq!((0..w.k).filter(|&k| w.at(k, n) != 0.0).count(), w.k / 2, "{method:?} output {n}");
            }
            if method != PruneMethod::Unstructured {
                assert!(satisfies_nm(w, TWO_OF_FOUR));
            }
        }
    }
}

/// Must not fire: a K that 4 does not divide, a weight two nodes share, a
/// weight that is a graph input, a product of two activations.
#[test]
fn layers_that_cannot_take_a_mask_are_left_alone() {
    let mut b = GraphBuilder::new("unprunable");
    let x = b.input("x", DataType::Float, &[-1, 6]);
    let w = b.initializer_f32("w", &[6, 6], &[0.5; 36]);
    let shared = b.initializer_f32("shared", &[6, 6], &[0.25; 36]);
    b.add(Node::new("MatMul", &[&x, &w], &["a"]).with_name("k_is_six"));
    b.add(Node::new("MatMul", &["a", &shared], &["b"]).with_name("shared_1"));
    b.add(Node::new("MatMul", &["b", &shared], &["c"]).with_name("shared_2"));
    b.add(Node::new("MatMul", &["c", "c"], &["d"]).with_name("activations"));
    b.output("d", DataType::Float, &[6, 6]);
    let model = b.into_model(17);
    let pruned = prune(&model, &options(PruneMethod::NofM(TWO_OF_FOUR))).unwrap();
    assert_eq!(pruned.model, model);
    assert!(pruned.report.layers.is_empty());
    let mut skipped: Vec<(&str, &str)> = pruned.report.skipped.iter().map(|s| (s.node.as_str(), s.why.as_str())).collect();
    skipped.sort();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(skipped[0].1.contains("K = 6 is not a multiple of 4"), "{skipped:?}");
    assert!(skipped[1].1.contains("read by 2 nodes") && skipped[2].1.contains("read by 2 nodes"), "{skipped:?}");
}

/// The re-fit is the least-squares solution under the mask: checked against
/// the normal equations solved here by Gaussian elimination, with no damping.
#[test]
fn refit_equals_the_exact_least_squares_solution() {
    let (rows, k, n) = (40, 4, 2);
    let mut rng = SeededRng::new(3);
    let xt = random(&mut rng, rows * k);
    // the student's input: the teacher's, perturbed (as an earlier pruned layer would)
    let xs: Vec<f32> = xt.iter().map(|v| v + 0.3 * rng.normal()).collect();
    let weight = LinearWeight { values: random(&mut rng, k * n), k, n };
    let keep = vec![true, false, false, true, true, true, false, false]; // column 0 keeps k 0, 2; column 1 keeps 1, 2
                                                                         // two batches of 20 rows: the sums accumulate
    let tensor = |v: &[f32]| Array2::from_shape_vec((v.len() / k, k), v.to_vec()).unwrap().into_tensor();
    let mut sums = PairedGram::new("x");
    for half in [0..20 * k, 20 * k..40 * k] {
        sums.observe(&tensor(&xs[half.clone()]), &tensor(&xt[half]), None).unwrap();
    }
    let result = refit(&weight, &keep, false, sums.sums(), 0.0).unwrap();

    let x = |v: &[f32], r: usize, c: usize| v[r * k + c] as f64;
    let mut residual = 0.0;
    let mut reference = 0.0;
    for col in 0..n {
        let kept: Vec<usize> = (0..k).filter(|&kk| keep[kk * n + col]).collect();
        // normal equations over the kept features: (Xs_S^T Xs_S) w = Xs_S^T (Xt w_col)
        let target: Vec<f64> = (0..rows).map(|r| (0..k).map(|kk| x(&xt, r, kk) * weight.at(kk, col) as f64).sum()).collect();
        let mut system: Vec<Vec<f64>> = kept
            .iter()
            .map(|&i| {
                let mut row: Vec<f64> = kept.iter().map(|&j| (0..rows).map(|r| x(&xs, r, i) * x(&xs, r, j)).sum()).collect();
                row.push((0..rows).map(|r| x(&xs, r, i) * target[r]).sum());
                row
            })
            .collect();
        let solution = gaussian_elimination(&mut system);
        for (kk, expected) in kept.iter().zip(&solution) {
            let got = result.weight.at(*kk, col) as f64;
            assert!((got - expected).abs() <= 1e-5 * expected.abs().max(1.0), "output {col}, k {kk}: {got} against {expected}");
        }
        for kk in (0..k).filter(|kk| !kept.contains(kk)) {
            assert_eq!(result.weight.at(kk, col), 0.0);
        }
        for (r, wanted) in target.iter().enumerate() {
            let predicted: f64 = kept.iter().zip(&solution).map(|(&kk, w)| x(&xs, r, kk) * w).sum();
            residual += (predicted - wanted).powi(2);
            reference += wanted.powi(2);
        }
    }
    assert!((result.error_after - residual / reference).abs() < 1e-6, "{} against {}", result.error_after, residual / reference);
    assert!(result.error_after < result.error_before, "{} >= {}", result.error_after, result.error_before);
}

/// With a bias, the re-fit is the least-squares solution over `[X_S 1]`: the
/// weights and the bias shift against the normal equations solved here, and
/// the reported error against the residual computed row by row. Inputs with a
/// nonzero mean make the shift matter: the fit with it is closer.
#[test]
fn refit_with_bias_equals_the_least_squares_solution_over_x_and_ones() {
    let (rows, k, n) = (40, 4, 2);
    let mut rng = SeededRng::new(9);
    let xt: Vec<f32> = (0..rows * k).map(|_| 1.0 + rng.normal()).collect();
    let xs: Vec<f32> = xt.iter().map(|v| v + 0.3 * rng.normal()).collect();
    let weight = LinearWeight { values: random(&mut rng, k * n), k, n };
    let keep = vec![true, false, false, true, true, true, false, false];
    let tensor = |v: &[f32]| Array2::from_shape_vec((v.len() / k, k), v.to_vec()).unwrap().into_tensor();
    let mut sums = PairedGram::new("x");
    sums.observe(&tensor(&xs), &tensor(&xt), None).unwrap();
    let with = refit(&weight, &keep, true, sums.sums(), 0.0).unwrap();
    let without = refit(&weight, &keep, false, sums.sums(), 0.0).unwrap();
    let shift = with.bias_shift.clone().expect("a bias shift");
    assert!(without.bias_shift.is_none());
    assert!(with.error_after < without.error_after, "{} >= {}", with.error_after, without.error_after);

    let x = |v: &[f32], r: usize, c: usize| v[r * k + c] as f64;
    let (mut residual, mut reference) = (0.0, 0.0);
    for col in 0..n {
        let kept: Vec<usize> = (0..k).filter(|&kk| keep[kk * n + col]).collect();
        let target: Vec<f64> = (0..rows).map(|r| (0..k).map(|kk| x(&xt, r, kk) * weight.at(kk, col) as f64).sum()).collect();
        // features of the fit: the kept columns of X_s, then ones
        let feature = |r: usize, i: usize| if i < kept.len() { x(&xs, r, kept[i]) } else { 1.0 };
        let size = kept.len() + 1;
        let mut system: Vec<Vec<f64>> = (0..size)
            .map(|i| {
                let mut row: Vec<f64> = (0..size).map(|j| (0..rows).map(|r| feature(r, i) * feature(r, j)).sum()).collect();
                row.push((0..rows).map(|r| feature(r, i) * target[r]).sum());
                row
            })
            .collect();
        let solution = gaussian_elimination(&mut system);
        for (i, &kk) in kept.iter().enumerate() {
            let got = with.weight.at(kk, col) as f64;
            assert!((got - solution[i]).abs() <= 1e-5 * solution[i].abs().max(1.0), "output {col}, k {kk}: {got} against {}", solution[i]);
        }
        let expected_shift = solution[kept.len()];
        assert!((shift[col] - expected_shift).abs() <= 1e-6 * expected_shift.abs().max(1.0), "shift {col}: {} against {expected_shift}", shift[col]);
        for (r, wanted) in target.iter().enumerate() {
            let predicted: f64 = (0..size).map(|i| feature(r, i) * solution[i]).sum();
            residual += (predicted - wanted).powi(2);
            reference += wanted.powi(2);
        }
    }
    assert!((with.error_after - residual / reference).abs() < 1e-6, "{} against {}", with.error_after, residual / reference);
}

/// Solves the augmented system in place (partial pivoting).
fn gaussian_elimination(system: &mut [Vec<f64>]) -> Vec<f64> {
    let size = system.len();
    for col in 0..size {
        let pivot = (col..size).max_by(|&a, &b| system[a][col].abs().total_cmp(&system[b][col].abs())).unwrap();
        system.swap(col, pivot);
        let pivot_row = system[col].clone();
        for row in system.iter_mut().skip(col + 1) {
            let factor = row[col] / pivot_row[col];
            for (value, &p) in row.iter_mut().zip(&pivot_row).skip(col) {
                *value -= factor * p;
            }
        }
    }
    let mut solution = vec![0.0; size];
    for row in (0..size).rev() {
        let known: f64 = (row + 1..size).map(|c| system[row][c] * solution[c]).sum();
        solution[row] = (system[row][size] - known) / system[row][row];
    }
    solution
}

/// The damping pulls towards the original weights, not towards zero: a kept
/// feature the calibration data never activates keeps its original weight.
#[test]
fn damping_keeps_the_original_weight_where_the_data_is_silent() {
    let (rows, k, n) = (30, 4, 1);
    let mut rng = SeededRng::new(5);
    // feature 3 is zero on every calibration row
    let x: Vec<f32> = (0..rows * k).map(|i| if i % k == 3 { 0.0 } else { rng.normal() }).collect();
    let tensor = Array2::from_shape_vec((rows, k), x).unwrap().into_tensor();
    let mut sums = PairedGram::new("x");
    sums.observe(&tensor, &tensor, None).unwrap();
    let weight = LinearWeight { values: vec![0.5, -1.0, 0.25, 2.0], k, n };
    let keep = [true, false, true, true];
    let result = refit(&weight, &keep, false, sums.sums(), 0.1).unwrap();
    assert!((result.weight.at(3, 0) - 2.0).abs() < 1e-6, "silent feature's weight {}", result.weight.at(3, 0));
    assert_eq!(result.weight.at(1, 0), 0.0);
    assert!(result.error_after < result.error_before, "{} >= {}", result.error_after, result.error_before);
}

/// Cross-validation: on plentiful data with correlated features a re-fit beats
/// the masked weights and the result is the re-fit at the chosen damping; on a
/// few noisy rows the choice predicts the held-out folds at least as well as
/// every candidate, the masked weights included.
#[test]
fn cross_validation_chooses_the_damping_on_held_out_batches() {
    let (k, n) = (8, 3);
    let mut rng = SeededRng::new(11);
    let weight = LinearWeight { values: random(&mut rng, k * n), k, n };
    let keep: Vec<bool> = (0..k * n).map(|i| i % 2 == 0).collect();
    // a fold's sums, and its teacher output energy sum_n ||X_t w_n||^2
    let fold = |rng: &mut SeededRng, rows: usize, noise: f32| {
        // features k and k + 1 share a component: the kept ones can stand in for the masked
        let z = random(rng, rows * k);
        let xt: Vec<f32> = (0..rows * k).map(|i| z[i] + if i % k + 1 < k { 0.8 * z[i + 1] } else { 0.0 }).collect();
        let xs: Vec<f32> = xt.iter().map(|v| v + noise * rng.normal()).collect();
        let energy: f64 = (0..rows)
            .flat_map(|r| (0..n).map(move |c| (r, c)))
            .map(|(r, c)| (0..k).map(|kk| xt[r * k + kk] as f64 * weight.at(kk, c) as f64).sum::<f64>().powi(2))
            .sum();
        let t = |v: Vec<f32>| Array2::from_shape_vec((rows, k), v).unwrap().into_tensor();
        let mut g = PairedGram::new("x");
        g.observe(&t(xs), &t(xt), None).unwrap();
        (g, energy)
    };
    // clean and plentiful
    let folds = [fold(&mut rng, 400, 0.0).0, fold(&mut rng, 400, 0.0).0];
    let total = folds[0].plus(&folds[1]);
    assert_eq!(total.rows, 800);
    let chosen = refit_cross_validated(&weight, &keep, false, total.sums(), [folds[0].sums(), folds[1].sums()], 0.01).unwrap();
    let damping = chosen.damping.expect("a re-fit beats the masked weights on clean correlated data");
    assert_eq!(chosen.weight, refit(&weight, &keep, false, total.sums(), damping).unwrap().weight);
    assert!(chosen.error_after < chosen.error_before, "{} >= {}", chosen.error_after, chosen.error_before);

    // few noisy rows
    let (first, second) = (fold(&mut rng, 12, 1.5), fold(&mut rng, 12, 1.5));
    let total = first.0.plus(&second.0);
    let sums = [first.0.sums(), second.0.sums()];
    let energies = [first.1, second.1];
    let chosen = refit_cross_validated(&weight, &keep, false, total.sums(), sums, 0.01).unwrap();
    let held_out = |damping: Option<f64>| -> f64 {
        (0..2)
            .map(|f| {
                let fitted = match damping {
                    Some(d) => refit(&weight, &keep, false, sums[1 - f], d).unwrap().weight,
                    None => weight.masked(&keep),
                };
                relative_error(&fitted, None, &weight, sums[f]) * energies[f]
            })
            .sum()
    };
    let best = held_out(chosen.damping);
    for candidate in [Some(0.01), Some(0.03), Some(0.1), Some(0.3), Some(1.0), Some(3.0), None] {
        assert!(best <= held_out(candidate) * (1.0 + 1e-9), "chosen {:?}: {best}; {candidate:?}: {}", chosen.damping, held_out(candidate));
    }
}

/// On calibration data, each layer's error after the re-fit is below the mask's
/// alone, and the model's output is closer to the original's than without it.
#[test]
fn reconstruction_reduces_the_layer_error_and_the_output_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = two_layers();
    let source = calibration(dir.path());
    let run = |reconstruct: bool| {
        let mut options = options(PruneMethod::Unstructured);
        options.sparsity = LayerSparsity::parse(&["0.5".into()]).unwrap();
        options.importance = Importance::Wanda;
        options.reconstruct = reconstruct;
        // fixed: on this tiny model's few rows cross-validation may keep the masked weights
        options.damping = Some(onnxopt::prune::DEFAULT_DAMPING);
        options.calibration = Some(source.clone());
        prune(&model, &options).unwrap()
    };
    let (plain, refitted) = (run(false), run(true));
    // the Gemm's bias `c` is re-fitted with its weight; without reconstruction it stays
    assert!(refitted.model.graph.initializer("c/pruned").is_some());
    assert!(plain.model.graph.initializer("c").is_some());
    for layer in &refitted.report.layers {
        let (before, after) = (layer.error_before.unwrap(), layer.error_after.unwrap());
        assert!(after < before, "{}: {after} >= {before}", layer.node);
        assert!((layer.sparsity - 0.5).abs() < 1e-9);
    }
    // the first layer sees the teacher's input: its error before the re-fit is Wanda's alone
    let first = |p: &onnxopt::prune::Pruned| p.report.layers[0].error_before.unwrap();
    assert!((first(&plain) - first(&refitted)).abs() < 1e-9);
    let x: Vec<verify::NamedInput> = verify::read_npz(&dir.path().join("x.npz")).unwrap();
    let check = verify::VerifyOptions { atol: 1e9, inputs: Some(x), ..Default::default() };
    let max_abs = |p: &onnxopt::prune::Pruned| onnxopt::passes::verify_rewrite(&model, &p.model, &check).unwrap().max_abs();
    let (without, with) = (max_abs(&plain), max_abs(&refitted));
    assert!(with < without, "max abs {with} with the re-fit, {without} without");
}

fn prune_cli(input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    run_command("prune", input, output, extra)
}

#[test]
fn bad_arguments_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let bert = fixture("bert.ts.onnx");
    for (args, says) in [
        (&["--method", "nm", "--nm", "3:2"][..], "N must be at least 1 and below M"),
        (&["--method", "nm", "--nm", "two:four"][..], "not a whole number"),
        (&["--method", "unstructured", "--sparsity", "1.5"][..], "outside [0, 1)"),
        (&["--method", "unstructured", "--sparsity=-0.1"][..], "outside [0, 1)"),
        (&["--method", "unstructured", "--sparsity", "no_such_layer=0.3"][..], "no_such_layer"),
        (&["--method", "unstructured", "--importance", "wanda"][..], "needs calibration data"),
        (&["--method", "unstructured", "--importance", "obs"][..], "needs calibration data"),
        (&["--method", "unstructured", "--reconstruct"][..], "needs calibration data"),
    ] {
        let o = prune_cli(&bert, &out, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(files_in(dir.path()).is_empty());
    }
}

/// The tiny BERT fused for ORT (com.microsoft Attention's packed QKV weight,
/// MatMuls before SkipLayerNormalization and BiasGelu): every linear weight is
/// pruned 2:4, the result checked in tract through the lowerings.
#[test]
fn fused_ort_graph_is_pruned_two_of_four() {
    let dir = tempfile::tempdir().unwrap();
    let fused = dir.path().join("bert.ort.onnx");
    let o = run(&["--quiet", "optimize", fixture("bert.ts.onnx").to_str().unwrap(), "-o", fused.to_str().unwrap(), "--target", "ort"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("bert.24.onnx");
    let report = dir.path().join("report.json");
    let o = prune_cli(&fused, &out, &["--method", "nm", "--report", report.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let layers = report["layers"].as_array().unwrap();
    let attention = layers.iter().filter(|l| l["op"] == "com.microsoft.Attention").count();
    assert_eq!((layers.len(), attention), (8, 2), "{report:#}");
    assert!(report["verification"]["outputs"][0]["cosine"].as_f64().unwrap() > 0.5);
    let model = onnx::load(&out).unwrap();
    for layer in layers {
        let weight = format!("{}/pruned", layer["weight"].as_str().unwrap());
        let dims = &model.graph.initializer(&weight).unwrap().dims;
        let stored = LinearWeight::from_stored(&values(&model, &weight), dims[0] as usize, dims[1] as usize, false);
        assert!(satisfies_nm(&stored, TWO_OF_FOUR), "{weight}");
        assert_eq!(layer["nm_satisfied"], true);
    }
}

/// MiniLM (ts export), 50% unstructured, Wanda with reconstruction on 16
/// sentences of calib.txt: every layer's error falls, and the output on the
/// first calibration batch keeps its direction.
#[test]
fn minilm_wanda_with_reconstruction() {
    let (Some(model), Some(tokenizer)) = (shared_model("model.ts.onnx"), shared_model("tokenizer.json")) else { return };
    let Ok(text) = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus/calib.txt")) else {
        eprintln!("skipping: ../shared/corpus/calib.txt not present");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, text.lines().take(16).collect::<Vec<_>>().join("\n")).unwrap();
    let out = dir.path().join("pruned.onnx");
    let report = dir.path().join("report.json");
    let args = [
        "--method",
        "unstructured",
        "--sparsity",
        "0.5",
        "--importance",
        "wanda",
        "--calib-text",
        calib.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--batch",
        "16",
        "--report",
        report.to_str().unwrap(),
    ];
    let o = prune_cli(&model, &out, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 36);
    for layer in layers {
        let (before, after) = (layer["error_before"].as_f64().unwrap(), layer["error_after"].as_f64().unwrap());
        assert!(after < before, "{}: {after} >= {before}", layer["node"]);
    }
    let cosine = report["verification"]["outputs"][0]["cosine"].as_f64().unwrap();
    assert!(cosine > 0.9, "cosine {cosine}");
}

/// OBS importance is exact for one weight: removing `w_kn` and re-fitting the
/// rest of output `n` (no damping) raises `||X w_n - X w'_n||^2` by exactly
/// `w_kn^2 / [A^-1]_kk`, i.e. `(|w_kn| * factor_k)^2`; on a diagonal Gram
/// matrix the factor is the damped input norm, Wanda's.
#[test]
fn obs_factor_predicts_the_cost_of_removing_one_weight() {
    let (rows, k) = (60, 6);
    let mut rng = SeededRng::new(11);
    let z = random(&mut rng, rows * (k + 1));
    // correlated features: each mixes in its neighbour
    let x: Vec<f32> = (0..rows).flat_map(|r| (0..k).map(move |j| (r, j))).map(|(r, j)| z[r * (k + 1) + j] + 0.8 * z[r * (k + 1) + j + 1]).collect();
    let weight = LinearWeight { values: random(&mut rng, k), k, n: 1 };
    let mut sums = PairedGram::new("x");
    let tensor = Array2::from_shape_vec((rows, k), x.clone()).unwrap().into_tensor();
    sums.observe(&tensor, &tensor, None).unwrap();
    let factors = obs_factors(sums.student.as_ref(), 0.0).unwrap();
    let output_energy: f64 = (0..rows).map(|r| (0..k).map(|j| x[r * k + j] as f64 * weight.at(j, 0) as f64).sum::<f64>().powi(2)).sum();
    for (removed, factor) in factors.iter().enumerate().take(k) {
        let keep: Vec<bool> = (0..k).map(|j| j != removed).collect();
        let cost = refit(&weight, &keep, false, sums.sums(), 0.0).unwrap().error_after * output_energy;
        let predicted = (weight.at(removed, 0).abs() as f64 * factor).powi(2);
        // up to the 1e-6 relative damping obs_factors always adds
        assert!((cost - predicted).abs() <= 1e-4 * predicted + 1e-9, "k {removed}: cost {cost:.6e}, predicted {predicted:.6e}");
    }

    let diagonal = faer::Mat::<f64>::from_fn(3, 3, |i, j| if i == j { (i + 1) as f64 } else { 0.0 });
    let factors = obs_factors(diagonal.as_ref(), 0.0).unwrap();
    for (i, f) in factors.iter().enumerate() {
        let expected = ((i + 1) as f64 + 1e-6 * 2.0).sqrt();
        assert!((f - expected).abs() < 1e-9, "{i}: {f} against {expected}");
    }
}
