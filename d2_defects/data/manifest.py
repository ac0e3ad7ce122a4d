"""Registering datasets without code: YAML manifests (each entry through :func:`.catalog.register_defect_dataset`).

A manifest lists datasets; relative paths resolve against the manifest's folder::

    datasets:
      - name: bottle_train
        format: voc                 # coco | voc | yolo | labelme
        annotations: bottle/Annotations
        images: bottle/JPEGImages
        classes: [瓶盖破损, 瓶盖变形]  # optional: fixes the class order; other labels are reported
        class_weights: [0.6, 0.4]   # optional, for the competition scores
        ignore: [背景]               # optional: dropped with their boxes, count logged
        validation: warn            # optional: overrides DATASETS.VALIDATION for this entry

``DATASETS.MANIFEST`` (or ``train_net.py --manifest``) registers every entry at setup in every process;
``DATASETS.TRAIN`` / ``DATASETS.TEST`` then name them.
"""
import difflib
import logging
import os

import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog

from .catalog import register_defect_dataset
from .formats import FORMATS, read_dataset
from .validation import VALIDATION_MODES
from ..utils.errors import ConfigError, DatasetError, InputNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["load_manifest", "register_manifest", "register_from_config"]

_KEYS = {"name", "format", "annotations", "images", "classes", "class_weights", "ignore", "validation"}


