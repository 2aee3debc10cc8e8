// The Llama model of llm.cu against Hugging Face transformers, and its file formats.
// Fixtures: test/fixtures/<config>/{model.bin, tokens.tok, expect.bin}, made by
// dev/make_fixtures.py from small randomly initialised LlamaForCausalLM models run in
// float64, so every difference below is the float32 rounding of this implementation.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <random>

#include "fixture.h"

static std::string temp_path(const char* name) { return std::string("/tmp/xwin_test_") + std::to_string(getpid()) + "_" + name; }

struct ParityRun {
    Llama model;
    TokenData data;
    std::map<std::string, FixtureTensor> expect;
    int B, T;
    std::vector<int> tokens;
    std::vector<uint8_t> mask;
    std::vector<float> dlp;
};

static void parity_setup(ParityRun& r, const std::string& name) {
    std::string dir = "test/fixtures/" + name + "/";
    llama_load(&r.model, (dir + "model.bin").c_str());
    tokens_load(&r.data, (dir + "tokens.tok").c_str(), r.model.config.vocab_size);
    r.expect = fixture_load(dir + "expect.bin");
    r.B = (int)r.data.n_seqs;
    r.T = (int)token_seq_len(r.data, 0);
    r.tokens.resize(r.B * r.T);
    r.mask.resize(r.B * r.T);
    r.dlp.resize(r.B * r.T);
    tokens_fill_batch(r.data, 0, r.B, r.T, r.tokens.data(), r.mask.data());
    llama_alloc(&r.model, r.B, r.T, true);
}

// forward, masked mean loss, its backward (the ops one by one); returns the loss
static double parity_loss_and_grad_unfused(ParityRun& r) {
    llama_forward(&r.model, r.tokens.data(), r.B, r.T);
    size_t count;
    double loss = masked_mean_loss(r.model.acts.lp, r.mask.data(), r.B, r.T, &count);
    masked_mean_loss_backward(r.dlp.data(), r.mask.data(), r.B, r.T, count);
    llama_zero_grad(&r.model);
    llama_backward(&r.model, r.tokens.data(), r.dlp.data(), r.B, r.T);
    return loss;
}

// the same as train_sft runs it: llama_nll_forward_backward (the classifier fused)
static double parity_loss_and_grad(ParityRun& r) {
    size_t count = 0;
    for (int i = 0; i < r.B * r.T; i++) count += i % r.T != 0 && r.mask[i];
    llama_zero_grad(&r.model);
    return llama_nll_forward_backward(&r.model, r.tokens.data(), r.mask.data(), r.B, r.T, count);
}


static void run_parity(const std::string& name) {
    ParityRun r;
    parity_setup(r, name);
    auto& e = r.expect;
    const float* adamw = e["adamw"].data.data();
    AdamWConfig opt{adamw[0], adamw[1], adamw[2], adamw[3], adamw[4]};
    float max_norm = adamw[5];
    printf("parity %s (B=%d, T=%d, %zu parameters)\n", name.c_str(), r.B, r.T, r.model.num_params);

    double loss = parity_loss_and_grad(r);
    size_t V = r.model.config.vocab_size;
    REQUIRE(e["logits"].data.size() == (size_t)r.B * r.T * V);
    double logits_err = relative_error(r.model.acts.logits, e["logits"].data.data(), (size_t)r.B * r.T * V);
    printf("  logits               rel err %.2e\n  loss %.8f vs %.8f\n", logits_err, loss, e["loss"].data[0]);
    // float32 forward of a 2-3 layer model: each op rounds at ~6e-8 relative and the errors
    // add up over ~20 ops, so logits agree to ~1e-6; 1e-5 leaves a margin of ten.
    CHECK(logits_err < 1e-5);
    CHECK(loss == Approx(e["loss"].data[0]).epsilon(1e-5));
    double sums[16];
    REQUIRE(r.B <= 16);
    sequence_logprob_sums(sums, r.model.acts.lp, r.mask.data(), r.B, r.T);
    for (int b = 0; b < r.B; b++) CHECK(sums[b] == Approx(e["logprob_sums"].data[b]).epsilon(1e-5));

    // gradients: sums over B*T positions of products with cancellation; relative L2 error
    // of 1e-4 is ~100 float32 roundings of headroom while a wrong term gives errors near 1.
    check_param_tensors(r.model.config, r.model.grads_memory, e, "grad.", 1e-4);

    // two AdamW steps with clipping on the same batch
    float norm1 = clip_grad_norm(r.model.grads_memory, r.model.num_params, max_norm);
    CHECK(norm1 == Approx(e["grad_norm"].data[0]).epsilon(1e-5));
    llama_update(&r.model, opt);
    double loss2 = parity_loss_and_grad(r);
    CHECK(loss2 == Approx(e["loss_step2"].data[0]).epsilon(1e-5));
    float norm2 = clip_grad_norm(r.model.grads_memory, r.model.num_params, max_norm);
    CHECK(norm2 == Approx(e["grad_norm"].data[1]).epsilon(1e-4));
    llama_update(&r.model, opt);
    printf("  grad norms %.6f %.6f vs %.6f %.6f\n", norm1, norm2, e["grad_norm"].data[0], e["grad_norm"].data[1]);
    // parameters after two steps. Adam's update lr * m / sqrt(v) magnifies the gradient's
    // relative error wherever |g| is small, so float32 lands ~1e-6..1e-5 from the float64
    // reference (transformers itself in float32: 1.4e-5..6e-5, measured by make_fixtures.py).
    // 1e-4 still catches any formula error: a missing weight decay moves the parameters by
    // 2 * lr * wd = 2e-3 of their norm, a wrong bias correction or step by ~1e-2 or more.
    check_param_tensors(r.model.config, r.model.params_memory, e, "param2.", 1e-4);
    llama_free(&r.model);
}

