// The reward head (transformers' LlamaForSequenceClassification, one label, no bias) through
// the whole core. Built into the CPU test binary (the CPU reference through the Runner) and
// into both emulated kernel binaries (the CUDA kernels and the GPU model through the Runner),
// so the same fixture checks run against every build. The fixtures (dev/make_fixtures.py,
// reward_*) hold float64 scores and the gradient of every parameter of
// sum_b dscores[b] * score[b] for a batch of token rows, one of them right-padded around a
// pad token inside it.
#include <catch2/catch.hpp>

#include <random>

#include "fixture.h"

// the reward model's objective lives in its program (train_rm.cu), read here without its main;
// the program's other functions go unused in this file
#define TESTING
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../train_rm.cu"
#pragma GCC diagnostic pop

// Tolerances of the whole-model comparison with the float64 reference (||ours - ref|| / ||ref||).
// float32 (the CPU reference and the FP32 kernels): the scores come out of ~20 ops, each
// rounding at 6e-8, so they agree to ~1e-6 and 1e-5 is a margin of ten; a gradient adds the
// backward's ~40 ops, 1e-4 leaves ~100 roundings of headroom while a wrong term gives errors
// near 1 (as the language-model parity tests argue).
// BF16 kernels: every activation is rounded to 8 bits of mantissa (2e-3 relative each), and
// the gradients land ~3e-2 off as in the language-model fixtures (tolerance 1e-1 as there).
// A score is one dot product over C = 64 channels whose terms cancel, so it keeps the
// absolute error of the terms rather than their relative one: observed 1.3e-2 (reward_mha)
// and 5.4e-2 (reward_gqa_padded, whose middle score, -0.34, is a quarter of the others);
// 1e-1 as for the gradients. A wrong scored position or a missing term gives errors near 1.
#if defined(XWIN_CUDA) && !defined(ENABLE_FP32)
static const double TOL_SCORES = 1e-1, TOL_GRADS = 1e-1;
#else
static const double TOL_SCORES = 1e-5, TOL_GRADS = 1e-4;
#endif

TEST_CASE("reward_score_index finds the rightmost token that is not padding, as transformers does", "[reward]") {
    const int P = 9;  // pad id
    int tokens[4 * 5] = {1, 2, 3, 4, 5,   // no padding: the last position
                         1, 2, P, P, P,   // right-padded
                         1, P, 3, P, P,   // a pad inside: skipped, the rightmost non-pad wins
                         P, P, P, P, P};  // all padding: position 0 (argmax of zeros)
    int idx[4];
    reward_score_index(idx, tokens, 4, 5, P);
    CHECK(idx[0] == 4);
    CHECK(idx[1] == 1);
    CHECK(idx[2] == 2);
    CHECK(idx[3] == 0);
}

TEST_CASE("the model header carries the pad, bos and eos ids; a version-1 header has none", "[reward][format]") {
    LlamaConfig c{.dim = 64, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 300, .ffn_dim = 128, .max_seq_len = 64, .head_type = HEAD_REWARD, .pad_id = 258, .bos_id = 256, .eos_id = 257};
    unsigned char h[MODEL_HEADER_BYTES];
    model_header_write(h, c, DTYPE_FP32);
    LlamaConfig back;
    int dtype;
    REQUIRE(model_header_parse(h, &back, &dtype) == "");
    CHECK(back.pad_id == 258);
    CHECK(back.bos_id == 256);
    CHECK(back.eos_id == 257);
    uint32_t version = 1;  // the same header as version 1 (its bytes 64.. zero): no ids
    memcpy(h + 4, &version, 4);
    memset(h + 64, 0, 12);
    REQUIRE(model_header_parse(h, &back, &dtype) == "");
    CHECK(back.pad_id == -1);
    CHECK(back.bos_id == -1);
    CHECK(back.eos_id == -1);
    model_header_write(h, c, DTYPE_FP32);
    int32_t bad = 300;  // = vocab_size
    memcpy(h + 64, &bad, 4);
    CHECK(model_header_parse(h, &back, &dtype) == "pad_token_id 300 is not -1 (none) or an id below vocab_size 300");
}

