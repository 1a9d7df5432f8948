// SPDX-License-Identifier: MIT
// bkn::chain's bookkeeping: it rejects calls out of order, passes each posterior on as the next
// prior and each d(prior) back as the previous dposterior exactly as the manual calls would,
// uses the caller's prior on the first layer, and treats the last layer's dposterior as zero.
// (Whether the chained gradient is right is checked by finite differences in gradients.cpp.)
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>

namespace {

using bkn::covariance;
using bkn::index_t;
using bkn::transition_kind;
using P = double;

constexpr covariance kModes[] = {covariance::diagonal, covariance::full};
constexpr index_t kLayers = 3;
constexpr index_t kBatch = 4;
constexpr index_t kGroupSize = 2;                  // 2 statistics groups
constexpr index_t kChannels[kLayers] = {3, 2, 4};  // layers 2 and 3: dense A, C' != C
constexpr index_t kInputPriorChannels = 2;         // layer 1's caller prior: dense A 3 x 2

std::vector<P> random_vector(std::mt19937_64& rng, std::size_t n, double mean, double sd) {
  std::normal_distribution<double> normal(mean, sd);
  std::vector<P> v(n);
  for (P& e : v) e = normal(rng);
  return v;
}

bkn::gaussian_view<const P> const_gaussian(const std::vector<P>& mean, const std::vector<P>& cov,
                                           index_t groups, index_t channels) {
  return {bkn::span<const P>(mean.data(), index_t(mean.size())),
          bkn::span<const P>(cov.data(), index_t(cov.size())), groups, channels};
}

bkn::tensor_view<const P> in(const std::vector<P>& v, index_t channels) {
  return bkn::nc<const P>(v.data(), kBatch, channels);
}
bkn::tensor_view<P> out(std::vector<P>& v, index_t channels) {
  return bkn::nc(v.data(), kBatch, channels);
}

/// Three NC layers of 3, 2 and 4 channels with dense transitions, their inputs, and a host
/// layer x[k+1] = W[k] tanh(y[k]) between them. Run either through bkn::chain or by hand.
class stack {
 public:
  stack(covariance mode, bool input_prior, std::uint64_t seed = 99) : input_prior_(input_prior) {
    std::mt19937_64 rng(seed);
    opt.mode = mode;
    opt.group_size = kGroupSize;
    std::size_t bytes = 0;
    storage.reserve(kLayers);
    for (index_t k = 0; k < kLayers; ++k) {
      const index_t C = kChannels[k];
      const index_t Cin = k == 0 ? kInputPriorChannels : kChannels[k - 1];
      bkn::layer_config cfg;
      cfg.channels = C;
      cfg.groups = kBatch / kGroupSize;
      cfg.mode = mode;
      cfg.transition = transition_kind::dense;
      cfg.in_channels = Cin;
      storage.emplace_back(cfg);
      auto& s = storage.back();
      s.gamma = random_vector(rng, s.gamma.size(), 1, 0.3);
      s.beta = random_vector(rng, s.beta.size(), 0, 1);
      s.gain_logit = random_vector(rng, s.gain_logit.size(), 0, 0.5);
      s.transition_weights = random_vector(rng, s.transition_weights.size(), 0, 0.7);
      s.noise = random_vector(rng, s.noise.size(), 0, 1);
      x.push_back(std::vector<P>(std::size_t(kBatch * C)));
      y.push_back(x.back());
      dx.push_back(x.back());
      dy.push_back(x.back());
      bytes = std::max(bytes, bkn::workspace_size(backend, opt, {kBatch, C, 1, 1}, Cin));
      if (k + 1 < kLayers)
        weights.push_back(random_vector(rng, std::size_t(kChannels[k + 1] * C), 0, 0.7));
    }
    workspace = bkn::host_workspace(bytes);
    x[0] = random_vector(rng, x[0].size(), 0.5, 1.5);
    loss_weights = random_vector(rng, y.back().size(), 0, 1);
    input_mean = random_vector(rng, std::size_t(kInputPriorChannels), 0, 1);
    input_cov.assign(std::size_t(bkn::covariance_elements(kInputPriorChannels, mode)), 0.0);
    for (index_t i = 0; i < kInputPriorChannels; ++i)
      input_cov[std::size_t(mode == covariance::full ? i * kInputPriorChannels + i : i)] = 1.5;
    for (auto& s : storage) layers.push_back(s.view());
  }

