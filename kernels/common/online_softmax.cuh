// Online softmax in base 2 over mma.sync m16n8 accumulator tiles (FlashAttention-2 §3.1
// recurrence; SageAttention folds log2(e) into the Q scale so scores arrive in base 2).
// A thread owns two rows of each tile (c0,c1: row lane/4; c2,c3: row lane/4 + 8); the four
// lanes of a quad share those rows.
#pragma once

#include "mma_sm80.cuh"

namespace sageattn {

struct RowStats {
  float max[2] = {-__int_as_float(0x7f800000), -__int_as_float(0x7f800000)};  // -inf
  float sum[2] = {0.f, 0.f};  // this thread's partial row sums (quad-reduced at the end)
};

/// @brief Turn base-2 scores into unnormalized probabilities in place, update the running
/// max and sums, and return the factor each row's earlier output must be scaled by.
/// Probabilities come out multiplied by 2^log2_p_scale (FP8 PV scales P into the E4M3 range by
/// shifting the max; the row sums carry the same factor, so it cancels in O / l).
/// kRowSums false: leave st.sum alone (the sm90 tree sums the rounded P on the tensor core).
template <int kTiles, bool kRowSums = true>
__device__ __forceinline__ void online_softmax_step(float (&s)[kTiles][4], RowStats& st,
                                                    float (&rescale)[2], float log2_p_scale = 0.f) {
  const float neg_inf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float m = st.max[r];
#pragma unroll
    for (int j = 0; j < kTiles; ++j) m = fmaxf(m, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    m = quad_max(m);
    // A row that has seen no visible key keeps max -inf; use 0 so exp2 gives 0, not NaN.
    const float m_use = m == neg_inf ? 0.f : m;
    rescale[r] = fast_exp2(st.max[r] - m_use);
    st.max[r] = m;
    const float shift = m_use - log2_p_scale;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      s[j][2 * r] = fast_exp2(s[j][2 * r] - shift);
      s[j][2 * r + 1] = fast_exp2(s[j][2 * r + 1] - shift);
      if (kRowSums) sum += s[j][2 * r] + s[j][2 * r + 1];
    }
    if (kRowSums) st.sum[r] = st.sum[r] * rescale[r] + sum;
  }
}

/// @brief Final row sums (quad-reduced, still carrying 2^log2_p_scale) and natural-log LSE of
/// the unscaled probabilities; empty rows give sum 0, LSE -inf.
__device__ __forceinline__ void finish_rows(const RowStats& st, float (&sum)[2], float (&lse)[2],
                                            float log2_p_scale = 0.f) {
  const float ln2 = 0.69314718055994531f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    sum[r] = quad_sum(st.sum[r]);
    lse[r] = sum[r] > 0.f ? (st.max[r] + log2f(sum[r]) - log2_p_scale) * ln2 : -__int_as_float(0x7f800000);
  }
}

}  // namespace sageattn
