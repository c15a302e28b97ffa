"""probe finetune and probe compare on a tiny real data set (sample images, ResNet-18 at 32 px)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, copy_sample
from probe.errors import ProbeError
from probe.preprocess import Preprocess
from probe.augment import augment
from probe.finetune import Classifier, finetune, set_trainable, train_mode
from probe.runs import load_head


@pytest.fixture
def tiny(tmp_path):
    return copy_sample(tmp_path / "tiny", per_class=4, test_per_class=2, classes=["cat", "dog", "ship"])


def _run(tiny, tmp_path, strategy, **kw):
    options = dict(model="resnet18", weights="none", resolution=32, dataset=f"folder:{tiny}", epochs=1,
                   batch_size=4, device="cpu", progress=False, out=str(tmp_path / strategy))
    return finetune(strategy=strategy, **{**options, **kw})


@pytest.mark.parametrize("strategy", ["linear", "partial", "full", "lp-ft"])
def test_one_epoch_of_each_strategy(tiny, tmp_path, strategy):
    m = _run(tiny, tmp_path, strategy, epochs=2 if strategy == "lp-ft" else 1).metrics
    assert m["method"] == f"finetune-{strategy}" and m["n_train"] == 12 and m["n_test"] == 6
    assert 0 <= m["test_accuracy"] <= 1
    row = m["history"][-1]
    assert {"train_loss", "train_accuracy", "test_accuracy", "seconds", "images_per_second"} <= set(row)
    if strategy == "lp-ft":
        assert [h["stage"] for h in m["history"]] == ["lp", "ft"] and [h["epoch"] for h in m["history"]] == [1, 2]
    assert json.loads((tmp_path / strategy / "metrics.json").read_text())["method"] == m["method"]


def test_trainable_parameter_counts_per_strategy():
    net = Classifier("resnet18", "none", 32, 10)
    counts = {}
    for strategy in ("linear", "partial", "full"):
        set_trainable(net, strategy, ("layer4",))
        counts[strategy] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert counts["linear"] == 5130  # 512 x 10 + 10, the tutorials' 0.05%
    layer4 = sum(p.numel() for p in net.backbone.layer4.parameters())
    assert counts["partial"] == 5130 + layer4
    assert counts["full"] == 11_181_642  # the tutorials' ResNet-18 with a 10-class fc


def test_frozen_parameters_and_batchnorm_buffers_do_not_move(tiny, tmp_path):
    before = Classifier("resnet18", "none", 32, 3).backbone.state_dict()
    out = tmp_path / "partial"
    _run(tiny, tmp_path, "partial", epochs=2, bn="train")  # the last stage's BatchNorm trains too
    after = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for name, tensor in before.items():
        moved = not torch.equal(tensor, after[f"backbone.{name}"])
        assert moved == name.startswith("layer4"), name  # running means/vars included


def test_bn_frozen_keeps_every_batchnorm_statistic_and_affine_parameter_while_the_rest_trains(tiny, tmp_path):
    before = Classifier("resnet18", "none", 32, 3).backbone.state_dict()
    _run(tiny, tmp_path, "full", epochs=2, bn="frozen")
    after = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    for name, tensor in before.items():
        is_bn = ".bn" in name or name.startswith("bn1") or ".downsample.1." in name
        moved = not torch.equal(tensor, after[f"backbone.{name}"])
        assert moved == (not is_bn), name  # running statistics and num_batches_tracked included
    with pytest.raises(ProbeError, match="--bn"):
        _run(tiny, tmp_path, "full", bn="sometimes")


def test_train_mode_keeps_frozen_batchnorm_in_eval():
    net = Classifier("resnet18", "none", 32, 3)
    set_trainable(net, "partial", ("layer4",))
    train_mode(net)
    assert not net.backbone.bn1.training and not net.backbone.layer3[0].bn1.training
    assert net.backbone.layer4[0].bn1.training and net.fc.training


def test_resume_of_a_finished_run_trains_no_more_and_another_config_is_refused(tiny, tmp_path):
    # A real kill-and-resume is in test_reliability.py; this checks the bookkeeping around it.
    done = _run(tiny, tmp_path, "full", epochs=2).metrics
    again = _run(tiny, tmp_path, "full", epochs=2, resume=True).metrics
    assert again["history"] == done["history"]
    with pytest.raises(ProbeError, match="another configuration"):
        _run(tiny, tmp_path, "full", epochs=3, resume=True)


def test_a_damaged_checkpoint_is_refused(tiny, tmp_path, run_cli):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x80\x02 cut short")
    result = run_cli("finetune", "--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset",
                     f"folder:{tiny}", "--epochs", "1", "--out", out, "--resume")
    assert_one_line_error(result, "checkpoint.pt", "damaged")


def test_augment_is_random_per_image_and_keeps_the_size():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32).repeat(4, 1, 1, 1)
    for kind in ("rrc", "crop", "flip"):
        generators = [torch.Generator().manual_seed(i) for i in range(8)]
        out = augment(images, Preprocess(48, 48), kind, generators)
        assert out.shape == (8, 3, 48, 48)
        if kind != "flip":  # two flips of the same image can be the same coin toss
            assert not torch.equal(out[0], out[2])  # the same image, two different crops
        # A view depends on its own generator only, not on the rest of the batch.
        torch.testing.assert_close(augment(images[2:3], Preprocess(48, 48), kind, [torch.Generator().manual_seed(2)])[0],
                                   out[2])
    assert torch.equal(augment(images, Preprocess(32, 32), "none", torch.Generator()), images)


@pytest.mark.parametrize("size", [(32, 32), (24, 48), (300, 200)])
def test_augment_draws_and_crops_as_torchvision_does(size):
    """The same seed gives torchvision's RandomResizedCrop / RandomCrop boxes and flips, and the same pixels
    as torchvision's own transforms on those boxes (crops inside the image; RandomCrop's zero padding)."""
    from torchvision.transforms import v2

    from probe.augment import CROP_PADDING, RRC_RATIO, RRC_SCALE, crop_resize, draw_box

    h, w = size
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(1)) * 255
    for seed in range(20):
        torch.manual_seed(seed)  # torchvision draws from the global generator
        top, left, bh, bw = v2.RandomResizedCrop.get_params(image, scale=list(RRC_SCALE), ratio=list(RRC_RATIO))
        flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip's coin comes next
        box = draw_box("rrc", h, w, torch.Generator().manual_seed(seed))
        assert box == (top, left, bh, bw, flip)
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w  # inside the image: no padding
        expected = v2.functional.resized_crop(image, top, left, bh, bw, [40, 40], antialias=True)
        expected = v2.functional.horizontal_flip(expected) if flip else expected
        torch.testing.assert_close(crop_resize(image, box, 40), expected, atol=1e-3, rtol=1e-5)

        torch.manual_seed(seed)
        padded = v2.functional.pad(image, [CROP_PADDING] * 4, fill=0)
        top, left, bh, bw = v2.RandomCrop.get_params(padded, (h, w))
        flip = bool(torch.rand(1) < 0.5)
        box = draw_box("crop", h, w, torch.Generator().manual_seed(seed))
        assert box == (top - CROP_PADDING, left - CROP_PADDING, h, w, flip)
        expected = v2.functional.crop(padded, top, left, bh, bw)
        expected = v2.functional.horizontal_flip(expected) if flip else expected
        expected = v2.functional.resize(expected, [40, 40], antialias=True)
        torch.testing.assert_close(crop_resize(image, box, 40), expected, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("head", ["logreg", "linear"])
def test_lp_ft_starts_from_a_fitted_head_with_its_scaler_folded_in(sample_cache, tmp_path, head):
    from probe.cache import open_cache
    from probe.finetune import _init_from_head
    from probe.fit import fit

    fitted = fit(features=str(sample_cache), head=head, out=str(tmp_path / "h")).metrics
    cache = open_cache(sample_cache)
    net = Classifier("efficientnet_lite0", "none", 32, 10)
    # The default normalization (l2+standardize): the scaler is folded in, the L2 step stays before the layer.
    net.l2_features = _init_from_head(net.fc, str(tmp_path / "h"), fitted["classes"])
    assert net.l2_features
    features, _ = cache.load("test")
    expected = load_head(tmp_path / "h")["pipeline"].predict_proba(features)
    with torch.no_grad():
        got = torch.softmax(net.fc(torch.nn.functional.normalize(torch.from_numpy(features), dim=1)), 1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    with pytest.raises(ProbeError, match="fitted on classes"):
        _init_from_head(net.fc, str(tmp_path / "h"), fitted["classes"][::-1])


def test_compare_merges_a_fit_and_a_finetune_and_draws_both_plots(tiny, tmp_path, run_cli, sample_cache):
    from probe.fit import fit

    fit(features=str(sample_cache), head="knn", out=str(tmp_path / "knn"))
    _run(tiny, tmp_path, "lp-ft", epochs=2)
    result = run_cli("compare", tmp_path / "knn", tmp_path / "lp-ft", "--out", tmp_path / "table",
                     "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    assert "| knn | efficientnet_lite0 |" in result.output and "| finetune-lp-ft | resnet18 |" in result.output
    assert (tmp_path / "table" / "compare.csv").read_text().count("\n") == 3
    for png in ("accuracy.png", "curves.png"):
        with Image.open(tmp_path / "plots" / png) as im:
            assert im.size[0] > 300
    assert_one_line_error(run_cli("compare", tmp_path / "nothing"), "cannot read run metrics")


def test_finetune_input_errors(run_cli, tiny):
    base = ["finetune", "--model", "resnet18", "--weights", "none", "--dataset", f"folder:{tiny}"]
    assert_one_line_error(run_cli(*base, "--strategy", "everything"), "unknown strategy", "lp-ft")
    assert_one_line_error(run_cli(*base, "--optimizer", "lion"), "unknown optimizer")
    assert_one_line_error(run_cli(*base, "--epochs", "0"), "must be positive")
    assert_one_line_error(run_cli(*base, "--train-per-class", "9"), "only 4")
    assert_one_line_error(run_cli(*base, "--weight-decay", "-1"), "--weight-decay must be 0 or more")
    assert_one_line_error(run_cli(*base, "--lr", "-1"), "--lr must be a positive")
    assert_one_line_error(run_cli(*base, "--head-lr", "0"), "--head-lr must be a positive")
    assert_one_line_error(run_cli(*base, "--strategy", "linear", "--unfreeze", "layer3"), "--unfreeze", "partial")
    assert_one_line_error(run_cli(*base, "--resolution", "32", "--strategy", "partial", "--unfreeze", "layer9"),
                          "--unfreeze layer9", "no parameter")


def test_a_temporary_file_of_a_killed_run_is_removed(tiny, tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # a process that has ended: its pid names no running writer
    (tmp_path / "full").mkdir()
    stale = tmp_path / "full" / f".checkpoint.pt.{dead.pid}.tmp"
    stale.write_bytes(b"half a checkpoint")
    _run(tiny, tmp_path, "full")
    assert not stale.exists() and (tmp_path / "full" / "metrics.json").exists()


def test_a_resume_of_a_finished_run_reports_the_trained_model_with_a_curve_subset(tiny, tmp_path):
    first = _run(tiny, tmp_path, "full", epochs=2, curve_test=2).metrics
    again = _run(tiny, tmp_path, "full", epochs=2, curve_test=2, resume=True).metrics
    assert again["test_accuracy"] == first["test_accuracy"] and again["curve_test_images"] == 2


def test_a_diverging_finetune_is_one_line(run_cli, tiny):
    result = run_cli("finetune", "--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset",
                     f"folder:{tiny}", "--epochs", "2", "--optimizer", "sgd", "--lr", "1e12", "--head-lr", "1e12",
                     "--strategy", "full", "--out", "run")
    assert_one_line_error(result, "diverged", "--lr")
