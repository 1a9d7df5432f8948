// SPDX-License-Identifier: MIT
// The libtorch layer: with q = 1 it is torch::batch_norm (outputs, gradients, running
// statistics) on every layout; gradient checks through a chain of two layers for each
// transition; the state lives in the graph; rejected calls change nothing.
#include <torch/torch.h>

#include "bkn_torch.hpp"

// libtorch includes glog, whose CHECK(x) aborts the process instead of recording a failure:
// doctest's macros of the same names must win.
#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using bkn_torch::BKN;
using bkn_torch::BKNOptions;
using bkn_torch::transition_type;
using torch::Tensor;

/// Largest |a - b| relative to max(1, largest |b|).
double relative_error(const Tensor& a, const Tensor& b) {
  const Tensor bd = b.detach().to(torch::kDouble);
  const double diff = (a.detach().to(torch::kDouble) - bd).abs().max().item<double>();
  return diff / std::max(1.0, bd.abs().max().item<double>());
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && a.is_contiguous() && b.is_contiguous() &&
         std::memcmp(a.data_ptr(), b.data_ptr(), std::size_t(a.nbytes())) == 0;
}

/// Random gamma, beta, gain logits, noise and transition, so that no check sees the identity.
void randomize(bkn_torch::BKNImpl& layer) {
  torch::NoGradGuard no_grad;
  layer.gamma.uniform_(0.5, 1.5);
  layer.beta.normal_(0, 0.5);
  if (layer.gain_logit.defined()) layer.gain_logit.normal_(0, 0.5);
  layer.noise.normal_(0, 0.5);
  if (layer.transition.defined()) layer.transition.add_(torch::randn_like(layer.transition) * 0.3);
}

// ---- torch.autograd.gradcheck, in C++ ----------------------------------------------------
// libtorch 1.13 has no C++ gradcheck; this is its check: the Jacobian of every output w.r.t.
// every input, numerically by central differences (eps 1e-6) and analytically by autograd's
// vector-Jacobian products, compared elementwise as |a - n| <= atol + rtol |n| with gradcheck's
// defaults atol 1e-5, rtol 1e-3, in double.

struct gradcheck_report {
  bool ok = true;
  double largest = 0;  // largest |analytic| entry: a check of zeros proves nothing
  std::string worst;
};

/// Offset in storage elements of the k-th element of `t` in logical (row-major index) order.
int64_t element_offset(const Tensor& t, int64_t k) {
  int64_t offset = 0;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    offset += (k % t.size(d)) * t.stride(d);
    k /= t.size(d);
  }
  return offset;
}

Tensor flat_outputs(const std::vector<Tensor>& outputs) {
  std::vector<Tensor> parts;
  for (const Tensor& o : outputs) parts.push_back(o.detach().reshape(-1));
  return torch::cat(parts);
}

gradcheck_report gradcheck(const std::function<std::vector<Tensor>()>& f,
                           const std::vector<Tensor>& inputs) {
  constexpr double eps = 1e-6, atol = 1e-5, rtol = 1e-3;
  int64_t rows = 0;
  for (const Tensor& t : inputs) rows += t.numel();
  const std::vector<Tensor> outputs = f();
  int64_t cols = 0;
  for (const Tensor& o : outputs) cols += o.numel();
  Tensor analytic = torch::zeros({rows, cols}, torch::kDouble);
  Tensor numeric = torch::zeros({rows, cols}, torch::kDouble);

  int64_t col = 0;
  for (const Tensor& o : outputs) {
    const Tensor flat = o.reshape(-1);
    for (int64_t e = 0; e < o.numel(); ++e, ++col) {
      const auto grads = torch::autograd::grad({flat[e]}, inputs, {}, /*retain_graph=*/true,
                                               /*create_graph=*/false, /*allow_unused=*/true);
      int64_t row = 0;
      for (std::size_t i = 0; i < inputs.size(); ++i) {
        if (grads[i].defined())
          analytic.index_put_({torch::indexing::Slice(row, row + inputs[i].numel()), col},
                              grads[i].reshape(-1));
        row += inputs[i].numel();
      }
    }
  }

  int64_t row = 0;
  for (const Tensor& input : inputs) {
    double* data = input.data_ptr<double>();
    for (int64_t k = 0; k < input.numel(); ++k, ++row) {
      torch::NoGradGuard no_grad;
      double& v = data[element_offset(input, k)];
      const double saved = v;
      v = saved + eps;
      const Tensor up = flat_outputs(f());
      v = saved - eps;
      const Tensor down = flat_outputs(f());
      v = saved;
      numeric[row] = (up - down) / (2 * eps);
    }
  }

  gradcheck_report report;
  const Tensor excess = (analytic - numeric).abs() - (atol + rtol * numeric.abs());
  report.largest = analytic.abs().max().item<double>();
  const auto worst = excess.reshape(-1).argmax().item<int64_t>();
  report.ok = excess.reshape(-1)[worst].item<double>() <= 0;
  std::ostringstream where;
  where << "worst entry (input element " << worst / cols << ", output element " << worst % cols
        << "): analytic " << analytic.reshape(-1)[worst].item<double>() << ", numeric "
        << numeric.reshape(-1)[worst].item<double>();
  report.worst = where.str();
  return report;
}

