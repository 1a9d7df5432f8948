// SPDX-License-Identifier: MIT
// The MLP's own backprop against central finite differences in double: the dense layer, softmax
// cross-entropy, and whole networks with every normalization choice and statistics groups.
#include <doctest/doctest.h>

#include <bkn/backends/eigen.hpp>
#include <bkn/backends/reference.hpp>

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "methods.hpp"
#include "network.hpp"
#include "support/finite_difference.hpp"

namespace {

using mlp::index_t;
using bkn_test::check_gradient;
using bkn_test::pointers;

std::vector<double> normals(std::size_t n, std::uint64_t seed, double scale = 1, double shift = 0) {
  mlp::rng r(seed, 7);
  std::vector<double> v(n);
  for (double& e : v) e = shift + scale * r.normal();
  return v;
}

TEST_CASE("linear layer: dW, db and dx against finite differences") {
  mlp::rng r(3, 0);
  mlp::linear<double> layer(5, 4, r);
  for (std::size_t i = 0; i < layer.bias.size(); ++i) layer.bias[i] = 0.1 * double(i) - 0.2;
  const index_t n = 3;
  std::vector<double> x = normals(std::size_t(n * 5), 1), y(std::size_t(n * 4));
  const std::vector<double> probe = normals(y.size(), 2);  // loss = sum probe * y
  const auto loss = [&] {
    layer.forward(x.data(), y.data(), n);
    double l = 0;
    for (std::size_t i = 0; i < y.size(); ++i) l += probe[i] * y[i];
    return l;
  };
  std::vector<double> dx(x.size());
  layer.zero_grad();
  layer.backward(x.data(), probe.data(), dx.data(), n);
  std::vector<double*> weights, bias;
  for (double& w : layer.weight) weights.push_back(&w);
  for (double& b : layer.bias) bias.push_back(&b);
  check_gradient("dW", weights, std::vector<double>(layer.dweight.begin(), layer.dweight.end()),
                 loss);
  check_gradient("db", bias, std::vector<double>(layer.dbias.begin(), layer.dbias.end()), loss);
  check_gradient("dx", pointers(x), dx, loss);

  // backward adds into dW and db (a BKN weights transition adds its share there too).
  const std::vector<double> once(layer.dweight.begin(), layer.dweight.end());
  layer.backward(x.data(), probe.data(), nullptr, n);
  for (std::size_t i = 0; i < once.size(); ++i) CHECK(layer.dweight[i] == doctest::Approx(2 * once[i]));
}

TEST_CASE("softmax cross-entropy: gradient, loss value and accuracy count") {
  const index_t n = 4, classes = 3;
  std::vector<double> z = normals(std::size_t(n * classes), 4, 2.0);
  z[0] = 50;  // a large logit: the shifted exponentials must not overflow
  const std::vector<std::uint8_t> labels{0, 2, 1, 1};
  std::vector<double> dz(z.size());
  index_t correct = 0;
  const double l = mlp::softmax_cross_entropy(z.data(), labels.data(), n, classes, dz.data(), &correct);
  // The value by its definition, written independently: -mean log softmax(z)_label.
  double expected = 0;
  index_t expected_correct = 0;
  for (index_t i = 0; i < n; ++i) {
    double sum = 0, best = -1e300;
    index_t arg = 0;
    for (index_t c = 0; c < classes; ++c) {
      sum += std::exp(z[std::size_t(i * classes + c)] - 50);
      if (z[std::size_t(i * classes + c)] > best) best = z[std::size_t(i * classes + (arg = c))];
    }
    expected += -(z[std::size_t(i * classes + labels[std::size_t(i)])] - 50 - std::log(sum)) / double(n);
    expected_correct += arg == labels[std::size_t(i)] ? 1 : 0;
  }
  CHECK(l == doctest::Approx(expected).epsilon(1e-12));
  CHECK(correct == expected_correct);
  check_gradient("dlogits", pointers(z), dz, [&] {
    return mlp::softmax_cross_entropy(z.data(), labels.data(), n, classes,
                                      static_cast<double*>(nullptr), nullptr);
  });
}

/// A small network with normalization `spec`, its input and labels.
template <class Backend>
struct problem {
  mlp::network<double> net;
  std::vector<double> x;
  std::vector<std::uint8_t> labels;
  index_t n;

