"""`probe finetune`: the comparison stage. The same backbone trained on the same images, with images
through it every epoch: frozen (`linear`), last stage (`partial`), everything (`full`), or head first
then everything at the backbone's learning rate (`lp-ft`).

One model (backbone + a new Linear) and one training loop (probe.train) serve every strategy; a
strategy only decides which parameters train. Frozen parts stay in eval mode, so their BatchNorm
statistics do not move. Images are read a batch at a time (decoded in DataLoader workers where they are
large) and augmented in batches on the device: the memory of a fine-tune does not grow with the data set.
"""

from __future__ import annotations

import datetime
import io
import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from probe import identity
from probe.backbones import create_backbone, hash_file, partial_prefixes, resolve
from probe.augment import AUGMENTATIONS, augment, recipe
from probe.batches import SMALL_IMAGE_SIDE, loader_workers
from probe.datasets import ImageDataset, Split, load_dataset
from probe.preprocess import Preprocess, resize_center_crop
from probe.errors import ProbeError
from probe.device import resolve_device
from probe.files import atomic_write, make_dir
from probe.heads import rank_classes
from probe.heads import fold_scaler
from probe.runs import FitResult, folder_name, load_head, save_run
from probe import stats
from probe.selection import (TEST_FRACTION, balanced_rows, class_indices, holdout_description, holdout_rows,
                             test_set_identity)
from probe.train import train_epochs

log = logging.getLogger("probe")

STRATEGIES = ("linear", "partial", "full", "lp-ft")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")
BN_MODES = ("frozen", "train")


class Classifier(nn.Module):
    """Normalization, the backbone (classifier removed) and a new Linear of the right width; l2_features:
    each feature vector scaled to unit length before the Linear (lp-ft from a head fitted on L2-normalized
    features, `probe fit --normalize l2` or `l2+standardize`)."""

    l2_features = False

    def __init__(self, model: str, weights: str, pre: Preprocess | int | None, n_classes: int):
        super().__init__()
        if not isinstance(pre, Preprocess):  # a size: the model's own transform at that size
            pre = resolve(model).preprocess.at(pre)
        self.backbone = create_backbone(model, weights, pre)
        self.fc = nn.Linear(self.backbone.feature_dim, n_classes)
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # float images in 0..255
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        return self.fc(nn.functional.normalize(features, dim=1) if self.l2_features else features)


def set_trainable(model: Classifier, strategy: str, last_stage: tuple[str, ...], unfreeze: tuple[str, ...] = (),
                  bn: str = "train") -> None:
    """Mark which parameters train: the classifier always; `partial` adds the last stage and `unfreeze`.

    bn="frozen": BatchNorm layers keep their pretrained affine parameters too, and so (train_mode puts
    modules without trainable parameters in eval mode) their pretrained running statistics.
    """
    prefixes = {"linear": (), "lp-ft": (), "partial": tuple(last_stage) + tuple(unfreeze), "full": ("",)}[strategy]
    for name, p in model.backbone.named_parameters():
        p.requires_grad_(any(name.startswith(pre) for pre in prefixes))
    if bn == "frozen":
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(False)
    model.fc.requires_grad_(True)


