#!/usr/bin/env python
"""Per-class analysis plots of saved detections on a registered dataset.

    python tools/analyze_results.py --dataset synthetic_defects_val \
        --predictions output/demo/inference/synthetic_defects_val/defect_detections.json \
        --output output/demo/analysis [--iou fabric] [--config-file cfg.yaml] [KEY VALUE ...]

Writes per_class_ap.png, ap_vs_num_annotations.png, ap_vs_box_size.png, ap_vs_aspect_ratio.png,
pr_curves.png, confusion_matrix.png (with "missed" and "background" columns) and worst_images.png,
plus defect_metrics.json. Class names the default font lacks glyphs for (Chinese ones) are drawn with an
installed font that has them; without one the plots label classes "class <i>" and class_index.md lists
index -> name. Predictions: the evaluator's defect_detections.json or a COCO results json
(coco_instances_results.json).
"""
import argparse
import json
import os
import sys

from tqdm import tqdm

import d2_defects  # noqa: F401  registers datasets
from d2_defects.evaluation.analysis import CLASS_INDEX_FILE, PLOT_FILES, write_analysis_plots
from d2_defects.evaluation.cli import add_common_args, evaluate_saved
from d2_defects.utils.errors import OutputExistsError, run_cli


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--output", default=None, help="folder for the PNGs (default: <predictions folder>/analysis)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="detections below are left out of the confusion matrix and the gallery "
                        "(default TEST.DEFECT_EVAL.IMAGE_SCORE_THRESHOLD)")
    p.add_argument("--match-iou", type=float, default=0.5, help="IoU for the confusion matrix and gallery")
    p.add_argument("--num-worst", type=int, default=8, help="images in the worst-images gallery")
    p.add_argument("--overwrite", action="store_true", help="replace plots already in --output")
    args = p.parse_args(argv)
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.predictions)), "analysis")
    outputs = list(PLOT_FILES.values()) + ["defect_metrics.json", CLASS_INDEX_FILE]
    existing = [f for f in outputs if os.path.exists(os.path.join(out, f))]
    if existing and not args.overwrite:
        raise OutputExistsError(f"{os.path.join(out, existing[0])} exists (and {len(existing) - 1} more); "
                                "use --overwrite to replace")
    result, _ = evaluate_saved(args)
    thr = result.settings.image_score_threshold if args.score_threshold is None else args.score_threshold
    os.makedirs(out, exist_ok=True)
    paths = write_analysis_plots(result, out, score_threshold=thr, iou_threshold=args.match_iou,
                                 num_worst=args.num_worst, progress=tqdm)
    with open(os.path.join(out, "defect_metrics.json"), "w") as f:
        json.dump(result.to_json(), f, indent=2)
    print(result.table())
    s = result.summary()
    print(" ".join(f"{k} {s[k]:.2f}" for k in ("mAP", "weighted_mAP", "ACC", "score")))
    if result.absent_classes:
        print(f"classes without ground truth (nan, excluded from the means): {', '.join(result.absent_classes)}")
    if "class_index" in paths:
        print(f"no installed font draws the class names: the plots say 'class <i>', see {paths['class_index']}")
    print(f"wrote {len(PLOT_FILES)} plots to {out}")
    return 0


def main(argv=None):
    """Exit code: 0, or 2 after one ``ERROR:`` line for bad input (other errors keep their traceback)."""
    return run_cli(_main, argv, exit=False)


if __name__ == "__main__":
    sys.exit(main())
