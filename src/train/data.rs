//! Training data: a labelled set held in memory with random access, seeded shuffling into
//! mini-batches, image augmentation (random shifts, horizontal flips) and a producer thread
//! that prepares the next batches while the current one trains.
//!
//! IDX sets (MNIST, Fashion-MNIST) stay as raw 8-bit pixels and are augmented before
//! normalisation, with black (0) filling what a shift uncovers. Other sources are loaded as
//! preprocessed f32; a shift there fills with each channel's smallest value over the set
//! (the normalised black of natural images).

use std::str::FromStr;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::rng::{derive_seed, Rng};
use crate::data::dataset::{open_dataset, BatchSource, IdxDataset, Split};
use crate::data::preprocess::Preprocess;
use crate::error::{Error, Result};
use crate::ir::{Tensor, TensorData};

/// Random image augmentation applied per sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Augment {
    /// Shift by up to this many pixels in each direction (0: none).
    pub shift: usize,
    /// Mirror left-right with probability 1/2 (not for digits).
    pub flip: bool,
}

impl Augment {
    pub fn is_none(&self) -> bool {
        self.shift == 0 && !self.flip
    }
}

impl FromStr for Augment {
    type Err = Error;
    /// `none`, or a comma-separated list of `shift=N` and `flip`.
    fn from_str(s: &str) -> Result<Augment> {
        let mut a = Augment::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item {
                "none" => {}
                "flip" | "hflip" => a.flip = true,
                _ => {
                    let n = item
                        .strip_prefix("shift=")
                        .and_then(|v| v.parse::<usize>().ok())
                        .filter(|&n| n <= 64)
                        .ok_or_else(|| {
                            Error::Data(format!(
                                "augmentation '{item}': expected none, flip or shift=N (N <= 64)"
                            ))
                        })?;
                    a.shift = n;
                }
            }
        }
        Ok(a)
    }
}

enum Samples {
    /// Raw 8-bit gray images `[N, rows, cols]`, preprocessed per batch.
    Gray8 {
        pixels: Vec<u8>,
        rows: usize,
        cols: usize,
        preprocess: Preprocess,
    },
    /// Preprocessed `[N, ...sample_shape]`; `fill` per channel for shifted-in pixels.
    F32 { data: Vec<f32>, fill: Vec<f32> },
}

/// A labelled set in memory.
pub struct TrainSet {
    name: String,
    samples: Samples,
    sample_shape: Vec<usize>,
    labels: Vec<i64>,
    preprocess: Option<Preprocess>,
}

impl TrainSet {
    /// Opens `spec` as [`open_dataset`] does (`mnist`, `fashion-mnist`, an `.npz`, an image
    /// directory) and loads it, keeping IDX sets as raw pixels.
    pub fn open(spec: &str, split: Split, preprocess: Option<&Preprocess>) -> Result<TrainSet> {
        match spec.to_ascii_lowercase().as_str() {
            "mnist" => TrainSet::from_idx(&IdxDataset::mnist(split, preprocess.cloned())?),
            "fashion-mnist" | "fashion_mnist" | "fashionmnist" => {
                TrainSet::from_idx(&IdxDataset::fashion_mnist(split, preprocess.cloned())?)
            }
            _ => TrainSet::from_source(open_dataset(spec, split, preprocess)?.as_ref()),
        }
    }

    /// An IDX set as raw pixels plus its preprocessing.
    pub fn from_idx(ds: &IdxDataset) -> Result<TrainSet> {
        let raw = ds.raw_images(0, ds.len())?;
        let (shape, data) = raw.into_parts();
        let TensorData::U8(pixels) = data else {
            return Err(Error::Data(format!("{}: images are not 8-bit", ds.name())));
        };
        let preprocess = ds
            .preprocess()
            .cloned()
            .ok_or_else(|| Error::Data(format!("{}: no preprocessing", ds.name())))?;
        Ok(TrainSet {
            name: ds.name().to_string(),
            sample_shape: ds.sample_shape().unwrap_or_default(),
            labels: ds.labels().to_vec(),
            samples: Samples::Gray8 {
                pixels,
                rows: shape[1],
                cols: shape[2],
                preprocess: preprocess.clone(),
            },
            preprocess: Some(preprocess),
        })
    }

