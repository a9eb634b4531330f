/* One-core f32 FMA peak: 12 independent 8-lane FMA chains (enough to cover the FMA latency on
   both pipes). gcc -O2 -mavx2 -mfma scripts/fma_peak.c -o fma_peak && ./fma_peak
   Prints GFLOP per CPU-second (stable on a shared machine) and per wall-second. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
int main(){
  __m256 a0=_mm256_set1_ps(0.f),a1=_mm256_set1_ps(1.f),a2=_mm256_set1_ps(2.f),a3=_mm256_set1_ps(3.f),a4=_mm256_set1_ps(4.f),a5=_mm256_set1_ps(5.f),a6=_mm256_set1_ps(6.f),a7=_mm256_set1_ps(7.f),a8=_mm256_set1_ps(8.f),a9=_mm256_set1_ps(9.f),a10=_mm256_set1_ps(10.f),a11=_mm256_set1_ps(11.f); __m256 b=_mm256_set1_ps(0.999999f), c=_mm256_set1_ps(1e-7f);
  
  long iters=400000000L;
  struct timespec t0,t1,w0,w1; clock_gettime(CLOCK_PROCESS_CPUTIME_ID,&t0); clock_gettime(CLOCK_MONOTONIC,&w0);
  for(long k=0;k<iters;k++){
    a0=_mm256_fmadd_ps(a0,b,c);a1=_mm256_fmadd_ps(a1,b,c);a2=_mm256_fmadd_ps(a2,b,c);a3=_mm256_fmadd_ps(a3,b,c);a4=_mm256_fmadd_ps(a4,b,c);a5=_mm256_fmadd_ps(a5,b,c);a6=_mm256_fmadd_ps(a6,b,c);a7=_mm256_fmadd_ps(a7,b,c);a8=_mm256_fmadd_ps(a8,b,c);a9=_mm256_fmadd_ps(a9,b,c);a10=_mm256_fmadd_ps(a10,b,c);a11=_mm256_fmadd_ps(a11,b,c);__asm__ volatile("" ::: "memory");
  }
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID,&t1); clock_gettime(CLOCK_MONOTONIC,&w1);
  double cpu=(t1.tv_sec-t0.tv_sec)+(t1.tv_nsec-t0.tv_nsec)*1e-9;
  double wall=(w1.tv_sec-w0.tv_sec)+(w1.tv_nsec-w0.tv_nsec)*1e-9;
  double flops=iters*12.0*8*2;
  float s=0; float out[8]; _mm256_storeu_ps(out,a0); s+=out[0];_mm256_storeu_ps(out,a1); s+=out[0];_mm256_storeu_ps(out,a2); s+=out[0];_mm256_storeu_ps(out,a3); s+=out[0];_mm256_storeu_ps(out,a4); s+=out[0];_mm256_storeu_ps(out,a5); s+=out[0];_mm256_storeu_ps(out,a6); s+=out[0];_mm256_storeu_ps(out,a7); s+=out[0];_mm256_storeu_ps(out,a8); s+=out[0];_mm256_storeu_ps(out,a9); s+=out[0];_mm256_storeu_ps(out,a10); s+=out[0];_mm256_storeu_ps(out,a11); s+=out[0];
  printf("%.1f GFLOP per CPU-second, %.1f GFLOP/s wall (cpu %.2fs wall %.2fs) [%g]\n",flops/cpu/1e9,flops/wall/1e9,cpu,wall,s);
}
