// Tokenizer tests: the SentencePiece-style BPE tokenizer must give the same ids
// and the same decoded text as sentencepiece itself on the recorded cases in
// test/fixtures/tokenizer (made by dev/make_tokenizer_fixture.py); the
// byte-level tokenizer must round-trip arbitrary bytes; the loader must refuse
// malformed files with a clear message.
//
// Run from the repository root so that the fixture paths resolve.

#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "fixture.h"

namespace {

const char* const kBpeFixture = "test/fixtures/tokenizer/bpe.tokenizer";
const char* const kCasesFixture = "test/fixtures/tokenizer/cases.txt";

std::vector<unsigned char> read_bytes(const char* path) {
    std::ifstream f(path, std::ios::binary);
    REQUIRE(f.good());
    return std::vector<unsigned char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

std::vector<int> parse_ids(const std::string& s) {
    std::vector<int> ids;
    if (s == "-") return ids;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) ids.push_back(std::stoi(item));
    return ids;
}

struct RecordedCase {
    int line;
    bool has_text;  // "E" (encode + decode) or "D" (decode only)
    std::string text;
    std::vector<int> ids;
    std::string decoded;
};

std::vector<RecordedCase> load_cases() {
    std::ifstream f(kCasesFixture);
    REQUIRE(f.good());
    std::vector<RecordedCase> cases;
    std::string line;
    int line_no = 0;
    while (std::getline(f, line)) {
        line_no++;
        if (line.empty() || line[0] == '#') continue;
        std::stringstream ss(line);
        std::string kind, a, b, c;
        ss >> kind >> a >> b;
        RecordedCase rc;
        rc.line = line_no;
        if (kind == "E") {
            ss >> c;
            REQUIRE(!c.empty());
            rc.has_text = true;
            rc.text = hex_decode(a);
            rc.ids = parse_ids(b);
            rc.decoded = hex_decode(c);
        } else {
            REQUIRE(kind == "D");
            REQUIRE(!b.empty());
            rc.has_text = false;
            rc.ids = parse_ids(a);
            rc.decoded = hex_decode(b);
        }
        cases.push_back(rc);
    }
    return cases;
}

// Serialises a tokenizer in the file format (for loader and byte-level tests).
struct TokenSpec {
    std::string piece;
    float score;
    uint8_t type;
};

void put_u32(std::vector<unsigned char>& out, uint32_t v) {
    for (int i = 0; i < 4; i++) out.push_back((unsigned char)(v >> (8 * i)));
}

std::vector<unsigned char> build_tokenizer_file(uint32_t kind, const std::vector<TokenSpec>& tokens, int bos,
                                                int eos, int unk, int pad, uint32_t flags,
                                                uint32_t version = 1) {
    std::vector<unsigned char> out = {'X', 'W', 'I', 'N', 'T', 'O', 'K', 'N'};
    put_u32(out, version);
    put_u32(out, kind);
    put_u32(out, (uint32_t)tokens.size());
    put_u32(out, (uint32_t)bos);
    put_u32(out, (uint32_t)eos);
    put_u32(out, (uint32_t)unk);
    put_u32(out, (uint32_t)pad);
    put_u32(out, flags);
    for (const TokenSpec& t : tokens) {
        uint32_t bits;
        std::memcpy(&bits, &t.score, 4);
        put_u32(out, bits);
        out.push_back(t.type);
        out.push_back((unsigned char)(t.piece.size() & 0xFF));
        out.push_back((unsigned char)(t.piece.size() >> 8));
        out.insert(out.end(), t.piece.begin(), t.piece.end());
    }
    return out;
}

std::vector<TokenSpec> byte_level_tokens() {
    std::vector<TokenSpec> tokens;
    for (int b = 0; b < 256; b++) {
        char piece[8];
        std::snprintf(piece, sizeof piece, "<0x%02X>", b);
        tokens.push_back({piece, 0.0f, (uint8_t)TOKEN_BYTE});
    }
    tokens.push_back({"<s>", 0.0f, (uint8_t)TOKEN_CONTROL});
    tokens.push_back({"</s>", 0.0f, (uint8_t)TOKEN_CONTROL});
    tokens.push_back({"<pad>", 0.0f, (uint8_t)TOKEN_CONTROL});
    return tokens;
}

std::vector<unsigned char> byte_level_file() {
    return build_tokenizer_file(TOKENIZER_BYTE_LEVEL, byte_level_tokens(), 256, 257, -1, 258, 0);
}

std::string parse_error(const std::vector<unsigned char>& bytes) {
    Tokenizer t;
    std::string err = tokenizer_parse(&t, bytes.data(), bytes.size());
    if (!err.empty()) CHECK(t.vocab_size == 0);  // a failed load leaves nothing behind
    return err;
}

std::string encode_decode_stream(const Tokenizer& t, const std::vector<int>& ids) {
    std::string out;
    bool at_start = true;
    for (int id : ids) out += tokenizer_decode_piece(&t, id, &at_start);
    return out;
}

double seconds_to_encode(const Tokenizer& t, const std::string& text, std::vector<int>& ids) {
    auto t0 = std::chrono::steady_clock::now();
    tokenizer_encode(&t, text.data(), text.size(), ids);
    auto t1 = std::chrono::steady_clock::now();
    return std::chrono::duration<double>(t1 - t0).count();
}

}  // namespace

TEST_CASE("bpe fixture loads with the expected header", "[tokenizer]") {
    Tokenizer t;
    REQUIRE(tokenizer_load_checked(&t, kBpeFixture) == "");
    CHECK(t.kind == TOKENIZER_SENTENCEPIECE_BPE);
    CHECK(t.vocab_size == 800);
    CHECK(t.unk_id == 0);
    CHECK(t.bos_id == 1);
    CHECK(t.eos_id == 2);
    CHECK(t.pad_id == -1);
    CHECK(t.add_dummy_prefix);
    CHECK(t.byte_fallback);
    CHECK(t.pieces[t.bos_id] == "<s>");
    CHECK(t.pieces[t.eos_id] == "</s>");
    for (int b = 0; b < 256; b++) {
        REQUIRE(t.byte_ids[b] >= 0);
        CHECK(t.token_byte[t.byte_ids[b]] == b);
    }
    tokenizer_free(&t);
    CHECK(t.vocab_size == 0);
    CHECK(t.pieces.empty());
}

