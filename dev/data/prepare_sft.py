"""Turn chat conversations (JSONL) into an xwin.cu token file (.tok) for SFT.

    python dev/data/prepare_sft.py IN.jsonl OUT.tok --tokenizer byte [--max-len 256]
    python dev/data/prepare_sft.py IN.jsonl OUT.tok --hf HF_FOLDER   [--max-len 4096]

Each input line is {"messages": [{"role": ..., "content": ...}, ...]}: an
optional first "system" message, then "user" and "assistant" messages taking
turns, starting with user and ending with assistant (IN may be gzipped, .gz).

BAD LINES: each is reported as "IN:LINE: problem" (not JSON, not UTF-8, a lone
surrogate, no or an empty message list, an unknown role, a missing content, roles
out of turn). Without --skip-bad any bad line is an error and nothing is written;
with --skip-bad the bad lines are left out and counted.

TEMPLATE (--template vicuna_v1.1|llama3|chatml, defined in dev/chat_templates.py,
the same data dev/export_tokenizer.py records in the tokenizer file for llm.cu): without
--template, the one that matches the --hf folder's chat template (no match: an error
naming --template), Vicuna v1.1 when the folder has none and for --tokenizer byte.
Llama 3 and ChatML are rendered as transformers' apply_chat_template renders their
Jinja templates, and the whole string is tokenized at once without added special
tokens (apply_chat_template(tokenize=True)'s ids); the loss mask is 1 on the tokens
that overlap an assistant content or its end-of-turn token (<|eot_id|>, <|im_end|>),
0 on ChatML's "\n" after it and everywhere else.

The default, Xwin-LM / Vicuna v1.1 (FastChat "vicuna_v1.1": sep " ", sep2 "</s>",
roles "USER" and "ASSISTANT"):

    <s>{system} USER: {user} ASSISTANT: {assistant}</s>USER: {user} ASSISTANT: {assistant}</s>...

{system} is the system message, or when there is none the default line
    A chat between a curious user and an artificial intelligence assistant. The
    assistant gives helpful, detailed, and polite answers to the user's questions.
<s> is the BOS token and every </s> is the EOS token (never the four characters).
To generate the next assistant turn, a prompt ends with "... USER: {user} ASSISTANT:"
followed by whatever the template puts before the first target token: with the
byte tokenizer that is the space, so the byte-level prompt ends with "ASSISTANT: ".

LOSS MASK: 1 exactly on the tokens of every assistant message's content and
on the EOS that closes it; 0 on BOS, the system line, "USER: ", the user text,
" ASSISTANT: " (including the space after the colon). With a Hugging Face
tokenizer the whole conversation string (with the tokenizer's EOS text in place
of </s>) is tokenized at once, without added special tokens, BOS is put in front,
and a token gets mask 1 when its character span overlaps an assistant content or
its EOS: the rule of transformers' apply_chat_template(...,
return_assistant_tokens_mask=True). So the ids are what the full string gives,
and a token that straddles the template and the answer (SentencePiece's "▁The"
after "ASSISTANT:") is a target. The tokenizer must be a fast one (offsets) and
must turn the EOS text into the EOS id; a message containing that text is refused.

LONG CONVERSATIONS (longer than --max-len tokens): whole user/assistant turn
pairs are dropped from the end until it fits; a conversation whose first pair
does not fit is dropped. The counts are printed.

Byte tokenizer (--tokenizer byte): ids 0..255 are the UTF-8 bytes, BOS 256, EOS
257 (pad 258 unused), as dev/export_tokenizer.py --byte-level writes it.
"""

import argparse
import gzip
import json
import os
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import chat_templates  # noqa: E402

DEFAULT_SYSTEM = chat_templates.VICUNA_DEFAULT_SYSTEM
SEP = " "
EOS_TEXT = "</s>"
BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258
BYTE_SPECIALS = {"<s>": BYTE_BOS, "</s>": BYTE_EOS, "<pad>": BYTE_PAD}


class PrepareError(ValueError):
    pass


ROLES = ("system", "user", "assistant")


def check_messages(messages):
    """(system or None, [(user, assistant), ...]) of a message list; raises PrepareError."""
    if messages is None:
        raise PrepareError("no 'messages' list")
    if not isinstance(messages, list):
        raise PrepareError("'messages' is not a list")
    if not messages:
        raise PrepareError("empty conversation ('messages' is [])")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise PrepareError(f"message {i} is not an object")
        if m.get("role") not in ROLES:
            raise PrepareError(f"message {i} has an unknown role {m.get('role')!r} (system, user or assistant)")
        if not isinstance(m.get("content"), str):
            raise PrepareError(f"message {i} ({m['role']}) has no string 'content'")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            bad = m["content"][e.start]
            raise PrepareError(f"message {i} ({m['role']}) holds a lone surrogate \\u{ord(bad):04x}: not valid Unicode")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    if not roles or len(roles) % 2 or roles != ["user", "assistant"] * (len(roles) // 2):
        raise PrepareError(f"roles must be [system,] user, assistant, user, assistant, ... ending with "
                           f"assistant; got {roles}")
    pairs = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]
    return system, pairs


