// Programmatic dependent launch (sm_90 on): ops.py launches the second and later kernels of a
// call with the programmatic attribute, so each may start while the one before it drains. Such a
// kernel must wait_for_previous_grid() before it reads anything an earlier launch of the call
// wrote, and before it ends (its completion then implies theirs, for the kernel after it).
// Launched plainly, or compiled for an older architecture, both calls are no-ops.
#pragma once

namespace sageattn {

/// @brief Block until the previous kernel on the stream has completed and its writes are
/// visible (immediately when there is none in flight).
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/// @brief Let the next kernel on the stream start launching once every CTA of this one has
/// called this (or exited): its CTAs then take SMs as this kernel's last wave leaves them.
__device__ __forceinline__ void allow_next_grid_to_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace sageattn
