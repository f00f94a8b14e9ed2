// Spec strings <-> FormatSpec, validation and byte accounting.
#include "turboquant/format.hpp"

#include <charconv>
#include <cmath>
#include <set>
#include <sstream>
#include <vector>

#include "turboquant/error.hpp"

namespace tq {
namespace {

constexpr const char* kMethods = "tq-mse, tq-prod, polar, q8_0, q4_0, f32, f16, bf16";

std::string valid_keys(Method m) {
  switch (m) {
    case Method::mse: return "b, scale, sf, rot, cb, hi, hb";
    case Method::prod: return "b, m, s, scale, sf, rot, cb";
    case Method::polar: return "levels, b1, b, rot";
    case Method::q8_0:
    case Method::q4_0: return "rot";
    case Method::f32:
    case Method::f16:
    case Method::bf16: return "(none)";
  }
  return "";
}

std::string fmt_bits(double b) {
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof buf, b);
  return std::string(buf, r.ptr);
}

double parse_number(std::string_view key, std::string_view v, std::string_view spec) {
  double out = 0;
  auto r = std::from_chars(v.data(), v.data() + v.size(), out);
  if (r.ec != std::errc() || r.ptr != v.data() + v.size() || !std::isfinite(out))
    TQ_THROW("format '", spec, "': value '", v, "' for key '", key, "' is not a number");
  return out;
}

int parse_int(std::string_view key, std::string_view v, std::string_view spec) {
  int out = 0;
  auto r = std::from_chars(v.data(), v.data() + v.size(), out);
  if (r.ec != std::errc() || r.ptr != v.data() + v.size())
    TQ_THROW("format '", spec, "': value '", v, "' for key '", key, "' is not an integer");
  return out;
}

template <class E>
E parse_enum(std::string_view key, std::string_view v, std::string_view spec,
             std::initializer_list<std::pair<const char*, E>> options) {
  std::string valid;
  for (auto& [name, e] : options) {
    if (v == name) return e;
    valid += valid.empty() ? "" : ", ";
    valid += name;
  }
  TQ_THROW("format '", spec, "': bad value '", v, "' for key '", key, "' (valid: ", valid, ")");
}

}  // namespace

std::string to_string(Method m) {
  switch (m) {
    case Method::mse: return "tq-mse";
    case Method::prod: return "tq-prod";
    case Method::polar: return "polar";
    case Method::q8_0: return "q8_0";
    case Method::q4_0: return "q4_0";
    case Method::f32: return "f32";
    case Method::f16: return "f16";
    case Method::bf16: return "bf16";
  }
  return "?";
}

RotationKind default_rotation(Method m) {
  return m == Method::mse || m == Method::prod || m == Method::polar ? RotationKind::hadamard
                                                                       : RotationKind::none;
}

bool is_dense(Method m) { return m == Method::f32 || m == Method::f16 || m == Method::bf16; }

std::string to_string(ScaleMode m) {
  switch (m) {
    case ScaleMode::norm: return "norm";
    case ScaleMode::ls: return "ls";
    case ScaleMode::matched: return "matched";
  }
  return "?";
}

std::string to_string(CodebookLaw law) {
  switch (law) {
    case CodebookLaw::exact: return "exact";
    case CodebookLaw::gauss: return "gauss";
    case CodebookLaw::polar_angle: return "polar_angle";
  }
  return "?";
}

