"""The training loop: resumable, deterministic on CPU, refuses bad settings, stops on a diverging loss."""
import traceback

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import train as T
from helpers.evaluate import predict_proba, val_scores
from helpers.model import build_model


def tiny_data(n=48, classes=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 60, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[:, 0] += (y * 60).to(torch.uint8).view(-1, 1, 1)  # class signal in the red channel
    return x, y


RECIPE = dict(arch="resnet18", epochs=3, batch_size=16, optimizer="adamw", lr=1e-3, schedule="onecycle",
              augment="strong", select_metric="val_loss", seed=3, run_name="test", head="mlp", image_size=16)


def train_once(tmp_path=None, stop_after=None, **over):
    torch.manual_seed(123)  # model init is not part of fit: fix it here
    model = build_model("resnet18", 3, head="mlp")
    return T.fit(model, tiny_data(), tiny_data(24, seed=1), {**RECIPE, **over}, tmp_path, device="cpu",
                 progress=False, stop_after_epochs=stop_after)


def test_deterministic_on_cpu():
    _, h1, _ = train_once()
    _, h2, _ = train_once()
    cols = ["train_loss", "train_acc", "val_loss", "val_acc", "val_bal_acc"]
    pd.testing.assert_frame_equal(h1[cols], h2[cols])


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    m_full, h_full, _ = train_once(tmp_path / "a")
    m_part, h_part, info = train_once(tmp_path / "b", stop_after=1)
    assert len(h_part) == 1 and not info["finished"]
    m_res, h_res, info = train_once(tmp_path / "b")  # a fresh process would do exactly this
    assert info["finished"] and len(h_res) == 3
    cols = ["train_loss", "val_loss", "val_acc"]
    pd.testing.assert_frame_equal(h_full[cols], h_res[cols])
    for (k, a), b in zip(m_full.state_dict().items(), m_res.state_dict().values()):
        assert torch.equal(a, b), k


def test_finished_run_is_loaded_not_retrained(tmp_path):
    _, h1, _ = train_once(tmp_path)
    _, h2, info = train_once(tmp_path)
    pd.testing.assert_frame_equal(h1, h2)  # identical, seconds included: nothing ran again
    assert info["epochs_run"] == 3


def test_changed_recipe_does_not_silently_reuse_a_checkpoint(tmp_path):
    train_once(tmp_path, stop_after=1)
    with pytest.raises(RuntimeError, match="different recipe"):
        train_once(tmp_path, lr=5e-4)


def test_best_epoch_weights_are_restored(tmp_path):
    model, hist, info = train_once(select_metric="val_acc")
    best = hist.val_acc.idxmax() + 1
    assert info["best_epoch"] == best
    probs = predict_proba(model, tiny_data(24, seed=1)[0], device=torch.device("cpu"))
    assert val_scores(probs, tiny_data(24, seed=1)[1].numpy())["val_acc"] == pytest.approx(hist.val_acc.max())


def test_early_stopping(tmp_path):
    _, hist, info = train_once(epochs=8, patience=1, lr=1e-9, select_metric="val_acc")
    assert info["finished"] and len(hist) < 8


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    train_once(tmp_path, stop_after=1)
    before = (tmp_path / "last.pt").read_bytes()
    x, y = tiny_data()
    x_bad = x.clone()
    model = build_model("resnet18", 3, head="mlp")
    with torch.no_grad():
        model.fc[1].weight.fill_(float("nan"))
    with pytest.raises(T.TrainingDiverged, match="epoch 1"):
        T.fit(model, (x_bad, y), tiny_data(24, seed=1), RECIPE, tmp_path / "other", device="cpu", progress=False)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not (tmp_path / "other" / "last.pt").exists()


@pytest.mark.parametrize("bad, match", [
    ({"optimizer": "adagrad"}, "optimizer"), ({"epochs": 0}, "epochs"), ({"lr": -1}, "lr"),
    ({"schedule": "step"}, "schedule"), ({"learning_rate": 1}, "unknown recipe setting")])
def test_bad_recipe_settings_are_refused(bad, match):
    with pytest.raises((ValueError, KeyError), match=match):
        T.resolve_recipe({**RECIPE, **bad})


def test_class_weighting_and_balanced_sampling_run():
    for over in ({"class_weighting": "balanced"}, {"sampler": "balanced"}, {"optimizer": "sgd", "schedule": "cosine"}):
        _, hist, _ = train_once(epochs=1, **over)
        assert np.isfinite(hist.train_loss).all()


class HostReads:
    """Counts reads of device values on the host during a block: ``Tensor.item``, ``.cpu()``, ``.tolist()``,
    ``.numpy()``, and ``bool``/``int``/``float`` of a tensor. On a GPU each one waits for the queue to drain."""

    NAMES = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(self_, *a, _original=original, **k):
                # Adam's step counters live on the host on the CPU (fused on CUDA keeps them on the device):
                # reading them is not a device read.
                if not any("torch/optim/" in f.filename for f in traceback.extract_stack(limit=4)):
                    self.count += 1
                return _original(self_, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, counted)


def host_reads_during_fit(monkeypatch, n_train):
    import helpers.train as train_module
    monkeypatch.setattr(train_module, "predict_proba", lambda *a, **k: np.full((24, 3), 1 / 3))  # validation apart
    x, y = tiny_data(n_train)
    model = build_model("resnet18", 3, head="mlp")
    with monkeypatch.context() as m:
        reads = HostReads(m)
        T.fit(model, (x, y), tiny_data(24, seed=1), {**RECIPE, "epochs": 1, "batch_size": 4, "check_every": 1000},
              None, device="cpu", progress=False)
        return reads.count


def test_host_reads_do_not_grow_with_steps_per_epoch(monkeypatch):
    """The step never waits on the host: 2 steps or 12 steps per epoch, the same number of host reads."""
    assert host_reads_during_fit(monkeypatch, 8) == host_reads_during_fit(monkeypatch, 48)


class FakeScaler:
    """A GradScaler stand-in: ``skip`` says whether this step's gradients overflowed."""

    def __init__(self, skip):
        self.skip, self.scale = skip, 1024.0

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale

    def step(self, opt):
        if not self.skip:
            opt.step()

    def update(self):
        if self.skip:
            self.scale /= 2


@pytest.mark.parametrize("skip", [False, True])
def test_schedule_advances_only_when_the_optimiser_stepped(skip):
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    p.grad = torch.ones(2)
    assert T.optimizer_step(opt, sched, FakeScaler(skip)) is (not skip)
    assert sched.last_epoch == (0 if skip else 1)
    assert torch.equal(p.detach(), torch.ones(2) if skip else torch.zeros(2))


def test_resolution_schedule_trains_small_first_and_records_it():
    _, hist, info = train_once(resolution_schedule=[[8, 2], [16, 1]])
    assert list(hist.image_size) == [8, 8, 16] and info["epochs_run"] == 3
    assert hist.train_seconds_cum.is_monotonic_increasing
    assert [T.epoch_size(T.resolve_recipe({**RECIPE, "resolution_schedule": [[8, 2], [16, 1]]}), e)
            for e in (1, 2, 3)] == [8, 8, 16]


@pytest.mark.parametrize("bad", [[[32, 2]], [[8, 0]], [8, 2], [["8", 2]]])
def test_bad_resolution_schedules_are_refused(bad):
    with pytest.raises(ValueError, match="resolution_schedule"):
        T.resolve_recipe({**RECIPE, "resolution_schedule": bad})


def test_max_train_images_inside_a_recipe_is_refused():
    """It is a profile setting; inside a recipe it used to be accepted and ignored."""
    with pytest.raises(KeyError, match="max_train_images"):
        T.resolve_recipe({**RECIPE, "max_train_images": 10})


# ------------------------------------------------------------------------------------------ one training step
def test_fit_the_benchmark_and_the_estimate_run_the_same_step(monkeypatch):
    """From the same state and batch, fit's step, the benchmark's project path and a bare ``training_step`` give
    the same loss and the same parameters; the run-time estimate times ``training_step`` itself."""
    from helpers import bench, preflight
    from helpers.config import resolve_recipe

    x, y = tiny_data(16)
    # No dropout: no random draw to differ. SGD, so the parameters after the step are comparable: Adam's first
    # step moves each weight by about lr x sign(gradient), and a gradient that is zero up to rounding (summed in
    # another order of the same batch) would flip its sign.
    r = resolve_recipe({**RECIPE, "epochs": 1, "batch_size": 16, "augment": "none", "schedule": "none",
                        "label_smoothing": 0.1, "head": "linear", "optimizer": "sgd", "lr": 0.05})
    dev = torch.device("cpu")

    def fresh():
        torch.manual_seed(123)
        return build_model("resnet18", 3, head="linear").to(memory_format=torch.channels_last)

    fitted, hist, _ = T.fit(fresh(), (x, y), (x, y), r, device=dev, progress=False)  # one epoch = one step
    bare = fresh()
    T.train_mode(bare) if hasattr(T, "train_mode") else bare.train()
    step, *_ = T.training_step(bare, r, dev, y, steps_per_epoch=1)
    loss, _ = step(x, y, 16)
    benched = fresh()
    benched.train()
    bstep, *_ = T.training_step(benched, r, dev, y, steps_per_epoch=1)
    path = bench.ProjectPath(x, y, 16, 16, dev)
    path(bstep)
    assert float(hist.train_loss.iloc[0]) == pytest.approx(float(loss), rel=1e-5)
    assert float(path.total_loss) / 16 == pytest.approx(float(loss), rel=1e-5)
    start = fresh().state_dict()
    after = {name: m.state_dict() for name, m in [("fit", fitted), ("training_step", bare), ("bench", benched)]}
    for key, p0 in start.items():
        if p0.is_floating_point():
            ref = after["training_step"][key]
            for name in ("fit", "bench"):
                torch.testing.assert_close(after[name][key], ref, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    moved = [k for k, p0 in start.items() if p0.is_floating_point() and not torch.equal(p0, after["fit"][k])]
    assert any(k.endswith("weight") for k in moved)  # the step did train: the comparison is not of untouched weights
    seen = []
    real = T.training_step
    monkeypatch.setattr(T, "training_step", lambda *a, **k: seen.append(a[1]) or real(*a, **k))
    assert preflight.measure_step(r, 16, steps=1) > 0
    assert seen and seen[0] is r


def test_class_weighting_pushes_the_gradient_towards_the_rare_class():
    """Two classes, three images of class 0 and one of class 1, a model that predicts 50/50: with inverse-frequency
    weights the step raises the rare class's logit more than without."""
    y = torch.tensor([0, 0, 0, 1])
    w = T.class_weights(y)
    assert torch.allclose(w, torch.tensor([4 / (2 * 3), 4 / (2 * 1)]))
    x = torch.ones(4, 1)

    def bias_after_step(weight):
        from torch import nn

        lin = nn.Linear(1, 2)
        nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
        opt = torch.optim.SGD(lin.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        r = dict(label_smoothing=0.0)
        step = T.make_step(lin, opt, sched, scaler, lambda v, size, train: v, r, torch.device("cpu"), weight)
        step(x, y, None)
        return lin.bias.detach()

    plain, weighted = bias_after_step(None), bias_after_step(w)
    assert plain[0] > plain[1]  # unweighted: the common class wins the step
    assert weighted[1] - weighted[0] > plain[1] - plain[0] and weighted[1] >= weighted[0]  # weighted: balanced