TEST_CASE("parity with transformers: multi-head, tied embeddings", "[parity]") { run_parity("mha_tied"); }
TEST_CASE("parity with transformers: grouped-query, separate head, rope_theta 500000, eps 1e-6", "[parity]") { run_parity("gqa_untied"); }
TEST_CASE("parity with transformers: sizes not multiples of 8", "[parity]") { run_parity("odd_sizes"); }

// The fused SFT step (llama_nll_forward_backward, fused_logprob_nll) gives the bits of the ops one
// by one: the loss, the log-probs, the logits and every gradient.
TEST_CASE("the fused SFT loss and gradient are the unfused ops' bits", "[parity]") {
    for (const char* name : {"gqa_untied", "odd_sizes"}) {
        ParityRun r;
        parity_setup(r, name);
        size_t N = (size_t)r.B * r.T, V = r.model.config.vocab_size, n = r.model.num_params;
        double loss_ref = parity_loss_and_grad_unfused(r);
        std::vector<float> lp_ref(r.model.acts.lp, r.model.acts.lp + N), logits_ref(r.model.acts.logits, r.model.acts.logits + N * V),
            grads_ref(r.model.grads_memory, r.model.grads_memory + n);
        double loss = parity_loss_and_grad(r);
        INFO(name);
        CHECK(loss == Approx(loss_ref).epsilon(1e-15));  // mean * count / count, as train_sft: a double rounding apart
        CHECK(std::vector<float>(r.model.acts.lp, r.model.acts.lp + N) == lp_ref);
        CHECK(std::vector<float>(r.model.acts.logits, r.model.acts.logits + N * V) == logits_ref);
        CHECK(std::vector<float>(r.model.grads_memory, r.model.grads_memory + n) == grads_ref);
        llama_free(&r.model);
    }
}

// ---------------------------------------------------------------------------- formats

static LlamaConfig tiny_config() { return LlamaConfig{.dim = 16, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 32, .ffn_dim = 24, .max_seq_len = 8}; }

static std::string write_tiny_model(const char* name, int dtype) {
    Llama m;
    llama_init(&m, tiny_config());
    std::mt19937 rng(42);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (size_t i = 0; i < m.num_params; i++) m.params_memory[i] = dist(rng);
    std::string path = temp_path(name);
    llama_save(&m, path.c_str(), dtype);
    llama_free(&m);
    return path;
}

static std::vector<unsigned char> read_bytes(const std::string& path) {
    FILE* f = fopen_check(path.c_str(), "rb");
    std::vector<unsigned char> b(file_size_of(f));
    fread_check(b.data(), 1, b.size(), f, path.c_str());
    fclose(f);
    return b;
}

static void write_bytes(const std::string& path, const std::vector<unsigned char>& b) {
    FILE* f = fopen_check(path.c_str(), "wb");
    fwrite_check(b.data(), 1, b.size(), f, path.c_str());
    fclose(f);
}

