// int8 convolutions on ATen's prepacked oneDNN conv (the eager quantized engine's
// PackedConvWeightsOnednn), callable on plain uint8 tensors so Inductor can run them as
// extern kernels. See fxpress/backends/onednn_conv.py for why and when.
//
// A packed conv is registered once (fxpress::register_conv) and called by handle: the packed
// object is a TorchScript custom class, which Inductor graphs cannot carry as a constant.
// Inputs are wrapped as quint8 without a copy and outputs are returned as uint8 views of the
// quantized result (no copy; int_repr() costs ~70 us per 200 kB here).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/quantized/PackedParams.h>
#include <ATen/quantized/Quantizer.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

namespace {

using Packed = c10::intrusive_ptr<ConvPackedParamsBase<2>>;

std::mutex registry_mutex;
std::vector<Packed> registry;

Packed lookup(int64_t handle) {
  std::lock_guard<std::mutex> guard(registry_mutex);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()) && registry[handle],
              "fxpress::qconv2d: no packed convolution with handle ", handle,
              " (released with its lowered model?)");
  return registry[handle];
}

int64_t register_conv(const Packed& packed) {
  std::lock_guard<std::mutex> guard(registry_mutex);
  registry.push_back(packed);
  return static_cast<int64_t>(registry.size()) - 1;
}

void release_conv(int64_t handle) {
  std::lock_guard<std::mutex> guard(registry_mutex);
  if (handle >= 0 && handle < static_cast<int64_t>(registry.size())) registry[handle].reset();
}

at::Tensor as_quint8(const at::Tensor& x, double scale, int64_t zero_point, const char* what) {
  TORCH_CHECK(x.scalar_type() == at::kByte && x.dim() == 4 && x.device().is_cpu(),
              "fxpress::qconv2d: ", what, " must be a 4-D uint8 CPU tensor, got ",
              x.scalar_type(), " of ", x.dim(), " dims on ", x.device());
  at::Tensor c = x.is_contiguous(at::MemoryFormat::ChannelsLast)
                     ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  return at::from_blob_quantized_per_tensor_affine(
      c.data_ptr(), c.sizes(), c.strides(), [c](void*) {}, static_cast<float>(scale),
      zero_point, c.options().dtype(at::kQUInt8));
}

at::Tensor as_uint8(const at::Tensor& q) {
  return at::empty({0}, q.options().dtype(at::kByte))
      .set_(q.storage(), q.storage_offset(), q.sizes(), q.strides());
}

// quantized::conv2d_add[_relu] dispatch on the global quantized engine: ONEDNN for the call
struct OnednnEngine {
  at::QEngine prev;
  OnednnEngine() : prev(at::globalContext().qEngine()) {
    at::globalContext().setQEngine(at::QEngine::ONEDNN);
  }
  ~OnednnEngine() { at::globalContext().setQEngine(prev); }
};

at::Tensor qconv2d(const at::Tensor& x, int64_t handle, double x_scale, int64_t x_zero_point,
                   double y_scale, int64_t y_zero_point, bool relu) {
  Packed p = lookup(handle);
  at::Tensor qx = as_quint8(x, x_scale, x_zero_point, "input");
  return as_uint8(relu ? p->apply_relu(qx, y_scale, y_zero_point)
                       : p->apply(qx, y_scale, y_zero_point));
}

at::Tensor qconv2d_add(const at::Tensor& x, const at::Tensor& accum, int64_t handle,
                       double x_scale, int64_t x_zero_point, double a_scale,
                       int64_t a_zero_point, double y_scale, int64_t y_zero_point, bool relu) {
  using Sig = at::Tensor(at::Tensor, at::Tensor, const Packed&, double, int64_t);
  static auto add = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("quantized::conv2d_add", "").typed<Sig>();
  static auto add_relu = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("quantized::conv2d_add_relu", "").typed<Sig>();
  Packed p = lookup(handle);
  at::Tensor qx = as_quint8(x, x_scale, x_zero_point, "input");
  at::Tensor qa = as_quint8(accum, a_scale, a_zero_point, "accumulator");
  OnednnEngine engine;
  return as_uint8((relu ? add_relu : add).call(qx, qa, p, y_scale, y_zero_point));
}

}  // namespace

TORCH_LIBRARY(fxpress, m) {
  m.def("register_conv(__torch__.torch.classes.quantized.Conv2dPackedParamsBase packed) -> int",
        &register_conv);
  m.def("release_conv(int handle) -> ()", &release_conv);
  m.def("qconv2d(Tensor x, int handle, float x_scale, int x_zero_point, float y_scale, "
        "int y_zero_point, bool relu) -> Tensor");
  m.def("qconv2d_add(Tensor x, Tensor accum, int handle, float x_scale, int x_zero_point, "
        "float a_scale, int a_zero_point, float y_scale, int y_zero_point, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxpress, CPU, m) {
  m.impl("qconv2d", &qconv2d);
  m.impl("qconv2d_add", &qconv2d_add);
}
