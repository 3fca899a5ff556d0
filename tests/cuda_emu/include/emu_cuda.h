// A CPU emulator of the CUDA execution model, just large enough to run csrc/fused/*.cu unchanged
// (build.py only rewrites `kernel<<<grid, block, smem, stream>>>(args)` into
// `::emu::launch(kernel, ::emu::LaunchConfig(grid, block, smem, stream), args)`).
//
// Model: every CUDA thread of a block runs the kernel body on a stack of its own; the blocks of a
// grid run one after another on those threads (so a `__shared__` array is a function-local static).
// `__syncthreads` is a block barrier and `__shfl_xor_sync` a warp barrier around an exchange slot.
// Two schedulers, the same kernel code and barriers:
// * fibers (default): all CUDA threads are ucontext fibers on one OS thread, switched round-robin at
//   barriers. Fast (a switch is a few hundred ns), deterministic, and a barrier nobody can complete
//   is reported as a deadlock. Annotated for AddressSanitizer, which then sees every out-of-bounds
//   load and store of a kernel ("device" memory is host memory).
// * OS threads (ThreadSanitizer builds, or -DEMU_THREADS): one std::thread per CUDA thread, barriers
//   on a mutex and condition variable, so ThreadSanitizer sees exactly the happens-before edges the
//   hardware barriers give: a missing __syncthreads shows up as a data race on the __shared__ array.
//
// What is undefined on hardware is reported (emu::fail -> cudaErrorLaunchFailure), never guessed:
// a barrier or full-mask shuffle that some of the threads it names never reach because they exited,
// masks other than the full warp, partial warps in a shuffle, invalid launch configurations.
//
// Not modelled: timing, occupancy and the memory model beyond barriers; --use_fast_math
// approximations (exp2f, rsqrtf here are exact to float rounding); warp-synchronous code without
// __syncwarp (none in our kernels).
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__) && !defined(EMU_THREADS)
#define EMU_THREADS 1
#endif
#ifdef EMU_THREADS
#define EMU_TLS thread_local  // per OS thread
#else
#include <sys/mman.h>
#include <ucontext.h>
#define EMU_TLS  // one OS thread: the fiber scheduler saves and restores these per fiber
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline EMU_TLS dim3 threadIdx{0, 0, 0};
inline EMU_TLS dim3 blockIdx{0, 0, 0};
inline dim3 blockDim;  // written before a launch starts its threads, read-only while they run
inline dim3 gridDim;

// ---- fp16 / bf16 (round to nearest even, as the __float2*_rn intrinsics) ----------------------
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);  // IEEE conversion: round to nearest even
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

