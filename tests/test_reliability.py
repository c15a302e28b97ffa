"""Faults injected for real: concurrent runs, kills, damaged files; and the probe cache commands."""

import os
import signal
import subprocess
import sys
import time

import h5py
import pytest

from conftest import assert_one_line_error, copy_sample
from probe.cache import open_cache
from probe.errors import ProbeError


def _probe(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "probe.cli", *map(str, args)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_extractions_of_the_same_key_take_turns(tmp_path):
    data = copy_sample(tmp_path / "d", per_class=4, test_per_class=2)
    args = ["extract", "--model", "resnet18", "--weights", "none", "--resolution", "32", "--dataset",
            f"folder:{data}", "--batch-size", "4", "--cache-dir", tmp_path / "cache"]
    procs = [_probe(*args, env={"PROBE_SHARD_SECONDS": "0"}) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    said = sorted("cache hit" if "cache hit" in out else "wrote" if "wrote" in out else out for out, _ in outputs)
    assert said == ["cache hit", "wrote"]
    [path] = (tmp_path / "cache").glob("*.h5")
    X, _ = open_cache(path).load("train")
    assert X.shape == (40, 512)
    assert not list((tmp_path / "cache").glob("*.parts"))


def test_cache_ls_verify_rm(run_cli, tmp_path, sample_cache):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    good = cache_dir / sample_cache.name
    good.write_bytes(sample_cache.read_bytes())
    bad = cache_dir / "sample__x__default__r64__float32__0000000000.h5"
    bad.write_bytes(sample_cache.read_bytes()[:5000])
    (cache_dir / "other.h5.parts").mkdir()  # a shard folder of probe's (its key), and one of someone else's
    (cache_dir / "other.h5.parts" / "key.json").write_text("{}")
    (cache_dir / "theirs.h5.parts").mkdir()

    listing = run_cli("cache", "ls", "--cache-dir", cache_dir)
    assert listing.exit_code == 0, listing.output
    lines = listing.output.strip().splitlines()
    assert any(line.startswith("complete") and "train=1000 test=500" in line and "1280" in line for line in lines)
    assert any(line.startswith("corrupt") and bad.name in line for line in lines)
    assert any(line.startswith("incomplete") and "other.h5.parts" in line for line in lines)
    assert any(line.startswith("not probe's") and "theirs.h5.parts" in line for line in lines)

    assert run_cli("cache", "verify", good).exit_code == 0
    result = run_cli("cache", "verify", "--cache-dir", cache_dir)
    assert result.exit_code == 2 and bad.name in result.stderr and "1 problem" in result.output

    renamed = cache_dir / "renamed.h5"
    renamed.write_bytes(sample_cache.read_bytes())
    with h5py.File(renamed, "a") as f:
        f["train/features"][0, 0] = float("nan")
    result = run_cli("cache", "verify", renamed)
    assert result.exit_code == 2 and "NaN" in result.stderr and "file name" in result.stderr

    assert run_cli("cache", "rm", bad).exit_code == 0 and not bad.exists()
    assert good.exists()  # nothing else touched
    assert_one_line_error(run_cli("cache", "rm", bad), "no cache file")
    assert_one_line_error(run_cli("cache", "rm", tmp_path / "notes.txt"), "not a cache file")


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path):
    from probe.files import atomic_write

    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fails(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(ProbeError, match="cannot write .*metrics.json: disk full"):
        atomic_write(target, fails)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # the temporary file is gone too


def test_a_write_killed_midway_leaves_the_old_file(tmp_path):
    target = tmp_path / "head.npz"
    target.write_text("old")
    code = ("import sys, time; from probe.files import atomic_write; "
            "atomic_write(sys.argv[1], lambda f: (f.write(b'x' * 2**20), f.flush(), time.sleep(60)))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)])
    deadline = time.time() + 60
    while not any(p.name.endswith(".tmp") and p.stat().st_size for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_text() == "old"
