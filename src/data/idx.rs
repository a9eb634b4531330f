//! IDX files, the format of MNIST and Fashion-MNIST, raw or gzipped (detected by magic).
//!
//! Layout: two zero bytes, a type code, the rank, one big-endian u32 per dimension, then
//! big-endian data in row-major order.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::error::{Error, Result};
use crate::ir::{checked_numel, Tensor, TensorData};

const MAX_RANK: usize = 8;

/// An opened IDX file: a reader positioned at the data, its element type code and shape.
struct Opened {
    reader: Box<dyn Read + Send>,
    elem_size: usize,
    code: u8,
    shape: Vec<usize>,
}

fn data_error(path: &Path, msg: String) -> Error {
    Error::Data(format!("{}: {msg}", path.display()))
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        data_error(path, "file is truncated".into())
    } else {
        Error::io(path, e)
    }
}

/// Opens `path` (raw or gzipped) and reads the header.
fn open_idx(path: &Path) -> Result<Opened> {
    let err = |msg: String| data_error(path, msg);
    let io = |e: std::io::Error| io_error(path, e);
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buffered = BufReader::new(file);
    let gzipped = buffered.fill_buf().map_err(io)?.starts_with(&[0x1f, 0x8b]);
    let mut r: Box<dyn Read + Send> = if gzipped {
        Box::new(GzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };

    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).map_err(io)?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(err("not an IDX file (bad magic)".into()));
    }
    let (elem_size, code) = match magic[2] {
        0x08 | 0x09 => (1, magic[2]),
        0x0b => (2, magic[2]),
        0x0c | 0x0d => (4, magic[2]),
        0x0e => (8, magic[2]),
        other => return Err(err(format!("unknown IDX element type 0x{other:02x}"))),
    };
    let rank = magic[3] as usize;
    if rank > MAX_RANK {
        return Err(err(format!("rank {rank} is too large")));
    }
    let mut shape = Vec::with_capacity(rank);
    for _ in 0..rank {
        let mut d = [0u8; 4];
        r.read_exact(&mut d).map_err(io)?;
        shape.push(u32::from_be_bytes(d) as usize);
    }
    Ok(Opened {
        reader: r,
        elem_size,
        code,
        shape,
    })
}

/// Reads any IDX file into a tensor of its element type (u8, i8, i16, i32, f32 or f64).
pub fn read_idx(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let err = |msg: String| data_error(path, msg);
    let io = |e: std::io::Error| io_error(path, e);
    let Opened {
        reader: mut r,
        elem_size,
        code,
        shape,
    } = open_idx(path)?;
    let numel = checked_numel(&shape, elem_size).map_err(|e| err(e.to_string()))?;
    // Read in chunks so a header that lies about the size fails at EOF, not in the allocator.
    let nbytes = numel * elem_size;
    let mut bytes = Vec::with_capacity(nbytes.min(64 << 20));
    let got = r
        .by_ref()
        .take(nbytes as u64)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if got != nbytes {
        return Err(err(format!(
            "data is truncated: shape {shape:?} needs {nbytes} bytes, found {got}"
        )));
    }
    let mut probe = [0u8; 1];
    if r.read(&mut probe).map_err(io)? != 0 {
        return Err(err(format!(
            "has bytes past the {nbytes} that shape {shape:?} needs"
        )));
    }
    fn be<T, const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    let data = match code {
        0x08 => TensorData::U8(bytes),
        0x09 => TensorData::I8(bytes.into_iter().map(|b| b as i8).collect()),
        0x0b => TensorData::I16(be(&bytes, i16::from_be_bytes)),
        0x0c => TensorData::I32(be(&bytes, i32::from_be_bytes)),
        0x0d => TensorData::F32(be(&bytes, f32::from_be_bytes)),
        _ => TensorData::F64(be(&bytes, f64::from_be_bytes)),
    };
    Tensor::new(shape, data).map_err(|e| err(e.to_string()))
}

/// Reads an IDX image file: u8 of shape [N, rows, cols].
pub fn read_idx_images(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let t = read_idx(path)?;
    if t.rank() != 3 || !matches!(t.data(), TensorData::U8(_)) {
        return Err(Error::Data(format!(
            "{}: expected u8 images of shape [N, rows, cols], found {} {:?}",
            path.display(),
            t.dtype(),
            t.shape()
        )));
    }
    Ok(t)
}

/// An IDX u8 image file ([N, rows, cols]) read front to back, some images at a time: a pass
/// over the first images of a gzipped set decompresses (and holds) only those.
pub struct IdxImageStream {
    path: PathBuf,
    reader: Box<dyn Read + Send>,
    count: usize,
    rows: usize,
    cols: usize,
    /// Index of the next image the reader is at.
    next: usize,
}

impl IdxImageStream {
    /// Opens `path` and checks its header.
    pub fn open(path: impl AsRef<Path>) -> Result<IdxImageStream> {
        let path = path.as_ref();
        let o = open_idx(path)?;
        let [count, rows, cols] = o.shape[..] else {
            return Err(not_images(path, o.code, &o.shape));
        };
        if o.code != 0x08 {
            return Err(not_images(path, o.code, &o.shape));
        }
        checked_numel(&o.shape, 1).map_err(|e| data_error(path, e.to_string()))?;
        Ok(IdxImageStream {
            path: path.to_path_buf(),
            reader: o.reader,
            count,
            rows,
            cols,
            next: 0,
        })
    }

    /// Images in the file.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Rows and columns of each image.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Index of the next image [`IdxImageStream::read`] can return without reopening.
    pub fn position(&self) -> usize {
        self.next
    }

