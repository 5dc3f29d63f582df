#!/usr/bin/env bash
# Runs every check banger has: formatting, clippy, unit + integration tests (workspace), shell
# lint, and — as root where systemd-nspawn works — the smoke suite on a real systemd.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "dependencies"
if [[ $(id -u) -eq 0 ]]; then
  scripts/deps.sh --smoke
else
  scripts/deps.sh
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit + integration)"
cargo test --workspace --no-fail-fast

step "shellcheck"
shellcheck -x scripts/*.sh scripts/smoke/*.sh packaging/*.sh

step "smoke suite (real systemd in systemd-nspawn)"
if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: smoke suite: needs root for systemd-nspawn"
elif ! command -v systemd-nspawn >/dev/null; then
  echo "SKIP: smoke suite: systemd-nspawn not available"
elif [[ "${BANGER_SKIP_SMOKE:-}" == 1 ]]; then
  echo "SKIP: smoke suite: BANGER_SKIP_SMOKE=1"
else
  scripts/smoke.sh
fi
