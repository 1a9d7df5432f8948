// SPDX-License-Identifier: MIT
// The image classification data the MLP trains on: Fashion-MNIST (IDX files, gzipped or raw)
// and CIFAR-10 (the binary version), read, validated and standardized per colour channel.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <bkn/config.hpp>

namespace mlp {

using bkn::index_t;

/// A file that is missing, unreadable or not in the format it should be in; what() starts with
/// the file's path.
class data_error : public std::runtime_error {
 public:
  data_error(const std::string& path, const std::string& problem)
      : std::runtime_error(path + ": " + problem) {}
};

/// Images as bytes (count x channels x height x width, channel-major like the files) and their
/// labels in [0, classes).
struct image_set {
  index_t count = 0, channels = 0, height = 0, width = 0;
  std::vector<std::uint8_t> pixels;
  std::vector<std::uint8_t> labels;

  index_t features() const { return channels * height * width; }
  /// Keeps the first `limit` images (0: all).
  void truncate(index_t limit) {
    if (limit <= 0 || limit >= count) return;
    count = limit;
    pixels.resize(std::size_t(count * features()));
    labels.resize(std::size_t(count));
  }
};

inline constexpr int classes = 10;

/// The whole file, decompressed when it is gzipped (zlib reads a file without a gzip header
/// as it is, so raw IDX files go through here too).
inline std::vector<std::uint8_t> read_maybe_gzipped(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) throw data_error(path, "no such file");
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) throw data_error(path, "cannot open");
  std::vector<std::uint8_t> bytes;
  std::vector<std::uint8_t> chunk(1 << 20);
  for (;;) {
    const int got = gzread(file, chunk.data(), unsigned(chunk.size()));
    if (got < 0) {
      int code = 0;
      const std::string message = gzerror(file, &code);
      gzclose(file);
      throw data_error(path, "corrupt or truncated gzip data (" + message + ")");
    }
    if (got == 0) break;
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + got);
  }
  // gzread stops silently at a gzip stream cut short; gzclose_r reports it.
  int code = 0;
  const std::string message = gzerror(file, &code);
  const int closed = gzclose(file);
  if (code != Z_OK || closed != Z_OK)
    throw data_error(path, "corrupt or truncated gzip data (" +
                               (code != Z_OK ? message : std::string("bad trailer")) + ")");
  return bytes;
}

inline std::uint32_t big_endian(const std::uint8_t* p) {
  return std::uint32_t(p[0]) << 24 | std::uint32_t(p[1]) << 16 | std::uint32_t(p[2]) << 8 |
         std::uint32_t(p[3]);
}

/// An IDX file of unsigned bytes with `dims` dimensions (1: labels, 3: images); returns the
/// dimensions and leaves the data in `bytes` after the header.
inline std::vector<index_t> read_idx(const std::string& path, int dims,
                                     std::vector<std::uint8_t>& bytes) {
  bytes = read_maybe_gzipped(path);
  const std::size_t header = 4 + 4 * std::size_t(dims);
  const auto truncated_header = [&] {
    return data_error(path, "truncated IDX header: expected at least " + std::to_string(header) +
                                " bytes, got " + std::to_string(bytes.size()));
  };
  if (bytes.size() < 4) throw truncated_header();
  const std::uint32_t magic = big_endian(bytes.data());
  const std::uint32_t expected = 0x0800u | std::uint32_t(dims);
  if (magic != expected) {
    char text[128];
    std::snprintf(text, sizeof text,
                  "not an IDX file of %d-dimensional unsigned bytes: magic number 0x%08x, "
                  "expected 0x%08x",
                  dims, unsigned(magic), unsigned(expected));
    throw data_error(path, text);
  }
  if (bytes.size() < header) throw truncated_header();
  std::vector<index_t> shape;
  std::size_t elements = 1;
  for (int d = 0; d < dims; ++d) {
    const std::uint32_t n = big_endian(bytes.data() + 4 + 4 * d);
    if (n == 0) throw data_error(path, "IDX dimension " + std::to_string(d) + " is 0");
    shape.push_back(index_t(n));
    elements *= n;
  }
  if (bytes.size() != header + elements)
    throw data_error(path, std::string(bytes.size() < header + elements ? "truncated" : "too long") +
                               ": the IDX header promises " + std::to_string(elements) +
                               " values (" + std::to_string(header + elements) +
                               " bytes), the file holds " + std::to_string(bytes.size()) +
                               " bytes");
  bytes.erase(bytes.begin(), bytes.begin() + std::ptrdiff_t(header));
  return shape;
}

