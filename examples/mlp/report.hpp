// SPDX-License-Identifier: MIT
// What a person reads from a run: the progress bar, the per-epoch CSV log, the final table
// (method x setting, mean and spread over seeds) and the gnuplot script of accuracy vs epoch.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <bkn/config.hpp>

namespace mlp {

using bkn::index_t;

/// A (gradient batch, statistics batch) setting of the paper: samples per SGD step, and
/// samples per statistics group within it.
struct setting {
  index_t batch = 128, statistics = 128;
  std::string name() const {
    return "(" + std::to_string(batch) + ", " + std::to_string(statistics) + ")";
  }
  std::string tag() const { return std::to_string(batch) + "x" + std::to_string(statistics); }
};

/// One epoch of one run.
struct epoch_record {
  std::string method;
  setting set;
  std::uint64_t seed = 0;
  int epoch = 0;
  double lr = 0, train_loss = 0, train_accuracy = 0;
  double test_moving = 0, test_batch = 0;  // accuracy in %, moving / batch statistics
  double seconds = 0;                      // training time of the epoch, evaluation excluded
  std::string gains;                       // BKN: q per layer, '/'-separated
};

/// A progress bar with rate and ETA on one terminal line, redrawn at most 10 times a second;
/// silent when stdout is not a terminal (logs and CI get the per-epoch lines only).
class progress_bar {
 public:
  explicit progress_bar(bool enabled) : enabled_(enabled) {}
  static bool terminal() { return isatty(STDOUT_FILENO) == 1; }

  void start(std::string label, index_t total) {
    label_ = std::move(label);
    total_ = total;
    start_ = last_ = clock::now();
    drawn_ = false;
  }

