/*
bench_dpo: a DPO step against an SFT step on the same tokens, side by side in one run.

  make bench_dpo && ./bench_dpo [model.bin] [pairs.pairs] [pairs per step] [reps]
  (defaults: out/sft/model.bin, data/world/pairs_train.pairs, 8, 40)

Both steps take the same 2 n sequences (the chosen and rejected answers of n pairs) and the
same mask (the answers' tokens): the SFT step is train_sft's, runner_nll_forward_backward (the
masked mean NLL's log-probs and d-logits in one pass); the DPO step is runner_sequence_logprobs,
dpo_loss against reference sums, and runner_sequence_backward. Each is followed by the same
clip and AdamW update. The two alternate, rep by rep over the same pair batches; the line gives
each median and the ratio DPO / SFT. The reference costs nothing here: train_dpo computes it once before training.
Builds for the CPU (make bench_dpo) or the GPU (nvcc -x cu, as the programs).
*/
#include <algorithm>

#include "../llm.cu"

int main(int argc, char** argv) {
    const char* model_path = argc > 1 ? argv[1] : "out/sft/model.bin";
    const char* pairs_path = argc > 2 ? argv[2] : "data/world/pairs_train.pairs";
    int n = argc > 3 ? atoi(argv[3]) : 8, reps = argc > 4 ? atoi(argv[4]) : 40;
    Runner r;
    llama_load(&r.host, model_path);
    PairData p;
    pairs_load(&p, pairs_path, r.host.config.vocab_size);
    if (p.n_pairs < (size_t)n) fail_file(pairs_path, "has %zu pairs, fewer than %d", p.n_pairs, n);
    int max_T = 0;
    for (size_t i = 0; i < 2 * p.n_pairs; i++) max_T = std::max(max_T, (int)token_seq_len(p.seqs, i));
    runner_init(&r, 2 * n, max_T, true);
    std::vector<int> tokens((size_t)2 * n * max_T);
    std::vector<uint8_t> mask(tokens.size());
    std::vector<float> dsums(2 * n);
    std::vector<size_t> seqs(2 * n);
    AdamWConfig opt{1e-5f, 0.9f, 0.999f, 1e-8f, 0.0f};
    std::vector<double> sft_ms, dpo_ms;
    for (int rep = 0; rep <= reps; rep++) {
        size_t first = (size_t)rep * n % (p.n_pairs - n + 1);
        int T = 0;
        for (int i = 0; i < 2 * n; i++) seqs[i] = 2 * first + i, T = std::max(T, (int)token_seq_len(p.seqs, seqs[i]));
        tokens_fill_rows(p.seqs, seqs.data(), 2 * n, T, tokens.data(), mask.data());
        for (int kind = 0; kind < 2; kind++) {
            auto t0 = std::chrono::steady_clock::now();
            runner_zero_grad(&r);
            if (kind == 0) {  // SFT: the mean NLL of the answers' tokens (train_sft's step)
                size_t count = 0;
                for (size_t i = 0; i < (size_t)2 * n * T; i++) count += i % T != 0 && mask[i];
                runner_nll_forward_backward(&r, tokens.data(), mask.data(), 2 * n, T, count);
            } else {  // DPO: the answers' log-prob sums, the loss, the backward of the sums
                runner_sequence_logprobs(&r, tokens.data(), mask.data(), 2 * n, T);
                // the loss's derivatives by the sums are a few scalars on the host (train_dpo.cu's
                // dpo_loss); their values do not change the step's time: -1/n and 1/n here
                for (int i = 0; i < n; i++) dsums[2 * i] = -1.0f / n, dsums[2 * i + 1] = 1.0f / n;
                runner_sequence_backward(&r, tokens.data(), dsums.data(), 2 * n, T);
            }
            runner_clip_grad_norm(&r, 1.0f);
            runner_update(&r, opt);
#ifdef XWIN_CUDA
            cudaCheck(cudaDeviceSynchronize());
#endif
            double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            if (rep > 0) (kind == 0 ? sft_ms : dpo_ms).push_back(ms);
        }
    }
    std::sort(sft_ms.begin(), sft_ms.end());
    std::sort(dpo_ms.begin(), dpo_ms.end());
    double s = sft_ms[sft_ms.size() / 2], d = dpo_ms[dpo_ms.size() / 2];
    printf("bench_dpo on %s | %d pairs (%d sequences) a step, %d reps | SFT step %.2f ms | DPO step %.2f ms | DPO / SFT %.3f\n", runner_device(), n,
           2 * n, reps, s, d, d / s);
    runner_free(&r);
    return 0;
}
