"""DefectEvaluator's AP against the trusted implementations where the existing tests left gaps: pycocotools with
a custom IoU list (the fabric preset) and more than 100 detections per image and class; the VOC AP method
against Detectron2's voc_ap."""
import contextlib
import io

import numpy as np
import pytest

from d2_defects.evaluation.ap import ap_from_flags
from d2_defects.evaluation.scoring import DefectEvalSettings, evaluate_detections
from test_defect_evaluator import _random_coco, _to_predictions, _to_records


def _crowded(coco, dets, seed, per_image=150):
    """Add many low-scored detections of one class to a few images (more than maxDets=100 per image and class)."""
    rng = np.random.default_rng(seed)
    for im in coco["images"][:5]:
        for _ in range(per_image):
            b = [rng.uniform(0, 250), rng.uniform(0, 150), rng.uniform(2, 60), rng.uniform(2, 60)]
            dets.append({"image_id": im["id"], "category_id": 1, "bbox": b, "score": float(rng.random())})
    return coco, dets


def _pycocotools(coco_dict, dets, iou_thrs):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_dict
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.iouThrs = np.array(iou_thrs)
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K) at area all, maxDets 100


@pytest.mark.parametrize("seed", [0, 1])
def test_fabric_ious_and_more_than_100_detections_match_pycocotools(seed):
    coco_dict, dets = _crowded(*_random_coco(seed), seed)
    per_class_image = {}
    for d in dets:
        key = (d["image_id"], d["category_id"])
        per_class_image[key] = per_class_image.get(key, 0) + 1
    assert max(per_class_image.values()) > 100  # the maxDets cut is exercised
    prec = _pycocotools(coco_dict, dets, [0.1, 0.3, 0.5])
    names = [c["name"] for c in coco_dict["categories"]]
    res = evaluate_detections(_to_records(coco_dict), _to_predictions(dets), names,
                              DefectEvalSettings(iou="fabric", ap_method="coco"))
    s = res.summary()
    for k, name in enumerate(names[:-1]):  # the last class has no ground truth
        ref = prec[:, :, k].mean() * 100
        assert 1 < ref < 99
        assert s[f"AP-{name}"] == pytest.approx(ref, abs=0.01), name
    for t, thr in enumerate([0.1, 0.3, 0.5]):
        ref = np.mean([prec[t, :, k].mean() for k in range(len(names) - 1)]) * 100
        assert s[f"AP@{thr:g}"] == pytest.approx(ref, abs=0.01)


def test_voc_ap_matches_detectron2_voc_ap():
    from detectron2.evaluation.pascal_voc_evaluation import voc_ap

    rng = np.random.default_rng(0)
    for n, num_gt in [(50, 20), (200, 35), (7, 3)]:
        tp = rng.random(n) < 0.4
        tp[np.cumsum(tp) > num_gt] = False  # never more true positives than ground truth
        fp = ~tp
        ours, _ = ap_from_flags(tp[None], fp[None], num_gt, method="voc")
        rec = np.cumsum(tp) / num_gt
        prec = np.cumsum(tp) / np.maximum(np.cumsum(tp) + np.cumsum(fp), np.finfo(np.float64).eps)
        assert ours[0] == pytest.approx(voc_ap(rec, prec, use_07_metric=False), abs=1e-12)
