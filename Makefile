# xwin.cu
#   make            the GPU programs when nvcc is present, else the CPU programs
#   make cpu        the same programs for the CPU (g++ -O3 -fopenmp)
#   make gpu        the GPU programs (GPU_ARCH=90 to override the detected architecture)
#   make test       build and run every test on the CPU; installs Debian's catch2 when root
#   make clean

CXX ?= g++
NVCC ?= nvcc
CXXFLAGS = -std=c++17 -O3 -march=native -fopenmp -Wall -Wextra -Werror
TEST_CXXFLAGS = -std=c++17 -O2 -fopenmp -Wall -Wextra -Werror
# the GPU's compute capability (e.g. 80, 90), or sm_80 when no GPU can be asked
GPU_ARCH ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.' | grep -E '^[0-9]+$$' || echo 80)
NVCCFLAGS = -std=c++17 -O3 -arch=sm_$(GPU_ARCH) -Xcompiler -fopenmp,-Wall,-Wextra -Werror all-warnings
NVCC_FOUND := $(shell command -v $(NVCC) 2>/dev/null)

# programs, each built from <name>_SRC
PROGRAMS = logprobs
logprobs_SRC = dev/logprobs.cu
BENCH = dev/bench_step.cu

TESTS = build/test_llm
TEST_SRC = test/test_main.cpp test/test_ops.cpp test/test_llama.cpp test/test_tokenizer.cpp
CATCH_HEADER = /usr/include/catch2/catch.hpp

.PHONY: all cpu gpu test deps clean

ifneq ($(NVCC_FOUND),)
all: gpu
else
all: cpu
	@echo "nvcc not found: built the CPU programs"
endif

# each program is one .cu file; g++ reads it as C++ (-x c++), nvcc as CUDA
cpu: llm.cu
	$(foreach p,$(PROGRAMS),$(CXX) $(CXXFLAGS) -x c++ $($(p)_SRC) -o $(p) &&) true

gpu: llm.cu
	$(foreach p,$(PROGRAMS),$(NVCC) $(NVCCFLAGS) $($(p)_SRC) -o $(p) &&) true

# the CPU benchmark of dev/bench_cpu.py
bench_step: $(BENCH) llm.cu
	$(CXX) $(CXXFLAGS) -x c++ $(BENCH) -o $@

# Debian's catch2 (v2, single header). Installed here when root; otherwise the command is printed.
deps:
	@if [ ! -f $(CATCH_HEADER) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing catch2 from Debian"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq catch2) >/dev/null || exit 1; \
	  else \
	    echo "error: Catch2 is missing. Install it with: sudo apt-get install catch2"; exit 1; \
	  fi; \
	fi

build/test_llm: $(TEST_SRC) test/fixture.h llm.cu | deps
	@mkdir -p build
	$(CXX) $(TEST_CXXFLAGS) $(TEST_SRC) -o $@

test: deps $(TESTS)
	@bash test/run_all.sh $(TESTS)

clean:
	rm -rf build logprobs bench_step
