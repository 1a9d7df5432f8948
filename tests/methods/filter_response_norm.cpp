// Tests of filter response normalization (include/bkn/methods/filter_response_norm.hpp) on the
// reference backend: outputs against the paper's definition written here, every gradient (x,
// gamma, beta, tau, a fixed or learned eps) against central finite differences in double away
// from the TLU's kink, the gradient at a tie, each layout, validation leaving every output byte
// unchanged, N = 0 and in-place calls.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bkn/backends/reference.hpp"
#include "bkn/methods/filter_response_norm.hpp"
#include "bkn/storage.hpp"
#include "support/finite_difference.hpp"
#include "support/sentinel_tensor.hpp"
#include "support/thrown.hpp"

namespace {

using bkn::index_t;
using bkn::span;
using B = bkn::reference_backend;
namespace frn = bkn::filter_response_norm;

using layout = bkn_test::padded_layout;
using bkn_test::padded_layout_name;

template <class T>
using tensor = bkn_test::sentinel_tensor<T>;

template <class T>
void fill_random(tensor<T>& t, std::mt19937& rng, double offset_per_channel, double scale) {
  std::normal_distribution<double> normal;
  const bkn::tensor_shape& s = t.view.shape();
  for (index_t n = 0; n < s.batch; ++n)
    for (index_t c = 0; c < s.channels; ++c)
      for (index_t k = 0; k < s.spatial(); ++k)
        t.view.at(n, c, k) = T(offset_per_channel * double(c) + scale * normal(rng));
}

/// The paper's definition, in double: y before the TLU, at [((n * C + c) * H + h) * W + w].
template <class T, class P>
std::vector<double> direct_frn(const tensor<T>& x, const std::vector<P>& gamma,
                               const std::vector<P>& beta, const std::vector<P>& learned,
                               double epsilon, std::vector<double>* nu2_out = nullptr) {
  const bkn::tensor_shape& s = x.view.shape();
  const index_t N = s.batch, C = s.channels, HW = s.spatial();
  std::vector<double> y(std::size_t(N * C * HW));
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c) {
      double nu2 = 0;
      for (index_t k = 0; k < HW; ++k) nu2 += std::pow(double(x.view.at(n, c, k)), 2);
      nu2 /= double(HW);
      if (nu2_out) nu2_out->push_back(nu2);
      double eps = epsilon;
      if (!learned.empty())
        eps += std::abs(double(learned[learned.size() == 1 ? 0 : std::size_t(c)]));
      for (index_t k = 0; k < HW; ++k)
        y[std::size_t((n * C + c) * HW + k)] =
            double(gamma[std::size_t(c)]) * double(x.view.at(n, c, k)) / std::sqrt(nu2 + eps) +
            double(beta[std::size_t(c)]);
    }
  return y;
}

/// Per channel, a threshold in the middle of the widest gap between the channel's values of y
/// in their central 60%: both sides of the TLU are exercised and no value is near the kink.
std::vector<double> thresholds_away_from(const std::vector<double>& y, index_t N, index_t C,
                                         index_t HW, double* margin) {
  std::vector<double> tau(static_cast<std::size_t>(C));
  *margin = 1e300;
  for (index_t c = 0; c < C; ++c) {
    std::vector<double> v;
    for (index_t n = 0; n < N; ++n)
      for (index_t k = 0; k < HW; ++k) v.push_back(y[std::size_t((n * C + c) * HW + k)]);
    std::sort(v.begin(), v.end());
    const std::size_t lo = v.size() / 5, hi = std::max(lo + 1, v.size() - v.size() / 5);
    std::size_t best = lo;
    for (std::size_t i = lo; i + 1 < hi && i + 1 < v.size(); ++i)
      if (v[i + 1] - v[i] > v[best + 1] - v[best]) best = i;
    tau[std::size_t(c)] = 0.5 * (v[best] + v[best + 1]);
    *margin = std::min(*margin, 0.5 * (v[best + 1] - v[best]));
  }
  return tau;
}

struct frn_case {
  index_t N, C, H, W;
  layout storage;
  bool tlu;
  int learned;  // 0: fixed eps, 1: per layer, 2: per channel
};

