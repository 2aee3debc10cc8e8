// DPO's ops: the per-sequence log-prob sums (CPU twin, CUDA kernels, the Runner's
// runner_sequence_logprobs / runner_sequence_backward) and the preference losses. Built into
// the CPU test binary (the CPU reference through the Runner) and #included by test_kernels.cpp
// into both emulated kernel binaries (the kernels and the GPU model through the Runner), so the
// loss checks and the one-step parity with torch run against every build. The fixtures
// (dev/make_fixtures.py): dpo_loss, the losses and their derivatives written in torch from
// TRL's definitions; dpo_step, one DPO step of a LlamaForCausalLM in float64.
#include <catch2/catch.hpp>

#include <random>

#include "fixture.h"

// DPO's objective lives in its program (train_dpo.cu), read here without its recipe and main;
// the program's other functions go unused in this file
#define TESTING
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../train_dpo.cu"
#pragma GCC diagnostic pop

// Tolerances of the one-step parity with the float64 fixture (||ours - ref|| / ||ref|| for
// tensors, relative for scalars), as the reward step's (test_reward_head.cpp) and the language-model
// parity's (test_kernels.cpp) argue them:
// float32 (CPU reference, FP32 kernels): a log-prob sum comes out of ~20 ops each rounding at
// 6e-8 and adds ~5 terms: ~1e-6, 1e-5 leaves a margin of ten; Adam's first step moves each
// weight by about lr, which float32 lands ~1e-6 from float64: 1e-4.
// BF16 kernels: every activation is rounded to 8 mantissa bits; the language-model parity's
// log-prob sums and loss are held to 5e-3 there, the same here; the parameters after a step to
// 5e-2 (gradients ~3e-2 off, an element whose gradient is under its error flips its step).
// The gradients before clipping: 1e-4 in float32 (a backward's ~40 more ops), 1e-1 in BF16,
// as the reward parity's and the language-model parity's gradients.
#if defined(XWIN_CUDA) && !defined(ENABLE_FP32)
static const double DPO_TOL_SUMS = 5e-3, DPO_TOL_GRADS = 1e-1, DPO_TOL_PARAMS = 5e-2;
#else
static const double DPO_TOL_SUMS = 1e-5, DPO_TOL_GRADS = 1e-4, DPO_TOL_PARAMS = 1e-4;
#endif


// lp (B = 2, T = 4) with targets (0, 1), (0, 3), (1, 2), (1, 3): position 0 never counts, even
// with mask 1 and a log-prob that is not 0, as masked_mean_loss reads them.
TEST_CASE("sequence log-prob sums and their backward on a hand-worked example", "[dpo]") {
    std::vector<float> lp = {-7.0f, -1.0f, -2.0f, -3.0f, 0.0f, -0.5f, -0.25f, -4.0f};
    std::vector<uint8_t> mask = {1, 1, 0, 1, 0, 0, 1, 1};
    float sums[2];
    sequence_logprob_forward(sums, lp.data(), mask.data(), 2, 4);
    CHECK(sums[0] == -4.0f);   // -1 - 3
    CHECK(sums[1] == -4.25f);  // -0.25 - 4
    float dsums[2] = {2.0f, -3.0f};
    std::vector<float> dlp(8, 9.0f);  // written, not added to
    sequence_logprob_backward(dlp.data(), dsums, mask.data(), 2, 4);
    CHECK(dlp == std::vector<float>{0, 2, 0, 2, 0, 0, -3, -3});
    // the same alignment as masked_mean_loss: its sum is minus the sums', its gradient the
    // backward's with dsums = -1 / count
    size_t count;
    double mean = masked_mean_loss(lp.data(), mask.data(), 2, 4, &count);
    CHECK(count == 4);
    CHECK(-mean * count == Approx(sums[0] + sums[1]));
    std::vector<float> dmean(8), dsum(8);
    float each[2] = {-0.25f, -0.25f};
    masked_mean_loss_backward(dmean.data(), mask.data(), 2, 4, count);
    sequence_logprob_backward(dsum.data(), each, mask.data(), 2, 4);
    CHECK(dmean == dsum);
}

