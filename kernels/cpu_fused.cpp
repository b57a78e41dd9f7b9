// Fused CPU kernel for the linear connectivity matrix of an MLP tail (docs/lmn.md, "How the fast paths compute it").
//
// For every pair i < j:  x_0[t] = z_i + lam_t (z_j - z_i)               # [T, H0]
//                        x_l   = act_l(x_{l-1}) @ W_l^T + b_l            # [T, H_l], l = 1..S
//                        y     = final_act(x_S)                          # [T, O]
//                        y    += lam_t (u_j - u_i)   (optional skip term, u = W_skip h per sample, float64)
//                        L_ij  = mean_k r2(y[:, k], lam)   (constant-path rule: r2 = 1)
// Only L (N x N) is written. Plain C ABI (loaded with ctypes): no torch headers, so it builds in
// seconds. The math is compiled for AVX2 + FMA; gm_cpu_supported() is compiled without them.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <new>
#include <thread>
#include <vector>

extern "C" int gm_cpu_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// The GEMMs (fp32 and fp64) in 512-bit registers where the CPU has AVX-512F (gemm_panel512): the same packed panels,
// the same FMA order per output (bias, then k = 0..K-1), so their results are bitwise those of the AVX2 GEMMs; only
// the width of the registers differs. Chosen once at load by the Python wrapper (gm_set_avx512; GROKFAST_METRICS_CPU_AVX512=0: AVX2).
static int g_avx512 = 0;

extern "C" int gm_set_avx512(int want) {
    __builtin_cpu_init();
    g_avx512 = want && __builtin_cpu_supports("avx512f");
    return g_avx512;
}

// Activation codes come from the one activation table (grokfast_metrics._tail.ACTIVATIONS): the
// Python wrapper compiles this file with -DGM_ACT_<NAME>=<code> for every entry.
#if !defined(GM_ACT_IDENTITY) || !defined(GM_ACT_SILU) || !defined(GM_ACT_RELU) || !defined(GM_ACT_GELU) || \
    !defined(GM_ACT_GELU_TANH) || !defined(GM_ACT_TANH) || !defined(GM_ACT_SIGMOID) || !defined(GM_ACT_LEAKY_RELU)
#error "compile with -DGM_ACT_<NAME>=<code> for every activation of grokfast_metrics._tail.ACTIVATIONS"
#endif
enum ActCode { ACT_IDENTITY = GM_ACT_IDENTITY, ACT_SILU = GM_ACT_SILU, ACT_RELU = GM_ACT_RELU,
               ACT_GELU = GM_ACT_GELU, ACT_GELU_TANH = GM_ACT_GELU_TANH, ACT_TANH = GM_ACT_TANH,
               ACT_SIGMOID = GM_ACT_SIGMOID, ACT_LEAKY_RELU = GM_ACT_LEAKY_RELU };

struct Problem {
    int64_t n;          // samples
    int T;              // n_lambda
    int n_stages;       // S >= 1 Linears after the interpolation
    const int* kp;      // [S]   padded input width of stage s (multiple of 8): row stride of its input
    const int* kin;     // [S]   true input width of stage s (the GEMM's K; padding is never multiplied)
    const int* np;      // [S]   padded output width of stage s (multiple of 8)
    const float* const* wpack;  // [S] packed W_s^T: column blocks of 16 (last may be 8), each [kp, w]
    const float* const* bias;   // [S] padded bias [np] (zeros when the Linear has none)
    const int* act_off;  // [S + 2] acts of stage s are act_code[act_off[s] : act_off[s+1]]; s = S: final
    const int* act_code;
    const float* act_slope;
    int out_dim;        // O (unpadded)
    const float* z;     // [n, kp[0]] absorbed, zero padded
    const float* lam;   // [T]
    const float* lam_c; // [T]
    float ll;           // sum lam_c^2
    float eps;          // machine epsilon used by the constant-path rule
    float const_rtol;
    float* L;           // [n, n] output
    const float* ez;    // [n, kp[0]] exp(-z) (SiLU chain path) or nullptr
    const float* sz;    // [n, kp[0]] silu(z) (SiLU chain path) or nullptr
    const uint8_t* ez_ok;  // [n] max |z_i| <= CHAIN_ZMAX: the chain path cannot overflow
    const float* wabs;  // packed |W_S^T| of the last stage (rounding scale of the centred outputs)
    const float* wnorm; // [2 (np[S-1] + 8)] sum_h |W_S[k, h]|, then |W_S[k, :]|_2 (zero padded): cheap bounds on it
    float flag_tau;     // > 0: write FLAGGED (-1) for a pair whose estimated error exceeds it
    std::atomic<int>* error;  // set by a worker that failed (bad_alloc ...): 1
    const double* U;    // [n, out_dim] skip term u_i (lowered tails, centred only) or nullptr
};

//: SiLU chain path (see silu_chain): used when T <= CHAIN_TMAX and both |z| <= CHAIN_ZMAX.
constexpr int CHAIN_TMAX = 41;
constexpr float CHAIN_ZMAX = 40.0f;  // (1 + e^40)^2 < FLT_MAX (see silu_chain)

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

// ---------------------------------------------------------------------------------------------
// vector math (8 x fp32)

inline __m256 exp256(__m256 x) {
    // Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-5 polynomial; |rel err| ~ 1 ulp.
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447505531f);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 sigmoid256(__m256 x) {
    // exp argument is clamped inside exp256, so 1 + exp(-x) is finite and >= 1
    return _mm256_div_ps(_mm256_set1_ps(1.0f),
                         _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

inline __m256 tanh256(__m256 x) {
    // Cephes tanhf: odd polynomial for |x| < 0.625, else 1 - 2 / (exp(2|x|) + 1) with x's sign.
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 ax = _mm256_andnot_ps(sign, x);
    __m256 z = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(-5.70498872745E-3f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954E-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531E-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036E-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422E-1f));
    __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    __m256 e = exp256(_mm256_add_ps(ax, ax));
    __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                               _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
    big = _mm256_or_ps(big, _mm256_and_ps(sign, x));
    return _mm256_blendv_ps(big, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}

inline __m256 erf256(__m256 x) {
    // Abramowitz & Stegun 7.1.26 (|abs err| <= 1.5e-7), the formula ATen's AVX2 erf uses.
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 ax = _mm256_andnot_ps(sign, x);
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax, one));
    __m256 r = _mm256_set1_ps(1.061405429f);
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-1.453152027f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
    __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(x, x)));
    __m256 y = _mm256_fnmadd_ps(_mm256_mul_ps(r, t), e, _mm256_set1_ps(1.0f));
    return _mm256_or_ps(y, _mm256_and_ps(sign, x));
}

inline __m256 erfc256(__m256 u) {
    // Numerical Recipes erfcc (Chebyshev): erfc(|u|) = t exp(-u^2 + P(t)), t = 1 / (1 + |u| / 2), relative error
    // < 1.2e-7 for every u >= 0 (so GELU keeps relative accuracy on its negative side); erfc(u) = 2 - erfc(-u).
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 z = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), u);
    __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.5f), z, one));
    static const float c[10] = {-1.26551223f, 1.00002368f, 0.37409196f, 0.09678418f, -0.18628806f,
                                0.27886807f, -1.13520398f, 1.48851587f, -0.82215223f, 0.17087277f};
    __m256 p = _mm256_set1_ps(c[9]);
    for (int k = 8; k >= 0; --k) p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c[k]));
    __m256 ans = _mm256_mul_ps(t, exp256(_mm256_fnmadd_ps(z, z, p)));
    return _mm256_blendv_ps(ans, _mm256_sub_ps(_mm256_set1_ps(2.0f), ans), _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_LT_OQ));
}

// ---------------------------------------------------------------------------------------------
// vector math (4 x fp64)

// exp(x) in float64 (AVX2), x clamped to [-708, 709]: 2^n exp(r), n = round(x / ln2), r = x - n ln2 with ln2
// split in two (Cephes C1 + C2; n C1 is exact), |r| <= ln2 / 2; exp(r) by its Taylor series to degree 13
// (truncation < 1e-17 relative), so about 1 ulp like std::exp; 2^n built in the exponent bits.
inline __m256d exp256d(__m256d x) {
    x = _mm256_max_pd(_mm256_min_pd(x, _mm256_set1_pd(709.0)), _mm256_set1_pd(-708.0));
    const __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93145751953125e-1), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.42860682030941723212e-6), r);
    static constexpr double inv_fact[14] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
                                            1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800,
                                            1.0 / 479001600, 1.0 / 6227020800.0};
    __m256d p = _mm256_set1_pd(inv_fact[13]);
    for (int k = 12; k >= 0; --k) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(inv_fact[k]));
    const __m256i e = _mm256_slli_epi64(
        _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n)), _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(p, _mm256_castsi256_pd(e));
}

// x sigmoid(x) through e^{-|x|} (sigmoid64, 4 lanes)
inline __m256d silu256d(__m256d x) {
    const __m256d one = _mm256_set1_pd(1.0);
    const __m256d ax = _mm256_andnot_pd(_mm256_set1_pd(-0.0), x);
    const __m256d e = exp256d(_mm256_sub_pd(_mm256_setzero_pd(), ax));
    const __m256d num = _mm256_blendv_pd(e, one, _mm256_cmp_pd(x, _mm256_setzero_pd(), _CMP_GE_OQ));
    return _mm256_mul_pd(x, _mm256_div_pd(num, _mm256_add_pd(one, e)));
}

// ---------------------------------------------------------------------------------------------
// activations

inline __m256 act256(__m256 x, int code, float slope) {
    switch (code) {
        case ACT_SILU: return _mm256_mul_ps(x, sigmoid256(x));
        case ACT_RELU: return _mm256_max_ps(x, _mm256_setzero_ps());
        case ACT_SIGMOID: return sigmoid256(x);
        case ACT_TANH: return tanh256(x);
        case ACT_LEAKY_RELU: {
            __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
            return _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(slope)), neg);
        }
        case ACT_GELU_TANH: {
            // x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): 0.5 x (1 + tanh u) cancels for negative u (docs/lmn.md, "Accuracy in the corners")
            __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            __m256 u2 = _mm256_mul_ps(_mm256_set1_ps(1.5957691216057308f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
            return _mm256_mul_ps(x, sigmoid256(u2));
        }
        case ACT_GELU: {  // 0.5 x erfc(-x / sqrt(2)): the erf form cancels for negative x (docs/lmn.md, "Accuracy in the corners")
            __m256 hx = _mm256_mul_ps(_mm256_set1_ps(0.5f), x);
            return _mm256_mul_ps(hx, erfc256(_mm256_mul_ps(x, _mm256_set1_ps(-0.7071067811865476f))));
        }
        default: return x;
    }
}

// Apply a list of activations in place on a [rows, width] block (width a multiple of 8).
void apply_acts(float* x, int64_t count, const int* codes, const float* slopes, int n_acts) {
    for (int a = 0; a < n_acts; ++a) {
        if (codes[a] == ACT_IDENTITY) continue;
        for (int64_t q = 0; q < count; q += 8)
            _mm256_storeu_ps(x + q, act256(_mm256_loadu_ps(x + q), codes[a], slopes[a]));
    }
}

// ---------------------------------------------------------------------------------------------
// One SIMD vocabulary for fp32 (8 lanes) and fp64 (4 lanes): the GEMM micro-kernel and the SiLU chain
// below are written once over it (the fp32 kernel and the fp64 kernel instantiate them).

template <class Real>
struct Simd;

