// The DPO stage as a program: train_dpo (the CPU build and the CUDA kernels through the
// emulation layer) on small pair files: its refusals (bad flags, another model's reference,
// a tokenizer of another vocabulary), the reference file made once and reused, that DPO moves
// the policy towards the chosen answers, and its exact resume; the recipe around it: its seed in
// every stage's command, its report and training curves (read_log_series,
// draw_training_curves), and dev/recipe_seeds.py's table over seeds. The binaries are
// build/train_dpo_cpu and build/train_dpo_emu.
#include <catch2/catch.hpp>

#define XWIN_PLOTS  // draw_training_curves
#include "program.h"

TEST_CASE("train_dpo refuses bad flags, another model's reference and another vocabulary, in one line", "[dpo]") {
    std::string model = write_small_model("dpo_refuse.bin", 32, 2), other = write_small_model("dpo_other.bin", 48, 2);
    std::string pairs = write_arith_pairs("dpo_refuse", 16, 1), dir = scratch("dpo_refuse_out"), out;
    std::string common = "build/train_dpo_cpu -e " + model + " -i " + pairs + " -j '' -p '' -b 4 -d 4 -x 1 -o " + dir;
    CHECK(run(common + " -B 0", &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: -B: beta 0 must be > 0"));
    CHECK(run(common + " -L 0.5", &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: -L: label smoothing 0.5 must be in [0, 0.5)"));
    CHECK(run(common + " -O 1 -L 0.1", &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: -L:"));
    // a tokenizer whose ids the model does not have (a vocabulary of 250 under the byte tokenizer's 259)
    std::string big = scratch("dpo_small_vocab.bin");
    {
        Llama m;
        llama_init(&m, LlamaConfig{.dim = 32, .n_layers = 1, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 250, .ffn_dim = 64, .max_seq_len = 256, .tied_embeddings = 1});
        llama_save(&m, big.c_str(), DTYPE_FP32);
        llama_free(&m);
    }
    CHECK(run("build/train_dpo_cpu -e " + big + " -i " + pairs + " -j '' -p '' -b 4 -d 4 -x 1 -o " + dir, &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: data/world/byte.tokenizer"));
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    // the reference made by one model, then offered to another: refused, naming the file
    REQUIRE(run(common, &out) == 0);
    INFO(out);
    REQUIRE(exists(pairs + ".logps"));
    std::vector<unsigned char> ref = file_bytes(pairs + ".logps");
    CHECK(run("build/train_dpo_cpu -e " + other + " -i " + pairs + " -j '' -p '' -b 4 -d 4 -x 1 -o " + dir, &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: " + pairs + ".logps: holds the log-probs of another model"));
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    CHECK(file_bytes(pairs + ".logps") == ref);  // nothing lost
    // the usual case the identity exists for: a model of the same shape (the same file size)
    // with other weights, as the SFT model is to the RS model
    std::string twin = write_small_model("dpo_twin.bin", 32, 2, -1, 8);
    REQUIRE(file_bytes(twin).size() == file_bytes(model).size());
    REQUIRE(file_bytes(twin) != file_bytes(model));
    CHECK(run("build/train_dpo_cpu -e " + twin + " -i " + pairs + " -j '' -p '' -b 4 -d 4 -x 1 -o " + dir, &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: " + pairs + ".logps: holds the log-probs of another model"));
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    CHECK(file_bytes(pairs + ".logps") == ref);
    // one value changed to another finite value (pair 3's rejected log-prob, in the second
    // half of the values): refused by the checksum over the values, the file left as it was
    std::vector<unsigned char> changed = ref;
    float other_value = -1e9f;
    memcpy(&changed[64 + 4 * (16 + 3)], &other_value, 4);
    write_bytes(pairs + ".logps", changed);
    CHECK(run(common, &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: " + pairs + ".logps: its log-probs do not match their checksum"));
    CHECK_THAT(out, Catch::Contains("delete it to compute the reference again"));
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    CHECK(file_bytes(pairs + ".logps") == changed);
    write_bytes(pairs + ".logps", ref);
    // and a reference of other pairs (-R)
    std::string more = write_arith_pairs("dpo_more", 20, 2);
    CHECK(run("build/train_dpo_cpu -e " + model + " -i " + more + " -R " + pairs + ".logps -j '' -p '' -b 4 -d 4 -x 1 -o " + dir, &out) == 1);
    CHECK_THAT(out, Catch::Contains("was made for other pairs"));
    // a corrupt reference file: its size no longer matches the header
    std::vector<unsigned char> cut(ref.begin(), ref.end() - 4);
    write_bytes(pairs + ".logps", cut);
    CHECK(run(common, &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: " + pairs + ".logps: file is"));
    for (const std::string& p : {model, other, twin, big, pairs, pairs + ".logps", more, more + ".logps"}) remove(p.c_str());
    rm_rf(dir);
}

TEST_CASE("the reference file: its values checksummed, its reserved bytes zero, version 1 refused", "[dpo][format]") {
    std::string path = scratch("reference.logps");
    ReferenceLogps ref, loaded;
    ref.model_crc = 0x12345678, ref.model_size = 1000, ref.pairs_size = 200, ref.pairs_hash = 0xabcdef01;
    ref.chosen = {-1.5f, -20.25f, -0.125f}, ref.rejected = {-2.5f, -30.0f, -7.75f};
    reference_save(ref, path.c_str());
    std::vector<unsigned char> good = file_bytes(path);
    REQUIRE(good.size() == 64 + 3 * 8);
    // the stored checksum is the CRC-32 of the six values as written (an independent count)
    uint32_t stored, expected = crc32_update(0, good.data() + 64, 24);
    memcpy(&stored, good.data() + 36, 4);
    CHECK(stored == expected);
    REQUIRE(reference_load_checked(&loaded, path.c_str(), ref, 3) == "");
    CHECK(loaded.chosen == ref.chosen);
    CHECK(loaded.rejected == ref.rejected);
    auto error_of = [&](const std::vector<unsigned char>& bytes) {
        write_bytes(path, bytes);
        ReferenceLogps r;
        return reference_load_checked(&r, path.c_str(), ref, 3);
    };
    // every value, changed to another finite value, is caught; so is a flipped bit in the sign
    for (size_t i = 0; i < 6; i++) {
        std::vector<unsigned char> b = good;
        float zero = 0.0f;
        memcpy(&b[64 + 4 * i], &zero, 4);
        CHECK_THAT(error_of(b), Catch::Contains("its log-probs do not match their checksum"));
    }
    std::vector<unsigned char> sign = good;
    sign[64 + 4 * 5 + 3] ^= 0x80;
    CHECK_THAT(error_of(sign), Catch::Contains("its log-probs do not match their checksum"));
    // reserved bytes 40..63
    for (size_t at : {(size_t)40, (size_t)63}) {
        std::vector<unsigned char> b = good;
        b[at] = 1;
        CHECK_THAT(error_of(b), Catch::Contains(string_format("reserved header byte %zu is 0x01, not zero", at)));
    }
    // a version-1 file (no checksum: bytes 36..39 were zero) is refused, saying how to remake it
    std::vector<unsigned char> v1 = good;
    uint32_t one = 1;
    memcpy(&v1[4], &one, 4);
    memset(&v1[36], 0, 4);
    CHECK(error_of(v1) == "reference file version 1 has no checksum over its values: delete it to compute the reference again (this build writes version 2)");
    remove(path.c_str());
}

TEST_CASE("train_dpo: the reference is the starting model, DPO prefers the chosen answers, and resume is exact", "[dpo]") {
    std::string model = write_small_model("dpo_start.bin", 32, 2), train = write_arith_pairs("dpo_train", 96, 3), val = write_arith_pairs("dpo_val", 24, 4);
    std::string dir = scratch("dpo_run"), out;
    std::string common = "build/train_dpo_cpu -e " + model + " -i " + train + " -j " + val + " -p '' -b 8 -d 8 -x 24 -u 2 -l 3e-3 -B 0.5 -N 0 -v 24 -n 0 -S 5";
    REQUIRE(run(common + " -o " + dir, &out) == 0);
    INFO(out);
    CHECK_THAT(out, Catch::Contains("reference log-probs of " + train + " by " + model));
    std::string log = dir + "/log.jsonl";
    std::vector<double> loss = logged_values(log, "loss"), margin = logged_values(log, "rewards/margins"), chosen = logged_values(log, "rewards/chosen"),
                        val_acc = logged_values(log, "val_rewards/accuracies"), val_margin = logged_values(log, "val_rewards/margins");
    REQUIRE(loss.size() == 24);  // the steps' lines (the validation line has val_ keys)
    REQUIRE(val_acc.size() == 1);
    // step 1: the policy is the reference, so every implicit reward is 0 and the loss is log 2
    CHECK(loss[0] == Approx(std::log(2.0)).epsilon(1e-5));
    CHECK(chosen[0] == Approx(0.0).margin(1e-5));
    CHECK(margin[0] == Approx(0.0).margin(1e-5));
    // 24 steps on a preference for the world's frame: the margin grows and the held-out pairs
    // come out right (chance is 0.5)
    double last = (loss[21] + loss[22] + loss[23]) / 3;
    printf("train_dpo on arithmetic pairs: loss %.4f -> %.4f, held-out accuracy %.3f, held-out margin %.3f\n", loss[0], last, val_acc[0], val_margin[0]);
    CHECK(last < 0.6);
    CHECK(val_acc[0] > 0.9);
    CHECK(val_margin[0] > 0.2);
    // a second run reuses the reference file, whose sums are the starting model's
    REQUIRE(run(common + " -o " + dir + " -x 1", &out) == 0);
    CHECK_THAT(out, Catch::Contains("reference log-probs of " + train + ": " + train + ".logps"));
    ReferenceLogps want, ref;
    REQUIRE(model_file_identity(model.c_str(), &want.model_size, &want.model_crc) == "");
    PairData p;
    pairs_load(&p, train.c_str(), 259);
    tokens_identity(p.seqs, &want.pairs_size, &want.pairs_hash);
    REQUIRE(reference_load_checked(&ref, (train + ".logps").c_str(), want, p.n_pairs) == "");
    {
        Runner r;
        llama_load(&r.host, model.c_str());
        runner_init(&r, 2, 256, false);
        for (size_t i : {(size_t)0, (size_t)37, p.n_pairs - 1}) {
            size_t rows[2] = {2 * i, 2 * i + 1};
            int T = (int)std::max(token_seq_len(p.seqs, rows[0]), token_seq_len(p.seqs, rows[1]));
            std::vector<int> tokens(2 * T);
            std::vector<uint8_t> mask(2 * T);
            tokens_fill_rows(p.seqs, rows, 2, T, tokens.data(), mask.data());
            const float* lp = runner_forward(&r, tokens.data(), 2, T);
            double sum[2] = {0, 0};
            for (int b = 0; b < 2; b++) for (int t = 1; t < T; t++) if (mask[b * T + t]) sum[b] += lp[b * T + t];
            CHECK(ref.chosen[i] == Approx(sum[0]).epsilon(1e-5));
            CHECK(ref.rejected[i] == Approx(sum[1]).epsilon(1e-5));
            CHECK(sum[0] < 0);
        }
        runner_free(&r);
    }
    // exact resume, on the CPU build and the emulated kernels (one thread: fixed atomics order)
    for (std::string binary : {"build/train_dpo_cpu", "build/train_dpo_emu"}) {
        remove((val + ".logps").c_str());
        check_exact_resume("XWIN_EMU_THREADS=1 " + binary + " -e " + model + " -i " + val + " -j '' -p '' -b 4 -d 8 -x 5 -u 2 -l 3e-3 -N 0.5 -L 0.1 -n 0 -S 3",
                           "dpo");
    }
    for (const std::string& f : {model, train, train + ".logps", val, val + ".logps"}) remove(f.c_str());
    rm_rf(dir);
}

// ---- the recipe around DPO

static void write_text(const std::string& path, const std::string& text) {
    FILE* f = fopen_check(path.c_str(), "wb");
    REQUIRE(fwrite(text.data(), 1, text.size(), f) == text.size());
    fclose(f);
}

// a PNG's width and height: the IHDR chunk's first two big-endian words (bytes 16..23)
static void png_size(const std::string& path, uint32_t* w, uint32_t* h) {
    std::vector<unsigned char> b = file_bytes(path);
    REQUIRE(b.size() > 24);
    REQUIRE(memcmp(b.data(), "\x89PNG\r\n\x1a\n", 8) == 0);
    REQUIRE(memcmp(b.data() + 12, "IHDR", 4) == 0);
    *w = (uint32_t)b[16] << 24 | (uint32_t)b[17] << 16 | (uint32_t)b[18] << 8 | b[19];
    *h = (uint32_t)b[20] << 24 | (uint32_t)b[21] << 16 | (uint32_t)b[22] << 8 | b[23];
}

TEST_CASE("training curves: a log's training steps and validation points read back apart, one PNG panel each", "[dpo][report]") {
    std::string dir = scratch("curves");
    make_dir(dir);
    std::string log = dir + "/log.jsonl";
    // as the trainers write it: step lines, validation lines, a skipped step, a NaN written as nan
    write_text(log,
               "{\"step\": 1, \"loss\": 2.500000, \"norm\": 1.000000, \"lr\": 1.000000e-04, \"accuracy\": 0.500000, \"ms\": 10.000, \"tokens\": 100}\n"
               "{\"step\": 2, \"loss\": 2.250000, \"norm\": 0.500000, \"lr\": 1.000000e-04, \"accuracy\": 0.750000, \"ms\": 10.000, \"tokens\": 100}\n"
               "{\"step\": 2, \"val_loss\": 2.125000, \"val_accuracy\": 0.625000}\n"
               "{\"step\": 3, \"skipped\": 1}\n"
               "\n"
               "{\"step\": 4, \"loss\": 1.500000, \"norm\": 0.250000, \"lr\": 5.000000e-05, \"accuracy\": 1.000000, \"ms\": 10.000, \"tokens\": 100}\n"
               "{\"step\": 4, \"val_loss\": nan}\n"
               "{\"step\": 4, \"val_loss\": 1.750000, \"val_accuracy\": 0.875000}\n");
    LogSeries s;
    CHECK(read_log_series(log, "loss", &s) == "");
    CHECK(s.steps == std::vector<double>{1, 2, 4});
    CHECK(s.values == std::vector<double>{2.5, 2.25, 1.5});
    CHECK(s.skipped == 1);  // the nan line
    CHECK(read_log_series(log, "val_loss", &s) == "");
    CHECK(s.steps == std::vector<double>{2, 4});
    CHECK(s.values == std::vector<double>{2.125, 1.75});
    CHECK(read_log_series(log, "accuracy", &s) == "");
    CHECK(s.steps == std::vector<double>{1, 2, 4});
    CHECK(s.values == std::vector<double>{0.5, 0.75, 1.0});
    CHECK(read_log_series(log, "val_accuracy", &s) == "");
    CHECK(s.values == std::vector<double>{0.625, 0.875});
    CHECK(read_log_series(log, "rewards/margins", &s) == "");
    CHECK(s.steps.empty());
    CHECK_THAT(read_log_series(dir + "/none.jsonl", "loss", &s), Catch::Contains("cannot open"));

    // four panels: two rows of three, 1200 x (40 + 2 x 300); a missing log and a missing metric
    // get panels that say so
    std::string png = dir + "/curves.png";
    draw_training_curves(png.c_str(), {{"loss", log, "loss"},
                                       {"accuracy", log, "accuracy", 0.0, 1.0},
                                       {"missing log", dir + "/none.jsonl", "loss"},
                                       {"missing metric", log, "rewards/margins"}});
    uint32_t w = 0, h = 0;
    png_size(png, &w, &h);
    CHECK(w == 1200);
    CHECK(h == 640);
    CHECK(!exists(png + ".tmp"));
    draw_training_curves(png.c_str(), {{"loss", log, "loss"}});  // one row
    png_size(png, &w, &h);
    CHECK(w == 1200);
    CHECK(h == 340);
    rm_rf(dir);
}

// the "$ " lines of a dry run
static std::vector<std::string> dry_commands(const std::string& out) {
    std::vector<std::string> cmds;
    size_t pos = 0;
    while (pos < out.size()) {
        size_t end = out.find('\n', pos);
        if (end == std::string::npos) end = out.size();
        if (out.compare(pos, 2, "$ ") == 0) cmds.push_back(out.substr(pos + 2, end - pos - 2));
        pos = end + 1;
    }
    return cmds;
}

static bool ends_with_text(const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

TEST_CASE("the recipe passes -S to every stage's program: train_sft, train_rm and sample", "[dpo][recipe]") {
    std::string dir = scratch("recipe_seed");
    make_dir(dir);
    char cwd[4096];
    REQUIRE(getcwd(cwd, sizeof(cwd)));
    std::string bin = std::string(cwd) + "/build/train_dpo_cpu", programs = std::string(cwd) + "/build/";
    std::string out;
    // in an empty folder every stage is missing: -D 1 prints their commands and runs nothing
    REQUIRE(run("cd " + dir + " && " + bin + " -S 2 -D 1", &out) == 0);
    CHECK_THAT(out, Catch::Contains("recipe: then DPO (seed 2) and the stage table"));
    std::vector<std::string> cmds = dry_commands(out);
    REQUIRE(cmds.size() == 14);  // sft 1, rm 6, xwin-set 6, rs 1
    int train = 0, sample = 0;
    for (const std::string& c : cmds) {
        if (c.rfind(programs + "train_", 0) == 0) {
            train++;
            CHECK(ends_with_text(c, " -S 2"));
        } else if (c.rfind(programs + "sample", 0) == 0) {
            sample++;
            CHECK(ends_with_text(c, " -S 2"));
        } else {  // cat, head, python3: no seed
            CHECK(c.find(" -S ") == std::string::npos);
        }
    }
    CHECK(train == 3);  // SFT, the RM, RS
    CHECK(sample == 5);
    CHECK(cmds[0] == programs + "train_sft -S 2");
    CHECK(cmds[13] == programs + "train_sft -e out/sft/model.bin -i out/set/rs.tok -j '' -o out/rs -x 0 -E 4 -l 1e-4 -u 10 -v 0 -n 0 -s 0 -S 2");
    CHECK(!exists(dir + "/out"));  // a dry run makes no folder
    // the default seed (1337): the commands as they always were, with no seed flag
    REQUIRE(run("cd " + dir + " && " + bin + " -D 1", &out) == 0);
    std::vector<std::string> plain = dry_commands(out);
    REQUIRE(plain.size() == 14);
    CHECK(plain[0] == programs + "train_sft");
    CHECK(plain[1] == programs + "sample -m set -A 8 -T 0.7 -i data/world/rm_prompts.jsonl -o out/xwin_pair/samples.jsonl");
    for (const std::string& c : plain) CHECK(c.find(" -S ") == std::string::npos);
    REQUIRE(run("cd " + dir + " && " + bin + " -S 1337 -D 1", &out) == 0);
    CHECK(dry_commands(out) == plain);
    // a stage whose output is there is skipped, and so its commands are not printed
    make_dir(dir + "/out/sft");
    write_text(dir + "/out/sft/model.bin", "");
    REQUIRE(run("cd " + dir + " && " + bin + " -S 2 -D 1", &out) == 0);
    CHECK_THAT(out, Catch::Contains("recipe: sft is there"));
    CHECK(dry_commands(out).size() == 13);
    // -D is for the recipe only
    CHECK(run(bin + " -e x.bin -i y.pairs -D 1", &out) == 1);
    CHECK_THAT(out, Catch::Contains("-D"));
    rm_rf(dir);
}

TEST_CASE("the recipe's closing report: the stage table, the seed's commands, the training curves", "[dpo][recipe]") {
    // a run folder whose stages before DPO are all there (small models, arithmetic pairs, an SFT
    // log by hand, no reward model log): the recipe trains DPO 2 steps, then the stage table
    std::string dir = scratch("recipe_report"), out;
    char cwd[4096];
    REQUIRE(getcwd(cwd, sizeof(cwd)));
    for (const char* sub : {"/out/sft", "/out/rm", "/out/set", "/out/rs"}) make_dir(dir + sub);
    REQUIRE(symlink((std::string(cwd) + "/data").c_str(), (dir + "/data").c_str()) == 0);
    std::string model = write_small_model("recipe_model.bin", 32, 2);
    std::vector<unsigned char> weights = file_bytes(model);
    write_bytes(dir + "/out/sft/model.bin", weights);
    write_bytes(dir + "/out/rs/model.bin", weights);
    write_bytes(dir + "/out/rm/model.bin", {});
    std::string train = write_arith_pairs("recipe_train", 16, 3), val = write_arith_pairs("recipe_val", 8, 4);
    write_bytes(dir + "/out/set/dpo_train.pairs", file_bytes(train));
    write_bytes(dir + "/out/set/dpo_val.pairs", file_bytes(val));
    write_text(dir + "/out/sft/log.jsonl", "{\"step\": 1, \"loss\": 5.000000}\n{\"step\": 2, \"loss\": 4.000000}\n{\"step\": 2, \"val_loss\": 4.500000}\n");
    REQUIRE(run("cd " + dir + " && " + cwd + "/build/train_dpo_cpu -S 2 -x 2 -u 1 -v 2", &out) == 0);
    INFO(out);
    CHECK_THAT(out, Catch::Contains("recipe: rs is there"));
    CHECK_THAT(out, Catch::Contains("wrote out/report.md, out/report.png and out/curves.png"));
    std::vector<unsigned char> md = file_bytes(dir + "/out/report.md");
    std::string report(md.begin(), md.end());
    CHECK_THAT(report, Catch::Contains("Seed 2 (`-S`), passed to every stage."));
    CHECK_THAT(report, Catch::Contains("| win rate vs SFT | right answers | wall time |"));
    CHECK_THAT(report, Catch::Contains("![training curves](curves.png)"));
    CHECK_THAT(report, Catch::Contains("\n    ./train_sft -S 2\n"));
    CHECK_THAT(report, Catch::Contains("-o out/set/xwin_set.jsonl -S 2\n"));
    uint32_t w = 0, h = 0;
    png_size(dir + "/out/curves.png", &w, &h);
    CHECK(w == 1200);  // six panels, two rows
    CHECK(h == 640);
    CHECK(!exists(dir + "/out/curves.png.tmp"));
    // DPO's log, which the curves read: its 2 steps and the validation at step 2
    LogSeries s;
    CHECK(read_log_series(dir + "/out/dpo/log.jsonl", "rewards/margins", &s) == "");
    CHECK(s.steps == std::vector<double>{1, 2});
    CHECK(read_log_series(dir + "/out/dpo/log.jsonl", "val_rewards/margins", &s) == "");
    CHECK(s.steps == std::vector<double>{2});
    for (const std::string& f : {model, train, val}) remove(f.c_str());
    rm_rf(dir);
}

TEST_CASE("dev/recipe_seeds.py: the stage means of the seeds' reports, their mean, range and deviation", "[dpo][recipe]") {
    std::string runs = scratch("seed_runs");
    std::string table = "| stage | gold judge mean | arith | reverse | sort | count | max | followup | win rate vs SFT | right answers | wall time |\n"
                        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
                        "| SFT | %s | 1.6 | 1.0 | 2.5 | 3.7 | 6.2 | 0.2 | 0.500 | %s | 374 s |\n"
                        "| reward model (Xwin-Pair) | | | | | | | | | | 441 s |\n"
                        "| Xwin-Set (64 answers a prompt) | | | | | | | | | | 356 s |\n"
                        "| RS | %s | 2.9 | 1.8 | 3.6 | 6.2 | 9.4 | 0.0 | 0.672 | %s | 17 s |\n"
                        "| DPO | %s | 3.2 | 2.1 | 3.9 | 6.2 | 9.1 | 0.0 | 0.677 | %s | 36 s |\n"
                        "| total | | | | | | | | | | 1226 s |\n";
    const char* means[2][3] = {{"2.00", "4.00", "4.25"}, {"3.00", "5.00", "4.75"}};
    const char* right[2][3] = {{"81", "90", "95"}, {"84", "90", "100"}};
    for (int i = 0; i < 2; i++) {
        std::string d = runs + "/seed_" + std::to_string(i + 1);
        make_dir(d + "/out");
        write_text(d + "/out/report.md", string_format(table.c_str(), means[i][0], right[i][0], means[i][1], right[i][1], means[i][2], right[i][2]));
    }
    // train_rm's closing lines, in the recipe's output
    write_text(runs + "/seed_1/recipe.log", "held-out pairs: accuracy 0.600, Spearman 0.300 with the gold ratings, loss 0.6000\n"
                                            "  arith      accuracy 0.500 | Spearman 0.100\n  followup   accuracy 0.700 | Spearman 0.200\nsaved\n");
    write_text(runs + "/seed_2/recipe.log", "held-out pairs: accuracy 0.800, Spearman 0.300 with the gold ratings, loss 0.6000\n"
                                            "  arith      accuracy 0.700 | Spearman 0.100\n");
    // seed 3 stopped after the reward model: no report, no closing lines, its log.jsonl's last val_accuracy
    make_dir(runs + "/seed_3/out/rm");
    write_text(runs + "/seed_3/out/rm/log.jsonl", "{\"step\": 10, \"val_loss\": 0.600000, \"val_accuracy\": 0.500000}\n"
                                                 "{\"step\": 20, \"loss\": 0.500000, \"accuracy\": 0.900000}\n"
                                                 "{\"step\": 20, \"val_loss\": 0.600000, \"val_accuracy\": 0.750000}\n");
    std::string out;
    REQUIRE(run("python3 dev/recipe_seeds.py --runs " + runs + " --seeds 1 2 3 --report-only", &out) == 0);
    // means 2.50, 4.50, 4.50; sample deviations sqrt(2 x 0.5^2) = 0.71 and sqrt(2 x 0.25^2) = 0.35
    CHECK_THAT(out, Catch::Contains("| | seed 1 | seed 2 | seed 3 | mean | min..max | std |"));
    CHECK_THAT(out, Catch::Contains("| SFT | 2.00 | 3.00 | - | 2.50 | 2.00..3.00 | 0.71 |"));
    CHECK_THAT(out, Catch::Contains("| RS | 4.00 | 5.00 | - | 4.50 | 4.00..5.00 | 0.71 |"));
    CHECK_THAT(out, Catch::Contains("| DPO | 4.25 | 4.75 | - | 4.50 | 4.25..4.75 | 0.35 |"));
    // the right answers' column: means 82.5, 90, 97.5; deviations sqrt(2 x 1.5^2) = 2.1, 0, sqrt(2 x 2.5^2) = 3.5
    CHECK_THAT(out, Catch::Contains("| SFT | 81.0 | 84.0 | - | 82.5 | 81.0..84.0 | 2.1 |"));
    CHECK_THAT(out, Catch::Contains("| RS | 90.0 | 90.0 | - | 90.0 | 90.0..90.0 | 0.0 |"));
    CHECK_THAT(out, Catch::Contains("| DPO | 95.0 | 100.0 | - | 97.5 | 95.0..100.0 | 3.5 |"));
    CHECK_THAT(out, Catch::Contains("no report: " + runs + "/seed_3/out/report.md"));
    // 0.600, 0.800, 0.750: mean 0.7167, deviation sqrt((0.1167^2 + 0.0833^2 + 0.0333^2) / 2) = 0.104
    CHECK_THAT(out, Catch::Contains("| all | 0.600 | 0.800 | 0.750 | 0.717 | 0.600..0.800 | 0.104 |"));
    CHECK_THAT(out, Catch::Contains("| arith | 0.500 | 0.700 | - | 0.600 | 0.500..0.700 | 0.141 |"));
    CHECK_THAT(out, Catch::Contains("| followup | 0.700 | - | - | 0.700 | 0.700..0.700 | 0.000 |"));
    // --dry-run: the run folders' links and the recipe's command per seed, nothing made
    REQUIRE(run("python3 dev/recipe_seeds.py --runs " + runs + " --seeds 1337 2 --binary /x/train_dpo --dry-run", &out) == 0);
    CHECK_THAT(out, Catch::Contains("cd " + runs + "/seed_1337 && /x/train_dpo -S 1337 >> recipe.log 2>&1"));
    CHECK_THAT(out, Catch::Contains("cd " + runs + "/seed_2 && /x/train_dpo -S 2 >> recipe.log 2>&1"));
    CHECK_THAT(out, Catch::Contains("/data " + runs + "/seed_2/data"));
    CHECK_THAT(out, Catch::Contains("/dev " + runs + "/seed_2/dev"));
    CHECK(!exists(runs + "/seed_1337"));
    // a run, with a stand-in for train_dpo that writes a report (through the data/ link) and
    // fails for seed 5: each run folder gets its links, the output goes to recipe.log
    std::string fake = scratch("fake_train_dpo.sh");
    write_text(fake, "#!/bin/sh\necho \"fake recipe $*\"\n[ \"$2\" = 5 ] && exit 3\nmkdir -p out\n"
                     "printf '| SFT | %s.00 | x |\\n' $(head -c 1 data/world/README.md | wc -c) > out/report.md\n");
    REQUIRE(chmod(fake.c_str(), 0755) == 0);
    CHECK(run("python3 dev/recipe_seeds.py --runs " + runs + " --seeds 4 5 --binary " + fake, &out) == 1);
    CHECK_THAT(out, Catch::Contains("seed 4: done"));
    CHECK_THAT(out, Catch::Contains("seed 5: failed (exit 3)"));
    CHECK_THAT(out, Catch::Contains("| SFT | 1.00 | - | 1.00 | 1.00..1.00 | 0.00 |"));
    std::vector<unsigned char> log = file_bytes(runs + "/seed_4/recipe.log");
    CHECK_THAT(std::string(log.begin(), log.end()), Catch::Contains("fake recipe -S 4"));
    CHECK(exists(runs + "/seed_5/dev/recipe_seeds.py"));
    remove(fake.c_str());
    rm_rf(runs);
}
