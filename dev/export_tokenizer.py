"""Export a tokenizer into xwin.cu's binary tokenizer file.

Usage:
    python dev/export_tokenizer.py tokenizer.model out.tokenizer
    python dev/export_tokenizer.py path/to/hf_model_folder out.tokenizer
    python dev/export_tokenizer.py --byte-level out.tokenizer

The first form reads a SentencePiece BPE model (Llama 2 style: byte_fallback,
add_dummy_prefix, identity normalisation) with the `sentencepiece` package.
A folder is accepted when it holds a `tokenizer.model` (Hugging Face layout).
The last form writes the fixed byte-level tokenizer (no input needed).

File format (all integers little-endian; must match tokenizer_load in llm.cu):

    offset  size  field
    0       8     magic "XWINTOKN"
    8       4     u32 version = 1
    12      4     u32 kind: 0 = SentencePiece-style BPE, 1 = byte-level
    16      4     u32 vocab_size (number of token records that follow)
    20      4     i32 bos_id   (-1 = none)
    24      4     i32 eos_id   (-1 = none)
    28      4     i32 unk_id   (-1 = none)
    32      4     i32 pad_id   (-1 = none)
    36      4     u32 flags: bit 0 add_dummy_prefix, bit 1 byte_fallback
    40      ...   vocab_size token records, in id order:
                      f32 score
                      u8  type: 0 normal, 1 byte (<0xNN>), 2 control, 3 unknown
                      u16 piece length in bytes (>= 1)
                      piece bytes (UTF-8; spaces are stored as U+2581 "▁")
    The file ends right after the last record.

Byte-level tokenizer (kind 1): ids 0..255 are the bytes 0x00..0xFF (pieces
"<0x00>".."<0xFF>"), 256 = "<s>" (bos), 257 = "</s>" (eos), 258 = "<pad>" (pad);
vocab_size 259, flags 0, unk_id -1.
"""

import argparse
import math
import os
import struct
import sys

MAGIC = b"XWINTOKN"
VERSION = 1
KIND_SENTENCEPIECE_BPE = 0
KIND_BYTE_LEVEL = 1

TYPE_NORMAL = 0
TYPE_BYTE = 1
TYPE_CONTROL = 2
TYPE_UNKNOWN = 3

FLAG_ADD_DUMMY_PREFIX = 1 << 0
FLAG_BYTE_FALLBACK = 1 << 1

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


def write_tokenizer(path, kind, tokens, bos_id, eos_id, unk_id, pad_id, flags):
    """tokens: list of (piece: str, score: float, type: int) in id order."""
    out = bytearray()
    out += MAGIC
    out += struct.pack("<IIIiiiiI", VERSION, kind, len(tokens), bos_id, eos_id,
                       unk_id, pad_id, flags)
    for i, (piece, score, ttype) in enumerate(tokens):
        data = piece.encode("utf-8")
        if not 1 <= len(data) <= 0xFFFF:
            raise ExportError(f"token {i}: piece length {len(data)} outside 1..65535")
        if not math.isfinite(score):
            raise ExportError(f"token {i}: score is not finite")
        out += struct.pack("<fBH", score, ttype, len(data))
        out += data
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


def export_byte_level(out_path):
    tokens = byte_level_tokens()
    assert len(tokens) == BYTE_LEVEL_PAD + 1
    n = write_tokenizer(out_path, KIND_BYTE_LEVEL, tokens, BYTE_LEVEL_BOS,
                        BYTE_LEVEL_EOS, -1, BYTE_LEVEL_PAD, 0)
    return {"vocab_size": len(tokens), "bytes": n}


# ---------------------------------------------------------------------------
# SentencePiece

def resolve_model_path(path):
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(candidate):
            raise ExportError(f"{path}: folder has no tokenizer.model "
                              "(only SentencePiece models are supported)")
        return candidate
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file")
    return path


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


def export_sentencepiece(model_path, out_path):
    model_path = resolve_model_path(model_path)
    tokens, bos, eos, unk, pad, flags = sentencepiece_tokens(model_path)
    n = write_tokenizer(out_path, KIND_SENTENCEPIECE_BPE, tokens, bos, eos, unk, pad, flags)
    return {"vocab_size": len(tokens), "bos_id": bos, "eos_id": eos, "unk_id": unk,
            "pad_id": pad, "flags": flags, "bytes": n}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a tokenizer to xwin.cu's format.")
    ap.add_argument("--byte-level", action="store_true",
                    help="write the byte-level tokenizer (takes only the output path)")
    ap.add_argument("paths", nargs="+", metavar="PATH",
                    help="MODEL OUT (SentencePiece .model file or folder), or OUT with --byte-level")
    args = ap.parse_args(argv)
    try:
        if args.byte_level:
            if len(args.paths) != 1:
                ap.error("--byte-level takes exactly one path: the output file")
            info = export_byte_level(args.paths[0])
            out = args.paths[0]
        else:
            if len(args.paths) != 2:
                ap.error("expected: MODEL OUT")
            info = export_sentencepiece(args.paths[0], args.paths[1])
            out = args.paths[1]
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
