#!/usr/bin/env bash
# Installs the Debian packages Hearth needs on a Debian 12 (bookworm) or 13 host, and the two Python
# packages its API tests validate openapi.json with (PyPI).
# Idempotent: does nothing when everything is already there. Needs root.
#
# QEMU must be >= 8.2 (file: migration URIs, microvm fixes). Debian 12 ships 7.2, so on bookworm
# the qemu-system-x86 package comes from bookworm-backports; the backports suite is added to apt's
# sources using the mirror the machine already uses (never a hard-coded host name).
set -euo pipefail

if ! command -v cargo >/dev/null; then
  echo "error: cargo is not installed; Hearth builds with a Rust toolchain (rustup.rs) of 1.90 or newer" >&2
  exit 1
fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -f /usr/share/qemu/qboot.rom ] || need+=(qemu-system-data)
command -v busybox >/dev/null && busybox --list 2>/dev/null | grep -qx insmod || need+=(busybox-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
# The disk tests clone on a loop-mounted xfs made with reflink.
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v ip >/dev/null || need+=(iproute2)
# VM networking: the helper loads its rules with nft; the network tests run dnsmasq (no service).
command -v nft >/dev/null || need+=(nftables)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v unshare >/dev/null || need+=(util-linux)
# The install test checks the systemd units with systemd-analyze.
command -v systemd-analyze >/dev/null || need+=(systemd)
# The SSH tests drive hearthd with the real OpenSSH client (ssh, ssh-keygen, sftp, scp). Their
# "guest" (the test VMM double runs the agent on this host) serves sftp with OpenSSH's
# sftp-server, installed without recommends: its package recommends openssh-server, a service
# nothing here wants.
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null && command -v sftp >/dev/null \
  && command -v scp >/dev/null || need+=(openssh-client)
alone=()
[ -x /usr/lib/openssh/sftp-server ] || alone+=(openssh-sftp-server)
command -v cc >/dev/null || need+=(gcc)
command -v pkg-config >/dev/null || need+=(pkg-config)
# The store's test suite also runs against a PostgreSQL server it starts itself.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)
# The API tests check openapi.json, and the real-VM tests their requests and responses against
# it, with two Python packages from PyPI (installed below, after pip itself when it is missing).
validators_ok=1
python3 -c 'import openapi_spec_validator, openapi_schema_validator' 2>/dev/null || validators_ok=0
if [ $validators_ok -eq 0 ]; then
  command -v python3 >/dev/null || need+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
fi
install_validators() {
  [ $validators_ok -eq 1 ] && return 0
  echo "installing the OpenAPI validators: openapi-spec-validator openapi-schema-validator (PyPI)"
  local pkgs=(openapi-spec-validator openapi-schema-validator)
  # A distribution's own Python refuses pip outside a virtualenv (PEP 668); these two packages
  # touch nothing the distribution ships, so they go in beside it there.
  python3 -m pip install --quiet "${pkgs[@]}" \
    || python3 -m pip install --quiet --break-system-packages "${pkgs[@]}"
}
# promtool, which the metrics test checks the scrape with, comes from Debian's prometheus package,
# unpacked into target/tools rather than installed (installing it would start a Prometheus server).
tools="$(cd "$(dirname "$0")/.." && pwd)/target/tools"
fetch_promtool() {
  [ -x "$tools/promtool" ] && return 0
  echo "fetching promtool from Debian's prometheus package into $tools"
  local tmp
  tmp=$(mktemp -d)
  chown _apt "$tmp" 2>/dev/null || true # apt downloads as its own user where it can
  (cd "$tmp" && apt-get download -q prometheus >/dev/null && dpkg-deb -x prometheus_*.deb x)
  install -D -m 0755 "$tmp/x/usr/bin/promtool" "$tools/promtool"
  rm -rf "$tmp"
}
finish() {
  install_validators
  fetch_promtool
}
# The guest image build fetches the cloud kernel package through apt, so apt's lists must know it.
lists_ok=1
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || lists_ok=0
if [ ${#need[@]} -eq 0 ] && [ ${#alone[@]} -eq 0 ] && [ $lists_ok -eq 1 ]; then
  finish
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing packages: ${need[*]} ${alone[*]}; run this as root (or install them yourself)" >&2
  exit 1
fi

. /etc/os-release
export DEBIAN_FRONTEND=noninteractive
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
  # The mirror this machine already uses for the main suite.
  mirror=$(apt-get indextargets --format '$(SITE) $(RELEASE) $(IDENTIFIER)' \
    | awk '$2 == "bookworm" && $3 == "Packages" { print $1; exit }')
  if [ -z "$mirror" ]; then
    echo "error: no bookworm suite found in apt's sources; cannot locate a Debian mirror" >&2
    exit 1
  fi
  if ! apt-get indextargets --format '$(RELEASE)' | grep -qx bookworm-backports; then
    echo "adding bookworm-backports from $mirror to apt's sources"
    cat > /etc/apt/sources.list.d/hearth-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
fi

apt-get update -q
if [ ${#alone[@]} -gt 0 ]; then
  echo "installing without recommends: ${alone[*]}"
  apt-get install -y -q --no-install-recommends "${alone[@]}"
fi
if [ ${#need[@]} -eq 0 ]; then
  finish
  exit 0
fi
echo "installing: ${need[*]}"
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
  apt-get install -y -q -t bookworm-backports "${need[@]}"
else
  apt-get install -y -q "${need[@]}"
fi
finish
