// The update rule of one element, or of a vector of elements, written once.
//
// Included once per target, inside a namespace of its own, with FA_RULE_INLINE
// defined: adam_kernel.hpp includes it for the scalar types (float, double) in
// namespace fa_rule, fa_avx512.hpp for __m512 in namespace fa_rule_avx512 with
// the AVX-512 target attribute (GCC will not inline a function of a wider
// target into one of a narrower, so the vector instance needs its own
// definition).  V is the value type, S its fa_scalars, VARIANT the variant's
// code (fa_step.hpp: a flag's math tests it with fa_on, in the step it
// changes, and every loop passes it); the operators are GCC's
// vector extensions for __m512, so the text is the same for both.  The type's
// own operations (fa_flip_sign, fa_sqrt) are declared before the include.
//
// In this exact order, every operation rounded in V's element type:
//
//   g  = g * c                            (c: gradient clipping's coefficient, 1 when off)
//   g  = maximize ? -g : g
//   g  = g + wd * p                       (Adam, L2 weight decay)
//   p  = p * (1 - lr*wd)                  (AdamW, decoupled weight decay)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * (g * g)
//   vm = max(vm, v)                       (AMSGrad; fa_amsgrad_max of each type)
//   d  = sqrt(v) * (1 / sqrt(bc2)) + eps  (bc2 = 1 - beta2^step)
//   p  = p - (lr / bc1) * (m / d)         (bc1 = 1 - beta1^step)

// The gradient as the moments read it, and p after decoupled weight decay, for
// loop VARIANT (fa_step.hpp).  maximize flips the gradient's sign bit (a NaN's
// too, as the reference does): a constant XOR where the loop compiles the flag,
// else the XOR of s.maximize (all zero bits, or the sign bit), branch-free.  A
// flag's math tests it with fa_on<FA_FLAG, VARIANT>(s), compiled or not.
template <int VARIANT, typename V, typename S>
FA_RULE_INLINE void gradient(const S &s, const V &g, const V &p, V &gi, V &pi) {
    constexpr int WD = VARIANT & FA_WD_MASK;
    typedef decltype(s.maximize) Mask;
    gi = g * s.grad_scale;
    // clang reads a constant sign-bit XOR as a negation and folds it into the
    // product (g * -c), which keeps a NaN gradient's sign: it gets the run-time mask.
#if defined(__clang__)
    constexpr bool constant_mask = false;
#else
    constexpr bool constant_mask = true;
#endif
    if constexpr (!fa_compiles(VARIANT, FA_MAXIMIZE) || !constant_mask) gi = fa_xor_bits(gi, s.maximize);
    else if constexpr (fa_has(VARIANT, FA_MAXIMIZE)) gi = fa_xor_bits(gi, (Mask)((Mask)1 << (8 * sizeof(Mask) - 1)));
    pi = p;
    if (WD == FA_WD_L2) gi = gi + s.weight_decay * pi;
    if (WD == FA_WD_DECOUPLED) pi = pi * s.decay;
}

// The new m and v from their old (decoded) values.
template <int VARIANT, typename V, typename S>
FA_RULE_INLINE void moments(const S &s, const V &m, const V &v, const V &gi, V &mi, V &vi) {
    mi = s.beta1 * m + s.one_minus_beta1 * gi;
    vi = s.beta2 * v + s.one_minus_beta2 * (gi * gi);
}

// The Adam term: step_size * (m / (sqrt(vd) * inv_sqrt_bc2 + eps)); vd is v, or AMSGrad's max
// (gi, the gradient as the moments read it, is there for a flag's term).
template <int VARIANT, typename V, typename S>
FA_RULE_INLINE void adam_term(const S &s, const V &gi, const V &mi, const V &vd, V &term) {
    const V denom = fa_sqrt(vd) * s.inv_sqrt_bc2 + s.eps;
    term = s.step_size * (mi / denom);
}

// torch's order of operations, for low-precision parameters (the state in the
// parameter's dtype, math in float32: torch.optim.Adam(fused=True) on the CPU),
// where rounding every step to 8 or 11 bits makes the order visible
// (docs/low-precision.md measures it against torch).
//
//   m  = fma(c, g - m, m)  if c < 1/2, else  fma(c - 1, g - m, g)   (c = 1 - beta1; torch's lerp)
//   v  = v * beta2 + (1 - beta2) * g * g
//   d  = sqrt(v) / sqrt(bc2) + eps
//   p  = p - (lr / bc1) * m / d
template <int VARIANT, typename V, typename S>
FA_RULE_INLINE void moments_lerp(const S &s, const V &m, const V &v, const V &gi, V &mi, V &vi) {
    const bool small = s.one_minus_beta1 < 0.5f;
    mi = fa_fma(small ? s.one_minus_beta1 : s.one_minus_beta1 - 1.0f, gi - m, small ? m : gi);
    vi = v * s.beta2 + s.one_minus_beta2 * gi * gi;
}

template <int VARIANT, typename V, typename S>
FA_RULE_INLINE void adam_term_div(const S &s, const V &gi, const V &mi, const V &vd, V &term) {
    const V denom = fa_sqrt(vd) / s.sqrt_bc2 + s.eps;
    term = s.step_size * mi / denom;
}
