// SPDX-License-Identifier: MIT
// bkn::memorized_batch_norm: batch normalization with the statistics of the last k batches,
// kept in a caller-owned ring buffer, and the second forward of the Double-Forward scheme.
#pragma once

#include "bkn/math/welford.hpp"
#include "bkn/methods/batch_norm.hpp"
#include "bkn/methods/detail/batch_statistics.hpp"

BKN_BEGIN_NAMESPACE
namespace memorized_batch_norm {

/// The memory of one layer: a ring buffer, entirely in the caller's memory (the backend's
/// memory space), of the statistics of the last `slots` batches per statistics group and
/// channel. Routines read and write it only through the backend's passes, so the slot index
/// never has to come back to the host. Start from counts of 0 (or call `reset`).
template <class P>
struct memory_view {
  /// slots x groups x C, at [(s * groups + g) * C + c]: each batch's group mean and biased
  /// variance.
  span<P> mean, var;
  /// `slots` elements: the values per channel and group that slot s summarizes (group_size * H
  /// * W of its batch), its weight; 0: empty.
  span<P> count;
  /// 1 element: the slot holding the newest batch. Any value to start with.
  span<index_t> newest;
  index_t slots = 0;
  index_t groups = 0;  ///< statistics groups of a training batch (N / group_size)
  index_t channels = 0;
};

/// What a training forward does to the memory.
enum class memory_update {
  /// A new batch: its statistics replace the oldest slot's and become the newest.
  push,
  /// The Double-Forward scheme's second forward of the same batch after the weights' update:
  /// its statistics, under the new weights, replace the newest slot's (no slot is added, the
  /// moving averages are not updated).
  refresh,
};

/// What inference normalizes with.
enum class inference_source {
  running,  ///< the moving averages
  memory,   ///< the memory's statistics pooled over every slot and group, as training does
};

struct options {
  /// Samples per statistics group; 0: the whole batch. Must divide N. Each group is normalized
  /// with its own memory (memory.groups = N / group_size).
  index_t group_size = 0;
  /// Added to the variance before the square root. > 0.
  double epsilon = 1e-5;
  /// running = (1 - momentum) running + momentum memorized estimate. In [0, 1].
  double momentum = 0.1;
  /// Training: update the memory, normalize with its statistics, update the moving averages.
  bool training = true;
  memory_update update = memory_update::push;
  inference_source inference = inference_source::running;
  /// In (0, 1]: a batch a slots older than the newest weighs count * decay^a (1: by count).
  double decay = 1;
  /// The moving variance takes the correction of a weighted variance, 1 / (1 - sum w^2 /
  /// (sum w)^2) over the values' weights (m / (m - 1) for one batch of m values).
  bool unbiased_running_variance = true;
  /// Scan x (and dy) on the host first; throw bkn::nonfinite_input at the first NaN or Inf.
  bool check_finite = false;
};

/// Per-channel affine parameters and their gradients, as batch_norm's.
template <class P>
using parameters = batch_norm::parameters<P>;
template <class P>
using gradients = batch_norm::gradients<P>;

/// Written by a training forward, read by its backward (never the memory, which may have moved
/// on by then). Required in training.
template <class P>
struct statistics {
  /// G x C: the memory's pooled statistics the forward normalized with.
  span<P> mean, var;
  /// G x C: this batch's own mean and biased variance per group, as written into the memory.
  span<P> batch_mean, batch_var;
  /// G: this batch's weight in `mean` and `var`: its count / the sum of the slots' weights.
  span<P> batch_share;
};

/// Everything one memorized-batch-normalized layer owns, as views of the host's memory.
template <class P>
struct layer {
  parameters<P> params;
  gradients<P> grads;
  /// The moving averages (C each; `skipped` optional). Needed for inference from them; may be
  /// empty in training (then nothing is tracked).
  running_statistics<P> running;
  /// Required in training and for inference from the memory.
  memory_view<P> memory;
  statistics<P> saved;
};

/// Bytes of workspace forward and backward need for inputs of shape `x`.
template <class Backend>
std::size_t workspace_size(const Backend& backend, const options& opt, const tensor_shape& x) {
  return detail::batch_workspace_size("bkn::memorized_batch_norm::workspace_size", backend, opt, x);
}

}  // namespace memorized_batch_norm

