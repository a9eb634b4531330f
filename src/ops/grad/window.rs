//! The sliding-window attributes of Conv and the pools (`kernel_shape`, `strides`,
//! `dilations`, `pads`, `auto_pad`), resolved for a concrete input into the 2-D form the
//! kernels take. 1-D windows become `1 x k` windows over an `[N, C, 1, L]` view.

use crate::error::Result;
use crate::ir::Node;
use crate::ops::node_error;

/// A window resolved for one input extent.
#[derive(Clone, Debug, PartialEq)]
pub struct Window2d {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
}

/// `[n, c, h, w]` of a rank-3 (`h = 1`) or rank-4 input.
pub fn nchw(node: &Node, shape: &[usize]) -> Result<[usize; 4]> {
    match *shape {
        [n, c, l] => Ok([n, c, 1, l]),
        [n, c, h, w] => Ok([n, c, h, w]),
        _ => Err(node_error(
            node,
            format!("backward supports 1-D and 2-D windows only; input shape is {shape:?}"),
        )),
    }
}

fn list(node: &Node, key: &str, want: usize, default: usize) -> Result<Vec<usize>> {
    match node.attr_ints(key)? {
        None => Ok(vec![default; want]),
        Some(v) if v.len() == want && v.iter().all(|&x| x >= 0) => {
            Ok(v.iter().map(|&x| x as usize).collect())
        }
        Some(v) => Err(node_error(
            node,
            format!("attribute '{key}' = {v:?} should have {want} non-negative entries"),
        )),
    }
}

/// Resolves the window of `node` with spatial `kernel` for an input of spatial `extent`.
pub fn resolve(node: &Node, kernel: &[usize], extent: &[usize]) -> Result<Window2d> {
    let rank = kernel.len();
    if rank != extent.len() || !(1..=2).contains(&rank) || kernel.contains(&0) {
        return Err(node_error(
            node,
            format!("kernel {kernel:?} does not fit an input with spatial dims {extent:?}"),
        ));
    }
    let strides = list(node, "strides", rank, 1)?;
    let dilations = list(node, "dilations", rank, 1)?;
    let pads = list(node, "pads", 2 * rank, 0)?;
    if strides.contains(&0) || dilations.contains(&0) {
        return Err(node_error(node, "strides and dilations must be positive"));
    }
    let auto = node.attr_string("auto_pad")?.unwrap_or("NOTSET");
    let pad = |axis: usize| -> Result<(usize, usize)> {
        Ok(match auto {
            "NOTSET" => (pads[axis], pads[axis + rank]),
            "VALID" => (0, 0),
            "SAME_UPPER" | "SAME_LOWER" => {
                let (s, size) = (strides[axis], extent[axis]);
                let span = dilations[axis] * (kernel[axis] - 1) + 1;
                let out = size.div_ceil(s);
                let total = ((out.max(1) - 1) * s + span).saturating_sub(size);
                let small = total / 2;
                if auto == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                }
            }
            other => return Err(node_error(node, format!("unknown auto_pad '{other}'"))),
        })
    };
    if rank == 1 {
        let (l, r) = pad(0)?;
        Ok(Window2d {
            kernel: [1, kernel[0]],
            stride: [1, strides[0]],
            dilation: [1, dilations[0]],
            pads: [0, l, 0, r],
        })
    } else {
        let (t, b) = pad(0)?;
        let (l, r) = pad(1)?;
        Ok(Window2d {
            kernel: [kernel[0], kernel[1]],
            stride: [strides[0], strides[1]],
            dilation: [dilations[0], dilations[1]],
            pads: [t, l, b, r],
        })
    }
}
