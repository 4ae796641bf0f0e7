"""A small BatchNorm ResNet for Fashion-MNIST, trained here for benchmarks with real labels.

Train (about 8 minutes on 2 cores; writes the committed weights):
    python -m exporters.models.fashion_mnist --epochs 10 --out exporters/models/fashion_mnist_resnet.pt
Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
"""
from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
WEIGHTS = Path(__file__).with_name("fashion_mnist_resnet.pt")
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = 72.94, 90.02  # training-set pixel mean and std on 0..255
PREPROCESS = {
    "size": [28, 28],
    "resize": "stretch",
    "crop": "none",
    "channel_order": "GRAY",
    "mean": [MEAN],
    "std": [STD],
    "padding": "symmetric",
}


def load_split(split: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and int64 labels (N,) from the idx gz files; split is 'train' or 't10k'."""
    images_path = data_dir / f"{split}-images-idx3-ubyte.gz"
    labels_path = data_dir / f"{split}-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: apt-get install dataset-fashion-mnist")
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28).copy()
    with gzip.open(labels_path) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class FashionResNet(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def pretrained() -> FashionResNet:
    model = FashionResNet()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(images).float() - MEAN) / STD)[:, None]


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), 1000):
            correct += (model(to_tensor(images[i:i + 1000])).argmax(1).numpy() == labels[i:i + 1000]).sum()
    return correct / len(images)


def train(epochs: int, seed: int = 0, batch: int = 128) -> tuple[FashionResNet, float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, labels = load_split("train")
    test_images, test_labels = load_split("t10k")
    model = FashionResNet()
    steps = epochs * (len(images) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        start = time.time()
        order = rng.permutation(len(images))
        for i in range(len(images) // batch):
            idx = order[i * batch:(i + 1) * batch]
            x = to_tensor(_augment(images[idx], rng))
            loss = nn.functional.cross_entropy(model(x), torch.from_numpy(labels[idx]), label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, test_images, test_labels)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test accuracy {acc:.4f} "
              f"({time.time() - start:.0f} s)", flush=True)
    return model.eval(), acc


def _augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flips and shifts of up to 2 pixels."""
    flipped = np.where(rng.random(len(images))[:, None, None] < 0.5, images[:, :, ::-1], images)
    padded = np.pad(flipped, ((0, 0), (2, 2), (2, 2)))
    dy, dx = rng.integers(0, 5, 2)
    return np.ascontiguousarray(padded[:, dy:dy + 28, dx:dx + 28])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, acc = train(args.epochs, args.seed)
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out} (test accuracy {acc:.4f})")


if __name__ == "__main__":
    main()
