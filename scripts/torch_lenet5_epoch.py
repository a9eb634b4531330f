"""One epoch of lenet5 training on MNIST in PyTorch (CPU), to compare with `lithe`.

Same network as `lithe::zoo` lenet5 (conv 20@5x5 -> 2x2 max pool -> conv 50@5x5 -> 2x2 max
pool -> dense 500 -> ReLU -> dense 10), same data (the MNIST idx files, normalised with mean
0.1307 and std 0.3081), batch 64, shuffled, SGD with momentum 0.9 and learning rate 0.01,
cross-entropy loss. The data are decoded into one tensor before the clock starts, as lithe's
TrainSet does. Prints wall and CPU time, images/s and test accuracy.

    python scripts/torch_lenet5_epoch.py --data ../shared/datasets/mnist --threads 1
"""

import argparse
import gzip
import os
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(count, 1, rows, cols)
    return np.frombuffer(data, np.uint8, offset=8)


def load(folder, prefix):
    x = idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"))
    y = idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))
    x = (torch.from_numpy(x.astype(np.float32)) / 255.0 - 0.1307) / 0.3081
    return x.contiguous(), torch.from_numpy(y.astype(np.int64))


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/datasets/mnist")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    xtr, ytr = load(args.data, "train")
    xte, yte = load(args.data, "t10k")
    model = LeNet5()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    order = torch.randperm(len(xtr))
    model.train()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for s in range(0, len(order), args.batch):
        i = order[s : s + args.batch]
        loss = F.cross_entropy(model(xtr[i]), ytr[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0

    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(xte[s : s + 1000]).argmax(1) == yte[s : s + 1000]).sum().item()
            for s in range(0, len(xte), 1000)
        )
    n = len(xtr)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}: "
        f"{wall:.2f} s wall ({n / wall:.0f} images/s), {cpu:.2f} s CPU "
        f"({n / cpu:.0f} images per CPU-second), test accuracy {correct / len(xte) * 100:.2f} %"
    )


if __name__ == "__main__":
    main()
