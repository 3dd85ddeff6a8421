"""deploy/infra.py's pure helpers (the processes it starts are exercised by every real-backend test)."""

import base64
import uuid
from collections.abc import Iterator

import pytest

from deploy import infra


def test_cluster_ids_are_kafka_shaped() -> None:
    for _ in range(500):
        cluster_id = infra.new_cluster_id()
        assert len(cluster_id) == 22
        assert uuid.UUID(bytes=base64.urlsafe_b64decode(cluster_id + "=="))
        assert not cluster_id.startswith("-")


def test_a_cluster_id_that_would_read_as_an_option_is_never_handed_to_the_storage_tool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 0xF8 puts 62 ("-" in URL-safe base64) in the first six bits: one random id in 64 did this,
    # and kafka-storage's argument parser rejected it as a missing --cluster-id value.
    draws: Iterator[uuid.UUID] = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x07" * 16)])
    monkeypatch.setattr(infra.uuid, "uuid4", lambda: next(draws))
    assert base64.urlsafe_b64encode(b"\xf8" + bytes(15)).decode().startswith("-")
    assert infra.new_cluster_id() == base64.urlsafe_b64encode(b"\x07" * 16).decode().rstrip("=")


def ephemeral_range() -> tuple[int, int]:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(x) for x in f.read().split())
    return low, high


def test_free_ports_are_below_the_ephemeral_range_and_never_handed_out_twice() -> None:
    """A server killed and restarted on its port must not find it taken by some client's
    outgoing connection (whose local ports come from the ephemeral range): seen in CI, one
    restarted safety replica, "address already in use"."""
    low, _ = ephemeral_range()
    ports = [infra.free_port() for _ in range(200)]
    assert all(1024 <= port < low for port in ports)
    assert len(set(ports)) == len(ports)  # none twice, though none was bound meanwhile

