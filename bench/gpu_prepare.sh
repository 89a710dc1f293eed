#!/usr/bin/env bash
# What gpu_suite.sh needs on a GPU machine that has PyTorch but neither this project's data nor pydantic:
#   .gpu/  the shared photos (train split, flat), the local VGG file and one style image
#   .whl/  pydantic and its dependencies as wheels for the machine's Python (tasks.secrets imports pydantic)
#   .pfw/  prefect and everything it needs, for the suite's second call (part prefect_overhead): with .gpu it
#          would pass the 64 MiB a device call carries, so that call carries .pfw alone
# All are kept out of git (.git/info/exclude). Run from the repository root, with ../shared beside it:
#
#   bash bench/gpu_prepare.sh [STYLE_NAME] [PYTHON_VERSION]     # defaults: the_scream 3.12
#
# then on the GPU machine: install the wheels into a folder on PYTHONPATH and run the suite, e.g.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   DATA=.gpu OUT=... DEADLINE_S=560 bash bench/gpu_suite.sh
# and, as a second call right after it (carry .pfw; the same install with .pfw/*.whl):
#   ONLY=prefect_overhead DEADLINE_S=... bash bench/gpu_suite.sh
set -euo pipefail
STYLE=${1:-the_scream}
PYTHON_VERSION=${2:-3.12}
SHARED=${SHARED:-../shared/data}
[[ -d "$SHARED/photos/train" ]] || { echo "gpu_prepare: $SHARED/photos/train not found" >&2; exit 1; }

for path in /.gpu/ /.whl/ /.pfw/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
rm -rf .gpu && mkdir -p .gpu
cp -r "$SHARED/photos/train" .gpu/photos
cp "$SHARED"/vgg/vgg19_normalised_relu3_1.* .gpu/
cp "$SHARED/styles/$STYLE.jpg" .gpu/style.jpg

# The same versions as this project's environment, for the device's Python.
versions=$(.venv/bin/python - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in
               ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions")))
EOF
)
rm -rf .whl && mkdir -p .whl
for requirement in $versions; do
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$requirement" > .whl/download.log 2>&1; then
    grep -v "^WARNING: Location" .whl/download.log >&2
    echo "gpu_prepare: no wheel of $requirement for Python $PYTHON_VERSION" >&2
    exit 1
  fi
done
rm .whl/download.log

# prefect with its whole closure, at the versions this project's environment holds.
rm -rf .pfw && mkdir -p .pfw
.venv/bin/python - > .pfw/constraints.txt <<'EOF'
from importlib.metadata import distributions
print("\n".join(sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"] != "stylize"})))
EOF
prefect=$(grep -i '^prefect==' .pfw/constraints.txt)
if ! python3 -m pip download -q --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -c .pfw/constraints.txt -d .pfw "$prefect" > .pfw/download.log 2>&1; then
  grep -v "^WARNING: Location" .pfw/download.log >&2
  echo "gpu_prepare: cannot download $prefect and its needs for Python $PYTHON_VERSION" >&2
  exit 1
fi
rm .pfw/download.log .pfw/constraints.txt
ls .whl
echo "$(ls .pfw | wc -l) wheels in .pfw"
du -sh .gpu .whl .pfw
