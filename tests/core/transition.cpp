// Tests of the transition through the host layer's weights (docs/math.md, "Transitions through
// the host layer's weights"): bkn::predict with transition<P>::linear / ::conv2d against
//  - Monte Carlo, the authors' method: draw the previous layer's values, apply the activation
//    and the actual layer (plain loops here), and measure the per-channel mean and variance
//    pooled over samples and output positions;
//  - the same moments written out per output position (no border classes), exactly;
// plus the border classes themselves (brute force), the validation of a weights transition,
// and a caller-supplied moment function.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>

#include "support/finite_difference.hpp"

namespace {

using bkn::index_t;
using P = double;
using vec = std::vector<P>;
using geometry = bkn::conv2d_geometry;


/// A host layer: W (C x C' x kh x kw, PyTorch's layout), b (C), its geometry.
struct host_layer {
  std::string name;
  geometry g;
  index_t channels, in_channels;
  vec weights, bias;

  index_t out_h() const { return g.out_height(); }
  index_t out_w() const { return g.out_width(); }
  index_t positions() const { return out_h() * out_w(); }
  P w(index_t c, index_t j, index_t u, index_t v) const {
    return weights[std::size_t(((c * in_channels + j) * g.kernel_height + u) * g.kernel_width + v)];
  }
  /// Input pixel (row, col) of output (i, k) and tap (u, v), or false when it is padding.
  bool tap(index_t i, index_t k, index_t u, index_t v, index_t& row, index_t& col) const {
    row = i * g.stride_height - g.pad_height + u;
    col = k * g.stride_width - g.pad_width + v;
    return row >= 0 && row < g.in_height && col >= 0 && col < g.in_width;
  }
  bkn::transition<P> transition(bkn::activation act, bkn::moment_function moments = nullptr) const {
    return bkn::transition<P>::conv2d(bkn::span<const P>(weights.data(), index_t(weights.size())),
                                      bkn::span<const P>(bias.data(), index_t(bias.size())),
                                      in_channels, g, act, moments);
  }
};

host_layer make_layer(std::string name, geometry g, index_t channels, index_t in_channels,
                      std::uint64_t seed) {
  host_layer L{std::move(name), g, channels, in_channels, {}, {}};
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  // Weights with a positive mean (0.2 +- 0.5): the taps that padding removes change the mean
  // of every channel, not only by chance.
  L.weights.resize(std::size_t(channels * in_channels * g.taps()));
  for (P& w : L.weights) w = 0.2 + 0.5 * normal(rng);
  L.bias.resize(std::size_t(channels));
  for (P& b : L.bias) b = 0.3 * normal(rng);
  return L;
}

geometry linear_geometry() { return {}; }
geometry conv(index_t ih, index_t iw, index_t kh, index_t kw, index_t sh, index_t sw, index_t ph,
              index_t pw) {
  geometry g;
  g.in_height = ih;
  g.in_width = iw;
  g.kernel_height = kh;
  g.kernel_width = kw;
  g.stride_height = sh;
  g.stride_width = sw;
  g.pad_height = ph;
  g.pad_width = pw;
  return g;
}

/// The layer's output for one sample: out[c][i][k] = b_c + sum W[c, j, u, v] in[j][row][col]
/// over the taps inside the input (zero padding). The valid (input pixel, tap) pairs of every
/// output position are listed once, so the Monte Carlo's inner loop is a plain dot product.
class conv_forward {
 public:
  explicit conv_forward(const host_layer& L) : L_(L) {
    for (index_t i = 0; i < L.out_h(); ++i)
      for (index_t k = 0; k < L.out_w(); ++k) {
        first_.push_back(pixel_.size());
        for (index_t u = 0; u < L.g.kernel_height; ++u)
          for (index_t v = 0; v < L.g.kernel_width; ++v) {
            index_t row, col;
            if (!L.tap(i, k, u, v, row, col)) continue;
            pixel_.push_back(row * L.g.in_width + col);
            tap_.push_back(u * L.g.kernel_width + v);
          }
      }
    first_.push_back(pixel_.size());
  }

  void operator()(const P* in, P* out) const {
    const index_t HW = L_.g.in_height * L_.g.in_width, T = L_.g.taps(), OP = L_.positions();
    for (index_t c = 0; c < L_.channels; ++c)
      for (index_t p = 0; p < OP; ++p) {
        double s = L_.bias[std::size_t(c)];
        for (index_t j = 0; j < L_.in_channels; ++j) {
          const P* w = L_.weights.data() + (c * L_.in_channels + j) * T;
          const P* x = in + j * HW;
          for (std::size_t t = first_[std::size_t(p)]; t < first_[std::size_t(p + 1)]; ++t)
            s += w[tap_[t]] * x[pixel_[t]];
        }
        out[c * OP + p] = s;
      }
  }

