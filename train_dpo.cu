/*
train_dpo: DPO, stage 5 of Xwin-LM, and the whole recipe behind `make && ./train_dpo`.

Direct preference optimization trains the policy pi on preference pairs (chosen c, rejected r,
the same prompt) against a frozen reference rho, the model DPO starts from:
    h = (log pi(c) - log pi(r)) - (log rho(c) - log rho(r))
    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     (-O 0: sigmoid; -L eps)
    loss = (h' - 1 / (2 beta))^2, h' from per-token means              (-O 1: IPO)
  + -N times the NLL of the chosen answers (TRL's rpo_alpha; default 1, which keeps the chosen
answers likely while the margin grows), where log pi(x) is the sum of the log-probs of an
answer's tokens (dpo_loss, below). The reference's log-probs never change:
they are computed once, by the starting model, before the first step, and stored beside the
pairs (<pairs>.logps) with the identity of the model that made them; a step holds one model.

  ./train_dpo                   the world's recipe: DPO from the RS model (out/rs/model.bin) on pairs
                                from the Xwin-Set; any earlier stage whose output is missing runs
                                first with its defaults (SFT, the preference pairs and the reward
                                model, the Xwin-Set, RS), each command printed as it starts; at the
                                end, every stage's model on the held-out prompts: the stage table,
                                out/report.md, out/report.png and the training curves out/curves.png
  ./train_dpo -S 2              the recipe with seed 2 in every stage (-S to train_sft, train_rm and
                                sample); dev/recipe_seeds.py runs it over several seeds
  ./train_dpo -S 2 -D 1         the commands of the stages that would run, without running them
  mpirun -np 4 ./train_dpo      the recipe on 4 ranks: each data-parallel stage (train_sft, train_rm,
                                sample -m set) on 4 new ranks, every other command on rank 0 alone,
                                then DPO on the 4 ranks (-D 1 says where each command would run)
  ./train_dpo -e rs.bin -i pairs.pairs -j val.pairs -k tokenizer -o out/my_dpo
                                DPO alone on any pair file (dev/data/prepare_pairs.py)
  ./train_dpo -h                every flag, its range and its default; -b and -d count pairs
*/
#ifndef TESTING               // test/test_dpo_loss.cpp includes this file for its objective, without the recipe
#define XWIN_PLOTS                  // the report's PNG
#endif
#include "llm.cu"

#include <spawn.h>
#include <sys/wait.h>

// ---- the objective: TRL's DPO losses and metrics, on the host in double (a few scalars per pair)

enum DPOLossType { DPO_SIGMOID = 0, DPO_IPO = 1 };

struct DPOConfig {
    int loss_type = DPO_SIGMOID;
    float beta = 0.1f;             // > 0
    float label_smoothing = 0.0f;  // [0, 0.5): conservative DPO (sigmoid only)
    float nll_weight = 0.0f;       // >= 0: weight of the NLL of the chosen responses (TRL's rpo_alpha)
};

// returns "" or a one-line message naming the setting's problem
static std::string dpo_config_check(const DPOConfig& cfg) {
    if (cfg.loss_type != DPO_SIGMOID && cfg.loss_type != DPO_IPO) return string_format("loss type %d is not 0 (sigmoid) or 1 (IPO)", cfg.loss_type);
    if (!(cfg.beta > 0.0f) || !std::isfinite(cfg.beta)) return string_format("beta %g must be > 0", cfg.beta);
    if (!(cfg.label_smoothing >= 0.0f && cfg.label_smoothing < 0.5f)) {
        return string_format("label smoothing %g must be in [0, 0.5)", cfg.label_smoothing);
    }
    if (cfg.loss_type == DPO_IPO && cfg.label_smoothing != 0.0f) {
        return string_format("label smoothing %g is for the sigmoid loss only; IPO takes none (set it to 0)", cfg.label_smoothing);
    }
    if (!(cfg.nll_weight >= 0.0f) || !std::isfinite(cfg.nll_weight)) return string_format("nll_weight %g must be >= 0", cfg.nll_weight);
    return "";
}

