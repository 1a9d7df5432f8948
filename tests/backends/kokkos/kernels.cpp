// SPDX-License-Identifier: MIT
// The Kokkos backend's passes one by one against the reference backend, on shapes the layer
// sweep does not reach: many chunks per reduction, float data far from zero, mixed layouts.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../conformance.hpp"
#include "bkn/backends/kokkos.hpp"
#include "bkn/backends/reference.hpp"
#include "bkn/bkn.hpp"
#include "support.hpp"

namespace {

using bkn::index_t;

enum class layout { nchw, nhwc, strided };

const char* name(layout l) {
  return l == layout::nchw ? "NCHW" : l == layout::nhwc ? "NHWC" : "strided";
}

/// A tensor of one layout; `strided` pads every axis, so the view has gaps.
template <class T>
struct tensor {
  std::vector<T> memory;
  bkn::tensor_view<T> view;

  tensor(layout l, index_t N, index_t C, index_t H, index_t W) {
    switch (l) {
      case layout::nchw:
        memory.assign(std::size_t(N * C * H * W), T(0));
        view = bkn::nchw(memory.data(), N, C, H, W);
        break;
      case layout::nhwc:
        memory.assign(std::size_t(N * C * H * W), T(0));
        view = bkn::nhwc(memory.data(), N, C, H, W);
        break;
      case layout::strided: {
        const bkn::tensor_strides s{(C + 1) * (H + 2) * (W + 1), (H + 2) * (W + 1), W + 1, 1};
        memory.assign(std::size_t(N * s.batch), T(0));
        view = bkn::strided(memory.data(), {N, C, H, W}, s);
        break;
      }
    }
  }
  bkn::tensor_view<const T> cview() const { return view; }
};

/// Exactly the scratch the backend asks for, followed by a canary that must survive the pass.
struct scratch_buffer {
  static constexpr std::size_t canary = 256;
  std::vector<double> memory;  // doubles: the backend's partials need their alignment
  std::size_t bytes;

  explicit scratch_buffer(std::size_t b)
      : memory((b + canary) / sizeof(double) + 1, -1.5), bytes(b) {}
  bkn::span<std::byte> span() {
    return {reinterpret_cast<std::byte*>(memory.data()), index_t(bytes)};
  }
  bool canary_intact() const {
    return std::all_of(
        memory.begin() + std::ptrdiff_t((bytes + sizeof(double) - 1) / sizeof(double)),
        memory.end(), [](double v) { return v == -1.5; });
  }
};

template <class V>
double relative_error(const std::vector<V>& got, const std::vector<V>& want) {
  double scale = 0, err = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    scale = std::max(scale, std::abs(double(want[i])));
    err = std::max(err, std::abs(double(got[i]) - double(want[i])));
  }
  return err / (scale + 1e-300);
}

template <class V>
bool same_bits(const std::vector<V>& a, const std::vector<V>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(V)) == 0);
}

template <class Backend>
using kernels = bkn::kernels<Backend>;

/// Every output of the three reductions on one backend, flattened.
template <class P>
struct statistics {
  std::vector<P> mean, var, cov, sum_dy, sum_dy_centred;
};

template <class Backend, class T, class P>
statistics<P> reduce(const Backend& backend, const tensor<T>& x, const tensor<T>& dy,
                     index_t group_size) {
  const bkn::tensor_shape s = x.view.shape();
  const index_t G = s.batch / group_size, C = s.channels;
  statistics<P> r;
  r.mean.assign(std::size_t(G * C), P(-7));
  r.var = r.sum_dy = r.sum_dy_centred = r.mean;
  r.cov.assign(std::size_t(G * C * C), P(-7));
  scratch_buffer scratch(
      kernels<Backend>::scratch_bytes(backend, s, group_size, bkn::covariance::full));
  using span_p = bkn::span<P>;
  kernels<Backend>::template moments<T, P>(backend, x.cview(), group_size, span_p(r.mean),
                                           span_p(r.var), scratch.span());
  kernels<Backend>::template covariance<T, P>(
      backend, x.cview(), group_size, bkn::span<const P>(r.mean), span_p(r.cov), scratch.span());
  kernels<Backend>::template sums<T, P>(backend, dy.cview(), x.cview(), bkn::span<const P>(r.mean),
                                        group_size, span_p(r.sum_dy), span_p(r.sum_dy_centred),
                                        scratch.span());
  CHECK(scratch.canary_intact());
  return r;
}

