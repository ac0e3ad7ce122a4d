#!/usr/bin/env python
"""Inference speed of a config in eager PyTorch and in the exported runtimes, as one table.

    python tools/benchmark_inference.py --config-file configs/synthetic/cascade_r18_cpu.yaml \\
        --backends eager,torchscript,onnxruntime,openvino --sizes 256x192 512x384 --threads 2 \\
        [--iters 20 --warmup 3] [MODEL.WEIGHTS model.pth] [KEY VALUE ...]
    python tools/benchmark_inference.py --config-file CFG --images 'datasets/x/val/*.png' --num-images 20 \\
        --backends eager,openvino --threads 1 MODEL.WEIGHTS model_final.pth   # real images, a trained model

Prints per backend and image size: ms per image (median), images/s, time relative to eager, peak memory
(per backend, in a fresh process: peak RSS growth on CPU, max_memory_allocated on CUDA), model file size
and the parity result (the exported model + postprocess.py against the eager model on the timed images).
Each backend times the same work: an image already resized to the test size in, final detections out
(post-processing included). Backends take turns image by image, so machine noise hits them alike. Images
are random noise of --sizes, or with --images the first --num-images images of a folder or glob (what a
trained model's post-processing costs on real data); without MODEL.WEIGHTS the model is randomly initialised
(fine for timing random images: detections are capped by TEST.DETECTIONS_PER_IMAGE either way). Eager runs
on MODEL.DEVICE, the exported runtimes on CPU.
Exit code 1 when a parity check fails (the row says why), 2 for a usage error. See docs/deploy.md.
"""
import argparse
import os
import sys

import d2_defects  # noqa: F401  registers models
from d2_defects.config import load_config
from d2_defects.inference.benchmark import BACKENDS
from d2_defects.utils.errors import ConfigError, DefectsError, UsageError, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="model config (yaml)")
    p.add_argument("--backends", default="eager",
                   help=f"comma-separated, some of {','.join(BACKENDS)} (default eager)")
    p.add_argument("--sizes", nargs="+", default=None, help="random images of these sizes WxH in px (default 256x192)")
    p.add_argument("--images", default=None,
                   help="time real images instead: a folder or glob; the first --num-images readable ones")
    p.add_argument("--num-images", type=int, default=None,
                   help="images used in turn (default: 3 random images per size, 20 with --images)")
    p.add_argument("--iters", type=int, default=10, help="timed rounds per size; the median is reported (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per size before timing (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch, ONNX Runtime and OpenVINO (default: each library's own)")
    p.add_argument("--export-dir", default=None, help="keep the exported models here, replaced on every run (default: a temporary folder)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-backend peak memory processes")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def _size(s):
    try:
        w, h = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise UsageError(f"--sizes: expected WxH like 512x384, got {s!r}") from None
    if w <= 0 or h <= 0:
        raise UsageError(f"--sizes: sizes must be positive, got {s!r}")
    return w, h


def run(args):
    from d2_defects.inference.benchmark import benchmark_backends, format_table

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UsageError(f"--backends: unknown {unknown}, expected some of {','.join(BACKENDS)}")
    if args.iters < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise UsageError("--iters and --threads must be >= 1, --warmup >= 0")
    if args.images and args.sizes:
        raise UsageError("--images and --sizes: give one (real images keep their own sizes)")
    if args.num_images is not None and args.num_images < 1:
        raise UsageError("--num-images must be >= 1")
    sizes = [_size(s) for s in (args.sizes or ["256x192"])]
    num_images = args.num_images or (20 if args.images else 3)
    cfg = load_config(args.config_file, args.opts)
    if cfg.TEST.AUG.ENABLED:
        raise UsageError("TEST.AUG.ENABLED: this table times plain inference (TTA cost: benchmarks/inference_tta.py)")
    load_before = os.getloadavg()[0]
    try:
        rows = benchmark_backends(cfg, backends, sizes, iters=args.iters, warmup=args.warmup, threads=args.threads,
                                  export_dir=args.export_dir, memory=not args.no_memory, num_images=num_images,
                                  image_spec=args.images)
    except DefectsError:
        raise
    except ValueError as e:  # config values checked when the model is built
        raise ConfigError(str(e)) from None
    import torch

    print(f"\n{args.config_file} ({'MODEL.WEIGHTS' if cfg.MODEL.WEIGHTS else 'random init'}), eager on "
          f"{cfg.MODEL.DEVICE}, {args.threads or torch.get_num_threads()} threads, median of {args.iters} rounds "
          f"after {args.warmup}, 1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after\n")
    print(format_table(rows))
    for size in dict.fromkeys(r["size"] for r in rows):
        fastest = min((r for r in rows if r["size"] == size and r["backend"] != "eager" and r["ratio"] is not None),
                      key=lambda r: r["ratio"], default=None)
        if fastest is not None:
            print(f"{size}: fastest exported backend {fastest['backend']}, {fastest['ratio']:.2f}x eager's time")
    return 0 if all(not r["parity"].startswith("FAIL") for r in rows) else 1


def main(argv=None):
    """Exit code: 0; 1 when a parity check failed; 2 after one ``ERROR:`` line for bad input."""
    return run_cli(run, parse_args(argv), exit=False)


if __name__ == "__main__":
    sys.exit(main())
