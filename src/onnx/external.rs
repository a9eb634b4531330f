//! ONNX external data: tensors whose bytes live in a side file next to the model, described
//! by `location` / `offset` / `length` entries. Reading confines every location to the
//! model's folder; writing appends page-aligned tensors to one `.data` file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::atomic::AtomicFile;
use super::proto::StringStringEntryProto;
use super::tensor_codec::write_le;
use crate::error::{Error, Result};
use crate::ir::TensorData;

/// Offsets in the data file are multiples of this so readers can mmap tensors in place.
pub const EXTERNAL_ALIGN: u64 = 4096;

/// Resolves and opens external data files for one decode, keeping each file open once.
pub(crate) struct ExternalReader<'a> {
    base: Option<&'a Path>,
    canonical_base: Option<PathBuf>,
    files: HashMap<PathBuf, (File, u64)>,
}

impl<'a> ExternalReader<'a> {
    pub(crate) fn new(base: Option<&'a Path>) -> ExternalReader<'a> {
        ExternalReader {
            base,
            canonical_base: None,
            files: HashMap::new(),
        }
    }

    /// A reader over exactly `expected_len` bytes of the tensor's external data, after
    /// checking the location stays inside the model folder and the range fits in the file.
    pub(crate) fn open(
        &mut self,
        tensor: &str,
        entries: &[StringStringEntryProto],
        expected_len: u64,
    ) -> Result<io::Take<&File>> {
        let err = |msg: String| Error::ExternalData {
            tensor: tensor.to_string(),
            msg,
        };
        let mut location = None;
        let mut offset = None;
        let mut length = None;
        for e in entries {
            match e.key() {
                "location" => location = Some(e.value()),
                "offset" => offset = Some(parse_u64(e.value(), "offset").map_err(err)?),
                "length" => length = Some(parse_u64(e.value(), "length").map_err(err)?),
                _ => {}
            }
        }
        let location = location.ok_or_else(|| err("no 'location' entry".into()))?;
        check_location(location).map_err(err)?;
        let base = self.base.ok_or_else(|| {
            err("the model was not read from a file, so there is no folder to find external data in".into())
        })?;
        let canonical_base = match &self.canonical_base {
            Some(b) => b.clone(),
            None => {
                let dir = if base.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    base
                };
                let b = dir.canonicalize().map_err(|e| {
                    err(format!(
                        "cannot resolve model folder {}: {e}",
                        dir.display()
                    ))
                })?;
                self.canonical_base = Some(b.clone());
                b
            }
        };
        let full = canonical_base
            .join(location)
            .canonicalize()
            .map_err(|e| err(format!("cannot open '{location}': {e}")))?;
        if !full.starts_with(&canonical_base) {
            return Err(err(format!(
                "'{location}' resolves outside the model folder"
            )));
        }
        if !self.files.contains_key(&full) {
            // Checked before opening: opening a FIFO or device could block or never end.
            let meta = std::fs::metadata(&full)
                .map_err(|e| err(format!("cannot open '{location}': {e}")))?;
            if !meta.is_file() {
                return Err(err(format!("'{location}' is not a regular file")));
            }
            let file =
                File::open(&full).map_err(|e| err(format!("cannot open '{location}': {e}")))?;
            self.files.insert(full.clone(), (file, meta.len()));
        }
        let Some((file, file_len)) = self.files.get(&full) else {
            return Err(err(format!("cannot open '{location}'")));
        };
        let file_len = *file_len;
        let offset = offset.unwrap_or(0);
        if offset > file_len {
            return Err(err(format!(
                "offset {offset} is beyond the end of '{location}' ({file_len} bytes)"
            )));
        }
        let length = length.unwrap_or(file_len - offset);
        match offset.checked_add(length) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(err(format!(
                    "offset {offset} + length {length} is beyond the end of '{location}' ({file_len} bytes)"
                )))
            }
        }
        if length != expected_len {
            return Err(err(format!(
                "length is {length} bytes but the tensor's shape and type need {expected_len}"
            )));
        }
        let mut handle = file;
        handle
            .seek(SeekFrom::Start(offset))
            .map_err(|e| err(format!("cannot seek in '{location}': {e}")))?;
        Ok(handle.take(length))
    }
}

fn parse_u64(s: &str, key: &str) -> std::result::Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("'{key}' is not a non-negative integer: '{s}'"))
}

/// Rejects locations that could name a file outside the model folder on any platform.
pub(crate) fn check_location(location: &str) -> std::result::Result<(), String> {
    if location.is_empty() {
        return Err("empty location".into());
    }
    if location.contains('\0') {
        return Err("location contains a NUL byte".into());
    }
    let bytes = location.as_bytes();
    let drive = bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic();
    if location.starts_with(['/', '\\']) || drive || Path::new(location).is_absolute() {
        return Err(format!(
            "location '{location}' is absolute; it must be relative to the model folder"
        ));
    }
    if location.split(['/', '\\']).any(|part| part == "..") {
        return Err(format!(
            "location '{location}' contains '..'; it must stay inside the model folder"
        ));
    }
    Ok(())
}

/// Appends tensors to one external data file, each at an aligned offset.
pub(crate) struct ExternalWriter {
    file: AtomicFile,
    location: String,
    pos: u64,
}

/// Where a tensor was written in the data file.
pub(crate) struct ExternalSlot {
    pub offset: u64,
    pub length: u64,
}

impl ExternalWriter {
    /// Starts writing `dir/location` (atomically: nothing is visible until `commit`).
    pub(crate) fn create(dir: &Path, location: &str) -> Result<ExternalWriter> {
        Ok(ExternalWriter {
            file: AtomicFile::create(&dir.join(location))?,
            location: location.to_string(),
            pos: 0,
        })
    }

    pub(crate) fn location(&self) -> &str {
        &self.location
    }

    pub(crate) fn append(&mut self, data: &TensorData) -> Result<ExternalSlot> {
        let pad = (EXTERNAL_ALIGN - self.pos % EXTERNAL_ALIGN) % EXTERNAL_ALIGN;
        let length = (data.len() * data.dtype().size_of()) as u64;
        let path = self.file.dest().to_path_buf();
        let w = self.file.writer();
        let res = w
            .write_all(&vec![0u8; pad as usize])
            .and_then(|()| write_le(data, w));
        res.map_err(|e| Error::io(path, e))?;
        let offset = self.pos + pad;
        self.pos = offset + length;
        Ok(ExternalSlot { offset, length })
    }

    pub(crate) fn commit(self) -> Result<()> {
        self.file.commit()
    }
}

/// `location`, `offset`, `length` entries for a tensor written by [`ExternalWriter`].
pub(crate) fn entries(location: &str, slot: &ExternalSlot) -> Vec<StringStringEntryProto> {
    [
        ("location", location.to_string()),
        ("offset", slot.offset.to_string()),
        ("length", slot.length.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| StringStringEntryProto {
        key: Some(k.to_string()),
        value: Some(v),
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_must_stay_inside() {
        assert!(check_location("w.data").is_ok());
        assert!(check_location("sub/w.data").is_ok());
        assert!(check_location("./w.data").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "\\\\server\\share",
            "C:\\w.data",
            "../w.data",
            "a/../../w.data",
            "a\\..\\w.data",
        ] {
            let e = check_location(bad).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
