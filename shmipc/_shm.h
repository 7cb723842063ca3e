/* shmipc/_shm.h -- the shared-memory layout of a ring and the few C helpers
 * (atomics, clocks, liveness) that Cython cannot express directly.
 *
 * Everything here is plain C: no Python API, callable without the GIL.
 * The layout is part of the on-memory format; change SHM_RING_VERSION
 * when you change it.
 */
#ifndef SHMIPC_SHM_H
#define SHMIPC_SHM_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE          /* sched_getcpu, CPU_COUNT (Python.h defines it already) */
#endif
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <signal.h>
#include <time.h>
#include <semaphore.h>
#include <sys/types.h>

#ifndef SHMIPC_DEBUG
#define SHMIPC_DEBUG 0
#endif

#define SHM_RING_MAGIC   0x474e495243504953ULL   /* "SIPCRING" little-endian */
#define SHM_RING_VERSION 3u   /* 2: owners are 64-bit process identities;
                                 3: wait.ready_signalled (readiness fds) */
#define SHM_CACHE_LINE   64

/* header->flags */
#define SHM_MANY_PRODUCERS 1u
#define SHM_MANY_CONSUMERS 2u

/* Record layout: a 16-byte header followed by the payload, the whole record
 * padded to SHM_REC_ALIGN so every header and payload start 16-aligned. */
#define SHM_REC_ALIGN 16u
#define SHM_REC_HDR   16u

/* record state (only many-consumer rings and zero-copy views use CLAIMED/DONE) */
#define SHM_REC_READY   0u
#define SHM_REC_CLAIMED 1u
#define SHM_REC_DONE    2u

typedef struct {
    uint32_t size;      /* payload bytes */
    uint8_t  tag;       /* message type, see _codec.pxi; 0 = padding to the end */
    uint8_t  state;     /* SHM_REC_READY / CLAIMED / DONE */
    uint16_t check;     /* shm_rec_check(size, tag): catches garbage headers */
    uint64_t owner;     /* identity (shm_self_ident) of the consumer holding a
                           CLAIMED record */
} shm_rec_t;

/* One side of the ring (producers or consumers), alone on its cache line so
 * the two sides never write the same line on the fast path. */
typedef struct {
    uint64_t pos;       /* producers: head = bytes ever committed;
                           consumers: tail = bytes ever released */
    uint64_t cursor;    /* consumers: bytes ever claimed (>= tail); producers: unused */
    uint64_t msgs;      /* messages committed / taken */
    uint64_t bytes;     /* payload bytes committed / taken */
    uint64_t lock;      /* identity of the process holding this side's lock
                           ("many" side), 0 = free; see shm_self_ident */
    uint64_t pid;       /* identity of the last process that used this side */
    uint64_t lock_pos;  /* the position (head, or cursor) at the last point
                           where it and `msgs` agreed: noted at locking, after
                           each commit (producers), before each tail move and
                           at unlocking (consumers), `lock_msgs` first ... */
    uint64_t lock_msgs; /* ... and `msgs` then: recovery from a dead holder
                           rolls back to, or counts the loss from, this pair
                           (see Ring._recover_lock) */
} __attribute__((aligned(SHM_CACHE_LINE))) shm_side_t;

/* Who sleeps on what. Read by the other side after every commit, written
 * only when someone goes to sleep: stays shared in both caches. */
typedef struct {
    uint32_t data_waiters;   /* consumers asleep waiting for a message */
    uint32_t space_waiters;  /* producers asleep waiting for room */
    uint32_t plock_waiters;  /* producers asleep on the producer lock */
    uint32_t clock_waiters;  /* consumers asleep on the consumer lock */
    uint32_t shutdown;       /* 1 once ring.shutdown() was called: no more puts */
    /* The CPU (+1; 0 = not known) each side's last waiter ran on when it
     * began to wait. Written only when it changes, on the slow path. These
     * were padding (zeroed at creation) before, so the layout version holds:
     * a ring made by older code reads 0 here, "not known". Untrusted: only
     * ever compared with our own CPU, to decide whether spinning can win. */
    uint32_t prod_cpu;
    uint32_t cons_cpu;
    /* Readiness descriptors (shmipc.connection / shmipc.queues): 0 = no
     * readiness byte is out, so the next commit of a producer that holds a
     * notify fd sends one (shm_signal_ready); 1 = one was sent and stands
     * for "messages may be there". Only a consumer that found the ring empty
     * turns it back to 0 (Ring._ready_rearm), then takes that byte out. Zero
     * at creation: the first message of a ring's life is signalled, so a
     * reader that starts polling late still finds its backlog readable.
     * Producers read it after every commit (same line as data_waiters). */
    uint32_t ready_signalled;
} __attribute__((aligned(SHM_CACHE_LINE))) shm_wait_t;

