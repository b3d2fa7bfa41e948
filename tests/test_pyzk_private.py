"""pyzk's private names the adapter relies on (`zkdingsync/devices/pyzk_private.py`) still exist and
still look the way it uses them. A pyzk release that renames or reshapes one fails here, by name, instead
of every terminal failing in the field with an AttributeError."""

from __future__ import annotations

import inspect
import socket

from zk import ZK
from zk.base import ZK_helper

from zkdingsync.devices import pyzk_private


def test_every_private_method_is_there_with_its_parameters() -> None:
    for name, parameters in pyzk_private.PRIVATE_METHODS.items():
        method = getattr(ZK, name, None)
        assert callable(method), f"pyzk no longer has {name}: adapt zkdingsync/devices/pyzk_private.py"
        assert tuple(inspect.signature(method).parameters)[1:] == parameters, f"pyzk changed {name}"
    assert list(inspect.signature(ZK_helper.test_tcp).parameters) == ["self"]


def test_every_private_attribute_is_still_set_by_pyzk() -> None:
    source = inspect.getsource(ZK)
    for name in pyzk_private.PRIVATE_ATTRIBUTES:
        plain = name.removeprefix("_ZK")
        assert f"self.{plain} = " in source, f"pyzk no longer sets {name}: adapt devices/pyzk_private.py"
    zk = ZK("127.0.0.1", port=4370, timeout=1, ommit_ping=True)
    try:
        assert isinstance(pyzk_private.socket_of(zk), socket.socket)
    finally:
        pyzk_private.socket_of(zk).close()


def test_connect_goes_through_what_the_adapter_replaces() -> None:
    # connect() calls the socket factory and the size probe through the instance, so that the
    # adapter's replacements are the ones that run.
    source = inspect.getsource(ZK.connect)
    assert "self.__create_socket()" in source
    assert "self.helper.test_tcp()" in source
    zk = ZK("127.0.0.1", port=4370, timeout=1, ommit_ping=True)
    made: list[str] = []
    try:
        pyzk_private.set_socket_factory(zk, lambda: made.append("socket"))
        pyzk_private.skip_size_probe(zk)
        assert zk.helper.test_tcp() == 0
        zk._ZK__create_socket()
        assert made == ["socket"]
    finally:
        pyzk_private.socket_of(zk).close()
