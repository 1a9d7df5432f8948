// SPDX-License-Identifier: MIT
// options: the one small struct that configures a normalization call (mode, statistics
// groups, epsilon, momentum, training or inference), and how the group size is resolved.
#pragma once

#include "bkn/backend.hpp"
#include "bkn/config.hpp"
#include "bkn/error.hpp"

BKN_BEGIN_NAMESPACE

/// What inference (training == false) normalizes with.
enum class inference_statistics {
  running,  ///< the moving averages (the usual choice; the paper's option 'B')
  chain,    ///< the Kalman estimate of the test batch itself (the paper's option 'A')
};

struct options {
  /// Diagonal (per-channel variances, the default) or the paper's full covariance.
  covariance mode = covariance::diagonal;
  /// Samples per statistics group (the paper's statistics-batch-size): a batch of N is split
  /// into N / group_size groups of consecutive samples, each with its own statistics and
  /// Kalman state. 0 means the whole batch is one group. Must divide N.
  index_t group_size = 0;
  /// Added to the variance before the square root. > 0.
  double epsilon = 1e-5;
  /// Weight of the new estimate in the moving averages:
  /// running = (1 - momentum) * running + momentum * estimate. PyTorch's `momentum`; Keras's
  /// `momentum` is 1 - this. In [0, 1].
  double momentum = 0.1;
  /// Training: normalize with the Kalman estimate and update the moving averages.
  bool training = true;
  /// In inference, normalize with the moving averages or with the chain's estimate.
  inference_statistics inference = inference_statistics::running;
  /// The moving variance takes the observed variance with Bessel's correction m / (m - 1), as
  /// PyTorch does; normalization always uses the biased estimate.
  bool unbiased_running_variance = true;
  /// Scan x (and dy) on the host before anything runs and throw bkn::nonfinite_input naming the
  /// first NaN or Inf. Off by default: NaN and Inf then propagate (docs/reliability.md). Needs
  /// the tensors in host memory; costs one extra read of each.
  bool check_finite = false;

  // For reproducing the authors' reference code; off by default (docs/math.md, erratum 8).
  /// In [0, 1]: q is this constant (the authors' code used 0.1) and gets no gradient;
  /// negative: q = sigmoid(gain_logit), learned.
  double fixed_gain = -1;
  /// > 0: a group keeps its batch statistics (q = 1, no fusion) when
  /// mean_c(v_pred / (s + epsilon)) >= skip_threshold (the authors' code: 100, without the
  /// epsilon, so a constant channel divided by zero). 0: off.
  double skip_threshold = 0;
};

namespace detail {

/// True when this call estimates statistics from the batch (training, or inference from the
/// chain), false when it normalizes with the moving averages.
constexpr bool uses_batch_statistics(const options& opt) noexcept {
  return opt.training || opt.inference == inference_statistics::chain;
}

inline void check_options(const char* routine, const options& opt) {
  require(opt.epsilon > 0, routine, "options.epsilon", "expected > 0, got ", opt.epsilon);
  require(opt.momentum >= 0 && opt.momentum <= 1, routine, "options.momentum",
          "expected a value in [0, 1], got ", opt.momentum);
  require(opt.group_size >= 0, routine, "options.group_size",
          "expected >= 0 (0: the whole batch), got ", opt.group_size);
  require(opt.fixed_gain <= 1, routine, "options.fixed_gain",
          "expected a gain in [0, 1], or negative for a learned gain, got ", opt.fixed_gain);
  require(opt.skip_threshold >= 0, routine, "options.skip_threshold",
          "expected >= 0 (0: off), got ", opt.skip_threshold);
}

/// A learned gain has 1 logit (per layer) or C (per channel, diagonal mode); a fixed gain
/// needs none.
inline void check_gain(const char* routine, const char* name, const options& opt, index_t count,
                       index_t channels) {
  if (opt.fixed_gain >= 0 && count == 0) return;
  if (opt.mode == covariance::full)
    require(count == 1, routine, name,
            "expected 1 element (full mode has one gain per layer), got ", count);
  else
    require(count == 1 || count == channels, routine, name, "expected 1 (per layer) or ",
            channels, " (per channel) elements, got ", count);
}

/// The number of samples per group for a batch of `batch` samples.
inline index_t resolve_group_size(const char* routine, const options& opt, index_t batch) {
  if (opt.group_size == 0 || batch == 0) return batch > 0 ? batch : 1;
  require(batch % opt.group_size == 0, routine, "options.group_size",
          "expected a divisor of the batch size ", batch, ", got ", opt.group_size);
  return opt.group_size;
}

}  // namespace detail

BKN_END_NAMESPACE
