//! Parameters: the f32 initializers of a graph as training sees them. Each is trainable or
//! frozen, may carry a pruning mask (kept at zero through every update: the mask multiplies
//! both the gradient and the weight) and a fake-quantization hook (QAT), and may be excluded
//! from weight decay.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ir::{DType, Graph, Tensor};
use crate::quant::{QParams, Quantization};

/// Fake quantization applied to a value in the forward pass, with a straight-through
/// gradient in the backward pass.
pub trait FakeQuant: Send + Sync + fmt::Debug {
    /// The value the quantized model would see.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The gradient with respect to the unquantized `x`, given the gradient with respect to
    /// `forward(x)`: passed straight through inside the representable range, zero outside.
    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor>;
}

/// Linear (affine or symmetric) fake quantization, per tensor or per channel, with the
/// numerics of [`crate::quant::linear`].
#[derive(Clone, Debug)]
pub struct LinearFakeQuant {
    pub quant: Quantization,
    pub name: String,
}

impl LinearFakeQuant {
    pub fn new(quant: Quantization, name: impl Into<String>) -> LinearFakeQuant {
        LinearFakeQuant {
            quant,
            name: name.into(),
        }
    }

    /// The parameters governing each element of a tensor of `shape`.
    fn params_of<'a>(&'a self, shape: &[usize]) -> Result<Box<dyn Fn(usize) -> &'a QParams + 'a>> {
        match &self.quant {
            Quantization::PerTensor(p) => Ok(Box::new(move |_| p)),
            Quantization::PerChannel(pc) => {
                let axis = pc.axis;
                if axis >= shape.len() || shape[axis] != pc.params.len() {
                    return Err(Error::Tensor {
                        name: self.name.clone(),
                        msg: format!(
                            "per-channel parameters for {} channels on axis {axis} do not fit shape {shape:?}",
                            pc.params.len()
                        ),
                    });
                }
                let inner: usize = shape[axis + 1..].iter().product();
                let channels = shape[axis];
                Ok(Box::new(move |i| &pc.params[(i / inner.max(1)) % channels]))
            }
        }
    }
}

impl FakeQuant for LinearFakeQuant {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut v = x.as_f32()?.to_vec();
        self.quant.fake_quantize(&mut v, x.shape(), &self.name)?;
        Tensor::from_f32(x.shape().to_vec(), v)
    }

    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let p = self.params_of(x.shape())?;
        let g = grad
            .as_f32()?
            .iter()
            .zip(x.as_f32()?)
            .enumerate()
            .map(|(i, (&g, &v))| {
                let (lo, hi) = p(i).real_range();
                if v >= lo && v <= hi {
                    g
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_f32(grad.shape().to_vec(), g)
    }
}

#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub value: Tensor,
    pub trainable: bool,
    /// 1 where the weight may be non-zero, 0 where it is pruned.
    pub mask: Option<Vec<f32>>,
    pub fake_quant: Option<Arc<dyn FakeQuant>>,
    /// Whether weight decay applies (by default: weights of rank 2 and above, not biases or
    /// normalisation parameters).
    pub decay: bool,
}

impl Param {
    /// Zeroes pruned weights.
    pub fn apply_mask(&mut self) -> Result<()> {
        if let Some(m) = &self.mask {
            for (w, &k) in self.value.as_f32_mut()?.iter_mut().zip(m) {
                *w *= k;
            }
        }
        Ok(())
    }
}

/// Input positions that hold state or hyper-parameters rather than weights.
fn is_state_position(op: &str, i: usize) -> bool {
    matches!(
        (op, i),
        ("BatchNormalization", 3 | 4) | ("Clip", 1 | 2) | ("Dropout", 1 | 2)
    )
}

/// All f32 initializers of a graph, by name.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    params: BTreeMap<String, Param>,
}

