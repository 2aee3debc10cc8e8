// train_sft as a program, and through it the training plumbing of llm.cu that every stage
// shares: the checked flags, refusals of bad inputs, resume of only what a run started
// (validated state, checksums), the non-finite guard, checked writes, exact resume (CPU
// build and the CUDA kernels through the emulation layer, across an epoch boundary and
// after SIGKILLs at random moments), and a short run on the built-in world whose loss must
// fall. The binaries are build/train_sft_cpu and build/train_sft_emu (see Makefile).
#include <catch2/catch.hpp>

#include <random>
#include <signal.h>
#include <sys/wait.h>
#include <thread>

#include "program.h"

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
    auto no_targets = bytes;
    no_targets[no_targets.size() - 1] = no_targets[no_targets.size() - 2] = 0;  // mask 0, 0, 0
    cases.push_back({"no_targets.tok", no_targets, "has no target tokens"});
    for (const Case& c : cases) {
        std::string path = scratch(c.name);
        write_bytes(path, c.bytes);
        std::string out;
        int rc = run("build/train_sft_cpu -o " + scratch("refuse") + " -p '' -i " + path + " -x 1", &out);
        INFO(out);
        CHECK(rc != 0);
        CHECK_THAT(out, Catch::Contains("error: " + path + ": "));  // one line naming the file
        CHECK_THAT(out, Catch::Contains(c.message));
        remove(path.c_str());
    }
    remove(good.c_str());
    rm_rf(scratch("refuse"));
}

TEST_CASE("train_sft -h prints the usage made from its flag table", "[sft][flags]") {
    std::string out;
    REQUIRE(run("build/train_sft_cpu -h", &out) == 0);
    for (const char* flag : {"-e <path>", "-i <path>", "-o <path>", "-b <int>", "-l <float>", "-x <int>", "-y <int>", "-F <int>", "-Z <int>", "-S <int>"}) {
        CHECK_THAT(out, Catch::Contains(flag));
    }
    CHECK_THAT(out, Catch::Contains("(default 6000, 0..1000000000)"));  // -x: default and range
}

// Each bad invocation: one line "error: ..." naming the flag or file, exit 1, and nothing
// written: no file in the working folder and an empty (or no) output folder.
TEST_CASE("train_sft refuses bad flags and mismatched inputs with one-line errors", "[sft][flags]") {
    std::string work = scratch("cli"), out_dir = work + "/out", out;
    make_dir(work);
    char cwd[4096];
    REQUIRE(getcwd(cwd, sizeof(cwd)));
    std::string repo = cwd;
    std::string bin = repo + "/build/train_sft_cpu";
    // the byte tokenizer without a BOS id
    std::vector<unsigned char> tok = file_bytes("data/world/byte.tokenizer");
    REQUIRE(tok.size() > 40);
    int32_t minus_one = -1;
    memcpy(&tok[20], &minus_one, 4);
    std::string no_bos = work + "/no_bos.tokenizer";
    write_bytes(no_bos, tok);
    std::string tiny_data = write_small_data("tiny.tok", 20);
    std::string data = " -i " + repo + "/data/world/sft_val.tok -j '' -p '' -k " + repo + "/data/world/byte.tokenizer";
    struct Case { std::string args, message; };
    std::vector<Case> cases = {
        {"-o ''", "error: -o: the path is empty"},
        {"-x 1e12", "error: -x: '1e12' is not an integer"},
        {"-x abc", "error: -x: 'abc' is not an integer"},
        {"-x 99999999999", "error: -x: 99999999999 is out of range (0..1000000000)"},
        {"-l abc", "error: -l: 'abc' is not a number"},
        {"-l -1", "error: -l: -1 is out of range (0..1)"},
        {"-l inf", "error: -l: inf is not a finite number"},
        {"-l nan", "error: -l: nan is not a finite number"},
        {"-c nan", "error: -c: nan is not a finite number"},
        {"-y abc", "error: -y: 'abc' is not an integer"},
        {"-t -1", "error: -t: -1 is out of range (2..1048576)"},
        {"-t 100000", "error: -t: 100000 is more than the max_seq_len 256 of the model"},
        {"-X -1", "error: -X: -1 is out of range"},
        {"-E -1", "error: -E: -1 is out of range (1..1000000)"},
        {"-x 0 -E 0", "error: -E: 0 is out of range (1..1000000)"},
        {"-b 3 -d 8", "error: -d: the total batch 8 is not a multiple of the micro-batch -b 3"},
        {"-Q 1", "error: unknown flag '-Q'"},
        {"stray", "error: not a flag: 'stray'"},
        {"-x", "error: -x needs a value"},
        {"-y 1", "has no checkpoint to resume from"},
        {"-x 0 -d 32 -i " + tiny_data, "fewer than one total batch -d 32"},
        {"-k " + repo + "/test/fixtures/tokenizer/bpe.tokenizer", "has 800 ids but the model (new world model) has vocab_size 259"},
        {"-k " + no_bos, "bos_id -1 is not an id of the model (new world model) (vocab_size 259); the chat template needs it"},
    };
    for (const Case& c : cases) {
        rm_rf(out_dir);
        // flags given twice: the later one wins, so each case overrides the common ones
        int rc = run("cd " + work + " && " + bin + data + " -o " + out_dir + " -x 2 " + c.args, &out);
        INFO(c.args << "\n" << out);
        CHECK(rc == 1);
        CHECK_THAT(out, Catch::StartsWith("error: ") || Catch::Contains("\nerror: "));
        CHECK_THAT(out, Catch::Contains(c.message));
        size_t lines = std::count(out.begin(), out.end(), '\n');
        CHECK(lines == 1);  // the error is the only output
        std::string listing;
        run("ls -A " + work + " | grep -v -e '^out$' -e no_bos.tokenizer; (ls -A " + out_dir + " 2>/dev/null)", &listing);
        INFO("written: " << listing);
        CHECK(listing.empty());  // nothing written anywhere
    }
    rm_rf(work);
    remove(tiny_data.c_str());
}

