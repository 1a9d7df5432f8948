// SPDX-License-Identifier: MIT
// Does BKN estimate a layer's statistics from micro-batches more accurately than batch
// statistics? A fixed random ReLU MLP whose "true" per-layer statistics come from a very large
// batch; micro-batches of m samples estimate each layer's per-channel mean and variance with
// batch statistics and with BKN (diagonal mode, the transition through the next layer's
// weights), and both are compared with the truth. docs/estimation.md explains the setup.
//
//   bkn_estimation [--samples N] [--batches B] [--seed S] [--out DIR] [--quick] [--no-plot]
//                  [--gains 0.1,0.3,0.5] [--group-sizes 2,4,8] [--skip-threshold 100]
//                  [--input-correlation 0.5]
//                  [--backend reference|eigen] [--threads T]
//
// Writes DIR/estimation.md (the tables, also printed), DIR/estimation.csv, and, when gnuplot is
// on the PATH, DIR/estimation.png (from DIR/estimation.gp).
#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>

#if defined(__has_include)
#if __has_include(<bkn/backends/eigen.hpp>) && __has_include(<Eigen/Core>)
#include <bkn/backends/eigen.hpp>
#define BKN_ESTIMATION_HAS_EIGEN 1
#endif
#endif
#ifndef BKN_ESTIMATION_HAS_EIGEN
#define BKN_ESTIMATION_HAS_EIGEN 0
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using idx = bkn::index_t;

// ---- deterministic random numbers (the same on every platform, unlike std::normal_distribution)

struct rng {
  std::uint64_t s[4];
  bool has_spare = false;
  double spare = 0;

