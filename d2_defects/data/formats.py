"""Readers and writers for the annotation formats of defect datasets, all through COCO dicts.

Every reader returns a COCO detection dict (``images``, ``annotations``, ``categories``; boxes XYWH in
pixels, ``file_name`` relative to the image root) that then goes through the same checks as a COCO json
(:func:`d2_defects.data.validation.check_coco`).  A box whose label is not in the given class list keeps
the label as its ``category_id`` so that validation reports it by name.

Layouts (``annotations`` path, ``images`` path):

- ``coco``: a COCO json file, the image folder.
- ``voc``: a folder of Pascal VOC XML files (searched recursively: NEU-DET ``ANNOTATIONS/``, GC10-DET
  ``lable/``, URPC ``box/``), the image folder (searched recursively, so GC10-DET's per-class folders
  work). The image is found by the XML's ``<filename>`` (with or without extension), else by the XML's
  name. VOC corners are 1-based like Detectron2's ``pascal_voc`` loader (``xmin`` 0 lies one pixel
  outside the image, like ``xmax`` = width + 1: both are reported, and clipped by ``validation: clip``).
  Images without an XML are listed in a warning (they are not added: an unlabelled image is not known to
  be normal).
- ``yolo``: a folder of ``<image stem>.txt`` files (``class cx cy w h``, normalised; YOLO-seg polygon lines
  give their bounding box and the polygon as the mask), the image folder. Every image is listed; images
  without a txt are normal images.
  Index names from ``classes.txt`` or a ``data.yaml`` / other ``*.yaml`` with ``names:`` (a list or an
  ``{index: name}`` dict) in the label folder or up to two folders above it (Ultralytics keeps ``data.yaml``
  at the dataset root, above ``labels/train``), else from the class list. An index without a name is a
  validation problem naming the txt line.
- ``labelme``: a folder of labelme JSON files (every shape gives its bounding box; polygons, rectangles and
  circles also give a mask: the polygon, the rectangle, a 32-gon inscribed in the circle; lines and points
  none; ``imagePath`` is relative to the JSON), the image folder.

Masks are kept as COCO ``segmentation`` (polygons in pixels; a COCO json's RLE as it is). The writers write a
single-polygon mask as a YOLO-seg line or a labelme polygon and every other annotation as a box.

Reading problems (an unreadable XML/JSON, an annotation whose image is missing, a label file without an
image, an ambiguous image name) are collected with every other problem when ``problems`` (a list) is
given, so that the validation mode decides (``warn`` drops those files); without it they raise one
:class:`DatasetError`. Records remember their annotation file (``_source``) so that validation messages
name it.
"""
import glob
import json
import logging
import math
import os
import xml.etree.ElementTree as ET

import yaml

from ..utils.errors import DatasetError, InputNotFoundError, UsageError
from ..utils.image_io import IMAGE_EXTENSIONS, image_size

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "IMAGE_EXTENSIONS", "read_coco_json", "read_dataset", "write_dataset", "write_coco"]

FORMATS = ("coco", "voc", "yolo", "labelme")


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


def _files(folder, ext, what):
    if not os.path.isdir(folder):
        raise InputNotFoundError(f"{what} folder not found: {folder}")
    return sorted(glob.glob(os.path.join(folder, "**", f"*{ext}"), recursive=True))


class _ImageIndex:
    """Finds image files under a root by relative path, file name or stem."""

    def __init__(self, root):
        if not os.path.isdir(root):
            raise InputNotFoundError(f"image folder not found: {root}")
        self.root = root
        self.files = sorted(
            os.path.relpath(p, root).replace(os.sep, "/")
            for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
            if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS
        )
        self.by_name, self.by_stem = {}, {}
        for rel in self.files:
            base = os.path.basename(rel)
            self.by_name.setdefault(base, []).append(rel)
            self.by_stem.setdefault(os.path.splitext(rel)[0], []).append(rel)
            if os.path.splitext(base)[0] != os.path.splitext(rel)[0]:
                self.by_stem.setdefault(os.path.splitext(base)[0], []).append(rel)

    def find(self, *names, ambiguous=None):
        """
        First match for the given names (relative path, base name or stem); None if none. When a base name
        or stem matches several files, the first is returned and ``(name, [files])`` appended to ``ambiguous``.
        """
        for n in names:
            if not n:
                continue
            n = n.replace("\\", "/")
            if os.path.isfile(os.path.join(self.root, n)):
                return n
            base = os.path.basename(n)
            stem = os.path.splitext(n)[0]
            for table, keys in ((self.by_name, (base,)), (self.by_stem, (stem, os.path.basename(stem), n, base))):
                for key in keys:
                    if key in table:
                        found = table[key]
                        if len(found) > 1 and ambiguous is not None:
                            ambiguous.append((n, list(found)))
                        return found[0]
        return None