std::string describe(const frn_case& f) {
  return std::string(padded_layout_name(f.storage)) + " N=" + std::to_string(f.N) +
         " C=" + std::to_string(f.C) +
         " HxW=" + std::to_string(f.H) + "x" + std::to_string(f.W) + (f.tlu ? " TLU" : "") +
         (f.learned == 0 ? " fixed eps" : f.learned == 1 ? " learned eps" : " per-channel eps");
}

}  // namespace

TEST_CASE_TEMPLATE("filter_response_norm: forward equals the definition", T, float, double) {
  const double tolerance = std::is_same_v<T, double> ? 1e-12 : 1e-5;
  std::mt19937 rng(8);
  std::normal_distribution<double> normal;
  int cases = 0;
  const index_t spatial[][2] = {{1, 1}, {3, 4}, {5, 1}, {1, 6}, {7, 7}};
  for (index_t N : {1, 3})
    for (index_t C : {1, 5, 8})
      for (const auto& hw : spatial)
        for (layout l : {layout::nchw, layout::nhwc, layout::padded, layout::padded_last})
          for (bool tlu : {false, true})
            for (int learned : {0, 1, 2}) {
              const frn_case f{N, C, hw[0], hw[1], hw[0] * hw[1] == 1 ? layout::nc : l, tlu,
                               learned};
              if (hw[0] * hw[1] == 1 && l != layout::nchw) continue;
              CAPTURE(describe(f));
              tensor<T> x(f.storage, N, C, f.H, f.W, T(0)), y(f.storage, N, C, f.H, f.W, T(-7));
              fill_random(x, rng, 0.5, 1.0);
              std::vector<T> gamma, beta, tau, eps, nu2(std::size_t(N * C));
              for (index_t c = 0; c < C; ++c) {
                gamma.push_back(T(1 + 0.3 * normal(rng)));
                beta.push_back(T(0.5 * normal(rng)));
                tau.push_back(T(0.5 * normal(rng)));
              }
              if (learned) eps.assign(std::size_t(learned == 1 ? 1 : C), T(0));
              for (auto& e : eps) e = T(0.3 * normal(rng));
              frn::options opt;
              opt.tlu = tlu;
              frn::layer<T> L;
              L.params = {gamma, beta, tau, eps};
              L.saved = {nu2};
              bkn::host_workspace ws(frn::workspace_size(B{}, opt, x.view.shape()));
              const std::vector<T> untouched = y.memory;
              frn::forward(B{}, opt, L, x.cview(), y.view, ws.bytes());
              std::vector<double> want_nu2;
              const std::vector<double> want =
                  direct_frn(x, gamma, beta, eps, opt.epsilon, &want_nu2);
              double worst = 0;
              for (index_t n = 0; n < N; ++n)
                for (index_t c = 0; c < C; ++c)
                  for (index_t k = 0; k < f.H * f.W; ++k) {
                    double e = want[std::size_t((n * C + c) * f.H * f.W + k)];
                    if (tlu) e = std::max(e, double(tau[std::size_t(c)]));
                    T& got = y.view.at(n, c, k);
                    worst = std::max(worst, std::abs(double(got) - e) / (1 + std::abs(e)));
                    got = untouched[std::size_t(&got - y.memory.data())];
                  }
              CHECK(worst <= tolerance);
              CHECK(y.memory == untouched);
              for (std::size_t i = 0; i < nu2.size(); ++i)
                CHECK(double(nu2[i]) == doctest::Approx(want_nu2[i]).epsilon(tolerance));
              ++cases;
            }
  MESSAGE(cases << " cases");
}

