"""The whole recipe (./train_dpo) over several seeds: each stage's gold-judge mean per seed, and
its mean, range and standard deviation over the seeds.

    make && python3 dev/recipe_seeds.py --seeds 1337 2 3 [--jobs 1] [--runs runs]
    python3 dev/recipe_seeds.py --seeds 1337 2 3 --dry-run       the commands, nothing run
    python3 dev/recipe_seeds.py --seeds 1337 2 3 --report-only   the table of the runs made before

For every seed N, the run folder runs/seed_N/ gets symlinks to the repository's data/ and dev/
(the recipe reads data/world/... and dev/data/... and writes out/... relative to where it runs),
and `<repo>/train_dpo -S N` runs there: every stage that is missing runs with the seed (-S to
train_sft, train_rm and sample), then DPO and the stage table, out/report.md. Its output
is appended to runs/seed_N/recipe.log; a run folder that already holds a stage's output skips
that stage, so an interrupted run goes on where it stopped. Seed 1337 is the programs' default,
so runs/seed_1337 is the recipe of a plain `./train_dpo`.

The summary is read from each run's out/report.md (its stage table: SFT, RS and DPO's judge
means over the 200 held-out prompts) and from recipe.log (train_rm's closing lines: its held-out
pair accuracy, over all pairs and per kind; without them, the last val_accuracy of
out/rm/log.jsonl, over all pairs). The standard deviation is the sample one (n - 1);
it is 0 for a single seed. The recipe takes 20-30 minutes a seed on 2 CPU cores; --jobs runs
that many seeds at once (each takes every core it finds: on a small machine keep 1).
Standard library only.
"""

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["SFT", "RS", "DPO"]


def run_dir(runs, seed):
    return os.path.join(runs, "seed_%d" % seed)


def setup_commands(runs, seed, binary):
    d = run_dir(runs, seed)
    return [
        "mkdir -p %s" % d,
        "ln -sfn %s %s" % (os.path.join(ROOT, "data"), os.path.join(d, "data")),
        "ln -sfn %s %s" % (os.path.join(ROOT, "dev"), os.path.join(d, "dev")),
        "cd %s && %s -S %d >> recipe.log 2>&1" % (d, binary, seed),
    ]


def link(target, path):
    if os.path.islink(path):
        if os.readlink(path) == target:
            return
        os.remove(path)
    elif os.path.exists(path):
        sys.exit("error: %s exists and is not a link to %s" % (path, target))
    os.symlink(target, path)


def run_seed(runs, seed, binary):
    d = run_dir(runs, seed)
    os.makedirs(d, exist_ok=True)
    link(os.path.join(ROOT, "data"), os.path.join(d, "data"))
    link(os.path.join(ROOT, "dev"), os.path.join(d, "dev"))
    t0 = time.time()
    with open(os.path.join(d, "recipe.log"), "a") as log:
        log.write("\n$ %s -S %d\n" % (binary, seed))
        log.flush()
        rc = subprocess.run([binary, "-S", str(seed)], cwd=d, stdout=log, stderr=subprocess.STDOUT).returncode
    return seed, rc, time.time() - t0


def read_stage_table(report_path):
    """({stage: judge mean}, {stage: right answers}) from the stage table of a report.md (rows
    "| SFT | 2.55 | ..."; the right answers in the column headed "right answers", where there is one)."""
    means, right, right_col = {}, {}, None
    with open(report_path) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells and cells[0] == "stage":
                right_col = cells.index("right answers") if "right answers" in cells else None
            if len(cells) >= 2 and cells[0] in STAGES and re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", cells[1]):
                means[cells[0]] = float(cells[1])
                if right_col is not None and right_col < len(cells) and re.fullmatch(r"[0-9]+", cells[right_col]):
                    right[cells[0]] = int(cells[right_col])
    return means, right


def read_rm_accuracy(log_path, rm_log):
    """{kind: held-out accuracy} ("all" for every pair) from train_rm's last closing lines in the
    recipe's output; without them, "all" is the last val_accuracy of train_rm's log.jsonl."""
    lines = []
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    acc = {}
    if os.path.exists(rm_log):
        with open(rm_log) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("val_accuracy"), (int, float)):
                    acc = {"all": float(row["val_accuracy"])}
    for i, line in enumerate(lines):
        m = re.match(r"held-out pairs: accuracy ([0-9.]+)", line)
        if not m:
            continue
        acc = {"all": float(m.group(1))}  # the last run's lines win
        for follow in lines[i + 1:]:
            g = re.match(r"  (\S+) +accuracy ([0-9.]+) \|", follow)
            if not g:
                break
            acc[g.group(1)] = float(g.group(2))
    return acc


