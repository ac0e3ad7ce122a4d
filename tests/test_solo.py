"""DefectSOLO: Matrix NMS against a naive reference, grid targets (box vs mass centre), learning masks on CPU
(mask AP on held-out scenes), config errors, and the train_net / export contract."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import d2_defects  # noqa: F401
from d2_defects.engine.launch import load_config
from d2_defects.layers.matrix_nms import matrix_nms
from d2_defects.modeling.meta_arch.solo import dice_loss, mass_centers
from d2_defects.utils.errors import ConfigError

from conftest import ROOT, TINY_OPTS, run_train_net

SOLO_CONFIG = os.path.join(ROOT, "configs", "synthetic", "solo_r18_cpu.yaml")


# ------------------------------------------------------------------------------------------------ Matrix NMS
def _naive_matrix_nms(masks, labels, scores, kernel, sigma):
    """The paper's definition, pair by pair: decay_j = min(1, min over higher-scoring i of the same class of
    f(iou(i, j)) / f(max IoU of i with a higher-scoring mask of its class))."""
    masks = [np.asarray(m, bool) for m in masks]
    order = sorted(range(len(scores)), key=lambda k: -float(scores[k]))

    def iou(a, b):
        inter = np.logical_and(masks[a], masks[b]).sum()
        union = np.logical_or(masks[a], masks[b]).sum()
        return inter / union if union else 0.0

    def f(x):
        return np.exp(-sigma * x * x) if kernel == "gaussian" else 1 - x

    out = {}
    for rank, j in enumerate(order):
        decay = 1.0
        for i in order[:rank]:
            if labels[i] != labels[j]:
                continue
            above_i = [iou(k, i) for k in order[:order.index(i)] if labels[k] == labels[i]]
            c = max(above_i) if above_i else 0.0
            decay = min(decay, f(iou(i, j)) / max(f(c), 1e-6))
        out[j] = float(scores[j]) * decay
    return [out[k] for k in range(len(scores))]


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_nms_equals_the_naive_reference(kernel):
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 12
        masks = np.zeros((n, 24, 24), bool)
        for k in range(n):  # overlapping rectangles so that many pairs have IoU between 0 and 1
            x0, y0 = rng.integers(0, 14, 2)
            masks[k, y0:y0 + rng.integers(4, 10), x0:x0 + rng.integers(4, 10)] = True
        labels = rng.integers(0, 3, n)
        scores = rng.permutation(np.linspace(0.2, 0.95, n))  # no ties
        got = matrix_nms(torch.from_numpy(masks), torch.from_numpy(labels), torch.tensor(scores, dtype=torch.float64),
                         kernel=kernel, sigma=2.0)
        want = _naive_matrix_nms(masks, labels, scores, kernel, 2.0)
        assert np.allclose(got.numpy(), want, atol=1e-9), trial
        assert (got.numpy() <= scores + 1e-12).all()
        assert (got.numpy() < scores - 1e-6).any()  # something was decayed


def test_matrix_nms_decays_a_duplicate_and_not_another_class():
    m = torch.zeros(3, 10, 10, dtype=torch.bool)
    m[:, 2:8, 2:8] = True
    out = matrix_nms(m, torch.tensor([0, 0, 1]), torch.tensor([0.9, 0.8, 0.7]), kernel="linear")
    assert out[0] == pytest.approx(0.9) and out[1] == pytest.approx(0.0) and out[2] == pytest.approx(0.7)


# ------------------------------------------------------------------------------------------------ targets
def _solo(opts=()):
    cfg = load_config(SOLO_CONFIG, [*TINY_OPTS, *opts])
    torch.manual_seed(0)
    return build_model(cfg)


def _instances(masks, classes, size):
    inst = Instances(size)
    bm = BitMasks(torch.as_tensor(np.stack(masks)))
    inst.gt_masks = bm
    inst.gt_boxes = bm.get_bounding_boxes()
    inst.gt_classes = torch.as_tensor(classes)
    return inst


def test_box_and_mass_centres_assign_different_cells():
    """An L-shaped defect: its mass centre lies far from its box centre; each CENTER setting puts the positive
    cells around its own centre, and the mask targets are the area-downsampled mask."""
    H = W = 128
    m = np.zeros((H, W), bool)
    m[20:100, 20:30] = True   # vertical bar
    m[90:100, 20:100] = True  # foot
    inst = _instances([m], [4], (H, W))
    box_c = ((20 + 100) / 2, (20 + 100) / 2)
    mass = mass_centers(torch.as_tensor(m)[None], inst.gt_boxes.tensor)[0]
    ys, xs = np.nonzero(m)
    assert mass.tolist() == pytest.approx([xs.mean() + 0.5, ys.mean() + 0.5])
    for center, (cx, cy) in (("box", box_c), ("mass", mass.tolist())):
        model = _solo(["MODEL.SOLO.CENTER", center])
        targets = model.targets_single(inst, (H, W))
        level = [k for k, (lo, hi) in enumerate(model.scale_ranges) if lo <= 80 <= hi][-1]
        s = model.num_grids[level]
        t = targets[level]
        pos = t["pos"].tolist()
        assert pos and all(t["labels"][p] == 4 for p in pos)
        assert (t["labels"] != model.num_classes).sum() == len(pos)
        rows, cols = [p // s for p in pos], [p % s for p in pos]
        assert int(cy / H * s) in rows and int(cx / W * s) in cols  # the centre's own cell
        assert max(rows) - min(rows) <= 2 and max(cols) - min(cols) <= 2  # at most 3 x 3 cells
        small = torch.nn.functional.avg_pool2d(torch.as_tensor(m, dtype=torch.float32)[None, None], model.head_stride)
        assert torch.allclose(t["masks"][0], small[0, 0])
    box_cells = set(_solo(["MODEL.SOLO.CENTER", "box"]).targets_single(inst, (H, W))[level]["pos"].tolist())
    mass_cells = set(_solo(["MODEL.SOLO.CENTER", "mass"]).targets_single(inst, (H, W))[level]["pos"].tolist())
    assert box_cells != mass_cells


def test_dice_loss_is_zero_for_a_perfect_mask_and_one_for_a_disjoint_one():
    t = torch.zeros(2, 8, 8)
    t[:, 2:5, 2:5] = 1
    perfect = torch.where(t > 0, 30.0, -30.0)
    disjoint = torch.where(t > 0, -30.0, 30.0)
    assert dice_loss(perfect, t).tolist() == pytest.approx([0, 0], abs=1e-3)
    assert dice_loss(disjoint, t).tolist() == pytest.approx([1, 1], abs=1e-3)


# ------------------------------------------------------------------------------------------------ learning
def _scenes(n, seed, size=96):
    """Dark scenes with 1-2 bright discs or squares, all of class 0 (the masks are under test, not the shape
    classification): (image CHW uint8, Instances)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(n):
        img = rng.normal(40, 8, (size, size)).clip(0, 255)
        masks, classes = [], []
        for _ in range(rng.integers(1, 3)):
            r = rng.uniform(8, 16)
            cx, cy = rng.uniform(r, size - r, 2)
            c = int(rng.integers(0, 2))
            m = (np.hypot(xx + 0.5 - cx, yy + 0.5 - cy) < r) if c == 0 else \
                ((np.abs(xx + 0.5 - cx) < r * 0.8) & (np.abs(yy + 0.5 - cy) < r * 0.8))
            if any((m & o).any() for o in masks):
                continue
            img[m] = 200 if c == 0 else 150
            masks.append(m)
            classes.append(0)
        image = torch.as_tensor(np.repeat(img[None], 3, 0).astype(np.uint8))
        out.append((image, _instances(masks, classes, (size, size))))
    return out


