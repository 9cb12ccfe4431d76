// The kernel's side of the CPU, for every architecture it builds on: the
// instruction sets its loops are compiled for (each a function attribute, so one
// build serves every CPU of the architecture), which of them this CPU runs, and
// the flush-to-zero mode the loops run under.  Nothing outside this file and the
// x86 variant's own (fa_avx512.hpp, the F16C blocks of adam_kernel.hpp) names an
// architecture's registers or intrinsics.
//
//   x86-64   baseline (SSE2), avx2 (AVX2+FMA+F16C), avx512 (F, VL, BW, DQ):
//            libgcc's CPU model (__builtin_cpu_supports), which checks that the OS
//            saves the registers too.
//   aarch64  neon (ASIMD: the architecture's baseline, on every aarch64 CPU) and
//            sve (vector-length agnostic: one build for 128- to 2048-bit vectors),
//            told by the kernel through getauxval(AT_HWCAP).
//   other    the baseline only (GCC's or clang's vectorisation for the target).
#pragma once

#include <stdint.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#include <sys/prctl.h>
#endif

// Codes of the variants (FASTADAM_ISA's names, fastadam._kernel.ISA_NAMES);
// the baseline is code 0 everywhere.
enum fa_isa { FA_ISA_BASELINE = 0, FA_ISA_AVX2 = 1, FA_ISA_AVX512 = 2, FA_ISA_SVE = 3, FA_N_ISAS = 4 };

#if defined(__x86_64__) && defined(__GNUC__)
#define FA_X86_VARIANTS 1
#define FA_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#if defined(__clang__)  // clang takes no prefer-vector-width in the attribute
#define FA_AVX512_TARGET \
    __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"), min_vector_width(512)))
#else
#define FA_AVX512_TARGET \
    __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#endif
#else
#define FA_X86_VARIANTS 0
#endif

// SVE by function attribute: GCC from 12 (the kernel's loops, vectorised for SVE
// with predicated tails), clang from 16; older compilers build NEON alone.
#if defined(__aarch64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 16) || (!defined(__clang__) && __GNUC__ >= 12))
#define FA_SVE_VARIANT 1
#if defined(__clang__)
#define FA_SVE_TARGET __attribute__((target("sve")))
#else
#define FA_SVE_TARGET __attribute__((target("+sve")))
#endif
#else
#define FA_SVE_VARIANT 0
#endif

// Each code's name, "" where this build has no such variant.
static const char *const fa_isa_names[FA_N_ISAS] = {
#if defined(__aarch64__)
    "neon",
#else
    "baseline",
#endif
    FA_X86_VARIANTS ? "avx2" : "", FA_X86_VARIANTS ? "avx512" : "", FA_SVE_VARIANT ? "sve" : ""};

static inline int fa_isa_supported(int isa) {
    if (isa == FA_ISA_BASELINE) return 1;
#if FA_X86_VARIANTS
    __builtin_cpu_init();  // libgcc checks CPUID and that the OS saves the registers (XGETBV)
    unsigned int eax, ebx, ecx, edx;  // F16C by CPUID: clang 14's __builtin_cpu_supports has no name for it
    const int f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
    if (isa == FA_ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
    if (isa == FA_ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && f16c && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif
#if FA_SVE_VARIANT
    if (isa == FA_ISA_SVE) return (getauxval(AT_HWCAP) & (1ul << 22)) != 0;  // HWCAP_SVE (asm/hwcap.h)
#endif
    return 0;
}

// The calling thread's SVE vector length in bits (Linux lets a thread shorten it:
// prctl PR_SVE_SET_VL), or 0 where there is no SVE.
static inline int fa_sve_vector_bits(void) {
#if FA_SVE_VARIANT
    if (!fa_isa_supported(FA_ISA_SVE)) return 0;
    const int vl = prctl(51 /* PR_SVE_GET_VL */, 0, 0, 0, 0);
    return vl < 0 ? 0 : (vl & 0xffff) * 8;
#else
    return 0;
#endif
}

// The floating-point mode of the calling thread, saved and set around the loops.
// Flush-to-zero (fastadam/_formats.py's rule): on x86-64 the FTZ and DAZ bits of
// MXCSR; on aarch64 FPCR.FZ, which flushes subnormal inputs and results of
// single and double precision, scalar, NEON and SVE alike (FZ16, half precision's
// own bit, is left as it is: the kernel does no half-precision arithmetic).
typedef uint64_t fa_fp_mode;
#define FA_MXCSR_FTZ_DAZ 0x8040u  // bits 15 and 6
#define FA_FPCR_FZ (1ull << 24)

static inline fa_fp_mode fa_get_fp_mode(void) {
#if defined(__x86_64__)
    return _mm_getcsr();
#elif defined(__aarch64__) && defined(__GNUC__)
    uint64_t fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    return fpcr;
#else
    return 0;
#endif
}

static inline void fa_set_fp_mode(fa_fp_mode mode) {
#if defined(__x86_64__)
    _mm_setcsr((unsigned int)mode);
#elif defined(__aarch64__) && defined(__GNUC__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(mode));
#else
    (void)mode;
#endif
}

// Sets flush-to-zero on (1) or off (0); returns the mode to restore.
static inline fa_fp_mode fa_flush_to_zero(int on) {
    const fa_fp_mode saved = fa_get_fp_mode();
#if defined(__x86_64__)
    fa_set_fp_mode(on ? saved | FA_MXCSR_FTZ_DAZ : saved & ~(fa_fp_mode)FA_MXCSR_FTZ_DAZ);
#elif defined(__aarch64__) && defined(__GNUC__)
    fa_set_fp_mode(on ? saved | FA_FPCR_FZ : saved & ~(fa_fp_mode)FA_FPCR_FZ);
#else
    (void)on;
#endif
    return saved;
}

// Whether the loops' flush-to-zero rule is in hardware here (the reference's
// bits need it; elsewhere a subnormal is kept where the reference flushes it).
static const int fa_flush_in_hardware =
#if defined(__x86_64__) || (defined(__aarch64__) && defined(__GNUC__))
    1;
#else
    0;
#endif