  bkn::gaussian_view<const P> caller_prior() const {
    if (!input_prior_) return {};
    return const_gaussian(input_mean, input_cov, 1, kInputPriorChannels);
  }

  bkn::chain<bkn::reference_backend, P> make_chain() const {
    return {backend, opt, bkn::span<const bkn::layer<P>>(layers.data(), index_t(layers.size())),
            caller_prior()};
  }

  /// x[k+1] = W[k] tanh(y[k]).
  void host_forward(index_t k) {
    const index_t Cin = kChannels[k], Cout = kChannels[k + 1];
    const auto& W = weights[std::size_t(k)];
    for (index_t n = 0; n < kBatch; ++n)
      for (index_t i = 0; i < Cout; ++i) {
        double v = 0;
        for (index_t j = 0; j < Cin; ++j)
          v += W[std::size_t(i * Cin + j)] * std::tanh(y[std::size_t(k)][std::size_t(n * Cin + j)]);
        x[std::size_t(k + 1)][std::size_t(n * Cout + i)] = v;
      }
  }
  /// dy[k] = (1 - tanh^2 y[k]) W[k]^T dx[k+1]; dy of the last layer is the loss weights.
  void host_backward(index_t k) {
    if (k == kLayers - 1) {
      dy.back() = loss_weights;
      return;
    }
    const index_t Cin = kChannels[k], Cout = kChannels[k + 1];
    const auto& W = weights[std::size_t(k)];
    for (index_t n = 0; n < kBatch; ++n)
      for (index_t j = 0; j < Cin; ++j) {
        double v = 0;
        for (index_t i = 0; i < Cout; ++i)
          v += W[std::size_t(i * Cin + j)] * dx[std::size_t(k + 1)][std::size_t(n * Cout + i)];
        const double t = std::tanh(y[std::size_t(k)][std::size_t(n * Cin + j)]);
        dy[std::size_t(k)][std::size_t(n * Cin + j)] = (1 - t * t) * v;
      }
  }

  void forward(bkn::chain<bkn::reference_backend, P>& chain, index_t k) {
    if (k > 0) host_forward(k - 1);
    chain.forward(k, in(x[std::size_t(k)], kChannels[k]), out(y[std::size_t(k)], kChannels[k]),
                  workspace.bytes());
  }
  void backward(bkn::chain<bkn::reference_backend, P>& chain, index_t k) {
    host_backward(k);
    chain.backward(k, in(x[std::size_t(k)], kChannels[k]), in(dy[std::size_t(k)], kChannels[k]),
                   out(dx[std::size_t(k)], kChannels[k]), workspace.bytes());
  }
  /// The whole forward and backward pass through a chain.
  void run() {
    auto chain = make_chain();
    for (index_t k = 0; k < kLayers; ++k) forward(chain, k);
    for (index_t k = kLayers - 1; k >= 0; --k) backward(chain, k);
  }

  /// The same pass by hand: bkn::forward and bkn::backward with the priors passed explicitly.
  void run_by_hand() {
    for (index_t k = 0; k < kLayers; ++k) {
      if (k > 0) host_forward(k - 1);
      bkn::forward(backend, opt, layers[std::size_t(k)], in(x[std::size_t(k)], kChannels[k]),
                   out(y[std::size_t(k)], kChannels[k]), prior(k), workspace.bytes());
    }
    for (index_t k = kLayers - 1; k >= 0; --k) {
      host_backward(k);
      bkn::layer<P> L = layers[std::size_t(k)];
      if (k == kLayers - 1) L.state.dposterior = {};
      const bkn::gaussian_view<P> dprior =
          k == 0 ? bkn::gaussian_view<P>() : layers[std::size_t(k - 1)].state.dposterior;
      bkn::backward(backend, opt, L, in(x[std::size_t(k)], kChannels[k]),
                    in(dy[std::size_t(k)], kChannels[k]), out(dx[std::size_t(k)], kChannels[k]),
                    prior(k), dprior, workspace.bytes());
    }
  }

  bkn::gaussian_view<const P> prior(index_t k) const {
    return k == 0 ? caller_prior()
                  : bkn::gaussian_view<const P>(layers[std::size_t(k - 1)].state.posterior);
  }

