# shellcheck shell=bash
# install.sh scenarios (issue 11): packaging/install.sh, run as the owner user in a container where
# banger was never installed, against a release built by packaging/release.sh from the binary under
# test (signed with a throw-away key, served by serve.py on 127.0.0.1 inside the container).
# shellcheck source=scripts/smoke/lib.sh
[[ -n ${SMOKE_LIB_LOADED:-} ]] || source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCENARIOS+=(
    "install_sh_fresh_host|wget -qO- URL/install.sh | bash -s -- --yes as $TEST_USER, no banger before: verified, installed, doctor clean; again: no change"
    "install_sh_tampered|one tarball byte changed: refused with the hash reason; /usr/local, /etc/banger, /var/lib/banger, /etc/systemd, ~ unchanged"
    "install_sh_refusals|bad signature, no trusted key, missing file, unknown version, root, no sudo, not Linux/x86_64, PID 1 not systemd, no tty: each says why, writes nothing"
)

INST_HOST=""                             # the release on the host (install_sh_prepare)
INST_DIR=/opt/banger-install-releases    # ... bound read-only into the container
INST_WWW=/srv/inst                       # what the container's server serves
INST_KEY=$INST_DIR/keys/key.pub.pem      # the throw-away release key's public half

PREPARE_HOOKS+=(install_sh_prepare)
BEFORE_CONTAINER_HOOKS+=(install_sh_bind)

# One release of the binary under test (stripped, at its own version), made by release.sh, which
# also publishes install.sh beside manifest.json after checking its keys against the binary's.
install_sh_prepare() {
    [[ " $* " == *" install_sh_"* ]] || return 0
    local d=$RUN_DIR/install-releases
    mkdir -p "$d/keys" "$d/bin"
    strip -o "$d/bin/banger" "$BIN" || die "strip $BIN failed"
    INST_VERSION=$("$d/bin/banger" --version | awk '{ print $2 }')
    [[ $INST_VERSION == v* ]] || die "cannot read the version of $BIN ($("$BIN" --version))"
    bash "$REPO_ROOT/packaging/release.sh" --gen-key --key "$d/keys/key.pem" --version "$INST_VERSION" \
        --out "$d/www" --binary "$d/bin/banger" >"$d/release.log" 2>&1 \
        || die "packaging/release.sh for the install.sh scenarios failed: $(tail -n 3 "$d/release.log")"
    INST_EMBEDDED=$("$d/bin/banger" --release-keys | head -n1)
    [[ -f $d/www/install.sh ]] || die "release.sh did not publish install.sh (see $d/release.log)"
    chmod -R a+rX "$d"
    chmod 0600 "$d/keys/key.pem"
    INST_HOST=$d
    log "install.sh release $INST_VERSION in $d"
}

install_sh_bind() {
    [[ $1 == install_sh_* && -n $INST_HOST ]] || return 0
    CT_EXTRA_BINDS+=(--bind-ro="$INST_HOST:$INST_DIR")
}

# Serves $INST_WWW (good/ is the release as published; scenarios add altered copies), lets the
# test user use sudo without a password, and records the host as it is (INST_FP). Sets INST_URL.
install_sh_setup() {
    cx mkdir -p "$INST_WWW"
    cx ln -sfn "$INST_DIR/www" "$INST_WWW/good"
    must "sudo rights for $TEST_USER" cx sh -c "echo '$TEST_USER ALL=(ALL) NOPASSWD: ALL' >/etc/sudoers.d/smoke-$TEST_USER \
        && chmod 0440 /etc/sudoers.d/smoke-$TEST_USER"
    must "start the release server" cx systemd-run --quiet --unit=smoke-install-releases \
        python3 "$SMOKE_LIB/serve.py" "$INST_WWW" /run/smoke-install.port
    local deadline=$(($(now_ms) + 10000)) port=""
    while (($(now_ms) < deadline)); do
        port=$(cx cat /run/smoke-install.port 2>/dev/null || true)
        [[ -n $port ]] && break
        sleep 0.05
    done
    [[ -n $port ]] || fail "the release server did not start"
    INST_URL=http://127.0.0.1:$port
    must "the release server answers" cx python3 -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=5).read()' "$INST_URL/good/manifest.json"
    INST_FP=$(inst_fingerprint)
}