static std::string load_error(const std::vector<unsigned char>& bytes) {
    std::string path = temp_path("bad.bin");
    write_bytes(path, bytes);
    Llama m;
    std::string err = llama_load_checked(&m, path.c_str());
    if (err.empty()) llama_free(&m);
    remove(path.c_str());
    return err;
}

TEST_CASE("model file round trip in float32 and bfloat16", "[format]") {
    std::string p32 = write_tiny_model("rt32.bin", DTYPE_FP32), p16 = write_tiny_model("rt16.bin", DTYPE_BF16);
    Llama a, b;
    REQUIRE(llama_load_checked(&a, p32.c_str()) == "");
    REQUIRE(llama_load_checked(&b, p16.c_str()) == "");
    CHECK(read_bytes(p32).size() == MODEL_HEADER_BYTES + 4 * a.num_params);
    CHECK(read_bytes(p16).size() == MODEL_HEADER_BYTES + 2 * a.num_params);
    CHECK(b.config.ffn_dim == 24);
    CHECK(b.config.norm_eps == 1e-5);
    for (size_t i = 0; i < a.num_params; i++) {
        CHECK(b.params_memory[i] == bf16_to_float(float_to_bf16(a.params_memory[i])));
        CHECK(std::fabs(b.params_memory[i] - a.params_memory[i]) <= std::fabs(a.params_memory[i]) / 256);
    }
    // saving again gives the same bytes
    std::string again = temp_path("again.bin");
    llama_save(&a, again.c_str(), DTYPE_FP32);
    CHECK(read_bytes(again) == read_bytes(p32));
    llama_free(&a);
    llama_free(&b);
    remove(p32.c_str());
    remove(p16.c_str());
    remove(again.c_str());
}

TEST_CASE("bfloat16 rounding on hand-worked bit patterns", "[format]") {
    auto bits = [](uint32_t u) { float f; memcpy(&f, &u, 4); return f; };
    CHECK(float_to_bf16(1.0f) == 0x3f80);
    CHECK(float_to_bf16(bits(0x3f808000)) == 0x3f80);  // tie, even stays
    CHECK(float_to_bf16(bits(0x3f818000)) == 0x3f82);  // tie, odd rounds up
    CHECK(float_to_bf16(bits(0x3f808001)) == 0x3f81);  // above the tie
    CHECK(float_to_bf16(bits(0x7f7fffff)) == 0x7f80);  // overflows to inf
    CHECK(std::isnan(bf16_to_float(float_to_bf16(NAN))));
}

TEST_CASE("the model loader refuses bad files with a one-line reason", "[format]") {
    std::string path = write_tiny_model("good.bin", DTYPE_FP32);
    std::vector<unsigned char> good = read_bytes(path);
    remove(path.c_str());
    REQUIRE(load_error(good) == "");

    auto with_u32 = [&](size_t offset, uint32_t value) { auto b = good; memcpy(&b[offset], &value, 4); return b; };
    auto with_f64 = [&](size_t offset, double value) { auto b = good; memcpy(&b[offset], &value, 8); return b; };
    CHECK_THAT(load_error(with_u32(0, 0x12345678)), Catch::Contains("bad magic 0x12345678"));
    CHECK_THAT(load_error(with_u32(4, 4)), Catch::Contains("unsupported model file version 4"));
    CHECK_THAT(load_error(with_u32(4, 0)), Catch::Contains("unsupported model file version 0"));
    CHECK_THAT(load_error(with_u32(8, 7)), Catch::Contains("unknown dtype 7"));
    CHECK_THAT(load_error(with_u32(12, 9)), Catch::Contains("unknown head_type 9"));
    auto truncated = good;
    truncated.resize(good.size() - 10);
    CHECK_THAT(load_error(truncated), Catch::Contains("truncated"));
    auto header_only = good;
    header_only.resize(100);
    CHECK_THAT(load_error(header_only), Catch::Contains("shorter than the 256-byte model header"));
    auto longer = good;
    longer.push_back(0);
    CHECK_THAT(load_error(longer), Catch::Contains("its header describes"));
    CHECK_THAT(load_error(with_u32(36, 25)), Catch::Contains("its header describes"));  // ffn_dim disagrees with the size
    CHECK_THAT(load_error(with_u32(16, 18)), Catch::Contains("dim 18 is not divisible by n_heads 4"));
    CHECK_THAT(load_error(with_u32(28, 3)), Catch::Contains("n_heads 4 is not divisible by n_kv_heads 3"));
    CHECK_THAT(load_error(with_u32(32, 0)), Catch::Contains("vocab_size = 0"));
    CHECK_THAT(load_error(with_u32(20, 0xffffffffu)), Catch::Contains("n_layers = 4294967295"));
    CHECK_THAT(load_error(with_u32(44, 5)), Catch::Contains("tied_embeddings = 5"));
    CHECK_THAT(load_error(with_u32(24, 16)), Catch::Contains("head_dim 1 is odd"));  // dim 16 / 16 heads
    CHECK_THAT(load_error(with_f64(48, -1.0)), Catch::Contains("rope_theta"));
    CHECK_THAT(load_error(with_f64(56, 0.0)), Catch::Contains("norm_eps"));
    CHECK_THAT(load_error(with_u32(108, 1)), Catch::Contains("reserved header byte 108 is 0x01, not zero"));
    CHECK_THAT(load_error(with_u32(252, 0x01000000)), Catch::Contains("reserved header byte 255 is 0x01, not zero"));
    CHECK_THAT(load_error({}), Catch::Contains("shorter than the 256-byte"));
}