def load_manifest(path):
    """
    Parse a manifest and check its entries.

    Returns:
        list[dict]: entries with absolute paths and every key present (``None`` when not given).
    """
    if not os.path.isfile(path):
        raise InputNotFoundError(f"datasets manifest not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise DatasetError(path, [f"not a valid YAML file: {e}"]) from None
    entries = data.get("datasets") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise DatasetError(path, ["expected a list of datasets under 'datasets:'"])
    base = os.path.dirname(os.path.abspath(path))
    out, problems, names = [], [], set()
    for i, e in enumerate(entries):
        label = e.get("name", "?") if isinstance(e, dict) else repr(e)
        where = f"entry {i} ({label})"
        if not isinstance(e, dict):
            problems.append(f"{where}: expected a mapping with name, format, annotations, images")
            continue
        missing = [k for k in ("name", "format", "annotations", "images") if not e.get(k)]
        unknown = sorted(set(e) - _KEYS)
        if missing:
            problems.append(f"{where}: missing key(s) {missing}")
        if unknown:
            problems.append(f"{where}: unknown key(s) {unknown} (known: {sorted(_KEYS)})")
        if e.get("format") and e["format"] not in FORMATS:
            problems.append(f"{where}: unknown format {e['format']!r} (use one of {list(FORMATS)})")
        if e.get("validation") is not None and e["validation"] not in VALIDATION_MODES:
            problems.append(f"{where}: validation must be one of {list(VALIDATION_MODES)}")
        if e.get("name") in names:
            problems.append(f"{where}: duplicate dataset name")
        names.add(e.get("name"))
        if missing or unknown:
            continue
        entry = {k: e.get(k) for k in _KEYS}
        for k in ("annotations", "images"):
            entry[k] = os.path.normpath(os.path.join(base, os.path.expanduser(str(e[k]))))
        for k in ("classes", "ignore"):
            if entry[k] is not None:
                entry[k] = [str(c) for c in entry[k]]
        out.append(entry)
    if problems:
        raise DatasetError(path, problems)
    return out


def _label_counts(coco, skip):
    names = {c["id"]: c["name"] for c in coco["categories"]}
    counts = {}
    for a in coco.get("annotations", []):
        n = names.get(a.get("category_id"), a.get("category_id"))
        if n not in skip:
            counts[str(n)] = counts.get(str(n), 0) + 1
    for c in coco["categories"]:
        if c["name"] not in skip:
            counts.setdefault(c["name"], 0)
    return counts


def _shared_classes(entries, ignore, path="manifest"):
    """
    Class list for the non-COCO entries that give none: the sorted union of the labels of all those
    entries (without ignored ones), so that train and test splits get the same contiguous ids even
    when a split lacks a class. None if there are no such entries. Logs each entry's classes with their
    box counts, and warns when the entries disagree (a label in one entry only becomes a class of all).
    """
    todo = [e for e in entries if e["classes"] is None and e["format"] != "coco"]
    if not todo:
        return None
    per_entry = {}
    for e in todo:
        coco = read_dataset(e["format"], e["annotations"], e["images"], problems=[])  # problems: at loading
        skip = set(ignore) | set(e["ignore"] or [])
        per_entry[e["name"]] = _label_counts(coco, skip)
        shown = ", ".join(f"{n} ({k})" for n, k in sorted(per_entry[e["name"]].items()))
        logger.info(f"{path}: entry {e['name']}: {len(per_entry[e['name']])} classes (boxes): {shown}")
    names = sorted(set().union(*per_entry.values()))
    if len(per_entry) > 1:
        missing = {n: sorted(set(names) - set(c)) for n, c in per_entry.items() if set(names) - set(c)}
        if missing:
            lines = "; ".join(f"{n} lacks {', '.join(m)}" for n, m in missing.items())
            logger.warning(
                f"{path}: the entries without 'classes:' disagree on their labels ({lines}); every entry gets the "
                f"union of {len(names)} classes {names}. If a label is a typo or another dataset's name, give "
                f"'classes:' (or 'ignore:') in the manifest"
            )
    return names


def register_manifest(path, validation="error", ignore=()):
    """
    Register every dataset of a manifest.

    Args:
        validation (str): mode for entries without their own ``validation``.
        ignore (iterable[str]): class names ignored in every entry (added to each entry's ``ignore``).

    Returns:
        list[str]: the names registered.
    """
    names = []
    entries = load_manifest(path)
    shared = _shared_classes(entries, ignore, path)
    for e in entries:
        classes = e["classes"]
        if classes is None and e["format"] != "coco":
            classes = shared
        register_defect_dataset(
            e["name"], e["format"], e["annotations"], e["images"], classes=classes,
            class_weights=e["class_weights"], ignore=list(ignore) + list(e["ignore"] or []),
            validation=e["validation"] or validation,
        )
        MetadataCatalog.get(e["name"]).set(manifest=os.path.abspath(path))
        names.append(e["name"])
    logger.info(f"Registered {len(names)} dataset(s) from {path}: {', '.join(names)}")
    return names


def register_from_config(cfg, check=("TRAIN", "TEST")):
    """
    Register ``cfg.DATASETS.MANIFEST`` and check that the dataset names of ``DATASETS.<check>`` exist.
    Also checks the ``DATASETS.VALIDATION`` and ``INPUT.*`` augmentation values (``ValueError`` naming the key).
    ``DATASETS.VALIDATION`` / ``IGNORE_CATEGORIES`` apply to the manifest's datasets only (a warning names
    the other datasets of ``DATASETS.<check>`` when they are set): built-in datasets and those registered
    from Python keep the ``validation`` / ``ignore`` they were registered with.
    """
    from .augment import check_augmentation_config

    check_augmentation_config(cfg)
    if cfg.DATASETS.VALIDATION not in VALIDATION_MODES:
        raise ConfigError(f"DATASETS.VALIDATION must be one of {VALIDATION_MODES}, got {cfg.DATASETS.VALIDATION!r}")
    names = []
    if cfg.DATASETS.MANIFEST:
        names = register_manifest(cfg.DATASETS.MANIFEST, cfg.DATASETS.VALIDATION, cfg.DATASETS.IGNORE_CATEGORIES)
    registered = set(DatasetCatalog.list())
    unknown = [n for key in check for n in cfg.DATASETS[key] if n not in registered]
    if unknown:
        where = f" (manifest {cfg.DATASETS.MANIFEST} has: {', '.join(names)})" if cfg.DATASETS.MANIFEST else ""
        problems = []
        for n in unknown:
            close = difflib.get_close_matches(n, sorted(registered), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"dataset '{n}' is not registered{hint}{where}")
        raise DatasetError("DATASETS." + "/".join(check), problems)
    if cfg.DATASETS.VALIDATION != "error" or cfg.DATASETS.IGNORE_CATEGORIES:
        others = sorted({n for key in check for n in cfg.DATASETS[key] if n not in names})
        if others:
            logger.warning(
                f"DATASETS.VALIDATION / DATASETS.IGNORE_CATEGORIES apply to the datasets of DATASETS.MANIFEST "
                f"only; {', '.join(others)} keep(s) the validation and ignore list given at registration"
            )
    return names
