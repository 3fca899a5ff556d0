// Emulator stand-in for the CUDA header of this name (see emu_cuda.h).
#pragma once
#include "emu_cuda.h"
