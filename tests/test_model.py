"""Our ResNets: torchvision-compatible weights, the write-up's MLP head, frozen backbones, weights errors."""
import pytest
import torch
import torchvision

from helpers import model as Mo


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_torchvision_state_dict_loads_strictly_and_gives_same_outputs(arch):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, arch)(weights=None).eval()
    ours = Mo.resnet(arch, 1000).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_mlp_head_trainable_parameters():
    m = Mo.resnet("resnet34", 2)
    m.fc = Mo.mlp_head(m.num_features, 2)
    Mo.freeze(m)
    assert Mo.count_parameters(m) == 65_922  # the write-up's reported number for 2 classes


def test_frozen_backbone_is_unchanged_by_a_training_step(tmp_path):
    sd_path = tmp_path / "sd.pt"  # "pretrained" weights from a file: a frozen backbone needs some
    torch.save(Mo.build_model("resnet34", 7, weights=None, head="mlp").state_dict(), sd_path)
    m = Mo.build_model("resnet34", 7, weights=str(sd_path), freeze_backbone=True, head="mlp")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    Mo.train_mode(m)
    assert not m.bn1.training and not m.layer1.training and m.fc.training
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    after = m.state_dict()
    for k in before:
        if k.startswith("fc."):
            continue
        assert torch.equal(before[k], after[k]), f"{k} changed (BatchNorm statistics included)"
    assert not torch.equal(before["fc.1.weight"], after["fc.1.weight"])


def test_frozen_random_backbone_is_refused():
    with pytest.raises(ValueError, match="frozen random backbone"):
        Mo.build_model("resnet34", 7, weights=None, freeze_backbone=True)


def test_missing_imagenet_weights_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(Mo.WeightsError) as e:
        Mo.build_model("resnet34", 7, weights="imagenet")
    text = str(e.value)
    assert "resnet34" in text and "weights=None" in text and "TORCH_HOME" in text and str(tmp_path) in text


def test_imagenet_weights_from_a_filled_cache(monkeypatch, tmp_path):
    """The weights API reads $TORCH_HOME's cache: fill it with a file of the right name and it loads strictly."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    w = torchvision.models.ResNet18_Weights.DEFAULT
    target = tmp_path / "hub" / "checkpoints" / w.url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), target)
    m = Mo.build_model("resnet18", 7, weights="imagenet")
    assert torch.equal(m.conv1.weight, ref.conv1.weight)
    assert m.fc.out_features == 7


def test_unknown_arch_and_head_are_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        Mo.resnet("resnet42")
    with pytest.raises(ValueError, match="head"):
        Mo.build_model("resnet18", 7, head="transformer")


def test_save_and_load_trained_round_trip(tmp_path):
    m = Mo.build_model("resnet18", 3, head="mlp").eval()
    meta = dict(arch="resnet18", classes=["a", "b", "c"], head="mlp", dropout=0.0, image_size=32)
    path = Mo.save_trained(m, meta, tmp_path / "m.pt")
    back, meta2 = Mo.load_trained(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), back(x))
    assert meta2 == meta
