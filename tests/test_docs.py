"""The docs keep up with the code: every config key the project adds is documented, every file a command in the
docs' code blocks runs exists, and every relative link resolves."""
import glob
import os
import re

import pytest
from detectron2.config import get_cfg

from conftest import ROOT
from d2_defects.config import add_defects_config

DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md"),
                                                                  os.path.join(ROOT, "datasets", "README.md")]


def _keys(node, prefix=""):
    for k, v in node.items():
        if hasattr(v, "items"):
            yield from _keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _text():
    return "\n".join(open(p, encoding="utf-8").read() for p in DOCS)


def test_every_added_config_key_is_documented():
    added = sorted(set(_keys(add_defects_config(get_cfg()))) - set(_keys(get_cfg())) - {"MODEL.DEVICE"})
    assert len(added) > 50
    text = _text()
    missing = []
    for key in added:
        node, leaf = key.rsplit(".", 1)
        # the full name, or the leaf in a keys table of its node (`LEAF` next to a mention of NODE)
        if key in text or (f"`{leaf}`" in text and node in text) or f"{node}.*" in text and f"`{leaf}" in text:
            continue
        missing.append(key)
    assert not missing, f"config keys not in docs/*.md or README.md: {missing}"


def _code_blocks(path):
    text = open(path, encoding="utf-8").read()
    return re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_commands_in_docs_name_existing_files(path):
    missing = []
    for block in _code_blocks(path):
        for m in re.finditer(r"(?:python3?|bash)\s+((?:tools|benchmarks|datasets)/[\w./-]+\.(?:py|sh)|train_net\.py"
                             r"|bootstrap\.sh)", block):
            if not os.path.isfile(os.path.join(ROOT, m.group(1))):
                missing.append(m.group(1))
        for m in re.finditer(r"--(?:config-file|plan)\s+(configs/[\w./{},-]+\.yaml)", block):
            if "{" not in m.group(1) and not os.path.isfile(os.path.join(ROOT, m.group(1))):
                missing.append(m.group(1))
    assert not missing, f"{os.path.relpath(path, ROOT)} runs files that do not exist: {missing}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    text = open(path, encoding="utf-8").read()
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        if not os.path.exists(os.path.join(os.path.dirname(path), target)):
            broken.append(target)
    assert not broken, f"{os.path.relpath(path, ROOT)} links to missing files: {broken}"