template <class T>
void fill(tensor<T>& t, std::mt19937& rng, double offset, double scale) {
  std::normal_distribution<double> normal;
  const bkn::tensor_shape s = t.view.shape();
  for (index_t n = 0; n < s.batch; ++n)
    for (index_t c = 0; c < s.channels; ++c)
      for (index_t k = 0; k < s.spatial(); ++k)
        t.view.at(n, c, k) = T(offset + 0.5 * double(c) + scale * normal(rng));
}

struct reduction_case {
  index_t batch, channels, height, width, group_size;
  layout x_layout, dy_layout;
};

std::string describe(const reduction_case& c) {
  return std::string("x ") + name(c.x_layout) + ", dy " + name(c.dy_layout) +
         " N=" + std::to_string(c.batch) + " C=" + std::to_string(c.channels) +
         " HxW=" + std::to_string(c.height) + "x" + std::to_string(c.width) +
         " group=" + std::to_string(c.group_size);
}

// Values per (group, channel) from 80 to 9216: one chunk up to dozens of chunks, chunks that do
// not divide the rows, rows longer than a chunk, and x and dy in different layouts.
const reduction_case reduction_cases[] = {
    {16, 3, 24, 24, 16, layout::nchw, layout::nchw},
    {16, 3, 24, 24, 4, layout::nhwc, layout::nhwc},
    {8, 5, 7, 7, 8, layout::strided, layout::nhwc},
    {6, 4, 3, 600, 3, layout::nchw, layout::strided},
    {12, 2, 1, 1000, 12, layout::nhwc, layout::nchw},
    {4, 6, 5, 4, 4, layout::strided, layout::strided},
};

template <class Backend, class T, class P>
void check_reductions(const Backend& backend) {
  const double tolerance = std::is_same_v<P, double> ? 1e-12 : 4e-7;
  for (const reduction_case& c : reduction_cases) {
    CAPTURE(describe(c));
    std::mt19937 rng(3);
    tensor<T> x(c.x_layout, c.batch, c.channels, c.height, c.width);
    tensor<T> dy(c.dy_layout, c.batch, c.channels, c.height, c.width);
    fill(x, rng, 3, 2);
    fill(dy, rng, 0.1, 1);
    const auto got = reduce<Backend, T, P>(backend, x, dy, c.group_size);
    const auto want = reduce<bkn::reference_backend, T, P>({}, x, dy, c.group_size);
    CHECK(relative_error(got.mean, want.mean) <= tolerance);
    CHECK(relative_error(got.var, want.var) <= tolerance);
    CHECK(relative_error(got.cov, want.cov) <= tolerance);
    CHECK(relative_error(got.sum_dy, want.sum_dy) <= tolerance);
    CHECK(relative_error(got.sum_dy_centred, want.sum_dy_centred) <= tolerance);
    for (std::size_t i = 0; i < got.cov.size(); ++i) {
      const std::size_t C = std::size_t(c.channels), g = i / (C * C), a = i / C % C, b = i % C;
      REQUIRE(got.cov[i] == got.cov[(g * C + b) * C + a]);  // exactly symmetric
    }
  }
}

/// Both elementwise passes, out of place and in place (out = u), on one backend.
template <class T>
struct elementwise {
  std::vector<T> affine, affine_in_place, affine_uv, mix, mix_in_place;
};

