#!/bin/sh
# Refuse an image holding instructions that PVM's ring-0 emulator does not handle (or that have no
# business in this guest).  Ring-3 code would survive most of them, but one list for the whole
# image is simpler than proving which function runs in which ring.
set -eu
img="$1"
bad=$(objdump -d --no-show-raw-insn "$img" |
      grep -E '^\s+[0-9a-f]+:\s+(popcnt|lzcnt|tzcnt|cmpxchg16b|xsave|xsaveopt|xsavec|xrstor|int3|clac|stac|fwait|wait|f[a-z]+|movbe)\b' || true)
if [ -n "$bad" ]; then
    echo "check-insns: $img contains instructions PVM ring 0 will not emulate:" >&2
    echo "$bad" >&2
    exit 1
fi
