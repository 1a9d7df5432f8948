// SPDX-License-Identifier: MIT
// The Eigen backend's kernels against the reference backend: every kernel over shapes, group
// sizes, layouts, type pairs and thread counts; offset data, constant channels, determinism.

// Any heap allocation by Eigen inside a kernel trips an assertion (see no_malloc below). Must
// come before the first Eigen include.
#define EIGEN_RUNTIME_NO_MALLOC

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bkn/backends/eigen.hpp"
#include "bkn/backends/reference.hpp"

namespace {

using bkn::index_t;
using eigen = bkn::kernels<bkn::eigen_backend>;
using reference = bkn::kernels<bkn::reference_backend>;

template <class Tensor, class Param>
struct types {
  using T = Tensor;
  using P = Param;
};

// ---- tensors in every layout ----

enum class layout { nc, nchw, nhwc, strided_first, strided_last };
constexpr layout all_layouts[] = {layout::nc, layout::nchw, layout::nhwc, layout::strided_first,
                                  layout::strided_last};

const char* name(layout l) {
  switch (l) {
    case layout::nc: return "nc";
    case layout::nchw: return "nchw";
    case layout::nhwc: return "nhwc";
    case layout::strided_first: return "strided channels-first";
    case layout::strided_last: return "strided channels-last";
  }
  return "?";
}

bool applies(layout l, const bkn::tensor_shape& s) { return l != layout::nc || s.spatial() == 1; }

/// Logical element (n, c, s) of a dense NCHW vector.
index_t logical_index(const bkn::tensor_shape& s, index_t n, index_t c, index_t p) {
  return (n * s.channels + c) * s.spatial() + p;
}

/// A tensor stored in one layout. Storage outside the view holds NaN, so a pass that reads
/// padding poisons its result, and one that writes it is caught by padding_intact().
template <class T>
struct stored_tensor {
  std::vector<T> storage;
  std::vector<char> in_view;
  bkn::tensor_view<T> view;

  stored_tensor(layout l, const bkn::tensor_shape& s, const std::vector<T>& values) {
    const index_t N = s.batch, C = s.channels, H = s.height, W = s.width;
    bkn::tensor_strides st;
    index_t offset = 0;
    switch (l) {
      case layout::nc:
      case layout::nchw: st = {C * H * W, H * W, W, 1}; break;
      case layout::nhwc: st = {H * W * C, 1, W * C, C}; break;
      case layout::strided_first:
        // Every other element of padded lines: neither planes nor channels are contiguous.
        offset = 11;
        st.width = 2;
        st.height = 2 * W + 3;
        st.channel = H * st.height + 5;
        st.batch = C * st.channel + 7;
        break;
      case layout::strided_last:
        // The first C channels of a wider NHWC buffer with padded lines and samples.
        offset = 2;
        st.channel = 1;
        st.width = C + 3;
        st.height = W * st.width + 5;
        st.batch = H * st.height + 2;
        break;
    }
    const index_t size = offset + (N - 1) * st.batch + (C - 1) * st.channel +
                         (H - 1) * st.height + (W - 1) * st.width + 1;
    storage.assign(static_cast<std::size_t>(size), std::numeric_limits<T>::quiet_NaN());
    in_view.assign(storage.size(), 0);
    T* data = storage.data() + offset;
    if (l == layout::nc)
      view = bkn::nc(data, N, C);
    else if (l == layout::nchw)
      view = bkn::nchw(data, N, C, H, W);
    else if (l == layout::nhwc)
      view = bkn::nhwc(data, N, C, H, W);
    else
      view = bkn::strided(data, s, st);
    for (index_t n = 0; n < N; ++n)
      for (index_t c = 0; c < C; ++c)
        for (index_t p = 0; p < s.spatial(); ++p) {
          view.at(n, c, p) = values[logical_index(s, n, c, p)];
          in_view[&view.at(n, c, p) - storage.data()] = 1;
        }
  }
  stored_tensor(const stored_tensor&) = delete;
  stored_tensor& operator=(const stored_tensor&) = delete;

  bkn::tensor_view<const T> in() const { return view; }

  std::vector<T> logical() const {
    const bkn::tensor_shape& s = view.shape();
    std::vector<T> out(static_cast<std::size_t>(s.elements()));
    for (index_t n = 0; n < s.batch; ++n)
      for (index_t c = 0; c < s.channels; ++c)
        for (index_t p = 0; p < s.spatial(); ++p) out[logical_index(s, n, c, p)] = view.at(n, c, p);
    return out;
  }

  bool padding_intact() const {
    for (std::size_t i = 0; i < storage.size(); ++i)
      if (!in_view[i] && !std::isnan(storage[i])) return false;
    return true;
  }
};

// ---- running the backends ----

/// Forbids Eigen heap allocation while alive: the kernels must take all memory from scratch
/// or the stack. (Checked where eigen_assert is on, i.e. without NDEBUG.)
struct no_malloc {
  no_malloc() { Eigen::internal::set_is_malloc_allowed(false); }
  ~no_malloc() { Eigen::internal::set_is_malloc_allowed(true); }
  no_malloc(const no_malloc&) = delete;
  no_malloc& operator=(const no_malloc&) = delete;
};

/// Scratch of exactly scratch_bytes(), 64-byte aligned as the workspace guarantees, refilled
/// with NaN bytes before each pass so that nothing can rely on its contents.
struct scratch_buffer {
  struct release {
    void operator()(std::byte* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<std::byte, release> memory;
  std::size_t bytes = 0;

  explicit scratch_buffer(std::size_t n) : bytes(n) {
    if (n > 0) memory.reset(static_cast<std::byte*>(::operator new(n, std::align_val_t{64})));
  }
  bkn::span<std::byte> fresh() {
    if (bytes == 0) return {};
    std::memset(memory.get(), 0xff, bytes);
    return {memory.get(), static_cast<index_t>(bytes)};
  }
};

template <class P>
std::vector<P> poisoned(index_t n) {
  return std::vector<P>(static_cast<std::size_t>(n), std::numeric_limits<P>::quiet_NaN());
}

// ---- problems and their reference results ----

/// Inputs of every kernel for one shape and group size, in dense NCHW order, with the
/// reference backend's results and the tolerance of each output element.
///
/// Tolerances. The reference accumulates in double; the Eigen backend sums blocks of at most
/// 4096 values per channel in T and merges blocks in double. With round-to-nearest, the
/// rounding errors of a running sum are independent and of either sign, so the error of a sum
/// of m terms in precision eps is about eps * sqrt(sum of squared partial sums) <=
/// eps * sqrt(m) * (|sum| + ||terms||_2); 4x that is the bound (4 standard deviations). Means
/// and variances are sums divided by m. Covariance gathers and multiplies in double (eps of
/// double). Every result is finally rounded to P (eps_P relative). affine and mix compute in
/// W, the wider of T and P: at most 4 (affine) or C + 2 (mix) roundings of terms bounded by
/// the sum of their magnitudes (the classical dot-product bound), then one rounding to T.
template <class T, class P>
struct problem {
  using W = std::common_type_t<T, P>;
  static constexpr double eps_t = std::numeric_limits<T>::epsilon();
  static constexpr double eps_p = std::numeric_limits<P>::epsilon();
  static constexpr double eps_w = std::numeric_limits<W>::epsilon();
  static constexpr double eps_d = std::numeric_limits<double>::epsilon();

  bkn::tensor_shape shape;
  index_t group_size, groups, count;
  std::vector<T> x, dy, u, v;
  std::vector<P> a, b, k, centre, matrix;

  std::vector<P> mean, var, cov, sum_dy, sum_dy_centred;
  std::vector<T> affine_u, affine_uv, mixed;
  std::vector<double> mean_tol, var_tol, cov_tol, sum_dy_tol, sum_dy_centred_tol, affine_u_tol,
      affine_uv_tol, mix_tol;