  static std::uint64_t splitmix(std::uint64_t& x) {
    std::uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  rng(std::uint64_t seed, std::uint64_t stream) {
    std::uint64_t x = seed * 0x2545F4914F6CDD1Dull + stream * 0x9E3779B97F4A7C15ull + 1;
    for (auto& w : s) w = splitmix(x);
  }
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  std::uint64_t next() {  // xoshiro256**
    const std::uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double normal() {                                                  // Box-Muller
    if (has_spare) {
      has_spare = false;
      return spare;
    }
    const double u = 1.0 - uniform(), v = uniform();
    const double r = std::sqrt(-2.0 * std::log(u)), t = 6.283185307179586476925 * v;
    spare = r * std::sin(t);
    has_spare = true;
    return r * std::cos(t);
  }
};

// ---- the network -----------------------------------------------------------------------------

constexpr idx input_dim = 32, width = 64, depth = 4, factors = 4;
constexpr double epsilon = 1e-5;           // bkn's default, also in the true normalization

/// x_1 = W_0 u + b_0; x_{k+1} = W_k relu((x_k - mean_k) / sqrt(var_k + eps)) + b_k, where
/// mean_k, var_k are layer k's true (population) statistics.
struct network {
  std::vector<double> in_mean, in_scale;  // u_j = in_mean_j + in_scale_j * (correlated N(0,1))
  std::vector<double> w[depth], wt[depth], b[depth];  // W_k: width x fan_in row-major; wt = W^T
  std::vector<double> mean[depth], var[depth];        // the true statistics of x_k
  double rho;  // correlation of inputs that share a latent factor

  static idx fan_in(int k) { return k == 0 ? input_dim : width; }

  network(std::uint64_t seed, double input_correlation) : rho(input_correlation) {
    rng r(seed, 0);
    for (idx j = 0; j < input_dim; ++j) {
      in_mean.push_back(4 * r.uniform() - 2);                       // U(-2, 2)
      in_scale.push_back(std::exp(std::log(0.3) + std::log(10.0) * r.uniform()));  // 0.3 .. 3
    }
    for (int k = 0; k < depth; ++k) {
      const idx n = fan_in(k);
      const double he = std::sqrt(2.0 / double(n));
      for (idx i = 0; i < width * n; ++i) w[k].push_back(he * r.normal());
      for (idx c = 0; c < width; ++c) b[k].push_back(0.1 * r.normal());
      wt[k].assign(w[k].size(), 0);
      for (idx c = 0; c < width; ++c)
        for (idx j = 0; j < n; ++j) wt[k][j * width + c] = w[k][c * n + j];
      mean[k].assign(width, 0);
      var[k].assign(width, 1);
    }
  }

  /// One input sample: per-channel means and scales, correlation rho between the inputs that
  /// share one of the `factors` latent factors (j mod factors).
  void sample_input(rng& r, double* u) const {
    double f[factors];
    for (double& v : f) v = r.normal();
    const double a = std::sqrt(1 - rho), c = std::sqrt(rho);
    for (idx j = 0; j < input_dim; ++j)
      u[j] = in_mean[j] + in_scale[j] * (a * r.normal() + c * f[j % factors]);
  }

  /// x = W_k h + b_k for one sample (axpy order: no long dependency chain).
  void linear(int k, const double* h, double* x) const {
    const idx n = fan_in(k);
    for (idx c = 0; c < width; ++c) x[c] = b[k][c];
    for (idx j = 0; j < n; ++j) {
      const double hj = h[j];
      const double* col = wt[k].data() + j * width;
      for (idx c = 0; c < width; ++c) x[c] += hj * col[c];
    }
  }

  /// x_{k+2} from x_{k+1} (0-based k: layer k's pre-normalization activation to layer k+1's),
  /// normalizing layer k with its true statistics.
  void next_layer(int k, const double* x, double* out) const {
    double h[width];
    for (idx c = 0; c < width; ++c) {
      const double y = (x[c] - mean[k][c]) / std::sqrt(var[k][c] + epsilon);
      h[c] = y > 0 ? y : 0;
    }
    linear(k + 1, h, out);
  }

  /// The Gaussian of layer k's normalized output y_k = (x_k - mean_k) / sqrt(var_k + eps) when
  /// x_k ~ N(mu, v): the prior bkn pushes through ReLU and W_{k+1} (docs/estimation.md).
  void fold_normalization(int k, idx groups, const double* mu, const double* v, double* y_mu,
                          double* y_v) const {
    for (idx g = 0; g < groups; ++g)
      for (idx c = 0; c < width; ++c) {
        const double s2 = var[k][std::size_t(c)] + epsilon;
        const idx i = g * width + c;
        y_mu[i] = (mu[i] - mean[k][std::size_t(c)]) / std::sqrt(s2);
        y_v[i] = v[i] / s2;
      }
  }
};

/// Per-channel mean and (population) variance of n rows of `width` values, two-pass in double.
void column_statistics(const std::vector<double>& x, idx n, std::vector<double>& mean,
                       std::vector<double>& var) {
  mean.assign(width, 0);
  var.assign(width, 0);
  for (idx i = 0; i < n; ++i)
    for (idx c = 0; c < width; ++c) mean[c] += x[i * width + c];
  for (double& m : mean) m /= double(n);
  for (idx i = 0; i < n; ++i)
    for (idx c = 0; c < width; ++c) {
      const double d = x[i * width + c] - mean[c];
      var[c] += d * d;
    }
  for (double& v : var) v /= double(n);
}

/// The truth, layer by layer: statistics of x_k over `samples` inputs, each layer normalized
/// with the previous layers' true statistics. One buffer of samples x width, updated in place.
void true_statistics(network& net, idx samples, std::uint64_t seed) {
  std::vector<double> x(std::size_t(samples * width));
  rng r(seed, 1);
  double u[input_dim];
  for (idx i = 0; i < samples; ++i) {
    net.sample_input(r, u);
    net.linear(0, u, x.data() + i * width);
  }
  for (int k = 0; k < depth; ++k) {
    if (k > 0) {
      double next[width];
      for (idx i = 0; i < samples; ++i) {
        net.next_layer(k - 1, x.data() + i * width, next);
        std::copy(next, next + width, x.data() + i * width);
      }
    }
    column_statistics(x, samples, net.mean[k], net.var[k]);
  }
}

// ---- the estimators --------------------------------------------------------------------------

struct method {
  std::string name;
  double gain;  // < 0: batch statistics (no prior on any layer)
  bool skip;
};

/// Errors of one method at one group size m, per layer.
struct result {
  double var_rel_mse[depth]{}, var_rel_mse_se[depth]{}, var_rel_bias[depth]{};
  double mean_err[depth]{}, mean_err_se[depth]{};
  double pred_var_rel_mse[depth]{};  // the prediction alone (layers 2..4, BKN only)
  double skip_rate[depth]{};
  // Averages over layers 2..4, with standard errors over micro-batches.
  double avg_var = 0, avg_var_se = 0, avg_mean = 0, avg_mean_se = 0, avg_skip = 0;
  double avg_pred_var = 0;
  idx skip_mismatch = 0;  // groups where bkn's skip decision and the documented rule disagree
};

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double e : v) s += e;
  return v.empty() ? 0.0 : s / double(v.size());
}
double standard_error(const std::vector<double>& v) {
  if (v.size() < 2) return 0;
  const double m = mean_of(v);
  double s = 0;
  for (double e : v) s += (e - m) * (e - m);
  return std::sqrt(s / double(v.size() - 1) / double(v.size()));
}

