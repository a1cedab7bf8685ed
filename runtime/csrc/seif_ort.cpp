// libseif_ort.so: registers the ai.seif custom ops (SeifRouter, SeifMoE) with ONNX Runtime.
//
// Load it with SessionOptions.register_custom_ops_library(path); ORT calls RegisterCustomOps.
// The library does not link against libonnxruntime: ORT_API_MANUAL_INIT makes the C++ wrappers
// use the API table ORT hands over at registration.
//
// Ops are built with the lite custom-op API (Ort::Custom::CreateLiteCustomOp). Their Compute
// takes the raw OrtKernelContext, because the lite argument adapters cannot express an absent
// optional input ("") in the middle of the input list; the input/output type lists are set
// explicitly, one registration per supported dtype combination (ORT merges registrations of one
// op name into one schema and picks the kernel by the node's types).
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "seif_kernels.h"
#ifdef SEIF_WITH_CUDA
#include "seif_cuda.h"
#endif

namespace {

constexpr const char* kDomain = "ai.seif";
constexpr const char* kCpuEp = "CPUExecutionProvider";
constexpr const char* kCudaEp = "CUDAExecutionProvider";

// ----------------------------------------------------------------------------- attributes
std::string attr_string(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                        const char* def) {
  size_t size = 0;
  OrtStatus* st = api->KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (st) {
    api->ReleaseStatus(st);
    return def;
  }
  std::string out(size, '\0');
  st = api->KernelInfoGetAttribute_string(info, name, &out[0], &size);
  if (st) {
    api->ReleaseStatus(st);
    return def;
  }
  if (!out.empty() && out.back() == '\0') out.pop_back();
  return out;
}

float attr_float(const OrtApi* api, const OrtKernelInfo* info, const char* name, float def) {
  float v = def;
  OrtStatus* st = api->KernelInfoGetAttribute_float(info, name, &v);
  if (st) {
    api->ReleaseStatus(st);
    return def;
  }
  return v;
}

int64_t attr_int(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t def) {
  int64_t v = def;
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    api->ReleaseStatus(st);
    return def;
  }
  return v;
}

seif::Attrs read_attrs(const OrtApi* api, const OrtKernelInfo* info, bool moe) {
  seif::Attrs a;
  a.kind = seif::parse_kind(attr_string(api, info, "kind", "topk"));
  a.top_k = attr_int(api, info, "top_k", 1);
  a.scoring = seif::parse_scoring(attr_string(api, info, "scoring", "softmax"));
  a.normalize = seif::parse_normalize(attr_string(api, info, "normalize", "none"));
  a.norm_p = attr_float(api, info, "norm_p", 1.0f);
  a.epsilon = attr_float(api, info, "epsilon", 0.0f);
  a.epsilon_rule = seif::parse_epsilon_rule(attr_string(api, info, "epsilon_rule", "add"));
  a.scale = attr_float(api, info, "scale", 1.0f);
  a.n_group = attr_int(api, info, "n_group", 1);
  a.topk_group = attr_int(api, info, "topk_group", 1);
  a.group_score = seif::parse_group_score(attr_string(api, info, "group_score", "max"));
  a.group_mask = seif::parse_group_mask(attr_string(api, info, "group_mask", "neg_inf"));
  a.jitter_eps = attr_float(api, info, "jitter_eps", 0.0f);
  a.capacity_tokens = attr_int(api, info, "capacity_tokens", 0);
  a.capacity_factor = attr_float(api, info, "capacity_factor", 0.0f);
  if (moe) {
    a.activation = seif::parse_activation(attr_string(api, info, "activation", "swiglu"));
    a.alpha = attr_float(api, info, "alpha", 1.702f);
    a.limit = attr_float(api, info, "limit", 7.0f);
    a.weight_on = seif::parse_weight_on(attr_string(api, info, "weight_on", "output"));
    a.drop_policy = seif::parse_drop_policy(attr_string(api, info, "drop_policy", "zero"));
    a.slots_per_expert = attr_int(api, info, "slots_per_expert", 0);
  }
  seif::check_attrs(a, moe);
  return a;
}

