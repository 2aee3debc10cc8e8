/*
train_rm: the reward model, stage 2 of Xwin-LM.

The SFT model with its language-model head replaced by a scalar score head (transformers'
LlamaForSequenceClassification, one label, no bias) learns to rank answers: on preference
pairs (Xwin-Pair; a pair file from dev/data/prepare_pairs.py) the loss is TRL's
RewardTrainer's, the Bradley-Terry model
    loss = mean over pairs of -log sigmoid(r_chosen - r_rejected - margin)
           + center * mean over pairs of (r_chosen + r_rejected)^2
where r is the score of a whole conversation (taken at its last token), the margin is
-M times the gap of the two ratings (0: none) and -C is TRL's center_rewards_coefficient.
Validation: the loss, the pair accuracy, and Spearman's correlation between the scores and
the gold ratings of the held-out answers, overall and per group (the world's task kinds).

  ./train_rm                 the built-in world: from out/sft/model.bin (./train_sft makes it)
                             on data/world/'s pairs, saved to out/rm/model.bin
  ./train_rm -h              every flag, its range and its default; -b and -d count pairs
*/
#include "llm.cu"

// ---- the objective: TRL's RewardTrainer loss, and the measures of a reward model

// n pairs' rewards: the chosen and the rejected responses' scores, and each pair's margin
struct RewardPairs {
    const float* chosen;    // (n) r_c
    const float* rejected;  // (n) r_r
    const float* margin;    // (n), or nullptr: none
    size_t n;
};

// The reward model's loss, as TRL's RewardTrainer: over the P pairs of a step,
//   loss = mean_i [ -log sigmoid(r_c,i - r_r,i - margin_i) ] + center * mean_i [ (r_c,i + r_r,i)^2 ]
// (the Bradley-Terry model with an optional margin, and the reward-centring term of
// center_rewards_coefficient). A step may come in several micro-batches: this returns one
// micro-batch's share of the step's loss, `count` being the step's number of pairs, and writes
// d(loss)/d(r_c) and d(loss)/d(r_r) into drc and drr (n each).
static double reward_pair_loss(const RewardPairs& p, size_t count, float center, float* drc, float* drr) {
    double loss = 0;
    for (size_t i = 0; i < p.n; i++) {
        double d = (double)p.chosen[i] - p.rejected[i] - (p.margin ? p.margin[i] : 0.0f), sum = (double)p.chosen[i] + p.rejected[i];
        double nll = d > 0 ? std::log1p(std::exp(-d)) : -d + std::log1p(std::exp(d));  // -log sigmoid(d)
        double sig_neg = 1.0 / (1.0 + std::exp(d));                                      // sigmoid(-d)
        loss += (nll + center * sum * sum) / count;
        drc[i] = (float)((-sig_neg + 2.0 * center * sum) / count);
        drr[i] = (float)((sig_neg + 2.0 * center * sum) / count);
    }
    return loss;
}

// Spearman's rank correlation of x and y (n each): Pearson's correlation of their ranks, tied
// values sharing their mean rank. 0 when either has no spread.
static double spearman(const std::vector<double>& x, const std::vector<double>& y) {
    auto ranks = [](const std::vector<double>& v) {
        std::vector<size_t> order(v.size());
        for (size_t i = 0; i < v.size(); i++) order[i] = i;
        std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return v[a] < v[b]; });
        std::vector<double> r(v.size());
        for (size_t i = 0; i < order.size();) {
            size_t j = i;
            while (j + 1 < order.size() && v[order[j + 1]] == v[order[i]]) j++;
            for (size_t k = i; k <= j; k++) r[order[k]] = 0.5 * (i + j) + 1;
            i = j + 1;
        }
        return r;
    };
    std::vector<double> a = ranks(x), b = ranks(y);
    double n = (double)a.size(), ma = 0, mb = 0, sab = 0, saa = 0, sbb = 0;
    for (size_t i = 0; i < a.size(); i++) ma += a[i] / n, mb += b[i] / n;
    for (size_t i = 0; i < a.size(); i++) sab += (a[i] - ma) * (b[i] - mb), saa += (a[i] - ma) * (a[i] - ma), sbb += (b[i] - mb) * (b[i] - mb);
    return saa > 0 && sbb > 0 ? sab / std::sqrt(saa * sbb) : 0.0;
}

// ---- the stage