template <class Backend, class T, class P>
elementwise<T> run_elementwise(const Backend& backend, layout out_layout, layout in_layout) {
  const index_t N = 6, C = 5, H = 4, W = 7, group_size = 2, G = N / group_size;
  std::mt19937 rng(9);
  std::normal_distribution<double> normal;
  tensor<T> u(in_layout, N, C, H, W), v(in_layout, N, C, H, W), out(out_layout, N, C, H, W);
  fill(u, rng, 1, 1);
  fill(v, rng, -1, 1);
  std::vector<P> a(std::size_t(G * C)), b(a.size()), k(a.size()), centre(a.size()),
      m(std::size_t(G * C * C));
  for (auto* p : {&a, &b, &k, &centre, &m})
    for (auto& e : *p) e = P(normal(rng));
  using K = kernels<Backend>;
  const bkn::span<const P> sa(a), sb(b), sk(k), sc(centre), sm(m);
  elementwise<T> r;

  std::fill(out.memory.begin(), out.memory.end(), T(-7));
  K::affine(backend, out.view, u.cview(), sa, sc, bkn::tensor_view<const T>(),
            bkn::span<const P>(), sk, group_size);
  r.affine = out.memory;
  K::affine(backend, out.view, u.cview(), sa, sc, v.cview(), sb, sk, group_size);
  r.affine_uv = out.memory;
  K::mix(backend, out.view, u.cview(), sa, v.cview(), sm, sc, sk, group_size);
  r.mix = out.memory;

  tensor<T> w = u;  // in place: out is the same view as u
  w.view = bkn::tensor_view<T>(w.memory.data(), u.view.shape(), u.view.strides());
  K::affine(backend, w.view, w.cview(), sa, sc, v.cview(), sb, sk, group_size);
  r.affine_in_place = w.memory;
  w.memory = u.memory;
  K::mix(backend, w.view, w.cview(), sa, v.cview(), sm, sc, sk, group_size);
  r.mix_in_place = w.memory;
  return r;
}

template <class Backend, class T, class P>
void check_elementwise(const Backend& backend) {
  // The reference's expression in double, rounded once: only the compiler's contraction of
  // a * b + c into fma could tell them apart.
  const double tolerance = std::is_same_v<T, double> ? 1e-15 : 1e-7;
  const layout layouts[] = {layout::nchw, layout::nhwc, layout::strided};
  for (layout out_layout : layouts)
    for (layout in_layout : layouts) {
      CAPTURE(name(out_layout));
      CAPTURE(name(in_layout));
      const auto got = run_elementwise<Backend, T, P>(backend, out_layout, in_layout);
      const auto want = run_elementwise<bkn::reference_backend, T, P>({}, out_layout, in_layout);
      CHECK(relative_error(got.affine, want.affine) <= tolerance);
      CHECK(relative_error(got.affine_uv, want.affine_uv) <= tolerance);
      CHECK(relative_error(got.mix, want.mix) <= tolerance);
      CHECK(relative_error(got.affine_in_place, want.affine_in_place) <= tolerance);
      CHECK(relative_error(got.mix_in_place, want.mix_in_place) <= tolerance);
      // The gaps of a strided output keep what they held.
      CHECK(std::count(got.affine.begin(), got.affine.end(), T(-7)) ==
            std::count(want.affine.begin(), want.affine.end(), T(-7)));
    }
}

/// Adds 1 to out[i]: every index visited exactly once leaves all ones.
struct visit_op {
  int* out;
  BKN_HOST_DEVICE void operator()(index_t i) const { out[i] += 1; }
};

template <class Backend>
void check_for_each(const Backend& backend) {
  std::vector<int> out(100003, 0);
  kernels<Backend>::for_each(backend, 0, visit_op{out.data()});
  CHECK(std::count(out.begin(), out.end(), 0) == index_t(out.size()));
  kernels<Backend>::for_each(backend, index_t(out.size()), visit_op{out.data()});
  CHECK(std::count(out.begin(), out.end(), 1) == index_t(out.size()));
}

#ifdef KOKKOS_ENABLE_SERIAL
using serial_backend = bkn::kokkos_backend<Kokkos::Serial>;
#endif
#ifdef KOKKOS_ENABLE_OPENMP
using openmp_backend = bkn::kokkos_backend<Kokkos::OpenMP>;
#endif

template <class Backend>
void check_every_pass() {
  const Backend backend{};
  SUBCASE("reductions, T = P = double") { check_reductions<Backend, double, double>(backend); }
  SUBCASE("reductions, T = P = float") { check_reductions<Backend, float, float>(backend); }
  SUBCASE("reductions, T = float, P = double") {
    check_reductions<Backend, float, double>(backend);
  }
  SUBCASE("elementwise, double") { check_elementwise<Backend, double, double>(backend); }
  SUBCASE("elementwise, float") { check_elementwise<Backend, float, float>(backend); }
  SUBCASE("elementwise, T = float, P = double") {
    check_elementwise<Backend, float, double>(backend);
  }
  SUBCASE("for_each") { check_for_each(backend); }
}

}  // namespace

TEST_CASE("kokkos backend (Serial): every pass agrees with the reference") {
#ifdef KOKKOS_ENABLE_SERIAL
  check_every_pass<serial_backend>();
#else
  MESSAGE("skipped: this Kokkos has no Serial execution space");
#endif
}

