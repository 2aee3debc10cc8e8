// Flash attention on the GPU (llm.cu, "attention"): the kernels against the CPU twin
// attention_forward / attention_backward, through the emulation layer (wmma included), in both
// precisions. #included by test_kernels.cpp (one translation unit: llm.cu's kernels are defined
// once per program), whose helpers and tolerances it uses.
// The log-sum-exp has no CPU twin: it is checked against its definition, log sum_{j <= t} e^(s_tj),
// s = q.k / sqrt(hd), summed in double from the same (rounded) q and k.
// Tolerances: out, dq, dk, dv as every kernel test (TOL: BF16 1e-2, the probabilities and dS
// are rounded to bfloat16 before their tile products, as the outputs are; FP32 1e-5). The lse is
// FP32 in both builds from exact products (bfloat16 x bfloat16 fits in a float): 1e-5.

static const size_t FLASH_GUARD = 64;  // elements after each output, which must stay NaN

#include <sys/wait.h>

// a device copy of v followed by FLASH_GUARD NaN elements
static floatX* upload_guarded(const std::vector<float>& v) {
    floatX* d = cuda_alloc<floatX>(v.size() + FLASH_GUARD);
    poison(d, v.size() + FLASH_GUARD);
    std::vector<floatX> h(v.size());
    for (size_t i = 0; i < v.size(); i++) h[i] = from_float<floatX>(v[i]);
    cudaCheck(cudaMemcpy(d, h.data(), v.size() * sizeof(floatX), cudaMemcpyHostToDevice));
    return d;
}

static size_t guard_written(const std::vector<float>& with_guard, size_t n) {
    size_t written = 0;
    for (size_t i = n; i < with_guard.size(); i++) written += !std::isnan(with_guard[i]);
    return written;
}

// log sum_{j <= t} exp(q_t . k_j / sqrt(hd)) per (b, h, t), in double: lse (B, H, T)
static std::vector<float> lse_reference(const std::vector<float>& q, const std::vector<float>& k, size_t B, size_t T, size_t H,
                                        size_t KV, size_t hd) {
    std::vector<float> lse(B * H * T);
    std::vector<double> s(T);
    for (size_t b = 0; b < B; b++) {
        for (size_t h = 0; h < H; h++) {
            for (size_t t = 0; t < T; t++) {
                double m = -INFINITY, sum = 0;
                for (size_t j = 0; j <= t; j++) {
                    double dot = 0;
                    for (size_t i = 0; i < hd; i++) dot += (double)q[((b * T + t) * H + h) * hd + i] * k[((b * T + j) * KV + h / (H / KV)) * hd + i];
                    s[j] = dot / std::sqrt((double)hd);
                    m = std::max(m, s[j]);
                }
                for (size_t j = 0; j <= t; j++) sum += std::exp(s[j] - m);
                lse[(b * H + h) * T + t] = (float)(m + std::log(sum));
            }
        }
    }
    return lse;
}

static double flash_worst[5];  // the largest error of out, lse, dq, dk, dv over the shapes

static void flash_check(int which, const char* what, const std::vector<float>& got, const std::vector<float>& ref, double tol) {
    double err = relative_error(got.data(), ref.data(), ref.size());
    flash_worst[which] = std::max(flash_worst[which], std::isnan(err) ? INFINITY : err);
    check_close(what, got, ref, tol);
}

