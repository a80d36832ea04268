#!/bin/bash
# The reference environment of the dense fixtures: mmdetection 2.28.2 and mmsegmentation 0.30.0 on mmcv-full 1.7.2
# built as pure Python (MMCV_WITH_OPS=0), in a virtual environment of its own, never the project's.
#   bash scripts/dense_reference/install_reference_env.sh [VENV]   (default /work/envs/mmref)
# Measured on the 2-core VM (shared): 1 min 41 s, torch 2.14.1 / torchvision 0.29.1 taken from the machine's disk.
set -euo pipefail
VENV=${1:-/work/envs/mmref}
HERE=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s)
python3.11 -m venv "$VENV"
P="$VENV/bin/pip"
# constraints.txt: torch 2.14.1 wants setuptools>=77, mmcv's setup.py imports pkg_resources (gone in setuptools 81);
# numpy<2 for mmcv 1.x; opencv-python<4.11 (newer ones require numpy>=2)
C="-c $HERE/constraints.txt"
$P install -q --upgrade 'pip<25' $C
$P install -q $C torch==2.14.1 torchvision==0.29.1 'numpy<2' 'setuptools>=77.0.3,<81' wheel timm safetensors 'opencv-python<4.11'
echo "torch: $(( $(date +%s) - T0 ))s"
# mmcv-full's sdist names itself 'mmcv' when built without ops, and pip then rejects it as 'mmcv-full==1.7.2':
# download the sdist under its own name (metadata only, no build: MMCV_WITH_OPS=1), install the file without ops
DL=$(mktemp -d)
MMCV_WITH_OPS=1 $P download -q $C --no-deps --no-binary :all: --no-build-isolation -d "$DL" mmcv-full==1.7.2
MMCV_WITH_OPS=0 $P install -q $C --no-build-isolation "$DL"/mmcv-full-1.7.2.tar.gz
echo "mmcv: $(( $(date +%s) - T0 ))s"
$P install -q $C mmdet==2.28.2 mmsegmentation==0.30.0
echo "all: $(( $(date +%s) - T0 ))s"