  /// Every output of a pass, for comparisons.
  std::vector<std::vector<P>> results() const {
    std::vector<std::vector<P>> r = y;
    r.insert(r.end(), dx.begin(), dx.end());
    for (const auto& s : storage)
      for (const auto* v : {&s.dgamma, &s.dbeta, &s.dgain_logit, &s.dtransition_weights,
                            &s.dnoise, &s.posterior_mean, &s.posterior_cov})
        r.push_back(*v);
    for (index_t k = 0; k + 1 < kLayers; ++k) {
      r.push_back(storage[std::size_t(k)].dposterior_mean);
      r.push_back(storage[std::size_t(k)].dposterior_cov);
    }
    return r;
  }

  bkn::reference_backend backend;
  bkn::options opt;
  std::vector<bkn::layer_storage<P>> storage;
  std::vector<bkn::layer<P>> layers;
  std::vector<std::vector<P>> x, y, dx, dy, weights;
  std::vector<P> loss_weights, input_mean, input_cov;
  bkn::host_workspace workspace{0};

 private:
  bool input_prior_;
};

bool all_finite(const std::vector<std::vector<P>>& r) {
  for (const auto& v : r)
    for (P e : v)
      if (!std::isfinite(e)) return false;
  return true;
}

/// Runs `call`, which must throw bkn::invalid_argument from `routine` about argument "k".
void check_rejected(const char* routine, const std::function<void()>& call) {
  try {
    call();
    FAIL_CHECK("expected bkn::invalid_argument from ", routine);
  } catch (const bkn::invalid_argument& e) {
    const std::string what = e.what();
    INFO("what(): ", what);
    CHECK(std::string(e.routine()) == routine);
    CHECK(std::string(e.argument()) == "k");
    CHECK(what.rfind(std::string(routine) + ": k: ", 0) == 0);  // names routine and argument
  }
}

/// A chain with its stack, calls that go through the chain with layer 1's buffers whatever k
/// is (they are rejected before any shape is looked at), and a sentinel in y[0] and dx[0] to
/// show that a rejected call writes nothing.
struct order_fixture {
  static constexpr P kSentinel = -12345;
  stack s{covariance::diagonal, true};
  bkn::chain<bkn::reference_backend, P> chain = s.make_chain();

