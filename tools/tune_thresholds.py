#!/usr/bin/env python
"""Per-class score thresholds that maximise the configured competition score, from saved detections.

    python tools/tune_thresholds.py --dataset synthetic_defects_val \
        --predictions output/demo/inference/synthetic_defects_val/defect_detections.json \
        --config-file configs/synthetic/cascade_r18_cpu.yaml \
        TEST.DEFECT_EVAL.IOU fabric TEST.DEFECT_EVAL.ACC_WEIGHT 0.2 TEST.DEFECT_EVAL.MAP_WEIGHT 0.8

Prints the score with all detections and with the tuned thresholds, and the config line
``MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS [...]`` (one threshold per class, dataset class order).
The score is (ACC_WEIGHT * ACC + MAP_WEIGHT * weighted_mAP) / (ACC_WEIGHT + MAP_WEIGHT); dropping
low-scored boxes never raises AP, so thresholds only pay off through ACC (images wrongly called
defective because of a confident false box).
"""
import argparse
import sys

from tqdm import tqdm

import d2_defects  # noqa: F401  registers datasets
from d2_defects.evaluation.cli import USER_ERRORS, add_common_args, evaluate_saved, report_error
from d2_defects.evaluation.tuning import tune_class_thresholds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--candidates", type=int, default=40, help="candidate thresholds per class (quantiles)")
    args = p.parse_args(argv)
    try:
        result = evaluate_saved(args)
    except USER_ERRORS as e:
        return report_error(e)
    thresholds, before, after = tune_class_thresholds(result, num_candidates=args.candidates, progress=tqdm)
    s = result.settings
    print(f"score = ({s.acc_weight:g} * ACC + {s.map_weight:g} * weighted_mAP) / {s.acc_weight + s.map_weight:g}, "
          f"IoU {s.iou.name}, AP {s.ap_method}, image threshold {s.image_score_threshold:g}")
    for name, t in zip(result.class_names, thresholds):
        print(f"  {name}: {t:.3f}")
    print(f"score before: {before:.2f} (all detections)")
    print(f"score after:  {after:.2f}")
    print("MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS [" + ", ".join(f"{t:.3f}" for t in thresholds) + "]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
