"""Inference for users: test-time augmentation, merging/ensembling, predict/ensemble/export tools."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.modeling import build_model

from conftest import ROOT, SMALL_CONFIG, TINY_OPTS, run_train_net
from d2_defects.checkpoint import DefectCheckpointer
from d2_defects.engine.launch import load_config
from d2_defects.inference.ensemble import ensemble_results, evaluate_results
from d2_defects.modeling.merge import merge_detections
from d2_defects.modeling.postprocess import PostprocessParams
from d2_defects.modeling.tta import DefectTTA

IDENTITY_TTA = ["TEST.AUG.MIN_SIZES", "(96,)", "TEST.AUG.MAX_SIZE", "160", "TEST.AUG.FLIP", "False"]
RETINANET = ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
             "MODEL.RETINANET.NUM_CLASSES", "6",
             # a fresh RetinaNet scores ~0.01 (prior probability); the merge uses the ROI_HEADS threshold
             "MODEL.RETINANET.SCORE_THRESH_TEST", "0.005", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.005"]


def _cfg(*opts):
    return load_config(SMALL_CONFIG, TINY_OPTS + list(opts))


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, opts in (("cascade", []), ("retinanet", RETINANET)):
        torch.manual_seed(0)
        out[name] = build_model(_cfg(*opts)).eval()
    return out


@pytest.fixture(scope="module")
def checkpoint(models, tmp_path_factory):
    """A randomly initialised small Cascade R-CNN checkpoint (no training needed to test the plumbing)."""
    d = tmp_path_factory.mktemp("ckpt")
    DefectCheckpointer(models["cascade"], save_dir=str(d)).save("model_random")
    return d / "model_random.pth"


@pytest.fixture(scope="module")
def val_records(synthetic_root):
    return DatasetCatalog.get("tiny_defects_val")


def _run_tool(tool, args, datasets_root, timeout=600):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool)] + [str(a) for a in args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _tool(name):
    """Import ``tools/<name>.py`` as a module, to call its ``main(argv)`` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sorted(inst):
    """(boxes, scores, classes) as numpy, in a canonical order."""
    b, s, c = inst.pred_boxes.tensor.numpy(), inst.scores.numpy(), inst.pred_classes.numpy()
    order = np.lexsort((b[:, 1], b[:, 0], c, -np.round(s, 4)))
    return b[order], s[order], c[order]


def _assert_same(a, b, atol=1e-3):
    assert len(a) == len(b) and len(a) > 0
    (ba, sa, ca), (bb, sb, cb) = _sorted(a), _sorted(b)
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_allclose(sa, sb, atol=1e-5)
    np.testing.assert_allclose(ba, bb, atol=atol)


# ---------------------------------------------------------------------------------------------------------
# test-time augmentation


# box models (TTA of mask models: test_masks.py; DefectSOLO's config error: test_solo.py)
SYNTHETIC_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "synthetic", "*.yaml"))
                           if "MASK_ON: True" not in open(p).read())


@pytest.mark.parametrize("config", SYNTHETIC_CONFIGS + ["retinanet"], ids=lambda v: os.path.basename(str(v)))
def test_tta_with_identity_transform_equals_plain_inference(models, val_records, config):
    """
    Every meta-architecture of the project's configs (and Detectron2's one-stage RetinaNet). With a single
    view nothing is merged, so TEST.AUG.MERGE plays no part here (multi-view merges are tested below).
    """
    if config == "retinanet":
        cfg, model = _cfg(*RETINANET, *IDENTITY_TTA), models["retinanet"]
    else:
        cfg = load_config(config, TINY_OPTS + IDENTITY_TTA)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
    recs = val_records[:2]
    plain_inputs = [DatasetMapper(cfg, is_train=False)(r) for r in recs]  # resized by the test mapper
    full_inputs = [DatasetMapper(cfg, is_train=False, augmentations=[])(r) for r in recs]  # full resolution
    assert full_inputs[0]["image"].shape != plain_inputs[0]["image"].shape
    with torch.no_grad():
        plain = [model([x])[0] for x in plain_inputs]  # one at a time, as TTA runs them
        tta = DefectTTA(cfg, model).eval()(full_inputs)
    for p, t, r in zip(plain, tta, recs):
        assert t["instances"].image_size == (r["height"], r["width"])
        _assert_same(p["instances"], t["instances"])


