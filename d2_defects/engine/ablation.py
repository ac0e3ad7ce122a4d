"""
The ablation logbook: a grid of ``train_net.py`` runs (variants x seeds) described by a plan file, run
locally or on SLURM (submitit), resumable, and summarised as a logbook (mean +- std over seeds, paired
deltas against a baseline with their spread, per-class AP, plots).

A plan (YAML)::

    base: configs/synthetic/cascade_r18_cpu.yaml     # config of every variant without its own
    overrides: [SOLVER.MAX_ITER, 300]                # KEY VALUE list or mapping, applied to every run
    seeds: [0, 1, 2]
    baseline: faster                                 # default: the first variant
    slurm: {partition: dev, gpus_per_node: 1, timeout_min: 60}   # optional, --launcher slurm
    variants:
      - {name: faster, purpose: "two-stage baseline", config: configs/synthetic/faster_r18_cpu.yaml}
      - {name: cascade3, purpose: "cascade 0.5/0.6/0.7"}
      - {name: soft_nms, purpose: "overlapping defects", from: cascade3, eval_only: true,
         overrides: {MODEL.SOFT_NMS.ENABLED: true}}

Layout of the output folder: ``DIR/<variant>/seed<k>/`` is the ``OUTPUT_DIR`` of one run (with
``ablation_status.json`` once it has finished, failed or diverged; a folder without it is an interrupted run,
continued with ``--resume``), ``DIR/logbook.{md,csv,json}`` and ``DIR/*.png`` the report.
"""
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
import yaml

from .launch import RUN_MARKERS, UserError, load_config
from ..utils.fileio import atomic_write_text

__all__ = [
    "PlanError", "Plan", "Variant", "RunSpec", "load_plan", "plan_runs", "run_grid", "execute_run",
    "read_run", "summarize", "write_report", "count_finished", "run_changes", "add_external_run", "paired_delta",
    "STATUS_FILE",
]

logger = logging.getLogger("d2_defects.ablation")

STATUS_FILE = "ablation_status.json"
ADDED_FILE = "ablation_added.json"
PLAN_KEYS = {"base", "overrides", "seeds", "baseline", "variants", "slurm"}
VARIANT_KEYS = {"name", "purpose", "config", "from", "eval_only", "overrides", "result", "tune_thresholds"}
SLURM_KEYS = {"partition", "nodes", "gpus_per_node", "cpus_per_task", "timeout_min", "mem_gb", "constraint",
              "account", "qos"}
RESULT_KINDS = ("auto", "live", "swa", "ema", "tta")
# metrics of the main table: (column, task, key in Detectron2's / DefectEvaluator's results)
METRICS = [("AP", "bbox", "AP"), ("AP50", "bbox", "AP50"), ("AP75", "bbox", "AP75"), ("APs", "bbox", "APs"),
           ("weighted_mAP", "defect", "weighted_mAP"), ("ACC", "defect", "ACC"), ("score", "defect", "score")]
# mask models (MODEL.MASK_ON): COCO segm metrics, shown (with a per-class mask AP table) when a run has them
MASK_METRICS = [("mask AP", "segm", "AP"), ("mask AP50", "segm", "AP50")]
TIMINGS = [("train_s_per_iter", "train s/iter"), ("infer_ms_per_image", "infer ms/img")]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_NAN_RE = re.compile(r"Loss became infinite or NaN at iteration=(\d+)")
_DIVERGED_RE = re.compile(r"Training has diverged|contain Inf/NaN|non-finite")
_INFER_RE = re.compile(r"Total inference pure compute time: .*?\(([0-9.]+) s / iter per device")
_TRAIN_START_RE = re.compile(r"Starting training from iteration (\d+)")
_THRESH_RE = re.compile(r"^MODEL\.ROI_HEADS\.SCORE_THRESH_PER_CLASS (\[.*\])\s*$", re.M)


class PlanError(UserError):
    """A mistake in an ablation plan (or its command line), reported as one ``ERROR:`` line before any run."""


@dataclasses.dataclass
class Variant:
    """One row of the logbook. ``config``/``overrides`` are resolved (inherited through ``from``)."""

    name: str
    purpose: str
    config: str
    overrides: list
    eval_only: bool = False
    source: str = ""  # "from": the training variant whose checkpoints an eval_only variant evaluates
    result: str = "live"  # which evaluation of the run the row reports: live, swa (model_swa) or tta
    tune_thresholds: bool = False
    id: str = ""


@dataclasses.dataclass
class Plan:
    path: str
    base: str
    overrides: list
    seeds: list
    baseline: str
    variants: "OrderedDict[str, Variant]"
    slurm: dict


@dataclasses.dataclass
class RunSpec:
    """Everything :func:`execute_run` needs for one (variant, seed) run (picklable, for submitit)."""

    variant: str
    seed: int
    out_dir: str
    config: str
    opts: list
    eval_only: bool = False
    weights: str = ""  # eval_only: the checkpoint of the `from` run
    source_dir: str = ""  # eval_only: the `from` run's folder
    tune_thresholds: bool = False
    test_dataset: str = ""
    num_gpus: int = 1
    env: dict = dataclasses.field(default_factory=dict)
    cpus: tuple = ()  # CPU affinity of the run (disjoint between concurrent runs); () = inherit
    nodes: int = 1


# ----------------------------------------------------------------------------------------------- plan
def _opts(value, where):
    """``[K, V, K, V]`` or ``{K: V}`` from YAML -> ``["K", "V", ...]`` as Detectron2's ``merge_from_list`` takes
    them (it parses each value with ``literal_eval``: numbers, booleans, lists; other strings stay strings)."""
    if value is None:
        return []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        if len(value) % 2:
            raise PlanError(f"{where}: overrides must be KEY VALUE pairs (got {len(value)} items)")
        items = list(zip(value[0::2], value[1::2]))
    else:
        raise PlanError(f"{where}: overrides must be a list of KEY VALUE pairs or a mapping, not {value!r}")
    opts = []
    for k, v in items:
        if not isinstance(k, str):
            raise PlanError(f"{where}: override key {k!r} is not a config key name")
        opts += [k, v if isinstance(v, str) else repr(v)]
    return opts