namespace emu {

struct Failures {
  std::mutex m;
  std::vector<std::string> messages;
  cudaError_t last = cudaSuccess;
};
inline Failures& failures() {
  static Failures f;
  return f;
}

// Records undefined behaviour or a bad launch; the launch's cudaGetLastError then reports it.
inline void fail(const std::string& what, cudaError_t code = cudaErrorLaunchFailure) {
  Failures& f = failures();
  std::lock_guard<std::mutex> lock(f.m);
  if (f.messages.size() < 16) f.messages.push_back(what);
  f.last = code;
}

#ifdef EMU_THREADS
inline void note_progress() {}
#else
inline uint64_t g_progress = 0;  // barrier events; a scheduler round without one is a deadlock
inline void note_progress() { ++g_progress; }
void yield();  // fiber scheduler: back to the scheduler, resumed in the next round
#endif

// A reusable barrier for a fixed set of threads. A thread that exits leaves the set; reaching the
// barrier after a member exited, or exiting while members wait, is undefined on hardware: fail().
class Barrier {
 public:
  void reset(int members) {
    std::lock_guard<std::mutex> lock(m_);
    expected_ = members;
    arrived_ = exited_ = 0;
  }
  void arrive_and_wait(const char* what, const std::function<void()>& completion = nullptr) {
    std::unique_lock<std::mutex> lock(m_);
    if (exited_ > 0) fail(std::string(what) + " reached after " + std::to_string(exited_) + " of its threads exited");
    const uint64_t gen = generation_;
    note_progress();
    if (++arrived_ >= expected_) {
      if (completion) completion();
      release();
    } else {
#ifdef EMU_THREADS
      cv_.wait(lock, [&] { return generation_ != gen; });
#else
      lock.unlock();  // the other fibers run on this OS thread
      while (generation_ == gen) yield();
#endif
    }
  }
  void exit(const char* what) {
    std::lock_guard<std::mutex> lock(m_);
    note_progress();
    ++exited_;
    --expected_;
    if (arrived_ > 0) {
      fail(std::string("a thread exited while others wait at ") + what);
      if (arrived_ >= expected_) release();
    }
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_ = 0, arrived_ = 0, exited_ = 0;
  uint64_t generation_ = 0;
};

// Per-launch state shared by the threads of the running block.
struct BlockState {
  explicit BlockState(int threads)
      : threads(threads), warps((threads + 31) / 32), warp_barriers(new Barrier[warps]), slots(threads) {
    reset();
  }
  void reset() {
    block_barrier.reset(threads);
    for (int w = 0; w < warps; ++w) warp_barriers[w].reset(lanes(w));
  }
  int lanes(int warp) const { return warp * 32 + 32 <= threads ? 32 : threads - warp * 32; }
  int threads, warps;
  Barrier block_barrier;
  std::unique_ptr<Barrier[]> warp_barriers;
  std::vector<uint32_t> slots;  // one exchange word per thread, for shuffles
};
inline BlockState* g_block = nullptr;
inline EMU_TLS int t_linear = 0;  // linear thread index in the block

inline int sm_count() {
  const char* env = std::getenv("EMU_SM_COUNT");
  const int n = env ? std::atoi(env) : 2;
  return n > 0 ? n : 2;
}

struct LaunchConfig {
  LaunchConfig(dim3 g, dim3 b, size_t shared = 0, cudaStream_t s = nullptr)
      : grid(g), block(b), dynamic_smem(shared), stream(s) {}
  dim3 grid, block;
  size_t dynamic_smem;
  cudaStream_t stream;
};

#ifdef EMU_THREADS
inline void run_threads(int threads, const std::function<void(int)>& worker) {
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) pool.emplace_back(worker, i);
  for (auto& t : pool) t.join();
}
#else
// ---- fiber scheduler: every CUDA thread a ucontext fiber on this OS thread ----------------------
constexpr size_t kFiberStack = size_t(256) << 10;

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  dim3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};  // saved while another fiber runs
  bool done = false;
  void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping across switches
};
struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  int current = -1;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  const std::function<void(int)>* worker = nullptr;
};
inline Scheduler* g_sched = nullptr;

inline void switch_to_scheduler(bool finished) {
  Fiber& f = g_sched->fibers[g_sched->current];
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, g_sched->main_bottom, g_sched->main_size);
#endif
  swapcontext(&f.ctx, &g_sched->main);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &g_sched->main_bottom, &g_sched->main_size);
#endif
}
inline void yield() { switch_to_scheduler(false); }

inline void fiber_entry(int index) {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched->main_bottom, &g_sched->main_size);
#endif
  (*g_sched->worker)(index);
  g_sched->fibers[index].done = true;
  note_progress();
  switch_to_scheduler(true);  // never resumed
}

// Runs worker(i) for i < threads as fibers, round-robin, until all return or none can progress.
inline void run_fibers(int threads, const std::function<void(int)>& worker) {
  const size_t bytes = static_cast<size_t>(threads) * kFiberStack;
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) return fail("could not map the fiber stacks");
  char* stacks = static_cast<char*>(mem);
  Scheduler sched;
  sched.fibers.resize(static_cast<size_t>(threads));
  sched.worker = &worker;
  g_sched = &sched;
  for (int i = 0; i < threads; ++i) {
    Fiber& f = sched.fibers[i];
    f.stack = stacks + static_cast<size_t>(i) * kFiberStack;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kFiberStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry), 1, i);
  }
  for (int remaining = threads; remaining > 0;) {
    const uint64_t progress = g_progress;
    for (int i = 0; i < threads; ++i) {
      Fiber& f = sched.fibers[i];
      if (f.done) continue;
      threadIdx = f.thread_idx;
      blockIdx = f.block_idx;
      t_linear = i;
      sched.current = i;
#ifdef EMU_ASAN
      void* fake = nullptr;
      __sanitizer_start_switch_fiber(&fake, f.stack, kFiberStack);
#endif
      swapcontext(&sched.main, &f.ctx);
#ifdef EMU_ASAN
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
      f.thread_idx = threadIdx;
      f.block_idx = blockIdx;
      remaining -= f.done ? 1 : 0;
    }
    if (remaining > 0 && g_progress == progress) {
      fail("deadlock: " + std::to_string(remaining) + " threads wait at barriers that can never complete");
      break;
    }
  }
