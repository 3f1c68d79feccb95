#!/bin/bash
# The "init" of one simulated server (see hosts.py). Run as pid 1 of new mount,
# pid and UTS namespaces:
#   unshare --mount --pid --uts --fork --propagation private \
#       bash sandbox.sh NAME HOME PRIVATE CACHE SHIMS [KEEP]
# It leaves writable only HOME (the server's directory, also mounted on /root), /tmp
# and /var/tmp (PRIVATE/tmp, PRIVATE/var-tmp), /etc (an overlay kept in PRIVATE/etc), /home
# (PRIVATE/home: users' homes, as useradd -m makes them), a fresh tmpfs /dev/shm and CACHE
# (the shared package cache); every other mount becomes
# read-only. It prints
# "ready <host pid>" and becomes a tiny reaping init: when the simulator kills
# it, the kernel kills every process of the server.
set -eu
name=$1 home=$2 priv=$3 cache=$4 shims=$5 keep=${6:-}

# Our pid as the host sees it (for nsenter and kill), read before /proc is
# replaced by one for the new pid namespace. `read` is a builtin, so
# /proc/self is this shell.
read -r hostpid _ </proc/self/stat

# Snapshot the host's mount points before adding ours (findmnt -r escapes
# blanks as \x20; printf %b undoes that).
mapfile -t targets < <(findmnt -rn -o TARGET)

hostname "${name:0:64}" # the kernel's limit

# Open the directories first: if they live under /tmp, the private /tmp below
# hides their host paths. mount -c binds /proc/self/fd/N without resolving it
# to a (hidden) path.
exec 3<"$home" 4<"$cache" 5<"$priv/tmp" 6<"$priv/var-tmp" 7<"$shims" 8<"$priv/etc" 11<"$priv/home"
# The server's own size in /proc/meminfo (its type's memory, not this machine's).
if [ -f "$priv/meminfo" ]; then exec 10<"$priv/meminfo"; fi
bindfd() {
    [ -d "$2" ] || mkdir -p "$2"
    mount -c --bind "/proc/self/fd/$1" "$2"
}
# /home and /tmp first: HOME or CACHE may live below them on this machine.
bindfd 11 /home
bindfd 5 /tmp
[ -d /var/tmp ] && bindfd 6 /var/tmp
bindfd 3 "$home"
bindfd 4 "$cache"
exec 4<"$cache" # now the writable mount: bound again below when /root hides it
bindfd 7 "$shims"
mount -o remount,bind,ro "$shims"
exec 3<&- 5<&- 6<&- 7<&- 11<&-

# A minimal /dev: no disks or other hardware, a private /dev/shm (tmpfs,
# multiprocessing needs it writable) and the host's ptys. Built on the side
# and moved into place, since the host's /dev is the source of its nodes.
dev=$(mktemp -d /tmp/.simdev.XXXXXX)
mount -t tmpfs -o mode=755,size=64k,nosuid simdev "$dev"
cp -a /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty "$dev/"
mkdir "$dev/pts" "$dev/shm"
mount --bind /dev/pts "$dev/pts"
mount -t tmpfs -o mode=1777,size=512m,nosuid,nodev simshm "$dev/shm"
ln -s pts/ptmx "$dev/ptmx"
ln -s /proc/self/fd "$dev/fd"
ln -s /proc/self/fd/0 "$dev/stdin"
ln -s /proc/self/fd/1 "$dev/stdout"
ln -s /proc/self/fd/2 "$dev/stderr"
mount --move "$dev" /dev
rmdir "$dev"

# An /etc of its own, as on a real server: an overlay on the machine's whose changes stay
# in PRIVATE/etc (the server's disk), with the server's hostname. Before the loop below:
# the overlay keeps its own writable copy of PRIVATE's mount. /etc's own mount points (a
# container's /etc/hostname) are hidden by it, so the loop leaves them alone.
mount -t overlay simetc -o lowerdir=/etc,upperdir=/proc/self/fd/8/upper,workdir=/proc/self/fd/8/work /etc
exec 8<&-
printf '%s\n' "${name:0:64}" >/etc/hostname

# Everything the host had mounted becomes read-only, in this namespace only
# ("bind" makes remount change the mount, not the shared filesystem).
for t in "${targets[@]}"; do
    printf -v t '%b' "$t"
    case $t in
    /proc | /proc/* | /dev | /dev/* | /tmp | /tmp/* | /var/tmp | /var/tmp/* | /etc/* | /home | /home/*) ;;
    *) mount -o remount,bind,ro "$t" ;;
    esac
done

# A root's home: the server's directory is /root too. KEEP (a directory of this
# machine under /root that servers need, the host Python) stays visible, read-only.
[ -n "$keep" ] && exec 9<"$keep"
mount --bind "$home" /root
if [ -n "$keep" ]; then
    mkdir -p "$keep"
    mount -c --bind /proc/self/fd/9 "$keep"
    mount -o remount,bind,ro "$keep"
    exec 9<&-
fi
# CACHE under /root (root's ~/.cache on this machine) is hidden by that mount: bound again
# on top, or every server would fill a cache of its own (downloading every package).
case $cache in /root/*) bindfd 4 "$cache" ;; esac
exec 4<&-

# /proc for the new pid namespace; its knobs that act on the whole machine
# stay read-only (the rest of them need capabilities the server lacks).
mount -t proc -o nosuid,nodev,noexec proc /proc
for p in sys sysrq-trigger irq; do
    if [ -e "/proc/$p" ]; then mount -o bind,ro "/proc/$p" "/proc/$p"; fi
done
if [ -e /proc/self/fd/10 ]; then
    mount -c --bind /proc/self/fd/10 /proc/meminfo
    mount -o remount,bind,ro /proc/meminfo
    exec 10<&-
fi

echo "ready $hostpid"
exec >/dev/null 2>&1 </dev/null
# pid 1 must reap orphans (daemons whose parent exited), or they would stay as
# zombies and `kill -0 PID` would say a stopped daemon still runs. The shell's
# wait reaps any child while it waits for sleep; the loop survives a killed
# sleep.
exec /bin/sh -c 'while :; do sleep 2147483647 & wait $!; done'