static void check_resume(const std::string& binary, const std::string& env) {
    std::string model = write_small_model();
    // 20 sequences, 8 a step: epochs roll over inside steps 3 and 5, on both sides of the stop
    std::string data = write_small_data("resume.tok", 20);
    std::string common = env + " " + binary + " -e " + model + " -i " + data + " -j '' -p '' -b 4 -d 8 -x 6 -u 2 -l 1e-2 -v 0 -s 0 -n 0 -S 5";
    std::string straight = scratch("straight"), resumed = scratch("resumed"), out;
    REQUIRE(run(common + " -o " + straight, &out) == 0);
    INFO(out);
    REQUIRE(run(common + " -o " + resumed + " -X 3", &out) == 0);  // stops after step 3 with a checkpoint
    CHECK(file_bytes(resumed + "/model.bin").empty());              // no final model yet
    REQUIRE(run(common + " -o " + resumed + " -y 1", &out) == 0);
    CHECK_THAT(out, Catch::Contains("resumed from"));
    std::vector<unsigned char> a = file_bytes(straight + "/model.bin"), b = file_bytes(resumed + "/model.bin");
    REQUIRE(!a.empty());
    CHECK(a == b);  // bit-identical
    CHECK(logged_losses(straight + "/log.jsonl") == logged_losses(resumed + "/log.jsonl"));
    CHECK(logged_losses(resumed + "/log.jsonl").size() == 6);  // the resumed log holds each step once
    rm_rf(straight), rm_rf(resumed), remove(model.c_str()), remove(data.c_str());
}

TEST_CASE("train_sft resumes bit-identically across an epoch boundary (CPU build)", "[sft][resume]") {
    check_resume("build/train_sft_cpu", "OMP_NUM_THREADS=2");
}

// one OS thread runs the emulated blocks, so the FP32 atomics add in a fixed order
TEST_CASE("train_sft resumes bit-identically across an epoch boundary (CUDA kernels, emulated)", "[sft][resume]") {
    check_resume("build/train_sft_emu", "XWIN_EMU_THREADS=1");
}

