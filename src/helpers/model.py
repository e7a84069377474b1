"""Our own ResNets, laid out like torchvision's so ImageNet weights load into them strictly.

Residual learning in a few dozen lines: each block computes ``relu(F(x) + shortcut(x))``; the network is a stem,
four stages of blocks, global pooling and a head. ``build_model`` adds the options the notebooks set: weights
(ImageNet / random init / a file), a frozen backbone, the first write-up's transfer head (mlp) or a linear one.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin, width, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, width, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152); stride on the 3x3 as in torchvision (ResNet v1.5)."""

    expansion = 4

    def __init__(self, cin, width, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = conv1x1(cin, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv1x1(width, width * 4), nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem -> layer1..4 -> global average pool -> fc. ``ResNet(Bottleneck, [3, 4, 6, 3], 3, 7)`` is a ResNet-50."""

    def __init__(self, block, layers, in_channels=3, num_classes=1000):
        super().__init__()
        self.cin = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(block, 64, layers[0], stride=1)
        self.layer2 = self._stage(block, 128, layers[1], stride=2)
        self.layer3 = self._stage(block, 256, layers[2], stride=2)
        self.layer4 = self._stage(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # each residual branch starts as identity: a deep net trains like a shallow one
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _stage(self, block, width, blocks, stride):
        downsample = None
        if stride != 1 or self.cin != width * block.expansion:  # projection shortcut when the shape changes
            downsample = nn.Sequential(conv1x1(self.cin, width * block.expansion, stride),
                                       nn.BatchNorm2d(width * block.expansion))
        layers = [block(self.cin, width, stride, downsample)]
        self.cin = width * block.expansion
        layers += [block(self.cin, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def resnet(arch: str, num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")
    block, layers = ARCHS[arch]
    return ResNet(block, layers, in_channels, num_classes)


def mlp_head(in_features: int, num_classes: int, hidden: int = 128, p1: float = 0.5, p2: float = 0.3) -> nn.Sequential:
    """The first write-up's transfer head: Dropout(0.5) -> Linear(in -> 128) -> ReLU -> Dropout(0.3) -> Linear(128 -> n)."""
    return nn.Sequential(nn.Dropout(p1), nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(p2),
                         nn.Linear(hidden, num_classes))


def linear_head(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes)) if dropout else \
        nn.Linear(in_features, num_classes)


def make_head(head: str, in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    if head == "mlp":
        return mlp_head(in_features, num_classes)
    if head == "linear":
        return linear_head(in_features, num_classes, dropout)
    raise ValueError(f"head must be 'mlp' or 'linear', not {head!r}")


class MetadataResNet(nn.Module):
    """Image + metadata, trained end to end (the ``joint`` option): a small branch turns the encoded age, sex and
    site (``clinical.ClinicalEncoder``) into ``hidden`` features, which join the image network's pooled features
    before the head. ``forward(x, meta)``; ``net`` is a plain ResNet whose own ``fc`` is unused."""

    def __init__(self, net: ResNet, meta_features: int, num_classes: int, head: str = "linear",
                 dropout: float = 0.0, hidden: int = 32):
        super().__init__()
        self.net = net
        self.net.fc = nn.Identity()
        self.meta = nn.Sequential(nn.Linear(meta_features, hidden), nn.ReLU(inplace=True))
        self.fc = make_head(head, net.num_features + hidden, num_classes, dropout)
        self.meta_features = meta_features

    @property
    def layer4(self):  # the layer Grad-CAM explains, as on a plain ResNet
        return self.net.layer4

    def forward(self, x, meta):
        return self.fc(torch.cat([self.net.features(x), self.meta(meta.to(x.dtype))], 1))


# ------------------------------------------------------------------------------------------------------- weights
class WeightsError(RuntimeError):
    """Pretrained weights were asked for and are not available; the message says what to do."""


def imagenet_state_dict(arch: str) -> dict:
    """torchvision's ImageNet weights for ``arch`` via its weights API (cached under $TORCH_HOME/hub/checkpoints)."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # URLError, HTTPError, socket errors: no network and no cached file
        raise WeightsError(
            f"ImageNet weights for {arch} are not cached at {cached} and could not be downloaded "
            f"({type(e).__name__}: {e}). Either (1) run once with internet access, or copy {weights.url} to "
            f"{cached} (set TORCH_HOME to use another cache folder), or (2) train from random init with "
            f"weights=None (and freeze_backbone=False). Nothing fell back silently.") from e


def build_model(arch: str = "resnet34", num_classes: int = 7, weights: str | None = None,
                freeze_backbone: bool = False, head: str = "linear", dropout: float = 0.0,
                in_channels: int = 3, meta_features: int = 0) -> nn.Module:
    """A ResNet for the task.

    weights: ``"imagenet"`` (torchvision's, loaded strictly into our layout), ``None`` (random init) or a path to a
    state_dict / checkpoint saved by this project. head: ``"mlp"`` (the write-up's transfer head) or ``"linear"``.
    ``meta_features > 0``: a ``MetadataResNet`` taking that many metadata features beside the image.
    A frozen backbone with random weights is refused: it would train a head on random features.
    """
    if freeze_backbone and weights is None:
        raise ValueError("freeze_backbone=True needs pretrained weights (weights='imagenet' or a file); "
                         "a frozen random backbone only trains a head on noise. Use freeze_backbone=False.")
    model = resnet(arch, 1000 if weights == "imagenet" else num_classes, in_channels)
    if weights == "imagenet":
        model.load_state_dict(imagenet_state_dict(arch), strict=True)
    model.fc = make_head(head, model.num_features, num_classes, dropout)
    if meta_features:
        model = MetadataResNet(model, meta_features, num_classes, head, dropout)
    if weights not in (None, "imagenet"):
        path = Path(os.fspath(weights))
        if not path.exists():
            raise WeightsError(f"weights file {path} not found")
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state.get("model", state)
        model.load_state_dict(state, strict=True)
    if freeze_backbone:
        freeze(model)
    return model


TRAINABLE_WHEN_FROZEN = ("fc", "meta")  # the head and the metadata branch


def freeze(model: nn.Module) -> None:
    """No gradients for anything but the head (and a metadata branch); ``train_mode`` keeps the backbone's
    BatchNorm in eval mode."""
    for name, p in model.named_parameters():
        p.requires_grad = name.split(".")[0] in TRAINABLE_WHEN_FROZEN
    model.frozen_backbone = True


def train_mode(model: nn.Module) -> None:
    """model.train(), except a frozen backbone stays in eval mode (its BatchNorm statistics must not drift)."""
    model.train()
    if getattr(model, "frozen_backbone", False):
        for name, m in model.named_children():
            if name not in TRAINABLE_WHEN_FROZEN:
                m.eval()


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------------- trained checkpoints
def save_trained(model: nn.Module, meta: dict, path: str | os.PathLike) -> Path:
    """A trained model and what is needed to use it again (architecture, classes, image size, head)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"model": state, "meta": meta}, tmp)
    os.replace(tmp, path)
    return path


def load_trained(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """One call back from a saved run: ``model, meta = load_trained("models/.../model.pt")`` (model in eval mode).

    The only loader: ``predict``, ``external`` and the pipeline all come through here. A model that uses metadata
    carries it in ``meta["clinical"]``: the encoder's categories and scaling (``joint``), or the fitted metadata
    model and fusion weight (``late``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found (models/ is filled by running the model notebooks)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    meta = saved["meta"]
    clinical = meta.get("clinical") or {}
    meta_features = len(clinical["features"]) if clinical.get("mode") == "joint" else 0
    model = build_model(meta["arch"], len(meta["classes"]), None, False, meta["head"], meta.get("dropout", 0.0),
                        meta_features=meta_features)
    model.load_state_dict(saved["model"], strict=True)
    return model.to(device).eval(), meta