// The losses against torch (dpo_loss fixture: the formulas written in torch, derivatives by
// autograd, in float64 on float32 inputs). Five pairs, a micro-batch's share of a step of 8
// pairs whose chosen responses hold 23 tokens more than these; the last pair's margin is ~1900,
// beta h up to ~950, where log(1 + e^x) overflows a double unless it is computed stably. The
// loss and derivatives are stored as float32 (6e-8 relative) and dpc, dpr are float32: 1e-6.
TEST_CASE("dpo_loss: sigmoid with and without label smoothing, IPO, the NLL term, against torch", "[dpo][loss]") {
    auto e = fixture_load("test/fixtures/dpo_loss/expect.bin");
    const std::vector<float>&pc = e["pc"].data, &pr = e["pr"].data, &rc = e["rc"].data, &rr = e["rr"].data, &nc = e["nc"].data,
          &nr = e["nr"].data;
    int n = (int)pc.size();
    REQUIRE(n == 5);
    size_t total_pairs = (size_t)e["totals"].data[0], total_tokens = (size_t)e["totals"].data[1];
    for (int k = 0; k < 4; k++) {
        std::string key = "case" + std::to_string(k);
        const float* c = e[key + ".config"].data.data();
        DPOConfig cfg;
        cfg.loss_type = (int)c[0];
        cfg.beta = c[1];
        cfg.label_smoothing = c[2];
        cfg.nll_weight = c[3];
        REQUIRE(dpo_config_check(cfg) == "");
        std::vector<float> dpc(n, NAN), dpr(n, NAN);
        double loss = dpo_loss(cfg, {pc.data(), pr.data(), rc.data(), rr.data(), nc.data(), nr.data(), n}, total_pairs, total_tokens, dpc.data(),
                               dpr.data());
        INFO(key << ": loss type " << cfg.loss_type << ", beta " << cfg.beta << ", label smoothing " << cfg.label_smoothing
                 << ", nll_weight " << cfg.nll_weight);
        CHECK(loss == Approx(e[key + ".loss"].data[0]).epsilon(1e-6));
        for (int i = 0; i < n; i++) {
            INFO("pair " << i);
            CHECK(dpc[i] == Approx(e[key + ".dpc"].data[i]).epsilon(1e-6).margin(1e-12));
            CHECK(dpr[i] == Approx(e[key + ".dpr"].data[i]).epsilon(1e-6).margin(1e-12));
        }
    }
}

// dpc and dpr against central differences of the returned loss, on the same inputs and
// settings. The step is 2^-7, a multiple of every input's float spacing (|x| < 2^16), so x +- h
// are exact and the quotient divides by the true 2h; its truncation error h^2 f''' / 6 is below
// 1e-6 for these betas (IPO is quadratic: none), rounding of the double loss ~1e-16 / h.
TEST_CASE("dpo_loss derivatives match central finite differences", "[dpo][loss][fd]") {
    auto e = fixture_load("test/fixtures/dpo_loss/expect.bin");
    std::vector<float> pc = e["pc"].data, pr = e["pr"].data;
    const std::vector<float>&rc = e["rc"].data, &rr = e["rr"].data, &nc = e["nc"].data, &nr = e["nr"].data;
    int n = (int)pc.size();
    size_t total_pairs = 8, total_tokens = 40;
    DPOConfig configs[4];
    configs[1].beta = 0.5f, configs[1].label_smoothing = 0.1f, configs[1].nll_weight = 0.25f;
    configs[2].loss_type = DPO_IPO;
    configs[3].loss_type = DPO_IPO, configs[3].beta = 0.3f, configs[3].nll_weight = 0.25f;
    const float h = 1.0f / 128;
    for (const DPOConfig& cfg : configs) {
        std::vector<float> dpc(n), dpr(n), scratch_c(n), scratch_r(n);
        DPOPairs pairs{pc.data(), pr.data(), rc.data(), rr.data(), nc.data(), nr.data(), n};  // reads pc and pr as they change below
        dpo_loss(cfg, pairs, total_pairs, total_tokens, dpc.data(), dpr.data());
        auto loss = [&] { return dpo_loss(cfg, pairs, total_pairs, total_tokens, scratch_c.data(), scratch_r.data()); };
        for (int i = 0; i < n; i++) {
            for (std::vector<float>* x : {&pc, &pr}) {
                double numeric = central_difference(x->data(), i, h, loss);
                INFO("loss type " << cfg.loss_type << ", beta " << cfg.beta << ", pair " << i << (x == &pc ? " dpc" : " dpr"));
                CHECK((x == &pc ? dpc[i] : dpr[i]) == Approx(numeric).epsilon(1e-5).margin(1e-7));
            }
        }
    }
}

