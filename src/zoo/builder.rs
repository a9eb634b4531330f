//! A small graph builder for the zoo: layers append ONNX nodes (opset 13) and their
//! initialized parameters, and track each value's per-sample shape so the next layer knows
//! its fan-in.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ir::{Attr, DType, Dim, Graph, Model, Node, Tensor, TypeInfo, ValueInfo};
use crate::train::rng::Rng;

/// Opset of every zoo model.
pub const OPSET: i64 = 13;

/// Weight initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// He/Kaiming normal, `std = sqrt(2 / fan_in)`: layers followed by a ReLU.
    He,
    /// Glorot/Xavier uniform, `limit = sqrt(6 / (fan_in + fan_out))`: linear layers.
    Glorot,
}

/// A square convolution layer: `Conv::new(out, k)` is stride 1, no padding, one group, He
/// initialisation; the setters change one thing each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv {
    pub out: usize,
    pub k: usize,
    pub stride: usize,
    /// Padding on every side.
    pub pad: usize,
    pub groups: usize,
    pub init: Init,
}

impl Conv {
    pub fn new(out: usize, k: usize) -> Conv {
        Conv {
            out,
            k,
            stride: 1,
            pad: 0,
            groups: 1,
            init: Init::He,
        }
    }

    pub fn stride(self, stride: usize) -> Conv {
        Conv { stride, ..self }
    }

    pub fn pad(self, pad: usize) -> Conv {
        Conv { pad, ..self }
    }

    pub fn groups(self, groups: usize) -> Conv {
        Conv { groups, ..self }
    }

    pub fn init(self, init: Init) -> Conv {
        Conv { init, ..self }
    }
}

pub struct Builder {
    graph: Graph,
    rng: Rng,
    /// Per-sample shape (no batch dim) of every value.
    shapes: HashMap<String, Vec<usize>>,
    counts: HashMap<&'static str, usize>,
}

impl Builder {
    /// A graph with one input `input` of shape `[N, ...sample]`.
    pub fn new(name: &str, sample: &[usize], seed: u64) -> Builder {
        let mut dims = vec![Dim::Sym("N".into())];
        dims.extend(sample.iter().map(|&d| Dim::Known(d)));
        let graph = Graph {
            name: name.to_string(),
            inputs: vec![ValueInfo::new("input", TypeInfo::new(DType::F32, dims))],
            ..Graph::default()
        };
        let mut shapes = HashMap::new();
        shapes.insert("input".to_string(), sample.to_vec());
        Builder {
            graph,
            rng: Rng::new(seed),
            shapes,
            counts: HashMap::new(),
        }
    }

    pub fn input(&self) -> String {
        "input".to_string()
    }

    /// Per-sample shape of `value`.
    pub fn shape(&self, value: &str) -> Result<Vec<usize>> {
        self.shapes
            .get(value)
            .cloned()
            .ok_or_else(|| Error::Graph(format!("zoo: unknown value '{value}'")))
    }

    /// A fresh layer name such as `conv3`.
    fn name(&mut self, kind: &'static str) -> String {
        let n = self.counts.entry(kind).or_default();
        *n += 1;
        format!("{kind}{n}")
    }

    fn param(&mut self, name: String, shape: Vec<usize>, data: Vec<f32>) -> Result<String> {
        self.graph
            .initializers
            .insert(name.clone(), Tensor::from_f32(shape, data)?);
        Ok(name)
    }

    fn init(&mut self, init: Init, fan_in: usize, fan_out: usize, n: usize) -> Vec<f32> {
        match init {
            Init::He => {
                let std = (2.0 / fan_in.max(1) as f64).sqrt();
                (0..n).map(|_| (self.rng.normal() * std) as f32).collect()
            }
            Init::Glorot => {
                let limit = (6.0 / (fan_in + fan_out).max(1) as f64).sqrt();
                (0..n)
                    .map(|_| ((self.rng.uniform() * 2.0 - 1.0) * limit) as f32)
                    .collect()
            }
        }
    }

    fn node(&mut self, node: Node, out_shape: Vec<usize>) -> String {
        let out = node.outputs[0].clone();
        self.shapes.insert(out.clone(), out_shape);
        self.graph.nodes.push(node);
        out
    }

