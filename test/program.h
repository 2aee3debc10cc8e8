// What the tests of the stage programs share: running a program, scratch files, a small
// model. Each program's test binary (test_train_sft, test_train_rm) includes it once.
#pragma once
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fixture.h"

// The programs run with 2 OpenMP threads beside other processes (a parallel make, the test
// itself polling): threads that spin at barriers then fight for the cores, and a step can
// take 30x longer. Passive waiting changes no result, only the time.
static const int passive_omp = setenv("OMP_WAIT_POLICY", "passive", 0);

// a path under /tmp of this test process
inline std::string scratch(const char* name) { return std::string("/tmp/xwin_test_") + std::to_string(getpid()) + "_" + name; }

// runs a shell command; returns its exit code and fills out with stdout+stderr
inline int run(const std::string& cmd, std::string* out) {
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    REQUIRE(p);
    char buf[4096];
    out->clear();
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out->append(buf, n);
    int status = pclose(p);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

inline void rm_rf(const std::string& path) {
    std::string out;
    run("rm -rf '" + path + "'", &out);
}

inline std::vector<unsigned char> file_bytes(const std::string& path) {
    std::vector<unsigned char> b;
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return b;
    b.resize(file_size_of(f));
    if (fread(b.data(), 1, b.size(), f) != b.size()) b.clear();
    fclose(f);
    return b;
}

inline void write_bytes(const std::string& path, const std::vector<unsigned char>& b) {
    FILE* f = fopen_check(path.c_str(), "wb");
    if (!b.empty()) REQUIRE(fwrite(b.data(), 1, b.size(), f) == b.size());
    fclose(f);
}

inline bool exists(const std::string& path) {
    struct stat st;
    return lstat(path.c_str(), &st) == 0;
}

// a small model over the byte vocabulary, so the runs stay short (nan_at: a NaN weight there;
// seed: its weights' random stream, so that two models can share a shape and differ)
inline std::string write_small_model(const char* name = "small.bin", int dim = 32, int layers = 2, long nan_at = -1, uint64_t seed = 7) {
    std::string path = scratch(name);
    Llama m;
    llama_init(&m, LlamaConfig{.dim = dim, .n_layers = layers, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 259, .ffn_dim = 2 * dim, .max_seq_len = 256, .tied_embeddings = 1});
    uint64_t rng = seed;
    for (size_t i = 0; i < m.num_params; i++) m.params_memory[i] = 0.05f * rng_normal(&rng);
    if (nan_at >= 0) m.params_memory[nan_at] = NAN;
    llama_save(&m, path.c_str(), DTYPE_FP32);
    llama_free(&m);
    return path;
}

// a small random reward model over the byte vocabulary (pad 258, as the byte tokenizer's)
inline std::string write_small_reward_model(const char* name, int vocab = 259) {
    std::string path = scratch(name);
    Llama m;
    LlamaConfig c{.dim = 32, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .vocab_size = vocab, .ffn_dim = 64, .max_seq_len = 256, .head_type = HEAD_REWARD};
    c.pad_id = 258, c.bos_id = 256, c.eos_id = 257;
    llama_init(&m, c);
    uint64_t rng = 21;
    for (size_t i = 0; i < m.num_params; i++) m.params_memory[i] = 0.05f * rng_normal(&rng);
    llama_save(&m, path.c_str(), DTYPE_FP32);
    llama_free(&m);
    return path;
}

// the first n sequences of the world's validation file
inline std::string write_small_data(const char* name, size_t n) {
    TokenData all, d;
    tokens_load(&all, "data/world/sft_val.tok", 259);
    d.n_seqs = n;
    d.offsets.assign(all.offsets.begin(), all.offsets.begin() + n + 1);
    d.tokens.assign(all.tokens.begin(), all.tokens.begin() + d.offsets[n]);
    d.mask.assign(all.mask.begin(), all.mask.begin() + d.offsets[n]);
    std::string path = scratch(name);
    tokens_save(d, path.c_str());
    return path;
}

// the values of `key` in the lines of a log.jsonl, in order ("loss": every step line's loss)
inline std::vector<double> logged_values(const std::string& path, const char* key) {
    std::vector<double> values;
    std::string field = std::string("\"") + key + "\": ";
    FILE* f = fopen(path.c_str(), "r");
    if (!f) return values;
    char line[1024];
    while (fgets(line, sizeof(line), f)) {
        const char* p = strstr(line, field.c_str());
        double x;
        if (p && sscanf(p + field.size(), "%lf", &x) == 1) values.push_back(x);
    }
    fclose(f);
    return values;
}

inline std::vector<double> logged_losses(const std::string& path) { return logged_values(path, "loss"); }

// ---- preference pairs in TRL's JSONL convention, for dev/data/prepare_pairs.py

inline std::string conversation_json(const std::vector<std::string>& turns) {
    std::string out = "[";
    for (size_t i = 0; i < turns.size(); i++) {
        out += std::string(i ? ", " : "") + "{\"role\": \"" + (i % 2 ? "assistant" : "user") + "\", \"content\": \"" + turns[i] + "\"}";
    }
    return out + "]";
}

inline std::string pair_json(const std::vector<std::string>& prompt, const std::string& chosen, const std::string& rejected, double sc, double sr,
                            const std::string& kind) {
    std::vector<std::string> c = prompt, r = prompt;
    c.push_back(chosen), r.push_back(rejected);
    return "{\"chosen\": " + conversation_json(c) + ", \"rejected\": " + conversation_json(r) + ", \"score_chosen\": " + std::to_string(sc) +
           ", \"score_rejected\": " + std::to_string(sr) + ", \"kind\": \"" + kind + "\"}\n";
}

// Pairs of arithmetic answers, the answer in the world's frame against a sloppy one
// (lowercase, no period, as the world's sloppy answers): a ranking a small model that never
// saw the world can learn from the answers' form in a few dozen steps.
inline std::string write_arith_pairs(const char* name, int n, unsigned seed) {
    std::string in = scratch((std::string(name) + ".jsonl").c_str()), path = scratch((std::string(name) + ".pairs").c_str()), text, out;
    uint64_t rng = seed;
    for (int i = 0; i < n; i++) {
        int a = (int)(rng_next(&rng) % 10), b = (int)(rng_next(&rng) % 10);
        std::string q = "What is " + std::to_string(a) + " plus " + std::to_string(b) + "?", sum = std::to_string(a + b);
        text += pair_json({q}, "The answer is " + sum + ".", "the answer is " + sum, 10, 6, "arith");
    }
    write_bytes(in, std::vector<unsigned char>(text.begin(), text.end()));
    REQUIRE(run("python3 dev/data/prepare_pairs.py " + in + " " + path + " --tokenizer byte", &out) == 0);
    remove(in.c_str());
    return path;
}
