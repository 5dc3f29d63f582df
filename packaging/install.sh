#!/usr/bin/env bash
# banger's installer, published beside manifest.json by packaging/release.sh:
#
#   curl -fsSL https://releases.banger.example/install.sh | bash
#
# Runs as you. It downloads the release (manifest.json, the tarball, SHA256SUMS, SHA256SUMS.sig)
# into a private temp dir, verifies SHA256SUMS's signature with stock `openssl dgst -verify`
# against the release signing key(s) embedded below (the same keys compiled into banger; the
# release builder refuses to publish when they differ), checks the tarball with `sha256sum -c`,
# shows what it will write and why that needs root, and only then runs the verified binary as
# `sudo banger system install --owner "$USER"`. Every refusal happens before sudo and leaves
# nothing behind but what it removes: its temp dir. Answers are read from /dev/tty, so a piped
# script can still ask. `--help` lists the options.
#
# Everything is inside main(), called on the last line: a download cut short runs nothing.

# The release signing keys this installer trusts (ECDSA P-256, SubjectPublicKeyInfo PEM): exactly
# the keys compiled into banger (src/update/signature.rs, printed by `banger --release-keys`).
# Empty while banger's key is a PLACEHOLDER: then every release is refused (tests add a key with
# --pubkey-file). packaging/release.sh compares this block with the binary it publishes.
# BEGIN RELEASE KEYS
RELEASE_KEYS=''
# END RELEASE KEYS

# Where releases are published: the directory of banger's DEFAULT_MANIFEST_URL
# (src/update/manifest.rs). The `.example` host is a placeholder that never resolves.
DEFAULT_BASE_URL=https://releases.banger.example

PROG=install.sh
TARBALL_MAX=268435456 # bytes; the same caps as `banger update` (src/update/download.rs)
SUMS_MAX=16384
SIG_MAX=1024
MANIFEST_MAX=4194304

usage() {
	cat <<USAGE
usage: curl -fsSL $DEFAULT_BASE_URL/install.sh | bash [-s -- OPTIONS]
       bash install.sh [OPTIONS]

Installs banger on this host for you (the user running this script) as its owner: downloads the
release, verifies its signature (openssl) and hash (sha256sum), shows what it will write, asks,
then runs the verified binary as: sudo banger system install --owner "\$USER".

options:
  --yes, -y          do not ask before running sudo
  --version V        install release V (e.g. v0.2.0) instead of the latest stable one
  -h, --help         this text

for tests (never needed to install a published release):
  --base-url URL     read URL/manifest.json instead of $DEFAULT_BASE_URL/manifest.json
  --pubkey-file F    ALSO trust the ECDSA P-256 public key(s) in PEM file F (owned by you or
                     root, not writable by group or others); every run using it prints a WARNING
                     with the key's fingerprint

Needs: Linux on x86_64 with systemd as PID 1, sudo, openssl, sha256sum, base64, tar, gzip, and
curl or wget. Nothing is written outside a temp dir (removed on exit) until sudo runs.
USAGE
}

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# die WHAT WHY HINT: the one-line refusal, `install.sh: what failed: why (what to do)`.
die() {
	if [[ -n ${3:-} ]]; then
		printf '%s: %s: %s (%s)\n' "$PROG" "$1" "$2" "$3" >&2
	else
		printf '%s: %s: %s\n' "$PROG" "$1" "$2" >&2
	fi
	exit 1
}

usage_error() {
	printf '%s: %s (see --help)\n' "$PROG" "$1" >&2
	exit 2
}

# --- checks before anything is downloaded -------------------------------------------------------

