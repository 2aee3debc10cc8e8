#!/usr/bin/env bash
# dev/gpu_check.sh [OUT_FOLDER]: the device check, one command on a machine with an NVIDIA GPU.
#
#   1. machine.txt     the GPU (nvidia-smi), nvcc, the commit
#   2. build.log       make gpu (every program, -j as many cores as there are)
#   3. test-gpu.log    make test-gpu: every kernel test the emulation runs, on the GPU, in BF16
#                      and FP32, then dev/bench_gpu.py: each op and a whole step beside PyTorch
#                      (SDPA attention); its table is copied to gpu_bench.txt
#   4. train_sft.log   20 steps of ./train_sft on a TinyLlama-shaped model with random weights
#                      (dev/random_model.py: 1.1B parameters, B 4 x T 2048 of random tokens)
#                      under Nsight Systems when nsys is installed (train_sft.nsys-rep and its
#                      summary nsys_summary.txt), else plainly, and says so
# Every log goes to OUT_FOLDER (default dev/gpu_check/<UTC time>); each part has its own time
# limit so that the whole check ends within 8 minutes, and a part that fails or times out is
# reported and the next one still runs. The closing line counts the parts that passed.
set -u
cd "$(dirname "$0")/.."
out=${1:-dev/gpu_check/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out"
passed=0
failed=0

# part NAME LIMIT_S COMMAND...: runs COMMAND into $out/NAME.log within LIMIT_S seconds
part() {
    local name=$1 limit=$2
    shift 2
    local start=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - start ))
    if [ $rc -eq 0 ]; then
        passed=$((passed + 1))
        echo "gpu_check: $name passed in $took s ($out/$name.log)"
    else
        failed=$((failed + 1))
        [ $rc -eq 124 ] && echo "gpu_check: $name timed out after $limit s ($out/$name.log)" || echo "gpu_check: $name failed with exit code $rc after $took s ($out/$name.log)"
        tail -n 5 "$out/$name.log" | sed 's/^/    /'
    fi
    return $rc
}

if ! nvidia-smi -L > /dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU found (nvidia-smi lists none): this check needs one"
    exit 1
fi
{ nvidia-smi; echo; nvcc --version; echo; echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"; } > "$out/machine.txt" 2>&1
echo "gpu_check: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n 1), logs in $out"

jobs=$(nproc)
part build 240 make -j"$jobs" gpu
part test-gpu 300 make -j"$jobs" test-gpu
[ -f dev/gpu_bench.txt ] && cp dev/gpu_bench.txt "$out/gpu_bench.txt"

model="$out/tinyllama.bin" tokens="$out/tokens.tok"
if part random_model 120 python3 dev/random_model.py tinyllama "$model" --tokens "$tokens" --seqs 80 --len 2048; then
    sft=(./train_sft -e "$model" -i "$tokens" -j '' -p '' -s 0 -b 4 -d 4 -t 2048 -x 20 -v 0 -n 0 -o "$out/sft")
    if command -v nsys > /dev/null 2>&1; then
        part train_sft 180 nsys profile --force-overwrite true --trace cuda,nvtx -o "$out/train_sft" "${sft[@]}" &&
            nsys stats --report cuda_gpu_kern_sum,nvtx_sum --format csv "$out/train_sft.nsys-rep" > "$out/nsys_summary.txt" 2>&1
    else
        echo "gpu_check: nsys not found: train_sft runs without the profiler (install Nsight Systems for the kernel summary)"
        part train_sft 180 "${sft[@]}"
    fi
    rm -f "$model" "$tokens"  # 2.2 GB of random weights: not worth keeping
fi
echo "gpu_check: $passed passed, $failed failed"
[ $failed -eq 0 ]
