"""DefectEvaluator: pycocotools parity, hand-computed presets, normal images, absent classes, zero
detections, the image-level score contract, the mAP in the score, the logged per-class table, config
errors, distributed gathering and the Trainer hook."""
import contextlib
import io
import json
import logging
import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode, Boxes, Instances

from d2_defects import add_defects_config
from d2_defects.evaluation import DefectEvaluator, bottle_iou_threshold, defect_eval_settings, evaluate_detections
from d2_defects.evaluation.scoring import DefectEvalSettings
from d2_defects.evaluation.tuning import ThresholdScorer


def _register(name, records, classes, weights=None):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    meta = MetadataCatalog.get(name).set(
        thing_classes=list(classes), thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(classes))}
    )
    if weights is not None:
        meta.set(thing_class_weights=list(weights))
    return name


def _rec(image_id, anns, size=(400, 600)):
    """A dataset dict; ``anns``: [(class, XYWH box[, iscrowd])]."""
    objs = [{"bbox": list(a[1]), "bbox_mode": BoxMode.XYWH_ABS, "category_id": a[0],
             "iscrowd": int(a[2]) if len(a) > 2 else 0} for a in anns]
    return {"image_id": image_id, "height": size[0], "width": size[1], "file_name": f"{image_id}.png",
            "annotations": objs}