    /// Every sample of `source`, preprocessed, in memory.
    pub fn from_source(source: &dyn BatchSource) -> Result<TrainSet> {
        let (x, labels) = source.batch(0, source.len())?;
        TrainSet::from_tensor(source.name(), x, labels, source.preprocess().cloned())
    }

    /// Samples `[N, ...]` (f32) with one label each.
    pub fn from_tensor(
        name: &str,
        x: Tensor,
        labels: Vec<i64>,
        preprocess: Option<Preprocess>,
    ) -> Result<TrainSet> {
        let shape = x.shape().to_vec();
        if shape.first() != Some(&labels.len()) {
            return Err(Error::Data(format!(
                "{name}: {} labels for samples of shape {shape:?}",
                labels.len()
            )));
        }
        let data = x
            .as_f32()
            .map_err(|e| Error::Data(format!("{name}: {e}")))?
            .to_vec();
        let sample_shape = shape[1..].to_vec();
        // Per-channel minimum of [N, C, ...] samples.
        let channels = sample_shape.first().copied().unwrap_or(1).max(1);
        let plane: usize = sample_shape.iter().skip(1).product();
        let mut fill = vec![f32::INFINITY; channels];
        if plane > 0 && sample_shape.len() >= 2 {
            for (i, chunk) in data.chunks_exact(plane).enumerate() {
                let c = i % channels;
                fill[c] = chunk.iter().fold(fill[c], |m, &v| m.min(v));
            }
        }
        fill.iter_mut()
            .filter(|f| !f.is_finite())
            .for_each(|f| *f = 0.0);
        Ok(TrainSet {
            name: name.to_string(),
            samples: Samples::F32 { data, fill },
            sample_shape,
            labels,
            preprocess,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Shape of one preprocessed sample, e.g. `[1, 28, 28]`.
    pub fn sample_shape(&self) -> &[usize] {
        &self.sample_shape
    }

    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    pub fn preprocess(&self) -> Option<&Preprocess> {
        self.preprocess.as_ref()
    }

    /// Keeps the first `n` samples.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.len() {
            return;
        }
        self.labels.truncate(n);
        let per = match &self.samples {
            Samples::Gray8 { rows, cols, .. } => rows * cols,
            Samples::F32 { .. } => self.sample_shape.iter().product(),
        };
        match &mut self.samples {
            Samples::Gray8 { pixels, .. } => pixels.truncate(n * per),
            Samples::F32 { data, .. } => data.truncate(n * per),
        }
    }

    /// The samples at `indices`, augmented with `rng`, as `[B, ...sample_shape]` and labels.
    pub fn gather(
        &self,
        indices: &[usize],
        aug: Augment,
        rng: &mut Rng,
    ) -> Result<(Tensor, Vec<i64>)> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::Data(format!(
                "{}: sample {bad} is past the {} samples",
                self.name,
                self.len()
            )));
        }
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        let x = match &self.samples {
            Samples::Gray8 {
                pixels,
                rows,
                cols,
                preprocess,
            } => {
                let (r, c) = (*rows, *cols);
                let mut out = vec![0u8; indices.len() * r * c];
                for (dst, &i) in out.chunks_exact_mut(r * c).zip(indices) {
                    let src = &pixels[i * r * c..(i + 1) * r * c];
                    augment_plane(src, dst, (r, c), draw(aug, rng), 0u8);
                }
                preprocess.apply_gray_u8(&Tensor::new(
                    vec![indices.len(), r, c],
                    TensorData::U8(out),
                )?)?
            }
            Samples::F32 { data, fill } => {
                let per: usize = self.sample_shape.iter().product();
                let mut out = vec![0.0f32; indices.len() * per];
                let spatial = self.sample_shape.len() >= 3;
                for (dst, &i) in out.chunks_exact_mut(per.max(1)).zip(indices) {
                    let src = &data[i * per..(i + 1) * per];
                    if spatial && !aug.is_none() {
                        let (h, w) = (self.sample_shape[1], self.sample_shape[2]);
                        let rest: usize = self.sample_shape[3..].iter().product();
                        let moves = draw(aug, rng);
                        for (c, (s, d)) in src
                            .chunks_exact(h * w * rest)
                            .zip(dst.chunks_exact_mut(h * w * rest))
                            .enumerate()
                        {
                            let f = fill.get(c).copied().unwrap_or(0.0);
                            augment_plane(s, d, (h, w * rest), moves, f);
                        }
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
                let mut shape = vec![indices.len()];
                shape.extend_from_slice(&self.sample_shape);
                Tensor::from_f32(shape, out)?
            }
        };
        Ok((x, labels))
    }
}