// -log sigmoid(x) = log(1 + e^-x) = max(-x, 0) + log1p(e^-|x|), finite for every x
static double neg_log_sigmoid(double x) { return std::max(-x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }
// sigmoid(x) without overflow: e^-|x| is at most 1
static double sigmoid_stable(double x) {
    double e = std::exp(-std::fabs(x));
    return x >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}

// n pairs' log-prob sums: the policy's and the reference's of the chosen and rejected answers,
// and each answer's number of target tokens (IPO's per-token means)
struct DPOPairs {
    const float *policy_chosen, *policy_rejected;  // (n) pc, pr
    const float *ref_chosen, *ref_rejected;        // (n) rc, rr
    const float *tokens_chosen, *tokens_rejected;  // (n) nc, nr
    int n;
};

// The DPO loss of n pairs, as TRL's DPOTrainer defines it. pc, pr: the policy's log-prob sums of
// the chosen and rejected responses; rc, rr: the reference's; nc, nr: each response's number of
// target tokens. With h the policy's log-ratio margin over the reference's (TRL's `logits`,
// pi_logratios - ref_logratios):
//   sigmoid (TRL's loss_type "sigmoid" with label_smoothing eps: conservative DPO):
//     h = (pc - pr) - (rc - rr);  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
//   IPO (TRL's "ipo", which first divides every log-prob sum by its response's token count):
//     h = (pc/nc - pr/nr) - (rc/nc - rr/nr);  loss = (h - 1/(2 beta))^2
// (a count below 1 is taken as 1, as TRL clamps it.) nll_weight adds the mean NLL of the
// chosen responses' tokens (TRL's rpo_alpha times its nll_loss; later TRL's loss_type "sft").
// A step may come in micro-batches: this returns this micro-batch's share of the step loss,
//   (sum over its n pairs of the pair loss) / total_pairs + nll_weight * (-(sum of pc)) / total_chosen_tokens,
// total_pairs and total_chosen_tokens being the step's, and writes dpc, dpr (n): the
// derivatives of that share by pc and pr (the reference's get none).
static double dpo_loss(const DPOConfig& cfg, const DPOPairs& p, size_t total_pairs, size_t total_chosen_tokens, float* dpc, float* dpr) {
    const float *pc = p.policy_chosen, *pr = p.policy_rejected, *rc = p.ref_chosen, *rr = p.ref_rejected, *nc = p.tokens_chosen,
                *nr = p.tokens_rejected;
    const double beta = cfg.beta, eps = cfg.label_smoothing, pairs = (double)total_pairs;
    const double dnll = total_chosen_tokens ? -(double)cfg.nll_weight / (double)total_chosen_tokens : 0.0;  // d(NLL term)/d(pc)
    double loss = 0;
    for (int i = 0; i < p.n; i++) {
        double pair, dh, hc = 1, hr = 1;  // the pair's loss, d(pair)/dh, dh/d(pc) and -dh/d(pr)
        if (cfg.loss_type == DPO_IPO) {
            hc = 1.0 / std::max((double)nc[i], 1.0);
            hr = 1.0 / std::max((double)nr[i], 1.0);
            double h = ((double)pc[i] * hc - (double)pr[i] * hr) - ((double)rc[i] * hc - (double)rr[i] * hr);
            double u = h - 1.0 / (2.0 * beta);
            pair = u * u;
            dh = 2.0 * u;
        } else {
            double h = ((double)pc[i] - pr[i]) - ((double)rc[i] - rr[i]), x = beta * h;
            pair = (1.0 - eps) * neg_log_sigmoid(x) + eps * neg_log_sigmoid(-x);
            dh = beta * (-(1.0 - eps) * sigmoid_stable(-x) + eps * sigmoid_stable(x));
        }
        loss += pair / pairs + dnll * pc[i];
        dpc[i] = (float)(dh * hc / pairs + dnll);
        dpr[i] = (float)(-dh * hr / pairs);
    }
    return loss;
}

// TRL's DPO metrics, as sums over pairs (divide each by `pairs` to log them): rewards/chosen =
// beta (pc - rc), rewards/rejected = beta (pr - rr), rewards/accuracies = [chosen reward >
// rejected reward], rewards/margins = chosen - rejected reward, logps/chosen = pc,
// logps/rejected = pr. Always of the sums, as today's TRL logs them (earlier TRL logged
// per-token means under IPO).
struct DPOMetrics {
    double rewards_chosen = 0, rewards_rejected = 0, accuracies = 0, margins = 0, logps_chosen = 0, logps_rejected = 0;
    double pairs = 0;
};

static void dpo_metrics_add(DPOMetrics* m, const DPOConfig& cfg, const DPOPairs& p) {
    const float *pc = p.policy_chosen, *pr = p.policy_rejected, *rc = p.ref_chosen, *rr = p.ref_rejected;
    for (int i = 0; i < p.n; i++) {
        double chosen = cfg.beta * ((double)pc[i] - rc[i]), rejected = cfg.beta * ((double)pr[i] - rr[i]);
        m->rewards_chosen += chosen;
        m->rewards_rejected += rejected;
        m->accuracies += chosen > rejected ? 1.0 : 0.0;
        m->margins += chosen - rejected;
        m->logps_chosen += pc[i];
        m->logps_rejected += pr[i];
        m->pairs += 1;
    }
}

// ---- the DPO stage

struct DPOStageConfig {
    TrainConfig train;
    DPOConfig dpo;
    const char* model_path = "out/rs/model.bin";  // the policy's start and the reference
    const char* train_path = "out/set/dpo_train.pairs";
    const char* val_path = "out/set/dpo_val.pairs";
    const char* tokenizer_path = "data/world/byte.tokenizer";
    const char* reference_path = "";  // '': <train pairs>.logps (and <val pairs>.logps)
    const char* prompts_path = "data/world/eval_prompts.tsv";
};

// ---- the pairs of a micro-batch: sequence 2i is pair i's chosen answer, 2i + 1 its rejected

struct PairBatch {
    std::vector<size_t> seqs;      // (2 B)
    std::vector<int> tokens;       // (2 B, T)
    std::vector<uint8_t> mask;     // (2 B, T) the answers' target tokens
    std::vector<float> pc, pr;     // (B) the policy's log-prob sums of chosen and rejected
    std::vector<float> rc, rr;     // (B) the reference's
    std::vector<float> nc, nr;     // (B) target tokens of each answer
    std::vector<float> dpc, dpr;   // (B) d(loss) / d(pc), d(pr)
    std::vector<float> dsums;      // (2 B)
    int T = 0;
};

// the first n pairs of a batch, as the objective reads them
static DPOPairs dpo_pairs(const PairBatch& pb, int n) {
    return {pb.pc.data(), pb.pr.data(), pb.rc.data(), pb.rr.data(), pb.nc.data(), pb.nr.data(), n};
}

static void pair_batch_init(PairBatch* pb, int B, int max_len) {
    pb->seqs.resize(2 * B), pb->tokens.resize((size_t)2 * B * max_len), pb->mask.resize(pb->tokens.size());
    for (auto* v : {&pb->pc, &pb->pr, &pb->rc, &pb->rr, &pb->nc, &pb->nr, &pb->dpc, &pb->dpr}) v->resize(B);
    pb->dsums.resize(2 * B);
}

// The policy's log-prob sums of pairs rows[0..n) into pb->pc, pb->pr (one forward of 2n sequences).
static void policy_logps(Runner* r, const PairData& p, const size_t* rows, int n, PairBatch* pb) {
    pb->T = 0;
    for (int i = 0; i < n; i++) {
        pb->seqs[2 * i] = 2 * rows[i], pb->seqs[2 * i + 1] = 2 * rows[i] + 1;
        pb->T = std::max(pb->T, (int)std::max(token_seq_len(p.seqs, 2 * rows[i]), token_seq_len(p.seqs, 2 * rows[i] + 1)));
    }
    tokens_fill_rows(p.seqs, pb->seqs.data(), 2 * n, pb->T, pb->tokens.data(), pb->mask.data());
    const float* sums = runner_sequence_logprobs(r, pb->tokens.data(), pb->mask.data(), 2 * n, pb->T);
    for (int i = 0; i < n; i++) {
        pb->pc[i] = sums[2 * i], pb->pr[i] = sums[2 * i + 1];
        pb->nc[i] = pb->nr[i] = 0;
        for (int t = 0; t < pb->T; t++) pb->nc[i] += pb->mask[(size_t)2 * i * pb->T + t], pb->nr[i] += pb->mask[(size_t)(2 * i + 1) * pb->T + t];
    }
}

// ---- the reference: the starting model's log-prob sums of every pair, once, before training

static ReferenceLogps reference_identity(const char* model_path, const PairData& p) {
    ReferenceLogps id;
    std::string err = model_file_identity(model_path, &id.model_size, &id.model_crc);
    if (!err.empty()) fail_file(model_path, "%s", err.c_str());
    tokens_identity(p.seqs, &id.pairs_size, &id.pairs_hash);
    return id;
}

// The reference of pairs p: read from ref_path when it exists (and belongs to the starting
// model and to these pairs), else computed by r, which must hold the starting model, and saved.
// With several ranks each computes a block of the pairs, the blocks are gathered by every rank,
// and rank 0 writes the file (rank 0 alone looks whether it exists, and says so to the others).
static ReferenceLogps reference_logps(Runner* r, Comm* comm, const char* model_path, const PairData& p, const char* pairs_path,
                                      const std::string& ref_path, bool may_compute, int B, PairBatch* pb) {
    ReferenceLogps ref = reference_identity(model_path, p);
    int exists = comm->rank == 0 && access(ref_path.c_str(), F_OK) == 0;
    comm_broadcast(comm, &exists, sizeof(exists));
    if (exists) {
        ReferenceLogps loaded;
        std::string err = reference_load_checked(&loaded, ref_path.c_str(), ref, p.n_pairs);
        if (!err.empty()) fail_file(ref_path.c_str(), "%s", err.c_str());
        printf("reference log-probs of %s: %s\n", pairs_path, ref_path.c_str());
        return loaded;
    }
    if (!may_compute) fail_file(ref_path.c_str(), "is missing; the reference is computed by the starting model before step 1, so a resumed run needs it");
    auto t0 = std::chrono::steady_clock::now();
    std::vector<size_t> rows(B);
    Shard mine = shard_of(p.n_pairs, comm->rank, comm->world);  // this rank's pairs [begin, end)
    ref.chosen.assign(p.n_pairs, 0.0f), ref.rejected.assign(p.n_pairs, 0.0f);
    for (size_t first = mine.begin; first < mine.end; first += B) {
        int n = (int)std::min((size_t)B, mine.end - first);
        for (int i = 0; i < n; i++) rows[i] = first + i;
        policy_logps(r, p, rows.data(), n, pb);
        for (int i = 0; i < n; i++) ref.chosen[first + i] = pb->pc[i], ref.rejected[first + i] = pb->pr[i];
    }
    comm_all_gather_host(comm, ref.chosen.data(), mine);
    comm_all_gather_host(comm, ref.rejected.data(), mine);
    if (comm->rank == 0) reference_save(ref, ref_path.c_str());
    printf("reference log-probs of %s by %s: %zu pairs in %.1f s, saved to %s\n", pairs_path, model_path, p.n_pairs,
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), ref_path.c_str());
    return ref;
}

