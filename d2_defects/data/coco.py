"""Loading and registering COCO-format defect datasets, with validation that names the bad record.

Unlike ``detectron2.data.datasets.load_coco_json`` this loader
- maps category ids of any numbering to contiguous ids, keeping the names;
- drops categories listed in ``ignore`` (e.g. a "背景"/background class), logging how many boxes went;
- keeps normal images (no boxes) as records with an empty ``annotations`` list;
- checks the records first and reports *every* problem (file, image id, annotation id) in one
  :class:`DatasetError` instead of a ``KeyError`` deep inside the data loader: missing or undecodable
  image files, image sizes differing from the annotation, boxes of non-positive size or outside the
  image, unknown category ids, duplicate image ids or file names, empty datasets.

Validation modes (``DATASETS.VALIDATION``): ``"error"`` raises one summary error, ``"warn"`` logs the
problems and drops the images concerned, ``"clip"`` clips boxes that stick out of their image into it and
raises on every other problem, ``"none"`` skips the checks.  Image files are decoded once per process
(the result is cached in memory by path, size and modification time); the first check of a dataset
logs how many images it decoded and how long it took, with a tqdm bar on an interactive terminal.
"""
import copy
import json
import logging
import os
import time

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from ..utils.errors import DatasetError  # noqa: F401  (re-exported: the historical import path)
from ..utils.errors import ConfigError, InputNotFoundError

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetError",
    "VALIDATION_MODES",
    "apply_ignore",
    "clip_boxes",
    "image_size",
    "load_coco_defects",
    "load_coco_dict",
    "register_coco_defects",
    "validate_coco_dict",
]

VALIDATION_MODES = ("error", "warn", "clip", "none")

# (path, file size, mtime_ns) -> ((width, height), None) or (None, error message)
_IMAGE_CACHE = {}


def image_size(path):
    """
    Decode an image file once per process and return its size as Detectron2 will see it.

    Returns:
        tuple: ``((width, height), None)`` or ``(None, "reason")`` if the file is missing or cannot be
        decoded. The EXIF orientation is applied like ``detectron2.data.detection_utils.read_image``.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None, "image file not found"
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _IMAGE_CACHE:
        try:
            with Image.open(path) as im:
                im.load()  # full decode: catches truncated files that the header alone does not
                w, h = im.size
                orientation = im.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
            _IMAGE_CACHE[key] = ((w, h), None)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            _IMAGE_CACHE[key] = (None, f"image file cannot be decoded ({type(e).__name__}: {e})")
    return _IMAGE_CACHE[key]


def _progress(images, source, progress):
    """``images`` wrapped in a tqdm bar: ``progress`` True always, None on an interactive terminal of the
    main process only (training logs get the summary line of :func:`validate_coco_dict` instead)."""
    if progress is False:
        return images
    from detectron2.utils import comm
    from tqdm import tqdm

    # disable=None: tqdm shows the bar only if its output is a terminal
    disable = False if progress else (None if comm.is_main_process() else True)
    return tqdm(images, desc=f"checking images of {os.path.basename(source)}", unit="img", disable=disable)


def validate_coco_dict(coco, json_file, image_root, check_files=True, progress=None):
    """
    Check a parsed COCO dict for the errors that otherwise surface as obscure failures during training.

    Args:
        coco (dict): parsed COCO json.
        json_file (str): its path, used in messages.
        image_root (str): folder that ``file_name`` is relative to.
        check_files (bool): also check that every image file exists, decodes and has the size given
            in the annotation. Every image not yet in this process's cache is decoded (the costly
            part); the counts and time are logged at INFO level.
        progress (bool or None): tqdm bar over the image files (None: only on an interactive terminal,
            main process).

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
    start, cached_before, missing = time.perf_counter(), len(_IMAGE_CACHE), 0
    for img in _progress(images, json_file, progress) if check_files else images:
        iid = img.get("id")
        fname = img.get("file_name")
        # records read from VOC/YOLO/labelme name their annotation file, COCO ones their image id
        where = f"{img['_source']} ({fname})" if img.get("_source") else f"image id {iid} ({fname})"
        if iid in seen_ids:
            problems.append(f"{where}: duplicate image id")
            bad_images.add(iid)
        seen_ids.add(iid)
        if fname in seen_names:
            problems.append(f"{where}: duplicate file name")
            bad_images.add(iid)
        seen_names.add(fname)
        sizes[iid] = (img.get("width"), img.get("height"), fname)
        if check_files:
            path = os.path.join(image_root, fname)
            size, err = image_size(path)
            where_path = f"{img['_source']}" if img.get("_source") else f"image id {iid}"
            if err == "image file not found":
                missing += 1
                problems.append(f"{where_path}: image file not found: {path}")
                bad_images.add(iid)
            elif err is not None:
                problems.append(f"{where_path}: {err}: {path}")
                bad_images.add(iid)
            elif (img.get("width"), img.get("height")) != size:
                problems.append(
                    f"{where}: image size {size[0]}x{size[1]} differs from the "
                    f"annotation's {img.get('width')}x{img.get('height')}"
                )
                bad_images.add(iid)
    if check_files:
        decoded = len(_IMAGE_CACHE) - cached_before
        cached = len(images) - decoded - missing
        logger.info(
            f"{json_file}: checked {len(images)} image files in {time.perf_counter() - start:.1f} s "
            f"({decoded} decoded, {cached} from this process's cache, {missing} missing)"
        )
    for ann in coco.get("annotations", []):
        aid, iid = ann.get("id"), ann.get("image_id")
        where = f"annotation id {aid} (image id {iid}"
        if iid not in sizes:
            problems.append(f"{where}): refers to an image id that is not in 'images'")
            continue
        w, h, fname = sizes[iid]
        where = f"{ann['_source']} ({fname})" if ann.get("_source") else where + f", {fname})"
        if ann.get("category_id") not in cat_ids:
            cid = ann.get("category_id")
            what = f"unknown class '{cid}'" if isinstance(cid, str) else f"unknown category id {cid}"
            problems.append(f"{where}: {what} (known: {_known(coco)})")
            bad_images.add(iid)
        x, y, bw, bh = ann.get("bbox", [0, 0, 0, 0])
        if not (bw > 0 and bh > 0):
            problems.append(f"{where}: box {ann.get('bbox')} has non-positive width or height")
            bad_images.add(iid)
        elif w is not None and h is not None and (x < -0.5 or y < -0.5 or x + bw > w + 0.5 or y + bh > h + 0.5):
            problems.append(f"{where}: box {ann.get('bbox')} (XYWH) lies outside the {w}x{h} image")
            bad_images.add(iid)
    return problems, bad_images


