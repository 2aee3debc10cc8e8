// The sampling stage as a program: ./sample's Xwin-Set (-m set, -V), the RS data and DPO pairs
// made from a set (-m select; read back by dev/data/prepare_sft.py and prepare_pairs.py), the
// evaluation (-m eval, -a), the chat (-m chat), the best-of-n curve with no mode (-m curve, the
// default), and a one-line error for each bad input. The binaries are build/sample_cpu and
// build/sample_emu (the CUDA kernels through the emulation layer).
#include <catch2/catch.hpp>

#include <map>
#include <sstream>

#include "program.h"

static const char* SAMPLE = "build/sample_cpu";

static std::vector<Json> read_jsonl(const std::string& path) {
    std::vector<std::string> lines;
    REQUIRE(read_lines_checked(path.c_str(), &lines) == "");
    std::vector<Json> rows;
    for (const std::string& l : lines) {
        if (l.empty()) continue;
        rows.emplace_back();
        REQUIRE(json_parse(l, &rows.back()) == "");
    }
    return rows;
}

static std::vector<std::string> strings_of(const Json* a) {
    std::vector<std::string> out;
    REQUIRE(a);
    for (const Json& x : a->items) out.push_back(x.text);
    return out;
}

static std::vector<double> numbers_of(const Json* a) {
    std::vector<double> out;
    REQUIRE(a);
    for (const Json& x : a->items) out.push_back(x.number);
    return out;
}

// the first line of out that contains what, or ""
static std::string line_with(const std::string& out, const std::string& what) {
    size_t at = out.find(what);
    if (at == std::string::npos) return "";
    size_t start = out.rfind('\n', at), end = out.find('\n', at);
    return out.substr(start == std::string::npos ? 0 : start + 1, end == std::string::npos ? std::string::npos : end - start - 1);
}

TEST_CASE("sample -m set: N distinct responses per prompt with their gold scores; the same seed writes the same file", "[sample]") {
    std::string model = write_small_model("sample_policy.bin"), set = scratch("set.jsonl"), again = scratch("set_again.jsonl"), other = scratch("set_other.jsonl"), out;
    std::string cmd = std::string(SAMPLE) + " -e " + model + " -m set -A 4 -f 3 -g 8 -T 1.5";
    REQUIRE(run(cmd + " -o " + set, &out) == 0);
    INFO(out);
    CHECK_THAT(out, Catch::Contains("tok/s"));
    std::vector<WorldPrompt> prompts = world_load_prompts("data/world/eval_prompts.tsv");
    std::vector<Json> rows = read_jsonl(set);
    REQUIRE(rows.size() == 3);
    for (size_t i = 0; i < rows.size(); i++) {
        CHECK(json_get(rows[i], "kind")->text == prompts[i].kind);
        CHECK(json_get(rows[i], "gold")->text == prompts[i].gold);
        std::vector<std::string> turns;
        CHECK(json_messages(json_get(rows[i], "messages"), &turns) == "");
        CHECK(turns == prompts[i].messages);
        std::vector<std::string> resp = strings_of(json_get(rows[i], "responses"));
        std::vector<double> gold = numbers_of(json_get(rows[i], "gold_scores"));
        REQUIRE(resp.size() == 4);
        REQUIRE(gold.size() == 4);
        for (size_t j = 0; j < 4; j++) {
            CHECK(gold[j] == world_judge(prompts[i].kind, prompts[i].gold, resp[j]));
            for (size_t k = 0; k < j; k++) CHECK(resp[j] != resp[k]);
        }
        CHECK(json_get(rows[i], "rm_scores") == nullptr);  // no -V
    }
    REQUIRE(run(cmd + " -o " + again, &out) == 0);
    CHECK(file_bytes(again) == file_bytes(set));
    REQUIRE(run(cmd + " -S 7 -o " + other, &out) == 0);
    CHECK(file_bytes(other) != file_bytes(set));
    // greedy, every draw is the same: each duplicate is drawn again -U times, then counted
    REQUIRE(run(std::string(SAMPLE) + " -e " + model + " -m set -A 3 -f 2 -g 5 -T 0 -U 2 -o " + other, &out) == 0);
    CHECK_THAT(out, Catch::Contains("duplicates drawn again 8 times, 4 left (-U 2)"));
    // the CUDA build (emulated) writes a set of the same shape
    REQUIRE(run("build/sample_emu -e " + model + " -m set -A 4 -f 2 -g 6 -o " + other, &out) == 0);
    rows = read_jsonl(other);
    REQUIRE(rows.size() == 2);
    CHECK(json_get(rows[1], "responses")->items.size() == 4);
    remove(set.c_str()), remove(again.c_str()), remove(other.c_str()), remove(model.c_str());
}