  problem(bkn::tensor_shape s, index_t gs, std::uint64_t seed)
      : shape(s), group_size(gs), groups(s.batch / gs), count(gs * s.spatial()) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    std::uniform_real_distribution<double> uniform(-1, 1);
    const index_t N = s.batch, C = s.channels, S = s.spatial(), G = groups;
    const std::size_t elements = static_cast<std::size_t>(s.elements());
    // Channel offsets and scales, so that centring matters.
    std::vector<double> offset(C), scale(C);
    for (index_t c = 0; c < C; ++c) {
      offset[c] = 3 * uniform(rng);
      scale[c] = 1.25 + 0.75 * uniform(rng);
    }
    x.resize(elements);
    for (index_t n = 0; n < N; ++n)
      for (index_t c = 0; c < C; ++c)
        for (index_t p = 0; p < S; ++p)
          x[logical_index(s, n, c, p)] = T(offset[c] + scale[c] * normal(rng));
    auto fill_normal = [&](auto& values, std::size_t n, double sd) {
      values.resize(n);
      for (auto& e : values) e = static_cast<std::decay_t<decltype(e)>>(sd * normal(rng));
    };
    fill_normal(dy, elements, 1);
    fill_normal(u, elements, 1);
    fill_normal(v, elements, 1);
    fill_normal(a, G * C, 1);
    fill_normal(b, G * C, 1);
    fill_normal(k, G * C, 1);
    fill_normal(matrix, G * C * C, 1 / std::sqrt(double(C)));

    const bkn::reference_backend ref;
    const auto xv = dense(x), dyv = dense(dy), uv = dense(u), vv = dense(v);
    mean = poisoned<P>(G * C);
    var = poisoned<P>(G * C);
    reference::moments<T, P>(ref, xv, gs, mean, var, {});
    cov = poisoned<P>(G * C * C);
    reference::covariance<T, P>(ref, xv, gs, mean, cov, {});
    centre.resize(G * C);
    for (index_t i = 0; i < G * C; ++i)
      centre[i] = P(double(mean[i]) + 0.1 * normal(rng) * std::sqrt(double(var[i])));
    sum_dy = poisoned<P>(G * C);
    sum_dy_centred = poisoned<P>(G * C);
    reference::sums<T, P>(ref, dyv, xv, centre, gs, sum_dy, sum_dy_centred, {});
    affine_u = poisoned<T>(s.elements());
    affine_uv = poisoned<T>(s.elements());
    mixed = poisoned<T>(s.elements());
    reference::affine<T, P>(ref, dense(affine_u), uv, a, centre, {}, {}, k, gs);
    reference::affine<T, P>(ref, dense(affine_uv), uv, a, centre, vv, b, k, gs);
    reference::mix<T, P>(ref, dense(mixed), uv, a, vv, matrix, centre, k, gs);
    tolerances();
  }

  template <class U>
  bkn::tensor_view<U> dense(std::vector<U>& values) const {
    return bkn::nchw(values.data(), shape.batch, shape.channels, shape.height, shape.width);
  }
  template <class U>
  bkn::tensor_view<const U> dense(const std::vector<U>& values) const {
    return bkn::nchw(values.data(), shape.batch, shape.channels, shape.height, shape.width);
  }

  void tolerances() {
    const index_t C = shape.channels, S = shape.spatial(), G = groups;
    const double root_m = std::sqrt(double(count));
    const double tiny = std::numeric_limits<P>::min();
    mean_tol.resize(G * C);
    var_tol.resize(G * C);
    sum_dy_tol.resize(G * C);
    sum_dy_centred_tol.resize(G * C);
    cov_tol.resize(G * C * C);
    for (index_t g = 0; g < G; ++g)
      for (index_t c = 0; c < C; ++c) {
        const index_t i = g * C + c;
        const double sd = std::sqrt(double(var[i]));
        mean_tol[i] = eps_p * std::abs(double(mean[i])) + 4 * eps_t * root_m * sd + tiny;
        // Partial moments merge through (mean_a - mean_b)^2, whose rounding scales with
        // |mean| * sd: an offset channel's variance carries that on top of its own.
        var_tol[i] = (eps_p + 4 * eps_t * root_m) * double(var[i]) +
                     4 * eps_t * root_m * std::abs(double(mean[i])) * sd + tiny;
        double dy2 = 0, dyc2 = 0;
        for (index_t n = g * group_size; n < (g + 1) * group_size; ++n)
          for (index_t p = 0; p < S; ++p) {
            const index_t e = logical_index(shape, n, c, p);
            const double t = double(dy[e]) * (double(x[e]) - double(centre[i]));
            dy2 += double(dy[e]) * double(dy[e]);
            dyc2 += t * t;
          }
        sum_dy_tol[i] = (eps_p + 4 * eps_t * root_m) * std::abs(double(sum_dy[i])) +
                        4 * eps_t * root_m * std::sqrt(dy2) + tiny;
        sum_dy_centred_tol[i] = (eps_p + 4 * eps_t * root_m) * std::abs(double(sum_dy_centred[i])) +
                                4 * eps_t * root_m * std::sqrt(dyc2) + tiny;
        for (index_t j = 0; j < C; ++j) {
          const index_t e = (g * C + c) * C + j;
          const double scale = std::sqrt(double(cov[(g * C + c) * C + c]) *
                                         double(cov[(g * C + j) * C + j]));
          cov_tol[e] = eps_p * std::abs(double(cov[e])) + 8 * eps_d * root_m * scale + tiny;
        }
      }
    const std::size_t elements = static_cast<std::size_t>(shape.elements());
    affine_u_tol.resize(elements);
    affine_uv_tol.resize(elements);
    mix_tol.resize(elements);
    const double tiny_t = std::numeric_limits<T>::min();
    for (index_t n = 0; n < shape.batch; ++n) {
      const index_t g = n / group_size;
      for (index_t c = 0; c < C; ++c)
        for (index_t p = 0; p < S; ++p) {
          const index_t e = logical_index(shape, n, c, p), i = g * C + c;
          const double au = std::abs(double(a[i]) * (double(u[e]) - double(centre[i]))),
                       kk = std::abs(double(k[i]));
          const double au_plain = std::abs(double(a[i]) * double(u[e]));
          const double bv = std::abs(double(b[i]) * double(v[e]));
          affine_u_tol[e] = eps_t * std::abs(double(affine_u[e])) + 4 * eps_w * (au + kk) + tiny_t;
          affine_uv_tol[e] =
              eps_t * std::abs(double(affine_uv[e])) + 4 * eps_w * (au + kk + bv) + tiny_t;
          double mv = 0;
          for (index_t j = 0; j < C; ++j)
            mv += std::abs(double(matrix[(g * C + c) * C + j]) *
                           (double(v[logical_index(shape, n, j, p)]) - double(centre[g * C + j])));
          mix_tol[e] = eps_t * std::abs(double(mixed[e])) +
                       2 * double(C + 2) * eps_w * (au_plain + kk + mv) + tiny_t;
        }
    }
  }
};

/// One CHECK per output array: the element farthest outside its tolerance, if any.
template <class A, class R>
void check_close(const std::string& what, const std::vector<A>& got, const std::vector<R>& want,
                 const std::vector<double>& tol) {
  REQUIRE(got.size() == want.size());
  double worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(double(got[i]) - double(want[i]));
    const double ratio = std::isnan(err) ? std::numeric_limits<double>::infinity() : err / tol[i];
    if (ratio > worst) {
      worst = ratio;
      at = i;
    }
  }
  CHECK_MESSAGE(worst <= 1.0, what, ": element ", at, " is ", double(got[at]), ", reference ",
                double(want[at]), ", tolerance ", tol[at], " (", worst, "x)");
}

template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

/// Everything the Eigen backend produces for one problem, layout and thread count.
template <class T, class P>
struct eigen_results {
  std::vector<P> mean, var, cov, sum_dy, sum_dy_centred;
  std::vector<T> affine_u, affine_uv, affine_into_u, affine_into_v, mixed, mixed_into_u;
  bool padding_intact = true;

