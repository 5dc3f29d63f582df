#!/usr/bin/env bash
# Builds one signed banger release into a release directory and merges it into manifest.json.
#
# Layout written (DESIGN.md §8):
#   OUT/<version>/banger-<version>-linux-amd64.tar.gz   one file, `banger`, mode 0755
#   OUT/<version>/SHA256SUMS                            GNU sha256sum format
#   OUT/<version>/SHA256SUMS.sig                        base64 DER ECDSA P-256/SHA-256 over SHA256SUMS
#   OUT/manifest.json                                   schema_version 1, releases merged by version
#   OUT/install.sh                                      packaging/install.sh (the verifying installer)
#
# install.sh verifies releases against the keys embedded in it, so they must be the keys compiled
# into the binary (`banger --release-keys`, from src/update/signature.rs): the builder compares
# their fingerprints and refuses to publish anything when they differ. A --binary that is a script
# (a test stand-in, not a banger build) has no keys to compare: it is released without install.sh.
#
# The signature is `openssl dgst -sha256 -sign KEY | base64 -w0`: the same bytes `cosign sign-blob`
# produces, and what banger's verifier (src/update/signature.rs) checks.
set -euo pipefail

prog=${0##*/}

usage() {
	cat <<USAGE
usage: $prog --version vX.Y.Z --out DIR --key KEY.pem [options]
       $prog --key KEY.pem --print-pubkey

Builds (or takes with --binary) a banger binary stamped with the version, checks that the keys
embedded in packaging/install.sh are the binary's (banger --release-keys), packs it, writes
SHA256SUMS, signs it with the ECDSA P-256 key, writes/merges DIR/manifest.json and publishes
install.sh as DIR/install.sh.

options:
  --version V      release version (v prefix added if missing), e.g. v0.2.0
  --out DIR        release directory (served as-is over HTTP)
  --key KEY.pem    ECDSA P-256 private key (PEM) used to sign SHA256SUMS
  --gen-key        generate KEY.pem first (refuses to overwrite); also writes its public half
                   next to it (KEY.pub.pem) — embed that in src/update/signature.rs and in
                   packaging/install.sh (RELEASE_KEYS)
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

# --- install.sh's keys must be the binary's -------------------------------------------------------
install_sh=$(cd "$(dirname "$0")" && pwd)/install.sh
[[ -f $install_sh ]] || die "$install_sh not found (it is published beside manifest.json)"

# fingerprints FILE PREFIX: SHA256:<hex> of each PUBLIC KEY block in FILE, sorted, one a line.
fingerprints() {
	local f hex
	while IFS= read -r f; do
		[[ -n $f ]] || continue
		hex=$(openssl pkey -pubin -in "$f" -outform DER 2>/dev/null | sha256sum) ||
			die "$1: a PUBLIC KEY block openssl cannot read"
		echo "SHA256:${hex%% *}"
	done < <(awk -v p="$2" '
		/-----BEGIN PUBLIC KEY-----/ { n++; f = p "." n ".pem"; sub(/^.*-----BEGIN/, "-----BEGIN") }
		f != "" { print > f }
		/-----END PUBLIC KEY-----/ { if (f != "") { close(f); print f }; f = "" }' "$1") | sort
}

publish_install_sh=1
"$binary" --release-keys >"$work/binary-keys" 2>"$work/binary-keys.err" || true
header=$(head -n1 "$work/binary-keys")
if [[ $header =~ ^banger\ release\ keys:\ ([0-9]+) ]]; then
	want_n=${BASH_REMATCH[1]}
	bin_fps=$(fingerprints "$work/binary-keys" "$work/bk")
	[[ $(grep -c . <<<"$bin_fps" || true) == "$want_n" ]] ||
		die "$binary --release-keys says $want_n keys but prints $(grep -c . <<<"$bin_fps" || true) PEM blocks"
	[[ $(grep -c '^# BEGIN RELEASE KEYS$' "$install_sh") == 1 && $(grep -c '^# END RELEASE KEYS$' "$install_sh") == 1 ]] ||
		die "$install_sh must hold exactly one '# BEGIN RELEASE KEYS' ... '# END RELEASE KEYS' block"
	sed -n '/^# BEGIN RELEASE KEYS$/,/^# END RELEASE KEYS$/p' "$install_sh" >"$work/script-keys"
	script_fps=$(fingerprints "$work/script-keys" "$work/sk")
	if [[ $bin_fps != "$script_fps" ]]; then
		die "refusing to publish: the keys embedded in $install_sh differ from the keys compiled into $binary
  binary (banger --release-keys, src/update/signature.rs): ${bin_fps:-none (PLACEHOLDER)}
  install.sh (RELEASE_KEYS):                              ${script_fps:-none}
  (put the same public key PEM(s) in both: RELEASE_KEYS in packaging/install.sh, EMBEDDED_KEY_CURRENT/NEXT in src/update/signature.rs)"
	fi
	if [[ -z $bin_fps ]]; then
		echo "$prog: warning: $binary embeds no release key (PLACEHOLDER): it and install.sh verify no release without a test key" >&2
	fi
	default_base=$(sed -n 's/^DEFAULT_BASE_URL=//p' "$install_sh")
	if [[ -n $base_url && ${base_url%/} != "$default_base" ]]; then
		echo "$prog: warning: install.sh reads releases from $default_base by default, not from --base-url $base_url" >&2
	fi
elif [[ $(head -c2 "$binary") == '#!' ]]; then
	echo "$prog: warning: --binary $binary is a script, not a banger build: it has no keys to compare, so install.sh is not published with it" >&2
	publish_install_sh=0
else
	die "cannot compare release keys: '$binary --release-keys' did not print them ($(head -n1 "$work/binary-keys.err" 2>/dev/null)${header:+; it printed: $header}); is it a banger build from this source?"
fi

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
if [[ $publish_install_sh == 1 ]]; then
	install -m 0644 "$install_sh" "$out/install.sh.tmp"
	mv "$out/install.sh.tmp" "$out/install.sh"
fi

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
