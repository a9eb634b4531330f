use super::OpDef;

pub const OPS: &[OpDef] = &[];
