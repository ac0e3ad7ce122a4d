"""Ensembling COCO results files (``tools/ensemble.py``) and scoring them on a registered dataset."""
import contextlib
import io
import os
from collections import defaultdict

import torch

from ..evaluation.results import ResultsFileError, load_results
from ..modeling.merge import merge_detections
from ..modeling.postprocess import PostprocessParams

__all__ = ["ResultsFileError", "load_results", "ensemble_results", "evaluate_results"]


def _by_image(dets):
    out = defaultdict(list)
    for d in dets:
        out[d["image_id"]].append(d)
    return out


def _tensors(dets):
    if not dets:
        return torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float64)
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1).float()
    return (xyxy, torch.tensor([float(d["score"]) for d in dets]),
            torch.tensor([int(d["category_id"]) for d in dets], dtype=torch.int64))


def ensemble_results(results, method="wbf", weights=None, iou_thresh=0.55, score_thresh=0.0, max_dets=100,
                     image_sizes=None, progress=None):
    """
    Merge several COCO results lists of the same images (same image ids) image by image.

    Args:
        results (list[list[dict]]): one COCO results list per model.
        method (str): "wbf", "soft_nms" or "nms" (see :func:`merge_detections`).
        weights (list[float] or None): one per model.
        iou_thresh (float): fusion IoU ("wbf") or NMS IoU ("nms"; "soft_nms" uses the postprocessor's
            soft-NMS settings).
        score_thresh (float): detections scoring at or below this are dropped.
        max_dets (int): detections kept per image.
        image_sizes (dict or None): image id -> (height, width); "wbf" normalises boxes by it. Without it the
            extent of the boxes is used (fusion is invariant to this scale).
    Returns:
        list[dict]: the merged COCO results, per image sorted by score.
    """
    params = PostprocessParams(score_thresh=score_thresh, nms_thresh=iou_thresh, topk_per_image=max_dets)
    grouped = [_by_image(r) for r in results]
    image_ids = sorted({i for g in grouped for i in g}, key=lambda x: (str(type(x)), x))
    merged = []
    for image_id in progress(image_ids, desc="merging") if progress else image_ids:
        per_model = [_tensors(g.get(image_id, [])) for g in grouped]
        if image_sizes is not None and image_id in image_sizes:
            size = image_sizes[image_id]
        else:
            ext = torch.cat([b for b, _, _ in per_model])
            size = (float(ext[:, 3].max()) + 1, float(ext[:, 2].max()) + 1) if len(ext) else (1.0, 1.0)
        boxes, scores, classes = merge_detections(
            [b for b, _, _ in per_model], [s for _, s, _ in per_model], [c for _, _, c in per_model],
            size, method, params, weights=weights, wbf_iou_thresh=iou_thresh,
        )
        for b, s, c in zip(boxes.double().tolist(), scores.tolist(), classes.tolist()):
            merged.append({"image_id": image_id, "category_id": int(c),
                           "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
    return merged


def _coco_gt(dataset_name):
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets.coco import convert_to_coco_json
    from pycocotools.coco import COCO

    meta = MetadataCatalog.get(dataset_name)
    json_file = getattr(meta, "json_file", None)
    if not json_file or not os.path.isfile(json_file):
        import tempfile

        json_file = os.path.join(tempfile.mkdtemp(), f"{dataset_name}_coco.json")
        convert_to_coco_json(dataset_name, json_file, allow_cached=False)
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(json_file)


def evaluate_results(dets, dataset_name):
    """
    COCO box AP (pycocotools, the numbers of Detectron2's ``COCOEvaluator``, in %) of a results list on a
    registered dataset, plus the metrics of ``d2_defects.evaluation.DefectEvaluator`` (``defect/mAP``,
    ``defect/ACC``, ``defect/score``, ...).

    Returns:
        dict: metric -> value.
    """
    from pycocotools.cocoeval import COCOeval

    gt = _coco_gt(dataset_name)
    unknown = {d["image_id"] for d in dets} - set(gt.getImgIds())
    if unknown:
        raise ResultsFileError(f"image ids {sorted(unknown)[:5]} are not in dataset {dataset_name}")
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    if not dets:
        out = {k: 0.0 for k in names}
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(dets), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out = {k: float(v * 100) if v >= 0 else float("nan") for k, v in zip(names, ev.stats[:6])}
    out.update(_defect_metrics(dets, dataset_name))
    return out


def _defect_metrics(dets, dataset_name):
    """The metrics of :class:`d2_defects.evaluation.DefectEvaluator`, keyed ``defect/<name>``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..evaluation import DefectEvaluator
    from detectron2.structures import Boxes, Instances

    id_map = getattr(MetadataCatalog.get(dataset_name), "thing_dataset_id_to_contiguous_id", None) or {}
    by_image = _by_image(dets)
    evaluator = DefectEvaluator(dataset_name)
    evaluator.reset()
    for r in DatasetCatalog.get(dataset_name):
        boxes, scores, classes = _tensors(by_image.get(r["image_id"], []))
        inst = Instances((r["height"], r["width"]))
        inst.pred_boxes = Boxes(boxes)
        inst.scores = scores
        inst.pred_classes = torch.tensor([id_map.get(int(c), int(c)) for c in classes], dtype=torch.int64)
        evaluator.process([{"image_id": r["image_id"], "file_name": r["file_name"], "height": r["height"],
                            "width": r["width"]}], [{"instances": inst}])
    res = evaluator.evaluate() or {}
    flat = {}
    for task, metrics in res.items():
        if isinstance(metrics, dict):
            flat.update({f"{task}/{k}": v for k, v in metrics.items()})
        else:
            flat[task] = metrics
    return flat
