"""Convert a Hugging Face Llama checkpoint folder to an xwin.cu model file.

    python dev/convert_hf.py HF_FOLDER out.bin [--dtype fp32|bf16]

HF_FOLDER holds config.json and the weights: model.safetensors, sharded
safetensors with model.safetensors.index.json, or pytorch_model.bin (also
sharded). LlamaForCausalLM becomes head_type 0 (lm_head.weight, or none when
tie_word_embeddings is set); LlamaForSequenceClassification with one label
becomes head_type 1 (score.weight). Per-layer tensors are stacked over layers;
values are copied unchanged (Q/K keep the rotate-half layout). Without --dtype
the output is bf16 if every source tensor is bf16, else fp32. RoPE scaling of
the types linear and llama3 (rope_scaling, or transformers 5's rope_parameters)
goes into the header. Configurations that the C++ model does not implement
(other RoPE scaling types, biases, another head_dim or activation) are refused
with a one-line error.
"""

import argparse
import json
import os
import sys

import torch

import xwin_format as xf

# our per-layer name -> Hugging Face name inside model.layers.{l}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}


class ConvertError(ValueError):
    pass


def hf_names(cfg):
    """Our tensor name -> list of Hugging Face names (one per layer for stacked
    tensors, else a single name)."""
    names = {"wte": ["model.embed_tokens.weight"]}
    for ours, theirs in LAYER_TENSORS.items():
        names[ours] = [f"model.layers.{l}.{theirs}" for l in range(cfg["n_layers"])]
    names["final_norm"] = ["model.norm.weight"]
    if cfg["head_type"] == 1:
        names["head"] = ["score.weight"]
    elif not cfg["tied_embeddings"]:
        names["head"] = ["lm_head.weight"]
    # keep the file order
    return {n: names[n] for n, _ in xf.tensor_shapes(cfg)}


def gather(cfg, get):
    """Our tensors from a lookup get(hf_name) -> tensor, stacking per-layer
    tensors. Used for weights here, and for gradients by the fixture script."""
    out = {}
    for ours, theirs in hf_names(cfg).items():
        if ours in ("wte", "final_norm", "head"):
            out[ours] = get(theirs[0])
        else:
            out[ours] = torch.stack([get(n) for n in theirs])
    return out


def rope_scaling_from_hf(d, hc, key, refuse):
    """Our rope_scaling (None, or a dict as xwin_format describes) from a config.json's
    rope_scaling or rope_parameters dict d: the type under "rope_type" (or the older
    "type"); "default" or none is plain RoPE. Only linear and llama3 are implemented."""
    kind = d.get("rope_type", d.get("type")) or "default"
    known = {"rope_type", "type", "rope_theta"}
    if kind == "default":
        if set(d) - known:
            refuse(f"{key} {d} (plain RoPE with other fields)")
        return None
    if kind not in xf.ROPE_TYPES:
        refuse(f"RoPE scaling type {kind!r} (only linear and llama3 are implemented)")
    fields = xf.ROPE_FIELDS[kind]
    if set(d) - known - set(fields):
        refuse(f"{key} {kind} has fields we do not implement: {sorted(set(d) - known - set(fields))}")
    out = {"rope_type": kind}
    for k in fields:
        v = d.get(k)
        if v is None and k == "original_max_position_embeddings":  # as transformers fills it in
            v = hc.get(k) or hc.get("max_position_embeddings")
        if v is None:
            refuse(f"{key} {kind} lacks {k}")
        out[k] = int(v) if k == "original_max_position_embeddings" else float(v)
    err = xf.rope_scaling_error(out)
    if err:
        refuse(err)
    return out


def config_from_hf(hc, head_type):
    """Our config dict from a config.json dict; refuses what we do not support."""
    def refuse(msg):
        raise ConvertError(f"unsupported config: {msg}")

    if hc.get("model_type", "llama") != "llama":
        refuse(f"model_type is {hc.get('model_type')!r}, expected 'llama'")
    C = hc["hidden_size"]
    H = hc["num_attention_heads"]
    KV = hc.get("num_key_value_heads") or H
    if C % H:
        refuse(f"hidden_size {C} is not a multiple of num_attention_heads {H}")
    if H % KV:
        refuse(f"num_attention_heads {H} is not a multiple of num_key_value_heads {KV}")
    if hc.get("head_dim") is not None and hc["head_dim"] != C // H:
        refuse(f"head_dim {hc['head_dim']} != hidden_size / num_attention_heads = {C // H}")
    rp = hc.get("rope_parameters") or {}
    # transformers 5 writes the scaling into rope_parameters (with rope_theta), older versions a
    # rope_scaling dict beside rope_theta; both mean the same when both are there
    scalings = [rope_scaling_from_hf(d, hc, key, refuse) for key, d in
                (("rope_scaling", hc.get("rope_scaling")), ("rope_parameters", rp)) if d]
    if len(scalings) == 2 and scalings[0] != scalings[1]:
        refuse(f"rope_scaling {hc['rope_scaling']} and rope_parameters {rp} disagree")
    rope_scaling = scalings[0] if scalings else None
    if hc.get("attention_bias"):
        refuse("attention_bias is true")
    if hc.get("mlp_bias"):
        refuse("mlp_bias is true")
    if hc.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act is {hc['hidden_act']!r}, expected 'silu'")
    theta = rp.get("rope_theta", hc.get("rope_theta", 10000.0))
    return {
        "dim": C,
        "n_layers": hc["num_hidden_layers"],
        "n_heads": H,
        "n_kv_heads": KV,
        "vocab_size": hc["vocab_size"],
        "ffn_dim": hc["intermediate_size"],
        "max_seq_len": hc["max_position_embeddings"],
        "tied_embeddings": 1 if hc.get("tie_word_embeddings", False) else 0,
        "head_type": head_type,
        "rope_theta": float(theta),
        "rope_scaling": rope_scaling,
        "norm_eps": float(hc.get("rms_norm_eps", 1e-6)),
        # the tokens' ids (None when absent); a list of eos ids keeps the first
        **{k: (v[0] if isinstance(v, list) and v else v) for k in xf.TOKEN_ID_FIELDS for v in [hc.get(k)]},
    }


