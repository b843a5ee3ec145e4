#!/bin/bash
# Accuracy vs training compute on one GPU: several small recipes trained at once, each
# exported and scored with eval/quick_t2i.py on the GPU; fp16 copies of the weights come back for deeper
# evaluation elsewhere. Run from the repo root:
#   bash eval/gpu_ladder.sh          (OUT=dir for the results; DRY=1 = a tiny CPU rehearsal of the script)
# Runs still training at TRAIN_DEADLINE seconds are stopped and exported from their newest checkpoint
# (resumed with --optim.max_steps set to that step: no further step, the cosine schedule unfinished).
# ONLY="U64 FM64" keeps those runs; RESUME=1 continues runs already in runs/ladder from their newest checkpoint
# (their old export removed; S64/S16 = the new max_steps, which stretches the cosine schedule from there).
set -u
shopt -s nullglob
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/devout}; mkdir -p $OUT/res
R=runs/ladder
if [ -z "${DRY:-}" ]; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  fi
  export PYTHONPATH=/tmp/site:$PWD
  PY=python3; DEV=cuda; NUM=100; DOCS=20000
  TRAIN_DEADLINE=${TRAIN_DEADLINE:-400}; EVAL_DEADLINE=${EVAL_DEADLINE:-540}
  B64="--data.batch_size 64"; S64=1500; S16=2500; CK=100
  EXTRA="--data.prefetch 2 --data.num_workers 1"
else
  PY=python; DEV=cpu; NUM=4; DOCS=200
  TRAIN_DEADLINE=${TRAIN_DEADLINE:-150}; EVAL_DEADLINE=${EVAL_DEADLINE:-400}
  B64="--data.batch_size 4"; S64=${S64:-4}; S16=${S16:-6}; CK=2
  EXTRA="--model.hidden_size 32 --model.num_heads 2 --model.num_layers 1 --model.image_unet_width 16 --data.batch_size 2"
fi
# name | config | arguments
RUNS="
U16|default|--model.image_head unet --optim.max_steps $S16
U64|default|--model.image_head unet $B64 --optim.max_steps $S64
L64|default|$B64 --optim.max_steps $S64
FM64|default_fm|--model.image_head unet $B64 --optim.max_steps $S64
M2_64|default|--model.image_head unet $B64 --optim.max_steps $S64 --data.max_objects 2 --data.shapes_dir runs/data/m2
S1T64|default|--model.image_head unet $B64 --optim.max_steps $S64 --data.max_objects 1 --data.tasks t2i=1.0 --data.shapes_dir runs/data/m1t2i
"
if [ -n "${ONLY:-}" ]; then
  RUNS=$(echo "$RUNS" | while IFS='|' read -r name rest; do [[ " $ONLY " == *" $name "* ]] && echo "$name|$rest"; done)
fi
if [ -n "${RESUME:-}" ]; then
  for name in $(echo "$RUNS" | cut -d'|' -f1); do rm -rf $R/$name/final; done
else
  rm -rf $R
fi
COMMON="--run.output_dir $R --run.checkpoint_every $CK --run.tracker none --run.sample_every 0 --eval.at_end false --run.log_every 50 --data.num_docs $DOCS $EXTRA"
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
$PY -c "import torch, transformers, accelerate, webdataset; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'tf', transformers.__version__, 'accelerate', accelerate.__version__)" || exit 3
# each shapes_dir built once, in parallel, before the runs read them
MIX="t2i=0.7 caption=0.2 vqa=0.05 multiturn=0.05"
for spec in "runs/data/shapes-train|4|$MIX" "runs/data/m2|2|$MIX" "runs/data/m1t2i|1|t2i=1.0"; do
  IFS='|' read -r dir max tasks <<< "$spec"
  $PY -c "import sys; from mmgen.training.data import ensure_shapes_shards as e
e(sys.argv[1], num_docs=$DOCS, resolution=32, seed=0, max_objects=int(sys.argv[2]), tasks=sys.argv[3:])" \
    $dir $max $tasks > $OUT/res/shards_$(basename $dir).log 2>&1 &
done
wait
echo "[$(el)s] shards ready: $(ls runs/data/*/train-manifest.json | tr '\n' ' ')"
pids=""
while IFS='|' read -r name config args; do
  [ -z "$name" ] && continue
  OMP_NUM_THREADS=2 $PY training/train.py --config configs/$config.yaml $COMMON --run.name $name $args \
    > $OUT/res/train_$name.log 2>&1 &
  pids="$pids $!"
done <<< "$RUNS"
echo "[$(el)s] started:$(echo "$RUNS" | cut -d'|' -f1 | tr '\n' ' ')"
while [ $(el) -lt $TRAIN_DEADLINE ]; do
  alive=0; for p in $pids; do kill -0 $p 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 5
done
for p in $pids; do kill -9 $p 2>/dev/null; done; wait 2>/dev/null
echo "[$(el)s] training stopped"
# runs stopped early: export their newest checkpoint (no further step)
pids=""
while IFS='|' read -r name config args; do
  [ -z "$name" ] && continue
  [ -d $R/$name/final ] && continue
  last=$(ls -d $R/$name/checkpoints/step-* 2>/dev/null | tail -1)
  [ -z "$last" ] && { echo "$name: no checkpoint"; continue; }
  step=$((10#${last##*step-}))
  echo "$name: exporting checkpoint step $step"
  OMP_NUM_THREADS=2 $PY training/train.py --config configs/$config.yaml $COMMON --run.name $name $args \
    --optim.max_steps $step > $OUT/res/export_$name.log 2>&1 &
  pids="$pids $!"
done <<< "$RUNS"
wait $pids 2>/dev/null
echo "[$(el)s] exported: $(ls -d $R/*/final | tr '\n' ' ')"
pids=""
NAMES=$(echo "$RUNS" | cut -d'|' -f1)
for name in $NAMES; do
  d=$R/$name/final; [ -d $d ] || continue
  OMP_NUM_THREADS=2 timeout -s KILL $(( EVAL_DEADLINE - $(el) )) $PY eval/quick_t2i.py --model $d \
    --out $OUT/res/quick_$name.json --steps 1 4 8 --num $NUM --device $DEV --threads 2 > $OUT/res/quick_$name.log 2>&1 &
  pids="$pids $!"
done
wait $pids 2>/dev/null
echo "[$(el)s] evaluated: $(ls $OUT/res/quick_*.json 2>/dev/null | tr '\n' ' ')"
for name in $NAMES; do
  d=$R/$name
  echo "$name: $(tail -1 $d/metrics.jsonl 2>/dev/null | cut -c1-300)"
  cp $d/metrics.jsonl $OUT/res/metrics_$name.jsonl 2>/dev/null
  cp $d/final/config.json $OUT/res/config_$name.json 2>/dev/null
  [ -f $d/final/model.safetensors ] && $PY -c "
import sys; from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1]); save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, sys.argv[2])
" $d/final/model.safetensors $OUT/$name.fp16.safetensors
done
for f in $OUT/res/quick_*.json; do echo "$f: $($PY -c "
import json, sys; d = json.load(open(sys.argv[1])); print({k: round(v['accuracy'], 3) for k, v in d.items() if 'accuracy' in v}, 'sens', round(d['prompt_sensitivity']['ratio'], 2))" $f)"; done
} 2>&1 | tee $OUT/res/log.txt
tar czf $OUT/results.tgz -C $OUT res && rm -rf $OUT/res
ls -la $OUT
echo "total $(el)s"
