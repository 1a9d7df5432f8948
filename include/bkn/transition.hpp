// SPDX-License-Identifier: MIT
// transition: the state transition A of Eq. 1 and 3 that carries the previous layer's estimate
// to this layer: identity, learned diagonal, learned dense C x C', or the host's own layer.
#pragma once

#include "bkn/error.hpp"
#include "bkn/math/activation.hpp"
#include "bkn/span.hpp"

BKN_BEGIN_NAMESPACE

enum class transition_kind {
  identity,  ///< A = I; needs C == C'
  diagonal,  ///< A = diag(a), a has C elements; needs C == C'
  dense,     ///< A is C x C', row-major
  weights,   ///< the host's next layer: activation, then linear or 2-D convolution (+ bias)
};

/// The activation between the previous normalized layer and the host layer's weights.
enum class activation {
  none,    ///< f(z) = z
  relu,    ///< f(z) = max(z, 0), moments in closed form
  custom,  ///< the transition's moment_function (host backends only)
};

/// Moments of f(z), z ~ N(mean, var), with their derivatives: a host's own activation.
using moment_function = math::activation_moments (*)(double mean, double var);

/// A 2-D convolution's geometry: zero padding, dilation 1. A linear layer is all ones.
struct conv2d_geometry {
  index_t in_height = 1, in_width = 1;
  index_t kernel_height = 1, kernel_width = 1;
  index_t stride_height = 1, stride_width = 1;
  index_t pad_height = 0, pad_width = 0;

  constexpr index_t out_height() const noexcept {
    return (in_height + 2 * pad_height - kernel_height) / stride_height + 1;
  }
  constexpr index_t out_width() const noexcept {
    return (in_width + 2 * pad_width - kernel_width) / stride_width + 1;
  }
  constexpr index_t taps() const noexcept { return kernel_height * kernel_width; }
};

/// The transition A of a layer and its weights (in the backend's memory).
template <class P>
struct transition {
  transition_kind kind = transition_kind::identity;
  span<const P> weights;    ///< diagonal: C; dense: C x C'; weights: C x C' x kh x kw
  index_t in_channels = 0;  ///< C' for dense and weights; identity and diagonal take C' = C
  span<const P> bias;       ///< weights: C or empty
  activation act = activation::none;
  moment_function moments = nullptr;  ///< for activation::custom
  conv2d_geometry conv{};

  static constexpr transition identity() noexcept { return {}; }
  static constexpr transition diagonal(span<const P> a) noexcept {
    transition t;
    t.kind = transition_kind::diagonal;
    t.weights = a;
    t.in_channels = a.size();
    return t;
  }
  static constexpr transition dense(span<const P> a, index_t in_channels) noexcept {
    transition t;
    t.kind = transition_kind::dense;
    t.weights = a;
    t.in_channels = in_channels;
    return t;
  }
  /// The host's linear layer x = W f(z) + b, W: C x C' row-major, z the previous posterior.
  static constexpr transition linear(span<const P> w, span<const P> b, index_t in_channels,
                                     activation act = activation::relu,
                                     moment_function moments = nullptr) noexcept {
    transition t;
    t.kind = transition_kind::weights;
    t.weights = w;
    t.in_channels = in_channels;
    t.bias = b;
    t.act = act;
    t.moments = moments;
    return t;
  }
  /// The host's convolution x = W * f(z) + b, W: C x C' x kh x kw (PyTorch's layout).
  static constexpr transition conv2d(span<const P> w, span<const P> b, index_t in_channels,
                                     conv2d_geometry geometry,
                                     activation act = activation::relu,
                                     moment_function moments = nullptr) noexcept {
    transition t = linear(w, b, in_channels, act, moments);
    t.conv = geometry;
    return t;
  }

  /// Channels C' of the previous layer this transition takes, for a layer of C channels.
  constexpr index_t input_channels(index_t channels) const noexcept {
    return kind == transition_kind::dense || kind == transition_kind::weights ? in_channels
                                                                              : channels;
  }
  /// Elements of the weights (and of their gradient).
  constexpr index_t weight_count(index_t channels) const noexcept {
    switch (kind) {
      case transition_kind::identity: return 0;
      case transition_kind::diagonal: return channels;
      case transition_kind::dense: return channels * in_channels;
      case transition_kind::weights: return channels * in_channels * conv.taps();
    }
    return 0;
  }
  /// True for a linear layer without activation: exactly a dense A plus a bias, which is what
  /// full-covariance mode supports among the weight transitions.
  constexpr bool is_affine_linear() const noexcept {
    return kind == transition_kind::weights && act == activation::none && conv.taps() == 1 &&
           conv.in_height == 1 && conv.in_width == 1;
  }
};

namespace detail {

/// Output rows (or columns) of a convolution whose valid kernel taps are [first, last]; with
/// zero padding only the border rows see fewer taps, so a few bands cover every row.
struct tap_band {
  index_t first, last, count;
};

/// The border classes of a convolution: output positions with the same valid taps, as the
/// product of row bands and column bands. Each class's weight is its share of the positions.
struct border_classes {
  static constexpr int max_bands = 16;
  tap_band row[max_bands]{};
  tap_band col[max_bands]{};
  index_t rows = 0, cols = 0;
  index_t positions = 1;

