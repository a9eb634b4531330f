//! Losses on `[N, classes]` logits, each returning the mean loss over the batch and its
//! gradient with respect to the logits. Both are computed through log-sum-exp in f64, so
//! large logits neither overflow nor lose the small probabilities.

use crate::error::{Error, Result};
use crate::ir::Tensor;

/// Mean loss, gradient with respect to the (student) logits, and correctly classified count.
#[derive(Clone, Debug)]
pub struct LossOutput {
    pub loss: f64,
    pub grad: Tensor,
    pub correct: usize,
}

/// `(rows, classes, values)` of 2-D logits.
fn rows<'a>(logits: &'a Tensor, what: &str) -> Result<(usize, usize, &'a [f32])> {
    match *logits.shape() {
        [n, c] if c > 0 => Ok((n, c, logits.as_f32()?)),
        _ => Err(Error::Shape(format!(
            "{what} must be [batch, classes] logits, got {:?}",
            logits.shape()
        ))),
    }
}

/// `softmax(z / t)` of one row, in f64.
fn softmax_t(z: &[f32], t: f64) -> Vec<f64> {
    let max = z
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 / t));
    let e: Vec<f64> = z.iter().map(|&v| (v as f64 / t - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

fn argmax(z: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in z.iter().enumerate() {
        if v > z[best] {
            best = i;
        }
    }
    best
}

/// Checks every label is a class index of the logits.
pub fn check_labels(labels: &[i64], classes: usize) -> Result<()> {
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l < 0 || l as u64 >= classes as u64)
    {
        return Err(Error::Data(format!(
            "label {l} of sample {i} is outside the model's {classes} classes (0..{})",
            classes.saturating_sub(1)
        )));
    }
    Ok(())
}

/// Softmax cross-entropy of `logits` `[N, C]` against integer labels, averaged over the
/// batch: `mean(logsumexp(z) - z[label])`, gradient `(softmax(z) - onehot) / N`.
pub fn cross_entropy(logits: &Tensor, labels: &[i64]) -> Result<LossOutput> {
    let (n, c, z) = rows(logits, "cross-entropy input")?;
    if labels.len() != n {
        return Err(Error::Data(format!(
            "{} labels for a batch of {n}",
            labels.len()
        )));
    }
    check_labels(labels, c)?;
    let mut grad = vec![0.0f32; n * c];
    let mut loss = 0.0f64;
    let mut correct = 0;
    for (i, (row, g)) in z.chunks_exact(c).zip(grad.chunks_exact_mut(c)).enumerate() {
        let label = labels[i] as usize;
        // Non-finite logits make the loss NaN, so divergence is reported, not clamped away.
        if row.iter().any(|v| !v.is_finite()) {
            loss = f64::NAN;
        }
        let p = softmax_t(row, 1.0);
        loss -= p[label].max(f64::MIN_POSITIVE).ln();
        for (k, (gk, &pk)) in g.iter_mut().zip(&p).enumerate() {
            *gk = ((pk - (k == label) as u8 as f64) / n as f64) as f32;
        }
        correct += (argmax(row) == label) as usize;
    }
    Ok(LossOutput {
        loss: loss / n.max(1) as f64,
        grad: Tensor::from_f32(vec![n, c], grad)?,
        correct,
    })
}

/// Knowledge distillation (Hinton et al. 2015): `alpha * L_soft + beta * L_hard` where
/// `L_soft = T^2 * KL(softmax(teacher / T) || softmax(student / T))` and `L_hard` is the
/// cross-entropy with the labels. The `T^2` keeps the soft gradients' scale independent of T.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distillation {
    pub temperature: f32,
    pub alpha: f32,
    pub beta: f32,
}

