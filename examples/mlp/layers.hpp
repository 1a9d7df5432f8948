// SPDX-License-Identifier: MIT
// The MLP's own layers: a seeded random generator, dense (linear) layers over Eigen, ReLU,
// softmax cross-entropy, and SGD with momentum and weight decay over named parameters.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <bkn/config.hpp>

namespace mlp {

using bkn::index_t;

/// xoshiro256** with Box-Muller normals: the same numbers on every platform and standard
/// library (std::normal_distribution is not), so a seed reproduces a run anywhere.
class rng {
 public:
  rng(std::uint64_t seed, std::uint64_t stream) {
    std::uint64_t x = seed * 0x2545F4914F6CDD1Dull + stream * 0x9E3779B97F4A7C15ull + 1;
    for (auto& w : s_) w = splitmix(x);
  }
  std::uint64_t next() {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9, t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  /// Uniform in [0, n), without modulo bias (rejection of the incomplete last block).
  std::uint64_t below(std::uint64_t n) {
    const std::uint64_t limit = ~std::uint64_t(0) - (~std::uint64_t(0) % n + 1) % n;
    for (;;) {
      const std::uint64_t x = next();
      if (x <= limit) return x % n;
    }
  }
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u = 1.0 - uniform(), v = uniform();
    const double r = std::sqrt(-2.0 * std::log(u)), t = 6.283185307179586476925 * v;
    spare_ = r * std::sin(t);
    has_spare_ = true;
    return r * std::cos(t);
  }
  template <class V>
  void shuffle(V& v) {  // Fisher-Yates
    for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[below(i)]);
  }

 private:
  static std::uint64_t splitmix(std::uint64_t& x) {
    std::uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  std::uint64_t s_[4];
  bool has_spare_ = false;
  double spare_ = 0;
};

/// Every buffer the big passes read starts on a 64-byte boundary: Eigen's vectorized loops
/// split their work by the data's alignment, so buffers at varying offsets (whatever the heap
/// gives after earlier runs) would round differently and break reproducibility.
template <class T>
using buffer = std::vector<T, Eigen::aligned_allocator<T>>;

template <class T>
using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using matrix_map = Eigen::Map<matrix<T>>;
template <class T>
using const_matrix_map = Eigen::Map<const matrix<T>>;

/// Something SGD updates: `size` values and the gradient beside them. Weight decay applies
/// to the dense layers' weights only, as usual (not to biases or normalization parameters).
template <class T>
struct parameter {
  std::string name;
  T* value;
  const T* grad;
  index_t size;
  bool decay;
};

/// y = x W^T + b for a batch in rows: W is out x in, row-major (the layout bkn's
/// transition<P>::linear takes, so a BKN layer can use these weights as its transition).
/// Backward adds into dW and db, because a BKN weights transition adds its share there too.
template <class T>
struct linear {
  index_t in = 0, out = 0;
  buffer<T> weight, bias, dweight, dbias;

  linear() = default;
  linear(index_t in_features, index_t out_features, rng& r)
      : in(in_features),
        out(out_features),
        weight(std::size_t(in * out)),
        bias(std::size_t(out), T(0)),
        dweight(weight.size(), T(0)),
        dbias(bias.size(), T(0)) {
    const double he = std::sqrt(2.0 / double(in));  // He et al. for ReLU inputs
    for (T& w : weight) w = T(he * r.normal());
  }

  void forward(const T* x, T* y, index_t n) const {
    const_matrix_map<T> X(x, n, in), W(weight.data(), out, in);
    matrix_map<T> Y(y, n, out);
    Y.noalias() = X * W.transpose();
    Y.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias.data(), out);
  }

  /// dW += dy^T x, db += sum of dy's rows; dx = dy W when dx is not null.
  void backward(const T* x, const T* dy, T* dx, index_t n) {
    const_matrix_map<T> X(x, n, in), dY(dy, n, out), W(weight.data(), out, in);
    matrix_map<T> dW(dweight.data(), out, in);
    dW.noalias() += dY.transpose() * X;
    Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(dbias.data(), out) += dY.colwise().sum();
    if (dx != nullptr) matrix_map<T>(dx, n, in).noalias() = dY * W;
  }

  void zero_grad() {
    std::fill(dweight.begin(), dweight.end(), T(0));
    std::fill(dbias.begin(), dbias.end(), T(0));
  }

  void parameters(const std::string& name, std::vector<parameter<T>>& out_list) {
    out_list.push_back({name + ".weight", weight.data(), dweight.data(), index_t(weight.size()), true});
    out_list.push_back({name + ".bias", bias.data(), dbias.data(), index_t(bias.size()), false});
  }
};

template <class T>
void relu_forward(const T* y, T* h, index_t size) {
  for (index_t i = 0; i < size; ++i) h[i] = y[i] > T(0) ? y[i] : T(0);
}

/// dy = dh where y > 0 (in place is fine).
template <class T>
void relu_backward(const T* y, const T* dh, T* dy, index_t size) {
  for (index_t i = 0; i < size; ++i) dy[i] = y[i] > T(0) ? dh[i] : T(0);
}

/// Mean softmax cross-entropy of n rows of logits against labels; writes d(loss)/d(logits)
/// when dlogits is not null and counts the rows whose largest logit is the label.
template <class T>
double softmax_cross_entropy(const T* logits, const std::uint8_t* labels, index_t n,
                             index_t classes, T* dlogits, index_t* correct) {
  double loss = 0;
  for (index_t i = 0; i < n; ++i) {
    const T* z = logits + i * classes;
    index_t best = 0;
    for (index_t c = 1; c < classes; ++c)
      if (z[c] > z[best]) best = c;
    if (correct != nullptr && best == labels[i]) ++*correct;
    double sum = 0;  // shifted by the largest logit: exp never overflows
    for (index_t c = 0; c < classes; ++c) sum += std::exp(double(z[c]) - double(z[best]));
    const double log_sum = std::log(sum) + double(z[best]);
    loss += log_sum - double(z[labels[i]]);
    if (dlogits == nullptr) continue;
    for (index_t c = 0; c < classes; ++c) {
      const double p = std::exp(double(z[c]) - log_sum);
      dlogits[i * classes + c] = T((p - (c == labels[i] ? 1.0 : 0.0)) / double(n));
    }
  }
  return loss / double(n);
}

/// SGD with momentum and weight decay, PyTorch's form: v = mu v + (g + wd w); w -= lr v.
template <class T>
class sgd {
 public:
  sgd(std::vector<parameter<T>> params, double momentum, double weight_decay)
      : params_(std::move(params)), momentum_(momentum), decay_(weight_decay) {
    for (const auto& p : params_) velocity_.emplace_back(std::size_t(p.size), T(0));
  }

  void step(double lr) {
    using array = Eigen::Array<T, Eigen::Dynamic, 1>;
    for (std::size_t k = 0; k < params_.size(); ++k) {
      const parameter<T>& p = params_[k];
      Eigen::Map<array> w(p.value, p.size), v(velocity_[k].data(), p.size);
      Eigen::Map<const array> g(p.grad, p.size);
      const T wd = T(p.decay ? decay_ : 0.0);
      v = T(momentum_) * v + g + wd * w;
      w -= T(lr) * v;
    }
  }

  const std::vector<parameter<T>>& parameters() const { return params_; }

 private:
  std::vector<parameter<T>> params_;
  std::vector<buffer<T>> velocity_;
  double momentum_, decay_;
};

}  // namespace mlp
