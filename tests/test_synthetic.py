import json
import os

import numpy as np

from d2_defects.data import synthetic
from d2_defects.data.synthetic import CLASS_NAMES, CLASS_WEIGHTS, generate_dataset, render_image


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_generator_is_deterministic_for_a_seed(tmp_path):
    a = generate_dataset(str(tmp_path / "a"), num_images=12, seed=5, progress=False)
    b = generate_dataset(str(tmp_path / "b"), num_images=12, seed=5, progress=False)
    c = generate_dataset(str(tmp_path / "c"), num_images=12, seed=6, progress=False)
    assert _read(a["train"]) == _read(b["train"])
    for name in os.listdir(tmp_path / "a" / "train"):
        assert (tmp_path / "a" / "train" / name).read_bytes() == (tmp_path / "b" / "train" / name).read_bytes()
    assert _read(a["train"])["annotations"] != _read(c["train"])["annotations"]


def test_image_does_not_depend_on_the_others():
    img1, _, anns1 = render_image(0, "train", 7)
    img2, _, anns2 = render_image(0, "train", 7)
    np.testing.assert_array_equal(img1, img2)
    assert anns1 == anns2
    img3, _, _ = render_image(0, "val", 7)
    assert img3.shape != img1.shape or not np.array_equal(img3, img1)


def test_dataset_statistics_match_the_design():
    envs, normal, boxes, classes = [], 0, [], []
    n = 600
    for i in range(n):
        img, env, anns = render_image(1, "train", i)
        envs.append(env)
        normal += not anns
        h, w = img.shape[:2]
        assert (img.ndim == 2) == (env == "gray_large")
        for c, (x0, y0, x1, y1) in anns:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            boxes.append((x1 - x0, y1 - y0))
            classes.append(c)
    boxes = np.array(boxes)
    ratio = envs.count("rgb_small") / envs.count("gray_large")
    assert 3.0 < ratio < 5.3
    assert 0.18 < normal / n < 0.32
    counts = np.bincount(classes, minlength=len(CLASS_NAMES))
    assert len(CLASS_NAMES) >= 6 and counts.min() > 0 and counts.max() > 4 * counts.min()
    assert (boxes.max(1) < 32).mean() > 0.3  # many small objects
    aspect = np.maximum(boxes[:, 0] / boxes[:, 1], boxes[:, 1] / boxes[:, 0])
    assert (aspect > 6).mean() > 0.1  # thin scratches / long cracks
    assert abs(sum(CLASS_WEIGHTS) - 1.0) < 1e-9


def test_some_defects_overlap():
    overlaps = 0
    for i in range(300):
        _, _, anns = render_image(2, "train", i)
        b = [a[1] for a in anns]
        for j in range(len(b)):
            for k in range(j + 1, len(b)):
                ix = min(b[j][2], b[k][2]) - max(b[j][0], b[k][0])
                iy = min(b[j][3], b[k][3]) - max(b[j][1], b[k][1])
                overlaps += ix > 0 and iy > 0
    assert overlaps > 0


def test_cli_writes_coco_with_weights(tmp_path):
    from importlib import util

    spec = util.spec_from_file_location("prep", os.path.join(os.path.dirname(__file__), "..", "datasets",
                                                            "prepare_synthetic_defects.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path), "--num-images", "10", "--seed", "1"]) == 0
    coco = _read(tmp_path / "synthetic_defects" / "annotations" / "instances_val.json")
    assert len(coco["images"]) == 2
    assert [c["name"] for c in coco["categories"]] == list(CLASS_NAMES)
    assert abs(sum(c["weight"] for c in coco["categories"]) - 1) < 1e-9
    assert synthetic.CATEGORY_IDS != tuple(range(len(CLASS_NAMES)))  # non-contiguous ids are exercised
