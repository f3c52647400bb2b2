// torch glue of fused_resnet._C: operator schemas, input checks, memory layout, allocation.
// The kernels themselves take plain pointers: csrc/cpu/*.cpp and the torch-free csrc/cuda/*.cu.
//
// The ops registered here are the C++ backend of the Python-level custom ops in
// fused_resnet/ops/ (which pick a backend and own the fake/autograd registrations). They are
// registered per dispatch key (CPU, and CUDA when built with CUDA), so PyTorch's dispatcher
// routes by device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "common/cutlass_conv_plan.h"
#include "common/kernel_format.h"
#include "common/types.h"
#include "cpu/bn_add_relu.h"

#ifdef FR_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/bn_add_relu_launch.h"
#endif

#define FR_STR_(x) #x
#define FR_STR(x) FR_STR_(x)

namespace fused_resnet {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Layout: kernels see a dense tensor in memory order. NCHW-contiguous input stays NCHW,
// channels_last-contiguous stays NHWC, anything else is copied to NCHW (kernel_format,
// common/kernel_format.h). The same rule is in fused_resnet/layout.py (fake tensors) and
// decides the bit order of the ReLU mask.

Geometry geometry(const Tensor& x, at::MemoryFormat fmt) {
  const int64_t hw = x.size(2) * x.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) return Geometry{x.size(0) * hw, x.size(1), 1};
  return Geometry{x.size(0), x.size(1), hw};
}

DType kernel_dtype(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: break;
  }
  TORCH_CHECK(false, "fused_resnet: unsupported dtype ", x.scalar_type(),
              "; expected float32, float16 or bfloat16");
}

void check_input(const Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, "fused_resnet: ", name, " must be 4-D (N, C, H, W), got ", x.dim(),
              "-D with shape ", x.sizes());
  kernel_dtype(x);
}

void check_like(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fused_resnet: ", name, " has shape ", t.sizes(),
              " but input has shape ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_resnet: ", name, " has dtype ",
              t.scalar_type(), " but input has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fused_resnet: ", name, " is on ", t.device(),
              " but input is on ", x.device());
}

Tensor per_channel(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "fused_resnet: ", name,
              " must have shape (", x.size(1), ",) for an input with ", x.size(1),
              " channels, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fused_resnet: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fused_resnet: ", name, " is on ", t.device(),
              " but input is on ", x.device());
  return t.contiguous();
}

// weight or bias: any floating dtype (fp16/bf16 models), used in fp32; undefined if absent.
Tensor optional_per_channel(const std::optional<Tensor>& t, const Tensor& x, const char* name) {
  if (!t.has_value() || !t->defined()) return Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), "fused_resnet: ", name,
              " must have shape (", x.size(1), ",) for an input with ", x.size(1),
              " channels, got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fused_resnet: ", name,
              " must be floating point, got ", t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), "fused_resnet: ", name, " is on ", t->device(),
              " but input is on ", x.device());
  return t->to(at::kFloat).contiguous();
}

const float* float_data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

Tensor checked_mask(const Tensor& mask, const Tensor& x, bool relu) {
  if (!relu) return mask;
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1 &&
                  mask.numel() == mask_bytes(x.numel()),
              "fused_resnet: mask must be a uint8 tensor of ", mask_bytes(x.numel()),
              " bytes (one bit per input element), got ", mask.scalar_type(), " of shape ",
              mask.sizes());
  TORCH_CHECK(mask.device() == x.device(), "fused_resnet: mask is on ", mask.device(),
              " but input is on ", x.device());
  return mask.contiguous();
}

Tensor empty_per_channel(const Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(at::kFloat));
}

Tensor empty_mask(const Tensor& x, bool written) {
  return at::empty({written ? mask_bytes(x.numel()) : 0}, x.options().dtype(at::kByte));
}

Tensor empty_like_format(const Tensor& x, at::MemoryFormat fmt) {
  return at::empty(x.sizes(), x.options().memory_format(fmt));
}

#ifdef FR_WITH_CUDA
cudaStream_t current_stream(const Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fused_resnet: ", what, " CUDA launch failed: ",
              cudaGetErrorString(err));
}

Tensor workspace(const Tensor& x, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}
#endif

const void* data_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// The inputs both backward pieces read, checked and laid out in the input's kernel format.
struct GradInputs {
  at::MemoryFormat fmt;
  Tensor x, grad, mask, mean;
  Geometry g;
  const uint8_t* mask_ptr;  // nullptr without ReLU
};

