// cuda_emu.h - run the project's CUDA source on the CPU with CUDA semantics.
//
// How it works
// ------------
// The same CUDA source compiles with nvcc for the GPU and, with this header, with g++ for the CPU:
//   g++ -std=c++17 -x c++ -include test/cuda_emu.h -Wno-unknown-pragmas llm.cu ...
// (or #include it before the kernels with XWIN_CUDA_EMULATION defined). The CUDA qualifiers become plain
// C++, every kernel launch goes through LAUNCH(kernel, grid, block, shmem_bytes, stream, args...), and the
// launch executes the whole grid on the host before it returns.
//
// * Blocks. A grid's blocks are handed out to a pool of OS threads (the launching thread plus workers;
//   XWIN_EMU_THREADS, default one per core; small grids stay on the launching thread). An OS thread runs one
//   block at a time from start to end, so `__shared__` is simply `static thread_local`: per OS thread ==
//   per running block. Dynamic shared memory (DYNAMIC_SHARED) is a per-OS-thread buffer of exactly the
//   launch's size, refilled with 0xFF bytes (NaN for float and bf16) at the start of every block so that
//   reads of uninitialised shared memory show up.
// * Threads. Each CUDA thread is a cooperative user-level thread run by "carrier" fibers (own mmap'd stack
//   with a guard page; hand-written x86-64 context switch, ucontext elsewhere). A carrier takes the next
//   unstarted thread of the block and calls the kernel; when that thread returns, the same carrier starts
//   the next one with no context switch at all. Only a thread that blocks (in __syncthreads or a warp
//   collective) keeps its carrier; it hands control directly to the next runnable thread (one switch).
//   Measured here (AMD EPYC, 2 cores): 7.9 ns per switch (243 ns with swapcontext), about 12 ns per thread
//   per __syncthreads or shuffle, 5-6 ns per thread of a barrier-free kernel, 0.2 us per small launch.
// * __syncthreads is a real barrier: the last thread to arrive releases it. If some threads exited while
//   others wait (barrier divergence), if threads wait in different __syncthreads() calls, or if a warp
//   collective cannot complete, the launch fails with a message naming kernel, block and threads: abort by
//   default, an emu::EmuError exception while an emu::ScopedThrowOnError is alive (for tests).
// * Warp collectives (__shfl*_sync, __ballot_sync, __any/__all_sync, __reduce_*_sync, __syncwarp) are
//   warp-level barriers exchanging one value per lane; the source-lane rules follow PTX shfl.sync exactly,
//   incl. `width`. Only the full mask 0xffffffff is supported, and shuffles/votes need all 32 lanes of the
//   warp: calling one in a partial warp (blockDim not a multiple of 32) or after lanes exited is an error.
// * Warp matrix operations (nvcuda::wmma, m16n16k16, bf16/half inputs, float accumulators): each lane holds its
//   own part of a fragment, as on the GPU, so mma_sync is per lane and exact in float; a lane that reads what
//   other lanes stored without __syncwarp() reads unwritten memory (see the section's comment).
// * Atomics are real host atomics (blocks run on several OS threads). Device memory is host heap memory.
//   Streams, events and async copies are synchronous (cudaEventElapsedTime measures host time). cuBLAS GEMMs
//   are computed on the CPU with fp32 accumulation, following the column-major definition.
// * Sanitizers. -fsanitize=thread: every CUDA thread is its own TSan fiber (and has its own carrier); the
//   switches between them carry no synchronisation, only __syncthreads and __syncwarp publish
//   __tsan_release/__tsan_acquire edges, so a missing barrier is reported as a data race on shared memory.
//   -fsanitize=address: stack switches are announced with __sanitizer_{start,finish}_switch_fiber and
//   cudaMalloc returns exact-size heap blocks, so out-of-bounds device accesses are heap-buffer-overflows.
//
// Environment: XWIN_EMU_THREADS (OS threads running blocks; 1 = fully deterministic, e.g. float atomics),
//              XWIN_EMU_STACK_KB (stack per carrier fiber, default 256),
//              XWIN_EMU_DEVICES (devices shown, default 1; all are the same host memory).
// Compile flags: `#pragma unroll` needs -Wno-unknown-pragmas with -Wall (GCC 12 cannot silence it from a
// header); -fno-strict-aliasing is advisable if kernels type-pun through reinterpret_cast (nvcc tolerates it).
#ifndef XWIN_CUDA_EMU_H
#define XWIN_CUDA_EMU_H

#ifndef XWIN_CUDA_EMULATION
#define XWIN_CUDA_EMULATION 1
#endif

#include <math.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------------------
// Sanitizer detection and fiber annotations
// ---------------------------------------------------------------------------------------------------------
#if defined(__SANITIZE_THREAD__)
#define XWIN_EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define XWIN_EMU_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define XWIN_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define XWIN_EMU_ASAN 1
#endif
#endif
#ifndef XWIN_EMU_TSAN
#define XWIN_EMU_TSAN 0
#endif
#ifndef XWIN_EMU_ASAN
#define XWIN_EMU_ASAN 0
#endif

#if XWIN_EMU_TSAN
extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
}
constexpr unsigned kTsanNoSync = 1u;  // __tsan_switch_to_fiber_no_sync: the switch itself is not an HB edge
#endif
#if XWIN_EMU_ASAN
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#endif

// Context switch: hand-written for x86-64 SysV, ucontext everywhere else (or with XWIN_EMU_USE_UCONTEXT=1).
#if !defined(XWIN_EMU_USE_UCONTEXT)
#if defined(__x86_64__)
#define XWIN_EMU_USE_UCONTEXT 0
#else
#define XWIN_EMU_USE_UCONTEXT 1
#endif
#endif
#if XWIN_EMU_USE_UCONTEXT
#include <ucontext.h>
#else
// xwin_emu_swap(save, to): push the callee-saved registers on the current stack, store the stack pointer
// into *save, load `to` and pop the same frame from there (7.9 ns per switch here vs 243 ns for
// swapcontext, which also makes a sigprocmask syscall). The MXCSR/x87 control words are not switched:
// all fibers share the OS thread's floating-point environment. A new fiber's stack is
// pre-filled with such a frame whose return address is xwin_emu_start, which calls r12(rbx).
// Both symbols are weak and live in COMDAT sections, so the header can be included in several objects.
extern "C" void xwin_emu_swap(void** save_sp, void* new_sp);
extern "C" void xwin_emu_start();
__asm__(
    ".pushsection .text.xwin_emu_swap,\"axG\",@progbits,xwin_emu_swap,comdat\n"
    ".weak xwin_emu_swap\n"
    ".hidden xwin_emu_swap\n"
    ".type xwin_emu_swap,@function\n"
    "xwin_emu_swap:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size xwin_emu_swap, .-xwin_emu_swap\n"
    ".popsection\n"
    ".pushsection .text.xwin_emu_start,\"axG\",@progbits,xwin_emu_start,comdat\n"
    ".weak xwin_emu_start\n"
    ".hidden xwin_emu_start\n"
    ".type xwin_emu_start,@function\n"
    "xwin_emu_start:\n"
    "  movq %rbx, %rdi\n"
    "  callq *%r12\n"
    "  ud2\n"
    ".size xwin_emu_start, .-xwin_emu_start\n"
    ".popsection\n");
#endif

// ---------------------------------------------------------------------------------------------------------
// CUDA qualifiers
// ---------------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks of one OS thread run one after the other, so per-OS-thread storage is per-block shared memory.
#define __shared__ static thread_local
// Dynamic shared memory: the launch's `shmem_bytes` buffer (nvcc side: `extern __shared__ type name[]`).
#define DYNAMIC_SHARED(type, name) \
    [[maybe_unused]] type* const name = reinterpret_cast<type*>(::emu::detail::dynamic_shared_memory())

// All kernel launches go through LAUNCH (nvcc side: kernel<<<grid, block, shmem, stream>>>(args...)).
// A template kernel with several template arguments must be parenthesised: LAUNCH((k<A, B>), ...).
#define LAUNCH(kernel, grid, block, shmem, stream, ...) \
    ::emu::launch(#kernel, kernel, grid, block, shmem, stream, ##__VA_ARGS__)

// ---------------------------------------------------------------------------------------------------------
// Vector types
// ---------------------------------------------------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct int3 { int x, y, z; };
struct float3 { float x, y, z; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int3 make_int3(int x, int y, int z) { return int3{x, y, z}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---------------------------------------------------------------------------------------------------------
// bfloat16 and half (16-bit storage, arithmetic in float, results rounded to nearest-even)
// ---------------------------------------------------------------------------------------------------------
namespace emu {
namespace detail {
inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
// float -> bf16, round to nearest, ties to even. NaN becomes the canonical NaN 0x7FFF (as CUDA does); a
// value that rounds beyond the largest bf16 carries into the exponent and becomes +-inf.
inline unsigned short f2bf_rn(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}
inline unsigned short f2bf_rz(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return static_cast<unsigned short>(u >> 16);
}
inline float bf2f(unsigned short h) { return bits_float(static_cast<uint32_t>(h) << 16); }
// float -> IEEE binary16, round to nearest even, subnormals included, NaN -> 0x7FFF.
inline unsigned short f2h_rn(float f) {
    uint32_t u = float_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fffu;
    if (a >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520: inf
    if (a >= 0x38800000u) {                                                    // normal half
        uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
        return static_cast<unsigned short>(sign | ((r - 0x38000000u) >> 13));
    }
    float scaled = bits_float(a) * 16777216.0f;  // exact: units of 2^-24
    return static_cast<unsigned short>(sign | static_cast<uint32_t>(nearbyintf(scaled)));
}
inline float h2f(unsigned short h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float v = static_cast<float>(m) * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
    return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}
}  // namespace detail
}  // namespace emu

struct __nv_bfloat16_raw { unsigned short x; };
struct __align__(2) __nv_bfloat16 {
    unsigned short __x;  // raw bits
    __nv_bfloat16() = default;
    __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(emu::detail::f2bf_rn(f)) {}
    __nv_bfloat16(double d) : __x(emu::detail::f2bf_rn(static_cast<float>(d))) {}
    __nv_bfloat16(int v) : __x(emu::detail::f2bf_rn(static_cast<float>(v))) {}
    __nv_bfloat16(unsigned int v) : __x(emu::detail::f2bf_rn(static_cast<float>(v))) {}
    __nv_bfloat16(long long v) : __x(emu::detail::f2bf_rn(static_cast<float>(v))) {}
    __nv_bfloat16(unsigned long long v) : __x(emu::detail::f2bf_rn(static_cast<float>(v))) {}
    operator float() const { return emu::detail::bf2f(__x); }
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
    __nv_bfloat162() = default;
    __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16_raw{v}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __ushort_as_bfloat16(emu::detail::f2bf_rn(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __ushort_as_bfloat16(emu::detail::f2bf_rn(f)); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { return __ushort_as_bfloat16(emu::detail::f2bf_rz(f)); }
inline float __bfloat162float(__nv_bfloat16 h) { return emu::detail::bf2f(h.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {__float2bfloat16(v.x), __float2bfloat16(v.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
// Operators as in cuda_bf16.hpp: bf16 op bf16 computes in float and rounds once. (Mixing bf16 and float
// operands is ambiguous there and here alike.)
inline __nv_bfloat16 operator+(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) + float(b); }
inline __nv_bfloat16 operator-(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) - float(b); }
inline __nv_bfloat16 operator*(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) * float(b); }
inline __nv_bfloat16 operator/(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) / float(b); }
inline __nv_bfloat16& operator+=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a + b; }
inline __nv_bfloat16& operator-=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a - b; }
inline __nv_bfloat16& operator*=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a * b; }
inline __nv_bfloat16& operator/=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a / b; }
inline __nv_bfloat16 operator-(const __nv_bfloat16& a) { return __ushort_as_bfloat16(static_cast<unsigned short>(a.__x ^ 0x8000u)); }
inline __nv_bfloat16 operator+(const __nv_bfloat16& a) { return a; }
inline bool operator==(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) == float(b); }
inline bool operator!=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) != float(b); }
inline bool operator<(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) < float(b); }
inline bool operator>(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) > float(b); }
inline bool operator<=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) <= float(b); }
inline bool operator>=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return float(a) >= float(b); }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return a - b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline __nv_bfloat16 __hdiv(__nv_bfloat16 a, __nv_bfloat16 b) { return a / b; }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) { return fmaf(float(a), float(b), float(c)); }
inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return -a; }
inline __nv_bfloat16 __habs(__nv_bfloat16 a) { return __ushort_as_bfloat16(static_cast<unsigned short>(a.__x & 0x7fffu)); }
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return fmaxf(float(a), float(b)); }
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) { return fminf(float(a), float(b)); }