FormatSpec parse_format(std::string_view spec) {
  FormatSpec f;
  const size_t colon = spec.find(':');
  const std::string_view method = spec.substr(0, colon);
  if (method == "tq-mse") f.method = Method::mse;
  else if (method == "tq-prod") f.method = Method::prod;
  else if (method == "polar") f.method = Method::polar;
  else if (method == "q8_0") f.method = Method::q8_0;
  else if (method == "q4_0") f.method = Method::q4_0;
  else if (method == "f32") f.method = Method::f32;
  else if (method == "f16") f.method = Method::f16;
  else if (method == "bf16") f.method = Method::bf16;
  else TQ_THROW("format '", spec, "': unknown method '", method, "' (valid: ", kMethods, ")");

  f.rotation = default_rotation(f.method);
  bool have_bits = false;
  std::set<std::string, std::less<>> seen;
  if (colon != std::string_view::npos) {
    std::string_view rest = spec.substr(colon + 1);
    if (rest.empty()) TQ_THROW("format '", spec, "': empty parameter list after ':'");
    while (true) {
      const size_t comma = rest.find(',');
      const std::string_view tok = rest.substr(0, comma);
      const size_t eq = tok.find('=');
      if (eq == std::string_view::npos || eq == 0 || eq + 1 == tok.size())
        TQ_THROW("format '", spec, "': malformed token '", tok, "' (expected key=value; keys for ",
                 method, ": ", valid_keys(f.method), ")");
      const std::string_view key = tok.substr(0, eq), val = tok.substr(eq + 1);
      if (!seen.insert(std::string(key)).second)
        TQ_THROW("format '", spec, "': key '", key, "' given twice");
      const std::string keys = valid_keys(f.method);
      auto key_ok = [&] {
        std::stringstream ss(keys);
        std::string k;
        while (std::getline(ss, k, ',')) {
          while (!k.empty() && k.front() == ' ') k.erase(0, 1);
          if (k == key) return true;
        }
        return false;
      };
      if (!key_ok())
        TQ_THROW("format '", spec, "': unknown key '", key, "' for ", method, " (valid: ", keys, ")");

      if (key == "b") {
        if (f.method == Method::polar) f.polar_bits = parse_int(key, val, spec);
        else f.bits = parse_number(key, val, spec);
        have_bits = true;
      } else if (key == "scale") {
        f.scale = parse_enum<ScaleMode>(key, val, spec, {{"norm", ScaleMode::norm},
                                                         {"ls", ScaleMode::ls},
                                                         {"matched", ScaleMode::matched}});
      } else if (key == "sf") {
        f.scale_type = parse_enum<ScaleType>(key, val, spec,
                                             {{"f16", ScaleType::f16}, {"f32", ScaleType::f32}});
      } else if (key == "rot") {
        f.rotation = parse_enum<RotationKind>(key, val, spec,
                                              {{"hadamard", RotationKind::hadamard},
                                               {"haar", RotationKind::haar},
                                               {"none", RotationKind::none}});
      } else if (key == "cb") {
        f.law = parse_enum<CodebookLaw>(key, val, spec,
                                        {{"exact", CodebookLaw::exact}, {"gauss", CodebookLaw::gauss}});
      } else if (key == "m") {
        f.sketch_rows = parse_int(key, val, spec);
        if (f.sketch_rows < 1) TQ_THROW("format '", spec, "': m must be >= 1, got ", val);
      } else if (key == "s") {
        f.sketch = parse_enum<SketchKind>(key, val, spec,
                                          {{"orth", SketchKind::orth}, {"gauss", SketchKind::gauss}});
      } else if (key == "hi") {
        if (!val.empty() && val.back() == '%') {
          f.hi_percent = parse_number(key, val.substr(0, val.size() - 1), spec);
          if (!(f.hi_percent > 0 && f.hi_percent < 100))
            TQ_THROW("format '", spec, "': hi=P% needs 0 < P < 100, got ", val);
        } else {
          f.hi_channels = parse_int(key, val, spec);
          if (f.hi_channels < 1) TQ_THROW("format '", spec, "': hi must be >= 1 (or a share like 12.5%), got ", val);
        }
      } else if (key == "hb") {
        f.hi_bits = parse_int(key, val, spec);
        if (f.hi_bits < 1 || f.hi_bits > 8) TQ_THROW("format '", spec, "': hb must be 1..8, got ", val);
      } else if (key == "levels") {
        f.polar_levels = parse_int(key, val, spec);
      } else if (key == "b1") {
        f.polar_bits1 = parse_int(key, val, spec);
      }
      if (comma == std::string_view::npos) break;
      rest = rest.substr(comma + 1);
    }
  }

  const bool coded = f.method == Method::mse || f.method == Method::prod;
  if (coded && f.rotation == RotationKind::none)
    TQ_THROW("format '", spec, "': ", method, " needs a random rotation (rot=hadamard or haar)");
  if (f.method == Method::polar && f.rotation == RotationKind::none)
    TQ_THROW("format '", spec, "': polar needs a random rotation (rot=hadamard or haar)");
  if (coded && !have_bits)
    TQ_THROW("format '", spec, "': ", method, " needs a bit width, e.g. ", method, ":b=3");
  if (f.method == Method::mse) {
    if (!(f.bits >= 1 && f.bits <= 8))
      TQ_THROW("format '", spec, "': b must be in 1..8, got ", fmt_bits(f.bits));
    const bool integer_b = f.bits == std::floor(f.bits);
    if (f.hi_bits && !integer_b)
      TQ_THROW("format '", spec, "': hb= needs an integer b (the width of the other channels), got b=",
               fmt_bits(f.bits));
    const bool has_hi = f.hi_channels || f.hi_percent > 0;
    if (f.hi_bits && !has_hi)
      TQ_THROW("format '", spec, "': hb= needs hi=N (or hi=P%), the outlier channels");
    if (f.hi_bits && f.hi_bits <= f.bits)
      TQ_THROW("format '", spec, "': hb=", f.hi_bits, " must exceed b=", fmt_bits(f.bits),
               " (the outlier channels get more bits)");
    if (has_hi && integer_b && !f.hi_bits)
      TQ_THROW("format '", spec, "': hi= with an integer b needs hb=B, the outliers' width "
               "(or use a fractional b, e.g. b=2.5)");
  } else if (f.method == Method::prod) {
    if (!(f.bits >= 1 && f.bits <= 8) || f.bits != std::floor(f.bits))
      TQ_THROW("format '", spec, "': tq-prod b (total bits) must be an integer 1..8, got ",
               fmt_bits(f.bits));
  } else if (f.method == Method::polar) {
    if (f.polar_levels < 1 || f.polar_levels > 12)
      TQ_THROW("format '", spec, "': levels must be 1..12, got ", f.polar_levels);
    if (f.polar_bits1 < 1 || f.polar_bits1 > 8)
      TQ_THROW("format '", spec, "': b1 must be 1..8, got ", f.polar_bits1);
    if (f.polar_bits < 1 || f.polar_bits > 8)
      TQ_THROW("format '", spec, "': b must be 1..8, got ", f.polar_bits);
  }
  return f;
}

