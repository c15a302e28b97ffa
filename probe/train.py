"""The one training loop: torch heads on cached features and every fine-tuning strategy use it.

What differs between them is the model, which parameters train, the optimizer and the batches;
the loop itself only steps, measures and reports.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from probe.errors import ProbeError


def train_epochs(
    model: nn.Module,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    start_epoch: int = 0,
    train_mode: Callable[[], None] | None = None,
    evaluate: Callable[[], float] | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    amp: bool = False,
    seed: int | None = None,
    class_weight: torch.Tensor | None = None,
    progress: bool = False,
    desc: str = "train",
    diverged: str | None = None,
) -> list[dict]:
    """Train `model` with cross-entropy for epochs start_epoch..epochs-1 and return their history.

    batches(epoch) yields (inputs, labels) on the model's device. train_mode() puts the model in
    training mode (default: model.train()); a fine-tune passes one that keeps frozen parts in eval
    mode. evaluate() returns test accuracy. on_epoch_end(epoch, row) runs after each epoch, for
    checkpoints. amp: float16 autocast with a gradient scaler (CUDA). seed: torch's global random
    state is seeded with seed + epoch at the start of each epoch, so what draws from it (dropout,
    stochastic depth) is a function of the epoch alone and a resumed run repeats a straight one.
    class_weight: per-class weights of the cross-entropy (class_weight="balanced" of the heads). diverged:
    what the error of a non-finite loss advises (default: probe finetune's learning rates).
    """
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history = []
    for epoch in range(start_epoch, epochs):
        if seed is not None:
            torch.manual_seed(seed + epoch)
        (train_mode or model.train)()
        t0, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        for x, y in tqdm(batches(epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch",
                         disable=not progress, leave=False):
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                logits = model(x)
                # Summed and divided by the batch size (not by the weights' sum), as the logreg objective.
                loss = F.cross_entropy(logits, y, weight=class_weight, reduction="sum") / len(y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
        if not math.isfinite(loss_sum):
            raise ProbeError(f"training diverged: the loss is {loss_sum} in epoch {epoch + 1}; "
                             + (diverged or "lower --lr or --head-lr (finished epochs are in the last checkpoint)"))
        if scheduler is not None:
            scheduler.step()
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
               "seconds": seconds, "images_per_second": seen / seconds if seconds else 0.0,
               "lr": [g["lr"] for g in optimizer.param_groups]}
        if evaluate is not None:
            model.eval()
            row["test_accuracy"] = evaluate()
        history.append(row)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    return history