TEST_CASE("bpe encode gives the same ids as sentencepiece", "[tokenizer]") {
    Tokenizer t;
    tokenizer_load(&t, kBpeFixture);
    std::vector<RecordedCase> cases = load_cases();
    int n_encode = 0;
    for (const RecordedCase& rc : cases) {
        if (!rc.has_text) continue;
        n_encode++;
        std::vector<int> ids;
        tokenizer_encode(&t, rc.text.data(), rc.text.size(), ids);
        INFO("cases.txt line " << rc.line);
        CHECK(ids == rc.ids);
        if (rc.text.find('\0') == std::string::npos) {  // the C-string overload agrees
            std::vector<int> ids2;
            tokenizer_encode(&t, rc.text.c_str(), ids2);
            CHECK(ids2 == ids);
        }
    }
    CHECK(n_encode >= 250);
}

TEST_CASE("bpe decode gives the same text as sentencepiece", "[tokenizer]") {
    Tokenizer t;
    tokenizer_load(&t, kBpeFixture);
    std::vector<RecordedCase> cases = load_cases();
    int n_decode_only = 0;
    for (const RecordedCase& rc : cases) {
        INFO("cases.txt line " << rc.line);
        CHECK(tokenizer_decode(&t, rc.ids.data(), (int)rc.ids.size()) == rc.decoded);
        if (rc.has_text) {
            // Encoder output never holds invalid UTF-8, so streaming agrees too.
            CHECK(encode_decode_stream(t, rc.ids) == rc.decoded);
        } else {
            n_decode_only++;
        }
    }
    CHECK(n_decode_only >= 100);
}

TEST_CASE("bpe encode appends to the caller's ids and handles edge input", "[tokenizer]") {
    Tokenizer t;
    tokenizer_load(&t, kBpeFixture);
    std::vector<int> ids = {t.bos_id};
    tokenizer_encode(&t, "hello", ids);
    REQUIRE(ids.size() > 1);
    CHECK(ids[0] == t.bos_id);
    std::vector<int> plain;
    tokenizer_encode(&t, "hello", plain);
    CHECK(std::vector<int>(ids.begin() + 1, ids.end()) == plain);
    // BOS/EOS around the text do not change the decoded text.
    ids.push_back(t.eos_id);
    CHECK(tokenizer_decode(&t, ids.data(), (int)ids.size()) == "hello");
    // Empty text gives nothing; ids outside the vocabulary decode to nothing.
    std::vector<int> none;
    tokenizer_encode(&t, "", none);
    CHECK(none.empty());
    int bad[3] = {-5, t.vocab_size, 1 << 30};
    CHECK(tokenizer_decode(&t, bad, 3) == "");
    bool at_start = true;
    CHECK(tokenizer_decode_piece(&t, -1, &at_start) == "");
    CHECK(at_start);
}

TEST_CASE("bpe encode is fast on long and adversarial text", "[tokenizer]") {
    Tokenizer t;
    tokenizer_load(&t, kBpeFixture);
    std::string recorded;
    for (const RecordedCase& rc : load_cases())
        if (rc.has_text && rc.text.size() > recorded.size()) recorded = rc.text;
    REQUIRE(recorded.size() >= 10000);
    std::vector<std::string> texts = {recorded, std::string(20000, 'a'), std::string(20000, ' ')};
    std::string cjk, mixed;
    for (int i = 0; i < 10000; i++) cjk += "\xE9\xBE\x98";  // an unseen CJK character
    for (int i = 0; i < 10; i++) mixed += recorded;         // ~100k characters
    texts.push_back(cjk);
    texts.push_back(mixed);
    for (const std::string& text : texts) {
        std::vector<int> ids;
        double s = seconds_to_encode(t, text, ids);
        INFO("text of " << text.size() << " bytes took " << s << " s");
        CHECK(s < 1.0);
        CHECK(tokenizer_decode(&t, ids.data(), (int)ids.size()) == text);
    }
}

TEST_CASE("byte-level tokenizer round-trips arbitrary bytes", "[tokenizer]") {
    std::vector<unsigned char> file = byte_level_file();
    Tokenizer t;
    REQUIRE(tokenizer_parse(&t, file.data(), file.size()) == "");
    CHECK(t.kind == TOKENIZER_BYTE_LEVEL);
    CHECK(t.vocab_size == 259);
    CHECK(t.bos_id == 256);
    CHECK(t.eos_id == 257);
    CHECK(t.pad_id == 258);
    CHECK(t.unk_id == -1);

    std::string all;
    for (int b = 0; b < 256; b++) all.push_back((char)b);
    std::mt19937 rng(7);
    std::string random_bytes;
    for (int i = 0; i < 5000; i++) random_bytes.push_back((char)(rng() & 0xFF));
    std::vector<std::string> texts = {"", std::string(1, '\0'), "\xFF", std::string("a\0b\xFF", 4), all,
                                      "h\xC3\xA9llo \xE2\x96\x81 \xF0\x9F\x98\x80", random_bytes};
    for (const std::string& text : texts) {
        std::vector<int> ids;
        tokenizer_encode(&t, text.data(), text.size(), ids);
        REQUIRE(ids.size() == text.size());
        for (size_t i = 0; i < text.size(); i++) CHECK(ids[i] == (unsigned char)text[i]);
        CHECK(tokenizer_decode(&t, ids.data(), (int)ids.size()) == text);
        ids.insert(ids.begin(), t.bos_id);
        ids.push_back(t.eos_id);
        ids.push_back(t.pad_id);
        CHECK(tokenizer_decode(&t, ids.data(), (int)ids.size()) == text);
        CHECK(encode_decode_stream(t, ids) == text);
    }
}

