"""Export a tokenizer into xwin.cu's binary tokenizer file.

Usage:
    python dev/export_tokenizer.py tokenizer.model out.tokenizer
    python dev/export_tokenizer.py path/to/hf_model_folder out.tokenizer
    python dev/export_tokenizer.py path/to/tokenizer.json out.tokenizer
    python dev/export_tokenizer.py --byte-level out.tokenizer

The first form reads a SentencePiece BPE model (Llama 2 style: byte_fallback,
add_dummy_prefix, identity normalisation) with the `sentencepiece` package.
A folder is accepted when it holds a `tokenizer.model` (Hugging Face layout,
SentencePiece), else a `tokenizer.json`: a Hugging Face byte-level BPE
(Llama 3, GPT-2, SmolLM2), read as JSON with the standard library; bos, eos and
pad then come from the folder's tokenizer_config.json when it has one.
The last form writes the fixed byte-level tokenizer (no input needed).

CHAT TEMPLATE (dev/chat_templates.py: vicuna_v1.1, llama3, chatml): `--template NAME`
records that one; without it a folder's chat template (chat_template.jinja, or
tokenizer_config.json's chat_template) is rendered with jinja2 on probe conversations
and the built-in that renders the same is recorded; one that matches none is refused
in one line naming --template. A folder without a chat template (or a bare file) gets
vicuna_v1.1, Xwin-LM's default; --byte-level records a template only when asked (its
file without one means vicuna_v1.1 too). A template that writes a special token
("<...>") the tokenizer lacks is refused. The template's strings go into the optional
section after the last record (see llm.cu, "Tokenizer").

Supported tokenizer.json (anything else is refused in one line naming what was
found): model BPE without dropout, byte_fallback, subword prefix or suffix, and
without unk_token unless every byte has a token (ignore_merges is kept);
normalizer null; decoder ByteLevel; pre_tokenizer ByteLevel(add_prefix_space=false,
use_regex=true) (the GPT-2 regex), or a Sequence of an optional
Digits(individual_digits=true) and then either that ByteLevel or Split(the GPT-2
or the Llama 3 regex, Isolated, invert=false) + ByteLevel(add_prefix_space=false,
use_regex=false); added tokens without single_word. The post-processor is
ignored: programs add bos themselves.

File format (all integers little-endian; must match tokenizer_parse in llm.cu,
where every field is documented): kinds 0 and 1 are written as version 1
(40-byte header), kind 2 as version 2:

    offset  size  field
    0       8     magic "XWINTOKN"
    8       4     u32 version: 1, or 2 for kind 2
    12      4     u32 kind: 0 = SentencePiece-style BPE, 1 = byte-level,
                  2 = byte-level BPE
    16      4     u32 vocab_size (number of token records that follow)
    20      4     i32 bos_id   (-1 = none)
    24      4     i32 eos_id   (-1 = none)
    28      4     i32 unk_id   (-1 = none)
    32      4     i32 pad_id   (-1 = none)
    36      4     u32 flags: bit 0 add_dummy_prefix, bit 1 byte_fallback (kind 0);
                  bit 2 individual_digits, bit 3 ignore_merges (kind 2)
    version 2:
    40      4     u32 pre_tokenizer: 1 = GPT-2 regex, 2 = Llama 3 regex (kind 2), else 0
    44      4     u32 n_merges
    48      4     u32 n_added
    52      12    reserved, zero
    40/64   ...   vocab_size token records, in id order:
                      f32 score (kind 2: 0)
                      u8  type: 0 normal, 1 byte (<0xNN>), 2 control, 3 unknown,
                          4 added (kind 2: a non-special added token)
                      u16 piece length in bytes (>= 1)
                      piece bytes (kind 0: UTF-8, spaces stored as U+2581 "▁";
                      kind 2: normal pieces are the raw bytes, not GPT-2's
                      printable alphabet; control and added pieces their text)
    kind 2:       n_merges x (u32 left id, u32 right id), in rank order
                  n_added x (u32 id, u32 flags: bit 0 lstrip, bit 1 rstrip,
                  bit 2 normalized), ids ascending
    optional chat template section: "CHAT", u32 flags (bit 0 trim, bit 1 the prompt
                  drops the assistant prefix's trailing space), 8 zero bytes, then ten
                  strings (u32 length + UTF-8): name, begin, default_system,
                  system_prefix, system_suffix, user_prefix, user_suffix,
                  assistant_prefix, assistant_end, after_assistant
    The file ends right after the last record (or the template section).

Byte-level tokenizer (kind 1): ids 0..255 are the bytes 0x00..0xFF (pieces
"<0x00>".."<0xFF>"), 256 = "<s>" (bos), 257 = "</s>" (eos), 258 = "<pad>" (pad);
vocab_size 259, flags 0, unk_id -1.
"""