struct __half_raw { unsigned short x; };
struct __align__(2) __half {
    unsigned short __x;
    __half() = default;
    __half(const __half_raw& r) : __x(r.x) {}
    __half(float f) : __x(emu::detail::f2h_rn(f)) {}
    __half(double d) : __x(emu::detail::f2h_rn(static_cast<float>(d))) {}
    __half(int v) : __x(emu::detail::f2h_rn(static_cast<float>(v))) {}
    operator float() const { return emu::detail::h2f(__x); }
};
typedef __half half;
inline __half __float2half(float f) { return __half_raw{emu::detail::f2h_rn(f)}; }
inline __half __float2half_rn(float f) { return __half_raw{emu::detail::f2h_rn(f)}; }
inline float __half2float(__half h) { return emu::detail::h2f(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short v) { return __half_raw{v}; }
inline __half operator+(const __half& a, const __half& b) { return float(a) + float(b); }
inline __half operator-(const __half& a, const __half& b) { return float(a) - float(b); }
inline __half operator*(const __half& a, const __half& b) { return float(a) * float(b); }
inline __half operator/(const __half& a, const __half& b) { return float(a) / float(b); }

// ---------------------------------------------------------------------------------------------------------
// Math and bit intrinsics (fast-math intrinsics are computed exactly here)
// ---------------------------------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline float __float_as_float(float x) { return x; }
inline unsigned int __float_as_uint(float x) { return emu::detail::float_bits(x); }
inline float __uint_as_float(unsigned int u) { return emu::detail::bits_float(u); }
inline int __float_as_int(float x) { return static_cast<int>(emu::detail::float_bits(x)); }
inline float __int_as_float(int i) { return emu::detail::bits_float(static_cast<uint32_t>(i)); }
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline unsigned int __float2uint_rn(float x) { return static_cast<unsigned int>(nearbyintf(x)); }
inline float __int2float_rn(int i) { return static_cast<float>(i); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
// min/max overloads as provided by CUDA's math headers
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned int>(a), b); }
inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned int>(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned int>(b)); }
inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned int>(b)); }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline unsigned long min(long a, unsigned long b) { return min(static_cast<unsigned long>(a), b); }
inline unsigned long max(long a, unsigned long b) { return max(static_cast<unsigned long>(a), b); }
inline unsigned long min(unsigned long a, long b) { return min(a, static_cast<unsigned long>(b)); }
inline unsigned long max(unsigned long a, long b) { return max(a, static_cast<unsigned long>(b)); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// Cache-hinted loads and stores are plain memory accesses.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------------------------------------
// Runtime types (needed by the engine below)
// ---------------------------------------------------------------------------------------------------------
enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidSymbol = 13,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
struct CUstream_st { int id; };
struct CUevent_st { double t_ms; bool recorded; unsigned flags; };
typedef CUstream_st* cudaStream_t;
typedef CUevent_st* cudaEvent_t;

// ---------------------------------------------------------------------------------------------------------
// The execution engine
// ---------------------------------------------------------------------------------------------------------
namespace emu {

// Error raised instead of abort() while a ScopedThrowOnError is alive (for testing the emulator itself).
class EmuError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

namespace detail {

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultDynSmem = 48 * 1024;
constexpr size_t kMaxDynSmemOptin = 232448;  // H100: 227 KiB
constexpr unsigned kFullMask = 0xffffffffu;

inline std::atomic<int>& throw_mode() { static std::atomic<int> v{0}; return v; }

[[noreturn]] inline void fatal(const std::string& msg) {
    std::fprintf(stderr, "cuda_emu: FATAL: %s\n", msg.c_str());
    std::fflush(stderr);
    std::abort();
}

// Relaxed atomics for the engine's own bookkeeping that different fibers touch. All fibers of a block run
// on one OS thread, so nothing is really concurrent; the atomics only keep TSan from reporting the
// scheduler's state (it must not see synchronisation there either). They compile to plain moves.
template <class T> inline T ld(const T& x) { return __atomic_load_n(&x, __ATOMIC_RELAXED); }
template <class T> inline void st(T& x, T v) { __atomic_store_n(&x, v, __ATOMIC_RELAXED); }

inline void tsan_release(void* p) {
#if XWIN_EMU_TSAN
    __tsan_release(p);
#else
    (void)p;
#endif
}
inline void tsan_acquire(void* p) {
#if XWIN_EMU_TSAN
    __tsan_acquire(p);
#else
    (void)p;
#endif
}

// ---- per-OS-thread "SM" state -------------------------------------------------------------------------
enum : int { T_UNSTARTED = 0, T_RUNNABLE, T_BLOCK_BAR, T_WARP_BAR, T_DONE, T_FAILED };
enum : int { OP_NONE = 0, OP_SHFL_IDX, OP_SHFL_UP, OP_SHFL_DOWN, OP_SHFL_XOR, OP_BALLOT, OP_ANY, OP_ALL,
             OP_REDUCE_ADD, OP_REDUCE_MIN, OP_REDUCE_MAX, OP_SYNCWARP };
inline const char* op_name(int op) {
    static const char* names[] = {"?", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                  "__ballot_sync", "__any_sync", "__all_sync", "__reduce_add_sync",
                                  "__reduce_min_sync", "__reduce_max_sync", "__syncwarp"};
    return (op >= 0 && op <= OP_SYNCWARP) ? names[op] : "?";
}

struct Carrier;
struct Launch;

// One CUDA thread of the block being executed.
struct Thr {
    uint3 tid;
    unsigned linear, warp, lane;
    int state;                 // T_* (ld/st)
    Carrier* carrier;          // fiber executing this thread (ld/st)
    unsigned warp_phase;       // number of warp collectives this thread has entered in this block
    const char* bar_file;      // __syncthreads() call site the thread waits in (ld/st)
    int bar_line;
    void* tsan;                // TSan fiber context standing for this CUDA thread
};

// Warp-collective exchange area; double buffered by the parity of the collective's sequence number.
struct WarpCtl {
    unsigned nlanes;
    unsigned arrived[2];
    int op[2];
    uint64_t slot[2][32][2];
    char tsan_sync[2];
};

// A fiber: its own stack and saved context. Runs CUDA threads one after the other.
struct Carrier {
#if XWIN_EMU_USE_UCONTEXT
    ucontext_t uc;
#else
    void* sp;
#endif
    char* map;
    size_t map_size;
    char* stack_lo;
    size_t stack_size;
    void* tsan;      // TSan builds: the TSan context of thread `index` (one carrier per thread index)
    unsigned index;  // position in Worker::carriers
};

struct Launch {
    const char* name;
    void (*invoke)(const void* args);
    const void* args;
    dim3 grid, block;
    size_t shmem;
    unsigned nthreads;
};

struct Worker {
#if XWIN_EMU_USE_UCONTEXT
    ucontext_t sched_uc;
#else
    void* sched_sp = nullptr;
#endif
    void* tsan_sched = nullptr;
    const void* sched_lo = nullptr;
    size_t sched_size = 0;

    Carrier* carriers[kMaxThreadsPerBlock];  // every carrier of this OS thread (ld/st)
    unsigned ncarriers = 0;
    Carrier* idle[kMaxThreadsPerBlock];
    unsigned nidle = 0;
    Thr thr[kMaxThreadsPerBlock];
    WarpCtl warps[kMaxThreadsPerBlock / 32];
    Thr* ready[kMaxThreadsPerBlock];
    unsigned rq_head = 0, rq_tail = 0;

    const Launch* L = nullptr;
    uint3 bid{0, 0, 0};
    unsigned n = 0;
    unsigned next_unstarted = 0;
    Thr* cur = nullptr;
    unsigned ndone = 0;
    unsigned bar_gen = 0, bar_acc = 0, bar_res = 0, bar_arrived = 0;
    uint3 layout{0, 0, 0};  // block shape the thread indices in thr[] were computed for
    bool from_sched = false;
    int failed = 0;
    std::string fail_msg;

    char* dyn = nullptr;
    size_t dyn_size = 0;
    bool dyn_valid = false;

    // TSan synchronisation objects (only their addresses matter). sync_parked: a fiber releases it whenever
    // it leaves its stack; only the scheduler acquires it (at the end of a block), so it orders the engine's
    // own bookkeeping without creating happens-before edges between CUDA threads.
    char sync_block_start = 0, sync_block_done = 0, sync_fail = 0, sync_parked = 0;
    char sync_bar[2] = {0, 0};

    unsigned long long switches = 0;  // context switches into fibers (statistics)

    Worker() {
        std::memset(thr, 0, sizeof(thr));
        std::memset(warps, 0, sizeof(warps));
        std::memset(idle, 0, sizeof(idle));
        std::memset(carriers, 0, sizeof(carriers));
        std::memset(ready, 0, sizeof(ready));
#if XWIN_EMU_TSAN
        tsan_sched = __tsan_get_current_fiber();
#endif
    }
    ~Worker();
};

inline thread_local Worker* tls_worker = nullptr;
inline thread_local std::unique_ptr<Worker> tls_worker_owner;
inline Worker& worker() {
    if (!tls_worker) {
        tls_worker_owner.reset(new Worker());
        tls_worker = tls_worker_owner.get();
    }
    return *tls_worker;
}

// Built-in index variables of the running thread / block.
inline thread_local uint3 tls_tid{0, 0, 0};
inline thread_local uint3 tls_bid{0, 0, 0};
inline thread_local uint3 tls_bdim{1, 1, 1};
inline thread_local uint3 tls_gdim{1, 1, 1};
inline void set_tid(uint3 v) {
#if XWIN_EMU_TSAN
    st(tls_tid.x, v.x); st(tls_tid.y, v.y); st(tls_tid.z, v.z);
#else
    tls_tid = v;
#endif
}
inline uint3 cur_threadIdx() {
#if XWIN_EMU_TSAN
    return uint3{ld(tls_tid.x), ld(tls_tid.y), ld(tls_tid.z)};
#else
    return tls_tid;
#endif
}
inline dim3 cur_blockIdx() { return dim3(tls_bid); }
inline dim3 cur_blockDim() { return dim3(tls_bdim); }
inline dim3 cur_gridDim() { return dim3(tls_gdim); }

inline size_t stack_bytes() {
    static const size_t v = [] {
        size_t kb = 256;
        if (const char* e = std::getenv("XWIN_EMU_STACK_KB")) kb = std::max<long>(16, std::atol(e));
        return kb * 1024;
    }();
    return v;
}

[[noreturn]] inline void carrier_main(Carrier* c);

#if XWIN_EMU_USE_UCONTEXT
inline void carrier_main_uc(unsigned hi, unsigned lo) {
    carrier_main(reinterpret_cast<Carrier*>((static_cast<uintptr_t>(hi) << 32) | static_cast<uintptr_t>(lo)));
}
#endif

inline Carrier* new_carrier(Worker& w) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    Carrier* c = new Carrier();
    c->map_size = ((stack_bytes() + page - 1) / page + 1) * page;
    void* m = mmap(nullptr, c->map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fatal("cannot allocate a fiber stack (mmap failed)");
    c->map = static_cast<char*>(m);
    mprotect(c->map, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting memory
    c->stack_lo = c->map + page;
    c->stack_size = c->map_size - page;
#if XWIN_EMU_USE_UCONTEXT
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = c->stack_lo;
    c->uc.uc_stack.ss_size = c->stack_size;
    c->uc.uc_link = nullptr;
    uintptr_t p = reinterpret_cast<uintptr_t>(c);
    makecontext(&c->uc, reinterpret_cast<void (*)()>(&carrier_main_uc), 2, static_cast<unsigned>(p >> 32),
                static_cast<unsigned>(p & 0xffffffffu));
#else
    // Initial frame, popped by xwin_emu_swap: [r15][r14][r13][r12=entry][rbx=carrier][rbp=0][ret]
    uintptr_t top = (reinterpret_cast<uintptr_t>(c->stack_lo) + c->stack_size) & ~static_cast<uintptr_t>(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = reinterpret_cast<uint64_t>(&xwin_emu_start);
    *--sp = 0;                                                  // rbp (ends frame-pointer chains)
    *--sp = reinterpret_cast<uint64_t>(c);                     // rbx -> first argument of the entry
    *--sp = reinterpret_cast<uint64_t>(&carrier_main);         // r12 -> entry function
    *--sp = 0;                                                  // r13
    *--sp = 0;                                                  // r14
    *--sp = 0;                                                  // r15
    c->sp = sp;
#endif
    c->index = ld(w.ncarriers);
    if (c->index >= kMaxThreadsPerBlock) fatal("internal error: too many carriers");
#if XWIN_EMU_TSAN
    // Created after the initial frame was written: a new TSan fiber inherits its creator's clock.
    Thr& t = w.thr[c->index];
    if (!t.tsan) {
        t.tsan = __tsan_create_fiber(0);
        __tsan_set_fiber_name(t.tsan, "cuda_emu thread");
    }
    c->tsan = t.tsan;
#else
    c->tsan = nullptr;
#endif
    st(w.carriers[c->index], c);
    st(w.ncarriers, c->index + 1);
    return c;
}

inline void free_carrier(Carrier* c) {
#if XWIN_EMU_ASAN
    __asan_unpoison_memory_region(c->stack_lo, c->stack_size);
#endif
    munmap(c->map, c->map_size);
    delete c;
}

// Drops all fibers and TSan contexts (after a failed block whose threads are frozen mid-kernel).
inline void reset_worker(Worker& w) {
    tsan_acquire(&w.sync_parked);
    for (unsigned i = 0; i < ld(w.ncarriers); ++i) free_carrier(ld(w.carriers[i]));
    st(w.ncarriers, 0u);
    w.nidle = 0;
    for (Thr& t : w.thr) {
#if XWIN_EMU_TSAN
        if (t.tsan) __tsan_destroy_fiber(t.tsan);
#endif
        t.tsan = nullptr;
    }
    w.cur = nullptr;
    w.failed = 0;
}

inline Worker::~Worker() {
    reset_worker(*this);
    std::free(dyn);
}

// ---- context switches -----------------------------------------------------------------------------------
// Three kinds: scheduler -> carrier (switch_into), carrier -> carrier (switch_carrier: a blocking thread
// hands over directly to the next runnable one) and carrier -> scheduler (switch_out). `tsan_ctx` is the
// TSan identity that continues on the target: the CUDA thread resumed there, or the carrier itself.
// Switches never synchronise in TSan's eyes (no_sync); only barriers do.
#if XWIN_EMU_ASAN
inline void asan_arrived(Worker& w, void* fake) {
    const void* lo = nullptr;
    size_t size = 0;
    __sanitizer_finish_switch_fiber(fake, &lo, &size);
    if (w.from_sched) {  // learn the scheduler's (OS thread's) stack from the first switch out of it
        w.sched_lo = lo;
        w.sched_size = size;
    }
}
#endif

inline void switch_into(Worker& w, Carrier* c, void* tsan_ctx) {
    st(w.switches, ld(w.switches) + 1);
#if XWIN_EMU_TSAN
    __tsan_switch_to_fiber(tsan_ctx, kTsanNoSync);
#else
    (void)tsan_ctx;
#endif
#if XWIN_EMU_ASAN
    void* fake = nullptr;
    w.from_sched = true;
    __sanitizer_start_switch_fiber(&fake, c->stack_lo, c->stack_size);
#endif
#if XWIN_EMU_USE_UCONTEXT
    swapcontext(&w.sched_uc, &c->uc);
#else
    xwin_emu_swap(&w.sched_sp, c->sp);
#endif
#if XWIN_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void switch_carrier(Worker& w, Carrier* from, Carrier* to, void* tsan_ctx) {
    st(w.switches, ld(w.switches) + 1);
#if XWIN_EMU_TSAN
    __tsan_release(&w.sync_parked);
    __tsan_switch_to_fiber(tsan_ctx, kTsanNoSync);
#else
    (void)tsan_ctx;
#endif
#if XWIN_EMU_ASAN
    void* fake = nullptr;
    w.from_sched = false;
    __sanitizer_start_switch_fiber(&fake, to->stack_lo, to->stack_size);
#endif
#if XWIN_EMU_USE_UCONTEXT
    swapcontext(&from->uc, &to->uc);
#else
    xwin_emu_swap(&from->sp, to->sp);
#endif
#if XWIN_EMU_ASAN
    asan_arrived(w, fake);
#endif
}

inline void switch_out(Worker& w, Carrier* c) {
#if XWIN_EMU_TSAN
    void* const sched = w.tsan_sched;  // read before the release below
    __tsan_release(&w.sync_parked);
    __tsan_switch_to_fiber(sched, kTsanNoSync);
#endif
#if XWIN_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, w.sched_lo, w.sched_size);
#endif
#if XWIN_EMU_USE_UCONTEXT
    swapcontext(&c->uc, &w.sched_uc);
#else
    xwin_emu_swap(&c->sp, w.sched_sp);
#endif
#if XWIN_EMU_ASAN
    asan_arrived(w, fake);
#endif
}

// Ready queue of released threads (FIFO; a thread is in it at most once).
inline void rq_push(Worker& w, Thr* t) {
    unsigned tail = ld(w.rq_tail);
    st(w.ready[tail % kMaxThreadsPerBlock], t);
    st(w.rq_tail, tail + 1);
}
inline Thr* rq_pop(Worker& w) {
    unsigned head = ld(w.rq_head);
    if (head == ld(w.rq_tail)) return nullptr;
    Thr* t = ld(w.ready[head % kMaxThreadsPerBlock]);
    st(w.rq_head, head + 1);
    return t;
}

// What runs next: a released thread (on its own carrier), else an idle or new carrier to start unstarted
// threads. False when nothing can run: the block is finished, or stuck (handled by the scheduler).
inline bool pick_next(Worker& w, Carrier*& c, void*& tsan_ctx) {
    if (Thr* t = rq_pop(w)) {
        st(w.cur, t);
        set_tid(t->tid);
        c = ld(t->carrier);
        tsan_ctx = t->tsan;
        return true;
    }
    const unsigned i = ld(w.next_unstarted);
    if (i < ld(w.n)) {
#if XWIN_EMU_TSAN
        st(w.next_unstarted, i + 1);  // thread i runs on its own carrier (see run_block)
        c = ld(w.carriers[i]);
        tsan_ctx = c->tsan;
#else
        const unsigned k = ld(w.nidle);
        if (k) {
            c = ld(w.idle[k - 1]);
            st(w.nidle, k - 1);
        } else {
            c = new_carrier(w);
        }
        tsan_ctx = nullptr;
#endif
        return true;
    }
    return false;
}

// Leave carrier `from` (its thread blocked, or it has nothing left to run): continue with the next
// runnable work directly, or return to the scheduler.
inline void dispatch_from(Worker& w, Carrier* from) {
    Carrier* c = nullptr;
    void* ctx = nullptr;
    if (pick_next(w, c, ctx)) switch_carrier(w, from, c, ctx);
    else switch_out(w, from);
}

inline std::string fmt3(uint3 v) {
    return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}
inline std::string where(const Worker& w, const Thr* t) {
    std::string s = "kernel '" + std::string(w.L ? w.L->name : "?") + "' block " + fmt3(w.bid);
    if (t) s += " thread " + fmt3(t->tid);
    return s;
}

inline Thr* current_thread(const char* what) {
    Worker* w = tls_worker;
    Thr* t = w ? ld(w->cur) : nullptr;
    if (!t) fatal(std::string(what) + " called outside of a kernel");
    return t;
}

// Thrown inside a CUDA thread (throw mode only) to unwind its frames after an emulation error.
struct ThreadAbort {};

// A CUDA thread hit an emulation error. Abort mode: abort right here (a debugger shows the kernel frame).
// Throw mode: unwind the thread to run_thread, which parks it; the scheduler then throws EmuError.
[[noreturn]] inline void thread_fail(Worker& w, Thr* t, const std::string& msg) {
    if (!throw_mode().load()) fatal(where(w, t) + ": " + msg);
    w.fail_msg = where(w, t) + ": " + msg;
    throw ThreadAbort{};
}

// Blocks the calling CUDA thread until it is released (pushed on the ready queue and resumed).
inline void block_current(Worker& w, Thr* t, int state) {
    st(t->state, state);
    dispatch_from(w, ld(t->carrier));
}

// Runs CUDA thread t on carrier c from its start to its end (it may block and be resumed in between).
inline void run_thread(Worker& w, Carrier* c, Thr* t) {
    tsan_acquire(&w.sync_block_start);  // the block's setup (and everything before the launch) happens-before
    st(t->carrier, c);
    st(t->state, static_cast<int>(T_RUNNABLE));
    st(w.cur, t);
    set_tid(t->tid);
    bool failed = false;
    try {
        w.L->invoke(w.L->args);
    } catch (const ThreadAbort&) {
        failed = true;
    } catch (const std::exception& e) {
        failed = true;
        w.fail_msg = where(w, t) + ": exception escaped from the kernel: " + e.what();
    } catch (...) {
        failed = true;
        w.fail_msg = where(w, t) + ": exception escaped from the kernel";
    }
    if (failed) {  // park for good (outside the catch block: no exception stays in flight)
        if (!throw_mode().load()) fatal(w.fail_msg);
        tsan_release(&w.sync_fail);
        st(w.failed, 1);
        st(t->state, static_cast<int>(T_FAILED));
        switch_out(w, c);
        fatal("internal error: a failed CUDA thread was resumed");
    }
    tsan_release(&w.sync_block_done);
    st(t->state, static_cast<int>(T_DONE));
    st(w.ndone, ld(w.ndone) + 1);
}

// A carrier's life. Normally it takes unstarted threads of the current block one after the other and runs
// them on its stack, so a thread that never blocks costs no context switch; when none are left it goes
// idle. Under TSan every thread index has its own carrier and TSan identity instead: threads sharing a
// stack would look like one TSan thread, or race on the reused stack memory.
[[noreturn]] inline void carrier_main(Carrier* c) {
    Worker& w = *tls_worker;
#if XWIN_EMU_ASAN
    asan_arrived(w, nullptr);
#endif
    for (;;) {
#if XWIN_EMU_TSAN
        run_thread(w, c, &w.thr[c->index]);
#else
        for (;;) {
            const unsigned i = ld(w.next_unstarted);
            if (i >= ld(w.n)) break;
            st(w.next_unstarted, i + 1);
            run_thread(w, c, &w.thr[i]);
        }
        const unsigned k = ld(w.nidle);
        st(w.idle[k], c);
        st(w.nidle, k + 1);
#endif
        dispatch_from(w, c);
    }
}

[[noreturn]] inline void block_error(Worker& w, const std::string& msg) {
    if (!throw_mode().load()) fatal(msg);
    reset_worker(w);
    throw EmuError(msg);
}

inline void check_failed(Worker& w) {
    if (ld(w.failed)) {
        tsan_acquire(&w.sync_fail);
        std::string msg = w.fail_msg;
        block_error(w, msg);
    }
}

inline std::string lane_list(const Worker& w, unsigned warp, int state) {
    std::string s;
    const WarpCtl& wc = w.warps[warp];
    for (unsigned l = 0; l < wc.nlanes; ++l)
        if (ld(w.thr[warp * 32 + l].state) == state) s += (s.empty() ? "" : ",") + std::to_string(l);
    return s.empty() ? "none" : s;
}

inline bool same_site(const char* f1, int l1, const char* f2, int l2) {
    return l1 == l2 && (f1 == f2 || std::strcmp(f1, f2) == 0);
}

// Releases the block barrier: every thread waits in __syncthreads. `self` (the last arriving thread, or
// null when called by the scheduler) keeps running; all others are queued in thread order.
inline void release_block_barrier(Worker& w, Thr* self) {
    const Thr* ref = self ? self : &w.thr[0];
    const char* file = ld(ref->bar_file);
    const int line = ld(ref->bar_line);
    for (unsigned i = 0; i < ld(w.n); ++i) {
        const Thr* t = &w.thr[i];
        if (!same_site(ld(t->bar_file), ld(t->bar_line), file, line)) {
            const std::string msg = "threads wait in different __syncthreads() calls: thread " + fmt3(ref->tid) + " at " +
                                    file + ":" + std::to_string(line) + ", thread " + fmt3(t->tid) + " at " +
                                    ld(t->bar_file) + ":" + std::to_string(ld(t->bar_line));
            if (self) thread_fail(w, self, msg);
            block_error(w, where(w, nullptr) + ": " + msg);
        }
    }
    st(w.bar_res, ld(w.bar_acc));
    st(w.bar_acc, 0u);
    st(w.bar_arrived, 0u);
    st(w.bar_gen, ld(w.bar_gen) + 1);
    for (unsigned i = 0; i < ld(w.n); ++i) {
        Thr* t = &w.thr[i];
        if (t == self) continue;
        st(t->state, static_cast<int>(T_RUNNABLE));
        rq_push(w, t);
    }
}

// Scheduler, nothing can run: the block is complete (false), or report why it is stuck.
inline bool barrier_step(Worker& w) {
    const unsigned n = ld(w.n);
    unsigned ndone = 0, nbar = 0, nwarp = 0;
    Thr* first_bar = nullptr;
    Thr* first_done = nullptr;
    Thr* first_warp = nullptr;
    for (unsigned i = 0; i < n; ++i) {
        Thr* t = &w.thr[i];
        switch (ld(t->state)) {
            case T_DONE: ++ndone; if (!first_done) first_done = t; break;
            case T_BLOCK_BAR: ++nbar; if (!first_bar) first_bar = t; break;
            case T_WARP_BAR: ++nwarp; if (!first_warp) first_warp = t; break;
            default: fatal("internal error: unexpected thread state in the block scheduler");
        }
    }
    if (ndone == n) return false;
    if (nwarp) {
        const unsigned wi = first_warp->warp;
        const int op = ld(w.warps[wi].op[(ld(first_warp->warp_phase) - 1) & 1]);
        block_error(w, where(w, nullptr) + ": warp divergence in warp " + std::to_string(wi) + ": lanes {" +
                           lane_list(w, wi, T_WARP_BAR) + "} wait in " + op_name(op) + "() but lanes {" +
                           lane_list(w, wi, T_DONE) + "} have exited and lanes {" + lane_list(w, wi, T_BLOCK_BAR) +
                           "} wait in __syncthreads(); all lanes must take part in a warp collective");
    }
    if (ndone) {
        block_error(w, where(w, nullptr) + ": barrier divergence: " + std::to_string(nbar) + " of " + std::to_string(n) +
                           " threads wait in __syncthreads() at " + ld(first_bar->bar_file) + ":" +
                           std::to_string(ld(first_bar->bar_line)) + " (e.g. thread " + fmt3(first_bar->tid) + ") but " +
                           std::to_string(ndone) + " threads have already exited (e.g. thread " + fmt3(first_done->tid) +
                           ")");
    }
    release_block_barrier(w, nullptr);  // normally done inline by the last arriving thread
    return true;
}

inline void run_block(Worker& w, const Launch& L, uint64_t block_linear) {
    const dim3 g = L.grid, b = L.block;
    w.L = &L;
    w.bid = uint3{static_cast<unsigned>(block_linear % g.x), static_cast<unsigned>((block_linear / g.x) % g.y),
                  static_cast<unsigned>(block_linear / (static_cast<uint64_t>(g.x) * g.y))};
    tls_bid = w.bid;
    tls_bdim = uint3{b.x, b.y, b.z};
    tls_gdim = uint3{g.x, g.y, g.z};
    const unsigned n = L.nthreads;
    st(w.n, n);
    if (w.layout.x != b.x || w.layout.y != b.y || w.layout.z != b.z) {  // thread indices for this block shape
        unsigned i = 0;
        for (unsigned z = 0; z < b.z; ++z)
            for (unsigned y = 0; y < b.y; ++y)
                for (unsigned x = 0; x < b.x; ++x, ++i) {
                    Thr& t = w.thr[i];
                    t.tid = uint3{x, y, z};
                    t.linear = i;
                    t.warp = i / 32;
                    t.lane = i % 32;
                }
        w.layout = uint3{b.x, b.y, b.z};
    }
    for (unsigned i = 0; i < n; ++i) {
        Thr& t = w.thr[i];
        st(t.state, static_cast<int>(T_UNSTARTED));
        st(t.carrier, static_cast<Carrier*>(nullptr));
        st(t.warp_phase, 0u);
        st(t.bar_file, "");
        st(t.bar_line, 0);
    }
#if XWIN_EMU_TSAN
    while (ld(w.ncarriers) < n) new_carrier(w);  // one carrier per thread index, made before the release below
#endif
    const unsigned nwarps = (n + 31) / 32;
    for (unsigned i = 0; i < nwarps; ++i) {
        WarpCtl& wc = w.warps[i];
        wc.nlanes = std::min(32u, n - i * 32);
        st(wc.arrived[0], 0u); st(wc.arrived[1], 0u);
        st(wc.op[0], 0); st(wc.op[1], 0);
    }
    st(w.next_unstarted, 0u);
    st(w.ndone, 0u);
    st(w.rq_head, 0u);
    st(w.rq_tail, 0u);
    st(w.bar_gen, 0u);
    st(w.bar_acc, 0u);
    st(w.bar_res, 0u);
    st(w.bar_arrived, 0u);
    if (!w.dyn_valid || w.dyn_size != L.shmem) {
        std::free(w.dyn);
        void* p = nullptr;
        if (posix_memalign(&p, 128, L.shmem ? L.shmem : 1) != 0) fatal("out of memory (dynamic shared memory)");
        w.dyn = static_cast<char*>(p);
        w.dyn_size = L.shmem;
        w.dyn_valid = true;
    }
    if (L.shmem) std::memset(w.dyn, 0xff, L.shmem);
    tsan_release(&w.sync_block_start);

    for (;;) {
        Carrier* c = nullptr;
        void* ctx = nullptr;
        if (pick_next(w, c, ctx)) {
            switch_into(w, c, ctx);  // returns when nothing is runnable any more (or a thread failed)
            check_failed(w);
            continue;
        }
        if (!barrier_step(w)) break;
    }
    st(w.cur, static_cast<Thr*>(nullptr));
    tsan_acquire(&w.sync_block_done);
    tsan_acquire(&w.sync_parked);
}

// ---- device-side primitives ---------------------------------------------------------------------------
inline unsigned block_barrier(int pred, const char* file, int line) {
    Worker& w = *tls_worker;
    Thr* t = current_thread("__syncthreads()");
    const unsigned g = ld(w.bar_gen);
    if (pred) st(w.bar_acc, ld(w.bar_acc) + 1);
    st(t->bar_file, file);
    st(t->bar_line, line);
    tsan_release(&w.sync_bar[g & 1]);
    const unsigned arrived = ld(w.bar_arrived) + 1;
    if (arrived == ld(w.n)) {  // last one in (nobody exited): release and keep running
        st(t->state, static_cast<int>(T_BLOCK_BAR));
        release_block_barrier(w, t);
        st(t->state, static_cast<int>(T_RUNNABLE));
    } else {
        st(w.bar_arrived, arrived);
        block_current(w, t, T_BLOCK_BAR);
    }
    tsan_acquire(&w.sync_bar[g & 1]);
    return ld(w.bar_res);
}

// Warp-level barrier + exchange of one 16-byte value per lane. Returns the slot parity holding the values.
inline unsigned warp_exchange(Worker& w, Thr* t, int op, unsigned mask, uint64_t v0, uint64_t v1) {
    WarpCtl& wc = w.warps[t->warp];
    const unsigned present = wc.nlanes == 32 ? kFullMask : ((1u << wc.nlanes) - 1u);
    if (op == OP_SYNCWARP) {
        if (mask != kFullMask && mask != present)
            thread_fail(w, t, std::string("__syncwarp(mask) supports only the full mask (got 0x") + std::to_string(mask) + ")");
    } else {
        if (mask != kFullMask)
            thread_fail(w, t, std::string(op_name(op)) + "(): only the full mask 0xffffffff is supported (got " +
                                  std::to_string(mask) + ")");
        if (wc.nlanes != 32)
            thread_fail(w, t, std::string(op_name(op)) + "() called in a partial warp: warp " + std::to_string(t->warp) +
                                  " has only " + std::to_string(wc.nlanes) + " lanes (blockDim " + fmt3(tls_bdim) +
                                  " has " + std::to_string(ld(w.n)) + " threads, not a multiple of 32)");
    }
    const unsigned phase = ld(t->warp_phase);
    st(t->warp_phase, phase + 1);
    const unsigned s = phase & 1;
    st(wc.slot[s][t->lane][0], v0);
    st(wc.slot[s][t->lane][1], v1);
    unsigned a = ld(wc.arrived[s]);
    if (a == 0) {
        st(wc.op[s], op);
    } else if (ld(wc.op[s]) != op) {
        thread_fail(w, t, std::string("warp divergence: this lane calls ") + op_name(op) +
                              "() while other lanes of its warp are in " + op_name(ld(wc.op[s])) + "()");
    }
    ++a;
    if (op == OP_SYNCWARP) tsan_release(&wc.tsan_sync[s]);
    if (a < wc.nlanes) {
        st(wc.arrived[s], a);
        block_current(w, t, T_WARP_BAR);
    } else {
        st(wc.arrived[s], 0u);
        for (unsigned l = 0; l < wc.nlanes; ++l) {
            Thr* o = &w.thr[t->warp * 32 + l];
            if (o != t && ld(o->state) == T_WARP_BAR) {
                st(o->state, static_cast<int>(T_RUNNABLE));
                rq_push(w, o);
            }
        }
    }
    if (op == OP_SYNCWARP) tsan_acquire(&wc.tsan_sync[s]);
    return s;
}

// PTX shfl.sync source-lane computation: c = ((32-width) << 8) | clamp, clamp = 0 for up, 0x1f otherwise.
inline int shfl_src_lane(int op, int lane, int b, int width) {
    const int segmask = (32 - width) & 0x1f;
    const int min_lane = lane & segmask;
    const int clamp = (op == OP_SHFL_UP) ? 0 : 0x1f;
    const int max_lane = min_lane | (clamp & ~segmask);
    int j = lane;
    bool ok = true;
    switch (op) {
        case OP_SHFL_IDX: j = min_lane | (b & 0x1f & ~segmask); break;
        case OP_SHFL_UP: j = lane - b; ok = j >= max_lane; break;
        case OP_SHFL_DOWN: j = lane + b; ok = j <= max_lane; break;
        case OP_SHFL_XOR: j = lane ^ b; ok = j <= max_lane; break;
        default: break;
    }
    return ok ? j : lane;
}

template <class T>
inline T shfl(int op, unsigned mask, T var, int b, int width) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shuffled type must be trivially copyable, <= 16 bytes");
    Worker& w = *tls_worker;
    Thr* t = current_thread(op_name(op));
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
        thread_fail(w, t, std::string(op_name(op)) + "(): width must be a power of two in [1, 32], got " + std::to_string(width));
    uint64_t raw[2] = {0, 0};
    std::memcpy(raw, &var, sizeof(T));
    const unsigned s = warp_exchange(w, t, op, mask, raw[0], raw[1]);
    const int j = shfl_src_lane(op, static_cast<int>(t->lane), b, width);
    const WarpCtl& wc = w.warps[t->warp];
    uint64_t out[2] = {ld(wc.slot[s][j][0]), ld(wc.slot[s][j][1])};
    T r;
    std::memcpy(&r, out, sizeof(T));
    return r;
}

template <class F>
inline uint64_t warp_reduce(int op, unsigned mask, uint64_t v, F combine) {
    Worker& w = *tls_worker;
    Thr* t = current_thread(op_name(op));
    const unsigned s = warp_exchange(w, t, op, mask, v, 0);
    const WarpCtl& wc = w.warps[t->warp];
    uint64_t acc = ld(wc.slot[s][0][0]);
    for (unsigned l = 1; l < 32; ++l) acc = combine(acc, ld(wc.slot[s][l][0]), l);
    return acc;
}

// The lanes present in the caller's warp (what CUDA reports in converged code). Which lanes of a diverged
// warp execute together is not modelled.
inline unsigned active_mask() {
    Worker& w = *tls_worker;
    Thr* t = current_thread("__activemask()");
    const unsigned nl = w.warps[t->warp].nlanes;
    return nl == 32 ? kFullMask : (1u << nl) - 1u;
}

inline void* dynamic_shared_memory() {
    Worker* w = tls_worker;
    if (!w || !ld(w->cur)) fatal("DYNAMIC_SHARED used outside of a kernel");
    return w->dyn;
}

// ---- OS-thread pool running grid blocks (and cuBLAS row blocks) ---------------------------------------
class Pool {
public:
    static Pool& get() {
        static Pool* p = new Pool();  // never destroyed: workers may still wait on it during exit
        return *p;
    }
    unsigned size() const { return nthreads_; }
    void set_limit(unsigned n) { limit_.store(std::max(1u, std::min(n, nthreads_))); }
    unsigned limit() const { return limit_.load(); }

    // Runs fn(ctx, i) for i in [0, n) on up to limit() threads (the caller included). Rethrows the first
    // exception thrown by fn; remaining items are skipped after it.
    void run(uint64_t n, void (*fn)(void*, uint64_t), void* ctx) {
        std::lock_guard<std::mutex> serial(dispatch_);
        const unsigned helpers = std::min<uint64_t>(limit() - 1, n > 0 ? n - 1 : 0);
        if (helpers == 0) {
            for (uint64_t i = 0; i < n; ++i) fn(ctx, i);
            return;
        }
        start_threads();
        {
            std::lock_guard<std::mutex> lk(m_);
            fn_ = fn;
            ctx_ = ctx;
            n_ = n;
            next_.store(0);
            failed_.store(false);
            error_ = nullptr;
            active_ = helpers;
            pending_ = helpers;
            ++gen_;
        }
        cv_.notify_all();
        drain();
        std::unique_lock<std::mutex> lk(m_);
        done_.wait(lk, [&] { return pending_ == 0; });
        if (error_) {
            std::exception_ptr e = error_;
            error_ = nullptr;
            lk.unlock();
            std::rethrow_exception(e);
        }
    }

private:
    Pool() {
        unsigned n = std::max(1u, std::thread::hardware_concurrency());
        if (const char* e = std::getenv("XWIN_EMU_THREADS")) n = static_cast<unsigned>(std::max(1, std::atoi(e)));
        nthreads_ = std::min(n, 256u);
        limit_.store(nthreads_);
    }
    void start_threads() {
        if (started_) return;
        started_ = true;
        for (unsigned i = 1; i < nthreads_; ++i) std::thread([this, i] { loop(i); }).detach();
    }
    void drain() {
        for (;;) {
            if (failed_.load()) return;
            const uint64_t i = next_.fetch_add(1);
            if (i >= n_) return;
            try {
                fn_(ctx_, i);
            } catch (...) {
                std::lock_guard<std::mutex> lk(err_m_);
                if (!error_) error_ = std::current_exception();
                failed_.store(true);
            }
        }
    }
    void loop(unsigned idx) {
        uint64_t seen = 0;
        std::unique_lock<std::mutex> lk(m_);
        for (;;) {
            cv_.wait(lk, [&] { return gen_ != seen; });
            seen = gen_;
            if (idx > active_) continue;
            lk.unlock();
            drain();
            lk.lock();
            if (--pending_ == 0) done_.notify_one();
        }
    }

    unsigned nthreads_ = 1;
    std::atomic<unsigned> limit_{1};
    bool started_ = false;
    std::mutex dispatch_, m_, err_m_;
    std::condition_variable cv_, done_;
    uint64_t gen_ = 0;
    void (*fn_)(void*, uint64_t) = nullptr;
    void* ctx_ = nullptr;
    uint64_t n_ = 0;
    std::atomic<uint64_t> next_{0};
    std::atomic<bool> failed_{false};
    std::exception_ptr error_;
    unsigned active_ = 0, pending_ = 0;
};

// ---- runtime bookkeeping --------------------------------------------------------------------------------
struct Registry {
    std::mutex m;
    std::map<std::string, unsigned long long> kernels;  // name -> number of executed launches
    std::map<uintptr_t, size_t> device_allocs;          // cudaMalloc'd blocks: base -> size
    std::map<uintptr_t, size_t> host_allocs;            // cudaMallocHost'd (pinned) blocks: base -> size
    unsigned long long pageable_async_h2d = 0;          // cudaMemcpyAsync host-to-device copies from pageable memory
    std::set<CUstream_st*> streams;
    std::set<CUevent_st*> events;
    std::map<const void*, size_t> max_dyn_smem;         // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
    size_t allocated = 0;
    size_t device_memory = 80ull << 30;                 // the device's memory (emu_set_device_memory)
    static Registry& get() {
        static Registry* r = new Registry();
        return *r;
    }
};
inline thread_local cudaError_t tls_last_error = cudaSuccess;
inline cudaError_t set_error(cudaError_t e) {
    if (e != cudaSuccess) tls_last_error = e;
    return e;
}
// Is [a, a+n) inside one cudaMalloc'd block? (Addresses as integers: the host memory may be uninitialised.)
inline bool is_device_range(uintptr_t a, size_t n) {
    Registry& r = Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    auto it = r.device_allocs.upper_bound(a);
    if (it == r.device_allocs.begin()) return false;
    --it;
    return a >= it->first && a + std::max<size_t>(n, 1) <= it->first + it->second;
}
inline bool is_device_ptr(uintptr_t a) { return is_device_range(a, 1); }

inline void launch_grid_item(void* ctx, uint64_t i) {
    run_block(worker(), *static_cast<const Launch*>(ctx), i);
}

inline cudaError_t launch_grid(const Launch& L, const void* fn_addr) {
    if (tls_worker && ld(tls_worker->cur)) fatal("kernel launch from device code (dynamic parallelism) is not supported");
    const dim3 g = L.grid, b = L.block;
    if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 ||
        static_cast<uint64_t>(b.x) * b.y * b.z > kMaxThreadsPerBlock || g.x == 0 || g.y == 0 || g.z == 0 ||
        g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
        return set_error(cudaErrorInvalidConfiguration);
    size_t smem_limit = kDefaultDynSmem;
    {
        Registry& r = Registry::get();
        std::lock_guard<std::mutex> lk(r.m);
        auto it = r.max_dyn_smem.find(fn_addr);
        if (it != r.max_dyn_smem.end()) smem_limit = it->second;
        if (L.shmem <= smem_limit) ++r.kernels[L.name];
    }
    if (L.shmem > smem_limit) return set_error(cudaErrorInvalidValue);
    const uint64_t nblocks = static_cast<uint64_t>(g.x) * g.y * g.z;
    Pool& pool = Pool::get();
    if (pool.limit() > 1 && nblocks > 1 && nblocks * L.nthreads >= 16384) {  // waking the pool costs ~40 us
        pool.run(nblocks, &launch_grid_item, const_cast<Launch*>(&L));
    } else {
        Worker& w = worker();
        for (uint64_t i = 0; i < nblocks; ++i) run_block(w, L, i);
    }
    return cudaSuccess;
}

template <class... P>
struct KernelCall {
    void (*fn)(P...);
    std::tuple<std::decay_t<P>...> args;
    static void invoke(const void* self) {
        const KernelCall* k = static_cast<const KernelCall*>(self);
        std::apply(k->fn, k->args);  // every CUDA thread gets its own copy of the parameters
    }
};

}  // namespace detail

// LAUNCH(kernel, grid, block, shmem, stream, args...) expands to this. Streams are synchronous: the grid
// has completed when this returns. A bad configuration is reported through cudaGetLastError().
template <class... P, class... A>
inline void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t shmem, cudaStream_t stream,
                   A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "LAUNCH: number of arguments does not match the kernel's parameters");
    (void)stream;
    detail::KernelCall<P...> call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    detail::Launch L{name, &detail::KernelCall<P...>::invoke, &call, grid, block, shmem, block.x * block.y * block.z};
    detail::launch_grid(L, reinterpret_cast<const void*>(kernel));
}

// While alive, emulation errors (barrier divergence, bad warp collectives) throw emu::EmuError out of the
// LAUNCH instead of aborting the process.
class ScopedThrowOnError {
public:
    ScopedThrowOnError() { detail::throw_mode().fetch_add(1); }
    ~ScopedThrowOnError() { detail::throw_mode().fetch_sub(1); }
    ScopedThrowOnError(const ScopedThrowOnError&) = delete;
    ScopedThrowOnError& operator=(const ScopedThrowOnError&) = delete;
};

// Number of OS threads that run blocks (1 = deterministic order, e.g. for float atomics).
inline void set_parallelism(unsigned n) { detail::Pool::get().set_limit(n); }
inline unsigned parallelism() { return detail::Pool::get().limit(); }
// Context switches into fibers performed on the calling OS thread so far.
inline unsigned long long fiber_switches() { return detail::ld(detail::worker().switches); }

}  // namespace emu

