"""Convert a Llama-architecture GGUF file to an xwin.cu model file.

    python dev/convert_gguf.py FILE.gguf out.bin [--dtype fp32|bf16]

The GGUF's metadata gives the config (llama.* keys) and the token ids
(tokenizer.ggml.*_token_id); its tensors are dequantized with the `gguf`
package from PyPI (pip install gguf numpy) into float32, then written as
fp32 (the default) or bf16. Supported tensor types: F32, F16, BF16, Q8_0,
Q4_0, Q4_1. llama.cpp's converter stores Q and K with the rows of each head
interleaved (pairs (x_i, x_{i + d/2}) side by side, for its own RoPE); they
are put back in the Hugging Face rotate-half order that the model file keeps,
so the result equals what dev/convert_hf.py makes of the same weights. A
GGUF of another architecture, another tensor type, a head_dim other than
dim / n_heads, or RoPE scaling is refused with a one-line error naming the
file, and nothing is written.
"""

import argparse
import os
import sys

import numpy as np

import xwin_format as xf


class ConvertError(ValueError):
    pass


SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# our per-layer name -> the GGUF name inside blk.{l}
LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}


def field(reader, key, default=None):
    """The value of a metadata key (a number, a string or a list), or default."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def decimal_of_f32(x):
    """GGUF keeps rope_theta and the norm's eps as float32 (1e-5 as 9.99999975e-06); the
    config's value is the shortest decimal that rounds to that float32, as the source
    config.json wrote it (1e-05)."""
    return float(str(np.float32(x)))


def config_from_gguf(reader):
    """Our config dict from a GGUF's metadata; refuses what the model does not implement."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ConvertError(f"general.architecture is {arch!r}; only 'llama' is supported")

    def need(key):
        v = field(reader, f"llama.{key}")
        if v is None:
            raise ConvertError(f"metadata key llama.{key} is missing")
        return v

    C, H = int(need("embedding_length")), int(need("attention.head_count"))
    KV = int(field(reader, "llama.attention.head_count_kv", H))
    if C % H or H % KV:
        raise ConvertError(f"embedding_length {C}, head_count {H}, head_count_kv {KV}: heads do not divide evenly")
    hd = C // H
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        v = field(reader, f"llama.{key}")
        if v is not None and int(v) != hd:
            raise ConvertError(f"llama.{key} is {v}; the model needs it equal to embedding_length / head_count = {hd}")
    scaling = field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConvertError(f"llama.rope.scaling.type is {scaling!r}: RoPE scaling in GGUF files is not supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ConvertError("the file has rope_freqs.weight (Llama 3.1 RoPE scaling as per-frequency factors): not supported; "
                           "convert the Hugging Face folder with dev/convert_hf.py instead")
    names = {t.name for t in reader.tensors}
    vocab = field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    if vocab is None:
        raise ConvertError("neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    ids = {}
    for ours, theirs in (("pad_token_id", "padding"), ("bos_token_id", "bos"), ("eos_token_id", "eos")):
        v = field(reader, f"tokenizer.ggml.{theirs}_token_id")
        ids[ours] = None if v is None or not 0 <= int(v) < int(vocab) else int(v)
    return {
        "dim": C,
        "n_layers": int(need("block_count")),
        "n_heads": H,
        "n_kv_heads": KV,
        "vocab_size": int(vocab),
        "ffn_dim": int(need("feed_forward_length")),
        "max_seq_len": int(need("context_length")),
        "tied_embeddings": 0 if "output.weight" in names else 1,
        "head_type": 0,
        "rope_theta": decimal_of_f32(field(reader, "llama.rope.freq_base", 10000.0)),
        "norm_eps": decimal_of_f32(need("attention.layer_norm_rms_epsilon")),
        **ids,
    }


def dequantize(t):
    """A GGUF tensor as a float32 array in torch's (out_features, in_features) order."""
    from gguf import quants
    if t.tensor_type.name not in SUPPORTED_TYPES:
        raise ConvertError(f"tensor {t.name} is of type {t.tensor_type.name}; supported: {', '.join(SUPPORTED_TYPES)}")
    a = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dimension first
    return a.reshape(shape)


def unpermute_rows(w, heads):
    """Undo llama.cpp's Q/K row order: within each head of d rows, GGUF row 2i + j holds the
    Hugging Face row j * d/2 + i (j = 0, 1)."""
    rows, cols = w.shape
    d = rows // heads
    return w.reshape(heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def convert(path, out, dtype="fp32"):
    """Convert the GGUF at path to out; returns our config dict (with "dtype")."""
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ConvertError(f"not a readable GGUF file ({e})")
    cfg = config_from_gguf(reader)
    by_name = {t.name: t for t in reader.tensors}
    wanted = {"wte": ["token_embd.weight"], "final_norm": ["output_norm.weight"]}
    for ours, theirs in LAYER_TENSORS.items():
        wanted[ours] = [f"blk.{l}.{theirs}" for l in range(cfg["n_layers"])]
    if not cfg["tied_embeddings"]:
        wanted["head"] = ["output.weight"]
    needed = {n for ns in wanted.values() for n in ns}
    missing = sorted(needed - set(by_name))
    if missing:
        raise ConvertError(f"the file lacks {len(missing)} tensors, e.g. {missing[0]}")
    unknown = sorted(set(by_name) - needed)
    if unknown:
        raise ConvertError(f"the file has {len(unknown)} tensors this model does not know, e.g. {unknown[0]}")
    for n in needed:  # refuse an unsupported type before anything is written
        if by_name[n].tensor_type.name not in SUPPORTED_TYPES:
            raise ConvertError(f"tensor {n} is of type {by_name[n].tensor_type.name}; supported: {', '.join(SUPPORTED_TYPES)}")

    def tensor(name):
        w = dequantize(by_name[name])
        if name.endswith("attn_q.weight"):
            w = unpermute_rows(w, cfg["n_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute_rows(w, cfg["n_kv_heads"])
        return w

    def lazy(names, stacked):  # one of our tensors at a time, only while it is written
        return lambda: np.stack([tensor(n) for n in names]) if stacked else tensor(names[0])

    tensors = {ours: lazy(theirs, ours in LAYER_TENSORS) for ours, theirs in wanted.items()}
    xf.write_model(out, cfg, tensors, dtype)
    return dict(cfg, dtype=dtype)


def main():
    p = argparse.ArgumentParser(description="Convert a Llama-architecture GGUF file to an xwin model file.")
    p.add_argument("gguf_file")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="parameter storage (default fp32)")
    a = p.parse_args()
    if not os.path.isfile(a.gguf_file):
        print(f"convert_gguf: error: {a.gguf_file}: no such file", file=sys.stderr)
        sys.exit(1)
    try:
        cfg = convert(a.gguf_file, a.out, a.dtype)
    except (ConvertError, xf.FormatError, OSError) as e:
        print(f"convert_gguf: error: {a.gguf_file}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {a.out}: {xf.n_params(cfg):,} params, {cfg['dtype']}, dim {cfg['dim']}, layers {cfg['n_layers']}, "
          f"heads {cfg['n_heads']}/{cfg['n_kv_heads']}, vocab {cfg['vocab_size']}, tied {cfg['tied_embeddings']}, "
          f"rope_theta {cfg['rope_theta']:g}")


if __name__ == "__main__":
    main()
