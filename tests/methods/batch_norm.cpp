// SPDX-License-Identifier: MIT
// Tests of bkn::batch_norm (include/bkn/methods/batch_norm.hpp): statistics, outputs and moving
// averages against direct computations, agreement with bkn::forward/backward without a prior,
// gradients against finite differences in double over layouts and groups, both inference
// modes, and the validation (nothing written after a throw; N = 0 changes nothing).
#include <doctest/doctest.h>

#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>
#include <bkn/methods/batch_norm.hpp>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "methods/batch_cases.hpp"
#include "support/finite_difference.hpp"
#include "support/thrown.hpp"

namespace {

using bkn::index_t;
using bkn::span;
using B = bkn::reference_backend;
namespace bn = bkn::batch_norm;

using namespace bkn_test::batch_cases;

/// One batch_norm layer over host memory with random inputs and parameters.
template <class T>
struct problem {
  shape_case sc;
  index_t G;
  host_tensor<T> x, y, dy, dx;
  std::vector<T> gamma, beta, dgamma, dbeta, running_mean, running_var, saved_mean, saved_var;
  bn::options opt;
  bkn::host_workspace ws;

  problem(const shape_case& c, std::uint32_t seed)
      : sc(c),
        G(c.group_size == 0 ? 1 : c.shape.batch / c.group_size),
        x(c.lay, c.shape),
        y(c.lay, c.shape),
        dy(c.lay, c.shape),
        dx(c.lay, c.shape),
        ws(0) {
    const index_t C = c.shape.channels;
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal;
    for (T* e : x.entries()) *e = T(2 + 1.5 * normal(rng));
    for (T* e : dy.entries()) *e = T(normal(rng));
    for (index_t k = 0; k < C; ++k) {
      gamma.push_back(T(1 + 0.3 * normal(rng)));
      beta.push_back(T(normal(rng)));
      running_mean.push_back(T(normal(rng)));
      running_var.push_back(T(0.5 + std::abs(normal(rng))));
    }
    dgamma.assign(std::size_t(C), T(0));
    dbeta.assign(std::size_t(C), T(0));
    saved_mean.assign(std::size_t(G * C), T(0));
    saved_var.assign(std::size_t(G * C), T(0));
    opt.group_size = c.group_size;
    ws = bkn::host_workspace(bn::workspace_size(B{}, opt, c.shape));
  }

  bn::layer<T> layer() {
    bn::layer<T> L;
    L.params.gamma = span<const T>(gamma.data(), index_t(gamma.size()));
    L.params.beta = span<const T>(beta.data(), index_t(beta.size()));
    L.grads.gamma = dgamma;
    L.grads.beta = dbeta;
    L.running.mean = running_mean;
    L.running.var = running_var;
    L.saved.mean = saved_mean;
    L.saved.var = saved_var;
    return L;
  }
  void forward() { bn::forward(B{}, opt, layer(), x.cview(), y.view(), ws.bytes()); }
  void backward() { bn::backward(B{}, opt, layer(), x.cview(), dy.cview(), dx.view(), ws.bytes()); }
  /// sum dy * y: its gradient is what backward computes from dy.
  double loss() {
    forward();
    double s = 0;
    const auto yv = y.values(), dyv = dy.values();
    for (std::size_t i = 0; i < yv.size(); ++i) s += double(yv[i]) * double(dyv[i]);
    return s;
  }
};

}  // namespace

TEST_CASE_TEMPLATE("batch_norm: statistics, outputs and moving averages from their definitions", T,
                   float, double) {
  for (const shape_case& sc : shape_cases()) {
    CAPTURE(describe(sc));
    problem<T> p(sc, 3);
    const auto running_mean = p.running_mean, running_var = p.running_var;
    p.opt.momentum = 0.3;
    p.forward();
    const index_t C = sc.shape.channels, S = sc.shape.spatial(), N = sc.shape.batch;
    const index_t n_per = N / p.G, m = n_per * S;
    std::vector<double> want_mean, want_var, want_y(std::size_t(N * C * S));
    for (index_t g = 0; g < p.G; ++g)
      for (index_t c = 0; c < C; ++c) {
        const auto [mean, var] = group_statistics(p.x, n_per, g, c, S);
        want_mean.push_back(mean);
        want_var.push_back(var);
        for (index_t n = g * n_per; n < (g + 1) * n_per; ++n)
          for (index_t s = 0; s < S; ++s)
            want_y[std::size_t((n * C + c) * S + s)] =
                double(p.gamma[c]) * (double(p.x.at(n, c, s)) - mean) / std::sqrt(var + 1e-5) +
                double(p.beta[c]);
      }
    CHECK(max_error(p.saved_mean, want_mean) <= tolerance<T>());
    CHECK(max_error(p.saved_var, want_var) <= tolerance<T>());
    CHECK(max_error(p.y.values(), want_y) <= 10 * tolerance<T>());
    // The moving averages: the groups' statistics averaged, the variance unbiased.
    for (index_t c = 0; c < C; ++c) {
      double mean = 0, var = 0;
      for (index_t g = 0; g < p.G; ++g) {
        mean += want_mean[std::size_t(g * C + c)] / double(p.G);
        var += want_var[std::size_t(g * C + c)] * double(m) / double(m - 1) / double(p.G);
      }
      CHECK(double(p.running_mean[c]) ==
            doctest::Approx(0.7 * double(running_mean[c]) + 0.3 * mean).epsilon(tolerance<T>()));
      CHECK(double(p.running_var[c]) ==
            doctest::Approx(0.7 * double(running_var[c]) + 0.3 * var).epsilon(tolerance<T>()));
    }
  }
}

