//! Executes an IR graph on the CPU.

pub mod plan;
mod pointwise;
pub mod qdq_products;
pub mod qfuse;
pub mod session;

pub use plan::PlanOptions;
pub use session::{Session, SessionOptions, StepTiming};
