//! Pointwise math. On floats: `Sqrt`, `Exp`, `Log`, `Reciprocal`, `Floor`, `Ceil` (1-28),
//! `Erf` (9-28), `Round` (11-28, half to even), `Sin`, `Cos`, `Tan` (7-28). On every numeric
//! type: `Neg`, `Abs` (1-28), `Sign` (9-28). Float in, bool out: `IsNaN` (9-28), `IsInf`
//! (10-28). f16 computes in f32.

use crate::error::{Error, Result};
use crate::ir::{DType, Tensor, TensorData, TypeInfo};
use crate::ops::broadcast::{
    map_chunks, map_into, PAR_MIN_COMPUTE as COMPUTE, PAR_MIN_MEMORY as MEMORY,
};
use crate::ops::typed::{
    run_widening_f16, tensor, view, with_float_type, with_num_type, Elem, Float, Num,
};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unary {
    Sqrt,
    Exp,
    Log,
    Erf,
    Reciprocal,
    Floor,
    Ceil,
    Round,
    Sin,
    Cos,
    Tan,
    Neg,
    Abs,
    Sign,
}

impl Unary {
    fn float_only(self) -> bool {
        !matches!(self, Unary::Neg | Unary::Abs | Unary::Sign)
    }
}

fn apply_float<T: Float>(op: Unary, x: &[T], out: &mut [T]) {
    match op {
        Unary::Sqrt => map_into(x, out, MEMORY, <T as Float>::sqrt),
        Unary::Exp => map_into(x, out, COMPUTE, <T as Float>::exp),
        Unary::Log => map_into(x, out, COMPUTE, <T as Float>::ln),
        Unary::Erf => map_chunks(x, out, COMPUTE, T::erf_slice),
        Unary::Reciprocal => map_into(x, out, MEMORY, |v: T| T::ONE.div(v)),
        Unary::Floor => map_into(x, out, MEMORY, <T as Float>::floor),
        Unary::Ceil => map_into(x, out, MEMORY, <T as Float>::ceil),
        Unary::Round => map_into(x, out, MEMORY, <T as Float>::round_even),
        Unary::Sin => map_into(x, out, COMPUTE, <T as Float>::sin),
        Unary::Cos => map_into(x, out, COMPUTE, <T as Float>::cos),
        Unary::Tan => map_into(x, out, COMPUTE, <T as Float>::tan),
        Unary::Neg | Unary::Abs | Unary::Sign => apply_num(op, x, out),
    }
}

fn apply_num<T: Num>(op: Unary, x: &[T], out: &mut [T]) {
    match op {
        Unary::Neg => map_into(x, out, MEMORY, <T as Num>::neg),
        Unary::Abs => map_into(x, out, MEMORY, <T as Num>::abs),
        // NaN and zeros map to themselves.
        _ => map_into(x, out, MEMORY, |v: T| {
            if v > T::ZERO {
                T::ONE
            } else if v < T::ZERO {
                T::ZERO.sub(T::ONE)
            } else {
                v
            }
        }),
    }
}

fn unary(op: Unary, x: &Tensor, ctx: &mut RunCtx) -> Result<Tensor> {
    let dt = x.dtype();
    let unsupported = || Error::DType(format!("{op:?} does not support {dt}"));
    let shape = x.shape().to_vec();
    if op.float_only() {
        with_float_type!(
            dt,
            |T| {
                let mut out = T::filled(ctx, x.numel());
                apply_float::<T>(op, view::<T>(x)?, &mut out);
                tensor(shape, out)
            },
            else Err(unsupported())
        )
    } else {
        with_num_type!(
            dt,
            |T| {
                let mut out = T::filled(ctx, x.numel());
                apply_num::<T>(op, view::<T>(x)?, &mut out);
                tensor(shape, out)
            },
            else Err(unsupported())
        )
    }
}

struct UnaryKernel(Unary);

impl Kernel for UnaryKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        run_widening_f16(inputs, |inputs| {
            Ok(vec![unary(self.0, required(inputs, 0)?, ctx)?])
        })
    }
}

/// IsNaN, or IsInf with its sign filters.
struct Classify {
    nan: bool,
    neg_inf: bool,
    pos_inf: bool,
}

impl Kernel for Classify {
    fn run(&self, inputs: &[Option<&Tensor>], _ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let test = |v: f64| {
            (self.nan && v.is_nan())
                || (self.pos_inf && v == f64::INFINITY)
                || (self.neg_inf && v == f64::NEG_INFINITY)
        };
        let v: Vec<bool> = match x.data() {
            TensorData::F32(d) => d.iter().map(|&v| test(v as f64)).collect(),
            TensorData::F64(d) => d.iter().map(|&v| test(v)).collect(),
            TensorData::F16(d) => d.iter().map(|&v| test(Elem::to_f64(v))).collect(),
            other => {
                return Err(Error::DType(format!(
                    "expected a float tensor, got {}",
                    other.dtype()
                )))
            }
        };
        Ok(vec![Tensor::new(x.shape().to_vec(), TensorData::Bool(v))?])
    }
}

pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let t = ctx.input_type(0)?;
    let op = ctx.node.op_type.as_str();
    let numeric_ok = matches!(op, "Neg" | "Abs" | "Sign");
    if t.dtype == DType::Bool || (!numeric_ok && !t.dtype.is_float()) {
        return Err(node_error(
            ctx.node,
            format!("{} inputs are not supported", t.dtype),
        ));
    }
    if matches!(op, "IsNaN" | "IsInf") {
        return Ok(vec![TypeInfo {
            dtype: DType::Bool,
            shape: t.shape.clone(),
        }]);
    }
    Ok(vec![t.clone()])
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let node = ctx.node;
    let op = match node.op_type.as_str() {
        "Sqrt" => Unary::Sqrt,
        "Exp" => Unary::Exp,
        "Log" => Unary::Log,
        "Erf" => Unary::Erf,
        "Reciprocal" => Unary::Reciprocal,
        "Floor" => Unary::Floor,
        "Ceil" => Unary::Ceil,
        "Round" => Unary::Round,
        "Sin" => Unary::Sin,
        "Cos" => Unary::Cos,
        "Tan" => Unary::Tan,
        "Neg" => Unary::Neg,
        "Abs" => Unary::Abs,
        "Sign" => Unary::Sign,
        "IsNaN" => {
            return Ok(Box::new(Classify {
                nan: true,
                neg_inf: false,
                pos_inf: false,
            }))
        }
        "IsInf" => {
            return Ok(Box::new(Classify {
                nan: false,
                neg_inf: node.attr_int_or("detect_negative", 1)? != 0,
                pos_inf: node.attr_int_or("detect_positive", 1)? != 0,
            }))
        }
        other => return Err(node_error(node, format!("{other} is not a unary op"))),
    };
    Ok(Box::new(UnaryKernel(op)))
}

#[cfg(test)]
mod tests {
    use crate::ir::{Attr, TensorData};
    use crate::ops::testutil::*;

    fn un(op: &str, v: &[f32]) -> Vec<f32> {
        run_f32(op, 13, &[], vec![f32t(&[v.len()], v)]).1
    }

    #[test]
    fn float_functions() {
        assert_eq!(un("Sqrt", &[4., 0.25]), vec![2., 0.5]);
        assert_close(&un("Exp", &[0., 1.]), &[1., std::f32::consts::E], 1e-7);
        assert_close(&un("Log", &[1., std::f32::consts::E]), &[0., 1.], 1e-7);
        assert_eq!(un("Reciprocal", &[4., -0.5]), vec![0.25, -2.]);
        assert_eq!(un("Floor", &[-1.5, 1.5]), vec![-2., 1.]);
        assert_eq!(un("Ceil", &[-1.5, 1.5]), vec![-1., 2.]);
        assert_eq!(
            un("Round", &[0.5, 1.5, 2.5, -0.5, -1.7]),
            vec![0., 2., 2., -0., -2.]
        );
        assert_eq!(un("Neg", &[1., -2.]), vec![-1., 2.]);
        assert_eq!(un("Abs", &[-3., 2.]), vec![3., 2.]);
        let s = un("Sign", &[-3., 0., 2., f32::NAN]);
        assert_eq!(&s[..3], &[-1., 0., 1.]);
        assert!(s[3].is_nan());
        assert_close(&un("Sin", &[0.5]), &[0.5f32.sin()], 1e-7);
    }

    #[test]
    fn erf_is_accurate() {
        // A double-precision erf of each f32 input, rounded to f32: the results must match
        // exactly.
        let x = [-3.0f32, -0.5, 0.0, 1e-3, 0.3, 1.0, 2.0, 4.5];
        let want = [
            -0.9999778866767883f64,
            -0.5204998850822449,
            0.0,
            0.001128378789871931,
            0.3286267817020416,
            0.8427007794380188,
            0.9953222870826721,
            1.0,
        ];
        let want: Vec<f32> = want.iter().map(|&w| w as f32).collect();
        assert_eq!(un("Erf", &x), want);
    }

    #[test]
    fn integer_neg_abs_and_float_only_errors() {
        let out = run("Abs", 13, &[], vec![i64t(&[3], &[-4, 0, 5])], 1).unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[4, 0, 5]);
        let out = run("Neg", 13, &[], vec![i64t(&[1], &[7])], 1).unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[-7]);
        assert!(run("Sqrt", 13, &[], vec![i64t(&[1], &[4])], 1).is_err());
    }

    #[test]
    fn classification() {
        let x = f32t(&[4], &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0]);
        let out = run("IsNaN", 13, &[], vec![x.clone()], 1).unwrap();
        assert_eq!(
            out[0].data(),
            &TensorData::Bool(vec![true, false, false, false])
        );
        let out = run(
            "IsInf",
            13,
            &[("detect_negative", Attr::Int(0))],
            vec![x],
            1,
        )
        .unwrap();
        assert_eq!(
            out[0].data(),
            &TensorData::Bool(vec![false, true, false, false])
        );
    }
}
