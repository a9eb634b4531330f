//! Convolution attributes (`kernel_shape`, `strides`, `dilations`, `pads`, `auto_pad`, `group`)
//! of the integer convolutions, resolved to a 2-D geometry (1-D convolutions get a unit
//! height), with ONNX Runtime's output-size rule.

use crate::error::Result;
use crate::ir::{Dim, Node};
use crate::kernels::conv::Conv2dGeom;
use crate::ops::node_error;

#[derive(Clone, Copy, Debug, PartialEq)]
enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

/// The attributes of a convolution node, for a weight of shape `[C_out, C_in / group, k...]`.
#[derive(Clone, Debug)]
pub struct ConvAttrs {
    pub group: usize,
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pads: Vec<usize>,
    auto_pad: AutoPad,
}

fn list(node: &Node, key: &str, want: usize, default: usize, min: i64) -> Result<Vec<usize>> {
    match node.attr_ints(key)? {
        None => Ok(vec![default; want]),
        Some(v) if v.len() == want && v.iter().all(|&x| x >= min) => {
            Ok(v.iter().map(|&x| x as usize).collect())
        }
        Some(v) => Err(node_error(
            node,
            format!("attribute '{key}' = {v:?} should have {want} entries, each at least {min}"),
        )),
    }
}

impl ConvAttrs {
    /// Parses the attributes against the weight's shape.
    pub fn parse(node: &Node, weight_shape: &[usize]) -> Result<ConvAttrs> {
        if weight_shape.len() != 3 && weight_shape.len() != 4 {
            return Err(node_error(
                node,
                format!(
                    "weight of shape {weight_shape:?}: only 1-D and 2-D convolutions are supported"
                ),
            ));
        }
        let spatial = weight_shape[2..].to_vec();
        let rank = spatial.len();
        if let Some(k) = node.attr_ints("kernel_shape")? {
            if k.len() != rank || k.iter().zip(&spatial).any(|(&a, &b)| a as usize != b) {
                return Err(node_error(
                    node,
                    format!("kernel_shape {k:?} disagrees with weight shape {weight_shape:?}"),
                ));
            }
        }
        if spatial.contains(&0) {
            return Err(node_error(node, "the kernel has a zero extent"));
        }
        let group = node.attr_int_or("group", 1)?;
        if group < 1 {
            return Err(node_error(node, format!("group {group} must be positive")));
        }
        let auto_pad = match node.attr_string("auto_pad")?.unwrap_or("NOTSET") {
            "NOTSET" => AutoPad::NotSet,
            "SAME_UPPER" => AutoPad::SameUpper,
            "SAME_LOWER" => AutoPad::SameLower,
            "VALID" => AutoPad::Valid,
            other => return Err(node_error(node, format!("unknown auto_pad '{other}'"))),
        };
        Ok(ConvAttrs {
            group: group as usize,
            strides: list(node, "strides", rank, 1, 1)?,
            dilations: list(node, "dilations", rank, 1, 1)?,
            pads: list(node, "pads", 2 * rank, 0, 0)?,
            kernel: spatial,
            auto_pad,
        })
    }

    fn rank(&self) -> usize {
        self.kernel.len()
    }

    fn pads_for(&self, axis: usize, size: usize) -> (usize, usize) {
        match self.auto_pad {
            AutoPad::NotSet => (self.pads[axis], self.pads[axis + self.rank()]),
            AutoPad::Valid => (0, 0),
            AutoPad::SameUpper | AutoPad::SameLower => {
                let s = self.strides[axis];
                let span = self.dilations[axis] * (self.kernel[axis] - 1) + 1;
                let out = size.div_ceil(s);
                let total = ((out.max(1) - 1) * s + span).saturating_sub(size);
                let small = total / 2;
                if self.auto_pad == AutoPad::SameUpper {
                    (small, total - small)
                } else {
                    (total - small, small)
                }
            }
        }
    }

    /// The 2-D geometry for an input of `c_in` channels and spatial extent `[h, w]`
    /// (`h = 1` for 1-D).
    pub fn geom(&self, c_in: usize, c_out: usize, [h, w]: [usize; 2]) -> Conv2dGeom {
        if self.rank() == 1 {
            let (l, r) = self.pads_for(0, w);
            Conv2dGeom {
                c_in,
                c_out,
                groups: self.group,
                kernel: [1, self.kernel[0]],
                stride: [1, self.strides[0]],
                dilation: [1, self.dilations[0]],
                pads: [0, l, 0, r],
            }
        } else {
            let (t, b) = self.pads_for(0, h);
            let (l, r) = self.pads_for(1, w);
            Conv2dGeom {
                c_in,
                c_out,
                groups: self.group,
                kernel: [self.kernel[0], self.kernel[1]],
                stride: [self.strides[0], self.strides[1]],
                dilation: [self.dilations[0], self.dilations[1]],
                pads: [t, l, b, r],
            }
        }
    }

    /// Output spatial dims for possibly symbolic input dims.
    pub fn out_dims(&self, spatial: &[Dim]) -> Vec<Dim> {
        let hw: Vec<Option<usize>> = spatial.iter().map(Dim::known).collect();
        let known = |i: usize| hw.get(i).copied().flatten();
        let g = self.geom(
            1,
            1,
            [known(0).unwrap_or(1), known(hw.len() - 1).unwrap_or(1)],
        );
        let out = g.out_hw(
            if self.rank() == 1 {
                1
            } else {
                known(0).unwrap_or(0)
            },
            known(hw.len() - 1).unwrap_or(0),
        );
        let out = out.ok();
        spatial
            .iter()
            .enumerate()
            .map(|(i, d)| match (d.known(), out) {
                (Some(_), Some((oh, ow))) => {
                    Dim::Known(if i + 1 == spatial.len() { ow } else { oh })
                }
                _ => Dim::Unknown,
            })
            .collect()
    }
}
