/*
sample: generation with a KV cache, stage 3 of Xwin-LM (Xwin-Set), and the data of stages 4
and 5 made from it; evaluation; chat.

Xwin-Set: for every prompt, N distinct responses are sampled from the SFT model (temperature,
top-k, top-p; one random stream per response, so the same seed gives the same text) and each
is scored by the reward model. Rejection sampling (RS) fine-tunes on the best response of each
prompt; DPO trains on pairs drawn from the set. The N samples of a prompt share one prefill
(generate in llm.cu); a duplicate of an earlier response is drawn again, up to -U times. The
reward model and the copy of the policy that gives each response's log-prob are frozen: they
score on inference runners (InferRunner: no master weights, gradients or moments, one layer's
activations), as the policy samples on one. The mode is -m:

  ./sample                        (-m curve) the world's held-out prompts, from out/sft/model.bin:
                                  the greedy judge mean and the best-of-n curve (n = 1..64) with the
                                  best chosen by the gold judge (the upper bound) and, when
                                  out/rm/model.bin exists, by the reward model; a table and
                                  out/sample/best_of_n.png
  ./sample -m set -A 64 -V out/rm/model.bin -i prompts.jsonl -o set.jsonl
                                  the Xwin-Set: -A answers per prompt, one JSON line per prompt {kind,
                                  gold, messages, responses, rm_scores, gold_scores} (gold scores
                                  where the world knows the answer; rm_scores with the reward model -V)
  ./sample -m select -i set.jsonl -o rs.jsonl -W pairs.jsonl -Y 2
                                  from a set: the best response of each prompt as SFT JSONL (RS data,
                                  for dev/data/prepare_sft.py) and DPO pairs in TRL's convention (for
                                  dev/data/prepare_pairs.py), rejected by -Y: 0 worst, 1 random,
                                  2 nearest mu - 2 sigma of the prompt's scores
  ./sample -m eval -e model.bin -o answers.jsonl -a reference.jsonl
                                  evaluation: greedy answers judged by the gold judge; the mean, and
                                  the win rate against a reference outputs file (an earlier eval's -o).
                                  Each row also has AlpacaEval's instruction, output and generator;
                                  prompts without kind and gold (-i instructions.jsonl, rows of
                                  {"instruction": ...} or {"messages": ...}) are answered, not
                                  judged; -o answers.json writes AlpacaEval's JSON list
  ./sample -m chat                chat in the template: a line of stdin is a user turn
  ./sample -h                     every flag, its range and its default
*/
#ifndef TESTING     // test/test_generate.cpp includes this file for its selection rule, without the plots and main
#define XWIN_PLOTS  // llm.cu's PNG plots (stb_image_write, stb_easy_font from Debian's libstb-dev)
#endif
#include "llm.cu"

#include <iostream>

// ---- the selection rule (Xwin-LM section 4): a set's best response, its rejected one, best-of-n

// Xwin-LM's selection score of a response: its reward plus q times the policy's log-prob of it
// (-q; 0: the reward alone)
static double selection_score(double reward, double policy_logp, double q) { return reward + q * policy_logp; }

// The expected `value` of the response that best-of-n picks (the highest `select` score; on
// ties the earlier response) from n of the m responses of a prompt drawn without replacement,
// averaged over all C(m, n) draws: with the responses ranked by select ascending (rank i =
// 1..m), the one of rank i is picked in C(i-1, n-1) of them. n = 1 is the mean, n = m the
// pick of all m.
static double best_of_n(const std::vector<double>& select, const std::vector<double>& value, int n) {
    int m = (int)select.size();
    if (n < 1 || n > m) return NAN;
    std::vector<int> order(m);
    for (int i = 0; i < m; i++) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return select[a] < select[b] || (select[a] == select[b] && a > b); });
    double expect = 0, log_total = std::lgamma(m + 1.0) - std::lgamma(n + 1.0) - std::lgamma(m - n + 1.0);
    for (int i = n; i <= m; i++) {  // rank i picks in C(i-1, n-1) draws
        double log_ways = std::lgamma((double)i) - std::lgamma((double)n) - std::lgamma((double)(i - n + 1));
        expect += value[order[i - 1]] * std::exp(log_ways - log_total);
    }
    return expect;
}

// How DPO pairs are drawn from a scored set: the best response (the highest score, the first
// on ties) is chosen; rejected is the worst, a random one, or the one whose score is nearest
// mu - 2 sigma of the set's scores (Xwin-LM's choice), each among the responses that score
// below the best.
enum PairStrategy { PAIR_WORST = 0, PAIR_RANDOM = 1, PAIR_SIGMA = 2 };
static const char* const PAIR_STRATEGY_NAMES[3] = {"best vs worst", "best vs random", "best vs nearest mu - 2 sigma"};

static int best_index(const std::vector<double>& scores) {
    return (int)(std::max_element(scores.begin(), scores.end()) - scores.begin());
}

// The rejected response's index, or -1 when none scores below the best.
static int rejected_index(const std::vector<double>& scores, int strategy, uint64_t* rng) {
    double best = scores[best_index(scores)], mean = 0, var = 0;
    std::vector<int> below;
    for (size_t i = 0; i < scores.size(); i++) if (scores[i] < best) below.push_back((int)i);
    if (below.empty()) return -1;
    if (strategy == PAIR_RANDOM) return below[rng_next(rng) % below.size()];
    int pick = below[0];
    if (strategy == PAIR_WORST) {
        for (int i : below) if (scores[i] < scores[pick]) pick = i;
        return pick;
    }
    for (double x : scores) mean += x / scores.size();
    for (double x : scores) var += (x - mean) * (x - mean) / scores.size();
    double target = mean - 2.0 * std::sqrt(var);  // the population sigma of all the set's scores
    for (int i : below) if (std::fabs(scores[i] - target) < std::fabs(scores[pick] - target)) pick = i;
    return pick;
}

// ---- the program

// what ./sample does (-m), in FLAG_CHOICE's order
enum SampleMode { MODE_CURVE, MODE_SET, MODE_SELECT, MODE_EVAL, MODE_CHAT };

