"""Export an xwin.cu model file to a Hugging Face Llama checkpoint folder.

    python dev/export_hf.py in.bin OUT_FOLDER

Writes OUT_FOLDER/config.json and OUT_FOLDER/model.safetensors, loadable with
LlamaForCausalLM.from_pretrained(OUT_FOLDER) (head_type 0) or
LlamaForSequenceClassification.from_pretrained(OUT_FOLDER) (head_type 1, one
label, tensor score.weight). Stacked tensors are split back into per-layer
tensors and the storage dtype is kept: a bf16 file gives bfloat16 tensors and
"dtype": "bfloat16" in the config. RoPE scaling goes back into rope_scaling
(with rope_theta beside it, which every transformers version reads). Running
dev/convert_hf.py on the result gives back the input file byte for byte.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

import xwin_format as xf
from convert_hf import LAYER_TENSORS, hf_names


def hf_config(cfg):
    """config.json contents for our config dict."""
    dtype = "bfloat16" if cfg["dtype"] == "bf16" else "float32"
    hc = {
        "architectures": ["LlamaForSequenceClassification" if cfg["head_type"] == 1 else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg["dim"],
        "num_hidden_layers": cfg["n_layers"],
        "num_attention_heads": cfg["n_heads"],
        "num_key_value_heads": cfg["n_kv_heads"],
        "head_dim": cfg["dim"] // cfg["n_heads"],
        "vocab_size": cfg["vocab_size"],
        "intermediate_size": cfg["ffn_dim"],
        "max_position_embeddings": cfg["max_seq_len"],
        "tie_word_embeddings": bool(cfg["tied_embeddings"]),
        "rope_theta": cfg["rope_theta"],
        "rope_scaling": dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None,
        "rms_norm_eps": cfg["norm_eps"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": dtype,
        "torch_dtype": dtype,  # the key older transformers versions read
    }
    for k in xf.TOKEN_ID_FIELDS:  # the tokens' ids; transformers needs pad_token_id to score a batch
        if cfg.get(k) is not None:
            hc[k] = cfg[k]
    if cfg["head_type"] == 1:
        hc["id2label"] = {"0": "LABEL_0"}
        hc["label2id"] = {"LABEL_0": 0}
    return hc


def hf_tensors(cfg, tensors):
    """Hugging Face name -> torch tensor (own storage, as safetensors wants)."""
    dtype = torch.bfloat16 if cfg["dtype"] == "bf16" else torch.float32
    out = {}
    for ours, theirs in hf_names(cfg).items():
        t = torch.from_numpy(tensors[ours]).to(dtype)  # float32 -> bf16 is exact here
        if ours in LAYER_TENSORS:
            for l, name in enumerate(theirs):
                out[name] = t[l].clone()
        else:
            out[theirs[0]] = t.clone()
    return out


def export(path, folder):
    cfg, tensors = xf.read_model(path)
    os.makedirs(folder, exist_ok=True)
    save_file(hf_tensors(cfg, tensors), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)
        f.write("\n")
    return cfg


def main():
    p = argparse.ArgumentParser(description="Export an xwin model file to a Hugging Face Llama folder.")
    p.add_argument("model")
    p.add_argument("out_folder")
    a = p.parse_args()
    try:
        cfg = export(a.model, a.out_folder)
    except (xf.FormatError, OSError) as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {a.out_folder}: {xf.n_params(cfg):,} params, {cfg['dtype']}, "
          f"{hf_config(cfg)['architectures'][0]}")


if __name__ == "__main__":
    main()
