// Finite-difference checks of every op's backward in llm.cu, in double precision.
// For each op: random inputs, a random upstream gradient G, the scalar L = sum(out * G);
// the analytic gradient from the op's backward is compared with central differences
// (L(x + h) - L(x - h)) / 2h. In double with h = 1e-5 the difference quotient is exact to
// about 1e-9 relative (truncation h^2 ~ 1e-10, rounding 1e-16 / h ~ 1e-11), so a tolerance
// of 1e-7 relative to the largest gradient entry catches any real mistake.
#include <catch2/catch.hpp>

#include <functional>
#include <random>

#include "fixture.h"

using Vec = std::vector<double>;

static Vec random_vec(size_t n, std::mt19937& rng, double scale = 1.0) {
    std::normal_distribution<double> dist(0.0, scale);
    Vec v(n);
    for (auto& x : v) x = dist(rng);
    return v;
}

static double dot(const Vec& a, const Vec& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++) s += a[i] * b[i];
    return s;
}

// Compares analytic with the central difference of loss() over every element of x. The step
// h is 1e-5 for inputs of order 1; inputs of order s take h = 1e-5 * s (the same relative step).
static void check_gradient(const char* what, Vec& x, const Vec& analytic, const std::function<double()>& loss, double h = 1e-5) {
    double max_err = 0, max_grad = 1e-12;
    for (size_t i = 0; i < x.size(); i++) {
        double numeric = central_difference(x.data(), i, h, loss);
        max_err = std::max(max_err, std::fabs(numeric - analytic[i]));
        max_grad = std::max(max_grad, std::fabs(numeric));
    }
    INFO(what << ": max |analytic - numeric| = " << max_err << ", max |grad| = " << max_grad);
    CHECK(max_err / max_grad < 1e-7);
}

TEST_CASE("embedding backward matches finite differences", "[ops][fd]") {
    std::mt19937 rng(1);
    size_t N = 7, C = 5, V = 6;
    std::vector<int> tokens = {0, 3, 3, 5, 1, 3, 0};  // repeated tokens accumulate
    Vec wte = random_vec(V * C, rng), G = random_vec(N * C, rng), out(N * C), dwte(V * C, 0.0);
    embedding_backward(dwte.data(), G.data(), tokens.data(), N, C);
    check_gradient("dwte", wte, dwte, [&] { embedding_forward(out.data(), tokens.data(), wte.data(), N, C); return dot(out, G); });
}

// Inputs of order 1 (eps hardly matters) and of order 1e-3 (mean square 1e-6 < eps = 1e-5,
// so eps sets rstd); the step scales with the inputs (h = 1e-8 for 1e-3: truncation
// (h / 3e-3)^2 ~ 1e-11, rounding 1e-16 * |L| / h ~ 1e-7 against gradients of order 300).
TEST_CASE("rmsnorm backward matches finite differences", "[ops][fd]") {
    for (double scale : {1.0, 1e-3}) {
        INFO("inputs of scale " << scale);
        std::mt19937 rng(2);
        size_t N = 5, C = 11;
        double eps = 1e-5;
        Vec x = random_vec(N * C, rng, scale), w = random_vec(C, rng), G = random_vec(N * C, rng), out(N * C), rstd(N);
        Vec dx(N * C, 0.0), dw(C, 0.0);
        rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, eps);
        rmsnorm_backward(dx.data(), dw.data(), G.data(), x.data(), w.data(), rstd.data(), N, C);
        auto loss = [&] { rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, eps); return dot(out, G); };
        check_gradient("dx", x, dx, loss, 1e-5 * scale);
        check_gradient("dweight", w, dw, loss);
    }
}

TEST_CASE("rmsnorm forward on hand-worked rows where eps matters", "[ops]") {
    // a row of C equal values a, weight 1: out = a / sqrt(a^2 + eps), rstd = 1 / sqrt(a^2 + eps)
    const size_t C = 6;
    const double eps = 1e-5;
    for (double a : {1e-3, 3e-3, 1.0}) {
        Vec x(C, a), w(C, 1.0), out(C), rstd(1);
        rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), 1, C, eps);
        CHECK(rstd[0] == Approx(1.0 / std::sqrt(a * a + eps)).epsilon(1e-12));
        for (size_t i = 0; i < C; i++) CHECK(out[i] == Approx(a / std::sqrt(a * a + eps)).epsilon(1e-12));
    }
    // 1e-3: mean square 1e-6, so rstd = 1 / sqrt(1.1e-5) = 301.51..., not 1 / 1e-3 = 1000
    Vec x(C, 1e-3), w(C, 1.0), out(C), rstd(1);
    rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), 1, C, eps);
    CHECK(rstd[0] == Approx(301.5113445777636).epsilon(1e-12));
}