TEST_CASE("sample -m set -V: every response scored by the reward model as prompt + response + EOS, and its log-prob under the policy", "[sample]") {
    std::string model = write_small_model("score_policy.bin"), rm_path = write_small_reward_model("score_rm.bin"), set = scratch("scored.jsonl"), out;
    REQUIRE(run(std::string(SAMPLE) + " -e " + model + " -V " + rm_path + " -m set -A 3 -f 2 -g 10 -o " + set, &out) == 0);
    INFO(out);
    std::vector<Json> rows = read_jsonl(set);
    REQUIRE(rows.size() == 2);
    Tokenizer tok;
    tokenizer_load(&tok, "data/world/byte.tokenizer");
    std::vector<WorldPrompt> prompts = world_load_prompts("data/world/eval_prompts.tsv");
    Runner rm, policy;
    llama_load(&rm.host, rm_path.c_str());
    runner_init(&rm, 1, 256, false);
    llama_load(&policy.host, model.c_str());
    runner_init(&policy, 1, 256, false);
    for (size_t i = 0; i < rows.size(); i++) {
        std::vector<std::string> resp = strings_of(json_get(rows[i], "responses"));
        std::vector<double> scores = numbers_of(json_get(rows[i], "rm_scores")), logps = numbers_of(json_get(rows[i], "policy_logps"));
        REQUIRE(scores.size() == resp.size());
        REQUIRE(logps.size() == resp.size());
        for (size_t j = 0; j < resp.size(); j++) {
            std::vector<int> ids;  // one conversation, unpadded, as the template renders it
            world_prompt_ids(&tok, prompts[i], ids);
            for (unsigned char ch : resp[j]) ids.push_back(ch);
            ids.push_back(257);
            double want = runner_score(&rm, ids.data(), 1, (int)ids.size())[0];
            CHECK(scores[j] == Approx(want).epsilon(1e-5));  // the batch pads; the sums run in the same order
            // the policy's log-prob: its token log-probs of the response and the EOS, added up here
            size_t prompt_len = ids.size() - resp[j].size() - 1;
            const float* lp = runner_forward(&policy, ids.data(), 1, (int)ids.size());
            double sum = 0;
            for (size_t t = prompt_len; t < ids.size(); t++) sum += lp[t];
            CHECK(logps[j] < 0);
            CHECK(logps[j] == Approx(sum).epsilon(1e-5));
        }
    }
    runner_free(&rm), runner_free(&policy);
    tokenizer_free(&tok);
    remove(set.c_str()), remove(model.c_str()), remove(rm_path.c_str());
}

static std::string set_row(const std::string& kind, const std::string& user, const std::vector<std::string>& resp, const std::vector<double>& rm,
                           const std::vector<double>& gold, const std::vector<double>& logps = {}) {
    Json row = json_object(), r = json_array(), a = json_array(), b = json_array();
    row.members.emplace_back("kind", json_string(kind));
    row.members.emplace_back("messages", json_of_messages({"Solve the task.", user}));
    for (size_t i = 0; i < resp.size(); i++) {
        r.items.push_back(json_string(resp[i])), a.items.push_back(json_number(rm[i])), b.items.push_back(json_number(gold[i]));
    }
    row.members.emplace_back("responses", r);
    row.members.emplace_back("rm_scores", a);
    row.members.emplace_back("gold_scores", b);
    if (!logps.empty()) {
        Json l = json_array();
        for (double x : logps) l.items.push_back(json_number(x));
        row.members.emplace_back("policy_logps", l);
    }
    std::string text;
    json_append(text, row);
    return text + "\n";
}

