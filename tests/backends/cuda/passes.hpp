// SPDX-License-Identifier: MIT
// The CUDA backend's passes one by one against the reference backend's, written once over where
// they run: on the device (kernels.cu) or on the CPU, thread by thread (host_emulation.cu).
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../conformance.hpp"
#include "bkn/backends/cuda.hpp"
#include "support.hpp"

namespace cuda_passes {

using bkn::index_t;
using conformance::layout;

using cuda_test::wide_t;

/// Storage type T with per-channel type P.
template <class T, class P>
struct types {
  using element = T;
  using parameter = P;
};

/// The (T, P) pairs every pass is checked on (TEST_CASE_TEMPLATE_APPLY): P as the core uses it
/// for each T, and double parameters on float and __half data.
using pass_types = std::tuple<types<double, double>, types<float, float>, types<float, double>,
                              types<__half, float>, types<__half, double>,
                              types<__nv_bfloat16, float>>;
/// One shape and grouping, with the layouts of the two input tensors (x and dy for the
/// reductions, the output and the inputs for the elementwise passes).
struct pass_case {
  index_t batch, channels, height, width, group_size;
  layout first, second;
};

inline std::string describe(const pass_case& c) {
  return std::string(conformance::layout_name(c.first)) + " + " + conformance::layout_name(c.second) +
         " N=" + std::to_string(c.batch) + " C=" + std::to_string(c.channels) +
         " HxW=" + std::to_string(c.height) + "x" + std::to_string(c.width) +
         " group=" + std::to_string(c.group_size);
}

// Values per (group, channel) from 1 to 12000: one value, one chunk, many chunks of either
// kernel (4096 values a planes chunk, 512 pixels a channels-last chunk) that do not divide
// them; C from 1 (planes path even for NHWC) to 70 (three channel tiles of 32, the last one
// partial); NC, NCHW, NHWC and padded strided views; x and dy in different layouts (sums then
// takes the planes path).
inline const std::vector<pass_case>& reduction_cases() {
  static const std::vector<pass_case> cases = {
      {1, 1, 1, 1, 1, layout::nc, layout::nc},
      {1, 3, 1, 1, 1, layout::nc, layout::nc},
      {32, 16, 1, 1, 1, layout::nc, layout::nc},
      {8, 70, 1, 1, 2, layout::nc, layout::nc},
      {2, 5, 7, 7, 1, layout::nchw, layout::nchw},
      {2, 5, 7, 7, 2, layout::nhwc, layout::nhwc},
      {3, 37, 5, 3, 3, layout::nhwc, layout::nchw},
      {1, 64, 9, 9, 1, layout::nhwc, layout::nhwc},
      {3, 1, 4, 5, 1, layout::nhwc, layout::nhwc},
      {16, 3, 24, 24, 16, layout::nchw, layout::nchw},
      {16, 3, 24, 24, 4, layout::nhwc, layout::nhwc},
      {8, 5, 7, 7, 8, layout::strided, layout::nhwc},
      {6, 4, 3, 600, 3, layout::nchw, layout::strided},
      {12, 2, 1, 1000, 12, layout::nhwc, layout::nchw},
      {4, 33, 5, 4, 4, layout::strided, layout::strided},
      {5, 7, 2, 3, 5, layout::nchw, layout::nhwc},
  };
  return cases;
}

// Every pair of image layouts, and NC rows, C = 1 and a single sample.
inline const std::vector<pass_case>& elementwise_cases() {
  static const std::vector<pass_case> cases = [] {
    std::vector<pass_case> r;
    for (layout out : {layout::nchw, layout::nhwc, layout::strided})
      for (layout in : {layout::nchw, layout::nhwc, layout::strided})
        r.push_back({6, 5, 4, 7, 2, out, in});
    r.push_back({4, 37, 1, 1, 1, layout::nc, layout::nc});
    r.push_back({1, 3, 1, 1, 1, layout::nc, layout::nc});
    r.push_back({3, 1, 2, 2, 3, layout::nhwc, layout::nchw});
    r.push_back({2, 40, 3, 2, 1, layout::strided, layout::nhwc});
    return r;
  }();
  return cases;
}

/// A host tensor of `c`'s shape in layout `l`, every element (the padding of a strided view
/// too) `sentinel`, then the view's elements set to `values` ((n, c, pixel) order) if given.
template <class T>
conformance::tensor<T> make_tensor(const pass_case& c, layout l, double sentinel,
                                   const std::vector<double>& values = {}) {
  conformance::layer_case shape{};
  shape.batch = c.batch;
  shape.channels = c.channels;
  shape.height = c.height;
  shape.width = c.width;
  shape.group_size = c.group_size;
  shape.storage = l;
  conformance::tensor<T> t(shape, T(sentinel));
  if (!values.empty()) conformance::fill(t, values);
  return t;
}

/// `offset + 0.5 c + scale N(0, 1)` per element in (n, c, pixel) order, rounded to T so that a
/// run in T and the reference in wide_t<T> read the same numbers.
template <class T>
std::vector<double> draw_values(const pass_case& c, std::mt19937& rng, double offset,
                                double scale) {
  std::normal_distribution<double> normal;
  std::vector<double> v;
  for (index_t n = 0; n < c.batch; ++n)
    for (index_t ch = 0; ch < c.channels; ++ch)
      for (index_t s = 0; s < c.height * c.width; ++s)
        v.push_back(conformance::to_double(T(offset + 0.5 * double(ch) + scale * normal(rng))));
  return v;
}

/// The outputs of moments, and of covariance and sums about a given centre.
template <class P>
struct statistics {
  std::vector<P> mean, var, cov, sum_dy, sum_dy_centred;
  bool scratch_intact = true;
};

/// The per-(group, channel) coefficients of the elementwise passes and the C x C matrices of mix.
template <class P>
struct coefficients {
  std::vector<P> a, b, k, centre, matrix;
};

/// Each elementwise call's whole output memory (a strided view's padding included).
template <class T>
struct elementwise_results {
  std::vector<T> affine, affine_uv, affine_in_place, mix, mix_in_place;
};

/// Bytes after the scratch a pass is given, which it must leave as they were.
inline constexpr std::size_t canary_bytes = 256;
inline constexpr std::byte canary{0xA5};

/// Runs the passes of kernels type K on `backend`, with every buffer copied into Memory
/// (cuda_test::host_memory or device_memory) and the results copied back.
template <class K, class Backend, class Memory>
struct runner {
  Backend backend;
  Memory memory;