  eigen_results(const problem<T, P>& pr, layout l, int threads) {
    const bkn::eigen_backend backend{threads, 1};  // threads on every size
    const bkn::tensor_shape& s = pr.shape;
    const index_t gc = pr.groups * s.channels, gs = pr.group_size;
    const stored_tensor<T> x(l, s, pr.x), dy(l, s, pr.dy), u(l, s, pr.u), v(l, s, pr.v);
    scratch_buffer scratch(eigen::scratch_bytes(backend, s, gs, bkn::covariance::full));
    const bkn::span<const P> a(pr.a), b(pr.b), k(pr.k), centre(pr.centre), matrix(pr.matrix);

    mean = poisoned<P>(gc);
    var = poisoned<P>(gc);
    cov = poisoned<P>(gc * s.channels);
    sum_dy = poisoned<P>(gc);
    sum_dy_centred = poisoned<P>(gc);
    {
      const no_malloc guard;
      eigen::moments<T, P>(backend, x.in(), gs, mean, var, scratch.fresh());
      // The reference mean, so that both backends centre the covariance on the same values.
      eigen::covariance<T, P>(backend, x.in(), gs, bkn::span<const P>(pr.mean), cov,
                              scratch.fresh());
      eigen::sums<T, P>(backend, dy.in(), x.in(), centre, gs, sum_dy, sum_dy_centred,
                        scratch.fresh());
    }

    const std::vector<T> nan(static_cast<std::size_t>(s.elements()),
                             std::numeric_limits<T>::quiet_NaN());
    auto output = [&](const std::vector<T>& initial, auto&& pass) {
      stored_tensor<T> out(l, s, initial);
      {
        const no_malloc guard;
        pass(out.view);
      }
      padding_intact = padding_intact && out.padding_intact();
      return out.logical();
    };
    affine_u = output(nan, [&](bkn::tensor_view<T> o) {
      eigen::affine<T, P>(backend, o, u.in(), a, centre, {}, {}, k, gs);
    });
    affine_uv = output(nan, [&](bkn::tensor_view<T> o) {
      eigen::affine<T, P>(backend, o, u.in(), a, centre, v.in(), b, k, gs);
    });
    affine_into_u = output(pr.u, [&](bkn::tensor_view<T> o) {
      eigen::affine<T, P>(backend, o, o, a, centre, v.in(), b, k, gs);
    });
    affine_into_v = output(pr.v, [&](bkn::tensor_view<T> o) {
      eigen::affine<T, P>(backend, o, u.in(), a, centre, o, b, k, gs);
    });
    mixed = output(nan, [&](bkn::tensor_view<T> o) {
      eigen::mix<T, P>(backend, o, u.in(), a, v.in(), matrix, centre, k, gs);
    });
    mixed_into_u = output(pr.u, [&](bkn::tensor_view<T> o) {
      eigen::mix<T, P>(backend, o, o, a, v.in(), matrix, centre, k, gs);
    });
  }

  bool operator==(const eigen_results& o) const {
    return bitwise_equal(mean, o.mean) && bitwise_equal(var, o.var) &&
           bitwise_equal(cov, o.cov) && bitwise_equal(sum_dy, o.sum_dy) &&
           bitwise_equal(sum_dy_centred, o.sum_dy_centred) &&
           bitwise_equal(affine_u, o.affine_u) && bitwise_equal(affine_uv, o.affine_uv) &&
           bitwise_equal(affine_into_u, o.affine_into_u) &&
           bitwise_equal(affine_into_v, o.affine_into_v) && bitwise_equal(mixed, o.mixed) &&
           bitwise_equal(mixed_into_u, o.mixed_into_u);
  }
};

template <class T, class P>
void check_against_reference(const problem<T, P>& pr, layout l, int threads) {
  const bkn::tensor_shape& s = pr.shape;
  std::ostringstream where;
  where << "N=" << s.batch << " C=" << s.channels << " HxW=" << s.height << "x" << s.width
        << " group_size=" << pr.group_size << " " << name(l) << " threads=" << threads;
  const std::string at = where.str() + " ";
  const eigen_results<T, P> got(pr, l, threads);
  check_close(at + "mean", got.mean, pr.mean, pr.mean_tol);
  check_close(at + "var", got.var, pr.var, pr.var_tol);
  check_close(at + "covariance", got.cov, pr.cov, pr.cov_tol);
  check_close(at + "sum_dy", got.sum_dy, pr.sum_dy, pr.sum_dy_tol);
  check_close(at + "sum_dy_centred", got.sum_dy_centred, pr.sum_dy_centred,
              pr.sum_dy_centred_tol);
  check_close(at + "affine(u)", got.affine_u, pr.affine_u, pr.affine_u_tol);
  check_close(at + "affine(u, v)", got.affine_uv, pr.affine_uv, pr.affine_uv_tol);
  check_close(at + "affine, out = u", got.affine_into_u, pr.affine_uv, pr.affine_uv_tol);
  check_close(at + "affine, out = v", got.affine_into_v, pr.affine_uv, pr.affine_uv_tol);
  check_close(at + "mix", got.mixed, pr.mixed, pr.mix_tol);
  check_close(at + "mix, out = u", got.mixed_into_u, pr.mixed, pr.mix_tol);
  CHECK_MESSAGE(got.padding_intact, at, "an output pass wrote outside its view");
}

std::vector<index_t> group_sizes(index_t batch) {
  std::vector<index_t> sizes{1};
  if (batch % 2 == 0 && batch > 2) sizes.push_back(2);
  if (batch > 1) sizes.push_back(batch);
  return sizes;
}

/// How far out is from a (u - m) + k (+ b v, with_v), in double, over 4 epsilon of T times the
/// terms' magnitudes: at most 1 within tolerance; NaN counts as far beyond.
template <class T>
double affine_error(T out, T u, T v, T a, T m, T k, T b, bool with_v) {
  const double au = double(a) * (double(u) - double(m));
  const double bv = with_v ? double(b) * double(v) : 0.0;
  const double tol = 4 * std::numeric_limits<T>::epsilon() *
                     (std::abs(au) + std::abs(double(k)) + std::abs(bv) +
                      std::abs(double(u)) * std::abs(double(a)));
  const double err = std::abs(double(out) - (au + double(k) + bv));
  return std::isnan(err) ? 1e300 : err / tol;
}

/// Per-channel a, m, k and b of affine, each value drawn from N(0, 1).
template <class T>
struct affine_coefficients {
  std::vector<T> a, m, k, b;
  affine_coefficients(index_t C, std::mt19937_64& rng) : a(C), m(C), k(C), b(C) {
    std::normal_distribution<double> normal;
    for (index_t c = 0; c < C; ++c) {
      a[c] = T(normal(rng));
      m[c] = T(normal(rng));
      k[c] = T(normal(rng));
      b[c] = T(normal(rng));
    }
  }
};

}  // namespace

TEST_CASE_TEMPLATE("eigen kernels agree with the reference backend", Types,
                   types<float, float>, types<float, double>, types<double, float>,
                   types<double, double>) {
  using T = typename Types::T;
  using P = typename Types::P;
  std::uint64_t seed = 1;
  // Channel counts past the sweep: 40 and 67 take every register tile of the short-row
  // passes (four, two and one packets) and a scalar tail; 67 and 130 the wide-row passes packet
  // by packet. The wide rows of at most eight packets go in tiles of eight, four, two and one:
  // on AVX2, 40, 63 and 64 take all of them in float, 31 and 32 in double.
  for (index_t N : {1, 2, 3, 8, 32})
    for (index_t C : {1, 3, 16, 31, 32, 40, 63, 64, 67, 130})
      for (const auto& [H, W] : {std::pair<index_t, index_t>{1, 1}, {7, 7}, {5, 3}})
        for (index_t gs : group_sizes(N)) {
          const problem<T, P> pr({N, C, H, W}, gs, seed++);
          for (layout l : all_layouts)
            if (applies(l, pr.shape))
              for (int threads : {1, 2}) check_against_reference(pr, l, threads);
        }
}

