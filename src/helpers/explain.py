"""Where did the network look? Grad-CAM heat maps for a trained classifier.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional layer's output by the spatial mean of the
class score's gradient with respect to it, sums the weighted channels and keeps the positive part: regions whose
features raise the class score. The computation comes from captum (``LayerGradCam`` and
``LayerAttribution.interpolate``), PyTorch's maintained and tested attribution library, rather than from
hand-rolled forward/backward hooks, which are easy to get subtly wrong (hooks left registered, in-place ops,
gradients accumulating on the weights).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM explains: a ResNet's ``layer4`` (last, most semantic stage that still has a spatial
    map), else the model's last ``Conv2d``."""
    if hasattr(model, "layer4"):
        return model.layer4
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no layer4 and no Conv2d layer to explain")
    return convs[-1]


def gradcam(model: nn.Module, x_normalised: torch.Tensor, target_layer: nn.Module,
            class_idx: int | Sequence[int] | torch.Tensor | None = None, meta: torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM maps, N x H x W in [0, 1] at the input's size, each image scaled so its maximum is 1.

    x_normalised: the batch exactly as the model sees it (normalised, on the model's device). class_idx: one class
    for all images, one per image, or None for each image's predicted class. The model runs in eval mode (dropout
    off, BatchNorm on running statistics) and is put back in its previous mode; no gradients are left on its
    parameters. An image whose map is zero everywhere (nothing raises the score) stays all zero. ``meta``: the
    images' encoded metadata, for a model with a metadata branch (held fixed: the map explains the image part).
    """
    was_training = model.training
    model.eval()
    x = x_normalised.detach().clone()
    extra = () if meta is None else (meta.to(x.device),)
    try:
        with torch.enable_grad():
            if class_idx is None:
                with torch.no_grad():
                    target = model(x, *extra).argmax(dim=1)
            else:
                target = torch.as_tensor(class_idx, device=x.device).expand(len(x))
            cam = LayerGradCam(model, target_layer).attribute(x, target=target, relu_attributions=True,
                                                              additional_forward_args=extra or None)
            cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    cam = cam.detach().squeeze(1).clamp_(min=0)  # bilinear upsampling keeps values >= 0; clamp guards rounding
    peak = cam.flatten(1).amax(dim=1).clamp_(min=torch.finfo(cam.dtype).tiny).view(-1, 1, 1)
    return (cam / peak).float().cpu().numpy()
