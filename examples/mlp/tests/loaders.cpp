// SPDX-License-Identifier: MIT
// The data loaders on small files the tests write in the real formats: IDX (gzipped and raw)
// as Fashion-MNIST ships it and CIFAR-10's binary batches, and the clear error each broken
// file gives (truncated, wrong magic number, wrong size, bad label), naming the file.
#include <doctest/doctest.h>

#include <zlib.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data.hpp"

namespace {

namespace fs = std::filesystem;
using bytes = std::vector<std::uint8_t>;
using mlp::index_t;

/// A fresh folder for one test case under the build tree.
fs::path folder(const std::string& name) {
  const fs::path dir = fs::path(BKN_MLP_TEST_FILES) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_raw(const fs::path& path, const bytes& data) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size()));
  REQUIRE(f.good());
}

void write_gzip(const fs::path& path, const bytes& data) {
  gzFile f = gzopen(path.string().c_str(), "wb");
  REQUIRE(f != nullptr);
  REQUIRE(gzwrite(f, data.data(), unsigned(data.size())) == int(data.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

void put32(bytes& b, std::uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) b.push_back(std::uint8_t(v >> shift));
}

/// An IDX file of unsigned bytes, as the format's description has it: 0, 0, type 0x08, the
/// number of dimensions, each dimension as a big-endian 32-bit integer, then the values.
bytes idx(const std::vector<std::uint32_t>& shape, const bytes& values) {
  bytes b{0, 0, 0x08, std::uint8_t(shape.size())};
  for (std::uint32_t d : shape) put32(b, d);
  b.insert(b.end(), values.begin(), values.end());
  return b;
}

/// Images whose pixel p of image i is (7 i + p) mod 256, and labels i mod 10.
bytes pixels(index_t count, index_t size) {
  bytes b;
  for (index_t i = 0; i < count; ++i)
    for (index_t p = 0; p < size; ++p) b.push_back(std::uint8_t((7 * i + p) % 256));
  return b;
}
bytes labels(index_t count) {
  bytes b;
  for (index_t i = 0; i < count; ++i) b.push_back(std::uint8_t(i % 10));
  return b;
}

/// A Fashion-MNIST folder with 12 training and 5 test images of 4 x 3 pixels.
void write_fashion(const fs::path& dir, bool gzipped) {
  const auto put = [&](const std::string& name, const bytes& data) {
    if (gzipped)
      write_gzip(dir / (name + ".gz"), data);
    else
      write_raw(dir / name, data);
  };
  put("train-images-idx3-ubyte", idx({12, 4, 3}, pixels(12, 12)));
  put("train-labels-idx1-ubyte", idx({12}, labels(12)));
  put("t10k-images-idx3-ubyte", idx({5, 4, 3}, pixels(5, 12)));
  put("t10k-labels-idx1-ubyte", idx({5}, labels(5)));
}

/// The message of the mlp::data_error `f` throws ("" if none).
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const mlp::data_error& e) {
    return e.what();
  }
  return "";
}

TEST_CASE("Fashion-MNIST IDX files, gzipped and raw, read back exactly") {
  for (bool gzipped : {true, false}) {
    CAPTURE(gzipped);
    const fs::path dir = folder(gzipped ? "fashion_gz" : "fashion_raw");
    write_fashion(dir, gzipped);
    const mlp::dataset d = mlp::load_fashion_mnist(dir.string());
    CHECK(d.train.count == 12);
    CHECK(d.test.count == 5);
    CHECK(d.train.height == 4);
    CHECK(d.train.width == 3);
    CHECK(d.train.channels == 1);
    CHECK(d.train.pixels == pixels(12, 12));
    CHECK(d.test.pixels == pixels(5, 12));
    CHECK(d.train.labels == labels(12));
    CHECK(d.test.labels == labels(5));

    // Standardization: the training pixels' mean and standard deviation, in [0, 1] units.
    double sum = 0, sum2 = 0;
    for (std::uint8_t p : pixels(12, 12)) {
      sum += p / 255.0;
      sum2 += (p / 255.0) * (p / 255.0);
    }
    const double mean = sum / 144, sd = std::sqrt(sum2 / 144 - mean * mean);
    CHECK(d.channel_mean[0] == doctest::Approx(mean));
    CHECK(d.channel_std[0] == doctest::Approx(sd));
    std::vector<index_t> order{3, 0};
    std::vector<float> x(24);
    d.gather(d.train, order, 0, 2, x.data());
    CHECK(x[0] == doctest::Approx(((7 * 3) / 255.0 - mean) / sd).epsilon(1e-6));
    CHECK(x[12 + 5] == doctest::Approx((5 / 255.0 - mean) / sd).epsilon(1e-6));
  }
}

