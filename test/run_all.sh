#!/usr/bin/env bash
# Runs every test binary given as an argument (from the repository root), printing each
# one's wall time, then the closing line "total: N passed, N failed[, N skipped]" summed
# over their test cases. Exits non-zero if any binary failed or did not report.
set -u
passed=0
failed=0
skipped=0
status=0
for bin in "$@"; do
    echo "== $bin"
    log=$(mktemp)
    start=$(date +%s)
    "$bin" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    echo "== $bin: $(( $(date +%s) - start )) s"
    line=$(grep -E '^[A-Za-z0-9_.-]+: [0-9]+ passed, [0-9]+ failed(, [0-9]+ skipped)?$' "$log" | tail -n 1)
    rm -f "$log"
    if [ -z "$line" ]; then
        echo "$bin: no summary line (exit code $rc): counted as 1 failed"
        failed=$((failed + 1))
        status=1
        continue
    fi
    p=$(echo "$line" | sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed.*/\1/')
    f=$(echo "$line" | sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed.*/\2/')
    s=$(echo "$line" | sed -nE 's/.*, ([0-9]+) skipped$/\1/p')
    passed=$((passed + p))
    failed=$((failed + f))
    skipped=$((skipped + ${s:-0}))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then failed=$((failed + 1)); fi
    [ "$rc" -ne 0 ] && status=1
done
if [ "$skipped" -gt 0 ]; then
    echo "total: $passed passed, $failed failed, $skipped skipped"
else
    echo "total: $passed passed, $failed failed"
fi
exit $status