inline void check_labels(const std::string& path, const std::vector<std::uint8_t>& labels) {
  for (std::size_t i = 0; i < labels.size(); ++i)
    if (labels[i] >= classes)
      throw data_error(path, "label " + std::to_string(labels[i]) + " of item " +
                                 std::to_string(i) + " is not a class in [0, " +
                                 std::to_string(classes) + ")");
}

/// One (images, labels) pair of IDX files, as MNIST and Fashion-MNIST ship them.
inline image_set read_idx_pair(const std::string& images_path, const std::string& labels_path) {
  image_set set;
  const std::vector<index_t> shape = read_idx(images_path, 3, set.pixels);
  std::vector<index_t> label_shape = read_idx(labels_path, 1, set.labels);
  if (label_shape[0] != shape[0])
    throw data_error(labels_path, std::to_string(label_shape[0]) + " labels for the " +
                                      std::to_string(shape[0]) + " images of " + images_path);
  check_labels(labels_path, set.labels);
  set.count = shape[0];
  set.channels = 1;
  set.height = shape[1];
  set.width = shape[2];
  return set;
}

/// `dir/name` or `dir/name.gz`, whichever exists (the raw file first); the .gz path if neither,
/// so the error names the file Debian's package installs.
inline std::string idx_path(const std::string& dir, const std::string& name) {
  const std::filesystem::path raw = std::filesystem::path(dir) / name;
  if (std::filesystem::exists(raw)) return raw.string();
  return raw.string() + ".gz";
}

/// CIFAR-10's binary format: records of 1 label byte and 3 x 32 x 32 pixel bytes (red, green,
/// blue planes, rows top to bottom).
inline constexpr index_t cifar_side = 32, cifar_channels = 3;
inline constexpr index_t cifar_record = 1 + cifar_channels * cifar_side * cifar_side;

inline void append_cifar_batch(const std::string& path, image_set& set) {
  const std::vector<std::uint8_t> bytes = read_maybe_gzipped(path);
  if (bytes.empty() || bytes.size() % std::size_t(cifar_record) != 0)
    throw data_error(path, "not a CIFAR-10 binary batch: expected a non-zero multiple of " +
                               std::to_string(cifar_record) +
                               " bytes (1 label + 3072 pixels per image), got " +
                               std::to_string(bytes.size()) + " bytes");
  const index_t records = index_t(bytes.size()) / cifar_record;
  const index_t features = cifar_channels * cifar_side * cifar_side;
  for (index_t r = 0; r < records; ++r) {
    const std::uint8_t* record = bytes.data() + r * cifar_record;
    if (record[0] >= classes)
      throw data_error(path, "label " + std::to_string(record[0]) + " of record " +
                                 std::to_string(r) + " is not a class in [0, " +
                                 std::to_string(classes) + "): is this the CIFAR-100 file?");
    set.labels.push_back(record[0]);
    set.pixels.insert(set.pixels.end(), record + 1, record + 1 + features);
  }
  set.count += records;
  set.channels = cifar_channels;
  set.height = set.width = cifar_side;
}

/// A training and a test set, with how to standardize them: per colour channel, the mean and
/// standard deviation of the training set's pixels (scaled to [0, 1]).
struct dataset {
  std::string name;
  image_set train, test;
  std::vector<double> channel_mean, channel_std;

  index_t features() const { return train.features(); }

  /// Standardized features of `count` images of `set` starting at `order[first]`, into
  /// out (count x features, row-major).
  template <class T>
  void gather(const image_set& set, const std::vector<index_t>& order, index_t first,
              index_t count, T* out) const {
    const index_t F = set.features(), plane = set.height * set.width;
    for (index_t i = 0; i < count; ++i) {
      const std::uint8_t* src = set.pixels.data() + order[std::size_t(first + i)] * F;
      T* dst = out + i * F;
      for (index_t c = 0; c < set.channels; ++c) {
        const double scale = 1.0 / (255.0 * channel_std[std::size_t(c)]);
        const double shift = channel_mean[std::size_t(c)] / channel_std[std::size_t(c)];
        for (index_t p = c * plane; p < (c + 1) * plane; ++p)
          dst[p] = T(double(src[p]) * scale - shift);
      }
    }
  }

