//! `X^T X` of an activation over calibration data: the Hessian of a linear
//! layer's squared output error (`||X W - X W'||^2 = tr((W - W')^T X^T X (W - W'))`),
//! which GPTQ rounds against and pruning re-fits against; its diagonal is each
//! input feature's squared norm (Wanda's `||X_j||^2`).

use super::CalibrateError;
use faer::{Accum, Mat, Par};
use tract_onnx::prelude::Tensor;

/// The Gram matrix of one activation's rows (its last axis is the feature axis,
/// every other axis enumerates rows), summed over calibration batches. Memory is
/// `K x K` doubles whatever the amount of data; rows are folded in with one
/// matrix product per batch.
#[derive(Clone, Debug)]
pub struct Gram {
    pub name: String,
    /// `K x K`, symmetric; `X^T X` summed over every row seen.
    pub xtx: Mat<f64>,
    /// Rows folded in.
    pub rows: u64,
}

impl Gram {
    pub fn new(name: &str) -> Gram {
        Gram { name: name.to_string(), xtx: Mat::zeros(0, 0), rows: 0 }
    }

    /// Number of features (K); 0 before the first batch.
    pub fn features(&self) -> usize {
        self.xtx.nrows()
    }

    /// Folds in the rows of `value` whose `keep` entry is true (`keep` has one
    /// entry per row, in row-major order; `None` keeps every row). Padding
    /// tokens are left out this way: the model computes them, but no real input
    /// has them.
    pub fn observe(&mut self, value: &Tensor, keep: Option<&[bool]>) -> Result<(), CalibrateError> {
        let fail = |why: String| CalibrateError::Observe { tensor: self.name.clone(), why };
        let cast = value.cast_to::<f32>().map_err(|e| fail(format!("not numeric: {e}")))?;
        let view = cast.to_plain_array_view::<f32>().map_err(|e| fail(e.to_string()))?;
        let k = value.shape().last().copied().unwrap_or(1);
        let values = view.as_slice().ok_or_else(|| fail("not contiguous".into()))?;
        let rows = values.len().checked_div(k).unwrap_or(0);
        if self.rows == 0 && self.features() == 0 {
            self.xtx = Mat::zeros(k, k);
        } else if self.features() != k {
            return Err(fail(format!("last axis has {k} features, earlier batches had {}", self.features())));
        }
        if let Some(keep) = keep {
            if keep.len() != rows {
                return Err(fail(format!("{rows} rows but a mask of {}", keep.len())));
            }
        }
        let kept: Vec<usize> = (0..rows).filter(|&r| keep.is_none_or(|m| m[r])).collect();
        if kept.is_empty() {
            return Ok(());
        }
        let x = Mat::<f64>::from_fn(kept.len(), k, |i, j| values[kept[i] * k + j] as f64);
        faer::linalg::matmul::matmul(self.xtx.as_mut(), Accum::Add, x.transpose(), x.as_ref(), 1.0, Par::rayon(0));
        self.rows += kept.len() as u64;
        Ok(())
    }

    /// Each feature's squared norm over the rows seen (the diagonal).
    pub fn squared_norms(&self) -> Vec<f64> {
        (0..self.features()).map(|j| self.xtx[(j, j)]).collect()
    }
}
