// SPDX-License-Identifier: MIT
// Tests of bkn::batch_renorm (include/bkn/methods/batch_renorm.hpp): r, d, outputs and moving
// averages against their definitions over a schedule of r_max and d_max, equality with
// bkn::batch_norm at r_max = 1, d_max = 0, gradients with r and d held constant against finite
// differences in double (through the library where r and d are clipped, through a direct
// formula where they are not), inference, and the validation.
#include <doctest/doctest.h>

#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>
#include <bkn/methods/batch_norm.hpp>
#include <bkn/methods/batch_renorm.hpp>
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
namespace brn = bkn::batch_renorm;

using namespace bkn_test::batch_cases;

/// One batch_renorm layer over host memory with random inputs, parameters and moving averages.
template <class T>
struct problem {
  shape_case sc;
  index_t G;
  host_tensor<T> x, y, dy, dx;
  std::vector<T> gamma, beta, dgamma, dbeta, running_mean, running_var, saved_mean, saved_var, r, d;
  brn::options opt;
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
      running_mean.push_back(T(2 + normal(rng)));
      running_var.push_back(T(0.5 + 4 * std::abs(normal(rng))));
    }
    dgamma.assign(std::size_t(C), T(0));
    dbeta.assign(std::size_t(C), T(0));
    for (auto* v : {&saved_mean, &saved_var, &r, &d}) v->assign(std::size_t(G * C), T(0));
    opt.group_size = c.group_size;
    ws = bkn::host_workspace(brn::workspace_size(B{}, opt, c.shape));
  }

  brn::layer<T> layer() {
    brn::layer<T> L;
    L.params.gamma = span<const T>(gamma.data(), index_t(gamma.size()));
    L.params.beta = span<const T>(beta.data(), index_t(beta.size()));
    L.grads.gamma = dgamma;
    L.grads.beta = dbeta;
    L.running.mean = running_mean;
    L.running.var = running_var;
    L.saved.mean = saved_mean;
    L.saved.var = saved_var;
    L.saved.r = r;
    L.saved.d = d;
    return L;
  }
  void forward() { brn::forward(B{}, opt, layer(), x.cview(), y.view(), ws.bytes()); }
  void backward() {
    brn::backward(B{}, opt, layer(), x.cview(), dy.cview(), dx.view(), ws.bytes());
  }
  double loss() {
    forward();
    double s = 0;
    const auto yv = y.values(), dyv = dy.values();
    for (std::size_t i = 0; i < yv.size(); ++i) s += double(yv[i]) * double(dyv[i]);
    return s;
  }
};

}  // namespace

TEST_CASE_TEMPLATE("batch_renorm: r_max = 1 and d_max = 0 is batch_norm", T, float, double) {
  for (const shape_case& sc : shape_cases()) {
    CAPTURE(describe(sc));
    problem<T> p(sc, 3);
    p.forward();
    p.backward();

    problem<T> q(sc, 3);  // the same inputs, through batch_norm
    bkn::batch_norm::options o;
    o.group_size = sc.group_size;
    bkn::batch_norm::layer<T> L;
    L.params.gamma = span<const T>(q.gamma.data(), index_t(q.gamma.size()));
    L.params.beta = span<const T>(q.beta.data(), index_t(q.beta.size()));
    L.grads.gamma = q.dgamma;
    L.grads.beta = q.dbeta;
    L.running.mean = q.running_mean;
    L.running.var = q.running_var;
    L.saved.mean = q.saved_mean;
    L.saved.var = q.saved_var;
    bkn::host_workspace ws(bkn::batch_norm::workspace_size(B{}, o, sc.shape));
    bkn::batch_norm::forward(B{}, o, L, q.x.cview(), q.y.view(), ws.bytes());
    bkn::batch_norm::backward(B{}, o, L, q.x.cview(), q.dy.cview(), q.dx.view(), ws.bytes());

    CHECK(p.r == std::vector<T>(p.r.size(), T(1)));
    for (T v : p.d) CHECK(v == T(0));
    CHECK(p.y.values() == q.y.values());
    CHECK(p.dx.values() == q.dx.values());
    CHECK(p.dgamma == q.dgamma);
    CHECK(p.dbeta == q.dbeta);
    CHECK(p.running_mean == q.running_mean);
    CHECK(p.running_var == q.running_var);
    CHECK(p.saved_mean == q.saved_mean);
    CHECK(p.saved_var == q.saved_var);
  }
}

