from . import builtin  # noqa: F401  registers built-in datasets
from .builtin import register_synthetic_defects
from .catalog import load_coco_defects, register_coco_defects, register_defect_dataset
from .manifest import load_manifest, register_manifest
from ..utils.errors import DatasetError
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
