#!/usr/bin/env bash
# The Fashion-MNIST method sweep (docs/results.md section 2) and the 10-epoch demo (section 1), every
# (method, eps, seed) run as its own `atas compare` process, JOBS at a time; then both reports.
#
#   bash benchmarks/fmnist_sweep.sh OUT_DIR [JOBS] [extra key=value overrides for every run]
#
# Work is queued seed-major (every cell's seed 0 first), so a sweep cut short still has every cell.
# Re-running it trains nothing that finished (atas compare re-uses finished runs).
set -u
OUT=${1:-reports}; JOBS=${2:-2}; shift $(( $# > 2 ? 2 : $# ))
EXTRA="$*"
METHODS=${METHODS:-"pgd elle elle_a atas fgsm_rs n_fgsm grad_align fgsm_pgi"}
EPS=${EPS:-"0.1 0.2 0.3"}
SEEDS=${SEEDS:-"0 1 2"}
N=${N_EXAMPLES:-1000}
SWEEP="fmnist model.arch=wong_cnn train.progress=false eval.batch_size=1000"
mkdir -p "$OUT/logs"
{
  [ -z "${NO_DEMO:-}" ] && for m in atas fgsm_rs; do
    echo "demo $m 0.2 0 fmnist train.progress=false eval.batch_size=1000"; done
  for s in $SEEDS; do for e in $EPS; do for m in $METHODS; do
    echo "sweep $m $e $s $SWEEP"; done; done; done
} > "$OUT/queue.txt"
run_one() {  # kind method eps seed recipe overrides...
  kind=$1 m=$2 e=$3 s=$4; shift 4
  dest="$OUT/fmnist-$kind"
  OMP_NUM_THREADS=1 python -m atas compare "$@" $EXTRA "train.seed=$s" --methods "$m" --eps "$e" --seeds 1 \
    --attacks clean,fgsm,pgd,aa --n-examples "$N" --out "$dest" > "$OUT/logs/$kind-$m-$e-$s.log" 2>&1
  echo "$(date +%T) $kind $m eps $e seed $s: exit $?"
}
export -f run_one; export OUT EXTRA N
xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _ < "$OUT/queue.txt"
# One report per grid, from the finished run folders (runs cut short are listed as not finished).
python -m atas compare $SWEEP $EXTRA --methods "$(echo $METHODS | tr ' ' ,)" --eps "$(echo $EPS | tr ' ' ,)" \
  --seeds "$(echo $SEEDS | wc -w)" --attacks clean,fgsm,pgd,aa --n-examples "$N" --out "$OUT/fmnist-sweep" --report-only \
  > "$OUT/logs/report-sweep.log" 2>&1
[ -z "${NO_DEMO:-}" ] && python -m atas compare fmnist train.progress=false eval.batch_size=1000 $EXTRA \
  --methods atas,fgsm_rs --attacks clean,fgsm,pgd,aa --n-examples "$N" --out "$OUT/fmnist-demo" --report-only \
  > "$OUT/logs/report-demo.log" 2>&1
echo "reports: $OUT/fmnist-sweep/report.md $OUT/fmnist-demo/report.md"