TEST_CASE("matmul backward matches finite differences", "[ops][fd]") {
    std::mt19937 rng(3);
    size_t N = 6, C = 9, OC = 7;  // N not a multiple of the 4-row tile
    Vec x = random_vec(N * C, rng), w = random_vec(OC * C, rng), G = random_vec(N * OC, rng), out(N * OC);
    Vec dx(N * C, 0.0), dw(OC * C, 0.0);
    matmul_backward(dx.data(), dw.data(), G.data(), x.data(), w.data(), N, C, OC);
    auto loss = [&] { matmul_forward(out.data(), x.data(), w.data(), N, C, OC); return dot(out, G); };
    check_gradient("dinp", x, dx, loss);
    check_gradient("dweight", w, dw, loss);
}

TEST_CASE("matmul forward matches a plain triple loop", "[ops]") {
    std::mt19937 rng(4);
    for (size_t N : {1, 3, 4, 5, 13}) {
        size_t C = 10, OC = 3;
        Vec x = random_vec(N * C, rng), w = random_vec(OC * C, rng), out(N * OC);
        matmul_forward(out.data(), x.data(), w.data(), N, C, OC);
        for (size_t n = 0; n < N; n++)
            for (size_t o = 0; o < OC; o++) {
                double s = 0;
                for (size_t i = 0; i < C; i++) s += x[n * C + i] * w[o * C + i];
                CHECK(out[n * OC + o] == Approx(s).epsilon(1e-12));
            }
    }
}

// The fast float matmuls (matmul_blocked for 32 rows or more, matmul_tiles below) against
// matmul_plain, the spec: the same bits, for every operand layout (A or B read as a transpose),
// shapes off the 6 x 16 tiles and past one k-slice (256) and one column block (512), added to
// a random out (once with rows wider than P). In float and in the build's own rounding (fused
// where it targets FMA).
static std::vector<float> random_floats(size_t n, std::mt19937& rng) {
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::vector<float> v(n);
    for (auto& x : v) x = dist(rng);
    return v;
}

TEST_CASE("the fast float matmul equals the plain loops bit for bit", "[ops][matmul]") {
    std::mt19937 rng(11);
    for (size_t M : {1, 5, 31, 32, 53, 97}) {
        for (size_t K : {1, 7, 256, 300}) {
            for (size_t P : {3, 16, 17, 530}) {
                for (int layout = 0; layout < 4; layout++) {
                    bool a_t = layout & 1, b_t = layout & 2;  // A (M, K) stored as (K, M); B (K, P) as (P, K)
                    size_t sa = a_t ? 1 : K, sk = a_t ? M : 1, sbk = b_t ? 1 : P, sbj = b_t ? K : 1;
                    size_t ldo = P + (layout == 3 ? 5 : 0);  // out a block of a wider matrix
                    std::vector<float> A = random_floats(M * K, rng), B = random_floats(K * P, rng), fast = random_floats(M * ldo, rng);
                    std::vector<float> plain = fast;
                    matmul_accumulate(fast.data(), ldo, A.data(), sa, sk, B.data(), sbk, sbj, M, K, P);
                    matmul_plain(plain.data(), ldo, A.data(), sa, sk, B.data(), sbk, sbj, M, K, P);
                    INFO("M " << M << " K " << K << " P " << P << " ldo " << ldo << " A transposed " << a_t << " B transposed " << b_t);
                    CHECK(memcmp(fast.data(), plain.data(), fast.size() * sizeof(float)) == 0);
                }
            }
        }
    }
    {  // past one packed chunk of B (MATMUL_PACKED_B_MAX floats: 2048 columns of K = 2048)
        size_t M = 33, K = 2048, P = 2070;
        std::vector<float> A = random_floats(M * K, rng), B = random_floats(K * P, rng), fast = random_floats(M * P, rng);
        std::vector<float> plain = fast;
        matmul_accumulate(fast.data(), P, A.data(), K, 1, B.data(), 1, K, M, K, P);
        matmul_plain(plain.data(), P, A.data(), K, 1, B.data(), 1, K, M, K, P);
        CHECK(memcmp(fast.data(), plain.data(), fast.size() * sizeof(float)) == 0);
    }
    // the model's entry points: forward (the weight read as a transpose), backward's two
    size_t N = 70, C = 40, OC = 33;
    std::vector<float> x = random_floats(N * C, rng), w = random_floats(OC * C, rng), dout = random_floats(N * OC, rng);
    std::vector<float> out(N * OC), ref(N * OC, 0.0f), dx = random_floats(N * C, rng), dw = random_floats(OC * C, rng);
    std::vector<float> dx_ref = dx, dw_ref = dw;
    matmul_forward(out.data(), x.data(), w.data(), N, C, OC);
    matmul_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), N, C, OC);
    matmul_plain(ref.data(), OC, x.data(), C, 1, w.data(), 1, C, N, C, OC);
    matmul_plain(dx_ref.data(), C, dout.data(), OC, 1, w.data(), C, 1, N, OC, C);
    matmul_plain(dw_ref.data(), C, dout.data(), 1, OC, x.data(), C, 1, OC, N, C);
    CHECK(out == ref);
    CHECK(dx == dx_ref);
    CHECK(dw == dw_ref);
}