TEST_CASE_TEMPLATE("float32 data far from zero: 1e4 + N(0, 1) over 65536 values", P, float,
                   double) {
  // E[x^2] - E[x]^2 in float would lose every digit here (x^2 ~ 1e8, float spacing 8); the
  // backend must stay within 1e-3 relative of the double-precision statistics.
  const bkn::tensor_shape s{16, 3, 64, 64};
  const index_t gs = 16;  // one group of 16 * 64 * 64 = 65536 values per channel
  std::mt19937_64 rng(42);
  std::normal_distribution<double> normal;
  std::vector<float> values(static_cast<std::size_t>(s.elements()));
  for (float& e : values) e = float(1e4 + normal(rng));
  const bkn::reference_backend ref;
  std::vector<P> want_mean(3), want_var(3);
  reference::moments<float, P>(ref, bkn::nchw(values.data(), 16, 3, 64, 64), gs, want_mean,
                               want_var, {});
  for (layout l : all_layouts) {
    if (!applies(l, s)) continue;
    for (int threads : {1, 2}) {
      const bkn::eigen_backend backend{threads, 1};  // threads on every size
      const stored_tensor<float> x(l, s, values);
      scratch_buffer scratch(eigen::scratch_bytes(backend, s, gs, bkn::covariance::diagonal));
      std::vector<P> mean = poisoned<P>(3), var = poisoned<P>(3);
      {
        const no_malloc guard;
        eigen::moments<float, P>(backend, x.in(), gs, mean, var, scratch.fresh());
      }
      for (index_t c = 0; c < 3; ++c) {
        const double mean_err = std::abs(double(mean[c]) / double(want_mean[c]) - 1);
        const double var_err = std::abs(double(var[c]) / double(want_var[c]) - 1);
        CHECK_MESSAGE(mean_err <= 1e-3, name(l), " threads=", threads, " channel ", c);
        CHECK_MESSAGE(var_err <= 1e-3, name(l), " threads=", threads, " channel ", c,
                      ": var ", double(var[c]), " vs ", double(want_var[c]));
        // What the design gives: centred float sums over blocks of <= 4096 values err by about
        // eps_float * sqrt(4096) / 4 ~ 2e-6 relative.
        CHECK_MESSAGE(var_err <= 2e-5, name(l), " threads=", threads, " channel ", c,
                      ": relative error ", var_err);
      }
    }
  }
}

TEST_CASE_TEMPLATE("a block's shift far from its mean: the squares summed again about the mean",
                   P, float, double) {
  // moments sums a block once, about a shift: the mean of the unit's first rows (or of the
  // start of its first plane), then the unit's mean so far. Here the first pixels of some
  // channels lie 1000 standard deviations off, so a shift is tens of the block's deviations
  // from its mean and squares - sum^2 / n would lose about eight bits: those channels must be
  // summed again. Shapes: rows of 1x1 pixels (the first 8 off), 2x2 planes (the first 4 off;
  // NCHW: one block of 1024 samples, summed twice as the first block of short planes is) and
  // 8x8 planes (the first 16 off; NCHW: two blocks of 64 samples); three channels all off (the
  // whole block again) and 16 with one off (that channel alone). Wide rows (1024 and 1027
  // channels, read eight rows side by side in blocks of 128 rows, several per thread) whose
  // mean jumps by 100 standard deviations after the first block, in one channel or in every
  // other one: later blocks are summed about a mean so far that lies far from theirs, and
  // merged with blocks whose means differ. (At 128 rows a block's squares about a shift 100
  // deviations off lose less than the tolerance: the jumps check the sums and the merges.)
  struct shape_case {
    bkn::tensor_shape shape;
    index_t off_pixels;  // the first pixels, sample by sample
    index_t jump_row;    // the samples from this one on, where not 0
  };
  for (const shape_case& sc :
       {shape_case{{4096, 3, 1, 1}, 8, 0}, shape_case{{4096, 16, 1, 1}, 8, 0},
        shape_case{{1024, 3, 2, 2}, 4, 0}, shape_case{{1024, 16, 2, 2}, 4, 0},
        shape_case{{128, 3, 8, 8}, 16, 0}, shape_case{{128, 16, 8, 8}, 16, 0},
        shape_case{{640, 1024, 1, 1}, 0, 128}, shape_case{{640, 1027, 1, 1}, 0, 128}}) {
    const bkn::tensor_shape& s = sc.shape;
    const index_t C = s.channels, S = s.spatial();
    const auto off = [&](index_t c) { return C == 3 || c == 5 || (C == 1027 && c % 2 == 0); };
    const auto shift = [&](index_t n, index_t c, index_t p) {
      if (!off(c)) return 0.0;
      if (sc.jump_row > 0) return n >= sc.jump_row ? 100.0 : 0.0;
      return n * S + p < sc.off_pixels ? 1000.0 : 0.0;
    };
    std::mt19937_64 rng(11);
    std::normal_distribution<double> normal;
    std::vector<float> values(static_cast<std::size_t>(s.elements()));
    for (index_t n = 0; n < s.batch; ++n)
      for (index_t c = 0; c < C; ++c)
        for (index_t p = 0; p < S; ++p)
          values[logical_index(s, n, c, p)] = float(1e4 + normal(rng) + shift(n, c, p));
    std::vector<double> want_mean(C), want_var(C);  // two passes in double
    for (index_t c = 0; c < C; ++c) {
      double sum = 0, squares = 0;
      for (index_t n = 0; n < s.batch; ++n)
        for (index_t p = 0; p < S; ++p) sum += values[logical_index(s, n, c, p)];
      want_mean[c] = sum / double(s.batch * S);
      for (index_t n = 0; n < s.batch; ++n)
        for (index_t p = 0; p < S; ++p) {
          const double d = values[logical_index(s, n, c, p)] - want_mean[c];
          squares += d * d;
        }
      want_var[c] = squares / double(s.batch * S);
    }
    for (layout l : all_layouts) {
      if (!applies(l, s)) continue;
      for (int threads : {1, 2}) {
        const bkn::eigen_backend backend{threads, 1};
        const stored_tensor<float> x(l, s, values);
        scratch_buffer scratch(eigen::scratch_bytes(backend, s, s.batch, bkn::covariance::diagonal));
        std::vector<P> mean = poisoned<P>(C), var = poisoned<P>(C);
        eigen::moments<float, P>(backend, x.in(), s.batch, mean, var, scratch.fresh());
        for (index_t c = 0; c < C; ++c) {
          const double var_err = std::abs(double(var[c]) / want_var[c] - 1);
          CHECK_MESSAGE(std::abs(double(mean[c]) / want_mean[c] - 1) <= 1e-6, std::string(name(l)), " ",
                        s.batch, "x", C, "x", S, " threads=", threads, " channel ", c);
          // Summed again, every channel keeps the float rounding of blocks of up to 4096
          // values (6e-6 here, as before the one-pass sums); without, the far channels err by
          // 5e-5 to 5e-4.
          CHECK_MESSAGE(var_err <= 2e-5, std::string(name(l)), " ", s.batch, "x", C, "x", S,
                        " threads=", threads, " channel ", c, ": var relative error ", var_err);
        }
      }
    }
  }
}

TEST_CASE_TEMPLATE("wide rows: affine over rows side by side, streamed or not, any alignment", T,
                   float, double) {
  // Rows whose coefficients outgrow L1 are walked eight side by side, a cache line of each row
  // at a time after single packets up to a line boundary; outputs of 8 MiB or more are written
  // with streaming stores, side by side only where every row starts on a packet (C = 1544, a
  // multiple of 8: a packet after the last whole line under SSE and AVX), else row by row
  // (C = 1501, a scalar tail). A view that starts 1, 2 or 3 packets past a line boundary takes
  // the leading packets, and one element past it (unaligned rows) the row-by-row path. Rows a
  // multiple of 4 KiB apart (C = 2048) go four side by side, the streamed ones on one thread
  // ending in a group of one row.
  constexpr index_t L = bkn::detail::eigen_lanes<T>;
  for (const index_t C : {index_t(1501), index_t(1544), index_t(2048)}) {
    CAPTURE(C);
    std::mt19937_64 rng(7);
    std::normal_distribution<double> normal;
    const affine_coefficients<T> drawn(C, rng);
    const std::vector<T>& a = drawn.a, &m = drawn.m, &k = drawn.k, &b = drawn.b;
    const bool streamed_sizes[] = {false, true};
    for (const bool streamed : streamed_sizes) {
      // Just over 8 MiB of output streams.
      const index_t N = streamed ? index_t(((std::size_t(8) << 20) / sizeof(T)) / C + 1) : 40;
      REQUIRE((std::size_t(N * C) * sizeof(T) >= (std::size_t(8) << 20)) == streamed);
      std::vector<T> u(std::size_t(N * C)), v(u.size());
      for (auto& e : u) e = T(normal(rng));
      for (auto& e : v) e = T(normal(rng));
      for (const index_t shift : {index_t(0), L, 2 * L, 3 * L, index_t(1)})
        for (const bool with_v : {false, true})
          for (const int threads : {1, 2}) {
            CAPTURE(streamed);
            CAPTURE(shift);
            CAPTURE(with_v);
            CAPTURE(threads);
            // The view starts `shift` elements past a 64-byte boundary; NaN around it.
            const std::size_t guard = 64;
            std::vector<T> buffer(std::size_t(N * C) + 2 * guard + 64,
                                  std::numeric_limits<T>::quiet_NaN());
            T* base = buffer.data() + guard;
            while (reinterpret_cast<std::uintptr_t>(base) % 64 != 0) ++base;
            T* out = base + shift;
            const bkn::eigen_backend backend{threads, 1};
            const auto in = [&](const std::vector<T>& values) {
              return bkn::nc(static_cast<const T*>(values.data()), N, C);
            };
            eigen::affine<T, T>(backend, bkn::nc(out, N, C), in(u), bkn::span<const T>(a),
                                bkn::span<const T>(m), with_v ? in(v) : bkn::tensor_view<const T>(),
                                with_v ? bkn::span<const T>(b) : bkn::span<const T>(),
                                bkn::span<const T>(k), N);
            double worst = 0;
            for (index_t n = 0; n < N; ++n)
              for (index_t c = 0; c < C; ++c) {
                const std::size_t e = std::size_t(n * C + c);
                worst = std::max(worst, affine_error(out[e], u[e], v[e], a[c], m[c], k[c], b[c],
                                                     with_v));
              }
            CHECK(worst <= 1.0);
            bool around_intact = true;
            for (T* p = buffer.data(); p < out; ++p)
              around_intact = around_intact && std::isnan(*p);
            for (T* p = out + N * C; p < buffer.data() + buffer.size(); ++p)
              around_intact = around_intact && std::isnan(*p);
            CHECK(around_intact);
          }
    }
  }
}

