"""MNIST-format data: the IDX file reader, the four-file dataset, and the download path.

The IDX format (LeCun et al.): a 4-byte magic number ``00 00 TT NN`` (TT the
element type, 0x08 for unsigned bytes; NN the number of dimensions), NN
big-endian uint32 sizes, then the data.  Files may be gzip-compressed.
"""
import gzip
import hashlib
import math
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .. import _paths

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the decompressed canonical MNIST files (data/mnist/README.md).
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
_GZIP_MAGIC = b"\x1f\x8b"


class IDXError(ValueError):
    """A file that is not a valid IDX file (the message names the file)."""


# Deflate expands at most ~1032:1, so a gzip file of c bytes holds at most this
# many times c bytes: a header declaring more is refused before anything is allocated.
_MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 20


def _open(path):
    """The file as a binary stream, decompressing if it is gzip; and its size on disk."""
    path = Path(path)
    try:
        f = _paths.open_regular(path)  # a FIFO or a device is refused, not waited on
    except ValueError as e:
        raise IDXError(str(e)) from None
    size = os.fstat(f.fileno()).st_size
    if f.read(2) == _GZIP_MAGIC:
        f.seek(0)
        return gzip.GzipFile(fileobj=f, mode="rb"), size, True
    f.seek(0)
    return f, size, False


def _read_exact(stream, n, name):
    """``n`` bytes from ``stream`` into a new array, in chunks; fewer is an IDXError."""
    out = np.empty(n, np.uint8)
    view, got = memoryview(out), 0
    try:
        while got < n:
            k = stream.readinto(view[got:got + min(_CHUNK, n - got)])
            if not k:
                break
            got += k
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise IDXError(f"{name}: corrupt or truncated gzip data ({e})") from None
    if got != n:
        raise IDXError(f"{name}: truncated ({got} of {n} bytes)")
    return out


def read_idx(path, expect_ndim=None):
    """An IDX file (plain or gzip) as a uint8 array of its declared shape.

    The header is read and checked first; the declared size is checked against
    what the file can hold (its exact size, or for gzip the most deflate can
    expand it to) before the data is allocated and read, and any trailing data
    is refused."""
    name = str(path)
    stream, size_on_disk, compressed = _open(path)
    with stream:
        try:
            head = stream.read(4)
            if len(head) < 4:
                raise IDXError(f"{name}: too short for an IDX header ({len(head)} bytes)")
            if head[:2] != b"\x00\x00" or head[2] != 0x08:
                raise IDXError(f"{name}: bad magic number 0x{head.hex()} "
                               "(expected 0x0000080N: unsigned bytes, N dimensions)")
            ndim = head[3]
            if expect_ndim is not None and ndim != expect_ndim:
                raise IDXError(f"{name}: {ndim} dimensions, expected {expect_ndim}")
            dims = stream.read(4 * ndim)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise IDXError(f"{name}: corrupt or truncated gzip data ({e})") from None
        if len(dims) < 4 * ndim:
            raise IDXError(f"{name}: truncated header")
        shape = tuple(int(d) for d in np.frombuffer(dims, ">u4"))
        header = 4 + 4 * ndim
        declared = math.prod(shape)  # exact: an int64 product can wrap (2**21 * 2**21 * 2**22 is 0)
        if compressed:
            if declared > _MAX_DEFLATE_RATIO * size_on_disk:
                raise IDXError(f"{name}: the header's shape {shape} needs {declared} bytes, more than "
                               f"a {size_on_disk}-byte gzip file can hold (corrupt header)")
        elif header + declared != size_on_disk:
            raise IDXError(f"{name}: {size_on_disk} bytes, but the header's shape {shape} needs "
                           f"{header + declared} ("
                           f"{'truncated' if size_on_disk < header + declared else 'trailing data'})")
        data = _read_exact(stream, declared, name)
        try:
            trailing = stream.read(1)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise IDXError(f"{name}: corrupt or truncated gzip data ({e})") from None
        if trailing:
            raise IDXError(f"{name}: trailing data after the {declared} bytes its header's shape "
                           f"{shape} needs")
    return data.reshape(shape)


def sha256_of(path):
    """SHA-256 of the file's contents, decompressed if it is gzip (read in chunks)."""
    digest = hashlib.sha256()
    stream, _, _ = _open(path)
    with stream:
        try:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise IDXError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return digest.hexdigest()


