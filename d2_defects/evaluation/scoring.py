"""Competition scores from ground-truth records and per-image detections (no Detectron2 model needed).

Used by :class:`~d2_defects.evaluation.DefectEvaluator` and by ``tools/analyze_results.py`` /
``tools/tune_thresholds.py``.
"""
import math

import numpy as np
from detectron2.structures import BoxMode

from .ap import accumulate, match_detections
from .iou_rules import resolve_iou
from .results import ResultsFileError, check_detection, read_results_json
from ..utils.errors import ConfigError, DatasetError

__all__ = [
    "DefectEvalSettings",
    "DefectEvalResult",
    "defect_eval_settings",
    "gt_arrays",
    "det_arrays",
    "evaluate_detections",
    "image_accuracy",
    "combined_score",
    "load_predictions",
]

AP_METHODS = ("coco", "voc")
SCORE_MAPS = ("weighted_mAP", "mAP")


class DefectEvalSettings:
    """
    Validated evaluation settings (see ``TEST.DEFECT_EVAL`` in ``d2_defects/config.py``).

    Attributes:
        iou (IouRule), ap_method (str), class_weights (list[float] or None: from metadata or uniform),
        image_score_threshold (float), acc_weight (float), map_weight (float), score_map (str): the mAP
        in ``score``, "weighted_mAP" or "mAP"; max_dets (int): detections kept per image and class,
        highest scores first (100, like COCOEvaluator's AP).
    """

    def __init__(self, iou=None, ap_method="coco", class_weights=None, image_score_threshold=0.5,
                 acc_weight=0.0, map_weight=1.0, score_map="weighted_mAP", max_dets=100):
        p = "TEST.DEFECT_EVAL."
        self.iou = resolve_iou(iou, p + "IOU")
        if ap_method not in AP_METHODS:
            raise ConfigError(f"{p}AP_METHOD: must be one of {AP_METHODS}, got {ap_method!r}")
        self.ap_method = ap_method
        if class_weights is not None and len(class_weights) == 0:
            class_weights = None
        if class_weights is not None:
            try:
                class_weights = [float(w) for w in class_weights]
            except (TypeError, ValueError):
                raise ConfigError(f"{p}CLASS_WEIGHTS: must be numbers, got {class_weights!r}") from None
            if any(w < 0 or not math.isfinite(w) for w in class_weights) or sum(class_weights) <= 0:
                raise ConfigError(f"{p}CLASS_WEIGHTS: must be >= 0 with a positive sum, got {class_weights}")
        self.class_weights = class_weights
        if not (0.0 <= float(image_score_threshold) <= 1.0):
            raise ConfigError(f"{p}IMAGE_SCORE_THRESHOLD: must be in [0, 1], got {image_score_threshold}")
        self.image_score_threshold = float(image_score_threshold)
        for key, v in (("ACC_WEIGHT", acc_weight), ("MAP_WEIGHT", map_weight)):
            if not (float(v) >= 0 and math.isfinite(float(v))):
                raise ConfigError(f"{p}{key}: must be a finite number >= 0, got {v}")
        if float(acc_weight) + float(map_weight) <= 0:
            raise ConfigError(f"{p}ACC_WEIGHT / {p}MAP_WEIGHT: at least one must be > 0")
        self.acc_weight, self.map_weight = float(acc_weight), float(map_weight)
        if score_map not in SCORE_MAPS:
            raise ConfigError(f"{p}SCORE_MAP: must be one of {SCORE_MAPS}, got {score_map!r}")
        self.score_map = score_map
        self.max_dets = int(max_dets)

    def weights_for(self, dataset_name, num_classes, metadata_weights=None):
        """Class weights (K,): config, else dataset metadata ``thing_class_weights``, else uniform."""
        w = self.class_weights
        source = "TEST.DEFECT_EVAL.CLASS_WEIGHTS"
        if w is None and metadata_weights is not None:
            w, source = list(metadata_weights), f"thing_class_weights of {dataset_name}"
        if w is None:
            return np.ones(num_classes), "uniform"
        if len(w) != num_classes:
            raise ConfigError(f"{source}: {len(w)} weights given but {dataset_name} has {num_classes} classes")
        return np.asarray(w, dtype=np.float64), source