TEST_CASE("kokkos backend (OpenMP): every pass agrees with the reference") {
#ifdef KOKKOS_ENABLE_OPENMP
  check_every_pass<openmp_backend>();
#else
  MESSAGE("skipped: this Kokkos has no OpenMP execution space");
#endif
}

// Issue #5's accuracy requirement: float32 x = 1e4 + N(0, 1). E[x^2] - E[x]^2 in float would
// lose every digit of the variance; centring and double accumulation keep them.
TEST_CASE_TEMPLATE("kokkos backend: float32 statistics far from zero keep their variance", P, float,
                   double) {
  const index_t N = 32, C = 4, H = 16, W = 16;
  for (layout l : {layout::nchw, layout::nhwc}) {
    for (index_t group_size : {index_t(32), index_t(8)}) {
      CAPTURE(name(l));
      CAPTURE(group_size);
      const index_t G = N / group_size;
      std::mt19937 rng(17);
      std::normal_distribution<double> normal;
      tensor<float> x(l, N, C, H, W);
      // The exact statistics of the float values, in long double two-pass.
      std::vector<long double> sum(std::size_t(G * C), 0), m2(sum.size(), 0);
      for (index_t n = 0; n < N; ++n)
        for (index_t c = 0; c < C; ++c)
          for (index_t s = 0; s < H * W; ++s) {
            x.view.at(n, c, s) = float(1e4 + normal(rng));
            sum[std::size_t(n / group_size * C + c)] += x.view.at(n, c, s);
          }
      const long double count = group_size * H * W;
      for (index_t n = 0; n < N; ++n)
        for (index_t c = 0; c < C; ++c)
          for (index_t s = 0; s < H * W; ++s) {
            const std::size_t i = std::size_t(n / group_size * C + c);
            const long double d = x.view.at(n, c, s) - sum[i] / count;
            m2[i] += d * d;
          }
      std::vector<P> mean(sum.size()), var(sum.size());
      const auto check = [&](const char* space) {
        CAPTURE(space);
        for (std::size_t i = 0; i < sum.size(); ++i) {
          const double want_mean = double(sum[i] / count), want_var = double(m2[i] / count);
          CHECK(std::abs(double(mean[i]) - want_mean) <= 1e-6 * want_mean);
          CHECK(std::abs(double(var[i]) - want_var) <= 1e-3 * want_var);
          // Tighter than the issue asks: the only error left is the final rounding to P.
          CHECK(std::abs(double(var[i]) - want_var) <=
                (std::is_same_v<P, float> ? 3e-7 : 1e-12) * want_var);
        }
      };
#ifdef KOKKOS_ENABLE_SERIAL
      {
        const serial_backend b{};
        scratch_buffer scratch(kernels<serial_backend>::scratch_bytes(b, x.view.shape(), group_size,
                                                                      bkn::covariance::diagonal));
        kernels<serial_backend>::moments<float, P>(b, x.cview(), group_size, bkn::span<P>(mean),
                                                   bkn::span<P>(var), scratch.span());
        CHECK(scratch.canary_intact());
        check("Serial");
      }
#endif
#ifdef KOKKOS_ENABLE_OPENMP
      {
        const openmp_backend b{};
        scratch_buffer scratch(kernels<openmp_backend>::scratch_bytes(b, x.view.shape(), group_size,
                                                                      bkn::covariance::diagonal));
        kernels<openmp_backend>::moments<float, P>(b, x.cview(), group_size, bkn::span<P>(mean),
                                                   bkn::span<P>(var), scratch.span());
        CHECK(scratch.canary_intact());
        check("OpenMP");
      }
#endif
    }
  }
}

