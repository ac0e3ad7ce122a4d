"""tools/analyze_results.py and tools/tune_thresholds.py on a synthetic evaluation."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from conftest import ROOT
from d2_defects.evaluation import evaluate_detections, load_predictions
from d2_defects.evaluation.analysis import CLASS_INDEX_FILE, PLOT_FILES, confusion_matrix, write_analysis_plots
from d2_defects.evaluation.scoring import DefectEvalSettings
from d2_defects.evaluation.tuning import ThresholdScorer
from d2_defects.modeling.postprocess import PostprocessParams, select_detections
from d2_defects.utils.fonts import font_family_for, plot_labels

DS = "tiny_defects_train"  # 16 images, 4 of them normal


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _simulate(records, seed=0, fp_score=(0.0, 0.8), tp_score=(0.3, 1.0), min_fp=0):
    """Detections of a fake detector: most boxes found (jittered, some with the wrong class), some missed,
    random false boxes; per-image entries in DefectEvaluator's defect_detections.json format."""
    rng = np.random.default_rng(seed)
    to_dataset = {v: k for k, v in MetadataCatalog.get(DS).thing_dataset_id_to_contiguous_id.items()}
    K = len(to_dataset)
    out = []
    for r in records:
        inst = []
        for a in r["annotations"]:
            if rng.random() < 0.8:
                x, y, w, h = BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYWH_ABS)
                c = a["category_id"] if rng.random() < 0.9 else int(rng.integers(K))
                inst.append({"category_id": to_dataset[c], "score": float(rng.uniform(*tp_score)),
                             "bbox": [x + rng.normal(0, 1), y + rng.normal(0, 1), w * rng.uniform(.9, 1.1),
                                      h * rng.uniform(.9, 1.1)]})
        for _ in range(rng.integers(min_fp, 3)):
            inst.append({"category_id": to_dataset[int(rng.integers(K))], "score": float(rng.uniform(*fp_score)),
                         "bbox": [rng.uniform(0, r["width"] - 30), rng.uniform(0, r["height"] - 30),
                                  rng.uniform(4, 30), rng.uniform(4, 30)]})
        out.append({"image_id": r["image_id"], "defect_score": None, "instances": inst})
    return out


@pytest.fixture(scope="module")
def predictions(synthetic_root, tmp_path_factory):
    path = tmp_path_factory.mktemp("preds") / "defect_detections.json"
    path.write_text(json.dumps(_simulate(DatasetCatalog.get(DS))))
    return str(path)


def test_analyze_results_writes_readable_plots(predictions, tmp_path, capsys):
    tool = _tool("analyze_results")
    out = tmp_path / "analysis"
    argv = ["--predictions", predictions, "--dataset", DS, "--output", str(out), "--iou", "fabric", "--num-worst", "4"]
    assert tool.main(argv) == 0
    for name in PLOT_FILES.values():
        im = np.asarray(Image.open(out / name).convert("L"))
        assert im.shape[0] > 200 and im.shape[1] > 200, name
        assert im.std() > 5, f"{name} looks blank"
    metrics = json.loads((out / "defect_metrics.json").read_text())
    assert metrics["settings"]["iou_thresholds"] == ["0.1", "0.3", "0.5"]
    assert "mAP" in capsys.readouterr().out
    # never overwrites without --overwrite; one error line
    before = (out / "per_class_ap.png").stat().st_mtime_ns
    assert tool.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:") and "--overwrite" in err[0]
    assert (out / "per_class_ap.png").stat().st_mtime_ns == before


def test_coco_results_json_gives_the_same_scores(predictions, tmp_path):
    per_image = json.loads(open(predictions).read())
    flat = [dict(d, image_id=e["image_id"]) for e in per_image for d in e["instances"]]
    coco_path = tmp_path / "coco_instances_results.json"
    coco_path.write_text(json.dumps(flat))
    meta = MetadataCatalog.get(DS)
    records = DatasetCatalog.get(DS)
    a = evaluate_detections(records, load_predictions(predictions, DS), meta.thing_classes).summary()
    b = evaluate_detections(records, load_predictions(str(coco_path), DS), meta.thing_classes).summary()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], nan_ok=True), k


