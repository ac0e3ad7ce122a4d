"""TorchScript (and ONNX) export of the project's detectors by tracing, with a parity check."""
import warnings

import torch
from detectron2.export import TracingAdapter

__all__ = ["trace_model", "run_exported", "compare_instances", "export_onnx"]


def _inference(model, batched_inputs):
    """
    One image through ``model``; returns ``(instances, {name: image-level output})``, so that the flat
    outputs start with the boxes, classes and scores, followed by image-level outputs such as DefectRCNN's
    ``defect_score`` (a 0-dim tensor while tracing).
    """
    out = model(batched_inputs)[0]
    return out["instances"], {k: v for k, v in out.items() if k != "instances"}


def trace_model(model, image):
    """
    Trace ``model`` (any detector with the standard ``model(list[dict]) -> [{"instances", ...}]`` inference
    interface) with Detectron2's ``TracingAdapter``: the traced module takes one CHW image tensor (model
    input format, already resized) and returns a tuple of tensors: boxes (R, 4), classes (R,), scores (R,),
    the image size, then the model's image-level outputs (DefectRCNN: ``defect_score``, a 0-dim tensor).

    Returns:
        (torch.jit.ScriptModule, TracingAdapter): the adapter's ``outputs_schema`` turns the traced outputs
        back into ``(Instances, {name: tensor})`` (see :func:`run_exported`).
    Raises:
        ValueError, RuntimeError: when the model cannot be traced.
    """
    model.eval()
    adapter = TracingAdapter(model, [{"image": image}], inference_func=_inference)
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about every Python-level shape check in Detectron2; the parity check is what counts
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
    return traced, adapter


def run_exported(exported, adapter, image):
    """
    Run a traced/loaded module on one image; returns the eager model's output format for that image:
    ``{"instances": Instances, <image-level outputs as floats, e.g. "defect_score">}``.
    """
    # without optimized execution, the first calls do not spend seconds on profiling and fusion
    with torch.no_grad(), torch.jit.optimized_execution(False):
        instances, extras = adapter.outputs_schema(exported(image))
    return dict(instances=instances, **{k: float(v) for k, v in extras.items()})


def compare_instances(a, b):
    """
    Differences between two detection sets of one image.

    Returns:
        dict: ``num`` (counts equal), ``classes`` (classes equal), ``max_box_diff`` (px), ``max_score_diff``.
    """
    out = {"num": len(a) == len(b), "classes": False, "max_box_diff": float("inf"), "max_score_diff": float("inf")}
    if len(a) != len(b):
        return out
    if len(a) == 0:
        return {"num": True, "classes": True, "max_box_diff": 0.0, "max_score_diff": 0.0}
    out["classes"] = bool((a.pred_classes == b.pred_classes).all())
    out["max_box_diff"] = float((a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max())
    out["max_score_diff"] = float((a.scores - b.scores).abs().max())
    return out


def export_onnx(adapter, image, path, opset=17):
    """
    Export the adapter to ONNX through the TorchScript-based exporter (``dynamo=False``). Needs the
    ``onnx`` package; raises ``ImportError`` without it and ``RuntimeError`` for unsupported operators.
    """
    import onnx  # noqa: F401  the exporter needs it; fail early with a clear message

    with torch.no_grad():
        torch.onnx.export(adapter, (image,), path, opset_version=opset, dynamo=False)
    return path
