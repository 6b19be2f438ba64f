"""Loaded by every Python process the end-to-end tests start (PYTHONPATH): any attempt to reach the network is
written to $NETWORK_GUARD_LOG and fails. Unix sockets (multiprocessing) stay allowed."""

import os
import socket

_LOG = os.environ.get("NETWORK_GUARD_LOG")

if _LOG:
    _connect = socket.socket.connect
    _connect_ex = socket.socket.connect_ex

    def _refuse(what):
        with open(_LOG, "a") as log:
            log.write(f"{os.getpid()} {what!r}\n")
        raise OSError(f"network access refused by the test suite: {what!r}")

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse(address)
        return _connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse(address)
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        _refuse(host)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
