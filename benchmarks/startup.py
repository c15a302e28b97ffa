"""Seconds as a user counts them (issue 22): `probe --help`, every `probe COMMAND --help`, and `probe fit
--head logreg` on the demo's cache, each a fresh process from the shell, against `python -c "import
torch"`, alternating in one run (best of --repeats each).

    python benchmarks/startup.py

Targets: every --help at most 0.15x `import torch`; the whole `probe fit --head logreg` process on the
demo's cache at most 1.5x.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402


def wall(command: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--resolution", type=int, default=None, help="the demo's resolution (default: lite0's 224)")
    p.add_argument("--commands", default=None, help="only these --help commands, comma-separated (default: all)")
    p.add_argument("--features", default=None, help="fit this cache instead of the demo's (no demo run)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    probe = shutil.which("probe") or "probe"
    from probe.cli import main as cli

    commands = {"probe --help": [probe, "--help"]}
    commands |= {f"probe {name} --help": [probe, name, "--help"] for name in sorted(cli.commands)}
    commands |= {f"probe cache {name} --help": [probe, "cache", name, "--help"] for name in sorted(cli.commands["cache"].commands)}
    size = ["--resolution", str(args.resolution)] if args.resolution else []
    if args.commands:
        commands = {name: c for name, c in commands.items() if name in args.commands.split(",")}
    cache = ["--features", args.features] if args.features else ["--dataset", "sample", "--model", "efficientnet_lite0", *size]
    commands["probe fit --head logreg (demo cache)"] = [probe, "-q", "fit", *cache, "--head", "logreg", "--out", "run"]
    reference = [sys.executable, "-c", "import torch"]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.features:
            subprocess.run([probe, "-q", "demo", *size], cwd=tmp, check=True, capture_output=True)  # the demo's cache
        times = {name: [] for name in commands}
        torch_times = []
        for _ in range(args.repeats):  # alternating: every command sees the same machine
            torch_times.append(wall(reference, Path(tmp)))
            for name, command in commands.items():
                times[name].append(wall(command, Path(tmp)))
    torch_s = min(torch_times)
    rows = [{"command": name, "seconds": min(t), "over_import_torch": min(t) / torch_s} for name, t in times.items()]
    for r in rows:
        print(f"{r['command']:<48}{r['seconds']:7.3f} s  {r['over_import_torch']:.2f}x import torch")
    helps = [r for r in rows if r["command"].endswith("--help")]
    fit = next(r for r in rows if r["command"].startswith("probe fit --head"))
    targets = {"every_help_at_most_0.15x_import_torch": all(r["over_import_torch"] <= 0.15 for r in helps),
               "fit_logreg_process_at_most_1.5x_import_torch": fit["over_import_torch"] <= 1.5}
    write_result("startup", {"python_import_torch_seconds": torch_s, "repeats": args.repeats, "rows": rows,
                             "targets_met": targets}, args.out)


if __name__ == "__main__":
    main()
