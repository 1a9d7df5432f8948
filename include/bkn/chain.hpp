// SPDX-License-Identifier: MIT
// chain: runs L normalized layers forward in order and backward in reverse, passing each
// posterior to the next layer and each posterior's gradient back, as a host's autograd would.
#pragma once

#include "bkn/backward.hpp"

BKN_BEGIN_NAMESPACE

/// The bookkeeping of a stack of BKN layers separated by the host's own layers. The host calls
/// forward(0..L-1) as its activations reach each normalized layer, then backward(L-1..0) as the
/// gradients come back; the chain passes layer k-1's posterior as layer k's prior and layer k's
/// d(prior) into layer k-1's dposterior, and rejects calls out of that order.
///
/// Owns nothing: the layers (views) and the workspace are the caller's and must outlive it.
/// `input_prior` is the first layer's prior (e.g. dataset statistics, 1 group, no gradient),
/// or empty for batch statistics. One options value serves every layer.
template <class Backend, class P>
class chain {
 public:
  chain(Backend backend, options opt, span<const layer<P>> layers,
        gaussian_view<const P> input_prior = {})
      : backend_(backend), opt_(opt), layers_(layers), input_prior_(input_prior) {}

  index_t size() const noexcept { return layers_.size(); }
  const layer<P>& operator[](index_t k) const noexcept { return layers_[k]; }
  const options& opts() const noexcept { return opt_; }

  /// Layer k's forward; k == 0 starts a new batch.
  template <class T>
  void forward(index_t k, tensor_view<const detail::nondeduced<T>> x, tensor_view<T> y,
               span<std::byte> workspace) {
    detail::require(k >= 0 && k < size() && (k == 0 || k == next_forward_), "bkn::chain::forward",
                    "k", "expected layer ", k == 0 ? 0 : next_forward_, " of ", size(),
                    " (forward runs in order from 0), got ", k);
    bkn::forward<Backend, T, P>(backend_, opt_, layers_[k], x, y, prior(k), workspace);
    next_forward_ = k + 1;
    next_backward_ = k + 1 == size() ? k : -1;
  }

  /// Layer k's backward, after every forward and after backward(k + 1). The last layer's
  /// dposterior is taken as zero (its posterior feeds nothing).
  template <class T>
  void backward(index_t k, tensor_view<const detail::nondeduced<T>> x,
                tensor_view<const detail::nondeduced<T>> dy, tensor_view<T> dx,
                span<std::byte> workspace) {
    if (next_backward_ < 0)
      detail::require(false, "bkn::chain::backward", "k",
                      "no forward pass through all ", size(),
                      " layers is waiting for its backward (got layer ", k, ")");
    detail::require(k == next_backward_, "bkn::chain::backward", "k",
                    "backward runs in reverse order; expected layer ", next_backward_, ", got ",
                    k);
    layer<P> current = layers_[k];
    if (k + 1 == size()) current.state.dposterior = {};
    const gaussian_view<P> dprior = k == 0 ? gaussian_view<P>() : layers_[k - 1].state.dposterior;
    bkn::backward<Backend, T, P>(backend_, opt_, current, x, dy, dx, prior(k), dprior, workspace);
    next_backward_ = k - 1;
  }

 private:
  gaussian_view<const P> prior(index_t k) const {
    return k == 0 ? input_prior_ : gaussian_view<const P>(layers_[k - 1].state.posterior);
  }

  Backend backend_;
  options opt_;
  span<const layer<P>> layers_;
  gaussian_view<const P> input_prior_;
  index_t next_forward_ = 0;
  index_t next_backward_ = -1;
};

BKN_END_NAMESPACE
