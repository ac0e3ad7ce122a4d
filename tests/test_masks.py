"""Masks end to end: the synthetic generator's exact masks, the readers, validation, the augmentations and
copy-paste (pixel equality against the generator's truth), and Cascade Mask R-CNN with the project's heads
against Detectron2's stock head."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

import d2_defects  # noqa: F401
from d2_defects.data.catalog import load_coco_defects
from d2_defects.data.copy_paste import CopyPaste
from d2_defects.data.formats import read_dataset, write_dataset
from d2_defects.utils.masks import decode_segmentation, encode_mask
from d2_defects.data.synthetic import CATEGORY_IDS, generate_dataset, render_image
from d2_defects.data.validation import mask_problem, validate_coco_dict
from d2_defects.engine.launch import load_config
from d2_defects.engine.validation import check_masks
from d2_defects.utils.errors import ConfigError, DatasetError

from conftest import ROOT, TINY_OPTS, run_train_net

MASK_CONFIG = os.path.join(ROOT, "configs", "synthetic", "cascade_mask_r18_cpu.yaml")


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    """8 train + 4 val synthetic images with masks; returns (root, train json)."""
    root = tmp_path_factory.mktemp("masked")
    files = generate_dataset(str(root), num_images=12, seed=11, val_fraction=4 / 12, progress=False)
    return str(root), files["train"]


def _truth(seed, split, index):
    """The generator's own (class, box, mask) list of an image."""
    return render_image(seed, split, index, masks=True)[2]


# ---------------------------------------------------------------------------------------------- generator
def test_masks_do_not_change_the_images_or_boxes():
    for i in range(12):
        img_a, env_a, anns_a = render_image(4, "train", i)
        img_b, env_b, anns_b = render_image(4, "train", i, masks=True)
        assert np.array_equal(img_a, img_b) and env_a == env_b
        assert [(c, box) for c, box, _ in anns_b] == anns_a


def test_every_mask_is_inside_its_box_and_covers_drawn_pixels():
    n_thin = 0
    for i in range(30):
        img, _, anns = render_image(5, "train", i, masks=True)
        for c, (x0, y0, x1, y1), mask in anns:
            ys, xs = np.nonzero(mask)
            assert len(xs) > 0
            # pixel centres inside the box
            assert xs.min() + 0.5 >= x0 and xs.max() + 0.5 <= x1 and ys.min() + 0.5 >= y0 and ys.max() + 0.5 <= y1
            fill = mask.sum() / ((x1 - x0) * (y1 - y0))
            if c in (0, 1):  # scratch, crack: thin shapes fill a small part of their box
                n_thin += 1
                assert fill < 0.6
    assert n_thin > 5


def test_the_json_holds_the_generators_masks_exactly(masked):
    root, train_json = masked
    with open(train_json) as f:
        coco = json.load(f)
    anns = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    checked = 0
    for img in coco["images"]:
        index = img["id"] - 1
        truth = _truth(11, "train", index)
        got = anns.get(img["id"], [])
        assert len(got) == len(truth)
        for a, (c, (x0, y0, x1, y1), mask) in zip(got, truth):
            assert a["category_id"] == CATEGORY_IDS[c]
            assert np.array_equal(decode_segmentation(a["segmentation"], img["height"], img["width"]), mask)
            # area stays the box's, so box AP's size ranges do not change with masks
            assert a["area"] == round((x1 - x0) * (y1 - y0), 2)
            checked += 1
    assert checked > 5
    # and the loader hands them to Detectron2 unchanged
    records = load_coco_defects(train_json, os.path.join(root, "train"))
    for rec in records:
        truth = _truth(11, "train", rec["image_id"] - 1)
        for obj, (_, _, mask) in zip(rec["annotations"], truth):
            assert np.array_equal(decode_segmentation(obj["segmentation"], rec["height"], rec["width"]), mask)