/* Counters written off the fast path (sleeping, recovery). */
typedef struct {
    uint64_t producer_sleeps;
    uint64_t consumer_sleeps;
    uint64_t producer_blocked_ns;
    uint64_t consumer_blocked_ns;
    uint64_t recoveries;     /* locks or records taken back from dead processes */
    uint64_t lost;           /* messages lost with a dead process */
    uint64_t high_water;     /* most bytes seen in the ring (sampled by the producer
                                whenever it re-reads the tail: see _reserve) */
    uint64_t bad_messages;   /* messages taken that could not be delivered: garbage
                                records, payloads that failed to decode */
} __attribute__((aligned(SHM_CACHE_LINE))) shm_counters_t;

typedef struct {
    /* immutable after creation */
    uint64_t magic;
    uint32_t version;
    uint32_t flags;
    uint64_t capacity;       /* data bytes, a power of two */
    uint64_t data_offset;    /* from the start of the region */
    uint64_t region_size;
    uint32_t record_size;    /* fixed-record rings: item bytes; 0 = variable */
    uint32_t maxsize;        /* most messages in the ring at once; 0 = no limit */
    uint32_t creator;        /* pid that created the ring */
    uint32_t reserved;
    uint8_t  pad0[8];
    shm_side_t prod;
    shm_side_t cons;
    shm_wait_t wait;
    shm_counters_t counters;
    sem_t data_sem;          /* consumers sleep here */
    sem_t space_sem;         /* producers sleep here */
    sem_t plock_sem;         /* producers wait for the producer lock here */
    sem_t clock_sem;         /* consumers wait for the consumer lock here */
} __attribute__((aligned(SHM_CACHE_LINE))) shm_ring_t;

#define SHM_RING_HEADER_SIZE \
    ((sizeof(shm_ring_t) + SHM_CACHE_LINE - 1) & ~(size_t)(SHM_CACHE_LINE - 1))

_Static_assert(sizeof(shm_rec_t) == SHM_REC_HDR, "record header must be 16 bytes");
_Static_assert(sizeof(shm_side_t) == SHM_CACHE_LINE, "a side must fill one cache line");
_Static_assert(offsetof(shm_ring_t, prod) % SHM_CACHE_LINE == 0, "prod line aligned");
_Static_assert(sizeof(shm_counters_t) == SHM_CACHE_LINE, "counters fill one cache line");
_Static_assert(sizeof(shm_wait_t) == SHM_CACHE_LINE, "waiters fill one cache line (the CPU fields used padding)");

static inline uint16_t shm_rec_check(uint32_t size, uint8_t tag) {
    uint32_t h = size * 2654435761u + (uint32_t)tag * 40503u + 0x5A17u;
    return (uint16_t)(h ^ (h >> 16));
}

/* A record header's first word (size, tag, state, check), read once: the
 * fields are then checked and used from this copy, so a writer changing
 * them meanwhile cannot make a checked value differ from the one used. */
static inline shm_rec_t shm_rec_snapshot(const shm_rec_t *r) {
    shm_rec_t copy;
    uint64_t word = __atomic_load_n((const uint64_t *)r, __ATOMIC_RELAXED);
    memcpy(&copy, &word, sizeof word);
    copy.owner = 0;
    return copy;
}

/* ---- atomics (GCC builtins; the orderings are the point, see _ring.pyx) ---- */
static inline uint64_t shm_load_acq64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t shm_load_rlx64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void shm_store_rel64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t shm_load_rlx32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void shm_store_rel32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void shm_store_rel8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void shm_add32(uint32_t *p, int32_t d) { __atomic_fetch_add(p, (uint32_t)d, __ATOMIC_SEQ_CST); }
static inline void shm_add64(uint64_t *p, uint64_t d) { __atomic_fetch_add(p, d, __ATOMIC_RELAXED); }
static inline int shm_cas64(uint64_t *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}
static inline void shm_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
/* Free a lock word: a store of 0 ordered before every later load, as a
 * release store then shm_fence, in one locked exchange (cheaper than a
 * fence on x86). */
