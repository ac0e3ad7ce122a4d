#!/usr/bin/env python
"""Cluster anchor shapes for a config's training data: k-means with 1 - IoU distance on the ground-truth
boxes after the config's resize (middle INPUT.MIN_SIZE_TRAIN choice), sizes assigned to the FPN levels in
ascending order, and the anchor coverage before vs after (mean best-anchor IoU, share of boxes whose best
anchor has IoU >= 0.5).

    python tools/cluster_anchors.py --config configs/synthetic/cascade_r18_cpu.yaml
    python tools/cluster_anchors.py --config my.yaml --dataset bottle_train --num-ratios 5

Prints ``MODEL.ANCHOR_GENERATOR.SIZES`` / ``ASPECT_RATIOS`` lines to paste into the config (YAML) or
the command line. Uses DATASETS.TRAIN of the config unless --dataset/--format is given.
"""
import argparse
import sys

import numpy as np
from tqdm import tqdm

import d2_defects  # noqa: F401  registers the built-in datasets
from d2_defects.data.anchors import anchor_shapes, box_shapes, cluster_anchors, coverage
from d2_defects.data.source import add_source_args, config_resize, load_source
from d2_defects.utils.errors import run_cli
from d2_defects.utils.errors import UsageError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file (resize, anchors, DATASETS.TRAIN)")
    add_source_args(p)
    p.add_argument("--sizes-per-level", type=int, help="default: as in the config")
    p.add_argument("--num-ratios", type=int, help="default: as in the config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    from d2_defects.engine.launch import load_config

    cfg = load_config(args.config, args.opts)
    short, max_size = config_resize(cfg)
    ag = cfg.MODEL.ANCHOR_GENERATOR
    if args.dataset or args.format:
        sources = [load_source(args, progress=tqdm, cfg=cfg)[0]]
    else:
        sources = []
        for name in tqdm(cfg.DATASETS.TRAIN, desc="datasets"):
            args.dataset = name
            sources.append(load_source(args, cfg=cfg)[0])
    wh = np.concatenate([box_shapes(c, short, max_size) for c in sources])
    levels = len(cfg.MODEL.RPN.IN_FEATURES) if len(ag.SIZES) == 1 else len(ag.SIZES)
    spl = args.sizes_per_level or len(ag.SIZES[0])
    nr = args.num_ratios or len(ag.ASPECT_RATIOS[0])
    if spl < 1 or nr < 1:
        raise UsageError("--sizes-per-level and --num-ratios must be >= 1")
    sizes, ratios = cluster_anchors(wh, levels, spl, nr, seed=args.seed)
    before = coverage(wh, anchor_shapes(ag.SIZES, ag.ASPECT_RATIOS))
    after = coverage(wh, anchor_shapes(sizes, ratios))
    print(f"{len(wh)} boxes, resized to short side {short} (max {max_size}); "
          f"{levels} FPN levels ({', '.join(cfg.MODEL.RPN.IN_FEATURES)}) x {spl} size(s) x {nr} ratio(s)\n")
    print("| anchors | mean best IoU | boxes with best IoU >= 0.5 |\n|---|---|---|")
    print(f"| config: SIZES {[list(s) for s in ag.SIZES]}, ASPECT_RATIOS {[list(r) for r in ag.ASPECT_RATIOS]} "
          f"| {before['mean_best_iou']:.3f} | {100 * before['share_ge_0.5']:.1f}% |")
    print(f"| clustered | {after['mean_best_iou']:.3f} | {100 * after['share_ge_0.5']:.1f}% |\n")
    for feat, s in zip(cfg.MODEL.RPN.IN_FEATURES, sizes):
        print(f"  {feat}: sizes {s}")
    print("\nYAML:")
    print(f"MODEL:\n  ANCHOR_GENERATOR:\n    SIZES: {sizes}\n    ASPECT_RATIOS: {ratios}")
    print("\ncommand line:")
    print(f'MODEL.ANCHOR_GENERATOR.SIZES "{sizes}" MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS "{ratios}"')
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, exit=False))