# ---------------------------------------------------------------------------------------------- readers
def _polygon_coco(w=200, h=150):
    polys = [[[20.5, 30.0, 80.25, 35.5, 60.0, 90.75]],                     # triangle
             [[100.0, 20.0, 180.0, 20.0, 180.0, 40.0, 100.0, 40.0]]]        # rectangle
    anns = []
    for k, p in enumerate(polys):
        xs, ys = p[0][0::2], p[0][1::2]
        anns.append({"id": k + 1, "image_id": 1, "category_id": k + 1, "iscrowd": 0, "segmentation": p,
                     "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                     "area": (max(xs) - min(xs)) * (max(ys) - min(ys))})
    return {"images": [{"id": 1, "file_name": "a.png", "width": w, "height": h}], "annotations": anns,
            "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "stain"}]}


@pytest.mark.parametrize("fmt", ["yolo", "labelme", "coco"])
def test_polygon_masks_survive_writing_and_reading(tmp_path, fmt):
    import cv2

    coco = _polygon_coco()
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((150, 200, 3), np.uint8))
    out = str(tmp_path / ("ann.json" if fmt == "coco" else "labels"))
    write_dataset(coco, fmt, out, image_root=str(images))
    back = read_dataset(fmt, out, str(images), classes=["crack", "stain"])
    assert len(back["annotations"]) == 2
    for a, b in zip(coco["annotations"], back["annotations"]):
        assert len(b["segmentation"]) == 1
        assert np.allclose(b["segmentation"][0], a["segmentation"][0], atol=1e-5)
        assert np.array_equal(decode_segmentation(b["segmentation"], 150, 200),
                              decode_segmentation(a["segmentation"], 150, 200))
        assert np.allclose(b["bbox"], a["bbox"], atol=1e-5)
    problems, _ = validate_coco_dict(back, out, str(images))
    assert problems == []


def test_labelme_shapes_give_masks(tmp_path):
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((100, 120, 3), np.uint8))
    shapes = [{"label": "spot", "shape_type": "circle", "points": [[50, 40], [60, 40]]},
              {"label": "stain", "shape_type": "rectangle", "points": [[90, 70], [10, 60]]},
              {"label": "crack", "shape_type": "line", "points": [[5, 5], [30, 20]]}]
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.json").write_text(json.dumps({"shapes": shapes, "imagePath": "../images/a.png",
                                               "imageWidth": 120, "imageHeight": 100}))
    coco = read_dataset("labelme", str(labels), str(images), classes=["spot", "stain", "crack"])
    circle, rect, line = coco["annotations"]
    m = decode_segmentation(circle["segmentation"], 100, 120)
    yy, xx = np.mgrid[0:100, 0:120]
    d = np.hypot(xx + 0.5 - 50, yy + 0.5 - 40)
    assert m[d < 9].all() and not m[d > 10.5].any()  # a 32-gon inscribed in the r=10 circle
    assert decode_segmentation(rect["segmentation"], 100, 120).sum() == 80 * 10
    assert "segmentation" not in line  # a line has a box but no mask


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("segm, expected", [
    ([[10, 10, 30, 10]], "at least 3"),
    ([[10, 10, 30, 10, 30, 300]], "outside the 100x80 image"),
    ({"size": [50, 100], "counts": "abc"}, "differs from the image's [80, 100]"),
    ([[10, 10, 10, 10, 10, 10]], "empty mask"),
    ([[40, 40, 60, 40, 60, 60]], "sticks out of the annotation's box"),
    ("crack", "polygons or RLE"),
])
def test_mask_problems_are_named(segm, expected):
    assert expected in mask_problem(segm, 100, 80, bbox=[5, 5, 30, 30])


def test_mask_errors_name_the_file_and_record(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((80, 100, 3), np.uint8))
    good = encode_mask(np.pad(np.ones((10, 10), bool), ((10, 60), (20, 70))))
    coco = {"images": [{"id": 7, "file_name": "a.png", "width": 100, "height": 80}],
            "categories": [{"id": 1, "name": "crack"}],
            "annotations": [
                {"id": 3, "image_id": 7, "category_id": 1, "bbox": [20, 10, 10, 10], "iscrowd": 0, "segmentation": good},
                {"id": 4, "image_id": 7, "category_id": 1, "bbox": [50, 50, 5, 5], "iscrowd": 0, "segmentation": good},
                {"id": 5, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0, "segmentation": []}]}
    json_file = tmp_path / "ann.json"
    json_file.write_text(json.dumps(coco))
    with pytest.raises(DatasetError) as e:
        load_coco_defects(str(json_file), str(tmp_path))
    msg = str(e.value)
    assert str(json_file) in msg and "annotation id 4 (image id 7, a.png)" in msg and "sticks out" in msg
    assert "annotation id 3" not in msg and "annotation id 5" not in msg  # [] is a box without a mask