std::string to_string(const FormatSpec& f) {
  const FormatSpec d;
  std::vector<std::string> kv;
  const RotationKind drot = default_rotation(f.method);
  if (f.method == Method::q8_0 || f.method == Method::q4_0) {
    if (f.rotation != drot) kv.push_back("rot=" + to_string(f.rotation));
  } else if (is_dense(f.method)) {
    // no parameters
  } else if (f.method == Method::polar) {
    if (f.polar_levels != d.polar_levels) kv.push_back("levels=" + std::to_string(f.polar_levels));
    if (f.polar_bits1 != d.polar_bits1) kv.push_back("b1=" + std::to_string(f.polar_bits1));
    if (f.polar_bits != d.polar_bits) kv.push_back("b=" + std::to_string(f.polar_bits));
    if (f.rotation != drot) kv.push_back("rot=" + to_string(f.rotation));
  } else {
    kv.push_back("b=" + fmt_bits(f.bits));
    if (f.method == Method::prod) {
      if (f.sketch_rows) kv.push_back("m=" + std::to_string(f.sketch_rows));
      if (f.sketch != d.sketch) kv.push_back("s=gauss");
    }
    if (f.method == Method::mse && f.hi_channels)
      kv.push_back("hi=" + std::to_string(f.hi_channels));
    if (f.method == Method::mse && f.hi_percent > 0) kv.push_back("hi=" + fmt_bits(f.hi_percent) + "%");
    if (f.method == Method::mse && f.hi_bits) kv.push_back("hb=" + std::to_string(f.hi_bits));
    if (f.scale != d.scale) kv.push_back("scale=" + to_string(f.scale));
    if (f.scale_type != d.scale_type) kv.push_back("sf=f32");
    if (f.rotation != drot) kv.push_back("rot=" + to_string(f.rotation));
    if (f.law != d.law) kv.push_back("cb=" + to_string(f.law));
  }
  std::string s = to_string(f.method);
  for (size_t i = 0; i < kv.size(); ++i) s += (i ? "," : ":") + kv[i];
  return s;
}

bool is_split(const FormatSpec& f) {
  return f.method == Method::mse && (f.bits != std::floor(f.bits) || f.hi_bits > 0);
}

