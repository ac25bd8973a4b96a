"""KVM ABI for the VMM: ioctl numbers, ctypes structs, and the libc calls that carry them."""