struct SampleConfig {
    int mode = MODE_CURVE;
    const char* model_path = "out/sft/model.bin";
    const char* rm_path = "";  // '': none (the curve takes out/rm/model.bin when it exists)
    const char* tokenizer_path = "data/world/byte.tokenizer";
    const char* nccl_id_dir = "";  // -I: srun without MPI, NCCL's id through a file in this shared folder
    const char* prompts_path = "data/world/eval_prompts.tsv";  // -i: the prompts; the set in select mode
    const char* out_path = "";
    const char* pairs_path = "";
    const char* reference_path = "";
    int n = 64;                 // answers per prompt in the set (-A)
    float temperature = -1.0f;  // -1: the mode's default (1 to sample, 0 for eval and chat)
    float top_p = 1.0f;
    int top_k = 0;
    int max_new = 48;
    int resample = 4;
    int batch = 64;
    int max_prompts = 0;
    int select = 0;             // RS and DPO from a set: by 0 the reward scores, 1 the gold scores
    float kl = 1.0f;            // with select 0: the score is the reward + kl * the policy's log-prob
    int strategy = PAIR_SIGMA;
    uint64_t seed = 1337;
};

static const int CURVE_N = 64;  // the best-of-n curve: n = 1, 2, 4, ..., 64

// ---- the models and the prompts

struct Loaded {
    InferRunner policy;
    Tokenizer tok;
    std::vector<WorldPrompt> prompts;
    std::vector<std::vector<int>> ids;  // each prompt in the template
    int longest = 0;
};

static void load_policy(Loaded* L, const SampleConfig& cfg) {
    if (access(cfg.model_path, R_OK) != 0) fail_file(cfg.model_path, "cannot read the model: make the world's SFT model with make && ./train_sft (or pass -e)");
    llama_load(&L->policy.host, cfg.model_path);
    const LlamaConfig& c = L->policy.host.config;
    if (c.head_type != HEAD_LM) fail_file(cfg.model_path, "is a reward model; sampling needs a language model (-e)");
    tokenizer_load(&L->tok, cfg.tokenizer_path);
    tokenizer_check_model(&L->tok, cfg.tokenizer_path, c.vocab_size, cfg.model_path);
}

// The prompts, each in the template; one that leaves no room for an answer in the context is refused.
static void load_prompts(Loaded* L, const SampleConfig& cfg) {
    std::string err = prompts_load_checked(&L->prompts, cfg.prompts_path);
    if (!err.empty()) fail_file(cfg.prompts_path, "%s", err.c_str());
    if (cfg.max_prompts > 0 && (size_t)cfg.max_prompts < L->prompts.size()) L->prompts.resize(cfg.max_prompts);
    int context = L->policy.host.config.max_seq_len;
    L->ids.resize(L->prompts.size());
    for (size_t i = 0; i < L->prompts.size(); i++) {
        world_prompt_ids(&L->tok, L->prompts[i], L->ids[i]);
        int len = (int)L->ids[i].size();
        if (len >= context) {
            fail_file(cfg.prompts_path, "prompt %zu is %d tokens in the template, longer than the context of %d tokens (max_seq_len of %s) less one for the answer",
                      i + 1, len, context, cfg.model_path);
        }
        L->longest = std::max(L->longest, len);
    }
}

// The runner for n responses per prompt: B a multiple of n (at least n), the cache long enough
// for the longest prompt and max_new tokens (or the context).
static void init_runner(Loaded* L, int n, const SampleConfig& cfg) {
    int B = std::max(n, cfg.batch / n * n), max_T = std::min(L->policy.host.config.max_seq_len, L->longest + cfg.max_new);
    infer_runner_init(&L->policy, B, max_T, L->longest);
}

// The reward model, frozen, on the inference runner (no master weights, gradients or moments;
// one layer's activations), for B conversations at a time of up to its context (a repaired
// response can be longer in tokens than it was sampled: each invalid byte becomes the 3 bytes
// of U+FFFD).
static void load_reward_model(InferRunner* rm, const char* path, const Loaded& L, int B) {
    llama_load(&rm->host, path);
    const LlamaConfig &c = rm->host.config, &p = L.policy.host.config;
    if (c.head_type != HEAD_REWARD) fail_file(path, "is a language model; -V takes a reward model (./train_rm makes one)");
    if (c.vocab_size != p.vocab_size) {
        fail_file(path, "has vocab_size %d but the policy model has %d: the reward model scores another vocabulary", c.vocab_size, p.vocab_size);
    }
    if (c.pad_id < 0) fail_file(path, "has no pad id; the responses are scored in padded batches");
    infer_runner_init(rm, B, c.max_seq_len, c.max_seq_len);
}

// ---- responses: text, gold scores, reward scores

struct Response {
    std::string text;  // decoded, invalid UTF-8 replaced by U+FFFD
    std::vector<int> ids;  // the text's tokens, as the conversation file would give them
    double gold = NAN, rm = NAN;
    double logp = NAN;  // the policy's log-prob of the response (its tokens and EOS) given the prompt
};

static Response make_response(const Tokenizer* tok, const std::vector<int>& sampled, const WorldPrompt& p, size_t* repaired) {
    Response r;
    std::string raw = tokenizer_decode(tok, sampled.data(), (int)sampled.size());
    r.text = utf8_repair(raw);
    *repaired += r.text != raw;
    tokenizer_encode(tok, r.text.c_str(), r.text.size(), r.ids);
    if (!p.kind.empty() && !p.gold.empty()) r.gold = world_judge(p.kind, p.gold, r.text);
    return r;
}

// The prompt's tokens but the last in every sequence's cache, for the batches of its responses
// that start at first: forwarded once, for the first batch (infer_runner_share_prefix); every
// later batch rewinds the sequences to it.
static void prompt_in_cache(InferRunner* r, const std::vector<int>& prompt, size_t first) {
    int B, max_T, max_chunk, prefix = (int)prompt.size() - 1;
    infer_runner_shape(r, &B, &max_T, &max_chunk);
    if (first == 0) infer_runner_share_prefix(r, prompt.data(), prefix);
    else for (int b = 0; b < B; b++) infer_runner_rewind(r, b, prefix);
}