def defect_eval_settings(cfg=None, **overrides):
    """:class:`DefectEvalSettings` from ``cfg.TEST.DEFECT_EVAL`` (defaults without cfg), then ``overrides``."""
    kw = {}
    if cfg is not None:
        c = cfg.TEST.DEFECT_EVAL
        kw = dict(iou=c.IOU, ap_method=c.AP_METHOD, class_weights=list(c.CLASS_WEIGHTS),
                  image_score_threshold=c.IMAGE_SCORE_THRESHOLD, acc_weight=c.ACC_WEIGHT,
                  map_weight=c.MAP_WEIGHT, score_map=c.SCORE_MAP)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return DefectEvalSettings(**kw)


def gt_arrays(records):
    """
    Ground truth of dataset dicts as flat arrays (images in the given order).

    Returns:
        dict: ``img``, ``cls``, ``boxes`` (XYWH), ``crowd``, ``ann`` (index of the annotation in its record);
        and ``has_gt`` (num_images,) bool (any annotation, crowd included).
    """
    img, cls, boxes, crowd, ann = [], [], [], [], []
    for i, r in enumerate(records):
        for j, a in enumerate(r.get("annotations", [])):
            img.append(i)
            cls.append(a["category_id"])
            boxes.append(BoxMode.convert(list(a["bbox"]), a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYWH_ABS))
            crowd.append(bool(a.get("iscrowd", 0)))
            ann.append(j)
    return {
        "img": np.asarray(img, dtype=np.int64), "cls": np.asarray(cls, dtype=np.int64),
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "crowd": np.asarray(crowd, dtype=bool),
        "ann": np.asarray(ann, dtype=np.int64),
        "has_gt": np.array([len(r.get("annotations", [])) > 0 for r in records], dtype=bool),
    }


def det_arrays(predictions, image_index):
    """
    Per-image predictions as flat arrays.

    Args:
        predictions (list[dict]): ``image_id``, ``boxes`` (N, 4) XYWH, ``scores`` (N,), ``classes`` (N,)
            contiguous ids, optional ``defect_score`` (float or None).
        image_index (dict): image id -> index of the image in the ground-truth records.
    Returns:
        dict: ``img``, ``cls``, ``boxes``, ``scores``; ``defect_score`` (num_images,) nan where absent.
    """
    n_img = len(image_index)
    img, cls, boxes, scores = [], [], [], []
    defect = np.full(n_img, np.nan)
    for p in predictions:
        i = image_index[p["image_id"]]
        n = len(p["scores"])
        img.append(np.full(n, i, dtype=np.int64))
        cls.append(np.asarray(p["classes"], dtype=np.int64).reshape(n))
        boxes.append(np.asarray(p["boxes"], dtype=np.float64).reshape(n, 4))
        scores.append(np.asarray(p["scores"], dtype=np.float64).reshape(n))
        if p.get("defect_score") is not None:
            defect[i] = float(p["defect_score"])
    cat = (lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape))
    return {"img": cat(img, 0).astype(np.int64), "cls": cat(cls, 0).astype(np.int64),
            "boxes": cat(boxes, (0, 4)), "scores": cat(scores, 0), "defect_score": defect}


def image_scores(dt, num_images):
    """
    Image-level defect score (num_images,): the model's ``defect_score`` when given, else the max detection
    score; nan for an image with neither (it has no evidence of a defect, whatever the threshold).
    """
    best = np.full(num_images, -np.inf)
    if len(dt["scores"]):
        np.maximum.at(best, dt["img"], dt["scores"])
    best[np.isneginf(best)] = np.nan
    return np.where(np.isnan(dt["defect_score"]), best, dt["defect_score"])


def image_accuracy(has_gt, img_scores, threshold):
    """
    Percentage of images whose defective/normal prediction is right: defective when the score is
    >= threshold; a nan or -inf score (no detection, no model score) is never defective, even at threshold 0.
    """
    if len(has_gt) == 0:
        return float("nan")
    s = np.nan_to_num(np.asarray(img_scores, dtype=np.float64), nan=-np.inf)
    return float(np.mean((s >= threshold) == has_gt) * 100.0)


def weighted_mean(values, weights):
    """Mean of ``values`` weighted by ``weights`` over the finite values (weights renormalised); nan if none."""
    ok = np.isfinite(values)
    if not ok.any() or weights[ok].sum() <= 0:
        return float("nan")
    return float(np.sum(values[ok] * weights[ok]) / weights[ok].sum())