def _known(coco):
    cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
    return ", ".join(f"{c['id']}={c['name']}" for c in cats)


def apply_ignore(coco, ignore, source="dataset"):
    """
    Drop the categories named in ``ignore`` and their boxes (a copy; the input is not modified).

    Returns:
        dict: the COCO dict without them; images that only had ignored boxes become normal images.
        dict[str, int]: boxes dropped per ignored category name.
    """
    ignore = set(ignore or ())
    if not ignore:
        return coco, {}
    drop = {c["id"]: c["name"] for c in coco.get("categories", []) if c["name"] in ignore}
    # readers keep labels outside a fixed class list as their name (see formats.py)
    drop.update({n: n for n in ignore})
    counts = {}
    anns = []
    for a in coco.get("annotations", []):
        cid = a.get("category_id")
        if isinstance(cid, (int, str)) and cid in drop:
            counts[drop[cid]] = counts.get(drop[cid], 0) + 1
        else:
            anns.append(a)
    for name in sorted(ignore - set(counts)):
        _log_once(logging.WARNING, f"{source}: ignored category '{name}' does not occur in the dataset")
    out = dict(coco, annotations=anns, categories=[c for c in coco["categories"] if c["id"] not in drop])
    for name, n in counts.items():
        _log_once(logging.INFO, f"{source}: ignored category '{name}': dropped {n} boxes")
    return out, counts


_LOGGED = set()


def _log_once(level, msg):
    """Log ``msg`` once per process (registration and loading both apply the ignore list)."""
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        logger.log(level, msg)


def clip_boxes(coco):
    """
    Clip boxes that stick out of their image into it (a copy). Boxes left with no area are dropped;
    boxes inside their image are kept exactly as they are.

    Returns:
        dict: the fixed COCO dict.
        int: number of boxes changed or dropped (only boxes that stuck out).
    """
    sizes = {img["id"]: (img.get("width"), img.get("height")) for img in coco.get("images", [])}
    anns, changed = [], 0
    for a in coco.get("annotations", []):
        w, h = sizes.get(a.get("image_id"), (None, None))
        if w is None or h is None or "bbox" not in a:
            anns.append(a)
            continue
        x, y, bw, bh = a["bbox"]
        if not (bw > 0 and bh > 0) or (x >= 0 and y >= 0 and x + bw <= w and y + bh <= h):
            anns.append(a)  # inside (unchanged, no float round trip), or degenerate (reported by validation)
            continue
        x0, y0 = min(max(x, 0.0), w), min(max(y, 0.0), h)
        x1, y1 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
        changed += 1
        if x1 <= x0 or y1 <= y0:
            continue  # entirely outside the image
        anns.append(dict(a, bbox=[x0, y0, x1 - x0, y1 - y0]))
    return dict(coco, annotations=anns), changed


