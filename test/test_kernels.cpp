// The CUDA kernels of llm.cu against their CPU twins and the Hugging Face fixtures: in
// make test on the CPU through the emulation layer (test/cuda_emu.h), in make test-gpu on a GPU. Built twice: BF16 (default) and
// FP32 (-DENABLE_FP32). Inputs are random with a fresh seed each run (printed; set
// XWIN_TEST_SEED to repeat one), shapes are not multiples of the block sizes, and every
// output is poisoned with NaN before the kernel runs, so an unwritten element fails.
// The tests of the reductions and of the classic mistakes (eps, theta, the last element or
// block) use fixed data instead (fixed_floats), so they fail on every seed or on none.
// Errors are ||out - ref|| / ||ref||. Tolerances per precision:
//   FP32: 1e-5 — the kernels reduce in another order than the CPU loops (~1e-7 observed).
//   BF16: 1e-2 — outputs are rounded to bfloat16 (8-bit mantissa, relative rounding up to
//         2^-9 = 2e-3 per element, ~1e-3 in the L2 norm), and inputs that are themselves
//         results of a bfloat16 op (e.g. an accumulated gradient) add one more rounding.
#include <catch2/catch.hpp>

#include <fstream>
#include <random>
#include <regex>
#include <set>
#include <sstream>

#include "fixture.h"

#ifdef ENABLE_FP32
static const double TOL = 1e-5;
#else
static const double TOL = 1e-2;
#endif

static unsigned test_seed() {
    static unsigned seed = [] {
        const char* env = getenv("XWIN_TEST_SEED");
        unsigned s = env ? (unsigned)strtoul(env, nullptr, 10) : std::random_device{}();
        printf("kernel tests: seed %u (XWIN_TEST_SEED=%u repeats this run)\n", s, s);
        return s;
    }();
    return seed;
}

static std::vector<float> random_floats(size_t n, std::mt19937& rng, float scale = 1.0f) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    return v;
}

// Fixed data: the same values on every run whatever the seed, uniform in [-scale, scale)
// (24 random bits of a seeded mt19937, which the C++ standard pins down exactly).
static std::vector<float> fixed_floats(size_t n, unsigned seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::vector<float> v(n);
    for (float& x : v) x = scale * (2.0f * (float)(rng() >> 8) / 16777216.0f - 1.0f);
    return v;
}

// the values as floatX holds them, so the CPU twin sees exactly the kernel's inputs
static std::vector<float> rounded(std::vector<float> v) {
    for (float& x : v) x = to_float(from_float<floatX>(x));
    return v;
}

static floatX* upload_x(const std::vector<float>& v) {
    std::vector<floatX> h(v.size());
    for (size_t i = 0; i < v.size(); i++) h[i] = from_float<floatX>(v[i]);
    floatX* d = cuda_alloc<floatX>(v.size());
    cudaCheck(cudaMemcpy(d, h.data(), v.size() * sizeof(floatX), cudaMemcpyHostToDevice));
    return d;
}

template <typename U>
static U* upload(const std::vector<U>& v) {
    U* d = cuda_alloc<U>(v.size());
    cudaCheck(cudaMemcpy(d, v.data(), v.size() * sizeof(U), cudaMemcpyHostToDevice));
    return d;
}

static std::vector<float> download_x(const floatX* d, size_t n) {
    std::vector<floatX> h(n);
    cudaCheck(cudaMemcpy(h.data(), d, n * sizeof(floatX), cudaMemcpyDeviceToHost));
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) v[i] = to_float(h[i]);
    return v;
}

static std::vector<float> download(const float* d, size_t n) {
    std::vector<float> v(n);
    cudaCheck(cudaMemcpy(v.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
    return v;
}

// all-ones bytes are NaN in float32 and in bfloat16
template <typename U>
static void poison(U* d, size_t n) { cudaCheck(cudaMemset(d, 0xff, n * sizeof(U))); }

// Rows of V values laid ld apart, the padding NaN (the GPU model's logits, rows padded_vocab(V)
// apart: a kernel that reads the padding gives NaN), and back; padding_intact: every padding
// entry still NaN (a kernel that writes the padding is caught).
static std::vector<float> pad_rows(const std::vector<float>& v, size_t V, size_t ld) {
    size_t rows = v.size() / V;
    std::vector<float> out(rows * ld, NAN);
    for (size_t r = 0; r < rows; r++) std::copy(v.begin() + r * V, v.begin() + (r + 1) * V, out.begin() + r * ld);
    return out;
}
static std::vector<float> unpad_rows(const std::vector<float>& v, size_t V, size_t ld) {
    size_t rows = v.size() / ld;
    std::vector<float> out(rows * V);
    for (size_t r = 0; r < rows; r++) std::copy(v.begin() + r * ld, v.begin() + r * ld + V, out.begin() + r * V);
    return out;
}
static bool padding_intact(const std::vector<float>& v, size_t V, size_t ld) {
    for (size_t i = 0; i < v.size(); i++) if (i % ld >= V && !std::isnan(v[i])) return false;
    return true;
}

static void check_close(const char* what, const std::vector<float>& out, const std::vector<float>& ref, double tol = TOL) {
    REQUIRE(out.size() == ref.size());
    double err = relative_error(out.data(), ref.data(), out.size());
    printf("  %-24s rel err %.2e (tolerance %.0e)\n", what, err, tol);
    INFO(what << ": relative error " << err << " (tolerance " << tol << ")");
    CHECK(err < tol);  // NaN fails too
}

static cudaStream_t stream = nullptr;

// A strided-batched GEMM against the same GEMMs launched one by one. The emulation computes each
// GEMM of a batch as the separate call computes it: the same bits. cuBLAS promises no such thing
// (it may choose another kernel, tile order or split of the sum for a batch), so on a GPU the two
// agree within the rounding of the result: relative error below 2^-8 (half a bf16 ulp, over the
// whole tensor) in the BF16 build and 1e-6 in FP32 (several float32 ulps of accumulated sums).
static void check_batched_equal(const char* what, const std::vector<float>& batched, const std::vector<float>& separate) {
#ifdef XWIN_CUDA_EMULATION
    INFO(what);
    CHECK(batched == separate);
#else
    check_close(what, batched, separate, sizeof(floatX) == 2 ? 1.0 / 256 : 1e-6);
#endif
}

// The GPU's embedding backward adds each token's positions in the serial CPU loop's order (by
// position) with no atomics, so it gives the CPU twin's bits exactly (dout is rounded to floatX
// first, as the kernel reads it), run after run. Tokens with repeats and pads (pad id 3).
TEST_CASE("embedding kernels match the CPU; the backward is the serial sum's bits", "[kernels]") {
    std::mt19937 rng(test_seed() + 1);
    size_t N = 37, C = 300, V = 11;  // C: two blocks of channels
    const int pad_id = 3;
    std::vector<int> tokens(N);
    for (int& t : tokens) t = (int)(rng() % V);
    tokens[0] = tokens[N - 1] = pad_id;
    std::vector<float> wte = rounded(random_floats(V * C, rng)), dout = rounded(random_floats(N * C, rng));
    std::vector<float> dwte0 = random_floats(V * C, rng), ref(N * C), dref = dwte0;
    embedding_forward(ref.data(), tokens.data(), wte.data(), N, C);
    embedding_backward(dref.data(), dout.data(), tokens.data(), N, C, pad_id);
    std::vector<int> buckets(3 * N + 1);
    int n_buckets = embedding_buckets(buckets.data(), tokens.data(), N, pad_id);
    int* d_tokens = upload(tokens);
    int* d_buckets = upload(buckets);
    floatX *d_wte = upload_x(wte), *d_out = cuda_alloc<floatX>(N * C), *d_dout = upload_x(dout);
    float* d_dwte = upload(dwte0);
    poison(d_out, N * C);
    embedding_forward_cuda(d_out, d_tokens, d_wte, N, C, stream);
    embedding_backward_cuda(d_dwte, d_dout, d_buckets, n_buckets, N, C, stream);
    check_close("embedding forward", download_x(d_out, N * C), ref, 1e-7);  // a copy: exact
    std::vector<float> first = download(d_dwte, V * C);
    check_close("embedding backward", first, dref, 1e-7);
    CHECK(first == dref);  // the same additions in the same order
    cudaCheck(cudaMemcpy(d_dwte, dwte0.data(), V * C * sizeof(float), cudaMemcpyHostToDevice));
    embedding_backward_cuda(d_dwte, d_dout, d_buckets, n_buckets, N, C, stream);
    CHECK(download(d_dwte, V * C) == first);
    void* bufs[] = {d_tokens, d_buckets, d_wte, d_out, d_dout, d_dwte};
    for (void* p : bufs) cudaCheck(cudaFree(p));
}

// embedding_buckets on a hand-worked example: tokens 5 2 5 7 2 5 with pad id 7
TEST_CASE("embedding_buckets sorts the positions by token, then position, without the pads", "[kernels]") {
    std::vector<int> tokens = {5, 2, 5, 7, 2, 5}, buckets(3 * 6 + 1, -9);
    REQUIRE(embedding_buckets(buckets.data(), tokens.data(), 6, 7) == 2);
    CHECK(std::vector<int>(buckets.begin(), buckets.begin() + 5) == std::vector<int>{1, 4, 0, 2, 5});  // order
    CHECK(std::vector<int>(buckets.begin() + 6, buckets.begin() + 8) == std::vector<int>{2, 5});        // rows
    CHECK(std::vector<int>(buckets.begin() + 12, buckets.begin() + 15) == std::vector<int>{0, 2, 5});  // start
    std::vector<int> pads = {7, 7};
    CHECK(embedding_buckets(buckets.data(), pads.data(), 2, 7) == 0);
}

// N = 77: three blocks of the backward (32 rows each, the last partial), so three partial
// weight gradients; a second backward gives the same bits. C = 75: the forward goes element by
// element; C = 264 = 33 x128 groups in BF16 (66 in FP32): 128-bit accesses, a warp's second
// pass over the row partial.
TEST_CASE("rmsnorm kernels match the CPU", "[kernels]") {
    std::mt19937 rng(test_seed() + 2);
    const size_t N = 77;
    for (size_t C : {(size_t)75, (size_t)264}) {  // rows element by element; rows of whole x128 groups
        INFO("C = " << C);
        std::vector<float> x = rounded(random_floats(N * C, rng)), w = rounded(random_floats(C, rng)), dout = rounded(random_floats(N * C, rng));
        std::vector<float> dinp0 = rounded(random_floats(N * C, rng)), dw0 = random_floats(C, rng);
        std::vector<float> out(N * C), rstd(N), dinp = dinp0, dw = dw0;
        rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-5);
        rmsnorm_backward(dinp.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), N, C);
        floatX *d_x = upload_x(x), *d_w = upload_x(w), *d_dout = upload_x(dout), *d_dinp = upload_x(dinp0), *d_out = cuda_alloc<floatX>(N * C);
        float *d_rstd = cuda_alloc<float>(N), *d_dw = upload(dw0), *d_partials = cuda_alloc<float>(rmsnorm_backward_blocks(N) * C);
        REQUIRE(rmsnorm_backward_blocks(N) == 3);
        poison(d_out, N * C);
        poison(d_rstd, N);
        poison(d_partials, rmsnorm_backward_blocks(N) * C);
        rmsnorm_forward_cuda(d_out, d_rstd, d_x, d_w, N, (int)C, 1e-5, stream);
        rmsnorm_backward_cuda(d_dinp, d_dw, d_partials, d_dout, d_x, d_w, d_rstd, N, (int)C, stream);
        check_close("rmsnorm out", download_x(d_out, N * C), out);
        check_close("rmsnorm rstd", download(d_rstd, N), rstd, 1e-5);
        check_close("rmsnorm dinp", download_x(d_dinp, N * C), dinp);
        std::vector<float> dw_gpu = download(d_dw, C);
        check_close("rmsnorm dweight", dw_gpu, dw, 1e-5);
        cudaCheck(cudaMemcpy(d_dw, dw0.data(), C * sizeof(float), cudaMemcpyHostToDevice));
        rmsnorm_backward_cuda(d_dinp, d_dw, d_partials, d_dout, d_x, d_w, d_rstd, N, (int)C, stream);
        CHECK(download(d_dw, C) == dw_gpu);  // deterministic
        // recomputation (-r 1): the output again from the input and the saved rstd, the forward's
        // bits on each side (the CPU from its rstd, the kernel from the kernel's)
        std::vector<float> again(N * C);
        rmsnorm_recompute(again.data(), x.data(), w.data(), rstd.data(), N, C);
        CHECK(again == out);
        floatX* d_again = cuda_alloc<floatX>(N * C);
        poison(d_again, N * C);
        rmsnorm_recompute_cuda(d_again, d_x, d_w, d_rstd, N, (int)C, stream);
        CHECK(download_x(d_again, N * C) == download_x(d_out, N * C));
        cudaCheck(cudaFree(d_again));
        void* bufs[] = {d_x, d_w, d_dout, d_dinp, d_out, d_rstd, d_dw, d_partials};
        for (void* p : bufs) cudaCheck(cudaFree(p));
    }
}

