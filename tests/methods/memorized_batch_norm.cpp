// SPDX-License-Identifier: MIT
// Tests of bkn::memorized_batch_norm (include/bkn/methods/memorized_batch_norm.hpp): the pooled
// statistics against the raw values of the last k batches (counts and decay as weights), the
// ring buffer in caller memory, one slot equal to batch_norm, gradients against finite
// differences in double with the memory held fixed, the Double-Forward scheme's refresh, both
// inference sources, the moving averages, reset, and the validation.
#include <doctest/doctest.h>

#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>
#include <bkn/methods/batch_norm.hpp>
#include <bkn/methods/memorized_batch_norm.hpp>
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
namespace mbn = bkn::memorized_batch_norm;

using namespace bkn_test::batch_cases;

/// A layer's memory in host vectors. `newest` starts at an arbitrary value on purpose: the
/// routines must take it modulo the slots.
template <class T>
struct memory_storage {
  index_t slots, groups, channels;
  std::vector<T> mean, var, count;
  std::vector<index_t> newest;

  memory_storage(index_t s, index_t g, index_t c)
      : slots(s),
        groups(g),
        channels(c),
        mean(std::size_t(s * g * c), T(0)),
        var(mean.size(), T(0)),
        count(std::size_t(s), T(0)),
        newest{-5} {}
  mbn::memory_view<T> view() {
    mbn::memory_view<T> m;
    m.mean = mean;
    m.var = var;
    m.count = count;
    m.newest = newest;
    m.slots = slots;
    m.groups = groups;
    m.channels = channels;
    return m;
  }
  index_t newest_slot() const { return ((newest[0] % slots) + slots) % slots; }
};

/// One memorized_batch_norm layer over host memory with random inputs and parameters.
template <class T>
struct problem {
  shape_case sc;
  index_t G;
  host_tensor<T> x, y, dy, dx;
  std::vector<T> gamma, beta, dgamma, dbeta, running_mean, running_var;
  std::vector<T> saved_mean, saved_var, batch_mean, batch_var, batch_share;
  memory_storage<T> own;
  memory_storage<T>* memory = &own;
  mbn::options opt;
  bkn::host_workspace ws;
  std::mt19937 rng;

  problem(const shape_case& c, index_t slots, std::uint32_t seed)
      : sc(c),
        G(c.group_size == 0 ? 1 : c.shape.batch / c.group_size),
        x(c.lay, c.shape),
        y(c.lay, c.shape),
        dy(c.lay, c.shape),
        dx(c.lay, c.shape),
        own(slots, G, c.shape.channels),
        ws(0),
        rng(seed) {
    const index_t C = c.shape.channels;
    std::normal_distribution<double> normal;
    next_batch();
    for (T* e : dy.entries()) *e = T(normal(rng));
    for (index_t k = 0; k < C; ++k) {
      gamma.push_back(T(1 + 0.3 * normal(rng)));
      beta.push_back(T(normal(rng)));
      running_mean.push_back(T(normal(rng)));
      running_var.push_back(T(0.5 + std::abs(normal(rng))));
    }
    dgamma.assign(std::size_t(C), T(0));
    dbeta.assign(std::size_t(C), T(0));
    for (auto* v : {&saved_mean, &saved_var, &batch_mean, &batch_var})
      v->assign(std::size_t(G * C), T(0));
    batch_share.assign(std::size_t(G), T(0));
    opt.group_size = c.group_size;
    ws = bkn::host_workspace(mbn::workspace_size(B{}, opt, c.shape));
  }

  /// New inputs whose every channel has its own offset and spread per batch, so that pooling
  /// batches differs from any single one.
  void next_batch() {
    std::normal_distribution<double> normal;
    const double shift = 2 * normal(rng), spread = 1 + std::abs(normal(rng));
    for (T* e : x.entries()) *e = T(shift + spread * normal(rng));
  }

