#!/usr/bin/env bash
# Everything the GPU run needs from a lent GPU, in one call of the device tool (about 8 minutes
# on an H200, under the tool's 10-minute limit per call): the CUDA runs of the Triton tests, then the step benchmarks. Run from the
# repository root on the device machine, whose python3 already has torch, triton, lightning
# and pytest (nothing is installed here):
#
#     bash benchmarks/gpu_session.sh            # writes logs and JSON under $OUT (or ./gpu_out)
#
# Each part has its own time limit, so one that hangs cannot eat the others' time. The
# tables are printed last, short, for the tool's output tail; the full logs are under $OUT.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
STEP="$PY benchmarks/step.py --device cuda"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/versions.txt" 2>&1

# 1. Correctness: every CUDA-parametrized kernel test, the graph captures, the self-check.
timeout 240 $PY -m pytest -q -p no:cacheprovider -n 8 -rs \
  tests/test_triton.py tests/test_triton_amp.py tests/test_fused_clipping.py tests/test_master_weights.py \
  tests/test_selfcheck.py tests/test_tensor_lr.py > "$OUT/tests.txt" 2>&1
echo "tests exit $?" >> "$OUT/tests.txt"

# 2. GPT-2 small (124M params, 148 tensors): every rule, foreach vs triton, torch fused AdamW
#    in the same run, the clipped rows (max_norm 1.0), host launch time per step.
timeout 150 $STEP --width 768 --vocab 50257 --backends auto,foreach,triton --repeats 7 \
  --json "$OUT/gpt2_fp32.json" > "$OUT/gpt2_fp32.txt" 2>&1
timeout 60 $STEP --width 768 --vocab 50257 --dtype bfloat16 --rules adamw,coupled_adam --backends foreach,triton \
  --json "$OUT/gpt2_bf16.json" > "$OUT/gpt2_bf16.txt" 2>&1
# The compiled backend on CUDA (Inductor writes Triton kernels), next to triton and torch fused
# in the same run, with the clipped rows; its first step per bucket compiles (cold cache: the
# compile cost is printed).
timeout 120 $STEP --width 768 --vocab 50257 --rules adamw,coupled_adam --backends compiled,triton --repeats 5 \
  --json "$OUT/gpt2_compiled.json" > "$OUT/gpt2_compiled.txt" 2>&1

# 3. Bandwidth at 1e8 and 1e9 fp32 params (one tensor each: no launch overhead in the way).
timeout 90 $STEP --sizes 100000000 --backends triton --repeats 5 \
  --json "$OUT/1e8.json" > "$OUT/1e8.txt" 2>&1
# 1e9: 16 GB of p, g, m, v per configuration, so a few configurations per process.
timeout 60 $STEP --sizes 1000000000 --rules adamw --backends triton --repeats 5 \
  --json "$OUT/1e9_adamw.json" > "$OUT/1e9_adamw.txt" 2>&1
# The other rules at 1e9 only when asked (ALL_1E9=1): about 4 minutes more than one call allows.
i=0
[ "${ALL_1E9:-0}" = 1 ] && for rules in sgd,momentum,nesterov,adagrad rmsprop,adam,amsgrad nadam,radam,lion yogi,coupled_adam; do
  i=$((i + 1))
  timeout 60 $STEP --sizes 1000000000 --rules $rules --backends triton --no-baselines --repeats 5 \
    --json "$OUT/1e9_$i.json" > "$OUT/1e9_$i.txt" 2>&1
done

cat "$OUT/versions.txt"
tail -n 5 "$OUT/tests.txt"
for f in gpt2_fp32 gpt2_bf16 gpt2_compiled 1e8 1e9_adamw 1e9_1 1e9_2 1e9_3 1e9_4; do
  [ -f "$OUT/$f.txt" ] || continue
  echo "== $f"
  grep -E "^memory ceilings|^\| (torch|adamw|adam |amsgrad|coupled|lion|sgd|momentum|nesterov|adagrad|rmsprop|nadam|radam|yogi)" "$OUT/$f.txt" \
    | cut -c1-160
done