// backward's inference path sums over the whole batch with the workspace sized for the
// layer's group size: the scratch of a finer grouping must cover every coarser one.
TEST_CASE("kokkos backend: scratch for a group size covers its multiples") {
  using K = kernels<bkn::kokkos_backend<Kokkos::DefaultHostExecutionSpace>>;
  const bkn::kokkos_backend<Kokkos::DefaultHostExecutionSpace> b{};
  conformance::check_scratch_covers_multiples(b);
  std::mt19937 rng(5);
  tensor<double> x(layout::nhwc, 24, 3, 9, 70), dy(layout::nchw, 24, 3, 9, 70);
  fill(x, rng, 2, 1);
  fill(dy, rng, 0, 1);
  scratch_buffer scratch(K::scratch_bytes(b, x.view.shape(), 2, bkn::covariance::diagonal));
  std::vector<double> centre(3, 2.0), s_dy(3), s_dyx(3), r_dy(3), r_dyx(3);
  K::sums<double, double>(b, dy.cview(), x.cview(), bkn::span<const double>(centre), 24,
                          bkn::span<double>(s_dy), bkn::span<double>(s_dyx), scratch.span());
  CHECK(scratch.canary_intact());
  bkn::kernels<bkn::reference_backend>::sums<double, double>(
      {}, dy.cview(), x.cview(), bkn::span<const double>(centre), 24, bkn::span<double>(r_dy),
      bkn::span<double>(r_dyx), {});
  CHECK(relative_error(s_dy, r_dy) <= 1e-12);
  CHECK(relative_error(s_dyx, r_dyx) <= 1e-12);
}

/// The logical values of a view, in (n, c, h, w) order.
template <class T>
std::vector<std::remove_const_t<T>> values(const bkn::tensor_view<T>& v) {
  std::vector<std::remove_const_t<T>> r;
  const bkn::tensor_shape s = v.shape();
  for (index_t n = 0; n < s.batch; ++n)
    for (index_t c = 0; c < s.channels; ++c)
      for (index_t k = 0; k < s.spatial(); ++k) r.push_back(v.at(n, c, k));
  return r;
}

// On host spaces the channels-last reductions take a tile of channels per work item, and affine
// a whole contiguous plane: each value must still be computed as with one channel (or one row)
// per item. The same values in NCHW (one channel per item) and strided storage (rows) say what
// those give.
TEST_CASE("kokkos backend: tiles of channels and whole planes give the bits of one per item") {
  using backend = bkn::kokkos_backend<Kokkos::DefaultHostExecutionSpace>;
  const backend b{};
  struct tile_case {
    index_t batch, channels, height, width, group_size;
  };
  // Full and partial tiles of 16, one chunk to several, NC and images.
  const tile_case cases[] = {{600, 37, 1, 1, 600}, {40, 16, 1, 1, 4}, {9, 3, 5, 7, 3},
                             {4, 21, 11, 13, 2}, {1100, 40, 1, 1, 1100}};
  for (const tile_case& c : cases) {
    CAPTURE(c.batch);
    CAPTURE(c.channels);
    CAPTURE(c.height);
    std::mt19937 rng(6);
    tensor<float> x_last(layout::nhwc, c.batch, c.channels, c.height, c.width);
    tensor<float> dy_last = x_last, x_first(layout::nchw, c.batch, c.channels, c.height, c.width);
    dy_last.view = bkn::tensor_view<float>(dy_last.memory.data(), x_last.view.shape(),
                                           x_last.view.strides());
    tensor<float> dy_first = x_first;
    dy_first.view = bkn::tensor_view<float>(dy_first.memory.data(), x_first.view.shape(),
                                            x_first.view.strides());
    fill(x_last, rng, 100, 3);
    fill(dy_last, rng, 0, 1);
    rng.seed(6);
    fill(x_first, rng, 100, 3);
    fill(dy_first, rng, 0, 1);
    REQUIRE(values(x_last.view) == values(x_first.view));
    const auto tiles = reduce<backend, float, double>(b, x_last, dy_last, c.group_size);
    const auto one = reduce<backend, float, double>(b, x_first, dy_first, c.group_size);
    CHECK(same_bits(tiles.mean, one.mean));
    CHECK(same_bits(tiles.var, one.var));
    CHECK(same_bits(tiles.sum_dy, one.sum_dy));
    CHECK(same_bits(tiles.sum_dy_centred, one.sum_dy_centred));
  }
  for (const layout in_layout : {layout::nchw, layout::strided}) {
    CAPTURE(name(in_layout));
    // In double: a float output would round most differences of the double expression away.
    const auto planes = run_elementwise<backend, double, double>(b, layout::nchw, in_layout);
    const auto rows = run_elementwise<backend, double, double>(b, layout::strided, in_layout);
    const auto logical = [](const std::vector<double>& memory, layout l) {
      tensor<double> t(l, 6, 5, 4, 7);  // run_elementwise's shape
      t.memory = memory;
      return values(bkn::tensor_view<const double>(t.memory.data(), t.view.shape(),
                                                   t.view.strides()));
    };
    CHECK(logical(planes.affine, layout::nchw) == logical(rows.affine, layout::strided));
    CHECK(logical(planes.affine_uv, layout::nchw) == logical(rows.affine_uv, layout::strided));
  }
}