  void update(index_t done, index_t samples) {
    if (!enabled_) return;
    const auto now = clock::now();
    if (done < total_ && drawn_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    drawn_ = true;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double fraction = total_ > 0 ? double(done) / double(total_) : 1.0;
    const double rate = elapsed > 0 ? double(samples) / elapsed : 0.0;
    const double eta = fraction > 0 ? elapsed * (1 - fraction) / fraction : 0.0;
    constexpr int width = 28;
    const int filled = int(fraction * width);
    std::string bar(std::size_t(filled), '=');
    if (filled < width) bar += '>' + std::string(std::size_t(width - filled - 1), ' ');
    std::printf("\r\033[K%s [%s] %3d%% %7.0f img/s ETA %s", label_.c_str(), bar.c_str(),
                int(100 * fraction), rate, clock_text(eta).c_str());
    std::fflush(stdout);
  }

  void finish() {
    if (enabled_ && drawn_) std::printf("\r\033[K");
    drawn_ = false;
  }

  static std::string clock_text(double seconds) {
    const long s = long(std::lround(seconds));
    char text[32];
    if (s >= 3600)
      std::snprintf(text, sizeof text, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
    else
      std::snprintf(text, sizeof text, "%ld:%02ld", s / 60, s % 60);
    return text;
  }

 private:
  using clock = std::chrono::steady_clock;
  bool enabled_;
  std::string label_;
  index_t total_ = 0;
  clock::time_point start_, last_;
  bool drawn_ = false;
};

inline std::string number(const char* format, double v) {
  char text[64];
  std::snprintf(text, sizeof text, format, v);
  return text;
}

/// The per-epoch log, one line per epoch of every run, flushed as it goes: an interrupted run
/// keeps what it finished.
class epoch_log {
 public:
  explicit epoch_log(const std::string& path) : path_(path), out_(path) {
    if (!out_) throw std::runtime_error("cannot write " + path);
    out_ << "method,gradient_batch,statistics_batch,seed,epoch,lr,train_loss,train_accuracy,"
            "test_accuracy_moving,test_accuracy_batch,gains,epoch_seconds\n";
    out_.flush();
  }
  void write(const epoch_record& r) {
    out_ << r.method << ',' << r.set.batch << ',' << r.set.statistics << ',' << r.seed << ','
         << r.epoch << ',' << number("%.6g", r.lr) << ',' << number("%.6f", r.train_loss) << ','
         << number("%.3f", r.train_accuracy) << ',' << number("%.2f", r.test_moving) << ','
         << number("%.2f", r.test_batch) << ',' << r.gains << ','
         << number("%.3f", r.seconds) << '\n';
    out_.flush();
    if (!out_) throw std::runtime_error("writing " + path_ + " failed");
  }

 private:
  std::string path_;
  std::ofstream out_;
};

/// Mean and sample standard deviation (0 for one value).
inline std::pair<double, double> mean_sd(const std::vector<double>& v) {
  if (v.empty()) return {NAN, NAN};
  double m = 0;
  for (double x : v) m += x;
  m /= double(v.size());
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return {m, v.size() > 1 ? std::sqrt(s / double(v.size() - 1)) : 0.0};
}

/// Reads back an epoch_log file (for --replot): every epoch of every run it recorded.
inline std::vector<epoch_record> read_epoch_log(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::string line;
  std::getline(in, line);
  if (line.rfind("method,gradient_batch,statistics_batch,seed,epoch,", 0) != 0)
    throw std::runtime_error(path + ": not a bkn_mlp epochs.csv (header: " + line + ")");
  std::vector<epoch_record> records;
  for (int number = 2; std::getline(in, line); ++number) {
    std::vector<std::string> f;
    std::stringstream fields(line);
    for (std::string item; std::getline(fields, item, ',');) f.push_back(item);
    if (!line.empty() && line.back() == ',') f.emplace_back();
    if (f.size() != 12)
      throw std::runtime_error(path + ":" + std::to_string(number) + ": expected 12 fields, got " +
                               std::to_string(f.size()));
    try {
      epoch_record r;
      r.method = f[0];
      r.set = {std::stoll(f[1]), std::stoll(f[2])};
      r.seed = std::stoull(f[3]);
      r.epoch = std::stoi(f[4]);
      r.lr = std::stod(f[5]);
      r.train_loss = std::stod(f[6]);
      r.train_accuracy = std::stod(f[7]);
      r.test_moving = std::stod(f[8]);
      r.test_batch = std::stod(f[9]);
      r.gains = f[10];
      r.seconds = std::stod(f[11]);
      records.push_back(r);
    } catch (const std::exception&) {
      throw std::runtime_error(path + ":" + std::to_string(number) + ": not a number where one "
                               "belongs: " + line);
    }
  }
  return records;
}

/// Final results of one (method, setting) over its seeds.
struct summary_row {
  std::string method;
  setting set;
  std::vector<double> moving, batch, seconds;  // per finished seed: last epoch, mean s/epoch
  int unfinished = 0;  // runs that diverged or were interrupted before the last epoch
};

/// One row per (setting, method), in the order given, from the epochs of every run: a run that
/// reached `epochs` contributes its last epoch's accuracies and its mean time per epoch.
inline std::vector<summary_row> summarize(const std::vector<epoch_record>& records,
                                          const std::vector<std::string>& methods,
                                          const std::vector<setting>& settings, int epochs) {
  std::vector<summary_row> rows;
  for (const setting& set : settings)
    for (const std::string& m : methods) {
      summary_row row{m, set, {}, {}, {}, 0};
      std::map<std::uint64_t, std::vector<const epoch_record*>> runs;
      for (const epoch_record& r : records)
        if (r.method == m && r.set.batch == set.batch && r.set.statistics == set.statistics)
          runs[r.seed].push_back(&r);
      for (const auto& [seed, run] : runs) {
        const epoch_record* last = run.front();
        double seconds = 0;
        for (const epoch_record* r : run) {
          if (r->epoch > last->epoch) last = r;
          seconds += r->seconds;
        }
        if (last->epoch < epochs) {
          ++row.unfinished;
          continue;
        }
        row.moving.push_back(last->test_moving);
        row.batch.push_back(last->test_batch);
        row.seconds.push_back(seconds / double(run.size()));
      }
      rows.push_back(row);
    }
  return rows;
}

inline std::string plus_minus(const std::vector<double>& v, int seeds) {
  if (v.empty()) return "-";
  const auto [m, s] = mean_sd(v);
  std::string text = number("%.2f", m);
  if (seeds > 1) text += " ± " + number("%.2f", s);
  return text;
}

/// The table a person wants at the end, in Markdown (printed and written to summary.md).
inline std::string summary_table(const std::vector<summary_row>& rows, const std::string& title) {
  std::ostringstream o;
  o << title << "\n\n"
    << "| method | (gradient batch, statistics batch) | test acc. % (moving stats) | test acc. % "
       "(batch stats) | s / epoch | seeds |\n"
    << "| --- | --- | ---: | ---: | ---: | ---: |\n";
  for (const summary_row& r : rows) {
    const int n = int(r.moving.size());
    o << "| " << r.method << " | " << r.set.name() << " | " << plus_minus(r.moving, n) << " | "
      << plus_minus(r.batch, n) << " | "
      << (r.seconds.empty() ? std::string("-") : number("%.3g", mean_sd(r.seconds).first))
      << " | " << n;
    if (r.unfinished > 0) o << " (+" << r.unfinished << " diverged or unfinished)";
    o << " |\n";
  }
  return o.str();
}

inline void write_summary_csv(const std::string& path, const std::vector<summary_row>& rows) {
  std::ofstream f(path);
  f << "method,gradient_batch,statistics_batch,seeds,unfinished,test_accuracy_moving_mean,"
       "test_accuracy_moving_sd,test_accuracy_batch_mean,test_accuracy_batch_sd,"
       "epoch_seconds_mean\n";
  for (const summary_row& r : rows) {
    const auto [mm, ms] = mean_sd(r.moving);
    const auto [bm, bs] = mean_sd(r.batch);
    f << r.method << ',' << r.set.batch << ',' << r.set.statistics << ',' << r.moving.size()
      << ',' << r.unfinished << ',' << number("%.3f", mm) << ',' << number("%.3f", ms) << ','
      << number("%.3f", bm) << ',' << number("%.3f", bs) << ','
      << number("%.3f", mean_sd(r.seconds).first) << '\n';
  }
  f.close();
  if (!f) throw std::runtime_error("writing " + path + " failed");
}

/// A gnuplot script for accuracy.png: test accuracy against epoch, one panel per setting, one
/// colour per method, solid with moving statistics and dashed with batch statistics (mean over
/// the seeds, inline data so the script stands alone).
inline void write_gnuplot(const std::string& path, const std::vector<epoch_record>& records,
                          const std::vector<std::string>& methods,
                          const std::vector<setting>& settings, const std::string& title) {
  std::ofstream f(path);
  const std::size_t panels = settings.size();
  const std::size_t columns = panels <= 2 ? panels : 2;
  const std::size_t rows = (panels + columns - 1) / columns;
  f << "# accuracy.gp, written by bkn_mlp: `gnuplot accuracy.gp` in this folder makes "
       "accuracy.png\n"
    << "set terminal pngcairo size " << 600 * columns << "," << 480 * rows + 40
    << " font 'sans,10'\nset output 'accuracy.png'\n"
    << "set grid lc rgb '#dddddd'\nset xlabel 'epoch'\nset ylabel 'test accuracy (%)'\n"
    << "set key below horizontal maxcols 4 font ',9'\n";
  // Mean over seeds per (setting, method, epoch).
  std::map<std::tuple<std::string, std::string, int>, std::vector<const epoch_record*>> cells;
  for (const epoch_record& r : records) cells[{r.set.tag(), r.method, r.epoch}].push_back(&r);
  // Each panel's y range fits its own curves (to 5 %): one method at chance level in one
  // setting would otherwise flatten every other panel.
  std::vector<double> low(settings.size(), 100), high(settings.size(), 0);
  int epochs = 1;
  for (std::size_t si = 0; si < settings.size(); ++si)
    for (std::size_t mi = 0; mi < methods.size(); ++mi) {
      f << "$D" << si << "_" << mi << " << EOD\n";
      for (const auto& [key, list] : cells) {
        if (std::get<0>(key) != settings[si].tag() || std::get<1>(key) != methods[mi]) continue;
        std::vector<double> moving, batch;
        for (const epoch_record* r : list) {
          moving.push_back(r->test_moving);
          batch.push_back(r->test_batch);
        }
        const double m = mean_sd(moving).first, b = mean_sd(batch).first;
        low[si] = std::min(low[si], std::min(m, b));
        high[si] = std::max(high[si], std::max(m, b));
        epochs = std::max(epochs, std::get<2>(key));
        f << std::get<2>(key) << ' ' << number("%.3f", m) << ' ' << number("%.3f", b) << '\n';
      }
      f << "EOD\n";
    }
  f << "set xrange [0.5:" << epochs << ".5]\n"
    << (epochs <= 20 ? "set xtics 1\n" : "")
    << "set multiplot layout " << rows << "," << columns << " title \"" << title
    << "\\nsolid: moving statistics, dashed: batch statistics (mean over seeds)\"\n";
  const char* colours[] = {"#000000", "#1f77b4", "#d62728", "#2ca02c",
                           "#9467bd", "#ff7f0e", "#8c564b", "#17becf"};
  for (std::size_t si = 0; si < settings.size(); ++si) {
    const double bottom = std::max(0.0, std::floor(low[si] / 5) * 5);
    const double top = std::min(100.0, std::max(bottom + 10, std::ceil(high[si] / 5) * 5));
    f << "set yrange [" << bottom << ":" << top << "]\n"
      << "set title '(gradient batch, statistics batch) = " << settings[si].name() << "'\nplot ";
    for (std::size_t mi = 0; mi < methods.size(); ++mi) {
      const char* colour = colours[mi % 8];
      f << (mi ? ", \\\n     " : "") << "$D" << si << "_" << mi
        << " using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '" << colour << "' title '"
        << methods[mi] << "', \\\n     $D" << si << "_" << mi
        << " using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '" << colour << "' notitle";
    }
    f << "\n";
  }
  f << "unset multiplot\n";
  f.close();
  if (!f) throw std::runtime_error("writing " + path + " failed");
}

}  // namespace mlp
