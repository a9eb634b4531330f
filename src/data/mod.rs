//! Data sets and tensor files: NumPy `.npy`/`.npz`, IDX (MNIST), images and preprocessing.

pub mod atomic;
pub mod dataset;
pub mod idx;
pub mod image;
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
pub use npy::{decode_npy, encode_npy, read_npy, write_npy};
pub use npz::{read_npz, write_npz, NpzArchive};
pub use preprocess::{Channels, Preprocess, Resize};