// ---- Two layers and the host's map between them -------------------------------------------

/// Layer 0 (no prior) -> the host's tanh and own layer -> layer 1 (prior: layer 0's
/// posterior, through `kind`), in double. Outputs: layer 1's y and posterior.
struct two_layers {
  BKN first{nullptr}, second{nullptr};
  torch::nn::Linear linear{nullptr};
  torch::nn::Conv2d conv{nullptr};
  Tensor x;
  bool cut = false;  // detach the posterior between the layers, as the paper's Eq. 6 does

  two_layers(transition_type kind, bkn::covariance mode, bool per_channel_gain,
             bool channels_last) {
    torch::manual_seed(7);
    const int64_t N = 4, C0 = 3;
    const bool same_width = kind == transition_type::identity || kind == transition_type::diagonal;
    const int64_t C1 = same_width ? C0 : 4;
    BKNOptions second_options =
        BKNOptions(C1).group_size(2).mode(mode).per_channel_gain(per_channel_gain);
    const bkn::activation act =
        mode == bkn::covariance::full ? bkn::activation::none : bkn::activation::relu;
    switch (kind) {
      case transition_type::identity:
        break;
      case transition_type::diagonal:
        second_options.diagonal();
        break;
      case transition_type::dense:
        second_options.dense(C0);
        conv = torch::nn::Conv2d(torch::nn::Conv2dOptions(C0, C1, 1));
        break;
      case transition_type::linear:
        linear = torch::nn::Linear(C0, C1);
        second_options.through(linear, act);
        break;
      case transition_type::conv2d:
        conv = torch::nn::Conv2d(torch::nn::Conv2dOptions(C0, C1, 3).padding(1));
        second_options.through(conv, act);
        break;
    }
    first = BKN(BKNOptions(C0).group_size(2).mode(mode));
    second = BKN(second_options);
    randomize(*first);
    randomize(*second);
    first->to(torch::kDouble);
    second->to(torch::kDouble);
    if (linear) linear->to(torch::kDouble);
    if (conv) conv->to(torch::kDouble);
    x = kind == transition_type::linear ? torch::randn({N, C0}, torch::kDouble)
                                        : torch::randn({N, C0, 3, 3}, torch::kDouble);
    x = x * 1.5 + 0.5;
    if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
    x.requires_grad_(true);
  }

  std::vector<Tensor> inputs() const {
    std::vector<Tensor> in = {x, first->gamma, first->beta, second->gamma, second->beta,
                              second->noise};
    if (second->gain_logit.defined()) in.push_back(second->gain_logit);
    if (second->transition.defined()) in.push_back(second->transition);
    if (linear) in.insert(in.end(), {linear->weight, linear->bias});
    if (conv) in.insert(in.end(), {conv->weight, conv->bias});
    return in;
  }