  problem(const std::string& spec, std::vector<index_t> hidden, index_t n_, index_t statistics,
          double epsilon)
      : net(6, hidden, 3, 11), n(n_) {
    x = normals(std::size_t(n * 6), 5, 1.5, 0.3);
    for (index_t i = 0; i < n; ++i) labels.push_back(std::uint8_t(i % 3));
    // Per-feature statistics of some other data: the BKN input prior.
    const std::vector<double> mean = normals(6, 8, 0.5), var = normals(6, 9, 0.3, 1.5);
    mlp::statistics_settings stats;
    stats.statistics_batch = statistics;
    stats.epsilon = epsilon;  // large, so that every term that depends on it is visible
    mlp::method m = mlp::parse_method(spec);
    m.bkn.initial_gain = 0.4;
    net.set_normalization(mlp::make_normalization<Backend, double>(
        m, Backend{}, net.host(n, mean, var), stats));
    // Parameters away from their initial values (gamma = 1, beta = 0, A = I, ...), and the
    // process noise r = softplus(rho) from 0.01, where its gradient is 100 times smaller, to
    // about 0.2.
    std::uint64_t seed = 20;
    for (auto& p : net.parameters()) {
      const std::vector<double> noise = normals(std::size_t(p.size), seed++, 0.3);
      const double shift = p.name.find(".noise") != std::string::npos ? 3.0 : 0.0;
      for (index_t i = 0; i < p.size; ++i) p.value[i] += noise[std::size_t(i)] + shift;
    }
  }

