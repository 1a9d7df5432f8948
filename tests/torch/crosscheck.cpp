// SPDX-License-Identifier: MIT
// bkn against libtorch's own implementations, outputs and gradients (torch autograd): batch
// normalization (bkn::forward / backward without a prior, and bkn::batch_norm), group, layer
// and instance normalization, float and double, NCHW and channels-last, on the reference backend
// and (when built) the Eigen backend. One translation unit: libtorch's headers are slow.
// libtorch first: its glog defines CHECK, CHECK_EQ, ... which doctest's must replace.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
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
#include <cstddef>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "bkn/backends/reference.hpp"
#include "bkn/bkn.hpp"
#include "bkn/methods/group_norm.hpp"
#if __has_include("bkn/methods/batch_norm.hpp")
#include "bkn/methods/batch_norm.hpp"
#define BKN_TEST_BATCH_NORM 1
#endif
#ifdef BKN_TEST_EIGEN
#include "bkn/backends/eigen.hpp"
#endif

namespace {

using bkn::index_t;

struct shape {
  index_t N, C, H, W;
};

std::string describe(const shape& s, bool channels_last) {
  return std::to_string(s.N) + "x" + std::to_string(s.C) + "x" + std::to_string(s.H) + "x" +
         std::to_string(s.W) + (channels_last ? " channels-last" : " NCHW");
}

const shape shapes[] = {{4, 6, 5, 3}, {2, 8, 7, 7}, {8, 4, 1, 1}, {1, 6, 4, 4}, {3, 12, 2, 9}};

template <class T>
constexpr at::ScalarType scalar_type() {
  return std::is_same_v<T, double> ? at::kDouble : at::kFloat;
}

/// Tolerance relative to each output's largest magnitude: double agrees to rounding (different
/// summation orders); float to the rounding of reductions over up to 392 values, amplified by
/// 1/sigma and the cancellation in dx.
template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, double> ? 1e-10 : 2e-4;
}

/// One problem: x and dy in logical NCHW order, and the same values in bkn buffers of the
/// chosen layout.
template <class T>
struct problem {
  shape s;
  bool channels_last;
  std::vector<T> x, dy;  // logical NCHW order
  std::vector<T> x_mem, dy_mem, y_mem, dx_mem;  // the layout's memory order

  problem(const shape& s_, bool last, std::uint32_t seed) : s(s_), channels_last(last) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal;
    const std::size_t count = std::size_t(s.N * s.C * s.H * s.W);
    for (std::size_t i = 0; i < count; ++i) {
      const index_t c = index_t(i) / (s.H * s.W) % s.C;
      x.push_back(T(1 + 0.3 * double(c) + 2 * normal(rng)));
      dy.push_back(T(normal(rng)));
    }
    x_mem = to_memory(x);
    dy_mem = to_memory(dy);
    y_mem.assign(count, T(0));
    dx_mem.assign(count, T(0));
  }
  bkn::tensor_view<T> view(std::vector<T>& v) {
    return channels_last ? bkn::nhwc(v.data(), s.N, s.C, s.H, s.W)
                         : bkn::nchw(v.data(), s.N, s.C, s.H, s.W);
  }
  bkn::tensor_view<const T> cview(std::vector<T>& v) { return view(v); }
  std::vector<T> to_memory(const std::vector<T>& logical) {
    std::vector<T> m(logical.size());
    const auto v = view(m);
    for (index_t n = 0; n < s.N; ++n)
      for (index_t c = 0; c < s.C; ++c)
        for (index_t k = 0; k < s.H * s.W; ++k)
          v.at(n, c, k) = logical[std::size_t((n * s.C + c) * s.H * s.W + k)];
    return m;
  }
  /// A bkn output buffer in logical NCHW order.
  std::vector<double> logical(std::vector<T>& memory) {
    std::vector<double> out;
    const auto v = view(memory);
    for (index_t n = 0; n < s.N; ++n)
      for (index_t c = 0; c < s.C; ++c)
        for (index_t k = 0; k < s.H * s.W; ++k) out.push_back(double(v.at(n, c, k)));
    return out;
  }
  /// Logical values as a torch tensor, in NCHW or channels-last memory.
  at::Tensor torch_tensor(const std::vector<T>& logical_values, bool last) const {
    at::Tensor t = at::from_blob(const_cast<T*>(logical_values.data()), {s.N, s.C, s.H, s.W},
                                 at::TensorOptions().dtype(scalar_type<T>()))
                       .clone();
    return last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
  }
};

template <class T>
at::Tensor per_channel(const std::vector<T>& v) {
  return at::from_blob(const_cast<T*>(v.data()), {index_t(v.size())},
                       at::TensorOptions().dtype(scalar_type<T>()))
      .clone();
}

