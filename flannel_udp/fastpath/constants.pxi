# The fast path's constants: sizes and limits, the modes, the actions and drop reasons and their
# names for Python (wire formats are in headers.pxi). Part of _fastpath.pyx (included).
# Shared with flannel_udp.packet: the numbering must match packet.Drop / packet.Action.

cdef enum:
    BATCH = 64                      # packets per read/sendmmsg/recvmmsg batch
    BUF_SIZE = 65536                # one buffer holds the largest IPv4 packet / UDP payload
    HEADROOM = 64                   # room for the encapsulation in front of an egress packet
    EGRESS_SLOT = HEADROOM + BUF_SIZE
    # The ICMP error: its IP and ICMP headers, and the largest header it quotes with 8 bytes.
    ICMP_MAX = IPV4_HEADER_LEN + ICMP_HEADER_LEN + IPV4_MAX_HEADER_LEN + ICMP_QUOTE_PAYLOAD
    # An ICMPv6 error quotes as much as fits in the minimum IPv6 MTU (RFC 4443 2.4 (c)).
    REPLY_MAX = IPV6_MIN_MTU
    TABLE_MIN_CAPACITY = 16
    MAX_SENDERS = 64                # send sockets egress may spread flows over
    MAX_QUEUES = 16                 # TUN queues (each with a thread pair)
    # ICMP errors a peer's traffic can make us write: a token bucket, ICMP_RATE per second with
    # bursts of ICMP_BURST (the kernel's own icmp_msgs_per_sec is 1000, burst 50).
    ICMP_RATE = 100
    ICMP_BURST = 100
    TRACE_SLOTS = 4096              # records per trace ring (power of two)
    BUSY_POLL_MAX_US = 1000000
    PARK_CHECK_MS = 1               # a parked thread looks at its own half this often

# Offloads (the virtio_net_hdr and GSO types are in headers.pxi).
cdef enum:
    TSO_MAX_SEGS = 256              # segments of one super-packet (MSS >= 256 at 64 KB)
    ARENA_SIZE = 1 << 20            # egress: segments of the super-packets of one send round
    MSG_MAX = 256                   # egress: messages (datagrams or GSO runs) per send round
    GSO_MAX_SEGS = 64               # UDP_SEGMENT: datagrams per sendmsg (UDP_MAX_SEGMENTS)
    # UDP_SEGMENT: the payload of one sendmsg, at most one IPv4 datagram's.
    GSO_MAX_BYTES = 65535 - IPV4_HEADER_LEN - UDP_HEADER_LEN
    CTRL_WORDS = 4                  # 32 bytes of control data per message, >= CMSG_SPACE(4)
    ING_HEADROOM = 16               # ingress: room for a virtio header before the first packet
    ING_ARENA = 1 << 17             # ingress: segments of one super-packet, each behind its header
    ING_SLOT = ING_HEADROOM + BUF_SIZE
    SOL_UDP = 17
    UDP_SEGMENT = 103
    UDP_GRO = 104

cdef enum:
    MODE_UDP = 0                    # flannel's udp backend
    MODE_VXLAN = 1                  # RFC 7348, as Linux's kernel VXLAN

# Equal to packet.FLOW_HASH_SEED.
cdef uint32_t FLOW_HASH_SEED = 0x666C7578U

cdef enum:
    ACT_SEND = 0
    ACT_TUN = 1
    ACT_REPLY = 2
    ACT_DROP = 3

cdef enum:
    D_NONE = 0
    D_SHORT = 1
    D_NOT_IPV4 = 2
    D_BAD_HEADER_LEN = 3
    D_BAD_TOTAL_LEN = 4
    D_TTL_EXPIRED = 5
    D_NO_ROUTE = 6
    D_TOO_BIG = 7
    D_SEND_ERROR = 8
    D_TUN_WRITE_ERROR = 9
    D_VXLAN_SHORT = 10
    D_VXLAN_BAD_FLAGS = 11
    D_VXLAN_WRONG_VNI = 12
    D_VXLAN_WRONG_MAC = 13
    D_VXLAN_NOT_IPV4 = 14
    D_BAD_GSO = 15
    D_UNKNOWN_SENDER = 16
    D_SPOOFED_INNER_SOURCE = 17
    D_COUNT = 18

# Spelled out here rather than imported from packet.py so that the test comparing the two
# actually checks the C numbering.
DROP_NAMES = {
    D_SHORT: "short",
    D_NOT_IPV4: "not_ipv4",
    D_BAD_HEADER_LEN: "bad_header_len",
    D_BAD_TOTAL_LEN: "bad_total_len",
    D_TTL_EXPIRED: "ttl_expired",
    D_NO_ROUTE: "no_route",
    D_TOO_BIG: "too_big",
    D_SEND_ERROR: "send_error",
    D_TUN_WRITE_ERROR: "tun_write_error",
    D_VXLAN_SHORT: "vxlan_short",
    D_VXLAN_BAD_FLAGS: "vxlan_bad_flags",
    D_VXLAN_WRONG_VNI: "vxlan_wrong_vni",
    D_VXLAN_WRONG_MAC: "vxlan_wrong_mac",
    D_VXLAN_NOT_IPV4: "vxlan_not_ipv4",
    D_BAD_GSO: "bad_gso",
    D_UNKNOWN_SENDER: "unknown_sender",
    D_SPOOFED_INNER_SOURCE: "spoofed_inner_source",
}


MAX_BUSY_POLL_US = BUSY_POLL_MAX_US  # FastPath's busy_poll_us, run's --busy-poll


VERDICT_NAMES = {ACT_SEND: "sent", ACT_TUN: "to_tun", ACT_REPLY: "icmp_unreachable",
                 ACT_DROP: "dropped"}