 private:
  const host_layer& L_;
  std::vector<std::size_t> first_;
  std::vector<index_t> pixel_, tap_;
};

struct moments {
  vec mean, var;
};

/// The exact pooled moments written per output position, without border classes: position p
/// has mean m_p = b + sum_{valid taps} W E[f] and variance q_p = sum_{valid taps} W^2 Var[f]
/// (independent inputs), and the channel's pooled moments are mean_p(m_p) and
/// mean_p(q_p) + mean_p((m_p - mu)^2). `r` is added to the variance.
moments per_position(const host_layer& L, const vec& e, const vec& var, const vec& r = {}) {
  moments out{vec(std::size_t(L.channels)), vec(std::size_t(L.channels))};
  const index_t OH = L.out_h(), OW = L.out_w();
  for (index_t c = 0; c < L.channels; ++c) {
    vec m, q;
    for (index_t i = 0; i < OH; ++i)
      for (index_t k = 0; k < OW; ++k) {
        double mp = L.bias[std::size_t(c)], qp = 0;
        for (index_t j = 0; j < L.in_channels; ++j)
          for (index_t u = 0; u < L.g.kernel_height; ++u)
            for (index_t v = 0; v < L.g.kernel_width; ++v) {
              index_t row, col;
              if (!L.tap(i, k, u, v, row, col)) continue;
              mp += L.w(c, j, u, v) * e[std::size_t(j)];
              qp += L.w(c, j, u, v) * L.w(c, j, u, v) * var[std::size_t(j)];
            }
        m.push_back(mp);
        q.push_back(qp);
      }
    double mu = 0, v = 0;
    for (const double x : m) mu += x / double(m.size());
    for (std::size_t p = 0; p < m.size(); ++p)
      v += (q[p] + (m[p] - mu) * (m[p] - mu)) / double(m.size());
    out.mean[std::size_t(c)] = mu;
    out.var[std::size_t(c)] = v + (r.empty() ? 0.0 : r[std::size_t(c)]);
  }
  return out;
}

/// The "averaged factor": every position treated as an interior one (the whole kernel's sums
/// of W and W^2), which ignores both the lower border means and the spread between them.
moments averaged_factor(const host_layer& L, const vec& e, const vec& var) {
  moments out{vec(std::size_t(L.channels)), vec(std::size_t(L.channels))};
  for (index_t c = 0; c < L.channels; ++c) {
    double m = L.bias[std::size_t(c)], v = 0;
    for (index_t j = 0; j < L.in_channels; ++j)
      for (index_t u = 0; u < L.g.kernel_height; ++u)
        for (index_t t = 0; t < L.g.kernel_width; ++t) {
          m += L.w(c, j, u, t) * e[std::size_t(j)];
          v += L.w(c, j, u, t) * L.w(c, j, u, t) * var[std::size_t(j)];
        }
    out.mean[std::size_t(c)] = m;
    out.var[std::size_t(c)] = v;
  }
  return out;
}

/// Border classes' means with the within-class variances but without the spread between the
/// classes: mean_p(q_p) alone (a plausible mistake in the pooled variance).
moments without_spread(const host_layer& L, const vec& e, const vec& var) {
  moments out = per_position(L, e, var);
  const moments none = per_position(L, e, vec(var.size(), 0.0));  // the spread alone
  for (std::size_t c = 0; c < out.var.size(); ++c) out.var[c] -= none.var[c];
  return out;
}

bkn::gaussian_view<const P> const_gaussian(const vec& mean, const vec& cov, index_t groups,
                                           index_t channels) {
  return {bkn::span<const P>(mean.data(), index_t(mean.size())),
          bkn::span<const P>(cov.data(), index_t(cov.size())), groups, channels};
}
bkn::gaussian_view<P> gaussian(vec& mean, vec& cov, index_t groups, index_t channels) {
  return {bkn::span<P>(mean.data(), index_t(mean.size())),
          bkn::span<P>(cov.data(), index_t(cov.size())), groups, channels};
}

/// bkn::predict through the layer for `groups` groups from a prior of `prior_groups` groups
/// (diagonal mode), with process noise logits `noise` (empty: R = 0).
moments predict(const host_layer& L, const bkn::transition<P>& A, const vec& prior_mean,
                const vec& prior_var, index_t groups = 1, index_t prior_groups = 1,
                const vec& noise = {}) {
  const bkn::reference_backend backend;
  bkn::options opt;
  opt.group_size = 1;  // the workspace for `groups` groups of one sample
  const bkn::tensor_shape shape{groups, L.channels, L.out_h(), L.out_w()};
  bkn::host_workspace workspace(bkn::workspace_size(backend, opt, shape, A));
  moments out{vec(std::size_t(groups * L.channels), -1.0),
              vec(std::size_t(groups * L.channels), -1.0)};
  bkn::predict(backend, opt, A, bkn::span<const P>(noise.data(), index_t(noise.size())),
               const_gaussian(prior_mean, prior_var, prior_groups, L.in_channels),
               gaussian(out.mean, out.var, groups, L.channels), workspace.bytes(), L.out_h(),
               L.out_w());
  return out;
}

vec relu_e(const vec& mean, const vec& var) {
  vec out;
  for (std::size_t j = 0; j < mean.size(); ++j)
    out.push_back(bkn::math::relu_moments(mean[j], var[j]).e);
  return out;
}
vec relu_var(const vec& mean, const vec& var) {
  vec out;
  for (std::size_t j = 0; j < mean.size(); ++j)
    out.push_back(bkn::math::relu_moments(mean[j], var[j]).var);
  return out;
}

// ---- Monte Carlo ------------------------------------------------------------------------------

/// The per-channel mean and variance of the layer's output pooled over `samples` samples and
/// all output positions, with their standard errors. Output positions of one sample are
/// correlated (overlapping receptive fields share inputs), so the standard errors come from
/// per-sample statistics, which are independent: with x' = x - K_c (K_c: a centring constant)
///   m_n = mean_p x'_{n,p},  q_n = mean_p x'^2_{n,p},
///   mean = K + mbar,  var = qbar - mbar^2   (the pooled, biased variance, as a batch measures),
///   se(mean) = sd(m) / sqrt(N),  se(var) = sd(q - 2 mbar m) / sqrt(N)  (delta method).
struct sampled {
  vec mean, var, se_mean, se_var;
};

/// Draws z ~ N(prior) independently per input position and channel, and returns the sampled
/// moments through ReLU ([0]) and through no activation ([1]), from the same draws.
std::vector<sampled> monte_carlo(const host_layer& L, const vec& prior_mean, const vec& prior_var,
                                 const vec& centre_relu, const vec& centre_none, index_t samples,
                                 std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  const index_t C = L.channels, Cin = L.in_channels, HW = L.g.in_height * L.g.in_width;
  const index_t OP = L.positions();
  vec z(std::size_t(Cin * HW)), fz(z.size()), out(std::size_t(C * OP));
  const conv_forward layer(L);
  struct sums {
    double m = 0, mm = 0, q = 0, qq = 0, mq = 0;
  };
  std::vector<sums> acc(std::size_t(2 * C));
  for (index_t n = 0; n < samples; ++n) {
    for (index_t j = 0; j < Cin; ++j) {
      const double mu = prior_mean[std::size_t(j)], s = std::sqrt(prior_var[std::size_t(j)]);
      for (index_t p = 0; p < HW; ++p) z[std::size_t(j * HW + p)] = mu + s * normal(rng);
    }
    for (int a = 0; a < 2; ++a) {
      for (std::size_t i = 0; i < z.size(); ++i) fz[i] = a == 0 ? std::max(z[i], 0.0) : z[i];
      layer(fz.data(), out.data());
      const vec& centre = a == 0 ? centre_relu : centre_none;
      for (index_t c = 0; c < C; ++c) {
        double m = 0, q = 0;
        for (index_t p = 0; p < OP; ++p) {
          const double x = out[std::size_t(c * OP + p)] - centre[std::size_t(c)];
          m += x;
          q += x * x;
        }
        m /= double(OP);
        q /= double(OP);
        sums& s = acc[std::size_t(a * C + c)];
        s.m += m;
        s.mm += m * m;
        s.q += q;
        s.qq += q * q;
        s.mq += m * q;
      }
    }
  }
  std::vector<sampled> result(2);
  const double N = double(samples);
  for (int a = 0; a < 2; ++a) {
    const vec& centre = a == 0 ? centre_relu : centre_none;
    sampled& r = result[std::size_t(a)];
    for (index_t c = 0; c < C; ++c) {
      const sums& s = acc[std::size_t(a * C + c)];
      const double mbar = s.m / N, qbar = s.q / N;
      const double var_m = s.mm / N - mbar * mbar, var_q = s.qq / N - qbar * qbar;
      const double cov_mq = s.mq / N - mbar * qbar;
      const double var_t = var_q - 4 * mbar * cov_mq + 4 * mbar * mbar * var_m;
      r.mean.push_back(centre[std::size_t(c)] + mbar);
      r.var.push_back(qbar - mbar * mbar);
      r.se_mean.push_back(std::sqrt(var_m / N));
      r.se_var.push_back(std::sqrt(var_t / N));
    }
  }
  return result;
}

/// The largest |prediction - sample| / standard error over the channels, means and variances.
double worst_z(const moments& predicted, const sampled& s, std::string& where) {
  double worst = 0;
  for (std::size_t c = 0; c < s.mean.size(); ++c) {
    const double zm = std::abs(predicted.mean[c] - s.mean[c]) / s.se_mean[c];
    const double zv = std::abs(predicted.var[c] - s.var[c]) / s.se_var[c];
    if (zm > worst) {
      worst = zm;
      where = "mean of channel " + std::to_string(c);
    }
    if (zv > worst) {
      worst = zv;
      where = "variance of channel " + std::to_string(c);
    }
  }
  return worst;
}

}  // namespace

