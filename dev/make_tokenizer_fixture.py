"""Build the tokenizer test fixture: test/fixtures/tokenizer/{bpe.tokenizer,cases.txt}.

Usage:
    python dev/make_tokenizer_fixture.py [--out test/fixtures/tokenizer]

Trains a small SentencePiece BPE model configured like Llama 2's tokenizer
(model_type=bpe, byte_fallback, split_digits, add_dummy_prefix,
remove_extra_whitespaces=False, normalization_rule_name=identity,
allow_whitespace_only_pieces) on a synthetic multilingual corpus written by
this script (English, accented Latin, CJK, emoji, code with tabs and
indentation), exports it with dev/export_tokenizer.py, and records what
sentencepiece itself returns for a set of test strings, so that the C++
tokenizer can be checked against it without sentencepiece installed.

cases.txt is line based; '#' lines are comments; fields are separated by one
space and are never empty ("-" stands for an empty value):
    E <text> <ids> <decoded>   encode case: sp.encode(text) == ids and
                               sp.decode(ids) == decoded
    D <ids> <decoded>          decode-only case: sp.decode(ids) == decoded
<text> and <decoded> are lowercase hex of the UTF-8 bytes (text may be
invalid UTF-8 on purpose); <ids> is a comma-separated list of token ids.
"""

import argparse
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import export_tokenizer  # noqa: E402

VOCAB_SIZE = 800
SEED = 1234

ENGLISH = ("the quick brown fox jumps over lazy dog and then runs away from "
           "a little cat that was sleeping in the warm sun while people walked "
           "by talking about weather news music books science history model "
           "training data tokenizer language every morning she reads quietly "
           "before work because it helps her think clearly about problems").split()
ACCENTED = ("café naïve résumé déjà vu façade élève où été garçon Straße "
            "Übermäßig größer schön Mädchen mañana niño señor corazón canción "
            "pequeño año São João coração ação Zürich Åland øre smörgåsbord").split()
CJK = ["日本語", "東京", "大学", "学生", "先生", "今日", "天気", "中文", "测试",
       "你好", "世界", "我们", "学习", "语言", "模型", "ひらがな", "カタカナ",
       "こんにちは", "ありがとう", "한국어", "안녕하세요", "감사합니다"]
EMOJI = ["😀", "🎉", "👍", "🚀", "❤️", "🔥", "😂", "🙏"]
CODE = [
    "def main(argv):",
    "    return 0",
    "\tif (x > 0) {",
    "\t\ty = x * 2;",
    "\t}",
    "for (int i = 0; i < n; ++i) {",
    "        total += values[i];  // accumulate",
    "#include <stdio.h>",
    "print(f\"value: {value!r}\")",
    "    if not ok:",
    "        raise ValueError('bad input')",
    "x = [1, 2, 3]  # list",
]


def make_corpus(rng, lines=6000):
    out = []
    for _ in range(lines):
        r = rng.random()
        if r < 0.40:
            words = [rng.choice(ENGLISH) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.3:
                words.insert(rng.randint(0, len(words)), str(rng.randint(0, 99999)))
            s = " ".join(words)
            s = s[0].upper() + s[1:] + rng.choice([".", "!", "?", ",", ""])
        elif r < 0.55:
            s = " ".join(rng.choice(ACCENTED + ENGLISH) for _ in range(rng.randint(3, 10)))
        elif r < 0.70:
            s = "".join(rng.choice(CJK) for _ in range(rng.randint(2, 8)))
            if rng.random() < 0.5:
                s += rng.choice(["。", "、", "！", "？"])
        elif r < 0.78:
            s = " ".join(rng.choice(ENGLISH) for _ in range(rng.randint(2, 6)))
            s += " " + "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 3)))
        else:
            s = rng.choice(CODE)
        if rng.random() < 0.05:
            s = s + "  "  # some trailing whitespace
        out.append(s)
    return out


def train(corpus_lines, model_prefix):
    import sentencepiece as spm
    path = model_prefix + ".corpus.txt"
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(corpus_lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=path,
        model_prefix=model_prefix,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    return model_prefix + ".model"


FIXED_CASES = [
    "",
    "Hello world",
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "multiple   spaces   inside",
    " ",
    "  ",
    "     ",
    "\n",
    "line one\nline two\n",
    "\n\nstarts with newlines",
    "windows\r\nline end",
    "tab\tseparated\tvalues",
    "\tindented with a tab",
    " \t \n mixed whitespace \t\n",
    "    four space indent",
    "def main(argv):\n    return 0\n",
    "\tif (x > 0) {\n\t\ty = x * 2;\n\t}\n",
    "café naïve résumé",
    "Übermäßig größer Straße",
    "日本語のテキスト",
    "中文测试，你好世界！",
    "안녕하세요 세계",
    "emoji 😀🎉 test 🚀",
    "👍🏽 family 👨‍👩‍👧 flag 🇯🇵",
    "digits 1234567890 and 3.14159",
    "year 2024, 007 agents, 1e-5",
    "Ω≈ç√∫ unseen symbols",
    "ሰላም ዓለም",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    "\x7f\x01\x02 control chars",
    "nul \x00 inside",
    "<s> literal </s> <unk> <pad>",
    "<0x41> looks like a byte piece",
    "▁ literal lower one eighth block ▁▁",
    "replacement \ufffd char",
    "a" * 60,
    "ab" * 40,
    "Mixed: café 日本語 😀 code\tx = 1\n",
]

# Invalid UTF-8 inputs (bytes); sentencepiece maps each bad byte to U+FFFD.
INVALID_UTF8_CASES = [
    b"\xff",
    b"bad \xff byte",
    b"\xc0\x80 overlong nul",
    b"\xe2\x96 truncated block",
    b"\xed\xa0\x80 surrogate",
    b"\xf4\x90\x80\x80 above max",
    b"\x80\x80 lone continuation",
    b"caf\xc3",
    b"\xf0\x9f\x98 cut emoji",
]


def random_text(rng):
    parts = []
    for _ in range(rng.randint(1, 12)):
        r = rng.random()
        if r < 0.35:
            parts.append(rng.choice(ENGLISH + ACCENTED))
        elif r < 0.45:
            parts.append(rng.choice(CJK))
        elif r < 0.5:
            parts.append(rng.choice(EMOJI))
        elif r < 0.6:
            parts.append(rng.choice([" ", "  ", "\t", "\n", " \n", "   "]))
        elif r < 0.7:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 8))))
        elif r < 0.8:
            parts.append(rng.choice(CODE))
        else:
            # random code points from assorted ranges (often unseen -> bytes)
            lo, hi = rng.choice([(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF),
                                 (0x400, 0x4FF), (0x590, 0x6FF), (0x3040, 0x30FF),
                                 (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
                                 (0x1F300, 0x1F64F), (0x1, 0x1F)])
            parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 4))))
        sep = rng.choice(["", " ", " ", " "])
        parts.append(sep)
    return "".join(parts)


