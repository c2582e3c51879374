// The bnfused_native operator library: schemas, declared once. Kernels register per dispatch key
// (cpu/*.cpp: CPU, cuda/*.cu: CUDA); fake (meta) kernels are registered from Python
// (bnfused/backends/native.py). Arguments and results follow bnfused/backends/__init__.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(bnfused_native, m) {
  // The whole layer, autograd included, in C++ (autograd.cpp): the low-overhead eager route.
  m.def(
      "batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps, int act, float slope) -> Tensor");
  m.def(
      "forward_train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float momentum, float eps, int act, float slope) -> (Tensor, Tensor, Tensor)");
  m.def(
      "forward_eval(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps, "
      "int act, float slope) -> Tensor");
  // Gradients that are not asked for come back undefined (None in Python).
  m.def(
      "backward(Tensor dy, Tensor x, Tensor? y, Tensor? weight, Tensor mean, Tensor invstd, int act, float slope, "
      "bool training, bool needs_input, bool needs_weight, bool needs_bias) -> (Tensor, Tensor, Tensor)");
  m.def("batch_stats(Tensor x) -> (Tensor, Tensor)");
  m.def(
      "normalize(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, int act, float slope) "
      "-> Tensor");
  m.def(
      "backward_reduce(Tensor dy, Tensor x, Tensor? y, Tensor mean, Tensor invstd, int act, float slope) "
      "-> (Tensor, Tensor)");
  m.def(
      "backward_elemt(Tensor dy, Tensor x, Tensor? y, Tensor? weight, Tensor mean, Tensor invstd, Tensor sum_dy, "
      "Tensor sum_dy_xhat, int count, int act, float slope) -> Tensor");
}

// Importing the ahead-of-time build (bnfused._C, see setup.py) loads this library and so runs the
// registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