TEST_CASE("weights transition: bkn::predict matches Monte Carlo through the actual layer") {
  // The bound: every predicted mean and variance within kBound = 5 standard errors of the
  // sampled one. The standard errors are measured from the samples (per-sample statistics,
  // see monte_carlo). 5 SE: for 4 layers x 2 activations x 3 channels x 2 moments = 48
  // comparisons, a correct prediction fails with probability < 48 * 5.7e-7 = 3e-5 for a fresh
  // seed (the seed is fixed, so the test is deterministic). The sampled variance's O(1/N)
  // bias (var / (N P) ~ 1e-6 var) is far below one SE (~ var / sqrt(N) ~ 2e-3 var).
  constexpr double kBound = 5;
  struct mc_case {
    host_layer layer;
    vec prior_mean, prior_var;
    index_t samples;
    bool padded;
  };
  const vec conv_mean{0.4, -0.7}, conv_var{1.3, 0.6};
  std::vector<mc_case> cases;
  cases.push_back({make_layer("linear 4 -> 3", linear_geometry(), 3, 4, 11),
                   {0.5, -0.3, 1.2, 0.0},
                   {1.0, 0.5, 0.2, 2.0},
                   1000000,
                   false});
  cases.push_back({make_layer("3x3 'same' on 6x6, 2 -> 3", conv(6, 6, 3, 3, 1, 1, 1, 1), 3, 2, 12),
                   conv_mean, conv_var, 200000, true});
  cases.push_back(
      {make_layer("3x2 stride 2 pad 1 on 5x4, 2 -> 3", conv(5, 4, 3, 2, 2, 2, 1, 1), 3, 2, 13),
       conv_mean, conv_var, 200000, true});
  cases.push_back(
      {make_layer("2x2 stride 2 no padding on 6x4, 2 -> 3", conv(6, 4, 2, 2, 2, 2, 0, 0), 3, 2, 14),
       conv_mean, conv_var, 200000, false});
  std::uint64_t seed = 2024;
  std::string summary = "Monte Carlo, |prediction - sample| in standard errors:";
  for (const mc_case& mc : cases) {
    const host_layer& L = mc.layer;
    INFO("layer: ", L.name, ", ", mc.samples, " samples");
    const moments relu =
        predict(L, L.transition(bkn::activation::relu), mc.prior_mean, mc.prior_var);
    const moments none =
        predict(L, L.transition(bkn::activation::none), mc.prior_mean, mc.prior_var);
    const auto sampled_moments =
        monte_carlo(L, mc.prior_mean, mc.prior_var, relu.mean, none.mean, mc.samples, seed++);
    for (int a = 0; a < 2; ++a) {
      const sampled& s = sampled_moments[std::size_t(a)];
      const moments& predicted = a == 0 ? relu : none;
      INFO("activation: ", a == 0 ? "relu" : "none");
      std::string where;
      const double z = worst_z(predicted, s, where);
      INFO("worst deviation: ", z, " standard errors (", where, ")");
      CHECK(z <= kBound);

      // The same Monte Carlo rejects the averaged factor (interior tap sums at every position)
      // wherever padding makes border positions see fewer taps; without padding there is one
      // border class and it is exact.
      const vec e = a == 0 ? relu_e(mc.prior_mean, mc.prior_var) : mc.prior_mean;
      const vec v = a == 0 ? relu_var(mc.prior_mean, mc.prior_var) : mc.prior_var;
      std::string where_avg, where_spread;
      const double z_avg = worst_z(averaged_factor(L, e, v), s, where_avg);
      const double z_spread = worst_z(without_spread(L, e, v), s, where_spread);
      INFO("averaged factor: ", z_avg, " standard errors (", where_avg,
           "); without the spread between border classes: ", z_spread, " (", where_spread, ")");
      summary += "\n  " + L.name + (a == 0 ? ", relu" : ", none") + ": bkn within " +
                 std::to_string(z) + " SE; averaged factor " + std::to_string(z_avg) +
                 " SE; no between-class spread " + std::to_string(z_spread) + " SE";
      if (mc.padded) {
        CHECK(z_avg > 4 * kBound);
        CHECK(z_spread > 2 * kBound);
      } else {
        CHECK(z_avg <= kBound);
      }
    }
  }
  MESSAGE(summary);
}