def long_text(rng, n_chars):
    pieces = []
    total = 0
    while total < n_chars:
        s = random_text(rng)
        pieces.append(s)
        total += len(s)
    return "".join(pieces)[:n_chars]


def hexs(b):
    return b.hex() if b else "-"


def ids_field(ids):
    return ",".join(str(i) for i in ids) if ids else "-"


def build_cases(sp, rng):
    lines = []

    def encode_case(text):
        ids = sp.encode(text)
        decoded = sp.decode(ids)
        raw = text if isinstance(text, bytes) else text.encode("utf-8")
        lines.append(f"E {hexs(raw)} {ids_field(ids)} {hexs(decoded.encode('utf-8'))}")

    for t in FIXED_CASES:
        encode_case(t)
    for b in INVALID_UTF8_CASES:
        encode_case(b)
    for _ in range(200):
        encode_case(random_text(rng))
    encode_case(long_text(rng, 10000))

    def decode_case(ids):
        decoded = sp.decode(ids)
        lines.append(f"D {ids_field(ids)} {hexs(decoded.encode('utf-8'))}")

    n = sp.get_piece_size()
    bos, eos, unk = sp.bos_id(), sp.eos_id(), sp.unk_id()
    byte = lambda b: sp.piece_to_id("<0x%02X>" % b)  # noqa: E731
    ws = sp.piece_to_id("\u2581")
    word = sp.encode("hello")
    fixed_decodes = [
        [],
        [bos],
        [bos] + word,
        [bos, bos] + word + [eos],
        [ws] + word,
        [ws, ws] + word,
        [bos, ws] + word,
        [unk],
        [unk] + word,
        word + [unk] + word,
        [byte(0x20)] + word,
        [byte(0x0A)] + word,
        [byte(0xE2), byte(0x96), byte(0x81)] + word,
        [byte(0xE2), byte(0x96)],
        [byte(0xE2), eos, byte(0x96), byte(0x81)],
        [byte(0xFF), byte(0x41), byte(0xC3), byte(0xA9)],
        [byte(0xF0), byte(0x9F), byte(0x98), byte(0x80), byte(0xF0)],
        [byte(0x00), byte(0x7F)],
        [eos] + word,
    ]
    for ids in fixed_decodes:
        decode_case(ids)
    special = [bos, eos, unk, ws] + [byte(b) for b in (0x20, 0x0A, 0xE2, 0x96, 0x81, 0xC3, 0xFF)]
    for _ in range(150):
        ids = []
        for _ in range(rng.randint(0, 16)):
            ids.append(rng.choice(special) if rng.random() < 0.4 else rng.randrange(n))
        decode_case(ids)
    return lines


def main(argv=None):
    import sentencepiece as spm
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "test", "fixtures", "tokenizer"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        model = train(make_corpus(rng), os.path.join(tmp, "bpe"))
        tok_path = os.path.join(args.out, "bpe.tokenizer")
        info = export_tokenizer.export_sentencepiece(model, tok_path)
        sp = spm.SentencePieceProcessor(model_file=model)
        lines = build_cases(sp, random.Random(SEED + 1))
    header = [
        "# Tokenizer test cases recorded from sentencepiece "
        f"{spm.__version__} by dev/make_tokenizer_fixture.py; do not edit.",
        "# E <text hex> <ids> <sp.decode(ids) hex> | D <ids> <sp.decode(ids) hex>; '-' = empty",
    ]
    cases_path = os.path.join(args.out, "cases.txt")
    with open(cases_path, "w", encoding="ascii") as f:
        f.write("\n".join(header + lines) + "\n")
    print(f"wrote {tok_path} ({info['bytes']} bytes, vocab {info['vocab_size']})")
    print(f"wrote {cases_path} ({os.path.getsize(cases_path)} bytes, {len(lines)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