TEST_CASE_TEMPLATE(
    "batch_renorm: r, d, outputs and moving averages from their definitions, over "
    "a schedule",
    T, float, double) {
  const double inf = std::numeric_limits<double>::infinity();
  for (const shape_case& sc : shape_cases()) {
    problem<T> p(sc, 5);
    p.opt.momentum = 0.2;
    // A host's schedule: batch normalization first, then looser bounds step by step. The
    // moving averages move between the steps; r and d use them as they were before each.
    for (const std::pair<double, double>& bounds :
         {std::pair{1.0, 0.0}, {1.3, 0.1}, {2.0, 0.5}, {inf, inf}}) {
      // Not a structured binding: CAPTURE's lambda cannot name one before C++20 (clang 14).
      const double r_max = bounds.first, d_max = bounds.second;
      CAPTURE(describe(sc));
      CAPTURE(r_max);
      p.opt.r_max = r_max;
      p.opt.d_max = d_max;
      const auto running_mean = p.running_mean, running_var = p.running_var;
      p.forward();
      const index_t C = sc.shape.channels, S = sc.shape.spatial(), N = sc.shape.batch;
      const index_t n_per = N / p.G, m = n_per * S;
      std::vector<double> want_r, want_d, want_y(std::size_t(N * C * S));
      bool clipped = false, free = false;
      for (index_t g = 0; g < p.G; ++g)
        for (index_t c = 0; c < C; ++c) {
          const auto [mean, var] = group_statistics(p.x, n_per, g, c, S);
          const double sigma = std::sqrt(var + 1e-5);
          const double sigma_run = std::sqrt(double(running_var[c]) + 1e-5);
          const double r_raw = sigma / sigma_run;
          const double d_raw = (mean - double(running_mean[c])) / sigma_run;
          const double r = std::min(std::max(r_raw, 1 / r_max), r_max);
          const double d = std::min(std::max(d_raw, -d_max), d_max);
          clipped = clipped || r != r_raw || d != d_raw;
          free = free || (r == r_raw && d == d_raw);
          want_r.push_back(r);
          want_d.push_back(d);
          for (index_t n = g * n_per; n < (g + 1) * n_per; ++n)
            for (index_t s = 0; s < S; ++s)
              want_y[std::size_t((n * C + c) * S + s)] =
                  double(p.gamma[c]) * ((double(p.x.at(n, c, s)) - mean) / sigma * r + d) +
                  double(p.beta[c]);
        }
      CHECK(max_error(p.r, want_r) <= tolerance<T>());
      CHECK(max_error(p.d, want_d) <= tolerance<T>());
      CHECK(max_error(p.y.values(), want_y) <= 10 * tolerance<T>());
      if (r_max == 1.0) CHECK(clipped);  // the schedule's steps do clip
      if (r_max == inf) CHECK(free);
      // The moving averages move toward the groups' mean statistics, after r and d.
      for (index_t c = 0; c < C; ++c) {
        double mean = 0, var = 0;
        for (index_t g = 0; g < p.G; ++g) {
          const auto [gm, gv] = group_statistics(p.x, n_per, g, c, S);
          mean += gm / double(p.G);
          var += gv * double(m) / double(m - 1) / double(p.G);
        }
        CHECK(double(p.running_mean[c]) ==
              doctest::Approx(0.8 * double(running_mean[c]) + 0.2 * mean).epsilon(tolerance<T>()));
        CHECK(double(p.running_var[c]) ==
              doctest::Approx(0.8 * double(running_var[c]) + 0.2 * var).epsilon(tolerance<T>()));
      }
    }
  }
}

