//! NumPy `.npz` archives: a zip of `.npy` members, as written by `np.savez` (stored) and
//! `np.savez_compressed` (deflate).
//!
//! The reader is a small zip reader of our own (central directory, zip64, stored and deflate
//! members, CRC-checked) rather than the `zip` crate: npz needs a fraction of zip and flate2
//! is already a dependency. The writer stores members uncompressed, as `np.savez` does.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use flate2::read::DeflateDecoder;
use flate2::Crc;

use crate::data::atomic::write_atomic_with;
use crate::data::npy::{decode_npy, encode_npy, raw_layout};
use crate::error::{Error, Result};
use crate::ir::tensor::MAX_TENSOR_BYTES;
use crate::ir::{DType, Tensor};

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const EOCD_LEN: usize = 22;
/// The end record plus the longest possible archive comment.
const MAX_TAIL: u64 = EOCD_LEN as u64 + 0xffff;
const MAX_ENTRIES: u64 = 1 << 20;
const MAX_CENTRAL_DIR: u64 = 256 << 20;
/// Room for the `.npy` header on top of the largest tensor we accept.
const MAX_MEMBER: u64 = MAX_TENSOR_BYTES as u64 + (2 << 20);

/// Reads every array of an `.npz` file, in archive order. Names lose their `.npy` suffix;
/// members that are not `.npy` files are skipped, as numpy only loads `.npy` members as arrays.
pub fn read_npz(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let mut archive = NpzArchive::open(path)?;
    let names: Vec<String> = archive.names().map(str::to_string).collect();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let t = archive.read(&name)?;
        out.push((name, t));
    }
    Ok(out)
}

/// Writes arrays to an `.npz` file that `np.load` reads, atomically. Members are stored
/// uncompressed (as by `np.savez`), each under 4 GiB.
pub fn write_npz(path: impl AsRef<Path>, arrays: &[(String, Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let err = |msg: String| Error::Data(format!("{}: {msg}", path.display()));
    let mut total: u64 = 0;
    for (i, (name, t)) in arrays.iter().enumerate() {
        if name.is_empty() || name.len() > 0xff00 {
            return Err(err(format!("array name '{name}' is empty or too long")));
        }
        if arrays[..i].iter().any(|(n, _)| n == name) {
            return Err(err(format!("array name '{name}' appears twice")));
        }
        // The .npy header is far below 4 KiB for any shape a Tensor can have.
        total += t.size_in_bytes() as u64 + 4096 + 2 * (46 + name.len() as u64);
    }
    if total >= 0xffff_ffff {
        return Err(Error::TooLarge(format!(
            "{}: arrays of about {total} bytes need zip64, which the npz writer does not write",
            path.display()
        )));
    }
    write_atomic_with(path, |w| write_members(w, arrays))
}

struct Member {
    name: Vec<u8>,
    crc: u32,
    size: u32,
    offset: u32,
}

fn write_members(w: &mut dyn Write, arrays: &[(String, Tensor)]) -> std::io::Result<()> {
    let mut members = Vec::with_capacity(arrays.len());
    let mut offset: u32 = 0;
    for (name, tensor) in arrays {
        let data = encode_npy(tensor);
        let mut crc = Crc::new();
        crc.update(&data);
        // Sizes were bounded by write_npz, so these conversions cannot truncate.
        let m = Member {
            name: format!("{name}.npy").into_bytes(),
            crc: crc.sum(),
            size: data.len() as u32,
            offset,
        };
        let mut h = Vec::with_capacity(30 + m.name.len());
        put32(&mut h, LOCAL_SIG);
        put_common(&mut h, &m);
        put16(&mut h, 0); // extra field length
        h.extend_from_slice(&m.name);
        w.write_all(&h)?;
        w.write_all(&data)?;
        offset += (h.len() + data.len()) as u32;
        members.push(m);
    }
    let cd_start = offset;
    let mut cd = Vec::new();
    for m in &members {
        put32(&mut cd, CENTRAL_SIG);
        put16(&mut cd, 20); // made by: MS-DOS attributes, zip 2.0
        put_common(&mut cd, m);
        put16(&mut cd, 0); // extra field length
        put16(&mut cd, 0); // comment length
        put16(&mut cd, 0); // disk number
        put16(&mut cd, 0); // internal attributes
        put32(&mut cd, 0); // external attributes
        put32(&mut cd, m.offset);
        cd.extend_from_slice(&m.name);
    }
    let cd_size = cd.len() as u32;
    put32(&mut cd, EOCD_SIG);
    put16(&mut cd, 0);
    put16(&mut cd, 0);
    let count = members.len().min(0xffff) as u16;
    put16(&mut cd, count);
    put16(&mut cd, count);
    put32(&mut cd, cd_size);
    put32(&mut cd, cd_start);
    put16(&mut cd, 0);
    w.write_all(&cd)
}

/// The fields local and central headers share, from "version needed" to the extra length.
fn put_common(h: &mut Vec<u8>, m: &Member) {
    put16(h, 20); // version needed
    let utf8_flag = if m.name.is_ascii() { 0 } else { 1 << 11 };
    put16(h, utf8_flag);
    put16(h, 0); // stored
    put16(h, 0); // time: fixed, so identical inputs give identical files
    put16(h, (1 << 5) | 1); // date: 1980-01-01
    put32(h, m.crc);
    put32(h, m.size);
    put32(h, m.size);
    put16(h, m.name.len() as u16);
}

fn put16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}

struct Entry {
    /// Array name: the member name without `.npy`.
    name: String,
    method: u16,
    crc: u32,
    compressed: u64,
    size: u64,
    local_offset: u64,
}

/// An uncompressed array of an `.npz`, located in the file (see [`NpzArchive::stored_array`]).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredArray {
    /// File offset of the first element.
    pub offset: u64,
    pub shape: Vec<usize>,
    /// `F32` (little-endian) or `U8`.
    pub dtype: DType,
}

