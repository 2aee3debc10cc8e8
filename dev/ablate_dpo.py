"""DPO ablation on the built-in world: pair strategy x set size, each run's gold-judge mean.

    python3 dev/ablate_dpo.py [--set out/set/xwin_set.jsonl] [--model out/rs/model.bin]
                              [--ns 8,16,64] [--out out/ablation] [--table dev/ablation_dpo.md]

Run it after `./train_dpo` (which makes the Xwin-Set and the RS model). For every n, the set
keeps the first n responses of each prompt (each response has its own random stream, so
these are the responses a set of n would have drawn); for every strategy it builds the
DPO pairs as the recipe does (the best by reward + log pi, ./sample -m select's default score,
against 0: the worst, 1: a random lower one, 2: the one nearest mu - 2 sigma; the last 50
pairs held out), trains
DPO from the RS model with train_dpo's defaults, and scores the result's greedy answers to
the 200 held-out prompts with the gold judge (./sample -m eval). Writes a Markdown table.
Standard library only; about 1-2 minutes per run on 2 CPU cores.
"""

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ["best-worst", "best-random", "best-mu-2sigma"]


def run(cmd):
    print("$ " + cmd, flush=True)
    out = subprocess.run(cmd, shell=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        sys.exit(f"error: this command failed (exit {out.returncode}): {cmd}\n{out.stdout[-2000:]}")
    return out.stdout


def slice_set(src, dst, n):
    keys = ("responses", "rm_scores", "policy_logps", "gold_scores")
    with open(src) as f, open(dst, "w") as g:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if len(row["responses"]) < n:
                sys.exit(f"error: {src}: a prompt has {len(row['responses'])} responses, fewer than n = {n}")
            for k in keys:
                if k in row:
                    row[k] = row[k][:n]
            g.write(json.dumps(row) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="out/set/xwin_set.jsonl")
    ap.add_argument("--model", default="out/rs/model.bin")
    ap.add_argument("--ns", default="8,16,64")
    ap.add_argument("--out", default="out/ablation")
    ap.add_argument("--table", default="dev/ablation_dpo.md")
    args = ap.parse_args()
    os.makedirs(os.path.join(ROOT, args.out), exist_ok=True)
    ns = [int(x) for x in args.ns.split(",")]
    base = run(f"./sample -m eval -e {args.model}")
    base_mean = float(re.search(r"gold judge mean ([0-9.]+)", base).group(1))
    results = {}
    for n in ns:
        set_n = f"{args.out}/set_{n}.jsonl"
        slice_set(os.path.join(ROOT, args.set), os.path.join(ROOT, set_n), n)
        for g, name in enumerate(STRATEGIES):
            d = f"{args.out}/{name}_{n}"
            os.makedirs(os.path.join(ROOT, d), exist_ok=True)
            run(f"./sample -m select -i {set_n} -W {d}/pairs.jsonl -Y {g}")
            run(f"head -n -50 {d}/pairs.jsonl > {d}/train.jsonl && tail -n 50 {d}/pairs.jsonl > {d}/val.jsonl")
            for split in ("train", "val"):
                run(f"rm -f {d}/{split}.pairs.logps && python3 dev/data/prepare_pairs.py {d}/{split}.jsonl {d}/{split}.pairs --tokenizer byte")
            run(f"./train_dpo -e {args.model} -i {d}/train.pairs -j {d}/val.pairs -p '' -o {d}")
            out = run(f"./sample -m eval -e {d}/model.bin")
            results[(name, n)] = float(re.search(r"gold judge mean ([0-9.]+)", out).group(1))
            print(f"{name} n={n}: gold judge mean {results[(name, n)]:.2f} (RS {base_mean:.2f})", flush=True)
    lines = [f"DPO from the RS model (gold judge mean {base_mean:.2f}) on pairs from the first n responses of each "
             "prompt of the Xwin-Set; the gold judge's mean over the 200 held-out prompts "
             "(`python3 dev/ablate_dpo.py`).", "",
             "| pairs | " + " | ".join(f"n = {n}" for n in ns) + " |",
             "| --- | " + " | ".join("---" for _ in ns) + " |"]
    for name in STRATEGIES:
        lines.append(f"| {name} | " + " | ".join(f"{results[(name, n)]:.2f}" for n in ns) + " |")
    with open(os.path.join(ROOT, args.table), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
