// Host launchers of the fused kernels. Plain C++ (no torch headers): the kernels in softmax.cu and
// layer_norm.cu compile with nvcc alone, and bindings.cpp (torch) calls these functions.
//
// All pointers are device pointers to contiguous row-major tensors. Every launcher returns
// cudaSuccess, or cudaErrorInvalidValue for unsupported sizes (checked before any launch), or the
// launch error. kMaxRowLength is the longest row (sk for softmax, hidden for layer norm).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace megatron_fused {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxRowLength = 16384;

// softmax(scale * x) over rows of length sk. input/output: [b, np, sq, sk] (rows = b * np * sq)
// in fp16/bf16. mask: bool (1 byte) [b|1, 1, sq, sk] or nullptr; mask_batch_broadcast when its first
// dim is 1. True = masked out. Fully masked rows give 0.
cudaError_t scaled_masked_softmax_forward(DType dtype, const void* input, const uint8_t* mask, void* output,
                                          int64_t b, int64_t np, int64_t sq, int64_t sk,
                                          bool mask_batch_broadcast, float scale, cudaStream_t stream);

// grad_input = scale * y * (dy - sum(dy * y)) per row; output may alias grad_output.
cudaError_t scaled_masked_softmax_backward(DType dtype, const void* grad_output, const void* softmax_output,
                                           void* grad_input, int64_t rows, int64_t sk, float scale,
                                           cudaStream_t stream);

// Causal: input/output [attn_batches, sq, sk]; (i, j) is masked when j > i + (sk - sq).
// Masked elements are written as 0 and never affect the result; of the masked triangle only the
// 16-byte vector holding the diagonal is loaded.
cudaError_t scaled_upper_triang_masked_softmax_forward(DType dtype, const void* input, void* output,
                                                       int64_t attn_batches, int64_t sq, int64_t sk,
                                                       float scale, cudaStream_t stream);

cudaError_t scaled_upper_triang_masked_softmax_backward(DType dtype, const void* grad_output,
                                                        const void* softmax_output, void* grad_input,
                                                        int64_t attn_batches, int64_t sq, int64_t sk,
                                                        float scale, cudaStream_t stream);

// Layer norm over rows of length hidden. input/output in `input_dtype`; weight/bias in
// `weight_dtype` (== input_dtype or kFloat32); mean/rstd: fp32 [rows].
// zero_centered_gamma: the applied scale is (1 + weight).
cudaError_t layer_norm_forward(DType input_dtype, DType weight_dtype, const void* input, const void* weight,
                               const void* bias, void* output, float* mean, float* rstd, int64_t rows,
                               int64_t hidden, float eps, bool zero_centered_gamma, cudaStream_t stream);

// Number of fp32 partial rows the backward needs in its workspace (workspace = 2 * partials * hidden
// floats). Depends on the same arguments as layer_norm_backward (pointer alignment included); returns
// -1 for unsupported sizes.
int64_t layer_norm_backward_partials(DType input_dtype, DType weight_dtype, const void* grad_output,
                                     const void* input, const void* weight, const void* grad_input,
                                     int64_t rows, int64_t hidden);

// grad_input in input_dtype [rows, hidden]; grad_weight/grad_bias in weight_dtype [hidden], reduced
// over rows in fp32 (deterministically: per-block partials, then a column reduction).
cudaError_t layer_norm_backward(DType input_dtype, DType weight_dtype, const void* grad_output,
                                const void* input, const float* mean, const float* rstd, const void* weight,
                                void* grad_input, void* grad_weight, void* grad_bias, float* workspace,
                                int64_t rows, int64_t hidden, bool zero_centered_gamma, cudaStream_t stream);

}  // namespace megatron_fused
