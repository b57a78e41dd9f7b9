/* The FMA peak of one core, from registers only (no memory traffic): what "the roof" can mean on a CPU.
 *
 * benchmarks/RESULTS.md compares the fused kernel with a torch 2048^2 fp32 matmul ("the matmul roof"). That matmul is
 * MKL's sgemm, which need not use the widest registers a CPU has: on the AMD EPYC (Zen 5) of this project's machines it
 * ran at about 0.38 of the 512-bit FMA peak measured here, so a kernel in zmm registers can exceed "the roof".
 * This program times independent FMA chains in 256-bit (AVX2) and 512-bit (AVX-512F) registers on one thread:
 *
 *     gcc -O3 -o /tmp/fma_peak benchmarks/fma_peak.c && /tmp/fma_peak
 *
 * prints GFLOP/s (fp32, 2 FLOP per lane per FMA) per thread, best of 5 (process CPU time).
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 12 /* >= FMA latency x FMA pipes: enough independent chains to keep every FMA unit busy */

static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

__attribute__((target("avx2,fma"))) static double peak256(long n) {
    __m256 a[CHAINS], b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-4f);
    for (int i = 0; i < CHAINS; i++) a[i] = _mm256_set1_ps(i * 1e-3f);
    double t = cpu_seconds();
    for (long k = 0; k < n; k++)
        for (int i = 0; i < CHAINS; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
    t = cpu_seconds() - t;
    float s = 0;
    for (int i = 0; i < CHAINS; i++) s += a[i][0];
    if (s == 12345.f) printf(" ");  /* keep the chains alive */
    return (double)CHAINS * n * 16 / t / 1e9;
}

__attribute__((target("avx512f"))) static double peak512(long n) {
    __m512 a[CHAINS], b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-4f);
    for (int i = 0; i < CHAINS; i++) a[i] = _mm512_set1_ps(i * 1e-3f);
    double t = cpu_seconds();
    for (long k = 0; k < n; k++)
        for (int i = 0; i < CHAINS; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
    t = cpu_seconds() - t;
    float s = 0;
    for (int i = 0; i < CHAINS; i++) s += a[i][0];
    if (s == 12345.f) printf(" ");
    return (double)CHAINS * n * 32 / t / 1e9;
}

int main(void) {
    double best256 = 0, best512 = 0;
    __builtin_cpu_init();
    for (int r = 0; r < 5; r++) {
        double p = peak256(50000000);
        best256 = p > best256 ? p : best256;
        if (__builtin_cpu_supports("avx512f")) {
            p = peak512(50000000);
            best512 = p > best512 ? p : best512;
        }
    }
    printf("fp32 FMA peak, one thread: AVX2 %.1f GFLOP/s", best256);
    if (best512 > 0) printf(", AVX-512F %.1f GFLOP/s", best512);
    printf("\n");
    return 0;
}
