"""benchmarks/where_ap_is_lost.py: per-class AP at several IoUs, scores of hits and false positives, fragments."""
import json
import os
import runpy

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "where_ap_is_lost.py")


def _files(tmp_path):
    gt = {"images": [{"id": 1, "width": 200, "height": 100, "file_name": "a.png"},
                     {"id": 2, "width": 200, "height": 100, "file_name": "b.png"}],
          "categories": [{"id": 3, "name": "crack"}, {"id": 5, "name": "hole"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 100, 10], "area": 1000,
                           "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 100, 10], "score": 0.9},   # the whole crack
            {"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 10], "score": 0.95},   # a fragment, IoU 0.3
            {"image_id": 2, "category_id": 3, "bbox": [50, 50, 20, 20], "score": 0.4}]    # a false positive
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    return str(tmp_path / "gt.json"), str(tmp_path / "dt.json")


def test_fragment_outranking_the_whole_box_costs_ap_at_high_iou_only(tmp_path, capsys):
    mod = runpy.run_path(SCRIPT, run_name="script")
    gt, dt = _files(tmp_path)
    from pycocotools.coco import COCO

    rows = {r["class"]: r for r in mod["analyse"](COCO(gt), json.load(open(dt)))}
    crack = rows["crack"]
    # IoU 0.1 and 0.3: the fragment (ranked first) is the hit, the whole box a duplicate -> AP 100
    assert crack["AP@0.1"] == pytest.approx(100) and crack["AP@0.3"] == pytest.approx(100)
    # IoU 0.5: the fragment is a false positive ranked above the hit -> precision 1/2 at recall 1
    assert crack["AP@0.5"] == pytest.approx(50) and crack["R@0.5"] == pytest.approx(100)
    assert crack["AP@0.9"] == pytest.approx(50)
    assert crack["score_tp"] == pytest.approx(0.9)
    assert crack["score_fp"] == pytest.approx((0.95 + 0.4) / 2)
    assert crack["fragments_per_gt"] == pytest.approx(1.0)
    assert rows["hole"]["num_gt"] == 0 and "AP@0.5" not in rows["hole"]

    assert mod["main"](["--gt", gt, "--results", dt, "--results", dt]) == 0
    out = capsys.readouterr().out
    assert "mean of 2 result files" in out and "| crack | 1 | 100.0 | 100.0 | 50.0 |" in out
    assert mod["main"](["--gt", gt, "--results", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