// Names (as written in LAUNCH) of the __global__ kernels executed so far, and their launch counts.
inline std::set<std::string> emu_executed_kernels() {
    auto& r = emu::detail::Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    std::set<std::string> s;
    for (auto& kv : r.kernels) s.insert(kv.first);
    return s;
}
inline std::map<std::string, unsigned long long> emu_kernel_launch_counts() {
    auto& r = emu::detail::Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    return r.kernels;
}
// cudaMemcpyAsync host-to-device copies from pageable (not cudaMallocHost'd) memory so far
inline unsigned long long emu_pageable_async_h2d() {
    auto& r = emu::detail::Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    return r.pageable_async_h2d;
}
inline void emu_reset_executed_kernels() {
    auto& r = emu::detail::Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    r.kernels.clear();
}

// ---------------------------------------------------------------------------------------------------------
// Device built-ins
// ---------------------------------------------------------------------------------------------------------
#define threadIdx (::emu::detail::cur_threadIdx())
#define blockIdx (::emu::detail::cur_blockIdx())
#define blockDim (::emu::detail::cur_blockDim())
#define gridDim (::emu::detail::cur_gridDim())
// warpSize: a variable, not a macro, so that cudaDeviceProp::warpSize keeps working. Unlike CUDA's it is a
// constant expression here (nvcc rejects e.g. `float a[warpSize]`).
inline const int warpSize = 32;

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    emu::detail::block_barrier(0, file, line);
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return static_cast<int>(emu::detail::block_barrier(pred != 0, file, line));
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return emu::detail::block_barrier(pred != 0, file, line) == emu::detail::ld(emu::detail::tls_worker->n);
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return emu::detail::block_barrier(pred != 0, file, line) != 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::detail::Thr* t = emu::detail::current_thread("__syncwarp()");
    emu::detail::warp_exchange(*emu::detail::tls_worker, t, emu::detail::OP_SYNCWARP, mask, 0, 0);
}
inline unsigned __activemask() { return emu::detail::active_mask(); }
inline unsigned __lanemask_lt() { return (1u << (emu::detail::current_thread("__lanemask_lt()")->lane)) - 1u; }

