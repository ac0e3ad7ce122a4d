"""``DefectEvaluator``: the competitions' scores (fabric, bottle, ...) next to COCO AP."""
import copy
import itertools
import json
import logging
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .scoring import defect_eval_settings, evaluate_detections
from ..utils.errors import DatasetError

__all__ = ["DefectEvaluator"]

logger = logging.getLogger(__name__)


class DefectEvaluator(DatasetEvaluator):
    """
    Per-class AP under a configurable IoU rule and AP integration, class-weighted mAP, image-level
    defect/normal accuracy (ACC) and the combined competition score.

    ``evaluate()`` returns ``{"defect": {"mAP", "weighted_mAP", "ACC", "score", "AP@<iou>", "AP-<class>"}}``
    (0-100), logs a per-class table and writes ``defect_metrics.json`` and ``defect_detections.json``
    (raw per-image detections, readable by ``tools/analyze_results.py`` / ``tools/tune_thresholds.py``)
    to ``output_dir``. Classes without ground truth in the evaluated images are nan and excluded from the
    means. The image-level score of an image is ``outputs["defect_score"]`` when the model provides one,
    else its best detection score; an image with neither is never counted defective.
    """

    def __init__(self, dataset_name, cfg=None, output_dir=None, *, distributed=True, **overrides):
        """
        Args:
            dataset_name (str): a registered dataset (contiguous ``category_id`` in its dicts).
            cfg (CfgNode or None): reads ``TEST.DEFECT_EVAL.*``; defaults without it.
            output_dir (str or None): where to write the json files.
            distributed (bool): gather predictions from all ranks before evaluating.
            overrides: ``iou``, ``ap_method``, ``class_weights``, ``image_score_threshold``,
                ``acc_weight``, ``map_weight``, ``score_map``, ``max_dets`` (take precedence over ``cfg``).
        """
        self._dataset_name = dataset_name
        self._settings = defect_eval_settings(cfg, **overrides)
        self._output_dir = output_dir
        self._distributed = distributed
        self._metadata = MetadataCatalog.get(dataset_name)
        classes = getattr(self._metadata, "thing_classes", None)
        if classes is None:
            raise DatasetError(f"DefectEvaluator: dataset {dataset_name!r} has no thing_classes in its metadata")
        # fail at build time (not after inference) when the weights do not fit the dataset
        self._settings.weights_for(dataset_name, len(classes), getattr(self._metadata, "thing_class_weights", None))
        self._predictions = []

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            rec = {"image_id": inp["image_id"], "defect_score": None}
            if "instances" in out:
                inst = out["instances"].to("cpu")
                boxes = inst.pred_boxes.tensor.numpy().astype(np.float64)
                rec["boxes"] = BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
                rec["scores"] = inst.scores.numpy().astype(np.float64)
                rec["classes"] = inst.pred_classes.numpy().astype(np.int64)
            else:
                rec["boxes"], rec["scores"], rec["classes"] = np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
            if out.get("defect_score") is not None:
                rec["defect_score"] = float(out["defect_score"])
            self._predictions.append(rec)

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if len(predictions) == 0:
            logger.warning("[DefectEvaluator] did not receive valid predictions.")
            return {}
        records = DatasetCatalog.get(self._dataset_name)
        result = evaluate_detections(
            records, predictions, self._metadata.thing_classes, self._settings,
            dataset_name=self._dataset_name,
            metadata_weights=getattr(self._metadata, "thing_class_weights", None),
            image_ids={p["image_id"] for p in predictions},
        )
        s = self._settings
        logger.info(
            f"Defect evaluation of {self._dataset_name} ({len(predictions)} images, "
            f"{int((~result.gt['has_gt']).sum())} normal): IoU {s.iou.name} ({', '.join(s.iou.labels)}), "
            f"AP {s.ap_method}, class weights: {result.weight_source}\n" + result.table()
        )
        if result.absent_classes:
            logger.warning(
                f"Classes without ground truth in {self._dataset_name}: {', '.join(result.absent_classes)}; "
                "their AP is nan and they are excluded from mAP and weighted_mAP."
            )
        summary = result.summary()
        logger.info(
            "Defect scores: " + ", ".join(f"{k} {summary[k]:.2f}" for k in ("mAP", "weighted_mAP", "ACC", "score"))
        )
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            with PathManager.open(os.path.join(self._output_dir, "defect_metrics.json"), "w") as f:
                json.dump(result.to_json(), f, indent=2, default=_json_default)
            with PathManager.open(os.path.join(self._output_dir, "defect_detections.json"), "w") as f:
                json.dump(self._raw_detections(predictions), f)
        return {"defect": copy.deepcopy(summary)}

    def _raw_detections(self, predictions):
        """Per image: ``image_id``, ``defect_score`` (or null), ``instances`` in COCO results format."""
        to_dataset = {v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()}
        out = []
        for p in predictions:
            out.append({
                "image_id": p["image_id"], "defect_score": p["defect_score"],
                "instances": [
                    {"category_id": to_dataset[int(c)], "bbox": [round(float(v), 3) for v in b], "score": float(s)}
                    for b, s, c in zip(p["boxes"], p["scores"], p["classes"])
                ],
            })
        return out


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    raise TypeError(f"not JSON serializable: {type(v).__name__}")