static void reference_rows(const ReferenceLogps& ref, const size_t* rows, int n, PairBatch* pb) {
    for (int i = 0; i < n; i++) pb->rc[i] = ref.chosen[rows[i]], pb->rr[i] = ref.rejected[rows[i]];
}

// The loss and TRL's metrics over every pair of p (validation); each rank takes a block of the
// pairs and the ranks sum their shares.
static double evaluate_dpo(Runner* r, Comm* comm, const PairData& p, const ReferenceLogps& ref, const DPOConfig& dpo, int B, PairBatch* pb, DPOMetrics* m) {
    std::vector<size_t> rows(B);
    size_t chosen_tokens = 0;
    for (size_t i = 0; i < p.n_pairs; i++) chosen_tokens += token_targets(p.seqs, 2 * i);
    double loss = 0;
    *m = DPOMetrics{};
    Shard mine = shard_of(p.n_pairs, comm->rank, comm->world);
    for (size_t first = mine.begin; first < mine.end; first += B) {
        int n = (int)std::min((size_t)B, mine.end - first);
        for (int i = 0; i < n; i++) rows[i] = first + i;
        policy_logps(r, p, rows.data(), n, pb);
        reference_rows(ref, rows.data(), n, pb);
        loss += dpo_loss(dpo, dpo_pairs(*pb, n), p.n_pairs, chosen_tokens, pb->dpc.data(), pb->dpr.data());
        dpo_metrics_add(m, dpo, dpo_pairs(*pb, n));
    }
    comm_all_reduce_sum_double(comm, (double*)m, sizeof(DPOMetrics) / sizeof(double));
    comm_all_reduce_sum_double(comm, &loss, 1);
    return loss;
}

