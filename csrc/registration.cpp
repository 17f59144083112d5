// Schemas of every torch op in fastcp._C (namespace "fastcp"), in one place. The CPU kernels
// register their implementations in multi_lora_cpu.cpp, the CUDA ones in *_cuda.cpp, so autograd
// wrappers, torch.compile and the dispatcher see one op per kernel whatever the device.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastcp, m) {
  m.def("lora_routed_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor scale, Tensor row_ids) -> Tensor");
  m.def("lora_routed_backward(Tensor x, Tensor weight, Tensor A, Tensor B, Tensor scale, Tensor row_ids, Tensor dy, bool need_dx, bool need_da, bool need_db) -> (Tensor, Tensor, Tensor)");
  m.def("lora_dense_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor scale, Tensor gates) -> Tensor");
  m.def("lora_dense_backward(Tensor x, Tensor weight, Tensor A, Tensor B, Tensor scale, Tensor gates, Tensor dy, bool need_dx, bool need_da, bool need_db, bool need_dg) -> (Tensor, Tensor, Tensor, Tensor)");
}

// The module itself only needs to exist so that `import fastcp._C` loads the registrations.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcp C++/CUDA kernels (registered as torch.ops.fastcp.*)";
}
