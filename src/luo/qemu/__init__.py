"""The QEMU VMM driver's package (docs/qemu.md); its default guest is docs/guest-linux.md's."""