class _Builder:
    """Accumulates images/annotations with names mapped to category ids."""

    def __init__(self, classes, source):
        self.source = source
        self.fixed = classes is not None
        self.names = list(classes or [])
        self.images, self.anns = [], []

    def add_image(self, file_name, width, height, source=None):
        iid = len(self.images) + 1
        img = {"id": iid, "file_name": file_name, "width": width, "height": height}
        if source:
            img["_source"] = source  # the annotation file, named by validation messages
        self.images.append(img)
        return iid

    def add_box(self, iid, label, x0, y0, x1, y1, source=None, segmentation=None):
        label = str(label).strip()
        if label not in self.names and not self.fixed:
            self.names.append(label)
        cid = self.names.index(label) + 1 if label in self.names else label
        ann = {"id": len(self.anns) + 1, "image_id": iid, "category_id": cid,
               "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
        if segmentation:
            ann["segmentation"] = segmentation
        if source:
            ann["_source"] = source  # e.g. "a.xml, object 2 ('crack')"
        self.anns.append(ann)

    def coco(self):
        names = self.names
        if not self.fixed:  # discovered names: sorted, so that the order does not depend on file order
            order = sorted(names)
            remap = {names.index(n) + 1: order.index(n) + 1 for n in names}
            for a in self.anns:
                a["category_id"] = remap[a["category_id"]]
            names = order
        return {"images": self.images, "annotations": self.anns,
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}


def _size_of(root, rel):
    size, _ = image_size(os.path.join(root, rel))
    return size or (None, None)


def _finish(problems, sink, source):
    """Hand reading problems to ``sink`` (a list) or raise them as one DatasetError."""
    if not problems:
        return
    if sink is None:
        raise DatasetError(source, problems)
    sink.extend(problems)


def _ambiguity_problems(ambiguous, what):
    out = []
    for name, files in ambiguous:
        out.append(f"{what}: image name '{name}' is ambiguous: it matches {', '.join(files)} "
                   f"(rename the files or give the path relative to the image folder)")
    return out


def read_voc(ann_dir, image_root, classes=None, progress=None, problems=None):
    """A folder of Pascal VOC XML files (recursive) and its images -> COCO dict (see the module docstring).

    Args:
        classes (list[str] or None): class order (None: sorted labels found); other labels keep their name.
        progress (bool or None): tqdm bar over the files; problems (list or None): collects reading problems
            (None: they raise one :class:`DatasetError`).
    """
    b = _Builder(classes, ann_dir)
    index = _ImageIndex(image_root)
    found, used = [], set()
    files = _files(ann_dir, ".xml", "VOC annotation")
    for xml_file in progress(files, desc="reading VOC") if progress else files:
        try:
            root = ET.parse(xml_file).getroot()
        except ET.ParseError as e:
            found.append(f"{xml_file}: not a valid XML file ({e})")
            continue
        fname = (root.findtext("filename") or "").strip()
        stem = os.path.splitext(os.path.relpath(xml_file, ann_dir))[0]
        ambiguous = []
        rel = index.find(fname, stem, ambiguous=ambiguous)
        found += _ambiguity_problems(ambiguous, xml_file)
        if rel is None:
            found.append(f"{xml_file}: image file not found under {image_root} (filename '{fname}')")
            continue
        used.add(rel)
        w = int(float(root.findtext("size/width") or 0))
        h = int(float(root.findtext("size/height") or 0))
        if w <= 0 or h <= 0:
            w, h = _size_of(image_root, rel)
        boxes, n_found = [], len(found)
        for k, obj in enumerate(root.findall("object")):
            name = obj.findtext("name") or ""
            try:
                box = [float(obj.findtext(f"bndbox/{c}")) for c in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                found.append(f"{xml_file}: object {k} ('{name}') has no valid bndbox")
                continue
            # 1-based corners -> 0-based continuous coordinates (as detectron2's pascal_voc loader); a box that
            # starts at 0 lies one pixel outside and is reported by validation like one that ends past the edge
            boxes.append((name, box[0] - 1, box[1] - 1, box[2], box[3], f"{xml_file}, object {k} ('{name}')"))
        if len(found) > n_found:
            continue  # a file with a problem is left out whole (partly read boxes would teach misses)
        iid = b.add_image(rel, w, h, source=xml_file)
        for name, x0, y0, x1, y1, where in boxes:
            b.add_box(iid, name, x0, y0, x1, y1, source=where)
    unlabelled = [f for f in index.files if f not in used]
    if unlabelled and len(unlabelled) < len(index.files):
        logger.warning(f"{ann_dir}: {len(unlabelled)} image(s) under {image_root} have no XML and are not used "
                       f"(e.g. {', '.join(unlabelled[:3])}); add an XML without objects for a normal image")
    _finish(found, problems, ann_dir)
    return b.coco()


def _yolo_class_names(label_dir):
    """(names, file) from classes.txt / a yaml with ``names:`` in ``label_dir`` or up to two folders above."""
    folder = os.path.normpath(os.path.abspath(label_dir))
    for _ in range(3):
        txt = os.path.join(folder, "classes.txt")
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()], txt
        yamls = sorted(glob.glob(os.path.join(folder, "*.yaml")) + glob.glob(os.path.join(folder, "*.yml")))
        yamls.sort(key=lambda y: os.path.basename(y) not in ("data.yaml", "data.yml"))  # data.yaml first
        for y in yamls:
            try:
                with open(y, encoding="utf-8") as f:
                    data = yaml.safe_load(f)
            except (yaml.YAMLError, UnicodeDecodeError):
                continue
            names = data.get("names") if isinstance(data, dict) else None
            if isinstance(names, dict):
                try:
                    keys = sorted(names, key=int)
                except (TypeError, ValueError):
                    continue
                if [int(k) for k in keys] != list(range(len(keys))):
                    raise DatasetError(y, [f"'names:' must map the indices 0..{len(keys) - 1}, got {keys}"])
                return [str(names[k]) for k in keys], y
            if isinstance(names, list):
                return [str(n) for n in names], y
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return None, None


def read_yolo(label_dir, image_root, classes=None, progress=None, problems=None):
    """A folder of YOLO ``.txt`` labels and its images -> COCO dict (every image listed; no txt: a normal image).
    Arguments as :func:`read_voc`; index names from ``classes.txt`` / ``data.yaml`` near the labels, else ``classes``.
    """
    if not os.path.isdir(label_dir):
        raise InputNotFoundError(f"YOLO label folder not found: {label_dir}")
    # the txt files hold indices into classes.txt / data.yaml; ``classes`` only orders the output
    # (it names the indices when the folder has no names file)
    names, names_file = _yolo_class_names(label_dir)
    if names is None and classes is not None:
        names, names_file = list(classes), "the class list"
    index = _ImageIndex(image_root)
    labels = {}
    for t in _files(label_dir, ".txt", "YOLO label"):
        if os.path.basename(t) == "classes.txt":
            continue
        labels[os.path.splitext(os.path.relpath(t, label_dir))[0].replace(os.sep, "/")] = t
    used = {}
    records, found, max_cls = [], [], -1
    for rel in progress(index.files, desc="reading YOLO") if progress else index.files:
        stem = os.path.splitext(rel)[0]
        txt = labels.get(stem) or labels.get(os.path.basename(stem))
        w, h = _size_of(image_root, rel)
        boxes, n_found = [], len(found)
        if txt is not None:
            if txt in used:
                found.append(f"{txt}: one label file for two images, {used[txt]} and {rel} (rename one of them)")
                continue
            used[txt] = rel
            with open(txt, encoding="utf-8") as f:
                for ln, line in enumerate(f, 1):
                    parts = line.split()
                    if not parts:
                        continue
                    try:
                        c, vals = int(parts[0]), [float(v) for v in parts[1:]]
                    except ValueError:
                        found.append(f"{txt}:{ln}: not a YOLO line: {line.strip()!r}")
                        continue
                    poly = None
                    if len(vals) == 4:
                        cx, cy, bw, bh = vals
                        x0, y0, x1, y1 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
                    elif len(vals) >= 6 and len(vals) % 2 == 0:  # polygon
                        x0, x1, y0, y1 = min(vals[0::2]), max(vals[0::2]), min(vals[1::2]), max(vals[1::2])
                        poly = vals
                    else:
                        found.append(f"{txt}:{ln}: expected 'class cx cy w h' or a polygon: {line.strip()!r}")
                        continue
                    if names is not None and not 0 <= c < len(names):
                        found.append(f"{txt}:{ln}: class index {c} has no name in {names_file} "
                                     f"({len(names)} names: 0..{len(names) - 1})")
                        continue
                    max_cls = max(max_cls, c)
                    boxes.append((c, x0, y0, x1, y1, f"{txt}:{ln}", poly))
        if len(found) > n_found:
            continue  # a label file with a problem is left out whole
        records.append((rel, w, h, boxes, txt))
    for t in sorted(set(labels.values()) - set(used)):
        found.append(f"{t}: no image with this name under {image_root}")
    if names is None:
        names = [str(i) for i in range(max_cls + 1)]
        logger.warning(f"{label_dir}: no class names (classes.txt or data.yaml in the label folder or up to two "
                       f"folders above it); using {names}")
    b = _Builder(list(classes) if classes is not None else names, label_dir)
    for rel, w, h, boxes, txt in records:
        iid = b.add_image(rel, w, h, source=txt)
        for c, x0, y0, x1, y1, where, poly in boxes:
            sx, sy = (w or 0), (h or 0)
            segm = [[v * (sx if i % 2 == 0 else sy) for i, v in enumerate(poly)]] if poly else None
            b.add_box(iid, names[c], x0 * sx, y0 * sy, x1 * sx, y1 * sy, source=where, segmentation=segm)
    _finish(found, problems, label_dir)
    return b.coco()


def read_labelme(json_dir, image_root, classes=None, progress=None, problems=None):
    """A folder of labelme JSON files and its images -> COCO dict (rectangles and polygons give boxes).
    Arguments as :func:`read_voc`.
    """
    b = _Builder(classes, json_dir)
    index = _ImageIndex(image_root)
    found = []
    files = _files(json_dir, ".json", "labelme")
    for jf in progress(files, desc="reading labelme") if progress else files:
        try:
            with open(jf, encoding="utf-8") as f:
                d = json.load(f)
            shapes = d["shapes"]
            if not isinstance(shapes, list):
                raise TypeError("'shapes' is not a list")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            found.append(f"{jf}: not a labelme json ({type(e).__name__}: {e})")
            continue
        image_path = (d.get("imagePath") or "").replace("\\", "/")
        rel = None
        if image_path:
            abs_path = os.path.normpath(os.path.join(os.path.dirname(jf), image_path))
            if os.path.isfile(abs_path) and not os.path.relpath(abs_path, image_root).startswith(".."):
                rel = os.path.relpath(abs_path, image_root).replace(os.sep, "/")
        ambiguous = []
        rel = rel or index.find(image_path, os.path.splitext(os.path.relpath(jf, json_dir))[0], ambiguous=ambiguous)
        found += _ambiguity_problems(ambiguous, jf)
        if rel is None:
            found.append(f"{jf}: image file not found under {image_root} (imagePath '{image_path}')")
            continue
        w, h = d.get("imageWidth"), d.get("imageHeight")
        if not w or not h:
            w, h = _size_of(image_root, rel)
        boxes, n_found = [], len(found)
        for k, s in enumerate(shapes):
            pts = s.get("points") or [] if isinstance(s, dict) else []
            label = s.get("label", "") if isinstance(s, dict) else ""
            if not pts:
                found.append(f"{jf}: shape {k} ('{label}') has no points")
                continue
            try:
                xs, ys = [float(p[0]) for p in pts], [float(p[1]) for p in pts]
            except (TypeError, ValueError, IndexError):
                found.append(f"{jf}: shape {k} ('{label}') has invalid points")
                continue
            segm = _labelme_mask(s.get("shape_type") or "polygon", xs, ys)
            if s.get("shape_type") == "circle" and len(pts) == 2:
                r = ((xs[1] - xs[0]) ** 2 + (ys[1] - ys[0]) ** 2) ** 0.5
                xs, ys = [xs[0] - r, xs[0] + r], [ys[0] - r, ys[0] + r]
            boxes.append((label, min(xs), min(ys), max(xs), max(ys), f"{jf}, shape {k} ('{label}')", segm))
        if len(found) > n_found:
            continue  # a file with a problem is left out whole
        iid = b.add_image(rel, w, h, source=jf)
        for label, x0, y0, x1, y1, where, segm in boxes:
            b.add_box(iid, label, x0, y0, x1, y1, source=where, segmentation=segm)
    _finish(found, problems, json_dir)
    return b.coco()


def _labelme_mask(shape_type, xs, ys):
    """The COCO polygon mask of a labelme shape, or None (lines, points, too few points)."""
    if shape_type == "rectangle" and len(xs) == 2:
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    if shape_type == "circle" and len(xs) == 2:
        r = math.hypot(xs[1] - xs[0], ys[1] - ys[0])
        t = [2 * math.pi * k / 32 for k in range(32)]
        return [[v for a in t for v in (xs[0] + r * math.cos(a), ys[0] + r * math.sin(a))]]
    if shape_type == "polygon" and len(xs) >= 3:
        return [[v for x, y in zip(xs, ys) for v in (x, y)]]
    return None


def _single_polygon(ann):
    """The annotation's mask if it is exactly one polygon (what YOLO-seg and a labelme polygon hold), else None."""
    segm = ann.get("segmentation")
    if isinstance(segm, list) and len(segm) == 1 and len(segm[0]) >= 6:
        return segm[0]
    return None


def read_dataset(fmt, annotations, image_root, classes=None, progress=None, problems=None):
    """
    Read a dataset in any supported format into a COCO dict.

    Args:
        fmt (str): one of :data:`FORMATS`.
        annotations (str): the json file (coco) or annotation folder (voc, yolo, labelme).
        image_root (str): the image folder.
        classes (list[str] or None): class names in contiguous-id order; labels outside it are
            reported by validation. None: discovered (sorted by name; COCO: the json's categories).
        progress (callable or None): e.g. ``tqdm``, wrapped around the per-file loop.
        problems (list or None): collects the reading problems (then nothing is raised for them; the files
            concerned are left out); None: they raise one :class:`DatasetError`.
    """
    if fmt == "coco":
        coco = read_coco_json(annotations)
        if classes is not None:
            coco = _restrict_coco_classes(coco, classes)
        return coco
    readers = {"voc": read_voc, "yolo": read_yolo, "labelme": read_labelme}
    if fmt not in readers:
        raise UsageError(f"unknown dataset format {fmt!r}; use one of {FORMATS}")
    return readers[fmt](annotations, image_root, classes=classes, progress=progress, problems=problems)


def _restrict_coco_classes(coco, classes):
    """Re-number a COCO dict's categories to the order of ``classes`` (others become unknown names)."""
    by_id = {c["id"]: c["name"] for c in coco["categories"]}
    anns = []
    for a in coco.get("annotations", []):
        name = by_id.get(a.get("category_id"), a.get("category_id"))
        anns.append(dict(a, category_id=classes.index(name) + 1 if name in classes else name))
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(classes)]
    weights = {c["name"]: c.get("weight") for c in coco["categories"]}
    for c in cats:
        if weights.get(c["name"]) is not None:
            c["weight"] = weights[c["name"]]
    return dict(coco, annotations=anns, categories=cats)


