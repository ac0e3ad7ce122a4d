"""Per-class score thresholds that maximise the configured competition score, from saved detections."""
import numpy as np

from .ap import ap_from_flags
from .scoring import combined_score, image_accuracy
from ..utils.errors import ConfigError

__all__ = ["ThresholdScorer", "kept_by_thresholds", "model_score_thresholds", "tune_class_thresholds"]


def kept_by_thresholds(scores, thresholds):
    """
    ``scores > thresholds`` (broadcast) as the model's postprocessing compares: strictly, in float32 (the
    dtype of its scores, which the thresholds are cast to), so a saved score equal to a threshold is dropped.
    """
    return np.asarray(scores, dtype=np.float32) > np.asarray(thresholds, dtype=np.float32)


def model_score_thresholds(cfg, num_classes):
    """
    The per-class score thresholds the configured model applies (K,): ``MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS``
    when set, else the model's global threshold (``MODEL.FCOS.SCORE_THRESH_TEST`` for FCOS meta-architectures,
    ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` otherwise). Saved detections of that model all score above them.
    """
    per_class = [float(t) for t in cfg.MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS]
    if per_class:
        if len(per_class) != num_classes:
            raise ConfigError(f"MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS has {len(per_class)} values but the "
                             f"dataset has {num_classes} classes")
        return per_class
    head = cfg.MODEL.FCOS if "FCOS" in cfg.MODEL.META_ARCHITECTURE else cfg.MODEL.ROI_HEADS
    return [float(head.SCORE_THRESH_TEST)] * num_classes


class ThresholdScorer:
    """
    The score of a :class:`DefectEvalResult` when only the detections scoring strictly above their class's
    threshold are kept: the rule of the model's postprocessing
    (:func:`d2_defects.modeling.postprocess.select_detections` keeps ``score > threshold`` in float32;
    see :func:`kept_by_thresholds`).

    Dropping the lowest-scored detections does not change how the remaining ones match (matching is
    greedy in score order), so one matching serves every threshold: class APs come from truncating the
    score-sorted true/false-positive flags, and an image's score is its best remaining detection (or the
    model's ``defect_score``, which thresholds do not affect). A threshold of ``-inf`` keeps everything.
    """

    def __init__(self, result):
        self.result = result
        self.settings = result.settings
        K, n_img = len(result.class_names), len(result.image_ids)
        dt = result.dt
        # best detection score per (image, class); -inf where none
        self.best = np.full((n_img, K), -np.inf)
        np.maximum.at(self.best, (dt["img"], dt["cls"]), dt["scores"])
        self.defect_score = dt["defect_score"]
        self.has_gt = result.gt["has_gt"]

    def class_ap(self, k, threshold):
        """AP (0-100, mean over IoU thresholds) of class ``k`` keeping detections with score > threshold."""
        c = self.result.curves[k]
        n = int(np.sum(kept_by_thresholds(c["scores"], threshold)))  # a prefix: scores sorted decreasing
        ap, _ = ap_from_flags(c["tp"][:, :n], c["fp"][:, :n], c["num_gt"], self.settings.ap_method)
        return float(np.mean(ap) * 100) if c["num_gt"] else float("nan")

    def accuracy(self, thresholds):
        kept = np.where(kept_by_thresholds(self.best, np.asarray(thresholds)[None, :]), self.best, -np.inf)
        scores = kept.max(axis=1) if kept.shape[1] else np.full(len(kept), -np.inf)
        scores = np.where(np.isnan(self.defect_score), scores, self.defect_score)
        return image_accuracy(self.has_gt, scores, self.settings.image_score_threshold)

    def combine(self, aps, acc):
        return combined_score(self.settings, acc, aps, self.result.weights)

    def score(self, thresholds):
        aps = [self.class_ap(k, t) for k, t in enumerate(thresholds)]
        return self.combine(aps, self.accuracy(thresholds))


def tune_class_thresholds(result, num_candidates=40, max_rounds=3, progress=None, min_thresholds=None):
    """
    Coordinate ascent over per-class thresholds (candidates: the class's minimum and the quantiles of its
    detection scores above it, rounded down to 3 decimals so the printed values are exact).

    Args:
        min_thresholds (list[float] or None): per class, the threshold the model already applies (see
            :func:`model_score_thresholds`); no returned threshold is below it, so the model with the
            returned thresholds returns a subset of the saved detections. Default 0.
    Returns:
        list[float]: thresholds (K,), each >= its minimum.
        float: score before (all saved detections), float: score after (detections > thresholds).
    """
    scorer = ThresholdScorer(result)
    K = len(result.class_names)
    floor = [0.0] * K if min_thresholds is None else [float(t) for t in min_thresholds]
    before = scorer.score([-np.inf] * K)
    thresholds = list(floor)
    aps = [scorer.class_ap(k, t) for k, t in enumerate(thresholds)]
    best = scorer.combine(aps, scorer.accuracy(thresholds))
    cands = []
    for k in range(K):
        s = result.curves[k]["scores"]
        q = np.floor(np.quantile(s, np.linspace(0, 1, num_candidates)) * 1000) / 1000 if len(s) else np.zeros(0)
        cands.append(np.unique(np.r_[floor[k], q[q > floor[k]]]))
    for _ in range(max_rounds):
        changed = False
        it = range(K) if progress is None else progress(range(K), desc="tuning classes", leave=False)
        for k in it:
            for t in cands[k]:
                trial = list(thresholds)
                trial[k] = float(t)
                trial_aps = list(aps)
                trial_aps[k] = scorer.class_ap(k, t)
                s = scorer.combine(trial_aps, scorer.accuracy(trial))
                if s > best + 1e-9:
                    best, thresholds, aps, changed = s, trial, trial_aps, True
        if not changed:
            break
    return thresholds, before, best
