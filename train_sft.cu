/*
train_sft: supervised fine-tuning, stage 1 of Xwin-LM.

A model learns to answer: on chat conversations in the Xwin-LM (Vicuna v1.1) template, the
loss is the mean negative log-likelihood of the assistant tokens and their </s> (the mask of
the token file, written by dev/data/prepare_sft.py), over every assistant turn.

  ./train_sft                   the built-in task world: a tiny Llama trained from scratch on
                                data/world/, saved to out/sft/model.bin for the next stages
  ./train_sft -e llama.bin -i train.tok -j val.tok -k llama.tokenizer -o out/my_sft
                                a converted Hugging Face Llama (Xwin-LM's SFT settings)
  mpirun -np 2 ./train_sft -b 4 -d 8
                                data parallel: 2 ranks, each a micro-batch of 4 per step
  ./train_sft -h                every flag, its range and its default

The flags, the data order, the end of a step (clip, lr, AdamW, log), checkpoints and resume
are the training plumbing of llm.cu, shared by every stage program.
*/
#include "llm.cu"

struct SFTConfig {
    TrainConfig train;
    const char* model_path = "";  // '': a new model of the world config
    const char* train_path = "data/world/sft_train.tok";
    const char* val_path = "data/world/sft_val.tok";
    const char* tokenizer_path = "data/world/byte.tokenizer";
    const char* prompts_path = "data/world/eval_prompts.tsv";
    int sample_every = 100;
};

// The built-in world's model: a tiny Llama over the byte-level tokenizer (259 ids).
static LlamaConfig world_config() {
    return LlamaConfig{.dim = 128, .n_layers = 4, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 259, .ffn_dim = 344, .max_seq_len = 256,
                       .tied_embeddings = 1};
}

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