TEST_CASE("batch_renorm: gradients with r and d clipped match finite differences (double)") {
  // Moving averages far from the batch: every r is 1 / r_max and every d is +d_max, constants
  // near x, so the gradient of the library's own forward is the method's gradient.
  for (const shape_case& sc : shape_cases()) {
    CAPTURE(describe(sc));
    problem<double> p(sc, 7);
    p.opt.r_max = 2;
    p.opt.d_max = 0.7;
    p.opt.momentum = 0;  // each loss() runs a forward: keep the moving averages where they are
    for (auto& v : p.running_var) v = 400;
    for (auto& v : p.running_mean) v = -50;
    p.forward();
    p.backward();
    for (double v : p.r) CHECK(v == 0.5);
    for (double v : p.d) CHECK(v == 0.7);
    const auto dx = p.dx.values();
    const auto dgamma = p.dgamma, dbeta = p.dbeta;
    auto loss = [&] { return p.loss(); };
    bkn_test::check_gradient("dx", p.x.entries(), dx, loss, two_values(sc));
    bkn_test::check_gradient("dgamma", bkn_test::pointers(p.gamma), dgamma, loss);
    bkn_test::check_gradient("dbeta", bkn_test::pointers(p.beta), dbeta, loss);
  }
}

TEST_CASE("batch_renorm: unclipped, the gradient holds r and d constant (double)") {
  // r and d strictly inside their bounds depend on x; the method treats them as constants.
  // The reference is a direct formula with r and d frozen at the forward's values.
  for (const shape_case& sc : shape_cases()) {
    CAPTURE(describe(sc));
    problem<double> p(sc, 9);
    p.opt.r_max = 100;
    p.opt.d_max = 100;
    p.forward();
    p.backward();
    const auto r = p.r, d = p.d;
    const index_t C = sc.shape.channels, S = sc.shape.spatial(), N = sc.shape.batch;
    const index_t n_per = N / p.G;
    auto frozen = [&](std::vector<double>* y_out) {
      double loss = 0;
      for (index_t g = 0; g < p.G; ++g)
        for (index_t c = 0; c < C; ++c) {
          const auto [mean, var] = group_statistics(p.x, n_per, g, c, S);
          const std::size_t i = std::size_t(g * C + c);
          for (index_t n = g * n_per; n < (g + 1) * n_per; ++n)
            for (index_t s = 0; s < S; ++s) {
              const double y =
                  p.gamma[c] * ((p.x.at(n, c, s) - mean) / std::sqrt(var + 1e-5) * r[i] + d[i]) +
                  p.beta[c];
              if (y_out) (*y_out)[std::size_t((n * C + c) * S + s)] = y;
              loss += y * p.dy.at(n, c, s);
            }
        }
      return loss;
    };
    std::vector<double> y(std::size_t(N * C * S));
    frozen(&y);
    CHECK(max_error(p.y.values(), y) <= 1e-12);  // the formula is the forward
    bool moving = false;
    for (double v : r) moving = moving || std::abs(v - 1) > 1e-3;
    CHECK(moving);
    const auto dx = p.dx.values();
    const auto dgamma = p.dgamma, dbeta = p.dbeta;
    auto loss = [&] { return frozen(nullptr); };
    bkn_test::check_gradient("dx", p.x.entries(), dx, loss, two_values(sc));
    bkn_test::check_gradient("dgamma", bkn_test::pointers(p.gamma), dgamma, loss);
    bkn_test::check_gradient("dbeta", bkn_test::pointers(p.beta), dbeta, loss);
  }
}

