"""Make the parity fixtures in test/fixtures/<name>/ from Hugging Face Llama.

    python dev/make_fixtures.py [NAME ...]     (default: every fixture)

For each configuration below: build a randomly initialised LlamaForCausalLM
(fixed seed, weights scaled so the logits are far from uniform), save it as a
Hugging Face folder in a temporary directory and turn it into model.bin with
the converter. A random batch with loss masks goes to tokens.tok. The
reference, computed in float64 with eager attention, goes to expect.bin: the
logits, masked mean cross-entropy, per-sequence log-prob sums and gradients at
the initial weights, then two steps of gradient clipping plus AdamW on the
same batch (gradient norms, loss at step 2, parameters after step 2). The
RoPE-scaling fixtures (rope_llama3, rope_linear) are of the same kind, with
transformers' rope_scaling and sequences past the original context; their
expect.bin also holds transformers' inv_freq.

The generation fixture (greedy_gqa) is a converted model, prompts of different
lengths, and what transformers' greedy generate (float64, KV cache, batch 1 per
prompt, max_new_tokens and an eos_token_id that one of the prompts reaches)
returns for each, token for token; the smallest gap between the two largest
logits along the way is recorded, so a float32 run must make the same choices.

The reward fixtures (reward_*) are LlamaForSequenceClassification models with one
label: a batch of token rows (right-padded with pad_id where a row is shorter,
one row with pad_id inside it too, which transformers' rule of the rightmost
non-pad token must skip), the float64 scores, and the gradient of every
parameter of sum_b dscores[b] * score[b] for random dscores.

The DPO fixtures: dpo_loss holds the preference losses written in torch from
their definitions (TRL's DPOTrainer: "sigmoid" with label smoothing, "ipo" on
per-token means, the chosen NLL of rpo_alpha) on float32 inputs, as one
micro-batch's share of a larger step, with their autograd derivatives by the
policy's log-prob sums, for several settings. dpo_step is one DPO step of a
LlamaForCausalLM in float64: right-padded pairs (rows 2i chosen, 2i + 1
rejected, sharing a prompt; the mask on the response tokens only), the
reference log-prob sums of the initial model, the sigmoid loss with label
smoothing and the NLL term, its gradients, clipping, AdamW, and the parameters
after it (Adam's first step is about lr * sign(g), so the gradients themselves
are stored to check their sizes). The
script also checks the converter and exporter round trips (fp32 and bf16, and
a reward-head model) and prints a summary, including how far a float32 run of
the same model lands from the float64 reference.
"""

import copy
import filecmp
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
from transformers.utils import logging as hf_logging

import xwin_format as xf
from convert_hf import convert, gather
from export_hf import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "test", "fixtures")

FIXTURES = {
    "mha_tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=128, ffn_dim=176,
                     tied_embeddings=1, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=64, B=2, T=16),
    "gqa_untied": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=160, ffn_dim=128,
                       tied_embeddings=0, rope_theta=500000.0, norm_eps=1e-6, max_seq_len=64, B=3, T=20),
    "odd_sizes": dict(dim=60, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=101, ffn_dim=97,
                      tied_embeddings=0, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=32, B=2, T=13),
    # RoPE scaling on sequences well past original_max_position_embeddings. llama3: head_dim 16 and
    # theta 500 give the wavelengths 2 pi 500^(2i/16) = 6.3, 13.7, 29.7, 64.6, ... against the band
    # edges 32 / 4 = 8 and 32 / 1 = 32: one pair kept (high frequency), two blended, five divided by 8.
    "rope_llama3": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=96,
                        tied_embeddings=0, rope_theta=500.0, norm_eps=1e-5, max_seq_len=64, B=2, T=48,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=32)),
    "rope_linear": dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_dim=80,
                        tied_embeddings=1, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=64, B=2, T=40,
                        rope_scaling=dict(rope_type="linear", factor=4.0)),
}

# reward models: lengths of the rows (T = the longest; shorter rows right-padded with pad_id =
# V - 1, which no other token uses except the one planted inside the second padded row)
REWARD_FIXTURES = {
    "reward_mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=128, ffn_dim=176,
                       tied_embeddings=0, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=64, lengths=[12, 12]),
    "reward_gqa_padded": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=160, ffn_dim=128,
                              tied_embeddings=0, rope_theta=500000.0, norm_eps=1e-6, max_seq_len=64,
                              lengths=[16, 11, 6], pad_inside=(1, 4)),
    # rows 2i and 2i + 1 are pair i's chosen and rejected answers: one reward-model step
    "reward_step": dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_dim=80,
                        tied_embeddings=0, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=32,
                        lengths=[10, 7, 12, 9], step=dict(margins=[1.5, 0.5], center=0.05)),
}