/// Runs one method over G micro-batches of m samples: xs[k] holds x_k (N x width, N = G m),
/// computed with the true normalization, so every layer sees the same input as in the truth.
template <class Backend>
result run_method(const Backend& backend, const network& net, const method& meth, idx m, idx G,
                  const std::vector<double> (&xs)[depth], double skip_threshold) {
  const idx N = G * m;
  bkn::options opt;
  opt.group_size = m;
  opt.epsilon = epsilon;
  opt.fixed_gain = meth.gain;
  opt.skip_threshold = meth.skip ? skip_threshold : 0;

  bkn::layer_config cfg;
  cfg.channels = width;
  cfg.groups = G;
  cfg.affine = false;
  cfg.noise = false;  // R = 0: the transition below is the host's exact layer
  cfg.transition = bkn::transition_kind::weights;
  cfg.in_channels = width;
  std::vector<bkn::layer_storage<double>> storage;
  for (int k = 0; k < depth; ++k) storage.emplace_back(cfg);

  const bkn::tensor_shape shape{N, width, 1, 1};
  std::size_t bytes = bkn::workspace_size(backend, opt, shape);
  for (int k = 1; k < depth; ++k)
    bytes = std::max(bytes, bkn::workspace_size(backend, opt, shape,
                                                bkn::transition<double>::linear(
                                                    net.w[k], net.b[k], width,
                                                    bkn::activation::relu)));
  bkn::host_workspace ws(bytes);
  std::vector<double> y(std::size_t(N * width));
  std::vector<double> prior_mean(std::size_t(G * width)), prior_var(std::size_t(G * width));

  result res;
  std::vector<double> batch_var(std::size_t(G), 0), batch_mean(std::size_t(G), 0);
  std::vector<double> layer_var(static_cast<std::size_t>(G)), layer_mean(static_cast<std::size_t>(G));
  idx skipped24 = 0;
  for (int k = 0; k < depth; ++k) {
    bkn::layer<double> L = storage[std::size_t(k)].view();
    L.running = {};  // no moving averages: only this batch's estimate is measured
    // Layer k > 0: the host's map from y_{k-1} to x_k. Layer 0 has no prior (batch statistics).
    if (k > 0)
      L.params.transition =
          bkn::transition<double>::linear(net.w[k], net.b[k], width, bkn::activation::relu);
    bkn::gaussian_view<const double> prior;
    if (k > 0 && meth.gain >= 0) {
      const auto& prev = storage[std::size_t(k - 1)];
      net.fold_normalization(k - 1, G, prev.posterior_mean.data(), prev.posterior_cov.data(),
                             prior_mean.data(), prior_var.data());
      prior = {prior_mean, prior_var, G, width};
    }
    bkn::forward(backend, opt, L, bkn::nc(xs[k].data(), N, width), bkn::nc(y.data(), N, width),
                 prior, ws.bytes());

    const auto& s = storage[std::size_t(k)];
    idx skipped = 0;
    double bias = 0, pred = 0;
    for (idx g = 0; g < G; ++g) {
      double ev = 0, em = 0;
      bool same = true;  // posterior == observed exactly: q = 1, the fusion was skipped
      double ratio = 0;  // the documented rule, recomputed
      for (idx c = 0; c < width; ++c) {
        const std::size_t i = std::size_t(g * width + c);
        const double tv = net.var[k][std::size_t(c)], tm = net.mean[k][std::size_t(c)];
        const double dv = s.posterior_cov[i] - tv, dm = s.posterior_mean[i] - tm;
        ev += dv * dv / (tv * tv);
        em += dm * dm / tv;
        bias += dv / tv;
        if (!prior.empty()) {
          const double dp = s.predicted_cov[i] - tv;
          pred += dp * dp / (tv * tv);
          ratio += s.predicted_cov[i] / (s.observed_cov[i] + epsilon);
          same = same && s.posterior_cov[i] == s.observed_cov[i] &&
                 s.posterior_mean[i] == s.observed_mean[i];
        }
      }
      layer_var[std::size_t(g)] = ev / double(width);
      layer_mean[std::size_t(g)] = em / double(width);
      if (!prior.empty()) {
        const bool rule = meth.skip && ratio / double(width) >= skip_threshold;
        skipped += same ? 1 : 0;
        res.skip_mismatch += same != rule ? 1 : 0;
      }
      if (k > 0) {
        batch_var[std::size_t(g)] += layer_var[std::size_t(g)] / double(depth - 1);
        batch_mean[std::size_t(g)] += layer_mean[std::size_t(g)] / double(depth - 1);
      }
    }
    res.var_rel_mse[k] = mean_of(layer_var);
    res.var_rel_mse_se[k] = standard_error(layer_var);
    res.mean_err[k] = mean_of(layer_mean);
    res.mean_err_se[k] = standard_error(layer_mean);
    res.var_rel_bias[k] = bias / double(G * width);
    res.pred_var_rel_mse[k] = prior.empty() ? NAN : pred / double(G * width);
    res.skip_rate[k] = prior.empty() ? NAN : double(skipped) / double(G);
    if (k > 0) {
      skipped24 += skipped;
      res.avg_pred_var += res.pred_var_rel_mse[k] / double(depth - 1);
    }
  }
  res.avg_var = mean_of(batch_var);
  res.avg_var_se = standard_error(batch_var);
  res.avg_mean = mean_of(batch_mean);
  res.avg_mean_se = standard_error(batch_mean);
  res.avg_skip = meth.gain >= 0 ? double(skipped24) / double(G * (depth - 1)) : NAN;
  return res;
}

