"""Both halves together: handlers preserve, the tree describes, a successor process takes over.

This is the handover luod performs, minus the daemon: the DTB and the fd array cross one
SCM_RIGHTS message; the successor checks compatibles, parses with fd_count, and retrieves each
file through the handler its compatible names.
"""

from __future__ import annotations

import os
import socket

from luo.core.handover import FileRecord, LuoRecord, MemoryRange, SessionRecord
from luo.core.participants import PreservedFile
from luo.handlers import default_handlers, memfd_name
from luo.kho import build_tree

from .conftest import TIMEOUT, Successor

BODY = """
    from luo.handlers import default_handlers
    from luo.kho import check_compatibles, parse_tree
    from luo.core.participants import IncomingFile
    handlers = {h.compatible: h for h in default_handlers()}
    check_compatibles(payload, handlers)
    record, memory = parse_tree(payload, fd_count=len(fds))
    got = {}
    for f in record.all_files():
        inc = IncomingFile(token=f.token, compatible=f.compatible, data=f.data, fd=fds[f.fd_index])
        got[f.compatible] = handlers[f.compatible].retrieve(inc)
    ram = got["memfd-v1"]
    listener = socket.socket(fileno=got["socket-listen-v1"])
    listener.settimeout(20)
    conn, _ = listener.accept()
    conn.sendall(os.pread(ram, 11, 0) + b"|" + memory[0].name.encode())
    reply(b"number=%d" % record.liveupdate_number)
"""


def test_preserve_build_send_parse_retrieve(successor: Successor) -> None:
    handlers = default_handlers()
    ram = os.memfd_create("vm1-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(ram, 1 << 20)
    os.pwrite(ram, b"guest state", 0)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
    try:
        fds = [ram, listener.fileno()]
        files = []
        for index, fd in enumerate(fds):
            handler = next(h for h in handlers if h.can_preserve(fd))
            pf = PreservedFile(token=100 + index, fd=fd, handler=handler, session="vm1")
            pf.data = handler.preserve(pf)
            files.append(FileRecord(pf.token, pf.compatible, pf.data, index, handler.describe(fd)))
        record = LuoRecord(liveupdate_number=4, sessions=(SessionRecord("vm1", tuple(files)),))
        blob = build_tree(record, [MemoryRange(0, 1 << 20, memfd_name(ram))])
        assert successor(BODY, fds, blob) == b"number=4"
        assert client.recv(64) == b"guest state|vm1-ram"
    finally:
        client.close()
        listener.close()
        os.close(ram)