    /// Pixels of images `start .. end` (`start` at or after [`IdxImageStream::position`],
    /// `end` at most the image count); the images before `start` are skipped.
    pub fn read(&mut self, start: usize, end: usize) -> Result<Vec<u8>> {
        if start < self.next || start > end || end > self.count {
            return Err(data_error(
                &self.path,
                format!(
                    "cannot read images {start}..{end} at image {} of {}",
                    self.next, self.count
                ),
            ));
        }
        let px = self.rows * self.cols;
        let skip = ((start - self.next) * px) as u64;
        let copied = std::io::copy(&mut self.reader.by_ref().take(skip), &mut std::io::sink())
            .map_err(|e| io_error(&self.path, e))?;
        if copied != skip {
            return Err(self.truncated());
        }
        // Grown as data arrives, so a header that lies about the size fails at EOF, not in
        // the allocator.
        let want = (end - start) * px;
        let mut out = Vec::with_capacity(want.min(64 << 20));
        let got = self
            .reader
            .by_ref()
            .take(want as u64)
            .read_to_end(&mut out)
            .map_err(|e| io_error(&self.path, e))?;
        if got != want {
            return Err(self.truncated());
        }
        self.next = end;
        Ok(out)
    }

    fn truncated(&self) -> Error {
        data_error(
            &self.path,
            format!(
                "data is truncated: shape [{}, {}, {}] needs {} bytes",
                self.count,
                self.rows,
                self.cols,
                self.count * self.rows * self.cols
            ),
        )
    }
}

fn not_images(path: &Path, code: u8, shape: &[usize]) -> Error {
    let dtype = match code {
        0x08 => "u8",
        0x09 => "i8",
        0x0b => "i16",
        0x0c => "i32",
        0x0d => "f32",
        _ => "f64",
    };
    data_error(
        path,
        format!("expected u8 images of shape [N, rows, cols], found {dtype} {shape:?}"),
    )
}

/// Reads an IDX label file: u8 of shape [N], widened to i64.
pub fn read_idx_labels(path: impl AsRef<Path>) -> Result<Vec<i64>> {
    let path = path.as_ref();
    let t = read_idx(path)?;
    match t.data() {
        TensorData::U8(v) if t.rank() == 1 => Ok(v.iter().map(|&x| x as i64).collect()),
        _ => Err(Error::Data(format!(
            "{}: expected u8 labels of shape [N], found {} {:?}",
            path.display(),
            t.dtype(),
            t.shape()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::{shared_dir, TempDir};
    use std::io::Write;

    fn idx_bytes(code: u8, shape: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, code, shape.len() as u8];
        for d in shape {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn raw_and_gzip_small_files() {
        let dir = TempDir::new("idx");
        let raw = idx_bytes(8, &[2, 2, 3], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255]);
        for (name, bytes) in [("a.idx", raw.clone()), ("a.idx.gz", gzip(&raw))] {
            let p = dir.path(name);
            std::fs::write(&p, bytes).unwrap();
            let t = read_idx_images(&p).unwrap();
            assert_eq!(t.shape(), &[2, 2, 3]);
            assert_eq!(t.to_f32_vec()[11], 255.0);
        }
        let p = dir.path("l.idx");
        std::fs::write(&p, idx_bytes(8, &[3], &[7, 2, 1])).unwrap();
        assert_eq!(read_idx_labels(&p).unwrap(), vec![7, 2, 1]);
        assert!(read_idx_images(&p).is_err());
        let p = dir.path("f.idx");
        std::fs::write(
            &p,
            idx_bytes(0x0d, &[2], &[0x3f, 0x80, 0, 0, 0xc0, 0, 0, 0]),
        )
        .unwrap();
        assert_eq!(read_idx(&p).unwrap().as_f32().unwrap(), &[1.0, -2.0]);
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let dir = TempDir::new("idx");
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![1, 2, 3, 4],
            idx_bytes(0x07, &[1], &[0]),
            idx_bytes(8, &[4], &[1, 2]),
            idx_bytes(8, &[1], &[1, 2]),
            idx_bytes(8, &[0xffff_ffff, 0xffff_ffff, 0xffff_ffff], &[]),
            idx_bytes(8, &[1; 9], &[0]),
            gzip(&idx_bytes(8, &[100_000, 28, 28], &[0; 10])),
            vec![0x1f, 0x8b, 0, 0],
        ];
        for (i, bytes) in cases.into_iter().enumerate() {
            let p = dir.path(&format!("bad{i}.idx"));
            std::fs::write(&p, bytes).unwrap();
            let err = read_idx(&p).unwrap_err().to_string();
            assert!(err.contains(&format!("bad{i}.idx")), "{err}");
        }
        let missing = read_idx(dir.path("none.idx")).unwrap_err().to_string();
        assert!(missing.contains("none.idx"), "{missing}");
    }

    #[test]
    fn real_mnist_test_set() {
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/mnist");
        let images = read_idx_images(assets.join("t10k-images-idx3-ubyte.gz")).unwrap();
        let labels = read_idx_labels(assets.join("t10k-labels-idx1-ubyte.gz")).unwrap();
        assert_eq!(images.shape(), &[10000, 28, 28]);
        assert_eq!(labels.len(), 10000);
        assert_eq!(&labels[..5], &[7, 2, 1, 0, 4]);
        // Pixel sum of the first image, from numpy.
        let first: f32 = images.to_f32_vec()[..784].iter().sum();
        assert_eq!(first, 18454.0);
        if let Some(shared) = shared_dir("real_mnist_test_set (fashion)") {
            let f = shared.join("datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz");
            let fl = read_idx_labels(f).unwrap();
            assert_eq!(&fl[..3], &[9, 2, 1]);
        }
    }
}