template <>
struct Simd<float> {
    using reg = __m256;
    static constexpr int W = 8;
    static reg load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
    static reg set1(float v) { return _mm256_set1_ps(v); }
    static reg zero() { return _mm256_setzero_ps(); }
    static reg bcast(const float* p) { return _mm256_broadcast_ss(p); }
    static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
    static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
    static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
    static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
    static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
    static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
    static reg abs(reg a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
    static reg exp(reg x) { return exp256(x); }
    static float hmax(reg v) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, v);
        return *std::max_element(lanes, lanes + 8);
    }
};

template <>
struct Simd<double> {
    using reg = __m256d;
    static constexpr int W = 4;
    static reg load(const double* p) { return _mm256_loadu_pd(p); }
    static void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
    static reg set1(double v) { return _mm256_set1_pd(v); }
    static reg zero() { return _mm256_setzero_pd(); }
    static reg bcast(const double* p) { return _mm256_broadcast_sd(p); }
    static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
    static reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
    static reg sub(reg a, reg b) { return _mm256_sub_pd(a, b); }
    static reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
    static reg div(reg a, reg b) { return _mm256_div_pd(a, b); }
    static reg max(reg a, reg b) { return _mm256_max_pd(a, b); }
    static reg abs(reg a) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), a); }
    static reg exp(reg x) { return exp256d(x); }
    static double hmax(reg v) {
        alignas(32) double lanes[4];
        _mm256_store_pd(lanes, v);
        return *std::max_element(lanes, lanes + 4);
    }
};

// ---------------------------------------------------------------------------------------------
// GEMM micro-kernel: C[R, W NV] = bias + A[R, K] @ B[K, W NV] (W lanes of Real); A rows have stride lda,
// B is a packed panel [K', W NV], C rows have stride ldc. IDX: row k of the product is row idx[k] of B (a subset of
// W^T's rows, relu_pair's crossing units); bias nullptr: no bias. One template for both (the index costs nothing
// where it is off: IDX is a compile-time constant).

template <int R, int NV, bool IDX, class Real>
inline void micro(const Real* A, int lda, const Real* B, const int* idx, int K, const Real* bias, Real* C, int ldc) {
    using V = Simd<Real>;
    constexpr int W = V::W;
    // Accumulators as scalars of a fixed-size array fully unrolled (GCC keeps them in registers).
    typename V::reg acc[R][NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
        typename V::reg b = bias != nullptr ? V::load(bias + W * v) : V::zero();
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][v] = b;
    }
    for (int k = 0; k < K; ++k) {
        const Real* b_row = B + (int64_t)(IDX ? idx[k] : k) * W * NV;
        typename V::reg b[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) b[v] = V::load(b_row + W * v);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            typename V::reg a = V::bcast(A + r * lda + k);
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(a, b[v], acc[r][v]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) V::store(C + r * ldc + W * v, acc[r][v]);
}

template <int NV, bool IDX, class Real>
inline void micro_rows(int R, const Real* A, int lda, const Real* B, const int* idx, int K, const Real* bias, Real* C,
                       int ldc) {
    switch (R) {
        case 6: micro<6, NV, IDX>(A, lda, B, idx, K, bias, C, ldc); break;
        case 5: micro<5, NV, IDX>(A, lda, B, idx, K, bias, C, ldc); break;
        case 4: micro<4, NV, IDX>(A, lda, B, idx, K, bias, C, ldc); break;
        case 3: micro<3, NV, IDX>(A, lda, B, idx, K, bias, C, ldc); break;
        case 2: micro<2, NV, IDX>(A, lda, B, idx, K, bias, C, ldc); break;
        case 1: micro<1, NV, IDX>(A, lda, B, idx, K, bias, C, ldc); break;
        default: break;
    }
}

// Rows split into ceil(T / 6) nearly equal blocks (T = 21: 6 + 5 + 5 + 5), so every block keeps
// >= 8 accumulators in flight when it can (FMA latency x throughput).
template <int NV, bool IDX, class Real>
void gemm_panel(const Real* A, int lda, int T, const Real* B, const int* idx, int K, const Real* bias, Real* C,
                int ldc) {
    const int nb = (T + 5) / 6, base = T / nb, rem = T % nb;
    for (int b = 0, t = 0; b < nb; ++b) {
        const int R = base + (b < rem ? 1 : 0);
        micro_rows<NV, IDX>(R, A + (int64_t)t * lda, lda, B, idx, K, bias, C + (int64_t)t * ldc, ldc);
        t += R;
    }
}

#pragma GCC push_options
#pragma GCC target("avx512f")
// One zmm register per row of a packed panel: 16 floats (the fp32 panels of 2 W = 16 columns) or 8 doubles (fp64: 8).
template <class Real>
struct Zmm;
template <>
struct Zmm<float> {
    using reg = __m512;
    static constexpr int W = 16;
    static reg load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
    static reg set1(float v) { return _mm512_set1_ps(v); }
    static reg zero() { return _mm512_setzero_ps(); }
    static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
};
template <>
struct Zmm<double> {
    using reg = __m512d;
    static constexpr int W = 8;
    static reg load(const double* p) { return _mm512_loadu_pd(p); }
    static void store(double* p, reg v) { _mm512_storeu_pd(p, v); }
    static reg set1(double v) { return _mm512_set1_pd(v); }
    static reg zero() { return _mm512_setzero_pd(); }
    static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
};

// The micro-kernel in 512-bit registers: R rows x NP packed panels of Zmm::W columns (one register per panel row;
// panel p starts pstride elements after panel 0). Same accumulation order as micro<> (bias, then k = 0..K-1, one FMA
// each), so the same results bit for bit.
template <int R, int NP, bool IDX, class Real>
inline void micro512(const Real* A, int lda, const Real* B, int64_t pstride, const int* idx, int K, const Real* bias,
                     Real* C, int ldc) {
    using Z = Zmm<Real>;
    typename Z::reg acc[R][NP];
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
        typename Z::reg b = bias != nullptr ? Z::load(bias + Z::W * p) : Z::zero();
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) acc[r][p] = b;
    }
    for (int k = 0; k < K; ++k) {
        const Real* b_row = B + (int64_t)(IDX ? idx[k] : k) * Z::W;
        typename Z::reg b[NP];
#pragma GCC unroll 8
        for (int p = 0; p < NP; ++p) b[p] = Z::load(b_row + p * pstride);
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) {
            typename Z::reg a = Z::set1(A[r * lda + k]);
#pragma GCC unroll 8
            for (int p = 0; p < NP; ++p) acc[r][p] = Z::fmadd(a, b[p], acc[r][p]);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int p = 0; p < NP; ++p) Z::store(C + r * ldc + Z::W * p, acc[r][p]);
}

// Rows in ceil(T / 12) nearly equal blocks (T - 1 = 20: 10 + 10): 2 x 12 accumulators at most, 32 zmm registers.
template <int NP, bool IDX, class Real>
void gemm_panel512(const Real* A, int lda, int T, const Real* B, int64_t pstride, const int* idx, int K,
                   const Real* bias, Real* C, int ldc) {
    const int nb = (T + 11) / 12, base = T / nb, rem = T % nb;
    for (int b = 0, t = 0; b < nb; ++b) {
        const int R = base + (b < rem ? 1 : 0);
        const Real* a = A + (int64_t)t * lda;
        Real* c = C + (int64_t)t * ldc;
        switch (R) {
#define MICRO512_CASE(n) case n: micro512<n, NP, IDX, Real>(a, lda, B, pstride, idx, K, bias, c, ldc); break;
            MICRO512_CASE(12) MICRO512_CASE(11) MICRO512_CASE(10) MICRO512_CASE(9) MICRO512_CASE(8) MICRO512_CASE(7)
            MICRO512_CASE(6) MICRO512_CASE(5) MICRO512_CASE(4) MICRO512_CASE(3) MICRO512_CASE(2) MICRO512_CASE(1)
#undef MICRO512_CASE
            default: break;
        }
        t += R;
    }
}
#pragma GCC pop_options

// C[T, np] = bias + A[T, :K] @ W^T[rows, :] (rows: 0..K-1, or idx[0..K) with IDX; bias nullptr: none); A rows have
// stride lda, W^T (kp rows) is packed in column blocks of 2 W (last may be W; fp32: 16 and 8), each [kp, width].
template <bool IDX, class Real>
void gemm_cols(const Real* A, int lda, int T, int kp, const int* idx, int K, int np, const Real* wpack, const Real* bias,
               Real* C) {
    constexpr int W = Simd<Real>::W;
    const Real* B = wpack;
    int c0 = 0;
    if (g_avx512) {  // the full panels (2 W columns: one zmm) two at a time, then one; a W-wide last one below
        const int64_t ps = (int64_t)kp * 2 * W;
        for (; np - c0 >= 4 * W; c0 += 4 * W, B += 2 * ps)
            gemm_panel512<2, IDX, Real>(A, lda, T, B, ps, idx, K, bias != nullptr ? bias + c0 : nullptr, C + c0, np);
        for (; np - c0 >= 2 * W; c0 += 2 * W, B += ps)
            gemm_panel512<1, IDX, Real>(A, lda, T, B, ps, idx, K, bias != nullptr ? bias + c0 : nullptr, C + c0, np);
    }
    for (int c = c0; c < np; c += 2 * W) {
        const Real* bc = bias != nullptr ? bias + c : nullptr;
        if (np - c >= 2 * W) {
            gemm_panel<2, IDX>(A, lda, T, B, idx, K, bc, C + c, np);
            B += (int64_t)kp * 2 * W;
        } else {
            gemm_panel<1, IDX>(A, lda, T, B, idx, K, bc, C + c, np);
            B += (int64_t)kp * W;
        }
    }
}

// C[T, np] = bias + A[T, :K] @ W^T for one stage; A rows have stride kp.
template <class Real>
void gemm(const Real* A, int T, int kp, int K, int np, const Real* wpack, const Real* bias, Real* C) {
    gemm_cols<false>(A, kp, T, kp, (const int*)nullptr, K, np, wpack, bias, C);
}

// out[np] = m[:K] @ |W|^T for one row m: the packed panels of gemm, with the K loop split four ways so that
// 4 x 2 accumulators hide the FMA latency (a one-row gemm waits ~4 cycles per k).
void gemv_rows1(const float* m, int kp, int K, int np, const float* wpack, float* out) {
    const float* B = wpack;
    for (int c = 0; c < np; c += 16) {
        const int nv = np - c >= 16 ? 2 : 1, w = 8 * nv;
        __m256 acc[4][2];
        for (int u = 0; u < 4; ++u) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
        int k = 0;
        for (; k + 4 <= K; k += 4)
            for (int u = 0; u < 4; ++u) {
                __m256 a = _mm256_broadcast_ss(m + k + u);
                for (int v = 0; v < nv; ++v)
                    acc[u][v] = _mm256_fmadd_ps(a, _mm256_loadu_ps(B + (int64_t)(k + u) * w + 8 * v), acc[u][v]);
            }
        for (; k < K; ++k) {
            __m256 a = _mm256_broadcast_ss(m + k);
            for (int v = 0; v < nv; ++v) acc[0][v] = _mm256_fmadd_ps(a, _mm256_loadu_ps(B + (int64_t)k * w + 8 * v), acc[0][v]);
        }
        for (int v = 0; v < nv; ++v)
            _mm256_storeu_ps(out + c + 8 * v, _mm256_add_ps(_mm256_add_ps(acc[0][v], acc[1][v]),
                                                          _mm256_add_ps(acc[2][v], acc[3][v])));
        B += (int64_t)kp * w;
    }
}