// Shapes: T = 1; T below one tile; T = 64 + 5 and 130 (several tiles in both precisions, the
// last one partial: the tile is 64 rows in BF16, 32 in FP32); multi-head (KV = H) and grouped-query
// heads (2 and 4 query heads per kv head); head sizes 32 (the world model), 64, 128, and 6, 10,
// 48, which the kernels zero-pad to 16, 16, 64 columns. Each backward adds to nonzero dq, dk, dv.
TEST_CASE("flash attention kernels match the CPU attention (forward, lse, backward)", "[kernels][flash]") {
    struct Shape { size_t B, T, H, KV, hd; };
    const Shape shapes[] = {{1, 1, 2, 1, 32}, {2, 17, 4, 2, 32},  {1, 69, 4, 4, 64}, {1, 130, 4, 1, 64},
                            {1, 37, 2, 2, 128}, {2, 9, 4, 2, 6}, {1, 40, 6, 3, 10}, {1, 33, 2, 1, 48}};
    for (const Shape& sh : shapes) {
        std::mt19937 rng(test_seed() + 41 + (unsigned)(sh.T * 7 + sh.hd));
        size_t B = sh.B, T = sh.T, H = sh.H, KV = sh.KV, hd = sh.hd;
        INFO("B " << B << " T " << T << " H " << H << " KV " << KV << " hd " << hd);
        printf("flash attention B %zu T %zu H %zu KV %zu hd %zu\n", B, T, H, KV, hd);
        std::vector<float> q = rounded(random_floats(B * T * H * hd, rng)), k = rounded(random_floats(B * T * KV * hd, rng));
        std::vector<float> v = rounded(random_floats(B * T * KV * hd, rng)), dout = rounded(random_floats(B * T * H * hd, rng));
        std::vector<float> dq0 = rounded(random_floats(q.size(), rng)), dk0 = rounded(random_floats(k.size(), rng));
        std::vector<float> dv0 = rounded(random_floats(v.size(), rng));
        std::vector<float> out(q.size()), att(B * H * T * T), dq = dq0, dk = dk0, dv = dv0;
        attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, KV, hd);
        attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, KV, hd);
        std::vector<float> lse = lse_reference(q, k, B, T, H, KV, hd);

        floatX *d_q = upload_x(q), *d_k = upload_x(k), *d_v = upload_x(v), *d_dout = upload_x(dout);
        floatX *d_out = upload_guarded(std::vector<float>(out.size(), NAN)), *d_dq = upload_guarded(dq0);
        floatX *d_dk = upload_guarded(dk0), *d_dv = upload_guarded(dv0);
        float *d_lse = cuda_alloc<float>(lse.size() + FLASH_GUARD), *d_delta = cuda_alloc<float>(B * H * T);
        poison(d_lse, lse.size() + FLASH_GUARD);
        poison(d_delta, B * H * T);
        flash_attention_forward_cuda(d_out, d_lse, d_q, d_k, d_v, B, (int)T, (int)H, (int)KV, (int)hd, stream);
        flash_attention_backward_cuda(d_dq, d_dk, d_dv, d_delta, d_dout, d_out, d_lse, d_q, d_k, d_v, B, (int)T, (int)H, (int)KV, (int)hd,
                                      stream);
        std::vector<float> got_out = download_x(d_out, out.size() + FLASH_GUARD), got_lse = download(d_lse, lse.size() + FLASH_GUARD);
        std::vector<float> got_dq = download_x(d_dq, dq.size() + FLASH_GUARD), got_dk = download_x(d_dk, dk.size() + FLASH_GUARD);
        std::vector<float> got_dv = download_x(d_dv, dv.size() + FLASH_GUARD);
        CHECK(guard_written(got_out, out.size()) + guard_written(got_lse, lse.size()) + guard_written(got_dq, dq.size()) +
              guard_written(got_dk, dk.size()) + guard_written(got_dv, dv.size()) == 0);
        got_out.resize(out.size()), got_lse.resize(lse.size()), got_dq.resize(dq.size()), got_dk.resize(dk.size()), got_dv.resize(dv.size());
        flash_check(0, "flash out", got_out, out, TOL);
        flash_check(1, "flash lse", got_lse, lse, 1e-5);
        flash_check(2, "flash dq", got_dq, dq, TOL);
        flash_check(3, "flash dk", got_dk, dk, TOL);
        flash_check(4, "flash dv", got_dv, dv, TOL);
        void* bufs[] = {d_q, d_k, d_v, d_dout, d_out, d_dq, d_dk, d_dv, d_lse, d_delta};
        for (void* p : bufs) cudaCheck(cudaFree(p));
    }
    printf("flash attention, worst relative error over the shapes (%s): out %.2e, lse %.2e, dq %.2e, dk %.2e, dv %.2e\n",
           sizeof(floatX) == 2 ? "BF16" : "FP32", flash_worst[0], flash_worst[1], flash_worst[2], flash_worst[3], flash_worst[4]);
}