// The responses continue their prompt, which prompt_in_cache put in the cache: each row of
// tokens (nb, T) is the prompt's last token, a response of [first, first + nb) and EOS,
// right-padded with pad to the longest and cut at the cache's end (a conversation past the
// context counts up to its cut); mask (nb, T) is 1 on the response's tokens and its EOS. The
// scores and log-prob sums are those of whole conversations, with the prompt forwarded once,
// not once per response. Returns T.
static int response_batch(const InferRunner* r, const std::vector<int>& prompt, const std::vector<Response>& resp, size_t first, int nb,
                          int eos_id, int pad, std::vector<int>& tokens, std::vector<uint8_t>& mask) {
    int B, max_T, max_chunk, prefix = (int)prompt.size() - 1;
    infer_runner_shape(r, &B, &max_T, &max_chunk);
    int T = 0;
    for (int b = 0; b < nb; b++) T = std::max(T, (int)resp[first + b].ids.size() + 2);
    T = std::min(T, max_T - prefix);
    tokens.assign((size_t)nb * T, pad);
    mask.assign((size_t)nb * T, 0);
    for (int b = 0; b < nb; b++) {
        std::vector<int> seq = {prompt.back()};
        seq.insert(seq.end(), resp[first + b].ids.begin(), resp[first + b].ids.end());
        seq.push_back(eos_id);
        for (int t = 0; t < std::min((int)seq.size(), T); t++) {
            tokens[(size_t)b * T + t] = seq[t];
            mask[(size_t)b * T + t] = t >= 1;
        }
    }
    return T;
}

// Each response's reward score: the conversation prompt + response + EOS, right-padded with the
// reward model's pad id, B at a time (infer_runner_score takes the last token that is not padding).
static void score_responses(InferRunner* rm, const std::vector<int>& prompt, std::vector<Response>& resp, int eos_id, int B) {
    int pad = rm->host.config.pad_id;
    std::vector<int> tokens;
    std::vector<uint8_t> mask;
    for (size_t first = 0; first < resp.size(); first += B) {
        int nb = (int)std::min((size_t)B, resp.size() - first);
        prompt_in_cache(rm, prompt, first);
        int T = response_batch(rm, prompt, resp, first, nb, eos_id, pad, tokens, mask);
        const float* s = infer_runner_score(rm, tokens.data(), nb, T, true);
        for (int b = 0; b < nb; b++) {
            if (!std::isfinite(s[b])) {
                fprintf(stderr, "error: the reward model gave a non-finite score (%g)\n", s[b]);
                exit(1);
            }
            resp[first + b].rm = s[b];
        }
    }
}

// A copy of the policy on a second inference runner, for whole-sequence forwards (the first
// decodes, this one scores).
static void load_policy_scorer(InferRunner* pol, const Loaded& L, int B) {
    const Llama& m = L.policy.host;
    llama_init(&pol->host, m.config);
    memcpy(pol->host.params_memory, m.params_memory, m.num_params * sizeof(float));
    infer_runner_init(pol, B, m.config.max_seq_len, m.config.max_seq_len);
}

// Sets each response's logp: log pi(response, EOS | prompt) under the policy, the sum DPO's
// reference takes of the same conversation (infer_runner_sequence_logprobs), B responses at a time.
static void policy_logprobs(InferRunner* pol, const std::vector<int>& prompt, std::vector<Response>& resp, int eos_id, int B) {
    int pad = std::max(pol->host.config.pad_id, 0);  // any id: the mask leaves the padding out
    std::vector<int> tokens;
    std::vector<uint8_t> mask;
    for (size_t first = 0; first < resp.size(); first += B) {
        int nb = (int)std::min((size_t)B, resp.size() - first);
        prompt_in_cache(pol, prompt, first);
        int T = response_batch(pol, prompt, resp, first, nb, eos_id, pad, tokens, mask);
        const float* sums = infer_runner_sequence_logprobs(pol, tokens.data(), mask.data(), nb, T, true);
        for (int b = 0; b < nb; b++) resp[first + b].logp = sums[b];
    }
}

// The step line of a batch of prompts: responses, tokens and tokens/s.
static void print_batch(size_t done, size_t total, const GenerateStats& before, const GenerateStats& after, double ms) {
    size_t tokens = after.tokens - before.tokens;
    printf("prompts %4zu/%zu | %zu responses | %zu tokens | %zu resampled | %.1f ms | %.0f tok/s\n", done, total, after.responses - before.responses,
           tokens, after.resampled - before.resampled, ms, tokens / (ms / 1000.0));
    fflush(stdout);
}

static double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// n responses to each prompt of [begin, end) (with make_response), P prompts per generate call;
// a response's random stream depends on its prompt's index alone (generate's first), so a
// rank's share of the prompts gets the responses one rank gives them.
static std::vector<std::vector<Response>> sample_all(Loaded* L, int n, const GenerateConfig& g, size_t begin, size_t end, GenerateStats* stats,
                                                     size_t* repaired, double* total_ms) {
    int B, max_T, max_chunk;
    infer_runner_shape(&L->policy, &B, &max_T, &max_chunk);
    size_t P = B / n;
    std::vector<std::vector<Response>> all(L->prompts.size());
    *total_ms = 0;
    for (size_t first = begin; first < end; first += P) {
        size_t np = std::min(P, end - first);
        std::vector<std::vector<int>> ids(L->ids.begin() + first, L->ids.begin() + first + np);
        std::vector<std::vector<std::vector<int>>> out;
        GenerateStats before = *stats;
        auto t0 = std::chrono::steady_clock::now();
        generate(&L->policy, ids, n, g, first, &out, stats);
        double ms = ms_since(t0);
        *total_ms += ms;
        print_batch(first + np, L->prompts.size(), before, *stats, ms);
        for (size_t p = 0; p < np; p++) {
            for (const std::vector<int>& r : out[p]) all[first + p].push_back(make_response(&L->tok, r, L->prompts[first + p], repaired));
        }
    }
    return all;
}

