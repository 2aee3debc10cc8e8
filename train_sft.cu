/*
train_sft: supervised fine-tuning, stage 1 of Xwin-LM.

A model learns to answer: on chat conversations in the Xwin-LM (Vicuna v1.1) template, the
loss is the mean negative log-likelihood of the assistant tokens and their </s> (the mask of
the token file, written by dev/data/prepare_sft.py), over every assistant turn.

  ./train_sft                   the built-in task world: a tiny Llama trained from scratch on
                                data/world/, saved to out/sft/model.bin for the next stages
  ./train_sft -m llama.bin -i train.tok -j val.tok -k llama.tokenizer -o out/my_sft
                                a converted Hugging Face Llama (Xwin-LM's SFT settings)

Flags (llm.c style): -m model.bin (none: a new model of the world config) | -i train.tok |
-j val.tok | -k tokenizer | -p eval prompts (.tsv, see data/world/README.md) | -o out dir |
-b micro-batch (sequences) | -d total batch (sequences per step) | -t max sequence length |
-l peak lr (default 2e-5 with -m, as Xwin-LM; 2e-3 for the world) | -w warmup steps | -x max steps (0: -e epochs) | -e epochs | -q weight decay |
-c grad clip | -v val every | -s sample every | -n checkpoint every | -y 1: resume from
out/latest | -z stop after this step (the schedule still runs to -x) | -r seed
*/
#include <chrono>

#include "llm.cu"

struct SFTConfig {
    const char* model_path = nullptr;  // nullptr: a new model of the world config
    const char* train_path = "data/world/sft_train.tok";
    const char* val_path = "data/world/sft_val.tok";
    const char* tokenizer_path = "data/world/byte.tokenizer";
    const char* prompts_path = "data/world/eval_prompts.tsv";
    const char* out_dir = "out/sft";
    int micro_batch = 16;
    int total_batch = 32;
    int max_len = 256;
    float lr = 0.0f;  // 0: Xwin-LM's 2e-5 when fine-tuning a model (-m), 2e-3 for the world from scratch
    int warmup = 30;
    int max_steps = 600;
    int epochs = 1;
    float weight_decay = 0.0f;
    float grad_clip = 1.0f;
    int val_every = 100;
    int sample_every = 100;
    int checkpoint_every = 200;
    int resume = 0;
    int stop_at = 0;
    uint64_t seed = 1337;
};

// The built-in world's model: a tiny Llama over the byte-level tokenizer (259 ids).
static LlamaConfig world_config() { return LlamaConfig{128, 4, 4, 2, 259, 344, 256, 1, HEAD_LM, 10000.0, 1e-5}; }

// A new model: weights ~ N(0, 0.02), output projections scaled by 1/sqrt(2 L), norms 1.
static void init_random(Llama* model, const LlamaConfig& c, uint64_t seed) {
    llama_init(model, c);
    uint64_t rng = seed;
    size_t sizes[NUM_PARAM_TENSORS], offset = 0;
    param_sizes(c, sizes);
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        bool norm = !param_is_decayed(i), output = (i == 5 || i == 9);  // wo, w_down
        float std = output ? 0.02f / std::sqrt(2.0f * c.n_layers) : 0.02f;
        for (size_t j = 0; j < sizes[i]; j++) model->params_memory[offset + j] = norm ? 1.0f : std * rng_normal(&rng);
        offset += sizes[i];
    }
}

static void parse_args(int argc, char** argv, SFTConfig* cfg) {
    for (int i = 1; i < argc; i += 2) {
        if (i + 1 >= argc || argv[i][0] != '-' || strlen(argv[i]) != 2) {
            fprintf(stderr, "usage: ./train_sft [-m model.bin] [-i train.tok] [-j val.tok] [-k tokenizer] [-o out] ... (see the top of train_sft.cu)\n");
            exit(1);
        }
        const char* v = argv[i + 1];
        switch (argv[i][1]) {
            case 'm': cfg->model_path = v; break;
            case 'i': cfg->train_path = v; break;
            case 'j': cfg->val_path = v; break;
            case 'k': cfg->tokenizer_path = v; break;
            case 'p': cfg->prompts_path = v; break;
            case 'o': cfg->out_dir = v; break;
            case 'b': cfg->micro_batch = atoi(v); break;
            case 'd': cfg->total_batch = atoi(v); break;
            case 't': cfg->max_len = atoi(v); break;
            case 'l': cfg->lr = (float)atof(v); break;
            case 'w': cfg->warmup = atoi(v); break;
            case 'x': cfg->max_steps = atoi(v); break;
            case 'e': cfg->epochs = atoi(v); break;
            case 'q': cfg->weight_decay = (float)atof(v); break;
            case 'c': cfg->grad_clip = (float)atof(v); break;
            case 'v': cfg->val_every = atoi(v); break;
            case 's': cfg->sample_every = atoi(v); break;
            case 'n': cfg->checkpoint_every = atoi(v); break;
            case 'y': cfg->resume = atoi(v); break;
            case 'z': cfg->stop_at = atoi(v); break;
            case 'r': cfg->seed = strtoull(v, nullptr, 10); break;
            default: fprintf(stderr, "error: unknown flag %s (see the top of train_sft.cu)\n", argv[i]); exit(1);
        }
    }
    if (cfg->micro_batch < 1 || cfg->total_batch < cfg->micro_batch || cfg->total_batch % cfg->micro_batch != 0) {
        fprintf(stderr, "error: the total batch -d %d must be a positive multiple of the micro-batch -b %d\n", cfg->total_batch, cfg->micro_batch);
        exit(1);
    }
}

