"""Competition-style evaluation: :class:`DefectEvaluator` and the functions behind it."""
from .coco_evaluator import FastCOCOEvaluator
from .defect_evaluator import DefectEvaluator
from .iou_rules import IOU_PRESETS, bottle_iou_threshold, resolve_iou
from .scoring import DefectEvalSettings, defect_eval_settings, evaluate_detections, load_predictions

__all__ = [
    "DefectEvaluator",
    "FastCOCOEvaluator",
    "DefectEvalSettings",
    "IOU_PRESETS",
    "bottle_iou_threshold",
    "defect_eval_settings",
    "evaluate_detections",
    "load_predictions",
    "resolve_iou",
]
