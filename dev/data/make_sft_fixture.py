"""Make the loss-mask fixture test/fixtures/sft_mask/ (an independent check of
dev/data/prepare_sft.py and of the masked loss of llm.cu).

    python dev/data/make_sft_fixture.py [--out test/fixtures/sft_mask]

Writes
    chats.jsonl  three conversations: a two-turn one with a system message, one
                 without (so the default Vicuna system line), and a three-turn one
                 with non-ASCII text (an answer ends in a two-byte character)
    sft.tok      prepare_sft.py's output for chats.jsonl (byte tokenizer)
    model.bin    a tiny random LlamaForCausalLM (vocab 259), by dev/convert_hf.py
    expect.bin   tokens, mask, lengths (the sequences laid end to end), loss,
                 logprob_sums
The expected tokens and mask do not come from prepare_sft.py: they come from a
Hugging Face chat template written here in Jinja, with {% generation %} around
each assistant content and its </s>, applied by transformers'
apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)
over a `tokenizers` byte-level tokenizer whose ids are the byte values, with
<s> = 256, </s> = 257, <pad> = 258 as special tokens. The script stops if
prepare_sft.py disagrees (also through its --hf path on that tokenizer). The loss
is the masked mean cross-entropy of the model in float64 PyTorch with labels =
-100 outside the template's mask, summed over the three sequences run one at a
time, divided by the number of targets.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import xwin_format as xf  # noqa: E402
import prepare_sft  # noqa: E402
from convert_hf import convert  # noqa: E402
from export_tokenizer import byte_level_alphabet  # noqa: E402

SEED = 4321

CHATS = [
    [{"role": "system", "content": "Solve the task."},
     {"role": "user", "content": "Add 12 and 7."},
     {"role": "assistant", "content": "The answer is 19."},
     {"role": "user", "content": "Now double it."},
     {"role": "assistant", "content": "The answer is 38."}],
    [{"role": "user", "content": "Reverse the word 'cat'."},
     {"role": "assistant", "content": "The answer is tac."}],
    [{"role": "system", "content": "Réponds en une ligne."},
     {"role": "user", "content": "Un mot pour « café » ?"},
     {"role": "assistant", "content": "Espresso, ou crème: très bon."},
     {"role": "user", "content": "Et en anglais?"},
     {"role": "assistant", "content": "Coffee  (two spaces,\ta tab)."},
     {"role": "user", "content": "USER: ASSISTANT: ?"},
     {"role": "assistant", "content": "Ça va, c'est noté"}],
]

# Vicuna v1.1 as FastChat builds it: system + " ", then "USER: " + message + " "
# and "ASSISTANT: " + message + "</s>"; the default system line when none is given.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set system = \"A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\" %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{{ system + ' ' }}"
    "{% for m in loop_messages %}"
    "{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}{% generation %}{{ m['content'] + '</s>' }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)


def byte_tokenizer():
    """A transformers fast tokenizer equal to our byte-level one."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in byte_level_alphabet().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>", "<pad>")])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    assert [hf.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>")] == [256, 257, 258]
    # ids are the UTF-8 bytes: every byte value that UTF-8 text can hold occurs here
    # (0..127, continuation bytes 128..191, lead bytes 194..244)
    text = "".join(chr(c) for c in range(128)) + "".join(chr(c) for c in range(0x80, 0x800, 3)) + \
        "".join(chr(c << 12 | 0x800) for c in range(16) if c != 0xD) + "\ud000" + \
        "".join(chr(max(c << 18, 0x10000)) for c in range(5))
    assert hf(text, add_special_tokens=False)["input_ids"] == list(text.encode())
    sample = "héllo </s>\x00\xff wörld"
    assert hf(sample, add_special_tokens=False)["input_ids"] == \
        list("héllo ".encode()) + [257] + list("\x00\xff wörld".encode())
    return hf


def template_encode(hf, messages):
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def tiny_llama(out_dir, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab, intermediate_size=96, max_position_embeddings=256,
                      tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
                      hidden_act="silu", attn_implementation="eager")
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # larger weights than the default init, so the loss is far from log(V)
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if p.ndim == 1 else 0.12 * noise)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "test", "fixtures", "sft_mask"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, name)  # noqa: E731

    with open(out("chats.jsonl"), "w", encoding="utf-8") as f:
        for m in CHATS:
            f.write(json.dumps({"messages": m}, ensure_ascii=False) + "\n")
    prepare_sft.prepare(out("chats.jsonl"), out("sft.tok"), prepare_sft.encode_byte, max_len=256, quiet=True)
    ours_ids, ours_mask = xf.read_tokens(out("sft.tok"))

    hf = byte_tokenizer()
    ref = [template_encode(hf, m) for m in CHATS]
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        hf_enc = prepare_sft.HFEncoder(tmp)
        for m, (ids, mask) in zip(CHATS, ref):
            assert hf_enc(*prepare_sft.check_messages(m)) == (ids, mask), "prepare_sft --hf disagrees"
    for i, ((ids, mask), a, b) in enumerate(zip(ref, ours_ids, ours_mask)):
        if list(a) != ids or list(b) != mask:
            raise SystemExit(f"conversation {i}: prepare_sft.py and the chat template disagree")

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_llama(tmp, 259)
        cfg = convert(tmp, out("model.bin"), "fp32")
    model = model.to(torch.float64).eval()
    total, count, sums = 0.0, 0, []
    with torch.no_grad():
        for ids, mask in ref:
            x = torch.tensor([ids])
            labels = torch.where(torch.tensor([mask]) == 1, x, torch.full_like(x, -100))
            logits = model(input_ids=x).logits[0, :-1]
            target = labels[0, 1:]
            nll = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
            total += nll.item()
            count += int((target != -100).sum())
            sums.append(-nll.item())
            # transformers' own loss (it casts the logits to float32) agrees
            hf_loss = model(input_ids=x, labels=labels).loss.item()
            ours = nll.item() / int((target != -100).sum())
            assert abs(hf_loss - ours) < 1e-5 * ours, (hf_loss, ours)
    loss = total / count
    flat_ids = np.concatenate([np.array(i) for i, _ in ref])
    flat_mask = np.concatenate([np.array(m) for _, m in ref])
    xf.write_fixture(out("expect.bin"), [
        ("tokens", flat_ids.astype(np.float32)),
        ("mask", flat_mask.astype(np.float32)),
        ("lengths", np.array([len(i) for i, _ in ref], dtype=np.float32)),
        ("loss", np.array([loss])),
        ("logprob_sums", np.array(sums)),
    ])
    print(f"wrote {args.out}: {len(ref)} conversations, lengths {[len(i) for i, _ in ref]}, "
          f"{count} targets, loss {loss:.8f} (model: {xf.n_params(cfg):,} params)")
    for name in sorted(os.listdir(args.out)):
        print(f"  {name:12s} {os.path.getsize(out(name)):>8,d} bytes")


if __name__ == "__main__":
    main()
