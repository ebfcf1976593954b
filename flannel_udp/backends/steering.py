"""Flow steering of a multi-queue userspace data plane (`run --queues N`): which TUN queue, and
so which thread pair, each packet goes to. One function of the inner 5-tuple, symmetric in
source and destination, picks the queue both ways: an eBPF socket-filter program that the TUN
runs on each packet it hands us (TUNSETSTEERINGEBPF), and a classic BPF program that picks the
receiving socket of the SO_REUSEPORT group for each datagram from a peer
(SO_ATTACH_REUSEPORT_CBPF; the socket of queue i is the group's i-th). A flow thus stays on one
queue each way (no reordering within it), and its answers come back on the same one.

`flow_queue` is the plain-Python twin of both programs, which the tests check them against.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import socket
import struct
from dataclasses import dataclass

from flannel_udp.errors import UserError

TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int), <linux/if_tun.h>
SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SOCKET_FILTER = 1
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
                "riscv64": 280}
VXLAN_INNER_OFFSET = 8 + 14  # a VXLAN datagram's payload: its header, then the inner frame's
ETHERTYPE_IPV4, ETHERTYPE_IPV6 = 0x0800, 0x86DD
PROTO_TCP, PROTO_UDP = 6, 17
# IPv4 header fields (from the start of the IP header)
V4_FLAGS_FRAG, V4_PROTO, V4_SRC, V4_DST = 6, 9, 12, 16
V4_FRAG_MASK = 0x3FFF  # MF and the fragment offset: a fragment carries no (or not only) ports
V6_NEXT_HEADER, V6_SRC, V6_PORTS = 6, 8, 40  # V6_SRC..+32: source then destination
MIX = 0x045D9F3B  # a 32-bit multiplier that spreads the folded hash's bits


def _mix(h: int, queues: int) -> int:
    h ^= h >> 16
    h = (h * MIX) & 0xFFFFFFFF
    h ^= h >> 16
    return h % queues


def flow_queue(packet: bytes, queues: int) -> int:
    """The queue (0..queues-1) of an IP packet: the XOR of its addresses, and of its TCP or UDP
    ports (unless it is a fragment), mixed; a packet that is not IP (or too short) goes to 0."""
    if len(packet) < 20:
        return 0
    version = packet[0] >> 4
    ports_at = None
    if version == 4:
        h = int.from_bytes(packet[V4_SRC:V4_SRC + 4]) ^ int.from_bytes(packet[V4_DST:V4_DST + 4])
        fragment = int.from_bytes(packet[V4_FLAGS_FRAG:V4_FLAGS_FRAG + 2]) & V4_FRAG_MASK
        if packet[V4_PROTO] in (PROTO_TCP, PROTO_UDP) and not fragment:
            ports_at = (packet[0] & 0xF) * 4
    elif version == 6 and len(packet) >= 40:
        h = 0
        for at in range(V6_SRC, V6_SRC + 32, 4):
            h ^= int.from_bytes(packet[at:at + 4])
        if packet[V6_NEXT_HEADER] in (PROTO_TCP, PROTO_UDP):
            ports_at = V6_PORTS
    else:
        return 0
    if ports_at is not None:
        if len(packet) < ports_at + 4:
            return 0  # as the programs: a load past the end ends them with 0
        ports = int.from_bytes(packet[ports_at:ports_at + 4])
        h ^= (ports >> 16) ^ (ports & 0xFFFF)
    return _mix(h, queues)


# -- classic BPF: the reuseport program --------------------------------------------------------

_LD, _LDX, _ST, _ALU, _JMP, _RET, _MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
_W, _H, _B = 0x00, 0x08, 0x10
_ABS, _IND, _MEM, _MSH = 0x20, 0x40, 0x60, 0xA0
_MUL, _AND, _RSH, _MOD, _XOR = 0x20, 0x50, 0x70, 0x90, 0xA0
_JA, _JEQ, _JSET = 0x00, 0x10, 0x40
_K, _X, _A = 0x00, 0x08, 0x10
_TAX = 0x00


@dataclass
class _Insn:
    code: int
    k: int = 0
    jt: str | int = 0  # a label, or 0 (the next instruction)
    jf: str | int = 0
    label: str | None = None  # this instruction's


def _cbpf(program: list[_Insn]) -> bytes:
    """Assemble: labels resolved into forward jump offsets."""
    where = {insn.label: i for i, insn in enumerate(program) if insn.label}

    def offset(i: int, target: str | int) -> int:
        if isinstance(target, int):
            return target
        return where[target] - i - 1

    out = b""
    for i, insn in enumerate(program):
        k = offset(i, insn.k) if insn.code == _JMP | _JA else insn.k
        out += struct.pack("=HBBI", insn.code, offset(i, insn.jt), offset(i, insn.jf), k)
    return out


def _cbpf_fold_ports(at_x: bool, base: int) -> list[_Insn]:
    """M[0] ^= (ports >> 16) ^ (ports & 0xffff), ports the word at X + base (IPv4, X the
    header length) or at base; then on to mix."""
    load = _Insn(_LD | _W | _IND, base) if at_x else _Insn(_LD | _W | _ABS, base)
    return [load, _Insn(_ST, 1), _Insn(_ALU | _RSH | _K, 16), _Insn(_MISC | _TAX),
            _Insn(_LD | _MEM, 1), _Insn(_ALU | _AND | _K, 0xFFFF), _Insn(_ALU | _XOR | _X),
            _Insn(_MISC | _TAX), _Insn(_LD | _MEM, 0), _Insn(_ALU | _XOR | _X), _Insn(_ST, 0),
            _Insn(_JMP | _JA, "mix")]


def reuseport_program(queues: int, inner_offset: int) -> bytes:
    """The classic BPF program (struct sock_filter[]) that sends a datagram to the reuseport
    socket of its inner packet's queue; `inner_offset`: where the inner packet starts in the
    UDP payload (0 in UDP mode; VXLAN_INNER_OFFSET, checking the inner EtherType, in VXLAN)."""
    b = inner_offset
    prog: list[_Insn] = []
    if b >= 2:
        prog += [_Insn(_LD | _H | _ABS, b - 2),
                 _Insn(_JMP | _JEQ | _K, ETHERTYPE_IPV4, "version", 0),
                 _Insn(_JMP | _JEQ | _K, ETHERTYPE_IPV6, "version", "zero")]
    prog += [_Insn(_LD | _B | _ABS, b, label="version"), _Insn(_ALU | _AND | _K, 0xF0),
             _Insn(_JMP | _JEQ | _K, 0x40, "v4", 0), _Insn(_JMP | _JEQ | _K, 0x60, "v6", 0),
             _Insn(_RET | _K, 0, label="zero")]
    # IPv4: M[0] = src ^ dst; the ports unless a fragment or not TCP/UDP.
    prog += [_Insn(_LD | _W | _ABS, b + V4_SRC, label="v4"), _Insn(_MISC | _TAX),
             _Insn(_LD | _W | _ABS, b + V4_DST), _Insn(_ALU | _XOR | _X), _Insn(_ST, 0),
             _Insn(_LD | _H | _ABS, b + V4_FLAGS_FRAG),
             _Insn(_JMP | _JSET | _K, V4_FRAG_MASK, "mix", 0),
             _Insn(_LD | _B | _ABS, b + V4_PROTO),
             _Insn(_JMP | _JEQ | _K, PROTO_TCP, "ports4", 0),
             _Insn(_JMP | _JEQ | _K, PROTO_UDP, "ports4", "mix"),
             _Insn(_LDX | _B | _MSH, b, label="ports4")]
    prog += _cbpf_fold_ports(True, b)
    # IPv6: M[0] = XOR of the 8 address words; the ports of TCP/UDP right after the header.
    prog += [_Insn(_LD | _W | _ABS, b + V6_SRC, label="v6")]
    for at in range(V6_SRC + 4, V6_SRC + 32, 4):
        prog += [_Insn(_MISC | _TAX), _Insn(_LD | _W | _ABS, b + at), _Insn(_ALU | _XOR | _X)]
    prog += [_Insn(_ST, 0), _Insn(_LD | _B | _ABS, b + V6_NEXT_HEADER),
             _Insn(_JMP | _JEQ | _K, PROTO_TCP, "ports6", 0),
             _Insn(_JMP | _JEQ | _K, PROTO_UDP, "ports6", "mix"),
             _Insn(_LD | _W | _ABS, b + V6_PORTS, label="ports6")]
    prog += _cbpf_fold_ports(False, b + V6_PORTS)[1:]
    # mix: as _mix
    prog += [_Insn(_LD | _MEM, 0, label="mix"), _Insn(_MISC | _TAX),
             _Insn(_ALU | _RSH | _K, 16), _Insn(_ALU | _XOR | _X),
             _Insn(_ALU | _MUL | _K, MIX), _Insn(_MISC | _TAX), _Insn(_ALU | _RSH | _K, 16),
             _Insn(_ALU | _XOR | _X), _Insn(_ALU | _MOD | _K, queues), _Insn(_RET | _A)]
    return _cbpf(prog)


def attach_reuseport_program(sock: socket.socket, queues: int, inner_offset: int) -> None:
    """Attach the reuseport program to `sock`'s SO_REUSEPORT group (for all its sockets)."""
    code = reuseport_program(queues, inner_offset)
    filt = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(filt))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as e:
        raise UserError(f"--queues {queues}: the kernel refused the reuseport program that "
                        f"spreads datagrams over the queues: {e.strerror}") from None


