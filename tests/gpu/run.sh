#!/usr/bin/env bash
# GPU checks, one prepared script for a CUDA machine (run from the repo root): bash tests/gpu/run.sh
# 1. the quickstart on CUDA (bf16 by default), 2. utp_dist vs a plain PyTorch loop on ViT-B/16 and ResNet-50
# at 224 px from generated JPEGs, 3. the end-to-end and resume tests on CUDA. Logs go to $OUT (default /tmp/gpu-out).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 UTP_DIST_CACHE=/tmp/utp-cache
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
nvidia-smi -L; python -c "import torch, transformers, accelerate, torchmetrics; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'torchmetrics', torchmetrics.__version__)"
python tests/gpu/make_jpegs.py /tmp/gpu-jpegs
timeout 120 python -m utp_dist.train configs/quickstart.yaml output.root="$OUT/quickstart" checkpoint.resume=never 2> "$OUT/quickstart.log"
echo "quickstart exit $?"
for model in vit_b16 resnet50; do
  timeout 200 python benchmarks/plain_vs_utp.py tests/gpu/$model.yaml --repeats 1 > "$OUT/bench_$model.log" 2>&1
  echo "bench $model exit $?"
done
timeout 150 python -m pytest -q -x tests/test_train.py tests/test_resume.py -k "not quickstart and not races and not two_processes" > "$OUT/pytest.log" 2>&1
echo "pytest exit $? ($(tail -1 "$OUT/pytest.log"))"
echo; echo "== summary =="
python - "$OUT" <<'PY'
import glob, json, sys
out = sys.argv[1]
for path in glob.glob(f"{out}/quickstart/logs/*/*/summary.json"):
    s = json.load(open(path))
    print(f"quickstart: val acc@1 {s['best']['value']:.4f}, test acc@1 {s['test'].get('test_acc@1', float('nan')):.4f}, "
          f"{s['train_img_per_s']:.0f} img/s, wall {s['wall_time_s']:.1f}s, {s['mixed_precision']} on {s['device']}")
for model in ("vit_b16", "resnet50"):
    lines = open(f"{out}/bench_{model}.log").read().splitlines()
    print(f"-- {model}"); print("\n".join(line for line in lines if "img/s" in line or "ratio" in line or "hardware" in line))
PY