namespace {

void check_gradients(const frn_case& f, bool keep_statistics, bool affine = true) {
  CAPTURE(describe(f));
  std::mt19937 rng(31 + unsigned(f.C * 5 + f.learned));
  std::normal_distribution<double> normal;
  const index_t N = f.N, C = f.C, H = f.H, W = f.W, HW = H * W;
  tensor<double> x(f.storage, N, C, H, W, 0.0), y(f.storage, N, C, H, W, 0.0);
  tensor<double> dy(f.storage, N, C, H, W, 0.0), dx(f.storage, N, C, H, W, 0.0);
  fill_random(x, rng, 0.4, 1.0);
  fill_random(dy, rng, 0.0, 1.0);
  std::vector<double> gamma(std::size_t(C), 1.0), beta(std::size_t(C), 0.0), learned;
  if (affine)
    for (index_t c = 0; c < C; ++c) {
      gamma[std::size_t(c)] = 1 + 0.3 * normal(rng);
      beta[std::size_t(c)] = 0.5 * normal(rng);
    }
  // Learned eps away from 0 (|.| has a kink there), of both signs.
  if (f.learned == 1) learned = {-0.4};
  if (f.learned == 2)
    for (index_t c = 0; c < C; ++c) learned.push_back((c % 2 ? -1 : 1) * (0.2 + 0.1 * double(c)));
  frn::options opt;
  opt.tlu = f.tlu;
  // One value per (n, c) makes y = gamma sign(x) + beta but for eps: give a fixed eps weight.
  if (HW == 1 && f.learned == 0) opt.epsilon = 0.3;
  double margin = 0;
  std::vector<double> tau =
      thresholds_away_from(direct_frn(x, gamma, beta, learned, opt.epsilon), N, C, HW, &margin);
  CAPTURE(margin);
  REQUIRE(margin > 1e-3);
  std::vector<double> dgamma(gamma.size()), dbeta(beta.size()), dtau(tau.size());
  std::vector<double> dlearned(learned.size()), nu2;
  if (keep_statistics) nu2.assign(std::size_t(N * C), 0.0);
  frn::layer<double> L;
  L.params = {affine ? span<const double>(gamma) : span<const double>(),
              affine ? span<const double>(beta) : span<const double>(), tau, learned};
  L.grads = {affine ? span<double>(dgamma) : span<double>(),
             affine ? span<double>(dbeta) : span<double>(), dtau, dlearned};
  L.saved = {nu2};
  bkn::host_workspace ws(frn::workspace_size(B{}, opt, x.view.shape()));
  auto loss = [&] {
    frn::forward(B{}, opt, L, x.cview(), y.view, ws.bytes());
    double l = 0;
    for (index_t n = 0; n < N; ++n)
      for (index_t c = 0; c < C; ++c)
        for (index_t k = 0; k < HW; ++k) l += dy.view.at(n, c, k) * y.view.at(n, c, k);
    return l;
  };
  loss();
  frn::backward(B{}, opt, L, x.cview(), dy.cview(), dx.view, ws.bytes());
  std::vector<double*> entries;
  std::vector<double> analytic;
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c)
      for (index_t k = 0; k < HW; ++k) {
        entries.push_back(&x.view.at(n, c, k));
        analytic.push_back(dx.view.at(n, c, k));
      }
  bkn_test::check_gradient("dx", entries, analytic, loss);
  if (affine) {
    bkn_test::check_gradient("dgamma", bkn_test::pointers(gamma), dgamma, loss);
    bkn_test::check_gradient("dbeta", bkn_test::pointers(beta), dbeta, loss);
  }
  if (f.tlu)
    bkn_test::check_gradient("dtau", bkn_test::pointers(tau), dtau, loss);
  else
    CHECK(dtau == std::vector<double>(tau.size(), 0.0));  // written, zero
  if (!learned.empty())
    bkn_test::check_gradient("dlearned_epsilon", bkn_test::pointers(learned), dlearned, loss);
}

}  // namespace

TEST_CASE("filter_response_norm: gradients by finite differences") {
  int checks = 0;
  for (layout l : {layout::nchw, layout::nhwc, layout::padded, layout::padded_last})
    for (bool tlu : {false, true})
      for (int learned : {0, 1, 2}) {
        check_gradients({2, 3, 3, 4, l, tlu, learned}, true);
        ++checks;
      }
  // 1 x 1 activations (the paper's case for a learned eps), odd C, N = 1, single lines.
  for (bool tlu : {false, true})
    for (int learned : {0, 1, 2}) {
      check_gradients({6, 3, 1, 1, layout::nc, tlu, learned}, true);
      ++checks;
    }
  check_gradients({1, 5, 2, 5, layout::padded, true, 2}, true);
  check_gradients({2, 4, 1, 7, layout::nhwc, true, 1}, true);
  check_gradients({2, 3, 4, 3, layout::padded, true, 2}, false);   // nu2 recomputed
  check_gradients({2, 3, 4, 3, layout::nchw, true, 0}, true, false);  // no gamma, beta
  checks += 4;
  MESSAGE(checks << " configurations; worst relative error of every finite-difference check: "
                 << bkn_test::worst_seen);
}

