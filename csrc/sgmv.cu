// Routed LoRA (SGMV-style) CUDA kernels on plain pointers: no torch headers, so this file
// compiles with a bare `nvcc -c` (CI checks that). Bindings live in sgmv_cuda.cpp.
//
// shrink:  S[m, j]  = scale[id[m]] * Σ_i X[m, i] · A[id[m], j, i]        (id[m] = -1: S[m, :] = 0)
// expand:  Y[m, o] += Σ_j S[m, j] · B[id[m], o, j]                         (id[m] = -1: unchanged)
//
// One block per row for shrink (threads split the IN reduction, a warp-shuffle tree sums it, so
// the order of additions is fixed: deterministic); expand uses a 2-D grid of (row, output tile)
// with each thread owning outputs. Accumulation is fp32 whatever the storage type.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

constexpr int kMaxRank = 64;
constexpr int kThreads = 128;

template <typename T>
__global__ void sgmv_shrink_kernel(const T* __restrict__ X, const T* __restrict__ A, const float* __restrict__ scale,
                                   const int32_t* __restrict__ ids, float* __restrict__ S,
                                   int64_t M, int64_t IN, int64_t R, int64_t ldx) {
  const int64_t m = blockIdx.x;
  if (m >= M) return;
  const int32_t k = ids[m];
  __shared__ float partial[kThreads / 32][kMaxRank];
  float acc[kMaxRank];
  for (int j = 0; j < R; ++j) acc[j] = 0.f;
  if (k >= 0) {
    const T* a = A + (int64_t)k * R * IN;
    for (int64_t i = threadIdx.x; i < IN; i += blockDim.x) {
      const float xv = to_f(X[m * ldx + i]);
      for (int j = 0; j < R; ++j) acc[j] += xv * to_f(a[j * IN + i]);
    }
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int j = 0; j < R; ++j) {
    float v = acc[j];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffff, v, off);
    if (lane == 0) partial[warp][j] = v;
  }
  __syncthreads();
  if (threadIdx.x < R) {
    float v = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) v += partial[w][threadIdx.x];
    S[m * R + threadIdx.x] = (k >= 0) ? v * scale[k] : 0.f;
  }
}

template <typename T>
__global__ void sgmv_expand_kernel(const float* __restrict__ S, const T* __restrict__ B, const int32_t* __restrict__ ids,
                                   T* __restrict__ Y, int64_t M, int64_t OUT, int64_t R, int64_t ldy) {
  const int64_t m = blockIdx.x;
  const int32_t k = ids[m];
  if (m >= M || k < 0) return;
  __shared__ float s[kMaxRank];
  if (threadIdx.x < R) s[threadIdx.x] = S[m * R + threadIdx.x];
  __syncthreads();
  const T* b = B + (int64_t)k * OUT * R;
  for (int64_t o = blockIdx.y * blockDim.x + threadIdx.x; o < OUT; o += (int64_t)gridDim.y * blockDim.x) {
    float v = to_f(Y[m * ldy + o]);
    for (int j = 0; j < R; ++j) v += s[j] * to_f(b[o * R + j]);
    Y[m * ldy + o] = from_f<T>(v);
  }
}

template <typename T>
int launch_shrink(const void* X, const void* A, const float* scale, const int32_t* ids, float* S, int64_t M,
                  int64_t IN, int64_t R, int64_t ldx, cudaStream_t stream) {
  if (R > kMaxRank) return 1;
  if (M == 0) return 0;
  sgmv_shrink_kernel<T><<<(unsigned)M, kThreads, 0, stream>>>((const T*)X, (const T*)A, scale, ids, S, M, IN, R, ldx);
  return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

template <typename T>
int launch_expand(const float* S, const void* B, const int32_t* ids, void* Y, int64_t M, int64_t OUT, int64_t R,
                  int64_t ldy, cudaStream_t stream) {
  if (R > kMaxRank) return 1;
  if (M == 0) return 0;
  dim3 grid((unsigned)M, (unsigned)((OUT + kThreads - 1) / kThreads < 8 ? (OUT + kThreads - 1) / kThreads : 8));
  sgmv_expand_kernel<T><<<grid, kThreads, 0, stream>>>(S, (const T*)B, ids, (T*)Y, M, OUT, R, ldy);
  return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

}  // namespace

// dtype: 0 = fp32, 1 = bf16, 2 = fp16. Return 0 on success, 1 for an unsupported rank (> 64),
// 2 for a launch error, 3 for an unknown dtype.
extern "C" int fastcp_sgmv_shrink(int dtype, const void* X, const void* A, const float* scale, const int32_t* ids,
                                  float* S, int64_t M, int64_t IN, int64_t R, int64_t ldx, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_shrink<float>(X, A, scale, ids, S, M, IN, R, ldx, stream);
    case 1: return launch_shrink<__nv_bfloat16>(X, A, scale, ids, S, M, IN, R, ldx, stream);
    case 2: return launch_shrink<__half>(X, A, scale, ids, S, M, IN, R, ldx, stream);
  }
  return 3;
}

extern "C" int fastcp_sgmv_expand(int dtype, const float* S, const void* B, const int32_t* ids, void* Y, int64_t M,
                                  int64_t OUT, int64_t R, int64_t ldy, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_expand<float>(S, B, ids, Y, M, OUT, R, ldy, stream);
    case 1: return launch_expand<__nv_bfloat16>(S, B, ids, Y, M, OUT, R, ldy, stream);
    case 2: return launch_expand<__half>(S, B, ids, Y, M, OUT, R, ldy, stream);
  }
  return 3;
}
