// dev/data/prepare_sft.py itself, run as a user runs it (python3, byte tokenizer) on the
// conversations of the loss-mask fixture test/fixtures/sft_mask/chats.jsonl, into a scratch
// file under /tmp. Its token file is compared with two references that do not come from
// prepare_sft.py:
//   - the tokens, mask and lengths in test/fixtures/sft_mask/expect.bin, which
//     dev/data/make_sft_fixture.py takes from a Hugging Face chat template written in Jinja
//     (apply_chat_template with {% generation %}, return_assistant_tokens_mask=True);
//   - the template worked out by hand below: every conversation as literal pieces of text,
//     each marked target or not.
// A second run with --max-len 160 checks the truncation to whole turn pairs (the longest
// prefix of pairs that fits, <= max-len) and the dropping of a conversation whose first pair
// does not fit. A missing python3, or a script that fails, fails the test with its message.
// Run from the repository root so that the paths resolve.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "fixture.h"

namespace {

const char* const FIXTURE = "test/fixtures/sft_mask/";
constexpr int BYTE_BOS = 256, BYTE_EOS = 257, BYTE_VOCAB = 259;

std::string prepare_temp_path(const char* name) { return std::string("/tmp/xwin_test_prepare_") + std::to_string(getpid()) + "_" + name; }


// Runs prepare_sft.py on the fixture's conversations into out_path; fails the test when
// python3 is missing or the script fails.
void run_prepare(const std::string& out_path, int max_len) {
    std::string output;
    if (run_command("command -v python3", &output) != 0)
        FAIL("python3 is not on PATH: this test runs dev/data/prepare_sft.py with it (the byte-tokenizer path "
             "needs only its standard library). Install python3.");
    std::string cmd = "python3 dev/data/prepare_sft.py " + std::string(FIXTURE) + "chats.jsonl " + out_path +
                      " --tokenizer byte --max-len " + std::to_string(max_len);
    int rc = run_command(cmd, &output);
    INFO("$ " << cmd << "\n" << output);
    REQUIRE(rc == 0);
}

// A conversation as the template renders it, worked out by hand: BOS, then pieces of text
// (mask 0 for the template and the user's turns, 1 for an assistant's answer), each answer
// followed by EOS with mask 1.
struct Piece {
    std::string text;
    bool target;
};
const char* const DEFAULT_SYSTEM =
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.";
const std::vector<std::vector<Piece>> HAND = {
    {{"Solve the task. USER: Add 12 and 7. ASSISTANT: ", false},
     {"The answer is 19.", true},
     {"USER: Now double it. ASSISTANT: ", false},
     {"The answer is 38.", true}},
    {{std::string(DEFAULT_SYSTEM) + " USER: Reverse the word 'cat'. ASSISTANT: ", false},
     {"The answer is tac.", true}},
    {{"R\xc3\xa9ponds en une ligne. USER: Un mot pour \xc2\xab caf\xc3\xa9 \xc2\xbb ? ASSISTANT: ", false},
     {"Espresso, ou cr\xc3\xa8me: tr\xc3\xa8s bon.", true},
     {"USER: Et en anglais? ASSISTANT: ", false},
     {"Coffee  (two spaces,\ta tab).", true},
     {"USER: USER: ASSISTANT: ? ASSISTANT: ", false},
     {"\xc3\x87" "a va, c'est not\xc3\xa9", true}},
};

// The ids and mask of the first n_pieces pieces of a hand-worked conversation.
void hand_encode(const std::vector<Piece>& pieces, size_t n_pieces, std::vector<int>* ids, std::vector<uint8_t>* mask) {
    ids->assign(1, BYTE_BOS);
    mask->assign(1, 0);
    for (size_t p = 0; p < n_pieces; p++) {
        for (unsigned char c : pieces[p].text) {
            ids->push_back(c);
            mask->push_back(pieces[p].target);
        }
        if (pieces[p].target) {
            ids->push_back(BYTE_EOS);
            mask->push_back(1);
        }
    }
}

std::vector<int> seq_tokens(const TokenData& d, size_t i) {
    return std::vector<int>(d.tokens.begin() + (long)d.offsets[i], d.tokens.begin() + (long)d.offsets[i + 1]);
}
std::vector<uint8_t> seq_mask(const TokenData& d, size_t i) {
    return std::vector<uint8_t>(d.mask.begin() + (long)d.offsets[i], d.mask.begin() + (long)d.offsets[i + 1]);
}

// The chat template's tokens and mask of each fixture conversation (expect.bin).
void template_sequences(std::vector<std::vector<int>>* ids, std::vector<std::vector<uint8_t>>* masks) {
    std::map<std::string, FixtureTensor> e = fixture_load(std::string(FIXTURE) + "expect.bin");
    const std::vector<float>&tokens = e["tokens"].data, &mask = e["mask"].data, &lengths = e["lengths"].data;
    REQUIRE(lengths.size() == HAND.size());
    REQUIRE(tokens.size() == mask.size());
    size_t at = 0;
    for (float len : lengths) {
        REQUIRE(at + (size_t)len <= tokens.size());
        ids->emplace_back();
        masks->emplace_back();
        for (size_t i = at; i < at + (size_t)len; i++) {
            ids->back().push_back((int)tokens[i]);
            masks->back().push_back((uint8_t)mask[i]);
        }
        at += (size_t)len;
    }
    REQUIRE(at == tokens.size());
}

}  // namespace