TEST_CASE("limits keep the first images") {
  const fs::path dir = folder("fashion_limits");
  write_fashion(dir, true);
  const mlp::dataset d = mlp::load_fashion_mnist(dir.string(), 7, 2);
  CHECK(d.train.count == 7);
  CHECK(d.test.count == 2);
  CHECK(d.train.pixels == pixels(7, 12));
  CHECK(d.test.labels == labels(2));
}

TEST_CASE("a broken IDX file gives an error that names it and says what is wrong") {
  const fs::path dir = folder("fashion_broken");
  write_fashion(dir, false);
  const fs::path images = dir / "train-images-idx3-ubyte";
  const fs::path labels_file = dir / "train-labels-idx1-ubyte";
  const auto load = [&] { mlp::load_fashion_mnist(dir.string()); };

  SUBCASE("truncated values") {
    bytes b = idx({12, 4, 3}, pixels(12, 12));
    b.resize(b.size() - 5);
    write_raw(images, b);
    const std::string e = error_of(load);
    CHECK(e.find(images.string() + ": truncated") == 0);
    CHECK(e.find("144 values") != std::string::npos);
  }
  SUBCASE("truncated header") {
    write_raw(images, bytes{0, 0, 8, 3, 0, 0});
    CHECK(error_of(load).find(images.string() + ": truncated IDX header") == 0);
  }
  SUBCASE("too long") {
    bytes b = idx({12, 4, 3}, pixels(12, 12));
    b.push_back(0);
    write_raw(images, b);
    CHECK(error_of(load).find(images.string() + ": too long") == 0);
  }
  SUBCASE("wrong magic number: a labels file where images belong") {
    write_raw(images, idx({12}, labels(12)));
    const std::string e = error_of(load);
    CHECK(e.find(images.string() + ": not an IDX file of 3-dimensional unsigned bytes") == 0);
    CHECK(e.find("0x00000801, expected 0x00000803") != std::string::npos);
  }
  SUBCASE("wrong magic number: not IDX at all") {
    write_raw(images, bytes{'P', '5', '\n', '4', ' ', '3', '\n', '2', '5', '5', '\n', 0, 0, 0});
    CHECK(error_of(load).find("not an IDX file") != std::string::npos);
  }
  SUBCASE("labels and images disagree") {
    write_raw(labels_file, idx({11}, labels(11)));
    CHECK(error_of(load).find(labels_file.string() + ": 11 labels for the 12 images") == 0);
  }
  SUBCASE("a label that is no class") {
    bytes l = labels(12);
    l[4] = 10;
    write_raw(labels_file, idx({12}, l));
    CHECK(error_of(load).find(labels_file.string() + ": label 10 of item 4 is not a class") == 0);
  }
  SUBCASE("missing file") {
    fs::remove(images);
    CHECK(error_of(load) == images.string() + ".gz: no such file");
  }
}

