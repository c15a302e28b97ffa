"""Smoke runs of each benchmark script on a handful of images, and README's numbers against the results."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import extract_throughput  # noqa: E402
import heads  # noqa: E402
import report  # noqa: E402
import speedup  # noqa: E402
import strategies  # noqa: E402

from probe.datasets import SAMPLE_DIR  # noqa: E402

TINY = ["--model", "resnet18", "--weights", "none", "--resolution", "32"]


def test_speedup_smoke(tmp_path):
    out = tmp_path / "speedup.json"
    speedup.main(["--data", str(SAMPLE_DIR), *TINY, "--train-per-class", "3", "--test-per-class", "2",
                  "--epochs", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["settings"]["n_train"] == 30 and r["settings"]["n_test"] == 20
    assert len(r["baseline"]["history"]) == 2 and r["probe"]["extract_seconds"] > 0
    assert r["speedup"]["later_experiment_logreg"] > 0 and r["machine"]["cores"] >= 1
    assert set(r["targets_met"]) == {"first_experiment_at_least_10x", "later_experiment_at_least_500x",
                                     "logreg_within_0.5_points_or_better", "later_experiment_whole_process_at_least_100x",
                                     "fit_logreg_process_at_most_1.5x_import_torch"}
    assert r["baseline"]["process_seconds"] > r["baseline"]["seconds"] > 0 and r["probe"]["shell_seconds"]["extract"] > 0


def test_heads_smoke(tmp_path, sample_cache):
    out = tmp_path / "heads.json"
    heads.main(["--features", str(sample_cache), "--pca", "64", "--device", "cpu", "--out", str(out)])
    r = json.loads(out.read_text())
    assert [row["head"] for row in r["rows"]] == ["logreg", "linear", "mlp", "knn"]
    assert r["features"]["dim"] == 64 and len(r["fixed_C_grid"]) == 11
    assert "logreg_sweep_within_0.3_points_of_best_fixed_C" in r["targets_met"]


def test_extract_throughput_smoke(tmp_path):
    out = tmp_path / "et.json"
    extract_throughput.main(["--models", "resnet18", "--per-class", "1", "--resolution", "32", "--out", str(out)])
    [row] = json.loads(out.read_text())["rows"]
    assert row["images"] == 20 and 0 <= row["share_outside_forward"] < 1


def test_strategies_smoke(tmp_path):
    strategies.main(["--data", str(SAMPLE_DIR), *TINY, "--train-per-class", "2", "--test-per-class", "1",
                     "--epochs", "2", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "strategies.json").read_text())
    assert [row["method"] for row in r["rows"]] == ["logreg", "finetune-linear", "finetune-partial",
                                                   "finetune-full", "finetune-lp-ft"]
    assert (tmp_path / "strategies_accuracy.png").stat().st_size > 0


def test_readme_numbers_are_the_result_files():
    assert report.main(["--check"]) == 0, "run: python benchmarks/report.py"


def test_views_smoke(tmp_path):
    import views

    out = tmp_path / "views.json"
    views.main(["--data", str(SAMPLE_DIR), *TINY, "--train-per-class", "3", "--test-per-class", "2", "--views", "0,2",
                "--epochs", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert [row["views"] for row in r["rows"]] == [0, 2, None] and r["rows"][1]["backbone_passes"] == 30 * 3 + 20


def test_bn_cause_smoke(tmp_path):
    import bn_cause

    out = tmp_path / "bn.json"
    bn_cause.main(["--data", str(SAMPLE_DIR), "--model", "resnet18", "--weights", "none", "--resolution", "32", "--train-per-class", "3",
                   "--validation-fraction", "0.34", "--epochs", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert [row["bn"] for row in r["rows"]] == [None, "train", "frozen", "train", "frozen", "frozen"]
    assert r["rows"][-1]["lp_epochs"] == 0 and all(len(row["curve"]) == 2 for row in r["rows"][1:])


def test_lr_search_smoke(tmp_path):
    import lr_search

    out = tmp_path / "lr.json"
    lr_search.main(["--data", str(SAMPLE_DIR), *TINY, "--train-per-class", "2",
                    "--validation-per-class", "1", "--epochs", "1", "--full-lrs", "1e-4", "--lp-ft-lrs", "1e-4,3e-4",
                    "--out", str(out)])
    r = json.loads(out.read_text())
    assert [(row["run"], row["lr"]) for row in r["rows"]] == [("cached logreg", None), ("full", 1e-4), ("lp-ft", 1e-4),
                                                               ("lp-ft", 3e-4)]
    assert set(r["picked_lr"]) == {"full", "lp-ft"} and r["settings"]["n_validation"] == 10


def test_suite_smoke(tmp_path):
    import suite

    out = tmp_path / "suite.json"
    suite.main(["--data", str(SAMPLE_DIR), "--model", "resnet18", "--weights", "none", "--resolution", "32",
                "--out", str(out)])
    r = json.loads(out.read_text())
    assert [run["pairs"] for run in r["runs"]] == [{"done": 5, "reused": 0, "failed": 0},
                                                   {"done": 5, "reused": 5, "failed": 0},
                                                   {"done": 0, "reused": 10, "failed": 0}]
    assert r["rerun_share"] > 0 and len(r["accuracy"]) == 2


def test_scale_smoke(tmp_path):
    import scale

    out = tmp_path / "scale.json"
    scale.main(["--data", str(SAMPLE_DIR), "--rows", "3000", "--dim", "256", "--classes", "5", "--max-memory", "+4MB",
                "--subset-per-class", "100", "--skip-extraction", "--out", str(out)])  # torchrun: test_distributed
    r = json.loads(out.read_text())
    assert r["heads"]["capped"]["streamed"] and not r["heads"]["in_memory_subset"]["streamed"]
    assert r["heads"]["in_memory_subset"]["rows"] == 500 and r["heads"]["capped"]["rows"] == 3000
    assert r["assembly"]["over_a_plain_copy"] > 0 and "extraction" not in r


def test_wds_reader_smoke(tmp_path):
    import wds_reader

    out = tmp_path / "wds.json"
    wds_reader.main(["--data", str(SAMPLE_DIR), "--images", "300", "--repeats", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["settings"]["shards"] == 1 and set(r["images_per_second"]) == {"probe", "webdataset"}


def test_startup_smoke(tmp_path, sample_cache):
    import startup

    out = tmp_path / "startup.json"
    startup.main(["--repeats", "1", "--features", str(sample_cache), "--commands", "probe --help,probe fit --help",
                  "--out", str(out)])
    r = json.loads(out.read_text())
    commands = [row["command"] for row in r["rows"]]
    assert commands[:2] == ["probe --help", "probe fit --help"] and commands[-1].startswith("probe fit --head")
    assert r["python_import_torch_seconds"] > 0 and set(r["targets_met"]) == {
        "every_help_at_most_0.15x_import_torch", "fit_logreg_process_at_most_1.5x_import_torch"}


def test_precision_smoke(tmp_path):
    import precision

    out = tmp_path / "precision.json"
    precision.main(["--data", str(SAMPLE_DIR), "--models", "resnet18", "--configs", "fp32,bf16",
                    "--throughput-per-class", "2", "--accuracy-configs", "fp32,bf16", "--train-per-class", "5",
                    "--test-per-class", "2", "--resolution", "32", "--accuracy-model", "resnet18", "--accuracy-weights",
                    "none", "--matmul-size", "256", "--in-process", "--out", str(out)])
    r = json.loads(out.read_text())
    assert [row["config"] for row in r["rows"]] == ["fp32", "bf16"] and r["rows"][0]["forward_speedup_over_fp32"] == 1
    assert all(row["multiply_adds_per_image"] > 0 and row["share_of_matmul_rate"] > 0 for row in r["rows"])
    assert [a["config"] for a in r["accuracy"]] == ["fp32", "bf16"] and r["accuracy"][0]["points_from_fp32"] == 0


def test_zeroshot_smoke(tmp_path):
    import zeroshot

    out = tmp_path / "zeroshot.json"
    r = zeroshot.main(["--shots", "1", "--seeds", "1", "--out", str(out)])
    assert [line["head"] for line in r["lines"]] == ["zeroshot", "logreg", "logreg+zeroshot"]
    assert [p["shots"] for p in r["lines"][0]["points"]] == [0] and r["random_weights"]
    assert 0 <= r["retrieval"]["mAP"] <= 1 and (tmp_path / "zeroshot_curve.png").stat().st_size > 0


def test_tokens_smoke(tmp_path):
    import tokens

    out = tmp_path / "tokens.json"
    tokens.main(["--data", str(SAMPLE_DIR), "--model", "timm:test_vit", "--weights", "none", "--resolution", "64",
                 "--train-per-class", "3", "--test-per-class", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert [row["head"] for row in r["rows"]] == ["logreg", "attentive"] and r["settings"]["token_shape"] == [4, 4, 64]
    assert r["epoch_seconds"]["running_the_backbone"] > 0 and set(r["targets_met"]) == {
        "attentive_at_least_logreg", "cache_epoch_at_most_a_tenth_of_backbone_epoch"}


def test_finetune_memory_and_seg_mask_smoke(tmp_path):
    import finetune_memory
    import seg_mask

    finetune_memory.main(["--data", str(SAMPLE_DIR), *TINY, "--sizes", "1,2", "--test-per-class", "1",
                          "--out", str(tmp_path / "fm.json")])
    r = json.loads((tmp_path / "fm.json").read_text())
    assert [row["train_images"] for row in r["rows"]] == [10, 20] and r["rows"][0]["peak_rss_bytes"] > 1 << 20
    seg_mask.main(["--model", "timm:test_vit", "--weights", "none", "--train", "4", "--test", "2",
                   "--out", str(tmp_path / "seg.json")])
    assert 0 <= json.loads((tmp_path / "seg.json").read_text())["mean_iou"] <= 1 and (tmp_path / "seg_mask.png").exists()