TEST_CASE("prepare_sft.py writes the chat template's tokens and loss mask", "[prepare][world]") {
    const std::string out = prepare_temp_path("full.tok");
    run_prepare(out, 256);
    TokenData data;
    tokens_load(&data, out.c_str(), BYTE_VOCAB);
    remove(out.c_str());
    std::vector<std::vector<int>> tmpl_ids;
    std::vector<std::vector<uint8_t>> tmpl_masks;
    template_sequences(&tmpl_ids, &tmpl_masks);
    REQUIRE(data.n_seqs == HAND.size());
    size_t targets = 0;
    for (size_t i = 0; i < data.n_seqs; i++) {
        INFO("conversation " << i);
        std::vector<int> ids = seq_tokens(data, i), hand_ids;
        std::vector<uint8_t> mask = seq_mask(data, i), hand_mask;
        hand_encode(HAND[i], HAND[i].size(), &hand_ids, &hand_mask);
        // the two references agree with each other, so neither is a typo
        REQUIRE(hand_ids == tmpl_ids[i]);
        REQUIRE(hand_mask == tmpl_masks[i]);
        CHECK(ids == tmpl_ids[i]);
        CHECK(mask == tmpl_masks[i]);
        for (uint8_t m : mask) targets += m;
    }
    // the six answers' UTF-8 bytes (17, 17, 18, 31, 28, 19) and one EOS after each
    CHECK(targets == 17 + 17 + 18 + 31 + 28 + 19 + 6);
}

TEST_CASE("prepare_sft.py keeps the whole turn pairs that fit in --max-len", "[prepare][world]") {
    // lengths in tokens: conversation 0: 66 after its first pair, 116 whole; 1: 216 (one pair);
    // 2: 99, 160, 216. With --max-len 160: 0 whole, 1 dropped, 2 cut to its first two pairs,
    // exactly 160 tokens (a pair that ends at max-len fits).
    const std::string out = prepare_temp_path("cut.tok");
    run_prepare(out, 160);
    TokenData data;
    tokens_load(&data, out.c_str(), BYTE_VOCAB);
    remove(out.c_str());
    std::vector<std::vector<int>> tmpl_ids;
    std::vector<std::vector<uint8_t>> tmpl_masks;
    template_sequences(&tmpl_ids, &tmpl_masks);
    REQUIRE(data.n_seqs == 2);
    CHECK(seq_tokens(data, 0) == tmpl_ids[0]);
    CHECK(seq_mask(data, 0) == tmpl_masks[0]);
    // conversation 2 up to the EOS of its second answer (pieces: prompt, answer, prompt, answer)
    std::vector<int> hand_ids;
    std::vector<uint8_t> hand_mask;
    hand_encode(HAND[2], 4, &hand_ids, &hand_mask);
    REQUIRE(hand_ids.size() == 160);
    REQUIRE(std::vector<int>(tmpl_ids[2].begin(), tmpl_ids[2].begin() + 160) == hand_ids);
    CHECK(seq_tokens(data, 1) == hand_ids);
    CHECK(seq_mask(data, 1) == hand_mask);
}