  std::vector<Tensor> operator()() {
    const bkn_torch::output a = first(x);
    const Tensor h = torch::tanh(a.y);
    const Tensor x1 = linear ? linear(h) : conv ? conv(h) : 1.5 * h + 0.3;
    const bkn_torch::output b = second(x1, cut ? a.posterior.detach() : a.posterior);
    return {b.y, b.posterior.mean, b.posterior.cov};
  }
};

/// Layouts of one (N, C, ...) tensor: the name and the tensor, all with the same values.
std::vector<std::pair<std::string, Tensor>> layouts(torch::ScalarType dtype) {
  const Tensor image = torch::randn({4, 3, 5, 6}, dtype) * 2 + 3;
  const Tensor big = torch::randn({4, 5, 7, 9}, dtype) * 2 + 3;
  return {{"NCHW", image},
          {"channels_last", image.contiguous(torch::MemoryFormat::ChannelsLast)},
          {"NC", torch::randn({8, 3}, dtype) * 2 + 3},
          {"NCL", torch::randn({4, 3, 7}, dtype) * 2 + 3},
          {"slice", big.slice(1, 1, 4).slice(2, 1, 6).slice(3, 2, 9, 2)},
          {"transposed HW", image.transpose(2, 3)}};
}

}  // namespace

TEST_CASE("q = 1: the layer is torch::batch_norm (outputs, gradients, running statistics)") {
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    torch::manual_seed(1);
    for (const auto& layout : layouts(dtype)) {
      const std::string& name = layout.first;  // not a structured binding: CAPTURE takes it
      const Tensor& data = layout.second;
      for (const bool with_prior : {false, true}) {
        CAPTURE(name);
        CAPTURE(with_prior);
        CAPTURE(dtype);
        const int64_t C = data.size(1);
        // With a prior, q = 1 is a fixed gain of 1: the prior gets weight 0.
        BKN bn(BKNOptions(C).fixed_gain(with_prior ? 1.0 : -1.0));
        randomize(*bn);
        bn->to(dtype);
        bkn_torch::gaussian prior;
        if (with_prior)
          prior = {torch::randn({1, C}, dtype).requires_grad_(true),
                   (torch::rand({1, C}, dtype) + 0.5).requires_grad_(true)};

        const Tensor x = data.detach().clone(torch::MemoryFormat::Preserve).requires_grad_(true);
        const Tensor x_ref = data.detach().clone().requires_grad_(true);
        const Tensor gamma_ref = bn->gamma.detach().clone().requires_grad_(true);
        const Tensor beta_ref = bn->beta.detach().clone().requires_grad_(true);
        const Tensor mean_ref = torch::zeros({C}, dtype), var_ref = torch::ones({C}, dtype);

        const bkn_torch::output out = bn(x, prior);
        const Tensor y_ref = torch::batch_norm(x_ref, gamma_ref, beta_ref, mean_ref, var_ref,
                                               /*training=*/true, 0.1, 1e-5, false);
        const Tensor w = torch::randn_like(y_ref);
        (out.y * w).sum().backward();
        (y_ref * w).sum().backward();

        const double tol = dtype == torch::kDouble ? 1e-10 : 1e-5;
        CHECK(relative_error(out.y, y_ref) < tol);
        CHECK(relative_error(x.grad(), x_ref.grad()) < tol);
        CHECK(relative_error(bn->gamma.grad(), gamma_ref.grad()) < tol);
        CHECK(relative_error(bn->beta.grad(), beta_ref.grad()) < tol);
        CHECK(relative_error(bn->running_mean, mean_ref) < tol);
        CHECK(relative_error(bn->running_var, var_ref) < tol);
        if (with_prior) {
          CHECK(prior.mean.grad().abs().max().item<double>() == 0);
          CHECK(prior.cov.grad().abs().max().item<double>() == 0);
        }
        // y is allocated like x: a dense layout is kept, never converted.
        if (x.is_non_overlapping_and_dense()) CHECK(out.y.strides() == x.strides());
      }
    }
  }
}

