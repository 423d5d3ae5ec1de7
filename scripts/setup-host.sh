#!/usr/bin/env bash
# Idempotent host set-up for freezeframe on Debian 12 (root, no service manager).
# Installs Debian packages, writes the libvirt configuration that works on these machines (TCG, no cgroups,
# no namespaces, no security driver), starts virtlogd + libvirtd if they are not running, builds the venv.
# A second run when everything is up takes a few seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FREEZEFRAME_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
URI="qemu:///system"

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (libvirt system daemon, apt-get); re-run with sudo"

DEB_PACKAGES=(
  qemu-system-x86 qemu-utils
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
  busybox-static qemu-guest-agent e2fsprogs cpio xz-utils
  gcc libc6-dev openssl
  ovmf
  ceph-mon ceph-osd ceph-mgr ceph-common python3-rados python3-rbd qemu-block-extra
  radosgw
  virt-v2v
  virtnbdbackup
  postgresql  # also the database guest's checker: PostgreSQL 15 with amcheck, run on the host
  mmdebstrap  # builds the database test guest's Debian root filesystem (testbed/database_guest.py)
  iproute2 util-linux  # the multi-host test bed: ip (loopback in each host's netns), unshare, nsenter
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed: check that the Debian mirror is reachable"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed; run it by hand to see why"
fi

# OpenStack test bed (freezeframe testbed openstack): Debian's Keystone and Glance, run by our own command, never
# as system services. Their postinst scripts ask debconf (database via dbconfig, endpoint registration, admin
# user) and try to start the daemons: preseed every answer to "no" and, where no policy-rc.d exists (a host with an
# init system), forbid service starts for the duration of the install.
OPENSTACK_PACKAGES=(keystone glance-api python3-keystonemiddleware uwsgi-plugin-python3)
os_missing=()
for p in "${OPENSTACK_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || os_missing+=("$p")
done
if [ ${#os_missing[@]} -gt 0 ]; then
  say "installing the OpenStack test bed's packages: ${os_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends debconf-utils >/dev/null || die "apt-get install debconf-utils failed"
  debconf-set-selections <<'SEED'
keystone keystone/configure_db boolean false
keystone keystone/register-endpoint boolean false
glance-common glance/configure_db boolean false
glance-api glance/configure_api-endpoint boolean false
glance-common glance/ksat-create-service-user boolean false
SEED
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# freezeframe setup-host.sh: no service starts while installing\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    made_policy=1
  fi
  rc=0
  apt-get install -y -q --no-install-recommends "${os_missing[@]}" >/dev/null || rc=$?
  [ "$made_policy" = 1 ] && rm -f "$policy"
  [ "$rc" = 0 ] || die "apt-get install ${os_missing[*]} failed; run it by hand to see why"
fi

# libvirtd resolves these before reading qemu.conf and dies with "Failed to parse user" without them.
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent group libvirt >/dev/null || groupadd -r libvirt
id libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

mkdir -p /etc/libvirt /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt

QEMU_CONF=/etc/libvirt/qemu.conf
WANT_CONF='# written by freezeframe scripts/setup-host.sh: what works on hosts without systemd/cgroups
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
swtpm_user = "root"
swtpm_group = "root"'
conf_changed=0
if [ ! -f "$QEMU_CONF" ] || [ "$(cat "$QEMU_CONF")" != "$WANT_CONF" ]; then
  printf '%s\n' "$WANT_CONF" > "$QEMU_CONF"
  conf_changed=1
  # a running libvirtd must re-read it
fi

running() { pgrep -x "$1" >/dev/null 2>&1; }

if ! running virtlogd; then
  say "starting virtlogd"
  virtlogd -d || die "virtlogd failed to start; see /var/log/libvirt"
fi
if running libvirtd && [ "$conf_changed" = 1 ]; then
  say "restarting libvirtd for the new qemu.conf"
  pkill -x libvirtd || true
  for _ in $(seq 50); do running libvirtd || break; sleep 0.1; done
fi
if ! running libvirtd; then
  say "starting libvirtd"
  libvirtd -d || die "libvirtd failed to start; see /var/log/libvirt/libvirtd.log"
fi

ok=0
for _ in $(seq 100); do
  if virsh -q -c "$URI" version >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.1
done
[ "$ok" = 1 ] || die "libvirt at $URI does not answer; check that libvirtd runs (pgrep libvirtd) and its log"

# Python environment: a venv with the project (editable) and its dev tools.
stamp="$VENV/.freezeframe-stamp"
want_stamp="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV"
  "$PYTHON" -m venv "$VENV" || die "cannot create a venv with $PYTHON (is python3-venv installed?)"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want_stamp" ]; then
  say "installing freezeframe and its dependencies into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "$ROOT[dev]" || die "pip install failed (see output above)"
  printf '%s' "$want_stamp" > "$stamp"
fi
# Ceph's Python bindings (rados, rbd) exist only as Debian packages: link them into the venv (same Python 3.11 ABI).
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for mod in rados rbd; do
  so="$(ls /usr/lib/python3/dist-packages/"$mod".cpython-*.so 2>/dev/null | head -1)"
  [ -n "$so" ] || die "python3-$mod is installed but its module is missing under /usr/lib/python3/dist-packages"
  [ "$(readlink "$site/$(basename "$so")" 2>/dev/null)" = "$so" ] || ln -sf "$so" "$site/$(basename "$so")"
done
"$VENV/bin/python" -c "import libvirt, freezeframe, rados, rbd" || die "the venv cannot import libvirt/freezeframe; remove $VENV and re-run"
say "host ready: libvirt at $URI, venv at $VENV"