#ifdef _OPENMP
// Each output element is summed by one thread in a fixed order, so 1 and 2 threads give the same
// bits (the stage tables are reproducible on any core count).
TEST_CASE("the float matmul and attention give the same bits on 1 and 2 threads", "[ops][matmul]") {
    std::mt19937 rng(12);
    size_t M = 300, K = 520, P = 270;  // above PARALLEL_MIN_WORK: the threads split the rows
    std::vector<float> A = random_floats(M * K, rng), B = random_floats(K * P, rng), start = random_floats(M * P, rng);
    size_t Bn = 2, T = 40, H = 4, KV = 2, hd = 16;
    std::vector<float> q = random_floats(Bn * T * H * hd, rng), k = random_floats(Bn * T * KV * hd, rng), v = random_floats(k.size(), rng);
    std::vector<float> dout = random_floats(q.size(), rng);
    std::vector<float> results[2];
    int saved = omp_get_max_threads();
    for (int threads : {1, 2}) {
        omp_set_num_threads(threads);
        std::vector<float> out = start, att(Bn * H * T * T), o(q.size()), dq(q.size(), 0.0f), dk(k.size(), 0.0f), dv(v.size(), 0.0f);
        matmul_accumulate(out.data(), P, A.data(), K, 1, B.data(), P, 1, M, K, P);
        matmul_accumulate(out.data(), P, A.data(), K, 1, B.data(), P, 1, M, K, P);  // and again on top
        attention_forward(o.data(), att.data(), q.data(), k.data(), v.data(), Bn, T, H, KV, hd);
        attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(), Bn, T, H, KV, hd);
        for (auto* part : {&out, &o, &dq, &dk, &dv}) results[threads - 1].insert(results[threads - 1].end(), part->begin(), part->end());
    }
    omp_set_num_threads(saved);
    REQUIRE(results[0].size() == results[1].size());
    CHECK(memcmp(results[0].data(), results[1].data(), results[0].size() * sizeof(float)) == 0);
}
#endif

