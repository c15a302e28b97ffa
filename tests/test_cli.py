"""Every command and flag README documents, through the real CLI (errors are in the other files)."""

import json

from conftest import assert_one_line_error, copy_sample
from probe.backbones import describe_models


def test_models_lists_every_backbone(run_cli):
    result = run_cli("models")
    assert result.exit_code == 0
    for row in describe_models():
        assert any(line.startswith(row["model"]) and f" {row['features']} " in line for line in result.output.splitlines())


def test_demo_options(run_cli, tmp_path):
    result = run_cli("demo", "--resolution", "32", "--cache-dir", tmp_path / "c", "--runs-dir", tmp_path / "r",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "predict  test/cat/0000.jpg" in result.output
    assert list((tmp_path / "c").glob("*.h5")) and list((tmp_path / "r").glob("*/head.json"))


def test_extract_workers_and_fit_options(run_cli, tmp_path, mixed_folder):
    assert run_cli("extract", "--dataset", f"folder:{mixed_folder}", "--model", "resnet18", "--weights", "none",
                   "--resolution", "32", "--workers", "0", "--batch-size", "3").exit_code == 0
    data = copy_sample(tmp_path / "d", per_class=20, test_per_class=5)
    cache = ["--dataset", f"folder:{data}", "--model", "resnet18", "--weights", "none", "--resolution", "32"]
    assert run_cli("extract", *cache).exit_code == 0

    m = json.loads(run_cli("fit", *cache, "--C", "0.1", "--seed", "3", "--classes", "cat,dog", "--train-per-class",
                           "10", "--json", "--out", tmp_path / "a").stdout)
    assert m["hyperparameters"]["C_chosen"] == 0.1 and m["hyperparameters"]["C_from"] == "--C"
    assert m["n_train"] == 20 and m["classes"] == ["cat", "dog"] and m["seed"] == 3
    m = json.loads(run_cli("fit", *cache, "--head", "linear", "--epochs", "2", "--json", "--out", tmp_path / "b").stdout)
    assert m["hyperparameters"]["epochs"] == 2
    m = json.loads(run_cli("fit", *cache, "--head", "knn", "--k", "5", "--json", "--out", tmp_path / "c").stdout)
    assert m["hyperparameters"]["k"] == 5
    assert_one_line_error(run_cli("fit", *cache, "--C", "-1", "--out", tmp_path / "bad"), "--C must be a positive")
    assert not (tmp_path / "bad").exists()
    image = next((data / "test").rglob("*.jpg"))
    assert_one_line_error(run_cli("predict", "--head", tmp_path / "a", image, "--top-k", "0"), "--top-k")


def test_finetune_options(run_cli, tmp_path):
    data = copy_sample(tmp_path / "d", per_class=3, test_per_class=1, classes=["cat", "dog"])
    base = ["--dataset", f"folder:{data}", "--model", "resnet18", "--weights", "none", "--resolution", "32",
            "--device", "cpu", "--json"]
    result = run_cli("finetune", *base, "--strategy", "partial", "--unfreeze", "layer3", "--optimizer", "sgd",
                     "--schedule", "step", "--augmentation", "crop", "--lr", "0.001", "--head-lr", "0.01",
                     "--weight-decay", "0", "--batch-size", "2", "--seed", "1", "--epochs", "1",
                     "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    hp = m["hyperparameters"]
    assert (hp["optimizer"], hp["schedule"], hp["augmentation"], hp["unfreeze"]) == ("sgd", "step", "crop", ["layer3"])
    assert (hp["lr"], hp["head_lr"], hp["weight_decay"], hp["batch_size"], hp["seed"]) == (0.001, 0.01, 0, 2, 1)
    import torchvision
    r18 = torchvision.models.resnet18()
    # layer3 and layer4 train, except their BatchNorm layers (--bn frozen, the default), and the new fc
    trained = [p for name, p in [*r18.layer3.named_parameters(), *r18.layer4.named_parameters()]
               if ".bn" not in name and ".downsample.1." not in name]
    assert m["trainable_parameters"] == sum(p.numel() for p in trained) + 512 * 2 + 2

    assert run_cli("extract", *base[:-3]).exit_code == 0
    assert run_cli("fit", *base[:-3], "--head", "linear", "--out", tmp_path / "h").exit_code == 0
    result = run_cli("finetune", *base, "--strategy", "lp-ft", "--epochs", "3", "--lp-epochs", "1",
                     "--init-head", tmp_path / "h", "--out", tmp_path / "l")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert [h["stage"] for h in m["history"]] == ["lp", "ft", "ft"] and m["hyperparameters"]["init_head"]


def test_help_loads_no_torch_and_a_cpu_logreg_fit_neither(sample_cache, tmp_path):
    """What keeps the command line fast (issue 22): --help imports neither torch nor scikit-learn, and a
    logreg fit on the CPU runs without torch (numpy and scipy's L-BFGS-B)."""
    import subprocess
    import sys

    code = """
import sys
from probe.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert e.code == 0, e.code
print(sorted(m for m in ("torch", "sklearn", "timm", "torchvision") if m in sys.modules))
"""
    for args in (["--help"], ["fit", "--help"], ["extract", "--help"], ["finetune", "--help"]):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", (args, done.stdout, done.stderr)
    done = subprocess.run([sys.executable, "-c", code, "-q", "fit", "--features", str(sample_cache), "--head", "logreg",
                           "--device", "cpu", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['sklearn']" and (tmp_path / "run" / "metrics.json").exists()


def test_every_command_line_in_the_docs_parses():
    """The command examples of README.md and docs/*.md name commands and options that exist (click parses
    each one as the shell would split it; nothing runs)."""
    import re
    import shlex
    from pathlib import Path

    import click

    from probe.cli import main

    root = Path(__file__).resolve().parent.parent
    lines = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash)?\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():  # continued lines joined
                line = line.split("  #")[0].strip()
                if line.startswith("probe ") or " -m probe " in line:
                    lines.append((page.name, line))
    assert len(lines) >= 10
    for page, line in lines:
        words = shlex.split(line.split(" -m probe ", 1)[-1] if " -m probe " in line else line[len("probe "):])
        group, words = main, [w for w in words if w not in ("-q", "--quiet", "...")]  # "...": "and the rest"
        while isinstance(group, click.Group) and words and words[0] in group.commands:
            group, words = group.commands[words[0]], words[1:]
        assert not isinstance(group, click.Group), (page, line)
        try:
            group.make_context(group.name, list(words), resilient_parsing=False)
        except click.exceptions.Exit:
            pass
        except click.UsageError as e:
            raise AssertionError(f"{page}: {line}: {e}") from None