// Mean masked loss over a whole token file, in micro-batches.
static double evaluate(Runner* r, const TokenData& data, int B, std::vector<int>& tokens, std::vector<uint8_t>& mask) {
    double nll = 0;
    size_t targets = 0;
    std::vector<size_t> rows(B);
    for (size_t first = 0; first < data.n_seqs; first += B) {
        int nb = (int)std::min((size_t)B, data.n_seqs - first), T = 0;
        for (int b = 0; b < nb; b++) rows[b] = first + b, T = std::max(T, (int)token_seq_len(data, first + b));
        tokens_fill_rows(data, rows.data(), nb, T, tokens.data(), mask.data());
        const float* lp = runner_forward(r, tokens.data(), nb, T);
        size_t count;
        nll += masked_mean_loss(lp, mask.data(), nb, T, &count) * count;
        targets += count;
    }
    return targets ? nll / targets : 0.0;
}

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);  // the step lines reach a log file as they happen
    SFTConfig cfg;
    parse_args(argc, argv, &cfg);
    make_dir(cfg.out_dir);

    // load: the model (or a new one, or the newest checkpoint), the data, the tokenizer
    Runner runner;
    TrainState state;
    std::string resume_dir = cfg.resume ? checkpoint_latest(cfg.out_dir) : "";
    if (cfg.resume && resume_dir.empty()) fail_file(cfg.out_dir, "has no checkpoint to resume from (no 'latest' file)");
    if (!resume_dir.empty()) llama_load(&runner.host, (resume_dir + "/model.bin").c_str());
    else if (cfg.model_path) llama_load(&runner.host, cfg.model_path);
    else init_random(&runner.host, world_config(), cfg.seed);
    if (cfg.lr == 0.0f) cfg.lr = cfg.model_path ? 2e-5f : 2e-3f;
    const LlamaConfig& c = runner.host.config;
    if (c.head_type != HEAD_LM) fail_file(cfg.model_path, "has a reward head; SFT trains a language model");
    TokenData train, val;
    tokens_load(&train, cfg.train_path, c.vocab_size);
    bool has_val = cfg.val_path && *cfg.val_path;
    if (has_val) tokens_load(&val, cfg.val_path, c.vocab_size);
    int T = std::min(cfg.max_len, c.max_seq_len);
    for (const TokenData* d : {&train, &val}) {
        for (size_t i = 0; i < d->n_seqs; i++) {
            if (token_seq_len(*d, i) > (size_t)T) {
                fail_file(d == &train ? cfg.train_path : cfg.val_path, "sequence %zu has %zu tokens, more than the maximum %d (-t, max_seq_len)", i,
                          token_seq_len(*d, i), T);
            }
        }
    }
    Tokenizer tok;
    tokenizer_load(&tok, cfg.tokenizer_path);
    std::vector<WorldPrompt> prompts;  // held-out prompts for the printed answers ('' for none)
    if (cfg.prompts_path && *cfg.prompts_path) prompts = world_load_prompts(cfg.prompts_path);
    int accum = cfg.total_batch / cfg.micro_batch;
    int steps_per_epoch = (int)(train.n_seqs / cfg.total_batch);
    int max_steps = cfg.max_steps > 0 ? cfg.max_steps : cfg.epochs * steps_per_epoch;
    runner_init(&runner, cfg.micro_batch, T, true);
    if (!resume_dir.empty()) checkpoint_load_state(resume_dir, &runner, &state);
    else state.rng = cfg.seed;
    printf("train_sft on %s | %zu parameters | %zu train sequences, %zu val | batch %d x %d | %d steps | lr %.1e\n",
           runner_device(), runner.host.num_params, train.n_seqs, has_val ? val.n_seqs : 0, cfg.micro_batch, accum, max_steps, cfg.lr);
    if (!resume_dir.empty()) printf("resumed from %s at step %u\n", resume_dir.c_str(), state.step);
    std::string log_path = std::string(cfg.out_dir) + "/log.jsonl";
    FILE* log = fopen_check(log_path.c_str(), state.step > 0 ? "a" : "w");

    std::vector<int> tokens((size_t)cfg.micro_batch * T);
    std::vector<uint8_t> mask((size_t)cfg.micro_batch * T);
    std::vector<float> dlp((size_t)cfg.micro_batch * T);
    std::vector<size_t> order, rows((size_t)cfg.total_batch);
    epoch_order(order, train.n_seqs, cfg.seed, state.epoch);
    AdamWConfig opt{cfg.lr, 0.9f, 0.999f, 1e-8f, cfg.weight_decay};  // Xwin-LM SFT: betas 0.9/0.999, no decay

    // loop: one optimizer step per total batch
    while ((int)state.step < max_steps && (cfg.stop_at == 0 || (int)state.step < cfg.stop_at)) {
        auto t0 = std::chrono::steady_clock::now();
        for (size_t i = 0; i < rows.size(); i++) {  // the step's sequences, in the epoch's order
            if (state.position == train.n_seqs) {
                state.epoch += 1;
                state.position = 0;
                epoch_order(order, train.n_seqs, cfg.seed, state.epoch);
            }
            rows[i] = order[state.position++];
        }
        size_t step_targets = 0;  // the loss is the mean over all targets of the step
        for (size_t i = 0; i < rows.size(); i++) {
            for (size_t j = train.offsets[rows[i]] + 1; j < train.offsets[rows[i] + 1]; j++) step_targets += train.mask[j];
        }
        // loss and gradient, accumulated over the micro-batches
        runner_zero_grad(&runner);
        double loss = 0;
        size_t step_tokens = 0;
        for (int a = 0; a < accum; a++) {
            const size_t* mrows = rows.data() + (size_t)a * cfg.micro_batch;
            int Tb = 0;
            for (int b = 0; b < cfg.micro_batch; b++) Tb = std::max(Tb, (int)token_seq_len(train, mrows[b]));
            tokens_fill_rows(train, mrows, cfg.micro_batch, Tb, tokens.data(), mask.data());
            const float* lp = runner_forward(&runner, tokens.data(), cfg.micro_batch, Tb);
            size_t count;
            loss += masked_mean_loss(lp, mask.data(), cfg.micro_batch, Tb, &count) * count / std::max(step_targets, (size_t)1);
            masked_mean_loss_backward(dlp.data(), mask.data(), cfg.micro_batch, Tb, step_targets);
            runner_backward(&runner, tokens.data(), dlp.data(), cfg.micro_batch, Tb);
            step_tokens += (size_t)cfg.micro_batch * Tb;
        }
        // step
        float norm = runner_clip_grad_norm(&runner, cfg.grad_clip);
        opt.lr = lr_at((int)state.step + 1, max_steps, cfg.warmup, cfg.lr, 0.0f);
        runner_update(&runner, opt);
        state.step += 1;
        // log
        double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        printf("step %4u/%d | loss %.4f | norm %.3f | lr %.2e | %.1f ms | %.0f tok/s%s\n", state.step, max_steps, loss, norm, opt.lr, ms,
               step_tokens / (ms / 1000.0), mfu_text(runner.host.num_params, step_tokens, ms).c_str());
        fprintf(log, "{\"step\": %u, \"loss\": %.6f, \"norm\": %.6f, \"lr\": %.6e, \"ms\": %.3f, \"tokens\": %zu}\n", state.step, loss, norm,
                opt.lr, ms, step_tokens);
        bool last = (int)state.step == max_steps;
        if (has_val && (last || (cfg.val_every > 0 && state.step % cfg.val_every == 0))) {
            double val_loss = evaluate(&runner, val, cfg.micro_batch, tokens, mask);
            printf("step %4u | val loss %.4f\n", state.step, val_loss);
            fprintf(log, "{\"step\": %u, \"val_loss\": %.6f}\n", state.step, val_loss);
        }
        if (!prompts.empty() && cfg.sample_every > 0 && state.step % cfg.sample_every == 0) {
            const WorldPrompt& p = prompts[0];
            std::vector<int> ids;
            chat_encode_prompt(&tok, p.messages[0], std::vector<std::string>(p.messages.begin() + 1, p.messages.end()), ids);
            std::vector<int> answer = generate_greedy(&runner, ids, 64, tok.eos_id);
            std::string text = tokenizer_decode(&tok, answer.data(), (int)answer.size());
            printf("step %4u | %s -> %s | judge %d/10\n", state.step, p.messages.back().c_str(), text.c_str(), world_judge(p.kind, p.gold, text));
        }
        fflush(log);
        // checkpoint
        if (last || (cfg.checkpoint_every > 0 && state.step % cfg.checkpoint_every == 0) || (int)state.step == cfg.stop_at) {
            checkpoint_save(cfg.out_dir, &runner, state);
        }
    }
    if ((int)state.step == max_steps) {
        if (!prompts.empty()) {
            printf("greedy answers to held-out prompts:\n");
            double score = world_evaluate(&runner, &tok, prompts, 100, 6);
            printf("gold judge: mean %.2f / 10 over %zu held-out prompts\n", score, std::min(prompts.size(), (size_t)100));
        }
        runner_download_params(&runner);
        std::string final_path = std::string(cfg.out_dir) + "/model.bin";
        llama_save(&runner.host, final_path.c_str(), DTYPE_FP32);
        printf("saved %s\n", final_path.c_str());
    }
    fclose(log);
    tokenizer_free(&tok);
    runner_free(&runner);
    return 0;
}