TEST_CASE("loader refuses malformed files with a clear message", "[tokenizer]") {
    const std::vector<unsigned char> good = byte_level_file();
    REQUIRE(parse_error(good) == "");

    SECTION("wrong magic") {
        std::vector<unsigned char> f = good;
        f[0] = 'Y';
        CHECK_THAT(parse_error(f), Catch::Contains("bad magic"));
        std::vector<unsigned char> text = {'h', 'e', 'l', 'l', 'o'};
        CHECK_THAT(parse_error(text), Catch::Contains("bad magic"));
    }
    SECTION("wrong version") {
        std::vector<unsigned char> f = build_tokenizer_file(TOKENIZER_BYTE_LEVEL, byte_level_tokens(), 256,
                                                            257, -1, 258, 0, /*version=*/3);
        CHECK(parse_error(f) == "unsupported version 3 (this build reads versions 1 and 2)");
    }
    SECTION("unknown kind and flags") {
        std::vector<unsigned char> f = good;
        f[12] = 7;
        CHECK_THAT(parse_error(f), Catch::Contains("unknown kind 7"));
        f = good;
        f[36] = 0x80;
        CHECK_THAT(parse_error(f), Catch::Contains("unknown flag bits 0x80"));
    }
    SECTION("truncated file: every prefix is refused") {
        CHECK(parse_error({}) == "empty file");
        std::vector<unsigned char> f(good.begin(), good.begin() + 20);
        CHECK(parse_error(f) == "truncated: 20 bytes, the header needs 40");
        f.assign(good.begin(), good.end() - 1);
        CHECK_THAT(parse_error(f), Catch::StartsWith("truncated:"));
        for (size_t n = 0; n < good.size(); n++) {
            std::vector<unsigned char> prefix(good.begin(), good.begin() + n);
            INFO("prefix of " << n << " bytes");
            CHECK_THAT(parse_error(prefix), Catch::StartsWith("truncated") || Catch::Equals("empty file"));
        }
        std::vector<unsigned char> bpe = read_bytes(kBpeFixture);
        for (size_t n = 0; n < bpe.size(); n += 7) {
            std::vector<unsigned char> prefix(bpe.begin(), bpe.begin() + n);
            INFO("bpe prefix of " << n << " bytes");
            CHECK_FALSE(parse_error(prefix).empty());
        }
    }
    SECTION("piece length running past the end") {
        std::vector<unsigned char> f = good;
        size_t last_record = f.size() - (7 + 5);  // the last token is "<pad>"
        f[last_record + 5] = 0xFF;
        f[last_record + 6] = 0x00;
        CHECK(parse_error(f) ==
              "truncated: token 258 piece of 255 bytes runs past the end of the file (offset " +
                  std::to_string(last_record + 7) + ", 5 bytes remain)");
    }
    SECTION("vocab_size larger than the file can hold") {
        std::vector<unsigned char> f = good;
        f[19] = 0x10;  // vocab_size += 2^28
        CHECK_THAT(parse_error(f), Catch::StartsWith("truncated: vocab_size"));
    }
    SECTION("trailing bytes") {
        std::vector<unsigned char> f = good;
        f.push_back(0);
        CHECK(parse_error(f) == "1 trailing bytes after the last token record");
    }
    SECTION("bad records") {
        std::vector<TokenSpec> tokens = byte_level_tokens();
        tokens[258].piece = "<s>";
        CHECK(parse_error(build_tokenizer_file(1, tokens, 256, 257, -1, 258, 0)) ==
              "token 258: piece duplicates token 256");
        tokens = byte_level_tokens();
        tokens[5].type = 9;
        CHECK(parse_error(build_tokenizer_file(1, tokens, 256, 257, -1, 258, 0)) == "token 5: unknown type 9");
        tokens = byte_level_tokens();
        tokens[5].piece = "<0x5g>";
        CHECK(parse_error(build_tokenizer_file(1, tokens, 256, 257, -1, 258, 0)) ==
              "token 5: byte piece is not of the form <0xNN>");
        tokens = byte_level_tokens();
        tokens[6].piece = "<0x05>";
        CHECK(parse_error(build_tokenizer_file(1, tokens, 256, 257, -1, 258, 0)) ==
              "token 6: byte <0x05> already defined by token 5");
        tokens = byte_level_tokens();
        tokens[7].score = std::numeric_limits<float>::quiet_NaN();
        CHECK(parse_error(build_tokenizer_file(1, tokens, 256, 257, -1, 258, 0)) ==
              "token 7: score is not finite");
        tokens = byte_level_tokens();
        tokens[258].piece = "";
        CHECK(parse_error(build_tokenizer_file(1, tokens, 256, 257, -1, 258, 0)) == "token 258: empty piece");
    }
    SECTION("bad special ids") {
        CHECK(parse_error(build_tokenizer_file(1, byte_level_tokens(), 259, 257, -1, 258, 0)) ==
              "bos_id 259 is out of range (vocab_size 259)");
        CHECK(parse_error(build_tokenizer_file(1, byte_level_tokens(), 256, 65, -1, 258, 0)) ==
              "eos_id 65 is not a control token");
    }
    SECTION("sentencepiece kind: unknown token and byte fallback") {
        std::vector<TokenSpec> tokens = {{"<unk>", 0.0f, (uint8_t)TOKEN_UNKNOWN},
                                         {"<s>", 0.0f, (uint8_t)TOKEN_CONTROL},
                                         {"</s>", 0.0f, (uint8_t)TOKEN_CONTROL},
                                         {"\xE2\x96\x81", -1.0f, (uint8_t)TOKEN_NORMAL},
                                         {"a", -2.0f, (uint8_t)TOKEN_NORMAL}};
        uint32_t dummy = TOKENIZER_FLAG_ADD_DUMMY_PREFIX;
        CHECK(parse_error(build_tokenizer_file(0, tokens, 1, 2, 0, -1, dummy)) == "");
        CHECK(parse_error(build_tokenizer_file(0, tokens, 1, 2, -1, -1, dummy)) ==
              "unk_id -1 is out of range (vocab_size 5)");
        CHECK(parse_error(build_tokenizer_file(0, tokens, 1, 2, 0, -1, dummy | TOKENIZER_FLAG_BYTE_FALLBACK)) ==
              "byte_fallback is set but byte <0x00> has no token");
        tokens[4].piece = "\xFF";
        CHECK(parse_error(build_tokenizer_file(0, tokens, 1, 2, 0, -1, dummy)) ==
              "token 4: piece is not valid UTF-8");
    }
    SECTION("files on disk") {
        Tokenizer t;
        CHECK_THAT(tokenizer_load_checked(&t, "test/fixtures/tokenizer/no-such-file.tokenizer"),
                   Catch::StartsWith("cannot open: "));
        std::vector<unsigned char> bpe = read_bytes(kBpeFixture);
        std::filesystem::path tmp = std::filesystem::temp_directory_path() / "xwin_test_truncated.tokenizer";
        {
            std::ofstream f(tmp, std::ios::binary);
            f.write((const char*)bpe.data(), (std::streamsize)(bpe.size() - 3));
        }
        CHECK_THAT(tokenizer_load_checked(&t, tmp.string().c_str()), Catch::StartsWith("truncated: token 799"));
        std::filesystem::remove(tmp);
    }
}