def combined_score(settings, acc, class_ap, weights):
    """
    ``(ACC_WEIGHT * ACC + MAP_WEIGHT * m) / (ACC_WEIGHT + MAP_WEIGHT)``, m the mean of the per-class APs
    ``class_ap`` (K,) named by ``settings.score_map``: weighted by ``weights`` (K,) or plain.
    """
    s = settings
    class_ap = np.asarray(class_ap, dtype=np.float64)
    m = weighted_mean(class_ap, weights if s.score_map == "weighted_mAP" else np.ones(len(class_ap)))
    acc_term = 0.0 if s.acc_weight == 0 else s.acc_weight * acc
    map_term = 0.0 if s.map_weight == 0 else s.map_weight * m
    return (acc_term + map_term) / (s.acc_weight + s.map_weight)


class DefectEvalResult:
    """Everything :func:`evaluate_detections` computed; ``summary()`` is the flat dict Detectron2 expects."""

    def __init__(self, class_names, settings, weights, weight_source, acc_info, ap_info, image_ids, dt, gt):
        self.class_names = list(class_names)
        self.settings = settings
        self.weights = weights
        self.weight_source = weight_source
        self.ap = ap_info["ap"] * 100.0  # (K, T)
        self.recall = ap_info["recall"] * 100.0
        self.num_gt = ap_info["num_gt"]
        self.num_det = ap_info["num_det"]
        self.curves = ap_info["curves"]
        self.present = self.num_gt > 0
        self.class_ap = np.where(self.present, self.ap.mean(axis=1) if self.ap.shape[1] else np.nan, np.nan)
        self.absent_classes = [c for c, p in zip(self.class_names, self.present) if not p]
        self.acc, self.img_scores = acc_info
        self.image_ids = image_ids
        self.dt, self.gt = dt, gt

    @property
    def mAP(self):
        return weighted_mean(self.class_ap, np.ones(len(self.class_ap)))

    @property
    def weighted_mAP(self):
        return weighted_mean(self.class_ap, self.weights)

    @property
    def score(self):
        """``(ACC_WEIGHT * ACC + MAP_WEIGHT * <SCORE_MAP>) / (ACC_WEIGHT + MAP_WEIGHT)``."""
        return combined_score(self.settings, self.acc, self.class_ap, self.weights)

    def summary(self):
        """Flat ``{"mAP", "weighted_mAP", "ACC", "score", "AP@<iou>", "AP-<class>"}``, values in 0-100."""
        out = {"mAP": self.mAP, "weighted_mAP": self.weighted_mAP, "ACC": self.acc, "score": self.score}
        for t, label in enumerate(self.settings.iou.labels):
            out[f"AP@{label}"] = weighted_mean(self.ap[:, t], np.ones(len(self.ap)))
        for name, v in zip(self.class_names, self.class_ap):
            out[f"AP-{name}"] = float(v)
        return out

    def per_class(self):
        """One row per class: class, AP, AP at each IoU, weight, #GT, #det, recall (mean over IoUs)."""
        rows = []
        for k, name in enumerate(self.class_names):
            rows.append({
                "class": name, "AP": float(self.class_ap[k]),
                "AP_per_iou": {lab: float(self.ap[k, t]) for t, lab in enumerate(self.settings.iou.labels)},
                "weight": float(self.weights[k]), "num_gt": int(self.num_gt[k]), "num_det": int(self.num_det[k]),
                "recall": float(np.mean(self.recall[k])) if self.present[k] else float("nan"),
            })
        return rows

    def table(self):
        """The per-class table as text (for the log)."""
        from tabulate import tabulate

        labels = self.settings.iou.labels
        header = ["class", "AP"] + [f"AP@{lab}" for lab in labels] + ["weight", "#GT", "#det", "recall"]
        rows = []
        for r in self.per_class():
            rows.append([r["class"], r["AP"]] + [r["AP_per_iou"][lab] for lab in labels]
                        + [r["weight"], r["num_gt"], r["num_det"], r["recall"]])
        return tabulate(rows, headers=header, tablefmt="pipe", floatfmt=".2f", numalign="left")

    def to_json(self):
        s = self.settings
        return {
            "summary": self.summary(),
            "per_class": self.per_class(),
            "absent_classes": self.absent_classes,
            "settings": {"iou": s.iou.name, "iou_thresholds": s.iou.labels, "ap_method": s.ap_method,
                         "class_weights": self.weight_source, "image_score_threshold": s.image_score_threshold,
                         "acc_weight": s.acc_weight, "map_weight": s.map_weight, "score_map": s.score_map,
                         "max_dets": s.max_dets},
            "num_images": len(self.image_ids),
            "num_normal_images": int((~self.gt["has_gt"]).sum()),
        }