// Inputs of magnitude 1e-3 (mean square ~3e-7), so eps = 1e-5 sets rstd: eps outside the
// square root, or left out, moves rstd by a factor of 5 or more. Rows 1..4 also hold one
// value of 1 at the end or the start of the warp's passes over the row (C - 1, 0, 31, 128),
// so skipping any element of the sum of squares moves rstd by orders of magnitude.
// N = 21 rows (one partial block of 32 rows in the backward, 8 per block in the forward) and
// C = 139 channels (> 128, not a multiple of 32) leave a partial block everywhere. The backward is fed the CPU twin's
// rstd, so it is checked on its own, not through the forward. Tolerances as above (TOL:
// bfloat16 outputs; 1e-5 for rstd and dweight, which are FP32 in both builds: only the
// order of the FP32 sums differs).
TEST_CASE("rmsnorm kernels with small inputs where eps matters (fixed data)", "[kernels]") {
    const size_t N = 21, C = 139;
    const double eps = 1e-5;
    std::vector<float> x = fixed_floats(N * C, 101, 1e-3f);
    x[1 * C + C - 1] = 1.0f;
    x[2 * C + 0] = 1.0f;
    x[3 * C + 31] = 1.0f;
    x[4 * C + 128] = 1.0f;
    x = rounded(x);
    std::vector<float> w = fixed_floats(C, 102, 0.5f);
    for (float& v : w) v += 1.0f;
    w = rounded(w);
    std::vector<float> dout = rounded(fixed_floats(N * C, 103)), dinp0 = rounded(fixed_floats(N * C, 104));
    std::vector<float> dw0 = fixed_floats(C, 105);
    std::vector<float> out(N * C), rstd(N), dinp = dinp0, dw = dw0, out0(N * C), rstd0(N);
    rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, eps);
    rmsnorm_backward(dinp.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), N, C);
    // the data is such that eps matters: without it rstd is far from the right one
    rmsnorm_forward(out0.data(), rstd0.data(), x.data(), w.data(), N, C, 0.0);
    REQUIRE(relative_error(rstd0.data(), rstd.data(), N) > 1.0);

    floatX *d_x = upload_x(x), *d_w = upload_x(w), *d_dout = upload_x(dout), *d_dinp = upload_x(dinp0), *d_out = cuda_alloc<floatX>(N * C);
    float *d_rstd = cuda_alloc<float>(N), *d_dw = upload(dw0), *d_rstd_cpu = upload(rstd);
    float* d_partials = cuda_alloc<float>(rmsnorm_backward_blocks(N) * C);
    poison(d_out, N * C);
    poison(d_rstd, N);
    rmsnorm_forward_cuda(d_out, d_rstd, d_x, d_w, N, (int)C, eps, stream);
    check_close("rmsnorm small out", download_x(d_out, N * C), out);
    check_close("rmsnorm small rstd", download(d_rstd, N), rstd, 1e-5);
    rmsnorm_backward_cuda(d_dinp, d_dw, d_partials, d_dout, d_x, d_w, d_rstd_cpu, N, (int)C, stream);
    check_close("rmsnorm small dinp", download_x(d_dinp, N * C), dinp);
    check_close("rmsnorm small dweight", download(d_dw, C), dw, 1e-5);
    void* bufs[] = {d_x, d_w, d_dout, d_dinp, d_out, d_rstd, d_dw, d_rstd_cpu, d_partials};
    for (void* p : bufs) cudaCheck(cudaFree(p));
}