TEST_CASE_TEMPLATE("filter_response_norm: at a tie y = tau the gradient goes to y", T, float,
                   double) {
  // One channel of 4 values; x = 0 gives y = beta = tau exactly.
  std::vector<T> x{T(0), T(1), T(2), T(-3)}, y(4), dz{T(1), T(2), T(3), T(4)}, dx(4);
  std::vector<T> gamma{T(1)}, beta{T(0.5)}, tau{T(0.5)}, dgamma(1), dbeta(1), dtau(1);
  frn::options opt;
  frn::layer<T> L{{gamma, beta, tau, {}}, {dgamma, dbeta, dtau, {}}, {}};
  const auto xv = bkn::tensor_view<const T>(bkn::nchw(x.data(), 1, 1, 2, 2));
  bkn::host_workspace ws(frn::workspace_size(B{}, opt, xv.shape()));
  frn::forward(B{}, opt, L, xv, bkn::nchw(y.data(), 1, 1, 2, 2), ws.bytes());
  CHECK(y[0] == T(0.5));
  CHECK(y[3] == T(0.5));  // below tau
  frn::backward(B{}, opt, L, xv, bkn::tensor_view<const T>(bkn::nchw(dz.data(), 1, 1, 2, 2)),
                bkn::nchw(dx.data(), 1, 1, 2, 2), ws.bytes());
  CHECK(double(dtau[0]) == doctest::Approx(4));   // only x = -3 is thresholded
  CHECK(double(dbeta[0]) == doctest::Approx(6));  // the tie's 1 went to y
}

TEST_CASE_TEMPLATE("filter_response_norm: backward without saved nu2 equals backward with it", T,
                   float, double) {
  std::mt19937 rng(2);
  const index_t N = 3, C = 4, H = 2, W = 5;
  tensor<T> x(layout::nhwc, N, C, H, W, T(0)), y(layout::nhwc, N, C, H, W, T(0));
  tensor<T> dy(layout::nhwc, N, C, H, W, T(0)), dx1 = y, dx2 = y;
  fill_random(x, rng, 1.0, 1.0);
  fill_random(dy, rng, 0.0, 1.0);
  std::vector<T> gamma(4, T(1.5)), beta(4, T(0.1)), tau(4, T(0.2)), eps(4, T(0.01));
  std::vector<T> nu2(std::size_t(N * C)), g1(4), b1(4), t1(4), e1(4), g2(4), b2(4), t2(4), e2(4);
  frn::options opt;
  bkn::host_workspace ws(frn::workspace_size(B{}, opt, x.view.shape()));
  frn::layer<T> kept{{gamma, beta, tau, eps}, {g1, b1, t1, e1}, {nu2}};
  frn::layer<T> none{{gamma, beta, tau, eps}, {g2, b2, t2, e2}, {}};
  frn::forward(B{}, opt, kept, x.cview(), y.view, ws.bytes());
  frn::backward(B{}, opt, kept, x.cview(), dy.cview(), dx1.view, ws.bytes());
  frn::backward(B{}, opt, none, x.cview(), dy.cview(), dx2.view, ws.bytes());
  CHECK(dx1.memory == dx2.memory);
  CHECK(g1 == g2);
  CHECK(b1 == b2);
  CHECK(t1 == t2);
  CHECK(e1 == e2);
}

TEST_CASE_TEMPLATE("filter_response_norm: y may be x, dx may be dy", T, float, double) {
  std::mt19937 rng(12);
  const index_t N = 2, C = 3, H = 4, W = 2;
  for (bool tlu : {false, true}) {
    CAPTURE(tlu);
    tensor<T> x(layout::nchw, N, C, H, W, T(0)), dy(layout::nchw, N, C, H, W, T(0));
    tensor<T> y(layout::nchw, N, C, H, W, T(0)), dx(layout::nchw, N, C, H, W, T(0));
    fill_random(x, rng, 0.5, 1.0);
    fill_random(dy, rng, 0.0, 1.0);
    std::vector<T> gamma(3, T(1.2)), beta(3, T(0.1)), tau(3, T(0.3)), dtau(3), dtau2(3);
    frn::options opt;
    opt.tlu = tlu;
    frn::layer<T> L{{gamma, beta, tau, {}}, {{}, {}, dtau, {}}, {}};
    bkn::host_workspace ws(frn::workspace_size(B{}, opt, x.view.shape()));
    frn::forward(B{}, opt, L, x.cview(), y.view, ws.bytes());
    frn::backward(B{}, opt, L, x.cview(), dy.cview(), dx.view, ws.bytes());
    tensor<T> in_place = x, grad_in_place = dy;
    L.grads.tau = dtau2;
    frn::backward(B{}, opt, L, in_place.cview(), grad_in_place.cview(), grad_in_place.view,
                  ws.bytes());
    frn::forward(B{}, opt, L, in_place.cview(), in_place.view, ws.bytes());
    CHECK(in_place.memory == y.memory);
    CHECK(grad_in_place.memory == dx.memory);
    CHECK(dtau == dtau2);  // tau's sums were taken before the mask overwrote dy
  }
}