def _resolve_path(path, plan_dir):
    """A config path as written in a plan: absolute, relative to the working directory, or to the plan."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.abspath(os.path.join(plan_dir, path))


def load_plan(path, check_configs=True):
    """
    Read and validate an ablation plan.

    Args:
        path (str): YAML plan file.
        check_configs (bool): also build every variant's config (catches config-key typos; fast, no model).
    Returns:
        Plan
    Raises:
        PlanError: naming the variant and key of the first mistake found.
    """
    if not os.path.isfile(path):
        raise PlanError(f"plan file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise PlanError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: a plan is a mapping with keys {sorted(PLAN_KEYS)}")
    unknown = set(raw) - PLAN_KEYS
    if unknown:
        raise PlanError(f"{path}: unknown plan key(s) {sorted(unknown)}; allowed: {sorted(PLAN_KEYS)}")
    plan_dir = os.path.dirname(os.path.abspath(path))
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise PlanError(f"{path}: 'base' must be a config file path")
    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in seeds)):
        raise PlanError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise PlanError(f"{path}: 'seeds' has duplicates: {seeds}")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict) or set(slurm) - SLURM_KEYS:
        raise PlanError(f"{path}: 'slurm' keys must be among {sorted(SLURM_KEYS)}, got {slurm!r}")
    common = _opts(raw.get("overrides"), f"{path}: overrides")
    raw_variants = raw.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise PlanError(f"{path}: 'variants' must be a non-empty list")

    by_name = OrderedDict()
    for i, v in enumerate(raw_variants):
        where = f"{path}: variant #{i + 1}"
        if not isinstance(v, dict):
            raise PlanError(f"{where}: a variant is a mapping with keys {sorted(VARIANT_KEYS)}")
        name = v.get("name")
        if not isinstance(name, str) or not name:
            raise PlanError(f"{where}: missing 'name'")
        where = f"{path}: variant {name!r}"
        if not _NAME_RE.match(name):
            raise PlanError(f"{where}: a name is letters, digits and _.+- (it names a folder)")
        if name in by_name:
            raise PlanError(f"{where}: duplicate name")
        unknown = set(v) - VARIANT_KEYS
        if unknown:
            raise PlanError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(VARIANT_KEYS)}")
        if v.get("result", "auto") not in RESULT_KINDS:
            raise PlanError(f"{where}: 'result' must be one of {RESULT_KINDS}, got {v['result']!r}")
        by_name[name] = v

    variants = OrderedDict()
    for name, v in by_name.items():
        where = f"{path}: variant {name!r}"
        source = v.get("from", "")
        eval_only = bool(v.get("eval_only", False))
        config, inherited = None, []
        if source:
            if source not in by_name:
                raise PlanError(f"{where}: 'from: {source}' names no variant of the plan")
            if source == name:
                raise PlanError(f"{where}: 'from' names the variant itself")
            if by_name[source].get("eval_only"):
                raise PlanError(f"{where}: 'from: {source}' names an eval_only variant; it must name a "
                                "training variant")
            if source not in variants:
                raise PlanError(f"{where}: 'from: {source}' must name a variant listed before it")
            config, inherited = variants[source].config, list(variants[source].overrides)
        elif eval_only:
            raise PlanError(f"{where}: eval_only needs 'from: <training variant>' (whose checkpoints it evaluates)")
        if v.get("config"):
            if eval_only:
                raise PlanError(f"{where}: an eval_only variant uses the config of its 'from' variant; "
                                "put changes under 'overrides'")
            config = _resolve_path(v["config"], plan_dir)
        if config is None:
            if not base:
                raise PlanError(f"{where}: no 'config' and the plan has no 'base'")
            config = _resolve_path(base, plan_dir)
        if not os.path.isfile(config):
            raise PlanError(f"{where}: config file not found: {config}")
        if v.get("tune_thresholds") and not eval_only:
            raise PlanError(f"{where}: tune_thresholds needs eval_only (it tunes on the 'from' run's detections)")
        own = _opts(v.get("overrides"), f"{where}: overrides")
        variants[name] = Variant(name=name, purpose=str(v.get("purpose", "")), config=config,
                                 overrides=inherited + own, eval_only=eval_only, source=source,
                                 result=v.get("result", "auto"), tune_thresholds=bool(v.get("tune_thresholds")),
                                 id=f"{len(variants) + 1:02d}")
    baseline = raw.get("baseline") or next(iter(variants))
    if baseline not in variants:
        raise PlanError(f"{path}: baseline {baseline!r} names no variant")
    plan = Plan(path=os.path.abspath(path), base=base or "", overrides=common, seeds=list(seeds),
                baseline=baseline, variants=variants, slurm=dict(slurm))
    if check_configs:
        for var in variants.values():
            cfg = variant_config(plan, var)
            if var.result == "auto":
                var.result = ("swa" if cfg.SOLVER.SWA.ENABLED else "ema" if cfg.MODEL_EMA.ENABLED and cfg.MODEL_EMA.EVAL
                              else "tta" if cfg.TEST.AUG.ENABLED else "live")
            if var.result == "tta" and not cfg.TEST.AUG.ENABLED:
                raise PlanError(f"{plan.path}: variant {var.name!r}: result: tta needs TEST.AUG.ENABLED True")
            if var.result == "swa" and not cfg.SOLVER.SWA.ENABLED:
                raise PlanError(f"{plan.path}: variant {var.name!r}: result: swa needs SOLVER.SWA.ENABLED True")
            if var.result == "ema" and not (cfg.MODEL_EMA.ENABLED and cfg.MODEL_EMA.EVAL):
                raise PlanError(f"{plan.path}: variant {var.name!r}: result: ema needs MODEL_EMA.ENABLED True "
                                "and MODEL_EMA.EVAL True")
            if var.tune_thresholds and not cfg.TEST.DEFECT_EVAL.ENABLED:
                raise PlanError(f"{plan.path}: variant {var.name!r}: tune_thresholds needs "
                                "TEST.DEFECT_EVAL.ENABLED True")
            if not cfg.DATASETS.TEST:
                raise PlanError(f"{plan.path}: variant {var.name!r}: DATASETS.TEST is empty; the logbook "
                                "needs an evaluation")
    else:
        for var in variants.values():
            if var.result == "auto":
                var.result = "live"
    return plan


def variant_config(plan, variant, extra=()):
    """The variant's Detectron2 config (not frozen); a config error names the variant."""
    try:
        return load_config(variant.config, list(plan.overrides) + list(variant.overrides) + list(extra))
    except UserError as e:
        raise PlanError(f"{plan.path}: variant {variant.name!r}: {e}") from None