  BKN_HOST_DEVICE constexpr index_t count() const noexcept { return rows * cols; }
  BKN_HOST_DEVICE constexpr double weight(index_t k) const noexcept {
    return double(row[k / cols].count * col[k % cols].count) / double(positions);
  }
  BKN_HOST_DEVICE constexpr bool covers(index_t k, index_t u, index_t v) const noexcept {
    const tap_band& r = row[k / cols];
    const tap_band& c = col[k % cols];
    return u >= r.first && u <= r.last && v >= c.first && v <= c.last;
  }
};

/// Bands of one axis; returns false if there are more than max_bands.
inline bool make_bands(index_t in, index_t kernel, index_t stride, index_t pad, index_t out,
                       tap_band* bands, index_t& n) {
  n = 0;
  for (index_t i = 0; i < out; ++i) {
    const index_t start = i * stride - pad;  // input index of tap 0
    const index_t first = start < 0 ? -start : 0;
    const index_t last = (in - 1 - start) < kernel - 1 ? in - 1 - start : kernel - 1;
    if (n > 0 && bands[n - 1].first == first && bands[n - 1].last == last) {
      ++bands[n - 1].count;
      continue;
    }
    if (n == border_classes::max_bands) return false;
    bands[n++] = {first, last, 1};
  }
  return true;
}

inline border_classes make_border_classes(const conv2d_geometry& g,
                                          const char* routine = "bkn::workspace_size") {
  require(g.in_height > 0 && g.in_width > 0 && g.kernel_height > 0 && g.kernel_width > 0 &&
              g.stride_height > 0 && g.stride_width > 0 && g.pad_height >= 0 &&
              g.pad_width >= 0 && g.kernel_height <= g.in_height + 2 * g.pad_height &&
              g.kernel_width <= g.in_width + 2 * g.pad_width,
          routine, "params.transition", "weights: invalid convolution geometry (input ",
          g.in_height, "x", g.in_width, ", kernel ", g.kernel_height, "x", g.kernel_width,
          ", stride ", g.stride_height, "x", g.stride_width, ", padding ", g.pad_height, "x",
          g.pad_width, ")");
  border_classes b;
  const bool ok =
      make_bands(g.in_height, g.kernel_height, g.stride_height, g.pad_height, g.out_height(),
                 b.row, b.rows) &&
      make_bands(g.in_width, g.kernel_width, g.stride_width, g.pad_width, g.out_width(), b.col,
                 b.cols);
  require(ok, routine, "params.transition", "weights: more than ", border_classes::max_bands,
          " distinct border patterns per axis (kernel ", g.kernel_height, "x", g.kernel_width,
          ", padding ", g.pad_height, "x", g.pad_width, "); use a smaller kernel or padding");
  b.positions = g.out_height() * g.out_width();
  return b;
}

/// A convolution whose every output sees one tap of every input channel, with full weight: 1x1,
/// no padding (a linear layer too). Through it the weights transition is a dense A plus a bias.
constexpr bool is_pointwise(const conv2d_geometry& g) noexcept {
  return g.kernel_height == 1 && g.kernel_width == 1 && g.pad_height == 0 && g.pad_width == 0;
}

template <class P>
void check_transition(const char* routine, const transition<P>& a, index_t channels,
                      index_t height = 1, index_t width = 1) {
  const char* name = "params.transition";
  switch (a.kind) {
    case transition_kind::identity:
      return;
    case transition_kind::diagonal:
      require(a.weights.size() == channels && a.weights.data() != nullptr, routine, name,
              "diagonal: expected ", channels, " weights (one per channel), got ",
              a.weights.size());
      return;
    case transition_kind::dense:
      require(a.in_channels > 0, routine, name, "dense: expected in_channels > 0, got ",
              a.in_channels);
      require(a.weights.size() == channels * a.in_channels && a.weights.data() != nullptr,
              routine, name, "dense: expected ", channels, " x ", a.in_channels, " = ",
              channels * a.in_channels, " weights (C x C', row-major), got ", a.weights.size());
      return;
    case transition_kind::weights: {
      const conv2d_geometry& g = a.conv;
      require(a.in_channels > 0, routine, name, "weights: expected in_channels > 0, got ",
              a.in_channels);
      require(g.in_height > 0 && g.in_width > 0 && g.kernel_height > 0 && g.kernel_width > 0 &&
                  g.stride_height > 0 && g.stride_width > 0 && g.pad_height >= 0 &&
                  g.pad_width >= 0 && g.kernel_height <= g.in_height + 2 * g.pad_height &&
                  g.kernel_width <= g.in_width + 2 * g.pad_width,
              routine, name, "weights: invalid convolution geometry (input ", g.in_height, "x",
              g.in_width, ", kernel ", g.kernel_height, "x", g.kernel_width, ", stride ",
              g.stride_height, "x", g.stride_width, ", padding ", g.pad_height, "x", g.pad_width,
              ")");
      require(g.out_height() == height && g.out_width() == width, routine, name,
              "weights: the convolution gives ", g.out_height(), "x", g.out_width(),
              " outputs but this layer's input is ", height, "x", width);
      const index_t count = channels * a.in_channels * g.taps();
      require(a.weights.size() == count && a.weights.data() != nullptr, routine, name,
              "weights: expected ", channels, " x ", a.in_channels, " x ", g.kernel_height, " x ",
              g.kernel_width, " = ", count, " weights, got ", a.weights.size());
      check_optional(routine, "params.transition.bias", a.bias.size(), channels,
                     "one per channel");
      require(a.act != activation::custom || a.moments != nullptr, routine, name,
              "weights: activation::custom needs a moment_function");
      make_border_classes(g, routine);
      return;
    }
  }
  require(false, routine, name, "unknown transition kind");
}

}  // namespace detail

BKN_END_NAMESPACE