  template <class U>
  using buffer = typename Memory::template buffer<U>;
  template <class T>
  using mirrored = cuda_test::mirrored_tensor<T, buffer<T>>;

  template <class T, class P>
  statistics<P> statistics_of(const conformance::tensor<T>& hx, const conformance::tensor<T>& hdy,
                              const std::vector<P>& hcentre, index_t group_size) const {
    const bkn::tensor_shape shape = hx.view.shape();
    const index_t GC = shape.batch / group_size * shape.channels, GCC = GC * shape.channels;
    const mirrored<T> x(hx.memory, hx.view), dy(hdy.memory, hdy.view);
    buffer<P> mean(std::vector<P>(std::size_t(GC), P(-7))), var(mean.to_host()),
        cov(std::vector<P>(std::size_t(GCC), P(-7))), sum_dy(mean.to_host()),
        sum_dy_centred(mean.to_host()), centre_memory(hcentre);
    const std::size_t bytes = K::scratch_bytes(backend, shape, group_size, bkn::covariance::full);
    buffer<std::byte> scratch(std::vector<std::byte>(bytes + canary_bytes, canary));
    const bkn::span<std::byte> s(scratch.data(), index_t(bytes));
    const bkn::span<const P> centre(centre_memory.data(), GC);
    K::template moments<T, P>(backend, x.cview(), group_size, bkn::span<P>(mean.data(), GC),
                              bkn::span<P>(var.data(), GC), s);
    K::template covariance<T, P>(backend, x.cview(), group_size, centre,
                                 bkn::span<P>(cov.data(), GCC), s);
    K::template sums<T, P>(backend, dy.cview(), x.cview(), centre, group_size,
                           bkn::span<P>(sum_dy.data(), GC),
                           bkn::span<P>(sum_dy_centred.data(), GC), s);
    memory.synchronize();
    statistics<P> r{mean.to_host(), var.to_host(), cov.to_host(), sum_dy.to_host(),
                    sum_dy_centred.to_host()};
    const std::vector<std::byte> after = scratch.to_host();
    for (std::size_t i = bytes; i < after.size(); ++i) r.scratch_intact &= after[i] == canary;
    return r;
  }

