"""The file-system side of arenas: regular files, devices and POSIX
shared-memory segments -- how each is opened or created, the trust checks it
needs, and the reaper that removes a named segment whose creator died.

Trust (see also the README's "Trust model"):
  * ``attach`` and ``from_file`` refuse a segment or file owned by another
    user (PermissionError) unless ``allow_other_users=True``; an arena opened
    that way decodes native types only (``allow_pickle=False``) unless the
    caller also passes ``allow_pickle=True``, since unpickling runs code
    chosen by whoever wrote the message.
  * ``from_file`` never writes to a file that is not already an arena (no
    growth, no formatting) unless it creates the file itself or is given
    ``overwrite=True``; it does not follow a symbolic link in the last path
    component unless ``follow_symlinks=True``; FIFOs, sockets and
    directories are refused.
  * A new file arena is made whole before it has its name: created unnamed
    (O_TMPFILE, or under a temporary name), sized and formatted, then linked
    to its path with link(2), which fails if the path exists. So a process
    opening the path sees no file or a complete arena, never a half-made
    one, and when two processes create the same path at once the loser
    opens the winner's arena (F11).
  * Named segments and files cannot be sealed. Their size is checked against
    the header when opened and again by every call that reads the region
    table (``CorruptArena``, "truncated"), but a process that may write the
    segment (the same user, or root) and truncates it while another process
    is touching the memory still kills that process with SIGBUS: what remains
    of the threat is within the trust boundary (same user).

The functions here fill in an Arena made with ``cls.__new__``, through its own
methods (``_init_state``, ``_map``, ``_format``, ``_validate``, ``_peek_header``,
``close``): arena.py keeps the format and imports this module, never the other
way round.
"""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
import uuid
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shmipc.arena import Arena

from shmipc.errors import CorruptArena

SHM_DIR = "/dev/shm"           # where glibc's shm_open keeps POSIX shared memory on Linux
NAME_MAX = 255                 # bytes in one file name
CREATE_ATTEMPTS = 10           # creations lost to another creator whose file then vanished again


def shm_name(name: Any) -> str:
    """'/name' for a valid segment name (a leading '/' optional), or ValueError
    naming it: one file name under /dev/shm, no NUL, no other '/', not '.' or
    '..', valid UTF-8, at most 255 bytes."""
    if not isinstance(name, str):
        raise ValueError(f"a named arena needs a str name, got {type(name).__name__} {name!r}")
    bare = name[1:] if name.startswith("/") else name
    try:
        size = len(bare.encode())
    except UnicodeEncodeError:
        raise ValueError(f"invalid shared-memory name {name!r}: not valid UTF-8") from None
    if not bare or "\0" in bare or "/" in bare or bare in (".", "..") or size > NAME_MAX:
        raise ValueError(f"invalid shared-memory name {name!r}: one non-empty file name of at most "
                         f"{NAME_MAX} bytes (it has {size}), no NUL, no '/' inside, not '.' or '..'")
    return "/" + bare


def uid_check(st: os.stat_result, what: str, allow_other_users: bool) -> None:
    """PermissionError if `st` belongs to another user and the caller did not opt in."""
    me = os.geteuid()
    if st.st_uid != me and not allow_other_users:
        raise PermissionError(
            errno.EACCES, f"{what} is owned by uid {st.st_uid}, not by this process's uid {me}: "
            "its messages could run that user's code when unpickled; pass allow_other_users=True "
            "to open it anyway (its rings then decode native types only unless allow_pickle=True)")


def open_nofollow(path: Any, flags: int, follow: bool, mode: int = 0o600) -> int:
    """os.open with O_NOFOLLOW unless `follow`; a refused link raises an
    OSError that says so (plain ELOOP reads as 'too many levels')."""
    try:
        return os.open(path, flags | (0 if follow else os.O_NOFOLLOW), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise OSError(errno.ELOOP, f"{os.fsdecode(path)!r} is a symbolic link: not followed "
                          "(pass follow_symlinks=True to follow it)") from None
        raise


def file_type(st: os.stat_result) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISLNK, "symbolic link"), (stat.S_ISREG, "regular file")):
        if test(st.st_mode):
            return name
    return "special file"


def pickle_default(st: os.stat_result, allow_pickle: bool | None) -> bool:
    if allow_pickle is None:
        return st.st_uid == os.geteuid()
    return bool(allow_pickle)


