"""The data-efficiency curve (issue 23): its cost against one full fit, and the evidence for logreg's C rule
where a few-shot episode is too small for a 20% validation split.

    python benchmarks/curve.py --features CACHE [--features CACHE ...]

1. Cost: `probe curve` for logreg at k = 1, 2, 4, 8, 16 and all, 5 seeds (26 fits, each a run folder with
   its predictions and intervals), against one `probe fit --head logreg` on all of the first cache's
   training images, in one run. Target: at most 3x.
2. The C rule, on validation images of the training split, never the test split: the first --pool
   images of each class are where episodes are drawn, the next --validation are scored. For k = 1, 2, 4
   and seeds 0..4: logreg at every fixed C of the grid, and probe's rule (k-fold validation on the
   episode for k >= 2; for k = 1 no validation exists, and ONE_IMAGE_C, the C the rule fixes there, is the
   best fixed C of the grid on the first cache at k = 1). Reported per feature set: the rule's mean
   validation accuracy against scikit-learn's default C = 1 and against the best fixed C in hindsight.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from probe.cache import open_cache  # noqa: E402
from probe.curve import curve  # noqa: E402
from probe.fit import fit  # noqa: E402
from probe.heads import DEFAULT_CS, DEFAULT_NORMALIZE, ONE_IMAGE_C, LogisticProbe, normalization_steps  # noqa: E402
from probe.selection import balanced_rows  # noqa: E402


def rule_evidence(path: str, pool: int, validation: int, shots: list[int], seeds: int) -> dict:
    X, y = open_cache(path).load("train")
    classes = np.unique(y)
    order = {c: np.flatnonzero(y == c) for c in classes}
    pool_rows = np.sort(np.concatenate([order[c][:pool] for c in classes]))
    val_rows = np.sort(np.concatenate([order[c][pool:pool + validation] for c in classes]))
    rows = []
    for k in shots:
        for seed in range(seeds):
            train = pool_rows[balanced_rows(y[pool_rows], list(classes), k, seed, [str(c) for c in classes], "pool")]
            Xt, Xv = X[train], X[val_rows]
            for step in normalization_steps(DEFAULT_NORMALIZE):  # as probe fit normalizes, fitted on the episode
                step.fit(Xt)
                Xt, Xv = step.transform(Xt), step.transform(Xv)
            Xt, Xv = Xt.astype(np.float32), Xv.astype(np.float32)
            fixed = {C: float(LogisticProbe(C=C, device="cpu").fit(Xt, y[train]).score(Xv, y[val_rows])) for C in DEFAULT_CS}
            rule = LogisticProbe(device="cpu").fit(Xt, y[train])
            rows.append({"k": k, "seed": seed, "fixed_C": fixed, "rule_C": rule.C_, "rule_search": rule.search_,
                         "rule": float(rule.score(Xv, y[val_rows])),
                         "sklearn_default_C1": float(LogisticProbe(C=1.0, device="cpu").fit(Xt, y[train]).score(Xv, y[val_rows]))})
    summary = []
    for k in shots:
        of_k = [r for r in rows if r["k"] == k]
        best_C = max(DEFAULT_CS, key=lambda C: np.mean([r["fixed_C"][C] for r in of_k]))
        summary.append({"k": k, "rule": float(np.mean([r["rule"] for r in of_k])),
                        "sklearn_default_C1": float(np.mean([r["sklearn_default_C1"] for r in of_k])),
                        "best_fixed_C_in_hindsight": best_C,
                        "best_fixed": float(np.mean([r["fixed_C"][best_C] for r in of_k])),
                        "rule_search": of_k[0]["rule_search"]})
        s = summary[-1]
        print(f"{Path(path).name[:40]} k={k}: rule {s['rule']:.4f} ({s['rule_search']}), C=1 {s['sklearn_default_C1']:.4f}, "
              f"best fixed C={best_C:.3g} {s['best_fixed']:.4f}")
    return {"features": path, "n_validation": int(len(val_rows)), "pool_per_class": pool, "rows": rows,
            "summary": summary}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", action="append", required=True, help="a cache file (repeat for more feature sets)")
    p.add_argument("--shots", default="1,2,4,8,16,all")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--pool", type=int, default=4000, help="images per class episodes are drawn from (evidence)")
    p.add_argument("--validation", type=int, default=1000, help="images per class scored (evidence)")
    p.add_argument("--rule-shots", default="1,2,4")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        one = fit(head="logreg", features=args.features[0], out=str(Path(tmp) / "one"), device="cpu").metrics
        one_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = curve([args.features[0]], heads=["logreg"], shots=args.shots, seeds=args.seeds,
                       runs_dir=str(Path(tmp) / "runs"), out=str(Path(tmp) / "curve"), device="cpu", progress=True)
        curve_s = time.perf_counter() - t0
    fits = sum(pt["seeds"] for pt in result["lines"][0]["points"])
    evidence = [rule_evidence(f, args.pool, args.validation, [int(k) for k in args.rule_shots.split(",")], args.seeds)
                for f in args.features]
    first = evidence[0]["summary"]
    one_image = next((s for s in first if s["k"] == 1), None)
    targets = {"curve_at_most_3x_one_full_fit": curve_s / one_s <= 3.0}
    for e in evidence:
        for s in e["summary"]:
            if s["k"] > 1:
                targets[f"{Path(e['features']).name.split('__')[1]}_r{Path(e['features']).name.split('__r')[1].split('__')[0]}"
                        f"_k{s['k']}_rule_beats_C1_on_validation"] = s["rule"] >= s["sklearn_default_C1"]
    write_result("curve", {
        "settings": {"features": args.features, "shots": args.shots, "seeds": args.seeds, "pool": args.pool,
                     "validation": args.validation, "one_image_C": ONE_IMAGE_C},
        "one_full_fit_seconds": one_s, "one_full_fit_accuracy": one["test_accuracy"], "curve_seconds": curve_s,
        "curve_fits": fits, "curve_over_one_fit": curve_s / one_s, "curve": result,
        "one_image_C_in_hindsight": one_image["best_fixed_C_in_hindsight"] if one_image else None,
        "evidence": evidence, "targets_met": targets,
    }, args.out)
    print(f"curve: {fits} fits in {curve_s:.1f} s, {curve_s / one_s:.2f}x one full fit ({one_s:.1f} s)")


if __name__ == "__main__":
    main()