TEST_CASE_TEMPLATE("batch_norm: biased moving variance when asked", T, float, double) {
  problem<T> p({layout::nchw, {4, 2, 2, 1}, 2}, 5);
  p.opt.unbiased_running_variance = false;
  p.opt.momentum = 1;
  p.forward();
  for (index_t c = 0; c < 2; ++c) {
    const double want = (double(p.saved_var[c]) + double(p.saved_var[2 + c])) / 2;
    CHECK(double(p.running_var[c]) == doctest::Approx(want).epsilon(tolerance<T>()));
  }
}

TEST_CASE_TEMPLATE("batch_norm: agrees with bkn::forward and bkn::backward without a prior", T,
                   float, double) {
  for (const shape_case& sc : shape_cases()) {
    for (int mode = 0; mode < 3; ++mode) {  // training, inference from the batch, from running
      CAPTURE(describe(sc));
      CAPTURE(mode);
      problem<T> p(sc, 7);
      p.opt.training = mode == 0;
      p.opt.inference =
          mode == 1 ? bkn::inference_statistics::chain : bkn::inference_statistics::running;
      p.forward();
      p.backward();

      bkn::layer_config cfg;
      cfg.channels = sc.shape.channels;
      cfg.groups = p.G;
      bkn::layer_storage<T> s(cfg);
      problem<T> q(sc, 7);  // the same inputs
      s.gamma = q.gamma;
      s.beta = q.beta;
      s.running_mean = q.running_mean;
      s.running_var = q.running_var;
      bkn::options o;
      o.group_size = sc.group_size;
      o.training = p.opt.training;
      o.inference = p.opt.inference;
      bkn::host_workspace ws(bkn::workspace_size(B{}, o, sc.shape));
      bkn::forward(B{}, o, s.view(), q.x.cview(), q.y.view(), {}, ws.bytes());
      bkn::backward(B{}, o, s.view(), q.x.cview(), q.dy.cview(), q.dx.view(), {}, {}, ws.bytes());

      // Same moments, coefficients and affine pass: the same bits.
      CHECK(p.y.values() == q.y.values());
      CHECK(p.running_mean == s.running_mean);
      CHECK(p.running_var == s.running_var);
      if (mode < 2) {
        CHECK(p.saved_mean == s.observed_mean);
        CHECK(p.saved_var == s.observed_cov);
      }
      // The backward's coefficients are computed by other formulas: to rounding.
      CHECK(max_error(p.dx.values(), q.dx.values()) <= tolerance<T>());
      CHECK(max_error(p.dgamma, s.dgamma) <= tolerance<T>());
      CHECK(max_error(p.dbeta, s.dbeta) <= tolerance<T>());
    }
  }
}

TEST_CASE("batch_norm: gradients match finite differences (double)") {
  for (const shape_case& sc : shape_cases()) {
    for (int mode = 0; mode < 3; ++mode) {
      CAPTURE(describe(sc));
      CAPTURE(mode);
      problem<double> p(sc, 11);
      p.opt.training = mode == 0;
      p.opt.inference =
          mode == 1 ? bkn::inference_statistics::chain : bkn::inference_statistics::running;
      p.forward();
      p.backward();
      const auto dx = p.dx.values();
      const auto dgamma = p.dgamma, dbeta = p.dbeta;
      auto loss = [&] { return p.loss(); };
      // With batch statistics sum dy y barely moves with x when dy is constant per group;
      // random dy gives every term of dx a part.
      bkn_test::check_gradient("dx", p.x.entries(), dx, loss, mode < 2 && two_values(sc));
      bkn_test::check_gradient("dgamma", bkn_test::pointers(p.gamma), dgamma, loss);
      bkn_test::check_gradient("dbeta", bkn_test::pointers(p.beta), dbeta, loss);
    }
  }
}