TEST_CASE("weights transition: bkn::predict equals the moments written per output position") {
  // Exact (no sampling): per_position() sums over each output position's valid taps directly,
  // bkn over border classes; both are the same sums in a different order, so they agree to
  // rounding (1e-12 relative; measured below 7e-16). Includes positions that see no tap at all
  // (padding >= kernel: those outputs are the bias), several groups with their own priors or
  // one shared prior, and process noise r = softplus(noise).
  const host_layer layers[] = {
      make_layer("linear 5 -> 3", linear_geometry(), 3, 5, 21),
      make_layer("3x3 'same' on 6x6", conv(6, 6, 3, 3, 1, 1, 1, 1), 3, 2, 22),
      make_layer("3x2 stride 2 pad 1 on 5x4", conv(5, 4, 3, 2, 2, 2, 1, 1), 2, 3, 23),
      make_layer("2x2 stride 2 on 6x6", conv(6, 6, 2, 2, 2, 2, 0, 0), 3, 2, 24),
      make_layer("5x5 pad 2 on 4x3 (kernel wider than the input)", conv(4, 3, 5, 5, 1, 1, 2, 2), 2,
                 2, 25),
      make_layer("2x2 pad 2 on 3x3 (border rows with no tap)", conv(3, 3, 2, 2, 1, 1, 2, 2), 2, 2,
                 26),
      make_layer("1x3 stride 3 pad 1 on 1x7", conv(1, 7, 1, 3, 1, 3, 0, 1), 2, 2, 27),
  };
  const vec noise_logits{-1.0, 0.5, 2.0};
  for (const host_layer& L : layers) {
    INFO("layer: ", L.name);
    const index_t G = 3, Cin = L.in_channels, C = L.channels;
    std::mt19937_64 rng(99);
    std::normal_distribution<double> normal;
    vec mean(std::size_t(G * Cin)), var(std::size_t(G * Cin));
    for (P& m : mean) m = normal(rng);
    for (P& v : var) v = 0.1 + std::abs(normal(rng));
    const vec noise(noise_logits.begin(), noise_logits.begin() + C);
    vec r;
    for (const double n : noise) r.push_back(bkn::math::softplus(n));
    for (const bkn::activation act : {bkn::activation::relu, bkn::activation::none})
      for (const bool shared : {false, true}) {
        INFO((act == bkn::activation::relu ? "relu" : "none"),
             (shared ? ", shared prior" : ", per-group priors"));
        const index_t PG = shared ? 1 : G;
        const vec pm(mean.begin(), mean.begin() + PG * Cin),
            pv(var.begin(), var.begin() + PG * Cin);
        const moments got = predict(L, L.transition(act), pm, pv, G, PG, noise);
        for (index_t g = 0; g < G; ++g) {
          const index_t pg = shared ? 0 : g;
          const vec m(pm.begin() + pg * Cin, pm.begin() + (pg + 1) * Cin);
          const vec v(pv.begin() + pg * Cin, pv.begin() + (pg + 1) * Cin);
          const moments want = act == bkn::activation::relu
                                   ? per_position(L, relu_e(m, v), relu_var(m, v), r)
                                   : per_position(L, m, v, r);
          for (index_t c = 0; c < C; ++c) {
            CAPTURE(g);
            CAPTURE(c);
            const std::size_t i = std::size_t(g * C + c), k = std::size_t(c);
            CHECK(std::abs(got.mean[i] - want.mean[k]) <= 1e-12 * (1 + std::abs(want.mean[k])));
            CHECK(std::abs(got.var[i] - want.var[k]) <= 1e-12 * want.var[k]);
          }
        }
      }
  }
}

