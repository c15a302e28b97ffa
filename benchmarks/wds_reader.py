"""probe's WebDataset reader against webdataset's own, on the same shards, in one run.

    python benchmarks/wds_reader.py --data /tmp/cifar10-jpeg       # CPU: about 2 min

Shards: the first --images training images of the JPEG CIFAR-10, 1,000 per tar, written by
webdataset's TarWriter. Each reader decodes every image to a uint8 RGB array in one process (the
work a DataLoader worker does): probe's by index (after one pass over the tar headers, timed apart),
webdataset's by streaming (`WebDataset(...).decode("rgb8")`). Small JPEGs make decoding cheap, so
the readers' own cost shows. Alternating, best of 3. Issue 14 asks for a reader of our own only if
it is as fast as webdataset's: the target is at least 1.0x its images/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from probe.datasets.wds import index_shards  # noqa: E402


def main(argv=None):
    import webdataset as wds

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="an image folder, e.g. the JPEG CIFAR-10")
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    classes = sorted(d.name for d in (args.data / "train").iterdir())
    files = sorted(((f, c) for c, cls in enumerate(classes) for f in (args.data / "train" / cls).iterdir()),
                   key=lambda fc: (fc[0].name, fc[1]))[:args.images]  # classes interleaved, as shards are written
    with tempfile.TemporaryDirectory() as tmp:
        shards = []
        for s in range(0, len(files), 1000):
            shards.append(str(Path(tmp) / f"train-{s // 1000:04d}.tar"))
            with wds.TarWriter(shards[-1]) as sink:
                for f, c in files[s:s + 1000]:
                    sink.write({"__key__": f"{classes[c]}_{f.stem}", "jpg": f.read_bytes(), "cls": c})
        t0 = time.perf_counter()
        images, labels = index_shards(shards)
        index_seconds = time.perf_counter() - t0

        def ours():
            return sum(images.read(i).shape[0] > 0 for i in range(len(images)))

        def theirs():
            return sum(s["jpg"].shape[0] > 0 for s in wds.WebDataset(shards, shardshuffle=False).decode("rgb8"))

        times = {"probe": [], "webdataset": []}
        for _ in range(args.repeats):
            for name, read in (("probe", ours), ("webdataset", theirs)):
                t0 = time.perf_counter()
                assert read() == len(files)
                times[name].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
    rates = {k: len(files) / v for k, v in best.items()}
    print(f"probe {rates['probe']:.0f} images/s, webdataset {rates['webdataset']:.0f} images/s, "
          f"index {index_seconds:.2f} s", flush=True)
    write_result("wds_reader", {
        "settings": {"data": str(args.data), "images": len(files), "shards": len(shards), "per_shard": 1000,
                     "repeats": args.repeats},
        "seconds": times, "images_per_second": rates, "index_seconds": index_seconds,
        "probe_over_webdataset": rates["probe"] / rates["webdataset"],
        "targets_met": {"probe reader at least as fast as webdataset": rates["probe"] >= rates["webdataset"]},
    }, args.out)


if __name__ == "__main__":
    main()