struct RMConfig {
    TrainConfig train;
    const char* sft_path = "out/sft/model.bin";
    const char* train_path = "data/world/pairs_train.pairs";
    const char* val_path = "data/world/pairs_val.pairs";
    const char* tokenizer_path = "data/world/byte.tokenizer";
    float margin = 0.0f;  // margin = this * (score_chosen - score_rejected)
    float center = 0.0f;  // TRL's center_rewards_coefficient
};

// The reward model made from the SFT model: its trunk as it is, a new score row w ~ N(0, 0.02)
// (transformers' initializer_range, as LlamaForSequenceClassification initialises its score),
// and the tokenizer's pad, bos and eos ids (the score is taken at the last non-pad token).
static void reward_model_from_sft(Llama* rm, const Llama* sft, const Tokenizer* tok, uint64_t seed) {
    LlamaConfig c = sft->config;
    c.head_type = HEAD_REWARD;
    c.tied_embeddings = 0;
    c.pad_id = tok->pad_id, c.bos_id = tok->bos_id, c.eos_id = tok->eos_id;
    llama_init(rm, c);
    size_t trunk = rm->num_params - (size_t)c.dim;  // every tensor before the head, in file order
    memcpy(rm->params_memory, sft->params_memory, trunk * sizeof(float));
    uint64_t rng = seed ^ 0x5EED5C0EULL;
    for (int i = 0; i < c.dim; i++) rm->params.head[i] = 0.02f * rng_normal(&rng);
}

// The scores of pairs rows[0..n): sequences 2i (chosen) and 2i + 1 (rejected) of the batch,
// right-padded with the model's pad id. Fills rc, rr (n each).
static void score_pairs(Runner* r, const PairData& p, const size_t* rows, int n, std::vector<size_t>& seqs, std::vector<int>& tokens,
                        std::vector<uint8_t>& mask, float* rc, float* rr, int* T_out) {
    int T = 0;
    for (int i = 0; i < n; i++) {
        seqs[2 * i] = 2 * rows[i], seqs[2 * i + 1] = 2 * rows[i] + 1;
        T = std::max(T, (int)std::max(token_seq_len(p.seqs, 2 * rows[i]), token_seq_len(p.seqs, 2 * rows[i] + 1)));
    }
    tokens_fill_rows(p.seqs, seqs.data(), 2 * n, T, tokens.data(), mask.data(), r->host.config.pad_id);
    const float* s = runner_score(r, tokens.data(), 2 * n, T);
    for (int i = 0; i < n; i++) rc[i] = s[2 * i], rr[i] = s[2 * i + 1];
    *T_out = T;
}

static void pair_margins(const PairData& p, const size_t* rows, int n, float scale, float* margin) {
    for (int i = 0; i < n; i++) margin[i] = scale * (p.pairs[rows[i]].score_chosen - p.pairs[rows[i]].score_rejected);
}

struct RMEval {
    double loss = 0, accuracy = 0, spearman = 0;
    std::vector<double> group_accuracy, group_spearman;  // (n_groups)
};