TEST_CASE("matmul through cuBLAS matches the CPU", "[kernels]") {
    std::mt19937 rng(test_seed() + 3);
    size_t N = 13, C = 19, OC = 23;
    std::vector<float> x = rounded(random_floats(N * C, rng)), w = rounded(random_floats(OC * C, rng)), dout = rounded(random_floats(N * OC, rng));
    std::vector<float> dinp0 = rounded(random_floats(N * C, rng)), dw0 = random_floats(OC * C, rng);
    std::vector<float> out(N * OC), dinp = dinp0, dw = dw0;
    matmul_forward(out.data(), x.data(), w.data(), N, C, OC);
    matmul_backward(dinp.data(), dw.data(), dout.data(), x.data(), w.data(), N, C, OC);
    floatX *d_x = upload_x(x), *d_w = upload_x(w), *d_dout = upload_x(dout), *d_dinp = upload_x(dinp0), *d_out = cuda_alloc<floatX>(N * OC);
    float* d_dw = upload(dw0);
    poison(d_out, N * OC);
    matmul_forward_cuda(d_out, d_x, d_w, N, C, OC, stream);
    matmul_backward_cuda(d_dinp, d_dw, d_dout, d_x, d_w, N, C, OC, stream);
    check_close("matmul out", download_x(d_out, N * OC), out);
    check_close("matmul dinp", download_x(d_dinp, N * C), dinp);
    check_close("matmul dweight", download(d_dw, OC * C), dw, 1e-5);
    void* bufs[] = {d_x, d_w, d_dout, d_dinp, d_out, d_dw};
    for (void* p : bufs) cudaCheck(cudaFree(p));
}

// The fused pairs (K and V, gate and up: one cuBLAS batch of 2) against their twin, matmul_forward
// and matmul_backward twice on the CPU, and against the unfused launchers (check_batched_equal). The
// weights, outputs and gradients of the pair lie at unrelated offsets inside larger buffers, as
// the model's tensors do (w_b after every layer's w_a; the batch strides are their distances).
TEST_CASE("the fused matmul pairs match two matmuls", "[kernels]") {
    std::mt19937 rng(test_seed() + 47);
    size_t N = 13, C = 19, OC = 23, gap_w = 7 * OC * C + 5, gap_out = 3 * N * OC + 11;
    std::vector<float> x = rounded(random_floats(N * C, rng)), w = rounded(random_floats(gap_w + OC * C, rng));
    std::vector<float> dout = rounded(random_floats(gap_out + N * OC, rng)), dinp0 = rounded(random_floats(N * C, rng));
    std::vector<float> dw0 = random_floats(gap_w + OC * C, rng);
    std::vector<float> out(gap_out + N * OC, 0.0f), dinp = dinp0, dw = dw0;
    const float *w_a = w.data(), *w_b = w.data() + gap_w, *dout_a = dout.data(), *dout_b = dout.data() + gap_out;
    matmul_forward(out.data(), x.data(), w_a, N, C, OC);
    matmul_forward(out.data() + gap_out, x.data(), w_b, N, C, OC);
    matmul_backward(dinp.data(), dw.data(), dout_a, x.data(), w_a, N, C, OC);
    matmul_backward(dinp.data(), dw.data() + gap_w, dout_b, x.data(), w_b, N, C, OC);
    floatX *d_x = upload_x(x), *d_w = upload_x(w), *d_dout = upload_x(dout), *d_dinp = upload_x(dinp0), *d_out = cuda_alloc<floatX>(out.size());
    float* d_dw = upload(dw0);
    cudaCheck(cudaMemset(d_out, 0, out.size() * sizeof(floatX)));
    matmul_forward_pair_cuda(d_out, d_out + gap_out, d_x, d_w, d_w + gap_w, N, C, OC, stream);
    matmul_backward_pair_cuda(d_dinp, d_dw, d_dw + gap_w, d_dout, d_dout + gap_out, d_x, d_w, d_w + gap_w, N, C, OC, stream);
    std::vector<float> pair_out = download_x(d_out, out.size()), pair_dinp = download_x(d_dinp, N * C), pair_dw = download(d_dw, dw.size());
    check_close("pair out", pair_out, out);  // between the outputs nothing is written: zeros on both sides
    check_close("pair dinp", pair_dinp, dinp);
    check_close("pair dweights", pair_dw, dw, 1e-5);  // between the weights' gradients: dw0 on both sides
    // the unfused launchers give the same bits
    cudaCheck(cudaFree(d_dinp));
    cudaCheck(cudaFree(d_dw));
    d_dinp = upload_x(dinp0);
    d_dw = upload(dw0);
    cudaCheck(cudaMemset(d_out, 0, out.size() * sizeof(floatX)));
    matmul_forward_cuda(d_out, d_x, d_w, N, C, OC, stream);
    matmul_forward_cuda(d_out + gap_out, d_x, d_w + gap_w, N, C, OC, stream);
    matmul_backward_cuda(d_dinp, d_dw, d_dout, d_x, d_w, N, C, OC, stream);
    matmul_backward_cuda(d_dinp, d_dw + gap_w, d_dout + gap_out, d_x, d_w + gap_w, N, C, OC, stream);
    check_batched_equal("pair out, separate", download_x(d_out, out.size()), pair_out);
    check_batched_equal("pair dinp, separate", download_x(d_dinp, N * C), pair_dinp);
    check_batched_equal("pair dweights, separate", download(d_dw, dw.size()), pair_dw);
    void* bufs[] = {d_x, d_w, d_dout, d_dinp, d_out, d_dw};
    for (void* p : bufs) cudaCheck(cudaFree(p));
}

// Q, K and V (matmul_forward_qkv_cuda, matmul_backward_qkv_cuda) against three CPU matmuls and
// against the unfused launchers (check_batched_equal): with as many kv heads as heads and the weights,
// outputs and gradients evenly spaced (one cuBLAS batch of 3), and with grouped-query heads (Q
// alone, K and V as a pair). Every tensor lies inside a larger buffer at its own offset.
TEST_CASE("the fused Q, K, V matmuls match three matmuls, one batch of 3 or Q and a pair", "[kernels]") {
    std::mt19937 rng(test_seed() + 53);
    size_t N = 13, C = 24;
    for (size_t KVD : {C, (size_t)8}) {
        INFO("KVD " << KVD);
        size_t gap_w = 5 * C * C + 3, gap_o = 2 * N * C + 7;  // evenly spaced: the second and third at gap, 2 gap
        std::vector<float> x = rounded(random_floats(N * C, rng)), w = rounded(random_floats(2 * gap_w + C * C, rng));
        std::vector<float> dout = rounded(random_floats(2 * gap_o + N * C, rng)), dinp0 = rounded(random_floats(N * C, rng));
        std::vector<float> dw0 = random_floats(2 * gap_w + C * C, rng);
        std::vector<float> out(2 * gap_o + N * C, 0.0f), dinp = dinp0, dw = dw0;
        size_t ow[3] = {0, gap_w, 2 * gap_w}, oo[3] = {0, gap_o, 2 * gap_o}, oc[3] = {C, KVD, KVD};
        for (int i = 0; i < 3; i++) matmul_forward(out.data() + oo[i], x.data(), w.data() + ow[i], N, C, oc[i]);
        for (int i = 0; i < 3; i++) matmul_backward(dinp.data(), dw.data() + ow[i], dout.data() + oo[i], x.data(), w.data() + ow[i], N, C, oc[i]);
        floatX *d_x = upload_x(x), *d_w = upload_x(w), *d_dout = upload_x(dout), *d_dinp = upload_x(dinp0), *d_out = cuda_alloc<floatX>(out.size());
        float* d_dw = upload(dw0);
        cudaCheck(cudaMemset(d_out, 0, out.size() * sizeof(floatX)));
        matmul_forward_qkv_cuda(d_out, d_out + gap_o, d_out + 2 * gap_o, d_x, d_w, d_w + gap_w, d_w + 2 * gap_w, N, C, KVD, stream);
        matmul_backward_qkv_cuda(d_dinp, d_dw, d_dw + gap_w, d_dw + 2 * gap_w, d_dout, d_dout + gap_o, d_dout + 2 * gap_o, d_x, d_w, d_w + gap_w,
                                 d_w + 2 * gap_w, N, C, KVD, stream);
        std::vector<float> got_out = download_x(d_out, out.size()), got_dinp = download_x(d_dinp, N * C), got_dw = download(d_dw, dw.size());
        check_close("qkv out", got_out, out);
        check_close("qkv dinp", got_dinp, dinp);
        check_close("qkv dweights", got_dw, dw, 1e-5);
        cudaCheck(cudaFree(d_dinp));
        cudaCheck(cudaFree(d_dw));
        d_dinp = upload_x(dinp0);
        d_dw = upload(dw0);
        cudaCheck(cudaMemset(d_out, 0, out.size() * sizeof(floatX)));
        for (int i = 0; i < 3; i++) matmul_forward_cuda(d_out + oo[i], d_x, d_w + ow[i], N, C, oc[i], stream);
        for (int i = 0; i < 3; i++) matmul_backward_cuda(d_dinp, d_dw + ow[i], d_dout + oo[i], d_x, d_w + ow[i], N, C, oc[i], stream);
        check_batched_equal("qkv out, separate", download_x(d_out, out.size()), got_out);
        check_batched_equal("qkv dinp, separate", download_x(d_dinp, N * C), got_dinp);
        check_batched_equal("qkv dweights, separate", download(d_dw, dw.size()), got_dw);
        void* bufs[] = {d_x, d_w, d_dout, d_dinp, d_out, d_dw};
        for (void* p : bufs) cudaCheck(cudaFree(p));
    }
}

