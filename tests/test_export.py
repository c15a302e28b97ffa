"""probe export (issue 27): a fitted head with its backbone as one ONNX or TorchScript file, run by
onnxruntime through probe predict --model-file, against probe predict itself, for a model of every
family (tiny random ones offline) and for EfficientNet-Lite0 with its real weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, copy_sample, hf_text_folder, open_clip_text_folder
from probe.datasets import SAMPLE_DIR
from probe.export import predict_file, read_metadata
from probe.predict import predict

IMAGES = [f for c in ("cat", "ship", "frog") for f in sorted((SAMPLE_DIR / "test" / c).glob("*.jpg"))[:4]]


def _same(run: Path, model_file: Path) -> None:
    """Every class's probability of every image within 1e-4 of probe predict's, the same top class."""
    classes = len(read_metadata(model_file)["classes"])
    ours = predict_file(model_file, IMAGES, top_k=classes)
    theirs = predict(run, IMAGES, top_k=classes, device="cpu")
    for a, b in zip(ours, theirs):
        assert a["top"][0]["class"] == b["top"][0]["class"], (a, b)
        pa, pb = ({t["class"]: t["probability"] for t in r["top"]} for r in (a, b))
        assert max(abs(pa[c] - pb[c]) for c in pb) < 1e-4, (pa, pb)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return copy_sample(tmp_path_factory.mktemp("export") / "d", per_class=6, test_per_class=2,
                       classes=["cat", "ship", "frog"])


@pytest.mark.parametrize("model,head,fmt", [
    ("resnet18", "logreg", "onnx"),
    ("timm:test_vit", "mlp", "torchscript"),
    ("open_clip", "zeroshot", "onnx"),
    ("hf", "linear", "onnx"),
])
def test_an_exported_file_predicts_what_probe_predict_does(run_cli, data, tmp_path, model, head, fmt):
    extra = ["--weights", "none", "--resolution", "32"] if model in ("resnet18", "timm:test_vit") else []
    if model == "open_clip":
        model, extra = f"open_clip:local-dir:{open_clip_text_folder(tmp_path / 'oc')}", ["--pool", "proj"]
    if model == "hf":  # a CLIP vision tower saved as a user saves one, its pooled feature
        model = f"hf:{hf_text_folder(tmp_path / 'hf', 'clip')}"
    args = ["--model", model, "--dataset", f"folder:{data}", *extra]
    assert run_cli("extract", *args).exit_code == 0
    assert run_cli("fit", *args, "--head", head, "--out", "run", *(["--calibrate", "temperature"]
                                                                  if head == "logreg" else [])).exit_code == 0
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    result = run_cli("export", "run", "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["classes"] == ["cat", "frog", "ship"]
    assert meta["identity"] == json.loads((tmp_path / "run" / "metrics.json").read_text())["identity"]
    _same(tmp_path / "run", out)
    shown = run_cli("predict", "--model-file", out, IMAGES[0])
    assert shown.exit_code == 0 and str(IMAGES[0]) in shown.output


def test_lite0_with_its_real_weights_exports_to_onnx(sample_cache, tmp_path):
    import onnxruntime

    from probe.export import export
    from probe.fit import fit

    run = fit(features=str(sample_cache), head="linear", out=str(tmp_path / "run"), device="cpu").out
    export(run, tmp_path / "lite0.onnx")
    _same(run, tmp_path / "lite0.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "lite0.onnx"), providers=["CPUExecutionProvider"])
    [images] = session.get_inputs()
    assert images.name == "images" and images.shape[0] == "batch"  # a dynamic batch axis
    out = session.run(None, {"images": np.zeros((3, 3, 64, 64), np.float32)})[0]
    assert out.shape == (3, 10) and np.allclose(out.sum(1), 1, atol=1e-5)


def test_what_cannot_be_exported_is_one_line(run_cli, sample_cache, tmp_path):
    assert run_cli("fit", "--features", sample_cache, "--head", "knn", "--out", "knn").exit_code == 0
    assert_one_line_error(run_cli("export", "knn", "--out", "k.onnx"), "knn", "cannot be exported")
    assert not (tmp_path / "k.onnx").exists()
    assert_one_line_error(run_cli("export", "nope", "--out", "k.onnx"), "no head")
    assert_one_line_error(run_cli("predict", "--model-file", "missing.onnx", IMAGES[0]), "missing.onnx")
    (tmp_path / "not.onnx").write_bytes(b"not a model")
    assert_one_line_error(run_cli("predict", "--model-file", "not.onnx", IMAGES[0]), "not a model file")
    assert_one_line_error(run_cli("predict", IMAGES[0]), "--head", "--model-file")


def test_what_a_new_user_broke(run_cli, data, tmp_path):
    """The break-test's findings, each as it was found."""
    import torch

    from probe.export import HeadModule
    from probe.stats import apply_temperature

    # A calibrated head's probabilities as probe predict computes them (softmax(log p / T), p floored at
    # 1e-12), also where the head is sure: logits 13.76 and -26.30 give p = 4e-18.
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
        layer.bias.zero_()
    head = HeadModule(torch.nn.Sequential(layer), False, 23.04)
    logits = torch.tensor([[13.76, -26.30], [0.3, -0.2]])
    expected = apply_temperature(torch.softmax(logits.double(), 1).numpy(), 23.04)
    np.testing.assert_allclose(head(logits).detach().numpy(), expected, atol=1e-5)

    args = ["--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset", f"folder:{data}"]
    assert run_cli("extract", *args).exit_code == 0
    assert run_cli("fit", *args, "--head", "logreg", "--C", "1", "--out", "run").exit_code == 0
    # --out in a folder not made yet is made; under a file it is one line; the format is read from the content.
    assert run_cli("export", "run", "--format", "torchscript", "--out", "new/named.onnx").exit_code == 0
    shown = run_cli("predict", "--model-file", "new/named.onnx", IMAGES[0])
    assert shown.exit_code == 0, shown.output
    assert_one_line_error(run_cli("export", "run", "--out", "run/metrics.json/x.onnx"), "metrics.json")
    assert_one_line_error(run_cli("predict", "--model-file", "new/named.onnx", IMAGES[0], "--top-k", "0"), "--top-k")
    # A head.json whose class list is shorter than what its pipeline predicts: damaged, in one line.
    record = json.loads((tmp_path / "run" / "head.json").read_text())
    record["artifact"]["classes"] = ["cat"]
    (tmp_path / "run" / "head.json").write_text(json.dumps(record))
    assert_one_line_error(run_cli("predict", "--head", "run", IMAGES[0]), "damaged")
    # bf16 features: the fp32 file would not give probe predict's numbers.
    assert run_cli("extract", *args, "--precision", "bf16").exit_code == 0
    assert run_cli("fit", *args, "--precision", "bf16", "--out", "bf16").exit_code == 0
    assert_one_line_error(run_cli("export", "bf16", "--out", "b.onnx"), "bf16", "--precision fp32")
    # A fine-tune written into a fit's folder leaves no head of that fit behind.
    assert run_cli("finetune", *args, "--strategy", "linear", "--epochs", "1", "--out", "bf16").exit_code == 0
    assert not (tmp_path / "bf16" / "head.json").exists() and not (tmp_path / "bf16" / "head.npz").exists()
