// Shim: the CUDA emulation layer stands in for the CUDA header of this name.
#pragma once
#include "../cuda_emu.h"
