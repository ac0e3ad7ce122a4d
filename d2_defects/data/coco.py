"""Loading and registering COCO-format defect datasets, with validation that names the bad record.

Unlike ``detectron2.data.datasets.load_coco_json`` this loader
- maps category ids of any numbering to contiguous ids, keeping the names;
- keeps normal images (no boxes) as records with an empty ``annotations`` list;
- checks the records first and reports *every* problem (file, image id, annotation id) in one
  :class:`DatasetError` instead of a ``KeyError`` deep inside the data loader.
"""
import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)

__all__ = ["DatasetError", "load_coco_defects", "register_coco_defects", "validate_coco_dict"]


class DatasetError(ValueError):
    """A dataset failed validation. ``problems`` holds one message per bad record."""

    def __init__(self, source, problems, max_shown=20):
        self.source = source
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:max_shown])
        more = len(self.problems) - max_shown
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s) found:\n  {shown}{tail}")


def validate_coco_dict(coco, json_file, image_root, check_files=True):
    """
    Check a parsed COCO dict for the errors that otherwise surface as obscure failures during training.

    Args:
        coco (dict): parsed COCO json.
        json_file (str): its path, used in messages.
        image_root (str): folder that ``file_name`` is relative to.
        check_files (bool): also check that every image file exists.

    Returns:
        list[str]: problems, each naming the file, image id and annotation id; empty if valid.
        set[int]: ids of images with a problem (so callers can drop them in "warn" mode).
    """
    problems, bad_images = [], set()
    images = coco.get("images")
    if not images:
        return [f"{json_file}: the dataset has no images"], bad_images
    cat_ids = {c["id"] for c in coco.get("categories", [])}
    seen_ids, seen_names, sizes = set(), set(), {}
    for img in images:
        iid = img.get("id")
        fname = img.get("file_name")
        if iid in seen_ids:
            problems.append(f"image id {iid} ({fname}): duplicate image id")
            bad_images.add(iid)
        seen_ids.add(iid)
        if fname in seen_names:
            problems.append(f"image id {iid} ({fname}): duplicate file name")
            bad_images.add(iid)
        seen_names.add(fname)
        sizes[iid] = (img.get("width"), img.get("height"), fname)
        if check_files and not os.path.isfile(os.path.join(image_root, fname)):
            problems.append(f"image id {iid}: image file not found: {os.path.join(image_root, fname)}")
            bad_images.add(iid)
    for ann in coco.get("annotations", []):
        aid, iid = ann.get("id"), ann.get("image_id")
        where = f"annotation id {aid} (image id {iid}"
        if iid not in sizes:
            problems.append(f"{where}): refers to an image id that is not in 'images'")
            continue
        w, h, fname = sizes[iid]
        where += f", {fname})"
        if ann.get("category_id") not in cat_ids:
            problems.append(
                f"{where}: unknown category id {ann.get('category_id')} (known: {sorted(cat_ids)})"
            )
            bad_images.add(iid)
        x, y, bw, bh = ann.get("bbox", [0, 0, 0, 0])
        if not (bw > 0 and bh > 0):
            problems.append(f"{where}: box {ann.get('bbox')} has non-positive width or height")
            bad_images.add(iid)
        elif w is not None and h is not None and (x < -0.5 or y < -0.5 or x + bw > w + 0.5 or y + bh > h + 0.5):
            problems.append(f"{where}: box {ann.get('bbox')} (XYWH) lies outside the {w}x{h} image")
            bad_images.add(iid)
    return problems, bad_images


def load_coco_defects(json_file, image_root, dataset_name=None, validation="error"):
    """
    Load a COCO detection json into Detectron2's dataset dicts.

    Args:
        json_file (str): path to the COCO json.
        image_root (str): folder with the images.
        dataset_name (str or None): if given, fill ``MetadataCatalog.get(dataset_name)`` with
            ``thing_classes``, ``thing_dataset_id_to_contiguous_id``, ``thing_class_weights``,
            ``json_file`` and ``image_root``.
        validation (str): "error" raises :class:`DatasetError` on any problem; "warn" logs them and
            drops the images concerned; "none" skips the checks.

    Returns:
        list[dict]: one record per image (normal images have ``annotations == []``).
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file not found: {json_file}")
    try:
        with open(json_file) as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(json_file, [f"not a valid json file: {e}"]) from None

    bad_images = set()
    if validation != "none":
        problems, bad_images = validate_coco_dict(coco, json_file, image_root)
        if problems:
            if validation == "error":
                raise DatasetError(json_file, problems)
            logger.warning(str(DatasetError(json_file, problems)) + "\n  -> dropping those images")

    cats = sorted(coco["categories"], key=lambda c: c["id"])
    id_map = {c["id"]: i for i, c in enumerate(cats)}
    if dataset_name is not None and not hasattr(MetadataCatalog.get(dataset_name), "thing_classes"):
        weights = [c.get("weight") for c in cats]
        meta = MetadataCatalog.get(dataset_name)
        meta.set(
            thing_classes=[c["name"] for c in cats],
            thing_dataset_id_to_contiguous_id=id_map,
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
        )
        if all(w is not None for w in weights):
            meta.set(thing_class_weights=[float(w) for w in weights])

    anns_per_image = {}
    for ann in coco.get("annotations", []):
        anns_per_image.setdefault(ann["image_id"], []).append(ann)
    records = []
    for img in coco["images"]:
        if img["id"] in bad_images:
            continue
        objs = []
        for ann in anns_per_image.get(img["id"], []):
            objs.append(
                {
                    "bbox": [float(v) for v in ann["bbox"]],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": id_map[ann["category_id"]],
                    "iscrowd": int(ann.get("iscrowd", 0)),
                }
            )
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
        f"{sum(len(r['annotations']) for r in records)} boxes from {json_file}"
    )
    return records


def register_coco_defects(name, json_file, image_root, validation="error", class_weights=None):
    """
    Register a COCO-format defect dataset under ``name``.

    The json is read once here to fill the metadata (so evaluators and visualisers know the classes
    before the data is loaded); the records themselves are loaded lazily by ``DatasetCatalog.get``.
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    with open(json_file) as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    meta = MetadataCatalog.get(name)
    meta.set(
        thing_classes=[c["name"] for c in cats],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
    )
    weights = class_weights or [c.get("weight") for c in cats]
    if all(w is not None for w in weights):
        if len(weights) != len(cats):
            raise ValueError(f"{name}: {len(weights)} class weights given for {len(cats)} classes")
        meta.set(thing_class_weights=[float(w) for w in weights])
    DatasetCatalog.register(
        name, lambda: load_coco_defects(json_file, image_root, name, validation=validation)
    )
    return meta
