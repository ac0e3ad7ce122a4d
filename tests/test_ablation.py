"""The ablation runner (d2_defects.engine.ablation, tools/ablate.py): plan validation, resumable grids,
the report's arithmetic, diverged runs, eval-only variants and the submitit path."""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import ROOT, SMALL_CONFIG, TINY_OPTS
from d2_defects.engine import ablation
from d2_defects.engine.ablation import PlanError, load_plan, paired_delta, plan_runs, run_grid, summarize

TOOL = os.path.join(ROOT, "tools", "ablate.py")
# the tests' tiny schedule as plan overrides; low score threshold so that 4-iteration models have detections
TINY = dict(zip(TINY_OPTS[0::2], TINY_OPTS[1::2]))
TINY.update({"SOLVER.MAX_ITER": "4", "SOLVER.CHECKPOINT_PERIOD": "2", "MODEL.ROI_HEADS.SCORE_THRESH_TEST": "0.001",
             "DATASETS.TRAIN": "('synthetic_defects_train',)", "DATASETS.TEST": "('synthetic_defects_val',)"})


def write_plan(path, variants, seeds=(0, 1), baseline=None, overrides=None, **extra):
    plan = {"base": SMALL_CONFIG, "overrides": dict(TINY, **(overrides or {})), "seeds": list(seeds),
            "variants": variants, **extra}
    if baseline:
        plan["baseline"] = baseline
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return str(path)


