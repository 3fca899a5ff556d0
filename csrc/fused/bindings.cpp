// Python bindings of the fused kernels (module megatron_fused_kernels): checks tensors, allocates
// outputs on the current CUDA stream's device and calls the launchers in fused_kernels.h.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <tuple>

#include "fused_kernels.h"

namespace mf = megatron_fused;

namespace {

mf::DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return mf::DType::kFloat32;
    case at::kHalf:
      return mf::DType::kFloat16;
    case at::kBFloat16:
      return mf::DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, ": expected float32/float16/bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_half(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
              " must be float16 or bfloat16, got ", t.scalar_type());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err),
              " (unsupported size? rows must be 1..", mf::kMaxRowLength, " elements)");
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor scaled_masked_softmax_forward(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                                         double scale) {
  check_half(input, "input");
  TORCH_CHECK(input.dim() == 4, "input must be [b, np, sq, sk], got ", input.sizes());
  const int64_t b = input.size(0), np = input.size(1), sq = input.size(2), sk = input.size(3);
  const uint8_t* mask_ptr = nullptr;
  bool broadcast = false;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_cuda(m, "mask");
    TORCH_CHECK(m.scalar_type() == at::kBool, "mask must be bool (True = masked out)");
    TORCH_CHECK(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == b) && m.size(1) == 1 && m.size(2) == sq &&
                    m.size(3) == sk,
                "mask must be [", b, "|1, 1, ", sq, ", ", sk, "], got ", m.sizes());
    TORCH_CHECK(m.device() == input.device(), "mask and input must be on the same device");
    mask_ptr = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
    broadcast = m.size(0) == 1;
  }
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty_like(input);
  check_launch(mf::scaled_masked_softmax_forward(to_dtype(input, "input"), input.data_ptr(), mask_ptr,
                                                 out.data_ptr(), b, np, sq, sk, broadcast,
                                                 static_cast<float>(scale), stream()),
               "scaled_masked_softmax_forward");
  return out;
}

at::Tensor scaled_masked_softmax_backward(const at::Tensor& grad_output, const at::Tensor& softmax_output,
                                          double scale) {
  check_half(grad_output, "grad_output");
  check_half(softmax_output, "softmax_output");
  TORCH_CHECK(grad_output.sizes() == softmax_output.sizes() &&
                  grad_output.scalar_type() == softmax_output.scalar_type(),
              "grad_output and softmax_output must match in shape and dtype");
  TORCH_CHECK(softmax_output.dim() >= 1 && softmax_output.size(-1) >= 1, "softmax_output must have rows, got ",
              softmax_output.sizes());
  const int64_t sk = softmax_output.size(-1);
  const c10::cuda::CUDAGuard guard(softmax_output.device());
  at::Tensor grad_input = at::empty_like(softmax_output);
  check_launch(mf::scaled_masked_softmax_backward(to_dtype(softmax_output, "softmax_output"), grad_output.data_ptr(),
                                                  softmax_output.data_ptr(), grad_input.data_ptr(),
                                                  softmax_output.numel() / sk, sk, static_cast<float>(scale),
                                                  stream()),
               "scaled_masked_softmax_backward");
  return grad_input;
}

at::Tensor scaled_upper_triang_masked_softmax_forward(const at::Tensor& input, double scale) {
  check_half(input, "input");
  TORCH_CHECK(input.dim() == 3, "input must be [attn_batches, sq, sk], got ", input.sizes());
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty_like(input);
  check_launch(mf::scaled_upper_triang_masked_softmax_forward(to_dtype(input, "input"), input.data_ptr(),
                                                              out.data_ptr(), input.size(0), input.size(1),
                                                              input.size(2), static_cast<float>(scale), stream()),
               "scaled_upper_triang_masked_softmax_forward");
  return out;
}

at::Tensor scaled_upper_triang_masked_softmax_backward(const at::Tensor& grad_output,
                                                       const at::Tensor& softmax_output, double scale) {
  check_half(grad_output, "grad_output");
  check_half(softmax_output, "softmax_output");
  TORCH_CHECK(softmax_output.dim() == 3 && grad_output.sizes() == softmax_output.sizes() &&
                  grad_output.scalar_type() == softmax_output.scalar_type(),
              "grad_output and softmax_output must be matching [attn_batches, sq, sk] tensors");
  const c10::cuda::CUDAGuard guard(softmax_output.device());
  at::Tensor grad_input = at::empty_like(softmax_output);
  check_launch(mf::scaled_upper_triang_masked_softmax_backward(
                   to_dtype(softmax_output, "softmax_output"), grad_output.data_ptr(), softmax_output.data_ptr(),
                   grad_input.data_ptr(), softmax_output.size(0), softmax_output.size(1), softmax_output.size(2),
                   static_cast<float>(scale), stream()),
               "scaled_upper_triang_masked_softmax_backward");
  return grad_input;
}