// attention in float (per-head matmuls) against its plain loops: the same bits, forward and
// backward, for one and several query heads per kv head and lengths off the tiles
TEST_CASE("attention in float equals its plain loops bit for bit", "[ops][attention]") {
    std::mt19937 rng(13);
    struct Shape { size_t B, T, H, KV, hd; };
    for (Shape s : {Shape{1, 1, 1, 1, 4}, Shape{2, 5, 2, 1, 3}, Shape{2, 33, 4, 2, 8}, Shape{1, 70, 3, 3, 16}}) {
        INFO("B " << s.B << " T " << s.T << " H " << s.H << " KV " << s.KV << " hd " << s.hd);
        size_t nq = s.B * s.T * s.H * s.hd, nk = s.B * s.T * s.KV * s.hd;
        std::vector<float> q = random_floats(nq, rng), k = random_floats(nk, rng), v = random_floats(nk, rng), dout = random_floats(nq, rng);
        std::vector<float> out(nq), out_ref(nq), att(s.B * s.H * s.T * s.T), att_ref(att.size());
        attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), s.B, s.T, s.H, s.KV, s.hd);
        attention_forward_plain(out_ref.data(), att_ref.data(), q.data(), k.data(), v.data(), s.B, s.T, s.H, s.KV, s.hd);
        CHECK(out == out_ref);
        CHECK(att == att_ref);
        std::vector<float> dq = random_floats(nq, rng), dk = random_floats(nk, rng), dv = random_floats(nk, rng);  // the backward adds
        std::vector<float> dq_ref = dq, dk_ref = dk, dv_ref = dv;
        attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(), s.B, s.T, s.H, s.KV, s.hd);
        attention_backward_plain(dq_ref.data(), dk_ref.data(), dv_ref.data(), dout.data(), att.data(), q.data(), k.data(), v.data(), s.B, s.T, s.H,
                                 s.KV, s.hd);
        CHECK(dq == dq_ref);
        CHECK(dk == dk_ref);
        CHECK(dv == dv_ref);
    }
}

TEST_CASE("rope backward matches finite differences and rotates as transformers does", "[ops][fd]") {
    for (double theta : {10000.0, 500000.0}) {  // the default and Llama 3's
        INFO("theta " << theta);
        std::mt19937 rng(5);
        size_t B = 2, T = 5, NH = 3;
        int hd = 6;
        Vec x = random_vec(B * T * NH * hd, rng), G = random_vec(x.size(), rng), out(x.size());
        std::vector<float> table = rope_table((int)T, hd, theta);
        Vec dx = G;  // the backward works in place on the gradient
        rope_backward(dx.data(), table.data(), B, T, NH, hd);
        check_gradient("dx", x, dx, [&] { out = x; rope_forward(out.data(), table.data(), B, T, NH, hd); return dot(out, G); });
    }
    double theta = 10000.0;
    // hand-worked: position 1, pair 0 of a head of size 2 rotates by exactly 1 radian
    Vec v = {1.0, 0.0, 1.0, 0.0};  // (B=1, T=2, NH=1, hd=2)
    rope_forward(v.data(), rope_table(2, 2, theta).data(), 1, 2, 1, 2);
    CHECK(v[0] == 1.0);
    CHECK(v[1] == 0.0);
    CHECK(v[2] == Approx(std::cos(1.0)).epsilon(1e-7));
    CHECK(v[3] == Approx(std::sin(1.0)).epsilon(1e-7));
    // hand-worked, theta 500000: position 3, pair 1 of a head of size 4 (the pair (x[1], x[3]))
    // rotates by 3 / 500000^(2/4) = 3 / sqrt(500000) = 4.2426e-3 radians (1.5e-2 at theta
    // 10000); pair 0 by 3 radians. The backward rotates by minus that angle.
    const double a = 3.0 / std::sqrt(500000.0);
    for (int direction : {+1, -1}) {
        INFO("direction " << direction);
        Vec w(4 * 4, 0.0);  // (B=1, T=4, NH=1, hd=4)
        w[3 * 4 + 0] = 1.0;
        w[3 * 4 + 1] = 2.0;
        std::vector<float> table = rope_table(4, 4, 500000.0);
        if (direction > 0) rope_forward(w.data(), table.data(), 1, 4, 1, 4);
        else rope_backward(w.data(), table.data(), 1, 4, 1, 4);
        CHECK(w[3 * 4 + 0] == Approx(std::cos(3.0)).epsilon(1e-6));
        CHECK(w[3 * 4 + 2] == Approx(direction * std::sin(3.0)).epsilon(1e-6));
        CHECK(w[3 * 4 + 1] == Approx(2.0 * std::cos(a)).epsilon(1e-6));
        CHECK(w[3 * 4 + 3] == Approx(direction * 2.0 * std::sin(a)).epsilon(1e-6));
    }
}