TEST_CASE("sizes of 7B and 70B configs from a header alone, without overflow", "[format]") {
    // Llama-2-7B and Llama-2-70B as published; parameter counts as transformers reports them
    LlamaConfig c7{.dim = 4096, .n_layers = 32, .n_heads = 32, .n_kv_heads = 32, .vocab_size = 32000, .ffn_dim = 11008, .max_seq_len = 4096};
    LlamaConfig c70{.dim = 8192, .n_layers = 80, .n_heads = 64, .n_kv_heads = 8, .vocab_size = 32000, .ffn_dim = 28672, .max_seq_len = 4096};
    unsigned char h[MODEL_HEADER_BYTES];
    LlamaConfig parsed;
    int dtype;
    model_header_write(h, c70, DTYPE_BF16);
    REQUIRE(model_header_parse(h, &parsed, &dtype) == "");
    CHECK(dtype == DTYPE_BF16);
    CHECK(num_parameters(c7) == 6738415616ull);
    CHECK(num_parameters(parsed) == 68976648192ull);
    size_t sizes[NUM_PARAM_TENSORS];
    param_sizes(parsed, sizes);
    CHECK(sizes[PARAM_WQ] == 80ull * 8192 * 8192);  // 5.4e9 > 2^32
    size_t acts[NUM_ACT_TENSORS];
    act_sizes(parsed, 1, 4096, acts);
    CHECK(acts[6] == 80ull * 64 * 4096 * 4096);  // attention probabilities: 8.6e10
    // a 70B header on a short file is refused by its size, not by reading on
    auto b = std::vector<unsigned char>(h, h + MODEL_HEADER_BYTES);
    CHECK_THAT(load_error(b), Catch::Contains("i.e. 137953296640 bytes: truncated"));  // 256 + 2 * 68976648192
}

// ---------------------------------------------------------------------------- RoPE scaling

// The fixtures rope_llama3 and rope_linear: transformers' LlamaForCausalLM with rope_scaling, run
// on sequences that go well past original_max_position_embeddings (dev/make_fixtures.py). Their
// expect.bin also holds transformers' inv_freq (its rotary embedding's buffer, float32).
TEST_CASE("parity with transformers: llama3 RoPE scaling", "[parity][rope]") { run_parity("rope_llama3"); }
TEST_CASE("parity with transformers: linear RoPE scaling", "[parity][rope]") { run_parity("rope_linear"); }

