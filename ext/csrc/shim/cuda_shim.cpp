// The thread pool and the block scheduler of the CUDA emulation (cuda_shim.h).
//
// Cost is what decides the design: on a 2-core machine a barrier over 256 OS
// threads costs ~0.7 ms (every thread must be scheduled once), so one OS
// thread per CUDA thread made the select kernel's ~20 barriers per block the
// whole test budget.  Here the threads of a block share one pool thread: a
// kernel without barriers runs its threads as plain calls, and a block that
// reaches __syncthreads switches to fibers (a context switch per thread and
// barrier, no scheduler involved).  Blocks still run concurrently, one per
// pool thread.
#include "shim/cuda_shim.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

thread_local ShimDim3 threadIdx, blockIdx, blockDim, gridDim;

namespace ppap {
namespace shim {
namespace {

constexpr int kMaxThreadsPerBlock = 1024;     // every compute capability since 2.0
constexpr int64_t kMaxBlocks = INT32_MAX;     // gridDim.x, compute capability >= 3.0
constexpr size_t kFiberStack = 64 << 10;      // kernels use a few hundred bytes

std::atomic<int64_t> n_launches{0}, n_blocks{0}, n_cooperative_blocks{0}, n_barriers{0};

struct BlockError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class State { kNotStarted, kAtBarrier, kExited };

// Fiber stacks of one pool thread, each above an inaccessible guard page so
// that an overflow faults instead of corrupting its neighbour.
// Sized before a block starts (a remap would pull the stacks from under
// suspended fibers).
class Stacks {
 public:
  void reserve(int count) {
    if (count > count_) grow(count);
  }
  char* get(int t) const { return base_ + size_t(t) * stride() + page(); }

 private:
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  static size_t stride() { return kFiberStack + page(); }
  void grow(int count) {
    if (base_ != nullptr) munmap(base_, size_t(count_) * stride());
    void* p = mmap(nullptr, size_t(count) * stride(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emulated CUDA: cannot map fiber stacks");
    base_ = static_cast<char*>(p);
    count_ = count;
    for (int t = 0; t < count; ++t) mprotect(base_ + size_t(t) * stride(), page(), PROT_NONE);
  }
  char* base_ = nullptr;
  int count_ = 0;
};

// One block being run on the calling pool thread.
//
// Threads start one after another on the pool thread's own stack, the
// highest index first.  The first thread to call __syncthreads (the "lead")
// stays on that stack; the others become fibers.  At each barrier the lead
// resumes every other live thread, in a new random order, until it reaches
// the barrier too; when the lead returns, the others are run to their end.
struct Block {
  const std::function<void()>* body = nullptr;
  int threads = 0;
  unsigned index = 0;
  bool cooperative = false;
  int lead = -1;
  int running = -1;
  std::vector<State> state;
  std::vector<ucontext_t> context;
  std::vector<int> order;
  ucontext_t lead_context;
  std::mt19937 rng;
  Stacks* stacks = nullptr;
  std::string fiber_error;  // an exception that ended a fiber
};

thread_local Block* current = nullptr;

void set_thread(Block& b, int t) {
  b.running = t;
  threadIdx = ShimDim3{static_cast<unsigned>(t), 0, 0};
}

[[noreturn]] void divergent(const Block& b, const std::string& what) {
  throw BlockError("emulated CUDA: __syncthreads in block " + std::to_string(b.index) +
                   " is not reached by every thread of the block (" + what +
                   "); CUDA leaves such a barrier undefined");
}

void fiber_entry() {
  Block& b = *current;
  try {
    (*b.body)();
  } catch (const std::exception& e) {  // must not unwind past the fiber's first frame
    if (b.fiber_error.empty()) b.fiber_error = e.what();
  }
  b.state[b.running] = State::kExited;
  // Returning resumes uc_link, the lead.
}

// Runs every live thread but the lead until it reaches the next barrier or
// ends; returns how many ended.
int run_others(Block& b) {
  b.order.clear();
  for (int t = 0; t < b.threads; ++t) {
    if (t != b.lead && b.state[t] != State::kExited) b.order.push_back(t);
  }
  std::shuffle(b.order.begin(), b.order.end(), b.rng);
  int ended = 0;
  for (int t : b.order) {
    ucontext_t& ctx = b.context[t];
    if (b.state[t] == State::kNotStarted) {
      getcontext(&ctx);
      ctx.uc_stack.ss_sp = b.stacks->get(t);
      ctx.uc_stack.ss_size = kFiberStack;
      ctx.uc_link = &b.lead_context;
      makecontext(&ctx, fiber_entry, 0);
    }
    set_thread(b, t);
    swapcontext(&b.lead_context, &ctx);
    if (b.state[t] == State::kExited) ++ended;
  }
  set_thread(b, b.lead);
  if (!b.fiber_error.empty()) throw BlockError(b.fiber_error);
  return ended;
}

void run_block(Block& b, unsigned index) {
  b.index = index;
  b.cooperative = false;
  b.lead = -1;
  b.state.assign(b.threads, State::kNotStarted);
  b.context.resize(b.threads);
  b.stacks->reserve(b.threads);
  b.fiber_error.clear();
  b.rng.seed(index);
  blockIdx = ShimDim3{index, 0, 0};
  current = &b;
  for (int t = b.threads - 1; t >= 0 && !b.cooperative; --t) {
    set_thread(b, t);
    (*b.body)();
    b.state[t] = State::kExited;
  }
  if (b.cooperative) {
    // The lead has ended: the others must end too, without another barrier.
    run_others(b);
    for (int t = 0; t < b.threads; ++t) {
      if (b.state[t] != State::kExited) divergent(b, "thread " + std::to_string(b.lead) +
                                                     " ended while others wait at a barrier");
    }
    ++n_cooperative_blocks;
  }
  ++n_blocks;
}

// The persistent pool: each thread takes the next block of the current grid.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: its threads live as long as the process
    return *pool;
  }

