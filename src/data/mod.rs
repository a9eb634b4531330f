//! Data sets and tensor files: NumPy `.npy`/`.npz`, IDX (MNIST), images and preprocessing.