def names_file(path: str, ident: tuple[int, int], follow: bool) -> bool:
    """Whether `path` still names the file `ident` (st_dev, st_ino)."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ident


def unlink_if(path: str, ident: tuple[int, int]) -> bool:
    """Unlink `path` if it is still the file `ident` (st_dev, st_ino) names.
    (A check then an unlink: a file swapped in between those two system
    calls would be removed; nothing narrower exists for names.)"""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if (st.st_dev, st.st_ino) != ident:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# ------------------------------------------------------------ files
def open_file(self: "Arena", path: Any, size: int | None, private: bool, raw: bool, overwrite: bool,
              follow_symlinks: bool, allow_other_users: bool, allow_pickle: bool | None,
              expect: tuple[int, int] | None = None) -> None:
    """Arena.from_file's work (see its docstring), on a bare `self`. With
    `expect` (st_dev, st_ino), only that file will do: a missing path is not
    created, another file is refused (FileNotFoundError both)."""
    path = os.fspath(path)
    if not path:
        raise FileNotFoundError(errno.ENOENT, "an arena file needs a path; got an empty one")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"size must be a positive int, got {size!r}")
    for _ in range(CREATE_ATTEMPTS):
        self._init_state("file", None, 0)
        if _open_file_once(self, path, size, private, raw, overwrite, follow_symlinks,
                           allow_other_users, allow_pickle, expect):
            return
    raise FileExistsError(errno.EEXIST, f"{os.fsdecode(path)!r} kept appearing and vanishing while it was "
                          f"created ({CREATE_ATTEMPTS} attempts): another process creates and removes it")


def _open_file_once(self: "Arena", path: Any, size: int | None, private: bool, raw: bool, overwrite: bool,
                    follow_symlinks: bool, allow_other_users: bool, allow_pickle: bool | None,
                    expect: tuple[int, int] | None) -> bool:
    """Open or create `path` once. False (and `self` closed) when another
    process published the path while this call made its own: open theirs."""
    shown = os.fsdecode(path)
    unnamed: _Unnamed | None = None     # a new file, not linked to `path` until it is complete
    # O_NONBLOCK: opening a FIFO must not wait for a writer (refused below)
    flags = os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | (os.O_RDONLY if private else os.O_RDWR)
    try:
        self._fd = open_nofollow(path, flags, follow_symlinks)
    except FileNotFoundError:
        if private:
            raise
        if expect is not None:
            raise FileNotFoundError(errno.ENOENT, f"the arena's file {shown!r} was removed after the "
                                    "arena was sent") from None
        if size is None:
            raise ValueError(f"{shown!r} does not exist: give a size to create it") from None
        unnamed = _Unnamed(path)
        self._fd = unnamed.fd
    created = unnamed is not None
    try:
        fd = self._fd
        os.set_blocking(fd, True)
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)
        if not regular and not stat.S_ISCHR(st.st_mode):
            raise ValueError(f"{shown!r} is a {file_type(st)}, not a regular file or a device")
        if expect is not None and (st.st_dev, st.st_ino) != expect:
            raise FileNotFoundError(errno.ENOENT, f"{shown!r} is no longer the arena's file: it was "
                                    "replaced after the arena was sent")
        if regular:
            uid_check(st, f"file {shown!r}", allow_other_users)
        if regular and not created and not raw and not overwrite:
            header_size = self._peek_header(fd, st.st_size, f"{shown!r}")
            if size is not None and size != header_size:
                raise ValueError(f"{shown!r} is an arena of {header_size} bytes, not {size}")
            size = header_size
        if size is None:
            if not regular or st.st_size == 0:
                raise ValueError(f"{shown!r} is empty or not a regular file: give a size")
            size = st.st_size
        if not raw:
            self._check_size(size)
        if regular and size > st.st_size:
            if private:
                raise ValueError(f"size {size} is beyond the end of {shown!r} ({st.st_size} bytes); "
                                 "a private mapping cannot grow the file")
            os.ftruncate(fd, size)      # ours (created), asked for (overwrite), or raw plain memory
        self.size = size
        self.path = shown
        self._writable = not private
        self._follow_symlinks = follow_symlinks
        self._allow_other_users = allow_other_users
        self._sized_backing = regular
        self._file_ident = (st.st_dev, st.st_ino)
        self.allow_pickle = pickle_default(st, allow_pickle)
        self._map_file(private)
        if raw:
            self.kind = "raw"
        elif created or overwrite:
            self._format()
        elif regular:
            self._validate()
        elif self._blank():
            self._format()              # a device's fresh memory (/dev/zero, hugetlbfs)
        else:
            self._validate()
        if unnamed is not None and not unnamed.publish():
            self.close()                # another process made `path` first: open theirs
            return False
    except CorruptArena as exc:
        self.close()
        raise CorruptArena(f"{exc} (pass raw=True to map it as plain memory, or overwrite=True "
                           "to format it as a new arena)") from None
    except BaseException:
        self.close()
        raise
    finally:
        if unnamed is not None:
            unnamed.discard()
    return True


class _Unnamed:
    """A new empty file (mode 0600) in `path`'s directory that does not have
    `path` as its name yet. An O_TMPFILE file has no name at all (nothing is
    left behind if we die); where the file system cannot make one, it has a
    temporary name next to `path` (random, O_EXCL). Everything is done
    relative to the directory's fd, opened once."""

    def __init__(self, path: Any) -> None:
        path = os.fsdecode(path)
        self.base = os.path.basename(path)
        self.tmp: str | None = None
        self.fd = -1
        self.dirfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                self.fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=self.dirfd)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
            while self.fd < 0:
                tmp = f".{self.base}.{uuid.uuid4().hex[:12]}.shmipc-new"
                try:
                    self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                                      0o600, dir_fd=self.dirfd)
                    self.tmp = tmp
                except FileExistsError:
                    continue
        except BaseException:
            os.close(self.dirfd)
            raise

    def publish(self) -> bool:
        """Link the (complete) file to its path: link(2) never replaces an
        existing file. False if the path exists: another process was first."""
        try:
            if self.tmp is None:
                os.link(f"/proc/self/fd/{self.fd}", self.base, dst_dir_fd=self.dirfd, follow_symlinks=True)
            else:
                os.link(self.tmp, self.base, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd,
                        follow_symlinks=False)
            return True
        except FileExistsError:
            return False

    def discard(self) -> None:
        """Drop the temporary name (if any) and the directory fd; the file's
        own fd belongs to the arena. Idempotent."""
        if self.tmp is not None:
            try:
                os.unlink(self.tmp, dir_fd=self.dirfd)
            except FileNotFoundError:
                pass
            self.tmp = None
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1