  mbn::layer<T> layer() {
    mbn::layer<T> L;
    L.params.gamma = span<const T>(gamma.data(), index_t(gamma.size()));
    L.params.beta = span<const T>(beta.data(), index_t(beta.size()));
    L.grads.gamma = dgamma;
    L.grads.beta = dbeta;
    L.running.mean = running_mean;
    L.running.var = running_var;
    L.memory = memory->view();
    L.saved.mean = saved_mean;
    L.saved.var = saved_var;
    L.saved.batch_mean = batch_mean;
    L.saved.batch_var = batch_var;
    L.saved.batch_share = batch_share;
    return L;
  }
  void forward() { mbn::forward(B{}, opt, layer(), x.cview(), y.view(), ws.bytes()); }
  void backward() {
    mbn::backward(B{}, opt, layer(), x.cview(), dy.cview(), dx.view(), ws.bytes());
  }
  /// sum dy * y after a forward from `memory_before` (the memory held fixed).
  double loss(const memory_storage<T>& memory_before) {
    *memory = memory_before;
    forward();
    double s = 0;
    const auto yv = y.values(), dyv = dy.values();
    for (std::size_t i = 0; i < yv.size(); ++i) s += double(yv[i]) * double(dyv[i]);
    return s;
  }
};

/// The values of group g, channel c of x, in double.
template <class T>
std::vector<double> group_values(host_tensor<T>& x, const shape_case& sc, index_t g, index_t c) {
  const index_t n_per = sc.group_size == 0 ? sc.shape.batch : sc.group_size;
  std::vector<double> out;
  for (index_t n = g * n_per; n < (g + 1) * n_per; ++n)
    for (index_t s = 0; s < sc.shape.spatial(); ++s) out.push_back(double(x.at(n, c, s)));
  return out;
}

/// The weighted mean and variance of the values of several batches, newest first, batch a
/// weighing decay^a per value; and 1 / (1 - sum w^2 / (sum w)^2), the unbiased correction.
struct pooled {
  double mean, var, bessel;
};
pooled pool(const std::vector<std::vector<double>>& batches, double decay) {
  double sw = 0, sw2 = 0, sx = 0, weight = 1;
  for (const auto& b : batches) {
    for (double v : b) {
      sw += weight;
      sw2 += weight * weight;
      sx += weight * v;
    }
    weight *= decay;
  }
  const double mean = sx / sw;
  double m2 = 0;
  weight = 1;
  for (const auto& b : batches) {
    for (double v : b) m2 += weight * (v - mean) * (v - mean);
    weight *= decay;
  }
  const double rest = 1 - sw2 / (sw * sw);  // 0 for a single value: no correction then
  return {mean, m2 / sw, rest > 0 ? 1 / rest : 1.0};
}

}  // namespace

namespace {

/// The shapes of shape_cases(), plus one value per channel and group, which a memory of
/// several slots makes meaningful.
std::vector<shape_case> memory_cases() {
  auto cases = shape_cases();
  cases.push_back({layout::nc, {4, 3, 1, 1}, 1});
  cases.push_back({layout::strided, {2, 2, 1, 1}, 1});
  return cases;
}

/// Per (g, c) of one batch, its values.
template <class T>
std::vector<std::vector<double>> batch_values(problem<T>& p) {
  std::vector<std::vector<double>> out;
  for (index_t g = 0; g < p.G; ++g)
    for (index_t c = 0; c < p.sc.shape.channels; ++c) out.push_back(group_values(p.x, p.sc, g, c));
  return out;
}

}  // namespace

