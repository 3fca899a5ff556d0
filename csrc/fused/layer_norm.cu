// Layer norm forward and backward with fp32 statistics.
//
// Rows of `hidden` elements are held in registers by `tpr` threads (same layout as softmax.cu).
// Forward: mean and variance by two passes over the registers (exact, no E[x^2] - E[x]^2 cancellation).
// Backward: one kernel computes grad_input per row and accumulates grad_weight/grad_bias partials per
// thread over a grid-stride loop of rows; a second kernel sums the partials in fp32 in a fixed order
// (deterministic, no atomics).
#include "common.cuh"

namespace megatron_fused {
namespace {

template <typename TI, typename TW, int VEC, int CHUNKS>
__global__ void __launch_bounds__(1024, 1)
layer_norm_forward_kernel(const TI* __restrict__ input, const TW* __restrict__ weight, const TW* __restrict__ bias,
                          TI* __restrict__ output, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                          int64_t rows, int64_t hidden, float eps, float gamma_shift, int tpr) {
  __shared__ float smem[32];
  const int t = threadIdx.x % tpr;
  const int64_t row_raw = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool active = row_raw < rows;
  const int64_t row = active ? row_raw : rows - 1;
  const TI* x = input + row * hidden;

  float v[CHUNKS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * tpr + t) * VEC;  // < kMaxRowLength
    if (active && col < hidden) {
      load_vec<TI, VEC>(x + col, v[c]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[c][k] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += v[c][k];
  }
  const float inv_h = 1.f / static_cast<float>(hidden);
  const float mean = row_reduce(sum, smem, tpr, SumOp()) * inv_h;

  float sq = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * tpr + t) * VEC;  // < kMaxRowLength
    if (col < hidden) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = v[c][k] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(row_reduce(sq, smem, tpr, SumOp()) * inv_h + eps);
  if (!active) return;  // no block-wide sync below
  if (t == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  TI* y = output + row * hidden;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * tpr + t) * VEC;  // < kMaxRowLength
    if (col < hidden) {
      float w[VEC], b[VEC];
      load_vec<TW, VEC>(weight + col, w);
      load_vec<TW, VEC>(bias + col, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[c][k] = (v[c][k] - mean) * rstd * (w[k] + gamma_shift) + b[k];
      store_vec<TI, VEC>(y + col, v[c]);
    }
  }
}

// Rows handled by row-group g: g, g + G, g + 2G, ... (G = gridDim.x * rows per block). Partials for
// grad_weight/grad_bias go to part_dw/part_db[g, :] (fp32). MAX_THREADS bounds registers per thread.
template <typename TI, typename TW, int VEC, int CHUNKS, int MAX_THREADS>
__global__ void __launch_bounds__(MAX_THREADS, 1)
layer_norm_backward_kernel(const TI* __restrict__ grad_output, const TI* __restrict__ input,
                           const float* __restrict__ mean, const float* __restrict__ rstd,
                           const TW* __restrict__ weight, TI* __restrict__ grad_input, float* __restrict__ part_dw,
                           float* __restrict__ part_db, int64_t rows, int64_t hidden, float gamma_shift, int tpr) {
  __shared__ float smem[32];
  const int t = threadIdx.x % tpr;
  const int rows_per_block = blockDim.x / tpr;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / tpr;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * rows_per_block;
  const int64_t iters = (rows + groups - 1) / groups;  // uniform over the block (row_reduce syncs)
  const float inv_h = 1.f / static_cast<float>(hidden);

  float dw[CHUNKS][VEC], db[CHUNKS][VEC];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[c][k] = db[c][k] = 0.f;
  }

