#!/usr/bin/env bash
# Builds banger's guest kernel: an uncompressed vmlinux (ELF, everything built in, no modules, no
# initrd) from Debian's linux-source-6.1 package, Firecracker's reference config
# (firecracker-x86_64-6.1.config) and banger's fragment (banger.config).
#
# Usage: packaging/kernel/build.sh [--out DIR] [--cache DIR] [-j N] [--cached-only]
#   --cache DIR  where finished kernels are kept, one directory per key
#                (default /var/tmp/banger-cache/kernel); the key is
#                <linux-source version>-<sha256 of base config + fragment, 16 hex>
#   --out DIR    also copy vmlinux, config and vmlinux.sha256 into DIR
#   -j N         parallel make jobs (default: number of CPUs)
#   --cached-only  never build: print the cached kernel's directory, or exit 3 if there is none
#                (for tests that use the kernel only when it exists)
#
# Writes <cache>/<key>/{vmlinux,config,vmlinux.sha256,build-info} and prints that directory on
# stdout (last line). Idempotent: with a finished kernel in the cache it does no work. An
# interrupted build resumes from <cache>/<key>.build (make is incremental). Concurrent runs for
# the same key wait for each other (flock). Needs root only to install missing packages.
#
# The compiler runs under `nice -n 19 ionice -c3`: on an idle machine that costs nothing, on a
# shared one it keeps interactive work responsive.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
base_config="$here/firecracker-x86_64-6.1.config"
fragment="$here/banger.config"
cache=/var/tmp/banger-cache/kernel
out=""
jobs=$(nproc)
cached_only=no

die() { echo "kernel: $*" >&2; exit 1; }
say() { echo "kernel: $*" >&2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out=$2; shift 2 ;;
    --cache) [[ $# -ge 2 ]] || die "--cache needs a directory"; cache=$2; shift 2 ;;
    -j) [[ $# -ge 2 ]] || die "-j needs a number"; jobs=$2; shift 2 ;;
    -j*) jobs=${1#-j}; shift ;;
    --cached-only) cached_only=yes; shift ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (usage: build.sh [--out DIR] [--cache DIR] [-j N])" ;;
  esac
done
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "-j wants a positive number, got '$jobs'"

# The key needs the installed source version; without it nothing can be cached for us.
if [[ $cached_only == yes ]]; then
  version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null) \
    || { say "linux-source-6.1 is not installed: no cached kernel"; exit 3; }
  final="$cache/$version-$(cat "$base_config" "$fragment" | sha256sum | cut -c1-16)"
  if [[ -f "$final/vmlinux" ]] && (cd "$final" && sha256sum --quiet -c vmlinux.sha256); then
    if [[ -n "$out" ]]; then
      mkdir -p "$out"
      cp -f "$final/vmlinux" "$final/config" "$final/vmlinux.sha256" "$out/"
    fi
    echo "$final"
    exit 0
  fi
  say "no cached kernel in $final (build it: packaging/kernel/build.sh)"
  exit 3
fi

# --- packages: the source and what `make vmlinux` needs ---------------------------------------
want=(linux-source-6.1 bc bison flex libelf-dev libssl-dev make gcc libc6-dev xz-utils cpio perl)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  [[ $(id -u) -eq 0 ]] || die "missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
tarball=$(dpkg -L linux-source-6.1 | grep -E '/usr/src/linux-source-6\.1\.tar\.(xz|bz2|gz)$' | head -n1)
[[ -n "$tarball" && -f "$tarball" ]] || die "linux-source-6.1 $version installed but its tarball is not under /usr/src (reinstall it: apt-get install --reinstall linux-source-6.1)"
config_hash=$(cat "$base_config" "$fragment" | sha256sum | cut -c1-16)
key="$version-$config_hash"
final="$cache/$key"

mkdir -p "$cache"
exec 9>"$cache/$key.lock"
flock 9

finish() {
  if [[ -n "$out" ]]; then
    mkdir -p "$out"
    cp -f "$final/vmlinux" "$final/config" "$final/vmlinux.sha256" "$out/"
  fi
  echo "$final"
}

if [[ -f "$final/vmlinux" && -f "$final/vmlinux.sha256" ]]; then
  if (cd "$final" && sha256sum --quiet -c vmlinux.sha256); then
    say "cached: $final"
    finish
    exit 0
  fi
  say "cached kernel in $final fails its checksum: rebuilding"
  rm -rf "$final"
fi

build="$cache/$key.build"
log="$cache/$key.log"
src="$build/src"
started=$(date +%s)
say "building linux-source-6.1 $version (config $config_hash) with -j$jobs; log: $log"

if [[ ! -f "$build/unpacked" ]]; then
  rm -rf "$build"
  mkdir -p "$src"
  say "unpacking $tarball"
  tar -xf "$tarball" -C "$src" --strip-components=1
  touch "$build/unpacked"
fi

# Base config + fragment -> .config, then let Kconfig resolve everything else.
(cd "$src" && scripts/kconfig/merge_config.sh -m "$base_config" "$fragment") >"$log" 2>&1 \
  || die "merging the configs failed (see $log)"
make -C "$src" olddefconfig >>"$log" 2>&1 || die "make olddefconfig failed (see $log)"

# Every line of the fragment must have survived olddefconfig (a missing dependency would
# otherwise silently drop, say, virtio-vsock and the guest would boot without it).
lost=()
while IFS= read -r line; do
  [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]] || continue
  name=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
  if [[ "$value" == n ]]; then
    grep -q "^$name=" "$src/.config" && lost+=("$name=n")
  else
    grep -qx "$name=$value" "$src/.config" || lost+=("$name=$value")
  fi
done <"$fragment"
[[ ${#lost[@]} -eq 0 ]] || die "olddefconfig dropped settings of banger.config: ${lost[*]} (a dependency is missing; fix banger.config)"

nice_cmd=(nice -n 19)
command -v ionice >/dev/null && nice_cmd+=(ionice -c3)
say "make -j$jobs vmlinux (about 15 min on 2 idle cores)"
if ! "${nice_cmd[@]}" make -C "$src" -j"$jobs" vmlinux >>"$log" 2>&1; then
  tail -n 20 "$log" >&2
  die "make vmlinux failed (full log: $log)"
fi

# Publish atomically: a reader sees either no kernel or a complete one.
staging="$cache/$key.tmp"
rm -rf "$staging"
mkdir -p "$staging"
cp "$src/vmlinux" "$staging/vmlinux"
cp "$src/.config" "$staging/config"
(cd "$staging" && sha256sum vmlinux >vmlinux.sha256)
elapsed=$(($(date +%s) - started))
cat >"$staging/build-info" <<EOF
source=linux-source-6.1 $version
config_hash=$config_hash
jobs=$jobs
build_seconds=$elapsed
built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
mv "$staging" "$final"
rm -rf "$build"
say "built in ${elapsed}s: $final ($(du -h "$final/vmlinux" | cut -f1))"
finish
