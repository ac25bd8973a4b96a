#!/usr/bin/env bash
# Fetches QEMU 10 (Debian 12's bookworm-backports qemu-system-x86, which has cpr-transfer) into
# <repo>/.cache/qemu-10 for the QEMU driver's cpr-transfer mode (docs/qemu.md), WITHOUT installing
# it: the packages are unpacked there and `.cache/qemu-10/qemu-system-x86_64` runs the binary with
# its own data dir first and the system's (SeaBIOS, option ROMs) second. The system's QEMU 7.2 stays
# the default. Nothing outside the project changes: the backports suite is read through a sources
# file, package lists and a download cache of this directory; its entry is a copy of the machine's
# own Debian entry (same URI, same keyring) with the suite renamed, so no host is named here.
# Best effort: without the suite (no network, another release) it says so and exits 0, and the
# cpr-transfer tests skip saying why. Idempotent: does nothing once the wrapper exists.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest="$here/.cache/qemu-10"
[ -x "$dest/qemu-system-x86_64" ] && exit 0
say() { echo "qemu-backports: $*" >&2; }

# The machine's Debian entry: deb822 (debian.sources) or one-line (sources.list).
uri="" keyring=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  keyring=$(awk '/^Signed-By:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
elif [ -f /etc/apt/sources.list ]; then
  uri=$(awk '$1 == "deb" && $0 ~ /bookworm/ {for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}' /etc/apt/sources.list)
fi
[ -n "$uri" ] || { say "no Debian entry in /etc/apt to copy; QEMU 10 not fetched (cpr-transfer tests will skip)"; exit 0; }
keyring=${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}

work=$(mktemp -d)
chmod 755 "$work" # apt downloads as _apt
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
echo "deb [signed-by=$keyring] $uri bookworm-backports main" >"$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -q)
if ! apt-get "${apt_opts[@]}" update >/dev/null 2>&1; then
  say "cannot read bookworm-backports from $uri; QEMU 10 not fetched (cpr-transfer tests will skip)"
  exit 0
fi
version=$(apt-cache "${apt_opts[@]}" policy qemu-system-x86 | awk '/bpo/ && $1 ~ /^[0-9]/ {print $1; exit}')
case "$version" in
  *:1[0-9].*) ;;
  *) say "bookworm-backports has no QEMU >= 10 (found '${version:-none}'); not fetched"; exit 0 ;;
esac
chown _apt "$work/debs" 2>/dev/null || true # spares apt's "unsandboxed" warning
if ! (cd "$work/debs" && apt-get "${apt_opts[@]}" download "qemu-system-x86=$version" "qemu-system-data=$version" >/dev/null); then
  say "cannot download QEMU $version; not fetched (cpr-transfer tests will skip)"
  exit 0
fi
rm -rf "$dest.part"
mkdir -p "$dest.part"
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$dest.part"; done
missing=$(ldd "$dest.part/usr/bin/qemu-system-x86_64" 2>&1 | awk '/not found/ {print $1}' || true)
if [ -n "$missing" ]; then
  say "QEMU $version needs libraries this machine lacks ($missing); not used"
  rm -rf "$dest.part"
  exit 0
fi
cat >"$dest.part/qemu-system-x86_64" <<WRAP
#!/bin/sh
# QEMU $version from bookworm-backports, unpacked by scripts/qemu-backports.sh (not installed)
exec "$dest/usr/bin/qemu-system-x86_64" -L "$dest/usr/share/qemu" -L /usr/share/qemu "\$@"
WRAP
chmod +x "$dest.part/qemu-system-x86_64"
echo "qemu-system-x86 $version" >"$dest.part/version"
rm -rf "$dest"
mv "$dest.part" "$dest"
say "QEMU $version unpacked into $dest"