std::vector<double> values(const at::Tensor& t) {
  const at::Tensor d = t.detach().to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

template <class V>
std::vector<double> values(const std::vector<V>& v) {
  return std::vector<double>(v.begin(), v.end());
}

double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  double scale = 0, err = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    scale = std::max(scale, std::abs(want[i]));
    err = std::max(err, std::abs(got[i] - want[i]));
  }
  return err / (scale + 1e-30);
}

/// What libtorch computes for a problem: y, dx, dgamma, dbeta (and more, per method).
struct torch_result {
  std::vector<double> y, dx, dgamma, dbeta, running_mean, running_var;
};

template <class T>
std::vector<T> random_channels(index_t C, double centre, double spread, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<T> v(static_cast<std::size_t>(C));
  for (auto& e : v) e = T(centre + spread * normal(rng));
  return v;
}

/// Runs `forward` (which maps x, gamma, beta to y) under autograd, on tensors in NCHW or
/// channels-last memory, and returns y and the gradients of sum(y * dy).
template <class T, class F>
torch_result torch_run_in(problem<T>& p, bool last, const std::vector<T>& gamma,
                          const std::vector<T>& beta, F& forward) {
  at::Tensor x = p.torch_tensor(p.x, last).set_requires_grad(true);
  at::Tensor g = per_channel(gamma).set_requires_grad(true);
  at::Tensor b = per_channel(beta).set_requires_grad(true);
  at::Tensor y = forward(x, g, b);
  y.backward(p.torch_tensor(p.dy, last));
  return {values(y), values(x.grad()), values(g.grad()), values(b.grad()), {}, {}};
}

/// torch_run_in in the problem's layout. A channels-last problem also runs in NCHW: the results
/// must be the same, and where libtorch 1.13 disagrees with itself (its channels-last
/// instance_norm backward for N = 1 does) bkn is compared with the NCHW result, and the
/// disagreement is reported.
template <class T, class F>
torch_result torch_run(problem<T>& p, const std::vector<T>& gamma, const std::vector<T>& beta,
                       F forward) {
  torch_result r = torch_run_in(p, p.channels_last, gamma, beta, forward);
  if (!p.channels_last) return r;
  torch_result nchw = torch_run_in(p, false, gamma, beta, forward);
  const double disagreement = std::max({relative_error(r.y, nchw.y), relative_error(r.dx, nchw.dx),
                                        relative_error(r.dgamma, nchw.dgamma),
                                        relative_error(r.dbeta, nchw.dbeta)});
  if (disagreement <= tolerance<T>()) return r;
  MESSAGE("libtorch's channels-last result differs from its NCHW result by "
          << disagreement << " (relative): bkn is compared with the NCHW one");
  return nchw;
}

template <class T>
void compare(const char* what, const std::vector<double>& got, const std::vector<double>& want) {
  const std::string name = what;
  CAPTURE(name);
  const double e = relative_error(got, want);
  CAPTURE(e);
  CHECK(e <= tolerance<T>());
}

template <class T>
void each_problem(void (*check)(problem<T>&)) {
  at::set_num_threads(1);
  std::uint32_t seed = 1;
  for (const shape& s : shapes)
    for (bool last : {false, true}) {
      const std::string described = describe(s, last);
      CAPTURE(described);
      problem<T> p(s, last, seed++);
      check(p);
    }
}

// ---- batch normalization ----

template <class T>
torch_result torch_batch_norm(problem<T>& p, const std::vector<T>& gamma,
                              const std::vector<T>& beta, double momentum, double eps) {
  at::Tensor running_mean, running_var;  // fresh for each run
  torch_result r = torch_run(p, gamma, beta, [&](at::Tensor x, at::Tensor g, at::Tensor b) {
    running_mean = at::zeros({p.s.C}, at::TensorOptions().dtype(scalar_type<T>()));
    running_var = at::ones({p.s.C}, at::TensorOptions().dtype(scalar_type<T>()));
    return at::batch_norm(x, g, b, running_mean, running_var, /*training=*/true, momentum, eps,
                          /*cudnn_enabled=*/false);
  });
  r.running_mean = values(running_mean);
  r.running_var = values(running_var);
  return r;
}