TEST_CASE_TEMPLATE("memorized_batch_norm: statistics pooled over the last k batches' values", T,
                   float, double) {
  for (double decay : {1.0, 0.6}) {
    for (const shape_case& sc : memory_cases()) {
      CAPTURE(describe(sc));
      CAPTURE(decay);
      const index_t k = 3, C = sc.shape.channels;
      problem<T> p(sc, k, 3);
      p.opt.decay = decay;
      p.opt.momentum = 0.25;
      std::vector<std::vector<std::vector<double>>> history;  // newest first, per (g, c)
      for (int step = 0; step < 5; ++step) {
        CAPTURE(step);
        if (step > 0) p.next_batch();
        const auto running_mean = p.running_mean, running_var = p.running_var;
        const index_t newest_before = p.memory->newest_slot();
        p.forward();
        history.insert(history.begin(), batch_values(p));
        if (history.size() > std::size_t(k)) history.pop_back();

        const index_t slot = p.memory->newest_slot();
        CHECK(slot == (newest_before + 1) % k);
        const double m = double(history[0][0].size());
        CHECK(double(p.memory->count[std::size_t(slot)]) == m);
        double weights = 0;  // sum over the batches in memory of decay^age
        for (std::size_t a = 0; a < history.size(); ++a) weights += std::pow(decay, double(a));
        std::vector<double> want_mean, want_var, want_batch_mean, want_share;
        std::vector<double> mean_avg(std::size_t(C), 0.0), var_avg(std::size_t(C), 0.0);
        for (index_t g = 0; g < p.G; ++g) {
          want_share.push_back(1 / weights);
          for (index_t c = 0; c < C; ++c) {
            const std::size_t i = std::size_t(g * C + c);
            std::vector<std::vector<double>> batches;
            for (const auto& b : history) batches.push_back(b[i]);
            const pooled all = pool(batches, decay), own = pool({batches[0]}, 1);
            want_mean.push_back(all.mean);
            want_var.push_back(all.var);
            want_batch_mean.push_back(own.mean);
            mean_avg[std::size_t(c)] += all.mean / double(p.G);
            var_avg[std::size_t(c)] += all.var * all.bessel / double(p.G);
            // The newest slot holds this batch's own statistics.
            CHECK(double(p.memory->mean[std::size_t(slot * p.G * C) + i]) ==
                  doctest::Approx(own.mean).epsilon(tolerance<T>()));
            CHECK(double(p.memory->var[std::size_t(slot * p.G * C) + i]) ==
                  doctest::Approx(own.var).epsilon(tolerance<T>()));
          }
        }
        CHECK(max_error(p.saved_mean, want_mean) <= tolerance<T>());
        CHECK(max_error(p.saved_var, want_var) <= tolerance<T>());
        CHECK(max_error(p.batch_mean, want_batch_mean) <= tolerance<T>());
        CHECK(max_error(p.batch_share, want_share) <= tolerance<T>());
        // The moving averages move toward the pooled statistics, the variance corrected for
        // the values' weights.
        for (index_t c = 0; c < C; ++c) {
          const std::size_t j = std::size_t(c);
          CHECK(double(p.running_mean[j]) ==
                doctest::Approx(0.75 * double(running_mean[j]) + 0.25 * mean_avg[j])
                    .epsilon(tolerance<T>()));
          CHECK(double(p.running_var[j]) ==
                doctest::Approx(0.75 * double(running_var[j]) + 0.25 * var_avg[j])
                    .epsilon(10 * tolerance<T>()));
        }
        // y from the pooled statistics.
        std::vector<double> want_y;
        const index_t n_per = sc.shape.batch / p.G;
        for (index_t n = 0; n < sc.shape.batch; ++n)
          for (index_t c = 0; c < C; ++c)
            for (index_t s = 0; s < sc.shape.spatial(); ++s) {
              const std::size_t i = std::size_t(n / n_per * C + c);
              want_y.push_back(double(p.gamma[std::size_t(c)]) *
                                   (double(p.x.at(n, c, s)) - want_mean[i]) /
                                   std::sqrt(want_var[i] + 1e-5) +
                               double(p.beta[std::size_t(c)]));
            }
        CHECK(max_error(p.y.values(), want_y) <= 20 * tolerance<T>());
      }
    }
  }
}

TEST_CASE("memorized_batch_norm: batches weigh their counts when batch sizes differ") {
  // One memory of 2 groups fed by batches of 4 and of 6 samples (group sizes 2 and 3).
  problem<double> small({layout::nc, {4, 3, 1, 1}, 2}, 3, 5);
  problem<double> large({layout::nc, {6, 3, 1, 1}, 3}, 3, 7);
  large.memory = &small.own;
  small.forward();
  const auto first = batch_values(small);
  large.forward();
  const auto second = batch_values(large);
  small.next_batch();
  small.forward();
  const auto third = batch_values(small);
  // newest started at -5, i.e. slot 1: the pushes went to slots 2, 0 and 1.
  CHECK(small.memory->count == std::vector<double>{3, 2, 2});
  for (std::size_t i = 0; i < 6; ++i) {
    const pooled want = pool({third[i], second[i], first[i]}, 1);
    CHECK(small.saved_mean[i] == doctest::Approx(want.mean).epsilon(1e-12));
    CHECK(small.saved_var[i] == doctest::Approx(want.var).epsilon(1e-12));
  }
  CHECK(small.batch_share[0] == doctest::Approx(2.0 / 7));
}

