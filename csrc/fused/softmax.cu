// Scaled (masked / causal) softmax forward and backward over the last dim of attention scores.
//
// One row (sk elements) is held in registers by `tpr` threads (32..1024), each owning CHUNKS
// vectors of VEC elements at columns (c * tpr + t) * VEC. fp16/bf16 in and out, fp32 math, exp2 with
// the scale pre-multiplied by log2(e). Masked elements and fully masked rows produce 0. The causal
// kernels skip the masked upper triangle (about half the input), loading past the diagonal only within
// the vector that holds it (values that never reach the result), and write it as zeros.
#include <cmath>

#include "common.cuh"

namespace megatron_fused {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int VEC, int CHUNKS, bool CAUSAL>
__global__ void __launch_bounds__(1024, 1)
softmax_forward_kernel(const T* __restrict__ input, const uint8_t* __restrict__ mask, T* __restrict__ output,
                       int64_t rows, int64_t sq, int64_t sk, int64_t rows_per_batch, bool mask_broadcast,
                       float scale_log2e, int tpr) {
  __shared__ float smem[32];
  const int t = threadIdx.x % tpr;
  const int64_t row_raw = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool active = row_raw < rows;  // inactive threads still join the block reductions
  const int64_t row = active ? row_raw : rows - 1;
  const int64_t qi = row % sq;
  int64_t valid = sk;  // columns [0, valid) may be unmasked
  if (CAUSAL) {
    valid = qi + (sk - sq) + 1;
    valid = valid < 0 ? 0 : (valid > sk ? sk : valid);
  }
  const T* x = input + row * sk;
  const uint8_t* m = nullptr;
  if (!CAUSAL && mask != nullptr) {
    const int64_t batch = mask_broadcast ? 0 : row / rows_per_batch;
    m = mask + (batch * sq + qi) * sk;
  }

  float v[CHUNKS][VEC];
  float row_max = -INFINITY;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * tpr + t) * VEC;  // < kMaxRowLength
    if (active && col < valid) {  // VEC > 1 only when sk % VEC == 0: the whole vector is in the row
      load_vec<T, VEC>(x + col, v[c]);
      Pack<uint8_t, VEC> mk;
      if (m != nullptr) mk = *reinterpret_cast<const Pack<uint8_t, VEC>*>(m + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const bool keep = CAUSAL ? (col + k < valid) : (m == nullptr || mk.v[k] == 0);
        v[c][k] = keep ? v[c][k] * scale_log2e : -INFINITY;
        row_max = fmaxf(row_max, v[c][k]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[c][k] = -INFINITY;
    }
  }
  row_max = row_reduce(row_max, smem, tpr, MaxOp());

  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[c][k] = v[c][k] == -INFINITY ? 0.f : exp2f(v[c][k] - row_max);
      sum += v[c][k];
    }
  }
  sum = row_reduce(sum, smem, tpr, SumOp());
  const float inv = sum > 0.f ? 1.f / sum : 0.f;  // fully masked row: every element 0

  T* y = output + row * sk;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * tpr + t) * VEC;  // < kMaxRowLength
    if (active && col < sk) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[c][k] *= inv;
      store_vec<T, VEC>(y + col, v[c]);
    }
  }
}

// grad_input = scale * y * (dy - sum_j dy_j * y_j). grad_input may alias grad_output (each thread
// reads its elements before the reduction and writes them after).
template <typename T, int VEC, int CHUNKS, bool CAUSAL>
__global__ void __launch_bounds__(1024, 1)
softmax_backward_kernel(const T* grad_output, const T* __restrict__ softmax_output, T* grad_input,
                        int64_t rows, int64_t sq, int64_t sk, float scale, int tpr) {
  __shared__ float smem[32];
  const int t = threadIdx.x % tpr;
  const int64_t row_raw = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool active = row_raw < rows;
  const int64_t row = active ? row_raw : rows - 1;
  int64_t valid = sk;
  if (CAUSAL) {
    valid = row % sq + (sk - sq) + 1;
    valid = valid < 0 ? 0 : (valid > sk ? sk : valid);
  }
  const int64_t base = row * sk;

  float g[CHUNKS][VEC];
  float p[CHUNKS][VEC];
  float dot = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * tpr + t) * VEC;  // < kMaxRowLength
    if (active && col < valid) {  // y == 0 beyond `valid` for causal rows: skip reading it
      load_vec<T, VEC>(grad_output + base + col, g[c]);
      load_vec<T, VEC>(softmax_output + base + col, p[c]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[c][k] = p[c][k] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) dot += g[c][k] * p[c][k];
  }
  dot = row_reduce(dot, smem, tpr, SumOp());

#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * tpr + t) * VEC;  // < kMaxRowLength
    if (active && col < sk) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[c][k] = scale * p[c][k] * (g[c][k] - dot);
      store_vec<T, VEC>(grad_input + base + col, g[c]);
    }
  }
}

template <int VEC>
bool row_config(int64_t sk, RowConfig* cfg, int64_t rows, int64_t* blocks) {
  if (!choose_row_config(sk / VEC, ChunkList<VEC>::values, ChunkList<VEC>::size, 1024, cfg)) return false;
  *blocks = (rows + cfg->rows_per_block - 1) / cfg->rows_per_block;
  return *blocks <= 0x7fffffff;
}

