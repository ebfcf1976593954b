# The I/O threads: one pair per TUN queue, each sleeping in poll until its fd is ready, then
# working a batch (batches.pxi) and busy-polling both halves for a while; start and stop.
# Part of _fastpath.pyx (included).

cdef void backoff() noexcept nogil:
    # After an unexpected fd error poll would report the fd ready again at once: don't spin.
    cdef timespec ts
    ts.tv_sec = 0
    ts.tv_nsec = 10000000
    nanosleep(&ts, NULL)


cdef int wait_ready(int fd, short events, int stop_fd, int timeout_ms=-1,
                    int fd2=-1) noexcept nogil:
    """1 when ``fd`` (or ``fd2``, if not -1) has one of ``events`` (or is in error), 0 when
    asked to stop, -1 when fd is invalid or poll fails, 2 after ``timeout_ms`` (-1: none) with
    neither."""
    cdef pollfd fds[3]
    cdef int r
    while True:
        fds[0].fd = fd
        fds[0].events = events
        fds[0].revents = 0
        fds[1].fd = stop_fd
        fds[1].events = POLLIN
        fds[1].revents = 0
        fds[2].fd = fd2
        fds[2].events = events
        fds[2].revents = 0
        r = poll(fds, 3 if fd2 >= 0 else 2, timeout_ms)
        if r < 0:
            if errno == EINTR:
                continue
            return -1
        if r == 0:
            return 2
        if fds[1].revents:
            return 0
        if fds[0].revents & POLLNVAL or (fd2 >= 0 and fds[2].revents & POLLNVAL):
            return -1
        if fds[0].revents or (fd2 >= 0 and fds[2].revents):
            return 1


cdef void thread_setup(const char* name) noexcept nogil:
    # Signals belong to Python's main thread; a handler run here could never reach Python.
    cdef sigset_t all_signals
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, NULL)
    pthread_setname_np(pthread_self(), name)


cdef int run_half(Queue* qu, bint egress, bint wait) noexcept nogil:
    """A half's work under its mutex: the packets or datagrams read (-1 on an fd error). With
    ``wait`` (its own thread), wait for the mutex and drain the socket; without (the other
    thread, busy-polling), 0 at once if the mutex is taken, and one batch, so that a flood on
    one half can't keep the poller from the other."""
    cdef pthread_mutex_t* mutex = &qu.eg_mutex if egress else &qu.ig_mutex
    cdef int n
    if wait:
        pthread_mutex_lock(mutex)
    elif pthread_mutex_trylock(mutex) != 0:
        return 0
    n = egress_batch(qu) if egress else ingress_batch(qu, wait)
    pthread_mutex_unlock(mutex)
    return n


cdef void poll_halves(Queue* qu) noexcept nogil:
    """Poll both halves, working whichever is ready, until busy_poll_ns pass with nothing to
    do or the threads are asked to stop."""
    cdef pollfd fds[4]
    cdef uint64_t now
    cdef uint64_t deadline = monotonic_ns() + qu.busy_poll_ns
    cdef int worked, i, n
    fds[0].fd = qu.tun_fd
    fds[1].fd = qu.udp_fd
    fds[2].fd = qu.shared.stop_fd
    fds[3].fd = qu.udp6_fd    # poll ignores it when -1
    for i in range(4):
        fds[i].events = POLLIN
    while True:
        for i in range(4):
            fds[i].revents = 0
        if poll(fds, 4, 0) < 0:
            if errno == EINTR:
                continue
            return
        if fds[2].revents:
            return
        worked = 0
        if fds[3].revents:
            fds[1].revents |= fds[3].revents    # the ingress half reads both sockets
        for i in range(2):
            if fds[i].revents:
                n = run_half(qu, i == 0, False)
                if n < 0:
                    return      # the owner thread's loop sees the error and backs off
                if n > 0:
                    qu.busy_polled[i] += 1
                    worked = 1
        now = monotonic_ns()
        if worked:
            deadline = now + qu.busy_poll_ns
        elif now >= deadline:
            return
        else:
            sched_yield()   # a thread woken on this CPU (an iperf3, a pinger) goes first