TEST_CASE("sentencepiece kind without byte fallback maps unknown runs to one unk id", "[tokenizer]") {
    std::vector<TokenSpec> tokens = {{"<unk>", 0.0f, (uint8_t)TOKEN_UNKNOWN},
                                     {"<s>", 0.0f, (uint8_t)TOKEN_CONTROL},
                                     {"</s>", 0.0f, (uint8_t)TOKEN_CONTROL},
                                     {"\xE2\x96\x81", -1.0f, (uint8_t)TOKEN_NORMAL},
                                     {"a", -2.0f, (uint8_t)TOKEN_NORMAL},
                                     {"b", -3.0f, (uint8_t)TOKEN_NORMAL},
                                     {"ab", -4.0f, (uint8_t)TOKEN_NORMAL},
                                     {"\xE2\x96\x81" "a", -5.0f, (uint8_t)TOKEN_NORMAL}};
    std::vector<unsigned char> file = build_tokenizer_file(0, tokens, 1, 2, 0, -1, TOKENIZER_FLAG_ADD_DUMMY_PREFIX);
    Tokenizer t;
    REQUIRE(tokenizer_parse(&t, file.data(), file.size()) == "");
    std::vector<int> ids;
    // "▁a" (-5) loses to "ab" (-4): ▁ | ab, then "xyz" is one unknown run.
    tokenizer_encode(&t, "abxyz b", ids);
    CHECK(ids == std::vector<int>{3, 6, 0, 3, 5});
    CHECK(tokenizer_decode(&t, ids.data(), (int)ids.size()) == "ab \xE2\x81\x87  b");
}

TEST_CASE("bpe merges only into normal pieces, never into control pieces", "[tokenizer]") {
    // SentencePiece looks merge candidates up among normal pieces only, so the
    // text "<s>" can never become the control token <s> even when "<s" + ">"
    // would spell it.
    std::vector<TokenSpec> tokens = {{"<unk>", 0.0f, (uint8_t)TOKEN_UNKNOWN},
                                     {"<s>", 0.0f, (uint8_t)TOKEN_CONTROL},
                                     {"</s>", 0.0f, (uint8_t)TOKEN_CONTROL},
                                     {"\xE2\x96\x81", -1.0f, (uint8_t)TOKEN_NORMAL},
                                     {"<", -2.0f, (uint8_t)TOKEN_NORMAL},
                                     {"s", -3.0f, (uint8_t)TOKEN_NORMAL},
                                     {">", -4.0f, (uint8_t)TOKEN_NORMAL},
                                     {"<s", -5.0f, (uint8_t)TOKEN_NORMAL}};
    std::vector<unsigned char> file = build_tokenizer_file(0, tokens, 1, 2, 0, -1, TOKENIZER_FLAG_ADD_DUMMY_PREFIX);
    Tokenizer t;
    REQUIRE(tokenizer_parse(&t, file.data(), file.size()) == "");
    std::vector<int> ids;
    tokenizer_encode(&t, "<s>", ids);
    CHECK(ids == std::vector<int>{3, 7, 6});
    CHECK(tokenizer_decode(&t, ids.data(), (int)ids.size()) == "<s>");
}

// ---------------------------------------------------------------------------
// Byte-level BPE (kind 2): the fixtures of dev/make_bpe_fixture.py hold a corpus and
// the ids Hugging Face tokenizers gives each line for four tokenizers (two trained
// there, SmolLM2-135M-Instruct's as transformers rebuilds it from the GGUF, and the
// same with SmolLM2's own individual-digits pre-tokenizer).