TEST_CASE_TEMPLATE("filter_response_norm: N = 0 changes nothing and needs no workspace", T, float,
                   double) {
  std::vector<T> y(8, T(3)), dx(8, T(4)), dg(4, T(5)), dt(4, T(6));
  const std::vector<T> y0 = y, dx0 = dx, dg0 = dg, dt0 = dt;
  std::vector<T> gamma(4, T(1)), tau(4, T(0)), x(8, T(1)), dy(8, T(1));
  frn::options opt;
  frn::layer<T> L{{gamma, {}, tau, {}}, {dg, {}, dt, {}}, {}};
  CHECK(frn::workspace_size(B{}, opt, {0, 4, 2, 1}) <= bkn::workspace_alignment);
  const auto xv = bkn::tensor_view<const T>(bkn::nchw(x.data(), 0, 4, 2, 1));
  frn::forward(B{}, opt, L, xv, bkn::nchw(y.data(), 0, 4, 2, 1), {});
  frn::backward(B{}, opt, L, xv, bkn::tensor_view<const T>(bkn::nchw(dy.data(), 0, 4, 2, 1)),
                bkn::nchw(dx.data(), 0, 4, 2, 1), {});
  CHECK(y == y0);
  CHECK(dx == dx0);
  CHECK(dg == dg0);
  CHECK(dt == dt0);
}

namespace {

/// A valid forward/backward call (N = 2, C = 4, 3 x 2 images, per-channel learned eps) whose
/// arguments the cases below spoil one at a time; every output holds a sentinel.
template <class T>
struct fixture {
  static constexpr index_t N = 2, C = 4, H = 3, W = 2;
  frn::options opt;
  std::vector<T> x, y, dy, dx, gamma, beta, tau, eps, dgamma, dbeta, dtau, deps, nu2;
  bkn::host_workspace ws;
  frn::layer<T> L;
  bkn::tensor_view<const T> xv, dyv;
  bkn::tensor_view<T> yv, dxv;
  span<std::byte> workspace;

  fixture()
      : x(std::size_t(N * C * H * W)),
        y(x.size()),
        dy(x.size()),
        dx(x.size()),
        gamma(std::size_t(C), T(1)),
        beta(std::size_t(C), T(0)),
        tau(std::size_t(C), T(0)),
        eps(std::size_t(C), T(0.1)),
        dgamma(std::size_t(C)),
        dbeta(std::size_t(C)),
        dtau(std::size_t(C)),
        deps(std::size_t(C)),
        nu2(std::size_t(N * C)),
        ws(frn::workspace_size(B{}, frn::options{}, {N, C, H, W})) {
    std::mt19937 gen(1);
    std::uniform_real_distribution<double> u(-1, 1);
    for (auto* v : {&x, &dy})
      for (auto& e : *v) e = T(u(gen));
    for (auto* v : outputs()) std::memset(v->data(), 0x5A, v->size() * sizeof(T));
    L = {{gamma, beta, tau, eps}, {dgamma, dbeta, dtau, deps}, {nu2}};
    xv = bkn::nchw(x.data(), N, C, H, W);
    dyv = bkn::nchw(dy.data(), N, C, H, W);
    yv = bkn::nchw(y.data(), N, C, H, W);
    dxv = bkn::nchw(dx.data(), N, C, H, W);
    workspace = ws.bytes();
  }
  fixture(const fixture&) = delete;
  fixture& operator=(const fixture&) = delete;

