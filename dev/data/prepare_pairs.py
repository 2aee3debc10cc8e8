"""Turn preference pairs (JSONL, TRL's convention) into an xwin.cu pair file (.pairs).

    python dev/data/prepare_pairs.py IN.jsonl OUT.pairs --tokenizer byte [--max-len 256]
    python dev/data/prepare_pairs.py IN.jsonl OUT.pairs --hf HF_FOLDER   [--max-len 4096]

Each input line is {"chosen": [messages], "rejected": [messages], "score_chosen": x,
"score_rejected": y} with an optional "kind" (a group name, e.g. the world's task kind,
for per-group measures). The two conversations are message lists as prepare_sft.py
reads them and must be the same up to their final assistant message: that is the
prompt, the final answers differ. The ratings must be finite with score_chosen >
score_rejected (ties carry no preference).

Each conversation is rendered and tokenized exactly as prepare_sft.py does (the same
chat template, --template or the --hf folder's, Vicuna v1.1 by default; the same loss
mask), so the reward model scores the
sequences an SFT model was trained on. prompt_len, stored per pair, is where the
final answer's mask starts; the two token sequences must agree before it, else the
line is bad. The pair file format is documented in llm.cu ("Pair file format").

BAD LINES are reported as "IN:LINE: problem"; without --skip-bad any bad line is an
error and nothing is written. A pair longer than --max-len tokens is dropped and counted.
"""

import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from prepare_sft import PrepareError, check_messages, good_lines, run_cli  # noqa: E402


def answer_start(mask):
    """Index where the last run of mask 1 (the final answer and its end-of-turn token)
    starts; what follows it (ChatML's "\n") is not a target."""
    i = len(mask)
    while i > 0 and mask[i - 1] == 0:
        i -= 1
    while i > 0 and mask[i - 1] == 1:
        i -= 1
    return i


def encode_pair(encode, obj):
    """(chosen ids, chosen mask, rejected ids, rejected mask, prompt_len, scores, kind)."""
    if not isinstance(obj, dict):
        raise PrepareError("not a JSON object")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise PrepareError(f"no '{key}' conversation")
    scores = []
    for key in ("score_chosen", "score_rejected"):
        v = obj.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise PrepareError(f"'{key}' is not a finite number")
        scores.append(float(v))
    if not scores[0] > scores[1]:
        raise PrepareError(f"score_chosen {scores[0]} is not above score_rejected {scores[1]}")
    kind = obj.get("kind", "")
    if not isinstance(kind, str) or len(kind.encode("utf-8")) > 15:
        raise PrepareError("'kind' must be a string of at most 15 bytes")
    try:
        sys_c, pairs_c = check_messages(obj["chosen"])
    except PrepareError as e:
        raise PrepareError(f"chosen: {e}")
    try:
        sys_r, pairs_r = check_messages(obj["rejected"])
    except PrepareError as e:
        raise PrepareError(f"rejected: {e}")
    if sys_c != sys_r or pairs_c[:-1] != pairs_r[:-1] or pairs_c[-1][0] != pairs_r[-1][0]:
        raise PrepareError("chosen and rejected differ before their final assistant message")
    ids_c, mask_c = encode(sys_c, pairs_c)
    ids_r, mask_r = encode(sys_r, pairs_r)
    prompt_len = min(answer_start(mask_c), answer_start(mask_r))
    if ids_c[:prompt_len] != ids_r[:prompt_len]:
        raise PrepareError("the chosen and rejected prompt tokens differ (the tokenizer merged across the answer's start)")
    return ids_c, mask_c, ids_r, mask_r, prompt_len, scores, kind


def prepare(in_path, out_path, encode, max_len, quiet=False, skip_bad=False):
    import xwin_format as xf
    seqs, masks, records, kinds = [], [], [], []
    stats = {"read": 0, "pairs": 0, "dropped": 0, "bad": 0}
    for ids_c, mask_c, ids_r, mask_r, prompt_len, scores, kind in good_lines(in_path, lambda obj: encode_pair(encode, obj), stats, skip_bad):
        if max(len(ids_c), len(ids_r)) > max_len:
            stats["dropped"] += 1
            continue
        if kind not in kinds:
            kinds.append(kind)
        seqs += [ids_c, ids_r]
        masks += [mask_c, mask_r]
        records.append((prompt_len, kind, scores[0], scores[1]))
    if stats["bad"] and not skip_bad:
        raise PrepareError(f"{in_path}: {stats['bad']} bad line(s), reported above; nothing written "
                           "(--skip-bad leaves them out)")
    if not records:
        raise PrepareError(f"{in_path}: no pair fits in {max_len} tokens")
    groups = sorted(kinds) if kinds != [""] else []
    xf.write_pairs(out_path, groups, [(p, groups.index(k) if groups else 0, c, r) for p, k, c, r in records], seqs, masks)
    stats["pairs"] = len(records)
    if not quiet:
        print(f"{in_path}: {stats['read']} lines: {stats['pairs']} pairs, {stats['dropped']} dropped (longer than "
              f"{max_len} tokens), {stats['bad']} bad" + (f"; groups {groups}" if groups else ""))
        print(f"wrote {out_path}: {stats['pairs']} pairs, {sum(len(s) for s in seqs)} tokens, "
              f"{os.path.getsize(out_path):,} bytes")
    return stats


def main(argv=None):
    return run_cli("prepare_pairs", "Preference pairs JSONL -> .pairs with a chat template.", prepare, argv,
                   "longest sequence in tokens; longer pairs are dropped (default 256)")


if __name__ == "__main__":
    sys.exit(main())
