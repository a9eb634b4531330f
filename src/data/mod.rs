//! Data sets and tensor files: NumPy `.npy`/`.npz`, IDX (MNIST), images and preprocessing.
//!
//! Everything here reads untrusted files: sizes are bounded before allocation, malformed
//! input is an error naming the file, and writes go through [`write_atomic`].

pub mod atomic;
pub mod dataset;
pub mod idx;
pub mod image;
pub mod named;
pub mod npy;
pub mod npz;
pub mod preprocess;

#[cfg(test)]
pub(crate) mod test_util;

pub use atomic::{write_atomic, write_atomic_with};
pub use dataset::{
    batches, find_dataset_dir, load_all, open_dataset, BatchSource, IdxDataset, ImageDirDataset,
    NpzDataset, Split,
};
pub use idx::{read_idx, read_idx_images, read_idx_labels};
pub use image::{decode_image, read_image, Image};
pub use named::NamedInputs;
pub use npy::{decode_npy, encode_npy, read_npy, write_npy};
pub use npz::{read_npz, write_npz, NpzArchive};
pub use preprocess::{Channels, Preprocess, Resize, METADATA_KEY as PREPROCESS_METADATA_KEY};

#[cfg(test)]
mod fuzz {
    use super::test_util::{fixture, TempDir};
    use super::*;

    /// Random corruption of every fixture format; run with `--ignored` when touching a parser.
    #[test]
    #[ignore]
    fn mutated_fixtures_never_panic() {
        let dir = TempDir::new("fuzz");
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let iters: usize = std::env::var("LITHE_FUZZ_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        for name in [
            "f4.npy",
            "fortran.npy",
            "v3.npy",
            "savez.npz",
            "savez_compressed.npz",
            "rgb_37x23.png",
            "palette4.png",
            "cmyk.jpg",
            "gray.jpg",
        ] {
            let good = std::fs::read(fixture(name)).unwrap();
            let p = dir.path(name);
            for _ in 0..iters {
                let mut b = good.clone();
                for _ in 0..1 + rnd() % 8 {
                    let i = (rnd() as usize) % b.len();
                    b[i] = rnd() as u8;
                }
                if rnd() % 4 == 0 {
                    b.truncate((rnd() as usize) % (b.len() + 1));
                }
                let _ = decode_npy(&b, name);
                let _ = decode_image(&b, name);
                if name.ends_with(".npz") {
                    std::fs::write(&p, &b).unwrap();
                    let _ = read_npz(&p);
                    let _ = read_idx(&p);
                }
            }
        }
    }
}
