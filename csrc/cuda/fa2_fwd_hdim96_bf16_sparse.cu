// One instantiation per file (see flash_launch.h).
#include "flash_launch_template.h"

namespace fastattn::cuda {
template void run_fa2_fwd_<__nv_bfloat16, 96, true>(FlashParams&, cudaStream_t);
}  // namespace fastattn::cuda
