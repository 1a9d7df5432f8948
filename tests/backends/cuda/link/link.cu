// SPDX-License-Identifier: MIT
// The CUDA half of the link test: a .cu translation unit that includes bkn (core, reference
// and CUDA backends) and instantiates the same inline functions and templates as main.cpp.
// The two are linked into one program; runs without a GPU.
#include "bkn/backends/cuda.hpp"
#include "bkn/backends/reference.hpp"
#include "bkn/bkn.hpp"
#include "link.hpp"

namespace link_test {

std::vector<float> forward_cu(const std::vector<float>& x, bkn::index_t batch,
                              bkn::index_t channels) {
  return forward_on_reference(x, batch, channels);
}

std::size_t cuda_workspace_bytes(bkn::index_t batch, bkn::index_t channels) {
  bkn::options opt;
  return bkn::workspace_size(bkn::cuda_backend{}, opt, bkn::tensor_shape{batch, channels, 1, 1},
                             channels);
}

}  // namespace link_test
