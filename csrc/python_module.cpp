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

// The scalar arguments' count; apl.fused.OpArgs is a named tuple of exactly these fields, in
// APL_SCALAR_ARGS order (it is built from torch.ops.apl._scalar_args()).
#define APL_ARG_ONE(type, name, schema) +1
constexpr Py_ssize_t kNumScalarArgs = 0 APL_SCALAR_ARGS(APL_ARG_ONE);
#undef APL_ARG_ONE

int64_t as_scalar(PyObject* obj, int64_t*) { return PyLong_AsLongLong(obj); }
double as_scalar(PyObject* obj, double*) { return PyFloat_AsDouble(obj); }

// An OpArgs tuple as LossArgs, field by field in APL_SCALAR_ARGS order.
LossArgs parse_args(PyObject* tuple) {
  LossArgs args;
  Py_ssize_t i = 0;
#define APL_ARG_PARSE(type, name, schema) args.name = as_scalar(PyTuple_GET_ITEM(tuple, i++), &args.name);
  APL_SCALAR_ARGS(APL_ARG_PARSE)
#undef APL_ARG_PARSE
  return args;
}

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
                   "apl._C.loss: args must be an apl.fused.OpArgs");
  const LossArgs args = parse_args(py_args);
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
    result = std::get<0>(call_apl_loss(logits.contiguous(), target.contiguous(), args, weight));
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
