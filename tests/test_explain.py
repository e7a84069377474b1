"""Grad-CAM on a task whose answer is known: is the bright square in the top-left or the bottom-right quadrant?

A small network is trained for a few seconds on CPU; its heat maps must then point at the square. A map that is
flipped, transposed, computed for the wrong class or not upsampled to the input would fail.
"""
import numpy as np
import pytest
import torch
from torch import nn

from helpers.explain import gradcam, last_conv_layer

SIZE, SQUARE = 32, 6


def squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Noise images with one bright square at a random place inside the top-left (label 0) or bottom-right
    (label 1) quadrant; also returns the square's top-left corner (row, col)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.5
    y = torch.randint(0, 2, (n,), generator=g)
    half = SIZE // 2
    corner = torch.randint(0, half - SQUARE + 1, (n, 2), generator=g) + half * y[:, None]
    for i, (r, c) in enumerate(corner.tolist()):
        x[i, :, r:r + SQUARE, c:c + SQUARE] = 1.0
    return (x - 0.5) / 0.25, y, corner.numpy()


class TinyResNetLike(nn.Module):
    """Convolutions -> ``layer4`` -> global average pool -> linear, as in a ResNet.

    Global pooling makes a convolutional net nearly blind to *where* a feature is (a real ResNet learns position
    slowly, from zero padding); two fixed coordinate channels let this one tell the quadrants apart in seconds.
    The head starts at zero: with two classes the cross-entropy gradients of the two logits are opposite, so the
    logits stay exact opposites and evidence for a class shows up in *its* logit (with a random head it can show
    up as evidence against the other class instead, and that class's Grad-CAM map is then empty).
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(5, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.layer4 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 2)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        n, _, h, w = x.shape
        rows = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
        cols = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
        x = self.layer4(self.stem(torch.cat([x, rows, cols], dim=1)))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def trained():
    """Trained on squares plus plain-noise images whose target is 50/50. Without those, "bright square at the top,
    else bottom-right" solves the task with evidence for one class only, and the other class's map is empty.
    One thread: these convolutions are too small to gain from more, and on a busy 2-core machine two threads
    made training several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = TinyResNetLike()
        x, y, _ = squares(256, seed=1)
        blank = (torch.rand(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 0.5 - 0.5) / 0.25
        x = torch.cat([x, blank])
        target = torch.cat([nn.functional.one_hot(y, 2).float(), torch.full((64, 2), 0.5)])
        order = torch.randperm(len(x))
        x, target = x[order], target[order]
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(8):
            for i in range(0, len(x), 64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[i:i + 64]), target[i:i + 64]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.zero_grad(set_to_none=True)
    return model


def test_model_learned_the_task(trained):
    x, y, _ = squares(200, seed=2)
    with torch.no_grad():
        accuracy = (trained(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.95, "the synthetic task must be learned for the Grad-CAM test to mean anything"


def test_gradcam_points_at_the_square(trained):
    x, y, corner = squares(100, seed=3)
    cams = gradcam(trained, x, last_conv_layer(trained))
    half = SIZE // 2
    top_left, bottom_right = cams[:, :half, :half].sum((1, 2)), cams[:, half:, half:].sum((1, 2))
    in_square_quadrant = np.where(y.numpy() == 0, top_left > bottom_right, bottom_right > top_left)
    assert in_square_quadrant.mean() >= 0.8
    # the maximum falls on the square (within one 2x2 cell of the 16x16 layer4 map), not merely in its quadrant
    peak = np.stack(np.unravel_index(cams.reshape(len(cams), -1).argmax(1), (SIZE, SIZE)), axis=1)
    near = ((peak >= corner - 2) & (peak < corner + SQUARE + 2)).all(axis=1)
    assert near.mean() >= 0.8


def test_gradcam_output_contract(trained):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 24, 40)  # not square: a transposed map would have the wrong shape
    trained.train()
    cams = gradcam(trained, x, trained.layer4, class_idx=1)
    assert cams.shape == (3, 24, 40) and cams.dtype == np.float32
    assert cams.min() >= 0 and np.all((cams.max(axis=(1, 2)) == 1) | (cams.max(axis=(1, 2)) == 0))
    assert trained.training, "the model's mode is restored"
    assert all(p.grad is None for p in trained.parameters()), "no gradients left on the parameters"
    trained.eval()


def test_gradcam_class_choice(trained):
    x, y, _ = squares(8, seed=4)
    predicted = gradcam(trained, x, trained.layer4)
    with torch.no_grad():
        labels = trained(x).argmax(1)
    np.testing.assert_allclose(predicted, gradcam(trained, x, trained.layer4, class_idx=labels), atol=1e-6)
    # the other class's map differs: class_idx is really used
    assert not np.allclose(predicted, gradcam(trained, x, trained.layer4, class_idx=1 - labels), atol=1e-3)


def test_last_conv_layer():
    model = TinyResNetLike()
    assert last_conv_layer(model) is model.layer4
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten())
    assert last_conv_layer(plain) is plain[2]
    with pytest.raises(ValueError):
        last_conv_layer(nn.Linear(2, 2))