// The forward (direction +1) against the CPU twin's rope_forward and the backward (-1)
// against the CPU twin's rope_backward, each from the same input and the same table, at the
// default theta and at Llama 3's 500000. 2 * 13 * 3 * 6 = 468 rotated pairs: not a multiple of
// the 256-thread block. The REQUIREs show the data can tell the directions and the thetas apart.
// The table holds rope_cos_sin's values at (t * hd/2 + i) * 2, for every row the kernels read.
TEST_CASE("rope kernel matches the CPU both ways, default and non-default theta", "[kernels]") {
    const size_t B = 2, T = 13, NH = 3;
    const int hd = 12;
    std::vector<float> x = rounded(fixed_floats(B * T * NH * hd, 401)), fwd_default = x;
    rope_forward(fwd_default.data(), rope_table((int)T, hd, 10000.0).data(), B, T, NH, hd);
    for (double theta : {10000.0, 500000.0}) {
        INFO("theta " << theta);
        std::vector<float> table = rope_table((int)T, hd, theta);
        REQUIRE(table.size() == T * hd);
        for (int t = 0; t < (int)T; t++) {
            for (int i = 0; i < hd / 2; i++) {
                float c, sn;
                rope_cos_sin(t, rope_inv_freq(rope_config(hd, theta), i), &c, &sn);
                CHECK(table[((size_t)t * hd / 2 + i) * 2] == c);
                CHECK(table[((size_t)t * hd / 2 + i) * 2 + 1] == sn);
            }
        }
        std::vector<float> fwd = x, bwd = x;
        rope_forward(fwd.data(), table.data(), B, T, NH, hd);
        rope_backward(bwd.data(), table.data(), B, T, NH, hd);
        REQUIRE(relative_error(bwd.data(), fwd.data(), x.size()) > 10 * TOL);
        if (theta != 10000.0) REQUIRE(relative_error(fwd_default.data(), fwd.data(), x.size()) > 10 * TOL);
        floatX *d_a = upload_x(x), *d_b = upload_x(x);
        float* d_table = upload(table);
        rope_forward_cuda(d_a, d_table, B, (int)T, (int)NH, hd, stream);
        rope_backward_cuda(d_b, d_table, B, (int)T, (int)NH, hd, stream);
        check_close("rope forward", download_x(d_a, x.size()), fwd);
        check_close("rope backward", download_x(d_b, x.size()), bwd);
        cudaCheck(cudaFree(d_a));
        cudaCheck(cudaFree(d_b));
        cudaCheck(cudaFree(d_table));
    }
}

// Attention: the flash kernels' tests are in test_flash.cpp (#included below).

// n = 1003: whole x128 groups (8 bf16 or 4 floats, 128-bit accesses) and a tail of 3 elements;
// then from the second element on, where no pointer is 16-byte aligned.
TEST_CASE("swiglu and residual kernels match the CPU", "[kernels]") {
    std::mt19937 rng(test_seed() + 6);
    size_t n = 1003;
    std::vector<float> g = rounded(random_floats(n, rng, 2.0f)), u = rounded(random_floats(n, rng)), d = rounded(random_floats(n, rng));
    std::vector<float> out(n), sum(n), dg(n), du(n);  // the kernel and its twin write (=) the gradients
    swiglu_forward(out.data(), g.data(), u.data(), n);
    swiglu_backward(dg.data(), du.data(), d.data(), g.data(), u.data(), n);
    residual_forward(sum.data(), g.data(), u.data(), n);
    floatX *d_g = upload_x(g), *d_u = upload_x(u), *d_d = upload_x(d), *d_dg = cuda_alloc<floatX>(n), *d_du = cuda_alloc<floatX>(n);
    floatX *d_out = cuda_alloc<floatX>(n), *d_sum = cuda_alloc<floatX>(n);
    poison(d_out, n);
    poison(d_sum, n);
    poison(d_dg, n);  // NaN where it would read before writing
    poison(d_du, n);
    swiglu_forward_cuda(d_out, d_g, d_u, n, stream);
    swiglu_backward_cuda(d_dg, d_du, d_d, d_g, d_u, n, stream);
    residual_forward_cuda(d_sum, d_g, d_u, n, stream);
    check_close("swiglu out", download_x(d_out, n), out);
    check_close("swiglu dgate", download_x(d_dg, n), dg);
    check_close("swiglu dup", download_x(d_du, n), du);
    check_close("residual", download_x(d_sum, n), sum);
    // one element in: no pointer 16-byte aligned, so every group goes element by element
    poison(d_out, n);
    poison(d_sum, n);
    poison(d_dg, n);
    swiglu_forward_cuda(d_out + 1, d_g + 1, d_u + 1, n - 1, stream);
    swiglu_backward_cuda(d_dg + 1, d_du + 1, d_d + 1, d_g + 1, d_u + 1, n - 1, stream);
    residual_forward_cuda(d_sum + 1, d_g + 1, d_u + 1, n - 1, stream);
    auto from1 = [](const std::vector<float>& v) { return std::vector<float>(v.begin() + 1, v.end()); };
    check_close("swiglu out, unaligned", from1(download_x(d_out, n)), from1(out));
    check_close("swiglu dgate, unaligned", from1(download_x(d_dg, n)), from1(dg));
    check_close("residual, unaligned", from1(download_x(d_sum, n)), from1(sum));
    CHECK(std::isnan(download_x(d_out, n)[0]));
    void* bufs[] = {d_g, d_u, d_d, d_dg, d_du, d_out, d_sum};
    for (void* p : bufs) cudaCheck(cudaFree(p));
}

// The fused residual add + RMSNorm against its CPU twin, and the twin against the two ops it
// replaces (residual_forward, then rmsnorm_forward: the same bits). N = 77 rows: 10 blocks of
// 8 warps, the last partial. C = 75: element by element; C = 264: x128 groups and a partial
// second pass. Then in place (a is the residual, as inference adds), and against the unfused
// kernels, whose bits it must give: the norm is taken of the residual as floatX stores it.
TEST_CASE("fused residual + rmsnorm kernel matches the CPU and the unfused kernels", "[kernels]") {
    std::mt19937 rng(test_seed() + 11);
    const size_t N = 77;
    const double eps = 1e-5;
    for (size_t C : {(size_t)75, (size_t)264}) {
        INFO("C = " << C);
        std::vector<float> a = rounded(random_floats(N * C, rng)), b = rounded(random_floats(N * C, rng, 0.5f));
        std::vector<float> w = rounded(random_floats(C, rng));
        std::vector<float> res(N * C), out(N * C), rstd(N), res2(N * C), out2(N * C), rstd2(N);
        fused_residual_rmsnorm_forward(res.data(), out.data(), rstd.data(), a.data(), b.data(), w.data(), N, C, eps);
        residual_forward(res2.data(), a.data(), b.data(), N * C);
        rmsnorm_forward(out2.data(), rstd2.data(), res2.data(), w.data(), N, C, eps);
        CHECK(res == res2);
        CHECK(out == out2);
        CHECK(rstd == rstd2);
        REQUIRE(relative_error(a.data(), res.data(), N * C) > 0.1);  // b is not negligible

        floatX *d_a = upload_x(a), *d_b = upload_x(b), *d_w = upload_x(w), *d_res = cuda_alloc<floatX>(N * C), *d_out = cuda_alloc<floatX>(N * C);
        float* d_rstd = cuda_alloc<float>(N);
        poison(d_res, N * C);
        poison(d_out, N * C);
        poison(d_rstd, N);
        fused_residual_rmsnorm_forward_cuda(d_res, d_out, d_rstd, d_a, d_b, d_w, N, (int)C, eps, stream);
        std::vector<float> g_res = download_x(d_res, N * C), g_out = download_x(d_out, N * C), g_rstd = download(d_rstd, N);
        check_close("fused residual", g_res, res);
        check_close("fused norm out", g_out, out);
        // FP32: only the order of the sum differs. BF16: the kernel's rstd is that of the residual rounded
        // to bfloat16 (each element within 2^-9), the twin's that of the exact sum: well under 1e-3.
        check_close("fused rstd", g_rstd, rstd, sizeof(floatX) == 2 ? 1e-3 : 1e-5);

        // the unfused kernels give the same bits
        floatX *d_res_u = cuda_alloc<floatX>(N * C), *d_out_u = cuda_alloc<floatX>(N * C);
        float* d_rstd_u = cuda_alloc<float>(N);
        residual_forward_cuda(d_res_u, d_a, d_b, N * C, stream);
        rmsnorm_forward_cuda(d_out_u, d_rstd_u, d_res_u, d_w, N, (int)C, eps, stream);
        CHECK(download_x(d_res_u, N * C) == g_res);
        CHECK(download_x(d_out_u, N * C) == g_out);
        CHECK(download(d_rstd_u, N) == g_rstd);

        // in place: the residual overwrites a
        poison(d_out, N * C);
        poison(d_rstd, N);
        fused_residual_rmsnorm_forward_cuda(d_a, d_out, d_rstd, d_a, d_b, d_w, N, (int)C, eps, stream);
        CHECK(download_x(d_a, N * C) == g_res);
        CHECK(download_x(d_out, N * C) == g_out);
        CHECK(download(d_rstd, N) == g_rstd);
        void* bufs[] = {d_a, d_b, d_w, d_res, d_out, d_rstd, d_res_u, d_out_u, d_rstd_u};
        for (void* p : bufs) cudaCheck(cudaFree(p));
    }
}

