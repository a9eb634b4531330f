//! Helpers shared by the shape ops: reading integer inputs and attributes, normalising axes,
//! and arithmetic on symbolic dims.

use crate::error::{Error, Result};
use crate::ir::{Dim, Node, Tensor};
use crate::ops::{node_error, InferCtx};

/// The integer values of a constant input, if it is present and constant.
pub fn const_ints(ctx: &InferCtx, i: usize) -> Result<Option<Vec<i64>>> {
    match ctx.constant(i) {
        Some(t) => t
            .to_i64_vec()
            .map(Some)
            .map_err(|e| node_error(ctx.node, format!("input {i}: {e}"))),
        None => Ok(None),
    }
}

/// The integer values of an optional run-time input.
pub fn input_ints(inputs: &[Option<&Tensor>], i: usize) -> Result<Option<Vec<i64>>> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .map(Tensor::to_i64_vec)
        .transpose()
}

/// The length of 1-D input `i` when its shape is known (e.g. how many dims a shape tensor
/// holds), for rank inference when its values are not.
pub fn known_len(ctx: &InferCtx, i: usize) -> Option<usize> {
    let t = ctx.input_types.get(i)?.as_ref()?;
    match t.shape.as_deref()? {
        [Dim::Known(n)] => Some(*n),
        [] => Some(1),
        _ => None,
    }
}

/// Whether the node has input `i` (present and not omitted).
pub fn has_input(node: &Node, i: usize) -> bool {
    node.input(i).is_some()
}

/// Normalises `axis` in `[-rank, rank)`.
pub fn axis_in(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(Error::Shape(format!(
            "axis {axis} is out of range for rank {rank}"
        )));
    }
    Ok(a as usize)
}

/// Normalises a list of axes against `rank`, rejecting duplicates.
pub fn axes_in(axes: &[i64], rank: usize) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = axis_in(a, rank)?;
        if out.contains(&n) {
            return Err(Error::Shape(format!("axis {a} is repeated in {axes:?}")));
        }
        out.push(n);
    }
    Ok(out)
}

/// Product of symbolic dims: known when all are known, the one named dim when the rest are
/// 1, unknown otherwise.
pub fn dim_product(dims: &[Dim]) -> Dim {
    let mut known = 1usize;
    let mut named: Option<&Dim> = None;
    for d in dims {
        match d {
            Dim::Known(n) => known = known.saturating_mul(*n),
            Dim::Sym(_) if named.is_none() => named = Some(d),
            _ => return Dim::Unknown,
        }
    }
    match named {
        None => Dim::Known(known),
        Some(_) if known == 0 => Dim::Known(0),
        Some(d) if known == 1 => d.clone(),
        Some(_) => Dim::Unknown,
    }
}

/// Two descriptions of the same dim merged, keeping the most specific one.
pub fn unify(a: &Dim, b: &Dim) -> std::result::Result<Dim, String> {
    Ok(match (a, b) {
        (Dim::Known(x), Dim::Known(y)) if x != y => {
            return Err(format!("dims {x} and {y} must be equal"))
        }
        (Dim::Known(x), _) | (_, Dim::Known(x)) => Dim::Known(*x),
        (Dim::Sym(s), _) | (_, Dim::Sym(s)) => Dim::Sym(s.clone()),
        _ => Dim::Unknown,
    })
}

/// A concrete shape as dims.
pub fn known_dims(shape: &[usize]) -> Vec<Dim> {
    shape.iter().map(|&d| Dim::Known(d)).collect()
}

/// Converts non-negative i64 dims from a shape tensor.
pub fn to_dims(values: &[i64], what: &str) -> Result<Vec<usize>> {
    values
        .iter()
        .map(|&v| {
            usize::try_from(v).map_err(|_| Error::Shape(format!("{what} has negative dim {v}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolic_products() {
        let s = Dim::Sym("b".into());
        assert_eq!(dim_product(&[Dim::Known(2), Dim::Known(3)]), Dim::Known(6));
        assert_eq!(dim_product(&[Dim::Known(1), s.clone()]), s);
        assert_eq!(dim_product(&[Dim::Known(2), s.clone()]), Dim::Unknown);
        assert_eq!(dim_product(&[]), Dim::Known(1));
        assert_eq!(unify(&Dim::Unknown, &s).unwrap(), s);
        assert!(unify(&Dim::Known(2), &Dim::Known(3)).is_err());
    }

    #[test]
    fn axes_normalise_and_reject_repeats() {
        assert_eq!(axes_in(&[-1, 0], 3).unwrap(), vec![2, 0]);
        assert!(axes_in(&[1, -2], 3).is_err());
        assert!(axis_in(3, 3).is_err());
    }
}