import argparse
import json
import math
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chat_templates  # noqa: E402

MAGIC = b"XWINTOKN"
VERSION = 1
VERSION_BPE = 2
KIND_SENTENCEPIECE_BPE = 0
KIND_BYTE_LEVEL = 1
KIND_BYTE_LEVEL_BPE = 2

TYPE_NORMAL = 0
TYPE_BYTE = 1
TYPE_CONTROL = 2
TYPE_UNKNOWN = 3
TYPE_ADDED = 4

FLAG_ADD_DUMMY_PREFIX = 1 << 0
FLAG_BYTE_FALLBACK = 1 << 1
FLAG_INDIVIDUAL_DIGITS = 1 << 2
FLAG_IGNORE_MERGES = 1 << 3

PRE_GPT2 = 1
PRE_LLAMA3 = 2
ADDED_LSTRIP, ADDED_RSTRIP, ADDED_NORMALIZED = 1, 2, 4
GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

BYTE_LEVEL_BOS = 256
BYTE_LEVEL_EOS = 257
BYTE_LEVEL_PAD = 258

# SentencePiece ModelProto.SentencePiece.Type values.
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6
SP_MODEL_BPE = 2
SP_DEFAULT_UNK_SURFACE = " \u2047 "


class ExportError(Exception):
    pass


# ---------------------------------------------------------------------------
# Minimal protobuf wire-format reader (avoids a dependency on `protobuf`).
# Only what is needed to read the few spec fields of sentencepiece_model.proto.

def _read_varint(buf, pos):
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ExportError("truncated varint in model proto")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ExportError("varint too long in model proto")


def parse_proto(buf):
    """Returns {field_number: [raw values]}; varints as int, fixed32/64 as
    bytes, length-delimited as bytes."""
    fields = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ExportError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ExportError("truncated field in model proto")
        fields.setdefault(field, []).append(value)
    return fields


def _last(fields, number, default):
    values = fields.get(number)
    return values[-1] if values else default


# ---------------------------------------------------------------------------
# Writer

def byte_piece(b):
    return "<0x%02X>" % b


def template_section(t):
    """The chat template section (a dict from chat_templates.resolve)."""
    out = bytearray(b"CHAT") + struct.pack("<I", t["flags"]) + bytes(8)
    for field in chat_templates.FIELDS:
        data = t[field].encode("utf-8")
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


def write_tokenizer(path, kind, tokens, bos_id, eos_id, unk_id, pad_id, flags,
                    pre_tokenizer=0, merges=(), added=(), template=None):
    """tokens: list of (piece: str or bytes, score: float, type: int) in id order;
    kind 2 also merges [(left id, right id)] in rank order and added [(id, flags)];
    template: a resolved chat template to record, or None."""
    out = bytearray()
    out += MAGIC
    version = VERSION_BPE if kind == KIND_BYTE_LEVEL_BPE else VERSION
    out += struct.pack("<IIIiiiiI", version, kind, len(tokens), bos_id, eos_id,
                       unk_id, pad_id, flags)
    if version >= 2:
        out += struct.pack("<III", pre_tokenizer, len(merges), len(added)) + bytes(12)
    for i, (piece, score, ttype) in enumerate(tokens):
        data = piece if isinstance(piece, bytes) else piece.encode("utf-8")
        if not 1 <= len(data) <= 0xFFFF:
            raise ExportError(f"token {i}: piece length {len(data)} outside 1..65535")
        if not math.isfinite(score):
            raise ExportError(f"token {i}: score is not finite")
        out += struct.pack("<fBH", score, ttype, len(data))
        out += data
    for left, right in merges:
        out += struct.pack("<II", left, right)
    for token_id, added_flags in added:
        out += struct.pack("<II", token_id, added_flags)
    if template is not None:
        out += template_section(template)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out)
    os.replace(tmp, path)
    return len(out)


def byte_level_tokens():
    tokens = [(byte_piece(b), 0.0, TYPE_BYTE) for b in range(256)]
    tokens.append(("<s>", 0.0, TYPE_CONTROL))
    tokens.append(("</s>", 0.0, TYPE_CONTROL))
    tokens.append(("<pad>", 0.0, TYPE_CONTROL))
    return tokens


