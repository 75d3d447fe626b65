#!/usr/bin/env bash
# Fills deploy/image/wheelhouse/ with wheels of every dependency of multiserve and the chosen
# backends (and of hatchling, which builds multiserve), using this machine's pip and its
# configuration, so that `--build-arg PIP_NO_INDEX=1` builds the image without any index.
#
#   deploy/image/wheelhouse.sh [BACKENDS]   # BACKENDS: "onnx torch python" (default), "onnx", ...
set -euo pipefail
cd "$(dirname "$0")/../.."
backends=${1:-onnx torch python}
wheelhouse=deploy/image/wheelhouse
pip=(python3 -m pip)
[ -x .venv/bin/pip ] && pip=(.venv/bin/pip)
projects=(.)
for backend in $backends; do
    projects+=("backends/$backend")
done
find "$wheelhouse" -name '*.whl' -delete
"${pip[@]}" wheel -qq --wheel-dir "$wheelhouse" --constraint constraints.txt \
    "${projects[@]}" hatchling
# multiserve itself is built from source inside the image, not taken from here.
rm -f "$wheelhouse"/multiserve-*.whl "$wheelhouse"/multiserve_*.whl
echo "$wheelhouse: $(find "$wheelhouse" -name '*.whl' | wc -l) wheels for: . ${backends}"
