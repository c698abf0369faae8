#!/usr/bin/env bash
# Every check that needs a GPU, in one run of under 8 minutes on one GPU:
#   1. the benchmark table on CUDA (HVP cost, solver overhead, peers, memory): benchmarks/run.py
#   2. the robust implicit-Jacobian benchmark on CUDA (batched products, Nyström, Gauss-Newton)
#   3. the vision recipe's BiSSL stage under torchrun with NCCL, in bf16, after its earlier stages
# Results go to $OUT (or benchmarks/results/gpu); each step has its own time limit and a failure
# is reported without stopping the others.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  if timeout "$limit" "$@" >"$out/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
  else
    echo "   FAILED (exit $?) after $((SECONDS - start)) s; tail of $out/$name.log:"
    tail -n 20 "$out/$name.log"
    status=1
  fi
}

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1

step benchmark-table 150 python benchmarks/run.py --quick --device cuda --out "$out"
step robust-ij 150 python benchmarks/robust_ij.py --quick --device cuda --out "$out"

run="$out/vision_run"
small=(--set "run.out_dir=$run" --set run.device=cuda --set pretext.epochs=2
       --set finetune.search_trials=1 --set "finetune.seeds=[0]" --set finetune.epochs=1
       --set finetune.search_epochs=1 --set warmup.epochs=1 --set bissl.alternations=4)
step vision-stages 120 python recipes/vision_bissl.py pretext only-ft head-warmup "${small[@]}"
step bissl-nccl-bf16 90 torchrun --standalone --nproc_per_node 1 recipes/vision_bissl.py bissl \
  "${small[@]}" --set run.bf16=true
cp "$run/digits/bissl/metrics.jsonl" "$out/bissl_nccl_bf16_metrics.jsonl" 2>/dev/null || true
exit $status
