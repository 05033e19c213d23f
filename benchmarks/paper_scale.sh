#!/usr/bin/env bash
# Table IV at 10% at the paper's scale on one lent GPU, in calls of at most 10
# minutes that resume each other (no network there; carry as for accelerator.sh):
#
#   benchmarks/prepare_carry.sh              # here, once: fills .carry/ (ignored)
#   benchmarks/paper_scale.sh OUT            # there; call it again until it exits 0
#   SMOKE=1 benchmarks/paper_scale.sh OUT    # toy sizes on a CPU, same calls
#
# Every call runs `experiments.reproduce --table=IV --points='fraction_0.1*'
# --scale=paper` (VGG-3 width 128, up to 100 epochs with early stopping, ZOO's
# 20,000 iterations, SAMPLE_CHUNK samples in flight) in WORKDIR for at most
# CALL_SECONDS, then stops it with SIGTERM (SIGKILL 30 s later). A push stops at
# the end of its chunk with its finished samples and those in flight saved
# (attack/partial-*); training loses its unfinished epoch (it resumes from the
# newest epoch checkpoint); the grid resumes from its finished stages. WORKDIR
# (default runs/paper_scale, ignored by git) stays on the machine between calls
# while it is held; OUT gets the report, every point's results, the stage log and
# the training metrics each call.
#
# calls.log gets each call's exit status, seconds and host peak RSS (MiB; 0 where
# pgrep is missing).
# Exit status: 0 once the report is written; 75 when the call ran out of time
# (call again); anything else: failed (OUT/reproduce.log says why).
# Data: the carried small copy (15,000 training images), so 10% of airplane is
# N = 150 (400 needs the full copy, which does not fit the carry).
set -uo pipefail

OUT="${1:?usage: benchmarks/paper_scale.sh OUTPUT_FOLDER}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
CARRY="${CARRY:-$ROOT/.carry}"
SITE="${SITE:-$ROOT/.carry/site}"
SMOKE="${SMOKE:-0}"
WORKDIR="${WORKDIR:-$ROOT/runs/paper_scale}"
export TFDS_DATA_DIR="${TFDS_DATA_DIR:-$CARRY/tensorflow_datasets_small}"
export PYTHONUNBUFFERED=1

if [ "$SMOKE" = "1" ]; then
  CALL_SECONDS="${CALL_SECONDS:-60}"
  ARGS=(--scale=smoke)
else
  CALL_SECONDS="${CALL_SECONDS:-510}"
  ARGS=(--scale=paper --sample_chunk_size="${SAMPLE_CHUNK:-256}")
fi

if ! "$PYTHON" -c "import tensorflow_datasets" 2>/dev/null; then
  # shellcheck source=benchmarks/carry.sh
  source "$ROOT/benchmarks/carry.sh"
  [ -d "$SITE/tensorflow_datasets" ] || install_carry > "$OUT/install.log" 2>&1 || {
    echo "install failed: see $OUT/install.log" >&2; exit 1; }
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# The call's host peak RSS: the kernel's high-water mark (VmHWM) of the Python
# process, read every 2 s, since a process stopped at the deadline records nothing.
peak_kib=0
watch_peak() {
  local pid hwm
  for pid in $(pgrep -P "$1" 2>/dev/null); do
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
    [ "${hwm:-0}" -gt "$peak_kib" ] && peak_kib=$hwm
  done
}

start=$(date +%s)
timeout --kill-after=30 "$CALL_SECONDS" "$PYTHON" -m experiments.reproduce \
  --table=IV --points='fraction_0.1*' --dataset=cifar10 --workdir="$WORKDIR" \
  --data_dir="$TFDS_DATA_DIR" --noprogress "${ARGS[@]}" \
  > "$OUT/reproduce.log" 2>&1 &
job=$!
while kill -0 "$job" 2>/dev/null; do watch_peak "$job"; sleep 2; done
wait "$job"
rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  rc=75  # Out of time: what finished is saved; the next call goes on.
fi
echo "call: exit $rc after $(( $(date +%s) - start )) s, host peak RSS" \
  "$(( peak_kib / 1024 )) MiB" | tee -a "$OUT/calls.log"

for item in table_IV grid/events.jsonl train_metrics.json train_history.json; do
  [ -e "$WORKDIR/$item" ] && mkdir -p "$OUT/$(dirname "$item")" &&
    cp -r "$WORKDIR/$item" "$OUT/$(dirname "$item")/"  # into the parent: merges
done
ls "$WORKDIR/grid/done" 2>/dev/null > "$OUT/stages_done.txt"
ls "$WORKDIR"/attack/partial-*/ 2>/dev/null | grep -c '^rows-' \
  > "$OUT/partial_files.txt"
tail -n 3 "$OUT/reproduce.log"
exit "$rc"