cdef void busy_poll(Queue* qu, int me) noexcept nogil:
    """After thread ``me`` forwarded something, poll both halves for a while before sleeping
    (off when busy_poll_ns is 0; a no-op while the other thread does it). A sleeping thread on
    an idle vCPU takes tens of microseconds to wake, and an idle round trip wakes four of them
    (both halves on both hosts); a thread that is still polling answers at once. Meanwhile the
    other thread sleeps on its park eventfd, not on its fd, so that packets the poller takes
    don't wake it (it still looks at its own half every PARK_CHECK_MS). The cost is CPU:
    polling through the gaps between a flow's packets keeps one core busy."""
    cdef uint64_t one = 1
    if qu.busy_poll_ns == 0 or pthread_mutex_trylock(&qu.poll_mutex) != 0:
        return
    fu_store_release(&qu.poller, <uint32_t>me + 1)
    poll_halves(qu)
    fu_store_release(&qu.poller, 0)
    write(qu.park_fds[1 - me], &one, sizeof(one))
    pthread_mutex_unlock(&qu.poll_mutex)


cdef void io_loop(Queue* qu, int me) noexcept nogil:
    """Thread ``me`` (0 egress, 1 ingress): sleep until its fd is ready, forward a batch,
    busy-poll, again; while the other thread busy-polls, sleep until it stops."""
    cdef int fd = qu.tun_fd if me == 0 else qu.udp_fd
    cdef uint64_t drained
    cdef int n
    thread_setup("flannel-egress" if me == 0 else "flannel-ingress")
    while True:
        if fu_load_acquire(&qu.poller) == <uint32_t>(2 - me):     # the other one polls
            n = wait_ready(qu.park_fds[me], POLLIN, qu.shared.stop_fd, PARK_CHECK_MS)
            if n <= 0:
                break
            if n == 1:
                read(qu.park_fds[me], &drained, sizeof(drained))
            else:
                # The poller may be held up in the other half (a flood, a send buffer full):
                # take what waits in ours meanwhile, if it is not at it.
                run_half(qu, me == 0, False)
            continue
        if wait_ready(fd, POLLIN, qu.shared.stop_fd, -1,
                      qu.udp6_fd if me == 1 else -1) <= 0:
            break
        if fu_load_acquire(&qu.poller) == <uint32_t>(2 - me):
            continue    # it takes this packet: don't queue up behind it on the mutex
        n = run_half(qu, me == 0, True)
        if n < 0:
            backoff()
        elif n > 0:
            busy_poll(qu, me)


cdef void* egress_main(void* arg) noexcept nogil:
    io_loop(<Queue*>arg, 0)
    return NULL


cdef void* ingress_main(void* arg) noexcept nogil:
    io_loop(<Queue*>arg, 1)
    return NULL


cdef void queue_init_ingress(Queue* qu) noexcept nogil:
    cdef IngressState* q = &qu.ig
    cdef int i
    # recvmmsg only writes msg_len/msg_flags/msg_namelen/msg_controllen, so the vectors are
    # set up once.
    memset(q.msgs, 0, BATCH * sizeof(mmsghdr))
    for i in range(BATCH):
        q.iov[i].iov_base = q.bufs + <size_t>i * ING_SLOT + ING_HEADROOM
        q.iov[i].iov_len = BUF_SIZE
        q.msgs[i].msg_hdr.msg_iov = &q.iov[i]
        q.msgs[i].msg_hdr.msg_iovlen = 1
        q.msgs[i].msg_hdr.msg_name = &q.names[i]
        q.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
        if qu.shared.udp_gro:
            q.msgs[i].msg_hdr.msg_control = &q.ctrl[i * CTRL_WORDS]
    q.co.tun_fd = qu.tun_fd
    q.co.vnet = qu.shared.vnet
    q.co.mtu = qu.shared.mtu
    q.co.arena = q.arena
    q.co.counters = &q.counters
    q.co.head = NULL