def test_mask_on_needs_masks_and_the_right_format(synthetic_root, masked, tmp_path):
    from d2_defects.data import register_coco_defects

    root, train_json = masked
    register_coco_defects("masks_test_train", train_json, os.path.join(root, "train"))
    # a box-only json: one error naming the file of the first box without a mask
    boxes_only = tmp_path / "boxes.json"
    coco = json.load(open(train_json))
    for a in coco["annotations"]:
        a.pop("segmentation")
    boxes_only.write_text(json.dumps(coco))
    register_coco_defects("masks_test_boxes", str(boxes_only), os.path.join(root, "train"))
    cfg = load_config(MASK_CONFIG, [*TINY_OPTS, "DATASETS.TRAIN", "('masks_test_boxes',)", "DATASETS.TEST", "()"])
    with pytest.raises(DatasetError, match=r"MODEL.MASK_ON is set but \d+ box\(es\) have no mask") as e:
        check_masks(cfg)
    assert os.path.join(root, "train", "train_000000.png") in str(e.value) or "train_0000" in str(e.value)
    cfg = load_config(MASK_CONFIG, [*TINY_OPTS, "DATASETS.TRAIN", "('masks_test_train',)", "DATASETS.TEST", "()",
                                    "INPUT.MASK_FORMAT", "polygon"])
    with pytest.raises(ConfigError, match="INPUT.MASK_FORMAT bitmask"):
        check_masks(cfg)
    cfg = load_config(MASK_CONFIG, [*TINY_OPTS, "DATASETS.TRAIN", "('masks_test_train',)", "DATASETS.TEST", "()"])
    check_masks(cfg)  # RLE with bitmask: fine


# ---------------------------------------------------------------------------------------------- augmentations
def _candidates(a):
    """The 8 flips/quarter turns of an HxW(xC) array, keyed by name."""
    out = {}
    for k in range(4):
        r = np.rot90(a, k, axes=(0, 1))
        out[f"rot{k}"] = r
        out[f"rot{k}+hflip"] = r[:, ::-1]
    return out


def test_flips_and_rot90_move_masks_with_the_image(masked):
    """Through the project's mapper (vflip, hflip, rot90 at probability 0.5; no resize): whatever transform the
    image got, every mask got the same one, pixel for pixel against the generator's truth."""
    root, train_json = masked
    records = load_coco_defects(train_json, os.path.join(root, "train"))
    rec = next(r for r in records if len(r["annotations"]) >= 2)
    truth = [m for _, _, m in _truth(11, "train", rec["image_id"] - 1)]
    short = min(rec["height"], rec["width"])
    cfg = load_config(MASK_CONFIG, ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", f"({short},)",
                                    "INPUT.MAX_SIZE_TRAIN", "4000", "INPUT.VFLIP.ENABLED", "True",
                                    "INPUT.ROT90.ENABLED", "True"])
    from d2_defects.data.mapper import build_defect_train_mapper
    from d2_defects.utils.image_io import read_image

    mapper = build_defect_train_mapper(cfg)
    image = read_image(rec["file_name"], format="BGR")
    seen = set()
    np.random.seed(0)
    for _ in range(12):
        out = mapper(copy.deepcopy(rec))
        got = out["image"].permute(1, 2, 0).numpy()
        names = [n for n, c in _candidates(image).items() if c.shape == got.shape and np.array_equal(c, got)]
        assert names, "the image got a transform outside flips and quarter turns"
        masks = out["instances"].gt_masks.tensor.numpy()
        assert len(masks) == len(truth)
        for m, t in zip(masks, truth):
            assert np.array_equal(m, _candidates(t)[names[0]])
        seen.add(names[0])
    assert len(seen) >= 3  # several different transforms were checked


