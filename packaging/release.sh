#!/usr/bin/env bash
# Builds one signed banger release into a release directory and merges it into manifest.json.
#
# Layout written (DESIGN.md §8):
#   OUT/<version>/banger-<version>-linux-amd64.tar.gz   one file, `banger`, mode 0755
#   OUT/<version>/SHA256SUMS                            GNU sha256sum format
#   OUT/<version>/SHA256SUMS.sig                        base64 DER ECDSA P-256/SHA-256 over SHA256SUMS
#   OUT/manifest.json                                   schema_version 1, releases merged by version
#
# The signature is `openssl dgst -sha256 -sign KEY | base64 -w0`: the same bytes `cosign sign-blob`
# produces, and what banger's verifier (src/update/signature.rs) checks.
set -euo pipefail

prog=${0##*/}

usage() {
	cat <<USAGE
usage: $prog --version vX.Y.Z --out DIR --key KEY.pem [options]
       $prog --key KEY.pem --print-pubkey

Builds (or takes with --binary) a banger binary stamped with the version, packs it, writes
SHA256SUMS, signs it with the ECDSA P-256 key, and writes/merges DIR/manifest.json.

options:
  --version V      release version (v prefix added if missing), e.g. v0.2.0
  --out DIR        release directory (served as-is over HTTP)
  --key KEY.pem    ECDSA P-256 private key (PEM) used to sign SHA256SUMS
  --gen-key        generate KEY.pem first (refuses to overwrite); also writes its public half
                   next to it (KEY.pub.pem) — embed that in src/update/signature.rs
  --print-pubkey   print the public key PEM of --key and exit
  --binary PATH    package this file instead of building (tests)
  --profile NAME   cargo profile to build with (default: release; "dev" for a quick build)
  --base-url URL   absolute URL OUT is served at; without it manifest URLs are relative
  --no-latest      do not make this version latest_stable
  -h, --help       this text

example:
  $prog --version v0.2.0 --out dist --key ~/keys/banger-release.pem
USAGE
}

die() {
	echo "$prog: $*" >&2
	exit 1
}

need_arg() {
	[[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

version="" out="" key="" binary="" base_url="" profile="release"
gen_key=0 latest=1 print_pubkey=0
while [[ $# -gt 0 ]]; do
	case $1 in
	--version) need_arg "$@"; version=$2; shift 2 ;;
	--out) need_arg "$@"; out=$2; shift 2 ;;
	--key) need_arg "$@"; key=$2; shift 2 ;;
	--binary) need_arg "$@"; binary=$2; shift 2 ;;
	--profile) need_arg "$@"; profile=$2; shift 2 ;;
	--base-url) need_arg "$@"; base_url=$2; shift 2 ;;
	--gen-key) gen_key=1; shift ;;
	--no-latest) latest=0; shift ;;
	--print-pubkey) print_pubkey=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
done

command -v openssl >/dev/null || die "openssl not found; install it (apt-get install openssl)"
[[ -n $key ]] || die "--key KEY.pem is required"

pub_path=${key%.pem}.pub.pem

