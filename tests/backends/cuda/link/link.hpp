// SPDX-License-Identifier: MIT
// The link test's shared code: the same template, instantiated in link.cu (by nvcc) and in
// main.cpp (by the host compiler), and the functions link.cu exports to main.cpp.
#pragma once

#include <cstddef>
#include <vector>

#include "bkn/backends/reference.hpp"
#include "bkn/bkn.hpp"

namespace link_test {

/// Batch normalization of an (N, C) float tensor on the reference backend, in host memory.
inline std::vector<float> forward_on_reference(const std::vector<float>& x, bkn::index_t batch,
                                               bkn::index_t channels) {
  bkn::layer_config cfg;
  cfg.channels = channels;
  bkn::layer_storage<float> s(cfg);
  bkn::options opt;
  std::vector<float> y(x.size());
  const bkn::reference_backend backend{};
  bkn::host_workspace ws(bkn::workspace_size(backend, opt, {batch, channels, 1, 1}, channels));
  bkn::forward(backend, opt, s.view(), bkn::nc(x.data(), batch, channels),
               bkn::nc(y.data(), batch, channels), bkn::gaussian_view<const float>(), ws.bytes());
  return y;
}

/// Defined in link.cu (compiled by nvcc).
std::vector<float> forward_cu(const std::vector<float>& x, bkn::index_t batch,
                              bkn::index_t channels);
std::size_t cuda_workspace_bytes(bkn::index_t batch, bkn::index_t channels);

}  // namespace link_test