/// The transition's own error: bkn's prediction of layer k+1 from layer k's EXACT statistics
/// (diagonal Gaussian through ReLU and W), against layer k+1's truth.
template <class Backend>
void transition_floor(const Backend& backend, const network& net, double* var_err,
                      double* mean_err) {
  bkn::options opt;
  opt.epsilon = epsilon;
  std::vector<double> mu(width), v(width), pm(width), pv(width);
  for (int k = 1; k < depth; ++k) {
    const auto A = bkn::transition<double>::linear(net.w[k], net.b[k], width,
                                                   bkn::activation::relu);
    net.fold_normalization(k - 1, 1, net.mean[k - 1].data(), net.var[k - 1].data(), mu.data(),
                           v.data());
    bkn::host_workspace ws(bkn::workspace_size(backend, opt, {1, width, 1, 1}, A));
    bkn::predict(backend, opt, A, bkn::span<const double>(),
                 bkn::gaussian_view<const double>(mu, v, 1, width),
                 bkn::gaussian_view<double>(pm, pv, 1, width), ws.bytes());
    double ev = 0, em = 0;
    for (idx c = 0; c < width; ++c) {
      const double tv = net.var[k][std::size_t(c)];
      ev += (pv[std::size_t(c)] - tv) * (pv[std::size_t(c)] - tv) / (tv * tv);
      em += (pm[std::size_t(c)] - net.mean[k][std::size_t(c)]) *
            (pm[std::size_t(c)] - net.mean[k][std::size_t(c)]) / tv;
    }
    var_err[k] = ev / width;
    mean_err[k] = em / width;
  }
}

