#!/usr/bin/env bash
# Installs the Debian packages Hearth needs on a Debian 12 (bookworm) or 13 host.
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
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v ip >/dev/null || need+=(iproute2)
command -v unshare >/dev/null || need+=(util-linux)
command -v cc >/dev/null || need+=(gcc)
command -v pkg-config >/dev/null || need+=(pkg-config)
# The store's test suite also runs against a PostgreSQL server it starts itself.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)
# The guest image build fetches the cloud kernel package through apt, so apt's lists must know it.
lists_ok=1
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || lists_ok=0
if [ ${#need[@]} -eq 0 ] && [ $lists_ok -eq 1 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing packages: ${need[*]}; run this as root (or install them yourself)" >&2
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
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing: ${need[*]}"
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
  apt-get install -y -q -t bookworm-backports "${need[@]}"
else
  apt-get install -y -q "${need[@]}"
fi