# -- eBPF: the TUN steering program ------------------------------------------------------------

_ALU64, _ALU32 = 0x07, 0x04
_MOV, _EXIT, _JNE, _LSH = 0xB0, 0x95, 0x50, 0x60
R0, R1, R6, R7, R8 = 0, 1, 6, 7, 8


@dataclass
class _EInsn:
    code: int
    dst: int = 0
    src: int = 0
    off: str | int = 0  # a label for jumps
    imm: int = 0
    label: str | None = None


def _ebpf(program: list[_EInsn]) -> bytes:
    where = {insn.label: i for i, insn in enumerate(program) if insn.label}
    out = b""
    for i, insn in enumerate(program):
        off = where[insn.off] - i - 1 if isinstance(insn.off, str) else insn.off
        out += struct.pack("=BBhi", insn.code, (insn.src << 4) | insn.dst, off, insn.imm)
    return out


def _ld_abs(size: int, at: int) -> _EInsn:  # r0 = the packet's (big-endian) bytes at `at`
    return _EInsn(_LD | size | _ABS, imm=at)


def _ebpf_fold_ports(load: _EInsn) -> list[_EInsn]:
    """r8 ^= (ports >> 16) ^ (ports & 0xffff), the ports word loaded by `load`."""
    return [load, _EInsn(_ALU32 | _MOV | _X, R1, R0), _EInsn(_ALU32 | _RSH | _K, R1, imm=16),
            _EInsn(_ALU32 | _AND | _K, R0, imm=0xFFFF), _EInsn(_ALU32 | _XOR | _X, R0, R1),
            _EInsn(_ALU32 | _XOR | _X, R8, R0), _EInsn(_JMP | _JA, off="mix")]


