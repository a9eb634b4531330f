//! Convolutional classifiers: Caffe's LeNet-5, and small VGG-, ResNet- and MobileNet-style
//! networks with BatchNorm that fit 28x28 and 32x32 inputs.

use super::builder::{Builder, Conv, Init};
use super::ZooConfig;
use crate::error::Result;
use crate::ir::Model;

/// Caffe's `lenet_train_test.prototxt` (the Deep Compression LeNet-5): no activation after
/// the convolutions, Xavier-style initialisation, 431,080 parameters on 28x28 inputs.
pub fn lenet5(cfg: &ZooConfig) -> Result<Model> {
    let mut b = Builder::new("lenet5", &cfg.input, cfg.seed);
    let input = b.input();
    let x = b.conv(&input, Conv::new(20, 5).init(Init::Glorot))?;
    let x = b.pool(&x, true, 2, 2)?;
    let x = b.conv(&x, Conv::new(50, 5).init(Init::Glorot))?;
    let x = b.pool(&x, true, 2, 2)?;
    let x = b.flatten(&x)?;
    let x = b.dense(&x, 500, Init::He)?;
    let x = b.relu(&x)?;
    let logits = b.dense(&x, cfg.classes, Init::Glorot)?;
    b.finish(&logits)
}

/// conv3x3 -> BatchNorm -> ReLU.
fn conv_bn_relu(b: &mut Builder, x: &str, c: usize, stride: usize) -> Result<String> {
    let y = b.conv(x, Conv::new(c, 3).stride(stride).pad(1))?;
    let y = b.batchnorm(&y)?;
    b.relu(&y)
}

/// Two 32-channel convs, pool, two 64-channel convs, pool, a 128-channel conv, global
/// average pool, classifier.
pub fn vgg_small(cfg: &ZooConfig) -> Result<Model> {
    let mut b = Builder::new("vgg-small", &cfg.input, cfg.seed);
    let mut x = b.input();
    for (widths, pool) in [
        (&[32, 32][..], true),
        (&[64, 64][..], true),
        (&[128][..], false),
    ] {
        for &c in widths {
            x = conv_bn_relu(&mut b, &x, c, 1)?;
        }
        if pool {
            x = b.pool(&x, true, 2, 2)?;
        }
    }
    let x = b.global_avg_pool(&x)?;
    let x = b.flatten(&x)?;
    let logits = b.dense(&x, cfg.classes, Init::Glorot)?;
    b.finish(&logits)
}

/// A basic residual block: two 3x3 conv/BN layers, with a 1x1 conv/BN projection on the
/// shortcut when the shape changes.
fn basic_block(b: &mut Builder, x: &str, c: usize, stride: usize) -> Result<String> {
    let c_in = b.shape(x)?[0];
    let y = conv_bn_relu(b, x, c, stride)?;
    let y = b.conv(&y, Conv::new(c, 3).pad(1))?;
    let y = b.batchnorm(&y)?;
    let shortcut = if stride != 1 || c_in != c {
        let s = b.conv(x, Conv::new(c, 1).stride(stride))?;
        b.batchnorm(&s)?
    } else {
        x.to_string()
    };
    let sum = b.add(&y, &shortcut)?;
    b.relu(&sum)
}

/// ResNet-8: a 16-channel stem and one basic block per stage at 16, 32 and 64 channels.
pub fn resnet_small(cfg: &ZooConfig) -> Result<Model> {
    let mut b = Builder::new("resnet-small", &cfg.input, cfg.seed);
    let input = b.input();
    let mut x = conv_bn_relu(&mut b, &input, 16, 1)?;
    for (c, stride) in [(16, 1), (32, 2), (64, 2)] {
        x = basic_block(&mut b, &x, c, stride)?;
    }
    let x = b.global_avg_pool(&x)?;
    let x = b.flatten(&x)?;
    let logits = b.dense(&x, cfg.classes, Init::Glorot)?;
    b.finish(&logits)
}

/// A 32-channel stem, then depthwise 3x3 + pointwise 1x1 blocks (each conv followed by
/// BatchNorm and ReLU6), global average pool, classifier.
pub fn mobilenet_small(cfg: &ZooConfig) -> Result<Model> {
    let mut b = Builder::new("mobilenet-small", &cfg.input, cfg.seed);
    let input = b.input();
    let stem = b.conv(&input, Conv::new(32, 3).pad(1))?;
    let stem = b.batchnorm(&stem)?;
    let mut x = b.relu6(&stem)?;
    for (c, stride) in [(64, 1), (128, 2), (128, 1), (256, 2)] {
        let c_in = b.shape(&x)?[0];
        let d = b.conv(&x, Conv::new(c_in, 3).stride(stride).pad(1).groups(c_in))?;
        let d = b.batchnorm(&d)?;
        let d = b.relu6(&d)?;
        let p = b.conv(&d, Conv::new(c, 1))?;
        let p = b.batchnorm(&p)?;
        x = b.relu6(&p)?;
    }
    let x = b.global_avg_pool(&x)?;
    let x = b.flatten(&x)?;
    let logits = b.dense(&x, cfg.classes, Init::Glorot)?;
    b.finish(&logits)
}