// In double: L = sum_b g[b] * score[b]; d/dh and d/dw against central differences.
TEST_CASE("reward head backward matches finite differences", "[reward][fd]") {
    const size_t B = 3, T = 4, C = 5;
    std::mt19937 rng(3);
    std::normal_distribution<double> dist(0.0, 1.0);
    std::vector<double> h(B * T * C), w(C), g(B);
    for (double& x : h) x = dist(rng);
    for (double& x : w) x = dist(rng);
    for (double& x : g) x = dist(rng);
    int idx[B] = {3, 0, 2};
    auto loss = [&] {
        double scores[B], l = 0;
        reward_head_forward(scores, h.data(), w.data(), idx, B, T, C);
        for (size_t b = 0; b < B; b++) l += g[b] * scores[b];
        return l;
    };
    std::vector<double> dh(B * T * C, 0.5), dw(C, 0.25);  // accumulates: starts from nonzero values
    reward_head_backward(dh.data(), dw.data(), g.data(), h.data(), w.data(), idx, B, T, C);
    const double step = 1e-5;
    for (std::vector<double>* x : {&h, &w}) {
        std::vector<double>& grad = x == &h ? dh : dw;
        double base = x == &h ? 0.5 : 0.25;
        for (size_t i = 0; i < x->size(); i++) {
            INFO((x == &h ? "dh " : "dw ") << i);
            CHECK(grad[i] - base == Approx(central_difference(x->data(), i, step, loss)).margin(1e-8));
        }
    }
}

TEST_CASE("a reward model allocates no (B, T, V) logits, activations or gradients", "[reward]") {
    LlamaConfig lm{.dim = 64, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 1000, .ffn_dim = 128, .max_seq_len = 64}, rm = lm;
    rm.head_type = HEAD_REWARD;
    size_t B = 3, T = 16, a_lm[NUM_ACT_TENSORS], a_rm[NUM_ACT_TENSORS];
    act_sizes(lm, B, T, a_lm);
    act_sizes(rm, B, T, a_rm);
    CHECK(a_lm[16] == B * T * 1000);
    CHECK(a_rm[16] == 0);  // logits
    CHECK(a_rm[19] == B);  // scores
    GradActTensors g_lm, g_rm;
    size_t bytes_lm = point_grad_activations(&g_lm, nullptr, lm, B, T), bytes_rm = point_grad_activations(&g_rm, nullptr, rm, B, T);
    CHECK(bytes_lm - bytes_rm >= B * T * 1000 * sizeof(float));  // the d(logits) buffer is gone
    CHECK(bytes_rm < B * T * 1000 * sizeof(float));
}

// The fixture's model through the Runner of this build: the scores, then the gradient of
// every parameter of sum_b dscores[b] * score[b].
static void run_reward_parity(const std::string& name) {
    std::string dir = "test/fixtures/" + name + "/";
    Runner r;
    llama_load(&r.host, (dir + "model.bin").c_str());
    REQUIRE(r.host.config.head_type == HEAD_REWARD);
    TokenData data;
    tokens_load(&data, (dir + "tokens.tok").c_str(), r.host.config.vocab_size);
    auto e = fixture_load(dir + "expect.bin");
    int B = (int)data.n_seqs, T = (int)token_seq_len(data, 0);
    CHECK(r.host.config.pad_id == (int)e["pad_id"].data[0]);  // from config.json's pad_token_id
    std::vector<int> tokens(B * T);
    std::vector<uint8_t> mask(B * T);
    tokens_fill_batch(data, 0, B, T, tokens.data(), mask.data());
    runner_init(&r, B, T, true);
    runner_zero_grad(&r);
    const float* scores = runner_score(&r, tokens.data(), B, T);
    for (int b = 0; b < B; b++) CHECK(r.score_idx[b] == (int)e["score_idx"].data[b]);
    double err = relative_error(scores, e["scores"].data.data(), B);
    printf("reward parity %s on %s: scores rel err %.2e (tolerance %.0e)\n", name.c_str(), runner_device(), err, TOL_SCORES);
    CHECK(err < TOL_SCORES);
    runner_score_backward(&r, tokens.data(), e["dscores"].data.data(), B, T);
    std::vector<float> grads = runner_gradients(&r);
    size_t sizes[NUM_PARAM_TENSORS], offset = 0;
    param_sizes(r.host.config, sizes);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        if (sizes[i] == 0) continue;
        std::string key = std::string("grad.") + PARAM_NAMES[i];
        REQUIRE(e[key].data.size() == sizes[i]);
        double gerr = relative_error(grads.data() + offset, e[key].data.data(), sizes[i]);
        printf("  %-20s rel err %.2e\n", key.c_str(), gerr);
        INFO(key << " relative error " << gerr << " (tolerance " << TOL_GRADS << ")");
        CHECK(gerr < TOL_GRADS);
        offset += sizes[i];
    }
    runner_free(&r);
}

