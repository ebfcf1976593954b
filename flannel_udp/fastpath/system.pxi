# The C library the fast path calls (sockets, poll, eventfd, signals, clocks, pthreads) and its
# own C helpers in fastpath/*.h. Part of _fastpath.pyx (included: one module, one C file).

# Python.h (pyconfig.h) already defines _GNU_SOURCE, which <sys/socket.h> needs for
# struct mmsghdr, sendmmsg and recvmmsg.
cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    size_t CMSG_LEN(size_t length)
    size_t CMSG_SPACE(size_t length)
    unsigned char* CMSG_DATA(cmsghdr* cmsg)
    cmsghdr* CMSG_FIRSTHDR(msghdr* msg)
    cmsghdr* CMSG_NXTHDR(msghdr* msg, cmsghdr* cmsg)
    ssize_t sendmsg(int sockfd, const msghdr* msg, int flags)
    int sendmmsg(int sockfd, mmsghdr* msgvec, unsigned int vlen, int flags)
    int recvmmsg(int sockfd, mmsghdr* msgvec, unsigned int vlen, int flags, timespec* timeout)
    enum:
        AF_INET
        AF_INET6
        MSG_DONTWAIT

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        unsigned short sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    uint16_t htons(uint16_t)
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    ctypedef unsigned long nfds_t
    int poll(pollfd* fds, nfds_t nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLNVAL

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int sigfillset(sigset_t* s)
    int pthread_sigmask(int how, const sigset_t* s, sigset_t* old)
    enum:
        SIG_BLOCK

cdef extern from "<time.h>" nogil:
    int nanosleep(const timespec* req, timespec* rem)
    int clock_gettime(int clock_id, timespec* tp)
    enum:
        CLOCK_MONOTONIC
        CLOCK_REALTIME_COARSE

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_create(pthread_t* thread, const pthread_attr_t* attr,
                       void* (*start)(void*) noexcept nogil, void* arg)
    int pthread_join(pthread_t thread, void** retval)
    int pthread_setname_np(pthread_t thread, const char* name)
    pthread_t pthread_self()
    int pthread_rwlockattr_init(pthread_rwlockattr_t* attr)
    int pthread_rwlockattr_destroy(pthread_rwlockattr_t* attr)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t* attr, int pref)
    int pthread_rwlock_init(pthread_rwlock_t* lock, const pthread_rwlockattr_t* attr)
    int pthread_rwlock_destroy(pthread_rwlock_t* lock)
    int pthread_rwlock_rdlock(pthread_rwlock_t* lock)
    int pthread_rwlock_wrlock(pthread_rwlock_t* lock)
    int pthread_rwlock_unlock(pthread_rwlock_t* lock)
    int pthread_mutex_init(pthread_mutex_t* mutex, const pthread_mutexattr_t* attr)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_trylock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)
    enum:
        PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP

# The fast path's own C helpers.
cdef extern from "fastpath/csum.h" nogil:
    uint32_t fu_sum16(const uint8_t* p, size_t n) noexcept

cdef extern from "fastpath/atomics.h" nogil:
    uint32_t fu_load_acquire(const uint32_t* p) noexcept
    void fu_store_release(uint32_t* p, uint32_t v) noexcept
    uint32_t fu_load_relaxed(const uint32_t* p) noexcept
    void fu_store_relaxed(uint32_t* p, uint32_t v) noexcept
    void fu_add_relaxed64(uint64_t* p, uint64_t v) noexcept