TEST_CASE_TEMPLATE("wide rows with out just past x in its page: the same bits as further on", T,
                   float, double) {
  // Where out sits 1 to eigen_store_lead_bytes past x (or v) in its page, the rows side by side
  // are walked from their last channel to their first: the same values, bit for bit, as where
  // out sits half a page further on and the rows are walked forward. Rows of 2048 values
  // (4 KiB apart or more: four side by side), 1544 and 1539 (eight; 1539 ends in single values,
  // and its rows, not all on a packet, stream row by row); every view starts 32 bytes past a
  // line, so rows have a leading packet before their first whole line; streamed (8 MiB of
  // output or more) or not, one and two threads.
  constexpr std::size_t page = bkn::detail::eigen_l1_set_period;
  constexpr std::size_t lead = bkn::detail::eigen_store_lead_bytes;
  for (const index_t C : {index_t(2048), index_t(1544), index_t(1539)}) {
    CAPTURE(C);
    std::mt19937_64 rng(11);
    std::normal_distribution<double> normal;
    const affine_coefficients<T> drawn(C, rng);
    const std::vector<T>& a = drawn.a, &m = drawn.m, &k = drawn.k, &b = drawn.b;
    const bool streamed_sizes[] = {false, true};
    for (const bool streamed : streamed_sizes) {
      const index_t N = streamed ? index_t(((std::size_t(8) << 20) / sizeof(T)) / C + 1) : 37;
      const std::size_t E = std::size_t(N * C);
      // x and v 32 bytes into a page; out d + 32 bytes into another, NaN around it.
      const std::size_t slack = 2 * page / sizeof(T);
      std::vector<T> x_buffer(E + slack), v_buffer(E + slack), out_buffer(E + 2 * slack);
      const auto on_page = [&](std::vector<T>& buffer, std::size_t bytes) {
        auto p = reinterpret_cast<std::uintptr_t>(buffer.data());
        p = (p + page - 1) / page * page + bytes;
        return reinterpret_cast<T*>(p);
      };
      T* x = on_page(x_buffer, 32);
      T* v = on_page(v_buffer, 32);
      for (std::size_t e = 0; e < E; ++e) x[e] = T(normal(rng)), v[e] = T(normal(rng));
      const auto run = [&](std::size_t d, bool with_v, int threads) {
        std::fill(out_buffer.begin(), out_buffer.end(), std::numeric_limits<T>::quiet_NaN());
        T* out = on_page(out_buffer, 32 + d);
        const bkn::eigen_backend backend{threads, 1};
        eigen::affine<T, T>(backend, bkn::nc(out, N, C),
                            bkn::nc(static_cast<const T*>(x), N, C), bkn::span<const T>(a),
                            bkn::span<const T>(m),
                            with_v ? bkn::nc(static_cast<const T*>(v), N, C)
                                   : bkn::tensor_view<const T>(),
                            with_v ? bkn::span<const T>(b) : bkn::span<const T>(),
                            bkn::span<const T>(k), N);
        bool around_intact = true;
        for (T* p = out_buffer.data(); p < out; ++p)
          around_intact = around_intact && std::isnan(*p);
        for (T* p = out + E; p < out_buffer.data() + out_buffer.size(); ++p)
          around_intact = around_intact && std::isnan(*p);
        CHECK(around_intact);
        return std::vector<T>(out, out + E);
      };
      for (const bool with_v : {false, true})
        for (const int threads : {1, 2}) {
          CAPTURE(streamed);
          CAPTURE(with_v);
          CAPTURE(threads);
          const std::vector<T> forward = run(page / 2, with_v, threads);
          double worst = 0;
          for (index_t n = 0; n < N; ++n)
            for (index_t c = 0; c < C; ++c) {
              const std::size_t e = std::size_t(n * C + c);
              worst = std::max(worst, affine_error(forward[e], x[e], v[e], a[c], m[c], k[c],
                                                   b[c], with_v));
            }
          CHECK(worst <= 1.0);
          for (const std::size_t d : {std::size_t(64), std::size_t(192), lead}) {
            CAPTURE(d);
            CHECK(run(d, with_v, threads) == forward);
          }
        }
    }
  }
}

TEST_CASE_TEMPLATE("planes: affine in blocks of whole planes or streamed runs of them", T,
                   float, double) {
  // Planes of 30x30 (900 values) go four to a block of 4096: a group of 10 samples is cut into
  // blocks of 3, 3 and 4 planes, a group of 20 or 40 into 5 or 10 blocks of 4. 40 x 64 planes
  // of floats (9.2 MB) are written with streaming stores; 20 x 8 planes are not. Planes of 7x7
  // and 3x3 in tensors of 8 MB or more are written as one streamed run over a sample's planes
  // (eigen_affine_planes_streamed), whose packets straddle two planes at every offset.
  struct size_case {
    index_t N, C, H, W;
  };
  for (const size_case size : {size_case{20, 8, 30, 30}, size_case{40, 64, 30, 30},
                               size_case{40, 1100, 7, 7}, size_case{20, 11700, 3, 3}}) {
    const index_t N = size.N, C = size.C, H = size.H, W = size.W, S = H * W;
    const std::size_t E = std::size_t(N * C * S);
    CAPTURE(N);
    CAPTURE(S);
    std::mt19937_64 rng(11);
    std::normal_distribution<double> normal;
    std::vector<T> u(E), v(E);
    for (auto& e : u) e = T(normal(rng));
    for (auto& e : v) e = T(normal(rng));
    for (const index_t group_size : {N, index_t(10)}) {
      const index_t G = N / group_size;
      std::vector<T> a(std::size_t(G * C)), m(a.size()), k(a.size()), b(a.size());
      for (std::size_t i = 0; i < a.size(); ++i) {
        a[i] = T(normal(rng));
        m[i] = T(normal(rng));
        k[i] = T(normal(rng));
        b[i] = T(normal(rng));
      }
      for (const bool with_v : {false, true})
        for (const int threads : {1, 2}) {
          CAPTURE(group_size);
          CAPTURE(with_v);
          CAPTURE(threads);
          const std::size_t guard = 64;
          std::vector<T> buffer(E + 2 * guard, std::numeric_limits<T>::quiet_NaN());
          T* out = buffer.data() + guard;
          const auto in = [&](const std::vector<T>& values) {
            return bkn::nchw(static_cast<const T*>(values.data()), N, C, H, W);
          };
          eigen::affine<T, T>(bkn::eigen_backend{threads, 1}, bkn::nchw(out, N, C, H, W), in(u),
                              bkn::span<const T>(a), bkn::span<const T>(m),
                              with_v ? in(v) : bkn::tensor_view<const T>(),
                              with_v ? bkn::span<const T>(b) : bkn::span<const T>(),
                              bkn::span<const T>(k), group_size);
          double worst = 0;
          for (index_t n = 0; n < N; ++n)
            for (index_t c = 0; c < C; ++c) {
              const std::size_t g = std::size_t((n / group_size) * C + c);
              for (index_t s = 0; s < S; ++s) {
                const std::size_t e = std::size_t((n * C + c) * S + s);
                worst = std::max(worst, affine_error(out[e], u[e], v[e], a[g], m[g], k[g], b[g],
                                                     with_v));
              }
            }
          CHECK(worst <= 1.0);
          bool around_intact = true;
          for (std::size_t i = 0; i < guard; ++i)
            around_intact =
                around_intact && std::isnan(buffer[i]) && std::isnan(buffer[guard + E + i]);
          CHECK(around_intact);
        }
    }
  }
}

