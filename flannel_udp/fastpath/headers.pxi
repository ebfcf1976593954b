# Wire formats: header lengths, field offsets (from the start of their own header) and field
# values of IPv4, TCP, UDP, ICMP, VXLAN, the inner Ethernet header and the virtio_net_hdr, so
# that the code reads p[IPV4_TTL_OFFSET], not p[8]. flannel_udp.packet uses the same names.
# Multi-byte fields are big-endian, but the virtio_net_hdr's. Part of _fastpath.pyx (included).

cdef enum:
    # IPv4 (RFC 791).
    IPV4_HEADER_LEN = 20            # without options
    IPV4_MAX_HEADER_LEN = 60
    IPV4_VER_IHL_OFFSET = 0         # version (high nibble), header length in words (low nibble)
    IPV4_TOS_OFFSET = 1
    IPV4_TOTAL_LEN_OFFSET = 2
    IPV4_ID_OFFSET = 4
    IPV4_FLAGS_OFFSET = 6           # 3 flag bits (DF, MF), then the 13-bit fragment offset
    IPV4_TTL_OFFSET = 8
    IPV4_PROTO_OFFSET = 9
    IPV4_CSUM_OFFSET = 10
    IPV4_SRC_OFFSET = 12
    IPV4_DST_OFFSET = 16
    IPV4_ADDR_LEN = 4
    IPV4_VER_IHL_NO_OPTIONS = 0x45  # version 4, a 20-byte header
    IPV4_FRAGMENT_MASK = 0x3FFF     # of the flags word: MF or an offset, a fragment
    IPV4_FRAG_OFFSET_MASK = 0x1FFF  # of the flags word: an offset, a fragment but the first
    PROTO_ICMP = 1
    PROTO_TCP = 6
    PROTO_UDP = 17
    PROTO_DCCP = 33
    PROTO_SCTP = 132
    PROTO_UDPLITE = 136

    # IPv6 (RFC 8200): a fixed 40-byte header; extension headers are not walked (the next
    # header names the transport only when there are none).
    IPV6_HEADER_LEN = 40
    IPV6_VERSION_OFFSET = 0         # version (high nibble), traffic class, flow label
    IPV6_PAYLOAD_LEN_OFFSET = 4     # what follows the fixed header
    IPV6_NEXT_HEADER_OFFSET = 6
    IPV6_HOP_LIMIT_OFFSET = 7
    IPV6_SRC_OFFSET = 8
    IPV6_DST_OFFSET = 24
    IPV6_ADDR_LEN = 16
    PROTO_ICMPV6 = 58
    PROTO_IPV6_FRAGMENT = 44        # the fragment extension header
    IPV6_FRAG_OFFSET_OFFSET = 2     # of the fragment header: offset (13 bits), flags (3)
    IPV6_FRAG_OFFSET_MASK = 0xFFF8
    IPV6_MIN_MTU = 1280

    # ICMPv6 (RFC 4443): the errors we answer with.
    ICMPV6_HEADER_LEN = 8           # type, code, checksum, 4 bytes (unused, or the MTU)
    ICMPV6_DEST_UNREACH = 1
    ICMPV6_NO_ROUTE = 0
    ICMPV6_PACKET_TOO_BIG = 2
    ICMPV6_MTU_OFFSET = 4
    ICMPV6_INFO_MIN = 128           # types below are errors, never answered with one

    # The transport header: TCP, UDP, DCCP, SCTP and UDP-Lite all begin with the two ports.
    L4_PORTS_LEN = 4

    # TCP (RFC 9293).
    TCP_HEADER_LEN = 20             # without options
    TCP_SEQ_OFFSET = 4
    TCP_ACK_SEQ_OFFSET = 8
    TCP_DOFF_OFFSET = 12            # data offset (high nibble): the header length in words
    TCP_FLAGS_OFFSET = 13
    TCP_WINDOW_OFFSET = 14
    TCP_CSUM_OFFSET = 16
    TCP_OPTIONS_OFFSET = 20
    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_ACK = 0x10
    TCP_CWR = 0x80

    # UDP (RFC 768).
    UDP_HEADER_LEN = 8
    UDP_LEN_OFFSET = 4
    UDP_CSUM_OFFSET = 6

    # ICMP (RFC 792): the Destination Unreachable / Net Unreachable error we answer with.
    ICMP_HEADER_LEN = 8
    ICMP_TYPE_OFFSET = 0
    ICMP_CODE_OFFSET = 1
    ICMP_CSUM_OFFSET = 2
    ICMP_DEST_UNREACH = 3
    ICMP_NET_UNREACH = 0
    ICMP_QUOTE_PAYLOAD = 8          # an ICMP error quotes the header and 64 bits of payload
    REPLY_TTL = 64

    # VXLAN (RFC 7348) as Linux's kernel VXLAN speaks it: the VXLAN header, then an Ethernet
    # header, then the IPv4 packet.
    VXLAN_HEADER_LEN = 8
    VXLAN_FLAGS_OFFSET = 0
    VXLAN_VNI_OFFSET = 4            # 24 bits, then a reserved byte
    VXLAN_FLAG_I = 0x08             # "the VNI is valid"; the other flags are ignored on receipt
    VNI_MAX = 0xFFFFFF
    ETHERNET_HEADER_LEN = 14
    ETHERNET_DST_OFFSET = 0
    ETHERNET_SRC_OFFSET = 6
    ETHERNET_TYPE_OFFSET = 12
    ETHERTYPE_IPV4 = 0x0800
    ETHERTYPE_IPV6 = 0x86DD
    VXLAN_ENCAP_LEN = VXLAN_HEADER_LEN + ETHERNET_HEADER_LEN

    # The virtio_net_hdr (<linux/virtio_net.h>) before every packet on a TUN opened with
    # IFF_VNET_HDR; its u16 fields are in host order.
    VNET_HDR_LEN = 10
    VNET_FLAGS_OFFSET = 0
    VNET_GSO_TYPE_OFFSET = 1
    VNET_HDR_LEN_OFFSET = 2         # hdr_len: the headers of a GSO packet
    VNET_GSO_SIZE_OFFSET = 4        # payload per segment
    VNET_CSUM_START_OFFSET = 6      # where the checksummed part begins
    VNET_CSUM_OFFSET_OFFSET = 8     # csum_offset: the checksum field, from csum_start
    VNET_F_NEEDS_CSUM = 1
    GSO_NONE = 0
    GSO_TCPV4 = 1
    GSO_TCPV6 = 4
    GSO_UDP_L4 = 5                  # missing from older headers
    GSO_ECN = 0x80