// The validation measures over every pair of p; with several ranks each scores a block of the
// pairs and every rank computes the measures from all the scores.
static RMEval evaluate_rm(Runner* r, Comm* comm, const PairData& p, const RMConfig& cfg, std::vector<size_t>& seqs, std::vector<int>& tokens,
                       std::vector<uint8_t>& mask) {
    int B = cfg.train.micro_batch, T;
    size_t G = std::max(p.groups.size(), (size_t)1);
    std::vector<float> rc(B), rr(B), margin(B), drc(B), drr(B), all_rc(p.n_pairs, 0.0f), all_rr(p.n_pairs, 0.0f);
    std::vector<size_t> rows(B);
    RMEval e;
    // the scores of this rank's block of the pairs, then every rank's gathered (in pair order)
    Shard mine = shard_of(p.n_pairs, comm->rank, comm->world);
    for (size_t first = mine.begin; first < mine.end; first += B) {
        int n = (int)std::min((size_t)B, mine.end - first);
        for (int i = 0; i < n; i++) rows[i] = first + i;
        score_pairs(r, p, rows.data(), n, seqs, tokens, mask, rc.data(), rr.data(), &T);
        pair_margins(p, rows.data(), n, cfg.margin, margin.data());
        e.loss += reward_pair_loss({rc.data(), rr.data(), margin.data(), (size_t)n}, p.n_pairs, cfg.center, drc.data(), drr.data());
        for (int i = 0; i < n; i++) all_rc[first + i] = rc[i], all_rr[first + i] = rr[i];
    }
    comm_all_reduce_sum_double(comm, &e.loss, 1);
    comm_all_gather_host(comm, all_rc.data(), mine);
    comm_all_gather_host(comm, all_rr.data(), mine);
    std::vector<std::vector<double>> scores(G), gold(G);
    std::vector<double> all_scores, all_gold, correct(G, 0), count(G, 0);
    for (size_t i = 0; i < p.n_pairs; i++) {
        const PairRecord& rec = p.pairs[i];
        size_t g = p.groups.empty() ? 0 : rec.group;
        correct[g] += all_rc[i] > all_rr[i], count[g] += 1;
        for (auto [s, y] : {std::pair<double, double>{all_rc[i], rec.score_chosen}, {all_rr[i], rec.score_rejected}}) {
            scores[g].push_back(s), gold[g].push_back(y), all_scores.push_back(s), all_gold.push_back(y);
        }
    }
    double right = 0;
    for (size_t g = 0; g < G; g++) {
        right += correct[g];
        e.group_accuracy.push_back(count[g] ? correct[g] / count[g] : 0.0);
        e.group_spearman.push_back(spearman(scores[g], gold[g]));
    }
    e.accuracy = right / p.n_pairs;
    e.spearman = spearman(all_scores, all_gold);
    return e;
}

