"""CUDA emulation layer (test infrastructure): runs csrc/cuda kernels on the CPU. See cuda_emu.h."""
