#!/usr/bin/env python
"""Run an ablation plan (variants x seeds of train_net.py runs) and write the logbook.

    python tools/ablate.py --plan configs/ablation/synthetic.yaml --output output/ablation
    python tools/ablate.py --plan PLAN.yaml --output DIR --jobs 2            # 2 runs at once, CPUs split
    python tools/ablate.py --plan PLAN.yaml --output DIR --launcher slurm --partition dev --gpus-per-node 1
    python tools/ablate.py --plan PLAN.yaml --output DIR --report-only --add mine=output/my_run

Each (variant, seed) is one train_net.py run in DIR/<variant>/seed<k>/ (SEED k); eval_only variants
re-evaluate the checkpoint of their `from` variant. Finished runs are skipped, interrupted ones continue
with --resume, so the same command continues a grid. The logbook (DIR/logbook.md, .csv, .json, *.png) is
rebuilt after every run: mean +- std over seeds, and the paired delta to the baseline with its spread,
flagged "(noise)" when |delta| <= 2 standard errors. Plan format: docs/ablation.md.
"""
import argparse
import logging
import os
import sys

from d2_defects.engine.ablation import (PlanError, add_external_run, count_finished, load_plan, run_grid,
                                        write_report)
from d2_defects.utils.errors import run_cli


def _csv(kind):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        return [int(t) for t in items] if kind is int else items
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="ablation plan (YAML), e.g. configs/ablation/synthetic.yaml")
    p.add_argument("--output", required=True, help="folder of the runs and the logbook")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (local launcher; default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads shared by the concurrent runs (default: all this process may use); "
                        "each run is pinned to its own CPUs")
    p.add_argument("--gpus-per-run", type=int, default=0,
                   help="CUDA devices per run (train_net.py --num-gpus; local: disjoint CUDA_VISIBLE_DEVICES)")
    p.add_argument("--launcher", choices=["local", "slurm", "submitit-local"], default="local",
                   help="local subprocesses, SLURM jobs through submitit, or submitit's local executor")
    p.add_argument("--report-only", action="store_true", help="rebuild the logbook from the runs on disk")
    p.add_argument("--only", type=_csv(str), default=None, metavar="A,B",
                   help="run only these variants (and the training variants they evaluate)")
    p.add_argument("--seeds", type=_csv(int), default=None, metavar="0,1",
                   help="run only these seeds of the plan")
    p.add_argument("--retry-failed", action="store_true", help="run failed and diverged runs again")
    p.add_argument("--rerun-stale", action="store_true",
                   help="run again the finished runs whose config no longer matches the plan (their old folders "
                        "are kept as seed<k>.stale<n>); without it they are left out of the logbook")
    p.add_argument("--add", action="append", default=[], metavar="NAME=PATH",
                   help="add an OUTPUT_DIR made outside the tool (or a folder of seed<k>/ runs) as a row")
    g = p.add_argument_group("SLURM (override the plan's 'slurm' mapping)")
    g.add_argument("--partition")
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int)
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--timeout-min", type=int, help="time limit per run, minutes")
    g.add_argument("--mem-gb", type=int)
    return p.parse_args(argv)


def ablate(args):
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    plan = load_plan(args.plan)
    if args.seeds and set(args.seeds) - set(plan.seeds):
        raise PlanError(f"--seeds {args.seeds}: not in the plan's seeds {plan.seeds}")
    for item in args.add:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PlanError(f"--add {item!r}: expected NAME=PATH")
        runs = add_external_run(args.output, name, path, plan)
        print(f"added {name}: {len(runs)} run(s) from {path}")
    if args.jobs < 1:
        raise PlanError("--jobs must be >= 1")
    if not args.report_only:
        slurm = {k: getattr(args, k) for k in ("partition", "nodes", "gpus_per_node", "cpus_per_task",
                                               "timeout_min", "mem_gb") if getattr(args, k) is not None}
        run_grid(plan, args.output, jobs=args.jobs, launcher=args.launcher, threads=args.threads,
                 gpus_per_run=args.gpus_per_run, only=args.only, seeds=args.seeds, slurm=slurm,
                 retry_failed=args.retry_failed, rerun_stale=args.rerun_stale)
    summary = write_report(plan, args.output)
    done, planned = count_finished(summary)
    print(f"logbook: {os.path.join(args.output, 'logbook.md')} ({done}/{planned} runs finished)")
    return 0


def main(argv=None):
    return run_cli(ablate, parse_args(argv), exit=False)


if __name__ == "__main__":
    sys.exit(main())