namespace {

const char* const kBpeDir = "test/fixtures/bpe/";

std::vector<std::string> bpe_corpus() {
    std::ifstream f(std::string(kBpeDir) + "corpus.txt");
    REQUIRE(f.good());
    std::vector<std::string> lines;
    std::string line;
    while (std::getline(f, line)) lines.push_back(hex_decode(line));
    return lines;
}

struct BpeCase {
    std::vector<int> ids;
    bool has_decoded = false;  // tokenizers' decode differs from the text (special tokens)
    std::string decoded;
};

std::vector<BpeCase> bpe_cases(const std::string& name) {
    std::ifstream f(std::string(kBpeDir) + name + ".ids");
    REQUIRE(f.good());
    std::vector<BpeCase> cases;
    std::string line;
    while (std::getline(f, line)) {
        BpeCase c;
        size_t space = line.find(' ');
        c.ids = parse_ids(line.substr(0, space));
        if (space != std::string::npos) {
            c.has_decoded = true;
            c.decoded = hex_decode(line.substr(space + 1));
        }
        cases.push_back(c);
    }
    return cases;
}

// Checks every corpus line against the recorded ids and decoded text; returns the
// number of tokens.
size_t check_bpe_corpus(const Tokenizer& t, const std::string& name) {
    std::vector<std::string> corpus = bpe_corpus();
    std::vector<BpeCase> cases = bpe_cases(name);
    REQUIRE(cases.size() == corpus.size());
    REQUIRE(corpus.size() >= 600);
    size_t tokens = 0, mismatches = 0;
    for (size_t i = 0; i < corpus.size(); i++) {
        std::vector<int> ids;
        tokenizer_encode(&t, corpus[i].data(), corpus[i].size(), ids);
        tokens += ids.size();
        INFO(name << ".ids line " << i + 1);
        if (ids != cases[i].ids) mismatches++;
        CHECK(ids == cases[i].ids);
        std::string expected = cases[i].has_decoded ? cases[i].decoded : corpus[i];
        CHECK(tokenizer_decode(&t, cases[i].ids.data(), (int)cases[i].ids.size()) == expected);
        CHECK(encode_decode_stream(t, cases[i].ids) == expected);
    }
    CHECK(mismatches == 0);
    return tokens;
}

Tokenizer load_bpe(const std::string& name) {
    Tokenizer t;
    std::string path = std::string(kBpeDir) + name + ".tokenizer";
    REQUIRE(tokenizer_load_checked(&t, path.c_str()) == "");
    return t;
}

// The pre-tokens of a text, as strings.
std::vector<std::string> pretokens(const Tokenizer& t, const std::string& text) {
    CharSpan chars;
    unicode_chars(text.data(), text.size(), &chars);
    std::vector<std::string> out;
    pretokenize(&t, chars, 0, chars.cp.size(), [&](size_t a, size_t b) { out.push_back(text.substr(a, b - a)); });
    return out;
}


}  // namespace

TEST_CASE("byte-level bpe fixtures load with the expected header", "[bpe]") {
    Tokenizer llama3 = load_bpe("llama3");
    CHECK(llama3.kind == TOKENIZER_BYTE_LEVEL_BPE);
    CHECK(llama3.pre_tokenizer == PRETOKENIZER_LLAMA3);
    CHECK(llama3.ignore_merges);
    CHECK_FALSE(llama3.individual_digits);
    CHECK(llama3.pieces[llama3.bos_id] == "<|begin_of_text|>");
    CHECK(llama3.pieces[llama3.eos_id] == "<|end_of_text|>");
    CHECK(llama3.unk_id == -1);
    Tokenizer smol = load_bpe("smollm2");
    CHECK(smol.vocab_size == 49152);
    CHECK(smol.n_merges == 48900);
    CHECK(smol.added.size() == 17);
    CHECK(smol.pre_tokenizer == PRETOKENIZER_GPT2);
    CHECK_FALSE(smol.ignore_merges);
    CHECK(smol.pieces[smol.bos_id] == "<|im_start|>");
    CHECK(smol.pieces[smol.eos_id] == "<|im_end|>");
    CHECK(smol.pieces[smol.byte_ids[' ']] == " ");  // pieces are raw bytes, not "Ġ"
    Tokenizer digits = load_bpe("gpt2digits");
    CHECK(digits.individual_digits);
    CHECK(digits.pre_tokenizer == PRETOKENIZER_GPT2);
}

TEST_CASE("byte-level bpe gives tokenizers' ids on the corpus: llama 3 pattern, trained", "[bpe]") {
    Tokenizer t = load_bpe("llama3");
    CHECK(check_bpe_corpus(t, "llama3") > 20000);
}

TEST_CASE("byte-level bpe gives tokenizers' ids on the corpus: gpt-2 pattern with individual digits, trained", "[bpe]") {
    Tokenizer t = load_bpe("gpt2digits");
    CHECK(check_bpe_corpus(t, "gpt2digits") > 20000);
}

TEST_CASE("byte-level bpe gives tokenizers' ids on the corpus: SmolLM2-135M-Instruct", "[bpe]") {
    Tokenizer t = load_bpe("smollm2");
    CHECK(check_bpe_corpus(t, "smollm2") > 30000);
    // SmolLM2's own tokenizer.json splits digits first: the same file with that flag set
    std::vector<unsigned char> file = read_bytes((std::string(kBpeDir) + "smollm2.tokenizer").c_str());
    file[36] |= TOKENIZER_FLAG_INDIVIDUAL_DIGITS;
    Tokenizer digits;
    REQUIRE(tokenizer_parse(&digits, file.data(), file.size()) == "");
    CHECK(check_bpe_corpus(digits, "smollm2digits") > 30000);
}

