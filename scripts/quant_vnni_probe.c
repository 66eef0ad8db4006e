/* A probe, not part of splitlm: one-row Q4_1 products (1536 x 576) in the float path of
 * shared/models/quant/kernel.c against an integer path with the activations quantized to int8
 * per block and AVX-512 VNNI dot products (llama.cpp's way). Prints ns per block and the relative
 * difference of the two results. Run: gcc -O3 -march=native scripts/quant_vnni_probe.c -o /tmp/probe -lm && /tmp/probe
 * (needs AVX512-VNNI and F16C). */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <math.h>
#define QK 32
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static inline uint16_t ld16(const uint8_t*p){uint16_t v;memcpy(&v,p,2);return v;}
// q4_1 float path, 1 row
static float dot_float(const uint8_t*w,int nb,const float*x){
  __m512 al=_mm512_setzero_ps(),ah=_mm512_setzero_ps();
  for(int i=0;i<nb;i++){const uint8_t*b=w+i*20;
    __m512 vd=_mm512_set1_ps(_cvtsh_ss(ld16(b))),vc=_mm512_set1_ps(_cvtsh_ss(ld16(b+2)));
    __m128i qs=_mm_loadu_si128((const __m128i*)(b+4)),m=_mm_set1_epi8(15);
    __m512 lo=_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(qs,m))),vd,vc);
    __m512 hi=_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs,4),m))),vd,vc);
    al=_mm512_fmadd_ps(lo,_mm512_loadu_ps(x+i*32),al);ah=_mm512_fmadd_ps(hi,_mm512_loadu_ps(x+i*32+16),ah);}
  return _mm512_reduce_add_ps(_mm512_add_ps(al,ah));}
// vnni: xq int8 per block, dx per block, sx = dx*sum(xq)
static float dot_vnni(const uint8_t*w,int nb,const int8_t*xq,const float*dx,const float*sx){
  __m256 acc=_mm256_setzero_ps(); float accm=0;
  const __m128i m=_mm_set1_epi8(15);
  for(int i=0;i<nb;i++){const uint8_t*b=w+i*20;
    float d=_cvtsh_ss(ld16(b)), mm=_cvtsh_ss(ld16(b+2));
    __m128i qs=_mm_loadu_si128((const __m128i*)(b+4));
    __m256i q=_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs,4),m),_mm_and_si128(qs,m));
    __m256i p=_mm256_dpbusd_epi32(_mm256_setzero_si256(),q,_mm256_loadu_si256((const __m256i*)(xq+i*32)));
    acc=_mm256_fmadd_ps(_mm256_cvtepi32_ps(p),_mm256_set1_ps(d*dx[i]),acc);
    accm=fmaf(mm,sx[i],accm);}
  __m128 s=_mm_add_ps(_mm256_castps256_ps128(acc),_mm256_extractf128_ps(acc,1));
  s=_mm_add_ps(s,_mm_movehl_ps(s,s)); s=_mm_add_ss(s,_mm_movehdup_ps(s));
  return _mm_cvtss_f32(s)+accm;}
int main(){int O=1536,K=576,nb=K/32; size_t rb=nb*20; int copies=120; // 66MB
  uint8_t*W=aligned_alloc(64,rb*O*copies); for(size_t i=0;i<rb*O*copies;i++)W[i]=rand();
  for(size_t c=0;c<(size_t)O*copies;c++)for(int i=0;i<nb;i++){uint16_t h=0x2000+(rand()&0xff);memcpy(W+c*rb+i*20,&h,2);memcpy(W+c*rb+i*20+2,&h,2);}
  float*x=malloc(K*4); for(int i=0;i<K;i++)x[i]=rand()/(float)RAND_MAX-0.5f;
  int8_t xq[576]; float dx[18],sx[18];
  for(int i=0;i<nb;i++){float a=0;for(int j=0;j<32;j++)a=fmaxf(a,fabsf(x[i*32+j]));dx[i]=a/127;int s=0;for(int j=0;j<32;j++){xq[i*32+j]=(int8_t)lrintf(x[i*32+j]/dx[i]);s+=xq[i*32+j];}sx[i]=dx[i]*s;}
  float*y=malloc(O*4); volatile float sink=0;
  for(int mode=0;mode<2;mode++) for(int hot=1;hot>=0;hot--){ double best=1e9; int reps=hot?200:copies*2;
    for(int r=0;r<reps;r++){const uint8_t*w=W+(hot?0:(size_t)(r%copies)*rb*O); double t=now();
      for(int o=0;o<O;o++) y[o]= mode? dot_vnni(w+o*rb,nb,xq,dx,sx): dot_float(w+o*rb,nb,x);
      t=now()-t; if(t<best)best=t; sink+=y[0];}
    printf("%s %s: %.1f us  %.2f ns/block  %.1f GB/s\n",mode?"vnni ":"float",hot?"hot ":"cold",best*1e6,best*1e9/(O*nb),rb*O/best/1e9);}
  // agreement
  double e=0,n=0; for(int o=0;o<O;o++){float a=dot_float(W+o*rb,nb,x),b=dot_vnni(W+o*rb,nb,xq,dx,sx);e+=(a-b)*(a-b);n+=a*a;} printf("rel err vnni vs float %.2e\n",sqrt(e/n));
  return 0;}
