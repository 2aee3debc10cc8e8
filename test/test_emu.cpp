// test_emu.cpp - tests of the CUDA emulation layer (test/cuda_emu.h). Every expected value comes from the
// CUDA definition worked out by hand (closed-form sums, bit patterns, shuffle lane rules, the column-major
// GEMM definition written as a plain loop), never from the emulator itself.
//
// [sanitizer] tests run the sanitizer builds of test/emu_planted_bugs.cpp; their paths come from the
// environment variables XWIN_EMU_TSAN_BIN / XWIN_EMU_ASAN_BIN or, if unset, from the macros of the same
// names (-DXWIN_EMU_TSAN_BIN='"build/emu_planted_bugs_tsan"'). A missing binary fails the test.
#include "cuda_emu.h"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

using Catch::Matchers::Contains;

namespace {

constexpr unsigned FULL = 0xffffffffu;

// Device buffer owning n elements (freed at scope exit).
template <class T>
struct Dev {
    T* p = nullptr;
    size_t n = 0;
    explicit Dev(size_t count) : n(count) {
        if (cudaMalloc(&p, n * sizeof(T)) != cudaSuccess) throw std::runtime_error("cudaMalloc failed");
    }
    explicit Dev(const std::vector<T>& h) : Dev(h.size()) { upload(h); }
    ~Dev() { cudaFree(p); }
    Dev(const Dev&) = delete;
    Dev& operator=(const Dev&) = delete;
    void upload(const std::vector<T>& h) {
        if (cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice) != cudaSuccess) throw std::runtime_error("upload");
    }
    std::vector<T> download() const {
        std::vector<T> h(n);
        if (cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) != cudaSuccess) throw std::runtime_error("download");
        return h;
    }
};

uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Runs fn in a forked child with stderr captured; returns the wait status and the captured text.
struct ChildResult { int status; std::string err; };
ChildResult run_in_child(const std::function<void()>& fn) {
    int fds[2];
    if (pipe(fds) != 0) throw std::runtime_error("pipe");
    std::fflush(stdout);
    std::fflush(stderr);
    const pid_t pid = fork();
    if (pid == 0) {
        signal(SIGABRT, SIG_DFL);  // not the test framework's handlers
        signal(SIGSEGV, SIG_DFL);
        const int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 1);
        dup2(fds[1], 2);
        close(fds[0]);
        fn();
        _exit(0);
    }
    close(fds[1]);
    std::string out;
    char buf[4096];
    ssize_t r;
    while ((r = read(fds[0], buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(r));
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    return {status, out};
}

// ----------------------------------------------------------------------------------------------------------
// Kernels
// ----------------------------------------------------------------------------------------------------------

// Tree reduction in static shared memory; blockDim.x need not be a power of two.
__global__ void block_sum_tree(const int* in, int* out) {
    __shared__ int s[1024];
    const unsigned tid = threadIdx.x, n = blockDim.x;
    s[tid] = in[blockIdx.x * n + tid];
    __syncthreads();
    unsigned p = 1;
    while (p < n) p <<= 1;
    for (unsigned stride = p / 2; stride > 0; stride >>= 1) {
        if (tid < stride && tid + stride < n) s[tid] += s[tid + stride];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = s[0];
}

// Every thread records its built-in indices in the slot of its CUDA linear ids.
__global__ void record_indices(unsigned* out) {
    const unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
    const unsigned tlin = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    const unsigned blin = blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
    unsigned* o = out + (static_cast<size_t>(blin) * nthreads + tlin) * 8;
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
    o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
    o[6] = blockDim.x * 10000 + blockDim.y * 100 + blockDim.z;
    o[7] = gridDim.x * 10000 + gridDim.y * 100 + gridDim.z;
}

constexpr int kShuffleKinds = 14;
__global__ void shuffle_all(const int* in, int* out) {
    const int n = blockDim.x, t = threadIdx.x, v = in[t];
    int k = 0;
    out[k++ * n + t] = __shfl_sync(FULL, v, 5);
    out[k++ * n + t] = __shfl_sync(FULL, v, 37);
    out[k++ * n + t] = __shfl_sync(FULL, v, 3, 8);
    out[k++ * n + t] = __shfl_sync(FULL, v, -1);
    out[k++ * n + t] = __shfl_up_sync(FULL, v, 3);
    out[k++ * n + t] = __shfl_up_sync(FULL, v, 2, 8);
    out[k++ * n + t] = __shfl_down_sync(FULL, v, 5);
    out[k++ * n + t] = __shfl_down_sync(FULL, v, 4, 16);
    out[k++ * n + t] = __shfl_xor_sync(FULL, v, 1);
    out[k++ * n + t] = __shfl_xor_sync(FULL, v, 16);
    out[k++ * n + t] = __shfl_xor_sync(FULL, v, 31);
    out[k++ * n + t] = __shfl_xor_sync(FULL, v, 4, 8);
    out[k++ * n + t] = __shfl_xor_sync(FULL, v, 8, 8);
    out[k++ * n + t] = __shfl_down_sync(FULL, v, 32);
}

__global__ void shuffle_types(float* f, unsigned* u, double* d, __nv_bfloat16* b) {
    const unsigned t = threadIdx.x;
    f[t] = __shfl_xor_sync(FULL, 0.5f * static_cast<float>(t), 3);
    u[t] = __shfl_down_sync(FULL, 3000000000u + t, 1);
    d[t] = __shfl_up_sync(FULL, 0.25 * t, 1);
    b[t] = __shfl_sync(FULL, __float2bfloat16(static_cast<float>(t)), 31 - static_cast<int>(t % 32));
}

__device__ float warp_sum_xor(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}
__device__ float warp_sum_down(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL, v, o);
    return v;
}
__global__ void warp_sums(const float* in, float* xor_out, float* down_out) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    xor_out[i] = warp_sum_xor(in[i]);
    const float d = warp_sum_down(in[i]);
    if (threadIdx.x % 32 == 0) down_out[i / 32] = d;
}
// Block reduction: shuffles inside warps, shared memory across warps.
__global__ void block_sum_shfl(const float* in, float* out) {
    __shared__ float partial[32];
    const float v = warp_sum_xor(in[blockIdx.x * blockDim.x + threadIdx.x]);
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const float w = warp_sum_xor(lane < nwarps ? partial[lane] : 0.0f);
        if (lane == 0) out[blockIdx.x] = w;
    }
}

__global__ void votes(unsigned* out) {
    const unsigned lane = threadIdx.x % 32;
    unsigned* o = out + threadIdx.x * 8;
    o[0] = __ballot_sync(FULL, lane % 3 == 0);
    o[1] = static_cast<unsigned>(__any_sync(FULL, lane == 17));
    o[2] = static_cast<unsigned>(__any_sync(FULL, 0));
    o[3] = static_cast<unsigned>(__all_sync(FULL, lane < 31));
    o[4] = static_cast<unsigned>(__all_sync(FULL, 1));
    o[5] = __reduce_add_sync(FULL, lane);
    o[6] = __activemask();
    o[7] = __reduce_max_sync(FULL, lane * 3 % 32);
}

// Block of 40 threads: warp 1 is partial (8 lanes); __syncwarp works there.
__global__ void syncwarp_partial(int* out) {
    __shared__ int s[64];
    s[threadIdx.x] = static_cast<int>(threadIdx.x) * 2;
    __syncwarp();
    const unsigned lane = threadIdx.x % 32, base = threadIdx.x - lane;
    const unsigned nl = min(32u, blockDim.x - base);
    out[threadIdx.x] = s[base + (lane + 1) % nl];
    out[64 + threadIdx.x] = static_cast<int>(__activemask());
}

__global__ void sync_votes(int* out) {
    const int t = static_cast<int>(threadIdx.x);
    int* o = out + t * 5;
    o[0] = __syncthreads_count(t % 3 == 0);
    o[1] = __syncthreads_and(t < 1000);
    o[2] = __syncthreads_and(t != 5);
    o[3] = __syncthreads_or(t == 77);
    o[4] = __syncthreads_or(0);
}

__global__ void atomics_kernel(int* cnt, float* fsum, unsigned long long* big, int* mx, int* cas_cnt, unsigned* ucnt,
                               int* ticket_ctr, int* tickets, int* mn) {
    const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    atomicAdd(cnt, 1);
    atomicAdd(fsum, 1.0f);
    atomicAdd(big, 1ull << 33);
    atomicMax(mx, (i * 7919) % 100003);
    atomicMin(mn, 1000000 - (i * 7919) % 100003);
    int expected = 0;
    for (;;) {  // increment by 2 through a CAS loop
        const int prev = atomicCAS(cas_cnt, expected, expected + 2);
        if (prev == expected) break;
        expected = prev;
    }
    atomicAdd(ucnt, 3u);
    tickets[atomicAdd(ticket_ctr, 1)] = i;
}

__global__ void shared_histogram(int* out) {
    __shared__ int hist[8];
    if (threadIdx.x < 8) hist[threadIdx.x] = 0;
    __syncthreads();
    atomicAdd(&hist[threadIdx.x % 8], 1);
    __syncthreads();
    if (threadIdx.x < 8) atomicAdd(&out[threadIdx.x], hist[threadIdx.x]);
}

__global__ void reverse_block(const float* in, float* out) {
    DYNAMIC_SHARED(float, buf);
    const unsigned t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
    buf[t] = in[base + t];
    __syncthreads();
    out[base + t] = buf[n - 1 - t];
}

__global__ void dyn_alias_and_poison(unsigned* out) {
    DYNAMIC_SHARED(float, a);
    DYNAMIC_SHARED(float, b);
    if (threadIdx.x == 0) {
        out[0] = __float_as_uint(a[5]);  // never written in this block: the emulator fills it with 0xFF bytes
        b[5] = 1.0f;
        out[1] = __float_as_uint(a[5]);  // both declarations name the same memory
        out[2] = reinterpret_cast<uintptr_t>(a) % 16 == 0;
    }
}

__global__ void big_dyn(int* out, int n) {
    DYNAMIC_SHARED(int, buf);
    for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) buf[i] = i;
    __syncthreads();
    if (threadIdx.x == 0) {
        long long s = 0;
        for (int i = 0; i < n; ++i) s += buf[i];
        out[0] = static_cast<int>(s % 1000003);
    }
}