TEST_CASE("sample -m select: the best response per prompt as SFT data and DPO pairs by each strategy, read by the prepare scripts", "[sample]") {
    std::string set = scratch("hand_set.jsonl"), rs = scratch("rs.jsonl"), pairs = scratch("dpo.jsonl"), out;
    // row 1: the reward model prefers "The answer is 5." (2.5), then "5" (1.0), "6" (-1.0), "The answer is 6." (-3.0)
    //   mean -0.125, population sigma 2.073: mu - 2 sigma = -4.27, nearest "The answer is 6." (-3.0)
    // row 2: every score equal: no pair; row 3: the gold scores rank otherwise than the reward scores
    std::string text = set_row("arith", "What is 2 plus 3?", {"5", "The answer is 5.", "The answer is 6.", "6"}, {1.0, 2.5, -3.0, -1.0}, {4, 10, 0, 0}) +
                       set_row("count", "Count the letter 'a' in 'aa'.", {"2", "two"}, {0.5, 0.5}, {4, 0}) +
                       set_row("reverse", "Reverse the word 'ab'.", {"ba", "The answer is ba.", "ab"}, {2.0, 1.0, 0.0}, {4, 10, 0});
    write_bytes(set, std::vector<unsigned char>(text.begin(), text.end()));
    struct Want { int strategy, select; std::vector<std::string> chosen, rejected; };
    std::vector<Want> wants = {{0, 0, {"The answer is 5.", "ba"}, {"The answer is 6.", "ab"}},
                               {2, 0, {"The answer is 5.", "ba"}, {"The answer is 6.", "ab"}},
                               {0, 1, {"The answer is 5.", "2", "The answer is ba."}, {"The answer is 6.", "two", "ab"}}};
    for (const Want& w : wants) {
        REQUIRE(run(std::string(SAMPLE) + " -m select -i " + set + " -o " + rs + " -W " + pairs + " -Y " + std::to_string(w.strategy) + " -H " + std::to_string(w.select) + " -q 0", &out) == 0);
        INFO(out);
        std::vector<Json> best = read_jsonl(rs), dpo = read_jsonl(pairs);
        REQUIRE(best.size() == 3);
        REQUIRE(dpo.size() == w.chosen.size());
        CHECK(json_get(best[0], "messages")->items.back().members[1].second.text == "The answer is 5.");
        for (size_t i = 0; i < dpo.size(); i++) {
            CHECK(json_get(dpo[i], "chosen")->items.back().members[1].second.text == w.chosen[i]);
            CHECK(json_get(dpo[i], "rejected")->items.back().members[1].second.text == w.rejected[i]);
            CHECK(json_get(dpo[i], "score_chosen")->number > json_get(dpo[i], "score_rejected")->number);
        }
        CHECK(run("python3 dev/data/prepare_sft.py " + rs + " " + rs + ".tok --tokenizer byte", &out) == 0);
        CHECK(run("python3 dev/data/prepare_pairs.py " + pairs + " " + pairs + ".pairs --tokenizer byte", &out) == 0);
        PairData p;
        CHECK(pairs_load_checked(&p, (pairs + ".pairs").c_str(), 259) == "");
        CHECK(p.n_pairs == w.chosen.size());
    }
    // best vs random: the rejected is one of the lower ones
    REQUIRE(run(std::string(SAMPLE) + " -m select -i " + set + " -W " + pairs + " -Y 1 -q 0", &out) == 0);
    CHECK_THAT(out, Catch::Contains("2 pairs, best vs random; 1 prompts left out (every response scores the same)"));
    std::vector<Json> dpo = read_jsonl(pairs);
    std::string rejected = json_get(dpo[0], "rejected")->items.back().members[1].second.text;
    CHECK((rejected == "5" || rejected == "6" || rejected == "The answer is 6."));
    for (const std::string& f : {set, rs, pairs, rs + ".tok", pairs + ".pairs"}) remove(f.c_str());
}