def export_byte_level(out_path, template_name=None):
    tokens = byte_level_tokens()
    assert len(tokens) == BYTE_LEVEL_PAD + 1
    template = None
    if template_name is not None:
        template = choose_template(None, tokens, BYTE_LEVEL_BOS, BYTE_LEVEL_EOS, template_name, out_path)[0]
    n = write_tokenizer(out_path, KIND_BYTE_LEVEL, tokens, BYTE_LEVEL_BOS,
                        BYTE_LEVEL_EOS, -1, BYTE_LEVEL_PAD, 0, template=template)
    info = {"vocab_size": len(tokens), "bytes": n}
    if template is not None:
        info["template"] = template["name"]
    return info


# ---------------------------------------------------------------------------
# The chat template (dev/chat_templates.py): --template, or the one that matches the
# folder's chat template, or Vicuna v1.1 when the folder has none

def choose_template(folder, tokens, bos_id, eos_id, name, where):
    """(resolved template or None, how it was chosen). name: --template or None."""
    def text(i):
        if i < 0:
            return None
        p = tokens[i][0]
        return p.decode("utf-8") if isinstance(p, bytes) else p
    bos, eos = text(bos_id), text(eos_id)
    source = chat_templates.folder_source(folder)
    if name is None and source is None and (bos is None or eos is None):
        return None, "none recorded (no chat template, no BOS or EOS: Vicuna v1.1 needs both)"
    try:
        t, how = chat_templates.choose(source, name, bos, eos, where)
    except chat_templates.TemplateError as e:
        raise ExportError(str(e))
    specials = {text(i) for i, tok in enumerate(tokens) if tok[2] in (TYPE_CONTROL, TYPE_ADDED)}
    for piece in chat_templates.special_tokens(t):
        if piece not in specials:
            raise ExportError(f"{where}: chat template {t['name']} writes {piece}, which is not a special token "
                              "of this tokenizer")
    return t, how


# ---------------------------------------------------------------------------
# SentencePiece

def resolve_model_path(path):
    """The SentencePiece model or tokenizer.json that path names or holds."""
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise ExportError(f"{path}: folder has neither tokenizer.model (SentencePiece) "
                          "nor tokenizer.json (byte-level BPE)")
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file")
    return path


# ---------------------------------------------------------------------------
# Hugging Face tokenizer.json: byte-level BPE

