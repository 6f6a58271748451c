#!/usr/bin/env bash
# Issue 20's comparison on one shipped teacher, as measured for the README: the final-sample objective from the
# searched mask at 0.6 / 0.7 / 0.8 of the MACs x router seeds 0, 1, 2 (on the DiT also at lr 1e-2 at 0.8), the
# converged L2C demo recipe, the budget-conditioned and IEPO objectives (seeds 0, 1, 2), converged L2C at two
# more lambdas (seed 0), every baseline on the same 1,000 samples; then one table + PNG.
#   bash scripts/issue20_runs.sh dit|uvit [out dir]      (DRY=1: print the commands only)
# One job at a time, one thread (OMP_NUM_THREADS=1): ~7-10 min per run on the 2-core dev machine, ~3 h in all
# (baseline rows are measured by the first run and reused from compare.cache_dir by the others).
set -euo pipefail
arch=${1:?dit or uvit}; out=${2:-logs/issue20_$arch}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$arch" = dit ]; then steps='[10,11,12,14,16]'; kept='[0.1887,0.3915,0.5944]'; lams='1e-5 1e-3'
else steps='[12,14,16]'; kept='[0.0449,0.2837,0.5225]'; lams='0.01 1.0'; fi   # kept: cache-step MACs for 0.6 / 0.7 / 0.8 of the sampler's
common=(experiment=mnist_$arch compare.num_samples=1000 "compare.search.budgets=[0.6,0.7,0.8]"
        "compare.steps=$steps" trainer.limit_val_batches=0 paths.log_dir="$out/logs")
mkdir -p "$out"; spec="$out/runs.json"; echo "[" > "$spec.tmp"; sep=""
run() {  # run NAME SEED overrides...: train + compare, then note the run folder and its router seed
  local name=$1 seed=$2; shift 2
  if [ -n "${DRY:-}" ]; then echo python train.py "${common[@]}" "$@" seed="$seed"; return; fi
  python train.py "${common[@]}" "$@" seed="$seed" 2>&1 | tee "$out/$name.log"
  local dir; dir=$(sed -n 's/^saved: \(\S*\)\/comparison.md.*/\1/p' "$out/$name.log")
  printf '%s{"dir": "%s", "seed": %d}\n' "$sep" "$dir" "$seed" >> "$spec.tmp"; sep=","
}
traj=(module.objective=trajectory module.trajectory.init=search data=noise data.batch_size=2 "compare.router_budgets=[]")
for s in 0 1 2; do
  for b in 0.8 0.7 0.6; do run "traj${b/./}_s$s" $s "${traj[@]}" module.trajectory.budget=$b; done
  [ "$arch" = dit ] && run "traj08_lr01_s$s" $s "${traj[@]}" module.trajectory.budget=0.8 module.optimizer.lr=1e-2
  run "l2c_s$s" $s "compare.router_budgets=[]"
  run "budget_s$s" $s module.objective=budget module.draw=trajectory data=noise "compare.router_budgets=$kept"
  run "iepo_s$s" $s module.objective=iepo module.iepo_every=100 module.draw=trajectory data=noise "compare.router_budgets=[]"
done
for lam in $lams; do run "l2c_lam${lam}_s0" 0 "compare.router_budgets=[]" policy.lam=$lam; done
echo "]" >> "$spec.tmp"; mv "$spec.tmp" "$spec"
[ -n "${DRY:-}" ] || python scripts/issue20_table.py "$out/issue20_mnist_${arch}_seeds" "$spec" \
  "MNIST $arch, 1,000 samples (compare seed 4242); router seeds 0-2 (λ sweep: 0); $(git rev-parse --short HEAD)"
