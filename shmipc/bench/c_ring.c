/* The C floor of `shmipc bench`: a single-producer single-consumer byte ring
 * in MAP_SHARED|MAP_ANONYMOUS memory made before fork, with the same design
 * as shmipc's ring (head and tail on separate cache lines, each side caching
 * the other's index, a bounded spin -- yielding, not pausing, when the peer
 * last ran on the waiter's CPU -- before sleeping on a process-shared sem_t
 * that the other side posts only when someone sleeps). No Python, no
 * encoding; the receiver verifies as the Python receivers do (VERIFY): what
 * the machine gives this design.
 *
 * usage: c_ring SIZE SECONDS MODE [VERIFY [CPU_SENDER CPU_RECEIVER]]
 *   SIZE     message size in bytes (>= 16)
 *   MODE     "copy": the receiver copies each message out (as Ring.get)
 *            "view": the receiver checks it in place (as get_view)
 *   VERIFY   "full" (default): every byte of every message is compared with
 *            the one expected, as the Python receivers of `shmipc bench` do
 *            (shmipc/bench/workloads.py); "stamps": every message's stamps,
 *            and every byte of one message in FULL_EVERY (their verify="stamps")
 * prints one JSON line: {"messages": N, "seconds": S}
 *
 * A floor is only a fair one if it does the work the measured rows do: the
 * Python receivers compare what they get with what was sent, so this one
 * does too (a receiver that only read two stamps would make the C ring a
 * floor for a different job, and the ratios to it unfairly low).
 *
 * Invariants: head and tail only grow; head - tail <= CAPACITY; a record is
 * [u64 length][payload padded to 8] and never straddles the end (a length of
 * ~0 marks "skip to the start"); message i is pool[i % count] with i in its
 * first and last 8 bytes; the receiver checks the stamps and (see VERIFY)
 * the body, so nothing is dropped, reordered or corrupted unseen.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SPINS 4000
#define FULL_EVERY 16     /* as workloads.FULL_EVERY */
#define WRAP (~(uint64_t)0)

struct shared {
    _Alignas(64) volatile uint64_t head;          /* bytes ever written */
    _Alignas(64) volatile uint64_t tail;          /* bytes ever consumed */
    _Alignas(64) volatile int consumer_waiting;
    volatile int producer_waiting;
    volatile unsigned sender_cpu;                 /* CPU + 1 each side last ran on (0: unknown), */
    volatile unsigned receiver_cpu;               /* as shmipc's wait.prod_cpu / cons_cpu */
    sem_t data;                                   /* posted when the consumer sleeps and data came */
    sem_t space;                                  /* posted when the producer sleeps and room came */
    _Alignas(64) volatile double t_end;           /* the receiver's clock at the end marker */
    volatile uint64_t received;
    volatile int error;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* As shmipc's ring (_ring.pyx _wait, issue 11): each side publishes the CPU
 * it runs on after every message (written only when it changed), and a
 * waiter whose peer last ran on its own CPU spins with sched_yield() instead
 * of PAUSE: a busy spin there would hold the very CPU the peer needs. Without
 * this the floor is of another design: on a loaded 2-CPU machine, where the
 * scheduler often puts both processes on one CPU, its fixed PAUSE spin made
 * it run 1 MiB messages at a fraction of shmipc's speed (and 64 B ones, by
 * filling the whole ring per time slice, at several times a spinning floor). */
static inline unsigned cpu_now(void) {
    int c = sched_getcpu();
    return c < 0 ? 0u : (unsigned)c + 1u;
}

static inline void publish_cpu(volatile unsigned *slot) {
    unsigned c = cpu_now();
    if (*slot != c) *slot = c;
}

/* As shmipc's ring (_ring.pyx YIELD_SLOW_NS): a yield hands the CPU to any
 * runnable task, and with a third CPU-bound task on our CPU that task then
 * runs until the next tick. A yield that took longer than YIELD_SLOW_NS while
 * the other side moved fewer than YIELD_SLOW_MSGS messages is slow; a second
 * within YIELD_SLOW_WINDOW_NS of the first (plus the current back-off) makes
 * this process's co-located waits sleep at once for a back-off that starts at
 * YIELD_BACKOFF_MIN_NS and doubles up to YIELD_BACKOFF_MAX_NS. */