ChannelSplit channel_split(const FormatSpec& f, int dim) {
  TQ_REQUIRE(is_split(f), "format ", to_string(f), " has no channel split");
  const int lo_bits = static_cast<int>(std::floor(f.bits));
  int hi = f.hi_channels;
  if (f.hi_percent > 0) hi = static_cast<int>(std::lround(dim * f.hi_percent / 100.0));
  if (hi == 0) {
    const double want = (f.bits - lo_bits) * dim;
    hi = static_cast<int>(std::lround(want));
    TQ_REQUIRE(std::fabs(want - hi) < 1e-9, "format ", to_string(f), " at dim ", dim, " needs ",
               want, " channels at ", lo_bits + 1,
               " bits; choose b so that (b - floor(b)) * dim is a whole number, or set hi=N");
  }
  TQ_REQUIRE(hi >= 1 && hi < dim, "format ", to_string(f), ": hi must be in 1..", dim - 1,
             " for dim ", dim, ", got ", hi);
  return {hi, f.hi_bits ? f.hi_bits : lo_bits + 1, dim - hi, lo_bits};
}

void validate_format(const FormatSpec& f, int dim) {
  TQ_REQUIRE(dim >= 8 && dim <= 16384, "dim must be 8..16384, got ", dim, " (format ",
             to_string(f), ")");
  switch (f.method) {
    case Method::mse:
      TQ_REQUIRE(f.bits >= 1 && f.bits <= 8, "format ", to_string(f), ": b must be 1..8");
      if (is_split(f)) {
        const ChannelSplit s = channel_split(f, dim);
        TQ_REQUIRE(s.hi_channels >= 8 && s.lo_channels >= 8, "format ", to_string(f), " at dim ",
                   dim, ": each channel group needs >= 8 channels, got ", s.hi_channels, " + ",
                   s.lo_channels);
      }
      break;
    case Method::prod:
      TQ_REQUIRE(f.bits >= 1 && f.bits <= 8 && f.bits == std::floor(f.bits), "format ",
                 to_string(f), ": b must be an integer 1..8");
      break;
    case Method::polar:
      TQ_REQUIRE(dim % (1 << f.polar_levels) == 0, "format ", to_string(f), ": dim ", dim,
                 " must be divisible by 2^levels = ", 1 << f.polar_levels);
      break;
    case Method::q8_0:
    case Method::q4_0:
      TQ_REQUIRE(dim % kBlockElems == 0, "format ", to_string(f), ": dim ", dim,
                 " must be a multiple of the block size ", kBlockElems);
      break;
    case Method::f32:
    case Method::f16:
    case Method::bf16: break;
  }
}

RecordBytes record_bytes(const FormatSpec& f, int dim) {
  validate_format(f, dim);
  const size_t sb = scale_bytes(f.scale_type);
  RecordBytes r;
  switch (f.method) {
    case Method::mse:
      if (is_split(f)) {
        const ChannelSplit s = channel_split(f, dim);
        r.codes = packed_bytes(s.hi_channels, s.hi_bits) + packed_bytes(s.lo_channels, s.lo_bits);
        r.scales = 2 * sb;
      } else {
        r.codes = packed_bytes(dim, static_cast<int>(f.bits));
        r.scales = sb;
      }
      break;
    case Method::prod: {
      const int b = static_cast<int>(f.bits);
      const int m = f.sketch_rows ? f.sketch_rows : dim;
      r.codes = b > 1 ? packed_bytes(dim, b - 1) : 0;
      r.sketch = packed_bytes(m, 1);
      r.scales = b > 1 ? 2 * sb : sb;
      break;
    }
    case Method::polar:
      r.codes = polar_record_bytes(dim, f.polar_levels, f.polar_bits1, f.polar_bits) -
                2 * size_t(dim >> f.polar_levels);
      r.scales = 2 * size_t(dim >> f.polar_levels);
      break;
    case Method::q8_0:
      r.codes = size_t(dim);
      r.scales = 2 * size_t(dim / kBlockElems);
      break;
    case Method::q4_0:
      r.codes = size_t(dim / 2);
      r.scales = 2 * size_t(dim / kBlockElems);
      break;
    case Method::f32: r.codes = 4 * size_t(dim); break;
    case Method::f16:
    case Method::bf16: r.codes = 2 * size_t(dim); break;
  }
  return r;
}

size_t bytes_per_vector(const FormatSpec& f, int dim) { return record_bytes(f, dim).total(); }

double bits_per_coord(const FormatSpec& f, int dim) {
  return 8.0 * static_cast<double>(bytes_per_vector(f, dim)) / dim;
}

}  // namespace tq
