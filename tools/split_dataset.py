#!/usr/bin/env python
"""Split a dataset into COCO jsons and print each split's per-class counts.

    python tools/split_dataset.py --dataset synthetic_defects_train --method stratified --fractions 0.9 0.1 \
        --output-dir datasets/splits
    # sequence data (URPC): every 7th frame to val, so neighbouring near-duplicate frames do not leak
    python tools/split_dataset.py --format voc --annotations URPC/box --images URPC/image \
        --method interval --every 7 --output-dir URPC/splits
    python tools/split_dataset.py --dataset my_train --method kfold --folds 5 --output-dir folds/

Methods: random, stratified (each image under its rarest class; normal images as their own group),
interval (file order, every k-th image to val), kfold (stratified folds; writes fold<i>_train/val).
The same input and --seed always give the same splits. File names stay relative to the image folder.
"""
import argparse
import os
import sys

from tqdm import tqdm

import d2_defects  # noqa: F401  registers the built-in datasets
from d2_defects.data.formats import write_coco
from d2_defects.data.source import add_source_args, load_source
from d2_defects.utils.fileio import check_can_write
from d2_defects.utils.errors import run_cli
from d2_defects.data.split import SPLIT_METHODS, counts_table, kfold_images, split_images, subset_coco
from d2_defects.utils.errors import UsageError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--method", choices=SPLIT_METHODS, default="random")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.9, 0.1],
                   help="relative split sizes (default 0.9 0.1)")
    p.add_argument("--names", nargs="+", help="split names (default train val [test])")
    p.add_argument("--every", type=int, help="interval: every k-th image goes to val (default 1/val fraction)")
    p.add_argument("--folds", type=int, default=5, help="kfold: number of folds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--prefix", default="", help="file name prefix, e.g. 'bottle_'")
    p.add_argument("--overwrite", action="store_true", help="replace existing split files")
    args = p.parse_args(argv)
    if any(f <= 0 for f in args.fractions):
        raise UsageError("--fractions must be positive")
    coco, root, label = load_source(args, progress=tqdm)
    outputs = {}
    if args.method == "kfold":
        folds = kfold_images(coco, args.folds, seed=args.seed)
        for i in tqdm(range(args.folds), desc="folds"):
            val = set(folds[i])
            train = [img["id"] for img in coco["images"] if img["id"] not in val]
            outputs[f"fold{i}_train"] = subset_coco(coco, train)
            outputs[f"fold{i}_val"] = subset_coco(coco, val)
    else:
        names = args.names or ["train", "val", "test"][: len(args.fractions)]
        if len(names) != len(args.fractions):
            raise UsageError(f"{len(names)} --names for {len(args.fractions)} --fractions")
        parts = split_images(coco, args.method, args.fractions, seed=args.seed, every=args.every)
        outputs = {n: subset_coco(coco, ids) for n, ids in zip(names, parts)}
    paths = {n: os.path.join(args.output_dir, f"{args.prefix}{n}.json") for n in outputs}
    for path in paths.values():
        check_can_write(path, args.overwrite, protected=[args.annotations])
    for n in outputs:
        write_coco(outputs[n], paths[n])
    if args.method == "kfold":
        for i in range(args.folds):
            print(f"\nfold {i}:\n" + counts_table({k: outputs[k] for k in (f"fold{i}_train", f"fold{i}_val")}))
    else:
        print(counts_table(outputs))
    print(f"\nwrote {', '.join(paths.values())}; image folder: {root or '(absolute paths)'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, exit=False))