/// `(dy, dx, flip)` for one sample.
fn draw(aug: Augment, rng: &mut Rng) -> (isize, isize, bool) {
    let s = aug.shift;
    let shift = |rng: &mut Rng| {
        if s == 0 {
            0
        } else {
            rng.below(2 * s + 1) as isize - s as isize
        }
    };
    let dy = shift(rng);
    let dx = shift(rng);
    let flip = aug.flip && rng.below(2) == 1;
    (dy, dx, flip)
}

/// Copies an `h x w` plane shifted by `(dy, dx)` (content moves down/right for positive
/// values) and optionally mirrored, filling uncovered pixels with `fill`.
fn augment_plane<T: Copy>(
    src: &[T],
    dst: &mut [T],
    (h, w): (usize, usize),
    (dy, dx, flip): (isize, isize, bool),
    fill: T,
) {
    if (dy, dx, flip) == (0, 0, false) {
        dst.copy_from_slice(src);
        return;
    }
    for y in 0..h {
        let sy = y as isize - dy;
        let row = &mut dst[y * w..(y + 1) * w];
        if sy < 0 || sy >= h as isize {
            row.fill(fill);
            continue;
        }
        let srow = &src[sy as usize * w..(sy as usize + 1) * w];
        for (x, d) in row.iter_mut().enumerate() {
            let xx = if flip { w - 1 - x } else { x };
            let sx = xx as isize - dx;
            *d = if sx < 0 || sx >= w as isize {
                fill
            } else {
                srow[sx as usize]
            };
        }
    }
}

/// One mini-batch of an epoch.
pub struct Batch {
    pub x: Tensor,
    pub labels: Vec<i64>,
    /// Position of this batch in the epoch.
    pub index: usize,
}

/// How an epoch is cut into batches.
#[derive(Clone, Copy, Debug)]
pub struct EpochPlan {
    pub batch: usize,
    pub seed: u64,
    pub epoch: usize,
    pub shuffle: bool,
    pub augment: Augment,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
}

impl EpochPlan {
    /// The sample order of this epoch: a seeded permutation (or the identity).
    pub fn order(&self, len: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..len).collect();
        if self.shuffle {
            Rng::derive(self.seed, self.epoch as u64, 0x5348_5546).shuffle(&mut order);
        }
        order
    }

    pub fn batches(&self, len: usize) -> usize {
        len.div_ceil(self.batch.max(1))
    }
}

/// The batches of one epoch, produced on a background thread `prefetch` batches ahead.
pub struct EpochLoader {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
}

