#!/usr/bin/env python
"""Cost of the dataset checks and of the defect augmentations, as ratios in one process.

    DETECTRON2_DATASETS=datasets python benchmarks/data_pipeline.py --repeats 5

1. loading ``synthetic_defects_train`` with all checks (every image decoded, cold cache) vs without
   checks, and the cached second load vs without checks;
2. the training mapper with VFLIP + ROT90, PHOTOMETRIC, COPY_PASTE (PROB 0.3, normal images 1.0) and all
   of them vs Detectron2's DatasetMapper (16 images per call, config cascade_r18_cpu.yaml).
"""
import os
import sys

import numpy as np
from common import base_parser, compare, print_table  # benchmarks/common.py, next to this script


def main():
    p = base_parser(__doc__)
    p.add_argument("--images", type=int, default=16, help="images mapped per call")
    args = p.parse_args()
    import torch
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog

    import d2_defects  # noqa: F401
    from d2_defects.data.catalog import load_coco_defects
    from d2_defects.utils.image_io import clear_size_cache
    from d2_defects import add_defects_config
    from d2_defects.data.mapper import build_defect_train_mapper

    if args.threads:
        torch.set_num_threads(args.threads)
    name = "synthetic_defects_train"
    if name not in DatasetCatalog.list():
        sys.exit("synthetic_defects_train is not registered: set DETECTRON2_DATASETS")
    meta = MetadataCatalog.get(name)

    def load(validation, cold):
        if cold:
            clear_size_cache()
        load_coco_defects(meta.json_file, meta.image_root, validation=validation)

    DatasetCatalog.get(name)  # fill the loader's cache
    rows = [
        compare("load train json: checks, cold image cache vs no checks", lambda: load("none", False),
                lambda: load("error", True), repeats=args.repeats, warmup=args.warmup),
        compare("DatasetCatalog.get: cached second load vs no checks", lambda: load("none", False),
                lambda: DatasetCatalog.get(name), repeats=args.repeats, warmup=args.warmup),
    ]
    cfg = add_defects_config(get_cfg())
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic", "cascade_r18_cpu.yaml"))
    recs = DatasetCatalog.get(name)
    default = DatasetMapper(cfg, True)
    batch = [recs[i] for i in np.random.RandomState(0).choice(len(recs), args.images, replace=False)]
    for keys in (("VFLIP", "ROT90"), ("PHOTOMETRIC",), ("COPY_PASTE",), ("VFLIP", "ROT90", "PHOTOMETRIC", "COPY_PASTE")):
        c = cfg.clone()
        for k in keys:
            c.INPUT[k].ENABLED = True
        ours = build_defect_train_mapper(c, dataset_dicts=recs)
        rows.append(compare(f"train mapper, {args.images} images: {' + '.join(keys)} vs DatasetMapper",
                            lambda: [default(d) for d in batch], lambda: [ours(d) for d in batch],
                            repeats=args.repeats, warmup=args.warmup))
    print_table(rows, title="Dataset checks and defect augmentations")


if __name__ == "__main__":
    main()
