"""Readers and writers for the xwin.cu file formats (all little-endian).

Three formats: the model file (.bin, float32 or bfloat16 parameters), the token
file (.tok, sequences with per-token loss masks) and the test fixture archive
(expect.bin, named float32 arrays). The C++ header is the reference for the
layouts; this module mirrors it for the Python tools in dev/. numpy is needed
for everything but write_tokens, which needs only the standard library (so
dev/data/prepare_sft.py runs with the byte tokenizer on a bare Python); torch
tensors are accepted wherever arrays are. Writers go through a
temporary file and os.replace, so a reader never sees a half-written file.

    import xwin_format as xf
    xf.write_model("m.bin", config, tensors, dtype="bf16")
    config, tensors = xf.read_model("m.bin")      # arrays come back as float32
"""

import math
import os
import struct
import sys
from array import array

try:
    import numpy as np
except ImportError:  # write_tokens works without it
    np = None

MODEL_MAGIC = 0x4E495758  # "XWIN"
TOKENS_MAGIC = 0x4B545758  # "XWTK"
FIXTURE_MAGIC = 0x58465758  # "XWFX"
VERSION = 1        # of the token file and the fixture archive
MODEL_VERSION = 3  # of the model file (versions 1, without the token ids, and 2, without RoPE scaling, are still read)
MODEL_HEADER = 256
TOKENS_HEADER = 64

DTYPES = {"fp32": 0, "bf16": 1}
DTYPE_BYTES = {"fp32": 4, "bf16": 2}

# uint32 fields at offsets 16..47, then two float64 at 48 and 56
INT_FIELDS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
              "ffn_dim", "max_seq_len", "tied_embeddings"]
