// SPDX-License-Identifier: MIT
// reference_backend: plain serial loops with double accumulation, the oracle every other
// backend is tested against. Slow on purpose: each line is obviously right.
#pragma once

#include <cstddef>

#include "bkn/backend.hpp"

BKN_BEGIN_NAMESPACE

/// The oracle backend. Runs on the calling thread; every routine has returned when it returns.
struct reference_backend {};

template <>
struct kernels<reference_backend> {
  using B = reference_backend;

  static std::size_t scratch_bytes(const B&, const tensor_shape&, index_t, covariance) {
    return 0;
  }

  template <class T, class P>
  static void moments(const B&, tensor_view<const T> x, index_t group_size, span<P> mean,
                      span<P> var, span<std::byte>) {
    const index_t C = x.channels(), S = x.spatial();
    for (index_t g = 0; g * group_size < x.batch(); ++g) {
      for (index_t c = 0; c < C; ++c) {
        double sum = 0;
        for (index_t n = g * group_size; n < (g + 1) * group_size; ++n)
          for (index_t s = 0; s < S; ++s) sum += double(x.at(n, c, s));
        const double count = double(group_size * S);
        const double mu = sum / count;
        double m2 = 0;
        for (index_t n = g * group_size; n < (g + 1) * group_size; ++n)
          for (index_t s = 0; s < S; ++s) m2 += (double(x.at(n, c, s)) - mu) * (double(x.at(n, c, s)) - mu);
        mean[g * C + c] = P(mu);
        var[g * C + c] = P(m2 / count);
      }
    }
  }

  template <class T, class P>
  static void covariance(const B&, tensor_view<const T> x, index_t group_size,
                         span<const P> mean, span<P> cov, span<std::byte>) {
    const index_t C = x.channels(), S = x.spatial();
    for (index_t g = 0; g * group_size < x.batch(); ++g) {
      for (index_t i = 0; i < C; ++i) {
        for (index_t j = 0; j < C; ++j) {
          double sum = 0;
          for (index_t n = g * group_size; n < (g + 1) * group_size; ++n)
            for (index_t s = 0; s < S; ++s)
              sum += (double(x.at(n, i, s)) - double(mean[g * C + i])) *
                     (double(x.at(n, j, s)) - double(mean[g * C + j]));
          cov[(g * C + i) * C + j] = P(sum / double(group_size * S));
        }
      }
    }
  }

  template <class T, class P>
  static void sums(const B&, tensor_view<const T> dy, tensor_view<const T> x,
                   span<const P> centre, index_t group_size, span<P> sum_dy,
                   span<P> sum_dy_centred, span<std::byte>) {
    const index_t C = x.channels(), S = x.spatial();
    for (index_t g = 0; g * group_size < x.batch(); ++g) {
      for (index_t c = 0; c < C; ++c) {
        double s_dy = 0, s_dyx = 0;
        for (index_t n = g * group_size; n < (g + 1) * group_size; ++n)
          for (index_t s = 0; s < S; ++s) {
            s_dy += double(dy.at(n, c, s));
            s_dyx += double(dy.at(n, c, s)) * (double(x.at(n, c, s)) - double(centre[g * C + c]));
          }
        sum_dy[g * C + c] = P(s_dy);
        sum_dy_centred[g * C + c] = P(s_dyx);
      }
    }
  }

  template <class T, class P>
  static void affine(const B&, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
                     span<const P> centre, tensor_view<const T> v, span<const P> b,
                     span<const P> k, index_t group_size) {
    const index_t C = out.channels(), S = out.spatial();
    const bool has_v = !b.empty();
    for (index_t n = 0; n < out.batch(); ++n) {
      const index_t g = n / group_size;
      for (index_t c = 0; c < C; ++c)
        for (index_t s = 0; s < S; ++s) {
          double r = double(a[g * C + c]) * (double(u.at(n, c, s)) - double(centre[g * C + c])) +
                     double(k[g * C + c]);
          if (has_v) r += double(b[g * C + c]) * double(v.at(n, c, s));
          out.at(n, c, s) = T(r);
        }
    }
  }

  template <class T, class P>
  static void mix(const B&, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
                  tensor_view<const T> v, span<const P> matrix, span<const P> centre,
                  span<const P> k, index_t group_size) {
    const index_t C = out.channels(), S = out.spatial();
    for (index_t n = 0; n < out.batch(); ++n) {
      const index_t g = n / group_size;
      const P* M = matrix.data() + g * C * C;
      for (index_t s = 0; s < S; ++s)
        for (index_t i = 0; i < C; ++i) {
          double r = double(a[g * C + i]) * double(u.at(n, i, s)) + double(k[g * C + i]);
          for (index_t j = 0; j < C; ++j)
            r += double(M[i * C + j]) * (double(v.at(n, j, s)) - double(centre[g * C + j]));
          out.at(n, i, s) = T(r);
        }
    }
  }

  template <class F>
  static void for_each(const B&, index_t count, F f) {
    for (index_t i = 0; i < count; ++i) f(i);
  }
};

BKN_END_NAMESPACE
