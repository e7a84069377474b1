"""Batch augmentation on tensors, on whatever device the batch is on (the GPU when there is one).

Images come out of the uint8 cache; each batch is moved to the device, augmented per sample with kornia (every
image gets its own random flip, rotation, scale and colour change) and normalised there. The same code runs on the
CPU, so a machine without a GPU sees the same distribution of training images. kornia is used rather than
hand-written affine grids because it is a maintained, tested library for exactly this (per-sample batch ops).
"""
from __future__ import annotations

import torch
from kornia import augmentation as K

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENTATIONS = ("none", "seed", "strong")


def make_augment(kind: str = "seed") -> torch.nn.Module | None:
    """``seed``: the first seed's light recipe (horizontal flip, rotation +-10 degrees, colour jitter).
    ``strong``: lesions have no up or down, so any rotation and both flips are label-preserving; plus scale and
    a little translation, which help a network trained from scratch generalise beyond one camera's framing."""
    if kind == "none":
        return None
    if kind == "seed":
        return K.AugmentationSequential(
            K.RandomHorizontalFlip(),
            K.RandomRotation(degrees=10.0, p=1.0),
            K.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, p=1.0),
        )
    if kind == "strong":
        return K.AugmentationSequential(
            K.RandomHorizontalFlip(),
            K.RandomVerticalFlip(),
            K.RandomAffine(degrees=180.0, translate=(0.05, 0.05), scale=(0.85, 1.15), padding_mode="reflection",
                           p=1.0),
            K.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8),
        )
    raise ValueError(f"augment must be one of {AUGMENTATIONS}, not {kind!r}")


def to_input(x_uint8: torch.Tensor, augment: torch.nn.Module | None = None) -> torch.Tensor:
    """uint8 N x 3 x H x W (any device) -> float, augmented, ImageNet-normalised, channels_last."""
    x = x_uint8.float().div_(255)
    if augment is not None:
        x = augment(x).clamp_(0, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)