// The training state of a checkpoint, every field, saved and loaded in-process.
TEST_CASE("a checkpoint round-trips every field of the training state", "[sft][resume]") {
    std::string model = write_small_model("roundtrip.bin");
    TrainConfig cfg;
    std::string dir = scratch("roundtrip");
    cfg.out_dir = dir.c_str(), cfg.micro_batch = 2, cfg.total_batch = 4, cfg.max_steps = 10, cfg.lr = 1e-3f, cfg.warmup = 3, cfg.seed = 99;
    Runner r;
    Trainer saver;
    trainer_init(&saver, &cfg, "train_test");
    REQUIRE(trainer_load_model(&saver, &r.host, model.c_str()));
    runner_init(&r, cfg.micro_batch, 16, true);
    trainer_start(&saver, &r, 30, 1234, 0xABCD);
    uint64_t rng = 3;
    for (size_t i = 0; i < r.host.num_params; i++) r.host.m_memory[i] = rng_normal(&rng), r.host.v_memory[i] = rng_uniform(&rng);
    // distinct values in every field, consistent: step 9 = 8 updates + 1 skip; 9 * 4 = 1 * 30 + 6
    saver.state = TrainState{9, 8, 1, 1, 6, 0x0123456789ABCDEFull};
    r.host.adam_step = 8;
    checkpoint_save(&saver);
    std::vector<float> m(r.host.m_memory, r.host.m_memory + r.host.num_params), v(r.host.v_memory, r.host.v_memory + r.host.num_params);
    std::vector<float> params(r.host.params_memory, r.host.params_memory + r.host.num_params);
    trainer_close(&saver);
    runner_free(&r);

    cfg.resume = 1;
    Runner r2;
    Trainer loader;
    trainer_init(&loader, &cfg, "train_test");
    CHECK(loader.resume_dir == dir + "/ckpt_000009");
    REQUIRE(trainer_load_model(&loader, &r2.host, model.c_str()));
    runner_init(&r2, cfg.micro_batch, 16, true);
    trainer_start(&loader, &r2, 30, 1234, 0xABCD);
    CHECK(loader.state.step == 9);
    CHECK(loader.state.adam_step == 8);
    CHECK(loader.state.skipped == 1);
    CHECK(loader.state.epoch == 1);
    CHECK(loader.state.position == 6);
    CHECK(loader.state.rng == 0x0123456789ABCDEFull);
    CHECK(r2.host.adam_step == 8);
    CHECK(memcmp(r2.host.m_memory, m.data(), 4 * m.size()) == 0);
    CHECK(memcmp(r2.host.v_memory, v.data(), 4 * v.size()) == 0);
    CHECK(memcmp(r2.host.params_memory, params.data(), 4 * params.size()) == 0);
    CHECK(memcmp(&loader.id, &saver.id, sizeof(RunIdentity)) == 0);
    // the next step's rows continue epoch 1's order at position 6
    std::vector<size_t> rows(4), order1;
    trainer_next_rows(&loader, rows.data());
    epoch_order(order1, 30, 99, 1);
    CHECK(rows == std::vector<size_t>{order1[6], order1[7], order1[8], order1[9]});
    trainer_close(&loader);
    runner_free(&r2);
    rm_rf(dir), remove(model.c_str());
}

// A checkpoint at step 3 of a short run; the cases corrupt or misuse it, one at a time.
struct ResumeFixture {
    std::string model = write_small_model("resume_model.bin"), data = write_small_data("resume_data.tok", 40);
    std::string dir = scratch("validate"), common;
    ResumeFixture() {
        common = "build/train_sft_cpu -e " + model + " -j '' -p '' -b 4 -d 8 -x 6 -v 0 -s 0 -n 0 -S 5 -o " + dir;
        std::string out;
        rm_rf(dir);
        REQUIRE(run(common + " -i " + data + " -X 3", &out) == 0);
    }
    ~ResumeFixture() { rm_rf(dir), remove(model.c_str()), remove(data.c_str()); }
    std::string state() const { return dir + "/ckpt_000003/state.bin"; }
    // rewrites state.bin with a field changed and a valid checksum (only the field is wrong)
    void patch_state(size_t offset, const void* value, size_t n) const {
        std::vector<unsigned char> b = file_bytes(state());
        memcpy(&b[offset], value, n);
        uint32_t crc = crc32_update(0, b.data(), b.size() - 4);
        memcpy(&b[b.size() - 4], &crc, 4);
        write_bytes(state(), b);
    }
    std::string resume(const std::string& extra, int* rc) const {
        std::string out;
        *rc = run(common + " -i " + data + " -y 1 " + extra, &out);
        return out;
    }
};

