"""The small probes the lab runs inside namespaces, as `python -m flannel_udp.lab.probes CMD`
(ping, tcp-sink, tcp-send, tcp-connect, tcp-echo, tcp-rr): an ICMP pinger (so no ping binary is
needed, and an ICMP error is reported as such), a TCP sink/sender that check a transfer by its
SHA-256, a TCP connect that reports how it ended (e.g. ENETUNREACH: flannel answers no ICMP with
ICMP, so a ping to an unleased address just times out, while a TCP SYN gets net unreachable),
and a TCP request/response loop (`tcp-rr` timing small requests answered by `tcp-echo`: an
RPC's round trip). Each prints JSON for `Netns` to read. IPv6 destinations are pinged with
ICMPv6 (the kernel fills in its checksum and strips the IPv6 header on receive)."""

from __future__ import annotations

import argparse
import errno
import hashlib
import ipaddress
import json
import os
import select
import socket
import struct
import sys
import time

from flannel_udp.packet import checksum as inet_checksum

_ICMP_ECHO_REPLY, _ICMP_UNREACH, _ICMP_ECHO, _ICMP_TIME_EXCEEDED = 0, 3, 8, 11
_UNREACH_CODES = {0: "net unreachable", 1: "host unreachable", 2: "protocol unreachable",
                  3: "port unreachable", 4: "fragmentation needed", 13: "administratively "
                  "prohibited"}


_ICMP6_UNREACH, _ICMP6_TOO_BIG, _ICMP6_TIME_EXCEEDED, _ICMP6_ECHO, _ICMP6_ECHO_REPLY = (
    1, 2, 3, 128, 129)
_ICMP6_ERRORS = {_ICMP6_UNREACH: "unreachable", _ICMP6_TOO_BIG: "packet too big",
                 _ICMP6_TIME_EXCEEDED: "time exceeded"}
_IPV6_HEADER = 40


def _echo6_request(ident: int, seq: int) -> bytes:
    return struct.pack("!BBHHH", _ICMP6_ECHO, 0, 0, ident, seq) + b"flannel-udp-probe"


def _parse_icmp6(message: bytes, ident: int, source: str) -> tuple[int, str | None] | None:
    """(seq, error or None) when the ICMPv6 `message` (no IPv6 header) answers our echo."""
    if len(message) < 8:
        return None
    icmp_type, code = message[0], message[1]
    if icmp_type == _ICMP6_ECHO_REPLY:
        pkt_ident, seq = struct.unpack_from("!HH", message, 4)
        return (seq, None) if pkt_ident == ident else None
    if icmp_type in _ICMP6_ERRORS:
        inner = 8 + _IPV6_HEADER  # the offending packet's ICMPv6 header (no extension headers)
        if len(message) < inner + 8 or message[inner] != _ICMP6_ECHO:
            return None
        pkt_ident, seq = struct.unpack_from("!HH", message, inner + 4)
        if pkt_ident != ident:
            return None
        return seq, f"{_ICMP6_ERRORS[icmp_type]} (code {code}) from {source}"
    return None


def _echo_request(ident: int, seq: int) -> bytes:
    payload = b"flannel-udp-probe"
    header = struct.pack("!BBHHH", _ICMP_ECHO, 0, 0, ident, seq)
    checksum = inet_checksum(header + payload)
    return struct.pack("!BBHHH", _ICMP_ECHO, 0, checksum, ident, seq) + payload