static GenerateConfig generate_config(const SampleConfig& cfg, const Tokenizer& tok, float default_temperature) {
    GenerateConfig g;
    g.sampler.temperature = cfg.temperature < 0 ? default_temperature : cfg.temperature;
    g.sampler.top_k = cfg.top_k, g.sampler.top_p = cfg.top_p;
    g.max_new = cfg.max_new, g.eos_id = chat_end_id(&tok), g.seed = cfg.seed, g.resample = cfg.resample;
    return g;
}

static void write_file(const std::string& path, const std::string& text) {
    make_dir(dir_of(path));
    AtomicFile f;
    atomic_open(&f, path);
    atomic_write(&f, text.data(), text.size());
    atomic_commit(&f);
}

static Json json_numbers(const std::vector<Response>& resp, double Response::*field) {
    Json a = json_array();
    for (const Response& r : resp) a.items.push_back(json_number(r.*field));
    return a;
}

// ---- -m set: the Xwin-Set

// Under mpirun each rank samples and scores a block of the prompts (shard_of: the first ranks
// take one more when they do not divide); rank 0 writes the rows in prompt order, the file one
// rank writes.
static void make_set(const SampleConfig& cfg, Comm* comm) {
    Loaded L;
    load_policy(&L, cfg);
    load_prompts(&L, cfg);
    init_runner(&L, cfg.n, cfg);
    bool scored = *cfg.rm_path;
    InferRunner rm;
    if (scored) load_reward_model(&rm, cfg.rm_path, L, std::min(cfg.n, 32));
    InferRunner scorer;  // a copy of the policy that gives each response's log-prob (-q selects with it)
    if (scored) load_policy_scorer(&scorer, L, std::min(cfg.n, 32));
    std::string out_path = *cfg.out_path ? cfg.out_path : "out/xwin_set.jsonl";
    GenerateConfig g = generate_config(cfg, L.tok, 1.0f);
    printf("sample on %s | %s | %zu prompts x %d responses | temperature %g, top-k %d, top-p %g | up to %d new tokens | seed %llu%s\n", runner_device(),
           cfg.model_path, L.prompts.size(), cfg.n, g.sampler.temperature, g.sampler.top_k, g.sampler.top_p, g.max_new,
           (unsigned long long)g.seed, scored ? (std::string(" | reward model ") + cfg.rm_path).c_str() : "");
    GenerateStats stats;
    size_t repaired = 0;
    double ms;
    Shard mine = shard_of(L.prompts.size(), comm->rank, comm->world);  // this rank's prompts [begin, end)
    std::vector<std::vector<Response>> all = sample_all(&L, cfg.n, g, mine.begin, mine.end, &stats, &repaired, &ms);
    std::string text;
    double gold_sum = 0, rm_sum = 0;
    size_t gold_n = 0;
    for (size_t i = mine.begin; i < mine.end; i++) {
        const WorldPrompt& p = L.prompts[i];
        if (scored) score_responses(&rm, L.ids[i], all[i], chat_end_id(&L.tok), std::min(cfg.n, 32));
        if (scored) policy_logprobs(&scorer, L.ids[i], all[i], chat_end_id(&L.tok), std::min(cfg.n, 32));
        Json row = json_object(), responses = json_array();
        if (!p.kind.empty()) row.members.emplace_back("kind", json_string(p.kind));
        if (!p.gold.empty()) row.members.emplace_back("gold", json_string(p.gold));
        row.members.emplace_back("messages", json_of_messages(p.messages));
        for (const Response& r : all[i]) {
            responses.items.push_back(json_string(r.text));
            if (!std::isnan(r.gold)) gold_sum += r.gold, gold_n++;
            rm_sum += scored ? r.rm : 0.0;
        }
        row.members.emplace_back("responses", responses);
        if (scored) row.members.emplace_back("rm_scores", json_numbers(all[i], &Response::rm));
        if (scored) row.members.emplace_back("policy_logps", json_numbers(all[i], &Response::logp));
        if (!std::isnan(all[i][0].gold)) row.members.emplace_back("gold_scores", json_numbers(all[i], &Response::gold));
        json_append(text, row);
        text += '\n';
    }
    text = comm_gather_text(comm, text);
    double sums[9] = {(double)stats.responses, (double)stats.tokens, (double)stats.resampled, (double)stats.duplicates, (double)stats.cut,
                      (double)repaired, gold_sum, (double)gold_n, rm_sum};
    comm_all_reduce_sum_double(comm, sums, 9);
    stats.responses = (size_t)sums[0], stats.tokens = (size_t)sums[1], stats.resampled = (size_t)sums[2], stats.duplicates = (size_t)sums[3];
    stats.cut = (size_t)sums[4], repaired = (size_t)sums[5], gold_sum = sums[6], gold_n = (size_t)sums[7], rm_sum = sums[8];
    if (comm->rank == 0) write_file(out_path, text);
    printf("%zu responses, %zu tokens in %.1f s: %.0f tok/s | duplicates drawn again %zu times, %zu left (-U %d) | %zu cut at %d tokens | %zu with invalid UTF-8 repaired\n",
           stats.responses, stats.tokens, ms / 1000, stats.tokens / (ms / 1000), stats.resampled, stats.duplicates, cfg.resample, stats.cut, g.max_new, repaired);
    if (gold_n) printf("gold judge: mean %.2f / 10 over the %zu responses\n", gold_sum / gold_n, gold_n);
    if (scored) printf("reward model: mean score %.3f\n", rm_sum / stats.responses);
    printf("wrote %s\n", out_path.c_str());
    if (scored) infer_runner_free(&rm), infer_runner_free(&scorer);
    infer_runner_free(&L.policy);
    tokenizer_free(&L.tok);
}

// ---- -m select: RS data and DPO pairs from a set

struct SetRow {
    Json row;
    std::vector<std::string> messages, responses;
    std::vector<double> scores;  // the selection scores (-H)
    std::string kind;
};