# ------------------------------------------------------------ named segments
def create_named(self: "Arena", name: str, size: int, unlink_on_close: bool) -> None:
    """Arena.named's work (see its docstring), on a bare `self`."""
    full = shm_name(name)
    self._init_state("named", full, size)
    path = SHM_DIR + full
    try:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"a shared-memory segment named {full!r} already exists") from None
    st = os.fstat(self._fd)
    self._ident = (st.st_dev, st.st_ino)
    self._sized_backing = True
    self._unlink_on_close = True       # until close: a failure below removes what we made
    try:
        if unlink_on_close:
            self._reaper = Reaper(full, self._ident)
        os.ftruncate(self._fd, size)
        self._map_file(False)
        self._format()
    except BaseException:
        self.close()
        raise
    self._unlink_on_close = unlink_on_close


def attach_named(self: "Arena", name: str, allow_other_users: bool, allow_pickle: bool | None) -> None:
    """Arena.attach's work (see its docstring), on a bare `self`."""
    full = shm_name(name)
    self._init_state("named", full, 0)
    self._owner_pid = 0                      # attached: never unlinks
    try:
        self._fd = open_nofollow(SHM_DIR + full, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK, False)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no shared-memory segment named {full!r}") from None
    except PermissionError as exc:
        raise PermissionError(errno.EACCES, f"cannot open shared-memory segment {full!r}: {exc.strerror}") from None
    try:
        os.set_blocking(self._fd, True)
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptArena(f"{full!r} is a {file_type(st)}, not a shared-memory segment")
        uid_check(st, f"shared-memory segment {full!r}", allow_other_users)
        self.size = self._peek_header(self._fd, st.st_size, f"segment {full!r}")
        self._sized_backing = True
        self._allow_other_users = allow_other_users
        self.allow_pickle = pickle_default(st, allow_pickle)
        self._map_file(False)
        self._validate()
    except BaseException:
        self.close()
        raise


