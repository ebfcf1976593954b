# The fast path's C state: the route table, the trace rings, what the threads share, and one
# Queue per TUN queue holding both halves' state. Part of _fastpath.pyx (included).

ctypedef struct RouteEntry:
    uint32_t subnet         # key: network address, host order
    uint32_t peer           # peer public IPv4, host order
    uint32_t used
    uint8_t mac[6]          # VXLAN: the peer's VtepMAC
    uint8_t underlay6       # an IPv6 route whose peer is reached over IPv6 (RouteEntry6.peer6)
    # tx_* added to by egress halves, rx_* by ingress halves (atomically: one per TUN queue).
    uint64_t tx_packets
    uint64_t tx_bytes
    uint64_t rx_packets
    uint64_t rx_bytes

ctypedef struct RouteTable:
    RouteEntry* slots
    uint32_t capacity       # power of two
    uint32_t count
    uint32_t shift          # 32 - log2(capacity), for Fibonacci hashing

ctypedef struct RouteEntry6:
    # An IPv6 subnet's route: ``base`` first, so that a RouteEntry* to it carries the MAC, the
    # counters and (IPv4 underlay) the peer for the code that both families share.
    RouteEntry base
    uint64_t hi             # key: the network address, high and low 64 bits
    uint64_t lo
    uint8_t peer6[16]       # the peer's PublicIPv6 when base.underlay6

ctypedef struct RouteTable6:
    RouteEntry6* slots
    uint32_t capacity       # power of two
    uint32_t count
    uint32_t shift          # 64 - log2(capacity)

ctypedef struct TraceRecord:
    # One per-packet decision, for `flannel-udp trace`.
    uint64_t ns             # CLOCK_REALTIME_COARSE, when the decision was taken
    uint8_t dir             # 0 egress, 1 ingress
    uint8_t verdict         # ACT_*
    uint8_t drop            # D_*
    uint8_t proto           # inner IP protocol (0: no inner packet parsed)
    uint32_t src            # inner addresses, host order (0: none)
    uint32_t dst
    uint32_t peer           # egress: the peer sent to; ingress: the outer sender
    uint16_t length         # inner (or datagram) length
    uint8_t v6              # bit 0: the inner packet is IPv6 (src6/dst6); bit 1: peer6 is set
    uint8_t src6[16]
    uint8_t dst6[16]
    uint8_t peer6[16]       # the peer (egress) or sender (ingress) over an IPv6 underlay

ctypedef struct TraceRing:
    # Single producer (whichever thread holds its half's mutex), single consumer
    # (FastPath.trace_drain, under the GIL).
    TraceRecord slots[TRACE_SLOTS]
    uint32_t head           # written by the producer only (release)
    uint32_t tail           # written by the consumer only (release)
    uint32_t skip           # sampling countdown (producer only)
    uint64_t taken          # records written (producer only)
    uint64_t lost           # sampled but the ring was full (producer only)

ctypedef struct Shared:
    RouteTable table
    pthread_rwlock_t lock   # readers: I/O threads per batch; writers: set_route/del_route
    uint32_t mask           # lease prefix mask, host order
    uint32_t tun_addr       # source of our ICMP errors, host order
    uint16_t port           # peers' UDP port, network order
    int mode                # MODE_UDP or MODE_VXLAN
    uint32_t vni            # VXLAN
    uint8_t vtep_mac[6]     # VXLAN: ours
    int udp_fd              # queue 0's receiving socket (bound to the port); UDP mode sends
                            # from it
    int vnet                # the TUN carries a virtio_net_hdr before each packet
    uint32_t udp_gso        # send segments with UDP_SEGMENT; cleared if the kernel refuses
                            # (atomic, relaxed: status reads it while egress may clear it)
    int udp_gro             # udp_fd has UDP_GRO: a read may hold several datagrams
    uint32_t mtu            # the TUN's (0: unknown)
    unsigned int n_senders
    # egress sends from these: n_senders IPv4 sockets (UDP mode: udp_fd only), then n6_senders
    # IPv6 ones (to PublicIPv6s; UDP mode: udp6_fd only)
    int send_fds[2 * MAX_SENDERS]
    unsigned int n6_senders
    int udp6_fd             # queue 0's over IPv6 (bound to the port; -1: no IPv6 underlay)
    int stop_fd             # eventfd; readable = threads must exit
    # Source validation: only a lease holder's PublicIP may send, only from its own subnet.
    int source_check
    RouteTable senders      # peers' PublicIPs (in .subnet), .peer = how many subnets each holds
    uint32_t trace_every    # 0: no tracer; N: one decision in N goes to the trace rings
    # IPv6 inner packets: off unless FastPath got tun_addr6 (then v6 packets count as not_ipv4).
    int v6
    RouteTable6 table6      # peers' IPv6 subnets
    uint64_t mask6_hi       # the IPv6 lease prefix mask
    uint64_t mask6_lo
    uint8_t vtep_mac6[6]    # VXLAN: ours for IPv6 (a flannel-v6 device's own VtepMAC)
    uint32_t path_mtu6      # longer IPv6 packets get ICMPv6 packet too big (0: no limit)
    uint8_t tun_addr6[16]   # our IPv6 subnet's network address: source of our ICMPv6 errors
    RouteTable6 senders6    # peers' PublicIPv6s (the key), .base.peer = how many subnets each

ctypedef struct Counters:
    uint64_t packets
    uint64_t bytes
    uint64_t icmp_sent
    uint64_t icmp_suppressed    # ICMP errors not sent: over the rate limit
    uint64_t offloaded      # egress: super-packets split; ingress: coalesced packets written
    uint64_t gso_fallbacks  # egress: UDP_SEGMENT sends refused, sent datagram by datagram
    uint64_t csum_completed # ingress: partial inner checksums completed (here or by the kernel)
    uint64_t drops[D_COUNT]

