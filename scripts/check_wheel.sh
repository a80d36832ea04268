#!/usr/bin/env bash
# The wheel works on its own: build it, install its lean core alone into a fresh virtual environment outside the
# checkout (no optional package may come with it; a model builds and runs; a feature without its extra says which
# extra to install, in one line), then add every extra (`msconv[all]`) and run the CLI and the Python quick-start
# from a directory that is not the checkout.
#
#   scripts/check_wheel.sh [PYTHON]      (`make wheel-check` runs it with the project's .venv python)
#
# torch/torchvision are installed first at the versions pinned in constraints.txt, so pip serves them from its
# cache; every other dependency is resolved from the wheel's own metadata (constrained likewise).
# WHEEL_CHECK_DIR chooses the scratch folder (default: a new folder under /tmp, removed at the end unless
# KEEP_WHEEL_CHECK=1); WHEEL_CHECK_CORE_ONLY=1 stops after the core checks (tests/test_core_install.py).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${1:-python3}"
WORK="${WHEEL_CHECK_DIR:-$(mktemp -d /tmp/msconv-wheel-check.XXXXXX)}"
mkdir -p "$WORK"
case "$WORK" in "$REPO"|"$REPO"/*) echo "WHEEL_CHECK_DIR must be outside the checkout" >&2; exit 2;; esac
[ "${KEEP_WHEEL_CHECK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

step "build the wheel"
"$PYTHON" -m build --wheel --outdir "$WORK/dist" "$REPO" > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL="$(ls "$WORK"/dist/msconv-*.whl)"
echo "$(basename "$WHEEL")"

step "the wheel's contents"
"$PYTHON" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ['msconv/py.typed', 'msconv_cli/py.typed', 'msconv/__init__.py', 'msconv_cli/__init__.py']
missing = [n for n in need if n not in names]
licence = [n for n in names if n.endswith('.dist-info/licenses/LICENSE')]
stray = [n for n in names if n.split('/')[0] in ('tests', 'benchmarks', 'docs', 'examples', 'scripts')]
print(f"{len(names)} files; licence: {licence}; typed: {[n for n in names if n.endswith('py.typed')]}")
if missing or not licence or stray:
    sys.exit(f"bad wheel: missing {missing}, licence {licence}, files outside the packages {stray}")
meta_name = next(n for n in names if n.endswith('.dist-info/METADATA'))
meta = zipfile.ZipFile(sys.argv[1]).read(meta_name).decode()
fields = {k: [line for line in meta.splitlines() if line.startswith(k + ': ')] for k in
          ('Classifier', 'Project-URL', 'Author', 'Keywords', 'License-Expression', 'Provides-Extra')}
print({k: len(v) for k, v in fields.items()})
absent = [k for k, v in fields.items() if not v]
if absent:
    sys.exit(f"bad wheel: METADATA has no {absent}")
PY

step "a fresh virtual environment: the core alone"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
TORCH_PINS=$(grep -E '^(torch|torchvision)==' "$REPO/constraints.txt" | tr '\n' ' ')
echo "pip install $TORCH_PINS(from the pip cache)"
"$VPY" -m pip install -q $TORCH_PINS
echo "pip install $(basename "$WHEEL")"
"$VPY" -m pip install -q -c "$REPO/constraints.txt" "$WHEEL"

RUN="$WORK/run"
mkdir -p "$RUN"
cd "$RUN"
export PATH="$WORK/venv/bin:$PATH"
unset PYTHONPATH
"$VPY" - "$REPO" <<'PY'
import sys
from pathlib import Path
import msconv, msconv_cli
for m in (msconv, msconv_cli):
    f = Path(m.__file__).resolve()
    assert Path(sys.argv[1]).resolve() not in f.parents, f'{m.__name__} imported from the checkout: {f}'
    print(f'{m.__name__} {getattr(m, "__version__", "")} from {f.parent}')
PY

step "the core's packages: no optional one"
"$VPY" -m pip list --format=freeze --exclude pip --exclude setuptools > "$WORK/core-packages.txt"
echo "$(wc -l < "$WORK/core-packages.txt") packages, $(du -sh "$WORK/venv" | cut -f1) in the virtual environment:"
cut -d= -f1 "$WORK/core-packages.txt" | tr '\n' ' '; echo
"$VPY" - "$WORK/core-packages.txt" <<'PY'
import sys
from msconv._extras import EXTRAS
names = {line.split('==')[0].lower() for line in open(sys.argv[1]) if line.strip()}
optional = sorted(names & {dist for dist, _ in EXTRAS.values()})
assert not optional, f'the core install brought optional packages: {optional}'
PY

step "the core: timm.create_model('smt_tiny') and a forward pass"
"$VPY" - <<'PY'
import msconv, timm, torch

model = timm.create_model('smt_tiny').eval()
with torch.no_grad():
    print(tuple(model(torch.randn(1, 3, 224, 224)).shape))
PY

step "the core: msconv list"
msconv list --family smt
step "the core: msconv profile smt_tiny"
msconv profile smt_tiny
step "the core: a feature without its extra names it in one line"
set +e
msconv export test_smt --img-size 64 --out "$RUN/test_smt.onnx" 2> "$WORK/export.err"
status=$?
set -e
cat "$WORK/export.err"
[ "$status" = 2 ] && [ "$(wc -l < "$WORK/export.err")" = 1 ] && grep -q 'pip install "msconv\[export\]"' "$WORK/export.err"
if [ "${WHEEL_CHECK_CORE_ONLY:-0}" = 1 ]; then step "core checks passed"; exit 0; fi

step "every extra: pip install $(basename "$WHEEL")[all]"
"$VPY" -m pip install -q -c "$REPO/constraints.txt" "$WHEEL[all]"

step "msconv demo (smallest run: one family, 20 steps)"
msconv demo --families smt --epochs 1 --max-steps 20 --no-progress --output "$RUN/demo"
step "msconv export"
msconv export test_smt --img-size 64 --out "$RUN/test_smt.onnx"
test -s "$RUN/test_smt.onnx"
step "the Python quick-start"
"$VPY" - <<'PY'
import msconv, timm, torch

model = msconv.create_model('smt_tiny', num_classes=10)
backbone = timm.create_model('smt_small', features_only=True, out_indices=(1, 2, 3))
feats = backbone(torch.randn(1, 3, 224, 224))
print([tuple(f.shape) for f in feats], backbone.feature_info.channels())
assert backbone.feature_info.channels() == [128, 256, 512]
assert model(torch.randn(2, 3, 224, 224)).shape == (2, 10)
PY
step "wheel check passed"
