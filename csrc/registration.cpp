// Registers the CPU kernels of fastcp._C as torch ops (namespace "fastcp") so that autograd
// wrappers, torch.compile and the dispatcher see them.
#include <torch/extension.h>
#include <torch/library.h>

namespace fastcp {

// y[b, j] = x[b, j] * g[b]: per-row scaling, the gating step of the routed LoRA path.
at::Tensor row_scale_cpu(const at::Tensor& x, const at::Tensor& g) {
  TORCH_CHECK(x.dim() == 2, "row_scale: x must be 2-D [M, N], got ", x.dim(), "-D");
  TORCH_CHECK(g.dim() == 1 && g.size(0) == x.size(0), "row_scale: g must be [M]");
  auto xc = x.contiguous();
  auto gc = g.to(x.scalar_type()).contiguous();
  auto y = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "row_scale_cpu", [&] {
    const auto* xp = xc.data_ptr<scalar_t>();
    const auto* gp = gc.data_ptr<scalar_t>();
    auto* yp = y.data_ptr<scalar_t>();
    const int64_t M = xc.size(0), N = xc.size(1);
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t s = gp[m];
        for (int64_t n = 0; n < N; ++n) yp[m * N + n] = xp[m * N + n] * s;
      }
    });
  });
  return y;
}

}  // namespace fastcp

TORCH_LIBRARY(fastcp, m) {
  m.def("row_scale(Tensor x, Tensor g) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastcp, CPU, m) {
  m.impl("row_scale", &fastcp::row_scale_cpu);
}

// The module itself only needs to exist so that `import fastcp._C` loads the registrations.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcp C++/CUDA kernels (registered as torch.ops.fastcp.*)";
}