// ----------------------------------------------------------------------------- tensors
bool to_dtype(ONNXTensorElementDataType t, seif::DType* out) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: *out = seif::DType::F32; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: *out = seif::DType::F16; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: *out = seif::DType::BF16; return true;
    default: return false;
  }
}

ONNXTensorElementDataType onnx_type(seif::DType t) {
  switch (t) {
    case seif::DType::F32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case seif::DType::F16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case seif::DType::BF16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

// Input i as a TensorArg (data == null when absent or beyond the node's inputs).
seif::TensorArg input_arg(const Ort::KernelContext& kc, size_t i, const char* op) {
  seif::TensorArg arg;
  if (i >= kc.GetInputCount()) return arg;
  Ort::ConstValue v = kc.GetInput(i);
  if (v == nullptr) return arg;
  auto info = v.GetTensorTypeAndShapeInfo();
  if (!to_dtype(info.GetElementType(), &arg.dtype))
    throw seif::Error(std::string("ai.seif.") + op + ": input " + std::to_string(i) +
                      " must be float32, float16 or bfloat16");
  arg.shape = info.GetShape();
  arg.data = v.GetTensorRawData();
  if (!arg.data) arg.data = "";  // a present tensor with no elements
  return arg;
}

// Runs fn(i) for i < n on ORT's intra-op thread pool (serially when ORT has none).
seif::ParallelFor ort_parallel_for(const Ort::KernelContext& kc) {
  return [&kc](size_t n, const std::function<void(size_t)>& fn) {
    if (n <= 1) {
      if (n == 1) fn(0);
      return;
    }
    struct Shared {
      const std::function<void(size_t)>* fn;
      std::exception_ptr err;
      std::mutex mu;
    } sh{&fn, nullptr, {}};
    kc.ParallelFor(
        [](void* ud, size_t i) {
          auto* s = static_cast<Shared*>(ud);
          try {
            (*s->fn)(i);
          } catch (...) {
            std::lock_guard<std::mutex> lock(s->mu);
            if (!s->err) s->err = std::current_exception();
          }
        },
        n, 0, &sh);
    if (sh.err) std::rethrow_exception(sh.err);
  };
}

template <typename F>
Ort::Status guarded(F&& f) {
  try {
    f();
    return Ort::Status{nullptr};
  } catch (const Ort::Exception& e) {
    return Ort::Status(e.what(), e.GetOrtErrorCode());
  } catch (const seif::Error& e) {
    return Ort::Status(e.what(), ORT_INVALID_ARGUMENT);
  } catch (const std::exception& e) {
    return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
  }
}

// ----------------------------------------------------------------------------- SeifRouter
struct RouterShape {
  int64_t T, E;
  seif::DType t;
};

RouterShape router_inputs(const Ort::KernelContext& kc, seif::TensorArg* logits,
                          seif::TensorArg* bias) {
  *logits = input_arg(kc, 0, "SeifRouter");
  *bias = input_arg(kc, 1, "SeifRouter");
  if (!logits->present() || logits->shape.size() != 2)
    throw seif::Error("ai.seif.SeifRouter: logits must be [N, E]");
  const int64_t T = logits->shape[0], E = logits->shape[1];
  if (bias->present() && (bias->shape.size() != 1 || bias->shape[0] != E))
    throw seif::Error("ai.seif.SeifRouter: selection_bias must be [E] = [" + std::to_string(E) +
                      "]");
  if (bias->present() && bias->dtype != seif::DType::F32)
    throw seif::Error("ai.seif.SeifRouter: selection_bias must be float32");
  return {T, E, logits->dtype};
}

struct SeifRouterCpu {
  SeifRouterCpu(const OrtApi* api, const OrtKernelInfo* info) : attrs(read_attrs(api, info, false)) {}
  Ort::Status Compute(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext kc(context);
      seif::TensorArg logits, bias;
      const RouterShape s = router_inputs(kc, &logits, &bias);
      const int64_t k = attrs.top_k;
      if (k > s.E)
        throw seif::Error("ai.seif.SeifRouter: top_k " + std::to_string(k) + " > " +
                          std::to_string(s.E) + " experts");
      const std::vector<int64_t> oshape{s.T, k};
      auto* idx = kc.GetOutput(0, oshape).GetTensorMutableData<int64_t>();
      auto* w = kc.GetOutput(1, oshape).GetTensorMutableData<float>();
      bool* kept = nullptr;
      std::unique_ptr<bool[]> kept_scratch;
      if (kc.GetOutputCount() > 2) {
        kept = kc.GetOutput(2, oshape).GetTensorMutableData<bool>();
      } else {
        kept_scratch.reset(new bool[static_cast<size_t>(s.T * k) + 1]);
        kept = kept_scratch.get();
      }
      if (s.T == 0) return;
      std::vector<float> buf;
      const float* z = static_cast<const float*>(logits.data);
      if (s.t != seif::DType::F32) {
        buf.resize(static_cast<size_t>(s.T * s.E));
        seif::to_float(logits.data, s.t, buf.size(), buf.data());
        z = buf.data();
      }
      seif::route_cpu(z, s.T, s.E, static_cast<const float*>(bias.data), attrs, idx, w, kept,
                      ort_parallel_for(kc));
    });
  }
  seif::Attrs attrs;
};