TEST_CASE("dpo_config_check names each bad setting in one line", "[dpo][loss]") {
    DPOConfig ok;
    CHECK(dpo_config_check(ok) == "");
    DPOConfig c = ok;
    c.beta = 0.0f;
    CHECK(dpo_config_check(c) == "beta 0 must be > 0");
    c.beta = -0.5f;
    CHECK(dpo_config_check(c) == "beta -0.5 must be > 0");
    c.beta = NAN;
    CHECK(dpo_config_check(c) == "beta nan must be > 0");
    c = ok;
    c.label_smoothing = 0.5f;
    CHECK(dpo_config_check(c) == "label smoothing 0.5 must be in [0, 0.5)");
    c.label_smoothing = -0.1f;
    CHECK(dpo_config_check(c) == "label smoothing -0.1 must be in [0, 0.5)");
    c.label_smoothing = 0.2f;
    CHECK(dpo_config_check(c) == "");
    c.loss_type = DPO_IPO;
    CHECK(dpo_config_check(c) == "label smoothing 0.2 is for the sigmoid loss only; IPO takes none (set it to 0)");
    c.label_smoothing = 0.0f;
    CHECK(dpo_config_check(c) == "");
    c.nll_weight = -1.0f;
    CHECK(dpo_config_check(c) == "nll_weight -1 must be >= 0");
    c = ok;
    c.loss_type = 2;
    CHECK(dpo_config_check(c) == "loss type 2 is not 0 (sigmoid) or 1 (IPO)");
}

// By hand, beta 0.5: pair 0: chosen reward 0.5 (-3 - -4), rejected -0.5 (-5 - -4): right;
// pair 1: chosen -0.5 (-10 - -9), rejected 0.75 (-8 - -9.5): wrong; pair 2: both 0, a tie,
// not counted right. Added in two calls, as micro-batches.
TEST_CASE("dpo_metrics_add sums TRL's rewards, accuracies, margins and log-probs", "[dpo][loss]") {
    DPOConfig cfg;
    cfg.beta = 0.5f;
    float pc[3] = {-3, -10, -2}, pr[3] = {-5, -8, -2}, rc[3] = {-4, -9, -2}, rr[3] = {-4, -9.5f, -2};
    DPOMetrics m;
    float none[3] = {};  // token counts: the metrics do not read them
    dpo_metrics_add(&m, cfg, {pc, pr, rc, rr, none, none, 2});
    dpo_metrics_add(&m, cfg, {pc + 2, pr + 2, rc + 2, rr + 2, none, none, 1});
    CHECK(m.pairs == 3);
    CHECK(m.rewards_chosen == Approx(0.5 - 0.5 + 0.0));
    CHECK(m.rewards_rejected == Approx(-0.5 + 0.75 + 0.0));
    CHECK(m.accuracies == 1);
    CHECK(m.margins == Approx(1.0 - 1.25 + 0.0));
    CHECK(m.logps_chosen == Approx(-15.0));
    CHECK(m.logps_rejected == Approx(-15.0));
}

