"""Config keys added by d2_defects.

``add_defects_config(cfg)`` adds every key this project uses, each under a clearly named node with a
one-line comment.  Keys are only *added*; a YAML file or command-line option naming a key that does not
exist still fails with Detectron2's usual ``KeyError: 'Non-existent config key: ...'``.
"""
import torch
from detectron2.config import CfgNode as CN


def add_defects_config(cfg):
    """
    Add the d2_defects keys to a Detectron2 config (in place) and return it.

    Args:
        cfg (CfgNode): usually ``detectron2.config.get_cfg()``.
    """
    # Device: the code is device-agnostic; default to CUDA when present, else CPU.
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

    _add_defect_eval_config(cfg)
    return cfg


def _add_defect_eval_config(cfg):
    """``TEST.DEFECT_EVAL``: the competition-style evaluator (d2_defects.evaluation.DefectEvaluator)."""
    cfg.TEST.DEFECT_EVAL = CN()
    # Add a DefectEvaluator next to COCOEvaluator for every DATASETS.TEST entry.
    cfg.TEST.DEFECT_EVAL.ENABLED = True
    # IoU thresholds: preset "coco" (0.50:0.05:0.95), "voc" (0.5), "fabric" (0.1, 0.3, 0.5), "bottle"
    # (from the GT box's shorter side), or a list of floats in (0, 1]; None means "coco".
    cfg.TEST.DEFECT_EVAL.IOU = None
    # AP integration: "coco" (101-point interpolated) or "voc" (all-point area).
    cfg.TEST.DEFECT_EVAL.AP_METHOD = "coco"
    # Per-class weights of weighted_mAP (one per class, >= 0); empty: metadata thing_class_weights, else uniform.
    cfg.TEST.DEFECT_EVAL.CLASS_WEIGHTS = []
    # An image counts as defective when its defect_score (or best detection score) reaches this (0-1).
    cfg.TEST.DEFECT_EVAL.IMAGE_SCORE_THRESHOLD = 0.5
    # score = (ACC_WEIGHT * ACC + MAP_WEIGHT * weighted_mAP) / (ACC_WEIGHT + MAP_WEIGHT); fabric: 0.2 / 0.8.
    cfg.TEST.DEFECT_EVAL.ACC_WEIGHT = 0.0
    # Weight of weighted_mAP in score (>= 0).
    cfg.TEST.DEFECT_EVAL.MAP_WEIGHT = 1.0