TEST_CASE_TEMPLATE("memorized_batch_norm: one slot is batch_norm", T, float, double) {
  for (const shape_case& sc : shape_cases()) {
    CAPTURE(describe(sc));
    problem<T> p(sc, 1, 9);
    // The same inputs through batch_norm.
    problem<T> q(sc, 1, 9);
    bkn::batch_norm::options o;
    o.group_size = sc.group_size;
    bkn::batch_norm::layer<T> L;
    L.params.gamma = span<const T>(q.gamma.data(), index_t(q.gamma.size()));
    L.params.beta = span<const T>(q.beta.data(), index_t(q.beta.size()));
    L.grads.gamma = q.dgamma;
    L.grads.beta = q.dbeta;
    L.running.mean = q.running_mean;
    L.running.var = q.running_var;
    bkn::host_workspace ws(bkn::batch_norm::workspace_size(B{}, o, sc.shape));
    for (int step = 0; step < 3; ++step) {
      CAPTURE(step);
      if (step > 0) {
        p.next_batch();
        q.next_batch();
      }
      p.forward();
      p.backward();
      bkn::batch_norm::forward(B{}, o, L, q.x.cview(), q.y.view(), ws.bytes());
      bkn::batch_norm::backward(B{}, o, L, q.x.cview(), q.dy.cview(), q.dx.view(), ws.bytes());
      CHECK(max_error(p.y.values(), q.y.values()) <= 10 * tolerance<T>());
      CHECK(max_error(p.dx.values(), q.dx.values()) <= 10 * tolerance<T>());
      CHECK(max_error(p.dgamma, q.dgamma) <= 10 * tolerance<T>());
      CHECK(max_error(p.dbeta, q.dbeta) <= tolerance<T>());
      CHECK(max_error(p.running_mean, q.running_mean) <= tolerance<T>());
      CHECK(max_error(p.running_var, q.running_var) <= tolerance<T>());
      CHECK(p.batch_share == std::vector<T>(p.batch_share.size(), T(1)));
    }
  }
}

TEST_CASE("memorized_batch_norm: gradients match finite differences, the memory held fixed") {
  // Two older batches in a memory of three slots, decayed: dx flows through this batch's
  // statistics only, with its share of the pooled ones; the older slots are constants. A
  // refresh replaces the statistics its step's first forward pushed.
  for (const shape_case& sc : memory_cases()) {
    for (auto update : {mbn::memory_update::push, mbn::memory_update::refresh}) {
      CAPTURE(describe(sc));
      CAPTURE(int(update));
      problem<double> p(sc, 3, 11);
      p.opt.decay = 0.7;
      p.forward();
      p.next_batch();
      p.forward();
      p.next_batch();
      if (update == mbn::memory_update::refresh) {  // the step's first forward, then new weights
        p.forward();
        p.next_batch();
      }
      p.opt.update = update;
      const memory_storage<double> before = *p.memory;
      p.loss(before);
      p.backward();
      CHECK(p.batch_share[0] < 0.6);  // the memory counts
      const auto dx = p.dx.values();
      const auto dgamma = p.dgamma, dbeta = p.dbeta;
      auto loss = [&] { return p.loss(before); };
      bkn_test::check_gradient("dx", p.x.entries(), dx, loss);
      bkn_test::check_gradient("dgamma", bkn_test::pointers(p.gamma), dgamma, loss);
      bkn_test::check_gradient("dbeta", bkn_test::pointers(p.beta), dbeta, loss);
    }
  }
}