def test_confusion_matrix_by_hand():
    recs = [{"image_id": 1, "height": 300, "width": 300, "file_name": "x.png", "annotations": [
        {"bbox": [0, 0, 50, 50], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
        {"bbox": [100, 100, 50, 50], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1},
        {"bbox": [200, 0, 50, 50], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1}]}]
    preds = [{"image_id": 1, "classes": np.array([0, 0, 1, 1]), "scores": np.array([0.9, 0.8, 0.7, 0.2]),
              "boxes": np.array([[0, 0, 50, 50], [100, 100, 50, 48], [250, 250, 20, 20], [200, 0, 50, 50]])}]
    res = evaluate_detections(recs, preds, ["a", "b"], DefectEvalSettings())
    cm = confusion_matrix(res, score_threshold=0.5, iou_threshold=0.5)
    # row a: 1 correct; row b: 1 detected as a, 1 missed (its detection is below 0.5); b on nothing: background
    np.testing.assert_array_equal(cm, [[1, 0, 0, 0], [1, 0, 1, 1]])


def _postprocess(preds, thresholds):
    """Keep the detections the model's postprocessing keeps with these per-class thresholds (NMS off:
    the saved detections are already the model's NMS output; IoU <= 1 never exceeds 1.0)."""
    params = PostprocessParams(score_thresh_per_class=list(thresholds), nms_thresh=1.0, topk_per_image=-1)
    out = []
    for p in preds:
        boxes = BoxMode.convert(torch.as_tensor(p["boxes"]).reshape(-1, 4), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
        scores = torch.as_tensor(p["scores"], dtype=torch.float32)  # the model's score dtype
        keep, _ = select_detections(boxes.float(), scores, torch.as_tensor(p["classes"]), params)
        keep = np.sort(keep.numpy())
        out.append(dict(p, boxes=p["boxes"][keep], scores=p["scores"][keep], classes=p["classes"][keep]))
    return out


@pytest.mark.parametrize("score_thresh,score_map", [(0.05, "weighted_mAP"), (0.6, "mAP")])
def test_tune_thresholds_reproduced_by_the_model_postprocessing(synthetic_root, tmp_path, capsys, score_thresh,
                                                                score_map):
    records = DatasetCatalog.get(DS)
    # confident false boxes (0.55-0.7) below the true ones (0.75-1): thresholds ~0.7 fix ACC, keep AP;
    # scores on a 0.01 grid, so candidate thresholds tie with detection scores
    sim = _simulate(records, seed=1, fp_score=(0.55, 0.7), tp_score=(0.75, 1.0), min_fp=1)
    for e in sim:
        for d in e["instances"]:
            d["score"] = round(d["score"], 2)
    sim[0]["instances"].append(dict(sim[0]["instances"][0], score=score_thresh))  # the model never returns it
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(sim))
    opts = ["TEST.DEFECT_EVAL.IOU", "fabric", "TEST.DEFECT_EVAL.ACC_WEIGHT", "0.2",
            "TEST.DEFECT_EVAL.MAP_WEIGHT", "0.8", "TEST.DEFECT_EVAL.SCORE_MAP", score_map, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(score_thresh)]
    assert _tool("tune_thresholds").main(["--predictions", str(path), "--dataset", DS, *opts]) == 0
    out = capsys.readouterr().out
    before = float(re.search(r"score before: ([\d.]+)", out).group(1))
    after = float(re.search(r"score after:\s+([\d.]+)", out).group(1))
    line = re.search(r"^MODEL\.ROI_HEADS\.SCORE_THRESH_PER_CLASS \[(.*)\]$", out, re.M)
    thresholds = [float(v) for v in line.group(1).split(",")]
    meta = MetadataCatalog.get(DS)
    assert len(thresholds) == len(meta.thing_classes)
    assert min(thresholds) >= score_thresh  # never below what the model applies already
    assert after > before
    # oracle: the model's postprocessing with the printed line on the saved detections, scored from scratch
    settings = DefectEvalSettings(iou="fabric", acc_weight=0.2, map_weight=0.8, score_map=score_map)
    preds = load_predictions(str(path), DS)
    full = evaluate_detections(records, preds, meta.thing_classes, settings, metadata_weights=meta.thing_class_weights)
    tuned = evaluate_detections(records, _postprocess(preds, thresholds), meta.thing_classes, settings,
                                metadata_weights=meta.thing_class_weights)
    assert full.score == pytest.approx(before, abs=0.01)
    assert tuned.score == pytest.approx(after, abs=0.01)


def test_threshold_scorer_keeps_what_postprocessing_keeps(synthetic_root, tmp_path):
    """Thresholds equal to detection scores: the scorer drops those detections, like ``score > threshold``."""
    records = DatasetCatalog.get(DS)
    sim = _simulate(records, seed=2)
    for e in sim:
        for d in e["instances"]:
            d["score"] = round(d["score"], 1)  # many ties
    meta = MetadataCatalog.get(DS)
    preds = load_predictions_from(sim, tmp_path)
    settings = DefectEvalSettings(iou="fabric", acc_weight=0.5, map_weight=0.5, image_score_threshold=0.3)
    res = evaluate_detections(records, preds, meta.thing_classes, settings, metadata_weights=meta.thing_class_weights)
    scorer = ThresholdScorer(res)
    K = len(meta.thing_classes)
    for thresholds in ([0.3] * K, [0.5] * K, [float(np.median(c["scores"])) if len(c["scores"]) else 0.0
                                              for c in res.curves]):
        oracle = evaluate_detections(records, _postprocess(preds, thresholds), meta.thing_classes, settings,
                                     metadata_weights=meta.thing_class_weights)
        assert scorer.score(thresholds) == pytest.approx(oracle.score), thresholds
        assert scorer.accuracy(thresholds) == pytest.approx(oracle.acc), thresholds


def _glyph_warnings(caught):
    return [str(w.message) for w in caught if "Glyph" in str(w.message) and "missing" in str(w.message)]


def _register_renamed(name, class_names):
    """``DS``'s images and annotations under other class names."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    src = MetadataCatalog.get(DS)
    DatasetCatalog.register(name, lambda: DatasetCatalog.get(DS))
    MetadataCatalog.get(name).set(thing_classes=list(class_names),
                                  thing_dataset_id_to_contiguous_id=dict(src.thing_dataset_id_to_contiguous_id),
                                  thing_class_weights=list(src.thing_class_weights))
    return name


def _assert_images(folder):
    for name in PLOT_FILES.values():
        im = np.asarray(Image.open(folder / name).convert("L"))
        assert im.shape[0] > 200 and im.shape[1] > 200, name
        assert im.std() > 5, f"{name} looks blank"


def test_chinese_class_names_draw_without_missing_glyphs(predictions, tmp_path, capsys):
    names = ["瓶盖破损", "瓶盖变形", "瓶盖坏边", "标贴歪斜", "喷码正常", "喷码异常"]
    assert len(names) == len(MetadataCatalog.get(DS).thing_classes)
    ds = _register_renamed("cjk_defects_train", names)
    out = tmp_path / "analysis"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        argv = ["--predictions", predictions, "--dataset", ds, "--output", str(out)]
        assert _tool("analyze_results").main(argv) == 0
    assert _glyph_warnings(caught) == []
    _assert_images(out)
    # with a font for the names they are drawn; without one the plots say "class <i>" and a file maps them
    if font_family_for(names) is None:
        index = (out / CLASS_INDEX_FILE).read_text(encoding="utf-8")
        for i, n in enumerate(names):
            assert f"| class {i} | {n} |" in index
        assert CLASS_INDEX_FILE in capsys.readouterr().out
    else:
        assert not (out / CLASS_INDEX_FILE).exists()


def test_font_fallback_draws_names_the_default_font_lacks(tmp_path):
    # U+1D25 is in DejaVu Serif (shipped with matplotlib) but not in DejaVu Sans, the default font
    names = ["hole", "\u1d25-dent", "spot", "stain", "bubble", "crack"]
    labels, rc, indexed = plot_labels(names)
    assert labels == names and not indexed and len(rc["font.family"]) > 1
    with warnings.catch_warnings(record=True) as caught:  # control: without the fallback the glyph is missing
        warnings.simplefilter("always")
        fig = Figure()
        FigureCanvasAgg(fig)
        fig.add_subplot().set_title(names[1])
        fig.savefig(tmp_path / "control.png")
    assert _glyph_warnings(caught)
    records = DatasetCatalog.get(DS)
    preds = load_predictions_from(_simulate(records), tmp_path)
    res = evaluate_detections(records, preds, names, DefectEvalSettings())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_analysis_plots(res, str(tmp_path), num_worst=2)
    assert _glyph_warnings(caught) == []
    assert "class_index" not in paths
    _assert_images(tmp_path)


def load_predictions_from(sim, folder):
    path = folder / "sim.json"
    path.write_text(json.dumps(sim))
    return load_predictions(str(path), DS)


def test_tools_bad_input_is_one_line(synthetic_root, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "category_id": 4, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    missing = tmp_path / "nope.json"
    # in-process: both tools, both problems
    for tool, extra in (("analyze_results", ["--output", str(tmp_path / "o")]), ("tune_thresholds", [])):
        for path, needle in ((bad, "category id 4"), (missing, "nope.json")):
            assert _tool(tool).main(["--predictions", str(path), "--dataset", DS, *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("ERROR:") and needle in err[0] and str(path) in err[0]
    assert _tool("tune_thresholds").main(["--predictions", str(bad), "--dataset", "no_such_dataset"]) == 2
    assert "no_such_dataset" in capsys.readouterr().err
    assert _tool("tune_thresholds").main(["--predictions", str(bad), "--dataset", DS, "TEST.DEFECT_EVAL.IOU", "cocoo"]) == 2
    assert "TEST.DEFECT_EVAL.IOU" in capsys.readouterr().err
    # as a script: no traceback, --help works
    env = dict(os.environ, DETECTRON2_DATASETS=synthetic_root, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "analyze_results.py"), "--predictions",
                           str(bad), "--dataset", "synthetic_defects_train", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")] == [
        f"ERROR: {bad}: image id 1, detection 0: category id 4 unknown to synthetic_defects_train"]
    with pytest.raises(SystemExit) as e:
        _tool("tune_thresholds").main(["--help"])
    assert e.value.code == 0 and "SCORE_THRESH_PER_CLASS" in capsys.readouterr().out