impl Distillation {
    pub fn loss(&self, student: &Tensor, teacher: &Tensor, labels: &[i64]) -> Result<LossOutput> {
        let (n, c, zs) = rows(student, "student logits")?;
        let (nt, ct, zt) = rows(teacher, "teacher logits")?;
        if (n, c) != (nt, ct) {
            return Err(Error::Shape(format!(
                "student logits {:?} and teacher logits {:?} differ",
                student.shape(),
                teacher.shape()
            )));
        }
        let t = self.temperature as f64;
        if !(t > 0.0 && t.is_finite()) {
            return Err(Error::Data(format!(
                "distillation temperature {t} must be positive"
            )));
        }
        let hard = cross_entropy(student, labels)?;
        let (alpha, beta) = (self.alpha as f64, self.beta as f64);
        let mut soft = 0.0f64;
        let mut grad = vec![0.0f32; n * c];
        let hard_grad = hard.grad.as_f32()?;
        for i in 0..n {
            let ps = softmax_t(&zs[i * c..(i + 1) * c], t);
            let pt = softmax_t(&zt[i * c..(i + 1) * c], t);
            for k in 0..c {
                if pt[k] > 0.0 {
                    soft += pt[k] * (pt[k].ln() - ps[k].max(f64::MIN_POSITIVE).ln());
                }
                // d(T^2 KL)/dz_s = T (p_s - p_t); averaged over the batch.
                let g_soft = t * (ps[k] - pt[k]) / n as f64;
                grad[i * c + k] = (alpha * g_soft + beta * hard_grad[i * c + k] as f64) as f32;
            }
        }
        let soft = soft * t * t / n.max(1) as f64;
        Ok(LossOutput {
            loss: alpha * soft + beta * hard.loss,
            grad: Tensor::from_f32(vec![n, c], grad)?,
            correct: hard.correct,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric_grad(f: impl Fn(&Tensor) -> f64, x: &Tensor) -> Vec<f64> {
        let eps = 1e-3f32;
        (0..x.numel())
            .map(|i| {
                let mut a = x.clone();
                a.as_f32_mut().unwrap()[i] += eps;
                let mut b = x.clone();
                b.as_f32_mut().unwrap()[i] -= eps;
                (f(&a) - f(&b)) / (2.0 * eps as f64)
            })
            .collect()
    }

    #[test]
    fn cross_entropy_value_and_gradient() {
        let z = Tensor::from_f32(vec![2, 3], vec![1.0, 2.0, 3.0, 1000.0, -1000.0, 0.0]).unwrap();
        let out = cross_entropy(&z, &[2, 0]).unwrap();
        let want = (1.0f64 + (-1.0f64).exp() + (-2.0f64).exp()).ln() / 2.0;
        assert!((out.loss - want).abs() < 1e-9, "{} {want}", out.loss);
        assert_eq!(out.correct, 2);
        let z =
            Tensor::from_f32(vec![2, 4], vec![0.3, -1.2, 2.0, 0.1, 1.0, 1.5, -0.5, 0.0]).unwrap();
        let out = cross_entropy(&z, &[1, 3]).unwrap();
        let num = numeric_grad(|t| cross_entropy(t, &[1, 3]).unwrap().loss, &z);
        for (a, n) in out.grad.as_f32().unwrap().iter().zip(num) {
            assert!((*a as f64 - n).abs() < 1e-4, "{a} {n}");
        }
    }

    #[test]
    fn bad_labels_are_errors() {
        let z = Tensor::from_f32(vec![1, 3], vec![0.0; 3]).unwrap();
        let err = cross_entropy(&z, &[3]).unwrap_err().to_string();
        assert!(
            err.contains("label 3") && err.contains("3 classes"),
            "{err}"
        );
        assert!(cross_entropy(&z, &[-1]).is_err());
        assert!(cross_entropy(&z, &[0, 1]).is_err());
    }

    #[test]
    fn distillation_gradient_and_limits() {
        let s = Tensor::from_f32(vec![2, 3], vec![0.5, -0.2, 1.0, 2.0, 0.0, -1.0]).unwrap();
        let t = Tensor::from_f32(vec![2, 3], vec![1.5, 0.2, -1.0, 0.0, 3.0, 0.5]).unwrap();
        let d = Distillation {
            temperature: 4.0,
            alpha: 0.7,
            beta: 0.3,
        };
        let out = d.loss(&s, &t, &[2, 1]).unwrap();
        let num = numeric_grad(|x| d.loss(x, &t, &[2, 1]).unwrap().loss, &s);
        for (a, n) in out.grad.as_f32().unwrap().iter().zip(num) {
            assert!((*a as f64 - n).abs() < 1e-4, "{a} {n}");
        }
        // A student equal to its teacher has zero soft loss.
        let same = d.loss(&t, &t, &[0, 1]).unwrap();
        let hard = cross_entropy(&t, &[0, 1]).unwrap();
        assert!((same.loss - d.beta as f64 * hard.loss).abs() < 1e-12);
    }
}
