// Attention building blocks shared by every cache and device:
//  - AttentionParams: softmax scale, Gemma-2 logit softcap, sliding window,
//    attention sinks;
//  - the partial-attention state (output + log-sum-exp) and its exact merge,
//    which split-KV decode, paging and the dense recent window all reuse;
//  - attention_ref: plain fp64 attention over dense K/V, the specification.
//
//   // o_a, o_b: [dim] normalised partial outputs; lse_a, lse_b their log-sum-exp
//   tq::merge_states(o_a, lse_a, o_b, lse_b, o, &lse, dim);
#pragma once

#include <cstddef>
#include <limits>

namespace tq {

struct AttentionParams {
  float scale = 0.0f;    // softmax scale; 0 means 1/sqrt(head_dim)
  float softcap = 0.0f;  // logits -> softcap * tanh(logit / softcap); 0 = off (Gemma 2)
  int window = 0;        // sliding window: a query at position p sees keys (p - window, p]; 0 = all
  int n_sinks = 0;       // the first n_sinks positions are always visible (attention sinks)
};

constexpr float kEmptyLse = -std::numeric_limits<float>::infinity();

// Merges two partial states over disjoint key sets. o_a, o_b, o: [dim]
// (o may alias o_a or o_b). An empty part (lse = -inf) is neutral; two empty
// parts give o = 0, lse = -inf -- never NaN.
void merge_states(const float* o_a, float lse_a, const float* o_b, float lse_b, float* o,
                  float* lse, int dim);

// Applies the softcap to one logit (after scaling).
float apply_softcap(float logit, float softcap);

// Is key position `k` visible to a query at position `q` (causal, window, sinks)?
bool key_visible(int q, int k, const AttentionParams& p);

// fp64 reference attention of one query head over dense keys/values.
// q: [dim], k, v: [n_keys, dim] with row stride `stride` floats; positions of
// keys are 0..n_keys-1 and the query is at `q_pos`. out: [dim]; returns lse
// (-inf if no key is visible, then out = 0).
double attention_ref(const float* q, const float* k, const float* v, size_t n_keys, size_t stride,
                     int dim, int q_pos, const AttentionParams& p, float* out);

}  // namespace tq