# Everything install.sh must not touch when it refuses: every entry under these paths (type,
# mode, owner, size, mtime; content hashes of regular files), the test user's home, and no
# banger-install temp dir left in /tmp.
inst_fingerprint() {
    # shellcheck disable=SC2016 # expanded inside the container
    cx sh -c 'for p in /usr/local /etc/banger /var/lib/banger /var/cache/banger /etc/systemd "/home/$1"; do
        if [ -e "$p" ]; then find "$p" -xdev -printf "%p %y %m %u:%g %s %T@\n" | sort
            find "$p" -xdev -type f -exec sha256sum {} + | sort
        else echo "$p absent"; fi
    done
    echo "tmp: $(ls -A /tmp | grep banger-install || true)"' fp "$TEST_USER"
}

expect_nothing_written() {
    local now
    now=$(inst_fingerprint)
    [[ $now == "$INST_FP" ]] || fail "$1: the host changed: $(diff <(echo "$INST_FP") <(echo "$now") | grep '^[<>]' | head -n 5 | tr '\n' ' ')"
}

# install.sh's refusal: its last line is `install.sh: <what failed>: <why> (<what to do>)` and
# names the reason (regex $2).
expect_refused() {
    local what=$1 reason=$2 last
    last=$(last_line "$OUT")
    expect_match "$last" '^install\.sh: .+: .+ \(.+\)$' "$what: error line shape"
    expect_match "$last" "$reason" "$what: the reason"
    expect_eq "$RC" 1 "$what: exit code"
    expect_nothing_written "after $what"
}

# Runs install.sh from URL's directory as the test user, the curl|bash way (wget: the test bed has
# no curl), with the test key; extra arguments go to install.sh.
inst_pipe() {
    local url=$1
    shift
    # shellcheck disable=SC2016 # expanded by the inner bash
    cu bash -c 'set -o pipefail; url=$1; shift; wget --no-hsts -qO- "$url/install.sh" | bash -s -- "$@"' \
        inst "$url" --base-url "$url" "$@"
}

scenario_install_sh_fresh_host() {
    install_sh_setup
    expect_absent /usr/local/lib/banger "before install.sh"
    expect_absent /etc/banger "before install.sh"
    local home
    home=$(cx ls -A "/home/$TEST_USER")
    must "wget -qO- .../install.sh | bash -s -- --yes" inst_pipe "$INST_URL/good" --yes --pubkey-file "$INST_KEY"
    local fp
    fp=$(cx sh -c "openssl pkey -pubin -in $INST_KEY -outform DER | sha256sum | cut -d' ' -f1")
    expect_match "$OUT" "WARNING: trusting release signing key SHA256:$fp from --pubkey-file $INST_KEY" "the loud key line"
    expect_eq "$(grep -c 'WARNING: trusting' <<<"$OUT")" 1 "one WARNING line for one extra key"
    expect_match "$OUT" "SHA256SUMS signature verified \(openssl dgst -verify, --pubkey-file key SHA256:$fp\)" "signature verified"
    expect_match "$OUT" "banger-$INST_VERSION-linux-amd64\.tar\.gz matches the signed SHA256SUMS \(sha256sum -c\)" "hash checked"
    expect_match "$OUT" "sudo /tmp/banger-install\.[A-Za-z0-9]+/bin/banger system install --owner $TEST_USER" "shows the sudo command"
    expect_match "$OUT" "/etc/systemd/system/bangerd\*" "shows what it writes"
    expect_match "$OUT" "banger $INST_VERSION \(commit [^)]*\) installed for $TEST_USER \(uid $TEST_UID\)" "system install's report"
    expect_match "$(last_line "$OUT")" "banger $INST_VERSION installed for $TEST_USER" "last line"
    # The very file that was released, root's, linked, for the test user.
    expect_stat /usr/local/lib/banger/banger "755" root root "installed binary"
    cx cmp -s "$INST_DIR/bin/banger" /usr/local/lib/banger/banger || fail "the installed binary is not the released one"
    local name
    for name in banger bangerd bangerd-root; do
        expect_eq "$(cx readlink -f "/usr/local/bin/$name")" /usr/local/lib/banger/banger "/usr/local/bin/$name resolves to"
    done
    expect_eq "$(toml_get owner_user)" "$TEST_USER" "install.toml owner_user"
    expect_eq "$(toml_get version)" "${INST_VERSION#v}" "install.toml version"
    expect_active bangerd bangerd-root
    must "banger version as $TEST_USER" cu banger version
    expect_eq "$(sed -n 's/^version: *//p' <<<"$OUT")" "${INST_VERSION#v}" "banger version"
    expect_doctor_clean
    # Its temp dir is gone, and it wrote nothing in the user's home.
    expect_eq "$(cx sh -c 'ls -A /tmp | grep banger-install || true')" "" "temp dirs left in /tmp"
    expect_eq "$(cx ls -A "/home/$TEST_USER")" "$home" "$TEST_USER's home after install.sh"
    # Run again: it says banger is there, and system install changes nothing.
    local before
    before=$(install_fingerprint)
    must "install.sh again" inst_pipe "$INST_URL/good" --yes --pubkey-file "$INST_KEY"
    expect_match "$OUT" "banger is already installed \(banger $INST_VERSION " "second run names the installed version"
    expect_match "$OUT" "nothing changed" "second run: system install changed nothing"
    expect_eq "$(install_fingerprint)" "$before" "the install after a second install.sh"
}

