#include "turboquant/bitpack.hpp"

#include "kernels/kernels.hpp"
#include "turboquant/error.hpp"

namespace tq {

void pack_codes(const uint8_t* codes, size_t n, int bits, uint8_t* out) {
  TQ_REQUIRE(bits >= 1 && bits <= 8, "pack_codes: bits must be 1..8, got ", bits);
  const unsigned limit = 1u << bits;
  for (size_t i = 0; i < n; ++i)
    TQ_REQUIRE(codes[i] < limit, "pack_codes: code ", int(codes[i]), " at index ", i,
               " does not fit in ", bits, " bits");
  kernels::kernels_active().pack(codes, n, bits, out);
}

void unpack_codes(const uint8_t* in, size_t n, int bits, uint8_t* codes) {
  TQ_REQUIRE(bits >= 1 && bits <= 8, "unpack_codes: bits must be 1..8, got ", bits);
  kernels::kernels_active().unpack(in, n, bits, codes);
}

}  // namespace tq