// Statistics of G column blocks (8 outputs each, starting at column c0) of y[T, ld]: std_t(y_k) and
// r2_k = cov_k^2 / (ss_k ll) clamped to [0, 1] (NaN -> 0), stored to st[k], rr[k]; with mid < 0 also
// am[k] = max_t |y_tk| (the rounding scale of uncentred outputs). With mid >= 0 (centred last projection)
// row mid of y is 0 and every other row t holds y_t - y_mid (the bias never enters).
template <int G>
inline void r2_stats(const float* y, int T, int ld, int c0, const float* lam_c, float ll, int mid, float* st,
                     float* rr, float* am) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 s[G], amax[G], ss[G], cov[G], p2[G], inv[G];
    for (int g = 0; g < G; ++g) s[g] = amax[g] = ss[g] = cov[g] = _mm256_setzero_ps();
    for (int t = 0; t < T; ++t) {
        if (t == mid) continue;
        for (int g = 0; g < G; ++g) {
            __m256 v = _mm256_loadu_ps(y + t * ld + c0 + 8 * g);
            s[g] = _mm256_add_ps(s[g], v);
            amax[g] = _mm256_max_ps(amax[g], _mm256_and_ps(v, absmask));
        }
    }
    const __m256 tv = _mm256_set1_ps((float)T);
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    const __m256 expmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7f800000));
    __m256 mean[G];
    for (int g = 0; g < G; ++g) {
        mean[g] = _mm256_div_ps(s[g], tv);
        // scale-free moments (docs/lmn.md, "Accuracy in the corners"): every value divided by 2^floor(log2 max_t |y|) (exact; 1 for 0, denormals,
        // Inf/NaN), so |c| <= 4 and the squares never overflow (they did from |y| ~ 1e19 on: L read 0 or 1)
        p2[g] = _mm256_and_ps(amax[g], expmask);
        __m256 ok = _mm256_and_ps(_mm256_cmp_ps(p2[g], zero, _CMP_GT_OQ), _mm256_cmp_ps(p2[g], expmask, _CMP_LT_OQ));
        p2[g] = _mm256_blendv_ps(one, p2[g], ok);
        inv[g] = _mm256_div_ps(one, p2[g]);
    }
    for (int t = 0; t < T; ++t) {
        __m256 l = _mm256_set1_ps(lam_c[t]);
        for (int g = 0; g < G; ++g) {
            __m256 v = t == mid ? _mm256_setzero_ps() : _mm256_loadu_ps(y + t * ld + c0 + 8 * g);
            __m256 c = _mm256_mul_ps(_mm256_sub_ps(v, mean[g]), inv[g]);
            ss[g] = _mm256_fmadd_ps(c, c, ss[g]);
            cov[g] = _mm256_fmadd_ps(c, l, cov[g]);
        }
    }
    for (int g = 0; g < G; ++g) {
        __m256 r2 = _mm256_div_ps(_mm256_mul_ps(cov[g], cov[g]), _mm256_mul_ps(ss[g], _mm256_set1_ps(ll)));
        _mm256_storeu_ps(rr + c0 + 8 * g, _mm256_min_ps(_mm256_max_ps(r2, zero), one));  // NaN -> 0
        _mm256_storeu_ps(st + c0 + 8 * g, _mm256_mul_ps(_mm256_sqrt_ps(_mm256_div_ps(ss[g], tv)), p2[g]));
        if (mid < 0) _mm256_storeu_ps(am + c0 + 8 * g, amax[g]);
    }
}

// Sum over the first O outputs of r2_k with the constant-path rule (docs/lmn.md, "Policies for the undefined cases"): 1 when std_k <= tol scale_k,
// scale_k = f sc[k] (or min(f sc[k], f2 sc2[k]) when sc2 is given) the rounding scale of output k (centred:
// sum_h |W_kh| m_h, or a bound on it; otherwise max_t |y_tk|). est: sum of min(1, 2 sqrt(r2 (1 - r2)) kappa + kappa^2), kappa = eps scale / std;
// any_const: the rule fired on some output. A larger scale gives a larger est and fires the rule more.
inline double r2_finish(const float* st, const float* rr, const float* sc, float f, const float* sc2, float f2,
                        int O, float tol, float eps, double& est_sum, bool& any_const, const float* sadd = nullptr) {
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), vf = _mm256_set1_ps(f), vf2 = _mm256_set1_ps(f2);
    __m256 total = zero, est = zero, cmask = zero;
    for (int c = 0; c < O; c += 8) {
        __m256 std_t = _mm256_loadu_ps(st + c), r2 = _mm256_loadu_ps(rr + c);
        __m256 scale = _mm256_mul_ps(vf, _mm256_loadu_ps(sc + c));
        if (sc2 != nullptr) scale = _mm256_min_ps(scale, _mm256_mul_ps(vf2, _mm256_loadu_ps(sc2 + c)));
        if (sadd != nullptr) scale = _mm256_add_ps(scale, _mm256_loadu_ps(sadd + c));  // skip term: |u_j - u_i|
        __m256 valid = _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps((float)c)), _mm256_set1_ps((float)O), _CMP_LT_OQ);
        __m256 is_const = _mm256_and_ps(_mm256_cmp_ps(std_t, _mm256_mul_ps(_mm256_set1_ps(tol), scale), _CMP_LE_OQ), valid);
        // error estimate (before the constant rule): kappa = eps scale / std; std == 0 < scale -> inf -> 1
        __m256 kap = _mm256_div_ps(_mm256_mul_ps(_mm256_set1_ps(eps), scale), std_t);
        kap = _mm256_and_ps(kap, _mm256_cmp_ps(scale, zero, _CMP_GT_OQ));  // scale 0: exact, 0
        // r2 (1 - r2) floored at kappa: the computed r2 is itself off by ~kappa
        __m256 q = _mm256_sqrt_ps(_mm256_max_ps(_mm256_mul_ps(r2, _mm256_sub_ps(one, r2)), kap));
        __m256 e = _mm256_fmadd_ps(kap, kap, _mm256_mul_ps(_mm256_add_ps(kap, kap), q));
        e = _mm256_min_ps(e, one);  // NaN (0/0 handled above) -> 1 via min's second operand
        est = _mm256_add_ps(est, _mm256_and_ps(e, valid));
        cmask = _mm256_or_ps(cmask, is_const);
        r2 = _mm256_blendv_ps(r2, one, is_const);
        total = _mm256_add_ps(total, _mm256_and_ps(r2, valid));
    }
    alignas(32) float lanes[8], elanes[8];
    _mm256_store_ps(lanes, total);
    _mm256_store_ps(elanes, est);
    double sum = 0.0, esum = 0.0;
    for (int k = 0; k < 8; ++k) {
        sum += lanes[k];
        esum += elanes[k];
    }
    est_sum = esum;
    any_const = _mm256_movemask_ps(cmask) != 0;
    return sum;
}

// Column statistics of y[T, ld] for the first O outputs (ld a multiple of 8) into st / rr / am.
void r2_stats_all(const float* y, int T, int ld, int O, const float* lam_c, float ll, int mid, float* st, float* rr,
                  float* am) {
    int c = 0;
    for (; c + 32 <= ld && c < O; c += 32) r2_stats<4>(y, T, ld, c, lam_c, ll, mid, st, rr, am);
    for (; c < O; c += 8) r2_stats<1>(y, T, ld, c, lam_c, ll, mid, st, rr, am);
}

// L_ij from the statistics: mean r2 with the constant rule; FLAGGED (-1) when flag_tau > 0 and the mean error
// estimate exceeds it (a NaN estimate too).
inline float r2_value(const float* st, const float* rr, const float* sc, float f, int O, float tol, float eps,
                      float flag_tau) {
    double esum;
    bool any_const;
    const double sum = r2_finish(st, rr, sc, f, nullptr, 0.0f, O, tol, eps, esum, any_const);
    if (flag_tau > 0.0f && !(esum / O <= flag_tau)) return -1.0f;
    return (float)(sum / O);
}

// Interpolation + SiLU for one pair, x[t, :] = silu(z_i + lam_t d) for t < T, without an exp per
// element: e_t = exp(-(z_i + lam_t d)) follows e_{t+1} = e_t q, q = exp(-d / (T - 1)). Two chains,
// forward from e_0 = exp(-z_i) and backward from e_{T-1} = exp(-z_j), so at most T/2 steps each
// (relative error of e_t <~ T/2 ulp, smooth in t). Needs |z| <= CHAIN_ZMAX = 40: every e_t lies between
// e_0 and e_{T-1} and (1 + e_f)(1 + e_b) <= (1 + e^40)^2, so nothing overflows.
// With mid == 0, row 0 holds a_0 = silu(z_i) (szi, precomputed) and every other row a_t - a_0
// (offset-free last GEMM); with mid < 0 the rows hold a_t. scratch: [2 kp] floats.
template <class Real>
void silu_chain(const Real* zi, const Real* d, const Real* ezi, const Real* ezj, const Real* szi,
                const Real* lam, int T, int kp, int mid, Real* scratch, Real* x) {
    using V = Simd<Real>;
    constexpr int W = V::W;
    const typename V::reg one = V::set1(1);
    const typename V::reg inv = V::set1(Real(1) / (Real)(T - 1));
    for (int q = 0; q < kp; q += W) {  // step factors first: independent exps pipeline well
        typename V::reg qf = V::exp(V::mul(V::load(d + q), V::sub(V::zero(), inv)));
        V::store(scratch + q, qf);
        V::store(scratch + kp + q, V::div(one, qf));
    }
    for (int q = 0; q < kp; q += W) {
        typename V::reg vz = V::load(zi + q), vd = V::load(d + q);
        typename V::reg qf = V::load(scratch + q), qb = V::load(scratch + kp + q);
        typename V::reg ef = V::load(ezi + q), eb = V::load(ezj + q);
        typename V::reg am = mid == 0 ? V::load(szi + q) : V::zero();
        int tf = 0, tb = T - 1;
        for (; tf < tb; ++tf, --tb) {
            // one division for both chains: 1/(1+e_f) = (1+e_b) / ((1+e_f)(1+e_b)); e_f e_b = exp(-(z_i + z_j))
            typename V::reg xf = V::fmadd(V::set1(lam[tf]), vd, vz);
            typename V::reg xb = V::fmadd(V::set1(lam[tb]), vd, vz);
            typename V::reg df = V::add(one, ef), db = V::add(one, eb);
            typename V::reg inv_p = V::div(one, V::mul(df, db));
            typename V::reg af = tf == mid ? am : V::sub(V::mul(V::mul(xf, db), inv_p), am);
            typename V::reg ab = tb == mid ? am : V::sub(V::mul(V::mul(xb, df), inv_p), am);
            V::store(x + tf * kp + q, af);
            V::store(x + tb * kp + q, ab);
            ef = V::mul(ef, qf);
            eb = V::mul(eb, qb);
        }
        if (tf == tb) {
            typename V::reg xf = V::fmadd(V::set1(lam[tf]), vd, vz);
            typename V::reg af = V::div(xf, V::add(one, ef));
            V::store(x + tf * kp + q, tf == mid ? am : V::sub(af, am));
        }
    }
}

// ez = exp(-z), sz = silu(z) for [n, kp] and ok[i] = max_h |z_ih| <= CHAIN_ZMAX.
template <class Real>
void precompute_exp(const Real* z, int64_t n, int kp, Real* ez, Real* sz, uint8_t* ok) {
    using V = Simd<Real>;
    for (int64_t i = 0; i < n; ++i) {
        typename V::reg m = V::zero();
        for (int q = 0; q < kp; q += V::W) {
            typename V::reg v = V::load(z + i * kp + q);
            m = V::max(m, V::abs(v));
            typename V::reg e = V::exp(V::sub(V::zero(), v));
            V::store(ez + i * kp + q, e);
            V::store(sz + i * kp + q, V::div(v, V::add(V::set1(1), e)));
        }
        ok[i] = V::hmax(m) <= CHAIN_ZMAX;
    }
}