  /// The summed (not mean) cross-entropy, so that every gradient is well above the finite
  /// differences' noise: the mean's gradient times n.
  double loss() {
    const double* logits = net.forward(x.data(), n, mlp::phase::train);
    return double(n) * mlp::softmax_cross_entropy(logits, labels.data(), n, 3,
                                                  static_cast<double*>(nullptr), nullptr);
  }
};

template <class Backend>
void check_network(const std::string& spec, std::vector<index_t> hidden, index_t n,
                   index_t statistics, double epsilon = 0.3) {
  problem<Backend> p(spec, hidden, n, statistics, epsilon);
  p.net.forward(p.x.data(), n, mlp::phase::train);
  p.net.backward(p.labels.data());
  const auto params = p.net.parameters();
  std::vector<std::vector<double>> analytic;
  for (const auto& q : params) {
    analytic.emplace_back(q.grad, q.grad + q.size);
    for (double& g : analytic.back()) g *= double(n);
  }
  for (std::size_t k = 0; k < params.size(); ++k) {
    std::vector<double*> entries;
    for (index_t i = 0; i < params[k].size; ++i) entries.push_back(params[k].value + i);
    // The bias of a linear layer before a normalization shifts the batch and the prediction
    // alike, so it cancels (exactly, or up to the dense transition's part); it is still
    // checked, but may be zero.
    const bool cancels = spec != "none" && params[k].name.find(".bias") != std::string::npos &&
                         params[k].name != "linear" + std::to_string(hidden.size()) + ".bias";
    check_gradient(spec + " " + params[k].name, entries, analytic[k], [&] { return p.loss(); },
                   cancels);
  }
}

TEST_CASE("whole network, every normalization choice, against finite differences") {
  using B = bkn::reference_backend;
  for (index_t statistics : {index_t(2), index_t(8)}) {  // 4 groups of 2; one group of 8
    CAPTURE(statistics);
    check_network<B>("none", {5, 4}, 8, statistics);
    check_network<B>("bn", {5, 4}, 8, statistics);
    check_network<B>("bkn", {5, 4}, 8, statistics);  // weights transition, input prior
    check_network<B>("bkn:no-input-prior", {5, 4}, 8, statistics);
    check_network<B>("bkn:weights:q=0.3", {5, 4}, 8, statistics);
    check_network<B>("bkn:weights:per-channel", {5, 4, 3}, 8, statistics);
    check_network<B>("bkn:dense", {5, 4}, 8, statistics);
    check_network<B>("bkn:dense:no-input-prior:per-channel", {5, 4, 3}, 8, statistics);
    check_network<B>("bkn:identity", {4, 4}, 8, statistics);
    check_network<B>("bkn:diagonal:q=0.6", {4, 4, 4}, 8, statistics);
#if BKN_MLP_HAS_METHODS
    check_network<B>("gn:groups=2", {4, 6}, 8, statistics);
    check_network<B>("ln", {5, 4}, 8, statistics);
#endif
  }
}

#if BKN_MLP_HAS_METHODS
TEST_CASE("batch renormalization: r and d are constants of the gradient, so only at r = 1, d = 0") {
  // Batch renormalization's gradient treats r and d as constants (its definition), which is the
  // true derivative only while they are clipped to 1 and 0: at the start of the schedule.
  using B = bkn::reference_backend;
  for (index_t statistics : {index_t(2), index_t(8)}) {
    CAPTURE(statistics);
    check_network<B>("brn", {5, 4}, 8, statistics);
  }
  // Later in the schedule r and d move the output away from batch normalization's.
  problem<B> renorm("brn", {5, 4}, 8, 2, 1e-5), plain("bn", {5, 4}, 8, 2, 1e-5);
  for (int step = 0; step < 3; ++step) {  // moving averages away from (0, 1)
    renorm.net.forward(renorm.x.data(), 8, mlp::phase::train);
    plain.net.forward(plain.x.data(), 8, mlp::phase::train);
  }
  const double* a = renorm.net.forward(renorm.x.data(), 8, mlp::phase::train);
  const std::vector<double> early(a, a + 24);
  const double* b = plain.net.forward(plain.x.data(), 8, mlp::phase::train);
  for (std::size_t i = 0; i < early.size(); ++i) CHECK(early[i] == doctest::Approx(b[i]).epsilon(1e-12));
  renorm.net.norm().set_progress(1.0);
  a = renorm.net.forward(renorm.x.data(), 8, mlp::phase::train);
  double difference = 0;
  for (std::size_t i = 0; i < early.size(); ++i) difference += std::abs(a[i] - early[i]);
  CHECK(difference > 1e-3);
}
#endif

TEST_CASE("whole network on the Eigen backend, as the program runs it") {
  using B = bkn::eigen_backend;
  check_network<B>("bn", {5, 4}, 8, 2);
  check_network<B>("bkn", {5, 4}, 8, 2);
  check_network<B>("bkn:dense", {5, 4}, 8, 2);
}

TEST_CASE("the weights transition's fold: its epsilon terms are checked, not drowned") {
  // With bkn's default epsilon the fold's dependence on the posterior variance is ~1e-5 of
  // the loss; check_network uses 0.3. Here the default too, to be sure nothing else breaks.
  check_network<bkn::reference_backend>("bkn", {5, 4}, 8, 2, 1e-5);
}

TEST_CASE("the one-group proxy predicts what bkn's weights transition predicts directly") {
  // The reference: each layer a plain bkn::forward whose transition is the host's linear layer
  // itself, with the prior the adapter's documentation describes (the inputs' statistics; then
  // N(beta, gamma^2 mean_g(v / (v + eps))) of the previous layer's posterior), no proxy.
  const index_t n = 8, s = 2, G = n / s;
  const double eps = 0.3;
  problem<bkn::reference_backend> p("bkn", {5, 4}, n, s, eps);
  const double* logits = p.net.forward(p.x.data(), n, mlp::phase::train);
  const std::vector<double> adapter(logits, logits + n * 3);

  std::map<std::string, double*> value;
  for (const auto& q : p.net.parameters()) value[q.name] = q.value;
  const std::vector<double> input_mean = normals(6, 8, 0.5), input_var = normals(6, 9, 0.3, 1.5);
  auto& linears = p.net.linears();
  bkn::options opt;
  opt.group_size = s;
  opt.epsilon = eps;
  std::vector<double> in(p.x), pre, y, prior_mean, prior_var;
  std::vector<bkn::layer_storage<double>> layers;
  for (int k = 0; k < 2; ++k) {
    const index_t C = linears[std::size_t(k)].out, Cin = linears[std::size_t(k)].in;
    pre.assign(std::size_t(n * C), 0);
    linears[std::size_t(k)].forward(in.data(), pre.data(), n);
    bkn::layer_config cfg;
    cfg.channels = C;
    cfg.groups = G;
    layers.emplace_back(cfg);
    bkn::layer_storage<double>& L = layers.back();
    const std::string name = "norm" + std::to_string(k);
    for (index_t c = 0; c < C; ++c) {
      L.gamma[std::size_t(c)] = value[name + ".gamma"][c];
      L.beta[std::size_t(c)] = value[name + ".beta"][c];
      L.noise[std::size_t(c)] = value[name + ".noise"][c];
    }
    L.gain_logit[0] = value[name + ".gain_logit"][0];
    bkn::layer<double> view = L.view();
    view.params.transition = bkn::transition<double>::linear(
        linears[std::size_t(k)].weight, linears[std::size_t(k)].bias, Cin,
        k == 0 ? bkn::activation::none : bkn::activation::relu);
    if (k == 0) {
      prior_mean = input_mean;
      prior_var = input_var;
    } else {
      const bkn::layer_storage<double>& prev = layers[0];
      const index_t Cp = Cin;
      prior_mean.assign(std::size_t(Cp), 0);
      prior_var.assign(std::size_t(Cp), 0);
      for (index_t c = 0; c < Cp; ++c) {
        double ratio = 0;
        for (index_t g = 0; g < G; ++g) {
          const double v = prev.posterior_cov[std::size_t(g * Cp + c)];
          ratio += v / (v + eps) / double(G);
        }
        prior_mean[std::size_t(c)] = prev.beta[std::size_t(c)];
        prior_var[std::size_t(c)] = prev.gamma[std::size_t(c)] * prev.gamma[std::size_t(c)] * ratio;
      }
    }
    y.assign(pre.size(), 0);
    bkn::reference_backend backend;
    bkn::host_workspace ws(bkn::workspace_size(backend, opt, {n, C, 1, 1}, view.params.transition));
    bkn::forward(backend, opt, view, bkn::nc(pre.data(), n, C), bkn::nc(y.data(), n, C),
                 bkn::gaussian_view<const double>(prior_mean, prior_var, 1, Cin), ws.bytes());
    in.assign(y.size(), 0);
    mlp::relu_forward(y.data(), in.data(), index_t(y.size()));
  }
  std::vector<double> reference(std::size_t(n * 3));
  linears[2].forward(in.data(), reference.data(), n);
  for (std::size_t i = 0; i < reference.size(); ++i)
    CHECK(adapter[i] == doctest::Approx(reference[i]).epsilon(1e-12));
}

TEST_CASE("inference with batch statistics normalizes like the training forward") {
  for (const char* spec : {"bn", "bkn", "bkn:dense", "bkn:no-input-prior:q=0.2"
#if BKN_MLP_HAS_METHODS
                           , "brn"  // at the start of its schedule r = 1, d = 0
#endif
       }) {
    CAPTURE(spec);
    problem<bkn::reference_backend> p(spec, {5, 4}, 8, 2, 1e-5);
    const double* logits = p.net.forward(p.x.data(), 8, mlp::phase::train);
    const std::vector<double> train(logits, logits + 8 * 3);
    logits = p.net.forward(p.x.data(), 8, mlp::phase::infer_batch);
    for (std::size_t i = 0; i < train.size(); ++i) CHECK(logits[i] == train[i]);
    // Moving averages differ from one batch's statistics: the outputs must differ too.
    logits = p.net.forward(p.x.data(), 8, mlp::phase::infer_moving);
    double difference = 0;
    for (std::size_t i = 0; i < train.size(); ++i) difference += std::abs(logits[i] - train[i]);
    CHECK(difference > 1e-3);
  }
}

TEST_CASE("a batch the statistics batch does not divide is one group") {
  // 6 samples with statistics batch 4: the host's leftover call, normalized as one group of 6,
  // which is what statistics batch 6 gives.
  problem<bkn::reference_backend> a("bkn", {5, 4}, 6, 4, 1e-5), b("bkn", {5, 4}, 6, 6, 1e-5);
  const double* la = a.net.forward(a.x.data(), 6, mlp::phase::infer_batch);
  const std::vector<double> first(la, la + 18);
  const double* lb = b.net.forward(b.x.data(), 6, mlp::phase::infer_batch);
  for (std::size_t i = 0; i < first.size(); ++i) CHECK(first[i] == lb[i]);
}

TEST_CASE("method names: parsed, printed back, and bad ones rejected with the reason") {
  for (const char* name : {"none", "bn", "bkn:weights", "bkn:dense:q=0.1", "bkn:identity:per-channel",
                           "bkn:weights:no-input-prior"})
    CHECK(mlp::parse_method(name).name() == name);
  CHECK(mlp::parse_method("bkn").name() == "bkn:weights");
  const auto message = [](const char* spec) {
    try {
      mlp::parse_method(spec);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(message("bkn:q=1.5").find("fixed gain q in [0, 1]") != std::string::npos);
  CHECK(message("bkn:sideways").find("option 'sideways'") != std::string::npos);
  CHECK(message("bn:dense").find("bn takes no options") != std::string::npos);
  CHECK(message("xn").find("unknown normalization method 'xn'") != std::string::npos);
  // An identity transition between layers of different widths is refused when built.
  CHECK_THROWS_WITH_AS(problem<bkn::reference_backend>("bkn:identity", {5, 4}, 8, 2, 1e-5),
                       doctest::Contains("needs equal hidden widths"), std::invalid_argument);
}

}  // namespace
