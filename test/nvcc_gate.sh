#!/usr/bin/env bash
# The nvcc gate: compiles all CUDA code of the project (llm.cu and every program) with nvcc
# for sm_80 and sm_90, in BF16 and FP32, with warnings as errors; prints the registers,
# shared memory and spills ptxas reports per kernel; fails on any register spill.
# Each (source, architecture, precision) compile counts as one case of the closing line.
# dev/flash_occupancy.cu is linked and run as well: with its ptxas log, dev/occupancy.py prints
# the flash kernels' resident warps per SM, and the case fails if the flash backward keeps fewer
# than 8 warps resident per SM at head size 64 or 128.
set -u
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
# Without nvcc the gate cannot run: it says so and counts as one skipped case (CI's
# machines have the CUDA toolkit, so there it always runs).
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "nvcc_gate: SKIPPED: nvcc not found, so no CUDA code was compiled; install the CUDA toolkit (or set NVCC=/path/to/nvcc) to run the gate"
    echo "nvcc_gate: 0 passed, 0 failed, 1 skipped"
    exit 0
fi
# llm.cu is a header: it is compiled as part of every program that includes it
sources=$(ls ./*.cu dev/*.cu 2>/dev/null | grep -v '^./llm.cu$' | tr '\n' ' ')
table_source=dev/logprobs.cu
occupancy_source=dev/flash_occupancy.cu
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
passed=0
failed=0
for arch in 80 90; do
    for precision in BF16 FP32; do
        flag=""
        [ "$precision" = FP32 ] && flag="-DENABLE_FP32"
        for src in $sources; do
            log="$out/$(basename "$src").$arch.$precision.log"
            # the occupancy program is linked (it runs here, on the host only), the others compiled
            link="-c" obj="$out/obj.o"
            [ "$src" = "$occupancy_source" ] && link="-lgomp" obj="$out/flash_occupancy"
            if "$NVCC" $link -x cu -std=c++17 -O3 -arch=sm_$arch $flag -Xptxas -v -Werror all-warnings \
                -Xcompiler -fopenmp,-Wall,-Wextra "$src" -o "$obj" >"$log" 2>&1; then
                if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" >/dev/null; then
                    echo "FAIL $src sm_$arch $precision: register spills"
                    grep -B2 -E "[1-9][0-9]* bytes spill" "$log"
                    failed=$((failed + 1))
                elif [ "$src" = "$occupancy_source" ] && ! { "$obj" >"$out/blocks.txt" &&
                    python3 dev/occupancy.py --arch "$arch" --ptxas "$log" <"$out/blocks.txt"; }; then
                    echo "FAIL $src sm_$arch $precision: occupancy (above)"
                    failed=$((failed + 1))
                else
                    passed=$((passed + 1))
                fi
            else
                echo "FAIL $src sm_$arch $precision:"
                cat "$log"
                failed=$((failed + 1))
            fi
            # the table, once per architecture and precision (every program holds all kernels)
            if [ "$src" = "$table_source" ]; then
                echo "ptxas, sm_$arch $precision: registers, shared memory, stack, spill stores/loads per kernel"
                awk '
                    /Compiling entry function/ { split($0, q, "\047"); name = q[2] }
                    /bytes stack frame/ { stack = $1; ss = $5; sl = $9 }
                    /Used [0-9]+ registers/ {
                        # "256 bytes smem, 360 bytes cmem[0]" on sm_80, "256 bytes smem" last on sm_90:
                        # the field is matched without its comma (static shared memory only; the
                        # dynamic shared memory of a launch is not known to ptxas)
                        smem = 0
                        for (i = 1; i < NF; i++) {
                            field = $(i + 2)
                            sub(/,$/, "", field)
                            if ($(i + 1) == "bytes" && field == "smem") smem = $i
                        }
                        print name, $5, smem, stack, ss, sl
                    }' "$log" | while read -r name regs smem stack ss sl; do
                        printf "  %-34s %4s regs %6s B smem %4s B stack %s/%s spill\n" "$(echo "$name" | c++filt | sed 's/(.*//')" "$regs" "$smem" "$stack" "$ss" "$sl"
                    done
            fi
        done
    done
done
# The data-parallel GPU path (XWIN_NCCL, XWIN_MPI: NCCL between the GPUs, its id over MPI) is
# compiled once more where NCCL's header and MPI are present (make gpu builds it there), else
# said to be left out.
nccl_header=""
for h in /usr/include/nccl.h /usr/local/include/nccl.h "$(dirname "$(command -v "$NVCC")")/../include/nccl.h"; do
    [ -f "$h" ] && nccl_header=$h && break
done
if [ -n "$nccl_header" ] && command -v mpicc >/dev/null 2>&1; then
    log="$out/nccl.log"
    if "$NVCC" -c -x cu -std=c++17 -O3 -arch=sm_90 -Werror all-warnings -Xcompiler -fopenmp,-Wall,-Wextra -DXWIN_NCCL -DXWIN_MPI \
        $(mpicc --showme:compile | sed "s/-I/-isystem /g") train_sft.cu -o "$out/obj.o" >"$log" 2>&1; then
        passed=$((passed + 1))
    else
        echo "FAIL train_sft.cu sm_90 BF16 with NCCL and MPI ($nccl_header):"
        cat "$log"
        failed=$((failed + 1))
    fi
else
    echo "nvcc_gate: the NCCL path was not compiled: no nccl.h (/usr/include, /usr/local/include, the CUDA toolkit) or no mpicc (libopenmpi-dev)"
fi
echo "nvcc_gate: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