TEST_CASE("statistics groups: each group of samples is batch-normalized on its own") {
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    CAPTURE(dtype);
    torch::manual_seed(2);
    BKN bn(BKNOptions(3).group_size(2));
    randomize(*bn);
    bn->to(dtype);
    const Tensor data = torch::randn({8, 3, 4, 4}, dtype) * 2 - 1;
    const Tensor x = data.clone().requires_grad_(true), x_ref = data.clone().requires_grad_(true);
    const Tensor y = bn(x).y;
    std::vector<Tensor> parts;
    for (const Tensor& chunk : x_ref.chunk(4))
      parts.push_back(torch::batch_norm(chunk, bn->gamma.detach(), bn->beta.detach(), {}, {},
                                        true, 0.1, 1e-5, false));
    const Tensor y_ref = torch::cat(parts);
    const Tensor w = torch::randn_like(y_ref);
    (y * w).sum().backward();
    (y_ref * w).sum().backward();
    const double tol = dtype == torch::kDouble ? 1e-10 : 1e-5;
    CHECK(relative_error(y, y_ref) < tol);
    CHECK(relative_error(x.grad(), x_ref.grad()) < tol);
  }
}

TEST_CASE("gradient check through a chain of two layers, for each transition") {
  struct variant {
    const char* name;
    transition_type kind;
    bkn::covariance mode;
    bool per_channel_gain, channels_last;
  };
  const variant variants[] = {
      {"identity", transition_type::identity, bkn::covariance::diagonal, false, false},
      {"diagonal", transition_type::diagonal, bkn::covariance::diagonal, false, false},
      {"dense", transition_type::dense, bkn::covariance::diagonal, false, false},
      {"linear", transition_type::linear, bkn::covariance::diagonal, false, false},
      {"conv2d", transition_type::conv2d, bkn::covariance::diagonal, false, false},
      {"conv2d, per-channel gain, channels_last", transition_type::conv2d,
       bkn::covariance::diagonal, true, true},
      {"full mode, identity", transition_type::identity, bkn::covariance::full, false, false},
      {"full mode, dense", transition_type::dense, bkn::covariance::full, false, true},
      {"full mode, linear", transition_type::linear, bkn::covariance::full, false, false},
  };
  for (const variant& v : variants) {
    SUBCASE(v.name) {
      two_layers net(v.kind, v.mode, v.per_channel_gain, v.channels_last);
      const gradcheck_report report = gradcheck(std::ref(net), net.inputs());
      INFO(report.worst);
      CHECK(report.ok);
      CHECK(report.largest > 1e-3);
    }
  }
}

TEST_CASE("cutting the chain (the paper's Eq. 6) fails the gradient check") {
  // The same check must notice a missing path: with the posterior detached between the
  // layers, autograd's gradient misses what layer 1 gets through layer 0's statistics.
  for (const transition_type kind : {transition_type::diagonal, transition_type::conv2d}) {
    two_layers net(kind, bkn::covariance::diagonal, false, false);
    net.cut = true;
    const gradcheck_report report = gradcheck(std::ref(net), net.inputs());
    INFO(report.worst);
    CHECK_FALSE(report.ok);
  }
}

TEST_CASE("the state lives in the graph: two forwards, then their backwards in any order") {
  torch::manual_seed(3);
  BKN first(BKNOptions(3).group_size(2)), second(BKNOptions(3).group_size(2).diagonal());
  randomize(*first);
  randomize(*second);
  const Tensor a = torch::randn({4, 3, 3, 3}), b = torch::randn({4, 3, 3, 3}) * 3 + 1;
  auto loss = [&](const Tensor& x) {
    const bkn_torch::output o = first(x);
    return (second(torch::tanh(o.y), o.posterior).y * torch::arange(x.numel()).view_as(x).cos())
        .sum();
  };
  auto gradients = [&](const Tensor& x, const Tensor& l) {
    first->zero_grad();
    second->zero_grad();
    l.backward();
    return std::vector<Tensor>{x.grad().clone(), second->gain_logit.grad().clone(),
                               second->transition.grad().clone(), first->gamma.grad().clone()};
  };
  const Tensor xa = a.clone().requires_grad_(true), xb = b.clone().requires_grad_(true);
  const std::vector<Tensor> alone_a = gradients(xa, loss(xa));
  const std::vector<Tensor> alone_b = gradients(xb, loss(xb));
  const Tensor ya = a.clone().requires_grad_(true), yb = b.clone().requires_grad_(true);
  const Tensor la = loss(ya), lb = loss(yb);  // both forwards before either backward
  const std::vector<Tensor> late_b = gradients(yb, lb);
  const std::vector<Tensor> late_a = gradients(ya, la);
  for (std::size_t i = 0; i < alone_a.size(); ++i) {
    CAPTURE(i);
    CHECK(torch::equal(alone_a[i], late_a[i]));
    CHECK(torch::equal(alone_b[i], late_b[i]));
  }
  CHECK_FALSE(torch::equal(alone_a[0], alone_b[0]));
}

