#!/usr/bin/env python
"""Generate the synthetic defect dataset (COCO format) used by the demo, the tests and the benchmarks."""
import argparse
import os
import sys

from d2_defects.data.builtin import SYNTHETIC_DIRNAME, datasets_root
from d2_defects.data.synthetic import generate_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None,
                        help="datasets root (default: $DETECTRON2_DATASETS or ./datasets); "
                             f"the data goes to <out>/{SYNTHETIC_DIRNAME}/")
    parser.add_argument("--num-images", type=int, default=1000, help="images in total (train + val)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of the images in val")
    parser.add_argument("--seed", type=int, default=0, help="the same seed always gives the same dataset")
    parser.add_argument("--if-missing", action="store_true", help="do nothing if the dataset exists")
    args = parser.parse_args(argv)
    out = os.path.join(args.out or datasets_root(), SYNTHETIC_DIRNAME)
    if args.if_missing and os.path.isfile(os.path.join(out, "annotations", "instances_val.json")):
        print(f"{out} exists; nothing to do")
        return 0
    if args.num_images < 2:
        parser.error("--num-images must be at least 2")
    files = generate_dataset(out, args.num_images, seed=args.seed, val_fraction=args.val_fraction)
    for split, f in files.items():
        print(f"{split}: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
