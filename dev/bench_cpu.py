"""CPU speed of one training step: xwin.cu's CPU reference against PyTorch.

Both run forward + masked-mean cross-entropy + backward of the same randomly initialised
Llama shapes, float32, on the same number of threads, in the same run; the figure is the
ratio of median step times (xwin.cu / PyTorch; below 1 means xwin.cu is faster).

    make bench_step && python dev/bench_cpu.py [--threads 2] [--steps 5]

Needs torch and transformers (pip install torch transformers).
"""
import argparse
import os
import subprocess
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# (name, dim, n_layers, n_heads, n_kv_heads, vocab, ffn, B, T)
SHAPES = [
    ("tiny", 128, 4, 4, 4, 512, 344, 8, 128),
    ("small", 512, 8, 8, 2, 8192, 1376, 4, 256),
]


def torch_step_ms(shape, steps, attn):
    _, dim, layers, heads, kv, vocab, ffn, B, T = shape
    cfg = LlamaConfig(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      vocab_size=vocab, intermediate_size=ffn, max_position_embeddings=T, tie_word_embeddings=False,
                      attn_implementation=attn)
    model = LlamaForCausalLM(cfg).float()
    tokens = torch.randint(0, vocab, (B, T))
    times = []
    for s in range(steps + 1):
        start = time.perf_counter()
        model.zero_grad(set_to_none=False)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if s > 0:
            times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def ours_step_ms(shape, steps, threads):
    _, dim, layers, heads, kv, vocab, ffn, B, T = shape
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(["./bench_step", str(dim), str(layers), str(heads), str(kv), str(vocab), str(ffn), str(B), str(T),
                          str(steps)], env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, median of {args.steps} steps after a warm-up")
    print(f"{'shape':8} {'xwin ms':>10} {'torch sdpa ms':>14} {'torch eager ms':>15} {'ratio vs sdpa':>14} {'ratio vs eager':>15}")
    for shape in SHAPES:
        ours = ours_step_ms(shape, args.steps, args.threads)
        sdpa = torch_step_ms(shape, args.steps, "sdpa")
        eager = torch_step_ms(shape, args.steps, "eager")
        print(f"{shape[0]:8} {ours:10.1f} {sdpa:14.1f} {eager:15.1f} {ours / sdpa:14.2f} {ours / eager:15.2f}")


if __name__ == "__main__":
    main()
