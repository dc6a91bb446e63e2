// One instantiation per file (see flash_launch.h).
#include "fa2_bwd_launch_template.h"

namespace fastattn::cuda {
template void run_fa2_bwd_<__half, 32, false>(FlashParams&, cudaStream_t);
}  // namespace fastattn::cuda
