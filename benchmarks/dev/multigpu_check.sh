#!/usr/bin/env bash
# One GPU with grad_accum 2 vs two GPUs (DDP, FSDP2) with the same global batch: the losses should agree
# within bf16 noise. Usage: bash benchmarks/dev/multigpu_check.sh CORPUS_DIR OUT_DIR
set -euo pipefail
corpus=$1; out=$2
common=(--preset mini --attention mea --data.corpus "$corpus" --data.seq_len 256 --train.max_steps 30
        --train.batch_size 8 --train.log_every 5 --train.eval_every 30 --train.eval_batches 4
        --train.save_every 30 --device cuda --progress false)
python3 -m mea.cli pretrain --out "$out/one" "${common[@]}" --train.grad_accum 2
torchrun --standalone --nproc_per_node 2 -m mea.cli pretrain --out "$out/ddp" "${common[@]}" --parallel ddp
torchrun --standalone --nproc_per_node 2 -m mea.cli pretrain --out "$out/fsdp" "${common[@]}" --parallel fsdp
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
for run in ("one", "ddp", "fsdp"):
    recs = [json.loads(l) for l in (Path(sys.argv[1]) / run / "metrics.jsonl").read_text().splitlines()]
    print(run, [round(r["loss"], 4) for r in recs if "loss" in r], "val", [round(r["val_loss"], 4) for r in recs if "val_loss" in r])
PY
