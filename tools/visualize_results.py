#!/usr/bin/env python
"""Draw ground truth and predictions (a COCO results json) of a registered dataset to PNG files.

    python tools/visualize_results.py --dataset synthetic_defects_val \
        --results output/demo/inference/synthetic_defects_val/coco_instances_results.json \
        --output output/demo/predictions
"""
import argparse
import os
import sys

from tqdm import tqdm

import d2_defects  # noqa: F401  registers datasets
from d2_defects.utils.errors import run_cli
from d2_defects.utils.visualize import draw_dataset_predictions, load_coco_results


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="registered dataset name, e.g. synthetic_defects_val")
    p.add_argument("--results", required=True, help="COCO-format results json (list of detections)")
    p.add_argument("--output", required=True, help="folder for the PNG files")
    p.add_argument("--num-images", type=int, default=8, help="how many images to draw (default 8)")
    p.add_argument("--score-threshold", type=float, default=0.3, help="hide predictions below this score")
    p.add_argument("--overwrite", action="store_true", help="replace PNGs already in --output")
    args = p.parse_args(argv)
    preds = load_coco_results(args.results, args.dataset)
    os.makedirs(args.output, exist_ok=True)
    written = draw_dataset_predictions(
        args.dataset, preds, args.output, num_images=args.num_images,
        score_threshold=args.score_threshold, overwrite=args.overwrite, progress=tqdm,
    )
    print(f"wrote {len(written)} images to {args.output}")
    return 0


def main(argv=None):
    """Exit code: 0, or 2 after one ``ERROR:`` line for bad input (other errors keep their traceback)."""
    return run_cli(_main, argv, exit=False)


if __name__ == "__main__":
    sys.exit(main())