// The selection score of each response: the gold judge's (select 1), or the reward model's plus
// kl times the policy's log-prob (select 0; kl 0: the reward alone).
static std::vector<SetRow> read_set(const char* path, int select, double kl) {
    const char* key = select == 0 ? "rm_scores" : "gold_scores";
    bool with_logps = select == 0 && kl != 0;
    std::vector<std::string> lines;
    std::string err = read_lines_checked(path, &lines);
    if (!err.empty()) fail_file(path, "%s", err.c_str());
    std::vector<SetRow> rows;
    for (size_t i = 0; i < lines.size(); i++) {
        if (lines[i].find_first_not_of(" \t") == std::string::npos) continue;
        SetRow r;
        err = json_parse(lines[i], &r.row);
        if (!err.empty()) fail_file(path, "line %zu: not JSON: %s", i + 1, err.c_str());
        err = json_messages(json_get(r.row, "messages"), &r.messages);
        if (err.empty() && r.messages.size() % 2 == 1) err = "the messages end with an assistant message, not with the prompt's user turn";
        if (!err.empty()) fail_file(path, "line %zu: %s", i + 1, err.c_str());
        const Json *resp = json_get(r.row, "responses"), *scores = json_get(r.row, key), *kind = json_get(r.row, "kind");
        if (!resp || resp->type != Json::ARRAY || resp->items.empty()) fail_file(path, "line %zu: no 'responses' list", i + 1);
        if (!scores || scores->type != Json::ARRAY || scores->items.size() != resp->items.size()) {
            fail_file(path, "line %zu: no '%s' list of one score per response%s", i + 1, key,
                      select == 0 ? " (a set made with -V; -H 1 selects by the gold scores)" : "");
        }
        const Json* logps = json_get(r.row, "policy_logps");
        if (with_logps && (!logps || logps->type != Json::ARRAY || logps->items.size() != resp->items.size())) {
            fail_file(path, "line %zu: no 'policy_logps' list of one log-prob per response (-q 0 selects by the reward alone)", i + 1);
        }
        for (size_t k = 0; k < resp->items.size(); k++) {
            if (resp->items[k].type != Json::STRING) fail_file(path, "line %zu: response %zu is not a string", i + 1, k + 1);
            if (scores->items[k].type != Json::NUMBER) fail_file(path, "line %zu: %s %zu is not a number", i + 1, key, k + 1);
            double score = scores->items[k].number;
            if (with_logps) {
                const Json& lp = logps->items[k];
                if (lp.type != Json::NUMBER || !(lp.number <= 0)) fail_file(path, "line %zu: policy_logps %zu is not a log-prob (a number <= 0)", i + 1, k + 1);
                score = selection_score(score, lp.number, kl);
            }
            r.responses.push_back(resp->items[k].text);
            r.scores.push_back(score);
        }
        if (kind && kind->type == Json::STRING) r.kind = kind->text;
        rows.push_back(std::move(r));
    }
    if (rows.empty()) fail_file(path, "no rows: not a set made by ./sample -m set");
    return rows;
}

static Json conversation(const SetRow& r, const std::string& answer) {
    std::vector<std::string> turns = r.messages;
    turns.push_back(answer);
    return json_of_messages(turns);
}

static void from_set(const SampleConfig& cfg) {
    if (!*cfg.out_path && !*cfg.pairs_path) fail_flag('m', "select has nothing to write: give -o (the best responses, RS data) and/or -W (DPO pairs)");
    std::vector<SetRow> rows = read_set(cfg.prompts_path, cfg.select, cfg.kl);
    std::string rs, pairs;
    uint64_t rng = cfg.seed;
    size_t n_pairs = 0, ties = 0;
    double best_sum = 0, all_sum = 0;
    size_t all_n = 0;
    for (const SetRow& r : rows) {
        int best = best_index(r.scores);
        best_sum += r.scores[best];
        for (double s : r.scores) all_sum += s, all_n++;
        Json sft = json_object();
        sft.members.emplace_back("messages", conversation(r, r.responses[best]));
        json_append(rs, sft);
        rs += '\n';
        int rejected = rejected_index(r.scores, cfg.strategy, &rng);
        if (rejected < 0) {
            ties++;
            continue;
        }
        Json pair = json_object();
        pair.members.emplace_back("chosen", conversation(r, r.responses[best]));
        pair.members.emplace_back("rejected", conversation(r, r.responses[rejected]));
        pair.members.emplace_back("score_chosen", json_number(r.scores[best]));
        pair.members.emplace_back("score_rejected", json_number(r.scores[rejected]));
        if (!r.kind.empty()) pair.members.emplace_back("kind", json_string(r.kind));
        json_append(pairs, pair);
        pairs += '\n';
        n_pairs++;
    }
    std::string by = cfg.select == 1 ? "gold" : cfg.kl == 0 ? "reward" : string_format("reward + %g log pi", cfg.kl);
    printf("%s: %zu prompts, %zu responses | best by the %s scores: mean %.3f (all responses %.3f)\n", cfg.prompts_path, rows.size(), all_n, by.c_str(),
           best_sum / rows.size(), all_sum / all_n);
    if (*cfg.out_path) write_file(cfg.out_path, rs), printf("wrote %s: %zu best-of-n conversations (RS data)\n", cfg.out_path, rows.size());
    if (*cfg.pairs_path) {
        write_file(cfg.pairs_path, pairs);
        printf("wrote %s: %zu pairs, %s; %zu prompts left out (every response scores the same)\n", cfg.pairs_path, n_pairs,
               PAIR_STRATEGY_NAMES[cfg.strategy], ties);
    }
}

// ---- -m eval: evaluation by the gold judge