#ifdef EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(stacks, bytes);  // frames of fibers that never returned
#endif
  munmap(mem, bytes);
  g_sched = nullptr;
}
#endif

// Runs body() once per (block, thread): block after block, each CUDA thread on its own fiber or OS
// thread, with the end of a block a barrier of all threads.
inline void run_grid(const LaunchConfig& cfg, const std::function<void()>& body) {
  const int64_t threads = int64_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  const int64_t blocks = int64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  if (threads < 1 || threads > 1024 || cfg.block.z > 64 || blocks < 1 || cfg.grid.x > 0x7fffffffu ||
      cfg.grid.y > 65535 || cfg.grid.z > 65535 || cfg.dynamic_smem > 0) {
    fail("invalid launch configuration", cudaErrorInvalidConfiguration);
    return;
  }
  blockDim = cfg.block;
  gridDim = cfg.grid;
  BlockState state(static_cast<int>(threads));
  g_block = &state;
  Barrier grid_barrier;  // between blocks: every thread finished block b before any starts b + 1
  grid_barrier.reset(static_cast<int>(threads));
  const std::function<void(int)> worker = [&](int linear) {
    t_linear = linear;
    threadIdx = dim3(linear % cfg.block.x, (linear / cfg.block.x) % cfg.block.y, linear / (cfg.block.x * cfg.block.y));
    for (int64_t b = 0; b < blocks; ++b) {
      blockIdx = dim3(static_cast<unsigned>(b % cfg.grid.x), static_cast<unsigned>((b / cfg.grid.x) % cfg.grid.y),
                      static_cast<unsigned>(b / (int64_t(cfg.grid.x) * cfg.grid.y)));
      body();
      state.block_barrier.exit("__syncthreads()");
      state.warp_barriers[linear / 32].exit("__shfl_xor_sync");
      grid_barrier.arrive_and_wait("end of block", [&] { state.reset(); });
    }
  };
#ifdef EMU_THREADS
  run_threads(static_cast<int>(threads), worker);
#else
  run_fibers(static_cast<int>(threads), worker);
#endif
  g_block = nullptr;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), const LaunchConfig& cfg, A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  run_grid(cfg, [&] { kernel(static_cast<P>(args)...); });
}

}  // namespace emu

inline void __syncthreads() { emu::g_block->block_barrier.arrive_and_wait("__syncthreads()"); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(sizeof(T) == 4, "the emulator shuffles 4-byte values");
  emu::BlockState& st = *emu::g_block;
  const int me = emu::t_linear;
  const int warp = me / 32;
  const int src = warp * 32 + ((me % 32) ^ (lane_mask & 31));
  if (mask != 0xffffffffu || width != 32) emu::fail("__shfl_xor_sync: only full-warp masks and width 32 are emulated");
  if (st.lanes(warp) != 32) emu::fail("__shfl_xor_sync in a partial warp");
  std::memcpy(&st.slots[me], &var, 4);
  st.warp_barriers[warp].arrive_and_wait("__shfl_xor_sync");
  T out = var;
  if (src < st.threads) std::memcpy(&out, &st.slots[src], 4);
  st.warp_barriers[warp].arrive_and_wait("__shfl_xor_sync");  // slots are reused by the next shuffle
  return out;
}

// ---- runtime API used by the launchers -------------------------------------------------------
inline cudaError_t cudaGetLastError() {
  emu::Failures& f = emu::failures();
  std::lock_guard<std::mutex> lock(f.m);
  const cudaError_t e = f.last;
  f.last = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = emu::sm_count();  // small (EMU_SM_COUNT, default 2): grid-stride loops really iterate
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K, int block_size, size_t) {
  *blocks = block_size > 0 ? 1 : 0;
  return cudaSuccess;
}