TEST_CASE_TEMPLATE("memorized_batch_norm: the Double-Forward refresh replaces the newest slot", T,
                   float, double) {
  const shape_case sc{layout::nhwc, {4, 3, 2, 2}, 2};
  const index_t C = 3;
  problem<T> p(sc, 3, 13);
  p.opt.decay = 0.8;
  p.forward();
  const auto oldest = batch_values(p);
  p.next_batch();
  p.forward();  // the first forward of this step: pushes its statistics
  const index_t newest = p.memory->newest_slot();
  const auto count = p.memory->count;
  const auto running_mean = p.running_mean, running_var = p.running_var;
  // The host updates its weights; the same samples reach this layer changed. The second
  // forward refreshes their statistics in place.
  for (T* e : p.x.entries()) *e = T(1.1 * double(*e) + 0.3);
  const auto refreshed = batch_values(p);
  p.opt.update = mbn::memory_update::refresh;
  p.forward();
  CHECK(p.memory->newest_slot() == newest);
  CHECK(p.memory->count == count);
  CHECK(p.running_mean == running_mean);
  CHECK(p.running_var == running_var);
  for (std::size_t i = 0; i < std::size_t(p.G * C); ++i) {
    const pooled own = pool({refreshed[i]}, 1), all = pool({refreshed[i], oldest[i]}, 0.8);
    CHECK(double(p.memory->mean[std::size_t(newest * p.G * C) + i]) ==
          doctest::Approx(own.mean).epsilon(tolerance<T>()));
    CHECK(double(p.saved_mean[i]) == doctest::Approx(all.mean).epsilon(tolerance<T>()));
    CHECK(double(p.saved_var[i]) == doctest::Approx(all.var).epsilon(tolerance<T>()));
  }
  // The next batch pushes as usual: the refreshed statistics are its predecessor's.
  p.next_batch();
  p.opt.update = mbn::memory_update::push;
  p.forward();
  const auto latest = batch_values(p);
  for (std::size_t i = 0; i < std::size_t(p.G * C); ++i) {
    const pooled all = pool({latest[i], refreshed[i], oldest[i]}, 0.8);
    CHECK(double(p.saved_mean[i]) == doctest::Approx(all.mean).epsilon(tolerance<T>()));
    CHECK(double(p.saved_var[i]) == doctest::Approx(all.var).epsilon(tolerance<T>()));
  }
}

TEST_CASE("memorized_batch_norm: inference from the memory pools every slot and group") {
  const shape_case train{layout::nchw, {4, 3, 2, 2}, 2};
  problem<double> p(train, 3, 17);
  p.opt.decay = 0.8;
  std::vector<std::vector<double>> history;  // newest first, per channel: every group's values
  for (int step = 0; step < 4; ++step) {
    if (step > 0) p.next_batch();
    p.forward();
    std::vector<double> per_channel[3];
    for (index_t c = 0; c < 3; ++c)
      for (index_t g = 0; g < 2; ++g)
        for (double v : group_values(p.x, train, g, c)) per_channel[c].push_back(v);
    for (index_t c = 0; c < 3; ++c) history.insert(history.begin() + c, per_channel[c]);
  }
  // A test batch of another size, normalized with the memory of the last 3 batches.
  problem<double> q({layout::nhwc, {3, 3, 1, 2}, 0}, 3, 19);
  q.memory = &p.own;
  q.gamma = p.gamma;
  q.beta = p.beta;
  q.opt.training = false;
  q.opt.inference = mbn::inference_source::memory;
  q.opt.decay = 0.8;
  const memory_storage<double> memory_before = *p.memory;
  const auto running_mean = q.running_mean, saved_mean = q.saved_mean;
  q.forward();
  CHECK(p.own.mean == memory_before.mean);
  CHECK(p.own.count == memory_before.count);
  CHECK(p.own.newest == memory_before.newest);
  CHECK(q.running_mean == running_mean);
  CHECK(q.saved_mean == saved_mean);
  std::vector<double> want;
  for (index_t n = 0; n < 3; ++n)
    for (index_t c = 0; c < 3; ++c) {
      std::vector<std::vector<double>> batches;
      for (std::size_t a = 0; a < 3; ++a) batches.push_back(history[a * 3 + std::size_t(c)]);
      const pooled all = pool(batches, 0.8);
      for (index_t s = 0; s < 2; ++s)
        want.push_back(q.gamma[std::size_t(c)] * (q.x.at(n, c, s) - all.mean) /
                           std::sqrt(all.var + 1e-5) +
                       q.beta[std::size_t(c)]);
    }
  CHECK(max_error(q.y.values(), want) <= 1e-12);
  // The statistics are constants for the gradient.
  q.backward();
  const auto dx = q.dx.values();
  const auto dgamma = q.dgamma, dbeta = q.dbeta;
  auto loss = [&] { return q.loss(memory_before); };
  bkn_test::check_gradient("dx", q.x.entries(), dx, loss);
  bkn_test::check_gradient("dgamma", bkn_test::pointers(q.gamma), dgamma, loss);
  bkn_test::check_gradient("dbeta", bkn_test::pointers(q.beta), dbeta, loss);
}

