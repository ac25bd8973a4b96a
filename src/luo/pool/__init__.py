"""luo.pool: the preserved memory pool, its I/O-free core.

The host daemon makes one big memfd (2 MiB hugetlb pages, or shmem), carves it into shards and
extents for owners (VMs, sessions, clients), and preserves it across live updates. Here are the
pure pieces; the daemon, CLI and VMM wire them up.

- ``spec``: the command-line forms (``--pool 8G:hugetlb``, shards, label mode) and the ``Layout``
  they determine: where shards, the label granule and the general area lie.
- ``extents``: the ``Allocator`` of the general area: extents per owner, scrubbing what one owner
  freed before another gets it, claim-once after an update, ``finish`` releasing the unclaimed.
- ``memmap``: the pool's preserved-memory map, an FDT node of luo's KHO tree (per-order bitmaps,
  per-owner ranges, shards), written with luo's libfdt writer and parsed strictly.
- ``labels``: the end-label area (the pool describing shards made at run time): two versioned,
  checksummed copies, so a torn write leaves one.
"""