# DPO: one step of a LlamaForCausalLM on pairs (prompt length, chosen response length, rejected
# response length); the batch is right-padded with token 0 under mask 0
DPO_FIXTURES = {
    "dpo_step": dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_dim=80,
                     tied_embeddings=0, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=32,
                     pairs=[(5, 4, 6), (3, 7, 2), (6, 3, 5)], beta=0.2, label_smoothing=0.1, nll_weight=0.5),
}

# greedy generation: the model, the prompt lengths, the new tokens; eos is the token that the
# first prompt's greedy path reaches at step eos_step (so that sequence stops there)
GENERATE_FIXTURES = {
    "greedy_gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=160, ffn_dim=128,
                       tied_embeddings=0, rope_theta=500000.0, norm_eps=1e-6, max_seq_len=64,
                       lengths=[5, 9, 3], max_new=12, eos_step=6),
}

SEED = 1234
WEIGHT_STD = 0.15
NORM_STD = 0.2
MIN_GRAD = 1e-7


def f32(x):
    """x rounded to float32, so the reference uses exactly the stored value."""
    return float(np.float32(x))


LR, BETA1, BETA2, EPS, WD = f32(1e-2), f32(0.9), f32(0.95), f32(1e-8), f32(0.1)


def hf_config(c, **extra):
    if c.get("rope_scaling"):
        extra["rope_scaling"] = dict(c["rope_scaling"])
    return LlamaConfig(
        hidden_size=c["dim"], num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
        num_key_value_heads=c["n_kv_heads"], vocab_size=c["vocab_size"], intermediate_size=c["ffn_dim"],
        max_position_embeddings=c["max_seq_len"], tie_word_embeddings=bool(c["tied_embeddings"]),
        rope_theta=c["rope_theta"], rms_norm_eps=c["norm_eps"], hidden_act="silu",
        attn_implementation="eager", **extra)


def init_weights(model, gen):
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(1 + NORM_STD * noise if p.ndim == 1 else WEIGHT_STD * noise)


def make_batch(B, T, V, gen):
    """Random tokens; each sequence masks a prompt of distinct random length
    3..T/2, and the last one also masks a gap of two tokens later on."""
    tokens = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    lengths = torch.arange(3, T // 2 + 1)[torch.randperm(T // 2 - 2, generator=gen)[:B]]
    for b, p in enumerate(lengths.tolist()):
        mask[b, :p] = 0
    p = int(lengths[-1])
    gap = int(torch.randint(p + 2, T - 3, (1,), generator=gen))
    mask[B - 1, gap:gap + 2] = 0
    return tokens, mask


def masked_loss(logits, tokens, mask):
    """(mean loss over targets, per-sequence log-prob sums). Targets are the
    positions t >= 1 with mask 1, predicted from the logits at t - 1."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok_logp = logp.gather(-1, tokens[:, 1:, None])[..., 0]
    m = mask[:, 1:].to(logp.dtype)
    sums = (tok_logp * m).sum(1)
    return -sums.sum() / m.sum(), sums


def adamw(params):
    """torch's AdamW as ours runs it: weight decay on the matrices, none on the norm weights."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": WD},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=LR, betas=(BETA1, BETA2), eps=EPS)


def train(model, cfg, tokens, mask, max_norm):
    """Two clip + AdamW steps on the same batch. Returns the gradients at the
    initial weights (our names), the two pre-clip norms, the step-2 loss and
    the parameters after step 2 (our names)."""
    params = list(model.parameters())
    opt = adamw(params)
    norms, losses, grads = [], [], None
    for step in range(2):
        opt.zero_grad()
        loss, _ = masked_loss(model(tokens).logits, tokens, mask)
        loss.backward()
        if step == 0:
            grads = gather(cfg, lambda n: model.get_parameter(n).grad.detach().clone())
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        losses.append(loss.item())
        opt.step()
    final = gather(cfg, lambda n: model.get_parameter(n).detach().clone())
    return grads, norms, losses[1], final


def check_round_trips(model, hf, model_bin, tmp):
    """export(model.bin) loads in transformers with the same tensors and
    converts back to the same bytes; likewise for a bf16 conversion."""
    cls = type(model)
    folder = os.path.join(tmp, "export")
    export(model_bin, folder)
    back = cls.from_pretrained(folder)
    assert back.config.rope_parameters == model.config.rope_parameters, (back.config.rope_parameters, model.config.rope_parameters)
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys(), want.keys() ^ got.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(want[k], got[k]), k
    again = os.path.join(tmp, "again.bin")
    convert(folder, again)
    assert filecmp.cmp(model_bin, again, shallow=False), "fp32 round trip differs"

    bf16_bin = os.path.join(tmp, "bf16.bin")
    assert convert(hf, bf16_bin, "bf16")["dtype"] == "bf16"
    folder16 = os.path.join(tmp, "export16")
    export(bf16_bin, folder16)
    back16 = cls.from_pretrained(folder16)
    got16 = back16.state_dict()
    for k in want:
        assert got16[k].dtype == torch.bfloat16 and torch.equal(want[k].to(torch.bfloat16), got16[k]), k
    again16 = os.path.join(tmp, "again16.bin")
    assert convert(folder16, again16)["dtype"] == "bf16"
    assert filecmp.cmp(bf16_bin, again16, shallow=False), "bf16 round trip differs"
    _, t16 = xf.read_model(bf16_bin)
    _, t32 = xf.read_model(model_bin)
    for k in t32:
        assert np.array_equal(t16[k], torch.from_numpy(t32[k]).to(torch.bfloat16).float().numpy()), k


def check_reward_round_trip(c, tmp):
    """A LlamaForSequenceClassification (one label) goes through as head_type 1."""
    torch.manual_seed(SEED)
    model = LlamaForSequenceClassification(hf_config(c, num_labels=1))
    init_weights(model, torch.Generator().manual_seed(SEED))
    hf = os.path.join(tmp, "hf_reward")
    model.save_pretrained(hf)
    a, b = os.path.join(tmp, "reward.bin"), os.path.join(tmp, "reward_again.bin")
    cfg = convert(hf, a)
    assert cfg["head_type"] == 1
    _, t = xf.read_model(a)
    assert np.array_equal(t["head"], model.score.weight.detach().numpy())
    export(a, os.path.join(tmp, "reward_export"))
    back = LlamaForSequenceClassification.from_pretrained(os.path.join(tmp, "reward_export"))
    sd = back.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    convert(os.path.join(tmp, "reward_export"), b)
    assert filecmp.cmp(a, b, shallow=False), "reward round trip differs"


# inv_freq of published configs with RoPE scaling: (hidden_size, heads, rope_theta, rope_scaling)
ROPE_INV_FREQ = [
    (4096, 32, 500000.0, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)),  # Llama 3.1 8B
    (2048, 32, 500000.0, dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)),  # Llama 3.2 1B
    (4096, 32, 10000.0, dict(rope_type="linear", factor=2.0)),  # a Llama 2 7B stretched to 8k
]