// Mean masked loss over a whole token file, in micro-batches; with several ranks, rank r takes
// the micro-batches r, r + ranks, ... and the sums are added over the ranks.
static double evaluate(Runner* r, Comm* comm, const TokenData& data, int B, std::vector<int>& tokens, std::vector<uint8_t>& mask) {
    double nll = 0, targets = 0;
    std::vector<size_t> rows(B);
    for (size_t first = (size_t)comm->rank * B; first < data.n_seqs; first += (size_t)comm->world * B) {
        int nb = (int)std::min((size_t)B, data.n_seqs - first), T = 0;
        for (int b = 0; b < nb; b++) rows[b] = first + b, T = std::max(T, (int)token_seq_len(data, first + b));
        tokens_fill_rows(data, rows.data(), nb, T, tokens.data(), mask.data());
        const float* lp = runner_forward(r, tokens.data(), nb, T);
        size_t count;
        nll += masked_mean_loss(lp, mask.data(), nb, T, &count) * count;
        targets += count;
    }
    double sums[2] = {nll, targets};
    comm_all_reduce_sum_double(comm, sums, 2);
    return sums[1] ? sums[0] / sums[1] : 0.0;
}

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);  // the step lines reach a log file as they happen
    SFTConfig cfg;
    cfg.train.out_dir = "out/sft";
    // the world's default: 6000 steps of 8 conversations (2.4 epochs). Small batches and many
    // steps learn the world's rules in the fewest conversations (600 x 32 reach a judge mean of
    // 4.2 where 6000 x 8 reach 6.3); validation and checkpoints every 500 and 1000 steps
    cfg.train.max_steps = 6000;
    cfg.train.micro_batch = 8, cfg.train.total_batch = 8;
    cfg.train.val_every = 500, cfg.train.checkpoint_every = 1000;
    std::vector<Flag> flags = {
        {'e', FLAG_OPTIONAL_PATH, &cfg.model_path, 0, 0, "model to fine-tune ('': a new model of the world config)"},
        {'i', FLAG_PATH, &cfg.train_path, 0, 0, "input: the training token file (dev/data/prepare_sft.py)"},
        {'j', FLAG_OPTIONAL_PATH, &cfg.val_path, 0, 0, "validation token file ('': none)"},
        {'k', FLAG_PATH, &cfg.tokenizer_path, 0, 0, "tokenizer of the model"},
        {'p', FLAG_OPTIONAL_PATH, &cfg.prompts_path, 0, 0, "held-out world prompts to answer and judge ('': none)"},
        {'s', FLAG_INT, &cfg.sample_every, 0, 1000000000, "answer a held-out prompt every this many steps (0: never)"},
    };
    train_flags(&flags, &cfg.train);
    flags_parse(argc, argv, "supervised fine-tuning on chat data (stage 1 of Xwin-LM); lr 0: 2e-5 with -e (Xwin-LM), 2e-3 for a new model", flags);
    TrainConfig& tc = cfg.train;
    if (tc.lr == 0.0f) tc.lr = *cfg.model_path ? 2e-5f : 2e-3f;

    // load: the model (the checkpoint's when resuming, else -e, else a new one), data, tokenizer
    Trainer tr;
    trainer_init(&tr, &tc, "train_sft");
    Runner runner;
    const char* model_name = *cfg.model_path ? cfg.model_path : "(new world model)";
    if (!trainer_load_model(&tr, &runner.host, *cfg.model_path ? cfg.model_path : nullptr)) init_random(&runner.host, world_config(), tc.seed);
    const LlamaConfig& c = runner.host.config;
    if (c.head_type != HEAD_LM) fail_file(model_name, "has a reward head; SFT trains a language model");
    if (tc.max_len > c.max_seq_len) fail_flag('t', "%d is more than the max_seq_len %d of the model %s", tc.max_len, c.max_seq_len, model_name);
    Tokenizer tok;
    tokenizer_load(&tok, cfg.tokenizer_path);
    tokenizer_check_model(&tok, cfg.tokenizer_path, c.vocab_size, model_name);
    TokenData train, val;
    tokens_load(&train, cfg.train_path, c.vocab_size);
    tokens_check_for_training(train, cfg.train_path, tc.max_len);
    bool has_val = *cfg.val_path;
    if (has_val) tokens_load(&val, cfg.val_path, c.vocab_size), tokens_check_for_training(val, cfg.val_path, tc.max_len);
    std::vector<WorldPrompt> prompts;  // held-out prompts for the printed answers ('' for none)
    if (*cfg.prompts_path) prompts = world_load_prompts(cfg.prompts_path);
    runner_init(&runner, tc.micro_batch, tc.max_len, true, trainer_shard(&tr, runner.host.num_params), tc.recompute);
    uint64_t data_size;
    uint32_t data_hash;
    tokens_identity(train, &data_size, &data_hash);
    for (size_t i = 0; i < train.n_seqs; i++) tr.lengths.push_back((uint32_t)token_seq_len(train, i));  // batches of similar lengths
    trainer_start(&tr, &runner, train.n_seqs, data_size, data_hash);
    printf("train_sft on %s | %zu parameters | %zu train sequences, %zu val | batch %d x %d | %d steps | lr %.1e\n", runner_device(),
           runner.host.num_params, train.n_seqs, has_val ? val.n_seqs : 0, tc.micro_batch, tr.accum, tr.max_steps, tc.lr);
    if (!tr.resume_dir.empty()) printf("resumed from %s at step %u\n", tr.resume_dir.c_str(), tr.state.step);

    std::vector<int> tokens((size_t)tc.micro_batch * tc.max_len);
    std::vector<uint8_t> mask(tokens.size());
    std::vector<size_t> rows(tc.total_batch);
    // loop: one optimizer step per total batch
    while (trainer_running(&tr)) {
        trainer_next_rows(&tr, rows.data());
        size_t step_targets = 0;  // the loss is the mean over all targets of the step
        for (size_t row : rows) {
            for (uint64_t j = train.offsets[row] + 1; j < train.offsets[row + 1]; j++) step_targets += train.mask[j];
        }
        // loss and gradient, accumulated over this rank's micro-batches (the ranks sum theirs)
        runner_zero_grad(&runner);
        double loss = 0;
        size_t step_tokens = 0;
        const size_t* my_rows = trainer_rank_rows(&tr, rows.data());
        for (int a = 0; a < tr.accum; a++) {
            trainer_micro_batch(&tr, a);
            const size_t* mrows = my_rows + (size_t)a * tc.micro_batch;
            int T = 0;
            for (int b = 0; b < tc.micro_batch; b++) T = std::max(T, (int)token_seq_len(train, mrows[b]));
            tokens_fill_rows(train, mrows, tc.micro_batch, T, tokens.data(), mask.data());
            loss += runner_nll_forward_backward(&runner, tokens.data(), mask.data(), tc.micro_batch, T, step_targets);
            step_tokens += (size_t)tc.micro_batch * T;
        }
        // step: clip, lr, AdamW, step line, log
        trainer_step_end(&tr, loss, step_tokens);
        if (has_val && trainer_due(&tr, tc.val_every)) trainer_log(&tr, {{"val_loss", evaluate(&runner, &tr.comm, val, tc.micro_batch, tokens, mask)}});
        if (!prompts.empty() && cfg.sample_every > 0 && tr.state.step % cfg.sample_every == 0 && tr.comm.rank == 0) {
            const WorldPrompt& p = prompts[0];
            std::vector<int> ids;
            chat_encode_prompt(&tok, p.messages[0], std::vector<std::string>(p.messages.begin() + 1, p.messages.end()), ids);
            std::vector<int> answer = generate_greedy(&runner, ids, 64, chat_end_id(&tok));
            std::string text = tokenizer_decode(&tok, answer.data(), (int)answer.size());
            printf("step %4u | %s -> %s | judge %d/10\n", tr.state.step, p.messages.back().c_str(), text.c_str(), world_judge(p.kind, p.gold, text));
        }
        trainer_checkpoint(&tr);
    }
    if (trainer_finished(&tr)) {
        if (!prompts.empty()) {  // each rank answers a block of the prompts
            printf("greedy answers to held-out prompts:\n");
            world_report(&runner, &tok, prompts, 6, &tr.comm);
        }
        trainer_save_model(&tr);
    }
    trainer_close(&tr);
    tokenizer_free(&tok);
    runner_free(&runner);
    return 0;
}