GradInputs grad_inputs(const Tensor& grad, const Tensor& mask, const Tensor& x_in,
                       const Tensor& mean, bool relu) {
  check_input(x_in, "input");
  check_like(grad, x_in, "grad");
  GradInputs in;
  in.fmt = kernel_format(x_in);
  in.x = x_in.contiguous(in.fmt);
  in.grad = grad.contiguous(in.fmt);
  in.mask = checked_mask(mask, in.x, relu);
  in.mean = per_channel(mean, in.x, "mean");
  in.g = geometry(in.x, in.fmt);
  in.mask_ptr = relu ? in.mask.const_data_ptr<uint8_t>() : nullptr;
  return in;
}

// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_stats(const Tensor& x_in,
                                                   const std::optional<Tensor>& weight_in,
                                                   const std::optional<Tensor>& bias_in,
                                                   double eps) {
  check_input(x_in, "input");
  const auto fmt = kernel_format(x_in);
  const Tensor x = x_in.contiguous(fmt);
  const Geometry g = geometry(x, fmt);
  const Tensor weight = optional_per_channel(weight_in, x, "weight");
  const Tensor bias = optional_per_channel(bias_in, x, "bias");
  Tensor mean = empty_per_channel(x), var = empty_per_channel(x);
  Tensor scale = empty_per_channel(x), shift = empty_per_channel(x);
  const StatsOutputs out{mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(),
                         scale.mutable_data_ptr<float>(), shift.mutable_data_ptr<float>()};
  const float* w = float_data_or_null(weight);
  const float* b = float_data_or_null(bias);
#ifdef FR_WITH_CUDA
  if (x.is_cuda()) {
    c10::cuda::CUDAGuard guard(x.device());
    Tensor ws = workspace(x, cuda::bn_stats_workspace_bytes(g));
    check_launch(cuda::bn_stats(kernel_dtype(x), x.const_data_ptr(), g, w, b,
                                static_cast<float>(eps), out, ws.mutable_data_ptr(),
                                current_stream(x)),
                 "bn_stats");
    return {mean, var, scale, shift};
  }
#endif
  cpu::bn_stats(kernel_dtype(x), x.const_data_ptr(), g, w, b, static_cast<float>(eps), out);
  return {mean, var, scale, shift};
}