def train_mode(model: nn.Module) -> None:
    """Training mode for what trains; eval mode for every module whose parameters are all frozen."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


class Squares(torch.utils.data.Dataset):
    """A split's images as uint8 squares [side, side, 3], decoded one at a time (in DataLoader workers for large
    images), so a fine-tune holds a batch of images, never the data set: small images (CIFAR-sized) are
    center-cropped to their shorter side, large ones resized as `pre` resizes them and center-cropped to a
    square of that side (the evaluation crop is taken from it later, as from the small ones).

    Square first, for training and evaluation alike: the random crops are then taken from the same frame
    that evaluation's center crop shows, never from a squashed non-square one. A small image of another size
    than the split's first is resized to the first's square, so that a batch is one size.
    """

    def __init__(self, split: Split, pre: Preprocess):
        self.split, self.pre = split, pre
        first = split.read(0)
        self.small = max(first.shape[:2]) <= SMALL_IMAGE_SIDE
        self.side = min(first.shape[:2]) if self.small else pre.resize
        self.workers = 0 if self.small else loader_workers()  # decoding a CIFAR image costs microseconds

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.split.read(int(i))
        h, w = image.shape[:2]
        if self.small and min(h, w) == self.side:
            top, left = (h - self.side) // 2, (w - self.side) // 2
            return torch.from_numpy(np.ascontiguousarray(image[top:top + self.side, left:left + self.side]))
        frame = replace(self.pre, size=self.side, resize=self.side) if self.small else replace(self.pre, size=self.pre.resize)
        square = resize_center_crop(torch.from_numpy(image).permute(2, 0, 1)[None].float(), frame)[0]
        return square.round().clamp(0, 255).byte().permute(1, 2, 0)

    def batches(self, order, batch_size: int, device: torch.device):
        """uint8 batches [B, 3, side, side] on `device` of the rows in `order`, in that order."""
        loader = torch.utils.data.DataLoader(self, batch_size=batch_size, sampler=list(map(int, order)),
                                             num_workers=self.workers, pin_memory=device.type == "cuda")
        for batch in loader:
            yield batch.to(device, non_blocking=True).permute(0, 3, 1, 2)


@dataclass
class _Subset:
    classes: list[str]
    train: Squares
    labels: np.ndarray
    test: Squares
    test_labels: np.ndarray
    test_split: str  # how the test split was made
    test_source: str  # the split the test images are rows of: "test", or "train" when held out of it
    test_rows: np.ndarray  # their rows there (as probe fit's plan has them)


def _load(source: ImageDataset, pre, classes, train_per_class, seed, test_fraction=None) -> _Subset:
    """The data set's selected images (read a batch at a time) with the same class, subset and held-out test
    selection as `probe fit`."""
    keep = class_indices(source.classes, classes)
    remap = np.full(len(source.classes), -1)
    remap[keep] = np.arange(len(keep))
    train, dataset = source.splits["train"], source.name
    if "test" in source.splits:
        if test_fraction is not None:
            raise ProbeError(f"data set {dataset} has a test split; --test-fraction is for data sets without one")
        test, test_split, source_rows, test_source = source.splits["test"], source.protocol, None, "test"
    else:  # the same held-out rows as probe fit with the same seed and fraction
        fraction = TEST_FRACTION if test_fraction is None else test_fraction
        if not 0 < fraction < 1:
            raise ProbeError(f"--test-fraction must be between 0 and 1, not {fraction}")
        train_rows, test_rows = holdout_rows(train.labels, keep, fraction, source.classes)
        train, test = train.subset(train_rows), train.subset(test_rows)
        test_split, source_rows, test_source = holdout_description(fraction, len(test_rows)), test_rows, "train"
    rows = balanced_rows(train.labels, keep, train_per_class, seed, source.classes, dataset)
    test_rows = np.flatnonzero(np.isin(test.labels, keep))
    if not len(test_rows):
        raise ProbeError(f"data set {dataset} has no test images of the selected classes; choose others with --classes")
    return _Subset([source.classes[c] for c in keep], Squares(train.subset(rows), pre), remap[train.labels[rows]],
                   Squares(test.subset(test_rows), pre), remap[test.labels[test_rows]], test_split, test_source,
                   test_rows if source_rows is None else source_rows[test_rows])


# Bumped when fine-tuning changes its numbers for the same options, so no earlier checkpoint is resumed.
REVISION = 2


@dataclass
class Prepared:
    """A fine-tune worked out before it trains: its identity, run folder and resolved settings."""
    identity: dict
    config: dict  # the options as given (metrics.json's hyperparameters)
    out: Path
    spec: object  # the ModelSpec
    pre: Preprocess
    device: torch.device
    lp_epochs: int
    source: ImageDataset


def prepare(*, strategy: str = "partial", model: str = "resnet18", dataset: str = "cifar10",
            weights: str = "default", resolution: int | None = None, data_dir: str = "data",
            classes: list[str] | str | None = None, train_per_class: int | None = None, seed: int = 0,
            epochs: int = 10, lp_epochs: int | None = None, batch_size: int = 64, optimizer: str = "adamw",
            lr: float = 1e-4, head_lr: float = 1e-3, weight_decay: float = 1e-4, schedule: str = "cosine",
            augmentation: str = "rrc", unfreeze: tuple[str, ...] = (), init_head: str | None = None,
            device: str = "auto", out: str | None = None, runs_dir: str = "runs",
            test_fraction: float | None = None, bn: str = "frozen", curve_test: int | None = None,
            data_options: dict | None = None, resume: bool = False) -> Prepared:
    """Check the options, load the data set's description and compute the fine-tune's identity (probe.identity):
    the data's fingerprint and protocol, the model with its weights and preprocessing, every training option,
    the augmentation's recipe, the arithmetic (float16 autocast on CUDA) and the identity of an --init-head.
    resume is not part of it: a resumed run is the same run."""
    for value, allowed, what in ((strategy, STRATEGIES, "strategy"), (optimizer, OPTIMIZERS, "optimizer"),
                                 (schedule, SCHEDULES, "schedule"), (augmentation, AUGMENTATIONS, "augmentation"),
                                 (bn, BN_MODES, "--bn")):
        if value not in allowed:
            raise ProbeError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}")
    if seed < 0 or (curve_test is not None and curve_test < 1):
        raise ProbeError(f"--seed must be 0 or more and curve_test positive, not {seed} and {curve_test}")
    if epochs < 1 or batch_size < 1:
        raise ProbeError(f"epochs and batch size must be positive, not {epochs} and {batch_size}")
    for value, what in ((lr, "--lr"), (head_lr, "--head-lr")):
        if not (np.isfinite(value) and value > 0):
            raise ProbeError(f"{what} must be a positive finite number, not {value}")
    if not (np.isfinite(weight_decay) and weight_decay >= 0):
        raise ProbeError(f"--weight-decay must be 0 or more, not {weight_decay}")
    if unfreeze and strategy != "partial":
        raise ProbeError(f"--unfreeze adds layers to --strategy partial; {strategy} trains "
                         f"{'every layer' if strategy == 'full' else 'the head alone'}")
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    spec = resolve(model)
    pre = spec.preprocess.at(resolution)
    dev = resolve_device(device)
    if lp_epochs is None:  # a head from probe fit is already a converged linear probe: fine-tune from it
        lp_epochs = 0 if init_head else epochs // 2
    lp_epochs = lp_epochs if strategy == "lp-ft" else 0
    if not 0 <= lp_epochs <= epochs:
        raise ProbeError(f"--lp-epochs must be between 0 and --epochs ({epochs}), not {lp_epochs}")
    source = load_dataset(dataset, data_dir=data_dir, download=True, options=data_options)
    if source.captions is not None:
        raise ProbeError(f"{dataset} is a caption set (each image its own class): it is for probe retrieval, not for "
                         "fine-tuning")
    if source.masks is not None:
        raise ProbeError(f"{dataset} is a segmentation set: probe finetune trains classifiers; probe it with "
                         "probe extract --tokens and probe fit --head seg-linear")
    kept = [source.classes[c] for c in class_indices(source.classes, classes)]
    unfreeze = tuple(unfreeze or ())
    config = {"strategy": strategy, "model": model, "dataset": dataset, "weights": weights, "resolution": pre.size,
              "classes": kept, "train_per_class": train_per_class, "seed": seed, "epochs": epochs,
              "lp_epochs": lp_epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr, "head_lr": head_lr,
              "weight_decay": weight_decay, "schedule": schedule, "augmentation": augmentation,
              "unfreeze": list(unfreeze), "init_head": init_head, "test_fraction": test_fraction, "bn": bn,
              "curve_test": curve_test, **({"data_options": data_options} if data_options else {})}
    if init_head is not None and not Path(init_head).exists():
        raise ProbeError(f"no head {init_head}; give the run folder (or its head.json) that probe fit wrote")
    head_file = init_head
    if init_head and Path(init_head).is_dir():  # head.json holds the SHA-256 of head.npz: it identifies both
        head_file = next((Path(init_head) / f for f in ("head.json", "head.joblib") if (Path(init_head) / f).exists()),
                         Path(init_head) / "head.json")
    spec_fields = {
        "artifact": "finetune", "revision": REVISION,
        "data": {"dataset": source.name, "fingerprint": source.fingerprint, "protocol": source.protocol},
        "model": spec.name, "family": spec.family, "weights": spec.weights_identity(weights),
        "preprocessing": pre.as_dict(), "precision": "fp16-amp" if dev.type == "cuda" else "fp32",
        **{k: v for k, v in config.items() if k not in ("model", "dataset", "weights", "init_head", "classes",
                                                         "augmentation", "test_fraction", "data_options")},
        "classes": kept if classes else None, "augmentation": recipe(augmentation),
        "test_fraction": None if "test" in source.splits else (test_fraction or TEST_FRACTION),
        # The head's content, wherever it lies: another head in the same place is another start.
        "init_head": f"file-{hash_file(Path(head_file))}" if head_file else None,
    }
    ident = identity.normalized(spec_fields)
    safe = lambda text: re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")  # noqa: E731 (a name, not a path)
    readable = f"finetune__{safe(dataset)[-60:]}__{safe(model)}__{strategy}"
    out_dir = Path(out) if out else Path(runs_dir) / folder_name(readable, ident)
    return Prepared(ident, config, out_dir, spec, pre, dev, lp_epochs, source)


def identity_of(**options) -> dict:
    """The identity a `probe finetune` with these options would record (nothing is trained)."""
    return prepare(**options).identity


def finetune(*, progress: bool = True, **options) -> FitResult:
    """Fine-tune `model` on `dataset` with `strategy`; metrics, history and checkpoints go to `out`.

    Options are prepare()'s. lp-ft: `lp_epochs` train the classifier alone (at head_lr), then every
    layer trains at lr. With `init_head` (a logreg or linear head of `probe fit`, Kumar et al.'s LP to
    convergence) the classifier starts from it and lp_epochs defaults to 0; without, to half of `epochs`.
    A checkpoint is written after each epoch; resume=True continues from the checkpoint of the same
    identity. bn: "frozen" keeps every BatchNorm layer's pretrained statistics and affine parameters,
    "train" trains them with the rest. curve_test: evaluate each epoch on a fixed seeded subset of this
    many test images (the curve), and only the final model on all of them.
    """
    t_start = time.perf_counter()
    prep = prepare(**options)
    config, out_dir, spec, pre, dev, lp_epochs = prep.config, prep.out, prep.spec, prep.pre, prep.device, prep.lp_epochs
    (strategy, model, weights, classes, train_per_class, seed, epochs, batch_size, optimizer, lr, head_lr,
     weight_decay, schedule, augmentation, init_head, test_fraction, bn, curve_test) = (
        config[k] for k in ("strategy", "model", "weights", "classes", "train_per_class", "seed", "epochs",
                            "batch_size", "optimizer", "lr", "head_lr", "weight_decay", "schedule", "augmentation",
                            "init_head", "test_fraction", "bn", "curve_test"))
    unfreeze, resume = tuple(config["unfreeze"]), bool(options.get("resume"))
    data = _load(prep.source, pre, classes, train_per_class, seed, test_fraction)

    torch.manual_seed(seed)
    net = Classifier(model, weights, pre, len(data.classes))
    last_stage = spec.last_stage or getattr(net.backbone, "last_stage", None) or partial_prefixes(net.backbone)
    names = [name for name, _ in net.backbone.named_parameters()]
    unmatched = [pre for pre in unfreeze if not any(name.startswith(pre) for name in names)]
    if unmatched:
        raise ProbeError(f"--unfreeze {','.join(unmatched)}: no parameter of {model} starts so (its blocks: "
                         f"probe layers --model {model})")
    if init_head:
        net.l2_features = _init_from_head(net.fc, init_head, data.classes)
    net = net.to(dev).to(memory_format=torch.channels_last)
    amp = dev.type == "cuda"
    y = torch.from_numpy(data.labels).to(dev)

    def batches(epoch):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)  # a pure function of the epoch: resumable
        order = torch.randperm(len(y), generator=g)
        for i, images in zip(range(0, len(order), batch_size), data.train.batches(order, batch_size, dev)):
            yield augment(images.float(), pre, augmentation, g), y[order[i:i + batch_size].to(dev)]

    # The per-epoch curve on a fixed seeded subset of the test images when curve_test is given (cheaper);
    # the final test accuracy always on all of them.
    curve_rows = None
    if curve_test is not None and curve_test < len(data.test_labels):
        curve_rows = np.sort(np.random.default_rng(seed).choice(len(data.test_labels), curve_test, replace=False))

    final = {}  # the probabilities of the last evaluation of every test image, for the run's statistics

    def evaluate(rows=None):
        rows = np.arange(len(data.test_labels)) if rows is None else rows
        probabilities = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            for images in data.test.batches(rows, 256, dev):
                probabilities.append(torch.softmax(net(resize_center_crop(images.float(), pre)).float(), 1).cpu().numpy())
        probabilities = np.concatenate(probabilities)
        if len(rows) == len(data.test_labels):
            final["probabilities"] = probabilities
        return float((probabilities.argmax(1) == data.test_labels[rows]).mean())

    checkpoint = out_dir / "checkpoint.pt"
    state = _load_checkpoint(checkpoint, prep.identity) if resume else None
    if resume and state is None:
        log.info(f"no checkpoint in {out_dir}: starting from the first epoch")
    history = state["history"] if state else []
    stages = [("lp", "linear", lp_epochs), ("ft", "full", epochs)] if strategy == "lp-ft" else [("", strategy, epochs)]
    for stage, stage_strategy, stage_end in stages:
        stage_start = 0 if stage != "ft" else lp_epochs
        if len(history) >= stage_end:
            continue  # finished before a resume
        set_trainable(net, stage_strategy, last_stage, unfreeze, bn)
        opt, sched = _optimizer(net, optimizer, schedule, lr, head_lr, weight_decay, stage_end - stage_start, stage)
        if state and state["stage"] == stage:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        elif state:  # resumed into a later stage than the checkpoint's: take the weights only
            net.load_state_dict(state["model"])

        def on_epoch_end(epoch, row, stage=stage, opt=opt, sched=sched):
            row["stage"] = stage or strategy
            row["epoch"] = len(history) + 1  # numbered across both stages of lp-ft
            history.append(row)
            _save_checkpoint(checkpoint, {"identity": prep.identity, "stage": stage, "history": history,
                                          "model": net.state_dict(), "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict()})

        train_epochs(net, lambda e, s=stage_start: batches(e + s), optimizer=opt, scheduler=sched, epochs=stage_end - stage_start,
                     start_epoch=len(history) - stage_start, train_mode=lambda: train_mode(net),
                     evaluate=lambda: evaluate(curve_rows),
                     seed=seed * 1000 + stage_start,
                     on_epoch_end=on_epoch_end, amp=amp, progress=progress, desc=f"finetune {stage or strategy}")
        state = None
    if state:  # every epoch was done before this resume: the model is the checkpoint's, not a new one
        net.load_state_dict(state["model"])

    set_trainable(net, "full" if strategy == "lp-ft" else strategy, last_stage, unfreeze, bn)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if "probabilities" not in final or curve_rows is not None:  # no pass of the final model over every test image yet
        net.eval()
        evaluate()
    probabilities, yt = final["probabilities"], data.test_labels
    ranked = rank_classes(probabilities)  # as probe fit ranks, ties to the lower index
    correct, top5 = ranked[:, 0] == yt, (ranked[:, :5] == yt[:, None]).any(1)
    tested = test_set_identity(dataset=prep.source.name, fingerprint=prep.source.fingerprint,
                               protocol=prep.source.protocol, source=data.test_source, split=data.test_split,
                               classes=data.classes, rows=data.test_rows, labels=yt)
    wall = time.perf_counter() - t_start
    metrics = {
        "kind": "finetune", "method": f"finetune-{strategy}", "model": model, "weights": weights, "resolution": pre.size,
        "dataset": config["dataset"], "classes": data.classes, "n_train": int(len(data.labels)), "n_test": int(len(data.test_labels)),
        "test_split": data.test_split,
        "test_accuracy": float(correct.mean()),
        # As probe fit: 95% bootstrap intervals over the test images, calibration, the test images' identity.
        "intervals": stats.intervals(yt, correct, top5 if len(data.classes) > 5 else None), "interval_method": stats.METHOD,
        "calibration": stats.calibration(probabilities, yt), "test_set": tested, "test_set_hash": identity.digest(tested),
        "curve_test_images": len(data.test_labels) if curve_rows is None else len(curve_rows),
        "trainable_parameters": trainable,
        "total_parameters": sum(p.numel() for p in net.parameters()), "hyperparameters": config,
        "train_per_class": train_per_class, "seed": seed, "history": history, "lp_epochs": lp_epochs,
        "wall_seconds": wall, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
        "identity": prep.identity, "identity_hash": identity.digest(prep.identity),
    }
    save_run(out_dir, None, metrics, predictions={"rows": data.test_rows, "true": yt, "probabilities": probabilities,
                                                  "source": data.test_source, "classes": data.classes})
    return FitResult(out_dir, metrics)


def _optimizer(net, optimizer, schedule, lr, head_lr, weight_decay, epochs, stage):
    backbone = [p for p in net.backbone.parameters() if p.requires_grad]
    # lp-ft's fine-tuning stage trains everything, its probed head included, at the backbone's rate
    # (Kumar et al.: one small learning rate for the whole model after the linear probe).
    groups = [{"params": list(net.fc.parameters()), "lr": lr if stage == "ft" else head_lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr})
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.1)
    return opt, sched


def _init_from_head(fc: nn.Linear, path: str, classes: list[str]) -> bool:
    """Start the classifier from a logreg or linear head of `probe fit`, folding its scaler (if any) into the
    layer. Returns whether the head was fitted on L2-normalized features, which the classifier then applies
    before the layer (a row's length is not linear: it cannot be folded in)."""
    from sklearn.preprocessing import Normalizer

    artifact = load_head(path)
    if artifact["classes"] != classes:
        raise ProbeError(f"head {path} was fitted on classes {artifact['classes']}, not {classes}")
    pipeline = artifact["pipeline"]
    if not hasattr(pipeline, "steps") or not (hasattr(pipeline[-1], "coef_") or hasattr(pipeline[-1], "module_")):
        raise ProbeError(f"head {path} is not a logreg or linear head; lp-ft can start only from those")
    head, before = pipeline[-1], [step for _, step in pipeline.steps[:-1]]
    l2 = bool(before) and isinstance(before[0], Normalizer)
    scaler = before[-1] if before and hasattr(before[-1], "scale_") else None  # --normalize none or l2: none
    if hasattr(head, "coef_"):
        W, b = head.coef_, head.intercept_
    elif isinstance(head.module_, nn.Linear):
        W, b = head.module_.weight.detach().numpy(), head.module_.bias.detach().numpy()
    else:
        raise ProbeError(f"head {path} is an MLP; lp-ft can start only from a logreg or linear head")
    if W.shape != tuple(fc.weight.shape):
        raise ProbeError(f"head {path} has {W.shape[1]}-wide input, the backbone gives {fc.weight.shape[1]}")
    W, b = fold_scaler(W, b, scaler)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(W))
        fc.bias.copy_(torch.from_numpy(b))
    return l2


def _save_checkpoint(path: Path, state: dict) -> None:
    make_dir(path.parent)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        atomic_write(path, buffer.getbuffer())
    except ProbeError as e:  # the epochs before are in the last checkpoint: say how to keep them
        raise ProbeError(f"{e}; add --resume to continue from the last checkpoint") from None


def _load_checkpoint(path: Path, wanted: dict) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a cut-short file raises various errors
        raise ProbeError(f"checkpoint {path} is damaged ({type(e).__name__}); delete it to start over") from None
    if not identity.same(state.get("identity"), wanted):
        fields = identity.differences([state.get("identity") or {}, wanted])
        raise ProbeError(f"checkpoint {path} is of another configuration (it differs in {', '.join(fields[:6])}); use "
                         "another --out or delete it")
    return state
