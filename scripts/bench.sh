#!/usr/bin/env bash
# Benchmarks (numbers, never pass/fail): CLI start-up beside /bin/true, binary size, RPC latency and
# throughput, idle RSS, guest networking (priv.net_up/net_down, nftables at 40 NAT VMs). Builds the
# release binary first.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet --workspace
bin=target/x86_64-unknown-linux-gnu/release/banger

n=${BENCH_SPAWNS:-2000}
spawn_time() { # command... -> seconds for $n runs
  local start end
  start=$(date +%s%N)
  for ((i = 0; i < n; i++)); do "$@" >/dev/null; done
  end=$(date +%s%N)
  echo $(((end - start) / 1000)) # microseconds
}
t_true=$(spawn_time /bin/true)
t_banger=$(spawn_time "$bin" --version)
awk -v a="$t_banger" -v b="$t_true" -v n="$n" 'BEGIN {
  printf "banger --version: %.1f us/run; /bin/true: %.1f us/run; ratio %.2fx (%d runs each)\n", a/n, b/n, a/b, n }'

size=$(stat -c %s "$bin")
awk -v s="$size" 'BEGIN { printf "binary size (stripped, static): %.2f MiB\n", s/1048576 }'
file "$bin" 2>/dev/null | sed 's/^/file: /' || true

BANGER_BENCH_BIN="$PWD/$bin" cargo bench --quiet --bench rpc
BANGER_BENCH_BIN="$PWD/$bin" cargo bench --quiet --bench vm
BANGER_BENCH_BIN="$PWD/$bin" cargo bench --quiet --bench snapshot
# Needs root (prints SKIP otherwise): works inside a network namespace it creates.
BANGER_BENCH_BIN="$PWD/$bin" cargo bench --quiet --bench net