std::tuple<Tensor, Tensor> bn_add_relu_apply(const Tensor& x_in,
                                             const std::optional<Tensor>& residual_in,
                                             const Tensor& scale_in, const Tensor& shift_in,
                                             bool relu, bool save_mask,
                                             const std::optional<Tensor>& mean_in) {
  check_input(x_in, "input");
  const auto fmt = kernel_format(x_in);
  const Tensor x = x_in.contiguous(fmt);
  Tensor residual;
  if (residual_in.has_value() && residual_in->defined()) {
    check_like(*residual_in, x, "residual");
    residual = residual_in->contiguous(fmt);
  }
  const Tensor scale = per_channel(scale_in, x, "scale");
  const Tensor shift = per_channel(shift_in, x, "shift");
  const Tensor mean =
      mean_in.has_value() && mean_in->defined() ? per_channel(*mean_in, x, "mean") : Tensor();
  const Geometry g = geometry(x, fmt);
  Tensor out = empty_like_format(x, fmt);
  save_mask = save_mask && relu;
  Tensor mask = empty_mask(x, save_mask);
  uint8_t* mask_ptr = save_mask ? mask.mutable_data_ptr<uint8_t>() : nullptr;
#ifdef FR_WITH_CUDA
  if (x.is_cuda()) {
    c10::cuda::CUDAGuard guard(x.device());
    check_launch(cuda::bn_add_relu_apply(kernel_dtype(x), x.const_data_ptr(),
                                         data_or_null(residual), float_data_or_null(mean),
                                         scale.const_data_ptr<float>(),
                                         shift.const_data_ptr<float>(), relu, g,
                                         out.mutable_data_ptr(), mask_ptr, current_stream(x)),
                 "bn_add_relu_apply");
    return {out, mask};
  }
#endif
  cpu::bn_add_relu_apply(kernel_dtype(x), x.const_data_ptr(), data_or_null(residual),
                         float_data_or_null(mean), scale.const_data_ptr<float>(),
                         shift.const_data_ptr<float>(), relu, g, out.mutable_data_ptr(),
                         mask_ptr);
  return {out, mask};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_grad_reduce(
    const Tensor& grad_in, const Tensor& mask_in, const Tensor& x_in, const Tensor& mean_in,
    const Tensor& var_in, const std::optional<Tensor>& weight_in, double eps, bool relu,
    bool training) {
  const GradInputs in = grad_inputs(grad_in, mask_in, x_in, mean_in, relu);
  const Tensor &x = in.x, &grad = in.grad, &mean = in.mean;
  const Tensor var = per_channel(var_in, x, "var");
  const Tensor weight = optional_per_channel(weight_in, x, "weight");
  const Geometry g = in.g;
  Tensor k = empty_per_channel(x), b = empty_per_channel(x), c = empty_per_channel(x);
  Tensor grad_weight = empty_per_channel(x), grad_bias = empty_per_channel(x);
  const BackwardOutputs out{k.mutable_data_ptr<float>(), b.mutable_data_ptr<float>(),
                            c.mutable_data_ptr<float>(), grad_weight.mutable_data_ptr<float>(),
                            grad_bias.mutable_data_ptr<float>()};
  const float* w = float_data_or_null(weight);
#ifdef FR_WITH_CUDA
  if (x.is_cuda()) {
    c10::cuda::CUDAGuard guard(x.device());
    Tensor ws = workspace(x, cuda::grad_reduce_workspace_bytes(g));
    check_launch(cuda::bn_add_relu_grad_reduce(
                     kernel_dtype(x), grad.const_data_ptr(), in.mask_ptr, x.const_data_ptr(),
                     mean.const_data_ptr<float>(), var.const_data_ptr<float>(), w,
                     static_cast<float>(eps), relu, training, g, out, ws.mutable_data_ptr(),
                     current_stream(x)),
                 "bn_add_relu_grad_reduce");
    return {k, b, c, grad_weight, grad_bias};
  }
#endif
  cpu::bn_add_relu_grad_reduce(kernel_dtype(x), grad.const_data_ptr(), in.mask_ptr,
                               x.const_data_ptr(), mean.const_data_ptr<float>(),
                               var.const_data_ptr<float>(), w, static_cast<float>(eps), relu,
                               training, g, out);
  return {k, b, c, grad_weight, grad_bias};
}

// into_grad: the input gradient written over `grad` itself (see
// bn_add_relu_grad_apply_into_grad), which must then be dense in the input's kernel layout.
std::tuple<Tensor, Tensor> grad_apply(const Tensor& grad_in, const Tensor& mask_in,
                                      const Tensor& x_in, const Tensor& mean_in,
                                      const Tensor& k_in, const Tensor& b_in, const Tensor& c_in,
                                      bool relu, bool residual_grad, bool into_grad) {
  const GradInputs in = grad_inputs(grad_in, mask_in, x_in, mean_in, relu);
  const Tensor &x = in.x, &grad = in.grad, &mean = in.mean;
  const auto fmt = in.fmt;
  const Geometry g = in.g;
  const uint8_t* mask_ptr = in.mask_ptr;
  const Tensor k = per_channel(k_in, x, "k");
  const Tensor b = per_channel(b_in, x, "b");
  const Tensor c = per_channel(c_in, x, "c");
  TORCH_CHECK(!into_grad || grad.is_same(grad_in),
              "fused_resnet: bn_add_relu_grad_apply_into_grad: grad must be dense in the input's "
              "memory format, of its dtype (got strides ", grad_in.strides(), ", ",
              grad_in.scalar_type(), ")");
  // Each element's gradient is read before its result is written, at the same place.
  Tensor dx = into_grad ? grad : empty_like_format(x, fmt);
  Tensor dres = residual_grad ? empty_like_format(x, fmt) : at::empty({0}, x.options());
  void* dres_ptr = residual_grad ? dres.mutable_data_ptr() : nullptr;
#ifdef FR_WITH_CUDA
  if (x.is_cuda()) {
    c10::cuda::CUDAGuard guard(x.device());
    check_launch(cuda::bn_add_relu_grad_apply(
                     kernel_dtype(x), grad.const_data_ptr(), mask_ptr, x.const_data_ptr(),
                     mean.const_data_ptr<float>(), k.const_data_ptr<float>(),
                     b.const_data_ptr<float>(), c.const_data_ptr<float>(), relu, g,
                     dx.mutable_data_ptr(), dres_ptr, current_stream(x)),
                 "bn_add_relu_grad_apply");
    return {dx, dres};
  }
#endif
  cpu::bn_add_relu_grad_apply(kernel_dtype(x), grad.const_data_ptr(), mask_ptr,
                              x.const_data_ptr(), mean.const_data_ptr<float>(),
                              k.const_data_ptr<float>(), b.const_data_ptr<float>(),
                              c.const_data_ptr<float>(), relu, g, dx.mutable_data_ptr(), dres_ptr);
  return {dx, dres};
}

std::tuple<Tensor, Tensor> bn_add_relu_grad_apply(const Tensor& grad, const Tensor& mask,
                                                  const Tensor& x, const Tensor& mean,
                                                  const Tensor& k, const Tensor& b,
                                                  const Tensor& c, bool relu,
                                                  bool residual_grad) {
  return grad_apply(grad, mask, x, mean, k, b, c, relu, residual_grad, false);
}

// bn_add_relu_grad_apply's input gradient written over `grad` (returned): for a caller that
// alone holds `grad` (the CPU training step's conv input gradient; never an incoming gradient,
// which autograd may share). A CPU kernel writing fresh memory took ~1.8x as long as in place
// (8x256x56x56 fp32 channels_last: 1.68 vs 0.95 ms on a 2-core Intel Xeon).
Tensor& bn_add_relu_grad_apply_into_grad(Tensor& grad, const Tensor& mask, const Tensor& x,
                                         const Tensor& mean, const Tensor& k, const Tensor& b,
                                         const Tensor& c, bool relu) {
  grad_apply(grad, mask, x, mean, k, b, c, relu, false, true);
  return grad;
}

}  // namespace
}  // namespace fused_resnet