#define YIELD_SLOW_NS 500000LL
#define YIELD_SLOW_MSGS 16
#define YIELD_SLOW_WINDOW_NS 100000000LL
#define YIELD_BACKOFF_MIN_NS 100000000LL
#define YIELD_BACKOFF_MAX_NS 1000000000LL
static int64_t last_slow_yield = INT64_MIN / 2, yield_backoff = 0, yield_off_until = 0;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void slow_yield(int64_t t) {
    int recent = t - last_slow_yield <= YIELD_SLOW_WINDOW_NS + yield_backoff;
    last_slow_yield = t;
    if (!recent) { yield_backoff = 0; return; }
    yield_backoff = yield_backoff * 2 < YIELD_BACKOFF_MIN_NS ? YIELD_BACKOFF_MIN_NS : yield_backoff * 2;
    if (yield_backoff > YIELD_BACKOFF_MAX_NS) yield_backoff = YIELD_BACKOFF_MAX_NS;
    yield_off_until = t + yield_backoff;
}

/* Spins a co-located waiter may still make (0: sleep at once, yields are
 * slow for now), else SPINS. */
static inline int spin_budget(int shared) {
    return shared && now_ns() < yield_off_until ? 0 : SPINS;
}

/* one step of a waiter's spin: yield if the peer shares our CPU, else PAUSE.
 * `moved` is the other side's position (bytes; a message is `record` of
 * them). Returns 0 if the spin must end: the yield was slow. */
static inline int spin_step(int shared, volatile uint64_t *moved, uint64_t record) {
    if (!shared) {
        relax();
        return 1;
    }
    int64_t t = now_ns();
    uint64_t before = __atomic_load_n(moved, __ATOMIC_RELAXED);
    sched_yield();
    int64_t after = now_ns();
    if (after - t > YIELD_SLOW_NS
            && __atomic_load_n(moved, __ATOMIC_RELAXED) - before < YIELD_SLOW_MSGS * record) {
        slow_yield(after);
        return 0;
    }
    return 1;
}