check_host() {
	local os arch pid1=""
	os=$(uname -s)
	arch=$(uname -m)
	[[ $os == Linux ]] ||
		die "checking this host" "it runs $os; banger runs on Linux only" "install banger on an x86_64 Linux host with systemd"
	[[ $arch == x86_64 ]] ||
		die "checking this host" "it is $arch; banger is released for x86_64 only" "install banger on an x86_64 Linux host, or build it from source"
	pid1=$(cat /proc/1/comm 2>/dev/null || true)
	if [[ ! -d /run/systemd/system || (-n $pid1 && $pid1 != systemd) ]]; then
		die "checking this host" "PID 1 is ${pid1:-not readable} and not systemd; banger runs as systemd services" \
			"install banger on a host booted with systemd"
	fi
	if [[ $(id -u) == 0 ]]; then
		die "checking who runs this" "it runs as root; the installer runs as the user who will own banger and asks sudo for the one install step" \
			"run it as that user, without sudo: curl -fsSL $DEFAULT_BASE_URL/install.sh | bash"
	fi
	USER=$(id -un)
	local tool
	for tool in openssl sha256sum base64 tar gzip mktemp; do
		command -v "$tool" >/dev/null ||
			die "checking the tools it needs" "$tool not found" "install it (Debian: sudo apt-get install $(pkg_of "$tool")) and run again"
	done
	if command -v curl >/dev/null; then
		FETCH=curl
	elif command -v wget >/dev/null; then
		FETCH=wget
	else
		die "checking the tools it needs" "neither curl nor wget found" "install one (Debian: sudo apt-get install curl) and run again"
	fi
	command -v sudo >/dev/null ||
		die "checking the tools it needs" "sudo not found; installing banger's services needs root once" \
			"install sudo and give $USER sudo rights, or run as root: banger system install --owner $USER with a binary you verified by hand"
}

pkg_of() {
	case $1 in
	openssl) echo openssl ;;
	tar) echo tar ;;
	gzip) echo gzip ;;
	*) echo coreutils ;;
	esac
}

# --- downloads ------------------------------------------------------------------------------------

# fetch URL FILE MAX: one file, at most MAX bytes, no config files read or state written (no
# ~/.curlrc, no ~/.wget-hsts). Returns 1 on any failure with the reason in FETCH_ERR.
fetch() {
	local url=$1 out=$2 max=$3 err=$WORK/fetch.err
	FETCH_ERR=""
	if [[ $FETCH == curl ]]; then
		if ! curl -q -fsSL --proto '=http,https' --proto-redir '=http,https' --max-filesize "$max" --connect-timeout 20 \
			--retry 2 -o "$out" "$url" 2>"$err"; then
			FETCH_ERR=$(tail -n1 "$err")
			return 1
		fi
	else
		if ! wget --no-config --no-hsts -nv -t 3 -T 30 -O "$out" "$url" 2>"$err"; then
			FETCH_ERR=$(tail -n1 "$err" | sed -E 's/^[0-9-]+ [0-9:]+ //')
			FETCH_ERR=${FETCH_ERR:-wget failed}
			return 1
		fi
	fi
	local size
	size=$(stat -c %s "$out")
	if ((size > max)); then
		FETCH_ERR="it is $size bytes, more than the $max a release file may have"
		return 1
	fi
}

# need_fetch WHAT URL FILE MAX
need_fetch() {
	fetch "$2" "$3" "$4" ||
		die "downloading the $1 from $2" "${FETCH_ERR:-failed}" \
			"check the address and your network; a 404 means nothing is published there yet"
}

# resolve URL: absolute http(s) URLs stay; /path is taken from the manifest's origin; anything
# else is relative to the manifest's directory (as banger update resolves them).
resolve() {
	local u=$1 origin
	case $u in
	http://* | https://*) echo "$u" ;;
	/*)
		origin=$(sed -E 's#^(https?://[^/]+).*#\1#' <<<"$MANIFEST_URL")
		echo "$origin$u"
		;;
	*) echo "${MANIFEST_URL%/*}/$u" ;;
	esac
}

# --- manifest.json --------------------------------------------------------------------------------
# The manifest is unsigned: it only says where to look. A wrong answer here can only point at
# files that then fail verification. Read without jq/python (not on every fresh host): the
# release builder writes plain JSON with string values free of quotes and backslashes.

# json_str KEY TEXT: the (last) "KEY": "value" in TEXT.
json_str() {
	sed -n -E "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"([^\"\\\\]*)\".*/\\1/p" <<<"$2" | head -n1
}