// -q: the selection score is the reward plus q times the policy's log-prob; the default q = 1
// needs the set's policy_logps, and a set without them is a one-line error that names -q 0.
TEST_CASE("sample -m select -q: selection by the reward plus the policy's log-prob", "[sample]") {
    std::string set = scratch("kl_set.jsonl"), rs = scratch("kl_rs.jsonl"), pairs = scratch("kl_dpo.jsonl"), out;
    // rewards 3, 1, 0 and log-probs -6, -1, -9: by the reward "The answer is 6." (3) is best and
    // "6." (0) worst; with q = 1 the scores are -3, 0, -9, so "The answer is 5." is best and "6."
    // still worst; with q = 0.25 they are 1.5, 0.75, -2.25: the reward's choice again
    std::string text = set_row("arith", "What is 2 plus 3?", {"The answer is 6.", "The answer is 5.", "6."}, {3.0, 1.0, 0.0}, {0, 10, 0}, {-6.0, -1.0, -9.0});
    write_bytes(set, std::vector<unsigned char>(text.begin(), text.end()));
    struct Want { std::string q, best; double score_chosen, score_rejected; };
    for (const Want& w : {Want{"", "The answer is 5.", 0.0, -9.0}, Want{" -q 0", "The answer is 6.", 3.0, 0.0}, Want{" -q 0.25", "The answer is 6.", 1.5, -2.25}}) {
        REQUIRE(run(std::string(SAMPLE) + " -m select -i " + set + " -o " + rs + " -W " + pairs + " -Y 0" + w.q, &out) == 0);
        INFO(out);
        std::vector<Json> best = read_jsonl(rs), dpo = read_jsonl(pairs);
        REQUIRE(best.size() == 1);
        REQUIRE(dpo.size() == 1);
        CHECK(json_get(best[0], "messages")->items.back().members[1].second.text == w.best);
        CHECK(json_get(dpo[0], "chosen")->items.back().members[1].second.text == w.best);
        CHECK(json_get(dpo[0], "rejected")->items.back().members[1].second.text == "6.");
        CHECK(json_get(dpo[0], "score_chosen")->number == Approx(w.score_chosen));
        CHECK(json_get(dpo[0], "score_rejected")->number == Approx(w.score_rejected));
    }
    // a set without the log-probs, and one with a positive log-prob
    text = set_row("arith", "What is 2 plus 3?", {"5", "6"}, {1.0, 0.0}, {4, 0});
    write_bytes(set, std::vector<unsigned char>(text.begin(), text.end()));
    CHECK(run(std::string(SAMPLE) + " -m select -i " + set + " -o " + rs, &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: " + set + ": line 1: no 'policy_logps' list of one log-prob per response (-q 0 selects by the reward alone)"));
    CHECK(run(std::string(SAMPLE) + " -m select -i " + set + " -o " + rs + " -H 1", &out) == 0);  // the gold scores need no log-probs
    text = set_row("arith", "What is 2 plus 3?", {"5", "6"}, {1.0, 0.0}, {4, 0}, {-1.0, 0.5});
    write_bytes(set, std::vector<unsigned char>(text.begin(), text.end()));
    CHECK(run(std::string(SAMPLE) + " -m select -i " + set + " -o " + rs, &out) == 1);
    CHECK_THAT(out, Catch::Contains("line 1: policy_logps 2 is not a log-prob (a number <= 0)"));
    for (const std::string& f : {set, rs, pairs}) remove(f.c_str());
}

TEST_CASE("sample -m eval: the gold judge's mean of the answers and the win rate against a reference", "[sample]") {
    std::string model = write_small_model("eval_policy.bin"), answers = scratch("answers.jsonl"), ref = scratch("reference.jsonl"), out;
    std::string cmd = std::string(SAMPLE) + " -m eval -e " + model + " -f 6 -g 12";
    REQUIRE(run(cmd + " -o " + answers, &out) == 0);
    INFO(out);
    std::vector<WorldPrompt> prompts = world_load_prompts("data/world/eval_prompts.tsv");
    std::vector<Json> rows = read_jsonl(answers);
    REQUIRE(rows.size() == 6);
    double mean = 0;
    std::vector<double> mine;
    for (size_t i = 0; i < rows.size(); i++) {
        double s = json_get(rows[i], "gold_score")->number;
        CHECK(s == world_judge(prompts[i].kind, prompts[i].gold, json_get(rows[i], "response")->text));
        mean += s / rows.size();
        mine.push_back(s);
    }
    CHECK_THAT(out, Catch::Contains(string_format("gold judge mean %.3f / 10 over 6 prompts", mean)));
    // a reference that answers prompts 0, 2, 4 exactly (10) and the others with nothing (0)
    std::string text;
    double wins = 0, ties = 0;
    for (size_t i = 0; i < 6; i++) {
        Json row = json_object();
        row.members.emplace_back("messages", json_of_messages(prompts[i].messages));
        std::string r = i % 2 == 0 ? world_canonical(prompts[i].gold) : "";
        row.members.emplace_back("response", json_string(r));
        json_append(text, row);
        text += "\n";
        double theirs = world_judge(prompts[i].kind, prompts[i].gold, r);
        wins += mine[i] > theirs, ties += mine[i] == theirs;
    }
    write_bytes(ref, std::vector<unsigned char>(text.begin(), text.end()));
    REQUIRE(run(cmd + " -a " + ref, &out) == 0);
    CHECK_THAT(out, Catch::Contains(string_format("win rate %.3f (%.0f wins, %.0f ties, %.0f losses", (wins + 0.5 * ties) / 6, wins, ties, 6 - wins - ties)));
    // the answers as a reference for the same prompts given as JSONL: all ties
    REQUIRE(run(cmd + " -i data/world/eval_prompts.jsonl -a " + answers, &out) == 0);
    CHECK_THAT(out, Catch::Contains("win rate 0.500 (0 wins, 6 ties, 0 losses"));
    // a reference of other prompts is refused
    text.replace(text.find("Solve the task."), 15, "Solve the tusk.");
    write_bytes(ref, std::vector<unsigned char>(text.begin(), text.end()));
    CHECK(run(cmd + " -a " + ref, &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: " + ref + ": line 1: its prompt is not prompt 1 of data/world/eval_prompts.tsv"));
    remove(answers.c_str()), remove(ref.c_str()), remove(model.c_str());
}

TEST_CASE("sample -m eval on instructions of one's own: AlpacaEval's rows (instruction, output, generator), not judged", "[sample]") {
    std::string model = write_small_model("alpaca_policy.bin"), instructions = scratch("instructions.jsonl"), out;
    std::string world = scratch("alpaca_world.jsonl"), list = scratch("alpaca_answers.json"), lines = scratch("alpaca_answers.jsonl");
    // the user turns of the first four world prompts as AlpacaEval's evaluation set has them (an
    // instruction a line), and as conversations of one user message
    std::vector<WorldPrompt> prompts = world_load_prompts("data/world/eval_prompts.tsv");
    std::string text, convs;
    for (size_t i = 0; i < 4; i++) {
        Json row = json_object(), conv = json_object();
        row.members.emplace_back("instruction", json_string(prompts[i].messages[1]));
        row.members.emplace_back("dataset", json_string("world"));
        json_append(text, row);
        conv.members.emplace_back("messages", json_of_messages({"", prompts[i].messages[1]}));
        json_append(convs, conv);
        text += "\n", convs += "\n";
    }
    write_bytes(instructions, std::vector<unsigned char>(text.begin(), text.end()));
    write_bytes(world, std::vector<unsigned char>(convs.begin(), convs.end()));
    std::string cmd = std::string(SAMPLE) + " -m eval -e " + model + " -g 12 -i " + instructions;
    REQUIRE(run(cmd + " -o " + list, &out) == 0);
    INFO(out);
    CHECK_THAT(out, Catch::Contains(model + ": 4 answers to " + instructions + " (no kind and gold: not judged"));
    // a .json name: one JSON list, AlpacaEval's own layout
    std::vector<unsigned char> bytes = file_bytes(list);
    Json all;
    REQUIRE(json_parse(std::string(bytes.begin(), bytes.end()), &all) == "");
    REQUIRE(all.type == Json::ARRAY);
    REQUIRE(all.items.size() == 4);
    // the same prompts as conversations (JSONL out): the same greedy answers
    REQUIRE(run(std::string(SAMPLE) + " -m eval -e " + model + " -g 12 -i " + world + " -o " + lines, &out) == 0);
    std::vector<Json> same = read_jsonl(lines);
    REQUIRE(same.size() == 4);
    for (size_t i = 0; i < 4; i++) {
        const Json& row = all.items[i];
        CHECK(json_get(row, "instruction")->text == prompts[i].messages[1]);
        CHECK(json_get(row, "generator")->text == model);
        CHECK(json_get(row, "output")->text == json_get(same[i], "output")->text);
        CHECK(json_get(row, "output")->text == json_get(row, "response")->text);
        CHECK(json_get(row, "gold_score") == nullptr);
    }
    // the world's judged prompts carry AlpacaEval's fields too: the last user turn, the answer
    REQUIRE(run(std::string(SAMPLE) + " -m eval -e " + model + " -g 12 -f 4 -o " + lines, &out) == 0);
    std::vector<Json> judged = read_jsonl(lines);
    REQUIRE(judged.size() == 4);
    for (size_t i = 0; i < 4; i++) {
        CHECK(json_get(judged[i], "instruction")->text == prompts[i].messages.back());
        CHECK(json_get(judged[i], "output")->text == json_get(judged[i], "response")->text);
        CHECK(json_get(judged[i], "gold_score") != nullptr);
    }
    // nothing to judge and nowhere to write, or a win rate without a judge: one-line errors
    CHECK(run(cmd, &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: -o: the prompts of " + instructions + " have no kind and gold to judge: name the file for the answers"));
    CHECK(run(cmd + " -o " + list + " -a " + lines, &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: -a: a win rate needs the gold judge"));
    // an instruction that is not a string
    write_bytes(instructions, {'{', '"', 'i', 'n', 's', 't', 'r', 'u', 'c', 't', 'i', 'o', 'n', '"', ':', ' ', '3', '}', '\n'});
    CHECK(run(cmd + " -o " + list, &out) == 1);
    CHECK_THAT(out, Catch::Contains("error: " + instructions + ": line 1: 'instruction' is not a non-empty string"));
    for (const std::string& p : {model, instructions, world, list, lines}) remove(p.c_str());
}

TEST_CASE("sample -m chat: a chat on stdin, turn by turn, in the template", "[sample]") {
    std::string model = write_small_model("chat_policy.bin"), out;
    std::string long_line(300, 'x');
    REQUIRE(run("printf 'What is 2 plus 3?\\nNow double it.\\n" + long_line + "\\nHi\\n' | " + SAMPLE + " -m chat -g 6 -e " + model, &out) == 0);
    INFO(out);
    size_t answers = 0;
    for (size_t at = out.find("ASSISTANT: "); at != std::string::npos; at = out.find("ASSISTANT: ", at + 1)) answers++;
    CHECK(answers == 3);  // the long line is refused, and the chat goes on
    CHECK_THAT(out, Catch::Contains("longer than the context of 256 tokens (max_seq_len); it starts over"));
    // greedy: the first answer is the model's greedy answer to the default system line's prompt
    Runner r;
    llama_load(&r.host, model.c_str());
    runner_init(&r, 1, 256, false);
    Tokenizer tok;
    tokenizer_load(&tok, "data/world/byte.tokenizer");
    std::vector<int> ids;
    chat_encode_prompt(&tok, "", {"What is 2 plus 3?"}, ids);
    std::vector<int> answer = generate_greedy(&r, ids, 6, 257);
    std::string text = utf8_repair(tokenizer_decode(&tok, answer.data(), (int)answer.size()));
    CHECK_THAT(out, Catch::Contains("USER: ASSISTANT: " + text + "\n"));
    runner_free(&r);
    tokenizer_free(&tok);
    remove(model.c_str());
}

TEST_CASE("sample with no arguments: the best-of-n table and PNG; without the SFT model, the command that makes it", "[sample]") {
    std::string dir = scratch("empty_dir"), out;
    make_dir(dir);
    std::string abs = std::string(getenv("PWD") ? getenv("PWD") : ".") + "/" + SAMPLE;
    CHECK(run("cd " + dir + " && " + abs, &out) == 1);
    CHECK(out == "error: out/sft/model.bin: cannot read the model: make the world's SFT model with make && ./train_sft (or pass -e)\n");
    rm_rf(dir);
    std::string model = write_small_model("curve_policy.bin"), rm_path = write_small_reward_model("curve_rm.bin"), png = scratch("curve.png");
    REQUIRE(run(std::string(SAMPLE) + " -e " + model + " -V " + rm_path + " -f 2 -g 6 -o " + png, &out) == 0);
    INFO(out);
    std::vector<double> gold, rm;
    for (int n = 1; n <= 64; n *= 2) {
        std::string line = line_with(out, string_format("\n%4d | ", n));
        double g, r;
        REQUIRE(sscanf(line.c_str() + 1, "%*d | %lf | %lf", &g, &r) == 2);
        gold.push_back(g), rm.push_back(r);
    }
    for (size_t i = 1; i < gold.size(); i++) CHECK(gold[i] >= gold[i - 1] - 1e-9);  // the best of more is never worse
    CHECK(std::fabs(gold[0] - rm[0]) < 1e-9);  // n = 1 is the mean, whoever selects
    for (size_t i = 0; i < gold.size(); i++) CHECK(rm[i] <= gold[i] + 1e-9);  // the gold judge's pick is the upper bound
    CHECK_THAT(out, Catch::Contains("greedy: gold judge mean"));
    std::vector<unsigned char> b = file_bytes(png);
    REQUIRE(b.size() > 24);
    CHECK(std::string(b.begin() + 1, b.begin() + 4) == "PNG");
    CHECK((b[16] << 24 | b[17] << 16 | b[18] << 8 | b[19]) == 720);  // IHDR width, height
    CHECK((b[20] << 24 | b[21] << 16 | b[22] << 8 | b[23]) == 440);
    remove(model.c_str()), remove(rm_path.c_str()), remove(png.c_str());
}

// runs the command; it must fail with exactly one line, the error, and write nothing
TEST_CASE("sample -m chat prompts in the tokenizer's chat template and stops at its end of turn", "[sample][chat]") {
    // the Llama 3 template recorded in test/fixtures/chat/llama3.tokenizer, on a model of its vocabulary
    const char* tok_path = "test/fixtures/chat/llama3.tokenizer";
    Tokenizer tok;
    tokenizer_load(&tok, tok_path);
    REQUIRE(tok.chat.name == "llama3");
    std::string model = scratch("chat_llama3.bin");
    {
        Llama m;
        llama_init(&m, LlamaConfig{.dim = 32, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .vocab_size = tok.vocab_size, .ffn_dim = 64, .max_seq_len = 256, .tied_embeddings = 1});
        uint64_t rng = 11;
        for (size_t i = 0; i < m.num_params; i++) m.params_memory[i] = 0.05f * rng_normal(&rng);
        llama_save(&m, model.c_str(), DTYPE_FP32);
        llama_free(&m);
    }
    std::string out;
    REQUIRE(run("printf 'Hi there\\n' | " + std::string(SAMPLE) + " -m chat -g 8 -k " + tok_path + " -e " + model, &out) == 0);
    INFO(out);
    Runner r;
    llama_load(&r.host, model.c_str());
    runner_init(&r, 1, 256, false);
    std::vector<int> ids;
    chat_encode_prompt(&tok, "", {"Hi there"}, ids);
    std::string text;
    for (int id : ids) text += tok.pieces[id];
    CHECK(text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n");
    std::vector<int> answer = generate_greedy(&r, ids, 8, chat_end_id(&tok));
    std::string said = utf8_repair(tokenizer_decode(&tok, answer.data(), (int)answer.size()));
    CHECK_THAT(out, Catch::Contains("ASSISTANT: " + said + "\n"));
    runner_free(&r);
    tokenizer_free(&tok);
    remove(model.c_str());
}

static void check_error(const std::string& args, const std::string& want, const std::string& out_path = "") {
    std::string out;
    INFO(args);
    CHECK(run(std::string(SAMPLE) + " " + args, &out) == 1);
    CHECK_THAT(out, Catch::StartsWith("error: ") && Catch::Contains(want));
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    if (!out_path.empty()) CHECK(!exists(out_path));
}

TEST_CASE("sample: bad input is a one-line error", "[sample]") {
    std::string model = write_small_model("bad_policy.bin"), set = scratch("bad_set.jsonl"), prompts = scratch("bad_prompts.jsonl");
    std::string other_vocab_rm = write_small_reward_model("bad_rm.bin", 300), lm_as_rm = model;
    std::string m = "-e " + model + " -o " + set;
    // a prompt longer than the context (256)
    std::string text = "{\"messages\": [{\"role\": \"user\", \"content\": \"" + std::string(300, 'a') + "\"}]}\n";
    write_bytes(prompts, std::vector<unsigned char>(text.begin(), text.end()));
    size_t len = 1 + strlen(CHAT_DEFAULT_SYSTEM) + strlen(" USER: ") + 300 + strlen(" ASSISTANT: ");  // BOS, the template's bytes
    check_error(m + " -m set -A 2 -i " + prompts, prompts + ": prompt 1 is " + std::to_string(len) + " tokens in the template, longer than the context of 256 tokens", set);
    // an empty prompt file
    write_bytes(prompts, {});
    check_error(m + " -m set -A 2 -i " + prompts, prompts + ": no prompts", set);
    // a reward model of another vocabulary, a language model given as the reward model
    check_error(m + " -m set -A 2 -V " + other_vocab_rm, other_vocab_rm + ": has vocab_size 300 but the policy model has 259", set);
    check_error(m + " -m set -A 2 -V " + lm_as_rm, lm_as_rm + ": is a language model; -V takes a reward model", set);
    // a tokenizer of another vocabulary: the byte tokenizer's 259 ids for a model of 160
    check_error("-e test/fixtures/greedy_gqa/model.bin -m set -A 2 -o " + set, "data/world/byte.tokenizer: has 259 ids but the model test/fixtures/greedy_gqa/model.bin has vocab_size 160", set);
    // N <= 0, top-p outside (0, 1], temperature < 0
    check_error(m + " -m set -A 0", "-A: 0 is out of range (1..65536)", set);
    check_error(m + " -m set -A -3", "-A: -3 is out of range (1..65536)", set);
    check_error(m + " -m set -A 2 -P 0", "-P: top-p 0 keeps no token: it must be in (0, 1]", set);
    check_error(m + " -m set -A 2 -P 1.5", "-P: 1.5 is out of range (0..1)", set);
    check_error(m + " -m set -A 2 -T -0.5", "-T: -0.5 is out of range (0..100)", set);
    // one mode flag (-m): a word that is not a mode is refused, naming -m
    check_error(m + " -m sets", "-m: 'sets' is not one of curve, set, select, eval or chat", set);
    check_error(m + " -m select", "-i: select reads a set (made by -m set): name it with -i", set);
    check_error("-m select -i " + set + " -o " + scratch("bad_rs.jsonl"), set + ": cannot open", scratch("bad_rs.jsonl"));
    remove(model.c_str()), remove(prompts.c_str()), remove(other_vocab_rm.c_str());
}

// One letter, one meaning: a letter that two programs share has one meaning in both, seen in
// their -h lines: the same help (the training programs' common flags), or the shared meaning's
// word below in every program's line. Breaking it: sample's temperature as -t (the training
// programs' longest sequence) fails here.
TEST_CASE("a flag letter means one thing in every program", "[sample][flags]") {
    const std::map<char, std::string> meaning = {{'e', "model"},     {'i', "input"},     {'j', "validation"}, {'k', "tokenizer"},
                                                 {'o', "output"},    {'b', "sequences"}, {'p', "held-out"},   {'m', "mode"},
                                                 {'S', "seed"},      {'I', "NCCL"}};
    std::map<char, std::vector<std::pair<std::string, std::string>>> uses;  // letter -> (program, help)
    for (const char* program : {"train_sft", "train_rm", "train_dpo", "sample", "logprobs", "tokenize"}) {
        std::string out;
        REQUIRE(run(std::string("build/") + program + "_cpu -h", &out) == 0);
        std::istringstream lines(out);
        int flags = 0;
        for (std::string line; std::getline(lines, line);) {
            if (line.size() < 16 || line.compare(0, 3, "  -") != 0 || line[4] != ' ' || line[3] == 'h') continue;
            std::string help = line.substr(line.find('>') + 1);
            help = help.substr(0, help.rfind(" (default"));
            uses[line[3]].emplace_back(program, help);
            flags++;
        }
        CHECK(flags >= 3);
    }
    CHECK(uses['t'].size() == 3);  // the training programs' -t alone
    for (const auto& [letter, programs] : uses) {
        bool same = true;
        for (const auto& p : programs) same &= p.second == programs[0].second;
        if (same) continue;
        INFO("-" << letter << " in " << programs[0].first << ": " << programs[0].second);
        REQUIRE(meaning.count(letter));
        for (const auto& p : programs) {
            INFO(p.first << ": " << p.second);
            CHECK_THAT(p.second, Catch::Contains(meaning.at(letter), Catch::CaseSensitive::No));
        }
    }
}