// No atomics: the same inputs give the same bits, with the blocks spread over several OS threads.
TEST_CASE("the flash attention backward is deterministic", "[kernels][flash]") {
    std::mt19937 rng(test_seed() + 43);
    const size_t B = 2, T = 100, H = 4, KV = 2, hd = 32;
    std::vector<float> q = rounded(random_floats(B * T * H * hd, rng)), k = rounded(random_floats(B * T * KV * hd, rng));
    std::vector<float> v = rounded(random_floats(B * T * KV * hd, rng)), dout = rounded(random_floats(B * T * H * hd, rng));
    floatX *d_q = upload_x(q), *d_k = upload_x(k), *d_v = upload_x(v), *d_dout = upload_x(dout), *d_out = cuda_alloc<floatX>(q.size());
    float *d_lse = cuda_alloc<float>(B * H * T), *d_delta = cuda_alloc<float>(B * H * T);
    flash_attention_forward_cuda(d_out, d_lse, d_q, d_k, d_v, B, (int)T, (int)H, (int)KV, (int)hd, stream);
    std::vector<std::vector<float>> runs;
    for (int r = 0; r < 2; r++) {
        floatX *d_dq = upload_x(std::vector<float>(q.size(), 0.0f)), *d_dk = upload_x(std::vector<float>(k.size(), 0.0f));
        floatX* d_dv = upload_x(std::vector<float>(v.size(), 0.0f));
        flash_attention_backward_cuda(d_dq, d_dk, d_dv, d_delta, d_dout, d_out, d_lse, d_q, d_k, d_v, B, (int)T, (int)H, (int)KV, (int)hd,
                                      stream);
        std::vector<float> all = download_x(d_dq, q.size()), dk = download_x(d_dk, k.size()), dv = download_x(d_dv, v.size());
        all.insert(all.end(), dk.begin(), dk.end());
        all.insert(all.end(), dv.begin(), dv.end());
        runs.push_back(all);
        void* bufs[] = {d_dq, d_dk, d_dv};
        for (void* p : bufs) cudaCheck(cudaFree(p));
    }
#ifdef XWIN_CUDA_EMULATION
    REQUIRE(emu::parallelism() > 1);  // the blocks of a launch ran on several OS threads
#endif
    CHECK(memcmp(runs[0].data(), runs[1].data(), runs[0].size() * sizeof(float)) == 0);
    void* bufs[] = {d_q, d_k, d_v, d_dout, d_out, d_lse, d_delta};
    for (void* p : bufs) cudaCheck(cudaFree(p));
}

TEST_CASE("flash attention takes head sizes 1..128, zero-padded to 16, 32, 64 or 128 columns, and refuses larger ones", "[kernels][flash]") {
    CHECK(flash_attention_head_tile(1) == 16);
    CHECK(flash_attention_head_tile(16) == 16);
    CHECK(flash_attention_head_tile(17) == 32);
    CHECK(flash_attention_head_tile(32) == 32);
    CHECK(flash_attention_head_tile(48) == 64);
    CHECK(flash_attention_head_tile(64) == 64);
    CHECK(flash_attention_head_tile(80) == 128);
    CHECK(flash_attention_head_tile(128) == 128);
    CHECK(flash_attention_check(128) == "");
    CHECK(flash_attention_check(129) == "head size 129: flash attention takes head sizes 1..128 (dim / n_heads)");
    CHECK(flash_attention_check(256) != "");
}