// A frozen reward model on the inference runner (sample.cu's scorer): a prefill that ends at
// each sequence's scored token gives transformers' scores to the training Runner's tolerance,
// with no training state allocated.
static void run_reward_inference_parity(const std::string& name) {
    std::string dir = "test/fixtures/" + name + "/";
    InferRunner r;
    llama_load(&r.host, (dir + "model.bin").c_str());
    TokenData data;
    tokens_load(&data, (dir + "tokens.tok").c_str(), r.host.config.vocab_size);
    auto e = fixture_load(dir + "expect.bin");
    int B = (int)data.n_seqs, T = (int)token_seq_len(data, 0);
    std::vector<int> tokens(B * T);
    std::vector<uint8_t> mask(B * T);
    tokens_fill_batch(data, 0, B, T, tokens.data(), mask.data());
    infer_runner_init(&r, B, T, T);
    CHECK(r.host.grads_memory == nullptr);
    CHECK(r.host.m_memory == nullptr);
    CHECK(r.host.acts_memory == nullptr);
    const float* scores = infer_runner_score(&r, tokens.data(), B, T);
    double err = relative_error(scores, e["scores"].data.data(), B);
    printf("reward scores on the inference runner, %s on %s: rel err %.2e (tolerance %.0e)\n", name.c_str(), runner_device(), err, TOL_SCORES);
    CHECK(err < TOL_SCORES);
    infer_runner_free(&r);
}

TEST_CASE("reward model: scores and every gradient match transformers (multi-head)", "[reward][parity]") { run_reward_parity("reward_mha"); }
TEST_CASE("a frozen reward model on the inference runner scores as transformers", "[reward][parity][infer]") {
    run_reward_inference_parity("reward_mha");
    run_reward_inference_parity("reward_gqa_padded");
}
TEST_CASE("reward model: scores and every gradient match transformers (grouped-query, right-padded)", "[reward][parity]") {
    run_reward_parity("reward_gqa_padded");
}

TEST_CASE("the reward-model loss on hand-worked values and finite differences", "[reward][loss]") {
    float rc[2] = {1.0f, -0.5f}, rr[2] = {0.0f, 0.25f}, m[2] = {0.0f, 0.5f}, drc[2], drr[2];
    // one pair, no margin, no centring: log(1 + e^-1) and d/dr_c = -sigmoid(-1)
    double loss = reward_pair_loss({rc, rr, nullptr, 1}, 1, 0.0f, drc, drr);
    CHECK(loss == Approx(0.31326168751822286).epsilon(1e-12));
    CHECK(drc[0] == Approx(-0.2689414213699951).epsilon(1e-6));
    CHECK(drr[0] == Approx(0.2689414213699951).epsilon(1e-6));
    // two pairs with margins and centring, split over two "micro-batches" of a step of 2
    const float center = 0.1f;
    double total = reward_pair_loss({rc, rr, m, 1}, 2, center, drc, drr) + reward_pair_loss({rc + 1, rr + 1, m + 1, 1}, 2, center, drc + 1, drr + 1);
    // by hand: pair 0: d = 1, nll 0.3132617, (1 + 0)^2 = 1; pair 1: d = -0.5 - 0.25 - 0.5 = -1.25,
    // nll = log(1 + e^1.25) = 1.5019291, (-0.25)^2 = 0.0625; mean of each over 2 pairs
    CHECK(total == Approx((0.31326168751822286 + 1.501929081345373) / 2 + 0.1 * (1.0 + 0.0625) / 2).epsilon(1e-6));
    auto L = [&](const float* a, const float* b) {
        float da[2], db[2];
        return reward_pair_loss({a, b, m, 2}, 2, center, da, db);
    };
    for (int i = 0; i < 2; i++) {
        for (int side = 0; side < 2; side++) {
            float a[2] = {rc[0], rc[1]}, b[2] = {rr[0], rr[1]};
            float* x = side == 0 ? a : b;
            // float inputs: a large step, the loss is smooth (its third derivative is small)
            double numeric = central_difference(x, i, 1e-2, [&] { return L(a, b); });
            CHECK((side == 0 ? drc[i] : drr[i]) == Approx(numeric).margin(1e-4));
        }
    }
}

