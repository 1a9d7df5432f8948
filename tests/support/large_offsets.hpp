// SPDX-License-Identifier: MIT
// A layer run on a strided view whose samples lie more than 2^31 elements apart, inside a
// sparse anonymous mapping of which only the touched pages ever exist, against a compact copy.
#pragma once

#include <doctest/doctest.h>
#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include <bkn/bkn.hpp>

namespace bkn_test {

/// An anonymous, lazily committed mapping: untouched pages cost nothing.
class sparse_mapping {
 public:
  explicit sparse_mapping(std::size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    data_ = p == MAP_FAILED ? nullptr : p;
  }
  ~sparse_mapping() {
    if (data_) munmap(data_, bytes_);
  }
  sparse_mapping(const sparse_mapping&) = delete;
  sparse_mapping& operator=(const sparse_mapping&) = delete;
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_;
};

/// Forward and backward of a BN layer and of a BKN layer (diagonal transition) on x viewed
/// with a batch stride of 2^31 + 5 elements (the second sample sits past 8 GiB of floats),
/// compared bitwise with the same layer on a compact copy: offsets must be computed in 64 bits.
template <class Backend>
void check_offsets_beyond_2_31(const Backend& backend) {
  using bkn::index_t;
  const index_t N = 2, C = 3, H = 2, W = 2;
  const index_t batch_stride = (index_t(1) << 31) + 5;
  const std::size_t bytes = std::size_t(batch_stride + C * H * W) * sizeof(float) * 2;
  sparse_mapping x_map(bytes), y_map(bytes), dx_map(bytes);
  REQUIRE(x_map.data() != nullptr);
  REQUIRE(y_map.data() != nullptr);
  REQUIRE(dx_map.data() != nullptr);
  const bkn::tensor_strides strides{batch_stride, H * W, W, 1};
  const bkn::tensor_shape shape{N, C, H, W};
  auto x = bkn::strided(static_cast<float*>(x_map.data()), shape, strides);
  auto y = bkn::strided(static_cast<float*>(y_map.data()), shape, strides);
  auto dx = bkn::strided(static_cast<float*>(dx_map.data()), shape, strides);
  std::vector<float> cx(std::size_t(N * C * H * W)), cy(cx.size()), cdy(cx.size()), cdx(cx.size());
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c)
      for (index_t s = 0; s < H * W; ++s) {
        const float value = float(1 + c + 0.5 * n + 0.25 * s * (s % 2 ? 1 : -1));
        x.at(n, c, s) = value;
        cx[std::size_t((n * C + c) * H * W + s)] = value;
        cdy[std::size_t((n * C + c) * H * W + s)] = float(0.1 * (s + 1) - 0.2 * c);
      }
  // dy lives compact: mixing a huge and a dense view is part of the test.
  const auto dy = bkn::nchw<const float>(cdy.data(), N, C, H, W);

  for (const bool with_prior : {false, true}) {
    CAPTURE(with_prior);
    bkn::layer_config cfg;
    cfg.channels = C;
    cfg.transition = bkn::transition_kind::diagonal;
    bkn::layer_storage<float> huge(cfg), compact(cfg);
    const std::vector<float> prior_mean{0.5f, 1.5f, 2.5f}, prior_var{1.0f, 2.0f, 0.5f};
    const bkn::gaussian_view<const float> prior =
        with_prior ? bkn::gaussian_view<const float>(prior_mean, prior_var, 1, C)
                   : bkn::gaussian_view<const float>();
    bkn::options opt;
    bkn::host_workspace ws(bkn::workspace_size(backend, opt, shape));
    bkn::forward(backend, opt, huge.view(), x, y, prior, ws.bytes());
    bkn::backward(backend, opt, huge.view(), x, dy, dx, prior, {}, ws.bytes());
    bkn::forward(backend, opt, compact.view(), bkn::nchw<const float>(cx.data(), N, C, H, W),
                 bkn::nchw(cy.data(), N, C, H, W), prior, ws.bytes());
    bkn::backward(backend, opt, compact.view(), bkn::nchw<const float>(cx.data(), N, C, H, W),
                  dy, bkn::nchw(cdx.data(), N, C, H, W), prior, {}, ws.bytes());
    for (index_t n = 0; n < N; ++n)
      for (index_t c = 0; c < C; ++c)
        for (index_t s = 0; s < H * W; ++s) {
          const std::size_t i = std::size_t((n * C + c) * H * W + s);
          CHECK(y.at(n, c, s) == cy[i]);
          CHECK(dx.at(n, c, s) == cdx[i]);
        }
    CHECK(huge.posterior_mean == compact.posterior_mean);
    CHECK(huge.posterior_cov == compact.posterior_cov);
    CHECK(huge.dgamma == compact.dgamma);
    CHECK(huge.dtransition_weights == compact.dtransition_weights);
  }
}

}  // namespace bkn_test
