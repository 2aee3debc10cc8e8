"""GPU timings of xwin.cu's kernels and training step beside PyTorch, same shapes, same run.

    make test-gpu            (builds build/bench_gpu and runs this after the GPU tests)
    python dev/bench_gpu.py [--bench build/bench_gpu] [--out dev/gpu_bench.txt]

Runs build/bench_gpu (each CUDA op of llm.cu and a whole step: forward, loss, backward,
clipping, AdamW), then the same ops and step in PyTorch: transformers' LlamaForCausalLM
under bf16 autocast with FP32 master weights (as xwin.cu keeps them), SDPA attention and
fused AdamW. Prints a table of milliseconds and the ratio xwin / torch (below 1: xwin faster).
"""
import argparse
import subprocess
import sys

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

DIM, LAYERS, HEADS, KV, VOCAB, FFN, B, T = 768, 12, 12, 12, 32000, 2048, 8, 1024


def cuda_ms(fn, repeats=20):
    fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def torch_ops():
    dev, bf = "cuda", torch.bfloat16
    N, hd = B * T, DIM // HEADS
    x = torch.randn(N, DIM, device=dev, dtype=bf, requires_grad=True)
    w = torch.randn(DIM, device=dev, dtype=bf, requires_grad=True)
    wq = torch.randn(DIM, DIM, device=dev, dtype=bf, requires_grad=True)
    wg = torch.randn(FFN, DIM, device=dev, dtype=bf, requires_grad=True)
    wte = torch.randn(VOCAB, DIM, device=dev, dtype=bf, requires_grad=True)
    tokens = torch.randint(0, VOCAB, (N,), device=dev)
    q = torch.randn(B, HEADS, T, hd, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(B, KV, T, hd, device=dev, dtype=bf, requires_grad=True)
    v = torch.randn(B, KV, T, hd, device=dev, dtype=bf, requires_grad=True)
    g = torch.randn(N, FFN, device=dev, dtype=bf, requires_grad=True)
    u = torch.randn(N, FFN, device=dev, dtype=bf, requires_grad=True)
    logits = torch.randn(N, VOCAB, device=dev, dtype=bf, requires_grad=True)
    params = [torch.nn.Parameter(torch.randn(134_000_000 // 8, device=dev)) for _ in range(8)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def rms():
        return F.rms_norm(x, (DIM,), w, 1e-5)

    def fwd_bwd(fn):
        out = fn()
        return lambda: out.backward(torch.ones_like(out), retain_graph=True)

    emb = lambda: F.embedding(tokens, wte)
    mm = lambda: F.linear(x, wq)
    mm_mlp = lambda: F.linear(x, wg)
    att = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != HEADS)
    swi = lambda: F.silu(g) * u
    ce = lambda: F.cross_entropy(logits.float(), tokens)
    return {
        "embedding_forward": cuda_ms(emb), "embedding_backward": cuda_ms(fwd_bwd(emb)),
        "rmsnorm_forward": cuda_ms(rms), "rmsnorm_backward": cuda_ms(fwd_bwd(rms)),
        "matmul_forward_qkvo": cuda_ms(mm), "matmul_backward_qkvo": cuda_ms(fwd_bwd(mm)),
        "matmul_forward_mlp": cuda_ms(mm_mlp), "matmul_backward_mlp": cuda_ms(fwd_bwd(mm_mlp)),
        "matmul_forward_head": cuda_ms(lambda: F.linear(x, wte)),
        "attention_forward": cuda_ms(att), "attention_backward": cuda_ms(fwd_bwd(att)),
        "swiglu_forward": cuda_ms(swi), "swiglu_backward": cuda_ms(fwd_bwd(swi)),
        "residual_forward": cuda_ms(lambda: x + x),
        "logprob_forward": cuda_ms(ce), "logprob_backward": cuda_ms(fwd_bwd(ce)), "fused_logprob_nll": cuda_ms(fwd_bwd(ce)),
        "clip_grad_norm": cuda_ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1e9)),
        "adamw": cuda_ms(opt.step),
    }


def torch_step():
    cfg = LlamaConfig(hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                      vocab_size=VOCAB, intermediate_size=FFN, max_position_embeddings=T, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    tokens = torch.randint(0, VOCAB, (B, T), device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    return cuda_ms(step, repeats=10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default="build/bench_gpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = subprocess.run([args.bench, *map(str, (DIM, LAYERS, HEADS, KV, VOCAB, FFN, B, T))], check=True,
                         capture_output=True, text=True).stdout
    ours, lines = {}, []
    for line in out.splitlines():
        if line.startswith("op "):
            _, name, ms = line.split()
            ours[name] = float(ms)
        elif line.startswith("step "):
            ours["training step"] = float(line.split()[1])
        lines.append("# " + line)
    theirs = torch_ops()
    theirs["training step"] = torch_step()
    lines.append(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    lines.append(f"{'op':24} {'xwin ms':>10} {'torch ms':>10} {'xwin/torch':>11}")
    for name, ms in ours.items():
        t = theirs.get(name)
        lines.append(f"{name:24} {ms:10.4f} {t:10.4f} {ms / t:11.2f}" if t else f"{name:24} {ms:10.4f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"$ python dev/bench_gpu.py --out {args.out}\n{text}\n")


if __name__ == "__main__":
    sys.exit(main())
