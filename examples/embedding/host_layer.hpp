// SPDX-License-Identifier: MIT
// A home-grown framework's normalization layer interface: raw float pointers, int64 shapes and
// plain arrays between layers. No bkn header is included here, so no bkn type reaches the host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace host {

/// Extents of an activation tensor; a fully connected layer has h = w = 1.
struct shape4 {
  std::int64_t n = 0, c = 0, h = 1, w = 1;
  std::int64_t elements() const { return n * c * h * w; }
};

/// How the host stores a 4-D tensor densely.
enum class layout { nchw, nhwc };

/// Offset of element (n, c, h, w) in a dense tensor of shape `s` stored as `l`.
inline std::int64_t offset(const shape4& s, layout l, std::int64_t n, std::int64_t c,
                           std::int64_t h, std::int64_t w) {
  return l == layout::nchw ? ((n * s.c + c) * s.h + h) * s.w + w
                           : ((n * s.h + h) * s.w + w) * s.c + c;
}

/// What one normalization layer hands to the next: its per-group estimate of its channels, as
/// `groups` x `channels` means and variances, and the arrays where the next layer's backward
/// writes the gradient of the loss with respect to them. The layer that publishes a link owns
/// all four arrays; they stay valid until its next forward.
struct chain_link {
  const float* mean = nullptr;
  const float* var = nullptr;
  float* dmean = nullptr;
  float* dvar = nullptr;
  std::int64_t groups = 0, channels = 0;
};

/// One learned array of a layer and its gradient (written by backward), `size` floats each.
struct parameter {
  const char* name;
  float* value;
  const float* grad;
  std::int64_t size;
};

/// A normalization layer of the host framework. forward() and backward() take the host's own
/// buffers; `workspace` is scratch the host allocates once, `workspace_bytes()` long and
/// 64-byte aligned, and may share between layers run one after the other. A layer keeps the
/// state of its last forward until its backward: one batch in flight per layer object.
/// Invalid arguments throw std::invalid_argument (nothing is written then).
class normalization {
 public:
  virtual ~normalization() = default;

  virtual std::size_t workspace_bytes(const shape4& s) const = 0;
  /// `prior`: the previous normalization layer's link, or null for the first layer.
  virtual void forward(const float* x, float* y, const shape4& s, layout l,
                       const chain_link* prior, void* workspace, std::size_t bytes) = 0;
  /// Writes dx, the parameter gradients and, when `prior` is given, prior->dmean/dvar.
  /// Call it after the next layer's backward, which fills this layer's link gradients.
  virtual void backward(const float* x, const float* dy, float* dx, const shape4& s, layout l,
                        const chain_link* prior, void* workspace, std::size_t bytes) = 0;
  /// This layer's posterior from the last forward, for the next layer's prior. Its gradient
  /// arrays are zeroed by each forward (a last layer feeds nothing back).
  virtual chain_link posterior() = 0;
  virtual std::vector<parameter> parameters() = 0;
};

/// Kalman normalization with per-channel variances over statistics groups of `group_size`
/// samples, a per-channel gain and a learned diagonal transition (diagonal_layer.cpp).
std::unique_ptr<normalization> make_grouped_kalman_norm(std::int64_t channels,
                                                        std::int64_t group_size);

/// Kalman normalization with the full channel covariance, one gain per layer and an identity
/// transition (full_layer.cpp). It takes and gives per-channel variances through chain_link.
std::unique_ptr<normalization> make_full_kalman_norm(std::int64_t channels,
                                                     std::int64_t group_size);

}  // namespace host