// The logits of the positions past the original context alone, where the scaled angles differ most
// from the unscaled ones; and an unscaled model on the same weights lands far from them.
TEST_CASE("scaled RoPE: the logits past original_max_position_embeddings equal transformers'", "[rope]") {
    for (const char* name : {"rope_llama3", "rope_linear"}) {
        ParityRun r;
        parity_setup(r, name);
        const LlamaConfig& c = r.model.config;
        // linear has no original context: its positions past a quarter of the sequence
        int from = c.rope_scaling == ROPE_LLAMA3 ? c.rope_original_max_pos : r.T / 4;
        REQUIRE(r.T >= from + 16);
        size_t V = c.vocab_size, row = (size_t)(r.T - from) * V;
        auto past_error = [&](const float* logits) {
            double err = 0;
            for (int b = 0; b < r.B; b++) {
                size_t offset = ((size_t)b * r.T + from) * V;
                err = std::max(err, relative_error(logits + offset, r.expect["logits"].data.data() + offset, row));
            }
            return err;
        };
        llama_forward(&r.model, r.tokens.data(), r.B, r.T);
        double err = past_error(r.model.acts.logits);
        printf("%s: logits at positions %d..%d, max relative error over the rows %.2e\n", name, from, r.T - 1, err);
        INFO(name << " relative error " << err);
        CHECK(err < 1e-5);  // as the parity tests: float32 rounding over ~20 ops
        // the same weights with plain RoPE: the scaling is what the fixture tests
        Llama plain;
        llama_load(&plain, (std::string("test/fixtures/") + name + "/model.bin").c_str());
        plain.config.rope_scaling = ROPE_NONE;
        plain.config.rope_factor = plain.config.rope_low_freq_factor = plain.config.rope_high_freq_factor = 0;
        plain.config.rope_original_max_pos = 0;
        llama_alloc(&plain, r.B, r.T, false);
        llama_forward(&plain, r.tokens.data(), r.B, r.T);
        CHECK(past_error(plain.acts.logits) > 1e-2);
        llama_free(&plain);
        llama_free(&r.model);
    }
}

// rope_inv_freq against transformers' inv_freq buffer; the llama3 fixture's head_dim and theta put
// pairs in each of its three bands (kept, divided by factor, blended), and rope_table's angles are
// position * inv_freq.
TEST_CASE("scaled RoPE: rope_inv_freq is transformers' inv_freq; the table uses it", "[rope]") {
    for (const char* name : {"rope_llama3", "rope_linear"}) {
        Llama m;
        llama_load(&m, (std::string("test/fixtures/") + name + "/model.bin").c_str());
        const LlamaConfig& c = m.config;
        auto e = fixture_load(std::string("test/fixtures/") + name + "/expect.bin");
        int half = head_dim(c) / 2;
        REQUIRE(e["inv_freq"].data.size() == (size_t)half);
        LlamaConfig plain = rope_config(head_dim(c), c.rope_theta);
        double worst = 0;
        int kept = 0, scaled = 0, blended = 0;
        for (int i = 0; i < half; i++) {
            float ours = rope_inv_freq(c, i), theirs = e["inv_freq"].data[i], unscaled = rope_inv_freq(plain, i);
            double rel = std::fabs((double)ours - theirs) / theirs;
            worst = std::max(worst, rel);
            INFO(name << " pair " << i << ": " << ours << " vs " << theirs);
            CHECK(rel <= 1e-7);
            if (ours == unscaled) kept++;
            else if (ours == unscaled / (float)c.rope_factor) scaled++;
            else blended++;
        }
        printf("%s: inv_freq max relative error %.2e over %d pairs (kept %d, divided by factor %d, blended %d)\n", name, worst, half,
               kept, scaled, blended);
        if (c.rope_scaling == ROPE_LLAMA3) {
            CHECK(kept >= 1);
            CHECK(scaled >= 1);
            CHECK(blended >= 1);
        } else {
            CHECK(scaled == half);
        }
        std::vector<float> table = rope_table(c.max_seq_len, c);
        for (int t : {0, 1, c.max_seq_len - 1}) {
            for (int i = 0; i < half; i++) {
                float angle = (float)t * rope_inv_freq(c, i);
                CHECK(table[((size_t)t * half + i) * 2] == cosf(angle));
                CHECK(table[((size_t)t * half + i) * 2 + 1] == sinf(angle));
            }
        }
        llama_free(&m);
    }
}

