// Tight little-endian bitstreams of b-bit codes, b = 1..8.
// Code i occupies stream bits [i*b, (i+1)*b); stream bit k is bit (k % 8) of
// byte k / 8; the last byte is zero-padded. The layout never depends on the
// SIMD level (SIMD paths produce the same bytes).
//
//   std::vector<uint8_t> buf(tq::packed_bytes(n, 3));
//   tq::pack_codes(codes, n, 3, buf.data());
#pragma once

#include <cstddef>
#include <cstdint>

namespace tq {

constexpr size_t packed_bytes(size_t n_codes, int bits) { return (n_codes * bits + 7) / 8; }

// codes: [n] each < 2^bits (checked: throws tq::Error naming the index);
// out: [packed_bytes(n, bits)]
void pack_codes(const uint8_t* codes, size_t n, int bits, uint8_t* out);
// in: [packed_bytes(n, bits)], codes: [n]
void unpack_codes(const uint8_t* in, size_t n, int bits, uint8_t* codes);

}  // namespace tq