TEST_CASE("Spearman's correlation on hand-worked values, ties included", "[reward][loss]") {
    CHECK(spearman({1, 2, 3, 4}, {1, 3, 2, 4}) == Approx(0.8));            // 1 - 6 * 2 / (4 * 15)
    CHECK(spearman({1, 1, 2}, {1, 2, 3}) == Approx(1.5 / std::sqrt(3.0)));  // ranks 1.5, 1.5, 3
    CHECK(spearman({3, 2, 1}, {1, 2, 3}) == Approx(-1.0));
    CHECK(spearman({5, 5, 5}, {1, 2, 3}) == 0.0);  // no spread
}

// One reward-model step as TRL takes it (dev/make_fixtures.py, reward_step): the loss with
// margins and centring over two pairs (rows 2i chosen, 2i + 1 rejected), the backward from
// the scores, clipping, AdamW; the parameters after it against torch's in float64.
TEST_CASE("one reward-model step (margin, centring, clipping, AdamW) matches torch", "[reward][parity]") {
    std::string dir = "test/fixtures/reward_step/";
    Runner r;
    llama_load(&r.host, (dir + "model.bin").c_str());
    TokenData data;
    tokens_load(&data, (dir + "tokens.tok").c_str(), r.host.config.vocab_size);
    auto e = fixture_load(dir + "expect.bin");
    int B = (int)data.n_seqs, T = (int)token_seq_len(data, 0), P = B / 2;
    std::vector<int> tokens(B * T);
    std::vector<uint8_t> mask(B * T);
    tokens_fill_batch(data, 0, B, T, tokens.data(), mask.data());
    runner_init(&r, B, T, true);
    runner_zero_grad(&r);
    const float* s = runner_score(&r, tokens.data(), B, T);
    std::vector<float> rc(P), rr(P), drc(P), drr(P), dscores(B);
    for (int i = 0; i < P; i++) rc[i] = s[2 * i], rr[i] = s[2 * i + 1];
    double loss = reward_pair_loss({rc.data(), rr.data(), e["step_margins"].data.data(), (size_t)P}, P, e["step_center"].data[0], drc.data(), drr.data());
    CHECK(loss == Approx(e["step_loss"].data[0]).epsilon(TOL_SCORES));
    for (int i = 0; i < P; i++) dscores[2 * i] = drc[i], dscores[2 * i + 1] = drr[i];
    runner_score_backward(&r, tokens.data(), dscores.data(), B, T);
    const float* hp = e["adamw"].data.data();
    float norm = runner_clip_grad_norm(&r, hp[5]);
    CHECK(norm == Approx(e["step_grad_norm"].data[0]).epsilon(TOL_SCORES));
    runner_update(&r, AdamWConfig{hp[0], hp[1], hp[2], hp[3], hp[4]});
    runner_download_params(&r);
    size_t sizes[NUM_PARAM_TENSORS], offset = 0;
    param_sizes(r.host.config, sizes);
    // Adam's first step moves each weight by about lr: float32 lands ~1e-6 from float64 (1e-4
    // as the language-model parity argues); BF16 compute rounds the gradients, 5e-2 as there
#if defined(XWIN_CUDA) && !defined(ENABLE_FP32)
    const double tol = 5e-2;
#else
    const double tol = 1e-4;
#endif
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        if (sizes[i] == 0) continue;
        std::string key = std::string("param1.") + PARAM_NAMES[i];
        double err = relative_error(r.host.params_memory + offset, e[key].data.data(), sizes[i]);
        INFO(key << " relative error " << err);
        CHECK(err < tol);
        offset += sizes[i];
    }
    runner_free(&r);
}

