#!/usr/bin/env bash
# Installs, idempotently, the Debian packages banger's tests need on a fresh machine.
# Usage: scripts/deps.sh [--smoke]   (--smoke adds what the systemd-nspawn smoke suite needs)
# Also gives /dev/net/tun Debian's stock mode 0666 when it lacks it (VMMs run as the owner user and
# open their taps through it; `banger doctor` FAILs the network row otherwise).
set -euo pipefail

if [[ -c /dev/net/tun && $(stat -c %a /dev/net/tun) != 666 ]]; then
  if [[ $(id -u) -eq 0 ]]; then
    echo "deps: chmod 0666 /dev/net/tun (Debian's default; the owner's VMMs open taps through it)" >&2
    chmod 0666 /dev/net/tun
  else
    echo "deps: /dev/net/tun is not mode 0666 (fix: sudo chmod 0666 /dev/net/tun)" >&2
  fi
fi

# e2fsprogs: mkfs.ext4 -d and debugfs for `image build` and its tests.
want=(openssl python3 shellcheck binutils e2fsprogs)
# Guest agent tests: ssh-keygen (host keys), ip (the agent's TCP transport in a private netns).
want+=(openssh-client iproute2)
# Guest networking: the root helper's nftables table (iproute2 above: its tests and doctor's view).
want+=(nftables)
# SSH tests: a real sshd, run by the tests themselves on a private network namespace's loopback
# (the package's own service is disabled right after a fresh install, below).
want+=(openssh-server)
if [[ "${1:-}" == "--smoke" ]]; then
  # qemu-system-x86: the stand-in's TCG engine boots the real guest kernel and image.
  # The kernel's own build dependencies are installed by packaging/kernel/build.sh.
  want+=(debootstrap systemd-container jq qemu-system-x86)
fi

missing=()
for p in "${want[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "deps: missing packages: ${missing[*]} (install them: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if [[ " ${missing[*]} " == *" openssh-server "* ]] && command -v systemctl >/dev/null; then
  # Only the tests' own sshd instances are wanted; never a host sshd this script brought in.
  echo "deps: disabling the openssh-server service it just installed (tests run their own sshd)" >&2
  systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
fi
