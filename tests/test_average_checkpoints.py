"""tools/average_checkpoints.py against torch.optim.swa_utils.AveragedModel, and its errors."""
import importlib.util
import os
import subprocess
import sys

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from conftest import ROOT
from d2_defects.checkpoint import DefectCheckpointer
from d2_defects.engine.swa import average_checkpoint_files

TOOL = os.path.join(ROOT, "tools", "average_checkpoints.py")
# the tool is a script, not a package module: load it from its file (in-process runs are much faster)
_spec = importlib.util.spec_from_file_location("average_checkpoints", TOOL)
average_checkpoints = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(average_checkpoints)


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))


def _save(model, tmp_path, name):
    DefectCheckpointer(model, save_dir=str(tmp_path)).save(name, iteration=1)
    return tmp_path / f"{name}.pth"


def test_average_matches_averaged_model_and_loads(tmp_path):
    torch.manual_seed(0)
    net = _net()
    oracle = AveragedModel(net, use_buffers=True)
    paths = []
    for i in range(4):
        with torch.no_grad():
            for t in list(net.parameters()) + [net[1].running_mean]:
                t.add_(torch.randn_like(t))
        net(torch.randn(2, 3, 4, 4))
        oracle.update_parameters(net)
        paths.append(_save(net, tmp_path, f"model_{i}"))
    ref = oracle.module.state_dict()
    average = average_checkpoint_files([str(p) for p in paths], progress=False)  # the library function
    for k, v in ref.items():
        if v.is_floating_point():
            torch.testing.assert_close(average[k], v, rtol=0, atol=1e-6, msg=k)
    out = tmp_path / "sub" / "avg.pth"
    proc = _run(*paths, "-o", out)
    assert proc.returncode == 0, proc.stderr
    data = torch.load(out, weights_only=True)
    assert data["num_averaged"] == 4
    ref = oracle.module.state_dict()
    for k, v in ref.items():
        if v.is_floating_point():
            torch.testing.assert_close(data["model"][k], v, rtol=0, atol=1e-6, msg=k)
    # a Detectron2-style checkpoint: loads into the model through the project's checkpointer
    fresh = _net()
    DefectCheckpointer(fresh).load(str(out))
    assert torch.equal(fresh[0].weight, data["model"]["0.weight"])

    # never overwrites without --overwrite
    before = out.read_bytes()
    proc = _run(*paths[:2], "-o", out)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == before
    assert _run(*paths[:2], "-o", out, "--overwrite").returncode == 0
    assert out.read_bytes() != before


def test_mismatched_checkpoints_are_refused(tmp_path, capsys):
    torch.manual_seed(0)
    a = _save(_net(), tmp_path, "a")
    wide = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(16, 2))
    b = _save(wide, tmp_path, "b")
    c = _save(nn.Sequential(nn.Conv2d(3, 4, 3)), tmp_path, "c")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    for args, expected in [((a, b), f"{b}: 0.weight has shape (5, 3, 3, 3)"),
                           ((a, c), f"{c}: parameter names differ from {a}"),
                           ((a, bad), str(bad)),
                           ((a, tmp_path / "missing.pth"), "checkpoint not found"),
                           ((a,), "at least two")]:
        code = average_checkpoints.main([*map(str, args), "-o", str(tmp_path / "out.pth")])
        stderr = capsys.readouterr().err
        errors = [l for l in stderr.splitlines() if l.startswith("ERROR:")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], stderr
        assert not (tmp_path / "out.pth").exists()


def test_help():
    proc = _run("--help")
    assert proc.returncode == 0 and "--overwrite" in proc.stdout