TEST_CASE("a resume refuses a checkpoint that is corrupt, inconsistent or of another run", "[sft][resume]") {
    int rc;
    std::string out;
    SECTION("a shorter training file (the old position would overflow it)") {
        ResumeFixture fx;
        std::string shorter = write_small_data("shorter.tok", 10);
        int code = run(fx.common + " -i " + shorter + " -y 1", &out);
        INFO(out);
        CHECK(code == 1);
        CHECK_THAT(out, Catch::Contains("error: " + fx.dir + "/latest: ckpt_000003 is of another run (training data"));
        code = run(fx.common + " -i " + shorter + " -y 1 -F 1", &out);  // forced: the position is still checked
        CHECK(code == 1);
        CHECK_THAT(out, Catch::Contains("position 24 is beyond the 10 sequences of the training data"));
        remove(shorter.c_str());
    }
    SECTION("a stale latest of a run with other flags") {
        ResumeFixture fx;
        out = fx.resume("-b 2 -l 0.5", &rc);
        INFO(out);
        CHECK(rc == 1);
        CHECK_THAT(out, Catch::Contains("micro-batch -b: 2 now, 4 in the checkpoint"));
        CHECK_THAT(out, Catch::Contains("lr -l: 0.5 now, 2e-05 in the checkpoint"));
        CHECK_THAT(out, Catch::Contains("add -F 1"));
        out = fx.resume("-b 2 -F 1 -x 4", &rc);  // forced: says so and trains
        CHECK(rc == 0);
        CHECK_THAT(out, Catch::Contains("warning: -F 1: resuming ckpt_000003 of another run (micro-batch -b: 2 now, 4 in the checkpoint"));
    }
    SECTION("a fresh run in the same folder does not leave the old latest behind") {
        ResumeFixture fx;
        std::string again;
        REQUIRE(run(fx.common + " -i " + fx.data + " -x 1 -b 2", &again) == 0);  // another run, 1 step, no checkpoint cadence hit
        CHECK_THAT(again, Catch::Contains("removed " + fx.dir + "/latest of an earlier run"));
        CHECK(checkpoint_latest(fx.dir) == fx.dir + "/ckpt_000001");  // its own final checkpoint
    }
    SECTION("a flipped byte in state.bin or model.bin") {
        ResumeFixture fx;
        std::vector<unsigned char> b = file_bytes(fx.state());
        b[200] ^= 1;
        write_bytes(fx.state(), b);
        out = fx.resume("", &rc);
        CHECK(rc == 1);
        CHECK_THAT(out, Catch::Contains("error: " + fx.state() + ": checksum mismatch"));
        b[200] ^= 1;
        write_bytes(fx.state(), b);
        std::string model = fx.dir + "/ckpt_000003/model.bin";
        std::vector<unsigned char> mb = file_bytes(model);
        mb[1000] ^= 0x10;
        write_bytes(model, mb);
        out = fx.resume("", &rc);
        CHECK(rc == 1);
        CHECK_THAT(out, Catch::Contains("error: " + model + ": checksum"));
        CHECK_THAT(out, Catch::Contains("the checkpoint is corrupt"));
    }
    SECTION("each field of state.bin, corrupted with a valid checksum") {
        ResumeFixture fx;
        struct Field { size_t offset; uint64_t value; size_t bytes; const char* message; };
        std::vector<Field> fields = {
            {4, 2, 4, "training state version 2; this build resumes versions 3 and 4 only"},
            {8, 4, 4, "holds step 4 but its folder is ckpt_000003"},
            {12, 0x7FFFFFFF, 4, "the optimizer has taken 2147483647 steps and 0 were skipped, at step 3"},
            {16, 1, 4, "the optimizer has taken 3 steps and 1 were skipped, at step 3"},
            {24, 12345, 8, "holds the state of 12345 parameters"},
            {32, 1, 8, "epoch 1, position 24 is not where step 3 of 8 sequences each ends"},
            {40, 23, 8, "epoch 0, position 23 is not where step 3"},
            {40, 41, 8, "position 41 is beyond the 40 sequences"},
            // the run identity's program name ("train_sft", bytes 56..64) is zero-padded to byte 71
            {70, 'x', 1, "reserved header byte 70 is 0x78, not zero (the program name is zero-padded)"},
            // the word after the world size (bytes 128..131) is reserved
            {132, 1, 4, "reserved header byte 132 is 0x01, not zero"},
        };
        std::vector<unsigned char> clean = file_bytes(fx.state());
        for (const Field& f : fields) {
            fx.patch_state(f.offset, &f.value, f.bytes);
            out = fx.resume("", &rc);
            INFO(f.offset << " " << out);
            CHECK(rc == 1);
            CHECK_THAT(out, Catch::Contains("error: " + fx.state() + ": "));
            CHECK_THAT(out, Catch::Contains(f.message));
            write_bytes(fx.state(), clean);
        }
        // a step beyond the run (its folder renamed to match): 0xC0000000 and 0x7FFFFFFF
        for (uint32_t step : {0xC0000000u, 0x7FFFFFFFu}) {
            fx.patch_state(8, &step, 4);
            std::string name = checkpoint_name(step), folder = fx.dir + "/" + name;
            REQUIRE(rename((fx.dir + "/ckpt_000003").c_str(), folder.c_str()) == 0);
            write_bytes(fx.dir + "/latest", std::vector<unsigned char>(name.begin(), name.end()));
            out = fx.resume("", &rc);
            CHECK(rc == 1);
            CHECK_THAT(out, Catch::Contains(string_format("step %u is outside this run's steps 1..6", step)));
            REQUIRE(rename(folder.c_str(), (fx.dir + "/ckpt_000003").c_str()) == 0);
            write_bytes(fx.dir + "/latest", {'c', 'k', 'p', 't', '_', '0', '0', '0', '0', '0', '3', '\n'});
            write_bytes(fx.state(), clean);
        }
        out = fx.resume("", &rc);  // and the clean checkpoint still resumes
        INFO(out);
        CHECK(rc == 0);
    }
}