// Tails ending in an activation (no centring possible): the flag's rounding scale must carry the inner
// layers' rounding through the trailing activations (compute.torch_paths._through / _slope_bound).
// Bound on |act'(x)| from x and a = act(x).
inline float slope_bound(int code, float slope, float x, float a) {
    switch (code) {
        case ACT_IDENTITY: return 1.0f;
        case ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
        case ACT_LEAKY_RELU: return x >= 0.0f ? 1.0f : std::fabs(slope);
        case ACT_SIGMOID: return std::min(0.25f, std::exp(-std::fabs(x)));
        case ACT_TANH: return std::min(1.0f, 4.0f * std::exp(-2.0f * std::fabs(x)));
        default: {  // SiLU, GELU, GELU-tanh: 1.2 above -1, a relative share of |a| in the flat negative tail
            if (x > -1.0f) return 1.2f;
            const float f = code == ACT_SILU ? 1.0f : (code == ACT_GELU ? 2.0f - x : 2.6f + 0.22f * x * x);
            return std::fabs(a) * f;
        }
    }
}

// r[k] = sum_h |W_kh| m_h + |b_k| for the last Linear (wabs: packed |W^T|, bias padded), with
// m_h = max_t |x_th| f_h its input's rounding scale (f_h as the centred path's m_h: 1 + max(|z_ih|, |z_jh|)
// for one stage, else 2). m: scratch [kp].
void trailing_pre_scale(const float* x, int T, int kp, int K, int np, const float* zi, const float* zj, bool one_stage,
                        const float* wabs, const float* bias, float* m, float* r) {
    for (int h = 0; h < kp; ++h) {
        float mh = 0.0f;
        for (int t = 0; t < T; ++t) mh = std::max(mh, std::fabs(x[(int64_t)t * kp + h]));
        m[h] = mh * (one_stage ? 1.0f + std::max(std::fabs(zi[h]), std::fabs(zj[h])) : 2.0f);
    }
    gemv_rows1(m, kp, K, np, wabs, r);
    for (int k = 0; k < np; ++k) r[k] += std::fabs(bias[k]);
}

// Applies the n trailing activations to x [T, ld] (ping-ponging with y; returns the buffer holding the result)
// and carries the rounding scale r[k] of the first O columns through each: r = max_t |act'(x)| r + max_t |a|.
float* trailing_acts(float* x, float* y, int T, int ld, int O, const int* codes, const float* slopes, int n, float* r) {
    for (int c = 0; c < n; ++c) {
        std::copy(x, x + (int64_t)T * ld, y);
        apply_acts(y, (int64_t)T * ld, codes + c, slopes + c, 1);
        for (int k = 0; k < O; ++k) {
            float d = 0.0f, own = 0.0f;
            for (int t = 0; t < T; ++t) {
                const float xv = x[(int64_t)t * ld + k], av = y[(int64_t)t * ld + k];
                d = std::max(d, slope_bound(codes[c], slopes[c], xv, av));
                own = std::max(own, std::fabs(av));
            }
            r[k] = d * r[k] + own;
        }
        std::swap(x, y);
    }
    return x;
}

// Below the smallest normal float an exp-based unit keeps no relative accuracy (and exp256 clamps its argument):
// its absolute error is up to FLT_MIN |x|, i.e. kFloor |x| in units of eps (added to the rounding scale of smooth units).
constexpr float kFloor = 1.1754944e-38f / 1.1920929e-7f;

// Rounding scale m_h (units of eps) of the input of the centred last Linear of a one-stage tail, from
// m = max_t |a_th| and the path's ends z_i, z_j (x_t = z_i + lam_t (z_j - z_i), absolute error <= eps R, R = max |z|):
//   m_h = m (2 + G(lo)) + s R + kFloor (1 + R) [smooth units],  lo = min(z_i, z_j, 0)
// its own rounding (relative: 2 m; the exp/erfc argument's rounding grows it by G on the negative side: SiLU,
// sigmoid, tanh |x|, GELU x^2, GELU-tanh 1.6 |x| + 0.072 |x|^3), plus the input's absolute rounding through the unit's
// largest slope s on the path (SiLU/GELU 1.2; sigmoid 1/4; tanh 1; ReLU 1 if the path reaches x > 0, else 0 (a
// dead unit is exactly 0); LeakyReLU max(1, |slope|)). Homogeneous of degree 1 in the scale of z (docs/lmn.md, "Accuracy in the corners": the old
// m (1 + R) grew like its square and flagged or zeroed every pair at large weights).
inline __m256 first_stage_scale(__m256 m, __m256 zi, __m256 zj, int code, float slope) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 R = _mm256_max_ps(_mm256_and_ps(zi, absmask), _mm256_and_ps(zj, absmask));
    const __m256 nl = _mm256_max_ps(_mm256_sub_ps(zero, _mm256_min_ps(zi, zj)), zero);  // |lo|
    __m256 G = zero, s;
    bool smooth = true;
    switch (code) {
        case ACT_RELU:
        case ACT_LEAKY_RELU: {
            // piecewise linear: a unit that keeps its sign along the path is exactly linear there (a_t - a_0 =
            // lam_t d up to the rounding of x_t, eps |x_t| <= eps m / min(1, |slope|)), and a dead ReLU is exactly 0.
            // A unit crossing its kink: x_t = fma(lam_t, d~, z_i), d~ = d (1 + delta), errs by eps |x_t| per point plus
            // lam_t d delta, which on the live side is delta (a_t - a_0) (the signal itself, harmless) plus a step
            // delta z_i: its nonlinear part is at most eps |z_i| (z_i: the t = 0 end, the centring's reference).
            const __m256 cross = _mm256_cmp_ps(_mm256_mul_ps(zi, zj), zero, _CMP_LT_OQ);
            const float k = code == ACT_RELU ? 1.0f : std::max(1.0f, std::fabs(slope));
            s = _mm256_and_ps(_mm256_set1_ps(k), cross);
            const __m256 span = _mm256_and_ps(zi, absmask);
            // LeakyReLU(0) is ReLU: the same bound (the division below would make it infinite)
            const float own = code == ACT_RELU || slope == 0.0f ? 2.0f : 2.0f / std::min(1.0f, std::fabs(slope));
            return _mm256_fmadd_ps(m, _mm256_set1_ps(own), _mm256_mul_ps(s, span));
        }
        case ACT_IDENTITY: s = one; smooth = false; break;
        case ACT_SIGMOID: G = nl; s = _mm256_set1_ps(0.25f); break;
        case ACT_TANH: G = nl; s = one; break;
        case ACT_GELU: G = _mm256_mul_ps(nl, nl); s = _mm256_set1_ps(1.2f); break;
        case ACT_GELU_TANH:
            G = _mm256_mul_ps(nl, _mm256_fmadd_ps(_mm256_set1_ps(0.072f), _mm256_mul_ps(nl, nl), _mm256_set1_ps(1.6f)));
            s = _mm256_set1_ps(1.2f);
            break;
        default: G = nl; s = _mm256_set1_ps(1.2f); break;  // SiLU
    }
    // G overflows fp32 from |lo| ~ 1.8e19 (GELU x^2; GELU-tanh x^3 from ~1.6e12), where such a unit is exactly 0: m G
    // was 0 * inf = NaN, the scale NaN and the pair neither flagged nor constant (r2 0 / 0 read 0; found by the fuzz run)
    G = _mm256_min_ps(G, _mm256_set1_ps(3.4028235e38f));
    __m256 mv = _mm256_fmadd_ps(m, _mm256_add_ps(_mm256_set1_ps(2.0f), G), _mm256_mul_ps(s, R));
    if (smooth) mv = _mm256_fmadd_ps(_mm256_set1_ps(kFloor), _mm256_add_ps(one, R), mv);
    return mv;
}

// ---------------------------------------------------------------------------------------------
// One ReLU stage, centred (a lowered transformer MLP, or a depth-1 ReLU tail): ReLU is linear on each side of 0 and
// the path x_t = z_i + lam_t d is a segment, so a hidden unit with both ends <= 0 is 0 along the whole path, one with
// both ends > 0 is exactly z_i + lam_t d (its centred contribution lam_t W_k d_h enters like the skip term), and only
// the units whose ends differ in sign ("crossing") need the [T, K] GEMM. Exact; the rounding scale m_h, the flags
// and the constant rule are those of the general centred path (first_stage_scale for ReLU, with m = max_t relu(x_t),
// which is at an end of the segment).

// C[T, np] = A[T, :K] @ W^T[idx[0..K), :] (no bias): the GEMM of gemm() over the rows idx of the packed W^T.
void gemm_idx(const float* A, int lda, int T, int kp, const int* idx, int K, int np, const float* wpack, float* C) {
    gemm_cols<true, float>(A, lda, T, kp, idx, K, np, wpack, nullptr, C);
}

// out[np] = sum_k v[k] W^T[idx[k], :] (the linear units' slope W d), four accumulators per column vector.
void gemv_idx(const float* v, const int* idx, int K, int kp, int np, const float* wpack, float* out) {
    const float* B = wpack;
    for (int c = 0; c < np; c += 16) {
        const int nv = np - c >= 16 ? 2 : 1, w = 8 * nv;
        __m256 acc[4][2];
        for (int u = 0; u < 4; ++u) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
        int k = 0;
        for (; k + 4 <= K; k += 4)
            for (int u = 0; u < 4; ++u) {
                const __m256 a = _mm256_broadcast_ss(v + k + u);
                const float* row = B + (int64_t)idx[k + u] * w;
                for (int q = 0; q < nv; ++q) acc[u][q] = _mm256_fmadd_ps(a, _mm256_loadu_ps(row + 8 * q), acc[u][q]);
            }
        for (; k < K; ++k) {
            const __m256 a = _mm256_broadcast_ss(v + k);
            const float* row = B + (int64_t)idx[k] * w;
            for (int q = 0; q < nv; ++q) acc[0][q] = _mm256_fmadd_ps(a, _mm256_loadu_ps(row + 8 * q), acc[0][q]);
        }
        for (int q = 0; q < nv; ++q)
            _mm256_storeu_ps(out + c + 8 * q, _mm256_add_ps(_mm256_add_ps(acc[0][q], acc[1][q]),
                                                            _mm256_add_ps(acc[2][q], acc[3][q])));
        B += (int64_t)kp * w;
    }
}

struct ReluWork {  // one thread's buffers of relu_pair
    std::vector<float> a, y, dl, lin, mvec, scvec, st, rr, am, du, adu;
    std::vector<int> cross, linear;
    ReluWork(int T, int kp, int np) : a((size_t)T * kp + 8), y((size_t)T * np + 8), dl(kp + 8), lin(np + 8),
        mvec(kp + 8, 0.0f), scvec(np + 8, 0.0f), st(np + 8, 0.0f), rr(np + 8, 0.0f), am(np + 8, 0.0f),
        du(np + 8, 0.0f), adu(np + 8, 0.0f), cross(kp), linear(kp) {}
};

