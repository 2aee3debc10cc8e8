// The chat templates as data (llm.cu, "The chat template"; dev/chat_templates.py):
//   - ChatML (SmolLM2-135M-Instruct's real tokenizer) and Llama 3 (a Llama-3-pattern
//     tokenizer) give, for every conversation of test/fixtures/chat/, the ids of transformers'
//     apply_chat_template token for token, its generation prompt's ids, and the loss mask
//     (each assistant content and its end-of-turn token); dev/make_chat_fixture.py made the
//     fixtures and checked that dev/data/prepare_sft.py --hf writes the same ids and masks;
//   - the mask rule worked by hand on small conversations (ChatML, Llama 3, and Vicuna on the
//     byte and SentencePiece tokenizers);
//   - Vicuna v1.1 recorded in a file gives what a file without a template gives;
//   - bad templates, in the file and at export, are one-line errors and nothing is written.
#include <catch2/catch.hpp>
#include <sys/wait.h>
#include <unistd.h>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>
#include "fixture.h"

namespace {

const std::string CHAT_FIXTURE = "test/fixtures/chat/";

std::vector<unsigned char> read_bytes(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    REQUIRE(f.good());
    return std::vector<unsigned char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// SmolLM2's tokenizer (test/fixtures/bpe/) followed by a template section
std::vector<unsigned char> smollm2_with(const std::vector<unsigned char>& section) {
    std::vector<unsigned char> data = read_bytes("test/fixtures/bpe/smollm2.tokenizer");
    data.insert(data.end(), section.begin(), section.end());
    return data;
}

Tokenizer load_template_tokenizer(const std::string& name) {
    Tokenizer t;
    if (name == "chatml") {
        std::vector<unsigned char> data = smollm2_with(read_bytes(CHAT_FIXTURE + "chatml.template"));
        REQUIRE(tokenizer_parse(&t, data.data(), data.size()) == "");
    } else {
        REQUIRE(tokenizer_load_checked(&t, (CHAT_FIXTURE + name + ".tokenizer").c_str()) == "");
    }
    return t;
}

struct Conversation {
    bool has_system = false;
    std::string system;
    std::vector<std::string> turns;
};

std::vector<Conversation> load_conversations() {
    std::ifstream f(CHAT_FIXTURE + "conversations.txt");
    REQUIRE(f.good());
    std::vector<Conversation> out;
    for (std::string line; std::getline(f, line);) {
        std::istringstream fields(line);
        std::string field;
        Conversation c;
        fields >> field;
        c.has_system = field != "none";
        if (c.has_system) c.system = hex_decode(field);
        while (fields >> field) c.turns.push_back(hex_decode(field));
        out.push_back(c);
    }
    return out;
}

std::vector<int> parse_ids(const std::string& s) {
    std::vector<int> ids;
    std::stringstream ss(s);
    for (std::string x; std::getline(ss, x, ',');) ids.push_back(std::stoi(x));
    return ids;
}


// The text of the tokens whose mask is 1, each run of them ended by "|".
std::string masked_text(const Tokenizer* t, const std::vector<int>& ids, const std::vector<uint8_t>& mask) {
    std::string out;
    for (size_t i = 0; i < ids.size(); i++) {
        if (mask[i]) out += t->pieces[ids[i]];
        if (mask[i] && (i + 1 == ids.size() || !mask[i + 1])) out += "|";
    }
    return out;
}

}  // namespace

TEST_CASE("chat templates give apply_chat_template's ids, prompts and loss masks token for token", "[chat]") {
    std::vector<Conversation> conversations = load_conversations();
    REQUIRE(conversations.size() == 8);
    for (const char* name : {"chatml", "llama3"}) {
        Tokenizer t = load_template_tokenizer(name);
        CHECK(t.chat.name == name);
        std::ifstream f(CHAT_FIXTURE + name + ".ids");
        REQUIRE(f.good());
        size_t tokens = 0, targets = 0;
        for (size_t i = 0; i < conversations.size(); i++) {
            const Conversation& c = conversations[i];
            std::string ids_text, mask_text, prompt_text;
            REQUIRE(f >> ids_text >> mask_text >> prompt_text);
            std::vector<int> want = parse_ids(ids_text), want_prompt = parse_ids(prompt_text);
            std::vector<uint8_t> want_mask;
            for (char ch : mask_text) want_mask.push_back((uint8_t)(ch - '0'));
            INFO(name << " conversation " << i);
            std::vector<int> ids;
            std::vector<uint8_t> mask;
            chat_encode_conversation(&t, c.has_system ? &c.system : nullptr, c.turns, ids, mask);
            CHECK(ids == want);
            CHECK(mask == want_mask);
            std::vector<std::string> asked(c.turns.begin(), c.turns.end() - 1);
            std::vector<int> prompt;
            chat_encode_segments(&t, chat_segments(&t, c.has_system ? &c.system : nullptr, asked, true), prompt, nullptr);
            CHECK(prompt == want_prompt);
            if (!c.system.empty() || !c.has_system) {  // chat_encode_prompt: "" is no system message
                std::vector<int> p2;
                chat_encode_prompt(&t, c.system, asked, p2);
                CHECK(p2 == want_prompt);
            }
            tokens += ids.size();
            for (uint8_t m : mask) targets += m;
        }
        CHECK(tokens > 400);
        CHECK(targets > 50);
        tokenizer_free(&t);
    }
}

TEST_CASE("the loss mask is each assistant content and its end-of-turn token, worked by hand", "[chat]") {
    Tokenizer chatml = load_template_tokenizer("chatml");
    std::vector<int> ids;
    std::vector<uint8_t> mask;
    chat_encode_conversation(&chatml, nullptr, {"Hi", "Hello!", "Bye", "Ciao"}, ids, mask);
    // <|im_start|>system\nYou are ... Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n
    // <|im_start|>assistant\n[Hello!<|im_end|>]\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n[Ciao<|im_end|>]\n
    CHECK(masked_text(&chatml, ids, mask) == "Hello!<|im_end|>|Ciao<|im_end|>|");
    CHECK(chatml.pieces[ids.back()] == "\n");
    CHECK(mask.back() == 0);
    CHECK(chat_end_id(&chatml) == tokenizer_find_piece(&chatml, "<|im_end|>", 10));
    std::vector<int> prompt;
    chat_encode_prompt(&chatml, "Be brief.", {"Hi"}, prompt);
    std::string text;
    for (int id : prompt) text += chatml.pieces[id];
    CHECK(text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    tokenizer_free(&chatml);

    Tokenizer llama3 = load_template_tokenizer("llama3");
    chat_encode_conversation(&llama3, nullptr, {"  a question \n", "\n  an answer  "}, ids, mask);
    text.clear();
    for (int id : ids) text += llama3.pieces[id];
    CHECK(text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\na question<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nan answer<|eot_id|>");
    CHECK(masked_text(&llama3, ids, mask) == "an answer<|eot_id|>|");
    tokenizer_free(&llama3);

    // Vicuna with the byte tokenizer: BOS, the template's bytes 0, the answer's bytes and EOS 1
    Tokenizer byte;
    REQUIRE(tokenizer_load_checked(&byte, "data/world/byte.tokenizer") == "");
    CHECK(byte.chat.name == "vicuna_v1.1");
    chat_encode_conversation(&byte, nullptr, {"Hi", "Hello"}, ids, mask);
    std::string head = std::string(CHAT_DEFAULT_SYSTEM) + " USER: Hi ASSISTANT: ";
    REQUIRE(ids.size() == 1 + head.size() + 5 + 1);
    CHECK(ids.front() == 256);
    CHECK(ids.back() == 257);
    for (size_t i = 0; i < ids.size(); i++) CHECK(mask[i] == (i >= 1 + head.size() ? 1 : 0));
    tokenizer_free(&byte);

    // Vicuna with a SentencePiece tokenizer: the text between <s> / </s> encoded at once, as
    // chat_encode_prompt always did; the answer's tokens ("▁Hello" carries the space after
    // "ASSISTANT:") and </s> are the targets
    Tokenizer sp;
    REQUIRE(tokenizer_load_checked(&sp, "test/fixtures/tokenizer/bpe.tokenizer") == "");
    REQUIRE(sp.kind == TOKENIZER_SENTENCEPIECE_BPE);
    chat_encode_conversation(&sp, nullptr, {"Hi", "Hello", "Bye", "Ciao"}, ids, mask);
    std::vector<int> want = {sp.bos_id};
    tokenizer_encode(&sp, (std::string(CHAT_DEFAULT_SYSTEM) + " USER: Hi ASSISTANT: Hello").c_str(), want);
    want.push_back(sp.eos_id);
    tokenizer_encode(&sp, "USER: Bye ASSISTANT: Ciao", want);
    want.push_back(sp.eos_id);
    CHECK(ids == want);
    std::vector<int> answer;
    for (size_t i = 0; i < ids.size(); i++)
        if (mask[i] && ids[i] != sp.eos_id) answer.push_back(ids[i]);
    CHECK(tokenizer_decode(&sp, answer.data(), (int)answer.size()) == "Hello Ciao");
    CHECK(std::count(mask.begin(), mask.end(), 1) == (long)answer.size() + 2);
    tokenizer_free(&sp);
}

TEST_CASE("vicuna_v1.1 recorded in the tokenizer file is the template a file without one means", "[chat]") {
    std::string out = (std::filesystem::temp_directory_path() / ("xwin_chat_vicuna_" + std::to_string(getpid()) + ".tokenizer")).string();
    std::string output;
    REQUIRE(run_command("python3 dev/export_tokenizer.py --byte-level --template vicuna_v1.1 " + out, &output) == 0);
    Tokenizer recorded, plain;
    REQUIRE(tokenizer_load_checked(&recorded, out.c_str()) == "");
    REQUIRE(tokenizer_load_checked(&plain, "data/world/byte.tokenizer") == "");
    CHECK(recorded.chat.name == "vicuna_v1.1");
    CHECK(recorded.chat.begin == "<s>");
    CHECK(recorded.chat.assistant_end == "</s>");
    const std::vector<std::vector<std::string>> chats = {{"Hi"}, {"Add 12 and 7.", "The answer is 19.", "Now double it."}};
    for (const std::vector<std::string>& turns : chats) {
        std::vector<int> a, b;
        chat_encode_prompt(&recorded, "Solve it.", turns, a);
        chat_encode_prompt(&plain, "Solve it.", turns, b);
        CHECK(a == b);
        std::vector<uint8_t> ma, mb;
        std::vector<std::string> whole = turns;
        whole.push_back(" an answer ");
        chat_encode_conversation(&recorded, nullptr, whole, a, ma);
        chat_encode_conversation(&plain, nullptr, whole, b, mb);
        CHECK(a == b);
        CHECK(ma == mb);
    }
    tokenizer_free(&recorded);
    tokenizer_free(&plain);
    std::remove(out.c_str());
}

TEST_CASE("a bad chat template section is a one-line error", "[chat]") {
    std::vector<unsigned char> section = read_bytes(CHAT_FIXTURE + "chatml.template");
    Tokenizer t;
    auto error_with = [&](std::vector<unsigned char> data) {
        std::string err = tokenizer_parse(&t, data.data(), data.size());
        CHECK(err.find('\n') == std::string::npos);
        return err;
    };
    SECTION("special tokens the tokenizer lacks") {
        std::vector<unsigned char> data = read_bytes("data/world/byte.tokenizer");
        data.insert(data.end(), section.begin(), section.end());
        CHECK(error_with(data) == "chat template chatml: it writes <|im_start|>, which is not a control or added token of this tokenizer");
        std::string path = (std::filesystem::temp_directory_path() / ("xwin_chat_bad_" + std::to_string(getpid()) + ".tokenizer")).string();
        std::ofstream(path, std::ios::binary).write((const char*)data.data(), (std::streamsize)data.size());
        CHECK(tokenizer_load_checked(&t, path.c_str()) ==
              "chat template chatml: it writes <|im_start|>, which is not a control or added token of this tokenizer");
        std::remove(path.c_str());
    }
    SECTION("reserved bytes") {
        section[9] = 1;
        CHECK(error_with(smollm2_with(section)) == "chat template: reserved header byte 9 is 0x01, not zero");
    }
    SECTION("unknown flags") {
        section[4] = 0x80;
        CHECK(error_with(smollm2_with(section)) == "chat template: unknown flag bits 0x80");
    }
    SECTION("truncated") {
        section.pop_back();
        CHECK_THAT(error_with(smollm2_with(section)), Catch::StartsWith("chat template: truncated: string 9"));
    }
    SECTION("trailing bytes") {
        section.push_back(0);
        CHECK(error_with(smollm2_with(section)) == "chat template: 1 trailing bytes after its last string");
    }
    SECTION("bad name") {
        section[20] = 'C';  // the name's first byte ("chatml"), after the 16-byte header and its length
        CHECK(error_with(smollm2_with(section)) == "chat template: the name must be 1 to 32 characters of a-z 0-9 . _ -");
    }
}

TEST_CASE("the exporter and prepare_sft.py refuse a template they cannot use, in one line, writing nothing", "[chat]") {
    std::string output;
    if (run_command("command -v python3", &output) != 0) FAIL("python3 is not on PATH: this test runs dev/export_tokenizer.py");
    std::filesystem::path dir = std::filesystem::temp_directory_path() / ("xwin_test_chat_export_" + std::to_string(getpid()));
    std::filesystem::create_directories(dir);
    const std::string byte_level = "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": true}";
    std::string json = "{\"version\": \"1.0\", \"added_tokens\": [{\"id\": 3, \"content\": \"</s>\", \"special\": true}], "
                       "\"normalizer\": null, \"pre_tokenizer\": " + byte_level + ", \"post_processor\": null, \"decoder\": " +
                       byte_level + ", \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, "
                       "\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2, \"</s>\": 3}, \"merges\": [\"a b\"]}}";
    struct Case { const char* name; const char* chat_template; const char* flag; const char* expected; };
    const Case cases[] = {
        {"unknown", nullptr, "--template vicuna2", "unknown chat template 'vicuna2' (known: vicuna_v1.1, llama3, chatml)"},
        {"missing_token", nullptr, "--template chatml", "chat template chatml writes <|im_start|>, which is not a special token of this tokenizer"},
        {"no_match", "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}", "",
         "the folder's chat template matches none of vicuna_v1.1, llama3, chatml; choose one with --template"},
    };
    for (const Case& c : cases) {
        std::filesystem::path folder = dir / c.name;
        std::filesystem::create_directories(folder);
        std::ofstream(folder / "tokenizer.json") << json;
        std::string config = "{\"eos_token\": \"</s>\"";
        if (c.chat_template) {
            std::string escaped;
            for (const char* p = c.chat_template; *p; p++) escaped += *p == '"' ? "\\\"" : std::string(1, *p);
            config += ", \"chat_template\": \"" + escaped + "\"";
        }
        std::ofstream(folder / "tokenizer_config.json") << config + "}";
        std::filesystem::path out = dir / "out.tokenizer";
        std::string cmd = "python3 dev/export_tokenizer.py " + folder.string() + " " + out.string() + " " + c.flag;
        int rc = run_command(cmd, &output);
        INFO("$ " << cmd << "\n" << output);
        CHECK(rc == 1);
        CHECK(std::count(output.begin(), output.end(), '\n') == 1);
        CHECK_THAT(output, Catch::StartsWith("error: "));
        CHECK_THAT(output, Catch::Contains(c.expected));
        CHECK(!std::filesystem::exists(out));
    }
    // prepare_sft.py with the byte tokenizer: its template needs tokens the byte tokenizer has
    std::filesystem::path jsonl = dir / "chats.jsonl", tok = dir / "chats.tok";
    std::ofstream(jsonl) << "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}\n";
    for (const char* flag : {"--template llama3", "--template nope"}) {
        std::string cmd = "python3 dev/data/prepare_sft.py " + jsonl.string() + " " + tok.string() + " --tokenizer byte " + flag;
        int rc = run_command(cmd, &output);
        INFO("$ " << cmd << "\n" << output);
        CHECK(rc == 1);
        CHECK(std::count(output.begin(), output.end(), '\n') == 1);
        CHECK_THAT(output, Catch::StartsWith("prepare_sft: error: "));
        CHECK(!std::filesystem::exists(tok));
    }
    std::filesystem::remove_all(dir);
}
