"""Checks of a COCO-style dataset dict before training, with messages that name the bad record.

:func:`check_coco` runs them in one of the modes of ``DATASETS.VALIDATION`` (:data:`VALIDATION_MODES`):
``"error"`` raises one :class:`DatasetError` listing *every* problem (file, image id, annotation id),
``"warn"`` logs the problems and drops the images concerned, ``"clip"`` clips boxes that stick out of their
image into it and raises on every other problem, ``"none"`` skips the checks. The problems found
(:func:`validate_coco_dict`): missing or undecodable image files, image sizes differing from the annotation,
boxes of non-positive size or outside the image, masks (``segmentation``) that are malformed, empty, outside
the image or outside their box (:func:`mask_problem`), unknown category ids, duplicate image ids or file names,
empty datasets. Image files are decoded once per process (:func:`d2_defects.utils.image_io.image_size`); the
first check of a dataset logs how many images it decoded and how long it took, with a tqdm bar on an
interactive terminal.

Also here: :func:`apply_ignore` (drop ignored categories with their boxes) and :func:`clip_boxes`.
Nothing in this module reads annotation files (:mod:`.formats`) or registers datasets (:mod:`.catalog`).
"""
import logging
import os
import time

from ..utils.masks import segmentation_to_rle
from ..utils.errors import ConfigError, DatasetError
from ..utils.image_io import decoded_images, image_size

logger = logging.getLogger(__name__)

__all__ = ["VALIDATION_MODES", "apply_ignore", "check_coco", "clip_boxes", "mask_problem", "validate_coco_dict"]

VALIDATION_MODES = ("error", "warn", "clip", "none")


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
    start, cached_before, missing = time.perf_counter(), decoded_images(), 0
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
        decoded = decoded_images() - cached_before
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
        box_ok = False
        if not (bw > 0 and bh > 0):
            problems.append(f"{where}: box {ann.get('bbox')} has non-positive width or height")
            bad_images.add(iid)
        elif w is not None and h is not None and (x < -0.5 or y < -0.5 or x + bw > w + 0.5 or y + bh > h + 0.5):
            problems.append(f"{where}: box {ann.get('bbox')} (XYWH) lies outside the {w}x{h} image")
            bad_images.add(iid)
        else:
            box_ok = True
        # the mask of a bad box is not reported again ([] / None: a box without a mask)
        if box_ok and ann.get("segmentation") and w is not None and h is not None:
            problem = mask_problem(ann["segmentation"], w, h, ann.get("bbox"))
            if problem:
                problems.append(f"{where}: {problem}")
                bad_images.add(iid)
    return problems, bad_images


def mask_problem(segm, w, h, bbox=None):
    """
    What is wrong with a COCO ``segmentation`` of an annotation in a ``w`` x ``h`` image, or None.

    Polygons: a list of ``[x0, y0, x1, y1, ...]`` lists of at least 3 points, inside the image (0.5 px of
    tolerance, like boxes). RLE: ``{"size": [h, w], "counts": ...}`` of this image's size. Either: at least one
    pixel, and (with ``bbox``, XYWH) no pixel outside the annotation's box by more than 1 px.
    """
    from pycocotools import mask as mask_util

    if isinstance(segm, list):
        if not segm:
            return "empty mask (segmentation has no polygon)"
        for k, poly in enumerate(segm):
            if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
                n = len(poly) if isinstance(poly, (list, tuple)) else type(poly).__name__
                return f"mask polygon {k} must be a flat list of at least 3 x, y points, got {n} values"
            try:
                xs, ys = [float(v) for v in poly[0::2]], [float(v) for v in poly[1::2]]
            except (TypeError, ValueError):
                return f"mask polygon {k} has non-numeric coordinates"
            if not all(-0.5 <= v <= w + 0.5 for v in xs) or not all(-0.5 <= v <= h + 0.5 for v in ys):
                return f"mask polygon {k} lies outside the {w}x{h} image"
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(v) for v in segm["size"]] != [int(h), int(w)]:
            return f"mask RLE size {list(segm['size'])} (h, w) differs from the image's [{h}, {w}]"
    else:
        return f"segmentation must be polygons or RLE ({{'size', 'counts'}}), got {type(segm).__name__}"
    try:
        rle = segmentation_to_rle(segm, int(h), int(w))
        area = float(mask_util.area(rle))
        mx, my, mw, mh = (float(v) for v in mask_util.toBbox(rle))
    except (TypeError, ValueError) as e:
        return f"mask cannot be decoded ({e})"
    if area <= 0:
        return "empty mask (no pixel)"
    if bbox is not None:
        x, y, bw, bh = (float(v) for v in bbox)
        if mx < x - 1 or my < y - 1 or mx + mw > x + bw + 1 or my + mh > y + bh + 1:
            return (f"mask (its box [{mx:g}, {my:g}, {mw:g}, {mh:g}] XYWH) sticks out of the annotation's box "
                    f"{list(bbox)} by more than 1 px")
    return None


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


def check_coco(coco, source, image_root, validation, check_files=True, reader_problems=()):
    """
    Run the checks of ``validation`` mode (one of :data:`VALIDATION_MODES`) on a COCO dict.

    Returns:
        dict: the COCO dict (boxes clipped in "clip" mode).
        set: ids of the images with a problem ("warn" mode; the caller drops them).
    Raises:
        DatasetError: listing every problem ("error"/"clip" mode).
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