// Published configs (test/fixtures/rope_inv_freq: Llama 3.1 8B, Llama 3.2 1B, a linear factor 2):
// rope_inv_freq against transformers' inv_freq for every pair.
TEST_CASE("scaled RoPE: rope_inv_freq is transformers' inv_freq for Llama 3.1 and 3.2 configs", "[rope]") {
    auto e = fixture_load("test/fixtures/rope_inv_freq/expect.bin");
    for (int k = 0; e.count("case" + std::to_string(k) + ".config"); k++) {
        std::string name = "case" + std::to_string(k);
        const std::vector<float>& cfg = e[name + ".config"].data;  // type, head_dim, theta, factor, low, high, original context
        const std::vector<float>& want = e[name + ".inv_freq"].data;
        LlamaConfig c = rope_config((int)cfg[1], cfg[2]);
        c.rope_scaling = (int)cfg[0];
        c.rope_factor = cfg[3];
        c.rope_low_freq_factor = cfg[4];
        c.rope_high_freq_factor = cfg[5];
        c.rope_original_max_pos = (int)cfg[6];
        REQUIRE(rope_scaling_check(c) == "");
        REQUIRE(want.size() == (size_t)head_dim(c) / 2);
        double worst = 0;
        for (int i = 0; i < head_dim(c) / 2; i++) {
            double rel = std::fabs((double)rope_inv_freq(c, i) - want[i]) / want[i];
            worst = std::max(worst, rel);
            INFO(name << " pair " << i << ": " << rope_inv_freq(c, i) << " vs " << want[i]);
            CHECK(rel <= 1e-7);
        }
        printf("rope_inv_freq %s (type %d, head_dim %d, theta %g, factor %g): max relative error %.2e\n", name.c_str(), c.rope_scaling,
               head_dim(c), c.rope_theta, c.rope_factor, worst);
    }
    CHECK(e.size() == 6);
}

static LlamaConfig llama3_config() {
    LlamaConfig c{.dim = 64, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 128, .ffn_dim = 96, .max_seq_len = 64, .rope_theta = 500000.0};
    c.rope_scaling = ROPE_LLAMA3;
    c.rope_factor = 8;
    c.rope_low_freq_factor = 1;
    c.rope_high_freq_factor = 4;
    c.rope_original_max_pos = 8192;
    return c;
}

TEST_CASE("the model header carries the RoPE scaling; versions 1 and 2 have none", "[rope][format]") {
    unsigned char h[MODEL_HEADER_BYTES];
    LlamaConfig back;
    int dtype;
    LlamaConfig linear{.dim = 64, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 128, .ffn_dim = 96, .max_seq_len = 64};
    linear.rope_scaling = ROPE_LINEAR;
    linear.rope_factor = 2.5;
    for (const LlamaConfig& c : {llama3_config(), linear}) {
        model_header_write(h, c, DTYPE_BF16);
        uint32_t version;
        memcpy(&version, h + 4, 4);
        CHECK(version == 3);
        REQUIRE(model_header_parse(h, &back, &dtype) == "");
        CHECK(back.rope_scaling == c.rope_scaling);
        CHECK(back.rope_factor == c.rope_factor);
        CHECK(back.rope_low_freq_factor == c.rope_low_freq_factor);
        CHECK(back.rope_high_freq_factor == c.rope_high_freq_factor);
        CHECK(back.rope_original_max_pos == c.rope_original_max_pos);
        CHECK(back.rope_theta == c.rope_theta);
        CHECK(back.pad_id == -1);
        for (size_t i = 108; i < MODEL_HEADER_BYTES; i++) CHECK(h[i] == 0);
    }
    // version 2: the same header without bytes 76.. is a model without scaling
    model_header_write(h, tiny_config(), DTYPE_FP32);
    uint32_t version = 2;
    memcpy(h + 4, &version, 4);
    REQUIRE(model_header_parse(h, &back, &dtype) == "");
    CHECK(back.rope_scaling == ROPE_NONE);
    CHECK(back.rope_factor == 0);
    CHECK(back.rope_original_max_pos == 0);
    // ... and a version-2 header with anything in bytes 76.. is refused, as before
    model_header_write(h, llama3_config(), DTYPE_FP32);
    memcpy(h + 4, &version, 4);
    CHECK(model_header_parse(h, &back, &dtype) == "reserved header byte 76 is 0x02, not zero");
}