// TRL's metric names: the means over the pairs of DPOMetrics (val: of the validation pairs)
static std::vector<Metric> metric_list(const DPOMetrics& m, bool val) {
    static const char* names[2][6] = {
        {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"},
        {"val_rewards/chosen", "val_rewards/rejected", "val_rewards/accuracies", "val_rewards/margins", "val_logps/chosen", "val_logps/rejected"}};
    double values[6] = {m.rewards_chosen, m.rewards_rejected, m.accuracies, m.margins, m.logps_chosen, m.logps_rejected};
    std::vector<Metric> out;
    for (int i = 0; i < 6; i++) out.push_back({names[val][i], values[i] / std::max(m.pairs, 1.0)});
    return out;
}

// ---- DPO on one pair file: load, reference, loop, loss, step, log, checkpoint, save

static void train_dpo(DPOStageConfig& cfg) {
    TrainConfig& tc = cfg.train;
    std::string err = dpo_config_check(cfg.dpo);
    if (!err.empty()) fail_flag(cfg.dpo.loss_type == DPO_IPO && cfg.dpo.label_smoothing > 0 ? 'L' : cfg.dpo.beta <= 0 ? 'B' : 'L', "%s", err.c_str());
    // load: the policy (the checkpoint's when resuming, else the starting model), pairs, tokenizer
    Trainer tr;
    trainer_init(&tr, &tc, "train_dpo");
    Tokenizer tok;
    tokenizer_load(&tok, cfg.tokenizer_path);
    if (access(cfg.model_path, R_OK) != 0) fail_file(cfg.model_path, "cannot read the model DPO starts from (the reference)");
    Runner runner;
    trainer_load_model(&tr, &runner.host, cfg.model_path);  // the checkpoint's weights when resuming
    const LlamaConfig& c = runner.host.config;
    if (c.head_type != HEAD_LM) fail_file(cfg.model_path, "is a reward model; DPO trains a language model");
    if (tc.max_len > c.max_seq_len) fail_flag('t', "%d is more than the max_seq_len %d of the model", tc.max_len, c.max_seq_len);
    tokenizer_check_model(&tok, cfg.tokenizer_path, c.vocab_size, cfg.model_path);
    PairData train, val;
    bool has_val = trainer_load_pairs(&tr, c.vocab_size, cfg.train_path, cfg.val_path, &train, &val);
    runner_init(&runner, 2 * tc.micro_batch, tc.max_len, true, trainer_shard(&tr, runner.host.num_params), tc.recompute);
    int B = tc.micro_batch;
    PairBatch pb;
    pair_batch_init(&pb, B, tc.max_len);

    // the reference: the starting model's log-probs of every pair, before the first step
    std::string ref_path = *cfg.reference_path ? cfg.reference_path : std::string(cfg.train_path) + ".logps";
    bool fresh = tr.resume_dir.empty();
    ReferenceLogps ref = reference_logps(&runner, &tr.comm, cfg.model_path, train, cfg.train_path, ref_path, fresh, B, &pb), val_ref;
    if (has_val) val_ref = reference_logps(&runner, &tr.comm, cfg.model_path, val, cfg.val_path, std::string(cfg.val_path) + ".logps", fresh, B, &pb);

    trainer_start_pairs(&tr, &runner, train);
    printf("train_dpo on %s | %s | %zu train pairs, %zu val | batch %d x %d pairs | %d steps | lr %.1e | %s beta %g, label smoothing %g, nll %g\n",
           runner_device(), cfg.model_path, train.n_pairs, has_val ? val.n_pairs : 0, B, tr.accum, tr.max_steps, tc.lr,
           cfg.dpo.loss_type == DPO_IPO ? "IPO" : "sigmoid", cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.nll_weight);
    if (!tr.resume_dir.empty()) printf("resumed from %s at step %u\n", tr.resume_dir.c_str(), tr.state.step);

    std::vector<size_t> rows(tc.total_batch);
    // loop: one optimizer step per total batch of pairs
    while (trainer_running(&tr)) {
        trainer_next_rows(&tr, rows.data());
        size_t chosen_tokens = 0;  // the NLL term is a mean over the step's chosen tokens
        for (size_t row : rows) chosen_tokens += token_targets(train.seqs, 2 * row);
        runner_zero_grad(&runner);
        double loss = 0;
        DPOMetrics m;
        size_t step_tokens = 0;
        const size_t* my_rows = trainer_rank_rows(&tr, rows.data());  // this rank's pairs (the ranks sum their gradients)
        for (int a = 0; a < tr.accum; a++) {
            trainer_micro_batch(&tr, a);
            const size_t* mrows = my_rows + (size_t)a * B;
            // the policy's log-probs of chosen and rejected, the reference's, the loss
            policy_logps(&runner, train, mrows, B, &pb);
            reference_rows(ref, mrows, B, &pb);
            loss += dpo_loss(cfg.dpo, dpo_pairs(pb, B), tc.total_batch, chosen_tokens, pb.dpc.data(), pb.dpr.data());
            dpo_metrics_add(&m, cfg.dpo, dpo_pairs(pb, B));
            for (int i = 0; i < B; i++) pb.dsums[2 * i] = pb.dpc[i], pb.dsums[2 * i + 1] = pb.dpr[i];
            runner_sequence_backward(&runner, pb.tokens.data(), pb.dsums.data(), 2 * B, pb.T);
            step_tokens += (size_t)2 * B * pb.T;
        }
        // step: clip, lr, AdamW, step line (with TRL's metrics, summed over the ranks), log
        static_assert(sizeof(DPOMetrics) == 7 * sizeof(double), "DPOMetrics is summed over the ranks as 7 doubles");
        comm_all_reduce_sum_double(&tr.comm, (double*)&m, 7);
        trainer_step_end(&tr, loss, step_tokens, metric_list(m, false));
        if (has_val && trainer_due(&tr, tc.val_every)) {
            DPOMetrics vm;
            double vloss = evaluate_dpo(&runner, &tr.comm, val, val_ref, cfg.dpo, B, &pb, &vm);
            std::vector<Metric> v = metric_list(vm, true);
            v.insert(v.begin(), {"val_loss", vloss});
            trainer_log(&tr, v);
        }
        trainer_checkpoint(&tr);
    }
    if (trainer_finished(&tr)) {
        if (*cfg.prompts_path) {
            world_report(&runner, &tok, world_load_prompts(cfg.prompts_path), 4, &tr.comm);  // a block of the prompts on each rank
        }
        trainer_save_model(&tr);
    }
    trainer_close(&tr);
    tokenizer_free(&tok);
    runner_free(&runner);
}

#ifndef TESTING
// ---- the recipe around DPO: the world's stages, each run when its output is missing

static std::string program_dir;  // where train_dpo is: the other stage programs are beside it
static const char* RECIPE_TIMES = "out/recipe_times.tsv";  // stage <TAB> seconds of its last run here

static double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Under a launcher (mpirun -np N ./train_dpo) every stage runs on the run's ranks: a program
// that runs data parallel (train_sft, train_rm, sample -m set and -m eval) on N new ranks of its own
// (llm.cu's comm_spawn_program), anything else once, on rank 0 (run_alone). Such a program's
// command is plain words, '' quoting as the shell's; its words go to *argv. A program's name may
// carry a build's suffix (build/train_sft_cpu).
static bool data_parallel_command(const std::string& cmd, std::vector<std::string>* argv) {
    argv->clear();
    bool quoted = false, in_word = false;
    for (char ch : cmd) {
        if (ch == '\'') {
            if (!in_word) argv->emplace_back(), in_word = true;
            quoted = !quoted;
        } else if (ch == ' ' && !quoted) {
            in_word = false;
        } else if (!quoted && strchr("\"\\$`|&;<>()*?~#{}[]\t\n", ch)) {
            return false;  // the shell's syntax: rank 0 runs it
        } else {
            if (!in_word) argv->emplace_back(), in_word = true;
            argv->back() += ch;
        }
    }
    if (quoted || argv->empty()) return false;
    std::string name = (*argv)[0].substr((*argv)[0].rfind('/') + 1);
    auto is = [&](const std::string& program) { return name == program || name.rfind(program + "_", 0) == 0; };
    if (is("train_sft") || is("train_rm")) return true;
    if (!is("sample")) return false;
    for (size_t i = 1; i + 1 < argv->size(); i++) {  // the set and the evaluation
        if ((*argv)[i] == "-m" && ((*argv)[i + 1] == "set" || (*argv)[i + 1] == "eval")) return true;
    }
    return false;
}

// where a stage's command runs, as the recipe prints it (nothing on one process)
static std::string where_text(const std::string& cmd) {
    int world = comm_launcher_world();
    std::vector<std::string> argv;
    if (world == 1) return "";
    return data_parallel_command(cmd, &argv) ? string_format("   # on %d new ranks", world) : "   # on rank 0 alone";
}

// A command by the shell on rank 0 alone, without the variables by which a launcher tells a
// process that it is a rank (OpenMPI's OMPI_* and PMIX_*, MPICH's PMI_*, Slurm's step): a
// program it starts (sample -m select, python3) is a process of its own. Returns its wait status.
static int run_alone(const std::string& cmd) {
    std::vector<char*> env;
    for (char** e = environ; *e; e++) {
        bool launcher = false;
        for (const char* prefix : {"OMPI_", "PMIX_", "PMI_", "SLURM_STEP_", "SLURM_PROCID="}) launcher |= strncmp(*e, prefix, strlen(prefix)) == 0;
        if (!launcher) env.push_back(*e);
    }
    env.push_back(nullptr);
    const char* argv[] = {"sh", "-c", cmd.c_str(), nullptr};
    pid_t pid;
    if (posix_spawn(&pid, "/bin/sh", nullptr, nullptr, (char* const*)argv, env.data()) != 0) return -1;
    int status = -1;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    return status;
}

// A stage's command; a failure stops the recipe, on every rank, with rank 0's one-line error.
static void run_command(const std::string& cmd) {
    int world = comm_launcher_world(), rank = comm_launcher_rank();
    if (rank == 0) printf("\n$ %s%s\n", cmd.c_str(), where_text(cmd).c_str());
    fflush(stdout);
    std::vector<std::string> argv;
    std::string failure;  // "exit 2", ...; "" when it succeeded
    if (world > 1 && data_parallel_command(cmd, &argv)) {
        std::string error;
        int code = access(argv[0].c_str(), X_OK) != 0 ? -2 : comm_spawn_program(argv, world, &error);  // -2: no such program here
        if (code == -2) failure = string_format("cannot run %s: %s", argv[0].c_str(), strerror(errno));
        else if (code < 0) failure = string_format("MPI could not start %d ranks of it: %s; HINT: where the ranks fill the node, mpirun --oversubscribe", world, error.c_str());
        else if (code > 0) failure = string_format("exit %d", code);
    } else {
        int rc = world == 1 ? system(cmd.c_str()) : rank == 0 ? run_alone(cmd) : 0;
        if (world > 1) comm_idle_broadcast(&rc);
        if (rc != 0) failure = string_format("%s %d", WIFEXITED(rc) ? "exit" : "status", WIFEXITED(rc) ? WEXITSTATUS(rc) : rc);
    }
    if (failure.empty()) return;
    if (rank == 0) fprintf(stderr, "error: the recipe stopped: this command failed (%s): %s\n", failure.c_str(), cmd.c_str());
    exit(1);
}

static void record_time(const char* stage, double s) {
    FILE* f = fopen_check(RECIPE_TIMES, "a");
    fprintf(f, "%s\t%.1f\n", stage, s);
    if (fclose(f) != 0) fail_file(RECIPE_TIMES, "write failed: %s", strerror(errno));
}

// the last recorded time of each stage
static std::vector<std::pair<std::string, double>> recorded_times() {
    std::vector<std::pair<std::string, double>> out;
    FILE* f = fopen(RECIPE_TIMES, "r");
    if (!f) return out;
    char name[64];
    double s;
    while (fscanf(f, "%63s %lf", name, &s) == 2) {
        bool found = false;
        for (auto& e : out) if (e.first == name) e.second = s, found = true;
        if (!found) out.emplace_back(name, s);
    }
    fclose(f);
    return out;
}

struct Stage {
    const char* name;                   // in the stage table
    const char* output;                 // the stage runs when this is missing (or an earlier stage ran)
    std::vector<std::string> commands;  // {P} is the programs' folder
};

// The batch of every training stage of the recipe (sequences or pairs per step): train_sft's,
// train_rm's and DPO's default, one micro-batch on one process. On N ranks each rank takes
// 8/N of it (-b), so that the steps are one process's.
constexpr int RECIPE_BATCH = 8;

// The world's recipe before DPO, in order (Xwin-LM sections 2-4 on the built-in world). A seed
// other than the default (1337) goes to every program of every stage as -S, the seed's letter in
// every program; the default seed's commands are the programs' defaults. On several
// ranks the training programs take -b RECIPE_BATCH / ranks.
static std::vector<Stage> recipe_stages(uint64_t seed, int ranks) {
    std::vector<Stage> stages = {
        {"sft", "out/sft/model.bin", {"{P}/train_sft"}},
        // Xwin-Pair: the world's pairs plus on-policy ones (8 SFT answers per prompt at the
        // Xwin-Set's temperature, rated by the gold judge: the best against the worst and against
        // a random lower one), then the RM
        {"rm", "out/rm/model.bin",
         {"{P}/sample -m set -A 8 -T 0.7 -i data/world/rm_prompts.jsonl -o out/xwin_pair/samples.jsonl",
          "{P}/sample -m select -i out/xwin_pair/samples.jsonl -H 1 -Y 0 -W out/xwin_pair/on_policy_worst.jsonl",
          "{P}/sample -m select -i out/xwin_pair/samples.jsonl -H 1 -Y 1 -W out/xwin_pair/on_policy_random.jsonl",
          "cat data/world/pairs_train.jsonl out/xwin_pair/on_policy_worst.jsonl out/xwin_pair/on_policy_random.jsonl > out/xwin_pair/pairs_train.jsonl",
          "python3 dev/data/prepare_pairs.py out/xwin_pair/pairs_train.jsonl out/xwin_pair/pairs_train.pairs --tokenizer byte",
          "{P}/train_rm -i out/xwin_pair/pairs_train.pairs"}},
        // Xwin-Set: 64 answers per prompt from the SFT model at temperature 0.7 (a duplicate drawn
        // again once), scored by the RM and by the policy's log-prob; the best of each prompt by
        // reward + log pi is the RS data, best against mu - 2 sigma the DPO pairs (50 held out)
        {"xwin-set", "out/set/dpo_train.pairs",
         {"{P}/sample -m set -A 64 -T 0.7 -U 1 -f 600 -V out/rm/model.bin -i data/world/set_prompts.jsonl -o out/set/xwin_set.jsonl",
          "{P}/sample -m select -i out/set/xwin_set.jsonl -Y 2 -q 1 -o out/set/rs.jsonl -W out/set/dpo.jsonl",
          "python3 dev/data/prepare_sft.py out/set/rs.jsonl out/set/rs.tok --tokenizer byte",
          "head -n -50 out/set/dpo.jsonl > out/set/dpo_train.jsonl && tail -n 50 out/set/dpo.jsonl > out/set/dpo_val.jsonl",
          "python3 dev/data/prepare_pairs.py out/set/dpo_val.jsonl out/set/dpo_val.pairs --tokenizer byte",
          "python3 dev/data/prepare_pairs.py out/set/dpo_train.jsonl out/set/dpo_train.pairs --tokenizer byte"}},
        // RS: the SFT model fine-tuned on the best answer of each prompt, 4 epochs
        {"rs", "out/rs/model.bin", {"{P}/train_sft -e out/sft/model.bin -i out/set/rs.tok -j '' -o out/rs -x 0 -E 4 -l 1e-4 -u 10 -v 0 -n 0 -s 0"}},
    };
    bool seeded = seed != TrainConfig{}.seed;
    for (Stage& st : stages) {
        for (std::string& cmd : st.commands) {
            bool train = cmd.rfind("{P}/train_", 0) == 0;
            if (seeded && (train || cmd.rfind("{P}/sample", 0) == 0)) cmd += " -S " + std::to_string(seed);
            if (train && ranks > 1) cmd += " -b " + std::to_string(RECIPE_BATCH / ranks);
        }
    }
    return stages;
}

// Runs every stage whose output is missing, and every stage after one that ran (dry: prints
// those stages' commands and runs nothing). Under mpirun every rank goes through the stages
// together (run_command), and rank 0 alone prints and writes the recipe's own files. Ranks
// without MPI (srun's -I) cannot spawn the stages' ranks: they train DPO only.
static void run_missing_stages(uint64_t seed, bool dry, bool without_mpi) {
    bool forced = false, first = comm_launcher_rank() == 0;
    if (!dry && first) make_dir("out/xwin_pair"), make_dir("out/set");
    for (const Stage& st : recipe_stages(seed, comm_launcher_world())) {
        if (!forced && access(st.output, F_OK) == 0) {
            if (first) printf("recipe: %s is there (%s); remove it to run that stage again\n", st.name, st.output);
            continue;
        }
        if (!dry && without_mpi && comm_launcher_world() > 1) {
            fail_file(st.output, "is missing: ranks without MPI (-I) train DPO only; make the stages before it under mpirun or srun --mpi=pmix, or on one process");
        }
        forced = true;
        if (first) printf("\nrecipe: stage %s (%s is missing)\n", st.name, st.output);
        auto t0 = std::chrono::steady_clock::now();
        for (std::string cmd : st.commands) {
            size_t at = cmd.find("{P}");
            if (at != std::string::npos) cmd.replace(at, 3, program_dir);
            if (dry && first) printf("$ %s%s\n", cmd.c_str(), where_text(cmd).c_str());
            else if (!dry) run_command(cmd);
        }
        if (!dry && first) record_time(st.name, seconds_since(t0));
    }
    if (forced && !dry && first) {  // DPO starts again, from an RS model made again: its reference log-probs are stale
        for (const char* stale : {"out/dpo/model.bin", "out/set/dpo_train.pairs.logps", "out/set/dpo_val.pairs.logps"}) remove(stale);
    }
}

// ---- the stage table: every stage's model on the held-out prompts

struct StageResult {
    std::string name, model;
    std::vector<int> scores;        // (prompts) the gold judge's score of each greedy answer
    double mean = 0, win_rate = 0;  // win rate against SFT: wins + ties / 2 over the prompts
    int right = 0;                  // answers that hold the gold value (WORLD_RIGHT_SCORE or more)
    std::vector<double> kinds;      // (6) per kind
};

static void draw_report(const char* path, const std::vector<StageResult>& rows) {
    const unsigned char black[3] = {0, 0, 0}, grid[3] = {225, 225, 225};
    const unsigned char colors[3][3] = {{130, 130, 130}, {40, 90, 200}, {200, 80, 40}};
    Plot p;
    plot_init(&p, 820, 420);
    p.left = 60, p.right = 130, p.top = 40, p.bottom = 50;
    int x0 = p.left, x1 = p.w - p.right, y0 = p.h - p.bottom, y1 = p.top;
    auto Y = [&](double score) { return (int)(y0 + (y1 - y0) * score / 10.0); };
    for (int s = 0; s <= 10; s += 2) {
        plot_rect(&p, x0, Y(s), x1, Y(s) + 1, grid);
        plot_text(&p, x0 - 30, Y(s) - 6, std::to_string(s).c_str(), black);
    }
    const char* groups[7] = {"mean", "arith", "reverse", "sort", "count", "max", "followup"};
    int gw = (x1 - x0) / 7, bw = (gw - 16) / (int)rows.size();
    for (int g = 0; g < 7; g++) {
        int gx = x0 + g * gw + 8;
        for (size_t r = 0; r < rows.size() && r < 3; r++) {
            double v = g == 0 ? rows[r].mean : rows[r].kinds[g - 1];
            if (!std::isnan(v)) plot_rect(&p, gx + (int)r * bw, Y(v), gx + (int)(r + 1) * bw - 2, y0, colors[r]);
        }
        plot_text(&p, gx, y0 + 10, groups[g], black);
    }
    plot_rect(&p, x0, y0, x1, y0 + 1, black);
    plot_text(&p, x0, 10, "gold judge mean (0..10) on the held-out prompts, per stage", black);
    for (size_t r = 0; r < rows.size() && r < 3; r++) plot_text(&p, x1 + 15, y1 + 20 * (int)r, rows[r].name.c_str(), colors[r]);
    plot_save_png(&p, path);
}

// The training curves of the recipe's stages (out/curves.png), from their logs
static void draw_recipe_curves(const char* path) {
    draw_training_curves(path, {
        {"SFT: loss", "out/sft/log.jsonl", "loss"},
        {"reward model: pair accuracy", "out/rm/log.jsonl", "accuracy", 0.0, 1.0},
        {"RS: loss", "out/rs/log.jsonl", "loss"},
        {"DPO: loss", "out/dpo/log.jsonl", "loss"},
        {"DPO: rewards/margins", "out/dpo/log.jsonl", "rewards/margins"},
        {"DPO: rewards/accuracies", "out/dpo/log.jsonl", "rewards/accuracies", 0.0, 1.0},
    });
}

static void stage_table(const char* prompts_path, const char* tokenizer_path, double dpo_seconds, uint64_t seed) {
    std::vector<WorldPrompt> prompts = world_load_prompts(prompts_path);
    Tokenizer tok;
    tokenizer_load(&tok, tokenizer_path);
    std::vector<StageResult> rows(3);
    const char* names[3][2] = {{"SFT", "out/sft/model.bin"}, {"RS", "out/rs/model.bin"}, {"DPO", "out/dpo/model.bin"}};
    for (int i = 0; i < 3; i++) rows[i].name = names[i][0], rows[i].model = names[i][1];
    for (StageResult& r : rows) {
        Llama model;
        llama_load(&model, r.model.c_str());
        tokenizer_check_model(&tok, tokenizer_path, model.config.vocab_size, r.model.c_str());
        r.scores = world_scores(&model, &tok, prompts, prompts.size(), 0);
        llama_free(&model);
        for (int s : r.scores) r.mean += s, r.right += s >= WORLD_RIGHT_SCORE;
        r.mean /= r.scores.size();
        r.kinds = world_kind_means(prompts, r.scores);
        for (size_t i = 0; i < r.scores.size(); i++) {
            r.win_rate += r.scores[i] > rows[0].scores[i] ? 1.0 : r.scores[i] == rows[0].scores[i] ? 0.5 : 0.0;
        }
        r.win_rate /= r.scores.size();
    }
    record_time("dpo", dpo_seconds);
    auto times = recorded_times();
    auto time_of = [&](const char* stage) {
        for (auto& t : times) if (t.first == stage) return string_format("%.0f s", t.second);
        return std::string("-");
    };
    double total = 0;
    for (auto& t : times) total += t.second;
    std::string md = string_format("| stage | gold judge mean | arith | reverse | sort | count | max | followup | win rate vs SFT | right answers | wall time |\n"
                                   "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    const char* stage_of[3] = {"sft", "rs", "dpo"};
    for (size_t r = 0; r < rows.size(); r++) {
        if (r == 1) {  // the stages between SFT and RS make no policy of their own
            md += "| reward model (Xwin-Pair) | | | | | | | | | | " + time_of("rm") + " |\n";
            md += "| Xwin-Set (64 answers a prompt) | | | | | | | | | | " + time_of("xwin-set") + " |\n";
        }
        md += string_format("| %s | %.2f |", rows[r].name.c_str(), rows[r].mean);
        for (double k : rows[r].kinds) md += string_format(" %.1f |", k);
        md += string_format(" %.3f | %d |", rows[r].win_rate, rows[r].right);
        md += string_format(" %s |\n", time_of(stage_of[r]).c_str());
    }
    md += string_format("| total | | | | | | | | | | %.0f s |\n", total);
    printf("\nstage table (gold judge on the %zu held-out prompts of %s):\n\n%s\n", prompts.size(), prompts_path, md.c_str());
    std::string report = "# The Xwin-LM recipe on the built-in world\n\n"
                         "Made by `./train_dpo`: every stage's model answers the " + std::to_string(prompts.size()) +
                         " held-out prompts greedily, and the gold judge scores each answer (0..10). The win rate counts a tie as half; "
                         "an answer is right when it holds the gold value in any frame (a score of 4 or more). "
                         "Wall times are of each stage's last run by the recipe (`out/recipe_times.tsv`). Seed " + std::to_string(seed) +
                         " (`-S`), passed to every stage.\n\n" + md +
                         "\n![per stage](report.png)\n\n"
                         "Training curves (`curves.png`, from each stage's `log.jsonl`: the training steps as lines, the validation points as squares):\n\n"
                         "![training curves](curves.png)\n\nThe commands of the stages before DPO:\n\n";
    for (const Stage& st : recipe_stages(seed, comm_launcher_world())) {
        for (std::string cmd : st.commands) {
            if (cmd.find("{P}") == 0) cmd.replace(0, 3, ".");
            report += "    " + cmd + "\n";
        }
    }
    AtomicFile a;
    atomic_open(&a, "out/report.md");
    atomic_write(&a, report.data(), report.size());
    atomic_commit(&a);
    draw_report("out/report.png", rows);
    draw_recipe_curves("out/curves.png");
    printf("wrote out/report.md, out/report.png and out/curves.png\n");
    tokenizer_free(&tok);
}

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    DPOStageConfig cfg;
    TrainConfig& tc = cfg.train;
    tc.out_dir = "out/dpo";
    tc.micro_batch = 8, tc.total_batch = 8, tc.lr = 1e-4f, tc.warmup = 10, tc.epochs = 3;
    tc.val_every = 100, tc.checkpoint_every = 200;
    cfg.dpo.nll_weight = 1.0f;  // the chosen answers' NLL at weight 1 keeps their likelihood up as the margin grows (RPO)
    int dry_run = 0;
    const char* one_command = "";
    std::vector<Flag> flags = {
        {'e', FLAG_PATH, &cfg.model_path, 0, 0, "the model DPO starts from: the policy's start and the frozen reference"},
        {'i', FLAG_PATH, &cfg.train_path, 0, 0, "input: the training pairs (dev/data/prepare_pairs.py)"},
        {'j', FLAG_OPTIONAL_PATH, &cfg.val_path, 0, 0, "validation pairs ('': none)"},
        {'k', FLAG_PATH, &cfg.tokenizer_path, 0, 0, "tokenizer of the model"},
        {'R', FLAG_OPTIONAL_PATH, &cfg.reference_path, 0, 0, "the reference log-probs of the training pairs ('': <pairs>.logps)"},
        {'p', FLAG_OPTIONAL_PATH, &cfg.prompts_path, 0, 0, "held-out world prompts to answer and judge at the end ('': none)"},
        {'O', FLAG_INT, &cfg.dpo.loss_type, 0, 1, "loss: 0 sigmoid (DPO), 1 IPO"},
        {'B', FLAG_FLOAT, &cfg.dpo.beta, -1e9, 1e9, "beta: the strength of the reference (> 0)"},
        {'L', FLAG_FLOAT, &cfg.dpo.label_smoothing, -1e9, 1e9, "label smoothing eps in [0, 0.5): conservative DPO (sigmoid only)"},
        {'N', FLAG_FLOAT, &cfg.dpo.nll_weight, 0, 1e9, "weight of the NLL of the chosen answers (TRL's rpo_alpha; 0: plain DPO)"},
        {'D', FLAG_INT, &dry_run, 0, 1, "1 (the recipe): print the commands of the stages that would run, with the seed, and exit"},
        {'J', FLAG_OPTIONAL_PATH, &one_command, 0, 0, "run this one command as the recipe runs a stage's (under mpirun: on the ranks or on rank 0), and exit"},
    };
    train_flags(&flags, &tc);
    flags_parse(argc, argv, "DPO against a frozen reference (stage 5 of Xwin-LM); with the world's defaults, the whole recipe; -b and -d count pairs", flags);
    // the world's defaults: the recipe runs around DPO
    DPOStageConfig defaults;
    bool recipe = strcmp(cfg.model_path, defaults.model_path) == 0 && strcmp(cfg.train_path, defaults.train_path) == 0;
    program_dir = dir_of(argv[0]);
    if (*one_command) {  // the recipe's way of running a command, alone (the tests check it under mpirun)
        run_command(one_command);
        comm_mpi_end();
        return 0;
    }
    int world = comm_launcher_world();
    if (recipe && world > 1) {  // every stage's batch split over the ranks (recipe_stages), DPO's too
        if (RECIPE_BATCH % world != 0 || tc.total_batch % world != 0) {
            fail_flag('d', "the recipe's batches (%d in its stages, %d in DPO) do not split over %d ranks: run it on 1, 2, 4 or 8 ranks", RECIPE_BATCH,
                      tc.total_batch, world);
        }
        if (tc.micro_batch == tc.total_batch) tc.micro_batch /= world;
    }
    if (dry_run) {
        if (!recipe) fail_flag('D', "is for the recipe (the default -e and -i)");
        run_missing_stages(tc.seed, true, *tc.nccl_id_dir);
        if (comm_launcher_rank() == 0) printf("recipe: then DPO (seed %llu) and the stage table\n", (unsigned long long)tc.seed);
        return 0;
    }
    if (recipe && !tc.resume) run_missing_stages(tc.seed, false, *tc.nccl_id_dir);
    auto t0 = std::chrono::steady_clock::now();
    train_dpo(cfg);
    if (recipe && tc.stop_at == 0 && comm_launcher_rank() == 0) stage_table(cfg.prompts_path, cfg.tokenizer_path, seconds_since(t0), tc.seed);  // rank 0 alone
    return 0;
}
#endif  // TESTING