def _mask_ap50(model, scenes):
    """COCO segm AP50 (pycocotools) of ``model`` on ``scenes``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from d2_defects.utils.masks import encode_mask

    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "defect"}]}
    dets = []
    model.eval()
    for k, (image, inst) in enumerate(scenes):
        h, w = inst.image_size
        gt["images"].append({"id": k + 1, "height": h, "width": w})
        for m, c, box in zip(inst.gt_masks.tensor.numpy(), inst.gt_classes.tolist(), inst.gt_boxes.tensor.tolist()):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": k + 1, "category_id": c + 1,
                                      "segmentation": encode_mask(m), "area": float(m.sum()), "iscrowd": 0,
                                      "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
        with torch.no_grad():
            r = model([{"image": image}])[0]["instances"]
        for m, c, s in zip(r.pred_masks.numpy(), r.pred_classes.tolist(), r.scores.tolist()):
            dets.append({"image_id": k + 1, "category_id": c + 1, "segmentation": encode_mask(m), "score": s})
    if not dets:
        return 0.0
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(dets), "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    return float(ev.stats[1])


def test_solo_learns_masks_on_held_out_scenes():
    opts = ["MODEL.SOLO.NUM_CLASSES", "1", "MODEL.SOLO.IN_FEATURES", "['p3', 'p4']", "MODEL.SOLO.NUM_GRIDS", "[12, 8]",
            "MODEL.SOLO.SCALE_RANGES", "[[1, 24], [12, 96]]", "MODEL.SOLO.MASK_IN_FEATURES", "['p2', 'p3', 'p4']",
            "MODEL.SOLO.HEAD_CHANNELS", "32", "MODEL.SOLO.MASK_CHANNELS", "32", "MODEL.SOLO.HEAD_STRIDE", "4",
            "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32"]
    model = _solo(opts)
    train, held_out = _scenes(48, seed=1), _scenes(12, seed=2)
    before = _mask_ap50(model, held_out)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    with EventStorage():
        for step in range(160):
            batch = [{"image": im, "instances": inst} for im, inst in (train[(2 * step) % 48], train[(2 * step + 1) % 48])]
            losses = model(batch)
            loss = sum(losses.values())
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = _mask_ap50(model, held_out)
    assert before < 0.1 and after > 0.5, (before, after)


# ------------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("opts, key", [
    (["MODEL.SOLO.CENTER", "middle"], "MODEL.SOLO.CENTER"),
    (["MODEL.SOLO.NMS_KERNEL", "hard"], "MODEL.SOLO.NMS_KERNEL"),
    (["MODEL.SOLO.NUM_GRIDS", "[12, 8]"], "MODEL.SOLO.NUM_GRIDS"),
    (["MODEL.SOLO.HEAD_STRIDE", "2"], "MODEL.SOLO.HEAD_STRIDE"),
    (["MODEL.SOLO.IN_FEATURES", "['p2', 'p3', 'p9']", "MODEL.SOLO.NUM_GRIDS", "[4, 4, 4]"], "MODEL.SOLO.IN_FEATURES"),
    (["MODEL.SOLO.MASK_CHANNELS", "48"], "MASK_CHANNELS"),
    (["MODEL.MASK_ON", "False"], "MODEL.MASK_ON"),
])
def test_solo_config_errors_name_the_key(opts, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _solo(opts)


def test_solo_trains_and_evaluates_through_train_net(tmp_path):
    from d2_defects.data import generate_dataset

    datasets = tmp_path / "datasets"
    generate_dataset(str(datasets / "synthetic_defects"), num_images=12, seed=3, val_fraction=4 / 12, progress=False)
    out = tmp_path / "run"
    opts = [*TINY_OPTS, "MODEL.SOLO.SCORE_THRESH_TEST", "0.0", "MODEL.SOLO.UPDATE_THRESH_TEST", "0.0"]
    run_train_net(["--config-file", SOLO_CONFIG, *opts, "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", out], str(datasets))
    results = json.load(open(out / "eval_results.json"))
    assert {"bbox", "segm"} <= set(results) and "AP-crack" in results["segm"]
    # --eval-only of the saved model gives the evaluation after training
    again = tmp_path / "eval"
    run_train_net(["--config-file", SOLO_CONFIG, "--eval-only", *opts, "MODEL.WEIGHTS", out / "model_final.pth",
                   "OUTPUT_DIR", again], str(datasets))
    assert json.load(open(again / "eval_results.json"))["segm"] == results["segm"]


def test_solo_on_a_box_dataset_and_export_stop_with_one_error(tmp_path):
    from d2_defects.inference.export import ExportError, check_exportable

    with pytest.raises(ExportError, match="MODEL.META_ARCHITECTURE DefectSOLO"):
        check_exportable(load_config(SOLO_CONFIG, TINY_OPTS))
    with pytest.raises(ConfigError, match="TEST.AUG.ENABLED"):
        from d2_defects.modeling.tta import tta_options

        tta_options(load_config(SOLO_CONFIG, [*TINY_OPTS, "TEST.AUG.ENABLED", "True"]))
