// SPDX-License-Identifier: MIT
// Batched products of the small matrices of full-covariance mode (A Sigma A^T, A^T D A and
// their gradients), as one functor that runs on any backend's for_each.
#pragma once

#include "bkn/config.hpp"

BKN_BEGIN_NAMESPACE
namespace detail {

/// A row-major operand of a batched product: element (b, i, k) of op(X) where X[b] is at
/// data + b * batch_stride (batch_stride 0: shared by every batch), transposed or not.
template <class P>
struct matrix_operand {
  const P* data;
  index_t batch_stride;
  index_t leading;  ///< row length of the stored matrix
  bool transposed;

  BKN_HOST_DEVICE double operator()(index_t b, index_t i, index_t k) const {
    const P* m = data + b * batch_stride;
    return double(transposed ? m[k * leading + i] : m[i * leading + k]);
  }
};

/// out[ob][i][j] = sum over the batches b that map to ob, and over k < K, of lhs(b,i,k) *
/// rhs(b,k,j): out has `out_batches` batches of rows x cols; when out_batches == 1 and
/// batches > 1 the products of all batches are summed (the gradient of a broadcast prior).
/// `accumulate` adds to out instead of overwriting it. Run with for_each over
/// out_batches * rows * cols; each call writes one element, summing in a fixed order.
template <class P>
struct batched_product {
  matrix_operand<P> lhs, rhs;
  P* out;
  index_t batches, out_batches, rows, cols, inner;
  bool accumulate;

  BKN_HOST_DEVICE void operator()(index_t e) const {
    const index_t ob = e / (rows * cols);
    const index_t i = (e / cols) % rows;
    const index_t j = e % cols;
    const index_t first = out_batches == batches ? ob : 0;
    const index_t last = out_batches == batches ? ob + 1 : batches;
    double sum = accumulate ? double(out[e]) : 0.0;
    for (index_t b = first; b < last; ++b)
      for (index_t k = 0; k < inner; ++k) sum += lhs(b, i, k) * rhs(b, k, j);
    out[e] = P(sum);
  }
};

}  // namespace detail
BKN_END_NAMESPACE
