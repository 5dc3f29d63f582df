#!/usr/bin/env python3
"""Builds one bad release per case, for the update_bad_artifacts scenario.

usage: badrel.py OUTDIR KEY OTHER_KEY VERSION BINARY
Writes OUTDIR/<case>/manifest.json and OUTDIR/<case>/<VERSION>/{tarball,SHA256SUMS,SHA256SUMS.sig}
for every case below, each signed with KEY (openssl, as packaging/release.sh does) unless the case
is about the signature, and prints the case names, one a line. BINARY is what a good tarball holds.
"""
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

MIB = 1 << 20


def sign(key, data):
    der = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=data,
                         stdout=subprocess.PIPE, check=True).stdout
    return subprocess.run(["base64", "-w0"], input=der, stdout=subprocess.PIPE,
                          check=True).stdout


def tar_bytes(members):
    """members: list of (TarInfo, bytes or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(buf.getvalue(), 1, mtime=0)


def entry(name, data=b"", kind=tarfile.REGTYPE, link=""):
    i = tarfile.TarInfo(name)
    i.type = kind
    i.mode = 0o755
    i.linkname = link
    i.size = len(data) if kind == tarfile.REGTYPE else 0
    return i, (data if kind == tarfile.REGTYPE else None)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


class Case:
    def __init__(self, out, name, version):
        self.dir = os.path.join(out, name)
        self.version = version
        self.tar_name = "banger-%s-linux-amd64.tar.gz" % version
        self.manifest = {
            "schema_version": 1,
            "latest_stable": version,
            "releases": [{
                "version": version,
                "tarball_url": "%s/%s" % (version, self.tar_name),
                "sha256sums_url": "%s/SHA256SUMS" % version,
                "sha256sums_sig_url": "%s/SHA256SUMS.sig" % version,
            }],
        }

    def rel(self, f):
        return os.path.join(self.dir, self.version, f)

    def write_manifest(self, raw=None):
        write(os.path.join(self.dir, "manifest.json"),
              raw if raw is not None else json.dumps(self.manifest, indent=2).encode())

    def release(self, key, tarball=None, sums=None, sig=None, tar_path=None):
        """A release; tarball bytes (or an existing file at tar_path), SHA256SUMS and signature
        computed unless given."""
        if tar_path is None:
            write(self.rel(self.tar_name), tarball)
            digest = hashlib.sha256(tarball).hexdigest()
        else:
            h = hashlib.sha256()
            with open(tar_path, "rb") as f:
                for chunk in iter(lambda: f.read(MIB), b""):
                    h.update(chunk)
            digest = h.hexdigest()
        if sums is None:
            sums = ("%s  %s\n" % (digest, self.tar_name)).encode()
        write(self.rel("SHA256SUMS"), sums)
        write(self.rel("SHA256SUMS.sig"), sig if sig is not None else sign(key, sums))
        self.write_manifest()
        return sums


def main():
    out, key, other, version, binary = sys.argv[1:6]
    with open(binary, "rb") as f:
        good = f.read()
    good_tar = tar_bytes([entry("banger", good)])
    made = []

    def case(name, ver=version):
        made.append(name)
        return Case(out, name, ver)

    c = case("tampered_tarball")
    c.release(key, good_tar)
    bad = bytearray(good_tar)
    bad[len(bad) // 2] ^= 0xFF
    write(c.rel(c.tar_name), bytes(bad))

    c = case("tampered_sums")
    sums = c.release(key, good_tar)
    # Another tarball's hash in place of the signed one (the signature no longer matches).
    write(c.rel("SHA256SUMS"), hashlib.sha256(b"evil").hexdigest().encode() + sums[64:])

    c = case("wrong_key")
    c.release(key, good_tar, sig=sign(other, ("%s  %s\n" % (hashlib.sha256(good_tar).hexdigest(), c.tar_name)).encode()))

    c = case("truncated_sig")
    sums = ("%s  %s\n" % (hashlib.sha256(good_tar).hexdigest(), c.tar_name)).encode()
    c.release(key, good_tar, sig=sign(key, sums)[:40])

    c = case("garbage_sig")
    c.release(key, good_tar, sig=b"this is not a signature at all!\n")

    c = case("empty_sig")
    c.release(key, good_tar, sig=b"")

    c = case("oversized_sig")
    c.release(key, good_tar, sig=b"A" * 4096)

    c = case("oversized_sums")
    sums = ("%s  %s\n" % (hashlib.sha256(good_tar).hexdigest(), c.tar_name)).encode()
    sums = b"# padding\n" * 2000 + sums
    c.release(key, good_tar, sums=sums)

    c = case("oversized_manifest")
    c.release(key, good_tar)
    c.write_manifest(json.dumps(c.manifest).encode() + b" " * (MIB + 16))

    # A tarball over the 256 MiB download cap (sparse: costs no disk), correctly signed.
    c = case("oversized_tarball")
    path = c.rel(c.tar_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(good_tar)
        f.truncate(257 * MIB)
    c.release(key, tar_path=path)

    # A tar entry whose header claims more than the 512 MiB file cap (only the header is real).
    c = case("oversized_file")
    info, _ = entry("banger", b"")
    info.size = 600 * MIB
    raw = info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 4096
    c.release(key, gzip.compress(raw, 1, mtime=0))

    for name, members in [
        ("traversal", [entry("../banger", good)]),
        ("absolute", [entry("/usr/local/lib/banger/banger", good)]),
        ("dot_dot_inside", [entry("x/../../banger", good)]),
        ("symlink", [entry("banger", kind=tarfile.SYMTYPE, link="/bin/sh")]),
        ("hardlink", [entry("banger", kind=tarfile.LNKTYPE, link="/usr/local/lib/banger/banger")]),
        ("device", [entry("banger", kind=tarfile.CHRTYPE)]),
        ("directory", [entry("banger", kind=tarfile.DIRTYPE)]),
        ("extra_file", [entry("banger", good), entry("README", b"hello\n")]),
        ("twice", [entry("banger", good), entry("banger", good)]),
        ("missing_binary", [entry("README", b"hello\n")]),
    ]:
        c = case(name)
        c.release(key, tar_bytes(members))

    c = case("schema_version_2")
    c.release(key, good_tar)
    c.manifest["schema_version"] = 2
    c.write_manifest()

    c = case("no_sig_url")
    c.release(key, good_tar)
    c.manifest["releases"][0]["sha256sums_sig_url"] = ""
    c.write_manifest()

    c = case("not_json")
    c.write_manifest(b"<html>not a manifest</html>\n")

    # A correctly signed release older than the installed 0.1.0.
    c = case("downgrade", "v0.0.1")
    c.release(key, good_tar)

    for name in made:
        print(name)


if __name__ == "__main__":
    sys.exit(main())
