// Tests of bkn/tensor.hpp: the offsets of the nc / nchw / nhwc / strided views, the layout
// predicates, and the host checks of a view (detail::check_view, detail::check_shape).
#include "bkn/tensor.hpp"

#include <doctest/doctest.h>

#include <string>
#include <type_traits>
#include <vector>

#include "support/thrown.hpp"

namespace {

using bkn::index_t;
using bkn::tensor_shape;
using bkn::tensor_strides;
using bkn::tensor_view;

using bkn_test::thrown;

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace

static_assert(std::is_trivially_copyable<tensor_view<float>>::value, "kernels take views by value");
static_assert(std::is_convertible<tensor_view<float>, tensor_view<const float>>::value);
static_assert(!std::is_convertible<tensor_view<const float>, tensor_view<float>>::value);

TEST_CASE("tensor: nc offsets") {
  std::vector<float> buf(12);
  const auto v = bkn::nc(buf.data(), 3, 4);
  CHECK(v.shape() == tensor_shape{3, 4, 1, 1});
  CHECK(v.batch() == 3);
  CHECK(v.channels() == 4);
  CHECK(v.spatial() == 1);
  CHECK_FALSE(v.empty());
  for (index_t n = 0; n < 3; ++n)
    for (index_t c = 0; c < 4; ++c) {
      CHECK(v.offset(n, c, 0, 0) == n * 4 + c);
      CHECK(&v.at(n, c, 0) == buf.data() + n * 4 + c);
      CHECK(&v(n, c, 0, 0) == buf.data() + n * 4 + c);
    }
}

TEST_CASE("tensor: nchw offsets") {
  const index_t N = 2, C = 3, H = 4, W = 5;
  std::vector<double> buf(std::size_t(N * C * H * W));
  const auto v = bkn::nchw(buf.data(), N, C, H, W);
  CHECK(v.shape() == tensor_shape{N, C, H, W});
  CHECK(v.spatial() == 20);
  CHECK(v.shape().elements() == 120);
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c)
      for (index_t h = 0; h < H; ++h)
        for (index_t w = 0; w < W; ++w) {
          const index_t expect = ((n * C + c) * H + h) * W + w;
          CHECK(v.offset(n, c, h, w) == expect);
          CHECK(&v.at(n, c, h * W + w) == buf.data() + expect);
        }
}

TEST_CASE("tensor: nhwc offsets") {
  const index_t N = 2, C = 3, H = 4, W = 5;
  std::vector<double> buf(std::size_t(N * C * H * W));
  const auto v = bkn::nhwc(buf.data(), N, C, H, W);
  CHECK(v.shape() == tensor_shape{N, C, H, W});
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c)
      for (index_t h = 0; h < H; ++h)
        for (index_t w = 0; w < W; ++w) {
          const index_t expect = ((n * H + h) * W + w) * C + c;
          CHECK(v.offset(n, c, h, w) == expect);
          CHECK(&v.at(n, c, h * W + w) == buf.data() + expect);
        }
}

TEST_CASE("tensor: strided offsets (a channel slice of NHWC, a padded NCHW)") {
  // Channels 2..3 of an NHWC tensor with 5 channels, N = 2, H = 3, W = 2.
  std::vector<float> buf(2 * 3 * 2 * 5);
  const auto v = bkn::strided(buf.data() + 2, tensor_shape{2, 2, 3, 2},
                              tensor_strides{3 * 2 * 5, 1, 2 * 5, 5});
  for (index_t n = 0; n < 2; ++n)
    for (index_t c = 0; c < 2; ++c)
      for (index_t h = 0; h < 3; ++h)
        for (index_t w = 0; w < 2; ++w)
          CHECK(&v(n, c, h, w) == buf.data() + ((n * 3 + h) * 2 + w) * 5 + (c + 2));

  // NCHW rows padded to 8 elements, planes to 4 rows of 8 (H = 3, W = 6).
  std::vector<float> pad(2 * 2 * 4 * 8);
  const auto p = bkn::strided(pad.data(), tensor_shape{2, 2, 3, 6}, tensor_strides{64, 32, 8, 1});
  CHECK(p.offset(1, 1, 2, 5) == 64 + 32 + 16 + 5);
  CHECK(&p.at(1, 0, 2 * 6 + 3) == pad.data() + 64 + 16 + 3);
  // Large offsets do not wrap: index_t is 64-bit.
  const tensor_view<const float> big(nullptr, tensor_shape{1 << 20, 1 << 12, 1, 1},
                                     tensor_strides{1 << 12, 1, 1, 1});
  CHECK(big.offset((1 << 20) - 1, (1 << 12) - 1, 0, 0) == (index_t(1) << 32) - 1);
}

