#!/bin/sh
# mmdebstrap --customize-hook: runs after every package is installed. $1 = the root filesystem, $2 = the
# directory holding this script and the files it installs. Creates the PostgreSQL cluster with its data
# directory on the data disk (/srv/pgdata, vdb) and its WAL on the log disk (/srv/pgwal, vdc).
set -eu
root=$1
files=$2
in_root() { chroot "$root" env LANG=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

echo freezeframe-db >"$root/etc/hostname"
cat >"$root/etc/fstab" <<'FSTAB'
/dev/vda  /            ext4  rw,noatime  0 0
/dev/vdb  /srv/pgdata  ext4  rw,noatime  0 0
/dev/vdc  /srv/pgwal   ext4  rw,noatime  0 0
FSTAB
# qemu-ga runs the fsfreeze hooks only with -F.
printf 'DAEMON_ARGS="-F"\n' >"$root/etc/default/qemu-guest-agent"
install -m 755 "$files/postgresql-checkpoint" "$root/etc/qemu/fsfreeze-hook.d/postgresql-checkpoint"
install -m 755 "$files/ff-pgbench" "$root/etc/init.d/ff-pgbench"
# One serial console: no getty on virtual terminals nobody looks at (each costs time under TCG).
sed -i -e '/^[1-6]:/d' "$root/etc/inittab"
in_root update-rc.d ff-pgbench defaults

mkdir -p "$root/srv/pgdata" "$root/srv/pgwal"
in_root install -d -o postgres -g postgres -m 700 /srv/pgwal/pg_wal
in_root pg_createcluster --locale C.UTF-8 -d /srv/pgdata/main 15 main -- --waldir=/srv/pgwal/pg_wal --data-checksums
install -D -m 644 "$files/freezeframe.conf" "$root/etc/postgresql/15/main/conf.d/freezeframe.conf"
# pg_createcluster's postgresql.conf has include_dir commented out: without this line conf.d is ignored.
echo "include_dir = 'conf.d'" >>"$root/etc/postgresql/15/main/postgresql.conf"
# pgbench's tables (scale 1) are made here, not at first boot: a minute less per boot under TCG.
in_root install -d -o postgres -g postgres /run/postgresql
in_root pg_ctlcluster 15 main start
in_root su postgres -c "pgbench -i -q -s 1 postgres" || { in_root pg_ctlcluster 15 main stop; exit 1; }
in_root pg_ctlcluster 15 main stop
# Package lists and caches are not needed in the guest: smaller root disk, faster whole-instance sets.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*