  std::vector<std::vector<T>*> outputs() {
    return {&y, &dx, &dgamma, &dbeta, &dtau, &deps, &nu2};
  }
  std::vector<std::vector<T>> snapshot() {
    std::vector<std::vector<T>> s;
    for (auto* v : outputs()) s.push_back(*v);
    return s;
  }
  void forward() { frn::forward(B{}, opt, L, xv, yv, workspace); }
  void backward() { frn::backward(B{}, opt, L, xv, dyv, dxv, workspace); }
};

template <class T>
void run_invalid(const char* what, bool backward, const char* argument,
                 const std::function<void(fixture<T>&)>& spoil) {
  const std::string described = what;
  CAPTURE(described);
  fixture<T> f;
  spoil(f);
  const auto before = f.snapshot();
  const auto e = bkn_test::thrown([&] { backward ? f.backward() : f.forward(); });
  CHECK(std::string(e.routine()) == (backward ? "bkn::filter_response_norm::backward"
                                              : "bkn::filter_response_norm::forward"));
  CHECK(std::string(e.argument()) == argument);
  CHECK(std::string(e.what()).find(argument) != std::string::npos);
  const auto after = f.snapshot();
  for (std::size_t k = 0; k < before.size(); ++k)
    CHECK(std::memcmp(before[k].data(), after[k].data(), before[k].size() * sizeof(T)) == 0);
}

}  // namespace

TEST_CASE_TEMPLATE("filter_response_norm: invalid arguments throw and leave every output byte "
                   "unchanged",
                   T, float, double) {
  using F = fixture<T>;
  const index_t N = F::N, C = F::C, H = F::H, W = F::W;
  int cases = 0;
  for (bool bwd : {false, true}) {
    auto run = [&](const char* what, const char* argument, std::function<void(F&)> spoil) {
      run_invalid<T>(what, bwd, argument, spoil);
      ++cases;
    };
    run("epsilon 0", "options.epsilon", [](F& f) { f.opt.epsilon = 0; });
    run("epsilon < 0", "options.epsilon", [](F& f) { f.opt.epsilon = -1e-6; });
    run("gamma of C + 1", "params.gamma",
        [](F& f) { f.L.params.gamma = span<const T>(f.x.data(), C + 1); });
    run("beta of 1", "params.beta",
        [](F& f) { f.L.params.beta = span<const T>(f.beta.data(), 1); });
    run("tau of C - 1", "params.tau",
        [](F& f) { f.L.params.tau = span<const T>(f.tau.data(), C - 1); });
    run("learned eps of 2", "params.learned_epsilon",
        [](F& f) { f.L.params.learned_epsilon = span<const T>(f.eps.data(), 2); });
    run("saved nu2 of N", "saved.nu2", [](F& f) { f.L.saved.nu2 = span<T>(f.nu2.data(), N); });
    run("negative extent", "x", [](F& f) {
      f.xv = bkn::strided(static_cast<const T*>(f.x.data()), {N, -C, H, W},
                          {C * H * W, H * W, W, 1});
    });
    run("workspace one byte short", "workspace", [](F& f) {
      const std::size_t need = frn::workspace_size(B{}, f.opt, f.xv.shape());
      f.workspace = f.workspace.subspan(0, index_t(need) - 1);
    });
    run("null workspace", "workspace", [](F& f) { f.workspace = {}; });
    if (!bwd) {
      run("y of another shape", "y", [=](F& f) { f.yv = bkn::nchw(f.y.data(), N, C, 1, H * W); });
      run("y overlapping x partially", "y", [=](F& f) {
        f.yv = bkn::nchw(f.x.data() + 3, 1, C, H, W);
        f.xv = bkn::nchw(f.x.data(), 1, C, H, W);
        f.L.saved = {};
      });
      run("y with zero strides", "y",
          [=](F& f) { f.yv = bkn::strided(f.y.data(), {N, C, H, W}, {0, 0, 0, 0}); });
    } else {
      run("dx is x", "dx",
          [=](F& f) { f.xv = bkn::nchw(static_cast<const T*>(f.dx.data()), N, C, H, W); });
      run("dx overlapping dy partially", "dx", [=](F& f) {
        f.dyv = bkn::nchw(static_cast<const T*>(f.dx.data()) + 1, 1, C, H, W);
        f.dxv = bkn::nchw(f.dx.data(), 1, C, H, W);
        f.xv = bkn::nchw(f.x.data(), 1, C, H, W);
        f.L.saved = {};
      });
      run("grads.tau of 1", "grads.tau", [](F& f) { f.L.grads.tau = span<T>(f.dtau.data(), 1); });
      run("grads.gamma of C - 1", "grads.gamma",
          [](F& f) { f.L.grads.gamma = span<T>(f.dgamma.data(), C - 1); });
      run("grads.learned_epsilon per layer for a per-channel eps", "grads.learned_epsilon",
          [](F& f) { f.L.grads.learned_epsilon = span<T>(f.deps.data(), 1); });
      run("grads.learned_epsilon without a learned eps", "grads.learned_epsilon",
          [](F& f) { f.L.params.learned_epsilon = {}; });
    }
  }
  MESSAGE(cases << " invalid calls");
}