read_manifest() {
	local file=$1 flat outer schema
	flat=$(tr '\n\r\t' '   ' <"$file")
	[[ $flat == *'{'* ]] || die "reading the manifest $MANIFEST_URL" "it is not JSON" "check --base-url / the published manifest.json"
	# The release objects hold no braces; what is left when they are cut out is the top level.
	outer=$(sed -E 's/\{[^{}]*\}//g' <<<"$flat")
	schema=$(sed -n -E 's/.*"schema_version"[[:space:]]*:[[:space:]]*([0-9]+).*/\1/p' <<<"$outer")
	[[ -n $schema ]] || die "reading the manifest $MANIFEST_URL" "it has no schema_version" "check --base-url / the published manifest.json"
	[[ $schema == 1 ]] || die "reading the manifest $MANIFEST_URL" "its schema_version is $schema; this installer reads 1" \
		"download the newest install.sh from where the manifest is published"
	LATEST=$(json_str latest_stable "$outer")
	RELEASES=$(sed -E 's/^[^[]*\[//' <<<"$flat" | grep -oE '\{[^{}]*\}' || true)
	[[ -n $RELEASES ]] || die "reading the manifest $MANIFEST_URL" "it lists no release" "check --base-url / the published manifest.json"
}

norm() { local v=${1#v}; echo "v$v"; }

# Sets VERSION, TAR_URL, SUMS_URL, SIG_URL for the wanted (or latest stable) version.
pick_release() {
	local want=$1 obj v known=""
	if [[ -z $want ]]; then
		[[ -n $LATEST ]] || die "reading the manifest $MANIFEST_URL" "it names no latest_stable release" "pick one with --version vX.Y.Z"
		want=$LATEST
	fi
	want=$(norm "$want")
	while IFS= read -r obj; do
		v=$(json_str version "$obj")
		[[ -n $v ]] || continue
		known+="${known:+, }$(norm "$v")"
		if [[ $(norm "$v") == "$want" ]]; then
			VERSION=$want
			TAR_URL=$(json_str tarball_url "$obj")
			SUMS_URL=$(json_str sha256sums_url "$obj")
			SIG_URL=$(json_str sha256sums_sig_url "$obj")
			[[ -n $TAR_URL && -n $SUMS_URL && -n $SIG_URL ]] ||
				die "reading release $want from $MANIFEST_URL" "it lacks tarball_url, sha256sums_url or sha256sums_sig_url" \
					"the manifest is broken; tell the publisher"
			TAR_URL=$(resolve "$TAR_URL")
			SUMS_URL=$(resolve "$SUMS_URL")
			SIG_URL=$(resolve "$SIG_URL")
		fi
	done <<<"$RELEASES"
	[[ -n ${VERSION:-} ]] ||
		die "finding release $want" "$MANIFEST_URL does not list it (it lists: ${known:-nothing})" \
			"pick one of those with --version, or leave --version out for the latest stable release"
}

# --- keys and verification ------------------------------------------------------------------------

# split_pems PREFIX < TEXT: each PUBLIC KEY block to PREFIX.N.pem; prints the file names.
split_pems() {
	awk -v p="$1" '
		/-----BEGIN PUBLIC KEY-----/ { n++; f = p "." n ".pem"; sub(/^.*-----BEGIN/, "-----BEGIN") }
		f != "" { print > f }
		/-----END PUBLIC KEY-----/ { if (f != "") { close(f); print f }; f = "" }'
}

# SHA256:<hex> of a key's DER SubjectPublicKeyInfo (the fingerprint banger prints).
fingerprint() {
	local hex
	hex=$(openssl pkey -pubin -in "$1" -outform DER 2>/dev/null | sha256sum) || return 1
	echo "SHA256:${hex%% *}"
}

is_p256() { openssl pkey -pubin -in "$1" -noout -text 2>/dev/null | grep -q 'prime256v1\|P-256'; }

# Fills KEYS (files) and KEY_LABELS from the embedded block and --pubkey-file.
load_keys() {
	local f i=0
	KEYS=() KEY_LABELS=()
	while IFS= read -r f; do
		[[ -n $f ]] || continue
		is_p256 "$f" || die "reading the release keys embedded in this installer" "block $((i + 1)) is not an ECDSA P-256 public key" \
			"this install.sh is broken; download it again from where releases are published"
		KEYS+=("$f")
		KEY_LABELS+=("embedded key $(fingerprint "$f")")
		i=$((i + 1))
	done < <(printf '%s' "$RELEASE_KEYS" | split_pems "$WORK/embedded")
	if [[ -n $PUBKEY_FILE ]]; then
		check_key_file "$PUBKEY_FILE"
		local n=0 fp
		while IFS= read -r f; do
			[[ -n $f ]] || continue
			is_p256 "$f" || die "trusting --pubkey-file $PUBKEY_FILE" "key $((n + 1)) in it is not an ECDSA P-256 public key" \
				"give the public half of the release key: openssl pkey -in KEY.pem -pubout"
			fp=$(fingerprint "$f")
			say "WARNING: trusting release signing key $fp from --pubkey-file $PUBKEY_FILE IN ADDITION TO the keys built into this installer"
			KEYS+=("$f")
			KEY_LABELS+=("--pubkey-file key $fp")
			n=$((n + 1))
		done < <(split_pems "$WORK/extra" <"$PUBKEY_FILE")
		((n > 0)) || die "trusting --pubkey-file $PUBKEY_FILE" "it holds no BEGIN PUBLIC KEY block" \
			"give the public half of the release key: openssl pkey -in KEY.pem -pubout"
	fi
	if ((${#KEYS[@]} == 0)); then
		die "verifying the release signature" "this installer embeds no release signing key (banger's key is still a PLACEHOLDER), so it cannot verify any release and refuses to install" \
			"use an install.sh published with a signed release, or build banger from source"
	fi
}

# The --pubkey-file must be a regular file (not a link) owned by you or root that group and others
# cannot write: a key file someone else can change would let them choose what root installs.
check_key_file() {
	local f=$1 kind uid mode
	[[ ! -L $f ]] || die "trusting --pubkey-file $f" "it is a symlink" "name the key file itself"
	[[ -e $f ]] || die "trusting --pubkey-file $f" "it does not exist" "give the path of a PEM public key"
	read -r uid mode kind < <(stat -c '%u %a %F' "$f")
	[[ $kind == "regular file" || $kind == "regular empty file" ]] || die "trusting --pubkey-file $f" "it is not a regular file ($kind)" "give the path of a PEM public key"
	[[ $uid == 0 || $uid == "$(id -u)" ]] ||
		die "trusting --pubkey-file $f" "it is owned by uid $uid, not by you or root" "use a key file you own with mode 0644 or tighter"
	(((8#$mode & 8#022) == 0)) ||
		die "trusting --pubkey-file $f" "its mode $mode lets group or others write it" "chmod go-w $f"
}

verify_signature() {
	local i
	base64 -d <"$WORK/SHA256SUMS.sig" >"$WORK/SHA256SUMS.der" 2>/dev/null ||
		die "verifying the SHA256SUMS signature of $VERSION" "the signature file is not base64" \
			"the release is corrupted or was tampered with; do not install it, tell the publisher"
	for i in "${!KEYS[@]}"; do
		if openssl dgst -sha256 -verify "${KEYS[$i]}" -signature "$WORK/SHA256SUMS.der" "$WORK/SHA256SUMS" >/dev/null 2>&1; then
			SIGNED_BY=${KEY_LABELS[$i]}
			say "SHA256SUMS signature verified (openssl dgst -verify, $SIGNED_BY)"
			return 0
		fi
	done
	die "verifying the SHA256SUMS signature of $VERSION" \
		"it does not verify against any trusted key (${#KEYS[@]} tried: ${KEY_LABELS[*]})" \
		"the release is corrupted or not signed by banger's release key; do not install it, tell the publisher"
}

verify_hash() {
	local line
	# SHA256SUMS is trusted now; it must list exactly this version's tarball by name.
	line=$(grep -E "^[0-9a-f]{64}  $TAR_NAME\$" "$WORK/SHA256SUMS" || true)
	[[ -n $line && $(wc -l <<<"$line") == 1 ]] ||
		die "checking the tarball of $VERSION" "the signed SHA256SUMS does not list $TAR_NAME" \
			"the release is broken; do not install it, tell the publisher"
	printf '%s\n' "$line" >"$WORK/SHA256SUMS.one"
	if ! (cd "$WORK" && sha256sum -c --strict --quiet SHA256SUMS.one) >"$WORK/sums.out" 2>&1; then
		die "checking the tarball of $VERSION with sha256sum -c" \
			"its SHA-256 does not match the signed SHA256SUMS (sha256sum: $(head -n1 "$WORK/sums.out"))" \
			"the download is corrupted or was tampered with; do not install it; run again, and if it repeats tell the publisher"
	fi
	say "$TAR_NAME matches the signed SHA256SUMS (sha256sum -c)"
}

unpack() {
	local listing n
	listing=$(tar -tzvf "$WORK/$TAR_NAME" 2>/dev/null) ||
		die "unpacking $TAR_NAME" "it is not a gzip tar archive" "the release is broken; tell the publisher"
	n=$(wc -l <<<"$listing")
	[[ $n == 1 && $listing == -* && $listing =~ [[:space:]]banger$ ]] ||
		die "unpacking $TAR_NAME" "it must hold exactly one regular file named banger; it holds: $(tr '\n' ';' <<<"$listing")" \
			"the release is broken; tell the publisher"
	mkdir "$WORK/bin"
	tar -xzf "$WORK/$TAR_NAME" -C "$WORK/bin" --no-same-owner banger
	chmod 0755 "$WORK/bin/banger"
	BIN=$WORK/bin/banger
	local said
	said=$("$BIN" --version 2>&1 || true)
	[[ $said == "banger $VERSION "* || $said == "banger $VERSION" ]] ||
		die "running the verified binary ($BIN --version)" "it says '$said', not banger $VERSION" \
			"the release is broken; tell the publisher"
	say "the verified binary runs: $said"
}

# --- the install ----------------------------------------------------------------------------------

show_plan() {
	local existing=""
	if [[ -e /usr/local/lib/banger/banger ]]; then
		existing=$(/usr/local/lib/banger/banger --version 2>/dev/null || echo "an unreadable version")
	fi
	cat >&2 <<PLAN

banger $VERSION is downloaded and verified. Next, as root:

  sudo $BIN system install --owner $USER

which writes:
  /usr/local/lib/banger/banger                 the binary (root, 0755)
  /usr/local/bin/banger, bangerd, bangerd-root links to it
  /etc/banger/install.toml                     the owner ($USER) and the installed version
  /etc/systemd/system/bangerd*                 the units of bangerd-root (root) and bangerd ($USER)
  /var/lib/banger ($USER's), /var/cache/banger  state, images and VMs; update staging
  banger's shell completion, for the shells installed under /usr/share
and starts bangerd-root, then bangerd.

Why root: those are system paths, and bangerd-root runs as root to make the host's network
objects and start VMMs for you; everything so far ran as $USER and wrote only to $WORK.
PLAN
	if [[ -n $existing ]]; then
		printf '\nbanger is already installed (%s): this installs %s over it; running VMs keep running\n(for a routine upgrade, sudo banger update does the same with a rollback).\n' \
			"$existing" "$VERSION" >&2
	fi
	echo >&2
}

confirm() {
	[[ $YES == 1 ]] && return 0
	local answer=""
	if ! { : </dev/tty; } 2>/dev/null; then
		die "asking before running sudo" "there is no terminal (/dev/tty) to ask on" \
			"re-run with --yes to install without asking: ... | bash -s -- --yes"
	fi
	printf 'Install banger %s now? [y/N] ' "$VERSION" >/dev/tty
	read -r answer </dev/tty || answer=""
	case $answer in
	y | Y | yes | YES | Yes) return 0 ;;
	*)
		say "nothing installed (answer: '${answer}')"
		exit 1
		;;
	esac
}

main() {
	set -euo pipefail
	umask 077
	YES=0 WANT="" BASE_URL=$DEFAULT_BASE_URL PUBKEY_FILE=""
	while (($#)); do
		case $1 in
		-y | --yes) YES=1 ;;
		--version)
			[[ -n ${2:-} ]] || usage_error "--version needs a value, e.g. --version v0.2.0"
			WANT=$2
			shift
			;;
		--version=?*) WANT=${1#*=} ;;
		--base-url)
			[[ -n ${2:-} ]] || usage_error "--base-url needs a URL"
			BASE_URL=$2
			shift
			;;
		--base-url=?*) BASE_URL=${1#*=} ;;
		--pubkey-file)
			[[ -n ${2:-} ]] || usage_error "--pubkey-file needs a file"
			PUBKEY_FILE=$2
			shift
			;;
		--pubkey-file=?*) PUBKEY_FILE=${1#*=} ;;
		-h | --help)
			usage
			exit 0
			;;
		*) usage_error "unknown argument: $1" ;;
		esac
		shift
	done
	if [[ -n $WANT && ! $WANT =~ ^v?[0-9][0-9A-Za-z]*(\.[0-9A-Za-z]+)*(-[0-9A-Za-z.]+)?$ ]]; then
		usage_error "--version $WANT: expected vX.Y.Z"
	fi
	[[ $BASE_URL =~ ^https?://[^[:space:]]+$ ]] || usage_error "--base-url $BASE_URL: expected an http:// or https:// URL"
	MANIFEST_URL=${BASE_URL%/}/manifest.json

	check_host
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/banger-install.XXXXXX") ||
		die "making a temp dir" "mktemp failed in ${TMPDIR:-/tmp}" "set TMPDIR to a writable directory"
	trap 'rm -rf "$WORK"' EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM

	load_keys
	say "reading $MANIFEST_URL"
	need_fetch "manifest" "$MANIFEST_URL" "$WORK/manifest.json" "$MANIFEST_MAX"
	read_manifest "$WORK/manifest.json"
	VERSION=""
	pick_release "$WANT"
	TAR_NAME=banger-$VERSION-linux-amd64.tar.gz
	[[ ${TAR_URL%%[?#]*} == */"$TAR_NAME" ]] ||
		die "reading release $VERSION from $MANIFEST_URL" "its tarball_url does not name $TAR_NAME" \
			"the manifest is broken; tell the publisher"
	say "downloading banger $VERSION"
	need_fetch "signature SHA256SUMS.sig" "$SIG_URL" "$WORK/SHA256SUMS.sig" "$SIG_MAX"
	need_fetch "hash list SHA256SUMS" "$SUMS_URL" "$WORK/SHA256SUMS" "$SUMS_MAX"
	need_fetch "tarball $TAR_NAME" "$TAR_URL" "$WORK/$TAR_NAME" "$TARBALL_MAX"
	verify_signature
	verify_hash
	unpack
	show_plan
	confirm
	say "running: sudo $BIN system install --owner $USER"
	# Root runs the very file verified above, from the private (0700) temp dir.
	if ! sudo "$BIN" system install --owner "$USER"; then
		die "installing banger $VERSION (sudo banger system install --owner $USER)" "it failed (its error is above)" \
			"fix what it says and run this installer again; \`banger doctor\` shows what is in place"
	fi
	say "banger $VERSION installed for $USER; check it with: banger doctor"
}

main "$@"