static void evaluate(const SampleConfig& cfg, Comm* comm) {
    Loaded L;
    load_policy(&L, cfg);
    load_prompts(&L, cfg);
    // the world's prompts carry a kind and a gold answer for the judge; instructions of one's own
    // (AlpacaEval's, for example) have neither: then the answers are written and not judged
    size_t judged = 0;
    for (const WorldPrompt& p : L.prompts) judged += !p.kind.empty() && !p.gold.empty();
    bool judge = judged > 0;
    for (size_t i = 0; i < L.prompts.size() && judge; i++) {
        if (L.prompts[i].kind.empty() || L.prompts[i].gold.empty()) fail_file(cfg.prompts_path, "prompt %zu has no kind and gold, where others have: the gold judge cannot score it", i + 1);
    }
    if (!judge && *cfg.reference_path) fail_flag('a', "a win rate needs the gold judge, and the prompts of %s have no kind and gold", cfg.prompts_path);
    if (!judge && !*cfg.out_path) fail_flag('o', "the prompts of %s have no kind and gold to judge: name the file for the answers", cfg.prompts_path);
    init_runner(&L, 1, cfg);
    GenerateConfig g = generate_config(cfg, L.tok, 0.0f);
    GenerateStats stats;
    size_t repaired = 0;
    double ms;
    Shard mine = shard_of(L.prompts.size(), comm->rank, comm->world);  // this rank's prompts (under mpirun; all on one rank)
    std::vector<std::vector<Response>> all = sample_all(&L, 1, g, mine.begin, mine.end, &stats, &repaired, &ms);
    std::vector<double> ref;  // the reference's gold score of each prompt
    if (*cfg.reference_path) {
        std::vector<std::string> lines;
        std::string err = read_lines_checked(cfg.reference_path, &lines);
        if (!err.empty()) fail_file(cfg.reference_path, "%s", err.c_str());
        for (size_t i = 0; i < lines.size() && ref.size() < all.size(); i++) {
            if (lines[i].find_first_not_of(" \t") == std::string::npos) continue;
            Json row;
            std::vector<std::string> turns;
            err = json_parse(lines[i], &row);
            if (err.empty()) err = json_messages(json_get(row, "messages"), &turns);
            const Json* resp = json_get(row, "response");
            if (err.empty() && (!resp || resp->type != Json::STRING)) err = "no 'response' string";
            if (err.empty() && turns != L.prompts[ref.size()].messages) err = string_format("its prompt is not prompt %zu of %s", ref.size() + 1, cfg.prompts_path);
            if (!err.empty()) fail_file(cfg.reference_path, "line %zu: %s", i + 1, err.c_str());
            const WorldPrompt& p = L.prompts[ref.size()];
            ref.push_back(world_judge(p.kind, p.gold, resp->text));
        }
        if (ref.size() != all.size()) fail_file(cfg.reference_path, "has %zu outputs for the %zu prompts", ref.size(), all.size());
    }
    // one row per prompt; AlpacaEval's fields (instruction: the last user turn, output, generator)
    // beside ours, so that the file goes to an AlpacaEval run as it is (a .json name: one JSON
    // list, AlpacaEval's own layout; otherwise JSONL)
    bool as_list = ends_with(cfg.out_path, ".json");
    double total = 0, wins = 0, ties = 0;
    std::string text;
    for (size_t i = mine.begin; i < mine.end; i++) {
        const Response& r = all[i][0];
        total += r.gold;
        if (!ref.empty()) wins += r.gold > ref[i], ties += r.gold == ref[i];
        Json row = json_object();
        row.members.emplace_back("instruction", json_string(L.prompts[i].messages.back()));
        row.members.emplace_back("output", json_string(r.text));
        row.members.emplace_back("generator", json_string(cfg.model_path));
        if (judge) row.members.emplace_back("kind", json_string(L.prompts[i].kind)), row.members.emplace_back("gold", json_string(L.prompts[i].gold));
        row.members.emplace_back("messages", json_of_messages(L.prompts[i].messages));
        row.members.emplace_back("response", json_string(r.text));
        if (judge) row.members.emplace_back("gold_score", json_number(r.gold));
        json_append(text, row);
        text += as_list && i + 1 < all.size() ? ",\n" : "\n";
    }
    text = comm_gather_text(comm, text);  // the ranks' rows in prompt order, on rank 0
    if (as_list) text = "[\n" + text + "]\n";
    double sums[4] = {total, wins, ties, (double)stats.tokens};
    comm_all_reduce_sum_double(comm, sums, 4);
    total = sums[0], wins = sums[1], ties = sums[2], stats.tokens = (size_t)sums[3];
    size_t n = all.size();
    if (judge) {
        printf("%s: gold judge mean %.3f / 10 over %zu prompts (%s, temperature %g) | %.0f tok/s\n", cfg.model_path, total / n, n, cfg.prompts_path,
               g.sampler.temperature, stats.tokens / (ms / 1000));
    } else {
        printf("%s: %zu answers to %s (no kind and gold: not judged; temperature %g) | %.0f tok/s\n", cfg.model_path, n, cfg.prompts_path,
               g.sampler.temperature, stats.tokens / (ms / 1000));
    }
    if (!ref.empty()) {
        printf("against %s: win rate %.3f (%.0f wins, %.0f ties, %.0f losses; a tie counts half)\n", cfg.reference_path, (wins + 0.5 * ties) / n, wins,
               ties, n - wins - ties);
    }
    if (*cfg.out_path && comm->rank == 0) write_file(cfg.out_path, text), printf("wrote %s\n", cfg.out_path);
    infer_runner_free(&L.policy);
    tokenizer_free(&L.tok);
}

// ---- -m chat: chat

static void chat(const SampleConfig& cfg) {
    Loaded L;
    load_policy(&L, cfg);
    int context = L.policy.host.config.max_seq_len;
    infer_runner_init(&L.policy, 1, context, context);
    GenerateConfig g = generate_config(cfg, L.tok, 0.0f);
    std::vector<std::string> turns;
    std::string line;
    printf("chat with %s (temperature %g): one line per turn, end with EOF (Ctrl-D)\n", cfg.model_path, g.sampler.temperature);
    for (size_t round = 0; printf("USER: "), fflush(stdout), std::getline(std::cin, line); round++) {
        turns.push_back(line);
        std::vector<std::vector<int>> ids(1);
        chat_encode_prompt(&L.tok, "", turns, ids[0]);
        if ((int)ids[0].size() >= context) {
            printf("error: the conversation is %zu tokens, longer than the context of %d tokens (max_seq_len); it starts over\n", ids[0].size(), context);
            turns.clear();
            continue;
        }
        std::vector<std::vector<std::vector<int>>> out;
        GenerateStats stats;
        generate(&L.policy, ids, 1, g, round, &out, &stats);
        std::string answer = utf8_repair(tokenizer_decode(&L.tok, out[0][0].data(), (int)out[0][0].size()));
        printf("ASSISTANT: %s\n", answer.c_str());
        turns.push_back(answer);
    }
    printf("\n");
    infer_runner_free(&L.policy);
    tokenizer_free(&L.tok);
}