// The per-pass view of thread-count independence, on shapes with many chunks per reduction
// (the layer sweep has at most four).
TEST_CASE("kokkos backend: every pass on OpenMP gives the bits of Serial") {
#if defined(KOKKOS_ENABLE_OPENMP) && defined(KOKKOS_ENABLE_SERIAL)
  MESSAGE("OpenMP execution space, " << kokkos_test::openmp_team_size() << " threads, vs Serial");
  for (const reduction_case& c : reduction_cases) {
    CAPTURE(describe(c));
    std::mt19937 rng(4);
    tensor<float> x(c.x_layout, c.batch, c.channels, c.height, c.width);
    tensor<float> dy(c.dy_layout, c.batch, c.channels, c.height, c.width);
    fill(x, rng, 100, 3);
    fill(dy, rng, 0, 1);
    const auto got = reduce<openmp_backend, float, float>({}, x, dy, c.group_size);
    const auto want = reduce<serial_backend, float, float>({}, x, dy, c.group_size);
    CHECK(same_bits(got.mean, want.mean));
    CHECK(same_bits(got.var, want.var));
    CHECK(same_bits(got.cov, want.cov));
    CHECK(same_bits(got.sum_dy, want.sum_dy));
    CHECK(same_bits(got.sum_dy_centred, want.sum_dy_centred));
  }
  const auto got =
      run_elementwise<openmp_backend, float, double>({}, layout::nhwc, layout::strided);
  const auto want =
      run_elementwise<serial_backend, float, double>({}, layout::nhwc, layout::strided);
  CHECK(same_bits(got.affine_uv, want.affine_uv));
  CHECK(same_bits(got.mix, want.mix));
#else
  MESSAGE("skipped: this Kokkos lacks the OpenMP or the Serial execution space");
#endif
}

// The routines take all their memory from the caller: no pass allocates, Kokkos's kernel
// labels included (they fit std::string's small buffer).
TEST_CASE("kokkos backend: passes do not allocate") {
  using backend = bkn::kokkos_backend<Kokkos::DefaultHostExecutionSpace>;
  using K = kernels<backend>;
  const backend b{};
  std::mt19937 rng(8);
  tensor<float> x(layout::nhwc, 8, 3, 20, 30), dy(layout::nchw, 8, 3, 20, 30),
      out(layout::nchw, 8, 3, 20, 30);
  fill(x, rng, 1, 1);
  fill(dy, rng, 0, 1);
  std::vector<double> m(3 * 4), v(m.size()), cov(3 * 3 * 4), s1(m.size()), s2(m.size());
  std::vector<double> a(m.size(), 0.5), k(m.size(), 0.25), M(cov.size(), 0.125);
  std::vector<int> visited(1000, 0);
  scratch_buffer scratch(K::scratch_bytes(b, x.view.shape(), 2, bkn::covariance::full));
  const long before = kokkos_test::allocations();
  K::moments<float, double>(b, x.cview(), 2, bkn::span<double>(m), bkn::span<double>(v),
                            scratch.span());
  K::covariance<float, double>(b, x.cview(), 2, bkn::span<const double>(m), bkn::span<double>(cov),
                               scratch.span());
  K::sums<float, double>(b, dy.cview(), x.cview(), bkn::span<const double>(m), 2,
                         bkn::span<double>(s1), bkn::span<double>(s2), scratch.span());
  K::affine<float, double>(b, out.view, dy.cview(), bkn::span<const double>(a),
                           bkn::span<const double>(m), x.cview(), bkn::span<const double>(a),
                           bkn::span<const double>(k), 2);
  K::mix<float, double>(b, out.view, dy.cview(), bkn::span<const double>(a), x.cview(),
                        bkn::span<const double>(M), bkn::span<const double>(m),
                        bkn::span<const double>(k), 2);
  K::for_each(b, index_t(visited.size()), visit_op{visited.data()});
  b.space.fence();
  const long during = kokkos_test::allocations() - before;
  CHECK(during == 0);
  CHECK(scratch.canary_intact());
}