TEST_CASE("memorized_batch_norm: inference from the moving averages needs no memory") {
  problem<double> p({layout::strided, {2, 3, 2, 1}, 0}, 2, 23);
  p.opt.training = false;
  mbn::layer<double> L = p.layer();
  L.memory = {};
  L.saved = {};
  mbn::forward(B{}, p.opt, L, p.x.cview(), p.y.view(), p.ws.bytes());
  std::vector<double> want;
  for (index_t n = 0; n < 2; ++n)
    for (index_t c = 0; c < 3; ++c)
      for (index_t s = 0; s < 2; ++s)
        want.push_back(p.gamma[std::size_t(c)] *
                           (p.x.at(n, c, s) - p.running_mean[std::size_t(c)]) /
                           std::sqrt(p.running_var[std::size_t(c)] + 1e-5) +
                       p.beta[std::size_t(c)]);
  CHECK(max_error(p.y.values(), want) <= 1e-12);
  mbn::backward(B{}, p.opt, L, p.x.cview(), p.dy.cview(), p.dx.view(), p.ws.bytes());
  const auto dx = p.dx.values();
  const memory_storage<double> unused = *p.memory;
  auto loss = [&] { return p.loss(unused); };
  bkn_test::check_gradient("dx", p.x.entries(), dx, loss);
}

TEST_CASE_TEMPLATE("memorized_batch_norm: reset empties the memory", T, float, double) {
  const shape_case sc{layout::nchw, {4, 2, 2, 2}, 2};
  problem<T> p(sc, 3, 29);
  p.forward();
  p.next_batch();
  p.forward();
  mbn::reset(B{}, p.memory->view());
  CHECK(p.memory->count == std::vector<T>(3, T(0)));
  CHECK(p.memory->newest[0] == 0);
  p.next_batch();
  p.forward();  // pooled over this batch alone
  CHECK(p.saved_mean == p.batch_mean);
  CHECK(max_error(p.saved_var, p.batch_var) <= tolerance<T>());
  CHECK(p.batch_share == std::vector<T>(2, T(1)));
}

namespace {

template <class T>
std::vector<unsigned char> snapshot(problem<T>& p) {
  std::vector<unsigned char> bytes;
  auto add = [&](const auto& v) {
    const auto* b = reinterpret_cast<const unsigned char*>(v.data());
    bytes.insert(bytes.end(), b, b + v.size() * sizeof(v[0]));
  };
  for (auto* v : {&p.y.memory(), &p.dx.memory(), &p.dgamma, &p.dbeta, &p.running_mean,
                  &p.running_var, &p.saved_mean, &p.saved_var, &p.batch_mean, &p.batch_var,
                  &p.batch_share, &p.memory->mean, &p.memory->var, &p.memory->count})
    add(*v);
  add(p.memory->newest);
  return bytes;
}

template <class T>
void expect_rejected(const char* argument,
                     const std::function<void(problem<T>&, mbn::layer<T>&)>& spoil, bool backward,
                     bool training = true) {
  CAPTURE(argument);
  CAPTURE(backward);
  CAPTURE(training);
  problem<T> p({layout::nchw, {4, 3, 2, 1}, 2}, 3, 31);
  p.forward();
  p.opt.training = training;
  p.opt.inference = mbn::inference_source::memory;
  for (auto* v : {&p.y.memory(), &p.dx.memory()})
    for (T& e : *v) e = T(-7);
  mbn::layer<T> L = p.layer();
  spoil(p, L);
  const auto before = snapshot(p);
  const auto e = bkn_test::thrown([&] {
    if (backward)
      mbn::backward(B{}, p.opt, L, p.x.cview(), p.dy.cview(), p.dx.view(), p.ws.bytes());
    else
      mbn::forward(B{}, p.opt, L, p.x.cview(), p.y.view(), p.ws.bytes());
  });
  CHECK(std::string(e.routine()) ==
        (backward ? "bkn::memorized_batch_norm::backward" : "bkn::memorized_batch_norm::forward"));
  CHECK(std::string(e.argument()) == argument);
  CHECK(snapshot(p) == before);
}

}  // namespace