def run_tool(args, datasets_root, check=True, timeout=900):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root)
    proc = subprocess.run([sys.executable, TOOL] + [str(a) for a in args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ablate.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# ------------------------------------------------------------------------------------------ plan errors
BAD_PLANS = [
    ({"varaints": []}, "unknown plan key(s) ['varaints']"),
    ({"variants": [{"purpose": "no name"}]}, "variant #1: missing 'name'"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "variant 'a': duplicate name"),
    ({"variants": [{"name": "a", "overides": {}}]}, "variant 'a': unknown key(s) ['overides']"),
    ({"variants": [{"name": "a"}, {"name": "b", "overrides": {"SOLVER.BASE_LRR": 0.1}}]},
     "variant 'b': config error in the command-line options: Non-existent key: SOLVER.BASE_LRR "
     "(did you mean SOLVER.BASE_LR?)"),
    ({"variants": [{"name": "a"}, {"name": "b", "from": "nope", "eval_only": True}]},
     "variant 'b': 'from: nope' names no variant"),
    ({"variants": [{"name": "a"}, {"name": "b", "from": "a", "eval_only": True},
                   {"name": "c", "from": "b", "eval_only": True}]},
     "variant 'c': 'from: b' names an eval_only variant"),
    ({"variants": [{"name": "a"}, {"name": "b", "eval_only": True}]}, "variant 'b': eval_only needs 'from"),
    ({"variants": [{"name": "a", "config": "configs/synthetic/nope.yaml"}]}, "variant 'a': config file not found"),
    ({"variants": [{"name": "a"}], "baseline": "b"}, "baseline 'b' names no variant"),
    ({"variants": [{"name": "a"}], "seeds": [0, 0]}, "'seeds' has duplicates"),
    ({"variants": [{"name": "a/b"}]}, "variant 'a/b': a name is letters"),
    ({"variants": [{"name": "a", "overrides": ["SOLVER.MAX_ITER"]}]}, "overrides must be KEY VALUE pairs"),
    ({"variants": [{"name": "a", "result": "swa"}]}, "result: swa needs SOLVER.SWA.ENABLED True"),
    ({"variants": [{"name": "a", "result": "ema"}]}, "result: ema needs MODEL_EMA.ENABLED True"),
]


@pytest.mark.parametrize("plan,message", BAD_PLANS, ids=[m[:30] for _, m in BAD_PLANS])
def test_plan_errors_name_variant_and_key(tmp_path, plan, message):
    raw = {"base": SMALL_CONFIG, "seeds": [0], **plan}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PlanError) as e:
        load_plan(str(path))
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_plan_error_is_one_line_before_any_run(tmp_path, synthetic_root):
    plan = write_plan(tmp_path / "plan.yaml", [{"name": "a"}, {"name": "typo", "overrides": {"MODEL.ROI_HEAD.X": 1}}])
    out = tmp_path / "out"
    proc = run_tool(["--plan", plan, "--output", out], synthetic_root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR:")]
    assert len(errors) == 1 and "variant 'typo'" in errors[0] and "MODEL.ROI_HEAD.X" in errors[0]
    assert not out.exists()  # nothing ran, nothing was written


def test_overrides_as_list_or_mapping_are_the_same(tmp_path):
    a = write_plan(tmp_path / "a.yaml", [{"name": "v", "overrides": ["MODEL.SOFT_NMS.ENABLED", True,
                                                                     "SOLVER.BASE_LR", 0.01]}])
    b = write_plan(tmp_path / "b.yaml", [{"name": "v", "overrides": {"MODEL.SOFT_NMS.ENABLED": True,
                                                                     "SOLVER.BASE_LR": 0.01}}])
    pa, pb = load_plan(a), load_plan(b)
    assert pa.variants["v"].overrides == pb.variants["v"].overrides == ["MODEL.SOFT_NMS.ENABLED", "True",
                                                                         "SOLVER.BASE_LR", "0.01"]
    cfg = ablation.variant_config(pa, pa.variants["v"])
    assert cfg.MODEL.SOFT_NMS.ENABLED is True and cfg.SOLVER.BASE_LR == 0.01


def test_from_inherits_config_and_overrides_and_grid_order(tmp_path):
    fcos = os.path.join(ROOT, "configs", "synthetic", "fcos_r18_cpu.yaml")
    plan = load_plan(write_plan(tmp_path / "p.yaml", [
        {"name": "fcos", "config": fcos, "overrides": {"SOLVER.BASE_LR": 0.003}},
        {"name": "fcos_snms", "from": "fcos", "eval_only": True, "overrides": {"MODEL.SOFT_NMS.ENABLED": True}},
        {"name": "cascade"}]))
    v = plan.variants["fcos_snms"]
    assert v.config == fcos and v.overrides == ["SOLVER.BASE_LR", "0.003", "MODEL.SOFT_NMS.ENABLED", "True"]
    specs = plan_runs(plan, str(tmp_path / "out"))
    # seed-major; within a seed the training runs, then the eval-only runs on their own seed's checkpoint
    assert [(s.variant, s.seed) for s in specs] == [("fcos", 0), ("cascade", 0), ("fcos_snms", 0), ("fcos", 1),
                                                    ("cascade", 1), ("fcos_snms", 1)]
    for s in (specs[2], specs[5]):
        assert s.eval_only and s.weights == str(tmp_path / "out" / "fcos" / f"seed{s.seed}" / "model_final.pth")
    # --only an eval-only variant brings its training variant along
    assert {s.variant for s in plan_runs(plan, str(tmp_path / "out"), ["fcos_snms"])} == {"fcos", "fcos_snms"}


# ---------------------------------------------------------------------------------------------- report
def _fake_run(out, variant, seed, ap, classes, status="ok", defect=None, reason=""):
    d = out / variant / f"seed{seed}"
    d.mkdir(parents=True)
    bbox = {"AP": ap, "AP50": ap + 20, "AP75": ap - 5, "APs": ap / 2}
    bbox.update({f"AP-{c}": v for c, v in classes.items()})
    (d / "eval_results.json").write_text(json.dumps({"bbox": bbox, "defect": defect or {"weighted_mAP": ap,
                                                                                        "ACC": 90.0, "score": ap}}))
    (d / ablation.STATUS_FILE).write_text(json.dumps({"status": status, "reason": reason}))
    return d


def test_report_arithmetic_against_hand_computed_numbers(tmp_path):
    plan = load_plan(write_plan(tmp_path / "p.yaml", [{"name": "base"}, {"name": "small"}, {"name": "big"},
                                                      {"name": "boom"}], seeds=[0, 1, 2]), check_configs=False)
    out = tmp_path / "out"
    for seed, (b, s, g) in enumerate([(10.0, 11.0, 12.0), (12.0, 15.0, 15.0), (14.0, 14.0, 18.0)]):
        _fake_run(out, "base", seed, b, {"crack": b, "spot": 50.0})
        _fake_run(out, "small", seed, s, {"crack": s, "spot": 50.0})
        _fake_run(out, "big", seed, g, {"crack": g + 1, "spot": 40.0})
    _fake_run(out, "boom", 0, 0.0, {}, status="diverged", reason="diverged at iter 93")
    _fake_run(out, "boom", 1, 7.0, {"crack": 7.0})
    summary = ablation.write_report(plan, str(out))
    rows = {r["name"]: r for r in summary["rows"]}
    # base AP 10, 12, 14: mean 12, std 2
    assert rows["base"]["stats"]["AP"]["mean"] == pytest.approx(12.0)
    assert rows["base"]["stats"]["AP"]["std"] == pytest.approx(2.0)
    # small - base = 1, 3, 0: mean 4/3, std sqrt(7/3), se sqrt(7/9): |4/3| <= 2 se -> noise
    d = rows["small"]["stats"]["AP"]["delta"]
    assert d["mean"] == pytest.approx(4 / 3) and d["std"] == pytest.approx(math.sqrt(7 / 3))
    assert d["se"] == pytest.approx(math.sqrt(7 / 9)) and d["n"] == 3 and d["noise"] is True
    # big - base = 2, 3, 4: mean 3, std 1, se 1/sqrt(3) -> a result
    d = rows["big"]["stats"]["AP"]["delta"]
    assert (d["mean"], d["std"], d["noise"]) == (pytest.approx(3.0), pytest.approx(1.0), False)
    assert d["se"] == pytest.approx(1 / math.sqrt(3))
    # per-class: big's crack is AP + 1 -> delta 4 ± 1; spot 40 - 50 = -10 ± 0 (zero spread: not noise)
    assert rows["big"]["per_class"]["crack"]["delta"]["mean"] == pytest.approx(4.0)
    assert rows["big"]["per_class"]["spot"]["delta"]["mean"] == pytest.approx(-10.0)
    assert rows["big"]["per_class"]["spot"]["delta"]["noise"] is False
    # one diverged seed, one finished, one pending: counted, shown, a single-seed delta says so
    boom = rows["boom"]
    assert (boom["done"], boom["planned"], boom["pending"]) == (1, 3, [2])
    assert boom["problems"] == ["seed 0: diverged at iter 93"]
    d = boom["stats"]["AP"]["delta"]
    assert d["n"] == 1 and d["mean"] == pytest.approx(7.0 - 12.0) and d["noise"] is None
    md = (out / "logbook.md").read_text()
    line = {l.split(" | ")[1]: l for l in md.splitlines() if l.startswith("| 0")}
    assert "12.0 ± 2.0" in line["base"] and "baseline" in line["base"]
    assert "+1.3 ± 1.5 (noise)" in line["small"]
    assert "+3.0 ± 1.0 |" in line["big"] and "+3.0 ± 1.0 (noise)" not in line["big"]
    assert "1/3; seed 0: diverged at iter 93" in line["boom"] and "(1 seed, no spread)" in line["boom"]
    assert "7.0 (1 seed)" in line["boom"]
    # csv and json carry the same numbers
    import csv

    with open(out / "logbook.csv") as f:
        rows_csv = {r["name"]: r for r in csv.DictReader(f)}
    assert float(rows_csv["big"]["AP_delta"]) == pytest.approx(3.0)
    assert float(rows_csv["small"]["AP_delta_std"]) == pytest.approx(math.sqrt(7 / 3))
    js = json.loads((out / "logbook.json").read_text())
    assert [r["name"] for r in js["rows"]] == ["base", "small", "big", "boom"]
    for png in ("delta_ap.png", "per_class_ap.png"):
        assert (out / png).stat().st_size > 1000


def test_mask_runs_add_mask_ap_columns_and_a_per_class_mask_table(tmp_path):
    plan = load_plan(write_plan(tmp_path / "p.yaml", [{"name": "cascade"}, {"name": "solo"}], seeds=[0, 1]),
                     check_configs=False)
    out = tmp_path / "out"
    for seed in (0, 1):
        for name, mask_ap in (("cascade", 20.0 + seed), ("solo", 24.0 + 3 * seed)):
            d = _fake_run(out, name, seed, 30.0, {"crack": 10.0, "spot": 50.0})
            res = json.loads((d / "eval_results.json").read_text())
            res["segm"] = {"AP": mask_ap, "AP50": mask_ap + 30, "AP-crack": mask_ap - 5, "AP-spot": 40.0}
            (d / "eval_results.json").write_text(json.dumps(res))
    summary = ablation.write_report(plan, str(out))
    solo = {r["name"]: r for r in summary["rows"]}["solo"]
    # solo - cascade mask AP: 4, 6 -> 5 ± sqrt(2)
    d = solo["stats"]["mask AP"]["delta"]
    assert d["mean"] == pytest.approx(5.0) and d["std"] == pytest.approx(math.sqrt(2))
    assert solo["per_class_mask"]["crack"]["mean"] == pytest.approx(20.5)  # 19, 22
    assert solo["per_class"]["crack"]["mean"] == pytest.approx(10.0)  # the box table is the box AP
    md = (out / "logbook.md").read_text()
    assert "| mask AP | mask AP50 |" in md and "Δmask AP vs cascade" in md
    assert "### Per-class mask AP (COCO segm)" in md
    mask_table = md.split("### Per-class mask AP")[1]
    assert "| solo | 20.5 (+5.0 ± 1.4) | 40.0 (+0.0 ± 0.0 noise) |" in mask_table
    # a box-only logbook has neither
    plan_box = load_plan(write_plan(tmp_path / "b.yaml", [{"name": "a"}], seeds=[0]), check_configs=False)
    _fake_run(tmp_path / "box", "a", 0, 30.0, {"crack": 10.0})
    ablation.write_report(plan_box, str(tmp_path / "box"))
    assert "mask AP" not in (tmp_path / "box" / "logbook.md").read_text()


def test_paired_delta_uses_only_common_seeds():
    d = paired_delta({0: 5.0, 1: 7.0, 2: 100.0}, {0: 4.0, 1: 5.0})
    assert d["seeds"] == [0, 1] and d["mean"] == pytest.approx(1.5) and d["std"] == pytest.approx(np.std([1, 2],
                                                                                                      ddof=1))
    assert paired_delta({}, {0: 1.0})["n"] == 0


def test_add_external_run(tmp_path):
    plan = load_plan(write_plan(tmp_path / "p.yaml", [{"name": "base"}], seeds=[0]), check_configs=False)
    out = tmp_path / "out"
    _fake_run(out, "base", 0, 10.0, {"crack": 10.0})
    ext = tmp_path / "elsewhere"
    ext.mkdir()
    (ext / "eval_results.json").write_text(json.dumps({"bbox": {"AP": 13.0, "AP-crack": 12.0}}))
    (ext / "config.yaml").write_text("SEED: 0\n")
    ablation.add_external_run(str(out), "mine", str(ext), plan)
    summary = summarize(plan, str(out))
    row = summary["rows"][-1]
    assert row["name"] == "mine" and row["stats"]["AP"]["delta"]["mean"] == pytest.approx(3.0)
    # remembered for later reports
    assert summarize(plan, str(out))["rows"][-1]["name"] == "mine"
    with pytest.raises(PlanError, match="no eval_results.json"):
        ablation.add_external_run(str(out), "empty", str(tmp_path), plan)


# ---------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def grid(synthetic_root, tmp_path_factory):
    """2 seeds of: a cascade, an eval-only copy of it (no change), a diverging variant; 2 runs at once."""
    tmp = tmp_path_factory.mktemp("ablation")
    plan = write_plan(tmp / "plan.yaml", [
        {"name": "cascade", "purpose": "tiny cascade"},
        {"name": "same", "purpose": "re-evaluation of cascade", "from": "cascade", "eval_only": True},
        {"name": "boom", "purpose": "diverges", "overrides": {"SOLVER.BASE_LR": 1.0e8}},
        {"name": "thr", "purpose": "tuned thresholds", "from": "cascade", "eval_only": True, "tune_thresholds": True},
        {"name": "tta", "purpose": "flip TTA", "from": "cascade", "eval_only": True,
         "overrides": {"TEST.AUG.ENABLED": True, "TEST.AUG.MIN_SIZES": "(96,)", "TEST.AUG.FLIP": True}},
    ])
    out = tmp / "out"
    proc = run_tool(["--plan", plan, "--output", out, "--jobs", "2"], synthetic_root)
    return plan, out, proc


def test_grid_runs_every_seed_and_writes_the_logbook(grid):
    plan, out, proc = grid
    for v in ("cascade", "same", "boom", "thr", "tta"):
        for s in (0, 1):
            st = json.loads((out / v / f"seed{s}" / ablation.STATUS_FILE).read_text())
            assert st["seed"] == s and st["variant"] == v
            assert f"SEED {s} " in " ".join(st["command"]) + " "
    # the seed reaches the run
    assert yaml.safe_load((out / "cascade" / "seed1" / "config.yaml").read_text())["SEED"] == 1
    md = (out / "logbook.md").read_text()
    assert "10 of 10 runs finished" in md and "(partial)" not in md
    assert "logbook.md (10/10 runs finished)" in proc.stdout


def test_tuned_thresholds_and_tta_variants(grid):
    _, out, _ = grid
    rows = {r["name"]: r for r in json.loads((out / "logbook.json").read_text())["rows"]}
    for s in (0, 1):
        st = json.loads((out / "thr" / f"seed{s}" / ablation.STATUS_FILE).read_text())
        assert st["status"] == "ok", st
        thresholds = yaml.safe_load(st["command"][st["command"].index("MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS") + 1])
        assert len(thresholds) == 6 and all(t >= 0.001 for t in thresholds)  # tuned, never below the model's
        cfg = yaml.safe_load((out / "thr" / f"seed{s}" / "config.yaml").read_text())
        assert cfg["MODEL"]["ROI_HEADS"]["SCORE_THRESH_PER_CLASS"] == thresholds
    # the TTA row reports the TTA evaluation, not the plain one written next to it
    assert rows["tta"]["result"] == "tta"
    for s in (0, 1):
        tta = json.loads((out / "tta" / f"seed{s}" / "eval_tta_results.json").read_text())["bbox_TTA"]["AP"]
        assert rows["tta"]["stats"]["AP"]["values"][str(s)] == pytest.approx(tta)


def test_diverged_run_is_a_row_and_the_grid_goes_on(grid):
    _, out, _ = grid
    st = json.loads((out / "boom" / "seed0" / ablation.STATUS_FILE).read_text())
    assert st["status"] == "diverged" and st["reason"].startswith("diverged at iter ")
    row = [l for l in (out / "logbook.md").read_text().splitlines() if "| boom |" in l][0]
    assert "0/2; seed 0: diverged at iter" in row


def test_eval_only_variant_evaluates_the_same_seeds_checkpoint(grid):
    _, out, _ = grid
    def dets(v, s):
        return json.loads((out / v / f"seed{s}" / "inference" / "synthetic_defects_val" /
                           "coco_instances_results.json").read_text())
    for s in (0, 1):
        st = json.loads((out / "same" / f"seed{s}" / ablation.STATUS_FILE).read_text())
        assert "--eval-only" in st["command"]
        assert st["command"][st["command"].index("MODEL.WEIGHTS") + 1] == str(out / "cascade" / f"seed{s}" /
                                                                              "model_final.pth")
        a, b = dets("cascade", s), dets("same", s)
        assert len(a) > 0 and a == b  # the same checkpoint, the same detections
    assert dets("cascade", 0) != dets("cascade", 1)  # the seeds did give different models
    row = [r for r in json.loads((out / "logbook.json").read_text())["rows"] if r["name"] == "same"][0]
    assert row["stats"]["AP"]["delta"]["mean"] == 0.0 and row["stats"]["AP"]["delta"]["n"] == 2


def test_concurrent_runs_use_disjoint_cpus(grid):
    _, out, _ = grid
    cpus = [tuple(json.loads((out / v / "seed0" / ablation.STATUS_FILE).read_text())["cpus"])
            for v in ("cascade", "boom")]
    ncpu = len(os.sched_getaffinity(0))
    if ncpu >= 2:
        assert all(len(c) == ncpu // 2 for c in cpus) and {len(set(cpus[0]) & set(cpus[1]))} == {0}
    st = json.loads((out / "cascade" / "seed0" / ablation.STATUS_FILE).read_text())
    assert st["env"]["OMP_NUM_THREADS"] == str(len(st["cpus"]))


def test_rerun_skips_finished_runs_and_resumes_interrupted_ones(grid, synthetic_root, tmp_path):
    import shutil

    plan, out, _ = grid
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    # an interrupted run: no status yet, a checkpoint at iteration 1
    interrupted = copy / "cascade" / "seed1"
    os.remove(interrupted / ablation.STATUS_FILE)
    (interrupted / "last_checkpoint").write_text("model_0000001.pth")
    os.remove(interrupted / "model_final.pth")
    # interrupted before its first checkpoint: logs and metrics, no checkpoint
    early = copy / "cascade" / "seed0"
    for f in [ablation.STATUS_FILE, "last_checkpoint", *[p.name for p in early.glob("model_*.pth")]]:
        os.remove(early / f)
    before = {p: p.stat().st_mtime_ns for p in copy.glob("*/seed*/" + ablation.STATUS_FILE)}
    run_tool(["--plan", plan, "--output", copy], synthetic_root)
    for p, t in before.items():  # finished runs were not run again (diverged ones included)
        assert p.stat().st_mtime_ns == t, p
    log = (interrupted / "run.log").read_text()
    assert "--resume" in log.splitlines()[-1] or "--resume" in log
    assert "Starting training from iteration 2" in log
    assert json.loads((interrupted / ablation.STATUS_FILE).read_text())["status"] == "ok"
    early_log = (early / "run.log").read_text()
    assert "Starting training from iteration 0" in early_log.split("\n$ ")[-1]
    assert json.loads((early / ablation.STATUS_FILE).read_text())["status"] == "ok"


def test_changed_plan_makes_runs_stale_and_rerun_stale_keeps_the_old_folder(grid, synthetic_root, tmp_path):
    import shutil

    plan, out, _ = grid
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    spec = yaml.safe_load(open(plan))
    spec["variants"][0]["overrides"] = {"SOLVER.BASE_LR": 0.004}  # the "cascade" variant changes
    changed = write_plan(tmp_path / "plan.yaml", spec["variants"], seeds=spec["seeds"])
    before = {p: p.stat().st_mtime_ns for p in copy.glob("*/seed*/" + ablation.STATUS_FILE)}
    # without --rerun-stale: nothing runs, the changed runs and the evaluations of them leave the logbook
    proc = run_tool(["--plan", changed, "--output", copy], synthetic_root)
    assert {p: p.stat().st_mtime_ns for p in copy.glob("*/seed*/" + ablation.STATUS_FILE)} == before
    assert "no longer match the plan" in proc.stderr and "cascade/seed0: config changed: SOLVER.BASE_LR" in proc.stderr
    rows = {r["name"]: r for r in json.loads((copy / "logbook.json").read_text())["rows"]}
    assert rows["cascade"]["done"] == 0 and rows["same"]["done"] == 0 and rows["tta"]["done"] == 0
    assert "seed 1: stale: config changed: SOLVER.BASE_LR (--rerun-stale)" in rows["cascade"]["problems"]
    # "same" inherits cascade's overrides through `from`, so its own config changed as well
    assert rows["same"]["problems"][0].startswith("seed 0: stale: config changed: SOLVER.BASE_LR")
    assert rows["boom"]["problems"][0].startswith("seed 0: diverged")  # unchanged variants are not stale
    # --rerun-stale on seed 0 of cascade and its re-evaluation: the old folders are kept, the new runs use the plan
    old_dets = (copy / "cascade" / "seed0" / "model_final.pth").read_bytes()
    run_tool(["--plan", changed, "--output", copy, "--rerun-stale", "--only", "cascade,same", "--seeds", "0"],
             synthetic_root)
    assert (copy / "cascade" / "seed0.stale1" / "model_final.pth").read_bytes() == old_dets
    assert (copy / "same" / "seed0.stale1" / ablation.STATUS_FILE).is_file()
    cfg = yaml.safe_load((copy / "cascade" / "seed0" / "config.yaml").read_text())
    assert cfg["SOLVER"]["BASE_LR"] == pytest.approx(0.004)
    rows = {r["name"]: r for r in json.loads((copy / "logbook.json").read_text())["rows"]}
    assert rows["cascade"]["done"] == 1 and rows["same"]["done"] == 1  # seed 1 stays stale
    assert rows["same"]["stats"]["AP"]["values"]["0"] == pytest.approx(rows["cascade"]["stats"]["AP"]["values"]["0"])


def test_a_key_added_to_the_project_later_is_not_a_change(tmp_path):
    plan = load_plan(write_plan(tmp_path / "p.yaml", [{"name": "a"}], seeds=[0]))
    spec = plan_runs(plan, str(tmp_path / "out"))[0]
    os.makedirs(spec.out_dir)
    cfg = ablation.variant_config(plan, plan.variants["a"], ["SEED", "0", "OUTPUT_DIR", spec.out_dir])
    tree = yaml.safe_load(cfg.dump())
    del tree["MODEL_EMA"]  # as written by a run made before MODEL_EMA existed (its defaults: EMA off)
    (tmp_path / "out" / "a" / "seed0" / "config.yaml").write_text(yaml.safe_dump(tree))
    assert ablation.run_changes(spec) == []
    tree["SOLVER"]["MAX_ITER"] = 99
    (tmp_path / "out" / "a" / "seed0" / "config.yaml").write_text(yaml.safe_dump(tree))
    assert ablation.run_changes(spec) == ["config changed: SOLVER.MAX_ITER"]


def test_killing_the_runner_loses_nothing(synthetic_root, tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", [{"name": "a"}, {"name": "b", "overrides": {"SOLVER.BASE_LR": 0.002}}],
                      seeds=[0, 1])
    out = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=synthetic_root)
    proc = subprocess.Popen([sys.executable, TOOL, "--plan", plan, "--output", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("*/seed*/" + ablation.STATUS_FILE)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.read_text() for p in out.glob("*/seed*/" + ablation.STATUS_FILE)}
    assert 1 <= len(finished) < 4
    time.sleep(2)  # the run in flight dies with the runner (no orphan keeps writing)
    assert {p: p.read_text() for p in out.glob("*/seed*/" + ablation.STATUS_FILE)} == finished
    run_tool(["--plan", plan, "--output", out], synthetic_root)
    for p, text in finished.items():
        assert p.read_text() == text  # not repeated
    statuses = [json.loads(p.read_text())["status"] for p in out.glob("*/seed*/" + ablation.STATUS_FILE)]
    assert statuses == ["ok"] * 4
    assert "4 of 4 runs finished" in (out / "logbook.md").read_text()


def test_submitit_local_executor_runs_two_runs(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", synthetic_root)
    plan = load_plan(write_plan(tmp_path / "plan.yaml", [{"name": "a"}], seeds=[0, 1]))
    out = tmp_path / "out"
    statuses = run_grid(plan, str(out), launcher="submitit-local", progress=False)
    assert sorted((s["variant"], s["seed"], s["status"]) for s in statuses) == [("a", 0, "ok"), ("a", 1, "ok")]
    assert list((out / "_submitit").iterdir())  # the jobs went through submitit
    summary = summarize(plan, str(out))
    assert summary["rows"][0]["done"] == 2


PLANS = sorted(glob.glob(os.path.join(ROOT, "configs", "ablation", "*.yaml")))


@pytest.mark.parametrize("path", PLANS, ids=os.path.basename)
def test_shipped_plans_build_every_variant(path):
    import torch
    from detectron2.modeling import build_model

    plan = load_plan(path)
    assert plan.baseline in plan.variants
    for v in plan.variants.values():
        if v.eval_only:
            continue
        cfg = ablation.variant_config(plan, v, ["MODEL.DEVICE", "cpu"])
        model = build_model(cfg).eval()
        with torch.no_grad():
            out = model([{"image": torch.zeros(3, 64, 96), "height": 64, "width": 96}])
        assert "instances" in out[0], v.name


def test_shipped_plan_covers_every_trick():
    plan = load_plan(os.path.join(ROOT, "configs", "ablation", "synthetic.yaml"))
    cfgs = {n: ablation.variant_config(plan, v) for n, v in plan.variants.items()}
    has = {
        "faster": lambda c: c.MODEL.ROI_HEADS.NAME == "DefectStandardROIHeads",
        "cascade4": lambda c: len(c.MODEL.ROI_BOX_CASCADE_HEAD.IOUS) == 4,
        "iou": lambda c: c.MODEL.ROI_BOX_HEAD.IOU_BRANCH.ENABLED and c.MODEL.ROI_BOX_HEAD.IOU_BRANCH.SCORE_ALPHA > 0,
        "giou": lambda c: c.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE == "giou",
        "ciou": lambda c: c.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE == "ciou",
        "ohem": lambda c: c.MODEL.ROI_HEADS.SAMPLER == "ohem",
        "soft_nms linear": lambda c: c.MODEL.SOFT_NMS.ENABLED and c.MODEL.SOFT_NMS.METHOD == "linear",
        "soft_nms gaussian": lambda c: c.MODEL.SOFT_NMS.ENABLED and c.MODEL.SOFT_NMS.METHOD == "gaussian",
        "swa": lambda c: c.SOLVER.SWA.ENABLED,
        "ema": lambda c: c.MODEL_EMA.ENABLED,
        "dcn": lambda c: any(c.MODEL.RESNETS.DEFORM_ON_PER_STAGE),
        "copy-paste": lambda c: c.INPUT.COPY_PASTE.ENABLED,
        "multi-scale": lambda c: len(c.INPUT.MIN_SIZE_TRAIN) > 1,
        "vflip/rot90": lambda c: c.INPUT.VFLIP.ENABLED and c.INPUT.ROT90.ENABLED,
        "fcos": lambda c: c.MODEL.META_ARCHITECTURE == "DefectFCOS",
        "defect_rcnn": lambda c: c.MODEL.META_ARCHITECTURE == "DefectRCNN",
        "tta": lambda c: c.TEST.AUG.ENABLED,
    }
    missing = [t for t, f in has.items() if not any(f(c) for c in cfgs.values())]
    assert not missing
    assert any(v.tune_thresholds for v in plan.variants.values())
    base = cfgs[plan.baseline]
    assert len(base.INPUT.MIN_SIZE_TRAIN) == 1  # so that the multi-scale row changes one thing


def test_timings_and_ap_curve_are_read_from_the_run_files(tmp_path):
    plan = load_plan(write_plan(tmp_path / "p.yaml", [{"name": "base"}, {"name": "swa", "result": "swa",
                     "overrides": {"SOLVER.SWA.ENABLED": True}}], seeds=[0]))
    out = tmp_path / "out"
    for name, times, infer in (("base", [0.5, 0.7, 0.6, 9.0], [0.010, 0.030]), ("swa", [0.4], [0.020, 0.050])):
        d = _fake_run(out, name, 0, 10.0, {"crack": 10.0})
        res = json.loads((d / "eval_results.json").read_text())
        res["swa/bbox"] = dict(res["bbox"], AP=12.5)
        (d / "eval_results.json").write_text(json.dumps(res))
        recs = [{"iteration": i, "time": t, "total_loss": 1.0} for i, t in enumerate(times)]
        recs += [{"iteration": 9, "bbox/AP": 3.0}, {"iteration": 19, "bbox/AP": 5.0, "swa/bbox/AP": 6.0}]
        (d / "metrics.json").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        (d / "log.txt").write_text("\n".join(
            f"[x] d2.evaluation.evaluator INFO: Total inference pure compute time: 0:00:01 ({t:.6f} s / iter per "
            "device, on 1 devices)" for t in infer))
    summary = ablation.write_report(plan, str(out))
    base, swa = summary["rows"]
    assert base["stats"]["train_s_per_iter"]["mean"] == pytest.approx(0.65)  # median of the iteration times
    assert base["stats"]["infer_ms_per_image"]["mean"] == pytest.approx(10.0)  # the live model's evaluation
    assert swa["stats"]["infer_ms_per_image"]["mean"] == pytest.approx(50.0)  # the SWA model's evaluation
    assert swa["stats"]["AP"]["mean"] == pytest.approx(12.5)  # result: swa reports model_swa's numbers
    assert base["curves"][0] == [(9, 3.0), (19, 5.0)] and swa["curves"][0] == [(19, 6.0)]
    assert (out / "ap_vs_iter.png").stat().st_size > 1000


def test_failure_reasons(tmp_path):
    (tmp_path / "metrics.json").write_text('{"iteration": 19, "total_loss": 1.0}\n{"iteration": 39}\n')
    assert ablation._failure_reason("x\nFloatingPointError: Loss became infinite or NaN at iteration=93!\n",
                                    str(tmp_path)) == ("diverged", "diverged at iter 93")
    assert ablation._failure_reason("FloatingPointError: Predicted boxes or scores contain Inf/NaN. Training has "
                                    "diverged.", str(tmp_path)) == ("diverged", "diverged at iter 39")
    assert ablation._failure_reason("log\nERROR: config error: X must be ...\n", str(tmp_path)) == \
        ("failed", "config error: X must be ...")
    assert ablation._failure_reason("iter: 119 ...", str(tmp_path), returncode=-11) == \
        ("failed", "killed by SIGSEGV after iter 39")
    assert ablation._failure_reason("Traceback...\nRuntimeError: boom\n", str(tmp_path)) == \
        ("failed", "RuntimeError: boom")


def test_eval_only_runs_never_hold_a_worker_while_training_runs_wait(monkeypatch):
    """With --jobs 2 and, per seed, a training run and an eval-only run of it, both workers train: the eval-only
    runs are queued after every training run, so none of them blocks a worker while training runs wait."""
    import threading
    from types import SimpleNamespace

    active, peak, lock = [0], [0], threading.Lock()
    order = []

    def fake_execute(spec):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0]) if not spec.eval_only else peak[0]
            order.append((spec.variant, spec.seed))
        time.sleep(0.3 if not spec.eval_only else 0.05)
        with lock:
            active[0] -= 1
        return {"variant": spec.variant, "seed": spec.seed, "status": "ok"}

    monkeypatch.setattr(ablation, "execute_run", fake_execute)
    todo = []
    for seed in (0, 1, 2):  # the plan's order: each seed's training run, then its eval-only run
        todo.append(SimpleNamespace(variant="train", seed=seed, eval_only=False, source_dir=None))
        todo.append(SimpleNamespace(variant="evalrow", seed=seed, eval_only=True,
                                    source_dir=os.path.join("out", "train", f"seed{seed}")))
    done = []
    ablation._run_local(todo, 2, 2, 0, done.append)
    assert len(done) == 6 and peak[0] == 2  # two training runs at once
    for seed in (0, 1, 2):  # an eval-only run still starts only after its own training run
        assert order.index(("evalrow", seed)) > order.index(("train", seed))