def find_file(directory, stem):
    """``stem`` or ``stem.gz`` in ``directory`` (also the ``stem`` with '.' for '-' before idx)."""
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def load_dataset(directory):
    """The four files of an MNIST-format dataset as float32 images in [0, 1] and int64 labels.

    Returns ``(x_train, y_train, x_test, y_test)`` with images flattened to (N, rows*cols).
    """
    arrays = {}
    for key, stem in FILES.items():
        path = find_file(directory, stem)
        if path is None:
            raise FileNotFoundError(f"{directory}: no {stem}[.gz]")
        arrays[key] = read_idx(path, expect_ndim=3 if "images" in key else 1)
        arrays[key + "_path"] = path
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] == 0:
            raise IDXError(f"{arrays[split + '_images_path']}: no images (a {split} split is needed)")
        if 0 in images.shape[1:]:
            raise IDXError(f"{arrays[split + '_images_path']}: images of {images.shape[1]} x "
                           f"{images.shape[2]} pixels (both must be at least 1)")
        if images.shape[0] != labels.shape[0]:
            raise IDXError(f"{arrays[split + '_images_path']} has {images.shape[0]} images but "
                           f"{arrays[split + '_labels_path']} has {labels.shape[0]} labels")
        if labels.size and labels.max() > 9:
            raise IDXError(f"{arrays[split + '_labels_path']}: label {labels.max()} is not a digit class 0-9")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise IDXError(f"{directory}: train images are {arrays['train_images'].shape[1:]}, "
                       f"test images {arrays['test_images'].shape[1:]}")

    def images(a):
        return (a.reshape(a.shape[0], -1) / np.float32(255)).astype(np.float32)

    return (images(arrays["train_images"]), arrays["train_labels"].astype(np.int64),
            images(arrays["test_images"]), arrays["test_labels"].astype(np.int64))


def bundled_dir():
    """$FASTADAM_MNIST_DIR if set, else the repository's data/mnist (present in a source
    checkout or an editable install; an installed wheel does not carry the data)."""
    env = os.environ.get("FASTADAM_MNIST_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "mnist"


def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastadam" / "mnist"


def locate(data=None, download=True, progress=None):
    """The directory to read MNIST from: ``data`` if given, else the bundled copy, else
    the download cache (downloading into it if needed and allowed)."""
    if data is not None:
        if not all(find_file(data, stem) for stem in FILES.values()):
            raise FileNotFoundError(f"--data {data}: expected the four MNIST-format files "
                                    f"({', '.join(s + '[.gz]' for s in FILES.values())})")
        return Path(data)
    for candidate in (bundled_dir(), cache_dir()):
        if all(find_file(candidate, stem) for stem in FILES.values()):
            return candidate
    if not download:
        raise FileNotFoundError(_where_to_put_files())
    return download_mnist(cache_dir(), progress=progress)


def _where_to_put_files():
    return ("MNIST was not found. Put the four files "
            f"({', '.join(s + '.gz' for s in FILES.values())}) in {bundled_dir()} or "
            f"{cache_dir()}, or pass --data DIR")


def download_mnist(directory, progress=None, mirrors=MIRRORS, timeout=10):
    """Download the four files into ``directory``, checking each one's SHA-256."""
    from tqdm.auto import tqdm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stem in FILES.values():
        target = directory / (stem + ".gz")
        if target.is_file():
            continue
        errors = []
        for mirror in mirrors:
            url = mirror + stem + ".gz"
            tmp = None
            try:
                out, tmp = _paths.create_beside(target, ".part")
                with out, urllib.request.urlopen(url, timeout=timeout) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=stem, disable=progress is False) as bar:
                        while chunk := response.read(1 << 16):
                            out.write(chunk)
                            bar.update(len(chunk))
                digest = sha256_of(tmp)
                if digest != SHA256[stem]:
                    raise IDXError(f"{url}: SHA-256 {digest} does not match the canonical {SHA256[stem]}")
                os.replace(tmp, target)
                break
            except (OSError, urllib.error.URLError, IDXError) as e:
                errors.append(f"{url}: {e}")
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            raise FileNotFoundError(_where_to_put_files() + ". Download failed: " + "; ".join(errors))
    return directory