def test_polygon_masks_follow_rot90_exactly():
    from d2_defects.data.augment import Rot90Transform

    h, w = 60, 80
    poly = [[10.0, 5.0, 40.0, 5.0, 40.0, 25.0, 10.0, 25.0]]
    ann = {"bbox": [10, 5, 30, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "segmentation": poly}
    for k in range(4):
        t = T.TransformList([Rot90Transform(h, w, k)])
        out = utils.transform_instance_annotations(copy.deepcopy(ann), t, (h, w) if k % 2 == 0 else (w, h))
        size = (h, w) if k % 2 == 0 else (w, h)
        got = decode_segmentation([list(map(float, p)) for p in out["segmentation"]], *size)
        want = np.rot90(decode_segmentation(poly, h, w), k)
        assert np.array_equal(got, want), k


# ---------------------------------------------------------------------------------------------- copy-paste
def test_copy_paste_pastes_the_mask_not_the_box(masked):
    root, train_json = masked
    records = load_coco_defects(train_json, os.path.join(root, "train"))
    thin = [r for r in records if any(a["category_id"] in (0, 1) for a in r["annotations"])]
    cp = CopyPaste(thin, prob_normal=1.0, prob=1.0, max_objects=3, class_ids={0, 1}, use_masks=True)
    target = next(r for r in records if not r["annotations"])  # a normal image
    from d2_defects.utils.image_io import read_image

    base = read_image(target["file_name"], format="BGR")
    pasted_any = 0
    rng = np.random.RandomState(0)
    for _ in range(6):
        image, d = base.copy(), copy.deepcopy(target)
        added = cp(image, d, rng=rng)
        changed = np.any(image != base, axis=2)
        union = np.zeros(changed.shape, bool)
        for ann in added:
            m = decode_segmentation(ann["segmentation"], *base.shape[:2])
            x0, y0, x1, y1 = (int(v) for v in ann["bbox"])
            assert m.any() and not m[:y0].any() and not m[y1:].any() and not m[:, :x0].any() and not m[:, x1:].any()
            # the box holds more than the mask (thin defects): its other pixels keep the target's background
            assert m[y0:y1, x0:x1].mean() < 1
            union |= m
            pasted_any += 1
        assert not (changed & ~union).any()  # only pixels under a pasted mask changed
        # the pasted mask equals the source defect's mask moved with the crop
        for ann in added:
            src = next(e for e in cp.bank if e[2] == ann["category_id"] and (e[1][2] - e[1][0], e[1][3] - e[1][1])
                       == (int(ann["bbox"][2] - ann["bbox"][0]), int(ann["bbox"][3] - ann["bbox"][1])))
            sx0, sy0, sx1, sy1 = src[1]
            src_mask = decode_segmentation(src[3], *src[4])[sy0:sy1, sx0:sx1]
            x0, y0, x1, y1 = (int(v) for v in ann["bbox"])
            assert np.array_equal(decode_segmentation(ann["segmentation"], *base.shape[:2])[y0:y1, x0:x1], src_mask)
    assert pasted_any >= 3


def test_copy_paste_without_mask_model_pastes_boxes(masked):
    root, train_json = masked
    records = load_coco_defects(train_json, os.path.join(root, "train"))
    cp = CopyPaste(records, prob_normal=1.0, prob=1.0, max_objects=3)
    assert all(e[3] is None for e in cp.bank)
    target = next(r for r in records if not r["annotations"])
    from d2_defects.utils.image_io import read_image

    image = read_image(target["file_name"], format="BGR").copy()
    added = cp(image, copy.deepcopy(target), rng=np.random.RandomState(1))
    assert added and all("segmentation" not in a for a in added)


# ---------------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def mask_batches(masked):
    root, train_json = masked
    records = load_coco_defects(train_json, os.path.join(root, "train"))
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(96, 160)], image_format="BGR",
                           use_instance_mask=True, instance_mask_format="bitmask")
    dicts = [mapper(copy.deepcopy(d)) for d in records if d["annotations"]][:4]
    return [dicts[i:i + 2] for i in range(0, len(dicts), 2)]


