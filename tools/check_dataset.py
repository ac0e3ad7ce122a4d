#!/usr/bin/env python
"""Check a dataset for the problems that break training and list each one with file, image id and
annotation id: missing or undecodable images, image sizes differing from the annotation, boxes with
non-positive size or outside the image, unknown categories, duplicate image ids or file names, no images.

    python tools/check_dataset.py --dataset synthetic_defects_train
    python tools/check_dataset.py --manifest my_datasets.yaml --dataset bottle_train
    python tools/check_dataset.py --format voc --annotations NEU-DET/ANNOTATIONS --images NEU-DET/IMAGES \
        --fix-output fixed.json --clip

Exit code 0: no problem; 1: problems found; 2: the input could not be read. The source annotations are
never modified; --fix-output writes a COCO json without the bad images (and with clipped boxes when
--clip is given).
"""
import argparse
import os
import sys

from tqdm import tqdm

import d2_defects  # noqa: F401  registers the built-in datasets
from d2_defects.data.validation import clip_boxes, validate_coco_dict
from d2_defects.data.formats import write_coco
from d2_defects.data.source import add_source_args, load_source
from d2_defects.utils.fileio import check_can_write
from d2_defects.utils.errors import run_cli
from d2_defects.data.split import subset_coco
from d2_defects.utils.errors import UsageError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--clip", action="store_true", help="clip boxes outside their image instead of reporting them")
    p.add_argument("--fix-output", help="write a fixed COCO json here (bad images dropped)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --fix-output file")
    args = p.parse_args(argv)
    if args.fix_output:
        check_can_write(args.fix_output, args.overwrite, protected=[args.annotations])
    read_problems = []  # files the reader could not use (reported with the rest)
    coco, root, label = load_source(args, progress=tqdm, validate=False, reader_problems=read_problems)
    if args.clip:
        coco, n = clip_boxes(coco)
        print(f"clipped {n} box(es) to their image")
    problems, bad = validate_coco_dict(coco, label, root, check_files=bool(root), progress=True)
    problems = read_problems + problems
    for line in problems:
        print(line)
    n_img, n_ann = len(coco["images"]), len(coco["annotations"])
    print(f"{label}: {n_img} images, {n_ann} boxes, {len(coco['categories'])} classes; "
          f"{len(problems)} problem(s) in {len(bad)} image(s)")
    if args.fix_output:
        if args.annotations and os.path.realpath(args.fix_output) == os.path.realpath(args.annotations):
            raise UsageError("refusing to overwrite the source annotations")
        fixed = subset_coco(coco, [img["id"] for img in coco["images"] if img["id"] not in bad])
        known = {c["id"] for c in fixed["categories"]}
        fixed["annotations"] = [a for a in fixed["annotations"] if a["category_id"] in known]
        write_coco(fixed, args.fix_output)
        print(f"wrote {args.fix_output} ({len(fixed['images'])} images, {len(fixed['annotations'])} boxes; "
              f"image root: {root or '(absolute paths)'})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, exit=False))