// ---- command line and output -----------------------------------------------------------------

struct settings {
  idx samples = 200000;
  idx batches = 4000;
  std::uint64_t seed = 1;
  std::string out = "estimation_out";
  bool quick = false, plot = true;
  std::vector<double> gains{0.1, 0.3, 0.5};
  std::vector<idx> group_sizes{2, 4, 8};
  double skip_threshold = 100;
  double input_correlation = 0.5;
  std::string backend = BKN_ESTIMATION_HAS_EIGEN ? "eigen" : "reference";
  int threads = 1;
};

template <class T>
std::vector<T> parse_list(const std::string& s) {
  std::vector<T> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    std::size_t used = 0;
    const double v = std::stod(item, &used);
    if (used != item.size()) throw std::invalid_argument("bad number '" + item + "'");
    out.push_back(T(v));
  }
  if (out.empty()) throw std::invalid_argument("empty list");
  return out;
}

void usage(std::FILE* f) {
  std::fprintf(f,
               "usage: bkn_estimation [--samples N] [--batches B] [--seed S] [--out DIR]\n"
               "                      [--quick] [--no-plot] [--gains Q1,Q2,..]\n"
               "                      [--group-sizes M1,M2,..] [--skip-threshold T]\n"
               "                      [--input-correlation R]\n"
               "                      [--backend reference|eigen] [--threads T]\n"
               "  --samples N      samples of the large batch that defines the truth (200000)\n"
               "  --batches B      micro-batches per group size m (4000)\n"
               "  --seed S         seed of the weights, the inputs and the micro-batches (1)\n"
               "  --out DIR        where estimation.md, .csv, .gp and .png go (estimation_out)\n"
               "  --quick          20000 samples, 100 micro-batches, no plot (a smoke test)\n"
               "  --no-plot        do not run gnuplot\n"
               "  --gains          BKN's fixed gains q (options.fixed_gain) (0.1,0.3,0.5)\n"
               "  --group-sizes    micro-batch sizes m (2,4,8)\n"
               "  --skip-threshold the authors' skip rule, options.skip_threshold (100)\n"
               "  --input-correlation  correlation of the inputs sharing a latent factor (0.5)\n"
               "  --backend        %s\n"
               "  --threads        threads of the eigen backend (1)\n",
               BKN_ESTIMATION_HAS_EIGEN ? "eigen (default) or reference"
                                        : "reference (eigen not compiled in)");
}

settings parse(int argc, char** argv) {
  settings s;
  bool samples_set = false, batches_set = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--samples") {
      s.samples = idx(std::stoll(value()));
      samples_set = true;
    } else if (a == "--batches") {
      s.batches = idx(std::stoll(value()));
      batches_set = true;
    } else if (a == "--seed") {
      s.seed = std::stoull(value());
    } else if (a == "--out") {
      s.out = value();
    } else if (a == "--quick") {
      s.quick = true;
    } else if (a == "--no-plot") {
      s.plot = false;
    } else if (a == "--gains") {
      s.gains = parse_list<double>(value());
    } else if (a == "--group-sizes") {
      s.group_sizes = parse_list<idx>(value());
    } else if (a == "--skip-threshold") {
      s.skip_threshold = std::stod(value());
    } else if (a == "--input-correlation") {
      s.input_correlation = std::stod(value());
    } else if (a == "--backend") {
      s.backend = value();
    } else if (a == "--threads") {
      s.threads = std::stoi(value());
    } else if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown option " + a);
    }
  }
  if (s.quick) {
    if (!samples_set) s.samples = 20000;
    if (!batches_set) s.batches = 100;
    s.plot = false;
  }
  if (s.samples < 2 || s.batches < 2) throw std::invalid_argument("need --samples, --batches >= 2");
  for (idx m : s.group_sizes)
    if (m < 2) throw std::invalid_argument("group sizes must be >= 2 (m = 1: no batch statistics)");
  for (double q : s.gains)
    if (!(q >= 0 && q < 1)) throw std::invalid_argument("gains must be in [0, 1)");
  if (!(s.input_correlation >= 0 && s.input_correlation <= 1))
    throw std::invalid_argument("--input-correlation must be in [0, 1]");
  if (s.backend != "reference" && !(s.backend == "eigen" && BKN_ESTIMATION_HAS_EIGEN))
    throw std::invalid_argument("unknown or unavailable backend " + s.backend);
  return s;
}

