#!/usr/bin/env bash
# One device run: the GPU tests, then every benchmark, most important first, each under its own time limit and
# all under one deadline. JSON lines go to $OUT/results.jsonl, every part's output to $OUT/suite.log.
#
#   DATA=.gpu OUT=/tmp/suite DEADLINE_S=580 [ONLY="stages training"] bash bench/gpu_suite.sh
#
# DATA holds photos/ (the shared photos), vgg19_normalised_relu3_1.pth (+ .json) and style.jpg; bench/gpu_prepare.sh
# makes it, and .whl/ with the wheels the device's Python lacks.
set -u
OUT=${OUT:-/tmp/gpu-suite}
DATA=${DATA:-.gpu}
PY=${PY:-python3}
DEADLINE=$(( $(date +%s) + ${DEADLINE_S:-580} ))
ONLY=${ONLY:-}  # space-separated part names to run (default: all)
SCALE=${SCALE:-1}  # 0 for a quick dry run on a CPU
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # keeps carried wheels' folder
mkdir -p "$OUT"

part() {
  local name=$1 limit=$2; shift 2
  if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then return; fi
  local left=$(( DEADLINE - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then echo "== $name skipped: out of time" | tee -a "$OUT/suite.log"; return; fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/suite.log"
  local start=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/part.log" 2>&1
  local rc=$?
  cat "$OUT/part.log" >> "$OUT/suite.log"
  grep '^{' "$OUT/part.log" | sed "s/^{/{\"part\": \"$name\", /" >> "$OUT/results.jsonl"
  local util
  util=$([[ -f "$OUT/gpu_util.txt" ]] && awk -v a="$start" -v b="$(date +%s)" \
    '$1 >= a && $1 <= b && $2 ~ /^[0-9]+$/ {s += $2; n++} END {if (n) printf "%.0f", s / n}' "$OUT/gpu_util.txt")
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"gpu_util_pct\": ${util:-null}}" \
    >> "$OUT/results.jsonl"
  tail -4 "$OUT/part.log"
  rm -f "$OUT/part.log"
}

if (( SCALE )); then
  N1=1000; N10=10000; N100=100000; SIZES=256,512,1024; BATCHES=1,8,64; PRESET=full; BUDGET=15; LIMIT=""; SIZE=512; SHARD=250
  CROP=256; CROP_BATCH=8; LARGE="--width 6000 --height 4000"
else
  N1=40; N10=80; N100=160; SIZES=64,96; BATCHES=1,2; PRESET=fast; BUDGET=3; LIMIT="--train-limit 8"; SIZE=64; SHARD=20
  CROP=64; CROP_BATCH=2; LARGE="--width 600 --height 400"
fi
VGG=$DATA/vgg19_normalised_relu3_1.pth
# The GPU's busy share (nvidia-smi's utilization.gpu, every ~0.2 s) while each part runs: where end to end falls
# short of the model, it says whether the GPU or the host is what waits.
if command -v nvidia-smi > /dev/null; then
  ( while :; do
      printf '%s %s\n' "$(date +%s.%N)" "$(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits 2> /dev/null | head -1)"
      sleep 0.2
    done ) > "$OUT/gpu_util.txt" 2> /dev/null &
  SAMPLER=$!
  trap 'kill $SAMPLER 2> /dev/null' EXIT
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; $PY -c "import torch, torchvision, sys;
print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.is_available())"; } >> "$OUT/suite.log"

# -v: each test's outcome as it finishes, so a run cut short by its limit still says which passed (72 s on 2 CPU cores)
part tests 120 $PY -m pytest -v --noconftest -p no:cacheprovider tests/test_engine.py tests/test_model.py tests/test_stylize.py \
  tests/test_tiling.py tests/test_workers.py
# One process's ceiling (the engine on bytes in memory, compiled, each codec choice) against each stage alone.
part stages 90 $PY bench/engine_stages.py --images $N1 --size $SIZE --compile --photos $DATA/photos
# End to end, compiled, GPU decode, JPEG encoding split between nvjpeg and the CPU threads (the default): 1, 2 and 4
# worker processes sharing the GPU; then 4 with every JPEG encoded by nvjpeg (before the split: 845 img/s once
# started on an H100) and 4 with every JPEG encoded on the CPU.
E2E="$PY bench/engine_throughput.py --images $N10 --size $SIZE --compile --shard-size $SHARD --photos $DATA/photos --work /tmp/eb"
part e2e_10k_compiled_gpu_decode 70 $E2E --workers 1
part e2e_10k_compiled_workers2_gpu_decode 60 $E2E --workers 2
part e2e_10k_compiled_workers4_gpu_decode 60 $E2E --workers 4
part e2e_10k_compiled_workers4_gpu_decode_nvjpeg_only 60 $E2E --workers 4 --gpu-encode-share 1
part e2e_10k_compiled_workers4_gpu_decode_cpu_codec 60 $E2E --workers 4 --no-gpu-codec
part model_speed 90 $PY bench/model_speed.py --sizes $SIZES --batches $BATCHES --unets 16x2,16x4 --repeats 5 --compile
# Scaling: 100k images with the fastest of the 10k runs above (peak RSS and img/s against that 10k run).
BEST=$([[ -f "$OUT/results.jsonl" ]] && $PY - "$OUT/results.jsonl" $N10 <<'PICK'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
runs = [r for r in runs if r.get("bench") == "engine_throughput" and r["images"] == int(sys.argv[2]) and r["compile"]]
if runs:
    best = max(runs, key=lambda r: r["e2e_steady_img_per_s"])
    share = best.get("gpu_encode_share")
    print(f"--workers {best['workers']}" + " --no-gpu-decode" * (not best["gpu_decode"]) + " --no-gpu-codec" * (not best["gpu_codec"])
          + (f" --gpu-encode-share {share}" if share is not None and best["gpu_codec"] else ""))
PICK
)
part e2e_100k_compiled_best 170 $PY bench/engine_throughput.py --images $N100 --size $SIZE --compile ${BEST:---workers 4} \
  --shard-size $SHARD --photos $DATA/photos --work /tmp/eb
part training 240 $PY bench/training_speed.py --photos $DATA/photos --style $DATA/style.jpg --vgg-weights $VGG --preset $PRESET $LIMIT \
  --sheet "$OUT/training_sheet.jpg" --save-model "$OUT/model"
part e2e_10k_compiled_workers8_gpu_decode 60 $E2E --workers 8
part peer_quality 90 $PY bench/peer_quality.py --photos $DATA/photos --style $DATA/style.jpg --vgg-weights $VGG \
  --budget-s $BUDGET --size $CROP --batch $CROP_BATCH --unets 16x2x3,16x4x3 --priming-share 0.02 --sheet "$OUT/peer_sheet.jpg"
part large_image 40 $PY bench/large_image.py $LARGE --budgets 0,4194304
part e2e_10k_compiled_cpu_decode 60 $PY bench/engine_throughput.py --images $N10 --size $SIZE --compile --no-gpu-decode --shard-size $SHARD \
  --photos $DATA/photos --work /tmp/eb
part e2e_1k 40 $PY bench/engine_throughput.py --images $N1 --size $SIZE --photos $DATA/photos --work /tmp/eb
# Prefect's share of a 10k run: alternated loop / flow pairs. Only where prefect is importable: the device image has
# none, so this is the suite's second call, carrying .pfw (gpu_prepare.sh) instead of .gpu and .whl.
if $PY -c "import prefect" 2> /dev/null; then
  part prefect_overhead 280 $PY bench/bucket_throughput.py --images $N10 --size $SIZE --batch 0 --workers 4 \
    --shard-size $SHARD --runs loop-local,flow-local,loop-local,flow-local
fi
echo "== done; $(( DEADLINE - $(date +%s) ))s before the deadline" | tee -a "$OUT/suite.log"