TEST_CASE("a truncated gzip stream is an error, not a short file") {
  const fs::path dir = folder("fashion_gz_truncated");
  write_fashion(dir, true);
  const fs::path images = dir / "train-images-idx3-ubyte.gz";
  std::ifstream in(images, std::ios::binary);
  bytes whole((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();
  whole.resize(whole.size() - 12);  // cuts the trailer and some data
  write_raw(images, whole);
  const std::string e = error_of([&] { mlp::load_fashion_mnist(dir.string()); });
  CHECK(e.find(images.string() + ": corrupt or truncated gzip data") == 0);
}

/// A CIFAR-10 binary batch of `count` records: label i mod 10, then red, green and blue planes
/// whose pixel p of record i is (i + 3 p + 50 c) mod 256 for channel c.
bytes cifar(index_t first, index_t count) {
  bytes b;
  for (index_t i = first; i < first + count; ++i) {
    b.push_back(std::uint8_t(i % 10));
    for (index_t c = 0; c < 3; ++c)
      for (index_t p = 0; p < 1024; ++p) b.push_back(std::uint8_t((i + 3 * p + 50 * c) % 256));
  }
  return b;
}

void write_cifar(const fs::path& dir) {
  for (int k = 1; k <= 5; ++k)
    write_raw(dir / ("data_batch_" + std::to_string(k) + ".bin"), cifar(3 * (k - 1), 3));
  write_raw(dir / "test_batch.bin", cifar(100, 4));
}

TEST_CASE("CIFAR-10 binary batches read back exactly, planes and labels in order") {
  const fs::path root = folder("cifar");
  const fs::path dir = root / "cifar-10-batches-bin";  // the archive's folder is found too
  fs::create_directories(dir);
  write_cifar(dir);
  for (const fs::path& where : {dir, root}) {
    const mlp::dataset d = mlp::load_cifar10(where.string());
    CHECK(d.train.count == 15);
    CHECK(d.test.count == 4);
    CHECK(d.train.channels == 3);
    CHECK(d.train.height == 32);
    CHECK(d.train.width == 32);
    CHECK(d.train.labels[7] == 7);
    CHECK(d.test.labels[1] == 1);  // record 101
    // Record 7, green plane, pixel 5: (7 + 15 + 50) mod 256.
    CHECK(d.train.pixels[std::size_t(7 * 3072 + 1024 + 5)] == 72);
    CHECK(d.test.pixels[std::size_t(2 * 3072 + 2048 + 1)] == (102 + 3 + 100) % 256);
    REQUIRE(d.channel_mean.size() == 3);
    CHECK(d.channel_mean[1] > d.channel_mean[0] - 1);  // computed per channel, all finite
    for (double s : d.channel_std) CHECK(s > 0);
  }
}

TEST_CASE("a broken CIFAR-10 batch gives an error that names it") {
  const fs::path dir = folder("cifar_broken");
  write_cifar(dir);
  const auto load = [&] { mlp::load_cifar10(dir.string()); };
  SUBCASE("truncated record") {
    bytes b = cifar(0, 3);
    b.pop_back();
    write_raw(dir / "data_batch_2.bin", b);
    const std::string e = error_of(load);
    CHECK(e.find((dir / "data_batch_2.bin").string() + ": not a CIFAR-10 binary batch") == 0);
    CHECK(e.find("multiple of 3073 bytes") != std::string::npos);
    CHECK(e.find("got 9218 bytes") != std::string::npos);
  }
  SUBCASE("empty file") {
    write_raw(dir / "test_batch.bin", bytes{});
    CHECK(error_of(load).find((dir / "test_batch.bin").string() + ": not a CIFAR-10") == 0);
  }
  SUBCASE("a label of 100 classes") {
    bytes b = cifar(0, 3);
    b[3073] = 42;
    write_raw(dir / "data_batch_1.bin", b);
    CHECK(error_of(load).find("label 42 of record 1 is not a class") != std::string::npos);
  }
  SUBCASE("missing batch") {
    fs::remove(dir / "data_batch_4.bin");
    CHECK(error_of(load) == (dir / "data_batch_4.bin").string() + ": no such file");
  }
}

}  // namespace
