# What the compiled plan's checks compare that needs no plan, and its
# allocation (included by _kernel.pyx before _plan.pxi).


from numpy.ma import MaskedArray as _MaskedArray


cdef inline bint is_unmasked_array(object obj):
    """An ndarray and not a masked one (the checked path refuses those by name)."""
    return cnp.PyArray_CheckExact(obj) or (cnp.PyArray_Check(obj)
                                           and not isinstance(obj, _MaskedArray))


cdef void *zeroed(size_t n, size_t size) except NULL:
    """calloc(n, size), or MemoryError."""
    cdef void *p = calloc(n, size)
    if p == NULL:
        raise MemoryError()
    return p


cdef inline bint is_absmax_of(cnp.ndarray a, void *data, int64_t numel) noexcept:
    """Whether ``a`` is still the 8-bit state absmax at ``data`` of a tensor of
    ``numel`` elements: the same pointer, C-contiguous, aligned, writeable,
    native float32, one value per block."""
    return (cnp.PyArray_DATA(a) == data and cnp.PyArray_ISCARRAY(a)
            and cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32 and cnp.PyArray_ISNOTSWAPPED(a)
            and cnp.PyArray_NDIM(a) == 1
            and cnp.PyArray_DIM(a, 0) == (numel + FA_INT8_BLOCK - 1) // FA_INT8_BLOCK)


cdef inline bint meets_spans(cnp.ndarray g, const int64_t *written, Py_ssize_t n_written) noexcept:
    """Whether g's memory meets any of the sorted, disjoint (start, end) pairs in
    ``written``."""
    cdef int64_t lo = <int64_t><intptr_t>cnp.PyArray_DATA(g)
    return meets_range(lo, lo + cnp.PyArray_NBYTES(g), written, n_written)


cdef bint meets_range(int64_t lo, int64_t hi, const int64_t *written, Py_ssize_t n_written) noexcept:
    """Whether the bytes [lo, hi) meet any of the sorted, disjoint (start, end) pairs
    in ``written`` (binary search)."""
    cdef Py_ssize_t a = 0, b = n_written, mid
    if hi == lo:
        return False
    # The last interval starting before hi; intervals are disjoint and
    # sorted, so it is also the one that ends last among those.
    while a < b:
        mid = (a + b) // 2
        if written[2 * mid] < hi:
            a = mid + 1
        else:
            b = mid
    return a > 0 and written[2 * (a - 1) + 1] > lo


cdef inline bint read_exact_real(PyObject *ptr, double *out) noexcept:
    """A float or an int object read exactly as a double (False for anything else,
    or an int beyond double)."""
    x = <object>ptr
    if type(x) is float:
        out[0] = fa_float_value(x)
        return True
    if type(x) is int:
        out[0] = exact_long_as_double(x)
        if out[0] == -1.0 and PyErr_Occurred() != NULL:
            PyErr_Clear()
            return False
        return True
    return False


cdef inline bint hyperparameters_in_range(double lr, double beta1, double beta2, double eps,
                                          double weight_decay) noexcept:
    """fastadam._rules.hyperparameters' ranges (NaN is in none of them)."""
    return (0.0 <= lr and 0.0 <= eps and 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0
            and 0.0 <= weight_decay)