template <class T> inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
    return emu::detail::shfl(emu::detail::OP_SHFL_IDX, mask, var, srcLane, width);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = 32) {
    return emu::detail::shfl(emu::detail::OP_SHFL_UP, mask, var, static_cast<int>(delta), width);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = 32) {
    return emu::detail::shfl(emu::detail::OP_SHFL_DOWN, mask, var, static_cast<int>(delta), width);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
    return emu::detail::shfl(emu::detail::OP_SHFL_XOR, mask, var, laneMask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return static_cast<unsigned>(emu::detail::warp_reduce(emu::detail::OP_BALLOT, mask, pred != 0,
        [](uint64_t acc, uint64_t v, unsigned lane) { return acc | (v << lane); }));
}
inline int __any_sync(unsigned mask, int pred) {
    return static_cast<int>(emu::detail::warp_reduce(emu::detail::OP_ANY, mask, pred != 0,
        [](uint64_t acc, uint64_t v, unsigned) { return acc | v; }));
}
inline int __all_sync(unsigned mask, int pred) {
    return static_cast<int>(emu::detail::warp_reduce(emu::detail::OP_ALL, mask, pred != 0,
        [](uint64_t acc, uint64_t v, unsigned) { return acc & v; }));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
    return static_cast<unsigned>(emu::detail::warp_reduce(emu::detail::OP_REDUCE_ADD, mask, v,
        [](uint64_t acc, uint64_t x, unsigned) { return static_cast<uint64_t>(static_cast<unsigned>(acc + x)); }));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
    return static_cast<unsigned>(emu::detail::warp_reduce(emu::detail::OP_REDUCE_MAX, mask, v,
        [](uint64_t acc, uint64_t x, unsigned) { return std::max(acc, x); }));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
    return static_cast<unsigned>(emu::detail::warp_reduce(emu::detail::OP_REDUCE_MIN, mask, v,
        [](uint64_t acc, uint64_t x, unsigned) { return std::min(acc, x); }));
}

// ---------------------------------------------------------------------------------------------------------
// Warp matrix operations (nvcuda::wmma, <mma.h>): the m16n16k16 shape with __nv_bfloat16 or __half inputs
// and float accumulators, row- and column-major. A fragment belongs to one lane, as on the GPU, and CUDA
// leaves open which elements of the 16 x 16 tile a lane holds; here lane l holds
//   accumulator: the 8 elements (r, c) = (l / 16 + 2 j, l % 16), j = 0..7           (x[j])
//   matrix_a:    the 8 rows l / 16 + 2 j of A, all 16 columns each                  (x[16 j + k])
//   matrix_b:    column l % 16 of B, all 16 rows                                    (x[k])
// so mma_sync needs nothing from other lanes: D(r, c) = C(r, c) + sum over k of A(r, k) B(k, c), the
// products and the sum in float, k in order. store_matrix_sync writes only the lane's 8 elements, so a lane
// that reads what other lanes stored without a __syncwarp() in between reads memory they have not written yet
// (the lanes of a warp run one after the other up to their next barrier), as on the GPU where the order is
// undefined. Each call checks what CUDA requires: a full warp (blockDim a multiple of 32), a 256-bit
// aligned pointer, ldm a multiple of 16 bytes. Element-wise loops over x[0..num_elements) work as on the GPU.
// ---------------------------------------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
    static_assert(M == 16 && N == 16 && K == 16, "cuda_emu: only the m16n16k16 wmma shape is emulated");
    static_assert(std::is_same<Use, accumulator>::value ? std::is_same<T, float>::value && std::is_same<Layout, void>::value
                                                        : (std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value) &&
                                                              (std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value),
                  "cuda_emu: emulated wmma fragments: matrix_a/matrix_b of __nv_bfloat16 or __half with row_major or col_major, "
                  "accumulator of float");

public:
    static constexpr int num_elements = std::is_same<Use, matrix_a>::value ? 128 : std::is_same<Use, matrix_b>::value ? 16 : 8;
    T x[num_elements];
};

