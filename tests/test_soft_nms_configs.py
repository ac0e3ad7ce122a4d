"""Faster R-CNN and Cascade R-CNN configs train and evaluate with soft-NMS switched on by config only, and
soft-NMS really replaces hard NMS in the trained models (oracle: ``batched_soft_nms`` on the candidates)."""
import json
import os

import pytest
import torch

from conftest import ROOT, TINY_OPTS, run_train_net
from d2_defects.checkpoint import DefectCheckpointer
from d2_defects.engine import Trainer
from d2_defects.engine.launch import load_config
from d2_defects.layers.soft_nms import batched_soft_nms

DS = ["DATASETS.TRAIN", "('synthetic_defects_train',)", "DATASETS.TEST", "('synthetic_defects_val',)"]
# plain Faster R-CNN, Faster R-CNN with the IoU branch, Cascade R-CNN (all the project's ROI heads)
CONFIGS = ["faster_r18_cpu.yaml", "faster_iou_r18_cpu.yaml", "cascade_r18_cpu.yaml"]


@pytest.fixture(scope="module", params=CONFIGS)
def trained(request, synthetic_root, tmp_path_factory):
    """One short training run per config, evaluated with gaussian soft-NMS (train_net.py, config keys only)."""
    config = os.path.join(ROOT, "configs", "synthetic", request.param)
    out = tmp_path_factory.mktemp(request.param.replace(".yaml", ""))
    run_train_net(["--config-file", config, *TINY_OPTS, *DS,
                   "SOLVER.MAX_ITER", "2", "MODEL.SOFT_NMS.ENABLED", "True", "MODEL.SOFT_NMS.METHOD", "gaussian",
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "7",
                   "SEED", "0", "OUTPUT_DIR", str(out)], synthetic_root)
    return config, out


def test_config_trains_and_evaluates_with_soft_nms(trained):
    _, out = trained
    results = json.loads((out / "eval_results.json").read_text())
    assert "AP" in results["bbox"]
    dets = json.loads((out / "inference" / "synthetic_defects_val" / "coco_instances_results.json").read_text())
    per_image = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    # detections are produced and TEST.DETECTIONS_PER_IMAGE still caps them
    assert dets and max(per_image.values()) <= 7


def _detect(config, weights, inputs, *opts):
    """Detections of the checkpoint ``weights`` built from ``config`` + ``opts``: one (N, 6) tensor per image,
    rows (class, x1, y1, x2, y2, score)."""
    cfg = load_config(config, [*TINY_OPTS, "TEST.DETECTIONS_PER_IMAGE", "1000", *opts])
    model = Trainer.build_model(cfg)
    DefectCheckpointer(model).load(str(weights))
    model.eval()
    out = []
    with torch.no_grad():
        for x in inputs:
            inst = model([x])[0]["instances"]
            out.append(torch.cat([inst.pred_classes[:, None].double(), inst.pred_boxes.tensor.double(),
                                  inst.scores[:, None].double()], dim=1))
    return out


def _rows(dets):
    """{(class, x1, y1, x2, y2): score} of one image's detections."""
    return {tuple(r[:5]): r[5] for r in dets.tolist()}


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_replaces_hard_nms_in_the_trained_model(trained, method):
    from detectron2.data import build_detection_test_loader

    config, out = trained
    cfg = load_config(config, TINY_OPTS)
    inputs = [x[0] for x in build_detection_test_loader(cfg, "tiny_defects_val")]
    for x in inputs:  # no rescaling of the outputs: the detections are exactly the heads' boxes
        x["height"], x["width"] = x["image"].shape[1:]
    weights = out / "model_final.pth"
    iou, prune = 0.3, 0.001  # IoU 0.3: overlaps to act on even for the near-random proposals of 2 iterations
    hard = _detect(config, weights, inputs, "MODEL.ROI_HEADS.NMS_THRESH_TEST", str(iou))
    soft = _detect(config, weights, inputs, "MODEL.SOFT_NMS.ENABLED", "True", "MODEL.SOFT_NMS.METHOD", method,
                   "MODEL.SOFT_NMS.IOU_THRESHOLD", str(iou), "MODEL.SOFT_NMS.SCORE_THRESHOLD", str(prune))
    # every candidate (score threshold applied, boxes clipped): hard NMS at IoU 1.0 suppresses nothing
    cands = _detect(config, weights, inputs, "MODEL.ROI_HEADS.NMS_THRESH_TEST", "1.0")

    decayed = 0
    for h, s, c in zip(hard, soft, cands):
        assert len(c) >= len(h) > 0
        # oracle: the project's operator on the pre-NMS candidates gives the same detections and scores
        keep, new_scores = batched_soft_nms(c[:, 1:5].float(), c[:, 5].float(), c[:, 0].long(), method,
                                            0.5, iou, prune)
        ref = _rows(torch.cat([c[keep, :5], new_scores[:, None].double()], dim=1))
        got = _rows(s)
        assert got.keys() == ref.keys()
        assert max(abs(got[k] - ref[k]) for k in ref) < 1e-6
        # soft-NMS keeps at least as many boxes as hard NMS (the suppressed ones, decayed), never raises a
        # score; with "linear" (only IoU > iou decays, as hard NMS suppresses) the hard-NMS boxes are kept too.
        # (Gaussian decays every overlap, so a box hard NMS keeps can legitimately fall below the prune level.)
        raw = _rows(c)
        assert len(s) >= len(h)
        if method == "linear":
            assert set(_rows(h)) <= set(got)
        assert all(got[k] <= raw[k] + 1e-7 for k in got)
        decayed += sum(got[k] < raw[k] - 1e-6 for k in got)
        # the best detection of each class is untouched
        for cls in h[:, 0].unique():
            hk = max(_rows(h[h[:, 0] == cls]).items(), key=lambda kv: kv[1])
            assert got[hk[0]] == pytest.approx(hk[1], abs=1e-7)
    # hard NMS suppressed candidates, soft-NMS kept some of them with decayed scores
    assert sum(map(len, cands)) > sum(map(len, hard)) and decayed > 0
    assert sum(map(len, soft)) > sum(map(len, hard))