// L_ij of one pair through act = ReLU, one stage, centred (see above).
float relu_pair(const Problem& p, int64_t i, int64_t j, ReluWork& w) {
    const int T = p.T, kp = p.kp[0], K = p.kin[0], np = p.np[0], O = p.out_dim;
    const float* zi = p.z + i * kp;
    const float* zj = p.z + j * kp;
    const __m256 zero = _mm256_setzero_ps();
    __m256 mmax = zero, m2 = zero;
    int nc = 0, nl = 0;
    for (int q = 0; q < kp; q += 8) {
        const __m256 a = _mm256_loadu_ps(zi + q), b = _mm256_loadu_ps(zj + q);
        // rounding scale of unit h: the general centred path's first-stage scale for ReLU (first_stage_scale, with
        // m = max_t relu(x_t), at an end of the segment); padding units are 0. The flags and the constant rule must not
        // depend on the path.
        const __m256 mv = first_stage_scale(_mm256_max_ps(_mm256_max_ps(a, b), zero), a, b, ACT_RELU, 0.0f);
        _mm256_storeu_ps(&w.mvec[q], mv);
        mmax = _mm256_max_ps(mmax, mv);
        m2 = _mm256_fmadd_ps(mv, mv, m2);
        const int pa = _mm256_movemask_ps(_mm256_cmp_ps(a, zero, _CMP_GT_OQ));
        const int pb = _mm256_movemask_ps(_mm256_cmp_ps(b, zero, _CMP_GT_OQ));
        int both = pa & pb, cr = pa ^ pb;
        while (both) {
            const int l = __builtin_ctz(both);
            both &= both - 1;
            if (q + l < K) w.linear[nl++] = q + l;
        }
        while (cr) {
            const int l = __builtin_ctz(cr);
            cr &= cr - 1;
            if (q + l < K) w.cross[nc++] = q + l;
        }
    }
    alignas(32) float lanes[8], l2[8];
    _mm256_store_ps(lanes, mmax);
    _mm256_store_ps(l2, m2);
    const float mmax_s = *std::max_element(lanes, lanes + 8);
    const float m2_s = ((l2[0] + l2[1]) + (l2[2] + l2[3])) + ((l2[4] + l2[5]) + (l2[6] + l2[7]));
    // slope of the path through the linear units (and the skip term): lin_k = sum_{h linear} W_kh d_h + u_j - u_i
    for (int k = 0; k < nl; ++k) w.dl[k] = zj[w.linear[k]] - zi[w.linear[k]];
    gemv_idx(w.dl.data(), w.linear.data(), nl, kp, np, p.wpack[0], w.lin.data());
    const float* sadd = nullptr;
    if (p.U != nullptr) {
        for (int k = 0; k < O; ++k) {
            w.du[k] = (float)(p.U[j * O + k] - p.U[i * O + k]);
            w.adu[k] = std::fabs(w.du[k]);
            w.lin[k] += w.du[k];
        }
        sadd = w.adu.data();
    }
    // crossing units: rows t >= 1 hold relu(x_t) - relu(z_i); row 0, the reference, is neither computed nor read
    const int lda = (nc + 7) / 8 * 8;
    float* a = w.a.data();
    for (int c = 0; c < nc; ++c) {
        const int h = w.cross[c];
        const float z0 = zi[h], dh = zj[h] - zi[h], a0 = std::max(z0, 0.0f);
        for (int t = 1; t < T; ++t) a[(int64_t)t * lda + c] = std::max(std::fma(p.lam[t], dh, z0), 0.0f) - a0;
    }
    float* y = w.y.data();
    if (nc > 0) {
        gemm_idx(a + lda, lda, T - 1, kp, w.cross.data(), nc, np, p.wpack[0], y + np);
    } else {
        std::fill(y, y + (int64_t)T * np, 0.0f);
    }
    for (int t = 1; t < T; ++t) {
        const __m256 l = _mm256_set1_ps(p.lam[t]);
        for (int k = 0; k < np; k += 8)
            _mm256_storeu_ps(y + (int64_t)t * np + k,
                             _mm256_fmadd_ps(l, _mm256_loadu_ps(&w.lin[k]), _mm256_loadu_ps(y + (int64_t)t * np + k)));
    }
    r2_stats_all(y, T, np, O, p.lam_c, p.ll, 0, w.st.data(), w.rr.data(), w.am.data());
    const float tol = p.const_rtol * p.eps;
    double esum;
    bool any_const;
    const double sum = r2_finish(w.st.data(), w.rr.data(), p.wnorm, mmax_s * 1.0001f, p.wnorm + np + 8,
                                 std::sqrt(m2_s) * 1.0001f, O, tol, p.eps, esum, any_const, sadd);
    if (!any_const && (p.flag_tau <= 0.0f || esum / O <= p.flag_tau)) return (float)(sum / O);
    gemv_rows1(w.mvec.data(), kp, K, np, p.wabs, w.scvec.data());
    if (sadd != nullptr)
        for (int k = 0; k < O; ++k) w.scvec[k] += sadd[k];
    return r2_value(w.st.data(), w.rr.data(), w.scvec.data(), 1.0f, O, tol, p.eps, p.flag_tau);
}

