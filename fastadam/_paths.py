"""Paths that fastadam reads or writes: regular files only, refused at once otherwise.

A FIFO opened for reading waits for a writer forever, a device file reads without
end, and replacing ``/dev/null`` or a directory by a checkpoint destroys it.  So a
file is opened without blocking and checked (``fstat``) before anything is read,
and a file about to be replaced must be a regular file or absent.
"""
import errno
import os
import secrets
import stat


def _kind(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse_os_error(path, e):
    if e.errno == errno.ELOOP:
        raise ValueError(f"{path}: a loop of symbolic links") from None
    if e.errno == errno.ENOENT and os.path.islink(path):
        raise FileNotFoundError(errno.ENOENT, "a symbolic link to nothing", str(path)) from None
    raise e


def open_regular(path):
    """``path`` opened for reading in binary if it is a regular file (symbolic links
    followed); otherwise ValueError naming it (FileNotFoundError where nothing is there)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        _refuse_os_error(path, e)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path}: {_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_replaceable(path):
    """Refuse to replace ``path`` unless it is absent or a regular file (symbolic links
    followed), and unless its directory exists."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise ValueError(f"{path}: a symbolic link to nothing; not replaced") from None
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(errno.ENOENT, "no such directory", directory) from None
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path}: a loop of symbolic links; not replaced") from None
        raise
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: {_kind(mode)}, not a regular file; not replaced")


def create_beside(path, suffix):
    """A new file in ``path``'s directory, to be renamed over ``path`` once written:
    (its file object opened for binary writing, its name).  It is created with mode
    0o666, so that the user's umask decides its permissions as it does for every file
    that open() creates (NumPy's np.save, torch.save); tempfile.mkstemp's 0o600 would
    make a checkpoint or a download unreadable to the user's group."""
    directory = os.path.dirname(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        name = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(name, flags, 0o666)
        except FileExistsError:
            continue
        return os.fdopen(fd, "wb"), name
    raise FileExistsError(errno.EEXIST, "no unused temporary name", directory)
