#!/usr/bin/env python
"""Tables and PNG plots of a dataset: per-class counts, box width/height/area (absolute and after the
config's resize, with COCO's small/medium/large limits), aspect ratios, image sizes, boxes per image and
the share of normal images.

    python tools/analyze_dataset.py --dataset synthetic_defects_train \
        --config configs/synthetic/cascade_r18_cpu.yaml --output-dir output/analysis

Writes ``tables.md`` and ``*.png`` to --output-dir and prints the tables. Without --config the
"resized" numbers equal the absolute ones.
"""
import argparse
import os
import sys

from tqdm import tqdm

import d2_defects  # noqa: F401  registers the built-in datasets
from d2_defects.data.analysis import dataset_stats, plot_stats, stats_tables
from d2_defects.data.source import add_source_args, config_resize, load_source
from d2_defects.utils.fileio import check_can_write
from d2_defects.utils.errors import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--config", help="config whose INPUT.MIN_SIZE_TRAIN/MAX_SIZE_TRAIN resize is applied "
                                    "(middle MIN_SIZE_TRAIN choice); its DATASETS.MANIFEST is registered")
    p.add_argument("--output-dir", required=True, help="folder for tables.md and the PNG plots")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --output-dir")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    check_can_write(os.path.join(args.output_dir, "tables.md"), args.overwrite)
    cfg, short, max_size = None, None, None
    if args.config:
        from d2_defects.engine.launch import load_config

        cfg = load_config(args.config, args.opts)
        short, max_size = config_resize(cfg)
    coco, _, label = load_source(args, progress=tqdm, cfg=cfg)
    st = dataset_stats(coco, short, max_size)
    tables = f"# {label}\n\nresize: short side {short}, max size {max_size}\n\n" + stats_tables(st)
    print(tables)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "tables.md"), "w", encoding="utf-8") as f:
        f.write(tables + "\n")
    paths = plot_stats(st, args.output_dir)
    print(f"\nwrote tables.md and {len(paths)} plot(s) to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, exit=False))