CONFIG_FIELDS = INT_FIELDS + ["head_type", "rope_theta", "norm_eps"]
# int32 at offsets 64, 68, 72 (version 2): -1 in the file, None in a config dict, for none
TOKEN_ID_FIELDS = ["pad_token_id", "bos_token_id", "eos_token_id"]
# RoPE scaling (version 3): uint32 type at 76, float64 factor, low_freq_factor, high_freq_factor at
# 80, 88, 96, uint32 original_max_position_embeddings at 104; bytes 108.. zero. In a config dict:
# "rope_scaling" None, or a dict as transformers' rope_scaling: {"rope_type": "linear", "factor": f}
# or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
# "original_max_position_embeddings"}. A field the type does not use is 0 in the file.
ROPE_TYPES = {"linear": 1, "llama3": 2}
ROPE_FIELDS = {"linear": ["factor"],
               "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
HEADER_END = {1: 64, 2: 76, 3: 108}  # the first reserved (zero) byte of each version


class FormatError(ValueError):
    pass


def _check(cond, msg):
    if not cond:
        raise FormatError(msg)


def _atomic_write(path, chunks):
    """Write an iterable of bytes-like chunks to path via a temp file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------- arrays

def _to_numpy(t):
    """numpy array from a numpy array or torch tensor; bf16 tensors come back
    as float32 (exact)."""
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # torch tensor
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            bits = t.contiguous().view(dtype=_torch().int16).numpy().view(np.uint16)
            return bf16_bits_to_f32(bits)
        return t.numpy()
    return np.asarray(t)


def _torch():
    import torch
    return torch


def f32_to_bf16_bits(x):
    """Round float32 to bfloat16 (round to nearest even, as torch does);
    returns uint16 bit patterns."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_bits_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _encode(t, dtype):
    """Bytes of one tensor in the file dtype. bf16 torch tensors are copied
    bit for bit; everything else goes through float32."""
    if dtype == "bf16" and hasattr(t, "detach") and str(t.dtype) == "torch.bfloat16":
        torch = _torch()
        return t.detach().cpu().contiguous().view(dtype=torch.int16).numpy().astype("<i2").tobytes()
    a = np.ascontiguousarray(_to_numpy(t), dtype=np.float32)
    if dtype == "fp32":
        return a.astype("<f4").tobytes()
    return f32_to_bf16_bits(a).astype("<u2").tobytes()


# ---------------------------------------------------------------- model file

def tensor_shapes(cfg):
    """Ordered list of (name, shape) of the parameter tensors in a model file."""
    C, L, H, KV = cfg["dim"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"]
    V, F = cfg["vocab_size"], cfg["ffn_dim"]
    _check(H > 0 and C % H == 0, f"dim {C} is not a multiple of n_heads {H}")
    _check(KV > 0 and H % KV == 0, f"n_heads {H} is not a multiple of n_kv_heads {KV}")
    kvd = KV * (C // H)
    shapes = [
        ("wte", (V, C)),
        ("attn_norm", (L, C)),
        ("wq", (L, C, C)),
        ("wk", (L, kvd, C)),
        ("wv", (L, kvd, C)),
        ("wo", (L, C, C)),
        ("mlp_norm", (L, C)),
        ("w_gate", (L, F, C)),
        ("w_up", (L, F, C)),
        ("w_down", (L, C, F)),
        ("final_norm", (C,)),
    ]
    if cfg["head_type"] == 1:
        shapes.append(("head", (1, C)))
    elif not cfg["tied_embeddings"]:
        shapes.append(("head", (V, C)))
    return shapes


def n_params(cfg):
    return sum(int(np.prod(s)) for _, s in tensor_shapes(cfg))


def _pack_header(cfg, dtype):
    _check(dtype in DTYPES, f"dtype must be fp32 or bf16, got {dtype!r}")
    _check(cfg["head_type"] in (0, 1), f"head_type must be 0 or 1, got {cfg['head_type']}")
    ints = [int(cfg[k]) for k in INT_FIELDS]
    ints[-1] = 1 if cfg["tied_embeddings"] else 0
    ids = [-1 if cfg.get(k) is None else int(cfg[k]) for k in TOKEN_ID_FIELDS]
    for k, i in zip(TOKEN_ID_FIELDS, ids):
        _check(-1 <= i < int(cfg["vocab_size"]), f"{k} {i} is not None or an id below vocab_size")
    head = struct.pack("<4I", MODEL_MAGIC, MODEL_VERSION, DTYPES[dtype], int(cfg["head_type"]))
    head += struct.pack("<8I", *ints)
    head += struct.pack("<2d", float(cfg["rope_theta"]), float(cfg["norm_eps"]))
    head += struct.pack("<3i", *ids)
    head += _pack_rope_scaling(cfg.get("rope_scaling"))
    return head + bytes(MODEL_HEADER - len(head))


def rope_scaling_error(rs):
    """What is wrong with a config dict's rope_scaling (None or a dict), or "" (the C++
    header check, rope_scaling_check in llm.cu, says the same)."""
    if rs is None:
        return ""
    kind = rs.get("rope_type")
    if kind not in ROPE_TYPES:
        return f"unsupported rope_scaling type {kind!r} (only linear and llama3 are implemented)"
    extra = set(rs) - {"rope_type"} - set(ROPE_FIELDS[kind])
    if extra:
        return f"rope_scaling {kind} has unknown fields {sorted(extra)}"
    missing = [k for k in ROPE_FIELDS[kind] if rs.get(k) is None]
    if missing:
        return f"rope_scaling {kind} lacks {missing[0]}"
    factor = rs["factor"]
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
        return f"rope_scaling factor {factor} (must be finite and >= 1)"
    if kind == "llama3":
        low, high, orig = rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
        if not (math.isfinite(low) and low > 0):
            return f"rope_scaling low_freq_factor {low} (must be finite and > 0)"
        if not (math.isfinite(high) and high > low):
            return f"rope_scaling high_freq_factor {high} (must be finite and > low_freq_factor {low})"
        if not (isinstance(orig, int) and 1 <= orig <= 1 << 24):
            return f"rope_scaling original_max_position_embeddings {orig} (must be an integer in 1..{1 << 24})"
    return ""


def _pack_rope_scaling(rs):
    """Bytes 76..107 of the header for a config dict's rope_scaling."""
    err = rope_scaling_error(rs)
    _check(not err, err)
    if rs is None:
        return bytes(32)
    get = lambda k: rs.get(k, 0) if k in ROPE_FIELDS[rs["rope_type"]] else 0
    return struct.pack("<I3dI", ROPE_TYPES[rs["rope_type"]], float(get("factor")), float(get("low_freq_factor")),
                       float(get("high_freq_factor")), int(get("original_max_position_embeddings")))


def _unpack_rope_scaling(head, path):
    """A version-3 header's rope_scaling (None or a dict), checked."""
    kind, factor, low, high, orig = struct.unpack_from("<I3dI", head, 76)
    if kind == 0:
        _check(factor == low == high == orig == 0, f"{path}: rope_scaling 0 (none) with nonzero scaling fields")
        return None
    names = {v: k for k, v in ROPE_TYPES.items()}
    _check(kind in names, f"{path}: unknown rope_scaling type {kind}")
    values = {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
              "original_max_position_embeddings": orig}
    rs = {"rope_type": names[kind], **{k: values[k] for k in ROPE_FIELDS[names[kind]]}}
    for k in values:
        _check(k in rs or values[k] == 0, f"{path}: rope_scaling {names[kind]} with a nonzero {k}")
    err = rope_scaling_error(rs)
    _check(not err, f"{path}: {err}")
    return rs


def write_model(path, cfg, tensors, dtype=None):
    """Write a model file. cfg holds CONFIG_FIELDS (and "rope_scaling", None when
    absent, and the token ids); tensors maps our names to
    arrays/tensors (or zero-argument callables returning one, loaded only when
    written). dtype is "fp32" or "bf16" (default: cfg.get("dtype", "fp32"))."""
    dtype = dtype or cfg.get("dtype", "fp32")
    shapes = tensor_shapes(cfg)
    extra = set(tensors) - {n for n, _ in shapes}
    _check(not extra, f"unexpected tensors: {sorted(extra)}")

    def chunks():
        yield _pack_header(cfg, dtype)
        for name, shape in shapes:
            _check(name in tensors, f"missing tensor {name}")
            t = tensors[name]
            t = t() if callable(t) else t
            _check(tuple(t.shape) == shape, f"{name}: shape {tuple(t.shape)}, expected {shape}")
            yield _encode(t, dtype)

    _atomic_write(path, chunks())


def read_header(path):
    """Config dict (CONFIG_FIELDS plus "rope_scaling", the token ids and "dtype") of a
    model file, validated."""
    with open(path, "rb") as f:
        head = f.read(MODEL_HEADER)
    _check(len(head) == MODEL_HEADER, f"{path}: shorter than the {MODEL_HEADER}-byte header")
    magic, version, dtype, head_type = struct.unpack_from("<4I", head, 0)
    _check(magic == MODEL_MAGIC, f"{path}: bad magic {magic:#x}, not an xwin model file")
    _check(version in HEADER_END, f"{path}: unsupported version {version}")
    _check(dtype in (0, 1), f"{path}: unknown dtype code {dtype}")
    _check(head_type in (0, 1), f"{path}: unknown head_type {head_type}")
    ids = struct.unpack_from("<3i", head, 64) if version >= 2 else (-1, -1, -1)
    rope_scaling = _unpack_rope_scaling(head, path) if version >= 3 else None
    _check(not any(head[HEADER_END[version]:]), f"{path}: reserved header bytes are not zero")
    cfg = dict(zip(INT_FIELDS, struct.unpack_from("<8I", head, 16)))
    _check(cfg["tied_embeddings"] in (0, 1), f"{path}: tied_embeddings must be 0 or 1")
    cfg["head_type"] = head_type
    cfg["rope_theta"], cfg["norm_eps"] = struct.unpack_from("<2d", head, 48)
    cfg["rope_scaling"] = rope_scaling
    cfg["dtype"] = "fp32" if dtype == 0 else "bf16"
    for k, i in zip(TOKEN_ID_FIELDS, ids):
        _check(-1 <= i < cfg["vocab_size"], f"{path}: {k} {i} is not -1 or an id below vocab_size")
        cfg[k] = None if i == -1 else i
    expect = MODEL_HEADER + n_params(cfg) * DTYPE_BYTES[cfg["dtype"]]
    size = os.path.getsize(path)
    _check(size == expect, f"{path}: file is {size} bytes, header implies {expect}")
    return cfg


def read_model(path):
    """(config, tensors). Tensors are float32 numpy arrays in file order; bf16
    files are widened exactly, and config["dtype"] says what the file held."""
    cfg = read_header(path)
    bf16 = cfg["dtype"] == "bf16"
    tensors = {}
    with open(path, "rb") as f:
        f.seek(MODEL_HEADER)
        for name, shape in tensor_shapes(cfg):
            count = int(np.prod(shape))
            if bf16:
                a = bf16_bits_to_f32(np.fromfile(f, dtype="<u2", count=count))
            else:
                a = np.fromfile(f, dtype="<f4", count=count).astype(np.float32)
            tensors[name] = a.reshape(shape)
    return cfg, tensors


# ---------------------------------------------------------------- token file

def write_tokens(path, seqs, masks):
    """Write sequences of token ids with their 0/1 loss masks."""
    _check(len(seqs) >= 1, "need at least one sequence")
    _check(len(seqs) == len(masks), "seqs and masks differ in count")
    offsets = [0]
    for i, (s, m) in enumerate(zip(seqs, masks)):
        _check(len(s) >= 1, f"sequence {i} is empty")
        _check(len(s) == len(m), f"sequence {i}: {len(s)} tokens but {len(m)} mask values")
        offsets.append(offsets[-1] + len(s))
    tokens = [int(t) for s in seqs for t in s]
    mask = [int(v) for m in masks for v in m]
    _check(min(tokens) >= 0 and max(tokens) < 2**32, "token ids must fit in uint32")
    _check(set(mask) <= {0, 1}, "mask values must be 0 or 1")
    n = int(offsets[-1])
    head = struct.pack("<4I2Q", TOKENS_MAGIC, VERSION, len(seqs), 0, n, n)
    head += bytes(TOKENS_HEADER - len(head))
    _atomic_write(path, [head, _le_array("Q", 8, offsets), _le_array("I", 4, tokens), bytes(mask)])


def _le_array(code, size, values):
    """Little-endian bytes of unsigned integers of `size` bytes (standard library only)."""
    if array(code).itemsize != size:
        code = {4: "L", 8: "Q"}[size] if array({4: "L", 8: "Q"}[size]).itemsize == size else code
    a = array(code, values)
    _check(a.itemsize == size, f"no {size}-byte unsigned array type on this platform")
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


PAIRS_MAGIC = 0x52505758  # "XWPR"
PAIRS_HEADER = 64


def write_pairs(path, groups, records, seqs, masks):
    """Write a pair file (format in llm.cu, "Pair file format"). groups: names (<= 15 bytes
    each); records: (prompt_len, group, score_chosen, score_rejected) per pair; seqs and
    masks: 2 per pair, chosen then rejected. Standard library only."""
    _check(len(records) >= 1, "need at least one pair")
    _check(len(seqs) == 2 * len(records) == len(masks), "need two sequences and masks per pair")
    _check(len(groups) <= 64, "at most 64 groups")
    names = b""
    for g in groups:
        raw = g.encode("utf-8")
        _check(len(raw) <= 15, f"group name {g!r} is longer than 15 bytes")
        names += raw + bytes(16 - len(raw))
    recs = b"".join(struct.pack("<2I2f", p, g, c, r) for p, g, c, r in records)
    offsets = [0]
    for s in seqs:
        _check(len(s) >= 1, "a sequence is empty")
        offsets.append(offsets[-1] + len(s))
    tokens = [int(t) for s in seqs for t in s]
    mask = [int(v) for m in masks for v in m]
    _check(len(tokens) == len(mask), "tokens and masks differ in length")
    head = struct.pack("<4IQ", PAIRS_MAGIC, 1, len(records), len(groups), len(tokens))
    head += bytes(PAIRS_HEADER - len(head))
    _atomic_write(path, [head, names, recs, _le_array("Q", 8, offsets), _le_array("I", 4, tokens), bytes(mask)])


def read_tokens(path):
    """(seqs, masks) as lists of numpy arrays (uint32 tokens, uint8 masks)."""
    with open(path, "rb") as f:
        data = f.read()
    _check(len(data) >= TOKENS_HEADER, f"{path}: shorter than the header")
    magic, version, n_seqs, _, n_tok, n_mask = struct.unpack_from("<4I2Q", data, 0)
    _check(magic == TOKENS_MAGIC, f"{path}: bad magic {magic:#x}, not an xwin token file")
    _check(version == VERSION, f"{path}: unsupported version {version}")
    _check(n_seqs >= 1, f"{path}: no sequences")
    _check(n_mask == n_tok, f"{path}: n_mask {n_mask} != n_tokens {n_tok}")
    expect = TOKENS_HEADER + 8 * (n_seqs + 1) + 4 * n_tok + n_mask
    _check(len(data) == expect, f"{path}: file is {len(data)} bytes, header implies {expect}")
    pos = TOKENS_HEADER
    offsets = np.frombuffer(data, "<u8", n_seqs + 1, pos)
    pos += 8 * (n_seqs + 1)
    tokens = np.frombuffer(data, "<u4", n_tok, pos)
    mask = np.frombuffer(data, np.uint8, n_mask, pos + 4 * n_tok)
    _check(offsets[0] == 0 and offsets[-1] == n_tok and (np.diff(offsets.astype(np.int64)) > 0).all(),
           f"{path}: bad offsets")
    seqs = [tokens[offsets[i]:offsets[i + 1]].copy() for i in range(n_seqs)]
    masks = [mask[offsets[i]:offsets[i + 1]].copy() for i in range(n_seqs)]
    return seqs, masks


# ---------------------------------------------------------------- fixtures

def write_fixture(path, entries):
    """Write (name, array) pairs; arrays are stored as float32."""
    names = [n for n, _ in entries]
    _check(len(set(names)) == len(names), "duplicate fixture entry names")
    chunks = [struct.pack("<3I", FIXTURE_MAGIC, VERSION, len(entries))]
    for name, a in entries:
        a = np.asarray(_to_numpy(a), dtype=np.float32)
        raw = name.encode()
        chunks.append(struct.pack("<I", len(raw)) + raw + struct.pack("<I", a.ndim))
        chunks.append(np.asarray(a.shape, dtype="<u8").tobytes())
        chunks.append(np.ascontiguousarray(a).astype("<f4").tobytes())
    _atomic_write(path, chunks)


def read_fixture(path):
    """Dict name -> float32 array, in file order."""
    with open(path, "rb") as f:
        data = f.read()
    magic, version, n = struct.unpack_from("<3I", data, 0)
    _check(magic == FIXTURE_MAGIC, f"{path}: bad magic {magic:#x}, not an xwin fixture file")
    _check(version == VERSION, f"{path}: unsupported version {version}")
    pos, out = 12, {}
    for _ in range(n):
        (ln,) = struct.unpack_from("<I", data, pos)
        name = data[pos + 4:pos + 4 + ln].decode()
        pos += 4 + ln
        (ndim,) = struct.unpack_from("<I", data, pos)
        dims = tuple(int(d) for d in np.frombuffer(data, "<u8", ndim, pos + 4))
        pos += 4 + 8 * ndim
        count = int(np.prod(dims))
        out[name] = np.frombuffer(data, "<f4", count, pos).reshape(dims).copy()
        pos += 4 * count
    _check(pos == len(data), f"{path}: {len(data) - pos} trailing bytes")
    return out
