"""What the Numba kernel (fastadam/_numba_kernel.py) needs below Numba's own API, as
LLVM intrinsics: this thread's MXCSR (the hardware's flush-to-zero), the threading
layer's team size, and a float32's bits.

Only imported with the Numba backend.
"""
import platform

import numba
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

MXCSR_FTZ_DAZ = 0x8040  # bits 15 and 6, as src/fa_partition.hpp sets them


def mxcsr_call(builder, name, slot):
    fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])


@intrinsic
def read_mxcsr(typingctx):
    """This thread's MXCSR (x86-64)."""
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        mxcsr_call(builder, "llvm.x86.sse.stmxcsr", slot)
        return builder.load(slot)
    return types.uint32(), codegen


@intrinsic
def write_mxcsr(typingctx, value):
    """Set this thread's MXCSR (x86-64)."""
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once_value(builder, args[0])
        mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()
    return types.void(types.uint32), codegen


# The calling thread's team size for parallel regions, through the threading layer's
# own functions (registered with LLVM by name once its threads are launched:
# ``launch``).  numba.get/set_num_threads cost a few us from Python, and inside a
# jitted function they embed ctypes pointers, which keep it out of the disk cache.
@intrinsic
def team_size(typingctx):
    def codegen(context, builder, signature, args):
        # Declared as Numba's own lowering declares it (intp); the C function returns
        # an int, so only the low 32 bits are read.
        fnty = ir.FunctionType(cgutils.intp_t, [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "get_num_threads")
        return builder.trunc(builder.call(fn, []), ir.IntType(32))
    return types.int32(), codegen


@intrinsic
def set_team_size(typingctx, n):
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [cgutils.intp_t])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "set_num_threads")
        builder.call(fn, [context.cast(builder, args[0], signature.args[0], types.intp)])
        return context.get_dummy_value()
    return types.void(n), codegen


def launch():
    """Start Numba's threading layer (which registers its functions by name)."""
    numba.get_num_threads()


@intrinsic
def as_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def as_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


if platform.machine().lower() in ("x86_64", "amd64"):
    @njit(inline="always", error_model="numpy")
    def enter_ftz(hw):
        """Set FTZ and DAZ on this thread (with ``hw``); returns what to restore."""
        saved = read_mxcsr()
        if hw:
            write_mxcsr(saved | numba.uint32(MXCSR_FTZ_DAZ))
        return saved

    @njit(inline="always", error_model="numpy")
    def leave_ftz(saved, hw):
        if hw:
            write_mxcsr(saved)
else:
    @njit(inline="always", error_model="numpy")
    def enter_ftz(hw):
        return numba.uint32(0)

    @njit(inline="always", error_model="numpy")
    def leave_ftz(saved, hw):
        pass