// One DPO step as TRL's DPOTrainer takes it (dev/make_fixtures.py, dpo_step): three right-padded
// pairs (rows 2i chosen, 2i + 1 rejected) whose mask covers the responses only; the reference
// (a second Runner, not training) is the initial model; sigmoid loss with label smoothing and
// the NLL term; taken here in two micro-batches (pairs 0-1, then pair 2) of the step's 3 pairs;
// then clipping and AdamW. The reference sums, the loss, the norm and the parameters after the
// step, the gradients before clipping among them, against torch's float64 step, on the Runner
// of this build.
TEST_CASE("one DPO step (sigmoid, label smoothing, NLL term, micro-batches, clipping, AdamW) matches torch", "[dpo][parity]") {
    std::string dir = "test/fixtures/dpo_step/";
    Runner policy, reference;
    llama_load(&policy.host, (dir + "model.bin").c_str());
    llama_load(&reference.host, (dir + "model.bin").c_str());
    TokenData data;
    tokens_load(&data, (dir + "tokens.tok").c_str(), policy.host.config.vocab_size);
    auto e = fixture_load(dir + "expect.bin");
    REQUIRE(data.n_seqs == 6);
    int T = 0;
    for (size_t i = 0; i < data.n_seqs; i++) T = std::max(T, (int)token_seq_len(data, i));
    const int P = 3, micro = 2;  // pairs in the step, at most per micro-batch
    DPOConfig cfg;
    cfg.beta = e["dpo"].data[0];
    cfg.label_smoothing = e["dpo"].data[1];
    cfg.nll_weight = e["dpo"].data[2];
    REQUIRE(dpo_config_check(cfg) == "");
    runner_init(&policy, 2 * micro, T, true);
    runner_init(&reference, 2 * micro, T, false);
    // the step's chosen target tokens (t >= 1, mask 1)
    size_t chosen_tokens = 0;
    for (int i = 0; i < P; i++) {
        for (uint64_t j = data.offsets[2 * i] + 1; j < data.offsets[2 * i + 1]; j++) chosen_tokens += data.mask[j];
    }
    runner_zero_grad(&policy);
    double loss = 0;
    for (int first = 0; first < P; first += micro) {
        int n = std::min(micro, P - first), B = 2 * n;
        std::vector<int> tokens(B * T);
        std::vector<uint8_t> mask(B * T);
        tokens_fill_batch(data, 2 * first, B, T, tokens.data(), mask.data());
        const float* rs = runner_sequence_logprobs(&reference, tokens.data(), mask.data(), B, T);
        for (int b = 0; b < B; b++) {
            INFO("reference sum of row " << 2 * first + b);
            CHECK(rs[b] == Approx(e["ref_sums"].data[2 * first + b]).epsilon(DPO_TOL_SUMS));
        }
        std::vector<float> rc(n), rr(n), pc(n), pr(n), nc(n, 0.0f), nr(n, 0.0f), dpc(n), dpr(n), dsums(B);
        for (int i = 0; i < n; i++) rc[i] = rs[2 * i], rr[i] = rs[2 * i + 1];
        const float* ps = runner_sequence_logprobs(&policy, tokens.data(), mask.data(), B, T);
        for (int i = 0; i < n; i++) pc[i] = ps[2 * i], pr[i] = ps[2 * i + 1];
        for (int b = 0; b < B; b++) {
            for (int t = 1; t < T; t++) (b % 2 ? nr : nc)[b / 2] += mask[b * T + t];
        }
        loss += dpo_loss(cfg, {pc.data(), pr.data(), rc.data(), rr.data(), nc.data(), nr.data(), n}, P, chosen_tokens, dpc.data(), dpr.data());
        for (int i = 0; i < n; i++) dsums[2 * i] = dpc[i], dsums[2 * i + 1] = dpr[i];
        runner_sequence_backward(&policy, tokens.data(), dsums.data(), B, T);
    }
    printf("dpo step on %s: loss %.8f (torch %.8f)\n", runner_device(), loss, e["loss"].data[0]);
    CHECK(loss == Approx(e["loss"].data[0]).epsilon(DPO_TOL_SUMS));
    // Adam's first step is about lr * sign(g): the gradients themselves carry their sizes
    std::vector<float> grads = runner_gradients(&policy);
    check_param_tensors(policy.host.config, grads.data(), e, "grad.", DPO_TOL_GRADS);
    const float* hp = e["adamw"].data.data();
    float norm = runner_clip_grad_norm(&policy, hp[5]);
    CHECK(norm == Approx(e["grad_norm"].data[0]).epsilon(DPO_TOL_SUMS * 10));  // as the language-model parity's norm
    runner_update(&policy, AdamWConfig{hp[0], hp[1], hp[2], hp[3], hp[4]});
    runner_download_params(&policy);
    check_param_tensors(policy.host.config, policy.host.params_memory, e, "param1.", DPO_TOL_PARAMS);
    runner_free(&policy);
    runner_free(&reference);
}