namespace detail {
// The calling lane, after the checks every wmma call makes.
inline unsigned checked_lane(const char* what, const void* p, unsigned ldm, size_t elem_bytes) {
    ::emu::detail::Worker& w = *::emu::detail::tls_worker;
    ::emu::detail::Thr* t = ::emu::detail::current_thread(what);
    if (w.warps[t->warp].nlanes != 32)
        ::emu::detail::thread_fail(w, t, std::string(what) + " called in a partial warp: warp " + std::to_string(t->warp) +
                                             " has only " + std::to_string(w.warps[t->warp].nlanes) + " lanes");
    if (p) {
        if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
            ::emu::detail::thread_fail(w, t, std::string(what) + ": the pointer must be 256-bit (32-byte) aligned");
        if (ldm * elem_bytes % 16 != 0 || ldm < 16)
            ::emu::detail::thread_fail(w, t, std::string(what) + ": ldm " + std::to_string(ldm) +
                                                 " must be at least 16 and a multiple of 16 bytes");
    }
    return t->lane;
}
inline size_t at(bool row_major_layout, int r, int c, unsigned ldm) {
    return row_major_layout ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r;
}
}  // namespace detail

template <class Use, class T, class Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& v) {
    detail::checked_lane("fill_fragment()", nullptr, 0, 0);
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

template <class T, class Layout>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    const unsigned lane = detail::checked_lane("load_matrix_sync()", p, ldm, sizeof(T));
    const bool rm = std::is_same<Layout, row_major>::value;
    for (int j = 0; j < 8; ++j)
        for (int k = 0; k < 16; ++k) f.x[16 * j + k] = p[detail::at(rm, static_cast<int>(lane / 16) + 2 * j, k, ldm)];
}

