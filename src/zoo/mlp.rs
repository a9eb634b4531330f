//! Fully connected classifiers on flattened images.

use super::builder::{Builder, Init};
use super::ZooConfig;
use crate::error::Result;
use crate::ir::Model;

/// `input -> flatten -> [dense -> ReLU] per hidden width -> dense`. With
/// `dropout = Some((input_ratio, hidden_ratio))`, dropout follows the input and every hidden
/// layer, as in Srivastava et al. and Hinton's distillation teacher.
pub fn mlp(
    name: &str,
    cfg: &ZooConfig,
    hidden: &[usize],
    dropout: Option<(f32, f32)>,
) -> Result<Model> {
    let mut b = Builder::new(name, &cfg.input, cfg.seed);
    let input = b.input();
    let mut x = b.flatten(&input)?;
    if let Some((r, _)) = dropout {
        x = b.dropout(&x, r)?;
    }
    for &width in hidden {
        x = b.dense(&x, width, Init::He)?;
        x = b.relu(&x)?;
        if let Some((_, r)) = dropout {
            x = b.dropout(&x, r)?;
        }
    }
    let logits = b.dense(&x, cfg.classes, Init::Glorot)?;
    b.finish(&logits)
}
