"""probe suite (issue 12): models x data sets x heads in one table, a failing pair reported while the rest
go on, nothing redone on a re-run or after a kill, earlier suites merged by probe compare --pivot."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import copy_sample
from layouts import WRITERS

# Tiny real models on real images: random-init ResNet-18 and timm's test_vit at 32 px.
MODELS = "resnet18,timm:test_vit"
COMMON = ["--weights", "none", "--resolution", "32"]


def test_a_suite_writes_one_table_and_goes_on_past_a_failing_pair(tmp_path, run_cli):
    WRITERS["dtd"](tmp_path / "data")
    result = run_cli("suite", "--models", MODELS, "--datasets", f"sample,dtd,folder:{tmp_path / 'missing'}",
                     "--head", "logreg,knn", "--data-dir", tmp_path / "data", *COMMON)
    assert result.exit_code == 1, result.output  # one pair set failed
    out = Path("runs/suite")
    summary = json.loads((out / "suite.json").read_text())
    assert len(summary["pairs"]) == 2 * 3 * 2
    failed = {(p["model"], p["dataset"]) for p in summary["pairs"] if p["status"] == "failed"}
    assert failed == {(m, f"folder:{tmp_path / 'missing'}") for m in ("resnet18", "timm:test_vit.r160_in1k")}
    assert result.stderr.count("failed: ") == 2 and "is not an image folder" in result.stderr  # once per pair
    with open(out / "suite.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["head"]) for r in rows] == [("resnet18 (none)", "logreg"), ("resnet18 (none)", "knn"),
                                                        ("timm:test_vit.r160_in1k (none)", "logreg"),
                                                        ("timm:test_vit.r160_in1k (none)", "knn")]
    for r in rows:
        assert r["folder:missing"] == "failed" and r["datasets_in_mean"] == "2"
        accuracies = [float(r["sample"]), float(r["dtd"])]
        assert abs(float(r["mean"]) - sum(accuracies) / 2) < 1e-12 and all(0 <= a <= 1 for a in accuracies)
    # Every cell is the test accuracy of a real fit's metrics.json in the suite folder.
    for p in summary["pairs"]:
        if p["status"] != "failed":
            metrics = json.loads((Path(p["run"]) / "metrics.json").read_text())
            assert metrics["test_accuracy"] == p["test_accuracy"] and metrics["method"] == p["head"]
    assert (out / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| resnet18 (none) | logreg |" in (out / "suite.md").read_text()


def test_a_rerun_with_another_head_redoes_nothing_that_finished(tmp_path, run_cli):
    args = ["suite", "--models", MODELS, "--datasets", "sample", *COMMON]
    assert run_cli(*args, "--head", "logreg").exit_code == 0
    caches = {p: p.stat().st_mtime_ns for p in Path("cache").glob("*.h5")}
    fits = {p: p.stat().st_mtime_ns for p in Path("runs/suite").rglob("head.npz")}
    assert len(caches) == 2 and len(fits) == 2
    assert run_cli(*args, "--head", "logreg,knn").exit_code == 0
    summary = json.loads(Path("runs/suite/suite.json").read_text())
    assert [p["status"] for p in summary["pairs"]] == ["reused", "done", "reused", "done"]
    assert {p: p.stat().st_mtime_ns for p in Path("cache").glob("*.h5")} == caches  # no extraction
    assert all(p.stat().st_mtime_ns == t for p, t in fits.items())  # no refit


def test_a_killed_suite_resumes_without_redoing_finished_pairs(tmp_path):
    first, second = (copy_sample(tmp_path / name, per_class=20, test_per_class=5) for name in ("d", "e"))
    command = [sys.executable, "-m", "probe.cli", "-q", "suite", "--models", "resnet18",
               "--datasets", f"folder:{first},folder:{second}", *COMMON]
    env = {**os.environ, "PROBE_SHARD_SECONDS": "0"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def first_fit():
        return next((tmp_path / "runs" / "suite").glob("folder-d__resnet18__none__*__logreg__*/metrics.json"), None)

    deadline = time.time() + 300
    while first_fit() is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way through the second pair's extraction
    proc.wait()
    first = first_fit()
    assert first is not None and not (tmp_path / "runs" / "suite" / "suite.json").exists()
    done = first.stat().st_mtime_ns
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    summary = json.loads((tmp_path / "runs" / "suite" / "suite.json").read_text())
    assert [p["status"] for p in summary["pairs"]] == ["reused", "done"]
    assert first.stat().st_mtime_ns == done


def test_two_folders_of_one_name_are_two_columns_and_two_runs(tmp_path, run_cli):
    from probe.datasets import SAMPLE_DIR

    for parent, n in (("x", 4), ("y", 6)):  # folder:.../x/data and folder:.../y/data, different images
        for split in ("train", "test"):
            for cls in ("cat", "dog"):
                (tmp_path / parent / "data" / split / cls).mkdir(parents=True)
                for f in sorted((SAMPLE_DIR / split / cls).glob("*.jpg"))[:n]:
                    shutil.copy(f, tmp_path / parent / "data" / split / cls)
    datasets = f"folder:{tmp_path / 'x' / 'data'},folder:{tmp_path / 'y' / 'data'}"
    assert run_cli("suite", "--models", "resnet18", "--datasets", datasets, *COMMON).exit_code == 0
    summary = json.loads(Path("runs/suite/suite.json").read_text())
    assert len({p["run"] for p in summary["pairs"]}) == 2
    with open("runs/suite/suite.csv") as f:
        [row] = list(csv.DictReader(f))
    assert {f"folder:{tmp_path / d / 'data'}" for d in "xy"} <= set(row) and row["datasets_in_mean"] == "2"


def test_compare_pivot_merges_earlier_suites_into_one_table(tmp_path, run_cli):
    assert run_cli("suite", "--models", "resnet18", "--datasets", "sample", "--out", "a", *COMMON).exit_code == 0
    assert run_cli("suite", "--models", "timm:test_vit", "--datasets", "sample", "--head", "knn", "--out", "b",
                   *COMMON).exit_code == 0
    merged = run_cli("compare", "--pivot", "a", "b", "--out", "merged")
    assert merged.exit_code == 0, merged.output
    assert "| resnet18 (none) | logreg |" in merged.output and "| timm:test_vit.r160_in1k (none) | knn |" in merged.output
    a = json.loads(Path("a/suite.json").read_text())["pairs"][0]["test_accuracy"]
    assert f"{a:.2%}" in merged.output
    assert sorted(p.name for p in Path("merged").iterdir()) == ["suite.csv", "suite.md", "suite.png"]
