// Tests of group, layer and instance normalization (include/bkn/methods/group_norm.hpp) on the
// reference backend: outputs and saved statistics against a direct loop implementation written
// here, every gradient against central finite differences in double, each layout (including
// strided views whose H and W do not merge, which take the per-channel fallback), validation
// leaving every output byte unchanged, N = 0, in-place calls and the LN / IN entry points.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bkn/backends/reference.hpp"
#include "bkn/methods/group_norm.hpp"
#include "bkn/storage.hpp"
#include "support/finite_difference.hpp"
#include "support/sentinel_tensor.hpp"
#include "support/thrown.hpp"

namespace {

using bkn::index_t;
using bkn::span;
using B = bkn::reference_backend;

using layout = bkn_test::padded_layout;
using bkn_test::padded_layout_name;

template <class T>
using tensor = bkn_test::sentinel_tensor<T>;

struct shape {
  index_t N, C, H, W, groups;
  layout storage;
};

std::string describe(const shape& s) {
  return std::string(padded_layout_name(s.storage)) + " N=" + std::to_string(s.N) +
         " C=" + std::to_string(s.C) +
         " HxW=" + std::to_string(s.H) + "x" + std::to_string(s.W) +
         " groups=" + std::to_string(s.groups);
}

/// Group normalization by its definition, in double: per (n, g) the mean and biased variance
/// of the group's values, two passes.
struct direct_result {
  std::vector<double> y, mean, var;  // y at [((n * C + c) * H + h) * W + w]
};

template <class T, class P>
direct_result direct_group_norm(const tensor<T>& x, index_t groups, const std::vector<P>& gamma,
                                const std::vector<P>& beta, double eps) {
  const bkn::tensor_shape& s = x.view.shape();
  const index_t N = s.batch, C = s.channels, H = s.height, W = s.width, Cg = C / groups;
  direct_result r;
  r.y.resize(std::size_t(N * C * H * W));
  for (index_t n = 0; n < N; ++n)
    for (index_t g = 0; g < groups; ++g) {
      double sum = 0;
      for (index_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (index_t h = 0; h < H; ++h)
          for (index_t w = 0; w < W; ++w) sum += double(x.at(n, c, h, w));
      const double count = double(Cg * H * W), mean = sum / count;
      double m2 = 0;
      for (index_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (index_t h = 0; h < H; ++h)
          for (index_t w = 0; w < W; ++w) m2 += std::pow(double(x.at(n, c, h, w)) - mean, 2);
      const double var = m2 / count;
      r.mean.push_back(mean);
      r.var.push_back(var);
      for (index_t c = g * Cg; c < (g + 1) * Cg; ++c)
        for (index_t h = 0; h < H; ++h)
          for (index_t w = 0; w < W; ++w) {
            const double ga = gamma.empty() ? 1.0 : double(gamma[std::size_t(c)]);
            const double be = beta.empty() ? 0.0 : double(beta[std::size_t(c)]);
            r.y[std::size_t(((n * C + c) * H + h) * W + w)] =
                ga * (double(x.at(n, c, h, w)) - mean) / std::sqrt(var + eps) + be;
          }
    }
  return r;
}

template <class T>
void fill_random(tensor<T>& t, std::mt19937& rng, double offset_per_channel, double scale) {
  std::normal_distribution<double> normal;
  const bkn::tensor_shape& s = t.view.shape();
  for (index_t n = 0; n < s.batch; ++n)
    for (index_t c = 0; c < s.channels; ++c)
      for (index_t h = 0; h < s.height; ++h)
        for (index_t w = 0; w < s.width; ++w)
          t.at(n, c, h, w) = T(offset_per_channel * double(c) + scale * normal(rng));
}

std::vector<shape> forward_shapes() {
  std::vector<shape> shapes;
  const index_t spatial[][2] = {{1, 1}, {3, 4}, {5, 1}, {1, 6}, {7, 7}};
  const layout layouts[] = {layout::nchw, layout::nhwc, layout::rows, layout::padded,
                            layout::padded_last};
  for (index_t N : {1, 3})
    for (index_t C : {1, 5, 6, 12})
      for (const auto& hw : spatial)
        for (layout l : layouts) {
          if (hw[0] * hw[1] == 1 && l != layout::nchw) continue;  // 1x1: one NC case suffices
          for (index_t G : {index_t(1), index_t(2), index_t(3), C}) {
            if (C % G != 0 || C / G * hw[0] * hw[1] < 2) continue;
            shapes.push_back({N, C, hw[0], hw[1], G, hw[0] * hw[1] == 1 ? layout::nc : l});
          }
        }
  return shapes;
}

}  // namespace

TEST_CASE("group_norm: the re-view of each layout is exact, or the fallback is taken") {
  // Which path sample_moments takes, so the tests below are known to cover all three.
  auto exact = [](layout l, index_t C, index_t H, index_t W, index_t G) {
    tensor<double> t(l, 2, C, H, W, 0.0);
    bkn::tensor_view<double> v;
    return bkn::detail::exact_group_view(t.view, G, v);
  };
  CHECK(exact(layout::nchw, 6, 3, 4, 2));
  CHECK(exact(layout::nhwc, 6, 3, 4, 2));
  CHECK(exact(layout::rows, 6, 3, 4, 2));  // channels and H merge
  CHECK_FALSE(exact(layout::padded, 6, 3, 4, 2));
  CHECK_FALSE(exact(layout::padded_last, 6, 3, 4, 2));
  CHECK(exact(layout::padded, 6, 3, 4, 6));  // one channel per group: instance norm
  CHECK(exact(layout::padded, 6, 1, 4, 2));  // a single line merges with nothing to merge
  CHECK(exact(layout::padded, 6, 3, 1, 2));

  // The re-views address exactly the group's values: sum of element addresses per (n, g).
  for (layout l : {layout::nchw, layout::nhwc, layout::rows}) {
    CAPTURE(padded_layout_name(l));
    tensor<double> t(l, 2, 6, 3, 4, 0.0);
    bkn::tensor_view<double> v;
    REQUIRE(bkn::detail::exact_group_view(t.view, 3, v));
    for (index_t n = 0; n < 2; ++n)
      for (index_t g = 0; g < 3; ++g) {
        std::vector<const double*> want, got;
        for (index_t c = 2 * g; c < 2 * g + 2; ++c)
          for (index_t h = 0; h < 3; ++h)
            for (index_t w = 0; w < 4; ++w) want.push_back(&t.at(n, c, h, w));
        for (index_t s = 0; s < v.spatial(); ++s) got.push_back(&v.at(n, g, s));
        std::sort(want.begin(), want.end());
        std::sort(got.begin(), got.end());
        CHECK(want == got);
      }
  }
}

TEST_CASE_TEMPLATE("group_norm: forward equals the definition on every layout and group count",
                   T, float, double) {
  const double tolerance = std::is_same_v<T, double> ? 1e-12 : 2e-5;
  std::mt19937 rng(3);
  std::normal_distribution<double> normal;
  int cases = 0;
  for (const shape& s : forward_shapes()) {
    CAPTURE(describe(s));
    tensor<T> x(s.storage, s.N, s.C, s.H, s.W, T(0)), y(s.storage, s.N, s.C, s.H, s.W, T(-7));
    fill_random(x, rng, 0.7, 1.5);
    std::vector<T> gamma(std::size_t(s.C)), beta(std::size_t(s.C));
    for (auto& v : gamma) v = T(1 + 0.3 * normal(rng));
    for (auto& v : beta) v = T(normal(rng));
    std::vector<T> mean(std::size_t(s.N * s.groups)), var(mean.size());
    bkn::group_norm::options opt;
    opt.groups = s.groups;
    bkn::group_norm::layer<T> L;
    L.params = {gamma, beta};
    L.saved = {mean, var};
    bkn::host_workspace ws(bkn::group_norm::workspace_size(B{}, opt, x.view.shape()));
    const std::vector<T> untouched = y.memory;
    bkn::group_norm::forward(B{}, opt, L, x.cview(), y.view, ws.bytes());

    const direct_result want = direct_group_norm(x, s.groups, gamma, beta, opt.epsilon);
    double worst = 0;
    for (index_t n = 0; n < s.N; ++n)
      for (index_t c = 0; c < s.C; ++c)
        for (index_t h = 0; h < s.H; ++h)
          for (index_t w = 0; w < s.W; ++w) {
            const double e = want.y[std::size_t(((n * s.C + c) * s.H + h) * s.W + w)];
            worst = std::max(worst, std::abs(double(y.at(n, c, h, w)) - e) / (1 + std::abs(e)));
            y.at(n, c, h, w) = untouched[std::size_t(&y.at(n, c, h, w) - y.memory.data())];
          }
    CHECK(worst <= tolerance);
    CHECK(y.memory == untouched);  // nothing written outside the view
    for (std::size_t i = 0; i < mean.size(); ++i) {
      CHECK(double(mean[i]) == doctest::Approx(want.mean[i]).epsilon(tolerance).scale(1));
      CHECK(double(var[i]) == doctest::Approx(want.var[i]).epsilon(tolerance).scale(1));
    }
    ++cases;
  }
  MESSAGE(cases << " shapes");
  CHECK(cases > 100);
}

namespace {

/// One gradient check: loss = sum w y with fixed random weights w, so dy = w.
void check_gradients(const shape& s, bool affine, bool keep_statistics) {
  CAPTURE(describe(s));
  CAPTURE(affine);
  std::mt19937 rng(17 + unsigned(s.C * 7 + s.groups));
  std::normal_distribution<double> normal;
  tensor<double> x(s.storage, s.N, s.C, s.H, s.W, 0.0), y(s.storage, s.N, s.C, s.H, s.W, 0.0);
  tensor<double> dy(s.storage, s.N, s.C, s.H, s.W, 0.0), dx(s.storage, s.N, s.C, s.H, s.W, 0.0);
  fill_random(x, rng, 0.5, 1.0);
  fill_random(dy, rng, 0.0, 1.0);
  std::vector<double> gamma, beta, dgamma, dbeta;
  if (affine) {
    for (index_t c = 0; c < s.C; ++c) {
      gamma.push_back(1 + 0.3 * normal(rng));
      beta.push_back(normal(rng));
    }
    dgamma.assign(gamma.size(), 0);
    dbeta.assign(beta.size(), 0);
  }
  std::vector<double> mean, var;
  if (keep_statistics) {
    mean.assign(std::size_t(s.N * s.groups), 0);
    var.assign(mean.size(), 0);
  }
  bkn::group_norm::options opt;
  opt.groups = s.groups;
  bkn::group_norm::layer<double> L;
  L.params = {gamma, beta};
  L.grads = {dgamma, dbeta};
  L.saved = {mean, var};
  bkn::host_workspace ws(bkn::group_norm::workspace_size(B{}, opt, x.view.shape()));
  auto loss = [&] {
    bkn::group_norm::forward(B{}, opt, L, x.cview(), y.view, ws.bytes());
    double l = 0;
    for (index_t n = 0; n < s.N; ++n)
      for (index_t c = 0; c < s.C; ++c)
        for (index_t k = 0; k < s.H * s.W; ++k) l += dy.view.at(n, c, k) * y.view.at(n, c, k);
    return l;
  };
  loss();
  bkn::group_norm::backward(B{}, opt, L, x.cview(), dy.cview(), dx.view, ws.bytes());
  std::vector<double*> entries;
  std::vector<double> analytic;
  for (index_t n = 0; n < s.N; ++n)
    for (index_t c = 0; c < s.C; ++c)
      for (index_t k = 0; k < s.H * s.W; ++k) {
        entries.push_back(&x.view.at(n, c, k));
        analytic.push_back(dx.view.at(n, c, k));
      }
  bkn_test::check_gradient("dx", entries, analytic, loss);
  if (affine) {
    bkn_test::check_gradient("dgamma", bkn_test::pointers(gamma), dgamma, loss);
    bkn_test::check_gradient("dbeta", bkn_test::pointers(beta), dbeta, loss);
  }
}

}  // namespace

TEST_CASE("group_norm: gradients by finite differences, GN / LN / IN, every layout") {
  const layout layouts[] = {layout::nchw, layout::nhwc, layout::rows, layout::padded,
                            layout::padded_last};
  for (layout l : layouts)
    for (index_t G : {1, 2, 3, 6}) check_gradients({2, 6, 3, 4, G, l}, true, true);
  check_gradients({3, 4, 1, 1, 1, layout::nc}, true, true);   // LN of a fully connected layer
  check_gradients({1, 6, 1, 1, 2, layout::nc}, true, true);   // N = 1, 3 values per group
  check_gradients({2, 5, 2, 3, 5, layout::padded}, true, true);  // IN, odd C
  check_gradients({2, 6, 3, 4, 3, layout::padded}, false, true);   // no affine
  check_gradients({2, 6, 3, 4, 2, layout::nhwc}, true, false);     // statistics recomputed
  check_gradients({2, 6, 3, 4, 3, layout::padded}, true, false);
  MESSAGE("worst relative error of every finite-difference check: " << bkn_test::worst_seen);
}

TEST_CASE_TEMPLATE("group_norm: backward without saved statistics equals backward with them", T,
                   float, double) {
  for (layout l : {layout::nchw, layout::padded}) {
    CAPTURE(padded_layout_name(l));
    std::mt19937 rng(5);
    tensor<T> x(l, 3, 6, 3, 2, T(0)), y(l, 3, 6, 3, 2, T(0)), dy(l, 3, 6, 3, 2, T(0));
    tensor<T> dx1(l, 3, 6, 3, 2, T(0)), dx2(l, 3, 6, 3, 2, T(0));
    fill_random(x, rng, 1.0, 2.0);
    fill_random(dy, rng, 0.0, 1.0);
    std::vector<T> gamma(6, T(1.5)), beta(6, T(0.5)), mean(9), var(9);
    std::vector<T> dg1(6), db1(6), dg2(6), db2(6);
    bkn::group_norm::options opt;
    opt.groups = 3;
    bkn::host_workspace ws(bkn::group_norm::workspace_size(B{}, opt, x.view.shape()));
    bkn::group_norm::layer<T> kept{{gamma, beta}, {dg1, db1}, {mean, var}};
    bkn::group_norm::layer<T> none{{gamma, beta}, {dg2, db2}, {}};
    bkn::group_norm::forward(B{}, opt, kept, x.cview(), y.view, ws.bytes());
    bkn::group_norm::backward(B{}, opt, kept, x.cview(), dy.cview(), dx1.view, ws.bytes());
    bkn::group_norm::backward(B{}, opt, none, x.cview(), dy.cview(), dx2.view, ws.bytes());
    CHECK(dx1.memory == dx2.memory);
    CHECK(dg1 == dg2);
    CHECK(db1 == db2);
  }
}

TEST_CASE_TEMPLATE("layer_norm and instance_norm are group_norm with 1 and C groups", T, float,
                   double) {
  std::mt19937 rng(9);
  const index_t N = 2, C = 4, H = 3, W = 5;
  tensor<T> x(layout::nhwc, N, C, H, W, T(0)), dy(layout::nhwc, N, C, H, W, T(0));
  fill_random(x, rng, 1.0, 1.0);
  fill_random(dy, rng, 0.0, 1.0);
  std::vector<T> gamma{T(1.5), T(0.5), T(2), T(1)}, beta{T(0), T(1), T(-1), T(0.5)};
  for (index_t G : {index_t(1), C}) {
    CAPTURE(G);
    tensor<T> y1(layout::nhwc, N, C, H, W, T(0)), y2 = y1, dx1 = y1, dx2 = y1;
    std::vector<T> m1(std::size_t(N * G)), v1(m1.size()), m2(m1.size()), v2(m1.size());
    std::vector<T> dg1(4), db1(4), dg2(4), db2(4);
    bkn::group_norm::layer<T> a{{gamma, beta}, {dg1, db1}, {m1, v1}};
    bkn::group_norm::layer<T> b{{gamma, beta}, {dg2, db2}, {m2, v2}};
    bkn::group_norm::options gn;
    gn.groups = G;
    bkn::host_workspace ws(bkn::group_norm::workspace_size(B{}, gn, x.view.shape()));
    bkn::group_norm::forward(B{}, gn, a, x.cview(), y1.view, ws.bytes());
    bkn::group_norm::backward(B{}, gn, a, x.cview(), dy.cview(), dx1.view, ws.bytes());
    if (G == 1) {
      const bkn::layer_norm::options ln;
      CHECK(bkn::layer_norm::workspace_size(B{}, ln, x.view.shape()) ==
            bkn::group_norm::workspace_size(B{}, gn, x.view.shape()));
      bkn::layer_norm::forward(B{}, ln, b, x.cview(), y2.view, ws.bytes());
      bkn::layer_norm::backward(B{}, ln, b, x.cview(), dy.cview(), dx2.view, ws.bytes());
    } else {
      const bkn::instance_norm::options in;
      CHECK(bkn::instance_norm::workspace_size(B{}, in, x.view.shape()) ==
            bkn::group_norm::workspace_size(B{}, gn, x.view.shape()));
      bkn::instance_norm::forward(B{}, in, b, x.cview(), y2.view, ws.bytes());
      bkn::instance_norm::backward(B{}, in, b, x.cview(), dy.cview(), dx2.view, ws.bytes());
    }
    CHECK(y1.memory == y2.memory);
    CHECK(dx1.memory == dx2.memory);
    CHECK(m1 == m2);
    CHECK(v1 == v2);
    CHECK(dg1 == dg2);
    CHECK(db1 == db2);
  }
  // Errors name the entry point the caller used.
  std::vector<T> x1(4), y1(4);
  const auto one_pixel = bkn::nchw(x1.data(), 4, 1, 1, 1);
  bkn::host_workspace ws(4096);
  const auto e = bkn_test::thrown([&] {
    bkn::instance_norm::forward(B{}, bkn::instance_norm::options{},
                                bkn::instance_norm::layer<T>{},
                                bkn::tensor_view<const T>(one_pixel),
                                bkn::nchw(y1.data(), 4, 1, 1, 1), ws.bytes());
  });
  CHECK(std::string(e.routine()) == "bkn::instance_norm::forward");
  CHECK(std::string(e.argument()) == "x");
  const auto e2 = bkn_test::thrown([&] {
    bkn::layer_norm::options bad;
    bad.epsilon = 0;
    bkn::layer_norm::forward(B{}, bad, bkn::layer_norm::layer<T>{},
                             bkn::tensor_view<const T>(one_pixel),
                             bkn::nchw(y1.data(), 4, 1, 1, 1), ws.bytes());
  });
  CHECK(std::string(e2.routine()) == "bkn::layer_norm::forward");
  CHECK(std::string(e2.argument()) == "options.epsilon");
}

TEST_CASE_TEMPLATE("group_norm: y may be x, dx may be dy", T, float, double) {
  std::mt19937 rng(21);
  const index_t N = 2, C = 6, H = 2, W = 3;
  tensor<T> x(layout::nchw, N, C, H, W, T(0)), dy(layout::nchw, N, C, H, W, T(0));
  tensor<T> y(layout::nchw, N, C, H, W, T(0)), dx(layout::nchw, N, C, H, W, T(0));
  fill_random(x, rng, 1.0, 1.0);
  fill_random(dy, rng, 0.0, 1.0);
  std::vector<T> gamma(6, T(2)), beta(6, T(1)), mean(4), var(4);
  bkn::group_norm::options opt;
  opt.groups = 2;
  bkn::group_norm::layer<T> L{{gamma, beta}, {}, {mean, var}};
  bkn::host_workspace ws(bkn::group_norm::workspace_size(B{}, opt, x.view.shape()));
  bkn::group_norm::forward(B{}, opt, L, x.cview(), y.view, ws.bytes());
  bkn::group_norm::backward(B{}, opt, L, x.cview(), dy.cview(), dx.view, ws.bytes());
  tensor<T> in_place = x, grad_in_place = dy;
  // backward reads x, so it runs before the in-place forward overwrites it.
  bkn::group_norm::backward(B{}, opt, L, in_place.cview(), grad_in_place.cview(),
                            grad_in_place.view, ws.bytes());
  bkn::group_norm::forward(B{}, opt, L, in_place.cview(), in_place.view, ws.bytes());
  CHECK(in_place.memory == y.memory);
  CHECK(grad_in_place.memory == dx.memory);
}

TEST_CASE_TEMPLATE("group_norm: N = 0 changes nothing and needs no workspace", T, float, double) {
  std::vector<T> y(8, T(3)), dx(8, T(4)), dg(4, T(5)), db(4, T(6));
  const std::vector<T> y0 = y, dx0 = dx, dg0 = dg, db0 = db;
  std::vector<T> gamma(4, T(1)), beta(4, T(0)), x(8, T(1)), dy(8, T(1));
  bkn::group_norm::options opt;
  opt.groups = 2;
  bkn::group_norm::layer<T> L{{gamma, beta}, {dg, db}, {}};
  CHECK(bkn::group_norm::workspace_size(B{}, opt, {0, 4, 2, 1}) <= bkn::workspace_alignment);
  const auto xv = bkn::tensor_view<const T>(bkn::nchw(x.data(), 0, 4, 2, 1));
  bkn::group_norm::forward(B{}, opt, L, xv, bkn::nchw(y.data(), 0, 4, 2, 1), {});
  bkn::group_norm::backward(B{}, opt, L, xv,
                            bkn::tensor_view<const T>(bkn::nchw(dy.data(), 0, 4, 2, 1)),
                            bkn::nchw(dx.data(), 0, 4, 2, 1), {});
  CHECK(y == y0);
  CHECK(dx == dx0);
  CHECK(dg == dg0);
  CHECK(db == db0);
}

namespace {

/// A valid forward/backward call (N = 2, C = 4, 3 x 2 images, 2 groups) whose arguments the
/// cases below spoil one at a time; everything the routines may write holds a sentinel.
template <class T>
struct fixture {
  static constexpr index_t N = 2, C = 4, H = 3, W = 2;
  bkn::group_norm::options opt;
  std::vector<T> x, y, dy, dx, gamma, beta, dgamma, dbeta, mean, var;
  bkn::host_workspace ws;
  bkn::group_norm::layer<T> L;
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
        dgamma(std::size_t(C)),
        dbeta(std::size_t(C)),
        mean(std::size_t(N * 2)),
        var(mean.size()),
        ws(bkn::group_norm::workspace_size(B{}, options(), {N, C, H, W})) {
    opt = options();
    std::mt19937 gen(1);
    std::uniform_real_distribution<double> u(-1, 1);
    for (auto* v : {&x, &dy})
      for (auto& e : *v) e = T(u(gen));
    for (auto* v : outputs()) std::memset(v->data(), 0x5A, v->size() * sizeof(T));
    L = {{gamma, beta}, {dgamma, dbeta}, {mean, var}};
    xv = bkn::nchw(x.data(), N, C, H, W);
    dyv = bkn::nchw(dy.data(), N, C, H, W);
    yv = bkn::nchw(y.data(), N, C, H, W);
    dxv = bkn::nchw(dx.data(), N, C, H, W);
    workspace = ws.bytes();
  }
  fixture(const fixture&) = delete;
  fixture& operator=(const fixture&) = delete;

  static bkn::group_norm::options options() {
    bkn::group_norm::options o;
    o.groups = 2;
    return o;
  }
  std::vector<std::vector<T>*> outputs() { return {&y, &dx, &dgamma, &dbeta, &mean, &var}; }
  std::vector<std::vector<T>> snapshot() {
    std::vector<std::vector<T>> s;
    for (auto* v : outputs()) s.push_back(*v);
    return s;
  }
  void forward() { bkn::group_norm::forward(B{}, opt, L, xv, yv, workspace); }
  void backward() { bkn::group_norm::backward(B{}, opt, L, xv, dyv, dxv, workspace); }
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
  CHECK(std::string(e.routine()) ==
        (backward ? "bkn::group_norm::backward" : "bkn::group_norm::forward"));
  CHECK(std::string(e.argument()) == argument);
  CHECK(std::string(e.what()).find(argument) != std::string::npos);
  const auto after = f.snapshot();
  for (std::size_t k = 0; k < before.size(); ++k)
    CHECK(std::memcmp(before[k].data(), after[k].data(), before[k].size() * sizeof(T)) == 0);
}

}  // namespace

TEST_CASE_TEMPLATE("group_norm: invalid arguments throw and leave every output byte unchanged",
                   T, float, double) {
  using F = fixture<T>;
  const index_t N = F::N, C = F::C, H = F::H, W = F::W;
  int cases = 0;
  for (bool bwd : {false, true}) {
    auto run = [&](const char* what, const char* argument, std::function<void(F&)> spoil) {
      run_invalid<T>(what, bwd, argument, spoil);
      ++cases;
    };
    run("groups not dividing C", "options.groups", [](F& f) { f.opt.groups = 3; });
    run("no groups", "options.groups", [](F& f) { f.opt.groups = 0; });
    run("epsilon 0", "options.epsilon", [](F& f) { f.opt.epsilon = 0; });
    run("epsilon < 0", "options.epsilon", [](F& f) { f.opt.epsilon = -1e-5; });
    run("gamma of C - 1", "params.gamma",
        [](F& f) { f.L.params.gamma = span<const T>(f.gamma.data(), C - 1); });
    run("beta of C + 1", "params.beta",
        [](F& f) { f.L.params.beta = span<const T>(f.x.data(), C + 1); });
    run("saved mean of N * G - 1", "saved.mean",
        [](F& f) { f.L.saved.mean = span<T>(f.mean.data(), 3); });
    run("saved var without mean", "saved", [](F& f) { f.L.saved.mean = {}; });
    run("one value per group", "x", [=](F& f) {
      f.opt.groups = C;
      f.L.saved = {};
      f.xv = bkn::nchw(f.x.data(), N, C, 1, 1);
      f.yv = bkn::nchw(f.y.data(), N, C, 1, 1);
      f.dyv = bkn::nchw(f.dy.data(), N, C, 1, 1);
      f.dxv = bkn::nchw(f.dx.data(), N, C, 1, 1);
    });
    run("negative stride", "x", [=](F& f) {
      f.xv = bkn::strided(static_cast<const T*>(f.x.data()) + N * C * H * W - 1,
                          {N, C, H, W}, {-C * H * W, H * W, W, 1});
    });
    run("workspace one byte short", "workspace", [](F& f) {
      const std::size_t need = bkn::group_norm::workspace_size(B{}, f.opt, f.xv.shape());
      f.workspace = f.workspace.subspan(0, index_t(need) - 1);
    });
    run("misaligned workspace", "workspace",
        [](F& f) { f.workspace = f.workspace.subspan(8, f.workspace.size() - 8); });
    if (!bwd) {
      run("y of another shape", "y", [=](F& f) { f.yv = bkn::nchw(f.y.data(), N, C, W, H); });
      run("y overlapping x partially", "y",
          [=](F& f) {
            f.yv = bkn::nchw(f.x.data() + 1, N - 1, C, H, W);
            f.xv = bkn::nchw(f.x.data(), N - 1, C, H, W);
          });
      run("y with overlapping strides", "y",
          [=](F& f) { f.yv = bkn::strided(f.y.data(), {N, C, H, W}, {1, 1, 1, 1}); });
    } else {
      run("dx is x", "dx", [=](F& f) {
        f.xv = bkn::nchw(static_cast<const T*>(f.dx.data()), N, C, H, W);
      });
      run("dx overlapping dy partially", "dx", [=](F& f) {
        f.dyv = bkn::nchw(static_cast<const T*>(f.dx.data()) + 2, N - 1, C, H, W);
        f.dxv = bkn::nchw(f.dx.data(), N - 1, C, H, W);
        f.xv = bkn::nchw(f.x.data(), N - 1, C, H, W);
        f.L.saved = {};
      });
      run("dy of another shape", "dy",
          [=](F& f) { f.dyv = bkn::nchw(static_cast<const T*>(f.dy.data()), N, C, H * W, 1); });
      run("grads.gamma of C - 1", "grads.gamma",
          [](F& f) { f.L.grads.gamma = span<T>(f.dgamma.data(), C - 1); });
      run("grads.beta of 1", "grads.beta",
          [](F& f) { f.L.grads.beta = span<T>(f.dbeta.data(), 1); });
    }
  }
  MESSAGE(cases << " invalid calls");

  // workspace_size checks what it can.
  bkn::group_norm::options bad;
  bad.groups = 3;
  auto e = bkn_test::thrown([&] { bkn::group_norm::workspace_size(B{}, bad, {N, C, H, W}); });
  CHECK(std::string(e.argument()) == "options.groups");
  CHECK(std::string(e.what()).find("expected a divisor of the channel count 4, got 3") !=
        std::string::npos);
}

TEST_CASE_TEMPLATE("group_norm: check_finite names the first NaN and writes nothing", T, float,
                   double) {
  fixture<T> f;
  f.opt.check_finite = true;
  f.x[std::size_t(((1 * 4 + 2) * 3 + 1) * 2 + 0)] = T(NAN);
  const auto before = f.snapshot();
  try {
    f.forward();
    FAIL("expected bkn::nonfinite_input");
  } catch (const bkn::nonfinite_input& e) {
    CHECK(e.sample() == 1);
    CHECK(e.channel() == 2);
    CHECK(std::string(e.argument()) == "x");
  }
  CHECK(f.snapshot() == before);  // the sentinel is not NaN: == compares the bytes' values
}

TEST_CASE("group_norm: float statistics of 1e4 + N(0, 1) stay within 1e-3 of double") {
  std::mt19937 rng(4);
  std::normal_distribution<double> normal;
  const index_t N = 2, C = 8, H = 16, W = 16;
  tensor<float> x(layout::nhwc, N, C, H, W, 0.0f), y = x;
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c)
      for (index_t k = 0; k < H * W; ++k) x.view.at(n, c, k) = float(1e4 + normal(rng));
  std::vector<float> mean(N * 2), var(N * 2);
  bkn::group_norm::options opt;
  opt.groups = 2;
  bkn::group_norm::layer<float> L{{}, {}, {mean, var}};
  bkn::host_workspace ws(bkn::group_norm::workspace_size(B{}, opt, x.view.shape()));
  bkn::group_norm::forward(B{}, opt, L, x.cview(), y.view, ws.bytes());
  const direct_result want = direct_group_norm(x, 2, std::vector<float>{}, std::vector<float>{},
                                               opt.epsilon);
  for (std::size_t i = 0; i < mean.size(); ++i) {
    CHECK(std::abs(double(mean[i]) - want.mean[i]) <= 1e-3);
    CHECK(std::abs(double(var[i]) - want.var[i]) <= 1e-3);
  }
  double worst = 0;
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c)
      for (index_t h = 0; h < H; ++h)
        for (index_t w = 0; w < W; ++w)
          worst = std::max(worst, std::abs(double(y.at(n, c, h, w)) -
                                           want.y[std::size_t(((n * C + c) * H + h) * W + w)]));
  MESSAGE("largest error of y: " << worst);
  CHECK(worst <= 1e-2);  // x itself is rounded to ~5e-4 in float: y to 5e-4 / sigma
}

