// Tokenizer tests: the SentencePiece-style BPE tokenizer must give the same ids
// and the same decoded text as sentencepiece itself on the recorded cases in
// test/fixtures/tokenizer (made by dev/make_tokenizer_fixture.py); the
// byte-level tokenizer must round-trip arbitrary bytes; the loader must refuse
// malformed files with a clear message.
//
// Run from the repository root so that the fixture paths resolve.

#include <catch2/catch.hpp>

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
