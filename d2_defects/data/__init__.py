from . import builtin  # noqa: F401  registers built-in datasets
from .builtin import register_synthetic_defects
from .coco import DatasetError, load_coco_defects, register_coco_defects
from .manifest import load_manifest, register_defect_dataset, register_manifest
from .synthetic import generate_dataset

__all__ = [
    "DatasetError",
    "generate_dataset",
    "load_coco_defects",
    "load_manifest",
    "register_defect_dataset",
    "register_manifest",
    "register_coco_defects",
    "register_synthetic_defects",
]
