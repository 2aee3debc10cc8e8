"""CPU speed of one training step: xwin.cu's CPU reference against PyTorch.

Both run forward + masked-mean cross-entropy + backward of the same randomly initialised
Llama shapes, float32, on the same number of threads, in the same run; the figure is the
ratio of median step times (xwin.cu / PyTorch; below 1 means xwin.cu is faster).

    make bench_step && python dev/bench_cpu.py [--threads 2] [--steps 5] [--repeats 1] [--bench ./bench_step]
                                               [--baseline OTHER_BUILD] [--shapes tiny,small,world]

--repeats runs every measurement that many times, interleaved, and prints the medians (a shared
machine's noise); --bench names another build of dev/bench_step.cu to time instead; --baseline
times a second build (an older commit's) in the same loop and adds its columns.

Needs torch and transformers (pip install torch transformers).
"""
import argparse
import os
import subprocess
import time

# both sides wait for their OpenMP threads passively: on a shared machine, spinning threads
# fight other processes for the cores and a step can take many times longer
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

# (name, dim, n_layers, n_heads, n_kv_heads, vocab, ffn, B, T, tied)
SHAPES = [
    ("tiny", 128, 4, 4, 4, 512, 344, 8, 128, 0),
    ("small", 512, 8, 8, 2, 8192, 1376, 4, 256, 0),
    # the built-in world's model (train_sft.cu's world_config, its head the embedding) at
    # train_sft's micro-batch of 8 and its longest sequence, 256
    ("world", 128, 4, 4, 2, 259, 344, 8, 256, 1),
]


def torch_step_ms(shape, steps, attn):
    _, dim, layers, heads, kv, vocab, ffn, B, T, tied = shape
    cfg = LlamaConfig(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      vocab_size=vocab, intermediate_size=ffn, max_position_embeddings=T, tie_word_embeddings=bool(tied),
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


def ours_step_ms(shape, steps, threads, bench="./bench_step"):
    _, dim, layers, heads, kv, vocab, ffn, B, T, tied = shape
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([bench, str(dim), str(layers), str(heads), str(kv), str(vocab), str(ffn), str(B), str(T),
                          str(steps), str(tied)], env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--bench", default="./bench_step")
    ap.add_argument("--baseline", default="", help="another build of dev/bench_step.cu, timed in the same loop")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES), help="comma-separated names")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, median of {args.steps} steps after a warm-up"
          + (f", median of {args.repeats} interleaved repeats" if args.repeats > 1 else ""))
    base_head = f" {'baseline ms':>12} {'base vs sdpa':>13} {'base vs eager':>14}" if args.baseline else ""
    print(f"{'shape':8} {'xwin ms':>10} {'torch sdpa ms':>14} {'torch eager ms':>15} {'ratio vs sdpa':>14} {'ratio vs eager':>15}" + base_head)
    median = lambda xs: sorted(xs)[len(xs) // 2]
    for shape in [s for s in SHAPES if s[0] in args.shapes.split(",")]:
        ours, base, sdpa, eager = [], [], [], []
        for _ in range(args.repeats):
            ours.append(ours_step_ms(shape, args.steps, args.threads, args.bench))
            if args.baseline:
                base.append(ours_step_ms(shape, args.steps, args.threads, args.baseline))
            sdpa.append(torch_step_ms(shape, args.steps, "sdpa"))
            eager.append(torch_step_ms(shape, args.steps, "eager"))
        ours, sdpa, eager = median(ours), median(sdpa), median(eager)
        line = f"{shape[0]:8} {ours:10.1f} {sdpa:14.1f} {eager:15.1f} {ours / sdpa:14.2f} {ours / eager:15.2f}"
        if args.baseline:
            b = median(base)
            line += f" {b:12.1f} {b / sdpa:13.2f} {b / eager:14.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