TEST_CASE("border classes: counts cover every output position, taps are exactly the valid ones") {
  const geometry geometries[] = {
      linear_geometry(),
      conv(6, 6, 3, 3, 1, 1, 1, 1),  // 'same': 3 x 3 bands (4 corners, 4 edges, interior)
      conv(5, 4, 3, 2, 2, 2, 1, 1),  // uneven borders
      conv(6, 6, 2, 2, 2, 2, 0, 0),  // no padding: one class
      conv(4, 3, 5, 5, 1, 1, 2, 2),  // kernel wider than the input
      conv(3, 3, 2, 2, 1, 1, 2, 2),  // border positions with no valid tap
      conv(1, 7, 1, 3, 1, 3, 0, 1),  // stride 3: right border loses a tap
      conv(9, 8, 4, 3, 2, 3, 3, 2),  // even kernel, larger padding
      conv(7, 7, 7, 7, 1, 1, 3, 3),  // 7x7 'same': 7 bands per axis
      conv(2, 2, 1, 1, 1, 1, 0, 0),  // 1x1 convolution
  };
  for (const geometry& g : geometries) {
    INFO("geometry: in ", g.in_height, "x", g.in_width, ", kernel ", g.kernel_height, "x",
         g.kernel_width, ", stride ", g.stride_height, "x", g.stride_width, ", pad ", g.pad_height,
         "x", g.pad_width);
    const bkn::detail::border_classes b = bkn::detail::make_border_classes(g);
    const index_t OH = g.out_height(), OW = g.out_width();
    REQUIRE(b.count() >= 1);
    CHECK(b.positions == OH * OW);
    // Counts: the bands of each axis cover its outputs once; the classes all positions.
    index_t rows = 0, cols = 0, total = 0;
    double weights = 0;
    for (index_t r = 0; r < b.rows; ++r) rows += b.row[r].count;
    for (index_t c = 0; c < b.cols; ++c) cols += b.col[c].count;
    for (index_t k = 0; k < b.count(); ++k) {
      total += b.row[k / b.cols].count * b.col[k % b.cols].count;
      weights += b.weight(k);
    }
    CHECK(rows == OH);
    CHECK(cols == OW);
    CHECK(total == OH * OW);
    CHECK(std::abs(weights - 1) <= 1e-15);
    // Bands are consecutive runs of outputs: output i is in the band whose run contains it.
    // For every position, its class must cover exactly the taps that land inside the input.
    host_layer L{"", g, 1, 1, {}, {}};
    index_t band_r = 0, start_r = 0;
    for (index_t i = 0; i < OH; ++i) {
      if (i >= start_r + b.row[band_r].count) start_r += b.row[band_r++].count;
      index_t band_c = 0, start_c = 0;
      for (index_t j = 0; j < OW; ++j) {
        if (j >= start_c + b.col[band_c].count) start_c += b.col[band_c++].count;
        const index_t k = band_r * b.cols + band_c;
        for (index_t u = 0; u < g.kernel_height; ++u)
          for (index_t v = 0; v < g.kernel_width; ++v) {
            index_t row, col;
            const bool valid = L.tap(i, j, u, v, row, col);
            if (b.covers(k, u, v) != valid) {
              CAPTURE(i);
              CAPTURE(j);
              CAPTURE(u);
              CAPTURE(v);
              CHECK(b.covers(k, u, v) == valid);
            }
          }
      }
    }
  }
  // 'same' 3x3: 9 classes with the shares 1/36 (corners), 4/36 (edges), 16/36 (interior).
  const auto same = bkn::detail::make_border_classes(conv(6, 6, 3, 3, 1, 1, 1, 1));
  CHECK(same.count() == 9);
  CHECK(same.weight(4) == doctest::Approx(16.0 / 36).epsilon(1e-15));
  CHECK(same.weight(0) == doctest::Approx(1.0 / 36).epsilon(1e-15));
  CHECK(same.weight(1) == doctest::Approx(4.0 / 36).epsilon(1e-15));
}

