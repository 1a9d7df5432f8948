// SPDX-License-Identifier: MIT
// gaussian_view: per-group Gaussian estimates of a layer's channels (mean and variance, or
// mean and full covariance), the currency passed between observe, predict and update.
#pragma once

#include <type_traits>

#include "bkn/backend.hpp"
#include "bkn/error.hpp"
#include "bkn/span.hpp"

BKN_BEGIN_NAMESPACE

/// Elements of one group's covariance: C (diagonal mode) or C * C (full mode, row-major).
constexpr index_t covariance_elements(index_t channels, covariance mode) noexcept {
  return mode == covariance::full ? channels * channels : channels;
}

/// Gaussian estimates for `groups` statistics groups of `channels` channels, in the backend's
/// memory: mean[g * C + c], and cov[g * C + c] (diagonal) or cov[(g * C + i) * C + j] (full).
/// Whether cov is diagonal or full follows the options of the call it is passed to.
template <class P>
struct gaussian_view {
  span<P> mean;
  span<P> cov;
  index_t groups = 0;
  index_t channels = 0;

  constexpr gaussian_view() noexcept = default;
  constexpr gaussian_view(span<P> mean_, span<P> cov_, index_t groups_, index_t channels_) noexcept
      : mean(mean_), cov(cov_), groups(groups_), channels(channels_) {}
  template <class U, class = std::enable_if_t<std::is_same_v<const U, P>>>
  constexpr gaussian_view(const gaussian_view<U>& other) noexcept  // NOLINT: P -> const P
      : mean(other.mean), cov(other.cov), groups(other.groups), channels(other.channels) {}

  constexpr bool empty() const noexcept { return groups == 0; }
};

namespace detail {

/// Requires `g` to hold `groups` groups of `channels` channels in `mode`.
template <class P>
void check_gaussian(const char* routine, const char* name, const gaussian_view<P>& g,
                    index_t groups, index_t channels, covariance mode) {
  require(g.groups == groups && g.channels == channels, routine, name, "expected ", groups,
          " groups of ", channels, " channels, got ", g.groups, " groups of ", g.channels);
  require(g.mean.size() == groups * channels && (groups == 0 || g.mean.data() != nullptr),
          routine, name, "mean: expected ", groups * channels, " elements, got ",
          g.mean.size());
  const index_t cov = groups * covariance_elements(channels, mode);
  require(g.cov.size() == cov && (groups == 0 || g.cov.data() != nullptr), routine, name,
          "cov: expected ", cov, " elements (",
          mode == covariance::full ? "groups x C x C, full mode" : "groups x C, diagonal mode",
          "), got ", g.cov.size());
}

}  // namespace detail

BKN_END_NAMESPACE