impl EpochLoader {
    pub fn new(set: Arc<TrainSet>, plan: EpochPlan) -> EpochLoader {
        let (tx, rx) = sync_channel(plan.prefetch.max(1));
        let handle = std::thread::spawn(move || {
            let order = plan.order(set.len());
            for (b, idx) in order.chunks(plan.batch.max(1)).enumerate() {
                let mut rng = Rng::new(derive_seed(
                    plan.seed ^ 0x4155_4755,
                    plan.epoch as u64,
                    b as u64,
                ));
                let item = set
                    .gather(idx, plan.augment, &mut rng)
                    .map(|(x, labels)| Batch {
                        x,
                        labels,
                        index: b,
                    });
                let failed = item.is_err();
                // A closed channel means the consumer stopped early.
                if tx.send(item).is_err() || failed {
                    return;
                }
            }
        });
        EpochLoader {
            rx: Some(rx),
            handle: Some(handle),
        }
    }
}

impl Iterator for EpochLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for EpochLoader {
    fn drop(&mut self) {
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TrainSet {
        let x = Tensor::from_f32(vec![5, 1, 2, 3], (0..30).map(|v| v as f32).collect()).unwrap();
        TrainSet::from_tensor("tiny", x, vec![0, 1, 2, 3, 4], None).unwrap()
    }

    #[test]
    fn shifts_and_flips() {
        let src: Vec<u8> = (1..=9).collect();
        let mut dst = vec![0u8; 9];
        augment_plane(&src, &mut dst, (3, 3), (1, 0, false), 0);
        assert_eq!(dst, vec![0, 0, 0, 1, 2, 3, 4, 5, 6]);
        augment_plane(&src, &mut dst, (3, 3), (0, -1, false), 0);
        assert_eq!(dst, vec![2, 3, 0, 5, 6, 0, 8, 9, 0]);
        augment_plane(&src, &mut dst, (3, 3), (0, 0, true), 0);
        assert_eq!(dst, vec![3, 2, 1, 6, 5, 4, 9, 8, 7]);
        assert_eq!(
            "shift=2,flip".parse::<Augment>().unwrap(),
            Augment {
                shift: 2,
                flip: true
            }
        );
        assert!("rotate".parse::<Augment>().is_err());
    }

    #[test]
    fn epochs_cover_every_sample_in_a_seeded_order() {
        let set = Arc::new(tiny());
        let plan = EpochPlan {
            batch: 2,
            seed: 3,
            epoch: 0,
            shuffle: true,
            augment: Augment::default(),
            prefetch: 2,
        };
        let labels = |p: EpochPlan| -> Vec<i64> {
            EpochLoader::new(set.clone(), p)
                .flat_map(|b| b.unwrap().labels)
                .collect()
        };
        let a = labels(plan);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        assert_eq!(a, labels(plan));
        assert_ne!(a, labels(EpochPlan { epoch: 1, ..plan }));
        // Samples travel with their labels.
        let mut rng = Rng::new(0);
        let (x, l) = set.gather(&[3, 1], Augment::default(), &mut rng).unwrap();
        assert_eq!(l, vec![3, 1]);
        assert_eq!(x.as_f32().unwrap()[0], 18.0);
        assert!(set.gather(&[5], Augment::default(), &mut rng).is_err());
        // A stopped consumer does not hang the producer.
        let mut early = EpochLoader::new(
            set.clone(),
            EpochPlan {
                batch: 1,
                prefetch: 1,
                ..plan
            },
        );
        assert!(early.next().is_some());
        drop(early);
    }

    #[test]
    fn mnist_raw_pixels_with_augmentation() {
        let Ok(ds) = IdxDataset::mnist(Split::Test, None) else {
            eprintln!("MNIST not found; skipping");
            return;
        };
        let set = TrainSet::from_idx(&ds).unwrap();
        assert_eq!(set.sample_shape(), &[1, 28, 28]);
        let mut rng = Rng::new(1);
        let (plain, _) = set.gather(&[0, 1], Augment::default(), &mut rng).unwrap();
        let (want, _) = ds.batch(0, 2).unwrap();
        assert_eq!(plain, want);
        let (moved, _) = set
            .gather(
                &[0, 1],
                Augment {
                    shift: 2,
                    flip: false,
                },
                &mut rng,
            )
            .unwrap();
        assert_eq!(moved.shape(), &[2, 1, 28, 28]);
        assert_ne!(moved, want);
    }
}
