//! Graph-to-graph passes. Each takes a model (plus data where needed) and returns a new model
//! and a report; passes compose in any order and the result can be exported at any point.

pub mod fold_batchnorm;
pub mod fold_constants;
pub mod infer_shapes;
pub mod quantize;
pub mod remove_identity;

pub use fold_batchnorm::fold_batchnorm;
pub use fold_constants::{fold_constants, fold_shapes};
pub use infer_shapes::infer_shapes;
pub use remove_identity::remove_identities;

use crate::error::Result;
use crate::ir::Model;

/// What a pass did, for the user-facing report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PassReport {
    pub pass: String,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub notes: Vec<String>,
}

impl PassReport {
    pub fn new(pass: &str, nodes_before: usize, nodes_after: usize) -> PassReport {
        PassReport {
            pass: pass.to_string(),
            nodes_before,
            nodes_after,
            notes: Vec::new(),
        }
    }

    pub fn note(mut self, text: String) -> PassReport {
        self.notes.push(text);
        self
    }
}

/// The standard clean-up every other optimization starts from: constants folded, pass-through
/// nodes removed, BatchNormalization folded into its producer.
pub fn simplify(model: &Model) -> Result<(Model, Vec<PassReport>)> {
    let (m, r1) = fold_constants(model)?;
    let (m, r2) = remove_identities(&m)?;
    let (m, r3) = fold_batchnorm(&m)?;
    Ok((m, vec![r1, r2, r3]))
}
