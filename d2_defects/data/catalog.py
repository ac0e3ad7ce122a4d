"""Registration: turning a dataset (COCO json or any reader's COCO dict) into Detectron2's catalogs.

- :func:`register_defect_dataset` / :func:`register_coco_defects`: fill ``MetadataCatalog`` now (classes,
  contiguous ids, class weights, where the data lives) and register a lazy, cached loader in
  ``DatasetCatalog``; the records are read (:mod:`.formats`) and checked (:mod:`.validation`) once per
  process and file version, when the dataset is first used.
- :func:`load_coco_dict` / :func:`load_coco_defects`: a COCO dict / json -> Detectron2's dataset dicts.

Unlike ``detectron2.data.datasets.load_coco_json`` the loader maps category ids of any numbering to contiguous
ids, keeping the names; drops the categories of ``ignore`` (e.g. a "背景"/background class), logging how many
boxes went; keeps normal images (no boxes) as records with an empty ``annotations`` list; and checks the records
first (one :class:`DatasetError` listing every problem, instead of a ``KeyError`` deep inside the data loader).
"""
import copy
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .formats import FORMATS, read_coco_json, read_dataset
from .validation import VALIDATION_MODES, apply_ignore, check_coco
from ..utils.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "CachedLoader",
    "json_is_faithful",
    "load_coco_defects",
    "load_coco_dict",
    "register_coco_defects",
    "register_defect_dataset",
    "set_metadata",
]


def set_metadata(meta, cats, class_weights=None, **extra):
    """
    Fill a dataset's metadata from its categories (sorted by id): ``thing_classes``,
    ``thing_dataset_id_to_contiguous_id``, ``evaluator_type`` "coco", ``thing_class_weights`` (from
    ``class_weights`` or each category's ``weight``, when every class has one) and ``extra``.
    Raises :class:`DatasetError` when the number of weights differs from the number of classes.
    """
    meta.set(
        thing_classes=[c["name"] for c in cats],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
        evaluator_type="coco",
        **extra,
    )
    weights = list(class_weights) if class_weights else [c.get("weight") for c in cats]
    if weights and all(w is not None for w in weights):
        if len(weights) != len(cats):
            raise DatasetError(f"{meta.name}: {len(weights)} class weights given for {len(cats)} classes")
        meta.set(thing_class_weights=[float(w) for w in weights])