namespace detail {

BKN_HOST_DEVICE inline index_t wrap_slot(index_t s, index_t slots) {
  return ((s % slots) + slots) % slots;
}

/// Pools (g, c)'s slots of a memory, newest first, into `pooled`, each slot weighing
/// count * decay^age, and accumulates sum_s count * weight and sum_s count * weight^2 of the
/// values' weights. Returns the newest slot.
template <class P>
BKN_HOST_DEVICE inline index_t pool_slots(const P* mean, const P* var, const P* count,
                                          index_t newest, index_t slots, index_t groups,
                                          index_t channels, double decay, index_t g, index_t c,
                                          welford<double>& pooled, double& sum_w, double& sum_w2) {
  const index_t first = wrap_slot(newest, slots);
  double weight = 1;
  for (index_t age = 0; age < slots; ++age) {
    const index_t s = wrap_slot(first - age, slots);
    const double n = double(count[s]);
    if (n > 0) {
      const index_t e = (s * groups + g) * channels + c;
      welford<double> part;
      part.count = n * weight;
      part.mean = double(mean[e]);
      part.m2 = part.count * double(var[e]);
      pooled.combine(part);
      sum_w += n * weight;
      sum_w2 += n * weight * weight;
    }
    weight *= decay;
  }
  return first;
}

/// 1 / (1 - sum w^2 / (sum w)^2): the unbiased correction of a weighted variance (m / (m - 1)
/// with equal weights), or 1 where it is undefined (a single value).
BKN_HOST_DEVICE inline double weighted_bessel(double sum_w, double sum_w2) {
  const double rest = sum_w > 0 ? 1 - sum_w2 / (sum_w * sum_w) : 0.0;
  return rest > 0 ? 1 / rest : 1.0;
}

/// Per (g, c): writes this batch's statistics into the slot after the newest (push) or the
/// newest (refresh); element 0 also sets the slot's count. The index moves in a later pass.
template <class P>
struct memory_store_op {
  const P *batch_mean, *batch_var;
  P *mean, *var, *count;
  const index_t* newest;
  index_t slots, per_slot;  // per_slot: groups * channels
  bool push;
  double values;  // m, this batch's values per group and channel

  BKN_HOST_DEVICE void operator()(index_t i) const {
    const index_t s = wrap_slot(wrap_slot(*newest, slots) + (push ? 1 : 0), slots);
    mean[s * per_slot + i] = batch_mean[i];
    var[s * per_slot + i] = batch_var[i];
    if (i == 0) count[s] = P(values);
  }
};

struct memory_advance_op {
  index_t* newest;
  index_t slots;
  BKN_HOST_DEVICE void operator()(index_t) const {
    *newest = wrap_slot(wrap_slot(*newest, slots) + 1, slots);
  }
};

/// Per (g, c): the memory's pooled mean and biased variance, the variance for the moving
/// average (corrected or not), and at c = 0 the newest slot's share of the group's weight.
template <class P>
struct memory_combine_op {
  const P *mean, *var, *count;
  const index_t* newest;
  index_t slots, groups, channels;
  double decay;
  bool unbiased;
  P *pooled_mean, *pooled_var, *running_var, *share;

  BKN_HOST_DEVICE void operator()(index_t i) const {
    const index_t g = i / channels, c = i % channels;
    welford<double> pooled;
    double sum_w = 0, sum_w2 = 0;
    const index_t first = pool_slots(mean, var, count, *newest, slots, groups, channels, decay, g,
                                     c, pooled, sum_w, sum_w2);
    const double v = pooled.variance();
    pooled_mean[i] = P(pooled.mean);
    pooled_var[i] = P(v);
    running_var[i] = P(unbiased ? v * weighted_bessel(sum_w, sum_w2) : v);
    if (c == 0) share[g] = P(sum_w > 0 ? double(count[first]) / sum_w : 0.0);
  }
};

/// Per channel: the memory pooled over every slot and every group (inference).
template <class P>
struct memory_pool_op {
  const P *mean, *var, *count;
  const index_t* newest;
  index_t slots, groups, channels;
  double decay;
  P *pooled_mean, *pooled_var;