@pytest.mark.parametrize("flip_key", ["TEST.AUG.FLIP", "TEST.AUG.VFLIP"])
def test_tta_flips_are_mapped_back(models, val_records, flip_key):
    """With {identity, flip}, TTA of the mirrored image is the mirror of TTA of the image."""
    cfg = _cfg(*IDENTITY_TTA, flip_key, "True")
    tta = DefectTTA(cfg, models["cascade"]).eval()
    assert len(tta.augmentations()) == 2
    inp = DatasetMapper(cfg, is_train=False, augmentations=[])(val_records[0])
    h, w = inp["height"], inp["width"]
    dim = -1 if flip_key == "TEST.AUG.FLIP" else -2
    mirrored = dict(inp, image=inp["image"].flip(dim))
    a, b = (out["instances"] for out in tta([inp, mirrored]))
    bb = b.pred_boxes.tensor.clone()
    if dim == -1:
        bb[:, [0, 2]] = w - bb[:, [2, 0]]
    else:
        bb[:, [1, 3]] = h - bb[:, [3, 1]]
    b.pred_boxes.tensor = bb
    _assert_same(a, b)
    # the flipped view really contributes: plain identity-only TTA gives a different result
    only_identity = DefectTTA(_cfg(*IDENTITY_TTA), models["cascade"]).eval()([inp])[0]["instances"]
    assert not (len(only_identity) == len(a) and torch.allclose(only_identity.scores, a.scores))


# the merge keeps up to 1000 detections: the two views' 2 x 100 never hit the cap
TWO_VIEWS = ["TEST.AUG.MIN_SIZES", "(96,)", "TEST.AUG.MAX_SIZE", "160", "TEST.AUG.FLIP", "True",
             "TEST.DETECTIONS_PER_IMAGE", "1000"]


def _views(model, inp, min_size=96, max_size=160):
    """Per-view detections, computed here: (identity, horizontal flip) at one size, flip undone."""
    from detectron2.data.transforms import ResizeShortestEdge

    hwc = inp["image"].permute(1, 2, 0).numpy()
    img = torch.as_tensor(ResizeShortestEdge(min_size, max_size).get_transform(hwc).apply_image(hwc).copy())
    img = img.permute(2, 0, 1)
    h, w = inp["height"], inp["width"]
    with torch.no_grad():
        outs = model([{"image": img, "height": h, "width": w}, {"image": img.flip(-1).contiguous(), "height": h,
                                                               "width": w}])
    a, b = (o["instances"] for o in outs)
    bb = b.pred_boxes.tensor.clone()
    bb[:, [0, 2]] = w - bb[:, [2, 0]]
    return [a.pred_boxes.tensor, bb], [a.scores, b.scores], [a.pred_classes, b.pred_classes]


def _instances(image_size, boxes, scores, classes):
    from detectron2.structures import Boxes, Instances

    return Instances(image_size, pred_boxes=Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
                     scores=torch.as_tensor(scores, dtype=torch.float32),
                     pred_classes=torch.as_tensor(classes).round().long())


@pytest.mark.parametrize("model_name,method", [("cascade", "soft_nms"), ("cascade", "wbf"),
                                               ("retinanet", "soft_nms"), ("retinanet", "wbf")])
def test_tta_two_views_merge_like_the_oracles(models, val_records, model_name, method):
    """
    {identity, horizontal flip}: DefectTTA's output is the merge of the per-view detections, compared with
    ``ensemble_boxes.weighted_boxes_fusion`` ("wbf") and the project's ``merge_detections`` ("soft_nms").
    """
    from ensemble_boxes import weighted_boxes_fusion

    extra = RETINANET if model_name == "retinanet" else []
    cfg = _cfg(*extra, *TWO_VIEWS, "TEST.AUG.MERGE", method)
    model = models[model_name]
    tta = DefectTTA(cfg, model).eval()
    assert tta.augmentations() == [(96, False, False), (96, True, False)]
    params = PostprocessParams.from_config(cfg)
    for rec in val_records[:2]:
        inp = DatasetMapper(cfg, is_train=False, augmentations=[])(rec)
        h, w = inp["height"], inp["width"]
        boxes, scores, classes = _views(model, inp)
        assert min(len(b) for b in boxes) > 0
        out = tta([inp])[0]["instances"]
        if method == "wbf":
            scale = np.array([w, h, w, h], dtype=np.float64)
            ob, os_, oc = weighted_boxes_fusion(
                [np.clip(b.double().numpy() / scale, 0, 1) for b in boxes], [s.double().numpy() for s in scores],
                [c.numpy() for c in classes], weights=[1.0, 1.0], iou_thr=cfg.TEST.AUG.WBF_IOU_THRESH,
                skip_box_thr=params.score_thresh)
            k = params.topk_per_image
            expected = _instances((h, w), ob[:k] * scale, os_[:k], oc[:k])
            # fusion really happened: fewer boxes than the two views together
            assert len(expected) < sum(len(b) for b in boxes)
        else:
            expected = _instances((h, w), *merge_detections(boxes, scores, classes, (h, w), "soft_nms", params))
            hard = merge_detections(boxes, scores, classes, (h, w), "nms", params)
            assert len(hard[0]) < len(expected)  # soft-NMS keeps (decayed) duplicates that hard NMS drops
        assert out.image_size == (h, w)
        _assert_same(out, expected)


