"""From the uint8 cache to the network's input, on whatever device the batch is on (the GPU when there is one).

``Preprocess`` turns a uint8 batch into a normalised float batch: optional resize (the resolution schedule trains
early epochs smaller than the cache), optional per-sample augmentation with kornia (every image gets its own random
flip, rotation, scale and colour change), ImageNet normalisation with constants held as buffers (moved to the
device once, not rebuilt per call), channels_last. The same code runs on the CPU, so a machine without a GPU sees
the same distribution of training images. kornia is used rather than hand-written affine grids because it is a
maintained, tested library for exactly this (per-sample batch ops), and it can draw its random parameters on the
device, so augmenting never waits on the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia import augmentation as K
from torch import nn

from .config import AUGMENTATIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_augment(kind: str = "light") -> nn.Module | None:
    """``light``: the write-ups' recipe (horizontal flip, rotation +-10 degrees, colour jitter).
    ``strong``: lesions have no up or down, so any rotation and both flips are label-preserving; plus scale and
    a little translation, which help a network trained from scratch generalise beyond one camera's framing.
    Colour steps run in a fixed order: with a random order kornia checks each step on the host (a GPU sync)."""
    if kind == "none":
        return None
    if kind == "light":
        return K.AugmentationSequential(
            K.RandomHorizontalFlip(),
            K.RandomRotation(degrees=10.0, p=1.0),
            K.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, p=1.0, order=(0, 1, 2)),
        )
    if kind == "strong":
        return K.AugmentationSequential(
            K.RandomHorizontalFlip(),
            K.RandomVerticalFlip(),
            K.RandomAffine(degrees=180.0, translate=(0.05, 0.05), scale=(0.85, 1.15), padding_mode="reflection",
                           p=1.0),
            K.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8, order=(0, 1, 2, 3)),
        )
    raise ValueError(f"augment must be one of {AUGMENTATIONS}, not {kind!r}")


def resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Square ``size`` x ``size`` (bilinear, antialiased when shrinking, as the cache itself was made); no-op if equal."""
    if size is None or x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class Preprocess(nn.Module):
    """uint8 N x 3 x H x W -> float, resized, augmented, ImageNet-normalised, channels_last."""

    def __init__(self, augment: str | None = None):
        super().__init__()
        self.augment = make_augment(augment) if augment else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.augment is not None and hasattr(self.augment, "set_rng_device_and_dtype"):
            # kornia draws random parameters on the CPU by default: one host->device copy per augmentation.
            self.augment.set_rng_device_and_dtype(self.mean.device, torch.float32)
        return out

    def forward(self, x_uint8: torch.Tensor, size: int | None = None, train: bool = False) -> torch.Tensor:
        x = resize(x_uint8.float().div_(255), size)
        if train and self.augment is not None:
            x = self.augment(x).clamp_(0, 1)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def to_input(x_uint8: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Evaluation input for one batch (no augmentation): for callers outside the training loop (Grad-CAM, plots)."""
    return Preprocess().to(x_uint8.device)(x_uint8, size)