// ----------------------------------------------------------------------------- SeifMoE
struct SeifMoECpu {
  SeifMoECpu(const OrtApi* api, const OrtKernelInfo* info) : attrs(read_attrs(api, info, true)) {}
  Ort::Status Compute(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext kc(context);
      seif::TensorArg in[seif::kNumMoEInputs];
      for (int i = 0; i < seif::kNumMoEInputs; ++i) in[i] = input_arg(kc, i, "SeifMoE");
      int64_t N = 0, H = 0;
      seif::check_moe_inputs(attrs, in, &N, &H);
      void* out = kc.GetOutput(0, {N, H}).GetTensorMutableRawData();
      seif::moe_cpu(attrs, in, out, in[seif::kHidden].dtype, ort_parallel_for(kc));
    });
  }
  seif::Attrs attrs;
};

#ifdef SEIF_WITH_CUDA
struct SeifRouterCuda {
  SeifRouterCuda(const OrtApi* api, const OrtKernelInfo* info) : attrs(read_attrs(api, info, false)) {}
  Ort::Status Compute(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext kc(context);
      seif::TensorArg logits, bias;
      const RouterShape s = router_inputs(kc, &logits, &bias);
      const int64_t k = attrs.top_k;
      if (k > s.E)
        throw seif::Error("ai.seif.SeifRouter: top_k " + std::to_string(k) + " > " +
                          std::to_string(s.E) + " experts");
      if (kc.GetOutputCount() < 3)
        throw seif::Error("ai.seif.SeifRouter (CUDA): the kept output must be connected");
      const std::vector<int64_t> oshape{s.T, k};
      auto* idx = kc.GetOutput(0, oshape).GetTensorMutableData<int64_t>();
      auto* w = kc.GetOutput(1, oshape).GetTensorMutableData<float>();
      auto* kept = kc.GetOutput(2, oshape).GetTensorMutableData<bool>();
      if (s.T == 0) return;
      const std::string err =
          seif::cuda::route(logits.data, s.t, s.T, s.E, static_cast<const float*>(bias.data),
                            attrs, idx, w, kept, kc.GetGPUComputeStream());
      if (!err.empty()) throw std::runtime_error(err);
    });
  }
  seif::Attrs attrs;
};

struct SeifMoECuda {
  SeifMoECuda(const OrtApi* api, const OrtKernelInfo* info) : attrs(read_attrs(api, info, true)) {
    if (attrs.kind == seif::Kind::ExpertChoice || attrs.kind == seif::Kind::SoftMoE)
      throw Ort::Exception("ai.seif.SeifMoE (CUDA): expert_choice and soft_moe run on CPU only",
                           ORT_NOT_IMPLEMENTED);
  }
  Ort::Status Compute(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext kc(context);
      seif::TensorArg in[seif::kNumMoEInputs];
      for (int i = 0; i < seif::kNumMoEInputs; ++i) in[i] = input_arg(kc, i, "SeifMoE");
      int64_t N = 0, H = 0;
      seif::check_moe_inputs(attrs, in, &N, &H);
      void* out = kc.GetOutput(0, {N, H}).GetTensorMutableRawData();
      if (N == 0) return;
      const std::string err =
          seif::cuda::moe(attrs, in, out, in[seif::kHidden].dtype, kc.GetGPUComputeStream());
      if (!err.empty()) throw std::runtime_error(err);
    });
  }
  seif::Attrs attrs;
};
#endif