def _check(coco, source, image_root, validation, check_files=True, reader_problems=()):
    """
    Run the checks for ``validation`` mode; return (coco, bad image ids) or raise DatasetError.
    ``reader_problems``: what the VOC/YOLO/labelme reader could not read (those files are already left out);
    they are reported with every other problem and follow the same mode.
    """
    if validation not in VALIDATION_MODES:
        raise ConfigError(f"DATASETS.VALIDATION must be one of {VALIDATION_MODES}, got {validation!r}")
    reader_problems = list(reader_problems or ())
    if validation == "none":
        if reader_problems:
            logger.warning(str(DatasetError(source, reader_problems)) + "\n  -> those files are left out")
        return coco, set()
    if validation == "clip":
        coco, n = clip_boxes(coco)
        if n:
            logger.warning(f"{source}: clipped {n} box(es) that were outside their image")
    problems, bad_images = validate_coco_dict(coco, source, image_root, check_files=check_files)
    problems = reader_problems + problems
    if problems:
        if validation in ("error", "clip"):
            raise DatasetError(source, problems)
        logger.warning(str(DatasetError(source, problems)) + "\n  -> dropping those images")
    return coco, bad_images


def _set_metadata(meta, cats, class_weights=None, **extra):
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
    Turn a parsed COCO dict into Detectron2's dataset dicts (see :func:`load_coco_defects`).

    Args:
        coco (dict): COCO detection dict; ``file_name`` relative to ``image_root``. Not modified.
        source (str): where it came from (file or folder), used in messages.
        ignore (iterable[str]): category names to drop, with their boxes.
        reader_problems (list[str]): problems of the VOC/YOLO/labelme reader, reported with the others.
    """
    coco, _ = apply_ignore(coco, ignore, source)
    coco, bad_images = _check(coco, source, image_root, validation, reader_problems=reader_problems)

    cats = sorted(coco["categories"], key=lambda c: c["id"])
    id_map = {c["id"]: i for i, c in enumerate(cats)}
    if dataset_name is not None and not hasattr(MetadataCatalog.get(dataset_name), "thing_classes"):
        _set_metadata(MetadataCatalog.get(dataset_name), cats, image_root=image_root)

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
        f"{sum(len(r['annotations']) for r in records)} boxes from {source}"
    )
    return records


def read_coco_json(json_file):
    """Parse a COCO json, with a :class:`DatasetError` naming the file if it is not valid json."""
    if not os.path.isfile(json_file):
        raise InputNotFoundError(f"COCO annotation file not found: {json_file}")
    try:
        with open(json_file, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(json_file, [f"not a valid json file: {e}"]) from None
    if not isinstance(coco, dict) or "categories" not in coco or "images" not in coco:
        raise DatasetError(json_file, ["not a COCO detection json (needs 'images' and 'categories')"])
    return coco


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
        if _json_is_faithful(validation, ignore):
            MetadataCatalog.get(dataset_name).set(json_file=json_file)
    return load_coco_dict(coco, json_file, image_root, dataset_name, validation=validation, ignore=ignore)


def _json_is_faithful(validation, ignore):
    """Whether the source json equals the loaded records, so that COCOEvaluator may use it as ground
    truth (otherwise it converts the loaded records itself)."""
    return not ignore and validation in ("error", "none")


class _CachedLoader:
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
    extra = {"json_file": json_file} if _json_is_faithful(validation, ignore) else {}
    _set_metadata(meta, cats, class_weights, image_root=image_root, dataset_format="coco",
                  annotation_path=json_file, ignore=list(ignore or ()), **extra)
    DatasetCatalog.register(
        name,
        _CachedLoader(load_coco_defects, [json_file], json_file=json_file, image_root=image_root,
                      dataset_name=name, validation=validation, ignore=tuple(ignore or ())),
    )
    return meta
