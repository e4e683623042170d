#!/usr/bin/env bash
# Issue 6 on one GPU, in about 8 minutes: (a) the GPU tests of the head-norm and fold kernels, CUDA-graph
# decoding, the decode kernel (contiguous and paged) and calibration; (b) one attention layer's training
# step at the large shape and the 125m model's (mha, gqa, mha + head norm, mea and mea without the norm,
# MEA also with the matmul fold (MEA_TRITON_FOLD=0), and the head norm with its weight on the tokens instead of folded into
# o_proj; 9 round-robin repeats, then each one's kernels profiled); (e) the whole 125m model's training
# step, the same variants but gqa, 5 round-robin repeats, at 16 and at 32 sequences per step. DECODE=1 adds (c) Transformer.generate with and without CUDA graphs and the decode kernel,
# contiguous and paged, at the main shape.
# Usage: bash benchmarks/dev/gpu_issue6.sh OUT_DIR  (writes env.txt, pytest.log and a .log and a .json
# per benchmark there)
# Each part has its own time limit, so one that hangs cannot eat the others' time; the JSON files
# are written as results come in.
set -uo pipefail
out=${1:?usage: bash benchmarks/dev/gpu_issue6.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
stamp() { echo "[$1: rc=$2 at $((SECONDS - start)) s]" | tee -a "$out/env.txt"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>&1
  python3 -c "import platform, torch, triton; print('python', platform.python_version(), 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name())" 2>&1
  git rev-parse HEAD 2>/dev/null || true
} > "$out/env.txt"

# (a) tests: the GPU-marked ones run here (CI runs the rest on CPU under TRITON_INTERPRET=1).
[ "${TESTS:-1}" = 1 ] && timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -x tests/test_triton_fold.py tests/test_triton_norm.py tests/test_generate_graph.py tests/test_triton_decode.py \
  tests/test_convert.py::test_calibration_on_the_gpu_matches_the_cpu \
  -p no:cacheprovider > "$out/pytest.log" 2>&1
stamp tests $?
tail -n 3 "$out/pytest.log"

# Decoding (generate with CUDA graphs, the decode kernel contiguous and paged) was measured in four sessions
# (docs/performance.md); DECODE=1 measures it again.
if [ "${DECODE:-0}" = 1 ]; then
  # (c) before (b): it compiles nothing with Inductor, so it is quick and its numbers are not at risk.
  timeout 75 python3 benchmarks/decode.py --generate --preset 125m --batch 64 --prompt-len 512 --new-tokens 128 \
    --repeats 3 --gen-variants mea,gqa,mha --out "$out/generate.json" > "$out/generate.log" 2>&1
  stamp generate $?
  tail -n 9 "$out/generate.log"

  # the decode kernel at the main shapes (contiguous), then over a paged cache against the same cache contiguous
  timeout 60 python3 benchmarks/decode.py --shapes main --out "$out/decode_main.json" > "$out/decode_main.log" 2>&1
  stamp decode $?
  tail -n 6 "$out/decode_main.log"
  timeout 60 python3 benchmarks/decode.py --paged 16,64,256 --out "$out/decode_paged.json" > "$out/decode_paged.log" 2>&1
  stamp paged $?
  tail -n 4 "$out/decode_paged.log"
fi

# (b) where MEA's training time goes: one layer at the large shape and at the 125m model's, with the fold
# as Triton kernels (mea.ops.triton_fold, the default) and as GEMMs, then each variant's kernels profiled
# (docs/performance.md reads them).
# ATT_VARIANTS, TP_VARIANTS and TP_BATCHES choose what (b) and (e) time; TESTS=0 skips (a).
timeout 240 python3 benchmarks/attention_train.py --shapes all --repeats 9 \
  --variants "${ATT_VARIANTS:-mha,gqa,mha+norm,mha+norm-unfoldedgain,mea,mea-unfoldedgain,mea-nonorm,mea-matmulfold,mea-nonorm-matmulfold}" \
  --profile --out "$out/attention_train.json" > "$out/attention_train.log" 2>&1
stamp attention_train $?
tail -n 60 "$out/attention_train.log"
# (e) the whole 125m model's training step (the goal's number), round-robin with medians, at 16 and 32 sequences
# per step: a per-step cost (the fold works on weights, not tokens) halves its share at 32.
for b in ${TP_BATCHES:-16 32}; do
  timeout 200 python3 benchmarks/train_throughput.py --compile \
    --only "${TP_VARIANTS:-mha,mha+norm,mha+norm-unfoldedgain,mea,mea-unfoldedgain,mea-nonorm,mea-matmulfold,mea-nonorm-matmulfold}" \
    --repeats 5 --batch $b \
    --out "$out/train_throughput_b$b.json" > "$out/train_throughput_b$b.log" 2>&1
  stamp train_throughput_b$b $?
  tail -n 8 "$out/train_throughput_b$b.log"
done
echo "total $((SECONDS - start)) s"