TEST_CASE("border classes: more distinct border patterns than supported is an invalid argument") {
  // A 40-tall kernel with padding 39 over a 1-pixel-tall input: 40 output rows, each with its
  // own set of valid taps, more than border_classes::max_bands (16).
  const geometry g = conv(1, 1, 40, 1, 1, 1, 39, 0);
  REQUIRE(g.out_height() == 40);
  CHECK_THROWS_AS(bkn::detail::make_border_classes(g), bkn::invalid_argument);
  const vec w(std::size_t(40)), b(1);
  const auto A = bkn::transition<P>::conv2d(bkn::span<const P>(w.data(), 40),
                                            bkn::span<const P>(b.data(), 1), 1, g);
  bkn::options opt;
  try {
    (void)bkn::workspace_size(bkn::reference_backend{}, opt, {1, 1, 40, 1}, A);
    FAIL("expected bkn::invalid_argument");
  } catch (const bkn::invalid_argument& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).find("16") != std::string::npos);
  }
}

// ---- Validation -------------------------------------------------------------------------------

namespace {

/// Runs `call`, requires a bkn::invalid_argument whose argument() is `argument` and whose
/// what() contains every string of `needles`.
template <class F>
void check_rejects(F call, const std::string& routine, const std::string& argument,
                   const std::vector<std::string>& needles) {
  try {
    call();
    FAIL("expected bkn::invalid_argument naming ", argument);
  } catch (const bkn::invalid_argument& e) {
    const std::string what = e.what();
    INFO("what(): ", what);
    CHECK(std::string(e.routine()) == routine);
    CHECK(std::string(e.argument()) == argument);
    CHECK(what.find(routine + ": " + argument + ": ") == 0);
    for (const std::string& n : needles) {
      INFO("looking for: ", n);
      CHECK(what.find(n) != std::string::npos);
    }
  }
}

}  // namespace