def table(title, rows, seeds, fmt):
    """A Markdown table: a row per name, a column per seed, then the mean, min..max and std."""
    out = ["%s" % title, "", "| | " + " | ".join("seed %d" % s for s in seeds) + " | mean | min..max | std |",
           "| --- |" + " --- |" * (len(seeds) + 3)]
    for name, values in rows:
        cells = [fmt % values[s] if s in values else "-" for s in seeds]
        got = [values[s] for s in seeds if s in values]
        if got:
            std = statistics.stdev(got) if len(got) > 1 else 0.0
            stats = [fmt % statistics.mean(got), (fmt + ".." + fmt) % (min(got), max(got)), fmt % std]
        else:
            stats = ["-", "-", "-"]
        out.append("| %s | %s | %s |" % (name, " | ".join(cells), " | ".join(stats)))
    return "\n".join(out)


def summary(runs, seeds):
    means, right, rm, missing = {}, {}, {}, []
    for s in seeds:
        report = os.path.join(run_dir(runs, s), "out", "report.md")
        if os.path.exists(report):
            means[s], right[s] = read_stage_table(report)
        else:
            missing.append(report)
        rm[s] = read_rm_accuracy(os.path.join(run_dir(runs, s), "recipe.log"), os.path.join(run_dir(runs, s), "out", "rm", "log.jsonl"))
    for path in missing:
        print("no report: %s (that seed is left out of the statistics)" % path)
    rows = [(st, {s: means[s][st] for s in means if st in means[s]}) for st in STAGES]
    print(table("gold judge mean (0..10) on the held-out prompts, per stage and seed:", rows, seeds, "%.2f"))
    rows = [(st, {s: right[s][st] for s in right if st in right[s]}) for st in STAGES]
    if any(values for _, values in rows):
        print()
        print(table("right answers (the gold value in any frame: a judge score of 4 or more) of the held-out prompts, "
                    "per stage and seed:", rows, seeds, "%.1f"))
    kinds = []
    for s in seeds:
        kinds += [k for k in rm[s] if k not in kinds]
    if kinds:
        rows = [(k, {s: rm[s][k] for s in seeds if k in rm[s]}) for k in kinds]
        print()
        print(table("reward model: held-out pair accuracy (train_rm's closing lines in recipe.log, else the "
                    "last val_accuracy of out/rm/log.jsonl), per kind and seed:", rows, seeds, "%.3f"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 2, 3], help="the seeds (default 1337 2 3)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once (default 1)")
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="the folder of the run folders seed_<N> (default <repo>/runs)")
    ap.add_argument("--binary", default=os.path.join(ROOT, "train_dpo"), help="train_dpo (default <repo>/train_dpo; the stage programs are beside it)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    ap.add_argument("--report-only", action="store_true", help="run nothing: the table of the reports already in the run folders")
    args = ap.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        sys.exit("error: --seeds repeats a seed")
    runs, binary = os.path.abspath(args.runs), os.path.abspath(args.binary)
    if args.dry_run:
        for s in args.seeds:
            for cmd in setup_commands(runs, s, binary):
                print(cmd)
        return
    failed = []
    if not args.report_only:
        if not os.access(binary, os.X_OK):
            sys.exit("error: %s is missing: build it with make" % binary)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for seed in args.seeds:
                print("$ " + setup_commands(runs, seed, binary)[-1], flush=True)
            for seed, rc, secs in pool.map(lambda s: run_seed(runs, s, binary), args.seeds):
                log = os.path.join(run_dir(runs, seed), "recipe.log")
                print("seed %d: %s in %.0f s (%s)" % (seed, "done" if rc == 0 else "failed (exit %d)" % rc, secs, log), flush=True)
                if rc != 0:
                    failed.append(seed)
        print()
        if failed:
            print("failed seeds: %s" % " ".join(map(str, failed)))
    summary(runs, args.seeds)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
