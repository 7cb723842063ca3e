# C declarations from system headers used by the ring (the ring's own layout
# and helpers, from _shm.h, are in _shm.pxd).

cdef extern from "<semaphore.h>" nogil:
    ctypedef struct sem_t:
        pass
    int sem_init(sem_t *sem, int pshared, unsigned int value)

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EINTR
        ETIMEDOUT

cdef extern from "<unistd.h>" nogil:
    int getpid()