@pytest.mark.parametrize("config, stock_name, our_name", [
    (MASK_CONFIG, "CascadeROIHeads", "DefectCascadeROIHeads"),
    (os.path.join(ROOT, "configs", "synthetic", "faster_r18_cpu.yaml"), "StandardROIHeads", "DefectStandardROIHeads"),
], ids=["cascade", "standard"])
def test_mask_rcnn_equals_stock_with_extras_off(mask_batches, config, stock_name, our_name):
    torch.manual_seed(0)
    opts = TINY_OPTS + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.MASK_ON", "True",
                        "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NUM_CONV", "2",
                        "MODEL.ROI_MASK_HEAD.CONV_DIM", "64", "INPUT.MASK_FORMAT", "bitmask"]
    stock = build_model(load_config(config, opts + ["MODEL.ROI_HEADS.NAME", stock_name]))
    ours = build_model(load_config(config, opts + ["MODEL.ROI_HEADS.NAME", our_name]))
    assert type(ours.roi_heads).__name__ == our_name
    ours.load_state_dict(stock.state_dict(), strict=True)
    batch = mask_batches[0]
    stock.train(), ours.train()
    with EventStorage():
        torch.manual_seed(1)
        ls = stock(batch)
        torch.manual_seed(1)
        lo = ours(batch)
    assert "loss_mask" in ls and ls.keys() == lo.keys()
    for k in ls:
        assert torch.equal(ls[k], lo[k]), k
    stock.eval(), ours.eval()
    with torch.no_grad():
        a = stock([{"image": d["image"]} for d in batch])
        b = ours([{"image": d["image"]} for d in batch])
    n = 0
    for x, y in zip(a, b):
        x, y = x["instances"], y["instances"]
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor) and torch.equal(x.pred_masks, y.pred_masks)
        n += len(x)
    assert n > 0