def make_rope_inv_freq(out_name):
    """rope_inv_freq: transformers' inv_freq (float32) for the configs of ROPE_INV_FREQ, each as
    case{i}.config (rope_type 1 linear or 2 llama3, head_dim, theta, factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings; 0 where the type has none) and case{i}.inv_freq."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    entries = []
    for i, (C, H, theta, rs) in enumerate(ROPE_INV_FREQ):
        hc = LlamaConfig(hidden_size=C, num_attention_heads=H, rope_theta=theta, rope_scaling=dict(rs),
                         max_position_embeddings=4 * rs.get("original_max_position_embeddings", 4096))
        rotary = LlamaRotaryEmbedding(hc)
        assert rotary.inv_freq.dtype == torch.float32 and rotary.attention_scaling == 1.0
        config = [xf.ROPE_TYPES[rs["rope_type"]], C // H, theta] + [rs.get(k, 0) for k in xf.ROPE_FIELDS["llama3"]]
        entries += [(f"case{i}.config", np.array(config, dtype=np.float64)), (f"case{i}.inv_freq", rotary.inv_freq.numpy())]
        unscaled = 1.0 / (theta ** (torch.arange(0, C // H, 2, dtype=torch.int64).float() / (C // H)))
        kept = int((rotary.inv_freq == unscaled).sum())
        divided = int((rotary.inv_freq == unscaled / rs["factor"]).sum())
        print(f"{out_name} case {i}: {rs} head_dim {C // H} theta {theta:g}: {C // H // 2} pairs, "
              f"{kept} kept, {divided} divided by factor, {C // H // 2 - kept - divided} blended")
    out = os.path.join(OUT, out_name)
    os.makedirs(out, exist_ok=True)
    xf.write_fixture(os.path.join(out, "expect.bin"), entries)
    return os.path.getsize(os.path.join(out, "expect.bin"))


def check_rope_conversion(tmp):
    """The converter's RoPE scaling: llama3 and linear from config.json's rope_scaling (under
    rope_type or the older type) or transformers 5's rope_parameters, written to the header and
    exported back to the same values; default or null is none; any other type is refused with one
    line naming it."""
    from convert_hf import ConvertError, config_from_hf
    from export_hf import hf_config as export_config
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 32,
            "intermediate_size": 96, "max_position_embeddings": 128, "rope_theta": 500000.0}
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    cases = [({"rope_scaling": {"rope_type": "llama3", **llama3}}, {"rope_type": "llama3", **llama3}),
             ({"rope_scaling": {"type": "linear", "factor": 2}}, {"rope_type": "linear", "factor": 2.0}),
             ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **llama3}}, {"rope_type": "llama3", **llama3}),
             ({"rope_scaling": None}, None),
             ({"rope_scaling": {"rope_type": "default"}}, None),
             ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, None)]
    for i, (extra, want) in enumerate(cases):
        cfg = config_from_hf({**base, **extra}, 0)
        assert cfg["rope_scaling"] == want, (extra, cfg["rope_scaling"])
        # through a model file and back out to config.json: the same rope_scaling
        path = os.path.join(tmp, f"rope{i}.bin")
        xf.write_model(path, cfg, {n: np.zeros(shape, np.float32) for n, shape in xf.tensor_shapes(cfg)})
        back = xf.read_header(path)
        assert back["rope_scaling"] == want and back["rope_theta"] == 500000.0, back
        exported = export_config(back)
        assert exported["rope_scaling"] == want and config_from_hf(exported, 0)["rope_scaling"] == want
        hf = LlamaConfig(**{k: v for k, v in exported.items() if k not in ("architectures", "model_type")})
        assert hf.rope_parameters == {**(want or {"rope_type": "default"}), "rope_theta": 500000.0}, hf.rope_parameters
    refusals = [({"rope_type": "dynamic", "factor": 2.0}, "RoPE scaling type 'dynamic'"),
                ({"type": "yarn", "factor": 4.0}, "RoPE scaling type 'yarn'"),
                ({"rope_type": "longrope"}, "RoPE scaling type 'longrope'"),
                ({"rope_type": "ntk", "factor": 2.0}, "RoPE scaling type 'ntk'"),
                ({"rope_type": "linear", "factor": 0.5}, "factor 0.5"),
                ({"rope_type": "llama3", **llama3, "high_freq_factor": 1.0}, "high_freq_factor 1.0"),
                ({"rope_type": "linear"}, "lacks factor"),
                ({"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 16}, "fields we do not implement")]
    for rs, msg in refusals:
        try:
            config_from_hf({**base, "rope_scaling": rs}, 0)
        except ConvertError as e:
            assert msg in str(e) and "\n" not in str(e), (rs, str(e))
        else:
            raise AssertionError(f"{rs} was not refused")
    print(f"rope scaling conversions ok ({len(cases)} configs through a header and back, {len(refusals)} refusals)")


def max_dev(ref, other):
    return max(float((ref[k] - other[k]).abs().max()) for k in ref)


def smallest_grad(model, tokens, mask):
    """Smallest nonzero |gradient| of the loss, computed in float64."""
    m = copy.deepcopy(model).double()
    masked_loss(m(tokens).logits, tokens, mask)[0].backward()
    return min(float(p.grad.abs()[p.grad != 0].min()) for p in m.parameters())


def draw(c, B, T):
    """Model and batch from the first seed whose gradients have no element in
    (0, MIN_GRAD): Adam's first step is about lr * sign(g), so a gradient that
    float32 cannot resolve would make the step-2 parameters an unfair test."""
    for seed in range(SEED, SEED + 100):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config(c))
        init_weights(model, gen)
        tokens, mask = make_batch(B, T, c["vocab_size"], gen)
        if smallest_grad(model, tokens, mask) >= MIN_GRAD:
            return seed, model, tokens, mask
    raise RuntimeError("no seed gave well-resolved gradients")


def make(name, spec, tmp):
    c = {k: v for k, v in spec.items() if k not in ("B", "T")}
    c["head_type"] = 0
    c.setdefault("rope_scaling", None)
    B, T, V = spec["B"], spec["T"], c["vocab_size"]
    seed, model, tokens, mask = draw(c, B, T)
    hf = os.path.join(tmp, "hf")
    model.save_pretrained(hf)

    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    model_bin = os.path.join(out, "model.bin")
    cfg = convert(hf, model_bin)
    assert cfg["dtype"] == "fp32" and all(cfg[k] == c[k] for k in c), cfg
    cfg.pop("dtype")
    _, stored = xf.read_model(model_bin)
    want = gather(cfg, lambda n: model.get_parameter(n).detach())
    assert all(np.array_equal(stored[k], want[k].numpy()) for k in want)
    check_round_trips(model, hf, model_bin, tmp)

    xf.write_tokens(os.path.join(out, "tokens.tok"), tokens.tolist(), mask.tolist())
    seqs, masks = xf.read_tokens(os.path.join(out, "tokens.tok"))
    assert np.array_equal(np.stack(seqs), tokens.numpy()) and np.array_equal(np.stack(masks), mask.numpy())

    # float64 reference from the saved checkpoint
    ref = LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").double()
    if cfg["tied_embeddings"]:
        assert ref.lm_head.weight is ref.model.embed_tokens.weight
    fp32 = LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager")
    init = copy.deepcopy(ref)

    with torch.no_grad():
        logits = ref(tokens).logits
        loss, sums = masked_loss(logits, tokens, mask)
        labels = tokens.masked_fill(mask == 0, -100)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
        hf_loss = ref(tokens, labels=labels).loss
    assert logits.dtype == torch.float64 and abs(float(loss - ce)) < 1e-10
    # transformers casts the logits to float32 inside its loss, so only float32 agreement here
    assert abs(float(hf_loss) - float(loss)) < 1e-5 * abs(float(loss)), (float(hf_loss), float(loss))

    # pick max_norm below both pre-clip norms so clipping acts at both steps
    _, probe, _, _ = train(copy.deepcopy(init), cfg, tokens, mask, float("inf"))
    max_norm = f32(0.5 * min(probe))
    grads, norms, loss2, final = train(init, cfg, tokens, mask, max_norm)
    assert min(norms) > max_norm, (norms, max_norm)

    entries = [("adamw", np.array([LR, BETA1, BETA2, EPS, WD, max_norm])),
               ("logits", logits.numpy()),
               ("loss", np.array([float(loss)])),
               ("logprob_sums", sums.numpy())]
    if c.get("rope_scaling"):  # transformers' inverse frequencies (float32), which the angles multiply
        inv_freq = fp32.model.rotary_emb.inv_freq
        assert inv_freq.dtype == torch.float32 and fp32.model.rotary_emb.attention_scaling == 1.0
        entries.append(("inv_freq", inv_freq.numpy()))
    entries += [(f"grad.{k}", v.numpy()) for k, v in grads.items()]
    entries += [("grad_norm", np.array(norms)), ("loss_step2", np.array([loss2]))]
    entries += [(f"param2.{k}", v.numpy()) for k, v in final.items()]
    xf.write_fixture(os.path.join(out, "expect.bin"), entries)
    back = xf.read_fixture(os.path.join(out, "expect.bin"))
    assert list(back) == [n for n, _ in entries]

    # the same computation in float32, to show what agreement to expect
    with torch.no_grad():
        logits32 = fp32(tokens).logits
    g32, n32, l2_32, p32 = train(fp32, cfg, tokens, mask, max_norm)
    dev = {
        "logits": float((logits32.double() - logits).abs().max()),
        "grad": max_dev(grads, {k: v.double() for k, v in g32.items()}),
        "grad_norm": max(abs(a - b) / b for a, b in zip(n32, norms)),
        "loss_step2": abs(l2_32 - loss2),
        "param2": max_dev(final, {k: v.double() for k, v in p32.items()}),
    }
    min_grad = min(float(v.abs()[v != 0].min()) for v in grads.values())
    zero_grad = sum(int((v == 0).sum()) for v in grads.values())

    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in ("model.bin", "tokens.tok", "expect.bin")}
    n_targets = int(mask[:, 1:].sum())
    print(f"{name}: seed {seed} B={B} T={T} targets={n_targets} params={xf.n_params(cfg):,}  "
          + "  ".join(f"{f} {s:,} B" for f, s in sizes.items()))
    print(f"  loss {float(loss):.10f}  loss_step2 {loss2:.10f}  grad_norm {norms[0]:.8f} {norms[1]:.8f}"
          f"  max_norm {max_norm:.8f}")
    print(f"  logprob_sums {[round(float(s), 6) for s in sums]}  masks {mask.tolist()}")
    print("  float32 run vs float64 reference, max abs diff: "
          + "  ".join(f"{k} {v:.2e}" for k, v in dev.items())
          + f"  (grad_norm relative; smallest nonzero |grad| {min_grad:.1e}, {zero_grad} exact zeros)")
    return sum(sizes.values())


def make_reward(name, spec, tmp):
    """A one-label LlamaForSequenceClassification: scores and every gradient in float64."""
    c = {k: v for k, v in spec.items() if k not in ("lengths", "pad_inside", "step")}
    c["head_type"] = 1
    lengths, V = spec["lengths"], c["vocab_size"]
    B, T, pad_id = len(lengths), max(lengths), V - 1
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = LlamaForSequenceClassification(hf_config(c, num_labels=1, pad_token_id=pad_id))
    init_weights(model, gen)
    tokens = torch.randint(0, V - 1, (B, T), generator=gen)
    for b, n in enumerate(lengths):
        tokens[b, n:] = pad_id
    if "pad_inside" in spec:
        b, t = spec["pad_inside"]
        tokens[b, t] = pad_id
    dscores = torch.randn(B, generator=gen, dtype=torch.float64)
    hf = os.path.join(tmp, "hf")
    model.save_pretrained(hf)
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    model_bin = os.path.join(out, "model.bin")
    cfg = convert(hf, model_bin)
    assert cfg.pop("dtype") == "fp32" and cfg["head_type"] == 1, cfg
    xf.write_tokens(os.path.join(out, "tokens.tok"), tokens.tolist(), [[0] * T] * B)

    ref = LlamaForSequenceClassification.from_pretrained(hf, attn_implementation="eager").double()
    assert ref.config.pad_token_id == pad_id
    scores = ref(tokens).logits[:, 0]
    (scores * dscores).sum().backward()
    grads = gather(cfg, lambda n: ref.get_parameter(n).grad.detach().clone())
    # the exported model keeps pad_token_id: transformers loads it and scores the padded batch the same
    export(model_bin, os.path.join(tmp, "export"))
    back = LlamaForSequenceClassification.from_pretrained(os.path.join(tmp, "export"), attn_implementation="eager").double()
    assert back.config.pad_token_id == pad_id
    with torch.no_grad():
        assert torch.equal(back(tokens).logits[:, 0], scores.detach()), "the exported reward model scores differently"
    # the rightmost non-pad token, as transformers finds it
    idx = [max(t for t in range(T) if tokens[b, t] != pad_id) for b in range(B)]
    entries = [("pad_id", np.array([pad_id])), ("score_idx", np.array(idx)), ("scores", scores.detach().numpy()),
               ("dscores", dscores.numpy())]
    entries += [(f"grad.{k}", v.numpy()) for k, v in grads.items()]
    if "step" in spec:
        entries += reward_step(spec["step"], cfg, hf, tokens)
    xf.write_fixture(os.path.join(out, "expect.bin"), entries)
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in ("model.bin", "tokens.tok", "expect.bin")}
    print(f"{name}: B={B} T={T} lengths {lengths} pad_id {pad_id} score_idx {idx} params={xf.n_params(cfg):,}  "
          f"scores {[round(float(x), 6) for x in scores.detach()]}  " + "  ".join(f"{f} {s:,} B" for f, s in sizes.items()))
    return sum(sizes.values())


def reward_step(step, cfg, hf, tokens):
    """One reward-model step in float64 as TRL's RewardTrainer takes it: rows 2i and 2i + 1
    are pair i's chosen and rejected answers; loss = mean(-logsigmoid(r_c - r_r - margin))
    + center * mean((r_c + r_r)^2); then clipping below the gradient norm and AdamW (decay
    on matrices only). Returns the fixture entries."""
    model = LlamaForSequenceClassification.from_pretrained(hf, attn_implementation="eager").double()
    margins = torch.tensor(step["margins"], dtype=torch.float64)
    r = model(tokens).logits[:, 0]
    rc, rr = r[0::2], r[1::2]
    loss = -F.logsigmoid(rc - rr - margins).mean() + step["center"] * ((rc + rr) ** 2).mean()
    loss.backward()
    params = list(model.parameters())
    norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in params)))
    max_norm = f32(0.5 * norm)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    adamw(params).step()
    final = gather(cfg, lambda n: model.get_parameter(n).detach().clone())
    print(f"  reward step: loss {float(loss):.10f} grad_norm {norm:.8f} max_norm {max_norm:.8f}")
    return ([("step_margins", margins.numpy()), ("step_center", np.array([step["center"]])),
             ("step_loss", np.array([float(loss)])), ("step_grad_norm", np.array([norm])),
             ("adamw", np.array([LR, BETA1, BETA2, EPS, WD, max_norm]))]
            + [(f"param1.{k}", v.numpy()) for k, v in final.items()])


def dpo_pair_losses(pc, pr, rc, rr, nc, nr, loss_type, beta, label_smoothing):
    """Per-pair DPO losses as TRL's DPOTrainer defines them (float64 tensors of n)."""
    if loss_type == "ipo":  # every log-prob sum divided by its response's token count first
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    h = (pc - pr) - (rc - rr)  # TRL's logits: pi_logratios - ref_logratios
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing


