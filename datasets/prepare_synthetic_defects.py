#!/usr/bin/env python
"""Generate the synthetic defect dataset (COCO format) used by the demo, the tests and the benchmarks."""
import argparse
import os
import sys

from d2_defects.data.builtin import datasets_root
from d2_defects.data.synthetic import PRESETS, generate_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None,
                        help="datasets root (default: $DETECTRON2_DATASETS or ./datasets); the data goes to "
                             "<out>/synthetic_defects/ (--preset large: <out>/synthetic_defects_large/)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="default: 256x192 RGB and 512x384 gray images (the demo's data); large: 2048x1536 "
                             "gray and 1600x1200 RGB images with 4-40 px defects (sliced inference)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="images in total (train + val); default 1000, or 400 for --preset large")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of the images in val")
    parser.add_argument("--seed", type=int, default=0, help="the same seed always gives the same dataset")
    parser.add_argument("--if-missing", action="store_true", help="do nothing if the dataset exists")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out = os.path.join(args.out or datasets_root(), preset["dirname"])
    num_images = preset["num_images"] if args.num_images is None else args.num_images
    if args.if_missing and os.path.isfile(os.path.join(out, "annotations", "instances_val.json")):
        print(f"{out} exists; nothing to do")
        return 0
    if num_images < 2:
        parser.error("--num-images must be at least 2")
    files = generate_dataset(out, num_images, seed=args.seed, val_fraction=args.val_fraction, preset=args.preset)
    for split, f in files.items():
        print(f"{split}: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