#ifndef TESTING  // test/test_reward_head.cpp includes this file for its objective
int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    RMConfig cfg;
    TrainConfig& tc = cfg.train;
    tc.out_dir = "out/rm";
    // the world's default: 2 epochs of steps of 8 pairs (1500 steps). As in SFT, small steps learn
    // more from the same pairs: held-out accuracy 0.705 where 1 epoch of 32-pair steps reaches 0.645
    tc.micro_batch = 8, tc.total_batch = 8, tc.lr = 5e-4f, tc.warmup = 20, tc.max_steps = 0, tc.epochs = 2;
    tc.val_every = 500, tc.checkpoint_every = 500;
    std::vector<Flag> flags = {
        {'e', FLAG_PATH, &cfg.sft_path, 0, 0, "the SFT model the reward model starts from"},
        {'i', FLAG_PATH, &cfg.train_path, 0, 0, "input: the training pairs (dev/data/prepare_pairs.py)"},
        {'j', FLAG_OPTIONAL_PATH, &cfg.val_path, 0, 0, "validation pairs ('': none)"},
        {'k', FLAG_PATH, &cfg.tokenizer_path, 0, 0, "tokenizer of the model (its pad id pads the batches)"},
        {'M', FLAG_FLOAT, &cfg.margin, 0, 100, "margin = this * (score_chosen - score_rejected) (0: no margin)"},
        {'C', FLAG_FLOAT, &cfg.center, 0, 100, "reward centring: this * mean((r_chosen + r_rejected)^2) (TRL's center_rewards_coefficient)"},
    };
    train_flags(&flags, &tc);
    flags_parse(argc, argv, "the reward model on preference pairs (stage 2 of Xwin-LM); -b and -d count pairs", flags);

    // load: the reward model (the checkpoint's when resuming, else made from the SFT model), pairs, tokenizer
    Trainer tr;
    trainer_init(&tr, &tc, "train_rm");
    Tokenizer tok;
    tokenizer_load(&tok, cfg.tokenizer_path);
    Runner runner;
    if (!trainer_load_model(&tr, &runner.host, nullptr)) {
        if (access(cfg.sft_path, R_OK) != 0) fail_file(cfg.sft_path, "cannot read the SFT model the reward model starts from: make it with ./train_sft (or pass -e)");
        Llama sft;
        llama_load(&sft, cfg.sft_path);
        if (sft.config.head_type != HEAD_LM) fail_file(cfg.sft_path, "is already a reward model; train_rm starts from an SFT (language) model");
        tokenizer_check_model(&tok, cfg.tokenizer_path, sft.config.vocab_size, cfg.sft_path);
        if (tok.pad_id < 0) fail_file(cfg.tokenizer_path, "has no pad id; the reward model pads its batches with it");
        reward_model_from_sft(&runner.host, &sft, &tok, tc.seed);
        llama_free(&sft);
    }
    const LlamaConfig& c = runner.host.config;
    if (tc.max_len > c.max_seq_len) fail_flag('t', "%d is more than the max_seq_len %d of the model", tc.max_len, c.max_seq_len);
    tokenizer_check_model(&tok, cfg.tokenizer_path, c.vocab_size, cfg.sft_path);
    PairData train, val;
    bool has_val = trainer_load_pairs(&tr, c.vocab_size, cfg.train_path, cfg.val_path, &train, &val);
    runner_init(&runner, 2 * tc.micro_batch, tc.max_len, true, trainer_shard(&tr, runner.host.num_params), tc.recompute);
    trainer_start_pairs(&tr, &runner, train);
    printf("train_rm on %s | %zu parameters | %zu train pairs, %zu val | batch %d x %d pairs | %d steps | lr %.1e | margin %g | center %g\n",
           runner_device(), runner.host.num_params, train.n_pairs, has_val ? val.n_pairs : 0, tc.micro_batch, tr.accum, tr.max_steps, tc.lr,
           cfg.margin, cfg.center);
    if (!tr.resume_dir.empty()) printf("resumed from %s at step %u\n", tr.resume_dir.c_str(), tr.state.step);

    int B = tc.micro_batch;
    std::vector<int> tokens((size_t)2 * B * tc.max_len);
    std::vector<uint8_t> mask(tokens.size());
    std::vector<size_t> rows(tc.total_batch), seqs(2 * B);
    std::vector<float> rc(B), rr(B), margin(B), drc(B), drr(B), dscores(2 * B);
    // loop: one optimizer step per total batch of pairs
    while (trainer_running(&tr)) {
        trainer_next_rows(&tr, rows.data());
        runner_zero_grad(&runner);
        double loss = 0, correct = 0, gap = 0;
        size_t step_tokens = 0;
        const size_t* my_rows = trainer_rank_rows(&tr, rows.data());  // this rank's pairs (the ranks sum their gradients)
        for (int a = 0; a < tr.accum; a++) {
            trainer_micro_batch(&tr, a);
            const size_t* mrows = my_rows + (size_t)a * B;
            int T;
            score_pairs(&runner, train, mrows, B, seqs, tokens, mask, rc.data(), rr.data(), &T);
            pair_margins(train, mrows, B, cfg.margin, margin.data());
            loss += reward_pair_loss({rc.data(), rr.data(), margin.data(), (size_t)B}, tc.total_batch, cfg.center, drc.data(), drr.data());
            for (int i = 0; i < B; i++) {
                correct += rc[i] > rr[i], gap += rc[i] - rr[i];
                dscores[2 * i] = drc[i], dscores[2 * i + 1] = drr[i];
            }
            runner_score_backward(&runner, tokens.data(), dscores.data(), 2 * B, T);
            step_tokens += (size_t)2 * B * T;
        }
        // step: clip, lr, AdamW, step line (with TRL's accuracy and margin, summed over the ranks), log
        double counts[2] = {correct, gap};
        comm_all_reduce_sum_double(&tr.comm, counts, 2);
        correct = counts[0], gap = counts[1];
        trainer_step_end(&tr, loss, step_tokens, {{"accuracy", correct / tc.total_batch}, {"margin", gap / tc.total_batch}});
        if (has_val && trainer_due(&tr, tc.val_every)) {
            RMEval e = evaluate_rm(&runner, &tr.comm, val, cfg, seqs, tokens, mask);
            trainer_log(&tr, {{"val_loss", e.loss}, {"val_accuracy", e.accuracy}, {"val_spearman", e.spearman}});
        }
        trainer_checkpoint(&tr);
    }
    if (trainer_finished(&tr)) {
        if (has_val) {
            RMEval e = evaluate_rm(&runner, &tr.comm, val, cfg, seqs, tokens, mask);
            printf("held-out pairs: accuracy %.3f, Spearman %.3f with the gold ratings, loss %.4f\n", e.accuracy, e.spearman, e.loss);
            for (size_t g = 0; g < val.groups.size(); g++) {
                printf("  %-10s accuracy %.3f | Spearman %.3f\n", val.groups[g].c_str(), e.group_accuracy[g], e.group_spearman[g]);
            }
        }
        trainer_save_model(&tr);
    }
    trainer_close(&tr);
    tokenizer_free(&tok);
    runner_free(&runner);
    return 0;
}
#endif