TEST_CASE("unicode classes follow the tokenizers regex engine in several scripts", "[bpe]") {
    struct Expect { uint32_t cp; CharClass cls; };
    const Expect cases[] = {
        {'a', CHAR_LETTER}, {'Z', CHAR_LETTER}, {0xE9, CHAR_LETTER} /* é */, {0xAA, CHAR_LETTER} /* ª */,
        {0x42F, CHAR_LETTER} /* Я */, {0x3B1, CHAR_LETTER} /* α */, {0x628, CHAR_LETTER} /* ب */,
        {0x5D0, CHAR_LETTER} /* א */, {0x915, CHAR_LETTER} /* क */, {0x93F, CHAR_OTHER} /* ि, a vowel sign (Mc) */,
        {0x65E5, CHAR_LETTER} /* 日 */, {0x3042, CHAR_LETTER} /* あ */, {0xE01, CHAR_LETTER} /* ก */,
        {0xE31, CHAR_OTHER} /* ั (Mn) */, {0xD55C, CHAR_LETTER} /* 한 */, {0x2B0, CHAR_LETTER} /* ʰ (Lm) */,
        {0x1C89, CHAR_LETTER} /* Unicode 16's Cyrillic TJE: the engine's version, newer than Python 3.11's */,
        {'7', CHAR_NUMBER}, {0x663, CHAR_NUMBER} /* ٣ */, {0x96A, CHAR_NUMBER} /* ४ */, {0x216B, CHAR_NUMBER} /* Ⅻ */,
        {0xBD, CHAR_NUMBER} /* ½ */, {0xB2, CHAR_NUMBER} /* ² */, {0x3007, CHAR_NUMBER} /* 〇 */,
        {0x1D7D8, CHAR_NUMBER} /* 𝟘 */,
        {' ', CHAR_SPACE}, {'\t', CHAR_SPACE}, {'\n', CHAR_SPACE}, {'\r', CHAR_SPACE}, {0x0B, CHAR_SPACE},
        {0x85, CHAR_SPACE}, {0xA0, CHAR_SPACE}, {0x2003, CHAR_SPACE}, {0x3000, CHAR_SPACE}, {0x2028, CHAR_SPACE},
        {0x200B, CHAR_OTHER} /* zero width space is not White_Space */, {0x1C, CHAR_OTHER}, {0x301, CHAR_OTHER},
        {'\'', CHAR_OTHER}, {0x1F600, CHAR_OTHER}, {0x1F3FD, CHAR_OTHER}, {0x200D, CHAR_OTHER}, {0xFFFD, CHAR_OTHER},
        {0x10FFFF, CHAR_OTHER},
    };
    for (const Expect& e : cases) {
        INFO("U+" << std::hex << e.cp);
        CHECK(unicode_class(e.cp) == e.cls);
        CHECK(unicode_is_numeric(e.cp) == (e.cls == CHAR_NUMBER));
    }
    // Digits (Rust's char::is_numeric) knows Unicode 17's digits, the regex engine does not
    // (UNICODE_NUMERIC_EXTRA_RANGES: U+11DE0..U+11DE9 and U+16FF4..U+16FF6, tokenizers 0.23.3)
    CHECK(unicode_is_numeric(0x11DE0));
    CHECK(unicode_class(0x11DE0) == CHAR_OTHER);
    for (uint32_t cp : {0x11DE9u, 0x16FF4u, 0x16FF6u}) CHECK(unicode_is_numeric(cp));
    for (uint32_t cp : {0x11DDFu, 0x11DEAu, 0x16FF3u, 0x16FF7u}) CHECK(!unicode_is_numeric(cp));
}

TEST_CASE("the pre-tokenizers cut text where the regexes do", "[bpe]") {
    // expected pieces from tokenizers' Split(pattern, "isolated") on the same strings
    Tokenizer gpt2 = load_bpe("smollm2"), llama3 = load_bpe("llama3"), digits = load_bpe("gpt2digits");
    using V = std::vector<std::string>;
    std::string nbsp = "\xC2\xA0", e_acute = "\xC3\xA9", arabic = "\xD9\xA1\xD9\xA2\xD9\xA3\xD9\xA4";
    CHECK(pretokens(gpt2, "Hello  world's 12345 (x)") == V{"Hello", " ", " world", "'s", " 12345", " (", "x", ")"});
    CHECK(pretokens(llama3, "Hello  world's 12345 (x)") ==
          V{"Hello", " ", " world", "'s", " ", "123", "45", " (", "x", ")"});
    CHECK(pretokens(digits, "Hello  world's 12345 (x)") ==
          V{"Hello", " ", " world", "'s", " ", "1", "2", "3", "4", "5", " (", "x", ")"});
    CHECK(pretokens(gpt2, "I'M   \n\n  x\r\n\ty") == V{"I", "'", "M", "   \n\n ", " x", "\r\n", "\t", "y"});
    CHECK(pretokens(llama3, "I'M   \n\n  x\r\n\ty") == V{"I", "'M", "   \n\n", " ", " x", "\r\n", "\ty"});
    CHECK(pretokens(gpt2, "a  \t b...  \n") == V{"a", "  \t", " b", "...", "  \n"});
    CHECK(pretokens(llama3, "a  \t b...  \n") == V{"a", "  \t", " b", "...", "  \n"});
    std::string mixed = nbsp + nbsp + e_acute + arabic + " 'LL's'd";
    CHECK(pretokens(gpt2, mixed) == V{nbsp, nbsp, e_acute, arabic, " '", "LL", "'s", "'d"});
    CHECK(pretokens(llama3, mixed) ==
          V{nbsp, nbsp + e_acute, arabic.substr(0, 6), arabic.substr(6), " '", "LL", "'s", "'d"});
    CHECK(pretokens(gpt2, " ?! \n\nx 42x") == V{" ?!", " \n", "\n", "x", " 42", "x"});
    CHECK(pretokens(llama3, " ?! \n\nx 42x") == V{" ?!", " \n\n", "x", " ", "42", "x"});
    CHECK(pretokens(digits, " ?! \n\nx 42x") == V{" ?!", " \n", "\n", "x", " ", "4", "2", "x"});
    // (?i) in Llama 3 folds the long s: "'ſx" is "'ſ" + "x"
    CHECK(pretokens(llama3, "'\xC5\xBFx") == V{"'\xC5\xBF", "x"});
    CHECK(pretokens(gpt2, "'\xC5\xBFx") == V{"'", "\xC5\xBFx"});
}

