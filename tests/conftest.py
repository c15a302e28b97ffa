"""Fixtures: small real data (the bundled sample, generated folders, a CIFAR-10 copy in torchvision's
on-disk format) and real caches made by the real extractor. Nothing here is mocked."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from probe.cli import main
from probe.datasets import SAMPLE_DIR
from probe.extract import extract

@pytest.fixture(scope="session", autouse=True)
def memo_dir(tmp_path_factory) -> Path:
    """The tests' own memo of file fingerprints and shard indexes (probe/memo.py), not the user's."""
    folder = tmp_path_factory.mktemp("memo")
    os.environ["PROBE_MEMO_DIR"] = str(folder)  # the processes the tests start inherit it
    return folder


# The sample through the offline pretrained lite0 at a small resolution: real features, a few seconds.
SAMPLE_RES = 64


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("cache")
    return extract(model="efficientnet_lite0", dataset="sample", resolution=SAMPLE_RES, cache_dir=str(cache_dir),
                   progress=False).path


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """Run the real `probe` command in a fresh working folder; returns click's Result."""
    monkeypatch.chdir(tmp_path)

    def run(*args):
        return CliRunner().invoke(main, ["-q", *map(str, args)])
    return run


def assert_one_line_error(result, *words):
    """Exit code 2, one line on stderr starting with 'error:', no traceback, and it names `words`."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], (w, lines[0])


def write_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(array, "RGBA").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """An image folder with mixed sizes (small and large) and modes (RGB, L, RGBA, P), JPEG and PNG."""
    root = tmp_path / "mixed"
    specs = [((40, 30), "RGB", "jpg"), ((100, 80), "L", "png"), ((32, 32), "RGBA", "png"), ((70, 120), "P", "png")]
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("ants", "bees")):
            for i in range(n):
                size, mode, ext = specs[(i + c) % len(specs)]
                write_image(root / split / cls / f"{i}.{ext}", size, mode, seed=hash((split, cls, i)) % 2**32)
    return root


def copy_sample(dest: Path, per_class: int, test_per_class: int | None = None, classes=None) -> Path:
    """A folder data set made of the first files of the bundled sample."""
    for split, n in (("train", per_class), ("test", test_per_class)):
        if n is None:
            continue
        for cls_dir in sorted((SAMPLE_DIR / split).iterdir()):
            if classes and cls_dir.name not in classes:
                continue
            for f in sorted(cls_dir.glob("*.jpg"))[:n]:
                target = dest / split / cls_dir.name / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read_bytes())
    return dest


@pytest.fixture
def cifar_dir(tmp_path) -> Path:
    """CIFAR-10 in torchvision's on-disk format (pickled batches), made of sample images."""
    root = tmp_path / "data"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    classes = sorted(p.name for p in (SAMPLE_DIR / "train").iterdir())
    rng = np.random.default_rng(0)

    def batch(split, per_class):
        rows, labels = [], []
        for c, cls in enumerate(classes):
            for f in sorted((SAMPLE_DIR / split / cls).glob("*.jpg"))[:per_class]:
                rows.append(np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1).reshape(-1))
                labels.append(c)
        order = rng.permutation(len(labels))
        return {"data": np.stack(rows)[order], "labels": [labels[i] for i in order]}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch("train", 2)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch("test", 2)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))
    return root


def open_clip_text_folder(folder: Path, image_size: int = 32, vision_layers: int = 1, vocab_size: int = 49408) -> Path:
    """A tiny random open_clip model in the folder layout open_clip loads with local-dir: (config + weights);
    by default with a text tower open_clip's own tokenizer can feed (its 49,408-token vocabulary)."""
    import json
    import logging

    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": image_size, "layers": vision_layers, "width": 32,
                                                             "patch_size": 16, "head_width": 16},
                            "text_cfg": {"context_length": 16, "vocab_size": vocab_size, "width": 32, "heads": 2,
                                         "layers": 1}},
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    logging.disable(logging.WARNING)  # open_clip warns that the folder has no weights yet: they are made here
    try:
        model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    finally:
        logging.disable(logging.NOTSET)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def hf_text_folder(folder: Path, kind: str) -> Path:
    """A tiny random transformers image-text model (kind "clip" or "siglip") saved as a user saves one:
    model, image processor and a word-level tokenizer over the words of the prompts (offline: no hub)."""
    import json
    import re

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast, SiglipConfig,
                              SiglipImageProcessor, SiglipModel)

    from probe.zeroshot import prompts

    words = sorted(set(re.findall(r"\w+", json.dumps(prompts()["default_templates"] + prompts()["templates"]["cifar10"]
                                                     + ["cat", "dog", "frog", "airplane", "ship", "number", "take"]
                                                     + [str(i) for i in range(20)]).lower())))
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                        unk_token="[UNK]", model_max_length=16)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    text = dict(**small, vocab_size=len(vocab), max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(vision_config=dict(**small, image_size=32, patch_size=16), text_config=text,
                                     projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = SiglipModel(SiglipConfig(vision_config=dict(**small, image_size=32, patch_size=16), text_config=text))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def kill_extract_after_shards(args: list, cache_dir: Path, shards: int) -> None:
    """Run `probe extract ARGS --cache-dir cache_dir` as its own process, writing a shard after every batch, and
    kill it (SIGKILL) once the shard folder holds `shards` files, or when it ends first."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PROBE_SHARD_SECONDS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "probe.cli", "-q", "extract", *map(str, args), "--cache-dir",
                             str(cache_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(Path(cache_dir).glob("*.parts/*.npy"))) < shards and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