TEST_CASE("tensor: const conversion keeps data, shape and strides") {
  std::vector<float> buf(24);
  const auto v = bkn::nhwc(buf.data(), 1, 2, 3, 4);
  const tensor_view<const float> c = v;
  CHECK(c.data() == v.data());
  CHECK(c.shape() == v.shape());
  CHECK(c.strides().batch == v.strides().batch);
  CHECK(c.strides().channel == v.strides().channel);
  CHECK(c.strides().height == v.strides().height);
  CHECK(c.strides().width == v.strides().width);
}

TEST_CASE("tensor: layout predicates") {
  float* d = nullptr;  // predicates look at extents and strides only
  SUBCASE("nc: all three") {
    const auto v = bkn::nc(d, 5, 3);
    CHECK(v.planes_contiguous());
    CHECK(v.channels_contiguous());
    CHECK(v.pixels_dense());
  }
  SUBCASE("nchw: planes only") {
    const auto v = bkn::nchw(d, 2, 3, 4, 5);
    CHECK(v.planes_contiguous());
    CHECK_FALSE(v.channels_contiguous());
    CHECK_FALSE(v.pixels_dense());
  }
  SUBCASE("nchw with one channel is also a dense (NHW) x 1 matrix") {
    const auto v = bkn::nchw(d, 2, 1, 4, 5);
    CHECK(v.planes_contiguous());
    CHECK(v.channels_contiguous());
    CHECK(v.pixels_dense());
  }
  SUBCASE("nhwc: channels contiguous and dense, planes not") {
    const auto v = bkn::nhwc(d, 2, 3, 4, 5);
    CHECK_FALSE(v.planes_contiguous());
    CHECK(v.channels_contiguous());
    CHECK(v.pixels_dense());
  }
  SUBCASE("nhwc with 1 x 1 images has contiguous (1-element) planes") {
    const auto v = bkn::nhwc(d, 2, 3, 1, 1);
    CHECK(v.planes_contiguous());
    CHECK(v.channels_contiguous());
    CHECK(v.pixels_dense());
  }
  SUBCASE("a channel slice of nhwc: contiguous channels with gaps between pixels") {
    const auto v = bkn::strided(d, tensor_shape{2, 2, 3, 4}, tensor_strides{60, 1, 20, 5});
    CHECK(v.channels_contiguous());
    CHECK_FALSE(v.pixels_dense());
    CHECK_FALSE(v.planes_contiguous());
  }
  SUBCASE("padded nc rows: channels contiguous, not dense") {
    const auto v = bkn::strided(d, tensor_shape{4, 3, 1, 1}, tensor_strides{8, 1, 0, 0});
    CHECK(v.channels_contiguous());
    CHECK(v.planes_contiguous());
    CHECK_FALSE(v.pixels_dense());
  }
  SUBCASE("padded nchw rows: planes not contiguous") {
    const auto v = bkn::strided(d, tensor_shape{2, 3, 4, 5}, tensor_strides{96, 32, 8, 1});
    CHECK_FALSE(v.planes_contiguous());
    CHECK_FALSE(v.channels_contiguous());
    CHECK_FALSE(v.pixels_dense());
  }
  SUBCASE("a single sample ignores the batch stride") {
    const auto v = bkn::strided(d, tensor_shape{1, 3, 2, 2}, tensor_strides{12345, 1, 6, 3});
    CHECK(v.pixels_dense());
  }
}

TEST_CASE("tensor: nchw with 1 x 1 images is nc") {
  // Channel stride H*W = 1 and batch stride C: the same memory as nc, all three predicates.
  float* d = nullptr;
  const auto v = bkn::nchw(d, 2, 3, 1, 1);
  CHECK(v.strides().channel == 1);
  CHECK(v.strides().batch == 3);
  CHECK(v.planes_contiguous());
  CHECK(v.channels_contiguous());
  CHECK(v.pixels_dense());
}

TEST_CASE("tensor: check_view accepts valid views") {
  std::vector<float> buf(2 * 3 * 4 * 5);
  const char* r = "bkn::test";
  for (bool written : {false, true}) {
    CAPTURE(written);
    CHECK_NOTHROW(bkn::detail::check_view(r, "x", bkn::nc(buf.data(), 40, 3), written));
    CHECK_NOTHROW(bkn::detail::check_view(r, "x", bkn::nchw(buf.data(), 2, 3, 4, 5), written));
    CHECK_NOTHROW(bkn::detail::check_view(r, "x", bkn::nhwc(buf.data(), 2, 3, 4, 5), written));
    // A channel slice and padded rows: distinct addresses.
    CHECK_NOTHROW(bkn::detail::check_view(
        r, "x", bkn::strided(buf.data(), {2, 2, 3, 2}, {30, 1, 10, 5}), written));
    CHECK_NOTHROW(bkn::detail::check_view(
        r, "x", bkn::strided(buf.data(), {3, 2, 1, 1}, {7, 3, 0, 0}), written));
    // Empty tensors need no data, whatever their strides' sizes.
    CHECK_NOTHROW(bkn::detail::check_view(r, "x", bkn::nc<float>(nullptr, 0, 8), written));
    CHECK_NOTHROW(bkn::detail::check_view(r, "x", bkn::nchw<float>(nullptr, 4, 0, 3, 3), written));
    // Extent-1 axes may have any (even zero) stride.
    CHECK_NOTHROW(bkn::detail::check_view(
        r, "x", bkn::strided(buf.data(), {1, 4, 1, 1}, {0, 1, 0, 0}), written));
  }
  // An input (not written) may broadcast with a zero stride.
  CHECK_NOTHROW(
      bkn::detail::check_view(r, "x", bkn::strided(buf.data(), {4, 3, 1, 1}, {0, 1, 1, 1}), false));
}