// ----------------------------------------------------------------------------- registration
using LiteOp = Ort::Custom::OrtLiteCustomOp;

template <typename Kernel>
LiteOp* make_op(const char* name, const char* ep, std::vector<ONNXTensorElementDataType> inputs,
                std::vector<ONNXTensorElementDataType> outputs) {
  LiteOp* op = Ort::Custom::CreateLiteCustomOp<Kernel>(name, ep);
  op->input_types_ = std::move(inputs);
  op->output_types_ = std::move(outputs);
  return op;
}

struct Registry {
  Ort::CustomOpDomain domain{kDomain};
  std::vector<std::unique_ptr<LiteOp>> ops;
  std::string providers;

  template <typename RouterK, typename MoEK>
  void add_ep(const char* ep, const std::vector<seif::DType>& hidden_types,
              const std::vector<seif::DType>& weight_types, bool with_moe) {
    const auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    for (seif::DType t : hidden_types) {
      ops.emplace_back(make_op<RouterK>(
          "SeifRouter", ep, {onnx_type(t), F32},
          {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, F32, ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL}));
      if (!with_moe) continue;
      for (seif::DType w : weight_types) {
        std::vector<ONNXTensorElementDataType> in(seif::kNumMoEInputs, onnx_type(w));
        in[0] = onnx_type(t);
        ops.emplace_back(make_op<MoEK>("SeifMoE", ep, in, {onnx_type(t)}));
      }
    }
    providers += (providers.empty() ? "" : ",") + std::string(ep);
  }

  Registry() {
    const std::vector<seif::DType> all{seif::DType::F32, seif::DType::F16, seif::DType::BF16};
    add_ep<SeifRouterCpu, SeifMoECpu>(kCpuEp, all, all, true);
#ifdef SEIF_WITH_CUDA
#ifdef SEIF_CUDA_MOE
    add_ep<SeifRouterCuda, SeifMoECuda>(kCudaEp, all, {seif::DType::F32}, true);
#else
    add_ep<SeifRouterCuda, SeifMoECuda>(kCudaEp, all, {}, false);
#endif
#endif
    for (auto& op : ops) domain.Add(op.get());
  }
};

std::mutex g_mu;
std::unique_ptr<Registry> g_registry;

}  // namespace

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 ? v1->CreateStatus(ORT_FAIL,
                                 "libseif_ort: this ONNX Runtime is older than the API version "
                                 "the library was built for")
              : nullptr;
  }
  Ort::InitApi(api);
  try {
    std::lock_guard<std::mutex> lock(g_mu);
    if (!g_registry) g_registry.reset(new Registry());
    Ort::UnownedSessionOptions(options).Add(g_registry->domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// "key=value;..." describing the build, for tests and `seif` diagnostics (read with ctypes).
__attribute__((visibility("default"))) const char* SeifOrtBuildInfo() {
  static const std::string info = [] {
    std::string s = "domain=ai.seif;ops=SeifRouter,SeifMoE;providers=CPUExecutionProvider";
#ifdef SEIF_WITH_CUDA
    s += ",CUDAExecutionProvider;cuda_archs=";
    s += seif::cuda::archs();
#ifdef SEIF_CUDA_MOE
    s += ";cuda_ops=SeifRouter,SeifMoE";
#else
    s += ";cuda_ops=SeifRouter";
#endif
#endif
    s += ";ort_api=" + std::to_string(ORT_API_VERSION);
    s += ";cpu_gemm=" + std::string(seif::gemm_isa());
    return s;
  }();
  return info.c_str();
}

}  // extern "C"