TEST_CASE("short rows are prefetched only from tensors too large for the cache") {
  using bkn::detail::eigen_prefetch_rows;
  const index_t large = index_t((std::size_t(12) << 20) / sizeof(float));
  CHECK(eigen_prefetch_rows(512, large, sizeof(float)) == 8);  // 2 KiB rows, 16 KiB ahead
  CHECK(eigen_prefetch_rows(128, large, sizeof(float)) == 32);
  CHECK(eigen_prefetch_rows(256, large / 2, sizeof(double)) == 8);
  CHECK(eigen_prefetch_rows(513, large, sizeof(float)) == 0);  // rows longer than 2 KiB
  CHECK(eigen_prefetch_rows(512, large / 2, sizeof(double)) == 0);
  CHECK(eigen_prefetch_rows(512, large - 1, sizeof(float)) == 0);  // a tensor that fits in cache
}

TEST_CASE_TEMPLATE("short rows from memory: moments and sums with prefetches", T, float, double) {
  // Channels-last tensors of just over 12 MiB in rows of at most 2 KiB: the wide-row sums
  // prefetch rows ahead (eigen_prefetch_rows), a cache line of each row at a time, with a
  // scalar tail at C = 130. Dense (NHWC), and with 3 values of NaN after each row (a pixel
  // stride of C + 3: a sum that reads the padding turns NaN). Checked against double-precision
  // sums over each (group, channel), one group and two, 1 and 2 threads.
  const index_t H = 4, W = 8;
  for (const index_t C : {index_t(130), index_t(2048 / sizeof(T))})
    for (const index_t pad : {index_t(0), index_t(3)}) {
      const index_t row = C + pad;
      const std::size_t min_elements = (std::size_t(12) << 20) / sizeof(T);
      index_t N = index_t(min_elements / std::size_t(C * H * W)) + 1;
      N += N % 2;
      const bkn::tensor_shape s{N, C, H, W};
      REQUIRE(bkn::detail::eigen_prefetch_rows(C, s.elements(), sizeof(T)) > 0);
      std::mt19937_64 rng{std::uint64_t(C)};
      std::normal_distribution<double> normal;
      const index_t pixels = N * H * W;
      std::vector<T> x(std::size_t(pixels * row), std::numeric_limits<T>::quiet_NaN()), dy(x);
      for (index_t p = 0; p < pixels; ++p)
        for (index_t c = 0; c < C; ++c) {
          x[std::size_t(p * row + c)] = T(0.25 * double(c % 7) + normal(rng));
          dy[std::size_t(p * row + c)] = T(normal(rng));
        }
      const auto view = [&](const std::vector<T>& v) {
        bkn::tensor_strides st;
        st.batch = H * W * row;
        st.channel = 1;
        st.height = W * row;
        st.width = row;
        return bkn::strided(static_cast<const T*>(v.data()), s, st);
      };
      for (const index_t gs : {N, N / 2}) {
        const index_t G = N / gs, rows = gs * H * W;
        // The exact statistics, in double, per (group, channel).
        std::vector<double> mean(std::size_t(G * C)), var(mean.size()), sum_dy(mean.size()),
            sum_dy_centred(mean.size()), scale_dy(mean.size()), scale_dy_centred(mean.size());
        std::vector<T> centre(mean.size());
        for (index_t g = 0; g < G; ++g)
          for (index_t c = 0; c < C; ++c) {
            const std::size_t i = std::size_t(g * C + c);
            const auto at = [&](index_t r) { return std::size_t((g * rows + r) * row + c); };
            double sum = 0;
            for (index_t r = 0; r < rows; ++r) sum += double(x[at(r)]);
            mean[i] = sum / double(rows);
            centre[i] = T(mean[i] + 0.125);
            for (index_t r = 0; r < rows; ++r) {
              const double d = double(x[at(r)]) - mean[i];
              const double u = double(x[at(r)]) - double(centre[i]);
              var[i] += d * d / double(rows);
              sum_dy[i] += double(dy[at(r)]);
              sum_dy_centred[i] += double(dy[at(r)]) * u;
              scale_dy[i] += std::abs(double(dy[at(r)]));
              scale_dy_centred[i] += std::abs(double(dy[at(r)]) * u);
            }
          }
        // Float sums of blocks of 128 rows, merged in double.
        const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-13;
        for (const int threads : {1, 2}) {
          CAPTURE(C);
          CAPTURE(pad);
          CAPTURE(gs);
          CAPTURE(threads);
          const bkn::eigen_backend backend{threads, 1};
          scratch_buffer scratch(eigen::scratch_bytes(backend, s, gs, bkn::covariance::diagonal));
          std::vector<T> got_mean = poisoned<T>(G * C), got_var = poisoned<T>(G * C),
                         got_dy = poisoned<T>(G * C), got_dy_centred = poisoned<T>(G * C);
          eigen::moments<T, T>(backend, view(x), gs, got_mean, got_var, scratch.fresh());
          eigen::sums<T, T>(backend, view(dy), view(x), bkn::span<const T>(centre), gs, got_dy,
                            got_dy_centred, scratch.fresh());
          double worst_mean = 0, worst_var = 0, worst_dy = 0, worst_dy_centred = 0;
          for (std::size_t i = 0; i < mean.size(); ++i) {
            const auto error = [](double got, double want, double scale) {
              const double e = std::abs(got - want) / scale;
              return std::isnan(e) ? 1e300 : e;
            };
            worst_mean = std::max(worst_mean, error(got_mean[i], mean[i], std::sqrt(var[i]) + 1));
            worst_var = std::max(worst_var, error(got_var[i], var[i], var[i]));
            worst_dy = std::max(worst_dy, error(got_dy[i], sum_dy[i], scale_dy[i]));
            worst_dy_centred = std::max(
                worst_dy_centred, error(got_dy_centred[i], sum_dy_centred[i], scale_dy_centred[i]));
          }
          CHECK(worst_mean <= tol);
          CHECK(worst_var <= tol);
          CHECK(worst_dy <= tol);
          CHECK(worst_dy_centred <= tol);
        }
      }
    }
}