void run_rows(const Problem& p, std::atomic<int64_t>* next_row) {
    const int T = p.T, S = p.n_stages, kp0 = p.kp[0];
    int width = kp0;
    for (int s = 0; s < S; ++s) width = std::max(width, p.np[s]);
    std::vector<float> buf_a((size_t)T * width + 8), buf_b((size_t)T * width + 8), d(kp0);
    std::vector<float> zero_bias(width, 0.0f), scratch(2 * (size_t)kp0);
    std::vector<float> mvec(width + 8, 0.0f), scvec(width + 8, 0.0f);
    std::vector<float> st(width + 8, 0.0f), rr(width + 8, 0.0f), am(width + 8, 0.0f);  // per-output statistics
    std::vector<float> du(width + 8, 0.0f), adu(width + 8, 0.0f);  // skip term u_j - u_i and |u_j - u_i|
    float mmax_s = 0.0f, m2_s = 0.0f;  // max_h m_h and |m|_2 of the last pair (centred path)
    const int wn2_off = p.np[S - 1] + 8;  // wnorm holds sum_h |W_kh| then sqrt(sum_h W_kh^2)
    // Offset-free last projection (no trailing activation): rows t != mid of its input become
    // a_t - a_mid and the bias is left out, so y_t - y_mid comes out of the GEMM without the
    // cancellation of a large common offset (fp32 accuracy when std_t(y) << |y|).
    const bool centred = p.act_off[S + 1] == p.act_off[S];
    const int mid = centred ? 0 : -1;  // reference row
    const bool silu1 = p.act_off[1] - p.act_off[0] == 1 && p.act_code[p.act_off[0]] == ACT_SILU;
    const float tol = p.const_rtol * p.eps;
    const int u0_code = p.act_off[1] > p.act_off[0] ? p.act_code[p.act_off[1] - 1] : ACT_IDENTITY;
    const float u0_slope = p.act_off[1] > p.act_off[0] ? p.act_slope[p.act_off[1] - 1] : 0.0f;
    // one ReLU stage, centred: only the units crossing 0 go through the GEMM (relu_pair)
    const bool relu1 = S == 1 && centred && p.act_off[1] - p.act_off[0] == 1 && p.act_code[p.act_off[0]] == ACT_RELU;
    std::unique_ptr<ReluWork> rw(relu1 ? new ReluWork(T, kp0, p.np[0]) : nullptr);
    for (;;) {
        int64_t i = next_row->fetch_add(1);
        if (i >= p.n - 1) break;
        const float* zi = p.z + i * kp0;
        if (relu1) {
            for (int64_t j = i + 1; j < p.n; ++j) p.L[i * p.n + j] = relu_pair(p, i, j, *rw);
            continue;
        }
        for (int64_t j = i + 1; j < p.n; ++j) {
            const float* zj = p.z + j * kp0;
            for (int q = 0; q < kp0; q += 8)
                _mm256_storeu_ps(&d[q], _mm256_sub_ps(_mm256_loadu_ps(zj + q), _mm256_loadu_ps(zi + q)));
            float* x = buf_a.data();
            float* y = buf_b.data();
            const int* codes = p.act_code + p.act_off[0];
            const float* slopes = p.act_slope + p.act_off[0];
            const int n0 = p.act_off[1] - p.act_off[0];
            bool pre_centred = false;  // rows already hold a_t - a_mid
            if (n0 == 1 && codes[0] == ACT_SILU && p.ez != nullptr && p.ez_ok[i] && p.ez_ok[j]) {
                silu_chain(zi, d.data(), p.ez + i * kp0, p.ez + j * kp0, p.sz + i * kp0, p.lam, T, kp0,
                           S == 1 ? mid : -1, scratch.data(), x);
                pre_centred = S == 1 && mid >= 0;
            } else if (n0 == 1 && codes[0] == ACT_SILU) {  // fused interpolation + SiLU
                for (int t = 0; t < T; ++t) {
                    __m256 l = _mm256_set1_ps(p.lam[t]);
                    for (int q = 0; q < kp0; q += 8) {
                        __m256 v = _mm256_fmadd_ps(l, _mm256_loadu_ps(&d[q]), _mm256_loadu_ps(zi + q));
                        _mm256_storeu_ps(x + t * kp0 + q, _mm256_mul_ps(v, sigmoid256(v)));
                    }
                }
            } else {
                for (int t = 0; t < T; ++t) {
                    __m256 l = _mm256_set1_ps(p.lam[t]);
                    for (int q = 0; q < kp0; q += 8)
                        _mm256_storeu_ps(x + t * kp0 + q,
                                         _mm256_fmadd_ps(l, _mm256_loadu_ps(&d[q]), _mm256_loadu_ps(zi + q)));
                }
                apply_acts(x, (int64_t)T * kp0, codes, slopes, n0);
            }
            for (int s = 0; s < S; ++s) {
                if (s > 0)
                    apply_acts(x, (int64_t)T * p.kp[s], p.act_code + p.act_off[s], p.act_slope + p.act_off[s],
                               p.act_off[s + 1] - p.act_off[s]);
                if (s == S - 1 && centred) {
                    const int kp = p.kp[s];
                    const float* xm = x + mid * kp;
                    // m_h: rounding scale of input h of the last Linear, max_t |a_th| (|a_0| + max |a_t - a_0|
                    // when the rows already hold differences), times (1 + max(|z_i|, |z_j|)) for a single
                    // stage (the input's rounding amplified by x act'(x), see compute.torch_paths._through)
                    // or 2 for deeper tails. The scale of output k is sum_h |W_kh| m_h (computed below only
                    // when the bound max_h m_h sum_h |W_kh| does not already clear the pair).
                    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
                    const __m256 zero8 = _mm256_setzero_ps();
                    __m256 mmax = zero8, m2 = zero8;
                    for (int q = 0; q < kp; q += 8) {
                        __m256 vzi = _mm256_loadu_ps(zi + q), vzj = _mm256_loadu_ps(zj + q);
                        __m256 m;
                        if (pre_centred) {
                            // SiLU chain, one stage: m = max_t |a_t| (as the other paths compute it) without a
                            // pass over the T rows. |silu| falls from x = -inf to SiLU's minimum (x* = -1.2785,
                            // silu = -0.2785), rises to 0 at x = 0 and grows after it, so on the segment [z_i, z_j]
                            // it peaks at an end, or at x* when the segment crosses it (0.2785). It was
                            // |a_0| + max_t |a_t - a_0|, up to twice that: 3.10% of the default N=961 tail's pairs
                            // were flagged for fp64, 0.60% now (benchmarks/RESULTS.md).
                            __m256 a0 = _mm256_loadu_ps(p.sz + i * kp0 + q), aj = _mm256_loadu_ps(p.sz + j * kp0 + q);
                            const __m256 xstar = _mm256_set1_ps(-1.2784645f);
                            __m256 cross = _mm256_and_ps(_mm256_cmp_ps(_mm256_min_ps(vzi, vzj), xstar, _CMP_LT_OQ),
                                                         _mm256_cmp_ps(xstar, _mm256_max_ps(vzi, vzj), _CMP_LT_OQ));
                            m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(a0, absmask), _mm256_and_ps(aj, absmask)),
                                              _mm256_and_ps(_mm256_set1_ps(0.2784646f), cross));
                        } else {
                            m = _mm256_setzero_ps();
                            for (int t = 0; t < T; ++t) {
                                if (t == mid) continue;
                                m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + t * kp + q), absmask));
                            }
                            m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xm + q), absmask));
                        }
                        __m256 mv;
                        if (S == 1 && silu1) {
                            // SiLU: |x silu'(x)| <= 1.1 |x| <= 2.2 |a| for x >= 0; for x < 0 it is at most
                            // g(x) = |silu(x)| (1 + |x|), unimodal with its peak (0.72) at x = -1.85, so its max
                            // over the path's negative part is g at the point xn of [lo, min(hi, 0)] nearest
                            // -1.85: an end of the path (silu(z) precomputed in sz) or -1.85 itself, no exp.
                            __m256 lo = _mm256_min_ps(vzi, vzj), hi = _mm256_min_ps(_mm256_max_ps(vzi, vzj), zero8);
                            __m256 xn = _mm256_min_ps(_mm256_max_ps(_mm256_set1_ps(-1.85f), lo), hi);
                            __m256 sx;  // |silu(xn)|
                            if (p.sz != nullptr) {
                                __m256 si = _mm256_loadu_ps(p.sz + i * kp0 + q), sj = _mm256_loadu_ps(p.sz + j * kp0 + q);
                                __m256 i_lo = _mm256_cmp_ps(vzi, vzj, _CMP_LE_OQ);
                                __m256 s_lo = _mm256_blendv_ps(sj, si, i_lo), s_hi = _mm256_blendv_ps(si, sj, i_lo);
                                sx = _mm256_blendv_ps(_mm256_set1_ps(-0.25136486f), s_lo,
                                                      _mm256_cmp_ps(xn, lo, _CMP_EQ_OQ));   // xn = lo
                                sx = _mm256_blendv_ps(sx, s_hi, _mm256_and_ps(_mm256_cmp_ps(xn, hi, _CMP_EQ_OQ),
                                                                              _mm256_cmp_ps(xn, lo, _CMP_NEQ_OQ)));  // xn = hi < -1.85
                                sx = _mm256_and_ps(sx, absmask);
                            } else {
                                sx = _mm256_and_ps(_mm256_mul_ps(xn, sigmoid256(xn)), absmask);
                            }
                            __m256 g = _mm256_mul_ps(sx, _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(xn, absmask)));
                            g = _mm256_and_ps(g, _mm256_cmp_ps(lo, zero8, _CMP_LT_OQ));
                            mv = _mm256_fmadd_ps(m, _mm256_set1_ps(2.2f), g);
                            mv = _mm256_fmadd_ps(_mm256_set1_ps(kFloor), _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_max_ps(
                                _mm256_and_ps(vzi, absmask), _mm256_and_ps(vzj, absmask))), mv);
                        } else if (S == 1) {
                            mv = first_stage_scale(m, vzi, vzj, u0_code, u0_slope);
                        } else {
                            mv = _mm256_mul_ps(m, _mm256_set1_ps(2.0f));
                        }
                        _mm256_storeu_ps(&mvec[q], mv);
                        mmax = _mm256_max_ps(mmax, mv);
                        m2 = _mm256_fmadd_ps(mv, mv, m2);
                    }
                    alignas(32) float lanes[8], l2[8];
                    _mm256_store_ps(lanes, mmax);
                    _mm256_store_ps(l2, m2);
                    mmax_s = *std::max_element(lanes, lanes + 8);
                    m2_s = ((l2[0] + l2[1]) + (l2[2] + l2[3])) + ((l2[4] + l2[5]) + (l2[6] + l2[7]));
                    // |m|_2 >= max_h m_h: a sum of squares below that underflowed (tiny m_h: the floor of units
                    // below FLT_MIN; docs/lmn.md, "Accuracy in the corners"); then |m|_2 <= sqrt(K) max_h m_h
                    m2_s = m2_s < 1e-30f ? mmax_s * std::sqrt((float)p.kin[s]) : std::max(std::sqrt(m2_s), mmax_s);
                    for (int t = 0; t < T && !pre_centred; ++t) {
                        if (t == mid) continue;
                        for (int q = 0; q < kp; q += 8)
                            _mm256_storeu_ps(x + t * kp + q,
                                             _mm256_sub_ps(_mm256_loadu_ps(x + t * kp + q), _mm256_loadu_ps(xm + q)));
                    }
                    // row mid (= 0) of y is never read (r2_stats takes it as 0): the GEMM skips it, as the fp64 kernel does
                    gemm(x + kp, T - 1, kp, p.kin[s], p.np[s], p.wpack[s], zero_bias.data(), y + p.np[s]);
                    if (p.U != nullptr) {
                        // skip term, exact and linear in lam: row t (centred on row 0) gains lam_t (u_j - u_i); the
                        // difference is taken in float64 (no cancellation of a large common u), rounded once.
                        const int O = p.out_dim, ldy = p.np[s];
                        for (int k = 0; k < O; ++k) {
                            du[k] = (float)(p.U[j * O + k] - p.U[i * O + k]);
                            adu[k] = std::fabs(du[k]);
                        }
                        for (int t = 0; t < T; ++t) {
                            if (t == mid) continue;
                            const float l = p.lam[t];
                            for (int k = 0; k < O; ++k) y[(int64_t)t * ldy + k] += l * du[k];
                        }
                    }
                } else {
                    if (s == S - 1)  // trailing activations: the last Linear's output rounding scale into scvec
                        trailing_pre_scale(x, T, p.kp[s], p.kin[s], p.np[s], zi, zj, S == 1, p.wabs, p.bias[s],
                                           mvec.data(), scvec.data());
                    gemm(x, T, p.kp[s], p.kin[s], p.np[s], p.wpack[s], p.bias[s], y);
                }
                std::swap(x, y);
            }
            if (!centred)
                x = trailing_acts(x, y, T, p.np[S - 1], p.out_dim, p.act_code + p.act_off[S], p.act_slope + p.act_off[S],
                                  p.act_off[S + 1] - p.act_off[S], scvec.data());
            r2_stats_all(x, T, p.np[S - 1], p.out_dim, p.lam_c, p.ll, mid, st.data(), rr.data(), am.data());
            float v;
            if (centred) {
                // First with the bound scale_k <= min(max_h m_h sum_h |W_kh|, |m|_2 |W_k|_2) (wnorm: both norms of
                // the rows of W; Cauchy-Schwarz; 1e-4 covers the rounding of both sides): a larger scale only raises the estimate and fires the constant rule more, so a pair it
                // clears (no constant output, estimate <= flag_tau) has the same L_ij with the exact scale.
                double esum;
                bool any_const;
                const float* sadd = p.U != nullptr ? adu.data() : nullptr;  // the skip term's rounding scale
                const double sum = r2_finish(st.data(), rr.data(), p.wnorm, mmax_s * 1.0001f, p.wnorm + wn2_off,
                                             m2_s * 1.0001f, p.out_dim, tol, p.eps, esum, any_const, sadd);
                if (!any_const && (p.flag_tau <= 0.0f || esum / p.out_dim <= p.flag_tau)) {
                    v = (float)(sum / p.out_dim);
                } else {
                    gemv_rows1(mvec.data(), p.kp[S - 1], p.kin[S - 1], p.np[S - 1], p.wabs, scvec.data());
                    if (sadd != nullptr)
                        for (int k = 0; k < p.out_dim; ++k) scvec[k] += adu[k];
                    v = r2_value(st.data(), rr.data(), scvec.data(), 1.0f, p.out_dim, tol, p.eps, p.flag_tau);
                }
            } else {  // trailing activations: the scale carried through them (trailing_acts)
                v = r2_value(st.data(), rr.data(), scvec.data(), 1.0f, p.out_dim, tol, p.eps, p.flag_tau);
            }
            p.L[i * p.n + j] = v;  // lower triangle mirrored after the join (no false sharing)
        }
    }
}

// A worker never lets an exception escape a std::thread (that is std::terminate, i.e. SIGABRT): it
// records the failure and stops taking rows; the others stop at their next row.
void run_rows_safe(const Problem& p, std::atomic<int64_t>* next_row) {
    try {
        run_rows(p, next_row);
    } catch (...) {
        p.error->store(1);
        next_row->store(p.n);  // no more rows for anyone
    }
}


// ---------------------------------------------------------------------------------------------
// fp64 kernel: the whole connectivity matrix of a float64 model (rows shared between threads as in the fp32
// kernel) and core's recompute of a list of pairs the fp32 kernel flagged, through one per-pair function.
// The algebra of compute.torch_paths._pairs_values in float64: the last projection centred (rows 1..T-1 of its
// input hold a_t - a_0, so the bias and a common offset never enter; its row 0 is 0 and the GEMM skips it),
// stable activations (a saturating one before the last Linear taken offset free), the constant-path rule on
// the same rounding scale. No flags: fp64 meets its own contract (docs/lmn.md). The default tail runs the
// fp32 kernel's SiLU exp chain and its register-blocked GEMM, instantiated for double.

struct Pairs64 {
    int64_t n_pairs;            // pair-list mode: L of the pairs (pi[q], pj[q]) into out[q]
    const int64_t* pi;          // nullptr: matrix mode, every pair i < j of the n rows into out[n, n]
    const int64_t* pj;
    int64_t n;                  // rows of z
    int T;
    int n_stages;
    const int* kp;              // [S] padded input width of stage s (multiple of 4): row stride of its input
    const int* kin;             // [S] true input width of stage s (the GEMM's K)
    const int* np;              // [S] padded output width of stage s (multiple of 4)
    const double* const* wpack; // [S] packed W_s^T: column blocks of 8 (last may be 4), each [kp, w]
    const double* const* bias;  // [S] padded bias [np] (zeros when the Linear has none)
    const int* act_off;         // as in Problem
    const int* act_code;
    const double* act_slope;    // leaky_relu slopes in float64 (0.01 is not a float32 number)
    int out_dim;                // O (unpadded)
    const double* z;            // [n, kp[0]] absorbed, zero padded
    const double* lam;          // [T]
    const double* lam_c;        // [T]
    double ll;                  // sum lam_c^2
    double eps;                 // float64 epsilon (constant-path rule)
    double const_rtol;
    double* out;                // [n_pairs] or [n, n]
    const double* wabs;         // packed |W_S^T| of the last stage
    const double* wsum;         // [np[S-1]] sum_h |W_S[k, h]| (zero padded)
    const double* ez;           // [n, kp[0]] exp(-z), silu(z), max |z_i| <= CHAIN_ZMAX (SiLU chain) or nullptr
    const double* sz;
    const uint8_t* ez_ok;
    const double* U;            // [n, out_dim] skip term u_i (centred tails only) or nullptr
};

inline double sigmoid64(double x) {  // through e^{-|x|}: no overflow, relative accuracy for both signs
    if (x >= 0.0) return 1.0 / (1.0 + std::exp(-x));
    const double e = std::exp(x);
    return e / (1.0 + e);
}

inline double act64(double x, int code, double slope) {
    switch (code) {
        case ACT_SILU: return x * sigmoid64(x);
        case ACT_RELU: return x > 0.0 ? x : 0.0;
        case ACT_SIGMOID: return sigmoid64(x);
        case ACT_TANH: return std::tanh(x);
        case ACT_LEAKY_RELU: return x >= 0.0 ? x : slope * x;
        case ACT_GELU_TANH: return x * sigmoid64(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x));
        case ACT_GELU: return 0.5 * x * std::erfc(-x * 0.7071067811865476);
        default: return x;
    }
}

// act(x) - c, c the constant a saturating activation reaches on ref's side (_tail.torch_offset_free)
inline double offset_free64(int code, double x, double ref) {
    if (code == ACT_SIGMOID) return ref > 0.0 ? -sigmoid64(-x) : sigmoid64(x);
    if (ref > 0.0) return -2.0 * sigmoid64(-2.0 * x);  // tanh
    if (ref < 0.0) return 2.0 * sigmoid64(2.0 * x);
    return std::tanh(x);
}