static void pin(int cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static void sleep_on(sem_t *sem) {
    while (sem_wait(sem) != 0 && errno == EINTR) {
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s SIZE SECONDS copy|view [full|stamps [CPU_SENDER CPU_RECEIVER]]\n", argv[0]);
        return 2;
    }
    uint64_t size = strtoull(argv[1], NULL, 10);
    double seconds = atof(argv[2]);
    int view = strcmp(argv[3], "view") == 0;
    int full = argc <= 4 || strcmp(argv[4], "stamps") != 0;
    int cpu_a = argc > 6 ? atoi(argv[5]) : -1, cpu_b = argc > 6 ? atoi(argv[6]) : -1;
    if (size < 16) size = 16;
    uint64_t record = 8 + ((size + 7) & ~(uint64_t)7);
    uint64_t capacity = 1 << 20;
    while (capacity < 2 * (size + 4096)) capacity <<= 1;   /* as the bench's rings */

    struct shared *sh = mmap(NULL, sizeof *sh + capacity, PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) { perror("mmap"); return 1; }
    unsigned char *ring = (unsigned char *)(sh + 1);
    memset(sh, 0, sizeof *sh);
    sem_init(&sh->data, 1, 0);
    sem_init(&sh->space, 1, 0);
    memset(ring, 0, capacity);                           /* no page faults inside the timing */

    /* the sender cycles through as many distinct messages as the Python
     * transports do (shmipc/bench/workloads.py message_pool: up to 16 MiB),
     * so neither side copies from a buffer that always sits in the cache */
    uint64_t count = 16;
    while (count < 1024 && count * 2 * size <= (16u << 20)) count *= 2;
    unsigned char *pool = malloc(count * size), *out = malloc(size);
    for (uint64_t i = 0; i < count * size; i++) pool[i] = (unsigned char)(i * 131 + 7);

    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {                                      /* the receiver */
        pin(cpu_b);
        uint64_t tail = 0, head = 0, n = 0;
        for (;;) {
            if (head == tail) {
                int spins = 0;
                unsigned me = cpu_now();
                publish_cpu(&sh->receiver_cpu);
                int shared = me != 0 && sh->sender_cpu == me;
                int budget = spin_budget(shared);
                while ((head = __atomic_load_n(&sh->head, __ATOMIC_ACQUIRE)) == tail) {
                    if (++spins < budget) {
                        if (!spin_step(shared, &sh->head, record)) budget = 0;
                        continue;
                    }
                    __atomic_store_n(&sh->consumer_waiting, 1, __ATOMIC_SEQ_CST);
                    if ((head = __atomic_load_n(&sh->head, __ATOMIC_SEQ_CST)) != tail) break;
                    sleep_on(&sh->data);
                    spins = 0;
                }
            }
            uint64_t at = tail & (capacity - 1);
            uint64_t len;
            memcpy(&len, ring + at, 8);
            if (len == WRAP) { tail += capacity - at; goto advance; }
            if (len == 0) break;                          /* the end marker */
            unsigned char *p = ring + at + 8;
            uint64_t first, last;
            if (!view) {
                memcpy(out, p, len);
                p = out;
            }
            memcpy(&first, p, 8);
            memcpy(&last, p + len - 8, 8);
            if (len != size || first != n || last != n) { sh->error = 1; break; }
            /* the body between the stamps: this process's copy of the pool
             * (the sender rewrites only the stamps of its own copy) */
            if ((full || n % FULL_EVERY == 0)
                    && memcmp(p + 8, pool + (n % count) * size + 8, size - 16) != 0) {
                sh->error = 2;
                break;
            }
            n++;
            tail += record;
        advance:
            __atomic_store_n(&sh->tail, tail, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&sh->producer_waiting, __ATOMIC_SEQ_CST)) {
                __atomic_store_n(&sh->producer_waiting, 0, __ATOMIC_SEQ_CST);
                sem_post(&sh->space);
            }
            publish_cpu(&sh->receiver_cpu);
        }
        sh->t_end = now();
        sh->received = n;
        _exit(0);
    }
    pin(cpu_a);                                          /* the sender */
    uint64_t head = 0, tail = 0, n = 0;
    double t0 = now(), deadline = t0 + seconds;
    for (int done = 0; !done;) {
        uint64_t need = record;
        uint64_t at = head & (capacity - 1);
        int wrap = at + record > capacity;
        if (wrap) need = capacity - at + record;
        if (head + need - tail > capacity) {
            int spins = 0;
            unsigned me = cpu_now();
            publish_cpu(&sh->sender_cpu);
            int shared = me != 0 && sh->receiver_cpu == me;
            int budget = spin_budget(shared);
            while (head + need - (tail = __atomic_load_n(&sh->tail, __ATOMIC_ACQUIRE)) > capacity) {
                if (++spins < budget) {
                    if (!spin_step(shared, &sh->tail, record)) budget = 0;
                    continue;
                }
                __atomic_store_n(&sh->producer_waiting, 1, __ATOMIC_SEQ_CST);
                if (head + need - (tail = __atomic_load_n(&sh->tail, __ATOMIC_SEQ_CST)) <= capacity) break;
                sleep_on(&sh->space);
                spins = 0;
            }
        }
        if (wrap) {
            uint64_t mark = WRAP;
            memcpy(ring + at, &mark, 8);
            head += capacity - at;
            at = 0;
        }
        uint64_t len = (n & 63) == 0 && now() >= deadline ? 0 : size;
        memcpy(ring + at, &len, 8);
        if (len) {
            unsigned char *msg = pool + (n % count) * size;
            memcpy(msg, &n, 8);
            memcpy(msg + size - 8, &n, 8);
            memcpy(ring + at + 8, msg, size);
            n++;
        } else {
            done = 1;
        }
        head += record;
        __atomic_store_n(&sh->head, head, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&sh->consumer_waiting, __ATOMIC_SEQ_CST)) {
            __atomic_store_n(&sh->consumer_waiting, 0, __ATOMIC_SEQ_CST);
            sem_post(&sh->data);
        }
        publish_cpu(&sh->sender_cpu);
    }
    int status;
    waitpid(pid, &status, 0);
    if (sh->error || sh->received != n || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "c_ring: the receiver got %llu of %llu messages (error %d)\n",
                (unsigned long long)sh->received, (unsigned long long)n, sh->error);
        return 1;
    }
    printf("{\"messages\": %llu, \"seconds\": %.9f}\n", (unsigned long long)n, sh->t_end - t0);
    return 0;
}