TEST_CASE("a non-finite loss stops the run at its step, leaving the last checkpoint intact; -Z 1 skips", "[sft][nan]") {
    std::string nan_model = write_small_model("nan.bin", 32, 2, 5000);  // a NaN in a weight
    std::string dir = scratch("nan"), out;
    std::string common = "build/train_sft_cpu -i data/world/sft_val.tok -j '' -p '' -b 4 -d 4 -x 3 -v 0 -s 0 -n 1 -o " + dir;
    int rc = run(common + " -e " + nan_model, &out);
    INFO(out);
    CHECK(rc == 1);
    CHECK_THAT(out, Catch::Contains("error: " + dir + ": step 1: the loss is nan and the gradient norm nan: stopped; no checkpoint was written yet"));
    CHECK(!exists(dir + "/model.bin"));
    CHECK(!exists(dir + "/latest"));
    rc = run(common + " -e " + nan_model + " -Z 1", &out);  // skipped and counted
    CHECK(rc == 0);
    CHECK_THAT(out, Catch::Contains("step    3/3 | skipped: step 3: the loss is nan"));
    CHECK_THAT(out, Catch::Contains("| 3 skipped"));
    // a run that diverges (lr 1, weight decay 10: the matrices grow 9-fold a step) stops at the first non-finite step and
    // names the checkpoint before it, which still resumes (to the same stop)
    std::string model = write_small_model("diverge.bin");
    rm_rf(dir);
    std::string diverge = "build/train_sft_cpu -e " + model + " -i data/world/sft_val.tok -j '' -p '' -b 4 -d 4 -x 200 -u 0 -l 1 -c 10 -G 0 -v 0 -s 0 -n 1 -o " + dir;
    rc = run(diverge, &out);
    REQUIRE(rc == 1);
    size_t at = out.find(": step ");
    REQUIRE(at != std::string::npos);
    unsigned bad = (unsigned)atoi(out.c_str() + at + 7);
    REQUIRE(bad > 1);
    std::string last = dir + "/" + checkpoint_name(bad - 1);
    CHECK_THAT(out, Catch::Contains("the last good checkpoint is " + last + " (-y 1 resumes it)"));
    CHECK(checkpoint_latest(dir) == last);
    std::string again;
    CHECK(run(diverge + " -y 1", &again) == 1);
    CHECK_THAT(again, Catch::Contains(string_format("resumed from %s at step %u", last.c_str(), bad - 1)));
    CHECK_THAT(again, Catch::Contains(string_format(": step %u: the loss is", bad)));
    rm_rf(dir), remove(model.c_str()), remove(nan_model.c_str());
}