template <class T, class Layout>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    const unsigned lane = detail::checked_lane("load_matrix_sync()", p, ldm, sizeof(T));
    const bool rm = std::is_same<Layout, row_major>::value;
    for (int k = 0; k < 16; ++k) f.x[k] = p[detail::at(rm, k, static_cast<int>(lane % 16), ldm)];
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t layout) {
    const unsigned lane = detail::checked_lane("load_matrix_sync()", p, ldm, sizeof(float));
    for (int j = 0; j < 8; ++j)
        f.x[j] = p[detail::at(layout == mem_row_major, static_cast<int>(lane / 16) + 2 * j, static_cast<int>(lane % 16), ldm)];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout) {
    const unsigned lane = detail::checked_lane("store_matrix_sync()", p, ldm, sizeof(float));
    for (int j = 0; j < 8; ++j)
        p[detail::at(layout == mem_row_major, static_cast<int>(lane / 16) + 2 * j, static_cast<int>(lane % 16), ldm)] = f.x[j];
}

template <class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c,
                     bool satf = false) {
    detail::checked_lane("mma_sync()", nullptr, 0, 0);
    if (satf) ::emu::detail::fatal("mma_sync(): satf is not emulated");
    float bk[16];
    for (int k = 0; k < 16; ++k) bk[k] = static_cast<float>(b.x[k]);
    for (int j = 0; j < 8; ++j) {  // d may be c: each element is read before it is written
        float sum = c.x[j];
        for (int k = 0; k < 16; ++k) sum += static_cast<float>(a.x[16 * j + k]) * bk[k];
        d.x[j] = sum;
    }
}
}  // namespace wmma
}  // namespace nvcuda

inline void __threadfence_block() { __asm__ volatile("" ::: "memory"); }
inline void __threadfence() {
#if XWIN_EMU_TSAN
    __asm__ volatile("" ::: "memory");  // TSan does not model fences
#else
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}
inline void __nanosleep(unsigned) {}
inline long long clock64() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------------------------------------------------
// Atomics: real (host) atomic read-modify-writes, since blocks run on several OS threads. They return the
// old value, relaxed ordering like CUDA's.
// ---------------------------------------------------------------------------------------------------------
namespace emu {
namespace detail {
template <class T, class F>
inline T atomic_update(T* addr, F f) {
    static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "unsupported atomic size");
    using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
    U* p = reinterpret_cast<U*>(addr);
    U old_bits = __atomic_load_n(p, __ATOMIC_RELAXED);
    for (;;) {
        T old_val;
        std::memcpy(&old_val, &old_bits, sizeof(T));
        T new_val = f(old_val);
        U new_bits;
        std::memcpy(&new_bits, &new_val, sizeof(T));
        if (__atomic_compare_exchange_n(p, &old_bits, new_bits, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old_val;
    }
}
}  // namespace detail
}  // namespace emu
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline float atomicAdd(float* a, float v) { return emu::detail::atomic_update(a, [v](float o) { return o + v; }); }
inline double atomicAdd(double* a, double v) { return emu::detail::atomic_update(a, [v](double o) { return o + v; }); }
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* a, __nv_bfloat16 v) {
    return emu::detail::atomic_update(a, [v](__nv_bfloat16 o) { return o + v; });
}
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline unsigned int atomicSub(unsigned int* a, unsigned int v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline unsigned int atomicExch(unsigned int* a, unsigned int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicExch(unsigned long long* a, unsigned long long v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline float atomicExch(float* a, float v) { return emu::detail::atomic_update(a, [v](float) { return v; }); }
inline int atomicMax(int* a, int v) { return emu::detail::atomic_update(a, [v](int o) { return o > v ? o : v; }); }
inline unsigned int atomicMax(unsigned int* a, unsigned int v) { return emu::detail::atomic_update(a, [v](unsigned o) { return o > v ? o : v; }); }
inline unsigned long long atomicMax(unsigned long long* a, unsigned long long v) {
    return emu::detail::atomic_update(a, [v](unsigned long long o) { return o > v ? o : v; });
}
inline int atomicMin(int* a, int v) { return emu::detail::atomic_update(a, [v](int o) { return o < v ? o : v; }); }
inline unsigned int atomicMin(unsigned int* a, unsigned int v) { return emu::detail::atomic_update(a, [v](unsigned o) { return o < v ? o : v; }); }
inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) {
    return emu::detail::atomic_update(a, [v](unsigned long long o) { return o < v ? o : v; });
}
inline int atomicAnd(int* a, int v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }
inline unsigned int atomicAnd(unsigned int* a, unsigned int v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }
inline int atomicOr(int* a, int v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }
inline unsigned int atomicOr(unsigned int* a, unsigned int v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }
inline int atomicXor(int* a, int v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }
inline unsigned int atomicXor(unsigned int* a, unsigned int v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }
template <class T>
inline T atomic_cas_impl(T* a, T compare, T val) {
    __atomic_compare_exchange_n(a, &compare, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;  // the old value either way
}
inline int atomicCAS(int* a, int c, int v) { return atomic_cas_impl(a, c, v); }
inline unsigned int atomicCAS(unsigned int* a, unsigned int c, unsigned int v) { return atomic_cas_impl(a, c, v); }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c, unsigned long long v) { return atomic_cas_impl(a, c, v); }
inline unsigned short atomicCAS(unsigned short* a, unsigned short c, unsigned short v) { return atomic_cas_impl(a, c, v); }
inline unsigned int atomicInc(unsigned int* a, unsigned int v) {
    return emu::detail::atomic_update(a, [v](unsigned o) { return o >= v ? 0u : o + 1u; });
}

// ---------------------------------------------------------------------------------------------------------
// Runtime API (host). Everything is synchronous; "device" memory is host heap memory.
// ---------------------------------------------------------------------------------------------------------
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
enum cudaFuncAttribute {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
    cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrWarpSize = 10,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaEventBlockingSync 0x01
#define cudaEventDisableTiming 0x02
#define cudaMemAttachGlobal 0x01
#define cudaHostAllocDefault 0x00

struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    int regsPerBlock;
    int warpSize;
    size_t memPitch;
    int maxThreadsPerBlock;
    int maxThreadsDim[3];
    int maxGridSize[3];
    int clockRate;
    size_t totalConstMem;
    int major;
    int minor;
    int multiProcessorCount;
    int maxThreadsPerMultiProcessor;
    size_t sharedMemPerMultiprocessor;
    size_t sharedMemPerBlockOptin;
    int regsPerMultiprocessor;
    int l2CacheSize;
    int memoryClockRate;
    int memoryBusWidth;
    int maxBlocksPerMultiProcessor;
    int concurrentKernels;
    int unifiedAddressing;
    int managedMemory;
};

inline const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidSymbol: return "cudaErrorInvalidSymbol";
        case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
        case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
        case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
        case cudaErrorNoDevice: return "cudaErrorNoDevice";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
        case cudaErrorNotReady: return "cudaErrorNotReady";
        case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    }
    return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidSymbol: return "invalid device symbol";
        case cudaErrorInvalidDevicePointer: return "invalid device pointer";
        case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
        case cudaErrorInvalidDeviceFunction: return "invalid device function";
        case cudaErrorNoDevice: return "no CUDA-capable device is detected";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorInvalidResourceHandle: return "invalid resource handle";
        case cudaErrorNotReady: return "device not ready";
        case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
        case cudaErrorLaunchFailure: return "unspecified launch failure";
    }
    return "unknown error";
}
inline cudaError_t cudaGetLastError() {
    cudaError_t e = emu::detail::tls_last_error;
    emu::detail::tls_last_error = cudaSuccess;
    return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::detail::tls_last_error; }

