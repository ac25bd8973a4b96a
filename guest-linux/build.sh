#!/usr/bin/env bash
# Builds the QEMU VMM driver's default guest (docs/guest-linux.md) into <repo>/.cache/linux-guest:
#   vmlinuz-<kernel release>  Debian 12's cloud kernel, taken out of its .deb (never installed)
#   vmlinuz                   symlink to it; kernel-version names the package and its version
#   luo-linux-guest           the static PID 1 (luo-linux-guest.c)
#   initrd.cpio.gz            /init (that program), /dev/console, empty /proc /sys
# Called by scripts/setup.sh as root. Idempotent and quick when up to date: the kernel is fetched
# only when the cache has none (delete .cache/linux-guest to take a newer one), the program and the
# initramfs are rebuilt only when their sources are newer. Nothing under /boot changes and no apt
# source is added.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache="$(dirname "$here")/.cache/linux-guest"
mkdir -p "$cache"

need=()
for p in qemu-system-x86 cpio gzip gcc libc6-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || true
  # qemu's recommends (GUI, OVMF, block drivers) are not used by a -nodefaults -display none guest
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# The kernel: the package linux-image-cloud-amd64 points at, unpacked in a temporary dir.
if [ ! -e "$cache/vmlinuz" ]; then
  meta=linux-image-cloud-amd64
  pkg_of() { apt-cache depends "$meta" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}'; }
  pkg=$(pkg_of)
  if [ -z "$pkg" ]; then # a fresh machine has no package lists yet
    apt-get update -q >/dev/null || true
    pkg=$(pkg_of)
  fi
  [ -n "$pkg" ] || { echo "guest-linux/build.sh: apt-cache knows no $meta" >&2; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # apt downloads as _apt; a dir it may write to spares the "unsandboxed" warning
  chown _apt "$tmp" 2>/dev/null || true
  (cd "$tmp" && apt-get download -q "$pkg" >/dev/null)
  deb=$(ls "$tmp"/*.deb)
  dpkg-deb -x "$deb" "$tmp/x"
  release=${pkg#linux-image-}
  config="$tmp/x/boot/config-$release"
  # What this guest relies on being built in (no modules in the initramfs): the 8250 serial port
  # and its console, devtmpfs for /dev/ttyS0, a gzip initramfs.
  for opt in CONFIG_SERIAL_8250 CONFIG_SERIAL_8250_CONSOLE CONFIG_DEVTMPFS CONFIG_BLK_DEV_INITRD CONFIG_RD_GZIP; do
    grep -qx "$opt=y" "$config" || { echo "guest-linux/build.sh: $pkg lacks $opt=y" >&2; exit 1; }
  done
  cp "$tmp/x/boot/vmlinuz-$release" "$cache/vmlinuz-$release.part"
  mv "$cache/vmlinuz-$release.part" "$cache/vmlinuz-$release"
  echo "$pkg $(dpkg-deb -f "$deb" Version)" >"$cache/kernel-version"
  ln -sfn "vmlinuz-$release" "$cache/vmlinuz" # last: its presence means the kernel is complete
fi

bin="$cache/luo-linux-guest"
src="$here/luo-linux-guest.c"
if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ]; then
  gcc -static -O2 -Wall -Wextra -Werror -pthread -o "$bin.part" "$src"
  mv "$bin.part" "$bin"
fi

initrd="$cache/initrd.cpio.gz"
if [ ! -f "$initrd" ] || [ "$bin" -nt "$initrd" ] || [ "$here/build.sh" -nt "$initrd" ]; then
  stage=$(mktemp -d)
  chmod 755 "$stage"
  mkdir -p "$stage/dev" "$stage/proc" "$stage/sys"
  cp "$bin" "$stage/init"
  # The kernel opens /dev/console for init's fds 0-2 before /init runs (devtmpfs comes later):
  # without the node, an error before the serial port is open would go nowhere. Needs root.
  mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || echo "guest-linux/build.sh: no /dev/console node (not root)" >&2
  (cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n >"$initrd.part"
  rm -rf "$stage"
  mv "$initrd.part" "$initrd"
fi
