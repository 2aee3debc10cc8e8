// The reward-model stage as programs: dev/data/prepare_pairs.py against a rendering of the
// template written out here, the pair file's checked loader, and train_rm (the CPU build and
// the CUDA kernels through the emulation layer): its refusals, that it learns to rank pairs,
// and its exact resume. The binaries are build/train_rm_cpu and build/train_rm_emu.
#include <catch2/catch.hpp>

#include "program.h"

static const char* const SYSTEM =
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite "
    "answers to the user's questions.";

// The byte tokenizer's rendering of a conversation, written out by hand from the template
// (<s>{system} USER: {user} ASSISTANT: {answer}</s>...): ids and the length of the prompt
// before the final answer.
static std::vector<int> render(const std::vector<std::string>& turns, size_t* prompt_len) {
    std::string text = std::string(SYSTEM) + " ";
    std::vector<int> ids = {256};  // BOS
    for (size_t i = 0; i < turns.size(); i += 2) {
        text += "USER: " + turns[i] + " ASSISTANT: ";
        for (unsigned char ch : text) ids.push_back(ch);
        text.clear();
        *prompt_len = ids.size();
        for (unsigned char ch : turns[i + 1]) ids.push_back(ch);
        ids.push_back(257);  // EOS
    }
    return ids;
}

TEST_CASE("prepare_pairs.py writes the template's tokens, prompt lengths, ratings and groups", "[rm][prepare]") {
    std::string in = scratch("pairs.jsonl"), out_path = scratch("pairs.pairs"), out;
    std::string text = pair_json({"What is 2 plus 3?"}, "The answer is 5.", "The answer is 6.", 10, 0, "arith") +
                       pair_json({"Reverse 'abc'.", "cba", "And again?"}, "abc", "I do not know.", 8, 2, "followup");
    write_bytes(in, std::vector<unsigned char>(text.begin(), text.end()));
    REQUIRE(run("python3 dev/data/prepare_pairs.py " + in + " " + out_path + " --tokenizer byte", &out) == 0);
    INFO(out);
    PairData p;
    pairs_load(&p, out_path.c_str(), 259);
    REQUIRE(p.n_pairs == 2);
    CHECK(p.groups == std::vector<std::string>{"arith", "followup"});  // sorted names
    struct Want { std::vector<std::string> chosen, rejected; float sc, sr; uint32_t group; };
    std::vector<Want> want = {{{"What is 2 plus 3?", "The answer is 5."}, {"What is 2 plus 3?", "The answer is 6."}, 10, 0, 0},
                              {{"Reverse 'abc'.", "cba", "And again?", "abc"}, {"Reverse 'abc'.", "cba", "And again?", "I do not know."}, 8, 2, 1}};
    for (size_t i = 0; i < 2; i++) {
        size_t prompt_c, prompt_r;
        std::vector<int> c = render(want[i].chosen, &prompt_c), r = render(want[i].rejected, &prompt_r);
        REQUIRE(prompt_c == prompt_r);
        const TokenData& d = p.seqs;
        CHECK(std::vector<int>(d.tokens.begin() + d.offsets[2 * i], d.tokens.begin() + d.offsets[2 * i + 1]) == c);
        CHECK(std::vector<int>(d.tokens.begin() + d.offsets[2 * i + 1], d.tokens.begin() + d.offsets[2 * i + 2]) == r);
        CHECK(p.pairs[i].prompt_len == prompt_c);
        CHECK(p.pairs[i].score_chosen == want[i].sc);
        CHECK(p.pairs[i].score_rejected == want[i].sr);
        CHECK(p.pairs[i].group == want[i].group);
        // the mask: 1 on the final answer and its EOS (and on the earlier answer of the follow-up)
        size_t targets = 0;
        for (uint64_t j = d.offsets[2 * i] + prompt_c; j < d.offsets[2 * i + 1]; j++) targets += d.mask[j];
        CHECK(targets == c.size() - prompt_c);
    }
    // bad lines: named with their line numbers, nothing written
    std::string bad = pair_json({"Q?"}, "A", "B", 5, 5, "arith") + pair_json({"Q?"}, "A", "B", 1, 2, "arith") +
                      "{\"chosen\": " + conversation_json({"Q?", "A"}) + ", \"rejected\": " + conversation_json({"Other?", "B"}) +
                      ", \"score_chosen\": 2, \"score_rejected\": 1}\n" + "{\"chosen\": " + conversation_json({"Q?", "A"}) + "}\n";
    write_bytes(in, std::vector<unsigned char>(bad.begin(), bad.end()));
    remove(out_path.c_str());
    CHECK(run("python3 dev/data/prepare_pairs.py " + in + " " + out_path + " --tokenizer byte", &out) == 1);
    CHECK_THAT(out, Catch::Contains(in + ":1: score_chosen 5.0 is not above score_rejected 5.0"));
    CHECK_THAT(out, Catch::Contains(in + ":2: score_chosen 1.0 is not above score_rejected 2.0"));
    CHECK_THAT(out, Catch::Contains(in + ":3: chosen and rejected differ before their final assistant message"));
    CHECK_THAT(out, Catch::Contains(in + ":4: no 'rejected' conversation"));
    CHECK(!exists(out_path));
    remove(in.c_str());
}

