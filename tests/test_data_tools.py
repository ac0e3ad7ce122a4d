"""Dataset tools: splits, conversion, checks, analysis, anchor clustering, training samples, and a
train_net.py run on a manifest-registered VOC dataset."""
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from d2_defects.data.anchors import anchor_shapes, box_shapes, cluster_anchors, coverage, shape_iou
from d2_defects.data.formats import read_dataset, write_dataset
from d2_defects.data.split import kfold_images, split_images

from conftest import ROOT, SMALL_CONFIG, TINY_OPTS, run_train_net
from data_helpers import boxes_by_image


def _tool(name):
    """The tool's main, in this process, with its error handling (``ERROR:`` line, exit code 2)."""
    from d2_defects.utils.errors import run_cli

    main = runpy.run_path(os.path.join(ROOT, "tools", f"{name}.py"), run_name="tool")["main"]
    return lambda argv: run_cli(main, argv, exit=False)


def _run_tool(name, args):
    """Run a tool as a user would (subprocess)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny_coco(synthetic_root):
    base = os.path.join(synthetic_root, "synthetic_defects")
    return os.path.join(base, "annotations", "instances_train.json"), os.path.join(base, "train")


@pytest.fixture(scope="module")
def big_coco():
    """A larger synthetic set (generated once, images not written) for the split/anchor statistics."""
    from d2_defects.data.synthetic import generate_dataset
    import tempfile

    out = tempfile.mkdtemp()
    generate_dataset(out, num_images=120, seed=1, val_fraction=0.2, progress=False)
    with open(os.path.join(out, "annotations", "instances_train.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("method", ["random", "stratified", "interval"])
def test_splits_are_deterministic_disjoint_and_complete(big_coco, method):
    a = split_images(big_coco, method, (0.8, 0.2), seed=3)
    b = split_images(big_coco, method, (0.8, 0.2), seed=3)
    assert a == b
    assert not set(a[0]) & set(a[1])
    assert sorted(a[0] + a[1]) == sorted(img["id"] for img in big_coco["images"])
    assert abs(len(a[1]) - 0.2 * len(big_coco["images"])) <= 6
    if method == "interval":  # every 5th image in file order
        order = [img["id"] for img in sorted(big_coco["images"], key=lambda i: i["file_name"])]
        assert a[1] == order[4::5]
    if method == "random":
        assert split_images(big_coco, method, (0.8, 0.2), seed=4) != a


def test_stratified_split_keeps_every_class_in_both_parts(big_coco):
    tr, va = split_images(big_coco, "stratified", (0.75, 0.25), seed=0)
    img_cls = {}
    for ann in big_coco["annotations"]:
        img_cls.setdefault(ann["image_id"], set()).add(ann["category_id"])
    for c in {a["category_id"] for a in big_coco["annotations"]}:
        n_tr = sum(c in img_cls.get(i, ()) for i in tr)
        n_va = sum(c in img_cls.get(i, ()) for i in va)
        if n_tr + n_va >= 4:
            assert n_va >= 1 and n_tr >= n_va, c
    normal = {img["id"] for img in big_coco["images"]} - set(img_cls)
    assert len(normal & set(va)) == pytest.approx(0.25 * len(normal), abs=1)


def test_kfold_folds_partition_the_images(big_coco):
    folds = kfold_images(big_coco, 4, seed=0)
    assert folds == kfold_images(big_coco, 4, seed=0)
    flat = [i for f in folds for i in f]
    assert sorted(flat) == sorted(img["id"] for img in big_coco["images"]) and len(set(flat)) == len(flat)
    assert max(map(len, folds)) - min(map(len, folds)) <= 6


def test_shape_iou_matches_torchvision(big_coco):
    wh = box_shapes(big_coco)[:50]
    anchors = anchor_shapes([[16], [32]], [[0.5, 1.0, 2.0]])
    centred = lambda s: torch.tensor(np.concatenate([-s / 2, s / 2], axis=1))
    assert np.allclose(shape_iou(wh, anchors), box_iou(centred(wh), centred(anchors)).numpy())
    # Detectron2's anchor generator gives the same shapes
    from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

    gen = DefaultAnchorGenerator(sizes=[[16], [32]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[4, 8])
    cells = torch.cat([c for c in gen.cell_anchors]).numpy()
    assert np.allclose(np.stack([cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]], 1), anchors)


def test_clustered_anchors_raise_coverage_on_synthetic_data(big_coco):
    wh = box_shapes(big_coco, 256, 600)
    for sizes, ratios in ([[[32], [64], [128], [256], [512]], [[0.5, 1.0, 2.0]]],
                          [[[8, 16], [24, 32], [48, 64], [96, 128], [192, 256]], [[0.25, 1.0, 4.0]]]):
        before = coverage(wh, anchor_shapes(sizes, ratios))
        new_sizes, new_ratios = cluster_anchors(wh, 5, len(sizes[0]), 3)
        after = coverage(wh, anchor_shapes(new_sizes, new_ratios))
        assert after["mean_best_iou"] > before["mean_best_iou"]
        assert after["share_ge_0.5"] >= before["share_ge_0.5"]
        flat = [s for lvl in new_sizes for s in lvl]
        assert flat == sorted(flat) and len(new_sizes) == 5


def test_cluster_anchors_tool_prints_config_lines(synthetic_root, capsys, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", synthetic_root)
    main = _tool("cluster_anchors")
    assert main(["--config", SMALL_CONFIG, "--dataset", "tiny_defects_train",
                 "MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128], [256], [512]]",
                 "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[0.5, 1.0, 2.0]]"]) == 0
    out = capsys.readouterr().out
    assert "MODEL.ANCHOR_GENERATOR.SIZES" in out and "ASPECT_RATIOS: [[" in out
    rows = [l for l in out.splitlines() if l.startswith("| config") or l.startswith("| clustered")]
    before, after = (float(r.split("|")[2]) for r in rows)
    assert after > before


def test_convert_split_check_analyze_tools(tmp_path, tiny_coco, capsys):
    json_file, images = tiny_coco
    # COCO -> VOC with a Chinese rename, then VOC -> COCO through the tool
    coco = read_dataset("coco", json_file, images)
    write_dataset(coco, "voc", str(tmp_path / "voc"))
    out = tmp_path / "conv.json"
    assert _tool("convert_dataset")(["--format", "voc", "--annotations", str(tmp_path / "voc"), "--images", images,
                                     "--rename", "scratch=划痕", "--output", str(out)]) == 0
    conv = json.loads(out.read_text(encoding="utf-8"))
    assert "划痕" in {c["name"] for c in conv["categories"]} and len(conv["annotations"]) == len(coco["annotations"])
    assert _tool("convert_dataset")(["--format", "voc", "--annotations", str(tmp_path / "voc"), "--images", images,
                                     "--output", str(out)]) == 2  # refused: exists
    assert "(use --overwrite" in capsys.readouterr().err

    # split: prints per-class counts, writes disjoint jsons
    assert _tool("split_dataset")(["--format", "coco", "--annotations", str(out), "--images", images,
                                   "--method", "stratified", "--fractions", "0.75", "0.25",
                                   "--output-dir", str(tmp_path / "splits")]) == 0
    printed = capsys.readouterr().out
    assert "| 划痕 |" in printed and "(normal images)" in printed
    tr = json.loads((tmp_path / "splits" / "train.json").read_text(encoding="utf-8"))
    va = json.loads((tmp_path / "splits" / "val.json").read_text(encoding="utf-8"))
    assert not {i["id"] for i in tr["images"]} & {i["id"] for i in va["images"]}
    assert len(tr["images"]) + len(va["images"]) == len(coco["images"])

    # check: a bad box is found, a fixed copy is written, the source stays as it was
    bad = json.loads(out.read_text(encoding="utf-8"))
    bad["annotations"][0]["bbox"] = [1.0, 1.0, 5000.0, 3.0]
    (tmp_path / "bad.json").write_text(json.dumps(bad, ensure_ascii=False), encoding="utf-8")
    src_text = (tmp_path / "bad.json").read_text(encoding="utf-8")
    check = _tool("check_dataset")
    assert check(["--format", "coco", "--annotations", str(tmp_path / "bad.json"), "--images", images,
                  "--fix-output", str(tmp_path / "fixed.json")]) == 1
    printed = capsys.readouterr().out
    assert f"annotation id {bad['annotations'][0]['id']}" in printed and "lies outside" in printed
    assert (tmp_path / "bad.json").read_text(encoding="utf-8") == src_text
    assert check(["--format", "coco", "--annotations", str(tmp_path / "fixed.json"), "--images", images]) == 0
    assert check(["--format", "coco", "--annotations", str(tmp_path / "bad.json"), "--images", images,
                  "--clip"]) == 0

    # analyze: tables and PNGs
    assert _tool("analyze_dataset")(["--format", "coco", "--annotations", str(out), "--images", images,
                                     "--config", SMALL_CONFIG, "--output-dir", str(tmp_path / "an")]) == 0
    assert "| 划痕 |" in (tmp_path / "an" / "tables.md").read_text(encoding="utf-8")
    assert len(list((tmp_path / "an").glob("*.png"))) >= 3


@pytest.mark.parametrize("name", ["check_dataset", "convert_dataset", "split_dataset", "analyze_dataset",
                                  "cluster_anchors", "visualize_data"])
def test_tools_have_help(name, capsys):
    main = runpy.run_path(os.path.join(ROOT, "tools", f"{name}.py"), run_name="tool")["main"]
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_tool_error_is_one_line(tmp_path):
    proc = _run_tool("convert_dataset", ["--format", "voc", "--annotations", tmp_path / "nope", "--images",
                                         tmp_path, "--output", tmp_path / "o.json"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR:")]
    assert errors == [f"ERROR: VOC annotation folder not found: {tmp_path / 'nope'}"]


def test_visualize_data_draws_augmented_samples(synthetic_root, tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog
    from detectron2.data.transforms import ResizeShortestEdge
    from PIL import Image

    monkeypatch.setenv("DETECTRON2_DATASETS", synthetic_root)
    main = _tool("visualize_data")
    assert main(["--config", SMALL_CONFIG, "--output", str(tmp_path / "vis"), "--num-images", "6",
                 "DATASETS.TRAIN", "('tiny_defects_train',)", "INPUT.MIN_SIZE_TRAIN", "(96,)",
                 "INPUT.MAX_SIZE_TRAIN", "600", "INPUT.COPY_PASTE.ENABLED", "True",
                 "INPUT.ROT90.ENABLED", "True", "INPUT.ROT90.PROB", "1.0"]) == 0
    assert len(list((tmp_path / "vis").glob("*.png"))) == 6
    samples = json.loads((tmp_path / "vis" / "samples.json").read_text(encoding="utf-8"))
    recs = {r["file_name"]: r for r in DatasetCatalog.get("tiny_defects_train")}
    assert len(samples) == 6 and all(r["width"] > r["height"] for r in recs.values())  # landscape sources
    rotated = 0
    for s in samples:
        h, w = recs[s["file_name"]]["height"], recs[s["file_name"]]["width"]
        upright = ResizeShortestEdge.get_output_shape(h, w, 96, 600)
        turned = ResizeShortestEdge.get_output_shape(w, h, 96, 600)  # rotated by 90/270 before the resize
        assert (s["height"], s["width"]) in (upright, turned)
        rotated += (s["height"], s["width"]) == turned
        with Image.open(tmp_path / "vis" / s["png"]) as im:
            assert im.size == (s["width"], s["height"])  # the drawn PNG has the sample's size
        boxes = np.asarray(s["boxes"]).reshape(-1, 4)
        assert len(boxes) >= len(recs[s["file_name"]]["annotations"])  # copy-paste only adds
        assert (boxes[:, :2] >= 0).all()
        assert (boxes[:, 2] <= s["width"]).all() and (boxes[:, 3] <= s["height"]).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert rotated >= 1  # PROB 1.0: 90, 180 or 270 degrees; at least one sample turned on its side


def test_tools_read_a_manifest_entry(voc_manifest, tmp_path, capsys):
    manifest = str(voc_manifest / "manifest.yaml")
    train = voc_manifest / "train"
    src = read_dataset("voc", str(train / "Annotations"), str(train / "JPEGImages"))
    want = boxes_by_image(src, drop=("背景",))
    assert _tool("split_dataset")(["--manifest", manifest, "--dataset", "voc_train", "--method", "interval",
                                   "--every", "4", "--output-dir", str(tmp_path / "splits")]) == 0
    printed = capsys.readouterr().out
    assert "| 瓶盖破损 |" in printed and "背景" not in printed
    got = {}
    for split in ("train", "val"):
        part = json.loads((tmp_path / "splits" / f"{split}.json").read_text(encoding="utf-8"))
        assert "背景" not in {c["name"] for c in part["categories"]}
        got.update(boxes_by_image(part))
    assert got == want  # every image and box of the entry, without the ignored class, in exactly one split

    assert _tool("check_dataset")(["--manifest", manifest, "--dataset", "voc_train"]) == 0
    out, err = capsys.readouterr()
    n_boxes = sum(map(len, want.values()))
    assert f"voc_train: {len(want)} images, {n_boxes} boxes, " in out and "; 0 problem(s) in 0 image(s)" in out
    assert "checking images of voc_train" in err  # tqdm bar


def _table_rows(text, first):
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first}")]


def test_analyze_dataset_numbers_match_an_independent_count(tiny_coco, tmp_path):
    from detectron2.data.transforms import ResizeShortestEdge, ResizeTransform
    from pycocotools.cocoeval import Params

    json_file, images = tiny_coco
    short, max_size = 384, 500  # 256x192 and 512x384 images: the max size decides, with exact factors
    assert _tool("analyze_dataset")(["--format", "coco", "--annotations", json_file, "--images", images,
                                     "--config", SMALL_CONFIG, "--output-dir", str(tmp_path / "an"),
                                     "INPUT.MIN_SIZE_TRAIN", f"({short},)", "INPUT.MAX_SIZE_TRAIN",
                                     str(max_size)]) == 0
    text = (tmp_path / "an" / "tables.md").read_text(encoding="utf-8")
    coco = json.loads(open(json_file, encoding="utf-8").read())
    imgs = {i["id"]: i for i in coco["images"]}
    lim = dict(zip(Params(iouType="bbox").areaRngLbl, Params(iouType="bbox").areaRng))

    normal = len(imgs) - len({a["image_id"] for a in coco["annotations"]})
    assert normal > 0
    head = next(line for line in text.splitlines() if line.startswith("images: "))
    assert head.startswith(f"images: {len(imgs)}, boxes: {len(coco['annotations'])}, normal images: {normal} (")
    assert float(head.rsplit("(", 1)[1].rstrip("%)")) == pytest.approx(100 * normal / len(imgs), abs=0.051)

    rows = {r[0]: r for r in _table_rows(text, "") if len(r) == 7 and r[0] != "class"}
    buckets = set()
    for cat in coco["categories"]:
        anns = [a for a in coco["annotations"] if a["category_id"] == cat["id"]]
        row = rows[cat["name"]]
        assert int(row[1]) == len(anns) and int(row[2]) == len({a["image_id"] for a in anns})
        if not anns:
            continue
        wh = np.array([a["bbox"][2:] for a in anns], dtype=np.float64)
        resized = []
        for a in anns:
            img = imgs[a["image_id"]]
            newh, neww = ResizeShortestEdge.get_output_shape(img["height"], img["width"], short, max_size)
            x, y, w, h = a["bbox"]
            resize = ResizeTransform(img["height"], img["width"], newh, neww)
            box = resize.apply_box(np.array([[x, y, x + w, y + h]]))[0]
            resized.append([box[2] - box[0], box[3] - box[1]])
        resized = np.array(resized)
        area = resized[:, 0] * resized[:, 1]
        sml = [int(((area >= lim[k][0]) & (area < lim[k][1])).sum()) for k in ("small", "medium", "large")]
        assert row[5] == "/".join(map(str, sml)), cat["name"]
        buckets |= {k for k, n in zip(("small", "medium", "large"), sml) if n}
        for col, arr in ((3, wh), (4, resized)):
            w_med, h_med = (float(v) for v in row[col].split(" x "))
            assert (w_med, h_med) == pytest.approx(tuple(np.median(arr, axis=0)), abs=0.051), (cat["name"], col)
        assert float(row[6]) == pytest.approx(np.median(wh[:, 1] / wh[:, 0]), abs=0.0051)
    assert buckets == {"small", "medium", "large"}  # the resize spreads the boxes over all three
    sizes = {f"{i['width']}x{i['height']}": 0 for i in imgs.values()}
    for i in imgs.values():
        sizes[f"{i['width']}x{i['height']}"] += 1
    assert {r[0]: int(r[1]) for r in _table_rows(text, "") if r[0] in sizes} == sizes


@pytest.fixture(scope="module")
def voc_manifest(synthetic_root, tmp_path_factory):
    """The tiny synthetic data as a VOC dataset with a Chinese class and an ignored "背景" class."""
    root = tmp_path_factory.mktemp("vocds")
    base = os.path.join(synthetic_root, "synthetic_defects")
    for split in ("train", "val"):
        coco = read_dataset("coco", os.path.join(base, "annotations", f"instances_{split}.json"),
                            os.path.join(base, split))
        for c in coco["categories"]:
            if c["name"] == "stain":
                c["name"] = "瓶盖破损"
        coco["categories"].append({"id": 99, "name": "背景"})
        for img in coco["images"][:3]:  # whole-image background boxes, to be ignored
            coco["annotations"].append({"id": 10000 + img["id"], "image_id": img["id"], "category_id": 99,
                                        "bbox": [0, 0, img["width"], img["height"]], "iscrowd": 0})
        write_dataset(coco, "voc", str(root / split / "Annotations"))
        os.symlink(os.path.join(base, split), root / split / "JPEGImages")
    (root / "manifest.yaml").write_text(
        "datasets:\n"
        + "".join(f"  - name: voc_{s}\n    format: voc\n    annotations: {s}/Annotations\n"
                  f"    images: {s}/JPEGImages\n    ignore: [背景]\n" for s in ("train", "val")),
        encoding="utf-8")
    return root


def test_train_net_on_a_manifest_registered_voc_dataset(voc_manifest, tmp_path):
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--manifest", voc_manifest / "manifest.yaml", *TINY_OPTS,
                          "DATASETS.TRAIN", "('voc_train',)", "DATASETS.TEST", "('voc_val',)",
                          "SOLVER.MAX_ITER", "2", "INPUT.VFLIP.ENABLED", "True", "INPUT.COPY_PASTE.ENABLED", "True",
                          "OUTPUT_DIR", tmp_path], str(tmp_path))
    log = proc.stdout + proc.stderr
    assert "ignored category '背景': dropped" in log
    assert (tmp_path / "model_final.pth").exists()
    res = json.loads((tmp_path / "eval_results.json").read_text(encoding="utf-8"))["bbox"]
    assert "AP-瓶盖破损" in res and "AP-背景" not in res


def test_unknown_dataset_name_is_one_line(voc_manifest, tmp_path, capsys):
    from detectron2.engine import default_argument_parser

    from d2_defects.engine.launch import run

    args = default_argument_parser().parse_args(
        ["--config-file", SMALL_CONFIG, *TINY_OPTS, "DATASETS.MANIFEST", str(voc_manifest / "manifest.yaml"),
         "DATASETS.TRAIN", "('voc_trian',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        run(args)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "ERROR: DATASETS.TRAIN/TEST: 1 problem(s) found" in err
    assert "dataset 'voc_trian' is not registered" in err and "voc_train" in err
