"""INT8 export (tools/export_model.py --int8, d2_defects.inference.quantize): the FP32 graph is parity-checked,
then quantized; the INT8 files load and run like any export. Accuracy is measured as AP by
benchmarks/int8_export.py (not a test: it needs a trained model)."""
import json
import os

import numpy as np
import onnx
import pytest
import torch

from test_export import CONFIGS, _images, _model, _run_export_tool
from conftest import TINY_OPTS
from d2_defects.checkpoint import DefectCheckpointer
from d2_defects.inference.export import ExportError, export_model, load_exported, load_samples
from d2_defects.inference.quantize import export_int8, int8_agreement


@pytest.fixture(scope="module")
def cascade():
    return _model("cascade", "TEST.DETECTIONS_PER_IMAGE", "1000")


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_int8_export_quantizes_after_the_fp32_check_and_runs(cascade, fmt, tmp_path):
    cfg, model = cascade
    images = _images(cfg)
    calibration = load_samples(cfg, None, 3)
    checked = []

    def fp32_check(folder):  # the FP32 graph, before quantization: exact parity with the eager model
        checked.append(sorted(os.listdir(folder)))
        fp32 = load_exported(folder, "onnx")
        raw = fp32.raw(images[1])
        return raw

    files, fp32_raw = export_int8(model, images[0], str(tmp_path), fmt, calibration, fp32_check,
                                  meta={"min_size_test": cfg.INPUT.MIN_SIZE_TEST})
    assert checked == [["model.onnx", "postprocess.json", "postprocess.py"]]
    info = json.loads((tmp_path / "postprocess.json").read_text())
    assert info["format"] == fmt and info["int8"] == {"ops": ["Conv", "Gemm"], "calibration_images": 3}
    assert info["min_size_test"] == cfg.INPUT.MIN_SIZE_TEST and info["postprocess"]["topk_per_image"] == 1000
    if fmt == "onnx":  # weights of every convolution and fully connected layer go through QuantizeLinear
        graph = onnx.load(files[0]).graph
        kinds = [n.op_type for n in graph.node]
        assert kinds.count("DequantizeLinear") >= kinds.count("Conv") + kinds.count("Gemm") > 20
    exported = load_exported(str(tmp_path))
    out = exported(images[1])["instances"]
    assert len(out) > 0
    raw = exported.raw(images[1])
    # quantized: the candidates' scores are not the FP32 graph's, but close (random weights: scores near uniform)
    n = min(len(raw[2]), len(fp32_raw[2]))
    assert n > 0 and not np.array_equal(np.sort(raw[2])[-n:], np.sort(fp32_raw[2])[-n:])
    assert abs(float(np.max(raw[2])) - float(np.max(fp32_raw[2]))) < 0.1


def test_int8_agreement_of_an_fp32_export_is_complete(cascade, tmp_path):
    """The agreement report against an exact (FP32) export: every detection found, scores equal."""
    cfg, model = cascade
    images = _images(cfg)
    export_model(model, images[0], str(tmp_path), "onnx")
    agree = int8_agreement(model, load_exported(str(tmp_path)), images, min_score=0.0)
    assert agree["eager"] > 0 and agree["found"] == agree["eager"] and agree["max_score_diff"] < 1e-4


def test_int8_refuses_torchscript_and_no_calibration(cascade, tmp_path):
    cfg, model = cascade
    with pytest.raises(ExportError, match="INT8 export is for --format onnx or openvino"):
        export_int8(model, _images(cfg)[0], str(tmp_path), "torchscript", [], lambda f: None)
    with pytest.raises(ExportError, match="needs calibration images"):
        export_int8(model, _images(cfg)[0], str(tmp_path), "onnx", [], lambda f: None)
    DefectCheckpointer(model, save_dir=str(tmp_path)).save("model_random")
    base = ["--config-file", CONFIGS["cascade"], "--output", tmp_path / "export", *TINY_OPTS, "MODEL.WEIGHTS",
            tmp_path / "model_random.pth"]
    for extra, message in [(["--format", "torchscript", "--int8"], "--int8 is for --format onnx or openvino"),
                           (["--format", "onnx", "--int8"], "--int8 needs calibration images"),
                           (["--format", "onnx", "--int8", "--calibration-images", tmp_path / "none"],
                            "no image files")]:
        proc = _run_export_tool(extra + base)
        errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "export" / "model.onnx").exists()


def test_int8_export_tool_prints_the_fp32_parity_and_the_agreement(cascade, tmp_path):
    import cv2

    cfg, model = cascade
    DefectCheckpointer(model, save_dir=str(tmp_path)).save("model_random")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    out = tmp_path / "export"
    proc = _run_export_tool(["--config-file", CONFIGS["cascade"], "--output", out, "--format", "openvino", "--int8",
                             "--sample-images", folder, "--num-samples", "2", "--num-calibration", "3", *TINY_OPTS,
                             "MODEL.WEIGHTS", tmp_path / "model_random.pth"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity of onnx (FP32, before INT8 quantization) + postprocess.py with the eager model on 2 images" \
        in proc.stdout
    assert "INT8 openvino (3 calibration images) against the eager model on 2 images" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"model.xml", "model.bin", "postprocess.py", "postprocess.json"}
    assert "WARNING:root" not in proc.stderr  # the quantizer's advice is not shown