  BKN_HOST_DEVICE void operator()(index_t c) const {
    welford<double> pooled;
    double sum_w = 0, sum_w2 = 0;
    for (index_t g = 0; g < groups; ++g)
      pool_slots(mean, var, count, *newest, slots, groups, channels, decay, g, c, pooled, sum_w,
                 sum_w2);
    pooled_mean[c] = P(pooled.mean);
    pooled_var[c] = P(pooled.variance());
  }
};

/// Requires a memory of `slots` >= 1 slots of `groups` (< 0: any number >= 1) groups of
/// `channels` channels, with its arrays the right size.
template <class P>
void check_memory(const char* routine, const memorized_batch_norm::memory_view<P>& m,
                  index_t groups, index_t channels) {
  require(m.slots >= 1, routine, "memory.slots", "expected >= 1, got ", m.slots);
  require(m.channels == channels, routine, "memory.channels", "expected ", channels,
          " (x's channels), got ", m.channels);
  if (groups >= 0)
    require(m.groups == groups, routine, "memory.groups", "expected ", groups,
            " (one per statistics group of this batch), got ", m.groups);
  else
    require(m.groups >= 1, routine, "memory.groups", "expected >= 1, got ", m.groups);
  const index_t n = m.slots * m.groups * m.channels;
  check_required(routine, "memory.mean", m.mean, n, "slots x groups x channels");
  check_required(routine, "memory.var", m.var, n, "slots x groups x channels");
  check_required(routine, "memory.count", m.count, m.slots, "one per slot");
  check_required(routine, "memory.newest", m.newest, 1, "the newest slot's index");
}

inline void check_memorized_options(const char* routine, const memorized_batch_norm::options& opt) {
  check_batch_options(routine, opt);
  require(opt.decay > 0 && opt.decay <= 1, routine, "options.decay",
          "expected a value in (0, 1], got ", opt.decay);
}

/// Every check of forward and backward after the views; returns the group size (0 when N = 0).
template <class T, class P>
index_t check_memorized_layer(const char* routine, const memorized_batch_norm::options& opt,
                              const memorized_batch_norm::layer<P>& L,
                              const tensor_view<const T>& x) {
  using memorized_batch_norm::inference_source;
  const index_t C = x.channels();
  check_affine(routine, C, L.params.gamma, L.params.beta);
  const bool from_running = !opt.training && opt.inference == inference_source::running;
  check_running(routine, L.running, C, from_running, "inference from running statistics");
  if (!opt.training && opt.inference == inference_source::memory)
    check_memory(routine, L.memory, -1, C);
  if (x.batch() == 0) return 0;
  const index_t group_size = resolve_group_size(routine, opt.group_size, x.batch());
  if (!opt.training) return group_size;
  const index_t G = x.batch() / group_size;
  check_memory(routine, L.memory, G, C);
  // One value per group is information only when older batches give the variance.
  const index_t m = group_size * x.spatial();
  const char* values = m == 1 ? "one value" : "no values";
  require(m > 1 || (m == 1 && L.memory.slots > 1), routine, "x", values,
          " per channel and statistics group (group size ", group_size, ", ", x.shape().height, "x",
          x.shape().width, " pixels) with a memory of ", L.memory.slots,
          " slot(s): the statistics carry no information; use larger groups or more slots");
  check_required(routine, "saved.mean", L.saved.mean, G * C, "groups x channels");
  check_required(routine, "saved.var", L.saved.var, G * C, "groups x channels");
  check_required(routine, "saved.batch_mean", L.saved.batch_mean, G * C, "groups x channels");
  check_required(routine, "saved.batch_var", L.saved.batch_var, G * C, "groups x channels");
  check_required(routine, "saved.batch_share", L.saved.batch_share, G, "one per statistics group");
  return group_size;
}

/// The memory pooled per channel into w.mean, w.var (inference from the memory).
template <class Backend, class P>
void pool_memory(const Backend& backend, const memorized_batch_norm::memory_view<P>& m,
                 double decay, const batch_workspace<P>& w) {
  kernels<Backend>::for_each(
      backend, m.channels,
      memory_pool_op<P>{m.mean.data(), m.var.data(), m.count.data(), m.newest.data(), m.slots,
                        m.groups, m.channels, decay, w.mean.data(), w.var.data()});
}

}  // namespace detail