TEST_CASE_TEMPLATE(
    "batch_norm: inference from the batch normalizes like training, moving "
    "averages untouched",
    T, float, double) {
  problem<T> train({layout::nhwc, {6, 3, 2, 2}, 3}, 13), infer({layout::nhwc, {6, 3, 2, 2}, 3}, 13);
  infer.opt.training = false;
  infer.opt.inference = bkn::inference_statistics::chain;
  const auto running_mean = infer.running_mean, running_var = infer.running_var;
  train.forward();
  infer.forward();
  CHECK(train.y.values() == infer.y.values());
  CHECK(infer.running_mean == running_mean);
  CHECK(infer.running_var == running_var);
}

TEST_CASE_TEMPLATE("batch_norm: inference from the moving averages", T, float, double) {
  problem<T> p({layout::strided, {3, 3, 2, 2}, 0}, 17);
  p.opt.training = false;
  p.opt.group_size = 0;
  const auto saved_mean = p.saved_mean;
  p.forward();
  std::vector<double> want;
  for (index_t n = 0; n < 3; ++n)
    for (index_t c = 0; c < 3; ++c)
      for (index_t s = 0; s < 4; ++s)
        want.push_back(double(p.gamma[c]) * (double(p.x.at(n, c, s)) - double(p.running_mean[c])) /
                           std::sqrt(double(p.running_var[c]) + 1e-5) +
                       double(p.beta[c]));
  CHECK(max_error(p.y.values(), want) <= 10 * tolerance<T>());
  CHECK(p.saved_mean == saved_mean);
  // No running statistics: nothing to normalize with in this mode; no saved statistics needed.
  bn::layer<T> L = p.layer();
  L.saved = {};
  bn::forward(B{}, p.opt, L, p.x.cview(), p.y.view(), p.ws.bytes());
  L.running = {};
  const auto e =
      bkn_test::thrown([&] { bn::forward(B{}, p.opt, L, p.x.cview(), p.y.view(), p.ws.bytes()); });
  CHECK(std::string(e.argument()) == "running");
}

TEST_CASE_TEMPLATE("batch_norm: without saved statistics backward recomputes them", T, float,
                   double) {
  for (const shape_case& sc : shape_cases()) {
    CAPTURE(describe(sc));
    problem<T> p(sc, 47), q(sc, 47);
    p.forward();
    p.backward();
    bn::layer<T> L = q.layer();
    L.saved = {};
    bn::forward(B{}, q.opt, L, q.x.cview(), q.y.view(), q.ws.bytes());
    bn::backward(B{}, q.opt, L, q.x.cview(), q.dy.cview(), q.dx.view(), q.ws.bytes());
    CHECK(p.y.values() == q.y.values());
    CHECK(p.dx.values() == q.dx.values());
    CHECK(p.dgamma == q.dgamma);
    CHECK(p.running_var == q.running_var);
    CHECK(q.saved_mean == std::vector<T>(q.saved_mean.size(), T(0)));
  }
}

TEST_CASE("batch_norm: empty gamma and beta mean 1 and 0, empty gradients are not computed") {
  problem<double> p({layout::nchw, {4, 2, 3, 1}, 2}, 19), q({layout::nchw, {4, 2, 3, 1}, 2}, 19);
  q.gamma.assign(2, 1.0);
  q.beta.assign(2, 0.0);
  bn::layer<double> L = p.layer();
  L.params = {};
  L.grads = {};
  bn::forward(B{}, p.opt, L, p.x.cview(), p.y.view(), p.ws.bytes());
  bn::backward(B{}, p.opt, L, p.x.cview(), p.dy.cview(), p.dx.view(), p.ws.bytes());
  q.forward();
  q.backward();
  CHECK(p.y.values() == q.y.values());
  CHECK(p.dx.values() == q.dx.values());
  CHECK(p.dgamma == std::vector<double>(2, 0.0));
}