  /// affine without and with v, mix, each into a fresh copy of `hout`; then affine and mix in
  /// place (out = u) in a copy of `hu`.
  template <class T, class P>
  elementwise_results<T> elementwise_of(const conformance::tensor<T>& hu,
                                        const conformance::tensor<T>& hv,
                                        const conformance::tensor<T>& hout,
                                        const coefficients<P>& co, index_t group_size) const {
    const mirrored<T> u(hu.memory, hu.view), v(hv.memory, hv.view);
    buffer<P> a(co.a), b(co.b), k(co.k), centre(co.centre), matrix(co.matrix);
    const auto view = [](buffer<P>& p, const std::vector<P>& host) {
      return bkn::span<const P>(p.data(), index_t(host.size()));
    };
    const auto sa = view(a, co.a), sb = view(b, co.b), sk = view(k, co.k),
               sc = view(centre, co.centre), sm = view(matrix, co.matrix);
    const auto run = [&](const conformance::tensor<T>& initial, auto&& pass) {
      mirrored<T> out(initial.memory, initial.view);
      pass(out);
      memory.synchronize();
      return out.memory.to_host();
    };
    elementwise_results<T> r;
    r.affine = run(hout, [&](mirrored<T>& out) {
      K::affine(backend, out.view, u.cview(), sa, sc, bkn::tensor_view<const T>(),
                bkn::span<const P>(), sk, group_size);
    });
    r.affine_uv = run(hout, [&](mirrored<T>& out) {
      K::affine(backend, out.view, u.cview(), sa, sc, v.cview(), sb, sk, group_size);
    });
    r.mix = run(hout, [&](mirrored<T>& out) {
      K::mix(backend, out.view, u.cview(), sa, v.cview(), sm, sc, sk, group_size);
    });
    r.affine_in_place = run(hu, [&](mirrored<T>& w) {
      K::affine(backend, w.view, w.cview(), sa, sc, v.cview(), sb, sk, group_size);
    });
    r.mix_in_place = run(hu, [&](mirrored<T>& w) {
      K::mix(backend, w.view, w.cview(), sa, v.cview(), sm, sc, sk, group_size);
    });
    return r;
  }
};

using reference_runner =
    runner<bkn::kernels<bkn::reference_backend>, bkn::reference_backend, cuda_test::host_memory>;

/// Reductions accumulate in double for double data, else in float: float sums of up to 4096
/// terms per block, 64 per thread (2048 per covariance chunk), merged over up to 24 chunks.
template <class T, class P>
double reduction_tolerance() {
  return std::is_same_v<bkn::detail::cuda_impl::accum_t<T>, double> ? 1e-12 : 2e-5;
}

/// The elementwise passes compute in the wider of float/double and P and round once to T:
/// double arithmetic leaves only T's rounding (2^-24 for float); float arithmetic a few float
/// roundings (mix sums C = 40 products); 16-bit storage its half-ulp (2^-11, 2^-8).
template <class T, class P>
double elementwise_tolerance() {
  using R = bkn::detail::cuda_impl::arith_t<T, P>;
  if constexpr (std::is_same_v<T, __half>) return 1e-3;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return 8e-3;
  else if constexpr (std::is_same_v<T, double>) return 1e-14;
  else return std::is_same_v<R, double> ? 2e-7 : 3e-6;
}

/// The mean of each (group, channel) of `values` ((n, c, pixel) order), in double, rounded to P:
/// the centre both runs of a check use, so that sums compare without the runs' means' rounding
/// (sum dy (x - m) moves by (sum dy) dm, much more than its own rounding).
template <class P>
std::vector<P> group_means(const pass_case& c, const std::vector<double>& values) {
  const index_t C = c.channels, S = c.height * c.width, G = c.batch / c.group_size;
  std::vector<double> sum(std::size_t(G * C), 0);
  for (index_t n = 0; n < c.batch; ++n)
    for (index_t ch = 0; ch < C; ++ch)
      for (index_t s = 0; s < S; ++s)
        sum[std::size_t(n / c.group_size * C + ch)] += values[std::size_t((n * C + ch) * S + s)];
  std::vector<P> mean(sum.size());
  for (std::size_t i = 0; i < sum.size(); ++i) mean[i] = P(sum[i] / double(c.group_size * S));
  return mean;
}

/// Every reduction of `run` (storage T, statistics P) against the reference in wide_t<T> on the
/// same values: mean, variance, covariance (exactly symmetric), both sums, scratch untouched
/// past scratch_bytes.
template <class T, class P, class Runner>
void check_reductions(const Runner& run) {
  using H = wide_t<T>;
  const double tolerance = reduction_tolerance<T, P>();
  for (const pass_case& c : reduction_cases()) {
    const std::string name = describe(c);
    CAPTURE(name);
    std::mt19937 rng(3);
    const std::vector<double> x = draw_values<T>(c, rng, 3, 2), dy = draw_values<T>(c, rng, 0.1, 1);
    const std::vector<P> centre = group_means<P>(c, x);
    const statistics<P> got = run.template statistics_of<T, P>(
        make_tensor<T>(c, c.first, 0, x), make_tensor<T>(c, c.second, 0, dy), centre,
        c.group_size);
    const statistics<P> want = reference_runner{}.template statistics_of<H, P>(
        make_tensor<H>(c, c.first, 0, x), make_tensor<H>(c, c.second, 0, dy), centre,
        c.group_size);
    CHECK(conformance::relative_error(got.mean, want.mean) <= tolerance);
    CHECK(conformance::relative_error(got.var, want.var) <= tolerance);
    CHECK(conformance::relative_error(got.cov, want.cov) <= tolerance);
    CHECK(conformance::relative_error(got.sum_dy, want.sum_dy) <= tolerance);
    CHECK(conformance::relative_error(got.sum_dy_centred, want.sum_dy_centred) <= tolerance);
    CHECK(got.scratch_intact);
    const std::size_t C = std::size_t(c.channels);
    for (std::size_t i = 0; i < got.cov.size(); ++i) {
      const std::size_t g = i / (C * C), a = i / C % C, b = i % C;
      REQUIRE(got.cov[i] == got.cov[(g * C + b) * C + a]);  // exactly symmetric
    }
  }
}

/// The offsets of a view's elements in its memory: what an output pass may write.
template <class T>
std::vector<bool> inside(const conformance::tensor<T>& t) {
  std::vector<bool> mask(t.memory.size(), false);
  const bkn::tensor_shape& s = t.view.shape();
  for (index_t n = 0; n < s.batch; ++n)
    for (index_t c = 0; c < s.channels; ++c)
      for (index_t p = 0; p < s.spatial(); ++p)
        mask[std::size_t(&t.view.at(n, c, p) - t.memory.data())] = true;
  return mask;
}

/// Every elementwise pass of `run` against the reference in wide_t<T> on the same values, and
/// the padding of strided outputs never written.
template <class T, class P, class Runner>
void check_elementwise(const Runner& run) {
  using H = wide_t<T>;
  const double tolerance = elementwise_tolerance<T, P>();
  const double sentinel = -7;
  for (const pass_case& c : elementwise_cases()) {
    const std::string name = describe(c);
    CAPTURE(name);
    std::mt19937 rng(9);
    std::normal_distribution<double> normal;
    const std::vector<double> u = draw_values<T>(c, rng, 1, 1), v = draw_values<T>(c, rng, -1, 1);
    const index_t GC = c.batch / c.group_size * c.channels;
    coefficients<P> co;
    for (auto* p : {&co.a, &co.b, &co.k, &co.centre}) p->resize(std::size_t(GC));
    co.matrix.resize(std::size_t(GC * c.channels));
    for (auto* p : {&co.a, &co.b, &co.k, &co.centre, &co.matrix})
      for (auto& e : *p) e = P(normal(rng));

    const elementwise_results<T> got = run.template elementwise_of<T, P>(
        make_tensor<T>(c, c.second, sentinel, u), make_tensor<T>(c, c.second, sentinel, v),
        make_tensor<T>(c, c.first, sentinel), co, c.group_size);
    const elementwise_results<H> want = reference_runner{}.template elementwise_of<H, P>(
        make_tensor<H>(c, c.second, sentinel, u), make_tensor<H>(c, c.second, sentinel, v),
        make_tensor<H>(c, c.first, sentinel), co, c.group_size);
    const auto close = [&](const std::vector<T>& g, const std::vector<H>& w) {
      return conformance::relative_error(conformance::to_double(g), conformance::to_double(w)) <=
             tolerance;
    };
    CHECK(close(got.affine, want.affine));
    CHECK(close(got.affine_uv, want.affine_uv));
    CHECK(close(got.mix, want.mix));
    CHECK(close(got.affine_in_place, want.affine_in_place));
    CHECK(close(got.mix_in_place, want.mix_in_place));
    // The padding around a strided output keeps the sentinel, bit for bit.
    const std::vector<bool> out_mask = inside(make_tensor<T>(c, c.first, sentinel)),
                            in_mask = inside(make_tensor<T>(c, c.second, sentinel));
    for (std::size_t i = 0; i < out_mask.size(); ++i) {
      if (out_mask[i]) continue;
      REQUIRE(conformance::to_double(got.affine[i]) == sentinel);
      REQUIRE(conformance::to_double(got.affine_uv[i]) == sentinel);
      REQUIRE(conformance::to_double(got.mix[i]) == sentinel);
    }
    for (std::size_t i = 0; i < in_mask.size(); ++i) {
      if (in_mask[i]) continue;
      REQUIRE(conformance::to_double(got.affine_in_place[i]) == sentinel);
      REQUIRE(conformance::to_double(got.mix_in_place[i]) == sentinel);
    }
  }
}

/// Issue #5's accuracy requirement on every path: float32 x = 1e4 + N(0, 1). E[x^2] - E[x]^2 in
/// float would lose every digit of the variance; Welford states and centring keep them.
template <class P, class Runner>
void check_far_from_zero(const Runner& run) {
  for (const pass_case& c : {pass_case{32, 4, 16, 16, 32, layout::nchw, layout::nchw},
                             pass_case{32, 4, 16, 16, 8, layout::nhwc, layout::nhwc},
                             pass_case{64, 3, 1, 1, 64, layout::nc, layout::nc}}) {
    const std::string name = describe(c);
    CAPTURE(name);
    std::mt19937 rng(17);
    std::normal_distribution<double> normal;
    std::vector<double> x;
    for (index_t i = 0; i < c.batch * c.channels * c.height * c.width; ++i)
      x.push_back(double(float(1e4 + normal(rng))));
    const statistics<P> got = run.template statistics_of<float, P>(
        make_tensor<float>(c, c.first, 0, x), make_tensor<float>(c, c.second, 0, x),
        group_means<P>(c, x), c.group_size);
    // The exact statistics of the float values: long double two-pass, in (n, c, pixel) order.
    const index_t C = c.channels, S = c.height * c.width, m = c.group_size * S;
    for (index_t g = 0; g < c.batch / c.group_size; ++g) {
      std::vector<long double> mean(std::size_t(C), 0), cov(std::size_t(C * C), 0);
      const auto at = [&](index_t j, index_t ch) {
        const index_t n = g * c.group_size + j / S;
        return (long double)x[std::size_t((n * C + ch) * S + j % S)];
      };
      for (index_t ch = 0; ch < C; ++ch) {
        for (index_t j = 0; j < m; ++j) mean[std::size_t(ch)] += at(j, ch);
        mean[std::size_t(ch)] /= m;
      }
      for (index_t a = 0; a < C; ++a)
        for (index_t b = 0; b < C; ++b) {
          for (index_t j = 0; j < m; ++j)
            cov[std::size_t(a * C + b)] +=
                (at(j, a) - mean[std::size_t(a)]) * (at(j, b) - mean[std::size_t(b)]);
          cov[std::size_t(a * C + b)] /= m;
        }
      for (index_t a = 0; a < C; ++a) {
        const std::size_t i = std::size_t(g * C + a);
        const double want_mean = double(mean[std::size_t(a)]);
        const double want_var = double(cov[std::size_t(a * C + a)]);
        CHECK(std::abs(double(got.mean[i]) - want_mean) <= 1e-6 * want_mean);
        CHECK(std::abs(double(got.var[i]) - want_var) <= 1e-3 * want_var);
        for (index_t b = 0; b < C; ++b)
          CHECK(std::abs(double(got.cov[std::size_t((g * C + a) * C + b)]) -
                         double(cov[std::size_t(a * C + b)])) <= 1e-3 * want_var);
      }
    }
  }
}

}  // namespace cuda_passes

TYPE_TO_STRING_AS("T=double P=double", cuda_passes::types<double, double>);
TYPE_TO_STRING_AS("T=float P=float", cuda_passes::types<float, float>);
TYPE_TO_STRING_AS("T=float P=double", cuda_passes::types<float, double>);
TYPE_TO_STRING_AS("T=half P=float", cuda_passes::types<__half, float>);
TYPE_TO_STRING_AS("T=half P=double", cuda_passes::types<__half, double>);
TYPE_TO_STRING_AS("T=bfloat16 P=float", cuda_passes::types<__nv_bfloat16, float>);
