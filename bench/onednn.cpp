// SPDX-License-Identifier: MIT
// The oneDNN peer: oneDNN's batch normalization primitives (Debian libdnnl-dev) on the suite's
// shapes, layouts and thread counts, registered next to bkn's lines for the BN kinds.
#ifdef BKN_BENCH_ONEDNN
#include <omp.h>

#include <algorithm>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <unordered_map>
#include <vector>

#include "bench.hpp"

namespace bkn_bench {
namespace {

using dnnl::memory;
using dnnl::prop_kind;

constexpr float epsilon = 1e-5f;  // bkn::options' default

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

/// `n` samples of case c.
memory::desc samples_desc(const shape_case& c, index_t n) {
  const bkn::tensor_shape& s = c.shape;
  const memory::dim C = s.channels;
  if (c.lay == layout::nc) return {{n, C}, memory::data_type::f32, memory::format_tag::nc};
  return {{n, C, s.height, s.width},
          memory::data_type::f32,
          c.lay == layout::nchw ? memory::format_tag::nchw : memory::format_tag::nhwc};
}

memory::desc channels_desc(const shape_case& c) {
  return {{c.channels()}, memory::data_type::f32, memory::format_tag::a};
}

/// What a oneDNN user runs for one BN call of the suite: one primitive per direction for a
/// group's shape, executed once per statistics group on that group's slice of the tensors
/// (oneDNN has no statistics groups), with each group's mean and variance kept for backward
/// and the groups' dgamma and dbeta summed, as a framework would.
class onednn_bn {
 public:
  onednn_bn(const shape_case& c, bool training)
      : case_(c), t_(tensors_for(c)), stream_(cpu_engine()) {
    // Training: one call per statistics group. Inference normalizes with one set of running
    // statistics: one call over the whole batch.
    const index_t samples = training ? c.samples_per_group() : c.shape.batch;
    const index_t G = c.shape.batch / samples, C = c.channels();
    const memory::desc data = samples_desc(c, samples), channels = channels_desc(c);
    const auto scale_shift =
        dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
    ones_.assign(std::size_t(C), 1.0f);
    zeros_.assign(std::size_t(C), 0.0f);
    mean_.assign(std::size_t(G * C), 0.0f);
    var_.assign(std::size_t(G * C), 1.0f);
    dscale_.assign(std::size_t(G * C), 0.0f);
    dshift_.assign(std::size_t(G * C), 0.0f);
    dgamma_.assign(std::size_t(C), 0.0f);
    dbeta_.assign(std::size_t(C), 0.0f);
    if (training) {
      forward_pd_ = dnnl::batch_normalization_forward::primitive_desc(
          {prop_kind::forward_training, data, epsilon, scale_shift}, cpu_engine());
      backward_pd_ = dnnl::batch_normalization_backward::primitive_desc(
          {prop_kind::backward, data, data, epsilon, scale_shift}, cpu_engine(), forward_pd_);
      backward_ = dnnl::batch_normalization_backward(backward_pd_);
    } else {
      forward_pd_ = dnnl::batch_normalization_forward::primitive_desc(
          {prop_kind::forward_inference, data, epsilon,
           scale_shift | dnnl::normalization_flags::use_global_stats},
          cpu_engine());
      for (index_t ch = 0; ch < C; ++ch) {  // the statistics the inference check expects
        mean_[std::size_t(ch)] = running_mean_of(ch);
        var_[std::size_t(ch)] = running_var_of(ch);
      }
    }
    forward_ = dnnl::batch_normalization_forward(forward_pd_);
    const index_t step = samples * c.shape.channels * c.shape.spatial();
    const auto at = [&](buffer& v, index_t g) {
      return memory(data, cpu_engine(), v.data() + g * step);
    };
    const auto per_group = [&](buffer& v, index_t g) {
      return memory(channels, cpu_engine(), v.data() + g * C);
    };
    const memory gamma(channels, cpu_engine(), ones_.data()),
        beta(channels, cpu_engine(), zeros_.data());
    for (index_t g = 0; g < G; ++g) {
      forward_args_.push_back({{DNNL_ARG_SRC, at(t_.x, g)},
                               {DNNL_ARG_DST, at(t_.y, g)},
                               {DNNL_ARG_SCALE, gamma},
                               {DNNL_ARG_SHIFT, beta},
                               {DNNL_ARG_MEAN, per_group(mean_, g)},
                               {DNNL_ARG_VARIANCE, per_group(var_, g)}});
      if (!training) continue;
      backward_args_.push_back({{DNNL_ARG_SRC, at(t_.x, g)},
                                {DNNL_ARG_DIFF_DST, at(t_.dy, g)},
                                {DNNL_ARG_DIFF_SRC, at(t_.dx, g)},
                                {DNNL_ARG_SCALE, gamma},
                                {DNNL_ARG_SHIFT, beta},  // unread, but oneDNN 2.6 requires it
                                {DNNL_ARG_MEAN, per_group(mean_, g)},
                                {DNNL_ARG_VARIANCE, per_group(var_, g)},
                                {DNNL_ARG_DIFF_SCALE, per_group(dscale_, g)},
                                {DNNL_ARG_DIFF_SHIFT, per_group(dshift_, g)}});
    }
  }