TEST_CASE("batch_norm: float tensors with double per-channel arrays") {
  const shape_case sc{layout::nhwc, {4, 3, 2, 2}, 2};
  problem<double> want(sc, 53), got(sc, 53);
  host_tensor<float> x(sc.lay, sc.shape), y(sc.lay, sc.shape), dy(sc.lay, sc.shape),
      dx(sc.lay, sc.shape);
  // The same inputs on both sides: x and dy rounded to float.
  const auto xe = x.entries(), dye = dy.entries();
  const auto wx = want.x.entries(), wdy = want.dy.entries();
  for (std::size_t i = 0; i < xe.size(); ++i) {
    *xe[i] = float(*wx[i]);
    *wx[i] = double(*xe[i]);
    *dye[i] = float(*wdy[i]);
    *wdy[i] = double(*dye[i]);
  }
  want.forward();
  want.backward();
  bn::forward(B{}, got.opt, got.layer(), x.cview(), y.view(), got.ws.bytes());
  bn::backward(B{}, got.opt, got.layer(), x.cview(), dy.cview(), dx.view(), got.ws.bytes());
  CHECK(max_error(y.values(), want.y.values()) <= 1e-6);
  CHECK(max_error(dx.values(), want.dx.values()) <= 1e-6);
  CHECK(max_error(got.saved_var, want.saved_var) <= 1e-12);
  CHECK(max_error(got.dgamma, want.dgamma) <= 1e-12);
  CHECK(max_error(got.running_var, want.running_var) <= 1e-12);
}

TEST_CASE("batch_norm: dx may be dy, y may be x") {
  problem<double> p({layout::nhwc, {4, 3, 2, 2}, 2}, 23), q({layout::nhwc, {4, 3, 2, 2}, 2}, 23);
  q.forward();
  q.backward();
  bn::forward(B{}, p.opt, p.layer(), p.x.cview(), p.x.view(), p.ws.bytes());
  CHECK(p.x.values() == q.y.values());
  problem<double> r({layout::nhwc, {4, 3, 2, 2}, 2}, 23);
  r.forward();
  bn::backward(B{}, r.opt, r.layer(), r.x.cview(), r.dy.cview(), r.dy.view(), r.ws.bytes());
  CHECK(r.dy.values() == q.dx.values());
}

namespace {

/// Every array forward or backward may write, as bytes.
template <class T>
std::vector<unsigned char> snapshot(problem<T>& p) {
  std::vector<unsigned char> bytes;
  auto add = [&](const std::vector<T>& v) {
    const auto* b = reinterpret_cast<const unsigned char*>(v.data());
    bytes.insert(bytes.end(), b, b + v.size() * sizeof(T));
  };
  for (auto* v : {&p.y.memory(), &p.dx.memory(), &p.dgamma, &p.dbeta, &p.running_mean,
                  &p.running_var, &p.saved_mean, &p.saved_var})
    add(*v);
  return bytes;
}

/// Runs `call` on a fresh valid problem after `spoil`: it must throw invalid_argument naming
/// `routine` and `argument`, and leave every output byte as it was.
template <class T>
void expect_rejected(const char* routine, const char* argument,
                     const std::function<void(problem<T>&, bn::layer<T>&)>& spoil, bool backward) {
  CAPTURE(argument);
  CAPTURE(backward);
  problem<T> p({layout::nchw, {4, 3, 2, 1}, 2}, 29);
  p.forward();  // the saved statistics a backward reads
  for (auto* v : {&p.y.memory(), &p.dx.memory()})
    for (T& e : *v) e = T(-7);
  bn::layer<T> L = p.layer();
  spoil(p, L);
  const auto before = snapshot(p);
  const auto e = bkn_test::thrown([&] {
    if (backward)
      bn::backward(B{}, p.opt, L, p.x.cview(), p.dy.cview(), p.dx.view(), p.ws.bytes());
    else
      bn::forward(B{}, p.opt, L, p.x.cview(), p.y.view(), p.ws.bytes());
  });
  CHECK(std::string(e.routine()) == routine);
  CHECK(std::string(e.argument()) == argument);
  CHECK(snapshot(p) == before);
}

}  // namespace

