#!/usr/bin/env bash
# GPU checks, one prepared script for a CUDA machine (run from the repo root): bash tests/gpu/run.sh
# 1. the quickstart on CUDA (bf16 by default, with MFU and data wait in its summary), 2. the end-to-end and resume tests
# on CUDA, 3. python -m utp_dist.bench on ViT-B/16 and ResNet-50 at 224 px from generated JPEGs (plain, Kornia GPU
# augmentation, torch.compile, nvJPEG), 4. the agent's NVML inventory, the system metrics' NVML readings (also in the
# quickstart's system.jsonl) and the CUDA-device check. Logs go to $OUT (default /tmp/gpu-out).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 UTP_DIST_CACHE=/tmp/utp-cache
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
nvidia-smi -L; python -c "import torch, transformers, accelerate, torchmetrics; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'torchmetrics', torchmetrics.__version__)"
python tests/gpu/make_jpegs.py /tmp/gpu-jpegs
# the agent's GPU inventory from the real driver (NVML; the CPU suite uses a fake pynvml) and the CUDA-device check
python - > "$OUT/nvml.log" 2>&1 <<'PY'
import os
from utp_dist.agent.gpus import inventory
from utp_dist.errors import UserError
gpus = inventory("auto")
print("NVML inventory:", gpus)
try:
    inventory(str(len(gpus)))
    print("FAIL: --gpus beyond the driver's GPUs was accepted")
except UserError as err:
    print("--gpus beyond the driver's GPUs refused:", err)
os.environ["UTP_EXPECT_CUDA_DEVICES"] = str(len(gpus))
from utp_dist.train_command import check_expected_devices
check_expected_devices()
print(f"UTP_EXPECT_CUDA_DEVICES={len(gpus)}: the training entry sees them all")
from utp_dist.system_metrics import GpuReader
readings = GpuReader().read()
print("NVML system metrics:", readings)
if not any(key.endswith("/util") for key in readings) or not any(key.endswith("/memory_used_mb") for key in readings):
    print("FAIL: NVML gave no utilisation or memory reading")
PY
echo "nvml exit $?"; cat "$OUT/nvml.log"
timeout 120 python -m utp_dist.train configs/quickstart.yaml output.root="$OUT/quickstart" checkpoint.resume=never 2> "$OUT/quickstart.log"
echo "quickstart exit $?"
# the end-to-end and resume tests on CUDA, before the benchmarks: correctness first if time runs out
timeout 240 python -m pytest -q -x tests/test_gpu_decode.py tests/test_train.py tests/test_resume.py -k "not quickstart and not races and not two_processes" > "$OUT/pytest.log" 2>&1
echo "pytest exit $? ($(tail -1 "$OUT/pytest.log"))"
# python -m utp_dist.bench: model step, data path, end to end and the plain loop, at 224 px from the JPEGs
bench() {  # NAME CONFIG [overrides...]
  local name=$1; shift
  timeout 100 python -m utp_dist.bench "$@" data.root=/tmp/gpu-jpegs --steps 40 --warmup 10 --repeats 1 > "$OUT/bench_$name.log" 2>&1
  echo "bench $name exit $?"
}
# the variants no GPU has measured yet first (the machine's 10-minute call limit may cut the last ones), compile last
bench resnet50_nvjpeg tests/gpu/resnet50.yaml data.decode=gpu
bench vit_b16 tests/gpu/vit_b16.yaml
bench resnet50 tests/gpu/resnet50.yaml
if python -c "import kornia" 2>/dev/null; then
  bench vit_b16_gpu_augment tests/gpu/vit_b16.yaml data.augment=none "data.gpu_augment=[random_resized_crop,horizontal_flip]"
else
  echo "kornia missing on this machine: no data.gpu_augment bench" | tee "$OUT/bench_vit_b16_gpu_augment.log"
fi
bench vit_b16_nvjpeg tests/gpu/vit_b16.yaml data.decode=gpu
bench resnet50_compile tests/gpu/resnet50.yaml train.compile=true
echo; echo "== summary =="
python - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
for path in glob.glob(f"{out}/quickstart/logs/*/*/summary.json"):
    s = json.load(open(path))
    print(f"quickstart: val acc@1 {s['best']['value']:.4f}, test acc@1 {s['test'].get('test_acc@1', float('nan')):.4f}, "
          f"{s['train_img_per_s']:.0f} img/s, data wait {s.get('data_wait_fraction', 0):.1%}, MFU {s.get('mfu') or 0:.1%}, "
          f"wall {s['wall_time_s']:.1f}s, {s['mixed_precision']} on {s['device']}")
for path in glob.glob(f"{out}/quickstart/logs/*/*/system.jsonl"):
    samples = [json.loads(line) for line in open(path)]
    gpu = sorted({k for s in samples for k in s if k.startswith("gpu")})
    print(f"quickstart system.jsonl: {len(samples)} samples, GPU series {gpu or 'NONE (FAIL)'}, last {samples[-1] if samples else '-'}")
for name in ("resnet50_nvjpeg", "vit_b16", "resnet50", "vit_b16_gpu_augment", "vit_b16_nvjpeg", "resnet50_compile"):
    if not os.path.exists(f"{out}/bench_{name}.log"):
        print(f"-- {name}: not run (the script was stopped before it)"); continue
    lines = open(f"{out}/bench_{name}.log").read().splitlines()
    print(f"-- {name}"); print("\n".join(line for line in lines if line.startswith("|") or "bottleneck" in line or "kornia" in line))
PY
