#!/bin/sh
# mmdebstrap --setup-hook: runs before any package is installed. $1 = the new root filesystem.
# Keep the initramfs small (only virtio + ext4: it is unpacked under TCG on every boot) and stop
# postgresql-common from creating its default cluster on the root disk: ours lives on vdb/vdc.
set -eu
root=$1
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/etc/initramfs-tools/hooks" "$root/etc/postgresql-common"
printf 'MODULES=list\nCOMPRESS=gzip\n' >"$root/etc/initramfs-tools/conf.d/freezeframe"
cat >"$root/etc/initramfs-tools/hooks/freezeframe-virtio" <<'HOOK'
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk; do manual_add_modules "$m"; done
HOOK
chmod 755 "$root/etc/initramfs-tools/hooks/freezeframe-virtio"
printf 'create_main_cluster = false\n' >"$root/etc/postgresql-common/createcluster.conf"