TEST_CASE_TEMPLATE("batch_norm: invalid arguments throw and leave every output untouched", T, float,
                   double) {
  using L_t = bn::layer<T>;
  using spoiler = std::function<void(problem<T>&, L_t&)>;
  struct bad {
    const char* argument;
    spoiler spoil;
  };
  std::vector<T> short_array(2), long_array(7);
  const std::vector<bad> cases = {
      {"options.epsilon", [](problem<T>& p, L_t&) { p.opt.epsilon = 0; }},
      {"options.epsilon", [](problem<T>& p, L_t&) { p.opt.epsilon = std::nan(""); }},
      {"options.momentum", [](problem<T>& p, L_t&) { p.opt.momentum = 1.5; }},
      {"options.momentum", [](problem<T>& p, L_t&) { p.opt.momentum = -0.1; }},
      {"options.group_size", [](problem<T>& p, L_t&) { p.opt.group_size = 3; }},
      {"options.group_size", [](problem<T>& p, L_t&) { p.opt.group_size = -1; }},
      {"params.gamma",
       [&](problem<T>&, L_t& L) { L.params.gamma = span<const T>(short_array.data(), 2); }},
      {"params.beta",
       [&](problem<T>&, L_t& L) { L.params.beta = span<const T>(long_array.data(), 7); }},
      {"running.mean", [&](problem<T>&, L_t& L) { L.running.mean = short_array; }},
      {"running", [&](problem<T>&, L_t& L) { L.running.var = {}; }},
      {"running.skipped", [&](problem<T>&, L_t& L) { L.running.skipped = short_array; }},
      {"saved.mean", [&](problem<T>&, L_t& L) { L.saved.mean = long_array; }},
      {"saved", [&](problem<T>&, L_t& L) { L.saved.var = {}; }},
      {"workspace", [](problem<T>& p, L_t&) { p.ws = bkn::host_workspace(64); }},
  };
  for (bool backward : {false, true})
    for (const bad& c : cases)
      expect_rejected<T>(backward ? "bkn::batch_norm::backward" : "bkn::batch_norm::forward",
                         c.argument, c.spoil, backward);
  // Backward only: gradient sizes.
  expect_rejected<T>(
      "bkn::batch_norm::backward", "grads.gamma",
      [&](problem<T>&, L_t& L) { L.grads.gamma = short_array; }, true);
  expect_rejected<T>(
      "bkn::batch_norm::backward", "grads.beta",
      [&](problem<T>&, L_t& L) { L.grads.beta = long_array; }, true);

  // Views: shapes, overlap.
  problem<T> p({layout::nchw, {4, 3, 2, 1}, 2}, 31);
  host_tensor<T> wrong(layout::nchw, {4, 3, 1, 2});
  auto e = bkn_test::thrown(
      [&] { bn::forward(B{}, p.opt, p.layer(), p.x.cview(), wrong.view(), p.ws.bytes()); });
  CHECK(std::string(e.argument()) == "y");
  e = bkn_test::thrown([&] {
    bn::backward(B{}, p.opt, p.layer(), p.x.cview(), p.dy.cview(), bkn::tensor_view<T>(p.x.view()),
                 p.ws.bytes());
  });
  CHECK(std::string(e.argument()) == "dx");
}

TEST_CASE_TEMPLATE("batch_norm: one value per channel and group is rejected with batch statistics",
                   T, float, double) {
  problem<T> p({layout::nc, {4, 3, 1, 1}, 1}, 37);
  for (T& e : p.y.memory()) e = T(-7);
  const auto before = snapshot(p);
  for (bool training : {true, false}) {
    p.opt.training = training;
    p.opt.inference = bkn::inference_statistics::chain;
    const auto e = bkn_test::thrown(
        [&] { bn::forward(B{}, p.opt, p.layer(), p.x.cview(), p.y.view(), p.ws.bytes()); });
    CHECK(std::string(e.argument()) == "x");
    CHECK(std::string(e.what()).find("one value per channel") != std::string::npos);
    CHECK(snapshot(p) == before);
  }
  // From the moving averages it is fine.
  p.opt.inference = bkn::inference_statistics::running;
  bn::forward(B{}, p.opt, p.layer(), p.x.cview(), p.y.view(), p.ws.bytes());
  CHECK(p.y.values()[0] != T(-7));
}

TEST_CASE_TEMPLATE("batch_norm: an empty batch changes nothing", T, float, double) {
  problem<T> p({layout::nchw, {0, 3, 2, 2}, 0}, 41);
  p.saved_mean.assign(3, T(5));
  p.saved_var.assign(3, T(5));
  const auto before = snapshot(p);
  p.forward();
  p.backward();
  CHECK(snapshot(p) == before);
}

TEST_CASE("batch_norm: options.check_finite names the first NaN") {
  problem<double> p({layout::nhwc, {2, 3, 2, 1}, 0}, 43);
  p.opt.check_finite = true;
  p.x.at(1, 2, 1) = std::numeric_limits<double>::quiet_NaN();
  const auto before = snapshot(p);
  try {
    p.forward();
    FAIL("expected bkn::nonfinite_input");
  } catch (const bkn::nonfinite_input& e) {
    CHECK(e.sample() == 1);
    CHECK(e.channel() == 2);
  }
  CHECK(snapshot(p) == before);
}
