"""A learnable synthetic image-classification task, generated locally (no download).

Each class c has a fixed smooth prototype image P_c (random low-resolution pattern,
bilinearly upsampled). A sample of class c is ``a · roll(P_c, shift) + σ · ε`` with a random
amplitude a ∈ [0.7, 1.3], a random cyclic shift of up to ``max_shift`` pixels and white noise
ε. A small CNN learns it to high accuracy within a few hundred SGD steps, so clean labels
and corrupted labels produce clearly different training dynamics (unlike torchvision's
FakeData, whose labels are pure noise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_synthetic_images(
    n: int,
    *,
    num_classes: int = 10,
    image_size: int = 16,
    channels: int = 3,
    noise: float = 0.6,
    max_shift: int = 2,
    seed: int = 0,
    task_seed: int = 1234,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images [n, C, S, S] float32, labels [n] int64)``.

    ``task_seed`` fixes the class prototypes (the task); ``seed`` draws the samples, so a
    train and a validation split of one task use the same ``task_seed`` and two ``seed`` s.
    """
    if n < 1 or num_classes < 2 or image_size < 4:
        raise ValueError("need n >= 1, num_classes >= 2 and image_size >= 4")
    task = torch.Generator().manual_seed(task_seed)
    low = torch.randn(num_classes, channels, 4, 4, generator=task)
    protos = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    protos = protos / protos.flatten(1).std(1).view(-1, 1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    amplitude = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=gen)
    images = protos[labels] * amplitude
    if max_shift:
        shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=gen)
        images = torch.stack([torch.roll(img, tuple(s.tolist()), dims=(1, 2)) for img, s in zip(images, shifts)])
    images = images + noise * torch.randn(images.shape, generator=gen)
    return images.float(), labels


def corrupt_labels(labels: torch.Tensor, p: float, num_classes: int, *, seed: int = 0) -> torch.Tensor:
    """Replace each label, with probability ``p``, by a uniformly random class (p = 1: random labels)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label-noise probability must be in [0, 1], got {p}")
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(labels.shape, generator=gen) < p
    random = torch.randint(0, num_classes, labels.shape, generator=gen)
    return torch.where(flip, random, labels)