#ifdef XWIN_CUDA
// The two kernels against their CPU twin on sizes that fill no block evenly: B = 5 sequences
// (a block holds 4 warps), C = 70 channels (not a multiple of 32 or of 256).
TEST_CASE("reward head kernels match the CPU", "[reward][kernels]") {
    const int B = 5, T = 7, C = 70;
    std::mt19937 rng(11);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    auto rounded = [](std::vector<float> v) {  // the values floatX holds, so the twin sees the kernel's inputs
        for (float& x : v) x = to_float(from_float<floatX>(x));
        return v;
    };
    auto randoms = [&](size_t n) {
        std::vector<float> v(n);
        for (float& x : v) x = dist(rng);
        return rounded(v);
    };
    std::vector<float> h = randoms((size_t)B * T * C), w = randoms(C), dscores = randoms(B), dh0 = randoms((size_t)B * T * C), dw0 = randoms(C);
    std::vector<int> idx = {6, 0, 3, 6, 2};
    auto upload_x = [](const std::vector<float>& v) {
        std::vector<floatX> x(v.size());
        for (size_t i = 0; i < v.size(); i++) x[i] = from_float<floatX>(v[i]);
        floatX* d = cuda_alloc<floatX>(v.size());
        cudaCheck(cudaMemcpy(d, x.data(), x.size() * sizeof(floatX), cudaMemcpyHostToDevice));
        return d;
    };
    auto upload_f = [](const std::vector<float>& v) {
        float* d = cuda_alloc<float>(v.size());
        cudaCheck(cudaMemcpy(d, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
        return d;
    };
    floatX *d_h = upload_x(h), *d_w = upload_x(w), *d_dh = upload_x(dh0);
    float *d_dscores = upload_f(dscores), *d_dw = upload_f(dw0), *d_scores = cuda_alloc<float>(B);
    int* d_idx = cuda_alloc<int>(B);
    cudaCheck(cudaMemcpy(d_idx, idx.data(), B * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemset(d_scores, 0xff, B * sizeof(float)));  // NaN: an unwritten score fails
    reward_head_forward_cuda(d_scores, d_h, d_w, d_idx, B, T, C, 0);
    reward_head_backward_cuda(d_dh, d_dw, d_dscores, d_h, d_w, d_idx, B, T, C, 0);
    std::vector<float> scores(B), dw(C), ref_scores(B), ref_dh = dh0, ref_dw = dw0;
    std::vector<floatX> dh_x((size_t)B * T * C);
    cudaCheck(cudaMemcpy(scores.data(), d_scores, B * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(dw.data(), d_dw, C * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(dh_x.data(), d_dh, dh_x.size() * sizeof(floatX), cudaMemcpyDeviceToHost));
    std::vector<float> dh(dh_x.size());
    for (size_t i = 0; i < dh.size(); i++) dh[i] = to_float(dh_x[i]);
    reward_head_forward(ref_scores.data(), h.data(), w.data(), idx.data(), B, T, C);
    reward_head_backward(ref_dh.data(), ref_dw.data(), dscores.data(), h.data(), w.data(), idx.data(), B, T, C);
    // FP32: a reordered sum (1e-5, as the other kernel tests); BF16: dh is stored in bfloat16
    // (2^-9 relative rounding per element), scores and dw stay FP32 (1e-2 as the other kernels)
#ifdef ENABLE_FP32
    const double tol = 1e-5;
#else
    const double tol = 1e-2;
#endif
    CHECK(relative_error(scores.data(), ref_scores.data(), B) < tol);
    CHECK(relative_error(dh.data(), ref_dh.data(), dh.size()) < tol);
    CHECK(relative_error(dw.data(), ref_dw.data(), C) < tol);
    for (void* p : std::initializer_list<void*>{d_h, d_w, d_dh, d_dscores, d_dw, d_scores, d_idx}) cudaCheck(cudaFree(p));
}
#endif
