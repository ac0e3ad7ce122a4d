"""Readers/writers for COCO, VOC, YOLO and labelme; manifests; validation cases; ignore; caching."""
import json
import logging
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2_defects.data import DatasetError, load_coco_defects, register_defect_dataset, register_manifest
from d2_defects.data.formats import read_dataset, write_dataset

import data_helpers as H


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    H.write_images(str(root / "IMAGES"))
    H.write_voc_by_hand(str(root / "ANNOTATIONS"))
    H.write_yolo_by_hand(str(root / "labels"))
    H.write_labelme_by_hand(str(root / "labelme"), str(root / "IMAGES"))
    H.write_coco_by_hand(str(root / "coco" / "instances.json"))
    return root


def _paths(root, fmt):
    ann = {"voc": "ANNOTATIONS", "yolo": "labels", "labelme": "labelme", "coco": "coco/instances.json"}[fmt]
    return str(root / ann), str(root / "IMAGES")


@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo", "labelme"])
def test_readers_give_the_hand_written_boxes(fixtures, fmt):
    coco = read_dataset(fmt, *_paths(fixtures, fmt))
    assert sorted(c["name"] for c in coco["categories"]) == sorted(H.CLASSES)
    got = H.boxes_by_image(coco)
    want = H.expected()
    assert got.keys() == want.keys()  # every image listed, the normal one too
    for k in want:
        assert [g[0] for g in got[k]] == [w[0] for w in want[k]], k
        for g, w in zip(got[k], want[k]):
            assert g[0] == w[0] and g[1:] == pytest.approx(w[1:], abs=1e-4)


def test_voc_filename_without_extension_and_images_in_subfolders(tmp_path):
    H.write_images(str(tmp_path / "images" / "1"), ext=".jpg")  # GC10-DET: one folder per class
    H.write_voc_by_hand(str(tmp_path / "lable"), ext=".jpg", with_extension=False)
    coco = read_dataset("voc", str(tmp_path / "lable"), str(tmp_path / "images"))
    assert {img["file_name"] for img in coco["images"]} == {f"1/{n}.jpg" for n in H.GT}
    assert H.boxes_by_image(coco).keys() == H.expected().keys()


@pytest.mark.parametrize("fmt", ["voc", "yolo", "labelme", "coco"])
def test_round_trip_through_every_writer(fixtures, tmp_path, fmt):
    src = read_dataset("coco", *_paths(fixtures, "coco"))
    out = str(tmp_path / ("out.json" if fmt == "coco" else "out"))
    write_dataset(src, fmt, out, image_root=str(fixtures / "IMAGES"))
    back = read_dataset(fmt, out, str(fixtures / "IMAGES"))
    a, b = H.boxes_by_image(src), H.boxes_by_image(back)
    assert a.keys() == b.keys()
    for k in a:
        assert [x[0] for x in a[k]] == [x[0] for x in b[k]]
        for x, y in zip(a[k], b[k]):
            assert x[1:] == pytest.approx(y[1:], abs=1e-3)


