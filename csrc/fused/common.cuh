// Device helpers shared by the fused kernels: vector packs, dtype conversion, row reductions and the
// per-row launch configuration (how many threads share a row, how many vectors each thread holds).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fused_kernels.h"

namespace megatron_fused {

// N elements of T loaded/stored as one aligned access (16 bytes -> one LDG.128).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(uint8_t x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Load N consecutive elements starting at p (p must be aligned to sizeof(T) * N) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(pk.v[k]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// Reduce `val` over the `tpr` threads of a row. Rows are groups of tpr consecutive threads, tpr a
// power of two in [32, 1024], tpr uniform over the block. smem holds one float per warp (32).
// Every thread of the block must call this (it may __syncthreads when tpr > 32).
template <typename Op>
__device__ __forceinline__ float row_reduce(float val, float* smem, int tpr, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) val = op(val, __shfl_xor_sync(0xffffffffu, val, offset));
  if (tpr <= 32) return val;
  const int warp = threadIdx.x >> 5;
  const int warps_per_row = tpr >> 5;
  if ((threadIdx.x & 31) == 0) smem[warp] = val;
  __syncthreads();
  const int first = (warp / warps_per_row) * warps_per_row;
  float r = smem[first];
  for (int i = 1; i < warps_per_row; ++i) r = op(r, smem[first + i]);
  __syncthreads();  // smem may be reused by the next reduction
  return r;
}

// ---- host side -------------------------------------------------------------------------------

inline bool is_aligned(const void* p, int bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

inline int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Row configuration: each row of n vectors is handled by tpr threads (power of two, >= 32), each
// holding `chunks` vectors in registers (chunks from the kernel's compiled list). Prefers rows of at
// most 256 threads (several rows per SM), then up to max_tpr. Returns false when n does not fit.
struct RowConfig {
  int chunks = 0;
  int tpr = 0;
  int block = 0;           // threads per block (>= 128: several short rows share a block)
  int rows_per_block = 0;
};

inline bool choose_row_config(int64_t n, const int* chunk_list, int num_chunks, int max_tpr, RowConfig* cfg) {
  if (n < 1) return false;
  for (int limit : {256, max_tpr}) {
    for (int i = 0; i < num_chunks; ++i) {
      const int64_t threads = (n + chunk_list[i] - 1) / chunk_list[i];
      if (threads <= limit) {
        cfg->chunks = chunk_list[i];
        cfg->tpr = next_pow2(threads < 32 ? 32 : threads);
        cfg->block = cfg->tpr < 128 ? 128 : cfg->tpr;
        cfg->rows_per_block = cfg->block / cfg->tpr;
        return true;
      }
    }
  }
  return false;
}

// Compiled chunk lists, chosen so a thread never holds more than 16 elements of a row (the kernels
// are built for up to 1024 threads, i.e. <= 64 registers): 16-byte vectors of 8 elements {1, 2},
// of 4 elements {1, 2, 4}; scalar rows (row length not a multiple of the vector width, or unaligned
// pointers) {1, 4, 16}. Each list reaches kMaxRowLength with <= 1024 threads per row.
template <int VEC>
struct ChunkList;
template <>
struct ChunkList<8> {
  static constexpr int size = 2;
  static constexpr int values[3] = {1, 2, 0};
};
template <>
struct ChunkList<4> {
  static constexpr int size = 3;
  static constexpr int values[3] = {1, 2, 4};
};
template <>
struct ChunkList<1> {
  static constexpr int size = 3;
  static constexpr int values[3] = {1, 4, 16};
};

template <int V>
struct IntC {
  static constexpr int value = V;
};

// Call f(IntC<chunks>{}) for a chunk count from ChunkList<VEC> (instantiates only listed counts).
template <int VEC, typename F>
cudaError_t with_chunks(int chunks, F&& f) {
  if (chunks == ChunkList<VEC>::values[0]) return f(IntC<ChunkList<VEC>::values[0]>{});
  if (chunks == ChunkList<VEC>::values[1]) return f(IntC<ChunkList<VEC>::values[1]>{});
  if constexpr (ChunkList<VEC>::size > 2) {
    if (chunks == ChunkList<VEC>::values[2]) return f(IntC<ChunkList<VEC>::values[2]>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace megatron_fused
