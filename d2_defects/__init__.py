"""d2_defects: a Detectron2 plugin for industrial defect detection.

``import d2_defects`` registers every model part, dataset and evaluator of the project with
Detectron2's registries; ``add_defects_config(cfg)`` adds the project's config keys.
"""
from . import data  # noqa: F401  registers the built-in datasets (when present on disk)
from . import modeling  # noqa: F401  registers ROI heads, meta-architectures, backbones
from .config import add_defects_config

__version__ = "0.1.0"
__all__ = ["add_defects_config"]
