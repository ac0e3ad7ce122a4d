#!/usr/bin/env python
"""Draw augmented training samples (what the model sees: resize, flips, 90-degree rotations, photometric
jitter, copy-paste) with their boxes to PNG files.

    python tools/visualize_data.py --config configs/synthetic/cascade_r18_cpu.yaml --output output/train_samples \
        INPUT.COPY_PASTE.ENABLED True INPUT.ROT90.ENABLED True

Trailing KEY VALUE pairs override the config. Uses DATASETS.TRAIN (and DATASETS.MANIFEST). Next to the
PNGs, samples.json lists each drawn sample's size after augmentation and its boxes (XYXY) and class ids.
"""
import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

import d2_defects  # noqa: F401  registers the built-in datasets
from d2_defects.utils.fileio import check_can_write
from d2_defects.utils.errors import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file")
    p.add_argument("--manifest", help="YAML datasets manifest (DATASETS.MANIFEST)")
    p.add_argument("--output", required=True, help="folder for the PNG files")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace PNGs already in --output")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    check_can_write(args.output, args.overwrite)

    from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
    from detectron2.utils.visualizer import Visualizer

    from d2_defects.data.manifest import register_from_config
    from d2_defects.data.mapper import build_defect_train_mapper
    from d2_defects.engine.launch import load_config

    opts = (["DATASETS.MANIFEST", os.path.abspath(args.manifest)] if args.manifest else []) + list(args.opts)
    cfg = load_config(args.config, opts)
    register_from_config(cfg, check=("TRAIN",))
    dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    mapper = build_defect_train_mapper(cfg, dataset_dicts=dataset)
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    np.random.seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    order = np.random.permutation(len(dataset))[: args.num_images]
    samples = []  # what was drawn: image size after augmentation, boxes (XYXY) and contiguous class ids
    for n, i in enumerate(tqdm(order, desc="drawing")):
        d = mapper(dataset[i])
        img = d["image"].permute(1, 2, 0).numpy()
        if cfg.INPUT.FORMAT == "BGR":
            img = img[:, :, ::-1]
        inst = d["instances"]
        labels = [meta.thing_classes[c] for c in inst.gt_classes.tolist()] if hasattr(meta, "thing_classes") else None
        vis = Visualizer(img, metadata=meta).overlay_instances(boxes=inst.gt_boxes.tensor.numpy(), labels=labels)
        name = os.path.splitext(os.path.basename(dataset[i]["file_name"]))[0]
        png = f"{n:03d}_{name}.png"
        vis.save(os.path.join(args.output, png))
        samples.append({"png": png, "file_name": dataset[i]["file_name"], "height": img.shape[0],
                        "width": img.shape[1], "boxes": inst.gt_boxes.tensor.tolist(),
                        "classes": inst.gt_classes.tolist()})
    with open(os.path.join(args.output, "samples.json"), "w", encoding="utf-8") as f:
        json.dump(samples, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(order)} image(s) and samples.json to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, exit=False))