static inline void shm_release_fenced64(uint64_t *p) { (void)__atomic_exchange_n(p, 0, __ATOMIC_SEQ_CST); }

static inline void shm_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ---- where we run (decides whether spinning can win) ---- */

/* How many CPUs this process may run on now: 1 means a spinning waiter
 * holds the only CPU its peer could use to make it ready. */
static inline int shm_cpus_allowed(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0)
        return 2;            /* unknown (more than CPU_SETSIZE CPUs): assume several */
    return CPU_COUNT(&set);
}

/* The CPU we run on now, plus one (0: not known). vDSO/rseq: no syscall. */
static inline uint32_t shm_cpu_now(void) {
    int c = sched_getcpu();
    return c < 0 ? 0u : (uint32_t)c + 1u;
}

static inline void shm_yield(void) { sched_yield(); }

/* Publish our CPU in a side's slot (shm_wait_t.prod_cpu / cons_cpu) after a
 * put or a take, so the other side's waiter can tell whether we share its
 * CPU. A few nanoseconds (rseq or vDSO, no syscall; the line was just read
 * for the waiter count); the shared line is written only when it changed. */
static inline void shm_publish_cpu(uint32_t *slot) {
    uint32_t cpu = shm_cpu_now();
    if (__atomic_load_n(slot, __ATOMIC_RELAXED) != cpu)
        __atomic_store_n(slot, cpu, __ATOMIC_RELAXED);
}

/* ---- readiness descriptors ----
 * After a commit (and the full fence that orders it before the waiter
 * counts): if no readiness byte is out, send one on `fd` (a pipe or a
 * socket of the reader's). One relaxed load when a byte is already out (the
 * unpolled steady state); the exchange makes concurrent producers send one
 * byte between them. MSG_DONTWAIT/MSG_NOSIGNAL: never blocks or raises
 * SIGPIPE; a full buffer is already readable, a gone reader needs nothing. */
#define SHM_READY_BYTE 0x52   /* 'R' */
#include <sys/socket.h>
static inline void shm_signal_ready(uint32_t *signalled, int fd, int is_socket) {
    if (__atomic_load_n(signalled, __ATOMIC_RELAXED) != 0) return;
    if (__atomic_exchange_n(signalled, 1u, __ATOMIC_SEQ_CST) != 0) return;
    static const char b = SHM_READY_BYTE;
    int saved = errno;
    ssize_t rc;
    do {
        rc = is_socket ? send(fd, &b, 1, MSG_DONTWAIT | MSG_NOSIGNAL) : write(fd, &b, 1);
    } while (rc < 0 && errno == EINTR);
    errno = saved;
}