def _parse_icmp(packet: bytes, ident: int) -> tuple[int, str | None] | None:
    """(seq, error or None) when `packet` (IP header included) answers one of our echoes."""
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8:
        return None
    icmp_type, code = packet[ihl], packet[ihl + 1]
    if icmp_type == _ICMP_ECHO_REPLY:
        pkt_ident, seq = struct.unpack_from("!HH", packet, ihl + 4)
        return (seq, None) if pkt_ident == ident else None
    if icmp_type in (_ICMP_UNREACH, _ICMP_TIME_EXCEEDED):
        inner = ihl + 8  # the offending packet's IP header follows the 8-byte ICMP header
        if len(packet) < inner + 20:
            return None
        inner_icmp = inner + (packet[inner] & 0x0F) * 4
        if len(packet) < inner_icmp + 8 or packet[inner_icmp] != _ICMP_ECHO:
            return None
        pkt_ident, seq = struct.unpack_from("!HH", packet, inner_icmp + 4)
        if pkt_ident != ident:
            return None
        source = socket.inet_ntoa(packet[12:16])
        if icmp_type == _ICMP_UNREACH:
            what = _UNREACH_CODES.get(code, f"unreachable (code {code})")
        else:
            what = "time exceeded"
        return seq, f"{what} from {source}"
    return None


def _ping_main(dsts: list[str], count: int, interval: float, timeout: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    v6 = {d for d in dsts if ipaddress.ip_address(d).version == 6}
    ident = os.getpid() & 0xFFFF
    results = [{"dst": d, "sent": 0, "received": 0, "rtts_ms": [], "errors": [], "answered": []}
               for d in dsts]
    pending: dict[int, tuple[int, float]] = {}  # seq -> (destination index, send time)
    numbers: dict[int, int] = {}  # seq -> the echo's number for its destination
    probes = [(i, d) for _ in range(count) for i, d in enumerate(dsts)]
    seq = 0
    next_send = time.monotonic()
    last_send = next_send
    while probes or pending:
        now = time.monotonic()
        if probes and now >= next_send:
            index, dst = probes.pop(0)
            seq = (seq + 1) & 0xFFFF
            try:
                if dst in v6:
                    sock6.sendto(_echo6_request(ident, seq), (dst, 0))
                else:
                    sock.sendto(_echo_request(ident, seq), (dst, 0))
                pending[seq] = (index, now)
                numbers[seq] = results[index]["sent"] + 1
            except OSError as e:  # e.g. no route in this namespace
                results[index]["errors"].append(e.strerror or str(e))
            results[index]["sent"] += 1
            last_send = now
            next_send = now + interval / max(1, len(dsts))
            continue
        if not probes and now >= last_send + timeout:
            break
        wait = (next_send if probes else last_send + timeout) - now
        readable, _, _ = select.select([sock, sock6], [], [], max(0.0, wait))
        if not readable:
            continue
        if readable[0] is sock6:
            packet, sender = sock6.recvfrom(65535)
            answer = _parse_icmp6(packet, ident, sender[0])
        else:
            packet, _ = sock.recvfrom(65535)
            answer = _parse_icmp(packet, ident)
        if answer is None or answer[0] not in pending:
            continue
        index, sent_at = pending.pop(answer[0])
        if answer[1] is None:
            now = time.monotonic()
            results[index]["received"] += 1
            results[index]["rtts_ms"].append(round((now - sent_at) * 1000, 3))
            results[index]["answered"].append([numbers[answer[0]], now])
        else:
            results[index]["errors"].append(answer[1])
    print(json.dumps(results))
    return 0


def _accept_one(bind: str, port: int, timeout: float) -> socket.socket:
    """Listen on `bind`:`port`, say so on stdout, and take one connection (within `timeout`)."""
    server = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET,
                           socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((bind, port))
    server.listen(1)
    server.settimeout(timeout)
    print(f"listening {bind}:{port}", flush=True)
    conn, _ = server.accept()
    conn.settimeout(timeout)
    return conn


def _tcp_sink_main(bind: str, port: int, timeout: float) -> int:
    conn = _accept_one(bind, port, timeout)
    digest, total = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 16):
        digest.update(chunk)
        total += len(chunk)
    conn.close()
    print(json.dumps({"bytes": total, "sha256": digest.hexdigest()}))
    return 0


def _tcp_connect_main(to: str, port: int, timeout: float) -> int:
    started = time.monotonic()
    error = None
    try:
        socket.create_connection((to, port), timeout=timeout).close()
    except TimeoutError:
        error = "ETIMEDOUT"
    except OSError as e:
        error = errno.errorcode.get(e.errno or 0, str(e))
    print(json.dumps({"connected": error is None, "error": error,
                      "seconds": round(time.monotonic() - started, 3)}))
    return 0


