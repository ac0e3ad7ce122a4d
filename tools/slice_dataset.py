#!/usr/bin/env python
"""Write the tiles of sliced training to disk (images + COCO json), for training elsewhere or looking at them.

    python tools/slice_dataset.py --dataset synthetic_defects_large_train --size 512 512 --overlap 0.2 \
        --output datasets/synthetic_defects_large_tiles

Training with INPUT.SLICE.ENABLED cuts the same tiles at load time without writing anything; this tool applies the
same rules (tile grid, MIN_VISIBLE, EMPTY_RATIO: docs/slicing.md) and writes OUTPUT/images/<image>_x<x0>_y<y0>.png
and OUTPUT/annotations.json (the input's categories; each image records its source image and slice).
"""
import argparse
import sys

from tqdm import tqdm

import d2_defects  # noqa: F401  registers the built-in datasets
from d2_defects.data.slicing import write_sliced_dataset
from d2_defects.data.source import add_source_args, load_source
from d2_defects.utils.errors import UsageError, run_cli
from d2_defects.utils.fileio import check_can_write


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--output", required=True, help="output folder (images/ and annotations.json)")
    p.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"), help="tile size, px")
    p.add_argument("--overlap", type=float, default=0.2, help="fraction of a tile shared with its neighbour")
    p.add_argument("--min-visible", type=float, default=0.5,
                   help="keep a cut box (clipped) when this fraction of it is inside; else drop the tile")
    p.add_argument("--empty-ratio", type=float, default=1.0, help="empty tiles kept per tile with defects")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw of empty tiles")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    if min(args.size) <= 0 or not 0 <= args.overlap < 1 or not 0 < args.min_visible <= 1 or args.empty_ratio < 0:
        raise UsageError("--size must be > 0, --overlap in [0, 1), --min-visible in (0, 1], --empty-ratio >= 0")
    check_can_write(args.output, args.overwrite, protected=[args.annotations])
    coco, root, label = load_source(args, progress=tqdm)
    path = write_sliced_dataset(coco, root, args.output, tuple(args.size), args.overlap, args.min_visible,
                                args.empty_ratio, args.seed, progress=tqdm)
    print(f"{label}: tiles written to {args.output} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, exit=False))