// Device memory: exact-size, 256-byte aligned heap blocks (so ASan sees every overflow), filled with 0xFF
// bytes (NaN as float/bf16, -1 as int) because cudaMalloc does not initialise memory either.
inline cudaError_t cudaMalloc(void** p, size_t size) {
    if (!p) return emu::detail::set_error(cudaErrorInvalidValue);
    *p = nullptr;
    if (size == 0) return cudaSuccess;
    void* q = nullptr;
    auto& r = emu::detail::Registry::get();
    {
        std::lock_guard<std::mutex> lk(r.m);
        if (size > r.device_memory || r.allocated > r.device_memory - size) return emu::detail::set_error(cudaErrorMemoryAllocation);
    }
    if (posix_memalign(&q, 256, size) != 0) return emu::detail::set_error(cudaErrorMemoryAllocation);
    std::memset(q, 0xff, size);
    std::lock_guard<std::mutex> lk(r.m);
    r.device_allocs[reinterpret_cast<uintptr_t>(q)] = size;
    r.allocated += size;
    *p = q;
    return cudaSuccess;
}
template <class T> inline cudaError_t cudaMalloc(T** p, size_t size) { return cudaMalloc(reinterpret_cast<void**>(p), size); }
inline cudaError_t cudaMallocManaged(void** p, size_t size, unsigned = cudaMemAttachGlobal) { return cudaMalloc(p, size); }
template <class T> inline cudaError_t cudaMallocManaged(T** p, size_t size, unsigned f = cudaMemAttachGlobal) {
    return cudaMallocManaged(reinterpret_cast<void**>(p), size, f);
}
inline cudaError_t cudaMallocAsync(void** p, size_t size, cudaStream_t) { return cudaMalloc(p, size); }
template <class T> inline cudaError_t cudaMallocAsync(T** p, size_t size, cudaStream_t s) {
    return cudaMallocAsync(reinterpret_cast<void**>(p), size, s);
}
inline cudaError_t cudaFree(void* p) {
    if (!p) return cudaSuccess;
    auto& r = emu::detail::Registry::get();
    {
        std::lock_guard<std::mutex> lk(r.m);
        auto it = r.device_allocs.find(reinterpret_cast<uintptr_t>(p));
        if (it == r.device_allocs.end()) return emu::detail::set_error(cudaErrorInvalidValue);
        r.allocated -= it->second;
        r.device_allocs.erase(it);
    }
    std::free(p);
    return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaMallocHost(void** p, size_t size) {
    if (!p) return emu::detail::set_error(cudaErrorInvalidValue);
    *p = nullptr;
    if (size == 0) return cudaSuccess;
    void* q = nullptr;
    if (posix_memalign(&q, 256, size) != 0) return emu::detail::set_error(cudaErrorMemoryAllocation);
    auto& r = emu::detail::Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    r.host_allocs[reinterpret_cast<uintptr_t>(q)] = size;
    *p = q;
    return cudaSuccess;
}
template <class T> inline cudaError_t cudaMallocHost(T** p, size_t size) { return cudaMallocHost(reinterpret_cast<void**>(p), size); }
inline cudaError_t cudaHostAlloc(void** p, size_t size, unsigned) { return cudaMallocHost(p, size); }
inline cudaError_t cudaFreeHost(void* p) {
    if (!p) return cudaSuccess;
    auto& r = emu::detail::Registry::get();
    {
        std::lock_guard<std::mutex> lk(r.m);
        if (!r.host_allocs.erase(reinterpret_cast<uintptr_t>(p))) return emu::detail::set_error(cudaErrorInvalidValue);
    }
    std::free(p);
    return cudaSuccess;
}

// The direction must match the pointers (undefined behaviour in CUDA): device ranges must lie inside one
// cudaMalloc'd block and host pointers must not be device pointers. cudaMemcpyDefault accepts anything.
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
    using emu::detail::is_device_ptr;
    using emu::detail::is_device_range;
    if (count == 0) return cudaSuccess;
    if (!dst || !src) return emu::detail::set_error(cudaErrorInvalidValue);
    const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
    bool ok = true;
    switch (kind) {
        case cudaMemcpyHostToHost: ok = !is_device_ptr(d) && !is_device_ptr(s); break;
        case cudaMemcpyHostToDevice: ok = is_device_range(d, count) && !is_device_ptr(s); break;
        case cudaMemcpyDeviceToHost: ok = !is_device_ptr(d) && is_device_range(s, count); break;
        case cudaMemcpyDeviceToDevice: ok = is_device_range(d, count) && is_device_range(s, count); break;
        case cudaMemcpyDefault: break;
        default: return emu::detail::set_error(cudaErrorInvalidMemcpyDirection);
    }
    if (!ok) return emu::detail::set_error(cudaErrorInvalidValue);
    std::memmove(dst, src, count);
    return cudaSuccess;
}
// An asynchronous host-to-device copy is asynchronous on a GPU only from pinned memory: from pageable
// memory the driver stages it synchronously. The emulation counts those (emu_pageable_async_h2d), so
// that a test can hold a step's uploads to pinned staging buffers.
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind, cudaStream_t = nullptr) {
    if (kind == cudaMemcpyHostToDevice && count > 0) {
        auto& r = emu::detail::Registry::get();
        std::lock_guard<std::mutex> lk(r.m);
        uintptr_t s = reinterpret_cast<uintptr_t>(src);
        auto it = r.host_allocs.upper_bound(s);
        bool pinned = it != r.host_allocs.begin() && (--it, s + count <= it->first + it->second);
        r.pageable_async_h2d += !pinned;
    }
    return cudaMemcpy(dst, src, count, kind);
}
inline cudaError_t cudaMemset(void* p, int value, size_t count) {
    if (count == 0) return cudaSuccess;
    if (!emu::detail::is_device_range(reinterpret_cast<uintptr_t>(p), count)) return emu::detail::set_error(cudaErrorInvalidValue);
    std::memset(p, value, count);
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t = nullptr) { return cudaMemset(p, value, count); }
template <class T>
inline cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t count, size_t offset = 0,
                                      cudaMemcpyKind = cudaMemcpyHostToDevice) {
    if (offset + count > sizeof(T)) return emu::detail::set_error(cudaErrorInvalidValue);
    std::memcpy(reinterpret_cast<char*>(&symbol) + offset, src, count);
    return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMemcpyFromSymbol(void* dst, const T& symbol, size_t count, size_t offset = 0,
                                        cudaMemcpyKind = cudaMemcpyDeviceToHost) {
    if (offset + count > sizeof(T)) return emu::detail::set_error(cudaErrorInvalidValue);
    std::memcpy(dst, reinterpret_cast<const char*>(&symbol) + offset, count);
    return cudaSuccess;
}
inline cudaError_t cudaMemPrefetchAsync(const void*, size_t, int, cudaStream_t = nullptr) { return cudaSuccess; }
// The emulated device has 80 GiB unless a test sets another size (to see a program refuse a plan
// that does not fit): cudaMemGetInfo reports it less what is allocated, and cudaMalloc fails beyond it.
inline void emu_set_device_memory(size_t bytes) {
    auto& r = emu::detail::Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    r.device_memory = bytes;
}
inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
    auto& r = emu::detail::Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    const size_t total = r.device_memory;
    if (free_bytes) *free_bytes = total > r.allocated ? total - r.allocated : 0;
    if (total_bytes) *total_bytes = total;
    return cudaSuccess;
}

// Streams and events: execution is synchronous, so they only keep handles and timestamps.
inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
    if (!s) return emu::detail::set_error(cudaErrorInvalidValue);
    *s = new CUstream_st{1};
    auto& r = emu::detail::Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    r.streams.insert(*s);
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { return cudaStreamCreate(s); }
inline bool emu_valid_stream(cudaStream_t s) {
    if (!s) return true;
    auto& r = emu::detail::Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    return r.streams.count(s) != 0;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
    auto& r = emu::detail::Registry::get();
    {
        std::lock_guard<std::mutex> lk(r.m);
        if (!s || !r.streams.erase(s)) return emu::detail::set_error(cudaErrorInvalidResourceHandle);
    }
    delete s;
    return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    return emu_valid_stream(s) ? cudaSuccess : emu::detail::set_error(cudaErrorInvalidResourceHandle);
}
inline cudaError_t cudaStreamQuery(cudaStream_t s) { return cudaStreamSynchronize(s); }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t, unsigned = 0) { return cudaStreamSynchronize(s); }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
    if (!e) return emu::detail::set_error(cudaErrorInvalidValue);
    *e = new CUevent_st{0.0, false, flags};
    auto& r = emu::detail::Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    r.events.insert(*e);
    return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
inline bool emu_valid_event(cudaEvent_t e) {
    auto& r = emu::detail::Registry::get();
    std::lock_guard<std::mutex> lk(r.m);
    return e && r.events.count(e) != 0;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr) {
    if (!emu_valid_event(e) || !emu_valid_stream(s)) return emu::detail::set_error(cudaErrorInvalidResourceHandle);
    e->t_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
    e->recorded = true;
    return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    return emu_valid_event(e) ? cudaSuccess : emu::detail::set_error(cudaErrorInvalidResourceHandle);
}
inline cudaError_t cudaEventQuery(cudaEvent_t e) { return cudaEventSynchronize(e); }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    if (!ms) return emu::detail::set_error(cudaErrorInvalidValue);
    if (!emu_valid_event(start) || !emu_valid_event(end) || (start->flags & cudaEventDisableTiming) ||
        (end->flags & cudaEventDisableTiming))
        return emu::detail::set_error(cudaErrorInvalidResourceHandle);
    if (!start->recorded || !end->recorded) return emu::detail::set_error(cudaErrorInvalidResourceHandle);
    *ms = static_cast<float>(end->t_ms - start->t_ms);
    return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
    auto& r = emu::detail::Registry::get();
    {
        std::lock_guard<std::mutex> lk(r.m);
        if (!e || !r.events.erase(e)) return emu::detail::set_error(cudaErrorInvalidResourceHandle);
    }
    delete e;
    return cudaSuccess;
}

// One fake device, H100-like; XWIN_EMU_DEVICES=n shows n of them (for data-parallel ranks, each
// a process that takes the device of its rank on the node), all the same host memory.
inline int emu_device_count() {
    const char* v = std::getenv("XWIN_EMU_DEVICES");
    return v && std::atoi(v) > 0 ? std::atoi(v) : 1;
}
inline int& emu_current_device() {
    static int device = 0;
    return device;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
    if (!n) return emu::detail::set_error(cudaErrorInvalidValue);
    *n = emu_device_count();
    return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
    if (!d) return emu::detail::set_error(cudaErrorInvalidValue);
    *d = emu_current_device();
    return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
    if (d < 0 || d >= emu_device_count()) return emu::detail::set_error(cudaErrorInvalidDevice);
    emu_current_device() = d;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaDeviceReset() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
    if (!p) return emu::detail::set_error(cudaErrorInvalidValue);
    if (d < 0 || d >= emu_device_count()) return emu::detail::set_error(cudaErrorInvalidDevice);
    std::memset(p, 0, sizeof(*p));
    std::snprintf(p->name, sizeof(p->name), "%s", "xwin CPU emulation (H100-like)");
    p->totalGlobalMem = 80ull << 30;
    p->sharedMemPerBlock = emu::detail::kDefaultDynSmem;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->memPitch = 2147483647;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024; p->maxThreadsDim[1] = 1024; p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647; p->maxGridSize[1] = 65535; p->maxGridSize[2] = 65535;
    p->clockRate = 1980000;
    p->totalConstMem = 65536;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 132;
    p->maxThreadsPerMultiProcessor = 2048;
    p->sharedMemPerMultiprocessor = 233472;
    p->sharedMemPerBlockOptin = emu::detail::kMaxDynSmemOptin;
    p->regsPerMultiprocessor = 65536;
    p->l2CacheSize = 50 * 1024 * 1024;
    p->memoryClockRate = 2619000;
    p->memoryBusWidth = 5120;
    p->maxBlocksPerMultiProcessor = 32;
    p->concurrentKernels = 1;
    p->unifiedAddressing = 1;
    p->managedMemory = 1;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int d) {
    if (!v) return emu::detail::set_error(cudaErrorInvalidValue);
    if (d != 0) return emu::detail::set_error(cudaErrorInvalidDevice);
    switch (attr) {
        case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
        case cudaDevAttrMaxSharedMemoryPerBlock: *v = static_cast<int>(emu::detail::kDefaultDynSmem); break;
        case cudaDevAttrWarpSize: *v = 32; break;
        case cudaDevAttrMultiProcessorCount: *v = 132; break;
        case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
        case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = static_cast<int>(emu::detail::kMaxDynSmemOptin); break;
        default: return emu::detail::set_error(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}
// Raising the dynamic shared memory limit of one kernel (up to the H100 opt-in maximum).
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
    if (!func) return emu::detail::set_error(cudaErrorInvalidDeviceFunction);
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || static_cast<size_t>(value) > emu::detail::kMaxDynSmemOptin)
            return emu::detail::set_error(cudaErrorInvalidValue);
        auto& r = emu::detail::Registry::get();
        std::lock_guard<std::mutex> lk(r.m);
        r.max_dyn_smem[reinterpret_cast<const void*>(func)] = static_cast<size_t>(value);
        return cudaSuccess;
    }
    if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
    return emu::detail::set_error(cudaErrorInvalidValue);
}

// ---------------------------------------------------------------------------------------------------------
// cuBLAS (column-major GEMMs computed on the CPU with fp32 accumulation)
// ---------------------------------------------------------------------------------------------------------
enum cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2, CUBLAS_OP_HERMITAN = 2, CUBLAS_OP_CONJG = 3 };
enum cublasMath_t {
    CUBLAS_DEFAULT_MATH = 0,
    CUBLAS_TENSOR_OP_MATH = 1,
    CUBLAS_PEDANTIC_MATH = 2,
    CUBLAS_TF32_TENSOR_OP_MATH = 3,
    CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16,
};
enum cublasPointerMode_t { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 };
enum cublasComputeType_t {
    CUBLAS_COMPUTE_16F = 64,
    CUBLAS_COMPUTE_16F_PEDANTIC = 65,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_64F = 70,
    CUBLAS_COMPUTE_64F_PEDANTIC = 71,
    CUBLAS_COMPUTE_32I = 72,
    CUBLAS_COMPUTE_32I_PEDANTIC = 73,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
};
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1, CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16F = 2, CUDA_R_8I = 3, CUDA_R_16BF = 14 };
typedef cudaDataType_t cudaDataType;
struct cublasContext {
    cudaStream_t stream;
    cublasMath_t math;
    cublasPointerMode_t pointer_mode;
};
typedef cublasContext* cublasHandle_t;