TEST_CASE("write failures exit 1 naming the file and leave no .tmp behind", "[sft][io]") {
    std::string model = write_small_model("io.bin");
    std::string dir = scratch("io"), out;
    std::string common = "build/train_sft_cpu -e " + model + " -i data/world/sft_val.tok -j '' -p '' -b 4 -d 4 -x 2 -v 0 -s 0 -n 1 -o " + dir;
    SECTION("the log") {
        make_dir(dir);
        REQUIRE(symlink("/dev/full", (dir + "/log.jsonl").c_str()) == 0);
        CHECK(run(common, &out) == 1);
        CHECK_THAT(out, Catch::Contains("error: " + dir + "/log.jsonl: write failed: No space left on device"));
    }
    SECTION("stdout") {
        CHECK(run("(" + common + " > /dev/full)", &out) == 1);  // stderr still reaches the pipe
        CHECK_THAT(out, Catch::Contains("error: stdout: write failed"));
    }
    SECTION("a checkpoint file") {
        make_dir(dir + "/ckpt_000001");
        REQUIRE(symlink("/dev/full", (dir + "/ckpt_000001/state.bin.tmp").c_str()) == 0);
        CHECK(run(common, &out) == 1);
        INFO(out);
        CHECK_THAT(out, Catch::Contains("error: " + dir + "/ckpt_000001/state.bin: write failed: No space left on device"));
        CHECK(!exists(dir + "/ckpt_000001/state.bin.tmp"));
        CHECK(!exists(dir + "/latest"));  // the checkpoint never became the latest
        CHECK(!exists(dir + "/model.bin"));
    }
    rm_rf(dir), remove(model.c_str());
}

// the *.tmp files under dir and its ckpt_* folders (no process spawned: it is polled)
static int count_tmp(const std::string& dir) { return (int)leftover_tmp_files(dir).size(); }

// Starts cmd in its own process; returns its pid.
static pid_t spawn(const std::string& cmd, const std::string& log) {
    pid_t pid = fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", ("exec " + cmd + " >>" + log + " 2>&1").c_str(), (char*)nullptr);
        _exit(127);
    }
    return pid;
}

TEST_CASE("SIGKILL at random moments, checkpoint writes included: the resumed losses equal an uninterrupted run's", "[sft][resume][kill]") {
    // a checkpoint of 0.1M parameters (0.4 MB weights, 0.8 MB moments, each fsynced) takes a while to write
    std::string model = write_small_model("kill.bin", 64, 2);
    std::string data = write_small_data("kill.tok", 30);
    std::string common = "build/train_sft_cpu -e " + model + " -i " + data + " -j '' -p '' -b 4 -d 8 -x 12 -u 2 -l 1e-2 -v 0 -s 0 -n 1 -S 5";
    std::string straight = scratch("kill_straight"), killed = scratch("kill_killed"), log = scratch("kill.log"), out;
    auto t0 = std::chrono::steady_clock::now();
    REQUIRE(run("OMP_NUM_THREADS=2 " + common + " -o " + straight, &out) == 0);
    double run_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::mt19937 rng(12345);
    int kills = 0, during_write = 0;
    for (int attempt = 0; kills < 12 && attempt < 40; attempt++) {
        bool resume = exists(killed + "/latest");
        pid_t pid = spawn("env OMP_NUM_THREADS=2 " + common + " -o " + killed + (resume ? " -y 1" : ""), log);
        if (attempt % 2 == 0) {  // at a random moment
            std::this_thread::sleep_for(std::chrono::microseconds((int64_t)(std::uniform_real_distribution<double>(0.02, 0.3)(rng) * run_ms * 1000)));
        } else {  // the moment a .tmp file appears: in the middle of a checkpoint write
            auto start = std::chrono::steady_clock::now();
            while (count_tmp(killed) == 0 && std::chrono::steady_clock::now() - start < std::chrono::milliseconds((int)run_ms)) {}
        }
        int status = 0;
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        bool mid_write = count_tmp(killed) > 0;  // a .tmp left behind: the kill cut a write
        if (WIFSIGNALED(status)) kills++, during_write += mid_write;
        else if (WIFEXITED(status) && WEXITSTATUS(status) == 0) rm_rf(killed);  // finished before the kill: start over
        else FAIL("exit " << WEXITSTATUS(status) << ": " << std::string((const char*)file_bytes(log).data(), file_bytes(log).size()));
    }
    CHECK(kills >= 10);
    CHECK(during_write >= 1);
    REQUIRE(run("OMP_NUM_THREADS=2 " + common + " -o " + killed + (exists(killed + "/latest") ? " -y 1" : ""), &out) == 0);
    INFO(out);
    printf("SIGKILL test: %d kills, %d during a checkpoint write\n", kills, during_write);
    CHECK(count_tmp(killed) == 0);
    std::vector<double> a = logged_losses(straight + "/log.jsonl"), b = logged_losses(killed + "/log.jsonl");
    CHECK(a.size() == 12);
    CHECK(a == b);  // step for step
    CHECK(file_bytes(straight + "/model.bin") == file_bytes(killed + "/model.bin"));
    rm_rf(straight), rm_rf(killed), remove(log.c_str()), remove(model.c_str()), remove(data.c_str());
}