# ----------------------------------------------------------------------------------------------- runs
def run_dir(output, variant, seed):
    return os.path.join(output, variant, f"seed{seed}")


def plan_runs(plan, output, variants=None, seeds=None):
    """
    The grid as a list of :class:`RunSpec`, seed-major (every variant's seed 0, then seed 1, ...), so that a
    grid stopped early has comparable rows; within a seed, the training runs, then the eval-only runs that
    evaluate them.
    """
    names = list(plan.variants) if not variants else list(variants)
    for n in names:
        if n not in plan.variants:
            raise PlanError(f"--only: {n!r} names no variant of {plan.path}")
    for n in list(names):  # an eval-only variant needs its training variant
        src = plan.variants[n].source
        if plan.variants[n].eval_only and src not in names:
            names.append(src)
    seeds = list(plan.seeds) if seeds is None else list(seeds)
    ordered = []
    for s in seeds:
        train, evals = [], []
        for n in plan.variants:
            if n not in names:
                continue
            v = plan.variants[n]
            out = os.path.abspath(run_dir(output, n, s))
            opts = list(plan.overrides) + list(v.overrides) + ["SEED", str(s), "OUTPUT_DIR", out]
            spec = RunSpec(variant=n, seed=s, out_dir=out, config=v.config, opts=opts, eval_only=v.eval_only,
                           tune_thresholds=v.tune_thresholds)
            if v.eval_only:
                spec.source_dir = os.path.abspath(run_dir(output, v.source, s))
                spec.weights = os.path.join(spec.source_dir, "model_final.pth")
                evals.append(spec)
            else:
                train.append(spec)
        ordered += train + evals
    return ordered


def _flat(tree, prefix=""):
    out = {}
    for k, v in (tree or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


_DEFAULTS = []


def _default_config():
    if not _DEFAULTS:
        _DEFAULTS.append(_flat(yaml.safe_load(load_config(None).dump())))
    return _DEFAULTS[0]


def run_changes(spec):
    """
    Why a finished run no longer matches its plan, as a list of strings (empty: it matches). The config the
    plan builds for the run now is compared with the ``config.yaml`` the run wrote; a key the run's config
    lacks (added to the project since) counts as its default; ``OUTPUT_DIR`` (a moved grid), an eval-only run's
    ``MODEL.WEIGHTS`` and a tuned ``SCORE_THRESH_PER_CLASS`` (the run's own result) are not compared. An eval-only
    run is also stale when its ``from`` run was trained after it.
    """
    path = os.path.join(spec.out_dir, "config.yaml")
    if not os.path.isfile(path):
        return []  # a run the tool did not start (or that failed before writing its config)
    opts = list(spec.opts) + (["MODEL.WEIGHTS", spec.weights] if spec.eval_only else [])
    try:
        expected = _flat(yaml.safe_load(load_config(spec.config, opts).dump()))
        with open(path) as f:
            actual = _flat(yaml.safe_load(f))
    except (UserError, yaml.YAMLError, OSError) as e:
        return [f"its config cannot be compared ({e})"]
    defaults = _default_config()
    skip = {"OUTPUT_DIR"}  # a moved or copied output folder is the same experiment
    if spec.eval_only:
        skip.add("MODEL.WEIGHTS")  # the `from` run's checkpoint, wherever the folder is (retraining: below)
    if spec.tune_thresholds:
        skip.add("MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS")
    changed = sorted(k for k in set(expected) | set(actual) if k not in skip and
                     expected.get(k, defaults.get(k)) != actual.get(k, defaults.get(k)))
    why = [f"config changed: {', '.join(changed[:4])}" + (f" (+{len(changed) - 4})" if len(changed) > 4 else "")
           ] if changed else []
    status_path = os.path.join(spec.out_dir, STATUS_FILE)
    if spec.eval_only and os.path.isfile(spec.weights) and os.path.isfile(status_path) and \
            os.path.getmtime(spec.weights) > os.path.getmtime(status_path):
        why.append("its 'from' run was trained again")
    return why


def _set_aside(out_dir):
    """Move a stale run's folder to ``<out_dir>.stale<k>`` (kept, never overwritten) and return that path."""
    k = 1
    while os.path.exists(f"{out_dir}.stale{k}"):
        k += 1
    os.rename(out_dir, f"{out_dir}.stale{k}")
    return f"{out_dir}.stale{k}"


def read_status(out_dir):
    """The run's final status (dict) or None when it has not finished."""
    path = os.path.join(out_dir, STATUS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json_atomic(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=float))


def _train_net_path():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "train_net.py")
    if not os.path.isfile(path):
        raise PlanError(f"train_net.py not found next to the d2_defects package ({path}); install the project "
                        "from its source tree (pip install -e .)")
    return path


def _preexec(cpus):
    def fn():
        if cpus:
            os.sched_setaffinity(0, cpus)
        try:  # the run dies with the runner (kill -9 of the runner leaves no orphan writing into the grid)
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    return fn


def _run_logged(cmd, log_path, env, cpus):
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_preexec(cpus))
    with open(log_path, errors="replace") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 200_000))
        return proc.returncode, f.read()


def _last_iteration(out_dir):
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    its = [int(rec["iteration"]) for rec in _json_lines(path) if isinstance(rec.get("iteration"), int)]
    return max(its) if its else None


def _failure_reason(output, out_dir, returncode=1):
    """("diverged", "diverged at iter N") for a non-finite loss or box, else ("failed", the error line, or the
    signal that killed the run)."""
    if returncode < 0:  # killed by a signal: a crash (SIGSEGV) or an outside kill, not a Python error
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        it = _last_iteration(out_dir)
        return "failed", f"killed by {name}" + (f" after iter {it}" if it is not None else "")
    m = list(_NAN_RE.finditer(output))
    if m:
        return "diverged", f"diverged at iter {m[-1].group(1)}"
    if _DIVERGED_RE.search(output):  # non-finite boxes/scores (RPN or ROI heads) before the loss check
        it = _last_iteration(out_dir)
        return "diverged", f"diverged at iter {it if it is not None else '?'}"
    lines = [l.strip() for l in output.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("ERROR:")]
    if errors:
        return "failed", errors[-1][len("ERROR:"):].strip()
    excs = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", l)]
    return "failed", (excs[-1] if excs else (lines[-1] if lines else "no output"))[:300]


