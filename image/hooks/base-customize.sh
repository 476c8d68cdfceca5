#!/bin/sh
# Customize hook of the golden image's base layer: mmdebstrap runs it with the
# new root filesystem as $1, after the packages are installed.
set -eu
root="$1"

# The sandbox user. Written directly (not with useradd) so the result does not
# depend on which optional packages pulled in the passwd tools.
if ! grep -q '^airlock:' "$root/etc/passwd"; then
    echo 'airlock:x:1000:1000:airlock sandbox user:/home/airlock:/bin/bash' >>"$root/etc/passwd"
    echo 'airlock:x:1000:' >>"$root/etc/group"
    [ -f "$root/etc/shadow" ] && echo 'airlock:!*:19000::::::' >>"$root/etc/shadow"
    [ -f "$root/etc/gshadow" ] && echo 'airlock:!::' >>"$root/etc/gshadow"
fi
mkdir -p "$root/home/airlock"
cp -a "$root/etc/skel/." "$root/home/airlock/" 2>/dev/null || true
chown -R 1000:1000 "$root/home/airlock"
chmod 0750 "$root/home/airlock"

# A plain UTF-8 locale that needs no locales package.
echo 'LANG=C.UTF-8' >"$root/etc/default/locale"

# A container or VM gets its identity at boot, never from the image.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
echo airlock >"$root/etc/hostname"

# Caches that only make the layer bigger.
rm -rf "$root/var/cache/apt/"*.bin "$root/var/lib/apt/lists/"* "$root/var/log/"*.log
