"""Where large state buffers start: each on a cache line, at a page offset apart
from its parameter's and from each other's (4K aliasing; see fastadam._flat)."""
import numpy as np
import pytest

import fastadam
from fastadam import _flat

N = 1 << 18  # 1 MiB of float32: above _flat.STATE_PLACEMENT_MIN_BYTES
KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def at_page_offset(offset, n):
    """A float32 array of n elements starting ``offset`` bytes into a page."""
    raw = np.zeros(n * 4 + 4096, np.uint8)
    start = (offset - raw.ctypes.data) % 4096
    return raw[start:start + n * 4].view(np.float32)


def assert_placed(param_address, buffers):
    """Each buffer on a cache line; the lines of the parameter and of every buffer
    at distinct page offsets (the parameter's own offset rounded down to its line)."""
    lines = [param_address % 4096 // 64]
    for key, address in buffers.items():
        assert address % 64 == 0, f"{key} starts {address % 64} bytes past a cache line"
        lines.append(address % 4096 // 64)
    assert len(set(lines)) == len(lines), f"page lines of p and {list(buffers)}: {lines}"


def placed_parameters():
    # NumPy's own large array (16 bytes past a line), and ones on the lines where
    # a fixed placement of the state would put m or v.
    yield np.random.default_rng(0).standard_normal(N, dtype=np.float32)
    for key in KEYS:
        yield at_page_offset(_flat.STATE_PAGE_OFFSETS[key], N)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("k", range(4))
def test_new_state_is_placed_apart_from_its_parameter(state_dtype, k):
    p = list(placed_parameters())[k]
    opt = fastadam.Adam([p], amsgrad=True, state_dtype=state_dtype)
    opt.step([np.ones_like(p)])
    assert_placed(p.ctypes.data, {key: opt.state[0][key].ctypes.data for key in KEYS})


@pytest.mark.parametrize("source_dtype, state_dtype", [("float32", "float32"), ("bfloat16", "float32"),
                                                       ("float32", "int8"), ("int8", "bfloat16")])
def test_loaded_state_is_placed_as_new_state(source_dtype, state_dtype):
    p = at_page_offset(_flat.STATE_PAGE_OFFSETS["exp_avg"], N)
    source = fastadam.Adam([p.copy()], amsgrad=True, state_dtype=source_dtype)
    source.step([np.ones_like(p)])
    opt = fastadam.Adam([p], amsgrad=True, state_dtype=state_dtype)
    opt.load_state_dict(source.state_dict())
    assert_placed(p.ctypes.data, {key: opt.state[0][key].ctypes.data for key in KEYS})


def test_small_state_is_not_padded():
    p = np.zeros(_flat.STATE_PLACEMENT_MIN_BYTES // 4 - 1, np.float32)
    opt = fastadam.Adam([p])
    opt.step([np.ones_like(p)])
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[0][key].base is None  # its own allocation, no padding around it


def test_torch_state_is_placed_apart_from_its_parameter():
    torch = pytest.importorskip("torch")
    import fastadam.torch
    for p in placed_parameters():
        param = torch.nn.Parameter(torch.from_numpy(p))
        param.grad = torch.ones_like(param)
        opt = fastadam.torch.Adam([param], amsgrad=True)
        opt.step()
        assert_placed(param.data_ptr(), {key: opt.state[param][key].data_ptr() for key in KEYS})


def resident_pages(array):
    """How many of the pages under ``array`` are in memory, and how many there are (mincore)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    page = 4096
    start = array.ctypes.data // page * page
    length = array.ctypes.data + array.nbytes - start
    pages = -(-length // page)
    vec = (ctypes.c_ubyte * pages)()
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
        pytest.skip(f"mincore failed (errno {ctypes.get_errno()})")
    return sum(b & 1 for b in vec), pages


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="mincore: Linux")
@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_new_state_pages_are_first_touched_by_the_update(monkeypatch, backend):
    """New state is allocated untouched (fresh zero pages from the allocator), and nothing
    writes it before the update does: the threads that run the update fault its pages
    in, each its own share, so the kernel places them where those threads run
    (Linux's first-touch policy on a NUMA machine)."""
    if backend == "cython":
        pytest.importorskip("fastadam._kernel")
    n = 16 << 20  # 64 MiB of float32 per buffer: fresh pages from mmap
    p = np.zeros(n, np.float32)
    g = np.full(n, 1e-3, np.float32)
    opt = fastadam.Adam([p], lr=1e-3, amsgrad=True, backend=backend)
    seen = {}
    take_step = fastadam._backends.take_step

    def watching(plan, *args, before_run=None, **kwargs):
        def before():
            before_run()
            seen.update({key: resident_pages(opt.state[0][key]) for key in KEYS})
        return take_step(plan, *args, before_run=before, **kwargs)

    monkeypatch.setattr(fastadam._backends, "take_step", watching)
    opt.step([g])
    assert set(seen) == set(KEYS)
    for key in KEYS:
        resident, pages = seen[key]
        assert resident <= 2, f"{key}: {resident} of {pages} pages written before the update"
        after, _ = resident_pages(opt.state[0][key])
        assert after == pages, f"{key}: {after} of {pages} pages in memory after the step"
