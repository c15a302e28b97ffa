"""`probe export`: a fitted head with its backbone as one model file (ONNX or TorchScript), and
`probe predict --model-file`, which runs one.

The file maps images [N, 3, S, S] (float32 RGB pixels in 0..255, already resized and center-cropped
to S as the file's metadata says) to class probabilities [N, classes]; inside it are the model's own
normalization (mean and std), the backbone, the head and its calibration temperature. The resize and
crop stay outside, as a preprocessing step the file carries in its metadata (`preprocessing`: size,
resize, mode, interpolation), because an antialiased resize of any input size does not export to ONNX
exactly; `probe predict --model-file` applies it with the same code as `probe predict`.

The head becomes torch layers after the backbone: an L2 normalization where the pipeline has one, the
scaler folded into the first linear layer (z = (u - mean) / s, so W z + b = (W / s) u + (b - (W / s) mean)),
then logreg's or linear's layer, mlp's layers, or the zero-shot classifier (scale * cosine + bias).
kNN is refused: it would carry its whole training set. Metadata (ONNX metadata_props; TorchScript
extra file `probe.json`): classes, the run's identity, the preprocessing, the model, the opset.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from probe.errors import ProbeError

OPSET = 18
FORMATS = ("onnx", "torchscript")


def head_module(pipeline, temperature: float | None) -> "HeadModule":
    """The head of a probe pipeline as a torch module: features [N, D] -> probabilities [N, K]."""
    from sklearn.preprocessing import Normalizer, StandardScaler

    from probe.heads import CosineKNN, LogisticProbe, TorchLinear, TorchMLP, ZeroShotHead, fold_scaler

    steps = [step for _, step in pipeline.steps]
    head, prep = steps[-1], steps[:-1]
    if isinstance(head, CosineKNN):
        raise ProbeError("a knn head cannot be exported: it would carry every training feature; export a logreg, "
                         "linear, mlp or zeroshot head")
    l2 = bool(prep) and isinstance(prep[0], Normalizer)
    scaler = next((s for s in prep if isinstance(s, StandardScaler)), None)
    if isinstance(head, ZeroShotHead):  # it compares unit vectors: scale * cosine + bias
        layers, l2 = [_linear(head.logit_scale * head.weights_, np.full(len(head.weights_), head.logit_bias))], True
    elif isinstance(head, LogisticProbe):
        layers = [_linear(head.coef_, head.intercept_)]
    elif isinstance(head, (TorchLinear, TorchMLP)):  # dropout is the identity at inference
        modules = [head.module_] if isinstance(head.module_, nn.Linear) else list(head.module_)
        layers = [_linear(m.weight.detach().numpy(), m.bias.detach().numpy()) if isinstance(m, nn.Linear) else m
                  for m in modules if not isinstance(m, nn.Dropout)]
    else:
        raise ProbeError(f"cannot export a {type(head).__name__} head")
    if scaler is not None:  # folded into the first layer
        layers[0] = _linear(*fold_scaler(layers[0].weight.detach().numpy(), layers[0].bias.detach().numpy(), scaler))
    return HeadModule(nn.Sequential(*layers), l2, temperature)


def _linear(W: np.ndarray, b: np.ndarray) -> nn.Linear:
    layer = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(np.asarray(W, np.float32)))
        layer.bias.copy_(torch.as_tensor(np.asarray(b, np.float32)))
    return layer


class HeadModule(nn.Module):
    """Features -> probabilities: the L2 step where the pipeline has one, the layers, the softmax, and the
    temperature as probe.stats.apply_temperature applies it (with which it was fitted): softmax(log p / T),
    p floored at 1e-12 (a head's zero probabilities)."""

    def __init__(self, layers: nn.Module, l2: bool, temperature: float | None):
        super().__init__()
        self.layers, self.l2, self.temperature = layers, l2, float(temperature or 1.0)

    def forward(self, features):
        if self.l2:
            features = torch.nn.functional.normalize(features, dim=1)
        probabilities = torch.softmax(self.layers(features), dim=1)
        if self.temperature == 1.0:
            return probabilities
        return torch.softmax(torch.log(probabilities.clamp(min=1e-12)) / self.temperature, dim=1)


def exported_model(artifact: dict):
    """The whole path, images [N, 3, S, S] in 0..255 -> probabilities, as one torch module (CPU, fp32)."""

    from probe.backbones import create_backbone
    from probe.preprocess import Preprocess

    if artifact.get("layers"):
        raise ProbeError("a head fitted on --layer features cannot be exported yet: export a head of the final feature")
    if artifact.get("tokens"):
        raise ProbeError("a head on token maps (attentive, seg-linear) cannot be exported yet: export a head of the "
                         "pooled feature")
    if artifact.get("precision", "fp32") != "fp32":
        raise ProbeError(f"this head's features were computed in {artifact['precision']}; the exported file computes in "
                         "fp32 and would not give probe predict's probabilities: fit the head on a cache extracted "
                         "with --precision fp32")
    pre = Preprocess.from_dict(artifact["preprocessing"], artifact["resolution"])
    backbone = create_backbone(artifact["model"], artifact["weights"], pre, artifact.get("pool"))
    head = head_module(artifact["pipeline"], artifact.get("temperature"))

    class Exported(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = backbone, head
            self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255)

        def forward(self, images):
            return self.head(self.backbone((images - self.mean) / self.std).float())

    return Exported().eval(), pre


def export(run: str | os.PathLike, out: str | os.PathLike, fmt: str = "onnx", trust_pickle: bool = False) -> dict:
    """Write run's head with its backbone to `out` as ONNX or TorchScript; returns the metadata."""
    from probe.files import atomic_write
    from probe.runs import load_head

    from probe.files import make_dir

    if fmt not in FORMATS:
        raise ProbeError(f"unknown --format {fmt!r}: choose onnx or torchscript")
    out = Path(out)
    if out.is_dir():
        raise ProbeError(f"--out {out} is a folder: give the model file's name (model.onnx, model.pt)")
    make_dir(out.parent)  # before the export's seconds: a path under a file is one line now
    artifact = load_head(run, trust_pickle=trust_pickle)
    model, pre = exported_model(artifact)
    names = [artifact["classes"][int(c)] for c in artifact["pipeline"].classes_]  # the output's columns
    meta = {"probe_export": 1, "classes": names, "model": artifact["model"],
            "preprocessing": artifact["preprocessing"], "resolution": artifact["resolution"],
            "input": f"images float32 [N, 3, {pre.size}, {pre.size}], RGB 0..255, resized and center-cropped as "
                     "preprocessing says", "output": "probabilities float32 [N, classes]",
            "identity": artifact.get("identity"), "opset": OPSET if fmt == "onnx" else None}
    example = torch.zeros(2, 3, pre.size, pre.size)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.export")
    try:
        if fmt == "torchscript":
            with torch.no_grad(), _no_warnings():  # TorchScript's deprecation notice: it still runs everywhere
                traced = torch.jit.trace(model, example, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={"probe.json": json.dumps(meta)})
        else:
            _onnx(model, example, tmp, meta)
        atomic_write(out, tmp.read_bytes())
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return meta


def _onnx(model, example, path: Path, meta: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise ProbeError('--format onnx needs onnx and onnxscript: pip install "probe[onnx]"') from None
    import io as _io
    import logging

    batch = torch.export.Dim("batch", min=1)
    quiet = _io.StringIO()
    try:  # torch.export's exporter (onnxscript); its progress lines and warnings go nowhere
        with torch.no_grad(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), _no_warnings():
            logging.disable(logging.WARNING)
            program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["probabilities"],
                                        opset_version=OPSET, dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
            program.save(str(path), external_data=False)
    except ImportError:
        raise ProbeError('--format onnx needs onnx and onnxscript: pip install "probe[onnx]"') from None
    except ProbeError:
        raise
    except Exception as e:  # an operator ONNX lacks, among other exporter errors
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ProbeError(f"this model does not export to ONNX ({reason}); try --format torchscript") from None
    finally:
        logging.disable(logging.NOTSET)
    proto = onnx.load(str(path))
    for key, value in (("probe", json.dumps(meta)),):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _no_warnings():
    """Library warnings off: TorchScript's deprecation notices, the ONNX exporter's notes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _is_onnx(path: Path) -> bool:
    """TorchScript files are zip archives; an ONNX file is a protobuf (whatever either is named)."""
    import zipfile

    return not zipfile.is_zipfile(path)


def read_metadata(path: Path) -> dict:
    """The metadata probe export wrote into a model file."""
    try:
        if _is_onnx(path):
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            return json.loads(props["probe"])
        extra = {"probe.json": ""}
        with _no_warnings():
            torch.jit.load(str(path), _extra_files=extra)
        return json.loads(extra["probe.json"])
    except ImportError:
        raise ProbeError('an .onnx model file needs onnx and onnxruntime: pip install "probe[onnx]"') from None
    except Exception as e:  # not a model file, or one probe export did not write
        raise ProbeError(f"{path} is not a model file written by probe export ({type(e).__name__})") from None


def predict_file(model_file: str | os.PathLike, images: list, top_k: int = 5) -> list[dict]:
    """Top-k classes of image files by an exported model file (ONNX through onnxruntime, or TorchScript)."""
    from probe.predict import classify
    from probe.preprocess import Preprocess

    path = Path(model_file)
    if not path.is_file():
        raise ProbeError(f"model file {path} not found")
    if top_k < 1:
        raise ProbeError(f"--top-k must be positive, not {top_k}")
    meta = read_metadata(path)
    pre = Preprocess.from_dict(meta["preprocessing"], meta["resolution"])
    if _is_onnx(path):
        try:
            import onnxruntime
        except ImportError:
            raise ProbeError('running an .onnx file needs onnxruntime: pip install "probe[onnx]"') from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(["probabilities"], {"images": x})[0]  # noqa: E731
    else:
        with _no_warnings():
            scripted = torch.jit.load(str(path)).eval()

        def run(x):
            with torch.inference_mode():
                return scripted(torch.from_numpy(x)).numpy()
    return classify(images, pre, lambda pixels: run(np.ascontiguousarray(pixels.numpy(), dtype=np.float32)),
                    meta["classes"], top_k)
