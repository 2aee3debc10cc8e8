"""Convert a Llama-architecture GGUF file to an xwin.cu model file and tokenizer.

    python dev/convert_gguf.py FILE.gguf out.bin [out.tokenizer] [--dtype fp32|bf16]

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

With out.tokenizer, the GGUF's byte-level BPE tokenizer (tokenizer.ggml.model "gpt2": its
tokens, merges, token types, bos/eos/pad ids and chat template) is written as a Hugging Face
tokenizer.json and tokenizer_config.json would describe it and exported by
dev/export_tokenizer.py. The GGUF names the pre-tokenizer (tokenizer.ggml.pre) rather than
storing it; the names this maps: "smollm" (the GPT-2 pattern after a split into single
digits, as SmolLM2's tokenizer.json has it), "llama-bpe" (Llama 3's pattern, ignore_merges),
"gpt-2" and "default" (the GPT-2 pattern). Another model or pre-tokenizer is refused.
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


# GGUF's token types (llama.cpp's llama_token_type)
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")


def tokenizer_files_from_gguf(reader):
    """(tokenizer.json, tokenizer_config.json) as dicts, from a GGUF's tokenizer metadata."""
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ConvertError(f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "smollm":
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre == "llama-bpe":
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False)]}
    elif pre in ("gpt-2", "default"):
        pre_tokenizer = byte_level
    else:
        raise ConvertError(f"tokenizer.ggml.pre is {pre!r}; supported: smollm, llama-bpe, gpt-2, default")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges") or []
    if not tokens or types is None or len(types) != len(tokens):
        raise ConvertError("tokenizer.ggml.tokens and tokenizer.ggml.token_type are missing or of different lengths")
    vocab, added = {}, []
    for i, (piece, kind) in enumerate(zip(tokens, types)):
        if kind in (GGUF_CONTROL, GGUF_USER_DEFINED):
            added.append({"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": kind == GGUF_USER_DEFINED, "special": kind == GGUF_CONTROL})
        elif kind not in (GGUF_NORMAL, GGUF_UNUSED):
            raise ConvertError(f"token {i} {piece!r} is of GGUF type {kind}: byte-level BPE has only normal, control and user-defined tokens")
        vocab[piece] = i
    spec = {"version": "1.0", "added_tokens": added, "normalizer": None, "pre_tokenizer": pre_tokenizer,
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": pre == "llama-bpe", "vocab": vocab, "merges": list(merges)}}
    config = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")):
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            config[name] = tokens[int(i)]
    template = field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return spec, config


def write_hf_tokenizer(reader, folder):
    """The GGUF's tokenizer as a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json)."""
    import json
    spec, config = tokenizer_files_from_gguf(reader)
    os.makedirs(folder, exist_ok=True)
    for name, obj in (("tokenizer.json", spec), ("tokenizer_config.json", dict(config, tokenizer_class="PreTrainedTokenizerFast"))):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)


def convert_tokenizer(path, out, hf_folder=None):
    """Write the GGUF's tokenizer to out (an xwin.cu .tokenizer) through dev/export_tokenizer.py,
    from the Hugging Face tokenizer folder it makes (kept in hf_folder when given)."""
    import tempfile
    import export_tokenizer
    from gguf import GGUFReader
    with tempfile.TemporaryDirectory() as scratch:
        folder = hf_folder or scratch
        write_hf_tokenizer(GGUFReader(path), folder)
        try:
            return export_tokenizer.export_hf_bpe(os.path.join(folder, "tokenizer.json"), out)
        except export_tokenizer.ExportError as e:
            raise ConvertError(str(e).replace(folder + "/", ""))


def main():
    p = argparse.ArgumentParser(description="Convert a Llama-architecture GGUF file to an xwin model file and tokenizer.")
    p.add_argument("gguf_file")
    p.add_argument("out")
    p.add_argument("out_tokenizer", nargs="?", help="also write the GGUF's tokenizer here")
    p.add_argument("--hf-tokenizer", metavar="FOLDER", help="with out_tokenizer: also keep the tokenizer as a Hugging Face folder"
                   " (tokenizer.json, tokenizer_config.json), for dev/data/prepare_sft.py --hf")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="parameter storage (default fp32)")
    a = p.parse_args()
    if not os.path.isfile(a.gguf_file):
        print(f"convert_gguf: error: {a.gguf_file}: no such file", file=sys.stderr)
        sys.exit(1)
    try:
        cfg = convert(a.gguf_file, a.out, a.dtype)
        tok = convert_tokenizer(a.gguf_file, a.out_tokenizer, a.hf_tokenizer) if a.out_tokenizer else None
    except (ConvertError, xf.FormatError, OSError) as e:
        if a.out_tokenizer and os.path.exists(a.out):  # nothing half done: the model goes with its tokenizer
            os.remove(a.out)
        print(f"convert_gguf: error: {a.gguf_file}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {a.out}: {xf.n_params(cfg):,} params, {cfg['dtype']}, dim {cfg['dim']}, layers {cfg['n_layers']}, "
          f"heads {cfg['n_heads']}/{cfg['n_kv_heads']}, vocab {cfg['vocab_size']}, tied {cfg['tied_embeddings']}, "
          f"rope_theta {cfg['rope_theta']:g}")
    if tok:
        print(f"wrote {a.out_tokenizer}: vocab {tok['vocab_size']}, {tok['merges']} merges, {tok['added']} added tokens, "
              f"pre-tokenizer {tok['pre_tokenizer']}{' after single digits' if tok['individual_digits'] else ''}, "
              f"bos {tok['bos_id']}, eos {tok['eos_id']}, pad {tok['pad_id']}")


if __name__ == "__main__":
    main()
