"""Export to TorchScript / ONNX Runtime / OpenVINO: parity with the eager model, the shipped post-processing,
errors of the export tool."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes

from conftest import ROOT, TINY_OPTS
from d2_defects.checkpoint import DefectCheckpointer
from d2_defects.engine.launch import load_config
from d2_defects.inference import deploy_postprocess
from d2_defects.inference.export import (
    FORMATS, ExportError, ExportedDetector, check_exportable, check_parity, check_sliced_parity, compare_detections,
    export_model, load_exported, load_samples, sliced_exported,
)
from d2_defects.modeling.postprocess import PostprocessParams, select_detections

CONFIGS = {name: os.path.join(ROOT, "configs", "synthetic", f"{name}_r18_cpu.yaml")
           for name in ("cascade", "faster", "fcos", "defect_rcnn")}
SOFT_NMS = ["MODEL.SOFT_NMS.ENABLED", "True",
            "MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS", "[0.05, 0.12, 0.05, 0.2, 0.05, 0.1]",
            "TEST.DETECTIONS_PER_IMAGE", "1000"]  # decayed duplicates make the cut


def _model(name, *opts):
    cfg = load_config(CONFIGS[name], TINY_OPTS + list(opts))
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


def _images(cfg):
    """Two test-size samples (one is traced) and an image of another size than any sample."""
    other = torch.randint(0, 256, (3, 96, 144), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return load_samples(cfg, None, 2) + [other]


# ---------------------------------------------------------------------------------------------------------
# the shipped post-processing against the project's own


def _candidates(seed, n=400, num_classes=4, size=(120, 160)):
    """Clustered random boxes (many overlaps), some empty after clipping, scores with exact ties."""
    g = np.random.default_rng(seed)
    h, w = size
    centers = g.uniform([-10, -10], [w + 10, h + 10], (n // 8, 2)).repeat(8, axis=0)
    xy = centers + g.normal(0, 4, (n, 2))
    wh = g.uniform(2, 40, (n, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(np.float32)
    boxes[:5] = [w + 5, 10, w + 20, 30]  # entirely right of the image: empty after clipping
    scores = g.uniform(0, 1, n).astype(np.float32)
    scores[10:20] = scores[10]  # ties
    return boxes, scores, g.integers(0, num_classes, n)


@pytest.mark.parametrize("setting", ["nms", "nms_per_class", "linear", "gaussian", "hard", "topk_all",
                                     "fragments", "fragments_drop"])
@pytest.mark.parametrize("seed", [0, 1])
def test_deploy_postprocess_equals_select_detections(setting, seed):
    """postprocess.py (numpy) == select_detections + Detectron2's clip / empty-box filter, incl. order."""
    boxes, scores, classes = _candidates(seed)
    params = PostprocessParams(score_thresh=0.1, nms_thresh=0.5, topk_per_image=50,
                               soft_nms=setting in ("linear", "gaussian", "hard"), soft_nms_method=setting
                               if setting in ("linear", "gaussian", "hard") else "linear", soft_nms_iou_thresh=0.4,
                               soft_nms_score_thresh=0.05)
    if setting == "nms_per_class":
        params.score_thresh_per_class = [0.1, 0.5, 0.3, 0.8]
    if setting == "topk_all":
        params.topk_per_image = -1
    if setting.startswith("fragments"):
        params.fragment_decay, params.fragment_factor = True, 0.5 if setting == "fragments" else 0.0
        params.soft_nms, params.soft_nms_method = True, "gaussian"
    keep, final = select_detections(torch.as_tensor(boxes), torch.as_tensor(scores), torch.as_tensor(classes), params)
    if setting.startswith("fragments"):  # the decay acted: some kept detections lost score or were dropped
        params.fragment_decay = False
        keep_plain, final_plain = select_detections(torch.as_tensor(boxes), torch.as_tensor(scores),
                                                    torch.as_tensor(classes), params)
        params.fragment_decay = True
        assert len(keep) < len(keep_plain) if setting == "fragments_drop" else not torch.equal(keep, keep_plain)
    expected = Boxes(torch.as_tensor(boxes)[keep])
    expected.clip((120, 160))
    nonempty = expected.nonempty()
    d = {k: v for k, v in vars(params).items() if k != "defer_nms"}
    b, s, c = deploy_postprocess.postprocess(boxes, scores, classes, d, (120, 160))
    assert 0 < len(b) < nonempty.numel() or setting == "topk_all"
    assert not bool(nonempty.all())  # the empty-box filter was exercised
    np.testing.assert_array_equal(c, classes[keep.numpy()][nonempty.numpy()])
    np.testing.assert_array_equal(b, expected.tensor[nonempty].numpy())
    np.testing.assert_allclose(s, final[nonempty].numpy(), rtol=0, atol=1e-7)


