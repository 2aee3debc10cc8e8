#!/usr/bin/env python3
"""Predicted GPU time and memory of one training step of xwin.cu (standard library only).

A roofline of the GPU build as llm.cu issues its work: every kernel launch, cuBLAS GEMM and
memset of one step (llama_cuda_zero_grad, llama_cuda_nll_forward_backward: train_sft's forward,
loss and backward with the classifier fused, llama_cuda_clip_grad_norm, llama_cuda_update: one
micro-batch of B sequences of T tokens, language-model head), with the FLOPs it executes and the bytes it moves through HBM, and its
predicted time max(FLOPs / peak, bytes / bandwidth) at an H100's 798 TFLOP/s dense BF16 and
3.0 TB/s. The step's predicted time is their sum; its MFU is the step line's (mfu_text in
llm.cu): 6 * parameters * tokens / (time * peak). Every number here is PREDICTED, not measured:
a roofline is a bound that real kernels approach, not a timing.

Bytes: each tensor a launch reads or writes, once (row re-reads within a block, and the tiles
of k and v that the flash kernels' blocks of one head share, are taken to hit L1/L2); an
accumulating write (+=) reads and writes. The gradient clipping is folded into AdamW (no scale
pass). Host copies (tokens, mask, the B loss sums) are left out.

  python3 dev/roofline.py                      the README's tables: before/after for TinyLlama
                                               (B 4 and 8, T 2048) and Llama-2-7B (B 1, T 4096)
  python3 dev/roofline.py tinyllama -b 4 -t 2048 [--attention cublas] [--kernels]
  python3 dev/roofline.py DIM,LAYERS,HEADS,KV_HEADS,VOCAB,FFN -b B -t T [--precision fp32]
      --kernels   every kernel's launches, FLOPs, bytes and predicted time
      --launches  the kernel launches of one step, "name count" per line (the tests compare
                  them with the emulated step's)
      --memory    the bytes llama_cuda_init allocates for training, alone (the tests compare it
                  with the emulated allocation)
      --memory-plan   the same by kind, "kind bytes" per line (the tests compare it with llm.cu's
                  gpu_memory_plan)
      --efficiency E   every launch at E times the peak FLOP/s (a sensitivity; 1 is the roofline)
  python3 dev/roofline.py --scoring            the Xwin-Set's scoring of one prompt (64 responses of 1k
                                               tokens, TinyLlama): the prefill's attention before flash and after
  python3 dev/roofline.py --parallel           data parallel on 8 x 80 GB: Llama-2-7B and 13B per-rank
                                               memory by ZeRO stage and recomputation, step times and
                                               tokens/s on 1, 8 and 16 GPUs, the largest Llama that fits
--attention cublas is the attention before flash attention: cuBLAS GEMMs over (B, H, T, T)
scores and probabilities, with the heads permuted (and kv heads expanded) around them.
"""
import argparse
import sys

PEAK_FLOPS = 798e12  # H100, dense BF16 (the figure of every table here, below the SXM's 989)
HBM_BYTES = 3.0e12   # H100, HBM3
GPU_MEMORY = 80e9

CONFIGS = {  # dim, layers, heads, kv heads, vocab, ffn (untied heads)
    "tinyllama": (2048, 22, 32, 4, 32000, 5632),
    "llama2-7b": (4096, 32, 32, 32, 32000, 11008),
    "llama2-13b": (5120, 40, 40, 40, 32000, 13824),
    "codellama-34b": (8192, 48, 64, 8, 32000, 22016),
    "llama2-70b": (8192, 80, 64, 8, 32000, 28672),
}

# Data parallelism (--parallel): the gradients' reduction and the weights' gather at the bus
# bandwidth NCCL reaches for large messages (its busbw: ring all-reduce moves 2 (n-1)/n of the
# bytes per rank, reduce-scatter and all-gather (n-1)/n each)
NVLINK_BUS = 360e9   # 8 x H100 SXM in one node, NVLink 4 through NVSwitch (of 450 GB/s per direction)
NETWORK_BUS = 45e9   # across nodes: one 400 Gb/s InfiniBand NIC per GPU (50 GB/s), at 90%


class Step:
    """The launches of one step, in order: (kernel, what, flops, bytes)."""

    def __init__(self):
        self.launches = []

    def add(self, kernel, what, flops, nbytes):
        self.launches.append((kernel, what, float(flops), float(nbytes)))


def head_tile(hd):  # llm.cu flash_attention_head_tile
    for d in (16, 32, 64, 128):
        if hd <= d:
            return d
    raise SystemExit(f"error: head size {hd}: flash attention takes head sizes 1..128")