// The logprob forward and backward on the CPU (lp, dz) and as kernels (got, dgot; outputs
// poisoned with NaN first) for logits z (B, T, V), tokens (B, T) and dlp (B, T); on the device
// the rows are ld apart (pad_rows: NaN between them, which must be neither read nor written).
static void run_logprob(const std::vector<int>& tokens, const std::vector<float>& z, const std::vector<float>& dlp, size_t B, size_t T, size_t V,
                        std::vector<float>* lp, std::vector<float>* dz, std::vector<float>* got, std::vector<float>* dgot, size_t ld = 0) {
    ld = ld ? ld : V;
    lp->assign(B * T, 0.0f), dz->assign(z.size(), 0.0f);
    logprob_forward(lp->data(), z.data(), tokens.data(), B, T, V);
    logprob_backward(dz->data(), z.data(), tokens.data(), dlp.data(), B, T, V);
    int* d_tokens = upload(tokens);
    std::vector<float> zp = pad_rows(z, V, ld);
    floatX *d_z = upload_x(zp), *d_dz = cuda_alloc<floatX>(zp.size());
    float *d_dlp = upload(dlp), *d_lp = cuda_alloc<float>(B * T);
    poison(d_lp, B * T);
    poison(d_dz, zp.size());
    logprob_forward_cuda(d_lp, d_z, d_tokens, B, (int)T, (int)V, ld, stream);
    logprob_backward_cuda(d_dz, d_z, d_tokens, d_dlp, B, (int)T, (int)V, ld, stream);
    std::vector<float> dgot_padded = download_x(d_dz, zp.size());
    CHECK(padding_intact(dgot_padded, V, ld));
    *got = download(d_lp, B * T), *dgot = unpad_rows(dgot_padded, V, ld);
    logprob_backward_cuda(d_z, d_z, d_tokens, d_dlp, B, (int)T, (int)V, ld, stream);  // in place, as the GPU model runs it
    std::vector<float> in_place = download_x(d_z, zp.size());
    CHECK(padding_intact(in_place, V, ld));
    CHECK(unpad_rows(in_place, V, ld) == *dgot);
    void* bufs[] = {d_tokens, d_z, d_dz, d_dlp, d_lp};
    for (void* p : bufs) cudaCheck(cudaFree(p));
}

TEST_CASE("logprob kernels match the CPU", "[kernels]") {
    std::mt19937 rng(test_seed() + 7);
    size_t B = 2, T = 5, V = 300;  // V spans more than one 256-thread pass
    std::vector<int> tokens(B * T);
    for (int& t : tokens) t = (int)(rng() % V);
    std::vector<float> z = rounded(random_floats(B * T * V, rng, 3.0f)), dlp = random_floats(B * T, rng), lp, dz, got, dgot;
    dlp[2] = 0.0f;  // a position whose gradient is zero writes zeros
    for (size_t ld : {V, padded_vocab(V)}) {  // rows side by side, and 320 apart as in the GPU model
        INFO("row stride " << ld);
        run_logprob(tokens, z, dlp, B, T, V, &lp, &dz, &got, &dgot, ld);
        check_close("logprob", got, lp, 1e-5);  // FP32 output
        check_close("dlogits", dgot, dz);
    }
}

// The log-sum-exp of a logits row is a block reduction (256 threads striding over V, then
// warp shuffles, then the 8 warp results through shared memory), for the max and the sum.
// Fixed data: V = 557 (three strides, the last partial, not a multiple of 32) and each row
// holds one logit of 100 over a base in [-0.5, 0.5) at a position that ends or starts a level:
// the first element, the last lane of warp 0 (31), the first of warp 1 (32), the last thread
// of the block (255, warp 7, whose result is the last one in shared memory), the first of the
// second stride (256), 511, 512 and the last element (V - 1); one row has it at both ends
// and one row has none. Dropping the large logit from the max overflows exp (e^100 > FLT_MAX),
// dropping it from the sum moves the log-prob by ~100, or by log 2 in the row with two.
// Every log-prob is checked on its own (FP32 output: |error| <= 1e-5 max(1, |ref|)), and
// every row of dlogits on its own (relative error per row, TOL).
TEST_CASE("logprob block reductions reach every level (fixed data)", "[kernels][reduction]") {
    const size_t B = 2, T = 6, V = 557;
    struct Row { std::vector<int> large; int target; };
    const Row rows[] = {{{0}, 0}, {{(int)V - 1}, (int)V - 1}, {{255}, 7}, {{256}, 256}, {{31}, 31},
                        {{32}, 100}, {{511}, 511}, {{0, (int)V - 1}, (int)V - 1}, {{512}, 3}, {{}, (int)V - 2}};
    std::vector<float> z = fixed_floats(B * T * V, 701, 0.5f), dlp(B * T);
    std::vector<int> tokens(B * T, 0);
    size_t r = 0;  // the logits rows that predict a token: (b, t) for t < T - 1
    for (size_t b = 0; b < B; b++) {
        for (size_t t = 0; t + 1 < T; t++, r++) {
            for (int i : rows[r].large) z[(b * T + t) * V + i] = 100.0f;
            tokens[b * T + t + 1] = rows[r].target;
            dlp[b * T + t + 1] = (r % 2 ? -1.0f : 1.0f) * (0.5f + 0.1f * (float)r);
        }
    }
    REQUIRE(r == sizeof(rows) / sizeof(rows[0]));
    z = rounded(z);
    std::vector<float> lp, dz, got, dgot;
    run_logprob(tokens, z, dlp, B, T, V, &lp, &dz, &got, &dgot);
    double worst = 0, worst_row = 0;
    for (size_t i = 0; i < B * T; i++) {
        double err = std::fabs((double)got[i] - lp[i]) / std::max(1.0, std::fabs((double)lp[i]));
        if (!(err <= 1e-5)) printf("  logprob row %zu: %.6g, CPU %.6g\n", i, got[i], lp[i]);
        worst = std::max(worst, std::isnan(err) ? INFINITY : err);
        // (a row with nothing to predict is 0 on the CPU: then any nonzero value is an infinite error)
        double rerr = relative_error(dgot.data() + i * V, dz.data() + i * V, V);
        if (!(rerr < TOL)) printf("  dlogits row %zu: rel err %.2e\n", i, rerr);
        worst_row = std::max(worst_row, std::isnan(rerr) ? INFINITY : rerr);
    }
    printf("  %-24s worst %.2e (tolerance 1e-05); dlogits worst row rel err %.2e (tolerance %.0e)\n", "logprob levels", worst, worst_row, TOL);
    CHECK(worst <= 1e-5);
    CHECK(worst_row < TOL);
}