/// An open `.npz` file whose arrays can be read one at a time, so a caller that needs two
/// arrays of a large archive does not decode the rest.
pub struct NpzArchive {
    path: PathBuf,
    file: BufReader<File>,
    file_len: u64,
    entries: Vec<Entry>,
}

impl NpzArchive {
    pub fn open(path: impl AsRef<Path>) -> Result<NpzArchive> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let mut archive = NpzArchive {
            path,
            file: BufReader::new(file),
            file_len,
            entries: Vec::new(),
        };
        archive.entries = archive.read_central_directory()?;
        Ok(archive)
    }

    /// Array names in archive order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    /// Decodes one array by name (without `.npy`).
    pub fn read(&mut self, name: &str) -> Result<Tensor> {
        let idx = self
            .entries
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| self.err(format!("no array named '{name}'")))?;
        let bytes = self.member_bytes(idx)?;
        decode_npy(&bytes, &format!("{}:{name}.npy", self.path.display()))
    }

    fn err(&self, msg: String) -> Error {
        Error::Data(format!("{}: {msg}", self.path.display()))
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::io(&self.path, e)
    }

    fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.file_len)
        {
            return Err(self.err(format!(
                "truncated: {len} bytes at offset {offset} lie past the end of the file"
            )));
        }
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| self.io(e))?;
        let mut buf = vec![0u8; len];
        self.file.read_exact(&mut buf).map_err(|e| self.io(e))?;
        Ok(buf)
    }

    fn read_central_directory(&mut self) -> Result<Vec<Entry>> {
        let tail_len = self.file_len.min(MAX_TAIL);
        let tail_start = self.file_len - tail_len;
        let tail = self.read_at(tail_start, tail_len as usize)?;
        let eocd_pos = find_eocd(&tail).ok_or_else(|| {
            self.err("not a zip/npz file (no end-of-central-directory record)".into())
        })?;
        let e = &tail[eocd_pos..];
        let mut count = le16(e, 10) as u64;
        let mut cd_size = le32(e, 12) as u64;
        let mut cd_offset = le32(e, 16) as u64;
        if count == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
            let abs = tail_start + eocd_pos as u64;
            (count, cd_size, cd_offset) = self.read_zip64_end(abs)?;
        }
        if count > MAX_ENTRIES || cd_size > MAX_CENTRAL_DIR {
            return Err(self.err(format!(
                "central directory of {count} entries / {cd_size} bytes is implausibly large"
            )));
        }
        let cd = self.read_at(cd_offset, cd_size as usize)?;
        let mut entries = Vec::with_capacity(count as usize);
        let mut p = 0usize;
        for _ in 0..count {
            let h = cd
                .get(p..p + 46)
                .ok_or_else(|| self.err("central directory is truncated".into()))?;
            if le32(h, 0) != CENTRAL_SIG {
                return Err(self.err("corrupt central directory entry".into()));
            }
            let flags = le16(h, 8);
            let method = le16(h, 10);
            let crc = le32(h, 16);
            let mut compressed = le32(h, 20) as u64;
            let mut size = le32(h, 24) as u64;
            let (n, m, k) = (
                le16(h, 28) as usize,
                le16(h, 30) as usize,
                le16(h, 32) as usize,
            );
            let mut local_offset = le32(h, 42) as u64;
            let name_bytes = cd
                .get(p + 46..p + 46 + n)
                .ok_or_else(|| self.err("central directory is truncated".into()))?;
            let extra = cd
                .get(p + 46 + n..p + 46 + n + m)
                .ok_or_else(|| self.err("central directory is truncated".into()))?;
            let member = String::from_utf8_lossy(name_bytes).into_owned();
            p += 46 + n + m + k;
            // Only fields saturated in the fixed header appear in the zip64 extra, in order.
            let mut z64 = zip64_extra(extra).unwrap_or(&[]);
            for field in [&mut size, &mut compressed, &mut local_offset] {
                if *field == 0xffff_ffff {
                    if z64.len() < 8 {
                        return Err(self.err(format!("member '{member}': zip64 sizes are missing")));
                    }
                    *field = u64::from_le_bytes(z64[..8].try_into().unwrap_or([0xff; 8]));
                    z64 = &z64[8..];
                }
            }
            let Some(name) = member.strip_suffix(".npy") else {
                continue;
            };
            if flags & 1 != 0 {
                return Err(self.err(format!("member '{member}' is encrypted")));
            }
            if method != 0 && method != 8 {
                return Err(self.err(format!(
                    "member '{member}' uses zip compression method {method}; only stored (0) \
                     and deflate (8) are supported"
                )));
            }
            if size > MAX_MEMBER || compressed > self.file_len {
                return Err(self.err(format!(
                    "member '{member}' declares an implausible size ({size} bytes, \
                     {compressed} compressed)"
                )));
            }
            entries.push(Entry {
                name: name.to_string(),
                method,
                crc,
                compressed,
                size,
                local_offset,
            });
        }
        Ok(entries)
    }

    fn read_zip64_end(&mut self, eocd_abs: u64) -> Result<(u64, u64, u64)> {
        let bad = || "zip64 end record is missing or corrupt".to_string();
        let loc_pos = eocd_abs.checked_sub(20).ok_or_else(|| self.err(bad()))?;
        let loc = self.read_at(loc_pos, 20)?;
        if le32(&loc, 0) != ZIP64_LOCATOR_SIG {
            return Err(self.err(bad()));
        }
        let end_pos = le64(&loc, 8);
        let end = self.read_at(end_pos, 56)?;
        if le32(&end, 0) != ZIP64_EOCD_SIG {
            return Err(self.err(bad()));
        }
        Ok((le64(&end, 32), le64(&end, 40), le64(&end, 48)))
    }

    /// Where the data of an uncompressed f32 or u8 array (little-endian, C order) lies in the
    /// file, for reading it a slice at a time: `None` when `name` is compressed, of another
    /// type or layout, or absent (read those with [`NpzArchive::read`]). The member's CRC is
    /// checked now, streaming, without holding its data.
    pub fn stored_array(&mut self, name: &str) -> Result<Option<StoredArray>> {
        let Some(idx) = self.entries.iter().position(|e| e.name == name) else {
            return Ok(None);
        };
        let (compressed, size, method, crc_expect) = {
            let e = &self.entries[idx];
            (e.compressed, e.size, e.method, e.crc)
        };
        if method != 0 || compressed != size {
            return Ok(None);
        }
        let start = self.member_start(idx)?;
        // numpy's headers are a few hundred bytes; a longer one is decoded the general way.
        let prefix = self.read_at(start, size.min(4096) as usize)?;
        let Some((shape, dtype, data_start, nbytes)) = raw_layout(&prefix) else {
            return Ok(None);
        };
        if (data_start + nbytes) as u64 > size {
            return Ok(None);
        }
        self.file
            .seek(SeekFrom::Start(start))
            .map_err(|e| self.io(e))?;
        let mut crc = flate2::CrcReader::new((&mut self.file).take(size));
        let copied = std::io::copy(&mut crc, &mut std::io::sink());
        let sum = crc.crc().sum();
        if copied.map_err(|e| self.io(e))? != size {
            return Err(self.err(format!("member '{name}.npy' is truncated")));
        }
        if sum != crc_expect {
            return Err(self.err(format!("member '{name}.npy': CRC mismatch (corrupt file)")));
        }
        Ok(Some(StoredArray {
            offset: start + data_start as u64,
            shape,
            dtype,
        }))
    }

    /// File offset of member `idx`'s data, checked to lie within the file.
    fn member_start(&mut self, idx: usize) -> Result<u64> {
        let (local_offset, compressed) = {
            let e = &self.entries[idx];
            (e.local_offset, e.compressed)
        };
        let name = self.entries[idx].name.clone();
        let local = self.read_at(local_offset, 30)?;
        if le32(&local, 0) != LOCAL_SIG {
            return Err(self.err(format!("member '{name}.npy': bad local header")));
        }
        // The local sizes may be placeholders (numpy forces zip64 there); the central
        // directory is authoritative, only the local name/extra lengths are needed.
        let data_start = local_offset + 30 + le16(&local, 26) as u64 + le16(&local, 28) as u64;
        if data_start
            .checked_add(compressed)
            .is_none_or(|end| end > self.file_len)
        {
            return Err(self.err(format!("member '{name}.npy' is truncated")));
        }
        Ok(data_start)
    }

    fn member_bytes(&mut self, idx: usize) -> Result<Vec<u8>> {
        let (compressed, size, method, crc_expect) = {
            let e = &self.entries[idx];
            (e.compressed, e.size, e.method, e.crc)
        };
        let name = self.entries[idx].name.clone();
        let data_start = self.member_start(idx)?;
        self.file
            .seek(SeekFrom::Start(data_start))
            .map_err(|e| self.io(e))?;
        let raw = (&mut self.file).take(compressed);
        let data = if method == 0 {
            if compressed != size {
                return Err(self.err(format!(
                    "member '{name}.npy': stored sizes disagree ({compressed} vs {size})"
                )));
            }
            // Bounded by the file's length (checked above); read into spare capacity rather
            // than a zeroed buffer, so each page is written once.
            let mut buf = Vec::with_capacity(size as usize);
            raw.take(size)
                .read_to_end(&mut buf)
                .map_err(|e| self.io(e))?;
            if buf.len() as u64 != size {
                return Err(self.err(format!("member '{name}.npy' is truncated")));
            }
            buf
        } else {
            // Deflate expands at most ~1032:1, which bounds what an honest member can claim
            // and keeps a lying header from reserving gigabytes up front.
            let reserve = size.min(compressed.saturating_mul(1040) + 4096) as usize;
            let mut buf = Vec::with_capacity(reserve);
            DeflateDecoder::new(raw)
                .take(size + 1)
                .read_to_end(&mut buf)
                .map_err(|e| self.err(format!("member '{name}.npy': bad deflate data: {e}")))?;
            if buf.len() as u64 != size {
                return Err(self.err(format!(
                    "member '{name}.npy' inflates to {} bytes, the archive says {size}",
                    buf.len()
                )));
            }
            buf
        };
        let mut crc = Crc::new();
        crc.update(&data);
        if crc.sum() != crc_expect {
            return Err(self.err(format!("member '{name}.npy': CRC mismatch (corrupt file)")));
        }
        Ok(data)
    }
}

