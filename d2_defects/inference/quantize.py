"""INT8 post-training quantization of an exported detector (``tools/export_model.py --int8``).

The FP32 graph is exported to ONNX and checked against the eager model first (the usual parity check), then
quantized by ONNX Runtime's static quantizer: QDQ format (QuantizeLinear / DequantizeLinear pairs around the
quantized operators), INT8 weights per output channel, UINT8 activations with MinMax ranges calibrated on sample
images at the test size. By default the convolutions and the box heads' fully connected layers (Gemm) are
quantized; RoIAlign, box decoding and everything after stay in FP32. ONNX Runtime runs the QDQ graph as it is;
OpenVINO reads it (``openvino.convert_model``) and runs the quantized operators with INT8 kernels. An INT8
graph does not give the eager model's detections to 1e-3 px, so it has no parity check of its own: its accuracy
is measured as AP (``benchmarks/int8_export.py``), its agreement with the eager model on the sample images is
printed by the tool.
"""
import json
import logging
import os
import shutil
import tempfile

from .export import ExportError, convert_openvino, export_model, output_files, require_runtime

__all__ = ["INT8_FORMATS", "DEFAULT_INT8_OPS", "quantize_onnx", "export_int8", "int8_agreement"]

INT8_FORMATS = ("onnx", "openvino")
DEFAULT_INT8_OPS = ("Conv", "Gemm")


def quantize_onnx(src, dst, calibration, ops=DEFAULT_INT8_OPS):
    """
    Write the INT8 (QDQ) version of the ONNX model ``src`` to ``dst``.

    Args:
        src (str): an FP32 ONNX graph exported by :func:`~d2_defects.inference.export.export_model` (input
            ``image``: one (3, H, W) uint8 image at the test size).
        dst (str): path of the quantized graph.
        calibration (list[Tensor]): (3, H, W) uint8 images at the test size (``load_samples``).
        ops (tuple[str]): ONNX operator types to quantize.
    Raises:
        ExportError: no calibration image, or the quantizer failed.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    if not calibration:
        raise ExportError("INT8 quantization needs calibration images (--calibration-images)")

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {"image": x.numpy()}

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a generic advice on the root logger at every call
    try:
        quantize_static(src, dst, _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(ops), calibrate_method=CalibrationMethod.MinMax)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise ExportError(f"INT8 quantization of {src} failed: {str(e).splitlines()[0] if str(e) else e!r}") \
            from None
    finally:
        root.setLevel(level)


def export_int8(model, image, output_dir, fmt, calibration, fp32_check, meta=None, ops=DEFAULT_INT8_OPS):
    """
    Export ``model`` as an INT8 graph for ``fmt`` ("onnx" or "openvino") into ``output_dir``.

    Args:
        model, image, meta: as :func:`~d2_defects.inference.export.export_model`.
        calibration (list[Tensor]): calibration images at the test size.
        fp32_check (callable): called with the FP32 export's folder (ONNX) before quantizing, e.g. the parity
            check against the eager model; its return value is returned.
        ops (tuple[str]): operator types to quantize.
    Returns:
        (list[str], object): the written files, and what ``fp32_check`` returned.
    """
    if fmt not in INT8_FORMATS:
        raise ExportError(f"INT8 export is for --format {' or '.join(INT8_FORMATS)}, not {fmt}")
    require_runtime(fmt)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir = os.path.join(tmp, "fp32")
        export_model(model, image, fp32_dir, "onnx", meta=meta)
        checked = fp32_check(fp32_dir)
        q_path = os.path.join(tmp, "model_int8.onnx")
        quantize_onnx(os.path.join(fp32_dir, "model.onnx"), q_path, calibration, ops)
        os.makedirs(output_dir, exist_ok=True)
        files = output_files(output_dir, fmt)
        if fmt == "onnx":
            shutil.copyfile(q_path, files[0])
        else:
            convert_openvino(q_path, files[0])
        shutil.copyfile(os.path.join(fp32_dir, "postprocess.py"), os.path.join(output_dir, "postprocess.py"))
        with open(os.path.join(fp32_dir, "postprocess.json")) as f:
            info = json.load(f)
    info.update(format=fmt, model_file=os.path.basename(files[0]),
                int8=dict(ops=list(ops), calibration_images=len(calibration)))
    with open(os.path.join(output_dir, "postprocess.json"), "w") as f:
        json.dump(info, f, indent=2)
    return files, checked


def int8_agreement(model, exported, images, min_score=0.3, iou=0.5):
    """
    How far an INT8 export's detections agree with the eager model's on ``images``: the share of the eager
    detections scoring >= ``min_score`` that the export also finds (same class, box IoU >= ``iou``), and the
    largest score difference of those pairs.

    Returns:
        dict: ``eager`` (count of eager detections >= min_score), ``found`` (of them, found by the export),
        ``max_score_diff``.
    """
    import torch
    from torchvision.ops import box_iou

    out = dict(eager=0, found=0, max_score_diff=0.0)
    with torch.no_grad():
        for img in images:
            h, w = (int(v) for v in img.shape[-2:])
            a = model([{"image": img, "height": h, "width": w}])[0]["instances"].to("cpu")
            b = exported(img)["instances"]
            a = a[a.scores >= min_score]
            out["eager"] += len(a)
            if len(a) == 0 or len(b) == 0:
                continue
            overlap = box_iou(a.pred_boxes.tensor, b.pred_boxes.tensor)
            overlap[a.pred_classes[:, None] != b.pred_classes[None, :]] = 0
            # the best-scoring export detection among those that overlap (soft-NMS keeps decayed duplicates)
            candidate = torch.where(overlap >= iou, b.scores[None, :], torch.full_like(overlap, -1.0))
            best, j = candidate.max(dim=1)
            hit = best >= 0
            out["found"] += int(hit.sum())
            if hit.any():
                diff = (a.scores[hit] - b.scores[j[hit]]).abs().max().item()
                out["max_score_diff"] = max(out["max_score_diff"], diff)
    return out
