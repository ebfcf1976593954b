"""Types of the native fast path, flannel_udp/_fastpath.pyx (a compiled module type checkers
can't read). Keep it in step: `python3 -m mypy.stubtest --ignore-missing-stub
flannel_udp._fastpath` compares it with the built module."""

from collections.abc import Iterable
from typing import Any, Final

from typing_extensions import disjoint_base

DROP_NAMES: Final[dict[int, str]]  # drop code -> reason, as packet.DROP_NAMES
VERDICT_NAMES: Final[dict[int, str]]  # action -> "sent", "to_tun", "icmp_unreachable", "dropped"
MAX_BUSY_POLL_US: Final[int]  # FastPath's busy_poll_us, run's --busy-poll

# `flannel-udp trace` records: (ns, "egress"/"ingress", verdict, drop reason or "", proto, src,
# dst, peer, length); addresses as text, "" for none.
_TraceRecord = tuple[int, str, str, str, int, str, str, str, int]

# Test hooks: the C functions on bytes, held to flannel_udp.packet by the tests.
def flow_hash(packet: bytes) -> int: ...
def segment_tso(vnet_hdr: bytes, packet: bytes) -> tuple[int, list[bytes]]: ...
def tun_writes(
    packets: list[bytes],
    *,
    vnet: bool = True,
    complete_partial: bool = False,
    mtu: int = 0,
    gro_size: int = 0,
) -> tuple[list[tuple[bytes, bytes]], int, int]: ...

@disjoint_base
class FastPath:
    """TUN <-> UDP forwarder for one or more TUN queues; fds are owned (and closed) by the
    caller."""

    def __init__(
        self,
        tun_fd: int,
        udp_fd: int,
        port: int,
        tun_addr: str,
        subnet_len: int,
        *,
        mode: str = "udp",
        vni: int = 0,
        vtep_mac: bytes | None = None,
        send_fds: Iterable[int] | None = None,
        vnet_hdr: bool = False,
        udp_gso: bool = False,
        udp_gro: bool = False,
        source_check: bool = False,
        busy_poll_us: int = 0,
        mtu: int = 0,
        tun_addr6: str | None = None,
        subnet_len6: int = 64,
        vtep_mac6: bytes | None = None,
        udp6_fd: int | None = None,
        send6_fds: Iterable[int] | None = None,
        path_mtu6: int = 0,
        # Queues beyond the first: (TUN queue fd, its receiving socket, its IPv6 one or None).
        more_queues: Iterable[tuple[int, int, int | None]] | None = None,
    ) -> None: ...
    def set_route(self, subnet: str, peer_ip: str, vtep_mac: bytes | None = None) -> None: ...
    def del_route(self, subnet: str) -> None: ...
    # [(subnet, peer_ip, vtep_mac or None, {tx_packets, tx_bytes, rx_packets, rx_bytes})]
    def routes(self) -> list[tuple[str, str, bytes | None, dict[str, Any]]]: ...
    def route_count(self) -> int: ...
    # (peer_ip, vtep_mac or None, counters) of one subnet's route, None without one
    def route(self, subnet: str) -> tuple[str, bytes | None, dict[str, Any]] | None: ...
    # IPv6 subnets (needs tun_addr6); peer_ip is the peer's PublicIP or PublicIPv6, vtep_mac
    # its BackendV6Data VtepMAC.
    def set_route6(self, subnet: str, peer_ip: str, vtep_mac: bytes | None = None) -> None: ...
    def del_route6(self, subnet: str) -> None: ...
    def routes6(self) -> list[tuple[str, str, bytes | None, dict[str, Any]]]: ...
    def route6(self, subnet: str) -> tuple[str, bytes | None, dict[str, Any]] | None: ...
    # Totals, "ingress_drops"/"egress_drops"/"drops" as {reason: count}: see the .pyx.
    def counters(self) -> dict[str, Any]: ...
    # Per queue: {tx_packets, rx_packets}.
    def queue_counters(self) -> list[dict[str, int]]: ...
    @property
    def queue_count(self) -> int: ...
    def set_trace(self, every: int) -> None: ...
    def trace_drain(self) -> list[_TraceRecord]: ...
    def trace_info(self) -> dict[str, int]: ...
    def _table_info(self) -> dict[str, int]: ...
    def offloads(self) -> dict[str, bool]: ...
    @property
    def running(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    # Test hooks: (action, data, peer_ip or "", drop or 0, sender index); data is bytes, or
    # with vnet_hdr the list of datagrams of a SEND.
    def process_egress(
        self, packet: bytes, vnet_hdr: bytes | None = None
    ) -> tuple[int, bytes | list[bytes], str, int, int]: ...
    # (action, inner packet or b"", "", drop or 0, csum_at)
    def process_ingress(
        self, datagram: bytes, sender: str = "0.0.0.0"
    ) -> tuple[int, bytes, str, int, int]: ...
