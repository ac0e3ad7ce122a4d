"""Faster R-CNN and Cascade R-CNN configs train and evaluate with soft-NMS switched on by config only."""
import json
import os

import pytest

from conftest import ROOT, TINY_OPTS, run_train_net

DS = ["DATASETS.TRAIN", "('synthetic_defects_train',)", "DATASETS.TEST", "('synthetic_defects_val',)"]


@pytest.mark.parametrize("config", ["cascade_r18_cpu.yaml", "faster_iou_r18_cpu.yaml"])
def test_config_trains_and_evaluates_with_soft_nms(synthetic_root, tmp_path, config):
    run_train_net(["--config-file", os.path.join(ROOT, "configs", "synthetic", config), *TINY_OPTS, *DS,
                   "SOLVER.MAX_ITER", "2", "MODEL.SOFT_NMS.ENABLED", "True", "MODEL.SOFT_NMS.METHOD", "gaussian",
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "7",
                   "OUTPUT_DIR", str(tmp_path)], synthetic_root)
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert "AP" in results["bbox"]
    dets = json.loads((tmp_path / "inference" / "synthetic_defects_val" / "coco_instances_results.json").read_text())
    per_image = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    # detections are produced and TEST.DETECTIONS_PER_IMAGE still caps them
    assert dets and max(per_image.values()) <= 7