TEST_CASE("weights transition: invalid arguments name params.transition with expected and got") {
  const bkn::reference_backend backend;
  const host_layer L =
      make_layer("3x3 'same' on 6x6, 2 -> 3", conv(6, 6, 3, 3, 1, 1, 1, 1), 3, 2, 31);
  const index_t C = 3, Cin = 2;
  const vec pm{0.1, 0.2}, pv{1.0, 1.0};
  vec mean(std::size_t(C), -7.0), var(std::size_t(C), -7.0);
  bkn::options opt;
  const bkn::transition<P> good = L.transition(bkn::activation::relu);
  bkn::host_workspace workspace(bkn::workspace_size(backend, opt, {1, C, 6, 6}, good));
  const auto run = [&](const bkn::transition<P>& A, index_t h, index_t w,
                       bkn::options o = bkn::options()) {
    return [&, A, h, w, o] {
      bkn::predict(backend, o, A, bkn::span<const P>(), const_gaussian(pm, pv, 1, Cin),
                   gaussian(mean, var, 1, C), workspace.bytes(), h, w);
    };
  };
  // The valid call works (and is the baseline the others differ from in one thing).
  run(good, 6, 6)();
  CHECK(var[0] > 0);
  std::fill(mean.begin(), mean.end(), -7.0);
  std::fill(var.begin(), var.end(), -7.0);

  SUBCASE("the convolution's output size differs from the layer's H x W") {
    check_rejects(run(good, 5, 6), "bkn::predict", "params.transition", {"6x6", "5x6"});
    check_rejects(run(good, 1, 1), "bkn::predict", "params.transition", {"6x6", "1x1"});
  }
  SUBCASE("wrong number of weights") {
    const auto A = bkn::transition<P>::conv2d(bkn::span<const P>(L.weights.data(), 53),
                                              bkn::span<const P>(L.bias.data(), C), Cin, L.g);
    check_rejects(run(A, 6, 6), "bkn::predict", "params.transition", {"expected", "54", "got 53"});
    const auto wrong_cin = bkn::transition<P>::conv2d(bkn::span<const P>(L.weights.data(), 54),
                                                      bkn::span<const P>(L.bias.data(), C), 3, L.g);
    check_rejects(run(wrong_cin, 6, 6), "bkn::predict", "params.transition",
                  {"expected", "81", "got 54"});
  }
  SUBCASE("wrong bias size") {
    const auto A = bkn::transition<P>::conv2d(bkn::span<const P>(L.weights.data(), 54),
                                              bkn::span<const P>(L.bias.data(), 2), Cin, L.g);
    check_rejects(run(A, 6, 6), "bkn::predict", "params.transition.bias", {"expected 3", "got 2"});
  }
  SUBCASE("activation::custom without a moment function") {
    check_rejects(run(L.transition(bkn::activation::custom), 6, 6), "bkn::predict",
                  "params.transition", {"custom", "moment_function"});
  }
  SUBCASE("full-covariance mode with an activation or a convolution") {
    bkn::options full;
    full.mode = bkn::covariance::full;
    vec fmean(static_cast<std::size_t>(C)), fcov(static_cast<std::size_t>(C * C), -7.0);
    const vec fpm{0.1, 0.2}, fpc{1.0, 0.0, 0.0, 1.0};
    const host_layer lin = make_layer("linear 2 -> 3", linear_geometry(), 3, 2, 32);
    const auto full_run = [&](const bkn::transition<P>& A, index_t h, index_t w) {
      return [&, A, h, w] {
        bkn::host_workspace ws(bkn::workspace_size(backend, full, {1, C, h, w}, A));
        bkn::predict(backend, full, A, bkn::span<const P>(), const_gaussian(fpm, fpc, 1, Cin),
                     gaussian(fmean, fcov, 1, C), ws.bytes(), h, w);
      };
    };
    check_rejects(full_run(lin.transition(bkn::activation::relu), 1, 1), "bkn::predict",
                  "params.transition", {"full-covariance", "activation::none"});
    check_rejects(full_run(L.transition(bkn::activation::none), 6, 6), "bkn::predict",
                  "params.transition", {"full-covariance", "no convolution"});
    CHECK(fcov[0] == -7.0);
    // A linear layer without activation is an affine map: exactly W Sigma W^T in full mode.
    full_run(lin.transition(bkn::activation::none), 1, 1)();
    for (index_t c = 0; c < C; ++c) {
      const double w0 = lin.w(c, 0, 0, 0), w1 = lin.w(c, 1, 0, 0);
      const double want_mean = lin.bias[std::size_t(c)] + 0.1 * w0 + 0.2 * w1;
      CHECK(std::abs(fmean[std::size_t(c)] - want_mean) <= 1e-14);
      CHECK(std::abs(fcov[std::size_t(c * C + c)] - (w0 * w0 + w1 * w1)) <= 1e-14);
    }
  }
  // Nothing was written by a rejected call.
  CHECK(std::all_of(mean.begin(), mean.end(), [](P v) { return v == -7.0; }));
  CHECK(std::all_of(var.begin(), var.end(), [](P v) { return v == -7.0; }));
}