#ifndef TESTING
// ---- -m curve: the best-of-n curve on the world

static void draw_curves(const char* path, const std::vector<int>& ns, const std::vector<std::vector<double>>& curves,
                        const std::vector<const char*>& names, double greedy) {
    const unsigned char white[3] = {255, 255, 255}, black[3] = {0, 0, 0}, grid[3] = {225, 225, 225}, gray[3] = {130, 130, 130};
    const unsigned char colors[2][3] = {{30, 150, 60}, {40, 90, 200}};
    Plot p;
    plot_init(&p, 720, 440);
    plot_rect(&p, 0, 0, p.w, p.h, white);
    int x0 = p.left, x1 = p.w - p.right, y0 = p.h - p.bottom, y1 = p.top;
    auto X = [&](double i) { return x0 + (x1 - x0) * i / (ns.size() - 1); };
    auto Y = [&](double score) { return y0 + (y1 - y0) * score / 10.0; };
    for (int s = 0; s <= 10; s += 2) {
        plot_rect(&p, x0, (int)Y(s), x1, (int)Y(s) + 1, grid);
        plot_text(&p, x0 - 30, (int)Y(s) - 6, std::to_string(s).c_str(), black);
    }
    for (size_t i = 0; i < ns.size(); i++) {
        plot_rect(&p, (int)X(i), y1, (int)X(i) + 1, y0, grid);
        plot_text(&p, (int)X(i) - 6, y0 + 8, std::to_string(ns[i]).c_str(), black);
    }
    plot_rect(&p, x0, y0, x1 + 1, y0 + 1, black);
    plot_rect(&p, x0, y1, x0 + 1, y0, black);
    plot_text(&p, x0, 10, "best-of-n: gold judge mean (0..10)", black);
    plot_text(&p, (x0 + x1) / 2 - 10, y0 + 28, "n", black);
    plot_line(&p, x0, Y(greedy), x1, Y(greedy), gray, true);
    plot_text(&p, x1 + 15, y1 + 60, "greedy", gray);
    for (size_t c = 0; c < curves.size(); c++) {
        for (size_t i = 0; i + 1 < ns.size(); i++) plot_line(&p, X(i), Y(curves[c][i]), X(i + 1), Y(curves[c][i + 1]), colors[c], false);
        for (size_t i = 0; i < ns.size(); i++) plot_rect(&p, (int)X(i) - 3, (int)Y(curves[c][i]) - 3, (int)X(i) + 4, (int)Y(curves[c][i]) + 4, colors[c]);
        plot_text(&p, x1 + 15, y1 + 20 * (int)c, names[c], colors[c]);
    }
    plot_save_png(&p, path);
}

