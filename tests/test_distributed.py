"""Extraction under torchrun (issue 14): real torchrun, two CPU ranks on gloo, the bundled sample through
a random-init ResNet-18. The file equals a single process's bit for bit; a rank killed mid-run is
restarted by torchrun and resumes; a job resumed with another world size redoes nothing; an error on
one rank ends the job with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import copy_sample
from probe.extract import extract

MODEL = ["--model", "resnet18", "--weights", "none", "--resolution", "32"]


def torchrun(*args, ranks: int = 2, restarts: int = 0, cwd: Path, wait: bool = True):
    """`torchrun --standalone --nproc-per-node N -m probe -q ...`, as a user runs it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               f"--max-restarts={restarts}", "-m", "probe", "-q", *map(str, args)]
    env = {**os.environ, "PROBE_SHARD_SECONDS": "0", "OMP_NUM_THREADS": "1"}  # a shard per batch: kills land mid-run
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def same_features(a: Path, b: Path) -> None:
    with h5py.File(a) as fa, h5py.File(b) as fb:
        names = [n for n in ("train/features", "test/features", "train/views", "train/labels", "test/labels") if n in fa]
        for name in names:
            np.testing.assert_array_equal(fa[name][...], fb[name][...], err_msg=name)  # bit for bit
        assert {k: v for k, v in fa.attrs.items() if k != "created"} == {k: v for k, v in fb.attrs.items() if k != "created"}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The single-process file the distributed runs must equal (with an augmented view: 3 passes)."""
    cache = tmp_path_factory.mktemp("single")
    return extract(model="resnet18", weights="none", resolution=32, dataset="sample", views=1, cache_dir=str(cache),
                   progress=False).path


def worker_pids(proc: subprocess.Popen) -> list[int]:
    listing = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "probe" in line]


def wait_for_shards(cache: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while len(list(cache.glob("*.parts/*.npy"))) < n and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before the kill"


def test_two_ranks_write_the_single_process_file_bit_for_bit_even_after_a_rank_is_killed(tmp_path, single):
    """Two ranks, one of them SIGKILLed mid-run: torchrun restarts the group, which resumes and writes the
    single process's file bit for bit (a clean run is the same job without the kill)."""
    proc = torchrun("extract", "--dataset", "sample", *MODEL, "--views", "1", "--cache-dir", "c", restarts=1,
                    cwd=tmp_path, wait=False)
    wait_for_shards(tmp_path / "c", 3, proc)
    os.kill(worker_pids(proc)[-1], signal.SIGKILL)  # rank 1, mid-run
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output  # torchrun restarted the group, which finished the job
    resumed = int(output.split("wrote ")[1].split(": ")[1].split()[0])
    assert resumed < 1000 + 500 + 1000  # the restarted ranks did only what was left
    assert output.count("wrote ") == 1  # rank 0 speaks for the job
    [written] = (tmp_path / "c").glob("*.h5")
    assert written.name == single.name  # the same key
    same_features(written, single)
    assert not list((tmp_path / "c").glob("*.parts"))


def test_a_job_resumed_with_another_world_size_redoes_nothing(tmp_path, single):
    proc = torchrun("extract", "--dataset", "sample", *MODEL, "--views", "1", "--cache-dir", "c", cwd=tmp_path, wait=False)
    wait_for_shards(tmp_path / "c", 4, proc)
    proc.send_signal(signal.SIGTERM)  # the whole job stops (as a scheduler's preemption)
    proc.communicate(timeout=120)
    shards = {p.name for p in (tmp_path / "c").glob("*.parts/*.npy")}
    assert len(shards) >= 4 and {s.split("-")[1] for s in shards} != {"000000000"}  # both ranks had written
    # Resumed by one process: it fills the gaps between the two ranks' shards and no more.
    result = extract(model="resnet18", weights="none", resolution=32, dataset="sample", views=1,
                     cache_dir=str(tmp_path / "c"), progress=False)
    assert 0 < result.images < 1500 + 1000
    same_features(result.path, single)


def test_an_error_on_one_rank_ends_the_job_with_one_line(tmp_path):
    data = copy_sample(tmp_path / "d", per_class=20, test_per_class=5)
    bad = sorted((data / "train" / "truck").glob("*.jpg"))[3]  # in rank 1's half of the rows
    bad.write_bytes(b"not an image")
    done = torchrun("extract", "--dataset", f"folder:{data}", *MODEL, "--cache-dir", "c", cwd=tmp_path)
    assert done.returncode != 0
    ours = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and str(bad.name) in ours[0] and "delete or replace that file" in ours[0], ours
    assert not list((tmp_path / "c").glob("*.h5"))  # nothing published