inline bool smooth64(int code) {
    return code == ACT_SILU || code == ACT_SIGMOID || code == ACT_TANH || code == ACT_GELU || code == ACT_GELU_TANH;
}

// Activations in place on count doubles (SiLU and ReLU 4 lanes at a time, the others through the C library).
void apply_acts64(double* x, int64_t count, const int* codes, const double* slopes, int n_acts) {
    for (int a = 0; a < n_acts; ++a) {
        const int code = codes[a];
        if (code == ACT_IDENTITY) continue;
        int64_t e = 0;
        if (code == ACT_SILU || code == ACT_RELU)
            for (; e + 4 <= count; e += 4) {
                const __m256d v = _mm256_loadu_pd(x + e);
                _mm256_storeu_pd(x + e, code == ACT_SILU ? silu256d(v) : _mm256_max_pd(v, _mm256_setzero_pd()));
            }
        for (; e < count; ++e) x[e] = act64(x[e], code, slopes[a]);
    }
}

struct Work64 {  // one thread's buffers
    std::vector<double> xa, xb, d, scratch, mv, sc, st, rr, am, zero, adu;
    explicit Work64(const Pairs64& p) {
        int width = p.kp[0];
        for (int s = 0; s < p.n_stages; ++s) width = std::max(width, std::max(p.kp[s], p.np[s]));
        xa.assign((size_t)p.T * width + 8, 0.0);
        xb.assign((size_t)p.T * width + 8, 0.0);
        d.assign(p.kp[0], 0.0);
        scratch.assign(2 * (size_t)p.kp[0], 0.0);
        for (auto* v : {&mv, &sc, &st, &rr, &am, &zero, &adu}) v->assign(width + 8, 0.0);
    }
};

// Below the smallest normal double exp-based units keep no relative accuracy (exp256d clamps at -708): absolute
// error up to DBL_MIN |x|, kFloor64 |x| in units of eps.
constexpr double kFloor64 = 2.2250738585072014e-308 / 2.220446049250313e-16;

// g(x) of the rounding scale |a| (1 + g(x)) of a smooth unit: |x act'(x)| / |a| plus the exp/erfc argument's rounding.
// Homogeneous (docs/lmn.md, "Accuracy in the corners"): for x >= 0 a non-saturating unit is ~x and g = 1.2 (it was |x|, so the scale grew like x^2
// and the constant rule fired on every pair at large weights); on the negative side SiLU |x|, GELU x^2, GELU-tanh
// 1.6 |x| + 0.072 |x|^3; saturating units (taken offset free, exponentially small) |x| on both sides.
inline double rounding_gain64(int code, double x, bool sat) {
    const double ax = std::fabs(x);
    if (sat) return ax;
    if (x >= 0.0) return 1.2;
    if (code == ACT_GELU) return x * x;
    if (code == ACT_GELU_TANH) return ax * (1.6 + 0.072 * x * x);
    return ax;
}

// The input of the centred last projection (stage s) from x[T, kp] (its input before its activations), into
// a: row 0 a_0, rows t >= 1 a_t - a_0. mv[h] = max_t |a_th| (1 + g(x_th)), compute.torch_paths._through.
// Returns max_h mv[h].
double centre_last64(const Pairs64& p, int s, double* x, double* a, double* mv) {
    const int T = p.T, K = p.kin[s], kp = p.kp[s];
    const int* codes = p.act_code + p.act_off[s];
    const double* slopes = p.act_slope + p.act_off[s];
    const int na = p.act_off[s + 1] - p.act_off[s];
    const int last = na > 0 ? codes[na - 1] : ACT_IDENTITY;
    const bool smooth = smooth64(last), sat = last == ACT_SIGMOID || last == ACT_TANH;
    apply_acts64(x, (int64_t)T * kp, codes, slopes, smooth ? na - 1 : na);
    for (int h = 0; h < K; ++h) mv[h] = 0.0;
    const bool silu_last = last == ACT_SILU;  // the common case, 4 lanes at a time
    const __m256d one = _mm256_set1_pd(1.0), absm = _mm256_set1_pd(-0.0);
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < K; ++h) {
            if (silu_last && h + 4 <= K) {
                const __m256d xv = _mm256_loadu_pd(x + t * kp + h);
                const __m256d v = silu256d(xv);
                _mm256_storeu_pd(a + t * kp + h, v);
                const __m256d g4 = _mm256_blendv_pd(_mm256_andnot_pd(absm, xv), _mm256_set1_pd(1.2),
                                                    _mm256_cmp_pd(xv, _mm256_setzero_pd(), _CMP_GE_OQ));
                const __m256d w = _mm256_fmadd_pd(_mm256_andnot_pd(absm, v), _mm256_add_pd(one, g4),
                                                  _mm256_mul_pd(_mm256_set1_pd(kFloor64), _mm256_add_pd(one, _mm256_andnot_pd(absm, xv))));
                _mm256_storeu_pd(&mv[h], _mm256_max_pd(_mm256_loadu_pd(&mv[h]), w));
                h += 3;
                continue;
            }
            const double xv = x[t * kp + h];
            double v = xv;
            if (sat) v = offset_free64(last, xv, x[h]);
            else if (smooth) v = act64(xv, last, slopes[na - 1]);
            double r = std::fabs(v);
            if (sat) {  // |v| + |x act'(x)|: offset free, v is the full step on the far side, where act' ~ 0
                const double k = last == ACT_SIGMOID ? 1.0 : 2.0;
                r += std::fabs(xv) * k * sigmoid64(k * xv) * sigmoid64(-k * xv);
            } else if (smooth) {
                r *= 1.0 + rounding_gain64(last, xv, sat);
            }
            a[t * kp + h] = v;
            mv[h] = std::max(mv[h], r + (smooth ? kFloor64 * (1.0 + std::fabs(xv)) : 0.0));
        }
    for (int t = 1; t < T; ++t)
        for (int h = 0; h < K; ++h) a[t * kp + h] -= a[h];
    return *std::max_element(mv, mv + K);
}

// mv[h] = max_t |a_th| (1 + |x_th|) of the SiLU chain's rows (row 0 a_0, rows t >= 1 a_t - a_0), x_t = z_i + lam_t d.
void chain_scale64(const Pairs64& p, const double* zi, const double* d, const double* a, double* mv) {
    const int T = p.T, K = p.kin[0], kp = p.kp[0];
    for (int h = 0; h < K; ++h) {
        double m = std::fabs(a[h]) * (1.0 + rounding_gain64(ACT_SILU, zi[h], false));
        for (int t = 1; t < T; ++t)
            m = std::max(m, std::fabs(a[t * kp + h] + a[h]) * (1.0 + rounding_gain64(ACT_SILU, zi[h] + p.lam[t] * d[h], false)));
        mv[h] = m;
    }
}

// st[k] = std_t(y_k), rr[k] = r2_k clamped to [0, 1] (NaN -> 0), am[k] = max_t |y_tk| for the columns c0 .. c0 + 4 G
// of y[T, ld].
template <int G>
inline void r2_stats64(const double* y, int T, int ld, int c0, const double* lam_c, double ll, double* st, double* rr,
                       double* am) {
    const __m256d absm = _mm256_set1_pd(-0.0);
    __m256d s[G], mx[G], ss[G], cov[G], mean[G];
    for (int g = 0; g < G; ++g) s[g] = mx[g] = ss[g] = cov[g] = _mm256_setzero_pd();
    for (int t = 0; t < T; ++t)
        for (int g = 0; g < G; ++g) {
            const __m256d v = _mm256_loadu_pd(y + t * ld + c0 + 4 * g);
            s[g] = _mm256_add_pd(s[g], v);
            mx[g] = _mm256_max_pd(mx[g], _mm256_andnot_pd(absm, v));
        }
    const __m256d tv = _mm256_set1_pd((double)T);
    const __m256d one = _mm256_set1_pd(1.0), zero = _mm256_setzero_pd();
    const __m256d expmask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7ff0000000000000LL));
    __m256d p2[G], inv[G];
    for (int g = 0; g < G; ++g) {
        mean[g] = _mm256_div_pd(s[g], tv);
        // scale-free moments (docs/lmn.md, "Accuracy in the corners"): values divided by 2^floor(log2 max_t |y|), exact, as in r2_stats
        p2[g] = _mm256_and_pd(mx[g], expmask);
        const __m256d ok = _mm256_and_pd(_mm256_cmp_pd(p2[g], zero, _CMP_GT_OQ), _mm256_cmp_pd(p2[g], expmask, _CMP_LT_OQ));
        p2[g] = _mm256_blendv_pd(one, p2[g], ok);
        inv[g] = _mm256_div_pd(one, p2[g]);
    }
    for (int t = 0; t < T; ++t) {
        const __m256d l = _mm256_set1_pd(lam_c[t]);
        for (int g = 0; g < G; ++g) {
            const __m256d c = _mm256_mul_pd(_mm256_sub_pd(_mm256_loadu_pd(y + t * ld + c0 + 4 * g), mean[g]), inv[g]);
            ss[g] = _mm256_fmadd_pd(c, c, ss[g]);
            cov[g] = _mm256_fmadd_pd(c, l, cov[g]);
        }
    }
    for (int g = 0; g < G; ++g) {
        const __m256d r2 = _mm256_div_pd(_mm256_mul_pd(cov[g], cov[g]), _mm256_mul_pd(ss[g], _mm256_set1_pd(ll)));
        _mm256_storeu_pd(rr + c0 + 4 * g, _mm256_min_pd(_mm256_max_pd(r2, zero), one));
        _mm256_storeu_pd(st + c0 + 4 * g, _mm256_mul_pd(_mm256_sqrt_pd(_mm256_div_pd(ss[g], tv)), p2[g]));
        _mm256_storeu_pd(am + c0 + 4 * g, mx[g]);
    }
}

void r2_stats64_all(const double* y, int T, int ld, int O, const double* lam_c, double ll, double* st, double* rr,
                    double* am) {
    int c = 0;
    for (; c + 8 <= ld && c < O; c += 8) r2_stats64<2>(y, T, ld, c, lam_c, ll, st, rr, am);
    for (; c < O; c += 4) r2_stats64<1>(y, T, ld, c, lam_c, ll, st, rr, am);
}

// Underflow policy (docs/lmn.md, "Accuracy in the corners"; policy.UNDERFLOW_TINY, exact.TINY): std_k <= kUnderflowTiny sum_h |W_kh| is constant.
constexpr double kUnderflowTiny = 1e-290;

// Mean over the first O outputs of r2_k, 1 where std_k <= tol f sc[k] (the constant-path rule; any_const: it fired)
// or std_k <= kUnderflowTiny ws[k] (ws: sum_h |W_kh| of the last Linear; nullptr: 1, a tail ending in an activation).
double r2_mean64(const double* st, const double* rr, const double* sc, double f, int O, double tol, bool& any_const,
                 const double* sadd, const double* ws) {
    double sum = 0.0;
    any_const = false;
    for (int k = 0; k < O; ++k) {
        const bool c = st[k] <= tol * (f * sc[k] + (sadd != nullptr ? sadd[k] : 0.0));
        any_const = any_const || c;
        const bool u = st[k] <= kUnderflowTiny * (ws != nullptr ? ws[k] : 1.0);
        sum += c || u ? 1.0 : rr[k];
    }
    return sum / O;
}

