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
from d2_defects.inference.merge import merge_detections
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


SYNTHETIC_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "synthetic", "*.yaml")))


@pytest.mark.parametrize("config,merge", [(c, "nms") for c in SYNTHETIC_CONFIGS] + [("retinanet", "wbf")],
                         ids=lambda v: os.path.basename(str(v)))
def test_tta_with_identity_transform_equals_plain_inference(models, val_records, config, merge):
    """Every meta-architecture of the project's configs (and Detectron2's one-stage RetinaNet)."""
    if config == "retinanet":
        cfg, model = _cfg(*RETINANET, *IDENTITY_TTA, "TEST.AUG.MERGE", merge), models["retinanet"]
    else:
        cfg = load_config(config, TINY_OPTS + IDENTITY_TTA + ["TEST.AUG.MERGE", merge])
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
    before = out.read_text()
    ensemble = _tool("ensemble")
    assert ensemble.main([str(a) for a in args[:-1]] + ["tiny_defects_val"]) == 2
    err = capsys.readouterr().err
    assert f"ERROR: {out} exists (use --overwrite" in err and out.read_text() == before
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": 1, "bbox": [1, 2, 3]}]))
    assert ensemble.main([str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ERROR: {tmp_path / 'bad.json'}: detection 0") and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# tools: predict, export, train_net --eval-only with TTA


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


def test_export_torchscript_parity_and_overwrite(synthetic_root, checkpoint, tmp_path, capsys):
    args = ["--config-file", SMALL_CONFIG, "--output", tmp_path, "--num-samples", "2", *TINY_OPTS,
            "MODEL.WEIGHTS", checkpoint]
    proc = _run_tool("export_model.py", args, synthetic_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity with the eager model on 2 images" in proc.stdout
    traced = torch.jit.load(str(tmp_path / "model.ts"))
    # the exported file on its own (no Python model code) gives the eager model's boxes
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    DefectCheckpointer(model).load(str(checkpoint))
    image = torch.randint(0, 256, (3, 96, 144), dtype=torch.uint8)
    with torch.no_grad():
        eager = model([{"image": image}])[0]["instances"]
        boxes, classes, scores = traced(image)[:3]
    assert len(eager) == len(boxes) > 0
    assert torch.equal(eager.pred_classes, classes)
    torch.testing.assert_close(eager.pred_boxes.tensor, boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(eager.scores, scores, atol=1e-5, rtol=0)
    assert _tool("export_model").main([str(a) for a in args]) == 2
    assert "exists (use --overwrite" in capsys.readouterr().err


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
