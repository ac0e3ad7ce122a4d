"""Built-in datasets, registered on ``import d2_defects`` when their files are present.

Datasets live under ``$DETECTRON2_DATASETS`` (default ``./datasets``), like Detectron2's builtins:

    $DETECTRON2_DATASETS/synthetic_defects/{train,val}/*.png
    $DETECTRON2_DATASETS/synthetic_defects/annotations/instances_{train,val}.json

Create it with ``python datasets/prepare_synthetic_defects.py``; ``--preset large`` writes
``synthetic_defects_large/`` (registered as ``synthetic_defects_large_{train,val}``).
"""
import os

from .catalog import register_coco_defects

SYNTHETIC_DIRNAME = "synthetic_defects"


def datasets_root():
    """The folder of the built-in datasets: ``$DETECTRON2_DATASETS``, default ``./datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_synthetic_defects(root=None, prefix="synthetic_defects", dirname=SYNTHETIC_DIRNAME):
    """
    Register ``<prefix>_train`` / ``<prefix>_val`` from ``root/<dirname>`` (each split only if its json exists).

    Returns:
        list[str]: the names registered.
    """
    base = os.path.join(root or datasets_root(), dirname)
    names = []
    for split in ("train", "val"):
        json_file = os.path.join(base, "annotations", f"instances_{split}.json")
        if os.path.isfile(json_file):
            name = f"{prefix}_{split}"
            register_coco_defects(name, json_file, os.path.join(base, split))
            names.append(name)
    return names


register_synthetic_defects()
register_synthetic_defects(prefix="synthetic_defects_large", dirname="synthetic_defects_large")
