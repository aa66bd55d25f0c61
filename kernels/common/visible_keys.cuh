// Which keys a block of query rows sees: shared by every attention main loop (mma.sync trees,
// sm90). Causal is bottom-right aligned: key j is visible to query i iff j <= i + causal_offset
// (varlen: per sequence, offset = its k length - its q length).
#pragma once

#include "params.h"
#include "quantize.cuh"  // SeqSpan

namespace sageattn {

/// Key blocks of kBlockK keys visible to rows [q0, q0 + kBlockQ): blocks [0, n_blocks); from
/// first_masked on a block holds a key some row must not see (the sequence end, the diagonal).
struct VisibleKeys {
  int n_blocks;
  int first_masked;
  long long causal_offset;
};

template <int kBlockQ, int kBlockK>
__device__ __forceinline__ VisibleKeys visible_keys(const AttnParams& p, int q0, const SeqSpan& q_span,
                                                    const SeqSpan& k_span) {
  VisibleKeys v;
  v.causal_offset = p.cu_seqlens_q != 0 ? k_span.len - q_span.len : p.causal_offset;
  v.n_blocks = (k_span.len + kBlockK - 1) / kBlockK;
  v.first_masked = k_span.len / kBlockK;  // a partial last block needs the length mask
  if (p.causal) {
    const long long last_visible = q0 + kBlockQ - 1 + v.causal_offset;
    v.n_blocks = last_visible < 0 ? 0 : static_cast<int>(min(static_cast<long long>(v.n_blocks), last_visible / kBlockK + 1));
    const long long first_row_limit = q0 + v.causal_offset;  // keys above it are masked for row q0
    const long long diag = first_row_limit < 0 ? 0 : (first_row_limit + 1) / kBlockK;
    v.first_masked = static_cast<int>(min(static_cast<long long>(v.first_masked), diag));
  }
  return v;
}

}  // namespace sageattn