TEST_CASE("the pair loader refuses pairs whose prompt tokens differ, naming the file", "[rm]") {
    std::string in = scratch("one.jsonl"), path = scratch("one.pairs"), out;
    std::string text = pair_json({"What is 2 plus 3?"}, "The answer is 5.", "The answer is 6.", 10, 0, "arith");
    write_bytes(in, std::vector<unsigned char>(text.begin(), text.end()));
    REQUIRE(run("python3 dev/data/prepare_pairs.py " + in + " " + path + " --tokenizer byte", &out) == 0);
    PairData p;
    REQUIRE(pairs_load_checked(&p, path.c_str(), 259) == "");
    std::vector<unsigned char> b = file_bytes(path);
    // the rejected sequence's token 5 (inside the prompt): header, 1 group name, 1 record, 3 offsets, then tokens
    size_t at = 64 + 16 + 16 + 3 * 8 + 4 * (p.seqs.offsets[1] + 5);
    b[at] ^= 1;
    write_bytes(path, b);
    CHECK_THAT(pairs_load_checked(&p, path.c_str(), 259), Catch::Contains("pair 0: the chosen and rejected prompts differ at token 5"));
    // the header's bytes 24..63 are reserved: zero, as in every reader's header
    for (size_t at : {(size_t)24, (size_t)63}) {
        std::vector<unsigned char> r = file_bytes(path);
        r[at] = 0x40;
        write_bytes(path + ".reserved", r);
        CHECK_THAT(pairs_load_checked(&p, (path + ".reserved").c_str(), 259), Catch::Contains(string_format("reserved header byte %zu is 0x40, not zero", at)));
    }
    remove((path + ".reserved").c_str());
    std::string sft = write_small_model("refuse_sft.bin");
    CHECK(run("build/train_rm_cpu -o " + scratch("rm_refuse") + " -e " + sft + " -i " + path, &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: " + path + ": pair 0: the chosen and rejected prompts differ"));
    remove(in.c_str()), remove(path.c_str()), remove(sft.c_str()), rm_rf(scratch("rm_refuse"));
}

TEST_CASE("train_rm without its SFT model says the command that makes it", "[rm]") {
    std::string out;
    CHECK(run("build/train_rm_cpu -o " + scratch("rm_nosft") + " -e " + scratch("missing_sft.bin"), &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: " + scratch("missing_sft.bin") + ": cannot read the SFT model the reward model starts from: make it with ./train_sft"));
    rm_rf(scratch("rm_nosft"));
}

TEST_CASE("train_rm learns to rank held-out pairs, and resumes bit-identically", "[rm]") {
    std::string sft = write_small_model("rm_sft.bin", 32, 2), train = write_arith_pairs("rm_train", 256, 1), val = write_arith_pairs("rm_val", 64, 2);
    std::string common = "build/train_rm_cpu -e " + sft + " -i " + train + " -j " + val + " -b 16 -d 16 -x 48 -u 4 -l 3e-3 -v 48 -n 0 -S 3";
    std::string dir = scratch("rm_run"), resumed = scratch("rm_resumed"), out;
    REQUIRE(run(common + " -o " + dir, &out) == 0);
    INFO(out);
    std::vector<double> losses;
    double val_acc = -1;
    FILE* f = fopen_check((dir + "/log.jsonl").c_str(), "r");
    char line[1024];
    while (fgets(line, sizeof(line), f)) {
        const char* p;
        double x;
        if ((p = strstr(line, "\"val_accuracy\": ")) && sscanf(p + 16, "%lf", &x) == 1) val_acc = x;
        else if ((p = strstr(line, "\"loss\": ")) && sscanf(p + 8, "%lf", &x) == 1) losses.push_back(x);
    }
    fclose(f);
    REQUIRE(losses.size() == 48);
    double first = (losses[0] + losses[1] + losses[2]) / 3, last = (losses[45] + losses[46] + losses[47]) / 3;
    printf("train_rm on arithmetic pairs: loss %.3f -> %.3f, held-out accuracy %.3f\n", first, last, val_acc);
    // a new score head starts at log 2 = 0.693 (scores ~ 0); 48 steps on the answers' form
    // bring it to ~0.50, a margin of ~0.6 on every pair (0.55 leaves room), and the held-out
    // pairs come out right (chance is 0.5)
    CHECK(first > 0.65);
    CHECK(last < 0.55);
    CHECK(val_acc > 0.9);
    Llama rm;
    llama_load(&rm, (dir + "/model.bin").c_str());
    CHECK(rm.config.head_type == HEAD_REWARD);
    CHECK(rm.config.pad_id == 258);  // the byte tokenizer's, which pads the batches
    llama_free(&rm);
    // exact resume, on the CPU build and the emulated kernels (one thread: fixed atomics order)
    for (std::string binary : {"build/train_rm_cpu", "build/train_rm_emu"}) {
        check_exact_resume("XWIN_EMU_THREADS=1 " + binary + " -e " + sft + " -i " + val + " -j '' -b 4 -d 8 -x 5 -u 2 -l 3e-3 -n 0 -S 3", "rm");
    }
    rm_rf(dir), rm_rf(resumed), remove(sft.c_str()), remove(train.c_str()), remove(val.c_str());
}
