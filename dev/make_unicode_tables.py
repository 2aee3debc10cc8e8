"""Write the Unicode tables of llm.cu's byte-level BPE pre-tokenizer.

Usage:
    python dev/make_unicode_tables.py [--check]

The pre-tokenizer regexes of GPT-2 and Llama 3 use three character classes: \\p{L}
(general categories Lu Ll Lt Lm Lo), \\p{N} (Nd Nl No) and \\s (the White_Space
property); the Digits pre-tokenizer a fourth, Rust's char::is_numeric (Nd Nl No as
well, but of the Rust standard library's Unicode version; llm.cu keeps only the code
points it adds to \\p{N}). This script computes them
as sorted ranges of code points from Python's unicodedata and rewrites the block
between the lines
"// BEGIN unicode tables" and "// END unicode tables" in llm.cu.

Python's unicodedata may follow another Unicode version than the regex engine of
the Rust `tokenizers` crate (Oniguruma) and its Rust standard library, so when the
`tokenizers` package is installed the script also asks it which code points its
regex matches for each class and which ones Digits(individual_digits=true) splits
off, prints every difference, and takes the package's answer: the tables must
match what Hugging Face tokenizers does, not a newer or older Unicode. --check
only compares and writes nothing.
"""

import argparse
import os
import sys
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
LLM_CU = os.path.join(HERE, "..", "llm.cu")
BEGIN = "// BEGIN unicode tables"
END = "// END unicode tables"

# The White_Space property (PropList.txt; unchanged since Unicode 6.3).
WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
               (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
               (0x3000, 0x3000)]


def code_points():
    return [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]


def from_unicodedata():
    letters, numbers = set(), set()
    for c in code_points():
        cat = unicodedata.category(chr(c))
        if cat[0] == "L":
            letters.add(c)
        elif cat[0] == "N":
            numbers.add(c)
    space = {c for a, b in WHITE_SPACE for c in range(a, b + 1)}
    return {"letter": letters, "number": numbers, "space": space, "numeric": set(numbers)}


def from_tokenizers():
    """The code points the tokenizers package's regex engine puts in each class."""
    try:
        from tokenizers import Regex, pre_tokenizers
    except ImportError:
        return None
    cps = code_points()
    text = "".join(chr(c) for c in cps)
    out = {}
    for name, pattern in (("letter", r"\p{L}"), ("number", r"\p{N}"), ("space", r"\s")):
        split = pre_tokenizers.Split(Regex(pattern + "+"), "isolated")
        matched = set()
        for piece, (a, b) in split.pre_tokenize_str(text):
            if len(piece) and Regex_matches_all(piece, name):
                matched.update(cps[a:b])
        out[name] = matched
    # Digits(individual_digits=true) cuts each numeric character out on its own: with
    # an "x" between all code points, the pieces of one character other than "x"
    out["numeric"] = set()
    digits = pre_tokenizers.Digits(individual_digits=True)
    for piece, _ in digits.pre_tokenize_str("x".join(chr(c) for c in cps)):
        if len(piece) == 1 and piece != "x":
            out["numeric"].add(ord(piece))
    return out


def Regex_matches_all(piece, name):
    # A piece of an isolated split is either a run of matches or a gap; ask the
    # engine again on the piece's first character to know which.
    from tokenizers import Regex, pre_tokenizers
    pattern = {"letter": r"\p{L}", "number": r"\p{N}", "space": r"\s"}[name]
    res = pre_tokenizers.Split(Regex(pattern), "removed").pre_tokenize_str(piece[0])
    return len(res) == 0


def ranges(points):
    out = []
    for c in sorted(points):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def table_text(name, rs):
    lines = [f"static const uint32_t UNICODE_{name.upper()}_RANGES[][2] = {{  // {len(rs)} ranges"]
    row = []
    for a, b in rs:
        row.append(f"{{0x{a:X}, 0x{b:X}}}")
        if len(row) == 6:
            lines.append("    " + ", ".join(row) + ",")
            row = []
    if row:
        lines.append("    " + ", ".join(row) + ",")
    lines.append("};")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--check", action="store_true", help="compare only, write nothing")
    args = ap.parse_args(argv)
    mine = from_unicodedata()
    engine = from_tokenizers()
    tables = mine
    source = f"Python unicodedata {unicodedata.unidata_version}"
    if engine is None:
        print("tokenizers is not installed: tables from unicodedata alone, unchecked")
    else:
        differ = False
        for name in mine:
            only_py = sorted(mine[name] - engine[name])
            only_engine = sorted(engine[name] - mine[name])
            if only_py or only_engine:
                differ = True
            print(f"{name}: {len(mine[name])} code points in unicodedata, {len(engine[name])} in "
                  f"tokenizers; only unicodedata {len(only_py)}, only tokenizers {len(only_engine)}"
                  + (f" (first: {['U+%04X' % c for c in (only_py + only_engine)[:8]]})"
                     if only_py or only_engine else ""))
        if differ:
            source += ", corrected to what the tokenizers package does"
        tables = engine
    if args.check:
        return 0
    # char::is_numeric is \\p{N} of a newer Unicode: only what it adds is written
    if not tables["number"] <= tables["numeric"]:
        missing = sorted(tables["number"] - tables["numeric"])
        print(f"error: \\p{{N}} has {len(missing)} code points that Digits does not split off "
              f"(first: {['U+%04X' % c for c in missing[:8]]}); llm.cu's tables assume none", file=sys.stderr)
        return 1
    tables["numeric_extra"] = tables["numeric"] - tables["number"]
    lines = [BEGIN,
             f"// Generated by dev/make_unicode_tables.py from {source}; do not edit.",
             "// Inclusive code point ranges, sorted: \\p{L}, \\p{N} and \\s of the pre-tokenizer regexes,",
             "// and the characters that the Digits pre-tokenizer (Rust's char::is_numeric) splits off",
             "// beyond \\p{N} (one range past the last code point when there are none)."]
    for name in ("letter", "number", "space", "numeric_extra"):
        lines += table_text(name, ranges(tables[name]) or [[0x110000, 0x110000]])
    lines.append(END)
    with open(LLM_CU, encoding="utf-8") as f:
        src = f.read()
    a, b = src.find(BEGIN), src.find(END)
    if a < 0 or b < a:
        print(f"error: {LLM_CU}: no '{BEGIN}' ... '{END}' block", file=sys.stderr)
        return 1
    src = src[:a] + "\n".join(lines) + src[b + len(END):]
    with open(LLM_CU, "w", encoding="utf-8") as f:
        f.write(src)
    print(f"wrote the tables into {LLM_CU}: " +
          ", ".join(f"{n} {len(ranges(tables[n]))} ranges" for n in ("letter", "number", "space", "numeric_extra")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
