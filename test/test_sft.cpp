// train_sft as a program: refusals of bad data, exact resume (CPU build and the CUDA
// kernels through the emulation layer), and a short run on the built-in world whose loss
// must fall. The binaries are build/train_sft_cpu and build/train_sft_emu (see Makefile).
#include <catch2/catch.hpp>

#include <unistd.h>

#include "fixture.h"

static std::string scratch(const char* name) { return std::string("/tmp/xwin_sft_") + std::to_string(getpid()) + "_" + name; }

// runs a shell command; returns its exit code and fills out with stdout+stderr
static int run(const std::string& cmd, std::string* out) {
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    REQUIRE(p);
    char buf[4096];
    out->clear();
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out->append(buf, n);
    int status = pclose(p);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static std::vector<unsigned char> file_bytes(const std::string& path) {
    std::vector<unsigned char> b;
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return b;
    b.resize(file_size_of(f));
    if (fread(b.data(), 1, b.size(), f) != b.size()) b.clear();
    fclose(f);
    return b;
}

// a small model over the byte vocabulary, so the runs stay short
static std::string write_small_model() {
    std::string path = scratch("small.bin");
    Llama m;
    llama_init(&m, LlamaConfig{32, 2, 4, 2, 259, 64, 256, 1, HEAD_LM, 10000.0, 1e-5});
    uint64_t rng = 7;
    for (size_t i = 0; i < m.num_params; i++) m.params_memory[i] = 0.05f * rng_normal(&rng);
    llama_save(&m, path.c_str(), DTYPE_FP32);
    llama_free(&m);
    return path;
}

TEST_CASE("train_sft refuses bad token files, naming the file", "[sft]") {
    TokenData d;
    d.n_seqs = 1;
    d.offsets = {0, 3};
    d.tokens = {256, 65, 257};
    d.mask = {0, 1, 1};
    std::string good = scratch("good.tok");
    tokens_save(d, good.c_str());
    std::vector<unsigned char> bytes = file_bytes(good);
    struct Case { const char* name; std::vector<unsigned char> bytes; const char* message; };
    std::vector<Case> cases;
    cases.push_back({"empty.tok", {}, "file is empty"});
    cases.push_back({"short.tok", std::vector<unsigned char>(bytes.begin(), bytes.end() - 1), "truncated"});
    auto big_id = bytes;
    uint32_t id = 300;  // >= the byte vocabulary of 259
    memcpy(&big_id[64 + 16 + 4], &id, 4);
    cases.push_back({"big_id.tok", big_id, "token 1 has id 300 >= vocab_size 259"});
    auto mask_len = bytes;
    uint64_t n_mask = 2;
    memcpy(&mask_len[24], &n_mask, 8);
    cases.push_back({"mask_len.tok", mask_len, "mask length 2 differs from token count 3"});
    for (const Case& c : cases) {
        std::string path = scratch(c.name);
        FILE* f = fopen_check(path.c_str(), "wb");
        if (!c.bytes.empty()) fwrite_check(c.bytes.data(), 1, c.bytes.size(), f, path.c_str());
        fclose(f);
        std::string out;
        int rc = run("build/train_sft_cpu -o " + scratch("refuse") + " -i " + path + " -x 1", &out);
        INFO(out);
        CHECK(rc != 0);
        CHECK_THAT(out, Catch::Contains("error: " + path + ": "));  // one line naming the file
        CHECK_THAT(out, Catch::Contains(c.message));
        remove(path.c_str());
    }
    remove(good.c_str());
}

static void check_resume(const std::string& binary, const std::string& env) {
    std::string model = write_small_model();
    std::string common = env + " " + binary + " -m " + model + " -i data/world/sft_val.tok -j '' -b 4 -d 8 -x 6 -w 2 -l 1e-2 -v 0 -s 0 -n 0 -r 5";
    std::string straight = scratch("straight"), resumed = scratch("resumed"), out;
    REQUIRE(run(common + " -o " + straight, &out) == 0);
    INFO(out);
    REQUIRE(run(common + " -o " + resumed + " -z 3", &out) == 0);  // stops after step 3 with a checkpoint
    CHECK(file_bytes(resumed + "/model.bin").empty());              // no final model yet
    REQUIRE(run(common + " -o " + resumed + " -y 1", &out) == 0);
    CHECK_THAT(out, Catch::Contains("resumed from"));
    std::vector<unsigned char> a = file_bytes(straight + "/model.bin"), b = file_bytes(resumed + "/model.bin");
    REQUIRE(!a.empty());
    CHECK(a == b);  // bit-identical
    std::string cleanup;
    run("rm -rf " + straight + " " + resumed + " " + model, &cleanup);
}

TEST_CASE("train_sft resumes bit-identically (CPU build)", "[sft][resume]") { check_resume("build/train_sft_cpu", "OMP_NUM_THREADS=2"); }

// one OS thread runs the emulated blocks, so the FP32 atomics add in a fixed order
TEST_CASE("train_sft resumes bit-identically (CUDA kernels, emulated)", "[sft][resume]") { check_resume("build/train_sft_emu", "XWIN_EMU_THREADS=1"); }

TEST_CASE("train_sft on the built-in world: the loss falls", "[sft]") {
    std::string dir = scratch("world"), out;
    // the world's default model from scratch, 40 steps of 16 conversations
    REQUIRE(run("build/train_sft_cpu -o " + dir + " -b 16 -d 16 -x 40 -w 10 -v 40 -s 0 -n 0", &out) == 0);
    INFO(out);
    FILE* f = fopen_check((dir + "/log.jsonl").c_str(), "r");
    std::vector<double> losses;
    double val = -1;
    char line[512];
    while (fgets(line, sizeof(line), f)) {
        double x;
        const char* p;
        if ((p = strstr(line, "\"val_loss\": ")) && sscanf(p + 12, "%lf", &x) == 1) val = x;
        else if ((p = strstr(line, "\"loss\": ")) && sscanf(p + 8, "%lf", &x) == 1) losses.push_back(x);
    }
    fclose(f);
    REQUIRE(losses.size() == 40);
    double first = losses[0], last = (losses[37] + losses[38] + losses[39]) / 3;
    printf("world run: loss %.3f -> %.3f, val %.3f\n", first, last, val);
    // a new model starts near log(259) = 5.56; 40 steps learn the template and the answer
    // frame ("The answer is ...") that all answers share: 2 nats down leaves margin.
    CHECK(first > 5.0);
    CHECK(last < first - 2.0);
    CHECK(val > 0);
    CHECK(val < first - 2.0);
    run("rm -rf " + dir, &out);
}