def test_mask_config_trains_and_reports_segm_ap(masked, tmp_path):
    root, _ = masked
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    os.symlink(root, datasets / "synthetic_defects")
    out = tmp_path / "run"
    run_train_net(["--config-file", MASK_CONFIG, *TINY_OPTS, "SOLVER.MAX_ITER", "4", "INPUT.COPY_PASTE.ENABLED", "True",
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", out], str(datasets))
    results = json.load(open(out / "eval_results.json"))
    assert set(results) >= {"bbox", "segm", "defect"}
    for task in ("bbox", "segm"):
        assert {f"AP-{c}" for c in ("scratch", "crack", "spot", "stain", "bubble", "hole")} <= set(results[task])


def test_predict_writes_and_draws_masks(masked, tmp_path, capsys):
    import importlib.util
    import shutil

    from d2_defects.checkpoint import DefectCheckpointer
    from d2_defects.data import register_coco_defects

    root, train_json = masked
    register_coco_defects("masks_predict", train_json, os.path.join(root, "train"))
    opts = [*TINY_OPTS, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "5"]
    cfg = load_config(MASK_CONFIG, opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    DefectCheckpointer(model, save_dir=str(tmp_path)).save("model_random")
    records = DatasetCatalog.get("masks_predict")[:2]
    images = tmp_path / "images"
    images.mkdir()
    for r in records:
        shutil.copy(r["file_name"], images)
    spec = importlib.util.spec_from_file_location("predict_tool", os.path.join(ROOT, "tools", "predict.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "out"
    args = ["--config-file", MASK_CONFIG, "--input", images, "--output", out, "--dataset", "masks_predict", "--draw",
            "--draw-threshold", "0", *opts, "MODEL.WEIGHTS", tmp_path / "model_random.pth"]
    assert tool.main([str(a) for a in args]) == 0, capsys.readouterr().err[-3000:]
    results = json.loads((out / "results.json").read_text())
    files = {i["id"]: os.path.basename(i["file_name"]) for i in json.loads((out / "images.json").read_text())["images"]}
    assert results and all("segmentation" in d for d in results)
    for r in records:
        with torch.no_grad():
            eager = model([DatasetMapper(cfg, is_train=False)(copy.deepcopy(r))])[0]["instances"]
        mine = [d for d in results if files[d["image_id"]] == os.path.basename(r["file_name"])]
        assert len(mine) == len(eager) > 0
        for d, m in zip(mine, eager.pred_masks.numpy()):
            assert np.array_equal(decode_segmentation(d["segmentation"], r["height"], r["width"]), m)
    assert len(list((out / "vis").glob("*.png"))) == 2


@pytest.mark.parametrize("key", ["TEST.SLICE.ENABLED", "INPUT.SLICE.ENABLED"])
def test_box_only_tricks_stop_a_mask_model_with_a_config_error(key):
    from d2_defects.engine.validation import validate_config

    cfg = load_config(MASK_CONFIG, [*TINY_OPTS, key, "True", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
    with pytest.raises(ConfigError, match=rf"{key}: .*MODEL.MASK_ON"):
        validate_config(cfg)


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_tta_masks_equal_detectron2_tta(merge):
    """Cascade Mask R-CNN under TTA (two sizes x horizontal flip): the merged boxes' masks are the mask head's
    probabilities in every view, flipped back and averaged, as Detectron2's GeneralizedRCNNWithTTA computes them
    (the oracle, for the "nms" merge, which is its merge); with one view, the model's own output."""
    from detectron2.layers.mask_ops import paste_masks_in_image
    from detectron2.modeling import GeneralizedRCNNWithTTA

    from d2_defects.inference.export import compare_detections
    from d2_defects.modeling.tta import DefectTTA

    # nms: horizontal flips, as the oracle has; wbf: vertical flips, against the computation written out below
    flip = ["TEST.AUG.FLIP", "True"] if merge == "nms" else ["TEST.AUG.FLIP", "False", "TEST.AUG.VFLIP", "True"]
    aug = ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(96, 128)", "TEST.AUG.MAX_SIZE", "200", *flip,
           "TEST.AUG.MERGE", merge,
           "TEST.DETECTIONS_PER_IMAGE", "1000"]  # random weights: near-equal scores, no top-k cut among them
    cfg = load_config(MASK_CONFIG, [*TINY_OPTS, *aug])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    inp = {"image": image, "height": 120, "width": 160}
    with torch.no_grad():
        ours = DefectTTA(cfg, model).eval()([inp])[0]["instances"]
    assert ours.pred_masks.shape == (len(ours), 120, 160) and len(ours) > 0 and ours.pred_masks.any()
    if merge == "nms":
        with torch.no_grad():
            # the same batches of views (an eager batch zero-pads its views to one size)
            oracle = GeneralizedRCNNWithTTA(cfg, model, batch_size=4)([inp])[0]["instances"]
        diff = compare_detections(oracle, ours, atol=1e-3, score_atol=1e-4)
        assert diff["ok"], diff
        for i, j in diff["pairs"]:
            a, b = oracle.pred_masks[i], ours.pred_masks[j]
            assert int((a ^ b).sum()) <= max(2, 0.01 * int((a | b).sum()))
    else:  # wbf moves the boxes: the masks are the views' averaged probabilities for the fused boxes, v-flips undone
        from detectron2.data.transforms import ResizeShortestEdge
        from detectron2.structures import Boxes, Instances

        hwc = image.permute(1, 2, 0).numpy()
        inputs, given = [], []
        for s in (96, 128):  # DefectTTA's views, in its order, in one batch as it runs them
            view = torch.as_tensor(ResizeShortestEdge(s, 200).get_transform(hwc).apply_image(hwc).copy())
            view = view.permute(2, 0, 1)
            vh, vw = view.shape[-2:]
            for vflip in (False, True):
                b = ours.pred_boxes.tensor.clone() * torch.tensor([vw / 160, vh / 120, vw / 160, vh / 120])
                if vflip:
                    b[:, [1, 3]] = vh - b[:, [3, 1]]
                inputs.append({"image": (view.flip(-2) if vflip else view).contiguous()})
                given.append(Instances((vh, vw), pred_boxes=Boxes(b), pred_classes=ours.pred_classes))
        with torch.no_grad():
            outs = model.inference(inputs, given, do_postprocess=False)
        probs = [o.pred_masks.flip(-2) if k % 2 else o.pred_masks for k, o in enumerate(outs)]
        expected = paste_masks_in_image(torch.stack(probs).mean(0)[:, 0], ours.pred_boxes.tensor, (120, 160))
        assert torch.equal(expected, ours.pred_masks)
    # one view: the plain model's output, masks included
    one = load_config(MASK_CONFIG, [*TINY_OPTS, *aug, "TEST.AUG.MIN_SIZES", "(96,)", "TEST.AUG.FLIP", "False",
                                    "TEST.AUG.VFLIP", "False"])
    from detectron2.data.transforms import ResizeShortestEdge

    hwc = image.permute(1, 2, 0).numpy()
    resized = torch.as_tensor(ResizeShortestEdge(96, 200).get_transform(hwc).apply_image(hwc).copy()).permute(2, 0, 1)
    with torch.no_grad():
        plain = model([{"image": resized.contiguous(), "height": 120, "width": 160}])[0]["instances"]
        single = DefectTTA(one, model).eval()([inp])[0]["instances"]
    assert torch.equal(plain.pred_masks, single.pred_masks) and torch.equal(plain.scores, single.scores)