// dev/data/prepare_sft.py on bad input: each bad line as "file:line: problem"; nothing
// written unless --skip-bad, which leaves them out and counts them. (The byte-tokenizer
// path needs only the standard library.)
TEST_CASE("prepare_sft.py reports every bad line with its line number; --skip-bad counts them", "[sft][prepare]") {
    std::string version;
    int python = run("python3 --version", &version);
    INFO("python3 is needed to run dev/data/prepare_sft.py: " << version);
    REQUIRE(python == 0);
    std::string in = scratch("bad.jsonl"), tok = scratch("bad.tok"), out;
    const char* good = R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})";
    std::string text = std::string(good) + "\n" + "not json\n" + "\xff\xfe bad\n" + R"({"messages": []})" "\n" +
                       R"({"messages": [{"role": "bot", "content": "x"}]})" "\n" + R"({"messages": [{"role": "user"}]})" "\n" +
                       R"({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "a"}]})" "\n" +
                       R"({"x": 1})" "\n" + "[1]\n" + good + "\n";
    write_bytes(in, std::vector<unsigned char>(text.begin(), text.end()));
    std::vector<std::string> expected = {
        ":2: not JSON: Expecting value", ":3: not UTF-8 (byte 0xff at byte 1 of the line)", ":4: empty conversation",
        ":5: message 1 has an unknown role 'bot'", ":6: message 1 (user) has no string 'content'",
        ":7: message 1 (user) holds a lone surrogate \\ud800: not valid Unicode", ":8: no 'messages' list", ":9: not a JSON object",
    };
    std::string cmd = "python3 dev/data/prepare_sft.py " + in + " " + tok + " --tokenizer byte";
    CHECK(run(cmd, &out) == 1);
    INFO(out);
    for (const std::string& e : expected) CHECK_THAT(out, Catch::Contains(in + e));
    CHECK_THAT(out, Catch::Contains("prepare_sft: error: " + in + ": 8 bad line(s), reported above; nothing written"));
    CHECK_THAT(out, !Catch::Contains("Traceback"));
    CHECK(!exists(tok));
    CHECK(run(cmd + " --skip-bad", &out) == 0);
    CHECK_THAT(out, Catch::Contains(in + ":2: not JSON"));
    CHECK_THAT(out, Catch::Contains("8 bad lines skipped"));
    TokenData d;
    tokens_load(&d, tok.c_str(), 259);
    CHECK(d.n_seqs == 2);  // the two good lines
    std::string gz = scratch("bad.jsonl.gz");
    write_bytes(gz, {'n', 'o', 't', ' ', 'g', 'z', 'i', 'p'});
    CHECK(run("python3 dev/data/prepare_sft.py " + gz + " " + tok + " --tokenizer byte", &out) == 1);
    CHECK_THAT(out, Catch::Contains("prepare_sft: error: " + gz + ": not a readable gzip file"));
    remove(in.c_str()), remove(tok.c_str()), remove(gz.c_str());
}