def make_dpo_loss(out_name):
    """dpo_loss: the losses and their derivatives by pc and pr, from torch's autograd, for
    float32 inputs (5 pairs; the last pair's margin is far out, so that a naive log(1 + e^x)
    overflows even in double), as a micro-batch's share of a step of 8 pairs."""
    gen = torch.Generator().manual_seed(SEED)
    n, total_pairs = 5, 8
    f = lambda t: t.float().double()  # float32 values, computed on in float64
    rc = f(-30 + 10 * torch.randn(n, generator=gen, dtype=torch.float64))
    rr = f(-30 + 10 * torch.randn(n, generator=gen, dtype=torch.float64))
    pc0 = f(rc + 3 * torch.randn(n, generator=gen, dtype=torch.float64))
    pr0 = f(rr + 3 * torch.randn(n, generator=gen, dtype=torch.float64))
    nc = torch.randint(1, 20, (n,), generator=gen).double()
    nr = torch.randint(1, 20, (n,), generator=gen).double()
    pc0[-1], pr0[-1] = f(torch.tensor(-5.0)), f(torch.tensor(-1900.0))  # margin ~ 1900: beta h up to ~ 950
    total_tokens = int(nc.sum()) + 23  # the step's other micro-batches hold 23 chosen tokens more
    cases = [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.1, 0.25), ("ipo", 0.1, 0.0, 0.0), ("ipo", 0.3, 0.0, 0.25)]
    entries = [("pc", pc0.numpy()), ("pr", pr0.numpy()), ("rc", rc.numpy()), ("rr", rr.numpy()), ("nc", nc.numpy()),
               ("nr", nr.numpy()), ("totals", np.array([total_pairs, total_tokens]))]
    for i, (kind, beta, eps, nll) in enumerate(cases):
        beta, eps, nll = f32(beta), f32(eps), f32(nll)  # the float32 settings the C++ side holds
        pc, pr = pc0.clone().requires_grad_(), pr0.clone().requires_grad_()
        loss = (dpo_pair_losses(pc, pr, rc, rr, nc, nr, kind, beta, eps).sum() / total_pairs
                + nll * -pc.sum() / total_tokens)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
        entries += [(f"case{i}.config", np.array([1 if kind == "ipo" else 0, beta, eps, nll])),
                    (f"case{i}.loss", np.array([loss.item()])), (f"case{i}.dpc", pc.grad.numpy()),
                    (f"case{i}.dpr", pr.grad.numpy())]
        print(f"{out_name} case {i}: {kind} beta {beta:.6g} label_smoothing {eps:.6g} nll_weight {nll:.6g}: loss {loss.item():.10f}")
    out = os.path.join(OUT, out_name)
    os.makedirs(out, exist_ok=True)
    xf.write_fixture(os.path.join(out, "expect.bin"), entries)
    return os.path.getsize(os.path.join(out, "expect.bin"))