ctypedef struct Verdict:
    int action
    int drop
    size_t length           # of the packet to send/write, or of the ICMP reply
    uint32_t peer
    RouteEntry* route       # the entry whose counters the packet is charged to (or NULL)
    size_t csum_at          # ingress: where the packet's partial checksum is (0: none)

ctypedef struct GsoPlan:
    # How a super-packet read from the TUN splits (see gso_plan).
    int gso_type            # GSO_TCPV4 or GSO_UDP_L4
    size_t ip_hdr_len
    size_t hdr_len          # IP + TCP/UDP header, recomputed from the packet
    size_t payload          # bytes after hdr_len
    size_t mss              # payload per segment but the last
    unsigned int count      # segments; 0: no segmentation (the packet goes as it is)
    size_t seg_len          # IP length of each segment but the last
    size_t last_len

ctypedef struct EgressState:
    uint8_t* bufs           # BATCH * EGRESS_SLOT; a packet is read HEADROOM bytes into its slot
    uint8_t* arena          # ARENA_SIZE: segments of split super-packets, each behind its header
    size_t arena_used
    size_t lens[BATCH]
    # Per message of the send round (one datagram, or datagrams of equal size sent with
    # UDP_SEGMENT), filled by the encapsulation: the bytes, where they go, which socket sends
    # them, and what they are charged to (inner bytes, so tx matches the peer's rx).
    iovec iov[MSG_MAX]
    sockaddr_in addrs[MSG_MAX]
    sockaddr_in6 addrs6[MSG_MAX]    # where fam6 says so: to a PublicIPv6
    uint8_t fam6[MSG_MAX]
    unsigned int sender[MSG_MAX]
    RouteEntry* routes[MSG_MAX]
    size_t sent_lens[MSG_MAX]
    unsigned int segs[MSG_MAX]      # datagrams in the message
    uint16_t gso_size[MSG_MAX]      # UDP_SEGMENT size; 0: one datagram
    uint64_t ctrl[MSG_MAX * CTRL_WORDS]
    # In send order, grouped by sender: msgs[j] carries message order[j].
    mmsghdr msgs[MSG_MAX]
    unsigned int order[MSG_MAX]
    unsigned int run_end[2 * MAX_SENDERS]
    uint8_t reply[VNET_HDR_LEN + REPLY_MAX]  # the ICMP error, behind room for a virtio header
    Counters counters
    double icmp_tokens      # the ICMP token bucket (under the egress mutex)
    uint64_t icmp_stamp     # ns (CLOCK_MONOTONIC) of the last refill; 0: not started
    pthread_t thread
    int started

ctypedef struct Coalescer:
    # Ingress output: packets go to the TUN one by one, except that consecutive TCP segments of
    # one flow are merged in place (their payloads moved up behind the first one's headers)
    # into one super-packet with a GSO virtio header. A run lives within one received buffer.
    int tun_fd              # -1: emitted frames are appended to ``capture`` (test hook)
    int vnet
    uint8_t* capture        # [u32 length][frame]...
    size_t capture_used
    Counters* counters
    uint8_t* head           # IP header of the run's first segment; NULL: no run
    size_t l3               # its length: IPv4's without options, or IPv6's
    size_t length           # IP length of the run so far
    size_t hdr_len          # IP + TCP header of the head
    size_t seg_payload      # payload of the head = the GSO size
    size_t inner_bytes      # the segments' own lengths, for the counters
    uint32_t next_seq
    unsigned int count
    int closed              # PSH or a short segment ended it
    RouteEntry* route
    size_t head_csum_at     # the head's partial checksum (0: none), for a run of one
    size_t mtu              # the TUN's: a longer packet with a partial TCP checksum is a
                            # sender's unsplit super-packet (0: never)
    uint8_t* arena          # ING_ARENA bytes: the segments of a super-packet split here

ctypedef struct IngressState:
    uint8_t* bufs           # BATCH * ING_SLOT; datagrams land ING_HEADROOM bytes into a slot
    uint8_t* arena          # ING_ARENA: the segments of a super-packet split (Coalescer.arena)
    mmsghdr msgs[BATCH]
    iovec iov[BATCH]
    sockaddr_in6 names[BATCH]   # the datagrams' senders, for source validation (a
                                # sockaddr_in from the IPv4 socket)
    uint64_t ctrl[BATCH * CTRL_WORDS]
    Coalescer co
    Counters counters
    pthread_t thread
    int started

ctypedef struct Queue:
    # One TUN queue and its thread pair. Each half (its state, counters and trace ring) is
    # worked under its mutex: by its own thread, and by the other one while that busy-polls.
    # With several queues (IFF_MULTI_QUEUE), each has its own receiving sockets in one
    # SO_REUSEPORT group on the port; they share the route table and the send sockets.
    Shared* shared
    int tun_fd
    int udp_fd              # receives (bound to the port)
    int udp6_fd             # receives over IPv6 (-1: no IPv6 underlay)
    EgressState eg
    IngressState ig
    TraceRing eg_trace
    TraceRing ig_trace
    pthread_mutex_t eg_mutex
    pthread_mutex_t ig_mutex
    pthread_mutex_t poll_mutex  # held by the thread that busy-polls: one at a time
    uint32_t poller         # 0, or 1 + the thread (0 egress, 1 ingress) that busy-polls
    int park_fds[2]         # eventfds: a thread sleeps on its own while the other polls
    uint64_t busy_poll_ns   # after forwarding, poll both halves this long before sleeping
    # Batches worked while busy-polling (some may only drop), per half (0 egress, 1 ingress)
    # (under poll_mutex)
    uint64_t busy_polled[2]