def test_deploy_postprocess_scales_to_output_size():
    boxes = np.array([[10, 20, 30, 40], [50, 10, 90, 60]], dtype=np.float32)
    b, s, c = deploy_postprocess.postprocess(boxes, np.array([0.9, 0.8], np.float32), np.array([0, 1]), None,
                                             (60, 80), output_size=(120, 100))
    np.testing.assert_allclose(b, [[12.5, 40, 37.5, 80], [62.5, 20, 100, 120]])  # x2 clipped to the width


def test_compare_detections_is_order_free_and_strict():
    from detectron2.structures import Instances

    def inst(boxes, scores, classes):
        return Instances((100, 100), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                         scores=torch.tensor(scores), pred_classes=torch.tensor(classes))

    a = inst([[0, 0, 10, 10], [5, 5, 20, 20]], [0.5, 0.5], [0, 1])
    assert compare_detections(a, inst([[5, 5, 20, 20], [0, 0, 10, 10]], [0.5, 0.5], [1, 0]))["ok"]
    assert not compare_detections(a, inst([[5, 5, 20, 20], [0, 0, 10, 10]], [0.5, 0.5], [0, 1]))["ok"]  # classes
    shifted = compare_detections(a, inst([[0, 0, 10, 10.01], [5, 5, 20, 20]], [0.5, 0.5], [0, 1]))
    assert not shifted["ok"] and shifted["unmatched"] == 1
    assert not compare_detections(a, inst([[0, 0, 10, 10]], [0.5], [0]))["ok"]


# ---------------------------------------------------------------------------------------------------------
# parity per meta-architecture and format


@pytest.fixture(scope="module")
def models():
    return {name: _model(name) for name in CONFIGS}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_parity(models, name, fmt, tmp_path):
    """Cascade and Faster R-CNN with the project's heads, DefectFCOS, DefectRCNN (defect_score), every format:
    the exported file in its runtime + postprocess.py gives the eager detections, also at an untraced size."""
    cfg, model = models[name]
    images = _images(cfg)
    files = export_model(model, images[0], str(tmp_path), fmt)
    assert all(os.path.isfile(f) for f in files) and (tmp_path / "postprocess.py").is_file()
    exported = load_exported(str(tmp_path), fmt)
    report = check_parity(model, exported, images)
    assert min(report["num_detections"]) > 0
    assert report["max_box_diff"] <= 1e-3 and report["max_score_diff"] <= 1e-4
    info = json.loads((tmp_path / "postprocess.json").read_text())
    assert info["postprocess"]["topk_per_image"] == cfg.TEST.DETECTIONS_PER_IMAGE
    # the graph returns candidates (NMS runs in postprocess.py): more rows than final detections
    raw = exported.raw(images[2])
    assert len(raw[0]) > report["num_detections"][2]
    if name == "defect_rcnn":
        assert info["outputs"][-1] == "defect_score" and raw[-1].shape == ()
        zeros = torch.zeros_like(images[2])
        with torch.no_grad():
            eager = model([{"image": zeros}])[0]["defect_score"]
        got = exported(zeros)["defect_score"]
        assert got == pytest.approx(eager, abs=1e-5) and abs(got - exported(images[2])["defect_score"]) > 1e-6


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("name", ["cascade", "fcos"])
def test_export_parity_soft_nms_per_class_thresholds(name, fmt, tmp_path):
    """Soft-NMS and per-class thresholds run in postprocess.py and match the eager model; they really act."""
    # gaussian for the (random-init) FCOS, whose boxes rarely overlap by more than 0.5
    cfg, model = _model(name, *SOFT_NMS, "MODEL.SOFT_NMS.METHOD", "linear" if name == "cascade" else "gaussian")
    images = _images(cfg)
    export_model(model, images[0], str(tmp_path), fmt)
    exported = load_exported(str(tmp_path), fmt)
    report = check_parity(model, exported, images)
    assert min(report["num_detections"]) > 0
    info = json.loads((tmp_path / "postprocess.json").read_text())["postprocess"]
    assert info["soft_nms"] and info["score_thresh_per_class"][3] == 0.2
    # the same graph with hard NMS gives other detections: soft-NMS is applied after the graph
    hard = exported(images[1])
    exported.info["postprocess"] = dict(info, soft_nms=False)
    assert len(exported(images[1])["instances"]) != len(hard["instances"]) or not torch.equal(
        exported(images[1])["instances"].scores, hard["instances"].scores)
    # and a parity check with the wrong settings fails
    with pytest.raises(ExportError, match="differs from the eager model on sample 0"):
        check_parity(model, exported, images)