TEST_CASE_TEMPLATE("filter_response_norm: check_finite names the first Inf and writes nothing", T,
                   float, double) {
  fixture<T> f;
  f.opt.check_finite = true;
  f.dy[std::size_t(((0 * 4 + 3) * 3 + 2) * 2 + 1)] = T(INFINITY);
  const auto before = f.snapshot();
  try {
    f.backward();
    FAIL("expected bkn::nonfinite_input");
  } catch (const bkn::nonfinite_input& e) {
    CHECK(e.sample() == 0);
    CHECK(e.channel() == 3);
    CHECK(std::string(e.argument()) == "dy");
  }
  CHECK(f.snapshot() == before);
}

TEST_CASE("filter_response_norm: float tensors with double per-channel arrays") {
  std::mt19937 rng(16);
  const index_t N = 3, C = 4, H = 3, W = 5;
  tensor<double> xd(layout::padded_last, N, C, H, W, 0.0), dyd = xd;
  fill_random(xd, rng, 0.5, 1.0);
  fill_random(dyd, rng, 0.0, 1.0);
  tensor<float> xf(layout::padded_last, N, C, H, W, 0.0f), dyf = xf;
  for (std::size_t i = 0; i < xd.memory.size(); ++i) {
    xf.memory[i] = float(xd.memory[i]);
    dyf.memory[i] = float(dyd.memory[i]);
    xd.memory[i] = double(xf.memory[i]);
    dyd.memory[i] = double(dyf.memory[i]);
  }
  tensor<double> yd(layout::padded_last, N, C, H, W, 0.0), dxd = yd;
  tensor<float> yf(layout::padded_last, N, C, H, W, 0.0f), dxf = yf;
  std::vector<double> gamma(C, 1.25), beta(C, 0.5), tau(C, 0.1), eps{0.01};
  std::vector<double> g1(C), b1(C), t1(C), e1(1), g2(C), b2(C), t2(C), e2(1);
  frn::options opt;
  bkn::host_workspace ws(frn::workspace_size(B{}, opt, xd.view.shape()));
  const frn::layer<double> a{{gamma, beta, tau, eps}, {g1, b1, t1, e1}, {}};
  const frn::layer<double> b{{gamma, beta, tau, eps}, {g2, b2, t2, e2}, {}};
  frn::forward(B{}, opt, a, xd.cview(), yd.view, ws.bytes());
  frn::backward(B{}, opt, a, xd.cview(), dyd.cview(), dxd.view, ws.bytes());
  frn::forward(B{}, opt, b, xf.cview(), yf.view, ws.bytes());
  frn::backward(B{}, opt, b, xf.cview(), dyf.cview(), dxf.view, ws.bytes());
  // The parameter gradients come from sums over the same values: equal up to the rounding of
  // the masked dy, which is exact (dy or 0), so they agree to double rounding.
  for (std::size_t c = 0; c < std::size_t(C); ++c) {
    CHECK(g2[c] == doctest::Approx(g1[c]).epsilon(1e-12));
    CHECK(b2[c] == doctest::Approx(b1[c]).epsilon(1e-12));
    CHECK(t2[c] == doctest::Approx(t1[c]).epsilon(1e-12));
  }
  CHECK(e2[0] == doctest::Approx(e1[0]).epsilon(1e-12));
  for (std::size_t i = 0; i < yd.memory.size(); ++i) {
    CHECK(double(yf.memory[i]) == doctest::Approx(yd.memory[i]).epsilon(1e-6).scale(1));
    CHECK(double(dxf.memory[i]) == doctest::Approx(dxd.memory[i]).epsilon(1e-6).scale(1));
  }
}