impl ParamStore {
    /// Every f32 initializer becomes a parameter. Trainable by default unless it is a scalar
    /// or only ever used as state (BatchNorm running statistics) or a hyper-parameter (Clip
    /// bounds, Dropout ratio).
    pub fn from_graph(graph: &Graph) -> ParamStore {
        let mut learnable: HashSet<&str> = HashSet::new();
        for node in &graph.nodes {
            for (i, inp) in node.inputs.iter().enumerate() {
                if !inp.is_empty() && !is_state_position(&node.op_type, i) {
                    learnable.insert(inp);
                }
            }
        }
        let params = graph
            .initializers
            .iter()
            .filter(|(_, t)| t.dtype() == DType::F32)
            .map(|(name, t)| {
                let trainable = t.rank() > 0 && learnable.contains(name.as_str());
                (
                    name.clone(),
                    Param {
                        name: name.clone(),
                        value: t.clone(),
                        trainable,
                        mask: None,
                        fake_quant: None,
                        decay: t.rank() >= 2,
                    },
                )
            })
            .collect();
        ParamStore { params }
    }

    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params.get(name)
    }

    fn get_mut(&mut self, name: &str) -> Result<&mut Param> {
        self.params.get_mut(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            msg: "no such f32 initializer (parameter) in the model".into(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    /// Parameters in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.values()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.params.values_mut()
    }

    pub fn trainable(&self) -> impl Iterator<Item = &Param> {
        self.params.values().filter(|p| p.trainable)
    }

    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        self.trainable().map(|p| p.value.numel()).sum()
    }

    pub fn set_trainable(&mut self, name: &str, trainable: bool) -> Result<()> {
        self.get_mut(name)?.trainable = trainable;
        Ok(())
    }

    pub fn set_decay(&mut self, name: &str, decay: bool) -> Result<()> {
        self.get_mut(name)?.decay = decay;
        Ok(())
    }

    /// Replaces a parameter's value (same shape), re-applying its mask.
    pub fn set_value(&mut self, name: &str, value: Tensor) -> Result<()> {
        let p = self.get_mut(name)?;
        if value.shape() != p.value.shape() || value.dtype() != DType::F32 {
            return Err(Error::Tensor {
                name: name.to_string(),
                msg: format!(
                    "new value {} {:?} does not match f32 {:?}",
                    value.dtype(),
                    value.shape(),
                    p.value.shape()
                ),
            });
        }
        p.value = value;
        p.apply_mask()
    }

    /// Prunes: `keep[i] == false` forces weight `i` to zero now and after every update.
    pub fn set_mask(&mut self, name: &str, keep: &[bool]) -> Result<()> {
        let p = self.get_mut(name)?;
        if keep.len() != p.value.numel() {
            return Err(Error::Tensor {
                name: name.to_string(),
                msg: format!(
                    "mask has {} entries for {} weights",
                    keep.len(),
                    p.value.numel()
                ),
            });
        }
        p.mask = Some(keep.iter().map(|&k| k as u8 as f32).collect());
        p.apply_mask()
    }

    pub fn clear_mask(&mut self, name: &str) -> Result<()> {
        self.get_mut(name)?.mask = None;
        Ok(())
    }

    /// Makes the forward pass see `fq.forward(w)` and the update use straight-through
    /// gradients.
    pub fn set_fake_quant(&mut self, name: &str, fq: Option<Arc<dyn FakeQuant>>) -> Result<()> {
        self.get_mut(name)?.fake_quant = fq;
        Ok(())
    }

    /// Copies every parameter value into the graph's initializers.
    pub fn write_to(&self, graph: &mut Graph) {
        for (name, p) in &self.params {
            graph.initializers.insert(name.clone(), p.value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QScheme;

    #[test]
    fn masks_stick_and_fake_quant_is_straight_through() {
        let mut g = Graph::default();
        g.initializers.insert(
            "w".into(),
            Tensor::from_f32(vec![2, 2], vec![1.0, -2.0, 3.0, 4.0]).unwrap(),
        );
        g.initializers.insert("s".into(), Tensor::scalar_f32(0.5));
        g.nodes.push(crate::ir::Node::new(
            "m",
            "MatMul",
            vec!["x".into(), "w".into()],
            vec!["y".into()],
        ));
        let mut store = ParamStore::from_graph(&g);
        assert!(store.get("w").unwrap().trainable);
        assert!(!store.get("s").unwrap().trainable);
        store.set_mask("w", &[true, false, true, false]).unwrap();
        assert_eq!(
            store.get("w").unwrap().value.as_f32().unwrap(),
            &[1.0, 0.0, 3.0, 0.0]
        );
        assert!(store.set_mask("w", &[true]).is_err());
        assert!(store.set_trainable("nope", true).is_err());

        let scheme = QScheme::new(8, true, true).unwrap();
        let p = scheme.params_from_range(-1.0, 1.0, "w").unwrap();
        let fq = LinearFakeQuant::new(Quantization::PerTensor(p), "w");
        let x = Tensor::from_f32(vec![3], vec![0.3, 5.0, -0.001]).unwrap();
        let y = fq.forward(&x).unwrap();
        assert!((y.as_f32().unwrap()[0] - 0.3).abs() <= p.scale / 2.0);
        let g = fq
            .backward(&x, &Tensor::from_f32(vec![3], vec![1.0; 3]).unwrap())
            .unwrap();
        assert_eq!(g.as_f32().unwrap(), &[1.0, 0.0, 1.0]);
    }
}