template <typename T, int VEC, bool CAUSAL>
cudaError_t forward_vec(const void* input, const uint8_t* mask, void* output, int64_t rows, int64_t sq,
                        int64_t sk, int64_t rows_per_batch, bool mask_broadcast, float scale, cudaStream_t stream) {
  RowConfig cfg;
  int64_t blocks = 0;
  if (!row_config<VEC>(sk, &cfg, rows, &blocks)) return cudaErrorInvalidValue;
  return with_chunks<VEC>(cfg.chunks, [&](auto ch) {
    constexpr int CH = decltype(ch)::value;
    softmax_forward_kernel<T, VEC, CH, CAUSAL><<<static_cast<unsigned>(blocks), cfg.block, 0, stream>>>(
        static_cast<const T*>(input), mask, static_cast<T*>(output), rows, sq, sk, rows_per_batch,
        mask_broadcast, scale * kLog2e, cfg.tpr);
    return cudaGetLastError();
  });
}

template <typename T, bool CAUSAL>
cudaError_t forward(const void* input, const uint8_t* mask, void* output, int64_t rows, int64_t sq, int64_t sk,
                    int64_t rows_per_batch, bool mask_broadcast, float scale, cudaStream_t stream) {
  if (sk < 1 || sk > kMaxRowLength || sq < 1 || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  constexpr int V = 16 / sizeof(T);
  const bool vec = sk % V == 0 && is_aligned(input, 16) && is_aligned(output, 16) && is_aligned(mask, V);
  return vec ? forward_vec<T, V, CAUSAL>(input, mask, output, rows, sq, sk, rows_per_batch, mask_broadcast, scale,
                                         stream)
             : forward_vec<T, 1, CAUSAL>(input, mask, output, rows, sq, sk, rows_per_batch, mask_broadcast, scale,
                                         stream);
}

template <typename T, int VEC, bool CAUSAL>
cudaError_t backward_vec(const void* grad_output, const void* softmax_output, void* grad_input, int64_t rows,
                         int64_t sq, int64_t sk, float scale, cudaStream_t stream) {
  RowConfig cfg;
  int64_t blocks = 0;
  if (!row_config<VEC>(sk, &cfg, rows, &blocks)) return cudaErrorInvalidValue;
  return with_chunks<VEC>(cfg.chunks, [&](auto ch) {
    constexpr int CH = decltype(ch)::value;
    softmax_backward_kernel<T, VEC, CH, CAUSAL><<<static_cast<unsigned>(blocks), cfg.block, 0, stream>>>(
        static_cast<const T*>(grad_output), static_cast<const T*>(softmax_output), static_cast<T*>(grad_input),
        rows, sq, sk, scale, cfg.tpr);
    return cudaGetLastError();
  });
}

template <typename T, bool CAUSAL>
cudaError_t backward(const void* grad_output, const void* softmax_output, void* grad_input, int64_t rows,
                     int64_t sq, int64_t sk, float scale, cudaStream_t stream) {
  if (sk < 1 || sk > kMaxRowLength || sq < 1 || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  constexpr int V = 16 / sizeof(T);
  const bool vec = sk % V == 0 && is_aligned(grad_output, 16) && is_aligned(softmax_output, 16) &&
                   is_aligned(grad_input, 16);
  return vec ? backward_vec<T, V, CAUSAL>(grad_output, softmax_output, grad_input, rows, sq, sk, scale, stream)
             : backward_vec<T, 1, CAUSAL>(grad_output, softmax_output, grad_input, rows, sq, sk, scale, stream);
}

}  // namespace

cudaError_t scaled_masked_softmax_forward(DType dtype, const void* input, const uint8_t* mask, void* output,
                                          int64_t b, int64_t np, int64_t sq, int64_t sk,
                                          bool mask_batch_broadcast, float scale, cudaStream_t stream) {
  const int64_t rows = b * np * sq;
  switch (dtype) {
    case DType::kFloat16:
      return forward<__half, false>(input, mask, output, rows, sq, sk, np * sq, mask_batch_broadcast, scale, stream);
    case DType::kBFloat16:
      return forward<__nv_bfloat16, false>(input, mask, output, rows, sq, sk, np * sq, mask_batch_broadcast, scale,
                                           stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t scaled_masked_softmax_backward(DType dtype, const void* grad_output, const void* softmax_output,
                                           void* grad_input, int64_t rows, int64_t sk, float scale,
                                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return backward<__half, false>(grad_output, softmax_output, grad_input, rows, 1, sk, scale, stream);
    case DType::kBFloat16:
      return backward<__nv_bfloat16, false>(grad_output, softmax_output, grad_input, rows, 1, sk, scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t scaled_upper_triang_masked_softmax_forward(DType dtype, const void* input, void* output,
                                                       int64_t attn_batches, int64_t sq, int64_t sk,
                                                       float scale, cudaStream_t stream) {
  const int64_t rows = attn_batches * sq;
  switch (dtype) {
    case DType::kFloat16:
      return forward<__half, true>(input, nullptr, output, rows, sq, sk, sq, false, scale, stream);
    case DType::kBFloat16:
      return forward<__nv_bfloat16, true>(input, nullptr, output, rows, sq, sk, sq, false, scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t scaled_upper_triang_masked_softmax_backward(DType dtype, const void* grad_output,
                                                        const void* softmax_output, void* grad_input,
                                                        int64_t attn_batches, int64_t sq, int64_t sk,
                                                        float scale, cudaStream_t stream) {
  const int64_t rows = attn_batches * sq;
  switch (dtype) {
    case DType::kFloat16:
      return backward<__half, true>(grad_output, softmax_output, grad_input, rows, sq, sk, scale, stream);
    case DType::kBFloat16:
      return backward<__nv_bfloat16, true>(grad_output, softmax_output, grad_input, rows, sq, sk, scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace megatron_fused