// The GPU keeps, per layer, the log-sum-exp of each attention row (B, H, T) instead of the
// (B, H, T, T) probabilities the CPU keeps; every other activation is the same.
TEST_CASE("the GPU activation layout holds no (T, T) tensor", "[kernels][flash]") {
    LlamaConfig c{.dim = 2048, .n_layers = 22, .n_heads = 32, .n_kv_heads = 4, .vocab_size = 32000, .ffn_dim = 5632, .max_seq_len = 2048};  // TinyLlama
    size_t B = 4, T = 2048, cpu[NUM_ACT_TENSORS], gpu[NUM_ACT_TENSORS];
    act_sizes(c, B, T, cpu);
    act_sizes(c, B, T, gpu, true);
    CHECK(cpu[6] == 22ull * 4 * 32 * 2048 * 2048);
    CHECK(cpu[20] == 0);
    CHECK(gpu[6] == 0);
    CHECK(gpu[20] == 22ull * 4 * 32 * 2048);
    for (int i = 0; i < NUM_ACT_TENSORS; i++) {
        if (i != 6 && i != 20) CHECK(cpu[i] == gpu[i]);
    }
    ActTensorsT<floatX> a;
    size_t with_att = point_activations(&a, nullptr, c, B, T), flash = point_activations(&a, nullptr, c, B, T, true);
    CHECK(with_att - flash == cpu[6] * sizeof(floatX) - gpu[20] * sizeof(float));  // 23.6 GB less in BF16
}

#ifdef XWIN_CUDA_EMULATION
// The output of a command (run from the repository root, as every test here).
static std::string command_output(const std::string& cmd) {
    std::string out;
    FILE* p = popen(cmd.c_str(), "r");
    REQUIRE(p != nullptr);
    char buf[256];
    while (fgets(buf, sizeof(buf), p)) out += buf;
    CHECK(pclose(p) == 0);
    return out;
}

// dev/roofline.py models this implementation: its kernel launches of one training step (zero
// grad, train_sft's forward and backward with the classifier fused, clip, AdamW) and its memory plan must be what the emulated GPU model
// launches and allocates. A grouped-query model with T = 70: two query tiles in BF16, three in FP32.
TEST_CASE("dev/roofline.py counts the GPU model's launches and allocation", "[kernels][flash][roofline]") {
    LlamaConfig c{.dim = 64, .n_layers = 2, .n_heads = 8, .n_kv_heads = 2, .vocab_size = 160, .ffn_dim = 96, .max_seq_len = 128};
    const int B = 2, T = 70;
    std::string args = "python3 dev/roofline.py 64,2,8,2,160,96 -b 2 -t 70 --precision " + std::string(sizeof(floatX) == 2 ? "bf16" : "fp32");
    Llama host;
    llama_init(&host, c);
    uint64_t rng = 5;
    for (size_t i = 0; i < host.num_params; i++) host.params_memory[i] = 0.05f * rng_normal(&rng);
    size_t free0 = 0, free1 = 0;
    cudaCheck(cudaMemGetInfo(&free0, nullptr));
    LlamaCuda g;
    llama_cuda_init(&g, &host, B, T, true, stream);
    cudaCheck(cudaMemGetInfo(&free1, nullptr));
    size_t predicted = std::stoull(command_output(args + " --memory"));
    printf("roofline memory plan %zu bytes, allocated %zu\n", predicted, free0 - free1);
    CHECK(predicted == free0 - free1);

    std::vector<int> tokens(B * T);
    for (int& t : tokens) t = (int)(rng_uniform(&rng) * 160) % 160;
    std::vector<uint8_t> mask(B * T, 1);
    auto counts = [] {  // launches per kernel, a template's instantiations together
        std::map<std::string, unsigned long long> m;
        for (auto& kv : emu_kernel_launch_counts()) m[std::regex_replace(kv.first, std::regex("<.*>$"), "")] += kv.second;
        return m;
    };
    std::map<std::string, unsigned long long> before = counts();
    llama_cuda_zero_grad(&g);
    llama_cuda_nll_forward_backward(&g, tokens.data(), mask.data(), B, T, B * (T - 1));  // train_sft's step
    llama_cuda_clip_grad_norm(&g, 1.0f);
    llama_cuda_update(&g, AdamWConfig{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f});
    std::map<std::string, unsigned long long> ran, modelled;
    for (auto& kv : counts())
        if (kv.second > before[kv.first]) ran[kv.first] = kv.second - before[kv.first];
    std::istringstream lines(command_output(args + " --launches"));  // "name count" (cuBLAS and memsets have no kernel name)
    for (std::string line; std::getline(lines, line);) {
        std::string name = line.substr(0, line.rfind(' '));
        if (name.size() > 7 && name.compare(name.size() - 7, 7, "_kernel") == 0) modelled[name] = std::stoull(line.substr(line.rfind(' ') + 1));
    }
    for (auto& kv : ran) printf("  %-40s %llu launches, modelled %llu\n", kv.first.c_str(), kv.second, modelled.count(kv.first) ? modelled[kv.first] : 0);
    CHECK(modelled.size() > 15);
    CHECK(ran == modelled);
    llama_cuda_free(&g);
    llama_free(&host);
}

