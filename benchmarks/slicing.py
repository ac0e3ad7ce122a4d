"""Sliced inference on a large image: peak memory per TEST.SLICE.BATCH and time relative to plain inference.

    python benchmarks/slicing.py --size 8000x6000 --threads 2

Each mode runs in its own subprocess (peak memory = the process's peak RSS after inference minus its RSS with the
model built and the image in memory, so the numbers are comparable), through ``BatchPredictor`` with the demo
config at random weights on a random 8-bit image: plain inference (the image resized to 512 px short side), sliced
inference with 512-px tiles at 20% overlap and BATCH 1, 4 and 16, and with the whole image added. Time is the
median of ``--repeats`` runs; ratios are against plain inference (which sees far fewer pixels: the point is the
cost of slicing, not a like-for-like race).
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic", "cascade_r18_cpu.yaml")
MODES = {
    "plain (resized to 512)": [],
    "sliced 512 px, BATCH 1": ["TEST.SLICE.ENABLED", "True", "TEST.SLICE.BATCH", "1", "TEST.SLICE.INCLUDE_FULL", "False"],
    "sliced 512 px, BATCH 4": ["TEST.SLICE.ENABLED", "True", "TEST.SLICE.BATCH", "4", "TEST.SLICE.INCLUDE_FULL", "False"],
    "sliced 512 px, BATCH 16": ["TEST.SLICE.ENABLED", "True", "TEST.SLICE.BATCH", "16", "TEST.SLICE.INCLUDE_FULL",
                                "False"],
    "sliced 512 px, BATCH 4 + whole image": ["TEST.SLICE.ENABLED", "True", "TEST.SLICE.BATCH", "4"],
}


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_mode(opts, size, repeats, threads):
    """In this (fresh) process: time and peak memory of one mode; prints one json line."""
    import torch

    import d2_defects  # noqa: F401
    from d2_defects.engine.launch import load_config
    from d2_defects.inference import BatchPredictor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "512", "INPUT.MAX_SIZE_TEST", "100000",
            "TEST.SLICE.SIZE", "(512, 512)", "TEST.SLICE.OVERLAP", "0.2"]
    predictor = BatchPredictor(load_config(CONFIG, base + opts))
    w, h = size
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    before = _rss_mb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor([image])
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"median_s": statistics.median(times), "peak_over_baseline_mb": peak - before,
                      "baseline_mb": before}))


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="8000x6000", help="image WxH")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.mode:
        return run_mode(MODES[args.mode], size, args.repeats, args.threads)
    rows = {}
    for name in MODES:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, __file__, "--mode", name, "--size", args.size, "--repeats",
                              str(args.repeats), "--threads", str(args.threads)], capture_output=True, text=True,
                             env=env, check=True).stdout.strip().splitlines()[-1]
        rows[name] = json.loads(out)
    plain = rows["plain (resized to 512)"]["median_s"]
    print(f"\n### Sliced inference, {args.size} image, {args.threads} threads\n")
    print("| mode | time (median) | ratio to plain | peak memory over model + image |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_s'] * 1e3:.0f} ms | {r['median_s'] / plain:.1f}x | "
              f"{r['peak_over_baseline_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