scenario_install_sh_tampered() {
    install_sh_setup
    local tar=banger-$INST_VERSION-linux-amd64.tar.gz
    must "a copy of the release" cx cp -rL "$INST_DIR/www" "$INST_WWW/tampered"
    # shellcheck disable=SC2016
    must "change one byte of the tarball" cx python3 -c 'import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[len(b) // 2] ^= 0x01
open(p, "wb").write(b)' "$INST_WWW/tampered/$INST_VERSION/$tar"
    must_fail "install.sh with a tampered tarball" inst_pipe "$INST_URL/tampered" --yes --pubkey-file "$INST_KEY"
    expect_match "$OUT" "SHA256SUMS signature verified" "the signature still verifies (SHA256SUMS is intact)"
    expect_refused "a tampered tarball" \
        "checking the tarball of $INST_VERSION with sha256sum -c: its SHA-256 does not match the signed SHA256SUMS \(sha256sum: $tar: FAILED\)"
    [[ $OUT != *"running: sudo"* ]] || fail "a tampered tarball got as far as sudo"
    expect_absent /usr/local/lib/banger "after a tampered tarball"
    expect_inactive bangerd bangerd-root
}

scenario_install_sh_refusals() {
    install_sh_setup
    local script=$INST_DIR/www/install.sh v=$INST_VERSION

    # SHA256SUMS changed (one hash digit): its signature no longer verifies.
    must "a copy with a changed SHA256SUMS" cx cp -rL "$INST_DIR/www" "$INST_WWW/badsig"
    # shellcheck disable=SC2016
    must "change one hash digit of SHA256SUMS" cx python3 -c 'import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[0] = ord("0") if b[0] != ord("0") else ord("1")
open(p, "wb").write(b)' "$INST_WWW/badsig/$v/SHA256SUMS"
    ! cx cmp -s "$INST_DIR/www/$v/SHA256SUMS" "$INST_WWW/badsig/$v/SHA256SUMS" || fail "SHA256SUMS did not change"
    must_fail "install.sh, SHA256SUMS changed" inst_pipe "$INST_URL/badsig" --yes --pubkey-file "$INST_KEY"
    expect_refused "a changed SHA256SUMS" "verifying the SHA256SUMS signature of $v: it does not verify against any trusted key \(1 tried: --pubkey-file key SHA256:[0-9a-f]{64}\)"

    # The published install.sh embeds banger's keys: with the PLACEHOLDER (no key) it trusts
    # nothing and refuses before downloading the release; with a real key, the test release's
    # throw-away key is not it.
    must_fail "install.sh without --pubkey-file" inst_pipe "$INST_URL/good" --yes
    if [[ $INST_EMBEDDED == "banger release keys: 0 "* ]]; then
        expect_refused "no trusted key" "verifying the release signature: this installer embeds no release signing key \(banger's key is still a PLACEHOLDER\)"
    else
        expect_refused "only the embedded key" "verifying the SHA256SUMS signature of $v: it does not verify against any trusted key \([0-9]+ tried: embedded key SHA256:"
    fi

    # A file missing from the release.
    must "a copy without SHA256SUMS.sig" cx cp -rL "$INST_DIR/www" "$INST_WWW/nosig"
    cx rm "$INST_WWW/nosig/$v/SHA256SUMS.sig"
    must_fail "install.sh, no SHA256SUMS.sig" inst_pipe "$INST_URL/nosig" --yes --pubkey-file "$INST_KEY"
    expect_refused "a missing SHA256SUMS.sig" "downloading the signature SHA256SUMS\.sig from $INST_URL/nosig/$v/SHA256SUMS\.sig: .*404"

    # No manifest at the base URL.
    must_fail "install.sh, no manifest" cu bash "$script" --base-url "$INST_URL/good/nowhere" --yes --pubkey-file "$INST_KEY"
    expect_refused "no manifest" "downloading the manifest from $INST_URL/good/nowhere/manifest\.json: .*404"

    # A version the manifest does not list.
    must_fail "install.sh --version v9.9.9" inst_pipe "$INST_URL/good" --yes --version v9.9.9 --pubkey-file "$INST_KEY"
    expect_refused "an unknown version" "finding release v9\.9\.9: $INST_URL/good/manifest\.json does not list it \(it lists: $v\)"

    # Run as root.
    must_fail "install.sh as root" cx bash "$script" --yes --base-url "$INST_URL/good" --pubkey-file "$INST_KEY"
    expect_refused "running as root" "checking who runs this: it runs as root"

    # No sudo on the host.
    must "hide sudo" cx mv /usr/bin/sudo /usr/bin/sudo.hidden
    RC=0
    OUT=$(cu bash "$script" --yes --base-url "$INST_URL/good" --pubkey-file "$INST_KEY" 2>&1) || RC=$?
    printf '$ install.sh without sudo (exit %s)\n%s\n' "$RC" "$OUT"
    local out=$OUT rc=$RC
    must "put sudo back" cx mv /usr/bin/sudo.hidden /usr/bin/sudo
    OUT=$out RC=$rc
    expect_refused "no sudo" "checking the tools it needs: sudo not found"

    # Not x86_64 (uname says aarch64).
    # shellcheck disable=SC2016 # expanded by the fake uname
    must "a uname that says aarch64" cx sh -c 'mkdir -p /opt/fake-arch && printf "#!/bin/sh\n[ \"\$1\" = -m ] && echo aarch64 && exit 0\nexec /usr/bin/uname \"\$@\"\n" >/opt/fake-arch/uname && chmod 0755 /opt/fake-arch/uname'
    must_fail "install.sh on aarch64" cu env PATH=/opt/fake-arch:/usr/local/bin:/usr/bin:/bin \
        bash "$script" --yes --base-url "$INST_URL/good" --pubkey-file "$INST_KEY"
    expect_refused "not x86_64" "checking this host: it is aarch64; banger is released for x86_64 only"

    # Not Linux (uname says FreeBSD).
    # shellcheck disable=SC2016 # expanded by the fake uname
    must "a uname that says FreeBSD" cx sh -c 'mkdir -p /opt/fake-os && printf "#!/bin/sh\n[ \"\$1\" = -s ] && echo FreeBSD && exit 0\nexec /usr/bin/uname \"\$@\"\n" >/opt/fake-os/uname && chmod 0755 /opt/fake-os/uname'
    must_fail "install.sh on FreeBSD" cu env PATH=/opt/fake-os:/usr/local/bin:/usr/bin:/bin \
        bash "$script" --yes --base-url "$INST_URL/good" --pubkey-file "$INST_KEY"
    expect_refused "not Linux" "checking this host: it runs FreeBSD; banger runs on Linux only"

    # PID 1 is not systemd (a PID namespace of its own, where runuser is PID 1).
    must_fail "install.sh where PID 1 is not systemd" cx unshare --pid --fork --mount-proc \
        runuser -u "$TEST_USER" -- bash "$script" --yes --base-url "$INST_URL/good" --pubkey-file "$INST_KEY"
    expect_refused "PID 1 not systemd" "checking this host: PID 1 is runuser and not systemd"

    # No --yes and no terminal to ask on: it verifies, shows the plan, and refuses before sudo.
    must_fail "install.sh without --yes, no tty" inst_pipe "$INST_URL/good" --pubkey-file "$INST_KEY"
    expect_match "$OUT" "Why root:" "the plan is shown before asking"
    expect_refused "no tty to ask on" "asking before running sudo: there is no terminal \(/dev/tty\) to ask on"

    expect_absent /usr/local/lib/banger "after every refusal"
    expect_absent /etc/banger "after every refusal"
}
