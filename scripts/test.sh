#!/usr/bin/env bash
# Runs every check banger has: formatting, clippy, unit + integration tests (workspace), shell
# lint, and — as root where systemd-nspawn works — the smoke suite on a real systemd.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

# In CI (a fresh clone, built once) incremental compilation only costs disk: ~40% of target/.
if [[ -n "${CI:-}" ]]; then
  export CARGO_INCREMENTAL=0
fi

# A full run needs about 6 GiB free here: the debug and release builds (~2.5 GiB), the guest
# kernel's build tree when it is not cached (~2 GiB), the smoke images. Say what there is, so
# that a run that dies of a full disk says why in its first lines.
free_kib=$(df -Pk . | awk 'NR==2 {print $4}')
echo "disk: $((free_kib / 1024 / 1024)) GiB free for $(pwd)"
if ((free_kib < 6 * 1024 * 1024)); then
  echo "WARN: less than 6 GiB free: the build may fail with 'No space left on device'"
fi

step "dependencies"
if [[ $(id -u) -eq 0 ]]; then
  scripts/deps.sh --smoke
else
  scripts/deps.sh
fi

# The guest kernel for the smoke suite's real-guest scenarios (scripts/smoke/guest.sh): built once
# per machine by packaging/kernel/build.sh into /var/tmp/banger-cache/kernel/<key> (outside the
# clone, so later runs, and CI's fresh clones, take it from there in a second). A fresh machine
# builds it (~20 min on 2 cores) in the background, under nice, while the checks below run.
KERNEL_LOG=""
KERNEL_PID=""
if [[ $(id -u) -eq 0 && "${BANGER_SKIP_SMOKE:-}" != 1 ]] && command -v systemd-nspawn >/dev/null; then
  KERNEL_LOG=$(mktemp "${TMPDIR:-/tmp}/banger-kernel.XXXXXX")
  setsid packaging/kernel/build.sh >"$KERNEL_LOG" 2>&1 </dev/null &
  KERNEL_PID=$!
  # An early exit stops the build; the next run resumes it (make is incremental).
  trap '[[ -z $KERNEL_PID ]] || kill -- -"$KERNEL_PID" 2>/dev/null || true' EXIT
  echo "guest kernel: packaging/kernel/build.sh started (log $KERNEL_LOG)"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit + integration)"
cargo test --workspace --no-fail-fast

step "shellcheck"
shellcheck -x scripts/*.sh scripts/smoke/*.sh packaging/*.sh packaging/kernel/*.sh

step "smoke suite (real systemd in systemd-nspawn)"
if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: smoke suite: needs root for systemd-nspawn"
elif ! command -v systemd-nspawn >/dev/null; then
  echo "SKIP: smoke suite: systemd-nspawn not available"
elif [[ "${BANGER_SKIP_SMOKE:-}" == 1 ]]; then
  echo "SKIP: smoke suite: BANGER_SKIP_SMOKE=1"
else
  step "guest kernel (packaging/kernel/build.sh)"
  if wait "$KERNEL_PID"; then
    SMOKE_KERNEL_DIR=$(tail -n1 "$KERNEL_LOG")
    export SMOKE_KERNEL_DIR
    echo "guest kernel: $SMOKE_KERNEL_DIR/vmlinux, $(du -m "$SMOKE_KERNEL_DIR/vmlinux" | cut -f1) MiB," \
      "$(grep -h '^build_seconds=' "$SMOKE_KERNEL_DIR/build-info" || echo 'build time unknown') ($(grep -c '^kernel: cached' "$KERNEL_LOG") = from the cache)"
  else
    echo "WARN: guest kernel: packaging/kernel/build.sh failed; the guest scenarios will SKIP. Its output:"
    tail -n 20 "$KERNEL_LOG" | sed 's/^/  | /'
  fi
  KERNEL_PID=""
  rm -f "$KERNEL_LOG"
  scripts/smoke.sh
fi