// The SFT classifier fused (fused_logprob_nll): the log-probs and the d-logits of the masked mean
// NLL over `count` targets from one max and sum per row. Its CPU twin gives the bits of the unfused
// ops (logprob_forward, masked_mean_loss_backward, logprob_backward), out of place and in place;
// the kernel (online max and sum, then the write pass) matches the twin within the logprob test's
// tolerances (lp FP32 output: 1e-5; dlogits TOL), out of place and over its own logits, with the
// same bits both ways. V = 301: rows side by side, the element-wise path in both precisions; rows
// 320 apart (padded_vocab), 128-bit groups and a tail of 5 (bf16) or 1 (fp32); 1000: 128-bit groups,
// fewer than the block's threads (threads with no element); 4104: groups over three strides, the
// last partial. count is the step's (more than this batch's targets); count 0 writes zero d-logits.
TEST_CASE("fused logprob + NLL kernel matches its CPU twin, which is the unfused ops' bits", "[kernels]") {
    std::mt19937 rng(test_seed() + 71);
    const size_t B = 3, T = 5;
    for (size_t V : {(size_t)301, (size_t)1000, (size_t)4104}) {
        for (size_t extra : {(size_t)3, (size_t)0}) {
            std::vector<int> tokens(B * T);
            for (int& t : tokens) t = (int)(rng() % V);
            tokens[1] = (int)V - 1, tokens[2] = 0;  // targets at both ends of a row
            std::vector<uint8_t> mask(B * T);
            for (uint8_t& m : mask) m = rng() % 3 != 0;
            mask[1] = mask[2] = 1, mask[T] = 1;  // position 0 of a sequence never counts, whatever its mask
            size_t targets = 0;
            for (size_t i = 0; i < B * T; i++) targets += i % T != 0 && mask[i];
            size_t count = extra ? targets + extra : 0;
            std::vector<float> z = rounded(random_floats(B * T * V, rng, 3.0f));
            INFO("V " << V << ", count " << count);
            // the twin against the unfused ops, bit for bit
            std::vector<float> lp_ref(B * T), dlp(B * T), dz_ref(z.size());
            logprob_forward(lp_ref.data(), z.data(), tokens.data(), B, T, V);
            masked_mean_loss_backward(dlp.data(), mask.data(), B, T, count);
            logprob_backward(dz_ref.data(), z.data(), tokens.data(), dlp.data(), B, T, V);
            std::vector<float> lp(B * T, NAN), dz(z.size(), NAN), lp_in(B * T, NAN), z_in = z;
            fused_logprob_nll(lp.data(), dz.data(), z.data(), tokens.data(), mask.data(), count, B, T, V);
            fused_logprob_nll(lp_in.data(), z_in.data(), z_in.data(), tokens.data(), mask.data(), count, B, T, V);
            CHECK(lp == lp_ref);
            CHECK(dz == dz_ref);
            CHECK(lp_in == lp_ref);
            CHECK(z_in == dz_ref);
            size_t nonzero = 0;
            for (float x : dz_ref) nonzero += x != 0.0f;
            CHECK(nonzero == (count ? targets * V : 0));  // a target's row is nonzero, every other row zero

            // the kernel against the twin, then over its own logits; rows side by side and padded_vocab(V)
            // apart as in the GPU model (NaN between the rows: never read, never written)
            for (size_t ld : {V, padded_vocab(V)}) {
                INFO("row stride " << ld);
                std::vector<float> zp = pad_rows(z, V, ld);
                int* d_tokens = upload(tokens);
                uint8_t* d_mask = upload(mask);
                floatX *d_z = upload_x(zp), *d_dz = cuda_alloc<floatX>(zp.size());
                float* d_lp = cuda_alloc<float>(B * T);
                poison(d_lp, B * T);
                poison(d_dz, zp.size());
                fused_logprob_nll_cuda(d_lp, d_dz, d_z, d_tokens, d_mask, count, B, (int)T, (int)V, ld, stream);
                std::vector<float> got = download(d_lp, B * T), dgot_padded = download_x(d_dz, zp.size());
                CHECK(padding_intact(dgot_padded, V, ld));
                std::vector<float> dgot = unpad_rows(dgot_padded, V, ld);
                double worst = 0;
                for (size_t i = 0; i < B * T; i++) {
                    double err = std::fabs((double)got[i] - lp[i]) / std::max(1.0, std::fabs((double)lp[i]));
                    worst = std::max(worst, std::isnan(err) ? INFINITY : err);
                }
                printf("  fused logprob V %-5zu row stride %-5zu count %-3zu worst %.2e (tolerance 1e-05)\n", V, ld, count, worst);
                CHECK(worst <= 1e-5);
                if (count) check_close("fused dlogits", dgot, dz);
                else CHECK(dgot == std::vector<float>(z.size(), 0.0f));
                poison(d_lp, B * T);
                fused_logprob_nll_cuda(d_lp, d_z, d_z, d_tokens, d_mask, count, B, (int)T, (int)V, ld, stream);
                CHECK(download(d_lp, B * T) == got);
                std::vector<float> in_place = download_x(d_z, zp.size());
                CHECK(padding_intact(in_place, V, ld));
                CHECK(unpad_rows(in_place, V, ld) == dgot);
                void* bufs[] = {d_tokens, d_mask, d_z, d_dz, d_lp};
                for (void* p : bufs) cudaCheck(cudaFree(p));
            }
        }
    }
}

// The device clips inside AdamW: grad_norm_coef_cuda leaves the gradients as they are and
// adamw_update_cuda multiplies each by the coefficient as it reads it; the CPU clips in place
// (clip_grad_norm) then steps (adamw_update). Same products, so 1e-6 as the AdamW test; the
// coefficient carries the norm's FP32 reduction error (1e-5).
TEST_CASE("gradient norm and clipping on the device match the CPU (the clip folded into AdamW)", "[kernels]") {
    std::mt19937 rng(test_seed() + 8);
    size_t n = 100003;
    std::vector<float> g = random_floats(n, rng), p = random_floats(n, rng), m = random_floats(n, rng, 0.1f), v = random_floats(n, rng, 0.1f);
    for (float& x : v) x = x * x;
    AdamWConfig opt{1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f};
    float *d_g = upload(g), *partials = cuda_alloc<float>(GRAD_NORM_BLOCKS), *norm_coef = cuda_alloc<float>(2);
    floatX* d_px = cuda_alloc<floatX>(n);
    for (float max_norm : {1.0f, 1e9f}) {  // clips, then does not
        std::vector<float> ref = g, pr = p, mr = m, vr = v;
        float norm = clip_grad_norm(ref.data(), n, max_norm);
        adamw_update(pr.data(), ref.data(), mr.data(), vr.data(), n, opt, 0.1f, 2);
        poison(norm_coef, 2);
        grad_norm_coef_cuda(d_g, n, max_norm, partials, norm_coef, stream);
        std::vector<float> nc = download(norm_coef, 2);
        CHECK(nc[0] == Approx(norm).epsilon(1e-5));
        CHECK(nc[1] == Approx(max_norm == 1.0f ? 1.0f / (norm + 1e-6f) : 1.0f).epsilon(1e-5));
        CHECK(download(d_g, n) == g);  // no pass over the gradients
        float *d_p = upload(p), *d_m = upload(m), *d_v = upload(v);
        adamw_update_cuda(d_p, d_px, d_g, d_m, d_v, n, opt, 0.1f, 2, stream, norm_coef + 1);
        check_close("adamw master, clipped", download(d_p, n), pr, 1e-6);
        check_close("adamw m, clipped", download(d_m, n), mr, 1e-5);
        check_close("adamw v, clipped", download(d_v, n), vr, 1e-5);
        CHECK(download(d_g, n) == g);
        void* step_bufs[] = {d_p, d_m, d_v};
        for (void* b : step_bufs) cudaCheck(cudaFree(b));
    }
    void* bufs[] = {d_g, partials, norm_coef, d_px};
    for (void* b : bufs) cudaCheck(cudaFree(b));
}