def test_tta_nms_merge_uses_soft_nms_when_enabled(models, val_records):
    """MERGE "nms" follows MODEL.SOFT_NMS.ENABLED: the same detector, merged with soft-NMS or with hard NMS."""
    model = models["cascade"]
    soft = DefectTTA(_cfg(*TWO_VIEWS, "TEST.AUG.MERGE", "nms", "MODEL.SOFT_NMS.ENABLED", "True"), model).eval()
    hard = DefectTTA(_cfg(*TWO_VIEWS, "TEST.AUG.MERGE", "nms"), model).eval()
    params = PostprocessParams.from_config(_cfg(*TWO_VIEWS))
    assert soft.params.soft_nms and not hard.params.soft_nms
    inp = DatasetMapper(_cfg(), is_train=False, augmentations=[])(val_records[0])
    h, w = inp["height"], inp["width"]
    views = _views(model, inp)
    with_soft = _instances((h, w), *merge_detections(*views, (h, w), "soft_nms", params))
    with_hard = _instances((h, w), *merge_detections(*views, (h, w), "nms", params))
    assert len(with_hard) < len(with_soft)
    _assert_same(soft([inp])[0]["instances"], with_soft)
    _assert_same(hard([inp])[0]["instances"], with_hard)


class _WithImageScore(torch.nn.Module):
    """A detector that also outputs an image-level score (here: the mean of its input image / 255)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        outs = self.model(inputs)
        return [dict(o, defect_score=float(x["image"].float().mean() / 255)) for o, x in zip(outs, inputs)]


def test_tta_averages_image_level_scores(models, val_records):
    from detectron2.data.transforms import ResizeShortestEdge

    cfg = _cfg("TEST.AUG.MIN_SIZES", "(96, 128)", "TEST.AUG.MAX_SIZE", "200", "TEST.AUG.FLIP", "True")
    inp = DatasetMapper(cfg, is_train=False, augmentations=[])(val_records[0])
    out = DefectTTA(cfg, _WithImageScore(models["cascade"])).eval()([inp])[0]
    hwc = inp["image"].permute(1, 2, 0).numpy()
    # a flip does not change the mean: the score is the mean over the two sizes
    means = [ResizeShortestEdge(s, 200, "choice").get_transform(hwc).apply_image(hwc).mean() / 255 for s in (96, 128)]
    assert out["defect_score"] == pytest.approx(float(np.mean(means)), abs=1e-6)
    assert len(out["instances"]) > 0


def test_tta_config_errors_name_the_key(models):
    for key, value in (("TEST.AUG.MERGE", "mean"), ("TEST.AUG.MIN_SIZES", "()"), ("TEST.AUG.WBF_IOU_THRESH", "1.5")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            DefectTTA(_cfg(key, value), models["cascade"])


# ---------------------------------------------------------------------------------------------------------
# merging and ensembles


def _random_detections(seed, n=60, classes=3, size=200.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.75
    wh = torch.rand(n, 2, generator=g) * size * 0.2 + 4  # boxes stay inside the image
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g) * 0.9 + 0.05
    cls = torch.randint(0, classes, (n,), generator=g)
    return boxes, scores, cls


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_merge_matches_ensemble_boxes(seed):
    from ensemble_boxes import nms

    size = 200.0
    dets = [_random_detections(seed * 10 + k, size=size) for k in range(2)]
    params = PostprocessParams(score_thresh=0.0, nms_thresh=0.5, topk_per_image=1000)
    b, s, c = merge_detections(*zip(*dets), (size, size), "nms", params)
    ob, os_, oc = nms([(d[0] / size).numpy() for d in dets], [d[1].numpy() for d in dets],
                      [d[2].numpy() for d in dets], iou_thr=0.5)
    ours = sorted(zip(c.tolist(), np.round(b.numpy() / size, 4).tolist()))
    oracle = sorted(zip(oc.astype(int).tolist(), np.round(ob, 4).tolist()))
    assert ours == oracle


@pytest.mark.parametrize("method", ["wbf", "nms", "soft_nms"])
def test_ensemble_of_results_with_itself_returns_its_boxes(method):
    """A COCO results list (already NMS'd per class at IoU 0.5), ensembled with itself."""
    params = PostprocessParams(score_thresh=0.0, nms_thresh=0.5, topk_per_image=1000)
    results = []
    for image_id in (3, 8):
        b, s, c = _random_detections(image_id)
        b, s, c = merge_detections([b], [s], [c], (200, 200), "nms", params)
        results += [{"image_id": image_id, "category_id": int(ci) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "score": float(si)} for (x1, y1, x2, y2), si, ci in zip(b.tolist(), s.tolist(), c.tolist())]
    merged = ensemble_results([results, results], method=method, iou_thresh=0.55, max_dets=1000)
    key = lambda d: (d["image_id"], d["category_id"], round(d["bbox"][0], 2), round(d["bbox"][1], 2))
    a, m = sorted(results, key=key), sorted(merged, key=key)
    assert len(a) == len(m) > 50
    assert [key(d) for d in a] == [key(d) for d in m]
    np.testing.assert_allclose([d["bbox"] for d in a], [d["bbox"] for d in m], atol=1e-3)
    sa, sm = np.array([d["score"] for d in a]), np.array([d["score"] for d in m])
    if method == "soft_nms":  # the duplicates are suppressed; overlapping neighbours may be decayed
        assert np.all(sm <= sa + 1e-6)
    else:
        np.testing.assert_allclose(sm, sa, atol=1e-6)


def test_wbf_fuses_shifted_copies_and_weights_count():
    """Two models, box shifted by 2 px: one fused box at the weighted mean."""
    b1 = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    b2 = b1 + 2
    params = PostprocessParams(score_thresh=0.0, nms_thresh=0.5, topk_per_image=10)
    b, s, c = merge_detections([b1, b2], [torch.tensor([0.9]), torch.tensor([0.6])],
                               [torch.tensor([1]), torch.tensor([1])], (100, 100), "wbf", params, weights=[3, 1])
    expected = (3 * 0.9 * b1 + 1 * 0.6 * b2) / (3 * 0.9 + 0.6)
    assert len(b) == 1 and c.tolist() == [1]
    torch.testing.assert_close(b, expected, atol=1e-4, rtol=0)
    assert s.item() == pytest.approx((3 * 0.9 + 0.6) / 4, abs=1e-5)


def _gt_results(dataset_name):
    meta = MetadataCatalog.get(dataset_name)
    inv = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    out = []
    for r in DatasetCatalog.get(dataset_name):
        for a in r["annotations"]:
            out.append({"image_id": r["image_id"], "category_id": inv[a["category_id"]],
                        "bbox": [float(v) for v in a["bbox"]], "score": 1.0})
    return out


def test_ensemble_tool_evaluates_and_protects_output(synthetic_root, tmp_path, capsys):
    gt = _gt_results("tiny_defects_val")
    assert evaluate_results(gt, "tiny_defects_val")["AP"] == pytest.approx(100.0)
    (tmp_path / "a.json").write_text(json.dumps(gt))
    out = tmp_path / "merged.json"
    args = [tmp_path / "a.json", tmp_path / "a.json", "--weights", "2", "1", "--method", "wbf", "-o", out,
            "--dataset", "synthetic_defects_val"]
    proc = _run_tool("ensemble.py", args, synthetic_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(out.read_text())
    assert len(merged) == len(gt)
    table = [l for l in proc.stdout.splitlines() if l.startswith("| merged (wbf) |")]
    assert table and table[0].split("|")[2].strip() == "100.00"
    header = [l for l in proc.stdout.splitlines() if l.startswith("| results |")][0]
    assert {"AP", "defect/mAP", "defect/ACC", "defect/score"} <= {c.strip() for c in header.split("|")}
    before = out.read_text()
    ensemble = _tool("ensemble")
    assert ensemble.main([str(a) for a in args[:-1]] + ["tiny_defects_val"]) == 2
    err = capsys.readouterr().err
    assert f"ERROR: {out} exists (use --overwrite" in err and out.read_text() == before
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": 1, "bbox": [1, 2, 3]}]))
    assert ensemble.main([str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ERROR: {tmp_path / 'bad.json'}: detection 0") and len(err.splitlines()) == 1


def test_ensemble_tool_prints_the_defect_evaluator_metrics(synthetic_root, tmp_path, capsys):
    """The --dataset table holds what DefectEvaluator computes on the same detections (here imperfect ones)."""
    from detectron2.structures import Boxes, Instances

    from d2_defects.evaluation import DefectEvaluator

    name = "tiny_defects_val"
    records = DatasetCatalog.get(name)
    # every other ground-truth box, none on the first image (a missed defect image for ACC), with varied scores
    dets = [dict(d, score=0.3 + 0.6 * (i % 5) / 4) for i, d in enumerate(_gt_results(name)[::2])
            if d["image_id"] != records[0]["image_id"]]
    (tmp_path / "b.json").write_text(json.dumps(dets))
    assert _tool("ensemble").main([str(tmp_path / "b.json"), "-o", str(tmp_path / "m.json"), "--dataset", name]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in next(l for l in lines if l.startswith("| results |")).split("|")]
    row = [c.strip() for c in next(l for l in lines if l.startswith(f"| {tmp_path / 'b.json'} |")).split("|")]
    table = dict(zip(header, row))

    id_map = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    evaluator = DefectEvaluator(name)
    evaluator.reset()
    for r in records:
        mine = [d for d in dets if d["image_id"] == r["image_id"]]
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]).reshape(-1, 4)
        inst = Instances((r["height"], r["width"]), pred_boxes=Boxes(xyxy.float()),
                         scores=torch.tensor([d["score"] for d in mine]).float(),
                         pred_classes=torch.tensor([id_map[d["category_id"]] for d in mine], dtype=torch.int64))
        evaluator.process([r], [{"instances": inst}])
    expected = evaluator.evaluate()["defect"]
    assert expected["ACC"] < 100 and expected["mAP"] < 100
    for k in ("mAP", "weighted_mAP", "ACC", "score"):
        assert float(table[f"defect/{k}"]) == pytest.approx(expected[k], abs=0.006), k


# ---------------------------------------------------------------------------------------------------------
# tools: predict, train_net --eval-only with TTA


def test_draw_boxes_large_image_is_drawn_at_1600px():
    from detectron2.data.catalog import Metadata

    from d2_defects.utils.visualize import draw_boxes

    image = np.zeros((3000, 4096, 3), dtype=np.uint8)
    box = [1000.0, 800.0, 3000.0, 2400.0]
    vis = draw_boxes(image, np.array([box]), ["scratch 0.90"], Metadata(), [0])
    scale = 1600 / 4096
    assert vis.shape == (round(3000 * scale), 1600, 3)
    # the box outline is drawn at the scaled position: on the scaled left edge, not inside the box
    x1, y1, x2, y2 = (round(v * scale) for v in box)
    assert vis[(y1 + y2) // 2, x1 - 2:x1 + 3].any()
    assert not vis[(y1 + y2) // 2, (x1 + x2) // 2].any()


def test_predict_writes_defect_rcnn_image_scores(synthetic_root, val_records, tmp_path, capsys):
    config = os.path.join(ROOT, "configs", "synthetic", "defect_rcnn_r18_cpu.yaml")
    cfg = load_config(config, TINY_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    DefectCheckpointer(model, save_dir=str(tmp_path)).save("model_random")
    images = tmp_path / "images"
    images.mkdir()
    for r in val_records[:2]:
        shutil.copy(r["file_name"], images)
    out = tmp_path / "out"
    args = ["--config-file", config, "--input", images, "--output", out, "--dataset", "tiny_defects_val",
            *TINY_OPTS, "MODEL.WEIGHTS", tmp_path / "model_random.pth"]
    assert _tool("predict").main([str(a) for a in args]) == 0, capsys.readouterr().err[-3000:]
    info = {os.path.basename(i["file_name"]): i for i in json.loads((out / "images.json").read_text())["images"]}
    assert len(info) == 2
    for r in val_records[:2]:
        with torch.no_grad():
            eager = model([DatasetMapper(cfg, is_train=False)(r)])[0]["defect_score"]
        assert info[os.path.basename(r["file_name"])]["defect_score"] == pytest.approx(eager, abs=1e-5)



def test_predict_folder_with_corrupt_files(synthetic_root, checkpoint, models, val_records, tmp_path, capsys):
    from pycocotools.coco import COCO

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    recs = val_records[:3]
    for r in recs[:2]:
        shutil.copy(r["file_name"], images)
    shutil.copy(recs[2]["file_name"], images / "sub")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (images / "truncated.png").write_bytes(open(recs[0]["file_name"], "rb").read()[:300])
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    args = ["--config-file", SMALL_CONFIG, "--input", images, "--output", out, "--batch-size", "2", "--draw",
            "--draw-threshold", "0.0", *TINY_OPTS, "MODEL.WEIGHTS", checkpoint]
    proc = _run_tool("predict.py", args, synthetic_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert sorted(os.path.basename(l.split("\t")[0]) for l in skipped) == ["corrupt.png", "truncated.png"]
    assert proc.stderr.count("WARNING: skipped") == 2

    info = json.loads((out / "images.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert sorted(os.path.basename(i["file_name"]) for i in info["images"]) == sorted(
        os.path.basename(r["file_name"]) for r in recs)
    gt = COCO()
    gt.dataset = dict(info, annotations=[])
    gt.createIndex()
    assert len(gt.loadRes(results).getAnnIds()) == len(results) > 0  # ids and categories are consistent
    # category ids are the dataset's (non-contiguous) ids
    meta = MetadataCatalog.get("tiny_defects_val")
    assert {d["category_id"] for d in results} <= set(meta.thing_dataset_id_to_contiguous_id)
    assert not any("defect_score" in i for i in info["images"])  # the cascade model has no image-level score
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == len(results) + 1
    assert len(list((out / "vis").glob("*.png"))) == 3

    # same detections as the model run directly through the test mapper
    cfg = _cfg()
    first = next(i for i in info["images"] if os.path.basename(i["file_name"]) == os.path.basename(recs[0]["file_name"]))
    with torch.no_grad():
        direct = models["cascade"]([DatasetMapper(cfg, is_train=False)(recs[0])])[0]["instances"]
    mine = [d for d in results if d["image_id"] == first["id"]]
    assert len(mine) == len(direct)
    np.testing.assert_allclose(sorted(d["score"] for d in mine), sorted(direct.scores.tolist()), atol=1e-4)

    # no clobbering without --overwrite (in this process: the tool's main)
    before = (out / "results.json").read_bytes()
    predict = _tool("predict")
    assert predict.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("ERROR:")]
    # "--- Logging error ---" blocks come from loggers of earlier in-process tests whose captured stream
    # is closed; they are not output of this tool
    tool_err = "\n".join(b for b in err.split("--- Logging error ---") if "logging/__init__.py" not in b)
    assert len(errors) == 1 and "--overwrite" in errors[0] and "Traceback" not in tool_err
    assert (out / "results.json").read_bytes() == before
    (images / "a0.png").write_bytes(open(recs[0]["file_name"], "rb").read())
    assert predict.main(["--overwrite"] + [str(a) for a in args]) == 0
    assert len(json.loads((out / "images.json").read_text())["images"]) == 4


# export tests: tests/test_export.py


def test_eval_only_with_tta(synthetic_root, checkpoint, tmp_path):
    ds = ["DATASETS.TRAIN", "('synthetic_defects_train',)", "DATASETS.TEST", "('synthetic_defects_val',)"]
    run_train_net(["--config-file", SMALL_CONFIG, "--eval-only", *TINY_OPTS, *ds, "MODEL.WEIGHTS", checkpoint,
                   "TEST.AUG.ENABLED", "True", *IDENTITY_TTA, "OUTPUT_DIR", tmp_path], synthetic_root)
    plain = json.loads((tmp_path / "eval_results.json").read_text())["bbox"]
    tta = json.loads((tmp_path / "eval_tta_results.json").read_text())["bbox_TTA"]
    assert plain.keys() == tta.keys() and "AP-scratch" in tta
    for k in plain:
        assert tta[k] == pytest.approx(plain[k], abs=1e-6, nan_ok=True), k
    assert (tmp_path / "inference_TTA" / "synthetic_defects_val" / "coco_instances_results.json").exists()
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--eval-only", *TINY_OPTS, *ds, "MODEL.WEIGHTS",
                          checkpoint, "TEST.AUG.ENABLED", "True", "TEST.AUG.MERGE", "mean", "OUTPUT_DIR",
                          tmp_path / "bad"], synthetic_root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "TEST.AUG.MERGE" in [l for l in proc.stderr.splitlines() if l.startswith("ERROR:")][0]
