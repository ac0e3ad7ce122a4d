"""Training mapper: default output when the new keys are off, 90-degree rotations, vertical flip,
photometric jitter, copy-paste pixels/boxes, RepeatFactorTrainingSampler on these datasets, and normal
images reaching the train loader of the defect configs."""
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader
from detectron2.data import detection_utils as utils
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.structures import BoxMode

from d2_defects import add_defects_config
from d2_defects.data.augment import Rot90Transform
from d2_defects.data.copy_paste import CopyPaste
from d2_defects.data.mapper import DefectDatasetMapper, build_defect_train_mapper
from d2_defects.engine.launch import load_config
from d2_defects.engine.trainer import Trainer

from conftest import ROOT, SMALL_CONFIG, TINY_OPTS


def _cfg(**over):
    cfg = add_defects_config(get_cfg())
    cfg.DATASETS.TRAIN = ("tiny_defects_train",)
    cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    cfg.SOLVER.IMS_PER_BATCH = 2
    for k, v in over.items():
        node = cfg
        parts = k.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return cfg


def _first_batches(loader, n=3):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
    for ba, bb in zip(batches_a, batches_b):
        for a, b in zip(ba, bb):
            assert a["file_name"] == b["file_name"]
            assert torch.equal(a["image"], b["image"])
            assert torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
            assert torch.equal(a["instances"].gt_classes, b["instances"].gt_classes)


def test_keys_off_give_exactly_detectron2s_default_loader(synthetic_root):
    cfg = _cfg()
    # the project's mapper (it reads 16-bit images), with the same output as Detectron2's for 8-bit images
    assert type(build_defect_train_mapper(cfg)) is DefectDatasetMapper
    np.random.seed(5), torch.manual_seed(5)
    ours = _first_batches(Trainer.build_train_loader(cfg))
    np.random.seed(5), torch.manual_seed(5)
    default = _first_batches(build_detection_train_loader(cfg))
    _same(ours, default)
    # the defect mapper with the keys off also equals DatasetMapper, image by image
    d = DatasetCatalog.get("tiny_defects_train")[0]
    np.random.seed(1)
    a = DefectDatasetMapper(cfg, True, dataset_dicts=[d])(d)
    np.random.seed(1)
    b = DatasetMapper(cfg, True)(d)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_matches_numpy_and_moves_boxes_with_pixels(k):
    h, w = 30, 50
    img = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = 5, 7, 17, 11  # a marked box of pixels
    img[y0:y1, x0:x1] = 255
    t = Rot90Transform(h, w, k)
    out = t.apply_image(img)
    assert np.array_equal(out, np.rot90(img, k))
    box = t.apply_box(np.array([[x0, y0, x1, y1]], dtype=np.float64))[0]
    ys, xs = np.nonzero(out[:, :, 0])
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == pytest.approx(box.tolist())
    assert np.array_equal(t.inverse().apply_image(out), img)


def test_vflip_rot90_photometric_through_the_mapper(synthetic_root):
    recs = DatasetCatalog.get("tiny_defects_train")
    d = next(r for r in recs if r["annotations"])
    base = _cfg(INPUT__RANDOM_FLIP="none")
    ref = DatasetMapper(base, True)(d)
    flipped = build_defect_train_mapper(_cfg(INPUT__RANDOM_FLIP="none", INPUT__VFLIP__ENABLED=True,
                                             INPUT__VFLIP__PROB=1.0))(d)
    assert torch.equal(flipped["image"], ref["image"].flip(1))
    H = ref["image"].shape[1]
    rb, fb = ref["instances"].gt_boxes.tensor, flipped["instances"].gt_boxes.tensor
    assert torch.allclose(fb[:, [1, 3]], H - rb[:, [3, 1]]) and torch.equal(fb[:, [0, 2]], rb[:, [0, 2]])

    rot = build_defect_train_mapper(_cfg(INPUT__RANDOM_FLIP="none", INPUT__ROT90__ENABLED=True,
                                         INPUT__ROT90__PROB=1.0))
    np.random.seed(0)
    out = rot(d)
    assert out["image"].shape[1:] != ref["image"].shape[1:] or not torch.equal(out["image"], ref["image"])
    assert len(out["instances"]) == len(ref["instances"])

    photo = build_defect_train_mapper(_cfg(INPUT__RANDOM_FLIP="none", INPUT__PHOTOMETRIC__ENABLED=True,
                                           INPUT__PHOTOMETRIC__BRIGHTNESS=(1.5, 1.5)))
    out = photo(d)
    assert out["image"].float().mean() > ref["image"].float().mean()
    assert torch.equal(out["instances"].gt_boxes.tensor, rb)


