"""Sliced inference (d2_defects.modeling.slicing, TEST.SLICE.*): the tile grid against SAHI's, exact box mapping,
one detection per object after the merge, plain inference when one tile is the image, config errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch import nn

from conftest import ROOT, SMALL_CONFIG, TINY_OPTS, run_train_net
from d2_defects.config import load_config
from d2_defects.modeling.slicing import SlicedDetector, slice_options, tile_grid
from d2_defects.utils.errors import ConfigError


def _cfg(*opts):
    return load_config(SMALL_CONFIG, TINY_OPTS + ["TEST.SLICE.ENABLED", "True", *map(str, opts)])


# ------------------------------------------------------------------------------------------------- grid
GRIDS = [(100, 130, 50, 50, 0.2), (512, 512, 128, 128, 0.25), (300, 200, 64, 96, 0.0), (40, 30, 64, 64, 0.2),
         (64, 64, 64, 64, 0.5), (1000, 777, 256, 200, 0.1), (129, 257, 128, 128, 0.9)]


@pytest.mark.parametrize("h,w,th,tw,ov", GRIDS)
def test_grid_equals_sahi_get_slice_bboxes(h, w, th, tw, ov):
    from sahi.slicing import get_slice_bboxes  # the oracle (requirements-oracles.txt)

    expected = get_slice_bboxes(h, w, th, tw, auto_slice_resolution=False, overlap_height_ratio=ov,
                                overlap_width_ratio=ov)
    assert [list(t) for t in tile_grid(h, w, th, tw, ov)] == [list(b) for b in expected]


@pytest.mark.parametrize("seed", range(20))
def test_grid_covers_every_pixel_with_tiles_inside_the_image(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 700, 2)
    th, tw = rng.integers(16, 300, 2)
    ov = float(rng.uniform(0, 0.95))
    tiles = tile_grid(h, w, th, tw, ov)
    covered = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert (y1 - y0, x1 - x0) == (min(th, h), min(tw, w))  # border tiles are shifted, never cut or padded
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert len(set(tiles)) == len(tiles)


def test_image_smaller_than_a_tile_is_one_tile():
    assert tile_grid(30, 40, 64, 64, 0.2) == [(0, 0, 40, 30)]


# ------------------------------------------------------------------------------------ a fake detector
class BrightBoxDetector(nn.Module):
    """Finds the bright (> 128) pixels of each input as one box of class 0 (score 0.9), mapped from the model input
    to the input's height/width like a detector's postprocessing; ``defect_score`` = the view's mean brightness.
    Records every input it sees."""

    num_classes = 1

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, batched_inputs):
        outs = []
        for x in batched_inputs:
            img = x["image"].float()
            self.seen.append(tuple(img.shape[-2:]))
            h, w = x["height"], x["width"]
            sy, sx = h / img.shape[-2], w / img.shape[-1]
            ys, xs = torch.nonzero(img.max(0).values > 128, as_tuple=True)
            inst = Instances((h, w))
            if len(xs):
                box = [[xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy]]
                inst.pred_boxes = Boxes(torch.tensor(box, dtype=torch.float32))
                inst.scores = torch.tensor([0.9])
                inst.pred_classes = torch.tensor([0])
            else:
                inst.pred_boxes = Boxes(torch.zeros((0, 4)))
                inst.scores = torch.zeros(0)
                inst.pred_classes = torch.zeros(0, dtype=torch.int64)
            outs.append({"instances": inst, "defect_score": float(img.mean() / 255)})
        return outs


def _image(h, w, box):
    img = torch.zeros((3, h, w), dtype=torch.uint8)
    x0, y0, x1, y1 = box
    img[:, y0:y1, x0:x1] = 255
    return img


def _run(cfg, img, tta=False):
    model = BrightBoxDetector()
    sliced = SlicedDetector(cfg, model, tta=tta).eval()
    out = sliced([{"image": img, "height": img.shape[-2], "width": img.shape[-1]}])[0]
    return out, model


def test_an_object_in_two_overlapping_tiles_comes_back_once_at_its_exact_place():
    # tiles of 64 with overlap 0.25 start at 0, 48, 96: the box [52, 20, 60, 30] lies in tiles 0 and 1 of row 0
    cfg = _cfg("TEST.SLICE.SIZE", "(64, 64)", "TEST.SLICE.OVERLAP", 0.25, "TEST.SLICE.INCLUDE_FULL", False,
               "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 1000, "TEST.SLICE.BATCH", 3)
    out, model = _run(cfg, _image(160, 160, (52, 20, 60, 30)))
    assert len(model.seen) == 9 and set(model.seen) == {(64, 64)}  # 3 x 3 tiles at their own size
    inst = out["instances"]
    assert len(inst) == 1
    assert inst.pred_boxes.tensor.tolist() == [[52.0, 20.0, 60.0, 30.0]]
    assert out["defect_score"] == pytest.approx(max(80 / 4096, 0.0))  # max over tiles: 8x10 px of 64x64 in one


def test_tiles_are_resized_like_test_images_and_boxes_scale_back():
    # tiles of 50 resized to a short side of 100: the detector sees 100x100 and reports in tile pixels
    cfg = _cfg("TEST.SLICE.SIZE", "(50, 50)", "TEST.SLICE.OVERLAP", 0.0, "TEST.SLICE.INCLUDE_FULL", False,
               "INPUT.MIN_SIZE_TEST", 100, "INPUT.MAX_SIZE_TEST", 1000)
    out, model = _run(cfg, _image(100, 150, (110, 60, 130, 90)))
    assert len(model.seen) == 6 and set(model.seen) == {(100, 100)}
    assert out["instances"].pred_boxes.tensor.tolist() == [[110.0, 60.0, 130.0, 90.0]]


def test_include_full_adds_the_whole_image_and_gives_the_image_level_score():
    cfg = _cfg("TEST.SLICE.SIZE", "(64, 64)", "TEST.SLICE.OVERLAP", 0.25, "TEST.SLICE.INCLUDE_FULL", True,
               "INPUT.MIN_SIZE_TEST", 80, "INPUT.MAX_SIZE_TEST", 1000)
    img = _image(160, 160, (52, 20, 60, 30))
    out, model = _run(cfg, img)
    assert len(model.seen) == 10 and model.seen[-1] == (80, 80)  # 9 tiles, then the image resized to 80
    assert out["defect_score"] == pytest.approx(float(img.float().mean() / 255), rel=0.05)  # the full view's
    assert len(out["instances"]) == 1


def test_tta_views_of_every_tile_join_one_merge():
    cfg = _cfg("TEST.SLICE.SIZE", "(64, 64)", "TEST.SLICE.OVERLAP", 0.25, "TEST.SLICE.INCLUDE_FULL", False,
               "TEST.AUG.ENABLED", True, "TEST.AUG.MIN_SIZES", "(64,)", "TEST.AUG.MAX_SIZE", 1000,
               "TEST.AUG.FLIP", True, "TEST.AUG.VFLIP", True)
    out, model = _run(cfg, _image(160, 160, (52, 20, 60, 30)), tta=True)
    assert len(model.seen) == 9 * 3  # every tile: itself, h-flipped, v-flipped
    assert out["instances"].pred_boxes.tensor.tolist() == [[52.0, 20.0, 60.0, 30.0]]


def test_one_tile_covering_the_image_is_exactly_plain_inference(synthetic_root):
    from detectron2.data import DatasetCatalog

    from d2_defects.data.mapper import build_defect_test_mapper

    cfg = _cfg("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "TEST.SLICE.SIZE", "(4000, 4000)")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    record = DatasetCatalog.get("tiny_defects_val")[0]
    full = build_defect_test_mapper(cfg, augmentations=[])(dict(record))  # original resolution
    plain = build_defect_test_mapper(cfg)(dict(record))  # resized by INPUT.MIN_SIZE_TEST, as in evaluation
    assert plain["image"].shape != full["image"].shape
    with torch.no_grad():
        expected = model([plain])[0]["instances"]
        got = SlicedDetector(cfg, model).eval()([full])[0]["instances"]
    assert len(expected) > 0
    assert torch.equal(got.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(got.scores, expected.scores) and torch.equal(got.pred_classes, expected.pred_classes)


@pytest.mark.parametrize("key,value,message", [
    ("TEST.SLICE.SIZE", "(64,)", "TEST.SLICE.SIZE must be (height, width)"),
    ("TEST.SLICE.SIZE", "(64, 0)", "TEST.SLICE.SIZE must be (height, width)"),
    ("TEST.SLICE.OVERLAP", "1.0", "TEST.SLICE.OVERLAP must be a fraction in [0, 1)"),
    ("TEST.SLICE.OVERLAP", "-0.1", "TEST.SLICE.OVERLAP must be a fraction in [0, 1)"),
    ("TEST.SLICE.BATCH", "0", "TEST.SLICE.BATCH must be >= 1"),
    ("TEST.SLICE.MERGE", "'max'", "TEST.SLICE.MERGE must be one of"),
    ("TEST.SLICE.WBF_IOU_THRESH", "1.5", "TEST.SLICE.WBF_IOU_THRESH must be in (0, 1)"),
])
def test_bad_values_name_their_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        slice_options(_cfg(key, value))


def test_bad_value_stops_eval_only_before_inference(synthetic_root, tmp_path):
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--eval-only", *TINY_OPTS, "TEST.SLICE.ENABLED", "True",
                          "TEST.SLICE.OVERLAP", "1.5", "MODEL.WEIGHTS", str(tmp_path / "none.pth"),
                          "DATASETS.TEST", "('synthetic_defects_val',)", "OUTPUT_DIR", str(tmp_path / "out")],
                         synthetic_root, check=False)
    assert proc.returncode == 2
    assert "ERROR: config error: TEST.SLICE.OVERLAP must be a fraction in [0, 1); got 1.5" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_only_and_predict_with_slicing(synthetic_root, tmp_path):
    """train_net.py --eval-only and tools/predict.py run the sliced model end to end."""
    from d2_defects.checkpoint import DefectCheckpointer

    cfg = _cfg()
    torch.manual_seed(0)
    DefectCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("random")
    opts = [*TINY_OPTS, "TEST.SLICE.ENABLED", "True", "TEST.SLICE.SIZE", "(48, 48)", "TEST.SLICE.OVERLAP", "0.2",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.WEIGHTS", str(tmp_path / "random.pth")]
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--eval-only", *opts, "DATASETS.TEST", "('synthetic_defects_val',)",
                          "OUTPUT_DIR", str(tmp_path / "eval")], synthetic_root)
    assert "Running sliced inference (TEST.SLICE)" in proc.stdout + proc.stderr
    assert (tmp_path / "eval" / "inference" / "synthetic_defects_val" / "coco_instances_results.json").is_file()
    images = os.path.join(synthetic_root, "synthetic_defects", "val")
    env = dict(os.environ, DETECTRON2_DATASETS=synthetic_root)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "predict.py"),
                           "--config-file", SMALL_CONFIG, "--input", images, "--output", str(tmp_path / "pred"),
                           *opts], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "pred" / "results.json").is_file()


# ------------------------------------------------------------------------------------------ sliced training
def _record(boxes, h=100, w=100, image_id=1):
    from detectron2.structures import BoxMode

    return {"file_name": f"img{image_id}.png", "image_id": image_id, "height": h, "width": w,
            "annotations": [{"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": i % 3, "iscrowd": 0}
                            for i, b in enumerate(boxes)]}


def _tiles(records, **kw):
    from d2_defects.data.slicing import slice_records

    kw = {"size": (50, 50), "overlap": 0.0, "min_visible": 0.5, "empty_ratio": 100.0, "include_full": False, **kw}
    return {tuple(t["slice"]): t for t in slice_records(records, **kw)}


def test_min_visible_keeps_clips_or_drops_the_tile():
    # tiles of 50 without overlap: (0,0), (50,0), (0,50), (50,50)
    inside = (10, 10, 20, 20)  # whole in tile (0, 0)
    split = (40, 60, 60, 70)  # half in tile (0, 50), half in tile (50, 50)
    tiles = _tiles([_record([inside, split])], min_visible=0.5)
    assert sorted(tiles) == [(0, 0, 50, 50), (0, 50, 50, 100), (50, 0, 100, 50), (50, 50, 100, 100)]
    assert [a["bbox"] for a in tiles[(0, 0, 50, 50)]["annotations"]] == [[10, 10, 20, 20]]
    assert [a["bbox"] for a in tiles[(0, 50, 50, 100)]["annotations"]] == [[40, 10, 50, 20]]  # clipped, tile pixels
    assert [a["bbox"] for a in tiles[(50, 50, 100, 100)]["annotations"]] == [[0, 10, 10, 20]]
    assert tiles[(0, 50, 50, 100)]["annotations"][0]["category_id"] == 1
    assert tiles[(50, 0, 100, 50)]["annotations"] == []  # an empty tile (kept: EMPTY_RATIO is large)
    assert (tiles[(0, 50, 50, 100)]["height"], tiles[(0, 50, 50, 100)]["width"]) == (50, 50)
    # a box only 30% inside a tile: with MIN_VISIBLE 0.5 that tile is dropped, the other keeps 70% of it
    tiles = _tiles([_record([(35, 60, 55, 70)])], min_visible=0.5)
    assert (0, 50, 50, 100) in tiles and (50, 50, 100, 100) not in tiles
    assert [a["bbox"] for a in tiles[(0, 50, 50, 100)]["annotations"]] == [[35, 10, 50, 20]]
    tiles = _tiles([_record([(35, 60, 55, 70)])], min_visible=0.25)
    assert [a["bbox"] for a in tiles[(50, 50, 100, 100)]["annotations"]] == [[0, 10, 5, 20]]


def test_empty_ratio_and_include_full():
    from d2_defects.data.slicing import slice_records

    records = [_record([(10, 10, 20, 20)], h=200, w=200, image_id=i) for i in range(5)] + \
        [_record([], h=200, w=200, image_id=9)]  # a normal image: 16 empty tiles
    for ratio in (0.0, 1.0, 2.0, 100.0):
        out = slice_records(records, size=(50, 50), overlap=0.0, empty_ratio=ratio, include_full=False, seed=0)
        positives = [t for t in out if t["annotations"]]
        empties = [t for t in out if not t["annotations"]]
        assert len(positives) == 5
        assert len(empties) == min(round(ratio * 5), 5 * 15 + 16)  # all 91 empty tiles when the ratio asks more
        assert all("slice" in t for t in out)
    a = slice_records(records, size=(50, 50), overlap=0.0, empty_ratio=2.0, include_full=True, seed=1)
    b = slice_records(records, size=(50, 50), overlap=0.0, empty_ratio=2.0, include_full=True, seed=1)
    assert a == b and len(a) == 5 + 10 + 6  # the same draw on every rank; + the 6 whole images
    assert [r for r in a if "slice" not in r] == records


def test_mapper_crops_the_tile_and_keeps_its_boxes(synthetic_root):
    from detectron2.data import DatasetCatalog

    from d2_defects.data.mapper import DefectDatasetMapper
    from d2_defects.data.slicing import slice_records
    from d2_defects.utils.image_io import read_image

    cfg = _cfg()
    record = [r for r in DatasetCatalog.get("tiny_defects_train") if r["annotations"]][0]
    tile = [t for t in slice_records([record], size=(64, 64), overlap=0.25, include_full=False) if t["annotations"]][0]
    mapper = DefectDatasetMapper(cfg, True, augmentations=[])
    out = mapper(tile)
    x0, y0, x1, y1 = tile["slice"]
    full = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
    assert torch.equal(out["image"], torch.as_tensor(np.ascontiguousarray(full[y0:y1, x0:x1].transpose(2, 0, 1))))
    expected = torch.tensor([a["bbox"] for a in tile["annotations"]], dtype=torch.float32)
    assert torch.allclose(out["instances"].gt_boxes.tensor, expected)


@pytest.mark.parametrize("key,value,message", [
    ("INPUT.SLICE.SIZE", "(0, 64)", "INPUT.SLICE.SIZE must be (height, width)"),
    ("INPUT.SLICE.OVERLAP", "1.0", "INPUT.SLICE.OVERLAP must be a fraction in [0, 1)"),
    ("INPUT.SLICE.MIN_VISIBLE", "0.0", "INPUT.SLICE.MIN_VISIBLE must be a fraction in (0, 1]"),
    ("INPUT.SLICE.EMPTY_RATIO", "-1.0", "INPUT.SLICE.EMPTY_RATIO must be >= 0"),
])
def test_bad_training_values_name_their_key(key, value, message):
    from d2_defects.data.slicing import slice_train_options

    cfg = _cfg("INPUT.SLICE.ENABLED", True, key, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        slice_train_options(cfg)


def test_sliced_training_runs_with_copy_paste_and_repeat_factor_sampling(synthetic_root, tmp_path):
    proc = run_train_net(["--config-file", SMALL_CONFIG, *TINY_OPTS, "SOLVER.MAX_ITER", "3",
                          "INPUT.SLICE.ENABLED", "True", "INPUT.SLICE.SIZE", "(64, 64)", "INPUT.SLICE.EMPTY_RATIO", "0.5",
                          "INPUT.COPY_PASTE.ENABLED", "True", "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
                          "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")], synthetic_root)
    log = proc.stdout + proc.stderr
    assert "sliced training: 16 images ->" in log and "+ the 16 whole images" in log
    assert (tmp_path / "out" / "model_final.pth").is_file()


def test_slice_dataset_tool_writes_the_same_tiles(synthetic_root, tmp_path, capsys):
    import json
    import runpy

    from detectron2.data import DatasetCatalog

    from d2_defects.data.catalog import load_coco_defects
    from d2_defects.data.slicing import slice_records
    from d2_defects.utils.errors import run_cli
    from d2_defects.utils.image_io import read_image

    main = runpy.run_path(os.path.join(ROOT, "tools", "slice_dataset.py"), run_name="tool")["main"]
    out = tmp_path / "tiles"
    assert run_cli(main, ["--dataset", "tiny_defects_train", "--size", "64", "64", "--overlap", "0.25",
                          "--output", str(out)], exit=False) == 0
    records = load_coco_defects(str(out / "annotations.json"), str(out / "images"))  # passes the dataset checks
    expected = slice_records(DatasetCatalog.get("tiny_defects_train"), (64, 64), 0.25, include_full=False, seed=0)
    assert len(records) == len(expected) > 0
    coco = json.loads((out / "annotations.json").read_text())
    first = [img for img in coco["images"] if any(a["image_id"] == img["id"] for a in coco["annotations"])][0]
    x0, y0, x1, y1 = first["source"]["slice"]
    src = [r for r in DatasetCatalog.get("tiny_defects_train") if r["image_id"] == first["source"]["image_id"]][0]
    tile = read_image(str(out / "images" / first["file_name"]), format="BGR")
    assert np.array_equal(tile, read_image(src["file_name"], format="BGR")[y0:y1, x0:x1])
    # never over an existing output
    assert run_cli(main, ["--dataset", "tiny_defects_train", "--output", str(out)], exit=False) == 2
    assert "(use --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


class ComponentDetector(BrightBoxDetector):
    """One box per connected bright region of the input (score grows with its area, so a whole object outscores a
    piece of it cut by a tile edge)."""

    def forward(self, batched_inputs):
        import cv2

        outs = []
        for x in batched_inputs:
            img = x["image"].numpy().max(0)
            self.seen.append(img.shape)
            sy, sx = x["height"] / img.shape[0], x["width"] / img.shape[1]
            n, _, stats, _ = cv2.connectedComponentsWithStats((img > 128).astype(np.uint8))
            boxes = [[s[0] * sx, s[1] * sy, (s[0] + s[2]) * sx, (s[1] + s[3]) * sy] for s in stats[1:n]]
            inst = Instances((x["height"], x["width"]))
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.tensor([0.5 + 0.4 * min(1.0, s[4] / 300) for s in stats[1:n]], dtype=torch.float32)
            inst.pred_classes = torch.zeros(n - 1, dtype=torch.int64)
            outs.append({"instances": inst})
        return outs


def test_sliced_prediction_equals_sahi_on_the_same_detector():
    """SAHI's get_sliced_prediction (its own slicing, shifting and class-aware NMS) as the peer: same detector, same
    image, same tiles."""
    from sahi.models.base import DetectionModel
    from sahi.predict import get_sliced_prediction
    from sahi.prediction import ObjectPrediction

    detector = ComponentDetector()

    class Peer(DetectionModel):
        def set_model(self, model, **kwargs):
            self.model = model

        def perform_inference(self, image):
            chw = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            self._original_predictions = self.model([{"image": chw, "height": image.shape[0],
                                                     "width": image.shape[1]}])[0]["instances"]

        def _create_object_prediction_list_from_original_predictions(self, shift_amount_list=[[0, 0]],
                                                                     full_shape_list=None):
            inst = self._original_predictions
            self._object_prediction_list_per_image = [[
                ObjectPrediction(bbox=b.tolist(), category_id=int(c), category_name="defect", score=float(s),
                                 shift_amount=shift_amount_list[0], full_shape=full_shape_list[0] if full_shape_list else None)
                for b, s, c in zip(inst.pred_boxes.tensor, inst.scores, inst.pred_classes)]]

    # objects: whole in two tiles; cut by a tile edge (60% in one tile, whole in the next); away from any edge
    rects = [(52, 20, 60, 30), (100, 100, 120, 110), (10, 130, 30, 150), (130, 10, 150, 40)]
    img = torch.zeros((3, 160, 160), dtype=torch.uint8)
    for x0, y0, x1, y1 in rects:
        img[:, y0:y1, x0:x1] = 255
    peer = Peer(model=detector, confidence_threshold=0.0, category_mapping={"0": "defect"}, device="cpu")
    result = get_sliced_prediction(img.permute(1, 2, 0).numpy().copy(), peer, slice_height=64, slice_width=64,
                                   overlap_height_ratio=0.25, overlap_width_ratio=0.25, perform_standard_pred=False,
                                   postprocess_type="NMS", postprocess_match_metric="IOU",
                                   postprocess_match_threshold=0.5, postprocess_class_agnostic=False, verbose=0,
                                   auto_slice_resolution=False)
    sahi_boxes = sorted(tuple(round(v, 3) for v in p.bbox.to_xyxy()) for p in result.object_prediction_list)
    cfg = _cfg("TEST.SLICE.SIZE", "(64, 64)", "TEST.SLICE.OVERLAP", 0.25, "TEST.SLICE.INCLUDE_FULL", False,
               "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 1000, "MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.5)
    ours = SlicedDetector(cfg, ComponentDetector()).eval()([{"image": img, "height": 160, "width": 160}])[0]
    our_boxes = sorted(tuple(round(v, 3) for v in b) for b in ours["instances"].pred_boxes.tensor.tolist())
    assert our_boxes == sahi_boxes == sorted(tuple(float(v) for v in r) for r in rects)