if [[ $gen_key == 1 ]]; then
	[[ ! -e $key ]] || die "--gen-key: $key already exists; refusing to overwrite a signing key"
	(umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$key" 2>/dev/null) ||
		die "generating an ECDSA P-256 key at $key failed"
	openssl pkey -in "$key" -pubout -out "$pub_path"
	echo "generated signing key $key (public key: $pub_path)" >&2
fi

[[ -r $key ]] || die "cannot read signing key $key (use --gen-key to create one)"
openssl pkey -in "$key" -noout -text 2>/dev/null | grep -q 'prime256v1\|P-256' ||
	die "$key is not an ECDSA P-256 private key (banger verifies ECDSA P-256 only)"

if [[ $print_pubkey == 1 ]]; then
	openssl pkey -in "$key" -pubout
	exit 0
fi

[[ -n $version ]] || die "--version is required"
[[ -n $out ]] || die "--out is required"
version=v${version#v}
[[ $version =~ ^v[0-9][0-9A-Za-z]*(\.[0-9A-Za-z]+)*(-[0-9A-Za-z.]+)?$ ]] ||
	die "--version $version: expected vX.Y.Z (letters and digits in dot-separated parts)"
command -v python3 >/dev/null || die "python3 not found (needed to merge manifest.json)"
if [[ $latest == 0 && ! -f $out/manifest.json ]]; then
	die "--no-latest needs an existing $out/manifest.json that names latest_stable"
fi

tar_name="banger-$version-linux-amd64.tar.gz"
rel_dir="$out/$version"
[[ ! -e $rel_dir/$tar_name ]] || die "$rel_dir/$tar_name already exists; releases are immutable, remove it first"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [[ -z $binary ]]; then
	repo=$(cd "$(dirname "$0")/.." && pwd)
	echo "building banger $version (cargo profile $profile)..." >&2
	binary=$(cd "$repo" && BANGER_VERSION=$version cargo build --locked --profile "$profile" \
		--bin banger --message-format=json-render-diagnostics |
		python3 -c '
import json, sys
exe = ""
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] == "banger":
        exe = msg["executable"]
print(exe)
')
	[[ -n $binary && -x $binary ]] || die "cargo build did not produce a banger executable"
	if ! "$binary" --version 2>/dev/null | grep -qF "$version"; then
		echo "$prog: warning: '$binary --version' does not name $version" >&2
	fi
fi
[[ -f $binary ]] || die "--binary $binary is not a file"

mkdir -p "$rel_dir"
install -m 0755 "$binary" "$work/banger"
tar --format=gnu --owner=0 --group=0 --numeric-owner --mtime="@${SOURCE_DATE_EPOCH:-0}" \
	-C "$work" -cf - banger | gzip -n -9 >"$work/$tar_name"
(cd "$work" && sha256sum "$tar_name") >"$work/SHA256SUMS"

openssl dgst -sha256 -sign "$key" -out "$work/SHA256SUMS.der" "$work/SHA256SUMS"
base64 -w0 "$work/SHA256SUMS.der" >"$work/SHA256SUMS.sig"
openssl pkey -in "$key" -pubout -out "$work/pub.pem"
openssl dgst -sha256 -verify "$work/pub.pem" -signature "$work/SHA256SUMS.der" "$work/SHA256SUMS" >/dev/null ||
	die "self-check failed: openssl cannot verify the signature it just made"

for f in "$tar_name" SHA256SUMS SHA256SUMS.sig; do
	mv "$work/$f" "$rel_dir/$f"
done

if [[ -n $base_url ]]; then
	prefix="${base_url%/}/$version"
else
	prefix="$version"
fi

python3 - "$out/manifest.json" "$version" "$prefix/$tar_name" "$prefix/SHA256SUMS" \
	"$prefix/SHA256SUMS.sig" "$latest" <<'PY'
import json, os, sys

path, version, tar_url, sums_url, sig_url, latest = sys.argv[1:7]
norm = lambda v: str(v).strip().lstrip("v")
if os.path.exists(path):
    with open(path) as f:
        m = json.load(f)
    if not isinstance(m, dict) or m.get("schema_version") != 1:
        sys.exit(f"release.sh: {path} is not a schema_version 1 manifest; refusing to merge")
else:
    m = {"schema_version": 1, "releases": []}
release = {
    "version": version,
    "tarball_url": tar_url,
    "sha256sums_url": sums_url,
    "sha256sums_sig_url": sig_url,
}
releases = m.get("releases") or []
for i, r in enumerate(releases):
    if norm(r.get("version", "")) == norm(version):
        releases[i] = release
        break
else:
    releases.append(release)
if latest == "1":
    m["latest_stable"] = version
elif not m.get("latest_stable"):
    sys.exit("release.sh: --no-latest needs an existing manifest.json with latest_stable")
out = {"schema_version": 1, "latest_stable": m["latest_stable"], "releases": releases}
for k, v in m.items():
    out.setdefault(k, v)
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
PY

echo "release $version written to $rel_dir (manifest: $out/manifest.json)"