std::string fmt(const char* f, double v) {
  if (std::isnan(v)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

struct row {
  method meth;
  idx m;
  result r;
};

std::string markdown(const settings& s, const std::vector<row>& rows, const double* floor_var,
                     const double* floor_mean, double seconds) {
  std::ostringstream o;
  o << "## BKN vs batch statistics: estimation error of per-layer statistics\n\n"
    << "4-layer ReLU MLP (" << input_dim << " -> " << width << " x " << depth
    << "), truth from " << s.samples << " samples, " << s.batches
    << " micro-batches per m, seed " << s.seed << ", input correlation " << s.input_correlation
    << ", backend " << s.backend << ".\n"
    << "var: relative MSE of the per-channel variance, mean((v_est - v)^2 / v^2); mean: "
       "mean((mu_est - mu)^2 / v); averages over channels, micro-batches and layers 2-4 "
       "(+- one standard error over micro-batches). skip: fraction of (micro-batch, layer) "
       "fusions the skip rule turned off.\n\n";
  o << "| method | m | var rel. MSE (L2-4) | mean error (L2-4) | skip fired | var L1 | var L2 "
       "| var L3 | var L4 |\n"
    << "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
  for (const row& w : rows) {
    const result& r = w.r;
    o << "| " << w.meth.name << " | " << w.m << " | " << fmt("%.3f", r.avg_var) << " +- "
      << fmt("%.3f", r.avg_var_se) << " | " << fmt("%.3f", r.avg_mean) << " +- "
      << fmt("%.3f", r.avg_mean_se) << " | "
      << (w.meth.skip ? fmt("%.3g %%", 100 * r.avg_skip) : std::string("-"));
    for (int k = 0; k < depth; ++k) o << " | " << fmt("%.3f", r.var_rel_mse[k]);
    o << " |\n";
  }
  o << "\nRatios to batch statistics (var rel. MSE, layers 2-4):\n\n| method |";
  for (idx m : s.group_sizes) o << " m = " << m << " |";
  o << "\n| --- |";
  for (std::size_t i = 0; i < s.group_sizes.size(); ++i) o << " ---: |";
  o << "\n";
  const std::size_t per_m = rows.size() / s.group_sizes.size();
  for (std::size_t j = 0; j < per_m; ++j) {
    o << "| " << rows[j].meth.name << " |";
    for (std::size_t i = 0; i < s.group_sizes.size(); ++i)
      o << " " << fmt("%.2f", rows[i * per_m + j].r.avg_var / rows[i * per_m].r.avg_var) << " |";
    o << "\n";
  }
  o << "\nThe transition's own error (bkn's diagonal prediction from the previous layer's EXACT "
       "statistics, vs the truth): the floor of BKN as q -> 0.\n\n"
    << "| layer | var rel. MSE | mean error |\n| --- | ---: | ---: |\n";
  for (int k = 1; k < depth; ++k)
    o << "| " << k + 1 << " | " << fmt("%.4f", floor_var[k]) << " | "
      << fmt("%.4f", floor_mean[k]) << " |\n";
  idx mismatch = 0;
  for (const row& w : rows) mismatch += w.r.skip_mismatch;
  o << "\nSkip decisions that disagree with mean_c(v_pred / (s + eps)) >= " << s.skip_threshold
    << ": " << mismatch << ". Run time " << fmt("%.1f", seconds) << " s.\n";
  return o.str();
}

/// Opens `path` for writing, or throws.
std::ofstream open_output(const std::string& path) {
  std::ofstream f(path);
  if (!f) throw std::runtime_error("cannot write " + path);
  return f;
}

/// Throws if a write to `f` failed.
void check_written(std::ofstream& f, const std::string& path) {
  f.close();
  if (!f) throw std::runtime_error("writing " + path + " failed");
}

void write_csv(const std::string& path, const std::vector<row>& rows) {
  std::ofstream f = open_output(path);
  f << "method,gain,skip,m,layer,var_rel_mse,var_rel_mse_se,var_rel_bias,mean_err,mean_err_se,"
       "pred_var_rel_mse,skip_rate\n";
  auto num = [](double v) { return std::isnan(v) ? std::string() : fmt("%.6g", v); };
  for (const row& w : rows) {
    const result& r = w.r;
    const std::string head = "\"" + w.meth.name + "\"," + num(w.meth.gain < 0 ? 1 : w.meth.gain) +
                             "," + (w.meth.skip ? "1" : "0") + "," + std::to_string(w.m) + ",";
    for (int k = 0; k < depth; ++k)
      f << head << k + 1 << "," << num(r.var_rel_mse[k]) << "," << num(r.var_rel_mse_se[k]) << ","
        << num(r.var_rel_bias[k]) << "," << num(r.mean_err[k]) << "," << num(r.mean_err_se[k])
        << "," << num(r.pred_var_rel_mse[k]) << "," << num(r.skip_rate[k]) << "\n";
    f << head << "2-4," << num(r.avg_var) << "," << num(r.avg_var_se) << ",,"
      << num(r.avg_mean) << "," << num(r.avg_mean_se) << ","
      << num(w.meth.gain >= 0 ? r.avg_pred_var : NAN) << "," << num(r.avg_skip) << "\n";
  }
  check_written(f, path);
}

/// A gnuplot script: error vs m per method, variance and mean side by side, log scales, with
/// the reference numbers of docs/math.md ("Does the estimation claim hold?") for comparison.
void write_gnuplot(const std::string& dir, const settings& s, const std::vector<row>& rows) {
  const std::size_t per_m = rows.size() / s.group_sizes.size();
  const std::string path = dir + "/estimation.gp";
  std::ofstream f = open_output(path);
  f << "# estimation.gp, written by bkn_estimation: run `gnuplot estimation.gp` in this folder\n"
    << "set terminal pngcairo size 1300,620 font 'sans,11'\nset output 'estimation.png'\n"
    << "set datafile separator ','\nset logscale x 2\nset logscale y 10\nset mytics 10\n"
    << "set ytics (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)\nset xtics (";
  for (std::size_t i = 0; i < s.group_sizes.size(); ++i)
    f << (i ? ", " : "") << s.group_sizes[i];
  f << ")\nset xrange [" << double(s.group_sizes.front()) / 1.25 << ":"
    << double(s.group_sizes.back()) * 1.25 << "]\n"
    << "set grid xtics ytics mytics lc rgb '#dddddd'\nset xlabel 'micro-batch size m'\n"
    << "set multiplot layout 1,2 title 'Estimation error of per-channel statistics, mean of "
       "layers 2-4 (" << s.batches << " micro-batches per m, truth from " << s.samples
    << " samples, seed " << s.seed << ")'\n";
  // One inline data block per method: m, var, var_se, mean, mean_se.
  for (std::size_t j = 0; j < per_m; ++j) {
    f << "$M" << j << " << EOD\n";
    for (std::size_t i = 0; i < s.group_sizes.size(); ++i) {
      const row& w = rows[i * per_m + j];
      f << w.m << "," << w.r.avg_var << "," << w.r.avg_var_se << "," << w.r.avg_mean << ","
        << w.r.avg_mean_se << "\n";
    }
    f << "EOD\n";
  }
  // docs/math.md's numbers (another random network): batch statistics, BKN q = 0.1.
  f << "$REF << EOD\n2,0.79,0.22\n4,0.48,0.09\n8,0.26,0.05\nEOD\n";
  const char* colors[] = {"#000000", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b"};
  for (int panel = 0; panel < 2; ++panel) {
    f << "set title '" << (panel == 0 ? "variance: relative MSE" : "mean: MSE / true variance")
      << "'\nset ylabel '"
      << (panel == 0 ? "mean of (v_{est} - v)^2 / v^2" : "mean of (mu_{est} - mu)^2 / v")
      << "'\n"
      << (panel == 0 ? "set key bottom left box opaque font ',10'\n" : "unset key\n") << "plot ";
    for (std::size_t j = 0; j < per_m; ++j) {
      const method& me = rows[j].meth;
      std::size_t ci = 0;
      if (me.gain >= 0)
        for (std::size_t g = 0; g < s.gains.size(); ++g)
          if (s.gains[g] == me.gain) ci = 1 + g % 5;
      const int col = panel == 0 ? 2 : 4;
      f << (j ? ", \\\n     " : "") << "$M" << j << " using 1:" << col << ":" << col + 1
        << " with yerrorlines lw 2 pt " << (me.skip ? 6 : 7) << " ps 1.2 dt " << (me.skip ? 2 : 1)
        << " lc rgb '" << colors[ci] << "' title '" << me.name << "'";
    }
    if (panel == 0)
      f << ", \\\n     $REF using 1:2 with points pt 2 ps 1.5 lc rgb '#000000' "
           "title 'math.md: batch statistics', \\\n     $REF using 1:3 with points pt 2 ps 1.5 "
           "lc rgb '#1f77b4' title 'math.md: BKN q=0.1'";
    f << "\n";
  }
  f << "unset multiplot\n";
  check_written(f, path);
}

template <class Backend>
int run(const Backend& backend, const settings& s) {
  const auto t0 = std::chrono::steady_clock::now();
  network net(s.seed, s.input_correlation);
  true_statistics(net, s.samples, s.seed);

  std::vector<method> methods{{"batch statistics", -1, false}};
  for (double q : s.gains) methods.push_back({"BKN q=" + fmt("%g", q), q, false});
  for (double q : s.gains) methods.push_back({"BKN q=" + fmt("%g", q) + " + skip", q, true});

  std::vector<row> rows;
  for (std::size_t mi = 0; mi < s.group_sizes.size(); ++mi) {
    const idx m = s.group_sizes[mi], G = s.batches, N = G * m;
    // The micro-batches: fresh samples (not the truth's), every layer normalized with the
    // true statistics, so each layer's input is distributed exactly as in the truth.
    std::vector<double> xs[depth];
    for (auto& x : xs) x.resize(std::size_t(N * width));
    rng r(s.seed, 2 + mi);
    double u[input_dim];
    for (idx i = 0; i < N; ++i) {
      net.sample_input(r, u);
      net.linear(0, u, xs[0].data() + i * width);
      for (int k = 1; k < depth; ++k)
        net.next_layer(k - 1, xs[k - 1].data() + i * width, xs[k].data() + i * width);
    }
    for (const method& me : methods)
      rows.push_back({me, m, run_method(backend, net, me, m, G, xs, s.skip_threshold)});
  }
  double floor_var[depth]{}, floor_mean[depth]{};
  transition_floor(backend, net, floor_var, floor_mean);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const std::string table = markdown(s, rows, floor_var, floor_mean, seconds);
  std::cout << table << std::flush;
  std::filesystem::create_directories(s.out);
  {
    std::ofstream md = open_output(s.out + "/estimation.md");
    md << table;
    check_written(md, s.out + "/estimation.md");
  }
  write_csv(s.out + "/estimation.csv", rows);
  write_gnuplot(s.out, s, rows);
  std::cout << "\nwrote " << s.out << "/estimation.md, estimation.csv, estimation.gp\n";
  if (s.plot) {
    if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
      std::cout << "gnuplot not found: no plot (install gnuplot-nox, then run gnuplot "
                   "estimation.gp in "
                << s.out << ")\n";
    } else {
      const std::string cmd = "cd '" + s.out + "' && gnuplot estimation.gp";
      if (std::system(cmd.c_str()) != 0) {
        std::cerr << "gnuplot failed\n";
        return 1;
      }
      std::cout << "wrote " << s.out << "/estimation.png\n";
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const settings s = parse(argc, argv);
#if BKN_ESTIMATION_HAS_EIGEN
    if (s.backend == "eigen") return run(bkn::eigen_backend{s.threads}, s);
#endif
    return run(bkn::reference_backend{}, s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bkn_estimation: %s\n", e.what());
    usage(stderr);
    return 2;
  }
}