# The reaper: `read` blocks until the owner writes "keep" (it removed or
# handed over the name itself) or dies (EOF: its pipe end closed, however it
# died). On EOF it removes the name only if the name is still the segment it
# was made for (device and inode), never a later segment of the same name.
_REAPER_SCRIPT = ('read cmd; [ "$cmd" = keep ] && exit 0; '
                  'id=$(stat -c %d:%i -- "$1" 2>/dev/null) || exit 0; '
                  '[ "$id" = "$2" ] && rm -f -- "$1"; exit 0')


class Reaper:
    """A helper process that unlinks a named segment once its creator is
    gone, however it goes (SIGKILL included), plus a thread in the creator
    that starts a new helper if the current one dies: a helper's death must
    not leave the segment behind when the creator dies later.

    Invariants: `proc` is the live helper (or one being replaced); only the
    creating process (`pid`) writes to or waits for it; `_stopping` is set,
    under `_guard`, before the last helper is dismissed, and no helper is
    started after it is set.
    """

    def __init__(self, name: str, ident: tuple[int, int]) -> None:
        self.path = SHM_DIR + name
        self.ident = f"{ident[0]}:{ident[1]}"
        self.pid = os.getpid()
        self.restarts = 0
        self._guard = threading.Lock()
        self._stopping = False
        self.proc = self._spawn()
        _REAPERS.add(self)
        self._watcher = threading.Thread(target=_watch_reaper, args=(weakref.ref(self),),
                                         name=f"shmipc-reaper-watch {name}", daemon=True)
        self._watcher.start()

    def _spawn(self) -> subprocess.Popen:
        # its own session, so a signal to our process group does not reach
        # it. Not while a pool forks its zygote in another thread: Popen
        # waits until every copy of its error pipe is closed, and a zygote
        # forked meanwhile would hold one for its whole life (the hang
        # ctypes.util.find_library caused, see shmipc._proc.libc)
        from shmipc._fork_safety import _fork_lock

        with _fork_lock:
            return subprocess.Popen(
                ["/bin/sh", "-c", _REAPER_SCRIPT, "shmipc-reaper", self.path, self.ident],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                close_fds=True, start_new_session=True)

    def respawn(self, dead: subprocess.Popen) -> subprocess.Popen | None:
        """Replace the helper `dead` (it exited without being dismissed)."""
        with self._guard:
            if self._stopping or self.proc is not dead or os.getpid() != self.pid:
                return None
            if dead.stdin is not None:
                try:
                    dead.stdin.close()
                except OSError:
                    pass
            self.proc = self._spawn()
            self.restarts += 1
            return self.proc

    def stop(self, keep: bool = True) -> None:
        """Dismiss the helper: with `keep` it exits without touching the name
        (the creator removed or handed over the name itself)."""
        if os.getpid() != self.pid:
            # a forked child's copy: its pipe end was replaced at fork, and
            # _guard may have been copied locked by the watcher thread
            self._stopping = True
            return
        with self._guard:
            if self._stopping:
                return
            self._stopping = True
            proc = self.proc
        _REAPERS.discard(self)
        if proc.stdin is not None:
            try:
                if keep:
                    proc.stdin.write(b"keep\n")
                proc.stdin.close()
            except OSError:
                pass        # it is dead already
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)


def _watch_reaper(ref: "weakref.ref[Reaper]") -> None:
    """Wait for the current helper to exit; start a new one if it was not
    dismissed. Holds the Reaper only between waits, so it can be collected."""
    reaper = ref()
    while reaper is not None:
        proc = reaper.proc
        del reaper
        proc.wait()
        reaper = ref()
        if reaper is None or reaper.respawn(proc) is None:
            return


_REAPERS: "weakref.WeakSet[Reaper]" = weakref.WeakSet()


def _close_reaper_pipes_in_child() -> None:
    # A forked child must not hold a reaper's pipe open, or the name would
    # outlive its owner for as long as the child lives. The write end is
    # replaced by /dev/null under the same fd number rather than closed: the
    # file object still owns that number and closes it when collected, which
    # must not close an unrelated file that reused the number meanwhile.
    for reaper in list(_REAPERS):
        stdin = reaper.proc.stdin
        if stdin is None:
            continue
        try:
            nul = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.dup2(nul, stdin.fileno(), inheritable=False)
            finally:
                os.close(nul)
        except (OSError, ValueError):
            pass


os.register_at_fork(after_in_child=_close_reaper_pipes_in_child)