  /// Per-feature mean and variance of the standardized training images: the input prior of
  /// a BKN network's first layer.
  void feature_statistics(std::vector<double>& mean, std::vector<double>& var) const {
    const index_t F = train.features(), plane = train.height * train.width;
    std::vector<double> sum(std::size_t(F), 0), sum2(std::size_t(F), 0);
    for (index_t i = 0; i < train.count; ++i)
      for (index_t f = 0; f < F; ++f) {
        const double v = train.pixels[std::size_t(i * F + f)];
        sum[std::size_t(f)] += v;
        sum2[std::size_t(f)] += v * v;
      }
    mean.assign(std::size_t(F), 0);
    var.assign(std::size_t(F), 0);
    const double n = double(train.count);
    for (index_t f = 0; f < F; ++f) {
      const std::size_t c = std::size_t(f / plane);
      const double m = sum[std::size_t(f)] / n;
      const double v = std::max(sum2[std::size_t(f)] / n - m * m, 0.0);  // exact: small ints
      const double scale = 1.0 / (255.0 * channel_std[c]);
      mean[std::size_t(f)] = m * scale - channel_mean[c] / channel_std[c];
      var[std::size_t(f)] = v * scale * scale;
    }
  }
};

/// Per-channel mean and standard deviation of the training pixels, in [0, 1] units.
inline void standardization(dataset& d) {
  const image_set& s = d.train;
  const index_t plane = s.height * s.width;
  d.channel_mean.assign(std::size_t(s.channels), 0);
  d.channel_std.assign(std::size_t(s.channels), 1);
  for (index_t c = 0; c < s.channels; ++c) {
    double sum = 0, sum2 = 0;  // of byte values: exact in double up to 2^53 / 255^2 pixels
    for (index_t i = 0; i < s.count; ++i) {
      const std::uint8_t* p = s.pixels.data() + (i * s.channels + c) * plane;
      for (index_t k = 0; k < plane; ++k) {
        sum += p[k];
        sum2 += double(p[k]) * p[k];
      }
    }
    const double n = double(s.count * plane);
    const double mean = sum / n, var = std::max(sum2 / n - mean * mean, 0.0);
    d.channel_mean[std::size_t(c)] = mean / 255.0;
    d.channel_std[std::size_t(c)] = var > 0 ? std::sqrt(var) / 255.0 : 1.0;
  }
}

inline void finish(dataset& d, index_t train_limit, index_t test_limit) {
  d.train.truncate(train_limit);
  d.test.truncate(test_limit);
  if (d.test.features() != d.train.features())
    throw std::runtime_error(d.name + ": test images are " + std::to_string(d.test.height) + "x" +
                             std::to_string(d.test.width) + ", training images " +
                             std::to_string(d.train.height) + "x" +
                             std::to_string(d.train.width));
  standardization(d);
}

/// Fashion-MNIST from `dir` (Debian's dataset-fashion-mnist: /usr/share/datasets/fashion-mnist):
/// {train,t10k}-{images-idx3,labels-idx1}-ubyte, gzipped or not. Limits keep the first images.
inline dataset load_fashion_mnist(const std::string& dir, index_t train_limit = 0,
                                  index_t test_limit = 0) {
  dataset d;
  d.name = "Fashion-MNIST";
  d.train = read_idx_pair(idx_path(dir, "train-images-idx3-ubyte"),
                          idx_path(dir, "train-labels-idx1-ubyte"));
  d.test = read_idx_pair(idx_path(dir, "t10k-images-idx3-ubyte"),
                         idx_path(dir, "t10k-labels-idx1-ubyte"));
  finish(d, train_limit, test_limit);
  return d;
}

/// CIFAR-10's binary version from `dir` (or its cifar-10-batches-bin folder):
/// data_batch_1.bin .. data_batch_5.bin and test_batch.bin.
inline dataset load_cifar10(const std::string& dir, index_t train_limit = 0,
                            index_t test_limit = 0) {
  std::filesystem::path root(dir);
  if (!std::filesystem::exists(root / "test_batch.bin") &&
      std::filesystem::exists(root / "cifar-10-batches-bin" / "test_batch.bin"))
    root /= "cifar-10-batches-bin";
  dataset d;
  d.name = "CIFAR-10";
  for (int b = 1; b <= 5; ++b) {
    append_cifar_batch((root / ("data_batch_" + std::to_string(b) + ".bin")).string(), d.train);
    if (train_limit > 0 && d.train.count >= train_limit) break;
  }
  append_cifar_batch((root / "test_batch.bin").string(), d.test);
  finish(d, train_limit, test_limit);
  return d;
}

}  // namespace mlp