TEST_CASE_TEMPLATE("rows 4 KiB apart: sums in halves, the same bits as in rows of other strides",
                   T, float, double) {
  // Rows a multiple of 4 KiB apart share a set of L1, and the wide-row sums read them half a
  // group of rows at a time (eigen_column_packets_halves), in the same order: the results must
  // be the bits of the same values in rows of another stride, and near sums in double (moments
  // too, which read rows side by side at any stride). C = 1021 leaves a scalar tail; 406 rows,
  // groups of 406 and 203, end on a group of fewer than 8 rows.
  constexpr index_t shared = index_t(4096 / sizeof(T));
  const index_t N = 406;
  for (const index_t C : {shared, shared - 3, 4 * shared})
    for (const index_t gs : {N, N / 2})
      for (const int threads : {1, 2}) {
        CAPTURE(C);
        CAPTURE(gs);
        CAPTURE(threads);
        const index_t stride_shared = C <= shared ? shared : C, stride_apart = stride_shared + 16;
        std::mt19937_64 rng{std::uint64_t(C + gs)};
        std::normal_distribution<double> normal;
        const auto fill = [&](index_t stride, std::vector<T>& x, std::vector<T>& dy) {
          x.assign(std::size_t(N * stride), std::numeric_limits<T>::quiet_NaN());
          dy = x;
          rng.seed(std::uint64_t(C + gs));
          for (index_t n = 0; n < N; ++n)
            for (index_t c = 0; c < C; ++c) {
              x[std::size_t(n * stride + c)] = T(3 + 0.5 * double(c % 5) + normal(rng));
              dy[std::size_t(n * stride + c)] = T(normal(rng));
            }
        };
        std::vector<T> x_shared, dy_shared, x_apart, dy_apart;
        fill(stride_shared, x_shared, dy_shared);
        fill(stride_apart, x_apart, dy_apart);
        const auto view = [&](const std::vector<T>& v, index_t stride) {
          return bkn::strided(static_cast<const T*>(v.data()), {N, C, 1, 1},
                              {stride, 1, stride, stride});
        };
        using products = bkn::detail::eigen_products<T>;
        REQUIRE(products{dy_shared.data(), stride_shared, 1, x_apart.data(), stride_apart, 1}
                    .rows_crowd_l1());
        REQUIRE(!products{dy_apart.data(), stride_apart, 1, x_apart.data(), stride_apart, 1}
                     .rows_crowd_l1());
        const index_t G = N / gs;
        std::vector<T> centre(std::size_t(G * C));
        for (std::size_t i = 0; i < centre.size(); ++i) centre[i] = T(3 + 0.5 * double(i % 5));
        const bkn::eigen_backend backend{threads, 1};
        scratch_buffer scratch(
            eigen::scratch_bytes(backend, {N, C, 1, 1}, gs, bkn::covariance::diagonal));
        struct results {
          std::vector<T> mean, var, sum_dy, sum_dy_centred;
        };
        const auto run = [&](const std::vector<T>& x, index_t x_stride, const std::vector<T>& dy,
                             index_t dy_stride) {
          results r{poisoned<T>(G * C), poisoned<T>(G * C), poisoned<T>(G * C),
                    poisoned<T>(G * C)};
          eigen::moments<T, T>(backend, view(x, x_stride), gs, r.mean, r.var, scratch.fresh());
          eigen::sums<T, T>(backend, view(dy, dy_stride), view(x, x_stride),
                            bkn::span<const T>(centre), gs, r.sum_dy, r.sum_dy_centred,
                            scratch.fresh());
          return r;
        };
        const results want = run(x_apart, stride_apart, dy_apart, stride_apart);
        // Both matrices' rows in one set, and only dy's.
        for (const results& got : {run(x_shared, stride_shared, dy_shared, stride_shared),
                                   run(x_apart, stride_apart, dy_shared, stride_shared)}) {
          CHECK(got.mean == want.mean);
          CHECK(got.var == want.var);
          CHECK(got.sum_dy == want.sum_dy);
          CHECK(got.sum_dy_centred == want.sum_dy_centred);
        }
        // And near the sums in double, so that neither layout is wrong the same way.
        double worst = 0;
        for (index_t g = 0; g < G; ++g)
          for (index_t c = 0; c < C; ++c) {
            double sum = 0, sum_dy = 0, sum_dy_centred = 0, scale = 0;
            for (index_t n = g * gs; n < (g + 1) * gs; ++n) {
              const double xv = double(x_apart[std::size_t(n * stride_apart + c)]);
              const double dyv = double(dy_apart[std::size_t(n * stride_apart + c)]);
              sum += xv;
              sum_dy += dyv;
              sum_dy_centred += dyv * (xv - double(centre[std::size_t(g * C + c)]));
              scale += std::abs(dyv) * (1 + std::abs(xv));
            }
            const std::size_t i = std::size_t(g * C + c);
            worst = std::max({worst, std::abs(double(want.mean[i]) - sum / double(gs)),
                              std::abs(double(want.sum_dy[i]) - sum_dy) / scale,
                              std::abs(double(want.sum_dy_centred[i]) - sum_dy_centred) / scale});
          }
        CHECK(worst <= (std::is_same_v<T, float> ? 1e-5 : 1e-12));
      }
}

TEST_CASE_TEMPLATE("a constant channel has exactly zero variance", Types, types<float, float>,
                   types<float, double>, types<double, float>, types<double, double>) {
  using T = typename Types::T;
  using P = typename Types::P;
  const T constant = T(1e4 + 0.3);
  // Small and large tensors (on two threads, split into chunks).
  for (const bkn::tensor_shape& s : {bkn::tensor_shape{4, 3, 5, 7}, bkn::tensor_shape{8, 3, 64, 64},
                                     bkn::tensor_shape{32, 3, 1, 1}}) {
    std::mt19937_64 rng(7);
    std::normal_distribution<double> normal;
    std::vector<T> values(static_cast<std::size_t>(s.elements()));
    for (index_t n = 0; n < s.batch; ++n)
      for (index_t c = 0; c < s.channels; ++c)
        for (index_t p = 0; p < s.spatial(); ++p)
          values[logical_index(s, n, c, p)] = c == 1 ? constant : T(1e4 + normal(rng));
    for (index_t gs : {index_t(1), s.batch})
      for (layout l : all_layouts) {
        if (!applies(l, s)) continue;
        for (int threads : {1, 2}) {
          const bkn::eigen_backend backend{threads, 1};  // threads on every size
          const stored_tensor<T> x(l, s, values);
          scratch_buffer scratch(eigen::scratch_bytes(backend, s, gs, bkn::covariance::full));
          const index_t G = s.batch / gs;
          std::vector<P> mean = poisoned<P>(G * 3), var = poisoned<P>(G * 3);
          std::vector<P> cov = poisoned<P>(G * 9);
          {
            const no_malloc guard;
            eigen::moments<T, P>(backend, x.in(), gs, mean, var, scratch.fresh());
            eigen::covariance<T, P>(backend, x.in(), gs, bkn::span<const P>(mean), cov,
                                    scratch.fresh());
          }
          for (index_t g = 0; g < G; ++g) {
            // Every block sums (x - first value) = 0 exactly, so the mean is the constant and
            // the centred squares are 0; Chan's combine of such blocks stays exact.
            CHECK_MESSAGE(mean[g * 3 + 1] == P(constant), name(l), " threads=", threads);
            CHECK_MESSAGE(var[g * 3 + 1] == P(0), name(l), " threads=", threads, " var ",
                          double(var[g * 3 + 1]));
            // Centred on the mean as given in P: exactly 0 unless P cannot hold the constant.
            const double gap = double(constant) - double(mean[g * 3 + 1]);
            if (gap == 0)
              CHECK(cov[g * 9 + 4] == P(0));
            else
              CHECK(double(cov[g * 9 + 4]) == doctest::Approx(gap * gap).epsilon(1e-6));
            if (gs * s.spatial() > 1) CHECK(var[g * 3 + 0] > P(0));
          }
        }
      }
  }
}

TEST_CASE_TEMPLATE("results are bitwise identical across runs on two threads", Types,
                   types<float, float>, types<float, double>, types<double, double>) {
  using T = typename Types::T;
  using P = typename Types::P;
  // Tensors the default threshold (2^18 elements) would keep on one thread, on two (the
  // threshold at 1), with group sizes that give one group per thread and one group split
  // across both threads.
  for (const bkn::tensor_shape& s :
       {bkn::tensor_shape{4, 32, 24, 24}, bkn::tensor_shape{4, 3, 96, 96}})
    for (index_t gs : {index_t(1), s.batch}) {
      const problem<T, P> pr(s, gs, 99);
      for (layout l : all_layouts) {
        if (!applies(l, s)) continue;
        const eigen_results<T, P> first(pr, l, 2), second(pr, l, 2);
        CHECK_MESSAGE(first == second, name(l), " N=", s.batch, " C=", s.channels,
                      " group_size=", gs);
        // And still the right answer.
        check_close(std::string(name(l)) + " var", first.var, pr.var, pr.var_tol);
        check_close(std::string(name(l)) + " covariance", first.cov, pr.cov, pr.cov_tol);
        check_close(std::string(name(l)) + " mix", first.mixed, pr.mixed, pr.mix_tol);
      }
    }
}

TEST_CASE("covariance and mix allocate nothing for wide channel counts") {
  // C = 200: Eigen's packing buffers for the Gram products are at their largest (just under
  // 64 KiB) and mix runs many channel tiles; any heap allocation would trip no_malloc.
  const problem<double, double> pr({3, 200, 4, 5}, 3, 5);
  for (layout l : {layout::nchw, layout::nhwc, layout::strided_first})
    for (int threads : {1, 2}) {
      const eigen_results<double, double> got(pr, l, threads);
      check_close(std::string(name(l)) + " covariance", got.cov, pr.cov, pr.cov_tol);
      check_close(std::string(name(l)) + " mix", got.mixed, pr.mixed, pr.mix_tol);
    }
}