TEST_CASE("eval(): normalized with the running statistics, as torch::batch_norm") {
  torch::manual_seed(4);
  BKN bn(BKNOptions(3).group_size(2));
  randomize(*bn);
  const Tensor mean_ref = torch::zeros({3}), var_ref = torch::ones({3});
  for (int step = 0; step < 3; ++step) {
    const Tensor x = torch::randn({4, 3, 5, 5}) * (step + 1) + step;
    bn(x);
    // Without a prior the posterior is each group's batch statistics; the moving variance
    // takes them with Bessel's correction, averaged over the groups.
    const Tensor groups = x.view({2, 2, 3, 25}).transpose(1, 2).reshape({2, 3, 50});
    mean_ref.mul_(0.9).add_(0.1 * groups.mean(2).mean(0));
    var_ref.mul_(0.9).add_(0.1 * groups.var(2, /*unbiased=*/true).mean(0));
  }
  CHECK(relative_error(bn->running_mean, mean_ref) < 1e-5);
  CHECK(relative_error(bn->running_var, var_ref) < 1e-5);

  bn->eval();
  const Tensor data = torch::randn({3, 3, 4, 4});
  const Tensor x = data.clone().requires_grad_(true), x_ref = data.clone().requires_grad_(true);
  const bkn_torch::output out = bn(x);
  const Tensor y_ref = torch::batch_norm(x_ref, bn->gamma, bn->beta, bn->running_mean,
                                         bn->running_var, /*training=*/false, 0.1, 1e-5, false);
  CHECK(relative_error(out.y, y_ref) < 1e-5);
  const Tensor w = torch::randn_like(y_ref);
  (out.y * w).sum().backward();
  (y_ref * w).sum().backward();
  CHECK(relative_error(x.grad(), x_ref.grad()) < 1e-5);
  // The posterior in eval() is the running statistics, a constant.
  CHECK(relative_error(out.posterior.mean[0], bn->running_mean) == 0);
}

TEST_CASE("rejected calls throw before anything is written") {
  torch::manual_seed(5);
  BKN bn(BKNOptions(3).group_size(3).diagonal());
  const Tensor mean_before = bn->running_mean.clone(), var_before = bn->running_var.clone();
  auto unchanged = [&] {
    return same_bytes(bn->running_mean, mean_before) && same_bytes(bn->running_var, var_before);
  };
  // 4 samples in groups of 3: bkn's own message, as a std::invalid_argument.
  try {
    bn(torch::randn({4, 3, 2, 2}));
    FAIL("no exception");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()).find("options.group_size") != std::string::npos);
  }
  CHECK(unchanged());
  // A prior of the wrong number of channels.
  const bkn_torch::gaussian prior{torch::zeros({1, 4}), torch::ones({1, 4})};
  CHECK_THROWS_AS(bn(torch::randn({6, 3, 2, 2}), prior), std::invalid_argument);
  CHECK(unchanged());
  // x in double, the layer in float: torch's own error.
  CHECK_THROWS_AS(bn(torch::randn({6, 3, 2, 2}, torch::kDouble)), c10::Error);
  CHECK(unchanged());
  // An empty batch is a no-op.
  const bkn_torch::output empty = bn(torch::randn({0, 3, 2, 2}));
  CHECK(empty.y.numel() == 0);
  CHECK(unchanged());
  // ... and the same layer then works.
  bn(torch::randn({6, 3, 2, 2}));
  CHECK_FALSE(unchanged());
}