__global__ void mark(int* out) {
    const unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
    const unsigned t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    out[blockIdx.x * nthreads + t] = 7;
}
__global__ void never_runs(int* out) { out[0] = 1; }

template <int K>
__global__ void add_const(int* out) { out[threadIdx.x] += K; }
template <class T, int K>
__global__ void add_const2(T* out) { out[threadIdx.x] += static_cast<T>(K); }

// Kernel parameters are per-thread copies.
__global__ void modify_params(int n, int* out) {
    n += static_cast<int>(threadIdx.x);
    out[threadIdx.x] = n;
}

__global__ void no_args_kernel() {}

__global__ void bf16_device_math(const float* in, __nv_bfloat16* out) {
    const unsigned i = threadIdx.x;
    out[i] = __float2bfloat16(in[i]);
}

__global__ void diverge_exit(int* out) {
    if (threadIdx.x >= 16) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
__global__ void diverge_sites(int* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}
__global__ void shfl_partial(int* out) { out[threadIdx.x] = __shfl_xor_sync(FULL, static_cast<int>(threadIdx.x), 1); }
__global__ void shfl_bad_mask(int* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
}
__global__ void shfl_after_exit(int* out) {
    if (threadIdx.x % 32 >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(FULL, static_cast<int>(threadIdx.x), 1);
}
__global__ void mixed_collectives(int* out) {
    int v = static_cast<int>(threadIdx.x);
    if (threadIdx.x < 16) v = __shfl_xor_sync(FULL, v, 1);
    else v = __shfl_down_sync(FULL, v, 1);
    out[threadIdx.x] = v;
}
__global__ void diverge_in_one_block(int* out) {
    if (blockIdx.x == 37 && threadIdx.x == 3) return;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}
__global__ void kernel_throws(int* out) {
    if (threadIdx.x == 5) throw std::runtime_error("boom");
    out[threadIdx.x] = 1;
}

// Reference sums used by the reduction tests.
std::vector<int> run_block_sum_tree(unsigned block, unsigned grid) {
    std::vector<int> h(static_cast<size_t>(block) * grid);
    for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<int>(i) + 1;
    Dev<int> in(h), out(grid);
    LAUNCH(block_sum_tree, grid, block, 0, 0, in.p, out.p);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    return out.download();
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------
// Blocks, threads, barriers
// ------------------------------------------------------------------------------------------------------------
TEST_CASE("shared-memory tree reduction with __syncthreads at many block sizes", "[emu][sync]") {
    for (unsigned block : {1u, 2u, 7u, 31u, 32u, 33u, 64u, 100u, 128u, 255u, 256u, 1000u, 1024u}) {
        const unsigned grid = 5;
        CAPTURE(block);
        const std::vector<int> got = run_block_sum_tree(block, grid);
        for (unsigned b = 0; b < grid; ++b) {
            // sum over t in [0, n) of (b*n + t + 1) = b*n*n + n(n+1)/2
            const long long n = block;
            CHECK(got[b] == static_cast<int>(b * n * n + n * (n + 1) / 2));
        }
    }
}

TEST_CASE("threadIdx/blockIdx/blockDim/gridDim follow CUDA's x-fastest linearisation", "[emu][index]") {
    const dim3 grid(3, 2, 2), block(4, 3, 2);
    const unsigned nthreads = 24, nblocks = 12;
    Dev<unsigned> out(static_cast<size_t>(nthreads) * nblocks * 8);
    LAUNCH(record_indices, grid, block, 0, 0, out.p);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    const std::vector<unsigned> h = out.download();
    size_t slot = 0;
    for (unsigned bz = 0; bz < 2; ++bz)
        for (unsigned by = 0; by < 2; ++by)
            for (unsigned bx = 0; bx < 3; ++bx)
                for (unsigned tz = 0; tz < 2; ++tz)
                    for (unsigned ty = 0; ty < 3; ++ty)
                        for (unsigned tx = 0; tx < 4; ++tx, ++slot) {
                            const unsigned* o = &h[slot * 8];
                            CHECK(o[0] == tx); CHECK(o[1] == ty); CHECK(o[2] == tz);
                            CHECK(o[3] == bx); CHECK(o[4] == by); CHECK(o[5] == bz);
                            CHECK(o[6] == 40302u);
                            CHECK(o[7] == 30202u);
                        }
}

TEST_CASE("kernel parameters are per-thread copies", "[emu][launch]") {
    Dev<int> out(64);
    LAUNCH(modify_params, 1, 64, 0, 0, 1000, out.p);
    const std::vector<int> h = out.download();
    for (int t = 0; t < 64; ++t) CHECK(h[t] == 1000 + t);
    LAUNCH(no_args_kernel, 3, 32, 0, 0);
    CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("__syncthreads_count / _and / _or", "[emu][sync]") {
    Dev<int> out(100 * 5);
    LAUNCH(sync_votes, 1, 100, 0, 0, out.p);
    const std::vector<int> h = out.download();
    for (int t = 0; t < 100; ++t) {
        CAPTURE(t);
        CHECK(h[t * 5 + 0] == 34);  // 0, 3, ..., 99
        CHECK(h[t * 5 + 1] == 1);
        CHECK(h[t * 5 + 2] == 0);
        CHECK(h[t * 5 + 3] == 1);
        CHECK(h[t * 5 + 4] == 0);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Warp collectives
// ------------------------------------------------------------------------------------------------------------
TEST_CASE("all four shuffle kinds return the lanes CUDA defines", "[emu][warp]") {
    const int n = 64;  // two warps
    std::vector<int> hin(n);
    for (int t = 0; t < n; ++t) hin[t] = 1000 + 7 * t;
    Dev<int> in(hin), out(static_cast<size_t>(kShuffleKinds) * n);
    LAUNCH(shuffle_all, 1, n, 0, 0, in.p, out.p);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    const std::vector<int> h = out.download();
    auto got = [&](int kind, int t) { return h[static_cast<size_t>(kind) * n + t]; };
    for (int t = 0; t < n; ++t) {
        const int base = t & ~31, lane = t & 31;
        auto val = [&](int l) { return hin[base + l]; };
        CAPTURE(t);
        CHECK(got(0, t) == val(5));
        CHECK(got(1, t) == val(5));                                           // 37 mod 32
        CHECK(got(2, t) == val((lane & ~7) + 3));                             // lane 3 of each 8-lane group
        CHECK(got(3, t) == val(31));                                          // -1 mod 32
        CHECK(got(4, t) == (lane >= 3 ? val(lane - 3) : val(lane)));          // up: low lanes keep their value
        CHECK(got(5, t) == ((lane % 8) >= 2 ? val(lane - 2) : val(lane)));
        CHECK(got(6, t) == (lane + 5 < 32 ? val(lane + 5) : val(lane)));      // down: high lanes keep theirs
        CHECK(got(7, t) == ((lane % 16) + 4 < 16 ? val(lane + 4) : val(lane)));
        CHECK(got(8, t) == val(lane ^ 1));
        CHECK(got(9, t) == val(lane ^ 16));
        CHECK(got(10, t) == val(lane ^ 31));
        CHECK(got(11, t) == val(lane ^ 4));
        CHECK(got(12, t) == ((lane & 8) ? val(lane - 8) : val(lane)));       // earlier group ok, later group: own
        CHECK(got(13, t) == val(lane));
    }
    // a few literal spot checks
    CHECK(got(0, 32) == 1259);  // warp 1, lane 5 -> thread 37
    CHECK(got(6, 2) == 1049);   // lane 2 reads lane 7
    CHECK(got(6, 30) == 1210);  // lane 30 + 5 is out of range: own value
    CHECK(got(4, 1) == 1007);   // lane 1 - 3 is out of range: own value
    CHECK(got(12, 9) == 1007);  // lane 9 ^ 8 = 1
    CHECK(got(12, 1) == 1007);  // lane 1 ^ 8 = 9 is in the next 8-lane group: own value
    CHECK(got(10, 0) == 1217);  // lane 0 ^ 31 = 31
}

TEST_CASE("shuffles of float, unsigned, double and bf16", "[emu][warp]") {
    Dev<float> f(64);
    Dev<unsigned> u(64);
    Dev<double> d(64);
    Dev<__nv_bfloat16> b(64);
    LAUNCH(shuffle_types, 1, 64, 0, 0, f.p, u.p, d.p, b.p);
    const auto hf = f.download();
    const auto hu = u.download();
    const auto hd = d.download();
    const auto hb = b.download();
    for (unsigned t = 0; t < 64; ++t) {
        const unsigned lane = t % 32, base = t - lane;
        CHECK(hf[t] == 0.5f * static_cast<float>(base + (lane ^ 3)));
        CHECK(hu[t] == 3000000000u + (lane < 31 ? t + 1 : t));
        CHECK(hd[t] == 0.25 * (lane > 0 ? t - 1 : t));
        CHECK(__bfloat162float(hb[t]) == static_cast<float>(base + 31 - lane));
    }
}

TEST_CASE("warp-shuffle reductions (xor butterfly, down) and block reduction", "[emu][warp]") {
    for (unsigned block : {32u, 64u, 256u, 1024u}) {
        CAPTURE(block);
        const unsigned grid = 3, total = block * grid;
        std::vector<float> hin(total);
        for (unsigned i = 0; i < total; ++i) hin[i] = static_cast<float>(i % 17);
        Dev<float> in(hin), xo(total), dn(total / 32), bo(grid);
        LAUNCH(warp_sums, grid, block, 0, 0, in.p, xo.p, dn.p);
        LAUNCH(block_sum_shfl, grid, block, 0, 0, in.p, bo.p);
        REQUIRE(cudaGetLastError() == cudaSuccess);
        const auto hx = xo.download();
        const auto hd = dn.download();
        const auto hb = bo.download();
        for (unsigned w = 0; w < total / 32; ++w) {
            float s = 0;
            for (unsigned l = 0; l < 32; ++l) s += static_cast<float>((w * 32 + l) % 17);
            CHECK(hd[w] == s);
            for (unsigned l = 0; l < 32; ++l) CHECK(hx[w * 32 + l] == s);
        }
        for (unsigned b = 0; b < grid; ++b) {
            float s = 0;
            for (unsigned t = 0; t < block; ++t) s += static_cast<float>((b * block + t) % 17);
            CHECK(hb[b] == s);
        }
    }
}

TEST_CASE("__ballot_sync, __any_sync, __all_sync, __reduce_*_sync, __activemask", "[emu][warp]") {
    Dev<unsigned> out(64 * 8);
    LAUNCH(votes, 1, 64, 0, 0, out.p);
    const auto h = out.download();
    for (unsigned t = 0; t < 64; ++t) {
        CAPTURE(t);
        CHECK(h[t * 8 + 0] == 0x49249249u);  // lanes 0, 3, 6, ..., 30
        CHECK(h[t * 8 + 1] == 1u);
        CHECK(h[t * 8 + 2] == 0u);
        CHECK(h[t * 8 + 3] == 0u);
        CHECK(h[t * 8 + 4] == 1u);
        CHECK(h[t * 8 + 5] == 496u);  // 0 + 1 + ... + 31
        CHECK(h[t * 8 + 6] == 0xffffffffu);
        CHECK(h[t * 8 + 7] == 31u);   // lane 21: 63 % 32
    }
}

TEST_CASE("__syncwarp and __activemask in a partial warp", "[emu][warp]") {
    Dev<int> out(128);
    LAUNCH(syncwarp_partial, 1, 40, 0, 0, out.p);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    const auto h = out.download();
    for (int t = 0; t < 40; ++t) {
        const int base = t < 32 ? 0 : 32, nl = t < 32 ? 32 : 8, lane = t - base;
        CHECK(h[t] == 2 * (base + (lane + 1) % nl));
        CHECK(static_cast<unsigned>(h[64 + t]) == (t < 32 ? 0xffffffffu : 0xffu));
    }
}

// ------------------------------------------------------------------------------------------------------------
// Atomics
// ------------------------------------------------------------------------------------------------------------
TEST_CASE("atomics from many blocks (running on several OS threads)", "[emu][atomic]") {
    const unsigned grid = 1000, block = 256, N = grid * block;
    Dev<int> cnt(std::vector<int>{0}), mx(std::vector<int>{-5}), cas(std::vector<int>{0}), tctr(std::vector<int>{0}),
        tickets(N), mn(std::vector<int>{2000000});
    Dev<float> fsum(std::vector<float>{0.0f});
    Dev<unsigned long long> big(std::vector<unsigned long long>{0});
    Dev<unsigned> ucnt(std::vector<unsigned>{0});
    LAUNCH(atomics_kernel, grid, block, 0, 0, cnt.p, fsum.p, big.p, mx.p, cas.p, ucnt.p, tctr.p, tickets.p, mn.p);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    CHECK(cnt.download()[0] == static_cast<int>(N));
    CHECK(fsum.download()[0] == static_cast<float>(N));  // 256000 < 2^24: every partial sum is exact
    CHECK(big.download()[0] == (static_cast<unsigned long long>(N) << 33));
    CHECK(cas.download()[0] == static_cast<int>(2 * N));
    CHECK(ucnt.download()[0] == 3 * N);
    int expect_max = -5, expect_min = 2000000;
    for (long long i = 0; i < N; ++i) {
        expect_max = std::max(expect_max, static_cast<int>((i * 7919) % 100003));
        expect_min = std::min(expect_min, static_cast<int>(1000000 - (i * 7919) % 100003));
    }
    CHECK(mx.download()[0] == expect_max);
    CHECK(mn.download()[0] == expect_min);
    const auto t = tickets.download();
    std::vector<char> seen(N, 0);
    for (int v : t) {
        REQUIRE(v >= 0);
        REQUIRE(v < static_cast<int>(N));
        seen[static_cast<size_t>(v)]++;
    }
    for (char c : seen) REQUIRE(c == 1);  // every ticket handed out exactly once
}

TEST_CASE("atomics on shared memory", "[emu][atomic]") {
    Dev<int> out(std::vector<int>(8, 0));
    LAUNCH(shared_histogram, 50, 200, 0, 0, out.p);
    for (int v : out.download()) CHECK(v == 50 * 25);
}

TEST_CASE("atomicCAS/atomicExch return the old value", "[emu][atomic]") {
    int x = 5;
    CHECK(atomicCAS(&x, 4, 9) == 5);
    CHECK(x == 5);
    CHECK(atomicCAS(&x, 5, 9) == 5);
    CHECK(x == 9);
    CHECK(atomicExch(&x, 1) == 9);
    CHECK(x == 1);
    float f = 1.5f;
    CHECK(atomicAdd(&f, 2.25f) == 1.5f);
    CHECK(f == 3.75f);
    unsigned u = 7;
    CHECK(atomicInc(&u, 7u) == 7u);
    CHECK(u == 0u);
}

// ------------------------------------------------------------------------------------------------------------
// bf16 / half
// ------------------------------------------------------------------------------------------------------------
TEST_CASE("float -> bf16 rounds to nearest even, NaN stays NaN, overflow gives inf", "[emu][bf16]") {
    auto bf = [](uint32_t f) { return __bfloat16_as_ushort(__float2bfloat16(from_bits(f))); };
    CHECK(bf(0x3F800000u) == 0x3F80);  // 1.0
    CHECK(bf(0x3F808000u) == 0x3F80);  // exactly halfway, 0x3F80 is even: stays
    CHECK(bf(0x3F818000u) == 0x3F82);  // exactly halfway, 0x3F81 is odd: up to even
    CHECK(bf(0x3F808001u) == 0x3F81);  // just above halfway
    CHECK(bf(0x3F807FFFu) == 0x3F80);  // just below halfway
    CHECK(bf(0xBF818000u) == 0xBF82);  // negative: symmetric
    CHECK(bf(0x7FC00000u) == 0x7FFF);  // quiet NaN -> canonical NaN
    CHECK(bf(0x7F800001u) == 0x7FFF);  // NaN with payload only in the low bits: truncation would give inf
    CHECK(bf(0xFFC00000u) == 0x7FFF);  // negative NaN
    CHECK(bf(0x7F7FFFFFu) == 0x7F80);  // FLT_MAX rounds up to +inf
    CHECK(bf(0x7F7F7FFFu) == 0x7F7F);  // below halfway: largest finite bf16
    CHECK(bf(0x7F7F8000u) == 0x7F80);  // halfway, 0x7F7F odd: up -> inf
    CHECK(bf(0xFF7FFFFFu) == 0xFF80);  // -FLT_MAX -> -inf
    CHECK(bf(0x7F800000u) == 0x7F80);  // +inf
    CHECK(bf(0xFF800000u) == 0xFF80);  // -inf
    CHECK(bf(0x80000000u) == 0x8000);  // -0
    CHECK(bf(0x00008000u) == 0x0000);  // subnormal halfway, even: down to +0
    CHECK(bf(0x00018000u) == 0x0002);  // subnormal halfway, odd: up
    CHECK(__bfloat16_as_ushort(__float2bfloat16_rn(from_bits(0x3F818000u))) == 0x3F82);
    CHECK(__bfloat16_as_ushort(__float2bfloat16_rz(from_bits(0x3F81FFFFu))) == 0x3F81);
    CHECK(__bfloat162float(__ushort_as_bfloat16(0x3F80)) == 1.0f);
    CHECK(__bfloat162float(__ushort_as_bfloat16(0xC040)) == -3.0f);
    CHECK(bits(__bfloat162float(__ushort_as_bfloat16(0x7F80))) == 0x7F800000u);
    CHECK(std::isnan(__bfloat162float(__ushort_as_bfloat16(0x7FFF))));
    // arithmetic: computed in float, rounded once: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1 (even)
    const __nv_bfloat16 one = __float2bfloat16(1.0f), tiny = __float2bfloat16(0.00390625f);
    CHECK(__bfloat16_as_ushort(one + tiny) == 0x3F80);
    CHECK(__bfloat16_as_ushort(__hadd(one, __float2bfloat16(0.01171875f))) == 0x3F82);  // 1 + 3*2^-8 -> 1 + 2^-6
    CHECK(__bfloat16_as_ushort(one * __float2bfloat16(3.0f)) == 0x4040);
    CHECK(float(-one) == -1.0f);
    const __nv_bfloat162 pair = __floats2bfloat162_rn(1.0f, -2.0f);
    CHECK(__low2float(pair) == 1.0f);
    CHECK(__high2float(pair) == -2.0f);
    const float2 f2 = __bfloat1622float2(pair);
    CHECK(f2.x == 1.0f);
    CHECK(f2.y == -2.0f);
}

TEST_CASE("bf16 conversion inside a kernel", "[emu][bf16]") {
    Dev<float> in(std::vector<float>{from_bits(0x3F808000u), from_bits(0x3F818000u), from_bits(0x7F800001u), 65536.0f});
    Dev<__nv_bfloat16> out(4);
    LAUNCH(bf16_device_math, 1, 4, 0, 0, in.p, out.p);
    const auto h = out.download();
    CHECK(__bfloat16_as_ushort(h[0]) == 0x3F80);
    CHECK(__bfloat16_as_ushort(h[1]) == 0x3F82);
    CHECK(__bfloat16_as_ushort(h[2]) == 0x7FFF);
    CHECK(__bfloat16_as_ushort(h[3]) == 0x4780);
}

TEST_CASE("float -> half rounds to nearest even", "[emu][half]") {
    auto h = [](float f) { return __half_as_ushort(__float2half(f)); };
    CHECK(h(1.0f) == 0x3C00);
    CHECK(h(65504.0f) == 0x7BFF);
    CHECK(h(65519.0f) == 0x7BFF);
    CHECK(h(65520.0f) == 0x7C00);  // halfway to the next (nonexistent) value: inf
    CHECK(h(std::ldexp(1.0f, -24)) == 0x0001);
    CHECK(h(std::ldexp(1.0f, -25)) == 0x0000);      // halfway between 0 and 2^-24: even -> 0
    CHECK(h(std::ldexp(3.0f, -25)) == 0x0002);      // 1.5 units: even -> 2
    CHECK(h(-2.0f) == 0xC000);
    CHECK(h(std::numeric_limits<float>::quiet_NaN()) == 0x7FFF);
    CHECK(__half2float(__ushort_as_half(0x3555)) == 0.333251953125f);
    CHECK(__half2float(__ushort_as_half(0x0001)) == std::ldexp(1.0f, -24));
}

// ------------------------------------------------------------------------------------------------------------
// Dynamic shared memory, launch configuration
// ------------------------------------------------------------------------------------------------------------
TEST_CASE("dynamic shared memory", "[emu][smem]") {
    SECTION("per-block buffer of the launch's size") {
        for (unsigned block : {100u, 256u}) {
            const unsigned grid = 4, total = grid * block;
            std::vector<float> hin(total);
            for (unsigned i = 0; i < total; ++i) hin[i] = static_cast<float>(i);
            Dev<float> in(hin), out(total);
            LAUNCH(reverse_block, grid, block, block * sizeof(float), 0, in.p, out.p);
            REQUIRE(cudaGetLastError() == cudaSuccess);
            const auto h = out.download();
            for (unsigned b = 0; b < grid; ++b)
                for (unsigned t = 0; t < block; ++t) CHECK(h[b * block + t] == static_cast<float>(b * block + block - 1 - t));
        }
    }
    SECTION("declarations alias, memory starts poisoned, 16-byte aligned") {
        Dev<unsigned> out(3);
        LAUNCH(dyn_alias_and_poison, 2, 32, 64, 0, out.p);
        const auto h = out.download();
        CHECK(h[0] == 0xffffffffu);
        CHECK(h[1] == 0x3F800000u);
        CHECK(h[2] == 1u);
    }
    SECTION("more than 48 KiB needs cudaFuncSetAttribute, like on the GPU") {
        Dev<int> out(1);
        REQUIRE(cudaMemset(out.p, 0, sizeof(int)) == cudaSuccess);
        REQUIRE(cudaGetLastError() == cudaSuccess);
        LAUNCH(big_dyn, 1, 256, 60000, 0, out.p, 15000);
        CHECK(cudaGetLastError() == cudaErrorInvalidValue);
        CHECK(out.download()[0] == 0);  // did not run
        CHECK(cudaFuncSetAttribute(big_dyn, cudaFuncAttributeMaxDynamicSharedMemorySize, 300000) == cudaErrorInvalidValue);
        REQUIRE(cudaGetLastError() == cudaErrorInvalidValue);
        REQUIRE(cudaFuncSetAttribute(big_dyn, cudaFuncAttributeMaxDynamicSharedMemorySize, 100000) == cudaSuccess);
        LAUNCH(big_dyn, 1, 256, 100000, 0, out.p, 25000);
        CHECK(cudaGetLastError() == cudaSuccess);
        CHECK(out.download()[0] == 486564);  // (0 + ... + 24999) mod 1000003 = 312487500 mod 1000003
        LAUNCH(big_dyn, 1, 256, 100004, 0, out.p, 25001);
        CHECK(cudaGetLastError() == cudaErrorInvalidValue);
    }
}

TEST_CASE("invalid launch configurations fail like CUDA and do not run", "[emu][launch]") {
    Dev<int> out(4096);
    REQUIRE(cudaMemset(out.p, 0, 4096 * sizeof(int)) == cudaSuccess);
    (void)cudaGetLastError();
    LAUNCH(mark, 1, 1025, 0, 0, out.p);
    CHECK(cudaPeekAtLastError() == cudaErrorInvalidConfiguration);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
    CHECK(cudaGetLastError() == cudaSuccess);  // reading it resets it
    LAUNCH(mark, 1, dim3(32, 32, 2), 0, 0, out.p);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
    LAUNCH(mark, 1, dim3(1, 1, 65), 0, 0, out.p);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
    LAUNCH(mark, 0, 32, 0, 0, out.p);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
    LAUNCH(mark, dim3(1, 65536), 32, 0, 0, out.p);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
    LAUNCH(never_runs, 1, 2048, 0, 0, out.p);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
    for (int v : out.download()) REQUIRE(v == 0);
    CHECK(std::string(cudaGetErrorString(cudaErrorInvalidConfiguration)) == "invalid configuration argument");
    CHECK(emu_executed_kernels().count("never_runs") == 0);
    LAUNCH(mark, 1, 1024, 0, 0, out.p);
    CHECK(cudaGetLastError() == cudaSuccess);
    auto h = out.download();
    for (int i = 0; i < 4096; ++i) REQUIRE(h[i] == (i < 1024 ? 7 : 0));
    LAUNCH(mark, 3, dim3(8, 8, 16), 0, 0, out.p);
    CHECK(cudaGetLastError() == cudaSuccess);
    h = out.download();
    for (int i = 0; i < 4096; ++i) REQUIRE(h[i] == (i < 3072 ? 7 : 0));
}

TEST_CASE("executed kernels are registered by name", "[emu][launch]") {
    Dev<int> out(std::vector<int>(32, 0));
    run_block_sum_tree(32, 1);
    const auto before = emu_kernel_launch_counts();
    LAUNCH(add_const<3>, 1, 32, 0, 0, out.p);
    LAUNCH((add_const2<int, 4>), 1, 32, 0, 0, out.p);
    LAUNCH(add_const<3>, 1, 32, 0, 0, out.p);
    for (int v : out.download()) CHECK(v == 10);
    const auto names = emu_executed_kernels();
    CHECK(names.count("add_const<3>") == 1);
    CHECK(names.count("(add_const2<int, 4>)") == 1);
    CHECK(names.count("block_sum_tree") == 1);
    const auto after = emu_kernel_launch_counts();
    const unsigned long long prev = before.count("add_const<3>") ? before.at("add_const<3>") : 0;
    CHECK(after.at("add_const<3>") == prev + 2);
}

// ------------------------------------------------------------------------------------------------------------
// Runtime API
// ------------------------------------------------------------------------------------------------------------
TEST_CASE("runtime API: memory, copies, streams, events, device", "[emu][runtime]") {
    std::vector<int> h(256);
    for (int i = 0; i < 256; ++i) h[i] = i * 3;
    int* d = nullptr;
    REQUIRE(cudaMalloc(&d, 256 * sizeof(int)) == cudaSuccess);
    int first = 0;
    REQUIRE(cudaMemcpy(&first, d, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess);
    CHECK(first == -1);  // fresh device memory is filled with 0xFF bytes
    REQUIRE(cudaMemcpy(d, h.data(), 256 * sizeof(int), cudaMemcpyHostToDevice) == cudaSuccess);
    int* d2 = nullptr;
    REQUIRE(cudaMalloc(&d2, 256 * sizeof(int)) == cudaSuccess);
    REQUIRE(cudaMemcpy(d2, d, 256 * sizeof(int), cudaMemcpyDeviceToDevice) == cudaSuccess);
    std::vector<int> back(256, 0);
    REQUIRE(cudaMemcpy(back.data(), d2, 256 * sizeof(int), cudaMemcpyDefault) == cudaSuccess);
    CHECK(back == h);
    std::vector<int> hh(256, 0);
    REQUIRE(cudaMemcpy(hh.data(), h.data(), 256 * sizeof(int), cudaMemcpyHostToHost) == cudaSuccess);
    CHECK(hh == h);

    // directions that do not match the pointers, and ranges outside the allocation
    CHECK(cudaMemcpy(back.data(), h.data(), 16, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
    CHECK(cudaMemcpy(d, d2, 16, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
    CHECK(cudaMemcpy(back.data(), h.data(), 16, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue);
    CHECK(cudaMemcpy(d, h.data(), 257 * sizeof(int), cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
    CHECK(cudaMemcpy(d + 1, h.data(), 256 * sizeof(int), cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
    CHECK(cudaMemcpy(d, h.data(), 16, static_cast<cudaMemcpyKind>(9)) == cudaErrorInvalidMemcpyDirection);
    CHECK(cudaGetLastError() == cudaErrorInvalidMemcpyDirection);

    REQUIRE(cudaMemset(d, 0, 10 * sizeof(int)) == cudaSuccess);
    REQUIRE(cudaMemcpy(back.data(), d, 256 * sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess);
    for (int i = 0; i < 256; ++i) CHECK(back[i] == (i < 10 ? 0 : i * 3));
    CHECK(cudaMemset(h.data(), 0, 16) == cudaErrorInvalidValue);

    cudaStream_t s = nullptr;
    REQUIRE(cudaStreamCreate(&s) == cudaSuccess);
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    REQUIRE(cudaEventCreate(&e0) == cudaSuccess);
    REQUIRE(cudaEventCreate(&e1) == cudaSuccess);
    REQUIRE(cudaEventRecord(e0, s) == cudaSuccess);
    REQUIRE(cudaMemsetAsync(d, 0, 256 * sizeof(int), s) == cudaSuccess);
    REQUIRE(cudaMemcpyAsync(back.data(), d, 256 * sizeof(int), cudaMemcpyDeviceToHost, s) == cudaSuccess);
    REQUIRE(cudaEventRecord(e1, s) == cudaSuccess);
    REQUIRE(cudaStreamSynchronize(s) == cudaSuccess);
    REQUIRE(cudaEventSynchronize(e1) == cudaSuccess);
    for (int v : back) CHECK(v == 0);  // async work has completed on return
    float ms = -1.0f;
    REQUIRE(cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess);
    CHECK(ms >= 0.0f);
    CHECK(ms < 1000.0f);
    REQUIRE(cudaEventDestroy(e0) == cudaSuccess);
    REQUIRE(cudaEventDestroy(e1) == cudaSuccess);
    REQUIRE(cudaStreamDestroy(s) == cudaSuccess);
    CHECK(cudaDeviceSynchronize() == cudaSuccess);

    CHECK(cudaFree(h.data()) == cudaErrorInvalidValue);
    CHECK(cudaFree(nullptr) == cudaSuccess);
    REQUIRE(cudaFree(d) == cudaSuccess);
    REQUIRE(cudaFree(d2) == cudaSuccess);
    CHECK(cudaFree(d) == cudaErrorInvalidValue);  // double free is reported
    (void)cudaGetLastError();

    float* pinned = nullptr;
    REQUIRE(cudaMallocHost(&pinned, 64 * sizeof(float)) == cudaSuccess);
    pinned[63] = 1.0f;
    REQUIRE(cudaFreeHost(pinned) == cudaSuccess);

    int dev = -1;
    REQUIRE(cudaGetDevice(&dev) == cudaSuccess);
    CHECK(dev == 0);
    CHECK(cudaSetDevice(0) == cudaSuccess);
    CHECK(cudaSetDevice(1) == cudaErrorInvalidDevice);
    (void)cudaGetLastError();
    cudaDeviceProp prop;
    REQUIRE(cudaGetDeviceProperties(&prop, 0) == cudaSuccess);
    CHECK(prop.multiProcessorCount == 132);
    CHECK(prop.warpSize == 32);
    CHECK(prop.sharedMemPerBlock == 48 * 1024);
    CHECK(prop.maxThreadsPerBlock == 1024);
    CHECK(prop.major == 9);
    int attr = 0;
    REQUIRE(cudaDeviceGetAttribute(&attr, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess);
    CHECK(attr == 132);
    size_t free_b = 0, total_b = 0;
    REQUIRE(cudaMemGetInfo(&free_b, &total_b) == cudaSuccess);
    CHECK(total_b >= free_b);
    // a smaller device (emu_set_device_memory): reported, and cudaMalloc fails past it
    const size_t used = total_b - free_b;
    emu_set_device_memory(used + 4096);
    REQUIRE(cudaMemGetInfo(&free_b, &total_b) == cudaSuccess);
    CHECK(free_b == 4096);
    CHECK(total_b == used + 4096);
    void* fits = nullptr;
    void* too_big = &fits;
    CHECK(cudaMalloc(&fits, 4000) == cudaSuccess);
    CHECK(cudaMalloc(&too_big, 97) == cudaErrorMemoryAllocation);
    CHECK(too_big == nullptr);
    CHECK(cudaGetLastError() == cudaErrorMemoryAllocation);
    CHECK(cudaFree(fits) == cudaSuccess);
    emu_set_device_memory(80ull << 30);
    CHECK(nvtxRangePushA("range") >= 0);
    CHECK(nvtxRangePop() >= 0);
    CHECK(static_cast<int>(warpSize) == 32);
}

// ------------------------------------------------------------------------------------------------------------
// cuBLAS, checked against the column-major definition:
//   C(i, j) = alpha * sum_l op(A)(i, l) * op(B)(l, j) + beta * C(i, j)   (beta == 0: C is not read)
//   op(X)(r, c) = X[r + c * ld] for CUBLAS_OP_N,  X[c + r * ld] for CUBLAS_OP_T
// Inputs are multiples of 1/4 in [-2, 2] so that every sum is exact in float and results compare exactly.
// ------------------------------------------------------------------------------------------------------------
namespace {

struct GemmCase {
    bool ta, tb;
    int m, n, k, lda, ldb, ldc;
    int a_rows() const { return ta ? k : m; }
    int a_cols() const { return ta ? m : k; }
    int b_rows() const { return tb ? n : k; }
    int b_cols() const { return tb ? k : n; }
};

std::vector<float> quarter_values(size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> dist(-8, 8);
    std::vector<float> v(n);
    for (float& x : v) x = static_cast<float>(dist(rng)) * 0.25f;
    return v;
}

// The reference: a plain triple loop on the definition above, in double.
template <class GetA, class GetB, class GetC>
std::vector<double> ref_gemm(const GemmCase& g, double alpha, GetA A, GetB B, double beta, GetC C) {
    std::vector<double> out(static_cast<size_t>(g.m) * g.n);
    for (int j = 0; j < g.n; ++j)
        for (int i = 0; i < g.m; ++i) {
            double s = 0.0;
            for (int l = 0; l < g.k; ++l) {
                const double a = g.ta ? A(l + i * g.lda) : A(i + l * g.lda);
                const double b = g.tb ? B(j + l * g.ldb) : B(l + j * g.ldb);
                s += a * b;
            }
            out[static_cast<size_t>(i) + static_cast<size_t>(j) * g.m] = alpha * s + (beta != 0.0 ? beta * C(i + j * g.ldc) : 0.0);
        }
    return out;
}

const float kSentinel = 12345.0f;

std::vector<GemmCase> gemm_cases() {
    std::vector<GemmCase> cases;
    const int dims[][3] = {{5, 7, 3}, {37, 19, 70}, {64, 300, 33}, {1, 1, 1}};
    for (auto& d : dims)
        for (int ta = 0; ta < 2; ++ta)
            for (int tb = 0; tb < 2; ++tb) {
                GemmCase g{ta != 0, tb != 0, d[0], d[1], d[2], 0, 0, 0};
                g.lda = g.a_rows() + 3;
                g.ldb = g.b_rows() + 2;
                g.ldc = g.m + 4;
                cases.push_back(g);
            }
    return cases;
}

cublasOperation_t op(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }

// Checks C (with leading dimension ldc and padding rows) against the reference; padding must be untouched.
void check_c(const GemmCase& g, const std::vector<float>& c, const std::vector<double>& ref, size_t offset = 0) {
    for (int j = 0; j < g.n; ++j)
        for (int i = 0; i < g.ldc; ++i) {
            const float got = c[offset + static_cast<size_t>(i) + static_cast<size_t>(j) * g.ldc];
            if (i < g.m) {
                const float want = static_cast<float>(ref[static_cast<size_t>(i) + static_cast<size_t>(j) * g.m]);
                if (got != want) FAIL_CHECK("C(" << i << "," << j << ") = " << got << ", expected " << want);
            } else if (got != kSentinel) {
                FAIL_CHECK("padding C[" << i << "," << j << "] was overwritten: " << got);
            }
        }
}

}  // namespace

TEST_CASE("cublasSgemm matches the column-major definition for all transposes and padded leading dimensions", "[emu][cublas]") {
    cublasHandle_t h = nullptr;
    REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cublasSetStream(h, nullptr) == CUBLAS_STATUS_SUCCESS);
    unsigned seed = 1;
    for (const GemmCase& g : gemm_cases()) {
        CAPTURE(g.ta, g.tb, g.m, g.n, g.k);
        const auto ha = quarter_values(static_cast<size_t>(g.lda) * g.a_cols(), seed++);
        const auto hb = quarter_values(static_cast<size_t>(g.ldb) * g.b_cols(), seed++);
        auto hc = quarter_values(static_cast<size_t>(g.ldc) * g.n, seed++);
        for (int j = 0; j < g.n; ++j)
            for (int i = g.m; i < g.ldc; ++i) hc[static_cast<size_t>(i) + static_cast<size_t>(j) * g.ldc] = kSentinel;
        Dev<float> A(ha), B(hb), C(hc);
        const float alpha = 1.5f, beta = -0.5f;
        REQUIRE(cublasSgemm(h, op(g.ta), op(g.tb), g.m, g.n, g.k, &alpha, A.p, g.lda, B.p, g.ldb, &beta, C.p, g.ldc) ==
                CUBLAS_STATUS_SUCCESS);
        const auto ref = ref_gemm(g, alpha, [&](int i) { return ha[i]; }, [&](int i) { return hb[i]; }, beta,
                                  [&](int i) { return hc[i]; });
        check_c(g, C.download(), ref);

        // beta == 0: C is not read, so NaN in C must not propagate
        auto nan_c = hc;
        for (int j = 0; j < g.n; ++j)
            for (int i = 0; i < g.m; ++i) nan_c[static_cast<size_t>(i) + static_cast<size_t>(j) * g.ldc] = std::nanf("");
        C.upload(nan_c);
        const float zero = 0.0f;
        REQUIRE(cublasSgemm(h, op(g.ta), op(g.tb), g.m, g.n, g.k, &alpha, A.p, g.lda, B.p, g.ldb, &zero, C.p, g.ldc) ==
                CUBLAS_STATUS_SUCCESS);
        const auto ref0 = ref_gemm(g, alpha, [&](int i) { return ha[i]; }, [&](int i) { return hb[i]; }, 0.0,
                                   [&](int) { return 0.0; });
        check_c(g, C.download(), ref0);
    }
    REQUIRE(cublasDestroy(h) == CUBLAS_STATUS_SUCCESS);
}

TEST_CASE("cublasSgemm quick returns: alpha == 0, k == 0, m == 0", "[emu][cublas]") {
    cublasHandle_t h = nullptr;
    REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
    const int m = 3, n = 2, k = 4;
    Dev<float> A(std::vector<float>(12, std::nanf(""))), B(std::vector<float>(8, std::nanf("")));
    Dev<float> C(std::vector<float>{1, 2, 3, 4, 5, 6});
    const float zero = 0.0f, two = 2.0f, one = 1.0f;
    // alpha == 0: A and B (NaN here) are not read; C = beta * C
    REQUIRE(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &zero, A.p, m, B.p, k, &two, C.p, m) == CUBLAS_STATUS_SUCCESS);
    CHECK(C.download() == std::vector<float>{2, 4, 6, 8, 10, 12});
    // k == 0: the product is empty; C = beta * C
    REQUIRE(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, 0, &one, A.p, m, B.p, 1, &two, C.p, m) == CUBLAS_STATUS_SUCCESS);
    CHECK(C.download() == std::vector<float>{4, 8, 12, 16, 20, 24});
    // alpha == 0 and beta == 0: C = 0 without reading C
    C.upload(std::vector<float>(6, std::nanf("")));
    REQUIRE(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &zero, A.p, m, B.p, k, &zero, C.p, m) == CUBLAS_STATUS_SUCCESS);
    CHECK(C.download() == std::vector<float>(6, 0.0f));
    // m == 0: nothing to do
    C.upload(std::vector<float>{1, 2, 3, 4, 5, 6});
    REQUIRE(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 0, n, k, &one, A.p, 1, B.p, k, &one, C.p, 1) == CUBLAS_STATUS_SUCCESS);
    CHECK(C.download() == std::vector<float>{1, 2, 3, 4, 5, 6});
    REQUIRE(cublasDestroy(h) == CUBLAS_STATUS_SUCCESS);
}

TEST_CASE("cuBLAS argument validation", "[emu][cublas]") {
    cublasHandle_t h = nullptr;
    REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
    Dev<float> A(std::vector<float>(64, 1.0f)), B(std::vector<float>(64, 1.0f)), C(std::vector<float>(64, 7.0f));
    const float one = 1.0f;
    const auto N = CUBLAS_OP_N, T = CUBLAS_OP_T;
    auto sgemm = [&](cublasHandle_t hh, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float* al,
                     int lda, int ldb, const float* be, int ldc) {
        return cublasSgemm(hh, ta, tb, m, n, k, al, A.p, lda, B.p, ldb, be, C.p, ldc);
    };
    const cublasStatus_t INV = CUBLAS_STATUS_INVALID_VALUE;
    CHECK(sgemm(nullptr, N, N, 2, 2, 2, &one, 2, 2, &one, 2) == CUBLAS_STATUS_NOT_INITIALIZED);
    CHECK(sgemm(h, N, N, -1, 2, 2, &one, 2, 2, &one, 2) == INV);
    CHECK(sgemm(h, N, N, 2, -1, 2, &one, 2, 2, &one, 2) == INV);
    CHECK(sgemm(h, N, N, 2, 2, -1, &one, 2, 2, &one, 2) == INV);
    CHECK(sgemm(h, static_cast<cublasOperation_t>(7), N, 2, 2, 2, &one, 2, 2, &one, 2) == INV);
    CHECK(sgemm(h, N, static_cast<cublasOperation_t>(7), 2, 2, 2, &one, 2, 2, &one, 2) == INV);
    CHECK(sgemm(h, N, N, 5, 2, 3, &one, 4, 3, &one, 5) == INV);  // A is m x k: lda >= m
    CHECK(sgemm(h, T, N, 5, 2, 3, &one, 2, 3, &one, 5) == INV);  // A is k x m: lda >= k
    CHECK(sgemm(h, T, N, 5, 2, 3, &one, 3, 3, &one, 5) == CUBLAS_STATUS_SUCCESS);
    CHECK(sgemm(h, N, N, 5, 2, 3, &one, 5, 2, &one, 5) == INV);  // B is k x n: ldb >= k
    CHECK(sgemm(h, N, T, 5, 4, 3, &one, 5, 3, &one, 5) == INV);  // B is n x k: ldb >= n
    CHECK(sgemm(h, N, N, 5, 2, 3, &one, 5, 3, &one, 4) == INV);  // ldc >= m
    CHECK(sgemm(h, N, N, 0, 2, 3, &one, 0, 3, &one, 1) == INV);  // lda >= max(1, m) even for m == 0
    CHECK(sgemm(h, N, N, 2, 2, 2, nullptr, 2, 2, &one, 2) == INV);
    CHECK(sgemm(h, N, N, 2, 2, 2, &one, 2, 2, nullptr, 2) == INV);
    CHECK(cublasSgemmStridedBatched(h, N, N, 2, 2, 2, &one, A.p, 2, 4, B.p, 2, 4, &one, C.p, 2, 4, -1) == INV);
    CHECK(cublasGemmEx(h, N, N, 2, 2, 2, &one, A.p, CUDA_R_32F, 1, B.p, CUDA_R_32F, 2, &one, C.p, CUDA_R_32F, 2,
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == INV);
    // mixed / unsupported types
    CHECK(cublasGemmEx(h, N, N, 2, 2, 2, &one, A.p, CUDA_R_32F, 2, B.p, CUDA_R_16BF, 2, &one, C.p, CUDA_R_32F, 2,
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
    CHECK(cublasGemmEx(h, N, N, 2, 2, 2, &one, A.p, CUDA_R_16BF, 2, B.p, CUDA_R_16BF, 2, &one, C.p, CUDA_R_64F, 2,
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
    CHECK(cublasGemmEx(h, N, N, 2, 2, 2, &one, A.p, CUDA_R_16BF, 2, B.p, CUDA_R_16BF, 2, &one, C.p, CUDA_R_16BF, 2,
                       CUBLAS_COMPUTE_16F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
    // failed calls did not touch C (only the one valid call above wrote C's first 5 x 2 elements)
    const auto hc = C.download();
    for (size_t i = 10; i < hc.size(); ++i) REQUIRE(hc[i] == 7.0f);
    REQUIRE(cublasDestroy(h) == CUBLAS_STATUS_SUCCESS);
}

TEST_CASE("cublasSgemmStridedBatched with gaps between the matrices and a broadcast operand", "[emu][cublas]") {
    cublasHandle_t h = nullptr;
    REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
    unsigned seed = 100;
    for (const GemmCase& g : gemm_cases()) {
        for (int broadcast_b = 0; broadcast_b < 2; ++broadcast_b) {
            CAPTURE(g.ta, g.tb, g.m, g.n, g.k, broadcast_b);
            const int batch = 3;
            const long long sA = static_cast<long long>(g.lda) * g.a_cols() + 5;
            const long long sB = broadcast_b ? 0 : static_cast<long long>(g.ldb) * g.b_cols() + 7;
            const long long sC = static_cast<long long>(g.ldc) * g.n + 11;
            const auto ha = quarter_values(static_cast<size_t>(sA * batch), seed++);
            const auto hb = quarter_values(static_cast<size_t>(broadcast_b ? g.ldb * g.b_cols() : sB * batch), seed++);
            auto hc = quarter_values(static_cast<size_t>(sC * batch), seed++);
            for (int b = 0; b < batch; ++b) {
                for (int j = 0; j < g.n; ++j)
                    for (int i = g.m; i < g.ldc; ++i) hc[b * sC + i + static_cast<long long>(j) * g.ldc] = kSentinel;
                for (long long x = static_cast<long long>(g.ldc) * g.n; x < sC; ++x) hc[b * sC + x] = kSentinel;
            }
            Dev<float> A(ha), B(hb), C(hc);
            const float alpha = -0.75f, beta = 1.25f;
            REQUIRE(cublasSgemmStridedBatched(h, op(g.ta), op(g.tb), g.m, g.n, g.k, &alpha, A.p, g.lda, sA, B.p, g.ldb, sB,
                                              &beta, C.p, g.ldc, sC, batch) == CUBLAS_STATUS_SUCCESS);
            const auto hout = C.download();
            for (int b = 0; b < batch; ++b) {
                const auto ref = ref_gemm(g, alpha, [&](int i) { return ha[b * sA + i]; }, [&](int i) { return hb[b * sB + i]; },
                                          beta, [&](int i) { return hc[b * sC + i]; });
                check_c(g, hout, ref, static_cast<size_t>(b * sC));
                for (long long x = static_cast<long long>(g.ldc) * g.n; x < sC; ++x) REQUIRE(hout[b * sC + x] == kSentinel);
            }
        }
    }
    const float one = 1.0f;
    Dev<float> C(std::vector<float>{3.0f});
    CHECK(cublasSgemmStridedBatched(h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &one, C.p, 1, 1, C.p, 1, 1, &one, C.p, 1, 1, 0) ==
          CUBLAS_STATUS_SUCCESS);
    CHECK(C.download()[0] == 3.0f);  // batchCount 0: nothing
    REQUIRE(cublasDestroy(h) == CUBLAS_STATUS_SUCCESS);
}

TEST_CASE("cublasGemmEx and cublasGemmStridedBatchedEx with fp32 and bf16 operands", "[emu][cublas]") {
    cublasHandle_t h = nullptr;
    REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
    auto to_bf16 = [](const std::vector<float>& v) {
        std::vector<__nv_bfloat16> r(v.size());
        for (size_t i = 0; i < v.size(); ++i) r[i] = __float2bfloat16(v[i]);  // multiples of 1/4: exact
        return r;
    };
    unsigned seed = 500;
    for (const GemmCase& g : gemm_cases()) {
        CAPTURE(g.ta, g.tb, g.m, g.n, g.k);
        const auto ha = quarter_values(static_cast<size_t>(g.lda) * g.a_cols(), seed++);
        const auto hb = quarter_values(static_cast<size_t>(g.ldb) * g.b_cols(), seed++);
        auto hc = quarter_values(static_cast<size_t>(g.ldc) * g.n, seed++);
        for (int j = 0; j < g.n; ++j)
            for (int i = g.m; i < g.ldc; ++i) hc[static_cast<size_t>(i) + static_cast<size_t>(j) * g.ldc] = kSentinel;
        const float alpha = 1.5f, beta = -0.5f;
        const auto ref = ref_gemm(g, alpha, [&](int i) { return ha[i]; }, [&](int i) { return hb[i]; }, beta,
                                  [&](int i) { return hc[i]; });
        {  // fp32 everything
            Dev<float> A(ha), B(hb), C(hc);
            REQUIRE(cublasGemmEx(h, op(g.ta), op(g.tb), g.m, g.n, g.k, &alpha, A.p, CUDA_R_32F, g.lda, B.p, CUDA_R_32F, g.ldb,
                                 &beta, C.p, CUDA_R_32F, g.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
            check_c(g, C.download(), ref);
        }
        {  // bf16 inputs, fp32 output
            Dev<__nv_bfloat16> A(to_bf16(ha)), B(to_bf16(hb));
            Dev<float> C(hc);
            REQUIRE(cublasGemmEx(h, op(g.ta), op(g.tb), g.m, g.n, g.k, &alpha, A.p, CUDA_R_16BF, g.lda, B.p, CUDA_R_16BF,
                                 g.ldb, &beta, C.p, CUDA_R_32F, g.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP) ==
                    CUBLAS_STATUS_SUCCESS);
            check_c(g, C.download(), ref);
        }
        {  // bf16 everything: fp32 accumulation, the final value rounded once to bf16
            Dev<__nv_bfloat16> A(to_bf16(ha)), B(to_bf16(hb)), C(to_bf16(hc));
            REQUIRE(cublasGemmEx(h, op(g.ta), op(g.tb), g.m, g.n, g.k, &alpha, A.p, CUDA_R_16BF, g.lda, B.p, CUDA_R_16BF,
                                 g.ldb, &beta, C.p, CUDA_R_16BF, g.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) ==
                    CUBLAS_STATUS_SUCCESS);
            const auto hout = C.download();
            for (int j = 0; j < g.n; ++j)
                for (int i = 0; i < g.ldc; ++i) {
                    const uint16_t got = __bfloat16_as_ushort(hout[static_cast<size_t>(i) + static_cast<size_t>(j) * g.ldc]);
                    const float want = i < g.m ? static_cast<float>(ref[static_cast<size_t>(i) + static_cast<size_t>(j) * g.m])
                                               : kSentinel;
                    // the exact result is a float; round it to bf16 (nearest even) by hand
                    uint32_t u = bits(want);
                    u += 0x7fffu + ((u >> 16) & 1u);
                    REQUIRE(got == static_cast<uint16_t>(u >> 16));
                }
        }
    }
    {  // strided batched, bf16 in and out, the attention-style (T, N) layout
        const GemmCase g{true, false, 16, 24, 8, 8, 8, 16};
        const int batch = 4;
        const long long sA = 8 * 16, sB = 8 * 24, sC = 16 * 24;
        const auto ha = quarter_values(static_cast<size_t>(sA * batch), 7);
        const auto hb = quarter_values(static_cast<size_t>(sB * batch), 8);
        std::vector<float> hc(static_cast<size_t>(sC * batch), std::nanf(""));
        Dev<__nv_bfloat16> A(to_bf16(ha)), B(to_bf16(hb)), C(to_bf16(hc));
        Dev<float> C32(hc);
        const float alpha = 0.125f, beta = 0.0f;
        REQUIRE(cublasGemmStridedBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, g.m, g.n, g.k, &alpha, A.p, CUDA_R_16BF, g.lda, sA,
                                           B.p, CUDA_R_16BF, g.ldb, sB, &beta, C.p, CUDA_R_16BF, g.ldc, sC, batch,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
        REQUIRE(cublasGemmStridedBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, g.m, g.n, g.k, &alpha, A.p, CUDA_R_16BF, g.lda, sA,
                                           B.p, CUDA_R_16BF, g.ldb, sB, &beta, C32.p, CUDA_R_32F, g.ldc, sC, batch,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
        const auto hout = C.download();
        const auto hout32 = C32.download();
        for (int b = 0; b < batch; ++b) {
            const auto ref = ref_gemm(g, alpha, [&](int i) { return ha[b * sA + i]; }, [&](int i) { return hb[b * sB + i]; },
                                      0.0, [&](int) { return 0.0; });
            for (int j = 0; j < g.n; ++j)
                for (int i = 0; i < g.m; ++i) {
                    const size_t at = static_cast<size_t>(b * sC + i + j * g.ldc);
                    const float want = static_cast<float>(ref[static_cast<size_t>(i + j * g.m)]);
                    CHECK(hout32[at] == want);
                    CHECK(__bfloat16_as_ushort(hout[at]) == __bfloat16_as_ushort(__float2bfloat16(want)));
                }
        }
    }
    REQUIRE(cublasDestroy(h) == CUBLAS_STATUS_SUCCESS);
}

TEST_CASE("large cuBLAS GEMM (tiled, multi-threaded path) matches the definition", "[emu][cublas]") {
    cublasHandle_t h = nullptr;
    REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
    const GemmCase g{false, true, 130, 517, 96, 131, 520, 133};
    const auto ha = quarter_values(static_cast<size_t>(g.lda) * g.a_cols(), 42);
    const auto hb = quarter_values(static_cast<size_t>(g.ldb) * g.b_cols(), 43);
    auto hc = quarter_values(static_cast<size_t>(g.ldc) * g.n, 44);
    for (int j = 0; j < g.n; ++j)
        for (int i = g.m; i < g.ldc; ++i) hc[static_cast<size_t>(i) + static_cast<size_t>(j) * g.ldc] = kSentinel;
    Dev<float> A(ha), B(hb), C(hc);
    const float alpha = 2.0f, beta = 0.5f;
    REQUIRE(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_T, g.m, g.n, g.k, &alpha, A.p, g.lda, B.p, g.ldb, &beta, C.p, g.ldc) ==
            CUBLAS_STATUS_SUCCESS);
    check_c(g, C.download(), ref_gemm(g, alpha, [&](int i) { return ha[i]; }, [&](int i) { return hb[i]; }, beta,
                                      [&](int i) { return hc[i]; }));
    REQUIRE(cublasDestroy(h) == CUBLAS_STATUS_SUCCESS);
}

// ------------------------------------------------------------------------------------------------------------
// Detection of divergence and misuse (in-process: ScopedThrowOnError turns the abort into an exception)
// ------------------------------------------------------------------------------------------------------------
TEST_CASE("barrier divergence and bad warp collectives are reported", "[emu][divergence]") {
    emu::ScopedThrowOnError throw_errors;
    Dev<int> out(64 * 256);
    REQUIRE_THROWS_WITH(LAUNCH(diverge_exit, 1, 64, 0, 0, out.p),
                        Contains("barrier divergence") && Contains("16 of 64 threads wait in __syncthreads()") &&
                            Contains("48 threads have already exited"));
    REQUIRE_THROWS_WITH(LAUNCH(diverge_sites, 1, 64, 0, 0, out.p), Contains("different __syncthreads() calls"));
    REQUIRE_THROWS_WITH(LAUNCH(shfl_partial, 1, 48, 0, 0, out.p),
                        Contains("__shfl_xor_sync() called in a partial warp") && Contains("only 16 lanes"));
    REQUIRE_THROWS_WITH(LAUNCH(shfl_bad_mask, 1, 32, 0, 0, out.p), Contains("only the full mask"));
    REQUIRE_THROWS_WITH(LAUNCH(shfl_after_exit, 1, 64, 0, 0, out.p),
                        Contains("warp divergence") && Contains("wait in __shfl_xor_sync()"));
    REQUIRE_THROWS_WITH(LAUNCH(mixed_collectives, 1, 32, 0, 0, out.p), Contains("warp divergence"));
    REQUIRE_THROWS_WITH(LAUNCH(kernel_throws, 1, 32, 0, 0, out.p), Contains("exception escaped from the kernel: boom"));
    // in one block of a grid that runs on several OS threads
    REQUIRE_THROWS_WITH(LAUNCH(diverge_in_one_block, 64, 256, 0, 0, out.p),
                        Contains("block (37,0,0)") && Contains("barrier divergence"));
    // the emulator is still usable afterwards
    const std::vector<int> got = run_block_sum_tree(100, 3);
    CHECK(got[2] == 2 * 100 * 100 + 100 * 101 / 2);
}

TEST_CASE("by default a divergence aborts the process with a clear message", "[emu][divergence]") {
    const ChildResult r = run_in_child([] {
        int* d = nullptr;
        cudaMalloc(&d, 64 * sizeof(int));
        LAUNCH(diverge_exit, 1, 64, 0, 0, d);
    });
    CHECK(WIFSIGNALED(r.status));
    CHECK(WTERMSIG(r.status) == SIGABRT);
    CHECK_THAT(r.err, Contains("cuda_emu: FATAL") && Contains("kernel 'diverge_exit' block (0,0,0)") &&
                          Contains("barrier divergence"));
    const ChildResult r2 = run_in_child([] { __syncthreads(); });
    CHECK(WIFSIGNALED(r2.status));
    CHECK_THAT(r2.err, Contains("__syncthreads() called outside of a kernel"));
}

// ------------------------------------------------------------------------------------------------------------
// Sanitizer builds of emu_planted_bugs catch exactly the planted bugs
// ------------------------------------------------------------------------------------------------------------
#ifndef XWIN_EMU_TSAN_BIN
#define XWIN_EMU_TSAN_BIN ""
#endif
#ifndef XWIN_EMU_ASAN_BIN
#define XWIN_EMU_ASAN_BIN ""
#endif
namespace {
std::string sanitizer_binary(const char* env_name, const char* macro_value) {
    const char* e = std::getenv(env_name);
    std::string path = (e && *e) ? e : macro_value;
    INFO("set " << env_name << " (environment variable or -D macro) to the path of the sanitizer build of "
                   "test/emu_planted_bugs.cpp; currently '" << path << "'");
    REQUIRE(!path.empty());
    REQUIRE(access(path.c_str(), X_OK) == 0);
    return path;
}
struct RunResult { int exit_code; std::string output; };
RunResult run_command(const std::string& cmd) {
    std::fflush(stdout);
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    REQUIRE(p != nullptr);
    std::string out;
    char buf[4096];
    size_t r;
    while ((r = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, r);
    const int status = pclose(p);
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    return {code, out};
}
}  // namespace

TEST_CASE("TSan build: a missing __syncthreads is a data race, the correct code is clean", "[sanitizer]") {
    const std::string bin = sanitizer_binary("XWIN_EMU_TSAN_BIN", XWIN_EMU_TSAN_BIN);
    const RunResult bug = run_command(bin + " missing_sync");
    INFO(bug.output);
    CHECK(bug.exit_code != 0);
    CHECK_THAT(bug.output, Contains("ThreadSanitizer: data race") && Contains("block_reduce"));
    const RunResult ok = run_command(bin + " correct");
    INFO(ok.output);
    CHECK(ok.exit_code == 0);
    CHECK_THAT(ok.output, Contains("correct: OK") && !Contains("ThreadSanitizer") && !Contains("WARNING"));
}

TEST_CASE("ASan build: a write past a cudaMalloc buffer is a heap-buffer-overflow, the correct code is clean",
          "[sanitizer]") {
    const std::string bin = sanitizer_binary("XWIN_EMU_ASAN_BIN", XWIN_EMU_ASAN_BIN);
    const RunResult bug = run_command(bin + " oob_write");
    INFO(bug.output);
    CHECK(bug.exit_code != 0);
    CHECK_THAT(bug.output, Contains("AddressSanitizer: heap-buffer-overflow") && Contains("scale_kernel"));
    const RunResult ok = run_command(bin + " correct");
    INFO(ok.output);
    CHECK(ok.exit_code == 0);
    CHECK_THAT(ok.output, Contains("correct: OK") && !Contains("AddressSanitizer") && !Contains("LeakSanitizer"));
}

// ------------------------------------------------------------------------------------------------------------
// Warp matrix operations (nvcuda::wmma)
// ------------------------------------------------------------------------------------------------------------
namespace {
namespace wmma = nvcuda::wmma;
constexpr int kWmmaK = 32, kWmmaLd = 40, kWmmaLdc = 20, kWmmaStride = 2048;  // elements; each warp's operands 4 KiB apart

// element (r, c) of a matrix stored with leading dimension ld, row- or column-major
size_t at(bool row_major, int r, int c, int ld) { return row_major ? static_cast<size_t>(r) * ld + c : static_cast<size_t>(c) * ld + r; }

// Each warp w: D_w (16 x 16) = A_w (16 x 32) B_w (32 x 16) + C_w, in two k steps.
template <class T, class LA, class LB>
__global__ void wmma_product(float* d, const T* a, const T* b, const float* c, int acc_row_major) {
    const int w = static_cast<int>(threadIdx.x / 32);
    const bool a_rm = std::is_same<LA, wmma::row_major>::value, b_rm = std::is_same<LB, wmma::row_major>::value;
    const wmma::layout_t acc_layout = acc_row_major ? wmma::mem_row_major : wmma::mem_col_major;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, c + w * kWmmaStride, kWmmaLdc, acc_layout);
    for (int k = 0; k < kWmmaK; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
        wmma::load_matrix_sync(fa, a + w * kWmmaStride + at(a_rm, 0, k, kWmmaLd), kWmmaLd);
        wmma::load_matrix_sync(fb, b + w * kWmmaStride + at(b_rm, k, 0, kWmmaLd), kWmmaLd);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(d + w * kWmmaStride, acc, kWmmaLdc, acc_layout);
}

// Lane 0 counts the elements of the stored tile that hold the filled value, with or without a __syncwarp().
__global__ void wmma_store_then_read(float* tile, int* count, int sync) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 7.0f);
    wmma::store_matrix_sync(tile, acc, 16, wmma::mem_row_major);
    if (sync) __syncwarp();
    if (threadIdx.x == 0) {
        int n = 0;
        for (int i = 0; i < 256; ++i) n += tile[i] == 7.0f;
        *count = n;
    }
}

__global__ void wmma_load_at(const __nv_bfloat16* p, int ldm) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, p, static_cast<unsigned>(ldm));
}

template <class T, class LA, class LB>
void check_wmma_product(bool acc_row_major, std::mt19937& rng) {
    const bool a_rm = std::is_same<LA, wmma::row_major>::value, b_rm = std::is_same<LB, wmma::row_major>::value;
    const int warps = 2;
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    std::vector<T> a(warps * kWmmaStride, T(0.0f)), b(warps * kWmmaStride, T(0.0f));
    std::vector<float> c(warps * kWmmaStride, 0.0f);
    for (int w = 0; w < warps; ++w) {
        for (int r = 0; r < 16; ++r)
            for (int k = 0; k < kWmmaK; ++k) a[w * kWmmaStride + at(a_rm, r, k, kWmmaLd)] = T(dist(rng));
        for (int k = 0; k < kWmmaK; ++k)
            for (int n = 0; n < 16; ++n) b[w * kWmmaStride + at(b_rm, k, n, kWmmaLd)] = T(dist(rng));
        for (int r = 0; r < 16; ++r)
            for (int n = 0; n < 16; ++n) c[w * kWmmaStride + at(acc_row_major, r, n, kWmmaLdc)] = dist(rng);
    }
    Dev<T> da(a), db(b);
    Dev<float> dc(c), dd(warps * kWmmaStride);
    LAUNCH((wmma_product<T, LA, LB>), 1, 32 * warps, 0, 0, dd.p, da.p, db.p, dc.p, acc_row_major ? 1 : 0);
    const std::vector<float> d = dd.download();
    double worst = 0;
    for (int w = 0; w < warps; ++w) {
        for (int r = 0; r < 16; ++r) {
            for (int n = 0; n < 16; ++n) {
                double ref = c[w * kWmmaStride + at(acc_row_major, r, n, kWmmaLdc)], mag = std::fabs(ref);
                for (int k = 0; k < kWmmaK; ++k) {
                    double p = static_cast<double>(static_cast<float>(a[w * kWmmaStride + at(a_rm, r, k, kWmmaLd)])) *
                               static_cast<double>(static_cast<float>(b[w * kWmmaStride + at(b_rm, k, n, kWmmaLd)]));
                    ref += p;
                    mag += std::fabs(p);
                }
                // 33 float additions of exact products: within 33 * 2^-24 of the magnitude
                worst = std::max(worst, std::fabs(d[w * kWmmaStride + at(acc_row_major, r, n, kWmmaLdc)] - ref) / mag);
            }
        }
    }
    INFO("A " << (a_rm ? "row" : "col") << "-major, B " << (b_rm ? "row" : "col") << "-major, accumulator "
              << (acc_row_major ? "row" : "col") << "-major, " << (std::is_same<T, __half>::value ? "half" : "bf16"));
    CHECK(worst < 33.0 * 6e-8);
}
}  // namespace

TEST_CASE("wmma m16n16k16 matches a plain matmul in every layout (bf16 and half inputs, float accumulators)", "[emu][wmma]") {
    std::mt19937 rng(11);
    for (bool acc_rm : {true, false}) {
        check_wmma_product<__nv_bfloat16, wmma::row_major, wmma::row_major>(acc_rm, rng);
        check_wmma_product<__nv_bfloat16, wmma::row_major, wmma::col_major>(acc_rm, rng);
        check_wmma_product<__nv_bfloat16, wmma::col_major, wmma::row_major>(acc_rm, rng);
        check_wmma_product<__nv_bfloat16, wmma::col_major, wmma::col_major>(acc_rm, rng);
    }
    check_wmma_product<__half, wmma::row_major, wmma::col_major>(true, rng);
}

TEST_CASE("wmma: each lane stores its own part of a tile, so reading the others' needs __syncwarp", "[emu][wmma]") {
    Dev<float> tile(256);
    Dev<int> count(1);
    for (int sync : {0, 1}) {
        tile.upload(std::vector<float>(256, -1.0f));
        LAUNCH(wmma_store_then_read, 1, 32, 0, 0, tile.p, count.p, sync);
        const int n = count.download()[0];
        INFO("sync " << sync);
        if (sync) CHECK(n == 256);
        else CHECK(n < 256);  // lane 0 has stored its own elements, the other lanes have not run yet
    }
}

TEST_CASE("wmma: a partial warp, a misaligned pointer and a bad ldm are reported", "[emu][wmma]") {
    emu::ScopedThrowOnError throw_errors;
    Dev<__nv_bfloat16> buf(1024);
    REQUIRE_THROWS_WITH(LAUNCH(wmma_load_at, 1, 48, 0, 0, buf.p, 16), Contains("partial warp"));
    REQUIRE_THROWS_WITH(LAUNCH(wmma_load_at, 1, 32, 0, 0, buf.p + 8, 16), Contains("256-bit (32-byte) aligned"));
    REQUIRE_THROWS_WITH(LAUNCH(wmma_load_at, 1, 32, 0, 0, buf.p, 20), Contains("ldm 20 must be"));
    LAUNCH(wmma_load_at, 1, 32, 0, 0, buf.p + 16, 24);  // 32 bytes in, 48-byte rows: fine
}

// ------------------------------------------------------------------------------------------------------------
// Cost measurements (hidden: run with  test_binary "[perf]")
// ------------------------------------------------------------------------------------------------------------
namespace {
__global__ void perf_barriers(int iters, int* out) {
    int acc = 0;
    for (int i = 0; i < iters; ++i) {
        acc += i;
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = acc;
}
__global__ void perf_shuffles(int iters, int* out) {
    int v = static_cast<int>(threadIdx.x);
    for (int i = 0; i < iters; ++i) v += __shfl_xor_sync(FULL, v, 1);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
}
__global__ void perf_empty(int* out) {
    if (threadIdx.x == 100000) out[0] = 1;
}
double seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

TEST_CASE("cost of switches, barriers, shuffles and launches", "[.][perf]") {
    Dev<int> out(4096);
    const unsigned saved = emu::parallelism();
    emu::set_parallelism(1);
    const unsigned long long s0 = emu::fiber_switches();
    double t0 = seconds();
    LAUNCH(perf_barriers, 1, 256, 0, 0, 4000, out.p);
    double t1 = seconds();
    const double sw = static_cast<double>(emu::fiber_switches() - s0);
    std::printf("__syncthreads, 256 threads x 4000: %.1f ns per thread per barrier, %.2f switches per thread per barrier\n",
                (t1 - t0) / (256.0 * 4000) * 1e9, sw / (256.0 * 4000));
    t0 = seconds();
    LAUNCH(perf_shuffles, 1, 256, 0, 0, 4000, out.p);
    t1 = seconds();
    std::printf("__shfl_xor_sync, 256 threads x 4000: %.1f ns per lane per shuffle\n", (t1 - t0) / (256.0 * 4000) * 1e9);
    t0 = seconds();
    for (int r = 0; r < 10; ++r) LAUNCH(perf_empty, 4096, 256, 0, 0, out.p);
    t1 = seconds();
    std::printf("barrier-free kernel <<<4096, 256>>>: %.2f ns per thread, %.2f ms per launch (1 OS thread)\n",
                (t1 - t0) / (10 * 4096.0 * 256) * 1e9, (t1 - t0) / 10 * 1e3);
    t0 = seconds();
    for (int r = 0; r < 10000; ++r) LAUNCH(perf_empty, 1, 32, 0, 0, out.p);
    t1 = seconds();
    std::printf("launch overhead <<<1, 32>>>: %.2f us per launch\n", (t1 - t0) / 10000 * 1e6);
    emu::set_parallelism(saved);
    t0 = seconds();
    for (int r = 0; r < 10; ++r) LAUNCH(perf_empty, 4096, 256, 0, 0, out.p);
    t1 = seconds();
    std::printf("barrier-free kernel <<<4096, 256>>>: %.2f ms per launch (%u OS threads)\n", (t1 - t0) / 10 * 1e3,
                emu::parallelism());
    t0 = seconds();
    for (int r = 0; r < 10; ++r) LAUNCH(perf_barriers, 4096, 256, 0, 0, 8, out.p);
    t1 = seconds();
    std::printf("kernel with 8 barriers <<<4096, 256>>>: %.2f ms per launch (%u OS threads)\n", (t1 - t0) / 10 * 1e3,
                emu::parallelism());
    cublasHandle_t h = nullptr;
    cublasCreate(&h);
    Dev<float> A(768 * 1024), B(768 * 2304), C(1024 * 2304);
    cudaMemset(A.p, 0, A.n * 4);
    cudaMemset(B.p, 0, B.n * 4);
    const float one = 1.0f, zero = 0.0f;
    t0 = seconds();
    cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, 2304, 1024, 768, &one, B.p, 768, A.p, 768, &zero, C.p, 2304);
    t1 = seconds();
    std::printf("cublasSgemm 2304x1024x768: %.1f ms (%.2f GFLOP/s)\n", (t1 - t0) * 1e3,
                2.0 * 2304 * 1024 * 768 / (t1 - t0) * 1e-9);
    cublasDestroy(h);
    SUCCEED();
}