TEST_CASE("scratch_bytes covers the largest pass and grows with the team") {
  const bkn::tensor_shape small{2, 16, 4, 4}, large{8, 64, 32, 32};  // 2^19 elements
  const bkn::eigen_backend one{1}, two{2};
  CHECK(eigen::scratch_bytes(one, small, 1, bkn::covariance::diagonal) > 0);
  CHECK(eigen::scratch_bytes(one, small, 1, bkn::covariance::full) >
        eigen::scratch_bytes(one, small, 1, bkn::covariance::diagonal));
  // Small tensors run on one thread whatever the backend allows.
  CHECK(eigen::scratch_bytes(two, small, 1, bkn::covariance::full) ==
        eigen::scratch_bytes(one, small, 1, bkn::covariance::full));
  CHECK(eigen::scratch_bytes(two, large, 1, bkn::covariance::full) ==
        2 * eigen::scratch_bytes(one, large, 1, bkn::covariance::full));
  CHECK(eigen::scratch_bytes(two, {0, 16, 4, 4}, 1, bkn::covariance::full) == 0);
  CHECK(eigen::scratch_bytes(one, large, 1, bkn::covariance::full) % 64 == 0);
}

TEST_CASE("tensors of 2^16 to 2^18 values fork where their statistics pool 64 values or more") {
  // The team shows in scratch_bytes: one slot per part. NC 128x1024 (2^17 values) forks over
  // the whole batch (each statistic pools 128 values) and in groups of 64, not in groups of 32
  // and under, whose per-(group, channel) arrays are 1/32 of the tensor or more.
  const bkn::eigen_backend one{1}, two{2};
  const auto team = [&](const bkn::tensor_shape& s, index_t group_size) {
    const auto bytes = [&](const bkn::eigen_backend& b) {
      return eigen::scratch_bytes(b, s, group_size, bkn::covariance::diagonal);
    };
    REQUIRE(bytes(one) > 0);
    REQUIRE(bytes(two) % bytes(one) == 0);
    return bytes(two) / bytes(one);
  };
  CHECK(team({128, 1024, 1, 1}, 128) == 2);
  CHECK(team({128, 1024, 1, 1}, 64) == 2);
  CHECK(team({128, 1024, 1, 1}, 32) == 1);
  CHECK(team({128, 1024, 1, 1}, 2) == 1);
  CHECK(team({4, 32, 24, 24}, 1) == 2);    // 73,728 values; a sample pools 576
  CHECK(team({16, 256, 4, 4}, 2) == 1);    // 65,536 values; a group pools 32
  CHECK(team({16, 256, 4, 4}, 4) == 2);    // and 64
  CHECK(team({2, 64, 16, 15}, 2) == 1);    // 61,440 values: under a quarter of 2^18
  CHECK(team({1024, 256, 1, 1}, 2) == 2);  // 2^18 values fork in any grouping
  // A backend's own threshold moves the floor with it.
  const bkn::eigen_backend eager{2, index_t(1) << 12};
  CHECK(eigen::scratch_bytes(eager, {2, 64, 16, 15}, 2, bkn::covariance::diagonal) ==
        2 * eigen::scratch_bytes(one, {2, 64, 16, 15}, 2, bkn::covariance::diagonal));
}

TEST_CASE("for_each visits every index once, in order") {
  std::vector<index_t> seen;
  eigen::for_each(bkn::eigen_backend{4}, 100, [&](index_t i) { seen.push_back(i); });
  REQUIRE(seen.size() == 100);
  for (index_t i = 0; i < 100; ++i) CHECK(seen[i] == i);
}

namespace {
// A functor with large items: records which thread ran each index and how often.
struct heavy_items {
  std::vector<int>* visits;
  std::vector<int>* thread;
  index_t work;
  index_t work_per_item() const { return work; }
  void operator()(index_t i) const {
    ++(*visits)[std::size_t(i)];
#ifdef _OPENMP
    (*thread)[std::size_t(i)] = omp_get_thread_num();
#else
    (*thread)[std::size_t(i)] = 0;
#endif
  }
};
}  // namespace

TEST_CASE("for_each shares large items among threads, each index once") {
  // The dense transition's tiles declare work_per_item(); 100 items of 4096 multiply-adds are
  // over the default parallel_min_elements (2^18), so two threads split them in two ranges.
  for (const index_t work : {index_t(4096), index_t(1)}) {
    CAPTURE(work);
    std::vector<int> visits(100, 0), thread(100, -1);
    eigen::for_each(bkn::eigen_backend{2}, 100, heavy_items{&visits, &thread, work});
    for (index_t i = 0; i < 100; ++i) CHECK(visits[std::size_t(i)] == 1);
#ifdef _OPENMP
    // Below the threshold (work 1) every item stays on the calling thread.
    const bool shared = work == 4096 && omp_get_thread_limit() >= 2;
    const bool other_thread =
        std::any_of(thread.begin(), thread.end(), [](int t) { return t > 0; });
    if (work == 1) CHECK_FALSE(other_thread);
    if (shared) CHECK(thread[0] != thread[99]);
#endif
  }
}

TEST_CASE_TEMPLATE("short planes read side by side sum each plane as alone, bit for bit", T, float,
                   double) {
  // moments and sums read short planes (eigen_short_plane) eigen_side_planes at a time
  // (eigen_sums_about, eigen_moments_about, eigen_sums_products); every plane's sums must keep the order, and so the
  // bits, of the one-plane reductions, at every length around the packet boundaries.
  namespace d = bkn::detail;
  constexpr int side = d::eigen_side_planes;
  constexpr index_t L = d::eigen_lanes<T>;
  std::mt19937 gen(51);
  std::normal_distribution<double> z;
  int compared = 0;
  for (index_t n = 0; n <= (d::eigen_short_plane_packets + 1) * L + 3; ++n) {
    CAPTURE(n);
    const index_t stride = n + 3;  // planes apart, as channels of an NCHW slice
    std::vector<T> x(std::size_t(side * stride)), dy(x.size());
    for (auto& v : x) v = T(3 + z(gen));
    for (auto& v : dy) v = T(z(gen));
    T shift[side], sums[side], squares[side], sum_dy[side], sum_dyc[side];
    T both_sums[side], both_squares[side];
    for (int j = 0; j < side; ++j) {
      shift[j] = T(3 + 0.1 * j);
      sums[j] = squares[j] = sum_dy[j] = sum_dyc[j] = T(0.5);  // added to, not overwritten
      both_sums[j] = both_squares[j] = T(0.5);
    }
    d::eigen_sums_about<false, side>(x.data(), stride, n, shift, sums);
    d::eigen_sums_about<true, side>(x.data(), stride, n, shift, squares);
    d::eigen_moments_about<side>(x.data(), stride, n, shift, both_sums, both_squares);
    d::eigen_sums_products<side>(dy.data(), stride, x.data(), stride, n, shift, sum_dy, sum_dyc);
    for (int j = 0; j < side; ++j) {
      const T* xj = x.data() + j * stride;
      const T* dj = dy.data() + j * stride;
      T alone_dy = T(0.5), alone_dyc = T(0.5);
      d::eigen_sum_products(dj, xj, n, shift[j], alone_dy, alone_dyc);
      CHECK(sums[j] == T(0.5) + d::eigen_sum_about<false>(xj, n, shift[j]));
      CHECK(squares[j] == T(0.5) + d::eigen_sum_about<true>(xj, n, shift[j]));
      // The one-pass sums of moments: each the bits of its own reduction.
      CHECK(both_sums[j] == sums[j]);
      CHECK(both_squares[j] == squares[j]);
      CHECK(sum_dy[j] == alone_dy);
      CHECK(sum_dyc[j] == alone_dyc);
      // And the one-plane reduction itself against a long double sum.
      long double exact = 0;
      for (index_t i = 0; i < n; ++i) exact += (long double)xj[i] - (long double)shift[j];
      CHECK(std::fabs((long double)sums[j] - 0.5L - exact) <=
            1e-5L * (1 + std::fabs(exact)) * (std::is_same_v<T, float> ? 1 : 1e-8L));
      ++compared;
    }
  }
  CHECK(compared == side * ((d::eigen_short_plane_packets + 1) * L + 4));
}
