// SPDX-License-Identifier: MIT
// forward and backward in chunks of statistics groups (kernels<B>::group_chunk, steps.hpp):
// the same bits as all groups at once, for every case of the conformance sweep.
#include <doctest/doctest.h>

#include "bkn/backends/reference.hpp"
#include "bkn/bkn.hpp"

#include "backends/conformance.hpp"

namespace {

/// The reference backend, asking the core for `chunk` groups at a time.
struct chunked_reference {
  bkn::index_t chunk = 1;
};

}  // namespace

BKN_BEGIN_NAMESPACE
template <>
struct kernels<chunked_reference> {
  using B = chunked_reference;
  using R = kernels<reference_backend>;

  static index_t group_chunk(const B& b, const tensor_shape&, index_t, std::size_t) {
    return b.chunk;
  }
  static std::size_t scratch_bytes(const B&, const tensor_shape& x, index_t gs, covariance m) {
    return R::scratch_bytes(reference_backend{}, x, gs, m);
  }
  template <class... A>
  static void moments(const B&, A&&... a) {
    R::moments(reference_backend{}, std::forward<A>(a)...);
  }
  template <class... A>
  static void covariance(const B&, A&&... a) {
    R::covariance(reference_backend{}, std::forward<A>(a)...);
  }
  template <class... A>
  static void sums(const B&, A&&... a) {
    R::sums(reference_backend{}, std::forward<A>(a)...);
  }
  template <class... A>
  static void affine(const B&, A&&... a) {
    R::affine(reference_backend{}, std::forward<A>(a)...);
  }
  template <class... A>
  static void mix(const B&, A&&... a) {
    R::mix(reference_backend{}, std::forward<A>(a)...);
  }
  template <class F>
  static void for_each(const B&, index_t count, F f) {
    R::for_each(reference_backend{}, count, f);
  }
};
BKN_END_NAMESPACE

namespace {

/// The chunks the core takes for a case, as groups_per_chunk decides.
bkn::index_t chunk_of(const conformance::layer_case& c, bkn::index_t chunk) {
  bkn::options opt;
  opt.mode = c.mode;
  bkn::transition<double> A;
  A.kind = c.transition;
  return bkn::detail::groups_per_chunk(chunked_reference{chunk}, opt, A,
                                       {c.batch, c.channels, c.height, c.width}, c.group_size,
                                       sizeof(double));
}

}  // namespace

TEST_CASE("group chunks: a backend's chunk size is taken in diagonal mode, never past the groups") {
  conformance::layer_case c{32, 3, 5, 3, 2, conformance::layout::nchw, bkn::covariance::diagonal,
                            bkn::transition_kind::dense, true, false, true};
  CHECK(chunk_of(c, 3) == 3);
  CHECK(chunk_of(c, 0) == 16);   // 0: all at once
  CHECK(chunk_of(c, 40) == 16);  // more than there are
  c.mode = bkn::covariance::full;
  CHECK(chunk_of(c, 3) == 16);  // full mode: never in chunks
  c.mode = bkn::covariance::diagonal;
  c.transition = bkn::transition_kind::weights;
  CHECK(chunk_of(c, 3) == 16);  // through the host's weights: never in chunks
  // The reference backend has no group_chunk: all at once.
  bkn::options opt;
  CHECK(bkn::detail::groups_per_chunk(bkn::reference_backend{}, opt, bkn::transition<double>(),
                                      {32, 3, 5, 3}, 2, sizeof(double)) == 16);
}

TEST_CASE_TEMPLATE("group chunks: forward and backward in chunks give the bits of one pass", T,
                   float, double) {
  std::size_t chunked = 0;
  for (const conformance::layer_case& c : conformance::sweep(200)) {
    const bkn::index_t groups = c.batch / c.group_size;
    if (groups < 2) continue;
    for (bkn::index_t chunk : {bkn::index_t(1), bkn::index_t(3)}) {
      if (chunk >= groups) continue;
      const std::string name = conformance::describe(c);
      CAPTURE(name);
      CAPTURE(chunk);
      chunked += chunk_of(c, chunk) < groups;
      conformance::check_identical(
          conformance::run_layer<chunked_reference, T, T>(chunked_reference{chunk}, c, 3),
          conformance::run_layer<bkn::reference_backend, T, T>(bkn::reference_backend{}, c, 3));
    }
  }
  CHECK(chunked > 20);  // the sweep reaches the chunked path
}

TEST_CASE("group chunks: a prior shared by every group is read whole by each chunk") {
  conformance::layer_case c{8, 5, 3, 3, 2, conformance::layout::nhwc, bkn::covariance::diagonal,
                            bkn::transition_kind::dense, true, true, true};
  const auto shared = [&](conformance::layer_inputs<double> in) {
    // One prior group (a caller's prior shared by every group): the first group's.
    const bkn::index_t Cin = in.prior.channels;
    in.prior.groups = 1;
    for (auto* v : {&in.prior.mean, &in.prior.cov, &in.prior.dmean, &in.prior.dcov})
      v->resize(std::size_t(Cin));
    return in;
  };
  const auto in = shared(conformance::draw<double>(c, 9));
  for (bkn::index_t chunk : {1, 2, 3}) {
    CAPTURE(chunk);
    conformance::check_identical(
        conformance::run_layer<chunked_reference, double, double>(chunked_reference{chunk}, in),
        conformance::run_layer<bkn::reference_backend, double, double>(bkn::reference_backend{},
                                                                       in));
  }
}
