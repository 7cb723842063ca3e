# C declarations of shmipc/_shm.h: the ring's shared-memory layout and the C
# helpers (atomics, clocks, semaphores, process identity) the ring uses.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from shmipc._posix cimport sem_t

cdef extern from "_shm.h" nogil:
    const uint64_t SHM_RING_MAGIC
    const uint32_t SHM_RING_VERSION
    const uint32_t SHM_MANY_PRODUCERS
    const uint32_t SHM_MANY_CONSUMERS
    const uint32_t SHM_REC_ALIGN
    const uint32_t SHM_REC_HDR
    const uint8_t SHM_REC_READY
    const uint8_t SHM_REC_CLAIMED
    const uint8_t SHM_REC_DONE
    const size_t SHM_RING_HEADER_SIZE
    const int SHMIPC_DEBUG

    ctypedef struct shm_rec_t:
        uint32_t size
        uint8_t tag
        uint8_t state
        uint16_t check
        uint64_t owner

    ctypedef struct shm_side_t:
        uint64_t pos
        uint64_t cursor
        uint64_t msgs
        uint64_t bytes
        uint64_t lock
        uint64_t pid
        uint64_t lock_pos
        uint64_t lock_msgs

    ctypedef struct shm_wait_t:
        uint32_t data_waiters
        uint32_t space_waiters
        uint32_t plock_waiters
        uint32_t clock_waiters
        uint32_t shutdown
        uint32_t prod_cpu
        uint32_t cons_cpu
        uint32_t ready_signalled

    ctypedef struct shm_counters_t:
        uint64_t producer_sleeps
        uint64_t consumer_sleeps
        uint64_t producer_blocked_ns
        uint64_t consumer_blocked_ns
        uint64_t recoveries
        uint64_t lost
        uint64_t high_water
        uint64_t bad_messages

    ctypedef struct shm_ring_t:
        uint64_t magic
        uint32_t version
        uint32_t flags
        uint64_t capacity
        uint64_t data_offset
        uint64_t region_size
        uint32_t record_size
        uint32_t maxsize
        uint32_t creator
        shm_side_t prod
        shm_side_t cons
        shm_wait_t wait
        shm_counters_t counters
        sem_t data_sem
        sem_t space_sem
        sem_t plock_sem
        sem_t clock_sem

    uint16_t shm_rec_check(uint32_t size, uint8_t tag)
    shm_rec_t shm_rec_snapshot(const shm_rec_t *r)
    uint64_t shm_load_acq64(const uint64_t *p)
    uint64_t shm_load_rlx64(const uint64_t *p)
    void shm_store_rel64(uint64_t *p, uint64_t v)
    uint32_t shm_load_rlx32(const uint32_t *p)
    void shm_store_rel32(uint32_t *p, uint32_t v)
    void shm_store_rel8(uint8_t *p, uint8_t v)
    void shm_add32(uint32_t *p, int32_t d)
    void shm_add64(uint64_t *p, uint64_t d)
    bint shm_cas64(uint64_t *p, uint64_t expected, uint64_t desired)
    void shm_fence()
    void shm_release_fenced64(uint64_t *p)
    void shm_cpu_relax()
    int shm_cpus_allowed()
    uint32_t shm_cpu_now()
    void shm_yield()
    void shm_publish_cpu(uint32_t *slot)
    void shm_signal_ready(uint32_t *signalled, int fd, int is_socket)
    bint shm_cas32(uint32_t *p, uint32_t expected, uint32_t desired)
    int64_t shm_now_ns()
    int shm_sem_wait_until(sem_t *sem, int64_t deadline_ns)
    void shm_wake(sem_t *sem, const uint32_t *waiters)
    void shm_sem_template_init()
    void shm_sem_post(sem_t *sem)
    bint shm_pid_alive(uint32_t pid)
    uint64_t shm_self_ident()
    void shm_self_reset()
    bint shm_ident_alive(uint64_t ident)