# ---------------------------------------------------------------- writers
def _num(v):
    v = round(float(v), 3)
    return int(v) if v == int(v) else v


def _public(coco):
    """The COCO dict without the readers' private keys (``_source``)."""
    def clean(items):
        return [{k: v for k, v in d.items() if not k.startswith("_")} for d in items]

    return dict(coco, images=clean(coco.get("images", [])), annotations=clean(coco.get("annotations", [])))


def write_coco(coco, path):
    """Write ``coco`` (without the readers' private keys) as a COCO json file at ``path``; returns ``[path]``."""
    coco = _public(coco)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(coco, f, ensure_ascii=False)
    return [path]


def _per_image(coco):
    anns = {}
    for a in coco.get("annotations", []):
        anns.setdefault(a["image_id"], []).append(a)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    return anns, names


def write_voc(coco, out_dir):
    """One Pascal VOC XML per image into ``out_dir`` (1-based corners); returns the paths written."""
    anns, names = _per_image(coco)
    written = []
    for img in coco["images"]:
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = img["file_name"]
        size = ET.SubElement(root, "size")
        for k, v in (("width", img["width"]), ("height", img["height"]), ("depth", 3)):
            ET.SubElement(size, k).text = str(v)
        for a in anns.get(img["id"], []):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = names[a["category_id"]]
            ET.SubElement(obj, "difficult").text = "0"
            x, y, w, h = a["bbox"]
            bb = ET.SubElement(obj, "bndbox")
            for k, v in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
                ET.SubElement(bb, k).text = str(_num(v))
        path = os.path.join(out_dir, os.path.splitext(img["file_name"])[0] + ".xml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ET.ElementTree(root).write(path, encoding="utf-8")
        written.append(path)
    return written


def write_yolo(coco, out_dir):
    """One YOLO ``.txt`` per image (normalised ``class cx cy w h``; a single-polygon mask as a YOLO-seg polygon line)
    and ``classes.txt`` into ``out_dir``; returns the paths written."""
    anns, _ = _per_image(coco)
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "classes.txt")]
    with open(written[0], "w", encoding="utf-8") as f:
        f.write("".join(c["name"] + "\n" for c in cats))
    for img in coco["images"]:
        W, H = img["width"], img["height"]
        lines = []
        for a in anns.get(img["id"], []):
            x, y, w, h = a["bbox"]
            poly = _single_polygon(a)
            if poly is not None:  # YOLO-seg
                coords = " ".join(f"{v / (W if i % 2 == 0 else H):.8f}" for i, v in enumerate(poly))
                lines.append(f"{index[a['category_id']]} {coords}\n")
                continue
            lines.append(f"{index[a['category_id']]} {(x + w / 2) / W:.8f} {(y + h / 2) / H:.8f} {w / W:.8f} {h / H:.8f}\n")
        path = os.path.join(out_dir, os.path.splitext(img["file_name"])[0] + ".txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(lines))
        written.append(path)
    return written


def write_labelme(coco, out_dir, image_root):
    """One labelme JSON per image (rectangles; a single-polygon mask as a polygon; ``imagePath`` relative to
    ``out_dir``); returns the paths written."""
    anns, names = _per_image(coco)
    written = []
    for img in coco["images"]:
        path = os.path.join(out_dir, os.path.splitext(img["file_name"])[0] + ".json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shapes = []
        for a in anns.get(img["id"], []):
            x, y, w, h = a["bbox"]
            poly = _single_polygon(a)
            if poly is not None:
                points = [list(p) for p in zip(poly[0::2], poly[1::2])]
                shapes.append({"label": names[a["category_id"]], "points": points, "shape_type": "polygon",
                               "group_id": None, "flags": {}})
                continue
            shapes.append({"label": names[a["category_id"]], "points": [[x, y], [x + w, y + h]],
                           "shape_type": "rectangle", "group_id": None, "flags": {}})
        d = {"version": "5.0.1", "flags": {}, "shapes": shapes, "imageData": None,
             "imagePath": os.path.relpath(os.path.join(image_root, img["file_name"]), os.path.dirname(path)),
             "imageHeight": img["height"], "imageWidth": img["width"]}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, ensure_ascii=False, indent=1)
        written.append(path)
    return written


def write_dataset(coco, fmt, out, image_root=None):
    """Write a COCO dict as ``fmt`` to ``out`` (a json file for coco, else a folder). Returns the files."""
    if fmt == "coco":
        return write_coco(coco, out)
    if fmt == "voc":
        return write_voc(coco, out)
    if fmt == "yolo":
        return write_yolo(coco, out)
    if fmt == "labelme":
        return write_labelme(coco, out, image_root)
    raise UsageError(f"unknown dataset format {fmt!r}; use one of {FORMATS}")