  void run(int64_t blocks, int threads, const std::function<void()>& body) {
    std::lock_guard<std::mutex> one_grid(grid_mu_);
    std::unique_lock<std::mutex> lock(mu_);
    body_ = &body;
    blocks_ = blocks;
    threads_ = threads;
    next_block_ = 0;
    error_.clear();
    busy_ = static_cast<int>(workers_.size());
    ++grid_;
    wake_.notify_all();
    done_.wait(lock, [&] { return busy_ == 0; });
    body_ = nullptr;
    if (!error_.empty()) throw std::runtime_error(error_);
  }

 private:
  Pool() {
    const unsigned hw = std::thread::hardware_concurrency();
    const unsigned n = std::clamp(hw == 0 ? 2u : hw, 2u, 8u);
    for (unsigned i = 0; i < n; ++i) workers_.emplace_back([this] { work(); });
  }

  void work() {
    Stacks stacks;
    Block block;
    block.stacks = &stacks;
    uint64_t seen = 0;
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return grid_ != seen; });
        seen = grid_;
      }
      block.body = body_;
      block.threads = threads_;
      blockDim = ShimDim3{static_cast<unsigned>(threads_), 1, 1};
      gridDim = ShimDim3{static_cast<unsigned>(blocks_), 1, 1};
      try {
        for (int64_t b = next_block_++; b < blocks_; b = next_block_++) {
          run_block(block, static_cast<unsigned>(b));
        }
      } catch (const std::exception& e) {
        next_block_ = blocks_;  // the other pool threads stop too
        std::lock_guard<std::mutex> lock(mu_);
        if (error_.empty()) error_ = e.what();
      }
      current = nullptr;
      std::lock_guard<std::mutex> lock(mu_);
      if (--busy_ == 0) done_.notify_all();
    }
  }

  std::mutex grid_mu_, mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  uint64_t grid_ = 0;
  int busy_ = 0;
  const std::function<void()>* body_ = nullptr;
  int64_t blocks_ = 0;
  int threads_ = 0;
  std::atomic<int64_t> next_block_{0};
  std::string error_;
};

}  // namespace

std::vector<int64_t> stats() {
  return {n_launches.load(), n_blocks.load(), n_cooperative_blocks.load(), n_barriers.load()};
}

void run_grid(int64_t blocks, int threads, const std::function<void()>& body) {
  // As cudaLaunchKernel: an empty or oversized configuration is an error.
  TORCH_CHECK(blocks >= 1 && blocks <= kMaxBlocks && threads >= 1 &&
                  threads <= kMaxThreadsPerBlock,
              "emulated CUDA: invalid configuration argument (a grid of ", blocks,
              " blocks of ", threads, " threads)");
  ++n_launches;
  try {
    Pool::get().run(blocks, threads, body);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace shim
}  // namespace ppap

void __syncthreads() {
  using namespace ppap::shim;
  Block* bp = current;
  TORCH_CHECK(bp != nullptr, "emulated CUDA: __syncthreads outside a kernel");
  Block& b = *bp;
  ++n_barriers;
  if (!b.cooperative) {
    // The first barrier of the block: threads above the caller have already
    // ended without reaching it.
    if (b.running != b.threads - 1) {
      divergent(b, "thread " + std::to_string(b.running) + " reaches it after thread " +
                       std::to_string(b.threads - 1) + " ended");
    }
    b.cooperative = true;
    b.lead = b.running;
  }
  if (b.running == b.lead) {
    if (run_others(b) > 0) divergent(b, "some threads ended instead");
    return;
  }
  const int t = b.running;
  b.state[t] = State::kAtBarrier;
  swapcontext(&b.context[t], &b.lead_context);
}

