//! Reference model zoo: code that builds initialized IR graphs (ONNX opset 13, seeded He or
//! Glorot initialisation) for the classic compression and distillation experiments.
//!
//! | name            | structure                                                        |
//! |-----------------|------------------------------------------------------------------|
//! | `lenet-300-100` | 784-300-100-10 MLP (Deep Compression)                            |
//! | `lenet5`        | Caffe LeNet: conv 20 5x5, max-pool, conv 50 5x5, max-pool, fc 500, ReLU, fc 10 (431K parameters on MNIST) |
//! | `mlp-1200`      | 784-1200-1200-10 with dropout (Hinton's distillation teacher)    |
//! | `mlp-800`       | 784-800-800-10 (the student)                                     |
//! | `vgg-small`     | 3x3 conv + BatchNorm stacks, max-pools, global average pool      |
//! | `resnet-small`  | ResNet-8: three stages of basic residual blocks with BatchNorm   |
//! | `mobilenet-small` | depthwise-separable blocks with BatchNorm and ReLU6            |
//!
//! Every model takes `input` `[N, C, H, W]` and returns `logits` `[N, classes]`; the
//! convolutional ones adapt to 28x28 and 32x32 inputs (MNIST, CIFAR-style).

mod builder;
mod cnn;
mod mlp;

pub use builder::{Builder, Conv, Init, OPSET};

use crate::error::{Error, Result};
use crate::ir::Model;

/// Input geometry, classes and seed of a zoo model.
#[derive(Clone, Debug, PartialEq)]
pub struct ZooConfig {
    /// `[C, H, W]` of one sample.
    pub input: [usize; 3],
    pub classes: usize,
    pub seed: u64,
}

impl ZooConfig {
    /// 1x28x28 gray digits, 10 classes.
    pub fn mnist(seed: u64) -> ZooConfig {
        ZooConfig {
            input: [1, 28, 28],
            classes: 10,
            seed,
        }
    }

    /// 3x32x32 colour images, 10 classes.
    pub fn cifar(seed: u64) -> ZooConfig {
        ZooConfig {
            input: [3, 32, 32],
            classes: 10,
            seed,
        }
    }
}

/// Names and one-line descriptions of the zoo models.
pub const ARCHITECTURES: &[(&str, &str)] = &[
    ("lenet-300-100", "784-300-100-10 MLP"),
    (
        "lenet5",
        "Caffe LeNet-5: conv20-pool-conv50-pool-fc500-fc10",
    ),
    (
        "mlp-1200",
        "784-1200-1200-10 MLP with dropout (distillation teacher)",
    ),
    ("mlp-800", "784-800-800-10 MLP (distillation student)"),
    ("vgg-small", "VGG-style 3x3 conv/BatchNorm stacks"),
    ("resnet-small", "ResNet-8 with BatchNorm"),
    ("mobilenet-small", "MobileNet-style depthwise-separable CNN"),
];

/// Builds the zoo model `name` for `cfg`.
pub fn build(name: &str, cfg: &ZooConfig) -> Result<Model> {
    if cfg.classes == 0 || cfg.input.contains(&0) {
        return Err(Error::Graph(format!(
            "zoo: input {:?} and {} classes must be non-empty",
            cfg.input, cfg.classes
        )));
    }
    let mut model = match name {
        "lenet-300-100" => mlp::mlp(name, cfg, &[300, 100], None)?,
        "mlp-1200" => mlp::mlp(name, cfg, &[1200, 1200], Some((0.2, 0.5)))?,
        "mlp-800" => mlp::mlp(name, cfg, &[800, 800], None)?,
        "lenet5" => cnn::lenet5(cfg)?,
        "vgg-small" => cnn::vgg_small(cfg)?,
        "resnet-small" => cnn::resnet_small(cfg)?,
        "mobilenet-small" => cnn::mobilenet_small(cfg)?,
        _ => {
            let names: Vec<&str> = ARCHITECTURES.iter().map(|(n, _)| *n).collect();
            return Err(Error::Graph(format!(
                "unknown architecture '{name}' (available: {})",
                names.join(", ")
            )));
        }
    };
    model.doc_string = format!("lithe zoo model {name}, seed {}", cfg.seed);
    Ok(model)
}

/// Number of f32 parameters in the initializers of `model`.
pub fn parameter_count(model: &Model) -> usize {
    model
        .graph
        .initializers
        .values()
        .filter(|t| t.dtype() == crate::ir::DType::F32 && t.rank() > 0)
        .map(|t| t.numel())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Tensor;
    use crate::runtime::{Session, SessionOptions};

    #[test]
    fn every_model_builds_runs_and_round_trips() {
        for cfg in [ZooConfig::mnist(1), ZooConfig::cifar(2)] {
            for (name, _) in ARCHITECTURES {
                let model = build(name, &cfg).unwrap();
                let bytes = crate::onnx::encode_model(&model).unwrap();
                let back =
                    crate::onnx::decode_model(&bytes, None, std::path::Path::new("zoo")).unwrap();
                let s = Session::new(
                    &back,
                    &SessionOptions {
                        threads: 1,
                        ..Default::default()
                    },
                )
                .unwrap();
                let [c, h, w] = cfg.input;
                let x = Tensor::from_f32(vec![2, c, h, w], vec![0.5; 2 * c * h * w]).unwrap();
                let out = s.run(&[("input", x)]).unwrap();
                assert_eq!(out[0].1.shape(), &[2, cfg.classes], "{name}");
                assert!(
                    out[0].1.as_f32().unwrap().iter().all(|v| v.is_finite()),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn parameter_counts_and_seeds() {
        let m = ZooConfig::mnist(0);
        assert_eq!(parameter_count(&build("lenet5", &m).unwrap()), 431_080);
        assert_eq!(
            parameter_count(&build("lenet-300-100", &m).unwrap()),
            266_610
        );
        assert_eq!(
            parameter_count(&build("mlp-1200", &m).unwrap()),
            784 * 1200 + 1200 + 1200 * 1200 + 1200 + 12010
        );
        assert_eq!(build("lenet5", &m).unwrap(), build("lenet5", &m).unwrap());
        assert_ne!(
            build("lenet5", &m).unwrap(),
            build("lenet5", &ZooConfig::mnist(1)).unwrap()
        );
        let err = build("alexnet", &m).unwrap_err().to_string();
        assert!(err.contains("alexnet") && err.contains("lenet5"), "{err}");
    }
}
