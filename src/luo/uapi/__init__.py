"""/dev/liveupdate for unmodified programs: ``luo run`` serves the kernel's ioctls through seccomp.

``abi`` is the UAPI contract (ioctl numbers and struct layouts, by kernel version); ``ioctls``
decodes a call with the kernel's extensible-struct rules; ``seccomp`` and ``bpf`` are the
kernel interfaces the supervisor uses; ``device`` gives the ioctls their meaning over luo's
socket protocol; ``supervisor`` is the notification loop and ``launch`` starts a program under it.
"""