def open_weights(folder):
    """(names, get, is_bf16): the tensor names in a checkpoint folder, a lazy
    getter, and a dtype test that does not load the tensor."""
    def path(f):
        return os.path.join(folder, f)

    for index, single, kind in [("model.safetensors.index.json", "model.safetensors", "st"),
                                ("pytorch_model.bin.index.json", "pytorch_model.bin", "pt")]:
        if os.path.exists(path(index)):
            with open(path(index)) as f:
                where = json.load(f)["weight_map"]
        elif os.path.exists(path(single)):
            where = None
        else:
            continue
        if kind == "st":
            from safetensors import safe_open
            files = sorted(set(where.values())) if where else [single]
            handles = {fn: safe_open(path(fn), framework="pt") for fn in files}
            where = {k: fn for fn, h in handles.items() for k in h.keys()}
            return (list(where), lambda n: handles[where[n]].get_tensor(n),
                    lambda n: handles[where[n]].get_slice(n).get_dtype() == "BF16")
        files = sorted(set(where.values())) if where else [single]
        state = {}
        for fn in files:
            state.update(torch.load(path(fn), map_location="cpu", weights_only=True))
        return list(state), state.__getitem__, lambda n: state[n].dtype == torch.bfloat16
    raise ConvertError(f"no model.safetensors or pytorch_model.bin in {folder}")


def convert(folder, out, dtype=None):
    """Convert folder to out; returns our config dict (with "dtype")."""
    with open(os.path.join(folder, "config.json")) as f:
        hc = json.load(f)
    names, get, is_bf16 = open_weights(folder)
    present = set(names)
    arch = (hc.get("architectures") or [""])[0]
    head_type = 1 if arch.endswith("ForSequenceClassification") or "score.weight" in present else 0
    cfg = config_from_hf(hc, head_type)

    wanted = hf_names(cfg)
    needed = {n for ns in wanted.values() for n in ns}
    missing = sorted(needed - present)
    if missing:
        raise ConvertError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    ignored = {n for n in present - needed if n.endswith("rotary_emb.inv_freq")}
    if cfg["tied_embeddings"] and "lm_head.weight" in present:
        if not torch.equal(get("lm_head.weight"), get("model.embed_tokens.weight")):
            raise ConvertError("tie_word_embeddings is set but lm_head.weight differs from the embedding")
        ignored.add("lm_head.weight")
    unknown = sorted(present - needed - ignored)
    if unknown:
        raise ConvertError(f"checkpoint has {len(unknown)} tensors we do not know, e.g. {unknown[0]}")
    if head_type == 1 and tuple(get("score.weight").shape) != (1, cfg["dim"]):
        raise ConvertError(f"score.weight has shape {tuple(get('score.weight').shape)}, need num_labels 1")

    if dtype is None:
        dtype = "bf16" if all(is_bf16(n) for n in needed) else "fp32"
    target = torch.bfloat16 if dtype == "bf16" else torch.float32

    # load one of our tensors at a time, only while it is written
    def lazy(names_l, stacked):
        def load():
            ts = [get(n).to(target) for n in names_l]
            return torch.stack(ts) if stacked else ts[0]
        return load

    tensors = {ours: lazy(theirs, ours in LAYER_TENSORS) for ours, theirs in wanted.items()}
    xf.write_model(out, cfg, tensors, dtype)
    return dict(cfg, dtype=dtype)


def main():
    p = argparse.ArgumentParser(description="Convert a Hugging Face Llama folder to an xwin model file.")
    p.add_argument("hf_folder")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="parameter storage (default: bf16 if the checkpoint is all bf16, else fp32)")
    a = p.parse_args()
    try:
        cfg = convert(a.hf_folder, a.out, a.dtype)
    except (ConvertError, xf.FormatError, OSError, KeyError, json.JSONDecodeError) as e:
        msg = f"missing config field {e}" if isinstance(e, KeyError) else str(e)
        print(f"convert_hf: error: {msg}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {a.out}: {xf.n_params(cfg):,} params, {cfg['dtype']}, head_type {cfg['head_type']}, "
          f"dim {cfg['dim']}, layers {cfg['n_layers']}, heads {cfg['n_heads']}/{cfg['n_kv_heads']}, "
          f"vocab {cfg['vocab_size']}, tied {cfg['tied_embeddings']}")


if __name__ == "__main__":
    main()