namespace memorized_batch_norm {

/// Empties `memory` (every count 0, newest slot 0) on the backend's memory.
template <class Backend, class P>
void reset(const Backend& backend, const memory_view<P>& memory) {
  constexpr const char* routine = "bkn::memorized_batch_norm::reset";
  detail::check_memory(routine, memory, -1, memory.channels);
  using K = kernels<Backend>;
  K::for_each(backend, memory.slots, detail::fill_op<P>{memory.count.data(), P(0)});
  K::for_each(backend, 1, detail::fill_op<index_t>{memory.newest.data(), 0});
}

/// Training: per group, this batch's mean and variance go into the memory (options.update:
/// a new slot, or the newest one again), then x is normalized with the memory's pooled
/// statistics, y = gamma (x - mu) / sqrt(var + eps) + beta, every slot weighing its count
/// (times decay^age); after a push the moving averages move toward them. Inference: the
/// moving averages, or the memory pooled over its slots and groups (unchanged). y may be the
/// same view as x. Throws bkn::invalid_argument before writing anything on an invalid
/// argument. N = 0 changes nothing.
template <class Backend, class T, class P>
void forward(const Backend& backend, const options& opt, const layer<P>& L,
             tensor_view<const detail::nondeduced<T>> x, tensor_view<T> y,
             span<std::byte> workspace) {
  constexpr const char* routine = "bkn::memorized_batch_norm::forward";
  detail::check_memorized_options(routine, opt);
  detail::check_forward_views(routine, x, y);
  const index_t group_size = detail::check_memorized_layer(routine, opt, L, x);
  if (x.batch() == 0) return;
  const auto w =
      detail::carve_batch_checked<Backend, P>(routine, backend, x.shape(), group_size, workspace);
  if (opt.check_finite) detail::check_finite(routine, "x", x);

  using K = kernels<Backend>;
  const memory_view<P>& m = L.memory;
  if (!opt.training) {
    const bool from_memory = opt.inference == inference_source::memory;
    if (from_memory) detail::pool_memory(backend, m, opt.decay, w);
    const span<const P> mean = from_memory ? w.mean : L.running.mean;
    const span<const P> var = from_memory ? w.var : L.running.var;
    detail::normalize_batch(backend, x, y, L.params.gamma, L.params.beta, mean, var, 1, x.batch(),
                            opt.epsilon, w);
    return;
  }
  const index_t C = x.channels(), G = x.batch() / group_size;
  const bool push = opt.update == memory_update::push;
  K::moments(backend, x, group_size, L.saved.batch_mean, L.saved.batch_var, w.scratch);
  K::for_each(
      backend, G * C,
      detail::memory_store_op<P>{L.saved.batch_mean.data(), L.saved.batch_var.data(), m.mean.data(),
                                 m.var.data(), m.count.data(), m.newest.data(), m.slots, G * C,
                                 push, double(group_size * x.spatial())});
  if (push) K::for_each(backend, 1, detail::memory_advance_op{m.newest.data(), m.slots});
  K::for_each(backend, G * C,
              detail::memory_combine_op<P>{
                  m.mean.data(), m.var.data(), m.count.data(), m.newest.data(), m.slots, G, C,
                  opt.decay, opt.unbiased_running_variance, L.saved.mean.data(), L.saved.var.data(),
                  w.var.data(), L.saved.batch_share.data()});
  detail::normalize_batch(backend, x, y, L.params.gamma, L.params.beta, span<const P>(L.saved.mean),
                          span<const P>(L.saved.var), G, group_size, opt.epsilon, w);
  if (push)
    detail::update_running(backend, L.running, span<const P>(L.saved.mean), span<const P>(w.var), G,
                           C, opt.momentum, 0.0, w.sink);
}

/// The gradient of forward's y: dx, and dgamma and dbeta when given (written, not
/// accumulated). In training it flows through this batch's statistics only: the older slots
/// are constants (computed from other batches), and this batch enters the pooled mean and
/// variance with its share L.saved.batch_share. It reads L.saved, never the memory, which later
/// forwards may have moved. In inference the statistics are constants (from the memory, they
/// are pooled again). dx may be the same view as dy, never x.
template <class Backend, class T, class P>
void backward(const Backend& backend, const options& opt, const layer<P>& L,
              tensor_view<const detail::nondeduced<T>> x,
              tensor_view<const detail::nondeduced<T>> dy, tensor_view<T> dx,
              span<std::byte> workspace) {
  constexpr const char* routine = "bkn::memorized_batch_norm::backward";
  detail::check_memorized_options(routine, opt);
  detail::check_backward_views(routine, x, dy, dx);
  detail::check_affine_gradients(routine, x.channels(), L.grads.gamma, L.grads.beta);
  const index_t group_size = detail::check_memorized_layer(routine, opt, L, x);
  if (x.batch() == 0) return;
  const auto w =
      detail::carve_batch_checked<Backend, P>(routine, backend, x.shape(), group_size, workspace);
  if (opt.check_finite) {
    detail::check_finite(routine, "x", x);
    detail::check_finite(routine, "dy", dy);
  }

  if (!opt.training) {
    const bool from_memory = opt.inference == inference_source::memory;
    if (from_memory) detail::pool_memory(backend, L.memory, opt.decay, w);
    const span<const P> mean = from_memory ? w.mean : L.running.mean;
    const span<const P> var = from_memory ? w.var : L.running.var;
    detail::constant_statistics_backward(backend, x, dy, dx, L.params.gamma, mean, var,
                                         L.grads.gamma, L.grads.beta, opt.epsilon, w);
    return;
  }
  detail::batch_backward_inputs<P> in;
  in.gamma = L.params.gamma;
  in.mean = L.saved.mean;
  in.var = L.saved.var;
  in.share = L.saved.batch_share;
  in.batch_mean = L.saved.batch_mean;
  detail::batch_backward(backend, x, dy, dx, group_size, opt.epsilon, in, L.grads.gamma,
                         L.grads.beta, w);
}

}  // namespace memorized_batch_norm
BKN_END_NAMESPACE
