// CUDA registrations of the fastcp ops (built only where CUDA torch + nvcc exist; see setup.py).
// Routed forward runs the SGMV shrink/expand kernels of sgmv.cu after a cuBLAS base GEMM; the
// other ops reuse the device-agnostic ATen compositions of multi_lora_cpu.cpp (cuBLAS GEMMs).
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <tuple>

extern "C" int fastcp_sgmv_shrink(int dtype, const void* X, const void* A, const float* scale, const int32_t* ids,
                                  float* S, int64_t M, int64_t IN, int64_t R, int64_t ldx, cudaStream_t stream);
extern "C" int fastcp_sgmv_expand(int dtype, const float* S, const void* B, const int32_t* ids, void* Y, int64_t M,
                                  int64_t OUT, int64_t R, int64_t ldy, cudaStream_t stream);

namespace fastcp {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_routed_backward(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool, bool, bool);
at::Tensor lora_dense_forward(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_dense_backward(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool, bool, bool, bool);

namespace {
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "fastcp sgmv: unsupported dtype ", t);
  }
  return -1;
}
}  // namespace

at::Tensor lora_routed_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                    const at::Tensor& A, const at::Tensor& B, const at::Tensor& scale,
                                    const at::Tensor& row_ids) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "fastcp sgmv: x must be a row-major CUDA matrix");
  const int64_t M = x.size(0), IN = x.size(1), OUT = weight.size(0), R = A.size(1);
  auto y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  auto Ac = A.contiguous(), Bc = B.contiguous();
  auto sc = scale.to(at::kFloat).contiguous();
  auto ids = row_ids.to(at::kInt).contiguous();
  auto S = at::empty({M, R}, x.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  const int code = dtype_code(x.scalar_type());
  int rc = fastcp_sgmv_shrink(code, x.data_ptr(), Ac.data_ptr(), sc.data_ptr<float>(), ids.data_ptr<int32_t>(),
                              S.data_ptr<float>(), M, IN, R, x.stride(0), stream);
  TORCH_CHECK(rc == 0, "fastcp sgmv shrink failed (code ", rc, "; ranks above 64 are not supported)");
  rc = fastcp_sgmv_expand(code, S.data_ptr<float>(), Bc.data_ptr(), ids.data_ptr<int32_t>(), y.data_ptr(), M, OUT, R,
                          y.stride(0), stream);
  TORCH_CHECK(rc == 0, "fastcp sgmv expand failed (code ", rc, ")");
  return y;
}

}  // namespace fastcp

TORCH_LIBRARY_IMPL(fastcp, CUDA, m) {
  m.impl("lora_routed_forward", &fastcp::lora_routed_forward_cuda);
  m.impl("lora_routed_backward", &fastcp::lora_routed_backward);
  m.impl("lora_dense_forward", &fastcp::lora_dense_forward);
  m.impl("lora_dense_backward", &fastcp::lora_dense_backward);
}
