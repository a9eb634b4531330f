//! Classification accuracy of a model over a labelled batch source.

use serde::Serialize;

use crate::data::dataset::BatchSource;
use crate::error::{Error, Result};
use crate::ir::Tensor;
use crate::runtime::Session;

#[derive(Clone, Debug, Serialize)]
pub struct Accuracy {
    pub samples: usize,
    pub top1: f64,
    pub top5: f64,
    /// Predicted class (top-1) of every sample, in order, so two models can be compared.
    #[serde(skip)]
    pub predictions: Vec<usize>,
}

/// Runs `session` over `source` in batches of `batch` (at most `limit` samples) and counts
/// top-1 and top-5 hits on the first output, read as `[N, classes]` scores.
pub fn evaluate(
    session: &Session,
    source: &dyn BatchSource,
    batch: usize,
    limit: Option<usize>,
    mut on_batch: impl FnMut(usize),
) -> Result<Accuracy> {
    let total = limit.map_or(source.len(), |l| l.min(source.len()));
    if total == 0 {
        return Err(Error::Data("the data set is empty".into()));
    }
    let input = session
        .input_names()
        .first()
        .map(|s| s.to_string())
        .ok_or_else(|| Error::Graph("the model has no inputs".into()))?;
    let (mut top1, mut top5) = (0usize, 0usize);
    let mut predictions = Vec::with_capacity(total);
    let mut start = 0;
    while start < total {
        let count = batch.max(1).min(total - start);
        let (images, labels) = source.batch(start, count)?;
        let outputs = session.run(&[(input.as_str(), images)])?;
        let scores = &outputs
            .first()
            .ok_or_else(|| Error::Graph("the model has no outputs".into()))?
            .1;
        let ranked = rank(scores, labels.len())?;
        for (order, &label) in ranked.iter().zip(&labels) {
            predictions.push(order[0]);
            let position = order.iter().position(|&c| c as i64 == label);
            top1 += (position == Some(0)) as usize;
            top5 += position.is_some_and(|p| p < 5) as usize;
        }
        start += count;
        on_batch(count);
    }
    Ok(Accuracy {
        samples: total,
        top1: top1 as f64 / total as f64,
        top5: top5 as f64 / total as f64,
        predictions,
    })
}

/// Per sample, class indices ordered by descending score.
fn rank(scores: &Tensor, n: usize) -> Result<Vec<Vec<usize>>> {
    let values = scores.to_f32_vec();
    if n == 0 || !values.len().is_multiple_of(n) {
        return Err(Error::Shape(format!(
            "model output {:?} cannot be read as scores for {n} samples",
            scores.shape()
        )));
    }
    let classes = values.len() / n;
    Ok(values
        .chunks(classes)
        .map(|row| {
            let mut idx: Vec<usize> = (0..classes).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            idx
        })
        .collect())
}
