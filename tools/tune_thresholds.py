#!/usr/bin/env python
"""Per-class score thresholds that maximise the configured competition score, from saved detections.

    python tools/tune_thresholds.py --dataset synthetic_defects_val \
        --predictions output/demo/inference/synthetic_defects_val/defect_detections.json \
        --config-file configs/synthetic/cascade_r18_cpu.yaml \
        TEST.DEFECT_EVAL.IOU fabric TEST.DEFECT_EVAL.ACC_WEIGHT 0.2 TEST.DEFECT_EVAL.MAP_WEIGHT 0.8

Prints the score with all detections and with the tuned thresholds, and the config line
``MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS [...]`` (one threshold per class, dataset class order).
The score is (ACC_WEIGHT * ACC + MAP_WEIGHT * m) / (ACC_WEIGHT + MAP_WEIGHT), m = TEST.DEFECT_EVAL.SCORE_MAP
(weighted_mAP or mAP). Like the model's postprocessing, a threshold keeps the detections scoring strictly
above it, and no threshold is below the one the model already applies (MODEL.ROI_HEADS.SCORE_THRESH_TEST,
MODEL.FCOS.SCORE_THRESH_TEST for FCOS, or the configured SCORE_THRESH_PER_CLASS; pass the config the
detections were made with): the model with the printed line returns the saved detections above the
thresholds, so the "after" score is the one it gets (exact with hard NMS when no image was cut at
TEST.DETECTIONS_PER_IMAGE). Dropping low-scored boxes never raises AP, so thresholds only pay off through
ACC (images wrongly called defective because of a confident false box).
"""
import argparse
import sys

import numpy as np
from tqdm import tqdm

import d2_defects  # noqa: F401  registers datasets
from d2_defects.evaluation.cli import add_common_args, evaluate_saved
from d2_defects.utils.errors import run_cli
from d2_defects.evaluation.tuning import kept_by_thresholds, model_score_thresholds, tune_class_thresholds


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--candidates", type=int, default=40, help="candidate thresholds per class (quantiles)")
    args = p.parse_args(argv)
    result, cfg = evaluate_saved(args)
    floor = model_score_thresholds(cfg, len(result.class_names))
    thresholds, before, after = tune_class_thresholds(result, num_candidates=args.candidates, progress=tqdm,
                                                      min_thresholds=floor)
    s = result.settings
    print(f"score = ({s.acc_weight:g} * ACC + {s.map_weight:g} * {s.score_map}) / "
          f"{s.acc_weight + s.map_weight:g}, "
          f"IoU {s.iou.name}, AP {s.ap_method}, image threshold {s.image_score_threshold:g}")
    for name, t, f in zip(result.class_names, thresholds, floor):
        print(f"  {name}: {t!r}" + (" (the model's threshold, unchanged)" if t == f else ""))
    dt = result.dt
    below = int((~kept_by_thresholds(dt["scores"], np.asarray(floor)[dt["cls"]])).sum())
    if below:
        print(f"note: {below} saved detections score <= the model's threshold; they count in 'before', "
              "not in 'after' (the model does not return them)")
    if cfg.MODEL.SOFT_NMS.ENABLED:
        print("note: MODEL.SOFT_NMS.ENABLED: the model thresholds scores before soft-NMS decays them, the saved "
              "scores are decayed, so 'after' is approximate")
    per_image = np.bincount(dt["img"], minlength=len(result.image_ids)) if len(dt["img"]) else np.zeros(1)
    if cfg.TEST.DETECTIONS_PER_IMAGE > 0 and per_image.max() >= cfg.TEST.DETECTIONS_PER_IMAGE:
        print(f"note: some images have TEST.DETECTIONS_PER_IMAGE ({cfg.TEST.DETECTIONS_PER_IMAGE}) detections; "
              "with thresholds the model may return boxes cut from the saved file, so 'after' is approximate")
    print(f"score before: {before:.2f} (all {len(dt['scores'])} saved detections)")
    print(f"score after:  {after:.2f} (detections scoring > their class threshold)")
    print("MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS [" + ", ".join(repr(t) for t in thresholds) + "]")
    return 0


def main(argv=None):
    """Exit code: 0, or 2 after one ``ERROR:`` line for bad input (other errors keep their traceback)."""
    return run_cli(_main, argv, exit=False)


if __name__ == "__main__":
    sys.exit(main())