def byte_level_alphabet():
    """GPT-2's map from each byte to a printable character: the printable Latin-1
    bytes stand for themselves, the others (controls, space, 0x7F-0xA0, 0xAD) for
    U+0100, U+0101, ... in byte order."""
    printable = [b for b in range(256)
                 if ord("!") <= b <= ord("~") or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return alphabet


def describe(component):
    """A short description of a pre-tokenizer/normalizer/decoder JSON for an error."""
    if component is None:
        return "null"
    if component.get("type") == "Sequence":
        parts = component.get("pretokenizers") or component.get("normalizers") or \
            component.get("decoders") or []
        return "Sequence[" + ", ".join(describe(c) for c in parts) + "]"
    fields = ", ".join(f"{k}={v}" for k, v in component.items() if k != "type")
    if component.get("type") == "Split":
        pattern = component.get("pattern", {})
        fields = f"pattern={pattern.get('Regex', pattern.get('String'))!r}, " + \
            f"behavior={component.get('behavior')}, invert={component.get('invert')}"
    return f"{component.get('type')}({fields})"


def parse_pre_tokenizer(pre, fail):
    """Returns (pre_tokenizer, individual_digits) or calls fail."""
    def refuse():
        fail(f"pre_tokenizer {describe(pre)} is not supported (supported: ByteLevel with "
             "use_regex, or Sequence[Digits(individual_digits=true)?, ByteLevel(use_regex=true) "
             "or Split(GPT-2 or Llama 3 regex, Isolated) + ByteLevel(use_regex=false)])")
    if pre is None:
        refuse()
    parts = list(pre["pretokenizers"]) if pre.get("type") == "Sequence" else [pre]
    digits = False
    if parts and parts[0].get("type") == "Digits":
        if not parts[0].get("individual_digits"):
            refuse()
        digits = True
        parts = parts[1:]

    def byte_level(part, use_regex):
        return (part.get("type") == "ByteLevel" and not part.get("add_prefix_space", False)
                and bool(part.get("use_regex", True)) == use_regex)
    if len(parts) == 1 and byte_level(parts[0], True):
        return PRE_GPT2, digits
    if len(parts) == 2 and parts[0].get("type") == "Split" and byte_level(parts[1], False):
        split = parts[0]
        pattern = split.get("pattern", {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert", False):
            if pattern == GPT2_PATTERN:
                return PRE_GPT2, digits
            if pattern == LLAMA3_PATTERN:
                return PRE_LLAMA3, digits
    refuse()


def token_content(value):
    """A tokenizer_config.json token: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def hf_bpe_tokens(json_path):
    """Reads a tokenizer.json (+ tokenizer_config.json beside it). Returns the
    arguments of write_tokenizer for kind 2 as a dict."""
    def fail(msg):
        raise ExportError(f"{json_path}: {msg}")
    try:
        with open(json_path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read it as JSON: {e}")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        fail(f"model type {model.get('type')!r} is not supported (only BPE)")
    for key, allowed in (("dropout", (None,)),
                         ("continuing_subword_prefix", (None, "")),
                         ("end_of_word_suffix", (None, "")), ("byte_fallback", (None, False)),
                         ("fuse_unk", (None, False))):
        if model.get(key) not in allowed:
            fail(f"model.{key} = {model.get(key)!r} is not supported (must be {allowed[-1]!r})")
    normalizer = spec.get("normalizer")
    if normalizer is not None and not (normalizer.get("type") == "Sequence"
                                       and not normalizer.get("normalizers")):
        fail(f"normalizer {describe(normalizer)} is not supported (only null)")
    decoder = spec.get("decoder")
    if decoder is None or decoder.get("type") != "ByteLevel":
        fail(f"decoder {describe(decoder)} is not supported (only ByteLevel)")
    pre_tokenizer, digits = parse_pre_tokenizer(spec.get("pre_tokenizer"), fail)

    alphabet = byte_level_alphabet()
    unbyte = {ch: b for b, ch in alphabet.items()}
    vocab = model.get("vocab") or {}
    added = spec.get("added_tokens") or []
    by_id = {}
    for piece, i in vocab.items():
        if i in by_id:
            fail(f"vocab ids {i} twice ({by_id[i]!r} and {piece!r})")
        by_id[i] = piece
    added_by_id = {}
    for a in added:
        if a.get("single_word"):
            fail(f"added token {a['content']!r} has single_word=true, which is not supported")
        if not a.get("content"):
            fail(f"added token {a.get('id')} is empty")
        added_by_id[a["id"]] = a
    if not by_id:
        fail("model.vocab is empty")
    n = max(list(by_id) + list(added_by_id)) + 1
    tokens = []
    for i in range(n):
        if i in added_by_id:
            a = added_by_id[i]
            tokens.append((a["content"], 0.0, TYPE_CONTROL if a.get("special") else TYPE_ADDED))
        elif i in by_id:
            try:
                raw = bytes(unbyte[ch] for ch in by_id[i])
            except KeyError as e:
                fail(f"vocab piece {by_id[i]!r} (id {i}) has the character {e.args[0]!r}, "
                     "outside the ByteLevel alphabet")
            tokens.append((raw, 0.0, TYPE_NORMAL))
        else:
            fail(f"id {i} is neither in the vocab nor an added token (ids must be 0..{n - 1})")
    seen = {}
    for i, (piece, _, _) in enumerate(tokens):
        key = piece if isinstance(piece, bytes) else piece.encode("utf-8")
        if key in seen:
            fail(f"tokens {seen[key]} and {i} both stand for {key!r}")
        seen[key] = i

    # unk_token stands for a character missing from the vocab: harmless when every byte
    # has a token (it can never be emitted); otherwise the C++ encoder, which drops such
    # bytes as a BPE without unk_token does, would differ
    missing = [b for b in range(256) if bytes([b]) not in seen or tokens[seen[bytes([b])]][2] != TYPE_NORMAL]
    if model.get("unk_token") is not None and missing:
        fail(f"model.unk_token = {model['unk_token']!r} is not supported when bytes have no token "
             f"(0x{missing[0]:02X} and {len(missing) - 1} more)")

    merges = []
    for rank, m in enumerate(model.get("merges") or []):
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) != 2:
            fail(f"merge {rank} {m!r} is not a pair of pieces")
        left, right = pair
        if left not in vocab or right not in vocab or left + right not in vocab:
            fail(f"merge {rank} {left!r} {right!r}: a piece of it or the joined piece is not in the vocab")
        merges.append((vocab[left], vocab[right]))

    def config_id(name, config):
        content = token_content(config.get(name))
        if content is None:
            return -1
        for a in added:
            if a["content"] == content:
                if not a.get("special"):
                    fail(f"{name} {content!r} is not a special token")
                return a["id"]
        fail(f"{name} {content!r} of tokenizer_config.json is not an added token")

    config = {}
    config_path = os.path.join(os.path.dirname(json_path), "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    flags = (FLAG_INDIVIDUAL_DIGITS if digits else 0) | \
        (FLAG_IGNORE_MERGES if model.get("ignore_merges") else 0)
    added_records = [(a["id"], (ADDED_LSTRIP if a.get("lstrip") else 0) |
                      (ADDED_RSTRIP if a.get("rstrip") else 0) |
                      (ADDED_NORMALIZED if a.get("normalized") else 0))
                     for a in sorted(added, key=lambda a: a["id"])]
    return dict(tokens=tokens, bos_id=config_id("bos_token", config),
                eos_id=config_id("eos_token", config), unk_id=-1,
                pad_id=config_id("pad_token", config), flags=flags,
                pre_tokenizer=pre_tokenizer, merges=merges, added=added_records)


def export_hf_bpe(json_path, out_path, template_name=None):
    t = hf_bpe_tokens(json_path)
    template, how = choose_template(os.path.dirname(json_path), t["tokens"], t["bos_id"], t["eos_id"],
                                    template_name, json_path)
    n = write_tokenizer(out_path, KIND_BYTE_LEVEL_BPE, template=template, **t)
    return {"vocab_size": len(t["tokens"]), "merges": len(t["merges"]),
            "added": len(t["added"]), "pre_tokenizer": {PRE_GPT2: "gpt2", PRE_LLAMA3: "llama3"}[t["pre_tokenizer"]],
            "individual_digits": bool(t["flags"] & FLAG_INDIVIDUAL_DIGITS),
            "ignore_merges": bool(t["flags"] & FLAG_IGNORE_MERGES),
            "bos_id": t["bos_id"], "eos_id": t["eos_id"], "pad_id": t["pad_id"], "bytes": n,
            "template": (template["name"] + f" ({how})") if template else how}


def sentencepiece_tokens(model_path):
    """Reads a SentencePiece model; returns (tokens, bos, eos, unk, pad, flags)."""
    import sentencepiece as spm

    with open(model_path, "rb") as f:
        blob = f.read()
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(blob)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
        raise ExportError(f"{model_path}: sentencepiece cannot load it: {e}")

    model = parse_proto(blob)
    trainer = parse_proto(_last(model, 2, b""))
    normalizer = parse_proto(_last(model, 3, b""))
    denormalizer = parse_proto(_last(model, 5, b""))

    def fail(msg):
        raise ExportError(f"{model_path}: {msg}")

    model_type = _last(trainer, 3, 1)
    if model_type != SP_MODEL_BPE:
        fail(f"model_type {model_type} is not BPE (2); only BPE models are supported")
    byte_fallback = bool(_last(trainer, 35, 0))
    if _last(trainer, 24, 0):
        fail("treat_whitespace_as_suffix=true is not supported")
    unk_surface = _last(trainer, 44, SP_DEFAULT_UNK_SURFACE.encode()).decode("utf-8")
    if unk_surface != SP_DEFAULT_UNK_SURFACE:
        fail(f"custom unk_surface {unk_surface!r} is not supported")
    if _last(normalizer, 2, b""):
        name = _last(normalizer, 1, b"").decode("utf-8", "replace")
        fail(f"normalization rule {name!r} is not supported (only 'identity', "
             "i.e. no precompiled_charsmap)")
    if _last(normalizer, 6, b""):
        fail("custom normalization_rule_tsv is not supported")
    if _last(normalizer, 4, 1):
        fail("remove_extra_whitespaces=true is not supported")
    if not _last(normalizer, 5, 1):
        fail("escape_whitespaces=false is not supported")
    if _last(denormalizer, 2, b""):
        fail("a denormalizer is not supported")
    add_dummy_prefix = bool(_last(normalizer, 3, 1))

    raw_pieces = model.get(1, [])
    n = sp.get_piece_size()
    if len(raw_pieces) != n:
        fail(f"proto has {len(raw_pieces)} pieces but sentencepiece reports {n}")

    type_map = {SP_NORMAL: TYPE_NORMAL, SP_BYTE: TYPE_BYTE,
                SP_CONTROL: TYPE_CONTROL, SP_UNKNOWN: TYPE_UNKNOWN}
    tokens = []
    seen = {}
    byte_ids = {}
    for i, raw in enumerate(raw_pieces):
        fields = parse_proto(raw)
        piece = _last(fields, 1, b"").decode("utf-8")
        score = struct.unpack("<f", _last(fields, 2, b"\0\0\0\0"))[0]
        sp_type = _last(fields, 3, SP_NORMAL)
        if sp_type not in type_map:
            kind = {SP_USER_DEFINED: "user-defined", SP_UNUSED: "unused"}.get(sp_type, str(sp_type))
            fail(f"piece {i} {piece!r} has type {kind}, which is not supported")
        # Cross-check with the sentencepiece library's own view of the model.
        if sp.id_to_piece(i) != piece or sp.get_score(i) != score:
            fail(f"piece {i}: proto and sentencepiece disagree")
        if (sp.is_byte(i) != (sp_type == SP_BYTE) or
                sp.is_control(i) != (sp_type == SP_CONTROL) or
                sp.is_unknown(i) != (sp_type == SP_UNKNOWN)):
            fail(f"piece {i}: type disagrees with sentencepiece")
        if not piece:
            fail(f"piece {i} is empty")
        if piece in seen:
            fail(f"piece {i} {piece!r} duplicates piece {seen[piece]}")
        seen[piece] = i
        if sp_type == SP_BYTE:
            if len(piece) != 6 or not piece.startswith("<0x") or not piece.endswith(">"):
                fail(f"byte piece {i} {piece!r} is not of the form <0xNN>")
            value = int(piece[3:5], 16)
            if piece != byte_piece(value):
                fail(f"byte piece {i} {piece!r} is not of the form <0xNN>")
            byte_ids[value] = i
        tokens.append((piece, score, type_map[sp_type]))

    if byte_fallback and len(byte_ids) != 256:
        fail(f"byte_fallback is on but only {len(byte_ids)} of 256 byte pieces exist")
    unk = sp.unk_id()
    if unk < 0:
        fail("the model has no unknown piece")
    flags = (FLAG_ADD_DUMMY_PREFIX if add_dummy_prefix else 0) | \
            (FLAG_BYTE_FALLBACK if byte_fallback else 0)
    return tokens, sp.bos_id(), sp.eos_id(), unk, sp.pad_id(), flags


def export_sentencepiece(model_path, out_path, template_name=None, folder=None):
    model_path = resolve_model_path(model_path)
    tokens, bos, eos, unk, pad, flags = sentencepiece_tokens(model_path)
    template, how = choose_template(folder, tokens, bos, eos, template_name, model_path)
    n = write_tokenizer(out_path, KIND_SENTENCEPIECE_BPE, tokens, bos, eos, unk, pad, flags, template=template)
    return {"vocab_size": len(tokens), "bos_id": bos, "eos_id": eos, "unk_id": unk,
            "pad_id": pad, "flags": flags, "bytes": n,
            "template": (template["name"] + f" ({how})") if template else how}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a tokenizer to xwin.cu's format.")
    ap.add_argument("--byte-level", action="store_true",
                    help="write the byte-level tokenizer (takes only the output path)")
    ap.add_argument("paths", nargs="+", metavar="PATH",
                    help="MODEL OUT (SentencePiece .model, tokenizer.json or a folder), or OUT with --byte-level")
    ap.add_argument("--template", metavar="|".join(chat_templates.TEMPLATES),
                    help="the chat template to record (default: the one matching the folder's chat template; "
                         "vicuna_v1.1 when it has none)")
    args = ap.parse_args(argv)
    try:
        if args.byte_level:
            if len(args.paths) != 1:
                ap.error("--byte-level takes exactly one path: the output file")
            info = export_byte_level(args.paths[0], args.template)
            out = args.paths[0]
        else:
            if len(args.paths) != 2:
                ap.error("expected: MODEL OUT")
            model_path = resolve_model_path(args.paths[0])
            if model_path.endswith(".json"):
                info = export_hf_bpe(model_path, args.paths[1], args.template)
            else:
                folder = args.paths[0] if os.path.isdir(args.paths[0]) else None
                info = export_sentencepiece(model_path, args.paths[1], args.template, folder)
            out = args.paths[1]
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