TORCH_LIBRARY_FRAGMENT(fused_resnet, m) {
  m.def(
      "bn_stats_cpp(Tensor input, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor mean, Tensor var, Tensor scale, Tensor shift)");
  m.def(
      "bn_add_relu_apply_cpp(Tensor input, Tensor? residual, Tensor scale, Tensor shift, "
      "bool relu, bool save_mask, Tensor? mean=None) -> (Tensor out, Tensor mask)");
  m.def(
      "bn_add_relu_grad_reduce_cpp(Tensor grad, Tensor mask, Tensor input, Tensor mean, "
      "Tensor var, Tensor? weight, float eps, bool relu, bool training) "
      "-> (Tensor k, Tensor b, Tensor c, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "bn_add_relu_grad_apply_cpp(Tensor grad, Tensor mask, Tensor input, Tensor mean, "
      "Tensor k, Tensor b, Tensor c, bool relu, bool residual_grad) "
      "-> (Tensor grad_input, Tensor grad_residual)");
  m.def(
      "bn_add_relu_grad_apply_into_grad_cpp(Tensor(a!) grad, Tensor mask, Tensor input, "
      "Tensor mean, Tensor k, Tensor b, Tensor c, bool relu) -> Tensor(a!)");
}

#define FR_REGISTER_KERNELS(m)                                                        \
  m.impl("bn_stats_cpp", &fused_resnet::bn_stats);                                    \
  m.impl("bn_add_relu_apply_cpp", &fused_resnet::bn_add_relu_apply);                  \
  m.impl("bn_add_relu_grad_reduce_cpp", &fused_resnet::bn_add_relu_grad_reduce);      \
  m.impl("bn_add_relu_grad_apply_cpp", &fused_resnet::bn_add_relu_grad_apply);        \
  m.impl("bn_add_relu_grad_apply_into_grad_cpp",                                      \
         &fused_resnet::bn_add_relu_grad_apply_into_grad)

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) { FR_REGISTER_KERNELS(m); }

#ifdef FR_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) { FR_REGISTER_KERNELS(m); }
#endif

// cutlass_conv_plan(n, h, w, c, k, r, s, stride, pad, dilation, groups, element_bytes)
//   -> (unsupported reason or None, padded_c, p, q, tile): the CUTLASS conv path's host-side
// decision (common/cutlass_conv_plan.h), in every build so the CPU tests can check it and
// the Python dispatcher can ask it before offering the CUTLASS candidate.
static PyObject* fr_cutlass_conv_plan(PyObject*, PyObject* args) {
  long long v[12];
  if (!PyArg_ParseTuple(args, "LLLLLLLLLLLL", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                        &v[7], &v[8], &v[9], &v[10], &v[11])) {
    return nullptr;
  }
  const fused_resnet::CutlassConvProblem problem{v[0], v[1], v[2], v[3], v[4],  v[5],
                                                 v[6], v[7], v[8], v[9], v[10], v[11]};
  const fused_resnet::CutlassConvPlan plan = fused_resnet::cutlass_conv_plan(problem);
  PyObject* reason = plan.unsupported ? PyUnicode_FromString(plan.unsupported) : Py_NewRef(Py_None);
  return Py_BuildValue("(NLLLi)", reason, (long long)plan.padded_c, (long long)plan.p,
                       (long long)plan.q, static_cast<int>(plan.tile));
}

static PyMethodDef fr_methods[] = {
    {"cutlass_conv_plan", fr_cutlass_conv_plan, METH_VARARGS,
     "CUTLASS conv path decision for a problem (see common/cutlass_conv_plan.h)"},
    {nullptr, nullptr, 0, nullptr}};

// A plain Python module (no pybind11): importing it runs the registrations above. Its
// attributes tell fused_resnet.info() what was built and against which torch.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fr_methods};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "built_with_torch", FR_STR(FR_TORCH_VERSION));
  // the instruction set the C++ CPU kernels run with on this machine (csrc/cpu/bn_add_relu.cpp)
  PyModule_AddStringConstant(m, "cpu_isa", fused_resnet::cpu::isa_name());
#ifdef FR_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
#ifdef FR_WITH_CUTLASS
  PyModule_AddIntConstant(m, "with_cutlass", 1);
#else
  PyModule_AddIntConstant(m, "with_cutlass", 0);
#endif
  return m;
}
