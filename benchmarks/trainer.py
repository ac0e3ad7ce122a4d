#!/usr/bin/env python
"""Train-step and inference time of d2_defects' Trainer vs Detectron2's stock DefaultTrainer.

Both trainers are built from the same config (the small CPU config on the synthetic data) in this
process; their steps are interleaved and the ratio of medians is printed (expected ~1.0x: the project's
Trainer only changes how DDP, checkpoints and evaluators are set up).

    python benchmarks/trainer.py [--config-file ...] [--repeats 15] [KEY VALUE ...]
"""
import os
import tempfile

import torch
from detectron2.engine import DefaultTrainer
from detectron2.utils.events import EventStorage

import d2_defects  # noqa: F401
from common import base_parser, compare, print_table
from d2_defects.engine import Trainer
from d2_defects.engine.launch import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = base_parser(__doc__)
    p.add_argument("--config-file", default=os.path.join(ROOT, "configs/synthetic/cascade_r18_cpu.yaml"))
    p.add_argument("opts", nargs="*", help="config overrides KEY VALUE ...")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, ["MODEL.DEVICE", args.device, "DATALOADER.NUM_WORKERS", "0",
                                          "OUTPUT_DIR", tempfile.mkdtemp(), *args.opts])
    cfg.freeze()
    torch.manual_seed(0)
    stock = DefaultTrainer(cfg)
    torch.manual_seed(0)
    ours = Trainer(cfg)
    ours.model.load_state_dict(stock.model.state_dict())

    rows = []
    with EventStorage(0) as storage:
        for t in (stock, ours):
            t.storage = storage
            t._trainer.storage = storage
        rows.append(compare("train step", stock.run_step, ours.run_step, args.repeats, args.warmup, args.device))

    batch = next(iter(stock.build_test_loader(cfg, cfg.DATASETS.TEST[0])))
    for t in (stock, ours):
        t.model.eval()

    def infer(model):
        with torch.no_grad():
            model(batch)

    rows.append(compare("inference (1 image)", lambda: infer(stock.model), lambda: infer(ours.model),
                        args.repeats, args.warmup, args.device))
    print_table(rows, title=f"Trainer vs DefaultTrainer ({os.path.relpath(args.config_file, ROOT)}, "
                            f"{cfg.SOLVER.IMS_PER_BATCH} images/step, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
