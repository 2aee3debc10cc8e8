"""GGUF files for the tests of dev/convert_gguf.py, written with the gguf package.

    python3 test/gguf_cases.py CASE out.gguf [expected.bin]

Each case starts from a model file of test/fixtures (gqa_untied: grouped-query heads, an
untied head, every row a multiple of 32 long) and writes it as llama.cpp's converter would:
the llama.* metadata, tensors named token_embd / blk.N.attn_q / ... / output, and the rows of
Q and K of each head interleaved (Hugging Face row j * d/2 + i stored at 2i + j), which the
converter must undo. With expected.bin it also writes the model file the conversion must
give: the original weights after the tensor type's rounding (quantize, then dequantize).
  f32, f16, bf16, q8_0, q4_0, q4_1   every 2-D weight of that type (norms stay F32)
  gpt2                               general.architecture "gpt2"
  q5_k                               one tensor of type Q5_K
  rope_freqs                         a rope_freqs.weight tensor (Llama 3.1 scaling)
  tok_spm                            a SentencePiece tokenizer (tokenizer.ggml.model "llama")
  tok_pre                            a byte-level BPE with a pre-tokenizer name it does not know ("qwen2")
Every case but the last two has a small byte-level BPE tokenizer (pre "gpt-2"): 157 single-byte
tokens in the ByteLevel alphabet, 2 merges and 3 control tokens.
"""

import os
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dev"))
import xwin_format as xf  # noqa: E402
from export_tokenizer import byte_level_alphabet  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "gqa_untied", "model.bin")

GGUF_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
              "mlp_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}


def interleave_rows(w, heads):
    """llama.cpp's order of Q/K rows: within each head of d rows, Hugging Face row
    j * d/2 + i (j = 0, 1; i < d/2) goes to row 2i + j."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for j in range(2):
            for i in range(d // 2):
                out[h * d + 2 * i + j] = w[h * d + j * (d // 2) + i]
    return out


def main():
    case, out = sys.argv[1], sys.argv[2]
    expected_path = sys.argv[3] if len(sys.argv) > 3 else None
    cfg, t = xf.read_model(SOURCE)
    qtype = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}.get(case, "F32")
    qtype = GGMLQuantizationType[qtype]
    w = GGUFWriter(out, "gpt2" if case == "gpt2" else "llama")
    w.add_block_count(cfg["n_layers"])
    w.add_context_length(cfg["max_seq_len"])
    w.add_embedding_length(cfg["dim"])
    w.add_feed_forward_length(cfg["ffn_dim"])
    w.add_head_count(cfg["n_heads"])
    w.add_head_count_kv(cfg["n_kv_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["norm_eps"])
    w.add_rope_dimension_count(cfg["dim"] // cfg["n_heads"])
    w.add_vocab_size(cfg["vocab_size"])
    alphabet = byte_level_alphabet()
    tokens = ["<s>", "</s>", "<pad>"] + [alphabet[b] for b in range(cfg["vocab_size"] - 5)] + ["ab", "abab"]
    tokens[-2], tokens[-1] = alphabet[ord("a")] + alphabet[ord("b")], (alphabet[ord("a")] + alphabet[ord("b")]) * 2
    w.add_tokenizer_model("llama" if case == "tok_spm" else "gpt2")
    w.add_tokenizer_pre("qwen2" if case == "tok_pre" else "gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges([f"{tokens[-2][0]} {tokens[-2][1]}", f"{tokens[-2]} {tokens[-2]}"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(2)
    expected = {}

    def put(name, a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        kind = qtype if a.ndim == 2 else GGMLQuantizationType.F32
        if case == "q5_k" and name == "blk.0.attn_v.weight":  # refused before it is read: any bytes of the right size
            w.add_tensor(name, np.zeros((a.shape[0], 176), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q5_K)
            return a
        if kind == GGMLQuantizationType.F32:
            w.add_tensor(name, a)
            return a
        if kind == GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
            return a.astype(np.float16).astype(np.float32)
        q = quants.quantize(a, kind)  # uint8 rows of blocks; the writer infers the shape from the type
        w.add_tensor(name, q, raw_dtype=kind)
        return quants.dequantize(q, kind).reshape(a.shape)

    expected["wte"] = put("token_embd.weight", t["wte"])
    for ours, theirs in GGUF_NAMES.items():
        layers = []
        for l in range(cfg["n_layers"]):
            a = t[ours][l]
            if ours in ("wq", "wk"):
                heads = cfg["n_heads"] if ours == "wq" else cfg["n_kv_heads"]
                back = put(f"blk.{l}.{theirs}.weight", interleave_rows(a, heads))
                order = interleave_rows(np.arange(a.shape[0])[:, None], heads)[:, 0]
                restored = np.empty_like(back)
                restored[order] = back  # GGUF row r holds Hugging Face row order[r]
                layers.append(restored)
            else:
                layers.append(put(f"blk.{l}.{theirs}.weight", a))
        expected[ours] = np.stack(layers)
    expected["final_norm"] = put("output_norm.weight", t["final_norm"])
    expected["head"] = put("output.weight", t["head"])
    if case == "rope_freqs":
        put("rope_freqs.weight", np.ones(cfg["dim"] // cfg["n_heads"] // 2, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if expected_path:
        xf.write_model(expected_path, dict(cfg, bos_token_id=0, eos_token_id=1, pad_token_id=2), expected, "fp32")


if __name__ == "__main__":
    main()