TEST_CASE("train_sft on the built-in world: the loss falls", "[sft]") {
    std::string dir = scratch("world"), out;
    // the world's default model from scratch, 40 steps of 16 conversations
    REQUIRE(run("build/train_sft_cpu -o " + dir + " -p '' -b 16 -d 16 -x 40 -u 10 -v 40 -s 0 -n 0", &out) == 0);
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
    rm_rf(dir);
}

// Batches of similar lengths: each epoch's order is still a permutation of the rows, every
// batch is a run of consecutive rows of its window sorted by length, the batches of a window
// come in a shuffled order, and on the world's data the padded tokens fall to near the real ones.
TEST_CASE("group_by_length: permutation, batches of neighbouring lengths, less padding", "[sft][plumbing]") {
    TokenData d;
    tokens_load(&d, "data/world/sft_train.tok", 259);
    std::vector<uint32_t> lengths(d.n_seqs);
    for (size_t i = 0; i < d.n_seqs; i++) lengths[i] = (uint32_t)token_seq_len(d, i);
    const size_t batch = 8, window = LENGTH_WINDOW * batch;
    std::vector<size_t> shuffled, grouped;
    epoch_order(shuffled, d.n_seqs, 1337, 0);
    grouped = shuffled;
    group_by_length(grouped, lengths, batch, 1337, 0);
    std::vector<size_t> a = shuffled, b = grouped;
    std::sort(a.begin(), a.end()), std::sort(b.begin(), b.end());
    CHECK(a == b);
    size_t padded_shuffled = 0, padded_grouped = 0, real = 0, out_of_order_batches = 0;
    for (size_t w0 = 0; w0 < d.n_seqs; w0 += window) {
        size_t w1 = std::min(d.n_seqs, w0 + window);
        // the window holds the same rows as the shuffle's window
        std::vector<size_t> s(shuffled.begin() + w0, shuffled.begin() + w1), g(grouped.begin() + w0, grouped.begin() + w1);
        std::sort(s.begin(), s.end()), std::sort(g.begin(), g.end());
        REQUIRE(s == g);
        std::vector<uint32_t> sorted;
        for (size_t i = w0; i < w1; i++) sorted.push_back(lengths[shuffled[i]]);
        std::sort(sorted.begin(), sorted.end(), std::greater<uint32_t>());
        uint32_t previous_max = 1u << 30;
        for (size_t b0 = w0; b0 < w1; b0 += batch) {
            size_t b1 = std::min(w1, b0 + batch);
            uint32_t lo = 1u << 30, hi = 0, hi_shuffled = 0;
            for (size_t i = b0; i < b1; i++) {
                lo = std::min(lo, lengths[grouped[i]]), hi = std::max(hi, lengths[grouped[i]]);
                hi_shuffled = std::max(hi_shuffled, lengths[shuffled[i]]);
                real += lengths[grouped[i]];
            }
            // no row of the window lies strictly between the batch's shortest and longest outside it
            size_t inside = 0;
            for (uint32_t len : sorted) inside += len > lo && len < hi;
            size_t inside_batch = 0;
            for (size_t i = b0; i < b1; i++) inside_batch += lengths[grouped[i]] > lo && lengths[grouped[i]] < hi;
            CHECK(inside == inside_batch);
            out_of_order_batches += hi > previous_max;
            previous_max = hi;
            padded_grouped += (b1 - b0) * hi, padded_shuffled += (b1 - b0) * hi_shuffled;
        }
    }
    CHECK(out_of_order_batches > d.n_seqs / batch / 4);  // not simply longest first
    CHECK((double)padded_shuffled / real > 1.3);
    CHECK((double)padded_grouped / real < 1.05);
    // another epoch, another order
    std::vector<size_t> grouped1;
    epoch_order(grouped1, d.n_seqs, 1337, 1);
    group_by_length(grouped1, lengths, batch, 1337, 1);
    CHECK(grouped1 != grouped);
}