def steering_program(queues: int) -> bytes:
    """The eBPF socket-filter program (struct bpf_insn[]) whose result is the TUN queue of a
    packet (an IP packet from its first byte, as a TUN sees it): `flow_queue`."""
    prog = [_EInsn(_ALU64 | _MOV | _X, R6, R1),  # LD_ABS reads the skb in r6
            _ld_abs(_B, 0), _EInsn(_ALU32 | _AND | _K, R0, imm=0xF0),
            _EInsn(_JMP | _JEQ | _K, R0, off="v4", imm=0x40),
            _EInsn(_JMP | _JEQ | _K, R0, off="v6", imm=0x60),
            _EInsn(_ALU64 | _MOV | _K, R0, imm=0), _EInsn(_JMP | _EXIT)]
    prog += [_EInsn(_LD | _W | _ABS, imm=V4_SRC, label="v4"),
             _EInsn(_ALU32 | _MOV | _X, R8, R0), _ld_abs(_W, V4_DST),
             _EInsn(_ALU32 | _XOR | _X, R8, R0), _ld_abs(_H, V4_FLAGS_FRAG),
             _EInsn(_JMP | _JSET | _K, R0, off="mix", imm=V4_FRAG_MASK),
             _ld_abs(_B, V4_PROTO), _EInsn(_JMP | _JEQ | _K, R0, off="ports4", imm=PROTO_TCP),
             _EInsn(_JMP | _JNE | _K, R0, off="mix", imm=PROTO_UDP),
             _EInsn(_LD | _B | _ABS, imm=0, label="ports4"),
             _EInsn(_ALU32 | _AND | _K, R0, imm=0x0F), _EInsn(_ALU32 | _LSH | _K, R0, imm=2),
             _EInsn(_ALU64 | _MOV | _X, R7, R0)]
    prog += _ebpf_fold_ports(_EInsn(_LD | _W | _IND, src=R7, imm=0))
    prog += [_EInsn(_LD | _W | _ABS, imm=V6_SRC, label="v6"), _EInsn(_ALU32 | _MOV | _X, R8, R0)]
    for at in range(V6_SRC + 4, V6_SRC + 32, 4):
        prog += [_ld_abs(_W, at), _EInsn(_ALU32 | _XOR | _X, R8, R0)]
    prog += [_ld_abs(_B, V6_NEXT_HEADER),
             _EInsn(_JMP | _JEQ | _K, R0, off="ports6", imm=PROTO_TCP),
             _EInsn(_JMP | _JNE | _K, R0, off="mix", imm=PROTO_UDP)]
    ports6 = _ebpf_fold_ports(_ld_abs(_W, V6_PORTS))
    ports6[0].label = "ports6"
    prog += ports6
    prog += [_EInsn(_ALU32 | _MOV | _X, R0, R8, label="mix"),
             _EInsn(_ALU32 | _MOV | _X, R1, R0), _EInsn(_ALU32 | _RSH | _K, R1, imm=16),
             _EInsn(_ALU32 | _XOR | _X, R0, R1), _EInsn(_ALU32 | _MUL | _K, R0, imm=MIX),
             _EInsn(_ALU32 | _MOV | _X, R1, R0), _EInsn(_ALU32 | _RSH | _K, R1, imm=16),
             _EInsn(_ALU32 | _XOR | _X, R0, R1), _EInsn(_ALU32 | _MOD | _K, R0, imm=queues),
             _EInsn(_JMP | _EXIT)]
    return _ebpf(prog)


def load_socket_filter(code: bytes) -> int:
    """Load an eBPF socket-filter program; its fd (OSError with the verifier's log if refused)."""
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIQQIIQ", attr, 0, BPF_PROG_TYPE_SOCKET_FILTER, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_), 1, len(log),
                     ctypes.addressof(log))
    fd = libc.syscall(number, BPF_PROG_LOAD, attr, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{os.strerror(err)}: {log.value.decode(errors='replace').strip()}")
    return fd


def attach_steering_program(tun_fd: int, queues: int) -> None:
    """Make the TUN behind `tun_fd` queue each packet by `flow_queue` (the program stays
    attached to the device; our fd of it is closed)."""
    try:
        fd = load_socket_filter(steering_program(queues))
    except OSError as e:
        raise UserError(f"--queues {queues}: cannot load the TUN steering program (needs "
                        f"CAP_BPF or CAP_SYS_ADMIN): {e.strerror}") from None
    try:
        fcntl.ioctl(tun_fd, TUNSETSTEERINGEBPF, struct.pack("i", fd))
    except OSError as e:
        raise UserError(f"--queues {queues}: the TUN refused its steering program: "
                        f"{e.strerror}") from None
    finally:
        os.close(fd)