static inline int shm_cas32(uint32_t *p, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* ---- clocks ---- */
static inline int64_t shm_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ---- semaphores ----
 * glibc aborts the process ("The futex facility returned an unexpected error
 * code") when a semaphore's flag word holds garbage, and a garbage count can
 * make a waiter wake for ever. Shared memory may hold garbage, so every
 * semaphore is checked against a freshly initialised one before use: apart
 * from the 64-bit count word (value and waiters), its bytes never change. */
#define SHM_SEM_MAX_VALUE (1 << 24)
static unsigned char shm_sem_template[sizeof(sem_t)];

static inline void shm_sem_template_init(void) {
    sem_t t;
    memset(&t, 0, sizeof t);
    sem_init(&t, 1, 0);
    memcpy(shm_sem_template, &t, sizeof t);
}

static inline int shm_sem_sane(sem_t *sem) {
#if defined(__GLIBC__) && (defined(__x86_64__) || defined(__aarch64__))
    if (memcmp((const char *)sem + 8, shm_sem_template + 8, sizeof(sem_t) - 8) != 0) return 0;
#endif
    int value = 0;
    if (sem_getvalue(sem, &value) != 0) return 0;
    return value >= 0 && value <= SHM_SEM_MAX_VALUE;
}

static inline void shm_sem_post(sem_t *sem) {
    if (shm_sem_sane(sem)) sem_post(sem);
}

/* Sleep on a semaphore until `deadline_ns` (CLOCK_MONOTONIC). Returns 0 when
 * woken, else errno (ETIMEDOUT, EINTR; EINVAL for a corrupt semaphore).
 * Call without the GIL. */
static inline int shm_sem_wait_until(sem_t *sem, int64_t deadline_ns) {
    struct timespec ts;
    if (!shm_sem_sane(sem)) return EINVAL;
    ts.tv_sec = (time_t)(deadline_ns / 1000000000LL);
    ts.tv_nsec = (long)(deadline_ns % 1000000000LL);
    if (sem_clockwait(sem, CLOCK_MONOTONIC, &ts) == 0) return 0;
    return errno;
}

/* Wake one sleeper unless enough wake-ups are already pending: a waiter that
 * died asleep leaves its count behind, and this keeps it from costing a
 * system call on every commit or from overflowing the semaphore. */
static inline void shm_wake(sem_t *sem, const uint32_t *waiters) {
    uint32_t w = __atomic_load_n(waiters, __ATOMIC_SEQ_CST);
    if (w == 0 || !shm_sem_sane(sem)) return;
    int value = 0;
    sem_getvalue(sem, &value);
    if ((uint32_t)value < w) sem_post(sem);
}

/* ---- liveness and identity ----
 * A pid alone does not name a process: pids are recycled, and a garbage word
 * in shared memory may happen to be a live pid. So owners (lock holders,
 * claimers, the last user of a side) are recorded as an identity: the pid in
 * the low 32 bits, a token of the process's start time (clock ticks since
 * boot, /proc/<pid>/stat field 22) in the high 32. A word whose pid is alive
 * but whose token differs names a recycled pid, or garbage: not the owner.
 * Without a readable /proc the token is 0 and the pid alone is checked. */
#define SHM_PID_MAX 4194304u    /* PID_MAX_LIMIT: larger "pids" are garbage, and
                                   kill() would read them as process groups */

/* Read /proc/<pid>/stat: returns 0 if the process is gone or a zombie (a
 * killed child its parent has not reaped yet must count as dead, or nobody
 * would recover what it held until the parent called wait()), 1 if it lives.
 * *token gets its start-time token, or 0 if unknown. */
static inline int shm_proc_stat(uint32_t pid, uint32_t *token) {
    *token = 0;
    if (pid == 0 || pid > SHM_PID_MAX) return 0;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH) return 0;
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? 0 : 1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');   /* the command name may itself hold ')' */
    if (p == NULL || p[1] != ' ') return 1;
    if (p[2] == 'Z' || p[2] == 'X' || p[2] == 'x') return 0;
    /* p[2] is field 3 (state); skip to field 22 (starttime) */
    char *q = p + 2;
    for (int field = 3; field < 22; field++) {
        q = strchr(q, ' ');
        if (q == NULL) return 1;
        q++;
    }
    unsigned long long ticks = strtoull(q, NULL, 10);
    *token = (uint32_t)(ticks % 0xFFFFFFFFull) + 1;    /* never 0 */
    return 1;
}

static inline int shm_pid_alive(uint32_t pid) {
    uint32_t token;
    return shm_proc_stat(pid, &token);
}

/* This process's identity, computed on first use (shm_self_reset() after a
 * fork): one read of /proc/self/stat per process. */
static uint64_t shm_self = 0;

static inline uint64_t shm_self_ident(void) {
    uint64_t id = __atomic_load_n(&shm_self, __ATOMIC_RELAXED);
    if (__builtin_expect(id == 0, 0)) {
        uint32_t pid = (uint32_t)getpid(), token = 0;
        shm_proc_stat(pid, &token);
        id = ((uint64_t)token << 32) | pid;
        __atomic_store_n(&shm_self, id, __ATOMIC_RELAXED);
    }
    return id;
}

static inline void shm_self_reset(void) { __atomic_store_n(&shm_self, 0, __ATOMIC_RELAXED); }

/* 1 if `ident` names a live process that is the one which wrote it. */
static inline int shm_ident_alive(uint64_t ident) {
    uint32_t token;
    if (!shm_proc_stat((uint32_t)ident, &token)) return 0;
    return token == 0 || token == (uint32_t)(ident >> 32);
}

#endif /* SHMIPC_SHM_H */