TEST_CASE_TEMPLATE(
    "memorized_batch_norm: invalid arguments throw and leave every output and "
    "the memory untouched",
    T, float, double) {
  using L_t = mbn::layer<T>;
  using spoiler = std::function<void(problem<T>&, L_t&)>;
  std::vector<T> short_array(2), long_array(7);
  std::vector<index_t> two_indices(2);
  const std::vector<std::pair<const char*, spoiler>> common = {
      {"options.decay", [](problem<T>& p, L_t&) { p.opt.decay = 0; }},
      {"options.decay", [](problem<T>& p, L_t&) { p.opt.decay = 1.5; }},
      {"options.epsilon", [](problem<T>& p, L_t&) { p.opt.epsilon = 0; }},
      {"options.momentum", [](problem<T>& p, L_t&) { p.opt.momentum = -1; }},
      {"options.group_size", [](problem<T>& p, L_t&) { p.opt.group_size = 3; }},
      {"params.beta",
       [&](problem<T>&, L_t& L) { L.params.beta = span<const T>(long_array.data(), 7); }},
      {"memory.slots", [](problem<T>&, L_t& L) { L.memory.slots = 0; }},
      {"memory.channels", [](problem<T>&, L_t& L) { L.memory.channels = 2; }},
      {"memory.mean", [&](problem<T>&, L_t& L) { L.memory.mean = long_array; }},
      {"memory.var", [&](problem<T>&, L_t& L) { L.memory.var = {}; }},
      {"memory.count", [&](problem<T>&, L_t& L) { L.memory.count = short_array; }},
      {"memory.newest", [&](problem<T>&, L_t& L) { L.memory.newest = two_indices; }},
      {"workspace", [](problem<T>& p, L_t&) { p.ws = bkn::host_workspace(64); }},
  };
  const std::vector<std::pair<const char*, spoiler>> training_only = {
      {"memory.groups", [](problem<T>&, L_t& L) { L.memory.groups = 1; }},
      {"saved.mean", [&](problem<T>&, L_t& L) { L.saved.mean = short_array; }},
      {"saved.var", [&](problem<T>&, L_t& L) { L.saved.var = {}; }},
      {"saved.batch_mean", [&](problem<T>&, L_t& L) { L.saved.batch_mean = long_array; }},
      {"saved.batch_var", [&](problem<T>&, L_t& L) { L.saved.batch_var = {}; }},
      {"saved.batch_share", [&](problem<T>&, L_t& L) { L.saved.batch_share = long_array; }},
      {"running", [&](problem<T>&, L_t& L) { L.running.mean = {}; }},
  };
  for (bool backward : {false, true}) {
    for (bool training : {true, false})
      for (const auto& [argument, spoil] : common)
        expect_rejected<T>(argument, spoil, backward, training);
    for (const auto& [argument, spoil] : training_only)
      expect_rejected<T>(argument, spoil, backward);
  }
  expect_rejected<T>(
      "grads.gamma", [&](problem<T>&, L_t& L) { L.grads.gamma = long_array; }, true);
  // Inference from the memory accepts a memory of any number of groups.
  problem<T> p({layout::nchw, {4, 3, 2, 1}, 2}, 3, 37);
  p.forward();
  p.opt.training = false;
  p.opt.inference = mbn::inference_source::memory;
  p.opt.group_size = 4;
  p.forward();
}

TEST_CASE_TEMPLATE("memorized_batch_norm: one value per group needs more than one slot", T, float,
                   double) {
  const shape_case sc{layout::nc, {4, 3, 1, 1}, 1};
  problem<T> one(sc, 1, 41);
  const auto before = snapshot(one);
  const auto e = bkn_test::thrown([&] { one.forward(); });
  CHECK(std::string(e.argument()) == "x");
  CHECK(std::string(e.what()).find("one value per channel") != std::string::npos);
  CHECK(snapshot(one) == before);
  problem<T> two(sc, 2, 41);
  two.forward();
  two.next_batch();
  two.forward();
  for (T v : two.saved_var) CHECK(v > T(0));  // the older batch gives the variance
}

TEST_CASE_TEMPLATE("memorized_batch_norm: an empty batch changes nothing", T, float, double) {
  problem<T> p({layout::nchw, {0, 3, 2, 2}, 0}, 3, 43);
  const auto before = snapshot(p);
  p.forward();
  p.backward();
  CHECK(snapshot(p) == before);
}
