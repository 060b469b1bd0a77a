#!/usr/bin/env bash
# `make install` and `make uninstall`: Hearth as a system service.
#
#   scripts/install.sh install     binaries, the hearth user and group, /etc/hearth/hearth.toml
#                                  (generated once, kept on upgrade), /var/lib/hearth, the guest
#                                  image, and the systemd units hearth-helper and hearthd
#   scripts/install.sh uninstall   removes what install made, but never the configuration, VM
#                                  data or the hearth user unless PURGE=1
#
# Environment: PREFIX (default /usr/local), DESTDIR (stage into a directory, for packagers: no
# user, no image, no systemctl), BIN_SOURCE (where the built binaries are, default
# target/release), AGENT (the static guest agent, default
# target/x86_64-unknown-linux-gnu/release/hearth-guest), PURGE=1 (uninstall: the config, the
# data directory and the user too).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
BIN_SOURCE=${BIN_SOURCE:-target/release}
AGENT=${AGENT:-target/x86_64-unknown-linux-gnu/release/hearth-guest}
BINDIR=$PREFIX/bin
LIBDIR=$PREFIX/lib/hearth
DOCDIR=$PREFIX/share/doc/hearth
CONFDIR=/etc/hearth
STATEDIR=/var/lib/hearth
UNITDIR=/etc/systemd/system
BINARIES=(hearthd hearth hearth-helper)
UNITS=(hearth-helper.service hearthd.service)

die() { echo "error: $*" >&2; exit 1; }
live() { [ -z "$DESTDIR" ]; }
systemd_runs() { live && [ -d /run/systemd/system ]; }

install_all() {
  live && [ "$(id -u)" -ne 0 ] && die "make install needs root (or DESTDIR=DIR to stage the files)"
  for b in "${BINARIES[@]}"; do
    [ -x "$BIN_SOURCE/$b" ] || die "$BIN_SOURCE/$b is missing: build first (make install does)"
  done
  [ -x "$AGENT" ] || die "$AGENT is missing: build the guest agent first (make agent)"

  for b in "${BINARIES[@]}"; do
    install -D -m 0755 "$BIN_SOURCE/$b" "$DESTDIR$BINDIR/$b"
  done
  install -D -m 0755 "$AGENT" "$DESTDIR$LIBDIR/hearth-guest"
  install -D -m 0644 README.md "$DESTDIR$DOCDIR/README.md"

  if live; then
    getent group hearth >/dev/null || groupadd --system hearth
    getent passwd hearth >/dev/null ||
      useradd --system --gid hearth --home-dir "$STATEDIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "Hearth microVMs" hearth
    # /dev/kvm belongs to group kvm: with it QEMU may use KVM where the host has it.
    if getent group kvm >/dev/null; then usermod --append --groups kvm hearth; fi
  fi

  install -d -m 0755 "$DESTDIR$CONFDIR"
  local conf="$DESTDIR$CONFDIR/hearth.toml"
  if [ -e "$conf" ]; then
    echo "keeping $CONFDIR/hearth.toml (delete it and install again for a fresh one)"
  else
    # The defaults, with the paths of an installed hearthd: its helper runs as a service of its
    # own, the agent is installed beside the binaries.
    "$DESTDIR$BINDIR/hearthd" --generate-config |
      sed -e "s|^helper_socket = \"\"|helper_socket = \"/run/hearth-helper/helper.sock\"|" \
          -e "s|^agent_path = \".*\"|agent_path = \"$LIBDIR/hearth-guest\"|" > "$conf.new"
    grep -q '^helper_socket = "/run/hearth-helper/helper.sock"' "$conf.new" ||
      die "the generated configuration has no network.helper_socket key to set"
    grep -q "^agent_path = \"$LIBDIR/hearth-guest\"" "$conf.new" ||
      die "the generated configuration has no image.agent_path key to set"
    chmod 0640 "$conf.new"
    live && chgrp hearth "$conf.new"
    mv "$conf.new" "$conf"
    echo "wrote $CONFDIR/hearth.toml"
  fi

  install -d -m 0750 "$DESTDIR$STATEDIR"
  if live; then
    chown hearth:hearth "$STATEDIR"
    # Building the image needs root (debootstrap); hearthd, unprivileged, then finds it cached.
    HEARTH_CONFIG="$conf" "$BINDIR/hearthd" build-image
    chown -R hearth:hearth "$STATEDIR"
  fi

  local groups=""
  if ! live || getent group kvm >/dev/null; then groups="SupplementaryGroups=kvm"; fi
  for u in "${UNITS[@]}"; do
    sed -e "s|@BINDIR@|$BINDIR|g" -e "s|@DOCDIR@|$DOCDIR|g" \
        -e "s|^@SUPPLEMENTARY_GROUPS@$|$groups|" "contrib/systemd/$u.in" > "$u.tmp"
    install -D -m 0644 "$u.tmp" "$DESTDIR$UNITDIR/$u"
    rm -f "$u.tmp"
  done
  if systemd_runs; then
    systemctl daemon-reload
    echo "installed; start it now and at every boot with: systemctl enable --now hearthd"
  else
    echo "installed into ${DESTDIR:-/}; with systemd: systemctl enable --now hearthd"
  fi
}

uninstall_all() {
  live && [ "$(id -u)" -ne 0 ] && die "make uninstall needs root (or DESTDIR=DIR)"
  if systemd_runs; then
    systemctl disable --now hearthd.service hearth-helper.service 2>/dev/null || true
  fi
  for u in "${UNITS[@]}"; do rm -f "$DESTDIR$UNITDIR/$u"; done
  systemd_runs && systemctl daemon-reload
  for b in "${BINARIES[@]}"; do rm -f "$DESTDIR$BINDIR/$b"; done
  rm -rf "${DESTDIR}${LIBDIR:?}" "${DESTDIR}${DOCDIR:?}"
  if [ "${PURGE:-0}" = 1 ]; then
    rm -rf "${DESTDIR}${CONFDIR:?}" "${DESTDIR}${STATEDIR:?}"
    if live; then
      getent passwd hearth >/dev/null && userdel hearth
      getent group hearth >/dev/null && groupdel hearth
    fi
    echo "removed Hearth, its configuration, its VMs and their data, and the hearth user"
  else
    echo "removed Hearth; kept $CONFDIR, $STATEDIR (VM disks and data) and the hearth user (PURGE=1 removes them)"
  fi
}

case "${1:-}" in
  install) install_all ;;
  uninstall) uninstall_all ;;
  *) die "usage: scripts/install.sh install|uninstall" ;;
esac