def test_wrong_values_name_the_key(synthetic_root, tmp_path, capsys):
    from detectron2.engine import default_argument_parser

    from conftest import SMALL_CONFIG
    from d2_defects.engine.launch import run

    args = default_argument_parser().parse_args(["--config-file", SMALL_CONFIG, "INPUT.ROT90.PROB", "2.0",
                                                 "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
                                                 "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        run(args)
    assert e.value.code == 2
    assert "ERROR: config error: INPUT.ROT90.PROB must be a probability in [0, 1], got 2.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="INPUT.VFLIP.PROB"):
        build_defect_train_mapper(_cfg(INPUT__VFLIP__ENABLED=True, INPUT__VFLIP__PROB=1.5))
    with pytest.raises(ValueError, match="INPUT.PHOTOMETRIC.CONTRAST"):
        build_defect_train_mapper(_cfg(INPUT__PHOTOMETRIC__ENABLED=True, INPUT__PHOTOMETRIC__CONTRAST=(2.0, 1.0)))
    with pytest.raises(ValueError, match="INPUT.COPY_PASTE.CLASSES"):
        build_defect_train_mapper(_cfg(INPUT__COPY_PASTE__ENABLED=True, INPUT__COPY_PASTE__CLASSES=["nope"]),
                                  dataset_dicts=DatasetCatalog.get("tiny_defects_train"))


def test_copy_paste_boxes_match_pasted_pixels_and_never_cover_defects(synthetic_root):
    recs = DatasetCatalog.get("tiny_defects_train")
    cp = CopyPaste(recs, prob_normal=1.0, prob=1.0, max_objects=3)
    rng = np.random.RandomState(0)
    n_pasted = 0
    for d in recs:
        d = dict(d, annotations=[dict(a) for a in d["annotations"]])
        before = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]]
        img = utils.read_image(d["file_name"], format="BGR").copy()
        orig = img.copy()
        added = cp(img, d, rng=rng)
        n_pasted += len(added)
        assert len(d["annotations"]) == len(before) + len(added)
        changed = np.any(img != orig, axis=2)
        mask = np.zeros_like(changed)
        for a in added:
            x0, y0, x1, y1 = (int(v) for v in a["bbox"])
            mask[y0:y1, x0:x1] = True
            # the pasted pixels are exactly one crop of the bank, with the same class
            crop = img[y0:y1, x0:x1]
            assert any(
                c == a["category_id"] and (bx1 - bx0, by1 - by0) == (x1 - x0, y1 - y0)
                and np.array_equal(utils.read_image(f, format="BGR")[by0:by1, bx0:bx1], crop)
                for f, (bx0, by0, bx1, by1), c, *_ in cp.bank
            )
            for b in before:  # existing defects are not covered
                assert x1 <= b[0] or x0 >= b[2] or y1 <= b[1] or y0 >= b[3]
        assert not (changed & ~mask).any()  # nothing changed outside the pasted boxes
    assert n_pasted > 5


def test_copy_paste_through_the_train_loader_prefers_normal_images(synthetic_root):
    cfg = _cfg(INPUT__COPY_PASTE__ENABLED=True, INPUT__COPY_PASTE__PROB=0.0, INPUT__COPY_PASTE__PROB_NORMAL=1.0)
    recs = DatasetCatalog.get("tiny_defects_train")
    mapper = build_defect_train_mapper(cfg, dataset_dicts=recs)
    np.random.seed(0)
    for d in recs:
        out = mapper(d)
        if d["annotations"]:
            assert len(out["instances"]) == len(d["annotations"])  # PROB 0: untouched
        else:
            assert len(out["instances"]) >= 1  # normal images get pasted defects
    batch = next(iter(Trainer.build_train_loader(cfg)))
    assert len(batch) == 2 and all("instances" in b for b in batch)


def test_repeat_factor_sampler_works_with_normal_images_and_copy_paste(synthetic_root):
    cfg = _cfg(DATALOADER__SAMPLER_TRAIN="RepeatFactorTrainingSampler", DATALOADER__REPEAT_THRESHOLD=0.3,
               INPUT__COPY_PASTE__ENABLED=True)
    recs = DatasetCatalog.get("tiny_defects_train")
    factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(recs, 0.3, sqrt=True)
    # oracle: r(c) = max(1, sqrt(t / f(c))), image factor = max over its classes, 1 for normal images
    n = len(recs)
    freq = {}
    for r in recs:
        for c in {a["category_id"] for a in r["annotations"]}:
            freq[c] = freq.get(c, 0) + 1 / n
    for r, f in zip(recs, factors.tolist()):
        cats = {a["category_id"] for a in r["annotations"]}
        want = max([max(1.0, (0.3 / freq[c]) ** 0.5) for c in cats], default=1.0)
        assert f == pytest.approx(want, rel=1e-5)
    assert max(factors.tolist()) > 1.0
    loader = Trainer.build_train_loader(cfg)
    ds, samplers = loader, []
    while hasattr(ds, "dataset"):  # DataLoader -> AspectRatioGroupedDataset -> ToIterableDataset
        ds = ds.dataset
        samplers.append(getattr(ds, "sampler", None))
    assert any(isinstance(s, RepeatFactorTrainingSampler) for s in samplers)
    it = iter(loader)
    for _ in range(3):
        assert len(next(it)) == 2


def _instances_per_image(loader, num_distinct, max_batches=60):
    """{image_id: number of boxes} of the loader's samples, until ``num_distinct`` images were seen."""
    seen, it = {}, iter(loader)
    for _ in range(max_batches):
        for d in next(it):
            seen[d["image_id"]] = len(d["instances"])
        if len(seen) >= num_distinct:
            break
    return seen


@pytest.mark.parametrize("config", [os.path.join(ROOT, "configs", "Base-Defects-RCNN-FPN.yaml"), SMALL_CONFIG])
def test_defect_configs_keep_normal_images_in_the_train_loader(synthetic_root, config):
    cfg = load_config(config, [*TINY_OPTS, "DATASETS.TRAIN", "('tiny_defects_train',)", "DATASETS.TEST", "()"])
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False
    recs = DatasetCatalog.get("tiny_defects_train")
    normal = {r["image_id"] for r in recs if not r["annotations"]}
    assert normal and len(normal) < len(recs)
    seen = _instances_per_image(Trainer.build_train_loader(cfg), len(recs))
    assert set(seen) == {r["image_id"] for r in recs}
    assert all(seen[i] == 0 for i in normal) and all(seen[i] > 0 for i in set(seen) - normal)
    # control: with Detectron2's default the same loader never yields them
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    seen = _instances_per_image(Trainer.build_train_loader(cfg), len(recs) - len(normal))
    assert set(seen) == {r["image_id"] for r in recs} - normal
