//! Samples for models with several inputs (a transformer's token ids, attention mask and
//! segment ids): an `.npz` holding one array per model input, named after the input, samples
//! along the first axis. Such a set feeds calibration and sensitivity passes by input name;
//! it has no images and no labels.

use std::path::Path;

use super::dataset::{clamp_range, BatchSource};
use super::npz::NpzArchive;
use super::preprocess::Preprocess;
use crate::error::{Error, Result};
use crate::ir::Tensor;

pub struct NamedInputs {
    name: String,
    arrays: Vec<(String, Tensor)>,
    names: Vec<String>,
    len: usize,
}

impl NamedInputs {
    /// Every array of the archive, which must all hold the same number of samples.
    pub fn open(path: &Path) -> Result<NamedInputs> {
        let err = |msg: String| Error::Data(format!("{}: {msg}", path.display()));
        let mut archive = NpzArchive::open(path)?;
        let names: Vec<String> = archive.names().map(str::to_string).collect();
        if names.is_empty() {
            return Err(err("the archive holds no arrays".into()));
        }
        let mut arrays = Vec::with_capacity(names.len());
        let mut len = None;
        for name in &names {
            let t = archive.read(name)?;
            let n = *t.shape().first().ok_or_else(|| {
                err(format!(
                    "'{name}' is a scalar; every array needs the samples along its first axis"
                ))
            })?;
            match len {
                None => len = Some((n, name.clone())),
                Some((m, ref first)) if m != n => {
                    return Err(err(format!(
                        "'{name}' holds {n} samples but '{first}' holds {m}: every array needs the same number"
                    )))
                }
                Some(_) => {}
            }
            arrays.push((name.clone(), t));
        }
        Ok(NamedInputs {
            name: format!("{} ({})", path.display(), names.join(", ")),
            arrays,
            names,
            len: len.map_or(0, |(n, _)| n),
        })
    }
}

impl BatchSource for NamedInputs {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> usize {
        self.len
    }

    fn sample_shape(&self) -> Option<Vec<usize>> {
        None
    }

    fn preprocess(&self) -> Option<&Preprocess> {
        None
    }

    fn batch(&self, _start: usize, _count: usize) -> Result<(Tensor, Vec<i64>)> {
        Err(Error::Data(format!(
            "{} holds one array per model input and no labels: it serves calibration, not a single-input model or an evaluation",
            self.name
        )))
    }

    fn input_names(&self) -> Option<&[String]> {
        Some(&self.names)
    }

    fn named_batch(&self, start: usize, count: usize) -> Result<Vec<(String, Tensor)>> {
        let (s, e) = clamp_range(start, count, self.len, &self.name)?;
        self.arrays
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.rows(s, e)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::npz::write_npz;
    use crate::data::test_util::TempDir;
    use crate::ir::TensorData;

    fn ids(n: usize, seq: usize) -> Tensor {
        Tensor::new(
            vec![n, seq],
            TensorData::I64((0..(n * seq) as i64).collect()),
        )
        .unwrap()
    }

    #[test]
    fn batches_slice_every_array_by_sample() {
        let dir = TempDir::new("named");
        let p = dir.path("tokens.npz");
        let mask = Tensor::new(vec![3, 2], TensorData::I64(vec![1; 6])).unwrap();
        write_npz(
            &p,
            &[
                ("input_ids".into(), ids(3, 2)),
                ("attention_mask".into(), mask),
            ],
        )
        .unwrap();
        let set = NamedInputs::open(&p).unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(
            set.input_names().unwrap(),
            &["input_ids".to_string(), "attention_mask".to_string()]
        );
        let b = set.named_batch(1, 5).unwrap();
        assert_eq!(b[0].0, "input_ids");
        assert_eq!(b[0].1.shape(), &[2, 2]);
        assert_eq!(b[0].1.as_i64().unwrap(), &[2, 3, 4, 5]);
        assert_eq!(b[1].1.shape(), &[2, 2]);
        assert!(set.batch(0, 1).is_err());
        assert!(set.named_batch(4, 1).is_err());
    }

    #[test]
    fn arrays_of_different_lengths_are_an_error() {
        let dir = TempDir::new("named-bad");
        let p = dir.path("tokens.npz");
        write_npz(
            &p,
            &[
                ("input_ids".into(), ids(3, 2)),
                ("attention_mask".into(), ids(2, 2)),
            ],
        )
        .unwrap();
        let e = NamedInputs::open(&p).err().unwrap().to_string();
        assert!(
            e.contains("'attention_mask' holds 2 samples but 'input_ids' holds 3"),
            "{e}"
        );
    }
}
