#!/usr/bin/env python
"""Inference speed (images/s) and peak memory of a config at given image sizes, CPU or CUDA.

    python tools/benchmark_inference.py --config-file configs/synthetic/cascade_r18_cpu.yaml \\
        --sizes 256x192 512x384 --batch-size 1 --iters 10 --warmup 2 [MODEL.WEIGHTS model.pth] [KEY VALUE ...]

Images are random noise; without MODEL.WEIGHTS the model is randomly initialised (fine for timing: the
number of detections is capped by TEST.DETECTIONS_PER_IMAGE either way). Each size is resized like at test time (or by the
test-time augmentation when TEST.AUG.ENABLED). The device is MODEL.DEVICE. Peak memory is
torch.cuda.max_memory_allocated on CUDA and the process's peak resident set size on CPU (which only
grows, so it is reported cumulatively). Prints a markdown table.
"""
import argparse
import resource
import statistics
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import d2_defects  # noqa: F401  registers models
from d2_defects.checkpoint import CheckpointError
from d2_defects.engine.launch import UserError, load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="model config (yaml)")
    p.add_argument("--sizes", nargs="+", default=["256x192"], help="image sizes WxH in px (default 256x192)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--iters", type=int, default=10, help="timed batches per size; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per size before timing (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def _size(s):
    try:
        w, h = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise UserError(f"--sizes: expected WxH like 512x384, got {s!r}") from None
    if w <= 0 or h <= 0:
        raise UserError(f"--sizes: sizes must be positive, got {s!r}")
    return w, h


def _peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return kb / 1024


def run(args):
    from d2_defects.inference import BatchPredictor

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        raise UserError("--iters and --batch-size must be >= 1, --warmup >= 0")
    sizes = [_size(s) for s in args.sizes]
    cfg = load_config(args.config_file, args.opts)
    device = torch.device(cfg.MODEL.DEVICE)
    try:
        predictor = BatchPredictor(cfg)
    except ValueError as e:
        raise UserError(f"config error: {e}") from None
    rng = np.random.default_rng(0)
    rows = []
    for w, h in sizes:
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(args.batch_size)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in tqdm(range(args.warmup + args.iters), desc=f"{w}x{h}"):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            predictor(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append((f"{w}x{h}", args.batch_size / med, med * 1e3 / args.batch_size, _peak_memory_mb(device)))
    tta = " (TTA)" if cfg.TEST.AUG.ENABLED else ""
    mem = "peak CUDA memory (MB)" if device.type == "cuda" else "peak RSS so far (MB)"
    print(f"\n{args.config_file}{tta} on {device}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.iters} after {args.warmup} warm-up\n")
    print(f"| image size | images/s | ms/image | {mem} |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.1f} | {r[3]:.0f} |")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (UserError, CheckpointError, FileNotFoundError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
