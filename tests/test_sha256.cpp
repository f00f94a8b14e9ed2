// SHA-256 against the FIPS 180-4 example vectors.
#include <gtest/gtest.h>

#include <string>

#include "turboquant/sha256.hpp"

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(tq::sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(tq::sha256_hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(tq::sha256_hex(two.data(), two.size()),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // One million 'a', fed in uneven pieces (7 bytes at a time, then the rest).
  tq::Sha256 s;
  const std::string a(1000000, 'a');
  size_t fed = 0;
  for (; fed + 7 <= a.size(); fed += 7) s.update(a.data() + fed, 7);
  s.update(a.data() + fed, a.size() - fed);
  EXPECT_EQ(s.hex(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}