def _tcp_send_main(to: str, port: int, timeout: float) -> int:
    data = sys.stdin.buffer.read()
    started = time.monotonic()
    with socket.create_connection((to, port), timeout=timeout) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the sink closes once it has everything
    print(json.dumps({"bytes": len(data), "seconds": round(time.monotonic() - started, 3)}))
    return 0


def _tcp_echo_main(bind: str, port: int, timeout: float) -> int:
    """Echo what one connection sends until it closes (or `timeout` s pass without one)."""
    conn = _accept_one(bind, port, timeout)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while chunk := conn.recv(1 << 16):
        conn.sendall(chunk)
    conn.close()
    return 0


def _tcp_rr_main(to: str, port: int, count: int, size: int, interval: float,
                 timeout: float) -> int:
    """`count` requests of `size` bytes, `interval` s apart, each waiting for its whole echo;
    prints the round trips in microseconds (JSON)."""
    request = bytes(size)
    rtts: list[float] = []
    with socket.create_connection((to, port), timeout=timeout) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            started = time.perf_counter_ns()
            conn.sendall(request)
            got = 0
            while got < size:
                chunk = conn.recv(size - got)
                if not chunk:
                    raise SystemExit("tcp-rr: the echo server closed the connection")
                got += len(chunk)
            rtts.append((time.perf_counter_ns() - started) / 1000)
            time.sleep(interval)
    print(json.dumps({"rtts_us": rtts}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flannel_udp.lab.probes",
                                     description="probes run inside test namespaces")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ping = sub.add_parser("ping", help="ICMP echo; prints JSON results")
    ping.add_argument("dsts", nargs="+")
    ping.add_argument("--count", type=int, default=3)
    ping.add_argument("--interval", type=float, default=0.05)
    ping.add_argument("--timeout", type=float, default=1.0)
    sink = sub.add_parser("tcp-sink", help="receive one TCP connection; print size and sha256")
    sink.add_argument("--bind", required=True)
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--timeout", type=float, default=60)
    connect = sub.add_parser("tcp-connect", help="try one TCP connect; print the outcome")
    connect.add_argument("--to", required=True)
    connect.add_argument("--port", type=int, required=True)
    connect.add_argument("--timeout", type=float, default=5)
    send = sub.add_parser("tcp-send", help="send stdin over one TCP connection")
    send.add_argument("--to", required=True)
    send.add_argument("--port", type=int, required=True)
    send.add_argument("--timeout", type=float, default=60)
    echo = sub.add_parser("tcp-echo", help="echo one TCP connection's bytes back")
    echo.add_argument("--bind", required=True)
    echo.add_argument("--port", type=int, required=True)
    echo.add_argument("--timeout", type=float, default=60)
    rr = sub.add_parser("tcp-rr", help="time small requests answered by tcp-echo")
    rr.add_argument("--to", required=True)
    rr.add_argument("--port", type=int, required=True)
    rr.add_argument("--count", type=int, default=100)
    rr.add_argument("--size", type=int, default=64)
    rr.add_argument("--interval", type=float, default=0.01)
    rr.add_argument("--timeout", type=float, default=10)
    args = parser.parse_args(argv)
    if args.cmd == "ping":
        return _ping_main(args.dsts, args.count, args.interval, args.timeout)
    if args.cmd == "tcp-sink":
        return _tcp_sink_main(args.bind, args.port, args.timeout)
    if args.cmd == "tcp-connect":
        return _tcp_connect_main(args.to, args.port, args.timeout)
    if args.cmd == "tcp-echo":
        return _tcp_echo_main(args.bind, args.port, args.timeout)
    if args.cmd == "tcp-rr":
        return _tcp_rr_main(args.to, args.port, args.count, args.size, args.interval,
                            args.timeout)
    return _tcp_send_main(args.to, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
