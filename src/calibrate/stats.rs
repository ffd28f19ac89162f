//! Streaming statistics of one tensor over calibration batches, in bounded
//! memory: each batch is folded in and dropped.

use super::CalibrateError;
use serde::Serialize;
use tract_onnx::prelude::Tensor;

/// Bins of every [`Histogram`]: fine enough that a percentile of a unimodal
/// activation lands within 0.05% of its range.
pub const HISTOGRAM_BINS: usize = 2048;

/// A fixed number of equal bins over a range that grows as values arrive: when a
/// value falls outside, the bin width doubles (adjacent bins merge pairwise, so
/// no count moves across an edge) until it fits. Single pass; the price is that
/// the final resolution is set by the widest range seen, up to twice coarser
/// than a second pass over the final range would give.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Histogram {
    /// Left edge of the first bin.
    pub low: f64,
    pub bin_width: f64,
    pub counts: Vec<u64>,
}

impl Histogram {
    /// Bins over `[low, high]`; a zero-width range gets a small one around it.
    fn covering(low: f64, high: f64) -> Histogram {
        let span = (high - low).max(1e-6 * low.abs().max(high.abs()).max(1.0));
        Histogram { low, bin_width: span / HISTOGRAM_BINS as f64, counts: vec![0; HISTOGRAM_BINS] }
    }

    pub fn high(&self) -> f64 {
        self.low + self.bin_width * HISTOGRAM_BINS as f64
    }

    /// Doubles the bin width, keeping the left edge (`grow_left == false`) or the
    /// right edge, until `[low, high]` fits.
    fn cover(&mut self, low: f64, high: f64) {
        while low < self.low || high > self.high() {
            let grow_left = low < self.low;
            let right = self.high();
            let mut merged = vec![0; HISTOGRAM_BINS];
            let offset = if grow_left { HISTOGRAM_BINS / 2 } else { 0 };
            for (i, &c) in self.counts.iter().enumerate() {
                merged[offset + i / 2] += c;
            }
            self.counts = merged;
            self.bin_width *= 2.0;
            if grow_left {
                self.low = right - self.bin_width * HISTOGRAM_BINS as f64;
            }
        }
    }

    fn add(&mut self, x: f64) {
        let bin = ((x - self.low) / self.bin_width) as usize;
        self.counts[bin.min(HISTOGRAM_BINS - 1)] += 1;
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The value below which a fraction `q` (0..=1) of the counts lie, linearly
    /// interpolated inside its bin.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let target = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0.0;
        for (i, &c) in self.counts.iter().enumerate() {
            let c = c as f64;
            if c > 0.0 && below + c >= target {
                let within = (target - below) / c;
                return Some(self.low + self.bin_width * (i as f64 + within));
            }
            below += c;
        }
        Some(self.high())
    }
}

/// Per-channel statistics over the last axis (hidden features of an activation).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ChannelStats {
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    pub mean_abs: Vec<f32>,
    #[serde(skip)]
    sum_abs: Vec<f64>,
    #[serde(skip)]
    counts: Vec<u64>,
}

impl ChannelStats {
    fn with_channels(n: usize) -> ChannelStats {
        ChannelStats { min: vec![f32::INFINITY; n], max: vec![f32::NEG_INFINITY; n], mean_abs: vec![0.0; n], sum_abs: vec![0.0; n], counts: vec![0; n] }
    }

    fn len(&self) -> usize {
        self.min.len()
    }
}

/// What calibration learnt about one tensor. Until a finite value is seen,
/// `min > max` and there is no histogram.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Stats {
    pub name: String,
    /// Finite values seen.
    pub count: u64,
    /// NaNs and infinities seen; they are left out of every other statistic.
    pub non_finite: u64,
    pub min: f32,
    pub max: f32,
    pub channels: ChannelStats,
    pub histogram: Option<Histogram>,
}

impl Stats {
    pub fn new(name: &str) -> Stats {
        Stats {
            name: name.to_string(),
            count: 0,
            non_finite: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            channels: ChannelStats::default(),
            histogram: None,
        }
    }

    /// Folds one batch of the tensor in. Its last axis must keep the size it had
    /// in earlier batches.
    pub fn observe(&mut self, value: &Tensor) -> Result<(), CalibrateError> {
        let fail = |why: String| CalibrateError::Observe { tensor: self.name.clone(), why };
        let cast = value.cast_to::<f32>().map_err(|e| fail(format!("not numeric: {e}")))?;
        let view = cast.to_plain_array_view::<f32>().map_err(|e| fail(e.to_string()))?;
        let channels = value.shape().last().copied().unwrap_or(1);
        if self.channels.len() == 0 {
            self.channels = ChannelStats::with_channels(channels);
        } else if self.channels.len() != channels {
            return Err(fail(format!("last axis has {channels} channels, earlier batches had {}", self.channels.len())));
        }
        if channels == 0 {
            return Ok(());
        }

        let (mut low, mut high) = (f32::INFINITY, f32::NEG_INFINITY);
        for (i, &x) in view.iter().enumerate() {
            if !x.is_finite() {
                self.non_finite += 1;
                continue;
            }
            low = low.min(x);
            high = high.max(x);
            let c = i % channels;
            let ch = &mut self.channels;
            ch.min[c] = ch.min[c].min(x);
            ch.max[c] = ch.max[c].max(x);
            ch.sum_abs[c] += x.abs() as f64;
            ch.counts[c] += 1;
        }
        if low > high {
            return Ok(()); // nothing finite in this batch
        }
        self.min = self.min.min(low);
        self.max = self.max.max(high);
        let histogram = self.histogram.get_or_insert_with(|| Histogram::covering(low as f64, high as f64));
        histogram.cover(low as f64, high as f64);
        for &x in view.iter().filter(|x| x.is_finite()) {
            histogram.add(x as f64);
            self.count += 1;
        }
        let ch = &mut self.channels;
        for c in 0..channels {
            ch.mean_abs[c] = if ch.counts[c] == 0 { 0.0 } else { (ch.sum_abs[c] / ch.counts[c] as f64) as f32 };
        }
        Ok(())
    }

    /// The value below which `percent` (0..=100) of the values lie, from the
    /// histogram, clamped to the exact min and max.
    pub fn percentile(&self, percent: f64) -> Option<f32> {
        let q = self.histogram.as_ref()?.quantile(percent / 100.0)?;
        Some((q as f32).clamp(self.min, self.max))
    }

    /// The range holding the central `percent` of the values, the rest split
    /// equally between both tails (99.99 leaves 0.005% below and above).
    pub fn percentile_range(&self, percent: f64) -> Option<(f32, f32)> {
        let tail = (100.0 - percent.clamp(0.0, 100.0)) / 2.0;
        Some((self.percentile(tail)?, self.percentile(100.0 - tail)?))
    }
}