TEST_CASE("tensor: check_view rejects negative strides") {
  std::vector<float> buf(64);
  const tensor_strides bad[] = {{-3, 1, 1, 1}, {3, -1, 1, 1}, {12, 4, -2, 1}, {12, 4, 2, -1}};
  const tensor_shape shape[] = {{2, 3, 1, 1}, {2, 3, 1, 1}, {2, 3, 2, 2}, {2, 3, 2, 2}};
  for (int i = 0; i < 4; ++i) {
    CAPTURE(i);
    for (bool written : {false, true}) {
      const auto e = thrown([&] {
        bkn::detail::check_view("bkn::forward", "x",
                                bkn::strided(buf.data() + 32, shape[i], bad[i]), written);
      });
      CHECK(std::string(e.routine()) == "bkn::forward");
      CHECK(std::string(e.argument()) == "x");
      CHECK(contains(e.what(), "bkn::forward: x: "));
      CHECK(contains(e.what(), "non-negative"));
      CHECK(contains(e.what(), "-"));
    }
  }
}

TEST_CASE("tensor: check_view rejects negative extents") {
  std::vector<float> buf(8);
  const auto e = thrown([&] {
    bkn::detail::check_view("bkn::observe", "x",
                            bkn::strided(buf.data(), {-1, 2, 1, 1}, {2, 1, 1, 1}), false);
  });
  CHECK(std::string(e.argument()) == "x");
  CHECK(contains(e.what(), "(-1, 2, 1, 1)"));
}

TEST_CASE("tensor: check_view rejects null data for a non-empty tensor") {
  for (bool written : {false, true}) {
    const auto e = thrown([&] {
      bkn::detail::check_view("bkn::normalize", "y", bkn::nc<float>(nullptr, 2, 3), written);
    });
    CHECK(std::string(e.routine()) == "bkn::normalize");
    CHECK(std::string(e.argument()) == "y");
    CHECK(contains(e.what(), "bkn::normalize: y: "));
    CHECK(contains(e.what(), "null"));
  }
}

TEST_CASE("tensor: check_view rejects overlapping output strides") {
  std::vector<float> buf(256);
  struct bad_case {
    tensor_shape shape;
    tensor_strides strides;
  };
  const bad_case cases[] = {
      {{4, 3, 1, 1}, {0, 1, 1, 1}},   // zero batch stride: every sample on the same row
      {{4, 3, 1, 1}, {3, 0, 1, 1}},   // zero channel stride
      {{2, 3, 1, 1}, {2, 1, 1, 1}},   // rows of 3 at a pitch of 2: (0, 2) and (1, 0) coincide
      {{1, 2, 3, 3}, {18, 9, 2, 1}},  // rows of 3 at a pitch of 2 inside a plane
      {{1, 1, 3, 3}, {0, 0, 3, 3}},   // h and w with the same stride
      {{2, 2, 2, 2}, {1, 1, 1, 1}},   // everything at stride 1
  };
  for (const auto& k : cases) {
    CAPTURE(k.strides.batch);
    CAPTURE(k.strides.channel);
    const auto v = bkn::strided(buf.data(), k.shape, k.strides);
    // As an input it is fine (reading an element twice is harmless).
    CHECK_NOTHROW(bkn::detail::check_view("bkn::backward", "dx", v, false));
    const auto e = thrown([&] { bkn::detail::check_view("bkn::backward", "dx", v, true); });
    CHECK(std::string(e.routine()) == "bkn::backward");
    CHECK(std::string(e.argument()) == "dx");
    CHECK(contains(e.what(), "bkn::backward: dx: "));
    CHECK(contains(e.what(), "overlap"));
  }
}

TEST_CASE("tensor: check_shape") {
  std::vector<float> buf(24);
  const auto v = bkn::nchw(buf.data(), 2, 3, 2, 2);
  CHECK_NOTHROW(bkn::detail::check_shape("bkn::forward", "y", v, tensor_shape{2, 3, 2, 2}));
  const auto e = thrown([&] {
    bkn::detail::check_shape("bkn::forward", "y", v, tensor_shape{2, 3, 4, 1});
  });
  CHECK(std::string(e.routine()) == "bkn::forward");
  CHECK(std::string(e.argument()) == "y");
  CHECK(contains(e.what(), "expected shape (2, 3, 4, 1)"));
  CHECK(contains(e.what(), "got (2, 3, 2, 2)"));
}

