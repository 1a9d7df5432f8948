// SPDX-License-Identifier: MIT
// The normalization choices by name, as the command line gives them ("bn", "bkn:dense:q=0.1"),
// and the factory that builds the adapter of one for a network.
#pragma once

#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "normalization.hpp"

// Batch renormalization and group/layer normalization come from bkn's methods (issue #4).
#if defined(__has_include)
#if __has_include(<bkn/methods/batch_renorm.hpp>) && __has_include(<bkn/methods/group_norm.hpp>)
#include "other_normalizations.hpp"
#define BKN_MLP_HAS_METHODS 1
#endif
#endif
#ifndef BKN_MLP_HAS_METHODS
#define BKN_MLP_HAS_METHODS 0
#endif

namespace mlp {

/// A normalization choice: a kind and its options. Syntax: kind[:option]..., e.g. `none`,
/// `bn`, `brn`, `gn` (32 groups), `gn:groups=8`, `ln`, `bkn` (weights transition, learned q,
/// input prior), `bkn:dense`, `bkn:identity:q=0.1`, `bkn:weights:per-channel`,
/// `bkn:no-input-prior`.
struct method {
  std::string kind = "bn";
  bkn_settings bkn;
  index_t groups = 32;  ///< gn

  /// The canonical spelling, which parse() reads back: the name in tables and files.
  std::string name() const {
    if (kind == "gn" && groups != 32) return "gn:groups=" + std::to_string(groups);
    if (kind != "bkn") return kind;
    static const char* transitions[] = {"identity", "diagonal", "dense", "weights"};
    std::ostringstream o;
    o << "bkn:" << transitions[int(bkn.transition)];
    if (bkn.fixed_gain >= 0) o << ":q=" << bkn.fixed_gain;
    if (bkn.per_channel_gain) o << ":per-channel";
    if (!bkn.input_prior) o << ":no-input-prior";
    return o.str();
  }
};

inline std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::stringstream in(text);
  std::string part;
  while (std::getline(in, part, separator)) parts.push_back(part);
  if (!text.empty() && text.back() == separator) parts.emplace_back();
  return parts;
}

inline method parse_method(const std::string& text) {
  const std::vector<std::string> parts = split(text, ':');
  if (parts.empty() || parts[0].empty()) throw std::invalid_argument("empty normalization method");
  method m;
  m.kind = parts[0];
  const bool known = m.kind == "none" || m.kind == "bn" || m.kind == "bkn" ||
                     (BKN_MLP_HAS_METHODS && (m.kind == "brn" || m.kind == "gn" || m.kind == "ln"));
  if (!known)
    throw std::invalid_argument("unknown normalization method '" + parts[0] + "' (expected " +
                                (BKN_MLP_HAS_METHODS ? "none, bn, brn, gn[:groups=G], ln" : "none, bn") +
                                " or bkn[:options])");
  for (std::size_t i = 1; i < parts.size(); ++i) {
    const std::string& o = parts[i];
    const auto bad = [&](const std::string& why) {
      return std::invalid_argument("method '" + text + "': option '" + o + "': " + why);
    };
    if (m.kind == "gn" && o.rfind("groups=", 0) == 0) {
      std::size_t used = 0;
      long long g = 0;
      try {
        g = std::stoll(o.substr(7), &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != o.size() - 7 || g < 1) throw bad("expected groups=<count >= 1>");
      m.groups = index_t(g);
      continue;
    }
    if (m.kind != "bkn") throw bad(m.kind + (m.kind == "gn" ? " takes groups=<G> only" : " takes no options"));
    if (o == "identity") {
      m.bkn.transition = bkn_transition::identity;
    } else if (o == "diagonal") {
      m.bkn.transition = bkn_transition::diagonal;
    } else if (o == "dense") {
      m.bkn.transition = bkn_transition::dense;
    } else if (o == "weights") {
      m.bkn.transition = bkn_transition::weights;
    } else if (o == "per-channel") {
      m.bkn.per_channel_gain = true;
    } else if (o == "no-input-prior") {
      m.bkn.input_prior = false;
    } else if (o.rfind("q=", 0) == 0) {
      std::size_t used = 0;
      double q = -1;
      try {
        q = std::stod(o.substr(2), &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != o.size() - 2 || !(q >= 0 && q <= 1))
        throw bad("expected a fixed gain q in [0, 1]");
      m.bkn.fixed_gain = q;
    } else {
      throw bad("expected identity, diagonal, dense, weights, q=<gain>, per-channel or "
                "no-input-prior");
    }
  }
  return m;
}

/// The adapter of `m` for the network `net` describes.
template <class Backend, class T>
std::unique_ptr<normalization<T>> make_normalization(const method& m, Backend backend,
                                                     const host_network<T>& net,
                                                     statistics_settings stats) {
  if (m.kind == "none") return std::make_unique<no_normalization<T>>(net);
  if (m.kind == "bn") return std::make_unique<batch_normalization<Backend, T>>(backend, net, stats);
#if BKN_MLP_HAS_METHODS
  if (m.kind == "brn")
    return std::make_unique<batch_renormalization<Backend, T>>(backend, net, stats);
  if (m.kind == "gn" || m.kind == "ln")
    return std::make_unique<group_normalization<Backend, T>>(backend, net,
                                                             m.kind == "ln" ? 1 : m.groups,
                                                             stats.epsilon);
#endif
  return std::make_unique<kalman_normalization<Backend, T>>(backend, net, stats, m.bkn);
}

}  // namespace mlp
