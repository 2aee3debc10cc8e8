// The task world (data/world, dev/data/make_world.py) and the SFT loss mask.
//   - world_judge must give the Python judge's score on every recorded case of
//     test/fixtures/world/judge_cases.txt (exact, sloppy and wrong responses, edge cases);
//   - the eval prompts file loads, every prompt's canonical answer scores 10, and the
//     prompt renders in the Vicuna v1.1 template;
//   - test/fixtures/sft_mask (dev/data/make_sft_fixture.py): the token file that
//     dev/data/prepare_sft.py wrote must hold the ids and loss mask that a Hugging Face
//     chat template with {% generation %} gives, and the masked mean loss of llm.cu must
//     equal PyTorch's (float64) on them.
// Run from the repository root so that the paths resolve.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <fstream>
#include <map>
#include <sstream>

#include "../llm.cu"
#include "fixture.h"

namespace {

std::string world_temp_path(const char* name) { return std::string("/tmp/xwin_test_world_") + std::to_string(getpid()) + "_" + name; }

std::vector<std::string> split_tabs(const std::string& line) {
    std::vector<std::string> fields;
    std::stringstream ss(line);
    std::string f;
    while (std::getline(ss, f, '\t')) fields.push_back(f);
    return fields;
}

void write_text(const std::string& path, const std::string& text) {
    std::ofstream f(path, std::ios::binary);
    f << text;
}

}  // namespace

TEST_CASE("world judge equals the Python judge on the recorded cases", "[world]") {
    std::ifstream f("test/fixtures/world/judge_cases.txt");
    REQUIRE(f.good());
    std::string line;
    int n = 0, line_no = 0;
    std::map<int, int> by_score;
    while (std::getline(f, line)) {
        line_no++;
        if (line.empty() || line[0] == '#') continue;
        std::vector<std::string> fields = split_tabs(line);
        REQUIRE(fields.size() == 4);
        int expect = std::stoi(fields[0]);
        std::string response = hex_decode(fields[3]);
        INFO("line " << line_no << ": kind " << fields[1] << ", gold " << fields[2] << ", response '" << response << "'");
        CHECK(world_judge(fields[1], fields[2], response) == expect);
        by_score[expect]++;
        n++;
    }
    CHECK(n >= 300);
    for (int s : {0, 2, 4, 5, 6, 9, 10}) CHECK(by_score[s] > 0);  // every rule is exercised
}

TEST_CASE("world judge rules", "[world]") {
    CHECK(world_judge("arith", "19", "The answer is 19.") == 10);
    CHECK(world_judge("arith", "19", "The answer is 19. ") == 9);
    CHECK(world_judge("arith", "19", "Sure! The answer is 19.") == 6);
    CHECK(world_judge("arith", "19", "the answer is 19") == 5);
    CHECK(world_judge("arith", "19", "19.") == 4);
    CHECK(world_judge("reverse", "tac", "The answer is TAC.") == 2);
    CHECK(world_judge("arith", "19", "The answer is 20.") == 0);
    CHECK(world_judge("arith", "19", "The answer is 19 or 20.") == 0);
    CHECK(world_judge("arith", "19", "The answer is 18. The answer is 19.") == 0);
    CHECK(world_judge("arith", "19", "") == 0);
    CHECK(world_judge("arith", "19", std::string("The answer is 19.\0", 18)) == 6);  // NUL is no whitespace
    CHECK(world_judge("poetry", "19", "The answer is 19.") == -1);
    CHECK(world_judge("arith", "", "The answer is .") == -1);
    CHECK(world_canonical("tac") == "The answer is tac.");
}

TEST_CASE("world eval prompts load and render in the Vicuna template", "[world]") {
    std::vector<WorldPrompt> prompts = world_load_prompts("data/world/eval_prompts.tsv");
    REQUIRE(prompts.size() == 200);
    std::map<std::string, int> per_kind;
    for (const WorldPrompt& p : prompts) {
        per_kind[p.kind]++;
        REQUIRE(p.messages.size() >= 2);
        REQUIRE(p.messages.size() % 2 == 0);
        CHECK(p.messages[0] == "Solve the task.");
        CHECK(p.messages.size() == (p.kind == "followup" ? 4u : 2u));
        CHECK(world_judge(p.kind, p.gold, world_canonical(p.gold)) == 10);
    }
    CHECK(per_kind.size() == 6);
    for (auto& kv : per_kind) CHECK(kv.second >= 30);

    // chat_encode_prompt renders a world prompt as prepare_sft.py renders training rows
    Tokenizer tok;
    tokenizer_load(&tok, "data/world/byte.tokenizer");
    const int BOS = 256, EOS = 257;
    auto bytes = [](const std::string& s) { return std::vector<int>(s.begin(), s.end()); };
    std::vector<int> ids, expect(1, BOS);
    chat_encode_prompt(&tok, "Solve the task.", {"Add 12 and 7."}, ids);
    for (int c : bytes("Solve the task. USER: Add 12 and 7. ASSISTANT: ")) expect.push_back(c);
    CHECK(ids == expect);
    chat_encode_prompt(&tok, "Solve the task.", {"Add 12 and 7.", "The answer is 19.", "Now double it."}, ids);
    expect.assign(1, BOS);
    for (int c : bytes("Solve the task. USER: Add 12 and 7. ASSISTANT: The answer is 19.")) expect.push_back(c);
    expect.push_back(EOS);
    for (int c : bytes("USER: Now double it. ASSISTANT: ")) expect.push_back(c);
    CHECK(ids == expect);
    tokenizer_free(&tok);
}