// The device norm is two levels of reduction: GRAD_NORM_BLOCKS blocks of 256 threads stride
// over the gradient (one full grid of partials covers 512 * 256 = 131072 values) and write one
// partial each, then one block of 1024 threads adds the partials. Here n = 131072 + 131: every
// block has values (the last block's partial is not 0), a few threads take a second stride,
// and n is a multiple of no block size. Two fixed data sets, each against the exact norm
// (a plain sum in double, not the CPU twin, which is checked too):
//   "even":  every value in [0.5, 1], so each block's partial is ~1/512 of the sum and
//            dropping any partial (the last one included) moves the norm by ~1e-3;
//   "ends":  values in [-1e-3, 1e-3] and five values of 10: the first (0), the last thread of
//            block 0 (255), the first of the last block (511 * 256), the last of the first
//            stride (131071) and the last value (n - 1, in the second stride), so dropping
//            any single one of them moves the norm by over 10%.
// Checked: every partial written (poisoned first), the partials add up to the sum of squares
// (the first level alone), the norm (both levels), the clip coefficient, and the gradients
// left untouched. Tolerances: FP32 sums over a tree of depth ~20 are within ~1e-6 of the
// exact value; 1e-5 for the norm, the sum of partials and the coefficient.
TEST_CASE("gradient norm reduction reaches every level (fixed data past one grid of partials)", "[kernels][reduction]") {
    const size_t grid = (size_t)GRAD_NORM_BLOCKS * 256;  // 256 threads per block, as grad_norm_coef_cuda launches
    const size_t n = grid + 131;
    std::vector<float> even = fixed_floats(n, 801, 0.25f), ends = fixed_floats(n, 802, 1e-3f);
    for (float& v : even) v += 0.75f;
    for (size_t i : {(size_t)0, (size_t)255, (size_t)(GRAD_NORM_BLOCKS - 1) * 256, grid - 1, n - 1}) ends[i] = 10.0f;
    float *d_g = cuda_alloc<float>(n), *partials = cuda_alloc<float>(GRAD_NORM_BLOCKS), *norm_coef = cuda_alloc<float>(2);
    for (const std::vector<float>* data : {&even, &ends}) {
        const std::vector<float>& g = *data;
        INFO((data == &even ? "even" : "ends") << " data, n = " << n);
        double ss = 0;
        for (float v : g) ss += (double)v * v;
        const double exact = std::sqrt(ss);
        const float max_norm = (float)(exact / 2);  // clips by about one half
        std::vector<float> cpu = g;
        CHECK(clip_grad_norm(cpu.data(), n, 1e9f) == Approx(exact).epsilon(1e-6));
        cudaCheck(cudaMemcpy(d_g, g.data(), n * sizeof(float), cudaMemcpyHostToDevice));
        poison(partials, GRAD_NORM_BLOCKS);
        poison(norm_coef, 2);
        grad_norm_coef_cuda(d_g, n, max_norm, partials, norm_coef, stream);
        std::vector<float> part = download(partials, GRAD_NORM_BLOCKS), nc = download(norm_coef, 2), out = download(d_g, n);
        size_t unwritten = 0;
        double part_sum = 0;
        for (float p : part) {
            unwritten += !std::isfinite(p);
            part_sum += p;
        }
        CHECK(unwritten == 0);
        CHECK(part_sum == Approx(ss).epsilon(1e-5));
        CHECK(nc[0] == Approx(exact).epsilon(1e-5));
        const double coef = max_norm / (exact + 1e-6);
        CHECK(nc[1] == Approx(coef).epsilon(1e-5));
        CHECK(out == g);  // AdamW clips as it reads them (the test above)
    }
    void* bufs[] = {d_g, partials, norm_coef};
    for (void* p : bufs) cudaCheck(cudaFree(p));
}

TEST_CASE("AdamW, cast and gradient accumulation kernels match the CPU", "[kernels]") {
    std::mt19937 rng(test_seed() + 9);
    size_t n = 1001;
    std::vector<float> p = random_floats(n, rng), g = random_floats(n, rng), m = random_floats(n, rng, 0.1f), v = random_floats(n, rng, 0.1f);
    for (float& x : v) x = x * x;
    AdamWConfig opt{1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f};
    std::vector<float> pr = p, mr = m, vr = v;
    adamw_update(pr.data(), g.data(), mr.data(), vr.data(), n, opt, 0.1f, 3);
    float *d_p = upload(p), *d_g = upload(g), *d_m = upload(m), *d_v = upload(v);
    floatX* d_px = cuda_alloc<floatX>(n);
    poison(d_px, n);
    adamw_update_cuda(d_p, d_px, d_g, d_m, d_v, n, opt, 0.1f, 3, stream);
    check_close("adamw master", download(d_p, n), pr, 1e-6);
    check_close("adamw m", download(d_m, n), mr, 1e-6);
    check_close("adamw v", download(d_v, n), vr, 1e-6);
    check_close("adamw floatX copy", download_x(d_px, n), pr);
    poison(d_px, n);
    cast_to_floatX_cuda(d_px, d_p, n, stream);
    check_close("cast", download_x(d_px, n), rounded(pr), 1e-7);  // exactly the rounding
    // ZeRO-2's acc += x: one FP32 add per element, the CPU's bits
    std::vector<float> acc = m;
    gradient_accumulate(acc.data(), g.data(), n);
    CHECK(acc[7] == m[7] + g[7]);
    float* d_acc = upload(m);
    gradient_accumulate_cuda(d_acc, d_g, n, stream);
    CHECK(download(d_acc, n) == acc);
    cudaCheck(cudaFree(d_acc));
    void* bufs[] = {d_p, d_g, d_m, d_v, d_px};
    for (void* b : bufs) cudaCheck(cudaFree(b));
}

// ---------------------------------------------------------------------------- the whole model

// Tolerances of the whole model through the kernels against the float64 fixtures.
// FP32: as the CPU parity test (the same math in float32).
// BF16: every activation is rounded to 8 mantissa bits (2e-3 relative) after each of ~20 ops,
//       so logits land ~1e-2 from the exact values and the loss ~1e-3; gradients pass back
//       through as many roundings (2e-2..3.3e-2 observed). AdamW's first steps are about
//       lr * sign(g): an element whose gradient is smaller than its bfloat16 error flips its
//       step (an error of 2 lr), which puts the parameters after two steps 1e-2..1.8e-2 of
//       their norm from the exact ones. The BF16 bounds below are 3x the worst observed;
//       the optimizer's formulas are held to 1e-4 by the FP32 build of this same test.
#ifdef ENABLE_FP32
static const double TOL_LOGITS = 1e-5, TOL_LOSS = 1e-5, TOL_GRAD = 1e-4, TOL_PARAM = 1e-4;
#else
static const double TOL_LOGITS = 5e-2, TOL_LOSS = 5e-3, TOL_GRAD = 1e-1, TOL_PARAM = 5e-2;
#endif


static void run_model_parity(const std::string& name) {
    std::string dir = "test/fixtures/" + name + "/";
    Llama host;
    llama_load(&host, (dir + "model.bin").c_str());
    TokenData data;
    tokens_load(&data, (dir + "tokens.tok").c_str(), host.config.vocab_size);
    auto e = fixture_load(dir + "expect.bin");
    int B = (int)data.n_seqs, T = (int)token_seq_len(data, 0);
    std::vector<int> tokens(B * T);
    std::vector<uint8_t> mask(B * T);
    std::vector<float> lp(B * T);
    tokens_fill_batch(data, 0, B, T, tokens.data(), mask.data());
    const float* hp = e["adamw"].data.data();
    AdamWConfig opt{hp[0], hp[1], hp[2], hp[3], hp[4]};
    LlamaCuda g;
    llama_cuda_init(&g, &host, B, T, true, stream);
    printf("kernel parity %s\n", name.c_str());
    size_t count = 0;
    for (int i = 0; i < B * T; i++) count += i % T != 0 && mask[i];
    auto loss_and_grad = [&] {  // train_sft's step: the classifier fused, B sums to the host
        llama_cuda_zero_grad(&g);
        double loss = llama_cuda_nll_forward_backward(&g, tokens.data(), mask.data(), B, T, count);
        llama_cuda_logprobs(&g, lp.data(), B, T);  // its log-probs, for the sums below
        return loss;
    };
    // the logits of a plain forward (the step writes the d-logits over them)
    llama_cuda_forward(&g, tokens.data(), B, T);
    size_t V = host.config.vocab_size;
    check_close("logits", unpad_rows(download_x(g.acts.logits, (size_t)B * T * padded_vocab(V)), V, padded_vocab(V)), e["logits"].data,
                TOL_LOGITS);  // rows padded_vocab(V) apart
    double loss = loss_and_grad();
    CHECK(loss == Approx(e["loss"].data[0]).epsilon(TOL_LOSS));
    double sums[16];
    sequence_logprob_sums(sums, lp.data(), mask.data(), B, T);
    for (int b = 0; b < B; b++) CHECK(sums[b] == Approx(e["logprob_sums"].data[b]).epsilon(TOL_LOSS));
    check_param_tensors(host.config, download(g.grads_memory, g.num_params).data(), e, "grad.", TOL_GRAD);
    float norm1 = llama_cuda_clip_grad_norm(&g, hp[5]);
    CHECK(norm1 == Approx(e["grad_norm"].data[0]).epsilon(TOL_LOSS * 10));
    llama_cuda_update(&g, opt);
    double loss2 = loss_and_grad();
    CHECK(loss2 == Approx(e["loss_step2"].data[0]).epsilon(TOL_LOSS * 2));
    llama_cuda_clip_grad_norm(&g, hp[5]);
    llama_cuda_update(&g, opt);
    llama_cuda_download(&g, &host);
    check_param_tensors(host.config, host.params_memory, e, "param2.", TOL_PARAM);
    llama_cuda_free(&g);
    llama_free(&host);
}

