"""How the dataset tools find their input: a registered dataset, a manifest entry or files on disk.

Every tool accepts ``--dataset NAME`` (a registered dataset, e.g. ``synthetic_defects_train``; with
``--manifest FILE`` or ``--config FILE`` the manifest's datasets are registered first) or
``--format F --annotations PATH --images DIR``.  The result is a raw COCO dict (before validation, after
``ignore``) plus its image root.
"""

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .formats import FORMATS, read_dataset
from .validation import VALIDATION_MODES, apply_ignore, check_coco
from .split import subset_coco
from ..utils.errors import DatasetError, UsageError

__all__ = ["add_source_args", "load_source", "records_to_coco"]


def add_source_args(parser, required=True):
    """Add the input-dataset options (``--dataset``/``--manifest`` or ``--format/--annotations/--images``,
    ``--classes``, ``--ignore``, ``--validation``) to ``parser``; returns the argument group."""
    g = parser.add_argument_group("input dataset")
    g.add_argument("--dataset", help="registered dataset name (builtin, or from --manifest/--config)")
    g.add_argument("--manifest", help="YAML datasets manifest to register first")
    g.add_argument("--format", choices=FORMATS, help="read files directly: annotation format")
    g.add_argument("--annotations", help="with --format: COCO json, or the folder of XML/txt/json files")
    g.add_argument("--images", help="with --format: image folder")
    g.add_argument("--classes", nargs="+", help="with --format: class names in order (default: from the data)")
    g.add_argument("--ignore", nargs="+", default=[], help="class names to drop with their boxes, e.g. 背景")
    g.add_argument("--validation", choices=VALIDATION_MODES, default="error",
                   help="checks of the input, as in training (DATASETS.VALIDATION): error (default: stop on any "
                        "problem), warn (report and drop the images concerned), clip (clip boxes outside their "
                        "image, stop on the rest), none")
    return g


def records_to_coco(records, classes):
    """Detectron2 dataset dicts (contiguous ids) -> COCO dict with category ids 1..K."""
    images, anns = [], []
    for i, r in enumerate(records):
        iid = r.get("image_id", i + 1)
        images.append({"id": iid, "file_name": r["file_name"], "width": r["width"], "height": r["height"]})
        for a in r.get("annotations", []):
            box = BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYWH_ABS)
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": a["category_id"] + 1,
                         "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                         "iscrowd": int(a.get("iscrowd", 0))})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(classes)]
    return {"images": images, "annotations": anns, "categories": cats}


def _validated(coco, label, root, args, validate, reader_problems):
    """The checks training runs (``args.validation`` mode); with ``validate=False`` the reading problems go to
    ``reader_problems`` (or raise when it is None) and the caller checks the rest."""
    if not validate:
        if reader_problems is None and coco.get("_problems"):
            raise DatasetError(label, coco["_problems"])
        if reader_problems is not None:
            reader_problems.extend(coco.get("_problems", []))
        return {k: v for k, v in coco.items() if k != "_problems"}
    problems = coco.pop("_problems", [])
    mode = getattr(args, "validation", None) or "error"
    coco, bad = check_coco(coco, label, root, mode, check_files=bool(root), reader_problems=problems)
    if bad:
        coco = subset_coco(coco, [img["id"] for img in coco["images"] if img["id"] not in bad])
        known = {c["id"] for c in coco["categories"]}
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] in known]
    return coco


def load_source(args, progress=None, cfg=None, validate=True, reader_problems=None):
    """
    Read the tool's input dataset (``--dataset`` or ``--format/--annotations/--images``) and run the checks
    training runs, in the mode ``--validation`` (default "error": any problem is a :class:`DatasetError`
    listing them all; "warn" drops the images concerned).

    Args:
        validate (bool): False: only read (``tools/check_dataset.py`` reports the problems itself); reading
            problems then go to ``reader_problems`` (a list), or raise when it is None.

    Returns:
        dict: raw COCO dict (``file_name`` relative to the image root).
        str: the image root ("" when ``file_name`` values are absolute).
        str: a label for messages (dataset name or annotation path).
    """
    from .manifest import register_from_config, register_manifest

    if cfg is not None and cfg.DATASETS.MANIFEST:
        register_from_config(cfg, check=())
    if getattr(args, "manifest", None):
        register_manifest(args.manifest)
    if args.format:
        if not args.annotations or not args.images:
            raise UsageError("--format needs --annotations and --images")
        problems = []
        coco = read_dataset(args.format, args.annotations, args.images, classes=args.classes, progress=progress,
                            problems=problems)
        coco, _ = apply_ignore(coco, args.ignore, args.annotations)
        coco = _validated(dict(coco, _problems=problems), args.annotations, args.images, args, validate,
                          reader_problems)
        return coco, args.images, args.annotations
    if not args.dataset:
        raise UsageError("give --dataset NAME (with --manifest FILE for manifest datasets) or "
                         "--format/--annotations/--images")
    if args.dataset not in DatasetCatalog.list():
        own = [n for n in DatasetCatalog.list() if hasattr(MetadataCatalog.get(n), "dataset_format")]
        raise DatasetError(f"dataset '{args.dataset}' is not registered (defect datasets: {', '.join(own)})")
    meta = MetadataCatalog.get(args.dataset)
    fmt = getattr(meta, "dataset_format", None)
    if fmt is not None:
        problems = []
        coco = read_dataset(fmt, meta.annotation_path, meta.image_root,
                            classes=getattr(meta, "source_classes", None), progress=progress, problems=problems)
        coco, _ = apply_ignore(coco, list(getattr(meta, "ignore", [])) + list(args.ignore), args.dataset)
        coco = _validated(dict(coco, _problems=problems), args.dataset, meta.image_root, args, validate,
                          reader_problems)
        return coco, meta.image_root, args.dataset
    # any other registered dataset: through its loader (which ran its own checks)
    coco = records_to_coco(DatasetCatalog.get(args.dataset), meta.thing_classes)
    coco, _ = apply_ignore(coco, args.ignore, args.dataset)
    return coco, "", args.dataset


def rename_categories(coco, mapping):
    """
    Rename categories (``{"old": "new"}``); categories that end up with the same name are merged into
    the first one (its id), their boxes re-labelled. Returns a new COCO dict.
    """
    if not mapping:
        return coco
    cats, first, remap = [], {}, {}
    for c in sorted(coco["categories"], key=lambda c: c["id"]):
        name = mapping.get(c["name"], c["name"])
        if name in first:
            remap[c["id"]] = first[name]
            continue
        first[name] = c["id"]
        remap[c["id"]] = c["id"]
        cats.append(dict(c, name=name))
    anns = [dict(a, category_id=remap.get(a["category_id"], a["category_id"])) for a in coco["annotations"]]
    return dict(coco, categories=cats, annotations=anns)


def config_resize(cfg):
    """(short side, max size) of the config's training resize: the middle MIN_SIZE_TRAIN choice."""
    sizes = sorted(cfg.INPUT.MIN_SIZE_TRAIN)
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range":
        short = (sizes[0] + sizes[-1]) / 2
    else:
        short = sizes[len(sizes) // 2]
    return short, cfg.INPUT.MAX_SIZE_TRAIN
