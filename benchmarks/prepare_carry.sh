#!/usr/bin/env bash
# Fills .carry/ (ignored by git) with what benchmarks/accelerator.sh needs on an
# accelerator machine without network: the wheels the data loader needs that such
# a machine lacks, and the small CIFAR-10 copy.
#
#   benchmarks/prepare_carry.sh               # wheels for Python 3.12 + this python
#   CARRY_PYTHONS="3.12" benchmarks/prepare_carry.sh
#   DATA_SRC=../shared/tensorflow_datasets_small benchmarks/prepare_carry.sh
#
# .carry/wheels  tensorflow-datasets and array-record (tfds.data_source; no
#                TensorFlow), their small pure dependencies that the accelerator
#                image (WORKSPACE.md, "Running on a GPU") does not hold, and dm-pix;
#                binary wheels for every Python in CARRY_PYTHONS. accelerator.sh
#                installs them with pip --no-index --find-links, which picks the
#                wheel of the Python it runs.
# .carry/tensorflow_datasets_small   a copy of DATA_SRC (15,000/3,000 CIFAR-10).
#
# Needs pip and an index here (the ordinary client). Fails if the total exceeds
# the 64 MiB a device call may carry with the working tree.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$ROOT/.carry"
PYTHON="${PYTHON:-python3}"
LOCAL_PY="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
CARRY_PYTHONS="${CARRY_PYTHONS:-3.12 $LOCAL_PY}"
DATA_SRC="${DATA_SRC:-$ROOT/../shared/tensorflow_datasets_small}"
LIMIT_MIB="${LIMIT_MIB:-60}"

# Pure-python wheels (one version each; the accelerator image lacks them).
PURE=(tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 immutabledict==4.3.1
      toml==0.10.2 termcolor==3.3.0 simple-parsing==0.1.9 docstring-parser==0.18.0
      googleapis-common-protos==1.76.0 importlib-resources==7.1.0 dm-pix==0.4.5)
# Binary wheels, one per Python version.
BINARY=(array-record==0.8.6 dm-tree==0.1.10)
# Only an sdist on PyPI: built into a pure wheel here.
SDIST=(promise==2.3)

rm -rf "$CARRY/wheels"
mkdir -p "$CARRY/wheels"
cd "$CARRY"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d wheels "${PURE[@]}"
for version in $(echo "$CARRY_PYTHONS" | tr ' ' '\n' | sort -u); do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d wheels "${BINARY[@]}"
done
"$PYTHON" -m pip wheel -q --no-deps -w wheels "${SDIST[@]}"

if [ ! -f "$DATA_SRC/cifar10/3.0.2/dataset_info.json" ]; then
  echo "prepare_carry: no prepared cifar10 under DATA_SRC=$DATA_SRC" >&2
  exit 1
fi
rm -rf "$CARRY/tensorflow_datasets_small"
cp -r "$DATA_SRC" "$CARRY/tensorflow_datasets_small"

total_kib=$(du -sk "$CARRY" | cut -f1)
echo "prepare_carry: $(ls wheels | wc -l) wheels ($(du -sh wheels | cut -f1)), data" \
     "$(du -sh tensorflow_datasets_small | cut -f1); .carry is $((total_kib / 1024)) MiB" \
     "(Pythons: $CARRY_PYTHONS)"
if [ "$total_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "prepare_carry: .carry exceeds $LIMIT_MIB MiB; carry fewer Pythons" \
       "(CARRY_PYTHONS=3.12)" >&2
  exit 1
fi
