//! Atomic file replacement: write a temporary file in the destination folder, fsync it, then
//! rename it over the destination, so readers see either the old file or the complete new one.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub(crate) struct AtomicFile {
    // Declared before `guard` so the handle is closed before the guard removes the file.
    writer: BufWriter<File>,
    dest: PathBuf,
    guard: TempGuard,
}

/// Removes the temporary file unless the rename happened.
struct TempGuard {
    tmp: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl AtomicFile {
    pub(crate) fn create(dest: &Path) -> Result<AtomicFile> {
        let name = dest.file_name().ok_or_else(|| {
            Error::io(
                dest,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
            )
        })?;
        let tmp = parent_dir(dest).join(format!(
            ".{}.{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicFile {
            writer: BufWriter::with_capacity(1 << 20, file),
            dest: dest.to_path_buf(),
            guard: TempGuard { tmp, armed: true },
        })
    }

    pub(crate) fn dest(&self) -> &Path {
        &self.dest
    }

    pub(crate) fn writer(&mut self) -> &mut BufWriter<File> {
        &mut self.writer
    }

    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer
            .write_all(bytes)
            .map_err(|e| Error::io(&self.guard.tmp, e))
    }

    /// Flushes, fsyncs and renames into place. On error the temporary file is removed.
    pub(crate) fn commit(self) -> Result<()> {
        let AtomicFile {
            writer,
            dest,
            mut guard,
        } = self;
        let file = writer
            .into_inner()
            .map_err(|e| Error::io(&guard.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&guard.tmp, e))?;
        drop(file);
        fs::rename(&guard.tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        guard.armed = false;
        // Persist the rename itself; not every platform can open a folder, so best effort.
        if let Ok(dir) = File::open(parent_dir(&dest)) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
