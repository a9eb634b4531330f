//! `Pad` (2-28): `constant`, `reflect`, `edge` and `wrap` modes. Opset < 11 takes `pads` and
//! `value` as attributes; from 11 `pads` and `constant_value` are inputs, and from 18 an
//! `axes` input selects which dims `pads` refers to. Negative pads crop.

use super::common::{axes_in, const_ints, input_ints};
use super::strided::dense_strides;
use crate::error::{Error, Result};
use crate::ir::{checked_numel, Dim, Tensor, TypeInfo};
use crate::ops::typed::{cast_elem, tensor, view, with_any_type, Elem};
use crate::ops::{node_error, required, CompileCtx, InferCtx, Kernel, RunCtx};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

fn parse_mode(node: &crate::ir::Node) -> Result<Mode> {
    Ok(match node.attr_string("mode")?.unwrap_or("constant") {
        "constant" => Mode::Constant,
        "reflect" => Mode::Reflect,
        "edge" => Mode::Edge,
        "wrap" => Mode::Wrap,
        other => return Err(node_error(node, format!("unknown pad mode '{other}'"))),
    })
}

/// Per-dim (begin, end) pads from the flat `pads` list, spread over `axes` when given.
fn full_pads(rank: usize, pads: &[i64], axes: Option<&[i64]>) -> Result<Vec<(i64, i64)>> {
    let default_axes: Vec<i64> = (0..rank as i64).collect();
    let axes = axes.unwrap_or(&default_axes);
    let n = axes.len();
    if pads.len() != 2 * n {
        return Err(Error::Shape(format!(
            "pads {pads:?} should hold {} values for {n} axes",
            2 * n
        )));
    }
    let mut out = vec![(0i64, 0i64); rank];
    for (i, &a) in axes_in(axes, rank)?.iter().enumerate() {
        out[a] = (pads[i], pads[i + n]);
    }
    Ok(out)
}

/// Source index for each of the `out` output positions along one dim of `dim` elements
/// padded by `begin` in front ([`padded_len`] gives `out`); `None` is padding.
fn index_map(dim: usize, begin: i64, out: usize, mode: Mode) -> Result<Vec<Option<usize>>> {
    let out = out as i64;
    if dim == 0 && out > 0 && mode != Mode::Constant {
        return Err(Error::Shape(format!(
            "{mode:?} padding needs a non-empty dim"
        )));
    }
    let d = dim as i64;
    Ok((0..out)
        .map(|o| {
            let i = o - begin;
            if (0..d).contains(&i) {
                return Some(i as usize);
            }
            match mode {
                Mode::Constant => None,
                Mode::Edge => Some(i.clamp(0, d - 1) as usize),
                Mode::Wrap => Some(i.rem_euclid(d) as usize),
                Mode::Reflect if d == 1 => Some(0),
                Mode::Reflect => {
                    // Reflection without repeating the edge is periodic with period 2(d-1).
                    let p = 2 * (d - 1);
                    let m = i.rem_euclid(p);
                    Some(if m < d { m } else { p - m } as usize)
                }
            }
        })
        .collect())
}

/// Length of a dim of `dim` elements with `begin` and `end` added (negative pads remove).
fn padded_len(dim: usize, (begin, end): (i64, i64)) -> Result<usize> {
    let out = i64::try_from(dim)
        .ok()
        .and_then(|d| d.checked_add(begin)?.checked_add(end));
    match out {
        Some(o) if o >= 0 => usize::try_from(o)
            .map_err(|_| Error::Shape(format!("pads ({begin}, {end}) are too large"))),
        Some(_) => Err(Error::Shape(format!(
            "pads ({begin}, {end}) remove more than the {dim} elements of a dim"
        ))),
        None => Err(Error::Shape(format!("pads ({begin}, {end}) are too large"))),
    }
}

