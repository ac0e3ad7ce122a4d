"""Per-class score thresholds that maximise the configured competition score, from saved detections."""
import numpy as np

from .ap import ap_from_flags
from .scoring import image_accuracy, weighted_mean

__all__ = ["ThresholdScorer", "tune_class_thresholds"]


class ThresholdScorer:
    """
    The score of a :class:`DefectEvalResult` when each class's detections below a threshold are dropped.

    Dropping the lowest-scored detections does not change how the remaining ones match (matching is
    greedy in score order), so one matching serves every threshold: class APs come from truncating the
    score-sorted true/false-positive flags, and an image's score is its best remaining detection (or the
    model's ``defect_score``, which thresholds do not affect).
    """

    def __init__(self, result):
        self.result = result
        self.settings = result.settings
        K, n_img = len(result.class_names), len(result.image_ids)
        dt = result.dt
        # best detection score per (image, class); 0 where none (as in scoring.image_scores)
        self.best = np.zeros((n_img, K))
        np.maximum.at(self.best, (dt["img"], dt["cls"]), dt["scores"])
        self.defect_score = dt["defect_score"]
        self.has_gt = result.gt["has_gt"]

    def class_ap(self, k, threshold):
        """AP (0-100, mean over IoU thresholds) of class ``k`` keeping detections with score >= threshold."""
        c = self.result.curves[k]
        n = int(np.sum(c["scores"] >= threshold))
        ap, _ = ap_from_flags(c["tp"][:, :n], c["fp"][:, :n], c["num_gt"], self.settings.ap_method)
        return float(np.mean(ap) * 100) if c["num_gt"] else float("nan")

    def accuracy(self, thresholds):
        kept = np.where(self.best >= np.asarray(thresholds)[None, :], self.best, 0.0)
        scores = kept.max(axis=1) if kept.shape[1] else np.zeros(len(kept))
        scores = np.where(np.isnan(self.defect_score), scores, self.defect_score)
        return image_accuracy(self.has_gt, scores, self.settings.image_score_threshold)

    def combine(self, aps, acc):
        s = self.settings
        wmap = weighted_mean(np.asarray(aps, dtype=np.float64), self.result.weights)
        acc_term = 0.0 if s.acc_weight == 0 else s.acc_weight * acc
        return (acc_term + s.map_weight * wmap) / (s.acc_weight + s.map_weight)

    def score(self, thresholds):
        aps = [self.class_ap(k, t) for k, t in enumerate(thresholds)]
        return self.combine(aps, self.accuracy(thresholds))


def tune_class_thresholds(result, num_candidates=40, max_rounds=3, progress=None):
    """
    Coordinate ascent over per-class thresholds (candidates: 0 and quantiles of the class's detection
    scores, rounded to 3 decimals so the printed values are exact).

    Returns:
        list[float]: thresholds (K,).
        float: score before (all detections), float: score after.
    """
    scorer = ThresholdScorer(result)
    K = len(result.class_names)
    thresholds = [0.0] * K
    before = scorer.score(thresholds)
    aps = [scorer.class_ap(k, 0.0) for k in range(K)]
    cands = []
    for k in range(K):
        s = result.curves[k]["scores"]
        q = np.quantile(s, np.linspace(0, 1, num_candidates)) if len(s) else np.zeros(0)
        cands.append(np.unique(np.r_[0.0, np.floor(q * 1000) / 1000]))
    best = before
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