template <class T, class Backend>
void check_bkn_batch_norm(const Backend& backend, problem<T>& p) {
  const index_t C = p.s.C;
  bkn::layer_config cfg;
  cfg.channels = C;
  bkn::layer_storage<T> st(cfg);
  st.gamma = random_channels<T>(C, 1, 0.3, 3);
  st.beta = random_channels<T>(C, 0, 1, 4);
  bkn::options opt;  // no prior: batch normalization, momentum 0.1, unbiased running variance
  const bkn::layer<T> L = st.view();
  bkn::host_workspace ws(bkn::workspace_size(backend, opt, {p.s.N, C, p.s.H, p.s.W}));
  bkn::forward(backend, opt, L, p.cview(p.x_mem), p.view(p.y_mem), {}, ws.bytes());
  bkn::backward(backend, opt, L, p.cview(p.x_mem), p.cview(p.dy_mem), p.view(p.dx_mem), {}, {},
                ws.bytes());
  const torch_result want = torch_batch_norm(p, st.gamma, st.beta, opt.momentum, opt.epsilon);
  compare<T>("y", p.logical(p.y_mem), want.y);
  compare<T>("dx", p.logical(p.dx_mem), want.dx);
  compare<T>("dgamma", values(st.dgamma), want.dgamma);
  compare<T>("dbeta", values(st.dbeta), want.dbeta);
  compare<T>("running mean", values(st.running_mean), want.running_mean);
  compare<T>("running var", values(st.running_var), want.running_var);
}

#ifdef BKN_TEST_BATCH_NORM
template <class T, class Backend>
void check_method_batch_norm(const Backend& backend, problem<T>& p) {
  const index_t C = p.s.C;
  std::vector<T> gamma = random_channels<T>(C, 1, 0.3, 5), beta = random_channels<T>(C, 0, 1, 6);
  std::vector<T> dgamma(gamma.size()), dbeta(beta.size()), mean(gamma.size(), T(0)),
      var(gamma.size(), T(1));
  bkn::batch_norm::options opt;
  bkn::batch_norm::layer<T> L;
  L.params = {gamma, beta};
  L.grads = {dgamma, dbeta};
  L.running.mean = mean;
  L.running.var = var;
  bkn::host_workspace ws(bkn::batch_norm::workspace_size(backend, opt, {p.s.N, C, p.s.H, p.s.W}));
  bkn::batch_norm::forward(backend, opt, L, p.cview(p.x_mem), p.view(p.y_mem), ws.bytes());
  bkn::batch_norm::backward(backend, opt, L, p.cview(p.x_mem), p.cview(p.dy_mem),
                            p.view(p.dx_mem), ws.bytes());
  const torch_result want = torch_batch_norm(p, gamma, beta, opt.momentum, opt.epsilon);
  compare<T>("y", p.logical(p.y_mem), want.y);
  compare<T>("dx", p.logical(p.dx_mem), want.dx);
  compare<T>("dgamma", values(dgamma), want.dgamma);
  compare<T>("dbeta", values(dbeta), want.dbeta);
  compare<T>("running mean", values(mean), want.running_mean);
  compare<T>("running var", values(var), want.running_var);
}
#endif

// ---- group, layer and instance normalization ----

enum class sample_method { group, layer, instance };

template <class T, class Backend>
void check_sample_method(const Backend& backend, problem<T>& p, sample_method method,
                         index_t groups) {
  const index_t N = p.s.N, C = p.s.C, H = p.s.H, W = p.s.W;
  const std::string method_name = method == sample_method::group   ? "group_norm"
                                  : method == sample_method::layer ? "layer_norm"
                                                                   : "instance_norm";
  CAPTURE(method_name);
  std::vector<T> gamma = random_channels<T>(C, 1, 0.3, 7), beta = random_channels<T>(C, 0, 1, 8);
  std::vector<T> dgamma(gamma.size()), dbeta(beta.size());
  std::vector<T> mean(std::size_t(N * groups)), var(mean.size());
  const bkn::group_norm::layer<T> L{{gamma, beta}, {dgamma, dbeta}, {mean, var}};
  torch_result want;
  const double eps = 1e-5;
  switch (method) {
    case sample_method::group: {
      bkn::group_norm::options opt;
      opt.groups = groups;
      bkn::host_workspace ws(bkn::group_norm::workspace_size(backend, opt, {N, C, H, W}));
      bkn::group_norm::forward(backend, opt, L, p.cview(p.x_mem), p.view(p.y_mem), ws.bytes());
      bkn::group_norm::backward(backend, opt, L, p.cview(p.x_mem), p.cview(p.dy_mem),
                                p.view(p.dx_mem), ws.bytes());
      want = torch_run(p, gamma, beta, [&](at::Tensor x, at::Tensor g, at::Tensor b) {
        return at::group_norm(x, groups, g, b, eps, /*cudnn_enabled=*/false);
      });
      break;
    }
    case sample_method::layer: {
      const bkn::layer_norm::options opt;
      bkn::host_workspace ws(bkn::layer_norm::workspace_size(backend, opt, {N, C, H, W}));
      bkn::layer_norm::forward(backend, opt, L, p.cview(p.x_mem), p.view(p.y_mem), ws.bytes());
      bkn::layer_norm::backward(backend, opt, L, p.cview(p.x_mem), p.cview(p.dy_mem),
                                p.view(p.dx_mem), ws.bytes());
      // PyTorch's LayerNorm([C, H, W]) has elementwise weights: give it bkn's per-channel
      // gamma and beta broadcast over H x W; its weight gradient summed over H x W is bkn's.
      want = torch_run(p, gamma, beta, [&](at::Tensor x, at::Tensor g, at::Tensor b) {
        return at::layer_norm(x, {C, H, W}, g.view({C, 1, 1}).expand({C, H, W}),
                              b.view({C, 1, 1}).expand({C, H, W}), eps,
                              /*cudnn_enable=*/false);
      });
      break;
    }
    case sample_method::instance: {
      const bkn::instance_norm::options opt;
      bkn::host_workspace ws(bkn::instance_norm::workspace_size(backend, opt, {N, C, H, W}));
      bkn::instance_norm::forward(backend, opt, L, p.cview(p.x_mem), p.view(p.y_mem),
                                  ws.bytes());
      bkn::instance_norm::backward(backend, opt, L, p.cview(p.x_mem), p.cview(p.dy_mem),
                                   p.view(p.dx_mem), ws.bytes());
      want = torch_run(p, gamma, beta, [&](at::Tensor x, at::Tensor g, at::Tensor b) {
        return at::instance_norm(x, g, b, {}, {}, /*use_input_stats=*/true, 0.1, eps,
                                 /*cudnn_enabled=*/false);
      });
      break;
    }
  }
  compare<T>("y", p.logical(p.y_mem), want.y);
  compare<T>("dx", p.logical(p.dx_mem), want.dx);
  compare<T>("dgamma", values(dgamma), want.dgamma);
  compare<T>("dbeta", values(dbeta), want.dbeta);
}