TEST_CASE("the model header refuses bad RoPE scaling with a one-line reason", "[rope][format]") {
    unsigned char good[MODEL_HEADER_BYTES];
    model_header_write(good, llama3_config(), DTYPE_FP32);
    auto parse = [&](size_t offset, const void* value, size_t n, const LlamaConfig* base = nullptr) {
        unsigned char h[MODEL_HEADER_BYTES];
        if (base) model_header_write(h, *base, DTYPE_FP32);
        else memcpy(h, good, sizeof(h));
        memcpy(h + offset, value, n);
        LlamaConfig c;
        int dtype;
        std::string err = model_header_parse(h, &c, &dtype);
        CHECK(err.find('\n') == std::string::npos);
        return err;
    };
    auto with_u32 = [&](size_t offset, uint32_t v, const LlamaConfig* base = nullptr) { return parse(offset, &v, 4, base); };
    auto with_f64 = [&](size_t offset, double v, const LlamaConfig* base = nullptr) { return parse(offset, &v, 8, base); };
    CHECK(with_u32(76, 3) == "unknown rope_scaling type 3 (0 = none, 1 = linear, 2 = llama3)");
    CHECK(with_u32(76, 0xffffffffu) == "unknown rope_scaling type 4294967295 (0 = none, 1 = linear, 2 = llama3)");
    CHECK(with_f64(80, 0.5) == "absurd config: rope_scaling factor = 0.5 (must be finite and >= 1)");
    CHECK(with_f64(80, 0) == "absurd config: rope_scaling factor = 0 (must be finite and >= 1)");
    CHECK(with_f64(80, INFINITY) == "absurd config: rope_scaling factor = inf (must be finite and >= 1)");
    CHECK(with_f64(80, NAN) == "absurd config: rope_scaling factor = nan (must be finite and >= 1)");
    CHECK(with_f64(88, 0) == "absurd config: rope_scaling low_freq_factor = 0 (must be finite and > 0)");
    CHECK(with_f64(88, -1) == "absurd config: rope_scaling low_freq_factor = -1 (must be finite and > 0)");
    CHECK(with_f64(96, 1) == "absurd config: rope_scaling high_freq_factor = 1 (must be finite and > low_freq_factor 1)");
    CHECK(with_f64(96, 0.5) == "absurd config: rope_scaling high_freq_factor = 0.5 (must be finite and > low_freq_factor 1)");
    CHECK(with_u32(104, 0) == "absurd config: rope_scaling original_max_position_embeddings = 0 (must be >= 1)");
    CHECK(with_u32(104, 0x80000000u) == "absurd config: rope_scaling original_max_position_embeddings = 2147483648 (must be 1..16777216)");
    CHECK(with_u32(108, 1) == "reserved header byte 108 is 0x01, not zero");
    // the fields a type does not use are zero
    LlamaConfig none = tiny_config(), linear = tiny_config();
    linear.rope_scaling = ROPE_LINEAR;
    linear.rope_factor = 4;
    CHECK(with_f64(80, 8.0, &none) == "rope_scaling 0 (none) with nonzero scaling fields: factor 8, low_freq_factor 0, "
                                      "high_freq_factor 0, original_max_position_embeddings 0 (must all be 0)");
    CHECK_THAT(with_u32(104, 16, &none), Catch::Contains("original_max_position_embeddings 16 (must all be 0)"));
    CHECK(with_f64(80, 0.25, &linear) == "absurd config: rope_scaling factor = 0.25 (must be finite and >= 1)");
    CHECK(with_f64(88, 1.0, &linear) == "rope_scaling 1 (linear) with llama3 fields: low_freq_factor 1, high_freq_factor 0, "
                                        "original_max_position_embeddings 0 (must be 0)");
    CHECK(with_f64(80, 1.0, &linear) == "");  // factor 1: no scaling, allowed as transformers allows it
}

// ---------------------------------------------------------------------------- token files

static TokenData small_token_data() {
    TokenData d;
    d.n_seqs = 2;
    d.offsets = {0, 3, 7};
    d.tokens = {1, 2, 3, 4, 5, 6, 7};
    d.mask = {0, 1, 1, 0, 0, 1, 1};
    return d;
}

static std::string tokens_error(const std::vector<unsigned char>& bytes, int vocab = 100) {
    std::string path = temp_path("bad.tok");
    write_bytes(path, bytes);
    TokenData d;
    std::string err = tokens_load_checked(&d, path.c_str(), vocab);
    remove(path.c_str());
    return err;
}

