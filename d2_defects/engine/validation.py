"""``validate_config(cfg)``: every component's config checks, run at setup before any work starts.

Without it some keys are read only when their component is first used: ``TEST.DEFECT_EVAL.*`` after the
whole training run, ``TEST.AUG.*`` only by ``--eval-only``, the class count at the first loss. Each check
raises :class:`~d2_defects.utils.errors.ConfigError` (or ``DatasetError``) naming the key and the fix.
Model keys are checked when the model is built, seconds after setup, by the model's own constructors.
"""
import logging

from detectron2.data import MetadataCatalog

from ..utils.errors import ConfigError

__all__ = ["validate_config", "num_classes_key", "check_num_classes", "check_masks", "load_test_datasets"]

logger = logging.getLogger("d2_defects")


def num_classes_key(cfg):
    """``(key, value)`` of the config key that sets the model's number of classes for its meta-architecture."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if "FCOS" in arch:
        return "MODEL.FCOS.NUM_CLASSES", int(cfg.MODEL.FCOS.NUM_CLASSES)
    if "SOLO" in arch:
        return "MODEL.SOLO.NUM_CLASSES", int(cfg.MODEL.SOLO.NUM_CLASSES)
    if arch == "RetinaNet":
        return "MODEL.RETINANET.NUM_CLASSES", int(cfg.MODEL.RETINANET.NUM_CLASSES)
    return "MODEL.ROI_HEADS.NUM_CLASSES", int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)


def check_num_classes(cfg, dataset_names=None):
    """
    Raise a :class:`ConfigError` when the model's class count (``num_classes_key``) differs from the number
    of classes (``thing_classes``) of a dataset in ``DATASETS.TRAIN`` / ``DATASETS.TEST``. Datasets without
    class names in their metadata are not checked.
    """
    key, k = num_classes_key(cfg)
    names = list(dataset_names) if dataset_names is not None else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    for name in names:
        classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
        if classes is None or len(classes) == k:
            continue
        shown = ", ".join(map(str, classes[:12])) + (", ..." if len(classes) > 12 else "")
        raise ConfigError(
            f"{key} is {k} but dataset '{name}' has {len(classes)} classes ({shown}); set {key} {len(classes)} "
            f"(in the config file or on the command line)"
        )


def check_masks(cfg):
    """
    With ``MODEL.MASK_ON``: every non-crowd box of every ``DATASETS.TRAIN`` / ``TEST`` dataset has a mask
    (``segmentation``), and RLE masks come with ``INPUT.MASK_FORMAT: bitmask`` (Detectron2 reads polygons
    only as ``polygon``). Raises one :class:`DatasetError` listing the first boxes without a mask (file and
    record), or a :class:`ConfigError` naming the key. Loads the datasets (cached per process).
    """
    from detectron2.data import DatasetCatalog

    from ..utils.errors import DatasetError

    if not cfg.MODEL.MASK_ON:
        return
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        missing, n_missing, rle = [], 0, False
        for rec in DatasetCatalog.get(name):
            for k, ann in enumerate(rec.get("annotations", [])):
                segm = ann.get("segmentation")
                if not segm and not ann.get("iscrowd", 0):
                    n_missing += 1
                    if len(missing) < 10:
                        missing.append(f"{rec['file_name']}: box {k} ({ann['bbox']}) has no mask")
                rle = rle or isinstance(segm, dict)
        if n_missing:
            more = [f"... and {n_missing - len(missing)} more"] if n_missing > len(missing) else []
            raise DatasetError(name, [f"MODEL.MASK_ON is set but {n_missing} box(es) have no mask "
                                      f"(segmentation); train a box model or add the masks"] + missing + more)
        if rle and cfg.INPUT.MASK_FORMAT != "bitmask":
            raise ConfigError(f"dataset '{name}' has RLE masks: set INPUT.MASK_FORMAT bitmask (it is "
                              f"{cfg.INPUT.MASK_FORMAT!r}; 'polygon' reads polygons only)")


def load_test_datasets(cfg):
    """
    Load (and so validate, in the dataset's validation mode) every ``DATASETS.TEST`` dataset now, so that a bad
    test record fails at setup and not after the training run. The records are cached per process, so the
    evaluation does not read them again.
    """
    from detectron2.data import DatasetCatalog

    for name in cfg.DATASETS.TEST:
        DatasetCatalog.get(name)


def validate_config(cfg):
    """
    Run every component's config checks against ``cfg`` (datasets must be registered already):

    - ``DATASETS.VALIDATION``, the ``INPUT.*`` augmentation keys and ``INPUT.HIGH_BIT_DEPTH.WINDOW``;
    - the model's class count against the classes of every ``DATASETS.TRAIN`` / ``TEST`` dataset;
    - ``INPUT.COPY_PASTE.CLASSES`` against the training classes;
    - ``MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS`` / ``MODEL.SOFT_NMS.*`` values;
    - ``MODEL.FREEZE.SCHEME``;
    - ``SOLVER.SWA.*`` and ``MODEL_EMA.*`` (when enabled);
    - ``TEST.AUG.*`` (when ``TEST.AUG.ENABLED``), ``TEST.SLICE.*`` and ``INPUT.SLICE.*`` (when enabled);
    - ``TEST.DEFECT_EVAL.*`` (when enabled), including the class weights against every test dataset;
    - with ``MODEL.MASK_ON``, the masks of every train and test dataset (:func:`check_masks`).
    """
    from ..data.augment import check_augmentation_config
    from ..data.validation import VALIDATION_MODES
    from ..data.mapper import high_bit_window
    from ..evaluation.scoring import defect_eval_settings
    from ..modeling.freeze import FREEZE_SCHEMES
    from ..modeling.postprocess import PostprocessParams
    from ..data.slicing import slice_train_options
    from ..modeling.slicing import slice_options
    from ..modeling.tta import tta_options
    from .ema import validate_ema_config
    from .swa import validate_swa_config

    if cfg.DATASETS.VALIDATION not in VALIDATION_MODES:
        raise ConfigError(f"DATASETS.VALIDATION must be one of {VALIDATION_MODES}, got {cfg.DATASETS.VALIDATION!r}")
    check_augmentation_config(cfg)
    high_bit_window(cfg)
    check_num_classes(cfg)
    _, k = num_classes_key(cfg)
    cp = cfg.INPUT.COPY_PASTE
    if cp.ENABLED and cp.CLASSES and cfg.DATASETS.TRAIN:
        classes = getattr(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]), "thing_classes", None)
        unknown = [c for c in cp.CLASSES if classes is not None and c not in classes]
        if unknown:
            raise ConfigError(f"INPUT.COPY_PASTE.CLASSES: unknown class(es) {unknown}; known: {classes}")
    PostprocessParams.from_config(cfg, num_classes=k)
    if cfg.MODEL.FREEZE.SCHEME not in FREEZE_SCHEMES:
        raise ConfigError(f"MODEL.FREEZE.SCHEME must be one of {FREEZE_SCHEMES}, got {cfg.MODEL.FREEZE.SCHEME!r}")
    until = cfg.MODEL.FREEZE.UNTIL_ITER
    if not isinstance(until, int) or until < 0:
        raise ConfigError(f"MODEL.FREEZE.UNTIL_ITER must be an integer >= 0 (iterations), got {until!r}")
    if until > 0 and cfg.MODEL.FREEZE.SCHEME == "none" and not cfg.MODEL.FREEZE.PATTERNS:
        raise ConfigError(f"MODEL.FREEZE.UNTIL_ITER is {until} but nothing is frozen: set MODEL.FREEZE.SCHEME "
                          "(or MODEL.FREEZE.PATTERNS)")
    validate_swa_config(cfg)
    validate_ema_config(cfg)
    if cfg.TEST.AUG.ENABLED:
        tta_options(cfg)
    if cfg.TEST.SLICE.ENABLED:
        slice_options(cfg)
    if cfg.INPUT.SLICE.ENABLED:
        slice_train_options(cfg)
    if cfg.TEST.DEFECT_EVAL.ENABLED:
        settings = defect_eval_settings(cfg)
        for name in cfg.DATASETS.TEST:
            meta = MetadataCatalog.get(name)
            classes = getattr(meta, "thing_classes", None)
            if classes is not None:
                settings.weights_for(name, len(classes), getattr(meta, "thing_class_weights", None))
    check_masks(cfg)
    logger.info("Config checked (validate_config): datasets, classes, augmentation, postprocessing, freezing, "
                "SWA, EMA, test-time augmentation and evaluation keys")