def make_dpo_step(name, spec, tmp):
    """One DPO step in float64 as TRL's DPOTrainer takes it (loss_type "sigmoid" with
    label_smoothing, rpo_alpha = nll_weight), the reference being the initial model:
    the log-prob sums over the response tokens, the loss, clipping below the gradient norm,
    AdamW (decay on matrices only). Writes the model, the pairs as a token file and the
    reference sums, loss, gradients before clipping, norm and parameters after the step."""
    c = {k: v for k, v in spec.items() if k not in ("pairs", "beta", "label_smoothing", "nll_weight")}
    c["head_type"] = 0
    V = c["vocab_size"]
    beta, eps, nll = f32(spec["beta"]), f32(spec["label_smoothing"]), f32(spec["nll_weight"])
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(hf_config(c))
    init_weights(model, gen)
    seqs, masks = [], []
    for p, a, b in spec["pairs"]:
        prompt = torch.randint(0, V, (p,), generator=gen).tolist()
        for n in (a, b):  # chosen, then rejected: the same prompt, each its own response
            seqs.append(prompt + torch.randint(0, V, (n,), generator=gen).tolist())
            masks.append([0] * p + [1] * n)
    B, T = len(seqs), max(len(s) for s in seqs)
    tokens = torch.zeros(B, T, dtype=torch.long)  # right-padded with 0 under mask 0, as tokens_fill_batch
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        tokens[i, :len(s)] = torch.tensor(s)
        mask[i, :len(m)] = torch.tensor(m)
    hf = os.path.join(tmp, "hf")
    model.save_pretrained(hf)
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    cfg = convert(hf, os.path.join(out, "model.bin"))
    assert cfg.pop("dtype") == "fp32" and cfg["head_type"] == 0, cfg
    xf.write_tokens(os.path.join(out, "tokens.tok"), seqs, masks)

    ref = LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").double()
    with torch.no_grad():
        _, ref_sums = masked_loss(ref(tokens).logits, tokens, mask)
    policy = LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").double()
    _, sums = masked_loss(policy(tokens).logits, tokens, mask)
    counts = mask[:, 1:].sum(1).double()
    pc, pr, rc, rr = sums[0::2], sums[1::2], ref_sums[0::2], ref_sums[1::2]
    chosen_tokens = int(counts[0::2].sum())
    losses = dpo_pair_losses(pc, pr, rc, rr, counts[0::2], counts[1::2], "sigmoid", beta, eps)
    loss = losses.mean() + nll * -pc.sum() / chosen_tokens  # TRL: losses + rpo_alpha * nll_loss, then the mean
    loss.backward()
    grads = gather(cfg, lambda n: policy.get_parameter(n).grad.detach().clone())
    params = list(policy.parameters())
    norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in params)))
    max_norm = f32(0.5 * norm)
    min_grad = min(float(p.grad.abs()[p.grad != 0].min()) for p in params)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    adamw(params).step()
    final = gather(cfg, lambda n: policy.get_parameter(n).detach().clone())
    entries = [("dpo", np.array([beta, eps, nll])), ("ref_sums", ref_sums.numpy()), ("loss", np.array([loss.item()])),
               ("grad_norm", np.array([norm])), ("adamw", np.array([LR, BETA1, BETA2, EPS, WD, max_norm]))]
    entries += [(f"grad.{k}", v.numpy()) for k, v in grads.items()]
    entries += [(f"param1.{k}", v.numpy()) for k, v in final.items()]
    xf.write_fixture(os.path.join(out, "expect.bin"), entries)
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in ("model.bin", "tokens.tok", "expect.bin")}
    print(f"{name}: B={B} T={T} pairs {spec['pairs']} chosen tokens {chosen_tokens} params={xf.n_params(cfg):,}  "
          f"ref sums {[round(float(x), 6) for x in ref_sums]}  loss {loss.item():.10f} grad_norm {norm:.8f} "
          f"max_norm {max_norm:.8f} smallest nonzero |grad| {min_grad:.1e}  " + "  ".join(f"{f} {s:,} B" for f, s in sizes.items()))
    return sum(sizes.values())


