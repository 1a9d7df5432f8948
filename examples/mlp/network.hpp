// SPDX-License-Identifier: MIT
// The MLP: input -> [linear -> normalization -> ReLU] per hidden layer -> linear -> softmax
// cross-entropy, with its forward and backward passes over a batch held in rows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "layers.hpp"
#include "normalization.hpp"

namespace mlp {

template <class T>
class network {
 public:
  /// Weights drawn from rng(seed, 0): the same network for every normalization choice.
  network(index_t input_features, std::vector<index_t> hidden, index_t classes,
          std::uint64_t seed)
      : input_(input_features), hidden_(std::move(hidden)), classes_(classes) {
    if (hidden_.empty()) throw std::invalid_argument("the MLP needs at least one hidden layer");
    rng r(seed, 0);
    index_t in = input_;
    for (index_t width : hidden_) {
      linears_.emplace_back(in, width, r);
      in = width;
    }
    linears_.emplace_back(in, classes_, r);
    pre_.resize(hidden_.size());
    normed_.resize(hidden_.size());
    act_.resize(hidden_.size());
  }

  /// What a normalization choice is built from: the widths and this network's linear layers
  /// (a weights transition uses and adds to them), for batches of up to max_batch.
  host_network<T> host(index_t max_batch, std::vector<double> input_mean = {},
                       std::vector<double> input_var = {}) {
    host_network<T> h;
    h.input_features = input_;
    h.widths = hidden_;
    for (std::size_t k = 0; k < hidden_.size(); ++k) h.layers.push_back(&linears_[k]);
    h.max_batch = max_batch;
    h.input_mean = std::move(input_mean);
    h.input_var = std::move(input_var);
    return h;
  }

  void set_normalization(std::unique_ptr<normalization<T>> norm) { norm_ = std::move(norm); }
  normalization<T>& norm() { return *norm_; }

  /// Logits (n x classes) of n inputs in rows; keeps what backward needs.
  const T* forward(const T* x, index_t n, phase ph) {
    reserve(n);
    x_ = x;
    const T* in = x;
    for (std::size_t k = 0; k < hidden_.size(); ++k) {
      const index_t size = n * hidden_[k];
      linears_[k].forward(in, pre_[k].data(), n);
      norm_->forward(int(k), pre_[k].data(), normed_[k].data(), n, ph);
      relu_forward(normed_[k].data(), act_[k].data(), size);
      in = act_[k].data();
    }
    linears_.back().forward(in, logits_.data(), n);
    n_ = n;
    return logits_.data();
  }

  /// After a training forward: the mean loss over the batch; every gradient (zeroed first).
  double backward(const std::uint8_t* labels, index_t* correct = nullptr) {
    const index_t n = n_;
    for (auto& l : linears_) l.zero_grad();
    const double loss =
        softmax_cross_entropy(logits_.data(), labels, n, classes_, dlogits_.data(), correct);
    const std::size_t L = hidden_.size();
    // Two buffers in turn: a normalization's dx may not share memory with its dy's input x.
    linears_.back().backward(act_[L - 1].data(), dlogits_.data(), dact_.data(), n);
    for (std::size_t k = L; k-- > 0;) {
      relu_backward(normed_[k].data(), dact_.data(), dact_.data(), n * hidden_[k]);
      norm_->backward(int(k), pre_[k].data(), dact_.data(), dpre_.data(), n);
      linears_[k].backward(k == 0 ? x_ : act_[k - 1].data(), dpre_.data(),
                           k == 0 ? nullptr : dact_.data(), n);
    }
    return loss;
  }

  /// Everything SGD updates: the linear layers', then the normalization's parameters.
  std::vector<parameter<T>> parameters() {
    std::vector<parameter<T>> p;
    for (std::size_t k = 0; k < linears_.size(); ++k)
      linears_[k].parameters("linear" + std::to_string(k), p);
    for (auto& q : norm_->parameters()) p.push_back(q);
    return p;
  }

  std::vector<linear<T>>& linears() { return linears_; }
  index_t classes() const { return classes_; }

 private:
  void reserve(index_t n) {
    if (n <= capacity_) return;
    index_t widest = classes_;
    for (std::size_t k = 0; k < hidden_.size(); ++k) {
      for (auto* v : {&pre_[k], &normed_[k], &act_[k]}) v->resize(std::size_t(n * hidden_[k]));
      widest = std::max(widest, hidden_[k]);
    }
    logits_.resize(std::size_t(n * classes_));
    dlogits_.resize(logits_.size());
    dact_.resize(std::size_t(n * widest));
    dpre_.resize(dact_.size());
    capacity_ = n;
  }

  index_t input_;
  std::vector<index_t> hidden_;
  index_t classes_;
  std::vector<linear<T>> linears_;
  std::unique_ptr<normalization<T>> norm_;
  std::vector<buffer<T>> pre_, normed_, act_;  // per hidden layer: x, y, relu(y)
  buffer<T> logits_, dlogits_, dact_, dpre_;
  const T* x_ = nullptr;
  index_t n_ = 0, capacity_ = 0;
};

}  // namespace mlp