void check_layer_norm_args(const at::Tensor& input, const at::Tensor& weight) {
  check_cuda(input, "input");
  check_cuda(weight, "weight");
  TORCH_CHECK(input.dim() == 2, "input must be [rows, hidden], got ", input.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == input.size(1), "weight must be [", input.size(1), "]");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() || weight.scalar_type() == at::kFloat,
              "weight must be float32 or the input dtype (", input.scalar_type(), "), got ", weight.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& input, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps,
                                                                  bool zero_centered_gamma) {
  check_layer_norm_args(input, weight);
  check_cuda(bias, "bias");
  TORCH_CHECK(bias.sizes() == weight.sizes() && bias.scalar_type() == weight.scalar_type(),
              "bias must match weight in shape and dtype");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t rows = input.size(0), hidden = input.size(1);
  at::Tensor out = at::empty_like(input);
  auto stat_opts = input.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({rows}, stat_opts);
  at::Tensor rstd = at::empty({rows}, stat_opts);
  check_launch(mf::layer_norm_forward(to_dtype(input, "input"), to_dtype(weight, "weight"), input.data_ptr(),
                                      weight.data_ptr(), bias.data_ptr(), out.data_ptr(), mean.data_ptr<float>(),
                                      rstd.data_ptr<float>(), rows, hidden, static_cast<float>(eps),
                                      zero_centered_gamma, stream()),
               "layer_norm_forward");
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad_output,
                                                                   const at::Tensor& input, const at::Tensor& mean,
                                                                   const at::Tensor& rstd, const at::Tensor& weight,
                                                                   bool zero_centered_gamma) {
  check_layer_norm_args(input, weight);
  check_cuda(grad_output, "grad_output");
  check_cuda(mean, "mean");
  check_cuda(rstd, "rstd");
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.scalar_type() == input.scalar_type(),
              "grad_output must match input in shape and dtype");
  const int64_t rows = input.size(0), hidden = input.size(1);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == rows &&
                  rstd.numel() == rows,
              "mean and rstd must be float32 [rows]");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_input = at::empty_like(input);
  if (rows == 0) return {grad_input, at::zeros_like(weight), at::zeros_like(weight)};
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_bias = at::empty_like(weight);
  const mf::DType ti = to_dtype(input, "input"), tw = to_dtype(weight, "weight");
  const int64_t parts = mf::layer_norm_backward_partials(ti, tw, grad_output.data_ptr(), input.data_ptr(),
                                                         weight.data_ptr(), grad_input.data_ptr(), rows, hidden);
  TORCH_CHECK(parts > 0, "layer_norm_backward: unsupported hidden size ", hidden, " (max ", mf::kMaxRowLength, ")");
  at::Tensor workspace = at::empty({2, parts, hidden}, input.options().dtype(at::kFloat));
  check_launch(mf::layer_norm_backward(ti, tw, grad_output.data_ptr(), input.data_ptr(), mean.data_ptr<float>(),
                                       rstd.data_ptr<float>(), weight.data_ptr(), grad_input.data_ptr(),
                                       grad_weight.data_ptr(), grad_bias.data_ptr(), workspace.data_ptr<float>(),
                                       rows, hidden, zero_centered_gamma, stream()),
               "layer_norm_backward");
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Megatron fused CUDA kernels: scaled (masked/causal) softmax and layer norm";
  m.attr("MAX_ROW_LENGTH") = mf::kMaxRowLength;
  m.def("scaled_masked_softmax_forward", &scaled_masked_softmax_forward, "softmax(scale * x) with bool mask",
        py::arg("input"), py::arg("mask"), py::arg("scale"));
  m.def("scaled_masked_softmax_backward", &scaled_masked_softmax_backward, py::arg("grad_output"),
        py::arg("softmax_output"), py::arg("scale"));
  m.def("scaled_upper_triang_masked_softmax_forward", &scaled_upper_triang_masked_softmax_forward,
        "causal softmax(scale * x)", py::arg("input"), py::arg("scale"));
  m.def("scaled_upper_triang_masked_softmax_backward", &scaled_upper_triang_masked_softmax_backward,
        py::arg("grad_output"), py::arg("softmax_output"), py::arg("scale"));
  m.def("layer_norm_forward", &layer_norm_forward, "returns (output, mean, rstd)", py::arg("input"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("zero_centered_gamma"));
  m.def("layer_norm_backward", &layer_norm_backward, "returns (grad_input, grad_weight, grad_bias)",
        py::arg("grad_output"), py::arg("input"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
        py::arg("zero_centered_gamma"));
}
