/*
logprobs: the log-probabilities a model gives to a token file.

  ./logprobs -e model.bin -i data.tok [-b batch] [-o logits.bin] [-Q 1]

For each sequence it prints the sum of the log-probs of its target tokens (mask = 1, see
the token file format in llm.cu) and their count; then the masked mean loss over the whole
file (the mean negative log-likelihood of every target, as transformers computes it with
labels = -100 where the mask is 0). With -o it also writes the logits of every sequence to a
tensor archive: entry "logits.<i>" of shape (len_i, V), where row t predicts token t + 1.
Use it to check a converted model against transformers, or to score responses.
The GPU build (make) runs the CUDA kernels in the default precision; make cpu the CPU reference.
*/
#include "../llm.cu"

int main(int argc, char** argv) {
    const char* model_path = "";
    const char* data_path = "";
    const char* logits_path = "";
    int B = 8, quiet = 0;
    std::vector<Flag> flags = {
        {'e', FLAG_PATH, &model_path, 0, 0, "model file (required)"},
        {'i', FLAG_PATH, &data_path, 0, 0, "input: the token file (required)"},
        {'b', FLAG_INT, &B, 1, 4096, "sequences per forward"},
        {'o', FLAG_OPTIONAL_PATH, &logits_path, 0, 0, "output: every sequence's logits as a tensor archive ('': none)"},
        {'Q', FLAG_INT, &quiet, 0, 1, "1: quiet: totals only"},
    };
    flags_parse(argc, argv, "per-sequence log-prob sums and the masked mean loss of a token file", flags);
    if (!*model_path) fail_flag('e', "the model file is required");
    if (!*data_path) fail_flag('i', "the token file is required");

    Runner runner;
    llama_load(&runner.host, model_path);
    const LlamaConfig& c = runner.host.config;
    if (c.head_type != HEAD_LM) fail_file(model_path, "has a reward head, not a language-model head: no token log-probs");
    printf("model %s: dim %d, %d layers, %d heads (%d kv), vocab %d, ffn %d, %zu parameters, on %s\n", model_path, c.dim,
           c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.ffn_dim, runner.host.num_params, runner_device());
    TokenData data;
    tokens_load(&data, data_path, c.vocab_size);
    size_t max_len = 0;
    for (size_t i = 0; i < data.n_seqs; i++) max_len = std::max(max_len, token_seq_len(data, i));
    if (max_len > (size_t)c.max_seq_len) fail_file(data_path, "holds a sequence of %zu tokens, longer than the model's max_seq_len %d", max_len, c.max_seq_len);
    if ((size_t)B > data.n_seqs) B = (int)data.n_seqs;
    runner_init(&runner, B, (int)max_len, false);

    std::vector<int> tokens((size_t)B * max_len);
    std::vector<uint8_t> mask((size_t)B * max_len);
    std::vector<double> sums(B);
    std::vector<ArchiveEntry> dump;
    double total_nll = 0;
    size_t total_targets = 0;
    for (size_t first = 0; first < data.n_seqs; first += B) {
        int nb = (int)std::min((size_t)B, data.n_seqs - first);
        int T = 0;  // the longest sequence of this batch
        for (int b = 0; b < nb; b++) T = std::max(T, (int)token_seq_len(data, first + b));
        tokens_fill_batch(data, first, nb, T, tokens.data(), mask.data());
        const float* lp = runner_forward(&runner, tokens.data(), nb, T);
        sequence_logprob_sums(sums.data(), lp, mask.data(), nb, T);
        for (int b = 0; b < nb; b++) {
            size_t count = 0, len = token_seq_len(data, first + b);
            for (int t = 1; t < T; t++) count += mask[(size_t)b * T + t];
            total_nll -= sums[b];
            total_targets += count;
            if (!quiet) printf("seq %zu: logprob_sum %.6f over %zu targets\n", first + b, sums[b], count);
            if (*logits_path) {
                ArchiveEntry e{"logits." + std::to_string(first + b), {len, (uint64_t)c.vocab_size}, std::vector<float>(len * c.vocab_size)};
                for (size_t t = 0; t < len; t++) runner_logits_row(&runner, b, (int)t, T, e.data.data() + t * c.vocab_size);
                dump.push_back(std::move(e));
            }
        }
    }
    printf("masked mean loss %.6f over %zu targets in %zu sequences\n", total_targets ? total_nll / total_targets : 0.0,
           total_targets, data.n_seqs);
    if (*logits_path) {
        archive_save(dump, logits_path);
        printf("wrote logits to %s\n", logits_path);
    }
    runner_free(&runner);
    return 0;
}
