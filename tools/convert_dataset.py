#!/usr/bin/env python
"""Convert a dataset (COCO, Pascal VOC XML, YOLO txt, labelme JSON, or any registered dataset) to COCO
JSON (or to VOC / YOLO / labelme), with category renaming, reordering and ignoring.

    # NEU-DET / GC10-DET / URPC layouts: a folder of XMLs and an image folder (searched recursively)
    python tools/convert_dataset.py --format voc --annotations NEU-DET/ANNOTATIONS --images NEU-DET/IMAGES \
        --output NEU-DET/annotations.json
    # drop the bottle data's background class, rename one class
    python tools/convert_dataset.py --format coco --annotations bottle/anno_train.json --images bottle/images \
        --ignore 背景 --rename "瓶盖破损=cap_broken" --output bottle/train_clean.json
    python tools/convert_dataset.py --dataset synthetic_defects_val --to yolo --output /tmp/yolo_labels

File names in the output stay relative to the same image folder. Existing outputs are only replaced
with --overwrite; the source annotations are never written.
"""
import argparse
import sys

from tqdm import tqdm

import d2_defects  # noqa: F401  registers the built-in datasets
from d2_defects.data.formats import FORMATS, write_dataset
from d2_defects.data.source import add_source_args, load_source, rename_categories
from d2_defects.utils.fileio import check_can_write
from d2_defects.utils.errors import run_cli
from d2_defects.data.split import counts_table
from d2_defects.utils.errors import UsageError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--to", choices=FORMATS, default="coco", help="output format (default coco)")
    p.add_argument("--output", required=True, help="output json file (coco) or folder (voc, yolo, labelme)")
    p.add_argument("--rename", nargs="+", default=[], metavar="OLD=NEW",
                   help="rename classes; classes renamed to the same name are merged")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    check_can_write(args.output, args.overwrite, protected=[args.annotations])
    mapping = {}
    for r in args.rename:
        if "=" not in r:
            raise UsageError(f"--rename expects OLD=NEW, got {r!r}")
        old, new = r.split("=", 1)
        mapping[old] = new
    coco, root, label = load_source(args, progress=tqdm)
    unknown = sorted(set(mapping) - {c["name"] for c in coco["categories"]})
    if unknown:
        raise UsageError(f"--rename: unknown class(es) {unknown}")
    coco = rename_categories(coco, mapping)
    files = write_dataset(coco, args.to, args.output, image_root=root)
    print(counts_table({label: coco}))
    print(f"wrote {len(files)} file(s) to {args.output} ({args.to}); image folder: {root or '(absolute paths)'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, exit=False))
