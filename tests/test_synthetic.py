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


def test_large_preset_has_large_images_and_small_defects():
    sizes, normal, sides = set(), 0, []
    for i in range(40):
        img, env, anns = render_image(0, "train", i, preset="large")
        h, w = img.shape[:2]
        sizes.add((w, h, img.ndim == 2))
        normal += not anns
        for _, (x0, y0, x1, y1) in anns:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            sides.append(max(x1 - x0, y1 - y0))
    assert sizes == {(2048, 1536, True), (1600, 1200, False)}
    assert 3 <= min(sides) and max(sides) <= 45 and np.median(sides) < 25  # a 1333-px resize shrinks them below 12 px
    assert 0.05 < normal / 40 < 0.5
    img, _, anns = render_image(0, "train", 3, preset="large")
    img2, _, anns2 = render_image(0, "train", 3, preset="large")
    np.testing.assert_array_equal(img, img2)
    assert anns == anns2
    # its own generator stream: not the default preset's image at a larger size
    assert render_image(0, "train", 3)[2] != anns


def test_cli_large_preset_is_registered_under_its_own_names(tmp_path):
    from importlib import util

    from detectron2.data import DatasetCatalog

    from d2_defects.data.builtin import register_synthetic_defects

    spec = util.spec_from_file_location("prep", os.path.join(os.path.dirname(__file__), "..", "datasets",
                                                            "prepare_synthetic_defects.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path), "--preset", "large", "--num-images", "5"]) == 0
    assert not (tmp_path / "synthetic_defects").exists()
    names = register_synthetic_defects(str(tmp_path), prefix="tmp_large", dirname="synthetic_defects_large")
    assert names == ["tmp_large_train", "tmp_large_val"]
    records = DatasetCatalog.get("tmp_large_train")  # passes the dataset checks
    assert len(records) == 4 and {(r["width"], r["height"]) for r in records} <= {(2048, 1536), (1600, 1200)}
    assert _read(tmp_path / "synthetic_defects_large" / "annotations" / "instances_val.json")["info"]["preset"] == "large"
