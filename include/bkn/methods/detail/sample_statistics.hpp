// SPDX-License-Identifier: MIT
// Per-sample statistics for the batch-independent methods (group, layer and instance norm, FRN):
// the backend's `moments` pass run on a re-view of x, and the elementwise walk of a view.
#pragma once

#include <algorithm>
#include <cstddef>

#include "bkn/backend.hpp"
#include "bkn/span.hpp"
#include "bkn/tensor.hpp"

BKN_BEGIN_NAMESPACE
namespace detail {

/// The shapes `sample_moments` may hand to `moments` for x of shape `x` and `groups` channel
/// groups: (N, G, C/G, H*W), where H and W merge, and (N, G, C/G*H, W), where a group's
/// channels and H merge.
inline tensor_shape sample_merged_shape(const tensor_shape& x, index_t groups) {
  const index_t per_group = groups > 0 ? x.channels / groups : 0;
  return {x.batch, groups, per_group, x.height * x.width};
}
inline tensor_shape sample_rows_shape(const tensor_shape& x, index_t groups) {
  const index_t per_group = groups > 0 ? x.channels / groups : 0;
  return {x.batch, groups, per_group * x.height, x.width};
}

/// A view of the same memory as x in which (batch, channel) is (sample, channel group) and the
/// spatial extent holds exactly that group's C/G * H * W values, so `moments` with group size 1
/// yields the per-sample group statistics in one pass. Such a view exists when H and W merge
/// (NCHW, NHWC, NC and any view with s_h = W s_w) or when a group's channels and H merge
/// (s_c = H s_h, e.g. a slice of padded rows; always true for one channel per group). False
/// when neither holds: sample_moments then merges per-channel moments instead.
template <class T>
bool exact_group_view(const tensor_view<T>& x, index_t groups, tensor_view<T>& out) {
  const tensor_shape& s = x.shape();
  const tensor_strides& st = x.strides();
  const index_t per_group = x.channels() / groups;
  if (s.height == 1 || s.width == 1 || st.height == s.width * st.width) {
    // Stepping along H*W: by s_w within a line, and a line is W s_w = s_h long.
    const index_t pixel = s.width > 1 ? st.width : st.height;
    out = tensor_view<T>(x.data(), sample_merged_shape(s, groups),
                         {st.batch, per_group * st.channel, st.channel, pixel});
    return true;
  }
  if (per_group == 1 || st.channel == s.height * st.height) {
    out = tensor_view<T>(x.data(), sample_rows_shape(s, groups),
                         {st.batch, per_group * st.channel, st.height, st.width});
    return true;
  }
  return false;
}

/// Scratch bytes of every pass sample_moments and the methods' backward `sums` may run.
template <class Backend>
std::size_t sample_scratch_bytes(const Backend& backend, const tensor_shape& x, index_t groups) {
  using K = kernels<Backend>;
  return std::max({K::scratch_bytes(backend, x, 1, covariance::diagonal),
                   K::scratch_bytes(backend, sample_merged_shape(x, groups), 1,
                                    covariance::diagonal),
                   K::scratch_bytes(backend, sample_rows_shape(x, groups), 1,
                                    covariance::diagonal)});
}

/// Per (sample n, group g): the moments of the group's channels merged from theirs. Every
/// channel holds the same number of values, so the group's variance is the mean of the
/// channels' variances plus the variance of their means (exact, and free of cancellation).
template <class P>
struct sample_merge_op {
  const P *channel_mean, *channel_var;
  index_t per_group;
  P *mean, *var;

  BKN_HOST_DEVICE void operator()(index_t i) const {
    // Channel j of group i = n * G + g is (n, g * C/G + j), at [i * C/G + j].
    const P* m = channel_mean + i * per_group;
    const P* v = channel_var + i * per_group;
    double mu = 0;
    for (index_t j = 0; j < per_group; ++j) mu += double(m[j]);
    mu /= double(per_group);
    double s = 0;
    for (index_t j = 0; j < per_group; ++j) {
      const double d = double(m[j]) - mu;
      s += double(v[j]) + d * d;
    }
    mean[i] = P(mu);
    var[i] = P(s / double(per_group));
  }
};

/// mean[n * G + g] and var[n * G + g]: the mean and biased variance of sample n's channel group
/// g (C/G consecutive channels, all their H x W values). channel_mean and channel_var hold N * C
/// values of scratch, used only when x has no exact re-view. Unchecked.
template <class Backend, class T, class P>
void sample_moments(const Backend& backend, tensor_view<const T> x, index_t groups,
                    span<P> mean, span<P> var, span<P> channel_mean, span<P> channel_var,
                    span<std::byte> scratch) {
  using K = kernels<Backend>;
  tensor_view<const T> view;
  if (exact_group_view(x, groups, view)) {
    K::moments(backend, view, 1, mean, var, scratch);
    return;
  }
  K::moments(backend, x, 1, channel_mean, channel_var, scratch);
  K::for_each(backend, x.batch() * groups,
              sample_merge_op<P>{channel_mean.data(), channel_var.data(), x.channels() / groups,
                                 mean.data(), var.data()});
}

/// The (n, c, h, w) of the i-th element of a tensor of shape `s`, counted with the channel
/// fastest (`channels_last`, for NHWC memory) or w fastest, so that consecutive work items of an
/// elementwise for_each touch neighbouring memory.
struct element_position {
  index_t n, c, h, w;
};

BKN_HOST_DEVICE inline element_position element_at(const tensor_shape& s, bool channels_last,
                                                   index_t i) {
  element_position p{};
  if (channels_last) {
    p.c = i % s.channels;
    i /= s.channels;
    p.w = i % s.width;
    i /= s.width;
    p.h = i % s.height;
    p.n = i / s.height;
  } else {
    p.w = i % s.width;
    i /= s.width;
    p.h = i % s.height;
    i /= s.height;
    p.c = i % s.channels;
    p.n = i / s.channels;
  }
  return p;
}

/// Whether element_at should walk a view of this layout with the channel fastest.
template <class T>
constexpr bool walk_channels_last(const tensor_view<T>& v) noexcept {
  return v.channels() > 1 && v.strides().channel == 1;
}

}  // namespace detail
BKN_END_NAMESPACE