def _tune_thresholds(spec, env):
    """Per-class thresholds tuned on the `from` run's saved detections (tools/tune_thresholds.py)."""
    preds = os.path.join(spec.source_dir, "inference", spec.test_dataset, "defect_detections.json")
    tool = os.path.join(os.path.dirname(_train_net_path()), "tools", "tune_thresholds.py")
    cmd = [sys.executable, tool, "--dataset", spec.test_dataset, "--predictions", preds,
           "--config-file", os.path.join(spec.source_dir, "config.yaml")]
    code, out = _run_logged(cmd, os.path.join(spec.out_dir, "run.log"), env, spec.cpus)
    m = _THRESH_RE.search(out)
    if code != 0 or not m:
        return None
    return m.group(1)


def execute_run(spec):
    """
    Run one (variant, seed) through ``train_net.py`` in a subprocess (output appended to
    ``out_dir/run.log``) and write its ``ablation_status.json``: ``{"status": "ok" | "failed" | "diverged",
    "reason", "returncode", "wall_s", "command"}``. An interrupted run (folder with ``last_checkpoint``)
    (a folder with a checkpoint or metrics) continues with ``--resume``. Returns the status dict. Module-level so that submitit can pickle it.
    """
    os.makedirs(spec.out_dir, exist_ok=True)
    env = dict(os.environ)
    env.update(spec.env)
    t0 = time.time()
    status = None
    opts = list(spec.opts)
    cmd = [sys.executable, _train_net_path(), "--config-file", spec.config]
    if spec.eval_only:
        src = read_status(spec.source_dir)
        if not src or src.get("status") != "ok" or not os.path.isfile(spec.weights):
            why = src.get("reason", src.get("status")) if src else "has not run"
            status = {"status": "failed", "reason": f"'from' run {spec.source_dir} {why}"}
        else:
            cmd.append("--eval-only")
            opts += ["MODEL.WEIGHTS", spec.weights]
            if spec.tune_thresholds:
                thresholds = _tune_thresholds(spec, env)
                if thresholds is None:
                    status = {"status": "failed", "reason": "tools/tune_thresholds.py failed (see run.log)"}
                opts += ["MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS", thresholds or "[]"]
    elif any(os.path.exists(os.path.join(spec.out_dir, f)) for f in RUN_MARKERS):
        cmd.append("--resume")  # an interrupted run: continue from its last checkpoint (or start, if none)
    if spec.num_gpus > 1:
        cmd += ["--num-gpus", str(spec.num_gpus)]
    if spec.nodes > 1:  # one task per node (submitit/SLURM): machine rank and rendezvous from the job
        import submitit

        job_env = submitit.JobEnvironment()
        cmd += ["--num-machines", str(spec.nodes), "--machine-rank", str(job_env.node),
                "--dist-url", f"tcp://{job_env.hostnames[0]}:{29500 + spec.seed % 1000}"]
    cmd += [str(o) for o in opts]
    if status is None:
        code, output = _run_logged(cmd, os.path.join(spec.out_dir, "run.log"), env, spec.cpus)
        if code == 0:
            status = {"status": "ok", "reason": ""}
        else:
            kind, reason = _failure_reason(output, spec.out_dir, code)
            status = {"status": kind, "reason": reason}
        status["returncode"] = code
    status.update(wall_s=round(time.time() - t0, 3), command=cmd, variant=spec.variant, seed=spec.seed,
                  cpus=list(spec.cpus), env=spec.env)
    if spec.nodes <= 1 or _is_first_node():
        _write_json_atomic(os.path.join(spec.out_dir, STATUS_FILE), status)
    return status


def _is_first_node():
    import submitit

    return submitit.JobEnvironment().node == 0


