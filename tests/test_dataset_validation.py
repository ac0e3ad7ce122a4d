import json
import os
import re
import shutil

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2_defects.data import DatasetError, load_coco_defects, register_coco_defects
from d2_defects.data.manifest import register_from_config
from d2_defects.engine.launch import load_config

from conftest import SMALL_CONFIG, TINY_OPTS, run_train_net
from data_helpers import capture_logs


def _copy_dataset(synthetic_root, tmp_path):
    src = os.path.join(synthetic_root, "synthetic_defects")
    dst = tmp_path / "synthetic_defects"
    shutil.copytree(src, dst)
    path = dst / "annotations" / "instances_train.json"
    return dst, path, json.loads(path.read_text())


def test_loader_maps_ids_keeps_normal_images_and_sets_metadata(synthetic_root):
    base = os.path.join(synthetic_root, "synthetic_defects")
    json_file = os.path.join(base, "annotations", "instances_train.json")
    coco = json.load(open(json_file))
    recs = load_coco_defects(json_file, os.path.join(base, "train"), "tmp_loader_ds")
    assert len(recs) == len(coco["images"])
    assert sum(len(r["annotations"]) for r in recs) == len(coco["annotations"])
    assert any(not r["annotations"] for r in recs)  # normal images are kept
    meta = MetadataCatalog.get("tmp_loader_ds")
    assert sorted(meta.thing_dataset_id_to_contiguous_id.values()) == list(range(len(meta.thing_classes)))
    assert abs(sum(meta.thing_class_weights) - 1) < 1e-6
    assert {a["category_id"] for r in recs for a in r["annotations"]} <= set(range(len(meta.thing_classes)))


@pytest.mark.parametrize(
    "break_it,expected",
    [
        (lambda c, d: c["annotations"][0].__setitem__("category_id", 42), "unknown category id 42"),
        (lambda c, d: c["annotations"][0].__setitem__("bbox", [250.0, 10.0, 900.0, 5.0]), "lies outside"),
        (lambda c, d: os.remove(d / "train" / c["images"][0]["file_name"]), "image file not found"),
        (lambda c, d: c["annotations"][0].__setitem__("bbox", [5.0, 5.0, 0.0, 4.0]), "non-positive"),
        (lambda c, d: c["images"][1].__setitem__("id", c["images"][0]["id"]), "duplicate image id"),
    ],
)
def test_bad_records_raise_one_error_naming_them(synthetic_root, tmp_path, break_it, expected):
    dst, path, coco = _copy_dataset(synthetic_root, tmp_path)
    break_it(coco, dst)
    path.write_text(json.dumps(coco))
    with pytest.raises(DatasetError) as e:
        load_coco_defects(str(path), str(dst / "train"))
    msg = str(e.value)
    assert expected in msg and str(path) in msg
    if "annotation" in expected or expected in ("unknown category id 42", "lies outside", "non-positive"):
        assert f"annotation id {coco['annotations'][0]['id']}" in msg
    if expected == "image file not found":
        assert coco["images"][0]["file_name"] in msg


def test_warn_mode_drops_only_bad_images(synthetic_root, tmp_path):
    dst, path, coco = _copy_dataset(synthetic_root, tmp_path)
    bad_image = coco["annotations"][0]["image_id"]
    coco["annotations"][0]["category_id"] = 42
    path.write_text(json.dumps(coco))
    recs = load_coco_defects(str(path), str(dst / "train"), validation="warn")
    assert len(recs) == len(coco["images"]) - 1
    assert bad_image not in {r["image_id"] for r in recs}


def test_train_net_reports_a_bad_dataset_in_one_line(synthetic_root, tmp_path):
    dst, path, coco = _copy_dataset(synthetic_root, tmp_path)
    coco["annotations"][1]["category_id"] = 99
    path.write_text(json.dumps(coco))
    proc = run_train_net(
        ["--config-file", SMALL_CONFIG, *TINY_OPTS, "DATASETS.TRAIN", "('synthetic_defects_train',)",
         "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "out")],
        str(tmp_path), check=False,
    )
    assert proc.returncode == 2
    err_lines = [l for l in proc.stderr.splitlines() if l.startswith("ERROR:")]
    assert len(err_lines) == 1 and "unknown category id 99" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(path) in proc.stderr


def test_register_rejects_wrong_number_of_class_weights(synthetic_root):
    base = os.path.join(synthetic_root, "synthetic_defects")
    with pytest.raises(ValueError, match="2 class weights given for 6 classes"):
        register_coco_defects("tmp_bad_weights", os.path.join(base, "annotations", "instances_val.json"),
                              os.path.join(base, "val"), class_weights=[0.5, 0.5])
    DatasetCatalog.remove("tmp_bad_weights") if "tmp_bad_weights" in DatasetCatalog.list() else None


def test_image_checks_log_counts_and_time(synthetic_root, tmp_path):
    dst, path, coco = _copy_dataset(synthetic_root, tmp_path)  # new paths: not in this process's cache
    os.remove(dst / "train" / coco["images"][0]["file_name"])
    n = len(coco["images"])
    with capture_logs("d2_defects.data.validation") as msgs:
        load_coco_defects(str(path), str(dst / "train"), validation="warn")
        load_coco_defects(str(path), str(dst / "train"), validation="warn")
    lines = [m for m in msgs if "image files in" in m]
    head = re.escape(f"{path}: checked {n} image files in ") + r"\d+\.\d s "
    assert len(lines) == 2, msgs
    assert re.fullmatch(head + re.escape(f"({n - 1} decoded, 0 from this process's cache, 1 missing)"), lines[0])
    assert re.fullmatch(head + re.escape(f"(0 decoded, {n - 1} from this process's cache, 1 missing)"), lines[1])
    with capture_logs("d2_defects.data.validation") as msgs:
        load_coco_defects(str(path), str(dst / "train"), validation="none")
    assert not [m for m in msgs if "image files in" in m]  # no checks, no decoding


def test_validation_and_ignore_keys_apply_to_manifest_datasets_only(synthetic_root, tmp_path):
    base = os.path.join(synthetic_root, "synthetic_defects")
    (tmp_path / "m.yaml").write_text(
        f"datasets:\n  - name: tiny_manifest_train\n    format: coco\n"
        f"    annotations: {os.path.join(base, 'annotations', 'instances_train.json')}\n"
        f"    images: {os.path.join(base, 'train')}\n", encoding="utf-8")
    builtin_classes = list(MetadataCatalog.get("tiny_defects_train").thing_classes)
    assert "stain" in builtin_classes
    opts = ["DATASETS.MANIFEST", str(tmp_path / "m.yaml"), "DATASETS.IGNORE_CATEGORIES", "['stain']",
            "DATASETS.TEST", "()"]
    with capture_logs("d2_defects.data.manifest") as msgs:
        register_from_config(load_config(SMALL_CONFIG, opts + ["DATASETS.TRAIN", "('tiny_manifest_train',)"]))
    assert MetadataCatalog.get("tiny_manifest_train").thing_classes == [c for c in builtin_classes if c != "stain"]
    assert not [m for m in msgs if "MANIFEST only" in m]
    with capture_logs("d2_defects.data.manifest") as msgs:
        register_from_config(load_config(SMALL_CONFIG, opts + ["DATASETS.TRAIN", "('tiny_defects_train',)"]))
    assert MetadataCatalog.get("tiny_defects_train").thing_classes == builtin_classes
    warning = "apply to the datasets of DATASETS.MANIFEST only; tiny_defects_train keep(s)"
    assert any(warning in m for m in msgs), msgs