def build_step(cfg, B, T, attention, x):
    """The launches of llama_cuda_zero_grad + nll_forward_backward + clip + update. x: bytes per floatX."""
    C, L, H, KV, V, F = cfg
    hd, N = C // H, B * T
    KVD = KV * hd
    P = num_params(cfg)
    s = Step()
    f4 = 4

    def gemm(what, m, n, k, a, b, c, accumulate):  # C (m x n) (+)= A B, each operand once
        s.add("gemm (cuBLAS)", what, 2 * m * n * k, a + b + c * (2 if accumulate else 1))

    def matmul_forward(what, N_, Cin, OC):
        gemm(what, OC, N_, Cin, OC * Cin * x, N_ * Cin * x, N_ * OC * x, False)

    def matmul_backward(what, N_, Cin, OC):
        gemm(what + " dinp", Cin, N_, OC, OC * Cin * x, N_ * OC * x, N_ * Cin * x, True)
        gemm(what + " dweight", Cin, OC, N_, N_ * Cin * x, N_ * OC * x, OC * Cin * f4, True)

    def matmul_forward_pair(what, N_, Cin, OC):  # llm.cu matmul_forward_pair_cuda: one batch of 2, the input read by each
        s.add("gemm (cuBLAS)", what, 2 * 2 * OC * N_ * Cin, 2 * (OC * Cin * x + N_ * Cin * x + N_ * OC * x))

    def matmul_backward_pair(what, N_, Cin, OC):  # the two dinp GEMMs, then both weight gradients in one batch of 2
        gemm(what + " dinp a", Cin, N_, OC, OC * Cin * x, N_ * OC * x, N_ * Cin * x, True)
        gemm(what + " dinp b", Cin, N_, OC, OC * Cin * x, N_ * OC * x, N_ * Cin * x, True)
        s.add("gemm (cuBLAS)", what + " dweights", 2 * 2 * Cin * OC * N_, 2 * (N_ * Cin * x + N_ * OC * x + 2 * OC * Cin * f4))

    def matmul_forward_qkv(N_, Cin):  # llm.cu matmul_forward_qkv_cuda: one batch of 3 when KVD = C, else Q, then K and V
        if KVD == Cin:
            s.add("gemm (cuBLAS)", "q, k, v", 3 * 2 * Cin * N_ * Cin, 3 * (Cin * Cin * x + N_ * Cin * x + N_ * Cin * x))
        else:
            matmul_forward("q", N_, Cin, Cin)
            matmul_forward_pair("k, v", N_, Cin, KVD)

    def matmul_backward_qkv(N_, Cin):  # three dinp GEMMs, then the weight gradients in one batch of 3; else Q's, then the pair's
        if KVD == Cin:
            for what in ("q", "k", "v"):
                gemm(what + " dinp", Cin, N_, Cin, Cin * Cin * x, N_ * Cin * x, N_ * Cin * x, True)
            s.add("gemm (cuBLAS)", "q, k, v dweights", 3 * 2 * Cin * Cin * N_, 3 * (N_ * Cin * x + N_ * Cin * x + 2 * Cin * Cin * f4))
        else:
            matmul_backward("q", N_, Cin, Cin)
            matmul_backward_pair("k, v", N_, Cin, KVD)

    def memset(what, nbytes):
        s.add("memset", what, 0, nbytes)

    def rmsnorm_forward(what):
        s.add("rmsnorm_forward_kernel", what, 4 * N * C, 2 * N * C * x + C * x + N * f4)

    nb = -(-N // 32)  # RMSNORM_BACKWARD_ROWS rows per block, one partial weight gradient each

    def rmsnorm_backward(what):  # dinp and the blocks' partial weight gradients (rows re-read from L1/L2), then their sum
        s.add("rmsnorm_backward_kernel", what, 11 * N * C, 4 * N * C * x + C * x + N * f4 + nb * C * f4)
        s.add("rmsnorm_weight_reduce_kernel", what, nb * C, nb * C * f4 + 2 * C * f4)

    def fused_residual_rmsnorm_forward(what):  # reads a, b, weight; writes the residual, the norm, rstd (the row re-read from L1)
        s.add("fused_residual_rmsnorm_forward_kernel", what, 5 * N * C, 4 * N * C * x + C * x + N * f4)

    def rope(what, NH):  # 4 multiplies and 2 adds per pair; the table's T rows read once (every sequence shares them)
        s.add("rope_kernel", what, 3 * N * NH * hd, 2 * N * NH * hd * x + T * hd * f4)

    # ---- llama_cuda_zero_grad
    memset("gradients", P * f4)
    # ---- llama_cuda_nll_forward_backward: llama_cuda_forward_trunk
    s.add("embedding_forward_kernel", "embedding", 0, N * 4 + 2 * N * C * x)
    rmsnorm_forward("attention norm")  # the first layer's; the others' come fused with the residual add before them
    for l in range(L):
        matmul_forward_qkv(N, C)
        rope("q", H)
        rope("k", KV)
        if attention == "flash":
            flash_forward(s, B, T, H, KV, hd, x)
        else:
            cublas_attention_forward(s, B, T, H, KV, hd, x)
        matmul_forward("o", N, C, C)
        fused_residual_rmsnorm_forward("attention residual, mlp norm")
        matmul_forward_pair("gate, up", N, C, F)
        s.add("swiglu_forward_kernel", "swiglu", 6 * N * F, 3 * N * F * x)
        matmul_forward("down", N, F, C)
        fused_residual_rmsnorm_forward("mlp residual, " + ("attention norm" if l + 1 < L else "final norm"))
    matmul_forward("head", N, C, V)
    # the log-probs and the loss's d-logits over the logits: one read of each row for its max and sum (online), one
    # write pass (the row re-read from L1/L2); tokens, mask, log-probs. Then the loss's B sums of the masked log-probs.
    s.add("fused_logprob_nll_kernel", "log-probs, d logits", 8 * N * V, 2 * N * V * x + N * 4 + N + N * 4)
    s.add("sequence_logprob_forward_kernel", "loss sums", N, N * 4 + N + B * 4)
    # ---- the backward: the head's, then the trunk's (llama_cuda_backward_trunk)
    memset("d norm_out", N * C * x)
    matmul_backward("head", N, C, V)
    memset("d residual", N * C * x)
    rmsnorm_backward("final norm")
    for _ in range(L):
        for what, n in (("d swiglu", N * F), ("d norm_out", N * C)):  # swiglu_backward writes d gate, d up
            memset(what, n * x)
        matmul_backward("down", N, F, C)
        s.add("swiglu_backward_kernel", "swiglu", 12 * N * F, 5 * N * F * x)
        matmul_backward_pair("gate, up", N, C, F)
        rmsnorm_backward("mlp norm")
        for what, n in (("d att_out", N * C), ("d q", N * C), ("d k", N * KVD), ("d v", N * KVD), ("d norm_out", N * C)):
            memset(what, n * x)
        matmul_backward("o", N, C, C)
        if attention == "flash":
            flash_backward(s, B, T, H, KV, hd, x)
        else:
            cublas_attention_backward(s, B, T, H, KV, hd, x)
        rope("d q", H)
        rope("d k", KV)
        matmul_backward_qkv(N, C)
        rmsnorm_backward("attention norm")
    # tokens bucketed by row (3 N + 1 ints), each row read and written once (at most N rows)
    s.add("embedding_backward_kernel", "embedding", N * C, N * C * x + (3 * N + 1) * 4 + 2 * N * C * f4)
    # ---- llama_cuda_clip_grad_norm (the norm and coefficient) and llama_cuda_update (one AdamW launch per
    # tensor, which clips each gradient as it reads it: no pass of its own)
    s.add("grad_norm_partial_kernel", "gradient norm", 2 * P, P * f4)
    s.add("grad_norm_finish_kernel", "gradient norm", 512, 512 * f4)
    for n in param_sizes(cfg):
        if n:
            s.add("adamw_kernel", "AdamW", 12 * n, n * (7 * f4 + x))
    return s


def flash_forward(s, B, T, H, KV, hd, x):
    """flash_attention_forward_cuda: tile products over the causal tile pairs, D the padded head."""
    tile, D = TILE[x], head_tile(hd)
    nt = -(-T // tile)
    pairs = B * H * nt * (nt + 1) // 2  # (query tile, key tile) pairs at or below the diagonal
    N, C, KVD = B * T, H * hd, KV * hd
    s.add("flash_attention_forward_kernel", "attention", pairs * 2 * (2 * tile * tile * D),
          2 * N * C * x + 2 * N * KVD * x + B * H * T * 4)


def flash_backward(s, B, T, H, KV, hd, x):
    tile, D = TILE[x], head_tile(hd)
    nt = -(-T // tile)
    pairs = B * H * nt * (nt + 1) // 2
    N, C, KVD, rows = B * T, H * hd, KV * hd, B * H * T
    s.add("flash_attention_backward_delta_kernel", "attention delta", 2 * N * C, 2 * N * C * x + rows * 4)
    # dk, dv: s^T, dP^T, P^T dout, dS^T q per pair; dq: s, dP, dS k per pair
    s.add("flash_attention_backward_dkdv_kernel", "attention dk dv", pairs * 4 * (2 * tile * tile * D),
          2 * N * C * x + 2 * N * KVD * x + 2 * rows * 4 + 2 * 2 * N * KVD * x)
    s.add("flash_attention_backward_dq_kernel", "attention dq", pairs * 3 * (2 * tile * tile * D),
          2 * N * C * x + 2 * N * KVD * x + 2 * rows * 4 + 2 * N * C * x)


def cublas_attention_forward(s, B, T, H, KV, hd, x):
    """attention_forward_cuda before flash attention: permutes, two batched GEMMs, softmax."""
    heads, sq = B * H * T * hd, B * H * T * T
    s.add("heads_permute_kernel", "q", 0, 2 * heads * x)
    s.add("heads_permute_kernel", "k (expanded)", 0, B * T * KV * hd * x + heads * x)
    s.add("heads_permute_kernel", "v (expanded)", 0, B * T * KV * hd * x + heads * x)
    s.add("gemm (cuBLAS)", "scores q k^T", 2 * sq * hd, 2 * heads * x + sq * 4)
    s.add("causal_softmax_kernel", "softmax", 5 * sq // 2, sq * 4 // 2 + sq * x)
    s.add("gemm (cuBLAS)", "att v", 2 * sq * hd, sq * x + 2 * heads * x)
    s.add("heads_unpermute_kernel", "out", 0, 2 * heads * x)


def cublas_attention_backward(s, B, T, H, KV, hd, x):
    heads, sq, kv_heads = B * H * T * hd, B * H * T * T, B * T * KV * hd
    s.add("heads_permute_kernel", "q", 0, 2 * heads * x)
    s.add("heads_permute_kernel", "k (expanded)", 0, kv_heads * x + heads * x)
    s.add("heads_permute_kernel", "v (expanded)", 0, kv_heads * x + heads * x)
    s.add("heads_permute_kernel", "dout", 0, 2 * heads * x)
    s.add("gemm (cuBLAS)", "datt = dout v^T", 2 * sq * hd, 2 * heads * x + sq * 4)
    s.add("gemm (cuBLAS)", "dv = att^T dout", 2 * sq * hd, sq * x + 2 * heads * x)
    s.add("causal_softmax_backward_kernel", "softmax backward", 4 * sq // 2, sq * x // 2 + sq * 4 // 2 + sq * x)
    s.add("gemm (cuBLAS)", "dq = dscores k", 2 * sq * hd, sq * x + 2 * heads * x)
    s.add("gemm (cuBLAS)", "dk = dscores^T q", 2 * sq * hd, sq * x + 2 * heads * x)
    s.add("heads_unpermute_kernel", "dq", 0, heads * x + 2 * heads * x)
    s.add("heads_unpermute_kernel", "dk (group sum)", 0, heads * x + 2 * kv_heads * x)
    s.add("heads_unpermute_kernel", "dv (group sum)", 0, heads * x + 2 * kv_heads * x)


TILE = {2: 64, 4: 32}  # FLASH_TILE: query and key rows of a tile, BF16 and FP32 builds


def param_sizes(cfg):  # llm.cu param_sizes, untied language-model head
    C, L, H, KV, V, F = cfg
    KVD = KV * (C // H)
    return [V * C, L * C, L * C * C, L * KVD * C, L * KVD * C, L * C * C, L * C, L * F * C, L * F * C, L * C * F, C, V * C]


def num_params(cfg):
    return sum(param_sizes(cfg))


def carve(sizes):
    """Bytes of consecutive tensors (count, element bytes), each 16-byte aligned (llm.cu Carver)."""
    total = 0
    for count, elem in sizes:
        total = (total + 15) // 16 * 16 + count * elem
    return total


def memory_plan(cfg, B, T, attention, x, ranks=1, recompute=False, zero2=False):
    """What llama_cuda_init allocates for training, by part, in bytes (every cudaMalloc). ranks: ZeRO-1's
    ranks (the master weights and moments of ceil(P / ranks) parameters, the compute copy padded to
    ranks parts); recompute: one layer of the RMSNorm outputs and the SwiGLU product (-r 1); zero2:
    ZeRO-2's gradients (llm.cu's zero2_grads_count: the embedding, final norm and head, two layer
    buckets; and the rank's part of the step's gradient)."""
    C, L, H, KV, V, F = cfg
    hd, N = C // H, B * T
    KVD = KV * hd
    P = num_params(cfg)
    per = -(-P // ranks)
    Lr = 1 if recompute else L
    sizes = param_sizes(cfg)
    layer = sum(sizes[1:10]) // L  # one layer's parameters: a ZeRO-2 bucket
    grads = sizes[0] + sizes[10] + sizes[11] + 2 * layer + per if zero2 and ranks > 1 else P
    Vp = -(-V // 64) * 64  # llm.cu padded_vocab: the GPU's logits rows
    flash = attention == "flash"
    acts = carve([((L + 1) * N * C, x), (Lr * N * C, x), (L * N, 4), (L * N * C, x), (L * N * KVD, x), (L * N * KVD, x),
                  (0 if flash else L * B * H * T * T, x), (L * N * C, x), (L * N * C, x), (Lr * N * C, x), (L * N, 4),
                  (L * N * F, x), (L * N * F, x), (Lr * N * F, x), (N * C, x), (N, 4), (N * (Vp if flash else V), x), (N, 4), (N * C, x),
                  (0, 4), (L * B * H * T if flash else 0, 4)])
    grad_acts = carve([(N * C, x), (N * C, x), (N * C, x), (N * KVD, x), (N * KVD, x), (N * C, x), (N * F, x), (N * F, x),
                       (N * F, x)])  # no d-logits: the GPU writes them over the logits
    if flash:
        attn = B * H * T * 4  # attn_delta
    else:
        heads, sq = B * H * T * hd, B * H * T * T
        attn = carve([(heads, x)] * 7 + [(sq, 4), (sq, x)])
    # tokens, score_idx, the sequence sums' mask (bytes) and sums, dlp, dscores, dsums, norm scratch, the embedding
    # backward's token buckets, the RMSNorm backward's partial weight gradients
    scratch = (N * 4 + B * 4 + N + B * 4 + N * 4 + B * 4 + B * 4 + 512 * 4 + 2 * 4 + attn + (3 * N + 1) * 4
               + -(-N // 32) * C * 4)
    return {  # the kinds of llm.cu's GpuMemoryPlan, in its order
        "weights": per * ranks * x,  # the compute copy
        "master": per * 4,
        "grads": grads * 4,
        "moments": 2 * per * 4,  # AdamW m, v
        "activations": acts,
        "activation grads": grad_acts,
        "scratch": scratch,  # with the attention's scratch
        "rope table": T * hd * 4,  # (T, hd/2, 2) FP32 cos and sin
    }


def predict(cfg, B, T, attention, x=2, efficiency=1.0):
    """Per kernel [launches, FLOPs, bytes, seconds, seconds compute-bound], the step's seconds, the attention's, the MFU.
    efficiency: the fraction of the peak FLOP/s every launch reaches (1: the roofline)."""
    s = build_step(cfg, B, T, attention, x)
    peak = PEAK_FLOPS * efficiency
    rows = {}
    for kernel, what, flops, nbytes in s.launches:
        t = max(flops / peak, nbytes / HBM_BYTES)
        r = rows.setdefault(kernel, [0, 0.0, 0.0, 0.0, 0.0])
        r[0] += 1
        r[1] += flops
        r[2] += nbytes
        r[3] += t
        r[4] += t if flops / peak >= nbytes / HBM_BYTES else 0.0  # the time of its compute-bound launches
    step = sum(r[3] for r in rows.values())
    attn_kernels = [k for k in rows if "attention" in k or "heads_" in k or "softmax" in k]
    attn = sum(rows[k][3] for k in attn_kernels)
    if attention != "flash":  # the attention GEMMs are cuBLAS launches among the others
        attn += sum(max(f / peak, b / HBM_BYTES) for k, w, f, b in s.launches
                    if k == "gemm (cuBLAS)" and ("att" in w or "scores" in w))
    mfu = 6.0 * num_params(cfg) * B * T / (step * PEAK_FLOPS)
    return rows, step, attn, mfu, s


def gb(b):
    return b / 1e9


def print_kernels(cfg, B, T, attention, x, efficiency):
    rows, step, attn, mfu, _ = predict(cfg, B, T, attention, x, efficiency)
    print(f"{'launch':40s} {'count':>6s} {'GFLOP':>10s} {'GB':>9s} {'ms (predicted)':>15s}  bound")
    for kernel, (n, flops, nbytes, t, t_compute) in sorted(rows.items(), key=lambda kv: -kv[1][3]):
        share = t_compute / t if t else 0.0
        bound = "compute" if share > 0.99 else "memory" if share < 0.01 else f"{100 * share:.0f}% of it compute"
        print(f"{kernel:40s} {n:6d} {flops / 1e9:10.1f} {gb(nbytes):9.2f} {t * 1e3:15.2f}  {bound}")
    print(f"step: {step * 1e3:.1f} ms predicted, attention {attn * 1e3:.1f} ms, MFU {100 * mfu:.1f}%")


def print_memory(cfg, B, T, attention, x):
    plan = memory_plan(cfg, B, T, attention, x)
    for part, b in plan.items():
        print(f"  {part:40s} {gb(b):8.2f} GB")
    total = sum(plan.values())
    print(f"  {'total':40s} {gb(total):8.2f} GB ({'fits' if total < GPU_MEMORY else 'does not fit'} in 80 GB,"
          " before the CUDA context and cuBLAS workspace)")


def print_summary(efficiency):
    cases = [("TinyLlama 1.1B", "tinyllama", 4, 2048), ("TinyLlama 1.1B", "tinyllama", 8, 2048), ("Llama-2-7B", "llama2-7b", 1, 4096)]
    print(f"predicted at {PEAK_FLOPS / 1e12:.0f} TFLOP/s{'' if efficiency == 1 else f' x {efficiency:g}'} and {HBM_BYTES / 1e12:.1f} TB/s,"
          " BF16, one step (forward, backward, clip, AdamW)")
    print()
    print("| model | B x T | attention | step (ms) | of which attention (ms) | MFU | memory (GB) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for name, key, B, T in cases:
        for attention, label in (("cublas", "before: cuBLAS, (T, T) scores"), ("flash", "after: flash attention")):
            rows, step, attn, mfu, _ = predict(CONFIGS[key], B, T, attention, 2, efficiency)
            mem = sum(memory_plan(CONFIGS[key], B, T, attention, 2).values())
            fits = "" if mem < GPU_MEMORY else " (> 80)"
            print(f"| {name} | {B} x {T} | {label} | {step * 1e3:.1f} | {attn * 1e3:.1f} | {100 * mfu:.1f}% | {gb(mem):.1f}{fits} |")


def scoring_time(cfg, B, T, flash, lm_head, x=2):
    """Seconds (total, attention) of one forward of B sequences of T tokens on the inference
    runner (infer_cuda_layers from position 0: scoring), GEMMs and attention at their roofline
    (the elementwise kernels left out: the same before and after). flash: the prefill's attention
    is flash_attention_forward_cuda; else attention_decode_cuda, whose blocks, one per query
    row and head, each read K and V rows 0..t from HBM. lm_head: the policy's log-probs (the
    head's GEMM, one sequence at a time); else a reward model (its head is one row)."""
    C, L, H, KV, V, F = cfg
    hd, N = C // H, B * T
    KVD = KV * hd
    gemm = 2 * N * L * (2 * C * C + 2 * KVD * C + 3 * F * C) + (2 * N * V * C if lm_head else 0)
    s = Step()
    if flash:
        flash_forward(s, B, T, H, KV, hd, x)
    else:
        keys = B * H * T * (T + 1) // 2  # (query row, key) pairs of causal attention
        s.add("attention_decode_partial_kernel", "attention (prefill)", keys * 4 * hd, keys * 2 * hd * x + 2 * N * C * x)
    attn = L * sum(max(f / PEAK_FLOPS, b / HBM_BYTES) for _, _, f, b in s.launches)
    return gemm / PEAK_FLOPS + attn, attn


def print_scoring():
    B, T = 64, 1024
    print(f"Xwin-Set scoring of one prompt: {B} responses of {T} tokens, each scored by the reward model and by the policy"
          f" (its log-prob), TinyLlama's shape, BF16, predicted at {PEAK_FLOPS / 1e12:.0f} TFLOP/s and {HBM_BYTES / 1e12:.1f} TB/s")
    print()
    print("| prefill attention | reward model (ms) | of which attention | policy log-probs (ms) | of which attention | per prompt (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for flash, label in ((False, "before: decode kernel, a block per query row and head"), (True, "after: flash forward")):
        rm, rm_attn = scoring_time(CONFIGS["tinyllama"], B, T, flash, False)
        lp, lp_attn = scoring_time(CONFIGS["tinyllama"], B, T, flash, True)
        print(f"| {label} | {rm * 1e3:.1f} | {rm_attn * 1e3:.1f} | {lp * 1e3:.1f} | {lp_attn * 1e3:.1f} | {(rm + lp) * 1e3:.1f} |")


def parallel_memory(cfg, B, T, ranks, zero, recompute, x=2):
    """Per-rank bytes of data-parallel training over `ranks` GPUs, by kind (memory_plan's kinds).
    ZeRO-1 shards the FP32 master weights and the AdamW moments over the ranks; ZeRO-2 the FP32
    gradients too, each rank keeping its part of the step's and, while a micro-batch's backward
    runs, the embedding's, final norm's and head's and two layer buckets (a layer's gradients are
    reduced to their ranks while the backward writes the next layer's). Every rank keeps the whole compute
    copy of the weights (floatX; ZeRO-3 would shard it). Recomputation keeps no RMSNorm outputs
    (attn_in, mlp_in: (L, B, T, C) each) and no SwiGLU product ((L, B, T, F)): the backward
    recomputes one layer's from the residuals, the rstds, gate and up, into a one-layer buffer."""
    return memory_plan(cfg, B, T, "flash", x, ranks if zero >= 1 else 1, recompute, zero >= 2)  # as llm.cu allocates them


def parallel_time(cfg, B, T, ranks, zero, bus, efficiency=1.0, x=2):
    """(step seconds, collective seconds, exposed seconds) of one data-parallel step: each rank's
    compute is the 1-GPU step of its B sequences (predict); the gradients (FP32, as llm.cu keeps
    them) are all-reduced (ZeRO-0, and ZeRO-1 as llm.cu builds it: each rank updates its part
    from the whole sum) or reduced to the rank of each part (ZeRO-2: a reduce-scatter's traffic),
    layer by layer on their own stream as the backward frees them (llm.cu's comm_reduce_layer_grads
    and comm_reduce_scatter_layer_grads), so all but the last layer's hide
    behind the backward while there is backward left to hide behind; ZeRO-1 and 2 then
    all-gather the updated compute weights (floatX), after the update: exposed."""
    if ranks == 1:
        return predict(cfg, B, T, "flash", x, efficiency)[1], 0.0, 0.0
    _, step, _, _, _ = predict(cfg, B, T, "flash", x, efficiency)
    P, L = num_params(cfg), cfg[1]
    share = (ranks - 1) / ranks
    reduce_bytes = P * 4 * share * (1 if zero >= 2 else 2)
    gather_bytes = P * x * share if zero >= 1 else 0
    reduce, gather = reduce_bytes / bus, gather_bytes / bus
    backward = step * 2 / 3  # the backward's share of a step's FLOPs
    exposed = max(reduce / L, reduce - backward * (L - 1) / L) + gather
    return step + exposed, reduce + gather, exposed


def print_parallel(efficiency):
    print(f"data parallel on 8 x 80 GB (predicted: each rank's step from this roofline at {PEAK_FLOPS / 1e12:.0f} TFLOP/s"
          f"{'' if efficiency == 1 else f' x {efficiency:g}'}, collectives at {NVLINK_BUS / 1e9:.0f} GB/s bus bandwidth in a node"
          f" and {NETWORK_BUS / 1e9:.0f} GB/s across nodes)")
    print()
    print("| model | per rank | ZeRO | recompute | weights | master | grads | moments | activations, their grads, scratch |"
          " total per rank (GB) | headroom of 80 GB |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    cases = [("Llama-2-7B", "llama2-7b", "SFT 1 x 4096", 1, 4096), ("Llama-2-7B", "llama2-7b", "DPO pair 2 x 2048", 2, 2048),
             ("Llama-2-13B", "llama2-13b", "SFT 1 x 4096", 1, 4096), ("Llama-2-13B", "llama2-13b", "DPO pair 2 x 2048", 2, 2048)]
    for name, key, what, B, T in cases:
        for zero in (0, 1, 2):
            for recompute in (False, True):
                m = parallel_memory(CONFIGS[key], B, T, 8, zero, recompute)
                total = sum(m.values())
                state = m["weights"] + m["master"] + m["grads"] + m["moments"]
                room = GPU_MEMORY - total
                print(f"| {name} | {what} | {zero} | {'yes' if recompute else 'no'} | {gb(m['weights']):.1f} | {gb(m['master']):.1f} | "
                      f"{gb(m['grads']):.1f} | {gb(m['moments']):.1f} | {gb(total - state):.1f} | {gb(total):.1f} | "
                      f"{f'{gb(room):.1f} GB' if room > 0 else 'does not fit'} |")
    print()
    print("The headroom is before the CUDA context and cuBLAS's workspace (about 1 to 2 GB).")
    print()
    print("Step time and tokens/s, ZeRO-1 (the whole gradient all-reduced) and ZeRO-2 (each part reduced to its rank),"
          " with recomputation's memory (recomputation's FLOPs left out: about 1/6 of a layer's forward more), 1 GPU against 8"
          " in one node and 16 in two:")
    print()
    print("(1 GPU: the step as if the model fitted one GPU, for the speed-up; it does not.)")
    print()
    print("| model | per rank | ZeRO | GPUs | step (ms) | collectives (ms) | exposed (ms) | tokens/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, key, what, B, T in cases:
        for zero in (1, 2):
            for ranks, bus in ((1, NVLINK_BUS), (8, NVLINK_BUS), (16, NETWORK_BUS)):
                step, comm, exposed = parallel_time(CONFIGS[key], B, T, ranks, zero, bus, efficiency)
                print(f"| {name} | {what} | {zero} | {ranks} | {step * 1e3:.0f} | {comm * 1e3:.0f} | {exposed * 1e3:.0f} |"
                      f" {ranks * B * T / step:,.0f} |")
    print()
    print("The largest Llama that fits 8 x 80 GB with ZeRO-2 and recomputation (SFT, 1 x 4096 per rank, 2 GB kept for the"
          " CUDA context and cuBLAS):")
    for key in ("llama2-7b", "llama2-13b", "codellama-34b", "llama2-70b"):
        total = sum(parallel_memory(CONFIGS[key], 1, 4096, 8, 2, True).values())
        print(f"  {key:14s} {num_params(CONFIGS[key]) / 1e9:5.1f}B parameters: {gb(total):6.1f} GB per rank: "
              f"{'fits' if total < GPU_MEMORY - 2e9 else 'does not fit'}")
    # 70B on paper: its compute copy of the weights alone (138 GB in BF16) exceeds a GPU, so it needs
    # that copy sharded too (ZeRO-3: each layer's weights gathered before its forward and backward)
    cfg70 = CONFIGS["llama2-70b"]
    P70 = num_params(cfg70)
    acts70 = sum(parallel_memory(cfg70, 1, 4096, 8, 2, True).values()) - sum(
        parallel_memory(cfg70, 1, 4096, 8, 2, True)[k] for k in ("weights", "master", "grads", "moments"))
    C70, L70, N = cfg70[0], cfg70[1], 4096
    layer_only = 2 * (L70 + 1) * N * C70 + acts70 / L70  # whole layers recomputed: the residual stream (x2 for its grads) and one layer
    for ranks in (8, 16, 32):
        per_rank = (2 + 4 + 4 + 8) * P70 / ranks + acts70
        per_rank_layers = (2 + 4 + 4 + 8) * P70 / ranks + layer_only
        print(f"  llama2-70b with ZeRO-3 (every state sharded, 18 bytes a parameter) over {ranks} GPUs: {gb(per_rank):.1f} GB per rank"
              f" ({'fits' if per_rank < GPU_MEMORY - 2e9 else 'does not fit'}); with whole layers recomputed, about"
              f" {gb(per_rank_layers):.1f} GB ({'fits' if per_rank_layers < GPU_MEMORY - 2e9 else 'does not fit'})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", help="tinyllama, llama2-7b or DIM,LAYERS,HEADS,KV_HEADS,VOCAB,FFN")
    ap.add_argument("-b", type=int, default=4, help="sequences per step")
    ap.add_argument("-t", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--attention", choices=["flash", "cublas"], default="flash")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--launches", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--memory-plan", action="store_true")
    ap.add_argument("--ranks", type=int, default=1, help="--memory-plan: ZeRO-1 over this many ranks (1: none)")
    ap.add_argument("--recompute", action="store_true", help="--memory-plan: activation recomputation (-r 1)")
    ap.add_argument("--zero", type=int, choices=[1, 2], default=1, help="--memory-plan: the ZeRO stage over --ranks (2: the gradients too)")
    ap.add_argument("--efficiency", type=float, default=1.0, help="fraction of the peak FLOP/s reached (1: the roofline)")
    ap.add_argument("--scoring", action="store_true", help="the Xwin-Set's scoring of a prompt (64 x 1024 tokens, TinyLlama): prefill before and after flash")
    ap.add_argument("--parallel", action="store_true", help="data parallel on 8 x 80 GB: per-rank memory by ZeRO stage and recomputation, step times")
    a = ap.parse_args()
    if not 0 < a.efficiency <= 1:
        sys.exit("error: --efficiency must be in (0, 1]")
    if a.parallel:
        print_parallel(a.efficiency)
        return
    if a.scoring:
        print_scoring()
        return
    if a.config is None:
        print_summary(a.efficiency)
        return
    if a.config in CONFIGS:
        cfg = CONFIGS[a.config]
    else:
        try:
            cfg = tuple(int(v) for v in a.config.split(","))
        except ValueError:
            cfg = ()
        if len(cfg) != 6 or min(cfg) < 1 or cfg[0] % cfg[2] or cfg[2] % cfg[3]:
            sys.exit(f"error: config '{a.config}': expected tinyllama, llama2-7b or DIM,LAYERS,HEADS,KV_HEADS,VOCAB,FFN "
                     "(positive, DIM a multiple of HEADS, HEADS of KV_HEADS)")
    if a.b < 1 or a.t < 1:
        sys.exit("error: -b and -t must be positive")
    x = 2 if a.precision == "bf16" else 4
    if a.launches:
        counts = {}
        for kernel, _, _, _ in build_step(cfg, a.b, a.t, a.attention, x).launches:
            counts[kernel] = counts.get(kernel, 0) + 1
        for kernel in sorted(counts):
            print(kernel, counts[kernel])
    elif a.memory:
        print(sum(memory_plan(cfg, a.b, a.t, a.attention, x).values()))
    elif a.memory_plan:
        if a.ranks < 1:
            sys.exit("error: --ranks must be positive")
        for kind, b in memory_plan(cfg, a.b, a.t, a.attention, x, a.ranks, a.recompute, a.zero == 2).items():
            print(kind, b)
    else:
        print(f"config {cfg}, B {a.b}, T {a.t}, attention {a.attention}, {a.precision} (predicted)")
        if a.kernels:
            print_kernels(cfg, a.b, a.t, a.attention, x, a.efficiency)
        else:
            _, step, attn, mfu, _ = predict(cfg, a.b, a.t, a.attention, x, a.efficiency)
            print(f"step {step * 1e3:.1f} ms, attention {attn * 1e3:.1f} ms, MFU {100 * mfu:.1f}%")
        print("memory:")
        print_memory(cfg, a.b, a.t, a.attention, x)


if __name__ == "__main__":
    main()