  void forward() {
    for (auto& args : forward_args_) forward_.execute(stream_, args);
    stream_.wait();
  }
  void backward() {
    for (auto& args : backward_args_) backward_.execute(stream_, args);
    stream_.wait();
    if (backward_args_.size() == 1) return;
    const index_t C = case_.channels();
    for (index_t c = 0; c < C; ++c) {
      float sg = 0, sb = 0;
      for (std::size_t g = 0; g < backward_args_.size(); ++g) {
        sg += dscale_[g * std::size_t(C) + std::size_t(c)];
        sb += dshift_[g * std::size_t(C) + std::size_t(c)];
      }
      dgamma_[std::size_t(c)] = sg;
      dbeta_[std::size_t(c)] = sb;
    }
  }
  tensors& buffers() { return t_; }

 private:
  shape_case case_;
  tensors& t_;
  dnnl::stream stream_;
  dnnl::batch_normalization_forward::primitive_desc forward_pd_;
  dnnl::batch_normalization_backward::primitive_desc backward_pd_;
  dnnl::batch_normalization_forward forward_;
  dnnl::batch_normalization_backward backward_;
  std::vector<std::unordered_map<int, memory>> forward_args_, backward_args_;
  buffer ones_, zeros_, mean_, var_, dscale_, dshift_, dgamma_, dbeta_;
};

void run(benchmark::State& state, const shape_case& c, const benchmark_kind& k, int threads) {
  // oneDNN's CPU engine runs on OpenMP and takes omp_get_max_threads() threads per call.
  omp_set_num_threads(threads);
  std::unique_ptr<onednn_bn> bn;
  const double bytes = minimal_bytes(k.what, c);
  const auto setup = [&] { bn = std::make_unique<onednn_bn>(c, k.what != op::inference); };
  const auto nothing = [] {};
  switch (k.what) {
    case op::inference:
      return time_calls(
          state, bytes, c.elements(), threads, setup, [&] { bn->forward(); }, nothing,
          [&] { return check_bn_inference(c, epsilon, bn->buffers().y.data()); });
    case op::forward:
      return time_calls(
          state, bytes, c.elements(), threads, setup, [&] { bn->forward(); }, nothing,
          [&] { return check_bn_forward(c, epsilon, bn->buffers().y.data()); });
    case op::backward:
      return time_calls(
          state, bytes, c.elements(), threads,
          [&] {
            setup();
            bn->forward();
          },
          [&] { bn->backward(); }, nothing,
          [&] { return check_bn_backward(c, epsilon, bn->buffers().dx.data()); });
    case op::forward_backward:
      return time_calls(
          state, bytes, c.elements(), threads, setup,
          [&] {
            bn->forward();
            bn->backward();
          },
          nothing, [&] { return check_bn_backward(c, epsilon, bn->buffers().dx.data()); });
    default:
      return;
  }
}

const char* isa_name(dnnl::cpu_isa isa) {
  switch (isa) {
    case dnnl::cpu_isa::sse41:
      return "sse41";
    case dnnl::cpu_isa::avx:
      return "avx";
    case dnnl::cpu_isa::avx2:
      return "avx2";
    case dnnl::cpu_isa::avx2_vnni:
      return "avx2_vnni";
    case dnnl::cpu_isa::avx512_core:
      return "avx512_core";
    case dnnl::cpu_isa::avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_amx:
      return "avx512_core_amx";
    default:
      return "other";
  }
}

}  // namespace

void register_onednn(const shape_case& c, const benchmark_kind& k, const settings& s) {
  if (!peer_kind(k)) return;
  std::vector<int> lines = {1};
  if (s.threads > 1) lines.push_back(s.threads);
  for (int threads : lines) {
    const std::string name = kind_name(k) + "/onednn:t" + std::to_string(threads) + "/" + c.name();
    benchmark::RegisterBenchmark(name.c_str(), [c, k, threads](benchmark::State& st) {
      run(st, c, k, threads);
    })->UseRealTime();
  }
}

std::string onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
         std::to_string(v->patch) + ", JIT ISA " + isa_name(dnnl::get_effective_cpu_isa());
}

}  // namespace bkn_bench
#endif
