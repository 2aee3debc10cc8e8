"""A model file of a real model's shape with random weights, and random token sequences: for
timing and profiling runs that need the shape, not the knowledge (dev/gpu_check.sh).

    python3 dev/random_model.py tinyllama model.bin [--dtype bf16] [--tokens data.tok --seqs 64 --len 2048]

The shape is a name of dev/roofline.py's CONFIGS (tinyllama, llama2-7b) or
DIM,LAYERS,HEADS,KV_HEADS,VOCAB,FFN. Weights are N(0, 0.02), norms 1; the token file holds
--seqs sequences of --len random ids below the vocabulary size, every token a target. Needs numpy.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xwin_format as xf  # noqa: E402
from roofline import CONFIGS  # noqa: E402


def shape_of(name):
    if name in CONFIGS:
        return CONFIGS[name]
    try:
        dims = tuple(int(x) for x in name.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 6:
        sys.exit(f"random_model: error: shape {name!r}: expected {', '.join(CONFIGS)} or DIM,LAYERS,HEADS,KV_HEADS,VOCAB,FFN")
    return dims


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape")
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--tokens", help="also write a token file of random sequences here")
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    dim, layers, heads, kv, vocab, ffn = shape_of(a.shape)
    cfg = {"dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv, "vocab_size": vocab, "ffn_dim": ffn,
           "max_seq_len": a.max_seq_len, "tied_embeddings": 0, "head_type": 0, "rope_theta": 10000.0, "norm_eps": 1e-5}
    rng = np.random.default_rng(a.seed)

    def tensor(shape, norm):  # made only when written, one tensor at a time
        return lambda: np.ones(shape, np.float32) if norm else (0.02 * rng.standard_normal(shape, dtype=np.float32))

    tensors = {name: tensor(shape, name.endswith("norm")) for name, shape in xf.tensor_shapes(cfg)}
    xf.write_model(a.out, cfg, tensors, a.dtype)
    print(f"wrote {a.out}: {a.shape}, {xf.n_params(cfg):,} parameters, {a.dtype}, random")
    if a.tokens:
        seqs = [[int(t) for t in rng.integers(0, vocab, a.len)] for _ in range(a.seqs)]
        xf.write_tokens(a.tokens, seqs, [[1] * a.len for _ in seqs])
        print(f"wrote {a.tokens}: {a.seqs} sequences of {a.len} random tokens")


if __name__ == "__main__":
    main()
