/*
bench_gpu: times each CUDA op of llm.cu and a whole training step (forward, loss, backward,
clipping, AdamW) on the GPU for a Llama shape, by CUDA events. dev/bench_gpu.py runs the
same shapes in PyTorch (transformers, bf16, SDPA attention) in the same run and prints
both with their ratios.

  ./bench_gpu [dim n_layers n_heads n_kv_heads vocab ffn B T]     (default: a 134M model)
Prints lines "op <name> <ms>" and "step <ms>", medians over repeats after warm-up.
*/
#include <algorithm>
#include <functional>
#include <random>

#include "../llm.cu"

#ifndef XWIN_CUDA
int main() {
    fprintf(stderr, "bench_gpu: built without CUDA; build it with nvcc (make test-gpu)\n");
    return 1;
}
#else
static float time_ms(const std::function<void()>& fn, int repeats = 20) {
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    fn();  // warm-up
    std::vector<float> ms;
    for (int r = 0; r < repeats; r++) {
        cudaCheck(cudaEventRecord(start, 0));
        fn();
        cudaCheck(cudaEventRecord(stop, 0));
        cudaCheck(cudaEventSynchronize(stop));
        float t;
        cudaCheck(cudaEventElapsedTime(&t, start, stop));
        ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    return ms[ms.size() / 2];
}

int main(int argc, char** argv) {
    int v[8] = {768, 12, 12, 12, 32000, 2048, 8, 1024};
    if (argc == 9) for (int i = 0; i < 8; i++) v[i] = atoi(argv[i + 1]);
    else if (argc != 1) {
        fprintf(stderr, "usage: ./bench_gpu [dim n_layers n_heads n_kv_heads vocab ffn B T]\n");
        return 1;
    }
    LlamaConfig c{.dim = v[0], .n_layers = v[1], .n_heads = v[2], .n_kv_heads = v[3], .vocab_size = v[4], .ffn_dim = v[5], .max_seq_len = v[7]};
    int B = v[6], T = v[7];
    size_t N = (size_t)B * T, C = c.dim, F = c.ffn_dim, KVD = kv_dim(c), H = c.n_heads, V = c.vocab_size;
    int hd = head_dim(c);
    Llama host;
    llama_init(&host, c);
    std::mt19937 rng(0);
    std::normal_distribution<float> dist(0.0f, 0.02f);
    for (size_t i = 0; i < host.num_params; i++) host.params_memory[i] = dist(rng);
    for (size_t i = 0; i < (size_t)c.n_layers * C; i++) host.params.attn_norm[i] = host.params.mlp_norm[i] = 1.0f;
    for (size_t i = 0; i < C; i++) host.params.final_norm[i] = 1.0f;
    LlamaCuda g;
    llama_cuda_init(&g, &host, B, T, true, 0);
    std::vector<int> tokens(N);
    for (int& t : tokens) t = (int)(rng() % V);
    std::vector<uint8_t> mask(N, 1);
    printf("shape dim %d layers %d heads %d kv %d vocab %d ffn %d B %d T %d params %zu precision %s\n", c.dim, c.n_layers, c.n_heads,
           c.n_kv_heads, c.vocab_size, c.ffn_dim, B, T, host.num_params, sizeof(floatX) == 2 ? "bf16" : "fp32");

    auto step = [&] {  // train_sft's: the loss and its gradient with the classifier fused
        llama_cuda_zero_grad(&g);
        llama_cuda_nll_forward_backward(&g, tokens.data(), mask.data(), B, T, N - B);
        llama_cuda_clip_grad_norm(&g, 1.0f);
        llama_cuda_update(&g, AdamWConfig{1e-5f, 0.9f, 0.95f, 1e-8f, 0.0f});
    };
    step();  // fills every activation so the ops below read real values
    std::vector<float> dlp(N, -1.0f / (float)N);  // for logprob_backward alone (the step needs none)
    cudaCheck(cudaMemcpy(g.dlp, dlp.data(), N * sizeof(float), cudaMemcpyHostToDevice));

    ActTensorsT<floatX>& a = g.acts;
    GradActTensorsT<floatX>& d = g.grad_acts;
    ParamTensorsT<floatX>& p = g.params;
    cudaStream_t st = 0;
    printf("op embedding_forward %.4f\n", time_ms([&] { embedding_forward_cuda(a.residual, g.tokens, p.wte, N, C, st); }));
    printf("op embedding_backward %.4f\n", time_ms([&] { embedding_backward_cuda(g.grads.wte, d.residual, g.token_buckets, g.n_token_buckets, N, C, st); }));
    printf("op rmsnorm_forward %.4f\n", time_ms([&] { rmsnorm_forward_cuda(a.attn_in, a.attn_rstd, a.residual, p.attn_norm, N, (int)C, 1e-5, st); }));
    printf("op rmsnorm_backward %.4f\n", time_ms([&] { rmsnorm_backward_cuda(d.residual, g.grads.attn_norm, g.norm_weight_partials, d.norm_out, a.residual, p.attn_norm, a.attn_rstd, N, (int)C, st); }));
    printf("op matmul_forward_qkvo %.4f\n", time_ms([&] { matmul_forward_cuda(a.q, a.attn_in, p.wq, N, C, C, st); }));
    printf("op matmul_backward_qkvo %.4f\n", time_ms([&] { matmul_backward_cuda(d.norm_out, g.grads.wq, d.q, a.attn_in, p.wq, N, C, C, st); }));
    printf("op matmul_forward_mlp %.4f\n", time_ms([&] { matmul_forward_cuda(a.gate, a.mlp_in, p.w_gate, N, C, F, st); }));
    printf("op matmul_backward_mlp %.4f\n", time_ms([&] { matmul_backward_cuda(d.norm_out, g.grads.w_gate, d.gate, a.mlp_in, p.w_gate, N, C, F, st); }));
    printf("op matmul_forward_head %.4f\n", time_ms([&] { matmul_forward_cuda(a.logits, a.final_in, p.head, N, C, V, st, padded_vocab(V)); }));
    printf("op rope %.4f\n", time_ms([&] { rope_forward_cuda(a.q, g.rope_table, B, T, (int)H, hd, st); }));
    printf("op attention_forward %.4f\n", time_ms([&] { flash_attention_forward_cuda(a.att_out, a.lse, a.q, a.k, a.v, B, T, (int)H, c.n_kv_heads, hd, st); }));
    printf("op attention_backward %.4f\n", time_ms([&] { flash_attention_backward_cuda(d.q, d.k, d.v, g.attn_delta, d.att_out, a.att_out, a.lse, a.q, a.k, a.v, B, T, (int)H, c.n_kv_heads, hd, st); }));
    printf("op swiglu_forward %.4f\n", time_ms([&] { swiglu_forward_cuda(a.swiglu, a.gate, a.up, N * F, st); }));
    printf("op swiglu_backward %.4f\n", time_ms([&] { swiglu_backward_cuda(d.gate, d.up, d.swiglu, a.gate, a.up, N * F, st); }));
    printf("op residual_forward %.4f\n", time_ms([&] { residual_forward_cuda(a.residual_mid, a.residual, a.scratch, N * C, st); }));
    printf("op logprob_forward %.4f\n", time_ms([&] { logprob_forward_cuda(a.lp, a.logits, g.tokens, B, T, (int)V, padded_vocab(V), st); }));
    // (in place, as the model runs them: the logits become d-logits, then d-logits of d-logits; the
    // same work whatever the values)
    printf("op logprob_backward %.4f\n", time_ms([&] { logprob_backward_cuda(a.logits, a.logits, g.tokens, g.dlp, B, T, (int)V, padded_vocab(V), st); }));
    printf("op fused_logprob_nll %.4f\n", time_ms([&] { fused_logprob_nll_cuda(a.lp, a.logits, a.logits, g.tokens, g.mask, N - B, B, T, (int)V, padded_vocab(V), st); }));
    printf("op clip_grad_norm %.4f\n", time_ms([&] { grad_norm_coef_cuda(g.grads_memory, g.num_params, 1e9f, g.norm_partials, g.norm_coef, st); }));
    printf("op adamw %.4f\n", time_ms([&] { adamw_update_cuda(g.master, g.params_memory, g.grads_memory, g.m_memory, g.v_memory, g.num_params, AdamWConfig{1e-5f, 0.9f, 0.95f, 1e-8f, 0.0f}, 0.0f, 1, st); }));
    float ms = time_ms(step, 10);
    // 6 N P for the matmuls plus the attention's 12 L T^2 C per sequence (forward and backward)
    double flops = 6.0 * N * host.num_params + 12.0 * c.n_layers * B * (double)T * T * C;
    printf("step %.3f ms | %.0f tok/s | %.1f TFLOP/s\n", ms, N / (ms / 1000.0), flops / (ms / 1000.0) / 1e12);
    (void)KVD;
    llama_cuda_free(&g);
    llama_free(&host);
    return 0;
}
#endif