def load_coco_dict(coco, source, image_root, dataset_name=None, validation="error", ignore=(), reader_problems=()):
    """
    Turn a parsed COCO dict into Detectron2's dataset dicts (see :func:`load_coco_defects`): ignore, then
    check (:func:`check_coco`), then convert; fills the metadata of ``dataset_name`` when it has none.

    Args:
        coco (dict): COCO detection dict; ``file_name`` relative to ``image_root``. Not modified.
        source (str): where it came from (file or folder), used in messages.
        ignore (iterable[str]): category names to drop, with their boxes.
        reader_problems (list[str]): problems of the VOC/YOLO/labelme reader, reported with the others.
    """
    coco, _ = apply_ignore(coco, ignore, source)
    coco, bad_images = check_coco(coco, source, image_root, validation, reader_problems=reader_problems)

    cats = sorted(coco["categories"], key=lambda c: c["id"])
    id_map = {c["id"]: i for i, c in enumerate(cats)}
    if dataset_name is not None and not hasattr(MetadataCatalog.get(dataset_name), "thing_classes"):
        set_metadata(MetadataCatalog.get(dataset_name), cats, image_root=image_root)

    anns_per_image = {}
    for ann in coco.get("annotations", []):
        anns_per_image.setdefault(ann["image_id"], []).append(ann)
    records = []
    for img in coco["images"]:
        if img["id"] in bad_images:
            continue
        objs = []
        for ann in anns_per_image.get(img["id"], []):
            obj = {
                "bbox": [float(v) for v in ann["bbox"]],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": id_map[ann["category_id"]],
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
            if ann.get("segmentation"):  # polygons or RLE, as in the json (checked by check_coco)
                obj["segmentation"] = ann["segmentation"]
            objs.append(obj)
        records.append(
            {
                "file_name": os.path.join(image_root, img["file_name"]),
                "height": img["height"],
                "width": img["width"],
                "image_id": img["id"],
                "annotations": objs,
            }
        )
    logger.info(
        f"Loaded {len(records)} images ({sum(not r['annotations'] for r in records)} normal) and "
        f"{sum(len(r['annotations']) for r in records)} boxes from {source}"
    )
    return records


def load_coco_defects(json_file, image_root, dataset_name=None, validation="error", ignore=()):
    """
    Load a COCO detection json into Detectron2's dataset dicts.

    Args:
        json_file (str): path to the COCO json.
        image_root (str): folder with the images.
        dataset_name (str or None): if given, fill ``MetadataCatalog.get(dataset_name)`` with
            ``thing_classes``, ``thing_dataset_id_to_contiguous_id``, ``thing_class_weights``,
            ``json_file`` and ``image_root``.
        validation (str): "error" raises :class:`DatasetError` on any problem; "warn" logs them and
            drops the images concerned; "clip" clips boxes outside their image and raises on the rest;
            "none" skips the checks.
        ignore (iterable[str]): category names to drop with their boxes (count logged).

    Returns:
        list[dict]: one record per image (normal images have ``annotations == []``).
    """
    coco = read_coco_json(json_file)
    if dataset_name is not None and not hasattr(MetadataCatalog.get(dataset_name), "thing_classes"):
        if json_is_faithful(validation, ignore):
            MetadataCatalog.get(dataset_name).set(json_file=json_file)
    return load_coco_dict(coco, json_file, image_root, dataset_name, validation=validation, ignore=ignore)


def json_is_faithful(validation, ignore):
    """Whether the source json equals the loaded records, so that COCOEvaluator may use it as ground
    truth (otherwise it converts the loaded records itself)."""
    return not ignore and validation in ("error", "none")


class CachedLoader:
    """A picklable ``DatasetCatalog`` loader that runs the checks once per process and file version."""

    def __init__(self, fn, files, **kwargs):
        self.fn, self.files, self.kwargs = fn, list(files), kwargs
        self._key, self._records = None, None

    def _signature(self):
        sig = []
        for f in self.files:
            try:
                st = os.stat(f)
                sig.append((f, st.st_size, st.st_mtime_ns))
            except OSError:
                sig.append((f, None, None))
        return tuple(sig)

    def __call__(self):
        key = self._signature()
        if self._records is None or key != self._key:
            self._records, self._key = self.fn(**self.kwargs), key
        return copy.deepcopy(self._records)


def register_coco_defects(name, json_file, image_root, validation="error", class_weights=None, ignore=()):
    """
    Register a COCO-format defect dataset under ``name``.

    The json is read once here to fill the metadata (so evaluators and visualisers know the classes
    before the data is loaded); the records themselves are loaded (and checked) lazily by
    ``DatasetCatalog.get``, once per process.
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    coco, _ = apply_ignore(read_coco_json(json_file), ignore, json_file)
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    meta = MetadataCatalog.get(name)
    extra = {"json_file": json_file} if json_is_faithful(validation, ignore) else {}
    set_metadata(meta, cats, class_weights, image_root=image_root, dataset_format="coco",
                  annotation_path=json_file, ignore=list(ignore or ()), **extra)
    DatasetCatalog.register(
        name,
        CachedLoader(load_coco_defects, [json_file], json_file=json_file, image_root=image_root,
                      dataset_name=name, validation=validation, ignore=tuple(ignore or ())),
    )
    return meta


class FormatLoader:
    """Reads a non-COCO dataset once (shared by the metadata and the records)."""

    def __init__(self, fmt, annotations, images, classes):
        self.args = (fmt, annotations, images, classes)
        self._coco, self.problems = None, []

    def coco(self):
        if self._coco is None:
            # reading problems are collected and reported with the validation's (the mode decides)
            self.problems = []
            self._coco = read_dataset(*self.args, problems=self.problems)
        return self._coco

    def load(self, name, validation, ignore):
        coco = self.coco()
        return load_coco_dict(coco, self.args[1], self.args[2], name, validation=validation, ignore=ignore,
                              reader_problems=self.problems)


def register_defect_dataset(name, format, annotations, images, classes=None, class_weights=None, ignore=(),
                            validation="error"):
    """
    Register a dataset of any supported format under ``name`` (replacing an earlier registration).

    Args:
        name (str): the name ``DATASETS.TRAIN`` / ``TEST`` use.
        format (str): "coco", "voc", "yolo" or "labelme" (see :mod:`d2_defects.data.formats`).
        annotations (str): COCO json file, or the annotation folder of the other formats.
        images (str): image folder.
        classes (list[str] or None): class names in contiguous-id order (None: from the data).
        class_weights (list[float] or None): one weight per class (competition scores).
        ignore (iterable[str]): class names dropped with their boxes.
        validation (str): "error", "warn", "clip" or "none" (see :mod:`d2_defects.data.validation`).

    Returns:
        Metadata: the dataset's metadata (``thing_classes``, ``thing_dataset_id_to_contiguous_id``, ...).
    """
    if format not in FORMATS:
        raise DatasetError(f"dataset {name}: unknown format {format!r}; use one of {FORMATS}")
    if validation not in VALIDATION_MODES:
        raise DatasetError(f"dataset {name}: validation must be one of {VALIDATION_MODES}, got {validation!r}")
    ignore = tuple(ignore or ())
    if format == "coco" and classes is None:
        meta = register_coco_defects(name, annotations, images, validation=validation,
                                     class_weights=class_weights, ignore=ignore)
        return meta
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    reader = FormatLoader(format, annotations, images, list(classes) if classes is not None else None)
    if classes is not None:
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(classes) if n not in ignore]
    else:
        coco, _ = apply_ignore(reader.coco(), ignore, annotations)
        cats = sorted(coco["categories"], key=lambda c: c["id"])
    meta = MetadataCatalog.get(name)
    extra = {"json_file": annotations} if format == "coco" and json_is_faithful(validation, ignore) else {}
    set_metadata(meta, cats, class_weights, image_root=images, dataset_format=format,
                  annotation_path=annotations, ignore=list(ignore), source_classes=classes, **extra)
    files = [annotations] if os.path.isfile(annotations) else []
    DatasetCatalog.register(name, CachedLoader(reader.load, files, name=name, validation=validation,
                                                ignore=ignore))
    return meta