def render(system, pairs, eos_text=EOS_TEXT):
    """(text, spans) with Vicuna v1.1: the template string after BOS and the character
    spans [start, end) of each assistant content together with its EOS text."""
    t = chat_templates.resolve("vicuna_v1.1", "<s>", eos_text)
    text, spans = chat_templates.render(t, system, pairs)
    n = len(t["begin"])
    return text[n:], [(a - n, b - n) for a, b in spans]


def prompt_text(system, pairs, user):
    """The string (after BOS) to generate the answer to a new user turn: the
    template up to and including "ASSISTANT:" (add the space for the byte tokenizer)."""
    t = chat_templates.resolve("vicuna_v1.1", "<s>", EOS_TEXT)
    return chat_templates.render_prompt(t, system, pairs, user)[len(t["begin"]):]


class ByteEncoder:
    """Encodes with the byte-level tokenizer: each template's "<s>", "</s>", "<pad>" is its
    control id, every other byte its own id."""

    def __init__(self, template=None):
        self.t, self.how = chat_templates.choose(None, template, "<s>", "</s>", "the byte tokenizer")
        for piece in chat_templates.special_tokens(self.t):
            if piece not in BYTE_SPECIALS:
                raise PrepareError(f"chat template {self.t['name']} writes {piece}, which the byte tokenizer "
                                   "lacks (it has <s>, </s>, <pad>)")

    def __call__(self, system, pairs):
        ids, mask = [], []
        for text, from_template, target in chat_templates.segments(self.t, system, pairs):
            i = 0
            while i < len(text):
                special = next((p for p in BYTE_SPECIALS if from_template and text.startswith(p, i)), None)
                if special:
                    ids.append(BYTE_SPECIALS[special])
                    mask.append(int(target))
                    i += len(special)
                    continue
                b = text[i].encode("utf-8")
                ids.extend(b)
                mask.extend([int(target)] * len(b))
                i += 1
        return ids, mask


def encode_byte(system, pairs):
    """(ids, mask) with the byte-level tokenizer and Vicuna v1.1."""
    return ByteEncoder()(system, pairs)


class HFEncoder:
    """Encodes with a Hugging Face (fast) tokenizer from a folder, and the chat template
    given by name, else the one matching the folder's, else Vicuna v1.1."""

    def __init__(self, folder, template=None):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(folder)
        if not self.tok.is_fast:
            raise PrepareError(f"{folder}: need a fast tokenizer (tokenizer.json) for the offsets")
        self.bos, self.eos = self.tok.bos_token_id, self.tok.eos_token_id
        self.eos_text = self.tok.eos_token
        try:
            self.t, self.how = chat_templates.choose(chat_templates.folder_source(folder), template,
                                                     self.tok.bos_token, self.eos_text, folder)
        except chat_templates.TemplateError as e:
            raise PrepareError(str(e))
        vocab = self.tok.get_vocab()
        for piece in chat_templates.special_tokens(self.t):
            if piece not in vocab:
                raise PrepareError(f"{folder}: chat template {self.t['name']} writes {piece}, which is not a "
                                   "token of this tokenizer")
        self.end_text = self.t["assistant_end"]
        self.end = vocab.get(self.end_text)
        # Vicuna as it always was: BOS put in front by id, the rest tokenized at once
        self.bos_in_front = self.t["name"] == "vicuna_v1.1"
        if self.bos_in_front and (self.bos is None or self.eos is None):
            raise PrepareError(f"{folder}: the tokenizer has no BOS or EOS token")

    def __call__(self, system, pairs):
        for s in ([] if system is None else [system]) + [x for p in pairs for x in p]:
            if self.end_text in s:
                raise PrepareError(f"a message contains the end-of-turn text {self.end_text!r}")
        text, spans = chat_templates.render(self.t, system, pairs)
        lead = self.t["begin"] if self.bos_in_front else ""
        text, spans = text[len(lead):], [(a - len(lead), b - len(lead)) for a, b in spans]
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        at = {tuple(o): i for i, o in enumerate(offsets)}
        for _, e in spans:
            i = at.get((e - len(self.end_text), e))
            if i is None or self.end is None or ids[i] != self.end:
                raise PrepareError(f"the tokenizer did not turn {self.end_text!r} into one token "
                                   "at the end of every assistant message")
        mask, k = [], 0
        for start, end in offsets:  # spans and offsets are both in order
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            mask.append(1 if k < len(spans) and end > spans[k][0] else 0)
        if self.bos_in_front:
            return [self.bos] + ids, [0] + mask
        return ids, mask


def fit(encode, system, pairs, max_len):
    """(ids, mask, n_pairs_kept): the longest prefix of whole turn pairs that
    fits in max_len tokens; n_pairs_kept = 0 if not even the first pair fits."""
    for n in range(len(pairs), 0, -1):
        ids, mask = encode(system, pairs[:n])
        if len(ids) <= max_len:
            return ids, mask, n
    return None, None, 0