TEST_CASE("byte-level bpe keeps invalid UTF-8 as bytes and round-trips any bytes", "[bpe]") {
    // A byte that starts no valid character is one character of class "other", where
    // tokenizers (which takes only valid text) would see U+FFFD; its bytes are encoded
    // as they are, so decode gives them back.
    Tokenizer t = load_bpe("llama3");
    auto enc = [&](const std::string& s) {
        std::vector<int> ids;
        tokenizer_encode(&t, s.data(), s.size(), ids);
        return ids;
    };
    std::vector<int> joined = enc("hello"), space_ff = enc(" \xFF"), world = enc("world");
    joined.insert(joined.end(), space_ff.begin(), space_ff.end());
    joined.insert(joined.end(), world.begin(), world.end());
    CHECK(enc("hello \xFFworld") == joined);  // pieces "hello", " \xFF", "world" as for U+FFFD
    CHECK(space_ff.size() == 2);
    std::mt19937 rng(11);
    for (int trial = 0; trial < 50; trial++) {
        std::string s;
        for (int i = 0, n = (int)(rng() % 400); i < n; i++) {
            unsigned r = rng() % 8;
            s += r < 3 ? std::string(1, (char)(rng() & 0xFF)) : r < 5 ? "word " : r < 6 ? "\xC3\xA9" : r < 7 ? "\xE6\x97" : "<|eot_id|>";
        }
        std::vector<int> ids = enc(s);
        std::string back = tokenizer_decode(&t, ids.data(), (int)ids.size());
        // special tokens decode to nothing; everything else comes back byte for byte
        std::string expected = s;
        for (size_t p; (p = expected.find("<|eot_id|>")) != std::string::npos;) expected.erase(p, 10);
        CHECK(back == expected);
    }
    std::string all;
    for (int b = 0; b < 256; b++) all.push_back((char)b);
    std::vector<int> ids = enc(all);
    CHECK(tokenizer_decode(&t, ids.data(), (int)ids.size()) == all);
}

TEST_CASE("byte-level bpe added tokens: longest match, strip flags, not split by merges", "[bpe]") {
    Tokenizer t = load_bpe("llama3");
    auto enc = [&](const std::string& s) {
        std::vector<int> ids;
        tokenizer_encode(&t, s.data(), s.size(), ids);
        return ids;
    };
    int eot = tokenizer_find_piece(&t, "<|eot_id|>", 10), mask = tokenizer_find_piece(&t, "[MASK]", 6),
        sep = tokenizer_find_piece(&t, "<sep>", 5), tool = tokenizer_find_piece(&t, "<tool>", 6);
    REQUIRE(eot >= 0);
    REQUIRE(mask >= 0);
    CHECK(t.types[tool] == TOKEN_ADDED);
    CHECK(enc("<|eot_id|>") == std::vector<int>{eot});
    CHECK(enc("<|eot_id|><|eot_id|>") == std::vector<int>{eot, eot});
    std::vector<int> x = enc("x");
    CHECK(enc("x   [MASK]") == std::vector<int>{x[0], mask});  // lstrip takes the spaces before
    CHECK(enc("<sep> \n x") == std::vector<int>{sep, x[0]});  // rstrip takes the whitespace after
    CHECK(enc("<tool>") == std::vector<int>{tool});
    // a non-special added token decodes to its text, a special one to nothing
    std::vector<int> ids = {tool, eot, x[0]};
    CHECK(tokenizer_decode(&t, ids.data(), 3) == "<tool>x");
}

TEST_CASE("byte-level bpe encode is fast on long and adversarial text", "[bpe]") {
    Tokenizer t = load_bpe("smollm2");
    std::string corpus;  // the lines that decode to themselves (no special tokens)
    std::vector<std::string> lines = bpe_corpus();
    std::vector<BpeCase> cases = bpe_cases("smollm2");
    for (size_t i = 0; i < lines.size(); i++)
        if (!cases[i].has_decoded) corpus += lines[i] + "\n";
    std::string big;
    while (big.size() < (2u << 20)) big += corpus;  // 2 MB
    std::string word(200000, 'a'), digits(200000, '7'), spaces(200000, ' ');
    for (const std::string* text : {&big, &word, &digits, &spaces}) {
        std::vector<int> ids;
        double s = seconds_to_encode(t, *text, ids);
        INFO("text of " << text->size() << " bytes took " << s << " s (" << text->size() / 1e6 / s << " MB/s)");
        CHECK(s < 4.0);
        CHECK(tokenizer_decode(&t, ids.data(), (int)ids.size()) == *text);
    }
}

