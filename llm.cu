/*
llm.cu — the one shared header of xwin.cu: the Llama model, its ops, its file formats.

Every op comes as a plain C++ reference (the spec, templated on the float type so the
tests can run it in double precision against finite differences). The stage programs
(train_sft, train_rm, train_dpo, sample) and the tools in dev/ include this file.

The model computes exactly what Hugging Face transformers' LlamaForCausalLM computes:
  x = wte[tokens]
  for each layer:
    h = rmsnorm(x) * attn_norm
    q, k, v = h @ wq^T, h @ wk^T, h @ wv^T          (grouped-query: KV heads <= H heads)
    q, k = rope(q), rope(k)                         (rotate-half layout, rope_theta, RoPE scaling)
    x = x + causal_softmax_attention(q, k, v) @ wo^T
    h = rmsnorm(x) * mlp_norm
    x = x + (silu(h @ w_gate^T) * (h @ w_up^T)) @ w_down^T
  logits = (rmsnorm(x) * final_norm) @ head^T       (head = wte when tied)

Memory conventions (as in llm.c): parameters, gradients, AdamW moments and activations each
live in one allocation sized from the config, made once; a training step allocates nothing.
Backward functions ACCUMULATE (+=) into parameter gradients and into the gradient of their
input, so gradient accumulation works and the residual stream's gradient flows by itself;
the model's backward zeroes its activation-gradient scratch before it uses it. The one
exception is swiglu_backward, which writes (=) its two gradients: nothing else adds to them,
so they need no zeroing. The model's graph (the trunk's ops, their order and their buffers)
is written once, llama_graph_forward/_backward, over an op set per build (CpuOps, CudaOps).
Every index product is computed in size_t.

Contents, in file order (search for the quoted heading):
  "errors"                  defines: fail_file, string_format, fopen_check, read_lines_checked, fread_check, malloc_check,
                            crc32_update, file_crc32, reserved_bytes_check (one rule: reserved header bytes are zero),
                            AtomicFile (atomic_open, atomic_write, atomic_commit: tmp, fsync, rename)
  "CUDA"                    defines: XWIN_CUDA, LAUNCH, DYNAMIC_SHARED, floatX, cudaCheck, cublasCheck,
                            NVTX_RANGE_FN, NVTX_RANGE (Nsight ranges, compiled away outside nvcc)
  "Model file format"       defines: LlamaConfig, rope_scaling_check, model_header_parse, model_header_write (the 256-byte header)
  "Parameters"              defines: ParamTensors, param_sizes, point_parameters, Carver
  "Ops"                     defines: each op as CPU reference, CUDA kernel, launcher (_cuda), a "---- <op>:" heading each:
                            PARALLEL_MIN_WORK; embedding (embedding_buckets: the GPU's deterministic backward), rmsnorm,
                            matmul (matmul_plain: the spec; matmul_accumulate: matmul_tiles or matmul_blocked, the
                            fast float kernel; matmul_forward_transposed: a weight transposed once), rope (rope_inv_freq: the one
                            place the frequencies are computed, with linear and llama3 scaling; rope_table: cos and
                            sin computed once; rope_forward_at: given positions), attention (attention_forward_plain,
                            attention_backward_plain: the spec; attention_forward_matmul, attention_backward_matmul on the CPU;
                            on the GPU flash_attention_forward_cuda, flash_attention_backward_cuda: FlashAttention-2 on wmma tiles,
                            WarpTile, warp_tile_zero, warp_tile_load, warp_tile_store, warp_tile_mma),
                            kv_cache_write, attention_cached_forward (attention_decode_cuda: split-K), swiglu, residual
                            (fused_residual_rmsnorm_forward: the add and the norm after it in one pass),
                            logprob (block_row_max_sumexp; fused_logprob_nll: the SFT loss's log-probs and d-logits in one pass),
                            sequence_logprob_forward, sequence_logprob_backward (sequence_logprob_forward_cuda, sequence_logprob_backward_cuda: a block per sequence), masked_mean_loss,
                            clip_grad_norm (grad_norm_coef_cuda: the clip folded into AdamW), adamw_update
  "Activations"             defines: ActTensors, GradActTensors and their carving; the model graph, written once
                            for both builds: llama_graph_forward, llama_graph_backward over an op set (CpuOps, CudaOps)
  "The model"               defines: Llama, llama_load, llama_save, llama_alloc, llama_forward, llama_forward_trunk, llama_backward, llama_update,
                            llama_nll_forward_backward (the SFT loss and gradient, the classifier fused)
  "The model on the GPU"    defines: LlamaCuda, GpuMemoryPlan (gpu_memory_plan, gpu_memory_plan_total, gpu_memory_plan_text, gpu_memory_refusal, gpu_memory_require, bytes_text),
                            llama_cuda_init, llama_cuda_forward, llama_cuda_forward_trunk, llama_cuda_backward,
                            llama_cuda_backward_from_dlp (from a dlp on the device), llama_cuda_update, llama_cuda_download,
                            llama_cuda_nll_forward_backward (the SFT loss and gradient: B sums to the host)
  "Running a model"         defines: Runner, runner_init, runner_forward, runner_backward,
                            runner_nll_forward_backward, runner_clip_grad_norm, runner_update, runner_download_params, runner_shard
  "Inference with a KV"     defines: InferStateT, infer_graph_layers (the layers on a cache, over InferCpuOps or
                            InferCudaOps), Infer, infer_init, infer_layers, infer_prefill, infer_decode, infer_sequence_logprobs (CPU);
                            InferCuda, infer_memory_plan, infer_cuda_init, infer_cuda_layers,
                            infer_cuda_prefill, infer_cuda_decode, infer_cuda_sequence_logprobs, infer_cuda_logits;
                            InferRunner, infer_runner_init, infer_runner_prefill,
                            infer_runner_decode, infer_runner_score, infer_runner_sequence_logprobs, infer_runner_copy_sequence, infer_runner_rewind,
                            infer_runner_share_prefix (a prompt forwarded once for all its continuations)
                            (frozen models: a reward model's scores, a policy's log-prob sums, no training state)
  "Token file format"       defines: TokenData, tokens_load, tokens_save, tokens_fill_rows
  "Pair file format"        defines: PairRecord, PairData, pairs_load (preference pairs)
  "Reference log-prob file" defines: ReferenceLogps, model_file_identity, reference_values_crc, reference_save,
                            reference_load_checked
                            (DPO's frozen reference, refused for another model or other pairs)
  "Tensor archive"          defines: ArchiveEntry, archive_load, archive_save
  "Tokenizer"               defines: ChatTemplate (chat_template_parse, chat_template_vicuna, chat_template_check), Tokenizer, tokenizer_load, tokenizer_encode, tokenizer_decode; byte-level BPE (kind 2):
                            unicode_class (tables from dev/make_unicode_tables.py), pretoken_end and pretokenize
                            (the GPT-2 and Llama 3 regexes by hand), bpe_encode_word, tokenizer_encode_bpe
  "Task world"              defines: WORLD_KINDS, WorldPrompt, WORLD_RIGHT_SCORE, world_judge, world_load_prompts
  "The chat template"       defines: ChatSegment, chat_segments, chat_encode_segments, chat_end_id,
                            chat_encode_conversation (ids and loss mask), chat_encode_prompt (ChatTemplate, its file section
                            and checks are in "Tokenizer")
  "Collectives"             defines: Comm, comm_init, comm_free, comm_all_reduce_sum, comm_all_reduce_sum_double, comm_broadcast, comm_barrier
                            (MPI with XWIN_MPI, NCCL with XWIN_NCCL; a world of 1 without a launcher),
                            comm_reduce_sum_host, runner_micro_batch, runner_all_reduce_grads, runner_clip_grads,
                            runner_all_gather_params, ZeRO-2's comm_reduce_scatter_layer_grads, comm_reduce_scatter_rest, comm_reduce_scatter_grads_host;
                            comm_spawn_program (a program on new ranks: the recipe's stages under mpirun),
                            comm_spawned_exit, comm_idle_broadcast, comm_mpi_start, comm_mpi_end
  "Training plumbing"       defines: rng_*, epoch_order, lr_at; Flag, flag_choices, flag_set, flags_parse, fail_flag;
                            TrainConfig, train_flags, RunIdentity, TrainState, state.bin and ZeRO-1's
                            shard files (shard_save, shard_read, shards_load), checkpoint_save, checkpoint_load_state;
                            Trainer: trainer_init, trainer_load_model, trainer_start, trainer_running, trainer_next_rows,
                            trainer_step_end (its step line's mfu_text), trainer_log, trainer_checkpoint, trainer_save_model,
                            trainer_close, trainer_load_pairs, trainer_start_pairs;
                            tokenizer_check_model, tokens_identity, tokens_check_for_training
  "DPO"                     defines: runner_sequence_logprobs, runner_sequence_backward (the GPU moves B sums, not
                            (B, T) log-probs); DPO's losses and metrics are train_dpo.cu's
  "Sampling and generation" defines: SamplerConfig, sample_distribution, sample_token, sample_seed; GenerateConfig,
                            generate (n samples per prompt on an InferRunner, one prefill each, duplicates
                            drawn again), infer_runner_shape, infer_runner_of, infer_runner_from, generate_greedy,
                            generate_greedy_batch, generate_greedy_model,
                            world_prompt_ids, world_scores, world_kind_means, world_evaluate;
                            Json, json_parse, json_append,
                            utf8_repair, json_messages, prompts_load_checked;
                            LogSeries, read_log_series (a metric of a program's log.jsonl)
  "PNG plots"               defines (with XWIN_PLOTS): Plot, plot_init, plot_rect, plot_text, plot_line, plot_save_png;
                            plot_text_wrapped; CurvePanel, draw_training_curves (the recipe's out/curves.png)
*/
#pragma once

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <queue>
#include <string>
#include <type_traits>
#include <vector>
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__FMA__) && !defined(__CUDACC__)
#include <immintrin.h>  // _mm256_fmadd_ps for the matmul's micro-kernel
#endif
#ifdef XWIN_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only: no C++ bindings to link
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif
#if defined(XWIN_NCCL) && !defined(XWIN_NCCL_EMULATION)  // test/nccl_emu.h: NCCL over MPI for the emulated GPU
#include <nccl.h>
#endif

// ----------------------------------------------------------------------------
// errors: one line naming the file or flag and the problem, then exit(1)

[[noreturn]] inline void fail_v(const char* what, const char* fmt, va_list args) {
    fprintf(stderr, "error: %s: ", what);
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    exit(1);
}

// "error: <path>: <problem>", exit 1
[[noreturn]] inline void fail_file(const char* path, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fail_v(path, fmt, args);
}

// "error: -x: <problem>", exit 1: a flag's value is wrong (also for checks after parsing).
[[noreturn]] inline void fail_flag(char letter, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    char flag[3] = {'-', letter, 0};
    fail_v(flag, fmt, args);
}

inline std::string string_format(const char* fmt, ...) {
    va_list args, again;
    va_start(args, fmt);
    va_copy(again, args);
    int n = vsnprintf(nullptr, 0, fmt, args);  // the length first: any length, nothing cut
    va_end(args);
    std::string out(n > 0 ? n : 0, '\0');
    if (n > 0) vsnprintf(&out[0], (size_t)n + 1, fmt, again);
    va_end(again);
    return out;
}

inline FILE* fopen_check(const char* path, const char* mode) {
    FILE* f = fopen(path, mode);
    if (!f) fail_file(path, "cannot open (mode %s): %s", mode, strerror(errno));
    return f;
}

// The lines of a text file (without their '\n', or a final '\r'). Returns "" or what is wrong.
inline std::string read_lines_checked(const char* path, std::vector<std::string>* lines) {
    FILE* f = fopen(path, "rb");
    if (!f) return std::string("cannot open: ") + strerror(errno);
    std::string data;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0) data.append(buf, n);
    bool bad = ferror(f) != 0;
    fclose(f);
    if (bad) return "read error";
    lines->clear();
    for (size_t pos = 0; pos < data.size();) {
        size_t end = data.find('\n', pos);
        if (end == std::string::npos) end = data.size();
        lines->push_back(data.substr(pos, end - pos));
        if (!lines->back().empty() && lines->back().back() == '\r') lines->back().pop_back();
        pos = end + 1;
    }
    return "";
}

inline void fread_check(void* dst, size_t size, size_t count, FILE* f, const char* path) {
    if (fread(dst, size, count, f) != count) fail_file(path, "unexpected end of file or read error");
}

inline void fwrite_check(const void* src, size_t size, size_t count, FILE* f, const char* path) {
    if (fwrite(src, size, count, f) != count) fail_file(path, "write failed: %s", strerror(errno));
}

inline size_t file_size_of(FILE* f) {
    long pos = ftell(f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, pos, SEEK_SET);
    return (size_t)size;
}

inline void* malloc_check(size_t bytes) {
    void* p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "error: out of host memory allocating %zu bytes\n", bytes);
        exit(1);
    }
    return p;
}

// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320, as zlib's crc32): checkpoints carry
// one over each file so that flipped bits are refused on load. crc32_update(0, ...) starts.
inline uint32_t crc32_update(uint32_t crc, const void* data, size_t n) {
    static const struct Table {
        uint32_t t[256];
        Table() {
            for (uint32_t i = 0; i < 256; i++) {
                uint32_t c = i;
                for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
                t[i] = c;
            }
        }
    } table;
    const unsigned char* p = (const unsigned char*)data;
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = table.t[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

// Reserved bytes, one rule for every reader (model, token, pair, reference, tokenizer and
// training-state files): a header's bytes past its last defined field are written as zero and
// read as zero, so that a later version can give them a meaning and an older build refuses
// what it cannot read. Returns "" when h[from, to) is all zero, else the first byte that is not.
inline std::string reserved_bytes_check(const unsigned char* h, size_t from, size_t to) {
    for (size_t i = from; i < to; i++) {
        if (h[i] != 0) return string_format("reserved header byte %zu is 0x%02x, not zero", i, h[i]);
    }
    return "";
}

// The folder part of a path ("." when there is none).
inline std::string dir_of(const std::string& path) {
    size_t slash = path.find_last_of('/');
    return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

// Atomic writes: the bytes go to "<path>.tmp", which is flushed to the disk (fsync) and only
// then renamed over <path>, so a crash or a kill never leaves a half-written file under the
// real name. Every write is checked; a failure removes the .tmp and exits naming <path>.
// The CRC-32 of everything written is kept for checkpoints.
struct AtomicFile {
    FILE* f = nullptr;
    std::string path, tmp;
    uint32_t crc = 0;
};

[[noreturn]] inline void atomic_fail(AtomicFile* a, const char* what, int err) {
    if (a->f) fclose(a->f);
    remove(a->tmp.c_str());
    fail_file(a->path.c_str(), "%s: %s", what, strerror(err));
}

inline void atomic_open(AtomicFile* a, const std::string& path) {
    a->path = path;
    a->tmp = path + ".tmp";
    a->crc = 0;
    a->f = fopen(a->tmp.c_str(), "wb");
    if (!a->f) fail_file(a->path.c_str(), "cannot create %s: %s", a->tmp.c_str(), strerror(errno));
}

inline void atomic_write(AtomicFile* a, const void* src, size_t bytes) {
    if (bytes && fwrite(src, 1, bytes, a->f) != bytes) atomic_fail(a, "write failed", errno);
    a->crc = crc32_update(a->crc, src, bytes);
}

// Flush, fsync, close, rename, then fsync the folder so that the rename itself is durable.
// Returns the CRC-32 of the file's bytes.
inline uint32_t atomic_commit(AtomicFile* a) {
    if (fflush(a->f) != 0 || fsync(fileno(a->f)) != 0) atomic_fail(a, "write failed", errno);
    int rc = fclose(a->f);
    a->f = nullptr;
    if (rc != 0) atomic_fail(a, "write failed", errno);
    if (rename(a->tmp.c_str(), a->path.c_str()) != 0) atomic_fail(a, "cannot rename the .tmp over it", errno);
    int dir = open(dir_of(a->path).c_str(), O_RDONLY);
    if (dir >= 0) fsync(dir), close(dir);
    return a->crc;
}

// The CRC-32 of a whole file, or false when it cannot be read.
inline bool file_crc32(const char* path, uint32_t* crc) {
    FILE* f = fopen(path, "rb");
    if (!f) return false;
    std::vector<unsigned char> buf(1 << 20);
    size_t n;
    *crc = 0;
    while ((n = fread(buf.data(), 1, buf.size(), f)) > 0) *crc = crc32_update(*crc, buf.data(), n);
    bool ok = !ferror(f);
    fclose(f);
    return ok;
}

// bfloat16 <-> float32 on the host (round to nearest even; NaN stays NaN)
inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  // quiet NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}


// ----------------------------------------------------------------------------
// CUDA: compiled by nvcc, and by g++ over the emulation layer of the tests
// (test/cuda_emu.h defines XWIN_CUDA_EMULATION). Every kernel is launched through LAUNCH,
// which nvcc turns into kernel<<<grid, block, shmem, stream>>>(args) and the emulation
// into a run on the CPU. Dynamic shared memory is declared with DYNAMIC_SHARED.

#if defined(__CUDACC__) || defined(XWIN_CUDA_EMULATION)
#define XWIN_CUDA 1
#endif

#if defined(__CUDACC__)
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <nvtx3/nvToolsExt.h>
#ifdef XWIN_COUNT_LAUNCHES  // make test-gpu: the kernel tests check that every kernel was launched
#include <set>
#include <string>
inline std::set<std::string>& launched_kernels() {
    static std::set<std::string> names;
    return names;
}
#define LAUNCH(kernel, grid, block, shmem, stream, ...) \
    (launched_kernels().insert(#kernel), kernel<<<(grid), (block), (shmem), (stream)>>>(__VA_ARGS__))
#else
#define LAUNCH(kernel, grid, block, shmem, stream, ...) kernel<<<(grid), (block), (shmem), (stream)>>>(__VA_ARGS__)
#endif
// (a byte array, so two kernels may give their dynamic shared memory one name and two types;
// 128-byte aligned, as the flash kernels' wmma tiles need at least 32)
#define DYNAMIC_SHARED(type, name)                                             \
    extern __shared__ __align__(128) unsigned char xwin_dynamic_smem_##name[]; \
    type* const name = reinterpret_cast<type*>(xwin_dynamic_smem_##name)
#endif

#ifdef XWIN_CUDA
// Precision: BF16 weights and activations by default, FP32 with -DENABLE_FP32
// (make PRECISION=FP32). Master weights, gradients, AdamW state and every reduction stay FP32.
#ifdef ENABLE_FP32
typedef float floatX;
#define CUBLAS_FLOATX CUDA_R_32F
#else
typedef __nv_bfloat16 floatX;
#define CUBLAS_FLOATX CUDA_R_16BF
#endif

inline void cuda_check(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess) {
        fprintf(stderr, "error: CUDA at %s:%d: %s\nHINT: run under compute-sanitizer to find the failing kernel\n", file, line, cudaGetErrorString(err));
        exit(1);
    }
}
#define cudaCheck(call) cuda_check((call), __FILE__, __LINE__)

inline void cublas_check(cublasStatus_t status, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "error: cuBLAS at %s:%d: status %d\nHINT: check the matrix shapes and leading dimensions\n", file, line, (int)status);
        exit(1);
    }
}
#define cublasCheck(call) cublas_check((call), __FILE__, __LINE__)

// NVTX ranges name the work in Nsight Systems (nsys) and Nsight Compute (ncu --nvtx):
// NVTX_RANGE_FN() opens every launcher and names the range after it until the function returns;
// NVTX_RANGE(format, ...) names the rest of a scope, e.g. a layer with its index. Compiled away
// outside nvcc (the CPU build and the emulation).
#if defined(__CUDACC__)
struct NvtxRange {
    explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
    explicit NvtxRange(const std::string& name) { nvtxRangePushA(name.c_str()); }
    ~NvtxRange() { nvtxRangePop(); }
};
#define NVTX_RANGE_FN() NvtxRange nvtx_range_fn(__func__)
#define NVTX_RANGE(...) NvtxRange nvtx_range(string_format(__VA_ARGS__))
#else
#define NVTX_RANGE_FN() (void)0
#define NVTX_RANGE(...) (void)0
#endif

__device__ __host__ inline float to_float(float x) { return x; }
__device__ __host__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename X> __device__ __host__ inline X from_float(float x);
template <> __device__ __host__ inline float from_float<float>(float x) { return x; }
template <> __device__ __host__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

inline unsigned ceil_div(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

// 128 bits of floatX (8 bf16 or 4 floats), moved between registers and memory in one access
// (ld/st.global.v4); the elementwise kernels use it where the pointers are 16-byte aligned
// (aligned16) and the group is whole, and go element by element otherwise.
struct alignas(16) x128 {
    static constexpr int size = 16 / sizeof(floatX);
    floatX v[size];
};
__device__ inline x128 load128(const floatX* p) {
    int4 bits = *reinterpret_cast<const int4*>(p);
    x128 out;
    memcpy(&out, &bits, sizeof(out));
    return out;
}
__device__ inline void store128(floatX* p, const x128& x) {
    int4 bits;
    memcpy(&bits, &x, sizeof(bits));
    *reinterpret_cast<int4*>(p) = bits;
}
inline bool aligned16(const void* p) { return (uintptr_t)p % 16 == 0; }

// sum and max over a full warp, then over a block (blockDim.x a multiple of 32, <= 1024)
__device__ inline float warp_reduce_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}
__device__ inline float warp_reduce_max(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}
// every thread gets the result; shared holds 32 floats; safe to call twice in a row
__device__ inline float block_reduce(float v, float* shared, bool is_max) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = is_max ? warp_reduce_max(v) : warp_reduce_sum(v);
    __syncthreads();  // the previous call's readers are done with shared
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : (is_max ? -INFINITY : 0.0f);
    return is_max ? warp_reduce_max(v) : warp_reduce_sum(v);
}

// one cuBLAS handle for the process; its stream is set by each launcher
inline cublasHandle_t cublas_handle() {
    static cublasHandle_t handle = nullptr;
    if (!handle) cublasCheck(cublasCreate(&handle));
    return handle;
}

// C (m x n, column-major) = alpha op(A) op(B) + beta C for `batch` matrices at the given
// strides; A and B floatX, C of type c_type; FP32 accumulation.
inline void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const floatX* A, int lda, long long stride_a,
                 const floatX* B, int ldb, long long stride_b, float beta, void* Cm, cudaDataType c_type, int ldc,
                 long long stride_c, int batch, cudaStream_t stream) {
    cublasHandle_t h = cublas_handle();
    cublasCheck(cublasSetStream(h, stream));
    cublasCheck(cublasGemmStridedBatchedEx(h, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k,
                                           &alpha, A, CUBLAS_FLOATX, lda, stride_a, B, CUBLAS_FLOATX, ldb, stride_b, &beta, Cm,
                                           c_type, ldc, stride_c, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
#else
#define NVTX_RANGE_FN() (void)0  // the CPU build: the model graph names its layers for the GPU only
#define NVTX_RANGE(...) (void)0
#endif
// ----------------------------------------------------------------------------
// Model file format (.bin), version 3 (versions 1 and 2 are still read: version 1 has no token
// ids, versions 1 and 2 no RoPE scaling). Little-endian.
//
// Header: 256 bytes.
//   offset  type     field
//   0       uint32   magic = 0x4E495758 (the bytes "XWIN")
//   4       uint32   version = 3
//   8       uint32   dtype of the parameters in the file: 0 = float32, 1 = bfloat16
//   12      uint32   head_type: 0 = language-model head, 1 = scalar reward head
//   16      uint32   dim (C)            20 uint32 n_layers (L)
//   24      uint32   n_heads (H)        28 uint32 n_kv_heads (KV)
//   32      uint32   vocab_size (V)     36 uint32 ffn_dim (F)
//   40      uint32   max_seq_len        44 uint32 tied_embeddings (0 or 1)
//   48      float64  rope_theta         56 float64 norm_eps
//   64      int32    pad_token_id       68 int32 bos_token_id       72 int32 eos_token_id
//           (-1 = none; a version-1 file has none: its bytes 64..255 are zero)
//   76      uint32   rope_scaling: 0 = none, 1 = linear, 2 = llama3 (transformers' rope_type)
//   80      float64  factor             (linear, llama3; >= 1)
//   88      float64  low_freq_factor    (llama3; > 0)
//   96      float64  high_freq_factor   (llama3; > low_freq_factor)
//   104     uint32   original_max_position_embeddings (llama3; >= 1)
//           (a field the scaling type does not use is zero: all of them for none; a
//           version-2 file has no scaling: its bytes 76..255 are zero)
//   108..255 zero (reserved)
// Then every parameter tensor, contiguous, in the order of ParamTensors below, each
// row-major exactly as torch stores it (a Linear weight is (out_features, in_features)),
// per-layer tensors stacked over layers. head_dim = C / H, KVD = KV * head_dim.
//   wte (V, C) model.embed_tokens | attn_norm (L, C) input_layernorm
//   wq (L, C, C) q_proj | wk (L, KVD, C) k_proj | wv (L, KVD, C) v_proj | wo (L, C, C) o_proj
//   mlp_norm (L, C) post_attention_layernorm
//   w_gate (L, F, C) gate_proj | w_up (L, F, C) up_proj | w_down (L, C, F) down_proj
//   final_norm (C) model.norm
//   head: (V, C) lm_head when head_type 0 and not tied; (1, C) score when head_type 1;
//         absent when head_type 0 and tied (the head is wte).
// The file is exactly 256 + n_params * (4 or 2) bytes long. Q and K are stored in the
// Hugging Face rotate-half layout, so dev/convert_hf.py is a plain copy.

constexpr uint32_t MODEL_MAGIC = 0x4E495758;
constexpr uint32_t MODEL_VERSION = 3;
constexpr size_t MODEL_HEADER_BYTES = 256;
enum { DTYPE_FP32 = 0, DTYPE_BF16 = 1 };
enum { HEAD_LM = 0, HEAD_REWARD = 1 };
enum { ROPE_NONE = 0, ROPE_LINEAR = 1, ROPE_LLAMA3 = 2 };  // rope_scaling

// Built with named fields: LlamaConfig{.dim = 64, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2,
// .vocab_size = 259, .ffn_dim = 128, .max_seq_len = 256}; the others keep these defaults.
struct LlamaConfig {
    int dim;              // C
    int n_layers;         // L
    int n_heads;          // H
    int n_kv_heads;       // KV
    int vocab_size;       // V
    int ffn_dim;          // F
    int max_seq_len;
    int tied_embeddings = 0;       // 1: the head is wte
    int head_type = HEAD_LM;       // HEAD_LM or HEAD_REWARD
    double rope_theta = 10000.0;   // Llama 2's (Llama 3's: 500000)
    double norm_eps = 1e-5;
    int pad_id = -1;      // the tokens' ids the model was made with (-1 = none), as transformers'
    int bos_id = -1;      // pad_token_id, bos_token_id, eos_token_id: the embedding row of pad_id
    int eos_id = -1;      // gets no gradient (torch's padding_idx) and a reward model scores the
                          // last token that is not pad_id
    // RoPE scaling, as transformers' rope_scaling (rope_parameters): rope_inv_freq applies it.
    // Every field is 0 for none, and a field the type does not use stays 0.
    int rope_scaling = ROPE_NONE;       // ROPE_NONE, ROPE_LINEAR or ROPE_LLAMA3
    double rope_factor = 0;             // linear, llama3: factor (the long wavelengths are stretched by it)
    double rope_low_freq_factor = 0;    // llama3: low_freq_factor
    double rope_high_freq_factor = 0;   // llama3: high_freq_factor
    int rope_original_max_pos = 0;      // llama3: original_max_position_embeddings
};

inline int head_dim(const LlamaConfig& c) { return c.dim / c.n_heads; }
inline int kv_dim(const LlamaConfig& c) { return c.n_kv_heads * head_dim(c); }
inline int head_rows(const LlamaConfig& c) { return c.head_type == HEAD_REWARD ? 1 : c.vocab_size; }

// The GPU model keeps its logits rows padded_vocab(V) apart (the vocabulary padded to a multiple of
// 64, as llm.c pads it): every row starts 128-byte aligned whatever V is (32001 as 32000), so the
// head's GEMM writes to, and its backward reads from, an aligned leading dimension, and the row
// kernels load whole x128 groups. Only the first V entries of a row are written or read.
constexpr size_t VOCAB_ALIGN = 64;
inline size_t padded_vocab(size_t V) { return (V + VOCAB_ALIGN - 1) / VOCAB_ALIGN * VOCAB_ALIGN; }

// The RoPE scaling fields of a version-3 header (bytes 76..107), checked against what the type
// uses. Returns "" when they are sane, else what is wrong.
inline std::string rope_scaling_check(const LlamaConfig& c) {
    int type = c.rope_scaling;
    double factor = c.rope_factor, low = c.rope_low_freq_factor, high = c.rope_high_freq_factor;
    int orig = c.rope_original_max_pos;
    if (type == ROPE_NONE) {
        if (factor != 0 || low != 0 || high != 0 || orig != 0) {
            return string_format("rope_scaling 0 (none) with nonzero scaling fields: factor %g, low_freq_factor %g, "
                                 "high_freq_factor %g, original_max_position_embeddings %d (must all be 0)", factor, low, high, orig);
        }
        return "";
    }
    // transformers' own validation asks factor >= 1 of linear and llama3 alike (it warns below 1)
    if (!(std::isfinite(factor) && factor >= 1)) return string_format("absurd config: rope_scaling factor = %g (must be finite and >= 1)", factor);
    if (type == ROPE_LINEAR) {
        if (low != 0 || high != 0 || orig != 0) {
            return string_format("rope_scaling 1 (linear) with llama3 fields: low_freq_factor %g, high_freq_factor %g, "
                                 "original_max_position_embeddings %d (must be 0)", low, high, orig);
        }
        return "";
    }
    if (!(std::isfinite(low) && low > 0)) return string_format("absurd config: rope_scaling low_freq_factor = %g (must be finite and > 0)", low);
    if (!(std::isfinite(high) && high > low)) {
        return string_format("absurd config: rope_scaling high_freq_factor = %g (must be finite and > low_freq_factor %g)", high, low);
    }
    if (orig < 1) return string_format("absurd config: rope_scaling original_max_position_embeddings = %d (must be >= 1)", orig);
    return "";
}

// Parses and checks a 256-byte header. Returns "" when it is sane, else what is wrong.
inline std::string model_header_parse(const unsigned char* h, LlamaConfig* c, int* dtype) {
    uint32_t u[12];
    memcpy(u, h, sizeof(u));
    if (u[0] != MODEL_MAGIC) return string_format("bad magic 0x%08x (expected 0x%08x, \"XWIN\"): not an xwin.cu model file", u[0], MODEL_MAGIC);
    uint32_t version = u[1];
    if (version < 1 || version > MODEL_VERSION) return string_format("unsupported model file version %u (this build reads versions 1 to %u)", version, MODEL_VERSION);
    if (u[2] != DTYPE_FP32 && u[2] != DTYPE_BF16) return string_format("unknown dtype %u (0 = float32, 1 = bfloat16)", u[2]);
    if (u[3] != HEAD_LM && u[3] != HEAD_REWARD) return string_format("unknown head_type %u (0 = language model, 1 = reward)", u[3]);
    // upper bounds well above any real Llama (70B: dim 8192, 80 layers, ffn 28672)
    struct { const char* name; uint32_t value, max; } sizes[] = {
        {"dim", u[4], 1u << 16}, {"n_layers", u[5], 1024}, {"n_heads", u[6], 1024}, {"n_kv_heads", u[7], 1024},
        {"vocab_size", u[8], 1u << 24}, {"ffn_dim", u[9], 1u << 20}, {"max_seq_len", u[10], 1u << 20}};
    for (auto& s : sizes) {
        if (s.value == 0 || s.value > s.max) return string_format("absurd config: %s = %u (must be 1..%u)", s.name, s.value, s.max);
    }
    if (u[11] > 1) return string_format("absurd config: tied_embeddings = %u (must be 0 or 1)", u[11]);
    double theta, eps;
    memcpy(&theta, h + 48, 8);
    memcpy(&eps, h + 56, 8);
    if (!(theta > 0 && std::isfinite(theta))) return string_format("absurd config: rope_theta = %g (must be positive)", theta);
    if (!(eps > 0 && eps < 1)) return string_format("absurd config: norm_eps = %g (must be in (0, 1))", eps);
    if (u[4] % u[6] != 0) return string_format("absurd config: dim %u is not divisible by n_heads %u", u[4], u[6]);
    if (u[6] % u[7] != 0) return string_format("absurd config: n_heads %u is not divisible by n_kv_heads %u", u[6], u[7]);
    if ((u[4] / u[6]) % 2 != 0) return string_format("absurd config: head_dim %u is odd (RoPE rotates pairs)", u[4] / u[6]);
    int32_t ids[3] = {-1, -1, -1};  // pad, bos, eos
    if (version >= 2) memcpy(ids, h + 64, sizeof(ids));
    const char* id_names[3] = {"pad_token_id", "bos_token_id", "eos_token_id"};
    for (int i = 0; i < 3; i++) {
        if (ids[i] < -1 || ids[i] >= (int32_t)u[8]) return string_format("%s %d is not -1 (none) or an id below vocab_size %u", id_names[i], ids[i], u[8]);
    }
    LlamaConfig parsed{.dim = (int)u[4], .n_layers = (int)u[5], .n_heads = (int)u[6], .n_kv_heads = (int)u[7], .vocab_size = (int)u[8],
                       .ffn_dim = (int)u[9], .max_seq_len = (int)u[10], .tied_embeddings = (int)u[11], .head_type = (int)u[3],
                       .rope_theta = theta, .norm_eps = eps, .pad_id = ids[0], .bos_id = ids[1], .eos_id = ids[2]};
    if (version >= 3) {
        uint32_t type, orig;
        memcpy(&type, h + 76, 4);
        memcpy(&parsed.rope_factor, h + 80, 8);
        memcpy(&parsed.rope_low_freq_factor, h + 88, 8);
        memcpy(&parsed.rope_high_freq_factor, h + 96, 8);
        memcpy(&orig, h + 104, 4);
        if (type > ROPE_LLAMA3) return string_format("unknown rope_scaling type %u (0 = none, 1 = linear, 2 = llama3)", type);
        if (orig > (1u << 24)) return string_format("absurd config: rope_scaling original_max_position_embeddings = %u (must be 1..%u)", orig, 1u << 24);
        parsed.rope_scaling = (int)type;
        parsed.rope_original_max_pos = (int)orig;
        std::string err = rope_scaling_check(parsed);
        if (!err.empty()) return err;
    }
    size_t first_reserved = version == 1 ? 64 : version == 2 ? 76 : 108;  // the first byte past the version's fields
    std::string reserved = reserved_bytes_check(h, first_reserved, MODEL_HEADER_BYTES);
    if (!reserved.empty()) return reserved;
    *dtype = (int)u[2];
    *c = parsed;
    return "";
}

inline void model_header_write(unsigned char* h, const LlamaConfig& c, int dtype) {
    memset(h, 0, MODEL_HEADER_BYTES);
    uint32_t u[12] = {MODEL_MAGIC, MODEL_VERSION, (uint32_t)dtype, (uint32_t)c.head_type,
                      (uint32_t)c.dim, (uint32_t)c.n_layers, (uint32_t)c.n_heads, (uint32_t)c.n_kv_heads,
                      (uint32_t)c.vocab_size, (uint32_t)c.ffn_dim, (uint32_t)c.max_seq_len, (uint32_t)c.tied_embeddings};
    memcpy(h, u, sizeof(u));
    memcpy(h + 48, &c.rope_theta, 8);
    memcpy(h + 56, &c.norm_eps, 8);
    int32_t ids[3] = {c.pad_id, c.bos_id, c.eos_id};
    memcpy(h + 64, ids, sizeof(ids));
    uint32_t type = (uint32_t)c.rope_scaling, orig = (uint32_t)c.rope_original_max_pos;
    memcpy(h + 76, &type, 4);
    memcpy(h + 80, &c.rope_factor, 8);
    memcpy(h + 88, &c.rope_low_freq_factor, 8);
    memcpy(h + 96, &c.rope_high_freq_factor, 8);
    memcpy(h + 104, &orig, 4);
}

// ----------------------------------------------------------------------------
// Parameters: the tensors in file order, pointers into one flat buffer.

enum ParamTensor {  // the tensors in file order; PARAM_ATTN_NORM .. PARAM_W_DOWN are per layer
    PARAM_WTE, PARAM_ATTN_NORM, PARAM_WQ, PARAM_WK, PARAM_WV, PARAM_WO, PARAM_MLP_NORM,
    PARAM_W_GATE, PARAM_W_UP, PARAM_W_DOWN, PARAM_FINAL_NORM, PARAM_HEAD, NUM_PARAM_TENSORS
};
const char* const PARAM_NAMES[NUM_PARAM_TENSORS] = {"wte", "attn_norm", "wq", "wk", "wv", "wo", "mlp_norm",
                                                    "w_gate", "w_up", "w_down", "final_norm", "head"};

template <typename X>  // float on the CPU; on the GPU float (master, gradients) or floatX (compute copy)
struct ParamTensorsT {
    X* wte;         // (V, C)
    X* attn_norm;   // (L, C)
    X* wq;          // (L, C, C)
    X* wk;          // (L, KVD, C)
    X* wv;          // (L, KVD, C)
    X* wo;          // (L, C, C)
    X* mlp_norm;    // (L, C)
    X* w_gate;      // (L, F, C)
    X* w_up;        // (L, F, C)
    X* w_down;      // (L, C, F)
    X* final_norm;  // (C)
    X* head;        // (V, C) or (1, C); equals wte when tied
};
using ParamTensors = ParamTensorsT<float>;

// Number of floats of each tensor, in file order. A tied head has size 0.
inline void param_sizes(const LlamaConfig& c, size_t sizes[NUM_PARAM_TENSORS]) {
    size_t C = c.dim, L = c.n_layers, V = c.vocab_size, F = c.ffn_dim, KVD = kv_dim(c);
    sizes[PARAM_WTE] = V * C;
    sizes[PARAM_ATTN_NORM] = L * C;
    sizes[PARAM_WQ] = L * C * C;
    sizes[PARAM_WK] = L * KVD * C;
    sizes[PARAM_WV] = L * KVD * C;
    sizes[PARAM_WO] = L * C * C;
    sizes[PARAM_MLP_NORM] = L * C;
    sizes[PARAM_W_GATE] = L * F * C;
    sizes[PARAM_W_UP] = L * F * C;
    sizes[PARAM_W_DOWN] = L * C * F;
    sizes[PARAM_FINAL_NORM] = C;
    sizes[PARAM_HEAD] = (c.head_type == HEAD_LM && c.tied_embeddings) ? 0 : (size_t)head_rows(c) * C;
}

// Layer l's part of each per-layer tensor (PARAM_ATTN_NORM .. PARAM_W_DOWN, each (L, ...)) in
// a flat buffer laid out as point_parameters lays it: offsets[i], counts[i] in elements, in
// tensor order. The other tensors (the embedding, the final norm, the head) are no layer's.
constexpr int LAYER_TENSORS = PARAM_W_DOWN - PARAM_ATTN_NORM + 1;
inline void layer_param_slices(const LlamaConfig& c, size_t l, size_t offsets[LAYER_TENSORS], size_t counts[LAYER_TENSORS]) {
    size_t sizes[NUM_PARAM_TENSORS], offset = 0;
    param_sizes(c, sizes);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        if (i >= PARAM_ATTN_NORM && i <= PARAM_W_DOWN) {
            counts[i - PARAM_ATTN_NORM] = sizes[i] / c.n_layers;
            offsets[i - PARAM_ATTN_NORM] = offset + l * counts[i - PARAM_ATTN_NORM];
        }
        offset += sizes[i];
    }
}

// Layer l's part of each per-layer tensor, as pointers: where the backward writes that layer's
// weight gradients (CudaOps's layer_grads: a ZeRO-2 rank's reusable layer bucket instead)
template <typename X>
struct LayerTensorsT {
    X *attn_norm, *wq, *wk, *wv, *wo, *mlp_norm, *w_gate, *w_up, *w_down;  // layer_param_slices's order
};

template <typename X>
LayerTensorsT<X> layer_tensors(const ParamTensorsT<X>& p, const LlamaConfig& c, size_t l) {
    size_t C = c.dim, F = c.ffn_dim, KVD = kv_dim(c);
    return {p.attn_norm + l * C, p.wq + l * C * C, p.wk + l * KVD * C, p.wv + l * KVD * C, p.wo + l * C * C,
            p.mlp_norm + l * C, p.w_gate + l * F * C, p.w_up + l * F * C, p.w_down + l * C * F};
}

// A layer's tensors packed one after another in a buffer of layer_param_count elements (a bucket)
template <typename X>
LayerTensorsT<X> layer_bucket_tensors(const LlamaConfig& c, X* bucket) {
    size_t offsets[LAYER_TENSORS], counts[LAYER_TENSORS];
    layer_param_slices(c, 0, offsets, counts);
    X* t[LAYER_TENSORS];
    for (int i = 0; i < LAYER_TENSORS; i++) t[i] = bucket, bucket += counts[i];
    return {t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]};
}

inline size_t layer_param_count(const LlamaConfig& c) {
    size_t offsets[LAYER_TENSORS], counts[LAYER_TENSORS], n = 0;
    layer_param_slices(c, 0, offsets, counts);
    for (size_t k : counts) n += k;
    return n;
}

// ZeRO-2's gradients the backward writes: the embedding, the final norm and the head whole, and
// two layer buckets (a layer's are reduced while the backward writes the next one's)
inline size_t zero2_grads_count(const LlamaConfig& c) {
    size_t sizes[NUM_PARAM_TENSORS];
    param_sizes(c, sizes);
    return sizes[PARAM_WTE] + sizes[PARAM_FINAL_NORM] + sizes[PARAM_HEAD] + 2 * layer_param_count(c);
}

inline size_t num_parameters(const LlamaConfig& c) {
    size_t sizes[NUM_PARAM_TENSORS], n = 0;
    param_sizes(c, sizes);
    for (size_t s : sizes) n += s;
    return n;
}

// Points the tensors into a flat buffer laid out in file order (no gaps: the buffer is the file).
template <typename X>
ParamTensorsT<X> point_parameters(const LlamaConfig& c, X* memory) {
    size_t sizes[NUM_PARAM_TENSORS];
    param_sizes(c, sizes);
    ParamTensorsT<X> p;
    X** fields[NUM_PARAM_TENSORS] = {&p.wte, &p.attn_norm, &p.wq, &p.wk, &p.wv, &p.wo, &p.mlp_norm,
                                     &p.w_gate, &p.w_up, &p.w_down, &p.final_norm, &p.head};
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        *fields[i] = memory;
        memory += sizes[i];
    }
    if (sizes[PARAM_HEAD] == 0) p.head = p.wte;
    return p;
}

// Carves consecutive typed tensors out of one buffer, each 16-byte aligned. With a null
// buffer it only adds up the bytes, so the same code sizes and points an allocation.
struct Carver {
    char* memory;
    size_t bytes = 0;
    template <typename U>
    void take(U*& field, size_t count) {
        bytes = (bytes + 15) / 16 * 16;
        field = memory ? (U*)(memory + bytes) : nullptr;
        bytes += count * sizeof(U);
    }
};

// Weight decay applies to matrices (embeddings, projections, heads), not to norm weights.
inline bool param_is_decayed(int tensor) { return tensor != PARAM_ATTN_NORM && tensor != PARAM_MLP_NORM && tensor != PARAM_FINAL_NORM; }

// ----------------------------------------------------------------------------
// Ops: each as its CPU reference (the spec), its CUDA kernels and their launchers (_cuda, which
// take a stream), under a heading "---- <op>: ...". Shapes: B batch, T time, C channels, N = B*T rows.

// Below this many elements (or multiply-adds) an op runs on one thread: waking the others would
// cost more than it saves. The small ops of a decode step (a few rows each, ~60 of them per
// token) stay serial; training's are far above it. No result depends on the thread count.
constexpr size_t PARALLEL_MIN_WORK = (size_t)1 << 16;

// ---- embedding: reference, kernels, launchers (embedding_forward/_backward, embedding_buckets)
// x[b,t,:] = wte[tokens[b,t], :]
template <typename T>
void embedding_forward(T* out, const int* tokens, const T* wte, size_t N, size_t C) {
    #pragma omp parallel for if (N * C >= PARALLEL_MIN_WORK)
    for (size_t n = 0; n < N; n++) {
        memcpy(out + n * C, wte + (size_t)tokens[n] * C, C * sizeof(T));
    }
}

// The row of pad_id (>= 0) gets no gradient, as torch's nn.Embedding(padding_idx=pad_id).
template <typename T>
void embedding_backward(T* dwte, const T* dout, const int* tokens, size_t N, size_t C, int pad_id = -1) {
    for (size_t n = 0; n < N; n++) {  // serial: two rows may share a token
        if (tokens[n] == pad_id) continue;
        T* row = dwte + (size_t)tokens[n] * C;
        const T* d = dout + n * C;
        for (size_t i = 0; i < C; i++) row[i] += d[i];
    }
}

#ifdef XWIN_CUDA
// one thread per element of out (N, C)
__global__ void embedding_forward_kernel(floatX* out, const int* tokens, const floatX* wte, size_t N, size_t C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * C) return;
    out[idx] = wte[(size_t)tokens[idx / C] * C + idx % C];
}

// The embedding backward on the GPU adds the rows of each token in the order of the serial CPU
// loop (by position), with no atomics, so its bits do not depend on scheduling: the positions are
// first bucketed by token on the host (the tokens are there). buckets (3N + 1) holds
//   order (N): the non-pad positions sorted by token, then position; rows (N): the token of each
//   bucket; start (N + 1): where each bucket begins in order (the last entry: the count).
// Returns the number of buckets.
inline int embedding_buckets(int* buckets, const int* tokens, size_t N, int pad_id) {
    int *order = buckets, *rows = buckets + N, *start = buckets + 2 * N;
    size_t n = 0;
    for (size_t i = 0; i < N; i++)
        if (tokens[i] != pad_id) order[n++] = (int)i;
    std::stable_sort(order, order + n, [&](int a, int b) { return tokens[a] < tokens[b]; });
    int n_buckets = 0;
    for (size_t j = 0; j < n; j++) {
        if (j > 0 && tokens[order[j]] == tokens[order[j - 1]]) continue;
        rows[n_buckets] = tokens[order[j]];
        start[n_buckets++] = (int)j;
    }
    start[n_buckets] = (int)n;
    return n_buckets;
}

// one block per (bucket, block of channels): a thread adds its channel of each of the bucket's
// positions, in order, into its token's row
__global__ void embedding_backward_kernel(float* dwte, const floatX* dout, const int* buckets, size_t N, size_t C) {
    const int *order = buckets, *rows = buckets + N, *start = buckets + 2 * N;
    size_t c = (size_t)blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float* row = dwte + (size_t)rows[blockIdx.x] * C;
    float acc = row[c];
    for (int j = start[blockIdx.x]; j < start[blockIdx.x + 1]; j++) acc += to_float(dout[(size_t)order[j] * C + c]);
    row[c] = acc;
}

inline void embedding_forward_cuda(floatX* out, const int* tokens, const floatX* wte, size_t N, size_t C, cudaStream_t stream) {
    NVTX_RANGE_FN();
    LAUNCH(embedding_forward_kernel, ceil_div(N * C, 256), 256, 0, stream, out, tokens, wte, N, C);
    cudaCheck(cudaGetLastError());
}

// buckets (3N + 1) on the device, n_buckets: embedding_buckets' of the tokens
inline void embedding_backward_cuda(float* dwte, const floatX* dout, const int* buckets, int n_buckets, size_t N, size_t C, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;
    if (n_buckets == 0) return;  // every position a pad: nothing to add (an empty grid is an invalid launch)
    LAUNCH(embedding_backward_kernel, dim3((unsigned)n_buckets, ceil_div(C, block_size)), block_size, 0, stream, dwte, dout, buckets, N, C);
    cudaCheck(cudaGetLastError());
}
#endif

// ---- rmsnorm: reference, kernels, launchers (rmsnorm_forward/_recompute/_backward)
// out = x / sqrt(mean(x^2) + eps) * weight; rstd (N) saved for the backward
template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, size_t N, size_t C, double eps) {
    #pragma omp parallel for if (N * C >= PARALLEL_MIN_WORK)
    for (size_t n = 0; n < N; n++) {
        const T* x = inp + n * C;
        T ss = 0;
        for (size_t i = 0; i < C; i++) ss += x[i] * x[i];
        T r = T(1) / std::sqrt(ss / T(C) + T(eps));
        for (size_t i = 0; i < C; i++) out[n * C + i] = x[i] * r * weight[i];
        rstd[n] = r;
    }
}

// RMSNorm's output again from its input and the rstd its forward saved (activation
// recomputation, -r 1): out = x * rstd * weight, the forward's last loop, so the same bits.
// out, inp (N, C); weight (C); rstd (N)
template <typename T>
void rmsnorm_recompute(T* out, const T* inp, const T* weight, const T* rstd, size_t N, size_t C) {
    #pragma omp parallel for if (N * C >= PARALLEL_MIN_WORK)
    for (size_t n = 0; n < N; n++) {
        for (size_t i = 0; i < C; i++) out[n * C + i] = inp[n * C + i] * rstd[n] * weight[i];
    }
}

// with xhat = x * r: dweight += dout * xhat; dx += r * (dout*w - xhat * mean(dout*w*xhat))
template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight, const T* rstd, size_t N, size_t C) {
    #pragma omp parallel for
    for (size_t n = 0; n < N; n++) {
        const T* x = inp + n * C;
        const T* d = dout + n * C;
        T r = rstd[n], dot = 0;
        for (size_t i = 0; i < C; i++) dot += d[i] * weight[i] * x[i] * r;
        dot /= T(C);
        for (size_t i = 0; i < C; i++) dinp[n * C + i] += r * (d[i] * weight[i] - x[i] * r * dot);
    }
    // dweight[i]: one sum over the rows in row order per channel, then added; the threads take
    // blocks of 64 channels (no two share dweight[i]) and walk the rows once, a block's sums side by side
    constexpr size_t CB = 64;
    #pragma omp parallel for
    for (size_t i0 = 0; i0 < C; i0 += CB) {
        size_t i1 = std::min(C, i0 + CB);
        T acc[CB] = {};
        for (size_t n = 0; n < N; n++) {
            for (size_t i = i0; i < i1; i++) acc[i - i0] += dout[n * C + i] * inp[n * C + i] * rstd[n];
        }
        for (size_t i = i0; i < i1; i++) dweight[i] += acc[i - i0];
    }
}

#ifdef XWIN_CUDA
// The end of a warp's RMSNorm row: ss (this lane's part of the sum of squares of the row x)
// reduced over the warp, then o = x * rstd * weight and the row's rstd. With vec a lane moves
// x128 groups (rows of whole groups, 16-byte aligned), else single elements.
__device__ inline void rmsnorm_row_finish(floatX* o, float* rstd, const floatX* x, const floatX* weight, float ss, int C, float eps, int lane, bool vec) {
    ss = warp_reduce_sum(ss);
    float r = 1.0f / sqrtf(ss / (float)C + eps);
    if (vec) {
        for (int i = lane * x128::size; i < C; i += 32 * x128::size) {
            x128 v = load128(x + i), w = load128(weight + i), y;
            for (int k = 0; k < x128::size; k++) y.v[k] = from_float<floatX>(to_float(v.v[k]) * r * to_float(w.v[k]));
            store128(o + i, y);
        }
    } else {
        for (int i = lane; i < C; i += 32) o[i] = from_float<floatX>(to_float(x[i]) * r * to_float(weight[i]));
    }
    if (lane == 0) *rstd = r;
}

// one warp per row: the sum of squares by a warp reduction, then the scaled row; with vec
// (rows of whole x128 groups, 16-byte aligned) a lane moves x128 groups, else single elements
__global__ void rmsnorm_forward_kernel(floatX* out, float* rstd, const floatX* inp, const floatX* weight, size_t N, int C, float eps, bool vec) {
    size_t n = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (n >= N) return;  // whole warps leave together
    const floatX* x = inp + n * C;
    floatX* o = out + n * C;
    float ss = 0.0f;
    if (vec) {
        for (int i = lane * x128::size; i < C; i += 32 * x128::size) {
            x128 v = load128(x + i);
            for (int k = 0; k < x128::size; k++) ss += to_float(v.v[k]) * to_float(v.v[k]);
        }
    } else {
        for (int i = lane; i < C; i += 32) ss += to_float(x[i]) * to_float(x[i]);
    }
    rmsnorm_row_finish(o, rstd + n, x, weight, ss, C, eps, lane, vec);
}

// The weight gradient sum_n dout * xhat is summed in two fixed orders, so it is the same bits run
// after run: each block of the backward sums its RMSNORM_BACKWARD_ROWS rows into a partial (row
// order), then one thread per channel adds the partials (block order).
constexpr int RMSNORM_BACKWARD_ROWS = 32;

// one block per RMSNORM_BACKWARD_ROWS rows: a warp per row for dinp += r * (dout*w - xhat *
// mean(dout*w*xhat)), then a thread per channel for the block's partial of dweight (the rows
// the block just read, from L1/L2)
__global__ void rmsnorm_backward_kernel(floatX* dinp, float* dweight_partials, const floatX* dout, const floatX* inp, const floatX* weight,
                                        const float* rstd, size_t N, int C) {
    size_t row0 = (size_t)blockIdx.x * RMSNORM_BACKWARD_ROWS;
    size_t row1 = row0 + RMSNORM_BACKWARD_ROWS < N ? row0 + RMSNORM_BACKWARD_ROWS : N;
    int lane = threadIdx.x % 32;
    for (size_t n = row0 + threadIdx.x / 32; n < row1; n += blockDim.x / 32) {
        const floatX* x = inp + n * C;
        const floatX* d = dout + n * C;
        float r = rstd[n], dot = 0.0f;
        for (int i = lane; i < C; i += 32) dot += to_float(d[i]) * to_float(weight[i]) * to_float(x[i]) * r;
        dot = warp_reduce_sum(dot) / (float)C;
        for (int i = lane; i < C; i += 32) {
            float g = r * (to_float(d[i]) * to_float(weight[i]) - to_float(x[i]) * r * dot);
            dinp[n * C + i] = from_float<floatX>(to_float(dinp[n * C + i]) + g);
        }
    }
    for (int i = threadIdx.x; i < C; i += blockDim.x) {  // reads dout, inp, rstd only: no barrier needed
        float acc = 0.0f;
        for (size_t n = row0; n < row1; n++) acc += to_float(dout[n * C + i]) * to_float(inp[n * C + i]) * rstd[n];
        dweight_partials[(size_t)blockIdx.x * C + i] = acc;
    }
}

// one thread per channel: dweight += the blocks' partials, in block order
__global__ void rmsnorm_weight_reduce_kernel(float* dweight, const float* partials, int n_partials, int C) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= C) return;
    float acc = 0.0f;
    for (int b = 0; b < n_partials; b++) acc += partials[(size_t)b * C + i];
    dweight[i] += acc;
}

inline void rmsnorm_forward_cuda(floatX* out, float* rstd, const floatX* inp, const floatX* weight, size_t N, int C, double eps, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;  // 8 warps: 8 rows per block
    bool vec = C % x128::size == 0 && aligned16(out) && aligned16(inp) && aligned16(weight);
    LAUNCH(rmsnorm_forward_kernel, ceil_div(N, block_size / 32), block_size, 0, stream, out, rstd, inp, weight, N, C, (float)eps, vec);
    cudaCheck(cudaGetLastError());
}

// one thread per element: out = x * rstd * weight in rmsnorm_row_finish's order (its bits)
__global__ void rmsnorm_recompute_kernel(floatX* out, const floatX* inp, const floatX* weight, const float* rstd, size_t N, int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * C) return;
    out[idx] = from_float<floatX>(to_float(inp[idx]) * rstd[idx / C] * to_float(weight[idx % C]));
}

inline void rmsnorm_recompute_cuda(floatX* out, const floatX* inp, const floatX* weight, const float* rstd, size_t N, int C, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;
    LAUNCH(rmsnorm_recompute_kernel, ceil_div(N * C, (size_t)block_size), block_size, 0, stream, out, inp, weight, rstd, N, C);
    cudaCheck(cudaGetLastError());
}

// dweight_partials: (rmsnorm_backward_blocks(N), C) device scratch
inline size_t rmsnorm_backward_blocks(size_t N) { return ceil_div(N, (size_t)RMSNORM_BACKWARD_ROWS); }

inline void rmsnorm_backward_cuda(floatX* dinp, float* dweight, float* dweight_partials, const floatX* dout, const floatX* inp,
                                  const floatX* weight, const float* rstd, size_t N, int C, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256, reduce_block_size = 256;  // 8 warps, 4 rows each
    size_t blocks = rmsnorm_backward_blocks(N);
    LAUNCH(rmsnorm_backward_kernel, blocks, block_size, 0, stream, dinp, dweight_partials, dout, inp, weight, rstd, N, C);
    cudaCheck(cudaGetLastError());
    LAUNCH(rmsnorm_weight_reduce_kernel, ceil_div(C, reduce_block_size), reduce_block_size, 0, stream, dweight, dweight_partials, (int)blocks, C);
    cudaCheck(cudaGetLastError());
}
#endif

// ---- matmul: the spec, the fast CPU kernel, cuBLAS launchers (matmul_plain, matmul_blocked, matmul_forward/_backward(_pair, _qkv))
// Every matmul of the CPU build is out (M, P) += A (M, K) @ B (K, P) over strided operands:
// A[i, k] is A[i * sa + k * sk] and B[k, j] is B[k * sbk + j * sbj], so either may be a
// transpose read in place, and out's rows are ldo apart (a block of a wider matrix).
// matmul_plain is the spec: each output element is one sum that starts at 0, takes the K terms
// in order, one multiply-add each (matmul_madd), and is then added to out. The fast code below (matmul_tiles for a few rows, matmul_blocked for many)
// computes exactly these sums, bit for bit (test/test_ops.cpp asserts it), each element by one
// thread, so the result does not depend on the number of threads.

// One multiply-add: fused (one rounding) where the build targets FMA (x86-64-v3), else a * b + c.
// Written out rather than left to the compiler's contraction, so every matmul loop rounds alike.
template <typename T>
inline T matmul_madd(T a, T b, T c) {
#ifdef __FMA__
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
}

// out (M, P) += A (M, K) @ B (K, P): the plain loops
template <typename T>
void matmul_plain(T* out, size_t ldo, const T* A, size_t sa, size_t sk, const T* B, size_t sbk, size_t sbj, size_t M, size_t K, size_t P) {
    for (size_t i = 0; i < M; i++) {
        for (size_t j = 0; j < P; j++) {
            T acc = 0;
            for (size_t k = 0; k < K; k++) acc = matmul_madd(A[i * sa + k * sk], B[k * sbk + j * sbj], acc);
            out[i * ldo + j] += acc;
        }
    }
}

// One tile of matmul_tiles: out[i0.., j0..] += the 4 x 16 sums over k. With Tail, only the
// first `cols` columns exist: B is read through a zero-padded copy of its row.
template <typename T, bool Tail>
inline void matmul_tile(T* out, size_t ldo, const T* A, size_t sa, size_t sk, const T* B, size_t sbk, size_t M, size_t K,
                        size_t i0, size_t j0, size_t cols) {
    constexpr size_t R = 4, W = 16;
    size_t a[R];  // rows past M repeat the last row; their sums are not stored
    for (size_t r = 0; r < R; r++) a[r] = (i0 + r < M ? i0 + r : M - 1) * sa;
    T acc[R][W] = {}, pad[W] = {};
    for (size_t k = 0; k < K; k++) {
        const T* b = B + k * sbk + j0;
        if (Tail) {
            for (size_t j = 0; j < cols; j++) pad[j] = b[j];
            b = pad;
        }
        T a0 = A[a[0] + k * sk], a1 = A[a[1] + k * sk], a2 = A[a[2] + k * sk], a3 = A[a[3] + k * sk];
        #pragma omp simd
        for (size_t j = 0; j < W; j++) {
            acc[0][j] = matmul_madd(a0, b[j], acc[0][j]), acc[1][j] = matmul_madd(a1, b[j], acc[1][j]);
            acc[2][j] = matmul_madd(a2, b[j], acc[2][j]), acc[3][j] = matmul_madd(a3, b[j], acc[3][j]);
        }
    }
    for (size_t r = 0; r < R; r++) {
        if (i0 + r >= M) break;
        for (size_t j = 0; j < (Tail ? cols : W); j++) out[(i0 + r) * ldo + j0 + j] += acc[r][j];
    }
}

// out (M, P) += A (M, K) @ B (K, P) for B with unit column stride (B[k, j] = B[k * sbk + j]),
// in tiles of 4 output rows x 16 columns that keep their sums in registers while k streams
// past, so every loaded B value feeds four multiply-adds. It reads B where it lies, so a
// matmul of a few rows (decoding a token) costs one pass over the weight and no copy.
template <typename T>
void matmul_tiles(T* out, size_t ldo, const T* A, size_t sa, size_t sk, const T* B, size_t sbk, size_t M, size_t K, size_t P, bool parallel) {
    constexpr size_t R = 4, W = 16;
    #pragma omp parallel for collapse(2) schedule(static) if (parallel && M * K * P >= 16 * PARALLEL_MIN_WORK)
    for (size_t it = 0; it < (M + R - 1) / R; it++) {
        for (size_t jt = 0; jt < (P + W - 1) / W; jt++) {
            size_t i0 = it * R, j0 = jt * W;
            if (j0 + W <= P) matmul_tile<T, false>(out, ldo, A, sa, sk, B, sbk, M, K, i0, j0, W);
            else matmul_tile<T, true>(out, ldo, A, sa, sk, B, sbk, M, K, i0, j0, P - j0);
        }
    }
}

#ifndef __CUDACC__
// The blocked matmul of many rows, in float, in GotoBLAS's loop order. The threads first copy B
// into packed strips of 16 columns (k-major, zero-padded past P), shared by all (at most
// MATMUL_PACKED_B_MAX floats at a time: a chunk of columns). Then each thread takes blocks of up
// to MATMUL_MC rows; for each block of MATMUL_NC columns and each slice of MATMUL_KC of k it
// copies the slice of A into strips of 6 rows (k-major, zero-padded past M), and a micro-kernel
// adds the slice's terms to 6 x 16 tiles of sums held in 12 AVX2 registers: per k, two loads of
// B and six broadcasts of A feed 12 multiply-adds, while one strip of B stays in L1. Between
// slices a tile's sums wait in the thread's scratch `acc`, so every element still takes its K
// terms in order from 0 and is added to out once, after its last slice: the same bits as
// matmul_plain, whichever thread computes a block and however the blocks are cut.
constexpr size_t MATMUL_MR = 6, MATMUL_NR = 16;                     // a micro-tile
constexpr size_t MATMUL_MC = 48, MATMUL_NC = 512, MATMUL_KC = 256;  // a thread's block: rows, columns, k-slice (fit in L2)
constexpr size_t MATMUL_BLOCKED_MIN_ROWS = 32;                      // fewer rows: matmul_tiles
constexpr size_t MATMUL_PACKED_B_MAX = (size_t)1 << 22;             // floats of B packed at once (16 MB)
typedef float matmul_f8 __attribute__((vector_size(32)));          // 8 floats: one AVX2 register
#ifdef __FMA__
#define MATMUL_MADD8(a, b, c) _mm256_fmadd_ps(a, b, c)
#else
#define MATMUL_MADD8(a, b, c) ((a) * (b) + (c))
#endif

// A 6 x 16 tile of sums continued through the kc terms of the packed strips a (kc, 6) and b
// (kc, 16): from 0 when first, else from acc (rows ldc apart, 32-byte aligned); at the end added
// to out (rows ldo apart) when out is given, else stored back to acc.
inline void matmul_micro(float* acc, size_t ldc, const float* a, const float* b, size_t kc, bool first, float* out, size_t ldo) {
    matmul_f8 c[MATMUL_MR][2];
    #pragma GCC unroll 6
    for (size_t r = 0; r < MATMUL_MR; r++) {
        if (first) c[r][0] = c[r][1] = matmul_f8{};
        else c[r][0] = *(const matmul_f8*)(acc + r * ldc), c[r][1] = *(const matmul_f8*)(acc + r * ldc + 8);
    }
    for (size_t k = 0; k < kc; k++) {
        matmul_f8 b0 = *(const matmul_f8*)(b + k * MATMUL_NR), b1 = *(const matmul_f8*)(b + k * MATMUL_NR + 8);
        #pragma GCC unroll 6
        for (size_t r = 0; r < MATMUL_MR; r++) {
            float v = a[k * MATMUL_MR + r];
            matmul_f8 x = {v, v, v, v, v, v, v, v};
            c[r][0] = MATMUL_MADD8(x, b0, c[r][0]);
            c[r][1] = MATMUL_MADD8(x, b1, c[r][1]);
        }
    }
    #pragma GCC unroll 6
    for (size_t r = 0; r < MATMUL_MR; r++) {
        if (out) {
            matmul_f8 o0, o1;
            memcpy(&o0, out + r * ldo, sizeof(o0)), memcpy(&o1, out + r * ldo + 8, sizeof(o1));
            o0 += c[r][0], o1 += c[r][1];
            memcpy(out + r * ldo, &o0, sizeof(o0)), memcpy(out + r * ldo + 8, &o1, sizeof(o1));
        } else {
            *(matmul_f8*)(acc + r * ldc) = c[r][0], *(matmul_f8*)(acc + r * ldc + 8) = c[r][1];
        }
    }
}

// 32-byte aligned scratch of at least n floats, kept between calls in `memory`
inline float* matmul_scratch(std::vector<float>& memory, size_t n) {
    if (memory.size() < n + 8) memory.resize(n + 8);
    return (float*)(((uintptr_t)memory.data() + 31) & ~(uintptr_t)31);
}

inline void matmul_blocked(float* out, size_t ldo, const float* A, size_t sa, size_t sk, const float* B, size_t sbk, size_t sbj, size_t M,
                           size_t K, size_t P, bool parallel) {
    constexpr size_t MR = MATMUL_MR, NR = MATMUL_NR, MC = MATMUL_MC, NC = MATMUL_NC, KC = MATMUL_KC;
    static thread_local std::vector<float> shared_memory;  // the calling thread's: the packed B, which its team shares
    static thread_local std::vector<float> thread_memory;
    // blocks of MC rows, or fewer where that leaves under 8 blocks to share between the threads
    size_t block_rows = parallel ? std::min(MC, std::max(MR, ((M + 7) / 8 + MR - 1) / MR * MR)) : MC;
    // B is packed a chunk of columns at a time: all of it, unless that is more than MATMUL_PACKED_B_MAX
    size_t chunk = std::max(NC, MATMUL_PACKED_B_MAX / std::max(K, (size_t)1) / NC * NC);
    size_t row_blocks = (M + block_rows - 1) / block_rows;
    float* bp = matmul_scratch(shared_memory, (std::min(chunk, P) + NR - 1) / NR * K * NR);  // (chunk / 16, K, 16) strips of B
    #pragma omp parallel if (parallel && M * K * P >= 16 * PARALLEL_MIN_WORK)
    {
        float* ap = matmul_scratch(thread_memory, MC * KC + MC * NC);  // (MC / 6, KC, 6) strips of a slice of A
        float* acc = ap + MC * KC;                                     // (MC, NC) a block's sums between slices
        for (size_t c0 = 0; c0 < P; c0 += chunk) {  // every thread walks the chunks
            size_t c1 = std::min(P, c0 + chunk), strips_chunk = (c1 - c0 + NR - 1) / NR;
            // pack B[:, c0..c1) as strips of 16 columns: bp[s][k][c] = B[k, c0 + 16 s + c], zero past c1
            #pragma omp for schedule(static)
            for (size_t s = 0; s < strips_chunk; s++) {
                float* dst = bp + s * K * NR;
                size_t cols = std::min(NR, c1 - c0 - s * NR);
                const float* src = B + (c0 + s * NR) * sbj;
                if (sbj == 1 && cols == NR) {  // whole rows of 16: two vector copies per k
                    for (size_t k = 0; k < K; k++) memcpy(dst + k * NR, src + k * sbk, NR * sizeof(float));
                } else if (sbk == 1) {  // B is a transpose: read its columns along k
                    for (size_t c = 0; c < cols; c++) {
                        for (size_t k = 0; k < K; k++) dst[k * NR + c] = src[k + c * sbj];
                    }
                    for (size_t k = 0; k < K; k++) {
                        for (size_t c = cols; c < NR; c++) dst[k * NR + c] = 0.0f;
                    }
                } else {
                    for (size_t k = 0; k < K; k++) {
                        for (size_t c = 0; c < cols; c++) dst[k * NR + c] = src[k * sbk + c * sbj];
                        for (size_t c = cols; c < NR; c++) dst[k * NR + c] = 0.0f;
                    }
                }
            }
            // (the implicit barrier: B is packed) a block of rows at a time, all the chunk's columns
            #pragma omp for schedule(dynamic, 1)
            for (size_t blk = 0; blk < row_blocks; blk++) {
                size_t i0 = blk * block_rows, mc = std::min(block_rows, M - i0), strips_m = (mc + MR - 1) / MR;
                for (size_t j0 = c0; j0 < c1; j0 += NC) {
                    size_t nc = std::min(NC, c1 - j0), strips_n = (nc + NR - 1) / NR;
                    bool edge = false;
                    for (size_t k0 = 0; k0 < K; k0 += KC) {
                        size_t kc = std::min(KC, K - k0);
                        bool last = k0 + kc == K;
                        // pack A[i0.., k0..] as strips of 6 rows: ap[s][k][r] = A[i0 + 6 s + r, k0 + k], zero past M
                        for (size_t s = 0; s < strips_m; s++) {
                            float* dst = ap + s * kc * MR;
                            size_t rows = std::min(MR, mc - s * MR);
                            const float* src = A + (i0 + s * MR) * sa + k0 * sk;
                            if (rows == MR && sk == 1) {  // rows of A along k: six streams
                                for (size_t k = 0; k < kc; k++) {
                                    #pragma GCC unroll 6
                                    for (size_t r = 0; r < MR; r++) dst[k * MR + r] = src[r * sa + k];
                                }
                                continue;
                            }
                            if (rows == MR && sa == 1) {  // A is a transpose: six neighbours per k
                                for (size_t k = 0; k < kc; k++) memcpy(dst + k * MR, src + k * sk, MR * sizeof(float));
                                continue;
                            }
                            for (size_t k = 0; k < kc; k++) {
                                for (size_t r = 0; r < rows; r++) dst[k * MR + r] = src[r * sa + k * sk];
                                for (size_t r = rows; r < MR; r++) dst[k * MR + r] = 0.0f;
                            }
                        }
                        // a strip of B stays in L1 while the block's strips of A pass it; after the last
                        // slice a whole tile adds its sums to out, a tile at the edge through acc
                        for (size_t sn = 0; sn < strips_n; sn++) {
                            const float* b = bp + ((j0 - c0) / NR + sn) * K * NR + k0 * NR;
                            for (size_t sm = 0; sm < strips_m; sm++) {
                                bool whole = (sm + 1) * MR <= mc && (sn + 1) * NR <= nc;
                                float* o = last && whole ? out + (i0 + sm * MR) * ldo + j0 + sn * NR : nullptr;
                                matmul_micro(acc + sm * MR * NC + sn * NR, NC, ap + sm * kc * MR, b, kc, k0 == 0, o, ldo);
                                edge |= !whole;
                            }
                        }
                    }
                    if (!edge) continue;
                    for (size_t r = 0; r < mc; r++) {
                        bool whole_rows = r < mc / MR * MR;
                        for (size_t c = whole_rows ? nc / NR * NR : 0; c < nc; c++) out[(i0 + r) * ldo + j0 + c] += acc[r * NC + c];
                    }
                }
            }
        }
    }
}
#endif

// out (M, P) += A (M, K) @ B (K, P), the sums of matmul_plain: matmul_blocked for many rows in
// float (training, a prompt's prefill), else matmul_tiles (a few rows: decoding; double: the
// tests), through a transposed copy of B where its columns are not contiguous. parallel: false
// keeps it on the calling thread (a caller that is one of a team already).
template <typename T>
void matmul_accumulate(T* out, size_t ldo, const T* A, size_t sa, size_t sk, const T* B, size_t sbk, size_t sbj, size_t M, size_t K,
                       size_t P, bool parallel = true) {
#ifndef __CUDACC__
    if constexpr (std::is_same<T, float>::value) {
        if (M >= MATMUL_BLOCKED_MIN_ROWS) return matmul_blocked(out, ldo, A, sa, sk, B, sbk, sbj, M, K, P, parallel);
    }
#endif
    if (sbj == 1) return matmul_tiles(out, ldo, A, sa, sk, B, sbk, M, K, P, parallel);
    std::vector<T> bt(K * P);  // B (K, P) row-major
    for (size_t k = 0; k < K; k++) {
        for (size_t j = 0; j < P; j++) bt[k * P + j] = B[k * sbk + j * sbj];
    }
    matmul_tiles(out, ldo, A, sa, sk, bt.data(), P, M, K, P, parallel);
}

// wt (C, OC) = weight (OC, C)^T
template <typename T>
void matmul_transpose_weight(T* wt, const T* weight, size_t C, size_t OC) {
    for (size_t o = 0; o < OC; o++) {
        for (size_t c = 0; c < C; c++) wt[c * OC + o] = weight[o * C + c];
    }
}

// out (N, OC) = inp (N, C) @ wt (C, OC): the weight transposed already (inference does it once)
template <typename T>
void matmul_forward_transposed(T* out, const T* inp, const T* wt, size_t N, size_t C, size_t OC) {
    std::fill(out, out + N * OC, T(0));
    matmul_accumulate(out, OC, inp, C, 1, wt, OC, 1, N, C, OC);
}

// out (N, OC) = inp (N, C) @ weight (OC, C)^T, no bias (Llama has none): B[k, j] = weight[j, k]
template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, size_t N, size_t C, size_t OC) {
    std::fill(out, out + N * OC, T(0));
    matmul_accumulate(out, OC, inp, C, 1, weight, 1, C, N, C, OC);
}

// dinp (N, C) += dout (N, OC) @ weight (OC, C);  dweight (OC, C) += dout^T @ inp
template <typename T>
void matmul_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight, size_t N, size_t C, size_t OC) {
    matmul_accumulate(dinp, C, dout, OC, 1, weight, C, 1, N, OC, C);
    matmul_accumulate(dweight, C, dout, 1, OC, inp, C, 1, OC, N, C);
}

#ifdef XWIN_CUDA
// Matmuls go to cuBLAS. A row-major (R, K) matrix is a column-major (K, R) one, so
//   out (N, OC) = inp (N, C) @ W^T          is  out^T = op_T(W) op_N(inp)     (m=OC, n=N, k=C)
//   dinp (N, C) += dout (N, OC) @ W         is  dinp^T += W^T-as-stored dout^T (m=C, n=N, k=OC)
//   dW (OC, C) += dout^T @ inp              is  dW^T += inp^T op_T(dout^T)    (m=C, n=OC, k=N)
// Parameter gradients are FP32 (cuBLAS writes FP32 C from floatX A and B).
// ld_out: the row stride of out (and of dout in the backward), OC when 0; the head's logits rows
// are padded_vocab(V) apart.
inline void matmul_forward_cuda(floatX* out, const floatX* inp, const floatX* weight, size_t N, size_t C, size_t OC, cudaStream_t stream,
                                size_t ld_out = 0) {
    NVTX_RANGE_FN();
    int ldo = (int)(ld_out ? ld_out : OC);
    gemm(true, false, (int)OC, (int)N, (int)C, 1.0f, weight, (int)C, 0, inp, (int)C, 0, 0.0f, out, CUBLAS_FLOATX, ldo, 0, 1, stream);
}

inline void matmul_backward_cuda(floatX* dinp, float* dweight, const floatX* dout, const floatX* inp, const floatX* weight,
                                 size_t N, size_t C, size_t OC, cudaStream_t stream, size_t ld_out = 0) {
    NVTX_RANGE_FN();
    int ldo = (int)(ld_out ? ld_out : OC);
    gemm(false, false, (int)C, (int)N, (int)OC, 1.0f, weight, (int)C, 0, dout, ldo, 0, 1.0f, dinp, CUBLAS_FLOATX, (int)C, 0, 1, stream);
    gemm(false, true, (int)C, (int)OC, (int)N, 1.0f, inp, (int)C, 0, dout, ldo, 0, 1.0f, dweight, CUDA_R_32F, (int)C, 0, 1, stream);
}

// Two matmuls of one input and of weights of one shape (K and V; gate and up) in one cuBLAS call:
// a strided batch of 2, the second weight and output at their offsets from the first, the input
// shared (stride 0). out_a = inp @ w_a^T, out_b = inp @ w_b^T, each (N, OC). The CPU twin is
// matmul_forward twice; the result is the same two GEMMs, bit for bit.
inline void matmul_forward_pair_cuda(floatX* out_a, floatX* out_b, const floatX* inp, const floatX* w_a, const floatX* w_b, size_t N, size_t C,
                                     size_t OC, cudaStream_t stream) {
    NVTX_RANGE_FN();
    gemm(true, false, (int)OC, (int)N, (int)C, 1.0f, w_a, (int)C, w_b - w_a, inp, (int)C, 0, 0.0f, out_a, CUBLAS_FLOATX, (int)OC, out_b - out_a, 2,
         stream);
}

// The pair's backward: dinp += dout_a @ w_a, then += dout_b @ w_b (two GEMMs into one output, in
// matmul_backward's order); dw_a += dout_a^T @ inp and dw_b += dout_b^T @ inp in one batch of 2.
inline void matmul_backward_pair_cuda(floatX* dinp, float* dw_a, float* dw_b, const floatX* dout_a, const floatX* dout_b, const floatX* inp,
                                      const floatX* w_a, const floatX* w_b, size_t N, size_t C, size_t OC, cudaStream_t stream) {
    NVTX_RANGE_FN();
    gemm(false, false, (int)C, (int)N, (int)OC, 1.0f, w_a, (int)C, 0, dout_a, (int)OC, 0, 1.0f, dinp, CUBLAS_FLOATX, (int)C, 0, 1, stream);
    gemm(false, false, (int)C, (int)N, (int)OC, 1.0f, w_b, (int)C, 0, dout_b, (int)OC, 0, 1.0f, dinp, CUBLAS_FLOATX, (int)C, 0, 1, stream);
    gemm(false, true, (int)C, (int)OC, (int)N, 1.0f, inp, (int)C, 0, dout_a, (int)OC, dout_b - dout_a, 1.0f, dw_a, CUDA_R_32F, (int)C, dw_b - dw_a,
         2, stream);
}

// Q, K and V of one input: q = inp @ wq^T (N, C), k and v = inp @ wk^T, wv^T (N, KVD). With as many
// kv heads as heads (KVD = C: Llama-2-7B) and the three weights and outputs evenly spaced (the
// model's tensors are: wk follows every layer's wq, wv every layer's wk), one cuBLAS batch of 3;
// else (grouped-query heads) Q alone and K, V as a pair. The CPU twin is matmul_forward three times.
inline bool evenly_spaced(const void* a, const void* b, const void* c) { return (const char*)b - (const char*)a == (const char*)c - (const char*)b; }

inline void matmul_forward_qkv_cuda(floatX* q, floatX* k, floatX* v, const floatX* inp, const floatX* wq, const floatX* wk, const floatX* wv,
                                    size_t N, size_t C, size_t KVD, cudaStream_t stream) {
    NVTX_RANGE_FN();
    if (KVD == C && evenly_spaced(wq, wk, wv) && evenly_spaced(q, k, v)) {
        gemm(true, false, (int)C, (int)N, (int)C, 1.0f, wq, (int)C, wk - wq, inp, (int)C, 0, 0.0f, q, CUBLAS_FLOATX, (int)C, k - q, 3, stream);
        return;
    }
    matmul_forward_cuda(q, inp, wq, N, C, C, stream);
    matmul_forward_pair_cuda(k, v, inp, wk, wv, N, C, KVD, stream);
}

// its backward: dinp += dq @ wq + dk @ wk + dv @ wv (three GEMMs, in that order); the weight
// gradients in one batch of 3 when evenly spaced with KVD = C, else dwq alone and dwk, dwv as a pair
inline void matmul_backward_qkv_cuda(floatX* dinp, float* dwq, float* dwk, float* dwv, const floatX* dq, const floatX* dk, const floatX* dv,
                                     const floatX* inp, const floatX* wq, const floatX* wk, const floatX* wv, size_t N, size_t C, size_t KVD,
                                     cudaStream_t stream) {
    NVTX_RANGE_FN();
    if (KVD == C && evenly_spaced(dwq, dwk, dwv) && evenly_spaced(dq, dk, dv)) {
        const floatX* w[3] = {wq, wk, wv};
        const floatX* d[3] = {dq, dk, dv};
        for (int i = 0; i < 3; i++) {
            gemm(false, false, (int)C, (int)N, (int)C, 1.0f, w[i], (int)C, 0, d[i], (int)C, 0, 1.0f, dinp, CUBLAS_FLOATX, (int)C, 0, 1, stream);
        }
        gemm(false, true, (int)C, (int)C, (int)N, 1.0f, inp, (int)C, 0, dq, (int)C, dk - dq, 1.0f, dwq, CUDA_R_32F, (int)C, dwk - dwq, 3, stream);
        return;
    }
    matmul_backward_cuda(dinp, dwq, dq, inp, wq, N, C, C, stream);
    matmul_backward_pair_cuda(dinp, dwk, dwv, dk, dv, inp, wk, wv, N, C, KVD, stream);
}
#endif

// ---- rope: frequencies, table, reference, kernel, launchers (rope_inv_freq, rope_table, rope_forward/_backward/_at)
// RoPE's inverse frequency of pair i (i < head_dim / 2), the one place it is computed: in float32
// step by step as transformers does (modeling_rope_utils: the default, linear and llama3 types),
// so that the angles below are its bits.
//   default: inv_freq = 1 / theta^(2i/hd)
//   linear:  inv_freq / factor (positions divided by factor)
//   llama3:  with wavelen = 2 pi / inv_freq and the original context n = original_max_position_embeddings,
//            wavelen < n / high_freq_factor (the high frequencies):  inv_freq, kept
//            wavelen > n / low_freq_factor  (the low frequencies):   inv_freq / factor
//            in between, s = (n / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor) blends them:
//                                                                    (1 - s) inv_freq / factor + s inv_freq
// transformers' attention scaling of cos and sin is 1 for both types: only the frequencies change.
inline float rope_inv_freq(const LlamaConfig& c, int i) {
    int hd = head_dim(c);
    float inv_freq = 1.0f / powf((float)c.rope_theta, (float)(2 * i) / (float)hd);
    float factor = (float)c.rope_factor;
    if (c.rope_scaling == ROPE_LINEAR) return inv_freq / factor;
    if (c.rope_scaling != ROPE_LLAMA3) return inv_freq;
    // the band edges are Python floats, compared with the float32 wavelength in float32
    float wavelen = (float)(2 * M_PI) / inv_freq;
    float low_freq_wavelen = (float)(c.rope_original_max_pos / c.rope_low_freq_factor);
    float high_freq_wavelen = (float)(c.rope_original_max_pos / c.rope_high_freq_factor);
    if (wavelen < high_freq_wavelen) return inv_freq;
    if (wavelen > low_freq_wavelen) return inv_freq / factor;
    float smooth = ((float)c.rope_original_max_pos / wavelen - (float)c.rope_low_freq_factor) /
                   (float)(c.rope_high_freq_factor - c.rope_low_freq_factor);
    float scaled = (1.0f - smooth) * inv_freq;  // two statements: no contraction into an FMA
    return scaled / factor + smooth * inv_freq;
}

// A config that carries only RoPE's fields (head_dim hd, theta, no scaling), for tables of bare ops.
inline LlamaConfig rope_config(int hd, double theta) {
    LlamaConfig c{};
    c.dim = hd;
    c.n_heads = 1;
    c.rope_theta = theta;
    return c;
}

// cos and sin of RoPE's angle for position pos at an inverse frequency, in float32 as transformers
// computes them (angle = pos * inv_freq).
inline void rope_cos_sin(int pos, float inv_freq, float* cos_out, float* sin_out) {
    float angle = (float)pos * inv_freq;
    *cos_out = cosf(angle);
    *sin_out = sinf(angle);
}

// The cos and sin of every position < max_T and pair, computed once (per model allocation or
// inference state) from rope_inv_freq by rope_cos_sin, so the ops below and the CUDA kernel read
// them and call no sin, cos or pow.
// table (max_T, hd/2, 2): {cos, sin} of position t, pair i at (t * hd/2 + i) * 2
inline size_t rope_table_size(int max_T, int hd) { return (size_t)max_T * (hd / 2) * 2; }

inline void rope_table_fill(float* table, int max_T, const LlamaConfig& c) {
    int half = head_dim(c) / 2;
    std::vector<float> inv_freq(half);
    for (int i = 0; i < half; i++) inv_freq[i] = rope_inv_freq(c, i);
    for (int t = 0; t < max_T; t++) {
        for (int i = 0; i < half; i++) rope_cos_sin(t, inv_freq[i], &table[((size_t)t * half + i) * 2], &table[((size_t)t * half + i) * 2 + 1]);
    }
}

inline std::vector<float> rope_table(int max_T, const LlamaConfig& c) {
    std::vector<float> table(rope_table_size(max_T, head_dim(c)));
    rope_table_fill(table.data(), max_T, c);
    return table;
}

// the table of unscaled RoPE on heads of size hd (the op tests)
inline std::vector<float> rope_table(int max_T, int hd, double theta) { return rope_table(max_T, rope_config(hd, theta)); }

// In place on x (B, T, NH, hd), rotate-half layout: for i < hd/2 the pair is (x[i], x[i + hd/2]):
//   x[i] <- x[i] cos - x[i+hd/2] sin,  x[i+hd/2] <- x[i+hd/2] cos + x[i] sin,  at position t.
// The backward is the inverse rotation applied to the gradient (sin -> -sin). cos and sin come
// from a rope_table of at least T (or the largest position + 1) rows.

// the NH heads (NH, hd) of one token at position pos; direction +1 rotates, -1 rotates back
template <typename T>
void rope_rotate_token(T* x, const float* table, int pos, size_t NH, int hd, int direction) {
    int half = hd / 2;
    const float* cs_row = table + (size_t)pos * half * 2;
    for (int i = 0; i < half; i++) {
        T cs = T(cs_row[2 * i]), sn = T(cs_row[2 * i + 1]) * T(direction);
        for (size_t h = 0; h < NH; h++) {
            T* v = x + h * hd;
            T x1 = v[i], x2 = v[i + half];
            v[i] = x1 * cs - x2 * sn;
            v[i + half] = x2 * cs + x1 * sn;
        }
    }
}

template <typename T>
void rope_rotate(T* x, const float* table, size_t B, size_t Tn, size_t NH, int hd, int direction) {
    #pragma omp parallel for collapse(2)
    for (size_t b = 0; b < B; b++) {
        for (size_t t = 0; t < Tn; t++) rope_rotate_token(x + (b * Tn + t) * NH * hd, table, (int)t, NH, hd, direction);
    }
}
template <typename T>
void rope_forward(T* x, const float* table, size_t B, size_t Tn, size_t NH, int hd) { rope_rotate(x, table, B, Tn, NH, hd, +1); }
template <typename T>
void rope_backward(T* dx, const float* table, size_t B, size_t Tn, size_t NH, int hd) { rope_rotate(dx, table, B, Tn, NH, hd, -1); }

// The forward at given positions (the new tokens of a KV cache): x (N, NH, hd), token n at position pos[n] (N)
template <typename T>
void rope_forward_at(T* x, const float* table, const int* pos, size_t N, size_t NH, int hd) {
    #pragma omp parallel for if (N * NH * hd >= PARALLEL_MIN_WORK)
    for (size_t n = 0; n < N; n++) rope_rotate_token(x + n * NH * hd, table, pos[n], NH, hd, +1);
}

#ifdef XWIN_CUDA
// one thread per rotated pair (token n = (b, t), h, i); the token sits at position pos[n], or at t
// when pos is null; direction +1 forward, -1 backward; cos and sin from the table (a float2 load)
__global__ void rope_kernel(floatX* x, const float* table, const int* pos, size_t B, int T, int NH, int hd, float direction) {
    int half = hd / 2;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * T * NH * half) return;
    int i = (int)(idx % half);
    size_t row = idx / half;  // (b, t, h)
    size_t token = row / NH;  // (b, t)
    int t = pos ? pos[token] : (int)(token % T);
    float2 cs = ((const float2*)table)[(size_t)t * half + i];
    float c = cs.x, s = cs.y * direction;
    floatX* v = x + row * hd;
    float x1 = to_float(v[i]), x2 = to_float(v[i + half]);
    v[i] = from_float<floatX>(x1 * c - x2 * s);
    v[i + half] = from_float<floatX>(x2 * c + x1 * s);
}

// direction +1 rotates (the forward), -1 rotates back (the backward): the two launchers below
// fix it, so the model names which one it means and the op test checks each against its twin.
// table: a rope_table on the device (8-byte aligned, as cudaMalloc gives); pos (B * T, device)
// or null: the position of each token (null: t).
inline void rope_cuda(floatX* x, const float* table, const int* pos, size_t B, int T, int NH, int hd, int direction, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;
    LAUNCH(rope_kernel, ceil_div(B * T * NH * (hd / 2), block_size), block_size, 0, stream, x, table, pos, B, T, NH, hd, (float)direction);
    cudaCheck(cudaGetLastError());
}

inline void rope_forward_cuda(floatX* x, const float* table, size_t B, int T, int NH, int hd, cudaStream_t stream) {
    NVTX_RANGE_FN();
    rope_cuda(x, table, nullptr, B, T, NH, hd, +1, stream);
}

inline void rope_backward_cuda(floatX* dx, const float* table, size_t B, int T, int NH, int hd, cudaStream_t stream) {
    NVTX_RANGE_FN();
    rope_cuda(dx, table, nullptr, B, T, NH, hd, -1, stream);
}

// x (N, NH, hd), token n at position pos[n] (N, device): rope_forward_at
inline void rope_forward_at_cuda(floatX* x, const float* table, const int* pos, size_t N, int NH, int hd, cudaStream_t stream) {
    NVTX_RANGE_FN();
    rope_cuda(x, table, pos, N, 1, NH, hd, +1, stream);
}

// a rope_table of max_T rows, computed on the host and copied into a new device buffer
inline float* rope_table_cuda(int max_T, const LlamaConfig& c) {
    std::vector<float> table = rope_table(max_T, c);
    float* d = nullptr;
    cudaCheck(cudaMalloc(&d, table.size() * sizeof(float)));
    cudaCheck(cudaMemcpy(d, table.data(), table.size() * sizeof(float), cudaMemcpyHostToDevice));
    return d;
}
#endif

// ---- attention: the spec, the CPU's per-head matmuls (attention_forward/_backward)
// Causal grouped-query attention.
//   q (B, T, H, hd), k and v (B, T, KV, hd); query head h reads kv head h / (H / KV).
//   att (B, H, T, T): softmax over t2 <= t of q.k / sqrt(hd); entries t2 > t are 0.
//   out (B, T, H, hd) = att @ v
// The plain loops are the spec; in float the CPU build runs attention_forward_matmul, the
// same sums as (T, T) and (T, hd) matmuls per head (test/test_ops.cpp asserts equal bits).
// Every dot product is one chain of matmul_madd from 0 in index order, as in the matmuls.
// One query row of causal attention over its n keys (key t2 at k + t2 * stride, its value at
// v + t2 * stride): a (n) gets the probabilities, o (hd) the probabilities' mix of the values.
// Each score is one chain of matmul_madd from 0 in index order, the softmax is taken against
// the max, each output element is one chain over the keys in order. The full forward's rows
// (attention_forward_plain) and the KV cache's (attention_cached_forward) are this row.
template <typename T>
void attention_row(T* o, T* a, const T* qv, const T* k, const T* v, size_t n, size_t stride, size_t hd, T scale) {
    constexpr size_t KEYS = 8;  // scores computed side by side: 8 independent chains, not one long one
    T maxv = -INFINITY;         // the scores q . k[t2] / sqrt(hd), and their max
    for (size_t t0 = 0; t0 < n; t0 += KEYS) {
        size_t keys = std::min(KEYS, n - t0);
        T s[KEYS] = {};
        if (keys == KEYS) {  // a whole group: the compiler unrolls the 8 chains
            for (size_t i = 0; i < hd; i++) {
                for (size_t j = 0; j < KEYS; j++) s[j] = matmul_madd(qv[i], k[(t0 + j) * stride + i], s[j]);
            }
        } else {
            for (size_t i = 0; i < hd; i++) {
                for (size_t j = 0; j < keys; j++) s[j] = matmul_madd(qv[i], k[(t0 + j) * stride + i], s[j]);
            }
        }
        for (size_t j = 0; j < keys; j++) {
            a[t0 + j] = s[j] * scale;
            if (a[t0 + j] > maxv) maxv = a[t0 + j];
        }
    }
    T sum = 0;  // softmax: exponentiate against the max, normalise
    for (size_t t2 = 0; t2 < n; t2++) {
        a[t2] = std::exp(a[t2] - maxv);
        sum += a[t2];
    }
    for (size_t t2 = 0; t2 < n; t2++) a[t2] /= sum;
    for (size_t i = 0; i < hd; i++) o[i] = 0;  // each o[i] one chain over the keys in order, all hd side by side
    for (size_t t2 = 0; t2 < n; t2++) {
        for (size_t i = 0; i < hd; i++) o[i] = matmul_madd(a[t2], v[t2 * stride + i], o[i]);
    }
}

template <typename T>
void attention_forward_plain(T* out, T* att, const T* q, const T* k, const T* v, size_t B, size_t Tn, size_t H, size_t KV, size_t hd) {
    T scale = T(1) / std::sqrt(T(hd));
    size_t group = H / KV;
    #pragma omp parallel for collapse(3)
    for (size_t b = 0; b < B; b++) {
        for (size_t h = 0; h < H; h++) {
            for (size_t t = 0; t < Tn; t++) {
                size_t first = (b * Tn * KV + h / group) * hd;  // the sequence's first key of head h's kv head
                T* a = att + ((b * H + h) * Tn + t) * Tn;
                attention_row(out + ((b * Tn + t) * H + h) * hd, a, q + ((b * Tn + t) * H + h) * hd, k + first, v + first, t + 1, KV * hd, hd, scale);
                for (size_t t2 = t + 1; t2 < Tn; t2++) a[t2] = 0;  // the future keys
            }
        }
    }
}

// dq += ..., dk += ..., dv += ... given dout (B, T, H, hd) and the saved att.
//   datt[t2] = dout . v[t2];  dscore[t2] = att[t2] * (datt[t2] - sum_j att[j] datt[j])
//   dq += scale * dscore @ k;  dk += scale * dscore^T q;  dv += att^T @ dout
// Parallel over (b, kv head): the query heads sharing one kv head add their sums to dk, dv in
// head order. Per head, each element of dq, dk, dv is one sum (over t2 for dq, over t for dk
// and dv) added at once.
template <typename T>
void attention_backward_plain(T* dq, T* dk, T* dv, const T* dout, const T* att, const T* q, const T* k, const T* v,
                              size_t B, size_t Tn, size_t H, size_t KV, size_t hd) {
    T scale = T(1) / std::sqrt(T(hd));
    size_t group = H / KV;
    #pragma omp parallel for collapse(2)
    for (size_t b = 0; b < B; b++) {
        for (size_t kh = 0; kh < KV; kh++) {
            std::vector<T> ds(Tn * Tn, T(0));  // (T, T) scale * dscore of one head
            const T* kb = k + (b * Tn * KV + kh) * hd;  // row t2 of this kv head at kb + t2 * KV * hd
            const T* vb = v + (b * Tn * KV + kh) * hd;
            T* dkb = dk + (b * Tn * KV + kh) * hd;
            T* dvb = dv + (b * Tn * KV + kh) * hd;
            for (size_t h = kh * group; h < (kh + 1) * group; h++) {
                const T* ah = att + (b * H + h) * Tn * Tn;     // (T, T)
                const T* qh = q + (b * Tn * H + h) * hd;       // row t at qh + t * H * hd
                const T* dh = dout + (b * Tn * H + h) * hd;
                T* dqh = dq + (b * Tn * H + h) * hd;
                for (size_t t = 0; t < Tn; t++) {
                    const T* a = ah + t * Tn;
                    T* dsr = ds.data() + t * Tn;
                    // datt[t2] = dout[t] . v[t2], kept in dsr; dot = sum over t2 of att * datt
                    T dot = 0;
                    for (size_t t2 = 0; t2 <= t; t2++) {
                        T datt = 0;
                        for (size_t i = 0; i < hd; i++) datt = matmul_madd(dh[t * H * hd + i], vb[t2 * KV * hd + i], datt);
                        dsr[t2] = datt;
                    }
                    for (size_t t2 = 0; t2 <= t; t2++) dot = matmul_madd(a[t2], dsr[t2], dot);
                    for (size_t t2 = 0; t2 <= t; t2++) dsr[t2] = a[t2] * (dsr[t2] - dot) * scale;
                }
                // dq[t] += ds[t] @ k;  dk[t2] += ds[:, t2]^T q;  dv[t2] += att[:, t2]^T dout
                for (size_t t = 0; t < Tn; t++) {
                    for (size_t i = 0; i < hd; i++) {
                        T acc = 0;
                        for (size_t t2 = 0; t2 <= t; t2++) acc = matmul_madd(ds[t * Tn + t2], kb[t2 * KV * hd + i], acc);
                        dqh[t * H * hd + i] += acc;
                    }
                }
                for (size_t t2 = 0; t2 < Tn; t2++) {
                    for (size_t i = 0; i < hd; i++) {
                        T acc_k = 0, acc_v = 0;
                        for (size_t t = t2; t < Tn; t++) {
                            acc_k = matmul_madd(ds[t * Tn + t2], qh[t * H * hd + i], acc_k);
                            acc_v = matmul_madd(ah[t * Tn + t2], dh[t * H * hd + i], acc_v);
                        }
                        dkb[t2 * KV * hd + i] += acc_k;
                        dvb[t2 * KV * hd + i] += acc_v;
                    }
                }
            }
        }
    }
}

#ifndef __CUDACC__
// The fast attention cuts the query rows into blocks of ATTENTION_ROWS: a block's rows see the
// keys before its end only, so the matmuls cover the causal half and a strip along the diagonal.
constexpr size_t ATTENTION_ROWS = 48;

// out[t, t2] = x[t] . y[t2] (hd each; x row t at x + t * sx, y row t2 at y + t2 * sy), out's rows
// Tn apart, over the causal blocks of ATTENTION_ROWS rows: a block's rows up to its last column,
// zeroed first (the scores q k^T of the forward, dout v^T of the backward)
inline void attention_causal_dots(float* out, const float* x, size_t sx, const float* y, size_t sy, size_t Tn, size_t hd) {
    for (size_t r0 = 0; r0 < Tn; r0 += ATTENTION_ROWS) {  // x[r0..r1) (rows, hd) @ y[0..r1)^T (hd, r1)
        size_t r1 = std::min(Tn, r0 + ATTENTION_ROWS);
        for (size_t t = r0; t < r1; t++) std::fill(out + t * Tn, out + t * Tn + r1, 0.0f);
        matmul_accumulate(out + r0 * Tn, Tn, x + r0 * sx, sx, 1, y, 1, sy, r1 - r0, hd, r1, false);
    }
}

// attention_forward_plain's sums as matmuls per (b, h), on matmul_accumulate: the scores q k^T of
// each block of rows, the softmax per row, then out = att @ v per block (the zeros of the keys
// after a row, up to its block's end, add exactly 0). Each (b, h) on one thread.
inline void attention_forward_matmul(float* out, float* att, const float* q, const float* k, const float* v, size_t B, size_t Tn, size_t H,
                                     size_t KV, size_t hd) {
    float scale = 1.0f / std::sqrt((float)hd);
    size_t group = H / KV;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (size_t b = 0; b < B; b++) {
        for (size_t h = 0; h < H; h++) {
            size_t kh = h / group;
            float* ah = att + (b * H + h) * Tn * Tn;       // (T, T)
            const float* qh = q + (b * Tn * H + h) * hd;   // row t at qh + t * H * hd
            const float* kb = k + (b * Tn * KV + kh) * hd;  // row t2 at kb + t2 * KV * hd
            const float* vb = v + (b * Tn * KV + kh) * hd;
            float* oh = out + (b * Tn * H + h) * hd;
            attention_causal_dots(ah, qh, H * hd, kb, KV * hd, Tn, hd);  // the scores, unscaled
            for (size_t t = 0; t < Tn; t++) {
                float* a = ah + t * Tn;
                float maxv = -INFINITY;
                for (size_t t2 = 0; t2 <= t; t2++) {
                    a[t2] = a[t2] * scale;
                    if (a[t2] > maxv) maxv = a[t2];
                }
                float sum = 0;
                for (size_t t2 = 0; t2 <= t; t2++) {
                    a[t2] = std::exp(a[t2] - maxv);
                    sum += a[t2];
                }
                for (size_t t2 = 0; t2 <= t; t2++) a[t2] /= sum;
                for (size_t t2 = t + 1; t2 < Tn; t2++) a[t2] = 0;
                std::fill(oh + t * H * hd, oh + t * H * hd + hd, 0.0f);
            }
            for (size_t r0 = 0; r0 < Tn; r0 += ATTENTION_ROWS) {  // out[r0..r1) = att[r0..r1, 0..r1) @ v[0..r1)
                size_t r1 = std::min(Tn, r0 + ATTENTION_ROWS);
                matmul_accumulate(oh + r0 * H * hd, H * hd, ah + r0 * Tn, Tn, 1, vb, KV * hd, 1, r1 - r0, r1, hd, false);
            }
        }
    }
}

// attention_backward_plain's sums as matmuls per (b, kv head), on matmul_accumulate: datt = dout
// v^T per block of rows, the softmax's backward per row into ds (zero after the diagonal), then
// per block dq += ds @ k over the keys before the block's end, and per block of keys
// dk += ds^T @ q and dv += att^T @ dout over the rows from the block's start (the zeros before
// a key's row keep its sum at 0, so the sums are the plain loops').
inline void attention_backward_matmul(float* dq, float* dk, float* dv, const float* dout, const float* att, const float* q, const float* k,
                                      const float* v, size_t B, size_t Tn, size_t H, size_t KV, size_t hd) {
    float scale = 1.0f / std::sqrt((float)hd);
    size_t group = H / KV;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (size_t b = 0; b < B; b++) {
        for (size_t kh = 0; kh < KV; kh++) {
            static thread_local std::vector<float> ds_memory;  // (T, T) scale * dscore of one head
            ds_memory.resize(Tn * Tn);
            float* ds = ds_memory.data();
            const float* kb = k + (b * Tn * KV + kh) * hd;
            const float* vb = v + (b * Tn * KV + kh) * hd;
            float* dkb = dk + (b * Tn * KV + kh) * hd;
            float* dvb = dv + (b * Tn * KV + kh) * hd;
            for (size_t h = kh * group; h < (kh + 1) * group; h++) {
                const float* ah = att + (b * H + h) * Tn * Tn;
                const float* qh = q + (b * Tn * H + h) * hd;
                const float* dh = dout + (b * Tn * H + h) * hd;
                float* dqh = dq + (b * Tn * H + h) * hd;
                attention_causal_dots(ds, dh, H * hd, vb, KV * hd, Tn, hd);  // datt
                for (size_t t = 0; t < Tn; t++) {
                    const float* a = ah + t * Tn;
                    float* dsr = ds + t * Tn;
                    float dot = 0;
                    for (size_t t2 = 0; t2 <= t; t2++) dot = matmul_madd(a[t2], dsr[t2], dot);
                    for (size_t t2 = 0; t2 <= t; t2++) dsr[t2] = a[t2] * (dsr[t2] - dot) * scale;
                    for (size_t t2 = t + 1; t2 < Tn; t2++) dsr[t2] = 0;
                }
                for (size_t r0 = 0; r0 < Tn; r0 += ATTENTION_ROWS) {
                    size_t r1 = std::min(Tn, r0 + ATTENTION_ROWS);
                    // dq[r0..r1) += ds[r0..r1, 0..r1) @ k[0..r1)
                    matmul_accumulate(dqh + r0 * H * hd, H * hd, ds + r0 * Tn, Tn, 1, kb, KV * hd, 1, r1 - r0, r1, hd, false);
                    // keys r0..r1: dk += ds[r0.., r0..r1)^T @ q[r0..], dv += att[r0.., r0..r1)^T @ dout[r0..]
                    matmul_accumulate(dkb + r0 * KV * hd, KV * hd, ds + r0 * Tn + r0, 1, Tn, qh + r0 * H * hd, H * hd, 1, r1 - r0, Tn - r0, hd, false);
                    matmul_accumulate(dvb + r0 * KV * hd, KV * hd, ah + r0 * Tn + r0, 1, Tn, dh + r0 * H * hd, H * hd, 1, r1 - r0, Tn - r0, hd, false);
                }
            }
        }
    }
}
#endif

template <typename T>
void attention_forward(T* out, T* att, const T* q, const T* k, const T* v, size_t B, size_t Tn, size_t H, size_t KV, size_t hd) {
#ifndef __CUDACC__
    if constexpr (std::is_same<T, float>::value) return attention_forward_matmul(out, att, q, k, v, B, Tn, H, KV, hd);
#endif
    attention_forward_plain(out, att, q, k, v, B, Tn, H, KV, hd);
}

template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* att, const T* q, const T* k, const T* v,
                        size_t B, size_t Tn, size_t H, size_t KV, size_t hd) {
#ifndef __CUDACC__
    if constexpr (std::is_same<T, float>::value) return attention_backward_matmul(dq, dk, dv, dout, att, q, k, v, B, Tn, H, KV, hd);
#endif
    attention_backward_plain(dq, dk, dv, dout, att, q, k, v, B, Tn, H, KV, hd);
}

// ---- flash attention: kernels and launchers (flash_attention_forward/_backward_cuda)
#ifdef XWIN_CUDA
// On the GPU, attention is flash attention (FlashAttention-2, Dao 2023), written here: the
// (T, T) scores and probabilities are never stored. A block takes FLASH_TILE query rows of one
// (b, h) and walks over the key/value tiles up to its diagonal (causal: the tiles after it are
// skipped), with the q, k and v tiles in shared memory. Per key tile, each warp computes the
// scores of its 16 query rows, s = q k^T * scale, and updates the row's running max m, sum l
// and output o (the online softmax):
//   m' = max(m, max_j s_j),  l = l e^(m - m') + sum_j e^(s_j - m'),  o = o e^(m - m') + sum_j e^(s_j - m') v_j
// and at the end writes out = o / l and lse = m + log l, the log-sum-exp of the row, which is
// all the backward keeps of the softmax. The backward recomputes P = exp(s - lse) per tile:
//   delta_t = sum_i dout[t, i] out[t, i]       (= sum_j P_tj dP_tj)
//   dP = dout v^T,  dS = P (dP - delta),  dq = scale dS k,  dk = scale dS^T q,  dv = P^T dout
// in two kernels and no atomics: one block per key tile accumulates dk and dv over every query
// tile from its diagonal on, of every query head of its group (a kv head is read in place by
// the query heads sharing it, nothing is expanded); one block per query tile accumulates dq
// over the key tiles up to its diagonal. Both recompute s (and dP): 7 tile products where one
// kernel adding dq atomically would do 5, for a deterministic backward. The backward's warps
// split a tile's rows in groups of 16 and the result's columns in two (BF16) or four (FP32)
// groups: 8 warps per block at D = 64 and 128, which keeps 8 warps resident per SM there on
// sm_80 and sm_90.
// The tile products are BF16 x BF16 with FP32 accumulation on the tensor cores (wmma, 16x16x16);
// the FP32 build does the same products in FP32 FMAs (wmma has no 16x16x16 FP32 shape, and
// TF32's 10-bit mantissa would not make an FP32 build). A head of size hd <= 128 is zero-padded
// in shared memory to D = 16, 32, 64 or 128 columns.
//   q, out (B, T, H, hd);  k, v (B, T, KV, hd);  lse, delta (B, H, T) FP32

// ---- warp tiles: a 16 x 16 FP32 tile held by one warp, accumulated from shared memory.
// warp_tile_mma: t += A (16 x K) @ B (K x 16), A row-major with row stride lda; B row-major with
// stride ldb, or with TRANS_B the transpose of a row-major (16 x K) matrix of stride ldb. K is a
// multiple of 16, pointers 32-byte aligned, strides multiples of 16 bytes (wmma's rules).
#ifndef ENABLE_FP32
struct WarpTile {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;
};
__device__ inline void warp_tile_zero(WarpTile& t) { nvcuda::wmma::fill_fragment(t.f, 0.0f); }
__device__ inline void warp_tile_load(WarpTile& t, const float* p, int ld) {
    nvcuda::wmma::load_matrix_sync(t.f, p, ld, nvcuda::wmma::mem_row_major);
}
__device__ inline void warp_tile_store(float* p, int ld, const WarpTile& t) {
    nvcuda::wmma::store_matrix_sync(p, t.f, ld, nvcuda::wmma::mem_row_major);
}
template <bool TRANS_B>
__device__ inline void warp_tile_mma(WarpTile& t, const floatX* a, int lda, const floatX* b, int ldb, int K) {
    namespace wmma = nvcuda::wmma;
    typedef typename std::conditional<TRANS_B, wmma::col_major, wmma::row_major>::type LayoutB;
    #pragma unroll 1
    for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, floatX, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, floatX, LayoutB> fb;
        wmma::load_matrix_sync(fa, a + k, lda);
        wmma::load_matrix_sync(fb, TRANS_B ? b + k : b + (size_t)k * ldb, ldb);
        wmma::mma_sync(t.f, fa, fb, t.f);
    }
}
#else
struct WarpTile {
    float x[8];  // lane l holds the elements (l / 16 + 2 j, l % 16), j = 0..7
};
__device__ inline void warp_tile_zero(WarpTile& t) {
    #pragma unroll
    for (int j = 0; j < 8; j++) t.x[j] = 0.0f;
}
__device__ inline void warp_tile_load(WarpTile& t, const float* p, int ld) {
    int lane = threadIdx.x % 32;
    #pragma unroll
    for (int j = 0; j < 8; j++) t.x[j] = p[(lane / 16 + 2 * j) * ld + lane % 16];
}
__device__ inline void warp_tile_store(float* p, int ld, const WarpTile& t) {
    int lane = threadIdx.x % 32;
    #pragma unroll
    for (int j = 0; j < 8; j++) p[(lane / 16 + 2 * j) * ld + lane % 16] = t.x[j];
}
template <bool TRANS_B>
__device__ inline void warp_tile_mma(WarpTile& t, const float* a, int lda, const float* b, int ldb, int K) {
    int lane = threadIdx.x % 32, c = lane % 16;
    const float* a_lane = a + (lane / 16) * lda;  // the lane's rows are a_lane + 2 j lda
    #pragma unroll 1
    for (int k = 0; k < K; k++) {
        float bk = TRANS_B ? b[c * ldb + k] : b[k * ldb + c];
        #pragma unroll
        for (int j = 0; j < 8; j++) t.x[j] += a_lane[2 * j * lda + k] * bk;
    }
}
#endif

// ---- the flash kernels' tiles in shared memory
constexpr int FLASH_TILE = sizeof(floatX) == 2 ? 64 : 32;  // query rows, and key rows, of a tile (FP32: half, for shared memory)
constexpr int FLASH_THREADS = 2 * FLASH_TILE;                // the forward: one warp per 16 rows of a tile
// row strides in shared memory (elements): padded by 16 bytes, keeping wmma's multiples of 16 bytes
__host__ __device__ constexpr int flash_ld(int cols) { return cols + 16 / (int)sizeof(floatX); }  // floatX rows
__host__ __device__ constexpr int flash_ldf(int cols) { return cols + 4; }                     // FP32 rows

// Consecutive arrays in one shared-memory buffer, each 128-byte aligned; with a null buffer it
// only adds up the bytes, so the launcher sizes the buffer with the kernel's own carving.
struct SharedCarver {
    char* base;
    size_t bytes = 0;
    template <typename U>
    __host__ __device__ U* take(size_t count) {
        U* p = base ? (U*)(base + bytes) : nullptr;
        bytes += (count * sizeof(U) + 127) / 128 * 128;
        return p;
    }
};

// The forward's tiles: q, k, v (FLASH_TILE, D), the scores s (FP32) and probabilities p of the
// key tile (FLASH_TILE, FLASH_TILE), the output o (FLASH_TILE, D) in FP32.
struct FlashForwardShared {
    floatX *q, *k, *v, *p;
    float *s, *o;
};
template <int D>
__host__ __device__ inline size_t flash_forward_shared(FlashForwardShared* s, char* base) {
    SharedCarver c{base};
    s->q = c.take<floatX>(FLASH_TILE * flash_ld(D));
    s->k = c.take<floatX>(FLASH_TILE * flash_ld(D));
    s->v = c.take<floatX>(FLASH_TILE * flash_ld(D));
    s->p = c.take<floatX>(FLASH_TILE * flash_ld(FLASH_TILE));
    s->s = c.take<float>(FLASH_TILE * flash_ldf(FLASH_TILE));
    s->o = c.take<float>(FLASH_TILE * flash_ldf(D));
    return c.bytes;
}

// The backward's warps (both kernels): the FLASH_TILE rows of a block's tile (key rows in the dk/dv
// kernel, query rows in the dq kernel) are FLASH_ROW_GROUPS groups of 16 rows, and the D columns
// of its results (dk and dv, or dq) are split in flash_backward_col_groups<D>() column groups;
// warp w takes the rows of group w % FLASH_ROW_GROUPS and the columns of group w / FLASH_ROW_GROUPS.
// Splitting the columns shares a row group's accumulator tiles among warps (at D = 128 in BF16 a
// warp of the dk/dv kernel holds 4 + 4 tiles, not 8 + 8) and makes a block 8 warps from D = 32
// (BF16) or 64 (FP32) on, so that 8 warps stay resident per SM (dev/occupancy.py checks it).
constexpr int FLASH_ROW_GROUPS = FLASH_TILE / 16;
template <int D>
__host__ __device__ constexpr int flash_backward_col_groups() {
    return 8 / FLASH_ROW_GROUPS < D / 16 ? 8 / FLASH_ROW_GROUPS : D / 16;  // at most 8 warps, at least one column tile each
}
template <int D>
__host__ __device__ constexpr int flash_backward_threads() { return 32 * FLASH_ROW_GROUPS * flash_backward_col_groups<D>(); }

// The backward's tiles (both kernels): q and dout of a query tile, k and v of a key tile (each
// pair contiguous: after the loop a pair holds the (FLASH_TILE, D) FP32 tile of a result on its
// way out); P and dS (floatX, (FLASH_TILE, FLASH_TILE), transposed in the dk/dv kernel: key rows,
// query columns; the dq kernel keeps P in registers); one (16, 16) FP32 tile per warp, through
// which the warp's tiles of s and dP pass one at a time (the full FP32 s and dP are never
// stored); lse and delta of the query tile's rows.
struct FlashBackwardShared {
    floatX *q, *dout, *k, *v, *p, *ds;
    float *x, *lse, *delta;
};
template <int D>
__host__ __device__ inline size_t flash_backward_shared(FlashBackwardShared* s, char* base) {
    SharedCarver c{base};
    s->q = c.take<floatX>(2 * FLASH_TILE * flash_ld(D));
    s->dout = s->q ? s->q + FLASH_TILE * flash_ld(D) : nullptr;
    s->k = c.take<floatX>(2 * FLASH_TILE * flash_ld(D));
    s->v = s->k ? s->k + FLASH_TILE * flash_ld(D) : nullptr;
    s->p = c.take<floatX>(FLASH_TILE * flash_ld(FLASH_TILE));
    s->ds = c.take<floatX>(FLASH_TILE * flash_ld(FLASH_TILE));
    s->x = c.take<float>(flash_backward_threads<D>() / 32 * 16 * flash_ldf(16));
    s->lse = c.take<float>(FLASH_TILE);
    s->delta = c.take<float>(FLASH_TILE);
    return c.bytes;
}

// The (FLASH_TILE, D) tile of rows t0.. of head nh of x (B, T, NH, hd) into shared memory,
// row stride flash_ld(D); zero past T and past hd.
template <int D>
__device__ inline void flash_load_tile(floatX* tile, const floatX* x, size_t b, int t0, int T, int NH, int nh, int hd) {
    for (int idx = threadIdx.x; idx < FLASH_TILE * D; idx += blockDim.x) {
        int r = idx / D, c = idx % D, t = t0 + r;
        tile[r * flash_ld(D) + c] = t < T && c < hd ? x[((b * T + t) * NH + nh) * hd + c] : from_float<floatX>(0.0f);
    }
}

// one block per (tile of FLASH_TILE query rows, b * H + h); warp w owns rows 16 w .. 16 w + 15
// of the tile, two lanes per row in the softmax (each over half of the key tile's columns)
template <int D>
__global__ void flash_attention_forward_kernel(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v, int T,
                                               int H, int KV, int hd) {
    constexpr int TILE = FLASH_TILE, LX = flash_ld(D), LP = flash_ld(TILE), LS = flash_ldf(TILE), LO = flash_ldf(D);
    DYNAMIC_SHARED(char, smem);
    FlashForwardShared sh;
    flash_forward_shared<D>(&sh, smem);
    int q0 = blockIdx.x * TILE, h = blockIdx.y % H, kh = h / (H / KV), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    size_t b = blockIdx.y / H;
    float scale = 1.0f / sqrtf((float)hd);
    flash_load_tile<D>(sh.q, q, b, q0, T, H, h, hd);
    for (int idx = threadIdx.x; idx < TILE * D; idx += blockDim.x) sh.o[idx / D * LO + idx % D] = 0.0f;
    int row = 16 * warp + lane / 2, i = q0 + row;  // this lane's row, in the tile and in the sequence,
    int c0 = lane % 2 * (TILE / 2), d0 = lane % 2 * (D / 2);  // and its half of the columns of s and of o
    const floatX* q_w = sh.q + 16 * warp * LX;      // the warp's 16 rows of q, s, p, o
    float* s_w = sh.s + 16 * warp * LS;
    const floatX* p_w = sh.p + 16 * warp * LP;
    float* o_w = sh.o + 16 * warp * LO;
    float m = -INFINITY, l = 0.0f;
    for (int kv0 = 0; kv0 < min(T, q0 + TILE); kv0 += TILE) {  // causal: no key tile after the tile's last row
        __syncthreads();  // every warp is done with the previous k and v tiles
        flash_load_tile<D>(sh.k, k, b, kv0, T, KV, kh, hd);
        flash_load_tile<D>(sh.v, v, b, kv0, T, KV, kh, hd);
        __syncthreads();
        for (int n = 0; n < TILE / 16; n++) {  // s = q k^T, unscaled
            WarpTile t;
            warp_tile_zero(t);
            warp_tile_mma<true>(t, q_w, LX, sh.k + 16 * n * LX, LX, D);
            warp_tile_store(s_w + 16 * n, LS, t);
        }
        __syncwarp();  // the lanes read elements of s that other lanes stored
        const float* s_row = sh.s + row * LS;
        float m_tile = -INFINITY;
        for (int c = c0; c < c0 + TILE / 2; c++) {
            if (kv0 + c <= i && kv0 + c < T) m_tile = fmaxf(m_tile, s_row[c] * scale);
        }
        float m_new = fmaxf(m, fmaxf(m_tile, __shfl_xor_sync(0xffffffff, m_tile, 1)));
        float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing to attend to (past T) keeps l = 0
        float rescale = expf(m - m_use);                   // 0 on the row's first tile
        float sum = 0.0f;
        for (int c = c0; c < c0 + TILE / 2; c++) {
            float p = kv0 + c <= i && kv0 + c < T ? expf(s_row[c] * scale - m_use) : 0.0f;
            sh.p[row * LP + c] = from_float<floatX>(p);
            sum += p;
        }
        l = l * rescale + sum + __shfl_xor_sync(0xffffffff, sum, 1);
        m = m_new;
        for (int d = d0; d < d0 + D / 2; d++) sh.o[row * LO + d] *= rescale;
        __syncwarp();  // p and o are read by the warp's tile products
        for (int n = 0; n < D / 16; n++) {  // o += p v
            WarpTile t;
            warp_tile_load(t, o_w + 16 * n, LO);
            warp_tile_mma<false>(t, p_w, LP, sh.v + 16 * n, LX, TILE);
            warp_tile_store(o_w + 16 * n, LO, t);
        }
    }
    __syncwarp();
    if (i < T) {
        for (int d = d0; d < d0 + D / 2; d++) sh.o[row * LO + d] /= l;
        if (lane % 2 == 0) lse[(b * H + h) * T + i] = m + logf(l);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < TILE * hd; idx += blockDim.x) {  // the tile's rows of out, coalesced
        int r = idx / hd, d = idx % hd;
        if (q0 + r < T) out[((b * T + q0 + r) * H + h) * hd + d] = from_float<floatX>(sh.o[r * LO + d]);
    }
}

// one warp per query row (b, t, h): delta[b, h, t] = sum_i dout[b, t, h, i] out[b, t, h, i]
__global__ void flash_attention_backward_delta_kernel(float* delta, const floatX* dout, const floatX* out, size_t rows, int T, int H, int hd) {
    size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float sum = 0.0f;
    for (int i = lane; i < hd; i += 32) sum += to_float(dout[row * hd + i]) * to_float(out[row * hd + i]);
    sum = warp_reduce_sum(sum);
    int h = (int)(row % H), t = (int)((row / H) % T);
    size_t b = row / ((size_t)H * T);
    if (lane == 0) delta[(b * H + h) * T + t] = sum;
}

// rows t0.. of head nh of x (B, T, NH, hd) += f * the (FLASH_TILE, >= hd) FP32 tile of row stride ld (rows before T)
__device__ inline void flash_add_tile(floatX* x, const float* tile, int ld, float f, size_t b, int t0, int T, int NH, int nh, int hd) {
    for (int idx = threadIdx.x; idx < FLASH_TILE * hd; idx += blockDim.x) {
        int r = idx / hd, d = idx % hd;
        if (t0 + r >= T) continue;
        size_t at = ((b * T + t0 + r) * NH + nh) * hd + d;
        x[at] = from_float<floatX>(to_float(x[at]) + f * tile[r * ld + d]);
    }
}

// lse and delta of the query rows q0.. of (b, h) into shared memory (0 past T, where nothing reads them)
__device__ inline void flash_load_rows(float* lse_s, float* delta_s, const float* lse, const float* delta, size_t bh, int q0, int T) {
    for (int r = threadIdx.x; r < FLASH_TILE; r += blockDim.x) {
        lse_s[r] = q0 + r < T ? lse[bh * T + q0 + r] : 0.0f;
        delta_s[r] = q0 + r < T ? delta[bh * T + q0 + r] : 0.0f;
    }
}

// The warp's (16, 16) FP32 tile x = a b^T, a and b 16 rows of D columns (row stride flash_ld(D))
// in shared memory. Afterwards lane l reads the elements (l / 16 + 2 j, l % 16), j = 0..7, of x
// (any layout would do: the lanes read x only after a __syncwarp).
template <int D>
__device__ inline void flash_warp_dot_tile(float* x, const floatX* a, const floatX* b) {
    WarpTile t;
    warp_tile_zero(t);
    warp_tile_mma<true>(t, a, flash_ld(D), b, flash_ld(D), D);
    __syncwarp();  // the lanes are done reading the warp's previous tile in x
    warp_tile_store(x, flash_ldf(16), t);
    __syncwarp();  // the lanes read elements that other lanes stored
}

// one block per (tile of FLASH_TILE key rows, b * KV + kh); warp w owns the key rows of row group
// w % FLASH_ROW_GROUPS and the columns of column group w / FLASH_ROW_GROUPS of dk and dv, held in
// its tiles over the query heads of the group and the query tiles from the diagonal on. s, dP, P
// and dS are computed transposed (key rows, query columns): a warp computes the 16 x 16 tiles of
// its key rows at the query columns 16 n.., n = its column group, + the number of column groups, ...;
// after a barrier each warp reads the full rows of P and dS of its row group.
// (__launch_bounds__: the block size, and at least one block per SM, the 8 warps asked for; given
// the block size alone, ptxas capped the registers lower, for more blocks, and spilled)
template <int D>
__launch_bounds__(flash_backward_threads<D>(), 1)
__global__ void flash_attention_backward_dkdv_kernel(floatX* dk, floatX* dv, const floatX* dout, const float* lse, const float* delta,
                                                     const floatX* q, const floatX* k, const floatX* v, int T, int H, int KV, int hd) {
    constexpr int TILE = FLASH_TILE, CG = flash_backward_col_groups<D>(), NT = D / 16 / CG;  // NT: the warp's column tiles
    constexpr int LX = flash_ld(D), LP = flash_ld(TILE), LXS = flash_ldf(16), LO = flash_ldf(D);
    DYNAMIC_SHARED(char, smem);
    FlashBackwardShared sh;
    flash_backward_shared<D>(&sh, smem);
    int kv0 = blockIdx.x * TILE, kh = blockIdx.y % KV, group = H / KV, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int rg = warp % FLASH_ROW_GROUPS, cg = warp / FLASH_ROW_GROUPS, d0 = cg * (D / CG);  // the warp's rows 16 rg.., columns d0..
    size_t b = blockIdx.y / KV;
    float scale = 1.0f / sqrtf((float)hd);
    flash_load_tile<D>(sh.k, k, b, kv0, T, KV, kh, hd);
    flash_load_tile<D>(sh.v, v, b, kv0, T, KV, kh, hd);
    const floatX* k_w = sh.k + 16 * rg * LX;  // the warp's 16 key rows of k, v, P, dS
    const floatX* v_w = sh.v + 16 * rg * LX;
    floatX* p_w = sh.p + 16 * rg * LP;
    floatX* ds_w = sh.ds + 16 * rg * LP;
    float* x_w = sh.x + warp * 16 * LXS;  // the warp's (16, 16) FP32 tile
    WarpTile dk_acc[NT], dv_acc[NT];      // (16, 16 NT): key rows 16 rg.., columns d0..
    #pragma unroll
    for (int n = 0; n < NT; n++) warp_tile_zero(dk_acc[n]), warp_tile_zero(dv_acc[n]);
    for (int h = kh * group; h < (kh + 1) * group; h++) {
        for (int q0 = kv0; q0 < T; q0 += TILE) {  // causal: no query tile before the diagonal
            __syncthreads();  // every warp is done with the previous q, dout, P and dS
            flash_load_tile<D>(sh.q, q, b, q0, T, H, h, hd);
            flash_load_tile<D>(sh.dout, dout, b, q0, T, H, h, hd);
            flash_load_rows(sh.lse, sh.delta, lse, delta, b * H + h, q0, T);
            __syncthreads();
            for (int n = cg; n < TILE / 16; n += CG) {  // the warp's tiles at query columns 16 n..
                float p[8];                             // P at the lane's elements (row r = lane / 16 + 2 j)
                flash_warp_dot_tile<D>(x_w, k_w, sh.q + 16 * n * LX);  // s^T = k q^T, unscaled
                #pragma unroll
                for (int j = 0; j < 8; j++) {
                    int r = lane / 16 + 2 * j, c = 16 * n + lane % 16, key = kv0 + 16 * rg + r, query = q0 + c;
                    p[j] = query < T && key <= query ? expf(x_w[r * LXS + lane % 16] * scale - sh.lse[c]) : 0.0f;
                    p_w[r * LP + c] = from_float<floatX>(p[j]);
                }
                flash_warp_dot_tile<D>(x_w, v_w, sh.dout + 16 * n * LX);  // dP^T = v dout^T
                #pragma unroll
                for (int j = 0; j < 8; j++) {
                    int r = lane / 16 + 2 * j, c = 16 * n + lane % 16;
                    ds_w[r * LP + c] = from_float<floatX>(p[j] * (x_w[r * LXS + lane % 16] - sh.delta[c]));
                }
            }
            __syncthreads();  // the rows of P and dS are whole (their tiles come from every column group)
            #pragma unroll
            for (int n = 0; n < NT; n++) {  // dv += P^T dout, dk += dS^T q at columns d0 + 16 n..
                warp_tile_mma<false>(dv_acc[n], p_w, LP, sh.dout + d0 + 16 * n, LX, TILE);
                warp_tile_mma<false>(dk_acc[n], ds_w, LP, sh.q + d0 + 16 * n, LX, TILE);
            }
        }
    }
    float* stage = (float*)sh.q;  // (TILE, D) FP32 in place of the q and dout tiles
    __syncthreads();
    #pragma unroll
    for (int n = 0; n < NT; n++) warp_tile_store(stage + 16 * rg * LO + d0 + 16 * n, LO, dv_acc[n]);
    __syncthreads();
    flash_add_tile(dv, stage, LO, 1.0f, b, kv0, T, KV, kh, hd);
    __syncthreads();
    #pragma unroll
    for (int n = 0; n < NT; n++) warp_tile_store(stage + 16 * rg * LO + d0 + 16 * n, LO, dk_acc[n]);
    __syncthreads();
    flash_add_tile(dk, stage, LO, scale, b, kv0, T, KV, kh, hd);
}

// one block per (tile of FLASH_TILE query rows, b * H + h); warp w owns the query rows of row
// group w % FLASH_ROW_GROUPS and the columns of column group w / FLASH_ROW_GROUPS of dq, held in
// its tiles over the key tiles up to the diagonal. A warp computes the 16 x 16 tiles of s, dP and
// dS of its query rows at the key columns 16 n.., n = its column group, + the number of column
// groups, ...; after a barrier each warp reads the full rows of dS of its row group.
template <int D>
__launch_bounds__(flash_backward_threads<D>(), 1)
__global__ void flash_attention_backward_dq_kernel(floatX* dq, const floatX* dout, const float* lse, const float* delta, const floatX* q,
                                                   const floatX* k, const floatX* v, int T, int H, int KV, int hd) {
    constexpr int TILE = FLASH_TILE, CG = flash_backward_col_groups<D>(), NT = D / 16 / CG;  // NT: the warp's column tiles
    constexpr int LX = flash_ld(D), LP = flash_ld(TILE), LXS = flash_ldf(16), LO = flash_ldf(D);
    DYNAMIC_SHARED(char, smem);
    FlashBackwardShared sh;
    flash_backward_shared<D>(&sh, smem);
    int q0 = blockIdx.x * TILE, h = blockIdx.y % H, kh = h / (H / KV), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int rg = warp % FLASH_ROW_GROUPS, cg = warp / FLASH_ROW_GROUPS, d0 = cg * (D / CG);  // the warp's rows 16 rg.., columns d0..
    size_t b = blockIdx.y / H;
    float scale = 1.0f / sqrtf((float)hd);
    flash_load_tile<D>(sh.q, q, b, q0, T, H, h, hd);
    flash_load_tile<D>(sh.dout, dout, b, q0, T, H, h, hd);
    flash_load_rows(sh.lse, sh.delta, lse, delta, b * H + h, q0, T);
    const floatX* q_w = sh.q + 16 * rg * LX;  // the warp's 16 query rows of q, dout, dS
    const floatX* dout_w = sh.dout + 16 * rg * LX;
    floatX* ds_w = sh.ds + 16 * rg * LP;
    float* x_w = sh.x + warp * 16 * LXS;  // the warp's (16, 16) FP32 tile
    WarpTile dq_acc[NT];                  // (16, 16 NT): query rows 16 rg.., columns d0..
    #pragma unroll
    for (int n = 0; n < NT; n++) warp_tile_zero(dq_acc[n]);
    for (int kv0 = 0; kv0 < min(T, q0 + TILE); kv0 += TILE) {  // causal: no key tile after the tile's last row
        __syncthreads();  // every warp is done with the previous k, v and dS
        flash_load_tile<D>(sh.k, k, b, kv0, T, KV, kh, hd);
        flash_load_tile<D>(sh.v, v, b, kv0, T, KV, kh, hd);
        __syncthreads();
        for (int n = cg; n < TILE / 16; n += CG) {  // the warp's tiles at key columns 16 n..
            float p[8];                             // P at the lane's elements (row r = lane / 16 + 2 j)
            flash_warp_dot_tile<D>(x_w, q_w, sh.k + 16 * n * LX);  // s = q k^T, unscaled
            #pragma unroll
            for (int j = 0; j < 8; j++) {
                int r = lane / 16 + 2 * j, query = q0 + 16 * rg + r, key = kv0 + 16 * n + lane % 16;
                p[j] = query < T && key <= query ? expf(x_w[r * LXS + lane % 16] * scale - sh.lse[16 * rg + r]) : 0.0f;
            }
            flash_warp_dot_tile<D>(x_w, dout_w, sh.v + 16 * n * LX);  // dP = dout v^T
            #pragma unroll
            for (int j = 0; j < 8; j++) {
                int r = lane / 16 + 2 * j;
                ds_w[r * LP + 16 * n + lane % 16] = from_float<floatX>(p[j] * (x_w[r * LXS + lane % 16] - sh.delta[16 * rg + r]));
            }
        }
        __syncthreads();  // the rows of dS are whole (their tiles come from every column group)
        #pragma unroll
        for (int n = 0; n < NT; n++) warp_tile_mma<false>(dq_acc[n], ds_w, LP, sh.k + d0 + 16 * n, LX, TILE);  // dq += dS k
    }
    float* stage = (float*)sh.k;  // (TILE, D) FP32 in place of the k and v tiles
    __syncthreads();
    #pragma unroll
    for (int n = 0; n < NT; n++) warp_tile_store(stage + 16 * rg * LO + d0 + 16 * n, LO, dq_acc[n]);
    __syncthreads();
    flash_add_tile(dq, stage, LO, scale, b, q0, T, H, h, hd);
}

// The padded head size D of the flash kernels for heads of size hd: 16, 32, 64 or 128; 0 past 128.
inline int flash_attention_head_tile(int hd) { return hd < 1 ? 0 : hd <= 16 ? 16 : hd <= 32 ? 32 : hd <= 64 ? 64 : hd <= 128 ? 128 : 0; }

// "" when the flash kernels take heads of size hd, else what is wrong.
inline std::string flash_attention_check(int hd) {
    if (flash_attention_head_tile(hd) == 0)
        return string_format("head size %d: flash attention takes head sizes 1..128 (dim / n_heads)", hd);
    return "";
}

// Lets kernel use `bytes` of dynamic shared memory (more than the default 48 KiB needs opting in).
template <typename Kernel>
inline void flash_allow_shared(Kernel kernel, size_t bytes) {
    static int limit = [] {
        int v = 0;
        cudaCheck(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
        return v;
    }();
    if (bytes > (size_t)limit) {
        fprintf(stderr, "error: flash attention needs %zu bytes of shared memory per block, this GPU allows %d\n", bytes, limit);
        exit(1);
    }
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

// A flash kernel's block: its threads and bytes of dynamic shared memory, as the launchers use
// them (dev/flash_occupancy.cu prints them for the nvcc gate's occupancy check).
struct FlashBlock {
    int threads;
    size_t shared;
};
template <int D>
inline FlashBlock flash_forward_block() {
    FlashForwardShared layout;
    return FlashBlock{FLASH_THREADS, flash_forward_shared<D>(&layout, nullptr)};
}
template <int D>
inline FlashBlock flash_backward_block() {  // both backward kernels
    FlashBackwardShared layout;
    return FlashBlock{flash_backward_threads<D>(), flash_backward_shared<D>(&layout, nullptr)};
}

template <int D>
inline void flash_attention_forward_launch(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v, size_t B, int T,
                                           int H, int KV, int hd, cudaStream_t stream) {
    FlashBlock block = flash_forward_block<D>();
    flash_allow_shared(flash_attention_forward_kernel<D>, block.shared);
    dim3 grid(ceil_div(T, FLASH_TILE), (unsigned)(B * H));
    LAUNCH(flash_attention_forward_kernel<D>, grid, block.threads, block.shared, stream, out, lse, q, k, v, T, H, KV, hd);
    cudaCheck(cudaGetLastError());
}

template <int D>
inline void flash_attention_backward_launch(floatX* dq, floatX* dk, floatX* dv, const float* delta, const floatX* dout, const float* lse,
                                            const floatX* q, const floatX* k, const floatX* v, size_t B, int T, int H, int KV, int hd,
                                            cudaStream_t stream) {
    FlashBlock block = flash_backward_block<D>();
    flash_allow_shared(flash_attention_backward_dkdv_kernel<D>, block.shared);
    flash_allow_shared(flash_attention_backward_dq_kernel<D>, block.shared);
    LAUNCH(flash_attention_backward_dkdv_kernel<D>, dim3(ceil_div(T, FLASH_TILE), (unsigned)(B * KV)), block.threads, block.shared, stream,
           dk, dv, dout, lse, delta, q, k, v, T, H, KV, hd);
    cudaCheck(cudaGetLastError());
    LAUNCH(flash_attention_backward_dq_kernel<D>, dim3(ceil_div(T, FLASH_TILE), (unsigned)(B * H)), block.threads, block.shared, stream,
           dq, dout, lse, delta, q, k, v, T, H, KV, hd);
    cudaCheck(cudaGetLastError());
}

// the padded head size of hd, or a clear error
inline int flash_attention_require(int hd) {
    std::string problem = flash_attention_check(hd);
    if (!problem.empty()) {
        fprintf(stderr, "error: %s\n", problem.c_str());
        exit(1);
    }
    return flash_attention_head_tile(hd);
}

// out (B, T, H, hd) = causal softmax(q k^T / sqrt(hd)) v, as attention_forward; lse (B, H, T) the
// log-sum-exp of each row of scaled scores, for the backward. H a multiple of KV.
inline void flash_attention_forward_cuda(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v, size_t B, int T,
                                         int H, int KV, int hd, cudaStream_t stream) {
    NVTX_RANGE_FN();
    switch (flash_attention_require(hd)) {
        case 16: flash_attention_forward_launch<16>(out, lse, q, k, v, B, T, H, KV, hd, stream); break;
        case 32: flash_attention_forward_launch<32>(out, lse, q, k, v, B, T, H, KV, hd, stream); break;
        case 64: flash_attention_forward_launch<64>(out, lse, q, k, v, B, T, H, KV, hd, stream); break;
        default: flash_attention_forward_launch<128>(out, lse, q, k, v, B, T, H, KV, hd, stream); break;
    }
}

// dq, dk, dv (+)= the gradients of attention_backward, given dout (B, T, H, hd) and the forward's
// out and lse; delta (B, H, T) FP32 scratch
inline void flash_attention_backward_cuda(floatX* dq, floatX* dk, floatX* dv, float* delta, const floatX* dout, const floatX* out,
                                          const float* lse, const floatX* q, const floatX* k, const floatX* v, size_t B, int T, int H,
                                          int KV, int hd, cudaStream_t stream) {
    NVTX_RANGE_FN();
    int D = flash_attention_require(hd);
    const int delta_block_size = 256;
    size_t rows = B * T * H;
    LAUNCH(flash_attention_backward_delta_kernel, ceil_div(rows, delta_block_size / 32), delta_block_size, 0, stream, delta, dout, out,
           rows, T, H, hd);
    cudaCheck(cudaGetLastError());
    switch (D) {
        case 16: flash_attention_backward_launch<16>(dq, dk, dv, delta, dout, lse, q, k, v, B, T, H, KV, hd, stream); break;
        case 32: flash_attention_backward_launch<32>(dq, dk, dv, delta, dout, lse, q, k, v, B, T, H, KV, hd, stream); break;
        case 64: flash_attention_backward_launch<64>(dq, dk, dv, delta, dout, lse, q, k, v, B, T, H, KV, hd, stream); break;
        default: flash_attention_backward_launch<128>(dq, dk, dv, delta, dout, lse, q, k, v, B, T, H, KV, hd, stream); break;
    }
}
#endif

// ---- KV cache and attention over it: reference, kernels, launchers (kv_cache_write, attention_cached_forward, attention_decode_cuda)
// A KV cache holds, per layer, the keys and values (after RoPE) of every position so far of
// each sequence: k_cache, v_cache (B, maxT, KV, hd) for one layer. New tokens are appended at
// each sequence's own position pos[b] (sequences of a batch may have different lengths).
// k_cache[b, pos[b] + t] = k[b, t], v_cache likewise;  k, v (B, Tn, KVD), pos (B)
template <typename T>
void kv_cache_write(T* k_cache, T* v_cache, const T* k, const T* v, const int* pos, size_t B, size_t Tn, size_t KVD, size_t maxT) {
    for (size_t b = 0; b < B; b++) {
        for (size_t t = 0; t < Tn; t++) {
            size_t dst = (b * maxT + pos[b] + t) * KVD, src = (b * Tn + t) * KVD;
            memcpy(k_cache + dst, k + src, KVD * sizeof(T));
            memcpy(v_cache + dst, v + src, KVD * sizeof(T));
        }
    }
}

// Attention of Tn new tokens per sequence over a KV cache that already holds them: the query
// q[b, t] of the token at position p = pos[b] + t attends to positions 0..p of its sequence,
// exactly as row p of attention_forward (same arithmetic, so the CPU cached forward gives the
// full forward's numbers); query head h reads kv head h / (H / KV).
//   q (B, Tn, H, hd), k_cache and v_cache (B, maxT, KV, hd), pos (B), out (B, Tn, H, hd)
template <typename T>
void attention_cached_forward(T* out, const T* q, const T* k_cache, const T* v_cache, const int* pos, size_t B, size_t Tn,
                              size_t H, size_t KV, size_t hd, size_t maxT) {
    T scale = T(1) / std::sqrt(T(hd));
    size_t group = H / KV, work = 0;  // multiply-adds: 2 hd per query row and attended position
    for (size_t b = 0; b < B; b++) work += 2 * H * hd * Tn * (pos[b] + (Tn + 1) / 2);
    #pragma omp parallel if (work >= 16 * PARALLEL_MIN_WORK)
    {
        std::vector<T> a(maxT);  // one row of probabilities per thread
        #pragma omp for collapse(3)
        for (size_t b = 0; b < B; b++) {
            for (size_t t = 0; t < Tn; t++) {
                for (size_t h = 0; h < H; h++) {
                    size_t p = (size_t)pos[b] + t, first = (b * maxT * KV + h / group) * hd;
                    attention_row(out + ((b * Tn + t) * H + h) * hd, a.data(), q + ((b * Tn + t) * H + h) * hd, k_cache + first, v_cache + first,
                                  p + 1, KV * hd, hd, scale);
                }
            }
        }
    }
}

// the block shape of attention_decode_cuda below (named here, for the inference runner's default)
constexpr int ATTN_DECODE_THREADS = 64;  // threads per block: one cache position each per tile
constexpr int ATTN_DECODE_CHUNK = 256;   // cache positions per block, unless the scratch caps the number of blocks

#ifdef XWIN_CUDA
// one thread per element (b, t, j) of k and v
__global__ void kv_cache_write_kernel(floatX* k_cache, floatX* v_cache, const floatX* k, const floatX* v, const int* pos,
                                      size_t B, int Tn, int KVD, int maxT) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * Tn * KVD) return;
    int j = (int)(idx % KVD);
    int t = (int)((idx / KVD) % Tn);
    size_t b = idx / ((size_t)KVD * Tn);
    size_t dst = (b * maxT + pos[b] + t) * KVD + j;
    k_cache[dst] = k[idx];
    v_cache[dst] = v[idx];
}

inline void kv_cache_write_cuda(floatX* k_cache, floatX* v_cache, const floatX* k, const floatX* v, const int* pos, size_t B, int Tn,
                                int KVD, int maxT, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;
    LAUNCH(kv_cache_write_kernel, ceil_div(B * Tn * KVD, block_size), block_size, 0, stream, k_cache, v_cache, k, v, pos, B, Tn, KVD, maxT);
    cudaCheck(cudaGetLastError());
}

// Attention over a KV cache on the GPU, split-K ("flash decoding"): a decoded token has one
// query row per head but a cache that may be thousands of positions long, so the positions
// 0..p a query row (b, t, h) attends to are cut into chunks, one block each, which run in
// parallel. Block (row, s) writes its chunk's partial softmax in FP32:
//   m = max of the chunk's scores,  l = sum exp(score - m),  o = sum exp(score - m) v  (unnormalised),
// and a second kernel merges the chunks: M = max_s m_s, out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
// Within a block the chunk goes in tiles of ATTN_DECODE_THREADS positions with the same running
// rescaling, so the shared memory does not grow with the chunk. A chunk past p is empty:
// m = -inf, l = 0, o = 0, which the merge weighs 0. Query head h reads kv head h / (H / KV)
// straight from the cache (no copy per query head). Prefill uses the same two kernels (Tn
// query rows per sequence); decode is Tn = 1.
//   part_o (rows, S, hd), part_ml (rows, S, 2) with rows = B * Tn * H and S = gridDim.y chunks

// one block per (query row, chunk); per tile thread j scores position j, then thread i updates output dimension i
__global__ void attention_decode_partial_kernel(float* part_o, float* part_ml, const floatX* q, const floatX* k_cache, const floatX* v_cache,
                                                const int* pos, int Tn, int H, int KV, int hd, int maxT, int chunk) {
    DYNAMIC_SHARED(float, smem);
    float* qs = smem;                 // (hd) the query row, in FP32
    float* o = smem + hd;             // (hd) the running weighted sum of values
    float* p = smem + 2 * hd;         // (blockDim.x) the tile's exp(score - m)
    float* reduce = p + blockDim.x;   // (32) block_reduce scratch
    size_t row = blockIdx.x;          // (b, t, h)
    int s = blockIdx.y, S = gridDim.y, h = (int)(row % H), t = (int)((row / H) % Tn);
    size_t b = row / ((size_t)H * Tn);
    int start = s * chunk, end = min(pos[b] + t + 1, start + chunk);  // this block's positions [start, end)
    float scale = 1.0f / sqrtf((float)hd);
    size_t kv_row = (size_t)KV * hd;  // from one position to the next in the cache
    const floatX* kc = k_cache + b * maxT * kv_row + (size_t)(h / (H / KV)) * hd;
    const floatX* vc = v_cache + b * maxT * kv_row + (size_t)(h / (H / KV)) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        qs[i] = to_float(q[row * hd + i]);
        o[i] = 0.0f;
    }
    __syncthreads();
    float m = -INFINITY, l = 0.0f;
    for (int t0 = start; t0 < end; t0 += blockDim.x) {  // block-uniform bounds: every thread takes each tile
        int j = t0 + threadIdx.x;
        float score = -INFINITY;
        if (j < end) {
            float dot = 0.0f;
            for (int i = 0; i < hd; i++) dot += qs[i] * to_float(kc[j * kv_row + i]);
            score = dot * scale;
        }
        float m_new = fmaxf(m, block_reduce(score, reduce, true));  // finite: a tile has a position
        float e = j < end ? expf(score - m_new) : 0.0f;
        p[threadIdx.x] = e;
        float tile_sum = block_reduce(e, reduce, false);  // its barriers also publish p
        float rescale = expf(m - m_new);                  // 0 on the first tile (m = -inf)
        l = l * rescale + tile_sum;
        m = m_new;
        int n = min((int)blockDim.x, end - t0);
        for (int i = threadIdx.x; i < hd; i += blockDim.x) {
            float acc = o[i] * rescale;
            for (int jj = 0; jj < n; jj++) acc += p[jj] * to_float(vc[(t0 + jj) * kv_row + i]);
            o[i] = acc;
        }
        __syncthreads();  // the next tile rewrites p
    }
    for (int i = threadIdx.x; i < hd; i += blockDim.x) part_o[(row * S + s) * hd + i] = o[i];
    if (threadIdx.x == 0) {
        part_ml[(row * S + s) * 2] = m;
        part_ml[(row * S + s) * 2 + 1] = l;
    }
}

// one thread per element (row, i) of out: merges the S chunks of its row
__global__ void attention_decode_combine_kernel(floatX* out, const float* part_o, const float* part_ml, size_t rows, int S, int hd) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * hd) return;
    size_t row = idx / hd;
    int i = (int)(idx % hd);
    const float* ml = part_ml + row * S * 2;
    float M = -INFINITY;
    for (int s = 0; s < S; s++) M = fmaxf(M, ml[2 * s]);  // chunk 0 is never empty: M is finite
    float denom = 0.0f, acc = 0.0f;
    for (int s = 0; s < S; s++) {
        float w = expf(ml[2 * s] - M);
        denom += w * ml[2 * s + 1];
        acc += w * part_o[(row * S + s) * hd + i];
    }
    out[idx] = from_float<floatX>(acc / denom);
}

// out (B, Tn, H, hd) = attention_cached_forward, in the two kernels above. max_len (host) bounds
// pos[b] + Tn over the batch (the longest attended length); part_o (part_rows, hd) and part_ml
// (part_rows, 2) are FP32 scratch for part_rows >= B * Tn * H partial rows, which caps the
// number of chunks per query row: S = min(ceil(max_len / chunk), part_rows / rows), the chunk
// then widened to cover max_len.
inline void attention_decode_cuda(floatX* out, const floatX* q, const floatX* k_cache, const floatX* v_cache, const int* pos, size_t B,
                                  int Tn, int H, int KV, int hd, int maxT, int max_len, float* part_o, float* part_ml, size_t part_rows,
                                  cudaStream_t stream, int chunk = ATTN_DECODE_CHUNK) {
    NVTX_RANGE_FN();
    const int block_size = ATTN_DECODE_THREADS, combine_block_size = 256;
    size_t rows = B * Tn * H;
    if (part_rows < rows || max_len < 1 || max_len > maxT || chunk < 1) {
        fprintf(stderr, "error: attention_decode_cuda: %zu query rows need at least that many partial rows (have %zu), max_len %d in 1..%d\n",
                rows, part_rows, max_len, maxT);
        exit(1);
    }
    int splits = (int)ceil_div(max_len, chunk);
    if ((size_t)splits > part_rows / rows) {
        splits = (int)(part_rows / rows);
        chunk = (int)ceil_div(max_len, splits);
    }
    size_t shmem = (2 * hd + block_size + 32) * sizeof(float);
    LAUNCH(attention_decode_partial_kernel, dim3((unsigned)rows, (unsigned)splits), block_size, shmem, stream, part_o, part_ml, q, k_cache,
           v_cache, pos, Tn, H, KV, hd, maxT, chunk);
    cudaCheck(cudaGetLastError());
    LAUNCH(attention_decode_combine_kernel, ceil_div(rows * hd, combine_block_size), combine_block_size, 0, stream, out, part_o, part_ml,
           rows, splits, hd);
    cudaCheck(cudaGetLastError());
}
#endif

// ---- swiglu: reference, kernels, launchers
// SwiGLU: out = silu(gate) * up, silu(x) = x * sigmoid(x)
template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, size_t n) {
    #pragma omp parallel for if (n >= PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) {
        T g = gate[i];
        out[i] = g / (T(1) + std::exp(-g)) * up[i];
    }
}

// dgate += dout * up * silu'(gate), silu'(x) = s (1 + x (1 - s)), s = sigmoid(x);  dup += dout * silu(gate)
template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        T g = gate[i];
        T s = T(1) / (T(1) + std::exp(-g));
        dgate[i] = dout[i] * up[i] * s * (T(1) + g * (T(1) - s));
        dup[i] = dout[i] * g * s;
    }
}

#ifdef XWIN_CUDA
__device__ inline float swiglu_value(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// one thread per x128 group of elements (128-bit accesses when vec and the group is whole)
__global__ void swiglu_forward_kernel(floatX* out, const floatX* gate, const floatX* up, size_t n, bool vec) {
    size_t i0 = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i0 >= n) return;
    if (vec && i0 + x128::size <= n) {
        x128 vg = load128(gate + i0), vu = load128(up + i0), vo;
        for (int k = 0; k < x128::size; k++) vo.v[k] = from_float<floatX>(swiglu_value(to_float(vg.v[k]), to_float(vu.v[k])));
        store128(out + i0, vo);
        return;
    }
    for (size_t i = i0; i < n && i < i0 + x128::size; i++) out[i] = from_float<floatX>(swiglu_value(to_float(gate[i]), to_float(up[i])));
}

// {dgate, dup} of one element
__device__ inline void swiglu_grads(float* dg, float* du, float d, float g, float u) {
    float s = 1.0f / (1.0f + expf(-g));
    *dg = d * u * s * (1.0f + g * (1.0f - s));
    *du = d * g * s;
}

// One thread per x128 group of elements (128-bit accesses when vec and the group is whole).
// Unlike the CPU twin it WRITES dgate and dup (=, not +=): in the model they are the only
// gradient of gate and up, so the GPU model zeroes nothing before it.
__global__ void swiglu_backward_kernel(floatX* dgate, floatX* dup, const floatX* dout, const floatX* gate, const floatX* up, size_t n, bool vec) {
    size_t i0 = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i0 >= n) return;
    float dg, du;
    if (vec && i0 + x128::size <= n) {
        x128 vd = load128(dout + i0), vg = load128(gate + i0), vu = load128(up + i0), odg, odu;
        for (int k = 0; k < x128::size; k++) {
            swiglu_grads(&dg, &du, to_float(vd.v[k]), to_float(vg.v[k]), to_float(vu.v[k]));
            odg.v[k] = from_float<floatX>(dg);
            odu.v[k] = from_float<floatX>(du);
        }
        store128(dgate + i0, odg);
        store128(dup + i0, odu);
        return;
    }
    for (size_t i = i0; i < n && i < i0 + x128::size; i++) {
        swiglu_grads(&dg, &du, to_float(dout[i]), to_float(gate[i]), to_float(up[i]));
        dgate[i] = from_float<floatX>(dg);
        dup[i] = from_float<floatX>(du);
    }
}

inline void swiglu_forward_cuda(floatX* out, const floatX* gate, const floatX* up, size_t n, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;
    bool vec = aligned16(out) && aligned16(gate) && aligned16(up);
    LAUNCH(swiglu_forward_kernel, ceil_div(n, (size_t)block_size * x128::size), block_size, 0, stream, out, gate, up, n, vec);
    cudaCheck(cudaGetLastError());
}

inline void swiglu_backward_cuda(floatX* dgate, floatX* dup, const floatX* dout, const floatX* gate, const floatX* up, size_t n, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;
    bool vec = aligned16(dgate) && aligned16(dup) && aligned16(dout) && aligned16(gate) && aligned16(up);
    LAUNCH(swiglu_backward_kernel, ceil_div(n, (size_t)block_size * x128::size), block_size, 0, stream, dgate, dup, dout, gate, up, n, vec);
    cudaCheck(cudaGetLastError());
}
#endif

// ---- residual, and the residual fused with the next rmsnorm: reference, kernels, launchers
// out = a + b (the residual stream)
template <typename T>
void residual_forward(T* out, const T* a, const T* b, size_t n) {
    #pragma omp parallel for if (n >= PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

#ifdef XWIN_CUDA
// one thread per x128 group of elements: 128-bit loads and stores when vec and the group is
// whole, element by element otherwise (the tail, unaligned pointers)
__global__ void residual_forward_kernel(floatX* out, const floatX* a, const floatX* b, size_t n, bool vec) {
    size_t i0 = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i0 >= n) return;
    if (vec && i0 + x128::size <= n) {
        x128 va = load128(a + i0), vb = load128(b + i0), vo;
        for (int k = 0; k < x128::size; k++) vo.v[k] = from_float<floatX>(to_float(va.v[k]) + to_float(vb.v[k]));
        store128(out + i0, vo);
        return;
    }
    for (size_t i = i0; i < n && i < i0 + x128::size; i++) out[i] = from_float<floatX>(to_float(a[i]) + to_float(b[i]));
}

inline void residual_forward_cuda(floatX* out, const floatX* a, const floatX* b, size_t n, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;
    bool vec = aligned16(out) && aligned16(a) && aligned16(b);
    LAUNCH(residual_forward_kernel, ceil_div(n, (size_t)block_size * x128::size), block_size, 0, stream, out, a, b, n, vec);
    cudaCheck(cudaGetLastError());
}
#endif

// The residual add and the RMSNorm that reads its result, in one pass over the row:
//   residual = a + b;  out = residual / sqrt(mean(residual^2) + eps) * weight;  rstd (N) saved.
// The same float operations in the same order as residual_forward then rmsnorm_forward, so
// the results are those bits. a may be residual (the add in place).
// residual, out, a, b (N, C); weight (C); rstd (N)
template <typename T>
void fused_residual_rmsnorm_forward(T* residual, T* out, T* rstd, const T* a, const T* b, const T* weight, size_t N, size_t C, double eps) {
    #pragma omp parallel for if (N * C >= PARALLEL_MIN_WORK)
    for (size_t n = 0; n < N; n++) {
        T* x = residual + n * C;
        for (size_t i = 0; i < C; i++) x[i] = a[n * C + i] + b[n * C + i];
        T ss = 0;
        for (size_t i = 0; i < C; i++) ss += x[i] * x[i];
        T r = T(1) / std::sqrt(ss / T(C) + T(eps));
        for (size_t i = 0; i < C; i++) out[n * C + i] = x[i] * r * weight[i];
        rstd[n] = r;
    }
}

#ifdef XWIN_CUDA
// one warp per row: a lane adds its elements of a and b, rounds the sum to floatX and stores it
// in residual, summing the squares of the rounded values; after the warp reduction it reads its
// own stored elements back (from L1) for the scaled row, so the norm is computed from the
// residual exactly as rmsnorm_forward_kernel computes it from the stored stream. With vec (rows
// of whole x128 groups, 16-byte aligned) a lane moves x128 groups, else single elements.
__global__ void fused_residual_rmsnorm_forward_kernel(floatX* residual, floatX* out, float* rstd, const floatX* a, const floatX* b,
                                                      const floatX* weight, size_t N, int C, float eps, bool vec) {
    size_t n = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (n >= N) return;  // whole warps leave together
    floatX* x = residual + n * C;
    const floatX* ra = a + n * C;
    const floatX* rb = b + n * C;
    floatX* o = out + n * C;
    float ss = 0.0f;
    if (vec) {
        for (int i = lane * x128::size; i < C; i += 32 * x128::size) {
            x128 va = load128(ra + i), vb = load128(rb + i), vx;
            for (int k = 0; k < x128::size; k++) {
                vx.v[k] = from_float<floatX>(to_float(va.v[k]) + to_float(vb.v[k]));
                ss += to_float(vx.v[k]) * to_float(vx.v[k]);
            }
            store128(x + i, vx);
        }
    } else {
        for (int i = lane; i < C; i += 32) {
            floatX v = from_float<floatX>(to_float(ra[i]) + to_float(rb[i]));
            x[i] = v;
            ss += to_float(v) * to_float(v);
        }
    }
    rmsnorm_row_finish(o, rstd + n, x, weight, ss, C, eps, lane, vec);  // reads back its own stored groups: no barrier needed
}

inline void fused_residual_rmsnorm_forward_cuda(floatX* residual, floatX* out, float* rstd, const floatX* a, const floatX* b,
                                                const floatX* weight, size_t N, int C, double eps, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;  // 8 warps: 8 rows per block
    bool vec = C % x128::size == 0 && aligned16(residual) && aligned16(out) && aligned16(a) && aligned16(b) && aligned16(weight);
    LAUNCH(fused_residual_rmsnorm_forward_kernel, ceil_div(N, block_size / 32), block_size, 0, stream, residual, out, rstd, a, b, weight,
           N, C, (float)eps, vec);
    cudaCheck(cudaGetLastError());
}
#endif

// ---- log-probs and the SFT loss: reference, kernels, launchers (logprob_forward/_backward, fused_logprob_nll)
// Token log-probs: lp[b,t] = log softmax(logits[b,t-1])[tokens[b,t]] for t >= 1; lp[b,0] = 0.
// logits (B, T, V), tokens (B, T), lp (B, T)
template <typename T>
void logprob_forward(T* lp, const T* logits, const int* tokens, size_t B, size_t Tn, size_t V) {
    #pragma omp parallel for collapse(2)
    for (size_t b = 0; b < B; b++) {
        for (size_t t = 0; t < Tn; t++) {
            if (t == 0) { lp[b * Tn] = 0; continue; }
            const T* z = logits + (b * Tn + t - 1) * V;
            T maxv = z[0];
            for (size_t i = 1; i < V; i++) maxv = z[i] > maxv ? z[i] : maxv;
            T sum = 0;
            for (size_t i = 0; i < V; i++) sum += std::exp(z[i] - maxv);
            lp[b * Tn + t] = z[tokens[b * Tn + t]] - maxv - std::log(sum);
        }
    }
}

// Given dlp (B, T) = d(objective)/d(lp), writes (overwrites) dlogits (B, T, V):
//   dlogits[b,t-1,:] = dlp[b,t] * (onehot(tokens[b,t]) - softmax(logits[b,t-1])),  dlogits[b,T-1,:] = 0
template <typename T>
void logprob_backward(T* dlogits, const T* logits, const int* tokens, const T* dlp, size_t B, size_t Tn, size_t V) {
    #pragma omp parallel for collapse(2)
    for (size_t b = 0; b < B; b++) {
        for (size_t t = 0; t < Tn; t++) {
            T* dz = dlogits + (b * Tn + t) * V;
            T g = t + 1 < Tn ? dlp[b * Tn + t + 1] : T(0);
            if (g == T(0)) { for (size_t i = 0; i < V; i++) dz[i] = 0; continue; }
            const T* z = logits + (b * Tn + t) * V;
            T maxv = z[0];
            for (size_t i = 1; i < V; i++) maxv = z[i] > maxv ? z[i] : maxv;
            T sum = 0;
            for (size_t i = 0; i < V; i++) sum += std::exp(z[i] - maxv);
            for (size_t i = 0; i < V; i++) dz[i] = -g * std::exp(z[i] - maxv) / sum;
            dz[tokens[b * Tn + t + 1]] += g;
        }
    }
}

// The SFT classifier in one pass (the loss is masked_mean_loss over `count` targets, so its
// d(log-prob) is known before the log-probs are: dlp = -mask / count, masked_mean_loss_backward):
// each logits row's max and sum are computed once and give both the token log-prob (as
// logprob_forward) and the d-logits (as logprob_backward with that dlp). lp (B, T) out; logits
// (B, T, V) in; dlogits (B, T, V) out, which may be logits itself (the GPU writes the d-logits
// over the logits); tokens, mask (B, T). The same loops and roundings as logprob_forward,
// masked_mean_loss_backward and logprob_backward, so the same bits.
template <typename T>
void fused_logprob_nll(T* lp, T* dlogits, const T* logits, const int* tokens, const uint8_t* mask, size_t count, size_t B,
                       size_t Tn, size_t V) {
    const T g_target = count ? T(-1.0 / (double)count) : T(0);  // d(loss)/d(lp) of a target
    #pragma omp parallel for collapse(2)
    for (size_t b = 0; b < B; b++) {
        for (size_t t = 0; t < Tn; t++) {
            size_t row = b * Tn + t;
            const T* z = logits + row * V;
            T* dz = dlogits + row * V;
            if (t == 0) lp[row] = 0;  // nothing predicts the first token
            if (t + 1 == Tn) { for (size_t i = 0; i < V; i++) dz[i] = 0; continue; }
            T maxv = z[0];
            for (size_t i = 1; i < V; i++) maxv = z[i] > maxv ? z[i] : maxv;
            T sum = 0;
            for (size_t i = 0; i < V; i++) sum += std::exp(z[i] - maxv);
            int target = tokens[row + 1];
            lp[row + 1] = z[target] - maxv - std::log(sum);  // before dz overwrites z
            T g = mask[row + 1] ? g_target : T(0);
            if (g == T(0)) { for (size_t i = 0; i < V; i++) dz[i] = 0; continue; }
            for (size_t i = 0; i < V; i++) dz[i] = -g * std::exp(z[i] - maxv) / sum;
            dz[target] += g;
        }
    }
}

#ifdef XWIN_CUDA
// A logits row's max and sum of exp(z - max) in FP32, by block reductions (every thread gets both)
__device__ inline void block_row_max_sumexp(const floatX* z, int V, float* shared, float* maxv, float* sum) {
    float m = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, to_float(z[i]));
    m = block_reduce(m, shared, true);
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(to_float(z[i]) - m);
    *maxv = m;
    *sum = block_reduce(s, shared, false);
}

// one block per row (b, t): the FP32 log-sum-exp of the logits row t - 1 by block reductions
__global__ void logprob_forward_kernel(float* lp, const floatX* logits, const int* tokens, size_t rows, int T, int V, size_t ld) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    if (row >= rows) return;
    if (row % T == 0) {  // nothing predicts the first token
        if (threadIdx.x == 0) lp[row] = 0.0f;
        return;
    }
    const floatX* z = logits + (row - 1) * ld;
    float maxv, sum;
    block_row_max_sumexp(z, V, shared, &maxv, &sum);
    if (threadIdx.x == 0) lp[row] = to_float(z[tokens[row]]) - maxv - logf(sum);
}

// one block per row (b, t): dlogits[b,t,:] = dlp[b,t+1] * (onehot(tokens[b,t+1]) - softmax(logits[b,t]));
// dlogits may be logits (the GPU model's backward): the row's max and sum are complete before the
// last pass, in which each thread reads the elements it then overwrites
__global__ void logprob_backward_kernel(floatX* dlogits, const floatX* logits, const int* tokens, const float* dlp, size_t rows, int T, int V,
                                        size_t ld) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    if (row >= rows) return;
    floatX* dz = dlogits + row * ld;
    float g = (row % T) + 1 < (size_t)T ? dlp[row + 1] : 0.0f;
    if (g == 0.0f) {
        for (int i = threadIdx.x; i < V; i += blockDim.x) dz[i] = from_float<floatX>(0.0f);
        return;
    }
    const floatX* z = logits + row * ld;
    float maxv, sum;
    block_row_max_sumexp(z, V, shared, &maxv, &sum);
    int target = tokens[row + 1];
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float p = expf(to_float(z[i]) - maxv) / sum;
        dz[i] = from_float<floatX>(-g * p + (i == target ? g : 0.0f));
    }
}

// ld: the row stride of the logits (and d-logits), >= V: padded_vocab(V) in the GPU model
inline void logprob_forward_cuda(float* lp, const floatX* logits, const int* tokens, size_t B, int T, int V, size_t ld, cudaStream_t stream) {
    NVTX_RANGE_FN();
    LAUNCH(logprob_forward_kernel, (unsigned)(B * T), 256, 0, stream, lp, logits, tokens, B * T, T, V, ld);
    cudaCheck(cudaGetLastError());
}

inline void logprob_backward_cuda(floatX* dlogits, const floatX* logits, const int* tokens, const float* dlp, size_t B, int T, int V, size_t ld,
                                  cudaStream_t stream) {
    NVTX_RANGE_FN();
    LAUNCH(logprob_backward_kernel, (unsigned)(B * T), 256, 0, stream, dlogits, logits, tokens, dlp, B * T, T, V, ld);
    cudaCheck(cudaGetLastError());
}

// one block per logits row (b, t): the FP32 max and sum of the row in one read (online: each
// thread rescales its running sum when its max grows, then block_reduce of the maxes and of the
// sums brought to the block's max), lp[b,t+1] from them, then a second pass over the row (from
// L1/L2) that writes dlogits = g * (onehot(tokens[b,t+1]) - softmax), g = mask[b,t+1] * g_target.
// dlogits may be logits: the target's logit is read before the barriers, every other element
// by the thread that then overwrites it. vec: 128-bit groups (V % x128::size == 0, aligned rows).
__global__ void fused_logprob_nll_kernel(float* lp, floatX* dlogits, const floatX* logits, const int* tokens, const uint8_t* mask,
                                         float g_target, int T, int V, size_t ld, bool vec) {
    __shared__ float shared[32];
    size_t row = blockIdx.x;
    int t = (int)(row % T);  // the same for the whole block: the barriers below are uniform
    const floatX* z = logits + row * ld;
    floatX* dz = dlogits + row * ld;
    const int step = x128::size, vend = vec ? V / step * step : 0;  // x128 groups up to vend, then single elements
    if (t == 0 && threadIdx.x == 0) lp[row] = 0.0f;  // nothing predicts the first token
    float g = 0.0f, maxv = 0.0f, sum = 1.0f;          // the last row predicts nothing: g = 0, zeros
    int target = -1;
    if (t + 1 < T) {
        target = tokens[row + 1];
        float z_target = to_float(z[target]);  // read before any thread writes dz (in place)
        float m = -INFINITY, s = 0.0f;
        auto online = [&](float x) {
            if (x > m) { s = s * expf(m - x) + 1.0f; m = x; }
            else s += expf(x - m);
        };
        for (int i = threadIdx.x * step; i < vend; i += blockDim.x * step) {
            x128 v = load128(z + i);
            for (int k = 0; k < x128::size; k++) online(to_float(v.v[k]));
        }
        for (int i = vend + threadIdx.x; i < V; i += blockDim.x) online(to_float(z[i]));
        maxv = block_reduce(m, shared, true);
        sum = block_reduce(m == -INFINITY ? 0.0f : s * expf(m - maxv), shared, false);  // a thread with no elements adds 0
        if (threadIdx.x == 0) lp[row + 1] = z_target - maxv - logf(sum);
        g = mask[row + 1] ? g_target : 0.0f;
    }
    float scale = -g / sum;
    for (int i = threadIdx.x * step; i < vend; i += blockDim.x * step) {
        x128 y;
        if (g != 0.0f) {
            x128 v = load128(z + i);
            for (int k = 0; k < x128::size; k++) y.v[k] = from_float<floatX>(scale * expf(to_float(v.v[k]) - maxv) + (i + k == target ? g : 0.0f));
        } else {
            for (int k = 0; k < x128::size; k++) y.v[k] = from_float<floatX>(0.0f);
        }
        store128(dz + i, y);
    }
    for (int i = vend + threadIdx.x; i < V; i += blockDim.x) {
        dz[i] = from_float<floatX>(g != 0.0f ? scale * expf(to_float(z[i]) - maxv) + (i == target ? g : 0.0f) : 0.0f);
    }
}

// lp (B, T), dlogits (B, T, V) (may be logits) from logits (B, T, V), tokens and mask (B, T) on
// the device, for the masked mean NLL over `count` targets (fused_logprob_nll)
inline void fused_logprob_nll_cuda(float* lp, floatX* dlogits, const floatX* logits, const int* tokens, const uint8_t* mask, size_t count,
                                   size_t B, int T, int V, size_t ld, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;  // a block per logits row, any V (block_reduce needs a multiple of 32)
    bool vec = ld % x128::size == 0 && aligned16(logits) && aligned16(dlogits);  // every row 16-byte aligned: x128 groups, then the tail
    float g_target = count ? (float)(-1.0 / (double)count) : 0.0f;
    LAUNCH(fused_logprob_nll_kernel, (unsigned)(B * T), block_size, 0, stream, lp, dlogits, logits, tokens, mask, g_target, T, V, ld, vec);
    cudaCheck(cudaGetLastError());
}
#endif

// Per-sequence log-prob sums (DPO's, and the SFT step's loss on the GPU)

// ---- sequence log-prob sums (DPO): reference, kernels, launchers
// sums (B) = the log-prob of each sequence's target tokens: sums[b] = sum over t >= 1 of
// mask[b, t] * lp[b, t]; lp (B, T) from logprob_forward, mask (B, T) the token file's loss mask.
// Alignment, as masked_mean_loss reads them: lp[b, t] = log p(tokens[b, t] | tokens[b, < t])
// (from the logits at row t - 1), and mask[b, t] = 1 makes tokens[b, t] a target; position 0
// has nothing predicting it (lp 0) and never counts, whatever its mask says. Added in order, in
// double (sequence_logprob_sums above returns the same sums in double, for measures).
template <typename T>
void sequence_logprob_forward(T* sums, const T* lp, const uint8_t* mask, size_t B, size_t Tn) {
    for (size_t b = 0; b < B; b++) {
        double s = 0;
        for (size_t t = 1; t < Tn; t++) {
            if (mask[b * Tn + t]) s += lp[b * Tn + t];
        }
        sums[b] = T(s);
    }
}

// Given dsums (B) = d(objective)/d(sums): dlp (B, T) = d(objective)/d(lp) = dsums[b] at the
// targets (t >= 1, mask 1) and 0 elsewhere. Writes dlp (=), it does not add to it.
template <typename T>
void sequence_logprob_backward(T* dlp, const T* dsums, const uint8_t* mask, size_t B, size_t Tn) {
    for (size_t b = 0; b < B; b++) {
        for (size_t t = 0; t < Tn; t++) dlp[b * Tn + t] = (t != 0 && mask[b * Tn + t]) ? dsums[b] : T(0);
    }
}

#ifdef XWIN_CUDA
// one block per sequence: each thread adds its strided share of the targets, then block_reduce
// (a fixed order and tree for a given block size: the same bits run after run, no atomics)
__global__ void sequence_logprob_forward_kernel(float* sums, const float* lp, const uint8_t* mask, int T) {
    __shared__ float shared[32];
    size_t row = (size_t)blockIdx.x * T;
    float s = 0.0f;
    for (int t = 1 + threadIdx.x; t < T; t += blockDim.x) {
        if (mask[row + t]) s += lp[row + t];
    }
    s = block_reduce(s, shared, false);
    if (threadIdx.x == 0) sums[blockIdx.x] = s;
}

// one thread per element (b, t) of dlp (B, T)
__global__ void sequence_logprob_backward_kernel(float* dlp, const float* dsums, const uint8_t* mask, size_t N, int T) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) return;
    dlp[i] = (i % T != 0 && mask[i]) ? dsums[i / T] : 0.0f;
}

inline void sequence_logprob_forward_cuda(float* sums, const float* lp, const uint8_t* mask, int B, int T, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;  // a block per sequence; block_reduce needs a multiple of 32 (<= 1024)
    LAUNCH(sequence_logprob_forward_kernel, (unsigned)B, block_size, 0, stream, sums, lp, mask, T);
    cudaCheck(cudaGetLastError());
}

inline void sequence_logprob_backward_cuda(float* dlp, const float* dsums, const uint8_t* mask, int B, int T, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;  // a thread per element, any count (the last block's tail returns)
    size_t N = (size_t)B * T;
    LAUNCH(sequence_logprob_backward_kernel, ceil_div(N, block_size), block_size, 0, stream, dlp, dsums, mask, N, T);
    cudaCheck(cudaGetLastError());
}
#endif

// ---- reward head: reference, kernels, launchers (reward_score_index, reward_head_forward/_backward)
// Reward head: transformers' LlamaForSequenceClassification with one label and no bias.
// The score of sequence b is w . h[b, idx[b], :] where h (B, T, C) is the final-norm hidden
// state and w (C) the score row; idx[b] is the sequence's last token that is not padding.
// (transformers scores every position, then picks that one: the same number.)

// transformers' rule: the rightmost position whose token is not pad_id (0 when all are pad)
inline void reward_score_index(int* idx, const int* tokens, int B, int T, int pad_id) {
    for (int b = 0; b < B; b++) {
        idx[b] = 0;
        for (int t = T - 1; t >= 0; t--) {
            if (tokens[(size_t)b * T + t] != pad_id) { idx[b] = t; break; }
        }
    }
}

// scores (B) = h[b, idx[b], :] . w;  h (B, T, C), w (C)
template <typename X>
void reward_head_forward(X* scores, const X* h, const X* w, const int* idx, size_t B, size_t Tn, size_t C) {
    for (size_t b = 0; b < B; b++) {
        const X* row = h + (b * Tn + idx[b]) * C;
        X s = 0;
        for (size_t c = 0; c < C; c++) s += row[c] * w[c];
        scores[b] = s;
    }
}

// Given dscores (B): dh[b, idx[b], :] += dscores[b] * w (the other rows get nothing) and
// dw += sum_b dscores[b] * h[b, idx[b], :]
template <typename X>
void reward_head_backward(X* dh, X* dw, const X* dscores, const X* h, const X* w, const int* idx, size_t B, size_t Tn, size_t C) {
    for (size_t b = 0; b < B; b++) {
        size_t row = (b * Tn + idx[b]) * C;
        for (size_t c = 0; c < C; c++) {
            dh[row + c] += dscores[b] * w[c];
            dw[c] += dscores[b] * h[row + c];
        }
    }
}

#ifdef XWIN_CUDA
// one warp per sequence: the dot product of its scored row with w, reduced in FP32
__global__ void reward_head_forward_kernel(float* scores, const floatX* h, const floatX* w, const int* idx, int B, int T, int C) {
    int b = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (b >= B) return;
    const floatX* row = h + ((size_t)b * T + idx[b]) * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) s += to_float(row[c]) * to_float(w[c]);
    s = warp_reduce_sum(s);
    if (lane == 0) scores[b] = s;
}

// one thread per channel c, looping over the sequences in order (deterministic):
// dh[b, idx[b], c] += dscores[b] * w[c] and dw[c] += sum_b dscores[b] * h[b, idx[b], c]
__global__ void reward_head_backward_kernel(floatX* dh, float* dw, const float* dscores, const floatX* h, const floatX* w, const int* idx,
                                            int B, int T, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float wc = to_float(w[c]), sum = 0.0f;
    for (int b = 0; b < B; b++) {
        size_t at = ((size_t)b * T + idx[b]) * C + c;
        dh[at] = from_float<floatX>(to_float(dh[at]) + dscores[b] * wc);
        sum += dscores[b] * to_float(h[at]);
    }
    dw[c] += sum;
}

inline void reward_head_forward_cuda(float* scores, const floatX* h, const floatX* w, const int* idx, int B, int T, int C, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 128, warps = block_size / 32;  // a warp per sequence
    LAUNCH(reward_head_forward_kernel, (unsigned)ceil_div(B, warps), block_size, 0, stream, scores, h, w, idx, B, T, C);
    cudaCheck(cudaGetLastError());
}

inline void reward_head_backward_cuda(floatX* dh, float* dw, const float* dscores, const floatX* h, const floatX* w, const int* idx,
                                      int B, int T, int C, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;  // a thread per channel
    LAUNCH(reward_head_backward_kernel, (unsigned)ceil_div(C, block_size), block_size, 0, stream, dh, dw, dscores, h, w, idx, B, T, C);
    cudaCheck(cudaGetLastError());
}
#endif

// ---- the masked mean loss (the SFT objective on the CPU)
// Masked mean negative log-likelihood over the target tokens (mask = 1), as Hugging Face's
// loss with labels = -100 where mask = 0. *count receives the number of targets.
template <typename T>
double masked_mean_loss(const T* lp, const uint8_t* mask, size_t B, size_t Tn, size_t* count) {
    double sum = 0;
    size_t n = 0;
    for (size_t b = 0; b < B; b++) {
        for (size_t t = 1; t < Tn; t++) {
            if (mask[b * Tn + t]) { sum -= lp[b * Tn + t]; n++; }
        }
    }
    *count = n;
    return n ? sum / (double)n : 0.0;
}

// sums (B): the log-prob of each sequence's target tokens (DPO and scoring use these)
template <typename T>
void sequence_logprob_sums(double* sums, const T* lp, const uint8_t* mask, size_t B, size_t Tn) {
    for (size_t b = 0; b < B; b++) {
        double s = 0;
        for (size_t t = 1; t < Tn; t++) if (mask[b * Tn + t]) s += lp[b * Tn + t];
        sums[b] = s;
    }
}

// The gradient of masked_mean_loss with respect to lp: -mask / count
template <typename T>
void masked_mean_loss_backward(T* dlp, const uint8_t* mask, size_t B, size_t Tn, size_t count) {
    for (size_t i = 0; i < B * Tn; i++) dlp[i] = (i % Tn != 0 && mask[i] && count) ? T(-1.0 / (double)count) : T(0);
}

// ---- gradient clipping: reference, kernels, launcher (clip_grad_norm, grad_norm_coef_cuda)
// Global L2 norm of the gradient (accumulated in double), then clipping as
// torch.nn.utils.clip_grad_norm_ does: g *= max_norm / (norm + 1e-6) when that is < 1.
// max_norm <= 0 disables clipping. Returns the norm before clipping. The sum runs over 64
// fixed chunks added in order, so it is the same bits whatever the thread count (resuming
// a run must continue it exactly). ZeRO-2: grads holds elements [begin, end) of a gradient of
// n, and sum_ranks adds the other ranks' sums of each chunk (their parts of it) to this one's.
constexpr int CLIP_CHUNKS = 64;
inline float clip_grad_norm(float* grads, size_t n, float max_norm, size_t begin = 0, size_t end = SIZE_MAX,
                            const std::function<void(double* chunk_sums, int n)>& sum_ranks = nullptr) {
    end = std::min(end, n);
    double partial[CLIP_CHUNKS];
    #pragma omp parallel for
    for (int c = 0; c < CLIP_CHUNKS; c++) {
        double ss = 0;
        for (size_t i = std::max(n * c / CLIP_CHUNKS, begin); i < std::min(n * (c + 1) / CLIP_CHUNKS, end); i++) {
            ss += (double)grads[i - begin] * grads[i - begin];
        }
        partial[c] = ss;
    }
    if (sum_ranks) sum_ranks(partial, CLIP_CHUNKS);
    double ss = 0;
    for (int c = 0; c < CLIP_CHUNKS; c++) ss += partial[c];
    float norm = (float)std::sqrt(ss);
    if (max_norm > 0) {
        float coef = max_norm / (norm + 1e-6f);
        if (coef < 1.0f) {
            #pragma omp parallel for
            for (size_t i = 0; i < end - begin; i++) grads[i] *= coef;
        }
    }
    return norm;
}

#ifdef XWIN_CUDA
// The global norm on the device in two kernels (per-block partial sums, then one block) and
// the clip coefficient the host never reads: norm_coef = {norm, coef}. There is no scaling
// pass over the gradients: AdamW multiplies each gradient by coef as it reads it
// (adamw_update_cuda's grad_scale), the same product clip_grad_norm then adamw_update make.
constexpr int GRAD_NORM_BLOCKS = 512;

__global__ void grad_norm_partial_kernel(float* partials, const float* grads, size_t n) {
    __shared__ float shared[32];
    float ss = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) ss += grads[i] * grads[i];
    ss = block_reduce(ss, shared, false);
    if (threadIdx.x == 0) partials[blockIdx.x] = ss;
}

__global__ void grad_norm_finish_kernel(float* norm_coef, const float* partials, int n_partials, float max_norm) {
    __shared__ float shared[32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n_partials; i += blockDim.x) ss += partials[i];
    ss = block_reduce(ss, shared, false);
    if (threadIdx.x == 0) {
        float norm = sqrtf(ss), coef = max_norm / (norm + 1e-6f);
        norm_coef[0] = norm;
        norm_coef[1] = (max_norm > 0.0f && coef < 1.0f) ? coef : 1.0f;
    }
}

// partials (GRAD_NORM_BLOCKS) and norm_coef (2) are device scratch; grads are left as they are.
// sum_ranks: ZeRO-2's ranks each hold a part of the gradient: the partial sums of squares of
// every rank's part, summed over the ranks before the finish
inline void grad_norm_coef_cuda(const float* grads, size_t n, float max_norm, float* partials, float* norm_coef, cudaStream_t stream,
                                const std::function<void(float* partials, int n)>& sum_ranks = nullptr) {
    NVTX_RANGE_FN();
    const int block_size = 256, finish_block_size = 1024;
    LAUNCH(grad_norm_partial_kernel, GRAD_NORM_BLOCKS, block_size, 0, stream, partials, grads, n);
    if (sum_ranks) sum_ranks(partials, GRAD_NORM_BLOCKS);
    LAUNCH(grad_norm_finish_kernel, 1, finish_block_size, 0, stream, norm_coef, partials, GRAD_NORM_BLOCKS, max_norm);
    cudaCheck(cudaGetLastError());
}
#endif

// ---- AdamW and ZeRO's shards: reference, kernels, launchers (adamw_update, Shard, gradient_accumulate)
// AdamW as torch.optim.AdamW: decoupled weight decay, then bias-corrected moments.
//   p -= lr * wd * p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)        (t counts from 1)
struct AdamWConfig {
    float lr, beta1, beta2, eps, weight_decay;
};

// grad_scale multiplies each gradient as it is read (the GPU's clipping; 1 on the CPU, which clips in place)
inline void adamw_update(float* params, const float* grads, float* m, float* v, size_t n, const AdamWConfig& opt, float weight_decay, int t,
                         float grad_scale = 1.0f) {
    double bc1 = 1.0 - std::pow((double)opt.beta1, t), bc2 = 1.0 - std::pow((double)opt.beta2, t);
    float step_size = (float)(opt.lr / bc1), bc2_sqrt = (float)std::sqrt(bc2);
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float g = grads[i] * grad_scale;
        params[i] *= 1.0f - opt.lr * weight_decay;
        m[i] = opt.beta1 * m[i] + (1.0f - opt.beta1) * g;
        v[i] = opt.beta2 * v[i] + (1.0f - opt.beta2) * g * g;
        params[i] -= step_size * m[i] / (std::sqrt(v[i]) / bc2_sqrt + opt.eps);
    }
}

// ZeRO-1 (-z 1): each of a data-parallel run's ranks keeps the AdamW moments (and on the GPU
// the FP32 master weights) of one contiguous part of the flat parameter buffer, updates that
// part alone after the gradients' all-reduce, and the ranks then all-gather the updated
// weights. Rank r's part is [r * per, min(n, (r + 1) * per)) with per = ceil(n / world), so
// every part but the last has the same size (NCCL's all-gather needs equal parts: a buffer
// that is gathered is allocated with world * per elements). world 1 is the whole buffer.
// ZeRO-2 (-z 2, grads): a rank keeps the step's gradient of its part alone (grad_shard). After
// each micro-batch's backward the ranks reduce every gradient element to the rank whose part
// holds it (the GPU: layer by layer during the backward, each layer's gradients written to one
// of two reused layer buckets), so no rank holds a whole gradient across micro-batches.
struct Shard {
    int rank = 0, world = 1;
    size_t n = 0;               // the flat buffer's elements
    size_t begin = 0, end = 0;  // this rank's elements [begin, end) of it
    size_t per = 0;             // ceil(n / world): each part's size, the last one's at most
    bool grads = false;         // ZeRO-2: the gradients sharded too
};

inline Shard shard_of(size_t n, int rank, int world) {
    Shard s;
    s.rank = rank, s.world = world, s.n = n;
    s.per = (n + world - 1) / world;
    s.begin = std::min(n, (size_t)rank * s.per);
    s.end = std::min(n, s.begin + s.per);
    return s;
}

// The part of tensor [offset, offset + size) that lies in the shard: [*lo, *hi), false if none
inline bool shard_overlap(const Shard& s, size_t offset, size_t size, size_t* lo, size_t* hi) {
    *lo = std::max(offset, s.begin);
    *hi = std::min(offset + size, s.end);
    return *lo < *hi;
}

// acc (n) += x (n): ZeRO-2 adds a rank's gradient of the step so far into its next
// micro-batch's, before the ranks reduce that to it
inline void gradient_accumulate(float* acc, const float* x, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) acc[i] += x[i];
}

#ifdef XWIN_CUDA
// AdamW fused over one tensor of the flat buffers: the FP32 master weight, its moments and
// the floatX copy the forward reads, in the same arithmetic order as adamw_update. One thread
// per element; grad_scale (1 value on the device, the clip coefficient) or nullptr for 1.
__global__ void adamw_kernel(float* master, floatX* params, const float* grads, float* m, float* v, size_t n, float lr, float beta1,
                             float beta2, float eps, float weight_decay, float step_size, float bc2_sqrt, const float* grad_scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grads[i] * (grad_scale ? *grad_scale : 1.0f), p = master[i];
    p *= 1.0f - lr * weight_decay;
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    p -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    m[i] = mi;
    v[i] = vi;
    master[i] = p;
    params[i] = from_float<floatX>(p);
}

// grad_scale: a device pointer to the clip coefficient (grad_norm_coef_cuda's norm_coef + 1), or nullptr
inline void adamw_update_cuda(float* master, floatX* params, const float* grads, float* m, float* v, size_t n, const AdamWConfig& opt,
                              float weight_decay, int t, cudaStream_t stream, const float* grad_scale = nullptr) {
    NVTX_RANGE_FN();
    const int block_size = 256;
    double bc1 = 1.0 - std::pow((double)opt.beta1, t), bc2 = 1.0 - std::pow((double)opt.beta2, t);
    LAUNCH(adamw_kernel, ceil_div(n, block_size), block_size, 0, stream, master, params, grads, m, v, n, opt.lr, opt.beta1, opt.beta2,
           opt.eps, weight_decay, (float)(opt.lr / bc1), (float)std::sqrt(bc2), grad_scale);
    cudaCheck(cudaGetLastError());
}

__global__ void gradient_accumulate_kernel(float* acc, const float* x, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] += x[i];
}

inline void gradient_accumulate_cuda(float* acc, const float* x, size_t n, cudaStream_t stream) {
    NVTX_RANGE_FN();
    const int block_size = 256;
    LAUNCH(gradient_accumulate_kernel, ceil_div(n, block_size), block_size, 0, stream, acc, x, n);
    cudaCheck(cudaGetLastError());
}

// the floatX copy of FP32 values (the compute weights from the master weights)
__global__ void cast_to_floatX_kernel(floatX* out, const float* in, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_float<floatX>(in[i]);
}

inline void cast_to_floatX_cuda(floatX* out, const float* in, size_t n, cudaStream_t stream) {
    NVTX_RANGE_FN();
    LAUNCH(cast_to_floatX_kernel, ceil_div(n, 256), 256, 0, stream, out, in, n);
    cudaCheck(cudaGetLastError());
}
#endif

// ----------------------------------------------------------------------------
// Activations of one forward pass, kept for the backward; one allocation for (B, T).

constexpr int NUM_ACT_TENSORS = 21;

template <typename X>  // the activation type: float on the CPU, floatX on the GPU
struct ActTensorsT {
    X* residual;        // (L+1, B, T, C) the residual stream entering each layer, and the last
    X* attn_in;         // (L, B, T, C)   rmsnorm(residual) * attn_norm
    float* attn_rstd;   // (L, B, T)
    X* q;               // (L, B, T, C)   after RoPE
    X* k;               // (L, B, T, KVD) after RoPE
    X* v;               // (L, B, T, KVD)
    X* att;             // (L, B, H, T, T) attention probabilities (CPU; none on the GPU)
    X* att_out;         // (L, B, T, C)   attention output before wo
    X* residual_mid;    // (L, B, T, C)   residual after the attention block
    X* mlp_in;          // (L, B, T, C)
    float* mlp_rstd;    // (L, B, T)
    X* gate;            // (L, B, T, F)   h @ w_gate^T
    X* up;              // (L, B, T, F)   h @ w_up^T
    X* swiglu;          // (L, B, T, F)
    X* final_in;        // (B, T, C)      rmsnorm(residual[L]) * final_norm
    float* final_rstd;  // (B, T)
    X* logits;          // (B, T, V)      language-model head only (on the GPU rows padded_vocab(V) apart)
    float* lp;          // (B, T)         token log-probs (see logprob_forward)
    X* scratch;         // (B, T, C)      projection output before the residual add
    float* scores;      // (B)            reward head only: one score per sequence
    float* lse;         // (L, B, H, T)   GPU only: the log-sum-exp of each attention row (flash attention)
    bool recompute = false;  // attn_in, mlp_in and swiglu hold one layer, (B, T, C) and (B, T, F): the
                        // backward recomputes each layer's (activation recomputation, -r 1)
};
using ActTensors = ActTensorsT<float>;

// element counts of the activation tensors, in the order of ActTensorsT; flash: the GPU's layout,
// where attention keeps the log-sum-exp of each row instead of the (T, T) probabilities and the
// logits rows are padded_vocab(V) apart; recompute: one layer of attn_in, mlp_in and swiglu
inline void act_sizes(const LlamaConfig& c, size_t B, size_t T, size_t s[NUM_ACT_TENSORS], bool flash = false, bool recompute = false) {
    size_t C = c.dim, L = c.n_layers, H = c.n_heads, F = c.ffn_dim, KVD = kv_dim(c), N = B * T;
    size_t Lr = recompute ? 1 : L;     // the layers of the recomputed tensors kept at once
    bool lm = c.head_type == HEAD_LM;  // a reward model has no (B, T, V) logits anywhere
    size_t sz[NUM_ACT_TENSORS] = {(L + 1) * N * C, Lr * N * C, L * N, L * N * C, L * N * KVD, L * N * KVD,
                                  flash ? 0 : L * B * H * T * T, L * N * C, L * N * C, Lr * N * C, L * N, L * N * F, L * N * F,
                                  Lr * N * F, N * C, N, lm ? N * (flash ? padded_vocab(c.vocab_size) : c.vocab_size) : 0, N, N * C,
                                  lm ? 0 : B, flash ? L * B * H * T : 0};
    memcpy(s, sz, sizeof(sz));
}

template <typename X>
size_t point_activations(ActTensorsT<X>* a, void* memory, const LlamaConfig& c, size_t B, size_t T, bool flash = false, bool recompute = false) {
    size_t s[NUM_ACT_TENSORS];
    act_sizes(c, B, T, s, flash, recompute);
    a->recompute = recompute;
    Carver k{(char*)memory};
    k.take(a->residual, s[0]); k.take(a->attn_in, s[1]); k.take(a->attn_rstd, s[2]); k.take(a->q, s[3]);
    k.take(a->k, s[4]); k.take(a->v, s[5]); k.take(a->att, s[6]); k.take(a->att_out, s[7]);
    k.take(a->residual_mid, s[8]); k.take(a->mlp_in, s[9]); k.take(a->mlp_rstd, s[10]); k.take(a->gate, s[11]);
    k.take(a->up, s[12]); k.take(a->swiglu, s[13]); k.take(a->final_in, s[14]); k.take(a->final_rstd, s[15]);
    k.take(a->logits, s[16]); k.take(a->lp, s[17]); k.take(a->scratch, s[18]); k.take(a->scores, s[19]);
    k.take(a->lse, s[20]);
    return k.bytes;
}

// Gradients of the activations: scratch reused by every layer, one allocation.
template <typename X>
struct GradActTensorsT {
    X* residual;  // (B, T, C) gradient of the residual stream
    X* norm_out;  // (B, T, C) gradient of a rmsnorm output
    X* q;         // (B, T, C)
    X* k;         // (B, T, KVD)
    X* v;         // (B, T, KVD)
    X* att_out;   // (B, T, C)
    X* gate;      // (B, T, F)
    X* up;        // (B, T, F)
    X* swiglu;    // (B, T, F)
    X* logits;    // (B, T, V) language-model head only; none on the GPU, which writes the d-logits over acts.logits
};
using GradActTensors = GradActTensorsT<float>;

// dlogits_in_logits: the GPU's layout, no d-logits of their own (nullptr)
template <typename X>
size_t point_grad_activations(GradActTensorsT<X>* g, void* memory, const LlamaConfig& c, size_t B, size_t T, bool dlogits_in_logits = false) {
    size_t C = c.dim, F = c.ffn_dim, KVD = kv_dim(c), N = B * T;
    Carver k{(char*)memory};
    k.take(g->residual, N * C); k.take(g->norm_out, N * C); k.take(g->q, N * C); k.take(g->k, N * KVD);
    k.take(g->v, N * KVD); k.take(g->att_out, N * C); k.take(g->gate, N * F); k.take(g->up, N * F);
    k.take(g->swiglu, N * F);
    if (dlogits_in_logits) g->logits = nullptr;
    else k.take(g->logits, c.head_type == HEAD_LM ? N * c.vocab_size : 0);
    return k.bytes;
}

// ---- the model graph: the trunk's ops, their order and their buffers, written once
//
// llama_graph_forward and llama_graph_backward are the trunk of both builds (the embedding,
// every layer, the final norm), run over an op set: CpuOps (the references on float, in "The
// model" below) or CudaOps (the kernels on one stream: floatX weights and activations, FP32
// gradients, in "The model on the GPU"). A change to the architecture is made here, once. An op
// set has the ops of the same names, each the op of that name with what it keeps to itself (the
// RoPE table, the stream, scratch) left out of its arguments:
//   X                              the weights' and activations' type
//   embedding_forward(out, tokens, wte, N, C)          embedding_backward(dwte, dout, tokens, N, C)
//   rmsnorm_forward(out, rstd, inp, weight, N, C, eps)  rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, N, C)
//   rmsnorm_recompute(out, inp, weight, rstd, N, C)     the forward's output again (recomputation)
//   fused_residual_rmsnorm_forward(residual, out, rstd, a, b, weight, N, C, eps)
//   matmul_forward(out, inp, weight, N, C, OC)          matmul_backward(dinp, dweight, dout, inp, weight, N, C, OC)
//   matmul_forward_pair(out_a, out_b, inp, w_a, w_b, N, C, OC)    two matmuls of one input (gate and up;
//   matmul_backward_pair(dinp, dw_a, dw_b, dout_a, dout_b, inp, w_a, w_b, N, C, OC)   one cuBLAS batch on the GPU)
//   matmul_forward_qkv(q, k, v, inp, wq, wk, wv, N, C, KVD)        Q, K and V (one batch of 3 or 1 + 2 on the GPU)
//   matmul_backward_qkv(dinp, dwq, dwk, dwv, dq, dk, dv, inp, wq, wk, wv, N, C, KVD)
//   rope_forward(x, B, T, NH, hd)                       rope_backward(dx, B, T, NH, hd)
//   attention_forward(a, l, out, q, k, v, B, T, H, KV, hd)   which keeps in a what its backward reads
//   attention_backward(a, l, dq, dk, dv, dout, out, q, k, v, B, T, H, KV, hd)   (CPU: layer l's
//                                  probabilities a.att; GPU: its log-sum-exps a.lse)
//   swiglu_forward(out, gate, up, n)                    swiglu_backward(dgate, dup, dout, gate, up, n)  (=)
//   residual_forward(out, a, b, n)                      (layer_forward's last layer on the KV cache)
//   zero(x, n)
//   layer_grads(g, c, l)           where the backward writes layer l's weight gradients: g's slices
//                                  (layer_tensors), or a ZeRO-2 rank's layer bucket on the GPU
//   layer_grads_done(l)            layer l's weight gradients are final for this backward (the GPU's
//                                  data-parallel runs start their all-reduce; nothing on the CPU)
// tokens are where the op set reads them (the host's on the CPU, the device's on the GPU).

// Where one layer of the forward reads and writes (layer_forward): the training graph's slots of
// layer l in its activations, or the KV cache's one set of buffers, used in place.
template <typename X>
struct LayerBuffers {
    X* x;                 // (N, C) the residual stream into the layer
    X* norm;              // (N, C) its attention norm's output (the embedding's or the last layer's pass wrote it)
    X *q, *k, *v;         // (N, C), (N, KVD), (N, KVD)
    X* att_out;           // (N, C)
    X* scratch;           // (N, C) a projection's output before its residual add
    X* mid;               // (N, C) the residual stream after the attention block
    X* mlp_in;            // (N, C) the MLP norm's output
    float* mlp_rstd;      // (N)
    X *gate, *up, *sw;    // (N, F) each
    X* out;               // (N, C) the residual stream out of the layer
    X* out_norm;          // (N, C) the next norm's output (the next layer's attention norm, or the final norm)
    float* out_rstd;      // (N)
    const X* out_weight;  // that norm's weight, or nullptr: out alone (the KV cache's last layer)
};

// One layer of the model on N = B T rows, written once for training (llama_graph_forward) and
// the KV cache (infer_graph_layers): w holds the layer's tensors as the op set's matmul_forward
// reads them; attend(att_out, q, k, v) applies RoPE to q and k at their positions and
// attends, as its caller keeps positions and keys (the whole sequences, or the cache).
template <typename Ops, typename X, typename Attend>
void layer_forward(Ops& o, const LlamaConfig& c, const LayerTensorsT<X>& w, const LayerBuffers<X>& b, size_t N, Attend&& attend) {
    size_t C = c.dim, F = c.ffn_dim, KVD = kv_dim(c);
    o.matmul_forward_qkv(b.q, b.k, b.v, b.norm, w.wq, w.wk, w.wv, N, C, KVD);
    attend(b.att_out, b.q, b.k, b.v);
    o.matmul_forward(b.scratch, b.att_out, w.wo, N, C, C);
    o.fused_residual_rmsnorm_forward(b.mid, b.mlp_in, b.mlp_rstd, b.x, b.scratch, w.mlp_norm, N, C, c.norm_eps);
    o.matmul_forward_pair(b.gate, b.up, b.mlp_in, w.w_gate, w.w_up, N, C, F);
    o.swiglu_forward(b.sw, b.gate, b.up, N * F);
    o.matmul_forward(b.scratch, b.sw, w.w_down, N, F, C);
    // the stream out of the layer, and the norm that reads it
    if (b.out_weight) o.fused_residual_rmsnorm_forward(b.out, b.out_norm, b.out_rstd, b.mid, b.scratch, b.out_weight, N, C, c.norm_eps);
    else o.residual_forward(b.out, b.mid, b.scratch, N * C);
}

// tokens (B, T) -> every layer's activations in a and a.final_in (B, T, C), the final norm's
// output that a head reads
template <typename Ops>
void llama_graph_forward(Ops& o, const LlamaConfig& c, const ParamTensorsT<typename Ops::X>& p, ActTensorsT<typename Ops::X>& a,
                         const int* tokens, int B, int T) {
    using X = typename Ops::X;
    size_t C = c.dim, L = c.n_layers, H = c.n_heads, KV = c.n_kv_heads, F = c.ffn_dim, hd = head_dim(c), KVD = kv_dim(c);
    size_t N = (size_t)B * T;
    o.embedding_forward(a.residual, tokens, p.wte, N, C);
    o.rmsnorm_forward(a.attn_in, a.attn_rstd, a.residual, p.attn_norm, N, C, c.norm_eps);  // later layers' come fused with the residual add
    for (size_t l = 0; l < L; l++) {
        NVTX_RANGE("layer %zu forward", l);
        size_t r = a.recompute ? 0 : l;  // the layer's slot in the tensors recomputation keeps one layer of
        bool last = l + 1 == L;
        LayerBuffers<X> b{a.residual + l * N * C, a.attn_in + r * N * C, a.q + l * N * C, a.k + l * N * KVD, a.v + l * N * KVD,
                          a.att_out + l * N * C, a.scratch, a.residual_mid + l * N * C, a.mlp_in + r * N * C, a.mlp_rstd + l * N,
                          a.gate + l * N * F, a.up + l * N * F, a.swiglu + r * N * F, a.residual + (l + 1) * N * C,
                          last ? a.final_in : a.attn_in + (a.recompute ? 0 : l + 1) * N * C, last ? a.final_rstd : a.attn_rstd + (l + 1) * N,
                          last ? p.final_norm : p.attn_norm + (l + 1) * C};
        layer_forward(o, c, layer_tensors(p, c, l), b, N, [&](X* att_out, X* q, X* k, X* v) {
            o.rope_forward(q, B, T, H, hd);
            o.rope_forward(k, B, T, KV, hd);
            o.attention_forward(a, l, att_out, q, k, v, B, T, H, KV, hd);
        });
    }
}

// Backward of the trunk from d.norm_out = d(objective)/d(a.final_in) (B, T, C), which a head's
// backward writes; accumulates into the parameter gradients g. tokens as the forward's.
template <typename Ops>
void llama_graph_backward(Ops& o, const LlamaConfig& c, const ParamTensorsT<typename Ops::X>& p, ParamTensorsT<float>& g,
                          ActTensorsT<typename Ops::X>& a, GradActTensorsT<typename Ops::X>& d, const int* tokens, int B, int T) {
    size_t C = c.dim, L = c.n_layers, H = c.n_heads, KV = c.n_kv_heads, F = c.ffn_dim, hd = head_dim(c), KVD = kv_dim(c);
    size_t N = (size_t)B * T;
    o.zero(d.residual, N * C);
    o.rmsnorm_backward(d.residual, g.final_norm, d.norm_out, a.residual + L * N * C, p.final_norm, a.final_rstd, N, C);
    for (size_t l = L; l-- > 0;) {
        NVTX_RANGE("layer %zu backward", l);
        size_t r = a.recompute ? 0 : l;  // as in the forward
        LayerTensorsT<float> gl = o.layer_grads(g, c, l);  // where layer l's weight gradients go
        if (a.recompute) {  // the MLP block's input norm and SwiGLU product, from the kept residual, rstd, gate and up
            o.rmsnorm_recompute(a.mlp_in, a.residual_mid + l * N * C, p.mlp_norm + l * C, a.mlp_rstd + l * N, N, C);
            o.swiglu_forward(a.swiglu, a.gate + l * N * F, a.up + l * N * F, N * F);
        }
        // MLP block: residual[l+1] = mid + swiglu(mlp_in) @ w_down^T; d.residual flows to mid unchanged
        o.zero(d.swiglu, N * F);
        o.zero(d.norm_out, N * C);  // d.gate and d.up: swiglu_backward writes them
        o.matmul_backward(d.swiglu, gl.w_down, d.residual, a.swiglu + r * N * F, p.w_down + l * C * F, N, F, C);
        o.swiglu_backward(d.gate, d.up, d.swiglu, a.gate + l * N * F, a.up + l * N * F, N * F);
        o.matmul_backward_pair(d.norm_out, gl.w_gate, gl.w_up, d.gate, d.up, a.mlp_in + r * N * C, p.w_gate + l * F * C,
                               p.w_up + l * F * C, N, C, F);
        o.rmsnorm_backward(d.residual, gl.mlp_norm, d.norm_out, a.residual_mid + l * N * C, p.mlp_norm + l * C, a.mlp_rstd + l * N, N, C);
        // attention block: mid = residual[l] + att_out @ wo^T
        o.zero(d.att_out, N * C);
        o.zero(d.q, N * C);
        o.zero(d.k, N * KVD);
        o.zero(d.v, N * KVD);
        o.zero(d.norm_out, N * C);
        o.matmul_backward(d.att_out, gl.wo, d.residual, a.att_out + l * N * C, p.wo + l * C * C, N, C, C);
        o.attention_backward(a, l, d.q, d.k, d.v, d.att_out, a.att_out + l * N * C, a.q + l * N * C, a.k + l * N * KVD, a.v + l * N * KVD,
                             B, T, H, KV, hd);
        o.rope_backward(d.q, B, T, H, hd);
        o.rope_backward(d.k, B, T, KV, hd);
        auto* attn_in = a.attn_in + r * N * C;
        if (a.recompute) o.rmsnorm_recompute(attn_in, a.residual + l * N * C, p.attn_norm + l * C, a.attn_rstd + l * N, N, C);
        o.matmul_backward_qkv(d.norm_out, gl.wq, gl.wk, gl.wv, d.q, d.k, d.v, attn_in, p.wq + l * C * C,
                              p.wk + l * KVD * C, p.wv + l * KVD * C, N, C, KVD);
        o.rmsnorm_backward(d.residual, gl.attn_norm, d.norm_out, a.residual + l * N * C, p.attn_norm + l * C, a.attn_rstd + l * N, N, C);
        o.layer_grads_done(l);  // layer l's parameter gradients are final (data parallel: their all-reduce may start)
    }
    o.embedding_backward(g.wte, d.residual, tokens, N, C);
}

// ----------------------------------------------------------------------------
// The model

struct Llama {
    LlamaConfig config{};
    size_t num_params;
    float* params_memory;  // (num_params) fp32 master weights
    ParamTensors params;
    float* grads_memory;   // (num_params)
    ParamTensors grads;
    float* grad_shard;     // (shard.end - shard.begin) ZeRO-2: the step's gradient of this rank's part, summed over the ranks
    float* m_memory;       // (shard.end - shard.begin) AdamW first moment of this rank's part (all of it without ZeRO)
    float* v_memory;       // (shard.end - shard.begin) AdamW second moment
    Shard shard;           // the parameters this rank updates (ZeRO-1); set before llama_alloc, else all
    int adam_step;
    int B, T;              // the activation allocation's shape (0 until allocated)
    void* acts_memory;
    ActTensors acts;
    void* grad_acts_memory;
    GradActTensors grad_acts;
    float* rope_table;     // (T, hd/2, 2) the cos and sin of every position < T (rope_table), with the activations
};

// A model with zeroed parameters for a config (the loaders and tests fill them).
inline void llama_init(Llama* model, const LlamaConfig& config) {
    *model = Llama{};
    model->config = config;
    model->num_params = num_parameters(config);
    model->params_memory = (float*)calloc(model->num_params ? model->num_params : 1, sizeof(float));
    if (!model->params_memory) {
        fprintf(stderr, "error: out of host memory for %zu parameters\n", model->num_params);
        exit(1);
    }
    model->params = point_parameters(config, model->params_memory);
}

// Reads a model file. Returns "" or what is wrong (the model is left empty then).
// With crc, also the CRC-32 of the file's bytes (to check a checkpoint).
inline std::string llama_load_checked(Llama* model, const char* path, uint32_t* crc = nullptr) {
    *model = Llama{};
    FILE* f = fopen(path, "rb");
    if (!f) return string_format("cannot open: %s", strerror(errno));
    struct Closer { FILE* f; ~Closer() { fclose(f); } } closer{f};
    size_t size = file_size_of(f);
    if (size < MODEL_HEADER_BYTES) return string_format("file is %zu bytes, shorter than the %zu-byte model header", size, MODEL_HEADER_BYTES);
    unsigned char header[MODEL_HEADER_BYTES];
    if (fread(header, 1, MODEL_HEADER_BYTES, f) != MODEL_HEADER_BYTES) return "read error in header";
    uint32_t sum = crc32_update(0, header, MODEL_HEADER_BYTES);
    LlamaConfig config{};
    int dtype = DTYPE_FP32;
    std::string err = model_header_parse(header, &config, &dtype);
    if (!err.empty()) return err;
    size_t n = num_parameters(config), elem = dtype == DTYPE_FP32 ? 4 : 2;
    size_t expected = MODEL_HEADER_BYTES + n * elem;
    if (size != expected) {
        return string_format("file is %zu bytes but its header describes %zu %s parameters, i.e. %zu bytes%s", size, n,
                             dtype == DTYPE_FP32 ? "float32" : "bfloat16", expected, size < expected ? ": truncated" : "");
    }
    llama_init(model, config);
    bool ok = true;
    if (dtype == DTYPE_FP32) {
        ok = fread(model->params_memory, 4, n, f) == n;
        sum = crc32_update(sum, model->params_memory, 4 * n);
    } else {
        std::vector<uint16_t> chunk(1 << 20);
        for (size_t done = 0; ok && done < n; done += chunk.size()) {
            size_t count = n - done < chunk.size() ? n - done : chunk.size();
            ok = fread(chunk.data(), 2, count, f) == count;
            sum = crc32_update(sum, chunk.data(), 2 * count);
            for (size_t i = 0; ok && i < count; i++) model->params_memory[done + i] = bf16_to_float(chunk[i]);
        }
    }
    if (!ok) {
        free(model->params_memory);
        *model = Llama{};
        return "read error in the parameters";
    }
    if (crc) *crc = sum;
    return "";
}

inline void llama_load(Llama* model, const char* path, uint32_t* crc = nullptr) {
    std::string err = llama_load_checked(model, path, crc);
    if (!err.empty()) fail_file(path, "%s", err.c_str());
}

// Writes the parameters (atomically: temporary file, fsync, rename); returns the file's CRC-32.
inline uint32_t llama_save(const Llama* model, const char* path, int dtype) {
    AtomicFile f;
    atomic_open(&f, path);
    unsigned char header[MODEL_HEADER_BYTES];
    model_header_write(header, model->config, dtype);
    atomic_write(&f, header, MODEL_HEADER_BYTES);
    if (dtype == DTYPE_FP32) {
        atomic_write(&f, model->params_memory, 4 * model->num_params);
    } else {
        std::vector<uint16_t> buf(model->num_params);
        for (size_t i = 0; i < model->num_params; i++) buf[i] = float_to_bf16(model->params_memory[i]);
        atomic_write(&f, buf.data(), 2 * buf.size());
    }
    return atomic_commit(&f);
}

// Allocates the activations for batches up to (B, T) and, when training, the gradients,
// their activation scratch and the AdamW moments. Once, before the first step.
inline void llama_alloc(Llama* model, int B, int T, bool training, bool recompute = false) {
    const LlamaConfig& c = model->config;
    if (T > c.max_seq_len) {
        fprintf(stderr, "error: sequence length %d exceeds the model's max_seq_len %d\n", T, c.max_seq_len);
        exit(1);
    }
    model->B = B;
    model->T = T;
    recompute = recompute && training;  // a backward recomputes them: a model that does not train keeps every layer's
    model->acts_memory = malloc_check(point_activations(&model->acts, nullptr, c, B, T, false, recompute));
    point_activations(&model->acts, model->acts_memory, c, B, T, false, recompute);
    model->rope_table = (float*)malloc_check(rope_table_size(T, head_dim(c)) * sizeof(float));
    rope_table_fill(model->rope_table, T, c);
    if (!training) return;
    size_t n = model->num_params;
    if (model->shard.end == 0) model->shard = shard_of(n, 0, 1);
    size_t part = model->shard.end - model->shard.begin;
    model->grads_memory = (float*)malloc_check(n * sizeof(float));
    model->m_memory = (float*)calloc(std::max(part, (size_t)1), sizeof(float));
    model->v_memory = (float*)calloc(std::max(part, (size_t)1), sizeof(float));
    if (model->shard.grads) model->grad_shard = (float*)calloc(std::max(part, (size_t)1), sizeof(float));
    if (!model->m_memory || !model->v_memory || (model->shard.grads && !model->grad_shard)) {
        fprintf(stderr, "error: out of host memory for the AdamW state of %zu parameters\n", part);
        exit(1);
    }
    model->grads = point_parameters(c, model->grads_memory);
    memset(model->grads_memory, 0, n * sizeof(float));
    model->grad_acts_memory = malloc_check(point_grad_activations(&model->grad_acts, nullptr, c, B, T));
    point_grad_activations(&model->grad_acts, model->grad_acts_memory, c, B, T);
}

inline void llama_free(Llama* model) {
    free(model->params_memory);
    free(model->grads_memory);
    free(model->grad_shard);
    free(model->m_memory);
    free(model->v_memory);
    free(model->acts_memory);
    free(model->grad_acts_memory);
    free(model->rope_table);
    *model = Llama{};
}

// The CPU reference's op set for the model graph (llama_graph_forward/_backward): the ops above
// on float; the RoPE table and the pad id are the model's.
struct CpuOps {
    using X = float;
    const float* rope_table;
    int pad_id;
    LayerTensorsT<float> layer_grads(ParamTensors& g, const LlamaConfig& c, size_t l) { return layer_tensors(g, c, l); }
    void layer_grads_done(size_t) {}  // the CPU build's ranks reduce the whole gradient after each micro-batch or step
    void embedding_forward(float* out, const int* tokens, const float* wte, size_t N, size_t C) { ::embedding_forward(out, tokens, wte, N, C); }
    void residual_forward(float* out, const float* a, const float* b, size_t n) { ::residual_forward(out, a, b, n); }
    void embedding_backward(float* dwte, const float* dout, const int* tokens, size_t N, size_t C) {
        ::embedding_backward(dwte, dout, tokens, N, C, pad_id);
    }
    void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, size_t N, size_t C, double eps) {
        ::rmsnorm_forward(out, rstd, inp, weight, N, C, eps);
    }
    void rmsnorm_recompute(float* out, const float* inp, const float* weight, const float* rstd, size_t N, size_t C) {
        ::rmsnorm_recompute(out, inp, weight, rstd, N, C);
    }
    void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight, const float* rstd, size_t N, size_t C) {
        ::rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, N, C);
    }
    void fused_residual_rmsnorm_forward(float* residual, float* out, float* rstd, const float* a, const float* b, const float* weight, size_t N,
                                        size_t C, double eps) {
        ::fused_residual_rmsnorm_forward(residual, out, rstd, a, b, weight, N, C, eps);
    }
    void matmul_forward(float* out, const float* inp, const float* weight, size_t N, size_t C, size_t OC) { ::matmul_forward(out, inp, weight, N, C, OC); }
    void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight, size_t N, size_t C, size_t OC) {
        ::matmul_backward(dinp, dweight, dout, inp, weight, N, C, OC);
    }
    void matmul_forward_pair(float* out_a, float* out_b, const float* inp, const float* w_a, const float* w_b, size_t N, size_t C, size_t OC) {
        ::matmul_forward(out_a, inp, w_a, N, C, OC);
        ::matmul_forward(out_b, inp, w_b, N, C, OC);
    }
    void matmul_backward_pair(float* dinp, float* dw_a, float* dw_b, const float* dout_a, const float* dout_b, const float* inp, const float* w_a,
                              const float* w_b, size_t N, size_t C, size_t OC) {
        ::matmul_backward(dinp, dw_a, dout_a, inp, w_a, N, C, OC);
        ::matmul_backward(dinp, dw_b, dout_b, inp, w_b, N, C, OC);
    }
    void matmul_forward_qkv(float* q, float* k, float* v, const float* inp, const float* wq, const float* wk, const float* wv, size_t N, size_t C,
                            size_t KVD) {
        ::matmul_forward(q, inp, wq, N, C, C);
        matmul_forward_pair(k, v, inp, wk, wv, N, C, KVD);
    }
    void matmul_backward_qkv(float* dinp, float* dwq, float* dwk, float* dwv, const float* dq, const float* dk, const float* dv, const float* inp,
                             const float* wq, const float* wk, const float* wv, size_t N, size_t C, size_t KVD) {
        ::matmul_backward(dinp, dwq, dq, inp, wq, N, C, C);
        matmul_backward_pair(dinp, dwk, dwv, dk, dv, inp, wk, wv, N, C, KVD);
    }
    void rope_forward(float* x, size_t B, size_t T, size_t NH, size_t hd) { ::rope_forward(x, rope_table, B, T, NH, (int)hd); }
    void rope_backward(float* dx, size_t B, size_t T, size_t NH, size_t hd) { ::rope_backward(dx, rope_table, B, T, NH, (int)hd); }
    void attention_forward(ActTensors& a, size_t l, float* out, const float* q, const float* k, const float* v, size_t B, size_t T, size_t H,
                           size_t KV, size_t hd) {
        ::attention_forward(out, a.att + l * B * H * T * T, q, k, v, B, T, H, KV, hd);
    }
    void attention_backward(ActTensors& a, size_t l, float* dq, float* dk, float* dv, const float* dout, const float* out, const float* q,
                            const float* k, const float* v, size_t B, size_t T, size_t H, size_t KV, size_t hd) {
        (void)out;  // the probabilities are kept
        ::attention_backward(dq, dk, dv, dout, a.att + l * B * H * T * T, q, k, v, B, T, H, KV, hd);
    }
    void swiglu_forward(float* out, const float* gate, const float* up, size_t n) { ::swiglu_forward(out, gate, up, n); }
    void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, size_t n) {
        ::swiglu_backward(dgate, dup, dout, gate, up, n);
    }
    void zero(float* x, size_t n) { memset(x, 0, n * sizeof(float)); }
};

// tokens (B, T) -> every layer's activations and acts.final_in (B, T, C), the final norm's output
// that a head reads (llama_graph_forward). B, T <= the allocation.
inline void llama_forward_trunk(Llama* model, const int* tokens, int B, int T) {
    if (B > model->B || T > model->T) {
        fprintf(stderr, "error: batch (%d, %d) exceeds the allocated (%d, %d)\n", B, T, model->B, model->T);
        exit(1);
    }
    CpuOps o{model->rope_table, model->config.pad_id};
    llama_graph_forward(o, model->config, model->params, model->acts, tokens, B, T);
}

// tokens (B, T) -> acts.logits (B, T, V) and acts.lp (B, T) with the language-model head, or
// acts.scores (B) with the reward head, which scores position score_idx[b] of sequence b
// (reward_score_index). B, T <= the allocation.
inline void llama_forward(Llama* model, const int* tokens, int B, int T, const int* score_idx = nullptr) {
    const LlamaConfig& c = model->config;
    size_t C = c.dim, N = (size_t)B * T;
    ActTensors& a = model->acts;
    llama_forward_trunk(model, tokens, B, T);
    if (c.head_type == HEAD_REWARD) {
        reward_head_forward(a.scores, a.final_in, model->params.head, score_idx, B, T, C);
        return;
    }
    matmul_forward(a.logits, a.final_in, model->params.head, N, C, (size_t)c.vocab_size);
    logprob_forward(a.lp, a.logits, tokens, B, T, c.vocab_size);
}

inline void llama_zero_grad(Llama* model) { memset(model->grads_memory, 0, model->num_params * sizeof(float)); }

// Backward of the trunk (the final norm, every layer, the embedding) from grad_acts.norm_out =
// d(objective)/d(final_in) (B, T, C), which a head's backward writes (llama_graph_backward).
// Accumulates into model->grads.
inline void llama_backward_trunk(Llama* model, const int* tokens, int B, int T) {
    CpuOps o{model->rope_table, model->config.pad_id};
    llama_graph_backward(o, model->config, model->params, model->grads, model->acts, model->grad_acts, tokens, B, T);
}

// Backward of an objective of the token log-probs: dlp (B, T) = d(objective)/d(acts.lp).
inline void llama_backward(Llama* model, const int* tokens, const float* dlp, int B, int T) {
    size_t N = (size_t)B * T, C = model->config.dim, V = model->config.vocab_size;
    GradActTensors& d = model->grad_acts;
    logprob_backward(d.logits, model->acts.logits, tokens, dlp, B, T, V);
    memset(d.norm_out, 0, N * C * sizeof(float));
    matmul_backward(d.norm_out, model->grads.head, d.logits, model->acts.final_in, model->params.head, N, C, V);
    llama_backward_trunk(model, tokens, B, T);
}

// The SFT step's loss and gradient: the forward, then the masked mean NLL over `count` targets
// (the step's, across its micro-batches) through fused_logprob_nll, which computes acts.lp and
// d.logits from one max and sum per logits row, then the head's and the trunk's backward.
// Accumulates into model->grads; returns this batch's share of the loss, sum(-lp[mask]) / count
// (the same bits as llama_forward, masked_mean_loss, masked_mean_loss_backward, llama_backward).
inline double llama_nll_forward_backward(Llama* model, const int* tokens, const uint8_t* mask, int B, int T, size_t count) {
    size_t N = (size_t)B * T, C = model->config.dim, V = model->config.vocab_size;
    ActTensors& a = model->acts;
    GradActTensors& d = model->grad_acts;
    llama_forward_trunk(model, tokens, B, T);
    matmul_forward(a.logits, a.final_in, model->params.head, N, C, V);
    fused_logprob_nll(a.lp, d.logits, a.logits, tokens, mask, count, B, T, V);
    memset(d.norm_out, 0, N * C * sizeof(float));
    matmul_backward(d.norm_out, model->grads.head, d.logits, a.final_in, model->params.head, N, C, V);
    llama_backward_trunk(model, tokens, B, T);
    size_t n;
    return masked_mean_loss(a.lp, mask, B, T, &n) * n / std::max(count, (size_t)1);
}

// Backward of an objective of a reward model's scores: dscores (B) = d(objective)/d(acts.scores),
// score_idx as in the forward.
inline void llama_reward_backward(Llama* model, const int* tokens, const float* dscores, const int* score_idx, int B, int T) {
    size_t N = (size_t)B * T, C = model->config.dim;
    GradActTensors& d = model->grad_acts;
    memset(d.norm_out, 0, N * C * sizeof(float));
    reward_head_backward(d.norm_out, model->grads.head, dscores, model->acts.final_in, model->params.head, score_idx, B, T, C);
    llama_backward_trunk(model, tokens, B, T);
}

// One AdamW step over the tensors' parts in this rank's shard (all of them without ZeRO;
// decay on matrices only); counts the step. With ZeRO-1 the ranks then all-gather the weights.
inline void llama_update(Llama* model, const AdamWConfig& opt) {
    model->adam_step += 1;
    size_t sizes[NUM_PARAM_TENSORS], offset = 0, lo, hi, b = model->shard.begin;
    param_sizes(model->config, sizes);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        float wd = param_is_decayed(i) ? opt.weight_decay : 0.0f;
        if (shard_overlap(model->shard, offset, sizes[i], &lo, &hi)) {
            const float* grads = model->shard.grads ? model->grad_shard + (lo - b) : model->grads_memory + lo;
            adamw_update(model->params_memory + lo, grads, model->m_memory + (lo - b), model->v_memory + (lo - b), hi - lo, opt, wd,
                         model->adam_step);
        }
        offset += sizes[i];
    }
}

#ifdef XWIN_CUDA
// ----------------------------------------------------------------------------
// The model on the GPU: llama_forward and llama_backward above, each op replaced by its
// kernel. FP32 master weights, gradients and AdamW moments; floatX compute weights and
// activations. One stream; NVTX ranges name every launcher and each layer with its index.

// Host-to-device copies on a step's path go through pinned (page-locked) staging buffers: from
// pageable memory the driver stages a cudaMemcpyAsync synchronously, so it is neither
// asynchronous nor overlapped with the host's work. One Upload per uploaded tensor, sized once;
// its event marks the end of its last copy, so the host never refills a buffer that a queued
// copy still reads (upload_async).
struct Upload {
    void* pinned = nullptr;           // (bytes) page-locked host memory
    size_t bytes = 0;
    cudaEvent_t copied = nullptr;     // recorded after the last copy out of pinned
};

struct LlamaCuda {
    LlamaConfig config{};
    size_t num_params = 0;
    int B = 0, T = 0, adam_step = 0;
    Shard shard;                      // the parameters this rank updates (ZeRO-1; all of them without)
    float* master = nullptr;          // (shard.end - shard.begin) FP32 master weights of this rank's part
    floatX* params_memory = nullptr;  // (num_params, padded to world * shard.per) the compute copy the forward reads
    ParamTensorsT<floatX> params;
    float* grads_memory = nullptr;    // (num_params; ZeRO-2: zero2_grads_count) the gradients the backward writes
    ParamTensorsT<float> grads;       // ZeRO-2: the embedding, final norm and head only (the layers' go to buckets)
    float* grad_shard = nullptr;      // (shard.per) ZeRO-2: the step's gradient of this rank's part, summed over the ranks
    float* buckets[2] = {};           // (2, layer_param_count) ZeRO-2: layer l's gradients in buckets[l % 2], in grads_memory
    cudaEvent_t bucket_free[2] = {};  // ZeRO-2: recorded when a bucket's reduce has read and zeroed it
    float* m_memory = nullptr;        // (shard.end - shard.begin)
    float* v_memory = nullptr;        // (shard.end - shard.begin)
    void* acts_memory = nullptr;
    ActTensorsT<floatX> acts;
    void* grad_acts_memory = nullptr;
    GradActTensorsT<floatX> grad_acts;
    float* attn_delta = nullptr;      // (B, H, T) flash attention's backward: rowsum(dout * out)
    float* norm_weight_partials = nullptr;  // (rmsnorm_backward_blocks(B T), C) the RMSNorm backward's partial weight gradients
    float* rope_table = nullptr;      // (T, hd/2, 2) the cos and sin of every position < T (rope_table)
    int* tokens = nullptr;            // (B, T)
    int* token_buckets = nullptr;     // (3 B T + 1) training: the last forward's tokens, bucketed by embedding_buckets
    int n_token_buckets = 0;
    std::vector<int> host_token_buckets;  // (3 B T + 1) their host copy
    int* score_idx = nullptr;         // (B) reward head: the scored position of each sequence
    float* dlp = nullptr;             // (B, T)
    float* dscores = nullptr;         // (B) reward head
    uint8_t* mask = nullptr;          // (B, T) the loss mask of the last runner_sequence_logprobs
    float* seq_sums = nullptr;        // (B) its per-sequence log-prob sums
    float* dsums = nullptr;           // (B) training: d(objective)/d(seq_sums), from the host
    float* norm_partials = nullptr;   // (GRAD_NORM_BLOCKS)
    float* norm_coef = nullptr;       // (2) {norm, clip coefficient}
    bool clip_pending = false;        // the next llama_cuda_update scales the gradients by norm_coef[1]
    struct {                          // the step's host-to-device copies, through pinned staging
        Upload tokens, token_buckets, score_idx, mask, dlp, dscores, dsums;
    } up;
    cudaEvent_t queued = nullptr;     // recorded after the last queued kernel, to wait for it (runner_synchronize)
    // data parallel: called by the backward when layer l's gradients are final (the trainer sets
    // it for a step's last micro-batch: the layer's all-reduce then overlaps the layers below it)
    void (*layer_grads_ready)(LlamaCuda* g, size_t l, void* ctx) = nullptr;
    void* layer_grads_ctx = nullptr;
    cudaStream_t stream = nullptr;
};

// the elements of grads_memory: every parameter's, or ZeRO-2's embedding, final norm, head and layer buckets
inline size_t llama_cuda_grads_count(const LlamaCuda* g) { return g->shard.grads ? zero2_grads_count(g->config) : g->num_params; }

template <typename U>
U* cuda_alloc(size_t count) {
    void* p = nullptr;
    cudaCheck(cudaMalloc(&p, (count ? count : 1) * sizeof(U)));
    return (U*)p;
}

inline void upload_init(Upload* u, size_t bytes) {
    cudaCheck(cudaMallocHost(&u->pinned, bytes ? bytes : 1));
    u->bytes = bytes;
    cudaCheck(cudaEventCreateWithFlags(&u->copied, cudaEventDisableTiming));
}

inline void upload_free(Upload* u) {
    if (u->pinned) cudaCheck(cudaFreeHost(u->pinned));
    if (u->copied) cudaCheck(cudaEventDestroy(u->copied));
    *u = Upload{};
}

// n bytes of src (host) to dst (device) on stream st, through u's pinned buffer: waits for the
// buffer's previous copy to end (the device may still be reading it), fills it, queues the copy
// and records its end. src is free again on return.
inline void upload_async(Upload* u, void* dst, const void* src, size_t n, cudaStream_t st) {
    if (n > u->bytes) {
        fprintf(stderr, "error: an upload of %zu bytes into a staging buffer of %zu\n", n, u->bytes);
        exit(1);
    }
    cudaCheck(cudaEventSynchronize(u->copied));
    memcpy(u->pinned, src, n);
    cudaCheck(cudaMemcpyAsync(dst, u->pinned, n, cudaMemcpyHostToDevice, st));
    cudaCheck(cudaEventRecord(u->copied, st));
}

// What llama_cuda_init allocates, by kind, in bytes: every cudaMalloc of the model, computed
// before the first one (dev/roofline.py's memory_plan computes the same numbers).
struct GpuMemoryPlan {
    size_t weights = 0;           // (num_params) floatX, the compute copy
    size_t master = 0;            // (num_params) FP32 master weights
    size_t grads = 0;             // (num_params) FP32, training (ZeRO-2: zero2_grads_count and the rank's part)
    size_t moments = 0;           // (2, num_params) FP32 AdamW m and v, training
    size_t activations = 0;       // ActTensorsT<floatX>, the GPU layout (log-sum-exps, no (T, T))
    size_t grad_activations = 0;  // GradActTensorsT<floatX>, training (no d-logits: they overwrite the logits)
    size_t scratch = 0;           // tokens, score_idx, the sequence sums' mask and sums; training: dlp, dscores, dsums, norm
                                  // scratch, attention delta, embedding buckets, RMSNorm weight-gradient partials
    size_t rope_table = 0;        // (T, hd/2, 2) FP32 RoPE cos and sin
};

inline size_t gpu_memory_plan_total(const GpuMemoryPlan& m) {
    return m.weights + m.master + m.grads + m.moments + m.activations + m.grad_activations + m.scratch + m.rope_table;
}

// zero_world: the ranks that share the master weights and AdamW moments (ZeRO-1), 1 for none;
// each rank holds ceil(n / zero_world) of them and the compute copy padded to that many per rank.
// recompute: activation recomputation's one layer of RMSNorm outputs and SwiGLU product (-r 1).
// shard_grads: ZeRO-2, the gradients of zero2_grads_count and of the rank's part instead of all.
inline GpuMemoryPlan gpu_memory_plan(const LlamaConfig& c, int B, int T, bool training, int zero_world = 1, bool recompute = false,
                                     bool shard_grads = false) {
    size_t n = 0, N = (size_t)B * T, sizes[NUM_PARAM_TENSORS];
    param_sizes(c, sizes);
    for (size_t s : sizes) n += s;
    Shard part = shard_of(n, 0, training ? zero_world : 1);
    GpuMemoryPlan m;
    m.weights = part.per * part.world * sizeof(floatX);
    m.master = part.per * sizeof(float);
    ActTensorsT<floatX> acts;
    m.activations = point_activations(&acts, nullptr, c, B, T, true, recompute && training);
    m.scratch = N * sizeof(int) + B * sizeof(int) + N * sizeof(uint8_t) + B * sizeof(float);
    m.rope_table = rope_table_size(T, head_dim(c)) * sizeof(float);
    if (training) {
        GradActTensorsT<floatX> grad_acts;
        m.grads = (shard_grads && part.world > 1 ? zero2_grads_count(c) + part.per : n) * sizeof(float);
        m.moments = 2 * part.per * sizeof(float);
        m.grad_activations = point_grad_activations(&grad_acts, nullptr, c, B, T, true);
        m.scratch += N * sizeof(float) + B * sizeof(float) + B * sizeof(float) + GRAD_NORM_BLOCKS * sizeof(float) + 2 * sizeof(float) +
                     (size_t)B * c.n_heads * T * sizeof(float) + (3 * N + 1) * sizeof(int) +
                     rmsnorm_backward_blocks(N) * c.dim * sizeof(float);
    }
    return m;
}

// "2.20 GB", "156.29 kB": bytes in decimal units
inline std::string bytes_text(size_t b) {
    return b >= 1000000000 ? string_format("%.2f GB", b / 1e9) : b >= 1000000 ? string_format("%.2f MB", b / 1e6) : string_format("%.2f kB", b / 1e3);
}

// "weights 2.20 GB, master 4.40 GB, ..., total 32.10 GB": the plan in one line
inline std::string gpu_memory_plan_text(const GpuMemoryPlan& m) {
    const char* names[] = {"weights", "master", "grads", "moments", "activations", "activation grads", "scratch", "rope table", "total"};
    size_t bytes[] = {m.weights, m.master, m.grads, m.moments, m.activations, m.grad_activations, m.scratch, m.rope_table,
                      gpu_memory_plan_total(m)};
    std::string out;
    for (int i = 0; i < 9; i++) out += string_format("%s%s %s", i ? ", " : "", names[i], bytes_text(bytes[i]).c_str());
    return out;
}

// "" when the plan fits in free_bytes, else the one-line refusal naming what is needed against what the device has
inline std::string gpu_memory_refusal(const GpuMemoryPlan& m, int B, int T, size_t free_bytes, size_t total_bytes) {
    size_t need = gpu_memory_plan_total(m);
    if (need <= free_bytes) return "";
    return string_format("the GPU model at batch (%d, %d) needs %s (%s) but the device has %s free of %s; "
                         "HINT: use a smaller batch or sequence length",
                         B, T, bytes_text(need).c_str(), gpu_memory_plan_text(m).c_str(), bytes_text(free_bytes).c_str(),
                         bytes_text(total_bytes).c_str());
}

// Prints the plan ("<title>: weights ..., total ...") before the first allocation, and exits
// with the one-line refusal ("error: <who>the GPU model at ...") when the device has less free
// memory than the plan needs
inline void gpu_memory_require(const GpuMemoryPlan& plan, const std::string& title, const char* who, int B, int T) {
    size_t free_bytes = 0, total_bytes = 0;
    cudaCheck(cudaMemGetInfo(&free_bytes, &total_bytes));
    printf("%s: %s\n", title.c_str(), gpu_memory_plan_text(plan).c_str());
    std::string refusal = gpu_memory_refusal(plan, B, T, free_bytes, total_bytes);
    if (!refusal.empty()) {
        fprintf(stderr, "error: %s%s\n", who, refusal.c_str());
        exit(1);
    }
}

// Uploads a host model's weights; allocates everything for batches up to (B, T), once, after
// printing the memory plan; refuses (exits) when the device has less free memory than it needs.
inline void llama_cuda_init(LlamaCuda* g, const Llama* host, int B, int T, bool training, cudaStream_t stream, Shard shard = Shard{},
                            bool recompute = false) {
    const LlamaConfig& c = host->config;
    if (T > c.max_seq_len) {
        fprintf(stderr, "error: sequence length %d exceeds the model's max_seq_len %d\n", T, c.max_seq_len);
        exit(1);
    }
    flash_attention_require(head_dim(c));
    if (!training || shard.end == 0) shard = shard_of(host->num_params, 0, 1);
    recompute = recompute && training;
    shard.grads = shard.grads && shard.world > 1;
    GpuMemoryPlan plan = gpu_memory_plan(c, B, T, training, shard.world, recompute, shard.grads);
    gpu_memory_require(plan, string_format("GPU memory plan (B %d, T %d%s%s%s)", B, T, training ? ", training" : "", recompute ? ", recomputation" : "",
                                           shard.world > 1 ? string_format(", ZeRO-%d over %d ranks, per rank", shard.grads ? 2 : 1, shard.world).c_str() : ""),
                       "", B, T);
    *g = LlamaCuda{};
    g->config = c;
    g->num_params = host->num_params;
    g->B = B;
    g->T = T;
    g->stream = stream;
    size_t n = g->num_params, part = shard.end - shard.begin;
    g->shard = shard;
    g->master = cuda_alloc<float>(shard.per);  // per, as the memory plan (the last part may be shorter)
    g->params_memory = cuda_alloc<floatX>(shard.per * shard.world);
    g->params = point_parameters(c, g->params_memory);
    // the compute copy from all the weights (through a temporary), the master from this rank's part
    float* all = cuda_alloc<float>(n);
    cudaCheck(cudaMemcpy(all, host->params_memory, n * sizeof(float), cudaMemcpyHostToDevice));
    cast_to_floatX_cuda(g->params_memory, all, n, stream);
    cudaCheck(cudaMemcpyAsync(g->master, all + shard.begin, part * sizeof(float), cudaMemcpyDeviceToDevice, stream));
    cudaCheck(cudaStreamSynchronize(stream));
    cudaCheck(cudaFree(all));
    g->acts_memory = cuda_alloc<char>(point_activations(&g->acts, nullptr, c, B, T, true, recompute));
    point_activations(&g->acts, g->acts_memory, c, B, T, true, recompute);
    g->tokens = cuda_alloc<int>((size_t)B * T);
    g->score_idx = cuda_alloc<int>(B);
    g->mask = cuda_alloc<uint8_t>((size_t)B * T);  // a reference model's sequence sums need no training
    g->seq_sums = cuda_alloc<float>(B);
    g->rope_table = rope_table_cuda(T, c);
    cudaCheck(cudaEventCreateWithFlags(&g->queued, cudaEventDisableTiming));
    upload_init(&g->up.tokens, (size_t)B * T * sizeof(int));
    upload_init(&g->up.score_idx, B * sizeof(int));
    upload_init(&g->up.mask, (size_t)B * T);
    if (training) {
        g->grads_memory = cuda_alloc<float>(llama_cuda_grads_count(g));
        if (shard.grads) {  // the embedding, final norm and head (tied: none of its own), then the two layer buckets
            size_t sizes[NUM_PARAM_TENSORS], layer = layer_param_count(c);
            param_sizes(c, sizes);
            g->grads = ParamTensorsT<float>{};
            g->grads.wte = g->grads_memory;
            g->grads.final_norm = g->grads.wte + sizes[PARAM_WTE];
            g->grads.head = sizes[PARAM_HEAD] ? g->grads.final_norm + sizes[PARAM_FINAL_NORM] : g->grads.wte;
            g->buckets[0] = g->grads.final_norm + sizes[PARAM_FINAL_NORM] + sizes[PARAM_HEAD];
            g->buckets[1] = g->buckets[0] + layer;
            g->grad_shard = cuda_alloc<float>(shard.per);
            for (cudaEvent_t& e : g->bucket_free) cudaCheck(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        } else {
            g->grads = point_parameters(c, g->grads_memory);
        }
        g->m_memory = cuda_alloc<float>(shard.per);
        g->v_memory = cuda_alloc<float>(shard.per);
        cudaCheck(cudaMemsetAsync(g->grads_memory, 0, llama_cuda_grads_count(g) * sizeof(float), stream));
        cudaCheck(cudaMemsetAsync(g->m_memory, 0, part * sizeof(float), stream));
        cudaCheck(cudaMemsetAsync(g->v_memory, 0, part * sizeof(float), stream));
        g->grad_acts_memory = cuda_alloc<char>(point_grad_activations(&g->grad_acts, nullptr, c, B, T, true));
        point_grad_activations(&g->grad_acts, g->grad_acts_memory, c, B, T, true);
        g->dlp = cuda_alloc<float>((size_t)B * T);
        g->dscores = cuda_alloc<float>(B);
        g->dsums = cuda_alloc<float>(B);
        g->norm_partials = cuda_alloc<float>(GRAD_NORM_BLOCKS);
        g->norm_coef = cuda_alloc<float>(2);
        g->attn_delta = cuda_alloc<float>((size_t)B * c.n_heads * T);
        g->token_buckets = cuda_alloc<int>(3 * (size_t)B * T + 1);
        g->norm_weight_partials = cuda_alloc<float>(rmsnorm_backward_blocks((size_t)B * T) * c.dim);
        g->host_token_buckets.assign(3 * (size_t)B * T + 1, 0);
        upload_init(&g->up.token_buckets, (3 * (size_t)B * T + 1) * sizeof(int));
        upload_init(&g->up.dlp, (size_t)B * T * sizeof(float));
        upload_init(&g->up.dscores, B * sizeof(float));
        upload_init(&g->up.dsums, B * sizeof(float));
    }
    cudaCheck(cudaStreamSynchronize(stream));
}

inline void llama_cuda_free(LlamaCuda* g) {
    for (cudaEvent_t e : g->bucket_free) if (e) cudaCheck(cudaEventDestroy(e));
    void* buffers[] = {g->master, g->params_memory, g->grads_memory, g->grad_shard, g->m_memory, g->v_memory, g->acts_memory,
                       g->grad_acts_memory, g->attn_delta, g->tokens, g->score_idx, g->dlp, g->dscores, g->norm_partials, g->norm_coef,
                       g->token_buckets, g->norm_weight_partials, g->mask, g->seq_sums, g->dsums, g->rope_table};
    for (void* p : buffers) if (p) cudaCheck(cudaFree(p));
    for (Upload* u : {&g->up.tokens, &g->up.token_buckets, &g->up.score_idx, &g->up.mask, &g->up.dlp, &g->up.dscores, &g->up.dsums}) upload_free(u);
    if (g->queued) cudaCheck(cudaEventDestroy(g->queued));
    *g = LlamaCuda{};
}

// The forward ops of both GPU op sets, the model graph's (CudaOps) and the KV cache's
// (InferCudaOps): the kernels and cuBLAS on one stream, floatX weights and activations.
struct CudaForwardOps {
    using X = floatX;
    cudaStream_t stream;
    void embedding_forward(floatX* out, const int* tokens, const floatX* wte, size_t N, size_t C) {
        embedding_forward_cuda(out, tokens, wte, N, C, stream);
    }
    void rmsnorm_forward(floatX* out, float* rstd, const floatX* inp, const floatX* weight, size_t N, size_t C, double eps) {
        rmsnorm_forward_cuda(out, rstd, inp, weight, N, (int)C, eps, stream);
    }
    void fused_residual_rmsnorm_forward(floatX* residual, floatX* out, float* rstd, const floatX* a, const floatX* b, const floatX* weight,
                                        size_t N, size_t C, double eps) {
        fused_residual_rmsnorm_forward_cuda(residual, out, rstd, a, b, weight, N, (int)C, eps, stream);
    }
    void matmul_forward(floatX* out, const floatX* inp, const floatX* weight, size_t N, size_t C, size_t OC) {
        matmul_forward_cuda(out, inp, weight, N, C, OC, stream);
    }
    void matmul_forward_pair(floatX* out_a, floatX* out_b, const floatX* inp, const floatX* w_a, const floatX* w_b, size_t N, size_t C, size_t OC) {
        matmul_forward_pair_cuda(out_a, out_b, inp, w_a, w_b, N, C, OC, stream);
    }
    void matmul_forward_qkv(floatX* q, floatX* k, floatX* v, const floatX* inp, const floatX* wq, const floatX* wk, const floatX* wv, size_t N,
                            size_t C, size_t KVD) {
        matmul_forward_qkv_cuda(q, k, v, inp, wq, wk, wv, N, C, KVD, stream);
    }
    void swiglu_forward(floatX* out, const floatX* gate, const floatX* up, size_t n) { swiglu_forward_cuda(out, gate, up, n, stream); }
    void residual_forward(floatX* out, const floatX* a, const floatX* b, size_t n) { residual_forward_cuda(out, a, b, n, stream); }
};

// The GPU's op set for the model graph (llama_graph_forward/_backward): the forward ops on the
// model's stream, and the rest with FP32 parameter gradients; the RoPE table, the attention's and
// the RMSNorm backward's scratch and the embedding's token buckets are the model's.
struct CudaOps : CudaForwardOps {
    LlamaCuda* g;
    // ZeRO-2: layer l's gradients go to bucket l % 2, once the reduce that read it last has
    // zeroed it (bucket_free); else to the gradients' slices of layer l
    LayerTensorsT<float> layer_grads(ParamTensorsT<float>& grads, const LlamaConfig& c, size_t l) {
        if (!g->shard.grads) return layer_tensors(grads, c, l);
        cudaCheck(cudaStreamWaitEvent(stream, g->bucket_free[l % 2], 0));
        return layer_bucket_tensors(c, g->buckets[l % 2]);
    }
    void layer_grads_done(size_t l) {
        if (g->layer_grads_ready) g->layer_grads_ready(g, l, g->layer_grads_ctx);
    }
    void embedding_backward(float* dwte, const floatX* dout, const int* tokens, size_t N, size_t C) {
        (void)tokens;  // bucketed by the forward (embedding_buckets)
        embedding_backward_cuda(dwte, dout, g->token_buckets, g->n_token_buckets, N, C, stream);
    }
    void rmsnorm_recompute(floatX* out, const floatX* inp, const floatX* weight, const float* rstd, size_t N, size_t C) {
        rmsnorm_recompute_cuda(out, inp, weight, rstd, N, (int)C, stream);
    }
    void rmsnorm_backward(floatX* dinp, float* dweight, const floatX* dout, const floatX* inp, const floatX* weight, const float* rstd, size_t N,
                          size_t C) {
        rmsnorm_backward_cuda(dinp, dweight, g->norm_weight_partials, dout, inp, weight, rstd, N, (int)C, stream);
    }
    void matmul_backward(floatX* dinp, float* dweight, const floatX* dout, const floatX* inp, const floatX* weight, size_t N, size_t C, size_t OC) {
        matmul_backward_cuda(dinp, dweight, dout, inp, weight, N, C, OC, stream);
    }
    void matmul_backward_pair(floatX* dinp, float* dw_a, float* dw_b, const floatX* dout_a, const floatX* dout_b, const floatX* inp,
                              const floatX* w_a, const floatX* w_b, size_t N, size_t C, size_t OC) {
        matmul_backward_pair_cuda(dinp, dw_a, dw_b, dout_a, dout_b, inp, w_a, w_b, N, C, OC, stream);
    }
    void matmul_backward_qkv(floatX* dinp, float* dwq, float* dwk, float* dwv, const floatX* dq, const floatX* dk, const floatX* dv,
                             const floatX* inp, const floatX* wq, const floatX* wk, const floatX* wv, size_t N, size_t C, size_t KVD) {
        matmul_backward_qkv_cuda(dinp, dwq, dwk, dwv, dq, dk, dv, inp, wq, wk, wv, N, C, KVD, stream);
    }
    void rope_forward(floatX* x, size_t B, size_t T, size_t NH, size_t hd) { rope_forward_cuda(x, g->rope_table, B, (int)T, (int)NH, (int)hd, stream); }
    void rope_backward(floatX* dx, size_t B, size_t T, size_t NH, size_t hd) {
        rope_backward_cuda(dx, g->rope_table, B, (int)T, (int)NH, (int)hd, stream);
    }
    void attention_forward(ActTensorsT<floatX>& a, size_t l, floatX* out, const floatX* q, const floatX* k, const floatX* v, size_t B, size_t T,
                           size_t H, size_t KV, size_t hd) {
        flash_attention_forward_cuda(out, a.lse + l * B * H * T, q, k, v, B, (int)T, (int)H, (int)KV, (int)hd, stream);
    }
    void attention_backward(ActTensorsT<floatX>& a, size_t l, floatX* dq, floatX* dk, floatX* dv, const floatX* dout, const floatX* out,
                            const floatX* q, const floatX* k, const floatX* v, size_t B, size_t T, size_t H, size_t KV, size_t hd) {
        flash_attention_backward_cuda(dq, dk, dv, g->attn_delta, dout, out, a.lse + l * B * H * T, q, k, v, B, (int)T, (int)H, (int)KV, (int)hd,
                                      stream);
    }
    void swiglu_backward(floatX* dgate, floatX* dup, const floatX* dout, const floatX* gate, const floatX* up, size_t n) {
        swiglu_backward_cuda(dgate, dup, dout, gate, up, n, stream);
    }
    void zero(floatX* x, size_t n) { cudaCheck(cudaMemsetAsync(x, 0, n * sizeof(floatX), stream)); }
};

// tokens (B, T) on the host -> the activations on the device (llama_graph_forward); when
// training, the tokens' buckets for the embedding backward too
inline void llama_cuda_forward_trunk(LlamaCuda* g, const int* tokens, int B, int T) {
    NVTX_RANGE_FN();
    const LlamaConfig& c = g->config;
    if (B > g->B || T > g->T) {
        fprintf(stderr, "error: batch (%d, %d) exceeds the allocated (%d, %d)\n", B, T, g->B, g->T);
        exit(1);
    }
    size_t N = (size_t)B * T;
    cudaStream_t st = g->stream;
    upload_async(&g->up.tokens, g->tokens, tokens, N * sizeof(int), st);
    if (g->token_buckets) {  // training: for the embedding backward
        g->n_token_buckets = embedding_buckets(g->host_token_buckets.data(), tokens, N, c.pad_id);
        upload_async(&g->up.token_buckets, g->token_buckets, g->host_token_buckets.data(), (3 * N + 1) * sizeof(int), st);
    }
    CudaOps o{{g->stream}, g};
    llama_graph_forward(o, c, g->params, g->acts, g->tokens, B, T);
}

// tokens (B, T) on the host -> acts.logits and acts.lp on the device with the language-model
// head, or acts.scores (B) with the reward head, at positions score_idx (B, on the host)
inline void llama_cuda_forward(LlamaCuda* g, const int* tokens, int B, int T, const int* score_idx = nullptr) {
    NVTX_RANGE_FN();
    const LlamaConfig& c = g->config;
    size_t C = c.dim, N = (size_t)B * T;
    cudaStream_t st = g->stream;
    ActTensorsT<floatX>& a = g->acts;
    llama_cuda_forward_trunk(g, tokens, B, T);
    if (c.head_type == HEAD_REWARD) {
        upload_async(&g->up.score_idx, g->score_idx, score_idx, B * sizeof(int), st);
        reward_head_forward_cuda(a.scores, a.final_in, g->params.head, g->score_idx, B, T, (int)C, st);
        return;
    }
    size_t V = c.vocab_size, Vp = padded_vocab(V);  // logits rows Vp apart
    matmul_forward_cuda(a.logits, a.final_in, g->params.head, N, C, V, st, Vp);
    logprob_forward_cuda(a.lp, a.logits, g->tokens, B, T, (int)V, Vp, st);
}

// the reward model's scores (B) of the last forward, to the host
inline void llama_cuda_scores(LlamaCuda* g, float* scores, int B) {
    cudaCheck(cudaMemcpyAsync(scores, g->acts.scores, B * sizeof(float), cudaMemcpyDeviceToHost, g->stream));
    cudaCheck(cudaStreamSynchronize(g->stream));
}

// the token log-probs (B, T) of the last forward, to the host
inline void llama_cuda_logprobs(LlamaCuda* g, float* lp, int B, int T) {
    cudaCheck(cudaMemcpyAsync(lp, g->acts.lp, (size_t)B * T * sizeof(float), cudaMemcpyDeviceToHost, g->stream));
    cudaCheck(cudaStreamSynchronize(g->stream));
}

inline void llama_cuda_zero_grad(LlamaCuda* g) {
    NVTX_RANGE_FN();
    g->clip_pending = false;  // ZeRO-2: the grad_shard is written (not added to) by the step's first reduce
    cudaCheck(cudaMemsetAsync(g->grads_memory, 0, llama_cuda_grads_count(g) * sizeof(float), g->stream));
}

// Backward of the trunk from grad_acts.norm_out = d(objective)/d(final_in) (B, T, C), which a
// head's backward writes (llama_graph_backward); accumulates into grads.
inline void llama_cuda_backward_trunk(LlamaCuda* g, int B, int T) {
    NVTX_RANGE_FN();
    CudaOps o{{g->stream}, g};
    llama_graph_backward(o, g->config, g->params, g->grads, g->acts, g->grad_acts, g->tokens, B, T);
}

// Backward of an objective of the token log-probs from g->dlp (B, T) on the device (the host's
// copy of llama_cuda_backward, or a kernel's: runner_sequence_backward); accumulates into grads.
inline void llama_cuda_backward_from_dlp(LlamaCuda* g, int B, int T) {
    NVTX_RANGE_FN();
    size_t N = (size_t)B * T, C = g->config.dim, V = g->config.vocab_size, Vp = padded_vocab(V);
    cudaStream_t st = g->stream;
    GradActTensorsT<floatX>& d = g->grad_acts;
    floatX* logits = g->acts.logits;  // (B, T, V) rows Vp apart: the forward's logits, then their gradient (in place)
    logprob_backward_cuda(logits, logits, g->tokens, g->dlp, B, T, (int)V, Vp, st);
    cudaCheck(cudaMemsetAsync(d.norm_out, 0, N * C * sizeof(floatX), st));
    matmul_backward_cuda(d.norm_out, g->grads.head, logits, g->acts.final_in, g->params.head, N, C, V, st, Vp);
    llama_cuda_backward_trunk(g, B, T);
}

// The SFT step's loss and gradient on the device (llama_nll_forward_backward): the forward, then
// fused_logprob_nll_cuda writes acts.lp and the d-logits of the masked mean NLL over `count`
// targets over acts.logits from one read of each row's max and sum, then the head's and the trunk's
// backward; accumulates into grads. The mask (B, T) goes up; down come B sums (in
// seq_sums, the sequence sums' scratch), not (B, T) log-probs. Returns sum(-lp[mask]) / count.
inline double llama_cuda_nll_forward_backward(LlamaCuda* g, const int* tokens, const uint8_t* mask, int B, int T, size_t count) {
    NVTX_RANGE_FN();
    size_t N = (size_t)B * T, C = g->config.dim, V = g->config.vocab_size, Vp = padded_vocab(V);  // logits rows Vp apart
    cudaStream_t st = g->stream;
    ActTensorsT<floatX>& a = g->acts;
    GradActTensorsT<floatX>& d = g->grad_acts;
    llama_cuda_forward_trunk(g, tokens, B, T);
    upload_async(&g->up.mask, g->mask, mask, N, st);
    matmul_forward_cuda(a.logits, a.final_in, g->params.head, N, C, V, st, Vp);
    fused_logprob_nll_cuda(a.lp, a.logits, a.logits, g->tokens, g->mask, count, B, T, (int)V, Vp, st);
    sequence_logprob_forward_cuda(g->seq_sums, a.lp, g->mask, B, T, st);
    cudaCheck(cudaMemsetAsync(d.norm_out, 0, N * C * sizeof(floatX), st));
    matmul_backward_cuda(d.norm_out, g->grads.head, a.logits, a.final_in, g->params.head, N, C, V, st, Vp);
    llama_cuda_backward_trunk(g, B, T);
    std::vector<float> sums(B);  // after the backward is queued: the device runs on while the host waits
    cudaCheck(cudaMemcpyAsync(sums.data(), g->seq_sums, B * sizeof(float), cudaMemcpyDeviceToHost, st));
    cudaCheck(cudaStreamSynchronize(st));
    double nll = 0;
    for (float x : sums) nll -= x;
    return nll / (double)std::max(count, (size_t)1);
}

// Backward of an objective of the token log-probs, dlp (B, T) on the host; accumulates into grads.
inline void llama_cuda_backward(LlamaCuda* g, const float* dlp, int B, int T) {
    NVTX_RANGE_FN();
    upload_async(&g->up.dlp, g->dlp, dlp, (size_t)B * T * sizeof(float), g->stream);
    llama_cuda_backward_from_dlp(g, B, T);
}

// Backward of an objective of the reward model's scores, dscores (B) on the host, at the
// positions of the last forward; accumulates into grads.
inline void llama_cuda_reward_backward(LlamaCuda* g, const float* dscores, int B, int T) {
    NVTX_RANGE_FN();
    size_t N = (size_t)B * T, C = g->config.dim;
    cudaStream_t st = g->stream;
    GradActTensorsT<floatX>& d = g->grad_acts;
    upload_async(&g->up.dscores, g->dscores, dscores, B * sizeof(float), st);
    cudaCheck(cudaMemsetAsync(d.norm_out, 0, N * C * sizeof(floatX), st));
    reward_head_backward_cuda(d.norm_out, g->grads.head, g->dscores, g->acts.final_in, g->params.head, g->score_idx, B, T, (int)C, st);
    llama_cuda_backward_trunk(g, B, T);
}

// the norm and clip coefficient on the device; returns the norm before clipping (one small
// copy to the host). The gradients stay as they are: the next llama_cuda_update clips them as
// AdamW reads them (no pass over the gradients of its own).
// ZeRO-2: over this rank's part (grad_shard), with sum_ranks adding the other ranks' sums.
inline float llama_cuda_clip_grad_norm(LlamaCuda* g, float max_norm, const std::function<void(float* partials, int n)>& sum_ranks = nullptr) {
    NVTX_RANGE_FN();
    if (g->shard.grads) {
        grad_norm_coef_cuda(g->grad_shard, g->shard.end - g->shard.begin, max_norm, g->norm_partials, g->norm_coef, g->stream, sum_ranks);
    } else {
        grad_norm_coef_cuda(g->grads_memory, g->num_params, max_norm, g->norm_partials, g->norm_coef, g->stream);
    }
    g->clip_pending = true;
    float norm_coef[2];
    cudaCheck(cudaMemcpyAsync(norm_coef, g->norm_coef, sizeof(norm_coef), cudaMemcpyDeviceToHost, g->stream));
    cudaCheck(cudaStreamSynchronize(g->stream));
    return norm_coef[0];
}

inline void llama_cuda_update(LlamaCuda* g, const AdamWConfig& opt) {
    NVTX_RANGE_FN();
    g->adam_step += 1;
    size_t sizes[NUM_PARAM_TENSORS], offset = 0, lo, hi, b = g->shard.begin;
    param_sizes(g->config, sizes);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        float wd = param_is_decayed(i) ? opt.weight_decay : 0.0f;
        // the tensor's part in this rank's shard (a tied head has none: an empty grid is an invalid launch)
        if (shard_overlap(g->shard, offset, sizes[i], &lo, &hi)) {
            const float* grads = g->shard.grads ? g->grad_shard + (lo - b) : g->grads_memory + lo;
            adamw_update_cuda(g->master + (lo - b), g->params_memory + lo, grads, g->m_memory + (lo - b), g->v_memory + (lo - b),
                              hi - lo, opt, wd, g->adam_step, g->stream, g->clip_pending ? g->norm_coef + 1 : nullptr);
        }
        offset += sizes[i];
    }
    g->clip_pending = false;
}

// The weights back into a host model of the same config: the FP32 master weights. With ZeRO-1
// a rank holds the master of its own part only: the other parts come from the compute copy
// (what the forward reads, so the same model for evaluating and sampling) until the ranks
// all-gather their parts of the host copies (trainer_gather_weights, before saving).
inline void llama_cuda_download(LlamaCuda* g, Llama* host) {
    size_t n = g->num_params, part = g->shard.end - g->shard.begin;
    if (g->shard.world > 1) {
        std::vector<floatX> compute(n);
        cudaCheck(cudaMemcpyAsync(compute.data(), g->params_memory, n * sizeof(floatX), cudaMemcpyDeviceToHost, g->stream));
        cudaCheck(cudaStreamSynchronize(g->stream));
        for (size_t i = 0; i < n; i++) host->params_memory[i] = to_float(compute[i]);
    }
    cudaCheck(cudaMemcpyAsync(host->params_memory + g->shard.begin, g->master, part * sizeof(float), cudaMemcpyDeviceToHost, g->stream));
    cudaCheck(cudaStreamSynchronize(g->stream));
}
#endif

// ----------------------------------------------------------------------------
// Running a model: one API over the CPU reference and the GPU, so that each stage program
// reads the same on both builds. The host Llama holds the config and, on the CPU build,
// everything; on the GPU build the device holds the state and the host receives the
// weights and AdamW moments when a checkpoint asks for them.

struct Runner {
    Llama host;
    std::vector<int> score_idx;  // (B) reward head: the scored position of each sequence
    std::vector<float> seq_sums; // (B) the last runner_sequence_logprobs's sums, on the host
    int seq_B = 0, seq_T = 0;    // its shape, which runner_sequence_backward must repeat
#ifdef XWIN_CUDA
    LlamaCuda gpu;
    std::vector<float> lp;       // (B, T) the last forward's token log-probs, on the host
    std::vector<float> scores;   // (B) the last forward's reward scores, on the host
#else
    std::vector<uint8_t> seq_mask;  // (B, T) the last runner_sequence_logprobs's mask, for the backward
    std::vector<float> seq_dlp;     // (B, T) training: d(objective)/d(lp) that the backward builds
#endif
};

// What a caller asks of a model (its Runner's or its inference runner's) must be what its head computes.
inline void require_head(const LlamaConfig& c, int head_type, const char* what) {
    if (c.head_type != head_type) {
        fprintf(stderr, "error: %s needs a %s model, this one has a %s head\n", what, head_type == HEAD_LM ? "language" : "reward",
                c.head_type == HEAD_LM ? "language-model" : "reward");
        exit(1);
    }
}

inline const char* runner_device() {
#if defined(XWIN_CUDA) && defined(ENABLE_FP32)
    return "cuda fp32";
#elif defined(XWIN_CUDA)
    return "cuda bf16";
#else
    return "cpu";
#endif
}

// host must hold a loaded model; allocates for batches up to (B, T), once. shard: the
// parameters whose optimizer state this rank keeps (ZeRO-1, trainer_shard), all by default;
// recompute: activation recomputation (-r 1), the RMSNorm outputs and SwiGLU product of one
// layer kept, each layer's recomputed in the backward.
inline void runner_init(Runner* r, int B, int T, bool training, Shard shard = Shard{}, bool recompute = false) {
    r->score_idx.assign(B, 0);
    r->seq_sums.assign(B, 0.0f);
    if (shard.end == 0) shard = shard_of(r->host.num_params, 0, 1);
    shard.grads = shard.grads && shard.world > 1 && training;
#ifdef XWIN_CUDA
    llama_cuda_init(&r->gpu, &r->host, B, T, training, 0, shard, recompute);
    r->lp.resize((size_t)B * T);
    r->scores.resize(B);
#else
    r->host.shard = shard;
    llama_alloc(&r->host, B, T, training, recompute);
    r->seq_mask.assign((size_t)B * T, 0);
    r->seq_dlp.assign(training ? (size_t)B * T : 0, 0.0f);
#endif
}

// tokens (B, T) -> token log-probs (B, T) on the host (see logprob_forward)
inline const float* runner_forward(Runner* r, const int* tokens, int B, int T) {
    require_head(r->host.config, HEAD_LM, "token log-probs");
#ifdef XWIN_CUDA
    llama_cuda_forward(&r->gpu, tokens, B, T);
    llama_cuda_logprobs(&r->gpu, r->lp.data(), B, T);
    return r->lp.data();
#else
    llama_forward(&r->host, tokens, B, T);
    return r->host.acts.lp;
#endif
}

// the logits of the last forward at row (b, t) into out (V), for sampling (on the GPU a backward
// overwrites them with their gradient)
inline void runner_logits_row(Runner* r, int b, int t, int T, float* out) {
    require_head(r->host.config, HEAD_LM, "logits");
    size_t V = r->host.config.vocab_size, offset = ((size_t)b * T + t) * V;
#ifdef XWIN_CUDA
    offset = ((size_t)b * T + t) * padded_vocab(V);  // the GPU's rows are padded
    std::vector<floatX> raw(V);
    cudaCheck(cudaMemcpy(raw.data(), r->gpu.acts.logits + offset, V * sizeof(floatX), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < V; i++) out[i] = to_float(raw[i]);
#else
    memcpy(out, r->host.acts.logits + offset, V * sizeof(float));
#endif
}

// tokens (B, T) -> a reward model's scores (B) on the host; sequence b is scored at its last
// token that is not the model's pad id (reward_score_index: transformers' rule), so rows
// shorter than T are padded with it
inline const float* runner_score(Runner* r, const int* tokens, int B, int T) {
    require_head(r->host.config, HEAD_REWARD, "scores");
    if (B > 1 && r->host.config.pad_id < 0) {
        fprintf(stderr, "error: the reward model has no pad_token_id, so it cannot score a batch of more than one sequence (as transformers)\n");
        exit(1);
    }
    reward_score_index(r->score_idx.data(), tokens, B, T, r->host.config.pad_id);
#ifdef XWIN_CUDA
    llama_cuda_forward(&r->gpu, tokens, B, T, r->score_idx.data());
    llama_cuda_scores(&r->gpu, r->scores.data(), B);
    return r->scores.data();
#else
    llama_forward(&r->host, tokens, B, T, r->score_idx.data());
    return r->host.acts.scores;
#endif
}

// accumulates the gradient of an objective whose derivative by the last runner_score's
// scores is dscores (B)
inline void runner_score_backward(Runner* r, const int* tokens, const float* dscores, int B, int T) {
#ifdef XWIN_CUDA
    (void)tokens;  // the device kept them from the forward
    llama_cuda_reward_backward(&r->gpu, dscores, B, T);
#else
    llama_reward_backward(&r->host, tokens, dscores, r->score_idx.data(), B, T);
#endif
}

inline void runner_zero_grad(Runner* r) {
#ifdef XWIN_CUDA
    llama_cuda_zero_grad(&r->gpu);
#else
    llama_zero_grad(&r->host);
#endif
}

// accumulates the gradient of an objective whose derivative by the log-probs is dlp (B, T)
inline void runner_backward(Runner* r, const int* tokens, const float* dlp, int B, int T) {
#ifdef XWIN_CUDA
    (void)tokens;  // the device kept them from the forward
    llama_cuda_backward(&r->gpu, dlp, B, T);
#else
    llama_backward(&r->host, tokens, dlp, B, T);
#endif
}

// The SFT step's loss and gradient for tokens and mask (B, T): the masked mean NLL over the
// step's `count` targets (its share from this batch is returned, sum(-lp[mask]) / count) and its
// gradient accumulated, the log-probs and the d-logits from one pass over the logits
// (llama_nll_forward_backward; on the GPU nothing of (B, T) comes to the host)
inline double runner_nll_forward_backward(Runner* r, const int* tokens, const uint8_t* mask, int B, int T, size_t count) {
    require_head(r->host.config, HEAD_LM, "the token loss");
#ifdef XWIN_CUDA
    return llama_cuda_nll_forward_backward(&r->gpu, tokens, mask, B, T, count);
#else
    return llama_nll_forward_backward(&r->host, tokens, mask, B, T, count);
#endif
}

inline float runner_clip_grad_norm(Runner* r, float max_norm) {
#ifdef XWIN_CUDA
    return llama_cuda_clip_grad_norm(&r->gpu, max_norm);
#else
    return clip_grad_norm(r->host.grads_memory, r->host.num_params, max_norm);
#endif
}

inline void runner_update(Runner* r, const AdamWConfig& opt) {
#ifdef XWIN_CUDA
    llama_cuda_update(&r->gpu, opt);
#else
    llama_update(&r->host, opt);
#endif
}

// waits for every kernel queued so far (on the GPU: an event after the last one); nothing to
// wait for on the CPU
inline void runner_synchronize(Runner* r) {
#ifdef XWIN_CUDA
    cudaCheck(cudaEventRecord(r->gpu.queued, r->gpu.stream));
    cudaCheck(cudaEventSynchronize(r->gpu.queued));
#else
    (void)r;
#endif
}

// the weights into r->host.params_memory (before saving)
inline void runner_download_params(Runner* r) {
#ifdef XWIN_CUDA
    llama_cuda_download(&r->gpu, &r->host);
#else
    (void)r;
#endif
}

// the parameters whose optimizer state this runner keeps
inline const Shard& runner_shard(const Runner* r) {
#ifdef XWIN_CUDA
    return r->gpu.shard;
#else
    return r->host.shard;
#endif
}

// the AdamW moments and step count, out of and into the runner: m and v hold the moments of
// the runner's shard [begin, end), end - begin values each (all num_params without ZeRO), so
// that a rank never holds more of the optimizer state than its own part
inline void runner_get_optimizer(Runner* r, float* m, float* v, int* adam_step) {
    const Shard& sh = runner_shard(r);
    size_t bytes = (sh.end - sh.begin) * sizeof(float);
#ifdef XWIN_CUDA
    cudaCheck(cudaMemcpy(m, r->gpu.m_memory, bytes, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(v, r->gpu.v_memory, bytes, cudaMemcpyDeviceToHost));
    *adam_step = r->gpu.adam_step;
#else
    memcpy(m, r->host.m_memory, bytes);
    memcpy(v, r->host.v_memory, bytes);
    *adam_step = r->host.adam_step;
#endif
}

inline void runner_set_optimizer(Runner* r, const float* m, const float* v, int adam_step) {
    const Shard& sh = runner_shard(r);
    size_t bytes = (sh.end - sh.begin) * sizeof(float);
#ifdef XWIN_CUDA
    cudaCheck(cudaMemcpy(r->gpu.m_memory, m, bytes, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(r->gpu.v_memory, v, bytes, cudaMemcpyHostToDevice));
    r->gpu.adam_step = adam_step;
#else
    memcpy(r->host.m_memory, m, bytes);
    memcpy(r->host.v_memory, v, bytes);
    r->host.adam_step = adam_step;
#endif
}

inline void runner_free(Runner* r) {
#ifdef XWIN_CUDA
    llama_cuda_free(&r->gpu);
#endif
    llama_free(&r->host);
}

// ----------------------------------------------------------------------------
// Inference with a KV cache: llama_forward cut into a prefill of the prompts and a decode of
// one token per sequence at a time. Per layer, the keys and values of every position so far
// (the n_kv heads, after RoPE) are cached, so a new token costs one row of each matmul and
// one query row per head against the cache. Nothing for training is allocated: no gradients,
// no AdamW moments, no FP32 master copy on the GPU, and the activations of one layer only (of
// the new tokens), which every layer reuses. Each sequence of the batch has its own position.
//   infer_prefill(inf, tokens (B, Tn), lens (B) or null)  empties the cache, then runs the
//       prompts, right-padded to Tn: sequence b's prompt is its first lens[b] tokens (all Tn
//       when lens is null). Padding is computed but never attended to (a query at position p
//       sees positions 0..p, and the decode overwrites the cache from lens[b] on). Returns the
//       logits (B, V) at each prompt's last token.
//   infer_decode(inf, next (B))  one more token per sequence, at its position pos[b];
//       returns the logits (B, V) there.
// The same four ops as the training forward, plus kv_cache_write, rope_forward_at and
// attention_cached_forward (on the GPU attention_decode_cuda, split across blocks).
// Frozen models score on it too, with nothing of training allocated:
//   infer_sequence_logprobs(inf, tokens (B, T), mask (B, T))  a prefill of whole sequences,
//       then the head one sequence at a time: the masked sums of the token log-probs (B), as
//       runner_sequence_logprobs (the Xwin-Set's policy log-probs).
//   a reward model's infer_prefill gives its scores (B) at each sequence's last token
//       (infer_runner_score: the reward head of the training forward at reward_score_index).

template <typename X>  // float on the CPU, floatX on the GPU
struct InferStateT {
    X* k_cache;        // (L, B, maxT, KVD) keys after RoPE
    X* v_cache;        // (L, B, maxT, KVD)
    X* x;              // (B, Tc, C)   the residual stream of the new tokens
    X* norm;           // (B, Tc, C)   rmsnorm(x) * weight, the input of the attention, then of the MLP
    float* rstd;       // (B, Tc)
    X* q;              // (B, Tc, C)   after RoPE
    X* k;              // (B, Tc, KVD) after RoPE, on its way to the cache
    X* v;              // (B, Tc, KVD)
    X* att_out;        // (B, Tc, C)
    X* scratch;        // (B, Tc, C)   a projection's output before the residual add
    X* gate;           // (B, Tc, F)   h @ w_gate^T, then silu(gate) * up in place
    X* up;             // (B, Tc, F)
    X* last;           // (B, C)       the residual row of each sequence's last new token
    X* last_norm;      // (B, C)
    float* last_rstd;  // (B)
    X* logits;         // (max(B, Tc), V) LM head: the logits of each sequence's last new token, or of every
                       //                 token of one sequence (infer_sequence_logprobs); on the GPU rows
                       //                 padded_vocab(V) apart
    float* scores;     // (B)          reward head: the score of each sequence's last new token
    float* lp;         // (B, Tc)      infer_sequence_logprobs: the token log-probs (logprob_forward)
    float* sums;       // (B)          and their masked sums
    uint8_t* mask;     // (B, Tc)      its mask
    int* zeros;        // (B)          0: the row of last_norm that reward_head_forward scores (Tn = 1)
    int* tokens;       // (B, Tc)      the new tokens
    int* pos;          // (B)          each sequence's position before the new tokens
    int* tok_pos;      // (B, Tc)      the position of each new token: pos[b] + t
    int* last_row;     // (B)          row b * Tn + lens[b] - 1 of the new tokens
};

// Carves the state for B sequences of up to maxT tokens, up to Tc new tokens per sequence and call;
// padded: the GPU's layout, a language model's logits rows padded_vocab(V) apart.
template <typename X>
size_t point_infer_state(InferStateT<X>* s, void* memory, const LlamaConfig& c, size_t B, size_t maxT, size_t Tc, bool padded = false) {
    size_t C = c.dim, L = c.n_layers, F = c.ffn_dim, KVD = kv_dim(c), N = B * Tc;
    size_t V = c.head_type == HEAD_LM && padded ? padded_vocab(c.vocab_size) : head_rows(c);
    Carver k{(char*)memory};
    k.take(s->k_cache, L * B * maxT * KVD); k.take(s->v_cache, L * B * maxT * KVD);
    k.take(s->x, N * C); k.take(s->norm, N * C); k.take(s->rstd, N); k.take(s->q, N * C); k.take(s->k, N * KVD);
    k.take(s->v, N * KVD); k.take(s->att_out, N * C); k.take(s->scratch, N * C); k.take(s->gate, N * F); k.take(s->up, N * F);
    k.take(s->last, B * C); k.take(s->last_norm, B * C); k.take(s->last_rstd, B); k.take(s->logits, std::max(B, Tc) * V);
    k.take(s->scores, B); k.take(s->lp, N); k.take(s->sums, B); k.take(s->mask, N); k.take(s->zeros, B);
    k.take(s->tokens, N); k.take(s->pos, B); k.take(s->tok_pos, N); k.take(s->last_row, B);
    return k.bytes;
}

// The checks of both builds; fills the host's positions of the new tokens and the rows of the
// last ones, then advances pos. tokens (B, Tn); lens (B) or null (every sequence takes Tn).
inline void infer_plan(std::vector<int>& pos, std::vector<int>& tok_pos, std::vector<int>& last_row, const int* lens, int B, int Tn,
                       int max_T, int max_chunk) {
    if (Tn < 1 || Tn > max_chunk) {
        fprintf(stderr, "error: %d new tokens per sequence; this inference state takes 1..%d per call\n", Tn, max_chunk);
        exit(1);
    }
    tok_pos.resize((size_t)B * Tn);
    last_row.resize(B);
    for (int b = 0; b < B; b++) {
        int len = lens ? lens[b] : Tn;
        if (len < 1 || len > Tn || pos[b] + Tn > max_T) {
            fprintf(stderr, "error: sequence %d: %d new tokens of %d at position %d do not fit a cache of %d positions\n", b, len, Tn, pos[b], max_T);
            exit(1);
        }
        for (int t = 0; t < Tn; t++) tok_pos[(size_t)b * Tn + t] = pos[b] + t;
        last_row[b] = b * Tn + len - 1;
    }
}

inline void infer_require(const LlamaConfig& c, int B, int max_T, int max_chunk) {
    if (B < 1 || max_T < 1 || max_T > c.max_seq_len || max_chunk < 1 || max_chunk > max_T) {
        fprintf(stderr, "error: inference needs 1 <= max_chunk (%d) <= max_T (%d) <= max_seq_len (%d), B (%d) >= 1\n",
                max_chunk, max_T, c.max_seq_len, B);
        exit(1);
    }
}

// The layers of the model graph on the new tokens of a KV cache (layer_forward, as training's),
// written once for both builds (infer_layers, infer_cuda_layers): tokens (B, Tn) -> s.x (B, Tn, C), the residual stream
// after the last layer. p holds the norms and the embedding, w the matrices as the op set's
// matmul_forward reads them (the CPU's transposed once). An op set has llama_graph_forward's
// embedding_forward, rmsnorm_forward, fused_residual_rmsnorm_forward, matmul_forward(_pair, _qkv) and
// swiglu_forward, and
//   rope_forward_at(x, N, NH, hd)           at the new tokens' positions
//   attention_cached(l, out, q, k, v, B, Tn, H, KV, hd)   k, v into layer l's cache at each
//                                           sequence's position, then out from the cache
template <typename Ops>
void infer_graph_layers(Ops& o, const LlamaConfig& c, const ParamTensorsT<typename Ops::X>& p, const ParamTensorsT<typename Ops::X>& w,
                        InferStateT<typename Ops::X>& s, const int* tokens, int B, int Tn) {
    using X = typename Ops::X;
    size_t C = c.dim, L = c.n_layers, H = c.n_heads, KV = c.n_kv_heads, hd = head_dim(c);
    size_t N = (size_t)B * Tn;
    o.embedding_forward(s.x, tokens, p.wte, N, C);
    o.rmsnorm_forward(s.norm, s.rstd, s.x, p.attn_norm, N, C, c.norm_eps);  // later layers' come fused with the residual add
    for (size_t l = 0; l < L; l++) {
        NVTX_RANGE("layer %zu inference", l);
        LayerBuffers<X> b{s.x, s.norm, s.q, s.k, s.v, s.att_out, s.scratch, s.x, s.norm, s.rstd, s.gate, s.up, s.gate,  // SwiGLU in place
                          s.x, s.norm, s.rstd, l + 1 < L ? p.attn_norm + (l + 1) * C : nullptr};  // the last: the final norm reads only the head's rows
        LayerTensorsT<X> lw = layer_tensors(w, c, l);  // the matrices as matmul_forward reads them, the norms as they are
        lw.attn_norm = p.attn_norm + l * C, lw.mlp_norm = p.mlp_norm + l * C;
        layer_forward(o, c, lw, b, N, [&](X* att_out, X* q, X* k, X* v) {
            o.rope_forward_at(q, N, H, hd);
            o.rope_forward_at(k, N, KV, hd);
            o.attention_cached(l, att_out, q, k, v, B, Tn, H, KV, hd);
        });
    }
}

struct Infer {
    const Llama* model = nullptr;  // the weights: the host model's FP32 parameters (not owned)
    std::vector<float> wt_memory;  // (num_params) its matrices transposed once for matmul_forward_transposed
    ParamTensors wt;               // (the norms and wte slots are not used; a tied head is wte^T)
    int B = 0, max_T = 0, max_chunk = 0;  // B sequences of up to max_T tokens, up to max_chunk new ones per call
    std::vector<int> pos;          // (B) the tokens in the cache of each sequence
    std::vector<int> tok_pos;      // (B, Tn) the last call's positions of the new tokens
    std::vector<int> last_row;     // (B)
    std::vector<float> rope_table; // (max_T, hd/2, 2) the cos and sin of every position of the cache (rope_table)
    size_t bytes = 0;              // all that infer_init allocated
    void* memory = nullptr;
    InferStateT<float> s;
};

inline void infer_init(Infer* inf, const Llama* model, int B, int max_T, int max_chunk) {
    infer_require(model->config, B, max_T, max_chunk);
    *inf = Infer{};
    inf->model = model;
    inf->B = B;
    inf->max_T = max_T;
    inf->max_chunk = max_chunk;
    inf->pos.assign(B, 0);
    const LlamaConfig& c = model->config;
    size_t C = c.dim, F = c.ffn_dim, KVD = kv_dim(c);
    inf->wt_memory.resize(model->num_params);
    inf->wt = point_parameters(c, inf->wt_memory.data());
    const ParamTensors& p = model->params;
    ParamTensors& t = inf->wt;
    for (size_t l = 0; l < (size_t)c.n_layers; l++) {
        matmul_transpose_weight(t.wq + l * C * C, p.wq + l * C * C, C, C);
        matmul_transpose_weight(t.wk + l * KVD * C, p.wk + l * KVD * C, C, KVD);
        matmul_transpose_weight(t.wv + l * KVD * C, p.wv + l * KVD * C, C, KVD);
        matmul_transpose_weight(t.wo + l * C * C, p.wo + l * C * C, C, C);
        matmul_transpose_weight(t.w_gate + l * F * C, p.w_gate + l * F * C, C, F);
        matmul_transpose_weight(t.w_up + l * F * C, p.w_up + l * F * C, C, F);
        matmul_transpose_weight(t.w_down + l * C * F, p.w_down + l * C * F, F, C);
    }
    if (c.head_type == HEAD_LM) matmul_transpose_weight(t.head, p.head, C, (size_t)c.vocab_size);  // the reward head is a row
    inf->bytes = point_infer_state(&inf->s, nullptr, c, B, max_T, max_chunk);
    inf->memory = malloc_check(inf->bytes);
    point_infer_state(&inf->s, inf->memory, c, B, max_T, max_chunk);
    memset(inf->s.zeros, 0, B * sizeof(int));
    inf->rope_table = rope_table(max_T, c);
    inf->bytes += inf->wt_memory.size() * sizeof(float) + inf->rope_table.size() * sizeof(float);
}

inline void infer_free(Infer* inf) {
    free(inf->memory);
    *inf = Infer{};
}

// Appends Tn tokens per sequence (lens as infer_prefill) to the cache: the layers of
// llama_forward on the new rows, attending to the cache, leave s.x (B, Tn, C), the residual
// stream after the last layer. nb > 0: only the first nb sequences take tokens (nb, Tn); the
// others keep their cache and position. Returns the number of sequences that took tokens.
// The CPU's op set for infer_graph_layers: CpuOps's ops, the matmuls on the transposed matrices,
// the positions on the host.
struct InferCpuOps : CpuOps {
    Infer* inf;
    void matmul_forward(float* out, const float* inp, const float* wt, size_t N, size_t C, size_t OC) {
        matmul_forward_transposed(out, inp, wt, N, C, OC);
    }
    void matmul_forward_pair(float* out_a, float* out_b, const float* inp, const float* wt_a, const float* wt_b, size_t N, size_t C, size_t OC) {
        matmul_forward_transposed(out_a, inp, wt_a, N, C, OC);
        matmul_forward_transposed(out_b, inp, wt_b, N, C, OC);
    }
    void matmul_forward_qkv(float* q, float* k, float* v, const float* inp, const float* wtq, const float* wtk, const float* wtv, size_t N, size_t C,
                            size_t KVD) {
        matmul_forward_transposed(q, inp, wtq, N, C, C);
        matmul_forward_pair(k, v, inp, wtk, wtv, N, C, KVD);
    }
    void rope_forward_at(float* x, size_t N, size_t NH, size_t hd) { ::rope_forward_at(x, rope_table, inf->tok_pos.data(), N, NH, (int)hd); }
    void attention_cached(size_t l, float* out, const float* q, const float* k, const float* v, size_t B, size_t Tn, size_t H, size_t KV, size_t hd) {
        size_t KVD = KV * hd, cache = (size_t)inf->B * inf->max_T * KVD;  // a layer's cache holds all inf->B sequences
        float *k_cache = inf->s.k_cache + l * cache, *v_cache = inf->s.v_cache + l * cache;
        kv_cache_write(k_cache, v_cache, k, v, inf->pos.data(), B, Tn, KVD, inf->max_T);
        attention_cached_forward(out, q, k_cache, v_cache, inf->pos.data(), B, Tn, H, KV, hd, inf->max_T);
    }
};

inline int infer_layers(Infer* inf, const int* tokens, int Tn, const int* lens, int nb) {
    int B = nb > 0 ? std::min(nb, inf->B) : inf->B;
    infer_plan(inf->pos, inf->tok_pos, inf->last_row, lens, B, Tn, inf->max_T, inf->max_chunk);
    InferCpuOps o{{inf->rope_table.data(), inf->model->config.pad_id}, inf};
    infer_graph_layers(o, inf->model->config, inf->model->params, inf->wt, inf->s, tokens, B, Tn);
    for (int b = 0; b < B; b++) inf->pos[b] += inf->last_row[b] - b * Tn + 1;
    return B;
}

// Appends Tn tokens per sequence (infer_layers) and returns the head's outputs at each
// sequence's last new token: the logits (B, V), or a reward model's scores (B).
inline const float* infer_extend(Infer* inf, const int* tokens, int Tn, const int* lens, int nb = 0) {
    const LlamaConfig& c = inf->model->config;
    int B = infer_layers(inf, tokens, Tn, lens, nb);
    size_t C = c.dim;
    InferStateT<float>& s = inf->s;
    embedding_forward(s.last, inf->last_row.data(), s.x, B, C);  // a row gather, which is what the embedding is
    rmsnorm_forward(s.last_norm, s.last_rstd, s.last, inf->model->params.final_norm, B, C, c.norm_eps);
    if (c.head_type == HEAD_REWARD) {
        reward_head_forward(s.scores, s.last_norm, inf->model->params.head, s.zeros, B, 1, C);
        return s.scores;
    }
    matmul_forward_transposed(s.logits, s.last_norm, inf->wt.head, B, C, (size_t)c.vocab_size);
    return s.logits;
}

// tokens (B, T), mask (B, T), B <= inf->B, T <= max_chunk: a prefill of whole sequences, then
// per sequence the final norm, the head and the token log-probs (logprob_forward), and their
// masked sums (B) (sequence_logprob_forward), as runner_sequence_logprobs takes them. Empties
// the cache as a prefill does; from_cache: the tokens continue what each sequence holds.
inline const float* infer_sequence_logprobs(Infer* inf, const int* tokens, const uint8_t* mask, int B, int T, bool from_cache = false) {
    const LlamaConfig& c = inf->model->config;
    require_head(c, HEAD_LM, "sequence log-probs");
    if (!from_cache) inf->pos.assign(inf->B, 0);
    B = infer_layers(inf, tokens, T, nullptr, B);
    size_t C = c.dim, V = c.vocab_size, N = (size_t)B * T;
    InferStateT<float>& s = inf->s;
    rmsnorm_forward(s.norm, s.rstd, s.x, inf->model->params.final_norm, N, C, c.norm_eps);
    for (int b = 0; b < B; b++) {  // one sequence's logits at a time: (T, V), not (B, T, V)
        matmul_forward_transposed(s.logits, s.norm + (size_t)b * T * C, inf->wt.head, T, C, V);
        logprob_forward(s.lp + (size_t)b * T, s.logits, tokens + (size_t)b * T, 1, T, V);
    }
    sequence_logprob_forward(s.sums, s.lp, mask, B, T);
    return s.sums;
}

inline const float* infer_prefill(Infer* inf, const int* tokens, int Tn, const int* lens = nullptr, int nb = 0) {
    inf->pos.assign(inf->B, 0);
    return infer_extend(inf, tokens, Tn, lens, nb);
}

inline const float* infer_decode(Infer* inf, const int* next, int nb = 0) { return infer_extend(inf, next, 1, nullptr, nb); }

#ifdef XWIN_CUDA
// The same on the GPU: only the floatX compute copy of the weights (rounded on the host, as
// cast_to_floatX_cuda rounds, so both GPU paths read the same weights), the cache and one
// layer's activations; the attention of the new tokens is attention_decode_cuda.
struct InferCuda {
    LlamaConfig config{};
    size_t num_params = 0;
    int B = 0, max_T = 0, max_chunk = 0, attn_chunk = ATTN_DECODE_CHUNK;
    floatX* params_memory = nullptr;  // (num_params) the weights, in floatX only
    ParamTensorsT<floatX> params;
    void* state_memory = nullptr;
    InferStateT<floatX> s;
    float* part_o = nullptr;          // (part_rows, hd) attention_decode_cuda's partial outputs
    float* part_ml = nullptr;         // (part_rows, 2)  and their max and sum
    float* rope_table = nullptr;      // (max_T, hd/2, 2) the cos and sin of every position of the cache (rope_table)
    size_t part_rows = 0;
    std::vector<int> pos, tok_pos, last_row;  // on the host, as Infer's
    size_t bytes = 0;                 // all device memory infer_cuda_init allocated
    struct {                          // a step's host-to-device copies, through pinned staging
        Upload tokens, pos, tok_pos, last_row, mask;
    } up;
    cudaStream_t stream = nullptr;
};

// What infer_cuda_init allocates, by kind: the floatX weights, the cache and one layer's
// activations (activations), the split attention's partials (scratch: every chunk of a decode,
// one per query row of a prefill) and the RoPE table; no master weights, gradients or moments.
inline GpuMemoryPlan infer_memory_plan(const LlamaConfig& c, int B, int max_T, int max_chunk, int attn_chunk, size_t* part_rows) {
    InferStateT<floatX> sizing;
    size_t decode_rows = (size_t)B * c.n_heads * ceil_div(max_T, attn_chunk), prefill_rows = (size_t)B * max_chunk * c.n_heads;
    *part_rows = std::max(decode_rows, prefill_rows);
    GpuMemoryPlan plan;
    plan.weights = num_parameters(c) * sizeof(floatX);
    plan.activations = point_infer_state(&sizing, nullptr, c, B, max_T, max_chunk, true);
    plan.scratch = *part_rows * (head_dim(c) + 2) * sizeof(float);
    plan.rope_table = rope_table_size(max_T, head_dim(c)) * sizeof(float);
    return plan;
}

// attn_chunk: the cache positions per block of the attention (tests make it small to split short caches)
inline void infer_cuda_init(InferCuda* g, const Llama* host, int B, int max_T, int max_chunk, cudaStream_t stream,
                            int attn_chunk = ATTN_DECODE_CHUNK) {
    const LlamaConfig& c = host->config;
    infer_require(c, B, max_T, max_chunk);
    size_t part_rows, n = host->num_params;
    GpuMemoryPlan plan = infer_memory_plan(c, B, max_T, max_chunk, attn_chunk, &part_rows);  // printed before the first allocation
    gpu_memory_require(plan, string_format("GPU inference memory plan (B %d, max_T %d, chunk %d)", B, max_T, max_chunk), "inference: ", B, max_T);
    *g = InferCuda{};
    g->config = c;
    g->num_params = host->num_params;
    g->B = B;
    g->max_T = max_T;
    g->max_chunk = max_chunk;
    g->attn_chunk = attn_chunk;
    g->stream = stream;
    g->pos.assign(B, 0);
    g->params_memory = cuda_alloc<floatX>(n);
    g->params = point_parameters(c, g->params_memory);
    std::vector<floatX> chunk(std::min(n, (size_t)1 << 22));
    for (size_t done = 0; done < n; done += chunk.size()) {
        size_t count = std::min(chunk.size(), n - done);
        for (size_t i = 0; i < count; i++) chunk[i] = from_float<floatX>(host->params_memory[done + i]);
        cudaCheck(cudaMemcpy(g->params_memory + done, chunk.data(), count * sizeof(floatX), cudaMemcpyHostToDevice));
    }
    g->state_memory = cuda_alloc<char>(plan.activations);
    point_infer_state(&g->s, g->state_memory, c, B, max_T, max_chunk, true);
    cudaCheck(cudaMemset(g->s.zeros, 0, B * sizeof(int)));
    g->part_rows = part_rows;
    g->part_o = cuda_alloc<float>(g->part_rows * head_dim(c));
    g->part_ml = cuda_alloc<float>(g->part_rows * 2);
    g->rope_table = rope_table_cuda(max_T, c);
    g->bytes = gpu_memory_plan_total(plan);
    size_t rows = (size_t)B * std::max(max_chunk, max_T);  // a prefill's or a scored sequence's tokens
    upload_init(&g->up.tokens, rows * sizeof(int));
    upload_init(&g->up.pos, B * sizeof(int));
    upload_init(&g->up.tok_pos, rows * sizeof(int));
    upload_init(&g->up.last_row, B * sizeof(int));
    upload_init(&g->up.mask, rows);
}

inline void infer_cuda_free(InferCuda* g) {
    void* buffers[] = {g->params_memory, g->state_memory, g->part_o, g->part_ml, g->rope_table};
    for (void* p : buffers) if (p) cudaCheck(cudaFree(p));
    for (Upload* u : {&g->up.tokens, &g->up.pos, &g->up.tok_pos, &g->up.last_row, &g->up.mask}) upload_free(u);
    *g = InferCuda{};
}

// The GPU's op set for infer_graph_layers: the forward ops on the state's stream, the positions
// on the device.
struct InferCudaOps : CudaForwardOps {
    InferCuda* g;
    int max_len;  // the longest sequence after the new tokens: the attention reads no cache beyond it
    void rope_forward_at(floatX* x, size_t N, size_t NH, size_t hd) { rope_forward_at_cuda(x, g->rope_table, g->s.tok_pos, N, (int)NH, (int)hd, stream); }
    void attention_cached(size_t l, floatX* out, const floatX* q, const floatX* k, const floatX* v, size_t B, size_t Tn, size_t H, size_t KV,
                          size_t hd) {
        size_t KVD = KV * hd, cache = (size_t)g->B * g->max_T * KVD;
        floatX *k_cache = g->s.k_cache + l * cache, *v_cache = g->s.v_cache + l * cache;
        kv_cache_write_cuda(k_cache, v_cache, k, v, g->s.pos, B, (int)Tn, (int)KVD, g->max_T, stream);
        if (max_len == (int)Tn && flash_attention_head_tile((int)hd) != 0) {
            // a fresh prefill (every sequence from position 0, as scoring and a prompt's first chunk
            // are): causal attention within the chunk, which the flash forward computes reading K
            // and V once per tile of query rows, where the decode kernel reads them once per row
            // and head; the row log-sum-exps go to the partials' scratch ((B, H, Tn) <= its rows)
            flash_attention_forward_cuda(out, g->part_ml, q, k, v, B, (int)Tn, (int)H, (int)KV, (int)hd, stream);
            return;
        }
        attention_decode_cuda(out, q, k_cache, v_cache, g->s.pos, B, (int)Tn, (int)H, (int)KV, (int)hd, g->max_T, max_len, g->part_o, g->part_ml,
                              g->part_rows, stream, g->attn_chunk);
    }
};

// as infer_layers; tokens (B, Tn) on the host; s.x stays on the device
inline int infer_cuda_layers(InferCuda* g, const int* tokens, int Tn, const int* lens, int nb) {
    NVTX_RANGE_FN();
    int B = nb > 0 ? std::min(nb, g->B) : g->B;
    infer_plan(g->pos, g->tok_pos, g->last_row, lens, B, Tn, g->max_T, g->max_chunk);
    size_t N = (size_t)B * Tn;
    int max_len = 0;
    for (int b = 0; b < B; b++) max_len = std::max(max_len, g->pos[b] + Tn);
    cudaStream_t st = g->stream;
    InferStateT<floatX>& s = g->s;
    upload_async(&g->up.tokens, s.tokens, tokens, N * sizeof(int), st);
    upload_async(&g->up.pos, s.pos, g->pos.data(), B * sizeof(int), st);
    upload_async(&g->up.tok_pos, s.tok_pos, g->tok_pos.data(), N * sizeof(int), st);
    upload_async(&g->up.last_row, s.last_row, g->last_row.data(), B * sizeof(int), st);
    InferCudaOps o{{g->stream}, g, max_len};
    infer_graph_layers(o, g->config, g->params, g->params, s, s.tokens, B, Tn);
    for (int b = 0; b < B; b++) g->pos[b] += g->last_row[b] - b * Tn + 1;
    return B;
}

// as infer_extend; the head's outputs stay on the device: the logits (B, V) in s.logits, or
// a reward model's scores (B) in s.scores
inline void infer_cuda_extend(InferCuda* g, const int* tokens, int Tn, const int* lens, int nb = 0) {
    const LlamaConfig& c = g->config;
    int B = infer_cuda_layers(g, tokens, Tn, lens, nb);
    size_t C = c.dim;
    cudaStream_t st = g->stream;
    InferStateT<floatX>& s = g->s;
    embedding_forward_cuda(s.last, s.last_row, s.x, B, C, st);  // a row gather, which is what the embedding is
    rmsnorm_forward_cuda(s.last_norm, s.last_rstd, s.last, g->params.final_norm, B, (int)C, c.norm_eps, st);
    if (c.head_type == HEAD_REWARD) reward_head_forward_cuda(s.scores, s.last_norm, g->params.head, s.zeros, B, 1, (int)C, st);
    else matmul_forward_cuda(s.logits, s.last_norm, g->params.head, B, C, (size_t)c.vocab_size, st, padded_vocab(c.vocab_size));
}

// as infer_sequence_logprobs; tokens and mask (B, T) on the host; the B sums come down into sums
inline void infer_cuda_sequence_logprobs(InferCuda* g, const int* tokens, const uint8_t* mask, int B, int T, float* sums, bool from_cache = false) {
    NVTX_RANGE_FN();
    const LlamaConfig& c = g->config;
    require_head(c, HEAD_LM, "sequence log-probs");
    if (!from_cache) g->pos.assign(g->B, 0);
    B = infer_cuda_layers(g, tokens, T, nullptr, B);
    size_t C = c.dim, V = c.vocab_size, N = (size_t)B * T;
    cudaStream_t st = g->stream;
    InferStateT<floatX>& s = g->s;
    upload_async(&g->up.mask, s.mask, mask, N, st);
    rmsnorm_forward_cuda(s.norm, s.rstd, s.x, g->params.final_norm, N, (int)C, c.norm_eps, st);
    for (int b = 0; b < B; b++) {  // one sequence's logits at a time: (T, V), not (B, T, V)
        matmul_forward_cuda(s.logits, s.norm + (size_t)b * T * C, g->params.head, T, C, V, st, padded_vocab(V));
        logprob_forward_cuda(s.lp + (size_t)b * T, s.logits, s.tokens + (size_t)b * T, 1, T, (int)V, padded_vocab(V), st);
    }
    sequence_logprob_forward_cuda(s.sums, s.lp, s.mask, B, T, st);
    cudaCheck(cudaMemcpyAsync(sums, s.sums, B * sizeof(float), cudaMemcpyDeviceToHost, st));
    cudaCheck(cudaStreamSynchronize(st));
}

inline void infer_cuda_prefill(InferCuda* g, const int* tokens, int Tn, const int* lens = nullptr, int nb = 0) {
    g->pos.assign(g->B, 0);
    infer_cuda_extend(g, tokens, Tn, lens, nb);
}

inline void infer_cuda_decode(InferCuda* g, const int* next, int nb = 0) { infer_cuda_extend(g, next, 1, nullptr, nb); }

// the logits (B, V) of the last call, to the host (a language model)
inline void infer_cuda_logits(InferCuda* g, float* out) {
    size_t V = g->config.vocab_size, Vp = padded_vocab(V);  // the device's rows are Vp apart
    std::vector<floatX> raw((size_t)g->B * Vp);
    cudaCheck(cudaMemcpyAsync(raw.data(), g->s.logits, raw.size() * sizeof(floatX), cudaMemcpyDeviceToHost, g->stream));
    cudaCheck(cudaStreamSynchronize(g->stream));
    for (size_t b = 0; b < (size_t)g->B; b++) {
        for (size_t i = 0; i < V; i++) out[b * V + i] = to_float(raw[b * Vp + i]);
    }
}
#endif

// The inference runner: one API over both builds, beside the training Runner. The host Llama
// holds the config and, on the CPU build, the weights; it is never given gradients or moments.
struct InferRunner {
    Llama host;
#ifdef XWIN_CUDA
    InferCuda gpu;
    std::vector<float> logits;  // (B, V) on the host
    std::vector<float> out;     // (B) the last scores or sequence log-prob sums, on the host
#else
    Infer cpu;
#endif
};

// host must hold a loaded model (a language model to generate, a reward model to score); B
// sequences of up to max_T tokens, up to max_chunk new tokens per sequence and call (whole
// sequences to score: max_chunk = max_T); attn_chunk as infer_cuda_init (the GPU build's only)
inline void infer_runner_init(InferRunner* r, int B, int max_T, int max_chunk, int attn_chunk = ATTN_DECODE_CHUNK) {
#ifdef XWIN_CUDA
    infer_cuda_init(&r->gpu, &r->host, B, max_T, max_chunk, 0, attn_chunk);
    r->logits.resize((size_t)B * head_rows(r->host.config));
    r->out.resize(B);
#else
    (void)attn_chunk;
    infer_init(&r->cpu, &r->host, B, max_T, max_chunk);
#endif
}

// prompts (B, Tn), right-padded, of lens[b] tokens (null: Tn each) -> the logits (B, V) at their last tokens.
// nb > 0: only the first nb sequences are prompts (tokens (nb, Tn), logits (nb, V)); the
// others start empty (infer_runner_copy_sequence fills them from a prompt).
inline const float* infer_runner_prefill(InferRunner* r, const int* tokens, int Tn, const int* lens = nullptr, int nb = 0) {
    require_head(r->host.config, HEAD_LM, "logits");
#ifdef XWIN_CUDA
    infer_cuda_prefill(&r->gpu, tokens, Tn, lens, nb);
    infer_cuda_logits(&r->gpu, r->logits.data());
    return r->logits.data();
#else
    return infer_prefill(&r->cpu, tokens, Tn, lens, nb);
#endif
}

// next (B): one token per sequence -> the logits (B, V) after it. nb > 0: only the first nb
// sequences take a token (next (nb), logits (nb, V)); the others keep their cache and position.
inline const float* infer_runner_decode(InferRunner* r, const int* next, int nb = 0) {
    require_head(r->host.config, HEAD_LM, "logits");
#ifdef XWIN_CUDA
    infer_cuda_decode(&r->gpu, next, nb);
    infer_cuda_logits(&r->gpu, r->logits.data());
    return r->logits.data();
#else
    return infer_decode(&r->cpu, next, nb);
#endif
}

// tokens (B, T), B <= the runner's, T <= its max_chunk -> a reward model's scores (B) on the
// host, each at its sequence's last token that is not the pad id (reward_score_index, as
// runner_score): a prefill that ends there. Empties the cache; from_cache: the tokens continue
// what each sequence holds (infer_runner_share_prefix), the same scores as the whole prefill.
inline const float* infer_runner_score(InferRunner* r, const int* tokens, int B, int T, bool from_cache = false) {
    const LlamaConfig& c = r->host.config;
    require_head(c, HEAD_REWARD, "scores");
    if (B > 1 && c.pad_id < 0) {
        fprintf(stderr, "error: the reward model has no pad_token_id, so it cannot score a batch of more than one sequence (as transformers)\n");
        exit(1);
    }
    std::vector<int> lens(B);
    reward_score_index(lens.data(), tokens, B, T, c.pad_id);
    for (int& len : lens) len += 1;
#ifdef XWIN_CUDA
    if (!from_cache) r->gpu.pos.assign(r->gpu.B, 0);
    infer_cuda_extend(&r->gpu, tokens, T, lens.data(), B);
    cudaCheck(cudaMemcpyAsync(r->out.data(), r->gpu.s.scores, B * sizeof(float), cudaMemcpyDeviceToHost, r->gpu.stream));
    cudaCheck(cudaStreamSynchronize(r->gpu.stream));
    return r->out.data();
#else
    if (!from_cache) r->cpu.pos.assign(r->cpu.B, 0);
    return infer_extend(&r->cpu, tokens, T, lens.data(), B);
#endif
}

// tokens (B, T), mask (B, T), B <= the runner's, T <= its max_chunk -> the sum of each
// sequence's masked token log-probs (B) on the host, as runner_sequence_logprobs; the GPU
// moves the mask up and B sums down. Empties the cache; from_cache: the tokens continue what
// each sequence holds (infer_runner_share_prefix), and row 0's token is a target's context only.
inline const float* infer_runner_sequence_logprobs(InferRunner* r, const int* tokens, const uint8_t* mask, int B, int T, bool from_cache = false) {
#ifdef XWIN_CUDA
    infer_cuda_sequence_logprobs(&r->gpu, tokens, mask, B, T, r->out.data(), from_cache);
    return r->out.data();
#else
    return infer_sequence_logprobs(&r->cpu, tokens, mask, B, T, from_cache);
#endif
}

// (B) the tokens each sequence has in the cache
inline const int* infer_runner_positions(const InferRunner* r) {
#ifdef XWIN_CUDA
    return r->gpu.pos.data();
#else
    return r->cpu.pos.data();
#endif
}

// Sequence dst becomes a copy of sequence src: the cached keys and values of its positions, in
// every layer, and its position. So several samples of one prompt share its prefill.
inline void infer_runner_copy_sequence(InferRunner* r, int src, int dst) {
    if (src == dst) return;
    const LlamaConfig& c = r->host.config;
    size_t KVD = kv_dim(c);
#ifdef XWIN_CUDA
    InferCuda& g = r->gpu;
    size_t seq = (size_t)g.max_T * KVD, layer = (size_t)g.B * seq, n = (size_t)g.pos[src] * KVD;
    for (size_t l = 0; l < (size_t)c.n_layers; l++) {
        for (floatX* cache : {g.s.k_cache, g.s.v_cache}) {
            cudaCheck(cudaMemcpyAsync(cache + l * layer + dst * seq, cache + l * layer + src * seq, n * sizeof(floatX), cudaMemcpyDeviceToDevice, g.stream));
        }
    }
    g.pos[dst] = g.pos[src];
#else
    Infer& inf = r->cpu;
    size_t seq = (size_t)inf.max_T * KVD, layer = (size_t)inf.B * seq, n = (size_t)inf.pos[src] * KVD;
    for (size_t l = 0; l < (size_t)c.n_layers; l++) {
        for (float* cache : {inf.s.k_cache, inf.s.v_cache}) memcpy(cache + l * layer + dst * seq, cache + l * layer + src * seq, n * sizeof(float));
    }
    inf.pos[dst] = inf.pos[src];
#endif
}

// Every sequence of the runner holds the same n tokens (n may be 0): the layers run once, on
// sequence 0, and the others copy its cache. Then many continuations of one prefix (the
// responses to a prompt) are scored over their own tokens alone (from_cache above), with the
// numbers of whole-sequence prefills: each row attends to the same cached keys and values.
inline void infer_runner_share_prefix(InferRunner* r, const int* tokens, int n) {
#ifdef XWIN_CUDA
    r->gpu.pos.assign(r->gpu.B, 0);
    if (n > 0) infer_cuda_layers(&r->gpu, tokens, n, nullptr, 1);
    int B = r->gpu.B;
#else
    r->cpu.pos.assign(r->cpu.B, 0);
    if (n > 0) infer_layers(&r->cpu, tokens, n, nullptr, 1);
    int B = r->cpu.B;
#endif
    for (int b = 1; b < B; b++) infer_runner_copy_sequence(r, 0, b);
}

// Sequence b forgets every position from pos on (pos <= its position): the next decode writes there.
inline void infer_runner_rewind(InferRunner* r, int b, int pos) {
#ifdef XWIN_CUDA
    std::vector<int>& p = r->gpu.pos;
#else
    std::vector<int>& p = r->cpu.pos;
#endif
    if (pos < 0 || pos > p[b]) {
        fprintf(stderr, "error: sequence %d holds %d positions; cannot rewind it to %d\n", b, p[b], pos);
        exit(1);
    }
    p[b] = pos;
}

// the bytes the runner allocated beyond the host model (device memory on the GPU build)
inline size_t infer_runner_bytes(const InferRunner* r) {
#ifdef XWIN_CUDA
    return r->gpu.bytes;
#else
    return r->cpu.bytes;
#endif
}

inline void infer_runner_free(InferRunner* r) {
#ifdef XWIN_CUDA
    infer_cuda_free(&r->gpu);
#else
    infer_free(&r->cpu);
#endif
    llama_free(&r->host);
}

// ----------------------------------------------------------------------------
// Token file format (.tok), version 1: sequences of tokens with a per-token loss mask.
// Little-endian. Header: 64 bytes.
//   0  uint32 magic = 0x4B545758 (the bytes "XWTK")    4  uint32 version = 1
//   8  uint32 n_seqs (>= 1)                            12 uint32 reserved (0)
//   16 uint64 n_tokens                                 24 uint64 n_mask (must equal n_tokens)
//   32..63 zero (reserved; bytes 12..15 and 32..63 are checked as zero on load)
// Then uint64 offsets[n_seqs + 1] (offsets[0] = 0, strictly increasing, offsets[n_seqs] =
// n_tokens; sequence i is tokens[offsets[i] : offsets[i+1]]), uint32 tokens[n_tokens],
// uint8 mask[n_mask]. mask[i] = 1 makes token i a target: its log-prob given the tokens
// before it counts in the loss and in its sequence's log-prob sum (the first token of a
// sequence is never a target). The file is exactly as long as this says.

constexpr uint32_t TOKENS_MAGIC = 0x4B545758;
constexpr uint32_t TOKENS_VERSION = 1;
constexpr size_t TOKENS_HEADER_BYTES = 64;

struct TokenData {
    size_t n_seqs = 0;
    std::vector<uint64_t> offsets;  // (n_seqs + 1)
    std::vector<int> tokens;        // (n_tokens)
    std::vector<uint8_t> mask;      // (n_tokens)
};

inline size_t token_seq_len(const TokenData& d, size_t i) { return (size_t)(d.offsets[i + 1] - d.offsets[i]); }

// the targets (mask 1, past the first token) of sequence i
inline size_t token_targets(const TokenData& d, size_t i) {
    size_t n = 0;
    for (uint64_t j = d.offsets[i] + 1; j < d.offsets[i + 1]; j++) n += d.mask[j];
    return n;
}

// Reads and checks a token file against a vocabulary size. Returns "" or what is wrong.
inline std::string tokens_load_checked(TokenData* d, const char* path, int vocab_size) {
    FILE* f = fopen(path, "rb");
    if (!f) return string_format("cannot open: %s", strerror(errno));
    struct Closer { FILE* f; ~Closer() { fclose(f); } } closer{f};
    size_t size = file_size_of(f);
    if (size == 0) return "file is empty";
    if (size < TOKENS_HEADER_BYTES) return string_format("file is %zu bytes, shorter than the %zu-byte token-file header", size, TOKENS_HEADER_BYTES);
    unsigned char h[TOKENS_HEADER_BYTES];
    if (fread(h, 1, TOKENS_HEADER_BYTES, f) != TOKENS_HEADER_BYTES) return "read error in header";
    uint32_t u[4];
    uint64_t n_tokens, n_mask;
    memcpy(u, h, 16);
    memcpy(&n_tokens, h + 16, 8);
    memcpy(&n_mask, h + 24, 8);
    if (u[0] != TOKENS_MAGIC) return string_format("bad magic 0x%08x (expected 0x%08x, \"XWTK\"): not an xwin.cu token file", u[0], TOKENS_MAGIC);
    if (u[1] != TOKENS_VERSION) return string_format("unsupported token file version %u (this build reads version %u)", u[1], TOKENS_VERSION);
    if (u[2] == 0) return "file holds no sequences (n_seqs = 0)";
    std::string reserved = reserved_bytes_check(h, 12, 16);
    if (reserved.empty()) reserved = reserved_bytes_check(h, 32, TOKENS_HEADER_BYTES);
    if (!reserved.empty()) return reserved;
    if (n_mask != n_tokens) return string_format("mask length %llu differs from token count %llu", (unsigned long long)n_mask, (unsigned long long)n_tokens);
    // check the size in a way that cannot overflow: every count is bounded by the file size
    if (n_tokens > size || u[2] > size) return string_format("header counts (%u sequences, %llu tokens) exceed the file size %zu: truncated or corrupt", u[2], (unsigned long long)n_tokens, size);
    size_t expected = TOKENS_HEADER_BYTES + ((size_t)u[2] + 1) * 8 + (size_t)n_tokens * 4 + (size_t)n_mask;
    if (size != expected) return string_format("file is %zu bytes but its header describes %zu bytes%s", size, expected, size < expected ? ": truncated" : "");
    d->n_seqs = u[2];
    d->offsets.resize(d->n_seqs + 1);
    d->tokens.resize(n_tokens);
    d->mask.resize(n_tokens);
    std::vector<uint32_t> raw(n_tokens);
    if (fread(d->offsets.data(), 8, d->n_seqs + 1, f) != d->n_seqs + 1 || fread(raw.data(), 4, n_tokens, f) != n_tokens ||
        fread(d->mask.data(), 1, n_tokens, f) != n_tokens) return "read error";
    if (d->offsets[0] != 0 || d->offsets[d->n_seqs] != n_tokens) return "offsets must start at 0 and end at n_tokens";
    for (size_t i = 0; i < d->n_seqs; i++) {
        if (d->offsets[i + 1] <= d->offsets[i]) return string_format("sequence %zu is empty or its offsets decrease", i);
    }
    for (size_t i = 0; i < n_tokens; i++) {
        if (raw[i] >= (uint32_t)vocab_size) return string_format("token %zu has id %u >= vocab_size %d", i, raw[i], vocab_size);
        if (d->mask[i] > 1) return string_format("mask byte %zu is %u (must be 0 or 1)", i, d->mask[i]);
        d->tokens[i] = (int)raw[i];
    }
    return "";
}

inline void tokens_load(TokenData* d, const char* path, int vocab_size) {
    std::string err = tokens_load_checked(d, path, vocab_size);
    if (!err.empty()) fail_file(path, "%s", err.c_str());
}

inline void tokens_save(const TokenData& d, const char* path) {
    AtomicFile f;
    atomic_open(&f, path);
    unsigned char h[TOKENS_HEADER_BYTES] = {0};
    uint32_t u[4] = {TOKENS_MAGIC, TOKENS_VERSION, (uint32_t)d.n_seqs, 0};
    uint64_t n = d.tokens.size();
    memcpy(h, u, 16);
    memcpy(h + 16, &n, 8);
    memcpy(h + 24, &n, 8);
    atomic_write(&f, h, TOKENS_HEADER_BYTES);
    atomic_write(&f, d.offsets.data(), 8 * d.offsets.size());
    std::vector<uint32_t> raw(d.tokens.begin(), d.tokens.end());
    atomic_write(&f, raw.data(), 4 * raw.size());
    atomic_write(&f, d.mask.data(), d.mask.size());
    atomic_commit(&f);
}

// Copies the sequences rows[0..B) into a (B, T) batch, padding with token `pad` (0 unless a
// reward model, which scores the last token that is not its pad id, needs that id) and mask 0
// (padding sits after each sequence, so causal attention never lets it change a target).
inline void tokens_fill_rows(const TokenData& d, const size_t* rows, int B, int T, int* tokens, uint8_t* mask, int pad = 0) {
    for (int b = 0; b < B; b++) {
        size_t len = token_seq_len(d, rows[b]), start = d.offsets[rows[b]];
        for (int t = 0; t < T; t++) {
            bool in = (size_t)t < len;
            tokens[b * T + t] = in ? d.tokens[start + t] : pad;
            mask[b * T + t] = in ? d.mask[start + t] : 0;
        }
    }
}

// the sequences [first, first + B)
inline void tokens_fill_batch(const TokenData& d, size_t first, int B, int T, int* tokens, uint8_t* mask) {
    std::vector<size_t> rows(B);
    for (int b = 0; b < B; b++) rows[b] = first + b;
    tokens_fill_rows(d, rows.data(), B, T, tokens, mask);
}

// ----------------------------------------------------------------------------
// Pair file format (.pairs), version 1: preference pairs (Xwin-Pair, TRL's chosen/rejected
// convention) as token sequences, written by dev/data/prepare_pairs.py. Little-endian.
// Header: 64 bytes.
//   0  uint32 magic = 0x52505758 (the bytes "XWPR")    4  uint32 version = 1
//   8  uint32 n_pairs (>= 1)                           12 uint32 n_groups (0..64)
//   16 uint64 n_tokens                                 24..63 zero
// Then n_groups names of 16 bytes each (UTF-8, zero-padded: e.g. the world's task kinds),
// then n_pairs records of 16 bytes:
//   uint32 prompt_len (tokens the two sequences share: the conversation up to the answer),
//   uint32 group (< n_groups, or 0 when n_groups is 0), float32 score_chosen,
//   float32 score_rejected (the ratings; score_chosen > score_rejected),
// then uint64 offsets[2 n_pairs + 1] (sequence 2i is pair i's chosen conversation, 2i + 1
// its rejected one; offsets[0] = 0, strictly increasing), uint32 tokens[n_tokens],
// uint8 mask[n_tokens] (1 on the final answer's tokens and its EOS, as in a token file).
// The loader checks that the two sequences of a pair start with the same prompt_len tokens
// and that each has an answer after them.

constexpr uint32_t PAIRS_MAGIC = 0x52505758;
constexpr size_t PAIRS_HEADER_BYTES = 64, PAIRS_GROUP_NAME_BYTES = 16, PAIRS_MAX_GROUPS = 64;

struct PairRecord {
    uint32_t prompt_len;
    uint32_t group;
    float score_chosen;
    float score_rejected;
};
static_assert(sizeof(PairRecord) == 16, "PairRecord is read from the file as is");

struct PairData {
    size_t n_pairs = 0;
    std::vector<std::string> groups;  // (n_groups) names
    std::vector<PairRecord> pairs;    // (n_pairs)
    TokenData seqs;                   // 2 n_pairs sequences: chosen, rejected, chosen, ...
};

// Reads and checks a pair file against a vocabulary size. Returns "" or what is wrong.
inline std::string pairs_load_checked(PairData* p, const char* path, int vocab_size) {
    FILE* f = fopen(path, "rb");
    if (!f) return string_format("cannot open: %s", strerror(errno));
    struct Closer { FILE* f; ~Closer() { fclose(f); } } closer{f};
    size_t size = file_size_of(f);
    if (size == 0) return "file is empty";
    if (size < PAIRS_HEADER_BYTES) return string_format("file is %zu bytes, shorter than the %zu-byte pair-file header", size, PAIRS_HEADER_BYTES);
    unsigned char h[PAIRS_HEADER_BYTES];
    if (fread(h, 1, PAIRS_HEADER_BYTES, f) != PAIRS_HEADER_BYTES) return "read error in header";
    uint32_t u[4];
    uint64_t n_tokens;
    memcpy(u, h, 16);
    memcpy(&n_tokens, h + 16, 8);
    if (u[0] != PAIRS_MAGIC) return string_format("bad magic 0x%08x (expected 0x%08x, \"XWPR\"): not an xwin.cu pair file", u[0], PAIRS_MAGIC);
    if (u[1] != 1) return string_format("unsupported pair file version %u (this build reads version 1)", u[1]);
    if (u[2] == 0) return "file holds no pairs (n_pairs = 0)";
    if (u[3] > PAIRS_MAX_GROUPS) return string_format("n_groups %u is more than %zu", u[3], PAIRS_MAX_GROUPS);
    std::string reserved = reserved_bytes_check(h, 24, PAIRS_HEADER_BYTES);
    if (!reserved.empty()) return reserved;
    size_t n = u[2], G = u[3], n_seqs = 2 * n;
    if (n_tokens > size || n > size) return string_format("header counts (%zu pairs, %llu tokens) exceed the file size %zu: truncated or corrupt", n, (unsigned long long)n_tokens, size);
    size_t expected = PAIRS_HEADER_BYTES + G * PAIRS_GROUP_NAME_BYTES + n * sizeof(PairRecord) + (n_seqs + 1) * 8 + n_tokens * 5;
    if (size != expected) return string_format("file is %zu bytes but its header describes %zu bytes%s", size, expected, size < expected ? ": truncated" : "");
    std::vector<char> names(G * PAIRS_GROUP_NAME_BYTES);
    p->n_pairs = n;
    p->pairs.resize(n);
    TokenData& d = p->seqs;
    d.n_seqs = n_seqs;
    d.offsets.resize(n_seqs + 1);
    d.tokens.resize(n_tokens);
    d.mask.resize(n_tokens);
    std::vector<uint32_t> raw(n_tokens);
    if (fread(names.data(), 1, names.size(), f) != names.size() || fread(p->pairs.data(), sizeof(PairRecord), n, f) != n ||
        fread(d.offsets.data(), 8, n_seqs + 1, f) != n_seqs + 1 || fread(raw.data(), 4, n_tokens, f) != n_tokens ||
        fread(d.mask.data(), 1, n_tokens, f) != n_tokens) return "read error";
    p->groups.clear();
    for (size_t g = 0; g < G; g++) p->groups.emplace_back(names.data() + g * PAIRS_GROUP_NAME_BYTES, strnlen(names.data() + g * PAIRS_GROUP_NAME_BYTES, PAIRS_GROUP_NAME_BYTES));
    if (d.offsets[0] != 0 || d.offsets[n_seqs] != n_tokens) return "offsets must start at 0 and end at n_tokens";
    for (size_t i = 0; i < n_seqs; i++) {
        if (d.offsets[i + 1] <= d.offsets[i]) return string_format("sequence %zu is empty or its offsets decrease", i);
    }
    for (size_t i = 0; i < n_tokens; i++) {
        if (raw[i] >= (uint32_t)vocab_size) return string_format("token %zu has id %u >= vocab_size %d", i, raw[i], vocab_size);
        if (d.mask[i] > 1) return string_format("mask byte %zu is %u (must be 0 or 1)", i, d.mask[i]);
        d.tokens[i] = (int)raw[i];
    }
    for (size_t i = 0; i < n; i++) {
        const PairRecord& r = p->pairs[i];
        const int* c = d.tokens.data() + d.offsets[2 * i];
        const int* rj = d.tokens.data() + d.offsets[2 * i + 1];
        size_t lc = token_seq_len(d, 2 * i), lr = token_seq_len(d, 2 * i + 1);
        if (r.prompt_len < 1 || r.prompt_len >= lc || r.prompt_len >= lr) {
            return string_format("pair %zu: prompt_len %u leaves no answer (chosen %zu tokens, rejected %zu)", i, r.prompt_len, lc, lr);
        }
        for (size_t t = 0; t < r.prompt_len; t++) {
            if (c[t] != rj[t]) return string_format("pair %zu: the chosen and rejected prompts differ at token %zu (%d vs %d)", i, t, c[t], rj[t]);
        }
        if (G ? r.group >= G : r.group != 0) return string_format("pair %zu: group %u is not below n_groups %zu", i, r.group, G);
        if (!std::isfinite(r.score_chosen) || !std::isfinite(r.score_rejected)) return string_format("pair %zu: a score is not finite", i);
    }
    return "";
}

inline void pairs_load(PairData* p, const char* path, int vocab_size) {
    std::string err = pairs_load_checked(p, path, vocab_size);
    if (!err.empty()) fail_file(path, "%s", err.c_str());
}

// ----------------------------------------------------------------------------
// Reference log-prob file format (.logps), version 2: DPO's frozen reference, computed once
// by the starting model before training (train_dpo), so that a DPO step holds one model.
// It names the model and the pairs that made it, and a loader refuses it for any other.
// Little-endian. Header: 64 bytes.
//   0  uint32 magic = 0x46525758 (the bytes "XWRF")    4  uint32 version = 2
//   8  uint32 n_pairs (>= 1)                           12 uint32 model_crc (CRC-32 of the model file)
//   16 uint64 model_size (bytes of the model file)     24 uint64 pairs_size (tokens_identity of the pairs)
//   32 uint32 pairs_hash (tokens_identity)             36 uint32 values_crc (CRC-32 of the values below)
//   40..63 zero (reserved)
// Then float32 chosen[n_pairs], float32 rejected[n_pairs]: the reference's log-prob sums over
// each answer's target tokens (the pair file's mask). The file is exactly as long as this says.
// Version 1 (the same without values_crc) is refused: nothing guards its values, and the file
// is a cache that train_dpo remakes from the starting model when it is missing, so the message
// says to delete it. A file is never overwritten by a run that refuses it.

constexpr uint32_t REFERENCE_MAGIC = 0x46525758;
constexpr uint32_t REFERENCE_VERSION = 2;
constexpr size_t REFERENCE_HEADER_BYTES = 64;

struct ReferenceLogps {
    uint32_t model_crc = 0;
    uint64_t model_size = 0, pairs_size = 0;
    uint32_t pairs_hash = 0;
    std::vector<float> chosen, rejected;  // (n_pairs) each
};

// The identity of a model file (its size and CRC-32), as a reference file records it.
inline std::string model_file_identity(const char* path, uint64_t* size, uint32_t* crc) {
    FILE* f = fopen(path, "rb");
    if (!f) return string_format("cannot open: %s", strerror(errno));
    *size = file_size_of(f);
    fclose(f);
    if (!file_crc32(path, crc)) return "read error";
    return "";
}

// the CRC-32 of a reference's values, in file order: chosen[n_pairs], then rejected[n_pairs]
inline uint32_t reference_values_crc(const ReferenceLogps& r) {
    uint32_t crc = crc32_update(0, r.chosen.data(), r.chosen.size() * sizeof(float));
    return crc32_update(crc, r.rejected.data(), r.rejected.size() * sizeof(float));
}

inline void reference_save(const ReferenceLogps& r, const char* path) {
    unsigned char h[REFERENCE_HEADER_BYTES] = {0};
    uint32_t u[4] = {REFERENCE_MAGIC, REFERENCE_VERSION, (uint32_t)r.chosen.size(), r.model_crc};
    uint32_t values_crc = reference_values_crc(r);
    memcpy(h, u, 16);
    memcpy(h + 16, &r.model_size, 8);
    memcpy(h + 24, &r.pairs_size, 8);
    memcpy(h + 32, &r.pairs_hash, 4);
    memcpy(h + 36, &values_crc, 4);
    AtomicFile a;
    atomic_open(&a, path);
    atomic_write(&a, h, sizeof(h));
    atomic_write(&a, r.chosen.data(), r.chosen.size() * sizeof(float));
    atomic_write(&a, r.rejected.data(), r.rejected.size() * sizeof(float));
    atomic_commit(&a);
}

// Reads a reference file and checks it: whole (its size and the CRC-32 of its values), then
// of the model and the pairs it must belong to (want's identity fields). Returns "" or what
// is wrong; every refusal ends by saying how to make the file again.
inline std::string reference_load_checked(ReferenceLogps* r, const char* path, const ReferenceLogps& want, size_t n_pairs) {
    const char* remake = "delete it to compute the reference again";
    FILE* f = fopen(path, "rb");
    if (!f) return string_format("cannot open: %s", strerror(errno));
    struct Closer { FILE* f; ~Closer() { fclose(f); } } closer{f};
    size_t size = file_size_of(f);
    if (size < REFERENCE_HEADER_BYTES) return string_format("file is %zu bytes, shorter than the %zu-byte reference-file header: %s", size, REFERENCE_HEADER_BYTES, remake);
    unsigned char h[REFERENCE_HEADER_BYTES];
    if (fread(h, 1, REFERENCE_HEADER_BYTES, f) != REFERENCE_HEADER_BYTES) return "read error in header";
    uint32_t u[4], values_crc;
    memcpy(u, h, 16);
    memcpy(&r->model_size, h + 16, 8);
    memcpy(&r->pairs_size, h + 24, 8);
    memcpy(&r->pairs_hash, h + 32, 4);
    memcpy(&values_crc, h + 36, 4);
    r->model_crc = u[3];
    if (u[0] != REFERENCE_MAGIC) return string_format("bad magic 0x%08x (expected 0x%08x, \"XWRF\"): not an xwin.cu reference file", u[0], REFERENCE_MAGIC);
    if (u[1] == 1) return string_format("reference file version 1 has no checksum over its values: %s (this build writes version %u)", remake, REFERENCE_VERSION);
    if (u[1] != REFERENCE_VERSION) return string_format("unsupported reference file version %u (this build reads version %u)", u[1], REFERENCE_VERSION);
    std::string reserved = reserved_bytes_check(h, 40, REFERENCE_HEADER_BYTES);
    if (!reserved.empty()) return reserved + ": " + remake;
    if (size != REFERENCE_HEADER_BYTES + (size_t)u[2] * 8) return string_format("file is %zu bytes but its header describes %zu: %s", size, REFERENCE_HEADER_BYTES + (size_t)u[2] * 8, remake);
    r->chosen.resize(u[2]);
    r->rejected.resize(u[2]);
    if (fread(r->chosen.data(), 4, u[2], f) != u[2] || fread(r->rejected.data(), 4, u[2], f) != u[2]) return "read error";
    uint32_t crc = reference_values_crc(*r);
    if (crc != values_crc) return string_format("its log-probs do not match their checksum (stored %08x, computed %08x): the file is damaged; %s", values_crc, crc, remake);
    if (r->model_size != want.model_size || r->model_crc != want.model_crc) {
        return string_format("holds the log-probs of another model (a %llu-byte model file with CRC-32 %08x; the starting model is %llu bytes with CRC-32 %08x): %s",
                             (unsigned long long)r->model_size, r->model_crc, (unsigned long long)want.model_size, want.model_crc, remake);
    }
    if (u[2] != n_pairs || r->pairs_size != want.pairs_size || r->pairs_hash != want.pairs_hash) {
        return string_format("was made for other pairs (%u pairs, data %llu bytes, hash %08x; these are %zu pairs, %llu bytes, hash %08x): %s", u[2],
                             (unsigned long long)r->pairs_size, r->pairs_hash, n_pairs, (unsigned long long)want.pairs_size, want.pairs_hash, remake);
    }
    for (size_t i = 0; i < u[2]; i++) {
        if (!std::isfinite(r->chosen[i]) || !std::isfinite(r->rejected[i])) return string_format("pair %zu: a log-prob is not finite: %s", i, remake);
    }
    return "";
}

// ----------------------------------------------------------------------------
// Tensor archive (.bin of named float32 tensors): logits dumps and the test fixtures.
// Little-endian: uint32 magic = 0x58465758 (the bytes "XWFX"), uint32 version = 1,
// uint32 n_entries; then per entry: uint32 name_len (1..256), the name's bytes (no NUL),
// uint32 ndim (0..8), uint64 dims[ndim], float32 data[prod(dims)].

constexpr uint32_t ARCHIVE_MAGIC = 0x58465758;

struct ArchiveEntry {
    std::string name;
    std::vector<uint64_t> shape;
    std::vector<float> data;
};

inline void archive_save(const std::vector<ArchiveEntry>& entries, const char* path) {
    AtomicFile f;
    atomic_open(&f, path);
    uint32_t head[3] = {ARCHIVE_MAGIC, 1, (uint32_t)entries.size()};
    atomic_write(&f, head, sizeof(head));
    for (const ArchiveEntry& e : entries) {
        uint32_t len = (uint32_t)e.name.size(), ndim = (uint32_t)e.shape.size();
        atomic_write(&f, &len, 4);
        atomic_write(&f, e.name.data(), len);
        atomic_write(&f, &ndim, 4);
        atomic_write(&f, e.shape.data(), 8 * ndim);
        atomic_write(&f, e.data.data(), 4 * e.data.size());
    }
    atomic_commit(&f);
}

inline std::vector<ArchiveEntry> archive_load(const char* path) {
    FILE* f = fopen_check(path, "rb");
    size_t size = file_size_of(f), pos = 12;
    uint32_t head[3];
    fread_check(head, 4, 3, f, path);
    if (head[0] != ARCHIVE_MAGIC) fail_file(path, "bad magic 0x%08x: not an xwin.cu tensor archive", head[0]);
    if (head[1] != 1) fail_file(path, "unsupported tensor archive version %u", head[1]);
    std::vector<ArchiveEntry> entries(head[2] <= size ? head[2] : 0);
    if (head[2] > size) fail_file(path, "%u entries cannot fit in %zu bytes", head[2], size);
    for (ArchiveEntry& e : entries) {
        uint32_t len, ndim;
        fread_check(&len, 4, 1, f, path);
        if (len == 0 || len > 256) fail_file(path, "entry name of %u bytes (must be 1..256)", len);
        e.name.resize(len);
        fread_check(&e.name[0], 1, len, f, path);
        fread_check(&ndim, 4, 1, f, path);
        if (ndim > 8) fail_file(path, "entry %s has %u dims (at most 8)", e.name.c_str(), ndim);
        e.shape.resize(ndim);
        fread_check(e.shape.data(), 8, ndim, f, path);
        pos += 8 + len + 8 * (size_t)ndim;
        size_t n = 1;
        for (uint64_t d : e.shape) {
            if (d > size) fail_file(path, "entry %s has a dimension of %llu, larger than the file", e.name.c_str(), (unsigned long long)d);
            n *= d;
        }
        if (n > (size - pos) / 4) fail_file(path, "entry %s runs past the end of the file", e.name.c_str());
        e.data.resize(n);
        fread_check(e.data.data(), 4, n, f, path);
        pos += 4 * n;
    }
    fclose(f);
    return entries;
}

// ----------------------------------------------------------------------------
// Tokenizer
//
// FILE FORMAT (".tokenizer", written by dev/export_tokenizer.py). All integers
// are little-endian; the file is read whole and every field is checked.
// Version 2 adds kind 2 and a longer header; version 1 files (kinds 0 and 1,
// 40-byte header) are still read, and the exporter still writes kinds 0 and 1
// as version 1, since nothing of theirs changed.
//
//   offset  size  field
//   0       8     magic "XWINTOKN"
//   8       4     u32 version: 1 or 2
//   12      4     u32 kind: 0 = SentencePiece-style BPE (Llama 2), 1 = byte-level,
//                 2 = byte-level BPE (GPT-2, Llama 3, SmolLM2; version 2 only)
//   16      4     u32 vocab_size: number of token records that follow (>= 1)
//   20      4     i32 bos_id  (-1 = none; otherwise a control token)
//   24      4     i32 eos_id  (-1 = none; otherwise a control token)
//   28      4     i32 unk_id  (-1 = none; kind 0: must be the one unknown token)
//   32      4     i32 pad_id  (-1 = none; otherwise a control token)
//   36      4     u32 flags: bit 0 add_dummy_prefix, bit 1 byte_fallback (kind 0 only);
//                 bit 2 individual_digits, bit 3 ignore_merges (kind 2 only);
//                 other bits must be zero
//   version 2 only:
//   40      4     u32 pre_tokenizer: kind 2: 1 = the GPT-2 regex, 2 = the Llama 3 regex
//                 (below); kinds 0 and 1: 0
//   44      4     u32 n_merges (kind 2; else 0)
//   48      4     u32 n_added: added-token records (kind 2; else 0)
//   52      12    reserved, zero
//   40 / 64 ...   vocab_size token records, in id order:
//                   f32 score (finite; kind 0: BPE merge priority, larger merges
//                   first; kinds 1 and 2: 0)
//                   u8  type: 0 normal, 1 byte, 2 control, 3 unknown, 4 added
//                   u16 piece length in bytes (>= 1)
//                   piece bytes: kind 0 normal pieces are UTF-8 with spaces written
//                   as U+2581 "▁"; byte pieces are exactly "<0xNN>" (uppercase hex)
//                   standing for the raw byte NN; control/unknown pieces are
//                   names such as "<s>" or "<unk>". Kind 2: see below.
//   kind 2, after the token records:
//                 n_merges merge records in rank order (rank 0 merges first):
//                   u32 left id, u32 right id (normal tokens; the token whose piece
//                   is the two pieces joined must exist; no pair twice)
//                 n_added added-token records, ids ascending:
//                   u32 id (a control or added token; every one has a record)
//                   u32 flags: bit 0 lstrip, bit 1 rstrip, bit 2 normalized
//                   (other bits zero; single_word is not supported)
//   Then, optionally (any version, any kind), the chat template section:
//   0       4     "CHAT"
//   4       4     u32 flags: bit 0 trim contents, bit 1 the generation prompt drops
//                 assistant_prefix's trailing space (not for kind 1); other bits zero
//   8       8     reserved, zero
//   16      ...   ten strings, each u32 byte length (<= 65536) then UTF-8 bytes: name,
//                 begin, default_system, system_prefix, system_suffix, user_prefix,
//                 user_suffix, assistant_prefix, assistant_end (not empty), after_assistant
//                 (see "The chat template"; every "<...>" they write outside
//                 default_system must be a control or added token)
//   The file ends right after the last record, or the template section. Pieces are unique.
//   A file without a template section means Vicuna v1.1 with the tokenizer's BOS and EOS
//   (chat_template_vicuna).
//
// Kind 0 reproduces SentencePiece's BPE encoder for Llama-2-style models
// (identity normalisation, no extra-whitespace removal, spaces escaped as
// "▁", optional dummy "▁" prefix, optional byte fallback). Byte fallback
// requires all 256 byte tokens.
//
// Kind 1 (byte-level): ids 0..255 are the bytes 0x00..0xFF (pieces "<0xNN>"),
// followed only by control tokens; dev/export_tokenizer.py --byte-level writes
// 256 = "<s>" (bos), 257 = "</s>" (eos), 258 = "<pad>" (pad), vocab_size 259.
// Encoding is the identity on bytes, decoding concatenates bytes.
//
// Kind 2 (byte-level BPE) reproduces Hugging Face tokenizers' BPE model behind a
// ByteLevel pre-tokenizer, no normalizer, ByteLevel decoder (Llama 3, GPT-2,
// SmolLM2). Normal pieces are stored as the RAW BYTES they stand for, not in
// GPT-2's printable "ByteLevel" alphabet (the exporter maps "Ġ" back to ' ' and so
// on), so they need not be UTF-8; each of the 256 single bytes should be a
// normal piece (a byte without one is dropped when encoding, as tokenizers drops a
// character that is not in the vocabulary of a BPE without unk_token: SmolLM2 lacks
// a few control bytes). Control tokens are the special added tokens and added tokens (4)
// the others; their pieces are their text (UTF-8). Merges name their two tokens
// by id. unk_id must be -1. See tokenizer_encode for the algorithm.

constexpr char TOKENIZER_MAGIC[8] = {'X', 'W', 'I', 'N', 'T', 'O', 'K', 'N'};
constexpr uint32_t TOKENIZER_VERSION = 2;          // the newest version this build reads
constexpr size_t TOKENIZER_HEADER_BYTES_V1 = 40;
constexpr size_t TOKENIZER_HEADER_BYTES = 64;      // version 2
constexpr size_t TOKENIZER_RECORD_BYTES = 7;  // score + type + length, before the piece

enum TokenizerKind { TOKENIZER_SENTENCEPIECE_BPE = 0, TOKENIZER_BYTE_LEVEL = 1, TOKENIZER_BYTE_LEVEL_BPE = 2 };
enum TokenType { TOKEN_NORMAL = 0, TOKEN_BYTE = 1, TOKEN_CONTROL = 2, TOKEN_UNKNOWN = 3, TOKEN_ADDED = 4 };
enum PreTokenizer { PRETOKENIZER_NONE = 0, PRETOKENIZER_GPT2 = 1, PRETOKENIZER_LLAMA3 = 2 };
constexpr uint32_t TOKENIZER_FLAG_ADD_DUMMY_PREFIX = 1u << 0;
constexpr uint32_t TOKENIZER_FLAG_BYTE_FALLBACK = 1u << 1;
constexpr uint32_t TOKENIZER_FLAG_INDIVIDUAL_DIGITS = 1u << 2;
constexpr uint32_t TOKENIZER_FLAG_IGNORE_MERGES = 1u << 3;
constexpr uint32_t ADDED_TOKEN_LSTRIP = 1u << 0;
constexpr uint32_t ADDED_TOKEN_RSTRIP = 1u << 1;
constexpr uint32_t ADDED_TOKEN_NORMALIZED = 1u << 2;

struct AddedToken {
    int id;
    uint32_t flags;  // ADDED_TOKEN_*
};

// Vicuna v1.1's system line when a conversation has none.
const char* const CHAT_DEFAULT_SYSTEM =
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.";

// A chat template as the tokenizer file records it (see "The chat template" for how a
// conversation renders; dev/chat_templates.py holds the same definitions).
constexpr uint32_t CHAT_TEMPLATE_TRIM = 1u << 0;                 // strip each content's surrounding whitespace
constexpr uint32_t CHAT_TEMPLATE_PROMPT_STRIPS_SPACE = 1u << 1;  // the prompt's assistant_prefix loses its
                                                                 // trailing space, except for kind 1
constexpr int CHAT_TEMPLATE_STRINGS = 10;
struct ChatTemplate {
    std::string name, begin, default_system, system_prefix, system_suffix, user_prefix, user_suffix,
        assistant_prefix, assistant_end, after_assistant;
    uint32_t flags = 0;  // CHAT_TEMPLATE_*
};

// The template's strings in file order.
inline std::string* chat_template_strings(ChatTemplate* c, int i) {
    std::string* s[CHAT_TEMPLATE_STRINGS] = {&c->name, &c->begin, &c->default_system, &c->system_prefix,
                                             &c->system_suffix, &c->user_prefix, &c->user_suffix,
                                             &c->assistant_prefix, &c->assistant_end, &c->after_assistant};
    return s[i];
}

struct Tokenizer {
    int kind = -1;
    int vocab_size = 0;
    int bos_id = -1, eos_id = -1, unk_id = -1, pad_id = -1;
    bool add_dummy_prefix = false;
    bool byte_fallback = false;
    std::vector<std::string> pieces;  // by id, as stored in the file
    std::vector<float> scores;        // by id
    std::vector<uint8_t> types;       // by id, a TokenType
    std::vector<int> token_byte;      // by id: the byte a byte token stands for, else -1
    int byte_ids[256] = {};           // id of the token for each byte, -1 if none (set by loading)
    std::vector<int> piece_table;     // open-addressing hash of ids keyed by piece, -1 = empty
    // kind 2 (byte-level BPE)
    int pre_tokenizer = PRETOKENIZER_NONE;
    bool individual_digits = false;   // each \p{N} character is its own pre-token first
    bool ignore_merges = false;       // a pre-token that is a normal piece is that one token
    int n_merges = 0;
    std::vector<uint64_t> merge_keys;     // open-addressing hash keyed by left << 32 | right,
    std::vector<int> merge_ranks;         // ~0ull = empty; rank and result id per slot
    std::vector<int> merge_results;
    std::vector<AddedToken> added;        // ids ascending
    std::vector<int> added_by_byte[256];  // indices into added by the first byte of the
                                          // piece, longest piece first
    ChatTemplate chat;                    // the file's, or Vicuna v1.1 for a file without one
};

inline uint64_t tokenizer_hash(const char* s, size_t n) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

// Id of the token whose piece is exactly s[0..n), of any type, or -1.
inline int tokenizer_find_piece(const Tokenizer* t, const char* s, size_t n) {
    if (t->piece_table.empty()) return -1;
    size_t mask = t->piece_table.size() - 1;
    for (size_t slot = tokenizer_hash(s, n) & mask;; slot = (slot + 1) & mask) {
        int id = t->piece_table[slot];
        if (id < 0) return -1;
        const std::string& p = t->pieces[id];
        if (p.size() == n && std::memcmp(p.data(), s, n) == 0) return id;
    }
}

// Length of the UTF-8 character at s (1..4), or 0 when the bytes there are
// not a valid character (bad lead/continuation byte, overlong form,
// surrogate, above U+10FFFF, cut short). Same rules as SentencePiece.
inline size_t tokenizer_utf8_len(const char* str, size_t n) {
    const unsigned char* s = (const unsigned char*)str;
    if (n == 0) return 0;
    unsigned c = s[0];
    if (c < 0x80) return 1;
    auto trail = [&](size_t i) { return i < n && (s[i] & 0xC0) == 0x80; };
    if ((c & 0xE0) == 0xC0) {
        if (!trail(1)) return 0;
        unsigned cp = ((c & 0x1F) << 6) | (s[1] & 0x3F);
        return cp >= 0x80 ? 2 : 0;
    }
    if ((c & 0xF0) == 0xE0) {
        if (!trail(1) || !trail(2)) return 0;
        unsigned cp = ((c & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        return (cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF)) ? 3 : 0;
    }
    if ((c & 0xF8) == 0xF0) {
        if (!trail(1) || !trail(2) || !trail(3)) return 0;
        unsigned cp = ((c & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) |
                      (s[3] & 0x3F);
        return (cp >= 0x10000 && cp <= 0x10FFFF) ? 4 : 0;
    }
    return 0;
}

// Releases everything; *t is then an empty tokenizer (vocab_size 0).
inline void tokenizer_free(Tokenizer* t) {
    *t = Tokenizer();
    std::fill(t->byte_ids, t->byte_ids + 256, -1);
}

inline uint64_t tokenizer_merge_key(int left, int right) { return ((uint64_t)(uint32_t)left << 32) | (uint32_t)right; }

// The slot of the merge (left, right) in t->merge_keys: the pair's slot, or the empty
// slot where it would go.
inline size_t tokenizer_merge_slot(const Tokenizer* t, uint64_t key) {
    size_t mask = t->merge_keys.size() - 1;
    size_t slot = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & mask;
    while (t->merge_keys[slot] != ~0ull && t->merge_keys[slot] != key) slot = (slot + 1) & mask;
    return slot;
}

// The chat template section: "CHAT", u32 flags, 8 reserved bytes, then the ten strings
// of ChatTemplate in file order, each a u32 byte length and UTF-8 bytes (none longer than
// 64 KiB; the name 1..32 bytes of [a-z0-9._-]). The section ends the file.
constexpr char CHAT_TEMPLATE_MAGIC[4] = {'C', 'H', 'A', 'T'};
constexpr size_t CHAT_TEMPLATE_HEADER_BYTES = 16;

inline std::string chat_template_parse(ChatTemplate* c, const unsigned char* data, size_t size) {
    *c = ChatTemplate();
    auto u32_at = [&](size_t off) {
        return (uint32_t)data[off] | ((uint32_t)data[off + 1] << 8) | ((uint32_t)data[off + 2] << 16) |
               ((uint32_t)data[off + 3] << 24);
    };
    if (size < CHAT_TEMPLATE_HEADER_BYTES)
        return string_format("truncated: %zu bytes, its header needs %zu", size, CHAT_TEMPLATE_HEADER_BYTES);
    c->flags = u32_at(4);
    uint32_t known = CHAT_TEMPLATE_TRIM | CHAT_TEMPLATE_PROMPT_STRIPS_SPACE;
    if (c->flags & ~known) return string_format("unknown flag bits 0x%x", c->flags & ~known);
    std::string reserved = reserved_bytes_check(data, 8, CHAT_TEMPLATE_HEADER_BYTES);
    if (!reserved.empty()) return reserved;
    size_t pos = CHAT_TEMPLATE_HEADER_BYTES;
    for (int i = 0; i < CHAT_TEMPLATE_STRINGS; i++) {
        if (size - pos < 4) return string_format("truncated: string %d has no length", i);
        size_t len = u32_at(pos);
        pos += 4;
        if (len > 65536 || len > size - pos)
            return string_format("truncated: string %d of %zu bytes, %zu remain", i, len, size - pos);
        for (size_t k = 0; k < len;) {
            size_t n = tokenizer_utf8_len((const char*)data + pos + k, len - k);
            if (n == 0) return string_format("string %d is not valid UTF-8", i);
            k += n;
        }
        chat_template_strings(c, i)->assign((const char*)data + pos, len);
        pos += len;
    }
    if (pos != size) return string_format("%zu trailing bytes after its last string", size - pos);
    if (c->name.empty() || c->name.size() > 32 ||
        c->name.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789._-") != std::string::npos)
        return "the name must be 1 to 32 characters of a-z 0-9 . _ -";
    if (c->assistant_end.empty()) return "assistant_end (the end of an assistant turn) is empty";
    return "";
}

// The special token written at s[i..]: a run "<...>" (no whitespace or '<' inside) that is the
// piece of a control or added token. Returns its id and sets *len, or -1.
inline int chat_special_at(const Tokenizer* t, const std::string& s, size_t i, size_t* len) {
    if (s[i] != '<') return -1;
    size_t j = s.find_first_of("<> \t\r\n", i + 1);
    if (j == std::string::npos || s[j] != '>') return -1;
    int id = tokenizer_find_piece(t, s.data() + i, j + 1 - i);
    if (id < 0 || (t->types[id] != TOKEN_CONTROL && t->types[id] != TOKEN_ADDED)) return -1;
    *len = j + 1 - i;
    return id;
}

// Xwin-LM's template, what a tokenizer file without a template section means: its BOS and
// EOS are the tokenizer's own.
inline void chat_template_vicuna(Tokenizer* t) {
    ChatTemplate& c = t->chat;
    c = ChatTemplate();
    c.name = "vicuna_v1.1";
    c.begin = t->bos_id >= 0 ? t->pieces[t->bos_id] : "";
    c.default_system = CHAT_DEFAULT_SYSTEM;
    c.system_suffix = " ";
    c.user_prefix = "USER: ";
    c.user_suffix = " ";
    c.assistant_prefix = "ASSISTANT: ";
    c.assistant_end = t->eos_id >= 0 ? t->pieces[t->eos_id] : "";
    c.flags = CHAT_TEMPLATE_PROMPT_STRIPS_SPACE;
}

// Every special token a template writes ("<...>" in its strings other than the default
// system line, and its begin and assistant_end when they start with '<') must be a control
// or added token of the tokenizer. Returns "" or the first one missing.
inline std::string chat_template_check(Tokenizer* t) {
    ChatTemplate* c = &t->chat;
    for (int f = 1; f < CHAT_TEMPLATE_STRINGS; f++) {
        const std::string& s = *chat_template_strings(c, f);
        if (s.data() == c->default_system.data()) continue;
        for (size_t i = 0; i < s.size(); i++) {
            if (s[i] != '<') continue;
            size_t j = s.find_first_of("<> \t\r\n", i + 1), len;
            if (j == std::string::npos || s[j] != '>') continue;
            if (chat_special_at(t, s, i, &len) < 0)
                return "it writes " + s.substr(i, j + 1 - i) +
                       ", which is not a control or added token of this tokenizer";
        }
    }
    return "";
}

// Parses a tokenizer file held in memory into *t. Returns "" on success, else
// a one-line description of the first problem found (and *t is left empty).
inline std::string tokenizer_parse(Tokenizer* t, const unsigned char* data, size_t size) {
    tokenizer_free(t);
    auto fail = [&](std::string msg) {
        tokenizer_free(t);
        return msg;
    };
    auto u32_at = [&](size_t off) {
        return (uint32_t)data[off] | ((uint32_t)data[off + 1] << 8) |
               ((uint32_t)data[off + 2] << 16) | ((uint32_t)data[off + 3] << 24);
    };
    if (size == 0) return fail("empty file");
    bool magic_ok = std::memcmp(data, TOKENIZER_MAGIC, std::min(size, sizeof TOKENIZER_MAGIC)) == 0;
    if (!magic_ok) return fail("bad magic: not a tokenizer file (expected \"XWINTOKN\")");
    if (size < TOKENIZER_HEADER_BYTES_V1)
        return fail(string_format("truncated: %zu bytes, the header needs %zu", size,
                                     TOKENIZER_HEADER_BYTES_V1));
    uint32_t version = u32_at(8), kind = u32_at(12), vocab = u32_at(16), flags = u32_at(36);
    int32_t bos = (int32_t)u32_at(20), eos = (int32_t)u32_at(24), unk = (int32_t)u32_at(28),
            pad = (int32_t)u32_at(32);
    if (version != 1 && version != TOKENIZER_VERSION)
        return fail(string_format("unsupported version %u (this build reads versions 1 and %u)",
                                     version, TOKENIZER_VERSION));
    size_t header = version == 1 ? TOKENIZER_HEADER_BYTES_V1 : TOKENIZER_HEADER_BYTES;
    if (size < header)
        return fail(string_format("truncated: %zu bytes, the version %u header needs %zu", size, version, header));
    uint32_t pre_tokenizer = 0, n_merges = 0, n_added = 0;
    if (version >= 2) {
        pre_tokenizer = u32_at(40);
        n_merges = u32_at(44);
        n_added = u32_at(48);
        std::string reserved = reserved_bytes_check(data, 52, TOKENIZER_HEADER_BYTES);
        if (!reserved.empty()) return fail(reserved);
    }
    if (kind != TOKENIZER_SENTENCEPIECE_BPE && kind != TOKENIZER_BYTE_LEVEL && kind != TOKENIZER_BYTE_LEVEL_BPE)
        return fail(string_format("unknown kind %u (0 = sentencepiece bpe, 1 = byte-level, 2 = byte-level bpe)", kind));
    if (kind == TOKENIZER_BYTE_LEVEL_BPE && version < 2)
        return fail("kind 2 (byte-level bpe) needs version 2");
    size_t remaining = size - header;
    if (vocab == 0) return fail("vocab_size is 0");
    if (vocab > 0x7FFFFFFFu || (uint64_t)vocab * (TOKENIZER_RECORD_BYTES + 1) > remaining)
        return fail(string_format(
            "truncated: vocab_size %u needs at least %llu bytes of token records, %zu remain", vocab,
            (unsigned long long)vocab * (TOKENIZER_RECORD_BYTES + 1), remaining));
    uint32_t known_flags = TOKENIZER_FLAG_ADD_DUMMY_PREFIX | TOKENIZER_FLAG_BYTE_FALLBACK |
                           TOKENIZER_FLAG_INDIVIDUAL_DIGITS | TOKENIZER_FLAG_IGNORE_MERGES;
    if (flags & ~known_flags) return fail(string_format("unknown flag bits 0x%x", flags & ~known_flags));
    if (kind == TOKENIZER_BYTE_LEVEL && flags != 0)
        return fail(string_format("byte-level tokenizer with flags 0x%x (must be 0)", flags));
    uint32_t kind_flags = kind == TOKENIZER_SENTENCEPIECE_BPE   ? TOKENIZER_FLAG_ADD_DUMMY_PREFIX | TOKENIZER_FLAG_BYTE_FALLBACK
                          : kind == TOKENIZER_BYTE_LEVEL_BPE ? TOKENIZER_FLAG_INDIVIDUAL_DIGITS | TOKENIZER_FLAG_IGNORE_MERGES
                                                             : 0;
    if (flags & ~kind_flags)
        return fail(string_format("flag bits 0x%x do not belong to kind %u", flags & ~kind_flags, kind));
    if (kind == TOKENIZER_BYTE_LEVEL_BPE) {
        if (pre_tokenizer != PRETOKENIZER_GPT2 && pre_tokenizer != PRETOKENIZER_LLAMA3)
            return fail(string_format("byte-level bpe with pre_tokenizer %u (1 = gpt-2 regex, 2 = llama 3 regex)", pre_tokenizer));
    } else if (pre_tokenizer != 0 || n_merges != 0 || n_added != 0) {
        return fail(string_format("kind %u with pre_tokenizer %u, %u merges, %u added tokens (must all be 0)", kind,
                                  pre_tokenizer, n_merges, n_added));
    }

    t->kind = (int)kind;
    t->vocab_size = (int)vocab;
    t->add_dummy_prefix = (flags & TOKENIZER_FLAG_ADD_DUMMY_PREFIX) != 0;
    t->byte_fallback = (flags & TOKENIZER_FLAG_BYTE_FALLBACK) != 0;
    t->individual_digits = (flags & TOKENIZER_FLAG_INDIVIDUAL_DIGITS) != 0;
    t->ignore_merges = (flags & TOKENIZER_FLAG_IGNORE_MERGES) != 0;
    t->pre_tokenizer = (int)pre_tokenizer;
    t->pieces.resize(vocab);
    t->scores.resize(vocab);
    t->types.resize(vocab);
    t->token_byte.assign(vocab, -1);
    size_t table_size = 16;
    while (table_size < 2 * (size_t)vocab) table_size *= 2;
    t->piece_table.assign(table_size, -1);

    size_t pos = header;
    int unknown_count = 0;
    for (int id = 0; id < (int)vocab; id++) {
        if (size - pos < TOKENIZER_RECORD_BYTES)
            return fail(string_format("truncated: token %d record at offset %zu needs %zu bytes, %zu remain",
                                         id, pos, TOKENIZER_RECORD_BYTES, size - pos));
        uint32_t score_bits = u32_at(pos);
        float score;
        std::memcpy(&score, &score_bits, sizeof score);
        unsigned type = data[pos + 4];
        size_t len = (size_t)data[pos + 5] | ((size_t)data[pos + 6] << 8);
        pos += TOKENIZER_RECORD_BYTES;
        if (!std::isfinite(score)) return fail(string_format("token %d: score is not finite", id));
        if (type > TOKEN_ADDED) return fail(string_format("token %d: unknown type %u", id, type));
        if (len == 0) return fail(string_format("token %d: empty piece", id));
        if (len > size - pos)
            return fail(string_format(
                "truncated: token %d piece of %zu bytes runs past the end of the file (offset %zu, %zu bytes remain)",
                id, len, pos, size - pos));
        const char* piece = (const char*)data + pos;
        pos += len;
        if (kind == TOKENIZER_BYTE_LEVEL_BPE) {
            if (score != 0.0f) return fail(string_format("token %d: byte-level bpe score must be 0", id));
            if (type != TOKEN_NORMAL && type != TOKEN_CONTROL && type != TOKEN_ADDED)
                return fail(string_format("token %d: byte-level bpe token of type %u (0 normal, 2 control, 4 added)", id, type));
            if (type == TOKEN_NORMAL && len == 1) t->byte_ids[(unsigned char)piece[0]] = id;
        } else if (type == TOKEN_ADDED) {
            return fail(string_format("token %d: added tokens belong to kind 2", id));
        }
        bool check_utf8 = kind == TOKENIZER_BYTE_LEVEL_BPE ? type != TOKEN_NORMAL : type == TOKEN_NORMAL;
        if (check_utf8) {
            for (size_t i = 0; i < len;) {
                size_t n = tokenizer_utf8_len(piece + i, len - i);
                if (n == 0) return fail(string_format("token %d: piece is not valid UTF-8", id));
                i += n;
            }
        } else if (type == TOKEN_BYTE) {
            auto hex = [](char c) {
                return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            };
            if (len != 6 || std::memcmp(piece, "<0x", 3) != 0 || piece[5] != '>' || hex(piece[3]) < 0 ||
                hex(piece[4]) < 0)
                return fail(string_format("token %d: byte piece is not of the form <0xNN>", id));
            int b = hex(piece[3]) * 16 + hex(piece[4]);
            if (t->byte_ids[b] >= 0)
                return fail(string_format("token %d: byte <0x%02X> already defined by token %d", id, b,
                                             t->byte_ids[b]));
            t->byte_ids[b] = id;
            t->token_byte[id] = b;
        } else if (type == TOKEN_UNKNOWN) {
            unknown_count++;
        }
        size_t mask = table_size - 1, slot = tokenizer_hash(piece, len) & mask;
        for (; t->piece_table[slot] >= 0; slot = (slot + 1) & mask) {
            const std::string& other = t->pieces[t->piece_table[slot]];
            if (other.size() == len && std::memcmp(other.data(), piece, len) == 0)
                return fail(string_format("token %d: piece duplicates token %d", id, t->piece_table[slot]));
        }
        t->piece_table[slot] = id;
        t->pieces[id].assign(piece, len);
        t->scores[id] = score;
        t->types[id] = (uint8_t)type;
    }

    if (kind == TOKENIZER_BYTE_LEVEL_BPE) {
        // merges in rank order, each into the token that spells the pair
        if ((uint64_t)n_merges * 8 > size - pos)
            return fail(string_format("truncated: %u merges need %llu bytes at offset %zu, %zu remain", n_merges,
                                      (unsigned long long)n_merges * 8, pos, size - pos));
        size_t merge_table = 16;
        while (merge_table < 2 * (size_t)n_merges) merge_table *= 2;
        t->merge_keys.assign(merge_table, ~0ull);
        t->merge_ranks.assign(merge_table, -1);
        t->merge_results.assign(merge_table, -1);
        std::string joined;
        for (uint32_t rank = 0; rank < n_merges; rank++, pos += 8) {
            uint32_t left = u32_at(pos), right = u32_at(pos + 4);
            if (left >= vocab || right >= vocab)
                return fail(string_format("merge %u: token %u is out of range (vocab_size %u)", rank,
                                          left >= vocab ? left : right, vocab));
            if (t->types[left] != TOKEN_NORMAL || t->types[right] != TOKEN_NORMAL)
                return fail(string_format("merge %u: token %u is not a normal token", rank,
                                          t->types[left] != TOKEN_NORMAL ? left : right));
            joined = t->pieces[left] + t->pieces[right];
            int result = tokenizer_find_piece(t, joined.data(), joined.size());
            if (result < 0)
                return fail(string_format("merge %u: tokens %u and %u join into a piece that is not in the vocabulary",
                                          rank, left, right));
            uint64_t key = tokenizer_merge_key((int)left, (int)right);
            size_t slot = tokenizer_merge_slot(t, key);
            if (t->merge_keys[slot] == key)
                return fail(string_format("merge %u: the pair %u %u is merge %d already", rank, left, right,
                                          t->merge_ranks[slot]));
            t->merge_keys[slot] = key;
            t->merge_ranks[slot] = (int)rank;
            t->merge_results[slot] = result;
        }
        t->n_merges = (int)n_merges;
        // added tokens: every control or added token has one record, ids ascending
        if ((uint64_t)n_added * 8 > size - pos)
            return fail(string_format("truncated: %u added tokens need %llu bytes at offset %zu, %zu remain", n_added,
                                      (unsigned long long)n_added * 8, pos, size - pos));
        for (uint32_t i = 0; i < n_added; i++, pos += 8) {
            uint32_t id = u32_at(pos), added_flags = u32_at(pos + 4);
            uint32_t known = ADDED_TOKEN_LSTRIP | ADDED_TOKEN_RSTRIP | ADDED_TOKEN_NORMALIZED;
            if (id >= vocab)
                return fail(string_format("added token %u: id %u is out of range (vocab_size %u)", i, id, vocab));
            if (!t->added.empty() && (int)id <= t->added.back().id)
                return fail(string_format("added token %u: id %u does not follow id %d (ids must ascend)", i, id,
                                          t->added.back().id));
            if (t->types[id] != TOKEN_CONTROL && t->types[id] != TOKEN_ADDED)
                return fail(string_format("added token %u: token %u is neither a control nor an added token", i, id));
            if (added_flags & ~known)
                return fail(string_format("added token %u: unknown flag bits 0x%x", i, added_flags & ~known));
            t->added.push_back(AddedToken{(int)id, added_flags});
        }
        size_t n_special = 0;
        for (int id = 0; id < (int)vocab; id++) n_special += t->types[id] == TOKEN_CONTROL || t->types[id] == TOKEN_ADDED;
        if (n_special != t->added.size())
            return fail(string_format("%zu control and added tokens but %zu added-token records", n_special,
                                      t->added.size()));
        for (size_t i = 0; i < t->added.size(); i++)
            t->added_by_byte[(unsigned char)t->pieces[t->added[i].id][0]].push_back((int)i);
        for (std::vector<int>& bucket : t->added_by_byte)
            std::stable_sort(bucket.begin(), bucket.end(), [&](int a, int b) {
                return t->pieces[t->added[a].id].size() > t->pieces[t->added[b].id].size();
            });
    }
    bool has_template = size - pos >= 4 && std::memcmp(data + pos, CHAT_TEMPLATE_MAGIC, 4) == 0;
    if (has_template) {
        std::string err = chat_template_parse(&t->chat, data + pos, size - pos);
        if (!err.empty()) return fail("chat template: " + err);
        pos = size;
    }
    if (pos != size) return fail(string_format("%zu trailing bytes after the last %s record", size - pos,
                                               kind == TOKENIZER_BYTE_LEVEL_BPE ? "added-token" : "token"));

    struct NamedId { const char* name; int32_t id; };
    const NamedId specials[3] = {{"bos_id", bos}, {"eos_id", eos}, {"pad_id", pad}};
    for (const NamedId& s : specials) {
        if (s.id == -1) continue;
        if (s.id < 0 || s.id >= (int32_t)vocab)
            return fail(string_format("%s %d is out of range (vocab_size %u)", s.name, s.id, vocab));
        if (t->types[s.id] != TOKEN_CONTROL)
            return fail(string_format("%s %d is not a control token", s.name, s.id));
    }
    if (kind == TOKENIZER_SENTENCEPIECE_BPE) {
        if (unk < 0 || unk >= (int32_t)vocab)
            return fail(string_format("unk_id %d is out of range (vocab_size %u)", unk, vocab));
        if (t->types[unk] != TOKEN_UNKNOWN)
            return fail(string_format("unk_id %d is not an unknown token", unk));
        if (unknown_count != 1)
            return fail(string_format("%d unknown tokens (exactly 1 expected)", unknown_count));
        if (t->byte_fallback)
            for (int b = 0; b < 256; b++)
                if (t->byte_ids[b] < 0)
                    return fail(string_format("byte_fallback is set but byte <0x%02X> has no token", b));
    } else if (kind == TOKENIZER_BYTE_LEVEL_BPE) {
        if (unk != -1) return fail(string_format("byte-level bpe tokenizer with unk_id %d (must be -1)", unk));
    } else {
        if (unk != -1) return fail(string_format("byte-level tokenizer with unk_id %d (must be -1)", unk));
        if (vocab < 256) return fail(string_format("byte-level tokenizer with vocab_size %u < 256", vocab));
        for (int id = 0; id < (int)vocab; id++) {
            if (id < 256 && t->token_byte[id] != id)
                return fail(string_format("byte-level tokenizer: token %d must be the byte <0x%02X>", id, id));
            if (id >= 256 && t->types[id] != TOKEN_CONTROL)
                return fail(string_format("byte-level tokenizer: token %d must be a control token", id));
        }
    }
    t->bos_id = bos;
    t->eos_id = eos;
    t->unk_id = unk;
    t->pad_id = pad;
    if (!has_template) chat_template_vicuna(t);
    std::string err = chat_template_check(t);
    if (!err.empty()) return fail("chat template " + t->chat.name + ": " + err);
    return "";
}

// Reads and parses a tokenizer file. Returns "" on success, else a one-line
// description of the problem (without the path).
inline std::string tokenizer_load_checked(Tokenizer* t, const char* path) {
    tokenizer_free(t);
    FILE* f = std::fopen(path, "rb");
    if (!f) return string_format("cannot open: %s", std::strerror(errno));
    std::vector<unsigned char> data;
    unsigned char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + n);
    bool read_error = std::ferror(f) != 0;
    std::fclose(f);
    if (read_error) return "read error";
    return tokenizer_parse(t, data.data(), data.size());
}

// Loads a tokenizer file or exits with "error: <path>: <problem>".
inline void tokenizer_load(Tokenizer* t, const char* path) {
    std::string err = tokenizer_load_checked(t, path);
    if (!err.empty()) fail_file(path, "%s", err.c_str());
}

// ---- byte-level BPE (kind 2): Unicode classes, the pre-tokenizer, merges by rank

// The classes the pre-tokenizer regexes look at: \p{L}, \p{N}, \s, and everything else.
// Bytes that do not start a valid UTF-8 character are each one character of class
// "other" (as U+FFFD would be).
// The tables follow what the tokenizers package does, not Python's unicodedata (Unicode
// 14.0 in Python 3.11): its regex engine knows Unicode 16's letters (U+1C89) and its
// Digits pre-tokenizer (Rust's char::is_numeric) Unicode 17's digits (U+11DE0), hence
// a fourth table for the individual-digits split: the code points it adds to \p{N}.
enum CharClass : uint8_t { CHAR_OTHER = 0, CHAR_LETTER = 1, CHAR_NUMBER = 2, CHAR_SPACE = 3 };

// BEGIN unicode tables
// Generated by dev/make_unicode_tables.py from Python unicodedata 14.0.0, corrected to what the tokenizers package does; do not edit.
// Inclusive code point ranges, sorted: \p{L}, \p{N} and \s of the pre-tokenizer regexes,
// and the characters that the Digits pre-tokenizer (Rust's char::is_numeric) splits off
// beyond \p{N} (one range past the last code point when there are none).
static const uint32_t UNICODE_LETTER_RANGES[][2] = {  // 677 ranges
    {0x41, 0x5A}, {0x61, 0x7A}, {0xAA, 0xAA}, {0xB5, 0xB5}, {0xBA, 0xBA}, {0xC0, 0xD6},
    {0xD8, 0xF6}, {0xF8, 0x2C1}, {0x2C6, 0x2D1}, {0x2E0, 0x2E4}, {0x2EC, 0x2EC}, {0x2EE, 0x2EE},
    {0x370, 0x374}, {0x376, 0x377}, {0x37A, 0x37D}, {0x37F, 0x37F}, {0x386, 0x386}, {0x388, 0x38A},
    {0x38C, 0x38C}, {0x38E, 0x3A1}, {0x3A3, 0x3F5}, {0x3F7, 0x481}, {0x48A, 0x52F}, {0x531, 0x556},
    {0x559, 0x559}, {0x560, 0x588}, {0x5D0, 0x5EA}, {0x5EF, 0x5F2}, {0x620, 0x64A}, {0x66E, 0x66F},
    {0x671, 0x6D3}, {0x6D5, 0x6D5}, {0x6E5, 0x6E6}, {0x6EE, 0x6EF}, {0x6FA, 0x6FC}, {0x6FF, 0x6FF},
    {0x710, 0x710}, {0x712, 0x72F}, {0x74D, 0x7A5}, {0x7B1, 0x7B1}, {0x7CA, 0x7EA}, {0x7F4, 0x7F5},
    {0x7FA, 0x7FA}, {0x800, 0x815}, {0x81A, 0x81A}, {0x824, 0x824}, {0x828, 0x828}, {0x840, 0x858},
    {0x860, 0x86A}, {0x870, 0x887}, {0x889, 0x88E}, {0x8A0, 0x8C9}, {0x904, 0x939}, {0x93D, 0x93D},
    {0x950, 0x950}, {0x958, 0x961}, {0x971, 0x980}, {0x985, 0x98C}, {0x98F, 0x990}, {0x993, 0x9A8},
    {0x9AA, 0x9B0}, {0x9B2, 0x9B2}, {0x9B6, 0x9B9}, {0x9BD, 0x9BD}, {0x9CE, 0x9CE}, {0x9DC, 0x9DD},
    {0x9DF, 0x9E1}, {0x9F0, 0x9F1}, {0x9FC, 0x9FC}, {0xA05, 0xA0A}, {0xA0F, 0xA10}, {0xA13, 0xA28},
    {0xA2A, 0xA30}, {0xA32, 0xA33}, {0xA35, 0xA36}, {0xA38, 0xA39}, {0xA59, 0xA5C}, {0xA5E, 0xA5E},
    {0xA72, 0xA74}, {0xA85, 0xA8D}, {0xA8F, 0xA91}, {0xA93, 0xAA8}, {0xAAA, 0xAB0}, {0xAB2, 0xAB3},
    {0xAB5, 0xAB9}, {0xABD, 0xABD}, {0xAD0, 0xAD0}, {0xAE0, 0xAE1}, {0xAF9, 0xAF9}, {0xB05, 0xB0C},
    {0xB0F, 0xB10}, {0xB13, 0xB28}, {0xB2A, 0xB30}, {0xB32, 0xB33}, {0xB35, 0xB39}, {0xB3D, 0xB3D},
    {0xB5C, 0xB5D}, {0xB5F, 0xB61}, {0xB71, 0xB71}, {0xB83, 0xB83}, {0xB85, 0xB8A}, {0xB8E, 0xB90},
    {0xB92, 0xB95}, {0xB99, 0xB9A}, {0xB9C, 0xB9C}, {0xB9E, 0xB9F}, {0xBA3, 0xBA4}, {0xBA8, 0xBAA},
    {0xBAE, 0xBB9}, {0xBD0, 0xBD0}, {0xC05, 0xC0C}, {0xC0E, 0xC10}, {0xC12, 0xC28}, {0xC2A, 0xC39},
    {0xC3D, 0xC3D}, {0xC58, 0xC5A}, {0xC5D, 0xC5D}, {0xC60, 0xC61}, {0xC80, 0xC80}, {0xC85, 0xC8C},
    {0xC8E, 0xC90}, {0xC92, 0xCA8}, {0xCAA, 0xCB3}, {0xCB5, 0xCB9}, {0xCBD, 0xCBD}, {0xCDD, 0xCDE},
    {0xCE0, 0xCE1}, {0xCF1, 0xCF2}, {0xD04, 0xD0C}, {0xD0E, 0xD10}, {0xD12, 0xD3A}, {0xD3D, 0xD3D},
    {0xD4E, 0xD4E}, {0xD54, 0xD56}, {0xD5F, 0xD61}, {0xD7A, 0xD7F}, {0xD85, 0xD96}, {0xD9A, 0xDB1},
    {0xDB3, 0xDBB}, {0xDBD, 0xDBD}, {0xDC0, 0xDC6}, {0xE01, 0xE30}, {0xE32, 0xE33}, {0xE40, 0xE46},
    {0xE81, 0xE82}, {0xE84, 0xE84}, {0xE86, 0xE8A}, {0xE8C, 0xEA3}, {0xEA5, 0xEA5}, {0xEA7, 0xEB0},
    {0xEB2, 0xEB3}, {0xEBD, 0xEBD}, {0xEC0, 0xEC4}, {0xEC6, 0xEC6}, {0xEDC, 0xEDF}, {0xF00, 0xF00},
    {0xF40, 0xF47}, {0xF49, 0xF6C}, {0xF88, 0xF8C}, {0x1000, 0x102A}, {0x103F, 0x103F}, {0x1050, 0x1055},
    {0x105A, 0x105D}, {0x1061, 0x1061}, {0x1065, 0x1066}, {0x106E, 0x1070}, {0x1075, 0x1081}, {0x108E, 0x108E},
    {0x10A0, 0x10C5}, {0x10C7, 0x10C7}, {0x10CD, 0x10CD}, {0x10D0, 0x10FA}, {0x10FC, 0x1248}, {0x124A, 0x124D},
    {0x1250, 0x1256}, {0x1258, 0x1258}, {0x125A, 0x125D}, {0x1260, 0x1288}, {0x128A, 0x128D}, {0x1290, 0x12B0},
    {0x12B2, 0x12B5}, {0x12B8, 0x12BE}, {0x12C0, 0x12C0}, {0x12C2, 0x12C5}, {0x12C8, 0x12D6}, {0x12D8, 0x1310},
    {0x1312, 0x1315}, {0x1318, 0x135A}, {0x1380, 0x138F}, {0x13A0, 0x13F5}, {0x13F8, 0x13FD}, {0x1401, 0x166C},
    {0x166F, 0x167F}, {0x1681, 0x169A}, {0x16A0, 0x16EA}, {0x16F1, 0x16F8}, {0x1700, 0x1711}, {0x171F, 0x1731},
    {0x1740, 0x1751}, {0x1760, 0x176C}, {0x176E, 0x1770}, {0x1780, 0x17B3}, {0x17D7, 0x17D7}, {0x17DC, 0x17DC},
    {0x1820, 0x1878}, {0x1880, 0x1884}, {0x1887, 0x18A8}, {0x18AA, 0x18AA}, {0x18B0, 0x18F5}, {0x1900, 0x191E},
    {0x1950, 0x196D}, {0x1970, 0x1974}, {0x1980, 0x19AB}, {0x19B0, 0x19C9}, {0x1A00, 0x1A16}, {0x1A20, 0x1A54},
    {0x1AA7, 0x1AA7}, {0x1B05, 0x1B33}, {0x1B45, 0x1B4C}, {0x1B83, 0x1BA0}, {0x1BAE, 0x1BAF}, {0x1BBA, 0x1BE5},
    {0x1C00, 0x1C23}, {0x1C4D, 0x1C4F}, {0x1C5A, 0x1C7D}, {0x1C80, 0x1C8A}, {0x1C90, 0x1CBA}, {0x1CBD, 0x1CBF},
    {0x1CE9, 0x1CEC}, {0x1CEE, 0x1CF3}, {0x1CF5, 0x1CF6}, {0x1CFA, 0x1CFA}, {0x1D00, 0x1DBF}, {0x1E00, 0x1F15},
    {0x1F18, 0x1F1D}, {0x1F20, 0x1F45}, {0x1F48, 0x1F4D}, {0x1F50, 0x1F57}, {0x1F59, 0x1F59}, {0x1F5B, 0x1F5B},
    {0x1F5D, 0x1F5D}, {0x1F5F, 0x1F7D}, {0x1F80, 0x1FB4}, {0x1FB6, 0x1FBC}, {0x1FBE, 0x1FBE}, {0x1FC2, 0x1FC4},
    {0x1FC6, 0x1FCC}, {0x1FD0, 0x1FD3}, {0x1FD6, 0x1FDB}, {0x1FE0, 0x1FEC}, {0x1FF2, 0x1FF4}, {0x1FF6, 0x1FFC},
    {0x2071, 0x2071}, {0x207F, 0x207F}, {0x2090, 0x209C}, {0x2102, 0x2102}, {0x2107, 0x2107}, {0x210A, 0x2113},
    {0x2115, 0x2115}, {0x2119, 0x211D}, {0x2124, 0x2124}, {0x2126, 0x2126}, {0x2128, 0x2128}, {0x212A, 0x212D},
    {0x212F, 0x2139}, {0x213C, 0x213F}, {0x2145, 0x2149}, {0x214E, 0x214E}, {0x2183, 0x2184}, {0x2C00, 0x2CE4},
    {0x2CEB, 0x2CEE}, {0x2CF2, 0x2CF3}, {0x2D00, 0x2D25}, {0x2D27, 0x2D27}, {0x2D2D, 0x2D2D}, {0x2D30, 0x2D67},
    {0x2D6F, 0x2D6F}, {0x2D80, 0x2D96}, {0x2DA0, 0x2DA6}, {0x2DA8, 0x2DAE}, {0x2DB0, 0x2DB6}, {0x2DB8, 0x2DBE},
    {0x2DC0, 0x2DC6}, {0x2DC8, 0x2DCE}, {0x2DD0, 0x2DD6}, {0x2DD8, 0x2DDE}, {0x2E2F, 0x2E2F}, {0x3005, 0x3006},
    {0x3031, 0x3035}, {0x303B, 0x303C}, {0x3041, 0x3096}, {0x309D, 0x309F}, {0x30A1, 0x30FA}, {0x30FC, 0x30FF},
    {0x3105, 0x312F}, {0x3131, 0x318E}, {0x31A0, 0x31BF}, {0x31F0, 0x31FF}, {0x3400, 0x4DBF}, {0x4E00, 0xA48C},
    {0xA4D0, 0xA4FD}, {0xA500, 0xA60C}, {0xA610, 0xA61F}, {0xA62A, 0xA62B}, {0xA640, 0xA66E}, {0xA67F, 0xA69D},
    {0xA6A0, 0xA6E5}, {0xA717, 0xA71F}, {0xA722, 0xA788}, {0xA78B, 0xA7CD}, {0xA7D0, 0xA7D1}, {0xA7D3, 0xA7D3},
    {0xA7D5, 0xA7DC}, {0xA7F2, 0xA801}, {0xA803, 0xA805}, {0xA807, 0xA80A}, {0xA80C, 0xA822}, {0xA840, 0xA873},
    {0xA882, 0xA8B3}, {0xA8F2, 0xA8F7}, {0xA8FB, 0xA8FB}, {0xA8FD, 0xA8FE}, {0xA90A, 0xA925}, {0xA930, 0xA946},
    {0xA960, 0xA97C}, {0xA984, 0xA9B2}, {0xA9CF, 0xA9CF}, {0xA9E0, 0xA9E4}, {0xA9E6, 0xA9EF}, {0xA9FA, 0xA9FE},
    {0xAA00, 0xAA28}, {0xAA40, 0xAA42}, {0xAA44, 0xAA4B}, {0xAA60, 0xAA76}, {0xAA7A, 0xAA7A}, {0xAA7E, 0xAAAF},
    {0xAAB1, 0xAAB1}, {0xAAB5, 0xAAB6}, {0xAAB9, 0xAABD}, {0xAAC0, 0xAAC0}, {0xAAC2, 0xAAC2}, {0xAADB, 0xAADD},
    {0xAAE0, 0xAAEA}, {0xAAF2, 0xAAF4}, {0xAB01, 0xAB06}, {0xAB09, 0xAB0E}, {0xAB11, 0xAB16}, {0xAB20, 0xAB26},
    {0xAB28, 0xAB2E}, {0xAB30, 0xAB5A}, {0xAB5C, 0xAB69}, {0xAB70, 0xABE2}, {0xAC00, 0xD7A3}, {0xD7B0, 0xD7C6},
    {0xD7CB, 0xD7FB}, {0xF900, 0xFA6D}, {0xFA70, 0xFAD9}, {0xFB00, 0xFB06}, {0xFB13, 0xFB17}, {0xFB1D, 0xFB1D},
    {0xFB1F, 0xFB28}, {0xFB2A, 0xFB36}, {0xFB38, 0xFB3C}, {0xFB3E, 0xFB3E}, {0xFB40, 0xFB41}, {0xFB43, 0xFB44},
    {0xFB46, 0xFBB1}, {0xFBD3, 0xFD3D}, {0xFD50, 0xFD8F}, {0xFD92, 0xFDC7}, {0xFDF0, 0xFDFB}, {0xFE70, 0xFE74},
    {0xFE76, 0xFEFC}, {0xFF21, 0xFF3A}, {0xFF41, 0xFF5A}, {0xFF66, 0xFFBE}, {0xFFC2, 0xFFC7}, {0xFFCA, 0xFFCF},
    {0xFFD2, 0xFFD7}, {0xFFDA, 0xFFDC}, {0x10000, 0x1000B}, {0x1000D, 0x10026}, {0x10028, 0x1003A}, {0x1003C, 0x1003D},
    {0x1003F, 0x1004D}, {0x10050, 0x1005D}, {0x10080, 0x100FA}, {0x10280, 0x1029C}, {0x102A0, 0x102D0}, {0x10300, 0x1031F},
    {0x1032D, 0x10340}, {0x10342, 0x10349}, {0x10350, 0x10375}, {0x10380, 0x1039D}, {0x103A0, 0x103C3}, {0x103C8, 0x103CF},
    {0x10400, 0x1049D}, {0x104B0, 0x104D3}, {0x104D8, 0x104FB}, {0x10500, 0x10527}, {0x10530, 0x10563}, {0x10570, 0x1057A},
    {0x1057C, 0x1058A}, {0x1058C, 0x10592}, {0x10594, 0x10595}, {0x10597, 0x105A1}, {0x105A3, 0x105B1}, {0x105B3, 0x105B9},
    {0x105BB, 0x105BC}, {0x105C0, 0x105F3}, {0x10600, 0x10736}, {0x10740, 0x10755}, {0x10760, 0x10767}, {0x10780, 0x10785},
    {0x10787, 0x107B0}, {0x107B2, 0x107BA}, {0x10800, 0x10805}, {0x10808, 0x10808}, {0x1080A, 0x10835}, {0x10837, 0x10838},
    {0x1083C, 0x1083C}, {0x1083F, 0x10855}, {0x10860, 0x10876}, {0x10880, 0x1089E}, {0x108E0, 0x108F2}, {0x108F4, 0x108F5},
    {0x10900, 0x10915}, {0x10920, 0x10939}, {0x10980, 0x109B7}, {0x109BE, 0x109BF}, {0x10A00, 0x10A00}, {0x10A10, 0x10A13},
    {0x10A15, 0x10A17}, {0x10A19, 0x10A35}, {0x10A60, 0x10A7C}, {0x10A80, 0x10A9C}, {0x10AC0, 0x10AC7}, {0x10AC9, 0x10AE4},
    {0x10B00, 0x10B35}, {0x10B40, 0x10B55}, {0x10B60, 0x10B72}, {0x10B80, 0x10B91}, {0x10C00, 0x10C48}, {0x10C80, 0x10CB2},
    {0x10CC0, 0x10CF2}, {0x10D00, 0x10D23}, {0x10D4A, 0x10D65}, {0x10D6F, 0x10D85}, {0x10E80, 0x10EA9}, {0x10EB0, 0x10EB1},
    {0x10EC2, 0x10EC4}, {0x10F00, 0x10F1C}, {0x10F27, 0x10F27}, {0x10F30, 0x10F45}, {0x10F70, 0x10F81}, {0x10FB0, 0x10FC4},
    {0x10FE0, 0x10FF6}, {0x11003, 0x11037}, {0x11071, 0x11072}, {0x11075, 0x11075}, {0x11083, 0x110AF}, {0x110D0, 0x110E8},
    {0x11103, 0x11126}, {0x11144, 0x11144}, {0x11147, 0x11147}, {0x11150, 0x11172}, {0x11176, 0x11176}, {0x11183, 0x111B2},
    {0x111C1, 0x111C4}, {0x111DA, 0x111DA}, {0x111DC, 0x111DC}, {0x11200, 0x11211}, {0x11213, 0x1122B}, {0x1123F, 0x11240},
    {0x11280, 0x11286}, {0x11288, 0x11288}, {0x1128A, 0x1128D}, {0x1128F, 0x1129D}, {0x1129F, 0x112A8}, {0x112B0, 0x112DE},
    {0x11305, 0x1130C}, {0x1130F, 0x11310}, {0x11313, 0x11328}, {0x1132A, 0x11330}, {0x11332, 0x11333}, {0x11335, 0x11339},
    {0x1133D, 0x1133D}, {0x11350, 0x11350}, {0x1135D, 0x11361}, {0x11380, 0x11389}, {0x1138B, 0x1138B}, {0x1138E, 0x1138E},
    {0x11390, 0x113B5}, {0x113B7, 0x113B7}, {0x113D1, 0x113D1}, {0x113D3, 0x113D3}, {0x11400, 0x11434}, {0x11447, 0x1144A},
    {0x1145F, 0x11461}, {0x11480, 0x114AF}, {0x114C4, 0x114C5}, {0x114C7, 0x114C7}, {0x11580, 0x115AE}, {0x115D8, 0x115DB},
    {0x11600, 0x1162F}, {0x11644, 0x11644}, {0x11680, 0x116AA}, {0x116B8, 0x116B8}, {0x11700, 0x1171A}, {0x11740, 0x11746},
    {0x11800, 0x1182B}, {0x118A0, 0x118DF}, {0x118FF, 0x11906}, {0x11909, 0x11909}, {0x1190C, 0x11913}, {0x11915, 0x11916},
    {0x11918, 0x1192F}, {0x1193F, 0x1193F}, {0x11941, 0x11941}, {0x119A0, 0x119A7}, {0x119AA, 0x119D0}, {0x119E1, 0x119E1},
    {0x119E3, 0x119E3}, {0x11A00, 0x11A00}, {0x11A0B, 0x11A32}, {0x11A3A, 0x11A3A}, {0x11A50, 0x11A50}, {0x11A5C, 0x11A89},
    {0x11A9D, 0x11A9D}, {0x11AB0, 0x11AF8}, {0x11BC0, 0x11BE0}, {0x11C00, 0x11C08}, {0x11C0A, 0x11C2E}, {0x11C40, 0x11C40},
    {0x11C72, 0x11C8F}, {0x11D00, 0x11D06}, {0x11D08, 0x11D09}, {0x11D0B, 0x11D30}, {0x11D46, 0x11D46}, {0x11D60, 0x11D65},
    {0x11D67, 0x11D68}, {0x11D6A, 0x11D89}, {0x11D98, 0x11D98}, {0x11EE0, 0x11EF2}, {0x11F02, 0x11F02}, {0x11F04, 0x11F10},
    {0x11F12, 0x11F33}, {0x11FB0, 0x11FB0}, {0x12000, 0x12399}, {0x12480, 0x12543}, {0x12F90, 0x12FF0}, {0x13000, 0x1342F},
    {0x13441, 0x13446}, {0x13460, 0x143FA}, {0x14400, 0x14646}, {0x16100, 0x1611D}, {0x16800, 0x16A38}, {0x16A40, 0x16A5E},
    {0x16A70, 0x16ABE}, {0x16AD0, 0x16AED}, {0x16B00, 0x16B2F}, {0x16B40, 0x16B43}, {0x16B63, 0x16B77}, {0x16B7D, 0x16B8F},
    {0x16D40, 0x16D6C}, {0x16E40, 0x16E7F}, {0x16F00, 0x16F4A}, {0x16F50, 0x16F50}, {0x16F93, 0x16F9F}, {0x16FE0, 0x16FE1},
    {0x16FE3, 0x16FE3}, {0x17000, 0x187F7}, {0x18800, 0x18CD5}, {0x18CFF, 0x18D08}, {0x1AFF0, 0x1AFF3}, {0x1AFF5, 0x1AFFB},
    {0x1AFFD, 0x1AFFE}, {0x1B000, 0x1B122}, {0x1B132, 0x1B132}, {0x1B150, 0x1B152}, {0x1B155, 0x1B155}, {0x1B164, 0x1B167},
    {0x1B170, 0x1B2FB}, {0x1BC00, 0x1BC6A}, {0x1BC70, 0x1BC7C}, {0x1BC80, 0x1BC88}, {0x1BC90, 0x1BC99}, {0x1D400, 0x1D454},
    {0x1D456, 0x1D49C}, {0x1D49E, 0x1D49F}, {0x1D4A2, 0x1D4A2}, {0x1D4A5, 0x1D4A6}, {0x1D4A9, 0x1D4AC}, {0x1D4AE, 0x1D4B9},
    {0x1D4BB, 0x1D4BB}, {0x1D4BD, 0x1D4C3}, {0x1D4C5, 0x1D505}, {0x1D507, 0x1D50A}, {0x1D50D, 0x1D514}, {0x1D516, 0x1D51C},
    {0x1D51E, 0x1D539}, {0x1D53B, 0x1D53E}, {0x1D540, 0x1D544}, {0x1D546, 0x1D546}, {0x1D54A, 0x1D550}, {0x1D552, 0x1D6A5},
    {0x1D6A8, 0x1D6C0}, {0x1D6C2, 0x1D6DA}, {0x1D6DC, 0x1D6FA}, {0x1D6FC, 0x1D714}, {0x1D716, 0x1D734}, {0x1D736, 0x1D74E},
    {0x1D750, 0x1D76E}, {0x1D770, 0x1D788}, {0x1D78A, 0x1D7A8}, {0x1D7AA, 0x1D7C2}, {0x1D7C4, 0x1D7CB}, {0x1DF00, 0x1DF1E},
    {0x1DF25, 0x1DF2A}, {0x1E030, 0x1E06D}, {0x1E100, 0x1E12C}, {0x1E137, 0x1E13D}, {0x1E14E, 0x1E14E}, {0x1E290, 0x1E2AD},
    {0x1E2C0, 0x1E2EB}, {0x1E4D0, 0x1E4EB}, {0x1E5D0, 0x1E5ED}, {0x1E5F0, 0x1E5F0}, {0x1E7E0, 0x1E7E6}, {0x1E7E8, 0x1E7EB},
    {0x1E7ED, 0x1E7EE}, {0x1E7F0, 0x1E7FE}, {0x1E800, 0x1E8C4}, {0x1E900, 0x1E943}, {0x1E94B, 0x1E94B}, {0x1EE00, 0x1EE03},
    {0x1EE05, 0x1EE1F}, {0x1EE21, 0x1EE22}, {0x1EE24, 0x1EE24}, {0x1EE27, 0x1EE27}, {0x1EE29, 0x1EE32}, {0x1EE34, 0x1EE37},
    {0x1EE39, 0x1EE39}, {0x1EE3B, 0x1EE3B}, {0x1EE42, 0x1EE42}, {0x1EE47, 0x1EE47}, {0x1EE49, 0x1EE49}, {0x1EE4B, 0x1EE4B},
    {0x1EE4D, 0x1EE4F}, {0x1EE51, 0x1EE52}, {0x1EE54, 0x1EE54}, {0x1EE57, 0x1EE57}, {0x1EE59, 0x1EE59}, {0x1EE5B, 0x1EE5B},
    {0x1EE5D, 0x1EE5D}, {0x1EE5F, 0x1EE5F}, {0x1EE61, 0x1EE62}, {0x1EE64, 0x1EE64}, {0x1EE67, 0x1EE6A}, {0x1EE6C, 0x1EE72},
    {0x1EE74, 0x1EE77}, {0x1EE79, 0x1EE7C}, {0x1EE7E, 0x1EE7E}, {0x1EE80, 0x1EE89}, {0x1EE8B, 0x1EE9B}, {0x1EEA1, 0x1EEA3},
    {0x1EEA5, 0x1EEA9}, {0x1EEAB, 0x1EEBB}, {0x20000, 0x2A6DF}, {0x2A700, 0x2B739}, {0x2B740, 0x2B81D}, {0x2B820, 0x2CEA1},
    {0x2CEB0, 0x2EBE0}, {0x2EBF0, 0x2EE5D}, {0x2F800, 0x2FA1D}, {0x30000, 0x3134A}, {0x31350, 0x323AF},
};
static const uint32_t UNICODE_NUMBER_RANGES[][2] = {  // 144 ranges
    {0x30, 0x39}, {0xB2, 0xB3}, {0xB9, 0xB9}, {0xBC, 0xBE}, {0x660, 0x669}, {0x6F0, 0x6F9},
    {0x7C0, 0x7C9}, {0x966, 0x96F}, {0x9E6, 0x9EF}, {0x9F4, 0x9F9}, {0xA66, 0xA6F}, {0xAE6, 0xAEF},
    {0xB66, 0xB6F}, {0xB72, 0xB77}, {0xBE6, 0xBF2}, {0xC66, 0xC6F}, {0xC78, 0xC7E}, {0xCE6, 0xCEF},
    {0xD58, 0xD5E}, {0xD66, 0xD78}, {0xDE6, 0xDEF}, {0xE50, 0xE59}, {0xED0, 0xED9}, {0xF20, 0xF33},
    {0x1040, 0x1049}, {0x1090, 0x1099}, {0x1369, 0x137C}, {0x16EE, 0x16F0}, {0x17E0, 0x17E9}, {0x17F0, 0x17F9},
    {0x1810, 0x1819}, {0x1946, 0x194F}, {0x19D0, 0x19DA}, {0x1A80, 0x1A89}, {0x1A90, 0x1A99}, {0x1B50, 0x1B59},
    {0x1BB0, 0x1BB9}, {0x1C40, 0x1C49}, {0x1C50, 0x1C59}, {0x2070, 0x2070}, {0x2074, 0x2079}, {0x2080, 0x2089},
    {0x2150, 0x2182}, {0x2185, 0x2189}, {0x2460, 0x249B}, {0x24EA, 0x24FF}, {0x2776, 0x2793}, {0x2CFD, 0x2CFD},
    {0x3007, 0x3007}, {0x3021, 0x3029}, {0x3038, 0x303A}, {0x3192, 0x3195}, {0x3220, 0x3229}, {0x3248, 0x324F},
    {0x3251, 0x325F}, {0x3280, 0x3289}, {0x32B1, 0x32BF}, {0xA620, 0xA629}, {0xA6E6, 0xA6EF}, {0xA830, 0xA835},
    {0xA8D0, 0xA8D9}, {0xA900, 0xA909}, {0xA9D0, 0xA9D9}, {0xA9F0, 0xA9F9}, {0xAA50, 0xAA59}, {0xABF0, 0xABF9},
    {0xFF10, 0xFF19}, {0x10107, 0x10133}, {0x10140, 0x10178}, {0x1018A, 0x1018B}, {0x102E1, 0x102FB}, {0x10320, 0x10323},
    {0x10341, 0x10341}, {0x1034A, 0x1034A}, {0x103D1, 0x103D5}, {0x104A0, 0x104A9}, {0x10858, 0x1085F}, {0x10879, 0x1087F},
    {0x108A7, 0x108AF}, {0x108FB, 0x108FF}, {0x10916, 0x1091B}, {0x109BC, 0x109BD}, {0x109C0, 0x109CF}, {0x109D2, 0x109FF},
    {0x10A40, 0x10A48}, {0x10A7D, 0x10A7E}, {0x10A9D, 0x10A9F}, {0x10AEB, 0x10AEF}, {0x10B58, 0x10B5F}, {0x10B78, 0x10B7F},
    {0x10BA9, 0x10BAF}, {0x10CFA, 0x10CFF}, {0x10D30, 0x10D39}, {0x10D40, 0x10D49}, {0x10E60, 0x10E7E}, {0x10F1D, 0x10F26},
    {0x10F51, 0x10F54}, {0x10FC5, 0x10FCB}, {0x11052, 0x1106F}, {0x110F0, 0x110F9}, {0x11136, 0x1113F}, {0x111D0, 0x111D9},
    {0x111E1, 0x111F4}, {0x112F0, 0x112F9}, {0x11450, 0x11459}, {0x114D0, 0x114D9}, {0x11650, 0x11659}, {0x116C0, 0x116C9},
    {0x116D0, 0x116E3}, {0x11730, 0x1173B}, {0x118E0, 0x118F2}, {0x11950, 0x11959}, {0x11BF0, 0x11BF9}, {0x11C50, 0x11C6C},
    {0x11D50, 0x11D59}, {0x11DA0, 0x11DA9}, {0x11F50, 0x11F59}, {0x11FC0, 0x11FD4}, {0x12400, 0x1246E}, {0x16130, 0x16139},
    {0x16A60, 0x16A69}, {0x16AC0, 0x16AC9}, {0x16B50, 0x16B59}, {0x16B5B, 0x16B61}, {0x16D70, 0x16D79}, {0x16E80, 0x16E96},
    {0x1CCF0, 0x1CCF9}, {0x1D2C0, 0x1D2D3}, {0x1D2E0, 0x1D2F3}, {0x1D360, 0x1D378}, {0x1D7CE, 0x1D7FF}, {0x1E140, 0x1E149},
    {0x1E2F0, 0x1E2F9}, {0x1E4F0, 0x1E4F9}, {0x1E5F1, 0x1E5FA}, {0x1E8C7, 0x1E8CF}, {0x1E950, 0x1E959}, {0x1EC71, 0x1ECAB},
    {0x1ECAD, 0x1ECAF}, {0x1ECB1, 0x1ECB4}, {0x1ED01, 0x1ED2D}, {0x1ED2F, 0x1ED3D}, {0x1F100, 0x1F10C}, {0x1FBF0, 0x1FBF9},
};
static const uint32_t UNICODE_SPACE_RANGES[][2] = {  // 10 ranges
    {0x9, 0xD}, {0x20, 0x20}, {0x85, 0x85}, {0xA0, 0xA0}, {0x1680, 0x1680}, {0x2000, 0x200A},
    {0x2028, 0x2029}, {0x202F, 0x202F}, {0x205F, 0x205F}, {0x3000, 0x3000},
};
static const uint32_t UNICODE_NUMERIC_EXTRA_RANGES[][2] = {  // 2 ranges
    {0x11DE0, 0x11DE9}, {0x16FF4, 0x16FF6},
};
// END unicode tables

inline bool unicode_in(const uint32_t (*ranges)[2], size_t n, uint32_t cp) {
    size_t lo = 0, hi = n;  // first range whose end is >= cp
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (ranges[mid][1] < cp) lo = mid + 1;
        else hi = mid;
    }
    return lo < n && ranges[lo][0] <= cp;
}

inline CharClass unicode_class(uint32_t cp) {
    if (cp < 0x80) {
        if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') return CHAR_LETTER;
        if (cp >= '0' && cp <= '9') return CHAR_NUMBER;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return CHAR_SPACE;
        return CHAR_OTHER;
    }
    auto in = [&](const uint32_t (*r)[2], size_t bytes) { return unicode_in(r, bytes / sizeof r[0], cp); };
    if (in(UNICODE_LETTER_RANGES, sizeof UNICODE_LETTER_RANGES)) return CHAR_LETTER;
    if (in(UNICODE_NUMBER_RANGES, sizeof UNICODE_NUMBER_RANGES)) return CHAR_NUMBER;
    if (in(UNICODE_SPACE_RANGES, sizeof UNICODE_SPACE_RANGES)) return CHAR_SPACE;
    return CHAR_OTHER;
}

// Whether the Digits pre-tokenizer splits cp off on its own (Rust's char::is_numeric):
// \p{N} and the newer digits of UNICODE_NUMERIC_EXTRA_RANGES.
inline bool unicode_is_numeric(uint32_t cp) {
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    auto in = [&](const uint32_t (*r)[2], size_t bytes) { return unicode_in(r, bytes / sizeof r[0], cp); };
    return in(UNICODE_NUMBER_RANGES, sizeof UNICODE_NUMBER_RANGES) || in(UNICODE_NUMERIC_EXTRA_RANGES, sizeof UNICODE_NUMERIC_EXTRA_RANGES);
}

// The text as characters: code point, class and byte offset of each (offset has one
// more entry, the end). An invalid byte is the code point 0xFFFD of class other.
struct CharSpan {
    std::vector<uint32_t> cp;
    std::vector<uint8_t> cls;
    std::vector<size_t> offset;
};

// The character at text[0..len): its length in bytes (1..4) and code point, or length 1
// and U+FFFD for a byte that starts no valid character.
inline size_t unicode_char_at(const char* text, size_t len, uint32_t* cp) {
    const unsigned char* s = (const unsigned char*)text;
    size_t n = tokenizer_utf8_len(text, len);
    if (n == 1) *cp = s[0];
    else if (n == 2) *cp = ((s[0] & 0x1Fu) << 6) | (s[1] & 0x3Fu);
    else if (n == 3) *cp = ((s[0] & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu);
    else if (n == 4) *cp = ((s[0] & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3Fu);
    else *cp = 0xFFFD;
    return n == 0 ? 1 : n;
}

inline void unicode_chars(const char* text, size_t len, CharSpan* out) {
    out->cp.clear();
    out->cls.clear();
    out->offset.clear();
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t n = unicode_char_at(text + i, len - i, &cp);
        out->cp.push_back(cp);
        out->cls.push_back(unicode_class(cp));  // U+FFFD is "other", as an invalid byte must be
        out->offset.push_back(i);
        i += n;
    }
    out->offset.push_back(len);
}

// The end of the pre-token that starts at character i of c[.., n): the first of the
// regex's alternatives that matches there, as the regex engine would find it.
//   GPT-2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   Llama 3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//            ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// One of the alternatives always matches at least one character.
inline size_t pretoken_end(const CharSpan& c, size_t i, size_t n, int pattern) {
    auto run = [&](size_t k, uint8_t cls) {
        while (k < n && c.cls[k] == cls) k++;
        return k;
    };
    auto newline = [&](size_t k) { return c.cp[k] == '\r' || c.cp[k] == '\n'; };
    bool llama3 = pattern == PRETOKENIZER_LLAMA3;
    // the contractions; Llama 3 matches them in any case ((?i): 'S, 'ſ for 's)
    if (c.cp[i] == '\'' && i + 1 < n) {
        auto fold = [&](uint32_t cp) -> uint32_t {
            if (!llama3) return cp;
            if (cp == 0x17F) return 's';  // LATIN SMALL LETTER LONG S folds to s
            return cp < 0x80 && cp >= 'A' && cp <= 'Z' ? cp + 32 : cp;
        };
        uint32_t a = fold(c.cp[i + 1]);
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if (i + 2 < n) {
            uint32_t b = fold(c.cp[i + 2]);
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
        }
    }
    uint8_t here = c.cls[i], next = i + 1 < n ? c.cls[i + 1] : (uint8_t)CHAR_OTHER;
    bool has_next = i + 1 < n;
    if (!llama3) {
        // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': a run of one class after an optional space
        if (here == CHAR_LETTER || here == CHAR_NUMBER || here == CHAR_OTHER) return run(i, here);
        if (c.cp[i] == ' ' && has_next && next != CHAR_SPACE) return run(i + 1, next);
    } else {
        // '[^\r\n\p{L}\p{N}]?\p{L}+'
        if (here == CHAR_LETTER) return run(i, CHAR_LETTER);
        if (here != CHAR_NUMBER && !newline(i) && has_next && next == CHAR_LETTER) return run(i + 1, CHAR_LETTER);
        // '\p{N}{1,3}'
        if (here == CHAR_NUMBER) {
            size_t k = i + 1;
            while (k < n && k < i + 3 && c.cls[k] == CHAR_NUMBER) k++;
            return k;
        }
        // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        size_t s = c.cp[i] == ' ' && has_next && next == CHAR_OTHER ? i + 1 : i;
        if (c.cls[s] == CHAR_OTHER) {
            size_t k = run(s, CHAR_OTHER);
            while (k < n && newline(k)) k++;
            return k;
        }
    }
    // whitespace from here on
    size_t k = run(i, CHAR_SPACE);
    if (llama3)  // '\s*[\r\n]+': the run up to its last \r or \n
        for (size_t p = k; p > i; p--)
            if (newline(p - 1)) return p;
    if (k == n) return k;          // '\s+(?!\S)' at the end
    if (k - i >= 2) return k - 1;  // '\s+(?!\S)': leave the last space to the next word
    return k;                      // '\s+'
}

// Calls emit(begin, end) with the byte range of each pre-token of c's characters
// [from, to), in order: the individual-digits split first when set (each numeric
// character alone), then the regex within each of the pieces between digits.
template <typename Emit>
inline void pretokenize(const Tokenizer* t, const CharSpan& c, size_t from, size_t to, Emit emit) {
    auto regex_pieces = [&](size_t a, size_t b) {
        for (size_t i = a; i < b;) {
            size_t e = pretoken_end(c, i, b, t->pre_tokenizer);
            emit(c.offset[i], c.offset[e]);
            i = e;
        }
    };
    if (!t->individual_digits) {
        regex_pieces(from, to);
        return;
    }
    size_t start = from;
    for (size_t i = from; i < to; i++) {
        if (!unicode_is_numeric(c.cp[i])) continue;
        regex_pieces(start, i);
        emit(c.offset[i], c.offset[i + 1]);
        start = i + 1;
    }
    regex_pieces(start, to);
}

// Scratch space of bpe_encode_word, reused across the pre-tokens of one text.
struct BpeScratch {
    struct Symbol {
        int id;
        int prev, next;  // neighbours in the word, -1 at the ends
    };
    struct Candidate {  // a pair that a merge may join; top of the queue: lowest rank, then leftmost
        int rank, left, left_id, right_id, result;
        bool operator<(const Candidate& o) const { return rank > o.rank || (rank == o.rank && left > o.left); }
    };
    std::vector<Symbol> symbols;
    std::vector<Candidate> queue;
};

// Appends the ids of one pre-token's bytes s[0..n): with ignore_merges a pre-token
// that is a normal piece is that token; otherwise start from one token per byte and
// apply merges by rank, the lowest-ranked pair present first (ties: leftmost), until
// no pair of neighbours has a merge (as tokenizers' Word::merge_all).
inline void bpe_encode_word(const Tokenizer* t, const char* s, size_t n, BpeScratch* w, std::vector<int>& out) {
    if (t->ignore_merges) {
        int id = tokenizer_find_piece(t, s, n);
        if (id >= 0 && t->types[id] == TOKEN_NORMAL) {
            out.push_back(id);
            return;
        }
    }
    std::vector<BpeScratch::Symbol>& sym = w->symbols;
    std::vector<BpeScratch::Candidate>& queue = w->queue;
    sym.clear();
    queue.clear();
    for (size_t i = 0; i < n; i++) {  // a byte without a token is dropped
        int id = t->byte_ids[(unsigned char)s[i]];
        if (id < 0) continue;
        int k = (int)sym.size();
        sym.push_back({id, k - 1, -1});
        if (k > 0) sym[k - 1].next = k;
    }
    if (sym.empty()) return;
    n = sym.size();
    auto consider = [&](int left) {  // queue the pair (left, its right neighbour) if a merge joins it
        if (left < 0 || sym[left].next < 0) return;
        int right = sym[left].next;
        size_t slot = tokenizer_merge_slot(t, tokenizer_merge_key(sym[left].id, sym[right].id));
        if (t->merge_ranks[slot] < 0) return;
        queue.push_back({t->merge_ranks[slot], left, sym[left].id, sym[right].id, t->merge_results[slot]});
        std::push_heap(queue.begin(), queue.end());
    };
    for (size_t i = 0; i + 1 < n; i++) consider((int)i);
    while (!queue.empty()) {
        BpeScratch::Candidate top = queue.front();
        std::pop_heap(queue.begin(), queue.end());
        queue.pop_back();
        BpeScratch::Symbol& l = sym[top.left];
        // stale: the left symbol was merged away or changed, or its neighbour did
        if (l.id != top.left_id || l.next < 0 || sym[l.next].id != top.right_id) continue;
        int right = l.next;
        l.id = top.result;
        l.next = sym[right].next;
        if (l.next >= 0) sym[l.next].prev = top.left;
        sym[right].id = -1;  // merged away
        consider(l.prev);
        consider(top.left);
    }
    for (int i = 0; i >= 0; i = sym[i].next) out.push_back(sym[i].id);
}

// The added token that matches at text[i..], longest first, among those with the
// given normalized flag, or -1 (an index into t->added).
inline int added_token_at(const Tokenizer* t, const char* text, size_t len, size_t i, bool normalized) {
    for (int a : t->added_by_byte[(unsigned char)text[i]]) {
        if (((t->added[a].flags & ADDED_TOKEN_NORMALIZED) != 0) != normalized) continue;
        const std::string& p = t->pieces[t->added[a].id];
        if (p.size() <= len - i && std::memcmp(text + i, p.data(), p.size()) == 0) return a;
    }
    return -1;
}

// Byte-level BPE encoding (kind 2), as Hugging Face tokenizers encodes without special
// tokens added by a post-processor:
//   1. added tokens are found in the raw text, leftmost first, longest at a position:
//      first those not "normalized", then the normalized ones in the text between
//      (no normalizer is supported, so the text is the same); an lstrip / rstrip token
//      also takes the whitespace before / after it;
//   2. the text between added tokens is cut into pre-tokens (pretokenize);
//   3. each pre-token's bytes become ids by merges (bpe_encode_word).
inline void tokenizer_encode_bpe(const Tokenizer* t, const char* text, size_t len, std::vector<int>& out) {
    CharSpan chars;
    BpeScratch scratch;
    auto encode_plain = [&](size_t a, size_t b) {  // bytes [a, b) without added tokens
        if (a >= b) return;
        unicode_chars(text + a, b - a, &chars);
        pretokenize(t, chars, 0, chars.cp.size(), [&](size_t x, size_t y) {
            bpe_encode_word(t, text + a + x, y - x, &scratch, out);
        });
    };
    auto space_at = [&](size_t i) {  // the length of the whitespace character at i, or 0
        uint32_t cp;
        size_t n = unicode_char_at(text + i, len - i, &cp);
        return unicode_class(cp) == CHAR_SPACE ? n : (size_t)0;
    };
    // Splits bytes [a, b) at the added tokens of one pass; calls inner(a', b') for the
    // text between them.
    auto split_added = [&](size_t a, size_t b, bool normalized, auto inner) {
        size_t done = a;
        for (size_t i = a; i < b;) {
            int m = added_token_at(t, text, b, i, normalized);
            if (m < 0) {
                i++;
                continue;
            }
            size_t start = i, end = i + t->pieces[t->added[m].id].size();
            if (t->added[m].flags & ADDED_TOKEN_LSTRIP)  // take the whitespace before it
                while (start > done) {
                    size_t k = start - 1;
                    while (k > done && ((unsigned char)text[k] & 0xC0) == 0x80) k--;
                    size_t n = space_at(k);
                    if (n == 0 || k + n != start) break;
                    start = k;
                }
            if (t->added[m].flags & ADDED_TOKEN_RSTRIP)
                for (size_t n; end < b && (n = space_at(end)) > 0;) end += n;
            inner(done, start);
            out.push_back(t->added[m].id);
            done = i = end;
        }
        inner(done, b);
    };
    split_added(0, len, false, [&](size_t a, size_t b) {
        split_added(a, b, true, [&](size_t x, size_t y) { encode_plain(x, y); });
    });
}

// Encodes text[0..len) and APPENDS the ids to `out` (no BOS/EOS: push
// t->bos_id yourself first if wanted). Kind 0 follows SentencePiece exactly:
//   1. normalise: empty text gives no ids; otherwise prepend "▁" if
//      add_dummy_prefix, replace each ' ' by "▁", and replace each byte that
//      does not start a valid UTF-8 character by U+FFFD (one per byte);
//   2. start from one symbol per character and repeatedly merge the adjacent
//      pair whose concatenation is a normal piece with the highest score
//      (ties: leftmost pair), using a priority queue with lazy invalidation;
//   3. emit each symbol's id; a symbol with no piece (or one that is the
//      unknown piece) becomes its UTF-8 bytes as <0xNN> tokens when
//      byte_fallback is set, else unk_id (a run of unknowns gives one unk_id).
// Kind 1 gives one id per byte; kind 2 is tokenizer_encode_bpe.
inline void tokenizer_encode(const Tokenizer* t, const char* text, size_t len, std::vector<int>& out) {
    if (t->kind == TOKENIZER_BYTE_LEVEL_BPE) {
        tokenizer_encode_bpe(t, text, len, out);
        return;
    }
    if (t->kind == TOKENIZER_BYTE_LEVEL) {
        for (size_t i = 0; i < len; i++) out.push_back(t->byte_ids[(unsigned char)text[i]]);
        return;
    }
    if (len == 0 || t->vocab_size == 0) return;
    static const char kSpace[] = "\xE2\x96\x81";        // U+2581
    static const char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD
    struct Symbol {
        size_t start, size;  // bytes of the normalised text
        int64_t prev, next;
    };
    std::string norm;
    norm.reserve(3 * len + 3);
    std::vector<Symbol> sym;
    sym.reserve(len + 1);
    auto add_symbol = [&](const char* s, size_t n) {
        int64_t i = (int64_t)sym.size();
        sym.push_back(Symbol{norm.size(), n, i - 1, i + 1});
        norm.append(s, n);
    };
    if (t->add_dummy_prefix) add_symbol(kSpace, 3);
    for (size_t i = 0; i < len;) {
        size_t n = tokenizer_utf8_len(text + i, len - i);
        if (n == 0) {
            add_symbol(kReplacement, 3);
            i += 1;
        } else if (text[i] == ' ') {
            add_symbol(kSpace, 3);
            i += 1;
        } else {
            add_symbol(text + i, n);
            i += n;
        }
    }
    sym.back().next = -1;

    struct Pair {
        float score;
        int64_t left, right;
        size_t size;
    };
    struct PairOrder {  // top of the queue: highest score, then leftmost
        bool operator()(const Pair& a, const Pair& b) const {
            return a.score < b.score || (a.score == b.score && a.left > b.left);
        }
    };
    std::priority_queue<Pair, std::vector<Pair>, PairOrder> agenda;
    auto maybe_add_pair = [&](int64_t left, int64_t right) {
        if (left < 0 || right < 0) return;
        size_t size = sym[left].size + sym[right].size;
        int id = tokenizer_find_piece(t, norm.data() + sym[left].start, size);
        if (id < 0 || t->types[id] != TOKEN_NORMAL) return;
        agenda.push(Pair{t->scores[id], left, right, size});
    };
    for (size_t i = 1; i < sym.size(); i++) maybe_add_pair((int64_t)i - 1, (int64_t)i);
    while (!agenda.empty()) {
        Pair top = agenda.top();
        agenda.pop();
        Symbol& l = sym[top.left];
        Symbol& r = sym[top.right];
        // Stale entry: one side was merged away or grew since it was queued.
        if (l.size == 0 || r.size == 0 || l.size + r.size != top.size) continue;
        l.size += r.size;
        l.next = r.next;
        if (r.next >= 0) sym[r.next].prev = top.left;
        r.size = 0;
        maybe_add_pair(l.prev, top.left);
        maybe_add_pair(top.left, l.next);
    }

    bool prev_unknown = false;
    for (int64_t i = 0; i >= 0; i = sym[i].next) {
        const char* s = norm.data() + sym[i].start;
        size_t n = sym[i].size;
        int id = tokenizer_find_piece(t, s, n);
        if (id < 0) id = t->unk_id;
        bool unknown = t->types[id] == TOKEN_UNKNOWN;
        if (unknown && t->byte_fallback) {
            for (size_t k = 0; k < n; k++) out.push_back(t->byte_ids[(unsigned char)s[k]]);
        } else if (!(unknown && prev_unknown)) {
            out.push_back(id);
        }
        prev_unknown = unknown;
    }
}

inline void tokenizer_encode(const Tokenizer* t, const char* text, std::vector<int>& out) {
    tokenizer_encode(t, text, std::strlen(text), out);
}

// Appends a normal piece to out with every "▁" turned into ' ', skipping the
// first `skip` bytes.
inline void tokenizer_append_unescaped(const std::string& piece, size_t skip, std::string& out) {
    for (size_t i = skip; i < piece.size();) {
        if (piece.compare(i, 3, "\xE2\x96\x81") == 0) {
            out.push_back(' ');
            i += 3;
        } else {
            out.push_back(piece[i++]);
        }
    }
}

constexpr char TOKENIZER_UNK_SURFACE[] = " \xE2\x81\x87 ";  // " ⁇ ", SentencePiece's default

// Text of one token for streaming output. *at_start must be true before the
// first token of a sequence (pass nullptr for "not at start"); it is updated so
// that only the dummy-prefix "▁" of the first visible piece is dropped. Control
// tokens and ids outside the vocabulary give "", byte tokens give their raw
// byte (so a multi-byte character arrives over several calls), the unknown
// token gives " ⁇ ". Concatenating the results equals tokenizer_decode except
// that invalid UTF-8 from byte tokens is passed through instead of U+FFFD.
// Byte-level BPE: a token's bytes (a character may arrive over several calls),
// control tokens "", always equal to tokenizer_decode when concatenated.
inline std::string tokenizer_decode_piece(const Tokenizer* t, int id, bool* at_start) {
    std::string out;
    if (id < 0 || id >= t->vocab_size) return out;
    if (t->kind == TOKENIZER_BYTE_LEVEL_BPE) {
        if (t->types[id] != TOKEN_CONTROL) out = t->pieces[id];
        if (at_start) *at_start = false;
        return out;
    }
    switch (t->types[id]) {
        case TOKEN_CONTROL:
            return out;
        case TOKEN_BYTE:
            out.push_back((char)t->token_byte[id]);
            break;
        case TOKEN_UNKNOWN:
            out = TOKENIZER_UNK_SURFACE;
            break;
        default: {
            const std::string& p = t->pieces[id];
            bool strip = at_start && *at_start && t->add_dummy_prefix && p.compare(0, 3, "\xE2\x96\x81") == 0;
            tokenizer_append_unescaped(p, strip ? 3 : 0, out);
        }
    }
    if (at_start) *at_start = false;
    return out;
}

// Decodes ids into text the way SentencePiece's decoder does: control tokens
// vanish, the unknown token becomes " ⁇ ", "▁" becomes ' ', the leading "▁" of
// the first visible piece is dropped (add_dummy_prefix), and each run of byte
// tokens is turned into bytes with every byte that does not form a valid UTF-8
// character replaced by U+FFFD. Ids outside the vocabulary are skipped.
// Byte-level tokenizers just concatenate the bytes. Byte-level BPE concatenates the
// bytes of every token but the control ones (tokenizers' decode with
// skip_special_tokens), raw: where they are not valid UTF-8, tokenizers' ByteLevel
// decoder would show U+FFFD instead, so that decode(encode(x)) == x for any bytes x.
inline std::string tokenizer_decode(const Tokenizer* t, const int* ids, int n) {
    std::string text;
    if (t->kind == TOKENIZER_BYTE_LEVEL_BPE) {
        for (int i = 0; i < n; i++)
            if (ids[i] >= 0 && ids[i] < t->vocab_size && t->types[ids[i]] != TOKEN_CONTROL) text += t->pieces[ids[i]];
        return text;
    }
    if (t->kind == TOKENIZER_BYTE_LEVEL) {
        for (int i = 0; i < n; i++)
            if (ids[i] >= 0 && ids[i] < t->vocab_size && t->types[ids[i]] == TOKEN_BYTE)
                text.push_back((char)t->token_byte[ids[i]]);
        return text;
    }
    std::string bytes;  // pending run of byte tokens
    auto flush_bytes = [&]() {
        for (size_t i = 0; i < bytes.size();) {
            size_t k = tokenizer_utf8_len(bytes.data() + i, bytes.size() - i);
            if (k == 0) {
                text += "\xEF\xBF\xBD";
                i += 1;
            } else {
                text.append(bytes, i, k);
                i += k;
            }
        }
        bytes.clear();
    };
    bool is_bos_ws = true;     // may the next visible piece still drop its leading "▁"?
    bool bos_ws_seen = false;  // did the previous non-byte piece drop one?
    for (int i = 0; i < n; i++) {
        int id = ids[i];
        if (id < 0 || id >= t->vocab_size) continue;
        int type = t->types[id];
        if (type == TOKEN_BYTE) {
            bytes.push_back((char)t->token_byte[id]);
            continue;
        }
        flush_bytes();
        if (bos_ws_seen || !text.empty()) is_bos_ws = false;
        bos_ws_seen = false;
        if (type == TOKEN_CONTROL) continue;
        if (type == TOKEN_UNKNOWN) {
            text += TOKENIZER_UNK_SURFACE;
            continue;
        }
        const std::string& p = t->pieces[id];
        bool strip = is_bos_ws && t->add_dummy_prefix && p.compare(0, 3, "\xE2\x96\x81") == 0;
        tokenizer_append_unescaped(p, strip ? 3 : 0, text);
        bos_ws_seen = strip;
    }
    flush_bytes();
    return text;
}

// ----------------------------------------------------------------------------
// Task world: the gold judge and the evaluation prompts of data/world (made by
// dev/data/make_world.py, whose docstring is the spec). Six kinds of tiny tasks
// (arith, reverse, sort, count, max, followup); every answer is exactly
// "The answer is <gold>.". world_judge scores a response 0..10 from the kind, the gold
// string and the response bytes only (ASCII rules; whitespace is " \t\n\r\v\f"):
// 10 exact; 9 exact but for surrounding whitespace; 0 when the gold is a number and the
// response holds another digit run, or says "answer is" (any case) twice or more; with
// one "answer is", the letter/digit run after it (past spaces/tabs and one quote) is
// the candidate: 6 right with the exact sentence inside extra text, 5 right in a sloppy
// form, 2 right but for letter case, else 0; without it, the trimmed response less one
// trailing '.' scores 4 when it is the gold, 2 when it is the gold but for case, else 0.
// It returns -1 for an unknown kind or an empty gold. The eval prompts file
// (eval_prompts.tsv) has '#' comment lines, then one prompt per line with tab-separated
// fields: kind, gold, system, user, [assistant, user]... A prompt is rendered in the
// Vicuna v1.1 template of dev/data/prepare_sft.py, up to where the answer starts.

struct WorldPrompt {
    std::string kind, gold;
    std::vector<std::string> messages;  // system, user, [assistant, user]...: ends with a user turn
};

inline const char* const WORLD_KINDS[6] = {"arith", "reverse", "sort", "count", "max", "followup"};

inline bool world_kind_known(const std::string& kind) {
    for (const char* k : WORLD_KINDS) if (kind == k) return true;
    return false;
}

inline bool world_is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
inline bool world_is_digit(char c) { return c >= '0' && c <= '9'; }
inline bool world_is_alnum(char c) { return world_is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

inline std::string world_lower(const std::string& s) {
    std::string out = s;
    for (char& c : out) if (c >= 'A' && c <= 'Z') c = (char)(c + 32);
    return out;
}

inline std::string world_trim(const std::string& s) {
    size_t a = 0, b = s.size();
    while (a < b && world_is_space(s[a])) a++;
    while (b > a && world_is_space(s[b - 1])) b--;
    return s.substr(a, b - a);
}

// A judged answer is right when it holds the gold value in any frame: a score of at least this
// (4: the bare value; 5, 6: the value in a frame; 9, 10: the canonical answer).
constexpr int WORLD_RIGHT_SCORE = 4;

// 0..10 (see above), or -1 for an unknown kind or an empty gold
inline int world_judge(const std::string& kind, const std::string& gold, const std::string& response) {
    if (!world_kind_known(kind) || gold.empty()) return -1;
    const std::string r = "The answer is " + gold + ".";
    if (response == r) return 10;
    std::string t = world_trim(response);
    if (t == r) return 9;
    bool numeric = true;
    for (char c : gold) numeric = numeric && world_is_digit(c);
    if (numeric) {
        for (size_t i = 0; i < response.size();) {
            if (!world_is_digit(response[i])) { i++; continue; }
            size_t j = i;
            while (j < response.size() && world_is_digit(response[j])) j++;
            if (response.compare(i, j - i, gold) != 0) return 0;
            i = j;
        }
    }
    const std::string low = world_lower(response), key = "answer is";
    size_t first = low.find(key);
    if (first != std::string::npos && low.find(key, first + key.size()) != std::string::npos) return 0;
    if (first != std::string::npos) {
        size_t i = first + key.size();
        while (i < response.size() && (response[i] == ' ' || response[i] == '\t')) i++;
        if (i < response.size() && (response[i] == '\'' || response[i] == '"')) i++;
        size_t j = i;
        while (j < response.size() && world_is_alnum(response[j])) j++;
        std::string cand = response.substr(i, j - i);
        if (cand == gold) return response.find(r) != std::string::npos ? 6 : 5;
        return !cand.empty() && world_lower(cand) == world_lower(gold) ? 2 : 0;
    }
    if (!t.empty() && t.back() == '.') t.pop_back();
    if (t == gold) return 4;
    return !t.empty() && world_lower(t) == world_lower(gold) ? 2 : 0;
}

// The exactly right response of a gold answer
inline std::string world_canonical(const std::string& gold) { return "The answer is " + gold + "."; }

// Reads an eval prompts file. Returns "" or what is wrong (with the line number).
inline std::string world_load_prompts_checked(std::vector<WorldPrompt>* out, const char* path) {
    std::vector<std::string> lines;
    std::string err = read_lines_checked(path, &lines);
    if (!err.empty()) return err;
    out->clear();
    for (size_t line_no = 1; line_no <= lines.size(); line_no++) {
        const std::string& line = lines[line_no - 1];
        if (line.empty() || line[0] == '#') continue;
        std::vector<std::string> fields;
        for (size_t a = 0;;) {
            size_t b = line.find('\t', a);
            fields.push_back(line.substr(a, b == std::string::npos ? std::string::npos : b - a));
            if (b == std::string::npos) break;
            a = b + 1;
        }
        std::string where = "line " + std::to_string(line_no) + ": ";
        if (fields.size() < 4 || fields.size() % 2 != 0)
            return where + std::to_string(fields.size()) + " fields (need kind, gold, system, user, then assistant/user pairs)";
        for (const std::string& s : fields) if (s.empty()) return where + "empty field";
        if (!world_kind_known(fields[0])) return where + "unknown kind '" + fields[0] + "'";
        out->push_back(WorldPrompt{fields[0], fields[1], std::vector<std::string>(fields.begin() + 2, fields.end())});
    }
    if (out->empty()) return "no prompts";
    return "";
}

inline std::vector<WorldPrompt> world_load_prompts(const char* path) {
    std::vector<WorldPrompt> prompts;
    std::string err = world_load_prompts_checked(&prompts, path);
    if (!err.empty()) fail_file(path, "%s", err.c_str());
    return prompts;
}

// ----------------------------------------------------------------------------
// The chat template: data, read from the tokenizer file (ChatTemplate; a file without one
// means Xwin-LM's Vicuna v1.1). dev/chat_templates.py holds the same three definitions and
// dev/data/prepare_sft.py renders training rows with them. A conversation renders as
//   begin
//   system_prefix + system + system_suffix      (system: the system message, else
//                                                default_system; no block when there is no
//                                                system message and no default)
//   per turn pair: user_prefix + user + user_suffix
//                  assistant_prefix + ASSISTANT + assistant_end + after_assistant
// and a prompt for the next answer ends with user_prefix + user + user_suffix + assistant_prefix
// (CHAT_TEMPLATE_PROMPT_STRIPS_SPACE: without the prefix's trailing space unless the tokenizer is
// byte-level). CHAT_TEMPLATE_TRIM strips each content's surrounding whitespace first (Llama 3).
// The built-ins:
//   vicuna_v1.1  <s>{system} USER: {user} ASSISTANT: {assistant}</s>USER: ...
//   llama3       <|begin_of_text|>[<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>]
//                <|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>
//                <|start_header_id|>assistant<|end_header_id|>\n\n{assistant}<|eot_id|>...
//   chatml       <|im_start|>system\n{system or SmolLM2's default}<|im_end|>\n
//                <|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>\n...
//
// Tokens: byte-level BPE (kind 2) encodes the whole rendered string at once, as
// apply_chat_template and Hugging Face tokenizers do (special-token text is matched anywhere,
// contents included). Kinds 0 and 1 cannot match special tokens in text: the template's
// "<...>" control tokens become their ids, and each run of text between them is encoded at
// once (so Vicuna's <s>...</s> gives the ids it always gave).
// Loss mask: 1 on each token whose bytes overlap an assistant content or its assistant_end
// (the rule of dev/data/prepare_sft.py), 0 elsewhere.

struct ChatSegment {
    std::string text;
    bool from_template;  // template text (its "<...>" are special tokens), not a message's content
    bool target;         // an assistant content or its end of turn
};

// The segments of a conversation: system (nullptr: none), turns alternating user, assistant,
// ... starting with user; generation_prompt: the last turn is a user turn and the assistant's
// prefix follows.
inline std::vector<ChatSegment> chat_segments(const Tokenizer* tok, const std::string* system,
                                              const std::vector<std::string>& turns, bool generation_prompt) {
    const ChatTemplate& c = tok->chat;
    auto content = [&](const std::string& s) {
        if (!(c.flags & CHAT_TEMPLATE_TRIM)) return s;
        size_t a = s.find_first_not_of(" \t\n\r\f\v"), b = s.find_last_not_of(" \t\n\r\f\v");
        return a == std::string::npos ? std::string() : s.substr(a, b + 1 - a);
    };
    std::vector<ChatSegment> seg;
    auto add = [&](const std::string& text, bool from_template, bool target) {
        if (!text.empty()) seg.push_back(ChatSegment{text, from_template, target});
    };
    add(c.begin, true, false);
    if (system || !c.default_system.empty()) {
        add(c.system_prefix, true, false);
        add(content(system ? *system : c.default_system), false, false);
        add(c.system_suffix, true, false);
    }
    for (size_t i = 0; i < turns.size(); i++) {
        if (i % 2 == 0) {
            add(c.user_prefix, true, false);
            add(content(turns[i]), false, false);
            add(c.user_suffix, true, false);
            std::string prefix = c.assistant_prefix;
            bool last = i + 1 == turns.size();
            if (last && generation_prompt && (c.flags & CHAT_TEMPLATE_PROMPT_STRIPS_SPACE) &&
                tok->kind != TOKENIZER_BYTE_LEVEL && !prefix.empty() && prefix.back() == ' ')
                prefix.pop_back();
            add(prefix, true, false);
        } else {
            add(content(turns[i]), false, true);
            add(c.assistant_end, true, true);
            add(c.after_assistant, true, false);
        }
    }
    return seg;
}

// Encodes segments into ids (appended to out) and, when mask is given, the loss mask.
inline void chat_encode_segments(const Tokenizer* tok, const std::vector<ChatSegment>& seg, std::vector<int>& out,
                                 std::vector<uint8_t>* mask) {
    std::string text;                        // the run being gathered
    std::vector<std::pair<size_t, bool>> runs;  // (end byte, target) of the run's pieces
    auto flush = [&]() {
        if (text.empty()) return;
        size_t first = out.size();
        tokenizer_encode(tok, text.c_str(), text.size(), out);
        if (mask) {
            // each token's byte span, from its piece: raw bytes (kind 2, control tokens their
            // text), one byte (kind 1), or the decoded piece (kind 0, dummy prefix dropped);
            // where a piece does not spell the text at the cursor (a byte without a token,
            // an unknown token), the span runs to where the next piece matches
            std::vector<std::string> pieces;
            bool at_start = true;
            for (size_t k = first; k < out.size(); k++) {
                int id = out[k];
                pieces.push_back(tok->kind == TOKENIZER_BYTE_LEVEL_BPE ? tok->pieces[id]
                                                                     : tokenizer_decode_piece(tok, id, &at_start));
            }
            size_t at = 0;
            for (size_t k = 0; k < pieces.size(); k++) {
                auto spells = [&](size_t p, size_t from) {
                    return from <= text.size() && text.compare(from, pieces[p].size(), pieces[p]) == 0;
                };
                if (pieces[k].empty()) {  // a dummy prefix alone, a control token: no text
                    mask->push_back(0);
                    continue;
                }
                size_t start = at;
                if (spells(k, at)) {
                    at += pieces[k].size();
                } else {
                    at = k + 1 < pieces.size() ? std::min(at + 1, text.size()) : text.size();
                    while (k + 1 < pieces.size() && at < text.size() && !spells(k + 1, at)) at++;
                }
                size_t run_start = 0;
                bool hit = false;
                for (const std::pair<size_t, bool>& run : runs) {
                    hit |= run.second && run_start < at && run.first > start;
                    run_start = run.first;
                }
                mask->push_back(hit ? 1 : 0);
            }
        }
        text.clear();
        runs.clear();
    };
    for (const ChatSegment& s : seg) {
        if (tok->kind == TOKENIZER_BYTE_LEVEL_BPE || !s.from_template) {
            text += s.text;
            runs.push_back({text.size(), s.target});
            continue;
        }
        size_t done = 0, len = 0;
        for (size_t i = 0; i < s.text.size(); i++) {
            int id = chat_special_at(tok, s.text, i, &len);
            if (id < 0) continue;
            if (i > done) {
                text += s.text.substr(done, i - done);
                runs.push_back({text.size(), s.target});
            }
            flush();
            out.push_back(id);
            if (mask) mask->push_back(s.target ? 1 : 0);
            done = i + len;
            i = done - 1;
        }
        if (done < s.text.size()) {
            text += s.text.substr(done);
            runs.push_back({text.size(), s.target});
        }
    }
    flush();
}

// The id that ends an assistant turn, where generation stops and what closes a scored answer:
// the template's assistant_end when it is one special token (<|im_end|>, <|eot_id|>, Vicuna's
// EOS), else the tokenizer's EOS.
inline int chat_end_id(const Tokenizer* tok) {
    size_t len = 0;
    const std::string& end = tok->chat.assistant_end;
    int id = end.empty() ? -1 : chat_special_at(tok, end, 0, &len);
    return id >= 0 && len == end.size() ? id : tok->eos_id;
}

// The ids and loss mask of a whole conversation (turns: user, assistant, ..., ending with an
// assistant turn), as dev/data/prepare_sft.py writes them.
inline void chat_encode_conversation(const Tokenizer* tok, const std::string* system,
                                     const std::vector<std::string>& turns, std::vector<int>& ids,
                                     std::vector<uint8_t>& mask) {
    ids.clear();
    mask.clear();
    chat_encode_segments(tok, chat_segments(tok, system, turns, false), ids, &mask);
}

// The ids of a prompt for the next assistant turn: turns alternate user, assistant, ..., user.
// An empty system means none (the template's default).
inline void chat_encode_prompt(const Tokenizer* tok, const std::string& system, const std::vector<std::string>& turns, std::vector<int>& out) {
    out.clear();
    chat_encode_segments(tok, chat_segments(tok, system.empty() ? nullptr : &system, turns, true), out, nullptr);
}

// The dense peak of a GPU in FLOP/s, bf16 (tensor cores) or fp32, from its name as
// cudaGetDeviceProperties gives it, for the GPUs whose datasheets this table holds; 0 for any
// other (then no MFU is shown):
//   H100 SXM ("NVIDIA H100 80GB HBM3")  989 / 67 TFLOP/s      H100 PCIe   756 / 51
//   H200 ("NVIDIA H200")                 989 / 67              A100 (SXM4 and PCIe)  312 / 19.5
// H100 NVL and H200 NVL have other clocks and are left out rather than guessed.
inline double gpu_peak_flops(const std::string& device_name, bool bf16) {
    std::string n;
    for (char ch : device_name) n += (char)toupper((unsigned char)ch);
    auto has = [&](const char* what) { return n.find(what) != std::string::npos; };
    if (has("NVL")) return 0.0;
    if (has("H200")) return bf16 ? 989e12 : 67e12;
    if (has("H100") && has("PCIE")) return bf16 ? 756e12 : 51e12;
    if (has("H100") && (has("SXM") || has("HBM3"))) return bf16 ? 989e12 : 67e12;
    if (has("A100") && (has("SXM") || has("PCIE"))) return bf16 ? 312e12 : 19.5e12;
    return 0.0;
}

#ifdef XWIN_CUDA
// The GPU the programs run on (device 0), read once: its name and its dense peak in the build's
// precision (floatX), 0 when gpu_peak_flops does not know it.
struct GpuInfo {
    std::string name;
    double peak = 0.0;
};

inline const GpuInfo& gpu_info() {
    static const GpuInfo info = [] {
        cudaDeviceProp prop;
        cudaCheck(cudaGetDeviceProperties(&prop, 0));
        GpuInfo g;
        g.name = prop.name;
        g.peak = gpu_peak_flops(g.name, sizeof(floatX) == 2);
        return g;
    }();
    return info;
}
#endif


// ----------------------------------------------------------------------------
// Collectives: data parallel training over ranks, one process per rank (mpirun -np N).
// Every rank holds the whole model and the same weights; each takes its own rows of a step,
// computes their gradient, and the ranks sum their gradients before the update, so that every
// rank takes the same AdamW step. The API is five calls over two backends:
//   comm_init(&comm, id_dir)              the rank and the world from the launcher (mpirun, srun)
//   comm_all_reduce_sum(&comm, x, n)      n floats where the gradients live (the CPU build:
//                                         host memory, over MPI; the GPU build: device memory,
//                                         over NCCL on comm.stream)
//   comm_all_reduce_sum_double(&comm, x, n)   n doubles in host memory (losses, counts), MPI
//   comm_broadcast(&comm, bytes, n, root) / comm_barrier(&comm)   host memory, MPI (without
//                                         MPI, -I: over NCCL through a device buffer)
//   comm_all_gather_host(&comm, x, shard)  each rank's part of x (host floats) to every rank, MPI
//   comm_gather_text(&comm, text)          every rank's text, in rank order, on rank 0, MPI
//   comm_reduce_sum_host(&comm, send, recv, n, root)   n floats summed on one rank, MPI
//   runner_all_gather_params(runner, &comm)   ZeRO-1 and 2: each rank's updated part of the weights
//                                         to every rank (the GPU build: the compute copy in
//                                         device memory, over NCCL)
//   runner_micro_batch / runner_all_reduce_grads / runner_clip_grads   a step's gradient over the
//                                         ranks: all-reduced, or with ZeRO-2 reduced to the rank
//                                         of each part after every micro-batch
//   comm_free(&comm)
// A process that no launcher started is a world of 1: every collective returns at once and
// MPI is never initialised, so a single-process run is exactly the run of a build without MPI.
// XWIN_MPI (the Makefile defines it where mpicc is found) enables MPI; XWIN_NCCL (where
// nccl.h is found too) enables NCCL for the GPU build, its id broadcast over MPI, one GPU per
// rank of a node (test/nccl_emu.h emulates it over MPI for the CUDA build on the CPU). Only
// rank 0 writes stdout; the other ranks' stdout goes to /dev/null (their errors reach stderr).
// Every rank gets the same sums (MPI's and NCCL's all-reduce hand each rank one result), so
// the ranks' weights stay equal without being sent; for a given number of ranks the sums are
// the same from run to run. They are not the bits of one rank accumulating the same
// micro-batches: it adds each micro-batch's gradient into the step's in place, and a tensor
// that takes several += per micro-batch (the embedding: one per token) rounds otherwise.
// Launchers: mpirun (OpenMPI, MPICH), and Slurm's srun with its MPI plugin (srun --mpi=pmix).
// The GPU build also runs under srun without an MPI plugin, given -I <folder> (shared by the
// ranks' nodes): the ranks come from SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID, rank 0
// writes NCCL's id to a file there (comm_nccl_id_exchange), and every collective, the host's
// too, goes over NCCL (through a device buffer: comm_host_over_nccl). The CPU build needs MPI.
// Checkpoints (checkpoint_save): rank 0 writes the weights and state.bin; with ZeRO-1 or 2 every
// rank writes its own part of the AdamW moments to a shard file, in parallel, and rank 0 marks
// the checkpoint complete after a barrier (state.bin's format says more).

#ifdef XWIN_MPI
inline void mpi_check(int err, const char* file, int line) {
    if (err == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int n = 0;
    MPI_Error_string(err, text, &n);
    fprintf(stderr, "error: MPI at %s:%d: %s\n", file, line, text);
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}
#define mpiCheck(err) mpi_check((err), __FILE__, __LINE__)
#endif

#ifdef XWIN_NCCL
inline void nccl_check(ncclResult_t err, const char* file, int line) {
    if (err == ncclSuccess) return;
    fprintf(stderr, "error: NCCL at %s:%d: %s\nHINT: NCCL_DEBUG=INFO says more; every rank needs its own GPU\n", file, line, ncclGetErrorString(err));
    exit(1);
}
#define ncclCheck(err) nccl_check((err), __FILE__, __LINE__)
#endif

constexpr size_t COMM_BOUNCE = (size_t)64 << 20;  // bytes of the device buffer of the host collectives over NCCL (-I)

struct Comm {
    int rank = 0;        // this process's rank, 0..world-1
    int world = 1;       // the number of ranks
    int local_rank = 0;  // its rank among the ranks of its node (the GPU it takes)
    bool mpi = false;    // MPI was initialised (world > 1 and no -I)
    int micro = 0;       // the step's micro-batch now (ZeRO-2: the first's reduce writes a rank's part, later ones add to it)
#ifdef XWIN_NCCL
    ncclComm_t nccl = nullptr;
    cudaStream_t stream = 0;            // the stream comm_all_reduce_sum runs on (the runner's)
    cudaStream_t reduce_stream = 0;     // the per-layer all-reduces that overlap the backward
    cudaEvent_t grads_ready = nullptr;  // recorded on the runner's stream when a layer's gradients are final
    cudaEvent_t reduced = nullptr;      // recorded on reduce_stream after the step's last all-reduce
    bool overlapped = false;            // this step's layers were reduced during its backward
    void* bounce = nullptr;             // (COMM_BOUNCE bytes) the host collectives' device buffer without MPI (-I)
    cudaStream_t host_stream = 0;       // their stream
#endif
};

[[noreturn]] inline void comm_fail_no_mpi(int world) {
    fprintf(stderr, "error: the launcher started %d ranks, but this build has no MPI: multi-rank runs need the MPI build "
                    "(install libopenmpi-dev, then make: it finds mpicxx)\n", world);
    exit(1);
}

// The number of ranks a launcher announced: OpenMPI's mpirun sets OMPI_COMM_WORLD_SIZE,
// MPICH's and Intel MPI's set PMI_SIZE, Slurm's srun SLURM_STEP_NUM_TASKS (a job step's tasks:
// a batch script that runs the program directly is not a step); 1 when none is set.
inline int comm_launcher_world() {
    for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"}) {
        const char* value = getenv(name);
        if (value && atoi(value) > 1) return atoi(value);
    }
    return 1;
}

// This process's rank as the launcher announced it (0 without one): for the work a program does
// outside its ranks' collectives, before comm_init or after comm_free
inline int comm_launcher_rank() {
    for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"}) {
        const char* value = getenv(name);
        if (value) return atoi(value);
    }
    return 0;
}

#ifdef XWIN_MPI
// A program that comm_spawn_program started (a stage of the recipe under mpirun, on new ranks)
// is a rank of an MPI world of its own, a child of the ranks that spawned it. Their
// MPI_Comm_spawn returns when every child has called MPI_Init, so a child calls it as it loads,
// before its flags are read (XWIN_SPAWNED in its environment says it is one); comm_init then
// finds MPI started. When it exits it sends its exit status to every parent (on_exit: the
// status is known only there). A child that failed does not end: a non-zero exit would have
// mpirun end the whole run before the parents say which command failed; they say it and exit
// non-zero, and mpirun then ends the children that wait. (A child killed by a signal, or one
// that calls MPI_Abort, has mpirun end the whole run at once, with mpirun's message.)
constexpr int COMM_EXIT_TAG = 7011;

inline void comm_spawned_exit(int status, void*) {
    fflush(stdout), fflush(stderr);
    MPI_Comm parent;
    int parents = 0;
    mpiCheck(MPI_Comm_get_parent(&parent));
    mpiCheck(MPI_Comm_remote_size(parent, &parents));
    for (int p = 0; p < parents; p++) mpiCheck(MPI_Send(&status, 1, MPI_INT, p, COMM_EXIT_TAG, parent));
    if (status != 0) for (;;) pause();
    mpiCheck(MPI_Comm_disconnect(&parent));
    mpiCheck(MPI_Finalize());
}

inline const bool comm_spawned = [] {
    if (!getenv("XWIN_SPAWNED") || comm_launcher_world() == 1) return false;
    mpiCheck(MPI_Init(nullptr, nullptr));
    MPI_Comm parent;
    mpiCheck(MPI_Comm_get_parent(&parent));
    if (parent == MPI_COMM_NULL) return false;  // a launcher's rank that found the variable set: comm_init's usual run
    on_exit(comm_spawned_exit, nullptr);
    return true;
}();
#endif

#ifdef XWIN_NCCL
// -I's id file of this job step: <dir>/xwin_nccl_id_<SLURM_JOB_ID>_<SLURM_STEP_ID> (0 for one not set)
inline std::string comm_nccl_id_path(const char* dir) {
    const char* job = getenv("SLURM_JOB_ID");
    const char* step = getenv("SLURM_STEP_ID");
    return string_format("%s/xwin_nccl_id_%s_%s", dir, job ? job : "0", step ? step : "0");
}

// NCCL's id from rank 0 to the others through a file in a folder every rank sees (-I), for
// srun without MPI: <folder>/xwin_nccl_id_<job>_<step> (Slurm's SLURM_JOB_ID and SLURM_STEP_ID,
// so another run's file is another name), written as a temporary then renamed; the other ranks
// wait for it up to XWIN_NCCL_ID_TIMEOUT seconds (300 by default). A file of another world or
// of no id is an error, as is a wait that ends without one.
inline ncclUniqueId comm_nccl_id_exchange(const char* dir, int rank, int world) {
    struct IdFile {
        char magic[16];  // "xwin-nccl-id"
        int32_t world;
        ncclUniqueId id;
    } f{};
    std::string path = comm_nccl_id_path(dir);
    if (rank == 0) {
        snprintf(f.magic, sizeof(f.magic), "xwin-nccl-id");
        f.world = world;
        ncclCheck(ncclGetUniqueId(&f.id));
        std::string tmp = path + ".tmp";
        FILE* out = fopen(tmp.c_str(), "wb");
        if (!out) fail_flag('I', "cannot write NCCL's id in %s: %s (the folder must exist on every rank's node)", dir, strerror(errno));
        bool ok = fwrite(&f, sizeof(f), 1, out) == 1;
        ok = fclose(out) == 0 && ok;
        if (!ok || rename(tmp.c_str(), path.c_str()) != 0) fail_flag('I', "cannot write NCCL's id to %s: %s", path.c_str(), strerror(errno));
        return f.id;
    }
    const char* limit_text = getenv("XWIN_NCCL_ID_TIMEOUT");
    double limit = limit_text ? atof(limit_text) : 300.0;
    auto t0 = std::chrono::steady_clock::now();
    for (;;) {
        FILE* in = fopen(path.c_str(), "rb");
        if (in) {
            bool whole = fread(&f, sizeof(f), 1, in) == 1;
            fclose(in);
            if (!whole || strcmp(f.magic, "xwin-nccl-id") != 0 || f.world != world) {
                fail_flag('I', "%s is not rank 0's NCCL id for this run of %d ranks (%s): remove it, or give another folder", path.c_str(), world,
                          !whole || strcmp(f.magic, "xwin-nccl-id") != 0 ? "not an id file" : string_format("written for %d ranks", f.world).c_str());
            }
            return f.id;
        }
        if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > limit) {
            fail_flag('I', "rank %d waited %g s for rank 0's NCCL id in %s: is rank 0 running, with the same -I folder, shared by every node?", rank, limit,
                      path.c_str());
        }
        usleep(50000);
    }
}
#endif

#ifdef XWIN_NCCL
// This rank's GPU (its rank on its node) and NCCL's communicator, from the id that get_id
// brings (over MPI, or through -I's file), and the reduce stream and its events
inline void comm_nccl_join(Comm* c, const std::function<ncclUniqueId()>& get_id) {
    int devices = 0;
    cudaCheck(cudaGetDeviceCount(&devices));
    if (c->local_rank >= devices) {
        fprintf(stderr, "error: rank %d is rank %d of its node, which has %d GPU%s: run at most one rank per GPU\n", c->rank, c->local_rank, devices,
                devices == 1 ? "" : "s");
        exit(1);
    }
    cudaCheck(cudaSetDevice(c->local_rank));  // before the runner allocates anything
    ncclUniqueId id = get_id();
    ncclCheck(ncclCommInitRank(&c->nccl, c->world, id, c->rank));
    cudaCheck(cudaStreamCreateWithFlags(&c->reduce_stream, cudaStreamNonBlocking));
    cudaCheck(cudaEventCreateWithFlags(&c->grads_ready, cudaEventDisableTiming));
    cudaCheck(cudaEventCreateWithFlags(&c->reduced, cudaEventDisableTiming));
}
#endif

// a launcher's variable, as an int (-1 when it is not set)
inline int comm_env_int(const char* name) {
    const char* value = getenv(name);
    return value ? atoi(value) : -1;
}

// id_dir: -I, srun without MPI (the GPU build): NCCL's id through a file in that folder
inline void comm_init(Comm* c, const char* id_dir = "") {
    *c = Comm{};
    int world = comm_launcher_world();
    if (world == 1) return;
    if (id_dir && *id_dir) {
#ifndef XWIN_NCCL
        fail_flag('I', "ranks without MPI talk over NCCL, which only the GPU build has: launch this build with mpirun or srun --mpi=pmix, without -I");
#else
        c->rank = comm_env_int("SLURM_PROCID");
        c->world = std::max(comm_env_int("SLURM_STEP_NUM_TASKS"), comm_env_int("SLURM_NTASKS"));
        c->local_rank = comm_env_int("SLURM_LOCALID");
        if (c->rank < 0 || c->world < 2 || c->local_rank < 0 || c->rank >= c->world) {
            fail_flag('I', "a run without MPI takes its ranks from Slurm's SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID: run it under srun");
        }
        comm_nccl_join(c, [&] { return comm_nccl_id_exchange(id_dir, c->rank, c->world); });
        if (c->rank == 0) {  // every rank has joined (ncclCommInitRank returns once all have): the id file is spent
            remove(comm_nccl_id_path(id_dir).c_str());
        }
        cudaCheck(cudaStreamCreateWithFlags(&c->host_stream, cudaStreamNonBlocking));
        cudaCheck(cudaMalloc(&c->bounce, COMM_BOUNCE));
        if (c->rank > 0 && !freopen("/dev/null", "w", stdout)) fail_file("/dev/null", "cannot open it for rank %d's stdout", c->rank);
        return;
#endif
    }
#ifndef XWIN_MPI
    comm_fail_no_mpi(world);
#else
#if defined(XWIN_CUDA) && !defined(XWIN_NCCL)
    fprintf(stderr, "error: the launcher started %d ranks, but this GPU build has no NCCL: multi-rank GPU runs need the NCCL build "
                    "(install NCCL's nccl.h and libnccl, then make gpu)\n", world);
    exit(1);
#endif
    int started = 0;  // by the recipe's ranks before their stages (comm_spawn_program), or as a spawned program loaded
    mpiCheck(MPI_Initialized(&started));
    if (!started) mpiCheck(MPI_Init(nullptr, nullptr));
    c->mpi = true;
    mpiCheck(MPI_Comm_rank(MPI_COMM_WORLD, &c->rank));
    mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &c->world));
    if (c->world != world) {  // srun without its MPI plugin: every task is an MPI world of its own
        fprintf(stderr, "error: the launcher started %d ranks but MPI joined %d: under Slurm run srun --mpi=pmix (or pmi2, as the MPI was built), "
                        "or mpirun inside the allocation, or give the GPU build -I <a folder every node sees>\n", world, c->world);
        MPI_Finalize();
        exit(1);
    }
    MPI_Comm node;  // the ranks that share this node's memory
    mpiCheck(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &node));
    mpiCheck(MPI_Comm_rank(node, &c->local_rank));
    mpiCheck(MPI_Comm_free(&node));
#ifdef XWIN_NCCL
    comm_nccl_join(c, [&] {
        ncclUniqueId id;
        if (c->rank == 0) ncclCheck(ncclGetUniqueId(&id));
        mpiCheck(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD));
        return id;
    });
#endif
    if (c->rank > 0 && !freopen("/dev/null", "w", stdout)) fail_file("/dev/null", "cannot open it for rank %d's stdout", c->rank);
#endif
}

// MPI counts are ints: long buffers go in pieces
constexpr size_t COMM_CHUNK = (size_t)1 << 30;

// x (n floats) := its sum over the ranks, on every rank
inline void comm_all_reduce_sum(Comm* c, float* x, size_t n) {
    if (c->world == 1) return;
#if defined(XWIN_NCCL)
    ncclCheck(ncclAllReduce(x, x, n, ncclFloat, ncclSum, c->nccl, c->stream));
#elif defined(XWIN_MPI)
    for (size_t i = 0; i < n; i += COMM_CHUNK) mpiCheck(MPI_Allreduce(MPI_IN_PLACE, x + i, (int)std::min(COMM_CHUNK, n - i), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
#else
    (void)x, (void)n;
#endif
}

#ifdef XWIN_NCCL
// The host's collectives without MPI (-I): its bytes through the device buffer, over NCCL, in
// pieces of COMM_BOUNCE: a broadcast from root, or (sum_doubles) a sum of doubles. The device
// finishes its queued work first: the NCCL calls of every rank then run in the order issued.
inline void comm_host_over_nccl(Comm* c, void* data, size_t bytes, int root, bool sum_doubles) {
    cudaCheck(cudaDeviceSynchronize());
    for (size_t i = 0; i < bytes; i += COMM_BOUNCE) {
        size_t n = std::min(COMM_BOUNCE, bytes - i);
        cudaCheck(cudaMemcpyAsync(c->bounce, (char*)data + i, n, cudaMemcpyHostToDevice, c->host_stream));
        if (sum_doubles) ncclCheck(ncclAllReduce(c->bounce, c->bounce, n / sizeof(double), ncclDouble, ncclSum, c->nccl, c->host_stream));
        else ncclCheck(ncclBroadcast(c->bounce, c->bounce, n, ncclInt8, root, c->nccl, c->host_stream));
        cudaCheck(cudaMemcpyAsync((char*)data + i, c->bounce, n, cudaMemcpyDeviceToHost, c->host_stream));
        cudaCheck(cudaStreamSynchronize(c->host_stream));
    }
}
#endif

inline void comm_all_reduce_sum_double(Comm* c, double* x, size_t n) {
    if (c->world == 1) return;
#ifdef XWIN_NCCL
    if (!c->mpi) return comm_host_over_nccl(c, x, n * sizeof(double), 0, true);
#endif
#ifdef XWIN_MPI
    for (size_t i = 0; i < n; i += COMM_CHUNK) mpiCheck(MPI_Allreduce(MPI_IN_PLACE, x + i, (int)std::min(COMM_CHUNK, n - i), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
#else
    (void)x, (void)n;
#endif
}

// send (n floats in host memory) summed over the ranks into recv (n) on rank root alone, MPI
inline void comm_reduce_sum_host(Comm* c, const float* send, float* recv, size_t n, int root) {
#ifdef XWIN_MPI
    for (size_t i = 0; i < n; i += COMM_CHUNK) {
        mpiCheck(MPI_Reduce(send + i, c->rank == root ? recv + i : nullptr, (int)std::min(COMM_CHUNK, n - i), MPI_FLOAT, MPI_SUM, root, MPI_COMM_WORLD));
    }
#else
    (void)c, (void)send, (void)recv, (void)n, (void)root;
#endif
}

inline void comm_broadcast(Comm* c, void* data, size_t bytes, int root = 0) {
    if (c->world == 1) return;
#ifdef XWIN_NCCL
    if (!c->mpi) return comm_host_over_nccl(c, data, bytes, root, false);
#endif
#ifdef XWIN_MPI
    for (size_t i = 0; i < bytes; i += COMM_CHUNK) mpiCheck(MPI_Bcast((char*)data + i, (int)std::min(COMM_CHUNK, bytes - i), MPI_BYTE, root, MPI_COMM_WORLD));
#else
    (void)data, (void)bytes, (void)root;
#endif
}

// x (shard.n floats on the host): every rank's part [begin, end) of it,
// from that rank to all, as a broadcast per rank (each part in pieces that MPI's int counts hold)
inline void comm_all_gather_host(Comm* c, float* x, const Shard& shard) {
    if (c->world == 1) return;
    for (int root = 0; root < c->world; root++) {
        size_t begin = std::min((size_t)root * shard.per, shard.n), end = std::min(begin + shard.per, shard.n);
        comm_broadcast(c, x + begin, (end - begin) * sizeof(float), root);
    }
}

// every rank's text, in rank order, on rank 0 (the other ranks get ""): each rank broadcasts
// its length, then its bytes (text is small beside a model; one call per rank keeps it simple)
inline std::string comm_gather_text(Comm* c, const std::string& mine) {
    if (c->world == 1) return mine;
    std::string all;
    for (int root = 0; root < c->world; root++) {
        uint64_t len = root == c->rank ? mine.size() : 0;
        comm_broadcast(c, &len, sizeof(len), root);
        std::string piece = root == c->rank ? mine : std::string(len, '\0');
        comm_broadcast(c, piece.data(), len, root);
        if (c->rank == 0) all += piece;
    }
    return all;
}

inline void comm_barrier(Comm* c) {
    if (c->world == 1) return;
#ifdef XWIN_NCCL
    double nothing = 0;
    if (!c->mpi) return comm_host_over_nccl(c, &nothing, sizeof(nothing), 0, true);
#endif
#ifdef XWIN_MPI
    mpiCheck(MPI_Barrier(MPI_COMM_WORLD));
#endif
}

inline void comm_free(Comm* c) {
#ifdef XWIN_NCCL
    if (c->nccl) ncclCheck(ncclCommDestroy(c->nccl));
    if (c->reduce_stream) cudaCheck(cudaStreamDestroy(c->reduce_stream));
    if (c->grads_ready) cudaCheck(cudaEventDestroy(c->grads_ready));
    if (c->reduced) cudaCheck(cudaEventDestroy(c->reduced));
    if (c->bounce) cudaCheck(cudaFree(c->bounce));
    if (c->host_stream) cudaCheck(cudaStreamDestroy(c->host_stream));
#endif
#ifdef XWIN_MPI
    if (c->mpi && !comm_spawned) mpiCheck(MPI_Finalize());  // a spawned program's MPI ends as it exits (comm_spawned_exit)
#endif
    *c = Comm{};
}

// ---- Programs on new ranks: the recipe's stages under mpirun
// mpirun -np N ./train_dpo runs the whole recipe: the stages' programs that run data parallel
// start on N new ranks, spawned by the N ranks together (MPI-2's MPI_Comm_spawn, within the
// launcher's allocation: where the ranks fill the node's slots, mpirun --oversubscribe lets
// them). The children are an MPI world of their own: their MPI_COMM_WORLD and launcher
// variables are theirs, so comm_init gives each its rank and, in the GPU build, its GPU of the
// node; the parents must not hold a GPU while they wait (train_dpo touches none before DPO).
// Rank 0 alone runs everything else, the others waiting for its status (comm_idle_broadcast).
// MPI's blocking calls poll: the parents wait with a probe every 20 ms instead, leaving the
// cores to the children. (The children learn that they are children from XWIN_SPAWNED, which
// OpenMPI's spawn passes with its info key env; other MPIs are not supported here.)

#ifdef XWIN_MPI
// MPI started in a rank of a launcher's world, once (comm_init then finds it started)
inline void comm_mpi_start() {
    int started = 0;
    mpiCheck(MPI_Initialized(&started));
    if (!started) mpiCheck(MPI_Init(nullptr, nullptr));
}

// Every rank of this run calls it together: argv (a program of this project and its arguments)
// runs on `ranks` new ranks. Returns 0 when every child exited 0, else the first non-zero exit
// status a child reported (the children then wait for this run to exit non-zero), or -1 when
// MPI could not start them (*error says why).
inline int comm_spawn_program(const std::vector<std::string>& argv, int ranks, std::string* error) {
    comm_mpi_start();
    std::vector<char*> args;
    for (size_t i = 1; i < argv.size(); i++) args.push_back((char*)argv[i].c_str());
    args.push_back(nullptr);
    char cwd[4096];
    if (!getcwd(cwd, sizeof(cwd))) fail_file(".", "cannot read the working folder: %s", strerror(errno));
    MPI_Info info;
    mpiCheck(MPI_Info_create(&info));
    mpiCheck(MPI_Info_set(info, "wdir", cwd));  // the parents' folder, for relative paths
    mpiCheck(MPI_Info_set(info, "env", "XWIN_SPAWNED=1"));
    MPI_Comm parents, children;
    mpiCheck(MPI_Comm_dup(MPI_COMM_WORLD, &parents));
    mpiCheck(MPI_Comm_set_errhandler(parents, MPI_ERRORS_RETURN));  // a spawn that fails is reported, not fatal
    std::vector<int> codes(ranks);
    int err = MPI_Comm_spawn(argv[0].c_str(), args.data(), ranks, info, 0, parents, &children, codes.data());
    mpiCheck(MPI_Info_free(&info));
    mpiCheck(MPI_Comm_free(&parents));
    if (err != MPI_SUCCESS) {
        char text[MPI_MAX_ERROR_STRING];
        int n = 0;
        MPI_Error_string(err, text, &n);
        *error = std::string(text, n);
        return -1;
    }
    int reported = 0, failed = 0;
    while (reported < ranks && failed == 0) {
        int waiting = 0, status = 0;
        MPI_Status from;
        mpiCheck(MPI_Iprobe(MPI_ANY_SOURCE, COMM_EXIT_TAG, children, &waiting, &from));
        if (!waiting) {
            usleep(20000);
            continue;
        }
        mpiCheck(MPI_Recv(&status, 1, MPI_INT, from.MPI_SOURCE, COMM_EXIT_TAG, children, MPI_STATUS_IGNORE));
        reported++;
        failed = status;
    }
    if (failed == 0) mpiCheck(MPI_Comm_disconnect(&children));
    return failed;
}

// *value of rank 0 to every rank, the others sleeping while they wait (rank 0 works alone)
inline void comm_idle_broadcast(int* value) {
    comm_mpi_start();
    MPI_Request request;
    mpiCheck(MPI_Ibcast(value, 1, MPI_INT, 0, MPI_COMM_WORLD, &request));
    for (int done = 0;;) {
        mpiCheck(MPI_Test(&request, &done, MPI_STATUS_IGNORE));
        if (done) return;
        usleep(20000);
    }
}

// MPI ended in a process that started it with comm_mpi_start and has no Comm to free
inline void comm_mpi_end() {
    int started = 0, ended = 0;
    mpiCheck(MPI_Initialized(&started));
    mpiCheck(MPI_Finalized(&ended));
    if (started && !ended) mpiCheck(MPI_Finalize());
}
#else
inline int comm_spawn_program(const std::vector<std::string>&, int, std::string*) { comm_fail_no_mpi(comm_launcher_world()); }
inline void comm_idle_broadcast(int*) { comm_fail_no_mpi(comm_launcher_world()); }
inline void comm_mpi_end() {}
#endif

#ifdef XWIN_NCCL
// The GPU's all-reduce of a layer's gradients while the backward goes on to the layers below:
// the runner's stream records that layer l's gradients are final (grads_ready), the reduce
// stream waits for that record alone, and sums the layer's 9 tensor slices there in one NCCL
// group. The backward never writes a layer's gradients again after its layer_grads_done.
inline void comm_reduce_layer_grads(LlamaCuda* g, size_t l, void* ctx) {
    Comm* c = (Comm*)ctx;
    size_t offsets[LAYER_TENSORS], counts[LAYER_TENSORS];
    layer_param_slices(g->config, l, offsets, counts);
    cudaCheck(cudaEventRecord(c->grads_ready, g->stream));
    cudaCheck(cudaStreamWaitEvent(c->reduce_stream, c->grads_ready, 0));
    ncclCheck(ncclGroupStart());
    for (int i = 0; i < LAYER_TENSORS; i++) {
        float* x = g->grads_memory + offsets[i];
        ncclCheck(ncclAllReduce(x, x, counts[i], ncclFloat, ncclSum, c->nccl, c->reduce_stream));
    }
    ncclCheck(ncclGroupEnd());
    c->overlapped = true;
}
#endif

#ifdef XWIN_NCCL
// ZeRO-2 on the GPU: n pieces of a micro-batch's gradient (piece i: counts[i] elements of the
// flat gradient from offsets[i], at x[i] in device memory), every element reduced to the rank
// whose part holds it, into its grad_shard, on the reduce stream once the runner's stream has
// written them. After the step's first micro-batch a rank first adds its grad_shard into its
// own elements, so the reduce leaves the step's sum there.
inline void comm_reduce_scatter_pieces(LlamaCuda* g, Comm* c, float* const* x, const size_t* offsets, const size_t* counts, int n) {
    size_t lo, hi;
    for (int i = 0; i < n && c->micro > 0; i++) {
        if (shard_overlap(g->shard, offsets[i], counts[i], &lo, &hi)) {
            gradient_accumulate_cuda(x[i] + (lo - offsets[i]), g->grad_shard + (lo - g->shard.begin), hi - lo, g->stream);
        }
    }
    cudaCheck(cudaEventRecord(c->grads_ready, g->stream));
    cudaCheck(cudaStreamWaitEvent(c->reduce_stream, c->grads_ready, 0));
    ncclCheck(ncclGroupStart());
    for (int i = 0; i < n; i++) {
        for (int root = 0; root < c->world; root++) {  // a piece across a part boundary goes to two ranks
            Shard part = shard_of(g->shard.n, root, c->world);
            if (!shard_overlap(part, offsets[i], counts[i], &lo, &hi)) continue;
            float* recv = root == c->rank ? g->grad_shard + (lo - part.begin) : nullptr;  // used on the root alone
            ncclCheck(ncclReduce(x[i] + (lo - offsets[i]), recv, hi - lo, ncclFloat, ncclSum, root, c->nccl, c->reduce_stream));
        }
    }
    ncclCheck(ncclGroupEnd());
}

// ZeRO-2, the backward's layer_grads_ready: layer l's bucket reduced to the ranks, then zeroed
// for layer l - 2, which waits for bucket_free (CudaOps::layer_grads)
inline void comm_reduce_scatter_layer_grads(LlamaCuda* g, size_t l, void* ctx) {
    Comm* c = (Comm*)ctx;
    size_t offsets[LAYER_TENSORS], counts[LAYER_TENSORS];
    layer_param_slices(g->config, l, offsets, counts);
    LayerTensorsT<float> b = layer_bucket_tensors(g->config, g->buckets[l % 2]);
    float* x[LAYER_TENSORS] = {b.attn_norm, b.wq, b.wk, b.wv, b.wo, b.mlp_norm, b.w_gate, b.w_up, b.w_down};
    comm_reduce_scatter_pieces(g, c, x, offsets, counts, LAYER_TENSORS);
    cudaCheck(cudaMemsetAsync(g->buckets[l % 2], 0, layer_param_count(g->config) * sizeof(float), c->reduce_stream));
    cudaCheck(cudaEventRecord(g->bucket_free[l % 2], c->reduce_stream));
}

// ZeRO-2, after a micro-batch's backward: the embedding's, final norm's and head's gradients
// reduced to the ranks and zeroed; the runner's stream waits for it all (the layers' reduces too)
inline void comm_reduce_scatter_rest(LlamaCuda* g, Comm* c) {
    size_t sizes[NUM_PARAM_TENSORS];
    param_sizes(g->config, sizes);
    size_t final_norm = num_parameters(g->config) - sizes[PARAM_FINAL_NORM] - sizes[PARAM_HEAD];  // the flat offsets of the final norm and the head
    float* x[3] = {g->grads.wte, g->grads.final_norm, g->grads.final_norm + sizes[PARAM_FINAL_NORM]};
    size_t offsets[3] = {0, final_norm, final_norm + sizes[PARAM_FINAL_NORM]}, counts[3] = {sizes[PARAM_WTE], sizes[PARAM_FINAL_NORM], sizes[PARAM_HEAD]};
    comm_reduce_scatter_pieces(g, c, x, offsets, counts, sizes[PARAM_HEAD] ? 3 : 2);  // a tied head is the embedding's
    cudaCheck(cudaMemsetAsync(g->grads_memory, 0, (sizes[PARAM_WTE] + sizes[PARAM_FINAL_NORM] + sizes[PARAM_HEAD]) * sizeof(float), c->reduce_stream));
    cudaCheck(cudaEventRecord(c->reduced, c->reduce_stream));
    cudaCheck(cudaStreamWaitEvent(g->stream, c->reduced, 0));
}
#else
// ZeRO-2 on the host: every element of a micro-batch's gradient (the whole buffer grads) reduced
// to the rank whose part holds it, into its grad_shard, then grads zeroed for the next
// micro-batch. After the step's first micro-batch a rank first adds its grad_shard into its own
// elements, so the reduce leaves the step's sum there.
inline void comm_reduce_scatter_grads_host(Comm* c, float* grads, float* grad_shard, const Shard& sh) {
    if (c->micro > 0) gradient_accumulate(grads + sh.begin, grad_shard, sh.end - sh.begin);
    for (int root = 0; root < c->world; root++) {
        Shard part = shard_of(sh.n, root, c->world);
        comm_reduce_sum_host(c, grads + part.begin, grad_shard, part.end - part.begin, root);
    }
    memset(grads, 0, sh.n * sizeof(float));
}
#endif

// Before micro-batch a of a step's accum on this rank. ZeRO-2: the previous micro-batch's
// gradient goes to its ranks now (the GPU: its embedding, final norm and head; its layers went
// during its backward), and on the GPU this one's layers will go during its backward. Else, on
// the GPU build with several ranks, the last micro-batch's backward starts each layer's
// all-reduce as soon as that layer is done (comm_reduce_layer_grads), so the reduction hides
// behind the layers below it; earlier micro-batches only accumulate. The CPU build without
// ZeRO-2 reduces at the step's end.
inline void runner_micro_batch(Runner* r, Comm* c, int a, int accum) {
    const Shard& sh = runner_shard(r);
#ifdef XWIN_NCCL
    c->stream = r->gpu.stream;
    if (sh.grads) {
        if (a > 0) comm_reduce_scatter_rest(&r->gpu, c);
        c->micro = a;
        r->gpu.layer_grads_ready = comm_reduce_scatter_layer_grads;
        r->gpu.layer_grads_ctx = c;
        return;
    }
    bool last = c->world > 1 && a == accum - 1;
    r->gpu.layer_grads_ready = last ? comm_reduce_layer_grads : nullptr;
    r->gpu.layer_grads_ctx = last ? c : nullptr;
#elif defined(XWIN_CUDA)
    (void)r, (void)c, (void)a, (void)accum, (void)sh;  // one rank: comm_init refuses more without NCCL
#else
    if (sh.grads && a > 0) comm_reduce_scatter_grads_host(c, r->host.grads_memory, r->host.grad_shard, sh);
    c->micro = a;
    (void)accum;
#endif
}

// The runner's gradients summed over the ranks (before the clip and the update). On the GPU,
// after a backward that reduced its layers (runner_micro_batch): the rest (the embedding, the
// final norm, the head) on the reduce stream too, and the runner's stream waits for it all.
inline void runner_all_reduce_grads(Runner* r, Comm* c) {
#ifdef XWIN_CUDA
#ifdef XWIN_NCCL
    c->stream = r->gpu.stream;
    if (r->gpu.shard.grads) {  // ZeRO-2: the last micro-batch's rest; its layers went during its backward
        comm_reduce_scatter_rest(&r->gpu, c);
        r->gpu.layer_grads_ready = nullptr, r->gpu.layer_grads_ctx = nullptr;
        return;
    }
    if (c->overlapped) {
        LlamaCuda* g = &r->gpu;
        size_t sizes[NUM_PARAM_TENSORS], offset = 0;
        param_sizes(g->config, sizes);
        cudaCheck(cudaEventRecord(c->grads_ready, g->stream));
        cudaCheck(cudaStreamWaitEvent(c->reduce_stream, c->grads_ready, 0));
        ncclCheck(ncclGroupStart());
        for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
            bool layer = i >= PARAM_ATTN_NORM && i <= PARAM_W_DOWN;  // reduced during the backward
            if (!layer && sizes[i] > 0) ncclCheck(ncclAllReduce(g->grads_memory + offset, g->grads_memory + offset, sizes[i], ncclFloat, ncclSum, c->nccl, c->reduce_stream));
            offset += sizes[i];
        }
        ncclCheck(ncclGroupEnd());
        cudaCheck(cudaEventRecord(c->reduced, c->reduce_stream));
        cudaCheck(cudaStreamWaitEvent(g->stream, c->reduced, 0));
        c->overlapped = false;
        g->layer_grads_ready = nullptr, g->layer_grads_ctx = nullptr;
        return;
    }
#endif
    comm_all_reduce_sum(c, r->gpu.grads_memory, r->host.num_params);
#else
    if (r->host.shard.grads) comm_reduce_scatter_grads_host(c, r->host.grads_memory, r->host.grad_shard, r->host.shard);  // ZeRO-2
    else comm_all_reduce_sum(c, r->host.grads_memory, r->host.num_params);
#endif
}

// The gradient's norm and clip (runner_clip_grad_norm); ZeRO-2 over the ranks' parts: each sums
// the squares of its part, the ranks add those sums (the CPU build: by the 64 chunks of
// clip_grad_norm, so the norm is ZeRO-0's up to the double sums' rounding)
inline float runner_clip_grads(Runner* r, Comm* c, float max_norm) {
    const Shard& sh = runner_shard(r);
    if (!sh.grads) return runner_clip_grad_norm(r, max_norm);
#ifdef XWIN_CUDA
    return llama_cuda_clip_grad_norm(&r->gpu, max_norm, [c](float* partials, int n) { comm_all_reduce_sum(c, partials, n); });
#else
    return clip_grad_norm(r->host.grad_shard, sh.n, max_norm, sh.begin, sh.end, [c](double* sums, int n) { comm_all_reduce_sum_double(c, sums, n); });
#endif
}

// ZeRO-1, after the update: every rank's updated part of the weights to all ranks. The GPU
// build gathers the compute copy in place on the runner's stream (each part per elements: the
// buffer is padded to world * per); the CPU build gathers the FP32 weights on the host.
inline void runner_all_gather_params(Runner* r, Comm* c) {
    const Shard& sh = runner_shard(r);
    if (sh.world == 1) return;
#ifdef XWIN_CUDA
#ifdef XWIN_NCCL
    size_t part_bytes = sh.per * sizeof(floatX);
    ncclCheck(ncclAllGather((char*)r->gpu.params_memory + (size_t)sh.rank * part_bytes, r->gpu.params_memory, part_bytes, ncclInt8, c->nccl,
                            r->gpu.stream));
#else
    (void)c;
#endif
#else
    comm_all_gather_host(c, r->host.params_memory, sh);
#endif
}

// ----------------------------------------------------------------------------
// Training plumbing shared by the stage programs, so that each stage's main reads as its
// algorithm:
//   flags_parse(argc, argv, ...)           one flag table, every value checked
//   trainer_init(&tr, &cfg.train, name)    finds the checkpoint to resume (-y), cleans up
//   trainer_load_model(&tr, &model, path)  the checkpoint's weights, or the starting model
//   trainer_start(&tr, &runner, ...)       validates the resumed state against this run
//   while (trainer_running(&tr)) {
//       trainer_next_rows(&tr, rows)       the data order; epochs roll over
//       forward, loss, backward            the stage's own algorithm
//       trainer_step_end(&tr, loss, ...)   non-finite guard, clip, lr, AdamW, step line, log
//       trainer_log(&tr, {...})            validation and other lines
//       trainer_checkpoint(&tr)            on its cadence
//   }
//   trainer_save_model(&tr) / trainer_close(&tr)

// splitmix64: one uint64 of state, so a checkpoint saves the generator exactly
inline uint64_t rng_next(uint64_t* state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

inline float rng_uniform(uint64_t* state) { return (float)(rng_next(state) >> 40) / 16777216.0f; }  // [0, 1)

inline float rng_normal(uint64_t* state) {  // Box-Muller
    float u1 = rng_uniform(state), u2 = rng_uniform(state);
    return std::sqrt(-2.0f * std::log(u1 + 1e-12f)) * std::cos(6.2831853f * u2);
}

// The order of the sequences in epoch e: a Fisher-Yates shuffle seeded by (seed, e), so the
// position (epoch, index) alone says where a run is in its data.
inline void epoch_order(std::vector<size_t>& order, size_t n, uint64_t seed, uint64_t epoch) {
    order.resize(n);
    for (size_t i = 0; i < n; i++) order[i] = i;
    uint64_t state = seed * 0x9E3779B97F4A7C15ull + epoch;
    for (size_t i = n; i > 1; i--) std::swap(order[i - 1], order[rng_next(&state) % i]);
}

// Batches of sequences of similar lengths, as transformers' group_by_length: the shuffled order
// is cut into windows of LENGTH_WINDOW batches; in each window the rows are sorted by length
// (longest first) and the window's batches are then put in a shuffled order. A micro-batch is
// padded to its longest sequence, so on the world's data (51..155 tokens, mean 86) this cuts
// the padded tokens of a batch of 8 from 1.41x the real ones (1.54x at 16) to below 1.05x.
constexpr size_t LENGTH_WINDOW = 64;

inline void group_by_length(std::vector<size_t>& order, const std::vector<uint32_t>& lengths, size_t batch, uint64_t seed, uint64_t epoch) {
    size_t n = order.size(), window = LENGTH_WINDOW * batch;
    uint64_t state = (seed ^ 0x6C656E67746873ull) * 0x9E3779B97F4A7C15ull + epoch;  // not the shuffle's stream
    std::vector<size_t> sorted;
    for (size_t w0 = 0; w0 < n; w0 += window) {
        size_t w1 = std::min(n, w0 + window);
        std::stable_sort(order.begin() + w0, order.begin() + w1, [&](size_t a, size_t b) { return lengths[a] > lengths[b]; });
        sorted.assign(order.begin() + w0, order.begin() + w1);
        size_t n_batches = (w1 - w0 + batch - 1) / batch;
        std::vector<size_t> batches(n_batches);
        for (size_t i = 0; i < n_batches; i++) batches[i] = i;
        for (size_t i = n_batches; i > 1; i--) std::swap(batches[i - 1], batches[rng_next(&state) % i]);
        size_t at = w0;
        for (size_t bi : batches) {
            for (size_t j = bi * batch; j < std::min(w1 - w0, (bi + 1) * batch); j++) order[at++] = sorted[j];
        }
    }
}

// linear warmup from 0 to peak over `warmup` steps, then cosine decay to min_ratio * peak
// at max_steps (steps count from 1)
inline float lr_at(int step, int max_steps, int warmup, float peak, float min_ratio) {
    if (step <= warmup) return peak * (float)step / (float)std::max(warmup, 1);
    float progress = (float)(step - warmup) / (float)std::max(max_steps - warmup, 1);
    float cosine = 0.5f * (1.0f + std::cos(3.14159265f * std::min(progress, 1.0f)));
    return peak * (min_ratio + (1.0f - min_ratio) * cosine);
}

// ---- flags: one table per program, one checked parser

// FLAG_PATH must not be empty; FLAG_OPTIONAL_PATH may be '' (none); FLAG_CHOICE is one of
// the words of `choices` ("set|select|eval"), kept as its index.
enum FlagType { FLAG_INT, FLAG_U64, FLAG_FLOAT, FLAG_PATH, FLAG_OPTIONAL_PATH, FLAG_CHOICE };

struct Flag {
    char letter;
    FlagType type;
    void* value;      // int*, uint64_t*, float* or const char** by type (FLAG_CHOICE: int*); holds the default
    double min, max;  // the accepted range of a number (FLAG_INT, FLAG_FLOAT)
    const char* help;
    const char* choices = nullptr;  // FLAG_CHOICE's words, '|' between them
};

// the words of a FLAG_CHOICE flag, in order
inline std::vector<std::string> flag_choices(const Flag& f) {
    std::vector<std::string> words;
    for (const char* c = f.choices; c && *c;) {
        const char* bar = strchr(c, '|');
        words.emplace_back(c, bar ? bar - c : strlen(c));
        c = bar ? bar + 1 : c + strlen(c);
    }
    return words;
}

inline std::string flag_value_text(const Flag& f) {
    switch (f.type) {
        case FLAG_INT: return std::to_string(*(int*)f.value);
        case FLAG_U64: return std::to_string(*(uint64_t*)f.value);
        case FLAG_FLOAT: return string_format("%g", *(float*)f.value);
        case FLAG_CHOICE: return flag_choices(f).at(*(int*)f.value);
        default: return *(const char**)f.value ? string_format("'%s'", *(const char**)f.value) : "''";
    }
}

inline const char* flag_type_name(FlagType t) {
    return t == FLAG_INT || t == FLAG_U64 ? "<int>" : t == FLAG_FLOAT ? "<float>" : t == FLAG_CHOICE ? "<word>" : "<path>";
}

// Parses text into the flag's value. Returns "" or what is wrong with it.
inline std::string flag_set(const Flag& f, const char* text) {
    char* end = nullptr;
    errno = 0;
    if (f.type == FLAG_INT || f.type == FLAG_U64) {
        bool digits = *text && (isdigit((unsigned char)*text) || (*text == '-' && f.type == FLAG_INT && isdigit((unsigned char)text[1])));
        long long i = 0;
        unsigned long long u = 0;
        if (digits) f.type == FLAG_INT ? (void)(i = strtoll(text, &end, 10)) : (void)(u = strtoull(text, &end, 10));
        if (!digits || *end != '\0') return string_format("'%s' is not an integer", text);
        if (f.type == FLAG_U64) {
            if (errno == ERANGE) return string_format("%s is out of range (0..%llu)", text, (unsigned long long)UINT64_MAX);
            *(uint64_t*)f.value = u;
            return "";
        }
        if (errno == ERANGE || i < f.min || i > f.max) return string_format("%s is out of range (%.0f..%.0f)", text, f.min, f.max);
        *(int*)f.value = (int)i;
        return "";
    }
    if (f.type == FLAG_FLOAT) {
        double x = *text ? strtod(text, &end) : 0.0;
        if (!*text || *end != '\0') return string_format("'%s' is not a number", text);
        if (!std::isfinite(x)) return string_format("%s is not a finite number", text);
        if (x < f.min || x > f.max) return string_format("%s is out of range (%g..%g)", text, f.min, f.max);
        *(float*)f.value = (float)x;
        return "";
    }
    if (f.type == FLAG_CHOICE) {
        std::vector<std::string> words = flag_choices(f);
        for (size_t i = 0; i < words.size(); i++) {
            if (words[i] != text) continue;
            *(int*)f.value = (int)i;
            return "";
        }
        std::string list;
        for (size_t i = 0; i < words.size(); i++) list += (i == 0 ? "" : i + 1 == words.size() ? " or " : ", ") + words[i];
        return string_format("'%s' is not one of %s", text, list.c_str());
    }
    if (f.type == FLAG_PATH && !*text) return "the path is empty";
    *(const char**)f.value = text;
    return "";
}


// Reads "-X value" pairs against the table; -h prints the usage made from the table (with
// the defaults) and exits 0. Anything wrong is a one-line error naming the flag, exit 1.
inline void flags_parse(int argc, char** argv, const char* summary, const std::vector<Flag>& flags) {
    std::string usage = string_format("usage: %s [flags]\n%s\n", argv[0], summary);
    for (const Flag& f : flags) {
        std::string range = f.type == FLAG_INT     ? string_format(", %.0f..%.0f", f.min, f.max)
                            : f.type == FLAG_FLOAT  ? string_format(", %g..%g", f.min, f.max)
                            : f.type == FLAG_CHOICE ? string_format(", one of %s", f.choices)
                                                    : "";
        usage += string_format("  -%c %-8s %s (default %s%s)\n", f.letter, flag_type_name(f.type), f.help, flag_value_text(f).c_str(), range.c_str());
    }
    usage += "  -h          this help\n";
    for (int i = 1; i < argc; i++) {
        const char* arg = argv[i];
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            fputs(usage.c_str(), stdout);
            exit(0);
        }
        const Flag* flag = nullptr;
        for (const Flag& f : flags) {
            if (arg[0] == '-' && arg[1] == f.letter && arg[2] == '\0') flag = &f;
        }
        if (!flag) {
            fprintf(stderr, "error: %s '%s' (%s -h lists the flags)\n", arg[0] == '-' ? "unknown flag" : "not a flag:", arg, argv[0]);
            exit(1);
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "error: -%c needs a value %s (%s)\n", flag->letter, flag_type_name(flag->type), flag->help);
            exit(1);
        }
        std::string err = flag_set(*flag, argv[++i]);
        if (!err.empty()) fail_flag(flag->letter, "%s", err.c_str());
    }
}

// ---- what every training run shares: its flags, its identity, its state

struct TrainConfig {
    const char* out_dir = "out";
    int micro_batch = 16;    // sequences per forward/backward, on each rank
    int total_batch = 32;    // sequences per optimizer step over all ranks (a multiple of micro_batch x ranks)
    int max_len = 256;       // longest sequence allowed
    float lr = 0.0f;         // peak learning rate (0: the program's default)
    int warmup = 30;
    int max_steps = 0;       // 0: epochs over the training data
    int epochs = 1;
    float weight_decay = 0.0f;
    float grad_clip = 1.0f;
    int val_every = 100;
    int checkpoint_every = 200;
    int resume = 0;          // 1: from <out_dir>/latest
    int force = 0;           // 1: resume a checkpoint of another run
    int stop_at = 0;         // stop after this step (the schedule still runs to max_steps)
    int zero_stage = 0;      // 1: ZeRO-1, each rank keeps the optimizer state of its part of the weights; 2: and its gradient
    int recompute = 0;       // 1: the backward recomputes each layer's RMSNorm outputs and SwiGLU product
    int skip_nonfinite = 0;  // 1: skip a step whose loss or norm is not finite, else stop
    uint64_t seed = 1337;
    const char* nccl_id_dir = "";  // -I: srun without MPI, NCCL's id through a file in this shared folder
};

// Appends the flags every training program has to a program's own table.
inline void train_flags(std::vector<Flag>* flags, TrainConfig* t) {
    std::vector<Flag> common = {
        {'o', FLAG_PATH, &t->out_dir, 0, 0, "output folder: model.bin, log.jsonl, ckpt_<step>/"},
        {'b', FLAG_INT, &t->micro_batch, 1, 4096, "micro-batch (sequences per forward/backward, on each rank)"},
        {'d', FLAG_INT, &t->total_batch, 1, 1 << 20, "total batch (sequences per step over all ranks; a multiple of -b times the ranks)"},
        {'t', FLAG_INT, &t->max_len, 2, 1 << 20, "longest sequence (at most the model's max_seq_len)"},
        {'l', FLAG_FLOAT, &t->lr, 0, 1, "peak learning rate (0: the program's default)"},
        {'u', FLAG_INT, &t->warmup, 0, 1000000000, "warmup steps (linear), then cosine decay to 0"},
        {'x', FLAG_INT, &t->max_steps, 0, 1000000000, "max steps (0: -E epochs of the training data)"},
        {'E', FLAG_INT, &t->epochs, 1, 1000000, "epochs when -x is 0"},
        {'c', FLAG_FLOAT, &t->weight_decay, 0, 10, "AdamW weight decay (matrices only)"},
        {'G', FLAG_FLOAT, &t->grad_clip, 0, 1e9, "clip the gradient norm to this (0: no clipping)"},
        {'v', FLAG_INT, &t->val_every, 0, 1000000000, "validate every this many steps (0: at the end only)"},
        {'n', FLAG_INT, &t->checkpoint_every, 0, 1000000000, "checkpoint every this many steps (0: at the end only)"},
        {'y', FLAG_INT, &t->resume, 0, 1, "1: resume from <out>/latest"},
        {'F', FLAG_INT, &t->force, 0, 1, "1: resume even a checkpoint of another run (says what differs)"},
        {'X', FLAG_INT, &t->stop_at, 0, 1000000000, "stop after this step with a checkpoint (0: run to the end)"},
        {'z', FLAG_INT, &t->zero_stage, 0, 2, "ZeRO stage: 1 shards the AdamW moments (and the GPU's FP32 master weights) over the ranks, 2 the gradients too"},
        {'Z', FLAG_INT, &t->skip_nonfinite, 0, 1, "1: skip steps with a non-finite loss or norm (counted), 0: stop"},
        {'r', FLAG_INT, &t->recompute, 0, 1, "1: recompute each layer's RMSNorm outputs and SwiGLU product in the backward (less memory)"},
        {'S', FLAG_U64, &t->seed, 0, 0, "seed of the data order and of a new model"},
        {'I', FLAG_OPTIONAL_PATH, &t->nccl_id_dir, 0, 0, "srun without MPI (GPU build): a folder every rank sees, for NCCL's id ('': MPI)"},
    };
    flags->insert(flags->end(), common.begin(), common.end());
}

// What a run is: a resume must find the same (the checkpoint records it in state.bin).
struct RunIdentity {
    char program[16];      // "train_sft", ...
    uint64_t data_size;    // the training file's size in bytes
    uint32_t data_hash;    // CRC-32 of its sequence offsets
    uint32_t model_hash;   // CRC-32 of the model's config (its 256-byte header)
    uint64_t seed;
    uint32_t micro_batch, total_batch, max_len, max_steps, warmup;
    float lr, weight_decay, grad_clip;
    uint32_t world_size;   // ranks of the run (data parallel): a step's rows are split among them
    uint32_t reserved;     // zero
};
static_assert(sizeof(RunIdentity) == 80, "RunIdentity is written to state.bin as is");

// "what: A here, B in the checkpoint; ..." for each field that differs, "" when none does.
inline std::string run_identity_diff(const RunIdentity& now, const RunIdentity& then, const char* now_name = "now",
                                     const char* then_name = "in the checkpoint") {
    std::string out;
    auto field = [&](const char* what, const std::string& a, const std::string& b) {
        if (a != b) out += string_format("%s%s: %s %s, %s %s", out.empty() ? "" : "; ", what, a.c_str(), now_name, b.c_str(), then_name);
    };
    field("program", std::string(now.program, strnlen(now.program, 16)), std::string(then.program, strnlen(then.program, 16)));
    field("training data (bytes, offsets hash)", string_format("%llu/%08x", (unsigned long long)now.data_size, now.data_hash),
          string_format("%llu/%08x", (unsigned long long)then.data_size, then.data_hash));
    field("model config (header hash)", string_format("%08x", now.model_hash), string_format("%08x", then.model_hash));
    field("seed -S", std::to_string(now.seed), std::to_string(then.seed));
    field("micro-batch -b", std::to_string(now.micro_batch), std::to_string(then.micro_batch));
    field("total batch -d", std::to_string(now.total_batch), std::to_string(then.total_batch));
    field("max length -t", std::to_string(now.max_len), std::to_string(then.max_len));
    field("max steps", std::to_string(now.max_steps), std::to_string(then.max_steps));
    field("warmup -u", std::to_string(now.warmup), std::to_string(then.warmup));
    field("lr -l", string_format("%g", now.lr), string_format("%g", then.lr));
    field("weight decay -c", string_format("%g", now.weight_decay), string_format("%g", then.weight_decay));
    field("clip -G", string_format("%g", now.grad_clip), string_format("%g", then.grad_clip));
    field("ranks", std::to_string(now.world_size), std::to_string(then.world_size));
    return out;
}

struct TrainState {
    uint32_t step = 0;       // optimizer steps done (skipped ones included)
    uint32_t adam_step = 0;  // AdamW updates done: step - skipped
    uint32_t skipped = 0;    // steps skipped for a non-finite loss or norm (-Z 1)
    uint64_t epoch = 0;
    uint64_t position = 0;   // next index into the epoch's order
    uint64_t rng = 0;        // the stage's random generator (sampling, dropout of pairs, ...)
};

// Training state file (state.bin), versions 3 and 4, little-endian:
//   0  uint32 magic 0x54535758 ("XWST")   4  uint32 version (3, or 4: see below)
//   8  uint32 step                        12 uint32 adam_step
//   16 uint32 skipped                     20 uint32 model_crc: CRC-32 of the checkpoint's model.bin
//   24 uint64 num_params                  32 uint64 epoch
//   40 uint64 position                    48 uint64 rng
//   56 RunIdentity (80 bytes, as the struct above; the program name zero-padded to 16 bytes,
//      its padding and the reserved word checked as zero like every reader's reserved bytes;
//      version 3 added the world size and the reserved word)
//   136 float32 m[num_params], float32 v[num_params] (AdamW moments)
//   then uint32 crc: CRC-32 of every byte before it.
// Version 4 is the same header with no moments (136 header, then the crc): the checkpoint of
// a ZeRO-1 run on several ranks, whose moments are in the shard files below, one per rank of
// the identity's world size. A run without ZeRO, or of one rank, writes version 3.
//
// Optimizer shard file (shard_<rank>_of_<world>.bin, ZeRO-1 on several ranks), version 1: each
// rank writes the AdamW moments of its own part of the weights, so no rank gathers the others'
// (8 bytes per parameter on rank 0) and the ranks write in parallel. Little-endian:
//   0  uint32 magic 0x48535758 ("XWSH")   4  uint32 version = 1
//   8  uint32 rank                        12 uint32 world
//   16 uint32 step                        20 uint32 reserved (zero)
//   24 uint64 num_params                  32 uint64 begin, 40 uint64 end: the part [begin, end),
//                                            shard_of(num_params, rank, world)
//   48 RunIdentity (80 bytes, state.bin's: a file of another run is refused)
//   128 float32 m[end - begin], float32 v[end - begin]
//   then uint32 crc: CRC-32 of every byte before it.
// The GPU build's FP32 master weights are not in the shard files: model.bin holds all of them
// (each rank's master part is gathered to write it, and those are the weights anyway), and a
// resumed rank takes its part of the master from there.
//
// A checkpoint is a folder <out>/ckpt_<step>/ with model.bin (FP32 master weights), state.bin
// and, with ZeRO-1 on several ranks, the shard files. The marker that makes it complete is
// <out>/latest, which names the newest complete checkpoint: rank 0 writes it last, after a
// barrier that every rank reaches once its shard file is in place, so a crash (of any rank)
// never leaves a half-written checkpoint where a resume would look, and a folder that lacks a
// file is never named by it. Every file is written atomically (AtomicFile) and fsynced before
// its rename. The ranks write into the same folder: several nodes need a shared file system.
constexpr uint32_t STATE_MAGIC = 0x54535758;
constexpr uint32_t STATE_VERSION = 3;          // the moments in state.bin
constexpr uint32_t STATE_VERSION_SHARDED = 4;  // the moments in the ranks' shard files
constexpr size_t STATE_HEADER_BYTES = 136;
constexpr uint32_t SHARD_MAGIC = 0x48535758;
constexpr uint32_t SHARD_VERSION = 1;
constexpr size_t SHARD_HEADER_BYTES = 128;

// mkdir -p
inline void make_dir(const std::string& path) {
    for (size_t i = 1; i <= path.size(); i++) {
        if (i < path.size() && path[i] != '/') continue;
        std::string prefix = path.substr(0, i);
        if (mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) fail_file(prefix.c_str(), "cannot create the folder: %s", strerror(errno));
    }
}

inline bool ends_with(const std::string& s, const char* suffix) {
    size_t n = strlen(suffix);
    return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

// The *.tmp files an interrupted write left in out_dir and its ckpt_* folders (regular files
// only: AtomicFile writes no other kind).
inline std::vector<std::string> leftover_tmp_files(const std::string& out_dir) {
    std::vector<std::string> found, dirs = {out_dir};
    for (size_t d = 0; d < dirs.size(); d++) {
        DIR* dir = opendir(dirs[d].c_str());
        if (!dir) continue;
        while (struct dirent* e = readdir(dir)) {
            std::string name = e->d_name, path = dirs[d] + "/" + name;
            struct stat st;
            if (lstat(path.c_str(), &st) != 0) continue;
            if (d == 0 && S_ISDIR(st.st_mode) && name.rfind("ckpt_", 0) == 0) dirs.push_back(path);
            else if (S_ISREG(st.st_mode) && ends_with(name, ".tmp")) found.push_back(path);
        }
        closedir(dir);
    }
    return found;
}

inline int remove_leftover_tmp(const std::string& out_dir) {
    int removed = 0;
    for (const std::string& path : leftover_tmp_files(out_dir)) removed += remove(path.c_str()) == 0;
    return removed;
}

inline std::string checkpoint_name(uint32_t step) { return string_format("ckpt_%06u", step); }

// The checkpoint folder <out_dir>/latest names, or "" when there is no such file.
inline std::string checkpoint_latest(const std::string& out_dir) {
    std::string path = out_dir + "/latest";
    FILE* f = fopen(path.c_str(), "r");
    if (!f) return "";
    char name[64] = {0};
    bool ok = fscanf(f, "%63s", name) == 1;
    fclose(f);
    unsigned step;
    char rest;
    if (!ok || sscanf(name, "ckpt_%u%c", &step, &rest) != 1 || checkpoint_name(step) != name) {
        fail_file(path.c_str(), "does not name a checkpoint folder (ckpt_<step>)");
    }
    return out_dir + "/" + name;
}

// ---- the trainer: a run's state between the stage's own lines

struct Metric {
    const char* name;
    double value;
};

struct Trainer {
    const TrainConfig* cfg = nullptr;
    const char* program = "";
    Runner* runner = nullptr;
    Comm comm;                     // the ranks of a data-parallel run (a world of 1 without a launcher)
    std::string resume_dir;        // the checkpoint this run resumes ("" for a fresh run)
    uint32_t resume_model_crc = 0; // the CRC-32 of its model.bin as read
    RunIdentity id{};
    TrainState state;
    size_t n_seqs = 0;             // sequences (or pairs) in the training data
    int max_steps = 0;
    int accum = 1;                 // micro-batches per step on each rank: total_batch / (micro_batch * ranks)
    std::vector<size_t> order;     // (n_seqs) the current epoch's order
    std::vector<uint32_t> lengths; // (n_seqs) each row's tokens, set before trainer_start: batches of
                                   // similar lengths (group_by_length); empty: the plain shuffle
    AdamWConfig opt{};
    std::string log_path;
    FILE* log = nullptr;
    std::chrono::steady_clock::time_point t0;
};

// The order of epoch e: the shuffle, then (with lengths) batches of similar lengths
inline void trainer_epoch_order(Trainer* tr, uint64_t epoch) {
    epoch_order(tr->order, tr->n_seqs, tr->cfg->seed, epoch);
    if (!tr->lengths.empty()) group_by_length(tr->order, tr->lengths, (size_t)tr->cfg->total_batch, tr->cfg->seed, epoch);
}

// Joins the ranks (comm_init: before anything is allocated on a GPU), checks the batch flags,
// makes the output folder, removes what an interrupted write left there (rank 0), and with
// -y 1 finds the checkpoint to resume (every rank reads it; rank 0 alone writes in out_dir).
inline void trainer_init(Trainer* tr, const TrainConfig* cfg, const char* program) {
    tr->cfg = cfg;
    tr->program = program;
    comm_init(&tr->comm, cfg->nccl_id_dir);
    int world = tr->comm.world;
    if (cfg->total_batch % cfg->micro_batch != 0) fail_flag('d', "the total batch %d is not a multiple of the micro-batch -b %d", cfg->total_batch, cfg->micro_batch);
    if (cfg->total_batch % (cfg->micro_batch * world) != 0) {
        fail_flag('d', "the total batch %d is not a multiple of the micro-batch -b %d times the %d ranks", cfg->total_batch, cfg->micro_batch, world);
    }
    make_dir(cfg->out_dir);
    int removed = tr->comm.rank == 0 ? remove_leftover_tmp(cfg->out_dir) : 0;
    if (removed) printf("removed %d unfinished .tmp file%s of an interrupted write from %s\n", removed, removed == 1 ? "" : "s", cfg->out_dir);
    if (cfg->resume) {
        tr->resume_dir = checkpoint_latest(cfg->out_dir);
        if (tr->resume_dir.empty()) fail_file(cfg->out_dir, "has no checkpoint to resume from (no 'latest' file); run without -y 1 to start");
    }
}

// The parameters whose optimizer state this rank keeps, for runner_init: with -z 1 its part of
// the model's n parameters, else all of them.
inline Shard trainer_shard(const Trainer* tr, size_t n) {
    Shard s = tr->cfg->zero_stage >= 1 ? shard_of(n, tr->comm.rank, tr->comm.world) : shard_of(n, 0, 1);
    s.grads = tr->cfg->zero_stage >= 2 && tr->comm.world > 1;
    return s;
}

// The model to train: the checkpoint's weights when resuming, else model_path's. Returns
// false when there is neither (the program then makes a new model).
inline bool trainer_load_model(Trainer* tr, Llama* model, const char* model_path) {
    if (!tr->resume_dir.empty()) {
        llama_load(model, (tr->resume_dir + "/model.bin").c_str(), &tr->resume_model_crc);
        return true;
    }
    if (!model_path) return false;
    llama_load(model, model_path);
    return true;
}

// Appends to the log in place of the lines after `step` (a resumed run repeats them).
inline void log_truncate(const std::string& path, uint32_t step) {
    FILE* f = fopen(path.c_str(), "r");
    if (!f) return;
    std::string kept, line;
    char buf[4096];
    while (fgets(buf, sizeof(buf), f)) {
        line += buf;
        if (line.back() != '\n' && !feof(f)) continue;
        const char* p = strstr(line.c_str(), "\"step\": ");
        if (!p || strtoul(p + 8, nullptr, 10) <= step) kept += line.back() == '\n' ? line : line + "\n";
        line.clear();
    }
    fclose(f);
    AtomicFile out;
    atomic_open(&out, path);
    atomic_write(&out, kept.data(), kept.size());
    atomic_commit(&out);
}

// The FP32 weights whole in every rank's host model: downloaded, and with ZeRO-1 on the GPU
// each rank's master part gathered (the CPU build's weights are whole after every update).
// Every rank calls it.
inline void trainer_gather_weights(Trainer* tr) {
    runner_download_params(tr->runner);
#ifdef XWIN_CUDA
    comm_all_gather_host(&tr->comm, tr->runner->host.params_memory, runner_shard(tr->runner));
#endif
}

inline std::string shard_file_name(int rank, int world) { return string_format("shard_%d_of_%d.bin", rank, world); }

// This rank's shard file in the checkpoint folder dir: the moments m, v of its part sh.
inline void shard_save(const std::string& dir, const Shard& sh, uint32_t step, const RunIdentity& id, const float* m, const float* v) {
    unsigned char head[SHARD_HEADER_BYTES] = {0};
    uint32_t u[6] = {SHARD_MAGIC, SHARD_VERSION, (uint32_t)sh.rank, (uint32_t)sh.world, step, 0};
    uint64_t q[3] = {sh.n, sh.begin, sh.end};
    memcpy(head, u, sizeof(u));
    memcpy(head + 24, q, sizeof(q));
    memcpy(head + 48, &id, sizeof(RunIdentity));
    size_t part = sh.end - sh.begin;
    AtomicFile f;
    atomic_open(&f, dir + "/" + shard_file_name(sh.rank, sh.world));
    atomic_write(&f, head, sizeof(head));
    atomic_write(&f, m, 4 * part);
    atomic_write(&f, v, 4 * part);
    uint32_t crc = f.crc;
    atomic_write(&f, &crc, 4);
    atomic_commit(&f);
}

// One shard file that must hold the moments of `part` at `step` of the run `then` (its
// state.bin's identity): checked whole (size, checksum, header, identity), and the moments of
// [lo, hi) copied into m and v (hi - lo values each). It is read in pieces, never whole in
// memory. Returns "" or what is wrong with it.
inline std::string shard_read(const std::string& path, const Shard& part, uint32_t step, const RunIdentity& then, size_t lo, size_t hi, float* m,
                              float* v) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return string_format("cannot open it (%s): the checkpoint keeps its AdamW moments in %d shard files, one per rank", strerror(errno), part.world);
    size_t size = file_size_of(f), count = part.end - part.begin, expected = SHARD_HEADER_BYTES + 8 * count + 4;
    if (size != expected) {
        fclose(f);
        return string_format("file is %zu bytes, expected %zu (rank %d of %d: the moments of %zu parameters)", size, expected, part.rank, part.world, count);
    }
    unsigned char head[SHARD_HEADER_BYTES];
    bool ok = fread(head, 1, sizeof(head), f) == sizeof(head);
    uint32_t crc = crc32_update(0, head, sizeof(head)), stored_crc = 0;
    std::vector<float> piece(1 << 18);  // 1 MiB: added to the checksum, its overlap with [lo, hi) copied out
    for (float* dst : {m, v}) {
        for (size_t i = part.begin; ok && i < part.end; i += piece.size()) {
            size_t c = std::min(piece.size(), part.end - i), a = std::max(i, lo), b = std::min(i + c, hi);
            ok = fread(piece.data(), 4, c, f) == c;
            crc = crc32_update(crc, piece.data(), 4 * c);
            if (ok && a < b) memcpy(dst + (a - lo), piece.data() + (a - i), 4 * (b - a));
        }
    }
    ok = ok && fread(&stored_crc, 4, 1, f) == 1;
    fclose(f);
    if (!ok) return "unexpected end of file or read error";
    uint32_t u[6];
    uint64_t q[3];
    RunIdentity id;
    memcpy(u, head, sizeof(u));
    memcpy(q, head + 24, sizeof(q));
    memcpy(&id, head + 48, sizeof(id));
    if (u[0] != SHARD_MAGIC) return string_format("bad magic 0x%08x: not an xwin.cu optimizer shard", u[0]);
    if (u[1] != SHARD_VERSION) return string_format("optimizer shard version %u; this build reads version %u only", u[1], SHARD_VERSION);
    if (crc != stored_crc) return string_format("checksum mismatch (stored %08x, computed %08x): the file is corrupt", stored_crc, crc);
    std::string reserved = reserved_bytes_check(head, 20, 24);
    if (reserved.empty()) reserved = reserved_bytes_check(head, 48 + strnlen(id.program, sizeof(id.program)), 48 + sizeof(id.program));
    if (reserved.empty()) reserved = reserved_bytes_check(head, 48 + offsetof(RunIdentity, reserved), 48 + sizeof(RunIdentity));
    if (!reserved.empty()) return reserved;
    if (u[2] != (uint32_t)part.rank || u[3] != (uint32_t)part.world) {
        return string_format("holds the part of rank %u of %u, expected rank %d of %d", u[2], u[3], part.rank, part.world);
    }
    if (u[4] != step) return string_format("holds step %u, its checkpoint's state.bin step %u", u[4], step);
    if (q[0] != part.n || q[1] != part.begin || q[2] != part.end) {
        return string_format("holds parameters [%llu, %llu) of %llu, expected [%zu, %zu) of %zu", (unsigned long long)q[1], (unsigned long long)q[2],
                             (unsigned long long)q[0], part.begin, part.end, part.n);
    }
    std::string diff = run_identity_diff(id, then, "in this file", "in state.bin");
    if (!diff.empty()) return "is of another run than its checkpoint's state.bin (" + diff + ")";
    return "";
}

// The moments of the part `want` of the flat parameters (want.end - want.begin values into m
// and v) out of the shard files that `world` ranks wrote into the checkpoint folder dir: from
// each file whose part overlaps it. Parts are contiguous ranges, so any part reads from the
// files of any number of ranks: a ZeRO-1 checkpoint resumes with -z 0 (each rank reads every
// file) as with -z 1 (each rank reads its own). Returns "" or "<file>: what is wrong".
inline std::string shards_load(const std::string& dir, const Shard& want, uint32_t world, uint32_t step, const RunIdentity& then, float* m, float* v) {
    for (uint32_t k = 0; k < world; k++) {
        Shard part = shard_of(want.n, (int)k, (int)world);
        size_t lo, hi;
        if (!shard_overlap(want, part.begin, part.end - part.begin, &lo, &hi)) continue;
        std::string path = dir + "/" + shard_file_name((int)k, (int)world);
        std::string err = shard_read(path, part, step, then, lo, hi, m + (lo - want.begin), v + (lo - want.begin));
        if (!err.empty()) return path + ": " + err;
    }
    return "";
}

// Every rank calls it. The weights are gathered for rank 0 to write model.bin (the GPU's
// ZeRO-1 master parts). Without ZeRO, or on one rank, rank 0 writes state.bin with the whole
// moments (version 3); with ZeRO-1 on several ranks each rank writes its part's moments to its
// own shard file, in parallel, and rank 0 a state.bin without moments (version 4). Then the
// marker, <out>/latest, once every rank's file is in place.
inline void checkpoint_save(Trainer* tr) {
    Runner* r = tr->runner;
    const TrainState& s = tr->state;
    const Shard& sh = runner_shard(r);
    bool sharded = sh.world > 1;
    trainer_gather_weights(tr);
    size_t n = r->host.num_params, part = sh.end - sh.begin;
    std::string name = checkpoint_name(s.step), dir = std::string(tr->cfg->out_dir) + "/" + name;
    if (!sharded && tr->comm.rank != 0) return;
    std::vector<float> m(part), v(part);  // this rank's part (all of them without ZeRO)
    int adam_step;
    runner_get_optimizer(r, m.data(), v.data(), &adam_step);
    make_dir(dir);
    if (sharded) shard_save(dir, sh, s.step, tr->id, m.data(), v.data());
    if (tr->comm.rank == 0) {
        uint32_t model_crc = llama_save(&r->host, (dir + "/model.bin").c_str(), DTYPE_FP32);
        unsigned char head[STATE_HEADER_BYTES] = {0};
        uint32_t u[6] = {STATE_MAGIC, sharded ? STATE_VERSION_SHARDED : STATE_VERSION, s.step, (uint32_t)adam_step, s.skipped, model_crc};
        uint64_t q[4] = {n, s.epoch, s.position, s.rng};
        memcpy(head, u, sizeof(u));
        memcpy(head + 24, q, sizeof(q));
        memcpy(head + 56, &tr->id, sizeof(RunIdentity));
        AtomicFile f;
        atomic_open(&f, dir + "/state.bin");
        atomic_write(&f, head, sizeof(head));
        if (!sharded) atomic_write(&f, m.data(), 4 * n), atomic_write(&f, v.data(), 4 * n);
        uint32_t crc = f.crc;
        atomic_write(&f, &crc, 4);
        atomic_commit(&f);
    }
    // A rank whose write failed has exited, and the launcher ends the run: rank 0 never passes
    // this barrier then, so the marker names only a checkpoint whose every file is in place.
    if (sharded) comm_barrier(&tr->comm);
    if (tr->comm.rank != 0) return;
    AtomicFile f;
    atomic_open(&f, std::string(tr->cfg->out_dir) + "/latest");
    std::string line = name + "\n";
    atomic_write(&f, line.data(), line.size());
    atomic_commit(&f);
}

// Reads the resumed checkpoint's state.bin into the trainer, and this rank's part of the AdamW
// moments (from state.bin, or from the shard files of a ZeRO-1 run of several ranks, whatever
// this run's ZeRO stage) into the runner's optimizer, and checks that it is whole (checksums),
// consistent (step, folder, optimizer count, position, each shard's part) and of this run (its
// identity; -F 1 resumes another run's, saying what differs: on another number of ranks, a
// ZeRO-1 checkpoint's moments are read across the shard files into this run's parts).
inline void checkpoint_load_state(Trainer* tr) {
    std::string path = tr->resume_dir + "/state.bin", latest = std::string(tr->cfg->out_dir) + "/latest";
    const char* p = path.c_str();
    FILE* f = fopen_check(p, "rb");
    size_t n = tr->runner->host.num_params, size = file_size_of(f);
    if (size < STATE_HEADER_BYTES + 4) fail_file(p, "file is %zu bytes, shorter than the %zu-byte header and checksum", size, STATE_HEADER_BYTES + 4);
    std::vector<unsigned char> bytes(size);
    fread_check(bytes.data(), 1, size, f, p);
    fclose(f);
    uint32_t u[6], stored_crc;
    uint64_t q[4];
    RunIdentity then;
    memcpy(u, bytes.data(), sizeof(u));
    memcpy(q, bytes.data() + 24, sizeof(q));
    memcpy(&then, bytes.data() + 56, sizeof(then));
    memcpy(&stored_crc, bytes.data() + size - 4, 4);
    if (u[0] != STATE_MAGIC) fail_file(p, "bad magic 0x%08x: not an xwin.cu training state", u[0]);
    if (u[1] != STATE_VERSION && u[1] != STATE_VERSION_SHARDED) {
        fail_file(p, "training state version %u; this build resumes versions %u and %u only: start the run again", u[1], STATE_VERSION, STATE_VERSION_SHARDED);
    }
    bool sharded = u[1] == STATE_VERSION_SHARDED;  // the moments in the shard files of then.world_size ranks
    uint32_t crc = crc32_update(0, bytes.data(), size - 4);
    if (crc != stored_crc) fail_file(p, "checksum mismatch (stored %08x, computed %08x): the file is corrupt", stored_crc, crc);
    size_t name_end = 56 + strnlen(then.program, sizeof(then.program));
    std::string reserved = reserved_bytes_check(bytes.data(), name_end, 56 + sizeof(then.program));
    if (!reserved.empty()) fail_file(p, "%s (the program name is zero-padded)", reserved.c_str());
    reserved = reserved_bytes_check(bytes.data(), 56 + offsetof(RunIdentity, reserved), 56 + sizeof(RunIdentity));
    if (!reserved.empty()) fail_file(p, "%s", reserved.c_str());
    if (q[0] != n) fail_file(p, "holds the state of %llu parameters, the model has %zu", (unsigned long long)q[0], n);
    size_t expected = STATE_HEADER_BYTES + (sharded ? 0 : 8 * n) + 4;
    if (size != expected) fail_file(p, "file is %zu bytes, expected %zu", size, expected);
    if (sharded && then.world_size < 2) fail_file(p, "keeps the moments in shard files, but its run had %u rank", then.world_size);
    if (u[5] != tr->resume_model_crc) {
        fail_file((tr->resume_dir + "/model.bin").c_str(), "checksum %08x differs from the %08x state.bin recorded: the checkpoint is corrupt", tr->resume_model_crc, u[5]);
    }
    TrainState s;
    s.step = u[2], s.adam_step = u[3], s.skipped = u[4], s.epoch = q[1], s.position = q[2], s.rng = q[3];
    std::string folder = tr->resume_dir.substr(tr->resume_dir.find_last_of('/') + 1);
    if (folder != checkpoint_name(s.step)) fail_file(p, "holds step %u but its folder is %s", s.step, folder.c_str());
    std::string diff = run_identity_diff(tr->id, then);
    if (!diff.empty() && !tr->cfg->force) {
        fail_file(latest.c_str(), "%s is of another run (%s); resume it with the same flags and data, start afresh in another -o folder, or add -F 1", folder.c_str(), diff.c_str());
    }
    if (!diff.empty()) printf("warning: -F 1: resuming %s of another run (%s)\n", folder.c_str(), diff.c_str());
    if (s.step < 1 || s.step > (uint32_t)tr->max_steps) fail_file(p, "step %u is outside this run's steps 1..%d", s.step, tr->max_steps);
    if ((uint64_t)s.adam_step + s.skipped != s.step) fail_file(p, "the optimizer has taken %u steps and %u were skipped, at step %u: inconsistent", s.adam_step, s.skipped, s.step);
    if (s.position > tr->n_seqs) fail_file(p, "position %llu is beyond the %zu sequences of the training data", (unsigned long long)s.position, tr->n_seqs);
    if (diff.empty() && s.epoch * tr->n_seqs + s.position != (uint64_t)s.step * tr->cfg->total_batch) {
        fail_file(p, "epoch %llu, position %llu is not where step %u of %d sequences each ends in %zu sequences: inconsistent", (unsigned long long)s.epoch,
                  (unsigned long long)s.position, s.step, tr->cfg->total_batch, tr->n_seqs);
    }
    // this rank's part of the moments (all of them without ZeRO), from state.bin or the shard files
    Shard sh = runner_shard(tr->runner);
    size_t part = sh.end - sh.begin;
    std::vector<float> m(part), v(part);
    if (!sharded) {
        memcpy(m.data(), bytes.data() + STATE_HEADER_BYTES + 4 * sh.begin, 4 * part);
        memcpy(v.data(), bytes.data() + STATE_HEADER_BYTES + 4 * (n + sh.begin), 4 * part);
    } else {
        std::string err = shards_load(tr->resume_dir, sh, then.world_size, s.step, then, m.data(), v.data());
        // each rank reads its own files: the ranks agree to stop, so that none waits in a
        // collective for one that failed, and the first rank that failed names its file
        std::vector<double> failed(tr->comm.world, 0.0);
        failed[tr->comm.rank] = err.empty() ? 0.0 : 1.0;
        comm_all_reduce_sum_double(&tr->comm, failed.data(), failed.size());
        int first = (int)(std::find(failed.begin(), failed.end(), 1.0) - failed.begin());
        if (first < tr->comm.world) {
            if (first == tr->comm.rank) fprintf(stderr, "error: %s\n", err.c_str());
            comm_free(&tr->comm);
            exit(1);
        }
    }
    runner_set_optimizer(tr->runner, m.data(), v.data(), (int)s.adam_step);
    tr->state = s;
}

// Starts (or resumes) the run over training data of n_seqs sequences whose file has
// data_size bytes and offsets hash data_hash: the run's identity, the number of steps, the
// resumed state (checked), the log. The runner must be initialised for training.
inline void trainer_start(Trainer* tr, Runner* r, size_t n_seqs, uint64_t data_size, uint32_t data_hash) {
    const TrainConfig& c = *tr->cfg;
    tr->runner = r;
    tr->n_seqs = n_seqs;
    tr->accum = c.total_batch / (c.micro_batch * tr->comm.world);
    size_t steps_per_epoch = n_seqs / c.total_batch;
    tr->max_steps = c.max_steps > 0 ? c.max_steps : (int)std::min(steps_per_epoch * c.epochs, (size_t)1000000000);
    if (tr->max_steps == 0) fail_file(c.out_dir, "the training data has %zu sequences, fewer than one total batch -d %d: no step to take", n_seqs, c.total_batch);
    RunIdentity& id = tr->id;
    memcpy(id.program, tr->program, std::min(strlen(tr->program), sizeof(id.program)));
    unsigned char header[MODEL_HEADER_BYTES];
    model_header_write(header, r->host.config, DTYPE_FP32);
    id.data_size = data_size, id.data_hash = data_hash, id.model_hash = crc32_update(0, header, sizeof(header)), id.seed = c.seed;
    id.micro_batch = c.micro_batch, id.total_batch = c.total_batch, id.max_len = c.max_len, id.max_steps = tr->max_steps, id.warmup = c.warmup;
    id.lr = c.lr, id.weight_decay = c.weight_decay, id.grad_clip = c.grad_clip;
    id.world_size = (uint32_t)tr->comm.world;
    if (tr->comm.world > 1) {  // every rank must run rank 0's run: the same flags, data and model
        RunIdentity first = id;
        comm_broadcast(&tr->comm, &first, sizeof(first));
        std::string diff = run_identity_diff(id, first, string_format("on rank %d", tr->comm.rank).c_str(), "on rank 0");
        double differ = diff.empty() ? 0.0 : 1.0;
        comm_all_reduce_sum_double(&tr->comm, &differ, 1);
        if (differ > 0) {
            if (!diff.empty()) fprintf(stderr, "error: rank %d runs with other settings than rank 0 (%s): give every rank the same flags and files\n", tr->comm.rank, diff.c_str());
            comm_free(&tr->comm);
            exit(1);
        }
    }
    tr->log_path = std::string(c.out_dir) + "/log.jsonl";
    bool writer = tr->comm.rank == 0;  // rank 0 alone writes the log, checkpoints and models
    if (!tr->resume_dir.empty()) {
        checkpoint_load_state(tr);
        if (writer) log_truncate(tr->log_path, tr->state.step);
    } else {
        tr->state = TrainState{};
        tr->state.rng = c.seed;
        std::string latest = std::string(c.out_dir) + "/latest";  // an older run's: never resume into it
        if (writer && remove(latest.c_str()) == 0) printf("fresh run: removed %s of an earlier run in %s\n", latest.c_str(), c.out_dir);
    }
    if (writer) tr->log = fopen_check(tr->log_path.c_str(), tr->resume_dir.empty() ? "w" : "a");
    if (tr->comm.world > 1) {
        printf("data parallel: %d ranks, each %d micro-batch%s of %d per step (total batch %d)%s\n", tr->comm.world, tr->accum, tr->accum == 1 ? "" : "es",
               c.micro_batch, c.total_batch,
               c.zero_stage == 2   ? "; ZeRO-2: each rank keeps the optimizer state and the gradient of 1/ranks of the weights"
               : c.zero_stage == 1 ? "; ZeRO-1: each rank keeps the optimizer state of 1/ranks of the weights"
                                   : "");
    }
    if (!tr->lengths.empty() && tr->lengths.size() != n_seqs) fail_file(c.out_dir, "internal: %zu row lengths for %zu rows", tr->lengths.size(), n_seqs);
    trainer_epoch_order(tr, tr->state.epoch);
    tr->opt = AdamWConfig{c.lr, 0.9f, 0.999f, 1e-8f, c.weight_decay};  // Xwin-LM: betas 0.9/0.999
#ifdef XWIN_CUDA
    const GpuInfo& gpu = gpu_info();
    if (gpu.peak > 0) printf("GPU %s: dense peak %.1f TFLOP/s in %s, the step line's MFU\n", gpu.name.c_str(), gpu.peak / 1e12, sizeof(floatX) == 2 ? "bf16" : "fp32");
    else printf("GPU %s: its peak is not in gpu_peak_flops's table, so the step line shows no MFU\n", gpu.name.c_str());
#endif
}

inline bool trainer_running(const Trainer* tr) {
    return (int)tr->state.step < tr->max_steps && (tr->cfg->stop_at == 0 || (int)tr->state.step < tr->cfg->stop_at);
}

// The next step's rows (total_batch of them) in the epochs' orders; starts the step's clock.
// Every rank draws all of them (the same on every rank); trainer_rank_rows is its share.
inline void trainer_next_rows(Trainer* tr, size_t* rows) {
    tr->t0 = std::chrono::steady_clock::now();
    TrainState& s = tr->state;
    for (int i = 0; i < tr->cfg->total_batch; i++) {
        if (s.position == tr->n_seqs) {
            s.epoch += 1;
            s.position = 0;
            trainer_epoch_order(tr, s.epoch);
        }
        rows[i] = tr->order[s.position++];
    }
}

// This rank's rows of a step's rows: total_batch / ranks of them, in the global order (rank r
// takes the r-th slice), so that the ranks' micro-batches are the micro-batches a run of one
// rank with as many accumulation steps takes, in the same order.
inline const size_t* trainer_rank_rows(const Trainer* tr, const size_t* rows) {
    return rows + (size_t)tr->comm.rank * (tr->cfg->total_batch / tr->comm.world);
}

// Before each of this rank's micro-batches a = 0..accum-1 of a step (the GPU's data-parallel
// runs then reduce the last one's gradients layer by layer during its backward).
inline void trainer_micro_batch(Trainer* tr, int a) { runner_micro_batch(tr->runner, &tr->comm, a, tr->accum); }

// stdout and the log are checked after every write: a full disk is an error, not a silent gap
inline void trainer_flush(Trainer* tr) {
    if (fflush(stdout) != 0 || ferror(stdout)) fail_file("stdout", "write failed: %s", strerror(errno));
    if (tr->log && (fflush(tr->log) != 0 || ferror(tr->log))) fail_file(tr->log_path.c_str(), "write failed: %s", strerror(errno));
}

// " | 41.2% MFU" on the GPU build: the model FLOPs of a training step, 6 per parameter per
// token (the attention scores are left out, so this is a lower bound), against the GPU's
// dense peak for the precision (gpu_peak_flops); "" on the CPU build or an unknown GPU (the
// runner says so when it starts).
inline std::string mfu_text(size_t num_params, size_t tokens, double ms) {
#ifdef XWIN_CUDA
    double peak = gpu_info().peak;
    if (peak == 0.0) return "";
    return string_format(" | %.1f%% MFU", 100.0 * 6.0 * num_params * tokens / (ms / 1000.0) / peak);
#else
    (void)num_params, (void)tokens, (void)ms;
    return "";
#endif
}

// The end of an optimizer step whose gradient is accumulated: the sum over the ranks (the
// gradient, loss and tokens: each rank's are its rows' share of the step's), the non-finite
// guard, clipping, the lr schedule, AdamW, the step line and the JSONL log. The extra metrics
// are the step's already (a program sums its ranks' shares). Returns false when the step was
// skipped (-Z 1) for a non-finite loss or norm; without -Z 1 such a step stops the run with
// exit 1, leaving the last checkpoint as it was.
inline bool trainer_step_end(Trainer* tr, double loss, size_t tokens, const std::vector<Metric>& extra = {}) {
    TrainState& s = tr->state;
    if (tr->comm.world > 1) {
        runner_all_reduce_grads(tr->runner, &tr->comm);
        double sums[2] = {loss, (double)tokens};
        comm_all_reduce_sum_double(&tr->comm, sums, 2);
        loss = sums[0], tokens = (size_t)sums[1];
    }
    float norm = runner_clip_grads(tr->runner, &tr->comm, tr->cfg->grad_clip);
    s.step += 1;
    if (!std::isfinite(loss) || !std::isfinite(norm)) {
        auto text = [](double x) { return std::isnan(x) ? std::string("nan") : string_format("%g", x); };
        std::string what = string_format("step %u: the loss is %s and the gradient norm %s", s.step, text(loss).c_str(), text(norm).c_str());
        if (!tr->cfg->skip_nonfinite) {
            std::string last = checkpoint_latest(tr->cfg->out_dir);
            fail_file(tr->cfg->out_dir, "%s: stopped; %s; -Z 1 skips such steps", what.c_str(),
                      last.empty() ? "no checkpoint was written yet" : ("the last good checkpoint is " + last + " (-y 1 resumes it)").c_str());
        }
        s.skipped += 1;
        printf("step %4u/%d | skipped: %s | %u skipped\n", s.step, tr->max_steps, what.c_str(), s.skipped);
        if (tr->log) fprintf(tr->log, "{\"step\": %u, \"skipped\": %u}\n", s.step, s.skipped);
        trainer_flush(tr);
        return false;
    }
    tr->opt.lr = lr_at((int)s.step, tr->max_steps, tr->cfg->warmup, tr->cfg->lr, 0.0f);
    runner_update(tr->runner, tr->opt);
    runner_all_gather_params(tr->runner, &tr->comm);  // ZeRO-1: each rank updated its part
    runner_synchronize(tr->runner);  // the step's time ends with its last kernel, the update
    s.adam_step += 1;
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - tr->t0).count();
    std::string more;
    for (const Metric& m : extra) more += string_format(" | %s %.4f", m.name, m.value);
    if (s.skipped) more += string_format(" | %u skipped", s.skipped);
    printf("step %4u/%d | loss %.4f | norm %.3f | lr %.2e%s | %.1f ms | %.0f tok/s%s\n", s.step, tr->max_steps, loss, norm, tr->opt.lr, more.c_str(), ms,
           tokens / (ms / 1000.0), mfu_text(tr->runner->host.num_params, tokens / tr->comm.world, ms).c_str());  // MFU: of one rank's device
    std::string json;
    for (const Metric& m : extra) json += string_format(", \"%s\": %.6f", m.name, m.value);
    if (tr->log) fprintf(tr->log, "{\"step\": %u, \"loss\": %.6f, \"norm\": %.6f, \"lr\": %.6e%s, \"ms\": %.3f, \"tokens\": %zu}\n", s.step, loss, norm, tr->opt.lr,
            json.c_str(), ms, tokens);
    trainer_flush(tr);
    return true;
}

inline bool trainer_finished(const Trainer* tr) { return (int)tr->state.step == tr->max_steps; }

// true on the steps that are a multiple of `every` (> 0), and on the last step
inline bool trainer_due(const Trainer* tr, int every) { return trainer_finished(tr) || (every > 0 && tr->state.step % every == 0); }

// "step N | name value | ..." on stdout and {"step": N, "name": value, ...} in the log
inline void trainer_log(Trainer* tr, const std::vector<Metric>& metrics) {
    std::string line = string_format("step %4u", tr->state.step), json = string_format("{\"step\": %u", tr->state.step);
    for (const Metric& m : metrics) {
        line += string_format(" | %s %.4f", m.name, m.value);
        json += string_format(", \"%s\": %.6f", m.name, m.value);
    }
    printf("%s\n", line.c_str());
    if (tr->log) fprintf(tr->log, "%s}\n", json.c_str());
    trainer_flush(tr);
}

// A checkpoint every -n steps, at the last step, and at the -X stop (rank 0 writes it).
inline void trainer_checkpoint(Trainer* tr) {
    if (trainer_due(tr, tr->cfg->checkpoint_every) || (int)tr->state.step == tr->cfg->stop_at) checkpoint_save(tr);
}

// The trained weights as <out>/<name> (every rank calls it, rank 0 writes it).
inline std::string trainer_save_model(Trainer* tr, const char* name = "model.bin") {
    std::string path = std::string(tr->cfg->out_dir) + "/" + name;
    trainer_gather_weights(tr);
    if (tr->comm.rank != 0) return path;
    llama_save(&tr->runner->host, path.c_str(), DTYPE_FP32);
    printf("saved %s\n", path.c_str());
    return path;
}

inline void trainer_close(Trainer* tr) {
    if (!trainer_finished(tr)) printf("stopped after step %u of %d (-X); resume with -y 1\n", tr->state.step, tr->max_steps);
    trainer_flush(tr);
    if (tr->log && fclose(tr->log) != 0) fail_file(tr->log_path.c_str(), "write failed: %s", strerror(errno));
    tr->log = nullptr;
    comm_free(&tr->comm);
}

// ---- the inputs of a stage agree with its model

// Every id the tokenizer can emit must exist in the model (pieces, byte fallback, bos, eos,
// pad), and the chat template needs bos and eos.
inline void tokenizer_check_model(const Tokenizer* tok, const char* tok_path, int vocab_size, const char* model_name) {
    if (tok->vocab_size > vocab_size) {
        fail_file(tok_path, "has %d ids but the model %s has vocab_size %d: they were not made for each other", tok->vocab_size, model_name, vocab_size);
    }
    struct { const char* name; int id; bool needed; } ids[] = {{"bos_id", tok->bos_id, true}, {"eos_id", tok->eos_id, true}, {"pad_id", tok->pad_id, false}, {"unk_id", tok->unk_id, false}};
    for (auto& s : ids) {
        if ((s.needed && s.id < 0) || s.id >= vocab_size) {
            fail_file(tok_path, "%s %d is not an id of the model %s (vocab_size %d)%s", s.name, s.id, model_name, vocab_size, s.needed ? "; the chat template needs it" : "");
        }
    }
}

// The identity of a token file for RunIdentity: its size and the CRC-32 of its offsets.
inline void tokens_identity(const TokenData& d, uint64_t* size, uint32_t* hash) {
    *size = TOKENS_HEADER_BYTES + 8 * d.offsets.size() + 5 * d.tokens.size();
    *hash = crc32_update(0, d.offsets.data(), 8 * d.offsets.size());
}

// A file to train or validate on: no sequence longer than max_len, and something to learn.
inline void tokens_check_for_training(const TokenData& d, const char* path, int max_len) {
    size_t targets = 0;
    for (size_t i = 0; i < d.n_seqs; i++) {
        if (token_seq_len(d, i) > (size_t)max_len) {
            fail_file(path, "sequence %zu has %zu tokens, more than the maximum %d (-t, max_seq_len)", i, token_seq_len(d, i), max_len);
        }
        for (uint64_t j = d.offsets[i] + 1; j < d.offsets[i + 1]; j++) targets += d.mask[j];
    }
    if (targets == 0) fail_file(path, "has no target tokens (the mask is 0 after every sequence's first token): nothing to learn or measure");
}

// A preference stage's pairs (train_rm, train_dpo): the training pairs and, unless val_path is
// '', the held-out ones, each checked against the model's vocabulary and -t, and every training
// pair's length (its longer answer) for the trainer's batches of similar lengths. Returns
// whether there are held-out pairs.
inline bool trainer_load_pairs(Trainer* tr, int vocab_size, const char* train_path, const char* val_path, PairData* train, PairData* val) {
    pairs_load(train, train_path, vocab_size);
    tokens_check_for_training(train->seqs, train_path, tr->cfg->max_len);
    bool has_val = *val_path;
    if (has_val) pairs_load(val, val_path, vocab_size), tokens_check_for_training(val->seqs, val_path, tr->cfg->max_len);
    for (size_t i = 0; i < train->n_pairs; i++) {
        tr->lengths.push_back((uint32_t)std::max(token_seq_len(train->seqs, 2 * i), token_seq_len(train->seqs, 2 * i + 1)));
    }
    return has_val;
}

// trainer_start over pairs: a row is a pair; the run's data is the training file
inline void trainer_start_pairs(Trainer* tr, Runner* r, const PairData& train) {
    uint64_t data_size;
    uint32_t data_hash;
    tokens_identity(train.seqs, &data_size, &data_hash);
    trainer_start(tr, r, train.n_pairs, data_size, data_hash);
}

// ----------------------------------------------------------------------------
// DPO: per-sequence log-prob sums (stage 5). The policy and the frozen reference each give the
// log-prob of every response (its target tokens' log-probs added up); the loss of a pair,
// train_dpo.cu's dpo_loss, compares the policy's margin of chosen over rejected with the
// reference's. Pairs come as the pair file has them (2i chosen, 2i + 1 rejected); the ops
// below care only about rows. The per-sequence sums (sequence_logprob_forward/_backward and their
// kernels) are among the ops, after the log-probs.

// tokens (B, T), mask (B, T) -> the sum of each sequence's masked token log-probs (B) on the host
// (valid until the next call). On the GPU the mask goes up, the sums are made on the device and
// only the B sums come down; the CPU keeps the mask for runner_sequence_backward.
inline const float* runner_sequence_logprobs(Runner* r, const int* tokens, const uint8_t* mask, int B, int T) {
    require_head(r->host.config, HEAD_LM, "sequence log-probs");
    r->seq_B = B;
    r->seq_T = T;
#ifdef XWIN_CUDA
    LlamaCuda* g = &r->gpu;
    llama_cuda_forward(g, tokens, B, T);
    upload_async(&g->up.mask, g->mask, mask, (size_t)B * T, g->stream);
    sequence_logprob_forward_cuda(g->seq_sums, g->acts.lp, g->mask, B, T, g->stream);
    cudaCheck(cudaMemcpyAsync(r->seq_sums.data(), g->seq_sums, B * sizeof(float), cudaMemcpyDeviceToHost, g->stream));
    cudaCheck(cudaStreamSynchronize(g->stream));
#else
    llama_forward(&r->host, tokens, B, T);
    memcpy(r->seq_mask.data(), mask, (size_t)B * T);
    sequence_logprob_forward(r->seq_sums.data(), r->host.acts.lp, mask, B, T);
#endif
    return r->seq_sums.data();
}

// accumulates the gradient of an objective whose derivative by the last runner_sequence_logprobs's
// sums is dsums (B); tokens and the shape are that call's. On the GPU only the B derivatives go up:
// the kernel spreads them over dlp (B, T) on the device, where the head's backward reads it.
inline void runner_sequence_backward(Runner* r, const int* tokens, const float* dsums, int B, int T) {
    if (B != r->seq_B || T != r->seq_T) {
        fprintf(stderr, "error: runner_sequence_backward of a (%d, %d) batch after sequence log-probs of (%d, %d)\n", B, T, r->seq_B, r->seq_T);
        exit(1);
    }
#ifdef XWIN_CUDA
    (void)tokens;  // the device kept them from the forward
    LlamaCuda* g = &r->gpu;
    upload_async(&g->up.dsums, g->dsums, dsums, B * sizeof(float), g->stream);
    sequence_logprob_backward_cuda(g->dlp, g->dsums, g->mask, B, T, g->stream);
    llama_cuda_backward_from_dlp(g, B, T);
#else
    sequence_logprob_backward(r->seq_dlp.data(), dsums, r->seq_mask.data(), B, T);
    llama_backward(&r->host, tokens, r->seq_dlp.data(), B, T);
#endif
}

// ----------------------------------------------------------------------------
// Sampling and generation on an InferRunner (stage 3, Xwin-Set, and every evaluation).
// A token is drawn from softmax(logits / temperature), restricted to the top_k most probable
// tokens and then to the smallest set of those whose probability reaches top_p, renormalised
// (transformers' order: temperature, top-k, top-p); temperature 0 is greedy decoding (the
// first of the largest logits, as torch.argmax). Each response has its own random stream
// (rng_next), seeded by (seed, prompt index, sample index, attempt), so the same seed gives the
// same text on the same build however the prompts are batched. The n samples of a prompt share
// one prefill: the prompt runs once, in one sequence of the runner, whose cache is then copied
// into the n sequences that decode its samples. A response ends at EOS (not kept) or after
// max_new sampled tokens (EOS included, as transformers' max_new_tokens).

struct SamplerConfig {
    float temperature = 1.0f;  // 0: greedy
    int top_k = 0;             // keep the k most probable tokens (0: all)
    float top_p = 1.0f;        // then the smallest set of them whose probability reaches top_p (1: all)
};

// probs (V) <- the distribution a token is drawn from, in double. order (V) is scratch: the
// ids by decreasing probability (ties: the lower id first).
inline void sample_distribution(double* probs, const float* logits, int V, const SamplerConfig& s, std::vector<int>& order) {
    if (s.temperature == 0.0f) {
        int best = (int)(std::max_element(logits, logits + V) - logits);
        for (int i = 0; i < V; i++) probs[i] = i == best ? 1.0 : 0.0;
        return;
    }
    double mx = *std::max_element(logits, logits + V), sum = 0;
    for (int i = 0; i < V; i++) sum += probs[i] = std::exp(((double)logits[i] - mx) / s.temperature);
    for (int i = 0; i < V; i++) probs[i] /= sum;
    bool cut_k = s.top_k > 0 && s.top_k < V, cut_p = s.top_p < 1.0f;
    if (!cut_k && !cut_p) return;
    order.resize(V);
    for (int i = 0; i < V; i++) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return probs[a] > probs[b] || (probs[a] == probs[b] && a < b); });
    int keep = cut_k ? s.top_k : V;
    double kept = 0;
    for (int i = 0; i < keep; i++) kept += probs[order[i]];
    if (cut_p) {  // the mass after top-k, renormalised, must reach top_p
        double mass = 0;
        int n = 0;
        while (n < keep && mass < (double)s.top_p * kept) mass += probs[order[n++]];
        keep = n, kept = mass;
    }
    for (int i = keep; i < V; i++) probs[order[i]] = 0.0;
    for (int i = 0; i < V; i++) probs[i] /= kept;
}

inline double rng_unit(uint64_t* state) { return (double)(rng_next(state) >> 11) * 0x1.0p-53; }  // [0, 1), 53 bits

// One token from logits (V); probs and order are scratch.
inline int sample_token(const float* logits, int V, const SamplerConfig& s, uint64_t* rng, std::vector<double>& probs, std::vector<int>& order) {
    if (s.temperature == 0.0f) return (int)(std::max_element(logits, logits + V) - logits);
    probs.resize(V);
    sample_distribution(probs.data(), logits, V, s, order);
    double u = rng_unit(rng), acc = 0;
    int last = 0;
    for (int i = 0; i < V; i++) {
        if (probs[i] == 0.0) continue;
        acc += probs[i], last = i;
        if (u < acc) return i;
    }
    return last;  // u above the rounded total
}

// The random stream of sample `sample` (its `attempt`-th draw) of prompt `prompt`.
inline uint64_t sample_seed(uint64_t seed, uint64_t prompt, uint64_t sample, uint64_t attempt) {
    uint64_t state = seed;
    for (uint64_t x : {prompt, sample, attempt}) state = rng_next(&state) ^ x;
    return rng_next(&state);
}

struct GenerateConfig {
    SamplerConfig sampler;
    int max_new = 64;   // sampled tokens per response at most, its EOS included
    int eos_id = -1;
    uint64_t seed = 1;
    int resample = 0;   // a response equal to an earlier one of its prompt is drawn again, up to this many times
};

struct GenerateStats {
    size_t responses = 0;
    size_t tokens = 0;      // tokens sampled, EOS included (the ones decoded for finished sequences are not counted)
    size_t resampled = 0;   // draws again of a duplicate response
    size_t duplicates = 0;  // responses still equal to an earlier one of their prompt after `resample` draws
    size_t cut = 0;         // responses that reached max_new or the context before an EOS
};

inline void infer_runner_shape(const InferRunner* r, int* B, int* max_T, int* max_chunk) {
#ifdef XWIN_CUDA
    *B = r->gpu.B, *max_T = r->gpu.max_T, *max_chunk = r->gpu.max_chunk;
#else
    *B = r->cpu.B, *max_T = r->cpu.max_T, *max_chunk = r->cpu.max_chunk;
#endif
}

// n responses to each prompt (token ids, without the EOS) into (*out)[p], n each, B / n
// prompts at a time (B: the runner's sequences). first: the index of prompts[0] among all the
// prompts of the run, for the seeds. Adds to *stats.
inline void generate(InferRunner* r, const std::vector<std::vector<int>>& prompts, int n, const GenerateConfig& g, size_t first,
                     std::vector<std::vector<std::vector<int>>>* out, GenerateStats* stats) {
    int B, max_T, max_chunk, V = r->host.config.vocab_size;
    infer_runner_shape(r, &B, &max_T, &max_chunk);
    if (n < 1 || n > B || g.max_new < 1) {
        fprintf(stderr, "error: %d responses per prompt and %d new tokens each: need 1..%d responses (the runner's batch) and >= 1 token\n", n, g.max_new, B);
        exit(1);
    }
    int P = B / n;
    out->assign(prompts.size(), {});
    std::vector<float> prompt_logits((size_t)P * V);
    std::vector<int> tokens, lens(P), next(B, 0), plen(B, 0), attempt(B), slot_seq, slot_len(B);
    std::vector<uint64_t> rng(B);
    std::vector<char> pending(B), active(B, 0);
    std::vector<std::vector<int>> resp(B);
    std::vector<double> probs(V);
    std::vector<int> order;
    auto take = [&](int s, const float* logits) {  // sequence s samples its next token from logits (V)
        int tok = sample_token(logits, V, g.sampler, &rng[s], probs, order);
        stats->tokens++;
        if (tok == g.eos_id) {
            active[s] = 0;
            return;
        }
        resp[s].push_back(tok);
        if ((int)resp[s].size() == g.max_new || plen[s] + (int)resp[s].size() > max_T) active[s] = 0, stats->cut++;
    };
    auto duplicate = [&](int s) {  // equal to an earlier response of its prompt
        for (int i = s - s % n; i < s; i++) if (resp[i] == resp[s]) return true;
        return false;
    };
    for (size_t p0 = 0; p0 < prompts.size(); p0 += P) {
        int np = (int)std::min((size_t)P, prompts.size() - p0), ns = np * n, Tn = 0;
        for (int p = 0; p < np; p++) {
            int len = (int)prompts[p0 + p].size();
            if (len < 1 || len > max_chunk || len >= max_T) {
                fprintf(stderr, "error: prompt %zu has %d tokens; this runner takes prompts of 1..%d tokens\n", first + p0 + p, len,
                        std::min(max_chunk, max_T - 1));
                exit(1);
            }
            lens[p] = len, Tn = std::max(Tn, len);
        }
        // prefill each prompt once, then copy it into the sequences of its samples (the last
        // prompts first: a prompt's sequences never precede it, so no source is overwritten)
        tokens.assign((size_t)np * Tn, 0);
        for (int p = 0; p < np; p++) std::copy(prompts[p0 + p].begin(), prompts[p0 + p].end(), tokens.begin() + (size_t)p * Tn);
        const float* logits = infer_runner_prefill(r, tokens.data(), Tn, lens.data(), np);
        std::copy(logits, logits + (size_t)np * V, prompt_logits.begin());
        for (int p = np - 1; p >= 0; p--) {
            for (int j = n - 1; j >= 0; j--) infer_runner_copy_sequence(r, p, p * n + j);
        }
        for (int s = 0; s < B; s++) plen[s] = s < ns ? lens[s / n] : 0, pending[s] = s < ns, attempt[s] = -1;
        // rounds: draw the pending responses; then the duplicates are pending again, up to
        // g.resample times. A round decodes its pending sequences alone, in the first slots of
        // the runner (slot_seq): the first round's are all of them, in place; a later round's
        // few are prefilled again from their prompts (every row's numbers are its own, so a
        // response does not depend on the slot or on the others decoded beside it).
        for (bool any = true, again = false; any; again = true) {
            slot_seq.clear();
            for (int s = 0; s < ns; s++) if (pending[s]) slot_seq.push_back(s);
            int m = (int)slot_seq.size();
            if (again) {
                tokens.assign((size_t)m * Tn, 0);
                for (int k = 0; k < m; k++) {
                    const std::vector<int>& pr = prompts[p0 + slot_seq[k] / n];
                    std::copy(pr.begin(), pr.end(), tokens.begin() + (size_t)k * Tn);
                    slot_len[k] = (int)pr.size();
                }
                infer_runner_prefill(r, tokens.data(), Tn, slot_len.data(), m);
            }
            for (int s : slot_seq) {
                pending[s] = 0, active[s] = 1, attempt[s]++;
                rng[s] = sample_seed(g.seed, first + p0 + s / n, s % n, attempt[s]);
                resp[s].clear();
                take(s, prompt_logits.data() + (size_t)(s / n) * V);
            }
            for (bool running = true; running;) {
                running = false;
                for (int k = 0; k < m; k++) {
                    int s = slot_seq[k];
                    infer_runner_rewind(r, k, active[s] ? plen[s] + (int)resp[s].size() - 1 : plen[s]);  // a finished sequence decodes in place
                    next[k] = active[s] ? resp[s].back() : 0;
                    running |= active[s] != 0;
                }
                if (!running) break;
                logits = infer_runner_decode(r, next.data(), m);
                for (int k = 0; k < m; k++) if (active[slot_seq[k]]) take(slot_seq[k], logits + (size_t)k * V);
            }
            any = false;
            for (int s = 0; s < ns; s++) {
                if (duplicate(s) && attempt[s] < g.resample) pending[s] = 1, any = true, stats->resampled++;
            }
        }
        for (int s = 0; s < ns; s++) {
            stats->duplicates += duplicate(s);
            (*out)[p0 + s / n].push_back(resp[s]);
        }
        stats->responses += ns;
    }
}

// A runner over a copy of a model's weights.
inline void infer_runner_of(InferRunner* ir, const Llama* model, int B, int max_T, int max_chunk) {
    llama_init(&ir->host, model->config);
    memcpy(ir->host.params_memory, model->params_memory, model->num_params * sizeof(float));
    infer_runner_init(ir, B, max_T, max_chunk);
}

// A runner over the weights of a training runner (copied; on the GPU build downloaded first).
inline void infer_runner_from(InferRunner* ir, Runner* r, int B, int max_T, int max_chunk) {
    runner_download_params(r);
    infer_runner_of(ir, &r->host, B, max_T, max_chunk);
}

// Greedy answers (ids without the EOS, up to max_new sampled tokens) of a model to several
// prompts, up to 32 at a time, with a KV cache.
inline std::vector<std::vector<int>> generate_greedy_model(const Llama* model, const std::vector<std::vector<int>>& prompts, int max_new, int eos_id) {
    int longest = 1;
    for (const std::vector<int>& p : prompts) longest = std::max(longest, (int)p.size());
    int max_T = std::min(model->config.max_seq_len, longest + max_new);
    InferRunner ir;
    infer_runner_of(&ir, model, (int)std::max<size_t>(1, std::min<size_t>(prompts.size(), 32)), max_T, std::min(longest, max_T));
    GenerateConfig g;
    g.sampler.temperature = 0.0f;
    g.max_new = max_new, g.eos_id = eos_id;
    GenerateStats stats;
    std::vector<std::vector<std::vector<int>>> out;
    generate(&ir, prompts, 1, g, 0, &out, &stats);
    infer_runner_free(&ir);
    std::vector<std::vector<int>> answers;
    for (auto& o : out) answers.push_back(o[0]);
    return answers;
}

// the same for a training runner's model
inline std::vector<std::vector<int>> generate_greedy_batch(Runner* r, const std::vector<std::vector<int>>& prompts, int max_new, int eos_id) {
    runner_download_params(r);
    return generate_greedy_model(&r->host, prompts, max_new, eos_id);
}

inline std::vector<int> generate_greedy(Runner* r, const std::vector<int>& prompt, int max_new, int eos_id) {
    return generate_greedy_batch(r, {prompt}, max_new, eos_id)[0];
}

// The ids of a world prompt in the chat template, ready for the answer.
inline void world_prompt_ids(const Tokenizer* tok, const WorldPrompt& p, std::vector<int>& ids) {
    chat_encode_prompt(tok, p.messages[0], std::vector<std::string>(p.messages.begin() + 1, p.messages.end()), ids);
}

// The gold judge's score (0..10) of a model's greedy answer to each of the first n world
// prompts; prints the first `show` answers. With comm (the ranks of a data-parallel run, every
// one calling), each rank answers a block of the prompts and every rank gets all the scores.
inline std::vector<int> world_scores(const Llama* model, const Tokenizer* tok, const std::vector<WorldPrompt>& prompts, size_t n, size_t show,
                                     Comm* comm = nullptr) {
    n = std::min(n, prompts.size());
    Shard mine = shard_of(n, comm ? comm->rank : 0, comm ? comm->world : 1);
    std::vector<std::vector<int>> ids(mine.end - mine.begin);
    for (size_t i = mine.begin; i < mine.end; i++) world_prompt_ids(tok, prompts[i], ids[i - mine.begin]);
    std::vector<std::vector<int>> answers = ids.empty() ? ids : generate_greedy_model(model, ids, 48, tok->eos_id);
    std::vector<float> scores(n, 0.0f);  // floats, to be gathered
    for (size_t i = mine.begin; i < mine.end; i++) {
        const WorldPrompt& p = prompts[i];
        const std::vector<int>& a = answers[i - mine.begin];
        std::string text = tokenizer_decode(tok, a.data(), (int)a.size());
        scores[i] = (float)world_judge(p.kind, p.gold, text);
        if (i < show) printf("  [%s] %s -> %s | judge %d/10\n", p.kind.c_str(), p.messages.back().c_str(), text.c_str(), (int)scores[i]);
    }
    if (comm) comm_all_gather_host(comm, scores.data(), mine);
    return std::vector<int>(scores.begin(), scores.end());
}

// Each kind's mean of scores (of prompts[0..scores.size())), in the world's kind order; NaN
// for a kind with no prompt.
inline std::vector<double> world_kind_means(const std::vector<WorldPrompt>& prompts, const std::vector<int>& scores) {
    std::vector<double> total(6, 0.0), count(6, 0.0);
    for (size_t i = 0; i < scores.size(); i++) {
        for (int k = 0; k < 6; k++) if (prompts[i].kind == WORLD_KINDS[k]) total[k] += scores[i], count[k] += 1;
    }
    for (int k = 0; k < 6; k++) total[k] = count[k] ? total[k] / count[k] : NAN;
    return total;
}

// The gold judge's mean score (0..10) of greedy answers to the first n eval prompts of the
// built-in world; prints the first `show` answers. per_kind (optional) gets each kind's mean
// in the world's kind order, e.g. "arith 4.1, reverse 6.5, ...".
inline double world_evaluate(Runner* r, const Tokenizer* tok, const std::vector<WorldPrompt>& prompts, size_t n, size_t show,
                             std::string* per_kind = nullptr, Comm* comm = nullptr) {
    runner_download_params(r);
    std::vector<int> scores = world_scores(&r->host, tok, prompts, n, show, comm);
    if (per_kind) {
        per_kind->clear();
        std::vector<double> means = world_kind_means(prompts, scores);
        for (int k = 0; k < 6; k++) {
            if (!std::isnan(means[k])) *per_kind += string_format("%s%s %.1f", per_kind->empty() ? "" : ", ", WORLD_KINDS[k], means[k]);
        }
    }
    double total = 0;
    for (int s : scores) total += s;
    return scores.empty() ? 0.0 : total / scores.size();
}

// The closing evaluation of train_sft and train_dpo: world_evaluate on the first 100 held-out
// prompts (a block of them on each rank) and its line, "gold judge: mean 5.12 / 10 over 100
// held-out prompts (arith 4.1, ...)"
inline double world_report(Runner* r, const Tokenizer* tok, const std::vector<WorldPrompt>& prompts, size_t show, Comm* comm) {
    std::string per_kind;
    double score = world_evaluate(r, tok, prompts, 100, show, &per_kind, comm);
    printf("gold judge: mean %.2f / 10 over %zu held-out prompts (%s)\n", score, std::min(prompts.size(), (size_t)100), per_kind.c_str());
    return score;
}

// ---- JSON: a reader and a writer for the JSONL files of the sampling stage (RFC 8259; the
// text is UTF-8, \u escapes become UTF-8, a lone surrogate or invalid UTF-8 is an error)

struct Json {
    enum Type { NUL, BOOL, NUMBER, STRING, ARRAY, OBJECT };
    Type type = NUL;
    bool boolean = false;
    double number = 0;
    std::string text;                                   // STRING
    std::vector<Json> items;                            // ARRAY
    std::vector<std::pair<std::string, Json>> members;  // OBJECT, in file order
};

inline Json json_string(const std::string& s) { Json j; j.type = Json::STRING; j.text = s; return j; }
inline Json json_number(double x) { Json j; j.type = Json::NUMBER; j.number = x; return j; }
inline Json json_array() { Json j; j.type = Json::ARRAY; return j; }
inline Json json_object() { Json j; j.type = Json::OBJECT; return j; }

// the member named key of an object, or null
inline const Json* json_get(const Json& obj, const char* key) {
    if (obj.type != Json::OBJECT) return nullptr;
    for (const auto& m : obj.members) if (m.first == key) return &m.second;
    return nullptr;
}

inline void utf8_append(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += (char)cp;
    } else if (cp < 0x800) {
        out += (char)(0xC0 | cp >> 6), out += (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += (char)(0xE0 | cp >> 12), out += (char)(0x80 | (cp >> 6 & 0x3F)), out += (char)(0x80 | (cp & 0x3F));
    } else {
        out += (char)(0xF0 | cp >> 18), out += (char)(0x80 | (cp >> 12 & 0x3F)), out += (char)(0x80 | (cp >> 6 & 0x3F)), out += (char)(0x80 | (cp & 0x3F));
    }
}

// s with every byte that does not start a valid UTF-8 character replaced by U+FFFD
inline std::string utf8_repair(const std::string& s) {
    std::string out;
    for (size_t i = 0; i < s.size();) {
        size_t k = tokenizer_utf8_len(s.data() + i, s.size() - i);
        if (k == 0) out += "\xEF\xBF\xBD", i += 1;
        else out.append(s, i, k), i += k;
    }
    return out;
}

struct JsonReader {
    const std::string& s;
    size_t i = 0;
    std::string err;
};

inline bool json_error(JsonReader& r, const char* what) {
    if (r.err.empty()) r.err = string_format("%s at byte %zu", what, r.i + 1);
    return false;
}

inline void json_skip_space(JsonReader& r) {
    while (r.i < r.s.size() && (r.s[r.i] == ' ' || r.s[r.i] == '\t' || r.s[r.i] == '\n' || r.s[r.i] == '\r')) r.i++;
}

inline bool json_hex4(JsonReader& r, uint32_t* cp) {
    *cp = 0;
    for (int k = 0; k < 4; k++, r.i++) {
        char c = r.i < r.s.size() ? r.s[r.i] : 0;
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return json_error(r, "bad \\u escape");
        *cp = *cp * 16 + d;
    }
    return true;
}

inline bool json_read_string(JsonReader& r, std::string& out) {
    out.clear();
    r.i++;  // the opening quote
    for (;;) {
        if (r.i >= r.s.size()) return json_error(r, "unterminated string");
        unsigned char c = r.s[r.i];
        if (c == '"') {
            r.i++;
            return true;
        }
        if (c < 0x20) return json_error(r, "control character in a string");
        if (c != '\\') {
            size_t k = tokenizer_utf8_len(r.s.data() + r.i, r.s.size() - r.i);
            if (k == 0) return json_error(r, "invalid UTF-8");
            out.append(r.s, r.i, k);
            r.i += k;
            continue;
        }
        char e = ++r.i < r.s.size() ? r.s[r.i++] : 0;
        const char* from = "\"\\/bfnrt";
        const char* to = "\"\\/\b\f\n\r\t";
        const char* at = e ? strchr(from, e) : nullptr;
        if (at) {
            out += to[at - from];
            continue;
        }
        if (e != 'u') return r.i--, json_error(r, "bad escape");
        uint32_t cp, low;
        if (!json_hex4(r, &cp)) return false;
        if (cp >= 0xDC00 && cp <= 0xDFFF) return json_error(r, "lone surrogate");
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (r.s.compare(r.i, 2, "\\u") != 0) return json_error(r, "lone surrogate");
            r.i += 2;
            if (!json_hex4(r, &low)) return false;
            if (low < 0xDC00 || low > 0xDFFF) return json_error(r, "lone surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        }
        utf8_append(out, cp);
    }
}

inline bool json_read_value(JsonReader& r, Json* v, int depth) {
    json_skip_space(r);
    if (depth > 64) return json_error(r, "nested deeper than 64");
    if (r.i >= r.s.size()) return json_error(r, "unexpected end");
    char c = r.s[r.i];
    *v = Json{};
    if (c == '"') {
        v->type = Json::STRING;
        return json_read_string(r, v->text);
    }
    if (c == '[' || c == '{') {
        bool object = c == '{';
        v->type = object ? Json::OBJECT : Json::ARRAY;
        r.i++;
        json_skip_space(r);
        if (r.i < r.s.size() && r.s[r.i] == (object ? '}' : ']')) return r.i++, true;
        for (;;) {
            Json item;
            std::string key;
            if (object) {
                json_skip_space(r);
                if (r.i >= r.s.size() || r.s[r.i] != '"') return json_error(r, "expected a member name");
                if (!json_read_string(r, key)) return false;
                json_skip_space(r);
                if (r.i >= r.s.size() || r.s[r.i] != ':') return json_error(r, "expected ':'");
                r.i++;
            }
            if (!json_read_value(r, &item, depth + 1)) return false;
            if (object) v->members.emplace_back(key, std::move(item));
            else v->items.push_back(std::move(item));
            json_skip_space(r);
            if (r.i < r.s.size() && r.s[r.i] == ',') {
                r.i++;
                continue;
            }
            if (r.i < r.s.size() && r.s[r.i] == (object ? '}' : ']')) return r.i++, true;
            return json_error(r, object ? "expected ',' or '}'" : "expected ',' or ']'");
        }
    }
    for (const char* word : {"true", "false", "null"}) {
        if (r.s.compare(r.i, strlen(word), word) == 0) {
            r.i += strlen(word);
            v->type = word[0] == 'n' ? Json::NUL : Json::BOOL;
            v->boolean = word[0] == 't';
            return true;
        }
    }
    // a number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
    size_t start = r.i, j = r.i;
    auto digits = [&]() { size_t k = j; while (j < r.s.size() && isdigit((unsigned char)r.s[j])) j++; return j > k; };
    if (j < r.s.size() && r.s[j] == '-') j++;
    if (j < r.s.size() && r.s[j] == '0') j++;
    else if (!digits()) return json_error(r, "unexpected character");
    if (j < r.s.size() && r.s[j] == '.' && (++j, !digits())) return r.i = j, json_error(r, "bad number");
    if (j < r.s.size() && (r.s[j] == 'e' || r.s[j] == 'E')) {
        j++;
        if (j < r.s.size() && (r.s[j] == '+' || r.s[j] == '-')) j++;
        if (!digits()) return r.i = j, json_error(r, "bad number");
    }
    v->type = Json::NUMBER;
    v->number = strtod(r.s.substr(start, j - start).c_str(), nullptr);
    r.i = j;
    return true;
}

// Parses one JSON text (one line of a JSONL file). Returns "" or what is wrong and where.
inline std::string json_parse(const std::string& text, Json* out) {
    JsonReader r{text, 0, ""};
    if (!json_read_value(r, out, 0)) return r.err;
    json_skip_space(r);
    if (r.i != text.size()) return json_error(r, "extra text after the value"), r.err;
    return "";
}

// Appends s quoted and escaped (s must be valid UTF-8: see utf8_repair)
inline void json_append_string(std::string& out, const std::string& s) {
    out += '"';
    for (unsigned char c : s) {
        if (c == '"') out += "\\\"";
        else if (c == '\\') out += "\\\\";
        else if (c == '\n') out += "\\n";
        else if (c == '\t') out += "\\t";
        else if (c == '\r') out += "\\r";
        else if (c < 0x20) out += string_format("\\u%04x", c);
        else out += (char)c;
    }
    out += '"';
}

// Appends v as compact JSON; a number takes the fewest digits that read back the same
// (integers without a point); a non-finite number is written as null (JSON has no NaN).
inline void json_append(std::string& out, const Json& v) {
    switch (v.type) {
        case Json::NUL: out += "null"; break;
        case Json::BOOL: out += v.boolean ? "true" : "false"; break;
        case Json::NUMBER: {
            if (!std::isfinite(v.number)) { out += "null"; break; }
            std::string t;
            for (int digits = 6; digits <= 17; digits++) {  // the fewest significant digits that read back the same double
                t = string_format("%.*g", digits, v.number);
                if (strtod(t.c_str(), nullptr) == v.number) break;
            }
            out += t;
            break;
        }
        case Json::STRING: json_append_string(out, v.text); break;
        case Json::ARRAY:
            out += '[';
            for (size_t i = 0; i < v.items.size(); i++) out += i ? ", " : "", json_append(out, v.items[i]);
            out += ']';
            break;
        case Json::OBJECT:
            out += '{';
            for (size_t i = 0; i < v.members.size(); i++) {
                out += i ? ", " : "";
                json_append_string(out, v.members[i].first);
                out += ": ";
                json_append(out, v.members[i].second);
            }
            out += '}';
            break;
    }
}

// A conversation's messages from JSON [{"role", "content"}, ...]: an optional system message,
// then user and assistant in turn. Into *turns as WorldPrompt.messages holds them (system
// first, "" for the default). Returns "" or what is wrong.
inline std::string json_messages(const Json* m, std::vector<std::string>* turns) {
    if (!m || m->type != Json::ARRAY || m->items.empty()) return "no 'messages' list (or an empty one)";
    turns->assign(1, "");
    for (size_t i = 0; i < m->items.size(); i++) {
        const Json *role = json_get(m->items[i], "role"), *content = json_get(m->items[i], "content");
        if (!role || role->type != Json::STRING || !content || content->type != Json::STRING)
            return string_format("message %zu has no string 'role' and 'content'", i + 1);
        bool system = i == 0 && role->text == "system";
        const char* want = turns->size() % 2 == 1 ? "user" : "assistant";
        if (system) (*turns)[0] = content->text;
        else if (role->text == want) turns->push_back(content->text);
        else return string_format("message %zu is '%s' where '%s' was due (system first, then user and assistant in turn)", i + 1, role->text.c_str(), want);
    }
    if (turns->size() < 2) return "no user message";
    return "";
}

// JSON messages of a conversation (WorldPrompt.messages order: system, user, assistant, ...);
// the system message is left out when it is "" (the template's default line).
inline Json json_of_messages(const std::vector<std::string>& turns) {
    Json list = json_array();
    for (size_t i = 0; i < turns.size(); i++) {
        if (i == 0 && turns[0].empty()) continue;
        Json m = json_object();
        m.members.emplace_back("role", json_string(i == 0 ? "system" : i % 2 ? "user" : "assistant"));
        m.members.emplace_back("content", json_string(turns[i]));
        list.items.push_back(m);
    }
    return list;
}

// Prompts to answer: the world's .tsv (world_load_prompts), or JSONL with one conversation a line
// {"messages": [...], "kind": ..., "gold": ...} (kind and gold optional, as in
// data/world/eval_prompts.jsonl) or one instruction a line {"instruction": ...} (AlpacaEval's
// evaluation set, one user turn); a conversation that ends with an assistant message gives the
// prompt before it (so an SFT file gives its prompts). Returns "" or what is wrong (with the line).
inline std::string prompts_load_checked(std::vector<WorldPrompt>* out, const char* path) {
    if (ends_with(path, ".tsv")) return world_load_prompts_checked(out, path);
    std::vector<std::string> lines;
    std::string err = read_lines_checked(path, &lines);
    if (!err.empty()) return err;
    out->clear();
    for (size_t i = 0; i < lines.size(); i++) {
        if (lines[i].find_first_not_of(" \t") == std::string::npos) continue;
        std::string where = "line " + std::to_string(i + 1) + ": ";
        Json row;
        err = json_parse(lines[i], &row);
        if (!err.empty()) return where + "not JSON: " + err;
        WorldPrompt p;
        const Json* instruction = json_get(row, "instruction");  // AlpacaEval's rows: one user turn
        if (instruction && !json_get(row, "messages")) {
            if (instruction->type != Json::STRING || instruction->text.empty()) return where + "'instruction' is not a non-empty string";
            p.messages = {"", instruction->text};  // no system message: the template's default
        } else {
            err = json_messages(json_get(row, "messages"), &p.messages);
            if (!err.empty()) return where + err;
        }
        if (p.messages.size() % 2 == 1) p.messages.pop_back();  // ends with an assistant message: its prompt
        const Json *kind = json_get(row, "kind"), *gold = json_get(row, "gold");
        if (kind && kind->type == Json::STRING) p.kind = kind->text;
        if (gold && gold->type == Json::STRING) p.gold = gold->text;
        if (!p.kind.empty() && !world_kind_known(p.kind)) return where + "unknown kind '" + p.kind + "'";
        out->push_back(p);
    }
    if (out->empty()) return "no prompts";
    return "";
}

// ---- training logs: one metric of a program's <out>/log.jsonl, as (step, value) points

struct LogSeries {
    std::vector<double> steps, values;
    size_t skipped = 0;  // lines that are not a JSON object (a line cut short, a "nan")
};

// The points of every line of the log at path that has a number under key and a "step":
// read_log_series(log, "loss") gives the training steps, (log, "val_loss") the validation
// points. Returns "" or why the file cannot be read.
inline std::string read_log_series(const std::string& path, const std::string& key, LogSeries* out) {
    *out = LogSeries{};
    std::vector<std::string> lines;
    std::string err = read_lines_checked(path.c_str(), &lines);
    if (!err.empty()) return err;
    for (const std::string& line : lines) {
        if (line.find_first_not_of(" \t") == std::string::npos) continue;
        Json row;
        if (!json_parse(line, &row).empty() || row.type != Json::OBJECT) {
            out->skipped++;
            continue;
        }
        const Json *step = json_get(row, "step"), *value = json_get(row, key.c_str());
        if (!step || step->type != Json::NUMBER || !value || value->type != Json::NUMBER) continue;
        out->steps.push_back(step->number), out->values.push_back(value->number);
    }
    return "";
}

// ----------------------------------------------------------------------------
// PNG plots, for the programs that draw one (sample, train_dpo): they define XWIN_PLOTS before
// including llm.cu, and the build takes stb_image_write.h and stb_easy_font.h from Debian's
// libstb-dev.

#ifdef XWIN_PLOTS
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#include <stb/stb_easy_font.h>

// An RGB image with margins around the plotting area, drawn by rectangles, lines and text.
struct Plot {
    int w = 720, h = 440, left = 60, right = 190, top = 40, bottom = 50;
    std::vector<unsigned char> rgb;  // (h, w, 3)
};

inline void plot_init(Plot* p, int w, int h) {
    p->w = w, p->h = h;
    p->rgb.assign((size_t)w * h * 3, 255);
}

inline void plot_rect(Plot* p, int x0, int y0, int x1, int y1, const unsigned char* c) {
    for (int y = std::max(0, y0); y < std::min(p->h, y1); y++) {
        for (int x = std::max(0, x0); x < std::min(p->w, x1); x++) memcpy(&p->rgb[((size_t)y * p->w + x) * 3], c, 3);
    }
}

// text at (x, y) in stb_easy_font's glyphs, scaled 2x
inline void plot_text(Plot* p, int x, int y, const char* text, const unsigned char* c) {
    static char buf[60000];
    int quads = stb_easy_font_print(0, 0, (char*)text, nullptr, buf, sizeof(buf));
    for (int q = 0; q < quads; q++) {
        const float* v = (const float*)(buf + q * 64);  // 4 vertices of 16 bytes: x, y, z, color
        plot_rect(p, x + 2 * (int)v[0], y + 2 * (int)v[1], x + 2 * (int)v[8], y + 2 * (int)v[9], c);
    }
}

inline void plot_line(Plot* p, double x0, double y0, double x1, double y1, const unsigned char* c, bool dashed) {
    int steps = (int)std::max(std::fabs(x1 - x0), std::fabs(y1 - y0)) + 1;
    for (int i = 0; i <= steps; i++) {
        if (dashed && (i / 6) % 2) continue;
        int x = (int)std::lround(x0 + (x1 - x0) * i / steps), y = (int)std::lround(y0 + (y1 - y0) * i / steps);
        plot_rect(p, x - 1, y - 1, x + 2, y + 2, c);
    }
}

// the image to path, through a .tmp file and a rename
inline void plot_save_png(const Plot* p, const char* path) {
    make_dir(dir_of(path));
    std::string tmp = std::string(path) + ".tmp";
    if (!stbi_write_png(tmp.c_str(), p->w, p->h, 3, p->rgb.data(), p->w * 3)) fail_file(path, "cannot write the PNG (%s)", tmp.c_str());
    if (rename(tmp.c_str(), path) != 0) fail_file(path, "cannot rename %s over it: %s", tmp.c_str(), strerror(errno));
}

// Training curves: one panel per metric of a log.jsonl, the training steps as a line and the
// validation points ("val_" + key, where the log has them) as squares.
struct CurvePanel {
    std::string title;          // "SFT: loss"
    std::string log;            // the program's log.jsonl
    std::string key;            // the training metric, as the log names it
    double lo = NAN, hi = NAN;  // a range the y axis always spans, e.g. 0..1 (NaN: the data's range alone)
};

static const int CURVE_PANEL_W = 400, CURVE_PANEL_H = 300, CURVE_HEADER = 40;

// text from (x, y) broken at spaces into lines of at most max_w pixels, 20 pixels apart
inline void plot_text_wrapped(Plot* p, int x, int y, const std::string& text, int max_w, const unsigned char* c) {
    std::string line;
    size_t pos = 0;
    while (pos < text.size()) {
        size_t end = text.find(' ', pos + 1);
        if (end == std::string::npos) end = text.size();
        std::string word = text.substr(pos, end - pos);  // with its leading space, but the first
        if (!line.empty() && 2 * stb_easy_font_width((char*)(line + word).c_str()) > max_w) {
            plot_text(p, x, y, line.c_str(), c);
            y += 20, line.clear();
            if (word[0] == ' ') word.erase(0, 1);
        }
        line += word, pos = end;
    }
    if (!line.empty()) plot_text(p, x, y, line.c_str(), c);
}

// The panels, three a row, into one PNG at path (written through a .tmp file and a rename):
// 1200 x (40 + rows * 300) pixels. A log that is missing, or that has no such
// metric, gets a panel that says so.
inline void draw_training_curves(const char* path, const std::vector<CurvePanel>& panels) {
    const unsigned char black[3] = {0, 0, 0}, gray[3] = {110, 110, 110}, grid[3] = {225, 225, 225};
    const unsigned char train_color[3] = {40, 90, 200}, val_color[3] = {220, 90, 20};
    int n = (int)panels.size(), rows = std::max(1, (n + 2) / 3);
    Plot p;
    plot_init(&p, 3 * CURVE_PANEL_W, CURVE_HEADER + rows * CURVE_PANEL_H);
    const char* header = "training curves from each stage's log.jsonl:";
    plot_text(&p, 12, 12, header, black);
    int key_x = 12 + 2 * stb_easy_font_width((char*)header) + 20;
    plot_rect(&p, key_x, 18, key_x + 30, 21, train_color);
    plot_text(&p, key_x + 38, 12, "training steps", black);
    key_x += 38 + 2 * stb_easy_font_width((char*)"training steps") + 24;
    plot_rect(&p, key_x, 14, key_x + 11, 25, black);
    plot_rect(&p, key_x + 1, 15, key_x + 10, 24, val_color);
    plot_text(&p, key_x + 19, 12, "validation", black);
    auto tick = [](double v) { return string_format("%.3g", v); };
    // the y axis's 5 tick labels: the fewest significant digits (3..7) that tell them apart
    auto y_ticks = [](double v0, double v1) {
        std::vector<std::string> t(5);
        for (int digits = 3; digits <= 7; digits++) {
            for (int k = 0; k <= 4; k++) t[k] = string_format("%.*g", digits, v0 + (v1 - v0) * k / 4);
            bool distinct = true;
            for (int k = 1; k <= 4; k++) distinct = distinct && t[k] != t[k - 1];
            if (distinct) break;
        }
        return t;
    };
    for (int i = 0; i < n; i++) {
        const CurvePanel& c = panels[i];
        int px = (i % 3) * CURVE_PANEL_W, py = CURVE_HEADER + (i / 3) * CURVE_PANEL_H;
        plot_text(&p, px + 12, py + 4, c.title.c_str(), black);
        LogSeries train, val;
        std::string err = read_log_series(c.log, c.key, &train);
        if (err.empty()) read_log_series(c.log, "val_" + c.key, &val);
        if (!err.empty() || (train.steps.empty() && val.steps.empty())) {
            std::string why = !err.empty() ? "no log: " + c.log + " (" + err + ")" : "no '" + c.key + "' in " + c.log;
            plot_text_wrapped(&p, px + 12, py + 110, why, CURVE_PANEL_W - 30, gray);
            continue;
        }
        // the axes' ranges over both series
        double s0 = INFINITY, s1 = -INFINITY, v0 = INFINITY, v1 = -INFINITY;
        for (const LogSeries* s : {&train, &val}) {
            for (size_t k = 0; k < s->steps.size(); k++) {
                s0 = std::min(s0, s->steps[k]), s1 = std::max(s1, s->steps[k]);
                v0 = std::min(v0, s->values[k]), v1 = std::max(v1, s->values[k]);
            }
        }
        if (!std::isnan(c.lo)) v0 = std::min(v0, c.lo);
        if (!std::isnan(c.hi)) v1 = std::max(v1, c.hi);
        if (v1 - v0 < 1e-9) v0 -= 0.5, v1 += 0.5;
        if (s1 <= s0) s0 -= 1, s1 += 1;
        int x0 = px + 100, x1 = px + CURVE_PANEL_W - 24, y0 = py + CURVE_PANEL_H - 50, y1 = py + 52;
        auto X = [&](double s) { return x0 + (x1 - x0) * (s - s0) / (s1 - s0); };
        auto Y = [&](double v) { return y0 + (y1 - y0) * (v - v0) / (v1 - v0); };
        std::vector<std::string> labels = y_ticks(v0, v1);
        for (int t = 0; t <= 4; t++) {  // y grid and ticks
            int y = (int)std::lround(Y(v0 + (v1 - v0) * t / 4));
            plot_rect(&p, x0, y, x1, y + 1, grid);
            plot_text(&p, x0 - 8 - 2 * stb_easy_font_width((char*)labels[t].c_str()), y - 6, labels[t].c_str(), black);
        }
        plot_rect(&p, x0, y0, x1, y0 + 1, black);
        plot_rect(&p, x0 - 1, y1, x0, y0 + 1, black);
        plot_text(&p, x0, y0 + 8, tick(s0).c_str(), black);
        std::string last = tick(s1);
        plot_text(&p, x1 - 2 * stb_easy_font_width((char*)last.c_str()), y0 + 8, last.c_str(), black);
        plot_text(&p, (x0 + x1) / 2 - 16, y0 + 26, "step", black);  // the x axis's label
        plot_text(&p, px + 12, py + 24, c.key.c_str(), gray);       // the y axis's label
        for (size_t k = 1; k < train.steps.size(); k++) {
            plot_line(&p, X(train.steps[k - 1]), Y(train.values[k - 1]), X(train.steps[k]), Y(train.values[k]), train_color, false);
        }
        if (train.steps.size() == 1) plot_line(&p, X(train.steps[0]), Y(train.values[0]), X(train.steps[0]), Y(train.values[0]), train_color, false);
        for (size_t k = 0; k < val.steps.size(); k++) {
            int x = (int)std::lround(X(val.steps[k])), y = (int)std::lround(Y(val.values[k]));
            plot_rect(&p, x - 5, y - 5, x + 6, y + 6, black);
            plot_rect(&p, x - 4, y - 4, x + 5, y + 5, val_color);
        }
    }
    plot_save_png(&p, path);
}
#endif  // XWIN_PLOTS