def greedy_path(model, prompt, max_new):
    """Greedy tokens after prompt (no EOS) and the smallest top-1 minus top-2 logit gap."""
    ids, gaps = prompt.clone(), []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(ids[None]).logits[0, -1]
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            ids = torch.cat([ids, logits.argmax()[None]])
    return ids[len(prompt):].tolist(), min(gaps)


def make_generate(name, spec, tmp):
    """transformers' greedy generate, token for token, on a converted model."""
    c = {k: v for k, v in spec.items() if k not in ("lengths", "max_new", "eos_step")}
    c["head_type"] = 0
    V, max_new = c["vocab_size"], spec["max_new"]
    for seed in range(SEED, SEED + 100):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config(c))
        init_weights(model, gen)
        prompts = [torch.randint(0, V, (n,), generator=gen) for n in spec["lengths"]]
        ref = copy.deepcopy(model).double()
        paths = [greedy_path(ref, p, max_new) for p in prompts]
        eos = paths[0][0][spec["eos_step"]]
        if eos in paths[0][0][:spec["eos_step"]]:
            continue
        if min(g for _, g in paths) > 1e-2:
            break
    else:
        raise RuntimeError("no seed gave greedy paths with clear choices")
    model.config.eos_token_id = eos
    hf = os.path.join(tmp, "hf")
    model.save_pretrained(hf)
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    cfg = convert(hf, os.path.join(out, "model.bin"))
    assert cfg.pop("dtype") == "fp32" and cfg["eos_token_id"] == eos, cfg
    ref = LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").double()
    entries = [("eos_id", np.array([eos])), ("max_new", np.array([max_new])), ("min_gap", np.array([min(g for _, g in paths)]))]
    for i, p in enumerate(prompts):
        with torch.no_grad():
            got = ref.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                               max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos, use_cache=True)[0, len(p):].tolist()
        want = paths[i][0]
        want = want[:want.index(eos) + 1] if eos in want else want  # generate stops after the EOS
        assert got == want, (i, got, want)
        entries += [(f"prompt.{i}", p.numpy()), (f"generated.{i}", np.array(got))]
    xf.write_fixture(os.path.join(out, "expect.bin"), entries)
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in ("model.bin", "expect.bin")}
    print(f"{name}: seed {seed} eos {eos} prompts {spec['lengths']} generated {[len(e[1]) for e in entries[4::2]]} "
          f"min top-2 gap {min(g for _, g in paths):.4f}  " + "  ".join(f"{f} {s:,} B" for f, s in sizes.items()))
    return sum(sizes.values())


def main():
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    total = 0
    only = sys.argv[1:]  # names of fixtures to make (default: all)
    for name, spec in FIXTURES.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            total += make(name, spec, tmp)
    for name, spec in REWARD_FIXTURES.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            total += make_reward(name, spec, tmp)
    if not only or "dpo_loss" in only:
        total += make_dpo_loss("dpo_loss")
    if not only or "rope_inv_freq" in only:
        total += make_rope_inv_freq("rope_inv_freq")
    for name, spec in DPO_FIXTURES.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            total += make_dpo_step(name, spec, tmp)
    for name, spec in GENERATE_FIXTURES.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            total += make_generate(name, spec, tmp)
    with tempfile.TemporaryDirectory() as tmp:
        check_reward_round_trip({**FIXTURES["gqa_untied"], "head_type": 1}, tmp)
        check_rope_conversion(tmp)
    print(f"round trips ok (fp32, bf16, reward head); fixtures total {total:,} bytes in {OUT}")


if __name__ == "__main__":
    sys.exit(main())