// L_ij of rows i, j of z in float64.
double pair_value64(const Pairs64& p, int64_t i, int64_t j, Work64& w) {
    const int T = p.T, S = p.n_stages, kp0 = p.kp[0];
    const double* zi = p.z + i * kp0;
    const double* zj = p.z + j * kp0;
    double* d = w.d.data();
    for (int q = 0; q < kp0; q += 4)
        _mm256_storeu_pd(d + q, _mm256_sub_pd(_mm256_loadu_pd(zj + q), _mm256_loadu_pd(zi + q)));
    double* x = w.xa.data();
    double* y = w.xb.data();
    const bool centred = p.act_off[S + 1] == p.act_off[S];
    const bool chain = p.ez != nullptr && p.ez_ok[i] && p.ez_ok[j];  // one stage, SiLU, centred (see run64)
    double mmax = 0.0;
    if (chain) {
        silu_chain(zi, d, p.ez + i * kp0, p.ez + j * kp0, p.sz + i * kp0, p.lam, T, kp0, 0, w.scratch.data(), x);
        // |silu(x)| <= |x| <= M_h = max(|z_ih|, |z_jh|) on the path: mv_h <= 2.2 M_h for x >= 0 and
        // |silu(x)| (1 + |x|) <= 0.72 for x < 0, no pass over the rows (homogeneous; it was M_h (1 + M_h); docs/lmn.md, "Accuracy in the corners")
        __m256d m = _mm256_setzero_pd();
        const __m256d absm = _mm256_set1_pd(-0.0);
        for (int q = 0; q < kp0; q += 4) {
            const __m256d mh = _mm256_max_pd(_mm256_andnot_pd(absm, _mm256_loadu_pd(zi + q)),
                                             _mm256_andnot_pd(absm, _mm256_loadu_pd(zj + q)));
            m = _mm256_max_pd(m, _mm256_fmadd_pd(mh, _mm256_set1_pd(2.2), _mm256_set1_pd(0.72)));
        }
        mmax = Simd<double>::hmax(m);
    } else {
        for (int t = 0; t < T; ++t) {
            const __m256d l = _mm256_set1_pd(p.lam[t]);
            for (int q = 0; q < kp0; q += 4)
                _mm256_storeu_pd(x + t * kp0 + q, _mm256_fmadd_pd(l, _mm256_loadu_pd(d + q), _mm256_loadu_pd(zi + q)));
        }
        for (int s = 0; s < S; ++s) {
            if (s == S - 1 && centred) {
                mmax = centre_last64(p, s, x, y, w.mv.data());
                std::swap(x, y);
                break;
            }
            apply_acts64(x, (int64_t)T * p.kp[s], p.act_code + p.act_off[s], p.act_slope + p.act_off[s],
                         p.act_off[s + 1] - p.act_off[s]);
            gemm(x, T, p.kp[s], p.kin[s], p.np[s], p.wpack[s], p.bias[s], y);
            std::swap(x, y);
        }
    }
    const int O = p.out_dim, ld = p.np[S - 1], kp = p.kp[S - 1];
    const double tol = p.const_rtol * p.eps;
    bool any_const;
    if (!centred) {  // trailing activations: r2 of the literal paths, scale max_t |y|
        apply_acts64(x, (int64_t)T * ld, p.act_code + p.act_off[S], p.act_slope + p.act_off[S],
                     p.act_off[S + 1] - p.act_off[S]);
        r2_stats64_all(x, T, ld, O, p.lam_c, p.ll, w.st.data(), w.rr.data(), w.am.data());
        return r2_mean64(w.st.data(), w.rr.data(), w.am.data(), 1.0, O, tol, any_const, nullptr, nullptr);
    }
    for (int o = 0; o < ld; ++o) y[o] = 0.0;  // row 0: y_0 - y_0
    gemm(x + kp, T - 1, kp, p.kin[S - 1], ld, p.wpack[S - 1], w.zero.data(), y + ld);
    double* adu = nullptr;
    if (p.U != nullptr) {  // skip term: row t gains lam_t (u_j - u_i); its rounding scale |u_j - u_i|
        adu = w.adu.data();
        for (int k = 0; k < O; ++k) {
            const double dk = p.U[j * O + k] - p.U[i * O + k];
            adu[k] = std::fabs(dk);
            for (int t = 1; t < T; ++t) y[(int64_t)t * ld + k] += p.lam[t] * dk;
        }
    }
    r2_stats64_all(y, T, ld, O, p.lam_c, p.ll, w.st.data(), w.rr.data(), w.am.data());
    // First with the bound scale_k <= max_h mv_h sum_h |W_kh| (a larger scale only fires the rule more, so a pair it
    // clears has the same L_ij with the exact scale); the exact sum_h mv_h |W_kh| only when it fires.
    const double v = r2_mean64(w.st.data(), w.rr.data(), p.wsum, mmax * (1.0 + 1e-12), O, tol, any_const, adu, p.wsum);
    if (!any_const) return v;
    if (chain) chain_scale64(p, zi, d, x, w.mv.data());
    gemm(w.mv.data(), 1, kp, p.kin[S - 1], ld, p.wabs, w.zero.data(), w.sc.data());
    return r2_mean64(w.st.data(), w.rr.data(), w.sc.data(), 1.0, O, tol, any_const, adu, p.wsum);
}

// Workers never let an exception escape a std::thread: they record it and stop everyone's work.
void rows64_worker(const Pairs64& p, std::atomic<int64_t>* next, std::atomic<int>* error) {
    try {
        Work64 w(p);
        for (;;) {
            const int64_t i = next->fetch_add(1);
            if (i >= p.n - 1) break;
            for (int64_t j = i + 1; j < p.n; ++j) p.out[i * p.n + j] = pair_value64(p, i, j, w);
        }
    } catch (...) {
        error->store(1);
        next->store(p.n);
    }
}

void pairs64_worker(const Pairs64& p, std::atomic<int64_t>* next, std::atomic<int>* error) {
    try {
        Work64 w(p);
        constexpr int64_t BLOCK = 8;
        for (;;) {
            const int64_t p0 = next->fetch_add(BLOCK);
            if (p0 >= p.n_pairs) break;
            for (int64_t q = p0; q < std::min(p.n_pairs, p0 + BLOCK); ++q) p.out[q] = pair_value64(p, p.pi[q], p.pj[q], w);
        }
    } catch (...) {
        error->store(1);
        next->store(p.n_pairs);
    }
}

// Run p on n_threads threads (matrix mode when p.pi is nullptr); 0 on success, 2 when a worker failed.
int run64(Pairs64 p, int n_threads) {
    const int kp0 = p.kp[0];
    std::vector<double> ez, sz;
    std::vector<uint8_t> ok;
    if (p.n_stages == 1 && p.act_off[2] == p.act_off[1] && p.act_off[1] - p.act_off[0] == 1 &&
        p.act_code[p.act_off[0]] == ACT_SILU && p.T <= CHAIN_TMAX) {
        ez.resize((size_t)p.n * kp0);
        sz.resize((size_t)p.n * kp0);
        ok.resize((size_t)p.n);
        precompute_exp(p.z, p.n, kp0, ez.data(), sz.data(), ok.data());
        p.ez = ez.data();
        p.sz = sz.data();
        p.ez_ok = ok.data();
    }
    const bool matrix = p.pi == nullptr;
    std::atomic<int64_t> next{0};
    std::atomic<int> error{0};
    const int64_t units = matrix ? p.n - 1 : (p.n_pairs + 7) / 8;
    n_threads = (int)std::max<int64_t>(1, std::min<int64_t>(n_threads, units));
    auto worker = matrix ? rows64_worker : pairs64_worker;
    std::vector<std::thread> pool;
    for (int t = 1; t < n_threads; ++t) {
        try {
            pool.emplace_back(worker, std::cref(p), &next, &error);
        } catch (...) {  // no more threads: the ones running share the work
            break;
        }
    }
    worker(p, &next, &error);
    for (auto& th : pool) th.join();
    if (error.load()) return 2;
    if (matrix)
        for (int64_t i = 0; i < p.n; ++i) {
            p.out[i * p.n + i] = 1.0;
            for (int64_t j = i + 1; j < p.n; ++j) p.out[j * p.n + i] = p.out[i * p.n + j];
        }
    return 0;
}

}  // namespace

#pragma GCC pop_options

extern "C" int gm_connectivity_mlp(
    int64_t n, int T, int n_stages, const int* kp, const int* kin, const int* np, const float* const* wpack,
    const float* const* bias, const int* act_off, const int* act_code, const float* act_slope, int out_dim,
    const float* z, const float* lam, const float* lam_c, float ll, float eps, float const_rtol, float* L,
    int n_threads, const float* wabs, const float* wnorm, float flag_tau, const double* U) {
    // Returns 0 on success, 2 when memory ran out, 3 on any other C++ exception (never throws across the C ABI).
    std::atomic<int> error{0};
    try {
        Problem p{n, T, n_stages, kp, kin, np, wpack, bias, act_off, act_code, act_slope, out_dim,
                  z, lam, lam_c, ll, eps, const_rtol, L, nullptr, nullptr, nullptr, wabs, wnorm, flag_tau, &error, U};
        std::vector<float> ez, sz;
        std::vector<uint8_t> ez_ok;
        if (T <= CHAIN_TMAX && act_off[1] - act_off[0] == 1 && act_code[act_off[0]] == ACT_SILU) {
            ez.resize((size_t)n * kp[0]);
            sz.resize((size_t)n * kp[0]);
            ez_ok.resize((size_t)n);
            precompute_exp(z, n, kp[0], ez.data(), sz.data(), ez_ok.data());
            p.ez = ez.data();
            p.sz = sz.data();
            p.ez_ok = ez_ok.data();
        }
        for (int64_t i = 0; i < n; ++i) L[i * n + i] = 1.0f;
        std::atomic<int64_t> next_row{0};
        n_threads = (int)std::max<int64_t>(1, std::min<int64_t>(n_threads, n - 1));
        std::vector<std::thread> pool;
        for (int w = 1; w < n_threads; ++w) {
            try {
                pool.emplace_back(run_rows_safe, std::cref(p), &next_row);
            } catch (...) {  // no more threads: the ones running share the rows
                break;
            }
        }
        run_rows_safe(p, &next_row);
        for (auto& th : pool) th.join();
        if (error.load()) return 2;
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = i + 1; j < n; ++j) L[j * n + i] = L[i * n + j];
        return 0;
    } catch (const std::bad_alloc&) {
        return 2;
    } catch (...) {
        return 3;
    }
}

extern "C" int gm_mlp_f64(
    int64_t n, int64_t n_pairs, const int64_t* pi, const int64_t* pj, int T, int n_stages, const int* kp,
    const int* kin, const int* np, const double* const* wpack, const double* const* bias, const int* act_off,
    const int* act_code, const double* act_slope, int out_dim, const double* z, const double* lam,
    const double* lam_c, double ll, double eps, double const_rtol, double* out, int n_threads, const double* wabs,
    const double* wsum, const double* U) {
    // float64 L of every pair of the n rows of z into out[n, n] (pi == nullptr) or of the listed pairs into
    // out[n_pairs]; 0 on success, 2 out of memory, 3 any other failure (never throws across the C ABI).
    try {
        Pairs64 p{n_pairs, pi, pj, n, T, n_stages, kp, kin, np, wpack, bias, act_off, act_code, act_slope, out_dim,
                  z, lam, lam_c, ll, eps, const_rtol, out, wabs, wsum, nullptr, nullptr, nullptr, U};
        return run64(p, n_threads);
    } catch (const std::bad_alloc&) {
        return 2;
    } catch (...) {
        return 3;
    }
}

extern "C" int gm_affine_f64(int64_t n, int K, int np, const double* x, const double* wpack, const double* bias,
                             double* y) {
    // y[n, np] = x[n, K] @ W^T + bias in float64 (W^T packed as for gm_mlp_f64 with kp = K, bias padded to np),
    // one thread (the absorb of core's fp64 recompute).
    gemm(x, (int)n, K, K, np, wpack, bias, y);
    return 0;
}