def evaluate_detections(records, predictions, class_names, settings=None, dataset_name="dataset",
                        metadata_weights=None, image_ids=None):
    """
    Score per-image detections against ground-truth dataset dicts.

    Args:
        records (list[dict]): Detectron2 dataset dicts (contiguous ``category_id``).
        predictions (list[dict]): see :func:`det_arrays`; images without an entry have no detections.
        class_names (list[str]): K names.
        settings (DefectEvalSettings or None): defaults if None.
        metadata_weights (list[float] or None): the dataset's ``thing_class_weights``.
        image_ids (iterable or None): evaluate only these images (default: all records).
    Returns:
        DefectEvalResult
    """
    settings = settings or DefectEvalSettings()
    if image_ids is not None:
        wanted = set(image_ids)
        records = [r for r in records if r["image_id"] in wanted]
    records = sorted(records, key=lambda r: r["image_id"])  # COCOeval's image order
    index = {r["image_id"]: i for i, r in enumerate(records)}
    unknown = [p["image_id"] for p in predictions if p["image_id"] not in index]
    if unknown:
        raise DatasetError(f"{dataset_name}: predictions for {len(unknown)} image id(s) not in the dataset, "
                         f"e.g. {unknown[:5]}")
    K = len(class_names)
    gt = gt_arrays(records)
    dt = det_arrays(predictions, index)
    bad = dt["cls"][(dt["cls"] < 0) | (dt["cls"] >= K)]
    if len(bad):
        raise DatasetError(f"{dataset_name}: detections with class ids {sorted(set(bad.tolist()))} outside 0..{K - 1}")
    weights, source = settings.weights_for(dataset_name, K, metadata_weights)
    match = match_detections(gt, dt, K, settings.iou, settings.max_dets)
    ap_info = accumulate(gt, dt, match, K, settings.ap_method)
    scores = image_scores(dt, len(records))
    acc = image_accuracy(gt["has_gt"], scores, settings.image_score_threshold)
    res = DefectEvalResult(class_names, settings, weights, source, (acc, scores), ap_info,
                           [r["image_id"] for r in records], dt, gt)
    res.match = match
    res.records = records
    return res


def load_predictions(path, dataset_name):
    """
    Read saved detections: the evaluator's ``defect_detections.json`` (one entry per image, with
    ``defect_score``) or a COCO results json (a list of ``{image_id, category_id, bbox, score}``).

    Returns:
        list[dict]: per image ``image_id``, ``boxes`` (N, 4) XYWH, ``scores``, ``classes`` (contiguous),
        ``defect_score`` (or None).
    Raises:
        ResultsFileError: naming the file and the record (a missing file, bad json, a malformed detection).
    """
    from detectron2.data import MetadataCatalog

    data = read_results_json(path)
    id_map = getattr(MetadataCatalog.get(dataset_name), "thing_dataset_id_to_contiguous_id", None)
    if id_map is None:
        raise DatasetError(f"dataset {dataset_name!r} is not registered (no thing_dataset_id_to_contiguous_id)")

    def entry(image_id, dets, where, defect_score=None):
        boxes, scores, classes = [], [], []
        for j, d in enumerate(dets):
            check_detection(d, f"{path}: {where}, detection {j}")
            cid, box, score = d["category_id"], [float(v) for v in d["bbox"]], float(d["score"])
            if cid not in id_map:
                raise ResultsFileError(f"{path}: {where}, detection {j}: category id {cid} unknown to {dataset_name}")
            boxes.append(box)
            scores.append(score)
            classes.append(id_map[cid])
        return {"image_id": image_id, "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                "scores": np.asarray(scores), "classes": np.asarray(classes, dtype=np.int64),
                "defect_score": defect_score}

    if isinstance(data, dict) and "images" in data:
        data = data["images"]
    if not isinstance(data, list):
        raise ResultsFileError(f"{path}: expected a list of detections or of per-image entries")
    out = []
    if data and isinstance(data[0], dict) and "instances" in data[0]:
        for i, e in enumerate(data):
            if not isinstance(e, dict) or "image_id" not in e or "instances" not in e:
                raise ResultsFileError(f"{path}: entry {i}: needs image_id and instances")
            out.append(entry(e["image_id"], e["instances"], f"entry {i} (image id {e['image_id']})",
                             e.get("defect_score")))
        return out
    per_image = {}
    for i, d in enumerate(data):
        if not isinstance(d, dict) or "image_id" not in d:
            raise ResultsFileError(f"{path}: detection {i}: needs image_id")
        per_image.setdefault(d["image_id"], []).append((i, d))
    for image_id, items in per_image.items():
        e = entry(image_id, [d for _, d in items], f"image id {image_id}")
        out.append(e)
    return out