fn pad_typed<T: Elem>(
    x: &Tensor,
    pads: &[(i64, i64)],
    mode: Mode,
    fill: T,
    ctx: &mut RunCtx,
) -> Result<Tensor> {
    // The output's size is checked before the per-dim index maps are built: pads come from
    // the file, and one huge dim of an otherwise empty tensor must not allocate either.
    let shape = x
        .shape()
        .iter()
        .zip(pads)
        .map(|(&d, &p)| padded_len(d, p))
        .collect::<Result<Vec<_>>>()?;
    let n = checked_numel(&shape, T::DTYPE.size_of())?;
    if n == 0 {
        return tensor::<T>(shape, Vec::new());
    }
    let maps = x
        .shape()
        .iter()
        .zip(pads)
        .zip(&shape)
        .map(|((&d, &(begin, _)), &out)| index_map(d, begin, out, mode))
        .collect::<Result<Vec<_>>>()?;
    let src = view::<T>(x)?;
    let mut out = T::filled(ctx, n);
    out.fill(fill);
    let Some((last_map, outer_maps)) = maps.split_last() else {
        out.copy_from_slice(src);
        return tensor(shape, out);
    };
    let strides = dense_strides(x.shape());
    let row = last_map.len();
    let begin = pads.last().map_or(0, |p| p.0);
    let last_dim = x.shape().last().copied().unwrap_or(1) as i64;
    let lo = begin.clamp(0, row as i64) as usize;
    let hi = ((begin + last_dim).clamp(0, row as i64) as usize).max(lo);
    let mut idx = vec![0usize; outer_maps.len()];
    for r in 0..n / row.max(1) {
        // Rows whose outer index lands in padding keep the fill value.
        let base: Option<usize> = idx
            .iter()
            .zip(outer_maps)
            .zip(&strides)
            .try_fold(0usize, |acc, ((&i, m), &s)| {
                m[i].map(|j| acc + j * s as usize)
            });
        if let Some(base) = base {
            let dst = &mut out[r * row..(r + 1) * row];
            // The unpadded middle of the row is one contiguous copy.
            if lo < hi {
                let from = (base as i64 + lo as i64 - begin) as usize;
                dst[lo..hi].copy_from_slice(&src[from..from + hi - lo]);
            }
            for o in (0..lo).chain(hi..row) {
                if let Some(j) = last_map[o] {
                    dst[o] = src[base + j];
                }
            }
        }
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < outer_maps[k].len() {
                break;
            }
            idx[k] = 0;
        }
    }
    tensor(shape, out)
}

/// Opset < 11 attributes: pads and the fill value.
type LegacyAttrs = (Vec<i64>, f32);

struct PadKernel {
    mode: Mode,
    legacy: Option<LegacyAttrs>,
}

impl Kernel for PadKernel {
    fn run(&self, inputs: &[Option<&Tensor>], ctx: &mut RunCtx) -> Result<Vec<Tensor>> {
        let x = required(inputs, 0)?;
        let (pads, axes, value) = match &self.legacy {
            Some((pads, v)) => (pads.clone(), None, Some(Tensor::scalar_f32(*v))),
            None => (
                required(inputs, 1)?.to_i64_vec()?,
                input_ints(inputs, 3)?,
                inputs.get(2).copied().flatten().cloned(),
            ),
        };
        let pads = full_pads(x.rank(), &pads, axes.as_deref())?;
        let out = with_any_type!(x.dtype(), |T| {
            let fill: T = match &value {
                None => T::default(),
                Some(v) => with_any_type!(v.dtype(), |S| {
                    let s = view::<S>(v)?;
                    s.first().map_or(T::default(), |&s| cast_elem::<S, T>(s))
                }),
            };
            pad_typed::<T>(x, &pads, self.mode, fill, ctx)
        })?;
        Ok(vec![out])
    }
}

fn legacy_attrs(node: &crate::ir::Node) -> Result<LegacyAttrs> {
    let pads = node
        .attr_ints("pads")?
        .ok_or_else(|| node_error(node, "missing attribute 'pads'"))?;
    Ok((pads.to_vec(), node.attr_float_or("value", 0.0)?))
}

pub fn infer(ctx: &InferCtx) -> Result<Vec<TypeInfo>> {
    let node = ctx.node;
    let x = ctx.input_type(0)?;
    let Some(dims) = &x.shape else {
        return Ok(vec![x.clone()]);
    };
    let (pads, axes_known, axes) = if ctx.opset < 11 {
        (Some(legacy_attrs(node)?.0), true, None)
    } else {
        let axes = const_ints(ctx, 3)?;
        (
            const_ints(ctx, 1)?,
            node.input(3).is_none() || axes.is_some(),
            axes,
        )
    };
    let shape = match pads {
        Some(pads) if axes_known => {
            let full = full_pads(dims.len(), &pads, axes.as_deref())
                .map_err(|e| node_error(node, e.to_string()))?;
            dims.iter()
                .zip(full)
                .map(|(d, (b, e))| match d {
                    Dim::Known(n) => {
                        let v = *n as i64 + b + e;
                        if v < 0 {
                            Err(node_error(
                                node,
                                format!("pads ({b}, {e}) remove more than {n} elements"),
                            ))
                        } else {
                            Ok(Dim::Known(v as usize))
                        }
                    }
                    d if b == 0 && e == 0 => Ok(d.clone()),
                    _ => Ok(Dim::Unknown),
                })
                .collect::<Result<Vec<_>>>()?
        }
        _ => vec![Dim::Unknown; dims.len()],
    };
    Ok(vec![TypeInfo::new(x.dtype, shape)])
}

pub fn compile(ctx: &CompileCtx) -> Result<Box<dyn Kernel>> {
    let legacy = if ctx.opset < 11 {
        Some(legacy_attrs(ctx.node)?)
    } else {
        None
    };
    Ok(Box::new(PadKernel {
        mode: parse_mode(ctx.node)?,
        legacy,
    }))
}

#[cfg(test)]
mod tests {
    use crate::ir::{Attr, DType, Dim, TypeInfo};
    use crate::ops::testutil::*;

    fn data() -> Option<crate::ir::Tensor> {
        f32t(&[3, 2], &[1.0, 1.2, 2.3, 3.4, 4.5, 5.7])
    }

