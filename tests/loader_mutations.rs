//! A stable-toolchain stand-in for the cargo-fuzz target (tests/fuzz): thousands
//! of seeded mutations of real models through the loader. Each must load or fail
//! with an error, never panic; what loads must round-trip.

mod common;

use common::*;
use onnxopt::onnx;
use onnxopt::verify::SeededRng;
use std::path::Path;

fn mutate(original: &[u8], rng: &mut SeededRng) -> Vec<u8> {
    let mut bytes = original.to_vec();
    match rng.below(0, 4) {
        0 => bytes.truncate(rng.below(0, bytes.len() as i64) as usize),
        1 => {
            for _ in 0..rng.below(1, 8) {
                let at = rng.below(0, bytes.len() as i64) as usize;
                bytes[at] = rng.next_u64() as u8;
            }
        }
        2 => {
            // a varint length or tag pushed to its extreme
            let at = rng.below(0, bytes.len() as i64) as usize;
            bytes.splice(at..at, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        }
        _ => {
            let from = rng.below(0, bytes.len() as i64) as usize;
            let len = rng.below(1, 64) as usize;
            let chunk: Vec<u8> = bytes[from..(from + len).min(bytes.len())].to_vec();
            let at = rng.below(0, bytes.len() as i64) as usize;
            bytes.splice(at..at, chunk);
        }
    }
    bytes
}

#[test]
fn mutated_models_never_panic() {
    let label = Path::new("mutant.onnx");
    let seeds = [onnx::to_bytes(&small_mlp()), std::fs::read(fixture("bert.ts.onnx")).unwrap()];
    let mut rng = SeededRng::new(11);
    let (mut loaded, mut refused) = (0, 0);
    for seed in &seeds {
        for _ in 0..1500 {
            let bytes = mutate(seed, &mut rng);
            match onnx::load_bytes(bytes.into(), label) {
                Ok(model) => {
                    loaded += 1;
                    let again = onnx::load_bytes(onnx::to_bytes(&model).into(), label).expect("a saved model loads");
                    assert_eq!(again, model);
                }
                Err(e) => {
                    refused += 1;
                    assert!(e.to_string().starts_with("mutant.onnx: "), "{e}");
                }
            }
        }
    }
    eprintln!("{loaded} mutants loaded, {refused} refused");
    assert!(refused > 0 && loaded > 0);
}
