# Sourced by benchmarks/accelerator.sh and benchmarks/paper_scale.sh: install_carry
# installs the carried wheels (.carry/wheels, from benchmarks/prepare_carry.sh) with
# pip --no-index into $SITE, a scratch folder the caller puts on PYTHONPATH: nothing
# is fetched, nothing of the accelerator image is replaced. Needs PYTHON, CARRY,
# SITE and ROOT.

install_carry() {
  if [ ! -d "$CARRY/wheels" ]; then
    echo "no $CARRY/wheels: run benchmarks/prepare_carry.sh on a machine with pip" >&2
    return 1
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" --find-links "$CARRY/wheels" \
    tensorflow-datasets tensorflow-metadata array-record dm-tree promise \
    immutabledict toml termcolor simple-parsing docstring-parser \
    googleapis-common-protos importlib-resources dm-pix &&
  PYTHONPATH="$SITE:$ROOT" "$PYTHON" -c \
    "import tensorflow_datasets, array_record, ounl_jax; print('imports ok')"
}
