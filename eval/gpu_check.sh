#!/bin/bash
# GPU check of the training path (issue 5), run from the repo root on one GPU:
#   bash eval/gpu_check.sh            (OUT=dir for the results; DRY=1 = a tiny CPU rehearsal of the script)
# Phase A: a 116M-parameter backbone (12 x 768) at seq 1024, bf16, IMM, 40 steps with sdpa (data.prefetch 0,
#          then 2) and with flex_attention: tokens/s and MFU from runs/dev/A_*/metrics.jsonl.
# Phase B: the default recipe (configs/default.yaml, default_fm.yaml, pure IMM) at several lengths, all at
#          once on the one GPU, each with its own cosine schedule and the end-of-run evaluation; runs still
#          going at DEADLINE seconds are stopped (their loss curves stay in results.json).
# A folder .whl/ of wheels (for machines without an index) is installed first when present.
set -u
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/devout}; mkdir -p $OUT
LOG=$OUT/log.txt
if [ -z "${DRY:-}" ]; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  fi
  export PYTHONPATH=/tmp/site:$PWD
  PY=python3
  A_STEPS=40; LADDER="${LADDER:-imm:1000 imm:2500 imm:5000 fm:1300 fm:3250 fm:6500 immpure:2500}"; DEADLINE=${DEADLINE:-540}; A_TO=100
  A_ARGS="--model.hidden_size 768 --model.num_layers 12 --model.num_heads 12 --data.seq_len 1024 --data.batch_size 16"
else
  PY=python
  A_STEPS=3; LADDER="imm:3 fm:4 immpure:3"; DEADLINE=400; A_TO=200; A_ARGS="--data.batch_size 2"
fi
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
$PY -c "import torch, transformers, diffusers, accelerate, webdataset; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'tf', transformers.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)" || exit 3
# the default config's shards, made once before the concurrent runs below read them
$PY -c "from mmgen.config import load_config; from mmgen.training.data import ensure_shapes_shards as e; c = load_config('configs/default.yaml'); e(c.data.shapes_dir, num_docs=c.data.num_docs, resolution=c.model.image_size, seed=c.data.seed, samples_per_shard=c.data.samples_per_shard, tasks=c.data.tasks)" || exit 4
echo "[$(el)s] shards ready"
COMMON="--run.output_dir runs/dev --run.checkpoint_every 100000 --run.tracker none"
# Phase A: a 12-layer 768-wide backbone at seq 1024, bf16: sdpa without and with the prefetch thread, then
# flex (tokens/s, MFU from metrics.jsonl)
for spec in sdpa:0 sdpa:2 flex_attention:2; do
  attn=${spec%%:*}; pf=${spec##*:}; [ $pf = 0 ] && attn_name=${attn}_pf0 || attn_name=$attn
  OMP_NUM_THREADS=8 timeout -s KILL $A_TO $PY training/train.py $COMMON --run.name A_$attn_name \
    --model.attn_implementation $attn --data.prefetch $pf $A_ARGS \
    --optim.max_steps $A_STEPS --optim.warmup_steps 5 --run.log_every 10 --run.sample_every 0 --eval.at_end false \
    > $OUT/A_$attn_name.log 2>&1
  rc=$?; echo "[$(el)s] phase A $attn_name rc=$rc"; tail -3 runs/dev/A_$attn_name/metrics.jsonl 2>/dev/null | cut -c1-400
  if [ $attn = sdpa ] && [ $rc -ne 0 ]; then tail -40 $OUT/A_$attn_name.log; exit 5; fi
  [ $rc -ne 0 ] && tail -25 $OUT/A_$attn_name.log
done
# Phase B: the default recipe at several lengths, all at once (accuracy vs steps; each run's own cosine schedule)
pids=""
for spec in $LADDER; do
  kind=${spec%%:*}; steps=${spec##*:}
  case $kind in
    imm) args="--config configs/default.yaml";;
    fm) args="--config configs/default_fm.yaml";;
    immpure) args="--config configs/default.yaml --objective.fm_fraction 0";;
  esac
  name=${kind}_$steps
  OMP_NUM_THREADS=2 $PY training/train.py $args $COMMON --run.name $name --optim.max_steps $steps --data.prefetch 2 \
    --run.sample_every $steps --run.log_every 50 > $OUT/B_$name.log 2>&1 &
  pids="$pids $!"
done
echo "[$(el)s] ladder started: $LADDER"
while [ $(el) -lt $DEADLINE ]; do
  alive=0; for p in $pids; do kill -0 $p 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 5
done
for p in $pids; do kill -9 $p 2>/dev/null; done
echo "[$(el)s] ladder done"
for f in runs/dev/*/metrics.jsonl; do echo "$f: $(tail -1 $f | cut -c1-250)"; done
$PY eval/gpu_summary.py runs/dev $OUT/results.json
} 2>&1 | tee $LOG
for n in imm_5000 fm_6500 imm_2500; do
  g=$(ls runs/dev/$n/samples/*.png 2>/dev/null | tail -1); [ -n "$g" ] && cp $g $OUT/grid_$n.png
done
tar czf $OUT/logs.tgz $OUT/*.log 2>/dev/null; rm -f $OUT/*.log
echo "total $(el)s"
