// emu_planted_bugs.cpp - kernels with deliberately planted bugs, to show that the sanitizer builds of the
// CUDA emulation (test/cuda_emu.h) catch exactly these bugs and stay silent on correct code.
//
//   emu_planted_bugs correct       every kernel correct; prints "correct: OK", exit status 0
//   emu_planted_bugs missing_sync  shared-memory reduction with one __syncthreads removed
//                                  (the -fsanitize=thread build reports "ThreadSanitizer: data race")
//   emu_planted_bugs oob_write     a kernel writes one element past a cudaMalloc'd buffer
//                                  (the -fsanitize=address build reports "AddressSanitizer: heap-buffer-overflow")
//
// The bug modes themselves exit with status 0; a non-zero status comes from the sanitizer.
#include "cuda_emu.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr unsigned kBlock = 256;
constexpr unsigned kGrid = 64;  // 64 x 256 threads: large enough to run on the OS thread pool

// Tree reduction of one block in shared memory. kSyncInLoop = false is the planted bug: without the barrier
// inside the loop a thread reads s[t + stride] while its owner may still be adding into it.
template <bool kSyncInLoop>
__global__ void block_reduce(const float* in, float* out) {
    __shared__ float s[kBlock];
    const unsigned t = threadIdx.x;
    s[t] = in[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) s[t] += s[t + stride];
        if (kSyncInLoop) __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

// out[i] = 2 * in[i]. kOffByOne = true is the planted bug: the bound check lets thread n write out[n].
template <bool kOffByOne>
__global__ void scale_kernel(const float* in, float* out, int n) {
    const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    if (kOffByOne ? i <= n : i < n) out[i] = 2.0f * (i < n ? in[i] : 0.0f);
}

__global__ void warp_sum_atomic(const float* in, float* total) {
    float v = in[blockIdx.x * blockDim.x + threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) atomicAdd(total, v);
}

__global__ void reverse_dynamic(const float* in, float* out) {
    DYNAMIC_SHARED(float, buf);
    const unsigned t = threadIdx.x, base = blockIdx.x * blockDim.x;
    buf[t] = in[base + t];
    __syncthreads();
    out[base + t] = buf[blockDim.x - 1 - t];
}

bool check(bool ok, const char* what) {
    if (!ok) std::printf("correct: WRONG %s\n", what);
    return ok;
}

int run_correct() {
    const unsigned n = kGrid * kBlock;
    std::vector<float> h(n);
    for (unsigned i = 0; i < n; ++i) h[i] = static_cast<float>(i % 7);
    float *in = nullptr, *out = nullptr, *sums = nullptr, *total = nullptr;
    cudaMalloc(&in, n * sizeof(float));
    cudaMalloc(&out, n * sizeof(float));
    cudaMalloc(&sums, kGrid * sizeof(float));
    cudaMalloc(&total, sizeof(float));
    cudaMemcpy(in, h.data(), n * sizeof(float), cudaMemcpyHostToDevice);
    cudaMemset(total, 0, sizeof(float));

    LAUNCH(block_reduce<true>, kGrid, kBlock, 0, 0, in, sums);
    LAUNCH(scale_kernel<false>, kGrid, kBlock, 0, 0, in, out, static_cast<int>(n));
    LAUNCH(warp_sum_atomic, kGrid, kBlock, 0, 0, in, total);
    bool ok = check(cudaGetLastError() == cudaSuccess, "launch");

    std::vector<float> hs(kGrid), ho(n);
    float ht = 0.0f;
    cudaMemcpy(hs.data(), sums, kGrid * sizeof(float), cudaMemcpyDeviceToHost);
    cudaMemcpy(ho.data(), out, n * sizeof(float), cudaMemcpyDeviceToHost);
    cudaMemcpy(&ht, total, sizeof(float), cudaMemcpyDeviceToHost);
    double all = 0.0;
    for (unsigned b = 0; b < kGrid; ++b) {
        double s = 0.0;
        for (unsigned t = 0; t < kBlock; ++t) s += h[b * kBlock + t];
        ok &= check(hs[b] == static_cast<float>(s), "block_reduce");
        all += s;
    }
    for (unsigned i = 0; i < n; ++i) ok &= check(ho[i] == 2.0f * h[i], "scale_kernel");
    ok &= check(ht == static_cast<float>(all), "warp_sum_atomic");

    LAUNCH(reverse_dynamic, kGrid, kBlock, kBlock * sizeof(float), 0, in, out);
    cudaMemcpy(ho.data(), out, n * sizeof(float), cudaMemcpyDeviceToHost);
    for (unsigned i = 0; i < n; ++i) ok &= check(ho[i] == h[(i / kBlock) * kBlock + kBlock - 1 - i % kBlock], "reverse");

    cublasHandle_t handle = nullptr;
    cublasCreate(&handle);
    const float one = 1.0f, zero = 0.0f;
    // C(16 x 16) = A(16 x 32) * A^T, column-major with lda = 16
    cublasSgemm(handle, CUBLAS_OP_N, CUBLAS_OP_T, 16, 16, 32, &one, in, 16, in, 16, &zero, out, 16);
    cudaMemcpy(ho.data(), out, 256 * sizeof(float), cudaMemcpyDeviceToHost);
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
            double s = 0.0;
            for (int l = 0; l < 32; ++l) s += static_cast<double>(h[i + l * 16]) * h[j + l * 16];
            ok &= check(ho[i + j * 16] == static_cast<float>(s), "cublasSgemm");
        }
    cublasDestroy(handle);

    cudaFree(in);
    cudaFree(out);
    cudaFree(sums);
    cudaFree(total);
    std::printf("correct: %s\n", ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}

int run_missing_sync() {
    const unsigned n = kGrid * kBlock;
    std::vector<float> h(n, 1.0f);
    float *in = nullptr, *sums = nullptr;
    cudaMalloc(&in, n * sizeof(float));
    cudaMalloc(&sums, kGrid * sizeof(float));
    cudaMemcpy(in, h.data(), n * sizeof(float), cudaMemcpyHostToDevice);
    LAUNCH(block_reduce<false>, kGrid, kBlock, 0, 0, in, sums);
    float first = 0.0f;
    cudaMemcpy(&first, sums, sizeof(float), cudaMemcpyDeviceToHost);
    std::printf("missing_sync: block 0 sum = %g (256 expected)\n", first);
    cudaFree(in);
    cudaFree(sums);
    return 0;
}

int run_oob_write() {
    const int n = 1000;
    float *in = nullptr, *out = nullptr;
    cudaMalloc(&in, n * sizeof(float));
    cudaMalloc(&out, n * sizeof(float));
    cudaMemset(in, 0, n * sizeof(float));
    LAUNCH(scale_kernel<true>, (n + 255) / 256, 256, 0, 0, in, out, n);
    std::printf("oob_write: done\n");
    cudaFree(in);
    cudaFree(out);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const char* mode = argc > 1 ? argv[1] : "";
    if (std::strcmp(mode, "correct") == 0) return run_correct();
    if (std::strcmp(mode, "missing_sync") == 0) return run_missing_sync();
    if (std::strcmp(mode, "oob_write") == 0) return run_oob_write();
    std::fprintf(stderr, "usage: %s correct|missing_sync|oob_write\n", argv[0]);
    return 2;
}