  for (int64_t it = 0; it < iters; ++it) {
    const int64_t row_raw = group + it * groups;
    const bool active = row_raw < rows;
    const int64_t row = active ? row_raw : rows - 1;
    const float mu = mean[row];
    const float rs = rstd[row];
    const TI* x_row = input + row * hidden;
    const TI* dy_row = grad_output + row * hidden;
    TI* dx_row = grad_input + row * hidden;
    float xh[CHUNKS][VEC], g[CHUNKS][VEC];
    float s1 = 0.f, s2 = 0.f;  // sum(g * w'), sum(g * w' * xhat)
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = (c * tpr + t) * VEC;  // < kMaxRowLength
      if (active && col < hidden) {
        float w[VEC];
        load_vec<TI, VEC>(x_row + col, xh[c]);
        load_vec<TI, VEC>(dy_row + col, g[c]);
        load_vec<TW, VEC>(weight + col, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xh[c][k] = (xh[c][k] - mu) * rs;
          const float gw = g[c][k] * (w[k] + gamma_shift);
          s1 += gw;
          s2 += gw * xh[c][k];
          dw[c][k] += g[c][k] * xh[c][k];
          db[c][k] += g[c][k];
        }
      }
    }
    s1 = row_reduce(s1, smem, tpr, SumOp()) * inv_h;
    s2 = row_reduce(s2, smem, tpr, SumOp()) * inv_h;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = (c * tpr + t) * VEC;  // < kMaxRowLength
      if (active && col < hidden) {
        float w[VEC];
        load_vec<TW, VEC>(weight + col, w);  // L1 hit; cheaper than holding it in registers
#pragma unroll
        for (int k = 0; k < VEC; ++k) g[c][k] = rs * (g[c][k] * (w[k] + gamma_shift) - s1 - xh[c][k] * s2);
        store_vec<TI, VEC>(dx_row + col, g[c]);
      }
    }
  }
  float* pdw = part_dw + group * hidden;
  float* pdb = part_db + group * hidden;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (c * tpr + t) * VEC;  // < kMaxRowLength
    if (col < hidden) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        pdw[col + k] = dw[c][k];
        pdb[col + k] = db[c][k];
      }
    }
  }
}

