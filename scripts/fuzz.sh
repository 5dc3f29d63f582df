#!/usr/bin/env bash
# Runs each property test in src/proptests.rs (the parsers that read outside bytes) over and over
# with fresh random inputs for a bounded time, then prints cases run and failures per property and
# in total. `cargo test` runs the same properties with 64 cases each; this is the long run.
#
# Usage: scripts/fuzz.sh [--seconds N] [--batch N] [--only SUBSTRING]
#   --seconds N   time per property (default 60)
#   --batch N     cases per run of a property (PROPTEST_CASES, default 512)
#   --only S      only the properties whose name contains S
# Exit status: 0 when no property failed, 1 otherwise. The first failing run's output (proptest's
# shrunk failing input) is kept in target/fuzz/<property>.fail.log.
set -euo pipefail

seconds=60
batch=512
only=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fuzz.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$seconds" =~ ^[0-9]+$ && "$batch" =~ ^[1-9][0-9]*$ ]] || {
  echo "fuzz.sh: --seconds and --batch take whole numbers" >&2; exit 2; }

cd "$(dirname "$0")/.."
build_log=$(cargo test --lib --no-run 2>&1) || { echo "$build_log" >&2; exit 1; }
bin=$(grep -o '(target/[^)]*/deps/banger-[0-9a-f]*)' <<<"$build_log" | tr -d '()' | tail -n1)
[[ -x "$bin" ]] || { echo "fuzz.sh: could not find the lib test binary in cargo's output" >&2; exit 1; }
# Run a private copy: a build during the run (cargo replaces the binary) must not count as failures.
mkdir -p target/fuzz
cp "$bin" target/fuzz/proptests.bin
bin=target/fuzz/proptests.bin

mapfile -t props < <("$bin" --list 'proptests::' 2>/dev/null | sed -n 's/: test$//p' | grep -F -- "$only")
[[ ${#props[@]} -gt 0 ]] || { echo "fuzz.sh: no property matches '$only'" >&2; exit 2; }

total_cases=0
total_failures=0
printf '%-52s %10s %9s %8s\n' property cases failures seconds
for p in "${props[@]}"; do
  cases=0
  failures=0
  start=$SECONDS
  while (( SECONDS - start < seconds )); do
    if out=$(PROPTEST_CASES=$batch "$bin" --exact "$p" --test-threads 1 -q 2>&1); then
      cases=$((cases + batch))
    else
      failures=$((failures + 1))
      log="target/fuzz/${p//::/_}.fail.log"
      [[ -e "$log" ]] || printf '%s\n' "$out" >"$log"
      # A failing run stops at its first failure (then shrinks): count the cases it got through
      # as unknown, the failure once.
    fi
  done
  total_cases=$((total_cases + cases))
  total_failures=$((total_failures + failures))
  printf '%-52s %10d %9d %8d\n' "$p" "$cases" "$failures" "$((SECONDS - start))"
  if (( failures > 0 )); then
    echo "  first failure: target/fuzz/${p//::/_}.fail.log" >&2
  fi
done
printf '%-52s %10d %9d\n' TOTAL "$total_cases" "$total_failures"
(( total_failures == 0 ))
