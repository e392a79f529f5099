// Python entry point of sparsebert._C. The ops themselves are registered with the
// dispatcher (TORCH_LIBRARY in csrc/cpu and csrc/cuda); importing the module loads them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsebert compiled kernels (ops live under torch.ops.sparsebert_cpu / sparsebert_cuda)";
#ifdef SPARSEBERT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