static void best_of_n_curve(const SampleConfig& cfg) {
    Loaded L;
    load_policy(&L, cfg);
    load_prompts(&L, cfg);
    for (size_t i = 0; i < L.prompts.size(); i++) {
        if (L.prompts[i].kind.empty() || L.prompts[i].gold.empty()) fail_file(cfg.prompts_path, "prompt %zu has no kind and gold: the gold judge cannot score it", i + 1);
    }
    const char* rm_path = *cfg.rm_path ? cfg.rm_path : access("out/rm/model.bin", R_OK) == 0 ? "out/rm/model.bin" : "";
    std::string png = *cfg.out_path ? cfg.out_path : "out/sample/best_of_n.png";
    printf("best-of-n on %s | %s | %zu held-out prompts | %d samples each | %s\n", runner_device(), cfg.model_path, L.prompts.size(), CURVE_N,
           *rm_path ? (std::string("reward model ") + rm_path).c_str() : "no reward model (./train_rm makes out/rm/model.bin)");
    // the greedy answers, then CURVE_N samples of each prompt, on one runner
    init_runner(&L, CURVE_N, cfg);
    GenerateConfig g = generate_config(cfg, L.tok, 0.0f);
    g.sampler = SamplerConfig{0.0f, 0, 1.0f};
    GenerateStats greedy_stats;
    size_t repaired = 0;
    double ms;
    std::vector<std::vector<Response>> greedy = sample_all(&L, 1, g, 0, L.prompts.size(), &greedy_stats, &repaired, &ms);
    double greedy_mean = 0;
    for (auto& r : greedy) greedy_mean += r[0].gold / greedy.size();
    printf("greedy: gold judge mean %.3f / 10 | %.0f tok/s\n", greedy_mean, greedy_stats.tokens / (ms / 1000));
    // independent samples (no resampling of duplicates): best-of-n is over i.i.d. draws
    g = generate_config(cfg, L.tok, 1.0f);
    g.resample = 0;
    GenerateStats stats;
    std::vector<std::vector<Response>> all = sample_all(&L, CURVE_N, g, 0, L.prompts.size(), &stats, &repaired, &ms);
    printf("%zu samples, %zu tokens in %.1f s: %.0f tok/s | temperature %g, top-k %d, top-p %g\n", stats.responses, stats.tokens, ms / 1000,
           stats.tokens / (ms / 1000), g.sampler.temperature, g.sampler.top_k, g.sampler.top_p);
    if (*rm_path) {
        InferRunner rm;
        load_reward_model(&rm, rm_path, L, 32);
        auto t0 = std::chrono::steady_clock::now();
        for (size_t i = 0; i < all.size(); i++) score_responses(&rm, L.ids[i], all[i], chat_end_id(&L.tok), 32);
        printf("reward model scored %zu responses in %.1f s\n", stats.responses, ms_since(t0) / 1000);
        infer_runner_free(&rm);
    }
    std::vector<int> ns;
    std::vector<std::vector<double>> curves(*rm_path ? 2 : 1);
    for (int n = 1; n <= CURVE_N; n *= 2) {
        ns.push_back(n);
        for (auto& c : curves) c.push_back(0.0);
        for (const std::vector<Response>& resp : all) {
            std::vector<double> gold, rm;
            for (const Response& r : resp) gold.push_back(r.gold), rm.push_back(r.rm);
            curves[0].back() += best_of_n(gold, gold, n) / all.size();
            if (*rm_path) curves[1].back() += best_of_n(rm, gold, n) / all.size();
        }
    }
    printf("\nbest-of-n, gold judge mean (0..10) over %zu prompts (greedy %.3f):\n   n | best by gold | best by RM\n", all.size(), greedy_mean);
    for (size_t i = 0; i < ns.size(); i++) {
        printf("%4d | %12.3f | %s\n", ns[i], curves[0][i], *rm_path ? string_format("%10.3f", curves[1][i]).c_str() : "         -");
    }
    std::vector<const char*> names = {"best by gold", "best by RM"};
    draw_curves(png.c_str(), ns, curves, names, greedy_mean);
    printf("wrote %s\n", png.c_str());
    infer_runner_free(&L.policy);
    tokenizer_free(&L.tok);
}

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    SampleConfig cfg;
    std::vector<Flag> flags = {
        {'m', FLAG_CHOICE, &cfg.mode, 0, 0, "mode: the best-of-n curve, the Xwin-Set, RS and DPO data from a set, evaluation, chat", "curve|set|select|eval|chat"},
        {'e', FLAG_PATH, &cfg.model_path, 0, 0, "the policy (SFT) model"},
        {'k', FLAG_PATH, &cfg.tokenizer_path, 0, 0, "tokenizer of the model"},
        {'i', FLAG_PATH, &cfg.prompts_path, 0, 0, "input: prompts (the world's .tsv, or JSONL {messages, [kind, gold]}); select: the set"},
        {'o', FLAG_OPTIONAL_PATH, &cfg.out_path, 0, 0, "output: the set (set), RS data (select), answers (eval), the PNG (curve)"},
        {'A', FLAG_INT, &cfg.n, 1, 1 << 16, "set: sample this many distinct answers per prompt"},
        {'V', FLAG_OPTIONAL_PATH, &cfg.rm_path, 0, 0, "set: the reward model that scores every answer ('': none)"},
        {'W', FLAG_OPTIONAL_PATH, &cfg.pairs_path, 0, 0, "select: write DPO pairs from the set here, TRL's JSONL"},
        {'Y', FLAG_INT, &cfg.strategy, 0, 2, "select: the rejected answer of a pair: 0 worst, 1 random, 2 nearest mu - 2 sigma (Xwin-LM)"},
        {'H', FLAG_INT, &cfg.select, 0, 1, "select: the best of a set by 0 the reward scores, 1 the gold scores"},
        {'q', FLAG_FLOAT, &cfg.kl, 0, 1000, "select, with -H 0: by the reward + this times the policy's log-prob (0: the reward alone)"},
        {'a', FLAG_OPTIONAL_PATH, &cfg.reference_path, 0, 0, "eval: reference answers for the win rate (an earlier eval's -o)"},
        {'T', FLAG_FLOAT, &cfg.temperature, 0, 100, "temperature (-1: 1 to sample, 0 = greedy for eval and chat)"},
        {'K', FLAG_INT, &cfg.top_k, 0, 1 << 30, "top-k: keep the k most probable tokens (0: all)"},
        {'P', FLAG_FLOAT, &cfg.top_p, 0, 1, "top-p in (0, 1]: keep the smallest set whose probability reaches it"},
        {'g', FLAG_INT, &cfg.max_new, 1, 1 << 20, "new tokens per response at most (EOS included)"},
        {'U', FLAG_INT, &cfg.resample, 0, 1000000, "set: draw a duplicate answer again up to this many times"},
        {'b', FLAG_INT, &cfg.batch, 1, 1 << 16, "sequences decoded together (set: rounded down to a multiple of -A)"},
        {'f', FLAG_INT, &cfg.max_prompts, 0, 1 << 30, "the first this many prompts (0: all)"},
        {'S', FLAG_U64, &cfg.seed, 0, 0, "seed of the samples"},
        {'I', FLAG_OPTIONAL_PATH, &cfg.nccl_id_dir, 0, 0, "srun without MPI (GPU build): a folder every rank sees, for NCCL's id ('': MPI)"},
    };
    flags_parse(argc, argv, "sampling with a KV cache: the Xwin-Set, RS and DPO data from it, evaluation, chat, the best-of-n curve (-m)", flags);
    if (cfg.top_p == 0.0f) fail_flag('P', "top-p 0 keeps no token: it must be in (0, 1]");
    if (cfg.mode == MODE_SELECT && strcmp(cfg.prompts_path, SampleConfig{}.prompts_path) == 0) {
        fail_flag('i', "select reads a set (made by -m set): name it with -i");
    }
    // under mpirun the set and the evaluation split the prompts across the ranks
    Comm comm;
    comm_init(&comm, cfg.nccl_id_dir);
    if (comm.world > 1 && cfg.mode != MODE_SET && cfg.mode != MODE_EVAL) {
        fail_flag('m', "runs on one process: only set and eval split their prompts across %d ranks", comm.world);
    }
    if (comm.world > 1) printf("data parallel: %d ranks, each samples a block of the prompts\n", comm.world);
    switch (cfg.mode) {
        case MODE_SET: make_set(cfg, &comm); break;
        case MODE_SELECT: from_set(cfg); break;
        case MODE_EVAL: evaluate(cfg, &comm); break;
        case MODE_CHAT: chat(cfg); break;
        default: best_of_n_curve(cfg);
    }
    comm_free(&comm);
    return 0;
}
#endif  // TESTING