def _output(dets, defect_score=None, size=(400, 600)):
    """Model output dict from [(class, XYWH box, score)]."""
    inst = Instances(size)
    boxes = np.array([BoxMode.convert(list(b), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for _, b, _ in dets],
                     dtype=np.float32).reshape(-1, 4)
    inst.pred_boxes = Boxes(torch.from_numpy(boxes))
    inst.scores = torch.tensor([s for _, _, s in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([c for c, _, _ in dets], dtype=torch.int64)
    out = {"instances": inst}
    if defect_score is not None:
        out["defect_score"] = torch.tensor(defect_score)
    return out


def _run(name, outputs, **kw):
    ev = DefectEvaluator(name, distributed=False, **kw)
    ev.reset()
    for image_id, out in outputs.items():
        ev.process([{"image_id": image_id}], [out])
    return ev.evaluate()["defect"]


def _width_box(iou, x=0.0, y=0.0, w=100.0, h=100.0):
    """A box inside (x, y, w, h), same height, whose IoU with it is ``iou``."""
    return [x, y, w * iou, h]


# ----------------------------------------------------------------------------------------------- presets
def test_fabric_two_image_example():
    """Hand-computed: VOC AP over IoU 0.1/0.3/0.5, ACC and 0.2 * ACC + 0.8 * mAP."""
    gt_a = [(0, [0, 0, 100, 100]), (1, [200, 200, 100, 100])]
    name = _register("fabric_two", [_rec(1, gt_a), _rec(2, [])], ["hole", "stain"])
    outputs = {
        1: _output([(0, _width_box(0.4), 0.9), (1, _width_box(0.6, 200, 200), 0.3)]),
        2: _output([(0, [300, 50, 40, 40], 0.6)]),  # on the normal image
    }
    kw = dict(iou="fabric", ap_method="voc", acc_weight=0.2, map_weight=0.8)
    r = _run(name, outputs, image_score_threshold=0.5, **kw)
    # hole: TP then FP at IoU 0.1 and 0.3 (AP 1), two FPs at 0.5 (AP 0) -> 2/3; stain: AP 1 everywhere
    assert r["AP-hole"] == pytest.approx(200 / 3)
    assert r["AP-stain"] == pytest.approx(100)
    assert r["AP@0.1"] == pytest.approx(100) and r["AP@0.5"] == pytest.approx(50)
    assert r["mAP"] == pytest.approx(250 / 3)
    assert r["ACC"] == pytest.approx(50)  # the normal image has a 0.6 box -> wrongly "defective"
    assert r["score"] == pytest.approx(0.2 * 50 + 0.8 * 250 / 3)
    r = _run(name, outputs, image_score_threshold=0.7, **kw)
    assert r["ACC"] == pytest.approx(100)
    assert r["score"] == pytest.approx(0.2 * 100 + 0.8 * 250 / 3)


def test_bottle_rule_values_at_each_boundary():
    m = np.array([0, 39.9, 40, 100, 119.9, 120, 300, 419.9, 420, 2000])
    expected = [0.2, 0.2, 0.2, 0.5, 119.9 / 200, 0.6, 0.72, 419.9 / 1500 + 0.52, 0.8, 0.8]
    np.testing.assert_allclose(bottle_iou_threshold(m), expected)


@pytest.mark.parametrize("short_side", [39.0, 40.0, 119.0, 120.0, 419.0, 420.0])
def test_bottle_boxes_straddling_size_boundaries(short_side):
    """A detection just above the size-dependent threshold matches, one just below does not."""
    thr = {39.0: 0.2, 40.0: 0.2, 119.0: 0.595, 120.0: 0.6, 419.0: 419 / 1500 + 0.52, 420.0: 0.8}[short_side]
    gt = [0, 0, short_side, 900.0]  # the shorter side is the width
    name = _register("bottle_edge", [_rec(1, [(0, gt)], size=(1000, 1000))], ["cap"])
    for delta, ap in ((0.004, 100.0), (-0.004, 0.0)):
        out = _output([(0, [0, 0, short_side * (thr + delta), 900.0], 0.9)], size=(1000, 1000))
        assert _run(name, {1: out}, iou="bottle")["AP-cap"] == pytest.approx(ap), (short_side, delta)
    # with a fixed 0.5 threshold the same boxes behave differently: the rule depends on size
    out = _output([(0, [0, 0, short_side * 0.45, 900.0], 0.9)], size=(1000, 1000))
    assert _run(name, {1: out}, iou="bottle")["AP-cap"] == pytest.approx(100.0 if thr < 0.45 else 0.0)
    assert _run(name, {1: out}, iou="voc")["AP-cap"] == 0.0


def test_voc_and_coco_integration_by_hand():
    """2 GT, detections TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1."""
    gts = [(0, [0, 0, 100, 100]), (0, [200, 0, 100, 100])]
    name = _register("voc_hand", [_rec(1, gts)], ["spot"])
    out = {1: _output([(0, [0, 0, 100, 100], 0.9), (0, [400, 300, 50, 50], 0.8), (0, [200, 0, 100, 100], 0.7)])}
    assert _run(name, out, iou="voc", ap_method="voc")["mAP"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))
    # 101-point: recall points 0..0.5 (51 of them) at precision 1, 0.51..1 (50) at 2/3
    assert _run(name, out, iou="voc", ap_method="coco")["mAP"] == pytest.approx(100 * (51 + 50 * 2 / 3) / 101)


def test_coco_preset_and_custom_list_by_hand():
    name = _register("coco_hand", [_rec(1, [(0, [0, 0, 100, 100])])], ["spot"])
    out = {1: _output([(0, _width_box(0.72), 0.9)])}
    r = _run(name, out, iou="coco")
    assert r["mAP"] == pytest.approx(50.0)  # matches at 0.50..0.70 (5 of 10 thresholds)
    assert r["AP@0.7"] == pytest.approx(100.0) and r["AP@0.75"] == 0.0
    assert _run(name, out, iou=[0.3, 0.8])["mAP"] == pytest.approx(50.0)
    assert _run(name, out, iou="0.3, 0.7")["mAP"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------- pycocotools
def _random_coco(seed, num_images=120, num_classes=4, max_gt=6):
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(num_images):
        image_id = 7 * i + 3
        images.append({"id": image_id, "width": 300, "height": 200, "file_name": f"{i}.png"})
        gts = []
        for _ in range(rng.integers(0, max_gt)):  # some normal images
            c = int(rng.integers(0, num_classes - 1))  # the last class never has ground truth
            b = [rng.uniform(0, 250), rng.uniform(0, 150), rng.uniform(2, 60), rng.uniform(2, 60)]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c + 1, "bbox": b,
                         "area": b[2] * b[3], "iscrowd": int(rng.random() < 0.05)})
            gts.append((c, b))
        for _ in range(rng.integers(0, 2 * max_gt)):
            if gts and rng.random() < 0.7:
                c, b = gts[rng.integers(len(gts))]
                b = [b[0] + rng.normal(0, 2), b[1] + rng.normal(0, 2), b[2] * rng.uniform(0.7, 1.3),
                     b[3] * rng.uniform(0.7, 1.3)]
                if rng.random() < 0.1:
                    c = int(rng.integers(0, num_classes))
            else:
                c = int(rng.integers(0, num_classes))
                b = [rng.uniform(0, 250), rng.uniform(0, 150), rng.uniform(2, 60), rng.uniform(2, 60)]
            dets.append({"image_id": image_id, "category_id": c + 1, "bbox": b, "score": float(rng.random())})
    cats = [{"id": k + 1, "name": f"class{k}"} for k in range(num_classes)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _to_records(coco):
    per = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        per[a["image_id"]].append((a["category_id"] - 1, a["bbox"], a["iscrowd"]))
    return [_rec(i, anns) for i, anns in per.items()]


def _to_predictions(dets):
    per = {}
    for d in dets:
        per.setdefault(d["image_id"], []).append(d)
    return [{"image_id": i, "boxes": np.array([d["bbox"] for d in v]), "scores": np.array([d["score"] for d in v]),
             "classes": np.array([d["category_id"] - 1 for d in v])} for i, v in per.items()]


@pytest.mark.parametrize("seed,max_gt", [(0, 6), (1, 6), (2, 40)])
def test_coco_preset_matches_pycocotools(seed, max_gt):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_dict, dets = _random_coco(seed, max_gt=max_gt)  # max_gt 40: crowded images, several padding buckets
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_dict
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = [c["name"] for c in coco_dict["categories"]]
    res = evaluate_detections(_to_records(coco_dict), _to_predictions(dets), names, DefectEvalSettings())
    s = res.summary()
    assert 5 < ev.stats[0] * 100 < 95  # a meaningful AP, not a degenerate one
    assert s["mAP"] == pytest.approx(ev.stats[0] * 100, abs=0.01)
    assert s["AP@0.5"] == pytest.approx(ev.stats[1] * 100, abs=0.01)
    assert s["AP@0.75"] == pytest.approx(ev.stats[2] * 100, abs=0.01)
    # per class: COCOeval precision[T, R, K, area=all, maxDets=100]
    prec = ev.eval["precision"][:, :, :, 0, -1]
    for k, name in enumerate(names[:-1]):
        assert s[f"AP-{name}"] == pytest.approx(prec[:, :, k].mean() * 100, abs=0.01)
    assert math.isnan(s["AP-class3"]) and res.absent_classes == ["class3"]
    assert s["weighted_mAP"] == pytest.approx(s["mAP"])  # uniform weights


# ------------------------------------------------------------------------- edge cases, weights, contract
def test_normal_images_absent_classes_and_weights(caplog):
    recs = [_rec(1, [(0, [0, 0, 50, 50])]), _rec(2, [(1, [10, 10, 50, 50])]), _rec(3, []), _rec(4, [])]
    name = _register("weights_ds", recs, ["a", "b", "c"], weights=[0.5, 0.2, 0.3])
    outputs = {1: _output([(0, [0, 0, 50, 50], 0.9)]), 2: _output([(1, [300, 300, 20, 20], 0.8)]),
               3: _output([]), 4: _output([(2, [5, 5, 10, 10], 0.4)])}
    with caplog.at_level(logging.WARNING):
        r = _run(name, outputs, iou="voc")
    assert r["AP-a"] == pytest.approx(100) and r["AP-b"] == 0 and math.isnan(r["AP-c"])
    assert r["mAP"] == pytest.approx(50)
    # class c absent: weights renormalised over a and b
    assert r["weighted_mAP"] == pytest.approx(100 * 0.5 / 0.7)
    assert r["ACC"] == pytest.approx(100)  # both normal images below 0.5, both defective ones above
    assert "c" in caplog.text and "excluded" in caplog.text
    # config weights take precedence over the metadata
    assert _run(name, outputs, iou="voc", class_weights=[0.1, 0.9, 0.0])["weighted_mAP"] == pytest.approx(10)


def test_zero_detections():
    name = _register("zero_ds", [_rec(1, [(0, [0, 0, 50, 50])]), _rec(2, []), _rec(3, [])], ["a"])
    r = _run(name, {1: _output([]), 2: _output([]), 3: {}})
    assert r["mAP"] == 0 and r["AP-a"] == 0
    assert r["ACC"] == pytest.approx(200 / 3)  # the normal images are right, the defective one wrong


def test_model_defect_score_overrides_detection_scores():
    name = _register("imgscore_ds", [_rec(1, [(0, [0, 0, 50, 50])]), _rec(2, [])], ["a"])
    dets = {1: [(0, [0, 0, 50, 50], 0.3)], 2: [(0, [100, 100, 20, 20], 0.9)]}
    r = _run(name, {i: _output(d) for i, d in dets.items()})
    assert r["ACC"] == 0
    outputs = {1: _output(dets[1], defect_score=0.8), 2: _output(dets[2], defect_score=0.1)}
    r2 = _run(name, outputs)
    assert r2["ACC"] == 100
    # the box AP ignores the image score: FP (0.9) before TP (0.3) -> precision 1/2 at recall 1
    assert r["mAP"] == r2["mAP"] == pytest.approx(50)


def test_images_without_detections_are_never_defective_at_threshold_0():
    recs = [_rec(1, [(0, [0, 0, 50, 50])]), _rec(2, []), _rec(3, []), _rec(4, [(0, [0, 0, 50, 50])]),
            _rec(5, [])]
    name = _register("acc0_ds", recs, ["a"])
    # a normal image with no boxes, alone: right
    assert _run(name, {2: _output([])}, image_score_threshold=0.0)["ACC"] == pytest.approx(100)
    outputs = {1: _output([(0, [0, 0, 50, 50], 0.3)]), 2: _output([]), 3: {}, 4: _output([]),
               5: _output([(0, [100, 100, 20, 20], 0.0)])}
    # 1: defective, box 0.3 >= 0 (right); 2, 3: normal, no detections (right); 4: defective, no detections
    # (wrong); 5: normal with a submitted box, even of score 0 (wrong)
    assert _run(name, outputs, image_score_threshold=0.0)["ACC"] == pytest.approx(60)

    # the threshold tuner: a class threshold t keeps the boxes scoring > t (as the model's postprocessing)
    preds = _to_predictions([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.3},
                             {"image_id": 5, "category_id": 1, "bbox": [100, 100, 20, 20], "score": 0.0}])
    settings = DefectEvalSettings(image_score_threshold=0.0)
    res = evaluate_detections(recs, preds, ["a"], settings)
    scorer = ThresholdScorer(res)
    assert res.acc == pytest.approx(60) and scorer.accuracy([-np.inf]) == pytest.approx(60)
    for t, acc in ((0.0, 80), (0.3, 60)):  # 0.0 drops image 5's box; 0.3 drops image 1's box as well
        kept = [dict(p, boxes=p["boxes"][p["scores"] > t], scores=p["scores"][p["scores"] > t],
                     classes=p["classes"][p["scores"] > t]) for p in preds]
        assert evaluate_detections(recs, kept, ["a"], settings).acc == pytest.approx(acc)
        assert scorer.accuracy([t]) == pytest.approx(acc), t


@pytest.mark.parametrize("score_map", ["weighted_mAP", "mAP"])
def test_score_map_chooses_the_mean_in_score(score_map):
    recs = [_rec(1, [(0, [0, 0, 50, 50]), (1, [100, 0, 50, 50])]),
            _rec(2, [(2, [0, 0, 50, 50]), (2, [100, 100, 50, 50])]), _rec(3, [])]
    name = _register("score_map_ds", recs, ["a", "b", "c"], weights=[0.6, 0.3, 0.1])
    dets = {1: [(0, [0, 0, 50, 50], 0.9), (1, [300, 300, 20, 20], 0.8)], 2: [(2, [0, 0, 50, 50], 0.7)],
            3: [(1, [10, 10, 20, 20], 0.6)]}
    outputs = {i: _output(d) for i, d in dets.items()}
    cfg = add_defects_config(get_cfg())
    cfg.merge_from_list(["TEST.DEFECT_EVAL.IOU", "voc", "TEST.DEFECT_EVAL.AP_METHOD", "voc",
                         "TEST.DEFECT_EVAL.ACC_WEIGHT", "0.2", "TEST.DEFECT_EVAL.MAP_WEIGHT", "0.8",
                         "TEST.DEFECT_EVAL.SCORE_MAP", score_map])
    r = _run(name, outputs, cfg=cfg)
    # a: AP 100; b: two false boxes, AP 0; c: 1 of 2 boxes at precision 1, VOC AP 50
    assert (r["AP-a"], r["AP-b"], r["AP-c"]) == (pytest.approx(100), 0, pytest.approx(50))
    assert r["mAP"] == pytest.approx(50)
    assert r["weighted_mAP"] == pytest.approx(0.6 * 100 + 0.3 * 0 + 0.1 * 50)
    assert r["ACC"] == pytest.approx(200 / 3)  # image 3 (normal) has a 0.6 box
    expected_map = 65 if score_map == "weighted_mAP" else 50
    assert r["score"] == pytest.approx(0.2 * 200 / 3 + 0.8 * expected_map)
    # the threshold tuner scores with the same mean
    preds = _to_predictions([{"image_id": i, "category_id": c + 1, "bbox": b, "score": sc}
                             for i, d in dets.items() for c, b, sc in d])
    res = evaluate_detections(recs, preds, ["a", "b", "c"], defect_eval_settings(cfg),
                              metadata_weights=[0.6, 0.3, 0.1])
    assert res.score == pytest.approx(r["score"])
    assert ThresholdScorer(res).score([-np.inf] * 3) == pytest.approx(r["score"])


def test_per_class_table_is_logged(caplog):
    recs = [_rec(1, [(0, [0, 0, 50, 50])]), _rec(2, [(1, [10, 10, 50, 50])]), _rec(3, [])]
    name = _register("table_ds", recs, ["a", "b", "c"], weights=[0.5, 0.2, 0.3])
    outputs = {1: _output([(0, [0, 0, 50, 50], 0.9)]),
               2: _output([(1, [300, 300, 20, 20], 0.8), (1, [10, 10, 50, 50], 0.4)]), 3: _output([])}
    log = logging.getLogger("d2_defects.evaluation.defect_evaluator")
    log.addHandler(caplog.handler)  # also when an earlier setup_logger stopped propagation
    try:
        with caplog.at_level(logging.INFO, logger=log.name):
            _run(name, outputs, iou="fabric")
    finally:
        log.removeHandler(caplog.handler)
    lines = caplog.text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| class"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, sep, rows = table[0], table[1], table[2:]
    assert header == ["class", "AP", "AP@0.1", "AP@0.3", "AP@0.5", "weight", "#GT", "#det", "recall"]
    assert all(set(c) <= set(":-") for c in sep)
    assert [r[0] for r in rows] == ["a", "b", "c"]  # one row per class, dataset order
    values = {r[0]: [float(v) for v in r[1:]] for r in rows}
    np.testing.assert_allclose(values["a"], [100, 100, 100, 100, 0.5, 1, 1, 100])
    # b: a false box (0.8) before the true one (0.4): precision 1/2 at recall 1, 101-point AP 50
    np.testing.assert_allclose(values["b"], [50, 50, 50, 50, 0.2, 1, 2, 100])
    assert all(math.isnan(v) for v in values["c"][:4] + values["c"][-1:]) and values["c"][4:7] == [0.3, 0, 0]


def test_outputs_written(tmp_path):
    name = _register("files_ds", [_rec(1, [(0, [0, 0, 50, 50])]), _rec(2, [])], ["a", "b"])
    ev = DefectEvaluator(name, output_dir=str(tmp_path), distributed=False)
    ev.reset()
    ev.process([{"image_id": 1}, {"image_id": 2}], [_output([(0, [0, 0, 50, 50], 0.9)]), _output([], 0.2)])
    ev.evaluate()
    metrics = json.loads((tmp_path / "defect_metrics.json").read_text())
    assert metrics["absent_classes"] == ["b"] and metrics["num_normal_images"] == 1
    assert [r["num_gt"] for r in metrics["per_class"]] == [1, 0]
    raw = json.loads((tmp_path / "defect_detections.json").read_text())
    assert {e["image_id"]: e["defect_score"] for e in raw} == {1: None, 2: pytest.approx(0.2)}
    assert raw[0]["instances"][0]["category_id"] == 1 and raw[0]["instances"][0]["bbox"] == [0, 0, 50, 50]


@pytest.mark.parametrize("key,value,message", [
    ("IOU", "cocoo", "TEST.DEFECT_EVAL.IOU"),
    ("IOU", [0.5, 1.5], "TEST.DEFECT_EVAL.IOU"),
    ("AP_METHOD", "area", "TEST.DEFECT_EVAL.AP_METHOD"),
    ("CLASS_WEIGHTS", [0.5, 0.5], "TEST.DEFECT_EVAL.CLASS_WEIGHTS"),
    ("CLASS_WEIGHTS", [-1.0, 1.0, 1.0], "TEST.DEFECT_EVAL.CLASS_WEIGHTS"),
    ("IMAGE_SCORE_THRESHOLD", 1.5, "TEST.DEFECT_EVAL.IMAGE_SCORE_THRESHOLD"),
    ("ACC_WEIGHT", -0.2, "TEST.DEFECT_EVAL.ACC_WEIGHT"),
    ("SCORE_MAP", "weighted", "TEST.DEFECT_EVAL.SCORE_MAP"),
])
def test_config_errors_name_the_key(key, value, message):
    name = _register("cfg_ds", [_rec(1, [])], ["a", "b", "c"])
    cfg = add_defects_config(get_cfg())
    cfg.TEST.DEFECT_EVAL[key] = value
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        DefectEvaluator(name, cfg)


def test_config_accepts_preset_name_or_list():
    name = _register("cfg_ok", [_rec(1, [(0, [0, 0, 100, 100])])], ["a"])
    for opts, labels in ((["TEST.DEFECT_EVAL.IOU", "fabric"], ["0.1", "0.3", "0.5"]),
                         (["TEST.DEFECT_EVAL.IOU", "[0.25, 0.75]"], ["0.25", "0.75"])):
        cfg = add_defects_config(get_cfg())
        cfg.merge_from_list(opts)
        ev = DefectEvaluator(name, cfg, distributed=False)
        assert ev._settings.iou.labels == labels


# ----------------------------------------------------------------------------------------- distributed
def _dist_worker(out_file):
    from detectron2.utils import comm

    coco_dict, dets = _random_coco(5, num_images=40)
    name = _register("dist_ds", _to_records(coco_dict), [c["name"] for c in coco_dict["categories"]])
    preds = {p["image_id"]: p for p in _to_predictions(dets)}
    ev = DefectEvaluator(name, iou="fabric")  # distributed=True
    ev.reset()
    for i, im in enumerate(coco_dict["images"]):
        if i % comm.get_world_size() != comm.get_rank():
            continue
        p = preds.get(im["id"])
        dl = [] if p is None else [(int(c), list(b), float(s)) for b, s, c in zip(p["boxes"], p["scores"], p["classes"])]
        ev.process([{"image_id": im["id"]}], [_output(dl)])
    res = ev.evaluate()
    with open(f"{out_file}.{comm.get_rank()}", "w") as f:
        json.dump({"world": comm.get_world_size(), "res": res}, f)


def test_distributed_gathering_on_two_cpu_processes(tmp_path):
    from detectron2.engine import launch

    out = str(tmp_path / "res")
    launch(_dist_worker, 2, dist_url="auto", args=(out,))
    r0 = json.loads(open(out + ".0").read())
    r1 = json.loads(open(out + ".1").read())
    assert r0["world"] == 2 and r1["res"] == {}  # only the main process reports
    coco_dict, dets = _random_coco(5, num_images=40)
    names = [c["name"] for c in coco_dict["categories"]]
    single = evaluate_detections(_to_records(coco_dict), _to_predictions(dets), names,
                                 DefectEvalSettings(iou="fabric")).summary()
    for k, v in single.items():
        assert r0["res"]["defect"][k] == pytest.approx(v, abs=1e-6, nan_ok=True), k


# ---------------------------------------------------------------------------------------------- trainer
def test_trainer_adds_defect_evaluator_per_dataset(synthetic_root, tmp_path):
    from conftest import SMALL_CONFIG, TINY_OPTS
    from d2_defects.evaluation import FastCOCOEvaluator as COCOEvaluator

    from d2_defects.engine.launch import load_config
    from d2_defects.engine.trainer import Trainer

    cfg = load_config(SMALL_CONFIG, TINY_OPTS + ["DATASETS.TEST", "('tiny_defects_val', 'tiny_defects_train')",
                                                 "OUTPUT_DIR", str(tmp_path), "TEST.DEFECT_EVAL.IOU", "fabric"])
    ev = Trainer.build_evaluator(cfg, "tiny_defects_val")
    assert [type(e) for e in ev._evaluators] == [COCOEvaluator, DefectEvaluator]
    cfg.TEST.DEFECT_EVAL.ENABLED = False
    assert [type(e) for e in Trainer.build_evaluator(cfg, "tiny_defects_val")._evaluators] == [COCOEvaluator]
    cfg.TEST.DEFECT_EVAL.ENABLED = True
    folders = {ds: Trainer.build_evaluator(cfg, ds)._evaluators[1]._output_dir for ds in cfg.DATASETS.TEST}
    assert folders["tiny_defects_val"] != folders["tiny_defects_train"]

    cfg.DATASETS.TEST = ("tiny_defects_val",)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    results = Trainer.test(cfg, model)  # one dataset: {task: metrics}
    assert {"mAP", "weighted_mAP", "ACC", "score", "AP@0.1", "AP-hole"} <= set(results["defect"])
    for ds in cfg.DATASETS.TEST:
        folder = tmp_path / "inference" / ds
        metrics = json.loads((folder / "defect_metrics.json").read_text())
        assert metrics["num_images"] == len(DatasetCatalog.get(ds))
        assert metrics["settings"]["class_weights"] == f"thing_class_weights of {ds}"
        assert (folder / "defect_detections.json").exists()
    assert "defect" in json.loads((tmp_path / "eval_results.json").read_text())


@pytest.mark.parametrize("record", [
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5], "score": 0.5},
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, float("nan")], "score": 0.5},
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]},
])
def test_both_results_readers_share_one_check(tmp_path, synthetic_root, record):
    """tools/ensemble.py (load_results) and tools/analyze_results.py (load_predictions) reject the same records."""
    from d2_defects.evaluation import load_predictions
    from d2_defects.evaluation.results import ResultsFileError, load_results

    path = tmp_path / "r.json"
    good = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}
    path.write_text(json.dumps([good, record]))
    with pytest.raises(ResultsFileError, match=f"{path}: detection 1 is not"):
        load_results(str(path))
    with pytest.raises(ResultsFileError, match=f"{path}: image id 1, detection 1 is not"):
        load_predictions(str(path), "tiny_defects_val")
    path.write_text(json.dumps([good]))
    assert load_results(str(path)) == [good]
    assert len(load_predictions(str(path), "tiny_defects_val")[0]["boxes"]) == 1