TEST_CASE("batch_renorm: inference normalizes with the moving averages, and its gradient") {
  for (const shape_case& sc : shape_cases()) {
    CAPTURE(describe(sc));
    problem<double> p(sc, 11);
    p.opt.training = false;
    const auto running_mean = p.running_mean, running_var = p.running_var, r = p.r;
    p.forward();
    p.backward();
    CHECK(p.running_mean == running_mean);
    CHECK(p.running_var == running_var);
    CHECK(p.r == r);
    std::vector<double> want;
    for (index_t n = 0; n < sc.shape.batch; ++n)
      for (index_t c = 0; c < sc.shape.channels; ++c)
        for (index_t s = 0; s < sc.shape.spatial(); ++s)
          want.push_back(p.gamma[c] * (p.x.at(n, c, s) - running_mean[c]) /
                             std::sqrt(running_var[c] + 1e-5) +
                         p.beta[c]);
    CHECK(max_error(p.y.values(), want) <= 1e-12);
    const auto dx = p.dx.values();
    const auto dgamma = p.dgamma, dbeta = p.dbeta;
    auto loss = [&] { return p.loss(); };
    bkn_test::check_gradient("dx", p.x.entries(), dx, loss);
    bkn_test::check_gradient("dgamma", bkn_test::pointers(p.gamma), dgamma, loss);
    bkn_test::check_gradient("dbeta", bkn_test::pointers(p.beta), dbeta, loss);
  }
}

namespace {

template <class T>
std::vector<unsigned char> snapshot(problem<T>& p) {
  std::vector<unsigned char> bytes;
  for (auto* v : {&p.y.memory(), &p.dx.memory(), &p.dgamma, &p.dbeta, &p.running_mean,
                  &p.running_var, &p.saved_mean, &p.saved_var, &p.r, &p.d}) {
    const auto* b = reinterpret_cast<const unsigned char*>(v->data());
    bytes.insert(bytes.end(), b, b + v->size() * sizeof(T));
  }
  return bytes;
}

template <class T>
void expect_rejected(const char* argument,
                     const std::function<void(problem<T>&, brn::layer<T>&)>& spoil, bool backward,
                     bool training = true) {
  CAPTURE(argument);
  CAPTURE(backward);
  CAPTURE(training);
  problem<T> p({layout::nhwc, {4, 3, 2, 1}, 2}, 13);
  p.opt.r_max = 2;
  p.opt.d_max = 1;
  p.forward();
  p.opt.training = training;
  for (auto* v : {&p.y.memory(), &p.dx.memory()})
    for (T& e : *v) e = T(-7);
  brn::layer<T> L = p.layer();
  spoil(p, L);
  const auto before = snapshot(p);
  const auto e = bkn_test::thrown([&] {
    if (backward)
      brn::backward(B{}, p.opt, L, p.x.cview(), p.dy.cview(), p.dx.view(), p.ws.bytes());
    else
      brn::forward(B{}, p.opt, L, p.x.cview(), p.y.view(), p.ws.bytes());
  });
  CHECK(std::string(e.routine()) ==
        (backward ? "bkn::batch_renorm::backward" : "bkn::batch_renorm::forward"));
  CHECK(std::string(e.argument()) == argument);
  CHECK(snapshot(p) == before);
}

}  // namespace

