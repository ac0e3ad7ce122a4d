#!/usr/bin/env python
"""Merge the COCO results files of several models (same images, same image ids) into one.

    python tools/ensemble.py a/coco_instances_results.json b/coco_instances_results.json \\
        --weights 2 1 --method wbf -o merged.json [--dataset synthetic_defects_val]

Methods: "wbf" (weighted boxes fusion, ensemble-boxes), "soft_nms" (the project's soft-NMS), "nms".
With --dataset, COCO AP of every input and of the merge is printed (pycocotools, as Detectron2's
COCOEvaluator), followed by the DefectEvaluator's metrics (defect/mAP, defect/ACC, defect/score, ...). The
output is never replaced without --overwrite.
"""
import argparse
import math
import os
import sys

from tqdm import tqdm

import d2_defects  # noqa: F401  registers datasets
from d2_defects.inference.ensemble import ensemble_results, evaluate_results, load_results
from d2_defects.modeling.merge import MERGE_METHODS
from d2_defects.utils.errors import UsageError, run_cli
from d2_defects.utils.fileio import atomic_write_json, check_can_write


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="COCO results json files (lists of detections)")
    p.add_argument("-o", "--output", required=True, help="merged COCO results json to write")
    p.add_argument("--method", choices=MERGE_METHODS, default="wbf", help="how to merge (default wbf)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one positive weight per file")
    p.add_argument("--iou-thr", type=float, default=0.55, help="fusion IoU (wbf) or NMS IoU (nms); default 0.55")
    p.add_argument("--score-thr", type=float, default=0.0, help="drop detections scoring at or below this")
    p.add_argument("--max-dets", type=int, default=100, help="detections kept per image (default 100)")
    p.add_argument("--dataset", default=None, help="registered dataset to evaluate the inputs and the merge on")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return p.parse_args(argv)


def _image_sizes(dataset):
    from detectron2.data import DatasetCatalog

    return {r["image_id"]: (r["height"], r["width"]) for r in DatasetCatalog.get(dataset)}


def run(args):
    if args.weights is not None and len(args.weights) != len(args.results):
        raise UsageError(f"--weights: got {len(args.weights)} weights for {len(args.results)} results files")
    if args.weights is not None and min(args.weights) <= 0:
        raise UsageError(f"--weights must be positive, got {args.weights}")
    if not 0 < args.iou_thr <= 1:
        raise UsageError(f"--iou-thr must be in (0, 1], got {args.iou_thr}")
    if args.dataset is not None:
        from detectron2.data import DatasetCatalog

        if args.dataset not in DatasetCatalog.list():
            raise UsageError(f"--dataset {args.dataset} is not registered (check DETECTRON2_DATASETS)")
    check_can_write([args.output], args.overwrite)
    inputs = [load_results(p) for p in args.results]
    sizes = _image_sizes(args.dataset) if args.dataset else None
    merged = ensemble_results(inputs, args.method, args.weights, args.iou_thr, args.score_thr, args.max_dets,
                              image_sizes=sizes, progress=tqdm)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_write_json(args.output, merged)
    print(f"merged {len(args.results)} files ({sum(map(len, inputs))} detections) with {args.method} -> "
          f"{args.output} ({len(merged)} detections)")
    if args.dataset:
        rows = [(p, evaluate_results(d, args.dataset)) for p, d in zip(args.results, inputs)]
        rows.append((f"merged ({args.method})", evaluate_results(merged, args.dataset)))
        keys = list(rows[-1][1])
        print("\n| results | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for name, m in rows:
            vals = [m.get(k, float("nan")) for k in keys]
            print(f"| {name} | " + " | ".join("nan" if isinstance(v, float) and math.isnan(v) else
                                              f"{v:.2f}" if isinstance(v, float) else str(v) for v in vals) + " |")
    return 0


def _main(argv=None):
    args = parse_args(argv)
    return run(args)


def main(argv=None):
    """Exit code: 0, or 2 after one ``ERROR:`` line for bad input (other errors keep their traceback)."""
    return run_cli(_main, argv, exit=False)


if __name__ == "__main__":
    sys.exit(main())
