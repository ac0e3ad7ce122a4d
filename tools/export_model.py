#!/usr/bin/env python
"""Export a trained detector by tracing (TorchScript; ONNX when the onnx package is installed) and check
that the exported model gives the eager model's detections on sample images.

    python tools/export_model.py --config-file configs/synthetic/cascade_r18_cpu.yaml --output export/ \\
        --sample-images datasets/synthetic_defects/val MODEL.WEIGHTS output/demo/model_final.pth

Writes --output/model.ts (load with torch.jit.load; input: one CHW image tensor in INPUT.FORMAT, resized
to the test size; outputs: boxes, classes, scores, image size, then image-level outputs such as
DefectRCNN's defect_score), and model.onnx with --format onnx. Exits with one ERROR line when the model
cannot be traced or the parity check fails. Existing files are never replaced without --overwrite.
"""
import argparse
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import d2_defects  # noqa: F401  registers models
from d2_defects.checkpoint import CheckpointError
from d2_defects.engine.launch import UserError, load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="model config (yaml)")
    p.add_argument("--output", required=True, help="folder for model.ts / model.onnx")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript", help="default torchscript")
    p.add_argument("--sample-images", default=None,
                   help="folder/glob of images for tracing and the parity check (default: random images)")
    p.add_argument("--num-samples", type=int, default=3, help="images used for the parity check (default 3)")
    p.add_argument("--atol", type=float, default=1e-3, help="allowed box difference in px (default 1e-3)")
    p.add_argument("--overwrite", action="store_true", help="replace existing exported files")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ... (e.g. MODEL.WEIGHTS)")
    return p.parse_args(argv)


def _samples(cfg, spec, n):
    """Model inputs (CHW tensors, resized to the test size) from files, or random images."""
    from detectron2.data.transforms import ResizeShortestEdge

    from d2_defects.inference.predictor import ImageReadError, list_images, read_image

    if spec:
        images = []
        for f in list_images(spec):
            try:
                images.append(read_image(f, cfg.INPUT.FORMAT))
            except ImageReadError as e:
                print(f"WARNING: {e}", file=sys.stderr)
            if len(images) == n:
                break
    else:
        rng = np.random.default_rng(0)
        s = cfg.INPUT.MIN_SIZE_TEST
        images = [rng.integers(0, 256, (s, int(s * r), 3), dtype=np.uint8) for r in (4 / 3, 1.0, 1.5)][:n]
    if not images:
        raise UserError(f"no readable sample images in {spec}")
    resize = ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    return [torch.as_tensor(np.ascontiguousarray(resize.get_transform(i).apply_image(i).transpose(2, 0, 1)))
            for i in images]


def run(args):
    from detectron2.modeling import build_model

    from d2_defects.checkpoint import DefectCheckpointer
    from d2_defects.inference.export import compare_instances, export_onnx, run_exported, trace_model
    from d2_defects.inference.io import check_can_write

    cfg = load_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        raise UserError("no weights: pass MODEL.WEIGHTS path/to/model_final.pth")
    path = os.path.join(args.output, "model.ts" if args.format == "torchscript" else "model.onnx")
    check_can_write([path], args.overwrite)
    try:
        model = build_model(cfg)
    except ValueError as e:  # config values checked when the model is built
        raise UserError(f"config error: {e}") from None
    DefectCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    samples = _samples(cfg, args.sample_images, args.num_samples)
    try:
        traced, adapter = trace_model(model, samples[0])
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        reason = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
        raise UserError(f"cannot trace {cfg.MODEL.META_ARCHITECTURE} ({args.config_file}): {reason}") from None
    os.makedirs(args.output, exist_ok=True)
    if args.format == "onnx":
        try:
            export_onnx(adapter, samples[0], path)
        except ImportError:
            raise UserError("ONNX export needs the onnx package (pip install onnx); TorchScript export works "
                            "without it (--format torchscript)") from None
        print(f"wrote {path}; the parity check below is of the traced TorchScript graph it was built from")
    else:
        traced.save(path)
        traced = torch.jit.load(path)
    worst = 0.0
    for i, image in enumerate(tqdm(samples, desc="parity check")):
        with torch.no_grad():
            eager = model([{"image": image}])[0]
        exported = run_exported(traced, adapter, image)
        diff = compare_instances(eager["instances"], exported["instances"])
        # image-level outputs, e.g. DefectRCNN's defect_score
        extra = {k: abs(float(eager[k]) - exported.get(k, float("inf"))) for k in eager if k != "instances"}
        diff.update({f"{k}_diff": v for k, v in extra.items()})
        if not (diff["num"] and diff["classes"] and diff["max_box_diff"] <= args.atol
                and all(v <= 1e-5 for v in extra.values())):
            raise UserError(f"exported model differs from the eager model on sample {i} "
                            f"(shape {tuple(image.shape)}): {diff}")
        worst = max(worst, diff["max_box_diff"])
    print(f"wrote {path}; parity with the eager model on {len(samples)} images: max box difference "
          f"{worst:.2e} px")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (UserError, CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
