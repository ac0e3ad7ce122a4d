#!/usr/bin/env python
"""
Train and evaluate d2_defects models.

    python train_net.py --config-file configs/synthetic/cascade_r18_cpu.yaml
    python train_net.py --config-file configs/... --num-gpus 8
    python train_net.py --config-file configs/... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file configs/... --resume
    python train_net.py --config-file configs/... --overwrite     # replace the run already in OUTPUT_DIR
    python train_net.py --config-file configs/... --manifest my_datasets.yaml DATASETS.TRAIN "('my_train',)"

Trailing ``KEY VALUE`` pairs override the config.  ``--num-gpus N`` on a machine without CUDA starts N
CPU processes (gloo).
"""
import torch
from detectron2.engine import default_argument_parser, launch

import d2_defects  # noqa: F401  registers the project's models, datasets and evaluators
from d2_defects.engine.launch import run


def cli():
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--manifest", default="", help="YAML datasets manifest to register (DATASETS.MANIFEST)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train into an OUTPUT_DIR that holds a previous run, deleting its checkpoints, metrics "
                             "and logs first (without it, such a folder is refused unless --resume)")
    args = parser.parse_args()
    if args.num_gpus > 1 and not torch.cuda.is_available():
        print(f"No CUDA device: training with {args.num_gpus} CPU processes (gloo).")
    launch(
        run,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