#ifdef XWIN_CUDA
// The two kernels against their CPU twins. Shapes: T = 300 (a thread of the 256-thread block
// takes two positions, others one; not a multiple of a warp) and T = 5 (most threads idle),
// B odd. lp is FP32 in both precisions, so FP32's tolerance holds for both: the block's tree
// adds the same terms in another order than the twin's double loop (~1e-7 observed), 1e-5.
// The backward copies values: exactly the twin's. The forward is the same bits on a second run.
// (upload, download, poison, random_floats, test_seed, check_close: test_kernels.cpp's.)
TEST_CASE("sequence log-prob kernels match the CPU twins", "[dpo][kernels]") {
    std::mt19937 rng(test_seed() + 41);
    for (int T : {300, 5}) {
        const int B = 5;
        size_t N = (size_t)B * T;
        std::vector<float> lp = random_floats(N, rng), dsums = random_floats(B, rng);
        for (float& x : lp) x = -std::fabs(x);
        std::vector<uint8_t> mask(N);
        for (uint8_t& m : mask) m = (uint8_t)(rng() % 3 != 0);
        mask[0] = 1;                              // position 0 with mask 1: never counted
        for (int t = 0; t < T; t++) mask[(size_t)3 * T + t] = 0;  // a sequence without targets: sum 0
        std::vector<float> ref_sums(B), ref_dlp(N);
        sequence_logprob_forward(ref_sums.data(), lp.data(), mask.data(), B, T);
        sequence_logprob_backward(ref_dlp.data(), dsums.data(), mask.data(), B, T);
        float *d_lp = upload(lp), *d_dsums = upload(dsums), *d_sums = cuda_alloc<float>(B), *d_dlp = cuda_alloc<float>(N);
        uint8_t* d_mask = upload(mask);
        poison(d_sums, B);
        poison(d_dlp, N);
        sequence_logprob_forward_cuda(d_sums, d_lp, d_mask, B, T, stream);
        sequence_logprob_backward_cuda(d_dlp, d_dsums, d_mask, B, T, stream);
        std::vector<float> sums = download(d_sums, B), dlp = download(d_dlp, N);
        INFO("T = " << T);
        check_close("sequence sums", sums, ref_sums, 1e-5);
        CHECK(sums[3] == 0.0f);
        CHECK(dlp == ref_dlp);
        poison(d_sums, B);
        sequence_logprob_forward_cuda(d_sums, d_lp, d_mask, B, T, stream);
        CHECK(download(d_sums, B) == sums);
        void* bufs[] = {d_lp, d_dsums, d_sums, d_dlp, d_mask};
        for (void* p : bufs) cudaCheck(cudaFree(p));
    }
}

