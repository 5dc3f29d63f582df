# shellcheck shell=bash
# Network scenarios (DESIGN.md §10, issue 8): taps, the bridge and the `inet banger` nftables table,
# inside the container's own network namespace (--private-network).
# shellcheck source=scripts/smoke/lib.sh
[[ -n ${SMOKE_LIB_LOADED:-} ]] || source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCENARIOS+=(
)
