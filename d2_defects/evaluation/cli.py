"""Shared pieces of ``tools/analyze_results.py`` and ``tools/tune_thresholds.py``."""
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config import load_config
from ..utils.errors import DatasetError, DefectsError, UsageError
from ..utils.errors import report_error  # noqa: F401  (re-exported)
from .scoring import defect_eval_settings, evaluate_detections, load_predictions

__all__ = ["add_common_args", "evaluate_saved", "USER_ERRORS", "report_error"]

# the errors the evaluation tools report as one line (the project's own; anything else is a bug)
USER_ERRORS = (DefectsError,)


def add_common_args(p):
    p.add_argument("--predictions", required=True,
                   help="defect_detections.json written by DefectEvaluator, or a COCO results json")
    p.add_argument("--dataset", required=True, help="registered dataset name, e.g. synthetic_defects_val")
    p.add_argument("--config-file", default="", help="config whose TEST.DEFECT_EVAL.* settings to use")
    p.add_argument("--iou", default=None, help="IoU preset (coco, voc, fabric, bottle) or list '0.1,0.3,0.5'")
    p.add_argument("--ap-method", default=None, choices=["coco", "voc"], help="AP integration")
    p.add_argument("opts", nargs="*", default=[],
                   help="config overrides: KEY VALUE pairs (TEST.DEFECT_EVAL.*, "
                        "MODEL.ROI_HEADS.SCORE_THRESH_TEST)")
    return p


def evaluate_saved(args, progress=None):
    """Load the config, the dataset and ``args.predictions``; return a DefectEvalResult and the config."""
    cfg = load_config(args.config_file, args.opts)
    settings = defect_eval_settings(cfg, iou=args.iou, ap_method=args.ap_method)
    if args.dataset not in DatasetCatalog.list():
        raise UsageError(f"dataset {args.dataset!r} is not registered (is DETECTRON2_DATASETS set to the "
                        "folder that holds it?)")
    meta = MetadataCatalog.get(args.dataset)
    preds = load_predictions(args.predictions, args.dataset)
    records = DatasetCatalog.get(args.dataset)
    try:
        result = evaluate_detections(records, preds, meta.thing_classes, settings, dataset_name=args.dataset,
                                     metadata_weights=getattr(meta, "thing_class_weights", None))
    except DatasetError as e:  # predictions that do not fit the dataset
        raise DatasetError(f"{args.predictions}: {e}") from None
    return result, cfg