TEST_CASE("weights transition: bkn::forward validates the transition against x's H x W") {
  // Through the layer API: layer_storage's weights transition for a 3x3 'same' conv on 6x6,
  // called with x of 5x6 pixels.
  const bkn::reference_backend backend;
  bkn::layer_config cfg;
  cfg.channels = 3;
  cfg.in_channels = 2;
  cfg.transition = bkn::transition_kind::weights;
  cfg.conv = conv(6, 6, 3, 3, 1, 1, 1, 1);
  bkn::layer_storage<P> s(cfg);
  const vec pm{0.1, 0.2}, pv{1.0, 1.0};
  vec x(std::size_t(2 * 3 * 5 * 6), 0.5), y(x.size(), -7.0);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(double(i));
  bkn::options opt;
  bkn::host_workspace ws(
      bkn::workspace_size(backend, opt, {2, 3, 6, 6}, s.view().params.transition) * 2);
  check_rejects(
      [&] {
        bkn::forward(backend, opt, s.view(), bkn::nchw<const P>(x.data(), 2, 3, 5, 6),
                     bkn::nchw(y.data(), 2, 3, 5, 6), const_gaussian(pm, pv, 1, 2), ws.bytes());
      },
      "bkn::forward", "params.transition", {"6x6", "5x6"});
  CHECK(std::all_of(y.begin(), y.end(), [](P v) { return v == -7.0; }));
}

// ---- A caller-supplied moment function ---------------------------------------------------------

namespace {

int tanh_calls = 0;

/// The host's own activation for activation::custom, counting its calls.
bkn::math::activation_moments tanh_moments(double mu, double v) {
  ++tanh_calls;
  return bkn_test::tanh_moments(mu, v);
}

}  // namespace

TEST_CASE("weights transition: activation::custom uses the caller's moment function") {
  const host_layer layers[] = {
      make_layer("linear 4 -> 3", linear_geometry(), 3, 4, 41),
      make_layer("3x2 stride 2 pad 1 on 5x4", conv(5, 4, 3, 2, 2, 2, 1, 1), 2, 4, 42),
  };
  const vec pm{0.5, -1.2, 0.0, 2.0}, pv{0.3, 1.5, 0.01, 4.0};
  vec e, v;
  for (std::size_t j = 0; j < pm.size(); ++j) {
    const auto t = tanh_moments(pm[j], pv[j]);
    e.push_back(t.e);
    v.push_back(t.var);
  }
  // tanh's moments are not ReLU's nor the identity's: the test tells them apart.
  CHECK(std::abs(e[1] - bkn::math::relu_moments(pm[1], pv[1]).e) > 0.1);
  CHECK(std::abs(v[3] - pv[3]) > 1);
  for (const host_layer& L : layers) {
    INFO("layer: ", L.name);
    tanh_calls = 0;
    const moments got = predict(L, L.transition(bkn::activation::custom, &tanh_moments), pm, pv);
    CHECK(tanh_calls == 4);  // once per prior channel
    const moments want = per_position(L, e, v);
    const moments relu = predict(L, L.transition(bkn::activation::relu), pm, pv);
    for (std::size_t c = 0; c < want.mean.size(); ++c) {
      CAPTURE(c);
      CHECK(std::abs(got.mean[c] - want.mean[c]) <= 1e-12 * (1 + std::abs(want.mean[c])));
      CHECK(std::abs(got.var[c] - want.var[c]) <= 1e-12 * want.var[c]);
      CHECK(std::abs(got.mean[c] - relu.mean[c]) > 1e-3);
    }
  }
}
