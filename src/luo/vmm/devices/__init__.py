"""Devices of a luo VM; each owns a save/restore pair over its own versioned state."""
