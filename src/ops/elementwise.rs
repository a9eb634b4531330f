//! Elementwise ops: broadcasting arithmetic, comparisons and logic, pointwise math, casts,
//! softmax, and the pass-through ops. Each family lives in its own submodule; this module
//! is the registry. Opset ranges start where the current semantics begin (e.g. Add at 7,
//! when multidirectional broadcasting replaced the `broadcast`/`axis` attributes).

mod binary;
mod cast;
mod logic;
mod passthrough;
mod softmax;
mod unary;

pub use binary::{arith, pow, Arith};
pub use cast::cast;
pub use logic::select;

use super::{CompileFn, InferFn, OpDef};

/// Newest opset checked against the ONNX schemas: later versions only add dtypes lithe
/// does not store (bfloat16, float8, int4, ...) or clarify edge cases we already follow.
const LATEST: i64 = 28;

const fn def(op_type: &'static str, since: i64, infer: InferFn, compile: CompileFn) -> OpDef {
    OpDef {
        op_type,
        domain: "",
        opsets: (since, LATEST),
        infer,
        compile,
        fuses_activation: false,
    }
}

const fn arith_op(op_type: &'static str, since: i64) -> OpDef {
    def(op_type, since, binary::infer, binary::compile)
}

const fn variadic(op_type: &'static str) -> OpDef {
    def(op_type, 6, binary::infer_variadic, binary::compile_variadic)
}

const fn logic_op(op_type: &'static str, since: i64) -> OpDef {
    def(op_type, since, logic::infer, logic::compile)
}

const fn unary_op(op_type: &'static str, since: i64) -> OpDef {
    def(op_type, since, unary::infer, unary::compile)
}

pub const OPS: &[OpDef] = &[
    arith_op("Add", 7),
    arith_op("Sub", 7),
    arith_op("Mul", 7),
    arith_op("Div", 7),
    arith_op("Pow", 7),
    arith_op("Mod", 10),
    variadic("Max"),
    variadic("Min"),
    variadic("Sum"),
    variadic("Mean"),
    logic_op("Equal", 7),
    logic_op("Less", 7),
    logic_op("Greater", 7),
    logic_op("LessOrEqual", 12),
    logic_op("GreaterOrEqual", 12),
    logic_op("And", 7),
    logic_op("Or", 7),
    logic_op("Xor", 7),
    logic_op("Not", 1),
    logic_op("Where", 9),
    unary_op("Sqrt", 1),
    unary_op("Exp", 1),
    unary_op("Log", 1),
    unary_op("Erf", 9),
    unary_op("Reciprocal", 1),
    unary_op("Floor", 1),
    unary_op("Ceil", 1),
    unary_op("Round", 11),
    unary_op("Sin", 7),
    unary_op("Cos", 7),
    unary_op("Tan", 7),
    unary_op("Neg", 1),
    unary_op("Abs", 1),
    unary_op("Sign", 9),
    unary_op("IsNaN", 9),
    unary_op("IsInf", 10),
    def("Cast", 6, cast::infer, cast::compile),
    def("CastLike", 15, cast::infer, cast::compile),
    def("Softmax", 1, softmax::infer, softmax::compile),
    def("LogSoftmax", 1, softmax::infer, softmax::compile),
    def(
        "Identity",
        1,
        passthrough::infer_identity,
        passthrough::compile_identity,
    ),
    def(
        "Dropout",
        1,
        passthrough::infer_dropout,
        passthrough::compile_dropout,
    ),
];