TEST_CASE("attention backward matches finite differences (multi-head and grouped-query)", "[ops][fd]") {
    for (size_t KV : {3, 1}) {
        std::mt19937 rng(6 + (unsigned)KV);
        size_t B = 2, T = 5, H = 3, hd = 4;
        Vec q = random_vec(B * T * H * hd, rng), k = random_vec(B * T * KV * hd, rng), v = random_vec(B * T * KV * hd, rng);
        Vec G = random_vec(B * T * H * hd, rng), out(q.size()), att(B * H * T * T);
        Vec dq(q.size(), 0.0), dk(k.size(), 0.0), dv(v.size(), 0.0);
        attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, KV, hd);
        attention_backward(dq.data(), dk.data(), dv.data(), G.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, KV, hd);
        auto loss = [&] { attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, KV, hd); return dot(out, G); };
        check_gradient("dq", q, dq, loss);
        check_gradient("dk", k, dk, loss);
        check_gradient("dv", v, dv, loss);
        // causality: the first position attends only to itself, so its output is v[0]
        for (size_t i = 0; i < hd; i++) CHECK(out[i] == Approx(v[i]).epsilon(1e-12));
    }
}

TEST_CASE("swiglu backward matches finite differences", "[ops][fd]") {
    std::mt19937 rng(8);
    size_t n = 17;
    Vec g = random_vec(n, rng, 2.0), u = random_vec(n, rng), G = random_vec(n, rng), out(n), dg(n, 7.0), du(n, -7.0);
    swiglu_backward(dg.data(), du.data(), G.data(), g.data(), u.data(), n);  // writes (=): what was there must not count
    auto loss = [&] { swiglu_forward(out.data(), g.data(), u.data(), n); return dot(out, G); };
    check_gradient("dgate", g, dg, loss);
    check_gradient("dup", u, du, loss);
}

TEST_CASE("logprob backward matches finite differences", "[ops][fd]") {
    std::mt19937 rng(9);
    size_t B = 2, T = 4, V = 7;
    std::vector<int> tokens = {1, 6, 0, 2, 3, 3, 5, 4};
    Vec z = random_vec(B * T * V, rng, 2.0), G = random_vec(B * T, rng), lp(B * T), dz(z.size());
    logprob_backward(dz.data(), z.data(), tokens.data(), G.data(), B, T, V);
    check_gradient("dlogits", z, dz, [&] { logprob_forward(lp.data(), z.data(), tokens.data(), B, T, V); G[0] = G[T] = 0; return dot(lp, G); });
    // hand-worked: uniform logits give log(1/V) for every target
    Vec flat(B * T * V, 0.5);
    logprob_forward(lp.data(), flat.data(), tokens.data(), B, T, V);
    CHECK(lp[0] == 0.0);
    CHECK(lp[1] == Approx(-std::log(7.0)).epsilon(1e-12));
}

TEST_CASE("masked mean loss and sequence sums on a hand-worked example", "[ops]") {
    // lp (B=2, T=3); targets: (0,1), (0,2), (1,2); position 0 never counts
    std::vector<double> lp = {0.0, -1.0, -2.0, 0.0, -4.0, -0.5};
    std::vector<uint8_t> mask = {1, 1, 1, 1, 0, 1};
    size_t count;
    CHECK(masked_mean_loss(lp.data(), mask.data(), 2, 3, &count) == Approx(3.5 / 3.0));
    CHECK(count == 3);
    double sums[2];
    sequence_logprob_sums(sums, lp.data(), mask.data(), 2, 3);
    CHECK(sums[0] == -3.0);
    CHECK(sums[1] == -0.5);
    std::vector<double> dlp(6);
    masked_mean_loss_backward(dlp.data(), mask.data(), 2, 3, count);
    std::vector<double> expected = {0, -1.0 / 3, -1.0 / 3, 0, 0, -1.0 / 3};
    for (int i = 0; i < 6; i++) CHECK(dlp[i] == Approx(expected[i]));
}

