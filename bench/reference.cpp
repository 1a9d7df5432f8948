// SPDX-License-Identifier: MIT
// The reference backend's line: serial, double accumulation; on the small shapes only.
#include <bkn/backends/reference.hpp>

#include "suite.hpp"

namespace bkn_bench {

void register_reference(const shape_case& c, const benchmark_kind& k, const settings&) {
  static const backend_line<bkn::reference_backend> line{"reference:t1", {}, 1, true, nullptr};
  add(line, c, k);
}

}  // namespace bkn_bench
