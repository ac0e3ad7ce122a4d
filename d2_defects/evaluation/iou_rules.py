"""IoU thresholds of the evaluation protocols: fixed lists and the bottle competition's size rule."""
import numpy as np
from ..utils.errors import ConfigError

__all__ = ["IOU_PRESETS", "IouRule", "bottle_iou_threshold", "resolve_iou"]

# Fixed-threshold presets. "bottle" is the size-dependent rule of :func:`bottle_iou_threshold`.
IOU_PRESETS = {
    "coco": tuple(np.linspace(0.5, 0.95, 10).round(2).tolist()),
    "voc": (0.5,),
    "fabric": (0.1, 0.3, 0.5),
    "bottle": None,
}


def bottle_iou_threshold(short_side):
    """
    IoU threshold of the bottle competition's scorer, from the ground-truth box's shorter side ``m``
    (pixels, original image): m < 40 -> 0.2; 40 <= m < 120 -> m / 200; 120 <= m < 420 -> m / 1500 + 0.52;
    m >= 420 -> 0.8.

    Args:
        short_side (float or ndarray): shorter side(s) of ground-truth boxes.
    Returns:
        ndarray: threshold(s), same shape.
    """
    m = np.asarray(short_side, dtype=np.float64)
    return np.select([m < 40, m < 120, m < 420], [0.2, m / 200.0, m / 1500.0 + 0.52], 0.8)


class IouRule:
    """
    The IoU threshold(s) a detection must reach to match a ground-truth box.

    Attributes:
        name (str): preset name or ``"custom"``.
        thresholds (tuple[float] or None): fixed thresholds, or None for the bottle size rule.
        labels (list[str]): one label per threshold column ("0.5", ..., or "size").
    """

    def __init__(self, name, thresholds):
        self.name = name
        self.thresholds = None if thresholds is None else tuple(float(t) for t in thresholds)
        self.labels = ["size"] if thresholds is None else [f"{t:g}" for t in self.thresholds]

    @property
    def num_thresholds(self):
        return len(self.labels)

    def per_gt(self, gt_boxes_xywh):
        """
        Thresholds for each ground-truth box.

        Args:
            gt_boxes_xywh (ndarray): (G, 4) XYWH absolute.
        Returns:
            ndarray: (T, G) thresholds.
        """
        g = len(gt_boxes_xywh)
        if self.thresholds is None:
            short = np.minimum(gt_boxes_xywh[:, 2], gt_boxes_xywh[:, 3]) if g else np.zeros(0)
            return bottle_iou_threshold(short)[None, :]
        return np.repeat(np.asarray(self.thresholds, dtype=np.float64)[:, None], g, axis=1)

    def __repr__(self):
        return f"IouRule({self.name}: {', '.join(self.labels)})"


def resolve_iou(spec, key="TEST.DEFECT_EVAL.IOU"):
    """
    Turn a config value into an :class:`IouRule`.

    Args:
        spec: None (= "coco"), a preset name ("coco", "voc", "fabric", "bottle"), a list/tuple of floats
            in (0, 1], or a string of comma-separated floats ("0.1,0.3,0.5").
        key (str): config key named in errors.
    Raises:
        ValueError: naming ``key`` for anything else.
    """
    if spec is None:
        spec = "coco"
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name in IOU_PRESETS:
            return IouRule(name, IOU_PRESETS[name])
        try:
            spec = [float(s) for s in name.strip("[]()").split(",") if s.strip()]
        except ValueError:
            raise ConfigError(
                f"{key}: unknown IoU preset {spec!r}; use one of {sorted(IOU_PRESETS)} or a list of "
                "thresholds such as [0.1, 0.3, 0.5]"
            ) from None
    if isinstance(spec, (list, tuple)):
        try:
            values = [float(v) for v in spec]
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: IoU thresholds must be numbers, got {spec!r}") from None
        if not values or any(not (0.0 < v <= 1.0) for v in values):
            raise ConfigError(f"{key}: IoU thresholds must be a non-empty list of values in (0, 1], got {spec!r}")
        return IouRule("custom", values)
    raise ConfigError(f"{key}: expected a preset name or a list of thresholds, got {spec!r}")