TEST_CASE("world eval prompts loader refuses malformed files", "[world]") {
    struct Bad { const char* text; const char* message; };
    const Bad cases[] = {
        {"# only a comment\n", "no prompts"},
        {"arith\t19\tSolve the task.\n", "line 1: 3 fields"},
        {"# c\narith\t19\tS\tU\tA\n", "line 2: 5 fields"},
        {"poetry\t19\tS\tU\n", "line 1: unknown kind 'poetry'"},
        {"arith\t19\tS\tU\narith\t\tS\tU\n", "line 2: empty field"},
    };
    std::string path = world_temp_path("bad.tsv");
    for (const Bad& b : cases) {
        write_text(path, b.text);
        std::vector<WorldPrompt> prompts;
        std::string err = world_load_prompts_checked(&prompts, path.c_str());
        INFO("file '" << b.text << "' gave '" << err << "'");
        CHECK(err.find(b.message) == 0);
    }
    write_text(path, "arith\t19\tS\tU\r\n\nfollowup\tTAC\tS\tU1\tA1\tU2");  // CRLF, blank line, no final newline
    std::vector<WorldPrompt> prompts;
    CHECK(world_load_prompts_checked(&prompts, path.c_str()) == "");
    REQUIRE(prompts.size() == 2);
    CHECK(prompts[0].messages.back() == "U");
    CHECK(prompts[1].messages == std::vector<std::string>{"S", "U1", "A1", "U2"});
    unlink(path.c_str());
    CHECK(world_load_prompts_checked(&prompts, path.c_str()).find("cannot open") == 0);
}

TEST_CASE("world SFT token files: BOS first, every EOS a target, ends on EOS", "[world]") {
    TokenData d;
    tokens_load(&d, "data/world/sft_val.tok", 259);
    REQUIRE(d.n_seqs == 500);
    for (size_t i = 0; i < d.n_seqs; i++) {
        size_t a = d.offsets[i], b = d.offsets[i + 1];
        REQUIRE(d.tokens[a] == 256);
        REQUIRE(d.mask[a] == 0);
        REQUIRE(d.tokens[b - 1] == 257);
        for (size_t t = a; t < b; t++) {
            if (d.tokens[t] == 257) REQUIRE(d.mask[t] == 1);
            REQUIRE(d.tokens[t] != 258);
        }
    }
    Tokenizer tok;
    tokenizer_load(&tok, "data/world/byte.tokenizer");
    std::vector<int> ids;
    tokenizer_encode(&tok, "The answer is 19.", ids);
    CHECK(tokenizer_decode(&tok, ids.data(), (int)ids.size()) == "The answer is 19.");
    tokenizer_free(&tok);
}

TEST_CASE("SFT loss mask equals the chat template's, masked loss equals PyTorch", "[world][parity]") {
    const std::string dir = "test/fixtures/sft_mask/";
    Llama model;
    llama_load(&model, (dir + "model.bin").c_str());
    TokenData data;
    tokens_load(&data, (dir + "sft.tok").c_str(), model.config.vocab_size);
    std::map<std::string, FixtureTensor> e = fixture_load(dir + "expect.bin");

    // the token file of prepare_sft.py against the independent template
    size_t B = data.n_seqs;
    REQUIRE(e["lengths"].data.size() == B);
    REQUIRE(e["tokens"].data.size() == data.tokens.size());
    for (size_t i = 0; i < B; i++) CHECK(token_seq_len(data, i) == (size_t)e["lengths"].data[i]);
    size_t mismatched_tokens = 0, mismatched_mask = 0, targets = 0;
    for (size_t i = 0; i < data.tokens.size(); i++) {
        mismatched_tokens += data.tokens[i] != (int)e["tokens"].data[i];
        mismatched_mask += data.mask[i] != (uint8_t)e["mask"].data[i];
        targets += data.mask[i];
    }
    CHECK(mismatched_tokens == 0);
    CHECK(mismatched_mask == 0);
    CHECK(targets > 0);

    // the masked loss over the padded batch
    int T = 0;
    for (size_t i = 0; i < B; i++) T = std::max(T, (int)token_seq_len(data, i));
    std::vector<int> tokens(B * T);
    std::vector<uint8_t> mask(B * T);
    tokens_fill_batch(data, 0, (int)B, T, tokens.data(), mask.data());
    llama_alloc(&model, (int)B, T, false);
    llama_forward(&model, tokens.data(), (int)B, T);
    size_t count;
    double loss = masked_mean_loss(model.acts.lp, mask.data(), B, T, &count);
    CHECK(count == targets);
    printf("sft_mask: B=%zu T=%d, %zu targets, loss %.8f vs %.8f\n", B, T, count, loss, e["loss"].data[0]);
    CHECK(loss == Approx(e["loss"].data[0]).epsilon(1e-5));
    std::vector<double> sums(B);
    sequence_logprob_sums(sums.data(), model.acts.lp, mask.data(), B, T);
    for (size_t b = 0; b < B; b++) CHECK(sums[b] == Approx(e["logprob_sums"].data[b]).epsilon(1e-5));
    llama_free(&model);
}

TEST_CASE("string_format keeps text of any length (the stage table and reports are longer than a line)", "[world]") {
    std::string row(700, 'x');
    std::string out = string_format("| %s | %d |", row.c_str(), 100);
    CHECK(out.size() == 2 + 700 + 3 + 3 + 2);  // "| ", the row, " | ", "100", " |"
    CHECK(out.substr(out.size() - 6) == " 100 |");
    CHECK(string_format("%s", "") == "");
}