    /// A 2-D convolution with a bias.
    pub fn conv(&mut self, x: &str, spec: Conv) -> Result<String> {
        let Conv {
            out: c_out,
            k,
            stride,
            pad,
            groups,
            init,
        } = spec;
        let s = self.shape(x)?;
        let [c, h, w] = s[..] else {
            return Err(Error::Graph(format!(
                "zoo: conv needs a [C, H, W] input, got {s:?}"
            )));
        };
        if groups == 0
            || stride == 0
            || c % groups != 0
            || c_out % groups != 0
            || h + 2 * pad < k
            || w + 2 * pad < k
        {
            return Err(Error::Graph(format!(
                "zoo: conv {c}->{c_out} k{k} groups {groups} does not fit {s:?}"
            )));
        }
        let name = self.name("conv");
        let fan_in = c / groups * k * k;
        let wdata = self.init(init, fan_in, c_out / groups * k * k, c_out * fan_in);
        let wname = self.param(
            format!("{name}.weight"),
            vec![c_out, c / groups, k, k],
            wdata,
        )?;
        let bname = self.param(format!("{name}.bias"), vec![c_out], vec![0.0; c_out])?;
        let oh = (h + 2 * pad - k) / stride + 1;
        let ow = (w + 2 * pad - k) / stride + 1;
        let ints = |v: usize, n: usize| Attr::Ints(vec![v as i64; n]);
        let node = Node::new(
            &name,
            "Conv",
            vec![x.into(), wname, bname],
            vec![name.clone()],
        )
        .with_attr("kernel_shape", ints(k, 2))
        .with_attr("strides", ints(stride, 2))
        .with_attr("pads", ints(pad, 4))
        .with_attr("group", Attr::Int(groups as i64));
        Ok(self.node(node, vec![c_out, oh, ow]))
    }