cdef void stop_threads(Queue* qu) noexcept nogil:
    cdef uint64_t one = 1
    if not qu.eg.started and not qu.ig.started:
        return
    write(qu.shared.stop_fd, &one, sizeof(one))
    if qu.eg.started:
        pthread_join(qu.eg.thread, NULL)
        qu.eg.started = 0
    if qu.ig.started:
        pthread_join(qu.ig.thread, NULL)
        qu.ig.started = 0


cdef Queue* queue_new(Shared* shared, int tun_fd, int udp_fd, int udp6_fd) noexcept nogil:
    """A queue with its mutexes and park eventfds, no buffers yet (queue_alloc); NULL when out
    of memory or fds."""
    cdef Queue* qu = <Queue*>calloc(1, sizeof(Queue))
    if qu == NULL:
        return NULL
    qu.shared = shared
    qu.tun_fd = tun_fd
    qu.udp_fd = udp_fd
    qu.udp6_fd = udp6_fd
    pthread_mutex_init(&qu.eg_mutex, NULL)
    pthread_mutex_init(&qu.ig_mutex, NULL)
    pthread_mutex_init(&qu.poll_mutex, NULL)
    qu.park_fds[0] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    qu.park_fds[1] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if qu.park_fds[0] < 0 or qu.park_fds[1] < 0:
        queue_free(qu)
        return NULL
    return qu


cdef void queue_free(Queue* qu) noexcept nogil:
    """Stop the queue's threads and free it (NULL: nothing)."""
    if qu == NULL:
        return
    stop_threads(qu)
    free(qu.eg.bufs)
    free(qu.eg.arena)
    free(qu.ig.bufs)
    free(qu.ig.arena)
    if qu.park_fds[0] >= 0:
        close(qu.park_fds[0])
    if qu.park_fds[1] >= 0:
        close(qu.park_fds[1])
    pthread_mutex_destroy(&qu.eg_mutex)
    pthread_mutex_destroy(&qu.ig_mutex)
    pthread_mutex_destroy(&qu.poll_mutex)
    free(qu)


cdef int queue_alloc(Queue* qu) noexcept nogil:
    """The queue's packet buffers, once (malloc'd, not calloc'd: untouched pages cost no RSS
    until traffic needs them); -1 when out of memory."""
    cdef bint vnet = qu.shared.vnet
    if qu.eg.bufs != NULL:
        return 0
    qu.eg.bufs = <uint8_t*>malloc(<size_t>BATCH * EGRESS_SLOT)
    qu.eg.arena = <uint8_t*>malloc(ARENA_SIZE) if vnet else NULL
    qu.ig.bufs = <uint8_t*>malloc(<size_t>BATCH * ING_SLOT)
    qu.ig.arena = <uint8_t*>malloc(ING_ARENA)
    if (qu.eg.bufs == NULL or qu.ig.bufs == NULL or qu.ig.arena == NULL
            or (vnet and qu.eg.arena == NULL)):
        free(qu.eg.bufs)
        free(qu.eg.arena)
        free(qu.ig.bufs)
        free(qu.ig.arena)
        qu.eg.bufs = NULL
        qu.eg.arena = NULL
        qu.ig.bufs = NULL
        qu.ig.arena = NULL
        return -1
    queue_init_ingress(qu)
    return 0


cdef int queue_start(Queue* qu) noexcept nogil:
    """Start the queue's thread pair; 0, or pthread_create's error (none left running)."""
    cdef uint64_t drained
    cdef int rc
    read(qu.park_fds[0], &drained, sizeof(drained))
    read(qu.park_fds[1], &drained, sizeof(drained))
    rc = pthread_create(&qu.eg.thread, NULL, egress_main, qu)
    if rc == 0:
        qu.eg.started = 1
        rc = pthread_create(&qu.ig.thread, NULL, ingress_main, qu)
        if rc == 0:
            qu.ig.started = 1
    if rc != 0:
        stop_threads(qu)
    return rc
