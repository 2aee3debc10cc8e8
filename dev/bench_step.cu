/*
bench_step: times one training step (forward, masked-mean loss, backward) of the CPU
reference on a randomly initialised Llama of the given shape. dev/bench_cpu.py runs it
beside PyTorch on the same shapes and thread count and prints the ratio.

  ./bench_step dim n_layers n_heads n_kv_heads vocab ffn B T steps [tied]
(tied: 1 for a head that is the embedding, as the built-in world's model; default 0)
Prints one line: "bench_step ms_per_step <median ms over steps, after one warm-up step>".
*/
#include <algorithm>
#include <chrono>
#include <random>

#include "../llm.cu"

int main(int argc, char** argv) {
    if (argc != 10 && argc != 11) {
        fprintf(stderr, "usage: ./bench_step dim n_layers n_heads n_kv_heads vocab ffn B T steps [tied]\n");
        return 1;
    }
    int v[9];
    for (int i = 0; i < 9; i++) v[i] = atoi(argv[i + 1]);
    int tied = argc == 11 ? atoi(argv[10]) : 0;
    LlamaConfig c{.dim = v[0], .n_layers = v[1], .n_heads = v[2], .n_kv_heads = v[3], .vocab_size = v[4], .ffn_dim = v[5], .max_seq_len = v[7], .tied_embeddings = tied};
    int B = v[6], T = v[7], steps = v[8];
    Llama model;
    llama_init(&model, c);
    std::mt19937 rng(0);
    std::normal_distribution<float> dist(0.0f, 0.02f);
    for (size_t i = 0; i < model.num_params; i++) model.params_memory[i] = dist(rng);
    llama_alloc(&model, B, T, true);
    std::vector<int> tokens((size_t)B * T);
    std::vector<uint8_t> mask((size_t)B * T, 1);
    std::vector<float> dlp((size_t)B * T);
    for (int& t : tokens) t = (int)(rng() % c.vocab_size);
    std::vector<double> ms;
    for (int s = 0; s <= steps; s++) {
        auto start = std::chrono::steady_clock::now();
        llama_forward(&model, tokens.data(), B, T);
        size_t count;
        masked_mean_loss(model.acts.lp, mask.data(), B, T, &count);
        masked_mean_loss_backward(dlp.data(), mask.data(), B, T, count);
        llama_zero_grad(&model);
        llama_backward(&model, tokens.data(), dlp.data(), B, T);
        auto end = std::chrono::steady_clock::now();
        if (s > 0) ms.push_back(std::chrono::duration<double, std::milli>(end - start).count());
    }
    std::sort(ms.begin(), ms.end());
    printf("bench_step ms_per_step %.3f\n", ms[ms.size() / 2]);
    llama_free(&model);
    return 0;
}
