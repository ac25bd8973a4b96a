"""Small builders of the core's records, so handler tests read like the core's calls."""

from __future__ import annotations

from luo.core.participants import FileHandler, IncomingFile, PreservedFile


def preserved(fd: int, handler: FileHandler, token: int = 1) -> PreservedFile:
    pf = PreservedFile(token=token, fd=fd, handler=handler)
    pf.data = handler.preserve(pf)
    return pf


def incoming(pf: PreservedFile, fd: int) -> IncomingFile:
    return IncomingFile(token=pf.token, compatible=pf.compatible, data=pf.data, fd=fd)
