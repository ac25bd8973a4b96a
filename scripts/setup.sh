#!/usr/bin/env bash
# Installs everything luo needs on a fresh Debian 12 machine (root), builds the test guest,
# and creates .venv at the repository root with luo installed in it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for p in swig device-tree-compiler gcc libc6-dev make binutils; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || true
  apt-get install -y -q "${need[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# plot: matplotlib and prometheus_client, for luo timeline --plot and luo metrics (docs/observe.md)
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,plot]'
if [ -f guest/Makefile ]; then
  make -s -C guest
fi
# the QEMU driver's default guest: Debian's cloud kernel + a static PID 1, in .cache/linux-guest
# (docs/guest-linux.md); installs qemu-system-x86 and cpio if missing
if [ -f guest-linux/build.sh ]; then
  guest-linux/build.sh
fi
# QEMU 10 from bookworm-backports, unpacked into .cache/qemu-10 (not installed), for the QEMU
# driver's cpr-transfer mode; best effort (docs/qemu.md)
scripts/qemu-backports.sh
# the VMM's ioctl batch runner (docs/vmm.md); without it the VMM runs the same batches in Python
so=src/luo/vmm/kvm/_ioctl_batch.so
if [ ! -f "$so" ] || [ csrc/ioctl_batch.c -nt "$so" ]; then
  gcc -O2 -Wall -Werror -shared -fPIC -o "$so" csrc/ioctl_batch.c
fi