TEST_CASE("group_norm: float tensors with double per-channel arrays") {
  // The per-channel arrays, statistics and coefficients in double; only x, y, dy, dx in float.
  std::mt19937 rng(6);
  const index_t N = 3, C = 6, H = 4, W = 5;
  tensor<double> xd(layout::padded, N, C, H, W, 0.0), dyd(layout::padded, N, C, H, W, 0.0);
  fill_random(xd, rng, 0.5, 1.0);
  fill_random(dyd, rng, 0.0, 1.0);
  tensor<float> xf(layout::padded, N, C, H, W, 0.0f), dyf(layout::padded, N, C, H, W, 0.0f);
  for (std::size_t i = 0; i < xd.memory.size(); ++i) {
    xf.memory[i] = float(xd.memory[i]);
    dyf.memory[i] = float(dyd.memory[i]);
    xd.memory[i] = double(xf.memory[i]);  // both runs see the same inputs
    dyd.memory[i] = double(dyf.memory[i]);
  }
  tensor<double> yd(layout::padded, N, C, H, W, 0.0), dxd = yd;
  tensor<float> yf(layout::padded, N, C, H, W, 0.0f), dxf = yf;
  std::vector<double> gamma(C, 1.25), beta(C, 0.5), mean(N * 3), var(N * 3);
  std::vector<double> dg1(C), db1(C), dg2(C), db2(C), mean2(N * 3), var2(N * 3);
  bkn::group_norm::options opt;
  opt.groups = 3;
  bkn::host_workspace ws(bkn::group_norm::workspace_size(B{}, opt, xd.view.shape()));
  const bkn::group_norm::layer<double> a{{gamma, beta}, {dg1, db1}, {mean, var}};
  const bkn::group_norm::layer<double> b{{gamma, beta}, {dg2, db2}, {mean2, var2}};
  bkn::group_norm::forward(B{}, opt, a, xd.cview(), yd.view, ws.bytes());
  bkn::group_norm::backward(B{}, opt, a, xd.cview(), dyd.cview(), dxd.view, ws.bytes());
  bkn::group_norm::forward(B{}, opt, b, xf.cview(), yf.view, ws.bytes());
  bkn::group_norm::backward(B{}, opt, b, xf.cview(), dyf.cview(), dxf.view, ws.bytes());
  CHECK(mean == mean2);  // statistics of the same values, accumulated in double
  CHECK(var == var2);
  CHECK(dg1 == dg2);
  CHECK(db1 == db2);
  for (std::size_t i = 0; i < yd.memory.size(); ++i) {
    CHECK(double(yf.memory[i]) == doctest::Approx(yd.memory[i]).epsilon(1e-6).scale(1));
    CHECK(double(dxf.memory[i]) == doctest::Approx(dxd.memory[i]).epsilon(1e-6).scale(1));
  }
}
