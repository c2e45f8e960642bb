// CUTLASS's Hopper implicit-GEMM convolutions (TMA im2col loads, warp-specialised wgmma) for
// the 3x3 convolutions of RRDBNet's trunk, built as a plain shared library so that
// bench/cutlass_conv.py can time them against cuDNN from PyTorch through ctypes.
//
// fp16 activations and filters, channels last (NHWC, and KRSC for the filter), fp32 sums,
// fp16 output, padding 1, stride 1. Each exported function is one tile shape; the problem shape
// is given at run time. Returns 0 on success, 1 if CUTLASS cannot run that problem with that
// tile shape, 2 if the launch failed, 3 if it would need a workspace (none of these do).

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/conv/convolution.h"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"

using namespace cute;

template <int TileM, int TileN, int TileK>
struct Fprop {
  using Half = cutlass::half_t;
  using Nhwc = cutlass::layout::TensorNHWC;
  using TileShape = Shape<Int<TileM>, Int<TileN>, Shape<Int<TileK>>>;
  using ClusterShape = Shape<_1, _1, _1>;

  // No source tensor (ElementC = void): the output is the convolution alone.
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, Nhwc, 8, Half, Nhwc, 8, cutlass::epilogue::TmaWarpSpecialized>::CollectiveOp;

  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,
      Half, Nhwc, 8, Half, Nhwc, 8, float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;

  using Problem = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 2>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;

  static int run(const void* act, const void* flt, void* out, int n, int h, int w, int c, int k,
                 cudaStream_t stream) {
    Problem problem(cutlass::conv::Mode::kCrossCorrelation, {n, h, w, c}, {k, 3, 3, c},
                    {1, 1}, {1, 1}, {1, 1}, {1, 1}, 1);
    typename Kernel::StrideD stride_d;
    cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideD{})>{}, [&](auto i) {
      cute::get<0, i>(stride_d) = problem.stride_C[Problem::RankT - 2 - i];
    });
    typename Conv::Arguments args{
        problem,
        {static_cast<const Half*>(act), static_cast<const Half*>(flt)},
        {{1.0f, 0.0f}, nullptr, stride_d, static_cast<Half*>(out), stride_d}};
    Conv conv;
    if (conv.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (Conv::get_workspace_size(args) != 0) return 3;
    if (conv.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return 2;
    return conv.run(stream) == cutlass::Status::kSuccess ? 0 : 2;
  }
};

// One tile shape per object file, named by the build (nvcc splits -D values at commas, so the
// three numbers come apart): exported as conv_MxNxK.
#ifndef TILE_M
#define TILE_M 128
#define TILE_N 64
#define TILE_K 64
#endif
#define EXPORT_NAME(M, N, K) conv_##M##x##N##x##K
#define EXPORTED(M, N, K) EXPORT_NAME(M, N, K)

extern "C" int EXPORTED(TILE_M, TILE_N, TILE_K)(const void* act, const void* flt, void* out, int n, int h,
                                                int w, int c, int k, void* stream) {
  return Fprop<TILE_M, TILE_N, TILE_K>::run(act, flt, out, n, h, w, c, k, static_cast<cudaStream_t>(stream));
}
