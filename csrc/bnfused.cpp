// The bnfused_native operator library: schemas, declared once. Kernels register per dispatch key
// (cpu/*.cpp: CPU, cuda/*.cu: CUDA); fake (meta) kernels are registered from Python
// (bnfused/backends/native.py). Arguments and results follow bnfused/backends/__init__.py.
// Also the extension's Python module, with the eager binding of the layer op.
#include <Python.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <optional>

TORCH_LIBRARY(bnfused_native, m) {
  // The whole layer, autograd included, in C++ (autograd.cpp): the low-overhead eager route.
  m.def(
      "batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps, int act, float slope, Tensor? residual=None) -> Tensor");
  m.def(
      "forward_train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float momentum, float eps, int act, float slope, Tensor? residual=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "forward_eval(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps, "
      "int act, float slope, Tensor? residual=None) -> Tensor");
  // Gradients that are not asked for come back undefined (None in Python).
  m.def(
      "backward(Tensor dy, Tensor x, Tensor? y, Tensor? weight, Tensor mean, Tensor invstd, int act, float slope, "
      "bool training, bool needs_input, bool needs_weight, bool needs_bias, Tensor? bias=None, Tensor? residual=None, "
      "bool needs_residual=False) -> (Tensor, Tensor, Tensor, Tensor)");
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

namespace bnfused {
namespace {

using at::Tensor;
using std::optional;

// ---------------------------------------------------------------------------- the eager binding
//
// torch.ops.bnfused_native.batch_norm.default(...) from Python parses its arguments against the
// schema and looks for __torch_function__ overrides: microseconds per call, as much as the kernels
// of a small layer. eager_batch_norm takes the same positional arguments with a fixed-type fast
// path (plain tensors or Parameters, a bool, floats, an int, an optional 11th argument that is a plain
// tensor or None: the residual; no torch function mode), calls the same
// op through the dispatcher (so autograd, inference mode, dispatch modes and subclasses with
// __torch_dispatch__ are handled as before), and hands every other call to the op itself.

PyObject* layer_op_fallback = nullptr;  // torch.ops.bnfused_native.batch_norm.default, set from Python

// Exactly torch.Tensor or torch.nn.Parameter: the classes whose __torch_function__ torch skips.
bool plain_tensor(PyObject* obj) {
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
  return type == THPVariableClass || type == ParameterClass;
}

optional<Tensor> optional_tensor(PyObject* obj) {
  return obj == Py_None ? optional<Tensor>() : optional<Tensor>(THPVariable_Unpack(obj));
}

// Releases the GIL while the op runs, as a torch.ops call does, and takes it back on any exit.
struct ReleasedGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleasedGil() { PyEval_RestoreThread(state); }
};

PyObject* eager_batch_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(layer_op_fallback != nullptr, "bnfused_native: eager_batch_norm called before set_fallback");
  bool fast = (nargs == 10 || nargs == 11) && !at::impl::torch_function_mode_enabled() && plain_tensor(args[0]) &&
              PyBool_Check(args[5]) && PyFloat_CheckExact(args[6]) && PyFloat_CheckExact(args[7]) &&
              PyLong_CheckExact(args[8]) && PyFloat_CheckExact(args[9]);
  for (Py_ssize_t i = 1; fast && i < 5; ++i) fast = args[i] == Py_None || plain_tensor(args[i]);
  if (fast && nargs == 11) fast = args[10] == Py_None || plain_tensor(args[10]);
  if (!fast) return PyObject_Vectorcall(layer_op_fallback, args, nargs, nullptr);
  int overflow = 0;
  const long long act = PyLong_AsLongLongAndOverflow(args[8], &overflow);
  if (overflow != 0) return PyObject_Vectorcall(layer_op_fallback, args, nargs, nullptr);
  using LayerFn = Tensor(const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
                         const optional<Tensor>&, bool, double, double, int64_t, double, const optional<Tensor>&);
  static const auto layer =
      c10::Dispatcher::singleton().findSchemaOrThrow("bnfused_native::batch_norm", "").typed<LayerFn>();
  const Tensor& x = THPVariable_Unpack(args[0]);
  const optional<Tensor> weight = optional_tensor(args[1]), bias = optional_tensor(args[2]),
                         running_mean = optional_tensor(args[3]), running_var = optional_tensor(args[4]),
                         residual = nargs == 11 ? optional_tensor(args[10]) : optional<Tensor>();
  const bool training = args[5] == Py_True;
  const double momentum = PyFloat_AS_DOUBLE(args[6]), eps = PyFloat_AS_DOUBLE(args[7]),
               slope = PyFloat_AS_DOUBLE(args[9]);
  Tensor y;
  {
    ReleasedGil no_gil;
    y = layer.call(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, residual);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// ---------------------------------------------------------------------------- the argument checks' fast path
//
// bnfused.functional.batch_norm checks its arguments with torch's exception types and messages. On a
// small layer, reading a dozen tensor attributes from Python costs microseconds, as much as the
// kernels. args_ok(x, running_mean, running_var, weight, bias, training) answers, in C++, whether a
// call passes every one of those checks with nothing left to adapt: True means the Python checks
// (check_arguments, _check_mode) would all pass, x has elements and needs no new layout
// (kernel_ready), and weight and bias are 1-D; False
// means "not shown here", and Python then runs its own checks, which find the problem (and raise
// torch's error) or adapt the arguments. Only plain tensors are read: a subclass's attributes may be
// overridden, so it takes the Python path.

bool is_floating_input(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// x as bnfused.layout.kernel_ready returns it unchanged: contiguous, else channels_last (3d), with
// that format's standard strides (size-1 dims included), which the output then takes, as torch's does.
bool kernel_ready(const Tensor& x) {
  // True when x's strides are a fresh tensor's, its dims ordered fastest first as in `order`.
  auto standard = [&](c10::ArrayRef<int64_t> order) {
    int64_t step = 1;
    for (const int64_t d : order) {
      if (x.stride(d) != step) return false;
      step *= std::max<int64_t>(x.size(d), 1);
    }
    return true;
  };
  if (x.is_contiguous()) {
    c10::SmallVector<int64_t, 8> order;
    for (int64_t d = x.dim() - 1; d >= 0; --d) order.push_back(d);
    return standard(order);
  }
  static constexpr int64_t kLast4[] = {1, 3, 2, 0}, kLast5[] = {1, 4, 3, 2, 0};
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return standard(kLast4);
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return standard(kLast5);
  return false;
}

PyObject* args_ok(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6 || !plain_tensor(args[0]) || !PyBool_Check(args[5])) Py_RETURN_FALSE;
  for (Py_ssize_t i = 1; i < 5; ++i) {
    if (args[i] != Py_None && !plain_tensor(args[i])) Py_RETURN_FALSE;
  }
  const Tensor& x = THPVariable_Unpack(args[0]);
  const bool training = args[5] == Py_True;
  const at::ScalarType dtype = x.scalar_type();
  if (!is_floating_input(dtype) || x.dim() < 2 || x.layout() != at::kStrided || !kernel_ready(x)) Py_RETURN_FALSE;
  const int64_t numel = x.numel(), channels = x.size(1);
  if (numel == 0) Py_RETURN_FALSE;  // the empty-input path
  if (training && numel / channels == 1) Py_RETURN_FALSE;  // one value per channel: refused in Python
  const at::Device device = x.device();
  std::optional<at::ScalarType> param_dtype;
  const bool has_mean = args[1] != Py_None, has_var = args[2] != Py_None;
  if (has_mean != has_var) Py_RETURN_FALSE;
  if (has_mean) {
    for (int i = 1; i <= 2; ++i) {
      const Tensor& stat = THPVariable_Unpack(args[i]);
      if (stat.layout() != at::kStrided || stat.dim() != 1 || stat.size(0) != channels || stat.requires_grad() || stat.device() != device) {
        Py_RETURN_FALSE;
      }
      if (param_dtype.has_value() && stat.scalar_type() != *param_dtype) Py_RETURN_FALSE;
      param_dtype = stat.scalar_type();
    }
  } else if (!training) {
    Py_RETURN_FALSE;  // eval needs running statistics
  }
  for (int i = 3; i <= 4; ++i) {  // weight, bias: 1-D here (Python reshapes other C-element shapes)
    if (args[i] == Py_None) continue;
    const Tensor& t = THPVariable_Unpack(args[i]);
    if (t.layout() != at::kStrided || t.dim() != 1 || t.size(0) != channels || t.device() != device) Py_RETURN_FALSE;
    if (param_dtype.has_value() && t.scalar_type() != *param_dtype) Py_RETURN_FALSE;
    param_dtype = t.scalar_type();
  }
  if (training && has_mean) {  // running stats sharing memory with another argument: see functional.py
    const Tensor& mean = THPVariable_Unpack(args[1]);
    const Tensor& var = THPVariable_Unpack(args[2]);
    if (!mean.has_storage() || !var.has_storage()) Py_RETURN_FALSE;  // e.g. vmap's batched tensors
    for (int i = 0; i < 5; ++i) {
      if (args[i] == Py_None) continue;
      const Tensor& t = THPVariable_Unpack(args[i]);
      if (!t.has_storage() || (i != 1 && t.storage().is_alias_of(mean.storage())) ||
          (i != 2 && t.storage().is_alias_of(var.storage()))) {
        Py_RETURN_FALSE;
      }
    }
  }
  const bool reduced = dtype == at::kHalf || dtype == at::kBFloat16;
  if (param_dtype.has_value() && *param_dtype != dtype && !(*param_dtype == at::kFloat && reduced)) {
    Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyObject* set_fallback(PyObject*, PyObject* callable) {
  Py_XDECREF(layer_op_fallback);
  Py_INCREF(callable);
  layer_op_fallback = callable;
  Py_RETURN_NONE;
}

PyMethodDef* eager_methods() {
  static PyMethodDef methods[] = {
      {"batch_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&eager_batch_norm)), METH_FASTCALL,
       "batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, residual=None) "
       "-> y: "
       "bnfused_native::batch_norm without torch.ops' argument parsing"},
      {"args_ok", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&args_ok)), METH_FASTCALL,
       "args_ok(x, running_mean, running_var, weight, bias, training) -> bool: batch_norm's arguments pass "
       "every check of bnfused.functional (False: not shown, check in Python)"},
      {"set_fallback", &set_fallback, METH_O, "set_fallback(op): what eager batch_norm calls off its fast path"},
      {nullptr, nullptr, 0, nullptr}};
  return methods;
}

}  // namespace
}  // namespace bnfused

// Importing the ahead-of-time build (bnfused._C, see setup.py) loads this library and so runs the
// registrations above. The module holds the eager binding of the layer op (above); the JIT build's
// library is imported as a module too, for that binding (bnfused/backends/native.py).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, bnfused::eager_methods()};
  return PyModule_Create(&module);
}
