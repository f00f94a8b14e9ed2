// turboquant: KV-cache compression with TurboQuant. One include for the
// whole public API.
//
//   #include <turboquant/turboquant.hpp>
//   auto q = tq::make_quantizer("tq-mse:b=3", 128, /*seed=*/0);
#pragma once

#include "turboquant/bitpack.hpp"
#include "turboquant/codebook.hpp"
#include "turboquant/distortion.hpp"
#include "turboquant/error.hpp"
#include "turboquant/format.hpp"
#include "turboquant/half.hpp"
#include "turboquant/quantizer.hpp"
#include "turboquant/rng.hpp"
#include "turboquant/rotation.hpp"
#include "turboquant/simd.hpp"
#include "turboquant/version.hpp"