template <class T, class Backend>
void check_group_norms(const Backend& backend, problem<T>& p) {
  const index_t C = p.s.C, HW = p.s.H * p.s.W;
  // With 2 or 3 values per group the normalized values are nearly fixed (+-1 for 2) and dx is a
  // difference of nearly equal terms: float resolves it to ~1e-3 only, so float skips them.
  const index_t fewest = std::is_same_v<T, float> ? 4 : 2;
  for (index_t groups : {index_t(1), index_t(2), index_t(3), C}) {
    if (C % groups != 0 || C / groups * HW < fewest) continue;
    CAPTURE(groups);
    check_sample_method(backend, p, sample_method::group, groups);
  }
  check_sample_method(backend, p, sample_method::layer, 1);
  if (HW > 1) check_sample_method(backend, p, sample_method::instance, C);
}

template <class T>
void reference_batch_norm(problem<T>& p) {
  check_bkn_batch_norm(bkn::reference_backend{}, p);
}
template <class T>
void reference_group_norms(problem<T>& p) {
  check_group_norms(bkn::reference_backend{}, p);
}
#ifdef BKN_TEST_BATCH_NORM
template <class T>
void reference_method_batch_norm(problem<T>& p) {
  check_method_batch_norm(bkn::reference_backend{}, p);
}
#endif
#ifdef BKN_TEST_EIGEN
template <class T>
void eigen_batch_norm(problem<T>& p) {
  check_bkn_batch_norm(bkn::eigen_backend{2}, p);
}
template <class T>
void eigen_group_norms(problem<T>& p) {
  check_group_norms(bkn::eigen_backend{2}, p);
}
#endif

}  // namespace

TEST_CASE_TEMPLATE("torch: bkn::forward without a prior is torch::batch_norm (reference)", T,
                   float, double) {
  each_problem<T>(reference_batch_norm<T>);
}

TEST_CASE_TEMPLATE("torch: bkn::batch_norm is torch::batch_norm (reference)", T, float, double) {
#ifdef BKN_TEST_BATCH_NORM
  each_problem<T>(reference_method_batch_norm<T>);
#else
  MESSAGE("skipped: include/bkn/methods/batch_norm.hpp not present");
#endif
}

TEST_CASE_TEMPLATE(
    "torch: group / layer / instance norm are torch::group_norm, layer_norm, instance_norm "
    "(reference)",
    T, float, double) {
  each_problem<T>(reference_group_norms<T>);
}

TEST_CASE_TEMPLATE("torch: batch norm and group / layer / instance norm on the Eigen backend", T,
                   float, double) {
#ifdef BKN_TEST_EIGEN
  each_problem<T>(eigen_batch_norm<T>);
  each_problem<T>(eigen_group_norms<T>);
#else
  MESSAGE("skipped: the Eigen backend is not built");
#endif
}