    fn pad(mode: &str, pads: &[i64]) -> (Vec<usize>, Vec<f32>) {
        run_f32(
            "Pad",
            13,
            &[("mode", Attr::String(mode.into()))],
            vec![data(), i64t(&[4], pads)],
        )
    }

    #[test]
    fn spec_examples() {
        let (s, v) = pad("constant", &[0, 2, 0, 0]);
        assert_eq!(s, vec![3, 4]);
        assert_eq!(
            v,
            vec![0.0, 0.0, 1.0, 1.2, 0.0, 0.0, 2.3, 3.4, 0.0, 0.0, 4.5, 5.7]
        );
        let (_, v) = pad("reflect", &[0, 2, 0, 0]);
        assert_eq!(
            v,
            vec![1.0, 1.2, 1.0, 1.2, 2.3, 3.4, 2.3, 3.4, 4.5, 5.7, 4.5, 5.7]
        );
        let (_, v) = pad("edge", &[0, 2, 0, 0]);
        assert_eq!(
            v,
            vec![1.0, 1.0, 1.0, 1.2, 2.3, 2.3, 2.3, 3.4, 4.5, 4.5, 4.5, 5.7]
        );
        let (s, v) = pad("wrap", &[2, 1, 1, 1]);
        assert_eq!(s, vec![6, 4]);
        assert_eq!(
            v,
            vec![
                3.4, 2.3, 3.4, 2.3, 5.7, 4.5, 5.7, 4.5, 1.2, 1.0, 1.2, 1.0, 3.4, 2.3, 3.4, 2.3,
                5.7, 4.5, 5.7, 4.5, 1.2, 1.0, 1.2, 1.0
            ]
        );
    }

    #[test]
    fn reflect_on_rows_negative_pads_and_values() {
        // numpy.pad(arange(4), (3, 2), 'reflect') = [3, 2, 1, 0, 1, 2, 3, 2, 1]
        let (_, v) = run_f32(
            "Pad",
            13,
            &[("mode", Attr::String("reflect".into()))],
            vec![iota(&[4]), i64t(&[2], &[3, 2])],
        );
        assert_eq!(v, vec![3., 2., 1., 0., 1., 2., 3., 2., 1.]);
        let (s, v) = run_f32(
            "Pad",
            13,
            &[],
            vec![iota(&[2, 3]), i64t(&[4], &[-1, 1, 0, -1]), f32t(&[], &[9.])],
        );
        assert_eq!(s, vec![1, 3]);
        assert_eq!(v, vec![9., 3., 4.]);
        assert!(run("Pad", 13, &[], vec![iota(&[2]), i64t(&[2], &[-3, 0])], 1).is_err());
    }

    #[test]
    fn huge_pads_are_errors_not_allocations() {
        // The per-dim index maps used to be built before the output's size was checked.
        for pads in [[0, 1 << 40], [0, 1 << 62], [i64::MAX, 1], [0, i64::MAX]] {
            let r = run("Pad", 13, &[], vec![iota(&[3]), i64t(&[2], &pads)], 1);
            let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains("too large"), "{pads:?}: {msg}");
        }
        // An empty tensor stays empty however far another dim is padded.
        let (s, v) = run_f32(
            "Pad",
            13,
            &[],
            vec![iota(&[0, 2]), i64t(&[4], &[0, 0, 0, 1 << 40])],
        );
        assert_eq!(s, vec![0, (1 << 40) + 2]);
        assert!(v.is_empty());
    }

    #[test]
    fn legacy_attributes_and_axes_input() {
        let attrs = [
            ("pads", Attr::Ints(vec![1, 0, 0, 1])),
            ("value", Attr::Float(-1.0)),
        ];
        let (s, v) = run_f32("Pad", 2, &attrs, vec![iota(&[1, 2])]);
        assert_eq!(s, vec![2, 3]);
        assert_eq!(v, vec![-1., -1., -1., 0., 1., -1.]);
        let (s, v) = run_f32(
            "Pad",
            18,
            &[],
            vec![iota(&[2, 2]), i64t(&[2], &[1, 1]), None, i64t(&[1], &[-1])],
        );
        assert_eq!(s, vec![2, 4]);
        assert_eq!(v, vec![0., 0., 1., 0., 0., 2., 3., 0.]);
        let out = run(
            "Pad",
            13,
            &[],
            vec![i64t(&[2], &[5, 6]), i64t(&[2], &[1, 0])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].as_i64().unwrap(), &[0, 5, 6]);
    }

    #[test]
    fn infer_shapes() {
        let x = TypeInfo::new(DType::F32, vec![sym("n"), Dim::Known(3)]);
        let out = infer(
            "Pad",
            13,
            &[],
            vec![Some(x), None],
            vec![None, i64t(&[4], &[0, 1, 0, 1])],
            1,
        )
        .unwrap();
        assert_eq!(out[0].shape, Some(vec![sym("n"), Dim::Known(5)]));
    }
}
