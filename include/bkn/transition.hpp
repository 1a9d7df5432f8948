// SPDX-License-Identifier: MIT
// transition: the state transition A of Eq. 1 and 3 that carries the previous layer's
// estimate to this layer (identity, learned diagonal, learned dense C x C').
#pragma once

#include "bkn/error.hpp"
#include "bkn/span.hpp"

BKN_BEGIN_NAMESPACE

enum class transition_kind {
  identity,  ///< A = I; needs C == C'
  diagonal,  ///< A = diag(a), a has C elements; needs C == C'
  dense,     ///< A is C x C', row-major
};

/// The transition A of a layer and its weights (in the backend's memory).
template <class P>
struct transition {
  transition_kind kind = transition_kind::identity;
  span<const P> weights;
  index_t in_channels = 0;  ///< C' for dense; identity and diagonal take C' = C

  static constexpr transition identity() noexcept { return {}; }
  static constexpr transition diagonal(span<const P> a) noexcept {
    return {transition_kind::diagonal, a, a.size()};
  }
  static constexpr transition dense(span<const P> a, index_t in_channels) noexcept {
    return {transition_kind::dense, a, in_channels};
  }

  /// Channels C' of the previous layer this transition takes, for a layer of C channels.
  constexpr index_t input_channels(index_t channels) const noexcept {
    return kind == transition_kind::dense ? in_channels : channels;
  }
  /// Elements of the weights (and of their gradient).
  constexpr index_t weight_count(index_t channels) const noexcept {
    return kind == transition_kind::identity ? 0
           : kind == transition_kind::diagonal ? channels
                                               : channels * in_channels;
  }
};

namespace detail {

template <class P>
void check_transition(const char* routine, const transition<P>& a, index_t channels) {
  switch (a.kind) {
    case transition_kind::identity:
      return;
    case transition_kind::diagonal:
      require(a.weights.size() == channels && a.weights.data() != nullptr, routine,
              "params.transition", "diagonal: expected ", channels,
              " weights (one per channel), got ", a.weights.size());
      return;
    case transition_kind::dense:
      require(a.in_channels > 0, routine, "params.transition",
              "dense: expected in_channels > 0, got ", a.in_channels);
      require(a.weights.size() == channels * a.in_channels && a.weights.data() != nullptr,
              routine, "params.transition", "dense: expected ", channels, " x ", a.in_channels,
              " = ", channels * a.in_channels, " weights (C x C', row-major), got ",
              a.weights.size());
      return;
  }
  require(false, routine, "params.transition", "unknown transition kind");
}

}  // namespace detail

BKN_END_NAMESPACE