  std::function<void()> forward(index_t k) {
    return [this, k] {
      chain.forward(k, in(s.x[0], kChannels[0]), out(s.y[0], kChannels[0]), s.workspace.bytes());
    };
  }
  std::function<void()> backward(index_t k) {
    return [this, k] {
      chain.backward(k, in(s.x[0], kChannels[0]), in(s.dy[0], kChannels[0]),
                     out(s.dx[0], kChannels[0]), s.workspace.bytes());
    };
  }
  void mark() {
    s.y[0].assign(s.y[0].size(), kSentinel);
    s.dx[0].assign(s.dx[0].size(), kSentinel);
  }
  bool untouched() const {
    for (const auto* v : {&s.y[0], &s.dx[0]})
      for (P e : *v)
        if (e != kSentinel) return false;
    return true;
  }
};

constexpr const char* kForward = "bkn::chain::forward";
constexpr const char* kBackward = "bkn::chain::backward";

TEST_CASE("chain: backward before every forward throws and changes nothing") {
  order_fixture f;
  f.mark();
  for (index_t k : {0, 1, 2}) check_rejected(kBackward, f.backward(k));
  f.s.forward(f.chain, 0);
  f.s.forward(f.chain, 1);
  f.mark();
  for (index_t k : {0, 1, 2, 3, -1}) check_rejected(kBackward, f.backward(k));
  CHECK(f.untouched());
  f.s.forward(f.chain, 2);  // the bookkeeping survived the rejected calls
  f.s.backward(f.chain, 2);
}

TEST_CASE("chain: forward out of order throws and changes nothing") {
  order_fixture f;
  f.mark();
  for (index_t k : {1, 2, 3, -1}) check_rejected(kForward, f.forward(k));
  CHECK(f.untouched());
  f.s.forward(f.chain, 0);
  f.mark();
  for (index_t k : {2, 3}) check_rejected(kForward, f.forward(k));  // skipping layer 1
  f.s.forward(f.chain, 1);
  check_rejected(kForward, f.forward(1));  // layer 1 twice
  f.s.forward(f.chain, 2);
  for (index_t k : {1, 2, 3}) check_rejected(kForward, f.forward(k));  // past the last layer
  CHECK(f.untouched());
  f.s.forward(f.chain, 0);                    // layer 0 always starts a new batch...
  check_rejected(kBackward, f.backward(2));  // ...after which backward waits for the last one
}

TEST_CASE("chain: backward out of order throws and changes nothing") {
  order_fixture f;
  for (index_t k = 0; k < kLayers; ++k) f.s.forward(f.chain, k);
  f.mark();
  for (index_t k : {1, 0, 3, -1}) check_rejected(kBackward, f.backward(k));  // not from the last
  CHECK(f.untouched());
  f.s.backward(f.chain, 2);
  for (index_t k : {2, 0}) check_rejected(kBackward, f.backward(k));  // layer 2 twice, skip 1
  f.s.backward(f.chain, 1);
  check_rejected(kBackward, f.backward(1));
  CHECK(f.untouched());
  f.s.backward(f.chain, 0);
  for (index_t k : {0, 2}) check_rejected(kBackward, f.backward(k));  // the pass is over
}

TEST_CASE("chain: equals the manual forward and backward calls, layer by layer") {
  // Layer k's prior is layer k-1's posterior, its d(prior) lands in layer k-1's dposterior,
  // the first layer takes the caller's prior (or none), the last layer's dposterior is zero.
  for (const covariance mode : kModes)
    for (const bool input_prior : {false, true}) {
      INFO("mode: ", mode == covariance::full ? "full" : "diagonal",
           ", caller prior: ", input_prior);
      stack chained(mode, input_prior), manual(mode, input_prior);
      chained.run();
      manual.run_by_hand();
      CHECK(all_finite(chained.results()));
      CHECK(chained.results() == manual.results());  // same arithmetic: bit for bit
    }
}

TEST_CASE("chain: the first layer uses the caller's prior (1 group)") {
  for (const covariance mode : kModes) {
    INFO("mode: ", mode == covariance::full ? "full" : "diagonal");
    stack with(mode, true), without(mode, false);
    with.run();
    without.run();

    // The prior is used: layer 1's output differs from batch normalization's...
    double difference = 0;
    for (std::size_t i = 0; i < with.y[0].size(); ++i)
      difference = std::max(difference, std::abs(with.y[0][i] - without.y[0][i]));
    CHECK(difference > 0.01);
    CHECK(with.storage[0].dgain_logit[0] != 0);  // q gets a gradient only with a prior

    // ...and equals a manual forward of that layer with the caller's prior, 1 group shared by
    // both statistics groups; so does its backward (d(prior) not wanted).
    stack manual(mode, true);
    const bkn::layer<P>& L = manual.layers[0];
    bkn::forward(manual.backend, manual.opt, L, in(manual.x[0], kChannels[0]),
                 out(manual.y[0], kChannels[0]), manual.caller_prior(), manual.workspace.bytes());
    CHECK(manual.y[0] == with.y[0]);
    CHECK(manual.storage[0].posterior_mean == with.storage[0].posterior_mean);
    CHECK(manual.storage[0].posterior_cov == with.storage[0].posterior_cov);
    manual.storage[0].dposterior_mean = with.storage[0].dposterior_mean;  // from layer 2
    manual.storage[0].dposterior_cov = with.storage[0].dposterior_cov;
    bkn::backward(manual.backend, manual.opt, L, in(manual.x[0], kChannels[0]),
                  in(with.dy[0], kChannels[0]), out(manual.dx[0], kChannels[0]),
                  manual.caller_prior(), bkn::gaussian_view<P>(), manual.workspace.bytes());
    CHECK(manual.dx[0] == with.dx[0]);
    CHECK(manual.storage[0].dgain_logit == with.storage[0].dgain_logit);
    CHECK(manual.storage[0].dtransition_weights == with.storage[0].dtransition_weights);
    CHECK(manual.storage[0].dnoise == with.storage[0].dnoise);
  }
}

TEST_CASE("chain: the last layer's dposterior is zero, whatever its buffer holds") {
  const P nan = std::numeric_limits<P>::quiet_NaN();
  for (const covariance mode : kModes) {
    INFO("mode: ", mode == covariance::full ? "full" : "diagonal");
    stack clean(mode, true), dirty(mode, true);
    clean.run();
    // Garbage in the last layer's dposterior, and in every other one before the pass (the
    // chain writes those before it reads them).
    for (auto& st : dirty.storage) {
      st.dposterior_mean.assign(st.dposterior_mean.size(), nan);
      st.dposterior_cov.assign(st.dposterior_cov.size(), 1e30);
    }
    dirty.storage.back().dposterior_mean[0] = 1e30;
    dirty.storage.back().dposterior_cov[0] = nan;
    dirty.run();
    CHECK(all_finite(dirty.results()));
    CHECK(dirty.results() == clean.results());
  }
}

}  // namespace