inline cublasStatus_t cublasCreate(cublasHandle_t* h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    *h = new cublasContext{nullptr, CUBLAS_DEFAULT_MATH, CUBLAS_POINTER_MODE_HOST};
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t* s) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!s) return CUBLAS_STATUS_INVALID_VALUE;
    *s = h->stream;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->math = m;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t m) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->pointer_mode = m;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void*, size_t) {
    return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

namespace emu {
namespace detail {
struct Gemm {
    int m, n, k;
    bool ta, tb;
    const void* A; cudaDataType_t at; long long lda, sA;
    const void* B; cudaDataType_t bt; long long ldb, sB;
    void* C; cudaDataType_t ct; long long ldc, sC;
    float alpha, beta;
    int batch;
};
inline float load_elem(const void* p, cudaDataType_t t, long long i) {
    if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
    if (t == CUDA_R_16BF) return bf2f(static_cast<const unsigned short*>(p)[i]);
    return h2f(static_cast<const unsigned short*>(p)[i]);
}
inline float load_c(const Gemm& g, int b, int i, int j) { return load_elem(g.C, g.ct, b * g.sC + i + static_cast<long long>(j) * g.ldc); }
inline void store_c(const Gemm& g, int b, int i, int j, float v) {
    const long long idx = b * g.sC + i + static_cast<long long>(j) * g.ldc;
    if (g.ct == CUDA_R_32F) static_cast<float*>(g.C)[idx] = v;
    else if (g.ct == CUDA_R_16BF) static_cast<unsigned short*>(g.C)[idx] = f2bf_rn(v);
    else static_cast<unsigned short*>(g.C)[idx] = f2h_rn(v);
}
// op(A) as a row-major m x k float matrix: Ap[i*k + l] = op(A)(i, l).
inline void pack_a(const Gemm& g, int b, float* Ap) {
    const long long base = b * g.sA;
    for (int i = 0; i < g.m; ++i)
        for (int l = 0; l < g.k; ++l)
            Ap[static_cast<size_t>(i) * g.k + l] =
                load_elem(g.A, g.at, base + (g.ta ? l + static_cast<long long>(i) * g.lda : i + static_cast<long long>(l) * g.lda));
}
// op(B) as a row-major k x npad float matrix (zero padded): Bp[l*npad + j] = op(B)(l, j).
inline void pack_b(const Gemm& g, int b, float* Bp, int npad) {
    const long long base = b * g.sB;
    for (int l = 0; l < g.k; ++l) {
        float* row = Bp + static_cast<size_t>(l) * npad;
        for (int j = 0; j < g.n; ++j)
            row[j] = load_elem(g.B, g.bt, base + (g.tb ? j + static_cast<long long>(l) * g.ldb : l + static_cast<long long>(j) * g.ldb));
        for (int j = g.n; j < npad; ++j) row[j] = 0.0f;
    }
}
// C(i, j) for rows [i0, i1): every element is the sum over l = 0..k-1 in order, in fp32, then
// alpha * sum (+ beta * C, only if beta != 0), rounded once to C's type.
inline void gemm_rows(const Gemm& g, int b, const float* Ap, const float* Bp, int npad, int i0, int i1) {
    typedef float v4f __attribute__((vector_size(16)));
    constexpr int RB = 4, JB = 256;
    for (int i = i0; i < i1; i += RB) {
        const int rows = std::min(RB, i1 - i);
        for (int j0 = 0; j0 < npad; j0 += JB) {
            const int jw = std::min(JB, npad - j0);
            v4f acc[RB][JB / 4];
            std::memset(acc, 0, sizeof(acc));
            for (int l = 0; l < g.k; ++l) {
                float a[RB];
                for (int r = 0; r < RB; ++r) a[r] = r < rows ? Ap[static_cast<size_t>(i + r) * g.k + l] : 0.0f;
                const float* brow = Bp + static_cast<size_t>(l) * npad + j0;
                for (int v = 0; v < jw / 4; ++v) {
                    v4f bv;
                    std::memcpy(&bv, brow + 4 * v, sizeof(bv));
                    for (int r = 0; r < RB; ++r) acc[r][v] += a[r] * bv;
                }
            }
            for (int r = 0; r < rows; ++r) {
                const float* s = reinterpret_cast<const float*>(acc[r]);
                for (int j = 0; j < std::min(jw, g.n - j0); ++j) {
                    float v = g.alpha * s[j];
                    if (g.beta != 0.0f) v += g.beta * load_c(g, b, i + r, j0 + j);
                    store_c(g, b, i + r, j0 + j, v);
                }
            }
        }
    }
}
inline thread_local std::vector<float> tls_pack_a, tls_pack_b;
inline void gemm_batch_item(void* ctx, uint64_t b) {
    const Gemm& g = *static_cast<const Gemm*>(ctx);
    const int npad = (g.n + 3) & ~3;
    tls_pack_a.resize(static_cast<size_t>(g.m) * g.k);
    tls_pack_b.resize(static_cast<size_t>(g.k) * npad);
    pack_a(g, static_cast<int>(b), tls_pack_a.data());
    pack_b(g, static_cast<int>(b), tls_pack_b.data(), npad);
    gemm_rows(g, static_cast<int>(b), tls_pack_a.data(), tls_pack_b.data(), npad, 0, g.m);
}
struct GemmRowsJob { const Gemm* g; int b; const float* Ap; const float* Bp; int npad; int rows_per_item; };
inline void gemm_rows_item(void* ctx, uint64_t item) {
    const GemmRowsJob& j = *static_cast<const GemmRowsJob*>(ctx);
    const int i0 = static_cast<int>(item) * j.rows_per_item;
    gemm_rows(*j.g, j.b, j.Ap, j.Bp, j.npad, i0, std::min(j.g->m, i0 + j.rows_per_item));
}
inline void gemm_compute(const Gemm& g) {
    Pool& pool = Pool::get();
    if (g.alpha == 0.0f || g.k == 0) {  // C = beta * C; A and B are not read
        for (int b = 0; b < g.batch; ++b)
            for (int j = 0; j < g.n; ++j)
                for (int i = 0; i < g.m; ++i) store_c(g, b, i, j, g.beta == 0.0f ? 0.0f : g.beta * load_c(g, b, i, j));
        return;
    }
    const double flops = 2.0 * g.m * g.n * g.k;
    if (flops * g.batch < 2e6) {  // small: not worth waking other threads
        for (int b = 0; b < g.batch; ++b) gemm_batch_item(const_cast<Gemm*>(&g), static_cast<uint64_t>(b));
        return;
    }
    if (g.batch >= static_cast<int>(2 * pool.limit()) || flops < 2e6) {  // parallel over the batch
        pool.run(static_cast<uint64_t>(g.batch), &gemm_batch_item, const_cast<Gemm*>(&g));
        return;
    }
    const int npad = (g.n + 3) & ~3;
    std::vector<float> Ap(static_cast<size_t>(g.m) * g.k), Bp(static_cast<size_t>(g.k) * npad);
    for (int b = 0; b < g.batch; ++b) {
        pack_a(g, b, Ap.data());
        pack_b(g, b, Bp.data(), npad);
        GemmRowsJob job{&g, b, Ap.data(), Bp.data(), npad, 16};
        pool.run(static_cast<uint64_t>((g.m + 15) / 16), &gemm_rows_item, &job);
    }
}
inline bool valid_op(cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }
// Argument checks in the order and with the status codes documented for cublas<t>gemm.
inline cublasStatus_t gemm_dispatch(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                    const float* alpha, const void* A, cudaDataType_t at, int lda, long long sA,
                                    const void* B, cudaDataType_t bt, int ldb, long long sB, const float* beta, void* C,
                                    cudaDataType_t ct, int ldc, long long sC, int batch) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (m < 0 || n < 0 || k < 0 || batch < 0 || !valid_op(ta) || !valid_op(tb)) return CUBLAS_STATUS_INVALID_VALUE;
    if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k)) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldb < std::max(1, tb == CUBLAS_OP_N ? k : n)) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldc < std::max(1, m)) return CUBLAS_STATUS_INVALID_VALUE;
    if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    if (!C) return CUBLAS_STATUS_INVALID_VALUE;
    Gemm g{m, n, k, ta != CUBLAS_OP_N, tb != CUBLAS_OP_N, A, at, lda, sA, B, bt, ldb, sB, C, ct, ldc, sC, *alpha, *beta, batch};
    gemm_compute(g);
    return CUBLAS_STATUS_SUCCESS;
}
// Supported cublasGemmEx type combinations (fp32 compute): A and B of the same type, C = that type or fp32.
inline bool gemm_ex_supported(cudaDataType_t at, cudaDataType_t bt, cudaDataType_t ct, cublasComputeType_t compute) {
    const bool c32 = compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC ||
                     compute == CUBLAS_COMPUTE_32F_FAST_16F || compute == CUBLAS_COMPUTE_32F_FAST_16BF ||
                     compute == CUBLAS_COMPUTE_32F_FAST_TF32;
    if (!c32 || at != bt) return false;
    if (at == CUDA_R_32F) return ct == CUDA_R_32F;
    if (at == CUDA_R_16BF || at == CUDA_R_16F) return ct == at || ct == CUDA_R_32F;
    return false;
}
}  // namespace detail
}  // namespace emu

// C = alpha * op(A) * op(B) + beta * C, column-major: A is m x k (op N, lda >= m) or k x m (op T, lda >= k),
// B is k x n (op N, ldb >= k) or n x k (op T, ldb >= n), C is m x n (ldc >= m). beta == 0: C is not read.
inline cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const float* alpha, const float* A, int lda, const float* B, int ldb,
                                  const float* beta, float* C, int ldc) {
    return emu::detail::gemm_dispatch(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, 0, B, CUDA_R_32F, ldb, 0, beta, C,
                                      CUDA_R_32F, ldc, 0, 1);
}
inline cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                int n, int k, const float* alpha, const float* A, int lda,
                                                long long strideA, const float* B, int ldb, long long strideB,
                                                const float* beta, float* C, int ldc, long long strideC, int batchCount) {
    return emu::detail::gemm_dispatch(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, strideA, B, CUDA_R_32F, ldb, strideB,
                                      beta, C, CUDA_R_32F, ldc, strideC, batchCount);
}
inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* A, cudaDataType_t Atype, int lda, const void* B,
                                   cudaDataType_t Btype, int ldb, const void* beta, void* C, cudaDataType_t Ctype,
                                   int ldc, cublasComputeType_t computeType, cublasGemmAlgo_t) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!emu::detail::gemm_ex_supported(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
    return emu::detail::gemm_dispatch(h, ta, tb, m, n, k, static_cast<const float*>(alpha), A, Atype, lda, 0, B, Btype,
                                      ldb, 0, static_cast<const float*>(beta), C, Ctype, ldc, 0, 1);
}
inline cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                 int n, int k, const void* alpha, const void* A, cudaDataType_t Atype,
                                                 int lda, long long strideA, const void* B, cudaDataType_t Btype,
                                                 int ldb, long long strideB, const void* beta, void* C,
                                                 cudaDataType_t Ctype, int ldc, long long strideC, int batchCount,
                                                 cublasComputeType_t computeType, cublasGemmAlgo_t) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!emu::detail::gemm_ex_supported(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
    return emu::detail::gemm_dispatch(h, ta, tb, m, n, k, static_cast<const float*>(alpha), A, Atype, lda, strideA, B,
                                      Btype, ldb, strideB, static_cast<const float*>(beta), C, Ctype, ldc, strideC,
                                      batchCount);
}
inline const char* cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
        case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
        case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}

// ---------------------------------------------------------------------------------------------------------
// NVTX: ranges are no-ops.
// ---------------------------------------------------------------------------------------------------------
inline int nvtxRangePushA(const char*) { return 0; }
inline int nvtxRangePop() { return 0; }
inline void nvtxMarkA(const char*) {}

#endif  // XWIN_CUDA_EMU_H
