#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install everything d2_defects needs.
#
#   bash bootstrap.sh            # .venv/ next to this file
#   VENV=/path/to/env bash bootstrap.sh   # reuse an existing environment (e.g. one with a CUDA
#                                         # detectron2 build): torch and detectron2 are kept if they import
#
# Idempotent: a second run with everything in place only checks a stamp and returns.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.d2_defects-bootstrap"
want_stamp="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-oracles.txt" "$ROOT/detectron2.lock" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] \
   && "$PY" -c "import detectron2.modeling, d2_defects" 2>/dev/null; then
  echo "[bootstrap] $VENV is up to date"
  exit 0
fi

if [[ ! -x "$PY" ]]; then
  echo "[bootstrap] creating virtualenv $VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade "pip<27"
fi
PIP=("$PY" -m pip install -q --disable-pip-version-check)

pin() { grep -E "^$1([=<>]|$)" "$ROOT/requirements.txt" | head -1; }

# torch: keep a working one (a user's CUDA build), otherwise the pinned builds.
if "$PY" -c "import torch, torchvision.ops; torchvision.ops.nms(torch.zeros(1,4), torch.zeros(1), 0.5)" 2>/dev/null; then
  echo "[bootstrap] torch already works: $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "[bootstrap] installing $(pin torch) $(pin torchvision)"
  "${PIP[@]}" "$(pin torch)" "$(pin torchvision)"
fi

echo "[bootstrap] installing pinned dependencies"
grep -vE '^\s*(#|$)|^torch(vision)?[=<>]' "$ROOT/requirements.txt" > "$VENV/.reqs.txt"
"${PIP[@]}" -r "$VENV/.reqs.txt"

# test oracles (sahi's slicing): their own folder, no dependencies resolved, invisible to pip check
echo "[bootstrap] installing test oracles into $VENV/oracles"
"${PIP[@]}" --no-deps --upgrade --target "$VENV/oracles" -r "$ROOT/requirements-oracles.txt"

# detectron2: keep a working one, otherwise repack the pure-Python wheel (see detectron2.lock).
if "$PY" -c "import detectron2.modeling, detectron2.engine" 2>/dev/null; then
  echo "[bootstrap] detectron2 already importable: $("$PY" -c 'import detectron2; print(detectron2.__file__)')"
else
  # shellcheck disable=SC1090
  source <(grep -E '^[a-z0-9_]+=' "$ROOT/detectron2.lock")
  work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
  echo "[bootstrap] fetching $name==$version and repacking it without the compiled _C"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$python_tag" \
        -d "$work/dl" "$name==$version"
  whl="$(ls "$work"/dl/*.whl)"
  got="$(sha256sum "$whl" | cut -d' ' -f1)"
  if [[ "$got" != "$sha256" ]]; then
    echo "[bootstrap] ERROR: $whl has sha256 $got, expected $sha256 (detectron2.lock)" >&2
    exit 1
  fi
  "$PY" -m wheel unpack -d "$work/unpacked" "$whl" >/dev/null
  tree="$(ls -d "$work"/unpacked/*/)"
  rm -f "$tree"/detectron2/_C.*.so
  rm -rf "$tree/tools"
  distinfo="$(ls -d "$tree"/*.dist-info)"
  sed -i '/^tools$/d' "$distinfo/top_level.txt"
  sed -i 's/^Tag: .*/Tag: py3-none-any/; s/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' "$distinfo/WHEEL"
  sed -i 's/^Requires-Dist: numpy<2.*/Requires-Dist: numpy/' "$distinfo/METADATA"
  mkdir -p "$work/packed"
  "$PY" -m wheel pack -d "$work/packed" "$tree" >/dev/null
  "${PIP[@]}" "$(ls "$work"/packed/*.whl)"
fi

echo "[bootstrap] installing d2_defects (editable)"
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
"$PY" -m pip check
"$PY" -c "import detectron2.modeling, d2_defects; print('[bootstrap] ok: detectron2', detectron2.__version__)"
echo "$want_stamp" > "$STAMP"
