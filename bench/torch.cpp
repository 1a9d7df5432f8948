// SPDX-License-Identifier: MIT
// The libtorch peer: ATen's CPU batch normalization (Debian libtorch-dev), as a libtorch user
// calls it, on the suite's shapes, layouts and thread counts, for the BN kinds. Its headers
// take a minute or more to compile, so they stay in this one file.
#ifdef BKN_BENCH_TORCH
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/api/include/torch/version.h>

#include "bench.hpp"

namespace bkn_bench {
namespace {

constexpr double epsilon = 1e-5;  // bkn::options' default
constexpr double momentum = 0.1;

/// The case's tensor `v` as `n` samples from sample `first`, in its layout (NHWC: channels-last
/// strides on NCHW sizes, which is how libtorch represents it).
at::Tensor slice(const shape_case& c, buffer& v, index_t first, index_t n) {
  const bkn::tensor_shape& s = c.shape;
  const index_t C = s.channels, H = s.height, W = s.width;
  float* data = v.data() + first * C * H * W;
  switch (c.lay) {
    case layout::nc: return at::from_blob(data, {n, C}, at::kFloat);
    case layout::nchw: return at::from_blob(data, {n, C, H, W}, at::kFloat);
    case layout::nhwc:
      return at::from_blob(data, {n, C, H, W}, {H * W * C, 1, W * C, C}, at::kFloat);
  }
  return {};
}

/// Copies `t` (a result of libtorch, in the memory format of its input) to `to`.
void copy_out(const shape_case& c, const at::Tensor& t, float* to) {
  const at::Tensor dense = c.lay == layout::nhwc ? t.contiguous(at::MemoryFormat::ChannelsLast)
                                                  : t.contiguous();
  std::memcpy(to, dense.data_ptr<float>(), std::size_t(dense.numel()) * sizeof(float));
}

/// What a libtorch user runs for one BN call of the suite: at::native_batch_norm (the ATen op
/// behind torch::batch_norm and nn::BatchNorm2d, without autograd's bookkeeping), once per
/// statistics group on that group's slice (libtorch has no statistics groups), outputs
/// allocated by libtorch as in any call; backward is at::native_batch_norm_backward with the
/// saved statistics, the groups' dgamma and dbeta summed.
class torch_bn {
 public:
  torch_bn(const shape_case& c, bool training) : case_(c), t_(tensors_for(c)), training_(training) {
    const index_t C = c.channels();
    const index_t samples = training ? c.samples_per_group() : c.shape.batch;
    for (index_t first = 0; first < c.shape.batch; first += samples) {
      x_.push_back(slice(c, t_.x, first, samples));
      dy_.push_back(slice(c, t_.dy, first, samples));
    }
    const auto options = at::TensorOptions().dtype(at::kFloat);
    gamma_ = at::ones({C}, options);
    beta_ = at::zeros({C}, options);
    if (training) {
      running_mean_ = at::zeros({C}, options);
      running_var_ = at::ones({C}, options);
    } else {  // the statistics the inference check expects
      running_mean_ = at::empty({C}, options);
      running_var_ = at::empty({C}, options);
      for (index_t ch = 0; ch < C; ++ch) {
        running_mean_.data_ptr<float>()[ch] = running_mean_of(ch);
        running_var_.data_ptr<float>()[ch] = running_var_of(ch);
      }
    }
    y_.resize(x_.size());
    saved_mean_.resize(x_.size());
    saved_invstd_.resize(x_.size());
    dx_.resize(x_.size());
  }

  void forward() {
    for (std::size_t g = 0; g < x_.size(); ++g)
      std::tie(y_[g], saved_mean_[g], saved_invstd_[g]) = at::native_batch_norm(
          x_[g], gamma_, beta_, running_mean_, running_var_, training_, momentum, epsilon);
  }
  void backward() {
    for (std::size_t g = 0; g < x_.size(); ++g) {
      at::Tensor dgamma, dbeta;
      std::tie(dx_[g], dgamma, dbeta) = at::native_batch_norm_backward(
          dy_[g], x_[g], gamma_, running_mean_, running_var_, saved_mean_[g], saved_invstd_[g],
          true, epsilon, {true, true, true});
      if (g == 0) {
        dgamma_ = dgamma;
        dbeta_ = dbeta;
      } else {
        dgamma_.add_(dgamma);
        dbeta_.add_(dbeta);
      }
    }
  }
  /// The outputs, gathered into the case's y or dx (for the checks; not timed).
  float* gather(bool gradient) {
    buffer& to = gradient ? t_.dx : t_.y;
    const std::vector<at::Tensor>& from = gradient ? dx_ : y_;
    const std::size_t step = to.size() / from.size();
    for (std::size_t g = 0; g < from.size(); ++g) copy_out(case_, from[g], to.data() + g * step);
    return to.data();
  }

 private:
  shape_case case_;
  tensors& t_;
  bool training_;
  std::vector<at::Tensor> x_, dy_, y_, saved_mean_, saved_invstd_, dx_;
  at::Tensor gamma_, beta_, running_mean_, running_var_, dgamma_, dbeta_;
};

void run(benchmark::State& state, const shape_case& c, const benchmark_kind& k, int threads) {
  at::set_num_threads(threads);
  // No autograd graph: the calls a trained model's layer makes, minus the graph's bookkeeping.
  c10::InferenceMode no_autograd;
  std::unique_ptr<torch_bn> bn;
  const double bytes = minimal_bytes(k.what, c);
  const auto setup = [&] { bn = std::make_unique<torch_bn>(c, k.what != op::inference); };
  const auto nothing = [] {};
  const auto forward_check = [&] { return check_bn_forward(c, epsilon, bn->gather(false)); };
  const auto backward_check = [&] { return check_bn_backward(c, epsilon, bn->gather(true)); };
  switch (k.what) {
    case op::inference:
      return time_calls(state, bytes, c.elements(), threads, setup, [&] { bn->forward(); },
                        nothing,
                        [&] { return check_bn_inference(c, epsilon, bn->gather(false)); });
    case op::forward:
      return time_calls(state, bytes, c.elements(), threads, setup, [&] { bn->forward(); },
                        nothing, forward_check);
    case op::backward:
      return time_calls(
          state, bytes, c.elements(), threads,
          [&] {
            setup();
            bn->forward();
          },
          [&] { bn->backward(); }, nothing, backward_check);
    case op::forward_backward:
      return time_calls(
          state, bytes, c.elements(), threads, setup,
          [&] {
            bn->forward();
            bn->backward();
          },
          nothing, backward_check);
    default:
      return;
  }
}

}  // namespace

void register_torch(const shape_case& c, const benchmark_kind& k, const settings& s) {
  if (!peer_kind(k)) return;
  std::vector<int> lines = {1};
  if (s.threads > 1) lines.push_back(s.threads);
  for (int threads : lines) {
    const std::string name =
        kind_name(k) + "/libtorch:t" + std::to_string(threads) + "/" + c.name();
    benchmark::RegisterBenchmark(name.c_str(), [c, k, threads](benchmark::State& st) {
      run(st, c, k, threads);
    })->UseRealTime();
  }
}

std::string torch_version() {
  std::string info = at::get_parallel_info();
  // The line that names the parallel backend, e.g. "ATen parallel backend: OpenMP".
  const std::size_t at = info.find("ATen parallel backend");
  std::string backend;
  if (at != std::string::npos) backend = info.substr(at, info.find('\n', at) - at);
  return std::string(TORCH_VERSION) + (backend.empty() ? "" : ", " + backend);
}

}  // namespace bkn_bench
#endif
