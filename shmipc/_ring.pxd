cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from shmipc._posix cimport sem_t
from shmipc._shm cimport shm_ring_t, shm_rec_t, shm_side_t


cdef struct enc_t:
    uint8_t tag             # message type (TAG_* in _codec.pxi)
    const char *ptr         # single-segment payload (borrowed), or NULL when segmented
    Py_ssize_t size         # payload bytes
    char small[8]           # payload of int/float messages


cdef struct take_t:
    Py_ssize_t count        # messages taken (0: the deadline passed first)
    uint8_t tag             # the (last) message's tag
    bint claimed            # a zero-copy view holds the record at pos:
    uint64_t pos            #   its position,
    shm_rec_t *rec          #   header
    uint32_t size           #   and payload size


@cython.final       # no subclasses: its C methods are called directly (and inlined)
cdef class Ring:
    cdef shm_ring_t *hdr            # the ring header in shared memory
    cdef char *data                 # first data byte
    cdef uint64_t capacity          # data bytes, a power of two (validated copy: never re-read)
    cdef uint64_t mask              # capacity - 1
    cdef uint64_t max_payload       # largest payload one record may carry
    cdef uint32_t record_size       # fixed-record rings: item bytes; 0 = variable
    cdef uint32_t maxsize           # most messages in the ring; 0 = no limit
    cdef bint many_producers        # producers serialise on the producer lock
    cdef bint many_consumers        # consumers serialise on the consumer lock
    cdef uint64_t cached_tail       # producer's last view of the tail (a lower bound)
    cdef uint64_t cached_head       # consumer's last view of the head (a lower bound)
    cdef int64_t spin_ns            # adaptive spin budget before sleeping
    cdef int64_t recovered_ns       # when a wait that ran out last looked for dead holders (_recover_at_deadline)
    cdef Py_buffer view             # the exported mapping; valid while has_view
    cdef bint has_view
    cdef bint closed                # closed in this process
    cdef int active                 # calls in progress in this process
    cdef object buffer              # the object the ring lives in (the arena's mmap)
    cdef object data_view           # None, or a read-only memoryview of the data region (get_view's views are slices of it)
    cdef Py_ssize_t region_len      # bytes from the ring's start to the end of the buffer
    cdef public object arena        # the Arena holding the ring, or None
    cdef public object name         # the region name in the arena
    cdef public object dtype        # fixed-record rings: the numpy dtype
    cdef bint allow_pickle          # decode pickled messages (else: native types only)
    cdef object pending             # None, or a deque of (tag, payload or error) taken but
                                    # not yet delivered: the rest of a batch whose decoding failed
    cdef int notify_fd              # readiness: this process's fd to signal after a commit
                                    # (a pipe's write end or a socket), -1: none
    cdef bint notify_socket         # notify_fd is a socket (send), else a pipe (write)
    cdef bint keep_dead_claims      # records claimed by dead consumers wait for _take_back
                                    # (process-local; see _keep_dead_claims)
    cdef unsigned long hold_thread  # the thread of this process that holds the producer
                                    # lock across puts (_hold_producers), 0: none
    cdef object hold_key            # this ring's key in g_holds (see _hold_key), or None
    cdef object __weakref__

    cdef int _map(self, object buffer, Py_ssize_t offset, uint64_t need) except -1
    cdef int _validate_header(self, Py_ssize_t size) except -1
    cdef int _validate_dtype(self, object dtype) except -1
    cdef int _setup(self, object dtype) except -1
    cdef void _release(self) noexcept
    cdef int _enter(self) except -1
    cdef int _check_open(self) except -1
    cdef void _leave(self) noexcept
    cdef shm_rec_t *_rec_at(self, uint64_t pos) noexcept nogil
    cdef int _corrupt(self, str what) except -1
    cdef uint64_t _rec_length(self, uint64_t pos, uint64_t head) noexcept nogil
    cdef uint64_t _check_record(self, uint64_t pos, uint64_t head) except 0
    cdef int _positions(self, uint64_t *head, uint64_t *cursor, uint64_t *tail) except -1
    cdef bint _ready(self, int kind, uint64_t need) noexcept nogil
    cdef bint _wait(self, int kind, uint64_t need, int64_t deadline) except -1
    cdef bint _sleep(self, int kind, uint64_t need, int64_t deadline, sem_t *sem, uint32_t *waiters) except -1
    cdef bint _await_data(self, int64_t deadline) except -1
    cdef bint _recover_at_deadline(self, int kind, uint64_t need) except -1
    cdef bint _look_around(self, int kind) except -1
    cdef int _reclaim_dead_claims(self) except -1
    cdef int _recover_dead(self) except -1
    cdef bint _lock(self, int kind, int64_t deadline) except -1
    cdef void _locked(self, shm_side_t *side) noexcept
    cdef bint _holding(self) noexcept
    cdef object _hold_key(self)
    cdef bint _held_elsewhere(self) except -1
    cdef void _end_hold(self) noexcept
    cdef int _recover_lock(self, int kind) except -1
    cdef void _unlock(self, int kind) noexcept
    cdef uint64_t _reserve(self, uint64_t head, uint64_t length, uint64_t pending) except? 1
    cdef int _write_record(self, uint64_t pos, enc_t *e, object segs) except -1
    cdef inline void _commit(self, uint64_t head, uint64_t nmsgs, uint64_t nbytes) noexcept
    cdef inline void _signal_data(self) noexcept
    cdef inline void _publish(self, uint64_t head, uint64_t nmsgs, uint64_t nbytes) noexcept
    cdef Py_ssize_t _produce(self, enc_t *encs, Py_ssize_t n, object keep, bint batch,
                             int64_t deadline, bint under_hold=*) except -1
    cdef int _check_size(self, enc_t *e) except -1
    cdef bint _put_now(self, enc_t *e) noexcept
    cdef bint _put_now_shared(self, enc_t *e) noexcept
    cdef Py_ssize_t _put_many_now(self, enc_t *encs, Py_ssize_t n) noexcept
    cdef object _get_now(self, bint *done)
    cdef bint _empty_now(self) noexcept
    cdef list _get_many_now(self, Py_ssize_t max_items, Py_ssize_t max_bytes, list tags)
    cdef void _release_taken(self, uint64_t start, uint64_t end, Py_ssize_t nmsgs, uint64_t nbytes) noexcept
    cdef int _debug_check(self) except -1
    cdef int _shut(self) except -1
    cdef object _encode(self, object obj, enc_t *e)
    cdef shm_rec_t *_take(self, int64_t deadline, uint64_t *pos_out, uint64_t *len_out) except? NULL
    cdef object _consume(self, int64_t deadline, Py_ssize_t max_items, Py_ssize_t max_bytes,
                         int claim, list out, list tags, take_t *t)
    cdef void _consumed(self, uint64_t pos, uint64_t length, shm_rec_t *r, uint32_t size, bint claim) noexcept
    cdef bint _move_tail(self) noexcept
    cdef int _advance_tail(self) except -1
    cdef bint _payload(self, shm_rec_t *r, uint64_t length, uint8_t *tag, uint32_t *size) noexcept
    cdef int _bad_payload(self, uint8_t tag, uint32_t size, uint64_t length) except -1
    cdef object _copy_out(self, const char *p, uint8_t tag, uint32_t size, bint *raw)
    cdef object _decode(self, uint8_t tag, object buf)
    cdef list _from_pending(self, Py_ssize_t max_items)
    cdef int _keep_undelivered(self, list items) except -1
    cdef int _check_room_accounts(self) except -1
    cdef inline int _check_positions(self, uint64_t tail, uint64_t cursor, uint64_t head) except -1
    cdef inline void _consistent_point(self) noexcept
    cdef object _decode_or_keep(self, uint8_t tag, object buf)
    cdef int _release_claim(self, uint64_t pos, int64_t deadline) except -1