def read_jsonl(path):
    """Yields (lineno, object, None) per non-blank line, or (lineno, None, problem)
    for a line that is not UTF-8 or not JSON."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
                    continue
                if line.strip():
                    try:
                        yield lineno, json.loads(line), None
                    except json.JSONDecodeError as e:
                        yield lineno, None, f"not JSON: {e}"
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise PrepareError(f"{path}: not a readable gzip file: {e}")


def good_lines(in_path, parse, stats, skip_bad):
    """parse(obj) of every line of in_path that is JSON and that parse accepts. Each bad
    line is reported on stderr as IN:LINE: problem and counted in stats["bad"]; the
    caller refuses to write anything when there are some, unless skip_bad."""
    for lineno, obj, problem in read_jsonl(in_path):
        stats["read"] += 1
        if problem is None:
            try:
                yield parse(obj)
                continue
            except PrepareError as e:
                problem = str(e)
        stats["bad"] += 1
        print(f"{in_path}:{lineno}: {problem}{' (skipped)' if skip_bad else ''}", file=sys.stderr)


def prepare(in_path, out_path, encode, max_len, quiet=False, skip_bad=False):
    """Encodes every conversation of in_path and writes out_path; returns a dict
    of counts. Each bad line is reported on stderr as IN:LINE: problem; unless
    skip_bad, any bad line raises PrepareError once all are reported."""
    import xwin_format as xf
    seqs, masks = [], []
    stats = {"read": 0, "whole": 0, "truncated": 0, "dropped": 0, "pairs_dropped": 0, "bad": 0}

    def parse(obj):
        if not isinstance(obj, dict):
            raise PrepareError("not a JSON object")
        system, pairs = check_messages(obj.get("messages"))
        return pairs, fit(encode, system, pairs, max_len)

    for pairs, (ids, mask, kept) in good_lines(in_path, parse, stats, skip_bad):
        if kept == 0:
            stats["dropped"] += 1
            continue
        stats["whole" if kept == len(pairs) else "truncated"] += 1
        stats["pairs_dropped"] += len(pairs) - kept
        seqs.append(ids)
        masks.append(mask)
    if stats["bad"] and not skip_bad:
        raise PrepareError(f"{in_path}: {stats['bad']} bad line(s), reported above; nothing written "
                           "(--skip-bad leaves them out)")
    if not seqs:
        raise PrepareError(f"{in_path}: no conversation fits in {max_len} tokens")
    xf.write_tokens(out_path, seqs, masks)
    lengths = [len(s) for s in seqs]
    stats.update(sequences=len(seqs), tokens=sum(lengths), targets=sum(sum(m) for m in masks),
                 max_len=max(lengths), mean_len=sum(lengths) / len(lengths), bytes=os.path.getsize(out_path))
    if not quiet:
        print(f"{in_path}: {stats['read']} conversations: {stats['whole']} whole, {stats['truncated']} "
              f"truncated to whole turns that fit in {max_len} tokens ({stats['pairs_dropped']} turn pairs "
              f"removed), {stats['dropped']} dropped (first turn pair longer than {max_len})"
              + (f", {stats['bad']} bad lines skipped" if stats["bad"] else ""))
        print(f"wrote {out_path}: {stats['sequences']} sequences, {stats['tokens']} tokens "
              f"({stats['targets']} targets), length mean {stats['mean_len']:.1f} max {stats['max_len']}, "
              f"{stats['bytes']:,} bytes")
    return stats


def run_cli(prog, description, prepare_fn, argv, max_len_help):
    """The command line both prepare_sft.py and prepare_pairs.py have: IN OUT, a tokenizer,
    --max-len, --skip-bad; an error is one line "prog: error: ..." and exit code 1."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("input")
    ap.add_argument("output")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokenizer", choices=["byte"], help="the byte-level tokenizer")
    g.add_argument("--hf", metavar="FOLDER", help="a Hugging Face tokenizer folder (fast tokenizer)")
    ap.add_argument("--template", metavar="|".join(chat_templates.TEMPLATES),
                    help="the chat template (default: the one matching the --hf folder's chat template; "
                         "vicuna_v1.1, Xwin-LM's, when it has none, and for --tokenizer byte)")
    ap.add_argument("--max-len", type=int, default=256, help=max_len_help)
    ap.add_argument("--skip-bad", action="store_true",
                    help="leave out bad lines (each reported as IN:LINE: problem) and count them")
    args = ap.parse_args(argv)
    if args.max_len < 2:
        ap.error("--max-len must be at least 2")
    try:
        encode = ByteEncoder(args.template) if args.tokenizer == "byte" else HFEncoder(args.hf, args.template)
        prepare_fn(args.input, args.output, encode, args.max_len, skip_bad=args.skip_bad)
    except (PrepareError, chat_templates.TemplateError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    return run_cli("prepare_sft", "Chat JSONL -> .tok with a chat template and its loss mask.", prepare, argv,
                   "longest sequence in tokens; longer conversations lose whole turns (default 256)")


if __name__ == "__main__":
    sys.exit(main())