TEST_CASE_TEMPLATE("batch_renorm: invalid arguments throw and leave every output untouched", T,
                   float, double) {
  using L_t = brn::layer<T>;
  using spoiler = std::function<void(problem<T>&, L_t&)>;
  std::vector<T> short_array(2), long_array(7);
  const std::vector<std::pair<const char*, spoiler>> cases = {
      {"options.r_max", [](problem<T>& p, L_t&) { p.opt.r_max = 0.99; }},
      {"options.r_max", [](problem<T>& p, L_t&) { p.opt.r_max = std::nan(""); }},
      {"options.d_max", [](problem<T>& p, L_t&) { p.opt.d_max = -0.1; }},
      {"options.epsilon", [](problem<T>& p, L_t&) { p.opt.epsilon = -1; }},
      {"options.momentum", [](problem<T>& p, L_t&) { p.opt.momentum = 2; }},
      {"options.group_size", [](problem<T>& p, L_t&) { p.opt.group_size = 3; }},
      {"params.gamma",
       [&](problem<T>&, L_t& L) { L.params.gamma = span<const T>(long_array.data(), 7); }},
      {"running", [&](problem<T>&, L_t& L) { L.running = {}; }},
      {"running.var", [&](problem<T>&, L_t& L) { L.running.var = short_array; }},
      {"saved.mean", [&](problem<T>&, L_t& L) { L.saved.mean = short_array; }},
      {"saved.var", [&](problem<T>&, L_t& L) { L.saved.var = long_array; }},
      {"saved.r", [&](problem<T>&, L_t& L) { L.saved.r = {}; }},
      {"saved.d", [&](problem<T>&, L_t& L) { L.saved.d = short_array; }},
      {"workspace", [](problem<T>& p, L_t&) { p.ws = bkn::host_workspace(64); }},
  };
  for (bool backward : {false, true})
    for (const auto& [argument, spoil] : cases) expect_rejected<T>(argument, spoil, backward);
  expect_rejected<T>(
      "grads.gamma", [&](problem<T>&, L_t& L) { L.grads.gamma = short_array; }, true);
  // Inference needs the moving averages too, but neither r, d nor saved statistics.
  expect_rejected<T>(
      "running", [&](problem<T>&, L_t& L) { L.running = {}; }, false, false);
  problem<T> p({layout::nc, {4, 3, 1, 1}, 2}, 17);
  brn::layer<T> L = p.layer();
  L.saved = {};
  p.opt.training = false;
  brn::forward(B{}, p.opt, L, p.x.cview(), p.y.view(), p.ws.bytes());
  brn::backward(B{}, p.opt, L, p.x.cview(), p.dy.cview(), p.dx.view(), p.ws.bytes());
}

TEST_CASE_TEMPLATE("batch_renorm: one value per channel and group is rejected in training", T,
                   float, double) {
  problem<T> p({layout::nc, {4, 3, 1, 1}, 1}, 19);
  const auto before = snapshot(p);
  const auto e = bkn_test::thrown([&] { p.forward(); });
  CHECK(std::string(e.argument()) == "x");
  CHECK(snapshot(p) == before);
  p.opt.training = false;  // the moving averages carry information
  p.forward();
}

TEST_CASE_TEMPLATE("batch_renorm: an empty batch changes nothing", T, float, double) {
  problem<T> p({layout::nchw, {0, 3, 2, 2}, 0}, 23);
  for (auto* v : {&p.saved_mean, &p.saved_var, &p.r, &p.d}) v->assign(3, T(5));
  const auto before = snapshot(p);
  p.forward();
  p.backward();
  CHECK(snapshot(p) == before);
}

TEST_CASE("batch_renorm: dx may be dy, y may be x") {
  const shape_case sc{layout::strided, {4, 3, 2, 2}, 2};
  problem<double> p(sc, 29), q(sc, 29), r(sc, 29);
  for (auto* s : {&p, &q, &r}) {
    s->opt.r_max = 1.5;
    s->opt.d_max = 0.3;
  }
  q.forward();
  q.backward();
  brn::forward(B{}, p.opt, p.layer(), p.x.cview(), p.x.view(), p.ws.bytes());
  CHECK(p.x.values() == q.y.values());
  r.forward();
  brn::backward(B{}, r.opt, r.layer(), r.x.cview(), r.dy.cview(), r.dy.view(), r.ws.bytes());
  CHECK(r.dy.values() == q.dx.values());
}

TEST_CASE("batch_renorm: NaN statistics pass through the clip of r and d") {
  problem<double> p({layout::nchw, {4, 3, 2, 1}, 2}, 31);
  p.opt.r_max = 2;
  p.opt.d_max = 1;
  p.x.at(0, 1, 0) = std::numeric_limits<double>::quiet_NaN();  // group 0, channel 1
  p.forward();
  CHECK(std::isnan(p.r[1]));
  CHECK(std::isnan(p.d[1]));
  CHECK_FALSE(std::isnan(p.r[0]));
  CHECK_FALSE(std::isnan(p.r[4]));  // group 1, channel 1
}