// grad_weight[j] = sum_p part_dw[p, j] in a fixed order. Block (32, 16): 32 columns x 16 partial lanes.
template <typename TW>
__global__ void layer_norm_backward_reduce_kernel(const float* __restrict__ part_dw, const float* __restrict__ part_db,
                                                  int64_t parts, int64_t hidden, TW* __restrict__ grad_weight,
                                                  TW* __restrict__ grad_bias) {
  __shared__ float s_dw[16][33];
  __shared__ float s_db[16][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float a = 0.f, b = 0.f;
  if (col < hidden) {
    for (int64_t p = threadIdx.y; p < parts; p += 16) {
      a += part_dw[p * hidden + col];
      b += part_db[p * hidden + col];
    }
  }
  s_dw[threadIdx.y][threadIdx.x] = a;
  s_db[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    for (int i = 1; i < 16; ++i) {
      a += s_dw[i][threadIdx.x];
      b += s_db[i][threadIdx.x];
    }
    grad_weight[col] = from_float<TW>(a);
    grad_bias[col] = from_float<TW>(b);
  }
}

template <typename TI, typename TW, int VEC>
cudaError_t forward_vec(const void* input, const void* weight, const void* bias, void* output, float* mean,
                        float* rstd, int64_t rows, int64_t hidden, float eps, float shift, cudaStream_t stream) {
  RowConfig cfg;
  if (!choose_row_config(hidden / VEC, ChunkList<VEC>::values, ChunkList<VEC>::size, 1024, &cfg)) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = (rows + cfg.rows_per_block - 1) / cfg.rows_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  return with_chunks<VEC>(cfg.chunks, [&](auto ch) {
    constexpr int CH = decltype(ch)::value;
    layer_norm_forward_kernel<TI, TW, VEC, CH><<<static_cast<unsigned>(blocks), cfg.block, 0, stream>>>(
        static_cast<const TI*>(input), static_cast<const TW*>(weight), static_cast<const TW*>(bias),
        static_cast<TI*>(output), mean, rstd, rows, hidden, eps, shift, cfg.tpr);
    return cudaGetLastError();
  });
}

template <typename TI, typename TW>
constexpr int vec_width() {
  return 16 / sizeof(TI);
}

template <typename TI, typename TW>
bool vectorizable(int64_t hidden, const void* a, const void* b, const void* c, const void* d) {
  constexpr int V = vec_width<TI, TW>();
  return hidden % V == 0 && is_aligned(a, 16) && is_aligned(b, 16) && is_aligned(c, V * sizeof(TW)) &&
         is_aligned(d, V * sizeof(TW));
}

template <typename TI, typename TW>
cudaError_t forward(const void* input, const void* weight, const void* bias, void* output, float* mean, float* rstd,
                    int64_t rows, int64_t hidden, float eps, float shift, cudaStream_t stream) {
  if (hidden < 1 || hidden > kMaxRowLength || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  constexpr int V = vec_width<TI, TW>();
  if (vectorizable<TI, TW>(hidden, input, output, weight, bias)) {
    return forward_vec<TI, TW, V>(input, weight, bias, output, mean, rstd, rows, hidden, eps, shift, stream);
  }
  return forward_vec<TI, TW, 1>(input, weight, bias, output, mean, rstd, rows, hidden, eps, shift, stream);
}

// Plans (dry_run: only *partials is set) or launches the backward for vector width VEC.
template <typename TI, typename TW, int VEC>
cudaError_t backward_vec(bool dry_run, const void* grad_output, const void* input, const float* mean,
                         const float* rstd, const void* weight, void* grad_input, void* grad_weight, void* grad_bias,
                         float* workspace, int64_t rows, int64_t hidden, float shift, cudaStream_t stream,
                         int64_t* partials) {
  RowConfig cfg;
  if (!choose_row_config(hidden / VEC, ChunkList<VEC>::values, ChunkList<VEC>::size, 1024, &cfg)) {
    return cudaErrorInvalidValue;
  }
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  return with_chunks<VEC>(cfg.chunks, [&](auto ch) {
    constexpr int CH = decltype(ch)::value;
    // 16 floats per thread need ~90 registers: cap those kernels at 512 threads unless the row needs 1024.
    auto launch = [&](auto kernel) -> cudaError_t {
      int per_sm = 0;
      cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, cfg.block, 0);
      if (e != cudaSuccess) return e;
      const int64_t needed = (rows + cfg.rows_per_block - 1) / cfg.rows_per_block;
      int64_t blocks = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
      blocks = blocks < needed ? blocks : needed;
      *partials = blocks * cfg.rows_per_block;
      if (dry_run) return cudaSuccess;
      float* part_dw = workspace;
      float* part_db = workspace + *partials * hidden;
      kernel<<<static_cast<unsigned>(blocks), cfg.block, 0, stream>>>(
          static_cast<const TI*>(grad_output), static_cast<const TI*>(input), mean, rstd,
          static_cast<const TW*>(weight), static_cast<TI*>(grad_input), part_dw, part_db, rows, hidden, shift,
          cfg.tpr);
      e = cudaGetLastError();
      if (e != cudaSuccess) return e;
      const dim3 rblock(32, 16);
      const unsigned rgrid = static_cast<unsigned>((hidden + 31) / 32);
      layer_norm_backward_reduce_kernel<TW><<<rgrid, rblock, 0, stream>>>(
          part_dw, part_db, *partials, hidden, static_cast<TW*>(grad_weight), static_cast<TW*>(grad_bias));
      return cudaGetLastError();
    };
    if constexpr (VEC * CH > 8) {
      if (cfg.block > 512) return launch(layer_norm_backward_kernel<TI, TW, VEC, CH, 1024>);
      return launch(layer_norm_backward_kernel<TI, TW, VEC, CH, 512>);
    } else {
      return launch(layer_norm_backward_kernel<TI, TW, VEC, CH, 1024>);
    }
  });
}

template <typename TI, typename TW>
cudaError_t backward(bool dry_run, const void* grad_output, const void* input, const float* mean, const float* rstd,
                     const void* weight, void* grad_input, void* grad_weight, void* grad_bias, float* workspace,
                     int64_t rows, int64_t hidden, float shift, cudaStream_t stream, int64_t* partials) {
  *partials = -1;
  if (hidden < 1 || hidden > kMaxRowLength || rows < 1) return cudaErrorInvalidValue;
  constexpr int V = vec_width<TI, TW>();
  if (vectorizable<TI, TW>(hidden, grad_output, input, weight, nullptr) && is_aligned(grad_input, 16)) {
    return backward_vec<TI, TW, V>(dry_run, grad_output, input, mean, rstd, weight, grad_input, grad_weight,
                                   grad_bias, workspace, rows, hidden, shift, stream, partials);
  }
  return backward_vec<TI, TW, 1>(dry_run, grad_output, input, mean, rstd, weight, grad_input, grad_weight, grad_bias,
                                 workspace, rows, hidden, shift, stream, partials);
}

// Calls f(TI{}, TW{}) for the supported (input, weight) dtype pairs.
template <typename F>
cudaError_t dispatch(DType input_dtype, DType weight_dtype, F&& f) {
  const bool w32 = weight_dtype == DType::kFloat32;
  switch (input_dtype) {
    case DType::kFloat32:
      if (w32) return f(float{}, float{});
      break;
    case DType::kFloat16:
      if (w32) return f(__half{}, float{});
      if (weight_dtype == DType::kFloat16) return f(__half{}, __half{});
      break;
    case DType::kBFloat16:
      if (w32) return f(__nv_bfloat16{}, float{});
      if (weight_dtype == DType::kBFloat16) return f(__nv_bfloat16{}, __nv_bfloat16{});
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t layer_norm_forward(DType input_dtype, DType weight_dtype, const void* input, const void* weight,
                               const void* bias, void* output, float* mean, float* rstd, int64_t rows,
                               int64_t hidden, float eps, bool zero_centered_gamma, cudaStream_t stream) {
  const float shift = zero_centered_gamma ? 1.f : 0.f;
  return dispatch(input_dtype, weight_dtype, [&](auto ti, auto tw) {
    using TI = decltype(ti);
    using TW = decltype(tw);
    return forward<TI, TW>(input, weight, bias, output, mean, rstd, rows, hidden, eps, shift, stream);
  });
}

int64_t layer_norm_backward_partials(DType input_dtype, DType weight_dtype, const void* grad_output,
                                     const void* input, const void* weight, const void* grad_input, int64_t rows,
                                     int64_t hidden) {
  int64_t partials = -1;
  const cudaError_t err = dispatch(input_dtype, weight_dtype, [&](auto ti, auto tw) {
    using TI = decltype(ti);
    using TW = decltype(tw);
    return backward<TI, TW>(true, grad_output, input, nullptr, nullptr, weight, const_cast<void*>(grad_input),
                            nullptr, nullptr, nullptr, rows, hidden, 0.f, nullptr, &partials);
  });
  return err == cudaSuccess ? partials : -1;
}

cudaError_t layer_norm_backward(DType input_dtype, DType weight_dtype, const void* grad_output, const void* input,
                                const float* mean, const float* rstd, const void* weight, void* grad_input,
                                void* grad_weight, void* grad_bias, float* workspace, int64_t rows, int64_t hidden,
                                bool zero_centered_gamma, cudaStream_t stream) {
  const float shift = zero_centered_gamma ? 1.f : 0.f;
  int64_t partials = 0;
  return dispatch(input_dtype, weight_dtype, [&](auto ti, auto tw) {
    using TI = decltype(ti);
    using TW = decltype(tw);
    return backward<TI, TW>(false, grad_output, input, mean, rstd, weight, grad_input, grad_weight, grad_bias,
                            workspace, rows, hidden, shift, stream, &partials);
  });
}

}  // namespace megatron_fused