/// Position of the end-of-central-directory record in `tail`: the last signature whose
/// comment length reaches exactly to the end, else the last signature at all.
fn find_eocd(tail: &[u8]) -> Option<usize> {
    if tail.len() < EOCD_LEN {
        return None;
    }
    let candidates = (0..=tail.len() - EOCD_LEN)
        .rev()
        .filter(|&i| le32(tail, i) == EOCD_SIG);
    let mut fallback = None;
    for i in candidates {
        if i + EOCD_LEN + le16(tail, i + 20) as usize == tail.len() {
            return Some(i);
        }
        fallback.get_or_insert(i);
    }
    fallback
}

/// Data of the zip64 extended-information field (id 1) within a header's extra field.
fn zip64_extra(mut extra: &[u8]) -> Option<&[u8]> {
    while extra.len() >= 4 {
        let id = le16(extra, 0);
        let len = le16(extra, 2) as usize;
        let body = extra.get(4..4 + len)?;
        if id == 1 {
            return Some(body);
        }
        extra = &extra[4 + len..];
    }
    None
}

/// Little-endian readers over slices whose length the caller has checked.
fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::{fixture, TempDir};
    use crate::ir::{DType, TensorData};

    fn arrays() -> Vec<(String, Tensor)> {
        vec![
            (
                "x".to_string(),
                Tensor::from_f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
            ),
            (
                "labels".to_string(),
                Tensor::from_i64(vec![2], vec![3, 9]).unwrap(),
            ),
            (
                "empty".to_string(),
                Tensor::zeros(DType::U8, vec![0]).unwrap(),
            ),
            (
                "ünïcode".to_string(),
                Tensor::new(vec![1], TensorData::Bool(vec![true])).unwrap(),
            ),
        ]
    }

    #[test]
    fn round_trip() {
        let dir = TempDir::new("npz");
        let p = dir.path("a.npz");
        let a = arrays();
        write_npz(&p, &a).unwrap();
        assert_eq!(read_npz(&p).unwrap(), a);
        let mut ar = NpzArchive::open(&p).unwrap();
        assert!(ar.contains("labels") && !ar.contains("y"));
        assert_eq!(ar.read("labels").unwrap(), a[1].1);
        let err = ar.read("nope").unwrap_err().to_string();
        assert!(err.contains("a.npz") && err.contains("nope"), "{err}");
    }

    #[test]
    fn rejects_duplicate_names() {
        let dir = TempDir::new("npz");
        let t = Tensor::scalar_f32(1.0);
        let a = vec![("a".to_string(), t.clone()), ("a".to_string(), t)];
        assert!(write_npz(dir.path("d.npz"), &a).is_err());
        assert!(!dir.path("d.npz").exists());
    }

    fn check_numpy_fixture(file: &str) {
        // Written by make_fixtures.py: a = arange(12, float32).reshape(3, 4),
        // b = [7, 8, 9] int64, c = 2.5 (float64 scalar), in that order.
        let got = read_npz(fixture(file)).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"], "{file}");
        assert_eq!(got[0].1.shape(), &[3, 4]);
        assert_eq!(
            got[0].1.as_f32().unwrap(),
            &(0..12).map(|x| x as f32).collect::<Vec<_>>()[..]
        );
        assert_eq!(got[1].1.data(), &TensorData::I64(vec![7, 8, 9]));
        assert_eq!(got[2].1.data(), &TensorData::F64(vec![2.5]));
    }

    #[test]
    fn reads_numpy_savez() {
        check_numpy_fixture("savez.npz");
    }

    #[test]
    fn reads_numpy_savez_compressed() {
        check_numpy_fixture("savez_compressed.npz");
    }

    #[test]
    fn corrupt_member_is_detected() {
        let dir = TempDir::new("npz");
        let mut bytes = std::fs::read(fixture("savez.npz")).unwrap();
        // Flip the last data byte of the first member, just before the second local header.
        let second = bytes
            .windows(4)
            .skip(4)
            .position(|w| w == b"PK\x03\x04")
            .unwrap()
            + 4;
        bytes[second - 1] ^= 0x55;
        let p = dir.path("bad.npz");
        std::fs::write(&p, &bytes).unwrap();
        let err = read_npz(&p).unwrap_err().to_string();
        assert!(err.contains("bad.npz") && err.contains("CRC"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = TempDir::new("npz");
        let good = std::fs::read(fixture("savez_compressed.npz")).unwrap();
        let p = dir.path("g.npz");
        for n in (0..good.len()).step_by(7) {
            std::fs::write(&p, &good[..n]).unwrap();
            assert!(read_npz(&p).is_err());
        }
        for i in (0..good.len()).step_by(3) {
            let mut bad = good.clone();
            bad[i] ^= 0xff;
            std::fs::write(&p, &bad).unwrap();
            let _ = read_npz(&p);
        }
        std::fs::write(&p, b"PK\x05\x06").unwrap();
        assert!(read_npz(&p).is_err());
    }
}
