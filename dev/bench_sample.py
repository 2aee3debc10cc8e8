"""Generation speed: ./sample against transformers' generate, the same model, prompts and N.

Both sample N responses to each of the first P held-out world prompts (temperature 1, no
top-k or top-p, up to M new tokens, stopping at EOS) from the same model, exported to a
Hugging Face folder for transformers; each decodes the N responses of one prompt as one
batch of N sequences with a KV cache (transformers: generate(num_return_sequences=N),
./sample: -m set -A N -b N -U 0, duplicates kept), on the same number of threads, in the same run.
The figure is generated tokens per second (each response's tokens up to and including its
EOS), ./sample over transformers, timing only the generation (no loading, no writing).

    make cpu && python dev/bench_sample.py [--model out/sft/model.bin] [--prompts 16] [--n 16]
    make gpu && python dev/bench_sample.py --device cuda    # transformers in bfloat16 on the GPU

Needs torch and transformers (pip install torch transformers safetensors numpy).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# both sides wait for their OpenMP threads passively: on a shared machine, spinning threads
# fight other processes for the cores and a step can take many times longer
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from export_hf import export  # noqa: E402

BOS, EOS, PAD = 256, 257, 258  # the byte tokenizer's


def prompt_ids(messages):
    """The byte tokenizer's ids of a prompt in the template, as chat_encode_prompt makes them."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = [m["content"] for m in messages[1 if system is not None else 0:]]
    text = (system if system is not None else
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.") + " "
    ids = [BOS]
    for i, t in enumerate(turns):
        if i % 2 == 0:
            text += "USER: " + t + " ASSISTANT:"
        else:
            ids += list((text + " " + t).encode("utf-8")) + [EOS]
            text = ""
    return ids + list((text + " ").encode("utf-8"))


def transformers_run(folder, prompts, n, max_new, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()

    def one(ids):
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, num_return_sequences=n,
                                 max_new_tokens=max_new, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=EOS,
                                 pad_token_id=PAD, use_cache=True)
        tokens = 0
        for row in out[:, len(ids):].tolist():
            tokens += row.index(EOS) + 1 if EOS in row else len(row)
        return tokens

    one(prompts[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = sum(one(ids) for ids in prompts)
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def ours_run(binary, model, prompts_file, p, n, max_new, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="passive")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [binary, "-m", "set", "-e", model, "-i", prompts_file, "-f", str(p), "-A", str(n), "-b", str(n), "-U", "0",
               "-g", str(max_new), "-o", os.path.join(tmp, "set.jsonl")]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) responses, (\d+) tokens in ([\d.]+) s", out)
    return int(m.group(2)), float(m.group(3)), cmd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "out/sft/model.bin"))
    ap.add_argument("--binary", default=os.path.join(ROOT, "sample"))
    ap.add_argument("--prompts-file", default=os.path.join(ROOT, "data/world/eval_prompts.jsonl"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    with open(args.prompts_file) as f:
        prompts = [prompt_ids(json.loads(line)["messages"]) for line in f][:args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        export(args.model, tmp)
        hf_tokens, hf_s = transformers_run(tmp, prompts, args.n, args.max_new, args.device)
    ours_tokens, ours_s, cmd = ours_run(args.binary, args.model, args.prompts_file, args.prompts, args.n, args.max_new, args.threads)
    what = "bfloat16 on the GPU" if args.device == "cuda" else f"float32, {args.threads} threads"
    print(f"{args.prompts} prompts x {args.n} samples, up to {args.max_new} new tokens, {what}")
    print(f"  transformers generate: {hf_tokens} tokens in {hf_s:.2f} s: {hf_tokens / hf_s:.0f} tok/s")
    print(f"  ./sample:              {ours_tokens} tokens in {ours_s:.2f} s: {ours_tokens / ours_s:.0f} tok/s  ({' '.join(cmd[1:-2])})")
    print(f"  ratio (./sample / transformers, tokens per second): {(ours_tokens / ours_s) / (hf_tokens / hf_s):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
