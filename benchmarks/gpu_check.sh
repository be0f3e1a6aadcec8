#!/usr/bin/env bash
# The prepared GPU check of issue 14: one script, <= 8 minutes on one CUDA GPU, results as JSON in OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR            # on a CUDA machine (the `device` tool: OUTDIR=$OUT)
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh /tmp/gc   # a dry run of the same steps on a CPU
#
# Steps (each writes OUTDIR/<step>.json or .log; OUTDIR/gpu_check.json sums them up):
#   1. the tests marked `gpu` (pytest -m gpu)
#   2. `anymc3d demo --device cuda` (generated data, real EfficientNet-Lite0 weights)
#   3. CPU-vs-GPU equality of the demo plugin's probabilities (max |difference|, target <= 1e-3)
#   4. throughput: prediction slices/s and training-step ms per slice, efficientnet_lite0 and
#      dinov2_vitl14 (random weights) at 224² (benchmarks/runtime_speed.py)
#   5. `anymc3d plan --device cuda` on the demo's data (issue 15): on a GPU the plan must be the
#      paper's recipe (full-depth LoRA, augmentation, the backbone's slice size); plan.json + a check
# Python packages the GPU machine lacks (monai, nibabel, SimpleITK, pydicom, grad-cam, ...) must be
# importable: carry them as wheels (see docs/results.md, "GPU check") and set PYTHONPATH before.
set -uo pipefail
OUTDIR=${1:?usage: gpu_check.sh OUTDIR}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
t0=$(date +%s)
status() { echo "{\"step\": \"$1\", \"rc\": $2, \"seconds\": $3}" > "$OUTDIR/$1.json"; }

# 1. tests marked gpu
s=$(date +%s)
$PY -m pytest -q -m gpu tests/test_runtime.py -rs > "$OUTDIR/tests_gpu.log" 2>&1; rc=$?
status tests_gpu $rc $(( $(date +%s) - s ))

# 2. the demo on the device
s=$(date +%s)
if [ "$QUICK" = 1 ]; then DEMO_ARGS="--cases 24 --epochs 1"; else DEMO_ARGS=""; fi
$PY -m anymc3d.cli demo --device "$DEVICE" --out "$OUTDIR/demo" $DEMO_ARGS > "$OUTDIR/demo.log" 2>&1; rc=$?
status demo $rc $(( $(date +%s) - s ))

# 3. CPU vs device probabilities of the demo's plugin on its test volumes
s=$(date +%s)
$PY - "$OUTDIR" "$DEVICE" > "$OUTDIR/equality_result.json" 2> "$OUTDIR/equality.log" <<'PYEOF'
import json, sys
from pathlib import Path
import numpy as np
from anymc3d.data import load_manifest
from anymc3d.predict import load
out, device = Path(sys.argv[1]), sys.argv[2]
cases = [c for c in load_manifest(out / "demo" / "data" / "manifest.csv").cases if c.split == "test"]
p = {d: load(out / "demo" / "plugin", device=d).runtime.predict(cases)[0][:, 0] for d in ("cpu", device)}
diff = float(np.abs(p["cpu"] - p[device]).max())
print(json.dumps({"n": len(cases), "device": device, "max_abs_diff": diff, "target": 1e-3, "ok": diff <= 1e-3}))
PYEOF
rc=$?
status equality $rc $(( $(date +%s) - s ))

# 5. the training plan on the device (issue 15)
s=$(date +%s)
$PY -m anymc3d.cli plan "$OUTDIR/demo/data/manifest.csv" --device "$DEVICE" --out "$OUTDIR/plan" > "$OUTDIR/plan.log" 2>&1 \
  && $PY -c "
import json, sys
p = json.load(open('$OUTDIR/plan/plan.json'))
ok = p['lora_last_k'] is None and p['augment'] and p['size'] == 224 if '$DEVICE'.startswith('cuda') else True
print(json.dumps({'plan': {k: p[k] for k in ('device', 'size', 'views', 'lora_last_k', 'augment', 'slice_subset', 'epochs', 'estimate_s')}, 'paper_recipe': ok}))
sys.exit(0 if ok else 1)" > "$OUTDIR/plan_result.json"; rc=$?
status plan $rc $(( $(date +%s) - s ))

# 4. throughput table
s=$(date +%s)
: > "$OUTDIR/throughput.jsonl"
if [ "$QUICK" = 1 ]; then SIZE=64; VIT=dinov2_vits14; VIT_SIZE=56; SL=8; else SIZE=224; VIT=dinov2_vitl14; VIT_SIZE=224; SL=32; fi
$PY benchmarks/runtime_speed.py --device "$DEVICE" --size $SIZE --slices $SL --batch 8 >> "$OUTDIR/throughput.jsonl" 2>> "$OUTDIR/throughput.log"
$PY benchmarks/runtime_speed.py --device "$DEVICE" --size $SIZE --slices $SL --batch 8 --lora-last-k 1 >> "$OUTDIR/throughput.jsonl" 2>> "$OUTDIR/throughput.log"
$PY benchmarks/runtime_speed.py --device "$DEVICE" --backbone $VIT --weights random --size $VIT_SIZE --slices $SL \
    --batch 4 >> "$OUTDIR/throughput.jsonl" 2>> "$OUTDIR/throughput.log"; rc=$?
status throughput $rc $(( $(date +%s) - s ))

$PY - "$OUTDIR" > "$OUTDIR/gpu_check.json" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
res = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "gpu_check"}
res["throughput_rows"] = [json.loads(l) for l in (out / "throughput.jsonl").read_text().splitlines() if l.strip()]
print(json.dumps(res, indent=2))
PYEOF
echo "gpu_check: $(( $(date +%s) - t0 )) s; results in $OUTDIR/gpu_check.json"
cat "$OUTDIR/gpu_check.json"