def test_parity_check_fails_for_other_weights(models, tmp_path):
    cfg, model = models["cascade"]
    images = _images(cfg)
    export_model(model, images[0], str(tmp_path), "onnx")
    other = build_model(cfg).eval()  # other random weights
    with pytest.raises(ExportError, match="detections|differs"):
        check_parity(other, load_exported(str(tmp_path), "onnx"), images)


def test_exported_onnx_runs_without_torch(models, tmp_path):
    """What ships (model.onnx, postprocess.py, postprocess.json) runs with onnxruntime and numpy only."""
    cfg, model = models["fcos"]
    images = _images(cfg)
    export_model(model, images[0], str(tmp_path), "onnx")
    np.save(tmp_path / "image.npy", images[2].numpy())
    script = (
        "import sys, json; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1])\n"
        "import numpy as np, onnxruntime as ort, postprocess\n"
        "info = json.load(open(sys.argv[1] + '/postprocess.json'))\n"
        "image = np.load(sys.argv[1] + '/image.npy')\n"
        "out = ort.InferenceSession(sys.argv[1] + '/model.onnx').run(None, {'image': image})\n"
        "b, s, c = postprocess.postprocess(out[0], out[2], out[1], info['postprocess'], image.shape[-2:])\n"
        "np.save(sys.argv[1] + '/boxes.npy', b)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        eager = model([{"image": images[2]}])[0]["instances"].pred_boxes.tensor.numpy()
    got = np.load(tmp_path / "boxes.npy")
    assert len(got) == len(eager) > 0
    np.testing.assert_allclose(np.sort(got, axis=0), np.sort(eager, axis=0), atol=1e-3)


def test_missing_runtime_package_is_named(models, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else find_spec(n, *a))
    cfg, model = models["cascade"]
    with pytest.raises(ExportError, match="needs the openvino package"):
        export_model(model, _images(cfg)[0], str(tmp_path), "openvino")
    assert not (tmp_path / "model.xml").exists()


def test_settings_that_cannot_be_exported_name_the_key(tmp_path):
    with pytest.raises(ExportError, match="TEST.AUG.ENABLED"):
        check_exportable(load_config(CONFIGS["cascade"], TINY_OPTS + ["TEST.AUG.ENABLED", "True"]))
    check_exportable(load_config(CONFIGS["cascade"], TINY_OPTS + ["TEST.SLICE.ENABLED", "True"]))  # tiles in Python
    with pytest.raises(ExportError, match="MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD=0.2"):
        check_exportable(load_config(CONFIGS["defect_rcnn"], TINY_OPTS + ["MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD", "0.2"]))
    check_exportable(load_config(CONFIGS["defect_rcnn"], TINY_OPTS))


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_deformable_convs(fmt, tmp_path):
    """DCNv2 backbone: TorchScript and ONNX (DeformConv, opset 19) keep parity; OpenVINO is a clear error."""
    cfg, model = _model("cascade", "MODEL.BACKBONE.NAME", "build_resnet_dcn_fpn_backbone",
                        "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, False, True, True]",
                        "MODEL.RESNETS.DEFORM_MODULATED", "True")
    for m in model.modules():  # non-zero offsets and masks, so that the deformation is exercised
        if hasattr(m, "conv_offset"):
            torch.nn.init.normal_(m.conv_offset.weight, std=0.01)
    images = _images(cfg)
    if fmt == "openvino":
        with pytest.raises(ExportError, match="^OpenVINO cannot convert deformable convolutions .* use --format onnx"):
            export_model(model, images[0], str(tmp_path), fmt)
        assert not (tmp_path / "model.xml").exists()
        return
    export_model(model, images[0], str(tmp_path), fmt)
    report = check_parity(model, load_exported(str(tmp_path), fmt), images)
    assert min(report["num_detections"]) > 0
    if fmt == "onnx":
        import onnx

        num_dcn = sum(hasattr(m, "conv_offset") for m in model.modules())
        graph = onnx.load(str(tmp_path / "model.onnx"))
        assert sum(n.op_type == "DeformConv" for n in graph.graph.node) == num_dcn > 0


# ---------------------------------------------------------------------------------------------------------
# Mask R-CNN heads: the masks of the kept candidates, pasted by postprocess.py


def test_deploy_paste_masks_equals_detectron2():
    """postprocess.py's numpy paste against Detectron2's paste_masks_in_image: sub-pixel and large boxes, boxes on
    the image border, non-square images."""
    from detectron2.layers.mask_ops import paste_masks_in_image

    rng = np.random.default_rng(0)
    pixels = 0
    for size in [(80, 120), (61, 47)]:
        for _ in range(20):
            n, m = 6, int(rng.choice([14, 28]))
            masks = rng.random((n, m, m)).astype(np.float32)
            wh = np.stack([rng.uniform(0.3, size[1], n), rng.uniform(0.3, size[0], n)], 1)
            x0y0 = rng.uniform(0, 1, (n, 2)) * (np.array(size[::-1]) - wh)
            boxes = np.concatenate([x0y0, x0y0 + wh], 1).astype(np.float32)
            ref = paste_masks_in_image(torch.as_tensor(masks), torch.as_tensor(boxes), size).numpy()
            got = deploy_postprocess.paste_masks(masks, boxes, size)
            assert got.dtype == bool and got.shape == ref.shape and np.array_equal(got, ref)
            pixels += int(ref.sum())
    assert pixels > 10000
    # boxes as clipping leaves them: the whole image, on the right / bottom edge, thinner than a pixel
    h, w = 61, 47
    boxes = np.array([[0, 0, w, h], [w - 0.8, 10.2, w, 10.9], [20.2, 30.2, 20.9, 30.9],  # a pixel centre inside
                      [5, h - 2.5, 5.001, h], [0, 0, 0.4, 30], [w - 0.3, 10, w, 10.2]], np.float32)
    masks = np.random.default_rng(1).random((len(boxes), 28, 28)).astype(np.float32) * 0.5 + 0.5
    ref = paste_masks_in_image(torch.as_tensor(masks), torch.as_tensor(boxes), (h, w)).numpy()
    got = deploy_postprocess.paste_masks(masks, boxes, (h, w))
    assert np.array_equal(got, ref) and ref[0].sum() > 0.9 * h * w and ref[1].any() and ref[2].any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_mask_rcnn_parity(fmt, tmp_path):
    """Cascade Mask R-CNN: the graph also returns every candidate's mask probabilities; postprocess.py keeps those
    of the kept detections and pastes them: the eager masks, pixel for pixel up to OpenVINO's rounding."""
    cfg = load_config(os.path.join(ROOT, "configs", "synthetic", "cascade_mask_r18_cpu.yaml"), TINY_OPTS)
    check_exportable(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = _images(cfg)
    export_model(model, images[0], str(tmp_path), fmt)
    exported = load_exported(str(tmp_path))
    assert exported.outputs == ["boxes", "classes", "scores", "masks"]
    report = check_parity(model, exported, images)
    assert min(report["num_detections"]) > 0 and report["max_mask_diff"] <= (0.01 if fmt == "openvino" else 0.0)
    # masks pasted at another output size, as the eager model pastes them for an input's height / width
    with torch.no_grad():
        eager = model([{"image": images[2], "height": 150, "width": 200}])[0]["instances"]
    got = ExportedDetector(exported)([{"image": images[2], "height": 150, "width": 200}])[0]["instances"]
    assert got.pred_masks.shape == (len(got), 150, 200) and got.pred_masks.dtype == torch.bool
    diff = compare_detections(eager, got)
    assert diff["ok"] and 0 < int(got.pred_masks.sum())
    assert max(int((eager.pred_masks[i] ^ got.pred_masks[j]).sum()) for i, j in diff["pairs"]) <= (
        20 if fmt == "openvino" else 0)
    # a mask moved by a few pixels is caught and named
    def shifted(image):
        out = exported(image)
        out["instances"].pred_masks = torch.roll(out["instances"].pred_masks, 3, dims=2)
        return out

    with pytest.raises(ExportError, match="a mask differs in .* of its pixels"):
        check_parity(model, shifted, images[:1])


# ---------------------------------------------------------------------------------------------------------
# sliced inference with an exported model

SLICE_OPTS = ["TEST.SLICE.ENABLED", "True", "TEST.SLICE.SIZE", "(64, 80)", "TEST.SLICE.OVERLAP", "0.25",
              "TEST.SLICE.INCLUDE_FULL", "True", "INPUT.MIN_SIZE_TEST", "64",
              "TEST.DETECTIONS_PER_IMAGE", "1000"]  # random weights: near-equal scores, no rank-100 cut among them


@pytest.mark.parametrize("merge", ["nms", "wbf"])
@pytest.mark.parametrize("name,fmt", [("cascade", "onnx"), ("fcos", "torchscript")])
def test_sliced_exported_equals_eager_sliced(name, fmt, merge, tmp_path):
    """Tiles, per-tile resize and the single merge run in Python around the exported graph: the same detections as
    the eager model's sliced inference, boxes all over the image (not only the first tile), exact against plain
    inference when one tile covers the image."""
    cfg, model = _model(name, *SLICE_OPTS, "TEST.SLICE.MERGE", merge)
    originals = load_samples(cfg, None, 2, resize=False)
    assert tuple(originals[0].shape[1:]) == (120, 160)  # 1.5 tiles high: a 3 x 3 grid
    export_model(model, load_samples(cfg, None, 1)[0], str(tmp_path), fmt)
    exported = load_exported(str(tmp_path))  # the format from postprocess.json
    assert exported.fmt == fmt and json.loads((tmp_path / "postprocess.json").read_text())["num_classes"] == 6
    report = check_sliced_parity(cfg, model, exported, originals)
    assert min(report["num_detections"]) > 0
    got = sliced_exported(cfg, exported)([{"image": originals[0]}])[0]["instances"]
    assert got.image_size == (120, 160) and got.pred_boxes.tensor[:, 2].max() > 80  # beyond the first tile column
    # a grid of one tile and no whole-image view: exactly the exported model's plain inference on the resized tile
    one = load_config(CONFIGS[name], TINY_OPTS + SLICE_OPTS + ["TEST.SLICE.SIZE", "(120, 160)",
                                                             "TEST.SLICE.INCLUDE_FULL", "False"])
    single = sliced_exported(one, exported)([{"image": originals[0]}])[0]["instances"]
    from detectron2.data.transforms import ResizeShortestEdge

    hwc = originals[0].permute(1, 2, 0).numpy()
    resized = ResizeShortestEdge([64, 64], 160).get_transform(hwc).apply_image(hwc)
    resized = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    plain = ExportedDetector(exported)([{"image": resized, "height": 120, "width": 160}])[0]["instances"]
    assert torch.equal(single.pred_boxes.tensor, plain.pred_boxes.tensor) and torch.equal(single.scores, plain.scores)


def test_exported_detector_reports_boxes_at_the_requested_size(models, tmp_path):
    """ExportedDetector scales and clips like Detectron2's detector_postprocess: the eager model's output for an input
    resized from another size."""
    cfg, model = models["cascade"]
    image = _images(cfg)[0]
    export_model(model, image, str(tmp_path), "torchscript")
    h, w = image.shape[1:]
    inputs = [{"image": image, "height": 2 * h + 3, "width": w // 2}]
    with torch.no_grad():
        eager = model(inputs)[0]["instances"]
    got = ExportedDetector(load_exported(str(tmp_path)))(inputs)[0]["instances"]
    assert got.image_size == eager.image_size == (2 * h + 3, w // 2)
    diff = compare_detections(eager, got)
    assert diff["ok"] and len(eager) > 0, diff


def test_load_exported_names_a_folder_without_an_export(tmp_path):
    with pytest.raises(ExportError, match="postprocess.json not found: not a folder written by tools/export_model.py"):
        load_exported(str(tmp_path))
    (tmp_path / "postprocess.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match="not a postprocess.json written by tools/export_model.py"):
        load_exported(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# the tool: exit codes and one ERROR line


def _run_export_tool(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_model.py")] + [str(a) for a in args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_export_tool_writes_checks_and_protects(models, tmp_path):
    cfg, model = models["defect_rcnn"]
    DefectCheckpointer(model, save_dir=str(tmp_path)).save("model_random")
    out = tmp_path / "export"
    args = ["--config-file", CONFIGS["defect_rcnn"], "--output", out, "--format", "onnx", "--num-samples", "2",
            *TINY_OPTS, "MODEL.WEIGHTS", tmp_path / "model_random.pth"]
    proc = _run_export_tool(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity of onnx + postprocess.py with the eager model on 2 images" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"model.onnx", "postprocess.py", "postprocess.json"}
    proc = _run_export_tool(args)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR:")]
    assert proc.returncode == 2 and len(errors) == 1 and "--overwrite" in errors[0]


def test_export_tool_sliced_checks_sliced_parity_and_predict_runs_the_export(models, tmp_path):
    """export_model.py with TEST.SLICE: the slice settings in postprocess.json and a second parity check on tiles;
    predict.py --exported then gives the eager sliced detections; bad --exported input is one ERROR line."""
    cfg, model = models["cascade"]
    DefectCheckpointer(model, save_dir=str(tmp_path)).save("model_random")
    out = tmp_path / "export"
    opts = [*TINY_OPTS, *SLICE_OPTS, "MODEL.WEIGHTS", tmp_path / "model_random.pth"]
    proc = _run_export_tool(["--config-file", CONFIGS["cascade"], "--output", out, "--format", "onnx",
                             "--num-samples", "2", *opts])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity of sliced inference (64x80 px tiles) with onnx and the eager model on 2 images" in proc.stdout
    info = json.loads((out / "postprocess.json").read_text())
    assert info["slice"]["size"] == [64, 80] and info["slice"]["include_full"] is True

    images = tmp_path / "images"
    images.mkdir()
    import cv2

    for i, sample in enumerate(load_samples(load_config(CONFIGS["cascade"], TINY_OPTS + SLICE_OPTS), None, 2,
                                            resize=False)):
        cv2.imwrite(str(images / f"s{i}.png"), sample.permute(1, 2, 0).numpy())
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)

    def predict(*extra):
        return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "predict.py"), "--config-file",
                               CONFIGS["cascade"], "--input", images, *map(str, extra)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    # the eager model one tile per forward pass, as the runtime runs them (sliced_exported's docstring)
    runs = {"eager": predict("--output", tmp_path / "eager", *opts, "TEST.SLICE.BATCH", "1"),
            "exported": predict("--output", tmp_path / "exported", "--exported", out, *TINY_OPTS, *SLICE_OPTS)}
    for proc in runs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    res = {k: sorted((d["image_id"], d["category_id"], round(d["score"], 4)) for d in
                     json.loads((tmp_path / k / "results.json").read_text())) for k in runs}
    assert len(res["eager"]) > 0 and res["exported"] == res["eager"]
    boxes = {k: np.array(sorted(d["bbox"] for d in json.loads((tmp_path / k / "results.json").read_text())))
             for k in runs}
    np.testing.assert_allclose(boxes["exported"], boxes["eager"], atol=1e-3)

    for extra, message in [((tmp_path / "nothing",), "postprocess.json not found"),
                           ((out, "TEST.AUG.ENABLED", "True"), "test-time augmentation"),
                           ((out, "INPUT.FORMAT", "RGB"), "INPUT.FORMAT RGB (exported with BGR)"),
                           ((out, "INPUT.MIN_SIZE_TEST", "80"), "INPUT.MIN_SIZE_TEST 80 (exported with 64)"),
                           ((out, "MODEL.ROI_HEADS.NMS_THRESH_TEST", "0.6"), "postprocessing nms_thresh"),
                           ((out, "MODEL.FRAGMENT_DECAY.ENABLED", "True"), "postprocessing fragment_decay"),
                           ((out, "TEST.SLICE.OVERLAP", "0.5"), "TEST.SLICE overlap")]:
        proc = predict("--output", tmp_path / "bad", "--exported", *extra[:1], *TINY_OPTS, *SLICE_OPTS, *extra[1:])
        errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "bad" / "results.json").exists()


def test_export_tool_untraceable_model_is_one_error_line(models, tmp_path):
    """DefectRCNN that skips the heads below a threshold cannot be traced (data-dependent): one ERROR line."""
    cfg, model = models["defect_rcnn"]
    DefectCheckpointer(model, save_dir=str(tmp_path)).save("model_random")
    proc = _run_export_tool(["--config-file", CONFIGS["defect_rcnn"], "--output", tmp_path / "export", "--format",
                             "openvino", *TINY_OPTS, "MODEL.WEIGHTS", tmp_path / "model_random.pth",
                             "MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD", "0.2"])
    errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "cannot trace DefectRCNN" in errors[0] and "MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD" in errors[0]
    assert not (tmp_path / "export" / "model.xml").exists()


# ---------------------------------------------------------------------------------------------------------
# the speed table


def test_benchmark_backends_table(tmp_path):
    from d2_defects.inference.benchmark import BACKENDS, benchmark_backends, format_table

    cfg = load_config(CONFIGS["cascade"], TINY_OPTS)
    rows = benchmark_backends(cfg, BACKENDS, sizes=[(160, 120)], iters=2, warmup=1, threads=2,
                              export_dir=str(tmp_path), num_images=2)
    assert [(r["backend"], r["size"]) for r in rows] == [(b, "160x120") for b in BACKENDS]
    for r in rows:
        assert r["ms"] > 0 and r["images_per_s"] == pytest.approx(1000 / r["ms"])
        assert isinstance(r["memory_mb"], float) and r["memory_mb"] > 0, r
        assert r["file_mb"] > 1  # the weights: ~50 MB for this model in every format
        assert r["parity"] == "reference" if r["backend"] == "eager" else r["parity"].startswith("ok ("), r
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] == pytest.approx(rows[1]["ms"] / rows[0]["ms"])
    assert rows[0]["input"] == rows[3]["input"] == "128x96"  # resized to the test size (short side 96)
    assert (tmp_path / "openvino" / "model.bin").is_file()
    table = format_table(rows).splitlines()
    assert table[0].startswith("| backend | image size | model input | ms/image (median) | images/s | vs eager |")
    assert len(table) == 2 + len(rows) and table[-2].startswith("| onnxruntime | 160x120 | 128x96 |")
    with pytest.raises(ValueError, match="unknown backend"):
        benchmark_backends(cfg, ["eager", "tensorrt"])


def test_benchmark_backends_on_real_images(tmp_path, capsys):
    """--images: the table times the first N files of a folder, resized like at test time, one group."""
    import cv2

    from d2_defects.inference.benchmark import benchmark_backends

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, (h, w) in {"a.png": (120, 160), "b.png": (90, 180), "c.png": (100, 100)}.items():
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    cfg = load_config(CONFIGS["cascade"], TINY_OPTS)
    rows = benchmark_backends(cfg, ["eager", "onnxruntime"], iters=2, warmup=0, threads=1, num_images=2,
                              memory=False, export_dir=str(tmp_path / "export"), image_spec=str(folder))
    assert [(r["backend"], r["size"]) for r in rows] == [("eager", "images"), ("onnxruntime", "images")]
    assert rows[0]["input"] == "128x96"  # a.png resized to the test short side 96
    assert rows[1]["parity"].startswith("ok ("), rows[1]  # checked on both images, of two aspect ratios

    import runpy

    main = runpy.run_path(os.path.join(ROOT, "tools", "benchmark_inference.py"), run_name="tool")["main"]
    assert main(["--config-file", CONFIGS["cascade"], "--images", str(folder), "--sizes", "64x64"]) == 2
    assert main(["--config-file", CONFIGS["cascade"], "--images", str(tmp_path / "none"), *TINY_OPTS]) == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("ERROR:")]
    assert len(errors) == 2 and "give one" in errors[0] and str(tmp_path / "none") in errors[1], errors


def test_export_tool_parity_failure_is_one_error_line(models, tmp_path):
    """ONNX Runtime differs from eager by ~1e-5 px: with zero tolerances the parity check must fail."""
    cfg, model = models["cascade"]
    DefectCheckpointer(model, save_dir=str(tmp_path)).save("model_random")
    proc = _run_export_tool(["--config-file", CONFIGS["cascade"], "--output", tmp_path / "export", "--format", "onnx",
                             "--num-samples", "2", "--atol", "0", "--score-atol", "0", *TINY_OPTS,
                             "MODEL.WEIGHTS", tmp_path / "model_random.pth"])
    errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "differs from the eager model on sample 0" in errors[0] and "within 0.0 px / score 0.0" in errors[0]
