// The CPU launcher, included after the kernel source.  It runs a grid block by block; inside a
// block every CUDA thread is a fiber (ucontext) that runs until it reaches __syncthreads or
// returns, then the next thread runs, so a barrier phase ends when all threads of the block have
// reached it.  Everything runs on the calling OS thread in a fixed order: results are
// deterministic.
//
// Fast path: thread 0 of each block runs first as a fiber.  If it returns without reaching a
// barrier, no other thread of the block may reach one either (that would be a thread waiting for
// an exited thread), so the rest run as plain calls on the launcher's stack, in the same order the
// fibers would have run.  A plain call that reaches __syncthreads is that deadlock and is reported.
#ifndef ROI_EMULATOR_LAUNCH_H
#define ROI_EMULATOR_LAUNCH_H

#include <csetjmp>
#include <cstdarg>
#include <cstdio>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define ROI_EMU_ASAN 1
#else
#define ROI_EMU_ASAN 0
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace roi_emu {

// AddressSanitizer grows stack frames with redzones.
constexpr size_t kStackSize = ROI_EMU_ASAN ? 256 * 1024 : 64 * 1024;

enum class State { fresh, waiting, done };

struct Fiber {
  ucontext_t context;
  char* stack;
  State state;
  uint3 index;
  void* fake_stack;  // AddressSanitizer's per-fiber fake stack while it is switched out
};

struct Stacks {
  char* base = nullptr;
  size_t bytes = 0;
};

struct Launch {
  void (*invoke)(const void*);  // runs the kernel once for the current threadIdx/blockIdx
  const void* kernel;
  Fiber* fibers = nullptr;  // blockDim's thread count, allocated with the first block
  Stacks stacks[2];          // thread 0's stack; the others' stacks
  Fiber* current = nullptr;  // the fiber running now; nullptr for a plain call
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;  // for AddressSanitizer's fiber annotations
  size_t scheduler_stack_size = 0;
  std::jmp_buf plain_call_exit;
  char* error;
  size_t error_size;
};

thread_local Launch* active = nullptr;

inline void set_error(Launch& launch, const char* format, ...) {
  va_list list;
  va_start(list, format);
  std::vsnprintf(launch.error, launch.error_size, format, list);
  va_end(list);
}

inline void start_switch(void** fake_stack, const void* bottom, size_t size) {
#if ROI_EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}

inline void finish_switch(void* fake_stack, const void** old_bottom, size_t* old_size) {
#if ROI_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_size);
#else
  (void)fake_stack, (void)old_bottom, (void)old_size;
#endif
}

void fiber_main() {
  Launch& launch = *active;
  Fiber* self = launch.current;
  finish_switch(nullptr, &launch.scheduler_stack, &launch.scheduler_stack_size);
  launch.invoke(launch.kernel);
  self->state = State::done;
  // A null fake-stack slot tells AddressSanitizer this fiber's stack is finished.
  start_switch(nullptr, launch.scheduler_stack, launch.scheduler_stack_size);
  swapcontext(&self->context, &launch.scheduler);
}

void barrier() {
  Launch& launch = *active;
  Fiber* self = launch.current;
  if (self == nullptr) {
    set_error(launch,
              "deadlock: thread (%u, %u, %u) of block (%u, %u, %u) reached __syncthreads after "
              "thread (0, 0, 0) of its block had returned",
              threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z);
    std::longjmp(launch.plain_call_exit, 1);
  }
  self->state = State::waiting;
  start_switch(&self->fake_stack, launch.scheduler_stack, launch.scheduler_stack_size);
  swapcontext(&self->context, &launch.scheduler);
  finish_switch(self->fake_stack, nullptr, nullptr);
}

// Maps the stacks of fibers [first, last), each above a guard page that turns a stack overflow
// into SIGSEGV.  Thread 0's stack is mapped first and alone: a block whose thread 0 returns
// without a barrier needs no other.
inline bool map_stacks(Launch& launch, unsigned int first, unsigned int last) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t slot = kStackSize + page;
  Stacks& region = launch.stacks[first == 0 ? 0 : 1];
  region.bytes = slot * (last - first);
  void* memory = mmap(nullptr, region.bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    region.bytes = 0;
    set_error(launch, "cannot map %zu bytes of fiber stacks", slot * (last - first));
    return false;
  }
  region.base = static_cast<char*>(memory);
  for (unsigned int t = first; t < last; ++t) {
    char* guard = region.base + (t - first) * slot;
    mprotect(guard, page, PROT_NONE);
    launch.fibers[t].stack = guard + page;
  }
  return true;
}

inline void release_fibers(Launch& launch) {
  for (const Stacks& region : launch.stacks) {
    if (region.bytes != 0) munmap(region.base, region.bytes);
  }
  delete[] launch.fibers;
}

// Runs fiber f from its start or from the barrier it waits at, until its next barrier or return.
inline void run_fiber(Launch& launch, Fiber& f) {
  threadIdx = f.index;
  if (f.state == State::fresh) {
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackSize;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  launch.current = &f;
  void* fake_stack = nullptr;
  start_switch(&fake_stack, f.stack, kStackSize);
  swapcontext(&launch.scheduler, &f.context);
  finish_switch(fake_stack, nullptr, nullptr);
  launch.current = nullptr;
}

inline uint3 thread_index(unsigned int t, dim3 block) {
  return uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
}

// Runs one block; false (with the error set) on a deadlock.
inline bool run_block(Launch& launch, dim3 block) {
  const unsigned int count = block.x * block.y * block.z;
  if (launch.fibers == nullptr) {
    launch.fibers = new Fiber[count];
    if (!map_stacks(launch, 0, 1)) return false;
  }
  launch.fibers[0].state = State::fresh;
  launch.fibers[0].index = thread_index(0, block);
  run_fiber(launch, launch.fibers[0]);
  if (launch.fibers[0].state == State::done) {
    if (setjmp(launch.plain_call_exit) != 0) return false;
    for (unsigned int t = 1; t < count; ++t) {
      threadIdx = thread_index(t, block);
      launch.invoke(launch.kernel);
    }
    return true;
  }
  if (count > 1 && launch.stacks[1].bytes == 0 && !map_stacks(launch, 1, count)) return false;
  for (unsigned int t = 1; t < count; ++t) {
    launch.fibers[t].state = State::fresh;
    launch.fibers[t].index = thread_index(t, block);
  }
  unsigned int first = 1;  // thread 0 has already run its first phase
  for (;;) {
    for (unsigned int t = first; t < count; ++t) {
      if (launch.fibers[t].state != State::done) run_fiber(launch, launch.fibers[t]);
    }
    first = 0;
    unsigned int waiting = 0, done_at = count;
    for (unsigned int t = 0; t < count; ++t) {
      if (launch.fibers[t].state == State::waiting) {
        ++waiting;
      } else if (done_at == count) {
        done_at = t;
      }
    }
    if (waiting == 0) return true;
    if (done_at != count) {
      const uint3 i = launch.fibers[done_at].index;
      set_error(launch,
                "deadlock: thread (%u, %u, %u) of block (%u, %u, %u) returned while %u threads "
                "of its block wait at __syncthreads",
                i.x, i.y, i.z, blockIdx.x, blockIdx.y, blockIdx.z, waiting);
      return false;
    }
  }
}

// 0: blocks run in index order (x fastest); otherwise the seed of a shuffle of them.
inline unsigned long long block_order_seed = 0;

inline int run_grid(void (*invoke)(const void*), const void* kernel, dim3 grid, dim3 block,
                    char* error, size_t error_size) {
  Launch launch;
  launch.invoke = invoke;
  launch.kernel = kernel;
  launch.error = error;
  launch.error_size = error_size;
  Launch* outer = active;
  active = &launch;
  gridDim = grid;
  blockDim = block;
  bool ok = true;
  if (block_order_seed == 0) {
    for (unsigned int z = 0; ok && z < grid.z; ++z) {
      for (unsigned int y = 0; ok && y < grid.y; ++y) {
        for (unsigned int x = 0; ok && x < grid.x; ++x) {
          blockIdx = uint3{x, y, z};
          ok = run_block(launch, block);
        }
      }
    }
  } else {
    // A GPU runs blocks in no set order: a seeded shuffle of them, for tests that a result
    // does not depend on that order.
    const unsigned long long count = 1ull * grid.x * grid.y * grid.z;
    std::vector<unsigned long long> order(count);
    for (unsigned long long j = 0; j < count; ++j) order[j] = j;
    unsigned long long state = block_order_seed;
    for (unsigned long long j = count; j > 1; --j) {  // Fisher-Yates with splitmix64
      state += 0x9E3779B97F4A7C15ull;
      unsigned long long r = state;
      r = (r ^ (r >> 30)) * 0xBF58476D1CE4E5B9ull;
      r = (r ^ (r >> 27)) * 0x94D049BB133111EBull;
      r ^= r >> 31;
      const unsigned long long pick = r % j;
      const unsigned long long swap = order[j - 1];
      order[j - 1] = order[pick];
      order[pick] = swap;
    }
    for (unsigned long long j = 0; ok && j < count; ++j) {
      const unsigned long long b = order[j];
      blockIdx = uint3{static_cast<unsigned int>(b % grid.x),
                       static_cast<unsigned int>((b / grid.x) % grid.y),
                       static_cast<unsigned int>(b / (1ull * grid.x * grid.y))};
      ok = run_block(launch, block);
    }
  }
  release_fibers(launch);
  active = outer;
  return ok ? 0 : 1;
}

// ----------------------------------------------------------------------------- argument checks
// NumPy has no kind of its own for bfloat16 (ml_dtypes' dtype has kind 'V'): Python sends 'z'.
template <class T>
constexpr char kind_of() {
  if constexpr (std::is_same_v<T, bool>) return 'b';
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return 'z';
  else if constexpr (std::is_floating_point_v<T> || std::is_same_v<T, __half>) return 'f';
  else if constexpr (std::is_integral_v<T> && std::is_signed_v<T>) return 'i';
  else if constexpr (std::is_integral_v<T>) return 'u';
  else return '?';
}

// The NumPy name of a kind and byte size: "int32", "float16", "bool", ...
struct TypeName {
  char text[24];
  TypeName(char kind, size_t size) {
    const char* base = kind == 'f' ? "float" : kind == 'i' ? "int" : kind == 'u' ? "uint" : nullptr;
    if (kind == 'b' && size == 1) std::snprintf(text, sizeof text, "bool");
    else if (kind == 'z' && size == 2) std::snprintf(text, sizeof text, "bfloat16");
    else if (base != nullptr) std::snprintf(text, sizeof text, "%s%zu", base, 8 * size);
    else std::snprintf(text, sizeof text, "an unknown %zu-byte type", size);
  }
};

// Python describes argument i as kinds[i] ('p' for an array, 'r' for a read-only one, 'n' for
// None, a null pointer as CuPy passes it, else the NumPy kind of the scalar) and sizes[i] (8 for
// an array or None, else the scalar's byte size); for an array, element_kinds[i] and
// element_sizes[i] describe its dtype.
template <class A>
bool check_argument(int i, const char* kinds, const size_t* sizes, const char* element_kinds,
                    const size_t* element_sizes, char* error, size_t error_size) {
  if constexpr (std::is_pointer_v<A>) {
    using E = std::remove_cv_t<std::remove_pointer_t<A>>;
    const TypeName expected(kind_of<E>(), sizeof(E));
    if (kinds[i] == 'n') return true;  // a null pointer fits any pointer parameter
    if (kinds[i] != 'p' && kinds[i] != 'r') {
      std::snprintf(error, error_size,
                    "argument %d: the kernel parameter is a pointer to %s, got numpy.%s", i,
                    expected.text, TypeName(kinds[i], sizes[i]).text);
      return false;
    }
    if (kinds[i] == 'r' && !std::is_const_v<std::remove_pointer_t<A>>) {
      std::snprintf(error, error_size,
                    "argument %d: the kernel may write through this pointer, got a read-only array",
                    i);
      return false;
    }
    if (kind_of<E>() != '?' &&
        (element_kinds[i] != kind_of<E>() || element_sizes[i] != sizeof(E))) {
      std::snprintf(error, error_size,
                    "argument %d: the kernel parameter is a pointer to %s, got an array of %s", i,
                    expected.text, TypeName(element_kinds[i], element_sizes[i]).text);
      return false;
    }
  } else if (kinds[i] != kind_of<A>() || sizes[i] != sizeof(A)) {
    const TypeName expected(kind_of<A>(), sizeof(A));
    if (kinds[i] == 'p' || kinds[i] == 'r') {
      std::snprintf(error, error_size,
                    "argument %d: the kernel parameter is %s, got an array of %s", i,
                    expected.text, TypeName(element_kinds[i], element_sizes[i]).text);
    } else if (kinds[i] == 'n') {
      std::snprintf(error, error_size, "argument %d: the kernel parameter is %s, got None", i,
                    expected.text);
    } else {
      std::snprintf(error, error_size, "argument %d: the kernel parameter is %s, got numpy.%s", i,
                    expected.text, TypeName(kinds[i], sizes[i]).text);
    }
    return false;
  }
  return true;
}

template <class... A>
struct Bound {
  void (*kernel)(A...);
  std::tuple<A...> arguments;
};

template <class... A>
void invoke_bound(const void* bound) {
  const auto& b = *static_cast<const Bound<A...>*>(bound);
  std::apply(b.kernel, b.arguments);
}

template <class... A, size_t... I>
std::tuple<A...> unpack(void** args, std::index_sequence<I...>) {
  return std::tuple<A...>{*static_cast<std::remove_cv_t<A>*>(args[I])...};
}

template <class... A>
int launch(void (*kernel)(A...), const unsigned int* grid, const unsigned int* block, void** args,
           const char* kinds, const size_t* sizes, const char* element_kinds,
           const size_t* element_sizes, int count, char* error, size_t error_size) {
  if (count != static_cast<int>(sizeof...(A))) {
    std::snprintf(error, error_size, "the kernel takes %zu arguments, got %d", sizeof...(A),
                  count);
    return 1;
  }
  int i = 0;
  const bool ok = (check_argument<A>(i++, kinds, sizes, element_kinds, element_sizes, error,
                                     error_size) && ...);
  if (!ok) return 1;
  Bound<A...> bound{kernel, unpack<A...>(args, std::index_sequence_for<A...>{})};
  return run_grid(invoke_bound<A...>, &bound, dim3(grid[0], grid[1], grid[2]),
                  dim3(block[0], block[1], block[2]), error, error_size);
}

}  // namespace roi_emu

#define ROI_EMU_EXPORT extern "C" __attribute__((visibility("default")))

ROI_EMU_EXPORT void roi_emu_set_block_order(unsigned long long seed) {
  roi_emu::block_order_seed = seed;
}

#endif  // ROI_EMULATOR_LAUNCH_H
