//! Dense tensors: a concrete shape and a typed, row-major buffer.

use std::sync::Arc;

use super::dtype::{f16_to_f32, DType};
use crate::error::{Error, Result};

/// Largest tensor we agree to allocate. Guards every size that comes from a file so a
/// malformed model gets an error instead of an abort from the allocator.
pub const MAX_TENSOR_BYTES: usize = 16 << 30;

#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<u16>),
    F64(Vec<f64>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::F64(_) => DType::F64,
            TensorData::I8(_) => DType::I8,
            TensorData::U8(_) => DType::U8,
            TensorData::I16(_) => DType::I16,
            TensorData::I32(_) => DType::I32,
            TensorData::I64(_) => DType::I64,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::I16(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Clones share the buffer until one of them is written (copy on write): passes copy whole
/// models and sessions keep initializers as constants, and none of that should copy weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Arc<TensorData>,
}

/// Number of elements of `shape`, or an error when the product overflows or exceeds
/// [`MAX_TENSOR_BYTES`] (or the memory available when the process started, if less) for
/// elements of `elem_size` bytes.
pub fn checked_numel(shape: &[usize], elem_size: usize) -> Result<usize> {
    let mut n: usize = 1;
    for &d in shape {
        n = n
            .checked_mul(d)
            .ok_or_else(|| Error::TooLarge(format!("shape {shape:?} overflows")))?;
    }
    let bytes = n.saturating_mul(elem_size.max(1));
    if bytes > MAX_TENSOR_BYTES {
        return Err(Error::TooLarge(format!(
            "shape {shape:?} needs {bytes} bytes, more than the {MAX_TENSOR_BYTES} byte limit"
        )));
    }
    if let Some(available) = crate::memory::available() {
        if bytes > available {
            return Err(Error::TooLarge(format!(
                "shape {shape:?} needs {bytes} bytes, more than the {available} bytes of memory available (byte limit {MAX_TENSOR_BYTES})"
            )));
        }
    }
    Ok(n)
}

impl Tensor {
    /// Builds a tensor, checking that the buffer length matches the shape.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Tensor> {
        let n = checked_numel(&shape, data.dtype().size_of())?;
        if n != data.len() {
            return Err(Error::Shape(format!(
                "shape {shape:?} needs {n} elements but the buffer has {}",
                data.len()
            )));
        }
        Ok(Tensor {
            shape,
            data: Arc::new(data),
        })
    }

    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor> {
        Tensor::new(shape, TensorData::F32(data))
    }

    pub fn from_i64(shape: Vec<usize>, data: Vec<i64>) -> Result<Tensor> {
        Tensor::new(shape, TensorData::I64(data))
    }

    pub fn scalar_f32(v: f32) -> Tensor {
        Tensor {
            shape: vec![],
            data: Arc::new(TensorData::F32(vec![v])),
        }
    }

    pub fn scalar_i64(v: i64) -> Tensor {
        Tensor {
            shape: vec![],
            data: Arc::new(TensorData::I64(vec![v])),
        }
    }

    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Result<Tensor> {
        let n = checked_numel(&shape, dtype.size_of())?;
        let data = match dtype {
            DType::F32 => TensorData::F32(vec![0.0; n]),
            DType::F16 => TensorData::F16(vec![0; n]),
            DType::F64 => TensorData::F64(vec![0.0; n]),
            DType::I8 => TensorData::I8(vec![0; n]),
            DType::U8 => TensorData::U8(vec![0; n]),
            DType::I16 => TensorData::I16(vec![0; n]),
            DType::I32 => TensorData::I32(vec![0; n]),
            DType::I64 => TensorData::I64(vec![0; n]),
            DType::Bool => TensorData::Bool(vec![false; n]),
        };
        Ok(Tensor {
            shape,
            data: Arc::new(data),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// The buffer, copied first if another clone shares it.
    pub fn data_mut(&mut self) -> &mut TensorData {
        Arc::make_mut(&mut self.data)
    }

    /// The buffer, copied if another clone shares it.
    pub fn into_data(self) -> TensorData {
        Arc::unwrap_or_clone(self.data)
    }

    /// The buffer when no other clone shares it.
    pub fn into_unshared_data(self) -> Option<TensorData> {
        Arc::try_unwrap(self.data).ok()
    }

    pub fn into_parts(self) -> (Vec<usize>, TensorData) {
        (self.shape, Arc::unwrap_or_clone(self.data))
    }

    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype().size_of()
    }

    /// Entries `start .. end` of the first axis (samples of a batch), copied.
    pub fn rows(&self, start: usize, end: usize) -> Result<Tensor> {
        let (&n, rest) = self
            .shape
            .split_first()
            .ok_or_else(|| Error::Shape("a scalar has no rows".into()))?;
        if start > end || end > n {
            return Err(Error::Shape(format!(
                "rows {start}..{end} of a tensor of shape {:?}",
                self.shape
            )));
        }
        let per: usize = rest.iter().product();
        let (a, b) = (start * per, end * per);
        let data = match self.data.as_ref() {
            TensorData::F32(v) => TensorData::F32(v[a..b].to_vec()),
            TensorData::F16(v) => TensorData::F16(v[a..b].to_vec()),
            TensorData::F64(v) => TensorData::F64(v[a..b].to_vec()),
            TensorData::I8(v) => TensorData::I8(v[a..b].to_vec()),
            TensorData::U8(v) => TensorData::U8(v[a..b].to_vec()),
            TensorData::I16(v) => TensorData::I16(v[a..b].to_vec()),
            TensorData::I32(v) => TensorData::I32(v[a..b].to_vec()),
            TensorData::I64(v) => TensorData::I64(v[a..b].to_vec()),
            TensorData::Bool(v) => TensorData::Bool(v[a..b].to_vec()),
        };
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        Tensor::new(shape, data)
    }

    /// Same data under a new shape with the same element count.
    pub fn reshaped(mut self, shape: Vec<usize>) -> Result<Tensor> {
        let n = checked_numel(&shape, 1)?;
        if n != self.numel() {
            return Err(Error::Shape(format!(
                "cannot reshape {:?} ({} elements) to {:?}",
                self.shape,
                self.numel(),
                shape
            )));
        }
        self.shape = shape;
        Ok(self)
    }

    pub fn as_f32(&self) -> Result<&[f32]> {
        match self.data.as_ref() {
            TensorData::F32(v) => Ok(v),
            other => Err(Error::DType(format!("expected f32, got {}", other.dtype()))),
        }
    }

    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        match Arc::make_mut(&mut self.data) {
            TensorData::F32(v) => Ok(v),
            other => Err(Error::DType(format!("expected f32, got {}", other.dtype()))),
        }
    }

    pub fn as_i64(&self) -> Result<&[i64]> {
        match self.data.as_ref() {
            TensorData::I64(v) => Ok(v),
            other => Err(Error::DType(format!("expected i64, got {}", other.dtype()))),
        }
    }

    /// Integer view of an index-like tensor (i32 or i64), as used by Reshape, Slice, Gather...
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        Ok(match self.data.as_ref() {
            TensorData::I64(v) => v.clone(),
            TensorData::I32(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::I16(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::I8(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::U8(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::Bool(v) => v.iter().map(|&x| x as i64).collect(),
            other => {
                return Err(Error::DType(format!(
                    "expected an integer tensor, got {}",
                    other.dtype()
                )))
            }
        })
    }

    /// Every element widened or converted to f32 (lossy for large integers).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.data.as_ref() {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|&x| f16_to_f32(x)).collect(),
            TensorData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I8(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::U8(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I16(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::Bool(v) => v.iter().map(|&x| x as u8 as f32).collect(),
        }
    }

    /// Converts to f32 storage, keeping the shape.
    pub fn to_f32(&self) -> Tensor {
        Tensor {
            shape: self.shape.clone(),
            data: Arc::new(TensorData::F32(self.to_f32_vec())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_length() {
        assert!(Tensor::from_f32(vec![2, 3], vec![0.0; 6]).is_ok());
        assert!(Tensor::from_f32(vec![2, 3], vec![0.0; 5]).is_err());
    }

    #[test]
    fn huge_shapes_are_errors_not_aborts() {
        assert!(Tensor::zeros(DType::F32, vec![usize::MAX, 2]).is_err());
        assert!(Tensor::zeros(DType::F32, vec![1 << 20, 1 << 20]).is_err());
    }

    #[test]
    fn reshape_keeps_data() {
        let t = Tensor::from_f32(vec![2, 3], (0..6).map(|x| x as f32).collect()).unwrap();
        let r = t.reshaped(vec![3, 2]).unwrap();
        assert_eq!(r.shape(), &[3, 2]);
        assert_eq!(r.as_f32().unwrap()[5], 5.0);
    }
}