def test_manifest_registers_every_format_with_ignore_and_normal_images(fixtures, tmp_path, caplog):
    # relative paths resolve against the manifest's folder
    rel = os.path.relpath(fixtures, tmp_path)
    lines = ["datasets:"]
    for fmt in ("coco", "voc", "yolo", "labelme"):
        ann, img = _paths(fixtures, fmt)
        lines += [f"  - name: mf_{fmt}", f"    format: {fmt}",
                  f"    annotations: {os.path.join(rel, os.path.relpath(ann, fixtures))}",
                  f"    images: {os.path.join(rel, 'IMAGES')}", "    ignore: [背景]"]
    (tmp_path / "m.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.INFO):
        names = register_manifest(str(tmp_path / "m.yaml"))
        recs = {n: DatasetCatalog.get(n) for n in names}
    n_bg = sum(c == "背景" for _, _, b in H.GT.values() for c, *_ in b)
    assert f"ignored category '背景': dropped {n_bg} boxes" in caplog.text
    want = H.expected(drop=("背景",))
    for n, rs in recs.items():
        meta = MetadataCatalog.get(n)
        assert sorted(meta.thing_classes) == ["scratch", "瓶盖破损"], n
        assert len(rs) == len(H.GT), n  # normal images (and the background-only one) are kept
        stems = {os.path.splitext(os.path.basename(r["file_name"]))[0]: r for r in rs}
        for k, boxes in want.items():
            got = sorted((meta.thing_classes[a["category_id"]], *a["bbox"]) for a in stems[k]["annotations"])
            assert [g[0] for g in got] == [b[0] for b in boxes], (n, k)
            for g, b in zip(got, boxes):
                assert g[1:] == pytest.approx((b[1], b[2], b[3] - b[1], b[4] - b[2]), abs=1e-4)
        assert stems["img_e"]["annotations"] == [] and stems["img_c"]["annotations"] == []


def test_class_list_fixes_order_and_reports_unknown_labels(fixtures):
    ann, img = _paths(fixtures, "voc")
    register_defect_dataset("fx_voc_classes", "voc", ann, img, classes=["scratch", "瓶盖破损", "背景"])
    assert MetadataCatalog.get("fx_voc_classes").thing_classes == ["scratch", "瓶盖破损", "背景"]
    register_defect_dataset("fx_voc_unknown", "voc", ann, img, classes=["scratch", "瓶盖破损"])
    with pytest.raises(DatasetError) as e:
        DatasetCatalog.get("fx_voc_unknown")
    assert "unknown class '背景'" in str(e.value) and "img_b.png" in str(e.value)
    # ...unless it is ignored
    register_defect_dataset("fx_voc_ign", "voc", ann, img, classes=["scratch", "瓶盖破损"], ignore=["背景"])
    assert len(DatasetCatalog.get("fx_voc_ign")) == len(H.GT)


def _coco_copy(fixtures, tmp_path):
    coco = json.loads((fixtures / "coco" / "instances.json").read_text(encoding="utf-8"))
    path = tmp_path / "c.json"
    return coco, path


@pytest.mark.parametrize(
    "case,expected",
    [
        ("undecodable", "image file cannot be decoded"),
        ("size", "image size 64x48 differs from the annotation's 65x48"),
        ("empty", "the dataset has no images"),
        ("dup_name", "duplicate file name"),
        ("missing_image_id", "refers to an image id that is not in 'images'"),
    ],
)
def test_more_validation_errors_by_message(fixtures, tmp_path, case, expected):
    coco, path = _coco_copy(fixtures, tmp_path)
    root = fixtures / "IMAGES"
    if case == "undecodable":
        import shutil

        root = tmp_path / "imgs"
        shutil.copytree(fixtures / "IMAGES", root)
        data = (root / "img_a.png").read_bytes()
        (root / "img_a.png").write_bytes(data[: len(data) // 2])  # truncated
    elif case == "size":
        coco["images"][0]["width"] = 65
    elif case == "empty":
        coco["images"] = []
    elif case == "dup_name":
        coco["images"][1]["file_name"] = coco["images"][0]["file_name"]
    elif case == "missing_image_id":
        coco["annotations"][0]["image_id"] = 999
    path.write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        load_coco_defects(str(path), str(root))
    assert expected in str(e.value) and str(path) in str(e.value)
    if case in ("undecodable", "size"):
        assert "image id 100" in str(e.value) and "img_a.png" in str(e.value)


def test_clip_and_warn_modes(fixtures, tmp_path):
    coco, path = _coco_copy(fixtures, tmp_path)
    coco["annotations"][0]["bbox"] = [50.0, 40.0, 30.0, 20.0]  # img_a is 64x48
    path.write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DatasetError, match="lies outside"):
        load_coco_defects(str(path), str(fixtures / "IMAGES"))
    recs = load_coco_defects(str(path), str(fixtures / "IMAGES"), validation="clip")
    assert len(recs) == len(H.GT)
    assert recs[0]["annotations"][0]["bbox"] == [50.0, 40.0, 14.0, 8.0]
    recs = load_coco_defects(str(path), str(fixtures / "IMAGES"), validation="warn")
    assert [r["image_id"] for r in recs] == [101, 102, 103, 104]
    assert json.loads(path.read_text(encoding="utf-8")) == coco  # the source is never modified


def test_checks_run_once_per_process(fixtures, monkeypatch):
    import d2_defects.data.catalog as catalog
    import d2_defects.utils.image_io as image_io
    from d2_defects.data.validation import validate_coco_dict

    ann, img = _paths(fixtures, "coco")
    register_defect_dataset("fx_cached", "coco", ann, img)
    calls = []
    real = catalog.check_coco
    monkeypatch.setattr(catalog, "check_coco", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = DatasetCatalog.get("fx_cached")
    second = DatasetCatalog.get("fx_cached")
    assert len(calls) == 1 and first == second and first is not second
    opened = []
    real_open = image_io.Image.open
    monkeypatch.setattr(image_io.Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    validate_coco_dict(read_dataset("coco", ann, img), ann, img)
    assert opened == []  # image decoding is cached by path, size and mtime


def test_manifest_errors_name_the_entry(tmp_path):
    (tmp_path / "m.yaml").write_text(
        "datasets:\n  - name: a\n    format: pascal\n    annotations: x\n    images: y\n"
        "  - name: b\n    format: voc\n    annotation: x\n    images: y\n", encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        register_manifest(str(tmp_path / "m.yaml"))
    msg = str(e.value)
    assert str(tmp_path / "m.yaml") in msg
    assert "entry 0 (a): unknown format 'pascal'" in msg
    assert "entry 1 (b): missing key(s) ['annotations']" in msg and "unknown key(s) ['annotation']" in msg