// runner_sequence_logprobs and runner_sequence_backward of the GPU Runner against the CPU
// reference model (llama_forward, the twins, llama_backward) on a tiny random model: 3 rows of
// T = 37 with a prompt under mask 0 and right padding. The GPU sums and gradients are held to
// the whole-model tolerances of test_kernels.cpp (TOL_LOSS for the sums, as its log-prob sums;
// TOL_GRAD for the gradients). Against the GPU's own per-token path (runner_forward, then the
// twins on the host, runner_backward) the sums agree to FP32 reduction order (1e-6) and the
// gradients bit for bit: the device builds the same dlp the host would upload. Only B sums
// come down: the host (B, T) log-prob buffer stays as it was.
TEST_CASE("runner_sequence_logprobs and _backward on the GPU equal the CPU path", "[dpo][kernels][runner]") {
    LlamaConfig c{.dim = 64, .n_layers = 2, .n_heads = 8, .n_kv_heads = 2, .vocab_size = 40, .ffn_dim = 96, .max_seq_len = 128};
    const int B = 3, T = 37;
    const int lengths[B] = {37, 30, 21}, prompts[B] = {9, 12, 5};
    uint64_t rng = test_seed() + 43;
    Runner r;
    llama_init(&r.host, c);
    for (size_t i = 0; i < r.host.num_params; i++) r.host.params_memory[i] = 0.05f * rng_normal(&rng);
    for (float* w : {r.host.params.attn_norm, r.host.params.mlp_norm, r.host.params.final_norm}) {  // norm weights near 1
        for (size_t i = 0; i < (size_t)c.dim * (w == r.host.params.final_norm ? 1 : c.n_layers); i++) w[i] = 1.0f + 0.1f * rng_normal(&rng);
    }
    std::vector<int> tokens(B * T, 0);
    std::vector<uint8_t> mask(B * T, 0);
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < lengths[b]; t++) {
            tokens[b * T + t] = (int)(rng_uniform(&rng) * c.vocab_size) % c.vocab_size;
            mask[b * T + t] = t >= prompts[b];
        }
    }
    std::vector<float> dsums = {0.7f, -1.3f, 0.4f};

    Llama cpu;
    llama_init(&cpu, c);
    memcpy(cpu.params_memory, r.host.params_memory, r.host.num_params * sizeof(float));
    llama_alloc(&cpu, B, T, true);
    llama_zero_grad(&cpu);
    llama_forward(&cpu, tokens.data(), B, T);
    std::vector<float> cpu_sums(B), cpu_dlp(B * T);
    sequence_logprob_forward(cpu_sums.data(), cpu.acts.lp, mask.data(), B, T);
    sequence_logprob_backward(cpu_dlp.data(), dsums.data(), mask.data(), B, T);
    llama_backward(&cpu, tokens.data(), cpu_dlp.data(), B, T);
    std::vector<float> cpu_grads(cpu.grads_memory, cpu.grads_memory + cpu.num_params);

    runner_init(&r, B, T, true);
    std::fill(r.lp.begin(), r.lp.end(), 12345.0f);
    runner_zero_grad(&r);
    const float* s = runner_sequence_logprobs(&r, tokens.data(), mask.data(), B, T);
    std::vector<float> gpu_sums(s, s + B);
    size_t untouched = 0;
    for (float x : r.lp) untouched += x == 12345.0f;
    CHECK(untouched == r.lp.size());
    runner_sequence_backward(&r, tokens.data(), dsums.data(), B, T);
    std::vector<float> gpu_grads = download(r.gpu.grads_memory, r.gpu.num_params);
    check_close("sums vs the CPU model", gpu_sums, cpu_sums, TOL_LOSS);
    check_close("grads vs the CPU model", gpu_grads, cpu_grads, TOL_GRAD);

    // the per-token path on the same device
    runner_zero_grad(&r);
    const float* lp = runner_forward(&r, tokens.data(), B, T);
    std::vector<float> host_sums(B), host_dlp(B * T);
    sequence_logprob_forward(host_sums.data(), lp, mask.data(), B, T);
    sequence_logprob_backward(host_dlp.data(), dsums.data(), mask.data(), B, T);
    runner_backward(&r, tokens.data(), host_dlp.data(), B, T);
    check_close("sums vs per-token path", gpu_sums, host_sums, 1e-6);
    CHECK(download(r.gpu.grads_memory, r.gpu.num_params) == gpu_grads);
    runner_free(&r);
    llama_free(&cpu);
}
#endif