def _cpu_slots(jobs, threads):
    """Disjoint CPU sets for ``jobs`` concurrent runs, ``threads`` CPUs in all (from this process's affinity)."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    per = max(1, len(cpus) // jobs)
    return [tuple(cpus[i * per:(i + 1) * per]) or tuple(cpus) for i in range(jobs)]


def run_grid(plan, output, jobs=1, launcher="local", threads=None, gpus_per_run=0, only=None, seeds=None,
             slurm=None, retry_failed=False, rerun_stale=False, progress=True):
    """
    Run every unfinished (variant, seed) of ``plan`` into ``output`` and rebuild the report after each.

    Args:
        jobs (int): concurrent runs (local launcher); CPU threads are split between them, each run pinned
            to its own CPUs; with ``gpus_per_run`` each run gets its own CUDA devices.
        launcher (str): "local" (subprocesses here), "slurm" (submitit, one SLURM job per run) or
            "submitit-local" (submitit's local executor: the SLURM path on this machine).
        slurm (dict): executor settings overriding the plan's ``slurm`` mapping.
        retry_failed (bool): run again the runs whose status is failed/diverged.
        rerun_stale (bool): run again the finished runs whose config no longer matches the plan (see
            :func:`run_changes`); their old folders are kept as ``seed<k>.stale<n>``. Without it they are
            reported as stale and left alone.
    Returns:
        list[dict]: the statuses of the runs started by this call.
    """
    from tqdm import tqdm

    specs = plan_runs(plan, output, only, seeds)
    test_ds = {}
    for spec in specs:
        if spec.variant not in test_ds:
            test_ds[spec.variant] = variant_config(plan, plan.variants[spec.variant]).DATASETS.TEST[0]
        spec.test_dataset = test_ds[spec.variant]
    todo, stale = [], []
    stale_train = set()  # training runs found stale (an eval-only run of one is stale too)
    for spec in specs:  # training runs come before the eval-only runs of their seed
        st = read_status(spec.out_dir)
        changes = run_changes(spec) if st is not None else []
        source = plan.variants[spec.variant].source
        if spec.eval_only and st is not None and (source, spec.seed) in stale_train:
            changes = changes or [f"its 'from' run {source}/seed{spec.seed} is stale"]
        if changes and not spec.eval_only:
            stale_train.add((spec.variant, spec.seed))
        if changes and not rerun_stale:
            stale.append(f"{spec.variant}/seed{spec.seed}: {'; '.join(changes)}")
            continue
        if changes:
            logger.info(f"ablation: {spec.variant}/seed{spec.seed} is stale ({'; '.join(changes)}); "
                        f"kept as {_set_aside(spec.out_dir)} and run again")
            st = None
        if st is None or (retry_failed and st.get("status") != "ok"):
            if st is not None:
                os.remove(os.path.join(spec.out_dir, STATUS_FILE))
            todo.append(spec)
    if stale:
        logger.warning(f"ablation: {len(stale)} finished run(s) no longer match the plan and are left out of the "
                       "logbook (run again with --rerun-stale):\n  " + "\n  ".join(stale))
    os.makedirs(output, exist_ok=True)
    _write_json_atomic(os.path.join(output, "ablation_plan.json"), _plan_record(plan))
    done_before = len(specs) - len(todo)
    logger.info(f"ablation: {len(specs)} runs planned, {done_before} already finished, {len(todo)} to run")
    if not todo:
        write_report(plan, output)
        return []
    bar = tqdm(total=len(specs), initial=done_before, desc="ablation runs", disable=not progress)
    results = []

    def finished(status):
        results.append(status)
        bar.update(1)
        bar.set_postfix_str(f"{status['variant']}/seed{status['seed']}: {status['status']}")
        write_report(plan, output)

    if launcher == "local":
        _run_local(todo, jobs, threads, gpus_per_run, finished)
    elif launcher in ("slurm", "submitit-local"):
        settings = dict(plan.slurm)
        settings.update(slurm or {})
        _run_submitit(todo, output, launcher, settings, gpus_per_run, finished)
    else:
        raise PlanError(f"unknown launcher {launcher!r} (local, slurm, submitit-local)")
    bar.close()
    return results


def _run_local(todo, jobs, threads, gpus_per_run, finished):
    jobs = max(1, min(jobs, len(todo)))
    threads = threads or len(os.sched_getaffinity(0))
    slots = list(range(jobs))
    cpu_sets = _cpu_slots(jobs, threads)
    lock = threading.Lock()
    training = {(s.variant, s.seed): threading.Event() for s in todo if not s.eval_only}

    def work(spec):
        if spec.eval_only:  # wait for the run it evaluates, if it is part of this call
            for (v, s), ev in training.items():
                if s == spec.seed and spec.source_dir.endswith(os.path.join(v, f"seed{s}")):
                    ev.wait()
        with lock:
            slot = slots.pop(0)
        try:
            spec.cpus = cpu_sets[slot]
            spec.env = {"OMP_NUM_THREADS": str(len(spec.cpus)), "MKL_NUM_THREADS": str(len(spec.cpus))}
            if gpus_per_run:
                spec.num_gpus = gpus_per_run
                spec.env["CUDA_VISIBLE_DEVICES"] = ",".join(
                    str(slot * gpus_per_run + i) for i in range(gpus_per_run))
            return execute_run(spec)
        finally:
            with lock:
                slots.append(slot)
            if not spec.eval_only:
                training[(spec.variant, spec.seed)].set()

    # every training run is queued before any eval-only run: an eval-only run waits for its training run in
    # a worker, so queued behind it training runs of later seeds would otherwise idle the other workers
    ordered = sorted(todo, key=lambda spec: spec.eval_only)  # stable: the plan's order otherwise
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = [pool.submit(work, s) for s in ordered]  # training runs first: waiting never deadlocks
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                finished(fut.result())


def _run_submitit(todo, output, launcher, settings, gpus_per_run, finished):
    import submitit

    folder = os.path.join(output, "_submitit", "%j")
    if launcher == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = {"slurm_" + k: v for k, v in settings.items()
                  if k in ("partition", "constraint", "account", "qos")}
        nodes = int(settings.get("nodes", 1))
        gpus = int(settings.get("gpus_per_node", gpus_per_run or 0))
        params.update(nodes=nodes, tasks_per_node=1, timeout_min=int(settings.get("timeout_min", 60)),
                      cpus_per_task=int(settings.get("cpus_per_task", 8)), name="d2_defects_ablation")
        if gpus:
            params["gpus_per_node"] = gpus
        if settings.get("mem_gb"):
            params["mem_gb"] = int(settings["mem_gb"])
        executor.update_parameters(**params)
    else:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=int(settings.get("timeout_min", 60)))
        nodes, gpus = 1, gpus_per_run
    for spec in todo:
        spec.nodes = nodes
        spec.num_gpus = max(1, gpus)
    train = [s for s in todo if not s.eval_only]
    evals = [s for s in todo if s.eval_only]
    jobs = {executor.submit(execute_run, s): s for s in train}
    waiting = list(evals)

    def submit_ready():
        for s in list(waiting):
            if not any(t.eval_only is False and t.out_dir == s.source_dir for t in jobs.values()):
                jobs[executor.submit(execute_run, s)] = s
                waiting.remove(s)

    submit_ready()  # eval runs whose training finished earlier
    while jobs:
        for job in list(jobs):
            if job.done():
                spec = jobs.pop(job)
                try:
                    status = job.result()
                except Exception as e:  # the job itself died (timeout, preemption, node failure)
                    status = {"status": "failed", "reason": f"{launcher} job {job.job_id}: "
                              f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__}",
                              "variant": spec.variant, "seed": spec.seed}
                    os.makedirs(spec.out_dir, exist_ok=True)
                    _write_json_atomic(os.path.join(spec.out_dir, STATUS_FILE), status)
                finished(status)
                submit_ready()
        time.sleep(0.5)


def _plan_record(plan):
    return {"plan": plan.path, "seeds": plan.seeds, "baseline": plan.baseline,
            "variants": [dataclasses.asdict(v) for v in plan.variants.values()]}


# ---------------------------------------------------------------------------------------------- report
def _task_results(results, kind):
    """``{"bbox": {...}, "defect": {...}}`` of the evaluation ``kind`` (live/swa/tta); first test dataset."""
    single = any(k in results for k in ("bbox", "defect")) or any(
        k.startswith(("swa/", "ema/")) or k.endswith("_TTA") for k in results)
    if results and not single:  # {dataset: {task: ...}}: several test datasets, the first one counts
        results = next(iter(results.values()))
    if kind in ("swa", "ema"):
        return {k[4:]: v for k, v in results.items() if k.startswith(kind + "/")}
    if kind == "tta":
        return {k[:-4]: v for k, v in results.items() if k.endswith("_TTA")}
    return {k: v for k, v in results.items() if not k.startswith(("swa/", "ema/"))}


def _json_lines(path):
    """The records of a JSON-lines file (Detectron2's metrics.json); lines that do not parse are skipped."""
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def _median_train_time(metrics_path):
    times = [rec["time"] for rec in _json_lines(metrics_path) if "time" in rec and "total_loss" in rec]
    return float(np.median(times)) if times else None


def _ap_curve(metrics_path, kind):
    key = (kind + "/" if kind in ("swa", "ema") else "") + "bbox/AP"
    curve = {int(rec["iteration"]): float(rec[key]) for rec in _json_lines(metrics_path)
             if key in rec and "iteration" in rec}
    return sorted(curve.items())


def _inference_time(log_path, kind):
    with open(log_path, errors="replace") as f:
        text = f.read()
    starts = list(_TRAIN_START_RE.finditer(text))
    if starts:
        text = text[starts[-1].start():]
    times = [float(m.group(1)) for m in _INFER_RE.finditer(text)]
    if not times:
        return None
    return 1000 * (times[-1] if kind in ("swa", "ema", "tta") else times[0])


def read_run(out_dir, kind="live"):
    """
    What the logbook needs from one run folder: ``{"status", "reason", "metrics": {name: value},
    "per_class": {class: AP}, "per_class_mask": {class: mask AP}, "train_s_per_iter", "infer_ms_per_image",
    "curve": [(iter, AP)]}``.
    A folder without a status file but with ``eval_results.json`` (a run made outside the tool) counts as ok.
    """
    st = read_status(out_dir)
    name = "eval_tta_results.json" if kind == "tta" else "eval_results.json"
    res_path = os.path.join(out_dir, name)
    if st is None:
        if not os.path.isfile(res_path):
            return {"status": "pending", "reason": ""}
        st = {"status": "ok", "reason": ""}
    out = {"status": st["status"], "reason": st.get("reason", ""), "metrics": {}, "per_class": {},
           "per_class_mask": {},
           "train_s_per_iter": None, "infer_ms_per_image": None, "curve": []}
    if st["status"] == "ok":
        if not os.path.isfile(res_path):
            out.update(status="failed", reason=f"no {name} written")
            return out
        with open(res_path) as f:
            tasks = _task_results(json.load(f), kind)
        if not tasks.get("bbox"):
            out.update(status="failed", reason=f"no {kind} bbox results in {name}")
            return out
        for col, task, key in METRICS + MASK_METRICS:
            v = tasks.get(task, {}).get(key)
            if v is not None:
                out["metrics"][col] = float(v)
        out["per_class"] = {k[3:]: float(v) for k, v in tasks["bbox"].items() if k.startswith("AP-")}
        out["per_class_mask"] = {k[3:]: float(v) for k, v in tasks.get("segm", {}).items() if k.startswith("AP-")}
    metrics_path = os.path.join(out_dir, "metrics.json")
    if os.path.isfile(metrics_path):
        out["train_s_per_iter"] = _median_train_time(metrics_path)
        out["curve"] = _ap_curve(metrics_path, kind)
    log_path = os.path.join(out_dir, "log.txt")
    if os.path.isfile(log_path):
        out["infer_ms_per_image"] = _inference_time(log_path, kind)
    return out


def _mean_std(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None, 0
    n = len(vals)
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if n > 1 else None), n


def paired_delta(candidate, baseline):
    """
    Δ of a variant against the baseline from the seeds both have (dicts ``{seed: value}``): the mean of the
    per-seed differences, their standard deviation (ddof=1), the standard error ``std / sqrt(n)``, n, and
    ``noise``: True when ``|mean| <= 2 * se`` (None when n < 2: no spread to judge by).
    """
    seeds = sorted(s for s in candidate if s in baseline and candidate[s] is not None and baseline[s] is not None
                   and not math.isnan(candidate[s]) and not math.isnan(baseline[s]))
    d = [candidate[s] - baseline[s] for s in seeds]
    if not d:
        return {"mean": None, "std": None, "se": None, "n": 0, "noise": None, "seeds": []}
    mean = float(np.mean(d))
    if len(d) < 2:
        return {"mean": mean, "std": None, "se": None, "n": 1, "noise": None, "seeds": seeds}
    std = float(np.std(d, ddof=1))
    se = std / math.sqrt(len(d))
    return {"mean": mean, "std": std, "se": se, "n": len(d), "noise": bool(abs(mean) <= 2 * se), "seeds": seeds}


def _added_runs(output):
    path = os.path.join(output, ADDED_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def add_external_run(output, name, path, plan=None):
    """
    Bring an existing ``OUTPUT_DIR`` (made outside the tool) into the logbook as ``name``: a folder with
    ``eval_results.json`` (its seed read from its ``config.yaml``), or a folder of ``seed<k>/`` run folders.
    Recorded in ``DIR/ablation_added.json`` so later reports keep it.
    """
    path = os.path.abspath(path)
    if not _NAME_RE.match(name):
        raise PlanError(f"--add {name}={path}: a name is letters, digits and _.+-")
    runs = {}
    if os.path.isfile(os.path.join(path, "eval_results.json")):
        seed = 0
        cfg_path = os.path.join(path, "config.yaml")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                seed = int((yaml.safe_load(f) or {}).get("SEED", 0))
        runs[seed] = path
    elif os.path.isdir(path):
        for d in sorted(os.listdir(path)):
            m = re.fullmatch(r"seed(-?\d+)", d)
            if m and os.path.isfile(os.path.join(path, d, "eval_results.json")):
                runs[int(m.group(1))] = os.path.join(path, d)
    if not runs:
        raise PlanError(f"--add {name}={path}: no eval_results.json there (nor in seed<k>/ folders below it)")
    if plan is not None and name in plan.variants:
        raise PlanError(f"--add {name}: the plan already has a variant {name!r}; pick another name")
    added = [a for a in _added_runs(output) if a["name"] != name]
    added.append({"name": name, "path": path, "runs": {str(k): v for k, v in runs.items()}})
    os.makedirs(output, exist_ok=True)
    _write_json_atomic(os.path.join(output, ADDED_FILE), added)
    return runs


def summarize(plan, output):
    """
    The logbook as data: one row per variant (plan order, then added runs) with per-seed values, mean, std,
    n, and the paired Δ against the baseline for every metric and class AP. See :func:`write_report`.
    """
    rows = []
    entries = [(v.id, v.name, v.purpose, v.result, {s: run_dir(output, v.name, s) for s in plan.seeds},
                v.eval_only, v.source) for v in plan.variants.values()]
    for i, a in enumerate(_added_runs(output)):
        entries.append((f"+{i + 1}", a["name"], f"added from {a['path']}", "live",
                        {int(k): p for k, p in a["runs"].items()}, False, ""))
    specs = {(sp.variant, sp.seed): sp for sp in plan_runs(plan, output)}
    runs_by_variant = {}
    for vid, name, purpose, kind, dirs, eval_only, source in entries:
        runs = {s: read_run(d, kind) for s, d in dirs.items()}
        runs_by_variant[name] = runs
        rows.append({"id": vid, "name": name, "purpose": purpose, "result": kind, "eval_only": eval_only,
                     "from": source, "runs": runs})
    for row in sorted(rows, key=lambda r: r["eval_only"]):  # training runs first: their evals follow them
        for s, r in row["runs"].items():
            spec = specs.get((row["name"], s))
            if spec is None or r["status"] == "pending":
                continue
            changes = run_changes(spec)
            src = runs_by_variant.get(row["from"], {}).get(s) if row["eval_only"] else None
            if src is not None and src["status"] == "stale":
                changes = changes or [f"its 'from' run {row['from']}/seed{s} is stale"]
            if changes:
                r.update(status="stale", reason="stale: " + "; ".join(changes) + " (--rerun-stale)")
    base_runs = runs_by_variant[plan.baseline]
    classes, mask_classes = [], []
    for row in rows:
        for r in row["runs"].values():
            for c in r.get("per_class", {}):
                if c not in classes:
                    classes.append(c)
            for c in r.get("per_class_mask", {}):
                if c not in mask_classes:
                    mask_classes.append(c)
    for row in rows:
        runs = row["runs"]
        ok = {s: r for s, r in runs.items() if r["status"] == "ok"}
        row["planned"] = len(runs)
        row["done"] = len(ok)
        row["problems"] = [f"seed {s}: " + (r["reason"] or r["status"]) for s, r in sorted(runs.items())
                           if r["status"] in ("failed", "diverged", "stale")]
        row["pending"] = sorted(s for s, r in runs.items() if r["status"] == "pending")
        row["stale"] = sorted(s for s, r in runs.items() if r["status"] == "stale")
        stats = OrderedDict()
        for col, _, _ in METRICS + MASK_METRICS:
            per_seed = {s: r["metrics"].get(col) for s, r in ok.items()}
            base = {s: r["metrics"].get(col) for s, r in base_runs.items() if r["status"] == "ok"}
            stats[col] = _stat(per_seed, base)
        for key, _ in TIMINGS:
            per_seed = {s: r[key] for s, r in ok.items()}
            base = {s: r[key] for s, r in base_runs.items() if r["status"] == "ok"}
            stats[key] = _stat(per_seed, base)
        row["stats"] = stats
        for table, names in (("per_class", classes), ("per_class_mask", mask_classes)):
            row[table] = OrderedDict()
            for c in names:
                per_seed = {s: r[table].get(c) for s, r in ok.items()}
                base = {s: r[table].get(c) for s, r in base_runs.items() if r["status"] == "ok"}
                row[table][c] = _stat(per_seed, base)
        row["curves"] = {s: r["curve"] for s, r in ok.items() if r["curve"]}
    return {"plan": plan.path, "baseline": plan.baseline, "seeds": plan.seeds, "classes": classes,
            "mask_classes": mask_classes, "rows": rows}


def _stat(per_seed, base):
    mean, std, n = _mean_std(per_seed.values())
    clean = {s: v for s, v in per_seed.items() if v is not None}
    return {"values": {str(s): v for s, v in sorted(clean.items())}, "mean": mean, "std": std, "n": n,
            "delta": paired_delta(clean, {s: v for s, v in base.items() if v is not None})}


def _fmt_ms(st, digits=1):
    if st["mean"] is None:
        return "–"
    if st["std"] is None:
        return f"{st['mean']:.{digits}f} (1 seed)"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def _fmt_delta(st, is_baseline, digits=1):
    d = st["delta"]
    if is_baseline:
        return "baseline"
    if d["mean"] is None:
        return "–"
    if d["n"] < 2:
        return f"{d['mean']:+.{digits}f} (1 seed, no spread)"
    flag = " (noise)" if d["noise"] else ""
    return f"{d['mean']:+.{digits}f} ± {d['std']:.{digits}f}{flag}"


def _runs_cell(row):
    cell = f"{row['done']}/{row['planned']}"
    if row["problems"]:
        cell += "; " + "; ".join(row["problems"])
    return cell


def _metric_columns(summary):
    """The main table's metrics: METRICS, plus MASK_METRICS when some run has mask results."""
    return METRICS + (MASK_METRICS if summary.get("mask_classes") else [])


def format_logbook(summary):
    """The logbook as Markdown (main table, then the per-class AP table; for mask models also the per-class mask
    AP table)."""
    base = summary["baseline"]
    metrics = _metric_columns(summary)
    masks = bool(summary.get("mask_classes"))
    cols = ["ID", "name", "purpose", "runs done/planned"] + [c for c, _, _ in metrics] + \
        [label for _, label in TIMINGS] + ["ΔAP vs " + base, "ΔAP50 vs " + base, "Δscore vs " + base] + \
        (["Δmask AP vs " + base] if masks else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in summary["rows"]:
        is_base = row["name"] == base
        s = row["stats"]
        cells = [row["id"], row["name"], row["purpose"].replace("|", "/"), _runs_cell(row).replace("|", "/")]
        cells += [_fmt_ms(s[c]) for c, _, _ in metrics]
        cells += [_fmt_ms(s["train_s_per_iter"], 3), _fmt_ms(s["infer_ms_per_image"], 1)]
        cells += [_fmt_delta(s["AP"], is_base), _fmt_delta(s["AP50"], is_base), _fmt_delta(s["score"], is_base)]
        if masks:
            cells.append(_fmt_delta(s["mask AP"], is_base))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± std over the seeds that finished; Δ = mean of the per-seed differences to the baseline ± "
              "their std; (noise): |Δ| ≤ 2 standard errors (std / √n). Times are medians per run, then averaged.",
              ""]
    tables = [("per_class", "classes", "Per-class AP")]
    if masks:
        tables.append(("per_class_mask", "mask_classes", "Per-class mask AP (COCO segm)"))
    for table, names, title in tables:
        lines += _per_class_lines(summary, table, summary[names], title)
    return "\n".join(lines) + "\n"


def _per_class_lines(summary, table, classes, title):
    base = summary["baseline"]
    lines = [f"### {title} (mean over seeds; Δ vs {base} in brackets)", ""]
    lines += ["| variant | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
    for row in summary["rows"]:
        is_base = row["name"] == base
        cells = []
        for c in classes:
            st = row[table][c]
            if st["mean"] is None:
                cells.append("–")
                continue
            cell = f"{st['mean']:.1f}"
            d = st["delta"]
            if not is_base and d["mean"] is not None:
                cell += f" ({d['mean']:+.1f}" + (" ± " + f"{d['std']:.1f}" if d["std"] is not None else "") + \
                    (" noise" if d["noise"] else "") + ")"
            cells.append(cell)
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _csv_rows(summary):
    header = ["id", "name", "purpose", "result", "runs_done", "runs_planned", "problems"]
    keys = [c for c, _, _ in _metric_columns(summary)] + [k for k, _ in TIMINGS]
    for k in keys:
        header += [f"{k}_mean", f"{k}_std", f"{k}_n", f"{k}_delta", f"{k}_delta_std", f"{k}_delta_n",
                   f"{k}_noise"]
    for c in summary["classes"]:
        header += [f"AP-{c}_mean", f"AP-{c}_std", f"AP-{c}_delta", f"AP-{c}_delta_std"]
    for c in summary.get("mask_classes", []):
        header += [f"maskAP-{c}_mean", f"maskAP-{c}_std", f"maskAP-{c}_delta", f"maskAP-{c}_delta_std"]
    out = [header]
    for row in summary["rows"]:
        r = [row["id"], row["name"], row["purpose"], row["result"], row["done"], row["planned"],
             "; ".join(row["problems"])]
        for k in keys:
            st = row["stats"][k]
            d = st["delta"]
            r += [st["mean"], st["std"], st["n"], d["mean"], d["std"], d["n"], d["noise"]]
        for table, names in (("per_class", "classes"), ("per_class_mask", "mask_classes")):
            for c in summary.get(names, []):
                st = row[table][c]
                r += [st["mean"], st["std"], st["delta"]["mean"], st["delta"]["std"]]
        out.append(["" if v is None else v for v in r])
    return out


def _plots(summary, output):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.fonts import plot_labels

    rows = [r for r in summary["rows"] if r["name"] != summary["baseline"]]
    paths = []
    if rows:
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(rows) + 2), 4))
        x = np.arange(len(rows))
        means = [r["stats"]["AP"]["delta"]["mean"] for r in rows]
        errs = [r["stats"]["AP"]["delta"]["std"] for r in rows]
        ax.bar(x, [m if m is not None else 0 for m in means],
               yerr=[e if e is not None else 0 for e in errs], capsize=3,
               color=["0.7" if r["stats"]["AP"]["delta"]["noise"] in (True, None) else "tab:blue" for r in rows])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, [r["name"] for r in rows], rotation=45, ha="right")
        ax.set_ylabel(f"ΔAP vs {summary['baseline']} (± std over seeds)")
        ax.set_title("ΔAP per variant (grey: within noise or one seed)")
        fig.tight_layout()
        paths.append(os.path.join(output, "delta_ap.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    classes = summary["classes"]
    labels, rc, _ = plot_labels(classes)
    if classes:
        with matplotlib.rc_context(rc):
            _per_class_plot(summary, classes, labels, os.path.join(output, "per_class_ap.png"))
        paths.append(os.path.join(output, "per_class_ap.png"))
    curves = [(r["name"], r["curves"]) for r in summary["rows"] if r["curves"]]
    if any(len(c) > 1 for _, cs in curves for c in cs.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, cs in curves:
            for j, (seed, pts) in enumerate(sorted(cs.items())):
                it, ap = zip(*pts)
                ax.plot(it, ap, marker=".", label=name if j == 0 else None,
                        color=f"C{[n for n, _ in curves].index(name) % 10}", alpha=0.8)
        ax.set_xlabel("iteration")
        ax.set_ylabel("bbox AP")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(output, "ap_vs_iter.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def _per_class_plot(summary, classes, labels, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(classes) * max(1, len(summary["rows"])) / 3 + 2), 4))
    width = 0.8 / max(1, len(summary["rows"]))
    for i, row in enumerate(summary["rows"]):
        m = [row["per_class"][c]["mean"] for c in classes]
        e = [row["per_class"][c]["std"] for c in classes]
        ax.bar(np.arange(len(classes)) + i * width, [v if v is not None else 0 for v in m], width,
               yerr=[v if v is not None else 0 for v in e], capsize=2, label=row["name"])
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, labels)
    ax.set_ylabel("AP (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def count_finished(summary):
    """(finished, planned) runs of a summary; stale runs count as not finished."""
    rows = summary["rows"]
    return (sum(r["planned"] - len(r["pending"]) - len(r["stale"]) for r in rows), sum(r["planned"] for r in rows))


def write_report(plan, output, plots=True):
    """
    Write ``DIR/logbook.md`` (tables), ``logbook.csv`` (one line per variant), ``logbook.json`` (everything,
    per-seed values included) and the plots ``delta_ap.png``, ``per_class_ap.png``, ``ap_vs_iter.png``
    (when runs evaluated periodically). Returns the summary (see :func:`summarize`).
    """
    summary = summarize(plan, output)
    os.makedirs(output, exist_ok=True)
    n_done, n_planned = count_finished(summary)
    n_stale = sum(len(r["stale"]) for r in summary["rows"])
    head = [f"# Ablation logbook: {os.path.basename(plan.path)}", "",
            f"Plan `{plan.path}`, seeds {plan.seeds}, baseline `{plan.baseline}`; "
            f"{n_done} of {n_planned} runs finished" + (" (partial)" if n_done < n_planned else "") +
            (f"; {n_stale} stale (left out; --rerun-stale)" if n_stale else "") + ".", "", ""]
    md = "\n".join(head) + format_logbook(summary)
    if plots:
        pngs = _plots(summary, output)
        md += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs) + "\n"
    atomic_write_text(os.path.join(output, "logbook.md"), md)
    buf = io.StringIO()
    csv.writer(buf).writerows(_csv_rows(summary))
    atomic_write_text(os.path.join(output, "logbook.csv"), buf.getvalue())
    js = dict(summary)
    js["rows"] = [{k: v for k, v in r.items() if k != "runs"} | {"runs": {str(s): x for s, x in r["runs"].items()}}
                  for r in summary["rows"]]
    _write_json_atomic(os.path.join(output, "logbook.json"), js)
    return summary