// The CPU norm sums 64 chunks [n c / 64, n (c + 1) / 64). n = 64 * 1000 + 37 is a multiple of
// no chunk count; values in [-1e-3, 1e-3] (mean square 3e-7, 0.02 in all) and 10 at the first
// and last value and at both ends of chunks 1 and 63, so dropping any of them moves the norm
// by over 10%. Against a plain sum in double.
TEST_CASE("clip_grad_norm sums every chunk, with large values at the ends (fixed data)", "[ops]") {
    const size_t n = 64 * 1000 + 37;
    std::mt19937 rng(11);
    std::uniform_int_distribution<int> dist(-1000, 1000);
    std::vector<float> g(n);
    for (float& v : g) v = (float)dist(rng) * 1e-6f;
    for (size_t i : {(size_t)0, n / 64 - 1, n / 64, n * 63 / 64 - 1, n * 63 / 64, n - 1}) g[i] = 10.0f;
    double ss = 0;
    for (float v : g) ss += (double)v * v;
    std::vector<float> c = g;
    float norm = clip_grad_norm(c.data(), n, (float)(std::sqrt(ss) / 4));
    CHECK(norm == Approx(std::sqrt(ss)).epsilon(1e-7));
    const double coef = std::sqrt(ss) / 4 / (norm + 1e-6);
    for (size_t i : {(size_t)0, (size_t)1, n / 2, n - 1}) CHECK(c[i] == Approx(g[i] * coef).epsilon(1e-6));
}

// ZeRO-2: two ranks each hold a part of the gradient, split inside a chunk (at per = ceil(n / 2)
// of the fixed data above, in chunk 31 or 32); each sums its part's share of every chunk and
// sum_ranks adds the other's. The norm is the whole gradient's to the double sums' rounding
// (1e-12; a chunk lost or counted twice moves it by over 1e-4), and each part is clipped by
// the whole's coefficient.
TEST_CASE("clip_grad_norm over two ranks' parts (ZeRO-2) is the whole gradient's", "[ops]") {
    const size_t n = 64 * 1000 + 37, per = (n + 1) / 2;
    std::mt19937 rng(12);
    std::uniform_int_distribution<int> dist(-1000, 1000);
    std::vector<float> g(n);
    for (float& v : g) v = (float)dist(rng) * 1e-3f;
    std::vector<float> whole = g, a(g.begin(), g.begin() + per), b(g.begin() + per, g.end());
    const float max_norm = 1.0f;  // the norm is about 10: every part is clipped
    float norm = clip_grad_norm(whole.data(), n, max_norm);
    std::vector<double> b_sums;  // rank 1's chunk sums, as the ranks' all-reduce hands them to rank 0
    float norm_b = clip_grad_norm(b.data(), n, max_norm, per, n, [&](double* sums, int k) {
        b_sums.assign(sums, sums + k);
        for (int i = 0; i < k; i++) sums[i] = 0;  // rank 0's part: filled in below
    });
    (void)norm_b;
    float norm_a = clip_grad_norm(a.data(), n, max_norm, 0, per, [&](double* sums, int k) {
        REQUIRE((int)b_sums.size() == k);
        for (int i = 0; i < k; i++) sums[i] += b_sums[i];
    });
    CHECK(norm_a == Approx(norm).epsilon(1e-12));
    CHECK(norm > 5.0f);
    CHECK(norm_a == norm);  // here to the bit
    for (size_t i : {(size_t)0, per - 1}) CHECK(a[i] == whole[i]);
}

TEST_CASE("clip_grad_norm and adamw on hand-worked values", "[ops]") {
    std::vector<float> g = {3.0f, 4.0f};  // norm 5
    float norm = clip_grad_norm(g.data(), 2, 1.0f);
    CHECK(norm == Approx(5.0f));
    CHECK(g[0] == Approx(0.6f).epsilon(1e-6));
    CHECK(g[1] == Approx(0.8f).epsilon(1e-6));
    std::vector<float> small = {0.3f, 0.4f};
    clip_grad_norm(small.data(), 2, 1.0f);  // norm 0.5 < 1: unchanged
    CHECK(small[0] == 0.3f);
    // one AdamW step: m = 0.1 g, v = 0.001 g^2, bias-corrected m/sqrt(v) = sign(g)
    std::vector<float> p = {1.0f, -2.0f}, grad = {0.5f, -0.25f}, m(2, 0.0f), v(2, 0.0f);
    AdamWConfig opt{0.1f, 0.9f, 0.999f, 0.0f, 0.0f};
    adamw_update(p.data(), grad.data(), m.data(), v.data(), 2, opt, 0.5f, 1);
    CHECK(p[0] == Approx(1.0f * (1 - 0.1f * 0.5f) - 0.1f).epsilon(1e-6));
    CHECK(p[1] == Approx(-2.0f * (1 - 0.1f * 0.5f) + 0.1f).epsilon(1e-6));
}