TEST_CASE("token files: round trip, batching and refusals", "[format]") {
    std::string path = temp_path("good.tok");
    tokens_save(small_token_data(), path.c_str());
    std::vector<unsigned char> good = read_bytes(path);
    CHECK(good.size() == 64 + 3 * 8 + 7 * 4 + 7);
    TokenData d;
    REQUIRE(tokens_load_checked(&d, path.c_str(), 8) == "");
    remove(path.c_str());
    CHECK(d.tokens == small_token_data().tokens);
    std::vector<int> tok(2 * 5);
    std::vector<uint8_t> mask(2 * 5);
    tokens_fill_batch(d, 0, 2, 5, tok.data(), mask.data());
    CHECK(tok == std::vector<int>{1, 2, 3, 0, 0, 4, 5, 6, 7, 0});
    CHECK(mask == std::vector<uint8_t>{0, 1, 1, 0, 0, 0, 0, 1, 1, 0});

    auto with_u32 = [&](size_t offset, uint32_t value) { auto b = good; memcpy(&b[offset], &value, 4); return b; };
    CHECK_THAT(tokens_error({}), Catch::Contains("file is empty"));
    CHECK_THAT(tokens_error(with_u32(0, 1)), Catch::Contains("bad magic"));
    CHECK_THAT(tokens_error(with_u32(4, 3)), Catch::Contains("unsupported token file version 3"));
    auto truncated = good;
    truncated.pop_back();
    CHECK_THAT(tokens_error(truncated), Catch::Contains("truncated"));
    CHECK_THAT(tokens_error(with_u32(24, 6)), Catch::Contains("mask length 6 differs from token count 7"));
    CHECK_THAT(tokens_error(good, 7), Catch::Contains("token 6 has id 7 >= vocab_size 7"));
    CHECK_THAT(tokens_error(with_u32(16, 1000000)), Catch::Contains("mask length"));
    // the reserved word (bytes 12..15) and bytes 32..63 are zero, as in every reader's header
    CHECK_THAT(tokens_error(with_u32(12, 1)), Catch::Contains("reserved header byte 12 is 0x01, not zero"));
    CHECK_THAT(tokens_error(with_u32(14, 0x80)), Catch::Contains("reserved header byte 14 is 0x80, not zero"));
    CHECK_THAT(tokens_error(with_u32(32, 0x100)), Catch::Contains("reserved header byte 33 is 0x01, not zero"));
    CHECK_THAT(tokens_error(with_u32(60, 0x7F000000)), Catch::Contains("reserved header byte 63 is 0x7f, not zero"));
    auto huge = with_u32(16, 1000000);
    memcpy(&huge[24], &huge[16], 8);
    CHECK_THAT(tokens_error(huge), Catch::Contains("exceed the file size"));
    auto bad_offsets = good;
    uint64_t off = 8;  // offsets {0, 8, 7}: decreasing
    memcpy(&bad_offsets[64 + 8], &off, 8);
    CHECK_THAT(tokens_error(bad_offsets), Catch::Contains("sequence 1 is empty or its offsets decrease"));
    auto bad_mask = good;
    bad_mask.back() = 2;
    CHECK_THAT(tokens_error(bad_mask), Catch::Contains("mask byte 6 is 2"));
}

// ---------------------------------------------------------------------------- the GPU's peak

TEST_CASE("the MFU's peak, by the GPU's name as cudaGetDeviceProperties gives it", "[format]") {
    // dense TFLOP/s from the datasheets: bf16 tensor cores, then fp32
    struct Case { const char* name; double bf16, fp32; };
    for (const Case& g : {Case{"NVIDIA H100 80GB HBM3", 989, 67}, Case{"NVIDIA H100 PCIe", 756, 51}, Case{"NVIDIA H200", 989, 67},
                          Case{"NVIDIA A100-SXM4-80GB", 312, 19.5}, Case{"NVIDIA A100-SXM4-40GB", 312, 19.5},
                          Case{"NVIDIA A100-PCIE-40GB", 312, 19.5}, Case{"NVIDIA A100 80GB PCIe", 312, 19.5},
                          // unknown: no MFU rather than a guess
                          Case{"NVIDIA H100 NVL", 0, 0}, Case{"NVIDIA H200 NVL", 0, 0}, Case{"NVIDIA GeForce RTX 4090", 0, 0},
                          Case{"NVIDIA A10", 0, 0}, Case{"xwin CPU emulation (H100-like)", 0, 0}}) {
        INFO(g.name);
        CHECK(gpu_peak_flops(g.name, true) == g.bf16 * 1e12);
        CHECK(gpu_peak_flops(g.name, false) == g.fp32 * 1e12);
    }
}
