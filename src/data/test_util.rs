//! Helpers shared by the data layer's unit tests.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh directory under the system temp dir, removed when dropped.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lithe-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A committed fixture under tests/fixtures/data/.
pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

/// The read-only shared folder (`$LITHE_SHARED` or `../shared` beside the repository), or
/// `None` with a note on stderr so a skipped test is visible in `--nocapture` runs.
pub(crate) fn shared_dir(test: &str) -> Option<PathBuf> {
    let candidates = std::env::var_os("LITHE_SHARED")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"),
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
        ]);
    for c in candidates {
        if c.join("images").is_dir() || c.join("datasets").is_dir() {
            return Some(c);
        }
    }
    eprintln!(
        "note: {test} skipped: shared folder not found (set LITHE_SHARED or put it at ../shared)"
    );
    None
}