// A plan by kind, as dev/roofline.py --memory-plan prints it ("kind bytes" per line)
static std::map<std::string, size_t> plan_by_kind(const GpuMemoryPlan& m) {
    return {{"weights", m.weights}, {"master", m.master}, {"grads", m.grads}, {"moments", m.moments}, {"activations", m.activations},
            {"activation grads", m.grad_activations}, {"scratch", m.scratch}, {"rope table", m.rope_table}};
}

// dev/roofline.py's plan of the test's config (64,2,8,2,160,96 at B 2, T 70) in this build's precision; more: its flags
static std::map<std::string, size_t> roofline_plan(const std::string& more) {
    std::map<std::string, size_t> py;
    std::istringstream lines(command_output("python3 dev/roofline.py 64,2,8,2,160,96 -b 2 -t 70 --memory-plan" + more + " --precision " +
                                            std::string(sizeof(floatX) == 2 ? "bf16" : "fp32")));
    for (std::string line; std::getline(lines, line);) py[line.substr(0, line.rfind(' '))] = std::stoull(line.substr(line.rfind(' ') + 1));
    return py;
}

// The memory plan llama_cuda_init prints before its first allocation: by kind, dev/roofline.py's
// numbers; in all, what it allocates (training and inference); a device with less free memory
// than the plan gets a one-line refusal and exit 1 before any allocation.
TEST_CASE("the GPU memory plan is dev/roofline.py's and what llama_cuda_init allocates; too little memory is refused", "[kernels][roofline][memory]") {
    LlamaConfig c{.dim = 64, .n_layers = 2, .n_heads = 8, .n_kv_heads = 2, .vocab_size = 160, .ffn_dim = 96, .max_seq_len = 128};
    const int B = 2, T = 70;
    GpuMemoryPlan plan = gpu_memory_plan(c, B, T, true);
    CHECK(roofline_plan("") == plan_by_kind(plan));
    CHECK(plan.master == 78144 * 4);  // 160*64*2 (wte, head) + 2*(64 + 64*64*2 + 16*64*2 + 64 + 3*96*64) + 64 parameters
    Llama host;
    llama_init(&host, c);
    for (size_t i = 0; i < host.num_params; i++) host.params_memory[i] = 0.01f;
    for (bool training : {true, false}) {
        size_t free0 = 0, free1 = 0;
        cudaCheck(cudaMemGetInfo(&free0, nullptr));
        LlamaCuda g;
        llama_cuda_init(&g, &host, B, T, training, stream);
        cudaCheck(cudaMemGetInfo(&free1, nullptr));
        CHECK(free0 - free1 == gpu_memory_plan_total(gpu_memory_plan(c, B, T, training)));
        llama_cuda_free(&g);
    }
    CHECK(gpu_memory_plan(c, B, T, false).grads == 0);
    CHECK(gpu_memory_refusal(plan, B, T, gpu_memory_plan_total(plan), 1 << 30) == "");
    // ZeRO-1 over 3 ranks: each keeps ceil(78144 / 3) = 26048 master weights and moments, and the
    // compute copy padded to 3 x 26048; every rank (the last part is as long) allocates that plan
    GpuMemoryPlan zero = gpu_memory_plan(c, B, T, true, 3);
    CHECK(zero.master == 26048 * 4);
    CHECK(zero.moments == 2 * 26048 * 4);
    CHECK(zero.weights == 3 * 26048 * sizeof(floatX));
    CHECK(zero.grads == plan.grads);
    // and with activation recomputation (-r 1): one layer of attn_in, mlp_in (B, T, C) and swiglu
    // (B, T, F) instead of L = 2; the plan is dev/roofline.py's with --ranks 3 --recompute
    GpuMemoryPlan zero_r = gpu_memory_plan(c, B, T, true, 3, true);
    CHECK(zero.activations - zero_r.activations == (size_t)(2 - 1) * B * T * (2 * 64 + 96) * sizeof(floatX));
    CHECK(roofline_plan(" --ranks 3 --recompute") == plan_by_kind(zero_r));
    // ZeRO-2 over 3 ranks: the gradients the backward writes are the embedding, final norm and
    // head (2 x 160 x 64 + 64) and two layer buckets of 64 + 2 x 64 x 64 + 2 x 16 x 64 + 64 +
    // 3 x 96 x 64 = 28800 each; then the rank's part of the step's gradient, 26048
    GpuMemoryPlan zero2 = gpu_memory_plan(c, B, T, true, 3, false, true);
    CHECK(zero2.grads == (2 * 160 * 64 + 64 + 2 * 28800 + 26048) * 4);
    CHECK(roofline_plan(" --ranks 3 --zero 2") == plan_by_kind(zero2));
    for (int rank : {0, 1, 2}) {  // rank 1: ZeRO-2
        size_t free0 = 0, free1 = 0;
        cudaCheck(cudaMemGetInfo(&free0, nullptr));
        LlamaCuda g;
        Shard shard = shard_of(host.num_params, rank, 3);
        shard.grads = rank == 1;
        llama_cuda_init(&g, &host, B, T, true, stream, shard, rank == 2);
        cudaCheck(cudaMemGetInfo(&free1, nullptr));
        CHECK(free0 - free1 == gpu_memory_plan_total(rank == 2 ? zero_r : rank == 1 ? zero2 : zero));
        CHECK(g.shard.begin == (size_t)rank * 26048);
        CHECK(g.shard.end == (rank == 2 ? 78144 : (size_t)(rank + 1) * 26048));
        std::vector<float> master(g.shard.end - g.shard.begin);
        cudaCheck(cudaMemcpy(master.data(), g.master, master.size() * sizeof(float), cudaMemcpyDeviceToHost));
        CHECK(std::all_of(master.begin(), master.end(), [](float x) { return x == 0.01f; }));
        llama_cuda_free(&g);
    }

    // a device of 1 MB more than is allocated now, less than the plan's 2.1 MB (BF16): refused before cudaMalloc fails
    size_t free_now = 0, total_now = 0;
    cudaCheck(cudaMemGetInfo(&free_now, &total_now));
    emu_set_device_memory(total_now - free_now + 1000000);
    std::string msg = gpu_memory_refusal(plan, B, T, 1000000, 1000000);
    CHECK(msg.find("needs " + bytes_text(gpu_memory_plan_total(plan)) + " (weights ") != std::string::npos);
    CHECK(msg.find("but the device has 1.00 MB free of 1.00 MB") != std::string::npos);
    CHECK(bytes_text(2125464) == "2.13 MB");
    CHECK(bytes_text(32100000000ull) == "32.10 GB");
    CHECK(bytes_text(7672) == "7.67 kB");
    CHECK(msg.find('\n') == std::string::npos);
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 1);
        LlamaCuda g;
        llama_cuda_init(&g, &host, B, T, true, stream);
        _exit(0);
    }
    close(fds[1]);
    std::string err;
    char buf[512];
    for (ssize_t r; (r = read(fds[0], buf, sizeof(buf))) > 0;) err.append(buf, (size_t)r);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    emu_set_device_memory(80ull << 30);
    printf("refusal: %s", err.c_str());
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 1);
    CHECK(err == "error: " + gpu_memory_refusal(plan, B, T, 1000000, total_now - free_now + 1000000) + "\n");
    llama_free(&host);
}
#endif