    /// Inference-form BatchNormalization (scale 1, bias 0, mean 0, var 1).
    pub fn batchnorm(&mut self, x: &str) -> Result<String> {
        let s = self.shape(x)?;
        let c = *s
            .first()
            .ok_or_else(|| Error::Graph("zoo: batchnorm of a scalar".into()))?;
        let name = self.name("bn");
        let mut inputs = vec![x.to_string()];
        for (suffix, v) in [("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0)] {
            inputs.push(self.param(format!("{name}.{suffix}"), vec![c], vec![v; c])?);
        }
        let node = Node::new(&name, "BatchNormalization", inputs, vec![name.clone()])
            .with_attr("epsilon", Attr::Float(1e-5))
            .with_attr("momentum", Attr::Float(0.9));
        Ok(self.node(node, s))
    }

    fn unary(&mut self, kind: &'static str, op: &str, x: &str) -> Result<String> {
        let s = self.shape(x)?;
        let name = self.name(kind);
        Ok(self.node(Node::new(&name, op, vec![x.into()], vec![name.clone()]), s))
    }

    pub fn relu(&mut self, x: &str) -> Result<String> {
        self.unary("relu", "Relu", x)
    }

    /// ReLU6 as `Clip(x, 0, 6)` with scalar bounds.
    pub fn relu6(&mut self, x: &str) -> Result<String> {
        let s = self.shape(x)?;
        let name = self.name("relu6_");
        let lo = format!("{name}.min");
        let hi = format!("{name}.max");
        self.graph
            .initializers
            .insert(lo.clone(), Tensor::scalar_f32(0.0));
        self.graph
            .initializers
            .insert(hi.clone(), Tensor::scalar_f32(6.0));
        Ok(self.node(
            Node::new(&name, "Clip", vec![x.into(), lo, hi], vec![name.clone()]),
            s,
        ))
    }

    /// Max or average pooling with a square window, no padding.
    pub fn pool(&mut self, x: &str, max: bool, k: usize, stride: usize) -> Result<String> {
        let s = self.shape(x)?;
        let [c, h, w] = s[..] else {
            return Err(Error::Graph(format!(
                "zoo: pool needs a [C, H, W] input, got {s:?}"
            )));
        };
        if h < k || w < k {
            return Err(Error::Graph(format!("zoo: pool {k} does not fit {s:?}")));
        }
        let (kind, op) = if max {
            ("maxpool", "MaxPool")
        } else {
            ("avgpool", "AveragePool")
        };
        let name = self.name(kind);
        let ints = |v: usize| Attr::Ints(vec![v as i64; 2]);
        let node = Node::new(&name, op, vec![x.into()], vec![name.clone()])
            .with_attr("kernel_shape", ints(k))
            .with_attr("strides", ints(stride));
        Ok(self.node(node, vec![c, (h - k) / stride + 1, (w - k) / stride + 1]))
    }

    pub fn global_avg_pool(&mut self, x: &str) -> Result<String> {
        let s = self.shape(x)?;
        let name = self.name("gap");
        let mut out = vec![s.first().copied().unwrap_or(1)];
        out.extend(std::iter::repeat_n(1, s.len().saturating_sub(1)));
        Ok(self.node(
            Node::new(
                &name,
                "GlobalAveragePool",
                vec![x.into()],
                vec![name.clone()],
            ),
            out,
        ))
    }

    pub fn flatten(&mut self, x: &str) -> Result<String> {
        let s = self.shape(x)?;
        let name = self.name("flatten");
        let node = Node::new(&name, "Flatten", vec![x.into()], vec![name.clone()])
            .with_attr("axis", Attr::Int(1));
        Ok(self.node(node, vec![s.iter().product()]))
    }

    /// Fully connected layer: `Gemm(x, W^T) + b` with `W` stored `[out, in]` (transB = 1).
    pub fn dense(&mut self, x: &str, out: usize, init: Init) -> Result<String> {
        let s = self.shape(x)?;
        let [fan_in] = s[..] else {
            return Err(Error::Graph(format!(
                "zoo: dense needs a flat input, got {s:?}"
            )));
        };
        let name = self.name("fc");
        let wdata = self.init(init, fan_in, out, out * fan_in);
        let wname = self.param(format!("{name}.weight"), vec![out, fan_in], wdata)?;
        let bname = self.param(format!("{name}.bias"), vec![out], vec![0.0; out])?;
        let node = Node::new(
            &name,
            "Gemm",
            vec![x.into(), wname, bname],
            vec![name.clone()],
        )
        .with_attr("transB", Attr::Int(1));
        Ok(self.node(node, vec![out]))
    }

    /// Dropout with a fixed ratio (identity at inference).
    pub fn dropout(&mut self, x: &str, ratio: f32) -> Result<String> {
        let s = self.shape(x)?;
        let name = self.name("dropout");
        let r = format!("{name}.ratio");
        self.graph
            .initializers
            .insert(r.clone(), Tensor::scalar_f32(ratio));
        Ok(self.node(
            Node::new(&name, "Dropout", vec![x.into(), r], vec![name.clone()]),
            s,
        ))
    }

    pub fn add(&mut self, a: &str, b: &str) -> Result<String> {
        let (sa, sb) = (self.shape(a)?, self.shape(b)?);
        if sa != sb {
            return Err(Error::Graph(format!("zoo: cannot add {sa:?} and {sb:?}")));
        }
        let name = self.name("add");
        Ok(self.node(
            Node::new(&name, "Add", vec![a.into(), b.into()], vec![name.clone()]),
            sa,
        ))
    }

    /// Renames the last value to `logits`, declares it the output and returns the model.
    pub fn finish(mut self, out: &str) -> Result<Model> {
        let s = self.shape(out)?;
        let node = self
            .graph
            .nodes
            .iter_mut()
            .rev()
            .find(|n| n.outputs.iter().any(|o| o == out))
            .ok_or_else(|| Error::Graph(format!("zoo: '{out}' is not a node output")))?;
        for o in node.outputs.iter_mut().filter(|o| *o == out) {
            *o = "logits".into();
        }
        let mut dims = vec![Dim::Sym("N".into())];
        dims.extend(s.iter().map(|&d| Dim::Known(d)));
        self.graph.outputs = vec![ValueInfo::new("logits", TypeInfo::new(DType::F32, dims))];
        Ok(Model::new(self.graph, OPSET))
    }
}