TEST_CASE("byte-level bpe loader refuses damaged files with a clear message", "[bpe]") {
    std::vector<unsigned char> good = read_bytes((std::string(kBpeDir) + "gpt2digits.tokenizer").c_str());
    REQUIRE(parse_error(good) == "");
    auto u32_at = [&](const std::vector<unsigned char>& f, size_t off) {
        return (uint32_t)f[off] | ((uint32_t)f[off + 1] << 8) | ((uint32_t)f[off + 2] << 16) | ((uint32_t)f[off + 3] << 24);
    };
    auto set_u32 = [](std::vector<unsigned char>& f, size_t off, uint32_t v) {
        for (int i = 0; i < 4; i++) f[off + i] = (unsigned char)(v >> (8 * i));
    };
    uint32_t vocab = u32_at(good, 16), n_merges = u32_at(good, 44), n_added = u32_at(good, 48);
    size_t added_at = good.size() - 8 * (size_t)n_added, merges_at = added_at - 8 * (size_t)n_merges;

    SECTION("every truncation is refused") {
        for (size_t n = 0; n < good.size(); n += (n < 200 ? 1 : 97)) {
            std::vector<unsigned char> prefix(good.begin(), good.begin() + n);
            INFO("prefix of " << n << " bytes");
            CHECK_THAT(parse_error(prefix), Catch::StartsWith("truncated") || Catch::Equals("empty file"));
        }
        std::vector<unsigned char> f(good.begin(), good.end() - 4);
        CHECK_THAT(parse_error(f), Catch::StartsWith("truncated: 3 added tokens need 24 bytes"));
    }
    SECTION("header fields") {
        std::vector<unsigned char> f = good;
        f[12] = 9;
        CHECK(parse_error(f) == "unknown kind 9 (0 = sentencepiece bpe, 1 = byte-level, 2 = byte-level bpe)");
        f = good;
        f[8] = 1;  // version 1 has no kind 2
        CHECK(parse_error(f) == "kind 2 (byte-level bpe) needs version 2");
        f = good;
        f[60] = 1;
        CHECK(parse_error(f) == "reserved header byte 60 is 0x01, not zero");
        f = good;
        f[52] = 0xff;
        CHECK(parse_error(f) == "reserved header byte 52 is 0xff, not zero");
        f = good;
        f[40] = 3;
        CHECK(parse_error(f) == "byte-level bpe with pre_tokenizer 3 (1 = gpt-2 regex, 2 = llama 3 regex)");
        f = good;
        f[36] |= TOKENIZER_FLAG_BYTE_FALLBACK;
        CHECK(parse_error(f) == "flag bits 0x2 do not belong to kind 2");
        f = good;
        set_u32(f, 28, 5);
        CHECK(parse_error(f) == "byte-level bpe tokenizer with unk_id 5 (must be -1)");
    }
    SECTION("merges") {
        std::vector<unsigned char> f = good;
        set_u32(f, merges_at, vocab + 3);
        CHECK(parse_error(f) == "merge 0: token " + std::to_string(vocab + 3) + " is out of range (vocab_size " +
                                    std::to_string(vocab) + ")");
        f = good;
        set_u32(f, merges_at + 8, u32_at(f, merges_at));  // merge 1 := merge 0
        set_u32(f, merges_at + 12, u32_at(f, merges_at + 4));
        CHECK_THAT(parse_error(f), Catch::StartsWith("merge 1: the pair ") && Catch::EndsWith(" is merge 0 already"));
        f = good;
        set_u32(f, merges_at, 1);  // a control token
        CHECK(parse_error(f) == "merge 0: token 1 is not a normal token");
        // a merge whose joined piece is missing: swap the two sides of merge 0 ("a" "b"
        // becomes "b" "a", which this small vocabulary does not hold)
        f = good;
        uint32_t l = u32_at(f, merges_at), r = u32_at(f, merges_at + 4);
        set_u32(f, merges_at, r);
        set_u32(f, merges_at + 4, l);
        CHECK_THAT(parse_error(f), Catch::EndsWith("join into a piece that is not in the vocabulary"));
    }
    SECTION("added tokens") {
        std::vector<unsigned char> f = good;
        set_u32(f, added_at + 8, u32_at(f, added_at));  // the second record repeats the first id
        CHECK_THAT(parse_error(f), Catch::Contains("(ids must ascend)"));
        f = good;
        set_u32(f, added_at + 4, 8);
        CHECK(parse_error(f) == "added token 0: unknown flag bits 0x8");
        f = good;
        set_u32(f, added_at, 300);  // a normal token
        CHECK(parse_error(f) == "added token 0: token 300 is neither a control nor an added token");
        f = good;
        f.resize(f.size() - 8);
        set_u32(f, 48, n_added - 1);
        CHECK(parse_error(f) == "3 control and added tokens but 2 added-token records");
    }
}

TEST_CASE("the exporter refuses tokenizer.json files it does not support, in one line", "[bpe]") {
    // dev/export_tokenizer.py reads tokenizer.json with the standard library only
    std::string output;
    if (run_command("command -v python3", &output) != 0)
        FAIL("python3 is not on PATH: this test runs dev/export_tokenizer.py with it (standard library only)");
    std::filesystem::path dir = std::filesystem::temp_directory_path() / ("xwin_test_bpe_export_" + std::to_string(getpid()));
    std::filesystem::create_directories(dir);
    const std::string byte_level = "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": true}";
    auto spec = [&](const std::string& model, const std::string& normalizer, const std::string& pre, const std::string& decoder) {
        return "{\"version\": \"1.0\", \"added_tokens\": [], \"normalizer\": " + normalizer + ", \"pre_tokenizer\": " + pre +
               ", \"post_processor\": null, \"decoder\": " + decoder + ", \"model\": " + model + "}";
    };
    const std::string bpe = "{\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]}";
    struct Case { const char* name; std::string json; const char* expected; };
    const Case cases[] = {
        {"ok", spec(bpe, "null", byte_level, byte_level), ""},
        {"wordpiece", spec("{\"type\": \"WordPiece\", \"vocab\": {}}", "null", byte_level, byte_level),
         "model type 'WordPiece' is not supported (only BPE)"},
        {"unigram", spec("{\"type\": \"Unigram\", \"vocab\": []}", "null", byte_level, byte_level),
         "model type 'Unigram' is not supported (only BPE)"},
        {"metaspace", spec(bpe, "null", "{\"type\": \"Metaspace\", \"replacement\": \"\\u2581\"}", byte_level),
         "pre_tokenizer Metaspace(replacement=\xE2\x96\x81) is not supported"},
        {"prefix_space", spec(bpe, "null", "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"use_regex\": true}", byte_level),
         "pre_tokenizer ByteLevel(add_prefix_space=True, use_regex=True) is not supported"},
        {"nfc", spec(bpe, "{\"type\": \"NFC\"}", byte_level, byte_level), "normalizer NFC() is not supported (only null)"},
        {"decoder", spec(bpe, "null", byte_level, "{\"type\": \"WordPiece\", \"prefix\": \"##\"}"),
         "decoder WordPiece(prefix=##) is not supported (only ByteLevel)"},
    };
    for (const Case& c : cases) {
        std::filesystem::path folder = dir / c.name;
        std::filesystem::create_directories(folder);
        std::ofstream(folder / "tokenizer.json") << c.json;
        std::string cmd = "python3 dev/export_tokenizer.py " + folder.string() + " " + (dir / "out.tokenizer").string();
        int rc = run_command(cmd, &output);
        INFO("$ " << cmd << "\n" << output);
        if (!*c.expected) {
            CHECK(rc == 0);
            Tokenizer t;
            CHECK(tokenizer_load_checked(&t, (dir / "out.tokenizer").string().c_str()) == "");
            std::vector<int> ids;
            tokenizer_encode(&t, "abba", ids);  // "ab" merges, then "b" "a": bytes without a token are dropped
            CHECK(ids == std::vector<int>{2, 1, 0});
            continue;
        }
        CHECK(rc == 1);
        CHECK(std::count(output.begin(), output.end(), '\n') == 1);
        CHECK_THAT(output, Catch::StartsWith("error: " + (folder / "tokenizer.json").string() + ": "));
        CHECK_THAT(output, Catch::Contains(c.expected));
    }
    std::filesystem::remove_all(dir);
}
