"""`probe demo`: the whole path on the bundled sample, offline: extract, fit a logreg probe, predict."""

from __future__ import annotations

from probe.datasets import SAMPLE_DIR
from probe.extract import extract
from probe.fit import fit
from probe.predict import predict


def demo(*, model: str = "efficientnet_lite0", resolution: int | None = None, cache_dir: str = "cache",
         runs_dir: str = "runs", device: str = "auto", progress: bool = True) -> str:
    """Run extract -> fit (logreg) -> predict on the bundled sample and return a short report."""
    extracted = extract(model=model, dataset="sample", resolution=resolution, cache_dir=cache_dir,
                        device=device, progress=progress)
    fitted = fit(head="logreg", features=str(extracted.path), runs_dir=runs_dir, device=device)
    image = sorted((SAMPLE_DIR / "test" / "cat").glob("*.jpg"))[0]
    top = predict(fitted.out, [image], top_k=3, device=device)[0]["top"]
    m = fitted.metrics
    how = "reused the cache" if extracted.reused else \
        f"{extracted.images} images in {extracted.seconds:.0f} s ({extracted.images_per_second:.0f}/s)"
    return "\n".join([
        f"extract  {model} on the bundled sample: {how} -> {extracted.path}",
        f"fit      logreg (C={m['hyperparameters']['C_chosen']:.3g}, {m['hyperparameters']['C_from']}) in {m['fit_seconds']:.1f} s: "
        f"test accuracy {m['test_accuracy']:.1%} on {m['n_test']} images ({m['n_train']} train)",
        f"predict  {image.relative_to(SAMPLE_DIR)}: " + ", ".join(f"{t['class']} {t['probability']:.0%}" for t in top),
        f"saved    {fitted.out}/head.json, head.npz and metrics.json",
    ])