TEST_CASE("kernels: parity with transformers, multi-head tied", "[kernels][parity]") { run_model_parity("mha_tied"); }
TEST_CASE("kernels: parity with transformers, grouped-query", "[kernels][parity]") { run_model_parity("gqa_untied"); }
TEST_CASE("kernels: parity with transformers, odd sizes", "[kernels][parity]") { run_model_parity("odd_sizes"); }
TEST_CASE("kernels: parity with transformers, llama3 RoPE scaling", "[kernels][parity][rope]") { run_model_parity("rope_llama3"); }
TEST_CASE("kernels: parity with transformers, linear RoPE scaling", "[kernels][parity][rope]") { run_model_parity("rope_linear"); }

// No FP32 atomics in a training step (the embedding and RMSNorm weight gradients are summed in
// fixed orders, the flash backward per tile): two steps from the same start give the same bits
// (the emulation runs large grids' blocks on several OS threads, in no fixed order). Tokens that repeat
// (a vocabulary of 20 for 140 positions) and pads (id 0), so rows of wte gather many positions.
TEST_CASE("a GPU training step gives the same bits twice", "[kernels][determinism]") {
    LlamaConfig c{.dim = 64, .n_layers = 2, .n_heads = 8, .n_kv_heads = 2, .vocab_size = 20, .ffn_dim = 96, .max_seq_len = 128};
    c.pad_id = 0;
    const int B = 2, T = 70;
    Llama host;
    llama_init(&host, c);
    uint64_t rng = 11;
    for (size_t i = 0; i < host.num_params; i++) host.params_memory[i] = 0.05f * rng_normal(&rng);
    std::vector<int> tokens(B * T);
    for (int& t : tokens) t = (int)(rng_uniform(&rng) * 20) % 20;
    std::vector<uint8_t> mask(B * T, 1);
    auto step = [&] {
        LlamaCuda g;
        llama_cuda_init(&g, &host, B, T, true, stream);
        double loss = llama_cuda_nll_forward_backward(&g, tokens.data(), mask.data(), B, T, B * (T - 1));
        llama_cuda_clip_grad_norm(&g, 0.5f);
        std::vector<float> grads = download(g.grads_memory, g.num_params);
        llama_cuda_update(&g, AdamWConfig{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f});
        std::vector<float> master = download(g.master, g.num_params);
        llama_cuda_free(&g);
        grads.insert(grads.end(), master.begin(), master.end());
        grads.push_back((float)loss);
        return grads;
    };
    std::vector<float> first = step(), second = step();
    size_t nonzero = 0;
    for (size_t i = 0; i < (size_t)c.vocab_size * c.dim; i++) nonzero += first[i] != 0.0f;  // the wte gradient
    CHECK(nonzero == (size_t)(c.vocab_size - 1) * c.dim);  // every row but the pad's (all 20 tokens occur)
    CHECK(first == second);
    llama_free(&host);
}

// The flash attention's tests, in this translation unit (llm.cu's kernels are defined once per
// program), on the GPU too.
#include "test_flash.cpp"

// DPO's sequence sums, losses and one-step parity (test_dpo_loss.cpp, also in the CPU binary), here
// on the kernels and the GPU Runner; before the coverage check, which must see its kernels run.
#include "test_dpo_loss.cpp"

// The reward head's tests and the KV cache's, in this translation unit (llm.cu's kernels are
// defined once per program), on the GPU too, and before the coverage check below.
#include "test_infer.cpp"
#include "test_reward_head.cpp"

#ifdef XWIN_CUDA_EMULATION
// Last in the file, so it sees every launch above: which __global__ kernels of llm.cu ran.

// A step's host-to-device copies go through pinned staging buffers (upload_async): the emulation
// counts every cudaMemcpyAsync from pageable memory, and none may happen after the runners' init.
TEST_CASE("every host-to-device copy of a training or inference step is from pinned memory", "[kernels][pinned]") {
    LlamaConfig c{.dim = 64, .n_layers = 2, .n_heads = 8, .n_kv_heads = 2, .vocab_size = 40, .ffn_dim = 96, .max_seq_len = 64};
    const int B = 2, T = 24;
    std::vector<int> tokens(B * T), next(B);
    uint64_t rng = 5;
    for (int& t : tokens) t = (int)(rng_uniform(&rng) * 40) % 40;
    std::vector<uint8_t> mask(B * T, 1);
    std::vector<float> dlp(B * T, 0.01f), dsums(B, 0.5f), dscores(B, 1.0f);
    auto random_model = [&](Llama* m, int head_type) {
        LlamaConfig k = c;
        k.head_type = head_type;
        k.pad_id = 39;  // a reward model scores a batch's sequences at their last token that is not pad
        llama_init(m, k);
        for (size_t i = 0; i < m->num_params; i++) m->params_memory[i] = 0.05f * rng_normal(&rng);
    };
    Runner policy, reward;
    random_model(&policy.host, HEAD_LM);
    random_model(&reward.host, HEAD_REWARD);
    runner_init(&policy, B, T, true);
    runner_init(&reward, B, T, true);
    InferRunner ir;
    infer_runner_of(&ir, &policy.host, B, T, T);
    unsigned long long before = emu_pageable_async_h2d();
    for (int step = 0; step < 2; step++) {  // twice: the staging buffers are refilled
        runner_nll_forward_backward(&policy, tokens.data(), mask.data(), B, T, (size_t)B * (T - 1));  // SFT
        runner_forward(&policy, tokens.data(), B, T);
        runner_backward(&policy, tokens.data(), dlp.data(), B, T);
        runner_sequence_logprobs(&policy, tokens.data(), mask.data(), B, T);  // DPO
        runner_sequence_backward(&policy, tokens.data(), dsums.data(), B, T);
        runner_clip_grad_norm(&policy, 1.0f);
        runner_update(&policy, AdamWConfig{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f});
        runner_synchronize(&policy);
        runner_score(&reward, tokens.data(), B, T);  // the reward model
        runner_score_backward(&reward, tokens.data(), dscores.data(), B, T);
        infer_runner_prefill(&ir, tokens.data(), T / 2);  // sampling and scoring
        for (int b = 0; b < B; b++) next[b] = tokens[b * T + T / 2];
        infer_runner_decode(&ir, next.data());
        infer_runner_sequence_logprobs(&ir, tokens.data(), mask.data(), B, T);
    }
    unsigned long long pageable = emu_pageable_async_h2d() - before;
    printf("pageable host-to-device async copies in two steps of every runner: %llu\n", pageable);
    CHECK(pageable == 0);
    // the count itself: one async copy from a std::vector is pageable
    float* d = nullptr;
    REQUIRE(cudaMalloc(&d, B * sizeof(float)) == cudaSuccess);
    REQUIRE(cudaMemcpyAsync(d, dsums.data(), B * sizeof(float), cudaMemcpyHostToDevice, stream) == cudaSuccess);
    CHECK(emu_pageable_async_h2d() - before == 1);
    cudaFree(d);
    infer_runner_free(&ir);
    runner_free(&policy);
    runner_free(&reward);
}

#endif

// On the CPU the emulation records every kernel it ran; on a GPU (make test-gpu builds with
// XWIN_COUNT_LAUNCHES) LAUNCH records every kernel it launched (cudaCheck after each launch makes
// a launch that failed an error, so launched is run).
#if defined(XWIN_CUDA_EMULATION) || defined(XWIN_COUNT_LAUNCHES)
TEST_CASE("every __global__ kernel of llm.cu was executed", "[kernels][coverage]") {
    std::ifstream f("llm.cu");
    std::stringstream ss;
    ss << f.rdbuf();
    std::string src = ss.str();
    std::set<std::string> defined;
    std::regex re("__global__\\s+void\\s+(\\w+)");
    for (auto it = std::sregex_iterator(src.begin(), src.end(), re); it != std::sregex_iterator(); ++it) defined.insert((*it)[1]);
    std::set<std::string> executed, missing;
#ifdef XWIN_CUDA_EMULATION
    std::set<std::string> names = emu_executed_kernels();
#else
    std::set<std::string> names = launched_kernels();
#endif
    for (std::string name : names) {  // as LAUNCH names them: "kernel<D>" for a template, "(kernel<D, E>)" for one of two
        name = std::regex_replace(name, std::regex("^\\(|\\)$|<.*>$"), "");
        executed.insert(name);
    }
    size_t ran = 0;
    for (const std::string& k : defined) {
        if (executed.count(k)) ran++;
        else missing.insert(k);
    }
    printf("executed %zu of the %zu __global__ kernels llm.cu defines\n", ran, defined.size());
    for (const std::string& k : missing) printf("  not executed: %s\n", k.c_str());
    CHECK(defined.size() >= 20);
    CHECK(missing.empty());
}
#endif
