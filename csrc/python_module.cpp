// The importable module apl._C. Importing it loads this library, whose static TORCH_LIBRARY
// initialisers register the operators (torch.ops.apl.*). Its one function, `loss`, is the eager
// entry of apl.fused.apply: the op through the dispatcher with its scalar arguments taken from
// a tuple built once, returning the loss alone, without the generic torch.ops argument
// parsing (several times the kernel's own time at the batch sizes people train with).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

#include "ops.h"

namespace apl {
namespace {

constexpr Py_ssize_t kNumScalarArgs = 9;  // apl.fused.op_args: active .. ignore_index, label_smoothing

// A torch.Tensor or nn.Parameter, not a subclass with a __torch_function__ of its own.
bool is_plain_tensor(PyObject* obj) { return THPVariable_CheckExact(obj); }

// loss(logits, target, args, weight) -> Tensor, or NotImplemented for anything but plain
// tensors (subclasses, torch-function modes), which the caller then sends through torch.ops.
PyObject* loss(PyObject* /*module*/, PyObject* const* argv, Py_ssize_t argc) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(argc == 4, "apl._C.loss(logits, target, args, weight) takes 4 arguments, got ", argc);
  PyObject *py_logits = argv[0], *py_target = argv[1], *py_args = argv[2], *py_weight = argv[3];
  const bool weighted = py_weight != Py_None;
  if (at::impl::torch_function_mode_enabled() || !is_plain_tensor(py_logits) || !is_plain_tensor(py_target) ||
      (weighted && !is_plain_tensor(py_weight)))
    Py_RETURN_NOTIMPLEMENTED;
  TORCH_CHECK_TYPE(PyTuple_Check(py_args) && PyTuple_GET_SIZE(py_args) == kNumScalarArgs,
                   "apl._C.loss: args must be the tuple of apl.fused.op_args");
  int64_t ints[4];
  double reals[5];
  const int int_at[4] = {0, 1, 6, 7}, real_at[5] = {2, 3, 4, 5, 8};
  for (int i = 0; i < 4; ++i) ints[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(py_args, int_at[i]));
  for (int i = 0; i < 5; ++i) reals[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(py_args, real_at[i]));
  if (PyErr_Occurred()) return nullptr;
  const at::Tensor& logits = THPVariable_Unpack(py_logits);
  at::Tensor target = THPVariable_Unpack(py_target);
  const std::optional<at::Tensor> weight =
      weighted ? std::optional<at::Tensor>(THPVariable_Unpack(py_weight)) : std::nullopt;
  at::Tensor result;
  {
    pybind11::gil_scoped_release no_gil;
    // as apl.fused.apply: integer targets of any width, any layout
    if (at::isIntegralType(target.scalar_type(), /*includeBool=*/false) && target.scalar_type() != at::kLong)
      target = target.to(at::kLong);
    result = std::get<0>(call_apl_loss(logits.contiguous(), target.contiguous(), ints[0], ints[1], reals[0], reals[1],
                                       reals[2], reals[3], ints[2], ints[3], weight, reals[4]));
  }
  return THPVariable_Wrap(std::move(result));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"loss", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&loss)), METH_FASTCALL,
     "loss(logits, target, args, weight): the fused loss (apl.fused.apply's eager path)"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace apl

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "apl-repro's fused loss operators (torch.ops.apl)", -1, apl::methods,
  };
  return PyModule_Create(&module_def);
}
